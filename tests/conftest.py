"""Shared fixtures: offline wandb in tmp dirs, one demo data root per session, tiny run specs,
and the sweep config as the CLI composes it."""

from __future__ import annotations

from pathlib import Path

import pytest
from hydra import compose, initialize_config_dir

from steplaw_train.config import config_dir
from steplaw_train.options import RunOptions
from steplaw_train.spec import DataSpec, ModelSpec, MoESpec, RunSpec, TrainSpec

TINY_DATA = DataSpec(recipe="demo", sources=(("code", 1.0),), tokenizer="byte", vocab_size=320)


@pytest.fixture(autouse=True)
def _offline_wandb(tmp_path_factory, monkeypatch):
    """wandb must never reach the network in tests (it hangs without one)."""
    root = tmp_path_factory.getbasetemp() / "wandb"
    monkeypatch.setenv("WANDB_MODE", "offline")
    for var in ("WANDB_DIR", "WANDB_CACHE_DIR", "WANDB_CONFIG_DIR"):
        (root / var).mkdir(parents=True, exist_ok=True)
        monkeypatch.setenv(var, str(root / var))


@pytest.fixture(scope="session")
def data_root(tmp_path_factory) -> Path:
    """The demo corpus, built on first use by the first run that needs it."""
    return tmp_path_factory.mktemp("data_root")


def tiny_spec(moe: bool = False, **train) -> RunSpec:
    """hidden 32, 2 layers, seq 32: a training step takes ~10 ms on one thread."""
    m = ModelSpec(
        name="tiny_moe" if moe else "tiny",
        hidden=32,
        ffn_hidden=64,
        heads=4,
        layers=2,
        moe=MoESpec(
            num_experts=4, topk=2, expert_ffn_hidden=32, shared_expert_ffn_hidden=32, dense_layers=1
        )
        if moe
        else None,
    )
    t = {"lr": 3e-3, "batch_size": 4, "tokens": 4 * 32 * 30, "seq_len": 32, "seed": 7, **train}
    return RunSpec(model=m, data=TINY_DATA, train=TrainSpec(**t))


def tiny_options(data_root: Path, **kw) -> RunOptions:
    base = {
        "data_root": data_root,
        "num_threads": 1,
        "checkpoint_interval": 10,
        "wandb_mode": "offline",
    }
    return RunOptions(**{**base, **kw})


def sweep_cfg(*overrides: str):
    """The sweep config `python -m steplaw_train.sweep OVERRIDES` composes (the packaged
    configs/, the same Hydra version base)."""
    with initialize_config_dir(config_dir=str(config_dir()), version_base="1.3"):
        return compose("sweep", overrides=list(overrides))


def tiny_sweep_cfg(sweep_dir: Path, data_root: Path, *overrides: str):
    """`sweep_cfg` on the tiny grid preset, in `sweep_dir`, reading the demo data from
    `data_root`; a `grid.blocks=...` override in `overrides` replaces the preset's grid."""
    return sweep_cfg(
        "+grid=tiny", f"sweep_dir={sweep_dir}", f"options.data_root={data_root}", *overrides
    )
