"""Power-law fits of the optimal lr and bs, with bootstrap intervals (the Step Law procedure).

Procedure (Li et al. 2025, and their released tool): in each cell keep the grid points within a
threshold (default 0.25%) of the cell's minimum smoothed loss; pool them over cells; fit
log lr = log c + α log N + β log D and log bs = log d + γ log D by least squares; repeat on
1,000 bootstrap resamples of the pooled points for 95% percentile intervals. The resamples are
solved together as one batched normal-equation solve (no Python loop), which is what makes
1,000 of them take milliseconds.

The bootstrap samples are stored in the authors' own format (`BOOT_COLUMNS`), so a report's fit
and the published file are read by the same code (`StepLawFit.from_bootstrap_csv`).

One point-estimate convention, the authors': a fitted law's coefficients are the mean of its
bootstrap fits (their published constants are such means), so fit.json, the report's
"Step Law (this fit)" row and `predict --fit REPORT` give the same law. Without bootstrap
(n_boot = 0, as inside leave-one-cell-out) the estimate is the least-squares solution; fit.json
says which (`point_estimate`) and keeps the least-squares exponents beside it.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd

from analysis.cells import Cell
from steplaw_train import atomic

THRESHOLD = 0.0025
N_BOOT = 1000
BOOT_COLUMNS = ["lr_intercept", "lr_coefN", "lr_coefD", "bs_intercept", "bs_coefD"]


def lstsq(X: np.ndarray, y: np.ndarray) -> np.ndarray:
    return np.linalg.lstsq(X, y, rcond=None)[0]


def bootstrap_lstsq(X: np.ndarray, y: np.ndarray, n_boot: int, seed: int = 0) -> np.ndarray:
    """(n_boot, p) least-squares coefficients on row resamples, solved as one batch.

    A resample is a vector of row counts w; its solution solves (Xᵀ W X) b = Xᵀ W y. Degenerate
    resamples (e.g. a single D drawn) get the minimum-norm solution via the pseudo-inverse.
    """
    n, p = X.shape
    if n_boot <= 0 or n == 0:
        return np.empty((0, p))
    rng = np.random.default_rng(seed)
    idx = rng.integers(0, n, size=(n_boot, n))
    w = np.bincount((idx + n * np.arange(n_boot)[:, None]).ravel(), minlength=n_boot * n)
    w = w.reshape(n_boot, n).astype(float)
    xtx = (w @ (X[:, :, None] * X[:, None, :]).reshape(n, p * p)).reshape(n_boot, p, p)
    xty = w @ (X * y[:, None])
    try:
        return np.linalg.solve(xtx, xty[..., None])[..., 0]
    except np.linalg.LinAlgError:
        return np.einsum("bij,bj->bi", np.linalg.pinv(xtx), xty)


@dataclass(frozen=True, eq=False)
class PowerLaw:
    """y = exp(coef[0]) · Π x_i^coef[i]; `samples` holds bootstrap coefficient vectors."""

    target: str
    features: tuple[str, ...]
    coef: np.ndarray
    samples: np.ndarray = field(default_factory=lambda: np.empty((0, 0)))
    n_points: int = 0
    estimate: str = "least squares"  # or "bootstrap mean" (the module docstring)
    least_squares: np.ndarray | None = None  # the full-data solution, kept for reference

    def _design(self, x: dict[str, float]) -> np.ndarray:
        return np.array([1.0] + [np.log(float(x[f])) for f in self.features])

    def predict(self, **x: float) -> float:
        return float(np.exp(self._design(x) @ self.coef))

    def interval(self, level: float = 0.95, **x: float) -> tuple[float, float]:
        """Percentile interval of the prediction over the bootstrap samples (nan if none)."""
        if self.samples.size == 0:
            return (float("nan"), float("nan"))
        preds = np.exp(self.samples @ self._design(x))
        q = (1 - level) / 2
        lo, hi = np.quantile(preds, [q, 1 - q])
        return float(lo), float(hi)

    def coef_intervals(self, level: float = 0.95) -> np.ndarray:
        """(p, 2) percentile intervals of the log-space coefficients."""
        if self.samples.size == 0:
            return np.full((len(self.coef), 2), np.nan)
        q = (1 - level) / 2
        return np.quantile(self.samples, [q, 1 - q], axis=0).T

    @property
    def names(self) -> list[str]:
        return ["log_const"] + [f"exp_{f}" for f in self.features]

    def formula(self) -> str:
        terms = " · ".join(
            f"{f}^{e:.4g}" for f, e in zip(self.features, self.coef[1:], strict=True)
        )
        with np.errstate(over="ignore"):  # an unidentifiable fit's constant can overflow: inf
            return f"{self.target} = {np.exp(self.coef[0]):.4g} · {terms}"

    def to_dict(self) -> dict[str, object]:
        with np.errstate(over="ignore"):
            return self._to_dict()

    def _to_dict(self) -> dict[str, object]:
        ci = self.coef_intervals()
        return {
            "target": self.target,
            "formula": self.formula(),
            "const": float(np.exp(self.coef[0])),
            "const_ci95": [float(np.exp(ci[0, 0])), float(np.exp(ci[0, 1]))],
            "exponents": {f: float(e) for f, e in zip(self.features, self.coef[1:], strict=True)},
            "exponents_ci95": {
                f: [float(a), float(b)] for f, (a, b) in zip(self.features, ci[1:], strict=True)
            },
            "n_points": self.n_points,
            "n_boot": int(self.samples.shape[0]) if self.samples.ndim == 2 else 0,
            "point_estimate": self.estimate,
            "least_squares_exponents": None
            if self.least_squares is None
            else {f: float(e) for f, e in zip(self.features, self.least_squares[1:], strict=True)},
        }


def fit_power_law(
    target: str, features: tuple[str, ...], data: pd.DataFrame, n_boot: int = N_BOOT, seed: int = 0
) -> PowerLaw:
    """Least squares of log(target) on [1, log(features)] plus bootstrap samples."""
    X = np.column_stack([np.ones(len(data))] + [np.log(data[f].to_numpy(float)) for f in features])
    y = np.log(data[target].to_numpy(float))
    if len(data) < X.shape[1]:
        raise ValueError(
            f"fit of {target} on {features} needs at least {X.shape[1]} points, got {len(data)}"
        )
    ls, samples = lstsq(X, y), bootstrap_lstsq(X, y, n_boot, seed)
    boot = samples.shape[0] > 0
    return PowerLaw(
        target, features, samples.mean(0) if boot else ls, samples, n_points=len(data),
        estimate="bootstrap mean" if boot else "least squares", least_squares=ls,
    )  # fmt: skip


def optimal_points(
    cells: list[Cell], threshold: float = THRESHOLD, n_col: str = "N"
) -> pd.DataFrame:
    """The pooled near-optimal grid points: each cell's points within `threshold` of its minimum."""
    frames = []
    for c in cells:
        x = c.inputs(n_col)
        frames.append(c.plateau(threshold).assign(N=x["N"], D=x["D"], cell=c.label))
    cols = ["lr", "bs_tokens", "loss", "N", "D", "cell"]
    return pd.concat(frames, ignore_index=True)[cols] if frames else pd.DataFrame(columns=cols)


@dataclass(frozen=True, eq=False)
class StepLawFit:
    """lr(N, D) and bs(D) (+ the free form bs(N, D)) with their bootstrap samples."""

    lr: PowerLaw
    bs: PowerLaw
    bs_free: PowerLaw | None = None
    source: str = ""
    threshold: float = THRESHOLD
    n_col: str = "N"

    def predict(self, N: float, D: float, level: float = 0.95) -> dict[str, float]:
        lr_lo, lr_hi = self.lr.interval(level, N=N, D=D)
        bs_lo, bs_hi = self.bs.interval(level, D=D)
        return {
            "lr": self.lr.predict(N=N, D=D),
            "lr_lo": lr_lo,
            "lr_hi": lr_hi,
            "bs_tokens": self.bs.predict(D=D),
            "bs_tokens_lo": bs_lo,
            "bs_tokens_hi": bs_hi,
        }

    def bootstrap_frame(self) -> pd.DataFrame:
        """The samples in the authors' published format (one row per resample)."""
        if self.lr.samples.size == 0 or self.bs.samples.size == 0:
            return pd.DataFrame(columns=BOOT_COLUMNS)
        return pd.DataFrame(np.hstack([self.lr.samples, self.bs.samples]), columns=BOOT_COLUMNS)

    def to_dict(self) -> dict[str, object]:
        out = {
            "source": self.source,
            "threshold": self.threshold,
            "n_col": self.n_col,
            "lr": self.lr.to_dict(),
            "bs": self.bs.to_dict(),
        }
        if self.bs_free is not None:
            out["bs_free"] = self.bs_free.to_dict()
        return out

    def write(self, out_dir: Path) -> None:
        """fit.json (coefficients, intervals) and bootstrap.csv (samples, authors' format)."""
        atomic.write_text(out_dir / "fit.json", json.dumps(self.to_dict(), indent=2))
        atomic.write_text(out_dir / "bootstrap.csv", self.bootstrap_frame().to_csv(index=False))

    @classmethod
    def from_bootstrap_csv(cls, path: str | Path) -> StepLawFit:
        """A fit whose point estimate is the mean of bootstrap samples (the published convention)."""
        df = pd.read_csv(path)
        missing = [c for c in BOOT_COLUMNS if c not in df.columns]
        if missing:
            raise ValueError(f"{path}: missing bootstrap columns {missing}")
        lr_s = df[BOOT_COLUMNS[:3]].to_numpy(float)
        bs_s = df[BOOT_COLUMNS[3:]].to_numpy(float)
        return cls(
            lr=PowerLaw("lr", ("N", "D"), lr_s.mean(0), lr_s, len(df), "bootstrap mean"),
            bs=PowerLaw("bs_tokens", ("D",), bs_s.mean(0), bs_s, len(df), "bootstrap mean"),
            source=str(path),
        )


def fit_step_law(
    cells: list[Cell],
    threshold: float = THRESHOLD,
    n_boot: int = N_BOOT,
    seed: int = 0,
    n_col: str = "N",
    free_form: bool = True,
) -> StepLawFit:
    """The Step Law fit of a set of cells (see the module docstring for the procedure)."""
    pts = optimal_points(cells, threshold, n_col)
    lr = fit_power_law("lr", ("N", "D"), pts, n_boot, seed)
    bs = fit_power_law("bs_tokens", ("D",), pts, n_boot, seed + 1)
    bs_free = None
    if free_form and pts["N"].nunique() > 1:
        bs_free = fit_power_law("bs_tokens", ("N", "D"), pts, n_boot, seed + 2)
    return StepLawFit(lr, bs, bs_free, source="fit", threshold=threshold, n_col=n_col)
