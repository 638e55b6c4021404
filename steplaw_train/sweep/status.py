"""`python -m steplaw_train.sweep.status SWEEP_DIR [--json] [--watch [SECONDS]]`: where a sweep is.

The text output: the count per state; one row per cell (model, recipe, D: steplaw_train/cells.py)
with its runs per state, steps and tokens done of those planned, device-hours spent and still
needed; the totals; then the runs that need a look (failed with the tail of their job log,
preempted, running with their progress, queued, cancelled). `--json` prints one object: the count per state
(done, failed, diverged, preempted, queued, running, pending, cancelled, and any other state a
launcher records), `total`, `shared` (runs other sweeps of the same run store also list: trained
once for all), `submitted_last` (runs the last sweep invocation submitted), `unit` (GPU-h or
CPU-h), `device_hours` {spent, remaining, estimated_total}, `mfu` (the calibration behind
"remaining"), `cells` and `runs` (per run: state, cell, steps / planned_steps, tokens /
planned_tokens, attempts, job_id, detail, device_hours_spent, device_hours_remaining).
`--watch` redraws the text view (rich) every SECONDS (default 30) until interrupted or no run is
pending, queued or running.

Spent and remaining hours: launch/usage.py (the trainer's wall clock x devices; the estimate at the
MFU the sweep's finished runs measured, times the share of tokens left). The resource model is the
one the sweep recorded in its config.yaml. Every run is read through rundir.run_dir (a run dir
may be a link into a shared store) and cheaply: spec.json, result.json, the metrics file's last
line only.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import sys
import time
from collections import Counter, defaultdict
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from launch import status as run_status
from launch import usage
from launch.resources import ResourceModel, resource_model
from steplaw_train import rundir
from steplaw_train.cells import cell_key

ACTIVE = ("pending", "queued", "running")  # a watch ends once no run is in one of these
NEEDS_A_LOOK = ("failed", "preempted", "running", "queued", "cancelled")


def summary(sweep_dir: Path) -> tuple[dict[str, Any], list[run_status.RunStatus]]:
    """Counts per state (+ total, submitted_last) and every run's status; no file beyond what
    the states need is read (the sweep driver and the tests call this)."""
    manifest = rundir.read_manifest(sweep_dir)  # CorruptRecord: main() reports it in one line
    if manifest is None:
        _fail(f"error: {sweep_dir} has no {rundir.MANIFEST} (not a sweep directory)")
    runs_root = rundir.manifest_runs_root(sweep_dir, manifest)
    statuses = run_status.sweep_states(sweep_dir, manifest["run_ids"], runs_root)
    out: dict[str, Any] = state_counts(statuses)
    out["total"] = len(statuses)
    out["shared"] = _shared(sweep_dir, runs_root, manifest["run_ids"])
    out["submitted_last"] = _submitted_last(sweep_dir)
    return out, statuses


def _shared(sweep_dir: Path, runs_root: Path, run_ids: list[str]) -> int:
    """How many of this sweep's runs other sweeps of the same run store also list (each such
    run is trained once, for all of them)."""
    mine, theirs = set(run_ids), set()
    for other in rundir.store_sweeps(runs_root):
        if other != Path(sweep_dir).resolve():
            with contextlib.suppress(rundir.CorruptRecord):
                theirs |= set((rundir.read_manifest(other) or {}).get("run_ids", []))
    return len(mine & theirs)


def state_counts(statuses: Sequence[run_status.RunStatus]) -> dict[str, int]:
    """launch/status.py's counts, plus any state it does not list (shown, never dropped)."""
    out = run_status.counts(statuses)
    for state, n in Counter(s.state for s in statuses).items():
        out.setdefault(state, n)
    return out


def _submitted_last(sweep_dir: Path) -> int:
    """How many runs the last submitting invocation handed over (a torn line is skipped)."""
    entries, _ = rundir.read_submissions(sweep_dir)
    try:
        return int(entries[-1]["submitted"]) if entries else 0
    except (KeyError, TypeError, ValueError):
        return 0


def sweep_resources(sweep_dir: Path) -> ResourceModel:
    """The resource model the sweep recorded (config.yaml); the defaults if it cannot be read."""
    from omegaconf import OmegaConf

    try:
        cfg = OmegaConf.load(Path(sweep_dir) / "config.yaml")
        section = OmegaConf.to_container(cfg.get("resources") or {}, resolve=True)
        return resource_model(section)  # type: ignore[arg-type]
    except Exception:  # absent, damaged or from another version: the estimate's defaults
        return ResourceModel()


# ---- the report --------------------------------------------------------------------------------
@dataclass(frozen=True)
class Report:
    counts: dict[str, Any]
    statuses: list[run_status.RunStatus]
    usages: list[usage.RunUsage]
    remaining: list[float]  # device-hours per run, in statuses' order
    calibration: usage.Calibration
    unit: str

    def cells(self) -> list[dict[str, Any]]:
        """One row per cell, sorted like the dry-run table; runs without a spec are cell None."""
        rows: dict[Any, dict[str, Any]] = {}
        for s, u, left in zip(self.statuses, self.usages, self.remaining, strict=True):
            key = cell_key(u.spec) if u.spec is not None else None
            r = rows.setdefault(
                key,
                {
                    "model": key.model if key else None,
                    "recipe": key.recipe if key else None,
                    "D": key.D if key else None,
                    "runs": 0,
                    "states": defaultdict(int),
                    "steps": 0,
                    "planned_steps": 0,
                    "tokens": 0.0,
                    "planned_tokens": 0.0,
                    "device_hours_spent": 0.0,
                    "device_hours_remaining": 0.0,
                },
            )
            r["runs"] += 1
            r["states"][s.state] += 1
            r["steps"] += u.steps
            r["planned_steps"] += u.planned_steps or 0
            r["tokens"] += u.tokens if s.state not in usage.FINISHED else (u.planned_tokens or 0)
            r["planned_tokens"] += u.planned_tokens or 0
            r["device_hours_spent"] += u.hours_spent
            r["device_hours_remaining"] += left
        out = []
        for key in sorted(rows, key=lambda k: (k is None, k or ("", "", 0))):
            r = rows[key]
            r["states"] = dict(r["states"])
            r["fraction"] = r["tokens"] / r["planned_tokens"] if r["planned_tokens"] else 0.0
            out.append(r)
        return out

    def runs(self) -> list[dict[str, Any]]:
        out = []
        for s, u, left in zip(self.statuses, self.usages, self.remaining, strict=True):
            key = cell_key(u.spec) if u.spec is not None else None
            out.append(
                {
                    "run_id": s.run_id,
                    "state": s.state,
                    "cell": {"model": key.model, "recipe": key.recipe, "D": key.D} if key else None,
                    "steps": u.steps,
                    "planned_steps": u.planned_steps,
                    "tokens": u.tokens,
                    "planned_tokens": u.planned_tokens,
                    "attempts": s.attempts,
                    "job_id": s.job_id,
                    "detail": s.detail,
                    "devices": u.devices,
                    "device_hours_spent": u.hours_spent,
                    "device_hours_remaining": left,
                    "mfu": u.mfu,
                }
            )
        return out

    def hours(self) -> dict[str, float]:
        spent = sum(u.hours_spent for u in self.usages)
        left = sum(self.remaining)
        return {"spent": spent, "remaining": left, "estimated_total": spent + left}

    def to_json(self) -> dict[str, Any]:
        cal = self.calibration
        return {
            **self.counts,
            "unit": self.unit,
            "device_hours": self.hours(),
            "mfu": {
                "assumed": cal.assumed,
                "runs": cal.runs,
                "per_model": {
                    m.name: {"mfu": e.mfu, "low": e.low, "high": e.high, "runs": e.runs}
                    for m, e in cal.per_model.items()
                },
                "other_models": {
                    "mfu": cal.unmeasured.mfu,
                    "low": cal.unmeasured.low,
                    "high": cal.unmeasured.high,
                },
            },
            "cells": self.cells(),
            "runs": self.runs(),
        }

    @property
    def ended(self) -> bool:
        """No run is pending, queued or running: nothing will change until someone acts."""
        return not any(s.state in ACTIVE for s in self.statuses)


def report(sweep_dir: Path) -> Report:
    """Everything the status CLI shows, read once."""
    counts, statuses = summary(sweep_dir)
    rm = sweep_resources(sweep_dir)
    usages = usage.usage_of(sweep_dir, [(s.run_id, s.state) for s in statuses], rm)
    cal = usage.calibration_from_usage(usages, rm)
    left = [
        usage.remaining_hours(u, s.state, cal, rm) for s, u in zip(statuses, usages, strict=True)
    ]
    return Report(counts, statuses, usages, left, cal, "GPU-h" if rm.gpus_per_node else "CPU-h")


# ---- text --------------------------------------------------------------------------------------
def _states_text(states: dict[str, int]) -> str:
    order = list(run_status.STATES) + sorted(set(states) - set(run_status.STATES))
    return " ".join(f"{k}={states[k]}" for k in order if states.get(k))


def cell_lines(rep: Report) -> list[str]:
    head = (
        f"{'model':<18} {'recipe':<14} {'D':>9} {'runs':>5} {'steps done':>21} {'tokens':>6} "
        f"{rep.unit + ' spent':>11} {rep.unit + ' left':>10}  states"
    )
    lines = [head, "-" * len(head)]
    for r in rep.cells():
        d = f"{r['D']:.3g}" if r["D"] is not None else "?"
        steps = f"{r['steps']}/{r['planned_steps']}"
        lines.append(
            f"{str(r['model'] or '?'):<18} {str(r['recipe'] or '?'):<14} {d:>9} {r['runs']:>5} "
            f"{steps:>21} {r['fraction']:>6.0%} {r['device_hours_spent']:>11.3g} "
            f"{r['device_hours_remaining']:>10.3g}  {_states_text(r['states'])}"
        )
    return lines


def totals_line(rep: Report) -> str:
    h = rep.hours()
    return (
        f"{rep.unit} spent {h['spent']:.4g}, remaining ~{h['remaining']:.4g}, estimated total "
        f"~{h['estimated_total']:.4g}; {rep.calibration.describe()}"
    )


def run_lines(rep: Report, tail_lines: int = 10, limit: int | None = None) -> list[str]:
    """The runs that need a look; `limit` caps the count (the watch view), log tails included
    only without it."""
    lines: list[str] = []
    shown = 0
    for s, u in zip(rep.statuses, rep.usages, strict=True):
        if s.state not in NEEDS_A_LOOK and s.state in run_status.STATES:
            continue
        if limit is not None and shown >= limit:
            lines.append("... and more (--json lists every run)")
            break
        shown += 1
        progress = f" step {u.steps}/{u.planned_steps}" if u.planned_steps and u.steps else ""
        lines.append(
            f"{s.run_id}  {s.state:<9} attempts={s.attempts} job={s.job_id}{progress} {s.detail}"
        )
        if s.state == "failed" and limit is None:
            tail = run_status.log_tail(s.log, tail_lines)
            lines += [f"    | {t}" for t in tail.splitlines()]
    return lines


def render(rep: Report, tail_lines: int = 10) -> str:
    counts_line = "  ".join(f"{k}={v}" for k, v in rep.counts.items())
    return "\n".join([counts_line, *cell_lines(rep), totals_line(rep), *run_lines(rep, tail_lines)])


# ---- watch -------------------------------------------------------------------------------------
def renderable(rep: Report, when: float | None = None):
    """The watch view: the same table as the text output, as one rich renderable."""
    from rich.console import Group
    from rich.text import Text

    stamp = time.strftime("%H:%M:%S", time.localtime(when or time.time()))
    counts_line = "  ".join(f"{k}={v}" for k, v in rep.counts.items())
    body = [counts_line, *cell_lines(rep), totals_line(rep), *run_lines(rep, limit=20)]
    return Group(Text(f"{stamp}  (Ctrl-C to stop)", style="bold"), Text("\n".join(body)))


def watch(
    sweep_dir: Path,
    interval: float = 30.0,
    iterations: int | None = None,
    console: Any = None,
    sleep: Callable[[float], None] = time.sleep,
) -> int:
    """Redraw the status every `interval` seconds until no run is pending, queued or running,
    `iterations` views were drawn, or Ctrl-C; returns the number of views drawn."""
    from rich.live import Live

    drawn = 0
    rep = report(sweep_dir)
    with Live(renderable(rep), console=console, auto_refresh=False, transient=False) as live:
        drawn = 1
        live.refresh()
        try:
            while not rep.ended and (iterations is None or drawn < iterations):
                sleep(interval)
                rep = report(sweep_dir)
                live.update(renderable(rep), refresh=True)
                drawn += 1
        except KeyboardInterrupt:
            pass
    return drawn


def _fail(message: str) -> None:
    """One line on stderr, exit status 2 (bad input), as every CLI of the harness does."""
    print(message.splitlines()[0] if message else "error", file=sys.stderr)
    sys.exit(2)


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(prog="python -m steplaw_train.sweep.status", description=__doc__)
    p.add_argument("sweep_dir", type=Path)
    p.add_argument(
        "--json", action="store_true", help="one JSON object: counts, hours, cells, runs"
    )
    p.add_argument("--tail", type=int, default=10, help="log lines shown per failed run")
    p.add_argument(
        "--watch",
        nargs="?",
        const=30.0,
        type=float,
        metavar="SECONDS",
        help="redraw every SECONDS (default 30) until interrupted or no run is active",
    )
    p.add_argument("--watch-iterations", type=int, default=None, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.watch is not None and args.watch <= 0:
        _fail(f"error: --watch: must be > 0 seconds, got {args.watch}")
    sweep_dir = args.sweep_dir.resolve()
    try:
        if args.watch is not None:
            watch(sweep_dir, args.watch, args.watch_iterations)
            return
        rep = report(sweep_dir)
    except run_status.SchedulerUnavailable as e:
        _fail(f"error: {e}")
    except (ValueError, KeyError, TypeError, AttributeError, OSError) as e:
        # damaged bookkeeping (a manifest without run_ids, a result.json that is `[]` or binary,
        # a torn submissions.jsonl): one line naming the sweep, never a traceback
        _fail(
            f"error: {args.sweep_dir}: damaged sweep bookkeeping ({type(e).__name__}: {e}); "
            "the run directories themselves are untouched"
        )
    if args.json:
        json.dump(rep.to_json(), sys.stdout)
        print()
    else:
        print(render(rep, args.tail))


if __name__ == "__main__":
    main()
