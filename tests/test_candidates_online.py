"""Multi-source candidates online, on the real embedded Triton behind the real gRPC server.

* The served Recommend (MMR off, every candidate returned) ranks exactly the merged candidate
  set the offline pipeline builds for the same user and artifacts, with the same scores.
* A history-only user (a new user with three ratings) is served by every source, no retraining.
* A newly published version's candidate tables are served after the hot reload.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from types import SimpleNamespace

import lightgbm as lgb
import numpy as np
import pandas as pd
import pytest
from test_service import make_api

from export.batch_score import load_catalog, load_demographics
from export.history import Histories
from export.onnx_export import export_repository, load_ranker_features, load_two_tower
from export.pipeline import merged_candidates
from export.ranker import candidate_features, rerank
from orchestrator.candidates import TABLES_FILE, CandidateTables, blocked_mask, popular_list


@pytest.fixture(scope="module")
def repo(tiny_repository, tmp_path_factory) -> Path:
    return Path(shutil.copytree(tiny_repository, tmp_path_factory.mktemp("cand") / "model_repository"))


@pytest.fixture(scope="module")
def n_cand(tiny_artifacts) -> int:
    return int(json.loads((tiny_artifacts / "manifest.json").read_text())["ranker"]["config"]["candidates"])


@pytest.fixture(scope="module")
def api(start_triton, repo, tiny_artifacts, tmp_path_factory, n_cand):
    triton = start_triton(repo)
    a, server = make_api(
        tiny_artifacts,
        repo,
        tmp_path_factory.mktemp("cand_db") / "h.sqlite",
        triton_url=triton.grpc_url,
        retrieve_k=n_cand,
        mmr_pool=n_cand,
        reload_poll_s=3600.0,
    )
    yield a
    a.client.close()
    server.stop()


def offline(artifacts: Path, frame: pd.DataFrame, users: np.ndarray, n: int) -> list[dict[int, float]]:
    """Per user, {movie id: ranker score} of the merged candidates, computed by the offline code."""
    catalog = load_catalog(artifacts)
    period = SimpleNamespace(histories=Histories.from_frame(frame, catalog))
    model = load_two_tower(artifacts / "two_tower.pt")
    tables = CandidateTables.load(artifacts / TABLES_FILE)
    c = merged_candidates(model, period, load_demographics(artifacts), tables, users, n)
    feats = candidate_features(
        load_ranker_features(artifacts / "ranker_features.pt"), c.history, c.history_rating, c.items, c.scores, c.sources
    )
    ranked, scores = rerank(lgb.Booster(model_file=str(artifacts / "ranker.lgb")), feats, c.items)
    return [{int(catalog.movie_ids[i]): float(s) for i, s in zip(r, sc) if i >= 0} for r, sc in zip(ranked, scores)]


def served(api, n: int, **who) -> dict[int, float]:
    resp = api.client.recommend(k=n, mmr_lambda=1.0, candidate_pool=n, **who)
    assert not resp.is_fallback
    return {i.movie_id: i.score for i in resp.items}


def same(online: dict[int, float], want: dict[int, float]) -> None:
    assert set(online) == set(want)
    keys = sorted(want)
    np.testing.assert_allclose([online[k] for k in keys], [want[k] for k in keys], atol=1e-4)


def test_served_candidates_equal_the_offline_merge(api, tiny_artifacts, n_cand):
    counts = api.ratings.user_id.value_counts()
    users = np.sort(counts[counts >= 5].index.to_numpy()[:4])
    want = offline(tiny_artifacts, api.ratings, users, n_cand)
    for user, expected in zip(users, want):
        same(served(api, n_cand, user_id=int(user)), expected)


def test_new_user_with_three_ratings_is_served_from_every_source(api, tiny_artifacts, n_cand):
    movies = [int(m) for m in api.ratings.movie_id.value_counts().index[[0, 5, 9]]]
    ratings = [5.0, 4.0, 3.0]
    online = served(api, n_cand, history=movies, ratings=ratings)
    new_id = int(api.ratings.user_id.max()) + 1
    frame = pd.DataFrame({"user_id": new_id, "movie_id": movies, "rating": ratings, "timestamp": [1, 2, 3]})
    same(online, offline(tiny_artifacts, frame, np.array([new_id]), n_cand)[0])
    assert not set(online) & set(movies)


def test_published_tables_are_swapped_in_on_reload(api, repo, tiny_artifacts, tmp_path, n_cand):
    router = api.server.recommender
    before = router.catalog.tables
    # version 2: the same models, candidate tables that give everything to the popular list
    art = Path(shutil.copytree(tiny_artifacts, tmp_path / "artifacts"))
    popular_only = before.with_budgets([0, 0, 0, 0, 1])
    popular_only.save(art / TABLES_FILE)
    version = export_repository(art, repo, tree_implementation="gemm", update_manifest=False)["version"]
    assert router.reload(version)
    assert router.catalog.tables is not before
    np.testing.assert_array_equal(router.catalog.tables.budgets, popular_only.budgets)
    online = served(api, n_cand, user_id=api.user)
    seen = router.catalog.to_items(np.array(sorted(api.seen(api.user))))
    want = popular_list(popular_only.popular, blocked_mask(len(popular_only.log_count), seen), n_cand)
    assert set(online) == {int(m) for m in router.catalog.movie_ids[want]}
