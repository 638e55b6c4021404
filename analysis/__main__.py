"""`python -m analysis report | predict | replay` (thin shell over plain functions)."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path


def _report(args: argparse.Namespace) -> int:
    from analysis import report

    if len(args.source) > 1 and not args.out:
        raise ValueError("report: several sources need --out (one report for all of them)")
    src = Path(args.source[0])
    out = Path(args.out) if args.out else (src if src.is_dir() else src.parent) / "report"
    if not src.is_dir() and not args.out:
        out = Path.cwd() / f"report_{src.stem}"
    given = {
        "threshold": args.threshold, "n_boot": args.n_boot, "seed": args.seed, "n_col": args.n,
        "surface_window": args.surface_window, "min_runs": args.min_runs,
        "laws": tuple(args.law) if args.law else None,
    }  # fmt: skip
    # unset options take report.Settings' defaults: each default is written once, there
    settings = report.Settings(**{k: v for k, v in given.items() if v is not None})
    source = src if len(args.source) == 1 else [Path(s) for s in args.source]
    report.run(source, out, settings, figures=not args.no_figures, quiet=args.quiet,
               valley=args.valley, wandb_project=args.wandb)  # fmt: skip
    return 0


def _predict(args: argparse.Namespace) -> int:
    from analysis.predict import format_prediction, predict

    print(format_prediction(predict(args.N, args.D, args.seq, args.fit)))
    return 0


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m analysis", description=__doc__)
    sub = p.add_subparsers(dest="command", required=True)
    r = sub.add_parser(
        "report",
        help="sweep dir or released CSV -> report directory",
        description="Unset options take analysis.report.Settings' defaults (docs/analysis.md).",
    )
    r.add_argument(
        "source",
        nargs="+",
        help="sweep/runs directories (or a folder holding sweeps and their run store) or the "
        "authors' released CSV; several are one table, each run_id counted once",
    )
    r.add_argument("--out", help="report directory (default: <sweep>/report or ./report_<csv>)")
    r.add_argument("--threshold", type=float, help="plateau: relative gap to the cell minimum")
    r.add_argument("--n-boot", type=int, help="bootstrap resamples")
    r.add_argument("--seed", type=int, help="bootstrap seed")
    r.add_argument(
        "--n",
        choices=("N", "Na"),
        help="which N laws see (MoE: total N or activated Na)",
    )
    r.add_argument(
        "--surface-window",
        type=float,
        help="grid points within this of the minimum enter the quadratic surface",
    )
    r.add_argument("--min-runs", type=int, help="cells with fewer usable runs are skipped")
    r.add_argument("--law", action="append", help="compare only these laws (repeatable)")
    r.add_argument("--no-figures", action="store_true")
    r.add_argument("--valley", action="store_true", help="also the 3-D loss valley per cell")
    r.add_argument(
        "--wandb",
        nargs="?",
        const="steplaw",
        metavar="PROJECT",
        help="also log one job_type=analysis wandb run (offline unless WANDB_MODE=online)",
    )
    r.add_argument("--quiet", action="store_true")
    r.set_defaults(func=_report)
    q = sub.add_parser("predict", help="Step Law lr and bs with bootstrap intervals")
    q.add_argument("--N", type=float, required=True, help="non-embedding parameters")
    q.add_argument("--D", type=float, required=True, help="training tokens")
    q.add_argument("--seq", type=int, default=2048, help="sequence length (for bs in sequences)")
    q.add_argument(
        "--fit", help="report directory (or bootstrap CSV) instead of the published fits"
    )
    q.set_defaults(func=_predict)
    sub.add_parser("replay", help="replay a guided search (analysis.replay)", add_help=False)
    return p


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv and argv[0] == "replay":
        from analysis import replay  # written separately; imported only when asked for

        return int(replay.main(argv[1:]) or 0)
    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except (ValueError, OSError) as e:  # bad input (SpecError is a ValueError) or unreadable
        print(f"error: {str(e).splitlines()[0] if str(e) else type(e).__name__}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
