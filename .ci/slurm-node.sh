#!/usr/bin/env bash
# One SLURM compute node of the CI cluster = one network namespace with its own address on the
# bridge `slbr0` (10.77.0.0/24, no route anywhere else) and its own hostname (UTS namespace), so
# the node's processes see only their own loopback and the bridge, like a separate machine: a
# rendezvous address that is wrong for the node (127.0.0.1, the submitting host) fails here as
# it would on a real cluster. Used by slurm-up.sh, slurm-down.sh and the node-failure test.
#
#   slurm-node.sh net                 create the bridge (idempotent)
#   slurm-node.sh start NAME ADDR     create the node's namespace (idempotent), start its slurmd
#   slurm-node.sh kill NAME           the node dies: SIGKILL every process in its namespace
#                                     (its slurmd, slurmstepds and job tasks), namespace kept
#   slurm-node.sh remove NAME         kill, then delete the namespace and its veth
set -euo pipefail
[ "$(id -u)" = 0 ] || { echo "slurm-node.sh: must run as root" >&2; exit 1; }
bridge=slbr0
bridge_addr=10.77.0.1/24

ns_of() { echo "steplaw-$1"; }

cmd=${1:?usage: slurm-node.sh net|start|kill|remove ...}
case "$cmd" in
  net)
    if ! ip link show "$bridge" >/dev/null 2>&1; then
      ip link add "$bridge" type bridge
      ip addr add "$bridge_addr" dev "$bridge"
    fi
    ip link set "$bridge" up
    ;;
  start)
    name=${2:?node name}; addr=${3:?node address}; ns=$(ns_of "$name")
    "$0" net
    if ! ip netns list | grep -qw "$ns"; then
      ip netns add "$ns"
      ip link add "v-$name" type veth peer name eth0 netns "$ns"
      ip link set "v-$name" master "$bridge" up
      ip -n "$ns" addr add "$addr/24" dev eth0
      ip -n "$ns" link set eth0 up
      ip -n "$ns" link set lo up
    fi
    # a private hostname: gloo (and anything else) resolves the node's own name to its address
    # nsenter, not `ip netns exec`: that one remounts /sys and hides the cgroup fs slurmd wants
    nsenter --net="/run/netns/$ns" unshare --uts sh -c "hostname $name && exec slurmd -N $name" \
      || { echo "slurm-node.sh: slurmd $name failed; see /var/log/slurm/slurmd-$name.log" >&2; exit 1; }
    ;;
  kill)
    name=${2:?node name}; ns=$(ns_of "$name")
    pids=$(ip netns pids "$ns" 2>/dev/null || true)
    # shellcheck disable=SC2086
    [ -z "$pids" ] || kill -9 $pids 2>/dev/null || true
    for _ in $(seq 40); do [ -z "$(ip netns pids "$ns" 2>/dev/null)" ] && break; sleep 0.25; done
    rm -f "/run/slurmd-$name.pid"
    ;;
  remove)
    name=${2:?node name}; ns=$(ns_of "$name")
    "$0" kill "$name"
    ip link del "v-$name" 2>/dev/null || true
    ip netns del "$ns" 2>/dev/null || true
    ;;
  *) echo "slurm-node.sh: unknown command $cmd" >&2; exit 2 ;;
esac
