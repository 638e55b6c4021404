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
# Colour bands (‰): fine where the Step Law plateau (2.5‰) and the laws' gaps (1-10‰) live,
# coarse beyond, so 0-5‰ spans half the colour scale instead of a tenth of one colour.
GAP_BOUNDS = (0, 0.5, 1, 1.5, 2, 2.5, 3.5, 5, 7.5, 10, 15, 20, 30, 50)
MARKERS = "oD^vs<>Pph*X"


def new_figure(width: float = 6.4, height: float = 4.8) -> tuple[Figure, Axes]:
    fig = Figure(figsize=(width, height), layout="constrained")
    return fig, fig.add_subplot()


def save(fig: Figure, path: Path, dpi: int = 110) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=dpi)


def _edges(grid: np.ndarray) -> np.ndarray:
    """Cell edges at geometric midpoints between grid values (half a step beyond the ends)."""
    g = np.log(grid)
    if g.size == 1:
        return np.exp(np.array([g[0] - 0.1, g[0] + 0.1]))
    mid = (g[1:] + g[:-1]) / 2
    return np.exp(np.concatenate([[2 * g[0] - mid[0]], mid, [2 * g[-1] - mid[-1]]]))


def _grid(cell: Cell, value: str = "gap") -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(lrs, bss, Z[bs, lr]): Z is the gap (‰) or the loss; NaN where no run."""
    p = cell.points
    lrs, bss = np.sort(p["lr"].unique()), np.sort(p["bs_tokens"].unique())
    z = np.full((bss.size, lrs.size), np.nan)
    for r in p.itertuples():
        v = 1000 * (r.loss / cell.min_loss - 1) if value == "gap" else r.loss
        z[np.searchsorted(bss, r.bs_tokens), np.searchsorted(lrs, r.lr)] = v
    return lrs, bss, z


def _log_axes(ax: Axes, lrs: np.ndarray, bss: np.ndarray) -> None:
    """Both axes at log positions, ticked at the grid's values."""
    ax.set_xscale("log")
    ax.set_yscale("log")
    ex, ey = _edges(lrs), _edges(bss)
    ax.set_xlim(ex[0], ex[-1])
    ax.set_ylim(ey[0], ey[-1])
    ax.set_xticks(lrs, [f"{v:.2g}" for v in lrs], rotation=60, fontsize=7)
    ax.set_yticks(bss, [_tokens(v) for v in bss], fontsize=7)
    ax.minorticks_off()
    ax.set_xlabel("peak learning rate (log scale)")
    ax.set_ylabel("batch size, tokens (log scale)")


def _title(cell: Cell, n_col: str, what: str) -> tuple[str, str]:
    b = cell.best
    x = cell.inputs(n_col)
    lrs, bss = cell.points["lr"].to_numpy(), cell.points["bs_tokens"].to_numpy()
    flags = [f"{n} optimum on {e} grid edge" for n, e in (("lr", _edge(np.unique(lrs), b["lr"])),
             ("bs", _edge(np.unique(bss), b["bs_tokens"]))) if e]  # fmt: skip
    text = (f"{cell.label}  [{what}]\nmin smoothed loss {cell.min_loss:.4f} at lr "
            f"{b['lr']:.3g}, bs {_tokens(b['bs_tokens'])}; laws saw {n_col}={x['N']:.4g}")  # fmt: skip
    if flags:
        text += "\n" + "; ".join(flags)
    return text, "darkred" if flags else "black"


def heatmap(
    ax: Axes,
    cell: Cell,
    predictions: pd.DataFrame | None = None,
    threshold: float = 0.0025,
    n_col: str = "N",
) -> Axes:
    """LR×BS map of the relative gap (‰) to the cell minimum, both axes at log positions, in
    colour bands that resolve the plateau; plateau outlined, minimum starred, every law's
    prediction marked (an off-grid one at the edge, with an arrow and its value)."""
    from matplotlib.colors import BoundaryNorm

    lrs, bss, gap = _grid(cell, "gap")
    cmap = _cmap()
    norm = BoundaryNorm(GAP_BOUNDS, cmap.N, extend="max")
    shown = np.ma.masked_invalid(np.where(np.isinf(gap), np.nan, gap))
    ex, ey = _edges(lrs), _edges(bss)
    im = ax.pcolormesh(ex, ey, shown, cmap=cmap, norm=norm)
    cb = ax.figure.colorbar(im, ax=ax, ticks=GAP_BOUNDS, extend="max")
    cb.set_label("gap to cell minimum (‰; bands, > 50 one colour)")
    cb.ax.tick_params(labelsize=7)
    for j, i in zip(*np.nonzero(np.isinf(gap)), strict=True):
        ax.plot(lrs[i], bss[j], "x", color="black", ms=6)
    for j, i in zip(*np.nonzero(np.isfinite(gap)), strict=True):
        v = gap[j, i]
        ax.text(lrs[i], bss[j], f"{v:.1f}" if v < 10 else f"{v:.0f}", ha="center", va="center",
                fontsize=5, color="white" if v >= 10 else "black")  # fmt: skip
    for r in cell.plateau(threshold).itertuples():
        i, j = np.searchsorted(lrs, r.lr), np.searchsorted(bss, r.bs_tokens)
        ax.add_patch(_box(ex, ey, i, j))
    b = cell.best
    ax.plot(b["lr"], b["bs_tokens"], "*", ms=16, color="red", mec="white", label="grid minimum")
    ax.plot([], [], "s", mfc="none", mec="white", mew=1.5, label=f"plateau (≤ {threshold:.2%})")
    if np.isinf(gap).any():
        ax.plot([], [], "x", color="black", label="diverged")
    if predictions is not None:
        _mark_laws(ax, predictions, ex, ey)
    _log_axes(ax, lrs, bss)
    title, colour = _title(cell, n_col, "gap ‰")
    ax.set_title(title, fontsize=8, color=colour, pad=30)  # room for off-grid labels on top
    ax.legend(fontsize=6, loc="upper left", bbox_to_anchor=(0.0, -0.2), ncol=4, frameon=False)
    return ax


def loss_map(ax: Axes, cell: Cell, threshold: float = 0.0025, n_col: str = "N") -> Axes:
    """The absolute smoothed final loss over the same log axes (the authors' published view)."""
    lrs, bss, loss = _grid(cell, "loss")
    finite = loss[np.isfinite(loss)]
    hi = float(min(np.nanmax(finite), cell.min_loss * (1 + GAP_CAP / 1000)))
    im = ax.pcolormesh(_edges(lrs), _edges(bss), np.ma.masked_invalid(np.where(np.isinf(loss),
                       np.nan, loss)), cmap=_cmap(), vmin=cell.min_loss, vmax=hi)  # fmt: skip
    cb = ax.figure.colorbar(im, ax=ax, extend="max")
    cb.set_label(f"smoothed final loss (nats; ≥ {hi:.3f} one colour)")
    cb.ax.tick_params(labelsize=7)
    for j, i in zip(*np.nonzero(np.isfinite(loss)), strict=True):
        ax.text(lrs[i], bss[j], f"{loss[j, i]:.3f}", ha="center", va="center", fontsize=4.5,
                color="white" if loss[j, i] > (cell.min_loss + hi) / 2 else "black")  # fmt: skip
    for j, i in zip(*np.nonzero(np.isinf(loss)), strict=True):
        ax.plot(lrs[i], bss[j], "x", color="black", ms=6)
    b = cell.best
    ax.plot(b["lr"], b["bs_tokens"], "*", ms=16, color="red", mec="white")
    _log_axes(ax, lrs, bss)
    title, colour = _title(cell, n_col, "smoothed loss")
    ax.set_title(title, fontsize=8, color=colour)
    return ax


def valley(ax, cell: Cell) -> object:
    """The paper's 3-D view: smoothed loss over (log10 lr, log10 bs_tokens); `ax` must be a 3-D
    axes (fig.add_subplot(projection="3d")). Diverged, missing and > 50‰ points are left out."""
    lrs, bss, loss = _grid(cell, "loss")
    cap = cell.min_loss * (1 + GAP_CAP / 1000)  # the valley, not the cliffs
    z = np.where(np.isfinite(loss) & (loss <= cap), loss, np.nan)
    gx, gy = np.meshgrid(np.log10(lrs), np.log10(bss))
    ax.plot_surface(gx, gy, z, cmap=_cmap(), vmin=cell.min_loss, vmax=cap, alpha=0.85,
                    edgecolor="black", linewidth=0.2)  # fmt: skip
    b = cell.best
    ax.scatter([np.log10(b["lr"])], [np.log10(b["bs_tokens"])], [cell.min_loss], marker="*",
               s=120, color="red")  # fmt: skip
    ax.set_xlabel("log10 lr", fontsize=7)
    ax.set_ylabel("log10 bs (tokens)", fontsize=7)
    ax.set_zlabel("smoothed loss", fontsize=7)
    ax.set_title(f"{cell.label}: loss valley", fontsize=8)
    return ax


def _cmap():
    from matplotlib import colormaps

    return colormaps["viridis_r"].with_extremes(bad="lightgray")  # lightgray: no run there


def _mark_laws(ax: Axes, predictions: pd.DataFrame, ex: np.ndarray, ey: np.ndarray) -> None:
    """Each law's (lr, bs): in the grid as a marker (later laws smaller, so coincident ones stay
    visible as rings); outside it clamped to the edge, with an arrow pointing off the grid and
    the off-grid value(s) written at its end. Laws clamped to the same spot share one arrow
    (their values stacked, each once)."""
    arrows: dict[tuple, list[str]] = {}
    for k, r in enumerate(predictions.itertuples()):
        if not (np.isfinite(r.lr) and np.isfinite(r.bs_tokens)):
            continue
        x = float(np.clip(r.lr, ex[0], ex[-1]))
        y = float(np.clip(r.bs_tokens, ey[0], ey[-1]))
        off = []
        if x != r.lr:
            off.append(f"lr {r.lr:.2g}")
        if y != r.bs_tokens:
            off.append(f"bs {_tokens(r.bs_tokens)}")
        label = r.law + (" (off grid)" if off else "")
        ax.plot(x, y, MARKERS[k % len(MARKERS)], ms=max(5.0, 11 - 0.7 * k), mec="black",
                alpha=0.9, label=label, clip_on=False, zorder=5)  # fmt: skip
        if off:
            dx = np.sign(np.log(r.lr / x)) if x != r.lr else 0.0
            dy = np.sign(np.log(r.bs_tokens / y)) if y != r.bs_tokens else 0.0
            spot = (round(np.log(x), 1), round(np.log(y), 1), dx, dy)
            arrows.setdefault(spot, [x, y])
            text = " ".join(off)
            if text not in arrows[spot][2:]:
                arrows[spot].append(text)
    for (_, _, dx, dy), (x, y, *texts) in arrows.items():
        ax.annotate(
            "\n".join(texts), xy=(x, y), xytext=(26 * dx, 16 * dy), textcoords="offset points",
            fontsize=6.5, fontweight="bold", ha="left" if dx > 0 else "right" if dx < 0
            else "center", va="bottom" if dy > 0 else "top" if dy < 0 else "center",
            arrowprops={"arrowstyle": "<|-", "color": "black", "lw": 1.2},
            annotation_clip=False, zorder=6,
        )  # fmt: skip


def _edge(grid: np.ndarray, v: float) -> str | None:
    if grid.size < 2:
        return None
    return "low" if np.isclose(v, grid[0]) else "high" if np.isclose(v, grid[-1]) else None


def _box(ex: np.ndarray, ey: np.ndarray, i: int, j: int):
    """The outline of grid point (i, j), a little inside its cell."""
    from matplotlib.patches import Rectangle

    x0 = np.exp(np.log(ex[i]) * 0.92 + np.log(ex[i + 1]) * 0.08)
    x1 = np.exp(np.log(ex[i]) * 0.08 + np.log(ex[i + 1]) * 0.92)
    y0 = np.exp(np.log(ey[j]) * 0.92 + np.log(ey[j + 1]) * 0.08)
    y1 = np.exp(np.log(ey[j]) * 0.08 + np.log(ey[j + 1]) * 0.92)
    return Rectangle((x0, y0), x1 - x0, y1 - y0, fill=False, ec="white", lw=1.5)


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
