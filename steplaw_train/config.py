"""Hydra config sections → RunSpec / RunOptions: the layout of the model/data/train/options
sections (grid.yaml_presets reads the model and data groups' files for grid axes, data.py its recipes).

The YAML tree lives in the repository's top-level `configs/` (the user's layout); installed
elsewhere, point STEPLAW_CONFIG_DIR at a copy of it.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import fields
from pathlib import Path
from typing import Any

from omegaconf import DictConfig, OmegaConf

from steplaw_train.keys import check_keys
from steplaw_train.options import RunOptions
from steplaw_train.spec import (
    DataSpec,
    ModelSpec,
    MoESpec,
    RunSpec,
    SpecError,
    TrainSpec,
    from_plain,
)


def config_dir() -> Path:
    """Absolute path of the Hydra config tree (hydra.main accepts an absolute config_path)."""
    env = os.environ.get("STEPLAW_CONFIG_DIR")
    return Path(env).resolve() if env else Path(__file__).resolve().parents[1] / "configs"


def _plain(section: Any, name: str = "config") -> dict[str, Any]:
    if isinstance(section, DictConfig):
        return OmegaConf.to_container(section, resolve=True)  # type: ignore[return-value]
    if not isinstance(section, Mapping):
        raise SpecError(name, f"must be a mapping of fields, got {section!r}")
    return dict(section)


def model_from_cfg(section: Any) -> ModelSpec:
    d = _plain(section, "model")
    moe = d.pop("moe", None)
    model = from_plain(ModelSpec, d, "model")
    return ModelSpec(
        **{**model.__dict__, "moe": from_plain(MoESpec, moe, "model.moe") if moe else None}
    )


def data_from_cfg(section: Any) -> DataSpec:
    d = _plain(section, "data")
    srcs = d.get("sources")
    if not srcs:
        raise SpecError("data.sources", "a recipe needs a non-empty list of {name, weight}")
    try:
        d["sources"] = tuple((str(s["name"]), float(s["weight"])) for s in srcs)
    except (KeyError, TypeError, ValueError) as e:
        raise SpecError("data.sources", f"each entry needs 'name' and 'weight' ({e})") from e
    return from_plain(DataSpec, d, "data")


def train_from_cfg(section: Any) -> TrainSpec:
    d = _plain(section, "train")
    for k in ("batch_size", "tokens", "seq_len", "seed", "warmup_max_steps", "log_interval"):
        if isinstance(d.get(k), float) and float(d[k]).is_integer():
            d[k] = int(d[k])  # `train.tokens=2e6` on the command line arrives as a float
    return from_plain(TrainSpec, d, "train")


def spec_from_cfg(cfg: Any) -> RunSpec:
    """Build the RunSpec from a composed config with `model`, `data` and `train` sections."""
    return RunSpec(
        model=model_from_cfg(cfg["model"]),
        data=data_from_cfg(cfg["data"]),
        train=train_from_cfg(cfg["train"]),
    )


def options_from_cfg(section: Any) -> RunOptions:
    d = _plain(section, "options") if section is not None else {}
    check_keys(d, [f.name for f in fields(RunOptions)], "options")
    if d.get("data_root") is not None:
        d["data_root"] = Path(d["data_root"]).expanduser()
    return RunOptions(**d)
