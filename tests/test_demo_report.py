"""The CPU demo's report, checked after `make demo` (CI runs the demo first and sets the paths).

The demo is README command 1; what a newcomer sees must be a fit, heatmaps and honest flags.
Skipped on a developer machine unless STEPLAW_DEMO_REPORT points at a report; CI sets
STEPLAW_REQUIRE_DEMO=1 so a missing report fails instead.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import pandas as pd
import pytest

REPORT = os.environ.get("STEPLAW_DEMO_REPORT")
if not REPORT and not os.environ.get("STEPLAW_REQUIRE_DEMO"):
    pytest.skip(
        "no demo report (run `make demo`, set STEPLAW_DEMO_REPORT)", allow_module_level=True
    )


@pytest.fixture(scope="module")
def report() -> Path:
    path = Path(REPORT or "reports/demo")
    assert (path / "summary.json").is_file(), f"no demo report at {path}: did `make demo` run?"
    return path


def test_every_demo_run_finished_and_was_used(report: Path):
    s = json.loads((report / "summary.json").read_text())
    runs = pd.read_csv(report / "runs.csv")
    assert len(runs) == s["runs"]["total"] == 36  # the demo grid (test_grid: 2 x 2 x 3 x 3)
    assert set(runs["status"]) <= {"done", "diverged"}, runs["status"].value_counts()
    assert s["runs"]["excluded"] == 0 and s["cells"]["used"] == 4
    assert len(list((report / "heatmaps").glob("*.png"))) == 4


def test_a_law_is_fitted_and_the_scale_caveat_is_stated(report: Path):
    s = json.loads((report / "summary.json").read_text())
    assert "lr" in s["fit"] and "bs" in s["fit"], s["fit"]
    assert any(c.startswith("scale:") for c in s["caveats"])


def test_edge_flags_match_the_runs(report: Path):
    """Recompute each cell's best run from runs.csv: an optimum on the grid's edge is flagged."""
    s = json.loads((report / "summary.json").read_text())
    flagged = {e["cell"]: e for e in s["cells"]["edge_optima"]}
    cells = pd.read_csv(report / "cells.csv")
    runs = pd.read_csv(report / "runs.csv")
    for c in cells.itertuples():
        mine = runs[(runs["N"] == c.N) & (runs["D"] == c.D)]
        best = mine.loc[mine["smooth_loss"].idxmin()]
        lr_edge = best["lr"] in (mine["lr"].min(), mine["lr"].max())
        bs_edge = best["bs"] in (mine["bs"].min(), mine["bs"].max())
        assert (c.cell in flagged) == (lr_edge or bs_edge), c.cell
