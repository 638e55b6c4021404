"""Checkpoints with megatron-core dist_checkpointing (torch_dist format).

A checkpoint is `<run_dir>/checkpoints/step_<NNNNNNNN>/` holding the model, the (distributed)
optimizer, the LR scheduler, the step, the consumed samples, the divergence guard's state and the
RNG states. It counts only once its `complete` marker exists: the marker is written last (after
every rank finished saving), so a run killed mid-save never loads a half-written checkpoint.
The distributed optimizer is saved with `dp_reshardable` sharding: every rank writes its own
shard of the optimizer state, nothing is gathered (`fully_reshardable` gathers the whole state
into every rank's host memory: ~14.5 GB per rank at 1B), and a run can still resume on a
different number of data-parallel ranks (the only parallelism we use). Replicated tensors (the
model, a plain optimizer's state) are written by all data-parallel ranks in parallel, each a
share (megatron's fully parallel save strategy). A load takes the sharding type from the
checkpoint's own content metadata, so checkpoints written with another type still load.

When a run finishes (train.finish) it keeps what `options.final_checkpoint` asks for: the
model's weights alone in `checkpoints/final/` (`save_model`; megatron's own sharded state dict
of the model, loadable with `load_model` into a freshly built model), its last full checkpoint,
or nothing; then result.json is written, then `prune_steps` deletes the other step checkpoints.
That order is what makes a crash anywhere harmless: before result.json the run resumes from its
step checkpoints (and writes the final save again); after it, a rerun returns the result and
finishes the prune (`finish_pending_prune`).
"""

from __future__ import annotations

import contextlib
import errno
import os
import queue
import random
import re
import shutil
import sys
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.distributed as dist

from steplaw_train import rundir

COMPLETE = "complete"
_STEP_DIR = re.compile(r"^step_(\d{8})$")
SHARDING_TYPE = "dp_reshardable"
_SHARDING = {"distrib_optim_sharding_type": SHARDING_TYPE}


@dataclass
class TrainState:
    """The loop's own state (everything besides model/optimizer/scheduler)."""

    step: int = 0
    consumed_samples: int = 0
    first_loss: float = float("nan")  # the untrained model's loss (~ln vocab): the guard's ceiling
    loss_ema: float = float("nan")  # the divergence guard's running mean of the loss
    best_ema: float = float("inf")


def ckpt_root(run_dir: Path) -> Path:
    return rundir.checkpoints_dir(run_dir)


def step_dir(run_dir: Path, step: int) -> Path:
    return ckpt_root(run_dir) / f"step_{step:08d}"


def complete_steps(run_dir: Path) -> list[int]:
    """Steps of the complete checkpoints, ascending."""
    root = ckpt_root(run_dir)
    if not root.exists():
        return []
    steps = []
    for p in root.iterdir():
        m = _STEP_DIR.match(p.name)
        if m and (p / COMPLETE).exists():
            steps.append(int(m.group(1)))
    return sorted(steps)


def latest_step(run_dir: Path) -> int | None:
    steps = complete_steps(run_dir)
    return steps[-1] if steps else None


def _rng_state() -> dict[str, Any]:
    state = {
        "python": random.getstate(),
        "numpy": np.random.get_state(),
        "torch": torch.get_rng_state(),
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state()
    return state


def _set_rng_state(state: dict[str, Any]) -> None:
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state(state["cuda"])


def _ensure_optimizer_state(optimizer) -> None:
    """Give a fresh distributed optimizer dummy Adam state before loading into it.

    Without Apex/TE (the CPU path), megatron's DistributedOptimizer.state_dict() asserts that
    the inner torch optimizer has a `step`, which a never-stepped optimizer lacks; megatron's own
    dummy-state initialiser fills it, and the load then overwrites every value in place.
    """
    for opt in getattr(optimizer, "chained_optimizers", [optimizer]):
        init = getattr(opt, "_init_optimizer_states_with_dummy_values", None)
        if init is not None and not opt.optimizer.state:
            init()


def _restore_torch_adam_steps(optimizer, loaded: Any) -> None:
    """Put the checkpoint's Adam step back into a distributed optimizer's torch-Adam state.

    Without TE/Apex (the CPU path) megatron-core 0.16.1's DistributedOptimizer.load_state_dict
    first sets torch Adam's per-parameter `step` from the checkpoint's param_groups, then its
    dp_reshardable parameter-state load copies over it the step of the dummy state the load
    started from: bias correction restarted at step 1 and a resumed run drifted (0.4% in loss
    one step after the resume, tests/test_checkpoint_sharding.py). TE's FusedAdam keeps the step
    in param_groups, which that copy does not touch, so this is a no-op on the GPU path. Each
    parameter gets a tensor of its own, as a fresh torch Adam has (it increments them in place).
    """
    opts = list(getattr(optimizer, "chained_optimizers", [optimizer]))
    states = [loaded] if len(opts) == 1 else [loaded[k] for k in sorted(loaded)]
    for opt, sd in zip(opts, states, strict=True):
        if "param_state" not in sd:  # not a distributed optimizer
            continue
        inner = opt.optimizer
        for group, saved in zip(inner.param_groups, sd["optimizer"]["param_groups"], strict=True):
            if saved.get("step") is None:
                continue
            for p in group["params"]:
                st = inner.state.get(p)
                if st and torch.is_tensor(st.get("step")):
                    old = st["step"]
                    st["step"] = torch.tensor(
                        float(saved["step"]), dtype=old.dtype, device=old.device
                    )


def _sharded_state(model, optimizer, is_loading: bool, metadata: dict) -> dict[str, Any]:
    if is_loading:
        _ensure_optimizer_state(optimizer)
    model_sd = model.module.sharded_state_dict()
    opt_sd = optimizer.sharded_state_dict(model_sd, is_loading=is_loading, metadata=metadata)
    return {"model": model_sd, "optimizer": opt_sd}


def _save_strategy():
    """torch_dist, with the writes of replicated tensors spread over the data-parallel ranks
    (otherwise rank 0 alone writes the whole model)."""
    from megatron.core import parallel_state
    from megatron.core.dist_checkpointing.serialization import get_default_save_sharded_strategy
    from megatron.core.dist_checkpointing.strategies.fully_parallel import (
        FullyParallelSaveStrategyWrapper,
    )

    base = get_default_save_sharded_strategy("torch_dist")
    if not dist.is_initialized() or dist.get_world_size() == 1:
        return base
    return FullyParallelSaveStrategyWrapper(base, parallel_state.get_data_parallel_group())


def sharding_metadata(path: Path) -> dict:
    """The content metadata a checkpoint was saved with (its optimizer sharding type); {} for a
    checkpoint without any (megatron then assumes its own default)."""
    from megatron.core import dist_checkpointing

    return dict(dist_checkpointing.load_content_metadata(str(path)) or {})


def final_record(kind: str, run_dir: Path, step: int | None) -> dict[str, Any]:
    """result.json's `final_checkpoint`: what the run kept and where (relative to the run dir)."""
    if kind == "model":
        path = rundir.final_checkpoint_dir(run_dir)
    elif kind == "full" and step is not None:
        path = step_dir(run_dir, step)
    else:
        return {"kind": "none", "path": None, "step": None}
    return {"kind": kind, "path": str(path.relative_to(run_dir)), "step": step}


def save_model(run_dir: Path, model, step: int) -> Path:
    """The model's weights only (no optimizer, scheduler or RNG state): `checkpoints/final/`.

    megatron-core's dist_checkpointing of the model's own sharded_state_dict, written by all
    data-parallel ranks in parallel like a full save; 2 bytes per parameter in bf16 instead of
    ~14. A leftover of an earlier attempt (a crash before result.json) is replaced; the
    `complete` marker comes last, so a half-written one is never taken for a model.
    """
    from megatron.core import dist_checkpointing

    path = rundir.final_checkpoint_dir(run_dir)
    rank0 = _is_rank0()
    if rank0:
        with save_errors_named(path):
            if path.exists():
                shutil.rmtree(path)
            path.mkdir(parents=True)
    if dist.is_initialized():
        dist.barrier()
    sd = {"model": model.module.sharded_state_dict()}
    use_in_process_results_queue()
    with save_errors_named(path):
        dist_checkpointing.save(sd, str(path), sharded_strategy=_save_strategy())
    if dist.is_initialized():
        dist.barrier()
    if rank0:
        with save_errors_named(path):
            _write_marker(path / COMPLETE, step)
    return path


def load_model(path: Path, module) -> None:
    """Load a model-only checkpoint (`save_model`) into a built model (GPTModel, or the
    Float16Module around it); it must have the same shape and precision."""
    from megatron.core import dist_checkpointing

    path = Path(path)
    if not (path / COMPLETE).exists():
        raise FileNotFoundError(f"{path} is not a complete checkpoint (no {COMPLETE} marker)")
    loaded = dist_checkpointing.load({"model": module.sharded_state_dict()}, str(path))
    module.load_state_dict(loaded["model"])


def prune_steps(run_dir: Path, keep_step: int | None = None) -> None:
    """Delete every step checkpoint but `keep_step` (a finished run's; rank 0 only).

    Each one loses its marker first: a crash in the middle of a deletion leaves an incomplete
    directory that nothing loads and the next prune or start removes. `step_N.unloadable`
    directories (set aside by load_latest as evidence of a fault) are left alone.
    """
    root = ckpt_root(run_dir)
    if not root.exists():
        return
    for p in sorted(root.iterdir()):
        m = _STEP_DIR.match(p.name)
        if not m or int(m.group(1)) == keep_step:
            continue
        with contextlib.suppress(FileNotFoundError):
            (p / COMPLETE).unlink()
        shutil.rmtree(p, ignore_errors=True)


def finish_pending_prune(run_dir: Path, result: dict[str, Any], prune: bool) -> None:
    """A rerun of a finished run completes the prune a crash after result.json cut short.

    Only for results written by this lifecycle (they record `final_checkpoint`): the step
    checkpoints of runs finished before it are theirs to keep.
    """
    final = result.get("final_checkpoint")
    if not prune or not isinstance(final, dict):
        return
    keep = final.get("step") if final.get("kind") == "full" else None
    prune_steps(run_dir, keep)


def save(run_dir: Path, model, optimizer, scheduler, state: TrainState, keep: int) -> Path:
    """Save, then mark complete, then prune older checkpoints (rank 0 does the file work)."""
    from megatron.core import dist_checkpointing

    path = step_dir(run_dir, state.step)
    rank0 = not dist.is_initialized() or dist.get_rank() == 0
    if rank0:
        with save_errors_named(path):
            if path.exists():
                shutil.rmtree(path)  # an incomplete leftover of an earlier attempt
            path.mkdir(parents=True)
    if dist.is_initialized():
        dist.barrier()
    sd = _sharded_state(model, optimizer, is_loading=False, metadata=_SHARDING)
    sd["scheduler"] = scheduler.state_dict()
    sd["train_state"] = asdict(state)
    sd["rng"] = _rng_state()
    use_in_process_results_queue()
    with save_errors_named(path):
        dist_checkpointing.save(
            sd, str(path), sharded_strategy=_save_strategy(), content_metadata=_SHARDING
        )
    if dist.is_initialized():
        dist.barrier()
    if rank0:
        with save_errors_named(path):
            _write_marker(path / COMPLETE, state.step)
        for old in complete_steps(run_dir)[:-keep] if keep > 0 else []:
            shutil.rmtree(step_dir(run_dir, old), ignore_errors=True)
    return path


def _write_marker(marker: Path, step: int) -> None:
    with open(marker, "w") as f:
        f.write(f"{step}\n")
        f.flush()
        os.fsync(f.fileno())


# what a checkpoint failure must never swallow: the user's ^C, an exit, a generator closing
_NOT_OURS = (KeyboardInterrupt, SystemExit, GeneratorExit)


def _one_line(e: BaseException) -> str:
    """The innermost line that says what went wrong (torch wraps rank errors in tracebacks)."""
    lines = [ln.strip() for ln in (str(e) or repr(e)).splitlines() if ln.strip()]
    said = [ln for ln in lines if not ln.startswith(("Traceback", "File ", "^", "~"))]
    return f"{type(e).__name__}: {said[-1] if said else ''}"[:400]


class CheckpointSaveError(OSError):
    """A save failed; errno and filename say why and where (ENOSPC: the disk is full)."""


@contextlib.contextmanager
def save_errors_named(path: Path):
    """Turn any failure of a save into CheckpointSaveError naming the path and the errno.

    torch's writer reports a full disk as `unexpected pos 704 vs 598` (a RuntimeError with no
    errno), so when the error carries none the directory is probed with a real write; the
    half-written checkpoint is then removed (it has no marker, so it would never load) to give
    the space back. Older complete checkpoints are untouched: a rerun resumes from them.
    """
    try:
        yield
    except (CheckpointSaveError, *_NOT_OURS):
        raise
    except BaseException as e:  # torch's CheckpointException is a BaseException
        err = _errno_of(e) or _probe_errno(path)
        shutil.rmtree(path, ignore_errors=True)
        code = errno.errorcode.get(err, "unknown errno") if err else "no errno"
        why = os.strerror(err) if err else f"{type(e).__name__}: {e}"
        raise CheckpointSaveError(
            err or 0,
            f"checkpoint save failed: {why} ({code}); the run stopped, older complete "
            f"checkpoints are kept and a rerun resumes from them (error: {_one_line(e)})",
            str(path),
        ) from e


def _errno_of(e: BaseException | None) -> int | None:
    """The errno of the first OSError in an exception's cause/context chain."""
    seen = 0
    while e is not None and seen < 20:
        if isinstance(e, OSError) and e.errno:
            return e.errno
        e, seen = e.__cause__ or e.__context__, seen + 1
    return None


def _probe_errno(path: Path, size: int = 1 << 20) -> int | None:
    """Write and fsync `size` bytes next to the checkpoint; the errno that write gets, or None."""
    probe = Path(path).parent / f".probe_{os.getpid()}"
    try:
        with open(probe, "wb") as f:
            f.write(b"\0" * size)
            f.flush()
            os.fsync(f.fileno())
    except OSError as e:
        return e.errno
    finally:
        with contextlib.suppress(OSError):
            probe.unlink()
    return None


UNLOADABLE = ".unloadable"


def load_latest(run_dir: Path, model, optimizer, scheduler, warn=None) -> TrainState | None:
    """Load the newest complete checkpoint that loads; TrainState() if there is none; None if
    there were some but none loaded (the failed attempts may have touched the live objects, so
    the caller rebuilds them before starting over).

    A checkpoint that fails to load (corrupt bytes, torn metadata, a file lost on a shared
    filesystem) is renamed `step_N.unloadable` — kept for inspection, out of the resume and
    pruning order — and the next older one is tried; `warn` (stderr by default) says which was
    skipped and why. Every piece of state (model, optimizer, scheduler, RNG, loop state) comes
    from the one checkpoint that loaded and data order is a function of the consumed samples, so
    the resumed run is bitwise equal to an uninterrupted one; with none left it starts over,
    which gives the same run again.
    """
    warn = warn or (lambda msg: print(msg, file=sys.stderr, flush=True))
    steps = complete_steps(run_dir)
    if not steps:
        return TrainState()
    for step in reversed(steps):
        try:
            state, error = load(run_dir, step, model, optimizer, scheduler), None
        except _NOT_OURS:
            raise
        except BaseException as e:  # torch's CheckpointException is a BaseException
            state, error = None, _one_line(e)
        if _all_ranks_ok(error is None):
            return state  # type: ignore[return-value]
        path = step_dir(run_dir, step)
        error = error or "another rank failed to load it"
        aside = _set_aside(path) if _is_rank0() else path.with_name(path.name + UNLOADABLE)
        warn(f"warning: checkpoint {path} failed to load ({error}); skipped, moved to {aside}")
    warn(f"warning: no checkpoint of {run_dir} loads; the run starts over from step 0")
    return None


def _is_rank0() -> bool:
    return not dist.is_initialized() or dist.get_rank() == 0


def _all_ranks_ok(ok: bool) -> bool:
    """Every rank takes the same checkpoint: one rank's failure makes all of them skip it."""
    if not dist.is_initialized():
        return ok
    t = torch.tensor([int(ok)], dtype=torch.int64)
    if torch.cuda.is_available() and dist.get_backend() == "nccl":
        t = t.cuda()
    dist.all_reduce(t, op=dist.ReduceOp.MIN)
    ok = bool(int(t))
    dist.barrier()
    return ok


def _set_aside(path: Path) -> Path:
    target = path.with_name(path.name + UNLOADABLE)
    n = 1
    while target.exists():
        n += 1
        target = path.with_name(f"{path.name}{UNLOADABLE}.{n}")
    with contextlib.suppress(OSError):
        path.rename(target)
    return target


def load(run_dir: Path, step: int, model, optimizer, scheduler) -> TrainState:
    """Restore everything saved by `save` into the live objects; return the loop state."""
    from megatron.core import dist_checkpointing

    path = step_dir(run_dir, step)
    sd = _sharded_state(model, optimizer, is_loading=True, metadata=sharding_metadata(path))
    loaded = dist_checkpointing.load(sd, str(path))
    model.module.load_state_dict(loaded["model"])
    with torch.no_grad():  # fp32 + distributed optimizer: main params are views of the weights
        optimizer.load_state_dict(loaded["optimizer"])
        _restore_torch_adam_steps(optimizer, loaded["optimizer"])
    scheduler.load_state_dict(loaded["scheduler"])
    _set_rng_state(loaded["rng"])
    ts = loaded["train_state"]
    return TrainState(
        step=int(ts["step"]),
        consumed_samples=int(ts["consumed_samples"]),
        first_loss=float(ts["first_loss"]),
        loss_ema=float(ts["loss_ema"]),
        best_ema=float(ts["best_ema"]),
    )


def remove_incomplete(run_dir: Path) -> None:
    """Delete checkpoint dirs without a marker (left by a kill during a save or a prune)."""
    root = ckpt_root(run_dir)
    if not root.exists():
        return
    for p in root.iterdir():
        ours = _STEP_DIR.match(p.name) or p.name == rundir.FINAL_CHECKPOINT
        if ours and not (p / COMPLETE).exists():
            shutil.rmtree(p, ignore_errors=True)


def use_in_process_results_queue() -> None:
    """Give megatron's torch_dist writer an in-process queue for its write results.

    At its first save megatron builds a spawn-context multiprocessing Manager to carry the write
    results from its writer processes back to the trainer. That is needed only for an async
    save (the writing then runs in a forked child); our saves are synchronous: the trainer
    process itself collects its forked writers' results, puts them in the queue and reads them
    back (filesystem_async.write_preloaded_data_multiproc, retrieve_write_results). A
    `queue.Queue` does that without a second Python process, which cost ~2.6 s of CPU per run
    (the spawned Manager re-imports the trainer's modules), had
    to be shielded from the job's signals (killed by SLURM's SIGTERM, it made the
    checkpoint-on-signal fail with BrokenPipeError) and could be orphaned (only an atexit hook
    stopped it).
    """
    from megatron.core.dist_checkpointing.strategies import filesystem_async

    if not isinstance(filesystem_async._results_queue, queue.Queue):
        filesystem_async._results_queue = queue.Queue()
