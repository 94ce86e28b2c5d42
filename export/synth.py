"""Synthetic MovieLens data with planted structure, in the ml-25m/ml-32m CSV layout.

The generator plants structure that a recommender can find, so models can be told
apart on data of the real ML-32M shape without shipping ML-32M:

- Latent taste: users and items get ``spec.factors``-dimensional factors; which items a
  user rates and how they rate them both rise with the affinity ``u . v``.
- Popularity: items get Zipf-like popularity, which drives which items get picked.
- Activity: per-user rating counts follow a power law (many light users, a few heavy
  ones); every user rates at least one item and the total is exactly ``spec.ratings``.
- Metadata: genres (the real MovieLens genre names) and release years are functions of
  the item factors plus noise, so content features carry signal too.
- Time: every user is active over a window inside a global span of several years and
  rates in sessions; an item is never rated before its release year begins.
- Ratings: 0.5..5.0 in half stars, from a biased-affinity model plus noise; ratings made
  before MovieLens allowed half stars (and those of whole-star users) are whole stars.

Generation is vectorised numpy, chunked by users, and streamed to CSV with polars, so
the default ML-32M shape (200,948 users, 87,585 movies, 32,000,204 ratings) fits in a
few GB of memory. :func:`latent_factors` rebuilds the planted factors from the spec
(cheaply, without the ratings) so tests can check the structure is really there.
"""

from __future__ import annotations

import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import polars as pl
from tqdm.auto import tqdm

__all__ = ["GENRES", "LatentFactors", "SynthSpec", "latent_factors", "synthesize"]

#: The genre names of ml-25m / ml-32m (besides "(no genres listed)"), with a rough
#: share of movies carrying each, used as the base rate of the genre model.
GENRES: tuple[str, ...] = (
    "Action",
    "Adventure",
    "Animation",
    "Children",
    "Comedy",
    "Crime",
    "Documentary",
    "Drama",
    "Fantasy",
    "Film-Noir",
    "Horror",
    "IMAX",
    "Musical",
    "Mystery",
    "Romance",
    "Sci-Fi",
    "Thriller",
    "War",
    "Western",
)
_GENRE_SHARE = np.array(
    [
        0.12,
        0.07,
        0.05,
        0.05,
        0.27,
        0.09,
        0.08,
        0.40,
        0.05,
        0.005,
        0.10,
        0.002,
        0.03,
        0.05,
        0.12,
        0.05,
        0.14,
        0.03,
        0.02,
    ]
)
_NO_GENRES = "(no genres listed)"
_OCCUPATIONS = (
    "student",
    "other",
    "educator",
    "administrator",
    "engineer",
    "programmer",
    "librarian",
    "writer",
    "executive",
    "scientist",
    "artist",
    "technician",
    "marketing",
    "entertainment",
    "healthcare",
    "retired",
    "salesman",
    "lawyer",
    "none",
    "homemaker",
    "doctor",
)
_OCCUPATION_SHARE = np.array([196, 105, 95, 79, 67, 66, 51, 45, 32, 31, 28, 27, 26, 18, 16, 14, 12, 12, 9, 7, 7], dtype=np.float64)

# Global activity span, as in ML-32M (first rating Jan 1996, last Oct 2023).
_SPAN_START = 822_873_600  # 1996-01-29
_SPAN_END = 1_697_068_800  # 2023-10-12
_HALF_STARS_FROM = 1_045_008_000  # 2003-02-12: MovieLens took whole stars only before
_FIRST_YEAR, _LAST_YEAR = 1902, 2022

_MAX_PER_USER = 3000  # cap on one user's ratings (and on the catalogue share)
_ZIPF_EXPONENT = 1.1  # item popularity ~ (rank + offset)^-exponent
_ZIPF_OFFSET = 3.0
_ACTIVITY_ALPHA = 1.4  # Pareto tail of per-user activity
_SELECT_STRENGTH = 1.5  # weight of affinity in which items a user picks
_POOL_RATIO = 4  # candidates drawn per wanted rating in the fast path
_POOL_POP_WEIGHT = 1.0  # popularity weight again when choosing within the pool
_RATING_MEAN = 2.85
_RATING_AFFINITY = 0.6  # weight of affinity in the rating
_RATING_NOISE = 0.75
_WHOLE_STAR_USERS = 0.3
_NO_YEAR_SHARE = 0.005  # a few titles without "(YYYY)", as in the real data
_NO_GENRE_SHARE = 0.01
_CHUNK_RATINGS = 400_000  # ratings generated per chunk (bounds memory)
_FULL_BATCH = 64  # users per batch on the full-catalogue path

# Independent random streams, so the factors can be rebuilt without the ratings.
_STREAM_FACTORS, _STREAM_ITEMS, _STREAM_USERS, _STREAM_RATINGS = range(4)


@dataclass(frozen=True)
class SynthSpec:
    """Shape and seed of a synthetic data set (defaults: the ML-32M shape).

    Attributes:
        users: Number of users (ids 1..users).
        items: Number of movies (ids sparse, as in the real data).
        ratings: Exact number of ratings; must be in [users, sum of per-user caps].
        seed: Seed of every random stream.
        factors: Dimension of the planted latent taste factors.
        span_days: Length of the global activity span, ending Oct 2023 (default: ML-32M's
            Jan 1996 - Oct 2023). Short spans make users' activity windows overlap more, so a
            global time split of a tiny data set still has users on both sides of the cut.
    """

    users: int = 200_948
    items: int = 87_585
    ratings: int = 32_000_204
    seed: int = 0
    factors: int = 16
    span_days: int = (_SPAN_END - _SPAN_START) // 86_400

    @property
    def span_start(self) -> int:
        """Unix second at which the global activity span starts."""
        return _SPAN_END - self.span_days * 86_400


@dataclass(frozen=True, eq=False)
class LatentFactors:
    """The planted latent structure of a spec, aligned with the written ids.

    Attributes:
        user_ids: int64 [users], the userId of each row of ``user_factors`` (1..users).
        user_factors: float32 [users, factors].
        movie_ids: int64 [items], the movieId of each row of ``item_factors``, ascending.
        item_factors: float32 [items, factors]; ``user_factors @ item_factors.T`` is the
            affinity that drives both item choice and rating.
    """

    user_ids: np.ndarray
    user_factors: np.ndarray
    movie_ids: np.ndarray
    item_factors: np.ndarray


def latent_factors(spec: SynthSpec) -> LatentFactors:
    """Rebuild the planted factors of ``spec`` without generating any ratings.

    Args:
        spec: The spec passed to :func:`synthesize`.

    Returns:
        The factors, rows ordered by user id and by movie id.
    """
    items = _make_items(spec)
    order = np.argsort(items.movie_ids, kind="stable")
    users_f = _make_user_factors(spec)
    return LatentFactors(
        user_ids=np.arange(1, spec.users + 1, dtype=np.int64),
        user_factors=users_f,
        movie_ids=items.movie_ids[order],
        item_factors=items.factors[order],
    )


def synthesize(spec: SynthSpec, out_dir: str | Path, *, progress: bool = True) -> dict:
    """Generate a synthetic MovieLens data set and write it as CSV.

    Writes ``ratings.csv`` (userId,movieId,rating,timestamp; sorted by user then movie,
    like ml-25m), ``movies.csv`` (movieId,title,genres) and ``users.csv``
    (userId,age,gender,occupation,zip, like ml-100k) into ``out_dir``.

    Args:
        spec: Shape and seed.
        out_dir: Output directory (created if missing; files there are overwritten).
        progress: Show a progress bar over the ratings on stderr.

    Returns:
        Summary: ``{"out_dir", "paths": {file: path}, "rows": {file: rows},
        "seconds", "spec"}``.

    Raises:
        ValueError: If the spec is infeasible (fewer ratings than users, or more than
            the users can hold without repeating a movie).
    """
    started = time.perf_counter()
    _check_spec(spec)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    paths = {name: out / name for name in ("ratings.csv", "movies.csv", "users.csv")}

    items = _make_items(spec)
    users = _make_users(spec, items)
    _write_movies(paths["movies.csv"], items)
    _write_users(paths["users.csv"], users)
    n_written = _write_ratings(paths["ratings.csv"], spec, items, users, progress=progress)
    if n_written != spec.ratings:  # the allocation makes this exact; guard the invariant
        raise RuntimeError(f"wrote {n_written} ratings, expected {spec.ratings}")

    return {
        "out_dir": str(out),
        "paths": {name: str(p) for name, p in paths.items()},
        "rows": {"ratings.csv": n_written, "movies.csv": spec.items, "users.csv": spec.users},
        "seconds": round(time.perf_counter() - started, 3),
        "spec": asdict(spec),
    }


# ------------------------------------------------------------------------ the model


def _rng(spec: SynthSpec, stream: int, *sub: int) -> np.random.Generator:
    return np.random.default_rng(np.random.SeedSequence(spec.seed, spawn_key=(stream, *sub)))


def _check_spec(spec: SynthSpec) -> None:
    if spec.users < 1 or spec.items < 1 or spec.factors < 1 or spec.span_days < 1:
        raise ValueError(f"users, items, factors and span_days must be positive: {spec}")
    if spec.span_start < _SPAN_START:
        raise ValueError(f"span_days must be at most {(_SPAN_END - _SPAN_START) // 86_400}, got {spec.span_days}")
    if spec.ratings < spec.users:
        raise ValueError(f"{spec.ratings} ratings cannot give each of {spec.users} users one")
    if spec.ratings > spec.users * min(spec.items, _MAX_PER_USER):
        raise ValueError(f"{spec.ratings} ratings exceed {spec.users} users x min({spec.items} items, {_MAX_PER_USER}) without repeats")


def _standardize(x: np.ndarray) -> np.ndarray:
    std = float(x.std())
    return (x - x.mean()) / (std if std > 0 else 1.0)


def _year_start(year: np.ndarray) -> np.ndarray:
    """Unix seconds of 1 January of each year (UTC)."""
    return (year.astype(np.int64) - 1970).astype("datetime64[Y]").astype("datetime64[s]").astype(np.int64)


@dataclass(frozen=True, eq=False)
class _Items:
    movie_ids: np.ndarray  # int64 [I]
    factors: np.ndarray  # float32 [I, k]; scaled so u . v has unit variance
    log_pop: np.ndarray  # float64 [I]
    bias: np.ndarray  # float32 [I]
    year: np.ndarray  # int32 [I]
    release: np.ndarray  # int64 [I], Unix seconds of 1 Jan of the release year
    genres: np.ndarray  # bool [I, len(GENRES)]
    rel_order: np.ndarray  # int64 [I], items by release time
    rel_sorted: np.ndarray  # int64 [I], release[rel_order]
    rel_cdf: np.ndarray  # float64 [I], popularity CDF in release order


def _make_items(spec: SynthSpec) -> _Items:
    k = spec.factors
    n = spec.items
    # Factors at scale k^-1/4 on both sides give the affinity u . v unit variance.
    factors = (_rng(spec, _STREAM_FACTORS, 1).standard_normal((n, k)) / k**0.25).astype(np.float32)
    rng = _rng(spec, _STREAM_ITEMS)

    # Zipf-like popularity over a random ranking of the items.
    rank = rng.permutation(n)
    log_pop = -_ZIPF_EXPONENT * np.log(rank + _ZIPF_OFFSET)
    bias = (rng.normal(0.0, 0.3, n) + 0.15 * _standardize(log_pop)).astype(np.float32)

    # Genres: one direction in factor space per genre; base rates set by the shares.
    directions = rng.standard_normal((len(GENRES), k))
    score = _standardize(factors.astype(np.float64) @ directions.T)
    logit = 2.0 * score + np.log(_GENRE_SHARE / (1 - _GENRE_SHARE))
    genres = rng.random(logit.shape) < 1.0 / (1.0 + np.exp(-logit))
    empty = ~genres.any(axis=1)
    genres[empty, np.argmax(logit[empty], axis=1)] = True
    genres[rng.random(n) < _NO_GENRE_SHARE] = False

    # Release years: age since release is log-normal, its log tied to one factor direction.
    age_direction = _standardize(factors.astype(np.float64) @ rng.standard_normal(k))
    log_age = 2.6 + 0.9 * (0.7 * age_direction + 0.71 * rng.standard_normal(n))
    year = np.clip(_LAST_YEAR + 1 - np.round(np.exp(log_age)), _FIRST_YEAR, _LAST_YEAR).astype(np.int32)
    release = _year_start(year)

    # Sparse ids like the real catalogue (ML-32M: 87,585 movies, ids up to 292,757).
    movie_ids = np.sort(rng.choice(np.arange(1, 3 * n + 2), size=n, replace=False)).astype(np.int64)
    movie_ids = movie_ids[rng.permutation(n)]

    rel_order = np.argsort(release, kind="stable")
    rel_cdf = np.cumsum(np.exp(log_pop[rel_order] - log_pop.max()))
    return _Items(
        movie_ids=movie_ids,
        factors=factors,
        log_pop=log_pop,
        bias=bias,
        year=year,
        release=release,
        genres=genres,
        rel_order=rel_order,
        rel_sorted=release[rel_order],
        rel_cdf=rel_cdf,
    )


def _make_user_factors(spec: SynthSpec) -> np.ndarray:
    k = spec.factors
    return (_rng(spec, _STREAM_FACTORS, 0).standard_normal((spec.users, k)) / k**0.25).astype(np.float32)


@dataclass(frozen=True, eq=False)
class _Users:
    factors: np.ndarray  # float32 [U, k]
    bias: np.ndarray  # float32 [U]
    whole_stars: np.ndarray  # bool [U]
    start: np.ndarray  # int64 [U], first session
    end: np.ndarray  # int64 [U], last session
    avail: np.ndarray  # int64 [U], items released by `end` (a prefix of rel_order)
    counts: np.ndarray  # int64 [U], ratings per user
    age: np.ndarray
    gender: np.ndarray
    occupation: np.ndarray
    zip: np.ndarray


def _make_users(spec: SynthSpec, items: _Items) -> _Users:
    n = spec.users
    factors = _make_user_factors(spec)
    rng = _rng(spec, _STREAM_USERS)
    activity = rng.pareto(_ACTIVITY_ALPHA, n) + 0.15
    expected = activity / activity.sum() * spec.ratings

    # Activity window: heavy users stay longer; many users rate in a day or two.
    start = rng.integers(spec.span_start, _SPAN_END - 3600, n)
    log_days = np.log(2.0) + 0.5 * np.log1p(expected / 50.0) + rng.normal(0.0, 1.8, n)
    duration = np.clip(np.exp(log_days) * 86_400, 3600, None).astype(np.int64)
    end = np.minimum(start + duration, _SPAN_END)
    # Every user must be able to reach a handful of released items.
    floor = items.rel_sorted[min(spec.items - 1, 20)]
    end = np.maximum(end, floor)
    start = np.minimum(start, end)
    avail = np.searchsorted(items.rel_sorted, end, side="right").astype(np.int64)
    caps = np.minimum(avail, _MAX_PER_USER)
    deficit = spec.ratings - int(caps.sum())
    if deficit > 0:
        # Dense specs (many ratings per item) need more users to see the whole
        # catalogue: keep the most active ones around until the span ends.
        full_cap = min(spec.items, _MAX_PER_USER)
        order = np.argsort(-activity, kind="stable")
        gain = np.cumsum(full_cap - caps[order])
        extend = order[: int(np.searchsorted(gain, deficit)) + 1]
        end[extend] = _SPAN_END
        avail[extend] = spec.items
        caps[extend] = full_cap
    counts = _allocate(activity, caps, spec.ratings, rng)

    # Demographics (like ml-100k), mildly tied to taste so side features carry signal.
    z0 = _standardize(factors[:, 0].astype(np.float64))
    z1 = _standardize(factors[:, 1].astype(np.float64))
    age = np.clip(np.round(32 + 10 * (0.5 * z0 + 0.87 * rng.standard_normal(n))), 7, 73).astype(np.int32)
    gender = np.where(rng.random(n) < 1 / (1 + np.exp(1.0 - 0.8 * z1)), "F", "M")
    occupation = np.asarray(_OCCUPATIONS)[rng.choice(len(_OCCUPATIONS), size=n, p=_OCCUPATION_SHARE / _OCCUPATION_SHARE.sum())]
    zip_codes = np.char.zfill(rng.integers(0, 100_000, n).astype(str), 5)
    return _Users(
        factors=factors,
        bias=rng.normal(0.0, 0.4, n).astype(np.float32),
        whole_stars=rng.random(n) < _WHOLE_STAR_USERS,
        start=start,
        end=end,
        avail=avail,
        counts=counts,
        age=age,
        gender=gender,
        occupation=occupation,
        zip=zip_codes,
    )


def _allocate(weights: np.ndarray, caps: np.ndarray, total: int, rng: np.random.Generator) -> np.ndarray:
    """Split ``total`` into per-user counts >= 1, proportional to weights, within caps.

    What a capped user cannot take flows to the others, pro rata, until it is all given.
    """
    counts = np.ones(len(weights), dtype=np.int64)
    room = caps.astype(np.int64) - 1
    remaining = int(total) - len(weights)
    while remaining > 0:
        open_ = np.flatnonzero(room > 0)
        share = remaining * weights[open_] / weights[open_].sum()
        give = np.minimum(np.floor(share).astype(np.int64), room[open_])
        if give.sum() == 0:
            # Fewer units left than users with room: hand them out one each, weighted.
            pick = rng.choice(open_, size=remaining, replace=False, p=weights[open_] / weights[open_].sum())
            give = np.zeros(len(open_), dtype=np.int64)
            give[np.searchsorted(open_, pick)] = 1
        counts[open_] += give
        room[open_] -= give
        remaining -= int(give.sum())
    return counts


# ------------------------------------------------------------------------ the ratings


def _pick_pool(
    rng: np.random.Generator,
    items: _Items,
    u_factors: np.ndarray,
    avail: np.ndarray,
    want: np.ndarray,
) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Pick items for light users from a popularity-drawn candidate pool.

    Each user draws ``_POOL_RATIO * want + 16`` candidates by popularity among released
    items (with replacement), then keeps the ``want`` distinct ones with the highest
    affinity-plus-Gumbel score. Cost grows with the ratings, not with the catalogue.

    Returns:
        ``(user_local, item, affinity, short)``: picked pairs, and a bool mask of users
        whose pool held fewer than ``want`` distinct items (to redo on the full path).
    """
    m = _POOL_RATIO * want + 16
    lu = np.repeat(np.arange(len(want)), m)
    limit = items.rel_cdf[avail - 1][lu]
    pos = np.searchsorted(items.rel_cdf, rng.random(len(lu)) * limit, side="right")
    item = items.rel_order[np.minimum(pos, avail[lu] - 1)]
    aff = np.einsum("ij,ij->i", u_factors[lu], items.factors[item])
    score = _SELECT_STRENGTH * aff + _POOL_POP_WEIGHT * items.log_pop[item] + _gumbel(rng, len(lu))

    # Distinct (user, item) pairs: sort by pair, best score first, keep the first.
    pair = lu.astype(np.int64) * len(items.movie_ids) + item
    order = np.lexsort((-score, pair))
    pair_sorted = pair[order]
    first = np.ones(len(order), dtype=bool)
    first[1:] = pair_sorted[1:] != pair_sorted[:-1]
    order = order[first]
    # Then per user, best score first, and keep the top `want`.
    order = order[np.lexsort((-score[order], lu[order]))]
    lu_s = lu[order]
    distinct = np.bincount(lu_s, minlength=len(want))
    offsets = np.concatenate(([0], np.cumsum(distinct)[:-1]))
    rank = np.arange(len(order)) - offsets[lu_s]
    keep = order[rank < want[lu_s]]
    short = distinct < want
    keep = keep[~short[lu[keep]]]
    return lu[keep], item[keep], aff[keep], short


def _pick_full(
    rng: np.random.Generator,
    items: _Items,
    u_factors: np.ndarray,
    avail: np.ndarray,
    want: np.ndarray,
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Pick items by Gumbel-top-k over the whole released catalogue (exact sampling
    without replacement, proportional to popularity x exp(strength x affinity)).

    Used for users whose wants are a large share of what is released to them.

    Returns:
        ``(user_local, item, affinity)``.
    """
    n_items = len(items.movie_ids)
    rel_rank = np.empty(n_items, dtype=np.int64)
    rel_rank[items.rel_order] = np.arange(n_items)
    out_u, out_i, out_a = [], [], []
    for b in range(0, len(want), _FULL_BATCH):
        sl = slice(b, b + _FULL_BATCH)
        aff = u_factors[sl] @ items.factors.T
        score = _SELECT_STRENGTH * aff + items.log_pop[None, :].astype(np.float32)
        score += _gumbel(rng, aff.size).reshape(aff.shape)
        score[rel_rank[None, :] >= avail[sl, None]] = -np.inf
        for row, n in enumerate(want[sl]):
            top = np.argpartition(-score[row], n - 1)[:n] if n < n_items else np.arange(n_items)
            out_u.append(np.full(n, b + row, dtype=np.int64))
            out_i.append(top)
            out_a.append(aff[row, top])
    if not out_u:
        empty = np.empty(0, dtype=np.int64)
        return empty, empty, np.empty(0, dtype=np.float32)
    return np.concatenate(out_u), np.concatenate(out_i), np.concatenate(out_a)


def _gumbel(rng: np.random.Generator, n: int) -> np.ndarray:
    u = rng.random(n, dtype=np.float32)
    with np.errstate(divide="ignore"):
        return -np.log(-np.log(u))


def _timestamps(
    rng: np.random.Generator,
    items: _Items,
    start: np.ndarray,
    end: np.ndarray,
    want: np.ndarray,
    lu: np.ndarray,
    item: np.ndarray,
) -> np.ndarray:
    """Place each rating in one of its user's sessions held after the item's release."""
    n_users = len(want)
    n_sess = 1 + np.minimum(want - 1, rng.poisson(0.5 * want**0.6))
    su = np.repeat(np.arange(n_users), n_sess)
    frac = rng.random(len(su))
    sess_off = np.concatenate(([0], np.cumsum(n_sess)))
    # First session at the window start, last at its end (so all released items fit).
    frac[sess_off[:-1]] = 0.0
    frac[sess_off[1:] - 1] = 1.0
    order = np.lexsort((frac, su))
    frac = frac[order]
    t = start[su] + np.round(frac * (end[su] - start[su])).astype(np.int64)

    base = _SPAN_START - 10 * 365 * 86_400  # keeps offsets positive and < 2**32
    key = (su.astype(np.int64) << 32) | (t - base)
    release_rel = np.maximum(items.release[item] - base, 0)
    first = np.searchsorted(key, (lu.astype(np.int64) << 32) | release_rel, side="left")
    last = sess_off[lu + 1]
    chosen = first + np.floor(rng.random(len(lu)) * (last - first)).astype(np.int64)
    # Ratings in a session come minutes apart.
    return t[chosen] + rng.integers(0, 2 * 3600, len(lu))


def _ratings_values(
    rng: np.random.Generator,
    items: _Items,
    users: _Users,
    user: np.ndarray,
    item: np.ndarray,
    aff: np.ndarray,
    ts: np.ndarray,
) -> np.ndarray:
    latent = _RATING_MEAN + users.bias[user] + items.bias[item] + _RATING_AFFINITY * aff + rng.normal(0.0, _RATING_NOISE, len(user))
    whole = users.whole_stars[user] | (ts < _HALF_STARS_FROM)
    half = np.clip(np.round(latent * 2) / 2, 0.5, 5.0)
    full = np.clip(np.round(latent), 1.0, 5.0)
    return np.where(whole, full, half).astype(np.float32)


def _write_ratings(path: Path, spec: SynthSpec, items: _Items, users: _Users, *, progress: bool) -> int:
    cum = np.cumsum(users.counts)
    # Chunk boundaries at about every _CHUNK_RATINGS ratings (at least one user each).
    bounds = np.unique(
        np.concatenate(([0], np.searchsorted(cum, np.arange(_CHUNK_RATINGS, cum[-1], _CHUNK_RATINGS), side="right"), [spec.users]))
    )
    written = 0
    bar = tqdm(total=spec.ratings, desc="synthesize ratings", unit="rating", unit_scale=True, file=sys.stderr, disable=not progress)
    try:
        with path.open("wb") as fh:
            for c, (a, b) in enumerate(zip(bounds[:-1], bounds[1:])):
                rng = _rng(spec, _STREAM_RATINGS, c)
                frame = _ratings_chunk(rng, spec, items, users, int(a), int(b))
                frame.write_csv(fh, include_header=(c == 0))
                written += frame.height
                bar.update(frame.height)
    finally:
        bar.close()
    return written


def _ratings_chunk(rng: np.random.Generator, spec: SynthSpec, items: _Items, users: _Users, a: int, b: int) -> pl.DataFrame:
    want = users.counts[a:b]
    avail = users.avail[a:b]
    u_f = users.factors[a:b]
    # A pool of POOL_RATIO x want draws cannot yield `want` distinct items when that is
    # a big share of what is released: those users go to the exact full-catalogue path.
    full = (_POOL_RATIO * want + 16) * 2 > avail
    light = np.flatnonzero(~full)
    lu, item, aff, short = _pick_pool(rng, items, u_f[light], avail[light], want[light])
    lu = light[lu]
    heavy = np.concatenate((np.flatnonzero(full), light[short]))
    hu, hitem, haff = _pick_full(rng, items, u_f[heavy], avail[heavy], want[heavy])
    lu = np.concatenate((lu, heavy[hu]))
    item = np.concatenate((item, hitem))
    aff = np.concatenate((aff, haff)).astype(np.float32)

    ts = _timestamps(rng, items, users.start[a:b], users.end[a:b], want, lu, item)
    rating = _ratings_values(rng, items, users, a + lu, item, aff, ts)
    return pl.DataFrame(
        {
            "userId": (a + 1 + lu).astype(np.int64),
            "movieId": items.movie_ids[item],
            "rating": rating,
            "timestamp": ts.astype(np.int64),
        }
    ).sort(["userId", "movieId"])


# ------------------------------------------------------------------ movies and users


def _write_movies(path: Path, items: _Items) -> None:
    order = np.argsort(items.movie_ids, kind="stable")
    ids = items.movie_ids[order]
    years = items.year[order]
    genres = items.genres[order]
    titles = np.char.add("Synthetic Movie ", ids.astype(str))
    # A few titles lack the year, as some real ones do; chosen by id so it is stable.
    with_year = (ids * 2_654_435_761 % 1000) >= _NO_YEAR_SHARE * 1000
    titles = np.where(with_year, np.char.add(np.char.add(np.char.add(titles, " ("), years.astype(str)), ")"), titles)
    genre_names = np.asarray(GENRES, dtype=object)
    joined = ["|".join(genre_names[row]) or _NO_GENRES for row in genres]
    pl.DataFrame({"movieId": ids, "title": titles.tolist(), "genres": joined}).write_csv(path)


def _write_users(path: Path, users: _Users) -> None:
    n = len(users.counts)
    pl.DataFrame(
        {
            "userId": np.arange(1, n + 1, dtype=np.int64),
            "age": users.age,
            "gender": users.gender.tolist(),
            "occupation": users.occupation.tolist(),
            "zip": users.zip.tolist(),
        }
    ).write_csv(path)
