"""How pending runs reach machines: submitit on SLURM (job arrays), locally, or in-process.

* SLURM: runs are grouped by resource class (launch/resources.py); each class goes out as job
  arrays of at most MaxArraySize - 1 tasks with an array throttle (`%N`), one sbatch per array.
  Submission returns at once with the job ids. Jobs ask for a warning signal before their time
  limit; `RunJob` is submitit-Checkpointable, so the signal requeues the same call, and the call
  itself resumes from the run's own checkpoints — which also makes a plain `scontrol requeue`
  (which restarts the job from scratch) safe.
* local: submitit's LocalExecutor, one process per run, at most `parallelism` at a time, with a
  progress line per finished run. Blocks until all runs end.
* debug: submitit's DebugExecutor, in this process, one run after another. submitit opens pdb
  on a failure; we collect the exception instead unless `launcher.pdb=true`.

Every submission is recorded in `runs/<run_id>/launch.json` (attempts: executor, job id, log
paths, end state) so that launch/status.py can tell queued, running, failed and preempted runs.

Run dirs may be shared with other sweeps (the run store, `runs_root`). Every launcher therefore
re-reads a run's state under the store's claim lock (rundir.store_claim) right before it hands
the run over and records the attempt under that same lock: a run another sweep has queued,
started or finished since this sweep chose it is skipped (`Submitted.skipped`), not trained
twice. SLURM holds the claim for its whole sbatch phase (seconds); local and debug take it per
run, just around starting it, never for the life of a blocking sweep.
"""

from __future__ import annotations

import fnmatch
import os
import re
import shlex
import subprocess
import sys
import time
from collections import deque
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import asdict, dataclass, field, fields, replace
from pathlib import Path
from typing import Any

import submitit

from launch import status
from launch.resources import ResourceClass, ResourceModel, resource_class
from launch.status import process_start_time
from steplaw_train import provenance, rundir
from steplaw_train.keys import check_keys
from steplaw_train.options import RunOptions
from steplaw_train.spec import RunSpec, SpecError, check_int, check_real, validate

LAUNCHERS = ("auto", "local", "slurm", "debug")


# ---- the launcher section, validated -----------------------------------------------------------
@dataclass(frozen=True)
class SlurmSettings:
    """configs/launcher/slurm.yaml: how job arrays are asked for."""

    partition: str | None = None
    account: str | None = None
    qos: str | None = None
    constraint: str | None = None
    mem_gb: float | None = None
    setup: tuple[str, ...] = ()  # shell lines run before the job
    additional: Mapping[str, Any] = field(default_factory=dict)  # more sbatch options
    array_parallelism: int = 256
    max_array_size: int | None = None  # None: the cluster's MaxArraySize (scontrol)
    signal_delay_s: int = 120
    max_num_timeout: int = 20
    max_walltime_min: int | None = None  # the cluster's longest job where scontrol hides it
    # more sbatch options per resource class: {fnmatch pattern on the class label: {opt: value}}
    additional_by_class: Mapping[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class LocalSettings:
    """configs/launcher/local.yaml: processes on this machine."""

    parallelism: int = 2
    threads_per_run: int | None = 1
    timeout_min: int = 7 * 24 * 60
    gpus_per_run: int | str = "auto"  # auto: one GPU per run where torch sees GPUs; 0: CPU


@dataclass(frozen=True)
class DebugSettings:
    """configs/launcher/debug.yaml: in this process."""

    pdb: bool = False


SETTINGS = {"slurm": SlurmSettings, "local": LocalSettings, "debug": DebugSettings}


def _names(cls: type) -> set[str]:
    return {f.name for f in fields(cls)}


def launcher_settings(section: Mapping[str, Any] | None) -> tuple[str, Any]:
    """(resolved launcher name, its settings) from the `launcher:` section; unknown keys and
    names are SpecErrors listing the valid ones. `auto` accepts both local and slurm keys (its
    YAML carries both) and keeps the resolved launcher's."""
    d = dict(section or {})
    name = str(d.pop("name", "auto"))
    if name not in LAUNCHERS:
        raise SpecError("launcher.name", f"unknown launcher {name!r}; allowed: {list(LAUNCHERS)}")
    valid = _names(LocalSettings) | _names(SlurmSettings) if name == "auto" else None
    resolved = resolve_launcher(name)
    cls = SETTINGS[resolved]
    check_keys(d, {"name", *(valid or _names(cls))}, "launcher")
    check_launcher({"name": name, **d})
    kept = {k: v for k, v in d.items() if k in _names(cls)}
    if "setup" in kept:
        kept["setup"] = tuple(kept["setup"] or ())
    if "additional" in kept:
        kept["additional"] = dict(kept["additional"] or {})
    if "additional_by_class" in kept:
        kept["additional_by_class"] = {
            str(k): dict(v or {}) for k, v in (kept["additional_by_class"] or {}).items()
        }
    try:
        return resolved, cls(**kept)
    except TypeError as e:
        raise SpecError("launcher", str(e)) from None


class RunJob(submitit.helpers.Checkpointable):
    """One training run as a submitit job. Checkpointable: on the warning signal submitit calls
    `checkpoint()`, whose default resubmits this very call; `train.run` then resumes from the
    run directory's latest complete checkpoint (and returns the result if already finished)."""

    def __call__(self, spec: RunSpec, run_dir: str, options: RunOptions) -> dict:
        from steplaw_train import train

        export_distributed_env()
        return train.run(spec, Path(run_dir), options)


def export_distributed_env() -> None:
    """In a multi-task SLURM job, point every task at the job's first node (MASTER_ADDR/PORT,
    RANK, WORLD_SIZE, LOCAL_RANK) so torch.distributed's env:// works across nodes; the port is
    derived from the job id, so jobs sharing a node do not collide. Each task keeps all the
    node's GPUs visible and picks its own with LOCAL_RANK."""
    if int(os.environ.get("SLURM_NTASKS", "1")) <= 1 or "SUBMITIT_EXECUTOR" not in os.environ:
        return
    # sbatch copies the submitting shell's environment: a MASTER_ADDR/RANK left there (an
    # interactive allocation, a notebook that trained) is stale here, and submitit refuses to
    # overwrite it; the job's own values must win
    for name in _RENDEZVOUS_VARS:
        os.environ.pop(name, None)
    submitit.helpers.TorchDistributedEnvironment().export(set_cuda_visible_devices=False)


_RENDEZVOUS_VARS = (
    "MASTER_ADDR",
    "MASTER_PORT",
    "RANK",
    "WORLD_SIZE",
    "LOCAL_RANK",
    "LOCAL_WORLD_SIZE",
)


# ---- records -----------------------------------------------------------------------------------


def record_attempt(
    run_dir: Path,
    attempt: Mapping[str, Any],
    update_last: bool = False,
    job_id: str | None = None,
) -> None:
    """Append an attempt, or (update_last) update the last one, or the last one of `job_id`
    (a shared run dir may hold another sweep's later attempt: never overwrite theirs)."""
    tries = rundir.read_attempts(run_dir)
    mine = [i for i, a in enumerate(tries) if job_id is not None and a.get("job_id") == job_id]
    if update_last and mine:
        tries[mine[-1]] = {**tries[mine[-1]], **attempt}
    elif update_last and tries and job_id is None:
        tries[-1] = {**tries[-1], **attempt}
    else:
        tries.append({"time": time.time(), **attempt})
    rundir.write_attempts(run_dir, tries)


# ---- plans (pure) ------------------------------------------------------------------------------
@dataclass(frozen=True)
class ArrayChunk:
    """One sbatch call: runs sharing a resource class, at most max_array_size - 1 of them."""

    resources: ResourceClass
    run_ids: tuple[str, ...]


def plan_arrays(
    specs: Sequence[RunSpec],
    rm: ResourceModel,
    max_array_size: int,
    micro_batch_size: int | None = None,
) -> list[ArrayChunk]:
    """Group by resource class, split at the cluster's MaxArraySize (indices 0..Max-1).

    Each run is validated against its class's data-parallel size (and a fixed micro-batch size),
    so a batch the ranks cannot split is a SpecError here, before any sbatch, not a failed job.
    """
    if max_array_size < 2:
        raise SpecError("launcher.max_array_size", f"must be >= 2, got {max_array_size}")
    groups: dict[ResourceClass, list[str]] = {}
    for s in specs:
        rc = resource_class(s, rm)
        validate(s, data_parallel=rc.data_parallel, micro_batch_size=micro_batch_size)
        groups.setdefault(rc, []).append(s.run_id)
    size = max_array_size - 1
    return [
        ArrayChunk(rc, tuple(ids[i : i + size]))
        for rc, ids in sorted(groups.items())
        for i in range(0, len(ids), size)
    ]


def cluster_max_array_size(default: int = 1001) -> int:
    """The cluster's MaxArraySize (scontrol show config), or `default` if it cannot be read."""
    try:
        out = subprocess.run(
            ["scontrol", "show", "config"], capture_output=True, text=True, timeout=30
        ).stdout
    except (OSError, subprocess.SubprocessError):
        return default
    m = re.search(r"^MaxArraySize\s*=\s*(\d+)", out, re.M)
    return int(m.group(1)) if m else default


# (field, smallest allowed value): integers a launcher config may set; None/absent = default
LAUNCHER_INTS = (
    ("parallelism", 1),
    ("threads_per_run", 1),
    ("timeout_min", 1),
    ("array_parallelism", 1),
    ("max_array_size", 2),
    ("signal_delay_s", 0),
    ("max_num_timeout", 0),
    ("max_walltime_min", 1),
)


def check_launcher(lc: Mapping[str, Any]) -> None:
    """Range-check a launcher config before anything is recorded (SpecError `launcher.<field>`)."""
    resolve_launcher(str(lc.get("name", "auto")))
    for key, lo in LAUNCHER_INTS:
        if lc.get(key) is not None:
            check_int(f"launcher.{key}", lc[key], lo)
    if lc.get("mem_gb") is not None:
        check_real("launcher.mem_gb", lc["mem_gb"], 0, None, "()")
    for key in ("setup",):
        if not isinstance(lc.get(key) or [], list):
            raise SpecError(f"launcher.{key}", f"must be a list of shell lines, got {lc[key]!r}")
    for pattern, options in (lc.get("additional_by_class") or {}).items():
        if not isinstance(options, Mapping):
            raise SpecError(
                f"launcher.additional_by_class.{pattern}",
                f"must map sbatch options to values, got {options!r}",
            )
    if not isinstance(lc.get("additional") or {}, Mapping):
        raise SpecError(
            "launcher.additional", f"must be a mapping of sbatch options, got {lc['additional']!r}"
        )


def resolve_launcher(name: str) -> str:
    if name not in LAUNCHERS:
        raise SpecError("launcher.name", f"unknown launcher {name!r}; allowed: {list(LAUNCHERS)}")
    if name == "auto":
        from shutil import which

        return "slurm" if which("sbatch") else "local"
    return name


# Host memory a job asks for when launcher.mem_gb is unset. A checkpoint holds each rank's own
# shard of the optimizer state (dp_reshardable: ~12 bytes per parameter / ranks) plus the model,
# the dataset indices and megatron's writer processes; 32 GB per GPU covers 1B with room to
# spare and leaves most of a GPU node's memory to its neighbours. Explicit because a
# cluster's default (DefMemPerCPU, often 1-4 GB per CPU) is too small for a GPU job, or unset.
MEM_GB_PER_GPU = 32
MEM_GB_PER_CPU_TASK = 4


def default_mem_gb(rc: ResourceClass) -> int:
    """--mem (per node) for a resource class: by GPUs per node, else by CPU tasks."""
    if rc.gpus_per_node:
        return MEM_GB_PER_GPU * rc.gpus_per_node
    return MEM_GB_PER_CPU_TASK * rc.tasks_per_node


def slurm_parameters(rc: ResourceClass, lc: Mapping[str, Any]) -> dict[str, Any]:
    """submitit AutoExecutor parameters for one resource class and the launcher config."""
    extra = {
        k: v
        for k, v in {
            "account": lc.get("account"),
            "qos": lc.get("qos"),
            "constraint": lc.get("constraint"),
        }.items()
        if v
    }
    extra.update(dict(lc.get("additional") or {}))
    extra.update(class_additional(rc, lc.get("additional_by_class")))
    setup = list(lc.get("setup") or [])
    cpus = max(1, rc.cpus_per_task // rc.tasks_per_node)
    params: dict[str, Any] = {
        "timeout_min": rc.timeout_min,
        "nodes": rc.nodes,
        "tasks_per_node": rc.tasks_per_node,
        "cpus_per_task": cpus,
        # srun of Slurm 22.05-23.02 does not inherit sbatch's --cpus-per-task: without this each
        # rank may be pinned to one CPU (its data loader and threads starved)
        "slurm_srun_args": [f"--cpus-per-task={cpus}"],
        "slurm_signal_delay_s": int(lc.get("signal_delay_s", 120)),
        "slurm_array_parallelism": int(lc.get("array_parallelism", 256)),
        "slurm_setup": setup,
        "slurm_additional_parameters": extra,
    }
    if rc.gpus_per_node:
        params["gpus_per_node"] = rc.gpus_per_node
    if lc.get("partition"):
        params["slurm_partition"] = lc["partition"]
    params["mem_gb"] = lc.get("mem_gb") or default_mem_gb(rc)
    return params


def class_additional(rc: ResourceClass, by_class: Mapping[str, Any] | None) -> dict[str, Any]:
    """The extra sbatch options of `launcher.additional_by_class` whose pattern (fnmatch, on the
    class label such as `2x8gpu/1440min`) matches this class, in the order given: `exclusive`
    for whole-node jobs (`*x8gpu/*`) without giving each 1-GPU job a node."""
    out: dict[str, Any] = {}
    for pattern, options in (by_class or {}).items():
        if not isinstance(options, Mapping):
            raise SpecError(
                f"launcher.additional_by_class.{pattern}",
                f"must map sbatch options to values, got {options!r}",
            )
        if fnmatch.fnmatchcase(rc.label(), str(pattern)):
            out.update(options)
    return out


# ---- submission (side effects) -----------------------------------------------------------------
@dataclass(frozen=True)
class Submitted:
    job_ids: tuple[str, ...]  # one per run (array task ids on SLURM)
    batch_calls: int  # sbatch calls (job arrays) made; 0 for local/debug
    failed: tuple[str, ...] = ()  # run_ids whose local/debug run raised
    run_ids: tuple[str, ...] = ()  # what was handed over (the specs minus `skipped`)
    # (run_id, state): runs another sweep queued, started or finished, or this sweep
    # cancelled, after they were chosen; found under the store's claim lock, not submitted
    skipped: tuple[tuple[str, str], ...] = ()
    code: Path | None = None  # the code snapshot the jobs run (SLURM); None: the live checkout


@dataclass(frozen=True)
class Launcher:
    """Where a sweep's runs go, built once from the validated `launcher:` section.

    `plan(specs)` says how many sbatch calls a submission would take (0 off SLURM) and validates
    the specs against the resources they would get; `submit(specs)` hands them over and records
    each attempt in its run dir; `blocking` launchers return only once the runs have ended.
    """

    name: str
    settings: Any
    sweep_dir: Path
    options: RunOptions
    resources: ResourceModel
    blocking: bool = True
    runs_root: Path | None = None  # the run store; None: the sweep's own runs/
    allow_dirty: bool = False  # SLURM: submit a checkout with uncommitted changes as it is

    def plan(self, specs: Sequence[RunSpec]) -> int:
        return 0

    def claim(self):
        """The store's claim lock (see the module docstring)."""
        return rundir.store_claim(self.runs_root or self.sweep_dir / rundir.RUNS)

    def recheck(self, specs: Sequence[RunSpec], out) -> tuple[list[RunSpec], list[tuple[str, str]]]:
        """The specs still submittable now (call under `claim()`), and the others' states."""
        states = status.sweep_states(self.sweep_dir, [s.run_id for s in specs], self.runs_root)
        keep, skipped = [], []
        for spec, st in zip(specs, states, strict=True):
            if st.state in status.SUBMITTABLE:
                keep.append(spec)
                continue
            skipped.append((spec.run_id, st.state))
            where = "cancelled in this sweep" if st.state == "cancelled" else "elsewhere"
            print(
                f"{spec.run_id} {_describe(spec)}: skipped, {st.state} {where} "
                f"({st.detail or st.job_id})",
                file=out,
                flush=True,
            )
        return keep, skipped

    def submit(self, specs: Iterable[RunSpec], out=sys.stderr) -> Submitted:
        specs = list(specs)
        if not specs:
            return Submitted(job_ids=(), batch_calls=0)
        _export_pythonpath()
        return self._submit(specs, out)

    def _submit(self, specs: list[RunSpec], out) -> Submitted:
        raise NotImplementedError

    def run_dir(self, spec: RunSpec) -> Path:
        return rundir.run_dir(self.sweep_dir, spec.run_id)


def slurm_job_options(options: RunOptions, rc: ResourceClass) -> RunOptions:
    """The options a SLURM job of class `rc` trains with: a GPU job that finds no usable GPU
    must fail, not train on the node's CPU (the dry run's `dry_run_show` prints these)."""
    if rc.gpus_per_node and options.device == "auto":
        return replace(options, device="cuda")
    return options


def local_job_options(options: RunOptions, cfg: LocalSettings, gpus_per_run: int) -> RunOptions:
    """The options a local job trains with: on its own GPU where it gets one (a job that cannot
    use it fails instead of training on the CPU), with `threads_per_run` torch threads."""
    if gpus_per_run and options.device == "auto":
        options = replace(options, device="cuda")
    if cfg.threads_per_run:
        options = replace(options, num_threads=int(cfg.threads_per_run))
    return options


class SlurmLauncher(Launcher):
    """Job arrays per resource class via submitit; returns at once with the job ids."""

    def plan(self, specs: Sequence[RunSpec]) -> int:
        return len(self._chunks(specs, self.settings.max_array_size or 1001))

    def _chunks(self, specs: Sequence[RunSpec], max_array: int) -> list[ArrayChunk]:
        return plan_arrays(specs, self.resources, int(max_array), self.options.micro_batch_size)

    def _submit(self, specs: list[RunSpec], out) -> Submitted:
        with self.claim():
            specs, skipped = self.recheck(specs, out)
            sub = self._submit_arrays(specs) if specs else Submitted(job_ids=(), batch_calls=0)
        return replace(sub, run_ids=tuple(s.run_id for s in specs), skipped=tuple(skipped))

    def _submit_arrays(self, specs: list[RunSpec]) -> Submitted:
        lc = asdict(self.settings)
        by_id = {s.run_id: s for s in specs}
        job_ids: list[str] = []
        chunks = self._chunks(specs, self.settings.max_array_size or cluster_max_array_size())
        # the jobs run a copy of the code as it is now, not the checkout when they start
        code = provenance.snapshot(
            self.sweep_dir / rundir.CODE, provenance.code_root(), self.allow_dirty
        )
        job_path = snapshot_pythonpath(code, provenance.code_root())
        # the jobs' working directory is the snapshot: a relative data root means the
        # submitting directory's
        options = replace(self.options, data_root=Path(self.options.data_root).resolve())
        for chunk in chunks:
            ex = submitit.AutoExecutor(
                folder=self.sweep_dir / "logs",
                cluster="slurm",
                # a run chained over `segments` jobs is requeued at each but the last limit
                slurm_max_num_timeout=int(self.settings.max_num_timeout)
                + chunk.resources.segments
                - 1,
            )
            params = run_in_snapshot(slurm_parameters(chunk.resources, lc), code, job_path)
            ex.update_parameters(name=f"steplaw_{self.sweep_dir.name}", **params)
            todo = [by_id[r] for r in chunk.run_ids]
            dirs = [str(self.run_dir(s)) for s in todo]
            opts = slurm_job_options(options, chunk.resources)
            jobs = ex.map_array(RunJob(), todo, dirs, [opts] * len(dirs))
            for spec, job in zip(todo, jobs, strict=True):
                record_attempt(
                    self.run_dir(spec),
                    {
                        "executor": "slurm",
                        "job_id": job.job_id,
                        "resources": chunk.resources.label(),
                        "code": str(code),
                        "stdout": str(job.paths.stdout),
                        "stderr": str(job.paths.stderr),
                    },
                )
                job_ids.append(job.job_id)
        return Submitted(job_ids=tuple(job_ids), batch_calls=len(chunks), code=code)


def run_in_snapshot(params: Mapping[str, Any], code: Path, pythonpath: str) -> dict[str, Any]:
    """submitit parameters that make a job import the snapshot `code`, never the checkout.

    The job runs `python -m submitit.core._submit`, so its sys.path starts with its working
    directory, which sbatch sets to the submitting directory (the checkout) unless told
    otherwise; PYTHONPATH comes next, then site-packages, where an editable install points at
    the checkout too. So: `--chdir` to the snapshot, and PYTHONPATH starting with it, set in
    the script's setup lines. Both live in the sbatch script, which a requeue runs again: a
    requeued job runs the same snapshot."""
    extra = dict(params.get("slurm_additional_parameters") or {})
    if "chdir" in extra:
        raise SpecError(
            "launcher.additional.chdir",
            "is set by the SLURM launcher (jobs run in their code snapshot); remove it",
        )
    extra["chdir"] = str(code)
    setup = [f"export PYTHONPATH={shlex.quote(pythonpath)}", *(params.get("slurm_setup") or [])]
    return {**params, "slurm_additional_parameters": extra, "slurm_setup": setup}


def snapshot_pythonpath(code: Path, live_root: Path, current: str | None = None) -> str:
    """The jobs' PYTHONPATH: the snapshot first, then this process's entries without the
    checkout the snapshot was copied from (a module deleted from the code must stay deleted)."""
    current = os.environ.get("PYTHONPATH", "") if current is None else current
    live = Path(live_root).resolve()
    rest = [p for p in current.split(os.pathsep) if p and Path(p).resolve() != live]
    return os.pathsep.join([str(code), *[p for p in rest if p != str(code)]])


def _describe(spec: RunSpec) -> str:
    return f"{spec.model.name} D={spec.D:.3g} lr={spec.train.lr:.4g} bs={spec.train.batch_size}"


def _finish(run_dir: Path, job: submitit.Job) -> str | None:
    """Record how a local/debug job ended; return the one-line error or None.

    A job that raised is "failed" with its exception line (not submitit's header). A job whose
    process ended without a result — stopped on a signal after checkpointing, or killed — is
    "preempted": it resumes from its checkpoints, so it is not a failure.
    """
    err = job.exception()
    if err is None:
        record_attempt(
            run_dir, {"state": "done", "ended": time.time()}, update_last=True, job_id=job.job_id
        )
        return None
    text = f"{type(err).__name__}: {err}"
    preempted = isinstance(err, submitit.core.utils.UncompletedJobError) and not isinstance(
        err, submitit.core.utils.FailedJobError
    )
    summary = failure_summary(text, job.paths.stderr, preempted)
    record_attempt(
        run_dir,
        {
            "state": "preempted" if preempted else "failed",
            "error": summary,
            "trace": text[-4000:],
            "ended": time.time(),
        },
        update_last=True,
        job_id=job.job_id,
    )
    return summary


def failure_summary(text: str, stderr: Path | None = None, preempted: bool = False) -> str:
    """One line saying what failed: the trainer's exception line, not submitit's header.

    submitit's text is `FailedJobError: Job (task=0) failed during processing with trace:`
    followed by the traceback; the line that says something is the traceback's last one. A
    process that ended without a result has no traceback: the last line of its log says more.
    """
    parts = re.split(r"^-{10,}$", text, flags=re.M)  # header / trace / "check full logs at"
    trace = parts[1] if len(parts) >= 3 else text
    lines = [ln.strip() for ln in trace.splitlines() if ln.strip()]
    if preempted:
        tail = _last_log_line(stderr)
        return "ended without a result (killed or stopped on a signal; resumes from its " + (
            f"checkpoints); log: {tail}" if tail else "checkpoints)"
        )
    body = [ln for ln in lines if not ln.startswith(("Traceback", "File ", "^", "~"))]
    return (body[-1] if body else text.strip().splitlines()[0] if text.strip() else "unknown")[:500]


def _last_log_line(path: Path | None) -> str:
    if path is None or not Path(path).exists():
        return ""
    try:
        lines = Path(path).read_text(errors="replace").strip().splitlines()
    except OSError:
        return ""
    return lines[-1].strip()[:300] if lines else ""


# ---- local GPUs (pure helpers + the two probes they need) -------------------------------------
def local_gpu_ids(device_count: int, cuda_visible: str | None) -> tuple[int, ...]:
    """Physical GPU indices this process may hand to local jobs (what CUDA_VISIBLE_DEVICES of a
    child must name): the parent's own CUDA_VISIBLE_DEVICES list if set, else 0..count-1."""
    if cuda_visible is None:
        return tuple(range(device_count))
    names = [x.strip() for x in cuda_visible.split(",") if x.strip()]
    if not all(x.isdigit() for x in names):
        raise SpecError(
            "launcher.gpus_per_run",
            f"CUDA_VISIBLE_DEVICES={cuda_visible!r} is not a list of indices; the local "
            "launcher hands out GPUs by index (set indices, or launcher.gpus_per_run=0)",
        )
    return tuple(int(x) for x in names[:device_count])


def gpus_per_local_run(setting: Any, gpu_ids: Sequence[int], gpus_on_host: int) -> int:
    """0 (CPU runs) or 1 (one GPU each). `auto`: 1 when this process sees a GPU.

    Fails loudly when the host has NVIDIA GPUs that torch cannot use (a CPU build of torch, a
    broken driver): `launcher=auto` picks local wherever sbatch is missing, and such a box would
    otherwise train every run on one CPU thread in fp32. `gpus_per_run=0` is the explicit way to
    train on CPU there.
    """
    if setting in (None, "auto"):
        if not gpu_ids and gpus_on_host > 0:
            raise SpecError(
                "launcher.gpus_per_run",
                f"this host has {gpus_on_host} NVIDIA GPU(s) but torch sees none "
                "(CPU build of torch, or a driver problem); fix the CUDA setup, or set "
                "launcher.gpus_per_run=0 to train on CPU",
            )
        return 1 if gpu_ids else 0
    if setting not in (0, 1):
        raise SpecError(
            "launcher.gpus_per_run",
            f"must be auto, 0 or 1 (local runs are single-process), got {setting!r}",
        )
    if setting == 1 and not gpu_ids:
        raise SpecError("launcher.gpus_per_run", "is 1 but torch sees no GPU on this host")
    return int(setting)


def host_gpu_count() -> int:
    """NVIDIA GPUs the kernel driver reports, independent of torch (0 without the driver)."""
    root = Path("/proc/driver/nvidia/gpus")
    return len(list(root.iterdir())) if root.is_dir() else 0


def torch_gpu_ids() -> tuple[int, ...]:
    import torch

    n = torch.cuda.device_count() if torch.cuda.is_available() else 0
    return local_gpu_ids(n, os.environ.get("CUDA_VISIBLE_DEVICES"))


def local_job_parameters(timeout_min: int, gpu: int | None) -> dict[str, Any]:
    """submitit LocalExecutor parameters: it sets the job's CUDA_VISIBLE_DEVICES from
    gpus_per_node/visible_gpus (to "" when gpus_per_node is 0, hiding every GPU)."""
    params: dict[str, Any] = {"timeout_min": timeout_min}
    if gpu is not None:
        params.update(gpus_per_node=1, visible_gpus=(gpu,))
    return params


class LocalLauncher(Launcher):
    """On this machine, `parallelism` processes at a time; blocks until all end.

    On a GPU host each run gets one GPU of its own: a run starts on the lowest-numbered free GPU
    (round robin over the visible devices as runs finish), at most one run per GPU, and with
    `options.device = "cuda"` so that a job that cannot use its GPU fails instead of training
    on the CPU.
    """

    def _submit(self, specs: list[RunSpec], out) -> Submitted:
        cfg: LocalSettings = self.settings
        if cfg.parallelism < 1:
            raise SpecError("launcher.parallelism", f"must be >= 1, got {cfg.parallelism}")
        options = self.options
        parallelism = cfg.parallelism
        gpu_ids = torch_gpu_ids()
        per_run = gpus_per_local_run(cfg.gpus_per_run, gpu_ids, host_gpu_count())
        if per_run:
            parallelism = min(parallelism, len(gpu_ids))
        options = local_job_options(options, cfg, per_run)
        if cfg.threads_per_run:
            os.environ.setdefault("OMP_NUM_THREADS", str(cfg.threads_per_run))
        todo = deque(specs)
        running: dict[submitit.Job, tuple[RunSpec, int | None]] = {}
        job_ids, failed, started, skipped = [], [], [], []
        start, n_done = time.time(), 0
        while todo or running:
            while todo and len(running) < parallelism:
                spec = todo.popleft()
                busy = {g for _, g in running.values()}
                gpu = next(g for g in gpu_ids if g not in busy) if per_run else None
                with self.claim():  # only around starting this one run
                    keep, gone = self.recheck([spec], out)
                    if not keep:
                        skipped += gone
                        n_done += 1
                        continue
                    ex = submitit.LocalExecutor(folder=self.sweep_dir / "logs")
                    ex.update_parameters(**local_job_parameters(int(cfg.timeout_min), gpu))
                    job = ex.submit(RunJob(), spec, str(self.run_dir(spec)), options)
                    record_attempt(
                        self.run_dir(spec),
                        {
                            "executor": "local",
                            "job_id": job.job_id,
                            "pid": int(job.job_id),
                            "pid_start": process_start_time(int(job.job_id)),
                            "host": status.this_host(),
                            "gpu": gpu,
                            "stdout": str(job.paths.stdout),
                            "stderr": str(job.paths.stderr),
                        },
                    )
                started.append(spec.run_id)
                job_ids.append(job.job_id)
                running[job] = (spec, gpu)
            time.sleep(0.2)
            for job in [j for j in running if j.done()]:
                spec, _ = running.pop(job)
                err = _finish(self.run_dir(spec), job)
                n_done += 1
                cancelled = bool(err) and spec.run_id in rundir.read_cancelled(self.sweep_dir)
                if err and not cancelled:
                    failed.append(spec.run_id)
                elapsed = time.time() - start
                eta = elapsed / n_done * (len(specs) - n_done)
                word = f"FAILED {err[:300]}" if err else "done"
                word = (
                    "cancelled (resumes from its checkpoints after `cancel --undo`)"
                    if cancelled
                    else word
                )
                print(
                    f"[{n_done}/{len(specs)}] {spec.run_id} {_describe(spec)}: {word} "
                    f"(elapsed {elapsed:.0f}s, eta {eta:.0f}s)",
                    file=out,
                    flush=True,
                )
        return Submitted(
            job_ids=tuple(job_ids),
            batch_calls=0,
            failed=tuple(failed),
            run_ids=tuple(started),
            skipped=tuple(skipped),
        )


class DebugLauncher(Launcher):
    """In this process, one run after another (breakpoints work; pdb only if launcher.pdb)."""

    def _submit(self, specs: list[RunSpec], out) -> Submitted:
        ex = submitit.DebugExecutor(folder=self.sweep_dir / "logs")
        job_ids, failed, started, skipped = [], [], [], []
        for i, spec in enumerate(specs, 1):
            run_dir = self.run_dir(spec)
            with self.claim():
                keep, gone = self.recheck([spec], out)
                if not keep:
                    skipped += gone
                    continue
                # the debug job runs when its result is asked for (_finish), after the claim
                job = ex.submit(RunJob(), spec, str(run_dir), self.options)
                record_attempt(
                    run_dir,
                    {
                        "executor": "debug",
                        "job_id": job.job_id,
                        "pid": os.getpid(),
                        "pid_start": process_start_time(os.getpid()),
                        "host": status.this_host(),
                        "stdout": str(job.paths.stdout),
                        "stderr": str(job.paths.stderr),
                    },
                )
            started.append(spec.run_id)
            job_ids.append(job.job_id)
            if self.settings.pdb:
                job.result()  # submitit's DebugJob drops into pdb on failure
            err = _finish(run_dir, job)
            if err:
                failed.append(spec.run_id)
                job.paths.stderr.parent.mkdir(parents=True, exist_ok=True)
                with open(job.paths.stderr, "a") as f:
                    f.write(err + "\n")
            print(
                f"[{i}/{len(specs)}] {spec.run_id} {_describe(spec)}: "
                f"{'FAILED ' + err if err else 'done'}",
                file=out,
                flush=True,
            )
        return Submitted(
            job_ids=tuple(job_ids),
            batch_calls=0,
            failed=tuple(failed),
            run_ids=tuple(started),
            skipped=tuple(skipped),
        )


LAUNCHER_CLASSES: dict[str, type[Launcher]] = {
    "slurm": SlurmLauncher,
    "local": LocalLauncher,
    "debug": DebugLauncher,
}


def build_launcher(
    section: Mapping[str, Any] | None,
    sweep_dir: Path,
    options: RunOptions,
    resources: ResourceModel,
    runs_root: Path | None = None,
    allow_dirty: bool = False,
) -> Launcher:
    """The launcher the `launcher:` section asks for (auto resolved), validated. `runs_root`:
    the run store whose claim lock guards submissions (None: the sweep's own runs/).
    `allow_dirty`: the SLURM launcher snapshots and submits a checkout with uncommitted changes."""
    name, settings = launcher_settings(section)
    cls = LAUNCHER_CLASSES[name]
    if name == "slurm":  # never ask for more time than the partition / QOS allows
        from launch import slurm_info

        resources = slurm_info.with_cluster_limits(resources, asdict(settings))
    return cls(
        name,
        settings,
        Path(sweep_dir),
        options,
        resources,
        blocking=cls is not SlurmLauncher,
        runs_root=Path(runs_root) if runs_root is not None else None,
        allow_dirty=allow_dirty,
    )


def _export_pythonpath() -> None:
    """Jobs import steplaw_train even when it is run from a checkout rather than installed.
    (Local and debug jobs run this live checkout; SLURM jobs put their snapshot first:
    run_in_snapshot.)"""
    root = str(Path(__file__).resolve().parents[1])
    parts = [p for p in os.environ.get("PYTHONPATH", "").split(os.pathsep) if p]
    if root not in parts:
        os.environ["PYTHONPATH"] = os.pathsep.join([root, *parts])
