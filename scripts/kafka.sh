#!/usr/bin/env bash
# A single-node Apache Kafka broker (KRaft) on 127.0.0.1 for keylane's tests
# and benchmarks. Usage: scripts/kafka.sh start|stop|status|restart|bounce|log
# (`bounce` restarts the running broker on the same data).
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
root=$PWD
port=${KEYLANE_KAFKA_PORT:-9092}
cport=$((port + 1))
state=$root/.state/kafka
lib=$state/lib
pidfile=$state/kafka-$port.pid
dirfile=$state/kafka-$port.dir
start_timeout=${KEYLANE_KAFKA_START_TIMEOUT:-90}

say() { echo "kafka.sh: $*" >&2; }

answers() { (exec 3<>"/dev/tcp/127.0.0.1/$1") 2>/dev/null; }

running_pid() {
  local pid
  pid=$(cat "$pidfile" 2>/dev/null) || return 1
  # Our broker, not a recycled pid.
  [ -n "$pid" ] && tr '\0' ' ' 2>/dev/null <"/proc/$pid/cmdline" | grep -q "kafka.Kafka" || return 1
  echo "$pid"
}

log_tail() {
  local dir
  dir=$(cat "$dirfile" 2>/dev/null) || return 0
  if [ -f "$dir/broker.log" ]; then
    say "last lines of $dir/broker.log:"
    tail -n "${1:-60}" "$dir/broker.log" >&2
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
  local v
  v=$(java -version 2>&1 | sed -n 's/.*version "\([0-9]*\).*/\1/p' | head -n1)
  if [ -z "$v" ] || [ "$v" -lt 17 ]; then
    say "Kafka 4 needs Java 17 or later; found: $(java -version 2>&1 | head -n1)"
    exit 1
  fi
}

fetch_jars() {
  local want
  want=$(sha256sum scripts/kafka/pom.xml | cut -d' ' -f1)
  if [ "$(cat "$lib/.stamp" 2>/dev/null)" = "$want" ]; then
    return
  fi
  say "fetching the Kafka broker jars from Maven Central (once; about 20 s)"
  rm -rf "$lib"
  mkdir -p "$lib"
  if ! mvn -q -B -f scripts/kafka/pom.xml dependency:copy-dependencies \
      -DincludeScope=runtime -DoutputDirectory="$lib" >"$state/mvn.log" 2>&1; then
    say "mvn could not fetch the broker jars:"
    tail -n 40 "$state/mvn.log" >&2
    exit 1
  fi
  echo "$want" >"$lib/.stamp"
}

cp="$lib/*"
jopts=(-Xms256m -Xmx768m -XX:+UseG1GC -Djava.awt.headless=true
  "-Dlog4j2.configurationFile=$root/scripts/kafka/log4j2.properties")

# Starts the broker on the store in $1 and waits until it serves.
launch() {
  local dir=$1
  local waited=0 seen
  seen=$(grep -c "Kafka Server started" "$dir/broker.log" 2>/dev/null || true)
  seen=${seen:-0}
  setsid nohup java "${jopts[@]}" -cp "$cp" kafka.Kafka "$dir/server.properties" \
    >>"$dir/broker.log" 2>&1 </dev/null &
  local pid=$!
  echo "$pid" >"$pidfile"
  until answers "$port" && [ "$(grep -c "Kafka Server started" "$dir/broker.log")" -gt "$seen" ]; do
    # Alive, by the pid just started: its command line reads "kafka.Kafka"
    # only once setsid/nohup have exec'd java, which a check right after the
    # fork can miss.
    if ! kill -0 "$pid" 2>/dev/null || [[ "$(ps -o stat= -p "$pid" 2>/dev/null)" == Z* ]]; then
      say "the broker exited during start"
      log_tail
      exit 1
    fi
    if [ "$waited" -ge $((start_timeout * 4)) ]; then
      say "the broker did not answer on 127.0.0.1:$port within ${start_timeout}s"
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
    echo "127.0.0.1:$port"
    return
  fi
  if answers "$port"; then
    say "port $port is taken by another process; set KEYLANE_KAFKA_PORT to use another"
    exit 1
  fi
  [ -n "$(running_pid || true)" ] && stop
  ensure_tools
  fetch_jars
  local dir
  dir=$(mktemp -d "${TMPDIR:-/tmp}/keylane-kafka-$port.XXXXXX")
  echo "$dir" >"$dirfile"
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
  if ! java "${jopts[@]}" -cp "$cp" kafka.tools.StorageTool format --standalone \
      -t "$(java -cp "$cp" kafka.tools.StorageTool random-uuid 2>/dev/null | tail -n1)" \
      -c "$dir/server.properties" >"$dir/format.log" 2>&1; then
    say "formatting the KRaft store failed:"
    tail -n 30 "$dir/format.log" >&2
    exit 1
  fi
  launch "$dir"
  say "started (pid $(cat "$pidfile"), data in $dir)"
  echo "127.0.0.1:$port"
}

# Ends the broker process (TERM, then KILL after 30 s); keeps its data.
kill_broker() {
  local pid
  if pid=$(running_pid); then
    kill -TERM "$pid" 2>/dev/null || true
    for _ in $(seq 1 120); do
      kill -0 "$pid" 2>/dev/null || break
      sleep 0.25
    done
    if kill -0 "$pid" 2>/dev/null; then
      say "broker did not stop within 30 s; killing it"
      kill -KILL "$pid" 2>/dev/null || true
    fi
    say "stopped (pid $pid)"
  fi
  rm -f "$pidfile"
}

# Restarts the running broker on the same data (for broker-restart tests).
bounce() {
  local dir
  dir=$(cat "$dirfile" 2>/dev/null) && [ -d "$dir" ] || { say "not running; nothing to bounce"; exit 1; }
  kill_broker
  launch "$dir"
  say "bounced (pid $(cat "$pidfile"))"
  echo "127.0.0.1:$port"
}

stop() {
  kill_broker
  local dir
  if dir=$(cat "$dirfile" 2>/dev/null) && [ -n "$dir" ] && [ -d "$dir" ]; then
    if [ -n "${KEYLANE_KEEP_KAFKA_LOG:-}" ]; then
      say "broker log kept in $dir/broker.log"
    else
      rm -rf "$dir"
    fi
  fi
  rm -f "$dirfile"
}

status() {
  if pid=$(running_pid) && answers "$port"; then
    echo "running (pid $pid) at 127.0.0.1:$port"
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
  status) status ;;
  log) log_tail "${2:-60}" ;;
  *) echo "usage: $0 start|stop|restart|bounce|status|log [lines]" >&2; exit 2 ;;
esac
