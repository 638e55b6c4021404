"""ModelSpec -> megatron-core GPTModel. The only module that knows megatron's model names.

The architecture mirrors the Step Law paper: pre-norm RMSNorm, SwiGLU (gated linear unit with
SiLU), no linear biases, untied input/output embeddings, no dropout. One departure: the paper
uses ALiBi, which megatron-core 0.16.1 does not implement; we use RoPE (megatron's native
position embedding, base 10000) rather than hand-writing attention. The parameter count N is
unaffected (neither has parameters).

GPU runs use the Transformer Engine layer spec in bf16 (TE is required on CUDA: no silent
fallback) with the fused kernels TE and Apex provide (RoPE, cross entropy, MoE grouped GEMM and
permutation, gradient-accumulation fusion); CPU runs use megatron's local spec in fp32 with every
fusion off (TE cannot even be installed in a CPU environment: its meta package makes `import
megatron.core` fail). MoE layers come from megatron-core's MoE layer: `num_experts` routed
experts of width `expert_ffn_hidden`, top-k routing with a load-balancing aux loss, an optional
shared expert, and the first `dense_layers` layers dense (`moe_layer_freq` as a 0/1 list).
Top-1 presets route with the softmax taken before the top-k (megatron requires it: a softmax
over one logit has no gradient); top-k > 1 keeps megatron's default (top-k, then softmax).
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from steplaw_train.spec import ModelSpec, SpecError


@dataclass(frozen=True)
class Kernels:
    """Which fused GPU kernels this process can use (all off on CPU).

    Each flag is only switched on where its kernel exists, because megatron raises at model
    construction otherwise: RoPE and cross-entropy fusion and MoE grouped GEMM / permute fusion
    come with Transformer Engine; gradient-accumulation fusion needs Apex's
    `fused_weight_gradient_mlp_cuda` for the output layer (NGC images carry it).
    """

    te: bool = False
    wgrad_fusion: bool = False

    @classmethod
    def detect(cls, use_cuda: bool) -> Kernels:
        if not use_cuda:
            return cls()
        return cls(te=te_available(), wgrad_fusion=wgrad_fusion_available())


def config_kwargs(
    model: ModelSpec,
    bf16: bool,
    use_cuda: bool,
    kernels: Kernels = Kernels(),
    deterministic: bool = False,
) -> dict:
    """TransformerConfig's arguments for a ModelSpec: a pure function (tests and the dry run
    read it without building anything)."""
    fused = use_cuda and kernels.te
    kwargs: dict = dict(
        num_layers=model.layers,
        hidden_size=model.hidden,
        ffn_hidden_size=model.ffn_hidden,
        num_attention_heads=model.heads,
        normalization="RMSNorm",
        layernorm_epsilon=1e-5,
        gated_linear_unit=True,
        activation_func=F.silu,
        add_bias_linear=False,
        add_qkv_bias=False,
        hidden_dropout=0.0,
        attention_dropout=0.0,
        init_method_std=model.init_std,
        bf16=bf16,
        params_dtype=torch.bfloat16 if bf16 else torch.float32,
        pipeline_dtype=torch.bfloat16 if bf16 else torch.float32,
        use_cpu_initialization=not use_cuda,
        bias_activation_fusion=use_cuda,
        bias_dropout_fusion=use_cuda,
        masked_softmax_fusion=use_cuda,
        persist_layer_norm=use_cuda,
        apply_rope_fusion=fused,
        gradient_accumulation_fusion=use_cuda and kernels.wgrad_fusion,
        # TE's fused cross entropy is not bitwise reproducible run to run: off when deterministic
        cross_entropy_loss_fusion=fused and not deterministic,
        cross_entropy_fusion_impl="te",
        deterministic_mode=use_cuda and deterministic,
    )
    moe = model.moe
    if moe is not None:
        kwargs.update(
            num_moe_experts=moe.num_experts,
            moe_router_topk=moe.topk,
            # top-1 needs the softmax over all experts before the top-k: a softmax over the one
            # chosen logit is constant 1 and the router would get no gradient (megatron raises)
            moe_router_pre_softmax=moe.topk == 1,
            moe_ffn_hidden_size=moe.expert_ffn_hidden,
            moe_shared_expert_intermediate_size=moe.shared_expert_ffn_hidden or None,
            moe_layer_freq=[0] * moe.dense_layers + [1] * (model.layers - moe.dense_layers),
            moe_aux_loss_coeff=moe.aux_loss_coeff,
            moe_router_load_balancing_type="aux_loss",
            # alltoall creates a torch.cuda.Stream at construction; allgather is equivalent at EP=1
            moe_token_dispatcher_type="alltoall" if use_cuda else "allgather",
            # one grouped GEMM per layer instead of a loop over the experts (TE's GroupedLinear)
            moe_grouped_gemm=fused,
            moe_permute_fusion=fused,
            moe_router_dtype="fp32",
        )
    return kwargs


def transformer_config(
    model: ModelSpec,
    bf16: bool,
    use_cuda: bool,
    kernels: Kernels | None = None,
    deterministic: bool = False,
):
    """The megatron TransformerConfig for a ModelSpec (fused kernels only on GPU)."""
    from megatron.core.transformer.transformer_config import TransformerConfig

    kernels = Kernels.detect(use_cuda) if kernels is None else kernels
    return TransformerConfig(**config_kwargs(model, bf16, use_cuda, kernels, deterministic))


def check_buildable(model: ModelSpec) -> None:
    """Build the TransformerConfig of `model` for both targets (CPU fp32 and GPU bf16) and raise
    SpecError("model", ...) with megatron's own message if it refuses.

    megatron checks many combinations only at construction (e.g. top-1 routing without
    pre-softmax); the sweep's dry run calls this once per distinct shape so such a preset fails
    on the submit host, not after every job's queue wait. The GPU variant is checked without the
    kernels that need Transformer Engine installed (the submit host often has none); those
    flags are switched on only where the kernels import (Kernels.detect).
    """
    from megatron.core.transformer.transformer_config import TransformerConfig

    for bf16, use_cuda in ((False, False), (True, True)):
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                TransformerConfig(**config_kwargs(model, bf16, use_cuda))
        except (ValueError, AssertionError, TypeError, RuntimeError) as e:
            target = "GPU" if use_cuda else "CPU"
            raise SpecError(
                "model", f"megatron rejects preset {model.name!r} ({target}): {e}"
            ) from e


def layer_spec(model: ModelSpec, config, use_te: bool):
    """TE spec on GPU (fused kernels), local spec on CPU; both carry RMSNorm and SwiGLU.

    MoE models need a per-layer block spec: a single layer spec would make every layer MoE and
    ignore `moe_layer_freq`; megatron's decoder-block spec builds the dense first layers from the
    same TE/local layer specs.
    """
    from megatron.core.models.gpt import gpt_layer_specs as specs

    if model.moe is not None:
        return specs.get_gpt_decoder_block_spec(
            config, use_transformer_engine=use_te, normalization="RMSNorm"
        )
    if use_te:
        return specs.get_gpt_layer_with_transformer_engine_spec()
    return specs.get_gpt_layer_local_spec(normalization="RMSNorm")


def build_model(
    model: ModelSpec,
    vocab_size: int,
    seq_len: int,
    bf16: bool,
    use_cuda: bool,
    deterministic: bool = False,
):
    """Build the GPTModel (on the current device; parameters in the run's precision).

    On CUDA, Transformer Engine is required: megatron's local spec would train with unfused
    quadratic attention (out of memory at 1B) and its MoE path needs TE's GEMM, so a missing
    TE is an error here rather than a silent, slower, different model.
    """
    from megatron.core.models.gpt import GPTModel

    kernels = Kernels.detect(use_cuda)
    if use_cuda and not kernels.te:
        raise RuntimeError(TE_REQUIRED)
    config = transformer_config(model, bf16, use_cuda, kernels, deterministic)
    gpt = GPTModel(
        config=config,
        transformer_layer_spec=layer_spec(model, config, use_te=kernels.te),
        vocab_size=vocab_size,
        max_sequence_length=seq_len,
        pre_process=True,
        post_process=True,
        share_embeddings_and_output_weights=False,
        position_embedding_type="rope",
    )
    if use_cuda:
        gpt.cuda(torch.cuda.current_device())
    return gpt


TE_REQUIRED = (
    "CUDA is available but Transformer Engine is not importable: GPU runs need it (fused "
    "attention, MoE grouped GEMM). Install the gpu extra (pip install --no-build-isolation "
    "'steplaw-train[gpu]') or use the NGC image (Dockerfile); to train on CPU instead, hide the "
    "GPUs with CUDA_VISIBLE_DEVICES=''."
)


def te_available() -> bool:
    """Transformer Engine importable? Any exception counts as absent (its meta package raises
    RuntimeError, not ImportError, when the CUDA build is missing)."""
    try:
        import transformer_engine  # noqa: F401
        import transformer_engine.pytorch  # noqa: F401
    except Exception:
        return False
    return True


def wgrad_fusion_available() -> bool:
    """Apex's fused weight-gradient kernel, which gradient_accumulation_fusion needs."""
    try:
        import fused_weight_gradient_mlp_cuda  # noqa: F401
    except Exception:
        return False
    return True


def count_parameters(gpt: torch.nn.Module) -> dict[str, int]:
    """Parameter counts of the built model, for spec.json.

    `matrices` counts what the paper's N counts (attention and FFN weight matrices; no norms,
    router or embeddings), so it must equal `RunSpec.N`: a check that the built model is the
    shape the spec describes.
    """
    total = emb = matrices = 0
    for name, p in gpt.named_parameters():
        total += p.numel()
        if "embedding" in name or "output_layer" in name:
            emb += p.numel()
        elif p.dim() == 2 and ".router." not in name:
            matrices += p.numel()
    return {"total": total, "embedding": emb, "non_embedding": total - emb, "matrices": matrices}
