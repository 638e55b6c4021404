"""Generated run directories that follow the run-directory contract (docs/design.md).

For tests, the collection benchmark and notebook 02 when no real sweep is at hand. The losses
come from a known bowl-shaped landscape in (ln lr, ln bs) whose optimum follows a given law,
so a test can check that the analysis finds what was put in. Nothing here trains a model.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np

from steplaw_train import atomic
from steplaw_train.spec import DataSpec, ModelSpec, RunSpec, TrainSpec

DEMO_LRS = tuple(float(v) for v in 2.0 ** np.arange(-11, -4.5, 0.5))


def make_spec(hidden: int, layers: int, lr: float, bs: int, tokens: int, seq_len: int = 128,
              seed: int = 1234, recipe: str = "demo") -> RunSpec:  # fmt: skip
    model = ModelSpec(name=f"h{hidden}_l{layers}", hidden=hidden, ffn_hidden=hidden * 8 // 3,
                      heads=4, layers=layers)  # fmt: skip
    data = DataSpec(recipe=recipe, sources=((recipe, 1.0),), tokenizer="byte", vocab_size=256)
    train = TrainSpec(lr=lr, batch_size=bs, tokens=tokens, seq_len=seq_len, seed=seed)
    return RunSpec(model=model, data=data, train=train)


def landscape(spec: RunSpec, lr_law=lambda N, D: 1.79 * N**-0.713 * D**0.307,
              bs_law=lambda D: 0.58 * D**0.571) -> float:  # fmt: skip
    """Final loss of a bowl whose minimum sits at the given laws' (lr, bs_tokens)."""
    N, D = spec.N, spec.D
    base = 2.0 + 40.0 * N**-0.25 + 60.0 * D**-0.25
    dx = math.log(spec.train.lr / lr_law(N, D))
    dy = math.log(spec.tokens_per_step / bs_law(D))
    return base * (1 + 0.01 * dx * dx + 0.004 * dy * dy + 0.002 * dx * dy)


def loss_curve(
    final: float, steps: int, rng: np.random.Generator, noise: float = 0.002
) -> np.ndarray:
    t = np.arange(1, steps + 1)
    return (
        final
        * (1 + 2.0 * np.exp(-t / max(1, steps / 8)))
        * (1 + noise * rng.standard_normal(steps))
    )


def write_run(root: Path, spec: RunSpec, final: float, *, rng: np.random.Generator,
              status: str = "done", stop_at: int | None = None, max_points: int = 200,
              result: bool = True) -> Path:  # fmt: skip
    """One run directory: spec.json, metrics.jsonl, result.json (unless `result` is False)."""
    d = root / spec.run_id
    d.mkdir(parents=True, exist_ok=True)
    atomic.write_text(
        d / "spec.json", json.dumps({"spec": spec.to_dict(), "derived": spec.derived()})
    )
    planned = spec.iterations
    last = planned if stop_at is None else stop_at
    interval = max(1, planned // max_points)
    steps = np.unique(np.append(np.arange(interval, last + 1, interval), last))
    steps = steps[steps > 0]
    losses = loss_curve(final, planned, rng)[steps - 1]
    if status == "diverged":
        losses[len(losses) // 2 :] = np.nan
    lines = [json.dumps({"step": int(s), "tokens": int(s) * spec.tokens_per_step, "loss": float(v),
                         "lr": spec.train.lr, "grad_norm": 1.0, "tokens_per_s": 1e4,
                         "elapsed_s": float(s) * 0.01}) for s, v in zip(steps, losses, strict=True)]  # fmt: skip
    (d / "metrics.jsonl").write_text("\n".join(lines) + "\n")
    if result:
        res = {"run_id": spec.run_id, "status": status, "final_loss": float(losses[-1]),
               "smooth_loss": math.inf if status == "diverged" else float(final),
               "steps": int(steps[-1]) if len(steps) else 0, "planned_steps": planned,
               "tokens": int(last) * spec.tokens_per_step, "wall_time_s": 1.0,
               "versions": {}, "device": "cpu", "precision": "fp32"}  # fmt: skip
        if status == "diverged":
            res["reason"] = "loss is nan"
        atomic.write_text(d / "result.json", json.dumps(res))
    return d


def make_sweep(root: str | Path, shapes=((64, 2), (96, 3)), tokens=(200_000, 400_000, 800_000),
               lrs=DEMO_LRS, bss=(2, 4, 8, 16, 32),
               seq_len: int = 128, seed: int = 0, max_points: int = 200) -> Path:  # fmt: skip
    """A full grid of generated runs: every shape × tokens × lr × bs, finished and smooth."""
    root = Path(root)
    rng = np.random.default_rng(seed)
    for h, layers in shapes:
        for D in tokens:
            for lr in lrs:
                for bs in bss:
                    spec = make_spec(h, layers, float(lr), int(bs), int(D), seq_len)
                    write_run(root, spec, landscape(spec), rng=rng, max_points=max_points)
    return root
