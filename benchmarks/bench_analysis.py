"""Analysis speed: 1,000 vectorised bootstrap fits (target ≤0.05 s) and collecting 3,700 run
directories (target ≤5 s). Prints figures; run `python benchmarks/bench_analysis.py`.

If the authors' fitting tool is importable (`STEPLAW_AUTHORS_TOOL=module:function`, called as
function(dataframe_of_optimal_points)), its time is printed beside ours in the same run.
"""

from __future__ import annotations

import importlib
import os
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import numpy as np  # noqa: E402

from analysis import cells, collect, fit, synthetic  # noqa: E402


def best_of(f, repeat: int = 5) -> float:
    times = []
    for _ in range(repeat):
        t = time.perf_counter()
        f()
        times.append(time.perf_counter() - t)
    return min(times)


def bench_fit() -> None:
    df = collect.read_released(collect.released_dense_csv())
    grid, _ = cells.split_cells(df, collect.cell_key(df))
    pts = fit.optimal_points(grid)
    t = best_of(lambda: fit.fit_power_law("lr", ("N", "D"), pts, n_boot=1000))
    print(
        f"bootstrap lr fit, 1000 resamples of {len(pts)} points: {t * 1000:.1f} ms (target ≤ 50 ms)"
    )
    t = best_of(lambda: fit.fit_step_law(grid, n_boot=1000))
    print(f"full Step Law fit (lr, bs, free bs; 3 x 1000 resamples): {t * 1000:.1f} ms")
    tool = os.environ.get("STEPLAW_AUTHORS_TOOL")
    if tool:
        mod, fn = tool.split(":")
        f = getattr(importlib.import_module(mod), fn)
        print(f"authors' tool {tool}: {best_of(lambda: f(pts), 1):.2f} s")
    else:
        print("authors' tool not installed (set STEPLAW_AUTHORS_TOOL=module:function to compare)")


def bench_collect(n_target: int = 3700) -> None:
    with tempfile.TemporaryDirectory() as tmp:
        lrs = tuple(float(v) for v in 2.0 ** np.arange(-12, -5.5, 0.5))  # 13
        bss = (1, 2, 3, 4, 6, 8, 12, 16, 24, 32)  # 10
        tokens = tuple(int(200_000 * 1.25**i) for i in range(15))  # 15 x 2 shapes x 130 = 3,900
        t = time.perf_counter()
        synthetic.make_sweep(tmp, shapes=((64, 2), (96, 3)), tokens=tokens, lrs=lrs, bss=bss,
                             max_points=200)  # fmt: skip
        n = sum(1 for _ in collect.iter_run_dirs(tmp))
        print(f"generated {n} run dirs (200 logged points each) in {time.perf_counter() - t:.1f} s")
        t = time.perf_counter()
        df = collect.collect_runs(tmp)
        dt = time.perf_counter() - t
        print(f"collect_runs over {len(df)} run dirs: {dt:.2f} s "
              f"({dt / len(df) * n_target:.2f} s scaled to {n_target}; target ≤ 5 s)")  # fmt: skip


if __name__ == "__main__":
    bench_fit()
    bench_collect()
