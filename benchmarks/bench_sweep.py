"""Expand + validate + dry-run the `dense` grid (4,200 runs) and count the sbatch calls it needs.

Target: <= 3 s on the 2-core dev machine; sbatch calls = resource classes x array chunks.
Usage (repo root): PYTHONPATH=. python benchmarks/bench_sweep.py [--grid dense] [--max-array-size 1001]
"""

from __future__ import annotations

import argparse
import io
import tempfile
import time

from hydra import compose, initialize_config_dir

from launch.executors import plan_arrays
from launch.resources import resource_class, resource_model
from steplaw_train.config import config_dir
from steplaw_train.sweep import sweep


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--grid", default="dense")
    p.add_argument("--max-array-size", type=int, default=1001)
    args = p.parse_args()
    t0 = time.perf_counter()
    with (
        tempfile.TemporaryDirectory() as tmp,
        initialize_config_dir(config_dir=str(config_dir()), version_base="1.3"),
    ):
        cfg = compose(
            "sweep",
            overrides=[
                f"+grid={args.grid}",
                "dry_run=true",
                "launcher=slurm",
                f"launcher.max_array_size={args.max_array_size}",
                f"sweep_dir={tmp}/sw",
            ],
        )
        res = sweep(cfg, out=io.StringIO())
    elapsed = time.perf_counter() - t0
    rm = resource_model(cfg.resources)
    classes = {resource_class(s, rm) for s in res.specs}
    chunks = plan_arrays(res.specs, rm, args.max_array_size)
    print(
        f"grid={args.grid} runs={len(res.specs)} compose+expand+validate+dry-run={elapsed:.2f}s "
        f"(target <= 3 s)"
    )
    print(
        f"resource classes={len(classes)} sbatch calls={len(chunks)} "
        f"(max array {args.max_array_size - 1}); one per run would be {len(res.specs)}"
    )


if __name__ == "__main__":
    main()
