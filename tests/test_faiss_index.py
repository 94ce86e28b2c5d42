"""FAISS indexes: recall against exact search, the default rule, the bundle, filtered search.

Everything runs on clustered random vectors (a Gaussian mixture, normalised) small enough for
a 2-core CPU; no GPU is needed: the GPU's over-fetch path is forced with ``on_gpu=True``.
"""

from __future__ import annotations

import json

import faiss
import numpy as np
import pandas as pd
import pytest

from export.faiss_index import (
    build_from_artifacts,
    build_indexes,
    choose_default,
    default_params,
    make_queries,
    measure,
    synthetic_vectors,
    write_index_bundle,
)
from orchestrator.ann import (
    GPU_KINDS,
    KINDS,
    IndexBundle,
    ItemFilter,
    filter_mask,
    gpu_available,
    index_params,
    load_index_bundle,
    search_filtered,
    to_device,
)

N, DIM = 5000, 64
GENRES = ["Action", "Comedy", "Drama", "Film-Noir", "Sci-Fi", "Western"]


@pytest.fixture(scope="module")
def vectors() -> np.ndarray:
    return synthetic_vectors(N, DIM, seed=0)


@pytest.fixture(scope="module")
def indexes(vectors):
    # One thread: on a shared 2-core box OpenMP's spinning threads slow k-means down, not up.
    return build_indexes(vectors, KINDS, seed=0, threads=1)


@pytest.fixture(scope="module")
def results(indexes, vectors):
    return measure(indexes, vectors, make_queries(vectors, 200, seed=5), k=100)


@pytest.fixture(scope="module")
def item_table() -> pd.DataFrame:
    rng = np.random.default_rng(1)
    genres = ["|".join(rng.choice(GENRES, size=rng.integers(1, 3), replace=False)) for _ in range(N)]
    years = rng.integers(1930, 2024, N)
    years[rng.random(N) < 0.05] = 0  # unknown year
    return pd.DataFrame(
        {
            "item": np.arange(N, dtype=np.int64),
            "movie_id": np.arange(N, dtype=np.int64) * 3 + 1,
            "title": [f"movie {i}" for i in range(N)],
            "genres": genres,
            "year": years.astype(np.int32),
            "popularity": rng.integers(0, 1000, N),
            "recent_popularity": rng.integers(0, 50, N),
            "mean_rating": rng.uniform(1.0, 5.0, N).astype(np.float32),
        }
    )


def brute_force(vectors, queries, k, exclude=None, allowed=None):
    """Exact reference: inner products, inadmissible items at -inf, best first, ties by id."""
    scores = queries @ vectors.T
    if allowed is not None:
        scores[:, ~allowed] = -np.inf
    for r, e in enumerate(exclude or []):
        scores[r, np.asarray(e, dtype=np.int64)] = -np.inf
    ids = np.tile(np.arange(len(vectors)), (len(queries), 1))
    order = np.lexsort((ids, -scores), axis=1)[:, :k]
    top = np.take_along_axis(scores, order, axis=1).astype(np.float32)
    items = np.where(np.isfinite(top), order, -1)
    if k > len(vectors):
        pad = k - len(vectors)
        items = np.pad(items, ((0, 0), (0, pad)), constant_values=-1)
        top = np.pad(top, ((0, 0), (0, pad)), constant_values=-np.inf)
    return items, top


def assert_exact(items, scores, ref_items, ref_scores, vectors, queries, exclude=None, allowed=None):
    """Same top-k as the reference up to float ties: same padding, same scores, admissible ids."""
    assert items.shape == ref_items.shape and scores.shape == ref_scores.shape
    np.testing.assert_array_equal(items == -1, ref_items == -1)
    assert np.isneginf(scores[items == -1]).all()
    valid = items >= 0
    np.testing.assert_allclose(scores[valid], ref_scores[valid], atol=1e-5)
    for r in range(len(items)):
        row = items[r][valid[r]]
        assert len(np.unique(row)) == len(row)
        np.testing.assert_allclose(vectors[row] @ queries[r], scores[r][valid[r]], atol=1e-5)
        if allowed is not None:
            assert allowed[row].all()
        if exclude is not None:
            assert not np.isin(row, exclude[r]).any()
    assert (items == ref_items).mean() > 0.99  # positions differ only at float near-ties


class CountingIndex:
    """Wraps an index and counts ``search`` calls (how many over-fetch rounds ran)."""

    def __init__(self, index):
        self._index = index
        self.fetches: list[int] = []

    def search(self, x, k, **kwargs):
        self.fetches.append(k)
        return self._index.search(x, k, **kwargs)

    def __getattr__(self, name):
        return getattr(self._index, name)


# ----------------------------------------------------------------------------- build / measure


def test_default_params_follow_catalog_size():
    big = default_params(87_585, 64)
    assert big["ivf_flat"]["nlist"] == round(4 * 87_585**0.5) == 1184
    assert big["ivf_pq"]["m"] == 16 and big["ivf_pq"]["nbits"] == 8
    assert big["hnsw"]["M"] == 32
    small = default_params(1000, 64)
    assert small["ivf_flat"]["nlist"] <= 1000 // 16  # enough training points per list
    assert small["ivf_pq"]["nbits"] < 8  # cannot train 256 centroids per sub-space on 1000 points
    assert default_params(500, 48)["ivf_pq"]["m"] == 16 and default_params(500, 40)["ivf_pq"]["m"] == 8


def test_every_kind_is_built_with_inner_product(indexes, vectors):
    assert list(indexes) == list(KINDS)
    for kind, index in indexes.items():
        assert index.ntotal == N and index.d == DIM
        assert index.metric_type == faiss.METRIC_INNER_PRODUCT, kind
        assert indexes.build_seconds[kind] >= 0
    assert index_params(indexes["ivf_pq"])["m"] == 16
    assert index_params(indexes["hnsw"])["M"] == 32


def test_thread_settings_are_restored(vectors):
    before = faiss.omp_get_max_threads()
    build_indexes(vectors[:500], ("flat", "ivf_flat"), threads=1)
    assert faiss.omp_get_max_threads() == before


def test_flat_recall_is_exact_and_others_clear_a_floor(results):
    by_kind = {r["kind"]: r for r in results}
    print(
        "\n"
        + "\n".join(
            f"{r['kind']:9s} recall@100={r['recall']:.4f} p50={r['p50_ms']:.3f}ms p99={r['p99_ms']:.3f}ms bytes={r['bytes']} {r['params']}"
            for r in results
        )
    )
    assert by_kind["flat"]["recall"] == 1.0
    # Tuned for 0.95 on other queries; the floors are loose so a noisy draw cannot fail them.
    assert by_kind["ivf_flat"]["recall"] >= 0.9
    assert by_kind["hnsw"]["recall"] >= 0.9
    assert by_kind["ivf_pq"]["recall"] >= 0.6  # PQ's quantisation error caps it
    for r in results:
        assert 0 < r["p50_ms"] <= r["p99_ms"]
        assert r["bytes"] > 0 and r["queries"] == 200 and r["k"] == 100
    assert by_kind["ivf_pq"]["bytes"] < by_kind["flat"]["bytes"] / 3  # 16 bytes vs 256 per item


def test_choose_default_is_fastest_good_enough():
    def row(kind, recall, p50, size=100):
        return {"kind": kind, "recall": recall, "p50_ms": p50, "bytes": size}

    results = [row("flat", 1.0, 2.0), row("ivf_flat", 0.97, 0.3), row("ivf_pq", 0.80, 0.1), row("hnsw", 0.99, 0.2)]
    assert choose_default(results) == "hnsw"  # ivf_pq is faster but misses the recall bar
    assert choose_default(results, min_recall=0.98) == "hnsw"
    assert choose_default(results, min_recall=0.995) == "flat"
    assert choose_default(results, min_recall=0.5) == "ivf_pq"
    assert choose_default([row("ivf_pq", 0.8, 0.1)]) == "flat"  # none qualifies
    assert choose_default([]) == "flat"
    tie = [row("ivf_flat", 0.97, 0.2, size=500), row("hnsw", 0.99, 0.2, size=900)]
    assert choose_default(tie) == "ivf_flat"  # equal speed: the smaller index


# ----------------------------------------------------------------------------- bundle


@pytest.mark.parametrize("kind", ["ivf_flat", "hnsw", "ivf_pq"])
def test_bundle_round_trip(tmp_path, indexes, vectors, item_table, kind):
    item_table.to_parquet(tmp_path / "items.parquet", index=False)
    np.save(tmp_path / "item_embeddings.npy", vectors)
    out = tmp_path / "faiss"
    meta = write_index_bundle(
        out, indexes[kind], kind, tmp_path / "items.parquet", recall=0.97, vectors_path=tmp_path / "item_embeddings.npy"
    )
    assert {p.name for p in out.iterdir()} == {"faiss.index", "id_map.npy", "index.json"}
    on_disk = json.loads((out / "index.json").read_text())
    assert on_disk == meta
    assert on_disk["kind"] == kind and on_disk["n"] == N and on_disk["dim"] == DIM
    assert on_disk["metric"] == "inner_product" and on_disk["recall"] == 0.97 and on_disk["recall_k"] == 100
    assert on_disk["params"] == index_params(indexes[kind]) and on_disk["built_at"]
    assert on_disk["item_table"]["rows"] == N
    np.testing.assert_array_equal(np.load(out / "id_map.npy", allow_pickle=False), np.arange(N))

    bundle = load_index_bundle(out)
    assert isinstance(bundle, IndexBundle) and bundle.kind == kind
    assert bundle.vectors is not None and bundle.vectors.shape == (N, DIM)
    queries = make_queries(vectors, 50, seed=9)
    d0, i0 = indexes[kind].search(queries, 100)
    d1, i1 = bundle.index.search(queries, 100)
    np.testing.assert_array_equal(i0, i1)
    np.testing.assert_allclose(d0, d1, rtol=1e-6)
    assert index_params(bundle.index) == index_params(indexes[kind])  # tuned nprobe / efSearch survive


def test_bundle_rejects_a_tampered_index(tmp_path, indexes):
    out = tmp_path / "faiss"
    write_index_bundle(out, indexes["flat"], "flat")
    with (out / "faiss.index").open("ab") as fh:
        fh.write(b"x")
    with pytest.raises(ValueError, match="sha256"):
        load_index_bundle(out)


@pytest.mark.parametrize("exact_below", [0, 4096], ids=["ann", "brute-force"])
def test_bundle_translates_a_non_identity_id_map(tmp_path, vectors, exact_below):
    rng = np.random.default_rng(3)
    perm = rng.permutation(N)  # FAISS row r holds item perm[r]
    flat = faiss.IndexFlatIP(DIM)
    flat.add(vectors[perm])
    np.save(tmp_path / "item_embeddings.npy", vectors)  # by item index, as `recsys train` writes it
    write_index_bundle(tmp_path / "faiss", flat, "flat", id_map=perm, vectors_path=tmp_path / "item_embeddings.npy")
    bundle = load_index_bundle(tmp_path / "faiss")
    np.testing.assert_array_equal(bundle.vectors, vectors[perm])  # reordered to FAISS rows
    queries = make_queries(vectors, 8, seed=4)
    exclude = [rng.choice(N, 40, replace=False) for _ in range(8)]
    allowed = rng.random(N) < 0.3
    items, scores = bundle.search(queries, 20, exclude=exclude, allowed_mask=allowed, exact_below=exact_below)
    ref = brute_force(vectors, queries, 20, exclude, allowed)
    assert_exact(items, scores, *ref, vectors, queries, exclude, allowed)


def test_bundle_ignores_embeddings_replaced_after_the_build(tmp_path, indexes, vectors, caplog):
    np.save(tmp_path / "item_embeddings.npy", vectors)
    write_index_bundle(tmp_path / "faiss", indexes["flat"], "flat", vectors_path=tmp_path / "item_embeddings.npy")
    np.save(tmp_path / "item_embeddings.npy", vectors[::-1].copy())  # a retrain without a re-index
    assert load_index_bundle(tmp_path / "faiss").vectors is None
    assert "changed since the index was built" in caplog.text


# ----------------------------------------------------------------------------- filters


def test_filter_mask_semantics(item_table):
    genres = item_table.genres.str.split("|")
    noir_or_western = genres.map(lambda g: "Film-Noir" in g or "Western" in g).to_numpy()
    np.testing.assert_array_equal(filter_mask(item_table, genres=["film-noir", "WESTERN"]), noir_or_western)
    assert filter_mask(item_table).all()
    assert filter_mask(item_table, genres=[]).all()
    years = item_table.year.to_numpy()
    m = filter_mask(item_table, min_year=1990)
    np.testing.assert_array_equal(m, years >= 1990)
    m = filter_mask(item_table, max_year=1960)
    np.testing.assert_array_equal(m, (years <= 1960) & (years > 0))  # unknown year (0) excluded
    m = filter_mask(item_table, min_rating=4.0)
    np.testing.assert_array_equal(m, item_table.mean_rating.to_numpy() >= 4.0)
    with pytest.raises(ValueError, match="unknown genre"):
        filter_mask(item_table, genres=["Drama", "Dramedy"])


def test_item_filter_parses_once_and_agrees_with_filter_mask(item_table):
    flt = ItemFilter(item_table)
    assert flt.genres == sorted(GENRES) and flt.n_items == N
    for kwargs in ({"genres": ["Drama"]}, {"genres": ["sci-fi", "Action"], "min_year": 2000, "min_rating": 3.5}, {}):
        np.testing.assert_array_equal(flt.mask(**kwargs), filter_mask(item_table, **kwargs))
        np.testing.assert_array_equal(filter_mask(flt, **kwargs), filter_mask(item_table, **kwargs))
    with pytest.raises(ValueError, match="item column"):
        ItemFilter(item_table.iloc[1:])


def test_filter_mask_is_positioned_by_item_index(item_table):
    shuffled = item_table.sample(frac=1.0, random_state=2)
    np.testing.assert_array_equal(
        filter_mask(shuffled, genres=["Comedy"], min_year=1980), filter_mask(item_table, genres=["Comedy"], min_year=1980)
    )


PATHS = pytest.mark.parametrize("on_gpu", [False, True], ids=["selector", "overfetch"])


@PATHS
def test_filtered_excludes_equal_brute_force(indexes, vectors, on_gpu):
    queries = make_queries(vectors, 20, seed=11)
    ref_items, _ = brute_force(vectors, queries, 100)
    rng = np.random.default_rng(0)
    # Exclude half of each row's true top 100 plus random items: the seen-items case.
    exclude = [np.concatenate([row[::2], rng.choice(N, 200, replace=False)]) for row in ref_items]
    items, scores = search_filtered(indexes["flat"], queries, 100, exclude=exclude, on_gpu=on_gpu, exact_below=0)
    assert_exact(items, scores, *brute_force(vectors, queries, 100, exclude), vectors, queries, exclude)


@PATHS
def test_filtered_genre_year_and_excludes_equal_brute_force(indexes, vectors, item_table, on_gpu):
    allowed = filter_mask(item_table, genres=["Comedy", "Western"], min_year=1970, max_year=2005)
    assert 0.05 < allowed.mean() < 0.5
    queries = make_queries(vectors, 20, seed=12)
    rng = np.random.default_rng(1)
    exclude = [rng.choice(N, 300, replace=False) for _ in range(20)]
    for ex in (None, exclude):
        items, scores = search_filtered(indexes["flat"], queries, 50, exclude=ex, allowed_mask=allowed, on_gpu=on_gpu, exact_below=0)
        ref = brute_force(vectors, queries, 50, ex, allowed)
        assert_exact(items, scores, *ref, vectors, queries, ex, allowed)


@PATHS
def test_filter_with_fewer_than_k_items_pads(indexes, vectors, item_table, on_gpu):
    allowed = filter_mask(item_table, genres=["Film-Noir"], min_year=1940, max_year=1944, min_rating=2.0)
    assert 0 < allowed.sum() < 50
    queries = make_queries(vectors, 5, seed=13)
    exclude = [np.flatnonzero(allowed)[:2]] * 5
    items, scores = search_filtered(indexes["flat"], queries, 100, exclude=exclude, allowed_mask=allowed, on_gpu=on_gpu, exact_below=0)
    n_ok = int(allowed.sum()) - 2
    assert ((items >= 0).sum(axis=1) == n_ok).all()
    assert (items[:, n_ok:] == -1).all() and np.isneginf(scores[:, n_ok:]).all()
    assert_exact(items, scores, *brute_force(vectors, queries, 100, exclude, allowed), vectors, queries, exclude, allowed)
    # Nothing admissible at all: every row is padding.
    items, scores = search_filtered(indexes["flat"], queries, 10, allowed_mask=np.zeros(N, bool), on_gpu=on_gpu, exact_below=0)
    assert (items == -1).all() and np.isneginf(scores).all()


def test_selective_filter_takes_several_overfetch_rounds(indexes, vectors):
    query = make_queries(vectors, 1, seed=14)
    order = np.argsort(-(vectors @ query[0]))
    allowed = np.zeros(N, dtype=bool)
    allowed[order[1000:1300]] = True  # admissible items only from rank 1000 on: a taste far from the user
    counting = CountingIndex(indexes["flat"])
    items, scores = search_filtered(counting, query, 10, allowed_mask=allowed, on_gpu=True, max_rounds=3, exact_below=0)
    assert len(counting.fetches) == 3 and counting.fetches == sorted(counting.fetches)
    assert counting.fetches[0] < 1000 <= counting.fetches[-1]
    assert_exact(items, scores, *brute_force(vectors, query, 10, None, allowed), vectors, query, None, allowed)
    # With one round allowed, the exact fallback over the admissible items finishes the job.
    counting = CountingIndex(indexes["flat"])
    items, scores = search_filtered(counting, query, 10, allowed_mask=allowed, on_gpu=True, max_rounds=1, exact_below=0)
    assert len(counting.fetches) == 1
    assert_exact(items, scores, *brute_force(vectors, query, 10, None, allowed), vectors, query, None, allowed)


def test_gpu_path_never_asks_for_more_than_gpu_max_k(indexes, vectors):
    from orchestrator.ann import GPU_MAX_K

    query = make_queries(vectors, 3, seed=15)
    allowed = np.zeros(N, dtype=bool)
    allowed[::997] = True  # 6 items: the naive over-fetch would be k / share = whole catalog
    counting = CountingIndex(indexes["flat"])
    items, scores = search_filtered(counting, query, 20, allowed_mask=allowed, on_gpu=True, exact_below=0)
    assert max(counting.fetches) <= GPU_MAX_K
    assert_exact(items, scores, *brute_force(vectors, query, 20, None, allowed), vectors, query, None, allowed)


def overlap(items, ref_items):
    return np.mean([np.intersect1d(a[a >= 0], b[b >= 0]).size / max(1, (b >= 0).sum()) for a, b in zip(items, ref_items)])


@pytest.mark.parametrize("kind", ["ivf_flat", "hnsw", "ivf_pq"])
@PATHS
def test_filtered_approximate_indexes_keep_their_recall(indexes, vectors, item_table, kind, on_gpu):
    allowed = filter_mask(item_table, genres=["Comedy", "Western"], min_year=1970, max_year=2005)
    queries = make_queries(vectors, 20, seed=16)
    rng = np.random.default_rng(2)
    exclude = [rng.choice(N, 100, replace=False) for _ in range(20)]
    items, _ = search_filtered(
        indexes[kind], queries, 50, exclude=exclude, allowed_mask=allowed, on_gpu=on_gpu, vectors=vectors, exact_below=0
    )
    ref_items, _ = brute_force(vectors, queries, 50, exclude, allowed)
    assert (items >= 0).all()
    for r in range(len(items)):
        assert allowed[items[r]].all() and not np.isin(items[r], exclude[r]).any()
    assert overlap(items, ref_items) >= (0.6 if kind == "ivf_pq" else 0.9)


@pytest.mark.parametrize("kind", ["ivf_flat", "hnsw"])
@PATHS
def test_filtered_approximate_indexes_are_never_short(indexes, vectors, item_table, kind, on_gpu):
    allowed = filter_mask(item_table, genres=["Film-Noir"], min_year=1990)  # ~4 % of items
    queries = make_queries(vectors, 10, seed=17)
    exclude = [np.flatnonzero(allowed)[r::7] for r in range(10)]
    # No `vectors`: IVF cannot reconstruct, so only the retries can fill the rows.
    items, _ = search_filtered(
        indexes[kind], queries, 100, exclude=exclude, allowed_mask=allowed, on_gpu=on_gpu, exact_below=0, max_rounds=4
    )
    ref_items, _ = brute_force(vectors, queries, 100, exclude, allowed)
    np.testing.assert_array_equal((items >= 0).sum(axis=1), (ref_items >= 0).sum(axis=1))
    assert overlap(items, ref_items) >= 0.85


def test_small_admissible_sets_are_brute_forced(indexes, vectors, item_table):
    allowed = filter_mask(item_table, genres=["Film-Noir"])
    assert allowed.sum() <= 4096
    queries = make_queries(vectors, 10, seed=18)
    exclude = [np.flatnonzero(allowed)[r::5] for r in range(10)]
    for kind in ("flat", "hnsw", "ivf_flat"):
        counting = CountingIndex(indexes[kind])
        items, scores = search_filtered(counting, queries, 30, exclude=exclude, allowed_mask=allowed, vectors=vectors)
        assert counting.fetches == []  # FAISS was never asked
        assert_exact(items, scores, *brute_force(vectors, queries, 30, exclude, allowed), vectors, queries, exclude, allowed)
    # Without vectors, Flat and HNSW reconstruct their own; IVF cannot and searches instead.
    items, scores = search_filtered(indexes["hnsw"], queries, 30, exclude=exclude, allowed_mask=allowed)
    assert_exact(items, scores, *brute_force(vectors, queries, 30, exclude, allowed), vectors, queries, exclude, allowed)


def test_unfiltered_search_matches_faiss(indexes, vectors):
    queries = make_queries(vectors, 10, seed=17)
    d, i = indexes["hnsw"].search(queries, 30)
    items, scores = search_filtered(indexes["hnsw"], queries, 30)
    np.testing.assert_array_equal(items, i)
    np.testing.assert_allclose(scores, d)


# ----------------------------------------------------------------------------- GPU, CLI hook


def test_to_device_without_gpu_keeps_cpu(indexes):
    assert GPU_KINDS["hnsw"] is None and GPU_KINDS["flat"]
    if gpu_available():
        pytest.skip("a GPU is present")
    assert to_device(indexes["ivf_flat"]) is indexes["ivf_flat"]
    assert to_device(indexes["hnsw"], use_gpu=False) is indexes["hnsw"]
    with pytest.raises(RuntimeError, match="GPU"):
        to_device(indexes["flat"], use_gpu=True)


def test_build_from_artifacts_writes_bundle_and_report(tmp_path, item_table):
    vectors = synthetic_vectors(2000, DIM, seed=7)
    np.save(tmp_path / "item_embeddings.npy", vectors)
    item_table.iloc[:2000].to_parquet(tmp_path / "items.parquet", index=False)
    report = build_from_artifacts(tmp_path, kinds=("ivf_flat", "hnsw"), progress=False, n_queries=100, threads=1)
    out = tmp_path / "faiss"
    assert {p.name for p in out.iterdir()} == {"faiss.index", "id_map.npy", "index.json", "report.md", "report.json"}
    assert [r["kind"] for r in report["results"]] == ["flat", "ivf_flat", "hnsw"]
    assert report["default"] == choose_default(report["results"], 0.95)
    assert json.loads((out / "report.json").read_text())["default"] == report["default"]
    md = (out / "report.md").read_text()
    assert "| kind | params | recall@100 | p50 ms | p99 ms | build s | bytes |" in md
    assert md.count("\n| ") == 1 + 3  # header + one row per kind
    bundle = load_index_bundle(out)
    assert bundle.kind == report["default"] and bundle.vectors is not None
    assert bundle.meta["item_table"]["path"] == "../items.parquet"


def test_ivf_skips_the_rungs_whose_lists_cannot_hold_k(indexes, vectors, monkeypatch):
    ivf = indexes["ivf_flat"]
    per_list = N / ivf.nlist
    nprobes: list[int] = []
    search = ivf.search

    def recording(x, k, params=None):  # the real IVF search, its nprobe noted
        nprobes.append(params.nprobe)
        return search(x, k, params=params)

    monkeypatch.setattr(ivf, "search", recording)
    query = make_queries(vectors, 1, seed=19)
    exclude = [np.random.default_rng(3).choice(N, 40, replace=False)]
    # k above what the tuned nprobe's lists hold: that rung would come back short and run again
    k = int(ivf.nprobe * per_list) + 20
    items, _ = search_filtered(ivf, query, k, exclude=exclude, exact_below=0)
    assert nprobes == [ivf.nprobe * 4]  # one search, at the rung the short one used to reach
    assert (items >= 0).all() and not np.isin(items, exclude[0]).any()
    # the same answer as the old ladder's second round, which this search replaces
    forced = faiss.SearchParametersIVF(nprobe=ivf.nprobe * 4, sel=faiss.IDSelectorNot(faiss.IDSelectorBatch(exclude[0])))
    np.testing.assert_array_equal(items, search(query, k, params=forced)[1])
    # a k the tuned lists can hold keeps the tuned nprobe
    nprobes.clear()
    search_filtered(ivf, query, 10, exclude=exclude, exact_below=0)
    assert nprobes == [ivf.nprobe]
