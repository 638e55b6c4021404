"""What the SLURM cluster allows one job, read at plan time: the longest time limit.

A job asking for more than its partition's MaxTime (or its QOS's MaxWall) pends forever with
reason PartitionTimeLimit, or is refused at sbatch where EnforcePartLimits is set; a request far
above the need ruins backfill. So the planner caps every request at the cluster's limit and a run
that needs longer chains through checkpoint + requeue (USR2 before the limit, see
launch/executors.py). Clusters that hide their limits get `launcher.max_walltime_min`.

Reading never fails the plan: a command that is missing or errors means "no limit known".
"""

from __future__ import annotations

import re
import subprocess
from collections.abc import Mapping
from dataclasses import replace
from typing import Any

from launch.resources import ResourceModel
from steplaw_train.spec import SpecError

UNLIMITED = {"", "UNLIMITED", "INFINITE", "NONE", "N/A"}


def parse_time_min(text: str) -> int | None:
    """A SLURM time string in minutes (rounded down); None for unlimited.

    Formats (sbatch --time): M, M:S, H:M:S, D-H, D-H:M, D-H:M:S.
    """
    t = text.strip()
    if t.upper() in UNLIMITED:
        return None
    days, _, rest = t.rpartition("-") if "-" in t else ("", "", t)
    parts = [int(p) for p in rest.split(":")]
    if days:
        h, m, s = (parts + [0, 0])[:3]
        return int(days) * 1440 + h * 60 + m + s // 60
    if len(parts) == 1:
        return parts[0]
    if len(parts) == 2:
        return parts[0] + parts[1] // 60
    h, m, s = parts
    return h * 60 + m + s // 60


def _run(cmd: list[str]) -> str | None:
    try:
        p = subprocess.run(cmd, capture_output=True, text=True, timeout=30)
    except (OSError, subprocess.SubprocessError):
        return None
    return p.stdout if p.returncode == 0 else None


def _fields(line: str) -> dict[str, str]:
    return dict(m.groups() for m in re.finditer(r"(\w+)=(\S*)", line))


def partition_info(partition: str | None) -> dict[str, str]:
    """`scontrol show partition -o` fields of the named (or the default) partition; {} if none."""
    out = _run(["scontrol", "show", "partition", "-o", *([partition] if partition else [])])
    for line in (out or "").splitlines():
        f = _fields(line)
        if partition or f.get("Default") == "YES":
            return f
    return {}


def qos_max_wall_min(qos: str) -> int | None:
    """The QOS's MaxWall in minutes, where sacctmgr shows it; None if unlimited or hidden."""
    out = _run(["sacctmgr", "-n", "-P", "show", "qos", qos, "format=Name,MaxWall"])
    for line in (out or "").splitlines():
        name, _, wall = line.partition("|")
        if name == qos:
            return parse_time_min(wall)
    return None


def max_walltime_min(lc: Mapping[str, Any], query: bool = True) -> int | None:
    """The longest time limit one job may ask for: the smallest of the partition's MaxTime,
    the QOS MaxWall (the launcher's qos, else the partition's own QOS) and
    `launcher.max_walltime_min`; None when nothing limits it."""
    limits: list[int] = []
    own = lc.get("max_walltime_min")
    if own is not None:
        if int(own) < 1:
            raise SpecError("launcher.max_walltime_min", f"must be >= 1 or null, got {own}")
        limits.append(int(own))
    if query:
        part = partition_info(lc.get("partition"))
        limit = parse_time_min(part.get("MaxTime", ""))
        if limit is not None:
            limits.append(limit)
        for qos in {lc.get("qos"), part.get("QoS")} - {None, "N/A", ""}:
            wall = qos_max_wall_min(str(qos))
            if wall is not None:
                limits.append(wall)
    return min(limits) if limits else None


def with_cluster_limits(
    rm: ResourceModel, lc: Mapping[str, Any], query: bool = True
) -> ResourceModel:
    """The resource model with its per-job time limit set to what the cluster allows (the
    smaller of an explicit resources.max_timeout_min and max_walltime_min)."""
    limits = [x for x in (rm.max_timeout_min, max_walltime_min(lc, query)) if x is not None]
    return replace(rm, max_timeout_min=min(limits) if limits else None)
