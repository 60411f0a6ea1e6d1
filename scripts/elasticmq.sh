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
root=$PWD
port=${KEYLANE_SQS_PORT:-9324}
state=$root/.state/elasticmq
lib=$state/lib
pidfile=$state/elasticmq-$port.pid
dirfile=$state/elasticmq-$port.dir
start_timeout=${KEYLANE_SQS_START_TIMEOUT:-60}

say() { echo "elasticmq.sh: $*" >&2; }

answers() { (exec 3<>"/dev/tcp/127.0.0.1/$1") 2>/dev/null; }

running_pid() {
  local pid
  pid=$(cat "$pidfile" 2>/dev/null) || return 1
  # Our server, not a recycled pid.
  [ -n "$pid" ] && tr '\0' ' ' 2>/dev/null <"/proc/$pid/cmdline" | grep -q "org.elasticmq.server.Main" || return 1
  echo "$pid"
}

log_tail() {
  local dir
  dir=$(cat "$dirfile" 2>/dev/null) || return 0
  if [ -f "$dir/server.log" ]; then
    say "last lines of $dir/server.log:"
    tail -n "${1:-60}" "$dir/server.log" >&2
  fi
}

ensure_tools() {
  local need=()
  command -v java >/dev/null || need+=(openjdk-17-jre-headless)
  command -v mvn >/dev/null || need+=(maven)
  if [ ${#need[@]} -gt 0 ]; then
    say "installing ${need[*]} with apt-get"
    apt-get update -qq >/dev/null
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${need[@]}" >/dev/null
  fi
}

fetch_jars() {
  local want
  want=$(sha256sum scripts/elasticmq/pom.xml | cut -d' ' -f1)
  if [ "$(cat "$lib/.stamp" 2>/dev/null)" = "$want" ]; then
    return
  fi
  say "fetching the ElasticMQ jars from Maven Central (once; about 10 s)"
  rm -rf "$lib"
  mkdir -p "$lib"
  if ! mvn -q -B -f scripts/elasticmq/pom.xml dependency:copy-dependencies \
      -DincludeScope=runtime -DoutputDirectory="$lib" >"$state/mvn.log" 2>&1; then
    say "mvn could not fetch the ElasticMQ jars:"
    tail -n 40 "$state/mvn.log" >&2
    exit 1
  fi
  echo "$want" >"$lib/.stamp"
}

# Starts the server on the data in $1 and waits until it serves.
launch() {
  local dir=$1
  local waited=0 seen
  seen=$(grep -c "ElasticMQ server .* started" "$dir/server.log" 2>/dev/null || true)
  seen=${seen:-0}
  setsid nohup java -Xms64m -Xmx384m -Djava.awt.headless=true \
    "-Dconfig.file=$dir/elasticmq.conf" -cp "$lib/*" org.elasticmq.server.Main \
    >>"$dir/server.log" 2>&1 </dev/null &
  local pid=$!
  echo "$pid" >"$pidfile"
  until answers "$port" && [ "$(grep -c "ElasticMQ server .* started" "$dir/server.log")" -gt "$seen" ]; do
    if ! kill -0 "$pid" 2>/dev/null || [[ "$(ps -o stat= -p "$pid" 2>/dev/null)" == Z* ]]; then
      say "the server exited during start"
      log_tail
      exit 1
    fi
    if [ "$waited" -ge $((start_timeout * 4)) ]; then
      say "the server did not answer on 127.0.0.1:$port within ${start_timeout}s"
      log_tail
      stop
      exit 1
    fi
    sleep 0.25
    waited=$((waited + 1))
  done
}

start() {
  mkdir -p "$state"
  if pid=$(running_pid) && answers "$port"; then
    say "already running (pid $pid)"
    echo "http://127.0.0.1:$port"
    return
  fi
  if answers "$port"; then
    say "port $port is taken by another process; set KEYLANE_SQS_PORT to use another"
    exit 1
  fi
  [ -n "$(running_pid || true)" ] && stop
  ensure_tools
  fetch_jars
  local dir
  dir=$(mktemp -d "${TMPDIR:-/tmp}/keylane-elasticmq-$port.XXXXXX")
  echo "$dir" >"$dirfile"
  cat >"$dir/elasticmq.conf" <<CONF
include classpath("application.conf")
node-address { protocol = http, host = "127.0.0.1", port = $port, context-path = "" }
rest-sqs { enabled = true, bind-port = $port, bind-hostname = "127.0.0.1", sqs-limits = strict }
rest-stats { enabled = false }
# Stored, so that a bounce (a server restart mid-run) loses nothing.
queues-storage { enabled = true, path = "$dir/queues.conf" }
messages-storage { enabled = true, uri = "jdbc:h2:$dir/messages" }
CONF
  launch "$dir"
  say "started (pid $(cat "$pidfile"), data in $dir)"
  echo "http://127.0.0.1:$port"
}

# Ends the server process (TERM, then KILL after 15 s); keeps its data.
kill_server() {
  local pid
  if pid=$(running_pid); then
    kill -TERM "$pid" 2>/dev/null || true
    for _ in $(seq 1 60); do
      kill -0 "$pid" 2>/dev/null || break
      sleep 0.25
    done
    if kill -0 "$pid" 2>/dev/null; then
      say "server did not stop within 15 s; killing it"
      kill -KILL "$pid" 2>/dev/null || true
    fi
    say "stopped (pid $pid)"
  fi
  rm -f "$pidfile"
}

bounce() {
  local dir
  dir=$(cat "$dirfile" 2>/dev/null) && [ -d "$dir" ] || { say "not running; nothing to bounce"; exit 1; }
  kill_server
  launch "$dir"
  say "bounced (pid $(cat "$pidfile"))"
  echo "http://127.0.0.1:$port"
}

# Ends the server without starting it again (for tests of a server that is
# down); `start` afterwards begins on fresh data, `resume` on the same.
halt() {
  kill_server
}

resume() {
  local dir
  dir=$(cat "$dirfile" 2>/dev/null) && [ -d "$dir" ] || { say "no data to resume"; exit 1; }
  if pid=$(running_pid) && answers "$port"; then
    echo "http://127.0.0.1:$port"
    return
  fi
  launch "$dir"
  say "resumed (pid $(cat "$pidfile"))"
  echo "http://127.0.0.1:$port"
}

signal_server() {
  local pid
  pid=$(running_pid) || { say "not running"; exit 1; }
  kill "-$1" "$pid"
}

stop() {
  kill_server
  local dir
  if dir=$(cat "$dirfile" 2>/dev/null) && [ -n "$dir" ] && [ -d "$dir" ]; then
    if [ -n "${KEYLANE_KEEP_SQS_LOG:-}" ]; then
      say "server log kept in $dir/server.log"
    else
      rm -rf "$dir"
    fi
  fi
  rm -f "$dirfile"
}

status() {
  if pid=$(running_pid) && answers "$port"; then
    echo "running (pid $pid) at http://127.0.0.1:$port"
  else
    echo "not running"
    return 3
  fi
}

case "${1:-}" in
  start) start ;;
  stop) stop ;;
  restart) stop; start ;;
  bounce) bounce ;;
  halt) halt ;;
  resume) resume ;;
  pause) signal_server STOP ;;
  unpause) signal_server CONT ;;
  status) status ;;
  log) log_tail "${2:-60}" ;;
  *) echo "usage: $0 start|stop|restart|bounce|halt|resume|pause|unpause|status|log [lines]" >&2; exit 2 ;;
esac
