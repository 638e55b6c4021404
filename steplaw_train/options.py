"""RunOptions: how a run executes, as opposed to what it computes (RunSpec).

None of these enter the run_id: changing where data lives, how often to checkpoint or which
wandb project to log to must not turn a finished run into a "new" one.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

PRECISIONS = ("auto", "fp32", "bf16")
DEVICES = ("auto", "cuda", "cpu")


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
    checkpoint_interval: int = 200  # steps between checkpoints (also on SIGTERM/SIGUSR1/SIGUSR2)
    keep_checkpoints: int = 1  # complete checkpoints kept on disk
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
