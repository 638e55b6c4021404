"""The training run end to end on CPU: megatron-core model/optimizer/schedule, resume, guards."""

from __future__ import annotations

import contextlib
import json
import math
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from steplaw_train import checkpoint as ckpt
from steplaw_train.rundir import read_metrics
from steplaw_train.train import run
from tests.conftest import tiny_options, tiny_spec

REPO = Path(__file__).resolve().parents[1]
RESUME_SPEC = {"tokens": 4 * 32 * 150}  # 150 steps: long enough to be killed mid-run
RESULT_KEYS = {
    "run_id",
    "status",
    "final_loss",
    "smooth_loss",
    "steps",
    "planned_steps",
    "tokens",
    "wall_time_s",
    "versions",
    "device",
    "precision",
    "final_checkpoint",
}


def _losses(run_dir: Path) -> list[float]:
    return [r["loss"] for r in read_metrics(run_dir)]


@pytest.fixture(scope="module")
def reference(tmp_path_factory, data_root) -> Path:
    """An uninterrupted run of RESUME_SPEC (the baseline for the resume tests)."""
    run_dir = tmp_path_factory.mktemp("reference") / "run"
    os.environ.setdefault("WANDB_MODE", "offline")
    run(tiny_spec(**RESUME_SPEC), run_dir, tiny_options(data_root, checkpoint_interval=20))
    return run_dir


def _child(run_dir: Path, data_root: Path, precision: str = "auto") -> subprocess.Popen:
    code = (
        "from tests.conftest import tiny_spec, tiny_options\n"
        "from steplaw_train.train import run\n"
        f"run(tiny_spec(tokens={RESUME_SPEC['tokens']}), {str(run_dir)!r}, "
        f"tiny_options({str(data_root)!r}, checkpoint_interval=20, precision={precision!r}))\n"
    )
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO)}
    env.pop("WANDB_SERVICE", None)  # a job of its own, not a client of this process's wandb
    return subprocess.Popen(
        [sys.executable, "-W", "ignore", "-c", code],
        cwd=REPO,
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        start_new_session=True,  # its own process group, like a SLURM job step
    )


def _dp_child(run_dir: Path, data_root: Path, ranks: int = 2) -> subprocess.Popen:
    """A `ranks`-process data-parallel run of RESUME_SPEC (gloo), as torchrun starts it."""
    cmd = [sys.executable, "-W", "ignore", "-m", "torch.distributed.run", "--standalone"]
    cmd += [f"--nproc_per_node={ranks}", "-m", "tests.dp_child"]
    cmd += [str(run_dir), str(data_root), str(RESUME_SPEC["tokens"])]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO)}
    env.pop("WANDB_SERVICE", None)
    return subprocess.Popen(
        cmd,
        cwd=REPO,
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        start_new_session=True,
    )


@pytest.fixture
def spawn():
    """Start data-parallel children; whatever the test's outcome, none outlives it."""
    procs: list[subprocess.Popen] = []

    def start(run_dir: Path, data_root: Path) -> subprocess.Popen:
        procs.append(_dp_child(run_dir, data_root))
        return procs[-1]

    yield start
    for p in procs:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(p.pid, signal.SIGKILL)
        p.wait()


@pytest.fixture(scope="module")
def dp_reference(tmp_path_factory, data_root, reference: Path) -> Path:
    """RESUME_SPEC trained by two data-parallel ranks, uninterrupted."""
    run_dir = tmp_path_factory.mktemp("dp_reference") / "run"
    proc = _dp_child(run_dir, data_root)
    _, err = proc.communicate(timeout=170)
    assert proc.returncode == 0, err.decode()[-3000:]
    return run_dir


def _group_alive(pgid: int) -> bool:
    try:
        os.killpg(pgid, 0)
    except ProcessLookupError:
        return False
    return True


def _wait_for(pred, proc: subprocess.Popen, timeout: float = 60.0) -> None:
    end = time.monotonic() + timeout
    while not pred():
        if proc.poll() is not None:
            raise AssertionError(f"child exited early: {proc.stderr.read().decode()[-2000:]}")
        assert time.monotonic() < end, "timed out waiting for the child run"
        time.sleep(0.01)


def test_run_dir_contract(reference: Path):
    result = json.loads((reference / "result.json").read_text())
    assert set(result) >= RESULT_KEYS and result["status"] == "done"
    assert result["steps"] == result["planned_steps"] == 150
    assert result["tokens"] == 150 * 4 * 32
    rows = read_metrics(reference)
    assert [r["step"] for r in rows] == list(range(1, 151))
    assert {"step", "tokens", "loss", "lr", "grad_norm", "tokens_per_s", "elapsed_s"} <= set(
        rows[0]
    )
    assert rows[-1]["lr"] == 1e-5  # fixed final LR, exactly
    assert rows[-1]["loss"] < rows[0]["loss"] - 1.0  # it learns: ~5.8 (uniform over bytes) -> lower
    assert result["final_loss"] == rows[-1]["loss"]
    assert math.isfinite(result["smooth_loss"])
    spec = json.loads((reference / "spec.json").read_text())
    assert spec["derived"]["run_id"] == result["run_id"] == tiny_spec(**RESUME_SPEC).run_id
    # the default lifecycle: the weights kept in checkpoints/final, the step checkpoints pruned
    final = {"kind": "model", "path": "checkpoints/final", "step": 150}
    assert result["final_checkpoint"] == final
    assert (reference / final["path"] / ckpt.COMPLETE).exists()
    assert ckpt.complete_steps(reference) == [] and not list(reference.glob("checkpoints/step_*"))


@pytest.mark.timeout(180)
def test_kill9_then_rerun_is_bitwise_identical(tmp_path: Path, data_root, reference: Path):
    run_dir = tmp_path / "run"
    proc = _child(run_dir, data_root)
    _wait_for(lambda: ckpt.latest_step(run_dir) is not None, proc)
    os.killpg(proc.pid, signal.SIGKILL)  # the run and its helpers, as SLURM kills a job
    proc.wait()
    assert not (run_dir / "result.json").exists(), "the child finished before it was killed"
    killed_at = ckpt.latest_step(run_dir)
    assert killed_at is not None and killed_at < 150
    result = run(tiny_spec(**RESUME_SPEC), run_dir, tiny_options(data_root, checkpoint_interval=20))
    assert _losses(run_dir) == _losses(reference)  # bitwise: float equality of every step
    ref = json.loads((reference / "result.json").read_text())
    assert result["final_loss"] == ref["final_loss"] and result["smooth_loss"] == ref["smooth_loss"]


@pytest.mark.timeout(180)
def test_sigterm_checkpoints_then_resumes(tmp_path: Path, data_root, reference: Path):
    run_dir = tmp_path / "run"
    proc = _child(run_dir, data_root)
    _wait_for(lambda: ckpt.latest_step(run_dir) is not None, proc)
    os.killpg(proc.pid, signal.SIGTERM)  # every process of the run, as SLURM signals a job step
    assert proc.wait(timeout=60) == -signal.SIGTERM  # re-raised after saving
    end = time.monotonic() + 10  # no orphan left behind (a writer, wandb's service)
    while _group_alive(proc.pid) and time.monotonic() < end:
        time.sleep(0.1)
    assert not _group_alive(proc.pid), "the run left processes behind after SIGTERM"
    step = ckpt.latest_step(run_dir)
    assert step is not None and step % 20 != 0, "no checkpoint at the signal's step boundary"
    assert not (run_dir / "result.json").exists()
    run(tiny_spec(**RESUME_SPEC), run_dir, tiny_options(data_root, checkpoint_interval=20))
    assert _losses(run_dir) == _losses(reference)


def test_finished_run_is_returned_unchanged(reference: Path, data_root):
    before = (reference / "result.json").read_bytes()
    mtime = (reference / "result.json").stat().st_mtime_ns
    result = run(tiny_spec(**RESUME_SPEC), reference, tiny_options(data_root))
    assert result == json.loads(before)
    assert (reference / "result.json").read_bytes() == before
    assert (reference / "result.json").stat().st_mtime_ns == mtime


def test_absurd_lr_is_labelled_diverged(tmp_path: Path, data_root):
    result = run(tiny_spec(lr=50.0), tmp_path / "run", tiny_options(data_root))
    assert result["status"] == "diverged"
    assert result["smooth_loss"] == math.inf and result["steps"] < result["planned_steps"]
    assert "loss" in result["reason"]
    on_disk = json.loads((tmp_path / "run" / "result.json").read_text())
    assert on_disk["smooth_loss"] == math.inf and on_disk["status"] == "diverged"


def test_grad_accumulation_matches_one_big_batch(tmp_path: Path, data_root):
    """4 micro-batches of 1 vs 1 micro-batch of 4: same losses and grad norms (fp32 tolerance)."""
    spec = tiny_spec(tokens=4 * 32 * 6)
    a = tmp_path / "k4m1"
    b = tmp_path / "k1m4"
    run(spec, a, tiny_options(data_root, micro_batch_size=1))
    run(spec, b, tiny_options(data_root, micro_batch_size=4))
    ra, rb = read_metrics(a), read_metrics(b)
    assert json.loads((a / "spec.json").read_text())["derived"]["num_microbatches"] == 4
    assert json.loads((b / "spec.json").read_text())["derived"]["num_microbatches"] == 1
    for x, y in zip(ra, rb, strict=True):
        assert x["loss"] == pytest.approx(y["loss"], rel=1e-5)
        assert x["grad_norm"] == pytest.approx(y["grad_norm"], rel=1e-4)


def test_moe_run_logs_aux_loss_and_records_activated_fraction(tmp_path: Path, data_root):
    spec = tiny_spec(moe=True, tokens=4 * 32 * 8)
    result = run(spec, tmp_path / "run", tiny_options(data_root))
    assert result["status"] == "done"
    rows = read_metrics(tmp_path / "run")
    assert all(r["moe_aux_loss"] > 0 and math.isfinite(r["moe_aux_loss"]) for r in rows)
    derived = json.loads((tmp_path / "run" / "spec.json").read_text())["derived"]
    assert derived["Na"] < derived["N"]
    assert derived["Na_over_N"] == pytest.approx(spec.Na / spec.N)
    assert derived["parameters"]["matrices"] == spec.N


def test_moe_routes_every_token_to_exactly_topk_experts():
    from steplaw_train import _cpu_compat, distributed
    from steplaw_train.model import build_model

    spec = tiny_spec(moe=True)
    _cpu_compat.apply()
    distributed.init(use_cuda=False)
    try:
        torch.manual_seed(0)
        gpt = build_model(spec.model, 320, 32, bf16=False, use_cuda=False)
        routers = [m for n, m in gpt.named_modules() if n.endswith("mlp.router")]
        assert len(routers) == spec.model.layers - spec.model.moe.dense_layers
        seen = []
        routers[0].register_forward_hook(lambda mod, inp, out: seen.append(out))
        tokens = torch.randint(0, 320, (3, 32))
        gpt(tokens, torch.arange(32).expand(3, 32), None)
    finally:
        distributed.shutdown()
    probs, routing_map = seen[0]
    assert routing_map.shape == (3 * 32, spec.model.moe.num_experts)
    assert (routing_map.sum(dim=-1) == spec.model.moe.topk).all()
    assert ((probs != 0) == routing_map).all()


def _guard_series(losses: list[float], warmup: int = 10) -> str | None:
    from steplaw_train.options import RunOptions
    from steplaw_train.train import update_divergence

    state, options = ckpt.TrainState(), RunOptions(divergence_factor=2.0, divergence_window=20)
    for step, loss in enumerate(losses, start=1):
        reason = update_divergence(state, loss, step, warmup, options)
        if reason:
            return f"{step}: {reason}"
    return None


def test_divergence_guard_ignores_single_hard_batches_but_catches_a_blow_up():
    # one sequence per step: most batches ~1.4, every 37th a hard file at 4.8 (3.4x the best)
    noisy = [5.0 - 3.6 * min(1.0, s / 100) + (3.4 if s % 37 == 0 else 0.0) for s in range(400)]
    assert _guard_series(noisy) is None
    drift = noisy[:300] + [1.4 + 0.05 * k for k in range(1, 60)]  # slowly back up to ~4.3
    reason = _guard_series(drift)
    assert reason is not None and "loss EMA" in reason and int(reason.split(":")[0]) > 300
    spike = _guard_series([5.8, 11625.5, 49776.1] + noisy)  # lr=50: blows up during warmup
    assert spike is not None and spike.startswith("2:") and "first step" in spike
    assert "non-finite" in _guard_series(noisy[:50] + [float("nan")])


@pytest.mark.timeout(180)
def test_two_data_parallel_ranks_train_like_one(dp_reference: Path, reference: Path):
    """megatron DDP over gloo: each rank takes half of every global batch and the all-reduced
    gradient is the mean, so the loss curve equals the one-process run's up to float order."""
    spec = json.loads((dp_reference / "spec.json").read_text())["derived"]
    assert spec["data_parallel"] == 2 and spec["micro_batch_size"] * 2 == 4
    dp, one = _losses(dp_reference), _losses(reference)
    assert len(dp) == len(one) == 150
    assert dp != one  # really another execution (reduction order), not the same file
    assert max(abs(a - b) / b for a, b in zip(dp, one, strict=True)) < 1e-4
    result = json.loads((dp_reference / "result.json").read_text())
    assert result["status"] == "done" and result["tokens"] == 150 * 4 * 32
    # the final model save is collective: both ranks wrote their share; the prune ran once
    final = dp_reference / result["final_checkpoint"]["path"]
    assert {p.name.split("_")[2] for p in final.glob("__*_*.distcp")} == {"0", "1"}
    assert (final / ckpt.COMPLETE).exists() and ckpt.complete_steps(dp_reference) == []


@pytest.mark.timeout(240)
def test_two_rank_run_killed_then_resumed_is_bitwise_identical(
    tmp_path: Path, data_root, dp_reference: Path, spawn
):
    run_dir = tmp_path / "run"
    proc = spawn(run_dir, data_root)
    _wait_for(lambda: ckpt.latest_step(run_dir) is not None, proc, timeout=120)
    os.killpg(proc.pid, signal.SIGKILL)  # torchrun and both ranks
    proc.wait()
    killed_at = ckpt.latest_step(run_dir)
    assert not (run_dir / "result.json").exists() and killed_at < 150
    proc = spawn(run_dir, data_root)
    _, err = proc.communicate(timeout=170)
    assert proc.returncode == 0, err.decode()[-3000:]
    assert _losses(run_dir) == _losses(dp_reference)
    ref = json.loads((dp_reference / "result.json").read_text())
    got = json.loads((run_dir / "result.json").read_text())
    assert got["smooth_loss"] == ref["smooth_loss"] and got["final_loss"] == ref["final_loss"]


def _rank_pid(launcher_pid: int, rank: int) -> int | None:
    """The worker process torchrun started for `rank` (read from /proc: Linux only)."""
    for child in Path("/proc").glob("[0-9]*"):
        try:
            if int((child / "stat").read_text().rsplit(")", 1)[1].split()[1]) != launcher_pid:
                continue
            env = (child / "environ").read_bytes().split(b"\0")
        except (OSError, ValueError, IndexError):
            continue
        if f"RANK={rank}".encode() in env:
            return int(child.name)
    return None


@pytest.mark.timeout(240)
def test_sigterm_to_one_rank_checkpoints_all_ranks_at_the_same_step(
    tmp_path: Path, data_root, dp_reference: Path, spawn
):
    """SLURM and torchrun deliver signals to each rank at slightly different steps; the ranks
    agree (all-reduce of the flag) so the collective checkpoint is taken once, at one step."""
    run_dir = tmp_path / "run"
    proc = spawn(run_dir, data_root)
    _wait_for(lambda: len(read_metrics(run_dir)) >= 3, proc, timeout=120)
    rank1 = _rank_pid(proc.pid, 1)
    assert rank1 is not None
    os.kill(rank1, signal.SIGTERM)  # rank 1 only; rank 0 learns of it through the agreement
    proc.wait(timeout=90)
    assert proc.returncode != 0  # torchrun reports its worker's signal exit
    step = ckpt.latest_step(run_dir)
    assert step is not None and step % 20 != 0, "no checkpoint at the signal's step boundary"
    assert not (run_dir / "result.json").exists()
    proc = spawn(run_dir, data_root)
    _, err = proc.communicate(timeout=170)
    assert proc.returncode == 0, err.decode()[-3000:]
    assert _losses(run_dir) == _losses(dp_reference)


@pytest.mark.timeout(240)
def test_bf16_mixed_precision_trains_and_resumes_bitwise(tmp_path: Path, data_root, reference):
    """The GPU path's precision machinery on CPU: megatron's Float16Module (bf16 weights and
    activations) and its mixed-precision optimizer (fp32 main params), checkpointed and resumed."""
    opts = tiny_options(data_root, checkpoint_interval=20, precision="bf16")
    whole = tmp_path / "whole"
    result = run(tiny_spec(**RESUME_SPEC), whole, opts)
    assert result["precision"] == "bf16" and result["status"] == "done"
    bf, fp = _losses(whole), _losses(reference)
    assert bf != fp  # really another precision
    assert sum(abs(a - b) / b for a, b in zip(bf, fp, strict=True)) / len(fp) < 0.02
    run_dir = tmp_path / "killed"
    proc = _child(run_dir, data_root, precision="bf16")
    _wait_for(lambda: ckpt.latest_step(run_dir) is not None, proc)
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    assert not (run_dir / "result.json").exists()
    again = run(tiny_spec(**RESUME_SPEC), run_dir, opts)
    assert _losses(run_dir) == bf and again["smooth_loss"] == result["smooth_loss"]


def test_a_save_leaves_no_helper_process_a_job_signal_could_kill(tmp_path: Path, data_root):
    """SLURM signals every process of a job step; a checkpoint-on-signal must not depend on a
    helper process surviving that. megatron would start a spawn-context Manager for its write
    results at the first save (unshielded, the CI cluster's preemption test failed with
    BrokenPipeError); the trainer gives it an in-process queue instead, so after a save the
    trainer has no new child process (its forked writers are joined within the save)."""
    import queue

    import psutil
    from megatron.core.dist_checkpointing.strategies import filesystem_async

    filesystem_async._results_queue = None  # as in a fresh process
    before = set(psutil.Process().children(recursive=True))  # e.g. wandb's service of a test
    opts = tiny_options(data_root, checkpoint_interval=5, wandb_mode="disabled")
    result = run(tiny_spec(tokens=4 * 32 * 12), tmp_path / "run", opts)
    assert result["status"] == "done" and ckpt.latest_step(tmp_path / "run") is None  # pruned
    assert isinstance(filesystem_async._results_queue, queue.Queue)
    assert filesystem_async._results_queue.qsize() == 0  # every write result was read back
    assert set(psutil.Process().children(recursive=True)) <= before
