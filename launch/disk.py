"""Disk a sweep's checkpoints need, for the dry run: at the end and at the peak.

A megatron torch_dist checkpoint holds, per parameter (all N, embeddings included): on GPU the
bf16 weights (2 B), the distributed optimizer's fp32 main copy (4 B) and Adam's two fp32 moments
(8 B) = 14 B; on CPU fp32 weights + moments = 12 B (a 1B model: ~17 GB). A run keeps
`keep_checkpoints` complete ones and, while saving, one more. So:
  end  = sum over the sweep's runs of keep x size (nothing is pruned when a run finishes)
  peak = end + the sizes of the largest runs to submit that can be saving at once
The checkpoint lifecycle (time-based saves, a model-only final save, pruning at the end) changes
`end`; update `bytes_per_param`/`sweep_disk` with it.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from steplaw_train.spec import RunSpec


def bytes_per_param(gpu: bool) -> int:
    return 14 if gpu else 12


@dataclass(frozen=True)
class Disk:
    end_bytes: float
    peak_bytes: float

    def describe(self) -> str:
        return f"checkpoints on disk: {_tb(self.end_bytes)} at the end, {_tb(self.peak_bytes)} peak"


def _tb(b: float) -> str:
    return f"{b / 1e12:.3g} TB" if b >= 1e11 else f"{b / 1e9:.3g} GB"


def sweep_disk(
    specs: Sequence[RunSpec], todo: Sequence[RunSpec], keep: int, in_flight: int, gpu: bool
) -> Disk:
    """All the sweep's runs at the end; the peak adds the largest `in_flight` of the runs to
    submit (how many can run, and save, at once: arrays x array throttle, or local workers)."""
    per = bytes_per_param(gpu)
    end = max(keep, 1) * sum(s.N * per for s in specs)
    saving = sorted((s.N * per for s in todo), reverse=True)[: max(0, in_flight)]
    return Disk(end, end + sum(saving))
