#!/usr/bin/env bash
# ElasticMQ (an SQS-compatible server with FIFO queues) on 127.0.0.1 for
# keylane's SQS FIFO tests and benchmarks.
# Usage: scripts/elasticmq.sh start|stop|status|restart|bounce|halt|resume|pause|unpause|log
# (`bounce` restarts the running server on the same data; `pause` freezes
# the process, so calls hang until `unpause`, a server that stopped
# answering with nothing lost).
#
# - The server jars come from Maven Central (scripts/elasticmq/pom.xml) and
#   are cached in .state/elasticmq/lib (git-ignored); java and mvn are
#   installed with apt-get when missing.
# - Queues and messages are stored (H2 database, queue file) in a fresh
#   temporary folder per start, so `bounce` keeps them; `stop` deletes it.
#   (ElasticMQ's store is not durable for deletes and receives under load: a
#   restart can bring back deleted messages or drop some; tests of a server
#   that goes away use `pause`.)
# - Port 9324 unless KEYLANE_SQS_PORT says otherwise.
# - `start` is idempotent and prints the endpoint URL as its last line;
#   `stop` ends only the process this script started (by its pid).
set -euo pipefail
cd "$(dirname "$0")/.."
name=elasticmq
port_var=KEYLANE_SQS_PORT
port=${KEYLANE_SQS_PORT:-9324}
proc_pattern=org.elasticmq.server.Main
logname=server.log
keep_log_var=KEYLANE_KEEP_SQS_LOG
stop_wait=15
start_timeout=${KEYLANE_SQS_START_TIMEOUT:-60}
# shellcheck source=scripts/lib/server.sh
. scripts/lib/server.sh
lib=$state/lib

address() { echo "http://127.0.0.1:$port"; }

ready() { since_launch "$1" | grep -q "ElasticMQ server .* started"; }

run_server() {
  exec setsid nohup java -Xms64m -Xmx384m -Djava.awt.headless=true \
    "-Dconfig.file=$1/elasticmq.conf" -cp "$lib/*" org.elasticmq.server.Main
}

prepare() {
  local dir=$1
  ensure_java_mvn
  fetch_jars scripts/elasticmq/pom.xml "$lib"
  cat >"$dir/elasticmq.conf" <<CONF
include classpath("application.conf")
node-address { protocol = http, host = "127.0.0.1", port = $port, context-path = "" }
rest-sqs { enabled = true, bind-port = $port, bind-hostname = "127.0.0.1", sqs-limits = strict }
rest-stats { enabled = false }
# Stored, so that a bounce (a server restart mid-run) keeps its queues.
queues-storage { enabled = true, path = "$dir/queues.conf" }
messages-storage { enabled = true, uri = "jdbc:h2:$dir/messages" }
CONF
}

serve "$@"
