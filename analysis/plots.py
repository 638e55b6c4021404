"""Figures. Every function draws on an `ax` it is given and returns it: no pyplot state.

`new_figure` builds a Figure without pyplot (Agg canvas), so reports render headless.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
from matplotlib.axes import Axes
from matplotlib.figure import Figure

from analysis.cells import Cell
from analysis.fit import StepLawFit

GAP_CAP = 50.0  # ‰: colour scale ceiling for heatmaps (worse runs share the top colour)
MARKERS = "oD^vs<>Pph*X"


def new_figure(width: float = 6.4, height: float = 4.8) -> tuple[Figure, Axes]:
    fig = Figure(figsize=(width, height), layout="constrained")
    return fig, fig.add_subplot()


def save(fig: Figure, path: Path, dpi: int = 110) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=dpi)


def _index_coord(grid: np.ndarray, value: float) -> float:
    """Position of `value` on an axis whose ticks are the sorted grid values (log-interpolated)."""
    return float(np.interp(np.log(value), np.log(grid), np.arange(grid.size)))


def heatmap(
    ax: Axes, cell: Cell, predictions: pd.DataFrame | None = None, threshold: float = 0.0025
) -> Axes:
    """LR×BS map of the relative gap (‰) to the cell minimum, with minimum, plateau, laws."""
    p = cell.points
    lrs, bss = np.sort(p["lr"].unique()), np.sort(p["bs_tokens"].unique())
    gap = np.full((lrs.size, bss.size), np.nan)
    for r in p.itertuples():
        gap[np.searchsorted(lrs, r.lr), np.searchsorted(bss, r.bs_tokens)] = 1000 * (
            r.loss / cell.min_loss - 1
        )
    shown = np.ma.masked_invalid(np.where(np.isinf(gap), GAP_CAP, np.minimum(gap, GAP_CAP)))
    im = ax.imshow(shown.T, origin="lower", aspect="auto", cmap="viridis_r", vmin=0, vmax=GAP_CAP)
    ax.figure.colorbar(im, ax=ax, label=f"gap to cell minimum (‰, capped at {GAP_CAP:g})")
    for r in cell.plateau(threshold).itertuples():
        i, j = np.searchsorted(lrs, r.lr), np.searchsorted(bss, r.bs_tokens)
        ax.add_patch(_square(ax, i, j))
    b = cell.best
    ax.plot(np.searchsorted(lrs, b["lr"]), np.searchsorted(bss, b["bs_tokens"]), "*", ms=16,
            color="red", mec="white", label="grid minimum")  # fmt: skip
    ax.plot([], [], "s", mfc="none", mec="white", label=f"plateau ({threshold:.2%})")
    if predictions is not None:
        for k, r in enumerate(predictions.itertuples()):
            if not (np.isfinite(r.lr) and np.isfinite(r.bs_tokens)):
                continue
            x, y = _index_coord(lrs, r.lr), _index_coord(bss, r.bs_tokens)
            ax.plot(x, y, MARKERS[k % len(MARKERS)], ms=8, mec="black", label=r.law, alpha=0.9)
    ax.set_xticks(range(lrs.size), [f"{v:.2g}" for v in lrs], rotation=60, fontsize=7)
    ax.set_yticks(range(bss.size), [_tokens(v) for v in bss], fontsize=7)
    ax.set_xlabel("peak learning rate")
    ax.set_ylabel("batch size (tokens)")
    flags = [f"{n} optimum on {e} grid edge" for n, e in (("lr", _edge(lrs, b["lr"])),
             ("bs", _edge(bss, b["bs_tokens"]))) if e]  # fmt: skip
    ax.set_title(cell.label + ("\n" + "; ".join(flags) if flags else ""), fontsize=9,
                 color="darkred" if flags else "black")  # fmt: skip
    ax.legend(fontsize=6, loc="upper left", framealpha=0.6)
    return ax


def _edge(grid: np.ndarray, v: float) -> str | None:
    if grid.size < 2:
        return None
    return "low" if np.isclose(v, grid[0]) else "high" if np.isclose(v, grid[-1]) else None


def _square(ax: Axes, i: int, j: int):
    from matplotlib.patches import Rectangle

    return Rectangle((i - 0.45, j - 0.45), 0.9, 0.9, fill=False, ec="white", lw=1.2)


def _tokens(v: float) -> str:
    for unit, div in (("M", 1e6), ("K", 1e3)):
        if v >= div:
            return f"{v / div:.3g}{unit}"
    return f"{v:.0f}"


def optimum_vs(ax: Axes, points: pd.DataFrame, fit: StepLawFit, target: str, axis: str) -> Axes:
    """Near-optimal points against N or D, the other input divided out, with fit and 95% band.

    lr depends on N and D, so lr·D^-β is drawn against N (and lr·N^-α against D): the fitted law
    is then a straight line in log-log axes.
    """
    law = fit.lr if target == "lr" else fit.bs
    feats = list(law.features)
    if axis not in feats:
        raise ValueError(f"{target} fit has no {axis!r} input; inputs: {feats}")
    k = feats.index(axis)
    others = [(j, f) for j, f in enumerate(feats) if f != axis]
    y = points[target].to_numpy(float)
    for j, f in others:
        y = y * points[f].to_numpy(float) ** (-law.coef[1 + j])
    x = points[axis].to_numpy(float)
    ax.scatter(x, y, s=14, alpha=0.6, label="runs within the plateau")
    xs = np.geomspace(x.min() / 1.3, x.max() * 1.3, 50)
    ax.plot(xs, np.exp(law.coef[0]) * xs ** law.coef[1 + k], color="black", label=law.formula())
    if law.samples.size:
        curves = np.exp(law.samples[:, [0]] + np.log(xs)[None] * law.samples[:, [1 + k]])
        lo, hi = np.quantile(curves, [0.025, 0.975], axis=0)
        ax.fill_between(xs, lo, hi, color="gray", alpha=0.3, label="95% bootstrap band")
    ax.set_xscale("log")
    ax.set_yscale("log")
    ax.set_xlabel(axis)
    divided = "".join(f" · {f}^{-law.coef[1 + j]:+.3g}" for j, f in others)
    ax.set_ylabel(f"{target}{divided}")
    ax.legend(fontsize=7)
    return ax


def gap_bars(ax: Axes, summary: pd.DataFrame) -> Axes:
    """Mean gap (‰) per law for both readings."""
    x = np.arange(len(summary))
    ax.bar(x - 0.2, summary["mean_nearest"], 0.4, label="nearest grid point")
    ax.bar(x + 0.2, summary["mean_surface"], 0.4, label="quadratic surface")
    ax.set_xticks(x, summary["law"], rotation=30, ha="right", fontsize=8)
    ax.set_ylabel("mean gap to the grid minimum (‰)")
    ax.set_yscale("symlog", linthresh=1)
    ax.legend(fontsize=8)
    return ax


def robustness_view(ax: Axes, rob: pd.DataFrame, axis_col: str) -> Axes:
    """Each law's gap (‰, nearest) per value of a robustness axis, one line per (N, D)."""
    gap_cols = [c for c in rob.columns if c.startswith("gap_nearest[")]
    values = sorted(rob[axis_col].dropna().unique(), key=str)
    pos = {v: i for i, v in enumerate(values)}
    for k, col in enumerate(gap_cols):
        for (_, _), g in rob.groupby(["N", "D"]):
            ax.plot([pos[v] for v in g[axis_col]], g[col], MARKERS[k % len(MARKERS)] + "-",
                    label=col[12:-1], alpha=0.8)  # fmt: skip
    ax.set_xticks(range(len(values)), [str(v) for v in values], rotation=30, fontsize=8)
    ax.set_xlabel(axis_col)
    ax.set_ylabel("gap to the cell minimum (‰, nearest)")
    handles, labels = ax.get_legend_handles_labels()
    uniq = dict(zip(labels, handles, strict=True))
    ax.legend(uniq.values(), uniq.keys(), fontsize=7)
    return ax
