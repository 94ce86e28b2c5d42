"""Each benchmark's core function in its smallest mode on tiny data: structure, not speed.

No timing is asserted (the machines are shared); what is checked is that every report carries
its conditions, every expected row and only finite numbers.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest

from benchmarks import faiss_scale, offline_scale, ranker_backends
from export.synth import SynthSpec, synthesize

CONDITION_KEYS = {"git_sha", "git_dirty", "cpu", "cores", "nice", "packages", "load_average"}


def _check_conditions(report: dict) -> None:
    cond = report["conditions"]
    assert CONDITION_KEYS <= set(cond)
    assert cond["cores"] >= 1
    assert len(cond["load_average"]["before"]) == 3 and len(cond["load_average"]["after"]) == 3
    if Path("/proc/stat").exists():  # the CPUs' busy and stolen shares during the run (Linux)
        assert 0 <= cond["load_average"]["steal_pct"] <= 100
        assert 0 < cond["load_average"]["busy_pct"] <= 100


def _finite(*values: float) -> bool:
    return all(isinstance(v, (int, float)) and math.isfinite(v) for v in values)


def test_ranker_backends_smoke(tiny_artifacts, tiny_repository, tmp_path):
    settings = ranker_backends.RankerBenchSettings(counts=(1, 10), strategies=("gemm", "tree_trav"), repeats=3, warmup=1, users=2)
    report = ranker_backends.run_benchmark(tiny_artifacts, tiny_repository, settings)
    _check_conditions(report)
    assert report["conditions"]["repeats"] == 3 and report["conditions"]["warmup"] == 1
    assert report["conditions"]["triton"]["used"] is True
    expected = {
        "lightgbm_native",
        "ort_gemm",
        "ort_tree_trav",
        "ort_served_features_ranker",
        "triton_ranker",
        "triton_ranker_ensemble",
    }
    assert set(report["backends"]) == expected
    assert {(r["backend"], r["candidates"]) for r in report["results"]} == {(b, c) for b in expected for c in (1, 10)}
    for r in report["results"]:
        assert r["n"] == 3
        assert _finite(r["p50_ms"], r["p99_ms"], r["p50_ratio_vs_lightgbm"], r["max_abs_diff_vs_lightgbm"])
        assert r["max_abs_diff_vs_lightgbm"] < 1e-3  # every backend computes the same scores
        if r["backend"] == "lightgbm_native":
            assert r["p50_ratio_vs_lightgbm"] == 1.0
    assert "| backend |" in ranker_backends.table(report)
    assert ranker_backends.plot(report, tmp_path / "ranker.png").stat().st_size > 0


def test_ranker_backends_skips_counts_beyond_the_catalog(tiny_artifacts, tiny_repository):
    settings = ranker_backends.RankerBenchSettings(counts=(1, 100_000), strategies=(), repeats=2, warmup=0, users=1, triton=False)
    report = ranker_backends.run_benchmark(tiny_artifacts, tiny_repository, settings)
    assert [s["count"] for s in report["skipped_counts"]] == [100_000]
    assert {r["candidates"] for r in report["results"]} == {1}


def test_faiss_scale_smoke(tiny_artifacts):
    # small_max below the synthetic size sends it down the sampled (large-catalog) path too
    settings = faiss_scale.FaissScaleSettings(sizes=(3000,), dim=16, queries=30, small_max=1000, nlist_cap=64, hnsw_max=5000)
    report = faiss_scale.run_benchmark(tiny_artifacts, settings)
    _check_conditions(report)
    assert [c["n"] for c in report["cases"]] == [150, 3000]
    assert report["cases"][0]["build_path"].startswith("build_indexes")
    assert report["cases"][1]["build_path"].startswith("sampled")
    for case in report["cases"]:
        assert [r["kind"] for r in case["results"]] == ["flat", "ivf_flat", "ivf_pq", "hnsw"]
        for r in case["results"]:
            assert 0.0 <= r["recall"] <= 1.0
            assert _finite(r["p50_ms"], r["p99_ms"], r["build_s"], r["tune_s"], r["bytes"], r["rss_delta_bytes"])
        assert next(r for r in case["results"] if r["kind"] == "flat")["recall"] == 1.0
    assert report["cases"][1]["results"][1]["trained_on"] == 32 * 64
    assert "| case |" in faiss_scale.table(report)


def test_faiss_scale_skips_hnsw_above_its_limit(tiny_artifacts):
    settings = faiss_scale.FaissScaleSettings(sizes=(2000,), dim=16, queries=10, trained=False, small_max=1000, nlist_cap=8, hnsw_max=1000)
    report = faiss_scale.run_benchmark(None, settings)
    (case,) = report["cases"]
    assert [r["kind"] for r in case["results"]] == ["flat", "ivf_flat", "ivf_pq"]
    assert case["skipped_kinds"][0]["kind"] == "hnsw"


def test_mixture_into_flat_is_chunked_and_normalised():
    flat = faiss_scale.mixture_into_flat(2500, 8, seed=0, chunk=1000)
    vectors = faiss_scale.flat_vectors(flat)
    assert vectors.shape == (2500, 8)
    assert abs(float((vectors**2).sum(axis=1).mean()) - 1.0) < 1e-5


@pytest.fixture(scope="module")
def tiny_data(tmp_path_factory):
    data = tmp_path_factory.mktemp("offline_scale_data")
    synthesize(SynthSpec(users=300, items=150, ratings=5000, seed=3, span_days=10), data, progress=False)
    return data


def test_offline_scale_smoke(tiny_data):
    settings = offline_scale.OfflineScaleSettings(
        steps=3,
        batch_size=64,
        val_users_timed=20,
        ranker_users=60,
        candidates=50,
        # few trees: LightGBM's 2 OpenMP threads crawl on a loaded 2-core machine (60 s seen for 150)
        ranker_trees=10,
        faiss_kinds=("flat", "ivf_flat"),
        torch_threads=1,
    )
    report = offline_scale.run_benchmark(tiny_data, settings)
    _check_conditions(report)
    assert report["data"]["ratings"] > 0
    assert set(report["stages"]) >= {"load", "split", "prepare", "two_tower_bounded", "validation_bounded", "ranker_train", "faiss_build"}
    for stage in report["stages"].values():
        assert _finite(stage["seconds"], stage["peak_rss_gib_after"])
    tt = report["two_tower"]
    assert tt["basis"] == "extrapolated"
    assert tt["measured"]["targets"] >= 3 * 64 or tt["measured"]["targets"] == tt["full_epoch"]["targets"]
    assert _finite(tt["full_epoch"]["epoch_seconds_extrapolated"], tt["measured"]["targets_per_s"])
    assert report["ranker"]["rows"] == report["ranker"]["users"] * 50
    assert set(report["faiss"]["build_seconds"]) == {"flat", "ivf_flat"}
    names = [t["name"] for t in report["targets"]]
    assert len(names) == 3 and all(isinstance(t["met"], bool) for t in report["targets"])
    assert any("extrapolated" in t["basis"] for t in report["targets"])
    assert "two-tower:" in offline_scale.table(report)


def test_subset_histories_keeps_the_users_rows():
    import numpy as np

    from export.history import Histories

    h = Histories(
        user_ids=np.array([1, 2, 3]),
        offsets=np.array([0, 2, 3, 6]),
        items=np.array([10, 11, 12, 13, 14, 15]),
        ratings=np.arange(6, dtype=np.float32),
        timestamps=np.arange(6),
    )
    sub = offline_scale.subset_histories(h, np.array([2, 0]))
    assert sub.user_ids.tolist() == [1, 3]
    assert sub.offsets.tolist() == [0, 2, 5]
    assert sub.items.tolist() == [10, 11, 13, 14, 15]


def test_triton_shm_smoke(tiny_repository, tmp_path):
    """Both ways give the same answers (asserted inside) and every figure is there."""
    from benchmarks import triton_shm
    from orchestrator.tritonserver import TritonError, find_triton

    try:
        find_triton()
    except TritonError as exc:
        pytest.skip(f"embedded Triton unavailable: {exc}")
    out = tmp_path / "shm.json"
    assert (
        triton_shm.main(["--repo", str(tiny_repository), "--requests", "5", "--rounds", "2", "--candidates", "30", "--out", str(out)]) == 0
    )
    import json

    report = json.loads(out.read_text())
    _check_conditions(report)
    assert set(report["results"]) == {f"{m}/{mode}" for m in ("user_tower", "ranker_ensemble") for mode in ("grpc", "shm")}
    assert all(_finite(r["p50_ms"], r["p99_ms"]) and r["input_bytes"] > 0 for r in report["results"].values())


def test_candidate_latency_smoke(tiny_artifacts, tmp_path):
    from benchmarks.candidate_latency import main

    out = tmp_path / "candidate_latency.json"
    assert main(["--artifacts", str(tiny_artifacts), "--windows", "20", "--rounds", "1", "--out", str(out)]) == 0
    report = json.loads(out.read_text())
    steps = report["steps"]
    assert {"ann (FAISS retrieve)", "this tree: candidates (merged)", "this tree: candidates (two_tower only)", "this tree: merge"} <= set(
        steps
    )
    assert all(0 < s["p50_ms"] <= s["p99_ms"] for s in steps.values())
    assert report["conditions"]["windows"] == 20
    _check_conditions(report)
