"""Cells and their LR×BS grids: the unit every fit and comparison works on.

A cell is a group of runs sharing `steplaw_train.cells.table_key(df)` (N, D, and any robustness axis that
varies). Inside a cell the runs sit on an lr × bs grid. Grid values are matched by value in log
space, not by equality: the authors' CSV writes the same lr as 0.000345 and 0.0003453. Repeats of
one grid point (seeds, or such rounding twins) are averaged into one point.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import pandas as pd

from analysis.collect import used
from steplaw_train import cells as core_cells
from steplaw_train.cells import SNAP_TOL

MIN_RUNS = 3


def snap_log(values: pd.Series, tol: float = SNAP_TOL) -> pd.Series:
    """steplaw_train.cells.snap_log (the one snapping rule) on a Series, index kept."""
    return pd.Series(core_cells.snap_log(values.to_numpy(dtype=float), tol), index=values.index)


def with_grid(df: pd.DataFrame, tol: float = SNAP_TOL) -> pd.DataFrame:
    """The table plus `lr_grid` and `bs_grid` (tokens), the snapped grid coordinates."""
    return df.assign(lr_grid=snap_log(df["lr"], tol), bs_grid=snap_log(df["bs_tokens"], tol))


def grid_points(cell: pd.DataFrame) -> pd.DataFrame:
    """One row per grid point of a cell: lr, bs (tokens), mean smoothed loss, repeats."""
    g = cell.groupby(["lr_grid", "bs_grid"], as_index=False).agg(
        loss=("smooth_loss", "mean"), n=("smooth_loss", "size"), bs_seq=("bs", "first")
    )
    return g.rename(columns={"lr_grid": "lr", "bs_grid": "bs_tokens"})


@dataclass(frozen=True)
class Cell:
    """One cell: its key values and its grid points (used runs only)."""

    key: tuple
    names: tuple[str, ...]
    runs: pd.DataFrame
    points: pd.DataFrame

    @property
    def label(self) -> str:
        return ", ".join(f"{n}={_fmt(v)}" for n, v in zip(self.names, self.key, strict=True))

    @property
    def values(self) -> dict[str, object]:
        return dict(zip(self.names, self.key, strict=True))

    @property
    def best(self) -> pd.Series:
        return self.points.loc[self.points["loss"].idxmin()]

    @property
    def min_loss(self) -> float:
        return float(self.points["loss"].min())

    def plateau(self, threshold: float) -> pd.DataFrame:
        """Grid points within `threshold` (relative) of the cell minimum."""
        return self.points[self.points["loss"] <= self.min_loss * (1 + threshold)]

    def inputs(self, n_col: str = "N") -> dict[str, float]:
        """What a law sees for this cell (N is total or activated, as the caller chose)."""
        r = self.runs.iloc[0]
        return {"N": float(r[n_col]), "D": float(r["D"]), "C": float(r["C"]), "L": self.min_loss}


def _fmt(v: object) -> str:
    return f"{v:.4g}" if isinstance(v, float | np.floating) else str(v)


def split_cells(
    df: pd.DataFrame, key: list[str], min_runs: int = MIN_RUNS, tol: float = SNAP_TOL
) -> tuple[list[Cell], list[dict[str, object]]]:
    """Cells with at least `min_runs` usable runs and a finite minimum; the rest with reasons."""
    good = with_grid(used(df), tol)
    cells: list[Cell] = []
    skipped: list[dict[str, object]] = []
    if good.empty:
        return cells, skipped
    for k, runs in good.groupby(key, sort=True, dropna=False):
        k = k if isinstance(k, tuple) else (k,)
        cell = Cell(tuple(k), tuple(key), runs, grid_points(runs))
        finite = np.isfinite(cell.points["loss"]).sum()
        if len(runs) < min_runs:
            reason = f"only {len(runs)} usable run(s) (< {min_runs})"
        elif finite == 0:
            reason = "every run diverged"
        else:
            cells.append(cell)
            continue
        skipped.append({"cell": cell.label, **cell.values, "reason": reason})
    return cells, skipped


def edge(values: pd.Series, best: float) -> str | None:
    """'low'/'high' if `best` is the smallest/largest of several grid values, else None."""
    u = np.unique(values.to_numpy(dtype=float))
    if u.size < 2:
        return None
    if np.isclose(best, u[0]):
        return "low"
    if np.isclose(best, u[-1]):
        return "high"
    return None


def summary(cell: Cell, threshold: float) -> dict[str, object]:
    """Per-cell facts: grid size, minimum, best point, plateau size, grid-edge flags."""
    b = cell.best
    return {
        "cell": cell.label,
        **cell.values,
        "runs": len(cell.runs),
        "grid_points": len(cell.points),
        "min_loss": cell.min_loss,
        "best_lr": float(b["lr"]),
        "best_bs_tokens": float(b["bs_tokens"]),
        "best_bs": float(b["bs_seq"]),
        "plateau_points": len(cell.plateau(threshold)),
        "lr_edge": edge(cell.points["lr"], float(b["lr"])),
        "bs_edge": edge(cell.points["bs_tokens"], float(b["bs_tokens"])),
    }
