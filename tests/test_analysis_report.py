"""The report and predict commands end to end, on generated run directories and released data."""

from __future__ import annotations

import json

import numpy as np
import pytest

from analysis import collect, synthetic
from analysis.__main__ import main


@pytest.fixture(scope="module")
def sweep(tmp_path_factory):
    root = tmp_path_factory.mktemp("sweep")
    synthetic.make_sweep(root, tokens=(200_000, 400_000), bss=(2, 4, 8, 16), max_points=60)
    rng = np.random.default_rng(0)
    lone = synthetic.make_spec(128, 2, 1e-3, 4, 300_000)  # a cell with a single run
    synthetic.write_run(root, lone, 3.0, rng=rng)
    synthetic.write_run(root, synthetic.make_spec(64, 2, 5e-2, 4, 200_000), 3.0, rng=rng,
                        result=False)  # fmt: skip
    return root


def test_report_on_run_dirs(sweep, tmp_path):
    out = tmp_path / "rep"
    assert main(["report", str(sweep), "--out", str(out), "--n-boot", "100", "--quiet"]) == 0
    s = json.loads((out / "summary.json").read_text())
    assert s["runs"]["total"] == 2 * 2 * 13 * 4 + 2
    assert s["runs"]["excluded_by_reason"] == {"no result.json (run not finished)": 1}
    assert s["cells"]["used"] == 4
    assert [x["reason"] for x in s["cells"]["skipped"]] == ["only 1 usable run(s) (< 3)"]
    # the landscape's optimum is the Step Law's: it must come out best of the published laws
    g = s["gaps"]
    assert g["Step Law"]["nearest"]["mean"] < min(g["DeepSeek"]["nearest"]["mean"], 5.0)
    assert g["MiniCPM"]["lr_from"] == ["grid best"] and g["Microsoft (Bjorck)"]["bs_from"] == [
        "grid best"
    ]
    assert set(s["loo"]) == {"nearest", "surface"}
    assert len(list((out / "heatmaps").glob("*.png"))) == 4
    assert (out / "runs.parquet").is_file() and (out / "bootstrap.csv").is_file()
    p = main(["predict", "--N", "1e6", "--D", "1e9", "--fit", str(out)])
    assert p == 0


def test_edge_optimum_is_flagged(tmp_path, capsys):
    root = tmp_path / "sw"
    # batch sizes all far above the landscape's optimum: the best sits on the low bs edge
    synthetic.make_sweep(root, shapes=((64, 2),), tokens=(200_000,), bss=(64, 128, 256),
                         max_points=40)  # fmt: skip
    out = tmp_path / "rep"
    assert main(["report", str(root), "--out", str(out), "--n-boot", "50"]) == 0
    s = json.loads((out / "summary.json").read_text())
    assert s["cells"]["edge_optima"][0]["bs_edge"] == "low"
    assert "fit" in s and "skipped" in s["fit"]  # one cell: the law cannot be fitted
    printed = capsys.readouterr().out
    assert "optimum on a grid edge" in printed
    # tiny runs: the report says what it cannot claim, in the summary and on the terminal
    assert any(c.startswith("scale:") for c in s["caveats"])
    assert any("grid edge" in c for c in s["caveats"]) and "caveat" in printed


def test_predict_published(capsys):
    if not collect.released_bootstrap_csv().is_file():
        pytest.skip("../shared/steplaw not present")
    assert main(["predict", "--N", "7e9", "--D", "1.4e12", "--seq", "2048"]) == 0
    out = capsys.readouterr().out
    lr = 1.79 * 7e9**-0.713 * 1.4e12**0.307  # the published constants, rounded
    printed = float(out.split("\n")[1].split()[1])
    assert printed == pytest.approx(lr, rel=0.03)
    assert "sequences of 2048" in out and "95% CI" in out


def test_bad_arguments_name_the_field(capsys):
    assert main(["predict", "--N", "-1", "--D", "1e9"]) == 2
    assert "N: must be a positive number" in capsys.readouterr().err


@pytest.mark.skipif(not collect.released_dense_csv().is_file(), reason="../shared/steplaw absent")
def test_released_data_is_not_told_it_is_tiny():
    from analysis import report

    s = report.summary(report.analyse(collect.released_dense_csv(), report.Settings(n_boot=50)))
    assert not any(c.startswith("scale:") for c in s["caveats"])
    assert not any("distinct" in c for c in s["caveats"])  # 5 N values, 10+ D values
