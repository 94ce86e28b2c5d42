"""Tests for the re-rankers of benchmarks.diversity_frontier (the served one is tested in test_mmr)."""

from __future__ import annotations

import numpy as np
import pytest

from benchmarks.diversity_frontier import _unit, dpp, label_free_choice, mmr, mmr_unscaled, pareto, strength_dcg
from export.ranking_metrics import intra_list_diversity
from orchestrator.mmr import mmr_rerank


def _clustered(seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    # scores best first (as the pool is); the 12 best share one genre, the rest spread
    rng = np.random.default_rng(seed)
    sc = np.linspace(2.0, 0.0, 40)
    vecs = np.concatenate([np.tile(np.eye(6)[0], (12, 1)), np.eye(6)[1 + rng.integers(0, 5, 28)]])
    return sc, _unit(vecs)


def test_keep_one_is_the_served_code() -> None:
    rng = np.random.default_rng(1)
    sc, unit = np.sort(rng.normal(size=30))[::-1], _unit(rng.normal(size=(30, 5)))
    for penalty in ("max", "sum", "mean"):
        np.testing.assert_array_equal(mmr(0.7, penalty)(sc, unit), mmr_rerank(sc, unit, k=10, lam=0.7, penalty=penalty))


@pytest.mark.parametrize("penalty", ["max", "sum", "mean"])
def test_keep_two_keeps_the_top_and_then_diversifies(penalty: str) -> None:
    sc, unit = _clustered()
    out = mmr(0.5, penalty, keep=2)(sc, unit)
    assert out[:2].tolist() == [0, 1]
    assert len(set(out.tolist())) == 10
    assert intra_list_diversity(out, unit) > 0.4
    np.testing.assert_array_equal(mmr(1.0, penalty, keep=2)(sc, unit), np.arange(10))


def test_dpp_diversifies_and_follows_relevance_when_alpha_is_large() -> None:
    sc, unit = _clustered()
    diverse = dpp(1.0, 0.001)(sc, unit)
    assert diverse[0] == 0 and len(set(diverse.tolist())) == 10
    assert intra_list_diversity(diverse, unit) > 0.5
    # quality dominates: exp(200 * r) swamps any determinant ratio
    np.testing.assert_array_equal(dpp(200.0, 0.1)(sc, unit), np.arange(10))


def test_pareto_keeps_only_undominated_points() -> None:
    rows = [{"k": (-1.0, 10.0)}, {"k": (-2.0, 9.0)}, {"k": (-3.0, 15.0)}, {"k": (0.5, 2.0)}]
    assert [r["k"] for r in pareto(rows, "k")] == [(0.5, 2.0), (-1.0, 10.0), (-3.0, 15.0)]


@pytest.mark.parametrize("discount", [False, True])
def test_unscaled_mmr_weighs_raw_score_gaps_against_similarity(discount: bool) -> None:
    sc, unit = _clustered()
    # no penalty: the ranker's order
    np.testing.assert_array_equal(mmr_unscaled(0.0, discount)(sc, unit), np.arange(10))
    diverse = mmr_unscaled(0.5, discount)(sc, unit)
    assert diverse[0] == 0 and len(set(diverse.tolist())) == 10
    assert intra_list_diversity(diverse, unit) > intra_list_diversity(np.arange(10), unit)
    # the same scores ten times further apart: the ranker is surer, so the list moves less
    sure = mmr_unscaled(0.5, discount)(10 * sc, unit)
    assert intra_list_diversity(sure, unit) <= intra_list_diversity(diverse, unit)
    # the discount makes lower positions cheaper to diversify: at least as diverse for one beta
    if discount:
        assert intra_list_diversity(diverse, unit) >= intra_list_diversity(mmr_unscaled(0.5)(sc, unit), unit)


def test_strength_dcg_is_largest_for_the_rankers_order_and_needs_no_labels() -> None:
    items = np.array([[5, 3, 9, 1, 7, 2, 8, 0, 4, 6, 11, -1]])
    scores = np.concatenate([np.linspace(3.0, 0.0, 11), [-np.inf]])[None, :]
    w = {"ranked": items, "scores": scores}
    own = strength_dcg(w, items[:, :10])
    strength = np.exp(scores[0, :11] - 3.0)
    expected = float((strength[:10] / strength.sum() / np.log2(np.arange(2, 12))).sum())
    assert own[0] == pytest.approx(expected, rel=1e-12)
    # any other list of the candidates keeps less; an item outside them (or padding) adds nothing
    assert strength_dcg(w, items[:, 1:11])[0] < own[0]
    assert strength_dcg(w, np.array([[99, -1, -1, -1, -1, -1, -1, -1, -1, -1]]))[0] == 0.0


def test_label_free_choice_takes_the_served_point_that_keeps_most_among_those_reaching_the_target() -> None:
    def row(method: str, ild: float, strength: float) -> dict:
        return {"method": method, "all": (-9.9, ild), "strength": strength}

    rows = [row("mmr-sum", 25.0, -6.0), row("mmr-sum", 21.0, -3.0), row("mmr-max", 19.0, -1.0), row("dpp", 30.0, -0.5)]
    assert label_free_choice(rows) is rows[1]  # dpp is not served, 19 % is short of 20 %
    assert label_free_choice(rows, target=40.0) is None
