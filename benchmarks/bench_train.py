"""Training throughput of the megatron-core path, and what the harness itself costs.

    python benchmarks/bench_train.py [--steps 30] [--repeats 2] [--threads N] [--json PATH]

Every shape trains with the paper recipe's real vocabulary (configs/data/paper.yaml: 32k), so
the LM head and the cross entropy cost what they cost in a sweep; the tokens come from the demo
corpus (byte ids < 320: the compute does not depend on which ids they are). Shapes: CPU (fp32,
local spec) demo_dense and demo_moe at seq 128; GPU (bf16, Transformer Engine spec) dense_1b and
moe_e8_k1 at seq 2048, with MFU = tokens/s x FLOPs per token / peak (steplaw_train.flops: the
non-embedding M plus the LM head's 6 V h).

Harness-cost ratio (target >= 0.97): tokens/s of the full training loop (`train.run`: data
iterator, metrics and wandb every step, the divergence guard, signal agreement and checkpoint
decisions) over tokens/s of a bare megatron-core loop (zero grads, forward/backward schedule,
optimizer step) on the same model, optimizer and micro-batching with one fixed batch already on
the device. Both run in one fresh process per shape, alternated `--repeats` times (drift and
noise from other processes hit both alike); the first `--warmup` steps are left out of both.
The script prints what it measured and what it could not.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]

COMMON = """
import json, sys, time
from dataclasses import replace
from pathlib import Path
import yaml
import torch
from steplaw_train.config import config_dir, model_from_cfg, data_from_cfg
from steplaw_train.options import RunOptions
from steplaw_train.spec import RunSpec, TrainSpec

def load(group, name):
    return yaml.safe_load((config_dir() / group / f"{name}.yaml").read_text())

def bench_spec(preset, seq, bs, steps):
    vocab = int(load("data", "paper")["vocab_size"])
    data = replace(data_from_cfg(load("data", "demo")), vocab_size=vocab)
    train = TrainSpec(lr=1e-3, batch_size=bs, tokens=bs * seq * steps, seq_len=seq)
    return RunSpec(model_from_cfg(load("model", preset)), data, train)

def bench_options(data_root, threads, mbs, wandb):
    return RunOptions(data_root=Path(data_root), checkpoint_interval=10**9, wandb_mode=wandb,
                      num_threads=threads or None, max_micro_batch=mbs,
                      checkpoint_minutes=None, final_checkpoint="none")  # the loop alone
"""

PAIRS = (
    COMMON
    + """
import gc
import shutil
from megatron.core.pipeline_parallel import get_forward_backward_func
from steplaw_train import distributed
from steplaw_train.train import build_components, build_dataset, forward_step, host_batches
from steplaw_train.train import make_plan, run
preset, seq, bs, steps, mbs, data_root, threads, warmup, repeats, tmp, result = sys.argv[1:12]
steps, warmup = int(steps), int(warmup)
spec = bench_spec(preset, int(seq), int(bs), steps)

def full(i):
    out = Path(tmp) / f"run{i}"
    run(spec, out, bench_options(data_root, int(threads), int(mbs), "offline"))
    rows = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    derived = json.loads((out / "spec.json").read_text())["derived"]
    shutil.rmtree(out)
    steady = rows[warmup:]  # log_interval 1: one row per step, its rate over its wall time
    seconds = sum(spec.tokens_per_step / r["tokens_per_s"] for r in steady)
    return len(steady) * spec.tokens_per_step / seconds, derived

def bare():
    opts = bench_options(data_root, int(threads), int(mbs), "disabled")
    use_cuda = torch.cuda.is_available()
    if opts.num_threads:
        torch.set_num_threads(opts.num_threads)
    if not use_cuda:
        from steplaw_train import _cpu_compat
        _cpu_compat.apply()
    world = distributed.init(use_cuda)
    try:
        distributed.set_seed(spec.train.seed, use_cuda)
        plan = make_plan(spec, opts, use_cuda, 1)
        model, optimizer, _ = build_components(spec, plan)
        it = host_batches(build_dataset(spec, opts), 0, spec.train.batch_size, 0, plan, False)
        batch = [{k: v.to(world.device) for k, v in next(it).items()}
                 for _ in range(plan.num_microbatches)]
        fwd_bwd = get_forward_backward_func()
        sync = torch.cuda.synchronize if use_cuda else (lambda: None)
        for step in range(steps):
            if step == warmup:
                sync()
                t0 = time.perf_counter()
            model.train()
            model.zero_grad_buffer()
            optimizer.zero_grad()
            fwd_bwd(forward_step_func=forward_step, data_iterator=iter(batch), model=[model],
                    num_microbatches=plan.num_microbatches, seq_length=spec.train.seq_len,
                    micro_batch_size=plan.micro_batch_size, forward_only=False)
            optimizer.step()
        sync()
        return (steps - warmup) * spec.tokens_per_step / (time.perf_counter() - t0)
    finally:
        distributed.shutdown()

if __name__ == "__main__":
    fulls, bares, derived = [], [], None
    for i in range(int(repeats)):  # alternated in one process: drift and noise hit both alike
        f, derived = full(i)
        fulls.append(f)
        gc.collect()  # the finished run's model and optimizer, before the next one is built
        if torch.cuda.is_available():
            torch.cuda.empty_cache()
        bares.append(bare())
        gc.collect()
    Path(result).write_text(json.dumps({"full": fulls, "bare": bares, "derived": derived}))
"""
)


def pairs(
    case: dict,
    steps: int,
    warmup: int,
    threads: int,
    data_root: Path,
    repeats: int,
    timeout: float = 3600,
) -> dict:
    """tokens/s of the full loop and of the bare loop, alternated `repeats` times in one fresh
    process (lists `full`, `bare`), and the run's derived figures."""
    with tempfile.TemporaryDirectory() as tmp:
        result = Path(tmp) / "result.json"
        env = {**os.environ, "PYTHONPATH": str(REPO), "WANDB_MODE": "offline"}
        env.setdefault("WANDB_DIR", tmp)
        args = [case["preset"], case["seq"], case["batch"], steps, case["mbs"], data_root]
        args += [threads, warmup, repeats, tmp, result]
        cmd = [sys.executable, "-W", "ignore", "-c", PAIRS, *map(str, args)]
        proc = subprocess.run(
            cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, timeout=timeout
        )
        if proc.returncode != 0:
            tail = proc.stderr.decode(errors="replace")[-2500:]
            raise RuntimeError(f"benchmark child exited {proc.returncode}: {tail}")
        return json.loads(result.read_text())


def flops_figures(case: dict, derived: dict, tokens_per_s: float, device: str) -> dict:
    """FLOPs per token (M + LM head) and MFU against the device's bf16 peak."""
    sys.path.insert(0, str(REPO))
    from steplaw_train import flops, params

    counts = params.Counts(N=derived["N"], Na=derived["Na"], M=derived["M"])
    fpt = flops.flops_per_token(counts, case["vocab"], case["hidden"])
    peak = flops.peak_flops(device)
    return {
        "flops_per_token": fpt,
        "mfu": tokens_per_s * fpt / peak if peak else None,
        "peak_flops": peak,
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--steps", type=int, default=30)
    ap.add_argument("--warmup", type=int, default=5)
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--threads", type=int, default=0, help="torch CPU threads (0: default)")
    ap.add_argument("--data-root", type=Path, default=None)
    ap.add_argument("--json", type=Path, default=None, help="also write the figures here")
    args = ap.parse_args()
    import torch
    import yaml

    data_root = args.data_root or Path(tempfile.mkdtemp()) / "data"
    vocab = int(yaml.safe_load((REPO / "configs/data/paper.yaml").read_text())["vocab_size"])
    cuda = torch.cuda.is_available()
    names = [("dense_1b", 2048, 16, 4), ("moe_e8_k1", 2048, 16, 4)] if cuda else []
    names = names or [("demo_dense", 128, 8, 8), ("demo_moe", 128, 8, 8)]
    cases = []
    for preset, seq, bs, mbs in names:
        m = yaml.safe_load((REPO / f"configs/model/{preset}.yaml").read_text())
        cases.append(
            dict(preset=preset, seq=seq, batch=bs, mbs=mbs, vocab=vocab, hidden=m["hidden"])
        )
    device = (
        torch.cuda.get_device_name(0)
        if cuda
        else f"cpu, {args.threads or torch.get_num_threads()} threads"
    )
    print(f"device: {device}; torch {torch.__version__}; vocabulary {vocab}")
    figures = {"device": device, "torch": torch.__version__, "vocab": vocab, "cases": []}
    for case in cases:
        res = pairs(case, args.steps, args.warmup, args.threads, data_root, args.repeats)
        full, bare, derived = res["full"], res["bare"], res["derived"]
        tps_full, tps_bare = statistics.median(full), statistics.median(bare)
        fig = {
            **case,
            "N": derived["N"],
            "precision": derived["precision"],
            "micro_batch": derived["micro_batch_size"],
            "tokens_per_s_full": tps_full,
            "tokens_per_s_bare": tps_bare,
            "harness_ratio": tps_full / tps_bare,
            "runs_full": full,
            "runs_bare": bare,
            **flops_figures(case, derived, tps_full, device if cuda else ""),
        }
        figures["cases"].append(fig)
        mfu = f"  MFU {100 * fig['mfu']:.1f}%" if fig["mfu"] else ""
        print(
            f"{case['preset']:<11} N={fig['N']:>13,}  seq {case['seq']}  batch {case['batch']} "
            f"(micro {fig['micro_batch']})  {fig['precision']}  full {tps_full:>9,.0f} tok/s  "
            f"bare {tps_bare:>9,.0f} tok/s  harness ratio {fig['harness_ratio']:.3f}{mfu}"
        )
        spread = [f / b for f, b in zip(full, bare, strict=True)]
        print(f"{'':<11} per-repeat ratios {', '.join(f'{r:.3f}' for r in spread)}")
    missing = []
    if not cuda:
        missing = [
            "MFU (no GPU: no bf16 peak to divide by)",
            "Transformer Engine spec, bf16 kernels, fused RoPE/cross entropy, MoE grouped GEMM",
            "dense_1b and moe_* at seq 2048 (CPU too slow; the GPU shapes)",
            "the GPU harness ratio (pinned-memory prefetch, overlap of grad reduce / param gather)",
        ]
    for m in missing:
        print(f"not measured: {m}")
    figures["not_measured"] = missing
    if args.json:
        args.json.write_text(json.dumps(figures, indent=2))


if __name__ == "__main__":
    main()
