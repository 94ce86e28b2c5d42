"""Ranker latency per backend and candidate count, side by side in one run, as ratios.

    python -m benchmarks.ranker_backends [--quick] [--out FILE] [--artifacts DIR] [--repo DIR]

Backends, all scoring the *same* requests (real users' history windows and the two-tower's
real candidates for them, see :func:`real_requests`):

* ``lightgbm_native``: ``booster.predict(features, num_threads=1)`` on ``artifacts/ranker.lgb``,
  the yardstick every ratio is taken against.
* ``ort_<strategy>``: the booster translated by Hummingbird with one tree strategy
  (``gemm``, ``tree_trav``, ``perf_tree_trav``) through :func:`export.onnx_export.export_ranker`,
  the export's own code, run in-process by onnxruntime with one intra-op thread
  (:func:`export.onnx_export.session`, the served session options).
* ``ort_served_features_ranker``: the published ``ranker_features`` and ``ranker`` graphs run
  back to back in-process: the work of ``triton_ranker_ensemble`` without Triton, so the
  difference between the two is Triton's cost (gRPC, the Python backend, the ensemble hop).
* ``triton_ranker``: the published ``ranker`` model on the embedded Triton (CPU configs:
  Python backend, onnxruntime, one intra-op thread), gRPC, feature rows in, scores out.
* ``triton_ranker_ensemble``: ``ranker_ensemble`` (``ranker_features -> ranker``) over gRPC,
  the candidate rows (item, retrieval score and rank, history, ratings) in, scores out: what
  the orchestrator sends per user.

Method: for each candidate count, ``warmup + repeats`` rounds; each round calls every backend
once, in a fresh random order, on the same user's request (users rotate round by round). On a
shared machine whose load drifts, interleaving spreads the drift evenly over the backends
instead of handing it to whichever ran last. Warm-up rounds are discarded. One request at a
time (concurrency 1): this is latency, not throughput (perf_analyzer does throughput).
Every backend's scores are also checked against LightGBM's on every request; the largest
difference is reported, so a fast but wrong backend shows.

Output: JSON (``--out``, default ``reports/benchmarks/ranker_backends.json``), a printed
table and a PNG beside the JSON (latency vs candidates, one line per backend).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import sys
import tempfile
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from benchmarks.common import REPORTS, LoadWatch, conditions, conditions_line, latency_summary, log, markdown_table, ratio, write_json
from orchestrator.contract import CANDIDATE_INPUTS

COUNTS = (1, 100, 200, 500, 1000)
"""Candidates per request: a single item, then one user's retrieval depth and beyond."""

REFERENCE = "lightgbm_native"
ENSEMBLE_INPUTS = CANDIDATE_INPUTS


@dataclass(frozen=True)
class RankerBenchSettings:
    """What one run measures.

    Attributes:
        counts: Candidates per request.
        strategies: Hummingbird tree strategies to convert and time in onnxruntime.
        repeats: Timed rounds per candidate count (each round calls every backend once).
        warmup: Untimed rounds first (allocations, Triton's first-request paths).
        users: Real users whose requests rotate round by round.
        triton: Also start the embedded Triton and time the two served models.
        seed: Which users are drawn, and the per-round backend order.
    """

    counts: tuple[int, ...] = COUNTS
    strategies: tuple[str, ...] = ("gemm", "tree_trav", "perf_tree_trav")
    repeats: int = 300
    warmup: int = 30
    users: int = 16
    triton: bool = True
    seed: int = 0

    @classmethod
    def quick(cls) -> RankerBenchSettings:
        """Under a minute on 2 cores: two counts, few rounds (figures are indicative only)."""
        return cls(counts=(1, 200), repeats=40, warmup=5, users=4)


@dataclass
class Requests:
    """Per user, the ranker's inputs for the user's best ``max_count`` candidates.

    Attributes:
        user_ids: The users (MovieLens ids).
        rows: Per user, the ``ranker_ensemble`` inputs [C, ...] (best retrieval first).
        features: Per user, float32 [C, F] feature rows from the published ``ranker_features``.
        max_count: Candidates available per user.
        source: How the users and candidates were chosen, for the report.
    """

    user_ids: np.ndarray
    rows: list[dict[str, np.ndarray]]
    features: list[np.ndarray]
    max_count: int
    source: dict[str, Any] = field(default_factory=dict)

    def take(self, user: int, count: int) -> tuple[dict[str, np.ndarray], np.ndarray]:
        """The first ``count`` candidates of the ``user``-th user: (ensemble rows, feature rows)."""
        rows = {name: np.ascontiguousarray(a[:count]) for name, a in self.rows[user].items()}
        return rows, np.ascontiguousarray(self.features[user][:count])


def real_requests(artifacts: str | Path, repo: str | Path, users: int, max_count: int, seed: int = 0) -> Requests:
    """Real ranker requests: users' last-``L`` windows and their two-tower candidates.

    Users are drawn (seeded) among those with at least ``max_count`` unseen items, so every
    user has a full request at every count. Their user vectors come from the published
    ``user_tower`` graph, candidates from an exact top-``max_count`` over
    ``item_embeddings.npy`` with seen items excluded (what FAISS approximates in serving), and
    feature rows from the published ``ranker_features`` graph: the rows Triton's ensemble
    computes internally, handed to the backends that take features.

    Args:
        artifacts: Folder written by ``recsys train``.
        repo: Model repository with an exported version.
        users: How many users.
        max_count: Candidates per user (capped by the catalog minus the seen items).
        seed: Which users.

    Raises:
        ValueError: No user has ``max_count`` unseen items.
    """
    from benchmarks.perf_analyzer.make_inputs import latest_version
    from export.batch_score import load_user_data, user_windows
    from export.candidates import merged_from_ann
    from export.onnx_export import session
    from export.retrieval import top_k
    from orchestrator.candidates import TABLES_FILE, CandidateTables

    artifacts, repo = Path(artifacts), Path(repo)
    data = load_user_data(artifacts)
    item_vectors = np.load(artifacts / "item_embeddings.npy").astype(np.float32)
    tower_dir = latest_version(repo / "user_tower")
    tower = session(tower_dir / "model.onnx")
    history_len = int(tower.get_inputs()[0].shape[1])
    seen_counts = np.diff(data.histories.offsets)
    eligible = data.histories.user_ids[(seen_counts > 0) & (data.n_items - seen_counts >= max_count)]
    if len(eligible) == 0:
        raise ValueError(f"no user has {max_count} unseen items in a catalog of {data.n_items}")
    rng = np.random.default_rng(seed)
    chosen = np.sort(rng.choice(eligible, size=min(users, len(eligible)), replace=False))
    x, long_history, long_rating = user_windows(data, chosen, history_len)
    vectors = tower.run(["user_embedding"], x)[0]
    seen = data.histories.seen(chosen)
    ann, _ = top_k(vectors, item_vectors, max_count, seen)
    tables = CandidateTables.load(artifacts / TABLES_FILE)
    cand, scores, sources = merged_from_ann(tables, ann, x["history"], seen, vectors, item_vectors, max_count)
    features_dir = latest_version(repo / "ranker_features")
    features_session = session(features_dir / "model.onnx")
    rows, feats = [], []
    for u in range(len(chosen)):
        r = {
            "item": cand[u].astype(np.int32),
            "retrieval_score": scores[u].astype(np.float32),
            # 0-based rank in the merged list, as in training (export.ranker.candidate_features)
            "retrieval_rank": np.arange(max_count, dtype=np.float32),
            "history": long_history[u : u + 1].astype(np.int32),  # once per user
            "history_rating": long_rating[u : u + 1].astype(np.float32),
            "candidate_sources": sources[u].astype(np.float32),
        }
        rows.append(r)
        feats.append(features_session.run(["features"], r)[0].astype(np.float32))
    source = {
        "users": [int(u) for u in chosen],
        "eligible_users": int(len(eligible)),
        "rule": f"users with >= {max_count} unseen items, drawn with seed {seed}",
        "candidates": "exact two-tower top-N over item_embeddings.npy merged with the other candidate sources, seen items excluded (published user_tower graph)",
        "features": f"published ranker_features v{features_dir.name}",
        "history_len": history_len,
        "n_items": int(data.n_items),
    }
    return Requests(chosen, rows, feats, max_count, source)


# --------------------------------------------------------------------------- backends


@dataclass
class Backend:
    """One way of scoring a request.

    Attributes:
        name: Backend name in the report.
        call: ``(rows, features) -> scores [C]``; each backend reads the input it needs.
        info: How it was built (strategy, version, export time, threads...).
    """

    name: str
    call: Callable[[dict[str, np.ndarray], np.ndarray], np.ndarray]
    info: dict[str, Any] = field(default_factory=dict)


def lightgbm_backend(booster: Any) -> Backend:
    """``booster.predict`` on one thread: the reference."""
    return Backend(
        REFERENCE,
        lambda rows, feats: booster.predict(feats, num_threads=1),
        {"threads": 1, "trees": int(booster.num_trees()), "features": int(booster.num_feature())},
    )


def hummingbird_backend(booster: Any, strategy: str, workdir: Path) -> Backend:
    """The booster converted with one Hummingbird tree strategy, run by onnxruntime (1 thread).

    Raises:
        Exception: Whatever the export raises (the caller records it as a skipped backend).
    """
    from export.onnx_export import export_ranker, session

    path = workdir / f"ranker-{strategy}.onnx"
    t0 = time.perf_counter()
    pinned = export_ranker(booster, strategy, path)
    export_s = time.perf_counter() - t0
    sess = session(path, threads=1)
    return Backend(
        f"ort_{strategy}",
        lambda rows, feats: sess.run(["score"], {"features": feats})[0].reshape(-1),
        {
            "strategy": strategy,
            "threads": 1,
            "export_s": round(export_s, 2),
            "squeeze_nodes_pinned": pinned,
            "onnx_bytes": path.stat().st_size,
        },
    )


def served_graphs_backend(repo: Path) -> Backend:
    """The published ``ranker_features`` then ``ranker`` graphs, in-process (1 thread each)."""
    from benchmarks.perf_analyzer.make_inputs import latest_version
    from export.onnx_export import session

    feat_dir, rank_dir = latest_version(repo / "ranker_features"), latest_version(repo / "ranker")
    feat, rank = session(feat_dir / "model.onnx"), session(rank_dir / "model.onnx")
    strategy = (
        json.loads((rank_dir / "version.json").read_text()).get("tree_implementation") if (rank_dir / "version.json").exists() else None
    )

    def call(rows: dict[str, np.ndarray], feats: np.ndarray) -> np.ndarray:
        f = feat.run(["features"], rows)[0]
        return rank.run(["score"], {"features": f})[0].reshape(-1)

    return Backend(
        "ort_served_features_ranker",
        call,
        {"threads": 1, "ranker_version": int(rank_dir.name), "features_version": int(feat_dir.name), "strategy": strategy},
    )


def triton_backends(url: str) -> list[Backend]:
    """``ranker`` and ``ranker_ensemble`` over gRPC on a running Triton."""
    import tritonclient.grpc as grpcclient

    client = grpcclient.InferenceServerClient(url)
    dtypes = {np.dtype(np.int64): "INT64", np.dtype(np.int32): "INT32", np.dtype(np.float32): "FP32"}

    def infer(model: str, arrays: dict[str, np.ndarray]) -> np.ndarray:
        inputs = []
        for name, array in arrays.items():
            t = grpcclient.InferInput(name, list(array.shape), dtypes[array.dtype])
            t.set_data_from_numpy(array)
            inputs.append(t)
        result = client.infer(model, inputs, outputs=[grpcclient.InferRequestedOutput("score")])
        return result.as_numpy("score").reshape(-1)

    def info(model: str) -> dict[str, Any]:
        meta = client.get_model_metadata(model, as_json=True)
        cfg = client.get_model_config(model, as_json=True)["config"]
        return {
            "protocol": "grpc",
            "url": url,
            "versions": meta.get("versions"),
            "backend": cfg.get("backend") or cfg.get("platform"),
            "dynamic_batching": cfg.get("dynamic_batching"),
            "concurrency": 1,
        }

    return [
        Backend("triton_ranker", lambda rows, feats: infer("ranker", {"features": feats}), info("ranker")),
        Backend(
            "triton_ranker_ensemble",
            lambda rows, feats: infer("ranker_ensemble", {n: rows[n] for n in ENSEMBLE_INPUTS}),
            info("ranker_ensemble"),
        ),
    ]


@contextlib.contextmanager
def embedded_triton(repo: Path) -> Iterator[Any]:
    """The embedded Triton with only the three ranker models loaded (less start-up, less memory)."""
    from orchestrator.tritonserver import EmbeddedTriton

    with EmbeddedTriton(repo, load_models=("ranker_features", "ranker", "ranker_ensemble")) as server:
        yield server


# --------------------------------------------------------------------------- measuring


def time_interleaved(
    backends: Sequence[Backend], requests: Requests, count: int, repeats: int, warmup: int, rng: np.random.Generator
) -> tuple[dict[str, np.ndarray], dict[str, float]]:
    """Per-call wall times of every backend at ``count`` candidates, interleaved round by round.

    Returns:
        ``(seconds per backend [repeats], max |score - lightgbm| per backend)``.
    """
    times = {b.name: np.empty(repeats) for b in backends}
    diffs = {b.name: 0.0 for b in backends}
    n_users = len(requests.user_ids)
    inputs = [requests.take(u, count) for u in range(n_users)]
    reference = next(b for b in backends if b.name == REFERENCE)
    expected = [np.asarray(reference.call(*inputs[u]), np.float64).reshape(-1) for u in range(n_users)]
    for r in range(warmup + repeats):
        u = r % n_users
        rows, feats = inputs[u]
        for i in rng.permutation(len(backends)):
            b = backends[i]
            t0 = time.perf_counter()
            scores = b.call(rows, feats)
            dt = time.perf_counter() - t0
            if r >= warmup:
                times[b.name][r - warmup] = dt
            scores = np.asarray(scores, np.float64).reshape(-1)
            if scores.shape != expected[u].shape:
                raise RuntimeError(f"{b.name}: {scores.shape[0]} scores for {count} candidates")
            diffs[b.name] = max(diffs[b.name], float(np.max(np.abs(scores - expected[u]))))
    return times, diffs


def run_benchmark(artifacts: str | Path, repo: str | Path, settings: RankerBenchSettings) -> dict[str, Any]:
    """Builds every backend, times them at every count, returns the report (nothing printed).

    Counts larger than what the catalog allows (``n_items`` minus the chosen users' seen
    items) are skipped and listed under ``skipped_counts``; a backend that cannot be built
    (a strategy Hummingbird fails on) is listed under ``skipped_backends`` with the error.
    """
    import lightgbm as lgb

    artifacts, repo = Path(artifacts), Path(repo)
    booster = lgb.Booster(model_file=str(artifacts / "ranker.lgb"))
    counts = tuple(sorted(set(settings.counts)))
    requests, skipped_counts = None, []
    wanted = list(counts)
    while wanted and requests is None:
        try:
            requests = real_requests(artifacts, repo, settings.users, wanted[-1], settings.seed)
        except ValueError as exc:
            skipped_counts.append({"count": wanted.pop(), "reason": str(exc)})
    if requests is None:
        raise ValueError(f"no candidate count of {counts} fits the catalog: {skipped_counts}")
    counts = tuple(wanted)

    rng = np.random.default_rng(settings.seed)
    skipped_backends: list[dict[str, str]] = []
    results: list[dict[str, Any]] = []
    with contextlib.ExitStack() as stack, LoadWatch() as load:
        workdir = Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="ranker-bench-")))
        backends = [lightgbm_backend(booster)]
        for strategy in settings.strategies:
            try:
                backends.append(hummingbird_backend(booster, strategy, workdir))
            except Exception as exc:  # a strategy Hummingbird cannot translate is a result, not a crash
                skipped_backends.append({"backend": f"ort_{strategy}", "reason": f"{type(exc).__name__}: {exc}"[:300]})
        backends.append(served_graphs_backend(repo))
        triton_info: dict[str, Any] = {"used": False}
        if settings.triton:
            t0 = time.perf_counter()
            server = stack.enter_context(embedded_triton(repo))
            triton_info = {"used": True, "startup_s": round(time.perf_counter() - t0, 1), "config_name": server.config_name}
            with contextlib.suppress(Exception):
                triton_info["server_version"] = server.server_metadata().get("version")
            backends.extend(triton_backends(server.grpc_url))
        for count in counts:
            log(f"{count} candidates: {settings.warmup} + {settings.repeats} rounds over {len(backends)} backends")
            times, diffs = time_interleaved(backends, requests, count, settings.repeats, settings.warmup, rng)
            ref = latency_summary(times[REFERENCE])
            for b in backends:
                s = latency_summary(times[b.name])
                results.append(
                    {
                        "backend": b.name,
                        "candidates": count,
                        **s,
                        "p50_ratio_vs_lightgbm": ratio(s["p50_ms"], ref["p50_ms"]),
                        "p99_ratio_vs_lightgbm": ratio(s["p99_ms"], ref["p99_ms"]),
                        "max_abs_diff_vs_lightgbm": float(f"{diffs[b.name]:.3g}"),
                    }
                )
    return {
        "benchmark": "ranker_backends",
        "conditions": conditions(
            load_average=load.record(),
            artifacts=str(artifacts.resolve()),
            repository=str(repo.resolve()),
            threads={"lightgbm": 1, "onnxruntime_intra_op": 1, "triton_python_backend_intra_op": 1},
            concurrency=1,
            repeats=settings.repeats,
            warmup=settings.warmup,
            order="interleaved: every round calls each backend once, in a random order",
            settings=asdict(settings),
            triton=triton_info,
            requests=requests.source,
        ),
        "backends": {b.name: b.info for b in backends},
        "skipped_backends": skipped_backends,
        "skipped_counts": skipped_counts,
        "results": results,
    }


# --------------------------------------------------------------------------- output


def table(report: dict[str, Any]) -> str:
    """The results as a Markdown table: one row per (backend, candidates)."""
    rows = [
        (
            r["backend"],
            r["candidates"],
            r["p50_ms"],
            r["p99_ms"],
            r["p50_ratio_vs_lightgbm"],
            r["p99_ratio_vs_lightgbm"],
            f"{r['max_abs_diff_vs_lightgbm']:.1e}",
        )
        for r in sorted(report["results"], key=lambda r: (r["candidates"], r["p50_ms"]))
    ]
    return markdown_table(("backend", "candidates", "p50 ms", "p99 ms", "p50 / lightgbm", "p99 / lightgbm", "max |diff|"), rows)


def plot(report: dict[str, Any], path: str | Path) -> Path:
    """Latency vs candidates, one line per backend (p50 solid, p99 dotted), log-log."""
    import matplotlib

    matplotlib.use("Agg")  # no display on the development machines
    import matplotlib.pyplot as plt

    path = Path(path)
    fig, ax = plt.subplots(figsize=(8, 5))
    by_backend: dict[str, list[dict[str, Any]]] = {}
    for r in report["results"]:
        by_backend.setdefault(r["backend"], []).append(r)
    for name, rs in by_backend.items():
        rs = sorted(rs, key=lambda r: r["candidates"])
        x = [r["candidates"] for r in rs]
        (line,) = ax.plot(x, [r["p50_ms"] for r in rs], marker="o", label=f"{name} p50")
        ax.plot(x, [r["p99_ms"] for r in rs], linestyle=":", color=line.get_color(), alpha=0.7)
    ax.set_xscale("log")
    ax.set_yscale("log")
    ax.set_xlabel("candidates per request")
    ax.set_ylabel("latency, ms (p50 solid, p99 dotted)")
    c = report["conditions"]
    ax.set_title(f"ranker backends: {c['cpu']}, {c['cores']} cores, 1 thread, concurrency 1", fontsize=10)
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--artifacts", default="artifacts", help="folder written by `recsys train` (default: %(default)s)")
    parser.add_argument("--repo", default="model_repository", help="exported model repository (default: %(default)s)")
    parser.add_argument("--out", default=str(REPORTS / "ranker_backends.json"), help="JSON report; the PNG goes beside it")
    parser.add_argument("--quick", action="store_true", help="two counts, few rounds: under a minute")
    parser.add_argument("--counts", default=None, help="comma-separated candidate counts (default: 1,100,200,500,1000)")
    parser.add_argument("--repeats", type=int, default=None, help="timed rounds per count")
    parser.add_argument("--no-triton", action="store_true", help="skip the embedded Triton backends")
    args = parser.parse_args(argv)
    settings = RankerBenchSettings.quick() if args.quick else RankerBenchSettings()
    overrides: dict[str, Any] = {}
    if args.counts:
        overrides["counts"] = tuple(int(c) for c in args.counts.split(","))
    if args.repeats:
        overrides["repeats"] = args.repeats
    if args.no_triton:
        overrides["triton"] = False
    if overrides:
        settings = RankerBenchSettings(**{**asdict(settings), **overrides})
    report = run_benchmark(args.artifacts, args.repo, settings)
    report["conditions"]["command"] = " ".join(["python -m benchmarks.ranker_backends", *(argv if argv is not None else sys.argv[1:])])
    out = write_json(args.out, report)
    png = plot(report, out.with_suffix(".png"))
    print(table(report))
    for s in report["skipped_backends"]:
        print(f"skipped {s['backend']}: {s['reason']}")
    for s in report["skipped_counts"]:
        print(f"skipped {s['count']} candidates: {s['reason']}")
    print(f"\n{conditions_line(report['conditions'])}; repeats {settings.repeats}, warm-up {settings.warmup}, concurrency 1")
    print(f"wrote {out} and {png}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
