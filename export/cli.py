"""The offline subcommands of ``recsys``: data synth, train, evaluate, export, batch-score, demo, bench.

Thin shells over :mod:`export` (and :mod:`benchmarks`); :func:`add_offline_commands` registers
them on the ``recsys`` parser (``clients/cli.py``), which leaves them out of a serving-only
install. Heavy modules are imported inside the subcommands so ``recsys --help`` stays instant.
Exit codes: 0 ok, 1 a failed operation (bad data, failed call), 2 usage errors (argparse),
3 a batch-score run stopped early (resumable).
"""

from __future__ import annotations

import argparse
import json
import logging
import sys

from export import DEFAULT_DATA_DIR


def _positive_int(text: str) -> int:
    """argparse type: an integer >= 1 (a usage error, exit 2, otherwise)."""
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not an integer: {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be >= 1, got {value}")
    return value


def _fraction(text: str) -> float:
    """argparse type: a share strictly between 0 and 1 (a usage error, exit 2, otherwise)."""
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a number: {text!r}") from None
    if not 0.0 < value < 1.0:
        raise argparse.ArgumentTypeError(f"must be between 0 and 1, got {value}")
    return value


def _cmd_synth(args: argparse.Namespace) -> int:
    from dataclasses import replace

    from export.synth import SynthSpec, synthesize

    spec = SynthSpec(users=args.users, items=args.items, ratings=args.ratings, seed=args.seed)
    if args.span_days is not None:
        spec = replace(spec, span_days=args.span_days)
    summary = synthesize(spec, args.out, progress=not args.quiet)
    print(json.dumps(summary, indent=2, default=str))
    return 0


def _cmd_download(args: argparse.Namespace) -> int:
    from export.download import DownloadError, download

    try:
        record = download(
            args.name,
            args.out,
            url=args.base_url,
            archive=args.archive,
            force=args.force,
            keep_archive=args.keep_archive,
            progress=not args.quiet,
        )
    except DownloadError as exc:
        print(f"recsys: error: {exc}", file=sys.stderr)
        return 1
    print(json.dumps(record, indent=2))
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
    settings = replace(
        settings,
        windows=args.windows,
        train=replace(settings.train, test_fraction=args.window_fraction, val_fraction=args.window_fraction),
    )
    report = evaluate(args.data, args.out, settings, artifacts_dir=args.artifacts, progress=not args.quiet)
    if args.json:
        keys = ("protocol", "models", "significance", "candidates", "targets")
        print(json.dumps({key: report[key] for key in keys}, indent=2))
    else:
        print(comparison_table(report))
        print()
        print("targets:", json.dumps(report["targets"], indent=2))
        print(f"report: {args.out} (+ {args.out.rsplit('.', 1)[0]}.png), {report['seconds']['total']:.0f} s")
    return 0


def _cmd_export(args: argparse.Namespace) -> int:
    from export.pipeline import publish

    published = publish(
        args.artifacts,
        args.repo,
        tree_implementation=args.tree_implementation,
        write_configs=args.write_configs,
        index=not args.skip_index,
        progress=not args.quiet,
    )
    summary, index_report = published["repository"], published["faiss"]
    faiss_summary = None
    if index_report is not None:
        faiss_summary = {
            "default": index_report["default"],
            "bundle": index_report["bundle"]["dir"],
            "results": [
                {key: r.get(key) for key in ("kind", "recall", "p50_ms", "p99_ms", "build_s", "bytes")} for r in index_report["results"]
            ],
        }
    ranker = summary["ranker"]
    chosen = next(t for t in ranker["trials"] if t["implementation"] == ranker["tree_implementation"])
    print(
        json.dumps(
            {
                "repository": summary["repository"],
                "version": summary["version"],
                "models": summary["models"],
                "tree_implementation": ranker["tree_implementation"],
                "tree_selection": ranker["selection"],
                "ranker_ms_p50": chosen["ms_p50"],
                "parity_max_abs_diff": {m: max(d.values()) for m, d in summary["parity_max_abs_diff"].items()},
                "configs_written": summary["configs_written"],
                "faiss": faiss_summary,
                "seconds": summary["seconds"],
            },
            indent=2,
        )
    )
    return 0


def _cmd_batch_score(args: argparse.Namespace) -> int:
    from export.batch_score import BatchScoreError, StopRequested, batch_score
    from orchestrator.tritonserver import TritonError

    on_chunk = None
    if args.stop_after_chunks is not None:
        # hidden, for tests and demos of resuming: end the run after N newly scored chunks
        remaining = [args.stop_after_chunks]

        def on_chunk(chunk, table) -> None:  # noqa: ARG001 - callback signature
            remaining[0] -= 1
            if remaining[0] <= 0:
                raise StopRequested

    try:
        summary = batch_score(
            args.artifacts,
            args.out,
            args.users,
            url=args.url,
            repo=args.repo,
            k=args.k,
            candidates=args.candidates,
            batch_size=args.batch_size,
            concurrency=args.concurrency,
            data_dir=args.data,
            restart=args.restart,
            keep_parts=args.keep_parts,
            progress=not args.quiet,
            on_chunk=on_chunk,
        )
    except StopRequested:
        print(f"recsys: stopped early; rerun the same command to resume from {args.out}.parts", file=sys.stderr)
        return 3
    except (BatchScoreError, TritonError) as exc:
        print(f"recsys: error: {exc}", file=sys.stderr)
        return 1
    print(json.dumps(summary, indent=2))
    return 0


def _cmd_demo(args: argparse.Namespace) -> int:
    """``recsys demo [--json]``."""
    from clients.errors import RecsysRpcError
    from export.demo import demo, demo_table
    from orchestrator.tritonserver import TritonError

    logging.basicConfig(level=logging.WARNING)  # the demo's output is the answers, not the logs
    try:
        result = demo(args.artifacts, args.repo, args.data or DEFAULT_DATA_DIR, k=args.k, progress=not args.quiet)
    except (TritonError, RecsysRpcError) as exc:
        print(f"recsys: error: {exc}", file=sys.stderr)
        return 1
    print(
        json.dumps({k: result[k] for k in ("recommend", "recommend_by_history", "similar")}, indent=2) if args.json else demo_table(result)
    )
    return 0


def add_offline_commands(sub: argparse._SubParsersAction) -> None:
    """Registers data, train, evaluate, export, batch-score, demo and bench on the ``recsys`` parser."""
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

    from export.download import BASE_URL_ENV, DATASETS  # no heavy imports: stdlib and tqdm

    dl = data.add_parser("download", help="fetch a MovieLens release from GroupLens, verify it, convert it to the CSV layout")
    dl.add_argument("name", choices=tuple(DATASETS), help="the release")
    dl.add_argument("--out", default=None, help="the data set's folder (default: data/NAME)")
    dl.add_argument("--base-url", default=None, help=f"mirror of GroupLens's movielens folder (default: ${BASE_URL_ENV} or GroupLens)")
    dl.add_argument("--archive", default=None, help="use this NAME.zip instead of downloading (default: NAME.zip beside --out if there)")
    dl.add_argument("--force", action="store_true", help="replace an existing --out")
    dl.add_argument("--keep-archive", action="store_true", help="keep the verified archive as .NAME.zip beside --out")
    dl.add_argument("--quiet", action="store_true", help="no progress bars")
    dl.set_defaults(func=_cmd_download)

    def training_flags(p: argparse.ArgumentParser) -> None:
        p.add_argument("--data", default=DEFAULT_DATA_DIR, help="MovieLens CSV folder (default: %(default)s)")
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
    ev.add_argument(
        "--windows",
        type=_positive_int,
        default=1,
        help="rolling-origin test windows, the latest last (default: %(default)s = one time split)",
    )
    ev.add_argument(
        "--window-fraction",
        type=_fraction,
        default=0.1,
        help="share of the interactions in each test window and in its validation period (default: %(default)s)",
    )
    ev.set_defaults(func=_cmd_evaluate)

    exp = sub.add_parser("export", help="export the artifacts to ONNX and publish version N+1 in the Triton repository")
    exp.add_argument("--artifacts", default="artifacts", help="folder written by `recsys train` (default: %(default)s)")
    exp.add_argument("--repo", default="model_repository", help="Triton model repository (default: %(default)s)")
    exp.add_argument(
        "--tree-implementation",
        choices=("auto", "gemm", "tree_trav", "perf_tree_trav"),
        default="auto",
        help="Hummingbird tree strategy; auto measures them and keeps the fastest correct one",
    )
    exp.add_argument(
        "--write-configs",
        action="store_true",
        help="regenerate config.pbtxt, configs/cpu.pbtxt, configs/onnx_cpu.pbtxt and model.py from the artifacts' shapes",
    )
    exp.add_argument("--skip-index", action="store_true", help="do not (re)build the FAISS indexes under ARTIFACTS/faiss")
    exp.add_argument("--quiet", action="store_true", help="no progress bars")
    exp.set_defaults(func=_cmd_export)

    bs = sub.add_parser("batch-score", help="top-K recommendations for many users through Triton HTTP, written to Parquet (resumable)")
    bs.add_argument("--artifacts", default="artifacts", help="folder written by `recsys train`, with faiss/ (default: %(default)s)")
    bs.add_argument("--repo", default="model_repository", help="model repository for the embedded Triton (default: %(default)s)")
    bs.add_argument("--url", default=None, help="Triton HTTP host:port (default: start the embedded Triton on --repo)")
    bs.add_argument("--users", default="all", help="all | N (first N user ids) | file of user ids (default: %(default)s)")
    bs.add_argument("--k", type=int, default=100, help="recommendations per user (default: %(default)s)")
    bs.add_argument("--candidates", type=int, default=None, help="retrieval depth (default: the ranker's, from the manifest)")
    bs.add_argument("--out", required=True, help="output Parquet (parts go to OUT.parts/ until the run completes)")
    bs.add_argument("--batch-size", type=int, default=512, help="users per chunk, the unit of restart (default: %(default)s)")
    bs.add_argument("--concurrency", type=int, default=4, help="Triton requests in flight (default: %(default)s)")
    bs.add_argument("--data", default=None, help="folder with users.csv for demographics (default: the manifest's data path)")
    bs.add_argument("--restart", action="store_true", help="discard the parts of an unfinished earlier run")
    bs.add_argument("--keep-parts", action="store_true", help="keep OUT.parts/ after combining")
    bs.add_argument("--quiet", action="store_true", help="no progress bar")
    bs.add_argument("--stop-after-chunks", type=int, default=None, help=argparse.SUPPRESS)
    bs.set_defaults(func=_cmd_batch_score)

    bench = sub.add_parser("bench", help="benchmarks that print figures with their conditions").add_subparsers(
        dest="bench_command", required=True
    )
    from benchmarks.e2e import add_arguments as add_e2e_arguments

    add_e2e_arguments(bench.add_parser("e2e", help="Recommend served (Triton + gRPC) vs the in-process floor, c1..c32"))
    from benchmarks.faults import add_arguments as add_faults_arguments

    add_faults_arguments(bench.add_parser("faults", help="load, Triton killed, deadlines, hot reload, durability, fuzz"))
    from benchmarks.scaleout import add_arguments as add_scaleout_arguments

    add_scaleout_arguments(bench.add_parser("scaleout", help="2 orchestrators + 2 Tritons, Redis, HAProxy; SIGKILLs under load"))

    dem = sub.add_parser("demo", help="train/export if needed, start Triton + orchestrator, show three answers, stop")
    dem.add_argument("--artifacts", default="artifacts")
    dem.add_argument("--repo", default="model_repository")
    dem.add_argument(
        "--data", default=None, help="trained on when the artifacts have no manifest (default: the bundled data/ml-latest-small)"
    )
    dem.add_argument("-k", type=int, default=10)
    dem.add_argument("--json", action="store_true", help='print {"recommend", "recommend_by_history", "similar"} as JSON')
    dem.add_argument("--quiet", action="store_true", help="no progress bars")
    dem.set_defaults(func=_cmd_demo)
