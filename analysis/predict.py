"""`python -m analysis predict`: Step Law lr and bs for a model size and token budget.

Intervals are 95% percentile intervals over bootstrap fits: the authors' 1,000 published fits by
default, or a report's own (`--fit REPORT_DIR`, its bootstrap.csv in the same format). Point
estimates are the bootstrap means, the convention of fit.json (analysis.fit). Without the
reference data (outside this repository, no ../shared) the published means are used from
steplaw_train.steplaw, with a one-line note and no intervals.
"""

from __future__ import annotations

import math
from pathlib import Path

from analysis.collect import released_bootstrap_csv
from analysis.fit import StepLawFit
from steplaw_train.steplaw import BOOTSTRAP_MEAN

NO_SHARED_NOTE = (
    "note: {path} not found; using the published bootstrap means (no intervals; "
    "pass --fit FILE for a bootstrap CSV or report directory)"
)


def load_fit(fit: str | Path | None = None) -> StepLawFit | None:
    """The published bootstrap file, a report directory, or a bootstrap CSV path; None when
    the published file is asked for but is not there."""
    if fit is None:
        path = released_bootstrap_csv()
        return StepLawFit.from_bootstrap_csv(path) if path.is_file() else None
    p = Path(fit)
    if p.is_dir():
        p = p / "bootstrap.csv"
    if not p.is_file():
        raise ValueError(f"--fit: {p} does not exist (give a report directory or a bootstrap CSV)")
    return StepLawFit.from_bootstrap_csv(p)


def predict(N: float, D: float, seq: int = 2048, fit: str | Path | None = None) -> dict[str, float]:
    """lr and bs (tokens and sequences of `seq`) with 95% intervals."""
    for name, v in (("N", N), ("D", D), ("seq", seq)):
        if not (isinstance(v, int | float) and math.isfinite(v) and v > 0):
            raise ValueError(f"{name}: must be a positive number, got {v!r}")
    f = load_fit(fit)
    if f is None:
        lr, bs = BOOTSTRAP_MEAN.predict(N, D)
        nan = math.nan
        out = {"lr": lr, "lr_lo": nan, "lr_hi": nan, "bs_tokens": bs, "bs_tokens_lo": nan,
               "bs_tokens_hi": nan}  # fmt: skip
        for k in ("", "_lo", "_hi"):
            out[f"bs_seq{k}"] = out[f"bs_tokens{k}"] / seq
        note = NO_SHARED_NOTE.format(path=released_bootstrap_csv())
        out.update(N=N, D=D, seq=seq, fit=BOOTSTRAP_MEAN.name, note=note)
        return out
    out = f.predict(N, D)
    for k in ("", "_lo", "_hi"):
        out[f"bs_seq{k}"] = out[f"bs_tokens{k}"] / seq
    out.update(N=N, D=D, seq=seq, fit=f.source)
    return out


def format_prediction(p: dict[str, float]) -> str:
    rows = [
        ("lr", p["lr"], p["lr_lo"], p["lr_hi"], "{:.3e}"),
        ("bs (tokens)", p["bs_tokens"], p["bs_tokens_lo"], p["bs_tokens_hi"], "{:,.0f}"),
        (f"bs (sequences of {p['seq']})", p["bs_seq"], p["bs_seq_lo"], p["bs_seq_hi"], "{:,.1f}"),
    ]
    head = f"Step Law for N={p['N']:.3g}, D={p['D']:.3g} (fit: {p['fit']})"
    lines = [head] + [
        f"  {name:<26} {fmt.format(v)}"
        + (f"   95% CI [{fmt.format(lo)}, {fmt.format(hi)}]" if math.isfinite(lo) else "")
        for name, v, lo, hi, fmt in rows
    ]
    if p.get("note"):
        lines.append(p["note"])
    return "\n".join(lines)
