"""Keep the job's checkpoint signals for the trainer.

SLURM delivers a preemption's SIGTERM, and the time limit's warning signal (SIGUSR2 here), to
every process of the job step, not only to the trainer, which answers by saving a checkpoint.
The trainer starts no Python helper a signal could kill mid-save (megatron's checkpoint-writer
Manager is replaced by an in-process queue: checkpoint.use_in_process_results_queue; the writer
processes a save forks are its own children for the length of the save).
wandb's service (a Go program) is started inside `signals_blocked()`: it keeps SIGUSR1/SIGUSR2
blocked, but the Go runtime unblocks SIGTERM, so a preemption still kills it; metrics.Logger
therefore treats wandb as a mirror that may disappear.
"""

from __future__ import annotations

import contextlib
import signal
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
