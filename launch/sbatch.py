"""The sbatch script of one planned job array, rendered by submitit exactly as it would submit it.

Used to look before spending (the dry run can write them) and by the tests that hand these very
scripts to a real slurmctld (`sbatch --test-only`). Rendering needs no cluster, not even `srun`
on PATH: a dry run of a GPU grid on a laptop shows the scripts the cluster will get.
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any

import submitit

from launch.executors import ArrayChunk, run_in_snapshot, slurm_parameters

# what submitit puts after `srun ... python -u -m submitit.core._submit` (the pickles' folder)
COMMAND = "python -u -m submitit.core._submit"


class _ScriptOnly(submitit.SlurmExecutor):
    """submitit's SlurmExecutor, for its script text only. submitit refuses to build one where
    `srun` is not on PATH (it could not submit there); rendering runs nothing, so that check
    does not apply. Nothing here submits."""

    @classmethod
    def affinity(cls) -> int:
        return 1


def script(params: Mapping[str, Any], logs: Path, name: str, tasks: int, command: str) -> str:
    """The sbatch text submitit writes for a `tasks`-task array of `command` under `logs`, from
    AutoExecutor parameters (shared names and `slurm_`-prefixed ones, as `slurm_parameters`
    makes them and the submission passes them to `AutoExecutor.update_parameters`).

    They are translated here as AutoExecutor translates them (a `slurm_` name wins over the
    shared one; shared names take SlurmExecutor's own) because AutoExecutor cannot be built
    without `srun`; tests/test_slurm_multinode.py checks, where srun exists, that the text is
    the one AutoExecutor renders for every job array of the paper grids."""
    shared_names = submitit.AutoExecutor._valid_parameters()
    given = {k: v for k, v in params.items() if v is not None}
    own = {k.removeprefix("slurm_"): v for k, v in given.items() if k.startswith("slurm_")}
    shared = {k: v for k, v in given.items() if k in shared_names}
    shared.update({k: v for k, v in own.items() if k in shared_names})
    shared["name"] = name
    ex = _ScriptOnly(folder=logs)
    native = ex._convert_parameters(shared)
    native.update({k: v for k, v in own.items() if k not in shared_names})
    ex.update_parameters(**native)
    ex.parameters["map_count"] = tasks  # what map_array sets
    return ex._make_submission_file_text(command, "UID")


def render(
    chunk: ArrayChunk,
    lc: Mapping[str, Any],
    logs: Path,
    name: str,
    code: tuple[Path, str] | None = None,
) -> str:
    """The sbatch script for `chunk` (an array of len(chunk.run_ids) tasks) under `logs`;
    `code` = (snapshot dir, PYTHONPATH) adds the lines that make the job run that snapshot
    (executors.run_in_snapshot), as a submission does."""
    params = slurm_parameters(chunk.resources, lc)
    if code is not None:
        params = run_in_snapshot(params, *code)
    return script(params, logs, name, len(chunk.run_ids), f"{COMMAND} {logs}")


def file_name(chunk: ArrayChunk, index: int) -> str:
    """A stable, readable file name: position in the plan and resource class."""
    label = chunk.resources.label().replace("/", "_")
    return f"{index:03d}_{label}.sbatch"
