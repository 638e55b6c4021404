"""The per-cell model: a Bayesian quadratic bowl in (ln lr, ln bs) and what it says about a grid.

    ln L(z) = c + g·u + ½ uᵀ H u + noise,   u = z − z0,   z = (ln lr, ln bs_tokens)

is linear in θ = (c, g, H), so with a Gaussian prior (the optimum m = z0 − H⁻¹g near the law's
prediction, H near the curvature of finished cells) the posterior and the evidence are exact.
Runs far above the best (and diverged runs) get inflated noise: the quadratic holds near the
optimum, not on the grid's walls, and a blown-up run should only say "not here".

The stopping rule reads two numbers from a posterior: for each untried grid point the probability
that its *surface* value is below the best run's by more than the plateau, and the probability
that *some* untried point is (by Monte Carlo over θ with a fixed seed, so it is deterministic).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
from scipy.stats import norm

DEFAULT_H = np.array([0.01, 0.0, 0.01])  # (h11, h12, h22): a weak, round bowl
DEFAULT_H_SD = np.array([0.01, 0.005, 0.01])
SAMPLES = 512  # Monte Carlo draws of θ for P(some untried point beats the best)


@dataclass(frozen=True)
class Prior:
    """What a cell's search starts from: optimum m0 ± sd, curvature h ± h_sd, noise."""

    m0: tuple[float, float]
    m_sd: tuple[float, float]
    h: tuple[float, float, float]
    h_sd: tuple[float, float, float]
    noise: float

    def widened(self, factor: float) -> Prior:
        """The same centre with `factor`× the sd of the optimum and of the curvature."""
        return Prior(
            self.m0,
            (self.m_sd[0] * factor, self.m_sd[1] * factor),
            self.h,
            (self.h_sd[0] * factor, self.h_sd[1] * factor, self.h_sd[2] * factor),
            self.noise,
        )


def features(u: np.ndarray) -> np.ndarray:
    x, y = u[:, 0], u[:, 1]
    return np.column_stack([np.ones(len(u)), x, y, 0.5 * x * x, x * y, 0.5 * y * y])


def hmat(h: np.ndarray) -> np.ndarray:
    return np.array([[h[0], h[1]], [h[1], h[2]]])


@dataclass(frozen=True)
class Posterior:
    """Gaussian posterior over θ = (c, g1, g2, h11, h12, h22) in coordinates u = z − origin."""

    mean: np.ndarray
    cov: np.ndarray
    origin: np.ndarray
    noise: float
    log_evidence: float = 0.0

    def predict(self, z: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Mean and sd of a new run's ln-loss (surface plus run noise) at points z."""
        f = features(z - self.origin)
        var = np.einsum("ij,jk,ik->i", f, self.cov, f) + self.noise**2
        return f @ self.mean, np.sqrt(np.maximum(var, 0.0))

    def optimum(self) -> np.ndarray | None:
        """The bowl's minimiser, or None when the fitted curvature is not positive definite."""
        h = hmat(self.mean[3:])
        if np.linalg.eigvalsh(h)[0] <= 1e-6:
            return None
        return self.origin - np.linalg.solve(h, self.mean[1:3])

    def differences(self, z: np.ndarray, z_ref: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Mean and sd of the surface difference f(z) − f(z_ref) (no run noise)."""
        f = features(z - self.origin) - features(z_ref[None, :] - self.origin)
        sd = np.sqrt(np.maximum(np.einsum("ij,jk,ik->i", f, self.cov, f), 1e-30))
        return f @ self.mean, sd


def fit(prior: Prior, z: np.ndarray, y: np.ndarray, outlier_scale: float) -> Posterior:
    """Posterior of the bowl given runs at z (ln coords) with ln-losses y (inf = diverged),
    with the log evidence of the runs under the prior (to weigh priors against each other)."""
    origin = np.array(prior.m0)
    h = np.array(prior.h)
    hm = hmat(h)
    g_cov = hm @ np.diag(np.square(prior.m_sd)) @ hm.T
    y0 = float(np.min(y[np.isfinite(y)])) if np.isfinite(y).any() else 0.0
    mean0 = np.concatenate([[y0], [0.0, 0.0], h])
    cov0 = np.zeros((6, 6))
    cov0[0, 0] = 1.0
    cov0[1:3, 1:3] = g_cov + 1e-12 * np.eye(2)
    cov0[3:, 3:] = np.diag(np.square(prior.h_sd))
    if len(y) == 0:
        return Posterior(mean0, cov0, origin, prior.noise)
    yc = np.where(np.isfinite(y), y, y0 + 1.0)  # a diverged run: far above, nearly no weight
    excess = yc - y0
    var = prior.noise**2 + (outlier_scale * excess) ** 2
    f = features(z - origin)
    prec0 = np.linalg.inv(cov0)
    w = 1.0 / var
    prec = prec0 + (f * w[:, None]).T @ f
    cov = np.linalg.inv(prec)
    mean = cov @ (prec0 @ mean0 + f.T @ (w * yc))
    # evidence: y ~ N(F mean0, F cov0 Fᵀ + diag(var)); c's broad prior makes it a statement
    # about the shape of the runs (differences), which is what the priors disagree on
    s = f @ cov0 @ f.T + np.diag(var)
    r = yc - f @ mean0
    sign, logdet = np.linalg.slogdet(s)
    log_ev = -0.5 * (r @ np.linalg.solve(s, r) + logdet + len(r) * math.log(2 * math.pi))
    return Posterior(mean, 0.5 * (cov + cov.T), origin, prior.noise, float(log_ev))


def expected_improvement(mu: np.ndarray, sd: np.ndarray, best: float) -> np.ndarray:
    """E[max(0, best − Y)] for Y ~ N(mu, sd²)."""
    s = np.maximum(sd, 1e-12)
    t = (best - mu) / s
    return (best - mu) * norm.cdf(t) + s * norm.pdf(t)


def improvement_odds(
    posts: Sequence[Posterior],
    weights: Sequence[float],
    z: np.ndarray,
    cand: np.ndarray,
    best: int,
    margin: float,
) -> tuple[np.ndarray, float]:
    """Per candidate point, P(f(point) < f(best) − margin), and P(some candidate is), under the
    mixture of posteriors with these weights. `margin` is in ln-loss; `cand` indexes z."""
    if len(cand) == 0:
        return np.zeros(0), 0.0
    p_each = np.zeros(len(cand))
    p_any = 0.0
    zb = z[best]
    rng = np.random.default_rng(0)  # fixed: the same state always gives the same answer
    std = rng.standard_normal((SAMPLES, 6))
    for post, w in zip(posts, weights, strict=True):
        if w < 1e-12:  # a ruled-out component (e.g. a noise level far from the runs'): skip
            continue
        mu, sd = post.differences(z[cand], zb)
        p_each += w * norm.cdf((-margin - mu) / sd)
        f = features(z[cand] - post.origin) - features(zb[None, :] - post.origin)
        theta = post.mean + std @ _sqrt_psd(post.cov).T
        d = theta @ f.T  # (samples, candidates)
        p_any += w * float(np.mean(np.any(d < -margin, axis=1)))
    return p_each, max(p_any, float(p_each.max()))


def _sqrt_psd(cov: np.ndarray) -> np.ndarray:
    """A square root of a covariance that rounding may have left slightly indefinite."""
    try:
        return np.linalg.cholesky(cov + 1e-15 * np.eye(len(cov)))
    except np.linalg.LinAlgError:
        vals, vecs = np.linalg.eigh(0.5 * (cov + cov.T))
        return vecs * np.sqrt(np.clip(vals, 0.0, None))


def axis_neighbours(z: np.ndarray, i: int, tol: float = 1e-6) -> list[int]:
    """Grid points next to point i along lr (same bs) and along bs (same lr), nearest first.

    What a hill-climb checks before it stops: a bowl fitted to a few runs can be confidently
    wrong when its prior is, and a run beside the best one is the cheapest evidence that it is not.
    """
    out = []
    for axis in (0, 1):
        other = 1 - axis
        line = np.flatnonzero(np.abs(z[:, other] - z[i, other]) < tol)
        d = z[line, axis] - z[i, axis]
        for side in (d < -tol, d > tol):
            if side.any():
                cand = line[side]
                out.append(int(cand[np.argmin(np.abs(z[cand, axis] - z[i, axis]))]))
    return out


def grid_neighbours(z: np.ndarray, i: int, tol: float = 1e-6) -> list[int]:
    """Grid points at most one grid value away from point i along lr and along bs (not i).

    Rank-based, so it works on the released grids, which are not full rectangles: the lr and bs
    values of the cell are sorted, and a neighbour differs by at most one rank on each axis.
    """
    ranks = []
    for axis in (0, 1):
        vals = np.unique(np.round(z[:, axis] / tol) * tol)
        ranks.append(np.searchsorted(vals, np.round(z[:, axis] / tol) * tol))
    r = np.column_stack(ranks)
    near = np.all(np.abs(r - r[i]) <= 1, axis=1)
    near[i] = False
    return [int(k) for k in np.flatnonzero(near)]
