"""`python -m steplaw_train.sweep.status SWEEP_DIR [--json]`: what each run of a sweep is.

The table lists counts per state and, for failed runs, the tail of their job log. `--json` prints
one object: the count per state (done, failed, diverged, preempted, queued, running, pending,
cancelled), `total`, `shared` (runs other sweeps of the same run store also list: trained once
for all) and `submitted_last`, the number of runs the last sweep invocation submitted.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import sys
from pathlib import Path
from typing import Any

from launch import status as run_status
from steplaw_train import rundir


def summary(sweep_dir: Path) -> tuple[dict[str, Any], list[run_status.RunStatus]]:
    manifest = rundir.read_manifest(sweep_dir)  # CorruptRecord: main() reports it in one line
    if manifest is None:
        _fail(f"error: {sweep_dir} has no {rundir.MANIFEST} (not a sweep directory)")
    runs_root = rundir.manifest_runs_root(sweep_dir, manifest)
    statuses = run_status.sweep_states(sweep_dir, manifest["run_ids"], runs_root)
    out: dict[str, Any] = run_status.counts(statuses)
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


def _submitted_last(sweep_dir: Path) -> int:
    """How many runs the last submitting invocation handed over (a torn line is skipped)."""
    entries, _ = rundir.read_submissions(sweep_dir)
    try:
        return int(entries[-1]["submitted"]) if entries else 0
    except (KeyError, TypeError, ValueError):
        return 0


def render(
    counts: dict[str, Any], statuses: list[run_status.RunStatus], tail_lines: int = 10
) -> str:
    lines = ["  ".join(f"{k}={v}" for k, v in counts.items())]
    for s in statuses:
        if s.state in ("failed", "preempted", "running", "queued", "cancelled"):
            lines.append(
                f"{s.run_id}  {s.state:<9} attempts={s.attempts} job={s.job_id} {s.detail}"
            )
        if s.state == "failed":
            tail = run_status.log_tail(s.log, tail_lines)
            lines += [f"    | {t}" for t in tail.splitlines()]
    return "\n".join(lines)


def _fail(message: str) -> None:
    """One line on stderr, exit status 2 (bad input), as every CLI of the harness does."""
    print(message.splitlines()[0] if message else "error", file=sys.stderr)
    sys.exit(2)


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(prog="python -m steplaw_train.sweep.status", description=__doc__)
    p.add_argument("sweep_dir", type=Path)
    p.add_argument("--json", action="store_true", help="one JSON object of counts per state")
    p.add_argument("--tail", type=int, default=10, help="log lines shown per failed run")
    args = p.parse_args(argv)
    try:
        counts, statuses = summary(args.sweep_dir.resolve())
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
        json.dump(counts, sys.stdout)
        print()
    else:
        print(render(counts, statuses, args.tail))


if __name__ == "__main__":
    main()
