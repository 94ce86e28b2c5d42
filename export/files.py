"""Small file helpers shared by the offline and online sides."""

from __future__ import annotations

import hashlib
from pathlib import Path


def file_sha256(path: str | Path) -> str:
    """sha256 of a file's bytes, read in 4 MiB blocks (artifacts can be hundreds of MB)."""
    digest = hashlib.sha256()
    with Path(path).open("rb") as fh:
        for block in iter(lambda: fh.read(1 << 22), b""):
            digest.update(block)
    return digest.hexdigest()


DEFAULT_DATA_DIR = "data/ml-latest-small"
"""The MovieLens folder every command defaults to: ml-latest-small, the one data set the
project may ship (its licence allows redistribution; see data/README.md)."""
