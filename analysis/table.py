"""A measured table as a grid to search: an executor that "runs" a point by looking its loss up.

It lets the law-guided search (steplaw_train.search) and its baselines be proven on released data
without GPUs: a search proposes grid points, the executor answers with the measured smoothed loss
and counts what the runs cost. Only points that exist in the table can be run. (An analysis
helper: launch/ never imports it.)

Cost of a run: its measured time when the table has one for every usable run (`run_time`, from
the MoE release's `total_time`, else `average_iter_time` × iterations), else its training FLOPs
M·D (M from steplaw_train.params, as the release computes it). Measured time is what GPU-hours
are; FLOPs are the fallback that ranks cells the same way up to MFU differences.

Grid points are identified in log space: the release rounds lr inconsistently (0.000345 and
0.0003453 are the same point), so values within `LOG_TOL` of each other are one point. Several
runs at one point (seeds) are one point whose loss is their mean and whose cost is all of them.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping
from dataclasses import dataclass

import numpy as np
import pandas as pd

from analysis import collect
from steplaw_train.cells import SNAP_TOL, snap_log
from steplaw_train.search import Cell, Proposal

LOG_TOL = SNAP_TOL  # the one snapping tolerance (steplaw_train.cells)


@dataclass(frozen=True)
class CellGrid:
    """One cell of the table: the search's view (`cell`) and the answers (`losses`, `runs`)."""

    cell: Cell
    n: float
    na: float
    losses: tuple[float, ...]  # smoothed loss per grid point (inf = diverged)
    runs: tuple[int, ...]  # measured runs per grid point
    costs: tuple[float, ...] = ()  # cost of each point (all its runs); () = cell.cost × runs

    @property
    def total_runs(self) -> int:
        return sum(self.runs)

    def point_cost(self, i: int) -> float:
        return self.costs[i] if self.costs else self.cell.cost * self.runs[i]

    @property
    def total_cost(self) -> float:
        return sum(self.point_cost(i) for i in range(len(self.losses)))

    def argmin(self) -> int:
        return int(np.argmin(self.losses))


def snap(values: Iterable[float], tol: float = LOG_TOL) -> dict[float, float]:
    """Map each value to its grid value (steplaw_train.cells.snap_log: the median of the values
    within `tol` of their neighbours in log space)."""
    vals = sorted(set(float(v) for v in values))
    return dict(zip(vals, (float(x) for x in snap_log(vals, tol)), strict=True))


def _label(row: Mapping[str, object], key: list[str]) -> str:
    parts = [f"N={float(row['N']) / 1e6:.0f}M", f"D={float(row['D']) / 1e9:.3g}B"]
    for k in key:
        if k not in ("N", "D"):
            parts.append(f"{k}={row[k]}")
    return " ".join(parts)


def run_costs(ok: pd.DataFrame) -> tuple[pd.Series, str]:
    """Cost of each run and its source: measured time if every run has one, else FLOPs M·D."""
    if "run_time" in ok:
        t = pd.to_numeric(ok["run_time"], errors="coerce")
        if len(t) and bool(((t > 0) & np.isfinite(t)).all()):
            return t.astype(float), "time"
    m = pd.to_numeric(ok["M"], errors="coerce")
    m = m.where(np.isfinite(m) & (m > 0), 6.0 * ok["Na"].where(ok["Na"].notna(), ok["N"]))
    return (m * ok["D"]).astype(float), "flops"


def build_grid(df: pd.DataFrame, law_n: str = "N") -> list[CellGrid]:
    """One CellGrid per cell of a tidy run table (rows with an excluded_reason are not served)."""
    if law_n not in ("N", "Na"):
        raise ValueError(f"law_n: {law_n!r} (allowed: N, Na)")
    ok = collect.used(df)
    ok = ok[ok["smooth_loss"].notna()]
    if ok.empty:
        raise ValueError("data: no usable runs (every row has an excluded_reason)")
    ok = ok.assign(_cost=run_costs(ok)[0])
    key = collect.cell_key(ok)
    grids: list[CellGrid] = []
    labels: set[str] = set()
    for _, g in ok.groupby(key, dropna=False, sort=True):
        lr_map, bs_map = snap(g["lr"]), snap(g["bs"])
        seq = float(g["seq_len"].iloc[0])
        pts = g.assign(plr=g["lr"].map(lr_map), pbs=g["bs"].map(bs_map))
        agg = pts.groupby(["plr", "pbs"], sort=True)["smooth_loss"].agg(["mean", "size"])
        cost = pts.groupby(["plr", "pbs"], sort=True)["_cost"].sum()
        first = g.iloc[0]
        label = _label(first, key)
        while label in labels:
            label += "'"
        labels.add(label)
        na = float(first["Na"]) if math.isfinite(float(first["Na"])) else float(first["N"])
        cell = Cell(
            key=label,
            n_law=float(first[law_n]),
            d=float(first["D"]),
            cost=float(g["_cost"].mean()),
            seq_len=int(seq),
            points=tuple((float(lr), float(bs)) for lr, bs in agg.index),
            model=" ".join(f"{k}={first[k]}" for k in key if k != "D"),
        )
        grids.append(
            CellGrid(
                cell, float(first["N"]), na, tuple(agg["mean"]), tuple(agg["size"]),
                tuple(float(v) for v in cost),
            )
        )  # fmt: skip
    return grids


class TableExecutor:
    """Answers proposals from the table and counts the runs each cell has used."""

    def __init__(self, grids: Iterable[CellGrid]):
        self._grids = {g.cell.key: g for g in grids}
        self._ran: dict[str, set[int]] = {k: set() for k in self._grids}

    def run(self, proposals: Iterable[Proposal]) -> dict[Proposal, float]:
        out: dict[Proposal, float] = {}
        for p in proposals:
            g = self._grids.get(p.cell)
            if g is None:
                raise KeyError(f"proposal.cell: {p.cell!r} is not in the table")
            if not 0 <= p.index < len(g.losses) or g.cell.points[p.index] != (p.lr, p.bs):
                raise ValueError(f"proposal: {p} is not a grid point of the table")
            if p.index in self._ran[p.cell]:
                raise ValueError(f"proposal: {p} was already run")
            self._ran[p.cell].add(p.index)
            out[p] = g.losses[p.index]
        return out

    def runs_in(self, key: str) -> int:
        """Measured runs used in a cell (a point with several seeds counts all of them)."""
        g = self._grids[key]
        return sum(g.runs[i] for i in self._ran[key])

    def cost_in(self, key: str) -> float:
        """Cost of the runs used in a cell."""
        g = self._grids[key]
        return sum(g.point_cost(i) for i in self._ran[key])

    def ran(self, key: str) -> frozenset[int]:
        return frozenset(self._ran[key])
