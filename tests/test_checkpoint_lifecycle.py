"""The checkpoint lifecycle (issue 11): time-based saves, the final save, the prune, crash safety.

Real tiny CPU runs (30 steps of a 2-layer model, megatron-core dist_checkpointing). A crash at
each point of the finish (final save -> result.json -> prune) is reproduced by the state it
leaves: `prune_checkpoints=False` leaves exactly what a crash between result.json and the prune
leaves, and deleting result.json from that is a crash between the final save and result.json.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from steplaw_train import checkpoint as ckpt
from steplaw_train import rundir
from steplaw_train.train import run
from tests.conftest import tiny_options, tiny_spec

REPO = Path(__file__).resolve().parents[1]
SPEC = tiny_spec()  # 30 steps; tiny_options checkpoints every 10


def _losses(run_dir: Path) -> list[float]:
    return [r["loss"] for r in rundir.read_metrics(run_dir)]


def _entries(run_dir: Path) -> list[str]:
    return sorted(p.name for p in rundir.checkpoints_dir(run_dir).iterdir())


@pytest.fixture(scope="module")
def finished(tmp_path_factory, data_root) -> dict[str, Path]:
    """SPEC run to the end once per final_checkpoint kind (CPU runs are bitwise deterministic:
    all three trained the same weights)."""
    root = tmp_path_factory.mktemp("lifecycle")
    out = {}
    for kind in ("model", "full", "none"):
        run(SPEC, root / kind, tiny_options(data_root, final_checkpoint=kind))
        out[kind] = root / kind
    return out


def test_each_kind_keeps_its_final_save_and_prunes_the_rest(finished):
    records = {k: rundir.read_result(d)["final_checkpoint"] for k, d in finished.items()}
    assert records == {
        "model": {"kind": "model", "path": "checkpoints/final", "step": 30},
        "full": {"kind": "full", "path": "checkpoints/step_00000030", "step": 30},
        "none": {"kind": "none", "path": None, "step": None},
    }
    assert _entries(finished["model"]) == ["final", rundir.CHECKPOINT_FORMAT]
    assert _entries(finished["full"]) == [rundir.CHECKPOINT_FORMAT, "step_00000030"]
    assert _entries(finished["none"]) == [rundir.CHECKPOINT_FORMAT]
    assert _losses(finished["model"]) == _losses(finished["full"]) == _losses(finished["none"])
    # weights only: a fraction of the full checkpoint's bytes (fp32 weights + Adam's moments)
    size = {
        k: sum(f.stat().st_size for f in (d / "checkpoints").rglob("*.distcp"))
        for k, d in finished.items()
        if k != "none"
    }
    assert size["model"] * 2.5 < size["full"]


def _fresh_model(seed: int):
    from steplaw_train.model import build_model

    torch.manual_seed(seed)
    return build_model(SPEC.model, SPEC.data.vocab_size, SPEC.train.seq_len, False, False)


def test_final_model_checkpoint_loads_into_a_fresh_model(finished, data_root):
    """The model-only save, loaded into a freshly built model, holds the trained weights: every
    tensor and the logits equal those of the full checkpoint of the same step (the trainer's
    complete state, loaded into the trainer's own components)."""
    from steplaw_train import _cpu_compat, distributed
    from steplaw_train.train import build_components, build_dataset, make_plan

    options = tiny_options(data_root)
    _cpu_compat.apply()
    distributed.init(use_cuda=False)
    try:
        loaded = _fresh_model(seed=123)
        untrained = {k: v.clone() for k, v in loaded.state_dict().items() if torch.is_tensor(v)}
        ckpt.load_model(rundir.final_checkpoint_dir(finished["model"]), loaded)
        distributed.set_seed(SPEC.train.seed, False)
        plan = make_plan(SPEC, options, use_cuda=False, data_parallel=1)
        model, optimizer, scheduler = build_components(SPEC, plan)
        state = ckpt.load(finished["full"], 30, model, optimizer, scheduler)
        trained = model.module
        sample = build_dataset(SPEC, options)[0]
        tokens = torch.as_tensor(sample["tokens"])[None]
        labels = torch.as_tensor(sample["labels"])[None]
        positions = torch.arange(SPEC.train.seq_len)[None]
        loaded.eval()
        trained.eval()
        with torch.no_grad():
            logits = loaded(tokens, positions, None)
            want = trained(tokens, positions, None)
            loss = loaded(tokens, positions, None, labels=labels).float().mean()
            fresh = _fresh_model(seed=123)
            fresh.eval()
            fresh_loss = fresh(tokens, positions, None, labels=labels).float().mean()
    finally:
        distributed.shutdown()
    assert state.step == 30
    mine = {k: v for k, v in loaded.state_dict().items() if torch.is_tensor(v)}
    theirs = {k: v for k, v in trained.state_dict().items() if torch.is_tensor(v)}
    assert set(mine) == set(theirs)
    assert all(torch.equal(mine[k], theirs[k]) for k in mine)
    assert any(not torch.equal(mine[k], untrained[k]) for k in mine)  # the load changed them
    assert torch.equal(logits, want)
    assert float(loss) < float(fresh_loss) - 0.5  # trained weights: far below an untrained model


def test_a_rerun_completes_a_pending_prune_without_training(tmp_path, data_root):
    """A crash after result.json, before (or during) the prune: the rerun returns the result
    unchanged, trains nothing, and finishes the prune."""
    run_dir = tmp_path / "run"
    first = run(SPEC, run_dir, tiny_options(data_root, prune_checkpoints=False))
    assert ckpt.complete_steps(run_dir) == [10, 20]  # what the crash left
    (ckpt.step_dir(run_dir, 10) / ckpt.COMPLETE).unlink()  # one deletion was under way too
    before = {
        p: p.stat().st_mtime_ns for p in (rundir.result_path(run_dir), rundir.metrics_path(run_dir))
    }
    again = run(SPEC, run_dir, tiny_options(data_root))
    assert again == first
    assert {p: p.stat().st_mtime_ns for p in before} == before  # nothing retrained or rewritten
    assert _entries(run_dir) == ["final", rundir.CHECKPOINT_FORMAT]


@pytest.mark.parametrize("kind", ["model", "full"])
def test_a_crash_between_the_final_save_and_the_result_resumes_and_finishes(
    tmp_path, data_root, finished, kind
):
    """The final save is complete but result.json is missing: the rerun resumes from the step
    checkpoints (full: from the final one itself, no step retrained), writes the final save
    again and finishes with the uninterrupted run's result and losses."""
    run_dir = tmp_path / "run"
    run(SPEC, run_dir, tiny_options(data_root, final_checkpoint=kind, prune_checkpoints=False))
    rundir.result_path(run_dir).unlink()
    before = rundir.read_metrics(run_dir)
    result = run(SPEC, run_dir, tiny_options(data_root, final_checkpoint=kind))
    after = rundir.read_metrics(run_dir)
    # which steps ran again: a retrained step logs its own wall time (elapsed_s, tokens_per_s)
    retrained = [b["step"] for a, b in zip(before, after, strict=True) if a != b]
    ref = rundir.read_result(finished[kind])
    assert _losses(run_dir) == _losses(finished[kind])
    assert result["final_loss"] == ref["final_loss"] and result["smooth_loss"] == ref["smooth_loss"]
    assert result["final_checkpoint"] == ref["final_checkpoint"]
    assert _entries(run_dir) == _entries(finished[kind])
    path = Path(result["final_checkpoint"]["path"])
    mine, ref_tensors = _tensors(run_dir / path), _tensors(finished[kind] / path)
    assert set(mine) == set(ref_tensors) and all(torch.equal(mine[k], ref_tensors[k]) for k in mine)
    assert retrained == (list(range(21, 31)) if kind == "model" else [])  # model: from step 20


def _tensors(path: Path) -> dict[str, torch.Tensor]:
    """The model tensors a checkpoint holds, unsharded, by key."""
    from megatron.core import dist_checkpointing

    from steplaw_train import distributed

    distributed.init(use_cuda=False)
    try:
        plain = dist_checkpointing.load_plain_tensors(str(path))
    finally:
        distributed.shutdown()
    flat: dict[str, torch.Tensor] = {}

    def walk(prefix: str, node) -> None:
        if isinstance(node, dict):
            for k, v in node.items():
                walk(f"{prefix}.{k}" if prefix else str(k), v)
        elif torch.is_tensor(node):
            flat[prefix] = node

    walk("", plain)
    model = {k: v for k, v in flat.items() if not k.startswith("optimizer")}  # megatron's keys
    assert any(k.startswith("decoder.") for k in model), sorted(flat)[:5]
    return model


def test_diverged_runs_save_nothing_new(tmp_path, data_root):
    """A diverged run's weights are what blew up: "model" keeps nothing; "full" keeps its
    newest checkpoint from before the divergence (to look into) and prunes the rest."""
    spec = tiny_spec(lr=50.0)  # blows up within a few steps
    opts = {"checkpoint_interval": 1, "keep_checkpoints": 3}
    model = run(spec, tmp_path / "m", tiny_options(data_root, **opts))
    assert model["status"] == "diverged"
    assert model["final_checkpoint"] == {"kind": "none", "path": None, "step": None}
    assert _entries(tmp_path / "m") == [rundir.CHECKPOINT_FORMAT]
    full = run(spec, tmp_path / "f", tiny_options(data_root, final_checkpoint="full", **opts))
    last = full["steps"] - 1  # the diverged step itself is never saved
    assert full["final_checkpoint"] == {
        "kind": "full",
        "path": f"checkpoints/step_{last:08d}",
        "step": last,
    }
    assert ckpt.complete_steps(tmp_path / "f") == [last]


# ---- time-based saves -------------------------------------------------------------------------
TIMED = {"checkpoint_interval": None, "keep_checkpoints": 10**6, "prune_checkpoints": False}


def test_saves_follow_the_clock(tmp_path, data_root):
    """checkpoint_minutes alone decides: saves at least that far apart (the trainer's own
    elapsed_s per step says so), several of them in a run that lasts several periods, none
    with the clock off."""
    period_min = 0.004  # 0.24 s; a step takes ~10-50 ms here, a save ~0.1 s
    timed = tmp_path / "timed"
    run(
        tiny_spec(tokens=4 * 32 * 60),
        timed,
        tiny_options(data_root, checkpoint_minutes=period_min, **TIMED),
    )
    steps = ckpt.complete_steps(timed)
    elapsed = {r["step"]: r["elapsed_s"] for r in rundir.read_metrics(timed)}
    span = elapsed[60] - elapsed[1]
    assert 2 <= len(steps) <= span / (60 * period_min) + 1, (steps, span)
    gaps = [elapsed[b] - elapsed[a] for a, b in zip(steps, steps[1:], strict=False)]
    assert min(gaps) >= 60 * period_min, gaps
    off = tmp_path / "off"
    run(
        tiny_spec(tokens=4 * 32 * 60),
        off,
        tiny_options(data_root, checkpoint_minutes=None, **TIMED),
    )
    assert ckpt.complete_steps(off) == []
    both = tmp_path / "both"
    opts = {**TIMED, "checkpoint_interval": 25}
    run(
        tiny_spec(tokens=4 * 32 * 60), both, tiny_options(data_root, checkpoint_minutes=1e6, **opts)
    )
    assert ckpt.complete_steps(both) == [25, 50]  # the step interval still works alone


@pytest.mark.timeout(240)
def test_data_parallel_ranks_save_at_rank_zeros_clock(tmp_path, data_root):
    """Two gloo ranks, saves by the clock only: rank 0's verdict rides on the per-step
    all-reduce, so both ranks enter every collective save at the same step (a rank saving
    alone would deadlock the run); every save is complete, with both ranks' shards."""
    run_dir = tmp_path / "run"
    cmd = [sys.executable, "-W", "ignore", "-m", "torch.distributed.run", "--standalone"]
    cmd += ["--nproc_per_node=2", "-m", "tests.dp_child", str(run_dir), str(data_root)]
    cmd += [str(4 * 32 * 60), "timed"]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO)}
    env.pop("WANDB_SERVICE", None)
    proc = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, timeout=200)
    assert proc.returncode == 0, proc.stderr.decode()[-3000:]
    steps = ckpt.complete_steps(run_dir)
    assert len(steps) >= 2, steps
    for step in steps:
        shards = {p.name.split("_")[2] for p in ckpt.step_dir(run_dir, step).glob("__*_*.distcp")}
        assert shards == {"0", "1"}, (step, shards)
    result = json.loads(rundir.result_path(run_dir).read_text())
    assert result["status"] == "done" and result["steps"] == 60
    # and the newest timed save resumes like any other: a copy without result.json finishes
    copy = tmp_path / "copy"
    shutil.copytree(run_dir, copy)
    rundir.result_path(copy).unlink()
    shutil.rmtree(rundir.final_checkpoint_dir(copy))
    again = run(tiny_spec(tokens=4 * 32 * 60), copy, tiny_options(data_root, **TIMED))
    assert again["steps"] == 60 and len(_losses(copy)) == 60
