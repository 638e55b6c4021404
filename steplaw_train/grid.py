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
import re
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, replace
from typing import Any

from steplaw_train import config as cfgmod
from steplaw_train.cells import cell_key
from steplaw_train.keys import unknown_keys_message
from steplaw_train.spec import (
    SEED_RANGE,
    DataSpec,
    ModelSpec,
    RunSpec,
    SpecError,
    TrainSpec,
    is_int,
    is_number,
    validate,
)
from steplaw_train.steplaw import PAPER

AXES = ("model", "tokens", "tokens_per_param", "lr", "batch_size", "recipe", "seed")
BLOCK_KEYS = (*AXES, "train", "name")
RANGE_KEYS = ("min", "max", "step_log2", "round_to")
WINDOW_KEYS = ("center", "span_log2", "step_log2", "round_to")
LAWS = ("step_law",)
LR_DIGITS = 4
NAME_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.+-]*")  # one path component, not hidden, no '..'


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


def _number(name: str, value: Any, entry: str, positive: bool = True) -> float:
    """A finite (positive) number, or GridError naming the field: no NaN, inf, bool or text."""
    if not is_number(value) or not math.isfinite(value) or (positive and value <= 0):
        what = "a positive finite number" if positive else "a finite number"
        raise GridError(name, entry, f"must be {what}, got {value!r}")
    return float(value)


def _positive_int(name: str, value: Any, entry: str) -> int:
    """A positive integer as written (4 or 4.0): 0, -4 or 0.4 is an error, never rounded."""
    if is_number(value) and math.isfinite(value) and float(value).is_integer() and value > 0:
        return int(value)
    raise GridError(name, entry, f"must be a positive integer, got {value!r}")


def plain_name(name: str, value: Any, entry: str) -> str:
    """A preset or grid name: one path component, so it cannot reach outside its directory."""
    if not isinstance(value, str) or not NAME_RE.fullmatch(value):
        raise GridError(
            name, entry, f"must be a plain name ({NAME_RE.pattern}: no '/', no '..'), got {value!r}"
        )
    return value


def numeric_axis(
    name: str, value: Any, entry: str, law_value: Callable[[], float] | None
) -> list[float]:
    """Expand an lr/batch_size axis: list, log range or law-centred window."""
    if is_number(value):
        return [_number(name, value, entry)]
    if isinstance(value, Sequence) and not isinstance(value, str):
        if not value:
            raise GridError(name, entry, "empty list")
        return [_number(name, v, entry) for v in value]
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
        span = _number(f"{name}.span_log2", value.get("span_log2", 1.0), entry, positive=False)
        if span < 0:
            raise GridError(f"{name}.span_log2", entry, f"must be >= 0, got {span}")
        return window(
            law_value(), span, _number(f"{name}.step_log2", value.get("step_log2", 0.5), entry)
        )
    _check_keys(value, RANGE_KEYS, name, entry)
    if "min" not in value or "max" not in value:
        raise GridError(
            name, entry, f"a range needs 'min' and 'max' (allowed keys: {list(RANGE_KEYS)})"
        )
    lo = _number(f"{name}.min", value["min"], entry)
    hi = _number(f"{name}.max", value["max"], entry)
    step = _number(f"{name}.step_log2", value.get("step_log2", 0.5), entry)
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
        plain_name(group, name, f"{group}={name}")
        if (group, name) not in cache:
            path = cfgmod.config_dir() / group / f"{name}.yaml"
            if not path.exists():
                have = sorted(p.stem for p in path.parent.glob("*.yaml"))
                raise GridError(group, f"{group}={name}", f"no preset {name!r}; allowed: {have}")
            d = OmegaConf.to_container(OmegaConf.load(path), resolve=True)
            if not isinstance(d, dict):
                raise GridError(group, f"{group}={name}", f"{path} is not a mapping of fields")
            d.pop("defaults", None)
            cache[(group, name)] = d  # type: ignore[assignment]
        return cache[(group, name)]

    return Presets(load)


@contextmanager
def _in_entry(entry: str) -> Iterator[None]:
    """A preset's SpecError, re-raised as a GridError that also names the grid entry."""
    try:
        yield
    except GridError:
        raise
    except SpecError as e:
        raise GridError(e.field, entry, str(e).split(": ", 1)[1]) from None


def _model(value: Any, presets: Presets, entry: str) -> ModelSpec:
    with _in_entry(entry):
        return _model_unchecked(value, presets, entry)


def _model_unchecked(value: Any, presets: Presets, entry: str) -> ModelSpec:
    if isinstance(value, str):
        return cfgmod.model_from_cfg(presets.load("model", value))
    if isinstance(value, Mapping):
        d = dict(value)
        d.setdefault("name", f"h{d.get('hidden')}_f{d.get('ffn_hidden')}_l{d.get('layers')}")
        return cfgmod.model_from_cfg(d)
    raise GridError("model", entry, f"must be a preset name or a shape dict, got {value!r}")


def _data(value: Any, presets: Presets, entry: str) -> DataSpec:
    with _in_entry(entry):
        return _data_unchecked(value, presets, entry)


def _data_unchecked(value: Any, presets: Presets, entry: str) -> DataSpec:
    if isinstance(value, str):
        return cfgmod.data_from_cfg(presets.load("data", value))
    if isinstance(value, Mapping):
        return cfgmod.data_from_cfg(value)
    raise GridError("recipe", entry, f"must be a preset name or a recipe dict, got {value!r}")


def _as_list(value: Any) -> list[Any]:
    if value is None:
        return []
    if isinstance(value, Sequence) and not isinstance(value, str):
        return list(value)
    return [value]


def _axis(block: Mapping[str, Any], key: str, entry: str) -> list[Any]:
    """An axis' values; [] only when the block does not give the axis (then the base applies).

    An axis that is present but empty (`model: []`, `model:`) is an error: silently falling back
    to the base model would train something the grid does not say.
    """
    if key not in block:
        return []
    values = _as_list(block[key])
    if not values:
        raise GridError(key, entry, "empty axis; give at least one value or remove the key")
    return values


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
    blocks = _blocks(grid)
    name = str(grid.get("name", "grid"))
    specs: dict[str, RunSpec] = {}
    for i, block in enumerate(blocks):
        entry = f"grid {name!r} block {i}"
        if not isinstance(block, Mapping):
            raise GridError("grid.blocks", entry, f"must be a mapping of axes, got {block!r}")
        entry += f" ({block['name']})" if "name" in block else ""
        _check_keys(block, BLOCK_KEYS, "grid.blocks", entry)
        for spec in _expand_block(block, entry, base_model, base_data, base_train, presets):
            try:
                validate(spec, micro_batch_size=micro_batch_size)
            except SpecError as e:
                point = f"model={spec.model.name} D={spec.D} lr={spec.train.lr} bs={spec.train.batch_size}"
                raise GridError(e.field, f"{entry}, {point}", str(e).split(": ", 1)[1]) from None
            specs.setdefault(spec.run_id, spec)
    return list(specs.values())


def _blocks(grid: Any) -> list[Any]:
    """The grid's blocks, after checking its shape and name (the name becomes a directory)."""
    if not isinstance(grid, Mapping):
        raise GridError(
            "grid", "the grid", f"must be a mapping with 'name' and 'blocks', got {grid!r}"
        )
    name = grid.get("name", "grid")
    plain_name("grid.name", name, "the grid")
    blocks = grid.get("blocks") if "blocks" in grid else [grid.get("axes") or {}]
    if not isinstance(blocks, Sequence) or isinstance(blocks, str) or not blocks:
        raise GridError(
            "grid.blocks", f"grid {name!r}", f"must be a non-empty list, got {blocks!r}"
        )
    return list(blocks)


def _expand_block(
    block: Mapping[str, Any],
    entry: str,
    base_model: Any,
    base_data: Any,
    base_train: Mapping[str, Any],
    presets: Presets,
) -> list[RunSpec]:
    train_block = block.get("train") or {}
    if not isinstance(train_block, Mapping):
        raise GridError("train", entry, f"must be a mapping of train fields, got {train_block!r}")
    train_over = dict(base_train) | dict(train_block)
    try:
        train0 = cfgmod.train_from_cfg(train_over)
    except SpecError as e:
        raise GridError(e.field, entry, str(e).split(": ", 1)[1]) from None
    models = [_model(m, presets, entry) for m in _axis(block, "model", entry)] or [
        _model(base_model, presets, entry)
    ]
    datas = [_data(r, presets, entry) for r in _axis(block, "recipe", entry)] or [
        _data(base_data, presets, entry)
    ]
    seeds = [_seed(s, entry) for s in _axis(block, "seed", entry)] or [train0.seed]
    if "tokens" in block and "tokens_per_param" in block:
        raise GridError("tokens", entry, "give either 'tokens' or 'tokens_per_param', not both")
    out: list[RunSpec] = []
    for model, data in itertools.product(models, datas):
        probe = RunSpec(model, data, train0)
        for D in _tokens(block, entry, probe.N, train0.tokens):
            cell = RunSpec(model, data, replace(train0, tokens=D))
            out.extend(_cell_runs(block, entry, cell, seeds))
    return out


def _seed(value: Any, entry: str) -> int:
    lo, hi = SEED_RANGE
    if is_int(value) and lo <= value < hi:
        return value
    raise GridError("seed", entry, f"must be an integer in [{lo}, {hi}), got {value!r}")


def _tokens(block: Mapping[str, Any], entry: str, N: int, default: int) -> list[int]:
    if "tokens_per_param" in block:
        ratios = _axis(block, "tokens_per_param", entry)
        return [int(round(_number("tokens_per_param", r, entry) * N)) for r in ratios]
    vals = _axis(block, "tokens", entry) or [default]
    return [int(round(_number("tokens", v, entry))) for v in vals]


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
    if isinstance(bs_cfg, Mapping):  # a range or window: computed values, rounded on purpose
        round_to = _positive_int("batch_size.round_to", bs_cfg.get("round_to", 1), entry)
        bss = round_batches(numeric_axis("batch_size", bs_cfg, entry, law_bs), round_to)
    else:  # what the user wrote: used as written, never rounded
        values = _as_list(bs_cfg) or [bs_cfg]
        bss = list(dict.fromkeys(_positive_int("batch_size", v, entry) for v in values))
    return [
        cell.with_train(lr=lr, batch_size=bs, seed=seed)
        for lr, bs, seed in itertools.product(lrs, bss, seeds)
    ]


# command-line keys → the grid axes (or block `train:` keys) that replace them per run
OVERRIDDEN_BY = {
    "model": ("model",),
    "data": ("recipe",),
    "train.lr": ("lr",),
    "train.batch_size": ("batch_size",),
    "train.tokens": ("tokens", "tokens_per_param"),
    "train.seed": ("seed",),
}


def check_overrides(grid: Mapping[str, Any], overrides: Sequence[str]) -> None:
    """Refuse a command-line override of a field a grid axis sets for every run of its block.

    `model.hidden=64` or `train.lr=1e-3` next to `+grid=NAME` looks like it changes the sweep,
    but the axis replaces the base value, so it would be silently ignored. GridError names the
    override and the block and axis that set it.
    """
    blocks = _blocks(grid)
    for text in overrides:
        key = text.lstrip("+~").split("=", 1)[0].split("@", 1)[0].strip()
        for i, block in enumerate(blocks):
            if not isinstance(block, Mapping):
                continue
            hit = _setting_axis(key, block)
            if hit:
                raise GridError(
                    key,
                    f"grid {grid.get('name', 'grid')!r} block {i}",
                    f"the override {text!r} would be ignored: axis {hit!r} of this block sets "
                    f"it for every run; change the grid instead (grid.blocks.{i}.{hit}=...)",
                )


def _setting_axis(key: str, block: Mapping[str, Any]) -> str | None:
    """The axis (or `train.<field>` of the block) that sets the config key `key`, or None."""
    for prefix, axes in OVERRIDDEN_BY.items():
        if key == prefix or key.startswith(prefix + "."):
            for axis in axes:
                if axis in block:
                    return axis
    if key.startswith("train."):
        field = key.split(".")[1]
        if field in (block.get("train") or {}):
            return f"train.{field}"
    return None


__all__ = [
    "GridError",
    "check_overrides",
    "Presets",
    "cell_key",
    "expand",
    "log_range",
    "plain_name",
    "round_sig",
    "step_law",
    "window",
    "yaml_presets",
]
