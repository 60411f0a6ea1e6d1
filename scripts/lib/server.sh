# What scripts/kafka.sh, elasticmq.sh and redis.sh share: one local server,
# started in a fresh temporary folder, found again by its pid file, stopped
# by its pid only. Sourced after the script sets:
#   name          short name (messages, folder and file names)
#   port          the port it serves on (port_var: the variable that sets it)
#   proc_pattern  what its /proc/PID/cmdline contains (not a recycled pid)
#   logname       its log file's name in the data folder
#   keep_log_var  the variable that, when set, keeps the log on stop
#   stop_wait     seconds to wait after SIGTERM before SIGKILL
#   start_timeout seconds to wait for it to serve
# and defines: address (prints the address), ready DIR (true once it
# serves; `since_launch` gives the log lines written since this launch),
# prepare DIR (installs what it needs, writes its config into a fresh data
# folder), run_server DIR (execs the server in the foreground).
root=$PWD
state=$root/.state/$name
pidfile=$state/$name-$port.pid
dirfile=$state/$name-$port.dir

say() { echo "$name.sh: $*" >&2; }

answers() { (exec 3<>"/dev/tcp/127.0.0.1/$1") 2>/dev/null; }

running_pid() {
  local pid
  pid=$(cat "$pidfile" 2>/dev/null) || return 1
  [ -n "$pid" ] && tr '\0' ' ' 2>/dev/null <"/proc/$pid/cmdline" | grep -q "$proc_pattern" || return 1
  echo "$pid"
}

log_tail() {
  local dir
  dir=$(cat "$dirfile" 2>/dev/null) || return 0
  if [ -f "$dir/$logname" ]; then
    say "last lines of $dir/$logname:"
    tail -n "${1:-60}" "$dir/$logname" >&2
  fi
}

# Installs Java and Maven with apt-get when missing (the JVM servers).
ensure_java_mvn() {
  local need=()
  command -v java >/dev/null || need+=(openjdk-17-jre-headless)
  command -v mvn >/dev/null || need+=(maven)
  if [ ${#need[@]} -gt 0 ]; then
    say "installing ${need[*]} with apt-get"
    apt-get update -qq >/dev/null
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${need[@]}" >/dev/null
  fi
}

# fetch_jars POM LIB: the runtime jars of POM from Maven Central into LIB,
# once per version of the pom.
fetch_jars() {
  local pom=$1 lib=$2 want
  want=$(sha256sum "$pom" | cut -d' ' -f1)
  if [ "$(cat "$lib/.stamp" 2>/dev/null)" = "$want" ]; then
    return
  fi
  say "fetching the $name jars from Maven Central (once)"
  rm -rf "$lib"
  mkdir -p "$lib"
  if ! mvn -q -B -f "$pom" dependency:copy-dependencies \
      -DincludeScope=runtime -DoutputDirectory="$lib" >"$state/mvn.log" 2>&1; then
    say "mvn could not fetch the jars:"
    tail -n 40 "$state/mvn.log" >&2
    exit 1
  fi
  echo "$want" >"$lib/.stamp"
}

# The server's log lines written since the last launch.
since_launch() {
  tail -n +$((launched_lines + 1)) "$1/$logname" 2>/dev/null
}

# Runs the server on the data in $1 in the background and waits until it serves.
launch() {
  local dir=$1 waited=0
  launched_lines=0
  if [ -f "$dir/$logname" ]; then launched_lines=$(wc -l <"$dir/$logname"); fi
  run_server "$dir" >>"$dir/$logname" 2>&1 </dev/null &
  local pid=$!
  echo "$pid" >"$pidfile"
  until answers "$port" && ready "$dir"; do
    # Alive, by the pid just started (its command line shows the server
    # only once setsid/nohup have exec'd it, which a check right after the
    # fork can miss).
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
  local pid
  if pid=$(running_pid) && answers "$port"; then
    say "already running (pid $pid)"
    address
    return
  fi
  if answers "$port"; then
    say "port $port is taken by another process; set $port_var to use another"
    exit 1
  fi
  if [ -n "$(running_pid || true)" ]; then stop; fi
  local dir
  dir=$(mktemp -d "${TMPDIR:-/tmp}/keylane-$name-$port.XXXXXX")
  echo "$dir" >"$dirfile"
  prepare "$dir"
  launch "$dir"
  say "started (pid $(cat "$pidfile"), data in $dir)"
  address
}

# Ends the server process (TERM, then KILL after stop_wait s); keeps its data.
kill_server() {
  local pid
  if pid=$(running_pid); then
    kill -TERM "$pid" 2>/dev/null || true
    for _ in $(seq 1 $((stop_wait * 4))); do
      kill -0 "$pid" 2>/dev/null || break
      sleep 0.25
    done
    if kill -0 "$pid" 2>/dev/null; then
      say "server did not stop within $stop_wait s; killing it"
      kill -KILL "$pid" 2>/dev/null || true
    fi
    say "stopped (pid $pid)"
  fi
  rm -f "$pidfile"
}

# Starts the server again on the data it had (after halt, or for a bounce).
resume() {
  local dir pid
  dir=$(cat "$dirfile" 2>/dev/null) && [ -d "$dir" ] || { say "no data to resume"; exit 1; }
  if pid=$(running_pid) && answers "$port"; then
    address
    return
  fi
  launch "$dir"
  say "resumed (pid $(cat "$pidfile"))"
  address
}

stop() {
  kill_server
  local dir
  if dir=$(cat "$dirfile" 2>/dev/null) && [ -n "$dir" ] && [ -d "$dir" ]; then
    if [ -n "${!keep_log_var:-}" ]; then
      say "server log kept in $dir/$logname"
    else
      rm -rf "$dir"
    fi
  fi
  rm -f "$dirfile"
}

status() {
  local pid
  if pid=$(running_pid) && answers "$port"; then
    echo "running (pid $pid) at $(address)"
  else
    echo "not running"
    return 3
  fi
}

# The commands every server script takes; $1 is the command.
serve() {
  case "${1:-}" in
    start) start ;;
    stop) stop ;;
    restart) stop; start ;;
    bounce) kill_server; resume ;;
    halt) kill_server ;;
    resume) resume ;;
    pause) pid=$(running_pid) || { say "not running"; exit 1; }; kill -STOP "$pid" ;;
    unpause) pid=$(running_pid) || { say "not running"; exit 1; }; kill -CONT "$pid" ;;
    status) status ;;
    log) log_tail "${2:-60}" ;;
    *)
      echo "usage: $0 start|stop|restart|bounce|halt|resume|pause|unpause|status|log [lines]" >&2
      exit 2
      ;;
  esac
}
