"""Disk a sweep's checkpoints need, for the dry run: at the end and at the peak.

A megatron torch_dist checkpoint holds, per parameter (all N, embeddings included): on GPU the
bf16 weights (2 B), the distributed optimizer's fp32 main copy (4 B) and Adam's two fp32 moments
(8 B) = 14 B; on CPU fp32 weights + moments = 12 B (a 1B model: ~17 GB). The run's lifecycle
(train.py `finish`, checkpoint.py):
  - while it trains, a run holds `keep_checkpoints` full checkpoints, and one more while a save
    is in flight (the oldest is pruned once the new one is complete);
  - when it finishes it writes its final save (`options.final_checkpoint`: "model" = the weights
    only, 2 B/param in bf16, 4 in fp32; "full" = one full checkpoint; "none"), then result.json,
    then deletes its step checkpoints (`options.prune_checkpoints`).
So:
  end  = sum over the sweep's runs of the final save's size
  peak = end + (keep + 1) full checkpoints for each of the largest runs that can be in flight
         at once (arrays x array throttle, or local workers)
The peak is an upper bound: it counts every run's final save as already written while the
largest runs still train. Runs preempted and waiting in the queue also hold their step
checkpoints; they are not counted (at most `in_flight` run at once).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from steplaw_train.spec import RunSpec


def bytes_per_param(gpu: bool) -> int:
    """A full checkpoint (weights, fp32 main params on GPU, Adam moments), per parameter."""
    return 14 if gpu else 12


def final_bytes_per_param(kind: str, gpu: bool) -> int:
    """The final save `options.final_checkpoint` asks for, per parameter: "model" is the
    weights alone (bf16 on GPU, fp32 on CPU), "full" a full checkpoint, "none" nothing."""
    if kind == "model":
        return 2 if gpu else 4
    if kind == "full":
        return bytes_per_param(gpu)
    if kind == "none":
        return 0
    raise ValueError(f"final_checkpoint must be model, full or none, got {kind!r}")


@dataclass(frozen=True)
class Disk:
    end_bytes: float
    peak_bytes: float
    final_checkpoint: str = "model"

    def describe(self) -> str:
        return (
            f"checkpoints on disk: {_tb(self.end_bytes)} at the end (final_checkpoint="
            f"{self.final_checkpoint}), {_tb(self.peak_bytes)} peak"
        )


def _tb(b: float) -> str:
    return f"{b / 1e12:.3g} TB" if b >= 1e11 else f"{b / 1e9:.3g} GB"


def sweep_disk(
    specs: Sequence[RunSpec],
    todo: Sequence[RunSpec],
    keep: int,
    in_flight: int,
    gpu: bool,
    final_checkpoint: str = "model",
    prune: bool = True,
) -> Disk:
    """Every run's final save at the end; the peak adds the step checkpoints of the largest
    `in_flight` runs to submit. Without pruning (`prune=False`) a finished run also keeps its
    newest `keep` step checkpoints (one of them the final save when it is "full")."""
    full = bytes_per_param(gpu)
    final = final_bytes_per_param(final_checkpoint, gpu)
    per_run = final if prune else max(keep, 1) * full + (0 if final_checkpoint == "full" else final)
    end = sum(s.N * per_run for s in specs)
    training = (max(keep, 1) + 1) * full
    saving = sorted((s.N * training for s in todo), reverse=True)[: max(0, in_flight)]
    return Disk(end, end + sum(saving), final_checkpoint)
