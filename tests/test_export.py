"""ONNX export: parity with PyTorch and LightGBM, tree strategy record, versioning, refusal."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import lightgbm as lgb
import numpy as np
import onnx
import pytest

from clients.cli import main
from export.features import FEATURE_NAMES
from export.onnx_export import (
    LEAF_MODELS,
    TREE_IMPLEMENTATIONS,
    ExportError,
    export_ranker,
    export_repository,
    float32_exact_booster,
    load_ranker_features,
    load_two_tower,
    sample_candidate_inputs,
    sample_user_inputs,
    session,
)
from export.ranker import split_linear_base
from orchestrator.artifacts import file_sha256
from orchestrator.contract import MODEL_NAMES, published_versions

CHECKED_IN = Path(__file__).resolve().parents[1] / "model_repository"


@pytest.fixture(scope="module")
def model(tiny_artifacts):
    return load_two_tower(tiny_artifacts / "two_tower.pt")


@pytest.fixture(scope="module")
def features(tiny_artifacts):
    return load_ranker_features(tiny_artifacts / "ranker_features.pt")


@pytest.fixture(scope="module")
def booster(tiny_artifacts):
    return lgb.Booster(model_file=str(tiny_artifacts / "ranker.lgb"))


def graph(repo: Path, name: str, version: int = 1) -> Path:
    return repo / name / str(version) / "model.onnx"


def candidate_features(features, x: dict[str, np.ndarray]) -> np.ndarray:
    """The offline reference: every candidate with its own user's history row (U = N, C = 1)."""
    per_row = np.repeat(np.arange(len(x["history"])), len(x["item"]) // len(x["history"]))
    return features.compute(
        x["item"].reshape(-1),
        x["retrieval_score"].reshape(-1),
        x["retrieval_rank"].reshape(-1),
        x["history"][per_row],
        x["history_rating"][per_row],
        x["candidate_sources"],
    )


def test_loaders_rebuild_the_trained_modules(tiny_artifacts, model, features):
    saved = np.load(tiny_artifacts / "item_embeddings.npy")
    np.testing.assert_array_equal(model.item_vectors(), saved)
    assert not model.training and not features.training
    n_items = saved.shape[0]
    assert features.genres.shape[0] == n_items
    np.testing.assert_allclose(features.vectors.numpy(), saved / np.linalg.norm(saved, axis=1, keepdims=True), atol=1e-6)


@pytest.mark.parametrize("batch", [1, 7, 256])
def test_user_tower_onnx_matches_pytorch(tiny_repository, model, batch):
    n_items = model.item_tower.encoder.genres.shape[0]
    cards = [e.num_embeddings for e in model.user_tower.demo_embs]
    x = sample_user_inputs(batch, n_items, model.config.history_len, cards, seed=100 + batch)
    x["history"][0] = -1  # a user without history gets the finite "no history" vector
    x["history_rating"][0] = 0
    expected = model.user_vectors(x["history"], x["history_rating"], x["demographics"])
    got = session(graph(tiny_repository, "user_tower")).run(["user_embedding"], x)[0]
    assert got.shape == (batch, model.config.dim) and got.dtype == np.float32
    np.testing.assert_allclose(got, expected, rtol=0, atol=1e-5)


def test_item_tower_onnx_matches_pytorch(tiny_repository, model):
    expected = model.item_vectors()
    sess = session(graph(tiny_repository, "item_tower"))
    items = np.arange(len(expected), dtype=np.int64).reshape(-1, 1)
    for rows in (items[:1], items[3:10], items):
        got = sess.run(["item_embedding"], {"item": rows})[0]
        np.testing.assert_allclose(got, expected[rows.reshape(-1)], rtol=0, atol=1e-5)


@pytest.mark.parametrize(("batch", "users"), [(1, 1), (7, 7), (200, 1), (256, 4)])
def test_ranker_features_onnx_matches_feature_module(tiny_repository, features, model, batch, users):
    """Histories sent once per user (U < N) give the features of one history row per candidate."""
    n_items = features.genres.shape[0]
    x = sample_candidate_inputs(batch, n_items, seed=200 + batch, users=users)
    x["history"][-1] = -1  # empty history: the features' guards must agree too
    x["history_rating"][-1] = 0
    expected = candidate_features(features, x)
    got = session(graph(tiny_repository, "ranker_features")).run(["features"], x)[0]
    assert got.shape == (batch, len(FEATURE_NAMES))
    np.testing.assert_allclose(got, expected, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("batch", [1, 7, 200, 4096])
def test_ranker_onnx_matches_lightgbm(tiny_repository, features, booster, model, batch):
    n_items = features.genres.shape[0]
    x = sample_candidate_inputs(batch, n_items, seed=300 + batch)
    feats = candidate_features(features, x)
    got = session(graph(tiny_repository, "ranker")).run(["score"], {"features": feats})[0]
    assert got.shape == (batch, 1)
    np.testing.assert_allclose(got.reshape(-1), booster.predict(feats), rtol=0, atol=1e-4)


def test_float32_exact_thresholds_keep_lightgbm_and_fix_ties(booster, tmp_path):
    exact = float32_exact_booster(booster)
    rng = np.random.default_rng(0)
    x = rng.normal(size=(500, booster.num_feature())).astype(np.float32)
    np.testing.assert_array_equal(exact.predict(x), booster.predict(x))
    # rows sitting exactly on (the float32 rounding of) split thresholds: where float32
    # rounding-to-nearest sends a row down the other branch
    dump = booster.dump_model()["tree_info"]
    ties = []
    for tree in dump[:5]:
        node = tree["tree_structure"]
        while "split_feature" in node:
            # LightGBM puts a split between negative values and zero at its sentinel
            # -1e-35 (kZeroThreshold); no feature takes values that close to zero (source
            # ranks are -1 or >= 0), and the ONNX graph sends exactly -1e-35 the other way
            if abs(node["threshold"]) > 1e-30:
                row = np.zeros(booster.num_feature(), np.float32)
                row[node["split_feature"]] = np.float32(node["threshold"])
                ties.append(row)
            node = node["left_child"]
    ties = np.stack(ties)
    export_ranker(booster, "tree_trav", tmp_path / "r.onnx")
    got = session(tmp_path / "r.onnx").run(["score"], {"features": ties})[0].reshape(-1)
    np.testing.assert_allclose(got, booster.predict(ties), atol=1e-5)


@pytest.mark.parametrize("implementation", TREE_IMPLEMENTATIONS)
def test_every_tree_strategy_handles_batch_1(booster, features, model, tmp_path, implementation):
    """gemm's batch-1 failure (an axis-less Squeeze) is fixed by pinning the axes."""
    # the pipeline's ranker boosts from ease_score, so these parities also cover the linear term
    assert split_linear_base(booster)[1] is not None
    x = sample_candidate_inputs(7, features.genres.shape[0], seed=5)
    feats = candidate_features(features, x)
    pinned = export_ranker(booster, implementation, tmp_path / "r.onnx")
    if implementation == "gemm":
        assert pinned >= 1
    sess = session(tmp_path / "r.onnx")
    for rows in (feats[:1], feats):
        got = sess.run(["score"], {"features": rows})[0]
        np.testing.assert_allclose(got.reshape(-1), booster.predict(rows), atol=1e-4)


def test_graphs_have_pinned_names_and_dynamic_batch(tiny_repository):
    expected = {
        "user_tower": (["history", "history_rating", "demographics"], ["user_embedding"]),
        "item_tower": (["item"], ["item_embedding"]),
        "ranker_features": (["item", "retrieval_score", "retrieval_rank", "history", "history_rating", "candidate_sources"], ["features"]),
        "ranker": (["features"], ["score"]),
    }
    for name, (inputs, outputs) in expected.items():
        g = onnx.load(str(graph(tiny_repository, name))).graph
        init = {i.name for i in g.initializer}
        assert [v.name for v in g.input if v.name not in init] == inputs, name
        assert [v.name for v in g.output] == outputs, name
        for v in [*g.input, *g.output]:
            if v.name not in init:
                assert v.type.tensor_type.shape.dim[0].dim_param, (name, v.name)


def test_manifest_records_tree_choice_and_timings(tiny_repository, tiny_artifacts):
    manifest = json.loads((tiny_artifacts / "manifest.json").read_text())
    export = manifest["export"]
    ranker = export["ranker"]
    assert ranker["tree_implementation"] in TREE_IMPLEMENTATIONS
    assert ranker["selection"] == "measured"
    trials = {t["implementation"]: t for t in ranker["trials"]}
    assert set(trials) == set(TREE_IMPLEMENTATIONS)
    usable = {k: t for k, t in trials.items() if t["error"] is None}
    assert ranker["tree_implementation"] in usable
    for t in usable.values():
        assert set(t["ms_p50"]) == {"200", "500"} and all(v > 0 for v in t["ms_p50"].values())
        assert t["max_abs_diff"]["1"] is not None and t["max_abs_diff"]["1"] <= 1e-4
    mean = {k: np.mean(list(t["ms_p50"].values())) for k, t in usable.items()}
    assert ranker["tree_implementation"] == min(mean, key=mean.get)
    assert set(ranker["lightgbm_native_ms_p50"]) == {"200", "500"}
    assert export["version"] == 1
    for name, by_batch in export["parity_max_abs_diff"].items():
        assert max(by_batch.values()) <= 1e-4, name


def test_version_folders_record_artifacts(tiny_repository, tiny_artifacts):
    manifest = json.loads((tiny_artifacts / "manifest.json").read_text())
    for name in MODEL_NAMES:
        info = json.loads((tiny_repository / name / "1" / "version.json").read_text())
        assert info["model"] == name and info["version"] == 1
        assert info["artifacts"]["data_sha256"] == manifest["data"]["sha256"]
        assert info["artifacts"]["git_sha"] == manifest["git_sha"]
        assert info["artifacts"]["files_sha256"]["item_embeddings.npy"] == file_sha256(tiny_artifacts / "item_embeddings.npy")
        if name in LEAF_MODELS:
            assert info["onnx_sha256"] == file_sha256(graph(tiny_repository, name))
            assert (tiny_repository / name / "1" / "model.py").read_text() == (tiny_repository / name / "model.py").read_text()
    assert not list(tiny_repository.glob("*/.staging-*"))


def test_reexport_publishes_next_version_beside_the_last(tiny_repository, tiny_artifacts, tmp_path):
    repo = shutil.copytree(tiny_repository, tmp_path / "repo")
    before = {p: file_sha256(p) for p in repo.glob("*/1/*") if p.is_file()}
    summary = export_repository(tiny_artifacts, repo, tree_implementation="tree_trav", update_manifest=False)
    assert summary["version"] == 2
    assert summary["ranker"]["selection"] == "forced"
    for name in MODEL_NAMES:
        assert published_versions(repo / name) == [1, 2]
        assert json.loads((repo / name / "2" / "version.json").read_text())["version"] == 2
    assert {p: file_sha256(p) for p in repo.glob("*/1/*") if p.is_file()} == before  # version 1 untouched
    assert not list(repo.glob("*/.staging-*"))
    # a gap (version 1 removed by hand) never lets a later export reuse a number
    shutil.rmtree(repo / "user_tower" / "1")
    assert export_repository(tiny_artifacts, repo, tree_implementation="tree_trav", update_manifest=False)["version"] == 3


def test_mismatch_with_checked_in_configs_is_refused(tiny_artifacts, tmp_path):
    """The checked-in configs describe the full-size model (L=50, dim=64); the tiny one differs."""
    repo = tmp_path / "repo"
    for name in MODEL_NAMES:
        shutil.copytree(CHECKED_IN / name, repo / name, ignore=shutil.ignore_patterns("[0-9]*"))
    configs_before = {p: p.read_text() for p in repo.rglob("*.pbtxt")}
    with pytest.raises(ExportError) as exc:
        export_repository(tiny_artifacts, repo, tree_implementation="tree_trav", update_manifest=False)
    msg = str(exc.value)
    assert "nothing published" in msg
    assert "user_tower (config.pbtxt): input 'history' dims [50] in config, [10] in ONNX" in msg
    assert "user_tower (configs/cpu.pbtxt): output 'user_embedding' dims [64] in config, [16] in ONNX" in msg
    assert all(published_versions(repo / m) == [] for m in MODEL_NAMES)
    assert not list(repo.glob("*/.staging-*"))
    assert {p: p.read_text() for p in repo.rglob("*.pbtxt")} == configs_before


def test_dtype_and_name_mismatch_in_one_config_is_refused(tiny_repository, tiny_artifacts, tmp_path):
    repo = shutil.copytree(tiny_repository, tmp_path / "repo")
    cpu = repo / "ranker_features" / "configs" / "cpu.pbtxt"
    cpu.write_text(
        cpu.read_text().replace('name: "retrieval_rank"\n    data_type: TYPE_FP32', 'name: "retrieval_rank"\n    data_type: TYPE_INT64')
    )
    native = repo / "ranker" / "config.pbtxt"
    native.write_text(native.read_text().replace('name: "score"', 'name: "scores"'))
    with pytest.raises(ExportError) as exc:
        export_repository(tiny_artifacts, repo, tree_implementation="tree_trav", update_manifest=False)
    msg = str(exc.value)
    assert "ranker_features (configs/cpu.pbtxt): input 'retrieval_rank' data_type TYPE_INT64 in config, TYPE_FP32 in ONNX" in msg
    assert "ranker (config.pbtxt): output 'scores' is in the config but not in the ONNX graph" in msg
    # the ensemble still maps 'score' from the ranker, which its native config no longer declares
    assert "ranker_ensemble step 1 (ranker): output_map key 'score' is not an output of the model [config.pbtxt]" in msg
    assert all(published_versions(repo / m) == [1] for m in MODEL_NAMES)


def test_recsys_export_cli(tiny_repository, tiny_artifacts, tmp_path, capsys):
    repo = shutil.copytree(tiny_repository, tmp_path / "repo")
    artifacts = shutil.copytree(tiny_artifacts, tmp_path / "artifacts")
    argv = ["export", "--artifacts", str(artifacts), "--repo", str(repo), "--tree-implementation", "tree_trav", "--quiet"]
    assert main(argv) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["version"] == 2 and out["tree_implementation"] == "tree_trav"
    # the FAISS bundle is built beside the artifacts, outside the Triton repository
    assert out["faiss"]["default"] in {r["kind"] for r in out["faiss"]["results"]}
    assert (artifacts / "faiss" / "index.json").exists() and (artifacts / "faiss" / "report.md").exists()
    assert not any(p.name == "faiss" for p in repo.iterdir())
    bad = repo / "user_tower" / "config.pbtxt"
    bad.write_text(bad.read_text().replace("dims: [ 3 ]", "dims: [ 4 ]"))
    assert main([*argv, "--skip-index"]) == 1
    err = capsys.readouterr().err
    assert "recsys: error:" in err and "user_tower (config.pbtxt): input 'demographics' dims [4] in config, [3] in ONNX" in err
    assert published_versions(repo / "user_tower") == [1, 2]


def test_missing_artifacts_exit_1(tmp_path, capsys):
    assert main(["export", "--artifacts", str(tmp_path / "none"), "--repo", str(tmp_path / "repo")]) == 1
    assert "recsys train" in capsys.readouterr().err
