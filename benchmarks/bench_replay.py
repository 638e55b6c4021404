"""Replay the guided search on the released dense table: figures for docs/search.md.

    python benchmarks/bench_replay.py [--data FILE]

Prints, per prior and batch size, GPU-hours / runs fraction, mean and max gap (per mille) and
the wall time of the whole replay; then the same under perturbations of the table (lr or bs
grid shifted against the law, extra noise, half the cells) that show the method is not tuned
to this one table.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout, not installed

from analysis import collect  # noqa: E402
from analysis.replay import replay  # noqa: E402
from steplaw_train.search import SearchConfig  # noqa: E402


def line(name: str, df, **kw) -> None:
    t0 = time.perf_counter()
    _, tot, _ = replay(df, SearchConfig(**kw))
    dt = time.perf_counter() - t0
    print(
        f"{name:<26} {kw.get('prior', 'steplaw'):<8} batch {kw.get('batch', 1)}  "
        f"GPU-h {100 * tot['gpu_hours_fraction']:5.2f}%  runs {100 * tot['runs_fraction']:5.2f}%  "
        f"gap mean {tot['mean_gap_permille']:.3f}‰ max {tot['max_gap_permille']:.3f}‰  {dt:.2f} s"
    )


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--data", default=str(collect.released_dense_csv()))
    args = p.parse_args()
    df = collect.read_released(args.data)
    for prior in ("steplaw", "none"):
        for batch in (1, 2, 4):
            line("released table", df, prior=prior, batch=batch)
    rng = np.random.default_rng(0)
    variants = {
        "lr grid x2 vs law": df.assign(lr=df.lr * 2),
        "lr grid x0.5 vs law": df.assign(lr=df.lr * 0.5),
        "bs grid x2 vs law": df.assign(bs=df.bs * 2, bs_tokens=df.bs_tokens * 2),
        "+0.5‰ extra noise": df.assign(
            smooth_loss=df.smooth_loss * (1 + 5e-4 * rng.standard_normal(len(df)))
        ),
    }
    keys = sorted(set(zip(df.N, df.D, strict=True)))
    for name, drop in (("even cells only", keys[1::2]), ("odd cells only", keys[::2])):
        variants[name] = df[~df.set_index(["N", "D"]).index.isin(drop)].reset_index(drop=True)
    for name, d in variants.items():
        for prior in ("steplaw", "none"):
            line(name, d, prior=prior)


if __name__ == "__main__":
    main()
