"""Law-guided LR×BS search: locate each (N, D) cell's optimum with a few runs instead of its grid.

Why this works (Step Law, arXiv 2503.04715): the final loss is convex-ish in (ln lr, ln bs) near
its minimum, the curvature of that bowl is much the same from cell to cell, and the optimum moves
along a power law in N and D. So each cell is searched with a small Bayesian model:

    ln L(z) = c + g·u + ½ uᵀ H u + noise,   u = z − z0,   z = (ln lr, ln bs_tokens)

linear in θ = (c, g, H), with Gaussian priors that carry what earlier cells taught:
  * the optimum m = z0 − H⁻¹g is near the law's prediction z0 (prior on g = −H (m − z0));
  * H is near the curvature pooled from finished cells (weak default before the first one);
  * the noise σ is pooled from finished cells' residuals.
Runs far above the best so far (or diverged) get inflated noise, so the bowl model is fitted
where it holds and a blown-up run only says "not here".

Next runs: the unrun grid points with the largest expected improvement (EI) over the best run so
far; a batch > 1 is chosen greedily, each pick added as a pseudo-observation at its predicted
value ("kriging believer"). Stopping rule: a cell is done when no unrun point's EI exceeds
`tau · (run cost / mean run cost of the sweep) ** cost_power` — cheap cells search longer and
sharpen the law and the curvature used for expensive ones — or when it used `max_runs_frac` of its
grid. The first cell and the cheapest cells (run cost ≤ `neighbour_cost` × mean), searched while
the law and the curvature are still unknown, must also have run the best point's axis neighbours: a bowl fitted
to a few runs can be confidently wrong when its prior is. The chosen point is the best run the
search actually ran. Measured results: docs/search.md.

Cells are searched one at a time, cheapest first. When a cell finishes, its posterior optimum
updates the law (Bayesian ridge on the law's coefficients, shrunk toward the published Step Law or,
with prior "none", only weakly toward flat exponents).

Driving it (a sweep or the replay): `state = SearchState.create(cells, SearchConfig())`, then
`while not state.done: props = propose(state); state = state.with_results({p: loss})`.
`state.to_json()` / `SearchState.from_json()` make it resumable. Everything is deterministic.
"""

from __future__ import annotations

import json
import math
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, field, replace

import numpy as np
from scipy.stats import norm

PRIORS = ("steplaw", "none")


# ---------------------------------------------------------------------------------------------
# Laws
# ---------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Law:
    """ln lr = lr·(1, ln N, ln D) and ln bs_tokens = bs·(1, ln N, ln D)."""

    lr: tuple[float, float, float]
    bs: tuple[float, float, float]

    def predict(self, n: float, d: float) -> tuple[float, float]:
        """(ln lr, ln bs_tokens) at (N, D)."""
        f = np.array([1.0, math.log(n), math.log(d)])
        return float(f @ np.array(self.lr)), float(f @ np.array(self.bs))


# Published Step Law: lr = 1.79 N^-0.713 D^0.307, bs_tokens = 0.58 D^0.571.
STEP_LAW = Law(lr=(math.log(1.79), -0.713, 0.307), bs=(math.log(0.58), 0.0, 0.571))


# ---------------------------------------------------------------------------------------------
# Cells, proposals, configuration
# ---------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Cell:
    """One (N, D) cell: its grid points (lr, bs in sequences) and the cost of one run in it.

    `n_law` is the N the law sees (N for dense; N or Na for MoE, the caller's choice); `cost` is
    proportional to the GPU-hours of one run (Na·D), the same for every point of the cell.
    """

    key: str
    n_law: float
    d: float
    cost: float
    seq_len: int
    points: tuple[tuple[float, float], ...]

    def __post_init__(self) -> None:
        if not self.points:
            raise ValueError(
                f"cell {self.key!r}: points: empty (a cell needs at least one grid point)"
            )
        for name in ("n_law", "d", "cost", "seq_len"):
            v = getattr(self, name)
            if not (math.isfinite(v) and v > 0):
                raise ValueError(f"cell {self.key!r}: {name}: {v!r} (must be positive and finite)")
        if any(not (lr > 0 and bs > 0) for lr, bs in self.points):
            raise ValueError(f"cell {self.key!r}: points: every lr and bs must be positive")

    def coords(self) -> np.ndarray:
        """(n, 2) array of (ln lr, ln bs_tokens)."""
        p = np.array(self.points, dtype=float)
        return np.column_stack([np.log(p[:, 0]), np.log(p[:, 1] * self.seq_len)])


@dataclass(frozen=True)
class Proposal:
    """One run to do: grid point `index` of cell `cell`."""

    cell: str
    index: int
    lr: float
    bs: float


@dataclass(frozen=True)
class SearchConfig:
    """Knobs of the search; the defaults are the ones measured in docs/search.md.

    prior: "steplaw" (published constants, refined by finished cells) or "none" (law learned
    only from finished cells). tau: EI threshold (relative loss) for a cell of mean run cost.
    cost_power: how strongly tau grows with a cell's run cost. batch: runs proposed per round
    and cell. parallel_cells: how many cells (the cheapest unfinished ones) are searched at once;
    1 lets every cell start from all cheaper ones, more cuts the rounds (wall-clock) a sweep
    takes. max_runs_frac: hard cap on the fraction of a cell's grid one search may run.
    """

    prior: str = "steplaw"
    tau: float = 1.7e-4
    cost_power: float = 0.5
    batch: int = 1
    parallel_cells: int = 1
    max_runs_frac: float = 0.5
    noise: float = 1e-3  # default relative noise of a run's loss before any cell has finished
    outlier_scale: float = 0.2  # noise added per unit of ln-loss above the best run
    law_scatter: float = 0.15  # intrinsic scatter (ln units) of cell optima around the law
    neighbour_cost: float = 0.1  # cells whose run cost ≤ this × mean also run the best's neighbours
    plateau: float = 3e-4  # relative loss difference below which two points are equally good
    confirm_prob: float = 0.3  # run a neighbour of the best if P(beats it by > plateau) > this
    confirm_widen: float = 2.0  # law-optimum sd multiplier for that check (prior may be off)
    budget: float = 0.0  # opt-in: GPU-hours target (fraction of the full grids) for 3×3 checks
    reserve_runs: float = 4.0  # runs per later cell that budget keeps back while a cell confirms
    min_runs: int = 3  # every cell runs at least this many points (its best's likeliest neighbours)

    def __post_init__(self) -> None:
        if self.prior not in PRIORS:
            raise ValueError(f"prior: {self.prior!r} (allowed: {', '.join(PRIORS)})")
        checks = {
            "tau": self.tau >= 0,
            "cost_power": self.cost_power >= 0,
            "batch": isinstance(self.batch, int) and self.batch >= 1,
            "parallel_cells": isinstance(self.parallel_cells, int) and self.parallel_cells >= 1,
            "max_runs_frac": 0 < self.max_runs_frac <= 1,
            "noise": self.noise > 0,
            "outlier_scale": self.outlier_scale >= 0,
            "law_scatter": self.law_scatter > 0,
            "neighbour_cost": self.neighbour_cost >= 0,
            "plateau": self.plateau >= 0,
            "confirm_prob": 0 < self.confirm_prob <= 1,
            "confirm_widen": self.confirm_widen >= 1,
            "budget": 0 <= self.budget <= 1,
            "reserve_runs": self.reserve_runs >= 0,
            "min_runs": isinstance(self.min_runs, int) and self.min_runs >= 1,
        }
        for name, ok in checks.items():
            if not ok:
                raise ValueError(f"{name}: {getattr(self, name)!r} is out of range")


# ---------------------------------------------------------------------------------------------
# The within-cell model: Bayesian quadratic in (ln lr, ln bs)
# ---------------------------------------------------------------------------------------------

DEFAULT_H = np.array([0.01, 0.0, 0.01])  # (h11, h12, h22): a weak, round bowl
DEFAULT_H_SD = np.array([0.01, 0.005, 0.01])
H_SPREAD = 0.3  # between-cell relative spread of the curvature


@dataclass(frozen=True)
class Prior:
    """What a cell's search starts from: optimum m0 ± sd, curvature h ± h_sd, noise."""

    m0: tuple[float, float]
    m_sd: tuple[float, float]
    h: tuple[float, float, float]
    h_sd: tuple[float, float, float]
    noise: float


def _features(u: np.ndarray) -> np.ndarray:
    x, y = u[:, 0], u[:, 1]
    return np.column_stack([np.ones(len(u)), x, y, 0.5 * x * x, x * y, 0.5 * y * y])


def _hmat(h: np.ndarray) -> np.ndarray:
    return np.array([[h[0], h[1]], [h[1], h[2]]])


@dataclass(frozen=True)
class Posterior:
    """Gaussian posterior over θ = (c, g1, g2, h11, h12, h22) in coordinates u = z − m0."""

    mean: np.ndarray
    cov: np.ndarray
    origin: np.ndarray
    noise: float

    def predict(self, z: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Mean and sd of a new run's ln-loss (surface plus run noise) at points z."""
        f = _features(z - self.origin)
        var = np.einsum("ij,jk,ik->i", f, self.cov, f) + self.noise**2
        return f @ self.mean, np.sqrt(np.maximum(var, 0.0))

    def optimum(self) -> np.ndarray | None:
        """The bowl's minimiser, or None when the fitted curvature is not positive definite."""
        h = _hmat(self.mean[3:])
        if np.linalg.eigvalsh(h)[0] <= 1e-6:
            return None
        return self.origin - np.linalg.solve(h, self.mean[1:3])


def fit(prior: Prior, z: np.ndarray, y: np.ndarray, outlier_scale: float) -> Posterior:
    """Posterior of the bowl given runs at z (ln coords) with ln-losses y (inf = diverged)."""
    origin = np.array(prior.m0)
    h = np.array(prior.h)
    hm = _hmat(h)
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
    f = _features(z - origin)
    prec0 = np.linalg.inv(cov0)
    w = 1.0 / var
    prec = prec0 + (f * w[:, None]).T @ f
    cov = np.linalg.inv(prec)
    mean = cov @ (prec0 @ mean0 + f.T @ (w * yc))
    return Posterior(mean, 0.5 * (cov + cov.T), origin, prior.noise)


def expected_improvement(mu: np.ndarray, sd: np.ndarray, best: float) -> np.ndarray:
    """E[max(0, best − Y)] for Y ~ N(mu, sd²)."""
    s = np.maximum(sd, 1e-12)
    t = (best - mu) / s
    return (best - mu) * norm.cdf(t) + s * norm.pdf(t)


def choose_next(
    prior: Prior,
    z: np.ndarray,
    y: np.ndarray,
    failed: np.ndarray,
    ran: np.ndarray,
    threshold: float,
    batch: int,
    outlier_scale: float,
) -> list[int]:
    """Indices of the next grid points to run (empty = the cell is done).

    z: (n, 2) grid coords; y: ln-loss of the runs in `ran` (inf = diverged); `failed`: points run
    without a usable result (never proposed again, not fitted).
    """
    if not ran.any():  # nothing usable yet: the untried grid point nearest the prior's optimum
        d = (z - np.array(prior.m0)) / np.array(prior.m_sd)
        dist = np.where(failed, np.inf, np.einsum("ij,ij->i", d, d))
        return [int(np.argmin(dist))] if np.isfinite(dist).any() else []
    zs, ys = z[ran], y[ran]
    best = float(np.min(ys)) if np.isfinite(ys).any() else math.inf
    picks: list[int] = []
    taken = ran | failed
    for _ in range(batch):
        post = fit(prior, zs, ys, outlier_scale)
        mu, sd = post.predict(z)
        ei = expected_improvement(mu, sd, best) if math.isfinite(best) else sd
        ei[taken] = -1.0
        i = int(np.argmax(ei))
        if ei[i] <= threshold:
            break
        picks.append(i)
        taken[i] = True
        zs = np.vstack([zs, z[i]])
        ys = np.append(ys, mu[i])  # kriging believer: pretend it lands on its prediction
    return picks


def axis_neighbours(z: np.ndarray, i: int, tol: float = 1e-6) -> list[int]:
    """Grid points next to point i along lr (same bs) and along bs (same lr), nearest first.

    The safety net of the stopping rule: a bowl fitted to a few runs can be confidently wrong
    when the prior is, and a run beside the best one is the cheapest evidence that it is not.
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


# ---------------------------------------------------------------------------------------------
# Learning across cells: the law, the curvature, the noise
# ---------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Outcome:
    """A finished cell: its posterior optimum (ln coords), the prior it started from, fit stats."""

    cell: str
    m: tuple[float, float]
    m_var: tuple[float, float]
    m0: tuple[float, float]
    h: tuple[float, float, float] | None
    h_var: tuple[float, float, float] | None
    resid_var: float | None
    n_resid: int


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


def _law_prior(
    prior: str,
    cell: Cell,
    done: Sequence[tuple[Cell, Outcome]],
    centre: tuple[float, float],
    scatter: float,
) -> tuple[tuple[float, float], tuple[float, float]]:
    """The law's prediction of the cell's optimum (ln lr, ln bs_tokens) and its sd."""
    cn, cd = centre
    ln_n, ln_d = math.log(cell.n_law), math.log(cell.d)
    f_new = np.array([1.0, ln_n - cn, ln_d - cd])
    if prior == "none" and not done:  # nothing known yet: the middle of the cell's grid, broad
        z = cell.coords()
        lo, hi = z.min(axis=0), z.max(axis=0)
        sd = np.maximum((hi - lo) / 4, scatter)
        return tuple((lo + hi) / 2), tuple(sd)  # type: ignore[return-value]
    feats = np.array([[1.0, math.log(c.n_law) - cn, math.log(c.d) - cd] for c, _ in done])
    feats = feats.reshape(len(done), 3)
    means, sds = [], []
    for k, coef in ((0, STEP_LAW.lr), (1, STEP_LAW.bs)):
        if prior == "steplaw":  # centred coefficients of the published law, trusted to ±0.1
            a, bn, bd = coef
            mean0 = np.array([a + bn * cn + bd * cd, bn, bd])
            sd0 = np.array([0.5, 0.1, 0.1])
        else:
            mean0 = np.zeros(3)
            sd0 = np.array([100.0, 1.0, 1.0])
        obs = np.array([o.m[k] for _, o in done])
        obs_var = np.array([o.m_var[k] for _, o in done]) + scatter**2
        mu, var = _ridge(feats, obs, obs_var, mean0, sd0, f_new)
        means.append(mu)
        sds.append(math.sqrt(var + scatter**2))
    return (means[0], means[1]), (sds[0], sds[1])


def _curvature_prior(done: Sequence[tuple[Cell, Outcome]]) -> tuple[np.ndarray, np.ndarray]:
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


def _noise_prior(done: Sequence[tuple[Cell, Outcome]], default: float) -> float:
    """Pooled run noise of finished cells (default counted as 10 residuals)."""
    k0 = 10
    ss, n = k0 * default**2, k0
    for _, o in done:
        if o.resid_var is not None:
            ss += o.resid_var * o.n_resid
            n += o.n_resid
    return math.sqrt(ss / n)


def _outcome(
    cell: Cell, prior: Prior, z: np.ndarray, y: np.ndarray, outlier_scale: float
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
    weak = Prior(prior.m0, (3.0, 3.0), tuple(DEFAULT_H), tuple(DEFAULT_H_SD), prior.noise)
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
    )


# ---------------------------------------------------------------------------------------------
# The search state a sweep drives
# ---------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class SearchState:
    """Cells (cheapest first), results so far, and the outcomes of finished cells. Immutable.

    results: cell key → {grid point index: loss}; a loss of inf is a diverged run, nan a run that
    produced nothing usable (it counts as run and is never proposed again).
    """

    cells: tuple[Cell, ...]
    config: SearchConfig = field(default_factory=SearchConfig)
    results: Mapping[str, Mapping[int, float]] = field(default_factory=dict)
    outcomes: tuple[Outcome, ...] = ()

    @classmethod
    def create(cls, cells: Sequence[Cell], config: SearchConfig | None = None) -> SearchState:
        keys = [c.key for c in cells]
        if len(set(keys)) != len(keys):
            raise ValueError("cells: keys must be unique")
        ordered = tuple(sorted(cells, key=lambda c: (c.cost, c.key)))
        return cls(ordered, config or SearchConfig(), {c.key: {} for c in ordered}, ())

    # -- derived ---------------------------------------------------------------------------------

    @property
    def done(self) -> bool:
        return len(self.outcomes) == len(self.cells)

    @property
    def active(self) -> tuple[Cell, ...]:
        """The cells being searched now: the `parallel_cells` cheapest unfinished ones."""
        finished = {o.cell for o in self.outcomes}
        todo = [c for c in self.cells if c.key not in finished]
        return tuple(todo[: self.config.parallel_cells])

    @property
    def current(self) -> Cell | None:
        """The cheapest cell being searched (the only one when parallel_cells = 1)."""
        active = self.active
        return active[0] if active else None

    def cell(self, key: str) -> Cell:
        for c in self.cells:
            if c.key == key:
                return c
        raise KeyError(f"cell: {key!r} is not in this search")

    def _centre(self) -> tuple[float, float]:
        return (
            float(np.mean([math.log(c.n_law) for c in self.cells])),
            float(np.mean([math.log(c.d) for c in self.cells])),
        )

    def prior_for(self, cell: Cell) -> Prior:
        """What the search of `cell` starts from, given the cells finished before it."""
        done = [(self.cell(o.cell), o) for o in self.outcomes if o.cell != cell.key]
        cfg = self.config
        m0, m_sd = _law_prior(cfg.prior, cell, done, self._centre(), cfg.law_scatter)
        h, h_sd = _curvature_prior(done)
        return Prior(m0, m_sd, tuple(h), tuple(h_sd), _noise_prior(done, cfg.noise))  # type: ignore[arg-type]

    def threshold(self, cell: Cell) -> float:
        mean_cost = float(np.mean([c.cost for c in self.cells]))
        return self.config.tau * (cell.cost / mean_cost) ** self.config.cost_power

    def _checks_neighbours(self, cell: Cell) -> bool:
        """Cheap cells, and the first cell (nothing learned yet), run the best's axis neighbours."""
        mean_cost = float(np.mean([c.cost for c in self.cells]))
        first = all(o.cell == cell.key for o in self.outcomes)  # nothing else finished yet
        return first or cell.cost <= self.config.neighbour_cost * mean_cost

    def slack(self, cell: Cell) -> float:
        """Budget the current cell may still spend on confirmation, in units of run cost.

        The budget is `budget` × the cost of every cell's full grid, known up front. What the
        cells before this one did not use, less `reserve_runs` runs for each later cell, is
        this cell's to spend: cheap cells (searched first) can afford their whole neighbourhood,
        expensive ones get what is left. Measured in the cost of one run of the current cell.
        """
        cfg = self.config
        total = sum(len(c.points) * c.cost for c in self.cells)
        spent = sum(self.runs(c.key) * c.cost for c in self.cells)
        later = self.cells[self.cells.index(cell) + 1 :]
        reserve = cfg.reserve_runs * sum(c.cost for c in later)
        return (cfg.budget * total - spent - reserve) / cell.cost

    def observed(self, cell: Cell) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """(coords, ln-loss with nan for unrun, ran mask) of a cell."""
        z = cell.coords()
        y = np.full(len(z), np.nan)
        ran = np.zeros(len(z), dtype=bool)
        for i, loss in self.results.get(cell.key, {}).items():
            ran[i] = True
            y[i] = math.log(loss) if loss > 0 else math.nan
        return z, y, ran

    def best(self, key: str) -> tuple[int, float] | None:
        """(index, loss) of the best run of a cell so far: the search's chosen point."""
        res = {i: v for i, v in self.results.get(key, {}).items() if not math.isnan(v)}
        if not res:
            return None
        i = min(res, key=lambda k: (res[k], k))
        return i, res[i]

    def runs(self, key: str) -> int:
        return len(self.results.get(key, {}))

    # -- transitions -----------------------------------------------------------------------------

    def _next_indices(self, cell: Cell) -> list[int]:
        z, y, ran = self.observed(cell)
        cap = max(1, math.ceil(self.config.max_runs_frac * len(z)))
        room = min(self.config.batch, cap - int(ran.sum()), int((~ran).sum()))
        if room <= 0:
            return []
        usable = ran & ~np.isnan(y)
        prior = self.prior_for(cell)
        # a run that produced nothing (nan) is left out of the fit and never proposed again
        picks = choose_next(
            prior,
            z,
            y,
            ran & ~usable,
            usable,
            self.threshold(cell),
            room,
            self.config.outlier_scale,
        )
        if not picks and usable.any():
            best = int(np.nanargmin(np.where(usable, y, np.nan)))
            if self._checks_neighbours(cell):
                picks = [i for i in axis_neighbours(z, best) if not ran[i]][:room]
            if not picks:
                # the whole 3×3 neighbourhood of the best, when the budget affords all of it
                nb = [i for i in grid_neighbours(z, best) if not ran[i]]
                if nb and self.config.budget > 0 and len(nb) <= self.slack(cell):
                    picks = nb[:room]
            if not picks and self.config.confirm_prob < 1:
                picks = self._confirmations(cell, prior, z, y, usable, ran, best)[:room]
            if not picks and int(ran.sum()) < self.config.min_runs:
                # a floor on the runs of every cell: the best's likeliest-better neighbours
                picks = self._confirmations(cell, prior, z, y, usable, ran, best, 0.0)[:room]
        return picks

    def _confirmations(
        self,
        cell: Cell,
        prior: Prior,
        z: np.ndarray,
        y: np.ndarray,
        usable: np.ndarray,
        ran: np.ndarray,
        best: int,
        p_floor: float | None = None,
    ) -> list[int]:
        """Unrun grid neighbours of the best run that may still beat it by more than the plateau.

        The EI rule trusts the fitted bowl; with few runs that bowl is mostly prior (the law's
        optimum, the pooled curvature), and when the prior is off by a grid step the search stops
        beside the optimum. So the bowl is refitted with the law's optimum sd widened
        `confirm_widen`× and the curvature's sd doubled, and each unrun neighbour (one grid step
        in lr, bs or both) whose posterior probability of being lower than the best point by more
        than `plateau` (relative loss) exceeds `confirm_prob · (run cost / mean)**cost_power`
        (capped at 0.5: cheap cells confirm more) is run, most probable first.
        """
        cfg = self.config
        wide = replace(
            prior,
            m_sd=tuple(cfg.confirm_widen * s for s in prior.m_sd),  # type: ignore[arg-type]
            h_sd=tuple(2.0 * s for s in prior.h_sd),  # type: ignore[arg-type]
        )
        post = fit(wide, z[usable], y[usable], cfg.outlier_scale)
        cand = [i for i in grid_neighbours(z, best) if not ran[i]]
        if not cand:
            return []
        f = _features(z[cand] - post.origin) - _features(z[[best]] - post.origin)
        mean = f @ post.mean
        sd = np.sqrt(np.maximum(np.einsum("ij,jk,ik->i", f, post.cov, f), 1e-30))
        p = norm.cdf((-math.log1p(cfg.plateau) - mean) / sd)
        order = np.argsort(-p, kind="stable")
        mean_cost = float(np.mean([c.cost for c in self.cells]))
        ratio = cell.cost / mean_cost
        p_min = min(0.5, cfg.confirm_prob * ratio**cfg.cost_power)  # cheap cells confirm more
        if p_floor is not None:
            p_min = p_floor
        return [cand[k] for k in order if p[k] > p_min]

    def with_results(self, results: Mapping[Proposal, float]) -> SearchState:
        """A new state with these losses recorded; finishes cells whose stopping rule now holds."""
        merged = {k: dict(v) for k, v in self.results.items()}
        for p, loss in results.items():
            cell = self.cell(p.cell)
            if not 0 <= p.index < len(cell.points):
                raise ValueError(
                    f"proposal.index: {p.index} (cell {p.cell!r} has {len(cell.points)} points)"
                )
            loss = float(loss)
            if not (math.isnan(loss) or loss > 0):
                raise ValueError(f"loss: {loss!r} for {p} (must be positive, inf or nan)")
            merged.setdefault(p.cell, {})[p.index] = loss
        state = replace(self, results=merged)
        return state._advance()

    def _advance(self) -> SearchState:
        """Finish every active cell whose stopping rule holds, cheapest first, until none does
        (a finished cell changes the priors, hence the decisions, of the cells after it)."""
        state = self
        while not state.done:
            for cell in state.active:
                if state.runs(cell.key) and not state._next_indices(cell):
                    state = state._finish(cell)
                    break
            else:
                return state
        return state

    def _finish(self, cell: Cell) -> SearchState:
        z, y, ran = self.observed(cell)
        ok = ran & ~np.isnan(y)
        out = _outcome(cell, self.prior_for(cell), z[ok], y[ok], self.config.outlier_scale)
        return replace(self, outcomes=self.outcomes + (out,))

    # -- serialisation ---------------------------------------------------------------------------

    def to_json(self) -> str:
        doc = {
            "config": asdict(self.config),
            "cells": [asdict(c) for c in self.cells],
            "results": {
                k: [[i, _enc(v)] for i, v in sorted(r.items())] for k, r in self.results.items()
            },
            "outcomes": [asdict(o) for o in self.outcomes],
        }
        return json.dumps(doc, sort_keys=True)

    @classmethod
    def from_json(cls, text: str) -> SearchState:
        doc = json.loads(text)
        cells = tuple(
            Cell(**{**c, "points": tuple(tuple(p) for p in c["points"])}) for c in doc["cells"]
        )
        outcomes = tuple(
            Outcome(**{k: tuple(v) if isinstance(v, list) else v for k, v in o.items()})
            for o in doc["outcomes"]
        )
        results = {k: {int(i): _dec(v) for i, v in r} for k, r in doc["results"].items()}
        return cls(cells, SearchConfig(**doc["config"]), results, outcomes)


def _enc(v: float) -> float | str:
    return v if math.isfinite(v) else repr(v)


def _dec(v: float | str) -> float:
    return float(v)


def propose(state: SearchState) -> list[Proposal]:
    """The next round of runs: grid points of the active cells (empty only when done)."""
    return [
        Proposal(cell.key, i, *cell.points[i])
        for cell in state.active
        for i in state._next_indices(cell)
    ]
