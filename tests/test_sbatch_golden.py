"""The sbatch script a dense_1b job array gets, pinned by a committed golden file.

A change in resource planning, signal handling or submitit's rendering shows up here as a diff
to review, not as a surprise on the cluster. Regenerate with STEPLAW_UPDATE_GOLDEN=1.
"""

from __future__ import annotations

import os
from pathlib import Path

from launch import sbatch
from launch.executors import slurm_parameters
from launch.resources import ResourceClass

GOLDEN = Path(__file__).parent / "golden" / "dense_1b_array.sbatch"
LAUNCHER = {
    "partition": "gpu",
    "account": "steplaw",
    "qos": "normal",
    "constraint": "h800",
    "setup": ["module load cuda/12.4"],
    "additional_by_class": {"*x8gpu/*": {"exclusive": True}},  # whole-node jobs only
    "array_parallelism": 64,
    "signal_delay_s": 120,
}


def render(tmp: Path) -> str:
    # a 2-node job of dense_1b planned for a 24 h partition (a run needing longer chains);
    # the dry run's renderer, which needs no srun (the same text as the submission's
    # AutoExecutor: tests/test_slurm_multinode.py)
    rc = ResourceClass(nodes=2, gpus_per_node=8, cpus_per_task=64, timeout_min=1440, segments=2)
    params = slurm_parameters(rc, LAUNCHER)
    text = sbatch.script(params, tmp / "logs", "steplaw_dense_1b", 120, f"{sbatch.COMMAND} X")
    return text.replace(str(tmp), "SWEEP_DIR")


def test_sbatch_script_matches_golden(tmp_path):
    text = render(tmp_path)
    if os.environ.get("STEPLAW_UPDATE_GOLDEN"):
        GOLDEN.write_text(text)
    assert text == GOLDEN.read_text()
    # the properties the harness relies on, stated so a regenerated golden cannot drop them
    for line in (
        "#SBATCH --signal=USR2@120",
        "#SBATCH --nodes=2",
        "#SBATCH --gpus-per-node=8",
        "#SBATCH --ntasks-per-node=8",
        "#SBATCH --time=1440",
        "#SBATCH --exclusive",
        "#SBATCH --cpus-per-task=8",
        "#SBATCH --partition=gpu",
        "#SBATCH --account=steplaw",
        "module load cuda/12.4",
        "#SBATCH --array=0-119%64",
        "#SBATCH --mem=256GB",  # explicit host memory (32 GB per GPU), not the cluster default
    ):
        assert line in text, line
    # srun of Slurm 22.05-23.02 does not inherit --cpus-per-task from sbatch
    (srun,) = [x for x in text.splitlines() if x.startswith("srun ")]
    assert "--cpus-per-task=8" in srun


def test_per_class_extras_leave_one_gpu_jobs_their_share_of_a_node(tmp_path):
    one = ResourceClass(nodes=1, gpus_per_node=1, cpus_per_task=8, timeout_min=60)
    params = slurm_parameters(one, LAUNCHER)
    assert "exclusive" not in params["slurm_additional_parameters"]
    assert params["slurm_srun_args"] == ["--cpus-per-task=8"]
