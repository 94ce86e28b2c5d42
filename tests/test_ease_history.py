"""benchmarks.ease_history: its EASE helpers against the served table and one tiny run (structure, not quality)."""

from __future__ import annotations

import math

import numpy as np

from benchmarks import ease_history as eh
from export.features import ease_factors, ease_tables
from export.history import Histories
from export.pipeline import TrainSettings
from export.ranker import RankerConfig
from export.synth import SynthSpec, synthesize
from export.two_tower import TwoTowerConfig


def _histories(n_users: int = 60, n_items: int = 40, per_user: int = 12, seed: int = 0) -> Histories:
    rng = np.random.default_rng(seed)
    items = np.concatenate([rng.choice(n_items, per_user, replace=False) for _ in range(n_users)])
    offsets = np.arange(0, n_users * per_user + 1, per_user)
    return Histories(
        user_ids=np.arange(n_users, dtype=np.int64),
        offsets=offsets.astype(np.int64),
        items=items.astype(np.int64),
        ratings=np.full(len(items), 4.0, np.float32),
        timestamps=np.arange(len(items), dtype=np.int64),
    )


def test_table_weights_hold_the_served_table_and_zeros_elsewhere():
    h = _histories()
    t = ease_tables(h, 40)
    items, weights = t.items, t.weights
    dense = eh.table_weights(h, 40)
    for row in range(40):
        keep = items[row] >= 0
        np.testing.assert_array_equal(dense[row, items[row][keep]], weights[row][keep])
        assert np.count_nonzero(dense[row]) <= keep.sum()


def test_factorised_weights_approximate_a_low_rank_matrix():
    rng = np.random.default_rng(1)
    b = (rng.normal(size=(30, 5)) @ rng.normal(size=(5, 30))).astype(np.float32)
    p, q = ease_factors(b, rank=5)
    assert p.shape == (31, 5) and q.shape == (31, 5)  # a last zero row for the padding
    np.testing.assert_allclose(p[:30] @ q[:30].T, b, atol=1e-3)
    assert not p[30].any() and not q[30].any()


def test_extra_columns_are_ease_scores_of_the_candidates_over_the_window():
    h = _histories()
    users = np.arange(5)
    cands = np.tile(np.arange(10), (5, 1))
    cands[0, -1] = -1
    b = eh.ease_weights(h, 40)
    cols = eh.extra_columns(h, b, users, cands, 0)
    hist, _ = h.last(users, 100)
    for i in range(5):
        expected = b[hist[i][hist[i] >= 0]].sum(axis=0)[np.where(cands[i] >= 0, cands[i], 0)]
        np.testing.assert_allclose(cols["dense"][i], expected, rtol=1e-5, atol=1e-6)
    # the rank-64 factorisation of a 40-item B keeps 39 of its 40 singular values: close to dense
    assert np.corrcoef(cols["dense"].ravel(), cols[f"rank{eh.RANK}"].ravel())[0, 1] > 0.99


def test_a_tiny_run_reports_every_row_with_finite_figures(tmp_path):
    synthesize(SynthSpec(users=300, items=150, ratings=6000, seed=5, span_days=10), tmp_path, progress=False)
    settings = TrainSettings(
        two_tower=TwoTowerConfig(dim=16, hidden=32, history_len=10, epochs=2, batch_size=64, patience=2, lr=5e-3),
        ranker=RankerConfig(candidates=30, n_estimators=20, min_child_samples=5),
    )
    report = eh.measure(str(tmp_path), 2, 0, settings)
    assert set(report["ease_alone"]) == {f"{w}/{n or 'all'}" for w in ("dense", f"table{eh.EASE_NEIGHBOURS}") for n in eh.WINDOWS}
    assert set(eh.VARIANTS) <= set(report["ranker"])
    shipped = report["ranker"][eh.SHIPPED]["vs_shipped"]
    assert shipped["mean_diff"] == 0.0 and shipped["users"] == report["pairs"] > 0
    values = [*report["ease_alone"].values(), *(v["ndcg@10"] for v in report["ranker"].values())]
    assert all(math.isfinite(v) and 0.0 <= v <= 1.0 for v in values)
    assert all(len(v) == 2 for v in report["per_window"].values())
    assert "| ranker |" in eh.tables(report)
