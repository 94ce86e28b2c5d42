"""Hot reload of version N+1 under load, and A/B routing between two published versions.

Real pieces only: the tiny trained models exported twice (versions 1 and 2) into a copy of
the repository, the real gRPC server, the in-process backend and the real embedded Triton
(explicit model control). The orchestrator finds version 2 by polling the repository.

The hot-reload tests publish a *perturbed* version 2 (user tower and ranker changed before
the export, catalog unchanged), so every user's answer differs between the versions: an
answer labelled with one version but computed (wholly or partly) by the other does not
match that version's reference answer, and the tests fail.
"""

from __future__ import annotations

import shutil
import threading
import time
from collections import Counter
from pathlib import Path

import grpc
import lightgbm as lgb
import numpy as np
import pandas as pd
import pytest
import torch

from clients.client import RecsysClient
from export.onnx_export import export_repository
from export.ranker import split_linear_base, with_linear_base
from orchestrator.candidates import SOURCES
from orchestrator.contract import RANKER_HISTORY
from orchestrator.deployment import CONTROL, TREATMENT, ReloadError, ReloadWatcher, ab_bucket, artifacts_of
from orchestrator.service import create_server
from orchestrator.settings import ServeSettings


def _users(artifacts: Path, n: int) -> list[int]:
    return sorted(pd.read_parquet(artifacts / "interactions.parquet", columns=["user_id"])["user_id"].unique().tolist())[:n]


def _publish(artifacts: Path, repo: Path) -> int:
    """``recsys export`` of the same artifacts: the next version (gemm forced: no strategy trials)."""
    return export_repository(artifacts, repo, tree_implementation="gemm", update_manifest=False)["version"]


def _perturbed(artifacts: Path, out: Path) -> Path:
    """A copy of ``artifacts`` whose user tower and ranker answer differently (same catalog).

    The user tower's last layer gets seeded noise (other retrieval scores and candidates) and
    every ranker leaf value is doubled, and so is the ranker's linear EASE term (every ranker
    score doubles), so a version exported from it answers every user differently, and an answer
    mixing the two versions' models matches neither version's answers.
    """
    shutil.copytree(artifacts, out)
    ckpt = torch.load(out / "two_tower.pt", map_location="cpu", weights_only=False)
    gen = torch.Generator().manual_seed(7)
    for name in ("user_tower.mlp.4.weight", "user_tower.mlp.4.bias"):
        t = ckpt["state_dict"][name]
        t += 0.5 * t.std() * torch.randn(t.shape, generator=gen)
    torch.save(ckpt, out / "two_tower.pt")
    booster, base = split_linear_base(lgb.Booster(model_file=str(out / "ranker.lgb")))
    for tree in booster.dump_model()["tree_info"]:
        for leaf in range(tree["num_leaves"]):
            booster.set_leaf_output(tree["tree_index"], leaf, 2.0 * booster.get_leaf_output(tree["tree_index"], leaf))
    if base is not None:
        booster = with_linear_base(booster, base[0], 2.0 * base[1])
    booster.save_model(str(out / "ranker.lgb"))
    return out


Answer = tuple[tuple[int, ...], tuple[float, ...]]
"""An answer's movie ids and scores."""


def _answer(r) -> Answer:
    return tuple(i.movie_id for i in r.items), tuple(i.score for i in r.items)


def _same(a: Answer, b: Answer) -> bool:
    # Triton's dynamic batcher may batch a call with others: float32 sums in another order
    return a[0] == b[0] and np.allclose(a[1], b[1], rtol=1e-4, atol=1e-5)


class Load:
    """Recommend calls in a loop on ``threads`` threads, recording status, version and fallback of
    each, and every personal answer (start and end time, user, version, movies, scores)."""

    def __init__(self, address: str, users: list[int], threads: int = 1):
        self.client = RecsysClient(address, retries=0, timeout_s=10)
        self.users = users
        self.seen: Counter[tuple[str, str, bool]] = Counter()
        self.answers: list[tuple[float, float, int, str, Answer]] = []
        self._stop = threading.Event()
        self._threads = [threading.Thread(target=self._run, args=(t,), daemon=True) for t in range(threads)]

    def _run(self, offset: int) -> None:
        i = offset
        while not self._stop.is_set():
            user = self.users[i % len(self.users)]
            i += 1
            t0 = time.monotonic()
            try:
                r = self.client.recommend(user, k=5)
                self.seen[("OK", r.model_version, r.is_fallback)] += 1
                if not r.is_fallback:
                    self.answers.append((t0, time.monotonic(), user, r.model_version, _answer(r)))
            except grpc.RpcError as exc:
                self.seen[(exc.code().name, "", False)] += 1

    def __enter__(self) -> Load:
        for t in self._threads:
            t.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        for t in self._threads:
            t.join(30)
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


def _settings(artifacts: Path, repo: Path, tmp: Path, **kw) -> ServeSettings:
    base = {"history_db_path": tmp / "h.sqlite", "request_log": False, "health_poll_s": 0.2, "reload_poll_s": 0.2, "warmup_calls": 2}
    return ServeSettings(artifacts_dir=artifacts, model_repository=repo, **(base | kw))


def _references(address: str, users: list[int], version: str) -> dict[int, Answer]:
    """Each user's answer, all of them from ``version`` (the server serves only it now)."""
    with RecsysClient(address, retries=0, timeout_s=10) as client:
        out = {}
        for u in users:
            r = client.recommend(u, k=5)
            assert (r.model_version, r.is_fallback) == (version, False), (u, r.model_version, r.fallback_reason)
            out[u] = _answer(r)
    return out


def _check_no_mix(load: Load, refs: dict[str, dict[int, Answer]], new: str) -> None:
    """Every answer is its labelled version's reference answer, and once an answer of ``new``
    arrived no call started later was answered by the old version."""
    users = refs[new].keys()
    assert all(not _same(refs[v][u], refs[new][u]) for v in refs if v != new for u in users), "the perturbed version answers alike"
    wrong = [(u, v, a) for _, _, u, v, a in load.answers if v not in refs or not _same(a, refs[v][u])]
    assert not wrong, f"{len(wrong)} of {len(load.answers)} answers match no version's reference, e.g. {wrong[:2]}"
    first_new = min(end for _, end, _, v, _ in load.answers if v == new)
    back = [(start, v) for start, _, _, v, _ in load.answers if start > first_new and v != new]
    assert not back, f"{len(back)} calls started after the first version-{new} answer were answered by {set(v for _, v in back)}"


def _hot_reload_under_load(tiny_artifacts: Path, repo: Path, tmp_path: Path, version_timeout_s: float, **settings) -> tuple:
    users = _users(tiny_artifacts, 12)
    perturbed = _perturbed(tiny_artifacts, tmp_path / "artifacts_v2")
    first = str(max(int(p.name) for p in (repo / "user_tower").iterdir() if p.name.isdigit()))
    # a long warm-up of the new version: requests keep running on the old one meanwhile, the
    # moment a version leak (a call of the old deployment reaching the new models) shows
    server, _ = create_server(_settings(tiny_artifacts, repo, tmp_path, **({"warmup_calls": 100} | settings)))
    with server:
        t0 = time.monotonic()
        while server.health.serving is False and time.monotonic() - t0 < version_timeout_s:
            time.sleep(0.1)
        refs = {first: _references(server.address, users, first)}
        with Load(server.address, users, threads=4) as load:
            _wait_version(load, first, version_timeout_s)
            new = str(_publish(perturbed, repo))
            took = _wait_version(load, new, version_timeout_s)
            time.sleep(0.5)
        refs[new] = _references(server.address, users, new)
        versions = server.recommender.versions
    _check_no_mix(load, refs, new)
    assert load.failed() == 0, dict(load.seen)
    assert load.versions() == {first, new}
    assert versions == {CONTROL: int(new)}
    return server, load, int(first), int(new), took


def test_hot_reload_in_process_swaps_under_load(tiny_artifacts, repo_copy, tmp_path):
    _, _, _, _, took = _hot_reload_under_load(tiny_artifacts, repo_copy, tmp_path, 60)
    assert took < 30


def test_hot_reload_on_triton_pins_versions_and_loses_nothing(tiny_artifacts, repo_copy, tmp_path, start_triton):
    triton = start_triton(repo_copy)
    server, load, first, new, _ = _hot_reload_under_load(tiny_artifacts, repo_copy, tmp_path, 90, triton_url=triton.grpc_url)
    import tritonclient.grpc as grpcclient

    # the old version stays loaded beside the new one (version_policy latest 2)
    tc = grpcclient.InferenceServerClient(triton.grpc_url)
    assert tc.is_model_ready("user_tower", str(first)) and tc.is_model_ready("user_tower", str(new))
    # a request pinned to the old version ranks on that version: the fused CPU ranker_ensemble
    # runs its own version's graphs, so the pinned call goes to it (an ensemble would use the leaves)
    from orchestrator.backends import TritonBackend

    backend = TritonBackend(triton.grpc_url)
    try:
        assert backend.ready(5.0)
        h = np.full((3, RANKER_HISTORY), -1, np.int64)
        h[:, -2:] = [[1, 2]] * 3
        args = (
            np.array([3, 4, 5]),
            np.ones(3, np.float32),
            np.arange(3, dtype=np.float32),
            h,
            np.zeros((3, RANKER_HISTORY), np.float32),
            np.full((3, len(SOURCES)), -1.0, np.float32),
        )
        assert backend._fused is True
        old = backend.rank(*args, timeout_s=5, version=first)
        latest = backend.rank(*args, timeout_s=5, version=new)
        assert old.shape == latest.shape == (3,)
        np.testing.assert_allclose(latest, 2.0 * old, rtol=1e-5, atol=1e-6)  # the perturbation doubled every leaf
        # and each pinned call ran that version's graphs: the leaf models pinned agree
        fused = backend._fused
        backend._fused = False  # the ensemble's route for the old version: the pinned leaves
        np.testing.assert_allclose(backend.rank(*args, timeout_s=5, version=first), old, atol=1e-6)
        backend._fused = fused
        stats = tc.get_inference_statistics("ranker_ensemble", str(first), as_json=True)["model_stats"][0]
        assert int(stats["inference_stats"]["success"]["count"]) >= 1  # the pinned call went to the old version
    finally:
        backend.close()
        tc.close()


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
