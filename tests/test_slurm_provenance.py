"""Jobs run the code that was submitted (.ci/slurm-up.sh cluster): a job held in the queue while
its checkout moves on to a commit whose `launch/executors.py` cannot even be imported still
trains, from its snapshot, records the original commit, and a requeue of it runs the same
snapshot. A dirty checkout's submission is refused; its dry run only says so.

The sweep is run from a committed copy of the tree under test (tests/test_provenance.py
`export_checkout`), as a subprocess whose code is that copy's, so the test can commit to it.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

from steplaw_train import rundir
from tests import test_slurm as base
from tests.test_provenance import REPO, export_checkout, git
from tests.test_slurm import wait_finished

pytestmark = pytest.mark.slurm
cluster, env = base.cluster, base.env
# 96 steps at bs 4 (checkpoint every 8): long enough to requeue after a checkpoint
GRID = "grid.blocks=[{model:[demo_dense_small],tokens:[49152],lr:[0.003],batch_size:[4]}]"
BREAK = 'raise RuntimeError("the live checkout was imported, not the snapshot")\n'


def sweep_from(clone: Path, sweep_dir: Path, data_root: Path, *extra: str):
    cmd = [sys.executable, "-m", "steplaw_train.sweep", "+grid=tiny", GRID, "launcher=slurm"]
    cmd += [f"sweep_dir={sweep_dir}", f"options.data_root={data_root}"]
    cmd += ["++launcher.signal_delay_s=30", "options.checkpoint_interval=8", *extra]
    return subprocess.run(
        cmd,
        cwd=clone,  # sbatch's default --chdir: what the job would import without a snapshot
        env={**os.environ, "PYTHONPATH": str(clone)},
        capture_output=True,
        text=True,
        timeout=300,
    )


def job_state(job: str) -> str:
    out = subprocess.run(
        ["squeue", "-h", "-j", job, "-o", "%T %r"], capture_output=True, text=True
    ).stdout
    return out.strip()


@pytest.mark.timeout(420)
def test_a_queued_job_runs_its_snapshot_after_the_checkout_changes(env, tmp_path):
    clone = tmp_path / "clone"
    original = export_checkout(REPO, clone)
    sw, data = tmp_path / "sw", env / "data"

    # dirty: the dry run says so, the submission is refused before anything is written
    (clone / "notes.txt").write_text("uncommitted\n")
    dry = sweep_from(clone, sw, data, "dry_run=true")
    assert dry.returncode == 0, dry.stderr[-2000:]
    assert "uncommitted changes" in dry.stdout and "would be refused" in dry.stdout
    refused = sweep_from(clone, sw, data)
    assert refused.returncode == 2 and "error: allow_dirty: " in refused.stderr
    assert not sw.exists()
    (clone / "notes.txt").unlink()

    sub = sweep_from(clone, sw, data, "+launcher.additional.hold=true")  # held in the queue
    assert sub.returncode == 0, sub.stderr[-3000:]
    (line,) = rundir.read_submissions(sw)[0]
    (job,) = line["job_ids"]
    try:
        check_snapshot_run(clone, sw, line, original)
    finally:
        subprocess.run(["scancel", job], capture_output=True)  # never left held on failure


def check_snapshot_run(clone: Path, sw: Path, line: dict, original: str) -> None:
    (rid,), (job,) = line["run_ids"], line["job_ids"]
    code = Path(line["code"])
    assert code == sw / rundir.CODE / original[:12] and line["provenance"]["commit"] == original
    assert line["provenance"]["dirty"] is False
    assert "JobHeldUser" in job_state(job), job_state(job)
    script = "".join(p.read_text() for p in (sw / "logs").glob("*submission.sh"))
    assert f"#SBATCH --chdir={code}" in script and f"export PYTHONPATH={code}" in script

    # the checkout moves on: a commit whose launcher and package cannot be imported at all
    for name in ("launch/executors.py", "steplaw_train/__init__.py"):
        path = clone / name
        path.write_text(path.read_text() + BREAK)
    git(clone, "commit", "-qam", "breaks every import")
    changed = git(clone, "rev-parse", "HEAD")
    assert changed != original
    subprocess.run(["scontrol", "release", job], check=True)

    run_dir = sw / "runs" / rid
    deadline = time.time() + 240
    while not list(run_dir.glob("checkpoints/*/complete")):
        assert time.time() < deadline, f"no checkpoint; job {job_state(job)}"
        (st,) = base.sweep_states(sw, [rid])
        assert st.state != "failed", st  # e.g. it imported the broken checkout
        assert not (run_dir / "result.json").exists(), "finished before it could be requeued"
        time.sleep(0.5)
    subprocess.run(["scontrol", "requeue", job], check=True)  # the same sbatch script again
    assert wait_finished(sw, [rid], timeout_s=300)[rid] == "done"

    result = json.loads((run_dir / "result.json").read_text())
    prov = result["provenance"]
    assert prov["commit"] == original and prov["source"] == "snapshot"
    assert prov["code_root"] == str(code) and prov["dirty"] is False
    spec = json.loads((run_dir / "spec.json").read_text())
    assert spec["derived"]["provenance"]["commit"] == original
    starts = rundir.read_code_starts(run_dir)
    assert len(starts) == 2, starts  # the first start and the requeue's
    assert {(s["key"], s["code_root"]) for s in starts} == {(original[:12], str(code))}
    assert result["code_mixed"] is False
    err = (sw / "logs" / f"{job}_0_log.err").read_text()
    assert "live checkout was imported" not in err
