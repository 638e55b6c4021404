"""Generated data with a known answer: run directories and MoE-release-format tables.

For tests, the collection and replay benchmarks and notebook 02 when no real sweep is at hand.
The losses come from a known landscape in (ln lr, ln bs) whose optimum follows a given law, so a
test can check that the analysis (or the search) finds what was put in. Nothing here trains.

`moe_release` writes what the authors' MoE release looks like (README of the reference data:
4 shapes × D ∈ {2B, 4B, 8B, 20B}, small LR × BS grids of ~45 runs, measured `total_time`) over
bowls whose shape, offset from the law, noise, holes and position in the grid are drawn per
family: the held-out scenarios of benchmarks/bench_replay.py.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pandas as pd

from steplaw_train import atomic, rundir
from steplaw_train.spec import DataSpec, ModelSpec, RunSpec, TrainSpec
from steplaw_train.steplaw import PAPER

DEMO_LRS = tuple(float(v) for v in 2.0 ** np.arange(-11, -4.5, 0.5))


def make_spec(hidden: int, layers: int, lr: float, bs: int, tokens: int, seq_len: int = 128,
              seed: int = 1234, recipe: str = "demo") -> RunSpec:  # fmt: skip
    model = ModelSpec(name=f"h{hidden}_l{layers}", hidden=hidden, ffn_hidden=hidden * 8 // 3,
                      heads=4, layers=layers)  # fmt: skip
    data = DataSpec(recipe=recipe, sources=((recipe, 1.0),), tokenizer="byte", vocab_size=256)
    train = TrainSpec(lr=lr, batch_size=bs, tokens=tokens, seq_len=seq_len, seed=seed)
    return RunSpec(model=model, data=data, train=train)


def landscape(spec: RunSpec, lr_law=PAPER.lr, bs_law=PAPER.bs_tokens) -> float:
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
    rundir.write_spec(d, spec)
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
    atomic.write_text(rundir.metrics_path(d), "\n".join(lines) + "\n")
    if result:
        res = {"run_id": spec.run_id, "status": status, "final_loss": float(losses[-1]),
               "smooth_loss": math.inf if status == "diverged" else float(final),
               "steps": int(steps[-1]) if len(steps) else 0, "planned_steps": planned,
               "tokens": int(last) * spec.tokens_per_step, "wall_time_s": 1.0,
               "versions": {}, "device": "cpu", "precision": "fp32"}  # fmt: skip
        if status == "diverged":
            res["reason"] = "loss is nan"
        rundir.write_result(d, res)
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


# ---- MoE-release-format tables ------------------------------------------------------------------
# The four released MoE shapes (reference data README): experts, top-k, moeh, sed, N, Na, M.
MOE_SHAPES = (
    (89, 1, 352, 352, 2_150_612_992, 187_973_632, 1_681_489_920),
    (88, 2, 352, 704, 2_150_612_992, 232_579_072, 1_949_122_560),
    (8, 1, 3528, 3528, 2_155_174_912, 590_436_352, 4_096_266_240),
    (8, 3, 2888, 8664, 2_156_188_672, 1_241_270_272, 8_001_269_760),
)
MOE_D = (2e9, 4e9, 8e9, 20e9)
BOWLS = ("quadratic", "asymmetric", "valley", "flat")
H0 = np.array([[0.013, -0.005], [-0.005, 0.012]])  # curvature measured on the dense release


def bowl_value(u: np.ndarray, kind: str, h: np.ndarray) -> np.ndarray:
    """Relative excess loss at offsets u = (ln lr, ln bs) − optimum, for one bowl shape.

    quadratic: ½uᵀHu. asymmetric: steeper on the high-lr side (where runs diverge).
    valley: a long diagonal valley (lr and bs trade off). flat: a flat bottom, steep walls.
    """
    q = 0.5 * np.einsum("ij,jk,ik->i", u, h, u)
    if kind == "quadratic":
        return q
    if kind == "asymmetric":
        return q * (1 + 0.6 * np.tanh(2 * u[:, 0]))
    if kind == "valley":
        c = 0.85 * math.sqrt(h[0, 0] * h[1, 1])
        hv = np.array([[h[0, 0], -c], [-c, h[1, 1]]])
        return 0.5 * np.einsum("ij,jk,ik->i", u, hv, u)
    if kind == "flat":
        return 0.6 * q + 0.4 * q**2 / 0.002
    raise ValueError(f"kind: {kind!r} (allowed: {', '.join(BOWLS)})")


def moe_release(
    seed: int,
    follows: str = "Na",
    bowls: tuple[str, ...] = ("quadratic",),
    offset_permille: tuple[float, float] = (1.0, 3.0),
    noise: float = 0.0,
    drop: float = 0.0,
    edge: bool = False,
    lr_points: int = 9,
    bs_points: int = 5,
    flatten: float = 0.0,
) -> pd.DataFrame:
    """A MoE-release-format table: 16 cells (MOE_SHAPES × MOE_D), `lr_points` × `bs_points`
    grids (√2 apart in lr, ×2 in bs), less a `drop` fraction of points.

    Each shape is a family: its optima follow Step Law in `follows` (N or Na) moved by one
    family offset that puts the law's point `offset_permille` (drawn in that range) above the
    optimum; its bowl shape is drawn from `bowls`, its curvature scaled ×0.6–1.6. A cell's grid
    window is placed around its optimum at random (with `edge`, the optimum is one of the
    window's outer rows or columns). Losses get relative `noise`; `total_time` and
    `average_iter_time` follow the FLOPs per token M with a small-batch inefficiency. With
    `flatten` > 0 the bowl flattens with D: curvature × (D / 2B) ** −flatten (the released dense
    cells' full-grid fits fall about as D^−0.2); the law's point stays `offset_permille` above
    the optimum at the smallest D, so it sits closer (in loss) at larger D.
    """
    if follows not in ("N", "Na"):
        raise ValueError(f"follows: {follows!r} (allowed: N, Na)")
    rng = np.random.default_rng(seed)
    rows = []
    for nume, topk, moeh, sed, n, na, m in MOE_SHAPES:
        kind = str(rng.choice(bowls))
        h = H0 * rng.uniform(0.6, 1.6)
        off = rng.uniform(*offset_permille) / 1000
        ang = rng.uniform(0, 2 * math.pi)
        direction = np.array([math.cos(ang), math.sin(ang)])
        scale = math.sqrt(off / float(bowl_value(direction[None, :], kind, h)[0]))
        delta = direction * scale  # the law's point sits `off` above this family's optimum
        h_family = h
        for d in MOE_D:
            h = h_family * (d / MOE_D[0]) ** -flatten
            lr_law, bs_law = PAPER.predict(n if follows == "N" else na, d)
            opt = np.array([math.log(lr_law), math.log(bs_law)]) - delta
            steps = np.array([math.log(2) / 2, math.log(2)])
            if edge:
                pos = np.array([rng.choice([0, lr_points - 1]), rng.integers(0, bs_points)])
                if rng.random() < 0.5:
                    pos = np.array([rng.integers(0, lr_points), rng.choice([0, bs_points - 1])])
            else:
                pos = np.array([rng.integers(2, lr_points - 2), rng.integers(1, bs_points - 1)])
            start = opt - (pos + rng.uniform(-0.5, 0.5, 2)) * steps
            lrs = np.exp(start[0] + steps[0] * np.arange(lr_points))
            bss = np.maximum(1, np.round(np.exp(start[1] + steps[1] * np.arange(bs_points)) / 2048))
            base = 1.6 + 18.0 * na**-0.15 + 40.0 * d**-0.15
            for lr in lrs:
                for bs in np.unique(bss):
                    if drop and rng.random() < drop:
                        continue
                    u = np.array([[math.log(lr) - opt[0], math.log(bs * 2048) - opt[1]]])
                    loss = base * math.exp(float(bowl_value(u, kind, h)[0]))
                    loss *= 1 + noise * rng.standard_normal()
                    ti = int(d / (bs * 2048))
                    it_time = m * bs * 2048 / 4e14 * (1 + 8 / bs) * rng.uniform(0.97, 1.03)
                    rows.append({
                        "seq_len": 2048, "topk": topk, "nume": nume, "moeh": moeh, "sed": sed,
                        "h": 1408, "ffnh": 3904, "numh": 11, "numl": 16,
                        "lr": float(f"{lr:.4g}"), "bs": int(bs), "ti": ti,
                        "loss": loss * (1 + 0.004 * rng.standard_normal()), "smooth loss": loss,
                        "average_iter_time": it_time, "target_iter": -1, "final_iter": ti,
                        "exp_name": f"moe_e{nume}_k{topk}_D{d:.0e}_lr{lr:.3e}_bs{int(bs)}",
                        "moe_layer_enum_type": "1dense", "mfa_version": 0, "numld": 1,
                        "Nattn": 16 * 4 * 1408**2, "N": n, "Na": na, "M": m, "kvcache": 0,
                        "D": d, "D/N": d / n, "total_time": it_time * ti, "Na/N": na / n,
                        "moe_name": f"e{nume}k{topk}",
                    })  # fmt: skip
    return pd.DataFrame(rows)
