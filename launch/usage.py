"""What runs have used and how fast they ran: device-hours spent and left, and the MFU that
finished runs measured, calibrating the assumed `resources.mfu` (launch/resources.py).

Units. A sweep's device-hours are in the unit of its estimate: GPU-hours where
`resources.gpus_per_node > 0`, CPU-core-hours for CPU-only sweeps (as the dry-run table). A run's
devices are its data-parallel ranks (spec.json's `data_parallel`, written by the trainer; the
planned resource class before it starts), times its threads for CPU runs (result.json's
`device`, "cpu (N threads)"; the class's CPUs per task before that).

Spent = the trainer's wall clock x devices: result.json `wall_time_s` for finished runs, the last
metrics line's `elapsed_s` for the others (running, preempted, failed). Both accumulate across
resumes and leave out queueing and start-up before the first step. Remaining = the run's
estimated device-hours at the calibrated MFU x the fraction of its tokens not yet trained, for
runs that will still run (pending, queued, running, preempted, failed); a state this module
does not know (e.g. one a later launcher adds) plans nothing further.

Calibration. A finished run's MFU = tokens / wall_time_s x flops.run_flops_per_token(spec) /
(peak x devices), the trainer's own definition (flops.py). Only runs of the estimate's device
class count: for a GPU estimate, GPU runs whose device flops.py knows (MFU relative to that
device's peak, applied to `resources.peak_tflops`); for a CPU estimate, CPU runs (relative to
`resources.peak_tflops` per core). CPU runs never calibrate a GPU estimate, nor the reverse.
Per model (its exact shape), log MFU is normal around the model's mean; model means scatter
around a sweep-wide mean (sd `between`); the sweep-wide mean's prior is the assumed
`resources.mfu` with sd `resources.mfu_prior_sd` (log). The scatters are estimated from the runs,
shrunk toward defaults by two pseudo-observations, so one run moves the estimate but does not
make it certain. A model never measured gets the sweep-wide posterior widened by `between`.
Intervals are 90% (+-1.645 sd in log MFU).
"""

from __future__ import annotations

import math
import os
import re
from collections import defaultdict
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from launch.resources import ResourceModel, device_hours, resource_class
from steplaw_train import flops, rundir
from steplaw_train.spec import ModelSpec, RunSpec

Z90 = 1.645  # two-sided 90% interval of a normal
WITHIN_SD0 = 0.2  # default scatter of log MFU between runs of one model (before any)
BETWEEN_SD0 = 0.15  # default scatter of the model means around the sweep-wide mean
PSEUDO = 2.0  # weight, in observations, of those defaults
# states whose runs will still train (what "remaining" counts)
WILL_RUN = ("pending", "queued", "running", "preempted", "failed")
FINISHED = ("done", "diverged")
_THREADS = re.compile(r"cpu \((\d+) threads?\)")


# ---- one run -----------------------------------------------------------------------------------
@dataclass(frozen=True)
class RunUsage:
    """How far one run got and what it used (None where a record is missing)."""

    run_id: str
    spec: RunSpec | None
    steps: int  # optimizer steps done
    planned_steps: int | None
    tokens: float  # tokens trained
    planned_tokens: float | None  # D
    wall_s: float  # the trainer's clock, summed over attempts
    devices: int  # GPUs, or CPU cores (module docstring)
    mfu: float | None  # measured, finished runs of the estimate's device class only

    @property
    def fraction(self) -> float:
        """Share of the planned tokens trained (0 when unknown)."""
        if not self.planned_tokens:
            return 0.0
        return min(1.0, max(0.0, self.tokens / self.planned_tokens))

    @property
    def hours_spent(self) -> float:
        return self.wall_s * self.devices / 3600.0


def _spec(run_dir: Path) -> tuple[RunSpec | None, dict[str, Any]]:
    try:
        doc = rundir.read_spec(run_dir)
        return (
            (RunSpec.from_dict(doc["spec"]), dict(doc.get("derived") or {}))
            if doc
            else (
                None,
                {},
            )
        )
    except (rundir.CorruptRecord, KeyError, TypeError, ValueError):
        return None, {}


def _num(value: Any, default: float = 0.0) -> float:
    try:
        v = float(value)
    except (TypeError, ValueError):
        return default
    return v if math.isfinite(v) else default


def _devices(
    spec: RunSpec | None, derived: Mapping[str, Any], device: str | None, rm: ResourceModel
) -> int:
    rc = resource_class(spec, rm) if spec is not None else None
    ranks = int(_num(derived.get("data_parallel"), 0)) or (rc.data_parallel if rc else 1)
    if rm.gpus_per_node:
        return ranks
    m = _THREADS.fullmatch(device or "")
    if m:
        return ranks * int(m.group(1))
    per_task = max(1, rc.cpus_per_task // rc.tasks_per_node) if rc else 1
    return ranks * per_task


def measured_mfu(
    spec: RunSpec, result: Mapping[str, Any], devices: int, rm: ResourceModel
) -> float | None:
    """The MFU a finished run achieved, in the estimate's device class (None: other class,
    unknown device, or nothing measured)."""
    device = str(result.get("device") or "")
    cpu = device.startswith("cpu")
    if cpu != (rm.gpus_per_node == 0):
        return None
    peak = rm.peak_tflops * 1e12 if cpu else flops.peak_flops(device)
    tokens, wall = _num(result.get("tokens")), _num(result.get("wall_time_s"))
    if not peak or tokens <= 0 or wall <= 0 or devices <= 0:
        return None
    return flops.mfu(tokens / wall, flops.run_flops_per_token(spec), devices, peak)


def run_usage(
    run_dir: Path, run_id: str, state: str, rm: ResourceModel, spec: RunSpec | None = None
) -> RunUsage:
    """Read one run's progress cheaply: spec.json, result.json for finished runs, the last
    metrics line otherwise (rundir.read_last_metrics reads only the file's end)."""
    read, derived = _spec(run_dir)
    spec = spec or read
    result = None
    if state in FINISHED:
        try:
            result = rundir.read_result(run_dir)
        except rundir.CorruptRecord:
            result = None
    device = str(result.get("device")) if result else None
    devices = _devices(spec, derived, device, rm)
    planned_steps = spec.iterations if spec else None
    planned_tokens = float(spec.D) if spec else None
    if result is not None:
        steps = int(_num(result.get("steps")))
        tokens = _num(result.get("tokens"))
        wall = _num(result.get("wall_time_s"))
        planned_steps = int(_num(result.get("planned_steps"), planned_steps or 0)) or None
        mfu = measured_mfu(spec, result, devices, rm) if spec else None
    else:
        last = rundir.read_last_metrics(run_dir) if state != "pending" else None
        last = last or {}
        steps = int(_num(last.get("step")))
        tokens = _num(last.get("tokens"))
        wall = _num(last.get("elapsed_s"))
        mfu = None
    return RunUsage(run_id, spec, steps, planned_steps, tokens, planned_tokens, wall, devices, mfu)


# ---- calibration -------------------------------------------------------------------------------
@dataclass(frozen=True)
class MfuEstimate:
    """Posterior of one model's MFU: its median (exp of the mean log) and a 90% interval."""

    mfu: float
    low: float
    high: float
    runs: int  # finished runs of this model behind it (0: the sweep-wide posterior, widened)

    @classmethod
    def from_log(cls, mean: float, var: float, runs: int) -> MfuEstimate:
        sd = math.sqrt(max(var, 0.0))
        return cls(math.exp(mean), math.exp(mean - Z90 * sd), math.exp(mean + Z90 * sd), runs)


@dataclass(frozen=True)
class Calibration:
    """MFU per model shape from finished runs, with the assumed MFU as prior (module docstring)."""

    assumed: float
    kind: str  # "GPU" or "CPU": the device class of the estimate and of the runs used
    runs: int
    per_model: Mapping[ModelSpec, MfuEstimate]
    unmeasured: MfuEstimate

    def estimate(self, model: ModelSpec) -> MfuEstimate:
        return self.per_model.get(model, self.unmeasured)

    def hours(self, spec: RunSpec, rm: ResourceModel) -> tuple[float, float, float]:
        """(estimate, low, high) device-hours of one run at this calibration's MFU."""
        base = device_hours(spec, rm) * rm.mfu  # hours at MFU 1
        e = self.estimate(spec.model)
        return base / e.mfu, base / e.high, base / e.low

    def describe(self) -> str:
        if not self.runs:
            e = self.unmeasured
            return (
                f"MFU {self.assumed:g} assumed, not calibrated (no finished {self.kind} runs; "
                f"90% range {e.low:.2g}-{e.high:.2g})"
            )
        parts = ", ".join(
            f"{m.name} {e.mfu:.2g} [{e.low:.2g}-{e.high:.2g}] n={e.runs}"
            for m, e in sorted(self.per_model.items(), key=lambda kv: kv[0].name)
        )
        return (
            f"MFU calibrated from {self.runs} finished {self.kind} runs of "
            f"{len(self.per_model)} model(s), prior {self.assumed:g}: {parts}; "
            f"other models {self.unmeasured.mfu:.2g} [{self.unmeasured.low:.2g}-"
            f"{self.unmeasured.high:.2g}]"
        )


def calibrate(
    samples: Iterable[tuple[ModelSpec, float]], assumed: float, prior_sd: float, kind: str = "GPU"
) -> Calibration:
    """Posterior MFU per model from (model, measured MFU) pairs; pure (module docstring)."""
    groups: dict[ModelSpec, list[float]] = defaultdict(list)
    for model, mfu in samples:
        if mfu is not None and mfu > 0 and math.isfinite(mfu):
            groups[model].append(math.log(mfu))
    prior = math.log(assumed)
    n = sum(len(v) for v in groups.values())
    k = len(groups)
    means = {m: sum(v) / len(v) for m, v in groups.items()}
    ss = sum((x - means[m]) ** 2 for m, v in groups.items() for x in v)
    within = (ss + PSEUDO * WITHIN_SD0**2) / (n - k + PSEUDO)
    if k >= 2:
        grand = sum(means.values()) / k
        sb = sum((x - grand) ** 2 for x in means.values())
        noise = sum(within / len(v) for v in groups.values()) / k
        raw = max(sb / (k - 1) - noise, 0.0)
        between = (raw * (k - 1) + PSEUDO * BETWEEN_SD0**2) / (k - 1 + PSEUDO)
    else:
        between = BETWEEN_SD0**2
    # the sweep-wide mean: prior + every model's mean (each with its noise and the spread)
    prec0 = 1.0 / prior_sd**2
    acc = prior * prec0
    for m, v in groups.items():
        w = 1.0 / (between + within / len(v))
        prec0 += w
        acc += w * means[m]
    mean0, var0 = acc / prec0, 1.0 / prec0
    per_model = {}
    for m, v in groups.items():
        prec = 1.0 / (var0 + between) + len(v) / within
        mean = (mean0 / (var0 + between) + len(v) * means[m] / within) / prec
        per_model[m] = MfuEstimate.from_log(mean, 1.0 / prec, len(v))
    return Calibration(assumed, kind, n, per_model, MfuEstimate.from_log(mean0, var0 + between, 0))


def calibration_from_usage(usages: Iterable[RunUsage], rm: ResourceModel) -> Calibration:
    """The calibration from runs already read (the status CLI reads every run once)."""
    samples = [(u.spec.model, u.mfu) for u in usages if u.spec is not None and u.mfu is not None]
    return calibrate(samples, rm.mfu, rm.mfu_prior_sd, _kind(rm))


def calibration_from_dir(sweep_dir: Path, rm: ResourceModel) -> Calibration:
    """The calibration from every finished run under `sweep_dir/runs` (any grid it held):
    O(finished runs) file reads; an absent sweep dir calibrates nothing."""
    runs = Path(sweep_dir) / rundir.RUNS
    names = sorted(os.listdir(runs)) if runs.is_dir() else []
    samples: list[tuple[ModelSpec, float]] = []
    for name in names:
        path = rundir.run_dir(sweep_dir, name)
        try:
            result = rundir.read_result(path)
        except rundir.CorruptRecord:
            continue
        if result is None:
            continue
        spec, derived = _spec(path)
        if spec is None:
            continue
        mfu = measured_mfu(spec, result, _devices(spec, derived, result.get("device"), rm), rm)
        if mfu is not None:
            samples.append((spec.model, mfu))
    return calibrate(samples, rm.mfu, rm.mfu_prior_sd, _kind(rm))


def _kind(rm: ResourceModel) -> str:
    return "GPU" if rm.gpus_per_node else "CPU"


def remaining_hours(u: RunUsage, state: str, cal: Calibration, rm: ResourceModel) -> float:
    """Estimated device-hours this run still needs (0 for finished or unknown states)."""
    if state not in WILL_RUN or u.spec is None:
        return 0.0
    return cal.hours(u.spec, rm)[0] * (1.0 - u.fraction)


def usage_of(
    sweep_dir: Path, states: Sequence[tuple[str, str]], rm: ResourceModel
) -> list[RunUsage]:
    """RunUsage of each (run_id, state), through rundir.run_dir (a run dir may be a link)."""
    return [run_usage(rundir.run_dir(sweep_dir, rid), rid, st, rm) for rid, st in states]
