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
name=redis
port_var=KEYLANE_REDIS_PORT
port=${KEYLANE_REDIS_PORT:-6399}
proc_pattern=redis-server
logname=server.log
keep_log_var=KEYLANE_KEEP_REDIS_LOG
stop_wait=15
start_timeout=${KEYLANE_REDIS_START_TIMEOUT:-30}
# shellcheck source=scripts/lib/server.sh
. scripts/lib/server.sh

address() { echo "redis://127.0.0.1:$port/0"; }

ready() { redis-cli -p "$port" ping 2>/dev/null | grep -q PONG; }

run_server() { exec setsid nohup redis-server "$1/redis.conf"; }

prepare() {
  local dir=$1
  if ! command -v redis-server >/dev/null; then
    say "installing redis-server with apt-get"
    apt-get update -qq >/dev/null
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq redis-server >/dev/null
  fi
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
}

serve "$@"
