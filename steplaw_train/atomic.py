"""Atomic file writes (tmp + fsync + rename): a reader sees the old file or the whole new one.

Every record a later stage trusts (spec.json, result.json, launch.json, manifests, reports) is
written through here, so a crash or preemption never leaves half a file that looks complete.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any


def write_bytes(path: Path, data: bytes) -> None:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    with open(tmp, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def write_text(path: Path, text: str) -> None:
    write_bytes(path, text.encode())


def write_json(path: Path, obj: Any) -> None:
    """Sorted keys, Paths and other objects as strings; non-finite floats as JSON's Infinity/NaN."""
    write_text(path, json.dumps(obj, indent=2, sort_keys=True, default=str))


def open_append(path: Path):
    """Open `path` for appending lines, starting on a fresh line.

    A kill or a full disk can leave the last line half written; appending straight onto it would
    glue the next record to the torn one and the file would never heal. The readers drop a torn
    last line (rundir.py); every appender starts past it.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    f = open(path, "ab+")  # noqa: SIM115  (the caller closes it)
    if f.tell() > 0:
        f.seek(-1, os.SEEK_END)
        if f.read(1) != b"\n":
            f.write(b"\n")
    return f


def append_line(path: Path, line: str) -> None:
    """Append one line (newline added), fsynced, on a fresh line (see open_append)."""
    with open_append(path) as f:
        f.write(line.rstrip("\n").encode() + b"\n")
        f.flush()
        os.fsync(f.fileno())
