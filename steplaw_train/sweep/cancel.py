"""`python -m steplaw_train.sweep.cancel SWEEP_DIR (--run ID | --cell SEL | --all)... [--dry-run]
[--undo] [--force]`: stop a sweep, a cell or some runs, resumably.

Selected runs are mapped to their live jobs from their launch.json attempts: SLURM array tasks
(`123_4`) are `scancel`ed in one call, local processes get SIGTERM (only on the host that
started them, and only if the recorded pid still is that process). Either way the trainer
checkpoints and exits (the preemption path), so nothing is lost. The cancellation is recorded
in `<sweep_dir>/cancelled.json` (rundir.py) *before* any signal: the sweep's status shows the
runs as `cancelled`, and neither a rerun of the sweep nor a blocking local sweep still working
through its queue submits them again. `--undo` (same selectors) removes the record; the next
sweep invocation resubmits them and they resume from their checkpoints.

A run of the store another registered sweep also lists (`<runs_root>/sweeps.json`) is shared: if
it is queued or running, cancelling it stops work that sweep wants, so it is refused (exit 2,
nothing done) unless `--force`. With `--force` the job stops and only this sweep records the
cancellation: the other sweep sees its run preempted and resubmits it when it is rerun. Pending
or preempted shared runs need no `--force` (no job is stopped; only this sweep stops wanting them).

Cells: `--cell MODEL[/RECIPE[/D]]` (steplaw_train/cells.py keys), `*` matches anything, D as
`20e9` or `20B` (K/M/B/T), matched within 0.5%.
"""

from __future__ import annotations

import argparse
import fnmatch
import os
import signal
import subprocess
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from launch import status
from steplaw_train import rundir
from steplaw_train.cells import CellKey, cell_key
from steplaw_train.spec import RunSpec, SpecError

SUFFIX = {"K": 1e3, "M": 1e6, "B": 1e9, "G": 1e9, "T": 1e12}
D_TOL = 0.005


@dataclass(frozen=True)
class Action:
    """What cancel does to one run: `kind` is scancel | sigterm | record | none."""

    run_id: str
    state: str
    kind: str
    target: str = ""  # the job id or pid
    note: str = ""


# ---- selection (pure) --------------------------------------------------------------------------
def parse_d(text: str) -> float:
    t = text.strip().upper()
    scale = SUFFIX.get(t[-1:], 1.0)
    try:
        return float(t[:-1] if t[-1:] in SUFFIX else t) * scale
    except ValueError:
        raise SpecError("--cell", f"D {text!r} is not a number (e.g. 20e9 or 20B)") from None


def cell_matches(selector: str, key: CellKey) -> bool:
    """`MODEL[/RECIPE[/D]]`, `*` wildcards (fnmatch) on the names, D within D_TOL."""
    parts = selector.split("/")
    if len(parts) > 3 or not parts[0]:
        raise SpecError("--cell", f"{selector!r}: expected MODEL[/RECIPE[/D]]")
    model, recipe, d = (parts + ["*", "*"])[:3]
    if not fnmatch.fnmatchcase(key.model, model) or not fnmatch.fnmatchcase(key.recipe, recipe):
        return False
    return d == "*" or abs(parse_d(d) - key.D) <= D_TOL * key.D


def select_runs(
    run_ids: Sequence[str],
    keys: dict[str, CellKey],
    runs: Sequence[str],
    cells: Sequence[str],
    every: bool,
) -> list[str]:
    """The sweep's run_ids the selectors name, in manifest order; unknown ones are errors."""
    known = set(run_ids)
    unknown = [r for r in runs if r not in known]
    if unknown:
        raise SpecError("--run", f"not runs of this sweep: {unknown}")
    chosen = set(runs) | (known if every else set())
    for sel in cells:
        hit = {r for r, k in keys.items() if cell_matches(sel, k)}
        if not hit:
            labels = sorted({f"{k.model}/{k.recipe}/{k.D:.4g}" for k in keys.values()})
            raise SpecError("--cell", f"{sel!r} matches no cell; cells: {labels}")
        chosen |= hit
    return [r for r in run_ids if r in chosen]


def plan(
    statuses: Sequence[status.RunStatus], attempts: dict[str, dict], host: str
) -> list[Action]:
    """One action per run from its state and its last attempt (pure)."""
    out = []
    for st in statuses:
        last = attempts.get(st.run_id) or {}
        if st.state in ("done", "diverged"):
            out.append(Action(st.run_id, st.state, "none", note="finished: nothing to cancel"))
        elif st.state not in ("queued", "running"):
            out.append(Action(st.run_id, st.state, "record", note="no live job"))
        elif elsewhere := st.detail.startswith("trained elsewhere"):
            note = f"{st.detail}: no job of a sweep runs it; stop that process yourself"
            out.append(Action(st.run_id, st.state, "record", note=note))
        elif last.get("executor") == "slurm":
            out.append(Action(st.run_id, st.state, "scancel", str(last.get("job_id"))))
        elif last.get("pid") and last.get("host", host) == host and not elsewhere:
            out.append(Action(st.run_id, st.state, "sigterm", str(last["pid"])))
        else:
            where = last.get("host") or "another host"
            note = f"its trainer ({st.detail or 'on ' + where}) is not reachable from here"
            out.append(Action(st.run_id, st.state, "record", note=note + "; stop it there"))
    return out


# ---- the command -------------------------------------------------------------------------------
def _keys(sweep_dir: Path, run_ids: Sequence[str]) -> dict[str, CellKey]:
    keys = {}
    for r in run_ids:
        try:
            doc = rundir.read_spec(rundir.run_dir(sweep_dir, r))
        except rundir.CorruptRecord:
            continue
        if doc is not None:
            keys[r] = cell_key(RunSpec.from_dict(doc["spec"]))
    return keys


def shared_with(sweep_dir: Path, runs_root: Path, run_ids: Sequence[str]) -> dict[str, list[Path]]:
    """run_id → the other registered sweeps whose manifest lists it."""
    want = set(run_ids)
    out: dict[str, list[Path]] = {}
    for other in rundir.store_sweeps(runs_root):
        if other == sweep_dir.resolve():
            continue
        try:
            ids = set((rundir.read_manifest(other) or {}).get("run_ids", []))
        except rundir.CorruptRecord:
            continue
        for r in want & ids:
            out.setdefault(r, []).append(other)
    return out


def cancel(
    sweep_dir: Path,
    runs: Sequence[str] = (),
    cells: Sequence[str] = (),
    every: bool = False,
    undo: bool = False,
    force: bool = False,
    dry_run: bool = False,
    out=sys.stdout,
) -> list[Action]:
    """Select, check, record, then signal (see the module docstring). Returns the actions."""
    sweep_dir = Path(sweep_dir).resolve()
    manifest = rundir.read_manifest(sweep_dir)
    if manifest is None:
        raise SpecError("sweep_dir", f"{sweep_dir} has no {rundir.MANIFEST} (not a sweep dir)")
    if not (runs or cells or every):
        raise SpecError(
            "cancel", "name what to cancel: --run RUN_ID, --cell MODEL/RECIPE/D or --all"
        )
    ids = list(manifest["run_ids"])
    keys = _keys(sweep_dir, ids) if cells else {}
    chosen = select_runs(ids, keys, runs, cells, every)
    cancelled = rundir.read_cancelled(sweep_dir)
    if undo:
        back = [r for r in chosen if r in cancelled]
        verb = "would un-cancel" if dry_run else "un-cancelled"
        print(f"{verb} {len(back)} runs; rerun the sweep to resubmit them (they resume)", file=out)
        if not dry_run and back:
            rundir.write_cancelled(
                sweep_dir, {k: v for k, v in cancelled.items() if k not in set(back)}
            )
        return [Action(r, "cancelled", "undo") for r in back]
    statuses = status.sweep_states(sweep_dir, chosen)
    last = {r: (rundir.read_attempts(rundir.run_dir(sweep_dir, r)) or [{}])[-1] for r in chosen}
    actions = plan(statuses, last, status.this_host())
    live = [a.run_id for a in actions if a.state in ("queued", "running")]
    shared = shared_with(sweep_dir, rundir.manifest_runs_root(sweep_dir, manifest), live)
    for a in actions:
        note = f"  {a.note}" if a.note else ""
        print(f"{a.run_id}  {a.state:<9} {a.kind:<7} {a.target}{note}", file=out)
    if shared and not force:
        names = sorted({str(p) for ps in shared.values() for p in ps})
        raise SpecError(
            "--force",
            f"{len(shared)} selected runs are live and also in other sweeps {names} "
            f"({sorted(shared)[:5]}...): cancelling stops their jobs there too; pass --force",
        )
    todo = [a for a in actions if a.kind != "none"]
    verb = "would cancel" if dry_run else "cancelled"
    print(
        f"{verb} {len(todo)} of {len(chosen)} selected runs ({sum(a.kind == 'scancel' for a in todo)} "
        f"SLURM tasks, {sum(a.kind == 'sigterm' for a in todo)} local processes)",
        file=out,
    )
    if dry_run or not todo:
        return actions
    now = time.time()
    stamp = {a.run_id: {"time": now, "state": a.state, "job": a.target} for a in todo}
    rundir.write_cancelled(sweep_dir, {**cancelled, **stamp})  # before any signal
    _signal(todo, out)
    return actions


def _signal(actions: Sequence[Action], out) -> None:
    jobs = [a.target for a in actions if a.kind == "scancel"]
    if jobs:
        p = subprocess.run(["scancel", *jobs], capture_output=True, text=True, timeout=120)
        if p.returncode != 0:
            raise RuntimeError(f"scancel {' '.join(jobs)} failed: {p.stderr.strip()}")
    for a in actions:
        if a.kind != "sigterm":
            continue
        try:
            os.kill(int(a.target), signal.SIGTERM)  # the trainer checkpoints and stops
        except ProcessLookupError:
            print(f"{a.run_id}: pid {a.target} already gone", file=out)


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(prog="python -m steplaw_train.sweep.cancel", description=__doc__)
    p.add_argument("sweep_dir", type=Path)
    p.add_argument("--run", action="append", default=[], help="a run_id (repeatable)")
    p.add_argument("--cell", action="append", default=[], help="MODEL[/RECIPE[/D]] (repeatable)")
    p.add_argument("--all", action="store_true", help="every run of the sweep")
    p.add_argument("--undo", action="store_true", help="un-cancel the selected runs")
    p.add_argument("--force", action="store_true", help="also stop live runs other sweeps share")
    p.add_argument("--dry-run", action="store_true", help="print the actions, do nothing")
    args = p.parse_args(argv)
    try:
        cancel(args.sweep_dir, args.run, args.cell, args.all, args.undo, args.force, args.dry_run)
    except (SpecError, status.SchedulerUnavailable, rundir.CorruptRecord) as e:
        print(f"error: {e}".splitlines()[0], file=sys.stderr)
        sys.exit(2)
    except (RuntimeError, OSError) as e:
        print(f"error: {e}".splitlines()[0], file=sys.stderr)
        sys.exit(1)


if __name__ == "__main__":
    main()
