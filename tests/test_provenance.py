"""Provenance of the code (steplaw_train/provenance.py) on real git repositories in tmp dirs, the
snapshot the SLURM launcher submits, and the parameters that make a job import it.

The end-to-end checks (a sweep's runs record their code; a dirty SLURM submission is refused
before anything is written) are here too; a held SLURM job running its snapshot after the
checkout moved on is in tests/test_slurm_provenance.py.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from launch.executors import run_in_snapshot, snapshot_pythonpath
from steplaw_train import provenance as pv
from steplaw_train.spec import SpecError
from tests.conftest import sweep_cfg

REPO = Path(__file__).resolve().parents[1]


def git(root: Path, *args: str) -> str:
    return subprocess.run(
        ["git", "-C", str(root), "-c", "user.name=t", "-c", "user.email=t@example.org", *args],
        capture_output=True,
        text=True,
        check=True,
    ).stdout.strip()


@pytest.fixture
def repo(tmp_path) -> Path:
    root = tmp_path / "repo"
    (root / "pkg").mkdir(parents=True)
    (root / "pkg" / "a.py").write_text("A = 1\n")
    (root / "README").write_text("hello\n")
    (root / ".gitignore").write_text("/out/\n.venv\n")
    git(root, "init", "-q")
    git(root, "add", "-A")
    git(root, "commit", "-q", "-m", "first")
    return root


def test_clean_checkout_records_its_commit(repo):
    s = pv.git_state(repo)
    assert s.source == "git" and s.commit == git(repo, "rev-parse", "HEAD")
    assert s.dirty is False and s.diff_digest is None and s.dirty_files == ()
    assert s.key == s.commit[:12]


def test_ignored_outputs_do_not_make_a_tree_dirty(repo):
    (repo / "out").mkdir()
    (repo / "out" / "result.json").write_text("{}")
    os.symlink(repo / "out", repo / ".venv")  # a symlinked virtualenv, as in a worktree
    assert pv.git_state(repo).dirty is False


def test_tracked_staged_and_untracked_changes_are_dirty_and_digested(repo):
    clean = pv.git_state(repo)
    (repo / "pkg" / "a.py").write_text("A = 2\n")
    one = pv.git_state(repo)
    assert one.dirty and one.dirty_files == ("pkg/a.py",) and one.diff_digest
    assert one.commit == clean.commit and one.key != clean.key
    (repo / "pkg" / "a.py").write_text("A = 3\n")
    two = pv.git_state(repo)
    assert two.diff_digest != one.diff_digest  # the digest follows the content
    git(repo, "add", "pkg/a.py")
    assert pv.git_state(repo).diff_digest == two.diff_digest  # staged or not: the same change
    git(repo, "checkout", "HEAD", "--", "pkg/a.py")
    assert pv.git_state(repo) == clean
    (repo / "pkg" / "new.py").write_text("B = 1\n")
    untracked = pv.git_state(repo)
    assert untracked.dirty and untracked.dirty_files == ("pkg/new.py",)
    (repo / "pkg" / "new.py").write_text("B = 2\n")
    assert pv.git_state(repo).diff_digest != untracked.diff_digest  # untracked content counts


def test_a_directory_that_is_not_a_checkout_is_an_installed_copy(tmp_path, repo):
    site = repo / "out" / "site-packages"  # inside a repository, but not its top
    (site / "steplaw_train").mkdir(parents=True)
    (site / "steplaw_train" / "__init__.py").write_text("X = 1\n")
    s = pv.git_state(site)
    assert (s.source, s.commit, s.dirty) == ("installed", None, None)
    assert s.key.startswith("files-") and "not a git checkout" in s.describe()
    (site / "steplaw_train" / "__init__.py").write_text("X = 2\n")
    assert pv.git_state(site).key != s.key


def test_porcelain_parsing_skips_a_renames_origin():
    status = b"R  new.py\0old.py\0?? u.txt\0 M m.py\0"
    assert pv.porcelain_paths(status) == [("R ", "new.py"), ("??", "u.txt"), (" M", "m.py")]


def test_dirty_tree_is_refused_unless_allowed(repo):
    (repo / "pkg" / "a.py").write_text("A = 2\n")
    s = pv.git_state(repo)
    with pytest.raises(SpecError, match=r"^allow_dirty: .*uncommitted changes \(pkg/a.py\)"):
        pv.check_clean(s, allow_dirty=False)
    pv.check_clean(s, allow_dirty=True)
    pv.check_clean(pv.git_state(repo.parent), allow_dirty=False)  # not a checkout: not refused


def test_snapshot_holds_the_tree_and_is_shared_by_identical_code(repo, tmp_path):
    code = tmp_path / "sweep" / "code"
    snap = pv.snapshot(code, repo)
    commit = git(repo, "rev-parse", "HEAD")
    assert snap == code / commit[:12]
    assert (snap / "pkg" / "a.py").read_text() == "A = 1\n"
    assert not (snap / "pkg" / "a.py").stat().st_mode & 0o222  # read-only
    doc = json.loads((snap / pv.PROVENANCE).read_text())
    assert doc["commit"] == commit and doc["dirty"] is False and doc["key"] == commit[:12]
    assert pv.read_snapshot_state(snap).commit == commit
    assert pv.read_snapshot_state(snap).source == "snapshot"
    (repo / "out").mkdir()
    (repo / "out" / "big.bin").write_bytes(b"x" * 1000)  # ignored: stays out, tree stays clean
    assert pv.snapshot(code, repo) == snap and not (snap / "out").exists()
    assert sorted(p.name for p in code.iterdir()) == [commit[:12]]  # no temporary left

    (repo / "pkg" / "a.py").write_text("A = 2\n")
    (repo / "pkg" / "new.py").write_text("B = 1\n")
    with pytest.raises(SpecError, match="allow_dirty"):
        pv.snapshot(code, repo)
    dirty = pv.snapshot(code, repo, allow_dirty=True)
    assert dirty != snap and dirty.name == pv.git_state(repo).key
    assert (dirty / "pkg" / "a.py").read_text() == "A = 2\n"
    assert (dirty / "pkg" / "new.py").read_text() == "B = 1\n"  # untracked, not ignored
    assert (snap / "pkg" / "a.py").read_text() == "A = 1\n"  # the first snapshot is untouched
    assert json.loads((dirty / pv.PROVENANCE).read_text())["dirty_files"] == [
        "pkg/a.py",
        "pkg/new.py",
    ]


def test_job_parameters_run_the_snapshot_first(tmp_path):
    code, live = tmp_path / "sw" / "code" / "abc", tmp_path / "checkout"
    path = snapshot_pythonpath(code, live, os.pathsep.join([str(live), "/opt/extra"]))
    assert path == os.pathsep.join([str(code), "/opt/extra"])  # the checkout is dropped
    params = {"slurm_setup": ["module load x"], "slurm_additional_parameters": {"qos": "q"}}
    out = run_in_snapshot(params, code, path)
    assert out["slurm_additional_parameters"] == {"qos": "q", "chdir": str(code)}
    assert out["slurm_setup"][0] == f"export PYTHONPATH={path}"
    assert out["slurm_setup"][1:] == ["module load x"]
    with pytest.raises(SpecError, match="launcher.additional.chdir"):
        run_in_snapshot({"slurm_additional_parameters": {"chdir": "/x"}}, code, path)


def test_package_versions_name_what_decides_a_run():
    v = pv.package_versions()
    for name in ("python", "torch", "megatron-core", "submitit", "hydra-core", "wandb"):
        assert v.get(name), name
    assert v["steplaw-train"]


@pytest.mark.skipif(not pv.is_checkout(REPO), reason="not run from a git checkout")
def test_this_repositorys_outputs_are_ignored():
    """CI's clean clone after `make demo` must not count as dirty: every output is ignored
    (a .venv symlink, as in a worktree, too)."""
    paths = ["sweeps/x", "runs/x", "reports/x", "data/x", "outputs/x", "wandb/x", ".venv"]
    paths += ["multirun/x", "gpu_check.json", "steplaw_train/__pycache__/x.pyc"]
    out = subprocess.run(
        ["git", "-C", str(REPO), "check-ignore", "--no-index", *paths],
        capture_output=True,
        text=True,
    ).stdout.split()
    assert sorted(out) == sorted(paths)


def export_checkout(src: Path, dst: Path) -> str:
    """A committed copy of this working tree (as it is, uncommitted work included) in `dst`;
    returns its commit. Tests that need a checkout to change use it, not the real one."""
    for name in pv.tree_files(src):
        (dst / name).parent.mkdir(parents=True, exist_ok=True)
        (dst / name).write_bytes((src / name).read_bytes())
    git(dst, "init", "-q")
    git(dst, "add", "-A")
    git(dst, "commit", "-q", "-m", "snapshot of the tree under test")
    return git(dst, "rev-parse", "HEAD")


@pytest.mark.skipif(not pv.is_checkout(REPO), reason="not run from a git checkout")
def test_a_dirty_checkout_is_refused_before_anything_is_written(tmp_path):
    """`python -m steplaw_train.sweep launcher=slurm` from a checkout with an uncommitted change:
    exit 2, one line naming allow_dirty, no sweep dir; the cluster is not asked anything."""
    clone = tmp_path / "clone"
    export_checkout(REPO, clone)
    with open(clone / "steplaw_train" / "grid.py", "a") as f:
        f.write("# an uncommitted edit\n")
    sw = tmp_path / "sw"
    env = {**os.environ, "PYTHONPATH": str(clone), "OMP_NUM_THREADS": "1"}
    proc = subprocess.run(
        [sys.executable, "-m", "steplaw_train.sweep", "+grid=tiny", "launcher=slurm"]
        + [f"sweep_dir={sw}", f"options.data_root={tmp_path / 'data'}"],
        cwd=clone,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 2, proc.stderr[-2000:]
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: allow_dirty: the checkout "), lines
    assert "steplaw_train/grid.py" in lines[0] and not sw.exists()


BLOCK = "grid.blocks=[{model:[demo_dense_small],tokens:[4096],lr:[0.002],batch_size:[4]}]"


def test_a_tiny_sweeps_runs_record_their_code(tmp_path, monkeypatch):
    """Every run of a sweep records the code that trained it (spec.json, result.json, one
    code.jsonl line per start, wandb's config); each submission records the checkout's
    provenance, the command line's overrides and its config, which a later call keeps."""
    from steplaw_train import rundir
    from steplaw_train.sweep import sweep
    from steplaw_train.wandb_export import identity

    for var in ("WANDB_DIR", "WANDB_CACHE_DIR", "WANDB_CONFIG_DIR"):
        monkeypatch.setenv(var, str(tmp_path / "wandb"))
    monkeypatch.setenv("WANDB_MODE", "offline")
    sw = tmp_path / "sw"

    def run(*extra: str):
        overrides = ["+grid=tiny", BLOCK, f"sweep_dir={sw}", "launcher=debug", *extra]
        overrides.append(f"options.data_root={tmp_path / 'data'}")
        return sweep(sweep_cfg(*overrides), overrides=overrides), overrides

    res, overrides = run()
    (rid,) = res.submitted
    want = pv.git_state(pv.code_root())
    run_dir = sw / "runs" / rid
    result = json.loads((run_dir / "result.json").read_text())
    spec = json.loads((run_dir / "spec.json").read_text())
    for prov in (result["provenance"], spec["derived"]["provenance"]):
        assert prov["commit"] == want.commit and prov["dirty"] is want.dirty
        assert prov["key"] == want.key and prov["code_root"] == str(pv.code_root())
        assert prov["packages"]["megatron-core"] and prov["packages"]["torch"]
    if want.commit is not None:
        assert len(want.commit) == 40 and isinstance(want.dirty, bool)
    starts = rundir.read_code_starts(run_dir)
    assert [s["key"] for s in starts] == [want.key]
    assert result["code_keys"] == [want.key] and result["code_mixed"] is False
    assert identity(spec, "g", "done")["config"]["provenance"]["commit"] == want.commit

    (line,) = rundir.read_submissions(sw)[0]
    assert line["provenance"]["key"] == want.key and line["overrides"] == overrides
    assert line["code"] is None  # debug runs the checkout itself
    first = (sw / line["config"]).read_text()
    assert first == (sw / "config.yaml").read_text() and "lr:\n    - 0.002\n" in first

    again, _ = run("grid.blocks.0.lr=[0.002,0.004]", "max_retries=0")
    assert len(again.submitted) == 1
    lines = rundir.read_submissions(sw)[0]
    assert len(lines) == 2 and lines[1]["config"] != line["config"]
    assert (sw / line["config"]).read_text() == first  # the first call's config is kept
    assert (sw / lines[1]["config"]).read_text() == (sw / "config.yaml").read_text()
