"""Runs → one tidy table (one row per run), from the authors' released CSVs or our run directories.

Every later step (fit, compare, report) reads only this table, so both sources must land in the
same columns (`COLUMNS`, documented in docs/design.md and docs/analysis.md). Bad rows are never
dropped: they stay in the table with `excluded_reason` set, so the report can list them.
A diverged run is used, with `smooth_loss = inf` (worse than any finished run, never missing).
"""

from __future__ import annotations

import math
import os
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from steplaw_train import params, rundir

# the cell definition lives in steplaw_train/cells.py; re-exported for the analysis modules
from steplaw_train.cells import AXES, varying_axes  # noqa: F401
from steplaw_train.cells import table_key as cell_key  # noqa: F401
from steplaw_train.smoothing import smoothed_final_loss

COLUMNS = [
    "run_id", "source", "status", "excluded_reason", "N", "Na", "D", "M", "C",
    "h", "ffnh", "numh", "numl", "seq_len", "lr", "bs", "bs_tokens", "iterations", "steps",
    "loss", "smooth_loss", "model_name", "recipe", "num_experts", "topk", "moe_ffnh",
    "shared_ffnh", "seed",
]  # fmt: skip

DENSE_REQUIRED = ["h", "ffnh", "numh", "numl", "lr", "bs", "ti", "loss", "smooth loss", "D", "N"]
MOE_REQUIRED = [
    "seq_len", "topk", "nume", "moeh", "h", "ffnh", "numh", "numl", "lr", "bs", "ti",
    "loss", "smooth loss", "N", "Na", "M", "D",
]  # fmt: skip
# Columns only the MoE release has: any of them present means "this is the MoE schema".
MOE_MARKERS = {"nume", "moeh", "topk", "Na", "moe_name", "Na/N"}
RELEASED_SEQ_LEN = 2048  # the dense release's bs is in sequences of 2,048 tokens

POSITIVE = ["N", "D", "lr", "bs"]


def shared_dir() -> Path:
    """The shared reference-data folder: $STEPLAW_SHARED, else `shared/` beside the repo."""
    env = os.environ.get("STEPLAW_SHARED")
    return Path(env) if env else Path(__file__).resolve().parents[2] / "shared"


def released_dense_csv() -> Path:
    return shared_dir() / "steplaw" / "dense_lr_bs_loss.csv"


def released_bootstrap_csv() -> Path:
    return shared_dir() / "steplaw" / "1004_fitted_lr_bs_scaling_model_parameters.csv"


# ---------------------------------------------------------------------------------------------
# Released CSVs
# ---------------------------------------------------------------------------------------------


def read_released(path: str | Path) -> pd.DataFrame:
    """Read the authors' dense or MoE CSV (schema detected from its columns) into the tidy table.

    Raises ValueError listing every missing required column, before any other work.
    """
    raw = pd.read_csv(path)
    is_moe = bool(MOE_MARKERS & set(raw.columns))
    required = MOE_REQUIRED if is_moe else DENSE_REQUIRED
    missing = [c for c in required if c not in raw.columns]
    if missing:
        schema = "MoE" if is_moe else "dense"
        raise ValueError(f"{path}: missing required columns for the {schema} schema: {missing}")
    df = _released_moe(raw) if is_moe else _released_dense(raw)
    return finalize(df)


def _num(raw: pd.DataFrame, col: str) -> pd.Series:
    return pd.to_numeric(raw[col], errors="coerce")


def _released_common(raw: pd.DataFrame, seq_len: pd.Series) -> pd.DataFrame:
    n = len(raw)
    ids = raw["exp_name"].astype(str) if "exp_name" in raw else pd.Series(range(n)).astype(str)
    if not ids.is_unique:  # keep ids unique so a run can be named in the report
        ids = ids + "#" + pd.Series(range(n), index=ids.index).astype(str)
    bs = _num(raw, "bs")
    return pd.DataFrame(
        {
            "run_id": ids.to_numpy(),
            "source": "released",
            "status": "done",
            "excluded_reason": None,
            "N": _num(raw, "N"),
            "D": _num(raw, "D"),
            "h": _num(raw, "h"),
            "ffnh": _num(raw, "ffnh"),
            "numh": _num(raw, "numh"),
            "numl": _num(raw, "numl"),
            "seq_len": seq_len,
            "lr": _num(raw, "lr"),
            "bs": bs,
            "bs_tokens": bs * seq_len,
            "loss": _num(raw, "loss"),
            "smooth_loss": _num(raw, "smooth loss"),
        }
    )


def _released_dense(raw: pd.DataFrame) -> pd.DataFrame:
    seq = pd.Series(RELEASED_SEQ_LEN, index=raw.index, dtype="float64")
    df = _released_common(raw, seq)
    df["Na"] = df["N"]
    df["M"] = [
        params.count(int(h), int(f), int(lyr), RELEASED_SEQ_LEN).M
        if np.isfinite([h, f, lyr]).all()
        else math.nan
        for h, f, lyr in zip(df["h"], df["ffnh"], df["numl"], strict=True)
    ]
    df["iterations"] = _num(raw, "ti")
    df["steps"] = _num(raw, "ti")
    df["model_name"] = [
        f"h{h:g}_ffnh{f:g}_numl{lyr:g}" for h, f, lyr in zip(df.h, df.ffnh, df.numl, strict=True)
    ]
    df["recipe"] = None
    for c in ("num_experts", "topk", "moe_ffnh", "shared_ffnh"):
        df[c] = 0
    df["seed"] = math.nan
    return df


def _released_moe(raw: pd.DataFrame) -> pd.DataFrame:
    df = _released_common(raw, _num(raw, "seq_len"))
    df["Na"] = _num(raw, "Na")
    df["M"] = _num(raw, "M")
    # target_iter is the planned iteration count, -1 when the authors did not set one: then the
    # plan is ti (~ D / (bs * seq_len)), so "stopped short" can still be checked.
    ti = _num(raw, "ti")
    target = _num(raw, "target_iter") if "target_iter" in raw else ti
    df["iterations"] = target.where(target > 0, ti)
    df["steps"] = _num(raw, "final_iter") if "final_iter" in raw else ti
    df["model_name"] = raw["moe_name"].astype(str) if "moe_name" in raw else None
    df["recipe"] = None
    df["num_experts"] = _num(raw, "nume")
    df["topk"] = _num(raw, "topk")
    df["moe_ffnh"] = _num(raw, "moeh")
    # sed is the shared expert's FFN width (params.count reproduces the release's N, Na and M
    # exactly with shared_ffnh = sed), not a seed; the release has no seed column
    df["shared_ffnh"] = _num(raw, "sed") if "sed" in raw else 0
    df["seed"] = math.nan
    return df


# ---------------------------------------------------------------------------------------------
# Run directories
# ---------------------------------------------------------------------------------------------


def iter_run_dirs(root: str | Path, max_depth: int = 4) -> Iterator[Path]:
    """Every run directory under `root` (root included), sorted, each real directory once.

    Symlinks are followed: a sweep dir's `runs/<run_id>` links into the run store, and a tree
    holding both the sweeps and the store reaches one run by several paths; each real directory
    is yielded once (the first path found), and links back up the tree cannot loop."""
    root = Path(root)
    if rundir.is_run_dir(root):
        yield root
        return
    found: list[Path] = []
    seen = {os.path.realpath(root)}
    stack = [(root, 0)]
    while stack:
        d, depth = stack.pop()
        try:
            entries = sorted(os.scandir(d), key=lambda e: e.name)
        except OSError:
            continue
        for e in entries:
            if e.name == rundir.CHECKPOINTS or not e.is_dir():
                continue
            real = os.path.realpath(e.path)
            if real in seen:
                continue
            seen.add(real)
            p = Path(e.path)
            if rundir.is_run_dir(p):
                found.append(p)
            elif depth + 1 < max_depth:
                stack.append((p, depth + 1))
    yield from sorted(found)


def collect_runs(path: str | Path) -> pd.DataFrame:
    """The tidy table of every run directory under `path` (a sweep dir, a runs dir or one run)."""
    path = Path(path)
    if not path.is_dir():
        raise ValueError(f"{path}: not a directory")
    rows = [read_run_dir(d) for d in iter_run_dirs(path)]
    if not rows:  # an empty or non-sweep directory: say so here, not as a numpy error later
        raise ValueError(
            f"{path}: no run directories found (expected a sweep dir, its runs/ dir or a run "
            "dir holding spec.json)"
        )
    return dedupe_runs(finalize(pd.DataFrame(rows, columns=COLUMNS)))


def dedupe_runs(df: pd.DataFrame) -> pd.DataFrame:
    """One row per run_id among our runs (released rows are left alone).

    Two sweeps that share a run see one run directory (the store), which iter_run_dirs already
    yields once; two *copies* of one run_id (sweep dirs made before the store each trained their
    own) are one run too: same spec, so the same point. The kept row is the most usable one: a
    finished run over an unfinished one, a used row over an excluded one, then the first path."""
    ours = df["source"] == "runs"
    if not ours.any() or not df.loc[ours, "run_id"].duplicated().any():
        return df
    finished = df["status"].isin(["done", "diverged"])
    rank = (~finished).astype(int) * 2 + df["excluded_reason"].notna().astype(int)
    order = rank.sort_values(kind="stable").index
    keep = ~df.loc[order].duplicated("run_id") | ~ours.loc[order]
    return df.loc[order[keep.to_numpy()]].sort_index().reset_index(drop=True)


def _log_interval(steps: list[int], default: int) -> int:
    if len(steps) >= 2:
        diffs = np.diff(steps)
        if diffs.size and np.median(diffs) > 0:
            return int(np.median(diffs))
    return max(1, int(default))


def read_run_dir(run_dir: Path) -> dict[str, Any]:
    """One row of the tidy table from a run directory (never raises on bad content)."""
    row: dict[str, Any] = dict.fromkeys(COLUMNS)
    row.update(run_id=run_dir.name, source="runs", status="unreadable")
    try:
        spec_fields, log_interval = rundir.spec_row(rundir.read_spec(run_dir) or {})
    except (rundir.CorruptRecord, ValueError, KeyError, TypeError) as e:
        row["excluded_reason"] = f"spec.json unreadable ({e.__class__.__name__}: {e})"
        return row
    row.update({k: v for k, v in spec_fields.items() if k != "run_id" or v})
    steps, losses, problem = rundir.read_loss_series(run_dir)
    try:
        result = rundir.read_result(run_dir)
    except rundir.CorruptRecord as e:
        row.update(status="unreadable", excluded_reason=f"result.json unreadable ({e.problem})")
        return row
    if result is None:
        row.update(status="unfinished", steps=steps[-1] if steps else 0)
        row["loss"] = losses[-1] if losses else math.nan
        row["excluded_reason"] = "no result.json (run not finished)"
        return row
    status = str(result["status"])
    try:
        planned = int(result.get("planned_steps") or row["iterations"] or 0)
        done_steps = int(result.get("steps", steps[-1] if steps else 0))
    except (TypeError, ValueError) as e:
        row.update(status="unreadable", excluded_reason=f"result.json unreadable ({e})")
        return row
    row.update(status=status, steps=done_steps, loss=result.get("final_loss", math.nan))
    if status == "diverged":
        row["smooth_loss"] = math.inf
        return row
    if problem is not None:
        row["excluded_reason"] = problem
    elif done_steps < planned:
        row["excluded_reason"] = f"stopped at step {done_steps} of {planned} planned"
    row["smooth_loss"] = _smooth(steps, losses, done_steps, log_interval, result)
    return row


def _smooth(steps: list[int], losses: list[float], done: int, interval: int, result: dict) -> float:
    """Recompute the smoothed loss from the logged series when it is complete, else trust result."""
    if steps and steps[-1] >= done:
        return smoothed_final_loss(losses, _log_interval(steps, interval))
    value = result.get("smooth_loss")
    return float(value) if value is not None else math.nan


# ---------------------------------------------------------------------------------------------
# Shared checks and cell keys
# ---------------------------------------------------------------------------------------------


def finalize(df: pd.DataFrame) -> pd.DataFrame:
    """Order the columns, fill C, and flag rows whose values cannot enter a fit (vectorised).

    A reason set while reading the run (e.g. a corrupt metrics.jsonl) is kept; otherwise the
    first failing check, in the order below, names the problem.
    """
    df = df.reindex(columns=COLUMNS).reset_index(drop=True)
    for c in ("N", "Na", "D", "M", "C", "lr", "bs", "bs_tokens", "loss", "smooth_loss"):
        df[c] = pd.to_numeric(df[c], errors="coerce").astype("float64")
    df["C"] = df["C"].fillna(df["M"] * df["D"])
    reason = pd.Series(df["excluded_reason"].to_numpy(dtype=object), index=df.index, dtype=object)
    reason = reason.where(reason.notna(), None)
    for c in POSITIVE:
        v = df[c]
        msg = f"invalid {c}: " + v.map(repr) + " (must be a positive finite number)"
        reason = _fill(reason, ~(np.isfinite(v) & (v > 0)), msg)
    s = df["smooth_loss"]
    reason = _fill(reason, s.isna() | (s <= 0), "invalid smooth_loss: " + s.map(repr))
    steps = pd.to_numeric(df["steps"], errors="coerce")
    planned = pd.to_numeric(df["iterations"], errors="coerce")
    short = (df["source"] == "released") & (steps < planned)
    msg = "stopped at step " + steps.map("{:g}".format) + " of " + planned.map("{:g}".format)
    reason = _fill(reason, short, msg + " planned")
    df["excluded_reason"] = reason
    return df


def _fill(reason: pd.Series, mask: pd.Series, text: pd.Series) -> pd.Series:
    """`text` where `mask` holds and no reason is set yet."""
    fresh = (mask & reason.isna()).to_numpy()
    out = reason.copy()
    out[fresh] = text[fresh].to_numpy()
    return out


def used(df: pd.DataFrame) -> pd.DataFrame:
    """The rows that enter fits and comparisons."""
    return df[df["excluded_reason"].isna()]


def load(path: str | Path | Sequence[str | Path]) -> pd.DataFrame:
    """A released CSV or a directory of run directories, whichever `path` is; several paths
    (sweep dirs sharing runs, a store) are one table, one row per run_id (dedupe_runs)."""
    if not isinstance(path, str | Path):
        parts = [load(p) for p in path]
        if not parts:
            raise ValueError("no source given")
        return dedupe_runs(pd.concat(parts, ignore_index=True))
    p = Path(path)
    if not p.exists():
        raise ValueError(f"{path}: no such file or directory")
    if p.is_dir():
        return collect_runs(p)
    if p.suffix.lower() == ".csv":
        return read_released(p)
    raise ValueError(f"{path}: expected a run/sweep directory or a released .csv file")
