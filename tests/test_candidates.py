"""Candidate sources and their merge: the tables, each source's rules, the budgets, the artifact."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest

from export.candidates import build_tables, choose_budgets, merge_users, recall, user_source_lists
from export.history import Histories
from export.items import Catalog, item_stats
from orchestrator.candidates import (
    SOURCES,
    TABLES_FILE,
    CandidateTables,
    blocked_mask,
    candidates,
    item_knn,
    merge,
)


@pytest.fixture(scope="module")
def world():
    """8 items, 3 genres; items 0-3 co-occur (users 1-4), items 4-5 co-occur (users 5-6)."""
    movies = pd.DataFrame({"movie_id": np.arange(10, 18), "title": [f"m{i}" for i in range(8)], "year": [1990] * 8, "genres": ["A"] * 8})
    genre_matrix = np.zeros((8, 3), np.float32)
    genre_matrix[[0, 1, 2, 3], 0] = 1
    genre_matrix[[4, 5], 1] = 1
    genre_matrix[[6, 7], 2] = 1
    catalog = Catalog.from_movies(movies, ["A", "B", "C"], genre_matrix)
    rows = [(u, 10 + i, 4.0, 1000 + 10 * u + i) for u in (1, 2, 3, 4) for i in (0, 1, 2, 3)]
    rows += [(u, 10 + i, 4.0, 2000 + 10 * u + i) for u in (5, 6) for i in (4, 5)]
    rows += [(7, 16, 3.0, 99 * 86400)]  # item 6: the one rating in the last 30 days
    frame = pd.DataFrame(rows, columns=["user_id", "movie_id", "rating", "timestamp"])
    hist = Histories.from_frame(frame, catalog)
    stats = item_stats(frame, catalog, 100 * 86400)
    return catalog, hist, stats


def test_tables_hold_neighbours_and_popular_lists_of_the_past(world):
    catalog, hist, stats = world
    t = build_tables(hist, stats, catalog, neighbours=3, shrink=0.0)
    assert t.neighbours.shape == (8, 3)
    assert set(t.neighbours[0].tolist()) == {1, 2, 3}  # co-rated with 0 by the same 4 users
    assert t.neighbours[4].tolist() == [5, -1, -1] and t.neighbour_sims[4, 1] == 0
    assert t.popular[:4].tolist() == [0, 1, 2, 3]  # 4 ratings each, ties by index
    assert t.recent_popular[0] == 6  # the only rating in the last 30 days
    assert t.genre_popular[1, :2].tolist() == [4, 5] and (t.genre_popular[1, 2:] == -1).all()
    assert np.isclose(t.budgets.sum(), 1.0)


def test_item_knn_scores_by_summed_similarity_and_skips_blocked(world):
    catalog, hist, stats = world
    t = build_tables(hist, stats, catalog, neighbours=3, shrink=0.0)
    window = np.array([-1, -1, 0, 1])
    got = item_knn(t, window, blocked_mask(8, np.array([0, 1])), 10)
    assert set(got.tolist()) == {2, 3}  # neighbours of 0 and 1, minus the window itself
    assert item_knn(t, np.full(4, -1), None, 10).size == 0


def test_sources_never_return_blocked_items_and_follow_the_filter(world):
    catalog, hist, stats = world
    t = build_tables(hist, stats, catalog, neighbours=3, shrink=0.0)
    window = np.array([-1, 0, 4])
    allowed = np.zeros(8, bool)
    allowed[[2, 5, 6]] = True
    blocked = blocked_mask(8, np.array([0, 4]), allowed)
    lists = [np.array([2, 6])] + [lst for lst in user_source_lists_one(t, window, blocked)]
    for lst in lists:
        assert not blocked[lst].any()
    items, ranks = candidates(t, np.array([2, 6]), window, blocked, 10)
    assert set(items.tolist()) <= {2, 5, 6} and len(items) == len(set(items.tolist()))


def user_source_lists_one(tables, window, blocked):
    from orchestrator.candidates import source_lists

    return source_lists(tables, np.zeros(0, np.int64), window, blocked, 10)[1:]


def test_merge_interleaves_by_budget_without_duplicates_and_records_ranks():
    a = np.array([1, 2, 3, 4, 5, 6])
    b = np.array([3, 10, 11, 12])
    items, ranks = merge([a, b], np.array([0.75, 0.25]), 6)
    # keys: a -> 0.67, 2, 3.3, 4.7, 6, 7.3; b -> 2, 6, 10, 14 (ties: source order)
    assert items.tolist() == [1, 2, 3, 4, 5, 10]
    assert ranks[:, 0].tolist() == [0, 1, 2, 3, 4, -1]
    assert ranks[:, 1].tolist() == [-1, -1, 0, -1, -1, 1]
    # a zero budget disables a source; an empty list gives its share to the others
    only_b, _ = merge([a, b], np.array([0.0, 1.0]), 3)
    assert only_b.tolist() == [3, 10, 11]
    filled, _ = merge([a, np.zeros(0, np.int64)], np.array([0.5, 0.5]), 4)
    assert filled.tolist() == [1, 2, 3, 4]


def test_budget_search_prefers_the_source_that_finds_the_relevant_items():
    n = 4
    # source 0 (two_tower) finds nothing relevant, source 2 (genre_popular) finds everything
    lists = [
        [np.array([100, 101, 102, 103]), np.zeros(0, np.int64), np.array([7, 8, 9, 6]), np.zeros(0, np.int64), np.zeros(0, np.int64)]
    ] * 3
    relevant = [np.array([7, 8, 9, 6])] * 3
    budgets, trials = choose_budgets(lists, relevant, n, steps=4)
    assert budgets[2] == 1.0 and len(trials) == 4
    items, _ = merge_users(lists, budgets, n)
    assert recall(items, relevant) == 1.0


def test_tables_round_trip_without_pickle(world, tmp_path):
    catalog, hist, stats = world
    t = build_tables(hist, stats, catalog, neighbours=3, shrink=0.0).with_budgets([1, 1, 0, 0, 2])
    t.save(tmp_path / TABLES_FILE)
    back = CandidateTables.load(tmp_path / TABLES_FILE)
    for name in CandidateTables.__dataclass_fields__:
        np.testing.assert_array_equal(getattr(back, name), getattr(t, name))
    assert back.budgets.tolist() == [0.25, 0.25, 0.0, 0.0, 0.5]
    with pytest.raises(ValueError, match="budgets"):
        t.with_budgets([0, 0, 0, 0, 0])


def test_offline_lists_equal_the_per_user_online_call(world):
    catalog, hist, stats = world
    t = build_tables(hist, stats, catalog, neighbours=3, shrink=0.0)
    users = hist.user_ids
    window, _ = hist.last(users, 4)
    seen = hist.seen(users)
    ann = np.tile(np.arange(8), (len(users), 1))
    ann = np.array([np.concatenate([[i for i in row if i not in s], [-1] * len(s)]) for row, s in zip(ann, seen)])
    items, ranks = merge_users(user_source_lists(t, ann, window, seen, 6), t.budgets, 6)
    for row, user in enumerate(users):
        one, r = candidates(t, ann[row][ann[row] >= 0], window[row], blocked_mask(8, seen[row]), 6)
        np.testing.assert_array_equal(items[row, : len(one)], one)
        np.testing.assert_array_equal(ranks[row, : len(one)], r)
        assert len(SOURCES) == r.shape[1]
