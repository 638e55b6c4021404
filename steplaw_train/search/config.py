"""The search's knobs, validated: one to tune (epsilon), the rest describe the model."""

from __future__ import annotations

from dataclasses import dataclass

from steplaw_train.spec import is_int

PRIORS = ("steplaw", "none")


@dataclass(frozen=True)
class SearchConfig:
    """Knobs of the search; the defaults are the ones measured in docs/search.md.

    epsilon: the one tuning knob. A cell stops when the posterior probability that some untried
    grid point beats its best run by more than `plateau` is below epsilon; 1 − that probability
    is reported as the probability that the cell's optimum was found.
    prior: "steplaw" (published constants, refined by finished cells) or "none" (law learned
    only from finished cells). batch: runs proposed per round and cell. parallel_cells: how
    many cells (the cheapest unfinished ones) are searched at once; 1 lets every cell start from
    all cheaper ones, more cuts the rounds (wall-clock) a sweep takes. max_runs_frac: hard cap on
    the fraction of a cell's grid one search may run. widen: how much wider (optimum sd) the
    "this cell differs from the finished ones" prior is. tau: optional floor on the expected
    improvement (relative loss) of a proposed run; 0 = off.
    """

    prior: str = "steplaw"
    epsilon: float = 0.3
    cost_power: float = 1.0  # epsilon grows as (run cost / mean) ** this: cheap cells search longer
    plateau: float = 3e-4  # relative loss difference below which two points are equally good
    batch: int = 1
    parallel_cells: int = 1
    max_runs_frac: float = 0.5
    noise: float = 1e-3  # default relative noise of a run's loss before any cell has finished
    outlier_scale: float = 0.2  # noise added per unit of ln-loss above the best run
    law_scatter: float = 0.15  # intrinsic scatter (ln units) of cell optima around the law
    model_sd: float = 0.3  # prior sd (ln units) of one model's shared offset from the law
    widen: float = 3.0  # optimum sd multiplier of the "differs from the family" prior
    neighbour_cost: float = 0.0  # cells whose run cost ≤ this × mean always run best's neighbours
    tau: float = 0.0
    # Every cell runs at least this many points (its grid allowing): two runs cannot have
    # compared the best along both axes, and on the MoE-format tables the expensive cells that
    # stopped at two runs were the ones stating P(found) 0.5-0.75 (docs/search.md).
    min_runs: int = 3

    def __post_init__(self) -> None:
        if self.prior not in PRIORS:
            raise ValueError(f"prior: {self.prior!r} (allowed: {', '.join(PRIORS)})")
        # name → (holds, the allowed values as the error states them)
        checks = {
            "epsilon": (0 < self.epsilon < 1, "0 < epsilon < 1"),
            "plateau": (self.plateau >= 0, ">= 0"),
            "cost_power": (self.cost_power >= 0, ">= 0"),
            "batch": (is_int(self.batch) and self.batch >= 1, "an integer >= 1"),
            "parallel_cells": (
                is_int(self.parallel_cells) and self.parallel_cells >= 1,
                "an integer >= 1",
            ),
            "max_runs_frac": (0 < self.max_runs_frac <= 1, "0 < max_runs_frac <= 1"),
            "noise": (self.noise > 0, "> 0"),
            "outlier_scale": (self.outlier_scale >= 0, ">= 0"),
            "law_scatter": (self.law_scatter > 0, "> 0"),
            "widen": (self.widen >= 1, ">= 1"),
            "model_sd": (self.model_sd >= 0, ">= 0"),
            "neighbour_cost": (self.neighbour_cost >= 0, ">= 0"),
            "tau": (self.tau >= 0, ">= 0"),
            "min_runs": (is_int(self.min_runs) and self.min_runs >= 1, "an integer >= 1"),
        }
        for name, (ok, allowed) in checks.items():
            if not ok:
                raise ValueError(f"{name}: {getattr(self, name)!r} (allowed: {allowed})")
