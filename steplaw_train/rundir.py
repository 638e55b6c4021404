"""The run directory: the contract between the trainer, the launchers, the sweep and the analysis.

One module owns its layout, its records' formats and the rules for reading them, so that every
stage agrees on what a run is:

    <run_dir>/spec.json       {"schema_version", "spec": RunSpec.to_dict(), "derived": {...}}
    <run_dir>/metrics.jsonl   one JSON object per logged step (step, tokens, loss, lr, ...)
    <run_dir>/result.json     {"schema_version", "run_id", "status", "smooth_loss", ...}; last
    <run_dir>/launch.json     {"attempts": [...]} (launch/executors.py)
    <run_dir>/code.jsonl      one line per trainer start: the code it ran (provenance.py)
    <run_dir>/checkpoints/    step_<N>/ (checkpoint.py) + format.json (what wrote them); a
                              finished run: final/ (model weights only) or its last step_<N>/
    <run_dir>/.lock           flock held by the live trainer (locks.py)

Readers never crash on damaged content. A torn last line of a JSONL file (a kill, a full disk)
is dropped with one warning; a corrupt line elsewhere, a JSON file that is not an object, or
binary garbage is a `CorruptRecord` naming the file and the problem, which each caller turns into
a state (status), an excluded row (analysis) or a clear refusal (the trainer). Appenders start on
a fresh line and whole files are written atomically (atomic.py).

A run directory knows its spec: `check_owner` refuses a run dir whose spec.json, result.json or
checkpoints belong to another run_id, or whose checkpoints were written in another format
(precision, optimizer layout), before the trainer writes anything.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import math
import os
import re
import warnings
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from steplaw_train import atomic, locks
from steplaw_train.spec import RunSpec, SpecError

SCHEMA_VERSION = 1
SPEC = "spec.json"
METRICS = "metrics.jsonl"
RESULT = "result.json"
LAUNCH = "launch.json"
CHECKPOINTS = "checkpoints"
CHECKPOINT_FORMAT = "format.json"
FINAL_CHECKPOINT = "final"  # checkpoints/final/: a finished run's model-only save
LOCK = ".lock"
# the sweep directory around the run dirs
RUNS = "runs"
MANIFEST = "manifest.json"
SUBMISSIONS = "submissions.jsonl"
SWEEP_LOCK = ".sweep.lock"
CANCELLED = "cancelled.json"
CONFIG = "config.yaml"  # the latest submission's resolved config
CONFIGS = "configs"  # configs/<sha256[:12]>.yaml: every submission's, content-addressed
CODE = "code"  # code/<key>/: the code snapshots SLURM jobs run (provenance.snapshot)
CODE_STARTS = "code.jsonl"
MANIFEST_KEYS = ("grid", "run_ids")
# the run store (<runs_root>): run dirs by run_id, shared by every sweep that references them
STORE_CLAIM = ".claim.lock"
STORE_SWEEPS = "sweeps.json"
CLAIM_TIMEOUT_S = 600.0


class CorruptRecord(ValueError):
    """A record exists but cannot be trusted (not JSON, not an object, missing keys)."""

    def __init__(self, path: Path, problem: str):
        super().__init__(f"{path}: {problem}")
        self.path = Path(path)
        self.problem = problem


class RunDirConflict(SpecError):
    """The run directory belongs to another spec or checkpoint format."""

    def __init__(self, message: str):
        super().__init__("run_dir", message)


# ---- paths -------------------------------------------------------------------------------------
def spec_path(run_dir: Path) -> Path:
    return Path(run_dir) / SPEC


def metrics_path(run_dir: Path) -> Path:
    return Path(run_dir) / METRICS


def result_path(run_dir: Path) -> Path:
    return Path(run_dir) / RESULT


def launch_path(run_dir: Path) -> Path:
    return Path(run_dir) / LAUNCH


def checkpoints_dir(run_dir: Path) -> Path:
    return Path(run_dir) / CHECKPOINTS


def final_checkpoint_dir(run_dir: Path) -> Path:
    """Where a finished run's model-only checkpoint lives (options.final_checkpoint="model")."""
    return checkpoints_dir(run_dir) / FINAL_CHECKPOINT


def run_dir(sweep_dir: Path, run_id: str) -> Path:
    return Path(sweep_dir) / RUNS / run_id


def is_run_dir(path: Path) -> bool:
    return spec_path(path).is_file()


# ---- generic tolerant readers ------------------------------------------------------------------
_warned: set[tuple[str, str]] = set()


def _warn_once(path: Path, message: str) -> None:
    key = (str(path), message)
    if key not in _warned:
        _warned.add(key)
        warnings.warn(f"{path}: {message}", stacklevel=3)


def read_json(path: Path) -> dict[str, Any] | None:
    """A JSON object from `path`; None when the file does not exist; CorruptRecord otherwise."""
    path = Path(path)
    try:
        raw = path.read_bytes()
    except FileNotFoundError:
        return None
    except OSError as e:
        raise CorruptRecord(path, f"unreadable ({e.__class__.__name__}: {e})") from None
    try:
        doc = json.loads(raw.decode("utf-8"))
    except (UnicodeDecodeError, ValueError) as e:
        raise CorruptRecord(path, f"not valid JSON ({e.__class__.__name__})") from None
    if not isinstance(doc, dict):
        raise CorruptRecord(path, f"not a JSON object (a {type(doc).__name__})")
    return doc


def _lines(path: Path) -> tuple[list[bytes], bool]:
    """Non-blank lines and whether the last one is torn (no newline and unparseable)."""
    data = Path(path).read_bytes()
    lines = [ln for ln in data.split(b"\n") if ln.strip()]
    torn = bool(lines) and not data.endswith(b"\n") and not _parses(lines[-1])
    if torn:
        _warn_once(path, "dropped a torn last line (a write cut short by a kill or full disk)")
        lines = lines[:-1]
    return lines, torn


def _parses(line: bytes) -> bool:
    try:
        return isinstance(json.loads(line), dict)
    except ValueError:
        return False


def read_jsonl(path: Path) -> tuple[list[dict[str, Any]], str | None]:
    """(records, problem): every JSON-object line; a torn last line is dropped (with a warning).
    A bad line elsewhere (an old torn line an appender has since moved past) is skipped and
    `problem` names the first such line, so the caller can decide whether the rest is usable."""
    path = Path(path)
    try:
        lines, _ = _lines(path)
    except FileNotFoundError:
        return [], None
    except OSError as e:
        return [], f"{path.name} unreadable ({e.__class__.__name__})"
    out: list[dict[str, Any]] = []
    problem = None
    for i, line in enumerate(lines, 1):
        try:
            rec = json.loads(line)
        except ValueError:
            rec = None
        if isinstance(rec, dict):
            out.append(rec)
        elif problem is None:
            problem = f"{path.name} corrupt at line {i}"
    return out, problem


def append_jsonl(path: Path, record: Mapping[str, Any]) -> None:
    """One JSON line, on a fresh line, fsynced."""
    atomic.append_line(Path(path), json.dumps(dict(record)))


# ---- spec.json ---------------------------------------------------------------------------------
def write_spec(run_dir: Path, spec: RunSpec, execution: Mapping[str, Any] | None = None) -> None:
    """spec.json: the spec, what follows from it, and (from the trainer) how it is executed.

    The sweep writes it when it records a run (no `execution` yet); the trainer rewrites it with
    the plan it chose (parameters of the built model, micro-batching, precision) added to
    `derived`. The rest of `derived` is always `RunSpec.derived()`, so both writers agree.
    """
    atomic.write_json(spec_path(run_dir), spec_doc(spec, execution))


def spec_doc(spec: RunSpec, execution: Mapping[str, Any] | None = None) -> dict[str, Any]:
    """spec.json's document (see write_spec)."""
    derived = {**spec.derived(), "Na_over_N": spec.Na / spec.N, **dict(execution or {})}
    return {"schema_version": SCHEMA_VERSION, "spec": spec.to_dict(), "derived": derived}


def read_spec(run_dir: Path) -> dict[str, Any] | None:
    """spec.json's document (None if absent); CorruptRecord if it has no `spec` object."""
    doc = read_json(spec_path(run_dir))
    if doc is not None and not isinstance(doc.get("spec"), dict):
        raise CorruptRecord(spec_path(run_dir), "no 'spec' object")
    return doc


def spec_run_id(doc: Mapping[str, Any]) -> str:
    """The run_id a spec.json document describes (recomputed when `derived` lacks it)."""
    rid = (doc.get("derived") or {}).get("run_id")
    return str(rid) if rid else RunSpec.from_dict(doc["spec"]).run_id


def spec_row(doc: Mapping[str, Any]) -> tuple[dict[str, Any], int]:
    """The analysis table's spec columns (the paper's names: hidden→h, layers→numl, ...) and the
    run's log interval. The renaming lives here, beside the writer of the names it renames."""
    spec, derived = doc["spec"], dict(doc.get("derived") or {})
    if not {"N", "Na", "M", "D", "iterations"} <= set(derived):
        derived = {**RunSpec.from_dict(spec).derived(), **derived}  # an older writer's record
    m, t, d = spec["model"], spec["train"], spec["data"]
    moe = m.get("moe") or {}
    seq = int(t.get("seq_len", 2048))
    row = {
        "run_id": derived.get("run_id"),
        "N": derived["N"],
        "Na": derived["Na"],
        "D": derived["D"],
        "M": derived["M"],
        "C": derived.get("C", derived["M"] * derived["D"]),
        "h": m["hidden"],
        "ffnh": m["ffn_hidden"],
        "numh": m["heads"],
        "numl": m["layers"],
        "seq_len": seq,
        "lr": t["lr"],
        "bs": t["batch_size"],
        "bs_tokens": t["batch_size"] * seq,
        "iterations": derived["iterations"],
        "model_name": m.get("name"),
        "recipe": d.get("recipe"),
        "num_experts": moe.get("num_experts", 0),
        "topk": moe.get("topk", 0),
        "moe_ffnh": moe.get("expert_ffn_hidden", 0),
        "shared_ffnh": moe.get("shared_expert_ffn_hidden", 0),
        "seed": t.get("seed"),
    }
    return row, int(t.get("log_interval", 1))


# ---- result.json -------------------------------------------------------------------------------
RESULT_STATES = ("done", "diverged")


def write_result(run_dir: Path, result: Mapping[str, Any]) -> dict[str, Any]:
    """result.json, last and atomically; refuses to replace a finished run's record. Returns
    the document as written (what `read_result` will give back)."""
    path = result_path(run_dir)
    if path.exists():
        raise RunDirConflict(f"{path} exists: a finished run's record is never rewritten")
    doc = {"schema_version": SCHEMA_VERSION, **dict(result)}
    atomic.write_json(path, doc)
    return doc


def read_result(run_dir: Path) -> dict[str, Any] | None:
    """The finished run's record; None while unfinished; CorruptRecord when unusable."""
    doc = read_json(result_path(run_dir))
    if doc is None:
        return None
    if doc.get("status") not in RESULT_STATES:
        raise CorruptRecord(
            result_path(run_dir), f"status {doc.get('status')!r} not one of {RESULT_STATES}"
        )
    return doc


def result_loss(result: Mapping[str, Any] | None) -> float:
    """A finished run's loss for the search: smooth_loss, inf when diverged, nan when unusable."""
    if result is None:
        return math.nan
    if result.get("status") == "diverged":
        return math.inf
    try:
        v = float(result.get("smooth_loss"))  # type: ignore[arg-type]
    except (TypeError, ValueError):
        return math.nan
    return v if v > 0 else math.nan


# ---- metrics.jsonl -----------------------------------------------------------------------------
def read_metrics(run_dir: Path) -> list[dict[str, Any]]:
    """The logged records (a torn last line dropped); CorruptRecord on a bad line elsewhere."""
    path = metrics_path(run_dir)
    rows, problem = read_jsonl(path)
    if problem is not None:
        raise CorruptRecord(path, problem)
    return rows


def read_last_metrics(run_dir: Path, chunk: int = 8192) -> dict[str, Any] | None:
    """The last logged record (None when there is none), reading only the file's end.

    A sweep's status asks every unfinished run how far it got; reading whole metrics files of
    thousands of long runs would make it slow, so this reads the last `chunk` bytes (more only
    while no complete line fits) and returns the last line that parses as an object: a torn last
    line is skipped, as read_metrics drops it. Never raises on damaged content (None instead).
    """
    path = metrics_path(run_dir)
    try:
        with open(path, "rb") as f:
            size = f.seek(0, 2)
            want = chunk
            while True:
                start = max(0, size - want)
                f.seek(start)
                data = f.read(size - start)
                lines = data.split(b"\n")
                if start > 0:
                    lines = lines[1:]  # the first piece may be the tail of a longer line
                for line in reversed(lines):
                    if line.strip():
                        try:
                            rec = json.loads(line)
                        except ValueError:
                            continue
                        if isinstance(rec, dict):
                            return rec
                if start == 0:
                    return None
                want *= 4
    except OSError:
        return None


def truncate_metrics(run_dir: Path, last_step: int) -> None:
    """Keep the records up to `last_step` (a resumed run re-logs the rest), atomically."""
    path = metrics_path(run_dir)
    if not path.exists():
        return
    keep = [r for r in read_metrics(run_dir) if int(r["step"]) <= last_step]
    atomic.write_text(path, "".join(json.dumps(r) + "\n" for r in keep))


def open_metrics(run_dir: Path):
    """The metrics file opened for appending, on a fresh line (the Logger holds it open)."""
    return atomic.open_append(metrics_path(run_dir))


_STEP = re.compile(rb'"step"\s*:\s*(-?\d+)\s*[,}]')
_LOSS = re.compile(rb'"loss"\s*:\s*(-?[0-9.eE+-]+|NaN|-?Infinity)\s*[,}]')


def read_loss_series(run_dir: Path) -> tuple[list[int], list[float], str | None]:
    """(steps, losses, problem) for the analysis: the same rules as read_metrics, never raises.

    JSON decoding dominates collecting thousands of runs, so step and loss are pulled out with two
    regexes when every line yields exactly one of each; otherwise lines are parsed one by one.
    """
    path = metrics_path(run_dir)
    try:
        lines, _ = _lines(path)
    except FileNotFoundError:
        return [], [], None
    except OSError as e:
        return [], [], f"{METRICS} unreadable ({e.__class__.__name__})"
    fast = _scan(lines)
    if fast is not None:
        return fast[0], fast[1], None
    steps: list[int] = []
    losses: list[float] = []
    for i, line in enumerate(lines, 1):
        try:
            rec = json.loads(line)
            step, loss = int(rec["step"]), float(rec["loss"])
        except (ValueError, KeyError, TypeError):
            return steps, losses, f"{METRICS} corrupt at line {i}"
        steps.append(step)
        losses.append(loss)
    return steps, losses, None


def _scan(lines: list[bytes]) -> tuple[list[int], list[float]] | None:
    data = b"\n".join(lines)
    steps, losses = _STEP.findall(data), _LOSS.findall(data)
    if not (len(steps) == len(losses) == len(lines)) or data.count(b"{") != len(lines):
        return None
    try:
        return [int(x) for x in steps], [float(x) for x in losses]
    except ValueError:
        return None


# ---- launch.json -------------------------------------------------------------------------------
def read_attempts(run_dir: Path) -> list[dict[str, Any]]:
    """The recorded submissions of a run; a corrupt launch.json counts as none (warned)."""
    try:
        doc = read_json(launch_path(run_dir))
    except CorruptRecord as e:
        _warn_once(e.path, f"{e.problem}; its attempts are ignored")
        return []
    tries = (doc or {}).get("attempts", [])
    return [a for a in tries if isinstance(a, dict)] if isinstance(tries, list) else []


def write_attempts(run_dir: Path, attempts: list[Mapping[str, Any]]) -> None:
    atomic.write_json(launch_path(run_dir), {"attempts": [dict(a) for a in attempts]})


# ---- code.jsonl ----------------------------------------------------------------------------------
def append_code_start(run_dir: Path, record: Mapping[str, Any]) -> None:
    """One line per trainer start (first start, resume, requeue): the code it ran."""
    append_jsonl(Path(run_dir) / CODE_STARTS, record)


def read_code_starts(run_dir: Path) -> list[dict[str, Any]]:
    """The recorded starts (a torn last line dropped, a bad line skipped)."""
    return read_jsonl(Path(run_dir) / CODE_STARTS)[0]


# ---- ownership ---------------------------------------------------------------------------------
def checkpoint_format(precision: str, distributed_optimizer: bool) -> dict[str, Any]:
    """What a checkpoint's layout depends on (data parallelism is not: fully reshardable)."""
    return {"precision": precision, "distributed_optimizer": bool(distributed_optimizer)}


def write_checkpoint_format(run_dir: Path, run_id: str, fmt: Mapping[str, Any]) -> None:
    atomic.write_json(
        checkpoints_dir(run_dir) / CHECKPOINT_FORMAT,
        {"schema_version": SCHEMA_VERSION, "run_id": run_id, **dict(fmt)},
    )


def _has_checkpoints(run_dir: Path) -> bool:
    root = checkpoints_dir(run_dir)
    return root.is_dir() and any(p.name.startswith("step_") for p in root.iterdir())


def check_owner(run_dir: Path, spec: RunSpec, fmt: Mapping[str, Any] | None = None) -> None:
    """Refuse (RunDirConflict, one line naming both run_ids) a run dir that belongs to another
    spec, or whose checkpoints another format wrote. Corrupt records are refused too: the
    trainer must not guess whose they are."""
    run_dir = Path(run_dir)
    mine = spec.run_id

    def other(what: str, theirs: str) -> RunDirConflict:
        return RunDirConflict(
            f"{run_dir} belongs to run_id {theirs} ({what}), not to this spec's run_id {mine}; "
            f"use another run_dir (or runs/{mine})"
        )

    try:
        doc = read_spec(run_dir)
        result = read_json(result_path(run_dir))
        ck = read_json(checkpoints_dir(run_dir) / CHECKPOINT_FORMAT)
    except CorruptRecord as e:
        raise RunDirConflict(f"{e}; move it away to rerun this run") from None
    if doc is not None:
        try:
            theirs = spec_run_id(doc)
        except (KeyError, TypeError, ValueError) as e:
            raise RunDirConflict(f"{spec_path(run_dir)}: unreadable spec ({e})") from None
        if theirs != mine:
            raise other(SPEC, theirs)
    if result is not None and str(result.get("run_id", mine)) != mine:
        raise other(RESULT, str(result.get("run_id")))
    if ck is not None and str(ck.get("run_id", mine)) != mine:
        raise other(f"{CHECKPOINTS}/{CHECKPOINT_FORMAT}", str(ck.get("run_id")))
    if fmt is None or not _has_checkpoints(run_dir):
        return
    recorded = ck
    if recorded is None and doc is not None:
        recorded = doc.get("derived")  # checkpoints written before format.json existed
    for key, want in fmt.items():
        have = (recorded or {}).get(key)
        if have is not None and have != want:
            raise RunDirConflict(
                f"{checkpoints_dir(run_dir)} was written with {key}={have!r}, this run asks for "
                f"{key}={want!r} (run_id {mine}); resume with {key}={have!r}, or use another run_dir"
            )


@contextmanager
def owned(run_dir: Path) -> Iterator[None]:
    """Exclusive use of a run dir for the trainer's life; released by the OS if it dies.

    A busy lock is retried for up to a second before the refusal: status probes the lock
    (`training_pid`) with a momentary shared lock, which must never make a starting trainer fail.
    """
    try:
        with locks.file_lock(
            Path(run_dir) / LOCK, blocking=True, timeout_s=1.0, what=f"run dir {run_dir}"
        ):
            yield
    except locks.LockBusy as e:
        raise RunDirConflict(f"{e}; a second trainer on one run dir would corrupt it") from None


# ---- the sweep directory -----------------------------------------------------------------------
def write_manifest(sweep_dir: Path, manifest: Mapping[str, Any]) -> None:
    atomic.write_json(Path(sweep_dir) / MANIFEST, {"schema_version": SCHEMA_VERSION, **manifest})


def read_manifest(sweep_dir: Path) -> dict[str, Any] | None:
    """manifest.json (None if absent); CorruptRecord when damaged or missing keys."""
    path = Path(sweep_dir) / MANIFEST
    doc = read_json(path)
    if doc is None:
        return None
    missing = [k for k in MANIFEST_KEYS if k not in doc]
    if missing:
        raise CorruptRecord(path, f"missing keys {missing}")
    if not isinstance(doc["run_ids"], list) or not all(isinstance(r, str) for r in doc["run_ids"]):
        raise CorruptRecord(path, "'run_ids' is not a list of run ids")
    return doc


def write_config(sweep_dir: Path, text: str) -> str:
    """The resolved config as config.yaml (the latest) and as configs/<sha256[:12]>.yaml, which
    is never overwritten with other content: every submission's config stays readable (its
    submissions.jsonl line names the copy). Returns that copy's path relative to the sweep dir."""
    rel = config_copy(text)
    copy = Path(sweep_dir) / rel
    if not copy.exists():
        atomic.write_text(copy, text)
    atomic.write_text(Path(sweep_dir) / CONFIG, text)
    return rel


def config_copy(text: str) -> str:
    """Where write_config keeps this config (relative to the sweep dir)."""
    return f"{CONFIGS}/{hashlib.sha256(text.encode()).hexdigest()[:12]}.yaml"


def append_submission(sweep_dir: Path, entry: Mapping[str, Any]) -> None:
    append_jsonl(Path(sweep_dir) / SUBMISSIONS, entry)


def read_submissions(sweep_dir: Path) -> tuple[list[dict[str, Any]], str | None]:
    return read_jsonl(Path(sweep_dir) / SUBMISSIONS)


@contextmanager
def sweep_owned(sweep_dir: Path) -> Iterator[None]:
    """One submitting invocation per sweep dir (full or guided). A second one is refused at once
    with the holder's pid: it would otherwise submit the same runs again."""
    try:
        with locks.file_lock(
            Path(sweep_dir) / SWEEP_LOCK, blocking=False, what=f"sweep dir {sweep_dir}"
        ):
            yield
    except locks.LockBusy as e:
        raise SpecError(
            "sweep_dir",
            f"{e}; another sweep invocation is submitting to it — wait for it to end "
            f"(`python -m steplaw_train.sweep.status {sweep_dir}`) and rerun",
        ) from None


def training_pid(run_dir: Path) -> int | None:
    """The pid of a live trainer holding the run dir's lock (0 when it wrote none), else None.

    This is how a sweep sees a run trained by someone it has no record of: another sweep's local
    process on another host sharing the store, or a hand-started `python -m steplaw_train.train`.
    """
    path = Path(run_dir) / LOCK
    if not locks.held_by_other(path):
        return None
    return locks.holder_pid(path) or 0


# ---- cancellations (per sweep dir) -------------------------------------------------------------
def read_cancelled(sweep_dir: Path) -> dict[str, dict[str, Any]]:
    """run_id → {time, ...} of the runs this sweep has cancelled (empty if none).

    A damaged file is refused (SpecError), not ignored: ignoring it would resubmit every run the
    user cancelled."""
    path = Path(sweep_dir) / CANCELLED
    try:
        doc = read_json(path)
    except CorruptRecord as e:
        raise SpecError(
            CANCELLED, f"{e}; fix or delete it (deleting un-cancels every run)"
        ) from None
    runs = (doc or {}).get("runs", {})
    if not isinstance(runs, dict):
        raise SpecError(CANCELLED, f"{path}: 'runs' is not an object")
    return {str(k): dict(v) if isinstance(v, dict) else {} for k, v in runs.items()}


def write_cancelled(sweep_dir: Path, runs: Mapping[str, Mapping[str, Any]]) -> None:
    atomic.write_json(
        Path(sweep_dir) / CANCELLED,
        {"schema_version": SCHEMA_VERSION, "runs": {k: dict(v) for k, v in sorted(runs.items())}},
    )


# ---- the run store -----------------------------------------------------------------------------
def uses_store(sweep_dir: Path, runs_root: Path) -> bool:
    """False when the sweep's own runs/ is the store (`runs_root: <sweep_dir>/runs`)."""
    return Path(runs_root).resolve() != (Path(sweep_dir) / RUNS).resolve()


def link_run(sweep_dir: Path, runs_root: Path, run_id: str) -> Path:
    """Make `<sweep_dir>/runs/<run_id>` reference `<runs_root>/<run_id>`; return that path.

    * nothing there: the store's run dir is created if missing and the sweep gets a relative
      symlink to it (every reader of `run_dir(sweep_dir, id)` follows it unchanged);
    * a real directory there (a sweep made before the store, or one another store was chosen
      for): it is used in place, never moved (a queued job may hold its path); the store, if it
      has no such run, gets a symlink to it so that other sweeps find it;
    * a symlink: kept while it resolves (a run dir wherever it lives is this sweep's run); a
      dangling one is pointed at the store again.
    """
    local = run_dir(sweep_dir, run_id)
    store = Path(runs_root) / run_id
    if not uses_store(sweep_dir, runs_root):
        return local
    if local.is_symlink():
        if local.exists():
            return local
        local.unlink()
    elif local.exists():
        if not store.exists():
            _symlink(local, store)  # adopt the sweep's own copy into the store, in place
        return local
    if store.is_symlink() and not store.exists():
        store.unlink()  # an adopted copy that was deleted since
    store.mkdir(parents=True, exist_ok=True)
    _symlink(store, local)
    return local


def _symlink(target: Path, link: Path) -> None:
    """A relative symlink `link` → `target`, created atomically (a tmp name, then rename);
    another process creating the same link first is fine (FileExistsError is not an error)."""
    link.parent.mkdir(parents=True, exist_ok=True)
    rel = os.path.relpath(target, link.parent)
    tmp = link.with_name(f".{link.name}.{os.getpid()}.link")
    with contextlib.suppress(FileNotFoundError):
        tmp.unlink()
    os.symlink(rel, tmp)
    try:
        if link.is_symlink() or link.exists():
            raise FileExistsError(link)
        os.replace(tmp, link)
    except FileExistsError:
        tmp.unlink()


@contextmanager
def store_claim(runs_root: Path, timeout_s: float = CLAIM_TIMEOUT_S) -> Iterator[None]:
    """The store's claim lock, held only around "read a run's state → submit → record the
    attempt" (seconds; never for a blocking local sweep's life): two sweeps sharing runs cannot
    both submit the same pending run. Waits for the holder (another sweep's submission)."""
    path = Path(runs_root) / STORE_CLAIM
    try:
        with locks.file_lock(
            path, blocking=True, timeout_s=timeout_s, what=f"run store {runs_root}"
        ):
            yield
    except locks.LockBusy as e:
        raise SpecError(
            "runs_root", f"{e}; another sweep has been submitting for {timeout_s:.0f}s"
        ) from None


def register_sweep(runs_root: Path, sweep_dir: Path) -> None:
    """Note in `<runs_root>/sweeps.json` that `sweep_dir` references runs here (relative paths,
    so the tree can move): `cancel` asks it which other sweeps still want a run."""
    runs_root = Path(runs_root)
    rel = os.path.relpath(Path(sweep_dir).resolve(), runs_root.resolve())
    with store_claim(runs_root):
        have = [str(p) for p in (read_json(runs_root / STORE_SWEEPS) or {}).get("sweeps", [])]
        if rel not in have:
            atomic.write_json(
                runs_root / STORE_SWEEPS,
                {"schema_version": SCHEMA_VERSION, "sweeps": sorted([*have, rel])},
            )


def store_sweeps(runs_root: Path) -> list[Path]:
    """The sweep dirs registered with the store that still exist (absolute)."""
    runs_root = Path(runs_root)
    try:
        doc = read_json(runs_root / STORE_SWEEPS) or {}
    except CorruptRecord as e:
        _warn_once(e.path, f"{e.problem}; no other sweep is known to share these runs")
        return []
    out = []
    for rel in doc.get("sweeps", []):
        p = (runs_root / str(rel)).resolve()
        if (p / MANIFEST).is_file():
            out.append(p)
    return out


def manifest_runs_root(sweep_dir: Path, manifest: Mapping[str, Any] | None) -> Path:
    """The store a sweep's runs live in, as its manifest records it (relative to the sweep dir);
    a sweep made before the store has its own runs/."""
    rel = (manifest or {}).get("runs_root")
    return (Path(sweep_dir) / str(rel)).resolve() if rel else Path(sweep_dir) / RUNS
