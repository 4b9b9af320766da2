#!/usr/bin/env bash
# A live single-node Slurm for the tests (and for trying the template by hand), without systemd:
#   scripts/slurm-local.sh start DIR CTLD_PORT SLURMD_PORT   -> prints SLURM_CONF=DIR/slurm.conf when idle
#   scripts/slurm-local.sh stop DIR
# Needs root and Debian's slurmctld, slurmd, slurm-client and munge (scripts/setup.sh --slurm installs
# them). Everything Slurm writes goes under DIR; munged is started only when none answers.
set -euo pipefail
# The daemons live in /usr/sbin, which not every PATH has.
export PATH="/usr/sbin:/sbin:$PATH"
cmd=${1:?start|stop}
dir=${2:?folder}
case "$cmd" in
start)
  ctld_port=${3:?slurmctld port}
  d_port=${4:?slurmd port}
  mkdir -p "$dir/state" "$dir/spool" "$dir/log"
  host=$(hostname -s)
  cpus=$(nproc)
  cat >"$dir/slurm.conf" <<CONF
ClusterName=idavlm-test
SlurmctldHost=$host
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
# A requeued job may start again 10 s after it ended (the default credential lifetime holds it ~120 s).
AuthInfo=cred_expire=10
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
JobAcctGatherType=jobacct_gather/none
AccountingStorageType=accounting_storage/none
SelectType=select/cons_tres
SelectTypeParameters=CR_Core
MpiDefault=none
ReturnToService=2
KillWait=5
SlurmctldPort=$ctld_port
SlurmdPort=$d_port
StateSaveLocation=$dir/state
SlurmdSpoolDir=$dir/spool
SlurmctldPidFile=$dir/slurmctld.pid
SlurmdPidFile=$dir/slurmd.pid
SlurmctldLogFile=$dir/log/slurmctld.log
SlurmdLogFile=$dir/log/slurmd.log
NodeName=$host CPUs=$cpus State=UNKNOWN
PartitionName=test Nodes=$host Default=YES MaxTime=INFINITE State=UP OverSubscribe=FORCE:4
CONF
  export SLURM_CONF="$dir/slurm.conf"
  if ! munge -n >/dev/null 2>&1; then
    mkdir -p /run/munge && chown munge:munge /run/munge
    runuser -u munge -- munged -F >"$dir/log/munged.out" 2>&1 &
    echo $! >"$dir/munged.pid"
    for _ in $(seq 1 50); do munge -n >/dev/null 2>&1 && break; sleep 0.1; done
  fi
  slurmctld -D >"$dir/log/slurmctld.out" 2>&1 &
  echo $! >"$dir/slurmctld.run.pid"
  slurmd -D >"$dir/log/slurmd.out" 2>&1 &
  echo $! >"$dir/slurmd.run.pid"
  for _ in $(seq 1 100); do
    if sinfo -h -o %t 2>/dev/null | grep -q idle; then
      echo "SLURM_CONF=$dir/slurm.conf"
      exit 0
    fi
    sleep 0.2
  done
  echo "slurm-local: the node did not become idle within 20 s; logs in $dir/log:" >&2
  tail -n 20 "$dir"/log/*.log "$dir"/log/*.out >&2 || true
  exit 1
  ;;
stop)
  for p in slurmd.run slurmctld.run munged; do
    if [ -f "$dir/$p.pid" ]; then
      kill "$(cat "$dir/$p.pid")" 2>/dev/null || true
    fi
  done
  ;;
*)
  echo "usage: $0 start DIR CTLD_PORT SLURMD_PORT | stop DIR" >&2
  exit 2
  ;;
esac
