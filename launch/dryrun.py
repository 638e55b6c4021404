"""Look before you spend: the dry run's expanded runs as a file, and the sbatch scripts it would
submit. Pure except for the writes at the end of each function; nothing talks to SLURM.

`dry_run_list=PATH` (.csv or .json) writes one row per run: what it is (model, recipe, N, Na, D,
lr, bs), its state in this sweep, the job it would get and its estimated device-hours.
`dry_run_sbatch=DIR` writes one script per planned job array, rendered by submitit exactly as a
submission would (launch/sbatch.py), for review or `sbatch --test-only`.
`dry_run_show=K` (or a run_id, or a list of them) prints those runs fully resolved (`show_runs`):
the RunSpec as the grid expanded it (not the base config's model), what follows from it, the
RunOptions its job trains with, its resource class and the submitit parameters of its job.
"""

from __future__ import annotations

import csv
import io
from collections.abc import Mapping, Sequence
from dataclasses import asdict, is_dataclass
from pathlib import Path
from typing import Any

from launch import executors, sbatch, usage
from launch.executors import ArrayChunk
from launch.resources import ResourceModel, device_hours, resource_class
from steplaw_train.atomic import write_json, write_text
from steplaw_train.cells import cell_key
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
    chunks: Sequence[ArrayChunk],
    lc: Mapping[str, Any],
    logs: Path,
    name: str,
    out_dir: Path,
    code: tuple[Path, str] | None = None,
) -> list[Path]:
    """One sbatch script per job array, plus `arrays.json`: which runs each array holds.
    `code`: the snapshot the submission would make and its PYTHONPATH (sbatch.render)."""
    out_dir.mkdir(parents=True, exist_ok=True)
    paths, index = [], []
    for i, chunk in enumerate(chunks):
        path = out_dir / sbatch.file_name(chunk, i)
        write_text(path, sbatch.render(chunk, lc, logs, name, code))
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


def show_selection(value: Any, specs: Sequence[RunSpec]) -> list[RunSpec]:
    """The runs `dry_run_show` names: the first K (an int), or run_ids (one or a list)."""
    if isinstance(value, bool) or value is None:
        raise SpecError("dry_run_show", f"must be a count >= 1 or run_id(s), got {value!r}")
    if isinstance(value, int):
        if value < 1:
            raise SpecError("dry_run_show", f"must be a count >= 1 or run_id(s), got {value!r}")
        return list(specs[:value])
    wanted = [str(v) for v in value] if isinstance(value, list | tuple) else [str(value)]
    by_id = {s.run_id: s for s in specs}
    missing = [r for r in wanted if r not in by_id]
    if missing:
        raise SpecError(
            "dry_run_show",
            f"run_id(s) {missing} are not in this grid ({len(specs)} runs; "
            "`dry_run_list=runs.csv` lists them) — or give a count",
        )
    return [by_id[r] for r in wanted]


def _plain(value: Any) -> Any:
    """YAML-safe: paths as text, tuples as lists, dataclasses as mappings."""
    if is_dataclass(value) and not isinstance(value, type):
        return _plain(asdict(value))
    if isinstance(value, Mapping):
        return {str(k): _plain(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_plain(v) for v in value]
    if isinstance(value, Path):
        return str(value)
    return value


def _sig(x: float) -> float:
    """4 significant digits: estimates, not measurements."""
    return float(f"{x:.4g}")


def job_view(spec: RunSpec, launcher: executors.Launcher) -> dict[str, Any]:
    """The job one run would get from this launcher: options it trains with and the submitit
    parameters (the same functions the submission calls, so the two cannot drift apart)."""
    rc = resource_class(spec, launcher.resources)
    view: dict[str, Any] = {"executor": launcher.name}
    if launcher.name == "slurm":
        lc = asdict(launcher.settings)
        options = executors.slurm_job_options(launcher.options, rc)
        view["parameters"] = {
            "name": f"steplaw_{launcher.sweep_dir.name}",
            "slurm_max_num_timeout": int(lc.get("max_num_timeout", 20)) + rc.segments - 1,
            **executors.slurm_parameters(rc, lc),
        }
    elif launcher.name == "local":
        cfg = launcher.settings
        per_run = executors.gpus_per_local_run(
            cfg.gpus_per_run, executors.torch_gpu_ids(), executors.host_gpu_count()
        )
        options = executors.local_job_options(launcher.options, cfg, per_run)
        gpu = "the lowest free GPU" if per_run else None
        view["parameters"] = {
            **executors.local_job_parameters(int(cfg.timeout_min), None),
            "gpus": gpu,
            "parallelism": cfg.parallelism,
        }
    else:
        options = launcher.options
        view["parameters"] = {"in_process": True}
    view["options"] = _plain(options)
    return view


def show_runs(
    chosen: Sequence[RunSpec],
    specs: Sequence[RunSpec],
    states: Mapping[str, str],
    launcher: executors.Launcher,
    calibration: usage.Calibration,
) -> str:
    """YAML documents, one per chosen run: what will actually run (module docstring)."""
    import yaml

    rm = launcher.resources
    index = {s.run_id: i for i, s in enumerate(specs, 1)}
    docs = []
    for spec in chosen:
        rc = resource_class(spec, rm)
        job = job_view(spec, launcher)
        est, low, high = calibration.hours(spec, rm)
        mfu = calibration.estimate(spec.model)
        key = cell_key(spec)
        doc = {
            "run_id": spec.run_id,
            "grid_index": f"{index.get(spec.run_id, '?')}/{len(specs)}",
            "state": states.get(spec.run_id, "pending"),
            "cell": {"model": key.model, "recipe": key.recipe, "D": key.D},
            "spec": _plain(spec.to_dict()),
            "derived": {**spec.derived(), "tokens_per_step": spec.tokens_per_step},
            "options": job.pop("options"),
            "resources": {
                "class": rc.label(),
                **_plain(rc),
                "data_parallel": rc.data_parallel,
                "device_hours": {
                    "assumed_mfu": _sig(device_hours(spec, rm)),
                    "calibrated": _sig(est),
                    "range_90": [_sig(low), _sig(high)],
                },
                "mfu": {"assumed": rm.mfu, "calibrated": _sig(mfu.mfu), "runs": mfu.runs},
            },
            "job": job,
        }
        docs.append(
            f"# run {doc['grid_index']} of the expanded grid\n"
            + yaml.safe_dump(doc, sort_keys=False, default_flow_style=False)
        )
    return "---\n".join(docs)
