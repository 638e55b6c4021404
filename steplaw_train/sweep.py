"""`python -m steplaw_train.sweep +grid=NAME [launcher=local|slurm|debug] [dry_run=true] ...`

Expand the grid, validate every spec (and build megatron's config for every model shape) before
anything runs, skip what is finished or queued,
print a dry-run table, record the sweep (resolved config, manifest, runs/<run_id>/spec.json) and
hand the rest to launch/. `main` is a thin Hydra shell over `sweep(cfg)`, which tests call with a
composed config. Which runs go out:
  pending / preempted           always (a preempted run resumes; it is not a failure)
  failed                        while the run has had <= max_retries attempts
  failed                        always with retry_failed=true
  done / diverged / queued / running   never
With `search=guided` the grid's points go out a few at a time instead (steplaw_train/guided.py).
"""

from __future__ import annotations

import json
import sys
import time
from collections import defaultdict
from collections.abc import Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

from omegaconf import DictConfig, OmegaConf

from launch import executors, status
from launch.resources import ResourceModel, device_hours, resource_class, resource_model
from steplaw_train import config as cfgmod
from steplaw_train import grid as gridmod
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


def expand_from_cfg(cfg: Any, overrides: Sequence[str] = ()) -> list[RunSpec]:
    """The grid's RunSpecs (validated), or the single run the base config describes.

    `overrides` are the command line's; one a grid axis would silently replace is refused.
    """
    g = cfg.get("grid")
    if g is None:
        raise SpecError("grid", "no grid given; use +grid=NAME (see configs/grid/)")
    plain = OmegaConf.to_container(g, resolve=True) if isinstance(g, DictConfig) else g
    gridmod.check_overrides(plain, overrides)
    base_model = OmegaConf.to_container(cfg.model, resolve=True) if "model" in cfg else None
    base_data = OmegaConf.to_container(cfg.data, resolve=True) if "data" in cfg else None
    base_train = OmegaConf.to_container(cfg.train, resolve=True)
    mbs = cfg.options.get("micro_batch_size") if "options" in cfg else None
    return gridmod.expand(plain, base_model, base_data, base_train, micro_batch_size=mbs)


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

    for data in {s.data for s in specs}:
        check(data, options.data_root)


def check_models(specs: Sequence[RunSpec]) -> int:
    """Build megatron's TransformerConfig once per distinct model shape (dry run included):
    megatron validates many settings only at construction, and a preset it rejects must fail
    here, not in every job after its queue wait. Returns the number of shapes built."""
    from steplaw_train.model import check_buildable

    models = {s.model for s in specs}
    for model in sorted(models, key=lambda m: m.name):
        check_buildable(model)
    return len(models)


def table(
    specs: Sequence[RunSpec],
    statuses: Sequence[status.RunStatus],
    todo: set[str],
    rm: ResourceModel,
    launcher: str,
    batch_calls: int,
) -> str:
    """Dry-run table: one row per (model, recipe, D) cell."""
    state = {s.run_id: s.state for s in statuses}
    rows: dict[tuple, dict[str, Any]] = defaultdict(lambda: defaultdict(int))
    classes: dict[tuple, set[str]] = defaultdict(set)
    for spec in specs:
        key = gridmod.cell_key(spec)
        r, st = rows[key], state[spec.run_id]
        r["runs"] += 1
        r["submit"] += spec.run_id in todo
        r["finished"] += st in ("done", "diverged")
        r["queued"] += st in ("queued", "running")
        r["failed"] += st in ("failed", "preempted")
        r["hours"] += device_hours(spec, rm)
        classes[key].add(resource_class(spec, rm).label())
    unit = "GPU-h" if rm.gpus_per_node else "CPU-h"
    head = (
        f"{'model':<18} {'recipe':<18} {'D':>9} {'runs':>5} {'submit':>6} {'finished':>8} "
        f"{'queued':>6} {'failed':>6} {unit:>9}  resources"
    )
    lines = [head, "-" * len(head)]
    for (model, recipe, D), r in sorted(
        rows.items(), key=lambda kv: (kv[0][0], kv[0][1], kv[0][2])
    ):
        lines.append(
            f"{model:<18} {recipe:<18} {D:>9.3g} {r['runs']:>5} {r['submit']:>6} "
            f"{r['finished']:>8} {r['queued']:>6} {r['failed']:>6} {r['hours']:>9.3g}  "
            f"{','.join(sorted(classes[(model, recipe, D)]))}"
        )
    total = sum(r["hours"] for r in rows.values())
    todo_h = sum(device_hours(s, rm) for s in specs if s.run_id in todo)
    lines.append(
        f"{len(specs)} runs in {len(rows)} cells; {len(todo)} to submit via {launcher} "
        f"({batch_calls} sbatch calls); {unit} total {total:.4g}, to submit {todo_h:.4g} "
        f"(MFU {rm.mfu}, {rm.peak_tflops} TFLOP/s peak)"
    )
    return "\n".join(lines)


def _options(cfg: Any, grid_name: str) -> RunOptions:
    options = cfgmod.options_from_cfg(cfg.get("options"))
    validate_options(options)
    return replace(options, wandb_group=options.wandb_group or grid_name)


def record_sweep(sweep_dir: Path, cfg: Any, specs: Sequence[RunSpec]) -> None:
    sweep_dir.mkdir(parents=True, exist_ok=True)
    (sweep_dir / ".config.yaml.tmp").write_text(OmegaConf.to_yaml(cfg, resolve=True))
    (sweep_dir / ".config.yaml.tmp").replace(sweep_dir / "config.yaml")
    executors.write_json_atomic(
        sweep_dir / "manifest.json",
        {
            "grid": cfg.grid.get("name"),
            "updated": time.time(),
            "run_ids": [s.run_id for s in specs],
        },
    )
    for spec in specs:
        path = sweep_dir / "runs" / spec.run_id / "spec.json"
        if not path.exists():
            executors.write_json_atomic(path, {"spec": spec.to_dict(), "derived": spec.derived()})


def append_submission(sweep_dir: Path, entry: dict[str, Any]) -> None:
    with open(sweep_dir / "submissions.jsonl", "a") as f:
        f.write(json.dumps(entry) + "\n")


def check_sweep_fields(cfg: Any) -> None:
    """The sweep's own top-level fields, before anything is read or written."""
    from steplaw_train.spec import check_int

    check_int("max_retries", cfg.get("max_retries", 1), 0)
    for key in ("dry_run", "retry_failed"):
        if not isinstance(cfg.get(key, False), bool):
            raise SpecError(key, f"must be true or false, got {cfg.get(key)!r}")
    if not str(cfg.get("sweep_dir") or "").strip():
        raise SpecError("sweep_dir", "must be a directory path (default: sweeps/<grid.name>)")


def sweep(cfg: Any, out=sys.stdout, overrides: Sequence[str] = ()) -> SweepResult:
    """Expand → validate → (dry-run table) → record → submit. Returns what it did."""
    check_sweep_fields(cfg)
    specs = expand_from_cfg(cfg, overrides)
    grid_name = str(cfg.grid.get("name", "grid"))
    options = _options(cfg, grid_name)
    rm = resource_model(cfg.get("resources"))
    lc = OmegaConf.to_container(cfg.launcher, resolve=True) if "launcher" in cfg else {}
    executors.check_launcher(lc)
    launcher = executors.resolve_launcher(str(lc.get("name", "auto")))
    sweep_dir = Path(str(cfg.sweep_dir)).expanduser().resolve()
    print(f"megatron configs built for {check_models(specs)} model shape(s)", file=out)
    if str((cfg.get("search") or {}).get("name", "full")) != "full":  # search=guided
        from steplaw_train import guided

        return guided.run(cfg, specs, sweep_dir, options, lc, launcher, rm, out)
    statuses = status.sweep_states(sweep_dir, [s.run_id for s in specs])
    todo_ids = select(
        statuses, bool(cfg.get("retry_failed", False)), int(cfg.get("max_retries", 1))
    )
    todo = [s for s in specs if s.run_id in set(todo_ids)]
    max_array = int(lc.get("max_array_size") or 1001)
    calls = (
        len(executors.plan_arrays(todo, rm, max_array, options.micro_batch_size))
        if launcher == "slurm"
        else 0
    )
    text = table(specs, statuses, set(todo_ids), rm, launcher, calls)
    print(text, file=out)
    before = status.counts(statuses)
    if cfg.get("dry_run", False):
        return SweepResult(sweep_dir, tuple(specs), before, (), (), 0, (), launcher, text)
    check_data(todo, options)
    record_sweep(sweep_dir, cfg, specs)
    sub = executors.submit(launcher, todo, sweep_dir, options, lc, rm)
    append_submission(
        sweep_dir,
        {
            "time": time.time(),
            "launcher": launcher,
            "submitted": len(todo),
            "run_ids": [s.run_id for s in todo],
            "job_ids": list(sub.job_ids),
            "batch_calls": sub.batch_calls,
        },
    )
    print(
        f"submitted {len(todo)} runs ({sub.batch_calls} job arrays) to {launcher}; "
        f"sweep dir {sweep_dir}",
        file=out,
    )
    return SweepResult(
        sweep_dir,
        tuple(specs),
        before,
        tuple(s.run_id for s in todo),
        sub.job_ids,
        sub.batch_calls,
        sub.failed,
        launcher,
        text,
    )


def main() -> None:
    import hydra

    @hydra.main(config_path=str(cfgmod.config_dir()), config_name="sweep", version_base="1.3")
    def _main(cfg: DictConfig) -> None:
        from hydra.core.hydra_config import HydraConfig

        try:
            result = sweep(cfg, overrides=list(HydraConfig.get().overrides.task))
        except (SpecError, status.SchedulerUnavailable) as e:
            print(f"error: {e}", file=sys.stderr)
            sys.exit(2)
        if result.failed:
            sys.exit(1)

    _main()


if __name__ == "__main__":
    main()
