"""The LR schedule: the pure definition pinned by literals, megatron's scheduler pinned to it."""

from __future__ import annotations

import math

import pytest
import torch

from steplaw_train.schedule import build_scheduler, lr_at

PEAK, WARMUP, TOTAL = 4e-3, 10, 110


def test_lr_at_literals_fixed_final():
    final = 1e-5
    assert lr_at(1, PEAK, WARMUP, TOTAL, final) == pytest.approx(4e-4, rel=1e-12)  # warmup start
    assert lr_at(5, PEAK, WARMUP, TOTAL, final) == pytest.approx(2e-3, rel=1e-12)
    assert lr_at(10, PEAK, WARMUP, TOTAL, final) == PEAK  # warmup end
    # mid-cosine: half way through decay, cos = 0 -> (peak + final) / 2
    assert lr_at(60, PEAK, WARMUP, TOTAL, final) == pytest.approx(2.005e-3, rel=1e-12)
    # a quarter of the way: final + (peak - final) * (1 + cos(pi/4)) / 2
    assert lr_at(35, PEAK, WARMUP, TOTAL, final) == pytest.approx(3.415678028e-3, rel=1e-9)
    assert lr_at(TOTAL, PEAK, WARMUP, TOTAL, final) == 1e-5  # exactly the fixed final LR
    assert lr_at(TOTAL + 5, PEAK, WARMUP, TOTAL, final) == 1e-5


def test_lr_at_ratio_mode_ends_at_peak_over_ten():
    assert lr_at(TOTAL, PEAK, WARMUP, TOTAL, PEAK / 10) == pytest.approx(4e-4, rel=1e-15)
    assert lr_at(60, PEAK, WARMUP, TOTAL, PEAK / 10) == pytest.approx(2.2e-3, rel=1e-12)


class _FakeMegatronOptimizer:
    """The scheduler only reads and writes `param_groups`; a torch AdamW supplies real ones."""

    def __init__(self):
        self.param_groups = torch.optim.AdamW([torch.nn.Parameter(torch.zeros(1))]).param_groups


@pytest.mark.parametrize("final", [1e-5, PEAK / 10])
def test_megatron_scheduler_follows_lr_at(final):
    opt = _FakeMegatronOptimizer()
    sched = build_scheduler(opt, PEAK, WARMUP, TOTAL, final, wd=0.1)
    seen = []
    for _ in range(TOTAL):
        sched.step(increment=1)  # the trainer's convention: advance, then update `step`
        seen.append(opt.param_groups[0]["lr"])
        assert opt.param_groups[0]["weight_decay"] == 0.1
    expected = [lr_at(s, PEAK, WARMUP, TOTAL, final) for s in range(1, TOTAL + 1)]
    assert seen == pytest.approx(expected, rel=1e-12, abs=0)
    assert seen[0] == pytest.approx(PEAK / WARMUP) and seen[WARMUP - 1] == PEAK
    assert seen[-1] == final  # exactly, not approximately
    assert all(math.isfinite(x) for x in seen)
