"""Cells, defined once: the unit every LR x BS grid, search and fit works on.

A cell is every run that differs only in (lr, batch size, seed). Its key is the paper's
(model, recipe, D); `cell_identity` adds the rest of the spec (train overrides such as seq_len)
for the rare grid whose blocks share a (model, recipe, D) but not the rest. In the analysis's
tidy table (one row per run, released CSVs included) the same idea is `table_key(df)`: N and D
plus every robustness axis that varies at fixed (N, D).

Grid values inside a cell are matched by value in log space, not by equality (the authors' CSV
writes one lr as 0.000345 and 0.0003453): `snap_log`, the one snapping rule, used by the
analysis's cells.
"""

from __future__ import annotations

from typing import Any, NamedTuple

import numpy as np

from steplaw_train.spec import RunSpec, canonical_json

WITHIN_CELL = ("lr", "batch_size", "seed")  # what varies inside one cell
SNAP_TOL = 0.01  # log-space distance below which two values are one grid value (1%)
# Tidy-table axes along which the paper's robustness figures vary a cell at fixed (N, D).
AXES: dict[str, list[str]] = {
    "shape": ["h", "ffnh", "numh", "numl"],
    "sparsity": ["Na", "num_experts", "topk", "moe_ffnh", "shared_ffnh"],
    "recipe": ["recipe"],
    "seq_len": ["seq_len"],
}


class CellKey(NamedTuple):
    """(model name, recipe, D): the unit of the paper's LR x BS grids and of the dry-run table."""

    model: str
    recipe: str
    D: int

    @property
    def label(self) -> str:
        return f"{self.model} {self.recipe} D={self.D:.4g}"


def cell_key(spec: RunSpec) -> CellKey:
    return CellKey(spec.model.name, spec.data.recipe, spec.D)


def cell_identity(spec: RunSpec) -> str:
    """Everything but lr, batch size and seed (labels included: they name the cell)."""
    neutral = spec.with_train(lr=1.0, batch_size=1, seed=0)
    return f"{spec.model.name}|{spec.data.recipe}|{canonical_json(neutral)}"


# ---- the tidy table (duck-typed pandas: the core does not import pandas) -----------------------
def varying_axes(df: Any) -> dict[str, list[str]]:
    """The robustness axes (shape, sparsity, recipe, seq_len) that vary inside some (N, D) pair."""
    out: dict[str, list[str]] = {}
    if df.empty:
        return out
    groups = df.groupby(["N", "D"], dropna=True)
    for axis, cols in AXES.items():
        varying = [c for c in cols if c in df and (groups[c].nunique(dropna=True) > 1).any()]
        if varying:
            out[axis] = varying
    return out


def table_key(df: Any) -> list[str]:
    """Columns that define a cell: N and D, plus every axis that varies at fixed (N, D)."""
    key = ["N", "D"]
    for cols in varying_axes(df).values():
        key += [c for c in cols if c not in key]
    return key


def snap_log(values: Any, tol: float = SNAP_TOL) -> np.ndarray:
    """Each value mapped to its cluster's median; clusters = runs of sorted log values < tol
    apart. Non-positive or non-finite values are returned as they are."""
    v = np.asarray(values, dtype=float)
    ok = np.isfinite(v) & (v > 0)
    out = v.copy()
    if not ok.any():
        return out
    uniq = np.unique(v[ok])
    labels = np.concatenate([[0], np.cumsum(np.diff(np.log(uniq)) > tol)])
    centre = {}
    for lab in np.unique(labels):
        members = uniq[labels == lab]
        centre.update(dict.fromkeys(members, float(np.median(members))))
    out[ok] = [centre[x] for x in v[ok]]
    return out
