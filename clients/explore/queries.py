"""What the explorer's JSON endpoints do: query-string parameters in, one API call, JSON out.

Each endpoint is one call of the public API through the typed client
(:meth:`clients.client.RecsysClient.answer`, which also returns the call's request id).
Parameters are only *parsed* here (a number must look like a number); their ranges are left
to the API, so a person who types k = 900 reads the server's own message, the one every
other client gets. The page's URL uses the same parameter names, which makes a page link and
the JSON call it makes one and the same thing.

Parameters (all optional unless said):

=================  ==========================================================================
``user``           user id (Recommend by stored history); or
``history``        comma-separated movie ids, oldest first, with ``ratings`` aligned (0 =
                   watched, unrated)
``k``              number of movies (default 10)
``genre``          genre names, comma-separated or repeated (any-of)
``min_year``,      release year bounds
``max_year``
``min_rating``     lowest mean rating (stars)
``exclude``        comma-separated movie ids never to return
``include_seen``   ``1``: also return movies the user rated
``mmr_lambda``     MMR trade-off (1 = ranker order, 0 = most diverse); empty = server default
``pool``           candidates MMR chooses from; empty = server default
``freshness``      weight of release-year freshness
``max_per_genre``  per-genre quota
``movie``          Similar: the movie (required)
``window``         Popular: ``all`` (default) or ``recent``
=================  ==========================================================================
"""

from __future__ import annotations

import time
from collections.abc import Mapping, Sequence
from typing import Any

from clients.client import RecsysClient, popular_request, recommend_request, similar_request
from clients.errors import RecsysRpcError
from clients.explore.catalog import MovieTable
from protos.recsys.v1 import recsys_pb2 as pb

Query = Mapping[str, Sequence[str]]
"""A parsed query string (``urllib.parse.parse_qs``): name -> every value given."""


DEFAULT_K = 10
"""Movies per list when the page does not say."""


class BadParameter(ValueError):
    """A parameter the explorer cannot even parse (not a number where one is needed)."""


def _text(q: Query, name: str) -> str | None:
    values = [v.strip() for v in q.get(name, ()) if v.strip()]
    return values[-1] if values else None


def _int(q: Query, name: str) -> int | None:
    value = _text(q, name)
    if value is None:
        return None
    try:
        return int(value)
    except ValueError:
        raise BadParameter(f"{name} must be a whole number, got {value!r}") from None


def _float(q: Query, name: str) -> float | None:
    value = _text(q, name)
    if value is None:
        return None
    try:
        return float(value)
    except ValueError:
        raise BadParameter(f"{name} must be a number, got {value!r}") from None


def _k(q: Query) -> int:
    k = _int(q, "k")
    return DEFAULT_K if k is None else k  # k = 0 goes to the API, which says what k may be


def _list(q: Query, name: str) -> list[str]:
    return [part.strip() for v in q.get(name, ()) for part in v.split(",") if part.strip()]


def _ints(q: Query, name: str) -> list[int]:
    try:
        return [int(x) for x in _list(q, name)]
    except ValueError:
        raise BadParameter(f"{name} must be comma-separated whole numbers, got {','.join(q.get(name, ()))!r}") from None


def _floats(q: Query, name: str) -> list[float]:
    try:
        return [float(x) for x in _list(q, name)]
    except ValueError:
        raise BadParameter(f"{name} must be comma-separated numbers, got {','.join(q.get(name, ()))!r}") from None


def filter_options(q: Query) -> dict[str, Any]:
    """``Filters`` keyword arguments of the client from the query (unset ones left out)."""
    out: dict[str, Any] = {
        "genres": _list(q, "genre") or None,
        "min_year": _int(q, "min_year"),
        "max_year": _int(q, "max_year"),
        "min_mean_rating": _float(q, "min_rating"),
        "exclude_movie_ids": _ints(q, "exclude") or None,
    }
    return {k: v for k, v in out.items() if v is not None}


def rerank_options(q: Query) -> dict[str, Any]:
    """``include_seen`` and the ``Rerank`` keyword arguments (unset ones left out: server defaults)."""
    out: dict[str, Any] = {
        "include_seen": True if _text(q, "include_seen") in ("1", "true", "on") else None,
        "mmr_lambda": _float(q, "mmr_lambda"),
        "candidate_pool": _int(q, "pool"),
        "freshness_weight": _float(q, "freshness"),
        "max_per_genre": _int(q, "max_per_genre"),
    }
    return {k: v for k, v in out.items() if v is not None}


def _items(items: Sequence[pb.RecommendedItem]) -> list[dict]:
    return [
        {
            "movie_id": int(i.movie_id),
            "title": i.title,
            "genres": list(i.genres),
            "year": int(i.year),
            "score": float(i.score),
            "explanation": i.explanation,
        }
        for i in items
    ]


class Explorer:
    """The explorer's calls: one API call each, answered as JSON-ready dicts.

    Args:
        client: A connected typed client (API key and TLS already configured).
        target: The orchestrator's ``host:port`` (shown on the page).
        movies: The item table for title search and history display, or None.
    """

    def __init__(self, client: RecsysClient, target: str, movies: MovieTable | None = None):
        self.client = client
        self.target = target
        self.movies = movies

    def _ask(self, request: pb.RecommendRequest | pb.SimilarRequest | pb.PopularRequest) -> tuple[Any, dict]:
        t0 = time.perf_counter()
        response, request_id = self.client.answer(request)
        # the explorer's own round trip: the server's latency_ms plus the network and gRPC
        return response, {"request_id": request_id, "round_trip_ms": (time.perf_counter() - t0) * 1e3}

    def info(self) -> dict:
        """What the page shows in its header: target, the server's health, the catalog."""
        try:
            health = self.client.health(timeout_s=2.0)
        except RecsysRpcError as exc:
            health = f"{exc.code.name}: {exc.details}"
        catalog = None
        if self.movies is not None:
            catalog = {"source": self.movies.source, "movies": len(self.movies), "genres": self.movies.genres}
        return {"target": self.target, "health": health, "catalog": catalog}

    def recommend(self, q: Query) -> dict:
        """Recommend for ``user`` or for ``history`` (+ ``ratings``).

        Raises:
            BadParameter: Neither or both subjects, or an unparsable value.
            RecsysRpcError: The API refused the request.
        """
        user, history = _int(q, "user"), _ints(q, "history")
        if (user is None) == (not history):
            raise BadParameter("give a user id, or a history of movies (one of them)")
        ratings = _floats(q, "ratings") if history else []
        options = {**filter_options(q), **rerank_options(q)}
        k = _k(q)
        if user is not None:
            request = recommend_request(user, k=k, **options)
        else:
            request = recommend_request(history=history, ratings=ratings, k=k, **options)
        resp, meta = self._ask(request)
        shown_history = None
        if history:
            # the typed history, described from the item table; the API has no call that
            # returns a stored user's history, so by user id the page can only show its length
            given = ratings if len(ratings) == len(history) else [0.0] * len(history)
            shown_history = [self._describe(m, r) for m, r in zip(history, given)]
        t = resp.timings
        return {
            **meta,
            "items": _items(resp.items),
            "model_version": resp.model_version,
            "variant": resp.variant,
            "is_fallback": resp.is_fallback,
            "fallback_reason": pb.FallbackReason.Name(resp.fallback_reason) if resp.is_fallback else "",
            "latency_ms": float(resp.latency_ms),
            "timings": {
                "history_ms": float(t.history_ms),
                "user_tower_ms": float(t.user_tower_ms),
                "retrieval_ms": float(t.retrieval_ms),
                "ranking_ms": float(t.ranking_ms),
                "reranking_ms": float(t.reranking_ms),
            },
            "ignored_movie_ids": [int(m) for m in resp.ignored_movie_ids],
            "history_length": int(resp.history_length),
            "history": shown_history,
        }

    def _describe(self, movie_id: int, rating: float) -> dict:
        found = self.movies.get(movie_id) if self.movies is not None else None
        row = found.to_json() if found else {"movie_id": movie_id, "title": "", "genres": [], "year": 0}
        return {**row, "rating": rating, "known": found is not None}

    def similar(self, q: Query) -> dict:
        """Similar to ``movie`` (filters, MMR, and ``user`` whose seen movies are excluded)."""
        movie = _int(q, "movie")
        if movie is None:
            raise BadParameter("give the movie to find similar movies to (movie=ID)")
        request = similar_request(movie, k=_k(q), user_id=_int(q, "user"), **filter_options(q), **rerank_options(q))
        resp, meta = self._ask(request)
        found = self.movies.get(movie) if self.movies is not None else None
        return {
            **meta,
            "movie": found.to_json() if found else {"movie_id": movie, "title": "", "genres": [], "year": 0},
            "items": _items(resp.items),
            "model_version": resp.model_version,
            "latency_ms": float(resp.latency_ms),
        }

    def popular(self, q: Query) -> dict:
        """Popular overall or in the recent ``window``, with filters (genre, years, rating)."""
        window = _text(q, "window") or "all"
        if window not in ("all", "recent"):
            raise BadParameter(f"window must be 'all' or 'recent', got {window!r}")
        request = popular_request(k=_k(q), recent=window == "recent", **filter_options(q))
        resp, meta = self._ask(request)
        return {**meta, "window": window, "items": _items(resp.items), "latency_ms": float(resp.latency_ms)}

    def search(self, q: Query) -> dict:
        """Title search (``q``) or lookup (``ids``) in the item table.

        Raises:
            LookupError: The explorer was started without an item table.
        """
        if self.movies is None:
            raise LookupError("title search needs the item table: start `recsys explore` with --artifacts DIR")
        ids = _ints(q, "ids")
        if ids:
            found = [self.movies.get(m) for m in ids]
            return {"movies": [m.to_json() for m in found if m is not None]}
        limit = max(1, min(_int(q, "limit") or 12, 50))
        return {"movies": [m.to_json() for m in self.movies.search(_text(q, "q") or "", limit)]}
