"""Hot reload of version N+1 under load, and A/B routing between two published versions.

Real pieces only: the tiny trained models exported twice (versions 1 and 2) into a copy of
the repository, the real gRPC server, the in-process backend and the real embedded Triton
(explicit model control). The orchestrator finds version 2 by polling the repository.
"""

from __future__ import annotations

import shutil
import threading
import time
from collections import Counter
from pathlib import Path

import grpc
import numpy as np
import pandas as pd
import pytest

from clients.client import RecsysClient
from export.onnx_export import export_repository
from orchestrator.candidates import SOURCES
from orchestrator.deployment import CONTROL, TREATMENT, ReloadError, ReloadWatcher, ab_bucket, artifacts_of
from orchestrator.service import create_server
from orchestrator.settings import ServeSettings


def _users(artifacts: Path, n: int) -> list[int]:
    return sorted(pd.read_parquet(artifacts / "interactions.parquet", columns=["user_id"])["user_id"].unique().tolist())[:n]


def _publish(artifacts: Path, repo: Path) -> int:
    """``recsys export`` of the same artifacts: the next version (gemm forced: no strategy trials)."""
    return export_repository(artifacts, repo, tree_implementation="gemm", update_manifest=False)["version"]


class Load:
    """Recommend calls in a loop on a thread, recording status, version and fallback of each."""

    def __init__(self, address: str, users: list[int]):
        self.client = RecsysClient(address, retries=0, timeout_s=10)
        self.users = users
        self.seen: Counter[tuple[str, str, bool]] = Counter()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        i = 0
        while not self._stop.is_set():
            user = self.users[i % len(self.users)]
            i += 1
            try:
                r = self.client.recommend(user, k=5)
                self.seen[("OK", r.model_version, r.is_fallback)] += 1
            except grpc.RpcError as exc:
                self.seen[(exc.code().name, "", False)] += 1

    def __enter__(self) -> Load:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join(30)
        self.client.close()

    def versions(self) -> set[str]:
        return {v for (status, v, fb) in self.seen if status == "OK" and not fb}

    def failed(self) -> int:
        return sum(n for (status, _, fb), n in self.seen.items() if status != "OK" or fb)


def _wait_version(load: Load, version: str, timeout_s: float) -> float:
    t0 = time.monotonic()
    while version not in load.versions():
        if time.monotonic() - t0 > timeout_s:
            raise AssertionError(f"version {version} never answered in {timeout_s} s; seen {dict(load.seen)}")
        time.sleep(0.1)
    return time.monotonic() - t0


@pytest.fixture
def repo_copy(tiny_repository, tmp_path) -> Path:
    repo = tmp_path / "model_repository"
    shutil.copytree(tiny_repository, repo, ignore=shutil.ignore_patterns("__pycache__", ".staging-*"))
    return repo


def _settings(artifacts: Path, repo: Path, tmp: Path, **kw) -> ServeSettings:
    base = {"history_db_path": tmp / "h.sqlite", "request_log": False, "health_poll_s": 0.2, "reload_poll_s": 0.2, "warmup_calls": 2}
    return ServeSettings(artifacts_dir=artifacts, model_repository=repo, **(base | kw))


def test_hot_reload_in_process_swaps_under_load(tiny_artifacts, repo_copy, tmp_path):
    first = int(max(p.name for p in (repo_copy / "user_tower").iterdir() if p.name.isdigit()))
    server, _ = create_server(_settings(tiny_artifacts, repo_copy, tmp_path))
    with server, Load(server.address, _users(tiny_artifacts, 20)) as load:
        _wait_version(load, str(first), 30)
        new = _publish(tiny_artifacts, repo_copy)
        took = _wait_version(load, str(new), 60)
        time.sleep(0.3)
    assert load.failed() == 0, dict(load.seen)
    assert load.versions() == {str(first), str(new)}
    assert took < 30
    assert server.recommender.versions == {CONTROL: new}


def test_hot_reload_on_triton_pins_versions_and_loses_nothing(tiny_artifacts, repo_copy, tmp_path, start_triton):
    triton = start_triton(repo_copy)
    first = int(max(p.name for p in (repo_copy / "user_tower").iterdir() if p.name.isdigit()))
    server, _ = create_server(_settings(tiny_artifacts, repo_copy, tmp_path, triton_url=triton.grpc_url))
    with server, Load(server.address, _users(tiny_artifacts, 20)) as load:
        _wait_version(load, str(first), 60)
        new = _publish(tiny_artifacts, repo_copy)
        _wait_version(load, str(new), 90)
        time.sleep(0.5)
        # the old version stays loaded beside the new one (version_policy latest 2)
        import tritonclient.grpc as grpcclient

        tc = grpcclient.InferenceServerClient(triton.grpc_url)
        assert tc.is_model_ready("user_tower", str(first)) and tc.is_model_ready("user_tower", str(new))
        # a request pinned to the old version ranks on that version: the fused CPU ranker_ensemble
        # runs its own version's graphs, so the pinned call goes to it (an ensemble would use the leaves)
        backend = server.recommender.backend
        h = np.full((3, 10), -1, np.int64)
        h[:, -2:] = [[1, 2]] * 3
        args = (
            np.array([3, 4, 5]),
            np.ones(3, np.float32),
            np.arange(3, dtype=np.float32),
            h,
            np.zeros((3, 10), np.float32),
            np.full((3, len(SOURCES)), -1.0, np.float32),
        )
        assert backend._fused is True
        old = backend.rank(*args, timeout_s=5, version=first)
        latest = backend.rank(*args, timeout_s=5, version=new)
        assert old.shape == latest.shape == (3,)
        # and each pinned call ran that version's graphs: the leaf models pinned agree
        backend._fused = False  # the ensemble's route for the old version: the pinned leaves
        np.testing.assert_allclose(backend.rank(*args, timeout_s=5, version=first), old, atol=1e-6)
        backend._fused = True
        stats = tc.get_inference_statistics("ranker_ensemble", str(first), as_json=True)["model_stats"][0]
        assert int(stats["inference_stats"]["success"]["count"]) >= 1  # the pinned call went to the old version
        tc.close()
    assert load.failed() == 0, dict(load.seen)
    assert load.versions() == {str(first), str(new)}


def test_a_reload_that_cannot_be_served_keeps_the_old_version(tiny_artifacts, repo_copy, tmp_path):
    server, _ = create_server(_settings(tiny_artifacts, repo_copy, tmp_path, reload_poll_s=0))
    before = server.recommender.versions
    # a "version" whose artifacts record hashes no folder has
    new = _publish(tiny_artifacts, repo_copy)
    info = repo_copy / "user_tower" / str(new) / "version.json"
    info.write_text(info.read_text().replace('"items.parquet": "', '"items.parquet": "0'))
    with pytest.raises(ReloadError, match="no artifacts folder"):
        artifacts_of(repo_copy, new, tiny_artifacts)
    watcher = ReloadWatcher(server.recommender, repo_copy, poll_s=0)
    assert watcher.check() is False and new in watcher.failed
    assert server.recommender.versions == before
    with server, RecsysClient(server.address) as client:
        r = client.recommend(_users(tiny_artifacts, 1)[0], k=3)
    assert r.model_version == str(before[CONTROL]) and not r.is_fallback


def test_ab_routes_users_by_stable_hash_and_reports_the_arm(tiny_artifacts, repo_copy, tmp_path):
    old = int(max(p.name for p in (repo_copy / "user_tower").iterdir() if p.name.isdigit()))
    new = _publish(tiny_artifacts, repo_copy)
    settings = _settings(tiny_artifacts, repo_copy, tmp_path, ab_version=old, ab_share=0.5, ab_salt="t")
    server, _ = create_server(settings)
    users = _users(tiny_artifacts, 40)
    with server, RecsysClient(server.address) as client:
        answers = {u: client.recommend(u, k=3) for u in users}
        again = {u: client.recommend(u, k=3) for u in users[:10]}
        anonymous = client.recommend(history=[int(m) for m in server.recommender.catalog.movie_ids[:3]], k=3)
    for u, r in answers.items():
        treated = ab_bucket(u, "t") < 0.5
        assert r.variant == (TREATMENT if treated else CONTROL)
        assert r.model_version == str(old if treated else new)
    assert {r.variant for r in answers.values()} == {CONTROL, TREATMENT}
    assert all(again[u].variant == answers[u].variant for u in again)  # stable per user
    assert anonymous.variant == CONTROL  # no user id: no arm but control


def test_ab_settings_are_validated():
    with pytest.raises(ValueError, match="ab_share > 0 needs ab_version"):
        ServeSettings(ab_share=0.2)
    with pytest.raises(ValueError, match="ab_share must be in"):
        ServeSettings(ab_version=1, ab_share=1.5)


def test_a_version_that_retires_the_treatment_ends_the_experiment(tiny_artifacts, repo_copy, tmp_path):
    old = int(max(p.name for p in (repo_copy / "user_tower").iterdir() if p.name.isdigit()))
    new = _publish(tiny_artifacts, repo_copy)
    server, _ = create_server(_settings(tiny_artifacts, repo_copy, tmp_path, reload_poll_s=0, ab_version=old, ab_share=1.0))
    users = _users(tiny_artifacts, 5)
    with server, RecsysClient(server.address) as client:
        assert {client.recommend(u, k=3).variant for u in users} == {TREATMENT}
        newest = _publish(tiny_artifacts, repo_copy)  # the backend keeps two versions: `old` goes
        assert server.recommender.reload(newest)
        answers = [client.recommend(u, k=3) for u in users]
    assert server.recommender.versions == {CONTROL: newest}
    assert {(r.variant, r.model_version, r.is_fallback) for r in answers} == {("", str(newest), False)}
    assert new < newest
