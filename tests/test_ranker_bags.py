"""The ranker's booster: K boosters of different seeds served as one, and the linear base term it boosts from."""

from __future__ import annotations

import lightgbm as lgb
import numpy as np
import pytest

from export.ranker import RankerConfig, merge_boosters, split_linear_base, train_ranker, with_linear_base


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
        train_ranker(x, labels, RankerConfig(n_estimators=6, min_child_samples=5, base_feature=None, seed=s), [f"f{i}" for i in range(4)])
        for s in (3, 4, 5)
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
    bagged = train_ranker(x, labels, RankerConfig(n_estimators=12, bags=3, min_child_samples=5, base_feature=None, seed=7), names)
    members = [
        train_ranker(x, labels, RankerConfig(n_estimators=4, min_child_samples=5, base_feature=None, seed=7 + i), names) for i in range(3)
    ]
    assert bagged.num_trees() == 12
    np.testing.assert_allclose(bagged.predict(x), sum(m.predict(x) for m in members), rtol=0, atol=1e-9)
    # the members differ (bagging and feature sampling draw from the seed), so the bag averages something
    assert not np.allclose(members[0].predict(x), members[1].predict(x))


def test_merge_refuses_boosters_of_different_features():
    x, labels = _queries(2)
    a = train_ranker(x, labels, RankerConfig(n_estimators=2, min_child_samples=5, base_feature=None), [f"f{i}" for i in range(4)])
    b = train_ranker(
        x[:, :3].copy(), labels, RankerConfig(n_estimators=2, min_child_samples=5, base_feature=None), [f"f{i}" for i in range(3)]
    )
    with pytest.raises(ValueError, match="same features"):
        merge_boosters([a, b])
    with pytest.raises(ValueError, match="at least one"):
        merge_boosters([])


@pytest.mark.parametrize("bags", [0, 3])
def test_bags_must_divide_the_tree_count(bags):
    with pytest.raises(ValueError, match="bags"):
        RankerConfig(n_estimators=100, bags=bags)


NAMES = [f"f{i}" for i in range(4)]


def test_boosting_from_a_column_serves_the_column_inside_the_booster(tmp_path):
    x, labels = _queries(3)
    cfg = RankerConfig(n_estimators=6, min_child_samples=5, base_feature="f1", base_alpha=0.5)
    booster = train_ranker(x, labels, cfg, NAMES)
    trees, term = split_linear_base(booster)
    assert term is not None and term[0] == 1
    assert term[1] == pytest.approx(0.5 / float(x[:, 1].astype(np.float64).std()), rel=1e-12)
    assert booster.num_trees() == trees.num_trees() + 1 == 7
    # predict is the trees plus the term: what LightGBM's init_score leaves out is put back
    np.testing.assert_allclose(booster.predict(x), trees.predict(x) + term[1] * x[:, 1].astype(np.float64), rtol=0, atol=1e-12)
    # the trees learnt something else than from zero, and the file round trip keeps the term
    plain = train_ranker(x, labels, RankerConfig(n_estimators=6, min_child_samples=5, base_feature=None), NAMES)
    assert not np.allclose(trees.predict(x), plain.predict(x))
    booster.save_model(str(tmp_path / "ranker.lgb"))
    again = lgb.Booster(model_file=str(tmp_path / "ranker.lgb"))
    np.testing.assert_array_equal(again.predict(x), booster.predict(x))
    assert split_linear_base(again)[1] == term


def test_alpha_zero_is_the_plain_ranker_and_bags_carry_one_term():
    x, labels = _queries(4)
    zero = train_ranker(x, labels, RankerConfig(n_estimators=6, min_child_samples=5, base_feature="f0", base_alpha=0.0), NAMES)
    plain = train_ranker(x, labels, RankerConfig(n_estimators=6, min_child_samples=5, base_feature=None), NAMES)
    assert zero.model_to_string() == plain.model_to_string() and split_linear_base(plain) == (plain, None)
    bagged = train_ranker(x, labels, RankerConfig(n_estimators=6, bags=3, min_child_samples=5, base_feature="f0"), NAMES)
    trees, term = split_linear_base(bagged)
    assert bagged.num_trees() == 7 and trees.num_trees() == 6 and term is not None and term[0] == 0


def test_a_bad_base_is_refused_by_name():
    x, labels = _queries(5)
    with pytest.raises(ValueError, match="'rating' is not a ranker feature"):
        train_ranker(x, labels, RankerConfig(n_estimators=2, min_child_samples=5, base_feature="rating"), NAMES)
    with pytest.raises(ValueError, match="base_alpha"):
        RankerConfig(base_alpha=-1.0)


def test_split_refuses_a_booster_with_two_linear_terms():
    x, labels = _queries(6)
    booster = train_ranker(x, labels, RankerConfig(n_estimators=2, min_child_samples=5, base_feature="f1"), NAMES)
    with pytest.raises(ValueError, match="only a last one-leaf linear tree"):
        split_linear_base(with_linear_base(booster, 0, 1.0))
