"""The run store (`runs_root`): sweeps sharing runs train each once, and `cancel`.

Real tiny training runs (megatron-core on the CPU) through the local and debug launchers; the
SLURM side of cancel is in tests/test_slurm.py.
"""

from __future__ import annotations

import io
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

from analysis import collect
from launch.status import sweep_states
from steplaw_train import checkpoint as ckpt
from steplaw_train import rundir
from steplaw_train.spec import SpecError
from steplaw_train.sweep import cancel as cancel_mod
from steplaw_train.sweep import status as status_cli
from steplaw_train.sweep import sweep
from tests.conftest import tiny_sweep_cfg

REPO = Path(__file__).resolve().parents[1]
# two grids sharing the lr=0.004 run; the shared run is each grid's first
GRID_A = "grid.blocks=[{model:[demo_dense_small],tokens:[4096],lr:[0.004,0.002],batch_size:[4]}]"
GRID_B = "grid.blocks=[{model:[demo_dense_small],tokens:[4096],lr:[0.004,0.008],batch_size:[4]}]"


@pytest.fixture(autouse=True)
def one_thread(monkeypatch):
    """Offline wandb and the shared demo data root come from conftest.py."""
    monkeypatch.setenv("OMP_NUM_THREADS", "1")


def cfg_for(sweep_dir, data_root, grid, *overrides):
    return tiny_sweep_cfg(
        sweep_dir, data_root, grid, f"grid.name={Path(sweep_dir).name}", *overrides
    )


def sweep_cmd(sweep_dir, data_root, grid, *overrides):
    return [
        sys.executable,
        "-m",
        "steplaw_train.sweep",
        "+grid=tiny",
        grid,
        f"grid.name={Path(sweep_dir).name}",
        f"sweep_dir={sweep_dir}",
        f"options.data_root={data_root}",
        *overrides,
    ]


ENV = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1", "WANDB_MODE": "offline"}


def attempts(run_dir: Path) -> list[dict]:
    return json.loads((run_dir / "launch.json").read_text())["attempts"]


def test_two_sweeps_sharing_a_run_train_it_once_and_the_analysis_counts_it_once(
    tmp_path, data_root
):
    """Acceptance: two local sweeps started at the same moment, different grids, one shared
    run_id that each wants to start first. The store's claim lets one sweep start it; the other
    sees it running elsewhere and moves on."""
    a, b = tmp_path / "sweeps" / "grid_a", tmp_path / "sweeps" / "grid_b"
    over = ("launcher=local", "launcher.parallelism=1")
    procs = [
        subprocess.Popen(
            sweep_cmd(sw, data_root, grid, *over),
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            env=ENV,
        )
        for sw, grid in ((a, GRID_A), (b, GRID_B))
    ]
    outs = [p.communicate(timeout=600) for p in procs]
    for p, (_, err) in zip(procs, outs, strict=True):
        assert p.returncode == 0, err[-3000:]
    store = tmp_path / "sweeps" / "runs"
    run_dirs = sorted(p for p in store.iterdir() if p.is_dir())
    assert len(run_dirs) == 3  # 2 + 2 grid points, one shared
    for run_dir in run_dirs:
        assert len(attempts(run_dir)) == 1, run_dir  # trained once, by one sweep
        steps = [json.loads(x)["step"] for x in (run_dir / "metrics.jsonl").open()]
        assert steps == sorted(set(steps)), run_dir  # no second trainer's lines
        assert json.loads((run_dir / "result.json").read_text())["status"] == "done"
    shared = (set(os.listdir(a / "runs")) & set(os.listdir(b / "runs"))).pop()
    for sw in (a, b):
        link = sw / "runs" / shared
        assert link.is_symlink() and link.resolve() == (store / shared).resolve()
        assert not os.path.isabs(os.readlink(link))  # relative: the tree can move
        counts = status_cli.summary(sw)[0]
        assert (counts["done"], counts["total"], counts["shared"]) == (2, 2, 1)
    submitted = [
        json.loads(x)["run_ids"] for sw in (a, b) for x in (sw / "submissions.jsonl").open()
    ]
    assert sorted(r for ids in submitted for r in ids) == sorted(p.name for p in run_dirs)

    # reruns submit nothing; the dry-run table of either says everything is finished
    for sw, grid in ((a, GRID_A), (b, GRID_B)):
        buf = io.StringIO()
        assert sweep(cfg_for(sw, data_root, grid, "launcher=debug"), out=buf).submitted == ()
        assert "2 runs in 1 cells; 0 to submit" in buf.getvalue()

    # the analysis: both sweep dirs, or the tree holding them and the store: 3 runs, not 4
    both = collect.load([a, b])
    assert len(both) == 3 and both["run_id"].is_unique
    tree = collect.collect_runs(tmp_path / "sweeps")
    assert sorted(tree["run_id"]) == sorted(both["run_id"])
    assert len(collect.collect_runs(a)) == 2
    out = tmp_path / "report"
    p = subprocess.run(
        [sys.executable, "-m", "analysis", "report", str(a), str(b), "--out", str(out)]
        + ["--no-figures", "--quiet", "--n-boot", "10"],
        capture_output=True,
        text=True,
        env=ENV,
        cwd=REPO,
        timeout=300,
    )
    assert p.returncode == 0, p.stderr[-2000:]
    assert json.loads((out / "summary.json").read_text())["runs"]["total"] == 3


def test_a_sweep_dir_made_before_the_store_is_used_in_place_and_shared(tmp_path, data_root):
    """A sweep dir with real runs/<id> directories (the old layout: runs_root=<sweep>/runs) is
    not moved: rerun with the store, its runs are adopted (the store links to them) and another
    sweep sharing a run finds it finished instead of training it."""
    old, new = tmp_path / "sweeps" / "old", tmp_path / "sweeps" / "new"
    first = sweep(cfg_for(old, data_root, GRID_A, "launcher=debug", f"runs_root={old}/runs"))
    assert len(first.submitted) == 2
    for rid in first.submitted:
        assert not (old / "runs" / rid).is_symlink()
    again = sweep(cfg_for(old, data_root, GRID_A, "launcher=debug"))  # default store now
    assert again.submitted == ()
    store = tmp_path / "sweeps" / "runs"
    for rid in first.submitted:
        assert (old / "runs" / rid).is_dir() and not (old / "runs" / rid).is_symlink()
        assert (store / rid).is_symlink() and (store / rid).resolve() == (old / "runs" / rid)
    res = sweep(cfg_for(new, data_root, GRID_B, "launcher=debug"))
    assert len(res.submitted) == 1  # lr 0.008 only: 0.004 was finished by the old sweep
    shared = set(first.submitted) - set(res.submitted) & set(os.listdir(new / "runs"))
    (rid,) = shared
    assert len(attempts(old / "runs" / rid)) == 1
    assert status_cli.summary(new)[0]["done"] == 2
    assert len(collect.collect_runs(tmp_path / "sweeps")) == 3


def test_a_run_trained_outside_any_sweep_is_running_elsewhere_not_resubmitted(tmp_path, data_root):
    """A live trainer holds the run dir's lock and no sweep has an attempt for it (a run started
    by hand, or another host's local sweep): status says running, the sweep skips it, also
    when the launcher re-checks under the store's claim right before starting it."""
    sw = tmp_path / "sweeps" / "one"
    grid = "grid.blocks=[{model:[demo_dense_small],tokens:[4096],lr:[0.004],batch_size:[4]}]"
    cfg = cfg_for(sw, data_root, grid, "launcher=debug")
    spec = sweep(cfg_for(sw, data_root, grid, "launcher=debug", "dry_run=true")).specs[0]
    run_dir = tmp_path / "sweeps" / "runs" / spec.run_id
    hold = (
        "import sys, time\nfrom pathlib import Path\nfrom steplaw_train import rundir\n"
        "with rundir.owned(Path(sys.argv[1])):\n    print('locked', flush=True)\n"
        "    time.sleep(600)\n"
    )
    holder = subprocess.Popen(
        [sys.executable, "-c", hold, str(run_dir)], stdout=subprocess.PIPE, text=True, env=ENV
    )
    try:
        assert holder.stdout.readline().strip() == "locked"
        (st,) = sweep_states(sw, [spec.run_id], run_dir.parent)
        assert st.state == "running" and f"pid {holder.pid}" in st.detail
        res = sweep(cfg)
        assert res.submitted == () and res.failed == ()
        from steplaw_train.sweep.common import setup_from_cfg

        setup = setup_from_cfg(cfg)
        buf = io.StringIO()
        sub = setup.launcher.submit([spec], out=buf)  # the claim-time re-check
        assert sub.run_ids == () and sub.skipped == ((spec.run_id, "running"),)
        assert "running elsewhere" in buf.getvalue()
        assert not (run_dir / "launch.json").exists()
    finally:
        holder.kill()
        holder.wait()
    (st,) = sweep_states(sw, [spec.run_id], run_dir.parent)
    assert st.state == "pending"


def test_runs_root_inside_the_sweep_dir_or_around_it_is_refused(tmp_path, data_root):
    sw = tmp_path / "sw"
    with pytest.raises(SpecError, match=r"runs_root: .* is inside the sweep dir"):
        sweep(cfg_for(sw, data_root, GRID_A, "dry_run=true", f"runs_root={sw}/store"))
    with pytest.raises(SpecError, match=r"sweep_dir: .* is inside the run store"):
        sweep(cfg_for(sw, data_root, GRID_A, "dry_run=true", f"runs_root={tmp_path}"))
    assert not sw.exists()


LONG = "grid.blocks=[{model:[demo_dense_small],tokens:[204800],lr:[0.003],batch_size:[4]}]"


def test_cancel_stops_a_local_run_resumably_and_undo_resumes_it(tmp_path, data_root):
    """A local run killed mid-way by `cancel`: it checkpoints and stops, the sweep says
    cancelled (not failed), reruns skip it, `cancel --undo` + a rerun resumes it."""
    sw = tmp_path / "sweeps" / "long"
    over = ("launcher=local", "options.checkpoint_interval=10")
    proc = subprocess.Popen(
        sweep_cmd(sw, data_root, LONG, *over),
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=ENV,
    )
    deadline = time.monotonic() + 180
    run_dir = None
    while run_dir is None or not list(run_dir.glob("checkpoints/*/complete")):
        assert proc.poll() is None, proc.communicate()[1][-3000:]
        assert time.monotonic() < deadline, "no checkpoint written"
        found = list((sw / "runs").glob("*/launch.json")) if (sw / "runs").exists() else []
        run_dir = found[0].parent if found else None
        time.sleep(0.2)
    rid = run_dir.name
    dry = subprocess.run(
        [sys.executable, "-m", "steplaw_train.sweep.cancel", str(sw), "--cell", "demo_dense_small"]
        + ["--dry-run"],
        capture_output=True,
        text=True,
        env=ENV,
        timeout=120,
    )
    assert dry.returncode == 0 and "sigterm" in dry.stdout and "would cancel 1" in dry.stdout
    assert not (sw / rundir.CANCELLED).exists()
    p = subprocess.run(
        [sys.executable, "-m", "steplaw_train.sweep.cancel", str(sw), "--run", rid],
        capture_output=True,
        text=True,
        env=ENV,
        timeout=120,
    )
    assert p.returncode == 0, p.stderr
    out, err = proc.communicate(timeout=120)
    assert proc.returncode == 0, err[-3000:]  # cancelled is not a failure
    assert f"{rid}" in err and "cancelled" in err
    assert not (run_dir / "result.json").exists()
    assert attempts(run_dir)[-1]["state"] == "preempted"
    stopped_at = [json.loads(x)["step"] for x in (run_dir / "metrics.jsonl").open()][-1]
    assert 0 < stopped_at < 400
    ck = ckpt.latest_step(run_dir)
    assert ck is not None and ck > 0
    kept = [x for x in (run_dir / "metrics.jsonl").open() if json.loads(x)["step"] <= ck]
    counts = status_cli.summary(sw)[0]
    assert (counts["cancelled"], counts["preempted"]) == (1, 0)

    buf = io.StringIO()
    assert sweep(cfg_for(sw, data_root, LONG, *over), out=buf).submitted == ()
    assert "1 runs cancelled, not submitted" in buf.getvalue()

    cancel_mod.cancel(sw, runs=[rid], undo=True, out=io.StringIO())
    (st,) = sweep_states(sw, [rid])
    assert st.state == "preempted"
    res = sweep(cfg_for(sw, data_root, LONG, *over))
    assert res.submitted == (rid,) and res.failed == ()
    steps = [json.loads(x)["step"] for x in (run_dir / "metrics.jsonl").open()]
    assert steps == sorted(set(steps)) and steps[-1] == 400  # resumed, not restarted twice
    assert len(attempts(run_dir)) == 2
    # resumed from the checkpoint: the lines logged before it are untouched (a restart from
    # scratch rewrites them, with other timings)
    assert (run_dir / "metrics.jsonl").read_text().splitlines(keepends=True)[: len(kept)] == kept
    assert json.loads((run_dir / "result.json").read_text())["status"] == "done"


def test_cancel_of_a_live_shared_run_needs_force(tmp_path):
    """Pure bookkeeping (no training): a live run another sweep also lists is refused without
    --force, and nothing is recorded; a pending one is recorded without it."""
    from launch.executors import record_attempt

    store = tmp_path / "sweeps" / "runs"
    dirs = [tmp_path / "sweeps" / n for n in ("a", "b")]
    for sw in dirs:
        rundir.write_manifest(
            sw, {"grid": sw.name, "run_ids": ["r1", "r2"], "runs_root": "../runs"}
        )
        rundir.register_sweep(store, sw)
        for r in ("r1", "r2"):
            rundir.link_run(sw, store, r)
    from launch.status import process_start_time

    child = subprocess.Popen(["sleep", "120"])  # stands for another sweep's local trainer
    try:
        pid = child.pid
        record_attempt(
            store / "r1",
            {
                "executor": "local",
                "job_id": str(pid),
                "pid": pid,
                "pid_start": process_start_time(pid),
            },
        )
        with pytest.raises(SpecError, match=r"--force: 1 selected runs are live and also in"):
            cancel_mod.cancel(dirs[0], runs=["r1"], out=io.StringIO())
        assert child.poll() is None  # not signalled
        _check_pending_cancel(dirs, store)
        forced = cancel_mod.cancel(dirs[0], runs=["r1"], force=True, out=io.StringIO())
        assert [(a.run_id, a.kind) for a in forced] == [("r1", "sigterm")]
        assert child.wait(timeout=30) == -15  # SIGTERM reached it
    finally:
        child.kill()
        child.wait()


def _check_pending_cancel(dirs, store):
    assert rundir.read_cancelled(dirs[0]) == {}
    actions = cancel_mod.cancel(dirs[0], runs=["r2"], out=io.StringIO())
    assert [(a.run_id, a.kind) for a in actions] == [("r2", "record")]
    assert set(rundir.read_cancelled(dirs[0])) == {"r2"} and rundir.read_cancelled(dirs[1]) == {}
    states = {s.run_id: s.state for s in sweep_states(dirs[0], ["r1", "r2"], store)}
    assert states == {"r1": "running", "r2": "cancelled"}
    assert {s.state for s in sweep_states(dirs[1], ["r2"], store)} == {"pending"}
    with pytest.raises(SpecError, match=r"--cell: 'nope' matches no cell"):
        cancel_mod.cancel(dirs[0], cells=["nope"], out=io.StringIO())
    with pytest.raises(SpecError, match=r"--run: not runs of this sweep: \['zz'\]"):
        cancel_mod.cancel(dirs[0], runs=["zz"], out=io.StringIO())


def test_the_analysis_follows_links_once_and_counts_each_run_id_once(tmp_path):
    """No training: synthetic run dirs. A store, two sweep dirs linking into it, a link back up
    the tree (must not loop), and an old sweep's own copy of a run_id the store also has
    (unfinished there, finished here: the finished one is the row)."""
    import numpy as np

    from analysis import synthetic

    rng = np.random.default_rng(0)
    store = tmp_path / "sweeps" / "runs"
    specs = [synthetic.make_spec(64, 2, lr, 4, 64_000) for lr in (1e-3, 2e-3, 4e-3)]
    for spec in specs[:2]:
        synthetic.write_run(store, spec, 3.0, rng=rng)
    synthetic.write_run(store, specs[2], 3.0, rng=rng, result=False)
    for name, idx in (("a", (0, 1)), ("b", (1, 2))):
        for i in idx:
            rundir.link_run(tmp_path / "sweeps" / name, store, specs[i].run_id)
    (tmp_path / "sweeps" / "a" / "loop").symlink_to("..")
    old = tmp_path / "sweeps" / "old" / "runs"
    copy = synthetic.write_run(old, specs[2], 3.1, rng=rng)  # finished in the old sweep's copy
    tree = collect.collect_runs(tmp_path / "sweeps")
    assert sorted(tree["run_id"]) == sorted(s.run_id for s in specs)
    row = tree.set_index("run_id").loc[specs[2].run_id]
    assert row["status"] == "done" and copy.name == specs[2].run_id
    both = collect.load([tmp_path / "sweeps" / "a", tmp_path / "sweeps" / "b"])
    assert len(both) == 3 and both["run_id"].is_unique
    assert len(collect.collect_runs(tmp_path / "sweeps" / "b")) == 2
    from steplaw_train import wandb_export

    found = wandb_export.find_run_dirs(tmp_path / "sweeps")
    assert len(found) == 4  # every real run dir once: 3 in the store + the old copy
