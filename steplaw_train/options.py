"""RunOptions: how a run executes, as opposed to what it computes (RunSpec).

None of these enter the run_id: changing where data lives, how often to checkpoint or which
wandb project to log to must not turn a finished run into a "new" one.
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass, field
from pathlib import Path

from steplaw_train.spec import SpecError, check_int, check_real, is_int, is_number

PRECISIONS = ("auto", "fp32", "bf16")
DEVICES = ("auto", "cuda", "cpu")
WANDB_MODES = (None, "online", "offline", "disabled")
# what a finished run leaves (docs/design.md "Checkpoint lifecycle"): the model's weights only,
# its last full checkpoint (optimizer state too: to train on from it), or nothing
FINAL_CHECKPOINTS = ("model", "full", "none")


@dataclass(frozen=True)
class RunOptions:
    data_root: Path = Path("data")  # tokenized datasets and the demo corpus cache
    micro_batch_size: int | None = (
        None  # None: largest divisor of the per-rank batch <= max_micro_batch
    )
    max_micro_batch: int = 8  # sequences per micro-batch when choosing automatically
    # auto = bf16 on GPU (Transformer Engine spec), fp32 on CPU (local spec); bf16 on CPU runs
    # megatron's mixed precision (bf16 model, fp32 main params) with the local spec: slow, but it
    # is how the tests check the GPU path's optimizer and checkpoints without a GPU
    precision: str = "auto"
    # When to save during a run (either one triggers a save; SIGTERM/SIGUSR1/SIGUSR2 always do).
    # Wall-clock minutes between saves, on rank 0's clock: a save costs the same whatever the
    # step time, so a step count is either too often (a 1B bs=32 run: 305,176 steps, 1,525 saves
    # of ~17 GB at 200 steps) or too rare. null/0 = off.
    checkpoint_minutes: float | None = 30.0
    # Steps between saves; null/0 = off (the default: time decides). Tests and short CPU runs
    # set it to get saves at known steps.
    checkpoint_interval: int | None = None
    keep_checkpoints: int = 2  # complete checkpoints kept: an unloadable newest falls back
    # what a finished run keeps, written before result.json (FINAL_CHECKPOINTS): "model" =
    # checkpoints/final/ with the weights only (2 B/param in bf16), "full" = its last full
    # checkpoint (optimizer state included, ~14 B/param), "none" = nothing
    final_checkpoint: str = "model"
    # after result.json, delete the step checkpoints (all but the one "full" keeps); false
    # leaves the newest keep_checkpoints of them (to inspect or copy a finished run's state)
    prune_checkpoints: bool = True
    divergence_factor: float = 2.0  # after warmup, stop when the loss EMA exceeds factor * its best
    divergence_window: int = (
        50  # steps of that EMA: one hard batch (bs=1 at seq 128) is not divergence
    )
    wandb_project: str = "steplaw"
    wandb_group: str | None = None  # the sweep name; None for a lone run
    wandb_mode: str | None = None  # None: WANDB_MODE from the environment, else "offline"
    num_threads: int | None = None  # torch CPU threads; None: torch's default
    # auto = CUDA when available; "cuda" fails loudly without it (the local launcher sets it for
    # the runs it gives a GPU); "cpu" trains on the CPU even where GPUs are visible
    device: str = "auto"
    # GPU only: bitwise-reproducible kernels (TE attention backward without atomics, megatron
    # deterministic_mode, torch deterministic algorithms, NCCL ring); slower (docs/gpu.md)
    deterministic: bool = False
    # None = on GPU only (docs/design.md); True on CPU exercises the GPU path's sharded
    # optimizer state and checkpoints on gloo ranks (tests)
    distributed_optimizer: bool | None = None
    extra: dict = field(default_factory=dict)  # free-form tags recorded in result.json


def validate_options(options: RunOptions) -> None:
    """Raise SpecError naming the first option outside its range (before any work)."""
    o = options
    if o.micro_batch_size is not None:
        check_int("options.micro_batch_size", o.micro_batch_size, 1)
    check_int("options.max_micro_batch", o.max_micro_batch, 1)
    if o.precision not in PRECISIONS:
        raise SpecError("options.precision", f"must be one of {PRECISIONS}, got {o.precision!r}")
    m = o.checkpoint_minutes
    if m is not None and not (is_number(m) and math.isfinite(m) and m >= 0):
        raise SpecError(
            "options.checkpoint_minutes",
            f"must be a number of minutes >= 0 or null (0/null = off), got {m!r}",
        )
    n = o.checkpoint_interval
    if n is not None and not (is_int(n) and n >= 0):
        raise SpecError(
            "options.checkpoint_interval",
            f"must be an integer >= 0 or null (0/null = off), got {n!r}",
        )
    if o.final_checkpoint not in FINAL_CHECKPOINTS:
        raise SpecError(
            "options.final_checkpoint",
            f"must be one of {FINAL_CHECKPOINTS}, got {o.final_checkpoint!r}",
        )
    if not isinstance(o.prune_checkpoints, bool):
        raise SpecError(
            "options.prune_checkpoints", f"must be true or false, got {o.prune_checkpoints!r}"
        )
    check_int("options.keep_checkpoints", o.keep_checkpoints, 1)
    check_real("options.divergence_factor", o.divergence_factor, 1, None, "()")
    check_int("options.divergence_window", o.divergence_window, 1)
    if o.num_threads is not None:
        check_int("options.num_threads", o.num_threads, 1)
    if o.device not in DEVICES:
        raise SpecError("options.device", f"must be one of {DEVICES}, got {o.device!r}")
    if not isinstance(o.deterministic, bool):
        raise SpecError("options.deterministic", f"must be true or false, got {o.deterministic!r}")
    if o.distributed_optimizer is not None and not isinstance(o.distributed_optimizer, bool):
        raise SpecError(
            "options.distributed_optimizer",
            f"must be null (GPU only), true or false, got {o.distributed_optimizer!r}",
        )
    if o.wandb_mode not in WANDB_MODES:
        raise SpecError("options.wandb_mode", f"must be one of {WANDB_MODES}, got {o.wandb_mode!r}")
    if not isinstance(o.extra, dict):
        raise SpecError("options.extra", f"must be a mapping, got {o.extra!r}")
    if o.data_root is None:
        raise SpecError("options.data_root", "must be a directory path, got None")
    problem = data_root_problem(Path(o.data_root))
    if problem:
        raise SpecError("options.data_root", problem)


def data_root_problem(root: Path) -> str | None:
    """Why `root` can never hold the datasets, or None.

    An existing root must be a readable directory. A missing one is fine (the demo corpus is
    built into it on first use) as long as its nearest existing ancestor is a directory this
    user can create entries in: `/etc/passwd/data` or a read-only mount would otherwise pass
    every check and fail inside the first job.
    """
    if str(root).strip() == "":
        return "is empty; give a directory (default: data)"
    root = Path(os.path.abspath(root.expanduser()))
    if root.exists():
        if not root.is_dir():
            return f"{root} exists but is not a directory"
        if not os.access(root, os.R_OK | os.X_OK):
            return f"{root} is not readable by this user"
        return None
    parent = root.parent
    while not parent.exists():
        parent = parent.parent
    if not parent.is_dir():
        return f"{root} cannot be created: {parent} is a file, not a directory"
    if not os.access(parent, os.W_OK | os.X_OK):
        return f"{root} does not exist and cannot be created ({parent} is not writable)"
    return None


__all__ = [
    "DEVICES",
    "FINAL_CHECKPOINTS",
    "PRECISIONS",
    "RunOptions",
    "data_root_problem",
    "validate_options",
]
