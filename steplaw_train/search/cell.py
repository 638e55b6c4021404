"""What the search searches: a cell's grid points and run cost, and one proposed run."""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np


@dataclass(frozen=True)
class Cell:
    """One (N, D) cell: its grid points (lr, bs in sequences) and the cost of one run in it.

    `n_law` is the N the law sees (N for dense; N or Na for MoE, the caller's choice); `cost` is
    proportional to the GPU-hours of one run (measured time, else FLOPs per token × D), the same
    for every point of the cell: it orders the cells (cheap first), it does not stop them.
    `model` names the model the cell trains (its shape, experts, top-k, recipe: everything but
    D): cells of one model share one offset from the law. Empty = the model is its `n_law`,
    which merges two MoE shapes of equal total N (the released 89- and 88-expert ones).
    """

    key: str
    n_law: float
    d: float
    cost: float
    seq_len: int
    points: tuple[tuple[float, float], ...]
    model: str = ""

    def __post_init__(self) -> None:
        if not self.points:
            raise ValueError(
                f"cell {self.key!r}: points: empty (a cell needs at least one grid point)"
            )
        for name in ("n_law", "d", "cost", "seq_len"):
            v = getattr(self, name)
            if not (math.isfinite(v) and v > 0):
                raise ValueError(f"cell {self.key!r}: {name}: {v!r} (must be positive and finite)")
        if any(not (lr > 0 and bs > 0) for lr, bs in self.points):
            raise ValueError(f"cell {self.key!r}: points: every lr and bs must be positive")

    @property
    def model_id(self) -> str:
        """The identity `transfer.law_prior` groups cells by: `model`, else `n_law`."""
        return self.model or f"n_law={self.n_law!r}"

    def coords(self) -> np.ndarray:
        """(n, 2) array of (ln lr, ln bs_tokens)."""
        p = np.array(self.points, dtype=float)
        return np.column_stack([np.log(p[:, 0]), np.log(p[:, 1] * self.seq_len)])


@dataclass(frozen=True)
class Proposal:
    """One run to do: grid point `index` of cell `cell`."""

    cell: str
    index: int
    lr: float
    bs: float
