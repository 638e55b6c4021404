"""Both analysis notebooks execute end to end (nbclient) with this interpreter as the kernel.

The kernel spec is written to a temporary JUPYTER_PATH pointing at `sys.executable`, so the test
needs no kernel installed on the machine and always runs the venv that runs pytest.
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

import nbformat
import pytest
from nbclient import NotebookClient

from analysis import collect, synthetic

ROOT = Path(__file__).resolve().parents[1]
NOTEBOOKS = ROOT / "analysis" / "notebooks"
KERNEL = "steplaw-test-python"


@pytest.fixture()
def kernel_env(tmp_path, monkeypatch):
    spec_dir = tmp_path / "jupyter" / "kernels" / KERNEL
    spec_dir.mkdir(parents=True)
    argv = [sys.executable, "-m", "ipykernel_launcher", "-f", "{connection_file}"]
    spec = {"argv": argv, "display_name": "steplaw test", "language": "python"}
    (spec_dir / "kernel.json").write_text(json.dumps(spec))
    monkeypatch.setenv("JUPYTER_PATH", str(tmp_path / "jupyter"))
    monkeypatch.setenv("PYTHONPATH", os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")]))
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    monkeypatch.delenv("MPLBACKEND", raising=False)  # the inline backend must draw the figures
    return tmp_path


def execute(name: str) -> nbformat.NotebookNode:
    nb = nbformat.read(NOTEBOOKS / name, as_version=4)
    for cell in nb.cells:  # committed without outputs, cells kept thin
        if cell.cell_type == "code":
            assert not cell.get("outputs") and len(cell.source.splitlines()) <= 11
    client = NotebookClient(nb, kernel_name=KERNEL, timeout=300,
                            resources={"metadata": {"path": str(ROOT)}})  # fmt: skip
    return client.execute()


def _errors(nb: nbformat.NotebookNode) -> list[str]:
    return [
        o.get("ename", "")
        for c in nb.cells
        for o in c.get("outputs", [])
        if o.output_type == "error"
    ]


@pytest.mark.skipif(not collect.released_dense_csv().is_file(), reason="../shared not present")
def test_paper_figures_notebook(kernel_env):
    nb = execute("01_paper_figures.ipynb")
    assert not _errors(nb)
    images = [o for c in nb.cells for o in c.get("outputs", []) if "image/png" in o.get("data", {})]
    assert len(images) >= 3


def test_sweep_notebook_on_generated_run_dirs(kernel_env, monkeypatch):
    sweep = kernel_env / "sweep"
    synthetic.make_sweep(sweep, shapes=((64, 2),), tokens=(200_000, 400_000), bss=(2, 4, 8),
                         max_points=30)  # fmt: skip
    monkeypatch.setenv("STEPLAW_SWEEP_DIR", os.environ.get("STEPLAW_DEMO_SWEEP", str(sweep)))
    nb = execute("02_sweep.ipynb")
    assert not _errors(nb)
    text = "".join(
        o.get("data", {}).get("text/plain", "") for c in nb.cells for o in c.get("outputs", [])
    )
    assert "min_loss" in text and "mean_nearest" in text
