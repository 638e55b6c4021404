"""The GPU path's first-contact check: one script, one H100/H200-class GPU, <= 8 minutes.

    python benchmarks/gpu_check.py [--out gpu_check.json] [--budget-s 470] [--cpu-smoke]

Writes a JSON of figures, rewritten (atomically) after every part, so a check cut short still
leaves what it measured; every part runs in its own subprocess(es) with a timeout, and an error
is recorded (with the tail of the child's stderr) instead of stopping the check. Parts:

  env          device, versions (torch, CUDA, NCCL, TE, megatron-core), fused kernels found
  throughput   dense_1b, TE spec, bf16, the paper's 32k vocabulary, seq 2048: tokens/s of the
               full training loop and of a bare megatron-core loop (benchmarks/bench_train.py),
               their ratio, and MFU with the LM head (steplaw_train.flops)
  moe          every configs/model/moe_* preset builds and trains a few steps (router, top-k,
               shared expert unchanged; layers cut only if the parameters would not fit), with
               MoE grouped GEMM and permute fusion: the flags used are recorded
  checkpoint   dense_1b with the distributed optimizer: peak host RSS of one checkpoint save
               (dp_reshardable) above the trained state, save and load seconds, size on disk
  kill_resume  a small dense run killed with SIGKILL after its first checkpoint and rerun, vs
               the same run uninterrupted: max loss difference (fp tolerance expected)
  kill_resume_deterministic   the same with options.deterministic=true: bitwise expected

Parts run in this order (most wanted figures first); one that would not fit in what is left of
the budget is recorded as skipped.

`--cpu-smoke` runs the same code paths on tiny CPU shapes (a test does, in < 2 minutes; MoE: one
preset per router kind, top-1 and top-k, instead of every preset); its figures say nothing
about a GPU.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import signal
import subprocess
import sys
import tempfile
import time
import traceback
from dataclasses import replace
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(REPO), str(REPO / "benchmarks")]

# shapes: (GPU, CPU smoke)
THROUGHPUT = {"gpu": ("dense_1b", 2048, 16, 4, 20), "cpu": ("demo_dense", 64, 4, 4, 6)}
KILL = {"gpu": ("dense_60m", 1024, 16, 120, 20), "cpu": (None, 32, 4, 40, 10)}
MOE_STEPS = {"gpu": (1024, 8, 4, 6), "cpu": (32, 4, 4, 3)}  # seq, batch, micro, steps
CKPT = {"gpu": ("dense_1b", 2048, 4), "cpu": ("demo_dense", 64, 4)}  # preset, seq, batch


# ---- the spec every child builds ----------------------------------------------------------------
def make_spec(args: dict):
    """RunSpec from a child's JSON arguments: a preset (or the tests' tiny shape), the paper
    recipe's vocabulary over the demo corpus, and optional overrides of the model."""
    import yaml

    from steplaw_train.config import config_dir, data_from_cfg, model_from_cfg
    from steplaw_train.spec import ModelSpec, RunSpec, TrainSpec

    def load(group: str, name: str) -> dict:
        return yaml.safe_load((config_dir() / group / f"{name}.yaml").read_text())

    vocab = int(load("data", "paper")["vocab_size"])
    data = replace(data_from_cfg(load("data", "demo")), vocab_size=vocab)
    if args.get("preset"):
        model = model_from_cfg(load("model", args["preset"]))
    else:
        model = ModelSpec(name="tiny", hidden=32, ffn_hidden=64, heads=4, layers=2)
    if args.get("model"):
        over = dict(args["model"])
        moe = over.pop("moe", None)
        model = replace(model, **over)
        if moe:
            model = replace(model, moe=replace(model.moe, **moe))
    seq, bs, steps = args["seq"], args["batch"], args["steps"]
    train = TrainSpec(lr=1e-3, batch_size=bs, tokens=bs * seq * steps, seq_len=seq, seed=3)
    return RunSpec(model=model, data=data, train=train)


def make_options(args: dict):
    from steplaw_train.options import RunOptions

    return RunOptions(
        data_root=Path(args["data_root"]),
        max_micro_batch=args.get("micro", 8),
        checkpoint_interval=args.get("checkpoint_interval", 10**9),
        wandb_mode="disabled",
        deterministic=bool(args.get("deterministic", False)),
        num_threads=args.get("threads"),
    )


# ---- children (run as `gpu_check.py --child NAME JSON`) ------------------------------------------
def child_env(args: dict) -> dict:
    import torch

    from steplaw_train.model import Kernels
    from steplaw_train.train import versions

    cuda = torch.cuda.is_available()
    out = {
        "cuda_available": cuda,
        "versions": versions(),
        "cuda": torch.version.cuda,
        "kernels": vars(Kernels.detect(cuda)) if cuda else {"te": False, "wgrad_fusion": False},
    }
    if cuda:
        props = torch.cuda.get_device_properties(0)
        out.update(
            device=torch.cuda.get_device_name(0),
            device_count=torch.cuda.device_count(),
            memory_gb=props.total_memory / 2**30,
            nccl=".".join(map(str, torch.cuda.nccl.version())),
        )
    return out


def child_train(args: dict) -> dict:
    """train.run on the spec; returns the losses, rates, result and the kernel flags used."""
    import torch

    from steplaw_train.model import Kernels, config_kwargs
    from steplaw_train.train import run

    spec, options = make_spec(args), make_options(args)
    result = run(spec, args["run_dir"], options)
    rows = [json.loads(x) for x in (Path(args["run_dir"]) / "metrics.jsonl").open()]
    cuda = torch.cuda.is_available()
    kw = config_kwargs(spec.model, cuda, cuda, Kernels.detect(cuda), options.deterministic)
    flags = (
        "moe_grouped_gemm",
        "moe_permute_fusion",
        "apply_rope_fusion",
        "cross_entropy_loss_fusion",
        "gradient_accumulation_fusion",
        "moe_router_pre_softmax",
    )
    return {
        "result": result,
        "losses": [r["loss"] for r in rows],
        "tokens_per_s": [r["tokens_per_s"] for r in rows],
        "flags": {f: kw[f] for f in flags if f in kw},
        "N": spec.N,
        "peak_gpu_memory_gb": torch.cuda.max_memory_allocated() / 2**30 if cuda else None,
    }


def child_checkpoint(args: dict) -> dict:
    """Train 2 steps with the distributed optimizer, then one save and one load; peak host RSS
    (this process and megatron's writer children, sampled every 20 ms) during the save."""
    import threading

    import psutil
    import torch
    from megatron.core.pipeline_parallel import get_forward_backward_func

    from steplaw_train import checkpoint as ckpt
    from steplaw_train import distributed
    from steplaw_train.train import (
        build_components,
        build_dataset,
        forward_step,
        host_batches,
        make_plan,
    )

    spec, options = make_spec(args), make_options(args)
    options = replace(options, distributed_optimizer=True)
    cuda = torch.cuda.is_available()
    if not cuda:
        from steplaw_train import _cpu_compat

        _cpu_compat.apply()
    world = distributed.init(cuda)
    distributed.set_seed(spec.train.seed, cuda)
    plan = make_plan(spec, options, cuda, 1)
    model, optimizer, scheduler = build_components(spec, plan)
    batches = host_batches(build_dataset(spec, options), 0, spec.train.batch_size, 0, plan, False)
    fwd_bwd = get_forward_backward_func()
    for _ in range(2):
        model.zero_grad_buffer()
        optimizer.zero_grad()
        it = iter([{k: v.to(world.device) for k, v in next(batches).items()}
                   for _ in range(plan.num_microbatches)])  # fmt: skip
        fwd_bwd(
            forward_step_func=forward_step,
            data_iterator=it,
            model=[model],
            num_microbatches=plan.num_microbatches,
            seq_length=spec.train.seq_len,
            micro_batch_size=plan.micro_batch_size,
            forward_only=False,
        )
        optimizer.step()
    me = psutil.Process()

    def rss() -> int:
        total = me.memory_info().rss
        for c in me.children(recursive=True):
            with contextlib.suppress(psutil.Error):
                total += c.memory_info().rss
        return total

    base, peak, stop = rss(), [0], threading.Event()

    def sample() -> None:
        while not stop.is_set():
            peak[0] = max(peak[0], rss())
            time.sleep(0.02)

    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    state = ckpt.TrainState(step=2, consumed_samples=2 * spec.train.batch_size)
    run_dir = Path(args["run_dir"])
    t0 = time.perf_counter()
    path = ckpt.save(run_dir, model, optimizer, scheduler, state, keep=1)
    save_s = time.perf_counter() - t0
    stop.set()
    sampler.join()
    t0 = time.perf_counter()
    ckpt.load(run_dir, 2, model, optimizer, scheduler)
    load_s = time.perf_counter() - t0
    size = sum(p.stat().st_size for p in path.rglob("*") if p.is_file())
    distributed.shutdown()
    return {
        "preset": spec.model.name,
        "N": spec.N,
        "sharding": ckpt.sharding_metadata(path),
        "rss_before_save_gb": base / 2**30,
        "peak_rss_during_save_gb": peak[0] / 2**30,
        "save_extra_gb": (peak[0] - base) / 2**30,
        "save_s": save_s,
        "load_s": load_s,
        "size_gb": size / 2**30,
    }


CHILDREN = {"env": child_env, "train": child_train, "checkpoint": child_checkpoint}


# ---- the parent -----------------------------------------------------------------------------------
class Budget:
    def __init__(self, seconds: float) -> None:
        self.end = time.monotonic() + seconds

    def left(self) -> float:
        return self.end - time.monotonic()

    def cap(self, timeout: float) -> float:
        """A child's timeout, never past the check's end (leaves 5 s to write the JSON)."""
        return max(1.0, min(timeout, self.left() - 5))


def _env() -> dict:
    env = {**os.environ, "PYTHONPATH": str(REPO), "WANDB_MODE": "disabled"}
    env.setdefault("OMP_NUM_THREADS", "1")
    return env


def spawn(name: str, args: dict, tmp: Path) -> tuple[subprocess.Popen, Path, Path]:
    result = tmp / f"{name}-{time.monotonic_ns()}.json"
    err = result.with_suffix(".err")
    cmd = [sys.executable, "-W", "ignore", __file__, "--child", name, json.dumps(args)]
    cmd.append(str(result))
    with open(err, "wb") as f:
        proc = subprocess.Popen(
            cmd, env=_env(), stdout=subprocess.DEVNULL, stderr=f, start_new_session=True
        )
    return proc, result, err


def _kill(proc: subprocess.Popen) -> None:
    with contextlib.suppress(ProcessLookupError):
        os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()


def call(name: str, args: dict, tmp: Path, timeout: float) -> dict:
    """Run one child to the end; its JSON, or RuntimeError with its stderr's tail."""
    proc, result, err = spawn(name, args, tmp)
    try:
        proc.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        _kill(proc)
        raise RuntimeError(f"{name}: timed out after {timeout:.0f}s; " + _tail(err)) from None
    finally:
        _kill(proc)  # whatever the child left in its process group
    if proc.returncode != 0 or not result.exists():
        raise RuntimeError(f"{name}: exit {proc.returncode}; " + _tail(err))
    return json.loads(result.read_text())


def _tail(path: Path, n: int = 2500) -> str:
    text = path.read_text(errors="replace") if path.exists() else ""
    return text[-n:]


def part_env(mode: str, tmp: Path, budget: Budget, common: dict) -> dict:
    return call("env", common, tmp, budget.cap(90))


def part_throughput(mode: str, tmp: Path, budget: Budget, common: dict) -> dict:
    import bench_train

    preset, seq, bs, micro, steps = THROUGHPUT[mode]
    import yaml

    m = yaml.safe_load((REPO / f"configs/model/{preset}.yaml").read_text())
    vocab = int(yaml.safe_load((REPO / "configs/data/paper.yaml").read_text())["vocab_size"])
    case = dict(preset=preset, seq=seq, batch=bs, mbs=micro, vocab=vocab, hidden=m["hidden"])
    warm = 5 if mode == "gpu" else 2
    data_root = Path(common["data_root"])
    # one pair: the GPU is ours alone (the CPU benchmark alternates several)
    res = bench_train.pairs(case, steps, warm, 0, data_root, repeats=1, timeout=budget.cap(240))
    tps_full, tps_bare = res["full"][0], res["bare"][0]
    out = {**case, "steps": steps, "tokens_per_s_full": tps_full, "tokens_per_s_bare": tps_bare}
    out.update(N=res["derived"]["N"], precision=res["derived"]["precision"])
    out.update(runs_full=res["full"], runs_bare=res["bare"], harness_ratio=tps_full / tps_bare)
    out.update(bench_train.flops_figures(case, res["derived"], tps_full, common.get("device", "")))
    return out


def moe_fit(model, gpu_gb: float | None) -> int:
    """Layers to keep so the parameters (bf16 weights + fp32 grads, main params, Adam: ~18
    bytes each) use at most half the GPU; the preset's own depth when they fit."""
    if not gpu_gb:
        return model.layers
    from steplaw_train import params

    per_layer = params.count(
        model.hidden,
        model.ffn_hidden,
        model.layers,
        1,
        model.moe.num_experts,
        model.moe.topk,
        model.moe.expert_ffn_hidden,
        model.moe.shared_expert_ffn_hidden,
        model.moe.dense_layers,
    ).N / max(1, model.layers)
    fit = int(0.5 * gpu_gb * 2**30 / (18 * per_layer))
    return max(model.moe.dense_layers + 1, min(model.layers, fit))


def part_moe(mode: str, tmp: Path, budget: Budget, common: dict) -> dict:
    from steplaw_train.config import config_dir, model_from_cfg

    seq, bs, micro, steps = MOE_STEPS[mode]
    import yaml

    out: dict = {}
    paths = sorted((config_dir() / "model").glob("moe_*.yaml"))
    presets = {p: model_from_cfg(yaml.safe_load(p.read_text())) for p in paths}
    if mode == "cpu":  # one preset per router kind (top-1, top-k): the code paths, not shapes
        # (tests/test_gpu_path.py trains every preset shrunk, in one process)
        first: dict[bool, Path] = {}
        for p, m in presets.items():
            first.setdefault(m.moe.topk == 1, p)
        presets = {p: presets[p] for p in sorted(first.values())}
    for path, full in presets.items():
        if mode == "gpu":
            over = {"layers": moe_fit(full, common.get("memory_gb"))}
        else:  # CPU size; router settings unchanged
            e = full.moe
            over = {
                "hidden": 32,
                "ffn_hidden": 64,
                "heads": 4,
                "layers": e.dense_layers + 1,
                "moe": {
                    "expert_ffn_hidden": 16,
                    "shared_expert_ffn_hidden": 16 if e.shared_expert_ffn_hidden else 0,
                },
            }
        args = {
            **common,
            "preset": path.stem,
            "model": over,
            "seq": seq,
            "batch": bs,
            "micro": micro,
            "steps": steps,
            "run_dir": str(tmp / f"moe-{path.stem}"),
        }
        entry = {"layers": over.get("layers"), "preset_layers": full.layers}
        try:
            r = call("train", args, tmp, budget.cap(150))
            entry.update(
                status="ok" if r["result"]["status"] == "done" else r["result"]["status"],
                steps=r["result"]["steps"],
                losses=r["losses"],
                flags=r["flags"],
                N=r["N"],
                tokens_per_s=r["tokens_per_s"][-1],
                peak_gpu_memory_gb=r["peak_gpu_memory_gb"],
            )
        except Exception as e:  # one preset's failure must not hide the others
            entry.update(status="error", error=str(e)[-3000:])
        out[path.stem] = entry
    failed = [k for k, v in out.items() if v["status"] != "ok"]
    if failed:  # the part counts as failed; every preset's record stays
        out.update(status="error", error=f"presets not ok: {failed}")
    return out


def _kill_resume(mode: str, tmp: Path, budget: Budget, common: dict, det: bool) -> dict:
    from steplaw_train import checkpoint as ckpt

    preset, seq, bs, steps, interval = KILL[mode]
    base = {
        **common,
        "preset": preset,
        "seq": seq,
        "batch": bs,
        "micro": 8,
        "steps": steps,
        "checkpoint_interval": interval,
        "deterministic": det,
    }
    tag = "det" if det else "default"
    ref = call("train", {**base, "run_dir": str(tmp / f"ref-{tag}")}, tmp, budget.cap(120))
    run_dir = tmp / f"killed-{tag}"
    proc, _, err = spawn("train", {**base, "run_dir": str(run_dir)}, tmp)
    deadline = time.monotonic() + budget.cap(120)
    killed_at = None
    try:
        while time.monotonic() < deadline and proc.poll() is None:
            if ckpt.latest_step(run_dir) is not None:
                os.killpg(proc.pid, signal.SIGKILL)
                killed_at = ckpt.latest_step(run_dir)
                break
            time.sleep(0.02)
    finally:
        _kill(proc)
    if killed_at is None:
        raise RuntimeError(f"no checkpoint to kill at (exit {proc.returncode}); {_tail(err)}")
    again = call("train", {**base, "run_dir": str(run_dir)}, tmp, budget.cap(120))
    a, b = ref["losses"], again["losses"]
    diffs = [abs(x - y) for x, y in zip(a, b, strict=False)]
    return {
        "deterministic": det,
        "killed_after_checkpoint": killed_at,
        "steps": [len(a), len(b)],
        "bitwise_equal": a == b,
        "max_abs_loss_diff": max(diffs) if diffs else None,
        "max_abs_loss_diff_after_resume": max(diffs[killed_at:], default=None),
        "final_loss": [a[-1], b[-1]],
    }


def part_kill_resume(mode: str, tmp: Path, budget: Budget, common: dict) -> dict:
    return _kill_resume(mode, tmp, budget, common, det=False)


def part_kill_resume_deterministic(mode: str, tmp: Path, budget: Budget, common: dict) -> dict:
    """The same with options.deterministic=true: the curves must be bitwise equal. CPU runs are
    deterministic anyway and the option does nothing there: the smoke skips this pair (its code
    is the part above with one flag)."""
    if mode == "cpu":
        return {"status": "skipped", "error": "CPU: options.deterministic has no effect"}
    return _kill_resume(mode, tmp, budget, common, det=True)


def part_checkpoint(mode: str, tmp: Path, budget: Budget, common: dict) -> dict:
    preset, seq, bs = CKPT[mode]
    args = {**common, "preset": preset, "seq": seq, "batch": bs, "micro": 1, "steps": 4}
    return call("checkpoint", {**args, "run_dir": str(tmp / "ckpt")}, tmp, budget.cap(150))


PARTS = (
    ("env", part_env, 20),
    ("throughput", part_throughput, 100),
    ("moe", part_moe, 90),
    ("checkpoint", part_checkpoint, 60),
    ("kill_resume", part_kill_resume, 60),
    ("kill_resume_deterministic", part_kill_resume_deterministic, 60),
)  # (name, function, seconds it needs at least to be worth starting), most important first


def write_json(path: Path, data: dict) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(json.dumps(data, indent=2, default=str))
    os.replace(tmp, path)


def check(out: Path, mode: str, budget_s: float, data_root: Path | None) -> dict:
    budget = Budget(budget_s)
    report: dict = {
        "mode": mode,
        "started": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "budget_s": budget_s,
        "parts": {},
    }
    with tempfile.TemporaryDirectory(prefix="gpu_check-") as t:
        tmp = Path(t)
        common: dict = {"data_root": str(data_root or tmp / "data")}
        if mode == "cpu":
            common["threads"] = 1
        for name, fn, needs in PARTS:
            t0 = time.monotonic()
            if budget.left() < needs:
                entry = {"status": "skipped", "error": f"{budget.left():.0f}s left, needs {needs}"}
            else:
                try:
                    entry = {"status": "ok", **fn(mode, tmp, budget, common)}  # fn may override
                except Exception as e:
                    entry = {"status": "error", "error": f"{e}"[-4000:]}
                    entry["traceback"] = traceback.format_exc()[-2000:]
            entry["seconds"] = round(time.monotonic() - t0, 1)
            report["parts"][name] = entry
            if name == "env" and entry["status"] == "ok":
                common["device"] = entry.get("device", "")
                common["memory_gb"] = entry.get("memory_gb")
            report["elapsed_s"] = round(budget_s - budget.left(), 1)
            write_json(out, report)
            print(f"[{report['elapsed_s']:>6.1f}s] {name}: {entry['status']}", flush=True)
    report["finished"] = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
    write_json(out, report)
    return report


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", type=Path, default=Path("gpu_check.json"))
    ap.add_argument("--budget-s", type=float, default=470.0)
    ap.add_argument("--cpu-smoke", action="store_true", help="tiny CPU shapes (tests)")
    ap.add_argument("--data-root", type=Path, default=None)
    ap.add_argument("--child", nargs=3, metavar=("NAME", "ARGS", "RESULT"), help=argparse.SUPPRESS)
    a = ap.parse_args()
    if a.child:
        name, args, result = a.child
        res = CHILDREN[name](json.loads(args))
        Path(result).write_text(json.dumps(res, default=str))
        return
    mode = "cpu" if a.cpu_smoke else "gpu"
    if mode == "gpu":
        import torch

        if not torch.cuda.is_available():
            sys.exit("gpu_check: no CUDA device (use --cpu-smoke on a CPU machine)")
    report = check(a.out, mode, a.budget_s, a.data_root)
    bad = [n for n, p in report["parts"].items() if p["status"] == "error"]
    print(f"wrote {a.out}; parts with errors: {bad or 'none'}")
    sys.exit(1 if bad else 0)


if __name__ == "__main__":
    main()
