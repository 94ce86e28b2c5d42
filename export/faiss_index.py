"""FAISS indexes over the two-tower item embeddings, offline: build, tune, measure, choose, publish.

The item vectors are L2-normalised, so every index uses the inner-product metric and the
scores are cosine similarities, exactly what the two-tower was trained to rank by.

Index kinds (parameters derive from the catalog size ``n``; see :func:`default_params`):

* ``flat``: ``IndexFlatIP``, brute force. The exact reference every recall is taken
  against; on small catalogs also the fastest.
* ``ivf_flat``: ``IndexIVFFlat``, nlist ~ 4 sqrt(n) cells from spherical k-means, nprobe
  tuned. Sub-linear, full-precision vectors.
* ``ivf_pq``: ``IndexIVFPQ``, same cells, 16 sub-quantizers x 8 bits (4 dims each for
  64-d), nprobe tuned. 16 bytes per item instead of 256, at a recall cost.
* ``hnsw``: ``IndexHNSWFlat``, M = 32, efConstruction = 100, efSearch tuned. Graph search
  whose latency grows ~log n; the largest index in memory.

*Tuned* means: the smallest ``nprobe`` / ``efSearch`` on a fixed ladder whose recall@k
against exact search reaches ``target_recall`` on *tuning* queries (a different random draw
from the measured queries, so the reported recall is not the tuned-on one). Where no rung
reaches the target (PQ's quantisation error caps its recall), the smallest rung within
0.005 of the best recall seen is kept: more probes would only cost time.

Choosing the served index (:func:`choose_default`): the kind with the lowest median
single-query latency among those whose recall@100 is at least ``min_recall`` (0.95 by
default); Flat when none qualifies. Flat always qualifies (recall 1), so on a small catalog
where brute force is the fastest it wins.

The chosen index is written as the bundle that :mod:`orchestrator.ann` reads and searches
(:func:`write_index_bundle` writes what :func:`orchestrator.ann.load_index_bundle` expects;
the layout is documented there), with ``report.md`` / ``report.json`` beside it.
"""

from __future__ import annotations

import json
import logging
import math
import os
import platform
import sys
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import faiss
import numpy as np
import pandas as pd
from tqdm.auto import tqdm

from orchestrator.ann import (  # noqa: F401 - the reader's names, re-exported for the offline callers
    BUNDLE_VERSION,
    EXACT_BELOW,
    GPU_KINDS,
    GPU_MAX_K,
    KINDS,
    IndexBundle,
    ItemFilter,
    _as_matrix,
    _cpu,
    filter_mask,
    gpu_available,
    index_params,
    is_gpu_index,
    load_index_bundle,
    search_filtered,
    to_device,
)
from orchestrator.artifacts import file_sha256 as _sha256

log = logging.getLogger(__name__)

NPROBE_LADDER = (1, 2, 4, 8, 16, 32, 64, 128, 256, 512)

EF_SEARCH_LADDER = (16, 32, 64, 128, 256, 512, 1024)

HNSW_M = 32

HNSW_EF_CONSTRUCTION = 100

MIN_POINTS_PER_CENTROID = 16
"""Training points per k-means centroid we accept (FAISS warns below 39; 16 is still stable)."""


class IndexSet(dict):
    """``dict[kind, faiss.Index]`` that also remembers how long each index took to build.

    Attributes:
        build_seconds: Wall time of training + adding, per kind (tuning excluded).
        tune_seconds: Wall time of the nprobe / efSearch tuning, per kind.
    """

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.build_seconds: dict[str, float] = {}
        self.tune_seconds: dict[str, float] = {}


def _normalise(x: np.ndarray) -> np.ndarray:
    norms = np.linalg.norm(x, axis=1, keepdims=True)
    return (x / np.maximum(norms, 1e-12)).astype(np.float32)


def synthetic_vectors(n: int, dim: int = 64, clusters: int | None = None, spread: float = 0.75, seed: int = 0) -> np.ndarray:
    """Unit vectors from a Gaussian mixture, a stand-in for trained item embeddings.

    Cluster sizes follow a Zipf-like law (a few big genres, a long tail), which is what makes
    IVF lists unbalanced in real catalogs; uniform random vectors would flatter IVF.

    Args:
        n: Number of vectors.
        dim: Dimension.
        clusters: Mixture components; default ``max(8, round(sqrt(n) / 2))``.
        spread: Standard deviation of the within-cluster noise relative to the centres'
            (unit-variance) coordinates.
        seed: Random seed.

    Returns:
        float32 [n, dim], each row of unit norm.
    """
    rng = np.random.default_rng(seed)
    c = clusters or max(8, round(math.sqrt(n) / 2))
    centres = rng.standard_normal((c, dim))
    weights = 1.0 / np.arange(1, c + 1) ** 0.8
    labels = rng.choice(c, size=n, p=weights / weights.sum())
    x = centres[labels] + spread * rng.standard_normal((n, dim))
    return _normalise(x)


def make_queries(vectors: np.ndarray, n: int = 1000, noise: float = 0.3, seed: int = 1) -> np.ndarray:
    """User-like query vectors derived from the item vectors.

    Real user vectors are neither item vectors nor random: a user is near the items they
    like, and users with mixed tastes sit between clusters. Half of the queries are one item
    plus noise (a focused user); the other half are the mean of three random items plus noise
    (a user with mixed tastes, which lands between IVF cells and is the hard case for IVF).

    Args:
        vectors: float32 [n_items, dim] item vectors.
        n: Number of queries.
        noise: Standard deviation of the added Gaussian noise per unit of vector norm.
        seed: Random seed.

    Returns:
        float32 [n, dim] unit vectors.
    """
    vectors = _as_matrix(vectors)
    rng = np.random.default_rng(seed)
    n_items, dim = vectors.shape
    n_focused = n // 2
    focused = vectors[rng.integers(0, n_items, n_focused)]
    mixed = vectors[rng.integers(0, n_items, (n - n_focused, 3))].mean(axis=1)
    base = _normalise(np.concatenate([focused, mixed]))
    q = base + noise / math.sqrt(dim) * rng.standard_normal(base.shape)
    return _normalise(q)[rng.permutation(n)]


def default_params(n: int, dim: int) -> dict[str, dict[str, int]]:
    """Index parameters for a catalog of ``n`` vectors of dimension ``dim``.

    * IVF ``nlist`` ~ ``4 sqrt(n)`` (the FAISS rule of thumb), capped so that every list has
      at least ``MIN_POINTS_PER_CENTROID`` training points: k-means with fewer is noise.
    * PQ: 16 sub-quantizers when ``dim`` allows (4 dims each for 64-d: quantisation error
      low enough for a usable recall@100), else 8, else the largest divisor <= 16; 8 bits
      each, fewer on tiny catalogs that cannot train 256 centroids per sub-space.
    * HNSW: ``M = 32`` (recall at k=100 needs a well connected graph), efConstruction 100.

    Args:
        n: Number of vectors.
        dim: Dimension.

    Returns:
        ``{kind: params}``; ``nprobe`` / ``efSearch`` here are starting values before tuning.
    """
    nlist = max(1, min(round(4 * math.sqrt(n)), n // MIN_POINTS_PER_CENTROID))
    m = next(m for m in (16, 8, *range(15, 0, -1)) if dim % m == 0)
    nbits = int(min(8, max(1, math.floor(math.log2(max(n, 2) / MIN_POINTS_PER_CENTROID)))))
    return {
        "flat": {},
        "ivf_flat": {"nlist": nlist, "nprobe": min(16, nlist)},
        "ivf_pq": {"nlist": nlist, "nprobe": min(16, nlist), "m": m, "nbits": nbits},
        "hnsw": {"M": HNSW_M, "efConstruction": HNSW_EF_CONSTRUCTION, "efSearch": 128},
    }


def _metric_name(metric: int) -> str:
    return {faiss.METRIC_INNER_PRODUCT: "inner_product", faiss.METRIC_L2: "l2"}.get(metric, str(metric))


def _new_index(kind: str, dim: int, params: Mapping[str, int], seed: int) -> faiss.Index:
    ip = faiss.METRIC_INNER_PRODUCT
    if kind == "flat":
        return faiss.IndexFlatIP(dim)
    if kind in ("ivf_flat", "ivf_pq"):
        quantizer = faiss.IndexFlatIP(dim)
        if kind == "ivf_flat":
            index = faiss.IndexIVFFlat(quantizer, dim, params["nlist"], ip)
        else:
            index = faiss.IndexIVFPQ(quantizer, dim, params["nlist"], params["m"], params["nbits"], ip)
            index.pq.cp.seed = seed
            index.pq.cp.min_points_per_centroid = MIN_POINTS_PER_CENTROID
        # Python owns `quantizer`; tie its lifetime to the index or FAISS reads freed memory.
        index.referenced_objects = [quantizer]
        # Spherical k-means: unit centroids, so "closest centroid" agrees with inner product.
        index.cp.spherical = True
        index.cp.seed = seed
        index.cp.min_points_per_centroid = MIN_POINTS_PER_CENTROID
        index.nprobe = params["nprobe"]
        return index
    if kind == "hnsw":
        index = faiss.IndexHNSWFlat(dim, params["M"], ip)
        index.hnsw.efConstruction = params["efConstruction"]
        index.hnsw.efSearch = params["efSearch"]
        return index
    raise ValueError(f"unknown index kind {kind!r}; known: {', '.join(KINDS)}")


def _recall(found: np.ndarray, truth: np.ndarray) -> float:
    """Mean share of each row's true neighbours (ignoring -1 padding) that were found."""
    hits, total = 0, 0
    for f, t in zip(found, truth):
        t = t[t >= 0]
        hits += np.intersect1d(f[f >= 0], t, assume_unique=True).size
        total += t.size
    return hits / total if total else 1.0


def _tune(index: faiss.Index, kind: str, queries: np.ndarray, truth: np.ndarray, k: int, target: float) -> None:
    """Sets nprobe / efSearch to the cheapest ladder rung reaching ``target`` recall (see module doc)."""
    if kind in ("ivf_flat", "ivf_pq"):
        ladder = [p for p in NPROBE_LADDER if p < index.nlist] + [index.nlist]

        def set_value(v: int) -> None:
            index.nprobe = v

    elif kind == "hnsw":
        # HNSW searches with max(efSearch, k): rungs below k would all measure the same thing.
        ladder = sorted({max(ef, k) for ef in EF_SEARCH_LADDER})

        def set_value(v: int) -> None:
            index.hnsw.efSearch = v

    else:
        return
    seen: list[tuple[int, float]] = []
    for value in ladder:
        set_value(value)
        _, found = index.search(queries, k)
        recall = _recall(found, truth)
        seen.append((value, recall))
        if recall >= target:
            return
    best = max(r for _, r in seen)
    set_value(next(v for v, r in seen if r >= best - 0.005))


def build_indexes(
    vectors: np.ndarray,
    kinds: Sequence[str] = KINDS,
    seed: int = 0,
    *,
    k: int = 100,
    target_recall: float = 0.95,
    tune: bool = True,
    progress: bool = False,
    threads: int | None = None,
) -> IndexSet:
    """Builds one index of each kind over ``vectors`` (row i gets FAISS id i).

    Args:
        vectors: float32 [n, dim] unit-norm item vectors.
        kinds: Which of :data:`KINDS` to build.
        seed: Seed of the k-means / PQ training (HNSW construction is multi-threaded and
            therefore not bit-for-bit reproducible; its recall is).
        k: Neighbours per query the tuning optimises recall for.
        target_recall: Recall@k the tuning aims for (see the module docstring).
        tune: Tune nprobe / efSearch; False keeps :func:`default_params`.
        progress: Show a progress bar.
        threads: OpenMP threads while building (None: FAISS' default, all cores). On a
            busy machine the many small k-means of PQ training can run many times slower
            multi-threaded than on one thread (spinning OpenMP workers fight for cores).

    Returns:
        An :class:`IndexSet` ``{kind: index}`` with build times.
    """
    vectors = _as_matrix(vectors)
    n, dim = vectors.shape
    if n == 0:
        raise ValueError("cannot build an index over zero vectors")
    unknown = [kind for kind in kinds if kind not in KINDS]
    if unknown:
        raise ValueError(f"unknown index kind(s) {unknown}; known: {', '.join(KINDS)}")
    previous = faiss.omp_get_max_threads()
    if threads is not None:
        faiss.omp_set_num_threads(threads)
    try:
        return _build(vectors, kinds, seed, k, target_recall, tune, progress)
    finally:
        faiss.omp_set_num_threads(previous)


def _build(vectors: np.ndarray, kinds: Sequence[str], seed: int, k: int, target_recall: float, tune: bool, progress: bool) -> IndexSet:
    n, dim = vectors.shape
    params = default_params(n, dim)
    out = IndexSet()
    truth = tune_q = None
    if tune and any(kind != "flat" for kind in kinds):
        # Tuning queries use their own seed so the measured queries stay unseen by the tuning.
        tune_q = make_queries(vectors, min(500, max(50, n // 10)), seed=seed + 10_007)
        exact = faiss.IndexFlatIP(dim)
        exact.add(vectors)
        _, truth = exact.search(tune_q, min(k, n))
    for kind in tqdm(list(kinds), desc="build faiss", unit="index", disable=not progress, leave=False, file=sys.stderr):
        t0 = time.perf_counter()
        index = _new_index(kind, dim, params[kind], seed)
        if not index.is_trained:
            index.train(vectors)
        index.add(vectors)
        out.build_seconds[kind] = time.perf_counter() - t0
        t0 = time.perf_counter()
        if tune_q is not None:
            _tune(index, kind, tune_q, truth, min(k, n), target_recall)
        out.tune_seconds[kind] = time.perf_counter() - t0
        out[kind] = index
    return out


def _serialised_bytes(index: faiss.Index) -> int:
    return int(faiss.serialize_index(_cpu(index)).nbytes)


def measure(
    indexes: Mapping[str, faiss.Index],
    vectors: np.ndarray,
    queries: np.ndarray,
    k: int = 100,
    *,
    warmup: int = 20,
    progress: bool = False,
) -> list[dict[str, Any]]:
    """Recall@k against exact search and single-query latency of each index.

    Latency is what one request sees: one query per ``search`` call, FAISS on one OpenMP
    thread (``faiss.omp_set_num_threads(1)``; the previous setting is restored), wall time
    around the call. Batched throughput is a different question (benchmarks/).

    The exact neighbours come from the ``"flat"`` entry when present (same single-query code
    path, so its recall is exactly 1), else from a temporary ``IndexFlatIP`` over ``vectors``.

    Args:
        indexes: ``{kind: index}``; an :class:`IndexSet` also contributes build times.
        vectors: float32 [n, dim] the indexed vectors (for the exact reference).
        queries: float32 [q, dim] query vectors.
        k: Neighbours per query.
        warmup: Untimed queries per index first (page faults, lazy allocations).
        progress: Show a progress bar.

    Returns:
        One dict per index, in ``indexes`` order: ``kind``, ``params``, ``k``, ``recall``,
        ``p50_ms``, ``p99_ms``, ``mean_ms``, ``build_s``, ``bytes``, ``n``, ``dim``, ``queries``.
    """
    vectors = _as_matrix(vectors)
    queries = _as_matrix(queries, vectors.shape[1])
    build_seconds = getattr(indexes, "build_seconds", {})
    order = sorted(indexes, key=lambda kind: kind != "flat")  # exact first: it is the reference
    threads = faiss.omp_get_max_threads()
    faiss.omp_set_num_threads(1)
    try:
        found: dict[str, np.ndarray] = {}
        timings: dict[str, np.ndarray] = {}
        for kind in tqdm(order, desc="measure faiss", unit="index", disable=not progress, leave=False, file=sys.stderr):
            index = indexes[kind]
            for i in range(min(warmup, len(queries))):
                index.search(queries[i : i + 1], k)
            labels = np.empty((len(queries), k), dtype=np.int64)
            ns = np.empty(len(queries), dtype=np.int64)
            for i in range(len(queries)):
                q = queries[i : i + 1]
                t0 = time.perf_counter_ns()
                _, labels[i : i + 1] = index.search(q, k)
                ns[i] = time.perf_counter_ns() - t0
            found[kind], timings[kind] = labels, ns
        if "flat" in found:
            truth = found["flat"]
        else:
            exact = faiss.IndexFlatIP(vectors.shape[1])
            exact.add(vectors)
            truth = np.concatenate([exact.search(queries[i : i + 1], k)[1] for i in range(len(queries))])
    finally:
        faiss.omp_set_num_threads(threads)
    results = []
    for kind in indexes:
        ms = timings[kind] / 1e6
        index = indexes[kind]
        results.append(
            {
                "kind": kind,
                "params": index_params(index),
                "k": k,
                "recall": round(_recall(found[kind], truth), 4),
                "p50_ms": round(float(np.median(ms)), 4),
                "p99_ms": round(float(np.percentile(ms, 99)), 4),
                "mean_ms": round(float(ms.mean()), 4),
                "build_s": round(float(build_seconds[kind]), 3) if kind in build_seconds else None,
                "bytes": _serialised_bytes(index),
                "n": int(index.ntotal),
                "dim": int(index.d),
                "queries": int(len(queries)),
            }
        )
    return results


def choose_default(results: Sequence[Mapping[str, Any]], min_recall: float = 0.95) -> str:
    """The kind to serve: the fastest index whose recall is good enough.

    Rule: among the results with ``recall >= min_recall``, the one with the lowest median
    single-query latency (``p50_ms``); ties go to the smaller serialised index. When none
    qualifies (or there are no results) the answer is ``"flat"``: exact search is never
    wrong, only slower.

    Args:
        results: Output of :func:`measure`.
        min_recall: Recall@k an index must reach to be considered.

    Returns:
        The chosen kind.
    """
    ok = [r for r in results if r["recall"] >= min_recall]
    if not ok:
        return "flat"
    return str(min(ok, key=lambda r: (r["p50_ms"], r["bytes"]))["kind"])


def _replace_atomically(path: Path, write: Any) -> None:
    """Writes via a temporary file and ``os.replace`` so a reader never sees half a file."""
    tmp = path.with_name(path.name + ".tmp")
    write(tmp)
    os.replace(tmp, path)


def _save_npy(path: Path, array: np.ndarray) -> None:
    # A file handle, not a path: np.save appends ".npy" to a temporary name like "x.npy.tmp".
    with path.open("wb") as fh:
        np.save(fh, array, allow_pickle=False)


def _relative(target: Path, start: Path) -> str:
    return os.path.relpath(target.resolve(), start.resolve())


def write_index_bundle(
    out_dir: str | Path,
    index: faiss.Index,
    kind: str,
    item_table_path: str | Path | None = None,
    *,
    id_map: np.ndarray | None = None,
    recall: float | None = None,
    recall_k: int = 100,
    vectors_path: str | Path | None = None,
    extra: Mapping[str, Any] | None = None,
) -> dict[str, Any]:
    """Writes ``faiss.index``, ``id_map.npy`` and ``index.json`` into ``out_dir``.

    Each file is written to a temporary name and renamed, ``index.json`` last, so a server
    reloading the folder sees either the old or the new bundle (``index.json`` records the
    sha256 of ``faiss.index``, which :func:`load_index_bundle` checks).

    Args:
        out_dir: Bundle folder (e.g. ``artifacts/faiss``); created if missing.
        index: The index to ship (a GPU index is copied to the CPU first).
        kind: Its kind, one of :data:`KINDS`.
        item_table_path: ``items.parquet`` the ids refer to; checked (one row per FAISS row,
            ``item`` = 0..n-1 under the id map) and recorded with its sha256.
        id_map: int64 [ntotal] FAISS row -> item index; identity when None.
        recall: Measured recall@``recall_k`` of this index, recorded for the reader.
        recall_k: The k of ``recall``.
        vectors_path: ``item_embeddings.npy`` (rows = item indices), recorded with its
            sha256 so the loader can hand the vectors to filtered search's brute force.
        extra: More fields for ``index.json``.

    Returns:
        The ``index.json`` content.
    """
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    cpu = _cpu(index)
    n = int(cpu.ntotal)
    ids = np.arange(n, dtype=np.int64) if id_map is None else np.asarray(id_map, dtype=np.int64)
    if ids.shape != (n,):
        raise ValueError(f"id_map has shape {ids.shape}, the index holds {n} vectors")
    if np.unique(ids).size != n or (n and ids.min() < 0):
        raise ValueError("id_map must map FAISS rows to distinct non-negative item indices")
    meta: dict[str, Any] = {
        "bundle_version": BUNDLE_VERSION,
        "kind": kind,
        "params": index_params(cpu),
        "n": n,
        "dim": int(cpu.d),
        "metric": _metric_name(cpu.metric_type),
        "recall": recall,
        "recall_k": recall_k,
        "built_at": pd.Timestamp.now(tz="UTC").isoformat(),
        "faiss_version": faiss.__version__,
        "files": {"index": "faiss.index", "id_map": "id_map.npy"},
    }
    if item_table_path is not None:
        table_path = Path(item_table_path)
        table = pd.read_parquet(table_path, columns=["item"])
        items = table["item"].to_numpy(dtype=np.int64)
        if not np.array_equal(np.sort(items), np.arange(len(items))) or not np.isin(ids, items).all():
            raise ValueError(f"{table_path}: item column must be 0..n-1 and cover every id in the id map")
        meta["item_table"] = {"path": _relative(table_path, out), "sha256": _sha256(table_path), "rows": len(items)}
    if vectors_path is not None:
        meta["vectors"] = {"path": _relative(Path(vectors_path), out), "sha256": _sha256(Path(vectors_path))}
    meta.update(extra or {})

    _replace_atomically(out / "faiss.index", lambda p: faiss.write_index(cpu, str(p)))
    _replace_atomically(out / "id_map.npy", lambda p: _save_npy(p, ids))
    meta["sha256"] = {"faiss.index": _sha256(out / "faiss.index"), "id_map.npy": _sha256(out / "id_map.npy")}
    _replace_atomically(out / "index.json", lambda p: p.write_text(json.dumps(meta, indent=2)))
    return meta


def _fmt_params(params: Mapping[str, Any]) -> str:
    return ", ".join(f"{k}={v}" for k, v in params.items()) or "-"


def write_report(out_dir: str | Path, report: Mapping[str, Any]) -> None:
    """Writes ``report.json`` and ``report.md`` (a markdown table of every kind measured)."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    k = report.get("k", 100)
    lines = [
        "# FAISS index comparison",
        "",
        f"{report['n']} items x {report['dim']} dims, inner product; {report['queries']} queries "
        f"({report.get('query_kind', 'given')}), k = {k}; one query per call on one thread "
        f"(faiss {report.get('faiss_version', faiss.__version__)}, {report.get('machine', '')}).",
        "",
        f"| kind | params | recall@{k} | p50 ms | p99 ms | build s | bytes |",
        "|---|---|---:|---:|---:|---:|---:|",
    ]
    for r in report["results"]:
        build = "-" if r.get("build_s") is None else f"{r['build_s']:.2f}"
        lines.append(
            f"| {r['kind']} | {_fmt_params(r['params'])} | {r['recall']:.4f} | {r['p50_ms']:.3f} | "
            f"{r['p99_ms']:.3f} | {build} | {r['bytes']:,} |"
        )
    lines += ["", f"Default: **{report['default']}**. Rule: {report['rule']}", ""]
    _replace_atomically(out / "report.md", lambda p: p.write_text("\n".join(lines)))
    _replace_atomically(out / "report.json", lambda p: p.write_text(json.dumps(report, indent=2)))


def _machine() -> str:
    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return f"{cpu}, {os.cpu_count()} cores"


def build_from_artifacts(
    artifacts_dir: str | Path,
    kinds: Sequence[str] = KINDS,
    progress: bool = True,
    *,
    k: int = 100,
    n_queries: int = 1000,
    min_recall: float = 0.95,
    seed: int = 0,
    out_dir: str | Path | None = None,
    threads: int | None = None,
) -> dict[str, Any]:
    """``recsys index``: build every kind over the item embeddings, measure, ship the best.

    Reads ``artifacts_dir/item_embeddings.npy``, builds ``kinds``, measures them on
    ``n_queries`` item-derived queries (:func:`make_queries`), picks the default with
    :func:`choose_default`, writes its bundle and ``report.md`` / ``report.json`` into
    ``out_dir`` (``artifacts_dir/faiss`` by default).

    Args:
        artifacts_dir: Folder written by ``recsys train``.
        kinds: Index kinds to compare ("flat" is always added: it is the reference).
        progress: Show progress bars.
        k: Neighbours per query (recall@k).
        n_queries: Measured queries.
        min_recall: Recall the served index must reach.
        seed: Seed of training and queries.
        out_dir: Bundle folder.
        threads: OpenMP threads for building (see :func:`build_indexes`); latency is
            always measured on one.

    Returns:
        The report (also written as ``report.json``).
    """
    art = Path(artifacts_dir)
    emb_path = art / "item_embeddings.npy"
    vectors = _as_matrix(np.load(emb_path, allow_pickle=False))
    if not np.isfinite(vectors).all():
        raise ValueError(f"{emb_path}: non-finite values")
    norm_error = float(np.abs(np.linalg.norm(vectors, axis=1) - 1).max()) if len(vectors) else 0.0
    if norm_error > 1e-3:
        log.warning("%s: vectors are not unit norm (max |norm - 1| = %.3g); scores are raw inner products", emb_path, norm_error)
    kinds = ["flat", *[kd for kd in kinds if kd != "flat"]]
    indexes = build_indexes(vectors, kinds, seed, k=k, target_recall=min_recall, progress=progress, threads=threads)
    queries = make_queries(vectors, n_queries, seed=seed + 1)
    results = measure(indexes, vectors, queries, k, progress=progress)
    for r in results:
        r["tune_s"] = round(indexes.tune_seconds.get(r["kind"], 0.0), 3)
    default = choose_default(results, min_recall)
    chosen = next(r for r in results if r["kind"] == default)
    out = Path(out_dir) if out_dir is not None else art / "faiss"
    table = art / "items.parquet"
    meta = write_index_bundle(
        out,
        indexes[default],
        default,
        table if table.exists() else None,
        recall=chosen["recall"],
        recall_k=k,
        vectors_path=emb_path,
    )
    report = {
        "n": int(vectors.shape[0]),
        "dim": int(vectors.shape[1]),
        "k": k,
        "queries": int(len(queries)),
        "query_kind": "item-derived: half one item + noise, half mean of 3 items + noise",
        "threads": 1,
        "build_threads": threads or faiss.omp_get_max_threads(),
        "min_recall": min_recall,
        "default": default,
        "rule": f"fastest median single-query latency among kinds with recall@{k} >= {min_recall}; flat if none",
        "results": results,
        "bundle": {"dir": str(out), "index_json": meta},
        "faiss_version": faiss.__version__,
        "machine": _machine(),
        "created_at": pd.Timestamp.now(tz="UTC").isoformat(),
    }
    write_report(out, report)
    return report
