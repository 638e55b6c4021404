#!/usr/bin/env bash
# Stop the SLURM cluster started by slurm-up.sh (daemons outlive the shell that started them, so
# CI stops them explicitly): the processes named in their pid files, then each node's namespace
# (whatever still runs inside it is the node's) and the bridge.
set -uo pipefail

stop_pid() {  # stop_pid PIDFILE: TERM the process, wait up to 10 s, then KILL
  local f=$1 pid
  [ -s "$f" ] || return 0
  pid=$(cat "$f")
  if kill -0 "$pid" 2>/dev/null; then
    kill "$pid" 2>/dev/null
    for _ in $(seq 40); do kill -0 "$pid" 2>/dev/null || break; sleep 0.25; done
    kill -9 "$pid" 2>/dev/null || true
  fi
  rm -f "$f"
}

if command -v scontrol >/dev/null && scontrol ping >/dev/null 2>&1; then
  scontrol shutdown >/dev/null 2>&1 || true
  sleep 1
fi
stop_pid /run/slurmd.pid  # a single-node cluster of an older slurm-up.sh
for f in /run/slurmd-*.pid; do [ -e "$f" ] && stop_pid "$f"; done
for ns in $(ip netns list 2>/dev/null | awk '/^steplaw-/ {print $1}'); do
  bash "$(dirname "$0")/slurm-node.sh" remove "${ns#steplaw-}"
done
ip link del slbr0 2>/dev/null || true
stop_pid /run/slurmctld.pid
stop_pid /run/slurmdbd.pid
[ -x /etc/init.d/mariadb ] && /etc/init.d/mariadb stop >/dev/null 2>&1
stop_pid /run/munge/munged.pid
exit 0
