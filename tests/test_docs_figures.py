"""docs/analysis.md's figures on the released dense data are what the code computes today.

The table and the refit line are parsed from the docs and compared with a fresh computation,
so a change in the method that moves a number fails here until the docs say the new number.
"""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from analysis import cells, collect, compare, fit, laws

DOC = Path(__file__).resolve().parents[1] / "docs" / "analysis.md"
DENSE = collect.released_dense_csv()
pytestmark = pytest.mark.skipif(not DENSE.is_file(), reason="../shared/steplaw not present")


def _section() -> str:
    text = DOC.read_text()
    return text[text.index("## Figures on ../shared/steplaw/dense_lr_bs_loss.csv") :]


def _documented_gaps() -> dict[str, list[float]]:
    rows = {}
    for line in _section().splitlines():
        m = re.fullmatch(r"\| (.+?) \| ([\d.]+) / ([\d.]+) \| ([\d.]+) / ([\d.]+) \|", line)
        if m:
            rows[m.group(1)] = [float(m.group(i)) for i in range(2, 6)]
    return rows


@pytest.fixture(scope="module")
def released():
    df = collect.read_released(DENSE)
    got, _ = cells.split_cells(df, collect.cell_key(df))
    return got


def test_gap_table_matches_the_code(released):
    documented = _documented_gaps()
    assert set(documented) == {law.name for law in laws.LAWS}  # every law, nothing stale
    s = compare.gap_summary(compare.compare(released, laws.LAWS)).set_index("law")
    for name, (mn, mx, ms, mxs) in documented.items():
        got = s.loc[name, ["mean_nearest", "max_nearest", "mean_surface", "max_surface"]]
        assert list(got) == pytest.approx([mn, mx, ms, mxs], abs=0.006), name


def test_refit_line_matches_the_code(released):
    f = fit.fit_step_law(released, threshold=0.0025, n_boot=1000, seed=0)
    text = " ".join(_section().split())
    m = re.search(r"lr = ([\d.]+)·N\^(-[\d.]+)·D\^([\d.]+), bs = ([\d.]+)·D\^([\d.]+)", text)
    c, a, b, d, g = map(float, m.groups())
    assert float(f.lr.predict(N=1, D=1)) == pytest.approx(c, rel=0.001)
    assert list(f.lr.coef[1:]) == pytest.approx([a, b], abs=0.00006)
    assert float(f.bs.predict(D=1)) == pytest.approx(d, rel=0.001)
    assert f.bs.coef[1] == pytest.approx(g, abs=0.00006)
    delta = float(re.search(r"δ = −([\d.]+)", text).group(1))
    assert f.bs_free.coef[1] == pytest.approx(-delta, abs=0.00006)
