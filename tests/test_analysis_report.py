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
    assert g["Step Law (paper)"]["nearest"]["mean"] < min(g["DeepSeek"]["nearest"]["mean"], 5.0)
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


def test_predict_outside_the_repo_falls_back_to_the_published_means(monkeypatch, capsys):
    from steplaw_train.steplaw import BOOTSTRAP_MEAN

    monkeypatch.setenv("STEPLAW_SHARED", "/nonexistent/shared")
    assert main(["predict", "--N", "1e9", "--D", "1e11"]) == 0
    out = capsys.readouterr().out
    lines = out.strip().splitlines()
    assert float(lines[1].split()[1]) == pytest.approx(BOOTSTRAP_MEAN.lr(1e9, 1e11), rel=1e-3)
    assert "95% CI" not in out and sum("note:" in ln for ln in lines) == 1
    assert "Traceback" not in out


def test_fit_json_and_predict_fit_use_one_point_estimate(sweep, tmp_path, capsys):
    out = tmp_path / "rep"
    assert main(["report", str(sweep), "--out", str(out), "--n-boot", "200", "--quiet",
                 "--no-figures"]) == 0  # fmt: skip
    f = json.loads((out / "fit.json").read_text())
    assert f["lr"]["point_estimate"] == "bootstrap mean"
    capsys.readouterr()
    N, D = 3e5, 4e5
    assert main(["predict", "--N", str(N), "--D", str(D), "--fit", str(out)]) == 0
    printed = float(capsys.readouterr().out.split("\n")[1].split()[1])
    e = f["lr"]["exponents"]
    assert printed == pytest.approx(f["lr"]["const"] * N ** e["N"] * D ** e["D"], rel=1e-3)


MOE_HEADER = (
    "seq_len,topk,nume,moeh,sed,h,ffnh,numh,numl,lr,bs,ti,loss,smooth loss,target_iter,"
    "final_iter,exp_name,N,Na,M,D,moe_name"
)


def _moe_csv(path):
    """The four released MoE shapes (total N within 0.26%) x 2 D, on a bowl around Step Law
    with activated N: the lr exponent of total N cannot be identified."""
    shapes = [(89, 1, 352, 352, 2150612992, 187973632, 1681489920),
              (88, 2, 352, 704, 2150612992, 232579072, 1949122560),
              (8, 1, 3528, 3528, 2155174912, 590436352, 4096266240),
              (8, 3, 2888, 8664, 2156188672, 1241270272, 8001269760)]  # fmt: skip
    lines = [MOE_HEADER]
    for e, k, moeh, sed, n, na, m in shapes:
        for d in (2e9, 8e9):
            lr0, bs0 = 1.79 * na**-0.713 * d**0.307, 0.58 * d**0.571 / 2048
            for i in range(-2, 3):
                for j in range(-1, 2):
                    lr, bs = lr0 * 2.0**i, round(bs0 * 2.0**j)
                    loss = 2.5 * (1 + 0.004 * i * i + 0.003 * j * j)
                    ti = int(d / (bs * 2048))
                    lines.append(f"2048,{k},{e},{moeh},{sed},1408,3904,11,16,{lr:.6g},{bs},{ti},"
                                 f"{loss},{loss},-1,{ti},m{e}k{k}_{d:g}_{i}_{j},{n},{na},{m},{d},"
                                 f"e{e}k{k}")  # fmt: skip
    path.write_text("\n".join(lines) + "\n")


def test_unidentifiable_fit_is_reported_not_compared(tmp_path):
    from analysis import report

    csv = tmp_path / "moe.csv"
    _moe_csv(csv)
    a = report.analyse(csv, report.Settings(n_boot=50, n_col="N"))
    assert a.fit is not None and "not identifiable" in a.not_identifiable
    assert "N spans only 0.26%" in a.not_identifiable
    assert "Step Law (this fit)" not in set(a.gaps["law"])
    s = report.write_report(a, tmp_path / "rep", progress=False)
    assert "not_identifiable" in s["fit"] and "skipped" in s["loo"]
    assert not list((tmp_path / "rep" / "plots").glob("optimal_*.png"))
    assert any(c.startswith("fit not identifiable") for c in s["caveats"])
    # with activated parameters the same cells identify every exponent
    b = report.analyse(csv, report.Settings(n_boot=50, n_col="Na"))
    assert b.not_identifiable is None and "Step Law (this fit)" in set(b.gaps["law"])


def test_report_logs_one_analysis_run_to_wandb(sweep, tmp_path):
    import subprocess
    import sys
    from pathlib import Path

    out = tmp_path / "rep"
    assert main(["report", str(sweep), "--out", str(out), "--n-boot", "50", "--quiet",
                 "--wandb", "steplaw-test"]) == 0  # fmt: skip
    (folder,) = (out / "wandb").glob("offline-run-*")
    wandb_cli = str(Path(sys.executable).parent / "wandb")
    recs = subprocess.run([wandb_cli, "leet", "inspect", "--json", str(folder)],
                          capture_output=True, text=True, timeout=120, check=True).stdout  # fmt: skip
    recs = [json.loads(x) for x in recs.splitlines() if x.startswith("{")]
    head = next(r["run"] for r in recs if r["type"] == "run")
    assert head["job_type"] == "analysis"
    summ = json.loads(subprocess.run([wandb_cli, "leet", "inspect", "--summary", "--json",
                                      str(folder)], capture_output=True, text=True, timeout=120,
                                     check=True).stdout)["summary"]  # fmt: skip
    s = json.loads((out / "summary.json").read_text())
    law = "Step Law (paper)"
    assert summ[f"gap_permille/{law}/nearest_mean"] == pytest.approx(
        s["gaps"][law]["nearest"]["mean"]
    )
    assert summ["fit/lr/formula"] == s["fit"]["lr"]["formula"]
    assert summ["runs"]["_type"] == "table-file"
    images = [k for k, v in summ.items() if isinstance(v, dict) and v.get("_type") == "image-file"]
    assert len([k for k in images if k.startswith("heatmaps/")]) == 4
