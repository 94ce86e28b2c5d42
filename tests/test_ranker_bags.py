"""The bagged LambdaRank ranker: K boosters of different seeds served as one booster."""

from __future__ import annotations

import lightgbm as lgb
import numpy as np
import pytest

from export.ranker import RankerConfig, merge_boosters, train_ranker


def _queries(seed: int = 0, users: int = 60, cands: int = 20, n_features: int = 4):
    rng = np.random.default_rng(seed)
    x = rng.random((users * cands, n_features)).astype(np.float32)
    # relevance follows two of the features, with noise, so the trees have something to learn
    signal = x[:, 0] + 0.5 * x[:, 1] + 0.3 * rng.random(len(x))
    labels = np.digitize(signal, [1.0, 1.4]).reshape(users, cands).astype(np.int32)
    return x, labels


def test_merged_booster_predicts_the_sum_of_its_members():
    x, labels = _queries()
    members = [
        train_ranker(x, labels, RankerConfig(n_estimators=6, min_child_samples=5, seed=s), [f"f{i}" for i in range(4)]) for s in (3, 4, 5)
    ]
    merged = merge_boosters(members)
    assert merged.num_trees() == 18
    np.testing.assert_allclose(merged.predict(x), sum(m.predict(x) for m in members), rtol=0, atol=1e-9)
    # it survives the round trip through the text file the artifacts hold
    again = lgb.Booster(model_str=merged.model_to_string())
    np.testing.assert_array_equal(again.predict(x), merged.predict(x))
    assert merged.feature_name() == members[0].feature_name()


def test_bagged_config_trains_members_with_consecutive_seeds():
    x, labels = _queries(1)
    names = [f"f{i}" for i in range(4)]
    bagged = train_ranker(x, labels, RankerConfig(n_estimators=12, bags=3, min_child_samples=5, seed=7), names)
    members = [train_ranker(x, labels, RankerConfig(n_estimators=4, min_child_samples=5, seed=7 + i), names) for i in range(3)]
    assert bagged.num_trees() == 12
    np.testing.assert_allclose(bagged.predict(x), sum(m.predict(x) for m in members), rtol=0, atol=1e-9)
    # the members differ (bagging and feature sampling draw from the seed), so the bag averages something
    assert not np.allclose(members[0].predict(x), members[1].predict(x))


def test_merge_refuses_boosters_of_different_features():
    x, labels = _queries(2)
    a = train_ranker(x, labels, RankerConfig(n_estimators=2, min_child_samples=5), [f"f{i}" for i in range(4)])
    b = train_ranker(x[:, :3].copy(), labels, RankerConfig(n_estimators=2, min_child_samples=5), [f"f{i}" for i in range(3)])
    with pytest.raises(ValueError, match="same features"):
        merge_boosters([a, b])
    with pytest.raises(ValueError, match="at least one"):
        merge_boosters([])


@pytest.mark.parametrize("bags", [0, 3])
def test_bags_must_divide_the_tree_count(bags):
    with pytest.raises(ValueError, match="bags"):
        RankerConfig(n_estimators=100, bags=bags)
