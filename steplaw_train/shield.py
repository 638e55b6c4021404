"""Start helper processes deaf to the signals that ask the trainer to checkpoint.

SLURM delivers a preemption's SIGTERM, and the time limit's warning signal (SIGUSR2 here), to
every process of the job step, not only to the trainer. The trainer answers by saving a
checkpoint, which needs megatron's checkpoint-writer Manager alive: that process ignores them
from its start (`ignore_job_signals`, its initializer). An inherited signal mask is not enough
for it: the spawned Python child comes up with SIGTERM unblocked again (measured).
wandb's service (a Go program) is started inside `signals_blocked()`: it keeps SIGUSR1/SIGUSR2
blocked, but the Go runtime unblocks SIGTERM, so a preemption still kills it; metrics.Logger
therefore treats wandb as a mirror that may disappear.

Deaf to SIGTERM, such a helper would outlive a trainer killed with SIGKILL (the OOM killer, a
user's `kill -9` of the one process): reparented to init, it and the resource tracker it keeps
open would live for good. `die_with_parent` asks the kernel (prctl PR_SET_PDEATHSIG, Linux) to
SIGKILL the helper when its parent dies, and covers a parent already gone before the call.
"""

from __future__ import annotations

import contextlib
import ctypes
import os
import signal
import sys
from collections.abc import Iterator

SHIELDED_SIGNALS = (signal.SIGTERM, signal.SIGUSR1, signal.SIGUSR2)
# The trainer's last stderr line when it checkpointed on a signal and stops: launch/status.py
# reads it so a job that then exits non-zero (SLURM "FAILED" after `scancel --signal=TERM`) is
# recorded as preempted (resumable), not failed.
STOPPED_ON_SIGNAL = "steplaw: checkpointed and stopped on signal"


@contextlib.contextmanager
def signals_blocked() -> Iterator[None]:
    old = signal.pthread_sigmask(signal.SIG_BLOCK, SHIELDED_SIGNALS)
    try:
        yield
    finally:
        signal.pthread_sigmask(signal.SIG_SETMASK, old)


def ignore_job_signals() -> None:
    """Initializer of helper processes: SIGTERM/SIGUSR1/SIGUSR2 are the trainer's business."""
    for sig in SHIELDED_SIGNALS:
        signal.signal(sig, signal.SIG_IGN)


PR_SET_PDEATHSIG = 1  # <linux/prctl.h>


def die_with_parent(parent_pid: int) -> None:
    """SIGKILL this process when `parent_pid` (its parent) dies; no-op off Linux."""
    if not sys.platform.startswith("linux"):
        return
    libc = ctypes.CDLL(None, use_errno=True)
    if libc.prctl(PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0) != 0:
        return  # not fatal: the trainer's own shutdown paths still stop the helper
    if os.getppid() != parent_pid:  # the parent died before prctl took effect
        os.kill(os.getpid(), signal.SIGKILL)


def helper_initializer(parent_pid: int) -> None:
    """Initializer of the trainer's helper processes: deaf to job signals, dead with the trainer."""
    ignore_job_signals()
    die_with_parent(parent_pid)
