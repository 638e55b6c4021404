"""Time limits on the CI cluster (.ci/slurm-up.sh): plans read the partition's MaxTime and never
ask for more; a run longer than its job's limit checkpoints at the warning signal, is requeued
and continues, and being requeued is not failing.
"""

from __future__ import annotations

import io
import json
import subprocess
import time

import pytest

from launch.executors import plan_arrays
from launch.resources import resource_model
from launch.slurm_info import max_walltime_min, parse_time_min, partition_info
from steplaw_train.sweep import sweep
from tests import test_slurm as base
from tests.test_slurm import cfg_for, wait_finished, wandb_ids
from tests.test_slurm_multinode import gpu_cfg

pytestmark = pytest.mark.slurm
cluster, env = base.cluster, base.env
# 5,600 steps: ~120 s of training on the idle 2-core CI machine, ~15 s more to start: more than
# one 2-minute job of the `short` partition, whose warning signal (30 s before the end) slurmctld
# sends up to 30 s early (it checks time limits every 30 s): at 60-90 s. (2,800 steps took ~60 s
# and finished just before the signal.) The test stops once the requeued job has trained past
# its checkpoint: waiting for the rest would only repeat the first segment, 80-90 s a segment.
LONGER = "grid.blocks=[{model:[demo_dense_small],tokens:[2867200],lr:[0.003],batch_size:[4]}]"


@pytest.mark.parametrize("grid", ["dense_1b", "dense"])
def test_paper_grids_ask_for_no_more_than_the_partitions_max_time(grid, tmp_path):
    cfg = gpu_cfg(tmp_path / "sw", grid)
    limit = parse_time_min(partition_info("gpu")["MaxTime"])
    assert limit == 1440 and max_walltime_min({"partition": "gpu"}) == 1440
    res = sweep(cfg, out=io.StringIO())
    rm = resource_model(cfg.resources)
    uncapped = plan_arrays(res.specs, rm, 1001)
    assert max(c.resources.timeout_min for c in uncapped) > limit  # the grid wants longer...
    assert "min" in res.table and "x2" in res.table  # ...and the table shows chained runs
    for line in res.table.splitlines()[2:-2]:  # the cells (not the totals, the disk line)
        for label in line.split()[-1].split(","):
            minutes = int(label.split("/")[1].split("min")[0])
            assert minutes <= limit, line


def _starts(run_dir) -> int:
    path = run_dir / "code.jsonl"  # one line per start of the trainer
    return len(path.read_text().splitlines()) if path.exists() else 0


def _last_step(run_dir) -> int:
    path = run_dir / "metrics.jsonl"
    lines = path.read_text().splitlines() if path.exists() else []
    return json.loads(lines[-1])["step"] if lines else 0


def test_a_run_past_its_time_limit_checkpoints_is_requeued_and_continues(env):
    sw = env / "swshort"
    res = sweep(
        cfg_for(
            sw,
            env / "data",
            LONGER,
            "launcher.partition=short",
            "options.checkpoint_interval=100000",  # only the warning signal saves
        )
    )
    (rid,), (job,) = res.submitted, res.job_ids
    run_dir = sw / "runs" / rid
    assert "/2min" in json.loads((run_dir / "launch.json").read_text())["attempts"][0]["resources"]
    deadline = time.time() + 600
    resumed_at = None  # the step the second start began from
    try:
        while time.time() < deadline:
            (st,) = base.sweep_states(sw, [rid])
            assert st.state != "failed", st  # a requeue at the time limit is not a failure
            if st.state == "done":
                break
            if _starts(run_dir) >= 2:
                if resumed_at is None:
                    time.sleep(5)  # past the resume's rewind of metrics.jsonl to the checkpoint
                    resumed_at = _last_step(run_dir)
                elif _last_step(run_dir) >= resumed_at + 20:
                    break  # the requeued job trains on from the signal's checkpoint
            time.sleep(2)
        else:
            raise AssertionError(f"no second segment after 600 s: {_starts(run_dir)} starts")
    finally:
        subprocess.run(["scancel", job], capture_output=True)  # nothing left to load the CI
    assert wait_finished(sw, [rid], timeout_s=60)[rid] != "failed"
    out = (sw / "logs" / f"{job}_0_log.out").read_text()
    assert out.count("Starting with JobEnvironment") >= 2, out[-3000:]  # past one job's limit
    assert "timed-out" in out or "Requeued" in out or "requeue" in out.lower(), out[-3000:]
    info = subprocess.run(
        ["sacct", "-D", "-X", "-n", "-P", "-o", "JobID,State", "-j", job],
        capture_output=True,
        text=True,
    ).stdout
    assert "REQUEUED" in info, info
    steps = [json.loads(x)["step"] for x in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert steps == list(range(1, len(steps) + 1))  # resumed where it stopped, nothing twice
    assert resumed_at is None or steps[-1] > resumed_at + 1
    assert wandb_ids(run_dir) == {rid}
    # the requeue was the same attempt: no retry counted, no second submission
    assert len(json.loads((run_dir / "launch.json").read_text())["attempts"]) == 1
