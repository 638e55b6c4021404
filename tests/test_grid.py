"""Grid expansion: presets expand, run_ids are stable, errors name field + entry + allowed values."""

from __future__ import annotations

import csv
import math
import os
from pathlib import Path

import pytest

from launch.executors import plan_arrays
from launch.resources import resource_class, resource_model
from steplaw_train import grid as g
from steplaw_train.config import config_dir
from steplaw_train.spec import SpecError
from steplaw_train.sweep import expand_from_cfg
from steplaw_train.train import auto_micro_batch
from tests.conftest import sweep_cfg

GRIDS = sorted(p.stem for p in (config_dir() / "grid").glob("*.yaml"))
SHARED = Path(os.environ.get("STEPLAW_SHARED", Path(__file__).resolve().parents[2] / "shared"))


@pytest.mark.parametrize("name", GRIDS)
def test_every_grid_preset_expands(name):
    cfg = sweep_cfg(f"+grid={name}")
    specs = expand_from_cfg(cfg)
    assert specs and len({s.run_id for s in specs}) == len(specs)
    assert [s.run_id for s in expand_from_cfg(cfg)] == [s.run_id for s in specs]  # stable


def test_demo_grid_shape():
    specs = expand_from_cfg(sweep_cfg("+grid=demo"))
    assert len(specs) == 2 * 2 * 3 * 3  # N x D x LR x BS (docs and test_demo_report rely on it)
    assert len({s.N for s in specs}) >= 2 and len({s.D for s in specs}) >= 2
    assert {g.cell_key(s) for s in specs} == {
        (m, "demo", d) for m in ("demo_dense_small", "demo_dense") for d in (150000, 300000)
    }


def test_dense_1b_lr_grid_matches_released_values():
    """The log range 2^-12 ... 2^-6.5 in 2^0.5 steps, rounded, is the released 1B LR grid."""
    path = SHARED / "steplaw" / "dense_lr_bs_loss.csv"
    if not path.exists():
        pytest.skip(f"reference data not found at {path}")
    with open(path) as f:
        rows = [r for r in csv.DictReader(f) if int(r["N"]) > 1e9]
    released_lr = sorted({float(r["lr"]) for r in rows})
    released_bs = sorted({int(r["bs"]) for r in rows})
    specs = expand_from_cfg(sweep_cfg("+grid=dense_1b"))
    ours_lr = sorted({s.train.lr for s in specs})
    assert len(ours_lr) == len(released_lr)
    for a, b in zip(ours_lr, released_lr, strict=True):
        assert math.isclose(a, b, rel_tol=5e-4)
    assert sorted({s.train.batch_size for s in specs}) == released_bs
    assert {s.train.seq_len for s in specs} == {2048}
    assert len(specs) == 3 * 12 * 10


def test_log_range_and_rounding():
    vals = [g.round_sig(v) for v in g.log_range(2**-12, 2**-6.5, 0.5)]
    assert len(vals) == 12 and vals[0] == 0.0002441 and vals[-1] == 0.01105
    assert g.round_sig(0.1 + 0.2) == 0.3  # float noise never changes a run_id


def test_window_is_centred_on_step_law():
    cfg = sweep_cfg("+grid=moe")
    specs = expand_from_cfg(cfg)
    cell = [s for s in specs if g.cell_key(s) == ("moe_e8_k1", "paper", 2_000_000_000)]
    lrs = sorted({s.train.lr for s in cell})
    assert len(lrs) == 7
    predicted = g.step_law(cell[0].Na, cell[0].D)[0]
    assert math.isclose(lrs[3], predicted, rel_tol=1e-3)
    assert math.isclose(lrs[4] / lrs[3], 2**0.5, rel_tol=1e-3)
    assert all(s.train.batch_size % 32 == 0 for s in cell)


def _expand(block, **kw):
    presets = g.yaml_presets()
    return g.expand(
        {"name": "t", "blocks": [block]},
        "demo_dense",
        "demo",
        {"lr": 1e-3, "batch_size": 4, "tokens": 4096, "seq_len": 128},
        presets,
        **kw,
    )


def test_tokens_per_param():
    specs = _expand({"model": ["demo_dense_small"], "tokens_per_param": [1, 2]})
    assert sorted(s.D for s in specs) == [specs[0].N, 2 * specs[0].N]


@pytest.mark.parametrize(
    "block, words",
    [
        ({"lrs": [1e-3]}, ["grid.blocks", "grid 't' block 0", "allowed", "batch_size"]),
        ({"lr": {"min": 1e-3, "max": 1e-2, "steps": 3}}, ["lr", "block 0", "step_log2"]),
        ({"lr": {"center": "kaplan"}}, ["lr.center", "block 0", "step_law"]),
        ({"model": ["no_such_model"]}, ["model", "no_such_model", "demo_dense_small"]),
        ({"recipe": ["nope"]}, ["data", "nope", "demo_code_heavy"]),
        ({"tokens": [100]}, ["train.tokens", "block 0", "model=demo_dense D=100"]),
        ({"train": {"warmup": 3}}, ["train.warmup", "block 0", "warmup_fraction"]),
        ({"tokens": [4096], "tokens_per_param": [1]}, ["tokens", "not both"]),
    ],
)
def test_errors_name_field_entry_and_allowed_values(block, words):
    with pytest.raises(g.GridError) as err:
        _expand(block)
    for w in words:
        assert w in str(err.value), (w, str(err.value))


def test_micro_batch_validation_names_the_grid_point():
    with pytest.raises(g.GridError, match="train.batch_size.*multiple.*block 0"):
        _expand({"batch_size": [3]}, micro_batch_size=2)


def test_array_plan_groups_by_resource_class_and_splits():
    cfg = sweep_cfg("+grid=dense")
    specs = expand_from_cfg(cfg)
    rm = resource_model(cfg.resources)
    classes = {resource_class(s, rm) for s in specs}
    chunks = plan_arrays(specs, rm, max_array_size=1001)
    assert len({c.resources for c in chunks}) == len(classes) > 1
    assert sum(len(c.run_ids) for c in chunks) == len(specs)
    small = plan_arrays(specs, rm, max_array_size=101)
    assert all(len(c.run_ids) <= 100 for c in small)
    by_class = {rc: sum(1 for s in specs if resource_class(s, rm) == rc) for rc in classes}
    assert len(small) == sum(math.ceil(n / 100) for n in by_class.values())


def test_gpus_keep_whole_micro_batches_of_seqs_per_gpu_sequences():
    """More GPUs than the batch can be split over would fail on the cluster after the queue, and
    fewer than seqs_per_gpu sequences per GPU leave it communication-bound: a run's GPUs are the
    largest power of two leaving each GPU whole micro-batches of seqs_per_gpu (8) sequences."""
    specs = expand_from_cfg(sweep_cfg("+grid=dense_1b"))
    fast = resource_model({"target_hours": 2.0})  # wants 128 GPUs for the 100B-token cell
    big = [s for s in specs if s.D == 1e11]
    by_bs = {s.train.batch_size: resource_class(s, fast) for s in big}
    assert by_bs[2048].data_parallel == 128 and by_bs[2048].nodes == 16  # max_nodes
    assert by_bs[352].data_parallel == 4  # 352 = 44 x 8: 88 sequences = 11 micro-batches of 8
    assert by_bs[192].data_parallel == 8 and by_bs[32].data_parallel == 4
    # fewer GPUs, proportionally longer walltime
    assert by_bs[352].timeout_min >= by_bs[2048].timeout_min
    for s in big:
        rc = resource_class(s, fast)
        per_rank = s.train.batch_size // rc.data_parallel
        assert s.train.batch_size % rc.data_parallel == 0
        assert auto_micro_batch(per_rank, 8) == 8  # the trainer's micro-batch: the full 8
    assert resource_class(big[0], resource_model({"seqs_per_gpu": 1})).data_parallel > 4
    chunks = plan_arrays(big, fast, max_array_size=1001)  # validates against each class
    assert sum(len(c.run_ids) for c in chunks) == len(big)


def test_a_micro_batch_the_ranks_cannot_use_fails_before_submission():
    specs = [s for s in expand_from_cfg(sweep_cfg("+grid=dense_1b")) if s.D == 1e11]
    rm = resource_model({"target_hours": 2.0})
    bs32 = [s for s in specs if s.train.batch_size == 32]  # 4 GPUs, 8 sequences per rank
    with pytest.raises(SpecError) as e:
        plan_arrays(bs32, rm, max_array_size=1001, micro_batch_size=16)
    assert e.value.field == "train.batch_size" and "16*4" in str(e.value)
