"""The ranker's EASE features (``ease_score*``, ``ease_lowrank_long``) against EASE itself (``export.baselines.EASE``)."""

from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from scipy.sparse import csr_matrix

from export.baselines import EASE
from export.data import load_movielens
from export.features import FEATURE_NAMES, FEATURE_WINDOW, LAST_N, RankerFeatures, cf_item_vectors, ease_tables
from export.history import Histories
from export.items import Catalog, item_stats
from orchestrator.candidates import SOURCES

DATA = Path(__file__).parents[1] / "data" / "ml-latest-small"
N_USED = 60  # items the tiny interaction set draws from
WINDOW = 20
LAM = 10.0


@pytest.fixture(scope="module")
def catalog():
    ml = load_movielens(DATA, progress=False)
    return Catalog.from_movies(ml.movies, ml.genres, ml.genre_matrix)


@pytest.fixture(scope="module")
def frame(catalog):
    rng = np.random.default_rng(0)
    rows = []
    for user in range(40):
        items = rng.choice(N_USED, size=15 + user % 10, replace=False)
        for t, item in enumerate(items):
            rows.append((user, int(catalog.movie_ids[item]), float(rng.integers(1, 11) / 2), 1000 * user + t))
    return pd.DataFrame(rows, columns=["user_id", "movie_id", "rating", "timestamp"])


def full_weights(histories: Histories, n_items: int) -> np.ndarray:
    """EASE's dense B over every item (the baseline's own fit)."""
    users = histories.user_of_position()
    x = csr_matrix((np.ones(len(users), np.float32), (users, histories.items)), shape=(histories.n_users, n_items))
    x.data[:] = 1.0
    used = np.flatnonzero(np.asarray(x.sum(axis=0)).ravel() > 0)
    b = np.zeros((n_items, n_items), np.float32)
    b[np.ix_(used, used)] = EASE(lam=LAM).fit(x[:, used]).weights
    return b


def features_of(module: RankerFeatures, cands: np.ndarray, window: np.ndarray, window_r: np.ndarray) -> np.ndarray:
    """[users, candidates, features]: every user's window against the same candidates."""
    users, n_rows = len(window), len(window) * len(cands)
    return module.compute(
        np.tile(cands, users),
        np.zeros(n_rows, np.float32),
        np.zeros(n_rows, np.float32),
        window,
        window_r,
        np.full((n_rows, len(SOURCES)), -1.0, np.float32),
    ).reshape(users, len(cands), -1)


def test_ease_score_is_eases_score_of_the_window(catalog, frame):
    hist = Histories.from_frame(frame, catalog)
    n = catalog.n_items
    table = ease_tables(hist, n, lam=LAM, width=N_USED)  # wide enough to keep every weight
    rng = np.random.default_rng(1)
    module = RankerFeatures(
        catalog, item_stats(frame, catalog, 10**9), rng.normal(size=(n, 8)).astype(np.float32), cf_item_vectors(hist, n), table
    )
    users = hist.user_ids[:7]
    window, window_r = hist.last(users, WINDOW)
    cands = np.arange(N_USED)
    feats = features_of(module, cands, window, window_r)
    b = full_weights(hist, n)
    for u in range(len(users)):
        h = window[u][window[u] >= 0]
        np.testing.assert_allclose(feats[u, :, FEATURE_NAMES.index("ease_score")], b[h][:, cands].sum(0), atol=1e-5)
        last = window[u][-LAST_N:]
        last = last[last >= 0]
        np.testing.assert_allclose(feats[u, :, FEATURE_NAMES.index("ease_score_last5")], b[last][:, cands].sum(0), atol=1e-5)


def test_table_keeps_each_rows_largest_weights_of_the_most_rated_items(catalog, frame):
    hist = Histories.from_frame(frame, catalog)
    n = catalog.n_items
    t = ease_tables(hist, n, lam=LAM, width=5)
    items, weights = t.items, t.weights
    b = full_weights(hist, n)
    used = np.flatnonzero(b.any(axis=1))
    assert (items[np.setdiff1d(np.arange(n), used)] == -1).all()
    for i in used:
        np.testing.assert_allclose(weights[i], np.sort(b[i])[::-1][:5], rtol=1e-6)
        np.testing.assert_allclose(b[i, items[i]], weights[i], rtol=1e-6)
    # past max_items only the most-rated items are solved (and only they are anyone's neighbours)
    counts = np.bincount(hist.items, minlength=n)
    items = ease_tables(hist, n, lam=LAM, width=5, max_items=20).items
    solved = np.flatnonzero(items[:, 0] >= 0)
    assert len(solved) == 20
    assert counts[solved].min() >= np.sort(counts)[::-1][19]
    assert np.isin(items[solved], solved).all()


def test_lowrank_score_is_the_truncated_svd_of_ease_over_the_whole_long_window(catalog, frame):
    hist = Histories.from_frame(frame, catalog)
    n = catalog.n_items
    rank = 8
    t = ease_tables(hist, n, lam=LAM, width=5, rank=rank)
    b = full_weights(hist, n)
    used = np.flatnonzero(np.bincount(hist.items, minlength=n) > 0)
    assert (t.rows[used] == np.arange(len(used))).all() and (np.delete(t.rows, used) == len(used)).all()
    # P Q^T is B's best rank-8 approximation over the fitted items
    u, sv, vt = np.linalg.svd(b[np.ix_(used, used)].astype(np.float64))
    best = (u[:, :rank] * sv[:rank]) @ vt[:rank]
    np.testing.assert_allclose(t.p[:-1] @ t.q[:-1].T, best, atol=1e-4)
    assert not t.p[-1].any() and not t.q[-1].any()

    module = RankerFeatures(catalog, item_stats(frame, catalog, 10**9), np.ones((n, 4), np.float32), cf_item_vectors(hist, n), t)
    users = hist.user_ids[:5]
    long_window = FEATURE_WINDOW + 30
    window, window_r = hist.last(users, long_window)
    # histories longer than the features' window, so the score must read past it
    window[:, :30] = np.tile(used[:30], (len(users), 1))
    window_r[:, :30] = 3.0
    cands = np.concatenate([used[:20], np.delete(np.arange(n), used)[:3]])  # 3 items outside the fit score 0
    feats = features_of(module, cands, window, window_r)
    approx = np.zeros((n, n))
    approx[np.ix_(used, used)] = best
    for i in range(len(users)):
        h = window[i][window[i] >= 0]
        np.testing.assert_allclose(feats[i, :, FEATURE_NAMES.index("ease_lowrank_long")], approx[h][:, cands].sum(0), atol=1e-4)
    # the other EASE features read only the last FEATURE_WINDOW: the 30 oldest items change nothing
    short = features_of(module, cands, window[:, -FEATURE_WINDOW:], window_r[:, -FEATURE_WINDOW:])
    other = [j for j, name in enumerate(FEATURE_NAMES) if name != "ease_lowrank_long"]
    np.testing.assert_array_equal(feats[:, :, other], short[:, :, other])
