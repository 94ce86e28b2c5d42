"""``recsys``: one command, thin subcommands over the library.

This module is the root: it registers ``triton``, the online commands
(``clients/online_cli.py``: serve, recommend, similar, popular, health, ...) and, where the
offline side is installed, the offline ones (``export/cli.py``: data, train, evaluate,
export, batch-score, demo, bench).

Exit codes: 0 ok, 1 a failed operation (bad data, failed call), 2 usage errors (argparse).
Heavy modules are imported inside the subcommands so ``recsys --help`` stays instant.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Sequence


def _cmd_triton(args: argparse.Namespace) -> int:
    from orchestrator.tritonserver import EmbeddedTriton, TritonError, check, serve_forever

    server = EmbeddedTriton(
        args.repo,
        http_port=args.http_port,
        grpc_port=args.grpc_port,
        metrics_port=args.metrics_port,
        config_name=args.config_name or None,
        startup_timeout=args.timeout,
        log_path=args.log,
    )
    try:
        if args.check:
            status, ok = check(server)
            if args.json:
                print(json.dumps(status, indent=2))
            else:
                print(f"tritonserver {status['server_version']}")
                for name, model in sorted(status["models"].items()):
                    reason = f"  ({model['reason']})" if model.get("reason") else ""
                    print(f"  {name:<18} versions {model['versions']}  {model['state']}{reason}")
            return 0 if ok else 1
        server.start()
    except TritonError as exc:
        print(f"recsys: error: {exc}", file=sys.stderr)
        return 1

    def announce() -> None:
        info = {"grpc": server.grpc_url, "http": server.http_url, "metrics": server.metrics_url, "log": str(server.log_path)}
        print(json.dumps(info, indent=2) if args.json else "\n".join(f"{k:<8}{v}" for k, v in info.items()), flush=True)

    return serve_forever(server, announce)


def build_parser() -> argparse.ArgumentParser:
    """The ``recsys`` argument parser."""
    parser = argparse.ArgumentParser(prog="recsys", description="Two-stage movie recommender on NVIDIA Triton.")
    sub = parser.add_subparsers(dest="command", required=True)

    tri = sub.add_parser("triton", help="run the embedded Triton server on a model repository (CPU, Python backend)")
    tri.add_argument("--repo", default="model_repository", help="Triton model repository (default: %(default)s)")
    tri.add_argument("--http-port", type=int, default=None, help="default: a free port")
    tri.add_argument("--grpc-port", type=int, default=None, help="default: a free port")
    tri.add_argument("--metrics-port", type=int, default=None, help="default: a free port")
    tri.add_argument("--config-name", default="cpu", help="--model-config-name; '' for config.pbtxt (default: %(default)s)")
    tri.add_argument("--timeout", type=float, default=120.0, help="start-up timeout in seconds (default: %(default)s)")
    tri.add_argument("--log", default=None, help="server log file (default: a temporary file)")
    tri.add_argument("--check", action="store_true", help="start, report every model's state, stop; exit 0 only if all are READY")
    tri.add_argument("--json", action="store_true", help="print JSON")
    tri.set_defaults(func=_cmd_triton)

    from clients.online_cli import add_online_commands  # serve, recommend, similar, popular, health, ...

    add_online_commands(sub)
    from clients.explore.cli import add_explore_command  # explore: the page in the browser

    add_explore_command(sub)
    try:
        from export.cli import add_offline_commands  # data, train, evaluate, export, batch-score, demo, bench
    except ModuleNotFoundError as exc:
        if exc.name != "export":
            raise
        return parser  # a serving-only install (the orchestrator image ships no export/)
    add_offline_commands(sub)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``recsys`` console script."""
    args = build_parser().parse_args(argv)
    try:
        return int(args.func(args))
    except (ValueError, FileNotFoundError) as exc:  # bad data (export.data.DataError is a ValueError), missing files
        print(f"recsys: error: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("recsys: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
