"""`analysis report --wandb`: the sweep as a whole in wandb, as one `job_type=analysis` run.

What a lab reads beside the per-run curves: the tidy run table (a wandb Table: filter, sort,
parallel coordinates), every heatmap and fit plot the report wrote (images), and in the run's
summary the gap table (per law, both readings) and the fitted law (or why there is none). The
files in the report directory stay the record; this mirrors them. Offline by default (the
folder lands in REPORT_DIR/wandb/; `wandb sync` it), online when WANDB_MODE=online.
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pandas as pd

from steplaw_train.wandb_export import sweep_group


def _table_frame(df: pd.DataFrame) -> pd.DataFrame:
    """wandb Tables take plain scalars: text for objects, None for NaN/inf."""
    out = pd.DataFrame(index=df.index)
    for c in df.columns:
        col = df[c]
        if pd.api.types.is_bool_dtype(col) or pd.api.types.is_integer_dtype(col):
            out[c] = col
        elif pd.api.types.is_float_dtype(col):
            out[c] = [float(v) if np.isfinite(v) else None for v in col]
        else:  # object or string columns
            out[c] = [None if v is None or (isinstance(v, float) and not np.isfinite(v))
                      or v is pd.NA else str(v) for v in col]  # fmt: skip
    return out


def summary_fields(s: dict) -> dict:
    """The gap table and the fitted law, flattened for wandb's summary."""
    out: dict = {"runs_total": s["runs"]["total"], "runs_used": s["runs"]["used"],
                 "cells_used": s["cells"]["used"], "caveats": s.get("caveats", [])}  # fmt: skip
    for law, g in s["gaps"].items():
        for m in ("nearest", "surface"):
            for k in ("mean", "max"):
                out[f"gap_permille/{law}/{m}_{k}"] = g[m][k]
        out[f"law/{law}/lr"] = g["formula"]["lr"]
        out[f"law/{law}/bs_tokens"] = g["formula"]["bs_tokens"]
    fit = s.get("fit", {})
    if "skipped" in fit:
        out["fit/skipped"] = fit["skipped"]
    else:
        if "not_identifiable" in fit:
            out["fit/not_identifiable"] = fit["not_identifiable"]
        for k in ("lr", "bs", "bs_free"):
            if k in fit:
                out[f"fit/{k}/formula"] = fit[k]["formula"]
                out[f"fit/{k}/exponents"] = fit[k]["exponents"]
                out[f"fit/{k}/exponents_ci95"] = fit[k]["exponents_ci95"]
                out[f"fit/{k}/point_estimate"] = fit[k].get("point_estimate")
    return out


def log_analysis(a, s: dict, out: Path, project: str) -> str:
    """Log the report in `out` as one wandb run; returns its id."""
    import wandb

    src = Path(a.source)
    group = sweep_group(src / "runs" / "x") if (src / "runs").is_dir() else None
    run = wandb.init(
        project=project,
        job_type="analysis",
        group=group or src.stem,
        name=f"analysis {src.stem}",
        tags=["analysis", f"n_col:{a.settings.n_col}"],
        config={"source": a.source, "settings": s["settings"]},
        dir=str(out),
        mode=os.environ.get("WANDB_MODE") or "offline",
        settings=wandb.Settings(silent=True, console="off"),
    )
    try:
        payload: dict = {"runs": wandb.Table(dataframe=_table_frame(a.runs))}
        if not a.gap_summary.empty:
            payload["gap_summary"] = wandb.Table(dataframe=_table_frame(a.gap_summary))
        if not a.gaps.empty:
            payload["gaps"] = wandb.Table(dataframe=_table_frame(a.gaps))
        for png in sorted(out.glob("heatmaps/*.png")) + sorted(out.glob("plots/*.png")):
            payload[f"{png.parent.name}/{png.stem}"] = wandb.Image(str(png))
        run.log(payload)
        for k, v in summary_fields(s).items():
            run.summary[k] = v
    finally:
        run.finish()
    return run.id
