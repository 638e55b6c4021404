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
poll until the search is done. A lock file keeps two invocations from submitting the same round.
"""

from __future__ import annotations

import fcntl
import hashlib
import json
import math
import sys
import time
from collections import defaultdict
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any

from omegaconf import DictConfig, OmegaConf

from launch import executors, status
from launch.resources import ResourceModel
from steplaw_train import sweep as sw
from steplaw_train.options import RunOptions
from steplaw_train.search import Cell, Proposal, SearchConfig, SearchState, propose
from steplaw_train.spec import RunSpec, SpecError, canonical_json
from steplaw_train.sweep import SweepResult

STATE_FILE = "search_state.json"
LOCK_FILE = ".search.lock"
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
    d = (
        OmegaConf.to_container(section, resolve=True)
        if isinstance(section, DictConfig)
        else dict(section or {})
    )
    unknown = sorted(set(d) - set(SECTION_KEYS))
    if unknown:
        raise SpecError(f"search.{unknown[0]}", f"unknown key; allowed: {list(SECTION_KEYS)}")
    if d.get("name", "guided") != "guided":
        raise SpecError("search.name", f"{d.get('name')!r}; allowed: full, guided")
    knobs = dict(d.get("knobs") or {})
    bad = sorted(set(knobs) - set(KNOBS))
    if bad:
        raise SpecError(f"search.knobs.{bad[0]}", f"unknown knob; allowed: {list(KNOBS)}")
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
def _cell_identity(spec: RunSpec) -> str:
    """Everything but lr, batch size and seed (labels included: they name the cell)."""
    neutral = spec.with_train(lr=1.0, batch_size=1, seed=0)
    return f"{spec.model.name}|{spec.data.recipe}|{canonical_json(neutral)}"


def build_cells(specs: Sequence[RunSpec], law_n: str = "N") -> list[GridCell]:
    """Group a grid's specs into search cells; point order (lr, bs) and keys are deterministic."""
    groups: dict[str, list[RunSpec]] = defaultdict(list)
    for spec in specs:
        groups[_cell_identity(spec)].append(spec)
    labels = defaultdict(list)
    for ident, members in groups.items():
        s = members[0]
        labels[f"{s.model.name} {s.data.recipe} D={s.D:.4g}"].append(ident)
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
        )
        out.append(GridCell(cell, runs))
    return out


def _short(text: str) -> str:
    return hashlib.sha256(text.encode()).hexdigest()[:6]


def point_loss(losses: Sequence[float]) -> float:
    """A point's loss from its seeds' runs: their mean (inf if one diverged); nan if none ended."""
    usable = [v for v in losses if not math.isnan(v)]
    return sum(usable) / len(usable) if usable else math.nan


def run_loss(result: Mapping[str, Any] | None) -> float:
    """A finished run's loss for the search: smooth_loss, inf when diverged, nan when unusable."""
    if result is None:
        return math.nan
    if result.get("status") == "diverged":
        return math.inf
    v = result.get("smooth_loss")
    try:
        v = float(v)
    except (TypeError, ValueError):
        return math.nan
    return v if v > 0 else math.nan


# ---- persistence -------------------------------------------------------------------------------
def fresh_state(cells: Sequence[GridCell], cfg: GuidedConfig) -> SearchState:
    return SearchState.create([g.cell for g in cells], cfg.search)


def load_state(
    sweep_dir: Path, cells: Sequence[GridCell], cfg: GuidedConfig
) -> tuple[SearchState, list[Pending], int]:
    """The saved search (state, pending points, rounds), or a fresh one; refuses a saved search
    made for other cells or knobs (its results would be fed to the wrong points)."""
    fresh = fresh_state(cells, cfg)
    doc = status.read_json(sweep_dir / STATE_FILE)
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
    executors.write_json_atomic(
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


@contextmanager
def sweep_lock(sweep_dir: Path) -> Iterator[None]:
    """One guided invocation per sweep dir at a time (cron + a manual run must not double-submit)."""
    sweep_dir.mkdir(parents=True, exist_ok=True)
    with open(sweep_dir / LOCK_FILE, "w") as f:
        try:
            fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise SpecError(
                "sweep_dir", f"another guided sweep is running on {sweep_dir}"
            ) from None
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


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
        again = set(sw.select(runs, retry_failed, max_retries))
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
def _read_losses(sweep_dir: Path, run_ids: Sequence[str]) -> dict[str, float]:
    return {r: run_loss(status.read_json(sweep_dir / "runs" / r / "result.json")) for r in run_ids}


def run(
    cfg: Any,
    specs: Sequence[RunSpec],
    sweep_dir: Path,
    options: RunOptions,
    lc: Mapping[str, Any],
    launcher: str,
    rm: ResourceModel,
    out=sys.stdout,
):
    """Advance the guided search as far as the launcher allows; returns a GuidedResult."""
    gcfg = guided_config(cfg.get("search"))
    cells = build_cells(specs, gcfg.law_n)
    by_key = {g.cell.key: g for g in cells}
    by_id = {s.run_id: s for s in specs}
    state, pending, rounds = load_state(sweep_dir, cells, gcfg)
    retry, max_retries = bool(cfg.get("retry_failed", False)), int(cfg.get("max_retries", 1))
    if cfg.get("dry_run", False):
        return _dry_run(state, pending, cells, by_id, sweep_dir, rm, launcher, out)
    blocking = launcher in ("local", "debug")
    submitted: list[str] = []
    job_ids: list[str] = []
    failed: list[str] = []
    calls = 0
    sw.check_data(specs, options)
    with sweep_lock(sweep_dir):
        while True:
            if not pending:
                if state.done:
                    break
                props = propose(state)
                if not props:
                    raise RuntimeError(
                        "search: propose() returned nothing for an unfinished search"
                    )
                pending = [
                    Pending(p.cell, p.index, tuple(by_key[p.cell].run_ids(p.index))) for p in props
                ]
                rounds += 1
                save_state(sweep_dir, state, pending, rounds)
                sw.record_sweep(sweep_dir, cfg, _proposed_specs(state, pending, by_key))
                continue
            ids = [r for p in pending for r in p.run_ids]
            states = {s.run_id: s for s in status.sweep_states(sweep_dir, ids)}
            res = resolve(
                pending,
                by_key,
                states,
                _read_losses(sweep_dir, ids),
                retry,
                max_retries,
                set(submitted),
            )
            failed += res.failed
            if res.submit:
                todo = [by_id[r] for r in res.submit]
                sub = executors.submit(launcher, todo, sweep_dir, options, lc, rm)
                submitted += res.submit
                job_ids += sub.job_ids
                calls += sub.batch_calls
                sw.append_submission(
                    sweep_dir,
                    {
                        "time": time.time(),
                        "launcher": launcher,
                        "search": "guided",
                        "round": rounds,
                        "submitted": len(todo),
                        "run_ids": list(res.submit),
                        "job_ids": list(sub.job_ids),
                        "batch_calls": sub.batch_calls,
                    },
                )
                print(f"round {rounds}: submitted {len(todo)} runs to {launcher}", file=out)
                if blocking:
                    continue
            if res.results and not res.submit and not res.waiting:
                state = state.with_results(res.results)
                pending = []
                save_state(sweep_dir, state, pending, rounds)
                continue
            if blocking:  # runs alive on this machine (another process runs them): wait for them
                time.sleep(min(gcfg.poll_s, 5.0))
                continue
            if not gcfg.wait:
                break
            time.sleep(gcfg.poll_s)
    rows = summary(state, cells)
    text = render(rows)
    print(text, file=out)
    if not state.done:
        n = sum(len(p.run_ids) for p in pending)
        print(
            f"search not done: {n} runs of round {rounds} pending; rerun this command (or set "
            f"search.wait=true) to advance it; sweep dir {sweep_dir}",
            file=out,
        )
    return GuidedResult(
        sweep_dir,
        tuple(specs),
        {},
        tuple(submitted),
        tuple(job_ids),
        calls,
        tuple(dict.fromkeys(failed)),
        launcher,
        text,
        state.done,
        tuple(rows),
        rounds,
    )


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


def _dry_run(state, pending, cells, by_id, sweep_dir, rm, launcher, out):
    """Print the cells in search order and the next round's runs; write nothing."""
    by_key = {g.cell.key: g for g in cells}
    if not pending and not state.done:
        pending = [
            Pending(p.cell, p.index, tuple(by_key[p.cell].run_ids(p.index))) for p in propose(state)
        ]
    ids = [r for p in pending for r in p.run_ids]
    nxt = [by_id[r] for r in ids]
    statuses = status.sweep_states(sweep_dir, ids)
    todo = set(sw.select(statuses, False, 1))
    text = render(summary(state, cells))
    if nxt:
        text += "\nnext round:\n" + sw.table(nxt, statuses, todo, rm, launcher, 0)
    print(text, file=out)
    return GuidedResult(
        sweep_dir,
        tuple(by_id.values()),
        status.counts(statuses),
        (),
        (),
        0,
        (),
        launcher,
        text,
        state.done,
        tuple(summary(state, cells)),
        0,
    )
