"""Is planning linear in the grid's size? Dry-run `dense` (4,200 runs) and the same models with 50
data sizes (42,000 runs) end to end (compose + expand + validate + status + table + array plan),
and print both times and their ratio.

Targets (issue 11): 42,000 runs <= 10 s on the 2-core dev machine, 10x/1x ratio <= 11.
Usage (repo root): PYTHONPATH=. python benchmarks/bench_sweep.py [--max-array-size 1001]
                   [--profile]   (cProfile of the big grid, top 25 by cumulative time)
"""

from __future__ import annotations

import argparse
import cProfile
import io
import pstats
import tempfile
import time

import numpy as np
from hydra import compose, initialize_config_dir

from launch.executors import plan_arrays
from launch.resources import resource_class, resource_model
from steplaw_train.config import config_dir
from steplaw_train.sweep import sweep


def tokens_axis(n: int) -> str:
    """n data sizes spread log-uniformly over the dense grid's 2B ... 100B."""
    values = np.geomspace(2e9, 1e11, n).round(-6)
    return "[" + ",".join(f"{v:.6g}" for v in values) + "]"


def dry_run(grid_overrides: list[str], max_array_size: int):
    t0 = time.perf_counter()
    with (
        tempfile.TemporaryDirectory() as tmp,
        initialize_config_dir(config_dir=str(config_dir()), version_base="1.3"),
    ):
        cfg = compose(
            "sweep",
            overrides=[
                "+grid=dense",
                *grid_overrides,
                "dry_run=true",
                "launcher=slurm",
                f"launcher.max_array_size={max_array_size}",
                f"sweep_dir={tmp}/sw",
            ],
        )
        res = sweep(cfg, out=io.StringIO())
    return time.perf_counter() - t0, cfg, res


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--max-array-size", type=int, default=1001)
    p.add_argument("--profile", action="store_true")
    args = p.parse_args()
    big = [f"grid.blocks.0.tokens={tokens_axis(50)}"]
    dry_run([], args.max_array_size)  # warm imports and Hydra, so neither timing pays for them
    t1, cfg, res1 = dry_run([], args.max_array_size)
    t10, _, res10 = dry_run(big, args.max_array_size)
    rm = resource_model(cfg.resources)
    classes = {resource_class(s, rm) for s in res1.specs}
    chunks = plan_arrays(res1.specs, rm, args.max_array_size)
    print(f"dense: {len(res1.specs)} runs in {t1:.2f} s end to end")
    print(f"dense x 50 data sizes: {len(res10.specs)} runs in {t10:.2f} s (target <= 10 s)")
    print(
        f"ratio {t10 / t1:.1f} for {len(res10.specs) / len(res1.specs):.0f}x the runs (target <= 11)"
    )
    print(
        f"dense: resource classes={len(classes)} sbatch calls={len(chunks)} "
        f"(max array {args.max_array_size - 1}); one per run would be {len(res1.specs)}"
    )
    if args.profile:
        prof = cProfile.Profile()
        prof.enable()
        dry_run(big, args.max_array_size)
        prof.disable()
        pstats.Stats(prof).sort_stats("cumulative").print_stats(25)


if __name__ == "__main__":
    main()
