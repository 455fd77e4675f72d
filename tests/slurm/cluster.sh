#!/usr/bin/env bash
# A real one-node SLURM cluster on localhost for the integration tests.
#
#   tests/slurm/cluster.sh install        # Debian slurm-wlm + munge (root; ~1 min)
#   tests/slurm/cluster.sh start DIR      # munged, slurmctld, slurmd with DIR/slurm.conf; prints SLURM_CONF=...
#   tests/slurm/cluster.sh stop DIR       # stop the daemons started from DIR
#
# The node is this machine with its CPUs; proctrack/linuxproc and task/none need no
# cgroups, so it runs inside a container. State, logs and pid files live under DIR.
set -euo pipefail
cmd=${1:?usage: cluster.sh install|start DIR|stop DIR}

case "$cmd" in
install)
  if command -v slurmctld >/dev/null && command -v munged >/dev/null; then exit 0; fi
  export DEBIAN_FRONTEND=noninteractive
  apt-get update -qq
  apt-get install -y -qq slurm-wlm munge >/dev/null
  ;;
start)
  dir=$(realpath -m "${2:?start needs a state folder}")
  mkdir -p "$dir"/{spool,state,log,munge}
  host=$(hostname -s)
  cpus=$(nproc)
  mem=$(( $(awk '/MemTotal/ {print $2}' /proc/meminfo) / 1024 - 1024 ))
  cat > "$dir/slurm.conf" <<CONF
ClusterName=slmtest
SlurmctldHost=$host
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
CredType=cred/munge
# A requeued job waits cred_expire + 1 s before it may start again (default 120 s).
AuthInfo=cred_expire=10
MpiDefault=none
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
JobAcctGatherType=jobacct_gather/none
AccountingStorageType=accounting_storage/none
SelectType=select/cons_tres
SelectTypeParameters=CR_CPU
ReturnToService=2
SlurmctldPort=$(( 16817 + RANDOM % 1000 ))
SlurmdPort=$(( 17818 + RANDOM % 1000 ))
SlurmctldPidFile=$dir/slurmctld.pid
SlurmdPidFile=$dir/slurmd.pid
SlurmdSpoolDir=$dir/spool
StateSaveLocation=$dir/state
SlurmctldLogFile=$dir/log/slurmctld.log
SlurmdLogFile=$dir/log/slurmd.log
KillWait=30
MinJobAge=600
SchedulerParameters=defer
NodeName=$host CPUs=$cpus RealMemory=$mem State=UNKNOWN
PartitionName=debug Nodes=$host Default=YES MaxTime=INFINITE State=UP
CONF
  # munge: a key of our own, its socket under DIR, so nothing system-wide is touched.
  if [ ! -f "$dir/munge/munge.key" ]; then
    dd if=/dev/urandom of="$dir/munge/munge.key" bs=1024 count=1 status=none
    chmod 400 "$dir/munge/munge.key"
  fi
  sock=/run/munge/munge.socket.2   # where the slurm plugins look for it
  mkdir -p /run/munge
  if ! pgrep -x munged >/dev/null; then
    munged --force --key-file="$dir/munge/munge.key" --socket="$sock" \
      --pid-file="$dir/munge/munged.pid" --log-file="$dir/log/munged.log" --seed-file="$dir/munge/seed"
  fi
  export SLURM_CONF="$dir/slurm.conf"
  slurmctld -f "$SLURM_CONF"
  slurmd -f "$SLURM_CONF"
  for _ in $(seq 60); do
    if sinfo -h -o %t 2>/dev/null | grep -qE '^(idle|mix|alloc)'; then
      echo "SLURM_CONF=$SLURM_CONF"
      exit 0
    fi
    sleep 1
  done
  echo "slurm did not come up; see $dir/log" >&2
  exit 1
  ;;
stop)
  dir=$(realpath -m "${2:?stop needs a state folder}")
  for f in slurmd slurmctld munge/munged; do
    [ -f "$dir/$f.pid" ] && kill "$(cat "$dir/$f.pid")" 2>/dev/null || true
  done
  sleep 1
  ;;
*)
  echo "unknown command $cmd" >&2
  exit 2
  ;;
esac
