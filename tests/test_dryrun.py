"""The dry run's files: every run as CSV/JSON, the sbatch script of every job array it plans."""

from __future__ import annotations

import csv
import io
import json

import pytest

from launch.resources import resource_class, resource_model
from steplaw_train.spec import SpecError
from steplaw_train.sweep import sweep
from tests.test_grid import sweep_cfg


def test_dry_run_lists_runs_and_renders_the_sbatch_scripts(tmp_path):
    cfg = sweep_cfg(
        "+grid=dense_1b",
        "dry_run=true",
        "launcher=slurm",
        "launcher.partition=gpu",
        "launcher.max_walltime_min=1440",
        "launcher.max_array_size=101",
        f"sweep_dir={tmp_path / 'sw'}",
        f"dry_run_list={tmp_path / 'runs.csv'}",
        f"dry_run_sbatch={tmp_path / 'sbatch'}",
    )
    res = sweep(cfg, out=io.StringIO())
    rows = list(csv.DictReader((tmp_path / "runs.csv").open()))
    assert [r["run_id"] for r in rows] == [s.run_id for s in res.specs]
    assert {r["state"] for r in rows} == {"pending"}
    assert not (tmp_path / "sw").exists()  # a dry run records nothing
    index = json.loads((tmp_path / "sbatch" / "arrays.json").read_text())
    scripts = sorted((tmp_path / "sbatch").glob("*.sbatch"))
    assert len(scripts) == len(index) > 3  # 360 runs in arrays of <= 100
    assert sorted(r for a in index for r in a["run_ids"]) == sorted(r["run_id"] for r in rows)
    by_id = {r["run_id"]: r["resources"] for r in rows}
    for entry, path in zip(index, scripts, strict=True):
        text = path.read_text()
        assert path.name == entry["script"]
        assert f"#SBATCH --array=0-{len(entry['run_ids']) - 1}%" in text
        assert "#SBATCH --partition=gpu" in text
        minutes = int(text.split("#SBATCH --time=")[1].split()[0])
        assert minutes <= 1440 and {by_id[r] for r in entry["run_ids"]} == {entry["resources"]}
    json_cfg = sweep_cfg(
        "+grid=dense_1b",
        "dry_run=true",
        f"sweep_dir={tmp_path / 'sw'}",
        f"dry_run_list={tmp_path / 'runs.json'}",
    )
    sweep(json_cfg, out=io.StringIO())
    listed = json.loads((tmp_path / "runs.json").read_text())
    rm = resource_model(json_cfg.resources)
    assert listed[0]["resources"] == resource_class(res.specs[0], rm).label()
    with pytest.raises(SpecError, match="dry_run_list"):
        bad = sweep_cfg("+grid=dense_1b", "dry_run=true", f"sweep_dir={tmp_path / 'sw'}")
        bad.dry_run_list = str(tmp_path / "runs.txt")
        sweep(bad, out=io.StringIO())
