"""The offline side: data -> split -> train -> evaluate -> publish (see export/pipeline.py)."""

DEFAULT_DATA_DIR = "data/ml-latest-small"
"""The MovieLens folder every command defaults to: ml-latest-small, the one data set the
project may ship (its licence allows redistribution; see data/README.md). Kept here, free of
imports, so the CLI can name it without loading the training stack."""
