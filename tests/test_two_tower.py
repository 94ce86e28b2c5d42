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
    TwoTower,
    TwoTowerConfig,
    UserTower,
    _sampled_softmax_loss,
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


@pytest.mark.parametrize("logq", [True, False])
def test_sampled_loss_is_the_cross_entropy_against_the_sampled_negatives(ml, catalog, logq):
    """The fused sampled softmax equals cross-entropy over [target, negatives] with logQ and hits masked."""
    period = Period.at(ml.ratings, catalog, int(ml.ratings.timestamp.max()) + 1)
    torch.manual_seed(0)
    model = TwoTower(replace(TINY, temperature=0.2), catalog, period.stats, Demographics.from_users(ml.users).cardinalities).eval()
    g = torch.Generator().manual_seed(1)
    u = torch.nn.functional.normalize(torch.randn(40, TINY.dim, generator=g), dim=-1)
    target = torch.randint(catalog.n_items, (40,), generator=g)
    sampled = torch.cat([target[:12], torch.randint(catalog.n_items, (20,), generator=g)])  # some hit their own row
    log_q = torch.randn(catalog.n_items, generator=g)
    got = _sampled_softmax_loss(model, u, target, sampled, log_q if logq else None)
    with torch.no_grad():
        v_pos, v_neg = model.item_tower(target), model.item_tower(sampled)
    logits = torch.cat([(u * v_pos).sum(-1, keepdim=True), u @ v_neg.T], 1) / model.temperature()
    if logq:
        logits = logits - torch.cat([log_q[target][:, None], log_q[sampled][None, :].expand(len(target), -1)], 1)
    hit = sampled[None, :] == target[:, None]
    assert hit.any()
    logits = torch.cat([logits[:, :1], logits[:, 1:].masked_fill(hit, -1e4)], 1)
    expected = torch.nn.functional.cross_entropy(logits, torch.zeros(len(target), dtype=torch.long), reduction="none")
    torch.testing.assert_close(got.detach(), expected.detach(), rtol=1e-5, atol=1e-5)


def test_large_catalog_ids_train_sparse_and_lazy(ml, catalog, tmp_path):
    """Above ``sparse_id_items`` only the id rows a step reads move; the towers still export to ONNX."""
    from export.onnx_export import export_item_tower, export_user_tower, sample_user_inputs, session

    cutoff = int(np.quantile(ml.ratings.timestamp, 0.8))
    unrated = ml.movies.movie_id.to_numpy()[::6]  # a sixth of the catalog is never rated
    period = Period.at(ml.ratings[~ml.ratings.movie_id.isin(unrated)], catalog, cutoff)
    demo = Demographics.from_users(ml.users)
    # negatives drawn from the step's targets only (no uniform draws), so unrated items are never read
    config = replace(TINY, epochs=3, full_softmax_items=0, sparse_id_items=0, negatives=32, uniform_share=0.0)
    torch.manual_seed(config.seed)
    init = TwoTower(config, catalog, period.stats, demo.cardinalities).item_tower.encoder.id_emb.weight.detach().clone()
    result = train_two_tower(config, catalog, period.stats, period.histories, demo, progress=False)
    model = result.model
    assert model.item_tower.encoder.id_emb.sparse
    losses = [e["loss"] for e in result.history]
    assert np.isfinite(losses).all() and losses[-1] < losses[0]
    weight = model.item_tower.encoder.id_emb.weight.detach()
    read = np.zeros(catalog.n_items, bool)
    read[period.histories.items] = True
    read[0] = True  # padding looks up row 0 (masked to zero afterwards)
    assert (~read).sum() > 0
    torch.testing.assert_close(weight[~read], init[~read], rtol=0, atol=0)
    assert (weight[read] - init[read]).abs().amax(1).min() > 0
    # the dense rule below the threshold: every row decays
    dense = train_two_tower(replace(config, sparse_id_items=10**9), catalog, period.stats, period.histories, demo, progress=False)
    assert not dense.model.item_tower.encoder.id_emb.sparse
    assert (dense.model.item_tower.encoder.id_emb.weight.detach()[~read] != init[~read]).all()
    export_user_tower(model, tmp_path / "user.onnx")
    export_item_tower(model, tmp_path / "item.onnx")
    x = sample_user_inputs(6, catalog.n_items, L, list(demo.cardinalities), seed=3)
    got = session(tmp_path / "user.onnx").run(["user_embedding"], x)[0]
    np.testing.assert_allclose(got, model.user_vectors(x["history"], x["history_rating"], x["demographics"]), rtol=0, atol=1e-5)
    items = np.arange(catalog.n_items, dtype=np.int64).reshape(-1, 1)
    np.testing.assert_allclose(
        session(tmp_path / "item.onnx").run(["item_embedding"], {"item": items})[0], model.item_vectors(), rtol=0, atol=1e-5
    )


def test_recency_weights_halve_per_half_life():
    frame = pd.DataFrame({"user_id": [1] * 5, "movie_id": [1, 2, 3, 4, 5], "rating": [4.0] * 5, "timestamp": [10, 20, 30, 40, 50]})
    movies = pd.DataFrame({"movie_id": [1, 2, 3, 4, 5], "title": list("abcde"), "year": [1990] * 5, "genres": ["Drama"] * 5})
    cat = Catalog.from_movies(movies, ["Drama"], np.ones((5, 1), np.float32))
    hist = Histories.from_frame(frame, cat)
    w = recency_weights(hist, 0.2)
    np.testing.assert_allclose(w, [0.5**4, 0.5**3, 0.5**2, 0.5, 1.0], rtol=1e-6)
    assert recency_weights(hist, 0.0) is None
