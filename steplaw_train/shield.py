"""Start helper processes deaf to the signals that ask the trainer to checkpoint.

SLURM delivers a preemption's SIGTERM, and the time limit's warning signal (SIGUSR2 here), to
every process of the job step, not only to the trainer. The trainer answers by saving a
checkpoint, which needs megatron's checkpoint-writer Manager alive: that process ignores them
from its start (`ignore_job_signals`, its initializer). An inherited signal mask is not enough
for it: the spawned Python child comes up with SIGTERM unblocked again (measured).
wandb's service (a Go program) is started inside `signals_blocked()`: it keeps SIGUSR1/SIGUSR2
blocked, but the Go runtime unblocks SIGTERM, so a preemption still kills it; metrics.Logger
therefore treats wandb as a mirror that may disappear.
"""

from __future__ import annotations

import contextlib
import signal
from collections.abc import Iterator

SHIELDED_SIGNALS = (signal.SIGTERM, signal.SIGUSR1, signal.SIGUSR2)


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
