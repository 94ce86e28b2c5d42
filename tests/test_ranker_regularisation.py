"""benchmarks.ranker_regularisation: its grid, and one tiny run (structure, not quality)."""

from __future__ import annotations

import math

from benchmarks import ranker_regularisation as rr
from export.pipeline import TrainSettings
from export.ranker import RankerConfig
from export.synth import SynthSpec, synthesize
from export.two_tower import TwoTowerConfig


def test_grid_holds_one_config_per_seed_and_equal_cost_bags():
    base = RankerConfig(n_estimators=100)
    grid = rr.settings_grid(base, [50, 200], 3, [(5, 20, 0.25)])
    assert list(grid) == [
        "min_child_samples 50",
        "min_child_samples 200",
        "5 bags x 20 trees, lr 0.25, min_child_samples 50",
        "5 bags x 20 trees, lr 0.25, min_child_samples 200",
    ]
    assert [c.seed for c in grid["min_child_samples 200"]] == [0, 1, 2]
    assert {c.min_child_samples for c in grid["min_child_samples 200"]} == {200}
    bagged = grid["5 bags x 20 trees, lr 0.25, min_child_samples 50"]
    # seeds of different rows' bags never overlap (bag i uses seed, seed + 1, ..., seed + 4)
    assert [c.seed for c in bagged] == [0, 5, 10]
    assert all(c.bags == 5 and c.n_estimators == 100 and c.learning_rate == 0.25 for c in bagged)


def test_grid_sampling_rows_change_only_the_sampling():
    base = RankerConfig(n_estimators=100, subsample=0.8, colsample=0.8)
    grid = rr.settings_grid(base, [400], 2, [], sample=[1.0])
    assert list(grid) == ["min_child_samples 400", "sampling 1, min_child_samples 400"]
    unsampled = grid["sampling 1, min_child_samples 400"]
    assert all(c.subsample == c.colsample == 1.0 and c.min_child_samples == 400 for c in unsampled)
    assert [c.seed for c in unsampled] == [0, 1]


def test_a_tiny_run_reports_every_row_with_finite_figures(tmp_path):
    synthesize(SynthSpec(users=300, items=150, ratings=6000, seed=5, span_days=10), tmp_path, progress=False)
    base = RankerConfig(candidates=30, n_estimators=20, min_child_samples=5, base_feature=None)
    settings = TrainSettings(
        two_tower=TwoTowerConfig(dim=16, hidden=32, history_len=10, epochs=2, batch_size=64, patience=2, lr=5e-3), ranker=base
    )
    grid = rr.settings_grid(base, [5, 20], 2, [(2, 10, 0.1)])
    boosted = rr.init_rows(base, [("ease_score", 0.0), ("ease_score", 1.0), (None, 0.0)], 2)
    report = rr.measure(str(tmp_path), 2, grid | boosted, settings)
    assert set(report["rows"]) == set(grid) | set(boosted)
    # boosting from zero times a column is the plain ranker, seed for seed; from one times it is not
    rows = report["rows"]
    assert rows["boosted from ease_score x 0"]["seeds"] == rows["boosted from zero"]["seeds"] == rows["min_child_samples 5"]["seeds"]
    assert rows["boosted from ease_score x 1"]["seeds"] != rows["min_child_samples 5"]["seeds"]
    assert len(report["training_queries"]) == 2 and min(report["training_queries"]) > 0
    first = report["rows"]["min_child_samples 5"]
    assert first["vs_first"]["mean_diff"] == 0.0 and first["vs_first"]["users"] == report["pairs"] > 0
    for row in report["rows"].values():
        assert len(row["seeds"]) == 2
        assert all(math.isfinite(v) and 0.0 <= v <= 1.0 for v in (row["ndcg@10"], *row["seeds"]))
        # the row's figure is the mean of its seeds' (every seed scores the same pairs)
        assert math.isclose(row["ndcg@10"], sum(row["seeds"]) / 2, rel_tol=1e-9)
        assert len(row["per_window"]) == 2 and all(len(w) == 2 for w in row["per_window"])
        # windows won per seed: counted from the same per-window figures as EASE's
        won = [sum(w >= e for w, e in zip(s, report["ease_per_window"], strict=True)) for s in row["per_window"]]
        assert row["windows_won"] == won
    assert len(report["ease_per_window"]) == 2
    assert "| ranker |" in rr.table(report)
