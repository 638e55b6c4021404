"""Bad specs fail before any work, with an error naming the field."""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

import pytest
from hydra import compose, initialize_config_dir
from hydra.errors import MissingConfigException

from steplaw_train.config import config_dir, options_from_cfg, spec_from_cfg
from steplaw_train.spec import DataSpec, MoESpec, SpecError
from steplaw_train.train import auto_micro_batch, make_plan, run
from tests.conftest import tiny_options, tiny_spec


def _compose(*overrides: str):
    with initialize_config_dir(config_dir=str(config_dir()), version_base=None):
        return compose(config_name="train", overrides=list(overrides))


def _field(exc_info) -> str:
    return exc_info.value.field


@pytest.mark.parametrize(
    ("change", "field"),
    [
        (lambda s: replace(s, model=replace(s.model, hidden=30)), "model.heads"),
        (lambda s: replace(s, model=replace(s.model, moe=MoESpec(4, 5, 32))), "model.moe.topk"),
        (lambda s: s.with_train(tokens=4 * 32 - 1), "train.tokens"),
        (lambda s: s.with_train(lr=0.0), "train.lr"),
        (lambda s: s.with_train(lr=-1e-3), "train.lr"),
    ],
)
def test_bad_spec_names_field_and_writes_nothing(tmp_path: Path, data_root, change, field):
    spec = change(tiny_spec())
    with pytest.raises(SpecError) as e:
        run(spec, tmp_path / "run", tiny_options(data_root))
    assert _field(e) == field and str(e.value).startswith(field)
    assert not (tmp_path / "run").exists()


def test_batch_not_multiple_of_micro_batch_times_data_parallel(data_root):
    spec = tiny_spec(batch_size=6)
    with pytest.raises(SpecError) as e:
        make_plan(spec, tiny_options(data_root, micro_batch_size=4), False, data_parallel=1)
    assert _field(e) == "train.batch_size" and "micro_batch_size" in str(e.value)
    with pytest.raises(SpecError) as e:
        make_plan(spec, tiny_options(data_root, micro_batch_size=3), False, data_parallel=4)
    assert _field(e) == "train.batch_size"
    plan = make_plan(spec, tiny_options(data_root, micro_batch_size=3), False, data_parallel=2)
    assert (plan.micro_batch_size, plan.num_microbatches) == (3, 1)


def test_auto_micro_batch_is_largest_divisor():
    assert auto_micro_batch(12, 8) == 6
    assert auto_micro_batch(7, 8) == 7
    assert auto_micro_batch(7, 4) == 1
    assert auto_micro_batch(64, 8) == 8


def test_bad_options_name_the_option(data_root):
    with pytest.raises(SpecError) as e:
        make_plan(tiny_spec(), tiny_options(data_root, precision="fp8"), False, 1)
    assert _field(e) == "options.precision" and "bf16" in str(e.value)
    # bf16 on CPU is megatron's mixed precision with the local spec (tests of the GPU path)
    assert make_plan(tiny_spec(), tiny_options(data_root, precision="bf16"), False, 1).bf16
    assert not make_plan(tiny_spec(), tiny_options(data_root), False, 1).bf16  # auto: fp32 on CPU


def test_missing_data_files_fail_before_training(tmp_path: Path, data_root):
    spec = tiny_spec()
    spec = replace(spec, data=DataSpec("mine", (("no_such_dataset", 1.0),), "byte", 320))
    with pytest.raises(SpecError) as e:
        run(spec, tmp_path / "run", tiny_options(data_root))
    assert _field(e) == "data.sources" and "no_such_dataset" in str(e.value)
    assert not (tmp_path / "run").exists()


@pytest.mark.parametrize("override", ["model=no_such_preset", "data=no_such_recipe"])
def test_unknown_preset_or_recipe_lists_the_choices(override):
    with pytest.raises(MissingConfigException) as e:
        _compose(override)
    assert override.split("=")[1] in str(e.value)
    assert "demo" in str(e.value)  # hydra lists the available options


def test_train_config_composes_to_a_valid_spec():
    cfg = _compose("model=demo_moe", "train.lr=3e-3", "train.batch_size=4", "train.tokens=2e5")
    spec = spec_from_cfg(cfg)
    options = options_from_cfg(cfg.options)
    assert spec.model.moe is not None and spec.train.tokens == 200_000
    assert cfg.run_dir is None
    make_plan(spec, options, False, 1)
