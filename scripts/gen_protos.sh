#!/usr/bin/env sh
# Regenerates the checked-in gRPC stubs (protos/**/*_pb2*.py[i]) from the .proto files.
set -eu
cd "$(dirname "$0")/.."
exec "${PYTHON:-.venv/bin/python}" -m protos.generate "$@"
