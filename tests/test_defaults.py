"""Each default has one value: the YAML a user reads and the dataclass that validates agree.

The YAML files document every field for the user (with comments) and the frozen dataclasses are
the schema; Hydra structured configs (ConfigStore) were considered, but OmegaConf cannot type the
dataclasses' tuples, Paths and Mappings without a second, OmegaConf-only copy of each class. So
both stay, and this test fails the moment one of them changes alone.
"""

from __future__ import annotations

from dataclasses import MISSING, fields
from pathlib import Path

import pytest
from omegaconf import OmegaConf

from launch.executors import DebugSettings, LocalSettings, SlurmSettings
from launch.resources import ResourceModel
from steplaw_train.config import config_dir
from steplaw_train.options import RunOptions
from steplaw_train.spec import TrainSpec


def _yaml(rel: str, key: str | None = None) -> dict:
    cfg = OmegaConf.load(Path(config_dir()) / rel)
    cfg = cfg[key] if key else cfg
    return {k: v for k, v in OmegaConf.to_container(cfg).items() if k not in ("defaults", "name")}


def _defaults(cls: type) -> dict:
    out = {}
    for f in fields(cls):
        if f.default is not MISSING:
            out[f.name] = f.default
        elif f.default_factory is not MISSING:
            out[f.name] = f.default_factory()
    return out


def _plain(v):
    return list(v) if isinstance(v, tuple) else (str(v) if isinstance(v, Path) else v)


@pytest.mark.parametrize(
    "rel, key, cls, preset",
    [
        ("launcher/slurm.yaml", None, SlurmSettings, ()),
        ("launcher/local.yaml", None, LocalSettings, ()),
        ("launcher/debug.yaml", None, DebugSettings, ()),
        ("sweep.yaml", "resources", ResourceModel, ()),
        ("options/default.yaml", None, RunOptions, ("data_root",)),  # ${oc.env:...} there
        # the demo's own shape and budget; every other field is the schema's default
        ("train/default.yaml", None, TrainSpec, ("lr", "batch_size", "tokens", "seq_len")),
    ],
)
def test_yaml_defaults_equal_the_dataclass_defaults(rel, key, cls, preset):
    yaml = _yaml(rel, key)
    assert set(yaml) == {f.name for f in fields(cls)}, rel
    defaults = _defaults(cls)
    differ = {
        k: (v, _plain(defaults[k]))
        for k, v in yaml.items()
        if k not in preset and k in defaults and v != _plain(defaults[k])
    }
    assert not differ, f"{rel} and {cls.__name__} disagree (yaml, dataclass): {differ}"
