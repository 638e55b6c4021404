"""`python -m steplaw_train.sweep +grid=NAME [launcher=local|slurm|debug] [dry_run=true] ...`

Expand the grid, validate every spec before anything runs, skip what is finished or queued,
print a dry-run table, record the sweep (resolved config, manifest, runs/<run_id>/spec.json) and
hand the rest to the launcher. `main` is a thin Hydra shell over `sweep(cfg)`, which tests call
with a composed config. Which runs go out: see sweep/common.py. With `search=guided` the grid's
points go out a few at a time instead (sweep/guided.py). One submitting invocation per sweep dir
at a time: a second one is refused with the holder's pid (rundir.sweep_owned).
"""

from __future__ import annotations

import sys
from collections.abc import Sequence
from dataclasses import replace
from typing import Any

from omegaconf import DictConfig

from launch import status, usage
from steplaw_train import config as config_mod
from steplaw_train import rundir
from steplaw_train.keys import check_keys
from steplaw_train.locks import LockUnsupported
from steplaw_train.spec import SpecError
from steplaw_train.sweep import guided
from steplaw_train.sweep.common import (
    SweepResult,
    check_data,
    code_line,
    disk_line,
    dry_run_data,
    plain,
    record_submission,
    record_sweep,
    select,
    setup_from_cfg,
    table,
    write_dry_run_files,
)


def sweep(cfg: Any, out=sys.stdout, overrides: Sequence[str] = ()) -> SweepResult:
    """Expand → validate → (dry-run table) → record → submit. Returns what it did.

    `overrides` are the command line's (a grid axis's field overridden there is refused)."""
    setup = setup_from_cfg(cfg, overrides)
    print(f"megatron configs built for {setup.model_shapes} model shape(s)", file=out)
    print(code_line(setup), file=out)
    search = plain(cfg.get("search"))
    if str(search.get("name", "full")) != "full":  # search=guided
        result = guided.run(cfg, setup, out)
        if setup.dry_run:  # the guided sweep checks every grid recipe before its first round
            return replace(result, data_problem=dry_run_data(setup, setup.specs, out))
        return result
    check_keys(search, ("name",), "search")  # the full search has no knobs
    if setup.dry_run:
        return _submit(cfg, setup, out)
    with rundir.sweep_owned(setup.sweep_dir):
        return _submit(cfg, setup, out)


def _submit(cfg: Any, setup, out) -> SweepResult:
    specs, launcher = setup.specs, setup.launcher
    statuses = status.sweep_states(setup.sweep_dir, [s.run_id for s in specs], setup.runs_root)
    todo_ids = select(statuses, setup.retry_failed, setup.max_retries)
    todo_set = set(todo_ids)  # once: a set per spec made planning quadratic in the grid
    todo = [s for s in specs if s.run_id in todo_set]
    calls = launcher.plan(todo)
    cal = usage.calibration_from_dir(setup.sweep_dir, setup.resources)
    text = table(specs, statuses, todo_set, setup.resources, launcher.name, calls, cal)
    text += "\n" + disk_line(setup, todo, calls)
    print(text, file=out)
    result = SweepResult(
        sweep_dir=setup.sweep_dir,
        specs=specs,
        before=status.counts(statuses),
        submitted=(),
        job_ids=(),
        batch_calls=0,
        failed=(),
        launcher=launcher.name,
        table=text,
    )
    if setup.dry_run:
        write_dry_run_files(cfg, setup, statuses, todo, out, cal)
        return replace(result, data_problem=dry_run_data(setup, todo, out))
    if setup.check_data:
        check_data(todo, setup.options)
    record_sweep(setup.sweep_dir, cfg, specs, setup.runs_root)
    sub = launcher.submit(todo)
    record_submission(setup, sub.run_ids, sub, cfg)
    skipped = f", {len(sub.skipped)} skipped (taken elsewhere)" if sub.skipped else ""
    print(
        f"submitted {len(sub.run_ids)} runs ({sub.batch_calls} job arrays) to {launcher.name}"
        f"{skipped}; sweep dir {setup.sweep_dir}",
        file=out,
    )
    return replace(
        result,
        submitted=sub.run_ids,
        job_ids=sub.job_ids,
        batch_calls=sub.batch_calls,
        failed=sub.failed,
    )


def main() -> None:
    import hydra

    @hydra.main(config_path=str(config_mod.config_dir()), config_name="sweep", version_base="1.3")
    def _main(cfg: DictConfig) -> None:
        from hydra.core.hydra_config import HydraConfig

        try:
            result = sweep(cfg, overrides=list(HydraConfig.get().overrides.task))
        except (SpecError, status.SchedulerUnavailable, LockUnsupported) as e:
            print(f"error: {e}", file=sys.stderr)
            sys.exit(2)
        if result.data_problem:  # a dry run whose submission would stop on the data
            print(f"error: {result.data_problem}", file=sys.stderr)
            sys.exit(2)
        if result.failed:
            sys.exit(1)

    _main()


if __name__ == "__main__":
    main()
