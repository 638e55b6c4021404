"""The search state a sweep (or the replay) drives: pure and immutable.

Cells are searched cheapest first (`parallel_cells` at once), so cheap cells teach the expensive
ones where their optimum is and how their bowl is shaped (steplaw_train.search.transfer). Within a
cell the model is a mixture of two Bayesian bowls (steplaw_train.search.bowl): one whose prior
is what the finished cells predict, one whose prior on the optimum is `widen`× wider ("this cell
is not like the others"), weighted by the family rate learned from finished cells and by how well
each explains the cell's own runs (their evidence). So a cell that disagrees with the cells
before it moves weight to the wide bowl by itself, and the wide bowl keeps its share until the
runs around the best rule it out.

Next run: the untried grid point most likely to beat the best run by more than `plateau` (in a
cell that starts with no pooled curvature, among the points within one grid step of its runs).
Stop: when the probability that *some* untried point does is below `epsilon` (1 − it is the
cell's reported probability of having found its optimum) and the best's neighbours are
confirmed (its axis neighbours unless ruled out; its whole 3×3 block where the model cannot vouch
for it), or at `max_runs_frac` of its grid.
The chosen point is the best run the search actually ran.

Driving it: `state = SearchState.create(cells, SearchConfig())`, then
`while not state.done: props = propose(state); state = state.with_results({p: loss})`.
`state.to_json()` / `SearchState.from_json()` make it resumable. Everything is deterministic.
"""

from __future__ import annotations

import json
import math
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, field, replace

import numpy as np

from steplaw_train.search import bowl, transfer
from steplaw_train.search.bowl import Prior
from steplaw_train.search.cell import Cell, Proposal
from steplaw_train.search.config import SearchConfig
from steplaw_train.search.transfer import Outcome

NEIGHBOUR_SPLIT = 4  # a neighbour is ruled out when it carries < epsilon / 4 (four of them)
# A cell whose own runs favour the "differs from the finished cells" bowl (its weight above this:
# the runs' evidence is stronger for it than for the transferred prior) does not let the model
# rule out any point next to its best: the model's confidence there rests on a prior the cell
# has just contradicted.
DISAGREE = 0.5
# Where the model cannot vouch for the best's surroundings (the cell contradicts its
# prior, or no finished cell has taught it a curvature and its bowl is the default near-round
# one), a cell stops only once the best's whole 3×3 grid block has run: a point better than its
# eight neighbours is a local minimum for a diagonal valley too, which the four axis neighbours
# of a hill-climb are not. On moe-valley-Na the first cells had stopped after runs along one
# edge row, 1.4-2.9‰ above the minimum, stating P(found) 0.98 (docs/search.md, 2026-12-03c).


@dataclass(frozen=True)
class Assessment:
    """What a cell's runs say now: the best run, the untried points most likely to beat it (with
    those probabilities), P(some untried point does) and the weight of the "differs" bowl."""

    best: int
    candidates: tuple[int, ...]
    p_each: tuple[float, ...]
    p_any: float
    wide: float


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

    def outcome(self, key: str) -> Outcome | None:
        for o in self.outcomes:
            if o.cell == key:
                return o
        return None

    def _centre(self) -> tuple[float, float]:
        return (
            float(np.mean([math.log(c.n_law) for c in self.cells])),
            float(np.mean([math.log(c.d) for c in self.cells])),
        )

    def _done_before(self, cell: Cell) -> list[tuple[Cell, Outcome]]:
        return [(self.cell(o.cell), o) for o in self.outcomes if o.cell != cell.key]

    def prior_for(self, cell: Cell) -> Prior:
        """What the search of `cell` starts from, given the cells finished before it."""
        done = self._done_before(cell)
        cfg = self.config
        m0, m_sd = transfer.law_prior(
            cfg.prior, cell, done, self._centre(), cfg.law_scatter, cfg.model_sd
        )
        h, h_sd = transfer.curvature_prior(done)
        noise = transfer.noise_prior(done, cfg.noise)
        return Prior(m0, m_sd, tuple(h), tuple(h_sd), noise)  # type: ignore[arg-type]

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

    def epsilon(self, cell: Cell) -> float:
        """The cell's stopping threshold: epsilon × (run cost / mean run cost) ** cost_power,
        at most 0.5 (a cell never stops while an untried point is likelier than not to beat it)."""
        mean_cost = float(np.mean([c.cost for c in self.cells]))
        return min(0.5, self.config.epsilon * (cell.cost / mean_cost) ** self.config.cost_power)

    def _mixture(
        self, cell: Cell, z: np.ndarray, y: np.ndarray
    ) -> tuple[list[bowl.Posterior], np.ndarray, np.ndarray]:
        """Posteriors of the cell's bowl under every (family, noise) prior, their weights, and the
        log evidence of the runs for each noise level (family marginalised).

        Family: the prior the finished cells predict, or one `widen`× wider on the optimum,
        weighted by the learned family rate. Noise: levels NOISE_LEVELS × `noise`, weighted by
        the evidence of every finished cell's runs (the run noise is one property of the sweep).
        """
        cfg = self.config
        prior = self.prior_for(cell)
        done = self._done_before(cell)
        rate = transfer.family_rate(done)
        noise_logw = transfer.noise_log_weights(done)
        posts, logw = [], []
        for fam, fam_w in ((prior, 1.0 - rate), (prior.widened(cfg.widen), rate)):
            for k, level in enumerate(transfer.NOISE_LEVELS):
                p = replace(fam, noise=cfg.noise * level)
                post = bowl.fit(p, z, y, cfg.outlier_scale)
                posts.append(post)
                logw.append(math.log(fam_w) + noise_logw[k] + post.log_evidence)
        lw = np.array(logw)
        w = np.exp(lw - lw.max())
        w /= w.sum()
        ll = np.array([p.log_evidence for p in posts]).reshape(2, -1)
        fam_lw = np.log([1.0 - rate, rate])[:, None] + ll
        noise_ll = np.logaddexp(fam_lw[0], fam_lw[1])
        return posts, w, noise_ll

    def assess(self, cell: Cell) -> Assessment | None:
        """The mixture's view of a cell's untried points (None before a usable run)."""
        z, y, ran = self.observed(cell)
        usable = ran & ~np.isnan(y)
        if not usable.any():
            return None
        posts, w, _ = self._mixture(cell, z[usable], y[usable])
        best = int(np.nanargmin(np.where(usable, y, np.nan)))
        cand = np.flatnonzero(~ran)
        p_each, p_any = bowl.improvement_odds(
            posts, list(w), z, cand, best, math.log1p(self.config.plateau)
        )
        order = np.argsort(-p_each, kind="stable")
        half = len(w) // 2
        return Assessment(
            best,
            tuple(int(cand[k]) for k in order),
            tuple(float(p_each[k]) for k in order),
            float(p_any),
            float(w[half:].sum()),
        )

    # -- transitions -----------------------------------------------------------------------------

    def _next_indices(self, cell: Cell) -> list[int]:
        cfg = self.config
        z, y, ran = self.observed(cell)
        cap = max(1, math.ceil(cfg.max_runs_frac * len(z)))
        room = min(cfg.batch, cap - int(ran.sum()), int((~ran).sum()))
        if room <= 0:
            return []
        usable = ran & ~np.isnan(y)
        if not usable.any():  # nothing usable yet: the untried grid point nearest the law
            prior = self.prior_for(cell)
            d = (z - np.array(prior.m0)) / np.array(prior.m_sd)
            dist = np.where(ran, np.inf, np.einsum("ij,ij->i", d, d))
            return [int(np.argmin(dist))] if np.isfinite(dist).any() else []
        a = self.assess(cell)
        assert a is not None
        mean_cost = float(np.mean([c.cost for c in self.cells]))
        if cell.cost <= cfg.neighbour_cost * mean_cost:
            nb = self._climb(cell, z, y, ran)
            if nb:
                return nb[:room]
        eps = self.epsilon(cell)
        if a.p_any < eps and int(ran.sum()) >= cfg.min_runs:
            p_of = dict(zip(a.candidates, a.p_each, strict=True))
            if a.wide > DISAGREE or not transfer.curvature_known(self._done_before(cell)):
                # the model cannot vouch for the best's surroundings (comment at DISAGREE):
                # the best's whole untried 3×3 block runs first
                nb = [i for i in bowl.grid_neighbours(z, a.best) if not ran[i]]
            else:
                # what a hill-climb would still run: the best's untried axis neighbours, unless
                # the evidence against each is strong (the four together carry less than eps)
                nb = [
                    i
                    for i in bowl.axis_neighbours(z, a.best)
                    if not ran[i] and p_of[i] >= eps / NEIGHBOUR_SPLIT
                ]
            return sorted(nb, key=lambda i: -p_of[i])[:room]
        picks = list(a.candidates)
        if not transfer.curvature_known(self._done_before(cell)):
            picks = _near_runs(z, ran, picks)
        picks = picks[:room]
        if cfg.tau > 0:
            post = bowl.fit(self.prior_for(cell), z[usable], y[usable], cfg.outlier_scale)
            mu, sd = post.predict(z)
            ei = bowl.expected_improvement(mu, sd, float(np.nanmin(y[usable])))
            picks = [i for i in picks if ei[i] > cfg.tau]
        return picks

    def _climb(self, cell: Cell, z: np.ndarray, y: np.ndarray, ran: np.ndarray) -> list[int]:
        """The untried axis neighbours a steepest-descent hill-climb from the cell's first run
        would run next (empty once it has converged).

        Re-derived from the results alone (the start is the grid point nearest the prior, as for
        the first run), so it survives resume. Steepest, not first-improvement: the current
        point's whole neighbourhood runs before the climb moves to its best, so one noisy run
        does not send the climb off towards a grid edge.
        """
        prior = self.prior_for(cell)
        d = (z - np.array(prior.m0)) / np.array(prior.m_sd)
        at = int(np.argmin(np.einsum("ij,ij->i", d, d)))
        score = np.where(ran & np.isfinite(y), y, np.inf)
        for _ in range(len(z)):
            nb = bowl.axis_neighbours(z, at)
            todo = [i for i in nb if not ran[i]]
            if todo or not ran[at]:
                return todo if ran[at] else [at]
            nxt = min(nb, key=lambda i: (score[i], i)) if nb else at
            if score[nxt] >= score[at]:
                return []
            at = nxt
        return []

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
        a = self.assess(cell)
        wide, p_found = (a.wide, 1.0 - a.p_any) if a is not None else (0.0, 0.0)
        noise_ll = tuple(float(v) for v in self._mixture(cell, z[ok], y[ok])[2]) if ok.any() else ()
        out = transfer.outcome(
            cell, self.prior_for(cell), z[ok], y[ok], self.config.outlier_scale, wide, p_found
        )
        out = replace(out, noise_ll=noise_ll)
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


def _near_runs(z: np.ndarray, ran: np.ndarray, candidates: list[int]) -> list[int]:
    """The candidates within one grid step (the 3×3 block) of some run, in their order (all of
    them when none is).

    Used for cells that start with no finished cell carrying curvature (the sweep's first
    cells): their curvature prior is the default, near-round bowl, which cannot bend along a
    diagonal valley, and a far candidate's high improvement odds there are extrapolation
    variance, not evidence (on moe-valley-Na the first cell's fifth run was often the window's
    far corner, and the cell then stopped at P(found) 0.97-0.99 some 1.4-3.5 permille above the
    minimum). Near the runs the quadratic holds. Later cells, whose curvature prior is pooled
    from finished cells, propose from the whole grid: restricting every cell trips the dense
    table without a prior (docs/search.md, round 2026-12-02c).
    """
    near = {j for i in np.flatnonzero(ran) for j in bowl.grid_neighbours(z, int(i))}
    return [i for i in candidates if i in near] or candidates


def propose(state: SearchState) -> list[Proposal]:
    """The next round of runs: grid points of the active cells (empty only when done)."""
    return [
        Proposal(cell.key, i, *cell.points[i])
        for cell in state.active
        for i in state._next_indices(cell)
    ]
