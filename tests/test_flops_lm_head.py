"""FLOPs per token with the LM head, pinned on two released shapes, and the device peak table."""

from __future__ import annotations

import pytest
import yaml

from steplaw_train import flops, params
from steplaw_train.config import config_dir

VOCAB = 32000  # configs/data/paper.yaml
SEQ = 2048


def _counts(preset: str):
    m = yaml.safe_load((config_dir() / "model" / f"{preset}.yaml").read_text())
    return m, params.count(m["hidden"], m["ffn_hidden"], m["layers"], SEQ)


@pytest.mark.parametrize(
    ("preset", "total", "head_share"),
    [
        # 6 (4h + 3 ffnh + 2 seq) L h + 6 V h, by hand: 1B = 7.248e9 + 0.393e9; 60M = 474.2e6 + 147.5e6
        ("dense_1b", 7.2478e9 + 0.39322e9, 0.051),
        ("dense_60m", 474.22e6 + 147.46e6, 0.237),
    ],
)
def test_flops_per_token_include_the_lm_head(preset, total, head_share):
    m, counts = _counts(preset)
    got = flops.flops_per_token(counts, VOCAB, m["hidden"])
    assert got == pytest.approx(total, rel=1e-4)
    head = flops.lm_head_flops_per_token(VOCAB, m["hidden"])
    assert head == 6 * VOCAB * m["hidden"] and got == counts.M + head
    assert head / got == pytest.approx(head_share, abs=0.002)  # the share MFU used to leave out


@pytest.mark.parametrize(
    ("name", "peak"),
    [
        ("NVIDIA H100 80GB HBM3", 989e12),
        ("NVIDIA H100 PCIe", 756e12),
        ("NVIDIA H100 NVL", 835e12),
        ("NVIDIA H200", 989e12),
        ("NVIDIA H800 PCIe", 756e12),
        ("NVIDIA A100-SXM4-80GB", 312e12),
        ("Tesla T4", None),
    ],
)
def test_peak_flops_by_device_model_not_by_substring_of_the_sxm_part(name, peak):
    assert flops.peak_flops(name) == peak
