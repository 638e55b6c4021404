"""What each run of a sweep is, from its run directory and its recorded job ids.

States: done / diverged (result.json), queued / running (a recorded job SLURM or this machine still
has, or a live trainer holding the run dir's lock: another sweep's process on another host, a
hand-started run), preempted (its job ended without a result but can resume: SLURM preempted,
timed out or cancelled it, or the local process died), failed (its job ended with an error),
cancelled (this sweep's `cancel` recorded it and no job of it is alive; resumable with
`cancel --undo`), pending (never submitted). A run dir may be shared by several sweeps (the run
store): its launch.json holds every sweep's attempts, so each sees the others' jobs. `runs/<run_id>/launch.json` is written by launch/executors.py, `submissions.jsonl`
by the sweep driver; this module only reads them (through steplaw_train/rundir.py) and asks SLURM
(`sacct`, `squeue`) in one call. A damaged result.json is "failed" with the problem as detail.
"""

from __future__ import annotations

import os
import re
import socket
import subprocess
import time
from collections import Counter
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path

from steplaw_train import rundir
from steplaw_train.shield import STOPPED_ON_SIGNAL

STATES = ("done", "diverged", "failed", "preempted", "running", "queued", "pending", "cancelled")
# what a sweep may (re)submit, before its retry rules (sweep/common.py select)
SUBMITTABLE = ("pending", "preempted", "failed")
SLURM_ACTIVE = {
    "PENDING": "queued",
    "REQUEUED": "queued",
    "REQUEUE_HOLD": "queued",
    "REQUEUE_FED": "queued",
    "CONFIGURING": "queued",
    "RESIZING": "queued",
    "SUSPENDED": "queued",
    "STOPPED": "queued",
    "RUNNING": "running",
    "COMPLETING": "running",
    "SIGNALING": "running",
    "STAGE_OUT": "running",
}
SLURM_RESUMABLE = {"PREEMPTED", "TIMEOUT", "NODE_FAIL", "CANCELLED", "BOOT_FAIL", "DEADLINE"}
# A job SLURM does not (yet) report is "queued" this long after its submission, not "failed":
# sacct lags sbatch, and calling it failed would resubmit a run that is already queued.
UNKNOWN_GRACE_S = 600.0


class SchedulerUnavailable(RuntimeError):
    """sacct and squeue both failed: no run's state can be decided, so nothing is resubmitted."""


@dataclass(frozen=True)
class RunStatus:
    run_id: str
    state: str
    attempts: int
    job_id: str | None
    detail: str = ""  # loss for finished runs, the scheduler state or error otherwise
    log: Path | None = None  # the last attempt's log (stderr) for failures


def attempts(run_dir: Path) -> list[dict]:
    return rundir.read_attempts(run_dir)


# ---- the scheduler's view ----------------------------------------------------------------------
def _expand_array_ids(job_id: str) -> list[str]:
    """'12_[1-3,7%2]' → ['12_1', '12_2', '12_3', '12_7']; plain ids unchanged."""
    m = re.fullmatch(r"(\d+)_\[([^\]]+)\]", job_id)
    if not m:
        return [job_id]
    out: list[str] = []
    for part in m.group(2).split("%")[0].split(","):
        lo, _, hi = part.partition("-")
        out += [f"{m.group(1)}_{i}" for i in range(int(lo), int(hi or lo) + 1)]
    return out


def _run(cmd: list[str]) -> str | None:
    """stdout, or None when the command could not run or failed."""
    try:
        return subprocess.run(cmd, capture_output=True, text=True, timeout=60, check=True).stdout
    except (OSError, subprocess.SubprocessError):
        return None


def slurm_states(job_ids: Iterable[str]) -> dict[str, str]:
    """Job id → SLURM state for the given ids, from sacct then squeue (squeue wins: it is live)."""
    ids = sorted(set(job_ids))
    if not ids:
        return {}
    arrays = sorted({i.split("_")[0] for i in ids})
    states: dict[str, str] = {}
    acct = _run(["sacct", "-X", "-n", "-P", "-o", "JobID,State", "-j", ",".join(arrays)])
    queue = _run(["squeue", "-h", "-r", "-o", "%i|%T", "-j", ",".join(arrays)])
    if acct is None and queue is None:
        raise SchedulerUnavailable(
            "cannot query SLURM (sacct and squeue both failed); refusing to guess which runs "
            "are queued, running or failed. Check the cluster and rerun."
        )
    for line in (acct or "").splitlines():
        jid, _, state = line.partition("|")
        for one in _expand_array_ids(jid.strip()):
            states[one] = state.split()[0] if state.strip() else "UNKNOWN"
    for line in (queue or "").splitlines():
        jid, _, state = line.partition("|")
        states[jid.strip()] = state.strip()
    return states


def process_start_time(pid: int) -> float | None:
    """When process `pid` started (seconds since the epoch), or None if it does not exist."""
    import psutil

    try:
        return psutil.Process(pid).create_time()
    except (psutil.Error, OSError):
        return None


def _pid_alive(pid: int | None, started: float | None = None) -> bool:
    """Is the recorded process still the one running? A PID the OS has since given to another
    process has another start time: that run is dead, not running."""
    if not pid:
        return False
    now_started = process_start_time(int(pid))
    if now_started is None:
        return False
    return started is None or abs(now_started - float(started)) < 1.0


def this_host() -> str:
    return socket.gethostname()


# ---- one run -----------------------------------------------------------------------------------
def run_state(run_dir: Path, slurm: dict[str, str], now: float | None = None) -> RunStatus:
    """The run's state from its records; a run that looks idle but whose lock a live trainer
    holds is "running" (trained elsewhere), so no sweep submits it a second time."""
    st = _recorded_state(run_dir, slurm, now)
    if st.state in SUBMITTABLE:
        pid = rundir.training_pid(run_dir)
        if pid is not None:
            who = f"pid {pid}" if pid else "a process"
            return RunStatus(
                st.run_id, "running", st.attempts, st.job_id, f"trained elsewhere ({who})", st.log
            )
    return st


def _recorded_state(run_dir: Path, slurm: dict[str, str], now: float | None = None) -> RunStatus:
    rid = run_dir.name
    tries = attempts(run_dir)
    last = tries[-1] if tries else {}
    job = last.get("job_id")
    try:
        result = rundir.read_result(run_dir)
    except rundir.CorruptRecord as e:
        return RunStatus(rid, "failed", len(tries), job, str(e))
    if result is not None:
        state = "diverged" if result.get("status") == "diverged" else "done"
        return RunStatus(rid, state, len(tries), job, f"loss={result.get('smooth_loss')}")
    if not tries:
        return RunStatus(rid, "pending", 0, None)
    log = Path(last["stderr"]) if last.get("stderr") else None
    if last.get("executor") == "slurm":
        s = slurm.get(str(job), "UNKNOWN")
        age = (time.time() if now is None else now) - float(last.get("time", 0.0))
        if s == "UNKNOWN" and age < UNKNOWN_GRACE_S:
            return RunStatus(rid, "queued", len(tries), job, "not yet visible to sacct/squeue")
        if s in SLURM_ACTIVE:
            return RunStatus(rid, SLURM_ACTIVE[s], len(tries), job, s)
        resumable = s in SLURM_RESUMABLE or stopped_on_signal(log)
        return RunStatus(rid, "preempted" if resumable else "failed", len(tries), job, s, log)
    ended = last.get("state")
    if ended is None:  # local/debug attempt with no recorded end: alive or killed
        # a pid means something only on its own host; elsewhere the run dir's lock decides
        here = last.get("host") in (None, this_host())
        alive = here and _pid_alive(last.get("pid"), last.get("pid_start"))
        return RunStatus(rid, "running" if alive else "preempted", len(tries), job, "", log)
    return RunStatus(
        rid,
        "failed" if ended == "failed" else "preempted",
        len(tries),
        job,
        last.get("error", ""),
        log,
    )


def sweep_states(
    sweep_dir: Path, run_ids: Iterable[str], runs_root: Path | None = None
) -> list[RunStatus]:
    """States of the given runs; one sacct + one squeue call for the whole sweep.

    A run the sweep dir does not reference yet is looked up in the run store `runs_root` (a run
    another sweep finished or queued is not pending here either)."""
    # one listing instead of three failed opens per run that was never recorded (a fresh grid
    # of 42,000 runs): those are pending
    runs = Path(sweep_dir) / rundir.RUNS
    where = {r: runs / r for r in (os.listdir(runs) if runs.is_dir() else ())}
    store = Path(runs_root) if runs_root is not None else None
    if store is not None and store.is_dir() and store != runs:
        where = {**{r: store / r for r in os.listdir(store)}, **where}
    ids = list(run_ids)
    tries = {r: attempts(where[r]) for r in ids if r in where}
    jobs = [t[-1]["job_id"] for t in tries.values() if t and t[-1].get("executor") == "slurm"]
    slurm = slurm_states(jobs)
    cancelled = rundir.read_cancelled(sweep_dir)
    out = [
        run_state(where[r], slurm) if r in where else RunStatus(r, "pending", 0, None) for r in ids
    ]
    return [with_cancel(s, cancelled) for s in out]


def with_cancel(st: RunStatus, cancelled: Mapping[str, object]) -> RunStatus:
    """A run this sweep cancelled is "cancelled" once nothing runs it (a job still stopping
    shows as queued/running; a run that finished anyway is done)."""
    if st.run_id in cancelled and st.state in SUBMITTABLE:
        return RunStatus(st.run_id, "cancelled", st.attempts, st.job_id, "cancelled", st.log)
    return st


def stopped_on_signal(log: Path | None) -> bool:
    """Did the job's trainer checkpoint on a signal and stop (its log's last lines say so)?"""
    return STOPPED_ON_SIGNAL in log_tail(log, 20)


def counts(statuses: Iterable[RunStatus]) -> dict[str, int]:
    c = Counter(s.state for s in statuses)
    return {state: c.get(state, 0) for state in STATES}


def log_tail(path: Path | None, lines: int = 15) -> str:
    """The end of a failed job's log (stderr, then stdout beside it)."""
    if path is None:
        return ""
    chunks = []
    for p in (path, path.with_suffix(".out")):
        if p.exists():
            text = p.read_text(errors="replace").rstrip().splitlines()
            chunks.append("\n".join(text[-lines:]))
    return "\n".join(c for c in chunks if c)
