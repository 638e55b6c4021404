"""Time limits: finer buckets, the cluster's cap, chains of requeued jobs; SLURM time parsing."""

from __future__ import annotations

from dataclasses import replace

import pytest

from launch.disk import sweep_disk
from launch.resources import ResourceModel, bucket_minutes, resource_class
from launch.slurm_info import max_walltime_min, parse_time_min, with_cluster_limits
from steplaw_train.spec import SpecError
from steplaw_train.sweep import expand_from_cfg
from tests.conftest import sweep_cfg


@pytest.mark.parametrize(
    ("text", "minutes"),
    [
        ("30", 30),
        ("1:00", 1),  # M:S
        ("00:01:00", 1),
        ("12:30:00", 750),
        ("1-00:00:00", 1440),
        ("2-12", 3600),
        ("1-01:30", 1530),
        ("UNLIMITED", None),
        ("INFINITE", None),
        ("", None),
    ],
)
def test_slurm_time_strings(text, minutes):
    assert parse_time_min(text) == minutes


def test_buckets_are_finer_than_powers_of_two_and_never_below_the_need():
    for need in [1, 5, 15.5, 100, 777, 1300, 2000, 5000]:
        b = bucket_minutes(need, 1)
        assert need <= b <= 1.5 * need + 1  # at most 1.5x (powers of two asked up to 2x)
    assert bucket_minutes(13 * 60 * 1.5 + 10, 15) <= 1536  # the 13-hour run of issue 11
    assert bucket_minutes(3, 15) == 15  # the floor


def test_no_request_above_the_cap_and_long_runs_chain_through_requeue():
    specs = expand_from_cfg(sweep_cfg("+grid=dense_1b"))
    rm = ResourceModel(max_timeout_min=1440)
    free = ResourceModel()
    for s in specs:
        capped, uncapped = resource_class(s, rm), resource_class(s, free)
        assert capped.timeout_min <= 1440
        if uncapped.timeout_min <= 1440:
            assert capped == uncapped
        else:
            # a job at the cap; the chain covers the need (>= bucket / 1.5): each segment
            # trains for its limit less the start-up overhead
            assert capped.timeout_min == 1440
            need = uncapped.timeout_min / 1.5
            assert capped.segments * (1440 - rm.overhead_min) + rm.overhead_min >= need
    assert any(resource_class(s, rm).segments > 1 for s in specs)  # some runs need > 24 h


def test_launcher_limit_and_bad_values():
    assert max_walltime_min({"max_walltime_min": 720}, query=False) == 720
    assert max_walltime_min({}, query=False) is None
    rm = with_cluster_limits(ResourceModel(max_timeout_min=600), {"max_walltime_min": 720}, False)
    assert rm.max_timeout_min == 600
    with pytest.raises(SpecError, match="launcher.max_walltime_min"):
        max_walltime_min({"max_walltime_min": 0}, query=False)
    assert replace(rm, max_timeout_min=None).max_timeout_min is None


def test_checkpoint_disk_of_a_sweep():
    specs = expand_from_cfg(sweep_cfg("+grid=dense_1b"))
    full = sweep_disk(specs[:1], specs[:1], keep=1, in_flight=1, gpu=True, final_checkpoint="full")
    assert 15e9 < full.end_bytes < 19e9  # a 1B model's checkpoint with optimizer: ~17 GB
    # training: the kept one and the one being saved (the old stays until the new is complete)
    assert full.peak_bytes == full.end_bytes + 2 * full.end_bytes
    model = sweep_disk(specs[:1], specs[:1], keep=1, in_flight=1, gpu=True)
    assert model.end_bytes * 7 == full.end_bytes  # bf16 weights: 2 of the 14 bytes/param
    assert model.peak_bytes - model.end_bytes == full.peak_bytes - full.end_bytes
    assert sweep_disk(specs, specs, 2, 10, True, "none").end_bytes == 0
    all_ = sweep_disk(specs, specs, keep=2, in_flight=10, gpu=True)
    assert all_.end_bytes == sum(s.N * 2 for s in specs)
    ten_largest = sorted((s.N for s in specs), reverse=True)[:10]
    assert all_.peak_bytes == all_.end_bytes + 3 * 14 * sum(ten_largest)
    nothing_new = sweep_disk(specs, [], keep=2, in_flight=10, gpu=False)
    assert nothing_new.peak_bytes == nothing_new.end_bytes == sum(s.N * 4 for s in specs)
    kept = sweep_disk(specs, [], keep=2, in_flight=10, gpu=False, prune=False)
    assert kept.end_bytes == sum(s.N * (2 * 12 + 4) for s in specs)  # the old lifecycle + final
    assert "TB at the end (final_checkpoint=model)" in all_.describe()
