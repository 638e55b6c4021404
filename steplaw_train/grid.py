"""Grid expansion: a grid config (configs/grid/*.yaml) → a list of RunSpecs. Pure: no I/O but
reading the named presets, no submission. Format documented in docs/sweeps.md.

A grid is a list of *blocks*; each block is the Cartesian product of its axes:
  model       preset names (configs/model/<name>.yaml) or explicit shape dicts
  tokens      D in tokens, or tokens_per_param (D = round(r * N))
  lr          list, or {min, max, step_log2} (log-spaced, 2^0.5 steps as in the paper), or a
              per-cell window {center: step_law, span_log2, step_log2} around the law's prediction
  batch_size  same forms, in sequences (the window's law gives tokens; divided by seq_len)
  recipe      data preset names (configs/data/<name>.yaml)
  seed        ints
LR values are rounded to `lr_digits` significant digits so that a range always yields the same
floats, hence the same run_ids, on every machine and Python version.
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, replace
from typing import Any

from steplaw_train import config as cfgmod
from steplaw_train.cells import cell_key
from steplaw_train.keys import unknown_keys_message
from steplaw_train.spec import DataSpec, ModelSpec, RunSpec, SpecError, TrainSpec, validate
from steplaw_train.steplaw import PAPER

AXES = ("model", "tokens", "tokens_per_param", "lr", "batch_size", "recipe", "seed")
BLOCK_KEYS = (*AXES, "train", "name")
RANGE_KEYS = ("min", "max", "step_log2", "round_to")
WINDOW_KEYS = ("center", "span_log2", "step_log2", "round_to")
LAWS = ("step_law",)
LR_DIGITS = 4


class GridError(SpecError):
    """A grid entry cannot be expanded; names the field, the grid entry and the allowed values."""

    def __init__(self, field_name: str, entry: str, message: str):
        super().__init__(field_name, f"{message} (in {entry})")
        self.entry = entry


def step_law(N: float, D: float) -> tuple[float, float]:
    """Step Law (Li et al. 2025, the paper's constants; steplaw.py): optimal peak LR and batch
    size in tokens for N params, D tokens."""
    return PAPER.predict(N, D)


def round_sig(x: float, digits: int = LR_DIGITS) -> float:
    """Round to `digits` significant digits (stable run_ids for log-spaced LRs)."""
    return float(f"{x:.{digits - 1}e}")


# ---- axis values -------------------------------------------------------------------------------
def log_range(lo: float, hi: float, step_log2: float) -> list[float]:
    """lo * 2^(k*step) for k = 0, 1, ... up to hi (inclusive, with float slack)."""
    n = math.floor(math.log2(hi / lo) / step_log2 + 1e-9)
    return [lo * 2 ** (k * step_log2) for k in range(n + 1)]


def window(center: float, span_log2: float, step_log2: float) -> list[float]:
    k = math.floor(span_log2 / step_log2 + 1e-9)
    return [center * 2 ** (i * step_log2) for i in range(-k, k + 1)]


def _check_keys(value: Mapping, allowed: Sequence[str], field_name: str, entry: str) -> None:
    message = unknown_keys_message(value, allowed)
    if message is not None:
        raise GridError(field_name, entry, message)


def numeric_axis(
    name: str, value: Any, entry: str, law_value: Callable[[], float] | None
) -> list[float]:
    """Expand an lr/batch_size axis: list, log range or law-centred window."""
    if isinstance(value, int | float):
        return [float(value)]
    if isinstance(value, Sequence) and not isinstance(value, str):
        if not value:
            raise GridError(name, entry, "empty list")
        return [float(v) for v in value]
    if not isinstance(value, Mapping):
        raise GridError(
            name, entry, f"must be a number, a list, {list(RANGE_KEYS)} or {list(WINDOW_KEYS)}"
        )
    if "center" in value:
        _check_keys(value, WINDOW_KEYS, name, entry)
        if value["center"] not in LAWS:
            raise GridError(
                f"{name}.center", entry, f"unknown law {value['center']!r}; allowed: {list(LAWS)}"
            )
        assert law_value is not None
        return window(
            law_value(), float(value.get("span_log2", 1.0)), float(value.get("step_log2", 0.5))
        )
    _check_keys(value, RANGE_KEYS, name, entry)
    try:
        lo, hi, step = float(value["min"]), float(value["max"]), float(value.get("step_log2", 0.5))
    except KeyError as e:
        raise GridError(
            name, entry, f"a range needs 'min' and 'max' (allowed keys: {list(RANGE_KEYS)})"
        ) from e
    if not (0 < lo <= hi and step > 0):
        raise GridError(name, entry, f"need 0 < min <= max and step_log2 > 0, got {dict(value)}")
    return log_range(lo, hi, step)


def round_batches(values: list[float], round_to: int) -> list[int]:
    """Nearest multiple of `round_to` (at least one multiple), de-duplicated, order kept."""
    out = [max(round_to, round(v / round_to) * round_to) for v in values]
    return list(dict.fromkeys(int(v) for v in out))


# ---- presets -----------------------------------------------------------------------------------
@dataclass(frozen=True)
class Presets:
    """Where named model/data presets come from; a function so tests can pass dicts."""

    load: Callable[[str, str], Mapping[str, Any]]


def yaml_presets() -> Presets:
    from omegaconf import OmegaConf

    cache: dict[tuple[str, str], Mapping[str, Any]] = {}

    def load(group: str, name: str) -> Mapping[str, Any]:
        if (group, name) not in cache:
            path = cfgmod.config_dir() / group / f"{name}.yaml"
            if not path.exists():
                have = sorted(p.stem for p in path.parent.glob("*.yaml"))
                raise GridError(group, f"{group}={name}", f"no preset {name!r}; allowed: {have}")
            d = OmegaConf.to_container(OmegaConf.load(path), resolve=True)
            d.pop("defaults", None)  # type: ignore[union-attr]
            cache[(group, name)] = d  # type: ignore[assignment]
        return cache[(group, name)]

    return Presets(load)


def _model(value: Any, presets: Presets, entry: str) -> ModelSpec:
    if isinstance(value, str):
        return cfgmod.model_from_cfg(presets.load("model", value))
    if isinstance(value, Mapping):
        d = dict(value)
        d.setdefault("name", f"h{d.get('hidden')}_f{d.get('ffn_hidden')}_l{d.get('layers')}")
        return cfgmod.model_from_cfg(d)
    raise GridError("model", entry, f"must be a preset name or a shape dict, got {value!r}")


def _data(value: Any, presets: Presets) -> DataSpec:
    return cfgmod.data_from_cfg(presets.load("data", value) if isinstance(value, str) else value)


def _as_list(value: Any) -> list[Any]:
    if value is None:
        return []
    if isinstance(value, Sequence) and not isinstance(value, str):
        return list(value)
    return [value]


# ---- expansion ---------------------------------------------------------------------------------
def expand(
    grid: Mapping[str, Any],
    base_model: Any,
    base_data: Any,
    base_train: Mapping[str, Any],
    presets: Presets | None = None,
    micro_batch_size: int | None = None,
) -> list[RunSpec]:
    """All RunSpecs of a grid, validated, de-duplicated by run_id, in a stable order."""
    presets = presets or yaml_presets()
    name = str(grid.get("name", "grid"))
    blocks = grid.get("blocks") or [grid.get("axes") or {}]
    specs: dict[str, RunSpec] = {}
    for i, block in enumerate(blocks):
        entry = f"grid {name!r} block {i}" + (f" ({block['name']})" if "name" in block else "")
        _check_keys(block, BLOCK_KEYS, "grid.blocks", entry)
        for spec in _expand_block(block, entry, base_model, base_data, base_train, presets):
            try:
                validate(spec, micro_batch_size=micro_batch_size)
            except SpecError as e:
                point = f"model={spec.model.name} D={spec.D} lr={spec.train.lr} bs={spec.train.batch_size}"
                raise GridError(e.field, f"{entry}, {point}", str(e).split(": ", 1)[1]) from None
            specs.setdefault(spec.run_id, spec)
    return list(specs.values())


def _expand_block(
    block: Mapping[str, Any],
    entry: str,
    base_model: Any,
    base_data: Any,
    base_train: Mapping[str, Any],
    presets: Presets,
) -> list[RunSpec]:
    train_over = dict(base_train) | dict(block.get("train") or {})
    try:
        train0 = cfgmod.train_from_cfg(train_over)
    except SpecError as e:
        raise GridError(e.field, entry, str(e).split(": ", 1)[1]) from None
    models = [_model(m, presets, entry) for m in _as_list(block.get("model"))] or [
        _model(base_model, presets, entry)
    ]
    datas = [_data(r, presets) for r in _as_list(block.get("recipe"))] or [
        _data(base_data, presets)
    ]
    seeds = [int(s) for s in _as_list(block.get("seed"))] or [train0.seed]
    if "tokens" in block and "tokens_per_param" in block:
        raise GridError("tokens", entry, "give either 'tokens' or 'tokens_per_param', not both")
    out: list[RunSpec] = []
    for model, data in itertools.product(models, datas):
        probe = RunSpec(model, data, train0)
        for D in _tokens(block, entry, probe.N, train0.tokens):
            cell = RunSpec(model, data, replace(train0, tokens=D))
            out.extend(_cell_runs(block, entry, cell, seeds))
    return out


def _tokens(block: Mapping[str, Any], entry: str, N: int, default: int) -> list[int]:
    if "tokens_per_param" in block:
        return [int(round(float(r) * N)) for r in _as_list(block["tokens_per_param"])]
    vals = _as_list(block.get("tokens")) or [default]
    for v in vals:
        if not isinstance(v, int | float) or v <= 0:
            raise GridError("tokens", entry, f"must be positive numbers of tokens, got {v!r}")
    return [int(round(float(v))) for v in vals]


def _cell_runs(
    block: Mapping[str, Any], entry: str, cell: RunSpec, seeds: list[int]
) -> list[RunSpec]:
    """The LR x BS x seed runs of one (model, recipe, D) cell."""
    t: TrainSpec = cell.train

    def law_lr() -> float:
        return step_law(cell.Na, cell.D)[0]

    def law_bs() -> float:
        return step_law(cell.Na, cell.D)[1] / t.seq_len

    lrs = list(
        dict.fromkeys(
            round_sig(v) for v in numeric_axis("lr", block.get("lr", t.lr), entry, law_lr)
        )
    )
    bs_cfg = block.get("batch_size", t.batch_size)
    round_to = int(bs_cfg.get("round_to", 1)) if isinstance(bs_cfg, Mapping) else 1
    bss = round_batches(numeric_axis("batch_size", bs_cfg, entry, law_bs), round_to)
    return [
        cell.with_train(lr=lr, batch_size=bs, seed=seed)
        for lr, bs, seed in itertools.product(lrs, bss, seeds)
    ]


__all__ = [
    "GridError",
    "Presets",
    "cell_key",
    "expand",
    "log_range",
    "round_sig",
    "step_law",
    "window",
    "yaml_presets",
]
