"""Tiny end-to-end runs of the offline pipeline on synthetic data with planted structure."""

import json
from dataclasses import replace
from pathlib import Path

import lightgbm as lgb
import numpy as np
import pytest
import torch

from clients.cli import main
from export.data import load_movielens
from export.evaluate import MODEL_NAMES, EvalSettings, evaluate
from export.pipeline import TrainSettings, fit_models, retrieve, users_with_history
from export.ranker import RankerConfig
from export.split import relevant_items
from export.synth import SynthSpec, synthesize
from export.two_tower import TwoTowerConfig

TINY_TT = TwoTowerConfig(dim=16, hidden=32, history_len=10, epochs=6, batch_size=64, patience=6, lr=5e-3)
TINY = TrainSettings(two_tower=TINY_TT, ranker=RankerConfig(candidates=30, n_estimators=20, min_child_samples=5))


@pytest.fixture(scope="module")
def tiny_data(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("synth")
    synthesize(SynthSpec(users=300, items=150, ratings=5000, seed=3, span_days=10), out, progress=False)
    return out


@pytest.fixture(scope="module")
def fitted(tiny_data):
    return fit_models(load_movielens(tiny_data, progress=False), TINY, progress=False)


def test_two_tower_loss_goes_down(fitted):
    log = fitted.two_tower_val.history
    assert len(log) >= 3
    assert log[-1]["loss"] < log[0]["loss"]
    assert all(np.isfinite(e["val_recall@100"]) for e in log)


def test_two_tower_beats_random(fitted):
    """Recall@10 of the two-tower on test users vs the expected recall of a random ranking."""
    period = fitted.test_period
    rel = relevant_items(fitted.split.test, fitted.catalog.index_of())
    users = users_with_history(rel, period)
    assert len(users) >= 10
    items, _, _, _ = retrieve(fitted.two_tower.model, period, fitted.demographics, users, 10)
    recall = np.mean([np.isin(rel[u], row).sum() / len(rel[u]) for u, row in zip(users, items)])
    seen = period.histories.seen(users)
    random_recall = np.mean([10 / (fitted.catalog.n_items - len(s)) for s in seen])
    assert recall > 1.5 * random_recall, (recall, random_recall)


def test_training_is_reproducible(tiny_data):
    ml = load_movielens(tiny_data, progress=False)
    settings = replace(TINY, two_tower=replace(TINY_TT, epochs=2), refit=False)
    a = fit_models(ml, settings, progress=False)
    b = fit_models(ml, settings, progress=False)
    for key, value in a.two_tower.model.state_dict().items():
        torch.testing.assert_close(value, b.two_tower.model.state_dict()[key], rtol=0, atol=0)
    assert a.ranker.model_to_string() == b.ranker.model_to_string()


def test_new_user_with_a_few_ratings_gets_a_personal_embedding(fitted):
    model = fitted.two_tower.model
    L = model.config.history_len
    empty = np.full((1, L), -1)
    a = empty.copy()
    a[0, -3:] = [0, 1, 2]
    b = empty.copy()
    b[0, -3:] = [40, 41, 42]
    vecs = model.user_vectors(np.concatenate([empty, a, b]), np.zeros((3, L), np.float32), np.zeros((3, 3), np.int64))
    assert np.isfinite(vecs).all()
    np.testing.assert_allclose(np.linalg.norm(vecs, axis=1), 1.0, atol=1e-5)
    assert not np.allclose(vecs[1], vecs[2])
    assert not np.allclose(vecs[0], vecs[1])


def test_recsys_train_writes_artifacts_and_manifest(tiny_data, tmp_path):
    out = tmp_path / "artifacts"
    assert main(["train", "--data", str(tiny_data), "--out", str(out), "--epochs", "2", "--quiet"]) == 0
    manifest = json.loads((out / "manifest.json").read_text())
    for name in ("two_tower.pt", "ranker.lgb", "ranker_features.pt", "items.parquet", "item_embeddings.npy"):
        assert (out / name).exists(), name
        assert name in manifest["files"]
    assert len(manifest["data"]["sha256"]) == 64
    assert manifest["two_tower"]["config"]["epochs"] == 2
    assert manifest["packages"]["torch"].startswith("2.13")
    assert "git_sha" in manifest and "split" in manifest
    booster = lgb.Booster(model_file=str(out / "ranker.lgb"))
    assert booster.num_trees() == manifest["ranker"]["trees"]


def test_evaluate_report_shape(tiny_data, tmp_path):
    settings = EvalSettings(train=TINY, mmr_sweep=(1.0, 0.5))
    settings = replace(settings, train=replace(TINY, two_tower=replace(TINY_TT, epochs=2)))
    out = tmp_path / "eval.json"
    report = evaluate(tiny_data, out, settings, progress=False)
    on_disk = json.loads(out.read_text())
    assert list(on_disk["models"]) == list(MODEL_NAMES)
    assert out.with_suffix(".png").stat().st_size > 10_000
    for name, metrics in on_disk["models"].items():
        for key in (
            "ndcg@10",
            "recall@20",
            "recall@100",
            "map@10",
            "precision@10",
            "hitrate@10",
            "mrr",
            "coverage@10",
            "ild@10",
            "novelty@10",
        ):
            assert 0.0 <= metrics[key] or key == "novelty@10", (name, key)
            assert np.isfinite(metrics[key])
    for key in ("val_starts", "test_starts", "test_users", "items", "relevance"):
        assert key in on_disk["protocol"]
    others = [m for m in MODEL_NAMES if m != "two_tower_ranker"]
    assert set(on_disk["significance"]) == {f"two_tower_ranker - {m} ndcg@10" for m in others}
    assert on_disk["protocol"]["windows"] == 1 and len(on_disk["windows"]) == 1
    # MMR at lambda=1 is the ranker's own order
    assert report["mmr_sweep"]["1"]["ndcg@10"] == pytest.approx(report["models"]["two_tower_ranker"]["ndcg@10"])


def test_cli_usage_errors_exit_2(capsys):
    with pytest.raises(SystemExit) as exc:
        main(["train", "--epochs", "not-a-number"])
    assert exc.value.code == 2


def test_cli_bad_data_exits_1(tmp_path, capsys):
    (tmp_path / "ratings.csv").write_text("userId,movieId,rating\n1,2,3\n")
    (tmp_path / "movies.csv").write_text("movieId,title,genres\n2,X (1999),Drama\n")
    assert main(["train", "--data", str(tmp_path), "--out", str(tmp_path / "a"), "--quiet"]) == 1
    assert "timestamp" in capsys.readouterr().err


def test_paired_bootstrap_brackets_the_difference():
    from export.evaluate import paired_bootstrap

    relevant = [np.array([0]), np.array([1]), np.array([2]), np.array([3])]
    good = np.array([[0, 9], [1, 9], [2, 9], [3, 9]])
    bad = np.array([[9, 0], [9, 8], [9, 8], [9, 8]])
    same = paired_bootstrap(good, good, relevant, k=2)
    assert same["mean_diff"] == 0 and same["ci95_low"] == 0 and same["ci95_high"] == 0
    better = paired_bootstrap(good, bad, relevant, k=2)
    # per-user gains: 1 - 1/log2(3), 1, 1, 1
    assert better["mean_diff"] == pytest.approx((1 - 1 / np.log2(3) + 3) / 4)
    assert 0 < better["ci95_low"] <= better["mean_diff"] <= better["ci95_high"] <= 1
