#!/usr/bin/env bash
# A one-node Slurm cluster on this machine, for the Slurm tests (tests/test_slurm.py) in CI.
#
#   sudo bash scripts/ci/start_slurm.sh          # install (Debian/Ubuntu packages), configure, start
#   sudo bash scripts/ci/start_slurm.sh stop     # stop the daemons this script started
#
# It installs slurmctld, slurmd, the client tools and munge with apt-get when they are missing, writes
# /etc/slurm/slurm.conf for one node (this machine, all its CPUs, partition "ci") and starts munged,
# slurmctld and slurmd without systemd (containers): process tracking by /proc (proctrack/linuxproc), no
# task plugin, no cgroups, no accounting. JobRequeue=1 so that jobs can requeue themselves (run.sub does on
# preemption). Running it again while the cluster is up changes nothing. Root is needed (apt, daemons).
set -euo pipefail

CONF_DIR=/etc/slurm
STATE_DIR=/var/spool/slurmctld
SPOOL_DIR=/var/spool/slurmd
LOG_DIR=/var/log/slurm
RUN_DIR=/run/slurm

stop_pidfiles() {
    local pidfile
    for pidfile in "$@"; do
        if [[ -f $pidfile ]] && kill -0 "$(cat "$pidfile")" 2>/dev/null; then
            kill "$(cat "$pidfile")" || true
        fi
    done
}

if [[ ${1:-} == stop ]]; then
    stop_pidfiles "$RUN_DIR/slurmd.pid" "$RUN_DIR/slurmctld.pid" /run/munge/munged.pid
    echo "slurm: stopped"
    exit 0
fi

if [[ $(id -u) -ne 0 ]]; then
    echo "error: start_slurm.sh needs root (apt-get, daemons); run it with sudo" >&2
    exit 1
fi

cluster_up() {
    timeout 5 sinfo --noheader -o '%T' 2>/dev/null | grep -Eq '^(idle|mixed|allocated|completing)'
}

if command -v sinfo >/dev/null && cluster_up; then
    echo "slurm: already running"
    exit 0
fi

if ! command -v slurmctld >/dev/null || ! command -v slurmd >/dev/null || ! command -v sbatch >/dev/null \
        || ! command -v munged >/dev/null; then
    echo "slurm: installing slurmctld, slurmd, slurm-client, munge"
    export DEBIAN_FRONTEND=noninteractive
    apt-get update -qq
    apt-get install -y -q --no-install-recommends slurmctld slurmd slurm-client munge >/dev/null
fi

# munge: a key (the package makes one; make one if it did not) and the daemon, as the munge user.
mkdir -p /etc/munge /run/munge /var/lib/munge /var/log/munge
if [[ ! -s /etc/munge/munge.key ]]; then
    dd if=/dev/urandom of=/etc/munge/munge.key bs=1024 count=1 status=none
fi
chown -R munge:munge /etc/munge /run/munge /var/lib/munge /var/log/munge
chmod 0700 /etc/munge
chmod 0400 /etc/munge/munge.key
chmod 0755 /run/munge
if ! munge -n </dev/null >/dev/null 2>&1; then
    runuser -u munge -- /usr/sbin/munged
fi
for _ in $(seq 50); do munge -n </dev/null >/dev/null 2>&1 && break; sleep 0.2; done
munge -n </dev/null | unmunge >/dev/null || { echo "error: munged did not start" >&2; exit 1; }

# slurm.conf: this machine as the only node, with the CPUs and memory slurmd detects.
HOST=$(hostname -s)
NODE_LINE=$(slurmd -C | head -n 1)                  # NodeName=<host> CPUs=.. Boards=.. ... RealMemory=..
mkdir -p "$CONF_DIR" "$STATE_DIR" "$SPOOL_DIR" "$LOG_DIR" "$RUN_DIR"
cat > "$CONF_DIR/slurm.conf" <<EOF
# Written by scripts/ci/start_slurm.sh: a one-node test cluster.
ClusterName=txlci
SlurmctldHost=$HOST(127.0.0.1)
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
AuthInfo=cred_expire=10
MpiDefault=none
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
JobAcctGatherType=jobacct_gather/none
AccountingStorageType=accounting_storage/none
SchedulerType=sched/backfill
SelectType=select/cons_tres
SelectTypeParameters=CR_Core
JobRequeue=1
ReturnToService=2
SlurmctldPidFile=$RUN_DIR/slurmctld.pid
SlurmdPidFile=$RUN_DIR/slurmd.pid
SlurmctldLogFile=$LOG_DIR/slurmctld.log
SlurmdLogFile=$LOG_DIR/slurmd.log
StateSaveLocation=$STATE_DIR
SlurmdSpoolDir=$SPOOL_DIR
SlurmctldPort=6817
SlurmdPort=6818
KillWait=30
# requeued jobs wait cred_expire + 1 s before they may start again (120 s by default; 10 s here)
MinJobAge=300
SchedulerParameters=sched_interval=2
$NODE_LINE NodeAddr=127.0.0.1 State=UNKNOWN
PartitionName=ci Nodes=$HOST Default=YES MaxTime=INFINITE State=UP OverSubscribe=NO
EOF

stop_pidfiles "$RUN_DIR/slurmd.pid" "$RUN_DIR/slurmctld.pid"
sleep 1
slurmctld -c          # -c: clear any old state (jobs of an earlier run)
slurmd
for _ in $(seq 30); do
    cluster_up && break
    scontrol update nodename="$HOST" state=resume >/dev/null 2>&1 || true
    sleep 1
done
if ! cluster_up; then
    echo "error: the Slurm node did not come up; see $LOG_DIR/slurmctld.log and $LOG_DIR/slurmd.log" >&2
    sinfo -N -l >&2 || true
    exit 1
fi
sinfo
echo "slurm: one-node cluster up (partition ci, node $HOST)"
