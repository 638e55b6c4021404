"""One Step Law run, start to finish: `run(spec, run_dir, options) -> result dict`.

The loop is megatron-core's own training path: GPTModel (model.py) wrapped in megatron DDP,
`get_megatron_optimizer` (AdamW, distributed optimizer), `OptimizerParamScheduler` (schedule.py)
and `get_forward_backward_func` with gradient accumulation over micro-batches. What this module
adds is the run's life cycle:

* validate everything before any work (SpecError names the field);
* resume from the latest complete checkpoint whatever restarted the run (requeue, kill -9, a
  rerun by hand), truncating metrics.jsonl to the checkpoint so the file equals an uninterrupted
  run's — data order is a pure function of consumed samples, so the loss curve is bitwise equal;
* checkpoint every `checkpoint_minutes` of wall time (rank 0's clock), every
  `checkpoint_interval` steps if set, and when SIGTERM/SIGUSR1/SIGUSR2 arrive (the handler only
  sets a flag; the save happens at the next step boundary, then the signal is re-raised with the
  previous handler restored, so submitit or the default action still apply); ranks decide on one
  all-reduced snapshot of the signal and the clock, as the save is collective;
* at the end, the final save `final_checkpoint` asks for (model weights only by default), then
  result.json, then the step checkpoints are pruned (checkpoint.py: crash-safe in that order);
* the divergence guard: a non-finite loss, or after warmup a loss EMA above `divergence_factor` x
  its best so far, ends the run with status "diverged" and smooth_loss = inf;
* result.json last, atomically; a finished run directory is returned unchanged, never rewritten
  (a rerun only completes a prune that a crash cut short).

`main()` is the Hydra shell: `python -m steplaw_train.train model=demo_dense data=demo ...`.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import queue
import signal
import sys
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from steplaw_train import checkpoint as ckpt
from steplaw_train import distributed, flops, provenance, rundir
from steplaw_train import metrics as mx
from steplaw_train.locks import LockUnsupported
from steplaw_train.options import DEVICES, RunOptions, validate_options
from steplaw_train.shield import STOPPED_ON_SIGNAL
from steplaw_train.smoothing import smoothed_final_loss
from steplaw_train.spec import RunSpec, SpecError, validate

HANDLED_SIGNALS = (signal.SIGTERM, signal.SIGUSR1, signal.SIGUSR2)


# ---- plan: pure decisions taken before any work ----------------------------------------------
@dataclass(frozen=True)
class Plan:
    data_parallel: int
    micro_batch_size: int
    num_microbatches: int
    use_cuda: bool
    bf16: bool
    # GPU by default (docs/design.md); options.distributed_optimizer=true also on CPU (tests)
    distributed_optimizer: bool = False
    deterministic: bool = False

    @property
    def overlap(self) -> bool:
        """GPU with the distributed optimizer: the gradient reduce-scatter overlaps the backward
        pass (bucketed) and the parameter all-gather the next forward (a forward pre-hook). Off
        on CPU, where the tests pin the loss curves bitwise."""
        return self.use_cuda and self.distributed_optimizer


def auto_micro_batch(per_rank: int, max_micro_batch: int) -> int:
    """Largest divisor of the per-rank batch not above max_micro_batch."""
    return max(d for d in range(1, min(per_rank, max(1, max_micro_batch)) + 1) if per_rank % d == 0)


def make_plan(spec: RunSpec, options: RunOptions, use_cuda: bool, data_parallel: int) -> Plan:
    """Validate spec + options; choose micro-batching and precision. Raises SpecError."""
    validate_options(options)
    validate(spec, data_parallel=data_parallel, micro_batch_size=options.micro_batch_size)
    per_rank = spec.train.batch_size // data_parallel  # validate() checked it divides
    mbs = options.micro_batch_size or auto_micro_batch(per_rank, options.max_micro_batch)
    bf16 = options.precision == "bf16" or (options.precision == "auto" and use_cuda)
    dist_opt = use_cuda if options.distributed_optimizer is None else options.distributed_optimizer
    return Plan(
        data_parallel,
        mbs,
        per_rank // mbs,
        use_cuda,
        bf16,
        distributed_optimizer=bool(dist_opt),
        deterministic=bool(options.deterministic),
    )


def resolve_device(device: str, cuda_available: bool) -> bool:
    """options.device -> use CUDA? "cuda" without a usable GPU is an error, not a CPU run."""
    if device not in DEVICES:
        raise SpecError("options.device", f"must be one of {DEVICES}, got {device!r}")
    if device == "cuda" and not cuda_available:
        raise SpecError(
            "options.device",
            "is 'cuda' but torch sees no GPU (CUDA_VISIBLE_DEVICES="
            f"{os.environ.get('CUDA_VISIBLE_DEVICES')!r}, torch {torch.__version__}, "
            f"built for CUDA {torch.version.cuda})",
        )
    return cuda_available if device == "auto" else device == "cuda"


def apply_determinism(plan: Plan) -> None:
    """Bitwise-reproducible GPU kernels (options.deterministic), set before NCCL and TE start.

    TE's fused attention backward uses atomics unless NVTE_ALLOW_NONDETERMINISTIC_ALGO=0
    (megatron's deterministic_mode refuses to run otherwise); cuBLAS needs a fixed workspace;
    NCCL's algorithm choice can change the reduction order between runs, so it is pinned to
    Ring. torch's deterministic mode warns (not raises) on an op without a deterministic kernel.
    CPU runs are deterministic already.
    """
    if not (plan.use_cuda and plan.deterministic):
        return
    os.environ["NVTE_ALLOW_NONDETERMINISTIC_ALGO"] = "0"
    os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
    os.environ.setdefault("NCCL_ALGO", "Ring")
    torch.use_deterministic_algorithms(True, warn_only=True)


# fp32 weights + fp32 gradients + Adam's two moments: a lower bound on a rank's training memory
# (bf16 adds main params; activations come on top), enough to refuse a shape that cannot fit
BYTES_PER_PARAMETER = 16


def device_memory_bytes(use_cuda: bool) -> int:
    """Memory of one rank's device: the GPU's, or this machine's RAM on CPU."""
    if use_cuda:
        return int(torch.cuda.get_device_properties(torch.cuda.current_device()).total_memory)
    import psutil

    return int(psutil.virtual_memory().total)


def check_memory(spec: RunSpec, use_cuda: bool, available: int | None = None) -> None:
    """SpecError on `model` if weights, gradients and optimizer state alone exceed the device.

    Checked before megatron allocates anything: a typo such as hidden=65536 would otherwise
    allocate (and on CPU swap) for minutes before an out-of-memory error.
    """
    from steplaw_train import params

    total = spec.N + params.embedding_params(spec.data.vocab_size, spec.model.hidden)
    need = total * BYTES_PER_PARAMETER
    have = device_memory_bytes(use_cuda) if available is None else available
    if need > have:
        m = spec.model
        raise SpecError(
            "model",
            f"{total:.3g} parameters (hidden={m.hidden}, ffn_hidden={m.ffn_hidden}, "
            f"layers={m.layers}) need at least {need / 2**30:.1f} GiB for weights, gradients "
            f"and Adam state; this {'GPU' if use_cuda else 'machine'} has {have / 2**30:.1f} GiB",
        )


def check_data(spec: RunSpec, options: RunOptions) -> None:
    """Missing dataset files are a SpecError on data.sources (data.py knows the layout)."""
    from steplaw_train.data import check_data as check

    check(spec.data, Path(options.data_root))


# ---- the signal flag ---------------------------------------------------------------------------
class SignalFlag:
    """Records the first of SIGTERM/SIGUSR1/SIGUSR2; the loop checkpoints at the next boundary."""

    def __init__(self) -> None:
        self.signum: int | None = None
        self._previous: dict[int, Any] = {}

    def install(self) -> None:
        for s in HANDLED_SIGNALS:
            # ValueError off the main thread: there the launcher handles signals itself
            with contextlib.suppress(ValueError):
                self._previous[s] = signal.signal(s, self._handle)

    def _handle(self, signum, frame) -> None:
        if self.signum is None:
            self.signum = signum

    def agree(self, world_size: int, time_due: bool = False) -> tuple[int | None, bool]:
        """The signal this step acts on and whether the save clock is due, the same on every rank.

        SLURM and torchrun deliver a signal to each process at slightly different steps, and the
        checkpoint save is collective, so ranks decide on an all-reduced snapshot of their flags.
        A signal landing after the snapshot (even during the all-reduce itself) waits for the
        next step's agreement: deciding on the live flag let one rank enter the save alone
        while the others went on training (a deadlock, seen once in CI). The time-based save
        rides on the same all-reduce (no second collective per step): only rank 0 passes its
        clock's verdict (`time_due`), the others 0, so every rank saves at the step rank 0's
        clock says, whatever their own clocks read.
        """
        local = self.signum or 0
        if world_size == 1:
            return local or None, bool(time_due)
        t = torch.tensor([local, int(bool(time_due))], dtype=torch.int64)
        if torch.cuda.is_available():
            t = t.cuda()
        torch.distributed.all_reduce(t, op=torch.distributed.ReduceOp.MAX)
        agreed, due = int(t[0]), bool(int(t[1]))
        if agreed and self.signum is None:
            self.signum = agreed  # a rank the signal has not reached re-raises it too
        return agreed or None, due

    def restore(self) -> None:
        for s, prev in self._previous.items():
            signal.signal(s, prev if prev is not None else signal.SIG_DFL)
        self._previous.clear()

    def reraise(self) -> None:
        """Hand the signal to whoever handled it before us (submitit requeue, or the default)."""
        signum = self.signum
        self.restore()
        if signum is not None:
            print(
                f"{STOPPED_ON_SIGNAL} {signal.Signals(signum).name}; the run resumes from its "
                "checkpoints",
                file=sys.stderr,
                flush=True,
            )
            mx.stop_wandb_service()
            os.kill(os.getpid(), signum)
            time.sleep(5)  # a Python-level handler runs at the next bytecode; default kills us
            raise SystemExit(128 + signum)


@dataclass
class SaveClock:
    """Wall time since the last save (or this process's start of training): a save is due every
    `minutes` (None or 0: never). Only rank 0's verdict is used (SignalFlag.agree)."""

    minutes: float | None
    last: float = 0.0

    def __post_init__(self) -> None:
        self.last = time.monotonic()

    def due(self) -> bool:
        return bool(self.minutes) and time.monotonic() - self.last >= 60.0 * self.minutes

    def reset(self) -> None:
        self.last = time.monotonic()


def step_save_due(interval: int | None, step: int) -> bool:
    """The step interval (tests, short runs): None or 0 is off."""
    return bool(interval) and step % interval == 0


# ---- data --------------------------------------------------------------------------------------
def build_dataset(spec: RunSpec, options: RunOptions):
    from steplaw_train.data import build_train_dataset

    return build_train_dataset(
        spec.data,
        seq_len=spec.train.seq_len,
        num_samples=spec.iterations * spec.train.batch_size,
        seed=spec.train.seed,
        data_root=Path(options.data_root),
    )


BATCH_KEYS = ("tokens", "labels", "loss_mask", "position_ids")


def host_batches(dataset, start_sample: int, global_batch: int, rank: int, plan: Plan, pin: bool):
    """Micro-batches in order, in host memory; sample i of the run is always dataset[i]
    (resume = skip ahead). Rank r takes a contiguous slice of each global batch; the slice is
    cut into micro-batches. `pin`: page-locked, so the copy to the GPU can be asynchronous."""
    per_rank = plan.micro_batch_size * plan.num_microbatches
    base = start_sample
    while True:
        first = base + rank * per_rank
        for j in range(plan.num_microbatches):
            lo = first + j * plan.micro_batch_size
            items = [dataset[i] for i in range(lo, lo + plan.micro_batch_size)]
            batch = {k: torch.stack([torch.as_tensor(it[k]) for it in items]) for k in BATCH_KEYS}
            yield {k: v.pin_memory() for k, v in batch.items()} if pin else batch
        base += global_batch


def prefetched(source, depth: int, on_start=None):
    """Items of `source` built ahead by a background thread, at most `depth` waiting; same
    order. The producer's exceptions are re-raised here. (The dataset's __getitem__ is numpy
    reads that release the GIL, so the next step's batches are built during this one.)
    `on_start` runs first in the thread (the CUDA device is per thread: pinning memory from a
    thread left on device 0 would open a context there for every rank of the node)."""
    q: queue.Queue = queue.Queue(maxsize=depth)
    stop = threading.Event()
    end = object()

    def produce() -> None:
        try:
            if on_start is not None:
                on_start()
            for item in source:
                while not stop.is_set():
                    try:
                        q.put(item, timeout=0.1)
                        break
                    except queue.Full:
                        continue
                if stop.is_set():
                    return
        except BaseException as e:  # handed to the consumer
            q.put(e)
        q.put(end)

    threading.Thread(target=produce, daemon=True, name="batch-prefetch").start()
    try:
        while True:
            item = q.get()
            if item is end:
                return
            if isinstance(item, BaseException):
                raise item
            yield item
    finally:
        stop.set()


def batch_iterator(dataset, start_sample: int, global_batch: int, rank: int, plan: Plan, device):
    """Micro-batches on `device`, in order.

    CPU: built in this thread, exactly as before (the bitwise-resume tests pin it). CUDA: the
    next step's micro-batches are built ahead in a thread in pinned memory and copied with
    non_blocking=True, so neither batch building nor the host-to-device copy stalls the GPU.
    """
    if device.type != "cuda":
        yield from host_batches(dataset, start_sample, global_batch, rank, plan, pin=False)
        return
    host = host_batches(dataset, start_sample, global_batch, rank, plan, pin=True)
    for batch in prefetched(
        host, depth=2 * plan.num_microbatches, on_start=lambda: torch.cuda.set_device(device)
    ):
        yield {k: v.to(device, non_blocking=True) for k, v in batch.items()}


def forward_step(data_iterator, model):
    """megatron's forward_step_func: returns the logits-loss and a loss function."""
    batch = next(data_iterator)
    out = model(batch["tokens"], batch["position_ids"], None, labels=batch["labels"])
    mask = batch["loss_mask"].float()

    def loss_func(per_token):
        loss = (per_token.float() * mask).sum() / mask.sum().clamp(min=1)
        # clone: megatron divides the returned loss by num_microbatches in place
        return loss, {"loss": loss.detach().clone()}

    return out, loss_func


# ---- building the megatron objects -------------------------------------------------------------
def build_components(spec: RunSpec, plan: Plan):
    from megatron.core.distributed import DistributedDataParallel, DistributedDataParallelConfig
    from megatron.core.distributed.finalize_model_grads import finalize_model_grads
    from megatron.core.optimizer import OptimizerConfig, get_megatron_optimizer

    from steplaw_train.model import build_model
    from steplaw_train.schedule import build_scheduler

    t = spec.train
    gpt = build_model(
        spec.model,
        spec.data.vocab_size,
        t.seq_len,
        plan.bf16,
        plan.use_cuda,
        deterministic=plan.deterministic,
    )
    config = gpt.config
    if plan.bf16:
        from megatron.core.transformer.module import Float16Module

        gpt = Float16Module(config, gpt)  # casts inputs/outputs as megatron's bf16 training does
    ddp_cfg = DistributedDataParallelConfig(
        grad_reduce_in_fp32=True,
        overlap_grad_reduce=plan.overlap,
        overlap_param_gather=plan.overlap,
        use_distributed_optimizer=plan.distributed_optimizer,
    )
    model = DistributedDataParallel(config, ddp_cfg, gpt)
    config.finalize_model_grads_func = finalize_model_grads
    config.no_sync_func = model.no_sync
    opt_cfg = OptimizerConfig(
        optimizer="adam",  # megatron's "adam" is AdamW (decoupled weight decay)
        lr=t.lr,
        min_lr=spec.final_lr,
        weight_decay=t.weight_decay,
        adam_beta1=t.adam_beta1,
        adam_beta2=t.adam_beta2,
        adam_eps=t.adam_eps,
        clip_grad=t.clip_grad,
        bf16=plan.bf16,
        params_dtype=torch.bfloat16 if plan.bf16 else torch.float32,
        use_distributed_optimizer=plan.distributed_optimizer,
    )
    optimizer = get_megatron_optimizer(opt_cfg, [model])
    scheduler = build_scheduler(
        optimizer, t.lr, spec.warmup_steps, spec.iterations, spec.final_lr, t.weight_decay
    )
    return model, optimizer, scheduler


def moe_aux_loss(spec: RunSpec, num_microbatches: int) -> float | None:
    """Mean load-balancing loss per MoE layer and micro-batch (unscaled by its coefficient)."""
    if spec.model.moe is None:
        return None
    from megatron.core.transformer.moe import moe_utils

    tracker = moe_utils.get_moe_layer_wise_logging_tracker()
    if not tracker:
        return None
    moe_utils.reduce_aux_losses_tracker_across_ranks()
    n_moe = spec.model.layers - spec.model.moe.dense_layers
    total = sum(float(v["values"].sum()) for v in tracker.values())
    moe_utils.clear_aux_losses_tracker()
    return total / (n_moe * num_microbatches)


def versions() -> dict[str, str]:
    import megatron.core

    import steplaw_train

    v = {
        "steplaw_train": steplaw_train.__version__,
        "torch": torch.__version__,
        "megatron_core": getattr(megatron.core, "__version__", "unknown"),
        "python": sys.version.split()[0],
    }
    try:
        import transformer_engine

        v["transformer_engine"] = transformer_engine.__version__
    except Exception:
        pass
    return v


def device_name(use_cuda: bool) -> str:
    if use_cuda:
        return torch.cuda.get_device_name(torch.cuda.current_device())
    return f"cpu ({torch.get_num_threads()} threads)"


# ---- the run -----------------------------------------------------------------------------------
def run(spec: RunSpec, run_dir: Path | str, options: RunOptions | None = None) -> dict:
    """Train `spec` into `run_dir` (resuming if possible); return result.json's content.

    Rank 0 holds the run dir's lock for the run's life (a second trainer is refused; the OS
    drops the lock when this process dies, so a retry is never blocked). Before anything is
    written the run dir must belong to this spec and its checkpoints to this format
    (rundir.check_owner): a changed lr or precision never resumes someone else's checkpoint.
    """
    run_dir = Path(run_dir)
    options = options or RunOptions()
    done = _finished(run_dir, spec)
    if done is not None:
        return _finished_again(run_dir, done, options)
    use_cuda = resolve_device(options.device, torch.cuda.is_available())
    plan = make_plan(spec, options, use_cuda, distributed.env_world_size())
    check_memory(spec, use_cuda)
    rundir.check_owner(run_dir, spec, checkpoint_format(plan))
    check_data(spec, options)
    apply_determinism(plan)
    lock = rundir.owned(run_dir) if distributed.env_rank() == 0 else contextlib.nullcontext()
    with lock:
        done = _finished(run_dir, spec)  # another trainer may have finished it meanwhile
        if done is not None:
            return _finished_again(run_dir, done, options)
        if options.num_threads:
            torch.set_num_threads(options.num_threads)
        if not use_cuda:
            from steplaw_train import _cpu_compat

            _cpu_compat.apply()
        world = distributed.init(use_cuda)
        flag = SignalFlag()
        flag.install()
        try:
            return _run(spec, run_dir, options, plan, world, flag)
        finally:
            flag.restore()
            distributed.shutdown()


def _finished(run_dir: Path, spec: RunSpec) -> dict | None:
    """The run's result if it has finished; refuses a run dir of another spec (check_owner)."""
    rundir.check_owner(run_dir, spec)
    return rundir.read_result(run_dir)


def _finished_again(run_dir: Path, result: dict, options: RunOptions) -> dict:
    """A rerun of a finished run: its result, after completing the prune that a crash between
    result.json and the prune cut short (rank 0; nothing is trained or rewritten)."""
    if distributed.env_rank() == 0:
        ckpt.finish_pending_prune(run_dir, result, options.prune_checkpoints)
    return result


def checkpoint_format(plan: Plan) -> dict[str, Any]:
    """What this plan's checkpoints look like (a checkpoint of another format cannot load)."""
    return rundir.checkpoint_format("bf16" if plan.bf16 else "fp32", plan.distributed_optimizer)


@dataclass
class Loop:
    """Everything the training loop touches, built once by `_run`'s first steps."""

    spec: RunSpec
    run_dir: Path
    options: RunOptions
    plan: Plan
    world: Any
    model: Any
    optimizer: Any
    scheduler: Any
    state: ckpt.TrainState
    logger: Any
    meter: Meter
    batches: Any
    fwd_bwd: Any
    clock: SaveClock
    start_step: int = 0  # the step this process resumed at (0: a fresh start)


def _run(spec: RunSpec, run_dir: Path, options: RunOptions, plan: Plan, world, flag) -> dict:
    """Prepare → build → record → restore → (step, log, guard, checkpoint)* → result."""
    prepare_run_dir(run_dir, world)
    distributed.set_seed(spec.train.seed, plan.use_cuda)
    model, optimizer, scheduler = build_components(spec, plan)
    record = record_spec(spec, run_dir, plan, model, world)
    state, (model, optimizer, scheduler) = restore(
        spec, run_dir, plan, world, (model, optimizer, scheduler)
    )
    dataset = build_dataset(spec, options)
    logger = _logger(spec, run_dir, options, world, record)
    t = spec.train
    loop = Loop(
        spec=spec,
        run_dir=run_dir,
        options=options,
        plan=plan,
        world=world,
        model=model,
        optimizer=optimizer,
        scheduler=scheduler,
        state=state,
        logger=logger,
        batches=batch_iterator(
            dataset, state.consumed_samples, t.batch_size, world.rank, plan, world.device
        ),
        fwd_bwd=_forward_backward_func(),
        meter=Meter.begin(spec, world, _elapsed_from_metrics(run_dir, state.step)),
        clock=SaveClock(options.checkpoint_minutes),
        start_step=state.step,
    )
    try:
        outcome = Outcome()
        while loop.state.step < spec.iterations and outcome.status == "done":
            outcome = train_step(loop, flag)
        return finish(loop, outcome)
    except BaseException:
        loop.logger.close(exit_code=1)  # wandb shows the run as failed, not finished
        raise
    finally:
        loop.logger.close()


# ---- the loop's named steps ----------------------------------------------------------------------
def prepare_run_dir(run_dir: Path, world) -> None:
    """The run dir exists; a checkpoint a kill left half-written (or half-pruned) is gone."""
    if world.is_main:
        run_dir.mkdir(parents=True, exist_ok=True)
        ckpt.remove_incomplete(run_dir)


def record_spec(spec: RunSpec, run_dir: Path, plan: Plan, model, world) -> dict[str, Any]:
    """spec.json with how this run executes (the built model's counts, micro-batching,
    precision), and the checkpoints' format record; returns the spec document (wandb config)."""
    from steplaw_train.model import count_parameters

    execution = {
        "parameters": count_parameters(model.module),
        "micro_batch_size": plan.micro_batch_size,
        "num_microbatches": plan.num_microbatches,
        "data_parallel": plan.data_parallel,
        "precision": "bf16" if plan.bf16 else "fp32",
        # the code this start runs (its snapshot's record on SLURM): provenance.py
        "provenance": provenance.running_provenance(),
    }
    if world.is_main:
        rundir.append_code_start(run_dir, code_start(execution["provenance"]))
        rundir.write_spec(run_dir, spec, execution)
        rundir.write_checkpoint_format(run_dir, spec.run_id, checkpoint_format(plan))
    return rundir.spec_doc(spec, execution)


def restore(spec: RunSpec, run_dir: Path, plan: Plan, world, objects: tuple) -> tuple[Any, tuple]:
    """The latest loadable checkpoint's state (older ones are tried when the newest fails:
    checkpoint.load_latest) and the objects it was loaded into; a fresh state and fresh objects
    if none loads (a failed attempt may have touched them). Metrics past the state are dropped."""
    model, optimizer, scheduler = objects
    state = ckpt.load_latest(run_dir, model, optimizer, scheduler)
    if state is None:
        distributed.set_seed(spec.train.seed, plan.use_cuda)
        model, optimizer, scheduler = build_components(spec, plan)
        state = ckpt.TrainState()
    if world.is_main:
        rundir.truncate_metrics(run_dir, state.step)
    return state, (model, optimizer, scheduler)


def _logger(spec: RunSpec, run_dir: Path, options: RunOptions, world, record) -> Any:
    return mx.build_logger(
        world.is_main,
        run_dir,
        spec.run_id,
        {"spec": record["spec"], "derived": record["derived"]},
        options.wandb_project,
        options.wandb_group,
        options.wandb_mode,
    )


def _forward_backward_func():
    from megatron.core.pipeline_parallel import get_forward_backward_func

    return get_forward_backward_func()


@dataclass
class Meter:
    """Throughput, wall time and MFU between logged steps (MFU from flops.py, as the sweep's
    GPU-hour estimate: the same FLOPs per token, LM head included)."""

    start: float
    elapsed0: float
    flops_per_token: float
    peak: float | None
    world_size: int
    t_log: float = 0.0
    tokens: int = 0

    @classmethod
    def begin(cls, spec: RunSpec, world, elapsed0: float) -> Meter:
        now = time.perf_counter()
        peak = (
            flops.peak_flops(torch.cuda.get_device_name(world.device))
            if world.device.type == "cuda"
            else None
        )
        fpt = flops.run_flops_per_token(spec)
        return cls(now, elapsed0, fpt, peak, world.world_size, t_log=now)

    def elapsed(self) -> float:
        return self.elapsed0 + time.perf_counter() - self.start

    def take(self) -> dict[str, float]:
        """tokens_per_s, elapsed_s (and mfu on a known GPU) since the last take; resets."""
        now = time.perf_counter()
        rec = {
            "tokens_per_s": self.tokens / max(now - self.t_log, 1e-9),
            "elapsed_s": self.elapsed0 + now - self.start,
        }
        if self.peak:
            rec["mfu"] = flops.mfu(
                rec["tokens_per_s"], self.flops_per_token, self.world_size, self.peak
            )
        self.t_log, self.tokens = now, 0
        return rec


@dataclass(frozen=True)
class Outcome:
    """How the loop ended so far: "done" (keep going / finished) or "diverged" with why."""

    status: str = "done"
    reason: str | None = None
    last_loss: float = math.nan


def train_step(loop: Loop, flag: SignalFlag) -> Outcome:
    """One optimizer step, then its record, the divergence guard and the checkpoint/signal."""
    spec, state = loop.spec, loop.state
    step = state.step + 1
    loss, grad_norm, aux = forward_backward(loop)
    state.step = step
    state.consumed_samples += spec.train.batch_size
    loop.meter.tokens += spec.tokens_per_step
    diverged = update_divergence(state, loss, step, spec.warmup_steps, loop.options)
    if step % spec.train.log_interval == 0 or diverged or step == spec.iterations:
        loop.logger.log(metrics_record(loop, loss, grad_norm, aux))
    if diverged:
        return Outcome("diverged", diverged, loss)
    checkpoint_or_stop(loop, flag)
    return Outcome(last_loss=loss)


def forward_backward(loop: Loop) -> tuple[float, Any, float | None]:
    """megatron's forward/backward over the micro-batches and the optimizer step."""
    loop.model.train()
    loop.model.zero_grad_buffer()
    loop.optimizer.zero_grad()
    loop.scheduler.step(increment=1)  # update `step` uses lr_at(step) (schedule.py)
    reported = loop.fwd_bwd(
        forward_step_func=forward_step,
        data_iterator=loop.batches,
        model=[loop.model],
        num_microbatches=loop.plan.num_microbatches,
        seq_length=loop.spec.train.seq_len,
        micro_batch_size=loop.plan.micro_batch_size,
        forward_only=False,
    )
    _, grad_norm, _ = loop.optimizer.step()
    loss = _mean_loss(reported, loop.world)
    return loss, grad_norm, moe_aux_loss(loop.spec, loop.plan.num_microbatches)


def metrics_record(loop: Loop, loss: float, grad_norm, aux: float | None) -> dict[str, Any]:
    rec = {
        "step": loop.state.step,
        "tokens": loop.state.consumed_samples * loop.spec.train.seq_len,
        "loss": loss,
        "lr": loop.optimizer.param_groups[0]["lr"],
        "grad_norm": float(grad_norm) if grad_norm is not None else None,
        **loop.meter.take(),
    }
    if aux is not None:
        rec["moe_aux_loss"] = aux
    return rec


def checkpoint_or_stop(loop: Loop, flag: SignalFlag) -> None:
    """Checkpoint when rank 0's save clock is due (`checkpoint_minutes`), every
    `checkpoint_interval` steps if set, and when a signal arrived; after a signal's checkpoint
    hand the signal on (the process ends or is requeued there). The last step is not saved
    here: `finish` decides what a finished run keeps; a signal at the last step lets the run
    finish (its final save is what a resume would have to redo) instead of requeueing it."""
    step = loop.state.step
    if step >= loop.spec.iterations:  # every rank reaches it at the same step
        return
    time_due = loop.world.is_main and loop.clock.due()
    signum, time_due = flag.agree(loop.world.world_size, time_due)
    if step_save_due(loop.options.checkpoint_interval, step) or time_due or signum is not None:
        save_checkpoint(
            loop.run_dir,
            loop.model,
            loop.optimizer,
            loop.scheduler,
            loop.state,
            loop.options,
            loop.plan,
        )
        loop.clock.reset()  # the next save is due `checkpoint_minutes` after this one
    if signum is not None:
        loop.logger.close(exit_code=128 + signum, preempted=True)  # requeued, resumes
        flag.reraise()


def finish(loop: Loop, outcome: Outcome) -> dict:
    """The final save, then result.json from rank 0, then the prune; every rank returns the
    record rank 0 wrote.

    The order is the crash-safety argument: until result.json exists the step checkpoints are
    untouched, so a crash resumes (and redoes the final save, which replaces a leftover); once
    it exists the run is finished, and a rerun only completes the prune (`_finished_again`).
    """
    final = final_save(loop, outcome)
    result = build_result(loop, outcome)
    result["final_checkpoint"] = final
    if loop.world.is_main:
        loop.logger.summary(result)
        result = rundir.write_result(loop.run_dir, result)
    if loop.world.world_size > 1:
        torch.distributed.barrier()
        result = rundir.read_result(loop.run_dir)
    if loop.world.is_main and loop.options.prune_checkpoints:  # no rank waits on the deletes
        ckpt.prune_steps(loop.run_dir, final["step"] if final["kind"] == "full" else None)
    return result


def final_save(loop: Loop, outcome: Outcome) -> dict[str, Any]:
    """What a finished run keeps (options.final_checkpoint), saved collectively; its record.

    "model": the weights alone, `checkpoints/final/`. "full": a full checkpoint of the last
    step, to train on from. A diverged run's weights are what blew up: nothing new is saved;
    "full" keeps its newest checkpoint from before the divergence (to look into), "model" and
    "none" keep nothing.
    """
    kind, state = loop.options.final_checkpoint, loop.state
    if outcome.status == "diverged":
        latest = ckpt.latest_step(loop.run_dir) if kind == "full" else None
        return ckpt.final_record("full" if latest is not None else "none", loop.run_dir, latest)
    if kind == "model":
        with params_synced(loop.model, loop.plan):
            ckpt.save_model(loop.run_dir, loop.model, state.step)
    elif kind == "full" and loop.start_step != state.step:  # else: resumed from that very one
        save_checkpoint(
            loop.run_dir,
            loop.model,
            loop.optimizer,
            loop.scheduler,
            state,
            loop.options,
            loop.plan,
        )
    return ckpt.final_record(kind, loop.run_dir, state.step)


@contextlib.contextmanager
def params_synced(model, plan: Plan):
    """The model's weights current for a save.

    With overlap_param_gather the optimizer step leaves the updated parameters to be gathered
    by the next forward's pre-hook, so the model's weights are stale at the step boundary;
    like Megatron-LM's training loop, disable the hook with a synchronous gather before the
    save and re-enable it after.
    """
    if plan.overlap:
        model.disable_forward_pre_hook(param_sync=True)
    try:
        yield
    finally:
        if plan.overlap:
            model.enable_forward_pre_hook()


def save_checkpoint(run_dir, model, optimizer, scheduler, state, options, plan: Plan) -> None:
    """ckpt.save, with the overlapped parameter all-gather finished first (params_synced)."""
    with params_synced(model, plan):
        ckpt.save(run_dir, model, optimizer, scheduler, state, options.keep_checkpoints)


def _elapsed_from_metrics(run_dir: Path, step: int) -> float:
    """Wall time already spent before a resume (the last kept metrics line's elapsed_s)."""
    rows = rundir.read_metrics(run_dir)
    return float(rows[-1]["elapsed_s"]) if step > 0 and rows else 0.0


def _mean_loss(reported: list[dict], world) -> float:
    vals = torch.stack([r["loss"].float() for r in reported]).mean()
    if world.world_size > 1:
        torch.distributed.all_reduce(vals, op=torch.distributed.ReduceOp.AVG)
    return float(vals)


def update_divergence(
    state: ckpt.TrainState, loss: float, step: int, warmup: int, options: RunOptions
) -> str | None:
    """The divergence guard; returns why the run diverged, or None.

    Three rules, all relative to the run itself:
    * a non-finite loss;
    * a loss above `divergence_factor` x the first step's loss (an untrained model's, ~ln vocab):
      no batch of a healthy run is that much worse than knowing nothing (catches blow-ups at
      once, even in warmup);
    * after warmup, an exponential moving average of the loss (window `divergence_window`
      steps) above `divergence_factor` x the best that average has been (slow drifts upward).
    Single losses are never compared with the best single loss: at one sequence per step a hard
    file costs 3-4x the easiest batch, and such a rule once flagged every bs=1 run of the demo.
    The guard's numbers live in TrainState, so a resumed run takes the same decisions.
    """
    if not math.isfinite(loss):
        return f"non-finite loss {loss} at step {step}"
    if math.isnan(state.first_loss):
        state.first_loss = loss
    if loss > options.divergence_factor * state.first_loss:
        return (
            f"loss {loss:.4g} at step {step} exceeds divergence_factor "
            f"{options.divergence_factor} x the first step's loss {state.first_loss:.4g}"
        )
    alpha = 2.0 / (options.divergence_window + 1)
    ema = loss if math.isnan(state.loss_ema) else state.loss_ema + alpha * (loss - state.loss_ema)
    state.loss_ema = ema
    if step <= max(warmup, options.divergence_window):
        return None
    state.best_ema = min(state.best_ema, ema)
    if ema > options.divergence_factor * state.best_ema:
        return (
            f"loss EMA {ema:.4g} at step {step} exceeds divergence_factor "
            f"{options.divergence_factor} x its best {state.best_ema:.4g}"
        )
    return None


def build_result(loop: Loop, outcome: Outcome) -> dict:
    """result.json's content (rundir.py adds the schema version)."""
    spec, state = loop.spec, loop.state
    losses = [r["loss"] for r in rundir.read_metrics(loop.run_dir)]
    diverged = outcome.status == "diverged"
    final_loss = outcome.last_loss
    if math.isnan(final_loss) and losses and state.step == spec.iterations:
        # resumed from a full checkpoint of the last step (final_checkpoint="full", a crash
        # before result.json): no step ran in this process; the last step's logged loss
        final_loss = float(losses[-1])
    result = {
        "run_id": spec.run_id,
        "status": outcome.status,
        "final_loss": final_loss,
        "smooth_loss": math.inf
        if diverged
        else smoothed_final_loss(losses, spec.train.log_interval),
        "steps": state.step,
        "planned_steps": spec.iterations,
        "tokens": state.consumed_samples * spec.train.seq_len,
        "wall_time_s": loop.meter.elapsed(),
        "versions": versions(),
        "device": device_name(loop.plan.use_cuda),
        "precision": "bf16" if loop.plan.bf16 else "fp32",
    }
    if outcome.reason is not None:
        result["reason"] = outcome.reason
    result.update(code_record(loop.run_dir))
    return result


def code_start(prov: dict[str, Any]) -> dict[str, Any]:
    """code.jsonl's line for this start: which code, from where, in which SLURM job."""
    keys = ("key", "source", "commit", "dirty", "diff_digest", "code_root")
    return {
        "time": time.time(),
        **{k: prov.get(k) for k in keys},
        "slurm_job_id": os.environ.get("SLURM_JOB_ID"),
    }


def code_record(run_dir: Path) -> dict[str, Any]:
    """result.json's provenance: the code that finished the run, and the code of every start
    (code.jsonl). More than one key: the run was resumed on other code than it began on."""
    keys = sorted({str(s.get("key")) for s in rundir.read_code_starts(run_dir)})
    return {
        "provenance": provenance.running_provenance(),
        "code_keys": keys,
        "code_mixed": len(keys) > 1,
    }


# ---- Hydra shell -------------------------------------------------------------------------------
def run_from_cfg(cfg) -> dict:
    """Composed config -> run(); `run_dir: null` means runs/<run_id>."""
    from steplaw_train.config import options_from_cfg, spec_from_cfg

    spec = spec_from_cfg(cfg)
    options = options_from_cfg(cfg.get("options"))
    run_dir = Path(cfg.get("run_dir") or Path("runs") / spec.run_id)
    return run(spec, run_dir, options)


def main() -> None:
    import hydra

    from steplaw_train.config import config_dir

    @hydra.main(config_path=str(config_dir()), config_name="train", version_base=None)
    def _main(cfg) -> None:
        try:
            result = run_from_cfg(cfg)
        except (SpecError, LockUnsupported) as e:
            print(f"error: {e}", file=sys.stderr)
            sys.exit(2)
        except ckpt.CheckpointSaveError as e:
            print(f"error: {e}", file=sys.stderr)  # names the path and errno (ENOSPC...)
            sys.exit(1)
        if int(os.environ.get("RANK", "0")) == 0:
            print(json.dumps(result, indent=2))

    _main()


__all__ = ["Plan", "SaveClock", "auto_micro_batch", "make_plan", "run", "main"]

if __name__ == "__main__":
    main()
