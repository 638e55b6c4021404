"""The run's record survives wandb dying under it (as SLURM's SIGTERM kills wandb's service)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]

CHILD = """
import os, signal, sys, time, warnings
from pathlib import Path
from steplaw_train import metrics as mx

run_dir = Path(sys.argv[1])
logger = mx.build_logger(True, run_dir, "svcdies", {"x": 1}, "steplaw-test", None, "offline")
logger.log({"step": 1, "loss": 2.0})
service = [p for p in Path("/proc").glob("[0-9]*")
           if (p / "comm").exists() and (p / "comm").read_text().strip() == "wandb-core"
           and (p / "stat").read_text().rsplit(")", 1)[1].split()[1] == str(os.getpid())]
assert len(service) == 1, service
os.kill(int(service[0].name), signal.SIGTERM)
time.sleep(1.0)
with warnings.catch_warnings(record=True) as caught:
    warnings.simplefilter("always")
    for step in range(2, 6):
        logger.log({"step": step, "loss": 2.0 / step})
    logger.summary({"status": "done", "final_loss": 0.4})
    logger.close()
mx.stop_wandb_service()
print("WARNINGS", sum("mirroring stopped" in str(w.message) for w in caught))
"""


def test_a_killed_wandb_service_stops_mirroring_not_the_run(tmp_path: Path):
    env = {**os.environ, "PYTHONPATH": str(REPO), "WANDB_MODE": "offline"}
    env.pop("WANDB_SERVICE", None)  # its own service, not this process's
    proc = subprocess.run(
        [sys.executable, "-c", CHILD, str(tmp_path)],
        capture_output=True,
        text=True,
        env=env,
        timeout=120,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "WARNINGS 1" in proc.stdout  # reported once, then silent
    rows = [json.loads(x) for x in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [1, 2, 3, 4, 5]
    assert "Traceback" not in proc.stderr  # no exit-hook noise after stop_wandb_service()
