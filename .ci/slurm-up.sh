#!/usr/bin/env bash
# Start a real multi-node SLURM cluster (with slurmdbd accounting) on this one machine, for the
# `@pytest.mark.slurm` tests and for developers. Debian/Ubuntu, root, no systemd needed.
#
# Nodes: each slurmd runs in its own network + UTS namespace with its own address on a private
# bridge (.ci/slurm-node.sh), so a job spanning nodes really crosses "machines": slnode[1-2] have
# this machine's CPUs (the CPU tests run there); slgpu[1-2] are fake 8-GPU nodes (GRES by count,
# no device files, AutoDetect=off; SlurmdParameters=config_overrides lets them claim 64 CPUs) on
# which GPU sbatch lines are checked by the real slurmctld (sbatch --test-only); nothing runs there.
#
# Why accounting: without slurmdbd, `sacct` fails and submitit never learns a job's state.
# Why the odd slurm.conf keys: see ../shared/design.md ("a real single-node SLURM for tests").
# Idempotent: stops any daemons it (or an earlier run) started, rewrites the config, starts again.
# Partitions: `debug` (default, slnode[1-2], preemptable: requeue + the job's --signal), `urgent`
# (same nodes, higher PriorityTier: a job there preempts `debug` jobs), `short` (same nodes,
# MaxTime=2 minutes: runs chain through checkpoint + requeue) and `gpu` (slgpu[1-2], MaxTime=24 h).
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
# two nodes share this machine's memory: each gets half
mem_mb=$(( ($(awk '/MemTotal/ {print int($2/1024)}' /proc/meminfo) - 1024) / 2 ))
grace=${STEPLAW_SLURM_GRACE:-30}

mkdir -p /etc/slurm /var/spool/slurmctld /var/spool/slurmd /var/log/slurm /run/munge /var/lib/munge /var/log/munge
chown -R munge:munge /run/munge /var/lib/munge /var/log/munge 2>/dev/null || true
if [ ! -s /etc/munge/munge.key ]; then
  mkdir -p /etc/munge
  dd if=/dev/urandom of=/etc/munge/munge.key bs=1024 count=1 status=none
fi
chown munge:munge /etc/munge/munge.key && chmod 400 /etc/munge/munge.key

# the bridge first: until it exists, 10.77.0.x would be routed off the machine
"$here/slurm-node.sh" net
# node name -> address; the names resolve everywhere (the jobs' MASTER_ADDR is a node name)
nodes=(slnode1:10.77.0.11 slnode2:10.77.0.12 slgpu1:10.77.0.21 slgpu2:10.77.0.22)
hosts=$(grep -v '# steplaw-ci$' /etc/hosts || true)
{
  echo "$hosts"
  for n in "${nodes[@]}"; do echo "${n#*:} ${n%%:*} # steplaw-ci"; done
} > /etc/hosts.steplaw && cat /etc/hosts.steplaw > /etc/hosts && rm -f /etc/hosts.steplaw

# fake GPUs: slurm drops file-less GPUs, so each is a null device node (c 1 3) of its own name
fakegpu=/run/steplaw-fakegpu
mkdir -p "$fakegpu"
for i in $(seq 0 7); do [ -e "$fakegpu/gpu$i" ] || mknod -m 666 "$fakegpu/gpu$i" c 1 3; done
cat > /etc/slurm/gres.conf <<CONF
# Written by steplaw-train/.ci/slurm-up.sh: fake GPUs (null devices), nothing to detect
AutoDetect=off
NodeName=slgpu[1-2] Name=gpu File=$fakegpu/gpu[0-7]
CONF

cat > /etc/slurm/slurm.conf <<CONF
# Written by steplaw-train/.ci/slurm-up.sh
ClusterName=$cluster
SlurmctldHost=localhost(10.77.0.1)
SlurmUser=root
AuthType=auth/munge
AuthInfo=cred_expire=10
StateSaveLocation=/var/spool/slurmctld
SlurmdSpoolDir=/var/spool/slurmd/%n
SlurmctldPidFile=/run/slurmctld.pid
SlurmdPidFile=/run/slurmd-%n.pid
SlurmctldLogFile=/var/log/slurm/slurmctld.log
SlurmdLogFile=/var/log/slurm/slurmd-%n.log
SlurmdParameters=config_overrides
GresTypes=gpu
SlurmdTimeout=10
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
EnforcePartLimits=ALL
KillWait=10
AccountingStorageType=accounting_storage/slurmdbd
AccountingStorageHost=localhost
JobAcctGatherType=jobacct_gather/none
NodeName=slnode1 NodeAddr=10.77.0.11 CPUs=$ncpu RealMemory=$mem_mb State=UNKNOWN
NodeName=slnode2 NodeAddr=10.77.0.12 CPUs=$ncpu RealMemory=$mem_mb State=UNKNOWN
NodeName=slgpu1 NodeAddr=10.77.0.21 CPUs=64 RealMemory=512000 Gres=gpu:8 State=UNKNOWN
NodeName=slgpu2 NodeAddr=10.77.0.22 CPUs=64 RealMemory=512000 Gres=gpu:8 State=UNKNOWN
PartitionName=debug Nodes=slnode[1-2] Default=YES MaxTime=INFINITE State=UP PriorityTier=1 PreemptMode=REQUEUE GraceTime=$grace
PartitionName=urgent Nodes=slnode[1-2] MaxTime=INFINITE State=UP PriorityTier=10 PreemptMode=OFF
PartitionName=short Nodes=slnode[1-2] MaxTime=2 State=UP PriorityTier=1 PreemptMode=OFF
PartitionName=gpu Nodes=slgpu[1-2] MaxTime=1-00:00:00 State=UP PriorityTier=1 PreemptMode=OFF
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
names=()
for n in "${nodes[@]}"; do
  mkdir -p "/var/spool/slurmd/${n%%:*}"
  "$here/slurm-node.sh" start "${n%%:*}" "${n#*:}"
  names+=("${n%%:*}")
done
node_idle() { sinfo -h -N -n "$1" -o %T | grep -Eq '^(idle|mixed|allocated)'; }
for n in "${names[@]}"; do
  if ! wait_for 20 "node $n" node_idle "$n"; then
    scontrol update nodename="$n" state=resume || true
    wait_for 20 "node $n" node_idle "$n"
  fi
done
echo "slurm-up.sh: cluster '$cluster' up: ${names[*]} (slnode*: $ncpu CPUs, ${mem_mb} MB each;" \
  "slgpu*: fake 8 GPUs); partitions debug, urgent, short (2 min), gpu (24 h)"
