"""What the full and the guided sweep share: the sweep's setup, which runs go out, the dry-run
table and the sweep directory's records.

Every spec is validated, and megatron's config built for every model shape, before anything
runs. Which runs go out (`select`):
  pending / preempted           always (a preempted run resumes; it is not a failure)
  failed                        while the run has had <= max_retries attempts
  failed                        always with retry_failed=true
  done / diverged / queued / running   never
  cancelled                     never (`python -m steplaw_train.sweep.cancel --undo` brings it back)

Runs live in the run store (`runs_root`, default `<sweep_dir>/../runs`: beside the sweep dirs), one
directory per run_id; the sweep dir references each as a relative symlink `runs/<run_id>`. A run
another sweep finished, queued or is training is therefore seen as such here and not trained
again (the launcher re-checks under the store's claim lock right before submitting).
"""

from __future__ import annotations

import os
import shutil
import time
from collections import defaultdict
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

from omegaconf import DictConfig, OmegaConf

from launch import disk, executors, status, usage
from launch.resources import ResourceModel, resource_class, resource_model
from steplaw_train import config as config_mod
from steplaw_train import grid as grid_mod
from steplaw_train import provenance, rundir
from steplaw_train.cells import cell_key
from steplaw_train.options import RunOptions, validate_options
from steplaw_train.spec import RunSpec, SpecError


@dataclass(frozen=True)
class SweepResult:
    sweep_dir: Path
    specs: tuple[RunSpec, ...]
    before: dict[str, int]  # state counts before submitting
    submitted: tuple[str, ...]  # run_ids handed to the launcher
    job_ids: tuple[str, ...]
    batch_calls: int  # sbatch calls (one per job array)
    failed: tuple[str, ...]  # local/debug runs that raised
    launcher: str
    table: str
    # a dry run's data check: the SpecError line a submission would stop on (the CLI exits 2)
    data_problem: str | None = field(default=None, kw_only=True)


@dataclass(frozen=True)
class Setup:
    """A sweep invocation's inputs, validated once: the specs, where they go and how."""

    specs: tuple[RunSpec, ...]
    sweep_dir: Path
    options: RunOptions
    resources: ResourceModel
    launcher: executors.Launcher
    retry_failed: bool
    max_retries: int
    dry_run: bool
    model_shapes: int = 0  # distinct models whose megatron config was built (check_models)
    runs_root: Path | None = None  # the run store (None: the sweep's own runs/)
    check_data: bool = True  # check the recipes' datasets before submitting (and in a dry run)
    overrides: tuple[str, ...] = ()  # the command line's, recorded with each submission
    code: provenance.CodeState | None = None  # the submitting checkout's state
    provenance: Mapping[str, Any] = field(default_factory=dict)  # its record (+ packages)
    allow_dirty: bool = False


def plain(section: Any) -> dict[str, Any]:
    if section is None:
        return {}
    if isinstance(section, DictConfig):
        return OmegaConf.to_container(section, resolve=True)  # type: ignore[return-value]
    return dict(section)


def plain_list(value: Any) -> Any:
    """A ListConfig as a list (other values as they are)."""
    from omegaconf import ListConfig

    return list(OmegaConf.to_container(value)) if isinstance(value, ListConfig) else value


def expand_from_cfg(cfg: Any, overrides: Sequence[str] = ()) -> list[RunSpec]:
    """The grid's RunSpecs (validated), or the single run the base config describes.

    `overrides` are the command line's; one a grid axis would silently replace is refused.
    """
    g = cfg.get("grid")
    if g is None:
        raise SpecError("grid", "no grid given; use +grid=NAME (see configs/grid/)")
    grid_mod.check_overrides(plain(g), overrides)
    base_model = plain(cfg.model) if "model" in cfg else None
    base_data = plain(cfg.data) if "data" in cfg else None
    mbs = cfg.options.get("micro_batch_size") if "options" in cfg else None
    return grid_mod.expand(plain(g), base_model, base_data, plain(cfg.train), micro_batch_size=mbs)


def write_dry_run_files(
    cfg: Any,
    setup: Setup,
    statuses: Sequence[status.RunStatus],
    todo: Sequence[RunSpec],
    out: Any,
    calibration: usage.Calibration | None = None,
) -> None:
    """`dry_run_list=PATH` (.csv/.json): every run; `dry_run_sbatch=DIR`: the scripts of the job
    arrays the submission would make; `dry_run_show=K|run_id(s)`: those runs fully resolved, as
    their jobs would get them (launch/dryrun.py)."""
    from launch import dryrun

    rm = setup.resources
    if cfg.get("dry_run_show") is not None:
        chosen = dryrun.show_selection(plain_list(cfg.dry_run_show), setup.specs)
        states = {s.run_id: s.state for s in statuses}
        cal = calibration or usage.calibration_from_dir(setup.sweep_dir, rm)
        print(dryrun.show_runs(chosen, setup.specs, states, setup.launcher, cal), file=out)
    if cfg.get("dry_run_list"):
        states = {s.run_id: s.state for s in statuses}
        path = Path(str(cfg.dry_run_list)).expanduser()
        dryrun.write_rows(dryrun.run_rows(setup.specs, states, rm), path)
        print(f"{len(setup.specs)} runs listed in {path}", file=out)
    if cfg.get("dry_run_sbatch"):
        lc = asdict(setup.launcher.settings)
        max_array = int(lc.get("max_array_size") or 1001)
        chunks = executors.plan_arrays(todo, rm, max_array, setup.options.micro_batch_size)
        where = Path(str(cfg.dry_run_sbatch)).expanduser()
        name = f"steplaw_{setup.sweep_dir.name}"
        code = None
        if setup.code is not None:  # the snapshot a submission would make now (not made here)
            snap = setup.sweep_dir / rundir.CODE / setup.code.key
            code = (snap, executors.snapshot_pythonpath(snap, provenance.code_root()))
        logs = setup.sweep_dir / "logs"
        paths = dryrun.write_scripts(chunks, lc, logs, name, where, code)
        print(f"{len(paths)} sbatch scripts (one per job array) in {where}", file=out)


def disk_line(setup: Setup, todo: Sequence[RunSpec], batch_calls: int) -> str:
    """The checkpoints' disk at the end (every run's final save) and at the peak (the runs in
    flight training with their step checkpoints on top): launch/disk.py."""
    settings = setup.launcher.settings
    if setup.launcher.name == "slurm":
        in_flight = int(settings.array_parallelism) * batch_calls
    else:
        in_flight = int(getattr(settings, "parallelism", 1))
    room = disk.sweep_disk(
        setup.specs,
        todo,
        setup.options.keep_checkpoints,
        in_flight,
        setup.resources.gpus_per_node > 0,
        setup.options.final_checkpoint,
        setup.options.prune_checkpoints,
    )
    return room.describe()


DRY_RUN_OUTPUTS = ("dry_run_list", "dry_run_sbatch", "dry_run_show")


def check_sweep_fields(cfg: Any) -> None:
    """The sweep's own top-level fields, before anything is read or written."""
    from steplaw_train.spec import check_int

    check_int("max_retries", cfg.get("max_retries", 1), 0)
    for key in ("dry_run", "retry_failed", "check_data", "allow_dirty"):
        if not isinstance(cfg.get(key, False), bool):
            raise SpecError(key, f"must be true or false, got {cfg.get(key)!r}")
    for key in DRY_RUN_OUTPUTS:  # asked for, it would be ignored by a submission
        if cfg.get(key) is not None and not cfg.get("dry_run", False):
            raise SpecError(key, "is a dry-run output; add dry_run=true (nothing is submitted)")
    if not str(cfg.get("sweep_dir") or "").strip():
        raise SpecError("sweep_dir", "must be a directory path (default: sweeps/<grid.name>)")
    if not str(cfg.get("runs_root") or "").strip():
        raise SpecError(
            "runs_root", "must be a directory path (default: ${sweep_dir}/../runs, the run store)"
        )


def check_runs_root(sweep_dir: Path, runs_root: Path) -> None:
    """The store and the sweep dir must not contain one another, except the sweep's own runs/
    (`runs_root=<sweep_dir>/runs`: no sharing, the layout before the store). A grid named like
    the store (`runs`) would otherwise make its sweep dir the store itself."""
    own = sweep_dir / rundir.RUNS
    if runs_root == own:
        return
    if runs_root == sweep_dir or sweep_dir.is_relative_to(runs_root):
        raise SpecError(
            "sweep_dir",
            f"{sweep_dir} is inside the run store {runs_root}; give the sweep another sweep_dir "
            "(or grid name), or set runs_root",
        )
    if runs_root.is_relative_to(sweep_dir):
        raise SpecError(
            "runs_root",
            f"{runs_root} is inside the sweep dir {sweep_dir}; allowed: outside it, or exactly "
            f"{own} (this sweep's own runs, shared with no other sweep)",
        )


def check_sweep_dir_grid(sweep_dir: Path, grid_name: str) -> None:
    """A sweep dir belongs to one grid: another grid's manifest would be replaced (its runs
    dropped from status and the analysis's view of the sweep), so refuse before writing. The
    same grid may change its axes (the manifest follows it; finished runs are kept)."""
    manifest = rundir.read_manifest(sweep_dir)
    if manifest is not None and manifest.get("grid") not in (None, grid_name):
        raise SpecError(
            "sweep_dir",
            f"{sweep_dir} holds grid {manifest['grid']!r}, not {grid_name!r}; "
            "give this grid its own sweep_dir",
        )


def setup_from_cfg(cfg: Any, overrides: Sequence[str] = ()) -> Setup:
    """Expand and validate everything a sweep needs before it touches the sweep dir."""
    check_sweep_fields(cfg)
    code, prov = check_code(cfg)
    check_slurm_here(cfg)
    specs = expand_from_cfg(cfg, overrides)
    grid_name = str(cfg.grid.get("name", "grid"))
    options = config_mod.options_from_cfg(cfg.get("options"))
    validate_options(options)
    options = replace(options, wandb_group=options.wandb_group or grid_name)
    resources = resource_model(cfg.get("resources"))
    sweep_dir = Path(str(cfg.sweep_dir)).expanduser().resolve()
    runs_root = Path(str(cfg.runs_root)).expanduser().resolve()
    check_runs_root(sweep_dir, runs_root)
    check_sweep_dir_grid(sweep_dir, grid_name)
    allow_dirty = bool(cfg.get("allow_dirty", False))
    launcher = executors.build_launcher(
        plain(cfg.get("launcher")),
        sweep_dir,
        options,
        resources,
        runs_root=runs_root,
        allow_dirty=allow_dirty,
    )
    resources = launcher.resources  # capped at the cluster's time limit (SLURM)
    shapes = check_models(specs)
    return Setup(
        specs=tuple(specs),
        sweep_dir=sweep_dir,
        options=options,
        resources=resources,
        launcher=launcher,
        retry_failed=bool(cfg.get("retry_failed", False)),
        max_retries=int(cfg.get("max_retries", 1)),
        dry_run=bool(cfg.get("dry_run", False)),
        model_shapes=shapes,
        runs_root=runs_root,
        check_data=bool(cfg.get("check_data", True)),
        overrides=tuple(str(o) for o in overrides),
        code=code,
        provenance=prov,
        allow_dirty=allow_dirty,
    )


def submits_to_slurm(cfg: Any) -> bool:
    """Whether this invocation submits to SLURM (launcher slurm, or auto on a login node; not a
    dry run): what the checks before any write below apply to."""
    name = executors.resolve_launcher(str(plain(cfg.get("launcher")).get("name", "auto")))
    return name == "slurm" and not cfg.get("dry_run", False)


def check_code(cfg: Any) -> tuple[provenance.CodeState, dict[str, Any]]:
    """The submitting checkout's provenance; a SLURM submission (not a dry run) from a dirty
    tree is refused here, before the cluster is asked anything or a file is written, unless
    `allow_dirty=true` (its jobs would run code no commit holds)."""
    code, prov = provenance.checkout_provenance()
    if submits_to_slurm(cfg):
        provenance.check_clean(code, bool(cfg.get("allow_dirty", False)))
    return code, prov


def check_slurm_here(cfg: Any) -> None:
    """A SLURM submission (not a dry run) from a machine without SLURM's commands is refused
    here, before a file is written: submitit would fail only after the sweep dir, the code
    snapshot and every run's spec were recorded, with its own traceback. It needs `sbatch` to
    submit and `srun` (its check that this is a cluster, and each job's launch). The dry run
    renders the scripts anywhere."""
    if not submits_to_slurm(cfg):
        return
    missing = [c for c in ("sbatch", "srun") if shutil.which(c) is None]
    if missing:
        raise SpecError(
            "launcher.name",
            f"slurm, but {' and '.join(missing)} not on PATH here (not a SLURM login node?); "
            "allowed here: local, debug, or dry_run=true to write the sbatch scripts",
        )


def code_line(setup: Setup) -> str:
    """The sweep output's line about the code: commit, clean or not; what a dirty tree means
    for this launcher (SLURM refuses it unless allow_dirty; local/debug run it as it is)."""
    if setup.code is None:
        return "code: unknown"
    line = setup.code.describe()
    if setup.code.dirty and setup.launcher.name == "slurm":
        line += (
            "; allow_dirty=true: submitted as it is"
            if setup.allow_dirty
            else "; a submission would be refused (commit, or allow_dirty=true)"
        )
    return line


def check_models(specs: Sequence[RunSpec]) -> int:
    """Build megatron's TransformerConfig once per distinct model shape (dry run included):
    megatron validates many settings only at construction, and a preset it rejects must fail
    here, not in every job after its queue wait. Returns the number of shapes built."""
    from steplaw_train.model import check_buildable

    models = {s.model for s in specs}
    for model in sorted(models, key=lambda m: m.name):
        check_buildable(model)
    return len(models)


def select(statuses: Sequence[status.RunStatus], retry_failed: bool, max_retries: int) -> list[str]:
    """run_ids to submit now (see the module docstring).

    Preempted runs always go out again: they resume from their checkpoints, and being preempted
    is not a failure, so it does not count against max_retries.
    """
    out = []
    for s in statuses:
        again = s.state == "failed" and (s.attempts <= max_retries or retry_failed)
        if s.state in ("pending", "preempted") or again:
            out.append(s.run_id)
    return out


def check_data(specs: Sequence[RunSpec], options: RunOptions) -> None:
    """Validate each recipe's dataset files before anything is submitted."""
    from steplaw_train.data import check_data as check

    for data in sorted({s.data for s in specs}, key=lambda d: d.recipe):
        check(data, options.data_root)


def dry_run_data(setup: Setup, specs: Sequence[RunSpec], out: Any) -> str | None:
    """The dry run's data check, after its table: one line saying the datasets are there, or
    the problem a submission would stop on (returned; the CLI then exits 2). `check_data=false`
    skips it, in the dry run and the submission alike, for clusters whose data is mounted only
    on the compute nodes."""
    if not setup.check_data:
        print("data: not checked (check_data=false)", file=out)
        return None
    recipes = sorted({s.data.recipe for s in specs})
    try:
        check_data(specs, setup.options)
    except SpecError as e:
        print(
            f"data: PROBLEM {e} — a submission would be refused (check_data=false skips the "
            "check where the data is mounted only on the compute nodes)",
            file=out,
        )
        return str(e)
    print(
        f"data: {len(recipes)} recipe(s) ready under {setup.options.data_root} "
        f"({', '.join(recipes) or 'nothing to submit'})",
        file=out,
    )
    return None


def table(
    specs: Sequence[RunSpec],
    statuses: Sequence[status.RunStatus],
    todo: set[str],
    rm: ResourceModel,
    launcher: str,
    batch_calls: int,
    calibration: usage.Calibration | None = None,
) -> str:
    """Dry-run table: one row per (model, recipe, D) cell.

    Device-hours are at the MFU that finished runs measured (launch/usage.py; the assumed
    `resources.mfu` where none did), with a 90% range; the resource classes (walltimes) stay at
    the assumed MFU, so what is submitted does not move with the calibration."""
    cal = calibration or usage.calibrate(
        (), rm.mfu, rm.mfu_prior_sd, "GPU" if rm.gpus_per_node else "CPU"
    )
    state = {s.run_id: s.state for s in statuses}
    rows: dict[tuple, dict[str, Any]] = defaultdict(lambda: defaultdict(float))
    classes: dict[tuple, set[str]] = defaultdict(set)
    mfus: dict[tuple, set[str]] = defaultdict(set)
    shown: dict[Any, str] = {}
    todo_h = [0.0, 0.0, 0.0]
    for spec in specs:
        key = cell_key(spec)
        r, st = rows[key], state[spec.run_id]
        r["runs"] += 1
        r["submit"] += spec.run_id in todo
        r["finished"] += st in ("done", "diverged")
        r["queued"] += st in ("queued", "running")
        r["failed"] += st in ("failed", "preempted")
        hours = cal.hours(spec, rm)
        r["hours"] += hours[0]
        r["low"] += hours[1]
        r["high"] += hours[2]
        if spec.run_id in todo:
            todo_h = [a + b for a, b in zip(todo_h, hours, strict=True)]
        classes[key].add(resource_class(spec, rm).label())
        if spec.model not in shown:  # once per model: a grid repeats it for every point
            e = cal.estimate(spec.model)
            shown[spec.model] = f"{e.mfu:.2g}({e.runs})"
        mfus[key].add(shown[spec.model])
    unit = "GPU-h" if rm.gpus_per_node else "CPU-h"
    head = (
        f"{'model':<18} {'recipe':<18} {'D':>9} {'runs':>5} {'submit':>6} {'finished':>8} "
        f"{'queued':>6} {'failed':>6} {unit:>9} {'90% range':>15} {'MFU(n)':>9}  resources"
    )
    lines = [head, "-" * len(head)]
    for (model, recipe, D), r in sorted(
        rows.items(), key=lambda kv: (kv[0][0], kv[0][1], kv[0][2])
    ):
        span = f"{r['low']:.2g}-{r['high']:.2g}"
        lines.append(
            f"{model:<18} {recipe:<18} {D:>9.3g} {int(r['runs']):>5} {int(r['submit']):>6} "
            f"{int(r['finished']):>8} {int(r['queued']):>6} {int(r['failed']):>6} "
            f"{r['hours']:>9.3g} {span:>15} {','.join(sorted(mfus[(model, recipe, D)])):>9}  "
            f"{','.join(sorted(classes[(model, recipe, D)]))}"
        )
    total = [sum(r[k] for r in rows.values()) for k in ("hours", "low", "high")]
    lines.append(
        f"{len(specs)} runs in {len(rows)} cells; {len(todo)} to submit via {launcher} "
        f"({batch_calls} sbatch calls); {unit} total {total[0]:.4g} ({total[1]:.3g}-"
        f"{total[2]:.3g}), to submit {todo_h[0]:.4g} ({todo_h[1]:.3g}-{todo_h[2]:.3g}) at "
        f"{rm.peak_tflops} TFLOP/s peak; {cal.describe()}"
    )
    cancelled = sum(state[s.run_id] == "cancelled" for s in specs)
    if cancelled:
        lines.append(
            f"{cancelled} runs cancelled, not submitted (python -m steplaw_train.sweep.cancel "
            "SWEEP_DIR --undo ... brings them back; they resume from their checkpoints)"
        )
    return "\n".join(lines)


def record_sweep(
    sweep_dir: Path, cfg: Any, specs: Sequence[RunSpec], runs_root: Path | None = None
) -> None:
    """The resolved config, the manifest, each run's link into the store (rundir.link_run) and
    each new run's spec.json (kept if present: the trainer's has more). config.yaml is the
    latest; a copy per distinct config is never overwritten (rundir.write_config)."""
    runs_root = Path(runs_root) if runs_root is not None else sweep_dir / rundir.RUNS
    sweep_dir.mkdir(parents=True, exist_ok=True)
    rundir.write_config(sweep_dir, resolved_config(cfg))
    rundir.write_manifest(
        sweep_dir,
        {
            "grid": cfg.grid.get("name"),
            "updated": time.time(),
            "run_ids": [s.run_id for s in specs],
            "runs_root": os.path.relpath(runs_root, sweep_dir),
        },
    )
    if rundir.uses_store(sweep_dir, runs_root):
        rundir.register_sweep(runs_root, sweep_dir)
    for spec in specs:
        path = rundir.link_run(sweep_dir, runs_root, spec.run_id)
        if not rundir.is_run_dir(path):
            rundir.write_spec(path, spec)


def submitted_provenance(setup: Setup, sub: executors.Submitted) -> dict[str, Any]:
    """The checkout's provenance as recorded at setup, or as its snapshot says when the tree
    changed between the two (the snapshot is what the jobs run)."""
    prov = dict(setup.provenance)
    snap = provenance.read_snapshot_state(Path(sub.code)) if sub.code is not None else None
    if snap is not None and snap.key != prov.get("key"):
        prov.update(replace(snap, source="git").to_dict())
    return prov


def resolved_config(cfg: Any) -> str:
    return OmegaConf.to_yaml(cfg, resolve=True)


def record_submission(
    setup: Setup,
    run_ids: Sequence[str],
    sub: executors.Submitted,
    cfg: Any = None,
    **extra: Any,
) -> None:
    """One line of submissions.jsonl per submitting call (status reads the last one): what went
    out, the command line's overrides, the resolved config's copy (`cfg`), the submitting
    checkout's provenance and the snapshot the jobs run (SLURM; local/debug run the checkout)."""
    rundir.append_submission(
        setup.sweep_dir,
        {
            "time": time.time(),
            "launcher": setup.launcher.name,
            **extra,
            "submitted": len(run_ids),
            "run_ids": list(run_ids),
            "job_ids": list(sub.job_ids),
            "batch_calls": sub.batch_calls,
            "overrides": list(setup.overrides),
            "config": rundir.config_copy(resolved_config(cfg)) if cfg is not None else None,
            "provenance": submitted_provenance(setup, sub),
            "code": str(sub.code) if sub.code is not None else None,
        },
    )
