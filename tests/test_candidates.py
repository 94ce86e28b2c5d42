"""Candidate sources and their merge: the tables, each source's rules, the budgets, the artifact."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest

from export.candidates import build_tables, choose_budgets, merge_users, recall, user_source_lists
from export.history import Histories
from export.items import Catalog, item_stats
from orchestrator.candidates import (
    GENRE_POOL_GENRES,
    SOURCES,
    TABLES_FILE,
    CandidateTables,
    _top,
    blocked_mask,
    candidates,
    genre_popular,
    item_knn,
    merge,
    source_lists,
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


# --------------------------------------------------------------------------- identity with the plain versions
# The served functions use a dense accumulator, a partial sort and a sort-free merge for speed;
# these are the plain versions they replaced (sort everything), kept here as the reference.


def reference_item_knn(tables, window, blocked, n):
    hist = window[window >= 0]
    if hist.size == 0:
        return np.zeros(0, np.int64)
    nb = tables.neighbours[hist].reshape(-1).astype(np.int64)
    sims = tables.neighbour_sims[hist].reshape(-1)
    ok = nb >= 0
    if blocked is not None:
        ok &= ~blocked[np.where(ok, nb, 0)]
    nb, sims = nb[ok], sims[ok]
    if nb.size == 0:
        return np.zeros(0, np.int64)
    uniq, inv = np.unique(nb, return_inverse=True)
    score = np.bincount(inv, weights=sims)
    return uniq[np.lexsort((uniq, -score))[:n]]


def reference_genre_popular(tables, window, blocked, n):
    hist = window[window >= 0]
    if hist.size == 0:
        return np.zeros(0, np.int64)
    profile = tables.genre_matrix[hist].sum(0)
    if not profile.any():
        return np.zeros(0, np.int64)
    top = np.lexsort((np.arange(len(profile)), -profile))[:GENRE_POOL_GENRES]
    top = top[profile[top] > 0]
    listed = tables.genre_popular[top].reshape(-1)
    pool = np.unique(listed[listed >= 0])
    if blocked is not None:
        pool = pool[~blocked[pool]]
    if pool.size == 0:
        return pool.astype(np.int64)
    g = tables.genre_matrix[pool]
    cos = np.einsum("ij,j->i", g, profile) / (np.sqrt(np.einsum("ij,ij->i", g, g)) * np.sqrt(float((profile * profile).sum())) + 1e-6)
    score = tables.log_count[pool] * cos
    return pool[np.lexsort((pool, -score))][:n].astype(np.int64)


def reference_merge(lists, budgets, n):
    keys, items, src = [], [], []
    for s, (lst, b) in enumerate(zip(lists, budgets)):
        if b <= 0 or len(lst) == 0:
            continue
        keys.append((np.arange(len(lst), dtype=np.float64) + 0.5) / float(b))
        items.append(np.asarray(lst, np.int64))
        src.append(np.full(len(lst), s))
    if not items:
        return np.zeros(0, np.int64), np.full((0, len(lists)), -1.0, np.float32)
    key, item, source = np.concatenate(keys), np.concatenate(items), np.concatenate(src)
    item = item[np.lexsort((source, key))]
    _, first = np.unique(item, return_index=True)
    merged = item[np.sort(first)][:n]
    ranks = np.full((len(merged), len(lists)), -1.0, np.float32)
    for s, lst in enumerate(lists):
        for row, it in enumerate(merged):
            at = np.flatnonzero(np.asarray(lst) == it)
            if at.size:
                ranks[row, s] = at[0]
    return merged, ranks


def random_tables(rng, n_items=400, m=15, n_genres=7, pool=120):
    """Tables with the edge cases built in: -1 padding, repeated and zero cosines, tied counts."""
    nb = np.stack([rng.choice(n_items, m, replace=False) for _ in range(n_items)]).astype(np.int32)
    sims = (rng.integers(0, 5, (n_items, m)) / 4).astype(np.float32)  # ties and zeros on purpose
    pad = rng.random((n_items, m)) < 0.2
    nb[pad], sims[pad] = -1, 0
    genres = (rng.random((n_items, n_genres)) < 0.3).astype(np.float32)
    count = rng.integers(0, 6, n_items)  # many equal counts: ties in the genre scores
    by_count = np.lexsort((np.arange(n_items), -count))
    per_genre = np.full((n_genres, pool), -1, np.int64)
    for g in range(n_genres):
        members = by_count[genres[by_count, g] > 0][:pool]
        per_genre[g, : len(members)] = members
    return CandidateTables(
        neighbours=nb,
        neighbour_sims=sims,
        popular=by_count[:pool].astype(np.int64),
        recent_popular=rng.permutation(n_items)[:pool].astype(np.int64),
        genre_popular=per_genre,
        log_count=np.log1p(count).astype(np.float32),
        genre_matrix=genres,
        budgets=np.full(len(SOURCES), 1 / len(SOURCES), np.float32),
    )


def random_case(rng, n_items):
    """A history window (-1 padded, maybe empty), a blocked mask (or None), a list length."""
    length = int(rng.integers(0, 30))
    window = np.full(30, -1, np.int64)
    window[30 - length :] = rng.choice(n_items, length, replace=False)
    kind = rng.integers(0, 4)
    blocked = None if kind == 0 else rng.random(n_items) < (0.02, 0.3, 0.97)[kind - 1]
    return window, blocked, int(rng.choice([1, 3, 10, 40, 150, 500]))


def assert_same(got, want):
    assert got.dtype == want.dtype and got.shape == want.shape
    np.testing.assert_array_equal(got, want)


@pytest.mark.parametrize("seed", range(4))
def test_sources_and_merge_equal_the_plain_versions_on_random_windows(seed):
    rng = np.random.default_rng(seed)
    tables = random_tables(rng)
    for _ in range(150):
        window, blocked, n = random_case(rng, tables.n_items)
        assert_same(item_knn(tables, window, blocked, n), reference_item_knn(tables, window, blocked, n))
        assert_same(genre_popular(tables, window, blocked, n), reference_genre_popular(tables, window, blocked, n))
        ann = rng.permutation(tables.n_items)[: int(rng.integers(0, n + 1))]
        if blocked is not None:
            ann = ann[~blocked[ann]]
        budgets = rng.integers(0, 3, len(SOURCES)).astype(np.float32)  # zeros and equal shares (key ties)
        lists = source_lists(tables, ann, window, blocked, n)
        for got, want in zip(merge(lists, budgets, n), reference_merge(lists, budgets, n)):
            assert_same(got, want)


def test_merge_equals_the_plain_version_with_repeats_and_empty_lists():
    rng = np.random.default_rng(7)
    for _ in range(300):
        lists = [rng.integers(0, 40, int(rng.integers(0, 25))) for _ in range(int(rng.integers(1, 6)))]  # repeats inside lists
        budgets = rng.choice([0.0, 0.5, 1.0, 2.0], len(lists))
        n = int(rng.integers(1, 60))
        for got, want in zip(merge(lists, budgets, n), reference_merge(lists, budgets, n)):
            assert_same(got, want)


def test_top_equals_a_full_sort_with_ties_and_nans():
    rng = np.random.default_rng(3)
    for _ in range(300):
        size = int(rng.integers(0, 400))
        items = rng.permutation(1000)[:size]
        score = rng.integers(0, 8, size).astype(np.float64)  # heavy ties at every boundary
        score[rng.random(size) < 0.1] = np.nan
        n = int(rng.integers(0, 120))
        np.testing.assert_array_equal(_top(items, score, n), np.lexsort((items, -score))[:n])


def test_ann_only_mode_serves_the_faiss_list_alone(tiny_artifacts):
    from orchestrator.catalog import Catalog
    from orchestrator.pipeline import Recommender
    from orchestrator.settings import ServeSettings

    catalog = Catalog.load(tiny_artifacts, use_gpu=False)
    user = catalog.vectors[:3].mean(0)
    window = np.r_[np.full(5, -1), np.arange(5)].astype(np.int64)
    exclude = np.arange(5)
    ann, _ = catalog.retrieve(user, 20, None, exclude)
    items, scores, sources = catalog.candidates(user, window, 20, None, exclude, ann_only=True)
    np.testing.assert_array_equal(items, ann)
    assert sources[:, 0].tolist() == list(range(len(ann))) and (sources[:, 1:] == -1).all()
    merged, _, merged_sources = catalog.candidates(user, window, 20, None, exclude)  # the default: every source
    want = candidates(catalog.tables, ann, window, blocked_mask(catalog.n_items, exclude), 20)
    np.testing.assert_array_equal(merged, want[0])
    np.testing.assert_array_equal(merged_sources, want[1])
    settings = ServeSettings(artifacts_dir=tiny_artifacts, candidate_sources="two_tower")
    assert Recommender(settings, catalog, None, None).ann_only  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="candidate_sources"):
        ServeSettings(candidate_sources="ann")
