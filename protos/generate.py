"""Generates the Python modules of the API: ``python -m protos.generate``.

One command, run from anywhere, writes ``recsys_pb2.py``, ``recsys_pb2.pyi`` and
``recsys_pb2_grpc.py`` beside each ``.proto`` under ``protos/``. The generated files are
checked in (as the grpc examples do), so installing the project needs no protoc;
``tests/test_api_protos.py`` regenerates into a temporary folder and fails when the checked-in
files are stale.

Protos are compiled with the repository root as the include path, so the generated imports
read ``from protos.recsys.v1 import recsys_pb2`` and resolve inside this package.
"""

from __future__ import annotations

import argparse
import sys
from importlib import resources
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
"""The repository root: the protoc include path."""

PROTOS = ROOT / "protos"


def proto_files() -> list[Path]:
    """Every ``.proto`` under ``protos/``, sorted (stable generation order)."""
    return sorted(PROTOS.rglob("*.proto"))


def generate(out_dir: str | Path = ROOT) -> list[Path]:
    """Runs grpcio-tools' protoc over :func:`proto_files`.

    Args:
        out_dir: Where the package tree is written (the repository root to update the
            checked-in files; a temporary folder to compare with them).

    Returns:
        The generated files.

    Raises:
        RuntimeError: protoc reported an error (its message is on stderr).
    """
    from grpc_tools import protoc

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    include = str(resources.files("grpc_tools") / "_proto")  # google/protobuf/*.proto
    files = [str(p.relative_to(ROOT)) for p in proto_files()]
    args = [
        "grpc_tools.protoc",
        f"-I{ROOT}",
        f"-I{include}",
        f"--python_out={out}",
        f"--pyi_out={out}",
        f"--grpc_python_out={out}",
        *files,
    ]
    if protoc.main(args) != 0:
        raise RuntimeError(f"protoc failed on {files}")
    generated = []
    for f in files:
        stem = out / Path(f).with_suffix("")
        generated += [stem.with_name(stem.name + s) for s in ("_pb2.py", "_pb2.pyi", "_pb2_grpc.py")]
    return generated


def main(argv: list[str] | None = None) -> int:
    """Command line: regenerate into the repository (or ``--out``)."""
    parser = argparse.ArgumentParser(prog="python -m protos.generate", description=__doc__.splitlines()[0])
    parser.add_argument("--out", default=str(ROOT), help="output root (default: the repository root)")
    args = parser.parse_args(argv)
    for path in generate(args.out):
        print(path)
    return 0


if __name__ == "__main__":
    sys.exit(main())
