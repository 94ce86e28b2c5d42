"""The API contract: generated code is fresh, every field is documented, status tables are whole."""

from __future__ import annotations

import re
from concurrent import futures
from pathlib import Path

import grpc
import pytest

from clients import errors as client_errors
from clients.client import RecsysClient
from orchestrator import errors
from orchestrator.backends import TRITON_STATUS, triton_error
from orchestrator.settings import ServeSettings
from protos import generate
from protos.recsys.v1 import recsys_pb2 as pb
from protos.recsys.v1 import recsys_pb2_grpc

ROOT = Path(__file__).resolve().parents[1]


def test_generated_code_is_fresh(tmp_path):
    fresh = generate.generate(tmp_path)
    assert fresh, "no .proto found"
    for path in fresh:
        checked_in = ROOT / path.relative_to(tmp_path)
        assert checked_in.is_file(), f"{checked_in} is missing: run `python -m protos.generate`"
        assert checked_in.read_bytes() == path.read_bytes(), f"{checked_in} is stale: run `python -m protos.generate`"


def test_every_field_and_rpc_is_commented():
    for proto in generate.proto_files():
        lines = proto.read_text().splitlines()
        for i, line in enumerate(lines):
            code = line.split("//")[0].strip()
            is_field = re.match(r"^(optional |repeated )?[\w.]+ \w+ = \d+;$", code)
            is_rpc = code.startswith("rpc ")
            if is_field or is_rpc:
                assert lines[i - 1].strip().startswith("//"), f"{proto.name}:{i + 1} has no comment: {code}"


def test_settings_validate_and_read_the_environment(tmp_path):
    s = ServeSettings.from_env({"RECSYS_RETRIEVE_K": "300", "RECSYS_TRITON_TIMEOUT_S": "0.5", "RECSYS_TRITON_URL": "triton:8001"}, port=5)
    assert (s.retrieve_k, s.triton_timeout_s, s.triton_url, s.port) == (300, 0.5, "triton:8001", 5)
    for bad in (
        {"mmr_lambda": 1.5},
        {"retrieve_k": 10, "mmr_pool": 50},
        {"triton_timeout_s": 0},
        {"history_store": "mongo"},
        {"max_k": 501},
    ):
        with pytest.raises(ValueError):
            ServeSettings(**bad)
    with pytest.raises(ValueError, match="RECSYS_WORKERS"):
        ServeSettings.from_env({"RECSYS_WORKERS": "many"})
    assert ServeSettings(history_db_path=tmp_path / "h.sqlite").history_db() == tmp_path / "h.sqlite"


def test_mmr_defaults_are_the_evaluated_operating_point():
    from export.evaluate import EvalSettings

    e, s = EvalSettings(), ServeSettings()
    assert (s.mmr_lambda, s.mmr_pool, s.mmr_genre_weight) == (e.mmr_lambda, e.mmr_pool, e.mmr_genre_weight)


def test_status_table():
    assert errors.status_of(errors.InvalidArgument("x")) == grpc.StatusCode.INVALID_ARGUMENT
    assert errors.status_of(errors.NotFound("x")) == grpc.StatusCode.NOT_FOUND
    assert errors.status_of(errors.DeadlineExceeded("x")) == grpc.StatusCode.DEADLINE_EXCEEDED
    assert errors.status_of(errors.ModelTimeout("x")) == grpc.StatusCode.UNAVAILABLE
    assert errors.status_of(errors.ModelError("x")) == grpc.StatusCode.INTERNAL
    assert errors.status_of(KeyError("x")) == grpc.StatusCode.INTERNAL
    code, message = errors.describe(RuntimeError("secret internals"))
    assert code == grpc.StatusCode.INTERNAL and "secret" not in message and "reference" in message


class FakeTritonError(Exception):
    def __init__(self, status):
        super().__init__("the same text for every code")
        self._status = status

    def status(self):
        return self._status


def test_triton_errors_are_mapped_by_status_code_not_text():
    assert isinstance(triton_error(FakeTritonError("StatusCode.UNAVAILABLE"), "m", 1), errors.ModelUnavailable)
    assert isinstance(triton_error(FakeTritonError("StatusCode.DEADLINE_EXCEEDED"), "m", 1), errors.ModelTimeout)
    contract = triton_error(FakeTritonError("StatusCode.INVALID_ARGUMENT"), "m", 1)
    assert type(contract) is errors.ModelError
    assert type(triton_error(FakeTritonError(None), "m", 1)) is errors.ModelError
    assert set(TRITON_STATUS) <= {c.name for c in grpc.StatusCode}


def test_client_has_one_error_class_per_status():
    codes = set(grpc.StatusCode) - {grpc.StatusCode.OK}
    assert set(client_errors.ERRORS) == codes
    assert len(set(client_errors.ERRORS.values())) == len(codes)


class Flaky(recsys_pb2_grpc.RecommenderServicer):
    """Fails Popular with ``code`` the first ``failures`` times."""

    def __init__(self, code: grpc.StatusCode, failures: int):
        self.code, self.failures, self.calls = code, failures, 0

    def Popular(self, request, context):
        self.calls += 1
        if self.calls <= self.failures:
            context.abort(self.code, "try again")
        return pb.PopularResponse(latency_ms=1.0)


@pytest.mark.parametrize("code, failures, retried", [(grpc.StatusCode.UNAVAILABLE, 2, True), (grpc.StatusCode.INTERNAL, 1, False)])
def test_client_retries_only_unavailable(code, failures, retried):
    servicer = Flaky(code, failures)
    server = grpc.server(futures.ThreadPoolExecutor(2))
    recsys_pb2_grpc.add_RecommenderServicer_to_server(servicer, server)
    port = server.add_insecure_port("127.0.0.1:0")
    server.start()
    try:
        with RecsysClient(f"127.0.0.1:{port}", backoff_s=0.01) as client:
            if retried:
                assert client.popular(k=1).latency_ms == 1.0 and servicer.calls == failures + 1
            else:
                with pytest.raises(client_errors.Internal):
                    client.popular(k=1)
                assert servicer.calls == 1
    finally:
        server.stop(None)


def test_client_gives_up_on_unavailable_within_its_deadline():
    with RecsysClient("127.0.0.1:1", retries=50, backoff_s=0.05, timeout_s=0.5) as client:
        with pytest.raises((client_errors.Unavailable, client_errors.DeadlineExceeded)):
            client.popular(k=1)
