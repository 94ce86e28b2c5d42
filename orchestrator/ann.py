"""FAISS at serving time: the published index bundle, filtered search, GPU placement.

The bundle is built, tuned and written offline by ``export/faiss_index.py`` (``recsys
export``); this module is its reader, and the writer conforms to it. The item vectors are
L2-normalised, so every index uses the inner-product metric and the scores are cosine
similarities, exactly what the two-tower was trained to rank by.

GPU (:func:`to_device`): FAISS GPU implements Flat, IVF-Flat and IVF-PQ (IVF-PQ with 8-bit
codes only). It has no HNSW (CAGRA, its graph index, only exists in cuVS builds), so an HNSW
index is served on the GPU as an exact ``GpuIndexFlat`` built from the HNSW's own stored
vectors: on a GPU, brute force over ~10^5 x 64 floats is a fraction of a millisecond and
exact, which beats keeping a CPU graph next to an idle GPU. An index FAISS refuses to clone
stays on the CPU with a warning.

Filtered search (:func:`search_filtered`): a filter admitting few items (a rare genre) is
answered by brute force over just those items; otherwise, on the CPU the filter goes into
FAISS as an ``IDSelector`` (pre-filtering inside the scan), while FAISS GPU ignores
selectors without a word, so on the GPU the search over-fetches and post-filters. Every
route ends with the same guarantee; see the function.

Thread safety (:class:`SearchGuard`): FAISS GPU indexes are not thread-safe, not even for
search, and the served index is shared by every gRPC worker thread (and, during a hot
reload, two indexes share one ``StandardGpuResources``). Every FAISS call of
:func:`search_filtered` on a GPU index therefore runs under its device's guard (one lock per
GPU). CPU indexes are searched concurrently, unless :attr:`IndexBundle.serialise` forces the
same guard on (the tests use it to run the serialised path without a GPU).

Bundle layout (written by ``export.faiss_index.write_index_bundle``, nothing is pickled)::

    artifacts/faiss/faiss.index    faiss.write_index of the chosen (CPU) index
    artifacts/faiss/id_map.npy     int64 [ntotal]: FAISS row -> item index (identity today)
    artifacts/faiss/index.json     kind, params, n, dim, metric, recall, built_at, sha256, ...
    artifacts/faiss/report.md      the comparison table of every kind measured
    artifacts/faiss/report.json    the same, machine-readable
"""

from __future__ import annotations

import json
import logging
import math
import threading
from collections.abc import Iterable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import faiss  # its bundled stubs miss several index classes and attributes: "# faiss stubs" ignores below
import numpy as np
import pandas as pd

from orchestrator.artifacts import file_sha256 as _sha256

log = logging.getLogger(__name__)

KINDS: tuple[str, ...] = ("flat", "ivf_flat", "ivf_pq", "hnsw")
"""Every index kind :func:`build_indexes` knows, cheapest to build first."""

GPU_KINDS: dict[str, str | None] = {
    "flat": "GpuIndexFlat",
    "ivf_flat": "GpuIndexIVFFlat",
    "ivf_pq": "GpuIndexIVFPQ (8-bit codes only)",
    "hnsw": None,
}
"""The FAISS GPU class each kind becomes; None: no GPU version (served as exact GpuIndexFlat)."""

GPU_MAX_K = 2048
"""Largest ``k`` one FAISS GPU search accepts (``GPU_MAX_SELECTION_K``); caps over-fetching."""

BUNDLE_VERSION = 1

OVERFETCH_GROWTH = 4
"""Each over-fetch round asks for this many times more neighbours than the last."""

EXACT_BELOW = 4096
"""Filters admitting at most this many items are served by brute force over those items:

4096 x 64 multiply-adds is cheaper than a filtered ANN search, and exact."""


def _as_matrix(x: np.ndarray, dim: int | None = None) -> np.ndarray:
    """float32, C-contiguous, 2-D: the only layout FAISS reads without surprises."""
    x = np.ascontiguousarray(x, dtype=np.float32)
    if x.ndim == 1:
        x = x[None, :]
    if x.ndim != 2:
        raise ValueError(f"expected a 2-D array of vectors, got shape {x.shape}")
    if dim is not None and x.shape[1] != dim:
        raise ValueError(f"vectors have dimension {x.shape[1]}, the index has {dim}")
    return x


def index_params(index: faiss.Index) -> dict[str, int]:
    """The search-relevant parameters of an index, read from the index itself.

    Reading them back (instead of remembering what was asked for) keeps the report honest
    for indexes loaded from disk or tuned after building.
    """
    if isinstance(index, faiss.IndexIVFPQ):
        return {"nlist": int(index.nlist), "nprobe": int(index.nprobe), "m": int(index.pq.M), "nbits": int(index.pq.nbits)}
    if isinstance(index, faiss.IndexIVF):
        return {"nlist": int(index.nlist), "nprobe": int(index.nprobe)}
    if isinstance(index, faiss.IndexHNSW):
        hnsw = index.hnsw
        # FAISS stores M implicitly: levels above 0 have M neighbours, level 0 has 2 M.
        return {"M": int(hnsw.nb_neighbors(1)), "efConstruction": int(hnsw.efConstruction), "efSearch": int(hnsw.efSearch)}  # type: ignore[attr-defined]  # faiss stubs
    return {}


def gpu_available() -> bool:
    """True when this FAISS build has GPU support and sees at least one GPU."""
    return hasattr(faiss, "StandardGpuResources") and faiss.get_num_gpus() > 0


def is_gpu_index(index: faiss.Index) -> bool:
    """True for FAISS GPU indexes (always False on faiss-cpu)."""
    gpu_index = getattr(faiss, "GpuIndex", None)
    return gpu_index is not None and isinstance(index, gpu_index)


class SearchGuard:
    """A lock around FAISS calls that must not run concurrently, with counters for tests.

    Attributes:
        name: What it guards (``gpu:0``, ``bundle``), for logs.
        calls: FAISS calls made under it so far.
        max_active: Most calls ever inside at once (1 while it works).
    """

    def __init__(self, name: str) -> None:
        self.name = name
        self.calls = 0
        self.max_active = 0
        self._active = 0
        self._lock = threading.Lock()

    @contextmanager
    def __call__(self) -> Iterator[None]:
        with self._lock:
            self._active += 1
            self.calls += 1
            self.max_active = max(self.max_active, self._active)
            try:
                yield
            finally:
                self._active -= 1


_GPU_GUARDS: dict[int, SearchGuard] = {}
_GPU_GUARDS_LOCK = threading.Lock()


def gpu_guard(device: int) -> SearchGuard:
    """The one guard of a GPU: every index on it shares its ``StandardGpuResources``."""
    with _GPU_GUARDS_LOCK:
        if device not in _GPU_GUARDS:
            _GPU_GUARDS[device] = SearchGuard(f"gpu:{device}")
        return _GPU_GUARDS[device]


def guard_of(index: faiss.Index) -> SearchGuard | None:
    """The guard FAISS calls on ``index`` need: its GPU's for a GPU index, None on the CPU."""
    if not is_gpu_index(index):
        return None
    return gpu_guard(int(index.getDevice()))  # type: ignore[attr-defined]  # faiss stubs


def _cpu(index: faiss.Index) -> faiss.Index:
    return faiss.index_gpu_to_cpu(index) if is_gpu_index(index) else index


_GPU_RESOURCES: dict[int, Any] = {}


def _gpu_resources(device: int) -> Any:
    # One StandardGpuResources per device and process: each reserves scratch memory, and it
    # must outlive every index cloned with it, so it is kept here for the process lifetime.
    if device not in _GPU_RESOURCES:
        _GPU_RESOURCES[device] = faiss.StandardGpuResources()
    return _GPU_RESOURCES[device]


def to_device(index: faiss.Index, use_gpu: bool | None = None, device: int = 0) -> faiss.Index:
    """Puts an index where it will be searched.

    Args:
        index: A CPU (or GPU) index.
        use_gpu: True: on the GPU (raises if FAISS has no GPU); False: on the CPU (a GPU index
            is copied back); None: on the GPU when ``faiss.get_num_gpus() > 0``.
        device: GPU ordinal.

    Returns:
        The index on the chosen device. HNSW has no GPU implementation: on the GPU it becomes
        an exact ``GpuIndexFlat`` over its stored vectors (see the module docstring). If
        FAISS cannot clone an index (e.g. IVF-PQ with fewer than 8 bits per code) it stays on
        the CPU and a warning is logged.
    """
    want = gpu_available() if use_gpu is None else use_gpu
    if not want:
        return _cpu(index)
    if not gpu_available():
        raise RuntimeError("use_gpu=True but this FAISS build has no GPU support or sees no GPU")
    if is_gpu_index(index):
        return index
    source = index
    if isinstance(index, faiss.IndexHNSW):
        source = faiss.IndexFlat(index.d, index.metric_type)
        source.add(index.reconstruct_n(0, index.ntotal))
    try:
        return faiss.index_cpu_to_gpu(_gpu_resources(device), device, source)
    except RuntimeError as err:
        log.warning("FAISS could not move %s to GPU %d, keeping it on the CPU: %s", type(index).__name__, device, err)
        return index


class ItemFilter:
    """The request filters of :func:`filter_mask` over one item table, parsed once.

    Parsing ``A|B`` genre strings costs ~0.1 s on 10^5 items; a server builds this once at
    load and then answers each request's :meth:`mask` in well under a millisecond.

    Args:
        item_table: ``items.parquet`` (columns ``item``, ``genres``, ``year``,
            ``mean_rating``), one row per item index ``0..n-1`` in any order.
    """

    def __init__(self, item_table: pd.DataFrame) -> None:
        items = item_table["item"].to_numpy(dtype=np.int64)
        n = len(items)
        if n and not np.array_equal(np.sort(items), np.arange(n)):
            raise ValueError("item column must hold each item index 0..n-1 exactly once")
        self.n_items = n
        self.year = np.zeros(n, dtype=np.int64)
        self.year[items] = item_table["year"].fillna(0).to_numpy(dtype=np.int64)
        self.rating = np.full(n, np.nan)
        self.rating[items] = item_table["mean_rating"].to_numpy(dtype=np.float64)
        # One row per (item, genre): vectorised split + explode, no Python loop over items.
        genre = pd.Series(item_table["genres"].fillna("").astype(str).to_numpy(), index=items).str.split("|").explode()
        genre = genre.astype(str).str.strip()
        genre = genre[genre != ""]
        codes, names = pd.factorize(genre.str.lower(), sort=True)
        self._codes = {str(name): i for i, name in enumerate(names)}
        self.genres: list[str] = sorted(set(genre))
        # [n_genres, n_items]: each genre's items contiguous, so an any-of is a few row ORs.
        self._by_genre = np.zeros((len(names), n), dtype=bool)
        self._by_genre[codes, genre.index.to_numpy(dtype=np.int64)] = True

    def mask(
        self,
        genres: Iterable[str] | None = None,
        min_year: int | None = None,
        max_year: int | None = None,
        min_rating: float | None = None,
    ) -> np.ndarray:
        """bool [n_items], True where the item passes; see :func:`filter_mask`."""
        ok = np.ones(self.n_items, dtype=bool)
        wanted = sorted({g.strip().lower() for g in genres or () if g.strip()})
        if wanted:
            unknown = [g for g in wanted if g not in self._codes]
            if unknown:
                raise ValueError(f"unknown genre(s) {unknown}; known: {self.genres}")
            any_of = np.zeros(self.n_items, dtype=bool)
            for g in wanted:
                any_of |= self._by_genre[self._codes[g]]
            ok &= any_of
        if min_year is not None or max_year is not None:
            ok &= self.year > 0
            if min_year is not None:
                ok &= self.year >= min_year
            if max_year is not None:
                ok &= self.year <= max_year
        if min_rating is not None:
            ok &= self.rating >= min_rating  # NaN compares False: unrated items fail
        return ok


def filter_mask(
    item_table: pd.DataFrame | ItemFilter,
    genres: Iterable[str] | None = None,
    min_year: int | None = None,
    max_year: int | None = None,
    min_rating: float | None = None,
) -> np.ndarray:
    """Which items pass the request's filters, as a mask over item indices.

    Semantics:

    * ``genres``: any-of; an item passes if one of its ``A|B`` genres is listed. Matching is
      case-insensitive and exact per genre ("Drama" does not match "Dramedy"). A name no
      item has raises ``ValueError`` (a typo would otherwise silently empty the results).
      None or an empty list means no genre filter.
    * ``min_year`` / ``max_year``: inclusive bounds on the release year. Items of unknown
      year (stored as 0) fail as soon as either bound is set: "films from 1990 on" should
      not return films whose year nobody knows.
    * ``min_rating``: Bayesian mean rating (column ``mean_rating``) at least this; a missing
      rating fails.
    * All given filters must hold (AND).

    Args:
        item_table: ``items.parquet`` as a DataFrame, or an :class:`ItemFilter` built from
            it (what a server should pass: the table is parsed once).
        genres: Genre names, any-of.
        min_year: Earliest release year, inclusive.
        max_year: Latest release year, inclusive.
        min_rating: Lowest mean rating, inclusive.

    Returns:
        bool [n_items], True where the item is allowed; position = item index.
    """
    flt = item_table if isinstance(item_table, ItemFilter) else ItemFilter(item_table)
    return flt.mask(genres, min_year, max_year, min_rating)


def _exclusions(exclude: Sequence[np.ndarray] | None, n: int, ntotal: int) -> list[np.ndarray]:
    """Per-row sorted unique excluded ids inside ``[0, ntotal)`` (padding -1 dropped)."""
    if exclude is None:
        return [np.empty(0, np.int64)] * n
    if len(exclude) != n:
        raise ValueError(f"exclude has {len(exclude)} rows for {n} queries")
    out = []
    for e in exclude:
        e = np.unique(np.asarray(e, dtype=np.int64).ravel())
        out.append(e[(e >= 0) & (e < ntotal)])
    return out


def _selector(allowed: np.ndarray | None, excluded: np.ndarray) -> Any:
    """An IDSelector admitting ``allowed`` minus ``excluded`` (None: admit everything).

    A bitmap is one bit per item and O(1) per test, so a genre/year mask becomes a bitmap
    (with the row's exclusions cleared in a copy). Exclusions alone are short lists: a
    hashed ``IDSelectorBatch`` wrapped in ``IDSelectorNot`` avoids an n-bit copy per request.
    FAISS' Python layer keeps the numpy buffers and sub-selectors alive as long as the
    selector lives.
    """
    if allowed is not None:
        bits = allowed.copy()
        bits[excluded] = False
        return faiss.IDSelectorBitmap(np.packbits(bits, bitorder="little"))  # type: ignore[call-arg, arg-type]  # faiss stubs
    if excluded.size:
        return faiss.IDSelectorNot(faiss.IDSelectorBatch(excluded))
    return None


def _supports_selector(index: faiss.Index) -> bool:
    return not is_gpu_index(index) and isinstance(index, (faiss.IndexFlat, faiss.IndexIVF, faiss.IndexHNSW))


def _is_ivf(index: faiss.Index) -> bool:
    gpu_ivf = getattr(faiss, "GpuIndexIVF", None)
    return isinstance(index, faiss.IndexIVF) or (gpu_ivf is not None and isinstance(index, gpu_ivf))


def _search_params(index: faiss.Index, sel: Any, effort: int | None) -> Any:
    """SearchParameters of the right subclass carrying the selector and the search effort.

    FAISS GPU IVF reads ``nprobe`` from SearchParametersIVF (and ignores ``sel``), so the
    over-fetch route can raise nprobe per call without mutating a shared index.
    """
    kwargs = {} if sel is None else {"sel": sel}
    if _is_ivf(index):
        return faiss.SearchParametersIVF(nprobe=effort or index.nprobe, **kwargs)  # type: ignore[call-arg, attr-defined]  # faiss stubs
    if isinstance(index, faiss.IndexHNSW):
        return faiss.SearchParametersHNSW(efSearch=effort or index.hnsw.efSearch, **kwargs)  # type: ignore[attr-defined]  # faiss stubs
    return faiss.SearchParameters(**kwargs) if kwargs else None


def _effort_ladder(index: faiss.Index, rounds: int, share: float, on_gpu: bool, want: int = 0) -> list[int | None]:
    """nprobe / efSearch per round (exact kinds: None, nothing to raise).

    IVF: the first round divides ``nprobe`` by the admissible share. A selector makes FAISS
    skip inadmissible ids before computing distances (the over-fetch drops them afterwards),
    so ``nprobe / share`` cells hold about as many *admissible* candidates as ``nprobe``
    cells do unfiltered, at about the same number of distance computations, and recall
    stays where tuning put it. On the GPU nprobe is capped at ``GPU_MAX_K`` like k.

    HNSW: the graph walk computes distances to admissible and inadmissible nodes alike, so
    ``efSearch`` costs in proportion whatever the filter; it is scaled the same way but
    capped at 4x (first round) and 16x (retries) its own value, which keeps a 5 % filter
    around 1-4 ms on 10^5 items (smaller admissible sets go to brute force). On the
    over-fetch route (only reached when forced: on a GPU HNSW is served as Flat) the effort
    follows the fetch instead, ``efSearch = 2 x fetch``, see :func:`search_filtered`.

    Each further round multiplies by 4.

    IVF rungs whose lists hold, on average, fewer admissible items than ``want`` (the fewest
    results plus admissible exclusions any row needs) are skipped, the last rung excepted: such
    a round comes back short and runs again, so it only costs a search. With ``nprobe`` tuned
    for recall at k = 100 and 200 candidates served, the first rung of a ~25-item-per-list
    index held ~200 vectors and was re-run for 237 of 300 users (BENCHMARKS.md, "The hot path,
    fourth pass"). The rows keep the rung they reached before, or a higher one.
    """
    ivf = _is_ivf(index)
    if ivf:
        start, top = index.nprobe, min(index.nlist, GPU_MAX_K) if on_gpu else index.nlist  # type: ignore[attr-defined]  # faiss stubs
        first = math.ceil(start / max(share, 1e-9))
    elif isinstance(index, faiss.IndexHNSW) and not on_gpu:
        start = index.hnsw.efSearch
        top = max(start, min(index.ntotal, 16 * start))
        first = min(math.ceil(start / max(share, 1e-9)), 4 * start)
    else:
        return [None] * max(1, rounds)
    rungs = [min(first * OVERFETCH_GROWTH**r, top) for r in range(max(1, rounds))]
    if ivf:
        per_list = index.ntotal / max(index.nlist, 1) * share  # type: ignore[attr-defined]  # faiss stubs
        while len(rungs) > 1 and rungs[0] * per_list < want:
            rungs.pop(0)
    return list[int | None](rungs)


def _take_admissible(
    labels: np.ndarray,
    scores: np.ndarray,
    allowed: np.ndarray | None,
    excluded: Sequence[np.ndarray],
    k: int,
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Post-filter: the first ``k`` admissible hits of each row, in FAISS' (best-first) order."""
    ok = labels >= 0
    if allowed is not None:
        ok &= allowed[np.where(ok, labels, 0)]
    for row, e in enumerate(excluded):
        if e.size:
            ok[row] &= ~np.isin(labels[row], e)
    pos = np.cumsum(ok, axis=1) - 1
    keep = ok & (pos < k)
    items = np.full((len(labels), k), -1, dtype=np.int64)
    top = np.full((len(labels), k), -np.inf, dtype=np.float32)
    r, c = np.nonzero(keep)
    items[r, pos[r, c]] = labels[r, c]
    top[r, pos[r, c]] = scores[r, c]
    return items, top, keep.sum(axis=1)


@contextmanager
def _unguarded() -> Iterator[None]:
    yield


def _vectors_of(index: faiss.Index, ids: np.ndarray, vectors: np.ndarray | None, guard: SearchGuard | None = None) -> np.ndarray | None:
    """The stored vectors of ``ids``: from ``vectors`` or the index's own reconstruction."""
    if vectors is not None:
        return np.take(vectors, ids, axis=0).astype(np.float32, copy=False)  # take: faster gather than []
    try:
        with guard() if guard is not None else _unguarded():
            return index.reconstruct_batch(ids)
    except (RuntimeError, AttributeError):  # IVF without a direct map, GPU IVF, PQ-only ...
        return None


def _exact_rows(
    base: np.ndarray, base_vectors: np.ndarray, queries: np.ndarray, k: int, excluded: Sequence[np.ndarray], chunk: int = 256
) -> tuple[np.ndarray, np.ndarray]:
    """Brute force over the candidate ids ``base`` (sorted) minus each row's exclusions."""
    n = len(queries)
    items = np.full((n, k), -1, dtype=np.int64)
    top = np.full((n, k), -np.inf, dtype=np.float32)
    if base.size == 0:
        return items, top
    kk = min(k, base.size)
    for s in range(0, n, chunk):  # bounds the score matrix at chunk x |base| floats
        scores = (queries[s : s + chunk] @ base_vectors.T).astype(np.float32)
        for r, e in enumerate(excluded[s : s + chunk]):
            if e.size:
                scores[r, np.searchsorted(base, e[np.isin(e, base)])] = -np.inf
        part = np.argpartition(-scores, kk - 1, axis=1)[:, :kk] if kk < base.size else np.tile(np.arange(kk), (len(scores), 1))
        part_scores = np.take_along_axis(scores, part, axis=1)
        # best first, ties by the lower item id, so results are deterministic
        order = np.lexsort((base[part], -part_scores), axis=1)
        best = np.take_along_axis(part, order, axis=1)
        best_scores = np.take_along_axis(part_scores, order, axis=1)
        ok = np.isfinite(best_scores)
        items[s : s + chunk, :kk] = np.where(ok, base[best], -1)
        top[s : s + chunk, :kk] = np.where(ok, best_scores, -np.inf)
    return items, top


def search_filtered(
    index: faiss.Index,
    query_vectors: np.ndarray,
    k: int,
    *,
    exclude: Sequence[np.ndarray] | None = None,
    allowed_mask: np.ndarray | None = None,
    on_gpu: bool | None = None,
    max_rounds: int = 3,
    vectors: np.ndarray | None = None,
    exact_below: int = EXACT_BELOW,
    guard: SearchGuard | None = None,
) -> tuple[np.ndarray, np.ndarray]:
    """Top-``k`` by inner product among the admissible items of each query.

    Admissible for row ``i``: ``allowed_mask`` is True (all items when None) and the id is
    not in ``exclude[i]`` (e.g. the user's seen items). Ids are FAISS rows, i.e. item
    indices while the id map is the identity (:class:`IndexBundle` translates otherwise).

    Routes, in order:

    1. **Small admissible set** (``allowed_mask`` admits at most ``exact_below`` items):
       brute force over those items. A few thousand 64-d dot products cost less than any
       filtered ANN search, and the answer is exact; a genre such as Film-Noir lands here.
    2. **CPU, selector**: the filter goes into FAISS as an ``IDSelector`` inside
       ``SearchParameters`` and is applied during the scan (one selector per row when rows
       have their own exclusions). Flat, IVF and HNSW support it. For IVF / HNSW the first
       round divides ``nprobe`` / ``efSearch`` by the admissible share (efSearch capped; an
       IVF rung whose lists cannot hold the row's k is skipped, see :func:`_effort_ladder`);
       rows that still come back short retry x4, up to
       ``max_rounds`` searches.
    3. **GPU (or ``on_gpu=True``), over-fetch**: FAISS GPU ignores selectors silently, so
       the search asks for more neighbours than needed and drops inadmissible ones. The
       first fetch is ``(k + |exclude|) / share`` (the need if admissible items were spread
       evenly), then x4 per round for the rows still short, up to ``max_rounds`` searches
       and ``GPU_MAX_K`` neighbours (FAISS GPU's limit; also applied with ``on_gpu=True`` on
       a CPU index so that the GPU logic is testable without a GPU). IVF's nprobe is
       scaled as on route 2 (GPU IVF takes it from ``SearchParametersIVF``).

    Guarantee: a row that ends with fewer than ``min(k, n_admissible)`` results is
    recomputed by brute force over its admissible items. Hence for Flat every route equals
    exact search over the admissible items, and no row is padded while admissible items
    exist. Brute force needs the vectors: ``vectors`` when given, else the index's own
    reconstruction (Flat, HNSW; IVF only with a direct map); without either, route 1 is
    skipped and a short row stays padded.

    Args:
        index: A FAISS index (CPU or GPU), inner-product metric.
        query_vectors: float32 [n, dim].
        k: Results per query.
        exclude: Per-query ids to drop, or None.
        allowed_mask: bool [ntotal], shared by all queries (see :func:`filter_mask`), or None.
        on_gpu: True forces route 3, False route 2 (CPU indexes only); None decides from
            the index.
        max_rounds: Searches per route before falling back to brute force.
        vectors: float32 [ntotal, dim] the indexed vectors, for brute force.
        exact_below: Largest admissible set served by brute force (0 turns route 1 off).
        guard: Serialises every FAISS call made here; None: :func:`guard_of` the index (the
            GPU's guard for a GPU index, no lock on the CPU).

    Returns:
        ``(ids int64 [n, k], scores float32 [n, k])``, best first; ``-1`` / ``-inf`` pad rows
        with fewer than ``k`` admissible items.
    """
    q = _as_matrix(query_vectors, index.d)
    n, ntotal = len(q), int(index.ntotal)
    guard = guard if guard is not None else guard_of(index)

    def search(x: np.ndarray, kk: int, params: Any) -> tuple[np.ndarray, np.ndarray]:
        with guard() if guard is not None else _unguarded():
            return index.search(x, kk, **({} if params is None else {"params": params}))  # type: ignore[no-any-return]

    if k <= 0:
        raise ValueError("k must be positive")
    if allowed_mask is not None:
        allowed_mask = np.asarray(allowed_mask, dtype=bool)
        if allowed_mask.shape != (ntotal,):
            raise ValueError(f"allowed_mask has shape {allowed_mask.shape}, the index holds {ntotal} items")
    excluded = _exclusions(exclude, n, ntotal)
    n_base = int(allowed_mask.sum()) if allowed_mask is not None else ntotal
    dropped = np.array([allowed_mask[e].sum() if allowed_mask is not None else e.size for e in excluded], dtype=np.int64)
    need = np.minimum(k, n_base - dropped)
    items = np.full((n, k), -1, dtype=np.int64)
    scores = np.full((n, k), -np.inf, dtype=np.float32)
    if n == 0 or n_base == 0:
        return items, scores

    def admissible_ids() -> np.ndarray:  # built only when brute force needs it
        return np.flatnonzero(allowed_mask) if allowed_mask is not None else np.arange(ntotal)

    base: np.ndarray | None = None
    base_vectors: np.ndarray | None = None
    if allowed_mask is not None and n_base <= exact_below:
        base = admissible_ids()
        base_vectors = _vectors_of(index, base, vectors, guard)
        if base_vectors is not None:
            return _exact_rows(base, base_vectors, q, k, excluded)

    gpu = is_gpu_index(index) if on_gpu is None else on_gpu
    if not gpu and not _supports_selector(index):
        gpu = True  # no selector support (e.g. a GPU index passed with on_gpu=False): post-filter
    got = np.zeros(n, dtype=np.int64)
    share = n_base / ntotal
    want = int((need + dropped).min())  # the row needing the fewest admissible items in its lists
    if gpu:
        cap = min(ntotal, GPU_MAX_K)
        longest = max(e.size for e in excluded)
        fetch = min(cap, max(k, math.ceil((k + longest) / share)))
        pending = np.arange(n)
        last: tuple[int, int | None] | None = None
        for effort in _effort_ladder(index, max_rounds, share, on_gpu=True, want=want):
            if (fetch, effort) == last:
                break  # both at their ceiling: another round would return the same
            last = (fetch, effort)
            if isinstance(index, faiss.IndexHNSW):
                # HNSW's recall at rank `fetch` needs a candidate list wider than `fetch`.
                effort = min(max(index.ntotal, index.hnsw.efSearch), max(index.hnsw.efSearch, 2 * fetch))
            d, labels = search(q[pending], fetch, _search_params(index, None, effort))
            it, sc, cnt = _take_admissible(labels, d, allowed_mask, [excluded[r] for r in pending], k)
            items[pending], scores[pending], got[pending] = it, sc, cnt
            # A row is settled when full, or when FAISS had nothing more to give (-1 padding).
            # IVF / HNSW -1 padding only says the probed part ran dry: the next round probes more.
            exhausted = (fetch >= ntotal) | ((labels < 0).any(axis=1) & (last[1] is None))
            pending = pending[(cnt < need[pending]) & ~exhausted]
            if pending.size == 0:
                break
            fetch = min(cap, fetch * OVERFETCH_GROWTH)
    else:
        width = min(k, ntotal)
        shared = exclude is None or not any(e.size for e in excluded)
        pending = np.arange(n)
        # Exact kinds get one round: their answer cannot improve. Approximate ones stop early
        # once their effort has hit the ceiling.
        ladder = _effort_ladder(index, max_rounds, share, on_gpu=False, want=want)
        ladder = [None] if ladder[0] is None else list(dict.fromkeys(ladder))
        for effort in ladder:
            if shared:  # one selector (or none) for the whole batch
                d, labels = search(q[pending], width, _search_params(index, _selector(allowed_mask, np.empty(0, np.int64)), effort))
                batches = [(pending, d, labels)]
            else:
                batches = []
                for r in pending:
                    d, labels = search(q[r : r + 1], width, _search_params(index, _selector(allowed_mask, excluded[r]), effort))
                    batches.append((np.array([r]), d, labels))
            for rows, d, labels in batches:
                # The selector has filtered already: this only pads to k and counts.
                it, sc, cnt = _take_admissible(labels, d, None, [np.empty(0, np.int64)] * len(rows), k)
                items[rows], scores[rows], got[rows] = it, sc, cnt
            pending = pending[got[pending] < need[pending]]
            if pending.size == 0:
                break

    short = np.flatnonzero(got < need)
    if short.size:
        if base_vectors is None:
            base = admissible_ids()
            base_vectors = _vectors_of(index, base, vectors, guard)
        if base is None or base_vectors is None:
            log.warning("%d of %d rows are short of admissible results and no vectors were given", short.size, n)
        else:
            items[short], scores[short] = _exact_rows(base, base_vectors, q[short], k, [excluded[r] for r in short])
    return items, scores


@dataclass
class IndexBundle:
    """A loaded ``artifacts/faiss/`` bundle.

    Attributes:
        index: The FAISS index (CPU; :func:`to_device` moves it).
        id_map: int64 [ntotal], FAISS row -> item index.
        meta: The contents of ``index.json``.
        vectors: float32 [ntotal, dim] vectors by FAISS row, for the brute force of
            :func:`search_filtered`; None when the bundle names none (or they changed).
        serialise: Run every search under one lock even on the CPU (a GPU index always
            is, under its device's guard); tests set it to exercise the serialised path.
    """

    index: faiss.Index
    id_map: np.ndarray
    meta: dict[str, Any]
    vectors: np.ndarray | None = None
    serialise: bool = False
    _guard: SearchGuard | None = field(default=None, repr=False)
    _row_of: np.ndarray | None = field(default=None, repr=False)
    _is_identity: bool | None = field(default=None, repr=False)

    @property
    def kind(self) -> str:
        return str(self.meta["kind"])

    @property
    def guard(self) -> SearchGuard | None:
        """The guard searches run under: the GPU's, this bundle's own when ``serialise``, or None."""
        gpu = guard_of(self.index)
        return gpu if gpu is not None or not self.serialise else self._guard

    def __post_init__(self) -> None:
        # made here, not on first use: two threads must never get two different locks
        if self._guard is None:
            self._guard = SearchGuard("bundle")

    def _identity(self) -> bool:
        if self._is_identity is None:  # once, not per request
            self._is_identity = bool(np.array_equal(self.id_map, np.arange(len(self.id_map))))
        return self._is_identity

    def search(
        self,
        queries: np.ndarray,
        k: int,
        *,
        exclude: Sequence[np.ndarray] | None = None,
        allowed_mask: np.ndarray | None = None,
        on_gpu: bool | None = None,
        max_rounds: int = 3,
        exact_below: int = EXACT_BELOW,
    ) -> tuple[np.ndarray, np.ndarray]:
        """:func:`search_filtered` in item-index space (exclusions, mask and results).

        Args:
            queries: float32 [n, dim] user vectors.
            k: Results per query.
            exclude: Per-query item indices to drop.
            allowed_mask: bool [n_items] over item indices.
            on_gpu: See :func:`search_filtered`.
            max_rounds: See :func:`search_filtered`.
            exact_below: See :func:`search_filtered`.

        Returns:
            ``(item indices int64 [n, k], scores float32 [n, k])``, -1 / -inf padded.
        """
        if self._identity():
            return search_filtered(
                self.index,
                queries,
                k,
                exclude=exclude,
                allowed_mask=allowed_mask,
                on_gpu=on_gpu,
                max_rounds=max_rounds,
                vectors=self.vectors,
                exact_below=exact_below,
                guard=self.guard,
            )
        if self._row_of is None:
            row_of = np.full(int(self.id_map.max()) + 1, -1, dtype=np.int64)
            row_of[self.id_map] = np.arange(len(self.id_map))
            self._row_of = row_of
        row_of = self._row_of

        def rows(items: np.ndarray) -> np.ndarray:
            items = np.asarray(items, dtype=np.int64)
            items = items[(items >= 0) & (items < len(row_of))]
            r = row_of[items]
            return r[r >= 0]

        rows_exclude = None if exclude is None else [rows(e) for e in exclude]
        rows_mask = None if allowed_mask is None else np.asarray(allowed_mask, dtype=bool)[self.id_map]
        found, scores = search_filtered(
            self.index,
            queries,
            k,
            exclude=rows_exclude,
            allowed_mask=rows_mask,
            on_gpu=on_gpu,
            max_rounds=max_rounds,
            vectors=self.vectors,
            exact_below=exact_below,
            guard=self.guard,
        )
        return np.where(found >= 0, self.id_map[np.maximum(found, 0)], -1), scores


def load_index_bundle(bundle_dir: str | Path, *, load_vectors: bool = True, verify: bool = True) -> IndexBundle:
    """Reads a bundle written by :func:`write_index_bundle` (onto the CPU).

    Args:
        bundle_dir: The bundle folder.
        load_vectors: Load the vectors ``index.json`` names (if the file exists), for the
            exact fallback of filtered search.
        verify: Check the sha256 of ``faiss.index`` and ``id_map.npy`` against ``index.json``.

    Returns:
        The :class:`IndexBundle`.

    Raises:
        FileNotFoundError: A bundle file is missing.
        ValueError: Checksums or shapes disagree with ``index.json``.
    """
    folder = Path(bundle_dir)
    meta = json.loads((folder / "index.json").read_text())
    index_path, map_path = folder / meta["files"]["index"], folder / meta["files"]["id_map"]
    if verify:
        for path in (index_path, map_path):
            if _sha256(path) != meta["sha256"][path.name]:
                raise ValueError(f"{path}: sha256 differs from index.json (partial copy or mixed bundles)")
    index = faiss.read_index(str(index_path))
    id_map = np.load(map_path, allow_pickle=False)
    if index.ntotal != meta["n"] or index.d != meta["dim"] or id_map.shape != (meta["n"],):
        raise ValueError(f"{folder}: index/id map shapes disagree with index.json")
    vectors = None
    if load_vectors and "vectors" in meta:
        vpath = folder / meta["vectors"]["path"]
        if not vpath.exists():
            log.warning("%s is missing: filtered search runs without brute force", vpath)
        elif verify and _sha256(vpath) != meta["vectors"]["sha256"]:
            # A retrain replaced the embeddings but not the index: brute force would score
            # with vectors the index does not hold.
            log.warning("%s changed since the index was built: filtered search runs without brute force", vpath)
        else:
            by_item = _as_matrix(np.load(vpath, allow_pickle=False), index.d)
            if len(id_map) and len(by_item) <= int(id_map.max()):
                raise ValueError(f"{vpath}: {len(by_item)} vectors, the id map names item {int(id_map.max())}")
            identity = np.array_equal(id_map, np.arange(len(id_map)))
            vectors = by_item[: len(id_map)] if identity else by_item[id_map]  # rows = FAISS rows
    return IndexBundle(index=index, id_map=id_map, meta=meta, vectors=vectors)
