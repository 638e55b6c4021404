#!/usr/bin/env bash
# Start a real single-node SLURM cluster (with slurmdbd accounting) on localhost, for the
# `@pytest.mark.slurm` tests and for developers. Debian/Ubuntu, root, no systemd needed.
#
# Why accounting: without slurmdbd, `sacct` fails and submitit never learns a job's state.
# Why the odd slurm.conf keys: see ../shared/design.md ("a real single-node SLURM for tests").
# Idempotent: stops any daemons it (or an earlier run) started, rewrites the config, starts again.
# Partitions: `debug` (default, preemptable: requeue + the job's --signal) and `urgent`
# (higher PriorityTier: a job there preempts `debug` jobs).
set -euo pipefail
here="$(cd "$(dirname "$0")" && pwd)"
[ "$(id -u)" = 0 ] || { echo "slurm-up.sh: must run as root" >&2; exit 1; }

"$here/slurm-down.sh" >/dev/null 2>&1 || true

pkgs=(slurmctld slurmd slurm-client munge slurmdbd mariadb-server)
missing=()
for p in "${pkgs[@]}"; do dpkg -s "$p" >/dev/null 2>&1 || missing+=("$p"); done
if [ ${#missing[@]} -gt 0 ]; then
  export DEBIAN_FRONTEND=noninteractive
  apt-get update -qq
  apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
fi

cluster=steplaw
ncpu=$(nproc)
mem_mb=$(( $(awk '/MemTotal/ {print int($2/1024)}' /proc/meminfo) - 1024 ))
grace=${STEPLAW_SLURM_GRACE:-30}

mkdir -p /etc/slurm /var/spool/slurmctld /var/spool/slurmd /var/log/slurm /run/munge /var/lib/munge /var/log/munge
chown -R munge:munge /run/munge /var/lib/munge /var/log/munge 2>/dev/null || true
if [ ! -s /etc/munge/munge.key ]; then
  mkdir -p /etc/munge
  dd if=/dev/urandom of=/etc/munge/munge.key bs=1024 count=1 status=none
fi
chown munge:munge /etc/munge/munge.key && chmod 400 /etc/munge/munge.key

cat > /etc/slurm/slurm.conf <<CONF
# Written by steplaw-train/.ci/slurm-up.sh
ClusterName=$cluster
SlurmctldHost=localhost
SlurmUser=root
AuthType=auth/munge
AuthInfo=cred_expire=10
StateSaveLocation=/var/spool/slurmctld
SlurmdSpoolDir=/var/spool/slurmd
SlurmctldPidFile=/run/slurmctld.pid
SlurmdPidFile=/run/slurmd.pid
SlurmctldLogFile=/var/log/slurm/slurmctld.log
SlurmdLogFile=/var/log/slurm/slurmd.log
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
SelectType=select/cons_tres
SelectTypeParameters=CR_Core_Memory
DefMemPerCPU=1024
ReturnToService=2
MaxArraySize=1001
MinJobAge=600
SchedulerParameters=bf_interval=2,sched_interval=2
PreemptType=preempt/partition_prio
PreemptMode=REQUEUE
SlurmctldParameters=preempt_send_user_signal
JobRequeue=1
KillWait=10
AccountingStorageType=accounting_storage/slurmdbd
AccountingStorageHost=localhost
JobAcctGatherType=jobacct_gather/none
NodeName=localhost NodeAddr=127.0.0.1 CPUs=$ncpu RealMemory=$mem_mb State=UNKNOWN
PartitionName=debug Nodes=localhost Default=YES MaxTime=INFINITE State=UP PriorityTier=1 PreemptMode=REQUEUE GraceTime=$grace
PartitionName=urgent Nodes=localhost MaxTime=INFINITE State=UP PriorityTier=10 PreemptMode=OFF
CONF

cat > /etc/slurm/slurmdbd.conf <<CONF
# Written by steplaw-train/.ci/slurm-up.sh
AuthType=auth/munge
DbdHost=localhost
SlurmUser=root
PidFile=/run/slurmdbd.pid
LogFile=/var/log/slurm/slurmdbd.log
StorageType=accounting_storage/mysql
StorageHost=localhost
StorageUser=slurm
StoragePass=slurm
StorageLoc=slurm_acct_db
CONF
chmod 600 /etc/slurm/slurmdbd.conf

wait_for() {  # wait_for SECONDS DESCRIPTION CMD...: poll until CMD succeeds
  local t=$1 what=$2; shift 2
  for _ in $(seq $((t * 4))); do "$@" >/dev/null 2>&1 && return 0; sleep 0.25; done
  echo "slurm-up.sh: timed out waiting for $what" >&2; return 1
}

runuser -u munge -- /usr/sbin/munged
wait_for 10 munged munge -n

/etc/init.d/mariadb start >/dev/null
wait_for 30 mariadb mysql -e "SELECT 1"
mysql -e "CREATE USER IF NOT EXISTS 'slurm'@'localhost' IDENTIFIED BY 'slurm';
          GRANT ALL ON slurm_acct_db.* TO 'slurm'@'localhost'; FLUSH PRIVILEGES;"

slurmdbd
wait_for 30 slurmdbd sacctmgr -n list cluster
sacctmgr -i -n list cluster format=cluster | grep -qw "$cluster" || sacctmgr -i add cluster "$cluster" >/dev/null

slurmctld
wait_for 30 slurmctld scontrol ping
slurmd -N localhost
node_idle() { sinfo -h -n localhost -o %T | grep -Eq '^(idle|mixed|allocated)'; }
if ! wait_for 20 "node localhost" node_idle; then
  scontrol update nodename=localhost state=resume || true
  wait_for 20 "node localhost" node_idle
fi
echo "slurm-up.sh: cluster '$cluster' up ($ncpu CPUs, ${mem_mb} MB; partitions debug, urgent)"
