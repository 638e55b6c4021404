"""Learning across cells: where the next cell's optimum is, how curved and noisy its bowl is, and
how often a cell does not follow the cells before it.

A finished cell leaves an `Outcome`. From the outcomes of the cells finished so far:
  * the law: Bayesian ridge on ln lr = a + α ln N + β ln D (and the same for ln bs_tokens),
    fitted to the finished cells' optima and shrunk toward the published Step Law
    (steplaw_train.steplaw.PAPER) or, with prior "none", only weakly toward flat exponents;
  * the curvature: precision-weighted pool of the finished cells' own fits, widened by the
    between-cell spread;
  * the noise: pooled residual variance near each finished cell's best;
  * the family rate: how often a finished cell's runs favoured the widened prior (its optimum or
    bowl off what the earlier cells predicted). It is the weight the next cell gives to "this cell
    is not like the others" before it has seen a run, learned with a Beta(1, 4) prior so that a
    handful of agreeing cells cannot make it vanish.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from steplaw_train.search.bowl import DEFAULT_H, DEFAULT_H_SD, Prior, fit
from steplaw_train.search.cell import Cell
from steplaw_train.steplaw import PAPER

H_SPREAD = 0.3  # between-cell relative spread of the curvature
FAMILY_PRIOR = (1.0, 4.0)  # Beta pseudo-counts (differs, follows) of the family rate
NOISE_PSEUDO = 10  # the default noise counts as this many residuals
# Run noise levels tried, × SearchConfig.noise: the body (⅛ … 2) and a heavy tail (4 … 64) that
# holds NOISE_TAIL_PRIOR of the prior weight. The tail is for sweeps whose seed-to-seed noise is
# far above 1‰ (the CPU demo's is 5-10%): without it the evidence piles up on the top level and
# a lone noisy cell stopped 3.3% above its minimum stating P(found) 0.96. Its prior share is
# small so that a quiet sweep's first cells (whose runs rule the tail out at once) are searched
# as before; a uniform prior over the same levels did move them.
NOISE_LEVELS = (0.125, 0.25, 0.5, 1.0, 2.0, 4.0, 8.0, 16.0, 32.0, 64.0)
NOISE_BODY = 5  # the first NOISE_BODY levels are the body
NOISE_TAIL_PRIOR = 0.05


@dataclass(frozen=True)
class Outcome:
    """A finished cell: its posterior optimum (ln coords), the prior it started from, fit stats,
    the weight its runs gave the widened prior (`wide`) and P(its optimum was found)."""

    cell: str
    m: tuple[float, float]
    m_var: tuple[float, float]
    m0: tuple[float, float]
    h: tuple[float, float, float] | None
    h_var: tuple[float, float, float] | None
    resid_var: float | None
    n_resid: int
    wide: float = 0.0
    p_found: float = 1.0
    noise_ll: tuple[float, ...] = ()  # log evidence of its runs at each of NOISE_LEVELS


def _ridge(
    feats: np.ndarray,
    obs: np.ndarray,
    obs_var: np.ndarray,
    mean0: np.ndarray,
    sd0: np.ndarray,
    f_new: np.ndarray,
) -> tuple[float, float]:
    """Bayesian linear regression: predictive mean and variance (without noise) at f_new."""
    prec = np.diag(1.0 / np.square(sd0))
    rhs = prec @ mean0
    if len(obs):
        w = 1.0 / obs_var
        prec = prec + (feats * w[:, None]).T @ feats
        rhs = rhs + feats.T @ (w * obs)
    cov = np.linalg.inv(prec)
    mean = cov @ rhs
    return float(f_new @ mean), float(f_new @ cov @ f_new)


PAPER_LR = (PAPER.lr_intercept, PAPER.lr_coefN, PAPER.lr_coefD)
PAPER_BS = (PAPER.bs_intercept, 0.0, PAPER.bs_coefD)


def law_prior(
    prior: str,
    cell: Cell,
    done: Sequence[tuple[Cell, Outcome]],
    centre: tuple[float, float],
    scatter: float,
    model_sd: float = 0.0,
) -> tuple[tuple[float, float], tuple[float, float]]:
    """The law's prediction of the cell's optimum (ln lr, ln bs_tokens) and its sd.

    Cells with the same `Cell.model_id` are one model at several D, and a model's optima can sit
    off the law by one shared offset (another architecture family, a MoE whose optima follow Na
    when the law sees N; two MoE shapes of equal N are two models): a random effect per model,
    prior sd `model_sd`, learned from that model's finished cells. A model nothing is known of
    gets the full `model_sd`.
    """
    cn, cd = centre
    if prior == "none" and not done:  # nothing known yet: the middle of the cell's grid, broad
        z = cell.coords()
        lo, hi = z.min(axis=0), z.max(axis=0)
        sd = np.maximum((hi - lo) / 4, scatter)
        return tuple((lo + hi) / 2), tuple(sd)  # type: ignore[return-value]
    models = sorted({c.model_id for c, _ in done} | {cell.model_id}) if model_sd > 0 else []

    def feat(c: Cell) -> list[float]:
        f = [1.0, math.log(c.n_law) - cn, math.log(c.d) - cd]
        return f + [1.0 if c.model_id == m else 0.0 for m in models]

    f_new = np.array(feat(cell))
    feats = np.array([feat(c) for c, _ in done]).reshape(len(done), len(f_new))
    means, sds = [], []
    for k, coef in ((0, PAPER_LR), (1, PAPER_BS)):
        if prior == "steplaw":  # centred coefficients of the published law, trusted to ±0.1
            a, bn, bd = coef
            mean0 = np.array([a + bn * cn + bd * cd, bn, bd])
            sd0 = np.array([0.5, 0.1, 0.1])
        else:
            mean0 = np.zeros(3)
            sd0 = np.array([100.0, 1.0, 1.0])
        mean0 = np.concatenate([mean0, np.zeros(len(models))])
        sd0 = np.concatenate([sd0, np.full(len(models), model_sd)])
        obs = np.array([o.m[k] for _, o in done])
        obs_var = np.array([o.m_var[k] for _, o in done]) + scatter**2
        mu, var = _ridge(feats, obs, obs_var, mean0, sd0, f_new)
        means.append(mu)
        sds.append(math.sqrt(var + scatter**2))
    return (means[0], means[1]), (sds[0], sds[1])


def curvature_known(done: Sequence[tuple[Cell, Outcome]]) -> bool:
    """Whether some finished cell carries curvature information (else the prior is the default)."""
    return any(o.h is not None and o.h_var is not None for _, o in done)


def curvature_prior(done: Sequence[tuple[Cell, Outcome]]) -> tuple[np.ndarray, np.ndarray]:
    """Pooled curvature of finished cells (precision-weighted), widened by the between-cell spread."""
    prec = 1.0 / np.square(DEFAULT_H_SD)
    acc = prec * DEFAULT_H
    for _, o in done:
        if o.h is not None and o.h_var is not None:
            p = 1.0 / np.array(o.h_var)
            prec, acc = prec + p, acc + p * np.array(o.h)
    h = acc / prec
    scale = np.array([abs(h[0]), 0.5 * (abs(h[0]) + abs(h[2])), abs(h[2])])
    return h, np.sqrt(1.0 / prec + np.square(H_SPREAD * scale))


def noise_prior(done: Sequence[tuple[Cell, Outcome]], default: float) -> float:
    """Pooled run noise of finished cells (the default counted as NOISE_PSEUDO residuals)."""
    ss, n = NOISE_PSEUDO * default**2, NOISE_PSEUDO
    for _, o in done:
        if o.resid_var is not None:
            ss += o.resid_var * o.n_resid
            n += o.n_resid
    return math.sqrt(ss / n)


def noise_log_weights(done: Sequence[tuple[Cell, Outcome]]) -> np.ndarray:
    """Log weight of each noise level: the prior (body / tail), times every finished cell's
    evidence for it."""
    lw = np.full(len(NOISE_LEVELS), math.log((1 - NOISE_TAIL_PRIOR) / NOISE_BODY))
    lw[NOISE_BODY:] = math.log(NOISE_TAIL_PRIOR / (len(NOISE_LEVELS) - NOISE_BODY))
    for _, o in done:
        if len(o.noise_ll) == len(NOISE_LEVELS):
            lw += np.array(o.noise_ll)
    return lw - np.logaddexp.reduce(lw)


def family_rate(done: Sequence[tuple[Cell, Outcome]]) -> float:
    """Prior weight of "this cell differs from the finished ones": Beta posterior mean."""
    a, b = FAMILY_PRIOR
    return (a + sum(o.wide for _, o in done)) / (a + b + len(done))


def outcome(
    cell: Cell,
    prior: Prior,
    z: np.ndarray,
    y: np.ndarray,
    outlier_scale: float,
    wide: float,
    p_found: float,
) -> Outcome:
    """Summarise a finished cell for the cells after it."""
    post = fit(prior, z, y, outlier_scale)
    m = post.optimum()
    best_z = (
        z[int(np.nanargmin(np.where(np.isfinite(y), y, np.inf)))]
        if np.isfinite(y).any()
        else np.array(prior.m0)
    )
    if m is None:
        m, m_var = best_z, np.square(np.array(prior.m_sd))
    else:
        lo, hi = cell.coords().min(axis=0), cell.coords().max(axis=0)
        m = np.clip(m, lo, hi)
        # the optimum is pinned to about half the distance to the best run, at least
        m_var = np.maximum(np.square((m - best_z) / 2), 0.1**2)
    # curvature from the data alone (weak default prior), for pooling
    weak = Prior(prior.m0, (3.0, 3.0), tuple(DEFAULT_H), tuple(DEFAULT_H_SD), prior.noise)  # type: ignore[arg-type]
    wpost = fit(weak, z, y, outlier_scale)
    h_var = np.diag(wpost.cov)[3:]
    informative = bool(np.all(h_var < np.square(DEFAULT_H_SD)))
    finite = np.isfinite(y)
    near = finite & (y - (np.min(y[finite]) if finite.any() else 0) < 0.01)
    resid_var, n_resid = None, 0
    if near.sum() >= 8:
        mu, _ = wpost.predict(z[near])
        r = y[near] - mu
        resid_var, n_resid = (
            float(np.mean(r**2) * near.sum() / (near.sum() - 6)),
            int(near.sum()) - 6,
        )
    return Outcome(
        cell=cell.key,
        m=(float(m[0]), float(m[1])),
        m_var=(float(m_var[0]), float(m_var[1])),
        m0=prior.m0,
        h=tuple(float(v) for v in wpost.mean[3:]) if informative else None,  # type: ignore[arg-type]
        h_var=tuple(float(v) for v in h_var) if informative else None,  # type: ignore[arg-type]
        resid_var=resid_var,
        n_resid=n_resid,
        wide=float(wide),
        p_found=float(p_found),
    )
