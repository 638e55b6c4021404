"""Training throughput of the megatron-core path: tokens/s (CPU: demo shapes; GPU: + MFU).

    python benchmarks/bench_train.py [--steps 30] [--threads N] [--out DIR]

CPU (fp32, local spec): demo_dense and demo_moe at seq 128. GPU (bf16, Transformer Engine
spec), when CUDA is present: also dense_1b at seq 2048, with MFU = tokens/s * FLOPs per token /
peak bf16 FLOPs (steplaw_train/flops.py: the paper's M plus the LM head's 6Vh, the same count the
sweep's GPU-hour estimate uses). Each shape runs
through `steplaw_train.train.run` in a fresh process, so the figures include nothing but the real
training loop; the first logged steps (warm-up, allocator) are excluded from the median.
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

CHILD = """
import sys, json
from pathlib import Path
import yaml
from steplaw_train.config import config_dir, model_from_cfg, data_from_cfg
from steplaw_train.options import RunOptions
from steplaw_train.spec import RunSpec, TrainSpec
from steplaw_train.train import run
preset, seq, bs, steps, out, data_root, threads = sys.argv[1:8]
cfg = lambda g, n: yaml.safe_load((config_dir() / g / f"{n}.yaml").read_text())
spec = RunSpec(model_from_cfg(cfg("model", preset)), data_from_cfg(cfg("data", "demo")),
               TrainSpec(lr=1e-3, batch_size=int(bs), tokens=int(bs) * int(seq) * int(steps),
                         seq_len=int(seq)))
opts = RunOptions(data_root=Path(data_root), checkpoint_interval=10**9, wandb_mode="disabled",
                  num_threads=int(threads) or None)
if __name__ == "__main__":
    run(spec, out, opts)
"""


def bench(preset: str, seq: int, bs: int, steps: int, threads: int, data_root: Path) -> dict:
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "run"
        env = {**os.environ, "PYTHONPATH": str(REPO), "WANDB_MODE": "disabled"}
        args = [preset, seq, bs, steps, out, data_root, threads]
        subprocess.run(
            [sys.executable, "-W", "ignore", "-c", CHILD, *map(str, args)],
            check=True,
            env=env,
            stdout=subprocess.DEVNULL,
        )
        rows = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
        derived = json.loads((out / "spec.json").read_text())["derived"]
    steady = rows[min(5, len(rows) - 1) :]
    res = {
        "preset": preset,
        "seq_len": seq,
        "batch": bs,
        "micro_batch": derived["micro_batch_size"],
        "precision": derived["precision"],
        "N": derived["N"],
        "tokens_per_s": statistics.median(r["tokens_per_s"] for r in steady),
    }
    if "mfu" in steady[0]:
        res["mfu"] = statistics.median(r["mfu"] for r in steady)
    return res


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--steps", type=int, default=30)
    ap.add_argument("--threads", type=int, default=0, help="torch CPU threads (0: default)")
    ap.add_argument("--data-root", type=Path, default=None)
    args = ap.parse_args()
    import torch

    data_root = args.data_root or Path(tempfile.mkdtemp()) / "data"
    cases = [("demo_dense", 128, 8), ("demo_moe", 128, 8)]
    if torch.cuda.is_available():
        cases = [("demo_dense", 128, 8), ("dense_1b", 2048, 8)]
    device = (
        torch.cuda.get_device_name(0)
        if torch.cuda.is_available()
        else (f"cpu, {args.threads or torch.get_num_threads()} threads")
    )
    print(f"device: {device}; torch {torch.__version__}")
    for preset, seq, bs in cases:
        r = bench(preset, seq, bs, args.steps, args.threads, data_root)
        mfu = f"  MFU {100 * r['mfu']:.1f}%" if "mfu" in r else ""
        print(
            f"{r['preset']:<11} N={r['N']:>13,}  seq {r['seq_len']}  batch {r['batch']} "
            f"(micro {r['micro_batch']})  {r['precision']}  {r['tokens_per_s']:>10,.0f} tokens/s{mfu}"
        )


if __name__ == "__main__":
    main()
