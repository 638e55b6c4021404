"""Parameter and FLOP accounting, shared by the trainer (MFU), the sweep (GPU-hours) and the analysis.

Conventions follow the Step Law paper (Li et al. 2025, arXiv 2503.04715) and its released code:

* N (non-embedding parameters) = numl * (4 h^2 + 3 h ffnh): attention Q, K, V, O are h x h each,
  SwiGLU has three h x ffnh matrices. Norms, biases, router weights and embeddings are left out,
  as in the paper's tables (the released CSV's N column is exactly this number).
* For MoE the same convention counts every expert (N, "total") or only the experts a token
  visits (Na, "activated"): a MoE layer has 4h^2 + 3h (E moeh + shared_h) parameters, of which
  4h^2 + 3h (k moeh + shared_h) are activated. The first `dense_layers` layers are dense.
* M (non-embedding FLOPs per token, forward + backward) = 6 (4h + 3 ffnh + 2 seq) numl h, the Step
  Law code's formula: 6 N-style matmul FLOPs plus the attention-score term 6 * 2 seq h per layer.
  MoE layers use the activated FFN width. C = M * D.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Counts:
    """N, Na and M of one model; C needs D and is computed by `compute`."""

    N: int
    Na: int
    M: float

    def compute(self, D: float) -> float:
        """C = M * D, the paper's compute budget in FLOPs."""
        return self.M * D


def dense_layer_params(h: int, ffnh: int) -> int:
    return 4 * h * h + 3 * h * ffnh


def count(
    h: int,
    ffnh: int,
    numl: int,
    seq_len: int,
    num_experts: int = 0,
    topk: int = 0,
    moe_ffnh: int = 0,
    shared_ffnh: int = 0,
    dense_layers: int = 0,
) -> Counts:
    """Count N, Na (activated) and M for a dense (num_experts == 0) or MoE model."""
    if num_experts <= 0:
        n = numl * dense_layer_params(h, ffnh)
        m = 6.0 * (4 * h + 3 * ffnh + 2 * seq_len) * numl * h
        return Counts(N=n, Na=n, M=m)
    n_dense, n_moe = dense_layers, numl - dense_layers
    total = n_dense * dense_layer_params(h, ffnh) + n_moe * (
        4 * h * h + 3 * h * (num_experts * moe_ffnh + shared_ffnh)
    )
    active = n_dense * dense_layer_params(h, ffnh) + n_moe * (
        4 * h * h + 3 * h * (topk * moe_ffnh + shared_ffnh)
    )
    m = (
        6.0
        * h
        * (
            n_dense * (4 * h + 3 * ffnh + 2 * seq_len)
            + n_moe * (4 * h + 3 * (topk * moe_ffnh + shared_ffnh) + 2 * seq_len)
        )
    )
    return Counts(N=total, Na=active, M=m)


def embedding_params(vocab_size: int, h: int, tied: bool = False) -> int:
    """Input embedding plus output layer; reported separately, never part of N."""
    return vocab_size * h * (1 if tied else 2)
