"""FAISS at catalog scale: recall@100 vs exact search, single-query latency, memory, build time.

    python -m benchmarks.faiss_scale [--quick] [--sizes 87585,1000000,10000000] [--out FILE]

Cases, each measured with :func:`export.faiss_index.measure` (one query per call, one
OpenMP thread, recall@k against the exact ``flat`` index on the same queries):

* ``trained``: the two-tower's ``artifacts/item_embeddings.npy`` (9,742 items for ml-latest-small:
  the only real embeddings there are, so the only size they can speak for).
* ``synthetic``: unit vectors from a Zipf-weighted Gaussian mixture, the shape of trained
  embeddings (clustered, unbalanced) without training a model per size
  (:func:`export.faiss_index.synthetic_vectors`), at each of ``--sizes``; queries are
  item-derived (:func:`export.faiss_index.make_queries`), not random noise.

Two build paths, both on the served index classes (:func:`export.faiss_index._new_index`:
spherical k-means, inner product, the same seeds):

* up to ``small_max`` items (200,000): :func:`export.faiss_index.build_indexes`, the path
  ``recsys export`` takes: k-means on every vector, nprobe / efSearch tuned to recall 0.95.
* above: the same index classes trained on a *sample* (``train_points_per_list`` x nlist
  vectors) with ``nlist`` capped at ``nlist_cap``, vectors added in chunks, then tuned the
  same way. On 2 cores, k-means with the rule-of-thumb 4 sqrt(n) = 12,649 lists over 10M
  points (and assigning 10M points to them) would take far beyond the 10-minute bound.
  HNSW is built only up to ``hnsw_max`` items: its construction is the slowest of all
  (superlinear, and it holds the full vectors plus the graph).

Memory per index: the serialised size (``faiss.serialize_index``) and the resident-set
growth across its build (``/proc/self/statm`` before and after; glibc may keep freed
training buffers, so this can overstate). Large catalogs are generated in chunks straight
into the flat index, whose own storage then serves as the vector array (no second copy).
"""

from __future__ import annotations

import argparse
import gc
import math
import sys
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import faiss
import numpy as np

from benchmarks.common import (
    GIB,
    REPORTS,
    LoadWatch,
    conditions,
    conditions_line,
    current_rss_bytes,
    log,
    markdown_table,
    peak_rss_bytes,
    write_json,
)
from export.faiss_index import (
    IndexSet,
    _new_index,  # the served index construction; reused so the benchmark builds what is served
    _tune,  # the served nprobe / efSearch tuning rule
    build_indexes,
    default_params,
    make_queries,
    measure,
    synthetic_vectors,
)
from orchestrator.ann import KINDS

SIZES = (87_585, 1_000_000, 10_000_000)
"""ML-32M's catalog, then 10x and 100x that."""

MIB = 1024**2
CHUNK = 1_000_000
"""Vectors generated per chunk for large synthetic catalogs (~0.5 GB of float64 temporaries)."""


@dataclass(frozen=True)
class FaissScaleSettings:
    """What one run measures.

    Attributes:
        sizes: Synthetic catalog sizes.
        dim: Synthetic vector dimension (the two-tower's 64).
        k: Neighbours per query (recall@k).
        trained: Also measure the trained embeddings in ``artifacts``.
        queries: Measured queries for catalogs up to ``small_max`` items; fewer above
            (see :meth:`queries_for`), because the exact reference costs ~n per query.
        small_max: Largest catalog built by :func:`build_indexes` (training on every vector).
        nlist_cap: Largest IVF list count above ``small_max``.
        train_points_per_list: k-means sample above ``small_max``, per list.
        hnsw_max: Largest catalog HNSW is built for (its build took 4 minutes at 1M here:
            pass ``--hnsw-max 1000000`` to include it there).
        target_recall: Recall the nprobe / efSearch tuning aims for.
        build_threads_small: OpenMP threads for building up to ``small_max`` (1, as
            ``recsys export`` builds: on a busy 2-core machine PQ training was seen 100x slower
            multi-threaded).
        build_threads: OpenMP threads for building above ``small_max`` (None: all cores).
            Latency is always measured on one thread.
        memory_fraction: Refuse a size whose vectors and indexes would need more than this
            share of the memory available now (a shared machine must not be pushed to OOM).
        seed: Vectors, queries and k-means seed.
    """

    sizes: tuple[int, ...] = SIZES
    dim: int = 64
    k: int = 100
    trained: bool = True
    queries: int = 1000
    small_max: int = 200_000
    nlist_cap: int = 4096
    train_points_per_list: int = 32
    hnsw_max: int = 200_000
    target_recall: float = 0.95
    build_threads_small: int = 1
    build_threads: int | None = None
    memory_fraction: float = 0.6
    seed: int = 0

    @classmethod
    def quick(cls) -> FaissScaleSettings:
        """Under a minute on 2 cores: the trained embeddings and a 50,000-item synthetic catalog."""
        return cls(sizes=(50_000,), queries=200)

    def queries_for(self, n: int) -> int:
        """Measured queries: all of ``queries`` up to ``small_max``, then 300 up to 2M, then 100.

        Every query is also answered by exact single-query search (the reference), whose
        cost grows with n: ~0.1 s per query at 10M on one core.
        """
        if n <= self.small_max:
            return self.queries
        return min(self.queries, 300 if n <= 2_000_000 else 100)


# --------------------------------------------------------------------------- vectors


def mixture_into_flat(n: int, dim: int, seed: int, chunk: int = CHUNK) -> faiss.IndexFlatIP:
    """A flat index over ``n`` clustered unit vectors, generated chunk by chunk.

    Same law as :func:`export.faiss_index.synthetic_vectors` (Zipf-weighted Gaussian mixture,
    ``max(8, round(sqrt(n)/2))`` clusters, spread 0.75, normalised); that function builds the
    whole float64 matrix at once (~4 x 8 x n x dim bytes: 20 GB at 10M), so above a chunk the
    centres are drawn once and the members chunk by chunk straight into the index.
    """
    flat = faiss.IndexFlatIP(dim)
    if n <= chunk:
        flat.add(synthetic_vectors(n, dim, seed=seed))
        return flat
    rng = np.random.default_rng(seed)
    c = max(8, round(math.sqrt(n) / 2))
    centres = rng.standard_normal((c, dim))
    weights = 1.0 / np.arange(1, c + 1) ** 0.8
    p = weights / weights.sum()
    for s in range(0, n, chunk):
        m = min(chunk, n - s)
        x = centres[rng.choice(c, size=m, p=p)] + 0.75 * rng.standard_normal((m, dim))
        x /= np.maximum(np.linalg.norm(x, axis=1, keepdims=True), 1e-12)
        flat.add(x.astype(np.float32))
        del x
    return flat


def flat_vectors(flat: faiss.IndexFlat) -> np.ndarray:
    """A zero-copy numpy view of a flat index's stored vectors (valid while ``flat`` lives)."""
    return faiss.rev_swig_ptr(flat.get_xb(), flat.ntotal * flat.d).reshape(flat.ntotal, flat.d)


# --------------------------------------------------------------------------- building


def large_params(n: int, dim: int, settings: FaissScaleSettings) -> dict[str, dict[str, int]]:
    """:func:`default_params` with ``nlist`` capped at ``settings.nlist_cap``."""
    params = default_params(n, dim)
    for kind in ("ivf_flat", "ivf_pq"):
        params[kind]["nlist"] = min(params[kind]["nlist"], settings.nlist_cap)
        params[kind]["nprobe"] = min(params[kind]["nprobe"], params[kind]["nlist"])
    return params


def build_sampled(
    vectors: np.ndarray, kinds: Sequence[str], settings: FaissScaleSettings, tune_queries: np.ndarray, truth: np.ndarray
) -> tuple[IndexSet, dict[str, dict[str, Any]]]:
    """Builds ``kinds`` (not ``flat``) with sampled k-means and chunked adds, then tunes them.

    Returns:
        ``(indexes with build and tune seconds, per-kind notes: training points, RSS delta)``.
    """
    n, dim = vectors.shape
    params = large_params(n, dim, settings)
    out, notes = IndexSet(), {}
    rng = np.random.default_rng(settings.seed)
    previous = faiss.omp_get_max_threads()
    if settings.build_threads:
        faiss.omp_set_num_threads(settings.build_threads)
    try:
        for kind in kinds:
            log(f"n={n:,}: building {kind} {params[kind]}")
            gc.collect()
            rss0 = current_rss_bytes()
            t0 = time.perf_counter()
            index = _new_index(kind, dim, params[kind], settings.seed)
            trained_on = 0
            if not index.is_trained:
                trained_on = int(min(n, settings.train_points_per_list * params[kind]["nlist"]))
                sample = vectors[np.sort(rng.choice(n, size=trained_on, replace=False))]
                index.train(sample)
                del sample
            for s in range(0, n, 500_000):  # bounded temporaries (PQ residuals are n x dim floats)
                index.add(vectors[s : s + 500_000])
            out.build_seconds[kind] = time.perf_counter() - t0
            t0 = time.perf_counter()
            _tune(index, kind, tune_queries, truth, min(settings.k, n), settings.target_recall)
            out.tune_seconds[kind] = time.perf_counter() - t0
            out[kind] = index
            gc.collect()
            notes[kind] = {"trained_on": trained_on, "rss_delta_bytes": current_rss_bytes() - rss0}
    finally:
        faiss.omp_set_num_threads(previous)
    return out, notes


def measure_case(
    name: str,
    flat: faiss.IndexFlatIP,
    vectors: np.ndarray,
    settings: FaissScaleSettings,
    kinds: Sequence[str],
    flat_build_s: float | None = None,
) -> dict[str, Any]:
    """Builds the other ``kinds`` beside ``flat``, measures all of them, returns the case record.

    ``flat_build_s`` is the time of the flat index's ``add`` where it was timed apart from
    generating the vectors (None: generated into the index chunk by chunk, see ``generate_s``).
    """
    n, dim = vectors.shape
    k = min(settings.k, n)
    n_queries = settings.queries_for(n)
    queries = make_queries(vectors, n_queries, seed=settings.seed + 1)
    others = [kd for kd in kinds if kd != "flat"]
    skipped = []
    if n > settings.hnsw_max and "hnsw" in others:
        others.remove("hnsw")
        reason = (
            f"n = {n:,} > hnsw_max = {settings.hnsw_max:,}: HNSW construction is the slowest here (superlinear; "
            "minutes at 1M on 2 cores), left out to keep the run within 10 minutes (--hnsw-max to include)"
        )
        skipped.append({"kind": "hnsw", "reason": reason})
    if n <= settings.small_max:
        path = "build_indexes (served path): k-means on every vector, default_params, tuned"
        built, notes = IndexSet(), {}
        for kind in others:  # one call per kind, so each index gets its own RSS growth
            log(f"n={n:,}: building {kind}")
            gc.collect()
            rss0 = current_rss_bytes()
            one = build_indexes(
                vectors, [kind], settings.seed, k=k, target_recall=settings.target_recall, threads=settings.build_threads_small
            )
            gc.collect()
            built[kind] = one[kind]
            built.build_seconds[kind] = one.build_seconds[kind]
            built.tune_seconds[kind] = one.tune_seconds[kind]
            notes[kind] = {"trained_on": n if kind.startswith("ivf") else 0, "rss_delta_bytes": current_rss_bytes() - rss0}
    else:
        path = (
            f"sampled: k-means on {settings.train_points_per_list} x nlist vectors, nlist capped at "
            f"{settings.nlist_cap}, chunked adds, tuned like build_indexes"
        )
        tune_q = make_queries(vectors, 200, seed=settings.seed + 10_007)
        previous = faiss.omp_get_max_threads()
        if settings.build_threads:
            faiss.omp_set_num_threads(settings.build_threads)
        try:
            _, truth = flat.search(tune_q, k)  # batched exact search: BLAS over blocks of the catalog
        finally:
            faiss.omp_set_num_threads(previous)
        built, notes = build_sampled(vectors, others, settings, tune_q, truth)
    indexes = IndexSet({"flat": flat, **built})
    indexes.build_seconds = {**({"flat": flat_build_s} if flat_build_s is not None else {}), **built.build_seconds}
    log(f"n={n:,}: measuring {list(indexes)} on {n_queries} queries")
    t0 = time.perf_counter()
    results = measure(indexes, vectors, queries, k)
    measure_s = time.perf_counter() - t0
    for r in results:
        kind = r["kind"]
        r["tune_s"] = round(built.tune_seconds.get(kind, 0.0), 3)
        r["trained_on"] = notes.get(kind, {}).get("trained_on", 0)
        r["rss_delta_bytes"] = notes.get(kind, {}).get("rss_delta_bytes")
        r["bytes_per_vector"] = round(r["bytes"] / max(1, r["n"]), 1)
    return {
        "case": name,
        "n": int(n),
        "dim": int(dim),
        "k": k,
        "queries": n_queries,
        "query_kind": "item-derived: half one item + noise, half mean of 3 items + noise",
        "reference": "flat (IndexFlatIP), exact, same queries, same single-query code path",
        "build_path": path,
        "measure_s": round(measure_s, 1),
        "skipped_kinds": skipped,
        "results": results,
    }


def run_case(name: str, n: int | None, settings: FaissScaleSettings, vectors: np.ndarray | None = None) -> dict[str, Any]:
    """One catalog: generate (or take) the vectors into a flat index, then :func:`measure_case`."""
    log(f"{name}: {'n=' + format(n, ',') if n else 'given vectors'}")
    t0 = time.perf_counter()
    if vectors is None and int(n) <= CHUNK:
        vectors = synthetic_vectors(int(n), settings.dim, seed=settings.seed)
    gc.collect()
    # RSS growth of the flat index alone where the vectors exist first; where they are
    # generated chunk by chunk into the index, it also holds the last chunk's freed buffers
    rss0 = current_rss_bytes()
    flat_build_s = None
    if vectors is not None:
        flat = faiss.IndexFlatIP(vectors.shape[1])
        t1 = time.perf_counter()
        flat.add(np.ascontiguousarray(vectors, dtype=np.float32))
        flat_build_s = time.perf_counter() - t1
        flat_rss = current_rss_bytes() - rss0
        del vectors  # the flat index's copy serves from here on
    else:
        flat = mixture_into_flat(int(n), settings.dim, settings.seed)
        gc.collect()
        flat_rss = current_rss_bytes() - rss0
    gen_s = time.perf_counter() - t0
    case = measure_case(name, flat, flat_vectors(flat), settings, KINDS, flat_build_s)
    case["generate_s"] = round(gen_s, 1)
    for r in case["results"]:
        if r["kind"] == "flat":
            r["rss_delta_bytes"] = flat_rss
    case["wall_s"] = round(time.perf_counter() - t0, 1)
    case["peak_rss_gib"] = round(peak_rss_bytes() / GIB, 2)
    del flat
    gc.collect()
    return case


def memory_needed(n: int, dim: int, settings: FaissScaleSettings) -> int:
    """Rough bytes a size needs at once: flat + IVF-Flat (each n x dim floats) + PQ codes + ids."""
    vec = n * dim * 4
    return vec * 2 + n * (16 + 8) + (n * 64 * 4 * 2 if n <= settings.hnsw_max else 0)


def available_memory() -> int:
    """``MemAvailable`` from ``/proc/meminfo`` in bytes (0 when unknown)."""
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    except (OSError, ValueError):
        pass
    return 0


def run_benchmark(artifacts: str | Path | None, settings: FaissScaleSettings) -> dict[str, Any]:
    """Every case of ``settings``; returns the report (nothing printed)."""
    cases, skipped = [], []
    with LoadWatch() as load:
        if settings.trained and artifacts is not None:
            path = Path(artifacts) / "item_embeddings.npy"
            if path.exists():
                vectors = np.load(path).astype(np.float32)
                cases.append(run_case(f"trained ({path.parent.name}/item_embeddings.npy)", None, settings, vectors))
            else:
                skipped.append({"case": "trained", "reason": f"{path} not found"})
        for n in settings.sizes:
            need, have = memory_needed(n, settings.dim, settings), available_memory()
            if have and need > settings.memory_fraction * have:
                skipped.append(
                    {
                        "case": f"synthetic n={n:,}",
                        "reason": f"needs ~{need / GIB:.1f} GiB, {have / GIB:.1f} GiB available (limit {settings.memory_fraction:.0%})",
                    }
                )
                continue
            cases.append(run_case("synthetic clustered", n, settings))
    return {
        "benchmark": "faiss_scale",
        "conditions": conditions(
            load_average=load.record(),
            faiss_version=faiss.__version__,
            search_threads=1,
            build_threads={
                f"n <= {settings.small_max:,}": settings.build_threads_small,
                f"n > {settings.small_max:,}": settings.build_threads or faiss.omp_get_max_threads(),
            },
            latency="one query per search() call, wall time around the call, after 20 warm-up queries",
            settings=asdict(settings),
            artifacts=str(Path(artifacts).resolve()) if artifacts else None,
        ),
        "skipped": skipped,
        "cases": cases,
        "peak_rss_gib": round(peak_rss_bytes() / GIB, 2),
    }


# --------------------------------------------------------------------------- output


def _params(p: dict[str, Any]) -> str:
    return ", ".join(f"{k}={v}" for k, v in p.items()) or "-"


def table(report: dict[str, Any]) -> str:
    """The results as a Markdown table: one row per (case, index kind)."""
    rows = []
    for case in report["cases"]:
        for r in case["results"]:
            rss = r.get("rss_delta_bytes")
            rows.append(
                (
                    case["case"],
                    case["n"],
                    r["kind"],
                    _params(r["params"]),
                    r["recall"],
                    r["p50_ms"],
                    r["p99_ms"],
                    r["build_s"],
                    r["tune_s"],
                    round(r["bytes"] / MIB, 1),
                    None if rss is None else round(rss / MIB, 1),
                    case["queries"],
                )
            )
    return markdown_table(
        (
            "case",
            "n",
            "kind",
            "params",
            "recall@100",
            "p50 ms",
            "p99 ms",
            "build s",
            "tune s",
            "serialised MiB",
            "RSS delta MiB",
            "queries",
        ),
        rows,
    )


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--artifacts", default="artifacts", help="folder with item_embeddings.npy (default: %(default)s)")
    parser.add_argument("--sizes", default=None, help="comma-separated synthetic catalog sizes (default: 87585,1000000,10000000)")
    parser.add_argument("--quick", action="store_true", help="trained embeddings + 50,000 synthetic items: under a minute")
    parser.add_argument("--queries", type=int, default=None, help="measured queries for catalogs up to 200,000 items")
    parser.add_argument(
        "--build-threads", type=int, default=None, help="OpenMP threads while building above 200,000 items (default: all cores)"
    )
    parser.add_argument("--hnsw-max", type=int, default=None, help="largest catalog HNSW is built for (default 200,000)")
    parser.add_argument("--out", default=None, help="JSON report (default: reports/benchmarks/faiss_scale.json)")
    args = parser.parse_args(argv)
    settings = FaissScaleSettings.quick() if args.quick else FaissScaleSettings()
    overrides: dict[str, Any] = {}
    if args.sizes:
        overrides["sizes"] = tuple(int(s.replace("_", "")) for s in args.sizes.split(","))
    if args.queries:
        overrides["queries"] = args.queries
    if args.build_threads:
        overrides["build_threads"] = args.build_threads
    if args.hnsw_max is not None:
        overrides["hnsw_max"] = args.hnsw_max
    if overrides:
        settings = FaissScaleSettings(**{**asdict(settings), **overrides})
    out = Path(args.out) if args.out else REPORTS / ("faiss_scale_quick.json" if args.quick else "faiss_scale.json")
    report = run_benchmark(args.artifacts, settings)
    report["conditions"]["command"] = " ".join(["python -m benchmarks.faiss_scale", *(argv if argv is not None else sys.argv[1:])])
    write_json(out, report)
    print(table(report))
    for s in report["skipped"]:
        print(f"skipped {s['case']}: {s['reason']}")
    for case in report["cases"]:
        for s in case["skipped_kinds"]:
            print(f"skipped {s['kind']} at n={case['n']:,}: {s['reason']}")
    print(f"\n{conditions_line(report['conditions'])}; search 1 thread; peak RSS {report['peak_rss_gib']} GiB")
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
