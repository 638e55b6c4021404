"""Replay the law-guided search on released measurements: the proof without GPUs.

`python -m analysis replay --data FILE --prior steplaw|none [--json]` turns every cell of a
released table (dense or MoE schema, via `collect.read_released`) into a grid, lets
`steplaw_train.search` drive a `launch.replay.TableExecutor` that "runs" a grid point by looking
its loss up, and reports per cell: runs used / runs in the grid, GPU-hours fraction, the chosen
point (the best run the search ran) and its gap to the grid's minimum in per mille.

GPU-hours of a run ∝ Na·D (Na = N for dense), the same for every (lr, bs) of a cell.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
from collections.abc import Sequence
from dataclasses import dataclass, fields

import pandas as pd

from analysis import collect
from launch.replay import CellGrid, TableExecutor, build_grid
from steplaw_train import search


@dataclass(frozen=True)
class CellReport:
    cell: str
    N: float
    Na: float
    D: float
    runs: int
    grid_runs: int
    gpu_hours_fraction: float
    lr: float
    bs: float
    loss: float
    grid_min_loss: float
    gap_permille: float
    best_lr: float
    best_bs: float


def replay(
    df: pd.DataFrame, config: search.SearchConfig, law_n: str = "N"
) -> tuple[list[CellReport], dict[str, float], search.SearchState]:
    """Run the search over the table's cells; per-cell reports, totals and the final state."""
    return replay_grids(build_grid(df, law_n=law_n), config)


def replay_grids(
    grids: Sequence[CellGrid], config: search.SearchConfig
) -> tuple[list[CellReport], dict[str, float], search.SearchState]:
    """`replay` on grids already built (the benchmark perturbs grids, not CSV rows)."""
    executor = TableExecutor(grids)
    state = search.SearchState.create([g.cell for g in grids], config)
    rounds = 0
    while not state.done:
        props = search.propose(state)
        state = state.with_results(executor.run(props))
        rounds += 1
    reports = []
    for g in grids:
        best = state.best(g.cell.key)
        assert best is not None
        i, loss = best
        lr, bs = g.cell.points[i]
        j = g.argmin()
        reports.append(
            CellReport(
                cell=g.cell.key, N=g.n, Na=g.na, D=g.cell.d,
                runs=executor.runs_in(g.cell.key), grid_runs=g.total_runs,
                gpu_hours_fraction=executor.runs_in(g.cell.key) / g.total_runs,
                lr=lr, bs=bs, loss=loss, grid_min_loss=g.losses[j],
                gap_permille=1000.0 * (loss - g.losses[j]) / g.losses[j],
                best_lr=g.cell.points[j][0], best_bs=g.cell.points[j][1],
            )
        )  # fmt: skip
    reports.sort(key=lambda r: (r.Na * r.D, r.cell))
    return reports, {**totals(reports, grids, executor), "rounds": rounds}, state


def totals(reports: Sequence[CellReport], grids, executor: TableExecutor) -> dict[str, float]:
    cost_all = sum(g.total_runs * g.cell.cost for g in grids)
    cost_run = sum(executor.runs_in(g.cell.key) * g.cell.cost for g in grids)
    gaps = [r.gap_permille for r in reports]
    return {
        "gpu_hours_fraction": cost_run / cost_all,
        "runs_fraction": sum(r.runs for r in reports) / sum(r.grid_runs for r in reports),
        "mean_gap_permille": sum(gaps) / len(gaps),
        "max_gap_permille": max(gaps),
        "runs": sum(r.runs for r in reports),
        "grid_runs": sum(r.grid_runs for r in reports),
    }


def format_table(reports: Sequence[CellReport], tot: dict[str, float]) -> str:
    head = f"{'cell':<34} {'runs':>9} {'GPU-h':>7} {'chosen lr':>10} {'bs':>6} {'best lr':>10} {'bs':>6} {'gap‰':>6}"
    lines = [head, "-" * len(head)]
    for r in reports:
        lines.append(
            f"{r.cell:<34} {r.runs:>4}/{r.grid_runs:<4} {100 * r.gpu_hours_fraction:>6.1f}% "
            f"{r.lr:>10.3g} {r.bs:>6g} {r.best_lr:>10.3g} {r.best_bs:>6g} {r.gap_permille:>6.2f}"
        )
    lines.append("-" * len(head))
    lines.append(
        f"total: {tot['runs']}/{tot['grid_runs']} runs ({100 * tot['runs_fraction']:.1f}%), "
        f"GPU-hours {100 * tot['gpu_hours_fraction']:.2f}% of the full grid, "
        f"gap mean {tot['mean_gap_permille']:.3f}‰ max {tot['max_gap_permille']:.3f}‰"
        + (f", {tot['rounds']} rounds" if "rounds" in tot else "")
    )
    return "\n".join(lines)


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        prog="python -m analysis replay", description=__doc__.split("\n")[0]
    )
    p.add_argument(
        "--data",
        default=str(collect.released_dense_csv()),
        help="released CSV (dense or MoE schema)",
    )
    p.add_argument("--prior", default="steplaw", choices=search.PRIORS)
    p.add_argument("--law-n", default="N", choices=("N", "Na"), help="which N the law sees (MoE)")
    p.add_argument("--batch", type=int, default=1, help="runs proposed per round and cell")
    p.add_argument(
        "--parallel-cells", type=int, default=1, help="cells searched at once (fewer rounds)"
    )
    p.add_argument("--tau", type=float, default=None, help="EI stopping threshold (relative loss)")
    p.add_argument("--json", action="store_true", help="print one JSON object")
    return p.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    try:
        df = collect.read_released(args.data)
        kw = {"prior": args.prior, "batch": args.batch, "parallel_cells": args.parallel_cells}
        if args.tau is not None:
            kw["tau"] = args.tau
        config = search.SearchConfig(**kw)
        reports, tot, _ = replay(df, config, law_n=args.law_n)
    except (ValueError, OSError) as e:
        print(f"replay: {e}", file=sys.stderr)
        return 2
    if args.json:
        doc = {**tot, "prior": args.prior, "data": str(args.data),
               "cells": [{f.name: _jsonable(getattr(r, f.name)) for f in fields(r)} for r in reports]}  # fmt: skip
        print(json.dumps(doc, indent=1))
    else:
        print(format_table(reports, tot))
    return 0


def _jsonable(v):
    return v if not isinstance(v, float) or math.isfinite(v) else repr(v)


if __name__ == "__main__":
    raise SystemExit(main())
