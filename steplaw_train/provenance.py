"""Which code produced a run: git commit, dirty state, diff digest, package versions, and the
per-submission code snapshot that SLURM jobs run.

A run_id hashes the spec only, so without this record a code edit between two runs of one cell
(or between a run's requeues) would mix silently into the fit. Three places use it:

* the sweep (`checkout_provenance`) records the submitting checkout in every submissions.jsonl
  line and refuses a SLURM submission from a dirty tree unless `allow_dirty=true`
  (`check_clean`);
* the SLURM launcher copies the code into `<sweep_dir>/code/<key>/` (`snapshot`) and its jobs
  run from there, so a job started days later, and every requeue of it, runs what was
  submitted, whatever happened to the checkout since;
* the trainer records the code it imported (`running_provenance`: the snapshot's
  PROVENANCE.json, else the git state of its checkout) in spec.json, result.json, wandb's
  config and a per-start line of the run dir's code.jsonl.

Definitions. *Dirty*: `git status --porcelain --untracked-files=all` lists anything, i.e. a
tracked file differs from HEAD (staged or not) or an untracked file is not ignored; ignored
outputs (sweeps/, runs/, data/, .venv, ...) never count. *diff_digest*: sha256 over
`git diff --binary HEAD` followed by each untracked file's path and bytes (sorted), None when
clean. The snapshot key is `<commit[:12]>` for a clean tree and `<commit[:12]>-<digest[:12]>`
otherwise, so identical code is copied once and shared by every submission that runs it.
Code that is not a git checkout (an installed package) has commit None, dirty None and a
digest of its package files, and says so in `source`.

Git runs in subprocesses at the edge (`git_state`); everything else is a pure function of what
it returns.
"""

from __future__ import annotations

import functools
import hashlib
import json
import os
import shutil
import subprocess
import sys
import time
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass
from importlib import metadata
from pathlib import Path
from typing import Any

from steplaw_train.spec import SpecError

PROVENANCE = "PROVENANCE.json"  # inside a snapshot: what the code in it is
CODE_PACKAGES = ("steplaw_train", "launch", "analysis")  # what an installed copy consists of
# distributions whose versions decide what a run computes (absent ones are left out)
PACKAGES = (
    "torch",
    "megatron-core",
    "transformer-engine",
    "transformer_engine_torch",
    "submitit",
    "hydra-core",
    "wandb",
    "numpy",
    "steplaw-train",
)
MAX_LISTED = 20  # dirty files named in a record


@dataclass(frozen=True)
class CodeState:
    """What a code tree is. `source`: git (a checkout), snapshot (a copy made at submission,
    read from its PROVENANCE.json) or installed (no git: commit and dirty unknown)."""

    source: str
    commit: str | None
    dirty: bool | None
    diff_digest: str | None  # None when clean; for `installed`, the digest of its files
    dirty_files: tuple[str, ...] = ()  # the first MAX_LISTED changed / untracked paths
    checkout: str | None = None  # the tree it describes (for a snapshot: where it was copied from)

    @property
    def key(self) -> str:
        """Content address of the code: equal keys, equal files."""
        if self.commit is None:
            return f"files-{(self.diff_digest or 'unknown')[:12]}"
        if not self.dirty:
            return self.commit[:12]
        return f"{self.commit[:12]}-{(self.diff_digest or 'unknown')[:12]}"

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["dirty_files"] = list(self.dirty_files)
        d["key"] = self.key
        return d

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> CodeState:
        return cls(
            source=str(d.get("source", "snapshot")),
            commit=d.get("commit"),
            dirty=d.get("dirty"),
            diff_digest=d.get("diff_digest"),
            dirty_files=tuple(d.get("dirty_files") or ()),
            checkout=d.get("checkout"),
        )

    def describe(self) -> str:
        """One line for the sweep's output."""
        if self.commit is None:
            return f"code: not a git checkout ({self.checkout}; files {self.key})"
        if not self.dirty:
            return f"code: {self.commit[:12]} (clean)"
        n = len(self.dirty_files)
        more = "+" if n >= MAX_LISTED else ""
        return (
            f"code: {self.commit[:12]} with uncommitted changes in {n}{more} file(s): "
            f"{', '.join(self.dirty_files[:5])}{' ...' if n > 5 else ''} (digest {self.key})"
        )


# ---- the edge: git ---------------------------------------------------------------------------
def _git(root: Path, *args: str) -> bytes:
    return subprocess.run(
        ["git", "-C", str(root), *args], capture_output=True, check=True, timeout=60
    ).stdout


def code_root() -> Path:
    """The directory the running code was imported from (holds steplaw_train/ and launch/)."""
    import steplaw_train

    return Path(steplaw_train.__file__).resolve().parents[1]


def is_checkout(root: Path) -> bool:
    """`root` is the top of a git work tree (not merely inside one: a virtualenv or
    site-packages under some repository is not that repository's code)."""
    try:
        top = _git(root, "rev-parse", "--show-toplevel").decode().strip()
    except (OSError, subprocess.SubprocessError):
        return False
    return Path(top).resolve() == Path(root).resolve()


def tree_files(root: Path) -> list[str]:
    """The files of the code tree as it is on disk: tracked (not deleted) + untracked files git
    does not ignore, sorted. For an installed copy: the package files (no __pycache__)."""
    root = Path(root)
    if is_checkout(root):
        out = _git(root, "ls-files", "-z", "--cached", "--others", "--exclude-standard")
        names = sorted({n for n in out.decode().split("\0") if n})
        return [n for n in names if (root / n).is_file() or (root / n).is_symlink()]
    found = []
    for pkg in CODE_PACKAGES:
        for p in sorted((root / pkg).rglob("*")):
            if p.is_file() and "__pycache__" not in p.parts:
                found.append(p.relative_to(root).as_posix())
    return found


def git_state(root: Path) -> CodeState:
    """The code state of `root` (a git checkout, else an installed copy)."""
    root = Path(root).resolve()
    if not is_checkout(root):
        return CodeState(
            source="installed",
            commit=None,
            dirty=None,
            diff_digest=files_digest(root, tree_files(root)),
            checkout=str(root),
        )
    commit = _git(root, "rev-parse", "HEAD").decode().strip()
    status = _git(root, "status", "--porcelain", "-z", "--untracked-files=all")
    changed = porcelain_paths(status)
    untracked = sorted(p for code, p in changed if code == "??")
    dirty = bool(changed)
    digest = None
    if dirty:
        diff = _git(root, "diff", "--binary", "--no-ext-diff", "--no-color", "HEAD")
        digest = diff_digest(diff, [(p, _read(root / p)) for p in untracked])
    return CodeState(
        source="git",
        commit=commit,
        dirty=dirty,
        diff_digest=digest,
        dirty_files=tuple(sorted(p for _, p in changed)[:MAX_LISTED]),
        checkout=str(root),
    )


def _read(path: Path) -> bytes:
    return os.readlink(path).encode() if path.is_symlink() else path.read_bytes()


# ---- pure --------------------------------------------------------------------------------------
def porcelain_paths(status: bytes) -> list[tuple[str, str]]:
    """(XY code, path) pairs of `git status --porcelain -z`; a rename's source is skipped."""
    out = []
    entries = status.decode(errors="replace").split("\0")
    i = 0
    while i < len(entries):
        e = entries[i]
        i += 1
        if len(e) < 4:
            continue
        code, path = e[:2], e[3:]
        out.append((code, path))
        if "R" in code or "C" in code:
            i += 1  # -z puts the rename's origin in the next entry
    return out


def diff_digest(diff: bytes, untracked: Sequence[tuple[str, bytes]]) -> str:
    """sha256 of the diff against HEAD and every untracked file (path and bytes, sorted)."""
    h = hashlib.sha256(b"diff\0" + diff)
    for path, data in sorted(untracked):
        h.update(b"\0file\0" + path.encode() + b"\0" + str(len(data)).encode() + b"\0" + data)
    return h.hexdigest()


def files_digest(root: Path, names: Sequence[str]) -> str:
    """sha256 of the named files (path and bytes): an installed copy's identity."""
    return diff_digest(b"", [(n, _read(Path(root) / n)) for n in names])


def package_versions() -> dict[str, str]:
    """Versions of the distributions that decide what a run computes (installed ones), and
    Python's; read from package metadata, so nothing heavy is imported."""
    out = {"python": sys.version.split()[0]}
    for name in PACKAGES:
        try:
            out[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            continue
    return out


def check_clean(state: CodeState, allow_dirty: bool) -> None:
    """Refuse (SpecError `allow_dirty`) submitting a dirty tree to SLURM: its jobs would run
    uncommitted code nobody can check out again. allow_dirty=true submits it as it is (the
    snapshot holds the files, the digest identifies them)."""
    if state.dirty and not allow_dirty:
        files = ", ".join(state.dirty_files[:5]) + (" ..." if len(state.dirty_files) > 5 else "")
        raise SpecError(
            "allow_dirty",
            f"the checkout {state.checkout} has uncommitted changes ({files}); commit them, or "
            "set allow_dirty=true to submit them as they are (recorded by digest)",
        )


# ---- what the running code is ------------------------------------------------------------------
def read_snapshot_state(root: Path) -> CodeState | None:
    """The PROVENANCE.json of a snapshot directory, None if `root` is not a snapshot."""
    path = Path(root) / PROVENANCE
    if not path.is_file():
        return None
    return CodeState.from_dict({**json.loads(path.read_text()), "source": "snapshot"})


@functools.cache
def running_state() -> CodeState:
    """The code this process imported: its snapshot's record, else its checkout's git state.
    Once per process: modules are imported once, so later edits to the files do not change
    what runs here (an in-process debug sweep keeps its first answer)."""
    root = code_root()
    return read_snapshot_state(root) or git_state(root)


def record(state: CodeState, root: Path | None = None) -> dict[str, Any]:
    """The provenance record of spec.json, result.json, submissions and wandb: the code state,
    where the code was imported from and the installed package versions."""
    return {
        **state.to_dict(),
        "code_root": str(root) if root is not None else None,
        "packages": package_versions(),
    }


def running_provenance() -> dict[str, Any]:
    """`record` of the code this process runs (the trainer calls it)."""
    return record(running_state(), code_root())


def checkout_provenance(root: Path | None = None) -> tuple[CodeState, dict[str, Any]]:
    """The submitting checkout's state (fresh, not cached: it may change between sweeps of one
    process) and its record."""
    root = Path(root) if root is not None else code_root()
    state = read_snapshot_state(root) or git_state(root)
    return state, record(state, root)


# ---- the snapshot --------------------------------------------------------------------------------
def snapshot(code_dir: Path, root: Path | None = None, allow_dirty: bool = False) -> Path:
    """A copy of the code tree at `root` (default: the running code's) under
    `code_dir/<key>/`, with PROVENANCE.json; reused when it exists (same key, same files).

    Written as a temporary directory renamed into place, so a half-copied snapshot is never
    used. The tree's state is read before and after the copy: a file changing meanwhile would
    make the copy match neither, so that is refused. A dirty tree is refused unless
    `allow_dirty` (check_clean). Its files are read-only (Python may still add __pycache__)."""
    root = Path(root) if root is not None else code_root()
    before = read_snapshot_state(root) or git_state(root)
    check_clean(before, allow_dirty)
    target = Path(code_dir) / before.key
    if (target / PROVENANCE).is_file():
        return target
    tmp = Path(code_dir) / f".{before.key}.{os.getpid()}.tmp"
    if tmp.exists():
        shutil.rmtree(tmp)
    tmp.mkdir(parents=True)
    for name in tree_files(root):
        src, dst = root / name, tmp / name
        dst.parent.mkdir(parents=True, exist_ok=True)
        if src.is_symlink():
            os.symlink(os.readlink(src), dst)
        else:
            shutil.copy2(src, dst)
            os.chmod(dst, dst.stat().st_mode & ~0o222)  # a snapshot is a record: read-only
    after = read_snapshot_state(root) or git_state(root)
    if after.key != before.key:
        shutil.rmtree(tmp, ignore_errors=True)
        raise SpecError(
            "allow_dirty",
            f"the code in {root} changed while it was copied ({before.key} -> {after.key}); "
            "submit again when it is settled",
        )
    doc = {**before.to_dict(), "created": time.time()}
    (tmp / PROVENANCE).write_text(json.dumps(doc, indent=2, sort_keys=True))
    try:
        os.rename(tmp, target)
    except OSError:  # another submission made the same snapshot meanwhile: use that one
        shutil.rmtree(tmp, ignore_errors=True)
        if not (target / PROVENANCE).is_file():
            raise
    return target
