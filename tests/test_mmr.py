"""Tests for orchestrator.mmr.mmr_rerank."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp

from export.ranking_metrics import intra_list_diversity
from orchestrator.mmr import mmr_rerank

E1, E2, E3 = np.eye(3)


def test_lam_one_is_stable_top_k() -> None:
    rel = np.array([0.5, 0.9, 0.5, 0.9, 0.1])
    vecs = np.random.default_rng(0).normal(size=(5, 4))
    # Stable descending order: 1, 3 (both 0.9), then 0, 2 (both 0.5), then 4.
    np.testing.assert_array_equal(mmr_rerank(rel, vecs, k=4, lam=1.0), [1, 3, 0, 2])
    np.testing.assert_array_equal(mmr_rerank(rel, vecs, k=10, lam=1.0), [1, 3, 0, 2, 4])


def test_lam_zero_covers_identical_vector_clusters_first() -> None:
    # Cluster A (e1) is more relevant than cluster B (e2); input order is mixed.
    rel = np.array([1.0, 0.5, 0.9, 0.4, 0.8, 0.3])
    vecs = np.stack([E1, E2, E1, E2, E1, E2])
    out = mmr_rerank(rel, vecs, k=6, lam=0.0)
    # Pick 1 = most relevant (0, A). Pick 2: every A has max-sim 1, every B 0 -> best B (1).
    # From then on every remaining item has max-sim 1 with its own cluster, so all
    # scores tie at -1 and ties go to relevance order: 2, 4 (A), then 3, 5 (B).
    # (Standard max-sim MMR does not keep alternating once every cluster is covered.)
    np.testing.assert_array_equal(out, [0, 1, 2, 4, 3, 5])
    # With lam=1 the same input is pure relevance order: all of A before B.
    np.testing.assert_array_equal(mmr_rerank(rel, vecs, k=6, lam=1.0), [0, 2, 4, 1, 3, 5])


def test_lam_zero_one_pick_per_cluster() -> None:
    rel = np.array([1.0, 0.9, 0.8, 0.2, 0.1, 0.0])
    vecs = np.stack([E1, E1, E1, E2, E2, E3])
    # 0 first, then the best item orthogonal to e1 (3, via relevance tie-break over 3/4/5),
    # then the only item orthogonal to both (5).
    np.testing.assert_array_equal(mmr_rerank(rel, vecs, k=3, lam=0.0), [0, 3, 5])


def test_diversity_decreases_with_lam_on_constructed_case() -> None:
    # A0, A1, A2 share e1; B is e2; C is e3. Relevance already spans [0, 1],
    # so min-max scaling leaves it unchanged: r = [1, .95, .9, .5, 0].
    rel = np.array([1.0, 0.95, 0.9, 0.5, 0.0])
    vecs = np.stack([E1, E1, E1, E2, E3])
    expected = {
        # pick 2: A1 = 0 - 1 = -1, B = C = 0 -> B (more relevant); pick 3: A1 = -1, C = 0 -> C
        0.0: ([0, 3, 4], 1.0),
        # pick 2: A1 = .25*.95 - .75 = -.5125, B = .125, C = 0 -> B; pick 3: A1 -.5125 < C 0 -> C
        0.25: ([0, 3, 4], 1.0),
        # pick 2: A1 = .475 - .5 = -.025, B = .25 -> B; pick 3: A1 = -.025 < C = 0 -> C
        0.5: ([0, 3, 4], 1.0),
        # pick 2: A1 = .57 - .4 = .17, B = .3 -> B; pick 3: A1 = .17 > C = 0 -> A1.
        # ILD: (A0,B)=1, (A0,A1)=0, (B,A1)=1 -> 2/3
        0.6: ([0, 3, 1], 2 / 3),
        # pick 2: A1 = .7125 - .25 = .4625 > B = .375 -> A1; pick 3: A2 = .675 - .25 = .425 > B -> A2
        0.75: ([0, 1, 2], 0.0),
        1.0: ([0, 1, 2], 0.0),
    }
    ilds = []
    for lam, (order, ild) in expected.items():
        out = mmr_rerank(rel, vecs, k=3, lam=lam)
        np.testing.assert_array_equal(out, order, err_msg=f"lam={lam}")
        ilds.append(intra_list_diversity(out, vecs))
        assert ilds[-1] == pytest.approx(ild)
    assert all(a >= b - 1e-12 for a, b in zip(ilds, ilds[1:]))


def test_pool_restricts_candidates() -> None:
    rng = np.random.default_rng(1)
    rel = rng.normal(size=50)
    vecs = rng.normal(size=(50, 8))
    top5 = set(np.argsort(-rel, kind="stable")[:5].tolist())
    out = mmr_rerank(rel, vecs, k=10, lam=0.3, pool=5)
    assert len(out) == 5  # min(k, pool)
    assert set(out.tolist()) == top5
    out3 = mmr_rerank(rel, vecs, k=3, lam=0.3, pool=5)
    assert len(out3) == 3 and set(out3.tolist()) <= top5


def test_scale_invariance_of_relevance() -> None:
    rng = np.random.default_rng(2)
    rel = rng.permutation(20).astype(float)  # distinct, exactly representable
    vecs = rng.normal(size=(20, 4))
    base = mmr_rerank(rel, vecs, k=10, lam=0.4)
    np.testing.assert_array_equal(mmr_rerank(rel * 8.0 - 3.0, vecs, k=10, lam=0.4), base)
    # Vector norms do not matter either (cosine similarity).
    np.testing.assert_array_equal(mmr_rerank(rel, vecs * rng.uniform(0.5, 4, size=(20, 1)), k=10, lam=0.4), base)


def test_zero_vector_has_zero_similarity() -> None:
    rel = np.array([1.0, 0.9, 0.1])
    vecs = np.stack([E1, E1, np.zeros(3)])
    # After 0, item 1 has sim 1 and item 2 (zero vector) sim 0 -> 2 at lam=0.
    np.testing.assert_array_equal(mmr_rerank(rel, vecs, k=2, lam=0.0), [0, 2])


def test_constant_relevance() -> None:
    # All relevances equal -> scaled to 1; pure tie-break by index at lam=1.
    np.testing.assert_array_equal(mmr_rerank(np.full(4, 3.0), np.eye(4), k=4, lam=1.0), [0, 1, 2, 3])


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"relevance": np.ones((2, 2))}, "relevance must be 1-D"),
        ({"item_vectors": np.ones(3)}, "item_vectors must be 2-D"),
        ({"item_vectors": np.ones((4, 2))}, "4 rows but relevance has 3"),
        ({"relevance": np.array([1.0, np.nan, 0.0])}, "finite"),
        ({"item_vectors": np.array([[1.0, np.inf]] * 3)}, "finite"),
        ({"k": 0}, "k must be"),
        ({"k": 1.5}, "k must be"),
        ({"lam": -0.1}, "lam must be"),
        ({"lam": 1.1}, "lam must be"),
        ({"lam": float("nan")}, "lam must be"),
        ({"pool": 0}, "pool must be"),
    ],
)
def test_validation(kwargs: dict, match: str) -> None:
    args = {"relevance": np.array([0.3, 0.2, 0.1]), "item_vectors": np.eye(3), "k": 2, "lam": 0.5, "pool": None}
    args.update(kwargs)
    with pytest.raises(ValueError, match=match):
        mmr_rerank(**args)


@st.composite
def _cases(draw: st.DrawFn) -> tuple[np.ndarray, np.ndarray, int, float, int | None]:
    n = draw(st.integers(1, 25))
    d = draw(st.integers(1, 5))
    # Few distinct values so that relevance ties are common.
    rel = draw(hnp.arrays(np.float64, n, elements=st.sampled_from([-2.0, 0.0, 0.5, 1.0, 7.0]) | st.floats(-1e3, 1e3)))
    vecs = draw(hnp.arrays(np.float64, (n, d), elements=st.floats(-10, 10, allow_subnormal=False)))
    k = draw(st.integers(1, 30))
    lam = draw(st.floats(0.0, 1.0))
    pool = draw(st.none() | st.integers(1, 30))
    return rel, vecs, k, lam, pool


@settings(max_examples=200, deadline=None)
@given(_cases())
def test_property_unique_indices_of_right_length(case: tuple) -> None:
    rel, vecs, k, lam, pool = case
    out = mmr_rerank(rel, vecs, k=k, lam=lam, pool=pool)
    n = rel.size
    pool_n = n if pool is None else min(pool, n)
    assert out.dtype.kind == "i"
    assert len(out) == min(k, pool_n)
    assert len(np.unique(out)) == len(out)
    # Only pool members, and the first pick is always the most relevant one.
    stable = np.argsort(-rel, kind="stable")
    assert set(out.tolist()) <= set(stable[:pool_n].tolist())
    assert out[0] == stable[0]
    # lam = 1 is exactly the stable top-k.
    np.testing.assert_array_equal(mmr_rerank(rel, vecs, k=k, lam=1.0, pool=pool), stable[: min(k, pool_n)])


def test_blend_vectors_cosine_is_the_weighted_sum():
    from orchestrator.mmr import blend_vectors

    a = np.array([[1.0, 0.0], [0.0, 2.0]])  # cos(a0, a1) = 0
    g = np.array([[1.0, 1.0, 0.0], [1.0, 1.0, 0.0]])  # cos(g0, g1) = 1
    v = blend_vectors([a, g], [0.25, 0.75])
    np.testing.assert_allclose(np.linalg.norm(v, axis=1), 1.0, rtol=1e-6)
    assert float(v[0] @ v[1]) == pytest.approx(0.25 * 0 + 0.75 * 1)
    with pytest.raises(ValueError):
        blend_vectors([a, g], [0.5, 0.6])


def _reference(rel: np.ndarray, vecs: np.ndarray, k: int, lam: float, penalty: str) -> list[int]:
    """The greedy rule written out naively: each step recomputes every penalty from scratch."""
    order = list(np.argsort(-rel, kind="stable"))
    r = rel[order]
    r = (r - r.min()) / (r.max() - r.min()) if r.max() > r.min() else np.ones_like(r)
    unit = vecs[order] / np.linalg.norm(vecs[order], axis=1, keepdims=True)
    picked = [0]
    while len(picked) < min(k, len(order)):
        best, best_score = -1, -np.inf
        for i in range(len(order)):
            if i in picked:
                continue
            sims = [float(unit[i] @ unit[j]) for j in picked]
            pen = {"max": max(sims), "sum": sum(sims), "mean": sum(sims) / len(sims)}[penalty]
            score = lam * r[i] - (1 - lam) * pen
            if score > best_score + 1e-12:
                best, best_score = i, score
        picked.append(best)
    return [int(order[p]) for p in picked]


@pytest.mark.parametrize("penalty", ["max", "sum", "mean"])
@pytest.mark.parametrize("seed", range(4))
def test_penalties_match_the_naive_rule(penalty: str, seed: int) -> None:
    rng = np.random.default_rng(seed)
    rel = rng.normal(size=30)
    vecs = rng.normal(size=(30, 6))
    for lam in (0.0, 0.3, 0.7, 0.9, 1.0):
        out = mmr_rerank(rel, vecs, k=10, lam=lam, penalty=penalty)
        assert out.tolist() == _reference(rel, vecs, 10, lam, penalty), (penalty, lam)


def test_max_is_the_default_penalty() -> None:
    rng = np.random.default_rng(7)
    rel, vecs = rng.normal(size=40), rng.normal(size=(40, 5))
    for lam in (0.2, 0.7):
        np.testing.assert_array_equal(mmr_rerank(rel, vecs, k=10, lam=lam), mmr_rerank(rel, vecs, k=10, lam=lam, penalty="max"))


def test_sum_penalty_buys_more_ild_than_max() -> None:
    # A = e1, B = e2 are picked first; then C = e1 (max-sim 1, summed 1) against
    # D = (e1 + e2)/sqrt(2) (max-sim .71, summed 1.41): max picks D, sum picks C.
    # ILD {A, B, C} = 1 - (0 + 1 + 0)/3 = 2/3 > ILD {A, B, D} = 1 - (.71 + .71 + 0)/3.
    rel = np.array([1.0, 0.9, 0.8, 0.7])
    vecs = np.stack([E1, E2, E1, (E1 + E2) / np.sqrt(2)])
    by_max = mmr_rerank(rel, vecs, k=3, lam=0.0, penalty="max")
    by_sum = mmr_rerank(rel, vecs, k=3, lam=0.0, penalty="sum")
    np.testing.assert_array_equal(by_max, [0, 1, 3])
    np.testing.assert_array_equal(by_sum, [0, 1, 2])
    assert intra_list_diversity(by_sum, vecs) == pytest.approx(2 / 3)
    assert intra_list_diversity(by_sum, vecs) > intra_list_diversity(by_max, vecs) + 0.1


@pytest.mark.parametrize("penalty", ["sum", "mean"])
def test_sum_and_mean_diversify_clustered_candidates(penalty: str) -> None:
    # the 10 most relevant of 40 candidates all share one direction; 30 less relevant ones
    # spread over 5 others: relevance order has ILD 0, a diversifying re-ranker must not
    rng = np.random.default_rng(3)
    rel = np.concatenate([np.linspace(1.0, 0.9, 10), np.linspace(0.8, 0.5, 30)])
    vecs = np.concatenate([np.tile(np.eye(6)[0], (10, 1)), np.eye(6)[1 + rng.integers(0, 5, 30)]])
    plain = mmr_rerank(rel, vecs, k=10, lam=1.0, penalty=penalty)
    assert intra_list_diversity(plain, vecs) == pytest.approx(0.0)
    diverse = mmr_rerank(rel, vecs, k=10, lam=0.5, penalty=penalty)
    assert diverse[0] == 0
    assert intra_list_diversity(diverse, vecs) > 0.5


def test_unknown_penalty_is_rejected() -> None:
    with pytest.raises(ValueError, match="penalty"):
        mmr_rerank(np.ones(3), np.eye(3), k=2, lam=0.5, penalty="min")
