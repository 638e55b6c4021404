"""wandb from run directories: exactly one wandb run per run_id, however often the run restarted.

metrics.jsonl is the run's record; wandb is its dashboard. Live logging (metrics.py) mirrors
each step as it happens, but wandb cannot resume an offline run: every restart of a run in
offline mode (the default, and the only mode on clusters without network) starts a fresh
`offline-run-*` folder, so syncing a requeued run's live folders gives several fragments, with
the steps re-logged after a resume duplicated. This module is the other path: it rebuilds the
wandb run of a run directory from spec.json, metrics.jsonl and result.json, in one go, as a
single offline run folder (then `wandb sync`) or straight to a server (`--mode online`).

    python -m steplaw_train.wandb_export RUN_DIR|SWEEP_DIR [--out DIR] [--mode offline|online]
    wandb sync DIR/wandb/offline-run-*        # DIR defaults to SWEEP_DIR/wandb_export

Idempotent: an offline export records a fingerprint of the files it read; exporting again
skips runs whose files have not changed and replaces (never duplicates) those that have.
Online, the run is opened with id=run_id and resume="allow", so it is the same wandb run as the
live one; wandb keeps the steps it already has and takes the rest (to rebuild a damaged online
run from scratch, delete it in the UI first, or export offline and sync).
Live logging and the exporter name, group, tag and plot runs the same way (`identity`,
`define_axes`, `put_summary` below), so either path gives the same dashboard.

How a run ends in wandb: result.json status done or diverged → exit code 0 (the status is a
tag and a summary key: a diverged run is a measurement, +inf loss); no result.json and the
launcher's last attempt failed → exit code 1 (wandb: failed); no result.json otherwise (still
running, preempted, killed) → marked preempting, exit code 1.
"""

from __future__ import annotations

import argparse
import contextlib
import hashlib
import json
import math
import os
import shutil
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from steplaw_train import rundir

EXPORT_DIR = "wandb_export"  # default output folder, inside the run or sweep directory
FINGERPRINT = "steplaw_export.json"  # written into each exported offline run folder
SUMMARY_KEYS = ("status", "final_loss", "smooth_loss", "steps", "tokens", "wall_time_s")
JOB_TYPE = "train"


# ---- names, tags, axes: shared with live logging ------------------------------------------------
def human(x: float) -> str:
    """1.07e9 → '1.1B', 2.14e8 → '214M', 2e10 → '20B', 96 → '96' (3 significant digits, then 2)."""
    for unit, div in (("T", 1e12), ("B", 1e9), ("M", 1e6), ("K", 1e3)):
        if abs(x) >= div:
            v = x / div
            return f"{v:.2g}{unit}" if v < 10 else f"{v:.3g}{unit}"
    return f"{x:g}"


def short_float(x: float) -> str:
    """2.4e-4 → '2.4e-4', 0.003 → '3e-3' (two significant digits, no exponent padding)."""
    mantissa, exp = f"{x:.1e}".split("e")
    return f"{mantissa.rstrip('0').rstrip('.')}e{int(exp)}"


def run_name(doc: dict) -> str:
    """'1.1B D=20B lr=2.4e-4 bs=32' from a spec.json document (N, D, peak lr, batch in
    sequences); MoE runs add their activated parameters."""
    spec, derived = doc["spec"], doc.get("derived") or {}
    t = spec["train"]
    n, na = derived.get("N"), derived.get("Na")
    size = human(n) if n else spec["model"].get("name", "?")
    if n and na and na != n:
        size += f" (act {human(na)})"
    d = derived.get("D", t.get("tokens"))
    return f"{size} D={human(d)} lr={short_float(t['lr'])} bs={t['batch_size']}"


def run_tags(doc: dict, status: str) -> list[str]:
    """cell (N and D), model, recipe and status, as `key:value` tags (wandb caps tags at 64)."""
    spec, derived = doc["spec"], doc.get("derived") or {}
    n, d = derived.get("N"), derived.get("D", spec["train"].get("tokens"))
    tags = [
        f"cell:N={human(n)} D={human(d)}" if n else None,
        f"model:{spec['model'].get('name')}",
        f"recipe:{spec['data'].get('recipe')}",
        f"status:{status}",
    ]
    return [t[:64] for t in tags if t]


def identity(doc: dict, group: str | None, status: str) -> dict[str, Any]:
    """wandb.init keyword arguments that identify a run: the same live and exported. The code's
    provenance (spec.json's derived.provenance: commit, dirty, digest, packages) is its own
    config section, so runs filter and group by `provenance.commit` / `provenance.key`."""
    derived = dict(doc.get("derived") or {})
    prov = derived.pop("provenance", None)
    config = {"spec": doc["spec"], "derived": derived}
    if prov is not None:
        config["provenance"] = prov
    return {
        "id": derived.get("run_id"),
        "name": run_name(doc),
        "group": group,
        "job_type": JOB_TYPE,
        "tags": run_tags(doc, status),
        "config": config,
    }


def define_axes(run: Any) -> None:
    """Tokens are the x-axis of every metric (runs with different batch sizes line up)."""
    run.define_metric("tokens")
    run.define_metric("*", step_metric="tokens")


def set_status(run: Any, status: str) -> None:
    run.tags = tuple(t for t in run.tags if not t.startswith("status:")) + (f"status:{status}",)


def put_summary(run: Any, result: dict[str, Any]) -> None:
    """status, losses, steps, tokens and wall time into the summary. +inf (a diverged run's
    smoothed loss) is kept: it is the run's value, worse than any other; NaN is left out."""
    for k in SUMMARY_KEYS:
        v = result.get(k)
        if v is None or (isinstance(v, float) and math.isnan(v)):
            continue
        run.summary[k] = v
    if "status" in result:
        set_status(run, str(result["status"]))


def finite(record: dict[str, Any]) -> dict[str, Any]:
    """The record without NaN/inf values (wandb's history charts cannot draw them)."""
    return {k: v for k, v in record.items() if not isinstance(v, float) or math.isfinite(v)}


# ---- reading a run directory ------------------------------------------------------------------
@dataclass(frozen=True)
class RunRecord:
    """What the exporter needs from one run directory."""

    run_dir: Path
    doc: dict
    metrics: tuple[dict, ...]
    result: dict | None
    status: str  # done | diverged | failed | unfinished
    exit_code: int

    @property
    def run_id(self) -> str:
        return (self.doc.get("derived") or {}).get("run_id") or self.run_dir.name


def _read_json(path: Path) -> dict | None:
    """rundir.read_json, with a damaged record read as absent (the export skips what it lacks)."""
    try:
        return rundir.read_json(path)
    except rundir.CorruptRecord:
        return None


def read_metrics_lines(path: Path) -> list[dict]:
    """metrics.jsonl's records (rundir.read_metrics): a killed writer's partial last line is
    dropped, any other bad line is an error naming it (the curve would be wrong)."""
    return rundir.read_metrics(Path(path).parent)


def _status(run_dir: Path, result: dict | None) -> tuple[str, int]:
    if result is not None:
        return str(result.get("status", "done")), 0
    launch = _read_json(rundir.launch_path(run_dir)) or {}
    last = (launch.get("attempts") or [{}])[-1]
    return ("failed", 1) if last.get("state") == "failed" else ("unfinished", 1)


def read_run(run_dir: Path) -> RunRecord:
    doc = _read_json(rundir.spec_path(run_dir))
    if doc is None or "spec" not in doc:
        raise ValueError(f"{run_dir}: no readable spec.json")
    result = _read_json(rundir.result_path(run_dir))
    status, code = _status(run_dir, result)
    metrics = tuple(rundir.read_metrics(run_dir))
    return RunRecord(run_dir, doc, metrics, result, status, code)


def fingerprint(run_dir: Path) -> str:
    """Hash of every file the export reads: unchanged files → the same export."""
    h = hashlib.sha256()
    for name in (rundir.SPEC, rundir.METRICS, rundir.RESULT, rundir.LAUNCH):
        p = run_dir / name
        h.update(name.encode() + b"\0" + (p.read_bytes() if p.exists() else b"<absent>") + b"\0")
    return h.hexdigest()


def find_run_dirs(path: Path) -> list[Path]:
    """`path` itself if it is a run dir, else every run dir below it (sweep/runs/<id>/).

    Links are followed (a sweep's runs/<id> links into the run store); each real directory is
    taken once, so a tree holding sweeps and their store exports a shared run once."""
    found = []
    seen: set[str] = set()
    for root, dirs, files in os.walk(path, followlinks=True):
        real = os.path.realpath(root)
        if real in seen:
            dirs.clear()
            continue
        seen.add(real)
        if rundir.SPEC in files:
            found.append(Path(root))
            dirs.clear()  # a run dir's checkpoints/ and wandb/ hold no other runs
        else:
            dirs[:] = [d for d in dirs if d not in (EXPORT_DIR, "wandb", "logs")]
    return sorted(found)


def sweep_group(run_dir: Path) -> str | None:
    """The sweep's name (its manifest's grid, as live logging uses) for sweep/runs/<id>/."""
    if run_dir.parent.name != "runs":
        return None
    manifest = _read_json(run_dir.parent.parent / rundir.MANIFEST) or {}
    return manifest.get("grid") or run_dir.parent.parent.name


# ---- writing ----------------------------------------------------------------------------------
def offline_folders(out: Path, run_id: str) -> list[Path]:
    return sorted((out / "wandb").glob(f"offline-run-*-{run_id}"))


def _log_run(rec: RunRecord, directory: Path, project: str, group: str | None, mode: str) -> None:
    """One wandb run from the record: every metrics line, the summary, the exit code."""
    import wandb

    ident = identity(rec.doc, group, rec.status)
    ident["id"] = rec.run_id
    run = wandb.init(
        project=project,
        dir=str(directory),
        mode=mode,
        resume="allow",
        settings=wandb.Settings(silent=True, console="off"),
        **ident,
    )
    try:
        define_axes(run)
        for r in rec.metrics:
            run.log(finite(r), step=int(r["step"]))
        put_summary(run, rec.result or {"status": rec.status})
        if rec.status == "unfinished":
            run.mark_preempting()
    finally:
        run.finish(exit_code=rec.exit_code)


@dataclass(frozen=True)
class Exported:
    run_id: str
    status: str
    action: str  # written | unchanged | online
    folder: Path | None


def export_run(
    run_dir: Path,
    out: Path,
    project: str = "steplaw",
    group: str | None = None,
    mode: str = "offline",
    force: bool = False,
) -> Exported:
    """Export one run dir; offline runs land in out/wandb/offline-run-<time>-<run_id>/."""
    if mode not in ("offline", "online"):
        raise ValueError(f"mode: must be 'offline' or 'online', got {mode!r}")
    rec = read_run(run_dir)
    group = group if group is not None else sweep_group(run_dir)
    staging = out / f".staging-{rec.run_id}"
    shutil.rmtree(staging, ignore_errors=True)
    staging.mkdir(parents=True)
    try:
        if mode == "online":
            _log_run(rec, staging, project, group, mode)
            return Exported(rec.run_id, rec.status, "online", None)
        fp = fingerprint(run_dir)
        old = offline_folders(out, rec.run_id)
        if not force and len(old) == 1:
            mark = _read_json(old[0] / FINGERPRINT) or {}
            if mark.get("fingerprint") == fp and mark.get("project") == project:
                return Exported(rec.run_id, rec.status, "unchanged", old[0])
        _log_run(rec, staging, project, group, mode)
        (new,) = offline_folders(staging, rec.run_id)
        (new / FINGERPRINT).write_text(
            json.dumps({"fingerprint": fp, "project": project, "run_dir": str(run_dir)})
        )
        for o in old:  # replaced, never duplicated
            shutil.rmtree(o)
        (out / "wandb").mkdir(parents=True, exist_ok=True)
        dest = out / "wandb" / new.name
        os.replace(new, dest)
        return Exported(rec.run_id, rec.status, "written", dest)
    finally:
        shutil.rmtree(staging, ignore_errors=True)


def export(
    path: str | Path,
    out: str | Path | None = None,
    project: str = "steplaw",
    group: str | None = None,
    mode: str = "offline",
    force: bool = False,
) -> list[Exported]:
    """Export every run directory under `path` (a run dir or a sweep dir)."""
    path = Path(path)
    if not path.is_dir():
        raise ValueError(f"{path}: not a directory")
    dirs = find_run_dirs(path)
    if not dirs:
        raise ValueError(f"{path}: no run directory (spec.json) found")
    out = Path(out) if out is not None else path / EXPORT_DIR
    return [export_run(d, out, project, group, mode, force) for d in dirs]


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m steplaw_train.wandb_export", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)  # fmt: skip
    p.add_argument("path", help="a run directory or a sweep directory")
    p.add_argument("--out", help=f"where offline runs go (default: PATH/{EXPORT_DIR})")
    p.add_argument("--project", default="steplaw")
    p.add_argument("--group", help="wandb group (default: the sweep's grid name)")
    p.add_argument("--mode", default="offline", choices=("offline", "online"))
    p.add_argument("--force", action="store_true", help="rewrite runs whose files are unchanged")
    args = p.parse_args(argv)
    try:
        done = export(args.path, args.out, args.project, args.group, args.mode, args.force)
    except ValueError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    counts: dict[str, int] = {}
    for e in done:
        counts[e.action] = counts.get(e.action, 0) + 1
    print(", ".join(f"{n} {a}" for a, n in sorted(counts.items())) + f" of {len(done)} runs")
    if args.mode == "offline":
        out = Path(args.out) if args.out else Path(args.path) / EXPORT_DIR
        print(f"upload with: wandb sync {out}/wandb/offline-run-*")
    with contextlib.suppress(Exception):
        import wandb

        wandb.teardown()
    return 0


if __name__ == "__main__":
    sys.exit(main())
