"""The online subcommands of ``recsys``: serve, recommend, similar, popular, health,
delete-user and replay.

Thin shells over :mod:`clients.client` and :mod:`orchestrator.stack`; :func:`add_online_commands`
registers them on the ``recsys`` parser (``clients/cli.py``). Exit codes: 0 ok, 1 a failed
call (the status code and the server's message on stderr), 2 usage.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
from collections.abc import Callable
from typing import Any

DEFAULT_TARGET = "127.0.0.1:50051"


def _ids(text: str) -> list[int]:
    try:
        return [int(x) for x in text.split(",") if x.strip()]
    except ValueError as exc:
        raise argparse.ArgumentTypeError(f"expected comma-separated integers, got {text!r}") from exc


def _promotion(text: str) -> Any:
    """``MOVIE@POSITION[:sponsored|:editorial]`` -> a :class:`clients.client.Promoted`."""
    from clients.client import PROMOTION_KINDS, Promoted

    slot, _, kind = text.partition(":")
    movie, at, position = slot.partition("@")
    kind = kind or "sponsored"
    try:
        if not at or kind not in PROMOTION_KINDS:
            raise ValueError
        return Promoted(int(movie), int(position), kind)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected MOVIE@POSITION[:sponsored|:editorial], got {text!r}") from None


def _floats(text: str) -> list[float]:
    try:
        return [float(x) for x in text.split(",") if x.strip()]
    except ValueError as exc:
        raise argparse.ArgumentTypeError(f"expected comma-separated numbers, got {text!r}") from exc


def _print_items(resp: Any, header: str) -> None:
    print(header)
    for i, item in enumerate(resp.items, 1):
        genres = "|".join(item.genres)
        print(f"{i:>3}  {item.movie_id:>7}  {item.score:>8.3f}  {item.year or '':>4}  {item.title} [{genres}]  {item.explanation}")


def _emit(resp: Any, as_json: bool, header: str) -> None:
    if as_json:
        from google.protobuf.json_format import MessageToDict

        print(json.dumps(MessageToDict(resp, preserving_proto_field_name=True), indent=2))
    else:
        _print_items(resp, header)


def _options(args: argparse.Namespace, rerank: bool = True) -> dict[str, Any]:
    out: dict[str, Any] = {
        "genres": args.genre or None,
        "min_year": args.min_year,
        "max_year": args.max_year,
        "min_mean_rating": args.min_rating,
        "exclude_movie_ids": args.exclude or None,
    }
    if rerank:
        out.update(
            include_seen=True if args.include_seen else None,
            mmr_lambda=args.mmr_lambda,
            candidate_pool=args.pool,
            freshness_weight=args.freshness,
            max_per_genre=args.max_per_genre,
            promotions=getattr(args, "promote", None),
        )
    return {k: v for k, v in out.items() if v is not None}


def _call(args: argparse.Namespace, fn: Callable[[Any], int]) -> int:
    """Runs ``fn(client)``; a failed call prints its status and message and exits 1."""
    from clients.client import RecsysClient
    from clients.errors import RecsysRpcError

    try:
        client = RecsysClient(args.target, timeout_s=args.timeout, api_key=args.api_key or None, tls=args.tls, tls_ca=args.tls_ca)
    except OSError as exc:  # an unreadable --tls-ca
        print(f"recsys: error: {exc}", file=sys.stderr)
        return 1
    with client:
        try:
            return fn(client)
        except RecsysRpcError as exc:
            ref = f" (request {exc.request_id})" if exc.request_id else ""
            print(f"recsys: {exc.code.name}: {exc.details}{ref}", file=sys.stderr)
            return 1


def _cmd_recommend(args: argparse.Namespace) -> int:
    """``recsys recommend``: by ``--user`` or ``--history``."""

    def run(client: Any) -> int:
        if args.user is not None:
            resp = client.recommend(args.user, k=args.k, **_options(args))
            who = f"user {args.user}"
        else:
            resp = client.recommend(history=args.history, ratings=args.ratings, k=args.k, **_options(args))
            who = f"history {args.history}"
        from protos.recsys.v1 import recsys_pb2 as pb

        why = f", fallback {pb.FallbackReason.Name(resp.fallback_reason)}" if resp.is_fallback else ""
        if resp.dropped_promotion_ids:
            why += f", promotions dropped (filtered or seen): {list(resp.dropped_promotion_ids)}"
        _emit(resp, args.json, f"# {who}: model {resp.model_version}, {resp.latency_ms:.1f} ms{why}")
        return 0

    return _call(args, run)


def _cmd_similar(args: argparse.Namespace) -> int:
    """``recsys similar --movie ID``."""

    def run(client: Any) -> int:
        resp = client.similar(args.movie, k=args.k, user_id=args.user, **_options(args))
        _emit(resp, args.json, f"# similar to movie {args.movie}: model {resp.model_version}, {resp.latency_ms:.1f} ms")
        return 0

    return _call(args, run)


def _cmd_popular(args: argparse.Namespace) -> int:
    """``recsys popular [--genre G] [--recent]``."""

    def run(client: Any) -> int:
        resp = client.popular(k=args.k, recent=args.recent, **_options(args, rerank=False))
        _emit(resp, args.json, f"# popular ({'last 30 days' if args.recent else 'all time'}): {resp.latency_ms:.1f} ms")
        return 0

    return _call(args, run)


def _cmd_health(args: argparse.Namespace) -> int:
    """``recsys health``: prints the status; exit 0 only when SERVING."""

    def run(client: Any) -> int:
        status = client.health(args.service)
        print(json.dumps({"service": args.service, "status": status}) if args.json else status)
        return 0 if status == "SERVING" else 1

    return _call(args, run)


def _cmd_delete_user(args: argparse.Namespace) -> int:
    """``recsys delete-user --user ID``: erases the user's history and request-log rows."""

    def run(client: Any) -> int:
        resp = client.delete_user(args.user)
        body = {
            "user_id": args.user,
            "interactions_deleted": resp.interactions_deleted,
            "request_log_rows_deleted": resp.request_log_rows_deleted,
        }
        if args.json:
            print(json.dumps(body))
        else:
            print(
                f"user {args.user}: {resp.interactions_deleted} interactions and {resp.request_log_rows_deleted} request-log rows deleted"
            )
        return 0

    return _call(args, run)


def _cmd_drift(args: argparse.Namespace) -> int:
    """``recsys drift``: the PSI table of the logged answers against the export's reference."""
    import sqlite3
    from pathlib import Path

    from orchestrator.artifacts import DRIFT_REFERENCE
    from orchestrator.drift import DriftReference, drift_report, psi_table

    ref_path = Path(args.artifacts) / DRIFT_REFERENCE
    try:
        reference = DriftReference.load(ref_path)
        report = drift_report(args.request_log, reference, args.model_version, args.last)
    except FileNotFoundError as exc:
        print(f"recsys: error: {exc} (a drift reference is written by `recsys train`)", file=sys.stderr)
        return 1
    except (ValueError, sqlite3.Error) as exc:
        print(f"recsys: error: {exc}", file=sys.stderr)
        return 1
    if args.json:
        print(json.dumps(report, indent=2))
    else:
        import numpy as np

        from orchestrator.drift import DISTRIBUTIONS

        counts = {d: np.asarray(report["counts"][d]) for d in DISTRIBUTIONS}
        print(f"drift of {report['log']} (model versions {report['model_versions']}) against {ref_path}")
        print(psi_table(reference, counts, report["answers"]))
    return 0


def _cmd_replay(args: argparse.Namespace) -> int:
    """``recsys replay``: hit rate of the logged recommendations against the later history."""
    import sqlite3

    from orchestrator.requestlog import replay, replay_table
    from orchestrator.settings import ServeSettings

    defaults = ServeSettings.from_env(artifacts_dir=args.artifacts)
    log_path = args.log or defaults.request_log_db()
    db = args.db or defaults.history_db()
    try:
        report = replay(log_path, db, args.horizon_s)
    except (FileNotFoundError, sqlite3.Error) as exc:
        print(f"recsys: error: {exc}", file=sys.stderr)
        return 1
    print(json.dumps(report, indent=2) if args.json else replay_table(report))
    return 0


def _settings(args: argparse.Namespace) -> Any:
    """ServeSettings from ``RECSYS_*`` variables, overridden by the flags that were given."""
    from orchestrator.settings import ServeSettings

    return ServeSettings.from_env(
        artifacts_dir=args.artifacts,
        model_repository=args.repo,
        triton_url=args.triton_url,
        host=args.host,
        port=args.port,
        metrics_port=args.metrics_port,
        workers=args.workers,
        history_store=args.history_store,
        history_db_path=args.history_db,
        redis_url=args.redis_url,
        triton_timeout_s=args.triton_timeout,
        reload_poll_s=getattr(args, "reload_poll", None),
        ab_version=getattr(args, "ab_version", None),
        ab_share=getattr(args, "ab_share", None),
        api_keys_file=args.api_keys_file,
        tls_cert=args.tls_cert,
        tls_key=args.tls_key,
        request_log=False if args.no_request_log else None,
        request_log_path=args.request_log,
    )


def _cmd_serve(args: argparse.Namespace) -> int:
    """``recsys serve``: foreground until SIGINT/SIGTERM."""
    from orchestrator.stack import serve

    logging.basicConfig(level=args.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    logging.getLogger("faiss.loader").setLevel(logging.WARNING)  # which SIMD build loaded is noise here
    try:
        settings = _settings(args)
    except ValueError as exc:  # a RECSYS_* variable or flag out of range
        print(f"recsys: error: {exc}", file=sys.stderr)
        return 2

    def announce(info: dict) -> None:
        print(json.dumps(info, indent=2) if args.json else "\n".join(f"{k:<14}{v}" for k, v in info.items()), flush=True)

    from orchestrator.tritonserver import TritonError

    try:
        # an external Triton (docker-compose) or --in-process: nothing to start here
        return serve(settings, start_triton=not settings.triton_url and not args.in_process, announce=announce)
    except (TritonError, RuntimeError, ValueError, OSError) as exc:  # Triton, a taken port, bad keys or TLS files
        print(f"recsys: error: {exc}", file=sys.stderr)
        return 1


def _target_flags(p: argparse.ArgumentParser) -> None:
    p.add_argument("--target", default=DEFAULT_TARGET, help="orchestrator host:port (default: %(default)s)")
    p.add_argument("--timeout", type=float, default=5.0, help="deadline in seconds (default: %(default)s)")
    p.add_argument("--json", action="store_true", help="print the response as JSON")
    p.add_argument("--api-key", default=os.environ.get("RECSYS_API_KEY"), help="sent as x-api-key metadata (default: $RECSYS_API_KEY)")
    p.add_argument("--tls", action="store_true", help="TLS with the system's root certificates")
    p.add_argument("--tls-ca", default=None, help="PEM root certificate the server's certificate chains to (implies --tls)")


def _filter_flags(p: argparse.ArgumentParser) -> None:
    p.add_argument("-k", type=int, default=10, help="results (1..500, default: %(default)s)")
    p.add_argument("--genre", action="append", help="genre filter, any-of (repeatable)")
    p.add_argument("--min-year", type=int, default=None)
    p.add_argument("--max-year", type=int, default=None)
    p.add_argument("--min-rating", type=float, default=None, help="lowest mean rating (0..5)")
    p.add_argument("--exclude", type=_ids, default=None, help="movie ids never to return (comma-separated)")


def _rerank_flags(p: argparse.ArgumentParser) -> None:
    p.add_argument("--include-seen", action="store_true", help="also return movies the user rated")
    p.add_argument("--mmr-lambda", type=float, default=None, help="1 relevance .. 0 diversity")
    p.add_argument("--pool", type=int, default=None, help="ranked candidates MMR chooses from")
    p.add_argument("--freshness", type=float, default=None, help="weight of release-year freshness (0..1)")
    p.add_argument("--max-per-genre", type=int, default=None, help="per-genre quota")


def add_online_commands(sub: argparse._SubParsersAction) -> None:
    """Registers serve, recommend, similar, popular, health, delete-user and replay on the ``recsys`` parser."""
    srv = sub.add_parser("serve", help="run the gRPC orchestrator (and the embedded Triton unless --triton-url)")
    srv.add_argument("--artifacts", default=None, help="folder written by `recsys train` (default: artifacts)")
    srv.add_argument("--repo", default=None, help="Triton model repository (default: model_repository)")
    srv.add_argument("--triton-url", default=None, help="external Triton gRPC host:port; default: start the embedded one")
    srv.add_argument("--in-process", action="store_true", help="no Triton: run the ONNX models with onnxruntime here")
    srv.add_argument("--host", default=None, help="bind address (default: 127.0.0.1)")
    srv.add_argument("--port", type=int, default=None, help="gRPC port (default: a free one)")
    srv.add_argument("--metrics-port", type=int, default=None, help="port of the Prometheus /metrics page (default: none)")
    srv.add_argument("--workers", type=int, default=None, help="server threads (default: 64)")
    srv.add_argument("--history-store", choices=("sqlite", "redis"), default=None)
    srv.add_argument("--history-db", default=None, help="SQLite file (default: one per artifacts folder in the state dir)")
    srv.add_argument("--redis-url", default=None)
    srv.add_argument("--triton-timeout", type=float, default=None, help="seconds a Triton call may take before the fallback")
    srv.add_argument(
        "--api-keys-file",
        default=None,
        help="file of key[:requests_per_second][:scope] lines (scope read|interact|admin); calls then need x-api-key",
    )
    srv.add_argument("--tls-cert", default=None, help="PEM certificate chain: serve TLS (with --tls-key)")
    srv.add_argument("--tls-key", default=None, help="PEM private key of --tls-cert")
    srv.add_argument("--request-log", default=None, help="request log SQLite file (default: beside the history DB)")
    srv.add_argument("--no-request-log", action="store_true", help="do not log answered calls")
    srv.add_argument(
        "--reload-poll",
        type=float,
        default=None,
        help="seconds between polls of the repository for a newer version to hot-reload (0: off; default 2)",
    )
    srv.add_argument("--ab-version", type=int, default=None, help="A/B: model version of the treatment arm (one of the two newest)")
    srv.add_argument("--ab-share", type=float, default=None, help="A/B: share of users (stable hash) routed to --ab-version, 0..1")
    srv.add_argument("--log-level", default="info", choices=("debug", "info", "warning", "error"))
    srv.add_argument("--json", action="store_true", help="print the addresses as JSON")
    srv.set_defaults(func=_cmd_serve)

    rec = sub.add_parser("recommend", help="top-k movies for a user or a history")
    who = rec.add_mutually_exclusive_group(required=True)
    who.add_argument("--user", type=int, help="user id (history from the store)")
    who.add_argument("--history", type=_ids, help="movie ids, oldest first (comma-separated)")
    rec.add_argument("--ratings", type=_floats, default=None, help="ratings of --history (comma-separated)")
    _filter_flags(rec)
    _rerank_flags(rec)
    rec.add_argument(
        "--promote",
        action="append",
        type=_promotion,
        metavar="MOVIE@POS[:KIND]",
        help="pin a movie at a 1-based position (KIND sponsored (default) or editorial; repeatable); dropped when filtered or seen",
    )
    _target_flags(rec)
    rec.set_defaults(func=_cmd_recommend)

    sim = sub.add_parser("similar", help="movies similar to a movie")
    sim.add_argument("--movie", type=int, required=True, help="movie id")
    sim.add_argument("--user", type=int, default=None, help="exclude this user's seen movies")
    _filter_flags(sim)
    _rerank_flags(sim)
    _target_flags(sim)
    sim.set_defaults(func=_cmd_similar)

    pop = sub.add_parser("popular", help="the most rated movies")
    pop.add_argument("--recent", action="store_true", help="count the last 30 days before the cut-off only")
    _filter_flags(pop)
    _target_flags(pop)
    pop.set_defaults(func=_cmd_popular)

    hl = sub.add_parser("health", help="the standard gRPC health check (exit 0 only when SERVING)")
    hl.add_argument("--service", default="", help="service name ('' = the whole server)")
    _target_flags(hl)
    hl.set_defaults(func=_cmd_health)

    du = sub.add_parser("delete-user", help="erase a user's history and request-log rows (GDPR)")
    du.add_argument("--user", type=int, required=True, help="user id")
    _target_flags(du)
    du.set_defaults(func=_cmd_delete_user)

    dr = sub.add_parser("drift", help="PSI of the logged answers' distributions against the export's drift reference")
    dr.add_argument("--request-log", required=True, help="request log SQLite file (recsys serve writes it)")
    dr.add_argument("--artifacts", default="artifacts", help="artifacts folder holding drift_reference.json (default: %(default)s)")
    dr.add_argument("--model-version", default=None, help="only answers of this model version")
    dr.add_argument("--last", type=int, default=None, help="only the newest N answers")
    dr.add_argument("--json", action="store_true", help="print JSON")
    dr.set_defaults(func=_cmd_drift)

    rp = sub.add_parser("replay", help="hit rate of logged recommendations against the history that followed")
    rp.add_argument("--log", default=None, help="request log SQLite file (default: the serve default for --artifacts)")
    rp.add_argument("--db", default=None, help="history SQLite file (default: the serve default for --artifacts)")
    rp.add_argument("--artifacts", default=None, help="artifacts folder the defaults are derived from (default: artifacts)")
    rp.add_argument("--horizon-s", type=float, default=None, help="count interactions at most this many seconds later")
    rp.add_argument("--json", action="store_true", help="print the report as JSON")
    rp.set_defaults(func=_cmd_replay)
