"""Training FLOPs per token and device peaks: the one source for MFU and for GPU-hour estimates.

FLOPs per token (forward + backward = 3 x forward, 2 FLOPs per multiply-add) are the Step Law
code's non-embedding count M (params.py: 6 (4h + 3 ffnh + 2 seq) numl h, activated FFN width for
MoE) plus the LM head's 6 V h — the same accounting as PaLM's appendix B (6N + 12 L H Q T) with the
output projection included, which nanoGPT also uses for MFU. The input embedding is a lookup (no
FLOPs). Leaving the head out makes the estimate 5% low at 1B parameters and 24% low at 60M with a
32k vocabulary.
"""

from __future__ import annotations

import re

from steplaw_train import params


def lm_head_flops_per_token(vocab_size: int, hidden: int) -> float:
    """6 V h: the output projection's forward and backward matmuls."""
    return 6.0 * vocab_size * hidden


def flops_per_token(counts: params.Counts, vocab_size: int, hidden: int) -> float:
    """Training FLOPs per token: M (non-embedding, attention scores included) + the LM head."""
    return counts.M + lm_head_flops_per_token(vocab_size, hidden)


# Dense bf16 tensor-core peaks (no sparsity), in FLOP/s, from the vendors' datasheets. Matched
# against torch.cuda.get_device_name() by the first pattern that fits: variants (PCIe, NVL) before
# the SXM part they would otherwise match.
PEAK_BF16_FLOPS: tuple[tuple[str, float], ...] = (
    (r"H100.*PCIe", 756e12),
    (r"H100.*NVL", 835e12),
    (r"H100", 989e12),  # SXM5 ("NVIDIA H100 80GB HBM3")
    (r"H800.*PCIe", 756e12),
    (r"H800", 989e12),
    (r"H200.*NVL", 835e12),
    (r"H200|GH200", 989e12),
    (r"A100|A800", 312e12),
    (r"L40S", 362e12),
    (r"B200", 2250e12),
)


def peak_flops(device_name: str) -> float | None:
    """Peak dense bf16 FLOP/s of a device by its CUDA name; None when unknown (no MFU then)."""
    for pattern, peak in PEAK_BF16_FLOPS:
        if re.search(pattern, device_name, flags=re.IGNORECASE):
            return peak
    return None


def run_flops_per_token(spec) -> float:
    """`flops_per_token` of a RunSpec (its counts, its data's vocabulary, its hidden size)."""
    return flops_per_token(spec.counts, spec.data.vocab_size, spec.model.hidden)


def mfu(tokens_per_s: float, flops_per_tok: float, devices: int, peak: float) -> float:
    """Model FLOPs utilisation: achieved training FLOP/s over the devices' peak."""
    return tokens_per_s * flops_per_tok / (devices * peak)


# The device the sweep's GPU-hour estimate assumes unless `resources.peak_tflops` says otherwise.
DEFAULT_DEVICE = "NVIDIA H100 80GB HBM3"
