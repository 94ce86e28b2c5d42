"""Tests of the synthetic MovieLens generator (export/synth.py)."""

from __future__ import annotations

import time
from pathlib import Path

import numpy as np
import pytest

from export.data import DROP_REASONS, MovieLens, load_movielens
from export.synth import GENRES, SynthSpec, latent_factors, synthesize

SPEC = SynthSpec(users=300, items=400, ratings=5_000, seed=7)


@pytest.fixture(scope="module")
def generated(tmp_path_factory: pytest.TempPathFactory) -> tuple[dict, MovieLens]:
    out = tmp_path_factory.mktemp("synth")
    summary = synthesize(SPEC, out, progress=False)
    return summary, load_movielens(out, progress=False)


def test_summary_and_headers(generated: tuple[dict, MovieLens]) -> None:
    summary, _ = generated
    assert summary["rows"] == {"ratings.csv": 5_000, "movies.csv": 400, "users.csv": 300}
    assert summary["seconds"] >= 0 and summary["spec"]["seed"] == 7
    heads = {name: Path(p).read_text().splitlines()[0] for name, p in summary["paths"].items()}
    assert heads == {
        "ratings.csv": "userId,movieId,rating,timestamp",
        "movies.csv": "movieId,title,genres",
        "users.csv": "userId,age,gender,occupation,zip",
    }


def test_loads_cleanly_with_exact_counts(generated: tuple[dict, MovieLens]) -> None:
    _, ml = generated
    assert ml.report.dropped == dict.fromkeys(DROP_REASONS, 0)
    assert ml.n_ratings == SPEC.ratings
    assert len(ml.movies) == SPEC.items
    assert ml.users is not None and len(ml.users) == SPEC.users
    assert set(ml.genres) <= set(GENRES) and len(ml.genres) >= 15


def test_pairs_unique_and_every_user_rates(generated: tuple[dict, MovieLens]) -> None:
    _, ml = generated
    r = ml.ratings
    assert not r.duplicated(["user_id", "movie_id"]).any()
    assert sorted(r["user_id"].unique()) == list(range(1, SPEC.users + 1))


def test_ratings_and_timestamps_are_plausible(generated: tuple[dict, MovieLens]) -> None:
    _, ml = generated
    r = ml.ratings
    doubled = r["rating"].to_numpy() * 2
    assert (doubled == np.round(doubled)).all() and r["rating"].between(0.5, 5.0).all()
    assert r["rating"].nunique() >= 8
    assert r["timestamp"].max() < time.time() and r["timestamp"].min() > 788_918_400  # 1995
    # No movie is rated before its release year begins.
    merged = r.merge(ml.movies[["movie_id", "year"]], on="movie_id")
    merged = merged[merged["year"] > 0]
    release = (merged["year"].to_numpy().astype(np.int64) - 1970).astype("datetime64[Y]")
    assert (merged["timestamp"].to_numpy() >= release.astype("datetime64[s]").astype(np.int64)).all()


def test_titles(generated: tuple[dict, MovieLens]) -> None:
    _, ml = generated
    m = ml.movies
    assert (m["title"] == "Synthetic Movie " + m["movie_id"].astype(str)).all()
    assert (m["year"] > 1900).mean() > 0.95


def test_popularity_is_skewed(generated: tuple[dict, MovieLens]) -> None:
    _, ml = generated
    counts = np.sort(ml.ratings["movie_id"].value_counts().to_numpy())[::-1]
    top = counts[: SPEC.items // 10].sum() / SPEC.ratings
    assert top > 0.30


def test_activity_is_skewed(generated: tuple[dict, MovieLens]) -> None:
    _, ml = generated
    per_user = ml.ratings.groupby("user_id").size().to_numpy()
    assert np.median(per_user) < per_user.mean()  # long right tail
    assert per_user.max() > 5 * np.median(per_user)


def test_planted_affinity_drives_choice_and_rating(generated: tuple[dict, MovieLens]) -> None:
    _, ml = generated
    lf = latent_factors(SPEC)
    r = ml.ratings
    users = r["user_id"].to_numpy() - 1
    items = np.searchsorted(lf.movie_ids, r["movie_id"].to_numpy())
    assert (lf.movie_ids[items] == r["movie_id"].to_numpy()).all()
    aff = np.einsum("ij,ij->i", lf.user_factors[users], lf.item_factors[items])
    # Users pick items they like more than a random item...
    rng = np.random.default_rng(0)
    random_aff = np.einsum("ij,ij->i", lf.user_factors[users], lf.item_factors[rng.integers(0, SPEC.items, len(users))])
    assert aff.mean() > random_aff.mean() + 0.2
    # ...and rate high-affinity items higher.
    rating = r["rating"].to_numpy()
    assert np.corrcoef(aff, rating)[0, 1] > 0.2
    high = aff > np.median(aff)
    assert rating[high].mean() > rating[~high].mean() + 0.2


def test_genres_follow_item_factors(generated: tuple[dict, MovieLens]) -> None:
    _, ml = generated
    lf = latent_factors(SPEC)
    order = np.searchsorted(lf.movie_ids, ml.movies["movie_id"].to_numpy())
    factors = lf.item_factors[order]
    # A linear read-out of genres from the factors beats chance by a wide margin.
    g = ml.genre_matrix
    common = g.sum(axis=0) >= 20
    x = np.c_[factors, np.ones(len(factors))]
    coef, *_ = np.linalg.lstsq(x, g[:, common], rcond=None)
    resid = ((g[:, common] - x @ coef) ** 2).sum(axis=0)
    total = ((g[:, common] - g[:, common].mean(axis=0)) ** 2).sum(axis=0)
    assert np.median(1 - resid / total) > 0.15


def test_deterministic(tmp_path: Path, generated: tuple[dict, MovieLens]) -> None:
    summary, _ = generated
    synthesize(SPEC, tmp_path, progress=False)
    for name in ("ratings.csv", "movies.csv", "users.csv"):
        assert (tmp_path / name).read_bytes() == Path(summary["paths"][name]).read_bytes()


def test_dense_users_use_full_catalogue_path(tmp_path: Path) -> None:
    # ~40 of 60 items per user: too dense for the candidate pool, exact path instead.
    spec = SynthSpec(users=50, items=60, ratings=2_000, seed=3)
    synthesize(spec, tmp_path, progress=False)
    ml = load_movielens(tmp_path, progress=False)
    assert ml.n_ratings == 2_000 and ml.report.total_dropped == 0
    assert not ml.ratings.duplicated(["user_id", "movie_id"]).any()
    assert ml.ratings["user_id"].nunique() == 50


def test_infeasible_specs_rejected(tmp_path: Path) -> None:
    with pytest.raises(ValueError):
        synthesize(SynthSpec(users=10, items=5, ratings=5), tmp_path, progress=False)
    with pytest.raises(ValueError):
        synthesize(SynthSpec(users=2, items=5, ratings=11), tmp_path, progress=False)
