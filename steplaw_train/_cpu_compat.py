"""The few patches that let megatron-core 0.16.1 train on a machine without CUDA.

megatron-core is written for GPUs; its CPU path works end to end (GPTModel dense and MoE with the
local spec, DDP, get_megatron_optimizer, OptimizerParamScheduler, get_forward_backward_func,
dist_checkpointing) once the handful of CUDA-only calls below are redirected. Each patch was
confirmed necessary on this machine (see ../shared/design.md, "Facts measured"); nothing else is
touched, and `apply()` does nothing when CUDA is available, so a GPU run executes stock megatron.

The patches:

1. `torch.cuda.current_device()` -> the CPU device. DDP grad buffers, RoPE and the optimizer place
   tensors on `torch.cuda.current_device()`.
2. A process-wide `TorchFunctionMode` (`_CpuMode`) that rewrites a CUDA `device=` argument to CPU
   (optimizer grad scaler, grad clipping, default causal mask and token counting create tensors
   with `device="cuda"`), and reports CUDA type names from `Tensor.type()` for CPU float tensors
   (grad clipping and the optimizers assert `param.type() == "torch.cuda.FloatTensor"`). Cost:
   ~1 microsecond per torch call, within ~5% of a plain loop.
3. The CUDA RNG tracker's `fork()` -> a no-op context (there is no CUDA generator to fork);
   `model_parallel_cuda_manual_seed` is skipped by the caller (`distributed.set_seed`).
4. `moe_utils.te_general_gemm` is referenced even when Transformer Engine is absent -> None, so the
   MoE router falls back to a plain matmul.
5. `torch.cuda.synchronize` (dist_checkpointing) -> a no-op.
"""

from __future__ import annotations

import contextlib
from typing import Any

import torch
from torch.overrides import TorchFunctionMode

_APPLIED = False
_MODE: TorchFunctionMode | None = None
_CUDA_TYPE_NAMES = {
    "torch.FloatTensor": "torch.cuda.FloatTensor",
    "torch.HalfTensor": "torch.cuda.HalfTensor",
    "torch.BFloat16Tensor": "torch.cuda.BFloat16Tensor",
}


def _is_cuda_device(value: Any) -> bool:
    if isinstance(value, torch.device):
        return value.type == "cuda"
    if isinstance(value, str):
        return value.startswith("cuda")
    return isinstance(value, int) and not isinstance(value, bool)  # device=0 means cuda:0


class _CpuMode(TorchFunctionMode):
    """Maps CUDA device arguments to CPU and answers `Tensor.type()` with CUDA type names.

    Why a mode rather than editing megatron: the offending calls are spread over several
    megatron modules (optimizer, clip_grads, attention masks); one interception point keeps the
    shim small and leaves megatron's files untouched.
    """

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        dev = kwargs.get("device")
        if dev is not None and _is_cuda_device(dev):
            kwargs = {**kwargs, "device": torch.device("cpu")}
        if func is torch.Tensor.to or func is torch.Tensor.cuda:
            if func is torch.Tensor.cuda:
                return args[0]
            args = tuple(
                torch.device("cpu") if _is_cuda_device(a) and not isinstance(a, int) else a
                for a in args
            )
        out = func(*args, **kwargs)
        if func is torch.Tensor.type and len(args) == 1 and not kwargs and isinstance(out, str):
            return _CUDA_TYPE_NAMES.get(out, out)
        return out


def _noop_fork(self, name: str = "model-parallel-rng"):
    """No CUDA generator exists on CPU; dropout and init use the CPU generator instead."""
    return contextlib.nullcontext()


def apply() -> bool:
    """Install the patches once if CUDA is absent; return True when they are active."""
    global _APPLIED, _MODE
    if torch.cuda.is_available():
        return False
    if _APPLIED:
        return True
    torch.cuda.current_device = lambda: torch.device("cpu")  # type: ignore[assignment]
    torch.cuda.synchronize = lambda *a, **k: None  # type: ignore[assignment]

    from megatron.core.tensor_parallel import random as mp_random
    from megatron.core.transformer.moe import moe_utils

    mp_random.CudaRNGStatesTracker.fork = _noop_fork  # type: ignore[method-assign]
    if not hasattr(moe_utils, "te_general_gemm"):
        moe_utils.te_general_gemm = None
    _MODE = _CpuMode()
    _MODE.__enter__()
    _APPLIED = True
    return True


def active() -> bool:
    return _APPLIED
