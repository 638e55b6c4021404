"""`search=guided` in the real sweep: cells from grid specs, the persisted search, the driver with
real (tiny) training runs on the debug launcher, and the acceptance check against the full grid."""

from __future__ import annotations

import io
import json
import math
import shutil

import pytest

from launch.status import RunStatus
from steplaw_train import rundir
from steplaw_train.search import SearchState
from steplaw_train.spec import SpecError
from steplaw_train.sweep import expand_from_cfg, guided, sweep
from steplaw_train.sweep import status as status_cli
from tests.conftest import tiny_sweep_cfg

# Acceptance grid: one model, one D, 4 LR x 3 BS = 12 runs of 16-64 steps (~1-5 s each).
# Measured with seed 1234 (smooth loss): bs=1 row 3.11 / 2.86 / 2.91 / 3.00 over lr
# 0.004 / 0.008 / 0.016 / 0.032: an interior LR optimum at (0.008, 1).
GRID12 = (
    "grid.blocks=[{model:[demo_dense_small],tokens:[8192],"
    "lr:[0.004,0.008,0.016,0.032],batch_size:[1,2,4]}]"
)
# Driver tests: two cells (two D) of 2 LR x 2 BS, 8-32 steps per run.
GRID2x4 = (
    "grid.blocks=[{model:[demo_dense_small],tokens:[4096,8192],lr:[0.004,0.008],batch_size:[2,4]}]"
)


@pytest.fixture(autouse=True)
def _env(monkeypatch):
    monkeypatch.setenv("OMP_NUM_THREADS", "1")


def cfg_for(sweep_dir, data_root, grid, *overrides):
    return tiny_sweep_cfg(sweep_dir, data_root, grid, "launcher=debug", *overrides)


def saved_state(sweep_dir) -> tuple[SearchState, dict]:
    doc = json.loads((sweep_dir / guided.STATE_FILE).read_text())
    return SearchState.from_json(json.dumps(doc["search"])), doc


def losses(sweep_dir, run_ids):
    return {
        r: json.loads((sweep_dir / "runs" / r / "result.json").read_text())["smooth_loss"]
        for r in run_ids
    }


# ---- pure parts ------------------------------------------------------------------------------
def test_cells_group_seeds_into_points_and_order_points(tmp_path):
    grid = (
        "grid.blocks=[{model:[demo_dense_small,demo_dense],tokens:[4096],lr:[0.004,0.002],"
        "batch_size:[4,2],seed:[1,2]}]"
    )
    specs = expand_from_cfg(cfg_for(tmp_path, tmp_path, grid))
    cells = guided.build_cells(specs)
    assert [g.cell.key for g in cells] == ["demo_dense demo D=4096", "demo_dense_small demo D=4096"]
    for g in cells:
        assert g.cell.points == ((0.002, 2.0), (0.002, 4.0), (0.004, 2.0), (0.004, 4.0))
        assert all([s.train.seed for s in r] == [1, 2] for r in g.runs)
        s = g.runs[0][0]
        assert g.cell.cost == s.Na * s.D * 2 and g.cell.n_law == s.N and g.cell.seq_len == 128
        assert all(
            (s.train.lr, s.train.batch_size) == p
            for r, p in zip(g.runs, g.cell.points, strict=True)
            for s in r
        )
    assert sum(len(r) for g in cells for r in g.runs) == len(specs) == 16


def test_point_loss_and_run_loss():
    assert guided.point_loss([2.0, 4.0]) == 3.0
    assert guided.point_loss([2.0, math.inf]) == math.inf  # a diverged seed: not here
    assert guided.point_loss([2.0, math.nan]) == 2.0
    assert math.isnan(guided.point_loss([math.nan]))
    assert rundir.result_loss({"status": "diverged", "smooth_loss": 1.0}) == math.inf
    assert rundir.result_loss({"status": "done", "smooth_loss": 3.5}) == 3.5
    assert math.isnan(rundir.result_loss({"status": "done", "smooth_loss": None}))


@pytest.mark.parametrize(
    "override, field",
    [
        ("search.prior=law", "search.prior"),
        ("search.batch=0", "search.batch"),
        ("search.parallel_cells=0", "search.parallel_cells"),
        ("search.law_n=M", "search.law_n"),
        ("+search.knobs.tua=1", "search.knobs.tua"),
        ("+search.knobs.tau=-1", "search.knobs.tau"),
        ("+search.colour=1", "search.colour"),
    ],
)
def test_bad_search_config_names_the_field(tmp_path, override, field):
    cfg = cfg_for(tmp_path / "sw", tmp_path, GRID2x4, "search=guided", override)
    with pytest.raises(SpecError) as e:
        sweep(cfg, out=io.StringIO())
    assert e.value.field == field and not (tmp_path / "sw").exists()


def test_resolve_waits_retries_and_gives_up():
    specs = expand_from_cfg(cfg_for("/tmp/x", "/tmp/x", GRID2x4))
    cells = guided.build_cells(specs)
    by_key = {g.cell.key: g for g in cells}
    g = cells[0]
    pend = [guided.Pending(g.cell.key, i, tuple(g.run_ids(i))) for i in range(3)]
    ids = [p.run_ids[0] for p in pend]
    states = {
        ids[0]: RunStatus(ids[0], "done", 1, "1"),
        ids[1]: RunStatus(ids[1], "queued", 1, "2"),
        ids[2]: RunStatus(ids[2], "failed", 1, "3"),
    }
    res = guided.resolve(pend, by_key, states, {ids[0]: 3.0}, False, 1, set())
    assert res.submit == (ids[2],) and res.waiting == 1 and res.failed == ()
    assert [(p.index, v) for p, v in res.results.items()] == [(0, 3.0)]
    states[ids[2]] = RunStatus(ids[2], "failed", 2, "4")  # out of retries: the point is nan
    res = guided.resolve(pend, by_key, states, {ids[0]: 3.0}, False, 1, set())
    assert res.submit == () and res.failed == (ids[2],)
    assert math.isnan(res.results[next(p for p in res.results if p.index == 2)])
    # retry_failed retries once per invocation, not forever
    assert guided.resolve(pend, by_key, states, {}, True, 1, set()).submit == (ids[2],)
    assert guided.resolve(pend, by_key, states, {}, True, 1, {ids[2]}).submit == ()


# ---- the driver on real runs (debug launcher) --------------------------------------------------
def test_guided_driver_runs_rounds_resumes_and_refuses_other_grids(tmp_path, data_root):
    sw = tmp_path / "sw"
    buf = io.StringIO()
    dry = sweep(cfg_for(sw, data_root, GRID2x4, "search=guided", "dry_run=true"), out=buf)
    assert not sw.exists() and "next round:" in buf.getvalue() and dry.submitted == ()

    res = sweep(cfg_for(sw, data_root, GRID2x4, "search=guided"), out=io.StringIO())
    assert res.done and res.failed == ()
    state, doc = saved_state(sw)
    assert state.done and doc["pending"] == [] and doc["rounds"] == len(res.submitted)
    assert len(res.submitted) == sum(c["runs"] for c in res.cells) < 8
    # the cheaper cell (D=4096) is searched first; chosen = the best run the search made in it
    assert [c["cell"] for c in res.cells] == [
        "demo_dense_small demo D=4096",
        "demo_dense_small demo D=8192",
    ]
    got = losses(sw, res.submitted)
    for c, gc in zip(res.cells, guided.build_cells(res.specs), strict=True):
        mine = {r for i in range(len(gc.runs)) for r in gc.run_ids(i)} & set(got)
        assert 1 <= len(mine) == c["runs"] and c["run_ids"][0] in mine
        assert c["loss"] == min(got[r] for r in mine)
    # status sees exactly the runs the search asked for
    counts = status_cli.summary(sw)[0]
    assert (counts["done"], counts["total"], counts["pending"]) == (len(res.submitted),) * 2 + (0,)

    # rerun: nothing to do, same state
    again = sweep(cfg_for(sw, data_root, GRID2x4, "search=guided"), out=io.StringIO())
    assert again.submitted == () and saved_state(sw)[0].to_json() == state.to_json()

    # crash before the last round's run ended: state lost, its run dir gone → rerun redoes just it
    last = res.submitted[-1]
    (sw / guided.STATE_FILE).unlink()
    shutil.rmtree((sw / "runs" / last).resolve())  # the run dir in the store; its link dangles
    redo = sweep(cfg_for(sw, data_root, GRID2x4, "search=guided"), out=io.StringIO())
    assert redo.submitted == (last,) and saved_state(sw)[0].to_json() == state.to_json()

    # another grid in the same dir is refused before anything runs
    other = GRID2x4.replace("0.004,0.008", "0.004,0.006")
    with pytest.raises(SpecError, match="different grid"):
        sweep(cfg_for(sw, data_root, other, "search=guided"), out=io.StringIO())


def test_guided_driver_searches_cells_in_parallel(tmp_path, data_root):
    sw = tmp_path / "sw"
    res = sweep(
        cfg_for(sw, data_root, GRID2x4, "search=guided", "search.parallel_cells=2"),
        out=io.StringIO(),
    )
    assert res.done and res.failed == ()
    rounds = [json.loads(x) for x in (sw / "submissions.jsonl").read_text().splitlines()]
    cells = {
        r: gc.cell.key
        for gc in guided.build_cells(res.specs)
        for i in range(len(gc.runs))
        for r in gc.run_ids(i)
    }
    assert {cells[r] for r in rounds[0]["run_ids"]} == set(cells.values())  # both cells at once
    assert res.rounds == len(rounds) < len(res.submitted)
    assert all(c["state"] == "done" and c["runs"] >= 1 for c in res.cells)


# ---- acceptance: guided vs the full grid on the same real runs ---------------------------------
@pytest.mark.timeout(300)
def test_guided_finds_the_full_grids_optimum_with_fewer_runs(tmp_path, data_root):
    """Guided first, then the full grid in the same sweep dir: the full sweep re-uses guided's runs
    (same specs, same run_ids) and runs the rest, so both see identical losses.

    Tolerance 1% (the upper end of the paper's 0.25-1% plateau): at this scale seed-to-seed
    scatter is far larger (seeds 1, 2, 3, 1234 at lr 0.008, bs 1 gave 3.30, 2.82, 3.07, 2.86;
    at lr 0.016, bs 2: 3.23, 2.77, 3.22, 3.14), so any point within 1% of the grid minimum is
    indistinguishable from it; the search must not do worse than that on the same runs.
    """
    sw = tmp_path / "sw"
    g = sweep(cfg_for(sw, data_root, GRID12, "search=guided"), out=io.StringIO())
    assert g.done and g.failed == ()
    [cell] = g.cells
    full = sweep(cfg_for(sw, data_root, GRID12), out=io.StringIO())
    assert full.failed == () and len(full.specs) == 12
    assert set(full.submitted).isdisjoint(g.submitted)  # guided's runs were re-used
    assert len(g.submitted) + len(full.submitted) == 12
    grid = losses(sw, [s.run_id for s in full.specs])
    assert len(g.submitted) < len(grid) and cell["runs"] == len(g.submitted)
    best = min(grid.values())
    chosen = grid[cell["run_ids"][0]]
    assert chosen == cell["loss"] and chosen <= best * 1.01, (chosen, best, cell)
    print(
        f"\nguided (steplaw): {len(g.submitted)}/12 runs, chosen lr={cell['lr']} bs={cell['bs']} "
        f"loss {chosen:.4f}; grid min {best:.4f}"
    )

    # prior none on the same finished runs (a copy without the search state): nothing is trained,
    # the search reads the runs it asks for; it must also stop early near the optimum. A lone cell
    # has the sweep's mean run cost, so the search's neighbour check (meant for the cheap first
    # cells) is off by default; with no law to start from, it must be on: with the defaults this
    # grid's search stops at lr 0.032, bs 1 (4 runs, 5% above the minimum: docs/sweeps.md).
    other = tmp_path / "none"
    shutil.copytree(sw, other, symlinks=True)
    (other / guided.STATE_FILE).unlink()
    n = sweep(
        cfg_for(
            other,
            data_root,
            GRID12,
            "search=guided",
            "search.prior=none",
            "+search.knobs.neighbour_cost=1",
        ),
        out=io.StringIO(),
    )
    [cell] = n.cells
    assert n.done and n.submitted == () and cell["runs"] < 12
    assert grid[cell["run_ids"][0]] <= best * 1.01, (cell, best)
    print(f"guided (none): {cell['runs']}/12 runs, chosen lr={cell['lr']} bs={cell['bs']}")


# ---- SLURM: each invocation advances one round; wait=true polls to the end ----------------------
def _cluster_up() -> bool:
    import subprocess

    try:
        return subprocess.run(["scontrol", "ping"], capture_output=True, timeout=10).returncode == 0
    except (OSError, subprocess.SubprocessError):
        return False


@pytest.mark.slurm
@pytest.mark.timeout(400)
def test_guided_on_slurm_returns_after_each_round_then_waits(tmp_path, data_root, monkeypatch):
    if not _cluster_up():
        pytest.skip("no SLURM cluster reachable (start one with sudo .ci/slurm-up.sh)")
    for var in ("WANDB_DIR", "WANDB_CACHE_DIR", "WANDB_CONFIG_DIR"):
        monkeypatch.setenv(var, str(tmp_path / "wandb"))  # jobs inherit the environment
    sw, grid = tmp_path / "sw", GRID2x4.replace("tokens:[4096,8192]", "tokens:[4096]")
    over = ("launcher=slurm", "search=guided", "++launcher.signal_delay_s=30", "allow_dirty=true")
    first = sweep(cfg_for(sw, data_root, grid, *over), out=io.StringIO())
    assert not first.done and len(first.submitted) == 1 and first.batch_calls == 1
    again = sweep(cfg_for(sw, data_root, grid, *over), out=io.StringIO())
    assert again.submitted == () and not again.done  # its round is still queued or running
    last = sweep(
        cfg_for(sw, data_root, grid, *over, "search.wait=true", "search.poll_s=2"),
        out=io.StringIO(),
    )
    assert last.done and last.failed == ()
    [cell] = last.cells
    assert 1 <= cell["runs"] <= 2 and status_cli.summary(sw)[0]["done"] == cell["runs"]
