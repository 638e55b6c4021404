"""The newcomer path's files agree with each other: pyproject extras, Dockerfile, Makefile, CI."""

from __future__ import annotations

import re
import tomllib
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def _pyproject() -> dict:
    return tomllib.loads((ROOT / "pyproject.toml").read_text())


def test_dockerfile_installs_an_extra_that_exists_and_brings_transformer_engine():
    docker = (ROOT / "Dockerfile").read_text()
    extras = set(re.findall(r"\.\[([a-z,]+)\]", docker))
    assert extras, "Dockerfile must install the project with an extra, e.g. .[gpu]"
    declared = _pyproject()["project"]["optional-dependencies"]
    for group in extras:
        for name in group.split(","):
            assert name in declared, f"Dockerfile installs extra {name!r}, pyproject lacks it"
    gpu = " ".join(declared["gpu"]).lower()
    assert "transformer-engine" in gpu or "transformer_engine" in gpu
    assert "FROM nvcr.io/nvidia/pytorch" in docker


def test_cpu_dependencies_never_pull_transformer_engine_or_an_unbounded_torch():
    deps = _pyproject()["project"]["dependencies"]
    assert not any("transformer" in d.lower() for d in deps)
    torch = [d for d in deps if re.match(r"torch\b", d)]
    assert torch and "<" in torch[0], "an unbounded torch requirement pulls GBs of CUDA wheels"


def test_ci_runs_the_readme_test_command():
    ci = (ROOT / ".ci" / "run").read_text()
    readme = (ROOT / "README.md").read_text()
    assert "make test" in ci and "make test" in readme
    assert "make demo" in readme
    makefile = (ROOT / "Makefile").read_text()
    assert re.search(r"^test:", makefile, re.M) and re.search(r"^demo:", makefile, re.M)


def test_console_scripts_point_at_importable_modules():
    scripts = _pyproject()["project"]["scripts"]
    for target in scripts.values():
        module = target.split(":")[0]
        assert (ROOT / (module.replace(".", "/") + ".py")).exists() or (
            ROOT / module.replace(".", "/") / "__init__.py"
        ).exists(), target


def _requirement(text: str):
    from packaging.requirements import Requirement

    return Requirement(text)


def test_gpu_extra_and_torch_stay_inside_what_megatron_core_is_tested_with():
    """megatron-core's own metadata states the TE range its release is tested with (its `dev`
    extra) and the torch it needs; our ranges must not admit versions outside them."""
    import importlib.metadata as md

    from packaging.version import Version

    mcore = [_requirement(r) for r in md.requires("megatron-core")]
    te_mc = next(r for r in mcore if r.name == "transformer-engine").specifier
    torch_mc = next(r for r in mcore if r.name == "torch").specifier
    proj = _pyproject()["project"]
    te = _requirement(proj["optional-dependencies"]["gpu"][0])
    torch = next(_requirement(d) for d in proj["dependencies"] if d.startswith("torch"))
    assert te.name == "transformer-engine" and "pytorch" in te.extras
    for v in ("2.8.9", "2.9.0", "2.10.1", "2.11.0", "2.12.0", "3.0"):
        if Version(v) in te.specifier:
            assert te_mc.contains(v, prereleases=True), f"gpu extra admits TE {v}"
    assert te.specifier.contains("2.9.0") and te.specifier.contains("2.11.0")
    for v in ("2.4.0", "2.5.1", "2.6.0", "2.10.0"):
        if Version(v) in torch.specifier:
            assert torch_mc.contains(v), f"torch {v} admitted, megatron-core needs {torch_mc}"


def test_docker_context_leaves_out_data_runs_and_the_repository():
    ignored = {
        line.strip().rstrip("/")
        for line in (ROOT / ".dockerignore").read_text().splitlines()
        if line.strip() and not line.startswith("#")
    }
    for name in ("data", "runs", "sweeps", "reports", ".git", ".venv"):
        assert name in ignored, name
    assert "--no-build-isolation" in (ROOT / "Dockerfile").read_text()
