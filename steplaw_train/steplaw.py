"""The Step Law's constants: one home for the paper's rounded law and the authors' exact fit.

Li et al. 2025 (arXiv 2503.04715) publish `lr = 1.79 N^-0.713 D^0.307` and
`bs_tokens = 0.58 D^0.571` (N non-embedding parameters, D tokens). Those are rounded means of the
1,000 bootstrap fits the authors released (`1004_fitted_lr_bs_scaling_model_parameters.csv`);
the means themselves differ from the rounded constants by 1.7-2.1% in lr. Both are named here
so that a table can say which one it used. Every other module imports them from here.
"""

from __future__ import annotations

import math
from dataclasses import dataclass


@dataclass(frozen=True)
class StepLaw:
    """ln lr = lr_intercept + lr_coefN ln N + lr_coefD ln D; ln bs_tokens = bs_intercept + bs_coefD ln D."""

    name: str
    lr_intercept: float
    lr_coefN: float
    lr_coefD: float
    bs_intercept: float
    bs_coefD: float

    def lr(self, N: float, D: float) -> float:
        """Optimal peak learning rate."""
        return math.exp(
            self.lr_intercept + self.lr_coefN * math.log(N) + self.lr_coefD * math.log(D)
        )

    def bs_tokens(self, D: float) -> float:
        """Optimal batch size in tokens."""
        return math.exp(self.bs_intercept + self.bs_coefD * math.log(D))

    def predict(self, N: float, D: float) -> tuple[float, float]:
        """(lr, bs_tokens) at (N, D)."""
        return self.lr(N, D), self.bs_tokens(D)


# The paper's rounded constants (its abstract and Table 1).
PAPER = StepLaw(
    name="Step Law (paper)",
    lr_intercept=math.log(1.79),
    lr_coefN=-0.713,
    lr_coefD=0.307,
    bs_intercept=math.log(0.58),
    bs_coefD=0.571,
)

# Means of the authors' 1,000 released bootstrap fits (what their fit tool predicts with).
BOOTSTRAP_MEAN = StepLaw(
    name="Step Law (bootstrap mean)",
    lr_intercept=0.5863077907399267,
    lr_coefN=-0.7129222911869902,
    lr_coefD=0.3074909504120696,
    bs_intercept=-0.5435421736103339,
    bs_coefD=0.5709443646895044,
)
