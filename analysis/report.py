"""`python -m analysis report`: a sweep directory or released CSV → a report directory.

`analyse` is pure (tables and fit in memory); `write_report` does the files; `print_summary` the
terminal. Files and summary.json keys are documented in docs/analysis.md.
"""

from __future__ import annotations

import datetime as dt
import json
import math
import re
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd

from analysis import cells as cells_mod
from analysis import collect, compare, plots
from analysis import laws as laws_mod
from analysis.fit import N_BOOT, THRESHOLD, StepLawFit, fit_step_law, optimal_points
from steplaw_train import atomic


@dataclass(frozen=True)
class Settings:
    threshold: float = THRESHOLD
    n_boot: int = N_BOOT
    seed: int = 0
    n_col: str = "N"  # which N the laws and the fit see: "N" (total) or "Na" (activated)
    surface_window: float = compare.SURFACE_WINDOW
    min_runs: int = cells_mod.MIN_RUNS
    laws: tuple[str, ...] = ()  # empty = all

    def check(self) -> None:
        if self.n_col not in ("N", "Na"):
            raise ValueError(f"n_col: must be 'N' (total) or 'Na' (activated), got {self.n_col!r}")
        if not 0 < self.threshold < 1:
            raise ValueError(f"threshold: must be in (0, 1), got {self.threshold}")
        if self.n_boot < 0:
            raise ValueError(f"n_boot: must be >= 0, got {self.n_boot}")
        laws_mod.by_name(list(self.laws))


@dataclass(frozen=True, eq=False)
class Analysis:
    """Everything a report shows, before any file is written."""

    source: str
    settings: Settings
    runs: pd.DataFrame
    key: list[str]
    cells: list[cells_mod.Cell]
    skipped_cells: list[dict]
    cell_table: pd.DataFrame
    gaps: pd.DataFrame
    gap_summary: pd.DataFrame
    loo: pd.DataFrame
    fit: StepLawFit | None
    fit_problem: str | None
    laws: tuple[laws_mod.Law, ...]
    surfaces: dict = field(default_factory=dict)
    robustness: dict[str, pd.DataFrame] = field(default_factory=dict)
    not_identifiable: str | None = None  # why the fit's exponents say nothing (fit kept, unused)

    @property
    def fit_identifiable(self) -> bool:
        return self.fit is not None and self.not_identifiable is None


def fit_problem(cells: list[cells_mod.Cell], n_col: str) -> str | None:
    """Why the Step Law fit is not identifiable on these cells (None if it is)."""
    if not cells:
        return "no usable cell"
    ns = {c.inputs(n_col)["N"] for c in cells}
    ds = {c.inputs(n_col)["D"] for c in cells}
    if len(ds) < 2:
        return f"needs at least 2 distinct D values, got {len(ds)}"
    if len(ns) < 2:
        return f"needs at least 2 distinct {n_col} values to fit the N exponent, got {len(ns)}"
    x = np.log([[c.inputs(n_col)["N"], c.inputs(n_col)["D"]] for c in cells])
    if np.linalg.matrix_rank(np.column_stack([np.ones(len(x)), x])) < 3:
        return "N and D vary together across cells: their exponents cannot be separated"
    return None


IDENTIFY_STEPS = 0.5  # an input must span at least this many grid steps (ln) to carry an exponent


def _median_log_step(values: list[np.ndarray]) -> float:
    steps = [np.median(np.diff(np.log(np.unique(v)))) for v in values if np.unique(v).size > 1]
    return float(np.median(steps)) if steps else math.nan


def not_identifiable(cells: list[cells_mod.Cell], n_col: str) -> str | None:
    """Why a fitted exponent cannot mean anything on these cells (None if every one can).

    An input with exponent a moves the optimum by a × (its ln-range across cells). When that
    range is below half the grid's ln step, an exponent of order one moves the optimum by less
    than half a grid point, so the cells cannot tell exponents apart: the fit returns whatever
    the noise implies (the MoE release's total N spans 0.26%: lr ∝ N^21.2, 95% CI [-50, 91]).
    """
    lr_step = _median_log_step([c.points["lr"].to_numpy(float) for c in cells])
    bs_step = _median_log_step([c.points["bs_tokens"].to_numpy(float) for c in cells])
    for name, col, step in ((n_col, "N", lr_step), ("D", "D", np.nanmax([lr_step, bs_step]))):
        spread = float(np.ptp(np.log([c.inputs(n_col)[col] for c in cells])))
        if np.isfinite(step) and spread < IDENTIFY_STEPS * step:
            return (
                f"{name} spans only {math.expm1(spread):.2%} across cells (ln range "
                f"{spread:.3g} < {IDENTIFY_STEPS:g} × the grid's ln step {step:.3g}): its "
                "exponent is not identifiable"
            )
    return None


def analyse(source: str | Path | Sequence[str | Path], settings: Settings = Settings()) -> Analysis:
    """Collect, split into cells, fit, compare every law both ways, leave-one-cell-out.
    Several sources (sweep dirs sharing runs) are one table, each run_id counted once."""
    settings.check()
    runs = collect.load(source)
    if not isinstance(source, str | Path):
        source = " + ".join(str(s) for s in source)
    key = collect.cell_key(runs)
    cells, skipped = cells_mod.split_cells(runs, key, settings.min_runs)
    cell_table = pd.DataFrame([cells_mod.summary(c, settings.threshold) for c in cells])
    surfaces = {c.label: compare.fit_surface(c, settings.surface_window) for c in cells}
    problem = fit_problem(cells, settings.n_col)
    fit, unident = None, None
    if problem is None:
        fit = fit_step_law(
            cells, settings.threshold, settings.n_boot, settings.seed, settings.n_col
        )
        unident = not_identifiable(cells, settings.n_col)
    laws = laws_mod.by_name(list(settings.laws))
    usable_fit = fit is not None and unident is None  # else: reported, never compared/plotted
    compared = laws + ((compare.fitted_law(fit),) if usable_fit else ())
    gaps = compare.compare(cells, compared, settings.n_col, surfaces) if cells else pd.DataFrame()
    loo = (
        compare.leave_one_cell_out(cells, settings.threshold, settings.n_col, surfaces)
        if usable_fit and len(cells) > 3
        else pd.DataFrame()
    )
    rob = {}
    for axis, cols in collect.varying_axes(runs).items():
        if not gaps.empty:
            rob[axis] = compare.robustness(gaps, cell_table, cols)
    return Analysis(
        source=str(source), settings=settings, runs=runs, key=key, cells=cells,
        skipped_cells=skipped, cell_table=cell_table, gaps=gaps,
        gap_summary=compare.gap_summary(gaps) if not gaps.empty else pd.DataFrame(),
        loo=loo, fit=fit, fit_problem=problem, laws=compare.prepare_laws(cells, compared, settings.n_col),
        surfaces=surfaces, robustness=rob, not_identifiable=unident,
    )  # fmt: skip


# ---------------------------------------------------------------------------------------------
# summary.json
# ---------------------------------------------------------------------------------------------


def _reason_kind(reason: str) -> str:
    """A reason with its numbers blanked, so that counts group like reasons together."""
    return re.sub(r"-?\d+(\.\d+)?(e[+-]?\d+)?", "#", reason)


def _stats(s: pd.Series) -> dict[str, float | int | None]:
    s = s.dropna() if len(s) else s
    if s.empty:
        return {"mean": None, "max": None, "cells": 0}
    return {"mean": float(s.mean()), "max": float(s.max()), "cells": int(s.size)}


def summary(a: Analysis) -> dict:
    """The machine-readable summary (keys documented in docs/analysis.md)."""
    excl = a.runs["excluded_reason"].dropna()
    gaps: dict[str, dict] = {}
    for law in a.laws:
        t = a.gaps[a.gaps["law"] == law.name] if not a.gaps.empty else a.gaps
        gaps[law.name] = {
            m: _stats(t[f"gap_{m}"]) if not t.empty else _stats(pd.Series(dtype=float))
            for m in compare.METHODS
        }
        gaps[law.name].update(
            lr_from=sorted(set(t["lr_from"])) if not t.empty else [],
            bs_from=sorted(set(t["bs_from"])) if not t.empty else [],
            formula={"lr": law.lr_formula, "bs_tokens": law.bs_formula},
            note=law.note,
        )
    ct = a.cell_table
    edges = (
        ct[ct["lr_edge"].notna() | ct["bs_edge"].notna()][["cell", "lr_edge", "bs_edge"]]
        if not ct.empty
        else pd.DataFrame()
    )
    out = {
        "source": a.source,
        "created": dt.datetime.now(dt.UTC).isoformat(timespec="seconds"),
        "settings": {
            "threshold": a.settings.threshold,
            "n_boot": a.settings.n_boot,
            "seed": a.settings.seed,
            "n_col": a.settings.n_col,
            "surface_window": a.settings.surface_window,
            "min_runs": a.settings.min_runs,
            "snap_tol": cells_mod.SNAP_TOL,
            "cell_key": a.key,
        },  # fmt: skip
        "runs": {
            "total": len(a.runs),
            "used": int(a.runs["excluded_reason"].isna().sum()),
            "excluded": int(excl.size),
            "excluded_by_reason": {
                k: int(v) for k, v in excl.map(_reason_kind).value_counts().items()
            },
            "diverged": int((a.runs["status"] == "diverged").sum()),
        },
        "cells": {
            "used": len(a.cells),
            "skipped": [{"cell": s["cell"], "reason": s["reason"]} for s in a.skipped_cells],
            "edge_optima": _records(edges),
            "surface_failed": {k: s.reason for k, s in a.surfaces.items() if not s.ok},
        },
        "gaps": gaps,
        "fit": _fit_summary(a),
        "loo": {m: _stats(a.loo[f"gap_{m}"]) for m in compare.METHODS}
        if not a.loo.empty
        else {"skipped": a.fit_problem or a.not_identifiable or "needs more than 3 cells"},
        "robustness": {axis: list(collect.AXES[axis]) for axis in a.robustness},
        "laws": laws_mod.as_records(a.laws),
    }
    out["caveats"] = caveats(out, a.runs)
    return out


def _fit_summary(a: Analysis) -> dict:
    if a.fit is None:
        return {"skipped": a.fit_problem}
    out = a.fit.to_dict()
    if a.not_identifiable:
        out["not_identifiable"] = a.not_identifiable
    return out


# The paper's dense study spans these; far below them, runs are step-limited and exponents local.
PAPER_N = (6e7, 1.1e9)
PAPER_D = (2e9, 1e11)
UNDETERMINED_CI_WIDTH = 1.0  # an exponent whose 95% interval is wider than this is not measured


def caveats(s: dict, runs: pd.DataFrame) -> list[str]:
    """What the report cannot claim, in words: printed with the numbers, kept in summary.json."""
    out: list[str] = []
    used = runs[runs["excluded_reason"].isna()]
    if not used.empty:
        n_max, d_max = float(used["N"].max()), float(used["D"].max())
        if n_max < PAPER_N[0] / 10 or d_max < PAPER_D[0] / 10:
            out.append(
                f"scale: N <= {n_max:.3g} and D <= {d_max:.3g} are far below the paper's "
                f"N {PAPER_N[0]:.0e}-{PAPER_N[1]:.0e}, D {PAPER_D[0]:.0e}-{PAPER_D[1]:.0e}; runs "
                "this small are step-limited, so fitted exponents describe this grid only and "
                "neither confirm nor refute Step Law"
            )
        for col in ("N", "D"):
            k = used[col].nunique()
            if 1 < k < 3:
                out.append(f"only {k} distinct {col}: a power law through {k} points cannot "
                           "show whether the form is right")  # fmt: skip
    edges = s["cells"]["edge_optima"]
    if edges:
        out.append(
            f"{len(edges)} of {s['cells']['used']} cells have their best run on a grid edge: "
            "the true optimum may lie outside the grid, so those optima (and fits through "
            "them) are bounds, not estimates; widen the grid on that side"
        )
    fit = s.get("fit", {})
    if "not_identifiable" in fit:
        out.append(f"fit not identifiable: {fit['not_identifiable']}; it is not compared or "
                   "plotted as a law")  # fmt: skip
    for name in ("lr", "bs", "bs_free"):
        for var, (lo, hi) in (fit.get(name, {}).get("exponents_ci95") or {}).items():
            if hi - lo > UNDETERMINED_CI_WIDTH:
                out.append(f"{name} exponent of {var}: 95% interval [{lo:.2f}, {hi:.2f}] — "
                           "not determined by these cells")  # fmt: skip
    d = s["runs"]["diverged"]
    if d:
        out.append(f"{d} runs diverged; they count as +inf loss (worse than any finished run)")
    return out


def _records(df: pd.DataFrame) -> list[dict]:
    return json.loads(df.to_json(orient="records")) if not df.empty else []


def _json_default(o: object) -> object:
    if isinstance(o, np.integer | np.floating):
        return o.item()
    return str(o)


def _finite_json(obj: object) -> object:
    """JSON has no inf/nan: write them as null so any reader can parse summary.json."""
    if isinstance(obj, float) and not math.isfinite(obj):
        return None
    if isinstance(obj, dict):
        return {k: _finite_json(v) for k, v in obj.items()}
    if isinstance(obj, list):
        return [_finite_json(v) for v in obj]
    return obj


# ---------------------------------------------------------------------------------------------
# Files
# ---------------------------------------------------------------------------------------------


def _slug(label: str) -> str:
    return re.sub(r"[^A-Za-z0-9.+-]+", "_", label).strip("_")


def _csv(df: pd.DataFrame, path: Path) -> None:
    atomic.write_text(path, df.to_csv(index=False))


def write_tables(a: Analysis, out: Path) -> None:
    _csv(a.runs, out / "runs.csv")
    try:
        import io

        buf = io.BytesIO()
        a.runs.astype(
            {c: "string" for c in ("excluded_reason", "model_name", "recipe")}
        ).to_parquet(buf)
        atomic.write_bytes(out / "runs.parquet", buf.getvalue())
    except ImportError:  # pyarrow is a declared dependency; a missing one costs only the parquet
        pass
    _csv(a.runs[a.runs["excluded_reason"].notna()], out / "excluded_runs.csv")
    _csv(pd.DataFrame(a.skipped_cells), out / "skipped_cells.csv")
    _csv(a.cell_table, out / "cells.csv")
    _csv(a.gaps, out / "gaps.csv")
    _csv(a.gap_summary, out / "gap_summary.csv")
    _csv(a.loo, out / "loo.csv")
    for axis, t in a.robustness.items():
        _csv(t, out / f"robustness_{axis}.csv")
    if a.fit is not None:
        a.fit.write(out)
        _csv(
            optimal_points(a.cells, a.settings.threshold, a.settings.n_col),
            out / "optimal_points.csv",
        )


def write_figures(
    a: Analysis, out: Path, progress: bool = True, valley: bool = False
) -> list[Path]:
    """Per cell the gap map beside the smoothed-loss map (and, with `valley`, the paper's 3-D
    view); the optimum-vs-N/D plots (identifiable fits only), gap bars, robustness views."""
    written = []
    cells = a.cells
    if progress:
        from rich.progress import track

        cells = track(cells, description="heatmaps", transient=True)
    for c in cells:
        preds = a.gaps[a.gaps["cell"] == c.label] if not a.gaps.empty else None
        fig = plots.Figure(figsize=(14, 6.6), layout="constrained")
        gap_ax, loss_ax = fig.subplots(1, 2)
        plots.heatmap(gap_ax, c, preds, a.settings.threshold, a.settings.n_col)
        plots.loss_map(loss_ax, c, a.settings.threshold, a.settings.n_col)
        written.append(out / "heatmaps" / f"{_slug(c.label)}.png")
        plots.save(fig, written[-1])
        if valley:
            fig = plots.Figure(figsize=(6.4, 5.2), layout="constrained")
            plots.valley(fig.add_subplot(projection="3d"), c)
            written.append(out / "valleys" / f"{_slug(c.label)}.png")
            plots.save(fig, written[-1])
    if a.fit is not None and a.fit_identifiable:
        pts = optimal_points(a.cells, a.settings.threshold, a.settings.n_col)
        for target, axis in (("lr", "N"), ("lr", "D"), ("bs_tokens", "D")):
            fig, ax = plots.new_figure()
            plots.optimum_vs(ax, pts, a.fit, target, axis)
            written.append(out / "plots" / f"optimal_{target}_vs_{axis}.png")
            plots.save(fig, written[-1])
    if not a.gap_summary.empty:
        fig, ax = plots.new_figure()
        plots.gap_bars(ax, a.gap_summary)
        written.append(out / "plots" / "gaps.png")
        plots.save(fig, written[-1])
    for axis, t in a.robustness.items():
        col = collect.AXES[axis][0] if collect.AXES[axis][0] in t else t.columns[2]
        fig, ax = plots.new_figure()
        plots.robustness_view(ax, t, col)
        written.append(out / "plots" / f"robustness_{axis}.png")
        plots.save(fig, written[-1])
    return written


def write_report(
    a: Analysis, out: str | Path, figures: bool = True, progress: bool = True, valley: bool = False
) -> dict:
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    write_tables(a, out)
    if figures:
        write_figures(a, out, progress, valley)
    s = _finite_json(summary(a))
    atomic.write_text(out / "summary.json", json.dumps(s, indent=2, default=_json_default))
    return s


def print_summary(s: dict, out: Path | None = None) -> None:
    """A few tables on the terminal (rich)."""
    from rich.console import Console
    from rich.table import Table

    con = Console()
    r = s["runs"]
    con.print(f"[bold]{s['source']}[/]: {r['total']} runs, {r['used']} used, "
              f"{r['excluded']} excluded, {s['cells']['used']} cells")  # fmt: skip
    for reason, n in r["excluded_by_reason"].items():
        con.print(f"  excluded {n:>5} × {reason}")
    for sk in s["cells"]["skipped"]:
        con.print(f"  cell skipped: {sk['cell']}: {sk['reason']}")
    for e in s["cells"]["edge_optima"]:
        con.print(
            f"  [yellow]optimum on a grid edge[/]: {e['cell']} (lr {e['lr_edge']}, bs {e['bs_edge']})"
        )
    t = Table(title="gap to the cell's grid minimum (per mille)")
    for col in ("law", "mean nearest", "max nearest", "mean surface", "max surface", "filled"):
        t.add_column(col)
    for name, g in s["gaps"].items():
        filled = ", ".join(
            f"{k[:2]}←grid best" for k in ("lr_from", "bs_from") if "grid best" in g[k]
        )
        t.add_row(name, *(_f(g[m][k]) for m in compare.METHODS for k in ("mean", "max")), filled)
    con.print(t)
    fit = s["fit"]
    if "skipped" in fit:
        con.print(f"fit skipped: {fit['skipped']}")
    elif "not_identifiable" in fit:
        con.print(f"[yellow]fit not identifiable[/]: {fit['not_identifiable']}")
    else:
        for k in ("lr", "bs", "bs_free"):
            if k in fit:
                ci = ", ".join(
                    f"{f} [{a:.3f}, {b:.3f}]" for f, (a, b) in fit[k]["exponents_ci95"].items()
                )
                con.print(f"fit {fit[k]['formula']}   95% CI: {ci}")
    if "nearest" in s["loo"]:
        con.print(f"leave-one-cell-out gap (‰): nearest {_f(s['loo']['nearest']['mean'])}, "
                  f"surface {_f(s['loo']['surface']['mean'])}")  # fmt: skip
    for c in s.get("caveats", []):
        con.print(f"[yellow]caveat[/]: {c}")
    if out is not None:
        con.print(f"report written to {out}")


def _f(v: float | None) -> str:
    return "—" if v is None else f"{v:.2f}"


def run(source: str | Path | Sequence[str | Path], out: str | Path, settings: Settings = Settings(),
        figures: bool = True, quiet: bool = False, valley: bool = False,
        wandb_project: str | None = None) -> dict:  # fmt: skip
    """The report; with `wandb_project`, also one job_type=analysis wandb run (wandb_report)."""
    a = analyse(source, settings)
    s = write_report(a, out, figures, progress=not quiet, valley=valley)
    if wandb_project is not None:
        from analysis import wandb_report

        wandb_report.log_analysis(a, s, Path(out), wandb_project)
    if not quiet:
        print_summary(s, Path(out))
    return s
