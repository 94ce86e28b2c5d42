"""Rolling-origin evaluation: window boundaries, no leakage from a window's future, pooling,
the paired bootstrap and the report's JSON shape."""

from __future__ import annotations

import json
from dataclasses import replace

import numpy as np
import pandas as pd
import pytest

from export.data import load_movielens
from export.evaluate import (
    MODEL_NAMES,
    EvalSettings,
    bootstrap_diff,
    evaluate,
    evaluate_window,
    pool_metrics,
)
from export.ranking_metrics import evaluate_rankings
from export.pipeline import TrainSettings, fit_models
from export.ranker import RankerConfig
from export.split import rolling_splits, time_split
from export.synth import SynthSpec, synthesize
from export.two_tower import TwoTowerConfig

TINY = TrainSettings(
    two_tower=TwoTowerConfig(dim=16, hidden=32, history_len=10, epochs=2, batch_size=64, patience=2, lr=5e-3),
    ranker=RankerConfig(candidates=30, n_estimators=20, min_child_samples=5),
)
SETTINGS = EvalSettings(train=TINY, mmr_sweep=(1.0, 0.5), bootstrap_samples=300)


def _frame(n: int = 1000) -> pd.DataFrame:
    rng = np.random.default_rng(0)
    return pd.DataFrame(
        {
            "user_id": rng.integers(1, 50, n),
            "movie_id": rng.integers(1, 80, n),
            "rating": rng.integers(1, 6, n).astype(float),
            "timestamp": rng.permutation(np.arange(10_000, 10_000 + n)),
        }
    )


def test_windows_are_consecutive_slices_and_nothing_later_leaks():
    ratings = _frame()
    splits = rolling_splits(ratings, 3, 0.1, 0.1)
    assert len(splits) == 3
    for k, s in enumerate(splits):
        assert s.train.timestamp.max() < s.t_val <= s.val.timestamp.min()
        assert s.val.timestamp.max() < s.t_test <= s.test.timestamp.min()
        if k < 2:
            # the window stops at its test end: no later row in any of its periods
            assert s.t_end == splits[k + 1].t_test
            assert max(s.train.timestamp.max(), s.val.timestamp.max(), s.test.timestamp.max()) < s.t_end
            # its validation period is the previous window's test period
        if k > 0:
            assert s.t_val == splits[k - 1].t_test
            pd.testing.assert_frame_equal(s.val, splits[k - 1].test)
        assert len(s.test) == pytest.approx(100, abs=1)
        assert len(s.val) == pytest.approx(100, abs=1)
        # training is everything before validation
        assert len(s.train) == (ratings.timestamp < s.t_val).sum()
    assert splits[-1].t_end is None
    tests = pd.concat([s.test for s in splits])
    assert tests.timestamp.is_unique and len(tests) == (ratings.timestamp >= splits[0].t_test).sum()
    last, single = splits[-1], time_split(ratings, 0.1, 0.1)
    assert (last.t_val, last.t_test, len(last.test)) == (single.t_val, single.t_test, len(single.test))
    assert splits[0].protocol()["test_ends"] == splits[1].protocol()["test_starts"]


def test_rolling_splits_reject_bad_arguments():
    ratings = _frame()
    with pytest.raises(ValueError, match="windows must be a positive integer"):
        rolling_splits(ratings, 0)
    with pytest.raises(ValueError, match="no training data"):
        rolling_splits(ratings, 9, 0.1, 0.1)
    with pytest.raises(ValueError, match="empty"):
        rolling_splits(ratings.assign(timestamp=5), 2)


def test_pooling_is_the_mean_over_user_window_pairs():
    rng = np.random.default_rng(1)
    n_items = 40
    ranked = np.stack([rng.permutation(n_items)[:20] for _ in range(30)])
    relevant = [np.unique(rng.integers(0, n_items, rng.integers(1, 5))) for _ in range(30)]
    whole = evaluate_rankings(ranked, relevant, n_items=n_items, ks=(10, 20))
    parts = [(0, 7), (7, 30)]  # two "windows" of different sizes
    windows = [evaluate_rankings(ranked[a:b], relevant[a:b], n_items=n_items, ks=(10, 20)) for a, b in parts]
    pooled = pool_metrics(windows, [b - a for a, b in parts])
    for key in ("ndcg@10", "recall@20", "map@10", "mrr", "precision@10"):
        assert pooled[key] == pytest.approx(whole[key]), key
    # coverage is catalogue-level: the mean of the windows' coverages
    assert pooled["coverage@10"] == pytest.approx(np.mean([w["coverage@10"] for w in windows]))


def test_bootstrap_interval_brackets_the_mean_and_narrows_with_more_pairs():
    rng = np.random.default_rng(2)
    small = rng.normal(0.05, 0.2, 50)
    big = rng.normal(0.05, 0.2, 2000)
    a, b = bootstrap_diff(small), bootstrap_diff(big)
    for r, d in ((a, small), (b, big)):
        assert r["ci95_low"] < r["mean_diff"] < r["ci95_high"]
        assert r["mean_diff"] == pytest.approx(d.mean())
        assert r["users"] == len(d)
    assert b["ci95_high"] - b["ci95_low"] < (a["ci95_high"] - a["ci95_low"]) / 3
    assert b["ci95_low"] > 0  # 2000 pairs resolve a 0.05 gain at this noise
    zero = bootstrap_diff(np.zeros(10))
    assert zero == {"mean_diff": 0.0, "ci95_low": 0.0, "ci95_high": 0.0, "users": 10}


@pytest.fixture(scope="module")
def tiny_data(tmp_path_factory):
    out = tmp_path_factory.mktemp("synth_windows")
    synthesize(SynthSpec(users=300, items=150, ratings=6000, seed=5, span_days=10), out, progress=False)
    return out


def test_a_window_ignores_everything_after_its_test_period(tiny_data):
    """Scrambling the ratings of the last window leaves the first window's result unchanged."""
    ml = load_movielens(tiny_data, progress=False)
    first = rolling_splits(ml.ratings, 2, 0.1, 0.1)[0]
    later = (ml.ratings.timestamp >= first.t_end).to_numpy()
    rng = np.random.default_rng(3)
    scrambled = ml.ratings.copy()
    scrambled.loc[later, "rating"] = rng.permutation(scrambled.loc[later, "rating"].to_numpy())
    scrambled.loc[later, "movie_id"] = rng.permutation(scrambled.loc[later, "movie_id"].to_numpy())
    assert not scrambled.equals(ml.ratings)
    ml2 = replace(ml, ratings=scrambled)
    first2 = rolling_splits(ml2.ratings, 2, 0.1, 0.1)[0]
    assert (first2.t_val, first2.t_test, first2.t_end) == (first.t_val, first.t_test, first.t_end)

    results = []
    for data, split in ((ml, first), (ml2, first2)):
        fitted = fit_models(data, TINY, progress=False, split=split)
        assert fitted.test_period.past.timestamp.max() < split.t_test
        assert fitted.val_period.past.timestamp.max() < split.t_val
        results.append(evaluate_window(fitted, SETTINGS, progress=False))
    a, b = results
    assert a.entry["test_users"] == b.entry["test_users"]
    for name in MODEL_NAMES:
        np.testing.assert_allclose(a.ndcg[name], b.ndcg[name], err_msg=name)
        assert a.entry["models"][name] == pytest.approx(b.entry["models"][name]), name


def test_report_with_windows_has_the_issue_shape(tiny_data, tmp_path):
    out = tmp_path / "eval.json"
    report = evaluate(tiny_data, out, replace(SETTINGS, windows=2), progress=False)
    on_disk = json.loads(out.read_text())
    assert on_disk["protocol"]["windows"] == 2
    assert list(on_disk["models"]) == list(MODEL_NAMES)
    windows = on_disk["windows"]
    assert len(windows) == 2
    assert windows[0]["test_starts"] < windows[1]["test_starts"] and windows[0]["test_ends"] == windows[1]["test_starts"]
    pairs = sum(w["test_users"] for w in windows)
    assert on_disk["protocol"]["test_users"] == pairs
    others = [m for m in MODEL_NAMES if m != "two_tower_ranker"]
    assert set(on_disk["significance"]) == {f"two_tower_ranker - {m} ndcg@10" for m in others}
    for sig in on_disk["significance"].values():
        assert set(sig) == {"mean_diff", "ci95_low", "ci95_high", "users"} and sig["users"] == pairs
        assert sig["ci95_low"] <= sig["mean_diff"] <= sig["ci95_high"]
    for w in windows:
        assert set(w["models"]) == set(MODEL_NAMES)
        assert {"recall@200", "size"} <= set(w["candidates"]) and w["candidates"]["size"] == TINY.ranker.candidates
        assert 0 <= w["candidates"]["recall@200"] <= 1
        # the ranker only reorders its candidates: its recall is capped by theirs
        assert w["models"]["two_tower_ranker"]["recall@200"] == pytest.approx(w["candidates"]["recall@200"])
    for name, metrics in on_disk["models"].items():
        expected = sum(w["models"][name]["ndcg@10"] * w["test_users"] for w in windows) / pairs
        assert metrics["ndcg@10"] == pytest.approx(expected)
        assert "recall@200" in metrics
    cand = sum(w["candidates"]["recall@200"] * w["test_users"] for w in windows) / pairs
    assert on_disk["candidates"]["recall@200"] == pytest.approx(cand)
    assert len(on_disk["targets"]["ranker_vs_best_baseline_ndcg@10_per_window"]) == 2
    for png in (out.with_suffix(".png"), tmp_path / "eval.window1.png", tmp_path / "eval.window2.png"):
        assert png.stat().st_size > 10_000, png
    assert report["windows"][1]["test_ends"] is None
