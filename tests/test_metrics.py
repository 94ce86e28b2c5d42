"""Tests for export.ranking_metrics: hand-computed cases, edge cases, and agreement of
the vectorised evaluate_rankings with the per-user definitions."""

from __future__ import annotations

import math

import numpy as np
import pytest

from export.ranking_metrics import (
    average_precision_at_k,
    catalog_coverage,
    evaluate_rankings,
    hit_rate_at_k,
    intra_list_diversity,
    ndcg_at_k,
    novelty,
    precision_at_k,
    recall_at_k,
    reciprocal_rank,
)

L2_3 = math.log2(3)
L2_5 = math.log2(5)

# The running example: hits at ranks 2 (item 1) and 4 (item 5); item 7 is missed.
RANKED = np.array([3, 1, 4, 5, 9])
RELEVANT = np.array([1, 5, 7])


class TestHandComputed:
    def test_recall(self) -> None:
        assert recall_at_k(RANKED, RELEVANT, 5) == pytest.approx(2 / 3)  # 2 hits / |R|=3
        assert recall_at_k(RANKED, RELEVANT, 3) == pytest.approx(1 / 3)  # only rank 2 in top-3
        assert recall_at_k(RANKED, RELEVANT, 1) == 0.0  # item 3 is not relevant

    def test_precision(self) -> None:
        assert precision_at_k(RANKED, RELEVANT, 5) == pytest.approx(2 / 5)  # 2 hits / k=5
        assert precision_at_k(RANKED, RELEVANT, 2) == pytest.approx(1 / 2)  # 1 hit / k=2

    def test_ndcg(self) -> None:
        # DCG = 1/log2(2+1) + 1/log2(4+1); IDCG over min(3,5)=3 hits = 1/log2 2 + 1/log2 3 + 1/log2 4
        expected5 = (1 / L2_3 + 1 / L2_5) / (1 + 1 / L2_3 + 1 / 2)
        assert ndcg_at_k(RANKED, RELEVANT, 5) == pytest.approx(expected5)
        # k=2: DCG = 1/log2 3; IDCG over min(3,2)=2 hits = 1 + 1/log2 3
        expected2 = (1 / L2_3) / (1 + 1 / L2_3)
        assert ndcg_at_k(RANKED, RELEVANT, 2) == pytest.approx(expected2)
        assert ndcg_at_k(RANKED, RELEVANT, 1) == 0.0

    def test_average_precision(self) -> None:
        # hits at ranks 2, 4: P@2 = 1/2, P@4 = 2/4; divide by min(|R|=3, k=5) = 3
        assert average_precision_at_k(RANKED, RELEVANT, 5) == pytest.approx((1 / 2 + 2 / 4) / 3)
        # k=2: only the hit at rank 2 (P@2 = 1/2); divide by min(3, 2) = 2
        assert average_precision_at_k(RANKED, RELEVANT, 2) == pytest.approx((1 / 2) / 2)

    def test_reciprocal_rank(self) -> None:
        assert reciprocal_rank(RANKED, RELEVANT) == pytest.approx(1 / 2)  # first hit at rank 2

    def test_hit_rate(self) -> None:
        assert hit_rate_at_k(RANKED, RELEVANT, 5) == 1.0
        assert hit_rate_at_k(RANKED, RELEVANT, 1) == 0.0

    def test_perfect_list_with_more_relevant_than_k(self) -> None:
        # |R| = 4 > k = 2 and both top slots hit: nDCG and AP are normalised by
        # min(|R|, k) so they reach 1, while recall is capped at 2/4 by design.
        ranked, rel = np.array([0, 1, 2]), np.array([0, 1, 2, 3])
        assert ndcg_at_k(ranked, rel, 2) == pytest.approx(1.0)
        assert average_precision_at_k(ranked, rel, 2) == pytest.approx(1.0)
        assert recall_at_k(ranked, rel, 2) == pytest.approx(2 / 4)


class TestEdgeCases:
    def test_no_hits(self) -> None:
        ranked, rel = np.array([0, 2]), np.array([7])
        for fn in (recall_at_k, precision_at_k, ndcg_at_k, average_precision_at_k, hit_rate_at_k):
            assert fn(ranked, rel, 2) == 0.0
        assert reciprocal_rank(ranked, rel) == 0.0

    def test_k_larger_than_list(self) -> None:
        # Missing slots beyond the list count as misses.
        ranked, rel = np.array([1, 2]), np.array([1, 3])
        assert recall_at_k(ranked, rel, 5) == pytest.approx(1 / 2)  # 1 hit / |R|=2
        assert precision_at_k(ranked, rel, 5) == pytest.approx(1 / 5)  # 1 hit / k=5
        # DCG = 1/log2 2 = 1; IDCG over min(2,5)=2 hits = 1 + 1/log2 3
        assert ndcg_at_k(ranked, rel, 5) == pytest.approx(1 / (1 + 1 / L2_3))
        assert average_precision_at_k(ranked, rel, 5) == pytest.approx(1 / 2)  # P@1=1, / min(2,5)
        assert hit_rate_at_k(ranked, rel, 5) == 1.0

    def test_padding_occupies_rank_but_never_hits(self) -> None:
        ranked, rel = np.array([-1, 1, -1, 3]), np.array([1, 3])
        assert recall_at_k(ranked, rel, 4) == pytest.approx(1.0)  # 2 / 2
        assert precision_at_k(ranked, rel, 4) == pytest.approx(2 / 4)
        # hits at ranks 2 and 4; IDCG over min(2,4)=2 hits
        assert ndcg_at_k(ranked, rel, 4) == pytest.approx((1 / L2_3 + 1 / L2_5) / (1 + 1 / L2_3))
        assert average_precision_at_k(ranked, rel, 4) == pytest.approx((1 / 2 + 2 / 4) / 2)
        assert reciprocal_rank(ranked, rel) == pytest.approx(1 / 2)
        assert hit_rate_at_k(np.array([-1, -1]), rel, 2) == 0.0

    def test_relevant_is_a_set(self) -> None:
        # Duplicates in relevant are counted once: |R| = 2.
        assert recall_at_k(RANKED, np.array([1, 1, 5]), 5) == pytest.approx(1.0)

    def test_empty_relevant_scores_zero(self) -> None:
        empty = np.array([])  # float64 dtype: the natural spelling of "no items"
        for fn in (recall_at_k, precision_at_k, ndcg_at_k, average_precision_at_k, hit_rate_at_k):
            assert fn(RANKED, empty, 5) == 0.0
        assert reciprocal_rank(RANKED, empty) == 0.0

    def test_reciprocal_rank_searches_whole_list(self) -> None:
        assert reciprocal_rank(np.arange(100), np.array([99])) == pytest.approx(1 / 100)

    @pytest.mark.parametrize("k", [0, -1, 2.0, True])
    def test_bad_k(self, k: object) -> None:
        with pytest.raises(ValueError, match="k must be"):
            recall_at_k(RANKED, RELEVANT, k)  # type: ignore[arg-type]

    def test_bad_inputs(self) -> None:
        with pytest.raises(ValueError, match="integer"):
            recall_at_k(np.array([0.5, 1.0]), RELEVANT, 2)
        with pytest.raises(ValueError, match="repeats"):
            recall_at_k(np.array([1, 2, 1]), RELEVANT, 2)
        with pytest.raises(ValueError, match="padding"):
            recall_at_k(np.array([1, -2]), RELEVANT, 2)
        with pytest.raises(ValueError, match=">= 0"):
            recall_at_k(np.array([-1, 2]), np.array([-1]), 2)
        with pytest.raises(ValueError, match="1-D"):
            recall_at_k(np.array([[1, 2]]), RELEVANT, 2)
        # Repeated padding is fine.
        assert recall_at_k(np.array([1, -1, -1]), RELEVANT, 3) == pytest.approx(1 / 3)


class TestDiversityNoveltyCoverage:
    VECS = np.array([[1.0, 0.0], [0.0, 1.0], [3.0, 3.0], [0.0, 0.0]])

    def test_ild_hand(self) -> None:
        # cos(v0,v1)=0 -> 1; cos(v0,v2)=cos(v1,v2)=1/sqrt2 -> 1 - 1/sqrt2 each (norm of v2 irrelevant)
        expected = (1 + 2 * (1 - 1 / math.sqrt(2))) / 3  # = (3 - sqrt2) / 3
        assert intra_list_diversity(np.array([0, 1, 2]), self.VECS) == pytest.approx(expected)
        assert intra_list_diversity(np.array([2, 0, 1]), self.VECS) == pytest.approx(expected)

    def test_ild_zero_vector_and_short_lists(self) -> None:
        assert intra_list_diversity(np.array([0, 3]), self.VECS) == pytest.approx(1.0)  # cos 0 with zero vector
        assert intra_list_diversity(np.array([0]), self.VECS) == 0.0
        assert intra_list_diversity(np.array([], dtype=int), self.VECS) == 0.0
        assert intra_list_diversity(np.array([0, -1, 1]), self.VECS) == pytest.approx(1.0)  # padding ignored
        assert intra_list_diversity(np.array([1, -1]), self.VECS) == 0.0  # one real item

    def test_ild_matches_pairwise_definition(self) -> None:
        rng = np.random.default_rng(0)
        vecs = rng.normal(size=(30, 5))
        items = rng.choice(30, size=12, replace=False)
        unit = vecs[items] / np.linalg.norm(vecs[items], axis=1, keepdims=True)
        dists = [1 - unit[a] @ unit[b] for a in range(12) for b in range(a + 1, 12)]
        assert intra_list_diversity(items, vecs) == pytest.approx(np.mean(dists))

    def test_novelty_hand(self) -> None:
        counts = np.array([3, 0, 1])
        # add-one smoothing: p = (c + 1) / (4 + 3) = [4/7, 1/7, 2/7]
        expected = (-math.log2(4 / 7) - math.log2(1 / 7)) / 2
        assert novelty(np.array([0, 1]), counts) == pytest.approx(expected)
        assert novelty(np.array([1, -1]), counts) == pytest.approx(math.log2(7))  # padding ignored
        assert novelty(np.array([-1]), counts) == 0.0
        with pytest.raises(ValueError, match="non-negative"):
            novelty(np.array([0]), np.array([1, -1]))
        with pytest.raises(ValueError, match="n_items"):
            novelty(np.array([5]), counts)

    def test_coverage(self) -> None:
        lists = np.array([[0, 1, 2], [1, 3, -1]])
        assert catalog_coverage(lists, 10, 1) == pytest.approx(2 / 10)  # {0, 1}
        assert catalog_coverage(lists, 10, 2) == pytest.approx(3 / 10)  # {0, 1, 3}
        assert catalog_coverage(lists, 10, 3) == pytest.approx(4 / 10)  # {0, 1, 2, 3}; -1 ignored
        with pytest.raises(ValueError, match="n_items"):
            catalog_coverage(lists, 3, 3)


def _random_case(seed: int, n_users: int = 60, n_items: int = 40, width: int = 20):
    rng = np.random.default_rng(seed)
    ranked = np.stack([rng.choice(n_items, size=width, replace=False) for _ in range(n_users)])
    # Some users get padded tails (fewer candidates than the width).
    for u in range(0, n_users, 7):
        ranked[u, rng.integers(1, width) :] = -1
    relevant = [rng.choice(n_items, size=rng.integers(1, 15), replace=False) for _ in range(n_users)]
    return ranked, relevant, n_items


class TestEvaluateRankings:
    def test_key_set(self) -> None:
        ranked, relevant, n_items = _random_case(1)
        base = evaluate_rankings(ranked, relevant, n_items=n_items, ks=(5, 20))
        expected = {f"{m}@{k}" for m in ("recall", "precision", "ndcg", "map", "hitrate", "coverage") for k in (5, 20)}
        assert set(base) == expected | {"mrr"}
        full = evaluate_rankings(
            ranked,
            relevant,
            n_items=n_items,
            ks=(5, 20),
            item_vectors=np.ones((n_items, 3)),
            item_popularity=np.ones(n_items),
        )
        assert set(full) == set(base) | {"ild@5", "ild@20", "novelty@5", "novelty@20"}
        assert all(isinstance(v, float) for v in full.values())

    @pytest.mark.parametrize("seed", [0, 1, 2])
    def test_agrees_with_per_user_functions(self, seed: int) -> None:
        ranked, relevant, n_items = _random_case(seed)
        rng = np.random.default_rng(100 + seed)
        vecs = rng.normal(size=(n_items, 4))
        vecs[3] = 0.0  # exercise the zero-vector convention
        pop = rng.integers(0, 50, size=n_items)
        ks = (1, 5, 20)
        got = evaluate_rankings(ranked, relevant, n_items=n_items, ks=ks, item_vectors=vecs, item_popularity=pop)
        per_user = {
            "recall": recall_at_k,
            "precision": precision_at_k,
            "ndcg": ndcg_at_k,
            "map": average_precision_at_k,
            "hitrate": hit_rate_at_k,
        }
        for k in ks:
            for name, fn in per_user.items():
                want = np.mean([fn(r, rel, k) for r, rel in zip(ranked, relevant)])
                assert got[f"{name}@{k}"] == pytest.approx(want, abs=1e-12), (name, k)
            assert got[f"coverage@{k}"] == pytest.approx(catalog_coverage(ranked, n_items, k))
            assert got[f"ild@{k}"] == pytest.approx(np.mean([intra_list_diversity(r[:k], vecs) for r in ranked]))
            assert got[f"novelty@{k}"] == pytest.approx(np.mean([novelty(r[:k], pop) for r in ranked]))
        assert got["mrr"] == pytest.approx(np.mean([reciprocal_rank(r, rel) for r, rel in zip(ranked, relevant)]))

    def test_empty_relevant_rejected(self) -> None:
        ranked, relevant, n_items = _random_case(0)
        relevant[5] = np.array([], dtype=int)
        with pytest.raises(ValueError, match="user 5 has no relevant items"):
            evaluate_rankings(ranked, relevant, n_items=n_items, ks=(5,))

    def test_malformed_inputs_rejected(self) -> None:
        ranked, relevant, n_items = _random_case(0, width=20)
        with pytest.raises(ValueError, match="max\\(ks\\)"):
            evaluate_rankings(ranked, relevant, n_items=n_items, ks=(10, 100))
        with pytest.raises(ValueError, match="entries"):
            evaluate_rankings(ranked, relevant[:-1], n_items=n_items, ks=(5,))
        with pytest.raises(ValueError, match="n_items"):
            evaluate_rankings(ranked, relevant, n_items=10, ks=(5,))
        bad_rel = list(relevant)
        bad_rel[0] = np.array([n_items])
        with pytest.raises(ValueError, match="relevant\\[0\\]"):
            evaluate_rankings(ranked, bad_rel, n_items=n_items, ks=(5,))
        dup = ranked.copy()
        dup[2, 1] = dup[2, 0]
        with pytest.raises(ValueError, match="row 2 repeats"):
            evaluate_rankings(dup, relevant, n_items=n_items, ks=(5,))
        with pytest.raises(ValueError, match="rows"):
            evaluate_rankings(ranked, relevant, n_items=n_items, ks=(5,), item_vectors=np.ones((3, 2)))

    def test_perfect_rankings(self) -> None:
        # Every user's relevant items fill the top of the list: all accuracy metrics are 1 at k=2.
        ranked = np.array([[0, 1, 2], [3, 4, 5]])
        relevant = [np.array([0, 1]), np.array([3, 4])]
        got = evaluate_rankings(ranked, relevant, n_items=6, ks=(2,))
        for key in ("recall@2", "precision@2", "ndcg@2", "map@2", "hitrate@2", "mrr"):
            assert got[key] == pytest.approx(1.0), key
        assert got["coverage@2"] == pytest.approx(4 / 6)  # {0, 1, 3, 4}

    def test_scales_to_thousands_of_users(self) -> None:
        # MovieLens-1M size at k=100 must stay well within the test budget.
        rng = np.random.default_rng(7)
        n_users, n_items = 6000, 3700
        # 37 * i mod 3700 is distinct for i < 100, so each row has 100 distinct items.
        ranked = (rng.integers(0, n_items, size=(n_users, 1)) + 37 * np.arange(100)) % n_items
        relevant = [rng.choice(n_items, size=20, replace=False) for _ in range(n_users)]
        got = evaluate_rankings(
            ranked,
            relevant,
            n_items=n_items,
            item_vectors=rng.normal(size=(n_items, 64)),
            item_popularity=rng.integers(0, 100, size=n_items),
        )
        assert 0.0 <= got["recall@100"] <= 1.0
        assert got["ild@100"] == pytest.approx(1.0, abs=0.05)  # random Gaussian vectors are near-orthogonal
