#!/usr/bin/env bash
# redis-server on 127.0.0.1 for keylane's Redis Streams tests and benchmarks.
# Usage: scripts/redis.sh start|stop|status|restart|bounce|halt|resume|log
# (`bounce` restarts the running server on the same data; `halt` stops it
# keeping the data, `resume` starts it again on it).
#
# - redis-server comes from Debian (installed with apt-get when missing).
# - Persistence: append-only file, fsync every second, no RDB snapshots, in
#   a fresh temporary folder per start (`stop` deletes it). A clean stop
#   (SIGTERM) writes everything, so `bounce` loses nothing; a crash of the
#   server could lose up to its last second.
# - Port 6399 unless KEYLANE_REDIS_PORT says otherwise.
# - `start` is idempotent and prints the URL as its last line; `stop` ends
#   only the process this script started (by its pid).
set -euo pipefail
cd "$(dirname "$0")/.."
root=$PWD
port=${KEYLANE_REDIS_PORT:-6399}
state=$root/.state/redis
pidfile=$state/redis-$port.pid
dirfile=$state/redis-$port.dir
start_timeout=${KEYLANE_REDIS_START_TIMEOUT:-30}

say() { echo "redis.sh: $*" >&2; }

answers() { (exec 3<>"/dev/tcp/127.0.0.1/$1") 2>/dev/null; }

running_pid() {
  local pid
  pid=$(cat "$pidfile" 2>/dev/null) || return 1
  [ -n "$pid" ] && tr '\0' ' ' 2>/dev/null <"/proc/$pid/cmdline" | grep -q "redis-server" || return 1
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
  if ! command -v redis-server >/dev/null; then
    say "installing redis-server with apt-get"
    apt-get update -qq >/dev/null
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq redis-server >/dev/null
  fi
}

launch() {
  local dir=$1 waited=0
  # The Debian package may start its own service on 6379; ours is separate.
  redis-server "$dir/redis.conf" >>"$dir/server.log" 2>&1 </dev/null &
  local pid=$!
  echo "$pid" >"$pidfile"
  until answers "$port" && [ -n "$(redis-cli -p "$port" ping 2>/dev/null | grep PONG || true)" ]; do
    if ! kill -0 "$pid" 2>/dev/null; then
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
    echo "redis://127.0.0.1:$port/0"
    return
  fi
  if answers "$port"; then
    say "port $port is taken by another process; set KEYLANE_REDIS_PORT to use another"
    exit 1
  fi
  [ -n "$(running_pid || true)" ] && stop
  ensure_tools
  local dir
  dir=$(mktemp -d "${TMPDIR:-/tmp}/keylane-redis-$port.XXXXXX")
  echo "$dir" >"$dirfile"
  cat >"$dir/redis.conf" <<CONF
bind 127.0.0.1
port $port
protected-mode yes
daemonize no
dir $dir
logfile $dir/server.log
save ""
appendonly yes
appendfsync everysec
CONF
  launch "$dir"
  say "started (pid $(cat "$pidfile"), data in $dir)"
  echo "redis://127.0.0.1:$port/0"
}

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

resume() {
  local dir
  dir=$(cat "$dirfile" 2>/dev/null) && [ -d "$dir" ] || { say "no data to resume"; exit 1; }
  if pid=$(running_pid) && answers "$port"; then
    echo "redis://127.0.0.1:$port/0"
    return
  fi
  launch "$dir"
  say "resumed (pid $(cat "$pidfile"))"
  echo "redis://127.0.0.1:$port/0"
}

stop() {
  kill_server
  local dir
  if dir=$(cat "$dirfile" 2>/dev/null) && [ -n "$dir" ] && [ -d "$dir" ]; then
    if [ -n "${KEYLANE_KEEP_REDIS_LOG:-}" ]; then
      say "server log kept in $dir/server.log"
    else
      rm -rf "$dir"
    fi
  fi
  rm -f "$dirfile"
}

status() {
  if pid=$(running_pid) && answers "$port"; then
    echo "running (pid $pid) at redis://127.0.0.1:$port/0"
  else
    echo "not running"
    return 3
  fi
}

case "${1:-}" in
  start) start ;;
  stop) stop ;;
  restart) stop; start ;;
  bounce) kill_server; resume ;;
  halt) kill_server ;;
  resume) resume ;;
  status) status ;;
  log) log_tail "${2:-60}" ;;
  *) echo "usage: $0 start|stop|restart|bounce|halt|resume|status|log [lines]" >&2; exit 2 ;;
esac
