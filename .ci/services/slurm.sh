#!/usr/bin/env bash
# A private single-node Slurm cluster on this machine for the tests (not the system's Slurm or munge).
#
#   slurm.sh start DIR   a munge key, munged, slurmctld and slurmd with everything under DIR: slurm.conf (this host,
#                        its CPUs and memory, one default partition `debug`, free ports), state, spool, logs, and
#                        the munge socket; waits until `sbatch --wrap hostname` has run on the node, then prints
#                        the path of DIR/env (lines VAR=value: SLURM_CONF, which the Slurm commands need to find
#                        this cluster) and exits 0; exits non-zero with the reason if any part does not start
#   slurm.sh stop DIR    cancels the cluster's jobs and stops the daemons started in DIR
#
# SLURM_EXTRA_CONF (optional): lines added at the end of slurm.conf, e.g. "SchedulerParameters=batch_sched_delay=0"
# (benchmarks/slurm_overhead.py compares that with Slurm's default of scheduling batch jobs every 3 s).
#
# Needs Debian's slurm-wlm and munge packages (apt-get install slurm-wlm munge) and root (the daemons and the jobs
# run as root). No cgroups in a container: processes are tracked by /proc (proctrack/linuxproc), no task plugin,
# memory is not a consumable (CR_Core), so jobs share the node's memory. There is no slurmdbd, so `sacct` has no
# data: the runner reads jobs from `squeue --states=all` (finished jobs stay known for MinJobAge, one hour here).
set -euo pipefail
# shellcheck source=common.sh
source "$(dirname "${BASH_SOURCE[0]}")/common.sh"  # $command, $dir, stop_pidfile

die() {
  echo "slurm.sh: $*" >&2
  exit 1
}

case "$command" in
  start)
    for tool in munged slurmctld slurmd sbatch squeue scontrol; do
      command -v "$tool" >/dev/null 2>&1 || die "$tool is not installed (apt-get install slurm-wlm munge)"
    done
    [[ "$(id -u)" = 0 ]] || die "the test cluster runs its daemons as root; run this as root"
    mkdir -p "$dir"
    dir=$(cd "$dir" && pwd)
    chmod 700 "$dir"  # munged refuses a socket or key in a folder others may write to
    mkdir -p "$dir/state" "$dir/spool" "$dir/munge" "$dir/log"
    chmod 700 "$dir/munge"

    # munge: a key of our own (never the system's /etc/munge/munge.key) and a daemon on a socket under DIR
    if [[ ! -f "$dir/munge/munge.key" ]]; then
      dd if=/dev/urandom of="$dir/munge/munge.key" bs=1 count=1024 status=none
      chmod 400 "$dir/munge/munge.key"
    fi
    socket="$dir/munge/munge.socket"
    munged --force --key-file="$dir/munge/munge.key" --socket="$socket" --pid-file="$dir/munge/munged.pid" \
      --log-file="$dir/log/munged.log" --seed-file="$dir/munge/munged.seed" >"$dir/log/munged.out" 2>&1 \
      || { tail -n 5 "$dir/log/munged.log" "$dir/log/munged.out" >&2 2>/dev/null || true; die "munged did not start"; }
    if command -v munge >/dev/null 2>&1; then
      munge --socket="$socket" -n </dev/null | unmunge --socket="$socket" >/dev/null 2>&1 \
        || die "munged answers no credential request on $socket"
    fi

    host=$(hostname -s)
    cpus=$(nproc)
    memory=$(slurmd -C 2>/dev/null | sed -n 's/.*RealMemory=\([0-9]*\).*/\1/p' | head -n 1)
    [[ -n "$memory" ]] || memory=$(awk '/MemTotal/ {print int($2 / 1024)}' /proc/meminfo)
    read -r ctld_port slurmd_port < <(python3 -c '
import socket
socks = [socket.socket() for _ in range(2)]
for s in socks:
    s.bind(("127.0.0.1", 0))
print(*[s.getsockname()[1] for s in socks])')
    cat >"$dir/slurm.conf" <<CONF
# Written by .ci/services/slurm.sh: a test cluster of one node ($host), everything under $dir.
ClusterName=al3dtest
SlurmctldHost=$host(127.0.0.1)
SlurmctldPort=$ctld_port
SlurmdPort=$slurmd_port
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
CredType=cred/munge
AuthInfo=socket=$socket
StateSaveLocation=$dir/state
SlurmdSpoolDir=$dir/spool/slurmd-%n
SlurmctldPidFile=$dir/slurmctld.pid
SlurmdPidFile=$dir/slurmd.pid
SlurmctldLogFile=$dir/log/slurmctld.log
SlurmdLogFile=$dir/log/slurmd.log
SlurmctldDebug=info
SlurmdDebug=info
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
SelectType=select/cons_tres
SelectTypeParameters=CR_Core
SchedulerType=sched/backfill
JobAcctGatherType=jobacct_gather/none
AccountingStorageType=accounting_storage/none
JobCompType=jobcomp/filetxt
JobCompLoc=$dir/log/jobcomp.txt
MpiDefault=none
ReturnToService=2
# finished jobs stay known to squeue/scontrol for an hour (no slurmdbd, so no sacct)
MinJobAge=3600
# a job over its time limit gets SIGTERM, then SIGKILL after KillWait seconds
KillWait=5
InactiveLimit=0
Waittime=0
SlurmctldTimeout=30
SlurmdTimeout=60
NodeName=$host NodeAddr=127.0.0.1 CPUs=$cpus RealMemory=$memory State=UNKNOWN
PartitionName=debug Nodes=$host Default=YES MaxTime=INFINITE State=UP
CONF
    if [[ -n "${SLURM_EXTRA_CONF:-}" ]]; then
      printf '%s\n' "$SLURM_EXTRA_CONF" >>"$dir/slurm.conf"
    fi
    printf 'SLURM_CONF=%s\n' "$dir/slurm.conf" >"$dir/env"
    export SLURM_CONF="$dir/slurm.conf"

    slurmctld -f "$dir/slurm.conf" -i >"$dir/log/slurmctld.out" 2>&1 \
      || { tail -n 20 "$dir/log/slurmctld.log" >&2 2>/dev/null || true; die "slurmctld did not start"; }
    slurmd -f "$dir/slurm.conf" -N "$host" >"$dir/log/slurmd.out" 2>&1 \
      || { tail -n 20 "$dir/log/slurmd.log" >&2 2>/dev/null || true; die "slurmd did not start"; }

    # wait for the node to register idle, then run one job through it
    ready=""
    for _ in $(seq 1 150); do
      state=$(sinfo --noheader --nodes="$host" --format=%T 2>/dev/null || true)
      if [[ "$state" == idle* ]]; then ready=1; break; fi
      sleep 0.2
    done
    if [[ -z "$ready" ]]; then
      tail -n 20 "$dir/log/slurmctld.log" "$dir/log/slurmd.log" >&2 2>/dev/null || true
      bash "$0" stop "$dir" || true
      die "node $host did not become idle within 30 s (state: ${state:-unknown})"
    fi
    out="$dir/log/check-%j.out"
    job=$(sbatch --parsable --wait --time=1 --output="$out" --wrap hostname 2>"$dir/log/check.err") \
      || { cat "$dir/log/check.err" >&2; bash "$0" stop "$dir" || true; die "the check job (sbatch --wrap hostname) failed"; }
    job=${job%%;*}
    grep -qx "$host" "$dir/log/check-$job.out" 2>/dev/null \
      || { bash "$0" stop "$dir" || true; die "the check job $job did not print this host's name"; }
    echo "$dir/env"
    ;;
  stop)
    [[ -d "$dir" ]] || exit 0
    dir=$(cd "$dir" && pwd)
    if [[ -f "$dir/slurm.conf" && -f "$dir/slurmctld.pid" ]]; then
      SLURM_CONF="$dir/slurm.conf" scancel --full --quiet --user="$(id -un)" 2>/dev/null || true
    fi
    stop_pidfile "$dir/slurmd.pid"
    stop_pidfile "$dir/slurmctld.pid"
    stop_pidfile "$dir/munge/munged.pid"
    ;;
  *)
    echo "usage: $0 start|stop DIR" >&2
    exit 2
    ;;
esac
