"""The run directory's contract (steplaw_train/rundir.py): whose a run dir is, who may write it,
and that damaged records are reported, not crashed on. Real files, real processes, tiny runs."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
import warnings
from pathlib import Path

import pytest

from analysis import collect
from launch.status import run_state
from steplaw_train import atomic, rundir
from steplaw_train.spec import SpecError
from steplaw_train.train import run
from tests.conftest import tiny_options, tiny_spec

REPO = Path(__file__).resolve().parents[1]


def _snapshot(d: Path) -> dict[str, bytes]:
    return {str(p.relative_to(d)): p.read_bytes() for p in sorted(d.rglob("*")) if p.is_file()}


# ---- torn and corrupt records ------------------------------------------------------------------
def test_torn_last_line_is_dropped_with_one_warning(tmp_path):
    rows = [{"step": i, "loss": 5.0 - i} for i in (1, 2, 3)]
    text = "".join(json.dumps(r) + "\n" for r in rows)
    (tmp_path / rundir.METRICS).write_text(text + '{"step": 4, "lo')
    with pytest.warns(UserWarning, match="torn last line"):
        assert rundir.read_metrics(tmp_path) == rows
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # once per file: the second read is silent
        assert rundir.read_loss_series(tmp_path) == ([1, 2, 3], [4.0, 3.0, 2.0], None)


def test_corrupt_line_inside_metrics_is_reported(tmp_path):
    (tmp_path / rundir.METRICS).write_text(
        '{"step": 1, "loss": 2.0}\nGARBAGE\n{"step": 2, "loss": 1.0}\n'
    )
    with pytest.raises(rundir.CorruptRecord, match="corrupt at line 2"):
        rundir.read_metrics(tmp_path)
    assert rundir.read_loss_series(tmp_path)[2] == "metrics.jsonl corrupt at line 2"


def test_appenders_start_on_a_fresh_line(tmp_path):
    path = tmp_path / rundir.SUBMISSIONS
    rundir.append_submission(tmp_path, {"submitted": 1})
    with open(path, "a") as f:
        f.write('{"submitted": 2, "run_')  # a kill mid-append
    rundir.append_submission(tmp_path, {"submitted": 3})
    entries, problem = rundir.read_submissions(tmp_path)
    assert [e["submitted"] for e in entries] == [1, 3] and problem.endswith("line 2")


@pytest.mark.parametrize("content", [b"[]", b"\x80\x81\x00binary", b'{"status": "done"', b"42"])
def test_damaged_result_json_is_reported_by_every_reader(tmp_path, data_root, content):
    spec = tiny_spec()
    d = tmp_path / "run"
    rundir.write_spec(d, spec)
    rundir.result_path(d).write_bytes(content)
    before = _snapshot(d)
    with pytest.raises(rundir.CorruptRecord):
        rundir.read_result(d)
    st = run_state(d, {})
    assert st.state == "failed" and "result.json" in st.detail
    row = collect.read_run_dir(d)
    assert row["status"] == "unreadable" and "result.json" in row["excluded_reason"]
    with pytest.raises(rundir.RunDirConflict, match="result.json"):
        run(spec, d, tiny_options(data_root))
    assert _snapshot(d) == before  # the trainer wrote nothing


def test_manifest_missing_keys_is_a_clear_error(tmp_path):
    atomic.write_json(tmp_path / rundir.MANIFEST, {"grid": "x"})
    with pytest.raises(rundir.CorruptRecord, match="missing keys"):
        rundir.read_manifest(tmp_path)
    from steplaw_train.sweep import status as status_cli

    with pytest.raises(SystemExit) as e:
        status_cli.main([str(tmp_path)])
    assert e.value.code == 2


# ---- a run dir knows its spec ------------------------------------------------------------------
@pytest.fixture(scope="module")
def finished(tmp_path_factory, data_root) -> Path:
    d = tmp_path_factory.mktemp("own") / "run"
    # prune_checkpoints=False: steps 10 and 20 stay, as a crash before the prune leaves them
    run(
        tiny_spec(),
        d,
        tiny_options(
            data_root, checkpoint_interval=10, keep_checkpoints=2, prune_checkpoints=False
        ),
    )
    return d


def test_finished_run_dir_refuses_another_spec(finished, data_root):
    before = _snapshot(finished)
    other = tiny_spec(lr=1e-3)
    with pytest.raises(rundir.RunDirConflict) as e:
        run(other, finished, tiny_options(data_root))
    msg = str(e.value)
    assert tiny_spec().run_id in msg and other.run_id in msg and "\n" not in msg
    assert _snapshot(finished) == before


def test_resume_refuses_a_changed_spec_or_precision_then_resumes_bitwise(
    finished, tmp_path, data_root
):
    import shutil

    d = tmp_path / "run"
    shutil.copytree(finished, d)
    rundir.result_path(d).unlink()  # as if killed after the step-20 checkpoint ...
    (d / rundir.LOCK).unlink(missing_ok=True)
    with open(rundir.metrics_path(d), "a") as f:
        f.write('{"step": 31, "tokens": 39')  # ... while writing a metrics line (a full disk)
    before = _snapshot(d)
    with pytest.raises(rundir.RunDirConflict, match=tiny_spec(lr=1e-3).run_id):
        run(tiny_spec(lr=1e-3), d, tiny_options(data_root))
    with pytest.raises(rundir.RunDirConflict, match="precision='fp32'.*precision='bf16'"):
        run(tiny_spec(), d, tiny_options(data_root, precision="bf16"))
    assert _snapshot(d) == before
    resumed = run(tiny_spec(), d, tiny_options(data_root))
    original = rundir.read_result(finished)
    assert resumed["smooth_loss"] == original["smooth_loss"]
    assert rundir.read_metrics(d) and [r["loss"] for r in rundir.read_metrics(d)] == [
        r["loss"] for r in rundir.read_metrics(finished)
    ]


def test_checkpoint_format_of_another_run_id_is_refused(tmp_path, data_root):
    d = tmp_path / "run"
    (d / rundir.CHECKPOINTS / "step_00000010").mkdir(parents=True)
    rundir.write_checkpoint_format(d, "0123456789ab", {"precision": "fp32"})
    with pytest.raises(rundir.RunDirConflict, match="0123456789ab"):
        run(tiny_spec(), d, tiny_options(data_root))


# ---- exclusive ownership, two real processes ---------------------------------------------------
HOLD = """
import sys, time
from pathlib import Path
from steplaw_train import rundir
with getattr(rundir, sys.argv[1])(Path(sys.argv[2])):
    print("locked", flush=True)
    time.sleep(600)
"""


def _holder(kind: str, path: Path) -> subprocess.Popen:
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    p = subprocess.Popen(
        [sys.executable, "-c", HOLD, kind, str(path)], stdout=subprocess.PIPE, text=True, env=env
    )
    assert p.stdout.readline().strip() == "locked"
    return p


def test_second_trainer_on_a_run_dir_is_refused_until_the_first_dies(tmp_path, data_root):
    d = tmp_path / "run"
    holder = _holder("owned", d)
    try:
        with pytest.raises(rundir.RunDirConflict, match=f"pid {holder.pid}"):
            run(tiny_spec(), d, tiny_options(data_root))
    finally:
        os.kill(holder.pid, signal.SIGKILL)  # dies holding it: the OS releases the lock
        holder.wait()
    with rundir.owned(d):
        pass


def test_second_sweep_invocation_is_refused_while_one_submits(tmp_path):
    holder = _holder("sweep_owned", tmp_path)
    try:
        t0 = time.monotonic()
        with (
            pytest.raises(SpecError, match="another sweep invocation"),
            rundir.sweep_owned(tmp_path),
        ):
            pass
        assert time.monotonic() - t0 < 5  # refused at once, not after a wait
    finally:
        holder.kill()
        holder.wait()
    with rundir.sweep_owned(tmp_path):
        pass
