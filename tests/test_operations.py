"""Operating the orchestrator: API keys, TLS, metrics, the request log, replay and DeleteUser.

Every behaviour is checked on a real server (port 0, in-process backend over the tiny
exported repository) through the real client or a raw stub.
"""

from __future__ import annotations

import asyncio
import json
import re
import shutil
import sqlite3
import subprocess
import threading
import time
import urllib.request
from pathlib import Path

import grpc
import pandas as pd
import pytest
from grpc_reflection.v1alpha.proto_reflection_descriptor_database import ProtoReflectionDescriptorDatabase
from prometheus_client.parser import text_string_to_metric_families

from clients import errors as E
from clients.cli import main
from clients.client import AsyncRecsysClient, RecsysClient, recommend_request
from orchestrator.auth import TokenBucket, parse_keys
from orchestrator.metrics import Metrics
from orchestrator.requestlog import LogRow, RequestLog, replay
from orchestrator.service import create_server
from orchestrator.settings import ServeSettings
from protos.recsys.v1 import recsys_pb2 as pb
from protos.recsys.v1 import recsys_pb2_grpc

ROOT = Path(__file__).resolve().parents[1]
NEW_USER = 10_000_001


def serve(artifacts: Path, repo: Path, tmp: Path, **settings):
    s = ServeSettings(artifacts_dir=artifacts, model_repository=repo, history_db_path=tmp / "history.sqlite", health_poll_s=0.2, **settings)
    server, port = create_server(s)
    return server.start(), port


def active_users(artifacts: Path, n: int) -> list[int]:
    counts = pd.read_parquet(artifacts / "interactions.parquet").user_id.value_counts()
    return [int(u) for u in counts[(counts >= 8) & (counts <= 30)].index[:n]]


def samples(text: str) -> dict[tuple[str, frozenset], float]:
    return {(s.name, frozenset(s.labels.items())): s.value for family in text_string_to_metric_families(text) for s in family.samples}


def sample(found: dict, name: str, **labels) -> float:
    return found.get((name, frozenset(labels.items())), 0.0)


# ----------------------------------------------------------------------------- API keys


def test_key_entries_parse_and_fail_without_echoing_the_key():
    keys = parse_keys(["# comment", "", "alpha", "beta:2.5  # trailing"], "keys.txt")
    assert sorted(k.rate_per_s or 0 for k in keys.values()) == [0, 2.5]
    assert all(k.tag.startswith("sha256:") and len(k.tag) == 15 for k in keys.values())
    for bad, words in (
        (["secret:fast"], "entry 1: 'fast' is neither a requests_per_second number nor a scope"),
        (["secret:0"], "must be a finite number > 0"),
        (["a", "a"], "listed twice"),
        (["two words"], "printable ASCII"),
    ):
        with pytest.raises(ValueError, match=words) as excinfo:
            parse_keys(bad, "keys.txt")
        assert "secret" not in str(excinfo.value)


def test_token_bucket_bursts_one_second_then_holds_the_rate():
    now = [0.0]
    bucket = TokenBucket(4.0, 4.0, clock=lambda: now[0])
    assert [bucket.take() for _ in range(4)] == [0.0] * 4
    assert bucket.take() == pytest.approx(0.25)
    now[0] += 0.25
    assert bucket.take() == 0.0 and bucket.take() > 0


@pytest.fixture(scope="module")
def keyed(tiny_artifacts, tiny_repository, tmp_path_factory):
    tmp = tmp_path_factory.mktemp("keys")
    (tmp / "keys.txt").write_text("# key[:requests_per_second]\nfree-key-0001\nslow-key-0002:2\n")
    server, port = serve(tiny_artifacts, tiny_repository, tmp, api_keys_file=tmp / "keys.txt", api_keys="env-key-0003:50")
    yield server, f"127.0.0.1:{port}"
    server.stop()


def test_api_keys_gate_the_recommender_but_not_health(keyed, tiny_artifacts, caplog):
    server, target = keyed
    user = active_users(tiny_artifacts, 1)[0]
    with RecsysClient(target, retries=0) as anonymous:
        anonymous.wait_until_serving(60)  # health needs no key
        assert anonymous.health() == "SERVING"
        services = ProtoReflectionDescriptorDatabase(anonymous.channel).get_services()
        assert "recsys.v1.Recommender" in services  # reflection needs no key either
        with pytest.raises(E.Unauthenticated, match="requires an API key.*x-api-key"):
            anonymous.recommend(user, k=3)
    with RecsysClient(target, retries=0, api_key="wrong-key-9999") as wrong:
        with pytest.raises(E.Unauthenticated, match="unknown API key"):
            wrong.popular(k=3)
    assert "wrong-key-9999" not in caplog.text and "sha256:" in caplog.text  # logged by hash only
    for key in ("free-key-0001", "env-key-0003"):
        with RecsysClient(target, api_key=key) as ok:
            assert len(ok.recommend(user, k=3).items) == 3
    found = samples(server.metrics.text())
    assert sample(found, "recsys_requests_total", rpc="Recommend", code="UNAUTHENTICATED", variant="") == 1
    assert sample(found, "recsys_requests_total", rpc="Popular", code="UNAUTHENTICATED", variant="") == 1


def test_rate_limit_is_resource_exhausted_then_recovers(keyed):
    server, target = keyed
    with RecsysClient(target, retries=0, api_key="slow-key-0002") as client:
        time.sleep(1.0)  # a full bucket: 2 requests/s, burst 2
        client.popular(k=1)
        client.popular(k=1)
        with pytest.raises(E.ResourceExhausted, match=r"rate limit of 2 requests/s") as excinfo:
            client.popular(k=1)
        wait_s = float(re.search(r"retry in ([\d.]+) s", excinfo.value.details).group(1))
        assert 0 < wait_s <= 0.5
        time.sleep(wait_s + 0.05)
        assert len(client.popular(k=1).items) == 1
    assert sample(samples(server.metrics.text()), "recsys_requests_total", rpc="Popular", code="RESOURCE_EXHAUSTED", variant="") >= 1


# ----------------------------------------------------------------------------- TLS


@pytest.fixture(scope="module")
def certificate(tmp_path_factory) -> tuple[Path, Path]:
    """A self-signed certificate for localhost / 127.0.0.1 (EC P-256, one day)."""
    openssl = shutil.which("openssl")
    if openssl is None:
        pytest.skip("the openssl command is not installed")
    tmp = tmp_path_factory.mktemp("tls")
    cert, key = tmp / "cert.pem", tmp / "key.pem"
    subprocess.run(
        [
            openssl,
            "req",
            "-x509",
            "-newkey",
            "ec",
            "-pkeyopt",
            "ec_paramgen_curve:prime256v1",
            "-nodes",
            "-days",
            "1",
            "-subj",
            "/CN=localhost",
            "-addext",
            "subjectAltName=DNS:localhost,IP:127.0.0.1",
            "-keyout",
            str(key),
            "-out",
            str(cert),
        ],
        check=True,
        capture_output=True,
    )
    return cert, key


def test_tls_round_trip(tiny_artifacts, tiny_repository, tmp_path, certificate):
    cert, key = certificate
    server, port = serve(tiny_artifacts, tiny_repository, tmp_path, tls_cert=cert, tls_key=key, api_keys="tls-key-0001")
    target = f"127.0.0.1:{port}"
    user = active_users(tiny_artifacts, 1)[0]
    try:
        with RecsysClient(target, tls_ca=cert, api_key="tls-key-0001") as client:
            client.wait_until_serving(60)
            assert len(client.recommend(user, k=4).items) == 4

        async def async_call() -> int:
            async with AsyncRecsysClient(target, tls_ca=cert.read_bytes(), api_key="tls-key-0001") as aclient:
                return len((await aclient.popular(k=2)).items)

        assert asyncio.run(async_call()) == 2
        with RecsysClient(target, retries=0, timeout_s=2) as plaintext:
            with pytest.raises(E.RecsysRpcError):  # a plaintext client cannot talk to a TLS port
                plaintext.health()
        args = ["--target", target, "--tls-ca", str(cert), "--api-key", "tls-key-0001"]
        assert main(["popular", "-k", "2", "--json", *args]) == 0
    finally:
        server.stop()


# ----------------------------------------------------------------------------- metrics


def test_metrics_page_counts_calls_codes_stages_and_fallbacks(tiny_artifacts, tiny_repository, tmp_path):
    server, port = serve(tiny_artifacts, tiny_repository, tmp_path, metrics_port=0)
    user = active_users(tiny_artifacts, 1)[0]
    try:
        with RecsysClient(f"127.0.0.1:{port}", retries=0) as client:
            client.wait_until_serving(60)
            client.recommend(user, k=5)
            assert client.recommend(NEW_USER, k=5).fallback_reason == pb.FALLBACK_REASON_NO_HISTORY
            with pytest.raises(E.InvalidArgument):
                client.recommend(user, k=0)
            client.batch_recommend([recommend_request(user, k=2), recommend_request(NEW_USER, k=2)])
            client.popular(k=3)
        assert server.metrics_port
        deadline = time.monotonic() + 10
        while True:  # the request log's writer thread counts a row once it is written, after the answer
            with urllib.request.urlopen(f"http://127.0.0.1:{server.metrics_port}/metrics", timeout=5) as page:
                text = page.read().decode()
            if sample(samples(text), "recsys_request_log_rows_total") >= 5 or time.monotonic() > deadline:
                break
            time.sleep(0.05)
    finally:
        server.stop()
    found = samples(text)
    calls = lambda rpc, code: sample(found, "recsys_requests_total", rpc=rpc, code=code, variant="")  # noqa: E731
    assert calls("Recommend", "OK") == 2 and calls("Recommend", "INVALID_ARGUMENT") == 1
    assert calls("BatchRecommend", "OK") == 1 and calls("Popular", "OK") == 1 and calls("Health/Check", "OK") >= 1
    assert sample(found, "recsys_request_latency_seconds_count", rpc="Recommend") == 3
    assert sample(found, "recsys_fallbacks_total", reason="no_history") == 2  # one Recommend, one in the batch
    assert sample(found, "recsys_fallbacks_total", reason="model_timeout") == 0  # present from the start
    assert sample(found, "recsys_stage_latency_seconds_count", stage="ranking") == 2  # the two model answers
    assert sample(found, "recsys_stage_latency_seconds_count", stage="history") == 4
    assert sample(found, "recsys_triton_reachable") == 1.0
    assert sample(found, "recsys_model_info", model_version="1") == 1.0
    assert sample(found, "recsys_request_log_rows_total") >= 5


_PROMQL_WORDS = {"by", "without", "on", "ignoring", "group_left", "group_right", "bool", "offset", "and", "or", "unless"}


def promql_metrics(expr: str) -> set[str]:
    """The metric names a PromQL expression reads (not functions, labels or keywords)."""
    expr = re.sub(r'"(?:[^"\\]|\\.)*"', '""', expr)
    expr = re.sub(r"\{[^}]*\}|\[[^\]]*\]", " ", expr)
    expr = re.sub(r"\b(by|without|on|ignoring|group_left|group_right)\s*\([^)]*\)", " ", expr)
    names = re.findall(r"(?<![\w.:])([a-zA-Z_:][\w:]*)(?![\w:])(?!\s*\()", expr)
    return {n for n in names if n not in _PROMQL_WORDS}


def exported_names() -> set[str]:
    """Every sample name orchestrator/metrics.py exports."""
    suffixes = {"counter": ("_total",), "histogram": ("_bucket", "_count", "_sum"), "gauge": ("",), "info": ("_info",)}
    return {f.name + s for f in Metrics().registry.collect() for s in suffixes[f.type]}


def test_dashboards_query_only_exported_or_triton_metrics():
    assert promql_metrics('histogram_quantile(0.99, sum by (le) (rate(a_bucket{x="y"}[1m]))) / clamp_min(b, 1e-9)') == {"a_bucket", "b"}
    exported = exported_names()
    used: set[str] = set()
    for path in sorted((ROOT / "deploy" / "grafana" / "dashboards").glob("*.json")):
        for panel in json.loads(path.read_text())["panels"]:
            for target in panel["targets"]:
                for name in promql_metrics(target["expr"]):
                    used.add(name)
                    assert name in exported or name.startswith("nv_") or name == "up", f"{path.name}: {panel['title']}: {name}"
    assert {
        "recsys_requests_total",
        "recsys_request_latency_seconds_bucket",
        "recsys_stage_latency_seconds_bucket",
        "recsys_fallbacks_total",
        "recsys_model_info",
        "recsys_triton_reachable",
        "nv_inference_queue_duration_us",
        "nv_inference_compute_infer_duration_us",
    } <= used


# ----------------------------------------------------------------------------- request log, replay


def test_request_log_rows_and_replay_hit_rate(tiny_artifacts, tiny_repository, tmp_path, capsys):
    server, port = serve(tiny_artifacts, tiny_repository, tmp_path, request_log_path=tmp_path / "requests.sqlite")
    user = active_users(tiny_artifacts, 1)[0]
    channel = grpc.insecure_channel(f"127.0.0.1:{port}")
    stub = recsys_pb2_grpc.RecommenderStub(channel)
    try:
        with RecsysClient(f"127.0.0.1:{port}") as client:
            client.wait_until_serving(60)
            response, call = stub.Recommend.with_call(recommend_request(user, k=5), timeout=10)
            request_id = dict(call.trailing_metadata())["x-request-id"]
            cold = client.recommend(NEW_USER, k=5)
            client.recommend(history=[int(server.recommender.catalog.movie_ids[0])], k=5)
            client.popular(k=3)
            with pytest.raises(E.InvalidArgument) as failed:
                client.recommend(user, k=0)
            assert re.fullmatch(r"[0-9a-f]{32}", failed.value.request_id)  # errors carry their id too
            later = int(time.time()) + 60
            hit, miss_before = response.items[0].movie_id, response.items[1].movie_id
            client.record_interaction(user, hit, 4.0, later)  # after the request: a hit
            client.record_interaction(user, miss_before, 4.0, later - 3600)  # before it: not a hit
            client.record_interaction(NEW_USER, cold.items[2].movie_id, 0.0, later)
    finally:
        channel.close()
        server.stop()  # writes the queued rows
    log_db, history_db = tmp_path / "requests.sqlite", tmp_path / "history.sqlite"
    with sqlite3.connect(log_db) as conn:
        conn.row_factory = sqlite3.Row
        rows = [dict(r) for r in conn.execute("SELECT * FROM requests ORDER BY timestamp")]
    assert [r["rpc"] for r in rows] == ["Recommend", "Recommend", "Recommend", "Popular"]
    first = rows[0]
    assert first["request_id"] == request_id and first["user_id"] == user and first["model_version"] == "1"
    assert json.loads(first["movie_ids"]) == [i.movie_id for i in response.items]
    assert json.loads(first["scores"]) == pytest.approx([i.score for i in response.items], abs=1e-5)
    assert first["fallback_reason"] is None and first["variant"] == "" and first["latency_ms"] > 0
    assert abs(first["timestamp"] - time.time()) < 120
    assert (rows[1]["user_id"], rows[1]["fallback_reason"], rows[1]["model_version"]) == (NEW_USER, "no_history", "popularity")
    assert rows[2]["user_id"] is None and rows[3]["user_id"] is None

    report = replay(log_db, history_db)
    overall = report["overall"]
    assert (overall["requests"], overall["users"], overall["items"], overall["hits"]) == (2, 2, 10, 2)
    assert overall["hit_rate"] == pytest.approx(0.2) and overall["request_hit_rate"] == 1.0
    assert report["by_model_version"]["1"]["hits"] == 1 and report["by_model_version"]["popularity"]["hits"] == 1
    assert report["by_variant"][""]["items"] == 10
    assert replay(log_db, history_db, horizon_s=30)["overall"]["hits"] == 0  # the interactions came 60 s later
    capsys.readouterr()
    assert main(["replay", "--log", str(log_db), "--db", str(history_db), "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["overall"]["hit_rate"] == pytest.approx(0.2)
    assert main(["replay", "--log", str(log_db), "--db", str(history_db)]) == 0
    assert "overall" in capsys.readouterr().out
    assert main(["replay", "--log", str(tmp_path / "missing.sqlite"), "--db", str(history_db)]) == 1


def test_request_log_drops_instead_of_blocking(tmp_path):
    metrics = Metrics()
    log = RequestLog(tmp_path / "r.sqlite", queue_size=2, on_drop=metrics.request_log_dropped.inc, on_write=metrics.request_log_rows.inc)
    row = LogRow("id", time.time(), 1, "Recommend", [1, 2], [0.5, 0.25], 3.0, "1")
    blocker = sqlite3.connect(tmp_path / "r.sqlite", isolation_level=None)
    blocker.execute("BEGIN EXCLUSIVE")  # the writer stalls as on a slow disk
    try:
        assert log.log(row)
        deadline = time.monotonic() + 5
        while log._queue.qsize() and time.monotonic() < deadline:  # the writer took it and waits
            time.sleep(0.01)
        assert log.log(row) and log.log(row)  # the queue is full now
        t0 = time.perf_counter()
        assert not log.log(row)
        assert time.perf_counter() - t0 < 0.05
    finally:
        blocker.execute("ROLLBACK")
        blocker.close()
    log.close()
    assert log.dropped == 1 and not log.log(row)  # closed: dropped too
    found = samples(metrics.text())
    assert sample(found, "recsys_request_log_dropped_total") == 2 and sample(found, "recsys_request_log_rows_total") == 3
    with sqlite3.connect(tmp_path / "r.sqlite") as conn:
        assert conn.execute("SELECT COUNT(*) FROM requests").fetchone()[0] == 3


# ----------------------------------------------------------------------------- DeleteUser


def test_delete_user_purges_history_and_request_log(tiny_artifacts, tiny_repository, tmp_path, capsys):
    server, port = serve(tiny_artifacts, tiny_repository, tmp_path)
    user, other = active_users(tiny_artifacts, 2)
    target = f"127.0.0.1:{port}"
    try:
        with RecsysClient(target) as client:
            client.wait_until_serving(60)
            stored = len(server.recommender.store.history(user))
            assert not client.recommend(user, k=3).is_fallback
            client.batch_recommend([recommend_request(user, k=2), recommend_request(other, k=2)])
            client.record_interaction(user, int(server.recommender.catalog.movie_ids[0]), 3.0)
            gone = client.delete_user(user)  # the rows are still queued: they go too
            assert (gone.interactions_deleted, gone.request_log_rows_deleted) == (stored + 1, 2)
            assert len(server.recommender.store.history(user)) == 0
            after = client.recommend(user, k=3)
            assert after.is_fallback and after.fallback_reason == pb.FALLBACK_REASON_NO_HISTORY
            assert len(server.recommender.store.history(other)) > 0  # nobody else is touched
            with pytest.raises(E.InvalidArgument, match="user_id must be >= 1"):
                client.delete_user(0)
        capsys.readouterr()
        assert main(["delete-user", "--user", str(user), "--target", target, "--json"]) == 0
        body = json.loads(capsys.readouterr().out)
        assert body == {"user_id": user, "interactions_deleted": 0, "request_log_rows_deleted": 1}  # the fallback's row
    finally:
        server.stop()
    with sqlite3.connect(server.recommender.settings.request_log_db()) as conn:
        users = [u for (u,) in conn.execute("SELECT user_id FROM requests")]
    assert user not in users and users.count(other) == 1
    with sqlite3.connect(tmp_path / "history.sqlite") as conn:
        assert conn.execute("SELECT COUNT(*) FROM interactions WHERE user_id = ?", (user,)).fetchone()[0] == 0


def test_delete_user_without_request_log(tiny_artifacts, tiny_repository, tmp_path):
    server, port = serve(tiny_artifacts, tiny_repository, tmp_path, request_log=False)
    try:
        assert server.request_log is None
        with RecsysClient(f"127.0.0.1:{port}") as client:
            client.wait_until_serving(60)
            client.record_interaction(NEW_USER, int(server.recommender.catalog.movie_ids[0]), 3.0)
            gone = client.delete_user(NEW_USER)
            assert (gone.interactions_deleted, gone.request_log_rows_deleted) == (1, 0)
    finally:
        server.stop()
    assert not server.recommender.settings.request_log_db().exists()


# ----------------------------------------------------------------------------- settings


def test_operations_settings(tmp_path):
    s = ServeSettings.from_env(
        {"RECSYS_REQUEST_LOG": "off", "RECSYS_API_KEYS": "a,b:3", "RECSYS_TLS_CERT": "c.pem", "RECSYS_TLS_KEY": "k.pem"}
    )
    assert s.request_log is False and s.tls_cert == Path("c.pem") and "a,b:3" not in repr(s)
    with pytest.raises(ValueError, match="RECSYS_REQUEST_LOG"):
        ServeSettings.from_env({"RECSYS_REQUEST_LOG": "maybe"})
    with pytest.raises(ValueError, match="tls_cert and tls_key go together"):
        ServeSettings(tls_cert=tmp_path / "c.pem")
    db = tmp_path / "h.sqlite"
    assert ServeSettings(history_db_path=db).request_log_db() == tmp_path / "h-requests.sqlite"
    missing = ServeSettings(tls_cert=tmp_path / "c.pem", tls_key=tmp_path / "k.pem", history_db_path=db)
    with pytest.raises(RuntimeError, match=r"tls_key .*k\.pem cannot be read"):
        create_server(missing)
    with pytest.raises(ValueError, match="listed twice"):
        create_server(ServeSettings(api_keys="x,x", history_db_path=db))


def test_stop_flushes_under_concurrent_load(tiny_artifacts, tiny_repository, tmp_path):
    # threads above the 4 callers: gRPC's maximum_concurrent_rpcs equals workers, and a call
    # still closing when the next one starts would otherwise be refused (that is admission's
    # test, tests/test_admission.py; this one is about the flush)
    server, port = serve(tiny_artifacts, tiny_repository, tmp_path, workers=8)
    errors: list[BaseException] = []

    def hammer() -> None:
        try:
            with RecsysClient(f"127.0.0.1:{port}") as client:
                for _ in range(10):
                    client.popular(k=2)
        except BaseException as exc:  # surfaced below
            errors.append(exc)

    with RecsysClient(f"127.0.0.1:{port}") as client:
        client.wait_until_serving(60)
    threads = [threading.Thread(target=hammer) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    server.stop()
    assert not errors
    with sqlite3.connect(server.recommender.settings.request_log_db()) as conn:
        assert conn.execute("SELECT COUNT(*) FROM requests WHERE rpc = 'Popular'").fetchone()[0] == 40
