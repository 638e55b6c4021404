"""The dry run's files: every run as CSV/JSON, the sbatch script of every job array it plans."""

from __future__ import annotations

import csv
import io
import json
from dataclasses import replace

import pytest

from launch.resources import resource_class, resource_model
from steplaw_train.spec import SpecError
from steplaw_train.sweep import sweep
from tests.conftest import sweep_cfg


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
        assert f"#SBATCH --chdir={tmp_path / 'sw' / 'code'}/" in text  # the submission's snapshot
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


def test_dry_run_show_prints_the_grids_run_not_the_base_model(tmp_path):
    """`dry_run_show` is the sweep's `--cfg job`: the run as the grid expanded it (dense_1b's
    shape, not the base config's demo_dense), its derived values, the options its job trains
    with and the submitit parameters of that job."""
    import yaml

    from launch.executors import slurm_parameters
    from steplaw_train.config import model_from_cfg

    over = ("+grid=dense_1b", "dry_run=true", "launcher=slurm", "launcher.partition=gpu")
    over += ("launcher.max_walltime_min=1440", f"sweep_dir={tmp_path / 'sw'}", "check_data=false")
    cfg = sweep_cfg(*over, "dry_run_show=2")
    buf = io.StringIO()
    res = sweep(cfg, out=buf)
    text = buf.getvalue()
    docs = [yaml.safe_load(d) for d in text[text.index("# run 1/") :].split("\n---\n")]
    docs[-1] = yaml.safe_load(text[text.rindex("# run 2/") :].split("\ndata: ")[0])
    assert [d["run_id"] for d in docs] == [s.run_id for s in res.specs[:2]]
    base = model_from_cfg(cfg.model)  # what the grid overrides
    rm = resource_model(cfg.resources)
    for doc, spec in zip(docs, res.specs, strict=False):
        assert doc["spec"]["model"]["name"] == "dense_1b" != base.name
        assert doc["spec"]["model"]["hidden"] == spec.model.hidden != base.hidden
        assert doc["spec"]["train"]["lr"] == spec.train.lr
        assert doc["derived"]["iterations"] == spec.iterations
        assert doc["derived"]["tokens_per_step"] == spec.tokens_per_step
        assert doc["derived"]["N"] == spec.N and doc["derived"]["Na"] == spec.Na
        rc = resource_class(spec, replace(rm, max_timeout_min=1440))
        assert doc["resources"]["class"] == rc.label()
        assert doc["options"]["device"] == "cuda"  # a GPU job fails rather than train on CPU
        params = doc["job"]["parameters"]
        assert params["gpus_per_node"] == rc.gpus_per_node
        assert params["timeout_min"] == rc.timeout_min <= 1440
        assert params["slurm_partition"] == "gpu"
        want = slurm_parameters(rc, {"partition": "gpu", "array_parallelism": 256})
        assert params["tasks_per_node"] == want["tasks_per_node"]
    one = res.specs[7].run_id
    buf = io.StringIO()
    sweep(sweep_cfg(*over, f"dry_run_show={one}"), out=buf)
    assert buf.getvalue().count("# run ") == 1 and f"run_id: {one}" in buf.getvalue()
    with pytest.raises(SpecError, match=r"dry_run_show: run_id\(s\) \['nosuchrun'\] are not"):
        sweep(sweep_cfg(*over, "dry_run_show=nosuchrun"), out=io.StringIO())
    with pytest.raises(SpecError, match="dry_run_show: is a dry-run output; add dry_run=true"):
        sweep(sweep_cfg("+grid=dense_1b", f"sweep_dir={tmp_path / 'sw'}", "dry_run_show=1"))
    assert not (tmp_path / "sw").exists()


def test_the_dry_run_checks_the_data_after_its_table(tmp_path):
    """A dry run whose submission would stop on the data says so after the table (and the CLI
    exits 2); check_data=false skips the check; a recipe that is there is reported ready."""
    over = ("+grid=dense_1b", "dry_run=true", f"sweep_dir={tmp_path / 'sw'}")
    over += (f"options.data_root={tmp_path / 'data'}",)
    buf = io.StringIO()
    res = sweep(sweep_cfg(*over), out=buf)
    text = buf.getvalue()
    assert res.data_problem.startswith("data.tokenizer: unknown tokenizer 'bpe32000'")
    assert text.index("360 runs in 3 cells") < text.index("data: PROBLEM data.tokenizer")
    skipped = io.StringIO()
    assert sweep(sweep_cfg(*over, "check_data=false"), out=skipped).data_problem is None
    assert "data: not checked (check_data=false)" in skipped.getvalue()
    tiny = io.StringIO()
    ok = sweep(
        sweep_cfg("+grid=tiny", "dry_run=true", "launcher=local", f"sweep_dir={tmp_path / 's'}"),
        out=tiny,
    )
    assert ok.data_problem is None and "data: 1 recipe(s) ready under" in tiny.getvalue()
    assert not (tmp_path / "sw").exists() and not (tmp_path / "s").exists()


def test_the_dry_run_cli_exits_2_on_a_data_problem_after_printing_the_table(tmp_path):
    import subprocess
    import sys

    cmd = [sys.executable, "-m", "steplaw_train.sweep", "+grid=dense_1b", "dry_run=true"]
    cmd += [f"sweep_dir={tmp_path / 'sw'}", f"options.data_root={tmp_path / 'data'}"]
    p = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    assert p.returncode == 2
    assert "360 runs in 3 cells" in p.stdout and "data: PROBLEM" in p.stdout
    (line,) = [ln for ln in p.stderr.splitlines() if ln.startswith("error")]  # + library warnings
    assert line.startswith("error: data.tokenizer: unknown tokenizer 'bpe32000'")


@pytest.mark.parametrize(
    "override, field",
    [("check_data=maybe", "check_data"), ("resources.mfu_prior_sd=0", "resources.mfu_prior_sd")],
)
def test_new_sweep_fields_are_checked_before_anything_runs(tmp_path, override, field):
    cfg = sweep_cfg("+grid=tiny", "dry_run=true", f"sweep_dir={tmp_path / 'sw'}", override)
    with pytest.raises(SpecError, match=rf"^{field}: "):
        sweep(cfg, out=io.StringIO())
