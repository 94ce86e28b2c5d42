"""The whole online path on the real embedded Triton: client -> orchestrator -> Triton + FAISS.

``TestRecommenderAPIOnTriton`` re-runs every backend-agnostic test of test_service.py
(every RPC, filter, MMR, exclude-seen, cold start, RecordInteraction, every bad-input class)
with the Triton backend; the rest is what needs a real Triton: parity with the in-process
backend, Triton unreachable, Triton stalled (deadline), ``recsys serve`` and ``recsys demo``.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from contextlib import contextmanager
from pathlib import Path

import numpy as np
import pytest
from test_service import TestRecommenderAPI as _BackendAgnostic
from test_service import make_api

from clients import errors as E
from clients.client import RecsysClient
from orchestrator.tritonserver import free_port
from protos.recsys.v1 import recsys_pb2 as pb

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def repo(tiny_repository, tmp_path_factory) -> Path:
    """A copy of the shared repository: Triton's Python backend writes __pycache__ into version folders."""
    return Path(shutil.copytree(tiny_repository, tmp_path_factory.mktemp("online") / "model_repository"))


@pytest.fixture(scope="module")
def triton(repo, start_triton):
    return start_triton(repo)


@pytest.fixture(scope="module")
def api(triton, tiny_artifacts, repo, tmp_path_factory):
    a, server = make_api(tiny_artifacts, repo, tmp_path_factory.mktemp("tri") / "h.sqlite", triton_url=triton.grpc_url)
    yield a
    a.client.close()
    server.stop()


class TestRecommenderAPIOnTriton(_BackendAgnostic):
    """test_service.TestRecommenderAPI with ``api`` served through Triton."""


@contextmanager
def stack(tiny_artifacts, tiny_repository, db: Path, **settings):
    a, server = make_api(tiny_artifacts, tiny_repository, db, **settings)
    try:
        yield a
    finally:
        a.client.close()
        server.stop()


def test_triton_answers_like_the_in_process_backend(api, tiny_artifacts, tiny_repository, tmp_path):
    assert api.server.recommender.backend.name == "triton"
    with stack(tiny_artifacts, tiny_repository, tmp_path / "h.sqlite") as local:
        assert local.server.recommender.backend.name == "in-process"
        for user in (api.user, api.user + 1, api.user + 2):
            remote = api.client.recommend(user, k=10)
            here = local.client.recommend(user, k=10)
            assert [i.movie_id for i in remote.items] == [i.movie_id for i in here.items]
            np.testing.assert_allclose([i.score for i in remote.items], [i.score for i in here.items], atol=1e-5)


def test_triton_unreachable_serves_the_fallback(tiny_artifacts, tiny_repository, tmp_path):
    from orchestrator.service import create_server
    from orchestrator.settings import ServeSettings

    settings = ServeSettings(
        artifacts_dir=tiny_artifacts,
        model_repository=tiny_repository,
        triton_url=f"127.0.0.1:{free_port()}",
        history_db_path=tmp_path / "h.sqlite",
        health_poll_s=0.2,
    )
    server, port = create_server(settings)
    with server, RecsysClient(f"127.0.0.1:{port}") as client:
        time.sleep(0.3)
        assert client.health() == "NOT_SERVING"
        resp = client.recommend(history=[int(m) for m in server.recommender.catalog.movie_ids[:3]], k=5)
        assert resp.is_fallback and resp.fallback_reason == pb.FALLBACK_REASON_MODEL_UNAVAILABLE
        assert len(resp.items) == 5 and resp.model_version == "popularity"
        assert len(client.similar(int(server.recommender.catalog.movie_ids[0]), k=3).items) == 3  # needs no Triton
        assert len(client.popular(k=3).items) == 3


@contextmanager
def stalled(triton):
    os.kill(triton.pid, signal.SIGSTOP)  # alive but silent: the worst case for a caller
    try:
        yield
    finally:
        os.kill(triton.pid, signal.SIGCONT)


def test_stalled_triton_deadline_and_timeout(api, triton, tiny_artifacts, repo, tmp_path):
    with stack(tiny_artifacts, repo, tmp_path / "h.sqlite", triton_url=triton.grpc_url, triton_timeout_s=0.3) as short:
        with stalled(triton):
            t0 = time.monotonic()
            with pytest.raises(E.DeadlineExceeded):
                api.client.recommend(api.user, k=5, timeout_s=0.5)
            assert time.monotonic() - t0 < 2.0  # the deadline, not a hang
            # Triton exceeds triton_timeout_s while the caller still has time: popular fallback
            resp = short.client.recommend(api.user, k=5, timeout_s=5)
            assert resp.is_fallback and resp.fallback_reason == pb.FALLBACK_REASON_MODEL_TIMEOUT
        assert not api.client.recommend(api.user, k=5).is_fallback  # recovers once Triton does


def test_recsys_serve_runs_and_stops_on_sigterm(triton, api, tiny_artifacts, repo, tmp_path):
    cmd = [
        sys.executable,
        "-m",
        "clients.cli",
        "serve",
        "--artifacts",
        str(tiny_artifacts),
        "--repo",
        str(repo),
        "--triton-url",
        triton.grpc_url,
        "--port",
        "0",
        "--metrics-port",
        "9100",
        "--history-db",
        str(tmp_path / "h.sqlite"),
        "--json",
        "--log-level",
        "warning",
    ]
    proc = subprocess.Popen(
        cmd, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env={**os.environ, "PYTHONUNBUFFERED": "1"}
    )
    try:
        lines = []
        while not lines or not lines[-1].startswith("}"):
            line = proc.stdout.readline()
            assert line, proc.stderr.read()
            lines.append(line)
        info = json.loads("".join(lines))
        assert info["backend"] == "triton" and info["triton"] == triton.grpc_url
        with RecsysClient(info["grpc"]) as client:
            client.wait_until_serving(30)
            assert len(client.recommend(api.user, k=3).items) == 3
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=30) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


def test_recsys_demo(tiny_artifacts, repo, capsys):
    from clients.cli import main

    assert main(["demo", "--artifacts", str(tiny_artifacts), "--repo", str(repo), "-k", "3", "--json", "--quiet"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert set(out) == {"recommend", "recommend_by_history", "similar"}
    assert len(out["recommend"]["items"]) == 3 and not out["recommend"]["is_fallback"]
    assert not out["recommend_by_history"]["is_fallback"] and len(out["similar"]["items"]) == 3
