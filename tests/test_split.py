"""No-leak tests: nothing from a later period reaches what is computed for an earlier one."""

from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from export.data import load_movielens
from export.features import FEATURE_NAMES, RankerFeatures
from export.history import Histories
from export.items import Catalog, item_stats
from export.pipeline import Period
from export.ranker import candidate_labels
from export.split import RELEVANCE_MIN_RATING, relevant_items, time_split
from orchestrator.candidates import SOURCES

DATA = Path(__file__).parents[1] / "data" / "ml-latest-small"


@pytest.fixture(scope="module")
def ml():
    return load_movielens(DATA, progress=False)


@pytest.fixture(scope="module")
def catalog(ml):
    return Catalog.from_movies(ml.movies, ml.genres, ml.genre_matrix)


def test_periods_are_disjoint_and_ordered(ml):
    split = time_split(ml.ratings, 0.1, 0.1)
    assert split.train.timestamp.max() < split.t_val <= split.val.timestamp.min()
    assert split.val.timestamp.max() < split.t_test <= split.test.timestamp.min()
    assert len(split.train) + len(split.val) + len(split.test) == len(ml.ratings)
    # roughly the requested shares (ties on a timestamp can move a few rows)
    assert abs(len(split.test) / len(ml.ratings) - 0.1) < 0.01
    proto = split.protocol()
    assert proto["relevance"].startswith("rating >= 4")
    assert proto["val_starts"] < proto["test_starts"]


def test_split_rejects_bad_fractions(ml):
    with pytest.raises(ValueError, match="fractions"):
        time_split(ml.ratings, 0.6, 0.5)


def test_item_stats_ignore_the_future(ml, catalog):
    split = time_split(ml.ratings)
    past_only = item_stats(split.train, catalog, split.t_val)
    with_future = item_stats(ml.ratings, catalog, split.t_val)  # same cutoff, future rows present
    for name in ("count", "recent_count", "mean_rating", "first_seen_days"):
        np.testing.assert_array_equal(getattr(past_only, name), getattr(with_future, name))
    assert past_only.count.sum() == len(split.train)


def test_period_histories_end_before_cutoff(ml, catalog):
    split = time_split(ml.ratings)
    period = Period.at(ml.ratings, catalog, split.t_val)
    assert period.histories.timestamps.max() < split.t_val
    assert len(period.histories.items) == len(split.train)


def test_features_do_not_change_with_future_interactions(ml, catalog):
    split = time_split(ml.ratings)
    rng = np.random.default_rng(0)
    vectors = rng.normal(size=(catalog.n_items, 8)).astype(np.float32)
    a = Period.at(split.train, catalog, split.t_val)
    b = Period.at(ml.ratings, catalog, split.t_val)  # everything offered, cutoff must filter
    users = a.histories.user_ids[:20]
    feats = []
    for period in (a, b):
        hist, hist_r = period.histories.last(users, 50)
        items = np.arange(20)
        f = RankerFeatures(catalog, period.stats, vectors, period.cf_vectors, period.ease).compute(
            items, np.zeros(20, np.float32), np.zeros(20, np.float32), hist, hist_r, np.full((20, len(SOURCES)), -1.0, np.float32)
        )
        feats.append(f)
    assert feats[0].shape == (20, len(FEATURE_NAMES))
    np.testing.assert_array_equal(feats[0], feats[1])


def test_history_windows_are_left_padded_and_time_ordered(catalog):
    mid = catalog.movie_ids
    frame = pd.DataFrame(
        {
            "user_id": [7, 7, 7, 9],
            "movie_id": [mid[2], mid[0], mid[1], mid[3]],
            "rating": np.array([5, 3, 4, 2], np.float32),
            "timestamp": [30, 10, 20, 5],
        }
    )
    hist = Histories.from_frame(frame, catalog)
    items, ratings = hist.last(np.array([7, 9, 11]), 4)
    assert items.tolist() == [[-1, 0, 1, 2], [-1, -1, -1, 3], [-1, -1, -1, -1]]
    assert ratings.tolist() == [[0, 3, 4, 5], [0, 0, 0, 2], [0, 0, 0, 0]]
    assert [s.tolist() for s in hist.seen(np.array([7, 11]))] == [[0, 1, 2], []]


def test_relevance_and_ranker_labels(catalog):
    mid = catalog.movie_ids
    period = pd.DataFrame({"user_id": [1, 1, 2], "movie_id": [mid[0], mid[1], mid[0]], "rating": [4.0, 3.5, 5.0], "timestamp": [1, 2, 3]})
    rel = relevant_items(period, catalog.index_of())
    assert {u: r.tolist() for u, r in rel.items()} == {1: [0], 2: [0]}
    assert RELEVANCE_MIN_RATING == 4.0
    labels = candidate_labels(np.array([1, 2]), np.array([[0, 1, 2], [2, 1, 0]]), period, catalog)
    assert labels.tolist() == [[2, 1, 0], [0, 0, 2]]
