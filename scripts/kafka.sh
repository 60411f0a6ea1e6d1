#!/usr/bin/env bash
# A single-node Apache Kafka broker (KRaft) on 127.0.0.1 for keylane's tests
# and benchmarks. Usage: scripts/kafka.sh start|stop|status|restart|bounce|log
# (`bounce` restarts the running broker on the same data; also halt, resume,
# pause, unpause: see scripts/lib/server.sh).
#
# - The broker jars come from Maven Central (scripts/kafka/pom.xml) and are
#   cached in .state/kafka/lib (git-ignored); java and mvn are installed with
#   apt-get when missing.
# - Data and logs live in a fresh temporary folder per start; `stop` deletes it.
# - Port 9092 (controller: port + 1) unless KEYLANE_KAFKA_PORT says otherwise.
# - `start` is idempotent and prints the bootstrap address as its last line;
#   `stop` ends only the process this script started (by its pid).
set -euo pipefail
cd "$(dirname "$0")/.."
name=kafka
port_var=KEYLANE_KAFKA_PORT
port=${KEYLANE_KAFKA_PORT:-9092}
proc_pattern=kafka.Kafka
logname=broker.log
keep_log_var=KEYLANE_KEEP_KAFKA_LOG
stop_wait=30
start_timeout=${KEYLANE_KAFKA_START_TIMEOUT:-90}
# shellcheck source=scripts/lib/server.sh
. scripts/lib/server.sh
cport=$((port + 1))
lib=$state/lib
jopts=(-Xms256m -Xmx768m -XX:+UseG1GC -Djava.awt.headless=true
  "-Dlog4j2.configurationFile=$root/scripts/kafka/log4j2.properties")

address() { echo "127.0.0.1:$port"; }

ready() { since_launch "$1" | grep -q "Kafka Server started"; }

run_server() {
  exec setsid nohup java "${jopts[@]}" -cp "$lib/*" kafka.Kafka "$1/server.properties"
}

prepare() {
  local dir=$1 v
  ensure_java_mvn
  v=$(java -version 2>&1 | sed -n 's/.*version "\([0-9]*\).*/\1/p' | head -n1)
  if [ -z "$v" ] || [ "$v" -lt 17 ]; then
    say "Kafka 4 needs Java 17 or later; found: $(java -version 2>&1 | head -n1)"
    exit 1
  fi
  fetch_jars scripts/kafka/pom.xml "$lib"
  cat >"$dir/server.properties" <<PROPS
process.roles=broker,controller
node.id=1
controller.quorum.bootstrap.servers=127.0.0.1:$cport
listeners=PLAINTEXT://127.0.0.1:$port,CONTROLLER://127.0.0.1:$cport
advertised.listeners=PLAINTEXT://127.0.0.1:$port
controller.listener.names=CONTROLLER
inter.broker.listener.name=PLAINTEXT
listener.security.protocol.map=CONTROLLER:PLAINTEXT,PLAINTEXT:PLAINTEXT
log.dirs=$dir/data
num.partitions=1
# Topics are created on purpose (keylane's admin helper), so a typo in a
# topic name is an error, not a new empty topic.
auto.create.topics.enable=false
offsets.topic.replication.factor=1
offsets.topic.num.partitions=4
transaction.state.log.replication.factor=1
transaction.state.log.min.isr=1
share.coordinator.state.topic.replication.factor=1
share.coordinator.state.topic.min.isr=1
min.insync.replicas=1
# Tests form and re-form groups often: no initial delay, and short sessions
# allowed so that a killed member is noticed within seconds.
group.initial.rebalance.delay.ms=0
group.min.session.timeout.ms=1000
num.network.threads=2
num.io.threads=4
PROPS
  if ! java "${jopts[@]}" -cp "$lib/*" kafka.tools.StorageTool format --standalone \
      -t "$(java -cp "$lib/*" kafka.tools.StorageTool random-uuid 2>/dev/null | tail -n1)" \
      -c "$dir/server.properties" >"$dir/format.log" 2>&1; then
    say "formatting the KRaft store failed:"
    tail -n 30 "$dir/format.log" >&2
    exit 1
  fi
}

serve "$@"
