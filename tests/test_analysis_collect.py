"""Collection: released CSVs (dense and MoE schema) and run directories, bad input included."""

from __future__ import annotations

import json
import math

import numpy as np
import pandas as pd
import pytest

from analysis import collect, synthetic
from steplaw_train import params

DENSE = collect.released_dense_csv()
needs_shared = pytest.mark.skipif(not DENSE.is_file(), reason="../shared/steplaw not present")


@needs_shared
def test_read_released_dense_gives_the_tidy_table():
    df = collect.read_released(DENSE)
    assert list(df.columns) == collect.COLUMNS
    assert len(df) == 1911 and df["excluded_reason"].isna().all()
    assert (df["bs_tokens"] == df["bs"] * 2048).all()
    r = df.iloc[0]
    assert r["M"] == pytest.approx(6 * (4 * r.h + 3 * r.ffnh + 2 * 2048) * r.numl * r.h)
    assert collect.cell_key(df) == ["N", "D"]


def test_missing_columns_are_listed(tmp_path):
    p = tmp_path / "bad.csv"
    pd.DataFrame({"h": [1], "lr": [1e-3], "N": [1], "D": [1]}).to_csv(p, index=False)
    with pytest.raises(ValueError) as e:
        collect.read_released(p)
    for col in ("ffnh", "numh", "numl", "bs", "ti", "loss", "smooth loss"):
        assert f"'{col}'" in str(e.value)
    assert "'lr'" not in str(e.value)


MOE_COLUMNS = [
    "seq_len",
    "topk",
    "nume",
    "moeh",
    "sed",
    "h",
    "ffnh",
    "numh",
    "numl",
    "lr",
    "bs",
    "ti",
    "loss",
    "smooth loss",
    "average_iter_time",
    "target_iter",
    "final_iter",
    "exp_name",
    "moe_layer_enum_type",
    "mfa_version",
    "numld",
    "Nattn",
    "N",
    "Na",
    "M",
    "kvcache",
    "D",
    "D/N",
    "total_time",
    "Na/N",
    "moe_name",
]


def _moe_rows(n=6):
    rng = np.random.default_rng(0)
    rows = []
    for i in range(n):
        rows.append(dict.fromkeys(MOE_COLUMNS, 0) | {
            "seq_len": 4096, "topk": 1 + i % 2, "nume": 8, "moeh": 704, "sed": 42, "h": 1408,
            "ffnh": 3520, "numh": 11, "numl": 16, "lr": 1e-3 * 2 ** (i % 3), "bs": 128,
            "ti": 1000, "loss": 2.5, "smooth loss": 2.5 + rng.random() / 10, "target_iter": 1000,
            "final_iter": 1000, "exp_name": f"moe{i}", "N": 2e9, "Na": 3e8 * (1 + i % 2),
            "M": 2e9, "D": 2e10, "moe_name": f"e8k{1 + i % 2}",
        })  # fmt: skip
    return rows


def test_moe_schema_from_its_column_list(tmp_path):
    rows = _moe_rows()
    rows[0]["final_iter"] = 500  # stopped short
    rows[1]["lr"] = -1.0  # invalid
    rows[2]["smooth loss"] = float("nan")
    p = tmp_path / "moe.csv"
    pd.DataFrame(rows, columns=MOE_COLUMNS).to_csv(p, index=False)
    df = collect.read_released(p)
    assert list(df.columns) == collect.COLUMNS and len(df) == 6  # nothing dropped
    assert (df["bs_tokens"] == 128 * 4096).all()
    assert df["Na"].tolist() == [r["Na"] for r in rows]
    assert df["M"].tolist() == [2e9] * 6 and df["num_experts"].eq(8).all()
    reasons = df["excluded_reason"].tolist()
    assert "stopped at step 500 of 1000" in reasons[0]
    assert "invalid lr" in reasons[1] and "invalid smooth_loss" in reasons[2]
    assert all(r is None for r in reasons[3:])
    assert collect.cell_key(df) == ["N", "D", "Na", "topk"]  # sparsity varies at fixed (N, D)


def test_moe_missing_columns_listed(tmp_path):
    p = tmp_path / "moe.csv"
    pd.DataFrame(_moe_rows()).drop(columns=["Na", "M"]).to_csv(p, index=False)
    with pytest.raises(ValueError, match=r"\['Na', 'M'\]"):
        collect.read_released(p)


def _spec(lr=1e-3, bs=4, tokens=64_000, **kw):
    return synthetic.make_spec(64, 2, lr, bs, tokens, **kw)


def test_collect_run_dirs_with_every_kind_of_damage(tmp_path):
    rng = np.random.default_rng(0)
    good = synthetic.write_run(tmp_path, _spec(), 3.0, rng=rng)
    corrupt = synthetic.write_run(tmp_path, _spec(lr=2e-3), 3.1, rng=rng)
    lines = (corrupt / "metrics.jsonl").read_text().splitlines()
    lines[3] = lines[3][:10]
    (corrupt / "metrics.jsonl").write_text("\n".join(lines) + "\n")
    truncated = synthetic.write_run(tmp_path, _spec(lr=4e-3), 3.2, rng=rng)
    with open(truncated / "metrics.jsonl", "a") as f:
        f.write('{"step": 99999, "lo')  # a killed writer's partial last line
    unfinished = synthetic.write_run(tmp_path, _spec(lr=8e-3), 3.3, rng=rng, result=False)
    diverged = synthetic.write_run(tmp_path, _spec(lr=1.6e-2), 9.0, rng=rng, status="diverged")
    short = synthetic.write_run(tmp_path, _spec(lr=3.2e-2), 3.4, rng=rng, stop_at=40)
    broken = tmp_path / "broken"
    broken.mkdir()
    (broken / "spec.json").write_text("{not json")

    df = collect.collect_runs(tmp_path).set_index("run_id")
    assert len(df) == 7
    reason = df["excluded_reason"]
    assert pd.isna(reason[good.name]) and pd.isna(reason[truncated.name])
    assert "corrupt at line 4" in reason[corrupt.name]
    assert "no result.json" in reason[unfinished.name]
    assert df.loc[unfinished.name, "status"] == "unfinished"
    assert pd.isna(reason[diverged.name]) and math.isinf(df.loc[diverged.name, "smooth_loss"])
    assert "stopped at step 40 of" in reason[short.name]
    assert "spec.json unreadable" in reason["broken"]
    # smoothed loss recomputed from metrics.jsonl with the shared definition
    from steplaw_train.smoothing import smoothed_final_loss

    recs = [json.loads(x) for x in (good / "metrics.jsonl").read_text().splitlines()]
    interval = recs[1]["step"] - recs[0]["step"]
    expected = smoothed_final_loss([r["loss"] for r in recs], interval)
    assert df.loc[good.name, "smooth_loss"] == pytest.approx(expected)
    spec = _spec()
    assert df.loc[good.name, "N"] == spec.N and df.loc[good.name, "bs_tokens"] == 4 * 128


def test_cell_key_adds_shape_and_recipe_when_they_vary(tmp_path):
    rng = np.random.default_rng(1)
    a = synthetic.make_spec(64, 2, 1e-3, 4, 64_000)
    b = synthetic.make_spec(64, 2, 1e-3, 4, 64_000, recipe="code")
    for s in (a, b):
        synthetic.write_run(tmp_path, s, 3.0, rng=rng)
    df = collect.collect_runs(tmp_path)
    assert collect.cell_key(df) == ["N", "D", "recipe"]
    assert collect.varying_axes(df) == {"recipe": ["recipe"]}


def test_load_rejects_other_files(tmp_path):
    p = tmp_path / "x.txt"
    p.write_text("hi")
    with pytest.raises(ValueError, match="expected a run/sweep directory"):
        collect.load(p)


# experts, top-k, moeh, sed, N, Na, M: the MoE release's shapes (../shared/steplaw/README.md)
RELEASED_MOE = [
    (89, 1, 352, 352, 2_150_612_992, 187_973_632, 1_681_489_920),
    (88, 2, 352, 704, 2_150_612_992, 232_579_072, 1_949_122_560),
    (8, 1, 3528, 3528, 2_155_174_912, 590_436_352, 4_096_266_240),
    (8, 3, 2888, 8664, 2_156_188_672, 1_241_270_272, 8_001_269_760),
]


def test_moe_sed_is_the_shared_expert_width_and_target_iter_minus_one_is_unknown(tmp_path):
    """The four released MoE shapes (../shared/steplaw/README.md), written as the MoE release
    writes them: sed = shared-expert FFN width, target_iter = -1 when the plan was not set."""
    rows = []
    for i, (e, k, moeh, sed, n, na, m) in enumerate(RELEASED_MOE):
        rows.append(dict.fromkeys(MOE_COLUMNS, 0) | {
            "seq_len": 2048, "topk": k, "nume": e, "moeh": moeh, "sed": sed, "h": 1408,
            "ffnh": 3904, "numh": 11, "numl": 16, "lr": 1e-3, "bs": 256, "ti": 3815,
            "loss": 2.5, "smooth loss": 2.5, "target_iter": -1 if i < 3 else 3815,
            "final_iter": [3815, 2000, 3815, 3000][i], "exp_name": f"moe{i}", "N": n,
            "Na": na, "M": m, "D": 2e9, "moe_name": f"e{e}k{k}",
        })  # fmt: skip
    p = tmp_path / "moe.csv"
    pd.DataFrame(rows, columns=MOE_COLUMNS).to_csv(p, index=False)
    df = collect.read_released(p)
    assert df["shared_ffnh"].tolist() == [352, 704, 3528, 8664]
    assert df["seed"].isna().all()
    assert df["iterations"].tolist() == [3815] * 4  # -1 read as "not set", not as -1 planned
    reasons = df["excluded_reason"].tolist()
    assert reasons[0] is None and reasons[2] is None
    assert reasons[1] == "stopped at step 2000 of 3815 planned"  # fires with target_iter -1
    assert reasons[3] == "stopped at step 3000 of 3815 planned"
    for r in df.itertuples():  # the table's widths reproduce the release's N, Na and M
        c = params.count(1408, 3904, 16, 2048, int(r.num_experts), int(r.topk),
                         int(r.moe_ffnh), int(r.shared_ffnh), dense_layers=1)  # fmt: skip
        assert (c.N, c.Na, c.M) == (r.N, r.Na, r.M)
