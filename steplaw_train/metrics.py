"""Where a run's numbers go: metrics.jsonl (the contract) and wandb (the user's dashboard).

Rank and logger are decided once at construction: rank 0 gets a real `Logger`, every other rank a
`NullLogger`, so the training loop logs unconditionally. wandb is imported lazily (~0.4 s) and
runs offline unless the user configures otherwise; its run id is the run_id with
`resume="allow"`, so a requeued job continues the same wandb run online. Offline, wandb cannot
resume: each restart leaves its own offline-run folder, and `steplaw_train.wandb_export` is the
path that yields one wandb run per run_id (it also owns the names, tags and axes used here).
"""

from __future__ import annotations

import contextlib
import json
import os
import sys
import warnings
from pathlib import Path
from typing import Any

from steplaw_train import rundir
from steplaw_train import wandb_export as wx


class NullLogger:
    """Non-zero ranks: accepts everything, writes nothing."""

    def log(self, record: dict[str, Any]) -> None:
        pass

    def summary(self, result: dict[str, Any]) -> None:
        pass

    def close(self, exit_code: int = 0, preempted: bool = False) -> None:
        pass


class Logger(NullLogger):
    """Appends one JSON line per logged step (flushed: a kill loses at most the line in flight)
    and mirrors it to wandb.

    metrics.jsonl is the run's record; wandb is a mirror, so a wandb failure never ends a run:
    the first one is reported and mirroring stops. (SLURM's SIGTERM reaches wandb's service
    process too, and the trainer must still log and checkpoint after it.)
    """

    def __init__(self, run_dir: Path, wandb_run: Any | None):
        # held open for the whole run (one append per logged step); closed by close()
        self._file = rundir.open_metrics(run_dir)
        self._wandb = wandb_run

    def _mirror(self, what: str, fn) -> None:
        if self._wandb is None:
            return
        try:
            fn(self._wandb)
        except Exception as e:  # service gone, network, quota: wandb's own error types
            warnings.warn(f"wandb {what} failed, mirroring stopped: {e!r}", stacklevel=3)
            self._wandb = None

    def log(self, record: dict[str, Any]) -> None:
        self._file.write((json.dumps(record) + "\n").encode())
        self._file.flush()
        finite = wx.finite(record)
        self._mirror("log", lambda w: w.log(finite, step=record["step"]))

    def summary(self, result: dict[str, Any]) -> None:
        """Status, losses (a diverged run's +inf smoothed loss included) and the status tag."""
        self._mirror("summary", lambda w: wx.put_summary(w, result))

    def close(self, exit_code: int = 0, preempted: bool = False) -> None:
        """Idempotent: the signal path closes before re-raising, the loop's finally again.

        `exit_code` is what wandb shows (non-zero: failed); `preempted` marks the run as
        preempting first, so a requeued run reads as preempted, not crashed."""
        if not self._file.closed:
            self._file.close()
        if preempted:
            self._mirror("mark_preempting", lambda w: w.mark_preempting())
        self._mirror("finish", lambda w: w.finish(exit_code=exit_code))
        self._wandb = None


def stop_wandb_service() -> None:
    """Shut wandb's service process down now (the signal path, before the job is killed):
    otherwise wandb's exit hook finds it killed by the job's SIGTERM and prints a traceback."""
    if "wandb" not in sys.modules:
        return
    import wandb

    with contextlib.suppress(Exception):
        wandb.teardown()


def start_wandb(
    run_id: str, run_dir: Path, config: dict, project: str, group: str | None, mode: str | None
):
    """One wandb run per run_id, across online restarts (id=run_id, resume='allow'), named,
    grouped (the sweep), tagged and plotted against tokens as the exporter does (`config` is
    spec.json's document: {"spec", "derived"}); its service
    process is started with SIGUSR1/SIGUSR2 blocked (shield.py), so the time limit's warning
    signal does not kill it before the trainer's last records."""
    import wandb

    from steplaw_train.shield import signals_blocked

    if "spec" in config:
        ident = wx.identity(config, group, "running")
    else:  # not a spec.json document: no name or tags to derive
        ident = {"name": run_id, "group": group, "job_type": wx.JOB_TYPE, "config": config}
    ident["id"] = run_id
    with signals_blocked():
        run = wandb.init(
            resume="allow",
            project=project,
            dir=str(run_dir),
            mode=mode or os.environ.get("WANDB_MODE") or "offline",
            settings=wandb.Settings(silent=True, console="off"),
            **ident,
        )
    wx.define_axes(run)
    return run


def build_logger(
    is_main: bool,
    run_dir: Path,
    run_id: str,
    config: dict,
    project: str,
    group: str | None,
    mode: str | None,
) -> NullLogger:
    """Rank 0 logs; wandb failing to start costs the dashboard, never the run (metrics.jsonl
    is the record every later stage reads)."""
    if not is_main:
        return NullLogger()
    if (mode or os.environ.get("WANDB_MODE")) == "disabled":
        return Logger(run_dir, None)
    try:
        wandb_run = start_wandb(run_id, run_dir, config, project, group, mode)
    except Exception as e:  # wandb raises its own error types (service, network, id in use)
        warnings.warn(f"wandb.init failed, logging to metrics.jsonl only: {e}", stacklevel=2)
        wandb_run = None
    return Logger(run_dir, wandb_run)
