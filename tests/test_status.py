"""The status CLI's progress view (cells, steps, device-hours spent and left, per-run JSON, watch)
and the MFU calibration from finished runs (launch/usage.py) that it and the dry run use."""

from __future__ import annotations

import io
import json
import math
import shutil

import pytest

from launch import usage
from launch.resources import ResourceModel, device_hours, resource_model
from steplaw_train import rundir
from steplaw_train.spec import RunSpec
from steplaw_train.sweep import status as status_cli
from steplaw_train.sweep import sweep
from tests.conftest import tiny_sweep_cfg

BLOCK = "grid.blocks=[{model:[demo_dense_small],tokens:[4096],lr:[0.002,0.004],batch_size:[4]}]"


@pytest.fixture(autouse=True)
def one_thread(monkeypatch):
    """Offline wandb comes from conftest.py (the module's fixture sweep sets its own)."""
    monkeypatch.setenv("OMP_NUM_THREADS", "1")


def cfg_for(sweep_dir, data_root, *overrides):
    # runs_root: the sweep's own runs, which copy_of copies
    return tiny_sweep_cfg(sweep_dir, data_root, BLOCK, f"runs_root={sweep_dir}/runs", *overrides)


@pytest.fixture(scope="module")
def finished(tmp_path_factory):
    """A sweep of two tiny runs trained to the end (debug launcher); tests copy it."""
    root = tmp_path_factory.mktemp("status")
    sw = root / "sw"
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("WANDB_MODE", "offline")
        mp.setenv("WANDB_DIR", str(root / "wandb"))
        res = sweep(cfg_for(sw, root / "data", "launcher=debug"), out=io.StringIO())
    assert len(res.submitted) == 2 and res.failed == ()
    return sw, root / "data", res


def copy_of(finished, tmp_path):
    sw, data, res = finished
    dst = tmp_path / "sw"
    shutil.copytree(sw, dst, symlinks=True)
    return dst, data, res


def interrupt(sw, run_id, keep_steps):
    """Make a finished run look stopped part-way: no result.json, metrics up to keep_steps."""
    run_dir = rundir.run_dir(sw, run_id)
    rundir.result_path(run_dir).unlink()
    rundir.truncate_metrics(run_dir, keep_steps)
    return rundir.read_metrics(run_dir)[-1]


def test_json_has_counts_cells_runs_and_hours(finished, tmp_path, capsys):
    sw, _, res = copy_of(finished, tmp_path)
    status_cli.main([str(sw), "--json"])
    doc = json.loads(capsys.readouterr().out)
    assert (doc["done"], doc["pending"], doc["total"], doc["submitted_last"]) == (2, 0, 2, 2)
    assert doc["unit"] == "CPU-h"  # the tiny grid's resources: gpus_per_node 0
    runs = {r["run_id"]: r for r in doc["runs"]}
    assert set(runs) == set(res.submitted)
    spent = 0.0
    for rid, r in runs.items():
        result = json.loads((sw / "runs" / rid / "result.json").read_text())
        threads = int(result["device"].split("(")[1].split()[0])  # "cpu (1 threads)"
        assert r["state"] == "done" and r["attempts"] == 1 and r["job_id"]
        assert r["steps"] == r["planned_steps"] == result["steps"]
        assert r["devices"] == threads
        assert r["device_hours_spent"] == pytest.approx(result["wall_time_s"] * threads / 3600)
        assert r["device_hours_remaining"] == 0
        assert r["cell"] == {"model": "demo_dense_small", "recipe": "demo", "D": 4096}
        spent += r["device_hours_spent"]
    (cell,) = doc["cells"]
    assert cell["runs"] == 2 and cell["states"] == {"done": 2} and cell["fraction"] == 1.0
    assert cell["steps"] == cell["planned_steps"] == sum(r["steps"] for r in runs.values())
    assert doc["device_hours"]["spent"] == pytest.approx(spent) and spent > 0
    assert doc["device_hours"]["remaining"] == 0
    assert doc["mfu"]["runs"] == 2 and doc["mfu"]["per_model"]["demo_dense_small"]["runs"] == 2


def test_an_unfinished_run_shows_its_progress_and_what_it_still_needs(finished, tmp_path, capsys):
    sw, _, res = copy_of(finished, tmp_path)
    victim, other = res.submitted
    last = interrupt(sw, victim, keep_steps=3)
    rep = status_cli.report(sw)
    runs = {r["run_id"]: r for r in rep.runs()}
    v = runs[victim]
    assert v["state"] == "preempted"  # its debug job ended without a result
    assert (v["steps"], v["tokens"]) == (3, last["tokens"])
    assert v["device_hours_spent"] == pytest.approx(last["elapsed_s"] * v["devices"] / 3600)
    # what it still needs: its estimate at the calibrated MFU (from the one finished run) times
    # the share of tokens left
    rm = resource_model(
        {"gpus_per_node": 0, "peak_tflops": 0.05, "mfu": 0.5}
    )  # the tiny grid's resources, as config.yaml recorded them
    assert status_cli.sweep_resources(sw) == rm
    spec = RunSpec.from_dict(rundir.read_spec(rundir.run_dir(sw, victim))["spec"])
    (mfu_other,) = [u.mfu for u in rep.usages if u.run_id == other]
    cal = usage.calibrate([(spec.model, mfu_other)], rm.mfu, rm.mfu_prior_sd, "CPU")
    want = device_hours(spec, rm) * rm.mfu / cal.estimate(spec.model).mfu
    assert v["device_hours_remaining"] == pytest.approx(want * (1 - last["tokens"] / spec.D))
    assert rep.hours()["remaining"] == pytest.approx(v["device_hours_remaining"])
    (cell,) = rep.cells()
    assert cell["states"] == {"done": 1, "preempted": 1}
    assert cell["fraction"] == pytest.approx((spec.D + last["tokens"]) / (2 * spec.D))
    status_cli.main([str(sw)])
    text = capsys.readouterr().out
    assert text.splitlines()[0].startswith("done=1  diverged=0  failed=0  preempted=1")
    assert f"{victim}  preempted" in text and f"step 3/{spec.iterations}" in text
    assert "CPU-h spent" in text and "remaining ~" in text


def test_a_state_status_does_not_know_is_shown_not_dropped(finished, tmp_path):
    """Launchers may add states (e.g. cancelled): counted and listed generically, planning
    nothing further."""
    sw, _, res = copy_of(finished, tmp_path)
    from launch import status as run_status

    counts = status_cli.state_counts(
        [run_status.RunStatus(res.submitted[0], "cancelled", 1, "7"), *[]]
    )
    assert counts["cancelled"] == 1 and set(run_status.STATES) <= set(counts)
    u = usage.run_usage(rundir.run_dir(sw, res.submitted[0]), res.submitted[0], "cancelled", rm0())
    cal = usage.calibrate((), 0.5, 0.3, "CPU")
    assert usage.remaining_hours(u, "cancelled", cal, rm0()) == 0.0


def rm0() -> ResourceModel:
    return ResourceModel(gpus_per_node=0, peak_tflops=0.05, mfu=0.5)


def test_status_of_many_runs_stays_fast(finished, tmp_path):
    """4,200-run sweeps: every run is read cheaply (the metrics file's last line only)."""
    import time

    sw, _, res = copy_of(finished, tmp_path)
    src = rundir.run_dir(sw, res.submitted[0])
    ids = [f"r{i:05d}" for i in range(1000)]
    for i, rid in enumerate(ids):
        dst = rundir.run_dir(sw, rid)
        shutil.copytree(src, dst, ignore=shutil.ignore_patterns("checkpoints", "wandb"))
        if i % 2:  # half of them unfinished, with a long metrics file
            rundir.result_path(dst).unlink()
            line = (rundir.metrics_path(dst).read_text().splitlines()[-1] + "\n").encode()
            rundir.metrics_path(dst).write_bytes(line * 500)
    manifest = rundir.read_manifest(sw)
    rundir.write_manifest(sw, {**manifest, "run_ids": ids})
    t0 = time.perf_counter()
    rep = status_cli.report(sw)
    elapsed = time.perf_counter() - t0
    assert rep.counts["done"] == 500 and rep.counts["preempted"] == 500
    assert elapsed < 10, elapsed  # 0.4 s idle; 4,200 runs with 4 MB metrics files: 1.4 s


# ---- watch -------------------------------------------------------------------------------------
def test_watch_redraws_until_no_run_is_active(finished, tmp_path):
    from rich.console import Console

    sw, _, res = copy_of(finished, tmp_path)
    buf = io.StringIO()
    console = Console(file=buf, force_terminal=True, width=220, color_system=None)
    # a run of the sweep that is "running": a local attempt whose pid is this very process
    import os

    from launch.executors import record_attempt
    from launch.status import process_start_time

    victim = res.submitted[0]
    interrupt(sw, victim, keep_steps=2)
    run_dir = rundir.run_dir(sw, victim)
    record_attempt(
        run_dir,
        {
            "executor": "local",
            "job_id": str(os.getpid()),
            "pid": os.getpid(),
            "pid_start": process_start_time(os.getpid()),
        },
    )
    frames = []

    def sleep(seconds):  # between two views, the run logs more steps, then ends
        frames.append(buf.getvalue())
        if len(frames) == 1:
            rec = rundir.read_metrics(run_dir)[-1]
            rundir.append_jsonl(rundir.metrics_path(run_dir), {**rec, "step": 6})
        else:
            record_attempt(run_dir, {"state": "preempted"}, update_last=True)

    drawn = status_cli.watch(sw, 0.01, console=console, sleep=sleep)
    text = buf.getvalue()
    assert drawn == 3  # running, running further, then ended: the watch stops by itself
    assert "running=1" in frames[0] and "step 2/" in frames[0]
    assert "step 6/" in frames[1][len(frames[0]) :]  # the second view is a new frame
    assert "preempted=1" in text[len(frames[1]) :] and "running=0" in text[len(frames[1]) :]
    # a bounded watch through the CLI's hidden argument, on an ended sweep: one view
    assert status_cli.watch(sw, 0.01, iterations=5, console=console, sleep=sleep) == 1


def test_watch_cli_refuses_a_non_positive_interval(tmp_path, capsys):
    with pytest.raises(SystemExit) as e:
        status_cli.main([str(tmp_path), "--watch", "0"])
    assert e.value.code == 2 and "--watch" in capsys.readouterr().err


# ---- metrics' last line ------------------------------------------------------------------------
def test_last_metrics_line_is_read_from_the_end(tmp_path):
    run_dir = tmp_path / "r"
    run_dir.mkdir()
    assert rundir.read_last_metrics(run_dir) is None  # no file
    rundir.metrics_path(run_dir).write_text("")
    assert rundir.read_last_metrics(run_dir) is None
    rows = [{"step": i, "tokens": 100 * i, "pad": "x" * 5000} for i in range(1, 30)]
    text = "".join(json.dumps(r) + "\n" for r in rows)
    rundir.metrics_path(run_dir).write_text(text + '{"step": 30, "tok')  # torn by a kill
    assert rundir.read_last_metrics(run_dir, chunk=64)["step"] == 29  # lines > chunk
    assert rundir.read_last_metrics(run_dir)["step"] == 29
    assert rundir.read_last_metrics(run_dir) == rundir.read_metrics(run_dir)[-1]


# ---- calibration -------------------------------------------------------------------------------
def _model(name: str, hidden: int = 64):
    from steplaw_train.spec import ModelSpec

    return ModelSpec(name=name, hidden=hidden, ffn_hidden=4 * hidden, heads=4, layers=2)


def test_calibration_shrinks_measurements_toward_the_assumed_mfu():
    a, b, c = _model("a", 64), _model("b", 128), _model("c", 256)
    nothing = usage.calibrate((), 0.35, 0.3)
    assert nothing.runs == 0 and nothing.estimate(a).mfu == pytest.approx(0.35)
    wide = math.sqrt(0.3**2 + usage.BETWEEN_SD0**2)
    assert nothing.estimate(a).high == pytest.approx(0.35 * math.exp(usage.Z90 * wide))
    one = usage.calibrate([(a, 0.20)], 0.35, 0.3)
    e1 = one.estimate(a)
    assert 0.20 < e1.mfu < 0.35 and e1.runs == 1  # one run moves it, not all the way
    many = usage.calibrate([(a, 0.20 * f) for f in (0.98, 1.0, 1.02)] * 4, 0.35, 0.3)
    e12 = many.estimate(a)
    assert abs(e12.mfu - 0.20) < abs(e1.mfu - 0.20) and e12.mfu == pytest.approx(0.2, rel=0.05)
    assert e12.low < 0.2 < e12.high and (e12.high - e12.low) < (e1.high - e1.low)
    other = many.estimate(c)  # never measured: the pooled posterior, widened
    assert other.runs == 0 and e12.mfu < other.mfu < 0.35
    assert (other.high / other.low) > (e12.high / e12.low)
    two = usage.calibrate([(a, 0.2)] * 5 + [(b, 0.4)] * 5, 0.35, 0.3)
    assert two.estimate(a).mfu < two.estimate(c).mfu < two.estimate(b).mfu
    assert "from 10 finished GPU runs of 2 model(s)" in two.describe()


def test_cpu_runs_never_calibrate_a_gpu_estimate_nor_the_reverse(finished):
    sw, _, res = finished
    run_dir = rundir.run_dir(sw, res.submitted[0])
    spec = RunSpec.from_dict(rundir.read_spec(run_dir)["spec"])
    result = rundir.read_result(run_dir)
    gpu_rm, cpu_rm = ResourceModel(), rm0()
    assert usage.measured_mfu(spec, result, 1, gpu_rm) is None
    assert usage.calibration_from_dir(sw, gpu_rm).runs == 0
    cpu = usage.measured_mfu(spec, result, 1, cpu_rm)
    want = result["tokens"] / result["wall_time_s"] * usage.flops.run_flops_per_token(spec)
    assert cpu == pytest.approx(want / 0.05e12)
    assert usage.calibration_from_dir(sw, cpu_rm).runs == 2
    on_gpu = {**result, "device": "NVIDIA H100 80GB HBM3"}
    assert usage.measured_mfu(spec, on_gpu, 4, cpu_rm) is None
    assert usage.measured_mfu(spec, on_gpu, 4, gpu_rm) == pytest.approx(want / (4 * 989e12))
    assert usage.measured_mfu(spec, {**on_gpu, "device": "Some GPU"}, 4, gpu_rm) is None


def test_the_dry_run_table_shows_the_calibrated_hours_and_their_range(finished, tmp_path):
    sw, data, res = copy_of(finished, tmp_path)
    more = "grid.blocks=[{model:[demo_dense_small],tokens:[4096],lr:[0.002,0.004,0.008],batch_size:[4]}]"
    buf = io.StringIO()
    dry = sweep(cfg_for(sw, data, "launcher=debug", "dry_run=true", more), out=buf)
    text = dry.table
    assert "MFU calibrated from 2 finished CPU runs of 1 model(s), prior 0.5" in text
    cal = usage.calibration_from_dir(sw, rm0())
    e = cal.estimate(dry.specs[0].model)
    hours = [cal.hours(s, rm0()) for s in dry.specs]
    row = text.splitlines()[2].split()
    assert float(row[8]) == pytest.approx(sum(h[0] for h in hours), rel=0.01)
    lo, hi = row[9].split("-")
    assert float(lo) == pytest.approx(sum(h[1] for h in hours), rel=0.05)
    assert float(hi) == pytest.approx(sum(h[2] for h in hours), rel=0.05)
    assert row[10] == f"{e.mfu:.2g}(2)"
    assert sum(h[0] for h in hours) == pytest.approx(
        sum(device_hours(s, rm0()) for s in dry.specs) * 0.5 / e.mfu
    )
    # the walltimes are not moved by the calibration (what is submitted stays the same)
    assert row[-1] == "1cpu/15min"


def test_watch_through_the_cli_draws_a_view_of_an_ended_sweep(finished, tmp_path, capsys):
    sw, _, _ = copy_of(finished, tmp_path)
    status_cli.main([str(sw), "--watch", "0.01", "--watch-iterations", "3"])
    out = capsys.readouterr().out
    assert "done=2" in out and "CPU-h spent" in out and "demo_dense_small" in out
