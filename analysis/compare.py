"""How far each law's (lr, bs) lands from a cell's best run: the gap, read two ways.

A law predicts a point that is usually between grid points, so the loss there has to be read
off the grid somehow; the paper does not say how. Both readings are reported:

* nearest: the loss of the grid point nearest to the prediction in (ln lr, ln bs_tokens);
  gap = loss / cell minimum − 1.
* surface: a convex quadratic in (ln lr, ln bs_tokens) fitted by least squares to the cell's grid
  points within `SURFACE_WINDOW` of the minimum (the landscape is only bowl-shaped near its
  bottom; far points and diverged runs would dominate the fit). Convexity is imposed by writing
  the Hessian as L·Lᵀ. gap = S(prediction) / min S over the grid's box − 1, so the reading and
  its reference come from the same surface. A prediction outside the grid's box is read at the
  box's nearest point (a quadratic must not be extrapolated) and flagged (`outside_grid`).

Gaps are in per mille. A law that predicts only lr or only bs gets the cell's grid-best value for
the other (`lr_from` / `bs_from` say which came from where).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import pandas as pd
from scipy.optimize import least_squares, minimize

from analysis import laws as laws_mod
from analysis.cells import Cell
from analysis.fit import THRESHOLD, StepLawFit, fit_step_law

SURFACE_WINDOW = 0.02  # grid points within 2% of the cell minimum enter the quadratic
SURFACE_MIN_POINTS = 6
METHODS = ("nearest", "surface")


# ---------------------------------------------------------------------------------------------
# Reading a loss at a point
# ---------------------------------------------------------------------------------------------


def read_nearest(cell: Cell, lr: float, bs: float) -> dict[str, float]:
    """The grid point nearest to (lr, bs) in log space, and its gap to the cell minimum (‰)."""
    p = cell.points
    d2 = (np.log(p["lr"]) - np.log(lr)) ** 2 + (np.log(p["bs_tokens"]) - np.log(bs)) ** 2
    r = p.loc[d2.idxmin()]
    return {
        "near_lr": float(r["lr"]),
        "near_bs_tokens": float(r["bs_tokens"]),
        "loss_nearest": float(r["loss"]),
        "gap_nearest": 1000.0 * (float(r["loss"]) / cell.min_loss - 1.0),
    }


@dataclass(frozen=True, eq=False)
class Surface:
    """S(x, y) = c + gᵀz + ½ zᵀ L Lᵀ z, z = (ln lr, ln bs) − centre; in relative-loss units."""

    params: np.ndarray | None
    centre: np.ndarray
    lo: np.ndarray
    hi: np.ndarray
    reason: str = ""
    s_min: float = np.nan

    @property
    def ok(self) -> bool:
        return self.params is not None

    def value(self, z: np.ndarray) -> np.ndarray:
        return _quad(self.params, np.atleast_2d(z) - self.centre)

    def read(self, lr: float, bs: float) -> float:
        """Gap in per mille at (lr, bs) clipped to the grid's box, relative to S's minimum there."""
        if not self.ok:
            return np.nan
        z = np.clip(np.array([np.log(lr), np.log(bs)]), self.lo, self.hi)  # no extrapolation
        s = float(self.value(z)[0])
        return 1000.0 * ((1 + s) / (1 + self.s_min) - 1.0)

    def inside(self, lr: float, bs: float, slack: float = 1e-9) -> bool:
        z = np.array([np.log(lr), np.log(bs)])
        return bool(np.all(z >= self.lo - slack) and np.all(z <= self.hi + slack))


def _quad(params: np.ndarray, z: np.ndarray) -> np.ndarray:
    c, g1, g2, l11, l21, l22 = params
    a, b, d = l11 * l11, l11 * l21, l21 * l21 + l22 * l22  # H = L Lᵀ, positive semidefinite
    x, y = z[:, 0], z[:, 1]
    return c + g1 * x + g2 * y + 0.5 * (a * x * x + 2 * b * x * y + d * y * y)


def fit_surface(cell: Cell, window: float = SURFACE_WINDOW) -> Surface:
    """The convex quadratic of the module docstring, or a Surface saying why there is none."""
    p = cell.points[np.isfinite(cell.points["loss"])]
    z_all = np.column_stack([np.log(p["lr"]), np.log(p["bs_tokens"])])
    lo, hi = z_all.min(0), z_all.max(0)
    near = p[p["loss"] <= cell.min_loss * (1 + window)]
    z = np.column_stack([np.log(near["lr"]), np.log(near["bs_tokens"])])
    centre = np.array([np.log(cell.best["lr"]), np.log(cell.best["bs_tokens"])])
    if len(near) < SURFACE_MIN_POINTS or np.ptp(z[:, 0]) == 0 or np.ptp(z[:, 1]) == 0:
        why = f"{len(near)} grid points within {window:.1%} of the minimum, need a 2-D spread of {SURFACE_MIN_POINTS}"
        return Surface(None, centre, lo, hi, reason=why)
    r = near["loss"].to_numpy() / cell.min_loss - 1.0
    zc = z - centre
    x0 = np.array([0.0, 0.0, 0.0, 0.1, 0.0, 0.1])
    sol = least_squares(lambda q: _quad(q, zc) - r, x0, method="lm")
    surf = Surface(sol.x, centre, lo, hi)
    res = minimize(
        lambda v: float(surf.value(v)[0]), x0=centre, bounds=list(zip(lo, hi, strict=True))
    )
    return Surface(sol.x, centre, lo, hi, s_min=float(min(res.fun, surf.value(centre)[0])))


# ---------------------------------------------------------------------------------------------
# Laws on cells
# ---------------------------------------------------------------------------------------------


def fitted_law(fit: StepLawFit, name: str = "Step Law (this fit)") -> laws_mod.Law:
    """A fit as a Law entry, so it is compared exactly like the published ones."""
    return laws_mod.step_law(
        float(np.exp(fit.lr.coef[0])), float(fit.lr.coef[1]), float(fit.lr.coef[2]),
        float(np.exp(fit.bs.coef[0])), float(fit.bs.coef[1]), name=name,
        note="fitted on these cells (in-sample); see leave-one-cell-out for held-out gaps",
    )  # fmt: skip


def prepare_laws(
    cells: list[Cell], laws: tuple[laws_mod.Law, ...], n_col: str
) -> tuple[laws_mod.Law, ...]:
    """Laws with any unknown constant calibrated on these cells (see laws.MICROSOFT)."""
    best = [float(c.best["lr"]) for c in cells]
    inputs = [c.inputs(n_col) for c in cells]
    return tuple(laws_mod.calibrated(law, best, inputs) for law in laws)


def predict_on_cell(law: laws_mod.Law, cell: Cell, n_col: str) -> dict[str, object]:
    """The law's (lr, bs_tokens) for the cell, with the grid-best fill for a missing one."""
    lr, bs = law.predict(cell.inputs(n_col))
    lr_from = "law" if lr is not None else "grid best"
    bs_from = "law" if bs is not None else "grid best"
    lr = float(cell.best["lr"]) if lr is None else lr
    bs = float(cell.best["bs_tokens"]) if bs is None else bs
    return {"law": law.name, "lr": lr, "bs_tokens": bs, "lr_from": lr_from, "bs_from": bs_from}


def gaps_on_cell(cell: Cell, surface: Surface, lr: float, bs: float) -> dict[str, object]:
    """Both readings at (lr, bs); nan when the prediction is undefined."""
    if not (np.isfinite(lr) and np.isfinite(bs)):
        return {"gap_nearest": np.nan, "gap_surface": np.nan, "outside_grid": None}
    return {
        **read_nearest(cell, lr, bs),
        "gap_surface": surface.read(lr, bs),
        "outside_grid": not surface.inside(lr, bs),
    }


def compare(
    cells: list[Cell], laws: tuple[laws_mod.Law, ...], n_col: str = "N",
    surfaces: dict[str, Surface] | None = None,
) -> pd.DataFrame:  # fmt: skip
    """One row per (cell, law): prediction, both readings, and where each value came from."""
    surfaces = surfaces if surfaces is not None else {c.label: fit_surface(c) for c in cells}
    rows = []
    for law in prepare_laws(cells, laws, n_col):
        for c in cells:
            pred = predict_on_cell(law, c, n_col)
            gaps = gaps_on_cell(c, surfaces[c.label], pred["lr"], pred["bs_tokens"])
            rows.append({"cell": c.label, **c.values, **pred, **gaps})
    return pd.DataFrame(rows)


def gap_summary(table: pd.DataFrame) -> pd.DataFrame:
    """Per law: mean and max gap (‰) over cells for each reading, and how many cells counted."""
    g = table.groupby("law", sort=False)
    out = pd.DataFrame(
        {
            "cells": g["gap_nearest"].count(),
            "mean_nearest": g["gap_nearest"].mean(),
            "max_nearest": g["gap_nearest"].max(),
            "mean_surface": g["gap_surface"].mean(),
            "max_surface": g["gap_surface"].max(),
            "cells_surface": g["gap_surface"].count(),
        }
    )
    return out.reset_index()


def leave_one_cell_out(
    cells: list[Cell], threshold: float = THRESHOLD, n_col: str = "N",
    surfaces: dict[str, Surface] | None = None,
) -> pd.DataFrame:  # fmt: skip
    """Refit without each cell, predict it, read its gap: the held-out error of the fitted law."""
    surfaces = surfaces if surfaces is not None else {c.label: fit_surface(c) for c in cells}
    rows = []
    for i, c in enumerate(cells):
        rest = cells[:i] + cells[i + 1 :]
        try:
            fit = fit_step_law(rest, threshold, n_boot=0, n_col=n_col, free_form=False)
        except (ValueError, np.linalg.LinAlgError) as e:
            rows.append({"cell": c.label, **c.values, "reason": str(e)})
            continue
        x = c.inputs(n_col)
        lr, bs = fit.lr.predict(N=x["N"], D=x["D"]), fit.bs.predict(D=x["D"])
        gaps = gaps_on_cell(c, surfaces[c.label], lr, bs)
        rows.append({"cell": c.label, **c.values, "lr": lr, "bs_tokens": bs, **gaps})
    return pd.DataFrame(rows)


def robustness(table: pd.DataFrame, cell_table: pd.DataFrame, axis_cols: list[str]) -> pd.DataFrame:
    """Per (N, D) and value of one robustness axis: observed optimum and each law's gap."""
    key = ["N", "D", *axis_cols]
    gaps = table.pivot_table(index=key, columns="law", values="gap_nearest", aggfunc="first")
    gaps.columns = [f"gap_nearest[{c}]" for c in gaps.columns]
    opt = cell_table.set_index(key)[["min_loss", "best_lr", "best_bs_tokens", "lr_edge", "bs_edge"]]
    return opt.join(gaps).reset_index()
