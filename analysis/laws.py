"""Hyperparameter laws as data (../shared/laws.md): adding a law is adding one entry to `LAWS`.

Every law sees the same inputs for a cell: N (non-embedding parameters; for MoE the caller picks
total N or activated Na), D (tokens), C = M·D (M = non-embedding FLOPs per token) and L (the
cell's best smoothed loss, in nats, for the laws written in terms of the target loss). Batch
sizes are in tokens. A law that predicts only one of lr and bs leaves the other as None; the
comparison fills it with the grid's best value for that cell and says so (`*_from` columns).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping
from dataclasses import dataclass

from steplaw_train import steplaw

Inputs = Mapping[str, float]
Formula = Callable[[Inputs], float]


@dataclass(frozen=True)
class Law:
    """One published law: where it comes from, what it needs, and how it predicts."""

    name: str
    source: str
    inputs: tuple[str, ...]
    lr_formula: str | None
    bs_formula: str | None  # tokens
    lr: Formula | None = None
    bs: Formula | None = None
    paper_gap_permille: float | None = None  # Step Law paper, Table 1
    note: str = ""
    calibrate_lr: bool = False  # lr constant unknown: scale fitted in-sample (see `calibrated`)

    def predict(self, x: Inputs) -> tuple[float | None, float | None]:
        """(lr, bs_tokens); None where the law says nothing, nan where it is undefined."""
        return _safe(self.lr, x), _safe(self.bs, x)


def _safe(f: Formula | None, x: Inputs) -> float | None:
    if f is None:
        return None
    try:
        v = float(f(x))
    except (ValueError, ZeroDivisionError, OverflowError):
        return math.nan
    return v if math.isfinite(v) and v > 0 else math.nan


def step_law(
    c: float = math.exp(steplaw.PAPER.lr_intercept), alpha: float = steplaw.PAPER.lr_coefN,
    beta: float = steplaw.PAPER.lr_coefD, d: float = math.exp(steplaw.PAPER.bs_intercept),
    gamma: float = steplaw.PAPER.bs_coefD, name: str = "Step Law", note: str = "",
    paper_gap_permille: float | None = None,
) -> Law:  # fmt: skip
    """The Step Law form with given constants (the paper's rounded ones, steplaw.PAPER, by default)."""
    return Law(
        name=name,
        source="Li et al. 2025, arXiv 2503.04715",
        inputs=("N", "D"),
        lr_formula=f"{c:.4g} * N^{alpha:.4g} * D^{beta:.4g}",
        bs_formula=f"{d:.4g} * D^{gamma:.4g}",
        lr=lambda x: c * x["N"] ** alpha * x["D"] ** beta,
        bs=lambda x: d * x["D"] ** gamma,
        paper_gap_permille=paper_gap_permille,
        note=note,
    )


def from_constants(law: steplaw.StepLaw, note: str, paper_gap_permille: float | None = None) -> Law:
    """A Law entry for one of steplaw.py's named constant sets (named as there)."""
    return step_law(
        math.exp(law.lr_intercept), law.lr_coefN, law.lr_coefD, math.exp(law.bs_intercept),
        law.bs_coefD, name=law.name, note=note, paper_gap_permille=paper_gap_permille,
    )  # fmt: skip


# Both constant sets, each a named row in every gap table: they differ by 1.7-2.1% in lr.
STEP_LAW = from_constants(
    steplaw.PAPER, "the paper's rounded constants (abstract, Table 1)", paper_gap_permille=0.94
)
STEP_LAW_MEAN = from_constants(
    steplaw.BOOTSTRAP_MEAN,
    "means of the authors' 1,000 released bootstrap fits (what `predict` uses by default)",
)

DEEPSEEK = Law(
    name="DeepSeek",
    source="DeepSeek LLM, arXiv 2401.02954",
    inputs=("C",),
    lr_formula="0.3118 * C^-0.1250",
    bs_formula="0.2920 * C^0.3271",
    lr=lambda x: 0.3118 * x["C"] ** -0.1250,
    bs=lambda x: 0.2920 * x["C"] ** 0.3271,
    paper_gap_permille=9.26,
)

PORIAN = Law(
    name="Porian",
    source="Porian et al. 2024, arXiv 2406.19146",
    inputs=("N",),
    lr_formula="3.7 * N^-0.36",
    bs_formula="0.7576 * N^0.703",
    lr=lambda x: 3.7 * x["N"] ** -0.36,
    bs=lambda x: 0.7576 * x["N"] ** 0.703,
    paper_gap_permille=3.71,
)

OPENAI = Law(
    name="OpenAI (Kaplan)",
    source="Kaplan et al. 2020, arXiv 2001.08361",
    inputs=("N", "L"),
    lr_formula="3.239e-3 - 1.395e-4 * ln(N)",
    bs_formula="2e8 * L^-4.7619 (critical batch)",
    lr=lambda x: 3.239e-3 - 1.395e-4 * math.log(x["N"]),
    bs=lambda x: 2e8 * x["L"] ** -4.7619,
    paper_gap_permille=9.51,
    note="L is the cell's best smoothed loss (nats, this data's tokenizer, not WebText2's); "
    "the lr formula turns negative above N ~ 1.2e10 (reported as undefined).",
)

MICROSOFT = Law(
    name="Microsoft (Bjorck)",
    source="Bjorck et al. 2024, arXiv 2409.19913",
    inputs=("N", "D"),
    lr_formula="C0 * N^-0.23 * D^-0.32",
    bs_formula=None,
    lr=lambda x: x["N"] ** -0.23 * x["D"] ** -0.32,
    paper_gap_permille=9.25,
    calibrate_lr=True,
    note="No constant C0 with stated units for N in parameters and D in tokens is available "
    "to us, so the published law cannot be evaluated as is. Only its exponents are used: C0 is "
    "calibrated in-sample (geometric mean of best-lr / N^-0.23 D^-0.32 over the cells), which "
    "favours this law. bs: the grid's best for the cell.",
)

MINICPM = Law(
    name="MiniCPM",
    source="Hu et al. 2024, arXiv 2404.06395",
    inputs=("L",),
    lr_formula=None,
    bs_formula="1.21e9 * L^-6.24",
    bs=lambda x: 1.21e9 * x["L"] ** -6.24,
    note="L is the cell's best smoothed loss (nats, this data's tokenizer). lr: the grid's best "
    "for the cell.",
)

LAWS: tuple[Law, ...] = (STEP_LAW, STEP_LAW_MEAN, DEEPSEEK, PORIAN, OPENAI, MICROSOFT, MINICPM)


def by_name(names: list[str] | None = None) -> tuple[Law, ...]:
    """The laws named (all by default); an unknown name is an error listing the valid ones."""
    if not names:
        return LAWS
    known = {law.name: law for law in LAWS}
    bad = [n for n in names if n not in known]
    if bad:
        raise ValueError(f"unknown law(s) {bad}; valid: {sorted(known)}")
    return tuple(known[n] for n in names)


def calibrated(law: Law, best_lr: list[float], inputs: list[Inputs]) -> Law:
    """The law with its lr scaled so its geometric mean matches the cells' best lr (in-sample)."""
    if not law.calibrate_lr or law.lr is None:
        return law
    base = [law.lr(x) for x in inputs]
    logs = [math.log(b / p) for b, p in zip(best_lr, base, strict=True) if b > 0 and p > 0]
    if not logs:
        return law
    scale = math.exp(sum(logs) / len(logs))
    f = law.lr
    return Law(
        name=law.name,
        source=law.source,
        inputs=law.inputs,
        lr_formula=law.lr_formula.replace("C0", f"{scale:.4g} (calibrated)"),
        bs_formula=law.bs_formula,
        lr=lambda x: scale * f(x),
        bs=law.bs,
        paper_gap_permille=law.paper_gap_permille,
        note=law.note,
    )


def as_records(laws: tuple[Law, ...] = LAWS) -> list[dict[str, object]]:
    """JSON-friendly description of the laws (for summary.json and docs)."""
    return [
        {
            "name": law.name,
            "source": law.source,
            "inputs": list(law.inputs),
            "lr": law.lr_formula,
            "bs_tokens": law.bs_formula,
            "paper_gap_permille": law.paper_gap_permille,
            "note": law.note,
        }
        for law in laws
    ]
