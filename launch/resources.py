"""Resources per run from its FLOPs: GPUs, nodes and walltime, bucketed into a few classes.

Compute is D x flops.run_flops_per_token(spec) (the non-embedding M plus the LM head: the same
function the trainer's MFU uses). Time = compute / (MFU * peak FLOP/s * GPUs). Walltimes are rounded up to
powers of two minutes so that a grid of thousands of runs falls into a handful of resource classes,
each of which becomes one SLURM job array (a few sbatch calls, never one per run).

Every GPU is one data-parallel rank, so a run never gets more GPUs than the largest power of two
dividing its batch size (the paper's bs = 352 = 11 x 32 caps at 32 GPUs): otherwise the ranks
could not split the global batch and the job would fail on the cluster after its queue wait.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass, fields
from typing import Any

from steplaw_train import flops as flops_mod
from steplaw_train.keys import check_keys
from steplaw_train.spec import RunSpec, SpecError, check_int, check_real

DEFAULT_PEAK_TFLOPS = flops_mod.peak_flops(flops_mod.DEFAULT_DEVICE) / 1e12


@dataclass(frozen=True)
class ResourceModel:
    """Assumptions behind the estimate; configs/sweep.yaml `resources:` sets them."""

    mfu: float = 0.35  # model FLOPs utilisation assumed for the estimate
    peak_tflops: float = DEFAULT_PEAK_TFLOPS  # per device (flops.py's table); a CPU core ~0.05
    gpus_per_node: int = 8  # 0 = CPU-only jobs (the demo shapes, the CI cluster)
    max_nodes: int = 16
    target_hours: float = 24.0  # use more GPUs (powers of two) until a run fits in this time
    safety: float = 1.5  # walltime = estimate * safety + overhead
    overhead_min: float = 10.0  # start-up, data, checkpoints
    min_timeout_min: int = 15
    cpus_per_task: int = 1  # CPU-only jobs: threads per process
    cpu_tasks: int = 1  # CPU-only jobs: data-parallel processes (gloo ranks) per run
    cpus_per_gpu: int = 8


def resource_model(cfg: Mapping[str, Any] | None) -> ResourceModel:
    d = dict(cfg or {})
    check_keys(d, {f.name for f in fields(ResourceModel)}, "resources")
    rm = ResourceModel(**d)
    check_resources(rm)
    return rm


# gpus_per_node: GPU counts per run are powers of two (max_data_parallel), so a node size that is
# not one (3, 6) would give runs a data-parallel size that does not divide their batch
GPUS_PER_NODE = (0, 1, 2, 4, 8, 16)


def check_resources(rm: ResourceModel) -> None:
    """Every field in its range, named as `resources.<field>` (a 0 peak would divide by zero)."""
    check_real("resources.mfu", rm.mfu, 0, 1, "(]")
    check_real("resources.peak_tflops", rm.peak_tflops, 0, None, "()")
    if rm.gpus_per_node not in GPUS_PER_NODE or isinstance(rm.gpus_per_node, bool):
        raise SpecError(
            "resources.gpus_per_node",
            f"must be one of {GPUS_PER_NODE} (0 = CPU-only jobs), got {rm.gpus_per_node!r}",
        )
    for name in ("max_nodes", "cpus_per_task", "cpu_tasks", "cpus_per_gpu", "min_timeout_min"):
        check_int(f"resources.{name}", getattr(rm, name), 1)
    check_real("resources.target_hours", rm.target_hours, 0, None, "()")
    check_real("resources.safety", rm.safety, 1, None, "[)")
    check_real("resources.overhead_min", rm.overhead_min, 0, None, "[)")


@dataclass(frozen=True, order=True)
class ResourceClass:
    """What one job asks SLURM for; runs with equal classes share a job array.

    cpus_per_task counts the CPUs of a whole node (divided among its tasks by slurm_parameters);
    a GPU job has one task per GPU, a CPU-only job `cpu_tasks` tasks.
    """

    nodes: int
    gpus_per_node: int
    cpus_per_task: int
    timeout_min: int
    cpu_tasks: int = 1

    @property
    def tasks_per_node(self) -> int:
        return self.gpus_per_node or self.cpu_tasks

    @property
    def data_parallel(self) -> int:
        """Ranks of one run: one per task (a GPU each, or a CPU process)."""
        return self.nodes * self.tasks_per_node

    def label(self) -> str:
        if self.gpus_per_node:
            dev = f"{self.nodes}x{self.gpus_per_node}gpu"
        else:
            tasks = f"{self.cpu_tasks}x" if self.cpu_tasks > 1 else ""
            dev = f"{tasks}{self.cpus_per_task // self.cpu_tasks}cpu"
        return f"{dev}/{self.timeout_min}min"


def flops(spec: RunSpec) -> float:
    """Training FLOPs of the whole run: D tokens x FLOPs per token (flops.py)."""
    return flops_mod.run_flops_per_token(spec) * spec.D


def device_hours(spec: RunSpec, rm: ResourceModel) -> float:
    """Estimated GPU-hours (CPU-core-hours for CPU-only jobs) of one run."""
    return flops(spec) / (rm.mfu * rm.peak_tflops * 1e12) / 3600.0


def _pow2_minutes(minutes: float, floor: int) -> int:
    return max(floor, 2 ** math.ceil(math.log2(max(minutes, 1.0))))


def max_data_parallel(batch_size: int) -> int:
    """The largest power of two dividing the batch size (GPU counts are powers of two)."""
    return batch_size & -batch_size


def resource_class(spec: RunSpec, rm: ResourceModel) -> ResourceClass:
    hours = device_hours(spec, rm)
    if rm.gpus_per_node == 0:
        cpus = rm.cpus_per_task * rm.cpu_tasks
        minutes = hours / cpus * 60 * rm.safety + rm.overhead_min
        timeout = _pow2_minutes(minutes, rm.min_timeout_min)
        return ResourceClass(1, 0, cpus, timeout, rm.cpu_tasks)
    max_gpus = min(rm.max_nodes * rm.gpus_per_node, max_data_parallel(spec.train.batch_size))
    gpus = 1
    while gpus < max_gpus and hours / gpus > rm.target_hours:
        gpus *= 2
    gpus = min(gpus, max_gpus)
    nodes = math.ceil(gpus / rm.gpus_per_node)
    per_node = min(gpus, rm.gpus_per_node)
    minutes = hours / (nodes * per_node) * 60 * rm.safety + rm.overhead_min
    return ResourceClass(
        nodes, per_node, rm.cpus_per_gpu * per_node, _pow2_minutes(minutes, rm.min_timeout_min)
    )
