"""N, Na, M against the paper's released shapes and the models megatron actually builds."""

from __future__ import annotations

import csv
import os
from pathlib import Path

import pytest
import yaml

from steplaw_train import params
from steplaw_train.config import config_dir, model_from_cfg
from steplaw_train.spec import RunSpec

REPO = Path(__file__).resolve().parents[1]
SHARED = Path(os.environ.get("STEPLAW_SHARED", REPO.parent / "shared"))
RELEASED = SHARED / "steplaw" / "dense_lr_bs_loss.csv"


def _released_shapes() -> dict[tuple[int, int, int, int], int]:
    with open(RELEASED) as f:
        rows = list(csv.DictReader(f))
    return {
        (int(r["h"]), int(r["ffnh"]), int(r["numh"]), int(r["numl"])): int(r["N"]) for r in rows
    }


@pytest.mark.skipif(not RELEASED.exists(), reason=f"reference data not at {RELEASED}")
def test_N_matches_all_five_released_shapes():
    shapes = _released_shapes()
    assert len(shapes) == 5
    for (h, ffnh, _numh, numl), n in shapes.items():
        assert n == params.count(h, ffnh, numl, 2048).N


@pytest.mark.skipif(not RELEASED.exists(), reason=f"reference data not at {RELEASED}")
def test_every_released_shape_has_a_model_preset():
    presets = {}
    for path in (config_dir() / "model").glob("*.yaml"):
        m = model_from_cfg(yaml.safe_load(path.read_text()))
        if m.moe is None:
            presets[(m.hidden, m.ffn_hidden, m.heads, m.layers)] = m.name
    missing = set(_released_shapes()) - set(presets)
    assert not missing, f"released shapes without a configs/model preset: {missing}"


def test_moe_total_and_activated_counts():
    h, numl, e, k, moeh, shared = 64, 4, 8, 2, 32, 16
    c = params.count(
        h, 128, numl, 256, num_experts=e, topk=k, moe_ffnh=moeh, shared_ffnh=shared, dense_layers=1
    )
    dense = 4 * h * h + 3 * h * 128
    assert dense + 3 * (4 * h * h + 3 * h * (e * moeh + shared)) == c.N
    assert c.Na == dense + 3 * (4 * h * h + 3 * h * (k * moeh + shared))
    assert c.Na < c.N


@pytest.mark.parametrize("preset", ["demo_dense", "demo_moe"])
def test_built_megatron_model_has_exactly_N_matrix_parameters(preset):
    """The model megatron builds from a preset holds N weight-matrix parameters (norms, router
    and embeddings excluded, as in the paper), so the spec and the trained model agree."""
    from steplaw_train import _cpu_compat, distributed
    from steplaw_train.model import build_model, count_parameters
    from steplaw_train.spec import DataSpec, TrainSpec

    model = model_from_cfg(yaml.safe_load((config_dir() / "model" / f"{preset}.yaml").read_text()))
    spec = RunSpec(
        model,
        DataSpec("demo", (("code", 1.0),), "byte", 320),
        TrainSpec(lr=1e-3, batch_size=1, tokens=128, seq_len=128),
    )
    _cpu_compat.apply()
    distributed.init(use_cuda=False)
    try:
        gpt = build_model(model, 320, 128, bf16=False, use_cuda=False)
        counts = count_parameters(gpt)
    finally:
        distributed.shutdown()
    assert counts["matrices"] == spec.N
    assert counts["embedding"] == params.embedding_params(320, model.hidden)


# preset: (N, Na, M) of the authors' released MoE shapes (../shared/steplaw/README.md)
RELEASED_MOE = {
    "moe_e89_k1": (2_150_612_992, 187_973_632, 1_681_489_920),
    "moe_e88_k2": (2_150_612_992, 232_579_072, 1_949_122_560),
    "moe_e8_k1": (2_155_174_912, 590_436_352, 4_096_266_240),
    "moe_e8_k3": (2_156_188_672, 1_241_270_272, 8_001_269_760),
}


@pytest.mark.parametrize("preset", sorted(RELEASED_MOE))
def test_moe_presets_are_the_released_shapes(preset):
    from steplaw_train.spec import DataSpec, TrainSpec

    model = model_from_cfg(yaml.safe_load((config_dir() / "model" / f"{preset}.yaml").read_text()))
    spec = RunSpec(
        model,
        DataSpec("paper", (("code", 1.0),), "byte", 320),
        TrainSpec(lr=1e-3, batch_size=256, tokens=2e9, seq_len=2048),
    )
    assert (spec.N, spec.Na, spec.counts.M) == RELEASED_MOE[preset]
    assert (model.hidden, model.heads, model.layers, model.ffn_hidden) == (1408, 11, 16, 3904)
    assert model.moe.dense_layers == 1
    assert model.moe.shared_expert_ffn_hidden == model.moe.topk * model.moe.expert_ffn_hidden
