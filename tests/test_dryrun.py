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


def _disk_line(tmp_path, *overrides: str) -> tuple[float, float]:
    """(end, peak) in bytes from the dry run's disk line."""
    cfg = sweep_cfg(
        "+grid=dense_1b",
        "dry_run=true",
        "launcher=local",
        "resources.gpus_per_node=8",
        f"sweep_dir={tmp_path / 'sw'}",
        *overrides,
    )
    out = io.StringIO()
    sweep(cfg, out=out)
    line = [ln for ln in out.getvalue().splitlines() if ln.startswith("checkpoints on disk:")]
    assert len(line) == 1, out.getvalue()[-2000:]
    scale = {"GB": 1e9, "TB": 1e12}
    words = line[0].replace(",", "").split()
    end = float(words[3]) * scale[words[4]]
    peak = float(words[-3]) * scale[words[-2]]
    return end, peak


def test_dry_run_disk_line_follows_the_final_checkpoint_kind(tmp_path):
    """End = every run's final save (weights only: 2 of a full checkpoint's 14 bytes/param;
    nothing for "none"); the peak adds the same step checkpoints of the runs in flight."""
    ends, extra = {}, {}
    for kind in ("model", "full", "none"):
        end, peak = _disk_line(tmp_path, f"options.final_checkpoint={kind}")
        ends[kind], extra[kind] = end, peak - end
    assert ends["none"] == 0
    assert ends["full"] / ends["model"] == pytest.approx(7, rel=0.01)
    assert extra["model"] == pytest.approx(extra["full"], rel=0.02) == extra["none"]
    # keep_checkpoints raises only the peak (the runs in flight hold keep + 1 full ones)
    end3, peak3 = _disk_line(tmp_path, "options.keep_checkpoints=3")
    assert end3 == ends["model"] and peak3 - end3 == pytest.approx(extra["model"] * 4 / 3, 0.02)
    with pytest.raises(SpecError, match=r"^options\.final_checkpoint: must be one of"):
        _disk_line(tmp_path, "options.final_checkpoint=weights")
    assert not (tmp_path / "sw").exists()
