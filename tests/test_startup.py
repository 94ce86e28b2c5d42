"""Start-up: which version the orchestrator pins, its hash check, health while the pinned version
is not READY, and retries of a version that failed to load.

Real pieces: the tiny model exported into a copy of the repository, the real embedded Triton
(explicit model control: it loads what is on disk when it starts, later versions only when
asked), the real gRPC server and its health service.
"""

from __future__ import annotations

import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import pytest

from clients.client import RecsysClient
from export.onnx_export import export_repository
from orchestrator.deployment import CONTROL, StartupError, start_version
from orchestrator.service import create_server
from orchestrator.settings import ServeSettings

ROOT = Path(__file__).resolve().parents[1]


def _settings(artifacts: Path, repo: Path, tmp: Path, **kw) -> ServeSettings:
    base = {
        "history_db_path": tmp / "h.sqlite",
        "request_log": False,
        "health_poll_s": 0.2,
        "reload_poll_s": 0.2,
        "warmup_calls": 2,
        "reload_retry_s": 0.5,
        "reload_retry_max_s": 1.0,
    }
    return ServeSettings(artifacts_dir=artifacts, model_repository=repo, **(base | kw))


def _publish(artifacts: Path, repo: Path) -> int:
    return export_repository(artifacts, repo, tree_implementation="gemm", update_manifest=False)["version"]


def _break_hashes(repo: Path, version: int) -> None:
    """Makes ``version``'s recorded item-table hash match no folder (as after a retrain without export)."""
    for info in repo.glob(f"*/{version}/version.json"):
        info.write_text(info.read_text().replace('"items.parquet": "', '"items.parquet": "0'))


def _wait(cond: Callable[[], bool], timeout_s: float, what: str) -> None:
    t0 = time.monotonic()
    while not cond():
        if time.monotonic() - t0 > timeout_s:
            raise AssertionError(f"{what}: not within {timeout_s} s")
        time.sleep(0.1)


def _user(artifacts: Path) -> int:
    import pandas as pd

    return int(pd.read_parquet(artifacts / "interactions.parquet", columns=["user_id"])["user_id"].min())


def test_a_version_exported_while_down_is_loaded_at_start_not_served_as_fallbacks(tiny_artifacts, repo_copy, tmp_path, start_triton):
    triton = start_triton(repo_copy)  # loads version 1, the only one on disk
    new = _publish(tiny_artifacts, repo_copy)  # lands while no orchestrator runs: nobody loads it
    settings = _settings(tiny_artifacts, repo_copy, tmp_path, triton_url=triton.grpc_url)
    # pinned to the version on disk that Triton has not loaded, the router is not ready
    # although Triton and its models are: health must not say SERVING then
    from orchestrator.backends import TritonBackend
    from orchestrator.catalog import Catalog
    from orchestrator.deployment import Router
    from orchestrator.service import make_store

    backend, store = TritonBackend(triton.grpc_url), make_store(settings)
    try:
        router = Router(settings, Catalog.load(tiny_artifacts), store, backend, new)
        assert backend.ready(5.0) and not router.ready(5.0)
        assert Router(settings, router.catalog, store, backend, new - 1).ready(5.0)
    finally:
        backend.close()
        store.close()
    server, _ = create_server(settings)
    # pinned to the newest READY version, not to the newest on disk
    assert server.recommender.versions == {CONTROL: new - 1}
    user = _user(tiny_artifacts)
    with server, RecsysClient(server.address, retries=0, timeout_s=10) as client:
        _wait(lambda: client.health() == "SERVING", 60, "SERVING")
        first = client.recommend(user, k=3)
        assert not first.is_fallback and first.model_version in (str(new - 1), str(new))
        # the watcher's first poll loads the newer version into Triton and swaps to it
        _wait(lambda: server.recommender.versions == {CONTROL: new}, 90, f"version {new} served")
        after = client.recommend(user, k=3)
        assert (after.model_version, after.is_fallback) == (str(new), False)
        # health is polled (every 0.2 s here, each check timing out after 0.4 s): on a loaded
        # machine a check during the load can time out, and the way back to SERVING runs the
        # warm-up first, so SERVING returns within a few polls of the swap, not at the swap
        _wait(lambda: client.health() == "SERVING", 30, "SERVING after the swap")
    assert server.metrics.version_load_failures._value.get() == 0


def test_not_serving_while_the_pinned_version_is_not_ready_then_retried_until_it_loads(tiny_artifacts, repo_copy, tmp_path, start_triton):
    triton = start_triton(repo_copy)  # serves version 1
    new = _publish(tiny_artifacts, repo_copy)
    graph = repo_copy / "user_tower" / str(new) / "model.onnx"
    good = graph.read_bytes()
    graph.write_bytes(b"not an onnx graph")  # Triton cannot load version 2
    _break_hashes(repo_copy, new - 1)  # and version 1's catalog is gone: 2 is the only candidate
    server, _ = create_server(_settings(tiny_artifacts, repo_copy, tmp_path, triton_url=triton.grpc_url))
    assert server.recommender.versions == {CONTROL: new}
    user = _user(tiny_artifacts)
    with server, RecsysClient(server.address, retries=0, timeout_s=10) as client:
        _wait(lambda: server.reloader.failed.get(new) is not None and server.reloader.failed[new].attempts >= 2, 60, "two failed loads")
        # Triton itself is up (its health says live), the pinned version is not READY in it
        assert server.recommender.backend.live(2.0) and not server.recommender.backend.version_ready(new, 2.0)
        assert client.health() == "NOT_SERVING"
        answer = client.recommend(user, k=3)
        assert answer.is_fallback  # the popular movies, said so
        failures = server.metrics.version_load_failures._value.get()
        assert failures >= 2
        assert "recsys_version_load_failures_total" in server.metrics.text()
        graph.write_bytes(good)  # fixed: the next retry loads it
        _wait(lambda: client.health() == "SERVING", 60, "SERVING after the fix")
        after = client.recommend(user, k=3)
        assert (after.model_version, after.is_fallback) == (str(new), False)
        # the watcher forgets the failures once its load call returns (health may see READY first)
        _wait(lambda: new not in server.reloader.failed, 30, "failures cleared")


def test_retries_back_off_and_give_up_on_a_newer_version(tiny_artifacts, repo_copy, tmp_path):
    server, _ = create_server(_settings(tiny_artifacts, repo_copy, tmp_path, reload_poll_s=0))
    served = server.recommender.versions
    new = _publish(tiny_artifacts, repo_copy)
    _break_hashes(repo_copy, new)
    from orchestrator.deployment import ReloadWatcher

    delays: list[float] = []  # the wait each failure scheduled before the next attempt
    watcher = ReloadWatcher(server.recommender, repo_copy, 0, retry_s=0.1, retry_max_s=0.3, max_attempts=4)
    watcher.on_failure = lambda: delays.append(watcher.failed[new].delay_s)  # scheduled, not read off a clock
    t0 = time.monotonic()
    while len(delays) < 4 and time.monotonic() - t0 < 30:  # 0.6 s of waits, more on a loaded machine
        assert watcher.check() is False
        time.sleep(0.01)
    t1 = time.monotonic()
    while time.monotonic() - t1 < 1.0:  # well past the last wait (0.3 s): no fifth attempt
        assert watcher.check() is False
        time.sleep(0.01)
    assert len(delays) == watcher.failed[new].attempts == 4  # bounded: then left alone
    assert delays == pytest.approx([0.1, 0.2, 0.3, 0.3]), delays  # doubling, capped at retry_max_s
    assert "no artifacts folder" in watcher.failed[new].error
    assert server.recommender.versions == served
    server.stop()


def test_start_up_checks_the_catalog_hashes(tiny_artifacts, repo_copy, tmp_path):
    from orchestrator.backends import InProcessBackend

    new = _publish(tiny_artifacts, repo_copy)
    backend = InProcessBackend(repo_copy)
    try:
        assert start_version(repo_copy, tiny_artifacts, backend) == (new, tiny_artifacts.resolve())
        _break_hashes(repo_copy, new)  # the newest's catalog is gone: the older one is served
        assert start_version(repo_copy, tiny_artifacts, backend)[0] == new - 1
        _break_hashes(repo_copy, new - 1)
        with pytest.raises(StartupError, match="no published version can be served"):
            start_version(repo_copy, tiny_artifacts, backend)
    finally:
        backend.close()
    with pytest.raises(StartupError):
        create_server(_settings(tiny_artifacts, repo_copy, tmp_path))


def test_recsys_serve_refuses_to_start_on_a_catalog_mismatch(tiny_artifacts, repo_copy, tmp_path):
    version = max(int(p.name) for p in (repo_copy / "user_tower").iterdir() if p.name.isdigit())
    _break_hashes(repo_copy, version)
    cmd = [sys.executable, "-m", "clients.cli", "serve", "--in-process", "--artifacts", str(tiny_artifacts), "--repo", str(repo_copy)]
    env_db = {"RECSYS_HISTORY_DB_PATH": str(tmp_path / "h.sqlite"), "RECSYS_REQUEST_LOG": "off"}
    import os

    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=120, env=os.environ | env_db)
    assert proc.returncode == 1, proc.stdout + proc.stderr
    assert "start-up refused" in proc.stderr and "no artifacts folder" in proc.stderr
    assert "grpc" not in proc.stdout  # nothing announced: the server never listened
