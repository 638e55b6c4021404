"""RunSpec: one training run as an immutable value.

Everything upstream (Hydra configs, grid expansion, guided search) produces RunSpecs; everything
downstream (the trainer, launch, analysis) consumes them or the run directories they leave.
The run_id is a hash of the canonical spec, so the same point of a grid never gets two ids and a
changed spec never reuses one. Labels (model preset name, recipe name, sweep name) and execution
details that do not change the mathematics (checkpoint interval, micro-batch size, wandb project)
stay out of the hash: they live in `RunOptions` or are excluded explicitly.
"""

from __future__ import annotations

import functools
import hashlib
import json
import math
from dataclasses import MISSING, asdict, dataclass, fields, replace
from typing import Any

from steplaw_train import params
from steplaw_train.errors import SpecError
from steplaw_train.keys import check_keys

HASH_EXCLUDED = {("model", "name"), ("data", "recipe")}
MIN_LR_MODES = ("fixed", "ratio")


@dataclass(frozen=True)
class MoESpec:
    """Mixture-of-experts layer settings (megatron-core MoE layer)."""

    num_experts: int
    topk: int
    expert_ffn_hidden: int  # moeh: FFN width of one routed expert
    shared_expert_ffn_hidden: int = 0  # 0 = no shared expert
    dense_layers: int = 1  # the first `dense_layers` layers use a dense SwiGLU of ffn_hidden
    aux_loss_coeff: float = 1e-2  # load-balancing loss weight (megatron moe_aux_loss_coeff)


@dataclass(frozen=True)
class ModelSpec:
    """Transformer shape: pre-norm RMSNorm, SwiGLU, RoPE, no linear biases, untied embeddings."""

    name: str
    hidden: int  # h
    ffn_hidden: int  # ffnh (SwiGLU inner width)
    heads: int  # numh
    layers: int  # numl
    init_std: float = 0.02
    moe: MoESpec | None = None


@dataclass(frozen=True)
class DataSpec:
    """A data recipe: a weighted blend of named tokenized datasets.

    `sources` holds (dataset name, weight) pairs; names resolve to Megatron indexed-dataset
    prefixes under the data root at run time, so the spec (and run_id) is machine independent.
    """

    recipe: str
    sources: tuple[tuple[str, float], ...]
    tokenizer: str  # "byte" or the name of a trained tokenizer under the data root
    vocab_size: int


@dataclass(frozen=True)
class TrainSpec:
    """Optimisation of one run. Units: lr per step, batch_size in sequences, tokens = D."""

    lr: float
    batch_size: int  # global batch in sequences
    tokens: int  # D: training tokens, one pass
    seq_len: int = 2048
    seed: int = 1234
    min_lr: float = 1e-5  # the paper's fixed final LR
    min_lr_mode: str = "fixed"  # "fixed": decay to min_lr; "ratio": decay to lr * min_lr_ratio
    min_lr_ratio: float = 0.1
    warmup_fraction: float = 0.05  # warmup = min(warmup_max_steps, round(fraction * iterations))
    warmup_max_steps: int = 2000
    adam_beta1: float = 0.9
    adam_beta2: float = 0.95
    adam_eps: float = 1e-8
    weight_decay: float = 0.1
    clip_grad: float = 1.0
    log_interval: int = 1  # steps between logged losses (enters the smoothed final loss)


@dataclass(frozen=True)
class RunSpec:
    model: ModelSpec
    data: DataSpec
    train: TrainSpec

    # ---- derived values, computed from the spec alone -------------------------------------
    @property
    def counts(self) -> params.Counts:
        m, moe = self.model, self.model.moe
        if moe is None:
            return params.count(m.hidden, m.ffn_hidden, m.layers, self.train.seq_len)
        return params.count(
            m.hidden,
            m.ffn_hidden,
            m.layers,
            self.train.seq_len,
            num_experts=moe.num_experts,
            topk=moe.topk,
            moe_ffnh=moe.expert_ffn_hidden,
            shared_ffnh=moe.shared_expert_ffn_hidden,
            dense_layers=moe.dense_layers,
        )

    @property
    def N(self) -> int:
        return self.counts.N

    @property
    def Na(self) -> int:
        return self.counts.Na

    @property
    def M(self) -> float:
        return self.counts.M

    @property
    def D(self) -> int:
        return self.train.tokens

    @property
    def C(self) -> float:
        return self.counts.compute(self.train.tokens)

    @property
    def tokens_per_step(self) -> int:
        return self.train.batch_size * self.train.seq_len

    @property
    def iterations(self) -> int:
        """round(D / (bs * seq)): the paper's `ti`."""
        return max(0, round(self.train.tokens / self.tokens_per_step))

    @property
    def warmup_steps(self) -> int:
        t = self.train
        return min(t.warmup_max_steps, max(1, round(t.warmup_fraction * self.iterations)))

    @property
    def final_lr(self) -> float:
        t = self.train
        return t.min_lr if t.min_lr_mode == "fixed" else t.lr * t.min_lr_ratio

    @functools.cached_property
    def run_id(self) -> str:
        """The hash of the canonical spec; cached (the spec is frozen), as a sweep asks for it
        several times per run."""
        return run_id(self)

    # ---- (de)serialisation ------------------------------------------------------------------
    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    def derived(self) -> dict[str, Any]:
        """The values a reader of spec.json should not have to recompute."""
        return {
            "run_id": self.run_id,
            "N": self.N,
            "Na": self.Na,
            "M": self.M,
            "D": self.D,
            "C": self.C,
            "iterations": self.iterations,
            "warmup_steps": self.warmup_steps,
            "final_lr": self.final_lr,
            "bs_tokens": self.tokens_per_step,
        }

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> RunSpec:
        m = dict(d["model"])
        moe = m.pop("moe", None)
        model = ModelSpec(**m, moe=MoESpec(**moe) if moe else None)
        data = dict(d["data"])
        data["sources"] = tuple((str(n), float(w)) for n, w in data["sources"])
        return cls(model=model, data=DataSpec(**data), train=TrainSpec(**d["train"]))

    def with_train(self, **changes: Any) -> RunSpec:
        return replace(self, train=replace(self.train, **changes))


def canonical_json(spec: RunSpec) -> str:
    """The hashed form: sorted keys, labels removed, floats by repr (exact round trip)."""
    d = spec.to_dict()
    for section, key in HASH_EXCLUDED:
        d[section].pop(key, None)
    return json.dumps(d, sort_keys=True, separators=(",", ":"))


def run_id(spec: RunSpec) -> str:
    return hashlib.sha256(canonical_json(spec).encode()).hexdigest()[:12]


# ---- field ranges -------------------------------------------------------------------------------
# Checked before anything is built or written: a value outside its range either crashes deep
# inside megatron after the model is allocated, or (worse) trains and records something that is
# not the experiment asked for (adam_eps=0 blows up and would be filed as a real divergence;
# clip_grad<0 silently disables clipping).
SEED_RANGE = (0, 2**32)  # numpy's and torch's seeds
# A sanity bound, not a hardware limit: ~1e12 non-embedding parameters is beyond any Step Law
# grid, and a typo (hidden=1048576) would otherwise allocate terabytes before anything fails.
MAX_PARAMETERS = 10**12


def is_number(value: Any) -> bool:
    """int or float but not bool (YAML's `yes` must not become 1)."""
    return isinstance(value, int | float) and not isinstance(value, bool)


def is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def check_int(name: str, value: Any, lo: int, hi: int | None = None) -> None:
    """value must be an integer in [lo, hi) (hi None: unbounded)."""
    allowed = f"in [{lo}, {hi})" if hi is not None else f">= {lo}"
    if not is_int(value) or value < lo or (hi is not None and value >= hi):
        raise SpecError(name, f"must be an integer {allowed}, got {value!r}")


def check_real(
    name: str, value: Any, lo: float | None, hi: float | None, bounds: str = "[)"
) -> None:
    """value must be a finite number in the interval `bounds` ("[)", "(]", "()", "[]")."""
    ok = is_number(value) and math.isfinite(value)
    if ok and lo is not None:
        ok = value >= lo if bounds[0] == "[" else value > lo
    if ok and hi is not None:
        ok = value <= hi if bounds[1] == "]" else value < hi
    if not ok:
        left = f"{bounds[0]}{lo if lo is not None else '-inf'}"
        right = f"{hi if hi is not None else 'inf'}{bounds[1]}"
        raise SpecError(name, f"must be a finite number in {left}, {right}, got {value!r}")


def _check_train_ranges(t: TrainSpec) -> None:
    check_real("train.lr", t.lr, 0, None, "()")
    check_int("train.batch_size", t.batch_size, 1)
    check_int("train.seq_len", t.seq_len, 1)
    check_int("train.tokens", t.tokens, 1)
    check_int("train.seed", t.seed, *SEED_RANGE)
    check_real("train.min_lr", t.min_lr, 0, None, "[)")
    check_real("train.min_lr_ratio", t.min_lr_ratio, 0, 1, "[]")
    check_real("train.warmup_fraction", t.warmup_fraction, 0, 1, "[)")
    check_int("train.warmup_max_steps", t.warmup_max_steps, 1)
    check_real("train.adam_beta1", t.adam_beta1, 0, 1, "[)")
    check_real("train.adam_beta2", t.adam_beta2, 0, 1, "[)")
    check_real("train.adam_eps", t.adam_eps, 0, None, "()")
    check_real("train.weight_decay", t.weight_decay, 0, None, "[)")
    check_real("train.clip_grad", t.clip_grad, 0, None, "[)")
    check_int("train.log_interval", t.log_interval, 1)


def _check_model_ranges(m: ModelSpec) -> None:
    for f in ("hidden", "ffn_hidden", "heads", "layers"):
        check_int(f"model.{f}", getattr(m, f), 1)
    check_real("model.init_std", m.init_std, 0, None, "()")
    if m.moe is not None:
        e = m.moe
        check_int("model.moe.num_experts", e.num_experts, 1)
        check_int("model.moe.topk", e.topk, 1)
        check_int("model.moe.expert_ffn_hidden", e.expert_ffn_hidden, 1)
        check_int("model.moe.shared_expert_ffn_hidden", e.shared_expert_ffn_hidden, 0)
        check_int("model.moe.dense_layers", e.dense_layers, 0)
        check_real("model.moe.aux_loss_coeff", e.aux_loss_coeff, 0, None, "[)")


def _check_size(spec: RunSpec) -> None:
    total = spec.N + params.embedding_params(spec.data.vocab_size, spec.model.hidden)
    if total > MAX_PARAMETERS:
        m = spec.model
        raise SpecError(
            "model",
            f"{total:.3g} parameters (hidden={m.hidden}, ffn_hidden={m.ffn_hidden}, "
            f"layers={m.layers}) exceed the sanity bound {MAX_PARAMETERS:.0e}; check the shape",
        )


def validate(spec: RunSpec, data_parallel: int = 1, micro_batch_size: int | None = None) -> None:
    """Raise SpecError naming the first bad field; checks only what the spec alone decides."""
    m, t, d = spec.model, spec.train, spec.data
    _check_model_ranges(m)
    _check_train_ranges(t)
    check_int("data.vocab_size", d.vocab_size, 1)
    if m.hidden % m.heads:
        raise SpecError("model.heads", f"{m.heads} does not divide model.hidden={m.hidden}")
    if m.moe is not None:
        e = m.moe
        if e.topk > e.num_experts:
            raise SpecError(
                "model.moe.topk", f"must be in [1, num_experts={e.num_experts}], got {e.topk}"
            )
        if e.dense_layers >= m.layers:
            raise SpecError(
                "model.moe.dense_layers", f"must be in [0, layers={m.layers}), got {e.dense_layers}"
            )
    if t.tokens < spec.tokens_per_step:
        raise SpecError(
            "train.tokens",
            f"{t.tokens} is smaller than one step (batch_size*seq_len = {spec.tokens_per_step})",
        )
    if t.min_lr_mode not in MIN_LR_MODES:
        raise SpecError(
            "train.min_lr_mode", f"must be one of {MIN_LR_MODES}, got {t.min_lr_mode!r}"
        )
    if spec.final_lr > t.lr:
        raise SpecError("train.lr", f"peak lr {t.lr} is below the final lr {spec.final_lr}")
    if not d.sources:
        raise SpecError("data.sources", "a recipe needs at least one dataset")
    for name, w in d.sources:
        if not (is_number(w) and w > 0 and math.isfinite(w)):
            raise SpecError("data.sources", f"weight of {name!r} must be positive, got {w}")
    _check_size(spec)
    if t.batch_size % data_parallel:
        raise SpecError(
            "train.batch_size",
            f"{t.batch_size} is not a multiple of the data-parallel size {data_parallel} "
            "(one rank per GPU)",
        )
    if micro_batch_size is not None:
        if not is_int(micro_batch_size) or micro_batch_size <= 0:
            raise SpecError("options.micro_batch_size", f"must be positive, got {micro_batch_size}")
        if t.batch_size % (micro_batch_size * data_parallel):
            raise SpecError(
                "train.batch_size",
                f"{t.batch_size} is not a multiple of micro_batch_size*data_parallel "
                f"= {micro_batch_size}*{data_parallel}",
            )


def from_plain(cls: type, d: dict[str, Any], prefix: str) -> Any:
    """Build a dataclass from a plain dict, naming unknown keys with the allowed ones."""
    if not isinstance(d, dict):
        raise SpecError(prefix, f"must be a mapping of fields, got {d!r}")
    check_keys(d, [f.name for f in fields(cls)], prefix)
    required = [
        f.name for f in fields(cls) if f.default is MISSING and f.default_factory is MISSING
    ]
    missing = [k for k in required if k not in d]
    if missing:
        raise SpecError(f"{prefix}.{missing[0]}", f"missing; required fields: {required}")
    return cls(**d)


__all__ = [
    "DataSpec",
    "ModelSpec",
    "MoESpec",
    "RunSpec",
    "SpecError",
    "TrainSpec",
    "canonical_json",
    "check_int",
    "check_real",
    "from_plain",
    "is_int",
    "is_number",
    "run_id",
    "validate",
]
