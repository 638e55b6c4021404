"""The sbatch script of one planned job array, rendered by submitit exactly as it would submit it.

Used to look before spending (the dry run can write them) and by the tests that hand these very
scripts to a real slurmctld (`sbatch --test-only`). Rendering needs no cluster.
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any

import submitit

from launch.executors import ArrayChunk, run_in_snapshot, slurm_parameters

# what submitit puts after `srun ... python -u -m submitit.core._submit` (the pickles' folder)
COMMAND = "python -u -m submitit.core._submit"


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
    ex = submitit.AutoExecutor(folder=logs, cluster="slurm")
    params = slurm_parameters(chunk.resources, lc)
    if code is not None:
        params = run_in_snapshot(params, *code)
    ex.update_parameters(name=name, **params)
    ex._executor.parameters["map_count"] = len(chunk.run_ids)  # what map_array sets
    return ex._executor._make_submission_file_text(f"{COMMAND} {logs}", "UID")


def file_name(chunk: ArrayChunk, index: int) -> str:
    """A stable, readable file name: position in the plan and resource class."""
    label = chunk.resources.label().replace("/", "_")
    return f"{index:03d}_{label}.sbatch"
