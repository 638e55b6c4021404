"""The GPU path as far as a CPU can prove it: every preset builds megatron's config, the MoE
router settings train, local jobs get GPUs, CUDA without TE is refused, per-entry index locks.

GPU facts are faked only at torch.cuda's own functions (device counts), never megatron's.
"""

from __future__ import annotations

import io
import json
import os
import threading
import time
from dataclasses import replace
from pathlib import Path

import pytest
import submitit
import torch
import yaml

from launch import executors
from steplaw_train import corpus, locks
from steplaw_train.config import config_dir, model_from_cfg
from steplaw_train.distributed import cuda_device_index
from steplaw_train.model import (
    TE_REQUIRED,
    Kernels,
    build_model,
    check_buildable,
    config_kwargs,
)
from steplaw_train.spec import ModelSpec, RunSpec, SpecError, TrainSpec
from steplaw_train.train import make_plan, resolve_device, run
from tests.conftest import TINY_DATA, sweep_cfg, tiny_options, tiny_spec

PRESETS = sorted((config_dir() / "model").glob("*.yaml"))


def preset(path: Path) -> ModelSpec:
    return model_from_cfg(yaml.safe_load(path.read_text()))


MOE_PRESETS = [p for p in PRESETS if preset(p).moe is not None]


# ---- every preset builds ------------------------------------------------------------------------
@pytest.mark.parametrize("path", PRESETS, ids=lambda p: p.stem)
def test_every_preset_builds_its_megatron_config(path: Path):
    """CPU and GPU variants; top-1 presets used to raise 'Please use --moe-router-pre-softmax'."""
    model = preset(path)
    check_buildable(model)
    if model.moe is not None:
        kw = config_kwargs(model, bf16=True, use_cuda=True)
        assert kw["moe_router_pre_softmax"] == (model.moe.topk == 1)


def test_a_config_megatron_rejects_is_a_spec_error_naming_the_model():
    """check_buildable surfaces megatron's own refusal (validate() would catch this one first;
    here it shows that construction errors become SpecError('model', ...))."""
    bad = replace(
        preset(MOE_PRESETS[0]), moe=replace(preset(MOE_PRESETS[0]).moe, shared_expert_ffn_hidden=-1)
    )
    with pytest.raises(SpecError, match=r"^model: megatron rejects preset") as err:
        check_buildable(bad)
    assert "moe_shared_expert_intermediate_size" in str(err.value)


def test_dry_run_builds_every_model_shape(tmp_path):
    """A dry run over every preset builds each one's megatron config before printing the table."""
    names = ",".join(p.stem for p in PRESETS)
    block = f"grid.blocks=[{{model:[{names}],tokens:[1.0e9],lr:[0.001],batch_size:[64]}}]"
    from steplaw_train.sweep import sweep

    cfg = sweep_cfg(
        "+grid=tiny", block, f"sweep_dir={tmp_path / 'sw'}", "dry_run=true", "launcher=local"
    )
    buf = io.StringIO()
    res = sweep(cfg, out=buf)
    assert res.submitted == ()
    assert f"megatron configs built for {len(PRESETS)} model shape(s)" in buf.getvalue()


# ---- every MoE preset trains (shrunk to CPU size, router settings unchanged) --------------------
def shrink(model: ModelSpec) -> ModelSpec:
    """CPU size; num_experts, topk, shared expert (present or not), dense layers, aux loss kept."""
    e = model.moe
    return replace(
        model,
        hidden=32,
        ffn_hidden=64,
        heads=4,
        layers=e.dense_layers + 1,
        moe=replace(
            e,
            expert_ffn_hidden=16,
            shared_expert_ffn_hidden=16 if e.shared_expert_ffn_hidden else 0,
        ),
    )


@pytest.mark.parametrize("path", MOE_PRESETS, ids=lambda p: p.stem)
def test_every_moe_preset_shrunk_trains_a_few_steps(path: Path, tmp_path, data_root):
    full = preset(path)
    model = shrink(full)
    assert (model.moe.num_experts, model.moe.topk) == (full.moe.num_experts, full.moe.topk)
    spec = RunSpec(
        model=model,
        data=TINY_DATA,
        train=TrainSpec(lr=3e-3, batch_size=4, tokens=4 * 32 * 4, seq_len=32, seed=1),
    )
    result = run(spec, tmp_path / "run", tiny_options(data_root))
    assert result["status"] == "done" and result["steps"] == 4
    rows = [json.loads(x) for x in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert all(r["moe_aux_loss"] > 0 for r in rows)
    derived = json.loads((tmp_path / "run" / "spec.json").read_text())["derived"]
    assert derived["parameters"]["matrices"] == spec.N  # the shape the spec describes


# ---- fused kernels and determinism flags ---------------------------------------------------------
def test_fusions_only_on_gpu_and_only_where_their_kernels_exist():
    moe = preset(MOE_PRESETS[0])
    cpu = config_kwargs(
        moe, bf16=False, use_cuda=False, kernels=Kernels(te=True, wgrad_fusion=True)
    )
    gpu = config_kwargs(moe, bf16=True, use_cuda=True, kernels=Kernels(te=True, wgrad_fusion=True))
    no_te = config_kwargs(moe, bf16=True, use_cuda=True, kernels=Kernels())
    flags = (
        "apply_rope_fusion",
        "cross_entropy_loss_fusion",
        "moe_grouped_gemm",
        "moe_permute_fusion",
        "gradient_accumulation_fusion",
    )
    assert not any(cpu[f] for f in flags)
    assert all(gpu[f] for f in flags)
    assert not any(no_te[f] for f in flags)
    det = config_kwargs(moe, True, True, Kernels(te=True), deterministic=True)
    assert det["deterministic_mode"] and not det["cross_entropy_loss_fusion"]
    assert Kernels.detect(use_cuda=False) == Kernels()


def test_overlap_is_gpu_only_and_needs_the_distributed_optimizer(data_root):
    spec = tiny_spec()
    cpu = make_plan(spec, tiny_options(data_root), use_cuda=False, data_parallel=1)
    assert not cpu.distributed_optimizer and not cpu.overlap
    forced = make_plan(spec, tiny_options(data_root, distributed_optimizer=True), False, 1)
    assert forced.distributed_optimizer and not forced.overlap  # CPU: stays off
    gpu = make_plan(spec, tiny_options(data_root), use_cuda=True, data_parallel=1)
    assert gpu.distributed_optimizer and gpu.overlap
    plain = make_plan(spec, tiny_options(data_root, distributed_optimizer=False), True, 1)
    assert not plain.overlap


# ---- CUDA without TE, device selection ----------------------------------------------------------
def test_cuda_without_transformer_engine_is_refused(monkeypatch):
    """No silent fallback to megatron's local spec on a GPU (this environment has no TE)."""
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 8)
    assert Kernels.detect(use_cuda=True).te is False
    with pytest.raises(RuntimeError, match="Transformer Engine is not importable") as err:
        build_model(tiny_spec().model, 320, 32, bf16=True, use_cuda=True)
    assert str(err.value) == TE_REQUIRED and "--no-build-isolation" in TE_REQUIRED


def test_options_device_cuda_without_a_gpu_fails_before_any_work(tmp_path, data_root):
    with pytest.raises(SpecError, match=r"^options.device: is 'cuda' but torch sees no GPU"):
        run(tiny_spec(), tmp_path / "run", tiny_options(data_root, device="cuda"))
    assert not (tmp_path / "run").exists()
    with pytest.raises(SpecError, match=r"^options.device: must be one of"):
        resolve_device("gpu", True)
    assert resolve_device("auto", True) and not resolve_device("cpu", True)
    assert not resolve_device("auto", False)


@pytest.mark.parametrize(
    ("local_rank", "count", "index"),
    [(0, 8, 0), (5, 8, 5), (5, 1, 0), (3, 2, 1)],  # all GPUs of the node / one bound GPU per task
)
def test_cuda_device_is_local_rank_modulo_visible_gpus(local_rank, count, index):
    assert cuda_device_index(local_rank, count) == index


def test_cuda_device_index_needs_a_visible_gpu(monkeypatch):
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 0)
    with pytest.raises(RuntimeError, match="no GPU is visible"):
        cuda_device_index(0, torch.cuda.device_count())


# ---- the local launcher and GPUs ----------------------------------------------------------------
def test_local_gpu_ids_follow_the_parents_visible_devices(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "4,6")
    assert executors.torch_gpu_ids() == (4, 6)
    monkeypatch.delenv("CUDA_VISIBLE_DEVICES")
    assert executors.torch_gpu_ids() == (0, 1)
    with pytest.raises(SpecError, match="^launcher.gpus_per_run"):
        executors.local_gpu_ids(1, "GPU-3f2a")


def test_gpus_per_local_run_auto_and_loud_failures():
    assert executors.gpus_per_local_run("auto", (0, 1, 2), 3) == 1
    assert executors.gpus_per_local_run("auto", (), 0) == 0  # a CPU box
    assert executors.gpus_per_local_run(0, (), 8) == 0  # explicit CPU on a GPU box
    with pytest.raises(SpecError, match="has 8 NVIDIA GPU.* torch sees none"):
        executors.gpus_per_local_run("auto", (), 8)
    with pytest.raises(SpecError, match="torch sees no GPU"):
        executors.gpus_per_local_run(1, (), 0)
    with pytest.raises(SpecError, match="must be auto, 0 or 1"):
        executors.gpus_per_local_run(2, (0, 1), 2)


def _visible_devices() -> str | None:
    return os.environ.get("CUDA_VISIBLE_DEVICES")


def test_local_job_sees_exactly_its_gpu(tmp_path):
    """submitit's LocalExecutor sets CUDA_VISIBLE_DEVICES from our parameters: "" (hidden) when no
    GPU is given, which is what every local job used to get."""
    seen = {}
    for gpu in (None, 3):
        ex = submitit.LocalExecutor(folder=tmp_path / "logs")
        ex.update_parameters(**executors.local_job_parameters(5, gpu))
        seen[gpu] = ex.submit(_visible_devices).result()
    assert seen == {None: "", 3: "3"}


def test_submit_local_spreads_runs_over_the_gpus_and_requires_cuda(tmp_path, monkeypatch):
    """Four runs on a box faking 2 GPUs: each job gets one GPU of its own, two at a time, and
    options.device='cuda', so here (no real GPU) every job fails loudly instead of training on
    the CPU."""
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    monkeypatch.delenv("CUDA_VISIBLE_DEVICES", raising=False)
    specs = [tiny_spec(lr=lr) for lr in (1e-3, 2e-3, 3e-3, 4e-3)]
    opts = tiny_options(tmp_path / "data")
    launcher = executors.build_launcher(
        {"name": "local", "parallelism": 4}, tmp_path / "sw", opts, executors.ResourceModel()
    )
    sub = launcher.submit(specs, out=io.StringIO())
    assert len(sub.failed) == 4
    gpus = []
    for s in specs:
        attempt = json.loads((tmp_path / "sw" / "runs" / s.run_id / "launch.json").read_text())
        attempt = attempt["attempts"][-1]
        gpus.append(attempt["gpu"])
        assert "options.device: is 'cuda' but torch sees no GPU" in attempt["error"]
        assert "CUDA_VISIBLE_DEVICES='" + str(attempt["gpu"]) + "'" in attempt["error"]
    assert sorted(set(gpus)) == [0, 1] and gpus[:2] == [0, 1]


# ---- per-entry dataset index locks --------------------------------------------------------------
def test_index_builds_of_different_entries_do_not_wait_for_each_other(data_root):
    """A build holding one cache entry's lock does not block another entry's build; the same
    entry waits (the global lock made every array task queue behind the first)."""
    from steplaw_train import data

    spec = tiny_spec()
    build = lambda n: data.build_train_dataset(  # noqa: E731
        spec.data, seq_len=32, num_samples=n, seed=11, data_root=data_root
    )
    build(64)  # the demo corpus exists before the timing below
    digests = {
        str(corpus.dataset_prefix("code", "byte", data_root.resolve())): data._idx_digest(
            str(corpus.dataset_prefix("code", "byte", data_root.resolve()))
        )
    }
    held = data._cache_entry(digests, None, 11, 32, 100)
    assert held != data._cache_entry(digests, None, 11, 32, 101)
    done, errors = {}, []

    def other(n):
        try:
            build(n)
        except Exception as e:  # a thread's exception would otherwise vanish
            errors.append(e)
        done[n] = time.monotonic()

    # one process group for both threads (each would otherwise create and destroy its own)
    with data._process_group():
        with locks.file_lock(data_root.resolve() / ".locks" / f"index-{held}.lock"):
            t0 = time.monotonic()
            free = threading.Thread(target=other, args=(101,))
            same = threading.Thread(target=other, args=(100,))
            free.start()
            same.start()
            free.join(timeout=60)
            assert 101 in done, "a different entry's build waited for the held lock"
            time.sleep(0.5)
            assert 100 not in done, "the same entry's build did not wait for its lock"
            released = time.monotonic()
        same.join(timeout=60)
    assert not errors and done[100] >= released > t0


# ---- the GPU path's batch prefetch (runs on CPU: it is plain threading) ---------------------------
def test_prefetch_keeps_order_reraises_and_stops_with_its_consumer():
    from steplaw_train.train import prefetched

    started = []
    assert list(prefetched(iter(range(50)), depth=3, on_start=lambda: started.append(1))) == list(
        range(50)
    )
    assert started == [1]

    def broken():
        yield 1
        raise ValueError("bad sample")

    it = prefetched(broken(), depth=2)
    assert next(it) == 1
    with pytest.raises(ValueError, match="bad sample"):
        next(it)

    produced = []

    def endless():
        i = 0
        while True:
            produced.append(i)
            yield i
            i += 1

    gen = prefetched(endless(), depth=2)
    assert [next(gen) for _ in range(5)] == [0, 1, 2, 3, 4]
    gen.close()  # the consumer goes away: the producer thread must stop, not run on
    time.sleep(0.5)
    n = len(produced)
    time.sleep(0.5)
    assert len(produced) == n <= 5 + 2 + 2
