"""`recsys bench e2e` on the tiny deployment: the real served stack and the in-process floor.

Structure only (every level present, no errors, the issue's JSON keys, a PNG written); it
asserts no timing: speed targets live in the benchmark's own report.
"""

from __future__ import annotations

import json
import math

from clients.cli import main


def test_bench_e2e_writes_the_issue_shape(tiny_artifacts, tiny_repository, tmp_path):
    out = tmp_path / "e2e.json"
    code = main(
        ["bench", "e2e", "--artifacts", str(tiny_artifacts), "--repo", str(tiny_repository), "--requests", "30",
         "--warmup", "5", "--concurrency", "1,4", "--ann-only", "--out", str(out)]
    )  # fmt: skip
    assert code == 0
    report = json.loads(out.read_text())
    assert {"git_sha", "cpu", "gpu", "catalog_items", "candidates", "k", "requests", "warmup"} <= set(report["conditions"])
    assert set(report["served"]) == {"c1", "c4"}
    for level in (*report["served"].values(), report["inprocess"]["c1"]):
        assert {"p50_ms", "p95_ms", "p99_ms", "qps", "errors"} <= set(level)
        assert level["errors"] == 0 and level["requests"] == 30
        assert 0 < level["p50_ms"] <= level["p95_ms"] <= level["p99_ms"]
    stages = report["stages_ms"]
    assert {"user_tower", "retrieval", "ranking", "reranking", "rpc_overhead"} <= set(stages["served"])
    assert set(report["targets"]) == {
        "served_c1_p50_ms", "served_c1_p99_ms", "inprocess_c1_p50_ms", "served_minus_inprocess_p50_ms", "c16_qps", "c16_p99_ms",
        "overload_admitted_p99_ms", "overload_shed_p99_ms", "overload_internal", "batch_speedup",
    }  # fmt: skip
    assert report["targets"]["c16_qps"]["met"] is None  # no c16 level in this run: not claimed either way
    # issue 13's additions: an overload run at c64 and BatchRecommend against single calls
    overload = report["overload"]
    assert {"concurrency", "requests", "admitted", "shed", "admitted_p99_ms", "shed_p99_ms", "internal"} <= set(overload)
    assert overload["concurrency"] == 64 and overload["admitted"] + overload["shed"] <= overload["requests"]
    assert overload["admitted"] > 0 and overload["internal"] == 0
    # the refusal rate behind the shed latency (Little's law), from the same run
    assert overload["wall_s"] > 0 and math.isclose(overload["shed_per_s"], overload["shed"] / overload["wall_s"], rel_tol=0.01, abs_tol=0.1)
    assert (overload["shed_mean_ms"] is None) == (overload["shed"] == 0) and (overload["shed"] == 0 or overload["shed_mean_ms"] > 0)
    batch = report["batch"]
    assert {"users", "single_users_per_s", "batch_users_per_s"} <= set(batch)
    assert batch["single_users_per_s"] > 0 and batch["batch_users_per_s"] > 0
    assert out.with_suffix(".png").stat().st_size > 10_000
    # issue 12: the merged sources against the ANN list alone at the same candidate count, c1
    sources = report["cases"]["custom"]["sources"]
    for level in sources["ann_only"].values():
        assert level["errors"] == 0 and level["requests"] == 30 and level["p50_ms"] > 0
    assert "retrieval" in sources["stages_ms"]["served"] and "retrieval" in sources["stages_ms"]["inprocess"]
    assert set(sources["merged_over_ann_only"]) == {"served_c1_p50", "inprocess_c1_p50", "served_retrieval_p50", "inprocess_retrieval_p50"}
    assert all(v is not None and v > 0 for v in sources["merged_over_ann_only"].values())
    # CPU per answered call by process, and the ceiling it sets (Linux: /proc)
    for level in report["served"].values():
        cpu = level["cpu"]
        assert {"orchestrator", "tritonserver", "triton_python_stubs", "load_generator"} <= set(cpu["ms_per_call"])
        assert all(ms >= 0 for ms in cpu["ms_per_call"].values()) and cpu["ms_per_call"]["orchestrator"] > 0
        assert math.isclose(cpu["total_ms"], sum(cpu["ms_per_call"].values()), rel_tol=0.01, abs_tol=0.01)
        assert math.isclose(cpu["ceiling_qps"], cpu["cores"] * 1e3 / cpu["total_ms"], rel_tol=0.01)
