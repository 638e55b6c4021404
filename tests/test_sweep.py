"""The sweep command on the local and debug launchers, with real (tiny) training runs."""

from __future__ import annotations

import io
import json

import pytest

from launch.status import sweep_states
from steplaw_train import provenance
from steplaw_train.spec import SpecError
from steplaw_train.sweep import status as status_cli
from steplaw_train.sweep import sweep
from tests.conftest import tiny_sweep_cfg

# Two tiny runs of a few seconds each (the `tiny` grid restricted further).
BLOCK = "grid.blocks=[{model:[demo_dense_small],tokens:[4096],lr:[0.002,0.004],batch_size:[4]}]"


@pytest.fixture(autouse=True)
def offline_wandb(tmp_path, monkeypatch):
    for var in ("WANDB_DIR", "WANDB_CACHE_DIR", "WANDB_CONFIG_DIR"):
        monkeypatch.setenv(var, str(tmp_path / "wandb"))
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("OMP_NUM_THREADS", "1")


@pytest.fixture(scope="module")
def data_root(tmp_path_factory):
    return tmp_path_factory.mktemp("data")


def cfg_for(sweep_dir, data_root, *overrides):
    return tiny_sweep_cfg(sweep_dir, data_root, BLOCK, *overrides)


def counts(sweep_dir):
    return status_cli.summary(sweep_dir)[0]


def test_dry_run_submits_nothing_and_writes_nothing(tmp_path, data_root, capsys):
    cfg = cfg_for(tmp_path / "sw", data_root, "dry_run=true", "launcher=local")
    buf = io.StringIO()
    res = sweep(cfg, out=buf)
    assert res.submitted == () and not (tmp_path / "sw").exists()
    table = buf.getvalue()
    assert "demo_dense_small" in table and "2 runs in 1 cells; 2 to submit via local" in table


def test_local_sweep_is_idempotent(tmp_path, data_root, capsys):
    sw = tmp_path / "sw"
    res = sweep(cfg_for(sw, data_root, "launcher=local"))
    assert len(res.submitted) == 2 and res.failed == ()
    code = provenance.git_state(provenance.code_root())
    for rid in res.submitted:
        result = json.loads((sw / "runs" / rid / "result.json").read_text())
        assert result["status"] == "done" and result["run_id"] == rid
        # local jobs train the checkout itself and say which commit, dirty or not, it was
        prov = result["provenance"]
        assert (prov["commit"], prov["dirty"], prov["key"]) == (code.commit, code.dirty, code.key)
    c = counts(sw)
    assert (c["done"], c["pending"], c["submitted_last"]) == (2, 0, 2)
    assert (sw / "config.yaml").exists()
    assert json.loads((sw / "manifest.json").read_text())["run_ids"] == list(res.submitted)

    again = sweep(cfg_for(sw, data_root, "launcher=local"))
    assert again.submitted == () and counts(sw)["submitted_last"] == 0

    (sw / "runs" / res.submitted[0] / "result.json").unlink()
    third = sweep(cfg_for(sw, data_root, "launcher=local"))
    assert third.submitted == (res.submitted[0],)
    assert counts(sw)["done"] == 2


def test_debug_failure_is_recorded_and_retried_alone(tmp_path, data_root, capsys):
    """A run that fails after validation (its data root's `datasets` is a file, so the demo
    corpus cannot be built) shows as failed with its log tail; only it goes out again with
    retry_failed=true. No pdb under the debug launcher."""
    sw = tmp_path / "sw"
    first = sweep(cfg_for(sw, data_root, "launcher=debug", "grid.blocks.0.lr=[0.002]"))
    assert len(first.submitted) == 1 and first.failed == ()
    bad_root = tmp_path / "bad_root"
    bad_root.mkdir()
    (bad_root / "datasets").write_text("injected failure")
    second = sweep(cfg_for(sw, bad_root, "launcher=debug", "max_retries=0"))
    assert len(second.submitted) == 1 and second.failed == second.submitted
    failed_id = second.submitted[0]
    states = {s.run_id: s for s in sweep_states(sw, [first.submitted[0], failed_id])}
    assert states[failed_id].state == "failed" and states[first.submitted[0]].state == "done"
    status_cli.main([str(sw)])
    out = capsys.readouterr().out
    assert "failed=1" in out and failed_id in out and "    | " in out  # the log tail

    assert sweep(cfg_for(sw, data_root, "launcher=debug", "max_retries=0")).submitted == ()
    retry = sweep(cfg_for(sw, data_root, "launcher=debug", "retry_failed=true"))
    assert retry.submitted == (failed_id,) and retry.failed == ()
    assert counts(sw)["done"] == 2


def test_bad_launcher_is_named_before_any_work(tmp_path, data_root):
    with pytest.raises(SpecError, match="launcher.name.*allowed.*local"):
        sweep(cfg_for(tmp_path / "sw", data_root, "launcher.name=kubernetes"))
    assert not (tmp_path / "sw").exists()


@pytest.mark.parametrize(
    "launcher, key, valid",
    [
        ("slurm", "partiton", "partition"),
        ("local", "paralelism", "parallelism"),
        ("debug", "pbd", "pdb"),
    ],
)
def test_unknown_launcher_key_names_the_valid_ones(tmp_path, data_root, launcher, key, valid):
    over = (f"launcher={launcher}", f"+launcher.{key}=x", "dry_run=true")
    with pytest.raises(SpecError, match=rf"launcher\.{key}: unknown key .*'{valid}'"):
        sweep(cfg_for(tmp_path / "sw", data_root, *over))
    assert not (tmp_path / "sw").exists()


def test_another_grid_into_an_existing_sweep_dir_is_refused_before_writing(tmp_path, data_root):
    sw = tmp_path / "sw"
    sweep(cfg_for(sw, data_root, "launcher=debug"), out=io.StringIO())
    manifest = (sw / "manifest.json").read_bytes()
    with pytest.raises(SpecError, match=r"sweep_dir: .* holds grid 'tiny', not 'other'"):
        sweep(cfg_for(sw, data_root, "launcher=debug", "grid.name=other", "dry_run=true"))
    assert (sw / "manifest.json").read_bytes() == manifest


def test_unknown_search_key_of_the_full_search_is_refused(tmp_path, data_root):
    with pytest.raises(
        SpecError, match=r"search\.batch: unknown key 'batch'; allowed keys: \['name'\]"
    ):
        sweep(cfg_for(tmp_path / "sw", data_root, "+search.batch=2", "dry_run=true"))


def test_unknown_launcher_key_on_the_command_line_exits_2(tmp_path):
    import subprocess
    import sys

    cmd = [sys.executable, "-m", "steplaw_train.sweep", "+grid=tiny", "launcher=slurm"]
    cmd += ["+launcher.partiton=x", "dry_run=true", f"sweep_dir={tmp_path / 'sw'}"]
    p = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    assert p.returncode == 2
    assert "launcher.partiton: unknown key" in p.stderr and "'partition'" in p.stderr


def test_a_second_sweep_on_a_busy_sweep_dir_is_refused_and_submits_nothing(tmp_path, data_root):
    """Two terminals, one sweep dir: the second invocation must not train the runs again."""
    import os
    import subprocess
    import sys
    from pathlib import Path

    sw = tmp_path / "sw"
    hold = (
        "import sys, time\nfrom pathlib import Path\nfrom steplaw_train import rundir\n"
        "with rundir.sweep_owned(Path(sys.argv[1])):\n    print('locked', flush=True)\n"
        "    time.sleep(600)\n"
    )
    repo = str(Path(__file__).resolve().parents[1])
    holder = subprocess.Popen(
        [sys.executable, "-c", hold, str(sw)],
        stdout=subprocess.PIPE,
        text=True,
        env={**os.environ, "PYTHONPATH": repo},
    )
    try:
        assert holder.stdout.readline().strip() == "locked"
        with pytest.raises(SpecError, match=rf"pid {holder.pid}\).*another sweep invocation"):
            sweep(cfg_for(sw, data_root, "launcher=debug"))
        assert not (sw / "runs").exists() and not (sw / "submissions.jsonl").exists()
        assert sweep(cfg_for(sw, data_root, "launcher=debug", "dry_run=true")).submitted == ()
    finally:
        holder.kill()
        holder.wait()


def test_two_identical_sweep_commands_train_each_run_once(tmp_path, data_root):
    """The hostile-user case: the same local sweep started twice from two terminals."""
    import os
    import subprocess
    import sys
    import time
    from pathlib import Path

    sw = tmp_path / "sw"
    cmd = [sys.executable, "-m", "steplaw_train.sweep", "+grid=tiny", BLOCK, f"sweep_dir={sw}"]
    cmd += [f"options.data_root={data_root}", "launcher=local"]
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[1])}
    first = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=env)
    lock = sw / ".sweep.lock"
    deadline = time.monotonic() + 120
    while not (lock.exists() and lock.read_text().strip()) and time.monotonic() < deadline:
        time.sleep(0.2)
    second = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=300)
    out, err = first.communicate(timeout=600)
    assert first.returncode == 0, err.decode()[-2000:]
    assert second.returncode == 2 and "another sweep invocation" in second.stderr
    for run_dir in (sw / "runs").iterdir():
        steps = [json.loads(line)["step"] for line in (run_dir / "metrics.jsonl").open()]
        assert steps == sorted(set(steps)), run_dir  # trained once: no interleaved restarts
        assert len(json.loads((run_dir / "launch.json").read_text())["attempts"]) == 1
    assert counts(sw)["done"] == 2


def test_a_job_slurm_does_not_report_yet_is_queued_not_failed(tmp_path):
    """sacct lags sbatch: right after submission a job is unknown; resubmitting it would be waste."""
    from launch.executors import record_attempt
    from launch.status import UNKNOWN_GRACE_S, run_state

    run_dir = tmp_path / "runs" / "abc"
    record_attempt(run_dir, {"executor": "slurm", "job_id": "77_3", "stderr": "x.err"})
    submitted = json.loads((run_dir / "launch.json").read_text())["attempts"][0]["time"]
    assert run_state(run_dir, {}, now=submitted + 5).state == "queued"
    assert run_state(run_dir, {}, now=submitted + UNKNOWN_GRACE_S + 1).state == "failed"
    assert run_state(run_dir, {"77_3": "RUNNING"}, now=submitted + 5).state == "running"
    assert run_state(run_dir, {"77_3": "PREEMPTED"}, now=submitted + 5).state == "preempted"
