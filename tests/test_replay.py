"""Acceptance tests of the guided search replayed on the authors' released measurements.

The targets (issue 6) are computed here from the real replay, never hard-coded results:
with the published Step Law as prior ≤5% of the grid's GPU-hours, mean gap ≤0.1‰, max ≤0.5‰;
with no prior ≤10% and mean gap ≤0.2‰. Plus the MoE schema, the CLI and determinism.
"""

from __future__ import annotations

import json
import math

import numpy as np
import pandas as pd
import pytest

from analysis import collect, synthetic
from analysis.replay import (
    BASELINES,
    baseline,
    centre_point,
    hill_climb,
    main,
    read_table,
    replay,
    replay_grids,
)
from analysis.table import TableExecutor, build_grid, run_costs, snap
from steplaw_train.search import Proposal, SearchConfig, axis_neighbours, grid_neighbours

DENSE = collect.released_dense_csv()
needs_data = pytest.mark.skipif(not DENSE.is_file(), reason=f"released data not found at {DENSE}")


@pytest.fixture(scope="module")
def dense():
    return collect.read_released(DENSE)


@needs_data
def test_steplaw_prior_meets_targets(dense):
    reports, tot, _ = replay(dense, SearchConfig(prior="steplaw"))
    assert len(reports) == 17
    assert tot["gpu_hours_fraction"] <= 0.05
    assert tot["mean_gap_permille"] <= 0.1
    assert tot["max_gap_permille"] <= 0.5
    # sanity of the accounting: every cell ran something, never more than its grid
    assert all(0 < r.runs <= r.grid_runs for r in reports)
    assert all(r.gap_permille >= 0 for r in reports)


@needs_data
def test_no_prior_meets_targets(dense):
    _, tot, _ = replay(dense, SearchConfig(prior="none"))
    assert tot["gpu_hours_fraction"] <= 0.10
    assert tot["mean_gap_permille"] <= 0.2


@needs_data
def test_chosen_point_was_run_and_gap_is_measured(dense):
    reports, _, state = replay(dense, SearchConfig())
    grids = {g.cell.key: g for g in build_grid(dense)}
    for r in reports:
        g = grids[r.cell]
        i, loss = state.best(r.cell)
        assert i in state.results[r.cell]
        assert g.cell.points[i] == (r.lr, r.bs) and g.losses[i] == loss
        assert r.grid_min_loss == min(g.losses)
        assert r.gap_permille == pytest.approx(1000 * (loss / min(g.losses) - 1))


@needs_data
def test_parallel_cells_trade_gpu_hours_for_rounds(dense):
    """Searching two cells at once halves the rounds (wall-clock) at about the same compute:
    the second cell of a pair starts without what the first would have taught it. Not always
    more compute: on the released table the pairs spend 4.73% against sequential 4.97%, and pay
    in gap instead (max 0.447‰ against 0.111‰; docs/search.md, "Rounds")."""
    _, one, _ = replay(dense, SearchConfig())
    _, two, _ = replay(dense, SearchConfig(parallel_cells=2, batch=2))
    assert one["rounds"] == one["runs"]  # one run per round when sequential
    assert two["rounds"] <= 0.5 * one["rounds"]
    assert abs(two["gpu_hours_fraction"] - one["gpu_hours_fraction"]) <= 0.005
    assert two["gpu_hours_fraction"] <= 0.06
    assert two["max_gap_permille"] <= 0.5


@needs_data
def test_cli_json_is_deterministic(capsys):
    outs = []
    for _ in range(2):
        assert main(["--data", str(DENSE), "--prior", "steplaw", "--json"]) == 0
        outs.append(capsys.readouterr().out)
    assert outs[0] == outs[1]
    doc = json.loads(outs[0])
    for k in (
        "gpu_hours_fraction",
        "runs_fraction",
        "mean_gap_permille",
        "max_gap_permille",
        "cells",
    ):
        assert k in doc
    assert len(doc["cells"]) == 17
    assert {"runs", "grid_runs", "gpu_hours_fraction", "lr", "bs", "gap_permille"} <= set(
        doc["cells"][0]
    )
    # each cell's share of the table's GPU-hours: the shares add up to the total, and the
    # costliest cell's few runs weigh more than the cheapest cell's many
    shares = {c["cell"]: c["gpu_hours_share"] for c in doc["cells"]}
    assert sum(shares.values()) == pytest.approx(doc["gpu_hours_fraction"])
    cheap, dear = doc["cells"][0], max(doc["cells"], key=lambda c: c["N"] * c["D"])
    assert cheap["runs"] > dear["runs"] and shares[cheap["cell"]] < shares[dear["cell"]]
    assert main(["--data", str(DENSE)]) == 0
    table = capsys.readouterr().out
    assert "GPU-hours" in table and "N=1074M D=56.9B" in table and "share" in table


def test_lr_rounding_is_one_grid_point():
    m = snap([0.000345, 0.0003453, 0.000488, 0.0004883, 0.00069])
    assert m[0.000345] == m[0.0003453] != m[0.000488] == m[0.0004883]
    assert len(set(m.values())) == 3


def _moe_table(path, seed: int = 0) -> pd.DataFrame:
    """A released-MoE-schema CSV over a synthetic bowl: 3 cells, rounding noise in lr, a hole."""
    rng = np.random.default_rng(seed)
    rows = []
    cells = [(2.1e9, 2.4e8, 2e9, 89, 1), (2.1e9, 4.3e8, 4e9, 88, 2), (1.2e9, 6.2e8, 8e9, 8, 3)]
    for n, na, d, e, k in cells:
        opt_lr = 1.79 * na**-0.713 * d**0.307 * 1.4  # off the law so the search must move
        opt_bs = 0.58 * d**0.571 / 4096
        for i in range(12):
            lr = 2.0 ** (-12 + 0.5 * i)
            for bs in (16, 32, 64, 128, 256, 512, 1024):
                if i == 5 and bs == 64:
                    continue  # the released grids are not full rectangles
                u = np.array([math.log(lr / opt_lr), math.log(bs / opt_bs)])
                loss = 2.3 * (1 + 0.5 * u @ np.array([[0.013, -0.005], [-0.005, 0.012]]) @ u)
                loss *= 1 + 2e-4 * rng.standard_normal()
                rows.append({
                    "seq_len": 4096, "topk": k, "nume": e, "moeh": 704, "sed": 42, "h": 1408,
                    "ffnh": 5632, "numh": 11, "numl": 16, "lr": float(f"{lr:.4g}"), "bs": bs,
                    "ti": int(d / (bs * 4096)), "loss": loss * 1.01, "smooth loss": loss,
                    "exp_name": f"moe_e{e}_k{k}_lr{lr:.3e}_bs{bs}", "N": n, "Na": na,
                    "M": 6 * na, "D": d, "moe_name": f"e{e}k{k}",
                })  # fmt: skip
    df = pd.DataFrame(rows)
    df.to_csv(path, index=False)
    return df


@pytest.mark.parametrize("prior", ["steplaw", "none"])
def test_moe_schema_replays(tmp_path, capsys, prior):
    path = tmp_path / "moe.csv"
    raw = _moe_table(path)
    assert main(["--data", str(path), "--prior", prior, "--law-n", "Na", "--json"]) == 0
    doc = json.loads(capsys.readouterr().out)
    assert len(doc["cells"]) == 3
    # GPU-hours use activated parameters: recompute the fraction from the per-cell runs
    cost = {(c["N"], c["D"]): c["Na"] * c["D"] for c in doc["cells"]}
    spent = sum(c["runs"] * cost[(c["N"], c["D"])] for c in doc["cells"])
    total = sum(raw.Na * raw.D)
    assert doc["gpu_hours_fraction"] == pytest.approx(spent / total)
    assert doc["runs_fraction"] < 0.5
    assert doc["max_gap_permille"] < 1.0


def test_executor_rejects_unknown_points(tmp_path):
    path = tmp_path / "moe.csv"
    _moe_table(path)
    grids = build_grid(collect.read_released(path))
    ex = TableExecutor(grids)
    key = grids[0].cell.key
    lr, bs = grids[0].cell.points[0]
    ex.run([Proposal(key, 0, lr, bs)])
    with pytest.raises(ValueError, match="already run"):
        ex.run([Proposal(key, 0, lr, bs)])
    with pytest.raises(ValueError, match="not a grid point"):
        ex.run([Proposal(key, 1, 1.0, 1.0)])
    assert ex.runs_in(key) == 1


def test_missing_columns_fail_cleanly(tmp_path, capsys):
    bad = tmp_path / "bad.csv"
    bad.write_text("h,lr\n1,0.1\n")
    assert main(["--data", str(bad)]) == 2
    assert "missing required columns" in capsys.readouterr().err


@needs_data
def test_baselines_share_the_draws_and_the_cost_model(capsys):
    """--json reports the guided search and every baseline; each baseline does what it says."""
    assert main(["--data", str(DENSE), "--prior", "steplaw", "--json"]) == 0
    doc = json.loads(capsys.readouterr().out)
    base = doc["baselines"]
    assert set(base) == {"guided", *BASELINES}
    assert doc["cost"] == "flops"  # the dense release has no measured time
    assert base["guided"]["gpu_hours_fraction"] == doc["gpu_hours_fraction"]
    full = base["full_grid"]
    assert full["gpu_hours_fraction"] == pytest.approx(1.0) and full["max_gap_permille"] == 0
    assert all(c["runs"] == 1 for c in base["steplaw"]["cells"])
    assert base["steplaw"]["mean_gap_permille"] == pytest.approx(0.957, abs=0.01)  # README
    for name in ("hill_climb_law", "hill_climb_centre"):
        assert all(c["runs"] >= 5 for c in base[name]["cells"])  # start + four neighbours


def test_hill_climb_stops_only_where_no_axis_neighbour_is_better(tmp_path):
    grids = build_grid(read_table(str(_moe_csv(tmp_path))))
    ex = TableExecutor(grids)
    for g in grids:
        i = hill_climb(g, ex, centre_point(g))
        ran = ex.ran(g.cell.key)
        nb = axis_neighbours(g.cell.coords(), i)
        assert set(nb) <= ran and all(g.losses[j] >= g.losses[i] for j in nb)
        assert g.losses[i] == min(g.losses[j] for j in ran)


def _moe_csv(tmp_path, seed: int = 3, **kw):
    path = tmp_path / f"moe{seed}.csv"
    synthetic.moe_release(seed, **kw).to_csv(path, index=False)
    return path


def test_measured_time_is_the_cost_when_the_table_has_it(tmp_path, capsys):
    path = _moe_csv(tmp_path)
    raw = pd.read_csv(path)
    df = read_table(str(path))
    assert run_costs(collect.used(df))[1] == "time"
    grids = build_grid(df)
    reports, tot, state = replay_grids(grids, SearchConfig())
    # GPU-hours fraction = measured time of the runs the search chose / time of the whole table
    key_of = {(g.na, g.cell.d): g for g in grids}
    spent = 0.0
    for g in grids:
        for i in state.results[g.cell.key]:
            lr, bs = g.cell.points[i]
            rows = raw[(raw.Na == g.na) & (g.cell.d == raw.D) & (raw.bs == bs)
                       & (np.abs(np.log(raw.lr / lr)) < 0.02)]  # fmt: skip
            spent += rows.total_time.sum()
    assert len(key_of) == 16
    assert tot["gpu_hours_fraction"] == pytest.approx(spent / raw.total_time.sum())
    # without the time columns the FLOPs M·D are the cost
    raw.drop(columns=["total_time", "average_iter_time"]).to_csv(tmp_path / "nt.csv", index=False)
    nt = read_table(str(tmp_path / "nt.csv"))
    assert run_costs(collect.used(nt))[1] == "flops"
    g0 = build_grid(nt)[0]
    row = nt[(nt.Na == g0.na) & (g0.cell.d == nt.D)].iloc[0]
    assert g0.cell.cost == pytest.approx(row.M * row.D)


def test_synthetic_moe_release_has_the_released_shapes(tmp_path):
    raw = pd.read_csv(_moe_csv(tmp_path, drop=0.1))
    assert {"total_time", "average_iter_time", "Na", "M", "moe_name", "sed"} <= set(raw.columns)
    cells = raw.groupby(["moe_name", "D"]).size()
    assert len(cells) == 16 and cells.min() >= 30 and cells.max() <= 45
    assert sorted(raw.Na.unique()) == sorted(s[5] for s in synthetic.MOE_SHAPES)
    grids = build_grid(read_table(str(_moe_csv(tmp_path, seed=4))))
    assert len(grids) == 16 and all(len(g.losses) == 45 for g in grids)


@needs_data
def test_each_released_cell_alone_without_prior_reaches_its_plateau(dense):
    """A lone cell, prior "none": nothing learned, its cost is the mean run cost, so only the
    first-cell rule (run the best's axis neighbours) stops it from quitting on a confident bowl.
    Every one of the 17 real cells must end within its 1% plateau; measured worst is 1.74‰
    (2.37‰ before the first-cell rule), asserted at 2‰."""
    gaps = []
    for g in build_grid(dense):
        reports, _, _ = replay_grids([g], SearchConfig(prior="none"))
        gaps.append(reports[0].gap_permille)
    assert max(gaps) <= 2.0
    assert all(gap < 10.0 for gap in gaps)


@needs_data
def test_guided_dominates_the_hill_climbs_on_the_released_table(dense):
    """No worse mean gap than either 4-neighbour hill-climb at no more GPU-hours (docs/search.md)."""
    grids = build_grid(dense)
    _, guided, _ = replay_grids(grids, SearchConfig())
    for name in ("hill_climb_law", "hill_climb_centre"):
        _, hc = baseline(grids, name)
        assert guided["gpu_hours_fraction"] <= hc["gpu_hours_fraction"], name
        assert guided["mean_gap_permille"] <= hc["mean_gap_permille"], name


def test_a_cell_that_contradicts_its_prior_runs_its_best_points_neighbours(tmp_path):
    """A new family whose runs favour the "differs" bowl (Outcome.wide > DISAGREE) must not stop
    on the model's word: every grid point next to its best run (the 3×3 block, which holds the
    axis neighbours a hill-climb checks) is run first. Train draw 6 of
    moe-asym-Na (the bench's seed): before, the 8-expert top-3 model's first cell stopped after 7
    runs at a 2.09‰ gap stating P(found) 0.98, its better larger-bs neighbour untried."""
    from steplaw_train.search.state import DISAGREE

    grids = build_grid(read_table(str(_moe_csv(tmp_path, 955728255, follows="Na",
                                               bowls=("asymmetric",)))))  # fmt: skip
    reports, _, state = replay_grids(grids, SearchConfig())
    disagreeing = [o for o in state.outcomes if o.wide > DISAGREE]
    assert disagreeing
    for o in disagreeing:
        cell = state.cell(o.cell)
        best, _ = state.best(o.cell)
        cap = math.ceil(state.config.max_runs_frac * len(cell.points))
        nb = grid_neighbours(cell.coords(), best)
        assert set(nb) <= set(state.results[o.cell]) or state.runs(o.cell) >= cap
    assert max(r.gap_permille for r in reports) <= 0.5


def test_p_found_is_not_overconfident_on_a_synthetic_moe_release(tmp_path):
    """The stated per-cell P(found) must not exceed the share of cells that ended within the
    plateau by more than 0.1 (averaged over 3 draws of 16 cells: its own calibration)."""
    stated, found = [], []
    for seed in (11, 12, 13):
        path = _moe_csv(tmp_path, seed=seed, follows="Na", bowls=synthetic.BOWLS, noise=3e-4)
        reports, _, _ = replay_grids(build_grid(read_table(str(path))), SearchConfig())
        stated += [r.p_found for r in reports]
        found += [r.gap_permille <= 0.3 for r in reports]
    assert len(stated) == 48 and all(0 <= p <= 1 for p in stated)
    assert np.mean(stated) <= np.mean(found) + 0.1


def test_cli_handles_diverged_runs_and_a_single_point_cell(tmp_path, capsys):
    """Diverged runs (inf) at every cell's highest lr and a cell with one point: the search and
    the baselines still finish, and --json stays strict JSON (inf written as a string)."""
    df = synthetic.moe_release(5, follows="N", bowls=synthetic.BOWLS)
    hi = df.groupby(["moe_name", "D"])["lr"].transform("max")
    df.loc[df.lr == hi, "smooth loss"] = np.inf
    one = (df.moe_name == "e8k3") & (df.D == 2e9)
    df = df[~one | df.index.isin(df[one].index[:1])]
    path = tmp_path / "edge.csv"
    df.to_csv(path, index=False)
    assert main(["--data", str(path), "--json"]) == 0
    doc = json.loads(capsys.readouterr().out, parse_constant=lambda c: pytest.fail(c))
    assert len(doc["cells"]) == 16 and min(c["runs"] for c in doc["cells"]) == 1
    assert all(math.isfinite(c["loss"]) for c in doc["cells"])  # never chooses a diverged run
    assert doc["baselines"]["steplaw"]["max_gap_permille"] == "inf"  # the law's point diverged


def test_equal_n_moe_shapes_are_separate_models(tmp_path):
    """build_grid names each cell's model (everything in the cell key but D): the 89- and
    88-expert shapes share total N and must still be two models, four cells each."""
    grids = build_grid(read_table(str(_moe_csv(tmp_path, seed=4))))
    by_model: dict[str, set[float]] = {}
    for g in grids:
        assert g.cell.model and "D=" not in g.cell.model
        by_model.setdefault(g.cell.model, set()).add(g.cell.d)
    assert len(by_model) == 4 and all(len(ds) == 4 for ds in by_model.values())
    assert len({g.cell.n_law for g in grids}) == 3  # two shapes share N
