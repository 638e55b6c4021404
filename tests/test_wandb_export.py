"""One wandb run per run_id, seen through wandb's own offline tools (no server, no mocks).

No wandb server is reachable here, so "what wandb sees" is read with wandb's CLI: `wandb sync
--dry-run` lists the runs a sync would upload, and `wandb leet inspect --json` decodes the
records of a .wandb transaction log (the data a sync uploads): run identity, every history
row, summary and exit code.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from steplaw_train import checkpoint as ckpt
from steplaw_train import metrics as mx
from steplaw_train import rundir
from steplaw_train import wandb_export as wx
from steplaw_train.train import run
from tests.conftest import tiny_options, tiny_spec

REPO = Path(__file__).resolve().parents[1]
WANDB = str(Path(sys.executable).parent / "wandb")
TOKENS = 4 * 32 * 150  # 150 steps


def _cli(*args: str) -> str:
    proc = subprocess.run(
        [WANDB, *args], capture_output=True, text=True, timeout=120, stdin=subprocess.DEVNULL
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    return proc.stdout + proc.stderr


def _records(folder: Path) -> list[dict]:
    out = _cli("leet", "inspect", "--json", str(folder))
    return [json.loads(line) for line in out.splitlines() if line.startswith("{")]


def _summary(folder: Path) -> dict:
    return json.loads(_cli("leet", "inspect", "--summary", "--json", str(folder)))


def _would_sync(paths: list[Path]) -> list[str]:
    """The .wandb files `wandb sync` would upload."""
    out = _cli("sync", "--dry-run", *map(str, paths))
    return [ln.split()[-1] for ln in out.splitlines() if ln.strip().endswith(".wandb")]


def _child(run_dir: Path, data_root: Path) -> subprocess.Popen:
    code = (
        "from tests.conftest import tiny_spec, tiny_options\n"
        "from steplaw_train.train import run\n"
        f"run(tiny_spec(tokens={TOKENS}), {str(run_dir)!r}, "
        f"tiny_options({str(data_root)!r}, checkpoint_interval=20))\n"
    )
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO)}
    env.pop("WANDB_SERVICE", None)
    return subprocess.Popen(
        [sys.executable, "-W", "ignore", "-c", code],
        cwd=REPO,
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        start_new_session=True,
    )


def _kill_after_checkpoint(run_dir: Path, data_root: Path, after: int) -> int:
    """Start the run, SIGKILL its process group once a checkpoint past `after` exists."""
    proc = _child(run_dir, data_root)
    end = time.monotonic() + 120
    while (ckpt.latest_step(run_dir) or 0) <= after:
        assert proc.poll() is None, proc.stderr.read().decode()[-2000:]
        assert time.monotonic() < end, "timed out waiting for a checkpoint"
        time.sleep(0.01)
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    assert not (run_dir / "result.json").exists(), "the child finished before it was killed"
    return ckpt.latest_step(run_dir)


@pytest.mark.timeout(400)
def test_killed_and_resumed_twice_offline_exports_as_one_run(tmp_path: Path, data_root):
    run_dir = tmp_path / "sweep" / "runs" / tiny_spec(tokens=TOKENS).run_id
    first = _kill_after_checkpoint(run_dir, data_root, 0)
    _kill_after_checkpoint(run_dir, data_root, first)
    result = run(tiny_spec(tokens=TOKENS), run_dir, tiny_options(data_root, checkpoint_interval=20))
    metrics = rundir.read_metrics(run_dir)
    assert [r["step"] for r in metrics] == list(range(1, 151))

    # live offline logging: one folder per start, each a fragment (the reason for the exporter)
    live = sorted((run_dir / "wandb").glob("offline-run-*"))
    assert len(live) == 3 and len(_would_sync(live)) == 3

    out = tmp_path / "export"
    (exported,) = wx.export(tmp_path / "sweep", out)
    assert exported.action == "written" and exported.status == "done"
    folders = sorted((out / "wandb").glob("offline-run-*"))
    assert folders == [exported.folder]
    assert _would_sync(folders) == [str(next(folders[0].glob("*.wandb")))]

    recs = _records(folders[0])
    (head,) = [r["run"] for r in recs if r["type"] == "run"][:1]
    assert head["run_id"] == result["run_id"]
    assert head["job_type"] == "train" and head["run_group"] == "sweep"
    assert head["display_name"] == wx.run_name(json.loads((run_dir / "spec.json").read_text()))
    history = [r["history"] for r in recs if r["type"] == "history"]
    assert [h["step"]["num"] for h in history] == list(range(1, 151))  # whole, no duplicates
    assert [h["item"]["loss"] for h in history] == [r["loss"] for r in metrics]
    axes = [r["metric"] for r in recs if r["type"] == "metric"]
    assert {"glob_name": "*", "step_metric": "tokens"}.items() <= {
        k: v for a in axes for k, v in a.items()
    }.items()
    s = _summary(folders[0])
    assert s["state"] == "finished" and s["exit_code"] == 0
    assert s["summary"]["smooth_loss"] == result["smooth_loss"]
    assert s["summary"]["status"] == "done" and "status:done" in s["tags"]

    # idempotent: unchanged files → nothing rewritten; forced → replaced, still one run
    assert [e.action for e in wx.export(run_dir, out)] == ["unchanged"]
    assert sorted((out / "wandb").glob("offline-run-*")) == folders
    (again,) = wx.export(run_dir, out, force=True)
    assert again.action == "written"
    assert len(list((out / "wandb").glob("offline-run-*"))) == 1


@pytest.mark.timeout(300)
def test_sigterm_marks_the_live_run_preempting(tmp_path: Path, data_root):
    """SLURM's signal: the run checkpoints, tells wandb it is being preempted and exits 128+15;
    the exporter still reads the interrupted run as unfinished (marked preempting too)."""
    run_dir = tmp_path / "run"
    proc = _child(run_dir, data_root)
    end = time.monotonic() + 120
    while ckpt.latest_step(run_dir) is None:
        assert proc.poll() is None and time.monotonic() < end, proc.stderr.read().decode()[-2000:]
        time.sleep(0.01)
    os.killpg(proc.pid, signal.SIGTERM)
    assert proc.wait(timeout=60) == -signal.SIGTERM
    (live,) = (run_dir / "wandb").glob("offline-run-*")
    recs = _records(live)
    assert any(r["type"] == "preempting" for r in recs)
    assert [r["exit"]["exit_code"] for r in recs if r["type"] == "exit"] == [128 + signal.SIGTERM]
    (e,) = wx.export(run_dir, tmp_path / "out")
    assert e.status == "unfinished"
    assert any(r["type"] == "preempting" for r in _records(e.folder))


def test_a_failed_run_is_marked_failed(tmp_path: Path):
    """A run whose launcher recorded a failure (no result.json) exports with exit code 1."""
    run_dir = tmp_path / "runs" / "deadbeef0001"
    run_dir.mkdir(parents=True)
    spec = tiny_spec()
    doc = {"spec": spec.to_dict(), "derived": spec.derived()}
    (run_dir / "spec.json").write_text(json.dumps(doc))
    rows = [{"step": s, "tokens": 128 * s, "loss": 5.0 - 0.1 * s} for s in range(1, 6)]
    (run_dir / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    (run_dir / "launch.json").write_text(
        json.dumps({"attempts": [{"state": "failed", "error": "RuntimeError: boom"}]})
    )
    (e,) = wx.export(run_dir, tmp_path / "out")
    s = _summary(e.folder)
    assert e.status == "failed" and s["state"] == "failed" and s["exit_code"] == 1
    assert "status:failed" in s["tags"] and s["step"] == 5


def test_live_logger_reports_failure_and_diverged_summary(tmp_path: Path):
    """Live logging: a failing run finishes with a non-zero exit code; a diverged run's summary
    keeps its +inf smoothed loss and status."""
    spec = tiny_spec()
    doc = {"spec": spec.to_dict(), "derived": spec.derived()}
    logger = mx.build_logger(True, tmp_path, spec.run_id, doc, "steplaw-test", "g", "offline")
    logger.log({"step": 1, "tokens": 128, "loss": 5.0})
    logger.summary({"status": "diverged", "final_loss": 9.0, "smooth_loss": float("inf")})
    logger.close(exit_code=1)
    mx.stop_wandb_service()
    (folder,) = (tmp_path / "wandb").glob("offline-run-*")
    s = _summary(folder)
    assert s["state"] == "failed" and s["exit_code"] == 1
    assert s["summary"]["smooth_loss"] == "Infinity" and s["summary"]["status"] == "diverged"
    assert s["name"] == wx.run_name(doc) and "status:diverged" in s["tags"]


def test_run_names_are_readable():
    doc = {
        "spec": {"model": {"name": "dense_1b"}, "train": {"lr": 2.4e-4, "batch_size": 32}},
        "derived": {"N": 1_073_741_824, "Na": 1_073_741_824, "D": 2e10},
    }
    assert wx.run_name(doc) == "1.1B D=20B lr=2.4e-4 bs=32"
    assert wx.human(2.14e8) == "214M" and wx.human(96) == "96"
