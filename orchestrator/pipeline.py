"""The online pipeline: history -> user_tower -> candidates -> ranker_ensemble -> MMR + rules -> top-K.

Candidates are FAISS top-N merged with the other candidate sources (item neighbours of the
window, popular lists: ``orchestrator/candidates.py``), exactly as evaluation merges them.

:meth:`Recommender.recommend` reads like the diagram; each stage is one call and one timed
block. What the stages share:

* the **history window** (the last ``H`` = ``RANKER_HISTORY`` movies and ratings, left-padded
  with -1 / 0) that the ranker's features read, and its last ``L`` that the user tower reads,
  cut exactly as offline (``orchestrator/contract.py``);
* the **user-tower call overlapped** with the candidate sources that need no user vector
  (``ServeSettings.overlap_user_tower``): the call runs on a pool thread, waiting on Triton
  with the GIL released, while this thread computes the item-neighbour, genre and popular
  lists; the ANN search and the merge follow once the vector is back;
* the **deadline**: every model call gets ``min(triton_timeout_s, time left)``. A model
  that fails or is too slow while the caller still has time yields the popular fallback
  (``is_fallback`` + reason); an expired deadline is DEADLINE_EXCEEDED, never a hang.

The pipeline trusts its inputs: the service validated them.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor, wait
from contextlib import contextmanager
from dataclasses import dataclass, field

import numpy as np

from orchestrator.backends import InferenceBackend
from orchestrator.catalog import Catalog, Filters
from orchestrator.contract import CANDIDATE_SOURCE_NAMES, RANKER_HISTORY, RANKER_MAX_ROWS, history_window
from orchestrator.drift import DriftSample, drift_sample
from orchestrator.errors import Deadline, DeadlineExceeded, InvalidArgument, ModelTimeout, ModelUnavailable, RecsysError, Unavailable
from orchestrator.rerank import PROMOTION_KINDS, RerankOptions, place_promotions, rerank
from orchestrator.settings import ServeSettings
from orchestrator.store import HistoryStore, UserHistory

NO_HISTORY = "no_history"
MODEL_UNAVAILABLE = "model_unavailable"
MODEL_TIMEOUT = "model_timeout"
HISTORY_UNAVAILABLE = "history_unavailable"
FALLBACK_VERSION = "popularity"

log = logging.getLogger(__name__)

RANK_ROWS_PER_CALL = RANKER_MAX_ROWS
"""Most candidate rows per ``ranker_ensemble`` call (``orchestrator/contract.py``)."""

_tower_pool: ThreadPoolExecutor | None = None
_tower_pool_lock = threading.Lock()


def tower_pool(threads: int) -> ThreadPoolExecutor:
    """The process-wide pool that runs user-tower calls overlapped with the other candidate
    sources (``ServeSettings.overlap_user_tower``): one for every version's pipeline, so a hot
    reload adds no threads. Created on first use with ``threads`` threads (the admission gate's
    ``max_in_flight``: no more Recommends than that are in flight), all started at once so the
    thread count stays flat."""
    global _tower_pool
    with _tower_pool_lock:
        if _tower_pool is None:
            _tower_pool = ThreadPoolExecutor(max_workers=threads, thread_name_prefix="recsys-tower")
            prestart_threads(_tower_pool, threads)
        return _tower_pool


def prestart_threads(pool: ThreadPoolExecutor, n: int) -> None:
    """Starts all ``n`` threads of ``pool`` now (it would grow them lazily, one per busy moment).

    Started up front, a pool's thread count is fixed from the start, so threads that appear
    later are leaks, not a pool growing (``recsys bench faults`` counts them). Used for the
    gRPC server's pool and for :func:`tower_pool`.
    """
    barrier = threading.Barrier(n)
    # every task waits for all the others: none finishes before n threads exist
    done = [pool.submit(barrier.wait, 10.0) for _ in range(n)]
    wait(done, timeout=15.0)


@dataclass(frozen=True)
class Query:
    """One Recommend, validated.

    Attributes:
        k: Results wanted.
        filters: Item filters.
        rerank: MMR and rules.
        user_id: Read the history from the store (exclusive with ``history``).
        history: Explicit movie ids, oldest first.
        ratings: Their ratings (0 = unknown), same length.
    """

    k: int
    filters: Filters
    rerank: RerankOptions
    user_id: int | None = None
    history: tuple[int, ...] | None = None
    ratings: tuple[float, ...] | None = None


@dataclass
class Result:
    """A list of items and how it was made.

    Attributes:
        items: int64 item indices, best first.
        scores: float32, aligned.
        explanations: One sentence per item.
        model_version: Model repository version, or ``popularity``.
        fallback: None, or ``no_history`` / ``model_unavailable`` / ``model_timeout``.
        timings_ms: Wall time per stage.
        ignored_movie_ids: Request history ids not in the catalog.
        history_length: Length of the window the model read.
        catalog: The catalog ``items`` index into (a hot reload may swap the served one
            while this answer is being built).
        variant: A/B arm that answered (``""`` without an experiment).
        dropped_promotions: Promoted movie ids not shown (filtered or seen).
        drift: What this model answer showed of the drift distributions (None for fallbacks
            and the non-personal RPCs; ``orchestrator/drift.py``).
    """

    items: np.ndarray
    scores: np.ndarray
    explanations: list[str]
    model_version: str
    fallback: str | None = None
    timings_ms: dict[str, float] = field(default_factory=dict)
    ignored_movie_ids: list[int] = field(default_factory=list)
    history_length: int = 0
    catalog: Catalog | None = None
    variant: str = ""
    dropped_promotions: list[int] = field(default_factory=list)
    drift: DriftSample | None = None


@dataclass(frozen=True)
class Window:
    """A user's history as the models see it.

    Attributes:
        long_items: int64 [H] the last ``RANKER_HISTORY`` item indices, -1 padded on the left
            (the ranker's window).
        long_ratings: float32 [H], 0 padded.
        seen: int64 every item index of the history.
        ignored: Movie ids that are not in the catalog.
        tower_len: ``L``: the user tower and the item-to-item source read the last ``L``
            (:attr:`items`).
    """

    long_items: np.ndarray
    long_ratings: np.ndarray
    seen: np.ndarray
    ignored: list[int]
    tower_len: int

    @property
    def items(self) -> np.ndarray:
        """int64 [L] the user tower's window (the last ``L`` of the ranker's)."""
        return self.long_items[-self.tower_len :]

    @property
    def ratings(self) -> np.ndarray:
        """float32 [L] its ratings."""
        return self.long_ratings[-self.tower_len :]

    @property
    def length(self) -> int:
        return int((self.items >= 0).sum())


class Timer:
    """Wall time per named stage, in milliseconds."""

    def __init__(self) -> None:
        self.ms: dict[str, float] = {}

    @contextmanager
    def __call__(self, stage: str) -> Iterator[None]:
        t0 = time.perf_counter()
        try:
            yield
        finally:
            self.ms[stage] = self.ms.get(stage, 0.0) + (time.perf_counter() - t0) * 1e3


class Recommender:
    """The pipeline over one catalog, one history store and one inference backend.

    Args:
        settings: Serving settings.
        catalog: Items, vectors, FAISS.
        store: User histories.
        backend: Where the user tower and the ranker run.
    """

    def __init__(self, settings: ServeSettings, catalog: Catalog, store: HistoryStore, backend: InferenceBackend):
        self.settings = settings
        self.catalog = catalog
        self.store = store
        self.backend = backend
        self.ann_only = settings.candidate_sources == "two_tower"
        # the pool that overlaps the user-tower call with the other sources (None: run in turn),
        # started now, not on the first request
        self.tower = tower_pool(settings.max_in_flight) if settings.overlap_user_tower and not self.ann_only else None

    def recommend(self, q: Query, deadline: Deadline) -> Result:
        """Top-``q.k`` movies for a user or a history (see the module docstring)."""
        t = Timer()
        with t("history"):
            window, reason = self.window(q)
        if window.length == 0:
            return self.fallback(q, window, reason, t)  # cold start: popular
        allowed, exclude = self.catalog.allowed(q.filters), self.catalog.excluded(q.filters, window.seen)
        k = self.settings.retrieve_k
        try:
            with t("user_tower"):
                if self.tower is not None:
                    # the sources that need no user vector run here while the tower call is in flight
                    pending = self.tower.submit(self.user_vector, q, window, deadline)
                    side = self.catalog.side_lists(window.items, k, allowed, exclude)
                    user = pending.result()
                else:
                    user, side = self.user_vector(q, window, deadline), None
            with t("retrieval"):
                cand, sims, sources = self.catalog.candidates(user, window.items, k, allowed, exclude, self.ann_only, side)
            with t("ranking"):
                scores = self.rank(cand, sims, sources, window, deadline)
        except ModelUnavailable as exc:
            return self.fallback(q, window, self.reason(exc, deadline), t)  # Triton down or slow
        with t("reranking"):
            picked = self.rerank(cand, scores, q.k + len(q.rerank.promotions), q.rerank)
        sample = self.sample(window, user, sims[picked], scores[picked], cand[picked])
        return self.result(cand[picked], scores[picked], window, t, q, sample)

    def recommend_many(self, queries: Sequence[Query], deadline: Deadline) -> list[Result | RecsysError]:
        """:meth:`recommend` for many queries, the models called in batches (BatchRecommend).

        One user-tower call for every query with a history; FAISS and MMR per query (filters
        differ); the ranker on whole users, ``batch_rank_users`` a call, ``batch_rank_lanes``
        calls in flight (:meth:`_rank_many`). A user with fewer candidates than ``retrieve_k``
        is padded with copies of its last candidate, whose scores are dropped. A model
        failure falls every query of the batch back to the popular movies, as for one.

        Returns:
            Per query, in order, its Result or the error that query alone raised (e.g. an
            unknown genre: InvalidArgument); errors of the whole batch (DeadlineExceeded) raise.
        """
        results: list[Result | RecsysError | None] = [None] * len(queries)
        timers = [Timer() for _ in queries]
        windows: list[Window] = []
        filters: dict[int, tuple[np.ndarray | None, np.ndarray]] = {}
        for i, q in enumerate(queries):
            with timers[i]("history"):
                window, reason = self.window(q)
            windows.append(window)
            try:
                filters[i] = (self.catalog.allowed(q.filters), self.catalog.excluded(q.filters, window.seen))
                self.promoted_items(q)
            except RecsysError as exc:  # this query's own fault: its failure, not the batch's
                results[i] = exc
                continue
            if window.length == 0:
                results[i] = self.fallback(q, window, reason, timers[i])
        todo = [i for i, r in enumerate(results) if r is None]
        if not todo:
            return results  # type: ignore[return-value]
        try:
            t0 = time.perf_counter()
            hist = np.stack([windows[i].items for i in todo])
            rats = np.stack([windows[i].ratings for i in todo])
            demo = np.concatenate([self.catalog.demographics_of(queries[i].user_id) for i in todo])
            users = self.backend.user_embedding(hist, rats, demo, timeout_s=self.timeout(deadline, "user tower"))
            tower_ms = (time.perf_counter() - t0) * 1e3
            cands: dict[int, tuple[np.ndarray, np.ndarray, np.ndarray]] = {}
            for j, i in enumerate(todo):
                timers[i].ms["user_tower"] = tower_ms
                with timers[i]("retrieval"):
                    cands[i] = self.catalog.candidates(users[j], windows[i].items, self.settings.retrieve_k, *filters[i], self.ann_only)
            scores = self._rank_many(cands, windows, deadline, timers)
        except ModelUnavailable as exc:
            reason = self.reason(exc, deadline)
            for i in todo:
                results[i] = self.fallback(queries[i], windows[i], reason, timers[i])
            return results  # type: ignore[return-value]
        j_of = {i: j for j, i in enumerate(todo)}
        for i in todo:
            cand = cands[i][0]
            q = queries[i]
            with timers[i]("reranking"):
                picked = self.rerank(cand, scores[i], q.k + len(q.rerank.promotions), q.rerank)
            sample = self.sample(windows[i], users[j_of[i]], cands[i][1][picked], scores[i][picked], cand[picked])
            results[i] = self.result(cand[picked], scores[i][picked], windows[i], timers[i], q, sample)
        return results  # type: ignore[return-value]

    def _rank_many(
        self, cands: dict[int, tuple[np.ndarray, np.ndarray, np.ndarray]], windows: list[Window], deadline: Deadline, timers: list[Timer]
    ) -> dict[int, np.ndarray]:
        """Ranker scores of several users' candidates, whole users per call (see :meth:`recommend_many`).

        Every call has one shape, ``batch_rank_users`` users x ``retrieve_k`` candidates (the last
        group padded with copies of its last user): onnxruntime's first runs of a new shape are
        several times slower, and :meth:`warm_up` has run this one. Up to ``batch_rank_lanes``
        calls are in flight at once (the tower pool runs the other lanes).
        """
        scores = {i: np.zeros(0, np.float32) for i, (c, _, _) in cands.items() if len(c) == 0}
        ranked = [i for i, (c, _, _) in cands.items() if len(c)]
        width = max([self.settings.retrieve_k, *(len(cands[i][0]) for i in ranked)])
        per_call = max(1, min(self.settings.batch_rank_users, RANK_ROWS_PER_CALL // width))
        groups = [ranked[lo : lo + per_call] for lo in range(0, len(ranked), per_call)]

        def rank_group(group: list[int]) -> None:
            t0 = time.perf_counter()
            rows = [*group, *[group[-1]] * (per_call - len(group))]  # padding users: scores dropped
            items = np.zeros((per_call, width), np.int64)
            sims = np.zeros((per_call, width), np.float32)
            sources = np.zeros((per_call, width, len(CANDIDATE_SOURCE_NAMES)), np.float32)
            for r, i in enumerate(rows):
                c, s, src = cands[i]
                items[r], sims[r], sources[r] = c[-1], s[-1], src[-1]  # padding: copies of the last candidate, dropped below
                items[r, : len(c)], sims[r, : len(c)], sources[r, : len(c)] = c, s, src
            out = self.backend.rank(
                items.reshape(-1),
                sims.reshape(-1),
                np.tile(np.arange(width, dtype=np.float32), per_call),
                np.stack([windows[i].long_items for i in rows]),
                np.stack([windows[i].long_ratings for i in rows]),
                sources.reshape(-1, len(CANDIDATE_SOURCE_NAMES)),
                timeout_s=self.timeout(deadline, "ranking"),
            ).reshape(per_call, width)
            ms = (time.perf_counter() - t0) * 1e3
            for r, i in enumerate(group):
                scores[i] = out[r, : len(cands[i][0])]
                timers[i].ms["ranking"] = ms

        def lane(part: list[list[int]]) -> None:
            for group in part:
                rank_group(group)

        if not groups:
            return scores  # no user has a candidate (e.g. every item seen or filtered out)
        lanes = min(self.settings.batch_rank_lanes, len(groups)) if self.tower is not None else 1
        others = [self.tower.submit(lane, groups[j::lanes]) for j in range(1, lanes)] if self.tower is not None else []
        try:
            lane(groups[::lanes])
        finally:
            for f in others:
                f.result()  # every lane finished (and its error raised) before the scores are read
        return scores

    # ------------------------------------------------------------------ stages

    def window(self, q: Query) -> tuple[Window, str]:
        """The history window from the request or the store, and the fallback reason if it is empty.

        Unknown movies are dropped (and reported for request histories). A store that cannot
        be read gives an empty window: the popular movies can still answer.
        """
        reason = NO_HISTORY
        seen_movies: np.ndarray | None
        if q.history is not None:
            movies = np.asarray(q.history, np.int64)
            ratings = np.asarray(q.ratings if q.ratings else np.zeros(len(movies)), np.float32)
            seen_movies = movies
        else:
            try:
                h, seen_movies = self.stored_window(q.user_id) if q.user_id is not None else (UserHistory.empty(), None)
            except Unavailable as exc:
                log.warning("history of user %s unavailable, serving popular: %s", q.user_id, exc)
                h, seen_movies, reason = UserHistory.empty(), None, HISTORY_UNAVAILABLE
            movies, ratings = h.movie_ids, h.ratings
        items = self.catalog.to_items(movies)
        known = items >= 0
        # reported only for request histories: stored ones may name movies a retrain dropped
        ignored = sorted(set(movies[~known].tolist())) if q.history is not None else []
        items, ratings = items[known], ratings[known]
        win_items, win_ratings = history_window(items, ratings, RANKER_HISTORY)  # as in training
        seen = self.catalog.to_items(seen_movies) if seen_movies is not None else items
        return Window(win_items, win_ratings, np.unique(seen[seen >= 0]), ignored, self.catalog.history_len), reason

    def stored_window(self, user_id: int) -> tuple[UserHistory, np.ndarray]:
        """The stored interactions the window needs (the last ``H`` the catalog knows) and the seen set.

        Reads ``H`` = ``RANKER_HISTORY`` rows, not the whole history; more (x4 each time) only
        while movies the catalog no longer has leave the window short and older rows remain.
        """
        H = RANKER_HISTORY
        n = H
        while True:
            h, seen = self.store.recent(int(user_id), n)
            if len(h) < n or int((self.catalog.to_items(h.movie_ids) >= 0).sum()) >= H:
                return h, seen
            n *= 4

    def user_vector(self, q: Query, window: Window, deadline: Deadline) -> np.ndarray:
        """The user tower's vector for the window (demographics of known users, else unknown)."""
        demo = self.catalog.demographics_of(q.user_id)
        return self.backend.user_embedding(window.items[None], window.ratings[None], demo, timeout_s=self.timeout(deadline, "user tower"))[
            0
        ]

    def timeout(self, deadline: Deadline, stage: str) -> float:
        """Time a model call may take: ``triton_timeout_s`` capped by the deadline."""
        return min(self.settings.triton_timeout_s, deadline.check(stage))

    def rank(self, cand: np.ndarray, sims: np.ndarray, sources: np.ndarray, window: Window, deadline: Deadline) -> np.ndarray:
        """Ranker scores of the candidates (the history window sent once, not once per candidate)."""
        if len(cand) == 0:
            return np.zeros(0, np.float32)
        ranks = np.arange(len(cand), dtype=np.float32)  # 0-based merge order, as the ranker was trained
        return self.backend.rank(
            cand, sims, ranks, window.long_items[None], window.long_ratings[None], sources, timeout_s=self.timeout(deadline, "ranking")
        )

    def rerank(self, cand: np.ndarray, scores: np.ndarray, k: int, options: RerankOptions) -> np.ndarray:
        """Positions into ``cand`` after MMR, freshness and the per-genre quota."""
        cat = self.catalog
        return rerank(scores, cat.mmr_vectors[cand], k, options, cat.freshness(cand), cat.genre_matrix[cand])

    def sample(self, window: Window, user: np.ndarray, sims: np.ndarray, scores: np.ndarray, items: np.ndarray) -> DriftSample:
        """The drift sample of a model answer (returned items best first)."""
        return drift_sample(window.items, user, sims, scores, items, self.catalog.popularity, self.catalog.genre_matrix)

    def result(
        self, items: np.ndarray, scores: np.ndarray, window: Window, t: Timer, q: Query | None = None, drift: DriftSample | None = None
    ) -> Result:
        """The model's answer, each item explained by the most similar movie of the history
        (the promotions of ``q`` pinned in)."""
        because = self.catalog.nearest_in(items, window.items[window.items >= 0])
        explain = [f"because you watched {self.catalog.titles[h]}" if h >= 0 else "" for h in because]
        items, scores, explain, dropped = self.promote(q, window, items, scores, explain)
        res = Result(
            items, scores, explain, self.backend.model_version, None, t.ms, window.ignored, window.length, self.catalog, drift=drift
        )
        res.dropped_promotions = dropped
        return res

    def promoted_items(self, q: Query) -> np.ndarray:
        """Item indices of ``q``'s promotions.

        Raises:
            InvalidArgument: A promoted movie is not in the catalog.
        """
        ids = [p.movie_id for p in q.rerank.promotions]
        items = self.catalog.to_items(ids)
        for n, (movie, item) in enumerate(zip(ids, items.tolist())):
            if item < 0:
                raise InvalidArgument(f"rerank.promotions[{n}].movie_id {movie} is not in the catalog ({self.catalog.n_items} movies)")
        return items

    def promote(
        self, q: Query | None, window: Window, items: np.ndarray, scores: np.ndarray, explain: list[str]
    ) -> tuple[np.ndarray, np.ndarray, list[str], list[int]]:
        """The first ``q.k`` of a list with ``q``'s promotions pinned in (:func:`place_promotions`).

        A promotion the filters exclude or the user has seen is dropped, as any other movie
        would be. Promoted items score 0 and are explained by their kind.

        Returns:
            ``(items, scores, explanations, dropped promoted movie ids)``.
        """
        if q is None or not q.rerank.promotions:
            k = len(items) if q is None else q.k
            return items[:k], scores[:k], explain[:k], []
        promos = q.rerank.promotions
        promoted = self.promoted_items(q)
        allowed = self.catalog.allowed(q.filters)
        ok = ~np.isin(promoted, self.catalog.excluded(q.filters, window.seen))
        if allowed is not None:
            ok &= allowed[promoted]
        shown = [p for p, keep in zip(promos, ok.tolist()) if keep]
        out, source = place_promotions(items, q.k, promoted[ok], np.array([p.position for p in shown], np.int64))
        at = {int(i): n for n, i in enumerate(items.tolist())}
        new_scores = np.array([0.0 if j >= 0 else scores[at[i]] for i, j in zip(out.tolist(), source.tolist())], np.float32)
        new_explain = [PROMOTION_KINDS[shown[j].kind] if j >= 0 else explain[at[i]] for i, j in zip(out.tolist(), source.tolist())]
        return out, new_scores, new_explain, [p.movie_id for p, keep in zip(promos, ok.tolist()) if not keep]

    def reason(self, exc: ModelUnavailable, deadline: Deadline) -> str:
        """The fallback reason for a model failure, or DEADLINE_EXCEEDED when no time is left."""
        # a timeout bound by the caller's deadline leaves no time to serve anything else
        if isinstance(exc, ModelTimeout) and deadline.remaining() <= 0:
            raise DeadlineExceeded("deadline exceeded while waiting for the models") from exc
        return MODEL_TIMEOUT if isinstance(exc, ModelTimeout) else MODEL_UNAVAILABLE

    def fallback(self, q: Query, window: Window, reason: str, t: Timer) -> Result:
        """The popular movies that pass the filters (the user's seen ones excluded)."""
        allowed, exclude = self.catalog.allowed(q.filters), self.catalog.excluded(q.filters, window.seen)
        with t("reranking"):
            items, counts = self.catalog.popular(q.k + len(q.rerank.promotions), False, allowed, exclude)
            explain = [f"popular: {int(c)} ratings" for c in counts]
            items, counts, explain, dropped = self.promote(q, window, items, counts, explain)
        res = Result(items, counts, explain, FALLBACK_VERSION, reason, t.ms, window.ignored, window.length, self.catalog)
        res.dropped_promotions = dropped
        return res

    def warm_up(self, calls: int) -> float:
        """Runs ``calls`` full model paths on a synthetic history (the most popular movies).

        The first calls after a start pay one-off costs (onnxruntime's first run of each
        shape, the Triton client's connection, FAISS' first search): ~100 ms instead of ~10.
        The health service turns SERVING only after this ran, so no user pays them.

        Returns:
            Seconds spent (0.0 when ``calls`` is 0). Model failures are logged, not raised:
            health reports the backend's readiness, not the warm-up's.
        """
        t0 = time.perf_counter()
        items, _ = self.catalog.popular(self.catalog.history_len, False, None, np.zeros(0, np.int64))
        # the L most popular (the rest of the catalog stays candidates), the most popular last, as the most recent, each rated 4
        hist, rats = history_window(items[::-1], np.full(len(items), 4.0, np.float32), RANKER_HISTORY)
        window = Window(hist, rats, np.unique(items), [], self.catalog.history_len)
        query = Query(
            k=10,
            filters=Filters(),
            rerank=RerankOptions(self.settings.mmr_lambda, self.settings.mmr_pool, penalty=self.settings.mmr_penalty),
        )
        for _ in range(calls):
            deadline = Deadline(None, max(self.settings.triton_timeout_s, 1.0))
            try:
                user = self.user_vector(query, window, deadline)
                cand, sims, sources = self.catalog.candidates(
                    user, window.items, self.settings.retrieve_k, None, window.seen, self.ann_only
                )
                scores = self.rank(cand, sims, sources, window, deadline)
                self.rerank(cand, scores, query.k, query.rerank)
            except (ModelUnavailable, DeadlineExceeded) as exc:
                log.warning("warm-up call failed (%s); serving continues cold", exc)
                return time.perf_counter() - t0
        if calls:  # BatchRecommend's one ranker shape, twice on each lane (each Triton instance's first runs)
            n = 2 * self.settings.batch_rank_users * self.settings.batch_rank_lanes
            try:
                for _ in range(2):
                    deadline = Deadline(None, max(self.settings.triton_timeout_s, 1.0))
                    self._rank_many({i: (cand, sims, sources) for i in range(n)}, [window] * n, deadline, [Timer() for _ in range(n)])
            except (ModelUnavailable, DeadlineExceeded) as exc:
                log.warning("batch warm-up failed (%s); serving continues cold", exc)
        return time.perf_counter() - t0

    # ------------------------------------------------------------------ the other RPCs

    def similar(self, movie_id: int, k: int, filters: Filters, options: RerankOptions, user_id: int | None, deadline: Deadline) -> Result:
        """Nearest movies to one movie by item-embedding cosine, filtered, optionally MMR-diversified."""
        t = Timer()
        item = self.catalog.item_of(movie_id)
        seen = self.store.recent(user_id, 0)[1] if user_id is not None else None
        seen_items = self.catalog.to_items(seen) if seen is not None else None
        exclude = np.union1d(self.catalog.excluded(filters, seen_items), [item])
        deadline.check("retrieval")
        with t("retrieval"):
            cand, sims = self.catalog.retrieve(self.catalog.vectors[item], max(k, options.pool), self.catalog.allowed(filters), exclude)
        with t("reranking"):
            picked = self.rerank(cand, sims, k, options)
        title = self.catalog.titles[item]
        return Result(
            cand[picked],
            sims[picked],
            [f"similar to {title}"] * len(picked),
            self.backend.model_version,
            timings_ms=t.ms,
            catalog=self.catalog,
        )

    def popular(self, k: int, recent: bool, filters: Filters) -> Result:
        """The most rated movies passing the filters."""
        t = Timer()
        with t("retrieval"):
            items, counts = self.catalog.popular(k, recent, self.catalog.allowed(filters), self.catalog.excluded(filters))
        when = "in the last 30 days" if recent else "overall"
        explain = [f"popular {when}: {int(c)} ratings" for c in counts]
        return Result(items, counts, explain, FALLBACK_VERSION, timings_ms=t.ms, catalog=self.catalog)

    def record(self, user_id: int, movie_id: int, rating: float, timestamp_s: int) -> tuple[bool, int]:
        """Appends an interaction (the movie must be in the catalog)."""
        self.catalog.item_of(movie_id)
        return self.store.record(user_id, movie_id, rating, timestamp_s)
