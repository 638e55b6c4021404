"""Imports point one way (docs/design.md "Layers"): a wrong-way import or a cycle fails here.

    core      steplaw_train.*  (all but the driver)  imports only the core
    launch    launch.*                               core, launch
    driver    steplaw_train.sweep.*                  core, launch, driver
    analysis  analysis.*                             core, analysis

Every import statement of every module counts, function-level ones included (a lazy import is
still a dependency), read with `ast` so nothing is executed.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
PACKAGES = ("steplaw_train", "launch", "analysis")
ALLOWED = {
    "core": {"core"},
    "launch": {"core", "launch"},
    "driver": {"core", "launch", "driver"},
    "analysis": {"core", "analysis"},
}
# Known wrong-way edges waiting for another branch; none now (launch/replay.py became
# analysis/table.py).
TEMPORARY: set[tuple[str, str]] = set()


def modules() -> dict[str, Path]:
    out = {}
    for pkg in PACKAGES:
        for path in sorted((REPO / pkg).rglob("*.py")):
            parts = path.relative_to(REPO).with_suffix("").parts
            name = ".".join(parts[:-1] if parts[-1] == "__init__" else parts)
            out[name] = path
    return out


def layer(module: str) -> str:
    if module == "steplaw_train.sweep" or module.startswith("steplaw_train.sweep."):
        return "driver"
    return {"steplaw_train": "core", "launch": "launch", "analysis": "analysis"}[
        module.split(".")[0]
    ]


def imports(module: str, path: Path, known: set[str]) -> set[str]:
    """The project modules `module` imports (`from a import b` → a.b when that is a module)."""
    is_pkg = path.name == "__init__.py"
    found: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            found.update(a.name for a in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:  # relative: resolve against this module's package
                pkg = module.split(".") if is_pkg else module.split(".")[:-1]
                pkg = pkg[: len(pkg) - node.level + 1]
                base = ".".join([*pkg, base] if base else pkg)
            for a in node.names:
                sub = f"{base}.{a.name}"
                found.add(sub if sub in known else base)
    return {m for m in found if m in known and m != module}


def graph() -> dict[str, set[str]]:
    mods = modules()
    known = set(mods)
    return {m: imports(m, p, known) for m, p in mods.items()}


def test_every_module_is_seen():
    g = graph()
    assert {"steplaw_train.rundir", "steplaw_train.sweep.full", "launch.executors"} <= set(g)
    assert "launch.executors" in g["steplaw_train.sweep.common"]  # the parser sees real edges


def test_imports_point_one_way():
    wrong = [
        f"{a} ({layer(a)}) imports {b} ({layer(b)})"
        for a, deps in graph().items()
        for b in sorted(deps)
        if layer(b) not in ALLOWED[layer(a)] and (a, b) not in TEMPORARY
    ]
    assert not wrong, "\n".join(wrong)


def _cycles(g: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components with more than one module (Tarjan)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on: set[str] = set()
    out: list[list[str]] = []
    counter = [0]

    def visit(v: str) -> None:
        index[v] = low[v] = counter[0]
        counter[0] += 1
        stack.append(v)
        on.add(v)
        for w in sorted(g.get(v, ())):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = []
            while True:
                w = stack.pop()
                on.discard(w)
                comp.append(w)
                if w == v:
                    break
            if len(comp) > 1:
                out.append(sorted(comp))

    for v in sorted(g):
        if v not in index:
            visit(v)
    return out


def test_no_module_import_cycle():
    assert _cycles(graph()) == []


@pytest.mark.parametrize(
    "g, cyclic",
    [
        ({"a": {"b"}, "b": {"c"}, "c": set()}, False),
        ({"a": {"b"}, "b": {"c"}, "c": {"a"}}, True),
    ],
)
def test_the_cycle_finder_finds_cycles(g, cyclic):
    assert bool(_cycles(g)) is cyclic
