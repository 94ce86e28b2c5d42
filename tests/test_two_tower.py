"""The two-tower's training targets: causal user tower, windows that tile each sequence, no leak past the cut."""

from dataclasses import replace

import numpy as np
import pandas as pd
import pytest
import torch

from export.data import load_movielens
from export.history import Histories
from export.items import Catalog
from export.pipeline import Period
from export.synth import SynthSpec, synthesize
from export.two_tower import (
    Demographics,
    ItemEncoder,
    TwoTowerConfig,
    UserTower,
    recency_weights,
    train_two_tower,
    training_targets,
    training_windows,
)

L = 10
TINY = TwoTowerConfig(dim=16, hidden=32, history_len=L, epochs=2, batch_size=16, patience=2, lr=5e-3)


@pytest.fixture(scope="module")
def ml(tmp_path_factory):
    out = tmp_path_factory.mktemp("synth_tt")
    synthesize(SynthSpec(users=200, items=120, ratings=4000, seed=5, span_days=10), out, progress=False)
    return load_movielens(out, progress=False)


@pytest.fixture(scope="module")
def catalog(ml) -> Catalog:
    return Catalog.from_movies(ml.movies, ml.genres, ml.genre_matrix)


def _tower(relative: bool) -> UserTower:
    torch.manual_seed(0)
    rng = np.random.default_rng(0)
    enc = ItemEncoder(rng.random((40, 5)).astype(np.float32), np.zeros(40, np.int64), np.zeros(40, np.int64), 16)
    tower = UserTower(enc, 16, 8, L, 2, 0.0, (3, 3, 3), relative).eval()
    with torch.no_grad():  # move every weight off its initial value so no term is trivially zero
        for p in tower.parameters():
            p.add_(0.1 * torch.randn_like(p))
    return tower


def _inputs(seed: int = 0) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    history = torch.randint(0, 40, (5, L), generator=g)
    history[0, :4] = -1  # a short history
    history[1, :] = -1  # no history at all
    rating = torch.randint(0, 11, (5, L), generator=g) / 2.0
    demo = torch.randint(0, 3, (5, 3), generator=g)
    return history, rating, demo


@pytest.mark.parametrize("relative", [True, False])
def test_position_t_never_sees_later_items(relative):
    tower = _tower(relative)
    history, rating, demo = _inputs()
    with torch.no_grad():
        before = tower.sequence(history, rating, demo)
        for t in range(L - 1):
            changed, changed_r = history.clone(), rating.clone()
            changed[:, t + 1 :] = (changed[:, t + 1 :] + 7) % 40
            changed_r[:, t + 1 :] = 5.0 - changed_r[:, t + 1 :]
            after = tower.sequence(changed, changed_r, demo)
            torch.testing.assert_close(after[:, : t + 1], before[:, : t + 1], rtol=0, atol=1e-6)
            # the change is visible from t + 1 on (the test would pass vacuously otherwise)
            assert (after[2:, t + 1] - before[2:, t + 1]).abs().max() > 1e-4


@pytest.mark.parametrize("relative", [True, False])
def test_served_forward_is_the_last_position(relative):
    tower = _tower(relative)
    history, rating, demo = _inputs(1)
    with torch.no_grad():
        torch.testing.assert_close(tower(history, rating, demo), tower.sequence(history, rating, demo)[:, -1], rtol=0, atol=1e-6)
        assert torch.isfinite(tower(history, rating, demo)).all()


def test_relative_prefix_equals_the_served_window():
    """With relative positions, what position t learns is what a window ending at t is served."""
    tower = _tower(True)
    history, rating, demo = _inputs(2)
    with torch.no_grad():
        seq = tower.sequence(history, rating, demo)
        for t in (0, 3, 7):
            window = torch.full_like(history, -1)
            window_r = torch.zeros_like(rating)
            window[:, L - 1 - t :] = history[:, : t + 1]
            window_r[:, L - 1 - t :] = rating[:, : t + 1]
            full = history[:, : t + 1].min(dim=1).values >= 0  # rows whose prefix has no padding
            torch.testing.assert_close(tower(window, window_r, demo)[full], seq[full, t], rtol=0, atol=1e-5)


def test_windows_tile_every_users_targets_once(ml, catalog):
    histories = Histories.from_frame(ml.ratings, catalog)
    ends, rows = training_windows(histories, L)
    covered = np.concatenate([np.arange(max(e - L, histories.offsets[r] + 1), e) for e, r in zip(ends, rows)])
    assert len(covered) == len(np.unique(covered))  # once
    np.testing.assert_array_equal(np.sort(covered), training_targets(histories, 0.0))  # every target
    # a window never reaches into the previous user's interactions for a target
    assert (ends - 1 >= histories.offsets[rows] + 1).all()
    assert (ends <= histories.offsets[rows + 1]).all()


def test_training_reads_nothing_after_the_cut(ml, catalog):
    """A model trained at a cut-off is the same whatever happened after it."""
    cutoff = int(np.quantile(ml.ratings.timestamp, 0.7))
    period = Period.at(ml.ratings, catalog, cutoff)
    assert period.histories.timestamps.max() < cutoff
    ends, rows = training_windows(period.histories, L)
    assert (period.histories.timestamps[ends - 1] < cutoff).all()
    # rewrite everything after the cut (other movies, other ratings): the trained weights must not move
    later = ml.ratings.timestamp >= cutoff
    scrambled = ml.ratings.copy()
    scrambled.loc[later, "movie_id"] = np.random.default_rng(0).permutation(scrambled.loc[later, "movie_id"].to_numpy())
    scrambled.loc[later, "rating"] = 5.0
    other = Period.at(scrambled, catalog, cutoff)
    demo = Demographics.from_users(ml.users)
    config = replace(TINY, epochs=1, recency_half_life=0.2)
    a = train_two_tower(config, catalog, period.stats, period.histories, demo, progress=False).model.state_dict()
    b = train_two_tower(config, catalog, other.stats, other.histories, demo, progress=False).model.state_dict()
    for key in a:
        torch.testing.assert_close(a[key], b[key], rtol=0, atol=0)


@pytest.mark.parametrize("full_softmax_items", [4096, 0])  # the whole catalog (120 items), then 32 sampled + logQ
def test_both_softmaxes_learn(ml, catalog, full_softmax_items):
    cutoff = int(np.quantile(ml.ratings.timestamp, 0.8))
    period = Period.at(ml.ratings, catalog, cutoff)
    config = replace(TINY, epochs=4, full_softmax_items=full_softmax_items, negatives=32, id_dropout=0.2)
    result = train_two_tower(config, catalog, period.stats, period.histories, Demographics.from_users(ml.users), progress=False)
    losses = [e["loss"] for e in result.history]
    assert np.isfinite(losses).all()
    assert losses[-1] < losses[0]


def test_recency_weights_halve_per_half_life():
    frame = pd.DataFrame({"user_id": [1] * 5, "movie_id": [1, 2, 3, 4, 5], "rating": [4.0] * 5, "timestamp": [10, 20, 30, 40, 50]})
    movies = pd.DataFrame({"movie_id": [1, 2, 3, 4, 5], "title": list("abcde"), "year": [1990] * 5, "genres": ["Drama"] * 5})
    cat = Catalog.from_movies(movies, ["Drama"], np.ones((5, 1), np.float32))
    hist = Histories.from_frame(frame, cat)
    w = recency_weights(hist, 0.2)
    np.testing.assert_allclose(w, [0.5**4, 0.5**3, 0.5**2, 0.5, 1.0], rtol=1e-6)
    assert recency_weights(hist, 0.0) is None
