"""Resources per run from its FLOPs: GPUs, nodes and walltime, bucketed into a few classes.

Compute is D x flops.run_flops_per_token(spec) (the non-embedding M plus the LM head: the same
function the trainer's MFU uses). Time = compute / (MFU * peak FLOP/s * GPUs). Walltimes are
rounded up to the series 1, 1.5, 2, 3, 4, 6, 8, 12, ... minutes (at most 1.5x the need, where
powers of two asked up to 2x: a 13-hour run no longer asks for 34 hours) so that a grid of
thousands of runs still falls into a handful of resource classes, each of which becomes one SLURM
job array (a few sbatch calls, never one per run).

No request exceeds the cluster's limit (`max_timeout_min`, read from the partition's MaxTime / QOS
MaxWall by launch/slurm_info.py at plan time, or `launcher.max_walltime_min`): a run that needs
longer asks for the limit and chains `segments` jobs through checkpoint + requeue (the USR2
warning before the limit), which is also how preemption is survived.

Every GPU is one data-parallel rank, and the GPU count keeps every GPU busy: a power of two d
such that each GPU gets a whole number of micro-batches of `seqs_per_gpu` sequences per step
(bs / d a multiple of seqs_per_gpu, so the trainer's automatic micro-batch is seqs_per_gpu). Fewer
sequences per GPU make a step communication-bound: the gradient all-reduce moves the same bytes
whatever the batch, while the compute shrinks with it (a 1B model's bf16 gradients, ~2 GB, take
longer to all-reduce than one 2,048-token sequence's forward+backward). And a batch that splits
into odd pieces (bs 352 = 11 x 32 over 32 GPUs: 11 sequences each) ends in micro-batches of 1.
Where seqs_per_gpu does not divide the batch, the old rule remains: the largest power of two
dividing the batch with at least seqs_per_gpu sequences per GPU (or 1 GPU). See docs/design.md.
"""

from __future__ import annotations

import functools
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
    # sd of log MFU around `mfu` before finished runs measure it (launch/usage.py calibrates)
    mfu_prior_sd: float = 0.3
    peak_tflops: float = DEFAULT_PEAK_TFLOPS  # per device (flops.py's table); a CPU core ~0.05
    gpus_per_node: int = 8  # 0 = CPU-only jobs (the demo shapes, the CI cluster)
    max_nodes: int = 16
    target_hours: float = 24.0  # use more GPUs (powers of two) until a run fits in this time
    safety: float = 1.5  # walltime = estimate * safety + overhead
    overhead_min: float = 10.0  # start-up, data, checkpoints
    min_timeout_min: int = 15
    cpus_per_task: int = 1  # CPU-only jobs: threads per process
    cpu_tasks: int = 1  # CPU-only jobs: data-parallel processes (gloo ranks) per node
    cpu_nodes: int = 1  # CPU-only jobs: nodes per run (the multi-node path without GPUs)
    cpus_per_gpu: int = 8
    max_timeout_min: int | None = None  # the cluster's limit per job; set at plan time
    seqs_per_gpu: int = 8  # sequences per GPU per step: whole micro-batches of this size


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
    check_real("resources.mfu_prior_sd", rm.mfu_prior_sd, 0, None, "()")
    check_real("resources.peak_tflops", rm.peak_tflops, 0, None, "()")
    if rm.gpus_per_node not in GPUS_PER_NODE or isinstance(rm.gpus_per_node, bool):
        raise SpecError(
            "resources.gpus_per_node",
            f"must be one of {GPUS_PER_NODE} (0 = CPU-only jobs), got {rm.gpus_per_node!r}",
        )
    for name in (
        "max_nodes",
        "cpus_per_task",
        "cpu_tasks",
        "cpu_nodes",
        "cpus_per_gpu",
        "seqs_per_gpu",
        "min_timeout_min",
    ):
        check_int(f"resources.{name}", getattr(rm, name), 1)
    if rm.max_timeout_min is not None:
        check_int("resources.max_timeout_min", rm.max_timeout_min, 1)
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
    segments: int = 1  # jobs the run needs at this time limit (chained through requeue)

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
            nodes = f"{self.nodes}n" if self.nodes > 1 else ""
            tasks = f"{self.cpu_tasks}x" if self.cpu_tasks > 1 else ""
            dev = f"{nodes}{tasks}{self.cpus_per_task // self.cpu_tasks}cpu"
        chain = f"x{self.segments}" if self.segments > 1 else ""
        return f"{dev}/{self.timeout_min}min{chain}"


def flops(spec: RunSpec) -> float:
    """Training FLOPs of the whole run: D tokens x FLOPs per token (flops.py)."""
    return flops_mod.run_flops_per_token(spec) * spec.D


def device_hours(spec: RunSpec, rm: ResourceModel) -> float:
    """Estimated GPU-hours (CPU-core-hours for CPU-only jobs) of one run."""
    return _device_hours(flops(spec), rm)


def _device_hours(run_flops: float, rm: ResourceModel) -> float:
    return run_flops / (rm.mfu * rm.peak_tflops * 1e12) / 3600.0


def bucket_minutes(minutes: float, floor: int) -> int:
    """Round up to the series 1, 2, 3, 4, 6, 8, 12, 16, 24, ... (2^k and 1.5 * 2^k), >= floor."""
    m = max(minutes, 1.0)
    k = 2 ** math.floor(math.log2(m))
    bucket = next(c for c in (k, 1.5 * k, 2 * k) if c >= m)
    return max(floor, math.ceil(bucket))


def _time_limit(minutes: float, rm: ResourceModel) -> tuple[int, int]:
    """(time limit, segments): the bucketed need, or the cluster's cap and how many jobs of it
    the run takes (each segment pays the start-up overhead again)."""
    want = bucket_minutes(minutes, rm.min_timeout_min)
    cap = rm.max_timeout_min
    if cap is None or want <= cap:
        return want, 1
    useful = max(cap - rm.overhead_min, cap / 2)  # minutes of training per segment
    return cap, math.ceil((minutes - rm.overhead_min) / useful)


def max_data_parallel(batch_size: int) -> int:
    """The largest power of two dividing the batch size (GPU counts are powers of two)."""
    return batch_size & -batch_size


def max_gpus(batch_size: int, seqs_per_gpu: int) -> int:
    """The most GPUs (a power of two) that keep >= seqs_per_gpu sequences per GPU per step, in
    whole micro-batches of seqs_per_gpu where it divides the batch (module docstring)."""
    if batch_size % seqs_per_gpu == 0:
        return max_data_parallel(batch_size // seqs_per_gpu)
    d = max_data_parallel(batch_size)
    while d > 1 and batch_size // d < seqs_per_gpu:
        d //= 2
    return d


def resource_class(spec: RunSpec, rm: ResourceModel) -> ResourceClass:
    """The job one run needs. It depends on (FLOPs, batch size) only, which a grid repeats for
    every LR, so it is computed once per distinct pair (planning stays linear in the runs)."""
    return _resource_class(flops(spec), spec.train.batch_size, rm)


@functools.lru_cache(maxsize=65536)
def _resource_class(run_flops: float, batch_size: int, rm: ResourceModel) -> ResourceClass:
    hours = _device_hours(run_flops, rm)
    if rm.gpus_per_node == 0:
        cpus = rm.cpus_per_task * rm.cpu_tasks  # per node
        minutes = hours / (cpus * rm.cpu_nodes) * 60 * rm.safety + rm.overhead_min
        timeout, segments = _time_limit(minutes, rm)
        return ResourceClass(rm.cpu_nodes, 0, cpus, timeout, rm.cpu_tasks, segments)
    most = min(rm.max_nodes * rm.gpus_per_node, max_gpus(batch_size, rm.seqs_per_gpu))
    # scale out before chaining: a run that fits one job is simpler than a chain of them
    target_h = min(rm.target_hours, (rm.max_timeout_min or math.inf) / 60)
    gpus = 1
    while gpus < most and hours / gpus > target_h:
        gpus *= 2
    gpus = min(gpus, most)
    nodes = math.ceil(gpus / rm.gpus_per_node)
    per_node = min(gpus, rm.gpus_per_node)
    minutes = hours / (nodes * per_node) * 60 * rm.safety + rm.overhead_min
    timeout, segments = _time_limit(minutes, rm)
    return ResourceClass(nodes, per_node, rm.cpus_per_gpu * per_node, timeout, 1, segments)
