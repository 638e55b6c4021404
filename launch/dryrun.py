"""Look before you spend: the dry run's expanded runs as a file, and the sbatch scripts it would
submit. Pure except for the writes at the end of each function; nothing talks to SLURM.

`dry_run_list=PATH` (.csv or .json) writes one row per run: what it is (model, recipe, N, Na, D,
lr, bs), its state in this sweep, the job it would get and its estimated device-hours.
`dry_run_sbatch=DIR` writes one script per planned job array, rendered by submitit exactly as a
submission would (launch/sbatch.py), for review or `sbatch --test-only`.
"""

from __future__ import annotations

import csv
import io
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from launch import sbatch
from launch.executors import ArrayChunk
from launch.resources import ResourceModel, device_hours, resource_class
from steplaw_train.atomic import write_json, write_text
from steplaw_train.spec import RunSpec, SpecError

COLUMNS = (
    "run_id",
    "model",
    "recipe",
    "N",
    "Na",
    "D",
    "lr",
    "batch_size",
    "seed",
    "state",
    "resources",
    "device_hours",
)


def run_rows(
    specs: Sequence[RunSpec], states: Mapping[str, str], rm: ResourceModel
) -> list[dict[str, Any]]:
    """One row per run, in the grid's order (states: run_id -> state, "pending" if absent)."""
    return [
        {
            "run_id": s.run_id,
            "model": s.model.name,
            "recipe": s.data.recipe,
            "N": s.N,
            "Na": s.Na,
            "D": s.D,
            "lr": s.train.lr,
            "batch_size": s.train.batch_size,
            "seed": s.train.seed,
            "state": states.get(s.run_id, "pending"),
            "resources": resource_class(s, rm).label(),
            "device_hours": device_hours(s, rm),
        }
        for s in specs
    ]


def write_rows(rows: Sequence[Mapping[str, Any]], path: Path) -> Path:
    """CSV or JSON (a list of objects) by the file's suffix."""
    suffix = path.suffix.lower()
    if suffix == ".json":
        write_json(path, list(rows))
    elif suffix == ".csv":
        buf = io.StringIO()
        w = csv.DictWriter(buf, fieldnames=COLUMNS, lineterminator="\n")
        w.writeheader()
        w.writerows(rows)
        write_text(path, buf.getvalue())
    else:
        raise SpecError("dry_run_list", f"must end in .csv or .json, got {str(path)!r}")
    return path


def write_scripts(
    chunks: Sequence[ArrayChunk], lc: Mapping[str, Any], logs: Path, name: str, out_dir: Path
) -> list[Path]:
    """One sbatch script per job array, plus `arrays.json`: which runs each array holds."""
    out_dir.mkdir(parents=True, exist_ok=True)
    paths, index = [], []
    for i, chunk in enumerate(chunks):
        path = out_dir / sbatch.file_name(chunk, i)
        write_text(path, sbatch.render(chunk, lc, logs, name))
        paths.append(path)
        index.append(
            {
                "script": path.name,
                "resources": chunk.resources.label(),
                "segments": chunk.resources.segments,
                "run_ids": list(chunk.run_ids),
            }
        )
    write_json(out_dir / "arrays.json", index)
    return paths
