"""The ``recsys explore`` subcommand: serve the explorer page until Ctrl-C / SIGTERM.

Exit codes: 0 stopped by a signal, 1 the item table or the port cannot be used, 2 usage.
"""

from __future__ import annotations

import argparse
import json
import signal
import sys
import threading
from pathlib import Path

DEFAULT_ARTIFACTS = "artifacts"


def _cmd_explore(args: argparse.Namespace) -> int:
    from clients.client import RecsysClient
    from clients.explore.catalog import MovieTable
    from clients.explore.queries import Explorer
    from clients.explore.server import create_server

    movies = None
    # the default folder is optional (title search is then off); a folder the user named must work
    artifacts = args.artifacts or (DEFAULT_ARTIFACTS if (Path(DEFAULT_ARTIFACTS) / "items.parquet").is_file() else None)
    try:
        if artifacts:
            movies = MovieTable.load(artifacts)
        client = RecsysClient(args.target, timeout_s=args.timeout, api_key=args.api_key or None, tls=args.tls, tls_ca=args.tls_ca)
    except (OSError, ValueError) as exc:  # no item table, an unreadable --tls-ca
        print(f"recsys: error: {exc}", file=sys.stderr)
        return 1
    with client:
        try:
            server, _ = create_server(Explorer(client, args.target, movies), args.port)
        except OSError as exc:  # the port is taken
            print(f"recsys: error: cannot listen on 127.0.0.1:{args.port}: {exc}", file=sys.stderr)
            return 1
        stop = threading.Event()
        for sig in (signal.SIGINT, signal.SIGTERM):
            signal.signal(sig, lambda *_: stop.set())
        server.start()
        info = {"explorer": server.url, "target": args.target, "catalog": movies.source if movies else "none (title search off)"}
        print(json.dumps(info) if args.json else "\n".join(f"{k:<10}{v}" for k, v in info.items()), flush=True)
        try:
            stop.wait()
        finally:
            server.stop()
    return 0


def add_explore_command(sub: argparse._SubParsersAction) -> None:
    """Registers ``recsys explore`` on the ``recsys`` parser."""
    from clients.online_cli import _target_flags  # --target, --timeout, --json, --api-key, --tls, --tls-ca

    ex = sub.add_parser("explore", help="a read-only page on 127.0.0.1 to look at recommendations in a browser")
    ex.add_argument("--port", type=int, default=8080, help="HTTP port on 127.0.0.1; 0 picks a free one (default: %(default)s)")
    ex.add_argument(
        "--artifacts",
        default=None,
        help=f"folder with items.parquet, for title search (default: {DEFAULT_ARTIFACTS} when it has one; else search is off)",
    )
    _target_flags(ex)
    ex.set_defaults(func=_cmd_explore)
