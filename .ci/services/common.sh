# Sourced by the service scripts (orthanc.sh, slurm.sh): their "start|stop DIR" arguments and stopping a daemon.
# Sets $command and $dir from the script's arguments, or prints the usage and exits 2.
command=${1:-}
dir=${2:-}
if [[ -z "$command" || -z "$dir" ]]; then
  echo "usage: $0 start|stop DIR" >&2
  exit 2
fi

stop_pidfile() {  # stop the process whose pid file is $1 (TERM, then KILL after 5 s) and remove the file
  local pid
  [[ -f "$1" ]] || return 0
  pid=$(cat "$1")
  if [[ -n "$pid" ]] && kill "$pid" 2>/dev/null; then
    for _ in $(seq 1 50); do kill -0 "$pid" 2>/dev/null || break; sleep 0.1; done
    kill -9 "$pid" 2>/dev/null || true
  fi
  rm -f "$1"
}
