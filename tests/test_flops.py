"""One FLOPs function for the sweep's GPU-hours and the trainer's MFU (steplaw_train/flops.py)."""

from __future__ import annotations

import pytest
import torch

from launch.resources import device_hours, flops, resource_model
from steplaw_train import flops as flops_mod
from steplaw_train.distributed import World
from steplaw_train.sweep import expand_from_cfg
from steplaw_train.train import Meter
from tests.conftest import sweep_cfg


@pytest.fixture(scope="module")
def dense_1b():
    cfg = sweep_cfg("+grid=dense_1b")
    return expand_from_cfg(cfg)[0], resource_model(cfg.resources)


def test_gpu_hours_and_mfu_count_the_same_flops_on_dense_1b(dense_1b):
    spec, rm = dense_1b
    meter = Meter.begin(spec, World(0, 1, 0, torch.device("cpu")), 0.0)
    per_token = meter.flops_per_token  # what the trainer's MFU multiplies tokens/s by
    assert flops(spec) == pytest.approx(per_token * spec.D)
    # LM head included: M + 6 V h, more than the old 6 Na D estimate
    assert per_token == pytest.approx(spec.M + 6 * spec.data.vocab_size * spec.model.hidden)
    assert flops(spec) > 6 * spec.Na * spec.D
    # a run that takes exactly the dry run's GPU-hours on one GPU shows the assumed MFU
    hours = device_hours(spec, rm)
    tokens_per_s = spec.D / (hours * 3600)
    achieved = flops_mod.mfu(tokens_per_s, per_token, 1, rm.peak_tflops * 1e12)
    assert achieved == pytest.approx(rm.mfu)


def test_the_default_peak_is_the_table_entry_of_the_default_device():
    from launch.resources import ResourceModel

    assert ResourceModel().peak_tflops * 1e12 == flops_mod.peak_flops(flops_mod.DEFAULT_DEVICE)
    assert flops_mod.peak_flops("NVIDIA A100-SXM4-80GB") == 312e12
    assert flops_mod.peak_flops("cpu") is None
