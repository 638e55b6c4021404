"""The prepared GPU check's code paths, on tiny CPU shapes (`gpu_check.py --cpu-smoke`).

It will run once, blind, on a GPU machine; this runs every part of it here so that a typo or a
renamed function is not discovered there. The figures themselves say nothing about a GPU.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]


@pytest.mark.slow
@pytest.mark.timeout(900)
def test_gpu_check_cpu_smoke_runs_every_part(tmp_path):
    out = tmp_path / "gpu_check.json"
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}
    env.pop("WANDB_SERVICE", None)
    cmd = [sys.executable, str(REPO / "benchmarks" / "gpu_check.py"), "--cpu-smoke"]
    cmd += ["--out", str(out), "--budget-s", "850", "--data-root", str(tmp_path / "data")]
    proc = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, timeout=880)
    report = json.loads(out.read_text())
    parts = report["parts"]
    expected = {n: "ok" for n in parts} | {"kill_resume_deterministic": "skipped"}  # CPU: no-op
    assert {n: p["status"] for n, p in parts.items()} == expected, proc.stdout
    assert proc.returncode == 0
    assert set(parts) == {
        "env",
        "throughput",
        "moe",
        "checkpoint",
        "kill_resume",
        "kill_resume_deterministic",
    }
    t = parts["throughput"]
    assert t["vocab"] == 32000 and t["tokens_per_s_full"] > 0 and t["tokens_per_s_bare"] > 0
    assert t["flops_per_token"] > t["N"] * 6  # M plus the 6 V h LM head
    moe = {k: v for k, v in parts["moe"].items() if k.startswith("moe_")}
    assert {name.endswith("_k1") for name in moe} == {True, False}  # top-1 and top-k routers
    for name, entry in moe.items():
        assert entry["status"] == "ok" and entry["steps"] > 0, name
        assert entry["flags"]["moe_router_pre_softmax"] == name.endswith("_k1"), name
        assert not entry["flags"]["moe_grouped_gemm"]  # CPU: off; the GPU record shows it on
    k = parts["kill_resume"]
    assert k["killed_after_checkpoint"] is not None and k["steps"][0] == k["steps"][1]
    assert k["bitwise_equal"]  # CPU runs are deterministic
    c = parts["checkpoint"]
    assert c["sharding"] == {"distrib_optim_sharding_type": "dp_reshardable"}
    assert c["peak_rss_during_save_gb"] >= c["rss_before_save_gb"] > 0 and c["size_gb"] > 0
