"""The learning-rate schedule: linear warmup, then cosine decay to a final LR.

`lr_at` is the pure definition; `build_scheduler` makes megatron-core's OptimizerParamScheduler
implement exactly it (a test pins one to the other with literal values). Step convention: update
number `step` (1-based) uses `lr_at(step)`; the trainer advances the scheduler by one *before*
each optimizer step, so the first update uses peak/warmup (not 0, which megatron's
step-after-update convention would give) and the last update, step == total, uses exactly the
final LR. The final LR is the paper's fixed 1e-5 (`min_lr_mode: fixed`) or peak * ratio
(`ratio`, the paper's biased ablation); `RunSpec.final_lr` decides which.
"""

from __future__ import annotations

import math


def lr_at(step: int, peak: float, warmup: int, total: int, final: float) -> float:
    """LR of update `step` (1-based): peak*step/warmup up to warmup, cosine to `final` at total."""
    if warmup > 0 and step <= warmup:
        return peak * step / warmup
    if step > total:
        return final
    ratio = (step - warmup) / (total - warmup)
    return final + 0.5 * (math.cos(math.pi * ratio) + 1.0) * (peak - final)


def build_scheduler(optimizer, peak: float, warmup: int, total: int, final: float, wd: float):
    """megatron-core OptimizerParamScheduler configured as `lr_at` (constant weight decay)."""
    from megatron.core.optimizer_param_scheduler import OptimizerParamScheduler

    return OptimizerParamScheduler(
        optimizer,
        init_lr=0.0,
        max_lr=peak,
        min_lr=final,
        lr_warmup_steps=warmup,
        lr_decay_steps=max(total, warmup + 1),
        lr_decay_style="cosine",
        start_wd=wd,
        end_wd=wd,
        wd_incr_steps=max(total, 1),
        wd_incr_style="constant",
        use_checkpoint_opt_param_scheduler=True,
        override_opt_param_scheduler=False,
    )
