"""Multi-node acceptance on the CI cluster of .ci/slurm-up.sh: two slurmd nodes (slnode1,
slnode2), each in its own network namespace with its own address, so a job spanning both really
rendezvous across "machines" (a MASTER_ADDR of 127.0.0.1 or the submitting host would fail); and
two fake 8-GPU nodes (slgpu[1-2], partition `gpu`, MaxTime 24 h) where the real slurmctld checks
the GPU sbatch lines the planner writes.

Same fixtures and CPU demo shapes as tests/test_slurm.py. Killing a node needs root (the CI runs
as root; so does slurm-up.sh).
"""

from __future__ import annotations

import io
import json
import re
import subprocess
import time
from pathlib import Path

import pytest
import submitit

from launch import sbatch, slurm_info
from launch.executors import plan_arrays, run_in_snapshot, slurm_parameters
from launch.resources import resource_model
from steplaw_train.sweep import sweep
from tests import test_slurm as base
from tests.conftest import sweep_cfg
from tests.test_slurm import cfg_for, wait_finished, wandb_ids

pytestmark = pytest.mark.slurm
cluster, env = base.cluster, base.env  # the same fixtures (module-scoped: one cluster check)
ROOT = Path(__file__).resolve().parents[1]
NODE_SH = ROOT / ".ci" / "slurm-node.sh"
# long enough that a node can die between its first checkpoint and its end
GRID2 = "grid.blocks=[{model:[demo_dense_small],tokens:[65536],lr:[0.003],batch_size:[4]}]"
TWO_NODES = ("resources.cpu_nodes=2", "options.checkpoint_interval=8")


def losses(run_dir: Path) -> list[float]:
    return [json.loads(x)["loss"] for x in (run_dir / "metrics.jsonl").read_text().splitlines()]


def sacct_states(job: str) -> str:
    return subprocess.run(
        ["sacct", "-D", "-X", "-n", "-P", "-o", "JobID,State,NodeList", "-j", job],
        capture_output=True,
        text=True,
    ).stdout


def node_addr(name: str) -> str:
    out = subprocess.run(
        ["scontrol", "show", "node", name], capture_output=True, text=True, check=True
    ).stdout
    return re.search(r"NodeAddr=(\S+)", out).group(1)


def node_state(name: str) -> str:
    """slurmctld's own state of the node (e.g. DOWN+NOT_RESPONDING); sinfo's %T was seen to
    keep saying mixed* for a node slurmctld had already set down."""
    out = subprocess.run(["scontrol", "show", "node", name], capture_output=True, text=True)
    m = re.search(r"\bState=(\S+)", out.stdout)
    return m.group(1) if m else f"unknown ({out.stderr.strip()})"


@pytest.fixture(scope="module")
def two_node_run(env):
    """One run on 2 nodes x 1 task: SLURM starts a task on each node, the two gloo ranks meet at
    MASTER_ADDR = the first node's name, resolved to its address on the bridge."""
    sw = env / "sw2node"
    res = sweep(cfg_for(sw, env / "data", GRID2, *TWO_NODES))
    (rid,), (job,) = res.submitted, res.job_ids
    assert wait_finished(sw, [rid], timeout_s=600)[rid] == "done", sacct_states(job)
    return sw / "runs" / rid, job


def test_two_nodes_one_task_each_train_like_one_process(two_node_run, env):
    run_dir, job = two_node_run
    assert "slnode[1-2]" in sacct_states(job)  # the job really had both nodes
    spec = json.loads((run_dir / "spec.json").read_text())
    assert spec["derived"]["data_parallel"] == 2
    tries = json.loads((run_dir / "launch.json").read_text())["attempts"]
    assert tries[0]["resources"].startswith("2n")
    out = Path(tries[0]["stdout"]).read_text()
    # the rendezvous was the first node, not a loopback or the submitting host's address
    assert "slnode1" in out and "127.0.0.1" not in out.split("Starting with JobEnvironment")[-1]
    ref = sweep(cfg_for(env / "sw2node_ref", env / "data", GRID2, "launcher=debug"))
    assert ref.submitted == (run_dir.name,)  # the same spec (run_id), one process this time
    ours, theirs = losses(run_dir), losses(env / "sw2node_ref" / "runs" / run_dir.name)
    assert len(ours) == len(theirs) == 128
    assert max(abs(a - b) / b for a, b in zip(ours, theirs, strict=True)) < 1e-4


def test_a_node_dying_mid_run_requeues_the_job_and_the_run_resumes_bitwise(two_node_run, env):
    """SIGKILL everything of slnode2 (its slurmd, slurmstepd, rank 1): slurmctld marks the node
    down (SlurmdTimeout), requeues the job (NODE_FAIL); the node comes back; the job runs again
    on both nodes and the run resumes from its checkpoint to the uninterrupted run's losses."""
    ref_dir, _ = two_node_run
    sw = env / "sw2node_kill"
    res = sweep(cfg_for(sw, env / "data", GRID2, *TWO_NODES))
    (rid,), (job,) = res.submitted, res.job_ids
    run_dir = sw / "runs" / rid
    deadline = time.time() + 300
    while not list(run_dir.glob("checkpoints/*/complete")):
        assert time.time() < deadline, f"no checkpoint written: {sacct_states(job)}"
        time.sleep(0.5)
    assert not (run_dir / "result.json").exists(), "run finished before the node could die"
    addr = node_addr("slnode2")
    subprocess.run(["bash", str(NODE_SH), "kill", "slnode2"], check=True)
    try:
        deadline = time.time() + 300
        while not re.search(r"DOWN|DRAIN|FAIL", node_state("slnode2")):
            assert time.time() < deadline, f"slnode2 never marked down: {node_state('slnode2')}"
            time.sleep(1)
    finally:
        subprocess.run(["bash", str(NODE_SH), "start", "slnode2", addr], check=True)
    assert wait_finished(sw, [rid], timeout_s=600)[rid] == "done", sacct_states(job)
    info = sacct_states(job)
    assert "NODE_FAIL" in info or "REQUEUED" in info, info
    out = (sw / "logs" / f"{job}_0_log.out").read_text()
    assert out.count("Starting with JobEnvironment") == 2, out[-3000:]  # killed once, ran again
    assert losses(run_dir) == losses(ref_dir)
    ours = json.loads((run_dir / "result.json").read_text())
    assert ours["smooth_loss"] == json.loads((ref_dir / "result.json").read_text())["smooth_loss"]
    assert wandb_ids(run_dir) == {rid}


def test_job_array_spreads_over_both_nodes_and_completes(env):
    grid = (
        "grid.blocks=[{model:[demo_dense_small],tokens:[4096],lr:[0.002,0.004],batch_size:[2,4]}]"
    )
    sw = env / "sw_spread"
    res = sweep(cfg_for(sw, env / "data", grid))
    assert len(res.submitted) == 4 and res.batch_calls == 1
    assert set(wait_finished(sw, res.submitted).values()) == {"done"}
    (array,) = {j.split("_")[0] for j in res.job_ids}
    nodes = {line.split("|")[2] for line in sacct_states(array).splitlines() if line.strip()}
    assert nodes == {"slnode1", "slnode2"}, nodes


def gpu_cfg(sweep_dir: Path, grid: str, *overrides: str):
    return sweep_cfg(
        f"+grid={grid}",
        "dry_run=true",
        "launcher=slurm",
        "launcher.partition=gpu",
        f"sweep_dir={sweep_dir}",
        *overrides,
    )


def sbatch_test_only(folder: Path, cfg) -> list[str]:
    """Render the sbatch scripts the planner would submit for cfg's grid (submitit's own text)
    and ask slurmctld whether it would start each one (`sbatch --test-only`)."""
    res = sweep(cfg, out=io.StringIO())  # a dry run: the specs, nothing submitted
    # the resource model as the SLURM launcher plans with it: capped at the partition's limit
    rm = slurm_info.with_cluster_limits(resource_model(cfg.resources), cfg.launcher)
    chunks = plan_arrays(res.specs, rm, 1001)
    replies = []
    for i, chunk in enumerate(chunks):
        path = folder / sbatch.file_name(chunk, i)
        path.write_text(sbatch.render(chunk, cfg.launcher, folder / "logs", "steplaw_test"))
        p = subprocess.run(["sbatch", "--test-only", str(path)], capture_output=True, text=True)
        assert p.returncode == 0, f"{chunk.resources.label()}: {p.stderr}"
        replies.append(p.stderr)
    return replies


def autoexecutor_text(chunk, lc, logs: Path, name: str, code: tuple[Path, str]) -> str:
    """The script as the submission's AutoExecutor writes it (launch.executors._submit_arrays:
    the same parameters; map_array sets map_count), which needs srun on PATH."""
    ex = submitit.AutoExecutor(folder=logs, cluster="slurm")
    ex.update_parameters(name=name, **run_in_snapshot(slurm_parameters(chunk.resources, lc), *code))
    ex._executor.parameters["map_count"] = len(chunk.run_ids)
    return ex._executor._make_submission_file_text(f"{sbatch.COMMAND} {logs}", "UID")


@pytest.mark.parametrize("grid", ["dense_1b", "dense", "moe"])
def test_dry_run_scripts_are_the_submissions(grid, tmp_path):
    """The dry run renders without srun (launch.sbatch translates AutoExecutor's parameters
    itself); where srun exists the text must be AutoExecutor's, for every job array of a paper
    grid, so a script reviewed before spending is the one that runs."""
    extra = {"account": "lab", "qos": "high", "setup": ["module load cuda"], "partition": "gpu"}
    cfg = gpu_cfg(tmp_path / "sw", grid, "resources.max_nodes=2")
    res = sweep(cfg, out=io.StringIO())
    lc = {**cfg.launcher, **extra, "additional_by_class": {"*x8gpu/*": {"exclusive": True}}}
    chunks = plan_arrays(res.specs, resource_model(cfg.resources), 1001)
    code = (tmp_path / "code", f"{tmp_path / 'code'}:/site")
    assert len({c.resources for c in chunks}) > 1
    for chunk in chunks:
        want = autoexecutor_text(chunk, lc, tmp_path / "logs", "steplaw_x", code)
        assert sbatch.render(chunk, lc, tmp_path / "logs", "steplaw_x", code) == want


@pytest.mark.parametrize("grid", ["dense_1b", "dense"])
def test_gpu_sbatch_lines_are_accepted_by_slurmctld(grid, tmp_path):
    """The GPU job arrays of a paper grid (8 GPUs per node, a task per GPU, CPUs per task, the
    time limit) against the fake-GPU partition (2 nodes, MaxTime 24 h): slurmctld would start
    every one (EnforcePartLimits=ALL rejects a limit above the partition's at submission)."""
    cfg = gpu_cfg(tmp_path / "sw", grid, "resources.max_nodes=2")
    replies = sbatch_test_only(tmp_path, cfg)
    assert replies and all("to start at" in r for r in replies), replies
    assert any("slgpu[1-2]" in r for r in replies), replies  # a 2-node GPU job among them
