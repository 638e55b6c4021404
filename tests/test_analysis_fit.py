"""The acceptance figures, computed: gaps of published laws and the refit of the released data."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest

from analysis import cells, collect, compare, fit, laws

DENSE = collect.released_dense_csv()
BOOT = collect.released_bootstrap_csv()
pytestmark = pytest.mark.skipif(not DENSE.is_file(), reason="../shared/steplaw not present")


@pytest.fixture(scope="module")
def released_cells():
    df = collect.read_released(DENSE)
    got, skipped = cells.split_cells(df, collect.cell_key(df))
    assert not skipped
    return got


@pytest.fixture(scope="module")
def summary_table(released_cells):
    table = compare.compare(released_cells, (laws.STEP_LAW, laws.DEEPSEEK, laws.PORIAN))
    return compare.gap_summary(table).set_index("law")


def test_published_step_law_gap(summary_table):
    s = summary_table.loc[laws.STEP_LAW.name]
    assert s["cells"] == 17
    assert s["mean_nearest"] == pytest.approx(0.96, abs=0.05)
    assert s["max_nearest"] == pytest.approx(3.1, abs=0.05)


def test_peer_law_gaps(summary_table):
    assert summary_table.loc["DeepSeek", "mean_nearest"] == pytest.approx(8.4, abs=0.1)
    assert summary_table.loc["Porian", "mean_nearest"] == pytest.approx(7.4, abs=0.1)
    # the surface reading is reported for every cell and is never negative
    assert (summary_table["cells_surface"] == 17).all()
    assert (summary_table["mean_surface"] >= 0).all()


def test_refit_reproduces_the_authors_procedure(released_cells):
    f = fit.fit_step_law(released_cells, threshold=0.0025, n_boot=1000, seed=0)
    assert f.lr.coef[1] == pytest.approx(-0.77, abs=0.01)
    assert f.lr.coef[2] == pytest.approx(0.20, abs=0.01)
    assert np.exp(f.lr.coef[0]) == pytest.approx(80, rel=0.1)
    assert f.bs.coef[1] == pytest.approx(0.61, abs=0.01)
    assert np.exp(f.bs.coef[0]) == pytest.approx(0.21, rel=0.1)
    ci = f.lr.coef_intervals()
    assert ci[1, 0] < f.lr.coef[1] < ci[1, 1]
    assert f.lr.samples.shape == (1000, 3) and f.bs_free is not None


def test_published_bootstrap_means_give_the_published_law():
    f = fit.StepLawFit.from_bootstrap_csv(BOOT)
    assert np.exp(f.lr.coef[0]) == pytest.approx(1.79, abs=0.01)
    assert f.lr.coef[1:] == pytest.approx([-0.713, 0.307], abs=0.001)
    assert np.exp(f.bs.coef[0]) == pytest.approx(0.58, abs=0.01)
    assert f.bs.coef[1] == pytest.approx(0.571, abs=0.001)


def test_grid_values_are_matched_in_log_space():
    s = pd.Series([0.000345, 0.0003453, 0.000488, 0.0004883, 0.01])
    snapped = cells.snap_log(s)
    assert snapped[0] == snapped[1] and snapped[2] == snapped[3] and snapped[4] == 0.01


def test_bootstrap_matches_a_loop_of_weighted_fits():
    rng = np.random.default_rng(3)
    X = np.column_stack([np.ones(40), rng.normal(size=(40, 2))])
    y = X @ [1.0, -0.7, 0.3] + 0.1 * rng.normal(size=40)
    batch = fit.bootstrap_lstsq(X, y, 50, seed=7)
    idx = np.random.default_rng(7).integers(0, 40, size=(50, 40))
    loop = np.array([np.linalg.lstsq(X[i], y[i], rcond=None)[0] for i in idx])
    np.testing.assert_allclose(batch, loop, rtol=1e-8, atol=1e-10)


def test_surface_recovers_a_known_bowl(released_cells):
    c = released_cells[0]
    s = compare.fit_surface(c)
    assert s.ok
    b = c.best
    assert s.read(float(b["lr"]), float(b["bs_tokens"])) < 2.0  # near the bottom
    far = s.read(float(c.points["lr"].max()), float(c.points["bs_tokens"].max()))
    assert far > 10.0


def test_leave_one_cell_out_is_held_out(released_cells):
    loo = compare.leave_one_cell_out(released_cells[:6])
    assert len(loo) == 6 and loo["gap_nearest"].notna().all() and (loo["gap_nearest"] >= 0).all()
