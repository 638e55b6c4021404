"""Acceptance on a real SLURM (.ci/slurm-up.sh; two CPU nodes, see also test_slurm_multinode.py): arrays, requeue resume, idempotence,
failures and retry, one wandb run per run_id. CPU demo shapes with a few thousand tokens per run.

Skipped only when no cluster answers and STEPLAW_REQUIRE_SLURM is unset; with it set (CI), a
missing cluster fails.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

from launch.status import sweep_states
from steplaw_train.sweep import status as status_cli
from steplaw_train.sweep import sweep
from tests.conftest import tiny_sweep_cfg

pytestmark = pytest.mark.slurm
GRID6 = (
    "grid.blocks=[{model:[demo_dense_small],tokens:[4096],lr:[0.002,0.003,0.004],batch_size:[2,4]}]"
)
LONG = "grid.blocks=[{model:[demo_dense_small],tokens:[49152],lr:[0.003],batch_size:[4]}]"


def _cluster_up() -> bool:
    try:
        return (
            subprocess.run(["scontrol", "ping"], capture_output=True, timeout=10).returncode == 0
            and subprocess.run(["sacct", "-n", "-X"], capture_output=True, timeout=10).returncode
            == 0
        )
    except (OSError, subprocess.SubprocessError):
        return False


@pytest.fixture(scope="module", autouse=True)
def cluster():
    if not _cluster_up():
        msg = "no SLURM cluster reachable (start one with sudo .ci/slurm-up.sh)"
        if os.environ.get("STEPLAW_REQUIRE_SLURM"):
            pytest.fail(msg)
        pytest.skip(msg)


@pytest.fixture(scope="module")
def env(tmp_path_factory):
    """Shared tmp dirs; the environment submitit's jobs inherit (sbatch exports it)."""
    root = tmp_path_factory.mktemp("slurm")
    saved = dict(os.environ)
    os.environ.update(
        WANDB_MODE="offline",
        WANDB_DIR=str(root / "wandb"),
        OMP_NUM_THREADS="1",
        WANDB_CACHE_DIR=str(root / "wandb"),
        WANDB_CONFIG_DIR=str(root / "wandb"),
    )
    yield root
    os.environ.clear()
    os.environ.update(saved)


def cfg_for(sweep_dir: Path, data_root: Path, *overrides: str):
    # the SLURM launcher's warning delay; a reference run on another launcher (launcher=debug)
    # must not carry it (the launcher section's keys are checked)
    other = any(o.startswith("launcher=") and o != "launcher=slurm" for o in overrides)
    slurm_only = [] if other else ["++launcher.signal_delay_s=30"]
    # each sweep keeps its own runs (no store): these tests compare a run with a reference
    # training of the same spec in another sweep dir, which a shared store would skip
    if not any(o.startswith("runs_root=") for o in overrides):
        slurm_only.append(f"runs_root={sweep_dir}/runs")
    return tiny_sweep_cfg(
        sweep_dir,
        data_root,
        GRID6,
        "launcher=slurm",
        # submitted from the checkout under test, which may hold uncommitted work; the
        # refusal of a dirty tree is tests/test_provenance.py's and test_slurm_provenance.py's
        "allow_dirty=true",
        *slurm_only,
        *overrides,
    )


def wait_finished(sweep_dir: Path, run_ids, timeout_s: float = 240) -> dict[str, str]:
    deadline = time.time() + timeout_s
    while time.time() < deadline:
        states = {s.run_id: s.state for s in sweep_states(sweep_dir, run_ids)}
        if not {"queued", "running", "pending"} & set(states.values()):
            return states
        time.sleep(2)
    raise AssertionError(f"runs not finished after {timeout_s}s: {states}")


def wandb_ids(run_dir: Path) -> set[str]:
    return {p.name.rsplit("-", 1)[-1] for p in (run_dir / "wandb").glob("offline-run-*")}


@pytest.fixture(scope="module")
def array_sweep(env):
    sw = env / "sw6"
    res = sweep(cfg_for(sw, env / "data"))
    assert len(res.submitted) == 6 and res.batch_calls == 1
    states = wait_finished(sw, res.submitted)
    return sw, res, states


def test_grid_goes_out_as_one_array_and_completes(array_sweep):
    sw, res, states = array_sweep
    assert len({j.split("_")[0] for j in res.job_ids}) == 1  # one sbatch: one array
    assert set(states.values()) == {"done"}
    for rid in res.submitted:
        result = json.loads((sw / "runs" / rid / "result.json").read_text())
        assert result["status"] == "done" and result["run_id"] == rid
        assert wandb_ids(sw / "runs" / rid) == {rid}
    out = subprocess.run(
        [sys.executable, "-m", "steplaw_train.sweep.status", str(sw), "--json"],
        capture_output=True,
        text=True,
        check=True,
        cwd=Path(__file__).resolve().parents[1],
    ).stdout
    counts = json.loads(out)
    assert counts["done"] == 6 and counts["submitted_last"] == 6 and counts["failed"] == 0


def test_rerun_submits_nothing_then_only_the_missing_run(array_sweep, env):
    sw, res, _ = array_sweep
    assert sweep(cfg_for(sw, env / "data")).submitted == ()
    assert status_cli.summary(sw)[0]["submitted_last"] == 0
    victim = res.submitted[2]
    (sw / "runs" / victim / "result.json").unlink()
    again = sweep(cfg_for(sw, env / "data"))
    assert again.submitted == (victim,) and again.batch_calls == 1
    assert wait_finished(sw, [victim])[victim] == "done"


def test_requeued_run_resumes_bitwise(env):
    """`scontrol requeue` restarts the job from scratch; the run resumes from its checkpoint and
    ends with the same losses as an uninterrupted run; wandb still has one run for its id."""
    sw = env / "swlong"
    res = sweep(cfg_for(sw, env / "data", LONG, "options.checkpoint_interval=8"))
    (rid,), (job,) = res.submitted, res.job_ids
    run_dir = sw / "runs" / rid
    deadline = time.time() + 180
    while (
        not any((run_dir / "checkpoints").glob("*/complete"))
        if (run_dir / "checkpoints").exists()
        else True
    ):
        assert time.time() < deadline, "no checkpoint written"
        time.sleep(0.5)
    assert not (run_dir / "result.json").exists(), "run finished before it could be requeued"
    subprocess.run(["scontrol", "requeue", job], check=True)
    ref = sweep(cfg_for(env / "swref", env / "data", LONG, "launcher=debug"))  # uninterrupted
    assert wait_finished(sw, [rid])[rid] == "done"
    info = subprocess.run(
        ["sacct", "-D", "-X", "-n", "-P", "-o", "JobID,State", "-j", job],
        capture_output=True,
        text=True,
    ).stdout
    assert "REQUEUED" in info or "PREEMPTED" in info, info
    ours = json.loads((run_dir / "result.json").read_text())
    theirs = json.loads((env / "swref" / "runs" / rid / "result.json").read_text())
    assert (
        ours["final_loss"] == theirs["final_loss"] and ours["smooth_loss"] == theirs["smooth_loss"]
    )
    losses = [json.loads(x)["loss"] for x in (run_dir / "metrics.jsonl").read_text().splitlines()]
    ref_losses = [
        json.loads(x)["loss"]
        for x in (env / "swref" / "runs" / rid / "metrics.jsonl").read_text().splitlines()
    ]
    assert losses == ref_losses and ref.submitted == (rid,)
    assert wandb_ids(run_dir) == {rid}


def test_failed_run_shows_log_tail_and_is_retried_alone(array_sweep, env, capsys):
    sw, res, _ = array_sweep
    # a data root whose `datasets` is a file: passes the sweep's checks, the job then cannot
    # build the demo corpus (a data root that is itself a file is refused before submission)
    bad_root = env / "bad_root"
    bad_root.mkdir()
    (bad_root / "datasets").write_text("injected failure")
    extra = GRID6.replace("0.002,0.003,0.004", "0.002,0.003,0.004,0.005")
    failing = sweep(cfg_for(sw, bad_root, extra, "max_retries=0"))
    assert len(failing.submitted) == 2  # lr 0.005 x bs {2, 4}: the new runs only
    states = wait_finished(sw, failing.submitted)
    assert set(states.values()) == {"failed"}
    status_cli.main([str(sw)])
    out = capsys.readouterr().out
    assert "failed=2" in out and "    | " in out  # with the tail of the job log
    assert sweep(cfg_for(sw, env / "data", extra, "max_retries=0")).submitted == ()
    retry = sweep(cfg_for(sw, env / "data", extra, "retry_failed=true"))
    assert sorted(retry.submitted) == sorted(failing.submitted)
    assert set(wait_finished(sw, retry.submitted).values()) == {"done"}
    assert status_cli.summary(sw)[0]["done"] == 8


def test_two_task_job_trains_data_parallel_across_slurm_tasks(env, monkeypatch):
    """The launch path of a multi-GPU job, on CPUs: SLURM starts 2 tasks, submitit runs RunJob in
    each, export_distributed_env points them at one rendezvous (MASTER_ADDR/PORT, RANK,
    WORLD_SIZE from the job), and the two gloo ranks train one run like one process does."""
    grid = "grid.blocks=[{model:[demo_dense_small],tokens:[8192],lr:[0.003],batch_size:[4]}]"
    sw = env / "swtasks"
    # a stale rendezvous in the submitting shell (sbatch copies it into the job) must not win
    monkeypatch.setenv("MASTER_ADDR", "192.0.2.1")
    monkeypatch.setenv("MASTER_PORT", "1")
    monkeypatch.setenv("RANK", "5")
    res = sweep(cfg_for(sw, env / "data", grid, "resources.cpu_tasks=2"))
    (rid,) = res.submitted
    assert wait_finished(sw, [rid])[rid] == "done"
    run_dir = sw / "runs" / rid
    assert json.loads((run_dir / "spec.json").read_text())["derived"]["data_parallel"] == 2
    assert "2x1cpu" in json.loads((run_dir / "launch.json").read_text())["attempts"][0]["resources"]
    ref = sweep(cfg_for(env / "swtasks_ref", env / "data", grid, "launcher=debug"))
    assert ref.submitted == (rid,)  # same spec, same run_id: one process this time
    ours = [json.loads(x)["loss"] for x in (run_dir / "metrics.jsonl").read_text().splitlines()]
    theirs = [
        json.loads(x)["loss"]
        for x in (env / "swtasks_ref" / "runs" / rid / "metrics.jsonl").read_text().splitlines()
    ]
    assert len(ours) == len(theirs) == 16
    assert max(abs(a - b) / b for a, b in zip(ours, theirs, strict=True)) < 1e-4


def test_partition_preemption_requeues_and_the_run_resumes_bitwise(env):
    """A job of the higher-priority partition (`urgent`) needs every CPU of every node: SLURM
    preempts the run's job (SIGTERM, GraceTime, requeue); the run checkpoints, comes back and
    ends with the losses of an uninterrupted run."""
    long = "grid.blocks=[{model:[demo_dense_small],tokens:[196608],lr:[0.003],batch_size:[4]}]"
    sw = env / "swpreempt"
    res = sweep(cfg_for(sw, env / "data", long, "options.checkpoint_interval=8"))
    (rid,), (job,) = res.submitted, res.job_ids
    run_dir = sw / "runs" / rid
    deadline = time.time() + 180
    while not list(run_dir.glob("checkpoints/*/complete")):
        assert time.time() < deadline, "no checkpoint written"
        time.sleep(0.5)
    ncpu = os.cpu_count() or 1
    # every CPU of every node of the partition: whichever node the run is on, it is in the way
    nodes = subprocess.run(
        ["sinfo", "-h", "-p", "urgent", "-o", "%D"], capture_output=True, text=True, check=True
    ).stdout.split()[0]
    urgent = subprocess.run(
        ["sbatch", "--parsable", "-p", "urgent", "-N", nodes, "--ntasks-per-node", "1"]
        + ["-c", str(ncpu)]
        + ["-o", str(env / "urgent-%j.out"), "--wrap", "sleep 5"],
        capture_output=True,
        text=True,
        check=True,
    ).stdout.strip()
    ref = sweep(cfg_for(env / "swpreempt_ref", env / "data", long, "launcher=debug"))
    assert wait_finished(sw, [rid], timeout_s=600)[rid] == "done"
    info = subprocess.run(
        ["sacct", "-D", "-X", "-n", "-P", "-o", "JobID,State", "-j", f"{job},{urgent}"],
        capture_output=True,
        text=True,
    ).stdout
    assert "REQUEUED" in info or "PREEMPTED" in info, info
    out = (sw / "logs" / f"{job}_0_log.out").read_text()
    err = (sw / "logs" / f"{job}_0_log.err").read_text()
    assert out.count("Starting with JobEnvironment") == 2  # preempted once, then ran again
    assert "preempted" in out and "Traceback" not in err, err[-3000:]
    assert wandb_ids(run_dir) == {rid}
    losses = [json.loads(x)["loss"] for x in (run_dir / "metrics.jsonl").read_text().splitlines()]
    ref_dir = env / "swpreempt_ref" / "runs" / rid
    assert ref.submitted == (rid,)
    assert losses == [
        json.loads(x)["loss"] for x in (ref_dir / "metrics.jsonl").read_text().splitlines()
    ]
    ours = json.loads((run_dir / "result.json").read_text())
    assert ours["smooth_loss"] == json.loads((ref_dir / "result.json").read_text())["smooth_loss"]


def test_two_sweeps_sharing_a_run_submit_it_once(env):
    """The run store on SLURM: the second sweep sees the first one's queued job in the shared run
    dir and does not submit the shared run; both see it finish."""
    store = env / "store"
    grid_b = GRID6.replace("0.002,0.003,0.004", "0.004,0.005").replace("2,4", "4")
    grid_a = GRID6.replace("0.002,0.003,0.004", "0.004").replace("2,4", "4")
    a = sweep(cfg_for(env / "sh_a", env / "data", grid_a, f"runs_root={store}", "grid.name=a"))
    b = sweep(cfg_for(env / "sh_b", env / "data", grid_b, f"runs_root={store}", "grid.name=b"))
    (shared,) = a.submitted
    assert shared not in b.submitted and len(b.submitted) == 1
    assert wait_finished(env / "sh_b", [shared, *b.submitted]) == dict.fromkeys(
        [shared, *b.submitted], "done"
    )
    assert len(json.loads((store / shared / "launch.json").read_text())["attempts"]) == 1
    assert (env / "sh_a" / "runs" / shared).resolve() == (env / "sh_b" / "runs" / shared).resolve()


def test_cancel_scancels_running_and_queued_array_tasks_and_undo_resumes(env):
    """`cancel --all` on a 2-task array throttled to 1 at a time: the running task is scancelled
    after a checkpoint (the trainer checkpoints on SIGTERM), the queued one never starts; both
    show cancelled and a rerun submits nothing; after `--undo` a rerun resumes them."""
    grid = "grid.blocks=[{model:[demo_dense_small],tokens:[49152],lr:[0.003,0.004],batch_size:[4]}]"
    sw = env / "swcancel"
    over = ("options.checkpoint_interval=8",)
    res = sweep(cfg_for(sw, env / "data", grid, *over, "launcher.array_parallelism=1"))
    assert len(res.submitted) == 2 and res.batch_calls == 1
    deadline = time.time() + 90
    while not list(sw.glob("runs/*/checkpoints/*/complete")):
        assert time.time() < deadline, "no checkpoint written"
        time.sleep(0.5)
    (first,) = {p.parts[-4] for p in sw.glob("runs/*/checkpoints/*/complete")}
    p = subprocess.run(
        [sys.executable, "-m", "steplaw_train.sweep.cancel", str(sw), "--all"],
        capture_output=True,
        text=True,
        cwd=Path(__file__).resolve().parents[1],
        timeout=120,
    )
    assert p.returncode == 0, p.stderr
    assert p.stdout.count("scancel") == 2, p.stdout
    deadline = time.time() + 60
    while {s.state for s in sweep_states(sw, res.submitted)} != {"cancelled"}:
        assert time.time() < deadline, [
            (s.run_id, s.state) for s in sweep_states(sw, res.submitted)
        ]
        time.sleep(1)
    assert not (sw / "runs" / first / "result.json").exists()
    from steplaw_train import checkpoint as ckpt

    step = ckpt.latest_step(sw / "runs" / first)
    lines = (sw / "runs" / first / "metrics.jsonl").read_text().splitlines(keepends=True)
    kept = [x for x in lines if json.loads(x)["step"] <= step]
    (other,) = set(res.submitted) - {first}
    assert not (sw / "runs" / other / "metrics.jsonl").exists()  # the queued task never ran
    assert sweep(cfg_for(sw, env / "data", grid, *over)).submitted == ()
    assert status_cli.summary(sw)[0]["cancelled"] == 2

    subprocess.run(
        [sys.executable, "-m", "steplaw_train.sweep.cancel", str(sw), "--all", "--undo"],
        check=True,
        capture_output=True,
        cwd=Path(__file__).resolve().parents[1],
        timeout=120,
    )
    again = sweep(cfg_for(sw, env / "data", grid, *over))
    assert sorted(again.submitted) == sorted(res.submitted)
    assert set(wait_finished(sw, res.submitted, timeout_s=120).values()) == {"done"}
    resumed = (sw / "runs" / first / "metrics.jsonl").read_text().splitlines(keepends=True)
    assert resumed[: len(kept)] == kept  # resumed from its checkpoint, not restarted
    steps = [json.loads(x)["step"] for x in resumed]
    assert steps == sorted(set(steps))
