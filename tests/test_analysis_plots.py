"""Heatmaps a researcher can read: log axes, off-grid marks, a resolved plateau, legend outside."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
from matplotlib.backends.backend_agg import FigureCanvasAgg

from analysis import plots
from analysis.cells import Cell

LRS = [1e-3 * 2**i for i in range(5)]
BSS = [2**17, 3 * 2**16, 2**18, 2**20]  # uneven steps in log space: 131K, 196K, 262K, 1.05M


def _cell() -> Cell:
    rows = []
    for i, lr in enumerate(LRS):
        for j, bs in enumerate(BSS):
            rows.append({"lr": lr, "bs_tokens": bs, "loss": 2.5 * (1 + 0.001 * ((i - 2) ** 2 + j)),
                         "n": 1, "bs_seq": bs / 2048})  # fmt: skip
    points = pd.DataFrame(rows)
    points.loc[0, "loss"] = np.inf  # one diverged run
    runs = pd.DataFrame({"N": [2.1e8], "Na": [2.1e8], "D": [1e11], "C": [1e21]})
    return Cell((2.1e8, 1e11), ("N", "D"), runs, points)


def _preds() -> pd.DataFrame:
    return pd.DataFrame(
        [{"law": "inside", "lr": 3e-3, "bs_tokens": 2e5},
         {"law": "too big", "lr": 4e-3, "bs_tokens": 5.98e6},
         {"law": "too small", "lr": 1e-4, "bs_tokens": 2e5}]
    )  # fmt: skip


@pytest.fixture
def drawn():
    fig = plots.Figure(figsize=(14, 6.6), layout="constrained")
    gap_ax, loss_ax = fig.subplots(1, 2)
    cell = _cell()
    plots.heatmap(gap_ax, cell, _preds(), 0.0025, "N")
    plots.loss_map(loss_ax, cell, 0.0025, "N")
    FigureCanvasAgg(fig).draw()
    return fig, gap_ax, loss_ax, cell


def test_axes_are_logarithmic_and_ticked_at_the_grid(drawn):
    _, gap_ax, loss_ax, _ = drawn
    for ax in (gap_ax, loss_ax):
        assert ax.get_xscale() == ax.get_yscale() == "log"
        assert list(ax.get_yticks()) == BSS and list(ax.get_xticks()) == LRS
    # the cells are drawn where their values are: 196K sits closer to 131K than to 262K in pixels
    y = [gap_ax.transData.transform((LRS[0], b))[1] for b in BSS]
    assert y[1] - y[0] == pytest.approx((y[2] - y[0]) * np.log(1.5) / np.log(2), rel=1e-6)


def test_off_grid_predictions_are_marked_with_their_value(drawn):
    _, ax, _, _ = drawn
    notes = {t.get_text() for t in ax.texts if getattr(t, "arrow_patch", None) is not None}
    assert notes == {"bs 5.98M", "lr 0.0001"}
    labels = [t.get_text() for t in ax.get_legend().get_texts()]
    assert "too big (off grid)" in labels and "too small (off grid)" in labels
    assert "inside" in labels


def test_colour_bands_resolve_the_plateau(drawn):
    _, ax, _, _ = drawn
    mesh = ax.collections[0]
    colours = {g: tuple(mesh.cmap(mesh.norm(g))) for g in (0.2, 0.7, 1.2, 1.7, 2.2, 3.0, 4.0)}
    assert len(set(colours.values())) == 7  # every half-per-mille band below 5‰ its own colour
    assert mesh.norm(100.0) == mesh.norm(60.0)  # beyond 50‰ one colour


def test_legend_sits_outside_the_data_and_title_says_what_the_cell_is(drawn):
    fig, ax, loss_ax, cell = drawn
    r = fig.canvas.get_renderer()
    legend, data = ax.get_legend().get_window_extent(r), ax.get_window_extent(r)
    assert legend.y1 <= data.y0  # below the axes, never over a data cell
    title = ax.get_title()
    assert "N=2.1e+08, D=1e+11" in title and f"{cell.min_loss:.4f}" in title
    assert "laws saw N=2.1e+08" in title
    assert "smoothed loss" in loss_ax.get_title()


def test_loss_map_shows_absolute_loss_and_valley_draws(drawn):
    _, _, loss_ax, cell = drawn
    mesh = loss_ax.collections[0]
    assert mesh.norm.vmin == pytest.approx(cell.min_loss)
    fig = plots.Figure()
    ax3 = fig.add_subplot(projection="3d")
    plots.valley(ax3, cell)
    assert ax3.name == "3d" and ax3.collections
