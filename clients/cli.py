"""``recsys``: one command, thin subcommands over the library.

Exit codes: 0 ok, 1 a failed operation (bad data, failed call), 2 usage errors (argparse).
Heavy modules are imported inside the subcommands so ``recsys --help`` stays instant.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Sequence


def _cmd_synth(args: argparse.Namespace) -> int:
    from dataclasses import replace

    from export.synth import SynthSpec, synthesize

    spec = SynthSpec(users=args.users, items=args.items, ratings=args.ratings, seed=args.seed)
    if args.span_days is not None:
        spec = replace(spec, span_days=args.span_days)
    summary = synthesize(spec, args.out, progress=not args.quiet)
    print(json.dumps(summary, indent=2, default=str))
    return 0


def _train_settings(args: argparse.Namespace):
    from dataclasses import replace

    from export.pipeline import TrainSettings

    settings = TrainSettings()
    tt = settings.two_tower
    if args.epochs is not None:
        tt = replace(tt, epochs=args.epochs)
    tt = replace(tt, seed=args.seed)
    return replace(settings, two_tower=tt, ranker=replace(settings.ranker, seed=args.seed))


def _cmd_train(args: argparse.Namespace) -> int:
    from export.pipeline import train

    manifest = train(args.data, args.out, _train_settings(args), progress=not args.quiet)
    summary = {
        "artifacts": args.out,
        "two_tower_best_epoch": manifest["two_tower"]["best_epoch"],
        "ranker_trees": manifest["ranker"]["trees"],
        "seconds": manifest["seconds"],
        "data_sha256": manifest["data"]["sha256"],
    }
    print(json.dumps(summary, indent=2))
    return 0


def _cmd_evaluate(args: argparse.Namespace) -> int:
    from dataclasses import replace

    from export.evaluate import EvalSettings, comparison_table, evaluate

    settings = replace(EvalSettings(), train=_train_settings(args))
    if args.mmr_lambda is not None:
        settings = replace(settings, mmr_lambda=args.mmr_lambda)
    if args.mmr_pool is not None:
        settings = replace(settings, mmr_pool=args.mmr_pool)
    report = evaluate(args.data, args.out, settings, artifacts_dir=args.artifacts, progress=not args.quiet)
    if args.json:
        print(json.dumps({"protocol": report["protocol"], "models": report["models"], "targets": report["targets"]}, indent=2))
    else:
        print(comparison_table(report))
        print()
        print("targets:", json.dumps(report["targets"], indent=2))
        print(f"report: {args.out} (+ {args.out.rsplit('.', 1)[0]}.png), {report['seconds']['total']:.0f} s")
    return 0


def build_parser() -> argparse.ArgumentParser:
    """The ``recsys`` argument parser."""
    parser = argparse.ArgumentParser(prog="recsys", description="Two-stage movie recommender on NVIDIA Triton.")
    sub = parser.add_subparsers(dest="command", required=True)

    data = sub.add_parser("data", help="data utilities").add_subparsers(dest="data_command", required=True)
    synth = data.add_parser("synth", help="write a synthetic MovieLens-layout data set with planted structure")
    synth.add_argument("--users", type=int, default=200_948)
    synth.add_argument("--items", type=int, default=87_585)
    synth.add_argument("--ratings", type=int, default=32_000_204)
    synth.add_argument("--seed", type=int, default=0)
    synth.add_argument("--span-days", type=int, default=None, help="global activity span in days (default: ML-32M's)")
    synth.add_argument("--out", required=True, help="output folder")
    synth.add_argument("--quiet", action="store_true", help="no progress bars")
    synth.set_defaults(func=_cmd_synth)

    def training_flags(p: argparse.ArgumentParser) -> None:
        p.add_argument("--data", default="data/ml-100k", help="MovieLens CSV folder (default: %(default)s)")
        p.add_argument("--epochs", type=int, default=None, help="max two-tower epochs (early stopping may end sooner)")
        p.add_argument("--seed", type=int, default=0)
        p.add_argument("--quiet", action="store_true", help="no progress bars")

    train = sub.add_parser("train", help="train the two-tower and the ranker, write artifacts")
    training_flags(train)
    train.add_argument("--out", default="artifacts", help="artifacts folder (default: %(default)s)")
    train.set_defaults(func=_cmd_train)

    ev = sub.add_parser("evaluate", help="train what is needed and compare every model on the test period")
    training_flags(ev)
    ev.add_argument("--out", default="reports/eval.json", help="report JSON; the PNG chart goes beside it")
    ev.add_argument("--artifacts", default=None, help="also publish the trained models into this folder")
    ev.add_argument("--mmr-lambda", type=float, default=None)
    ev.add_argument("--mmr-pool", type=int, default=None)
    ev.add_argument("--json", action="store_true", help="print the report as JSON instead of a table")
    ev.set_defaults(func=_cmd_evaluate)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``recsys`` console script."""
    args = build_parser().parse_args(argv)
    from export.data import DataError

    try:
        return args.func(args)
    except (DataError, ValueError, FileNotFoundError) as exc:
        print(f"recsys: error: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("recsys: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
