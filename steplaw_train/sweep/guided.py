"""`python -m steplaw_train.sweep +grid=NAME search=guided`: the law-guided search as a sweep.

The pure algorithm (steplaw_train/search.py) decides which grid points to run; this module is its
edge to the world. It turns the grid's RunSpecs into search cells, keeps the search state in the
sweep directory (`search_state.json`, written atomically after every change), reads finished runs'
`result.json` (smooth_loss; diverged = inf, failed for good = nan) and hands the proposed points'
specs to the ordinary launch executors. Runs stay ordinary run directories, so resume, status and
analysis do not know a search chose them; rerunning the command continues where it stopped.

* cell   = every spec that differs only in (lr, batch_size, seed): one (model, recipe, D, train
           overrides) cell of the grid. Its points are its (lr, bs) pairs; the seeds of a point
           are one point whose loss is their mean (less noise, not a different optimum).
* cost   = Na·D × seeds of one point: proportional to the point's GPU-hours.
* rounds = propose → submit the point's runs (pending or preempted, or failed within max_retries)
           → when all of a round's runs have ended, feed their losses to the search.
Blocking launchers (local, debug) loop rounds until every cell is done. SLURM returns after
submitting a round; rerun the command (a loop, cron) to advance it, or set `search.wait=true` to
poll until the search is done. The sweep dir's lock (rundir.sweep_owned, shared with the full
sweep) keeps two invocations from submitting the same round: the second is refused.
"""

from __future__ import annotations

import hashlib
import json
import math
import sys
import time
from collections import defaultdict
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any

from launch import status
from steplaw_train import atomic, rundir
from steplaw_train.cells import cell_identity, cell_key
from steplaw_train.keys import check_keys
from steplaw_train.search import Cell, Proposal, SearchConfig, SearchState, propose
from steplaw_train.spec import RunSpec, SpecError
from steplaw_train.sweep.common import (
    Setup,
    SweepResult,
    check_data,
    plain,
    record_submission,
    record_sweep,
    select,
    table,
)

STATE_FILE = "search_state.json"
STATE_VERSION = 1
LAW_N = ("N", "Na")
SECTION_KEYS = ("name", "prior", "batch", "parallel_cells", "law_n", "wait", "poll_s", "knobs")
KNOBS = tuple(
    f.name for f in fields(SearchConfig) if f.name not in ("prior", "batch", "parallel_cells")
)


@dataclass(frozen=True)
class GuidedResult(SweepResult):
    """SweepResult plus the search's progress (`cells`: summary() rows)."""

    done: bool
    cells: tuple[Mapping[str, Any], ...]
    rounds: int


@dataclass(frozen=True)
class GuidedConfig:
    """The `search:` section of a sweep (configs/search/guided.yaml), validated."""

    search: SearchConfig
    law_n: str = "N"
    wait: bool = False
    poll_s: float = 60.0


@dataclass(frozen=True)
class GridCell:
    """A search cell and, per grid point (same order as `cell.points`), the specs of its seeds."""

    cell: Cell
    runs: tuple[tuple[RunSpec, ...], ...]

    def run_ids(self, index: int) -> list[str]:
        return [s.run_id for s in self.runs[index]]


@dataclass(frozen=True)
class Pending:
    """A proposed point whose runs have not all ended yet."""

    cell: str
    index: int
    run_ids: tuple[str, ...]


# ---- configuration (pure) ----------------------------------------------------------------------
def guided_config(section: Any) -> GuidedConfig:
    """Validate the `search:` section; errors name the field and the allowed values."""
    d = plain(section)
    check_keys(d, SECTION_KEYS, "search")
    if d.get("name", "guided") != "guided":
        raise SpecError("search.name", f"{d.get('name')!r}; allowed: full, guided")
    knobs = dict(d.get("knobs") or {})
    check_keys(knobs, KNOBS, "search.knobs")
    law_n = str(d.get("law_n", "N"))
    if law_n not in LAW_N:
        raise SpecError("search.law_n", f"{law_n!r}; allowed: {list(LAW_N)}")
    poll_s = float(d.get("poll_s", 60))
    if not poll_s > 0:
        raise SpecError("search.poll_s", f"{poll_s!r}; must be > 0 seconds")
    ints = {}
    for key in ("batch", "parallel_cells"):
        v = d.get(key, 1)
        if not isinstance(v, int) or isinstance(v, bool) or v < 1:
            raise SpecError(f"search.{key}", f"{v!r}; must be an integer >= 1")
        ints[key] = v
    try:
        scfg = SearchConfig(prior=str(d.get("prior", "steplaw")), **ints, **knobs)
    except (TypeError, ValueError) as e:
        field_name = str(e).split(":", 1)[0]
        where = "prior" if field_name == "prior" else f"knobs.{field_name}"
        raise SpecError(f"search.{where}", str(e).split(": ", 1)[-1]) from None
    return GuidedConfig(scfg, law_n, bool(d.get("wait", False)), poll_s)


# ---- cells (pure) ------------------------------------------------------------------------------
def build_cells(specs: Sequence[RunSpec], law_n: str = "N") -> list[GridCell]:
    """Group a grid's specs into search cells; point order (lr, bs) and keys are deterministic."""
    groups: dict[str, list[RunSpec]] = defaultdict(list)
    for spec in specs:
        groups[cell_identity(spec)].append(spec)
    labels = defaultdict(list)
    for ident, members in groups.items():
        s = members[0]
        labels[cell_key(s).label].append(ident)
    keys = {}
    for label, idents in labels.items():
        for ident in idents:  # same label, different train overrides: add a short hash
            keys[ident] = label if len(idents) == 1 else f"{label} #{_short(ident)}"
    out = []
    for ident, members in sorted(groups.items(), key=lambda kv: keys[kv[0]]):
        by_point: dict[tuple[float, int], list[RunSpec]] = defaultdict(list)
        for s in members:
            by_point[(s.train.lr, s.train.batch_size)].append(s)
        points = sorted(by_point)
        runs = tuple(tuple(sorted(by_point[p], key=lambda s: s.train.seed)) for p in points)
        s0 = members[0]
        seeds = max(len(r) for r in runs)
        n = s0.N if law_n == "N" else s0.Na
        cell = Cell(
            keys[ident],
            float(n),
            float(s0.D),
            float(s0.Na) * s0.D * seeds,
            s0.train.seq_len,
            tuple((float(lr), float(bs)) for lr, bs in points),
            model=f"{s0.model.name}|{s0.data.recipe}",  # one model at several D
        )
        out.append(GridCell(cell, runs))
    return out


def _short(text: str) -> str:
    return hashlib.sha256(text.encode()).hexdigest()[:6]


def point_loss(losses: Sequence[float]) -> float:
    """A point's loss from its seeds' runs: their mean (inf if one diverged); nan if none ended."""
    usable = [v for v in losses if not math.isnan(v)]
    return sum(usable) / len(usable) if usable else math.nan


def run_loss(run_dir: Path) -> float:
    """A run's loss for the search (rundir.result_loss); nan while unfinished or unreadable."""
    try:
        return rundir.result_loss(rundir.read_result(run_dir))
    except rundir.CorruptRecord:
        return math.nan


# ---- persistence -------------------------------------------------------------------------------
def fresh_state(cells: Sequence[GridCell], cfg: GuidedConfig) -> SearchState:
    return SearchState.create([g.cell for g in cells], cfg.search)


def load_state(
    sweep_dir: Path, cells: Sequence[GridCell], cfg: GuidedConfig
) -> tuple[SearchState, list[Pending], int]:
    """The saved search (state, pending points, rounds), or a fresh one; refuses a saved search
    made for other cells or knobs (its results would be fed to the wrong points)."""
    fresh = fresh_state(cells, cfg)
    try:
        doc = rundir.read_json(sweep_dir / STATE_FILE)
    except rundir.CorruptRecord as e:
        raise SpecError(
            "search", f"{e}; delete it to restart the search (finished runs are reused)"
        ) from None
    if doc is None:
        return fresh, [], 0
    saved = doc.get("search", {})
    want = json.loads(fresh.to_json())
    for part in ("cells", "config"):
        if saved.get(part) != want[part]:
            raise SpecError(
                "search",
                f"{sweep_dir / STATE_FILE} was made for a different grid or "
                f"search config ({part} differ); use a new sweep_dir, or delete the "
                f"file to restart the search (finished runs are reused)",
            )
    state = SearchState.from_json(json.dumps(saved))
    pending = [
        Pending(p["cell"], int(p["index"]), tuple(p["run_ids"])) for p in doc.get("pending", [])
    ]
    return state, pending, int(doc.get("rounds", 0))


def save_state(
    sweep_dir: Path, state: SearchState, pending: Sequence[Pending], rounds: int
) -> None:
    atomic.write_json(
        sweep_dir / STATE_FILE,
        {
            "version": STATE_VERSION,
            "updated": time.time(),
            "rounds": rounds,
            "done": state.done,
            "pending": [
                {"cell": p.cell, "index": p.index, "run_ids": list(p.run_ids)} for p in pending
            ],
            "search": json.loads(state.to_json()),
        },
    )


# ---- one step of the loop (pure over statuses) -------------------------------------------------
@dataclass(frozen=True)
class Resolution:
    results: dict[Proposal, float]  # points whose runs have all ended
    submit: tuple[str, ...]  # run_ids to (re)submit now
    waiting: int  # runs queued or running
    failed: tuple[str, ...]  # runs that ended without a result and will not be retried


def resolve(
    pending: Sequence[Pending],
    by_key: Mapping[str, GridCell],
    states: Mapping[str, status.RunStatus],
    losses: Mapping[str, float],
    retry_failed: bool,
    max_retries: int,
    tried: set[str],
) -> Resolution:
    """What to do with the pending points given their runs' states (see sweep.select)."""
    results: dict[Proposal, float] = {}
    submit, failed, waiting = [], [], 0
    for p in pending:
        runs = [states[r] for r in p.run_ids]
        again = set(select(runs, retry_failed, max_retries))
        again -= {r.run_id for r in runs if r.state == "failed" and r.run_id in tried}
        open_ = [r for r in runs if r.state in ("queued", "running") or r.run_id in again]
        submit += [r.run_id for r in runs if r.run_id in again]
        waiting += sum(r.state in ("queued", "running") for r in runs)
        if open_:
            continue
        failed += [r.run_id for r in runs if r.state not in ("done", "diverged")]
        lr, bs = by_key[p.cell].cell.points[p.index]
        vals = [losses.get(r.run_id, math.nan) for r in runs]
        results[Proposal(p.cell, p.index, lr, bs)] = point_loss(vals)
    return Resolution(results, tuple(submit), waiting, tuple(failed))


# ---- reporting (pure) ----------------------------------------------------------------------------
def summary(state: SearchState, cells: Sequence[GridCell]) -> list[dict[str, Any]]:
    """Per cell, cheapest first: runs used / grid runs, cost fraction, chosen point and loss."""
    by_key = {g.cell.key: g for g in cells}
    finished = {o.cell for o in state.outcomes}
    rows = []
    for c in state.cells:
        g = by_key[c.key]
        used = sum(len(g.runs[i]) for i in state.results.get(c.key, {}))
        grid_runs = sum(len(r) for r in g.runs)
        best = state.best(c.key)
        row = {
            "cell": c.key,
            "state": "done"
            if c.key in finished
            else ("searching" if state.runs(c.key) else "waiting"),
            "runs": used,
            "grid_runs": grid_runs,
            "points": state.runs(c.key),
            "grid_points": len(c.points),
            "cost": c.cost,
            "lr": None,
            "bs": None,
            "loss": None,
            "run_ids": [],
        }
        if best is not None:
            i, loss = best
            row.update(lr=c.points[i][0], bs=int(c.points[i][1]), loss=loss, run_ids=g.run_ids(i))
        rows.append(row)
    return rows


def render(rows: Sequence[Mapping[str, Any]]) -> str:
    head = f"{'cell':<40} {'state':<9} {'runs':>9} {'lr':>9} {'bs':>5} {'loss':>8}"
    lines = [head, "-" * len(head)]
    for r in rows:
        lr = f"{r['lr']:.4g}" if r["lr"] is not None else "-"
        loss = f"{r['loss']:.4f}" if r["loss"] is not None else "-"
        lines.append(
            f"{r['cell']:<40} {r['state']:<9} {r['runs']:>4}/{r['grid_runs']:<4} {lr:>9} "
            f"{r['bs'] if r['bs'] is not None else '-':>5} {loss:>8}"
        )
    used = sum(r["runs"] for r in rows)
    total = sum(r["grid_runs"] for r in rows)
    cost_used = sum(r["cost"] * r["points"] for r in rows)
    cost_all = sum(r["cost"] * r["grid_points"] for r in rows)
    lines.append(
        f"guided: {used}/{total} runs ({used / max(total, 1):.0%}), "
        f"{cost_used / max(cost_all, 1e-300):.1%} of the grid's compute; "
        f"{sum(r['state'] == 'done' for r in rows)}/{len(rows)} cells done"
    )
    return "\n".join(lines)


# ---- the driver (side effects) -------------------------------------------------------------------
@dataclass
class Driver:
    """One guided invocation: the search state it advances and what it has submitted."""

    cfg: Any
    setup: Setup
    gcfg: GuidedConfig
    cells: list[GridCell]
    state: SearchState
    pending: list[Pending]
    rounds: int
    out: Any
    submitted: list[str] = field(default_factory=list)
    job_ids: list[str] = field(default_factory=list)
    failed: list[str] = field(default_factory=list)
    calls: int = 0

    @property
    def by_key(self) -> dict[str, GridCell]:
        return {g.cell.key: g for g in self.cells}

    def propose_round(self) -> None:
        """Ask the search for the next points and record them (manifest, spec.json)."""
        props = propose(self.state)
        if not props:
            raise RuntimeError("search: propose() returned nothing for an unfinished search")
        by_key = self.by_key
        self.pending = [
            Pending(p.cell, p.index, tuple(by_key[p.cell].run_ids(p.index))) for p in props
        ]
        self.rounds += 1
        save_state(self.setup.sweep_dir, self.state, self.pending, self.rounds)
        record_sweep(
            self.setup.sweep_dir,
            self.cfg,
            _proposed_specs(self.state, self.pending, by_key),
            self.setup.runs_root,
        )

    def resolve_pending(self) -> Resolution:
        ids = [r for p in self.pending for r in p.run_ids]
        sweep_dir = self.setup.sweep_dir
        states = {s.run_id: s for s in status.sweep_states(sweep_dir, ids, self.setup.runs_root)}
        losses = {r: run_loss(rundir.run_dir(sweep_dir, r)) for r in ids}
        res = resolve(
            self.pending,
            self.by_key,
            states,
            losses,
            self.setup.retry_failed,
            self.setup.max_retries,
            set(self.submitted),
        )
        self.failed += res.failed
        return res

    def submit(self, run_ids: Sequence[str]) -> None:
        by_id = {s.run_id: s for s in self.setup.specs}
        todo = [by_id[r] for r in run_ids]
        sub = self.setup.launcher.submit(todo)
        # runs taken elsewhere meanwhile are waited for like this round's own (resolve)
        self.submitted += sub.run_ids
        self.job_ids += sub.job_ids
        self.calls += sub.batch_calls
        record_submission(
            self.setup, sub.run_ids, sub, self.cfg, search="guided", round=self.rounds
        )
        print(
            f"round {self.rounds}: submitted {len(sub.run_ids)} runs to {self.setup.launcher.name}",
            file=self.out,
        )

    def feed(self, res: Resolution) -> None:
        """The round's points have all ended: hand their losses to the search."""
        self.state = self.state.with_results(res.results)
        self.pending = []
        save_state(self.setup.sweep_dir, self.state, self.pending, self.rounds)

    def step(self) -> bool:
        """One turn of the loop; False when this invocation should stop."""
        if not self.pending:
            if self.state.done:
                return False
            self.propose_round()
            return True
        res = self.resolve_pending()
        blocking = self.setup.launcher.blocking
        if res.submit:
            self.submit(res.submit)
            if blocking:
                return True
        if res.results and not res.submit and not res.waiting:
            self.feed(res)
            return True
        if blocking:  # runs alive on this machine (another process runs them): wait for them
            time.sleep(min(self.gcfg.poll_s, 5.0))
            return True
        if not self.gcfg.wait:
            return False
        time.sleep(self.gcfg.poll_s)
        return True

    def result(self) -> GuidedResult:
        rows = summary(self.state, self.cells)
        text = render(rows)
        print(text, file=self.out)
        if not self.state.done:
            n = sum(len(p.run_ids) for p in self.pending)
            print(
                f"search not done: {n} runs of round {self.rounds} pending; rerun this command "
                f"(or set search.wait=true) to advance it; sweep dir {self.setup.sweep_dir}",
                file=self.out,
            )
        return GuidedResult(
            sweep_dir=self.setup.sweep_dir,
            specs=self.setup.specs,
            before={},
            submitted=tuple(self.submitted),
            job_ids=tuple(self.job_ids),
            batch_calls=self.calls,
            failed=tuple(dict.fromkeys(self.failed)),
            launcher=self.setup.launcher.name,
            table=text,
            done=self.state.done,
            cells=tuple(rows),
            rounds=self.rounds,
        )


def run(cfg: Any, setup: Setup, out=sys.stdout) -> GuidedResult:
    """Advance the guided search as far as the launcher allows; returns a GuidedResult."""
    gcfg = guided_config(cfg.get("search"))
    cells = build_cells(setup.specs, gcfg.law_n)
    state, pending, rounds = load_state(setup.sweep_dir, cells, gcfg)
    if setup.dry_run:
        return _dry_run(state, pending, cells, setup, out)
    if setup.check_data:
        check_data(setup.specs, setup.options)
    driver = Driver(cfg, setup, gcfg, cells, state, pending, rounds, out)
    with rundir.sweep_owned(setup.sweep_dir):
        while driver.step():
            pass
    return driver.result()


def _proposed_specs(
    state: SearchState, pending: Sequence[Pending], by_key: Mapping[str, GridCell]
) -> list[RunSpec]:
    """Every spec the search has asked for so far: the sweep's manifest (what status shows)."""
    out: list[RunSpec] = []
    for key, res in state.results.items():
        for i in sorted(res):
            out += by_key[key].runs[i]
    for p in pending:
        out += by_key[p.cell].runs[p.index]
    return list({s.run_id: s for s in out}.values())


def _dry_run(state, pending, cells, setup: Setup, out) -> GuidedResult:
    """Print the cells in search order and the next round's runs; write nothing."""
    by_key = {g.cell.key: g for g in cells}
    by_id = {s.run_id: s for s in setup.specs}
    if not pending and not state.done:
        pending = [
            Pending(p.cell, p.index, tuple(by_key[p.cell].run_ids(p.index))) for p in propose(state)
        ]
    ids = [r for p in pending for r in p.run_ids]
    nxt = [by_id[r] for r in ids]
    statuses = status.sweep_states(setup.sweep_dir, ids, setup.runs_root)
    todo = set(select(statuses, False, 1))
    rows = summary(state, cells)
    text = render(rows)
    if nxt:
        text += "\nnext round:\n" + table(
            nxt, statuses, todo, setup.resources, setup.launcher.name, 0
        )
    print(text, file=out)
    return GuidedResult(
        sweep_dir=setup.sweep_dir,
        specs=setup.specs,
        before=status.counts(statuses),
        submitted=(),
        job_ids=(),
        batch_calls=0,
        failed=(),
        launcher=setup.launcher.name,
        table=text,
        done=state.done,
        cells=tuple(rows),
        rounds=0,
    )
