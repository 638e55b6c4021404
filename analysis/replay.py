"""Replay the law-guided search and its baselines on measured tables: the proof without GPUs.

`python -m analysis replay --data FILE --prior steplaw|none [--json]` turns every cell of a
released table (dense or MoE schema, via `collect.read_released`) into a grid
(`analysis.table`), lets `steplaw_train.search` drive a `TableExecutor` that "runs" a grid point
by looking its loss up, and reports per cell: runs used / runs in the grid, GPU-hours as a
fraction of the cell's full grid and as a share of the whole table's (where the budget went:
the shares add up to the total), the chosen point (the best run the search ran), its gap to
the grid's minimum in per mille and the search's own probability that it found the cell's
optimum.

The same draws and cost model give the baselines, side by side:
  full_grid          every point (gap 0, all GPU-hours);
  steplaw            the grid point nearest the published Step Law (one run per cell);
  hill_climb_law     4-neighbour hill-climb from that point: run the best point's untried axis
                     neighbours, move to the best, stop when none of the four beats it;
  hill_climb_centre  the same from the point nearest the middle of the cell's grid (no prior);
  guided             the search.
GPU-hours: measured run time when the table has it for every run, else FLOPs M·D
(`analysis.table.run_costs`).
"""

from __future__ import annotations

import argparse
import json
import math
import sys
from collections.abc import Callable, Sequence
from dataclasses import dataclass, fields

import numpy as np
import pandas as pd

from analysis import collect
from analysis.table import CellGrid, TableExecutor, build_grid, run_costs
from steplaw_train import search
from steplaw_train.search import Proposal, axis_neighbours
from steplaw_train.steplaw import PAPER

BASELINES = ("full_grid", "steplaw", "hill_climb_law", "hill_climb_centre")


@dataclass(frozen=True)
class CellReport:
    cell: str
    N: float
    Na: float
    D: float
    runs: int
    grid_runs: int
    gpu_hours_fraction: float  # of this cell's full grid
    gpu_hours_share: float  # of the whole table's full grid: where the budget went (sums to total)
    lr: float
    bs: float
    loss: float
    grid_min_loss: float
    gap_permille: float
    best_lr: float
    best_bs: float
    p_found: float = math.nan


def read_table(path: str) -> pd.DataFrame:
    """The released CSV as the tidy table, plus each run's measured time where the MoE
    release's `total_time` (or `average_iter_time` × iterations) gives one."""
    df = collect.read_released(path)
    raw = pd.read_csv(path)
    t = pd.Series(math.nan, index=df.index)
    if "total_time" in raw:
        t = pd.to_numeric(raw["total_time"], errors="coerce").reset_index(drop=True)
    if "average_iter_time" in raw:
        steps = df["steps"].where(pd.to_numeric(df["steps"], errors="coerce") > 0, df["iterations"])
        per = pd.to_numeric(raw["average_iter_time"], errors="coerce").reset_index(drop=True)
        t = t.where(t > 0, per * pd.to_numeric(steps, errors="coerce"))
    return df.assign(run_time=t)


def replay(
    df: pd.DataFrame, config: search.SearchConfig, law_n: str = "N"
) -> tuple[list[CellReport], dict[str, float], search.SearchState]:
    """Run the search over the table's cells; per-cell reports, totals and the final state."""
    return replay_grids(build_grid(df, law_n=law_n), config)


def _reports(grids: Sequence[CellGrid], executor: TableExecutor, chosen, p_found=None):
    reports = []
    cost_all = sum(g.total_cost for g in grids)
    for g in grids:
        i = chosen[g.cell.key]
        loss = g.losses[i]
        lr, bs = g.cell.points[i]
        j = g.argmin()
        reports.append(
            CellReport(
                cell=g.cell.key, N=g.n, Na=g.na, D=g.cell.d,
                runs=executor.runs_in(g.cell.key), grid_runs=g.total_runs,
                gpu_hours_fraction=executor.cost_in(g.cell.key) / g.total_cost,
                gpu_hours_share=executor.cost_in(g.cell.key) / cost_all,
                lr=lr, bs=bs, loss=loss, grid_min_loss=g.losses[j],
                gap_permille=1000.0 * (loss - g.losses[j]) / g.losses[j],
                best_lr=g.cell.points[j][0], best_bs=g.cell.points[j][1],
                p_found=(p_found or {}).get(g.cell.key, math.nan),
            )
        )  # fmt: skip
    reports.sort(key=lambda r: (r.Na * r.D, r.cell))
    return reports


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
    chosen = {}
    for g in grids:
        best = state.best(g.cell.key)
        assert best is not None
        chosen[g.cell.key] = best[0]
    p_found = {o.cell: o.p_found for o in state.outcomes}
    reports = _reports(grids, executor, chosen, p_found)
    return reports, {**totals(reports, grids, executor), "rounds": rounds}, state


# ---- baselines ------------------------------------------------------------------------------------
def nearest(g: CellGrid, target: tuple[float, float]) -> int:
    """Grid point nearest (ln lr, ln bs_tokens) = target (Euclidean in log space)."""
    z = g.cell.coords()
    return int(np.argmin(np.sum(np.square(z - np.array(target)), axis=1)))


def law_point(g: CellGrid) -> int:
    lr, bs_tokens = PAPER.predict(g.cell.n_law, g.cell.d)
    return nearest(g, (math.log(lr), math.log(bs_tokens)))


def centre_point(g: CellGrid) -> int:
    z = g.cell.coords()
    return nearest(g, tuple((z.min(axis=0) + z.max(axis=0)) / 2))  # type: ignore[arg-type]


def hill_climb(g: CellGrid, executor: TableExecutor, start: int) -> int:
    """Run `start`, then the current best's untried axis neighbours; move to the best; stop when
    all four neighbours of the current best have run and none beats it. Returns the best point."""
    z = g.cell.coords()
    loss: dict[int, float] = {}

    def run(idx: Sequence[int]) -> None:
        props = [Proposal(g.cell.key, i, *g.cell.points[i]) for i in idx]
        for p, v in executor.run(props).items():
            loss[p.index] = v

    run([start])
    cur = start
    while True:
        todo = [i for i in axis_neighbours(z, cur) if i not in loss]
        if todo:
            run(todo)
        nxt = min(loss, key=lambda k: (loss[k], k))
        if nxt == cur:
            return cur
        cur = nxt


def baseline(grids: Sequence[CellGrid], name: str) -> tuple[list[CellReport], dict[str, float]]:
    """One baseline over every cell (same executor accounting as the search)."""
    executor = TableExecutor(grids)
    chosen: dict[str, int] = {}
    pick: dict[str, Callable[[CellGrid], int]] = {
        "steplaw": law_point,
        "hill_climb_law": lambda g: hill_climb(g, executor, law_point(g)),
        "hill_climb_centre": lambda g: hill_climb(g, executor, centre_point(g)),
    }
    for g in grids:
        if name == "full_grid":
            every = range(len(g.losses))
            executor.run([Proposal(g.cell.key, i, *g.cell.points[i]) for i in every])
            chosen[g.cell.key] = g.argmin()
        elif name == "steplaw":
            i = law_point(g)
            executor.run([Proposal(g.cell.key, i, *g.cell.points[i])])
            chosen[g.cell.key] = i
        else:
            chosen[g.cell.key] = pick[name](g)
    reports = _reports(grids, executor, chosen)
    return reports, totals(reports, grids, executor)


def compare(
    grids: Sequence[CellGrid], config: search.SearchConfig
) -> dict[str, tuple[list[CellReport], dict[str, float]]]:
    """The guided search and every baseline on the same grids."""
    reports, tot, _ = replay_grids(grids, config)
    out = {"guided": (reports, tot)}
    for name in BASELINES:
        out[name] = baseline(grids, name)
    return out


def totals(reports: Sequence[CellReport], grids, executor: TableExecutor) -> dict[str, float]:
    cost_all = sum(g.total_cost for g in grids)
    cost_run = sum(executor.cost_in(g.cell.key) for g in grids)
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
    head = (
        f"{'cell':<34} {'runs':>9} {'GPU-h':>7} {'share':>6} {'chosen lr':>10} {'bs':>6} "
        f"{'best lr':>10} {'bs':>6} {'gap‰':>6} {'P(found)':>8}"
    )
    lines = [head, "-" * len(head)]
    for r in reports:
        lines.append(
            f"{r.cell:<34} {r.runs:>4}/{r.grid_runs:<4} {100 * r.gpu_hours_fraction:>6.1f}% "
            f"{100 * r.gpu_hours_share:>5.2f}% {r.lr:>10.3g} {r.bs:>6g} {r.best_lr:>10.3g} "
            f"{r.best_bs:>6g} {r.gap_permille:>6.2f} {r.p_found:>8.3f}"
        )
    lines.append("-" * len(head))
    lines.append(
        f"total: {tot['runs']}/{tot['grid_runs']} runs ({100 * tot['runs_fraction']:.1f}%), "
        f"GPU-hours {100 * tot['gpu_hours_fraction']:.2f}% of the full grid, "
        f"gap mean {tot['mean_gap_permille']:.3f}‰ max {tot['max_gap_permille']:.3f}‰"
        + (f", {tot['rounds']} rounds" if "rounds" in tot else "")
    )
    return "\n".join(lines)


def format_baselines(results: dict[str, tuple[list[CellReport], dict[str, float]]]) -> str:
    lines = [f"{'method':<18} {'GPU-h':>7} {'mean gap‰':>10} {'max gap‰':>9}"]
    for name, (_, t) in results.items():
        lines.append(
            f"{name:<18} {100 * t['gpu_hours_fraction']:>6.2f}% "
            f"{t['mean_gap_permille']:>10.3f} {t['max_gap_permille']:>9.3f}"
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
    p.add_argument(
        "--epsilon",
        type=float,
        default=None,
        help="stop a cell when P(an untried point beats its best by > plateau) < epsilon",
    )
    p.add_argument("--json", action="store_true", help="print one JSON object")
    return p.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    try:
        df = read_table(args.data)
        kw = {"prior": args.prior, "batch": args.batch, "parallel_cells": args.parallel_cells}
        if args.epsilon is not None:
            kw["epsilon"] = args.epsilon
        config = search.SearchConfig(**kw)
        grids = build_grid(df, law_n=args.law_n)
        results = compare(grids, config)
    except (ValueError, OSError) as e:
        print(f"replay: {e}", file=sys.stderr)
        return 2
    reports, tot = results["guided"]
    cost_source = run_costs(collect.used(df))[1]
    if args.json:
        doc = {**_plain(tot), "prior": args.prior, "data": str(args.data), "cost": cost_source,
               "cells": [_row(r) for r in reports],
               "baselines": {name: {**_plain(t), "cells": [_row(r) for r in reps]}
                             for name, (reps, t) in results.items()}}  # fmt: skip
        print(json.dumps(doc, indent=1, allow_nan=False))
    else:
        print(format_table(reports, tot))
        print(f"\nGPU-hours from {cost_source}; baselines on the same cells:")
        print(format_baselines(results))
    return 0


def _row(r: CellReport) -> dict:
    return {f.name: _jsonable(getattr(r, f.name)) for f in fields(r)}


def _plain(d: dict) -> dict:
    return {k: _jsonable(v) for k, v in d.items()}


def _jsonable(v):
    return v if not isinstance(v, float) or math.isfinite(v) else repr(v)


if __name__ == "__main__":
    raise SystemExit(main())
