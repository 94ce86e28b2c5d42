"""The gRPC service on a real server (port 0) with the in-process backend over the exported ONNX files.

``TestRecommenderAPI`` holds the backend-agnostic tests; test_online_integration.py runs the
same class against the real embedded Triton. The rest of this module covers what only an
in-process stack can provoke cheaply: slow, failing and not-ready backends.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import grpc
import numpy as np
import pandas as pd
import pytest
from grpc_reflection.v1alpha.proto_reflection_descriptor_database import ProtoReflectionDescriptorDatabase

from clients import errors as E
from clients.cli import main
from clients.client import AsyncRecsysClient, RecsysClient, recommend_request
from orchestrator.backends import InProcessBackend
from orchestrator.catalog import Catalog, Filters
from orchestrator.errors import Deadline, ModelError, ModelTimeout, ModelUnavailable, Unavailable
from orchestrator.pipeline import Query
from orchestrator.rerank import RerankOptions, intra_list_diversity
from orchestrator.service import create_server
from orchestrator.settings import ServeSettings
from protos.recsys.v1 import recsys_pb2 as pb

UNKNOWN_MOVIE = 999_999
NEW_USER = 10_000_001


@dataclass
class Api:
    """A started stack: the client, the server, and facts about the tiny data for assertions."""

    client: RecsysClient
    server: object
    catalog: Catalog
    ratings: pd.DataFrame
    user: int  # a user with a moderate history

    def seen(self, user: int) -> set[int]:
        return set(self.ratings.loc[self.ratings.user_id == user, "movie_id"].tolist())


def make_api(artifacts: Path, repo: Path, db: Path, **settings) -> tuple[Api, object]:
    s = ServeSettings(artifacts_dir=artifacts, model_repository=repo, history_db_path=db, port=0, health_poll_s=0.2, **settings)
    server, port = create_server(s)
    server.start()
    client = RecsysClient(f"127.0.0.1:{port}", timeout_s=10)
    client.wait_until_serving(60)
    ratings = pd.read_parquet(artifacts / "interactions.parquet")
    counts = ratings.user_id.value_counts()
    user = int(counts[(counts >= 8) & (counts <= 20)].index[0])
    return Api(client, server, server.recommender.catalog, ratings, user), server


@pytest.fixture(scope="module")
def api(tiny_artifacts, tiny_repository, tmp_path_factory) -> Iterator[Api]:
    a, server = make_api(tiny_artifacts, tiny_repository, tmp_path_factory.mktemp("svc") / "history.sqlite")
    yield a
    a.client.close()
    server.stop()


def ids(resp) -> list[int]:
    return [i.movie_id for i in resp.items]


def code_of(excinfo) -> grpc.StatusCode:
    return excinfo.value.code


class TestRecommenderAPI:
    """Every RPC, filter and error class through the real client; backend-agnostic."""

    def test_recommend_by_user(self, api):
        resp = api.client.recommend(api.user, k=5)
        assert len(resp.items) == 5 and not resp.is_fallback
        assert not set(ids(resp)) & api.seen(api.user)  # seen excluded by default
        assert resp.model_version == "1" and resp.history_length > 0
        assert all(i.explanation.startswith("because you watched ") for i in resp.items)
        t = resp.timings
        assert t.user_tower_ms > 0 and t.retrieval_ms > 0 and t.ranking_ms > 0 and t.reranking_ms > 0
        assert resp.latency_ms >= t.user_tower_ms + t.ranking_ms
        row = api.catalog.item_of(resp.items[0].movie_id)
        assert resp.items[0].title == api.catalog.titles[row] and list(resp.items[0].genres) == api.catalog.genres[row]

    def test_include_seen_returns_seen_movies(self, api):
        resp = api.client.recommend(api.user, k=100, include_seen=True, mmr_lambda=1.0, candidate_pool=100)
        assert set(ids(resp)) & api.seen(api.user)

    def test_recommend_by_history_reports_unknown_ids(self, api):
        history = [int(m) for m in api.catalog.movie_ids[:3]]
        resp = api.client.recommend(history=[*history, UNKNOWN_MOVIE], ratings=[5, 4, 0, 3], k=4)
        assert list(resp.ignored_movie_ids) == [UNKNOWN_MOVIE] and resp.history_length == 3
        assert not resp.is_fallback and len(resp.items) == 4 and not set(ids(resp)) & set(history)

    def test_cold_start_falls_back_to_popular(self, api):
        resp = api.client.recommend(NEW_USER, k=5)
        assert resp.is_fallback and resp.fallback_reason == pb.FALLBACK_REASON_NO_HISTORY
        assert ids(resp) == ids(api.client.popular(k=5)) and resp.model_version == "popularity"
        only_unknown = api.client.recommend(history=[UNKNOWN_MOVIE], k=3)
        assert only_unknown.fallback_reason == pb.FALLBACK_REASON_NO_HISTORY and list(only_unknown.ignored_movie_ids) == [UNKNOWN_MOVIE]

    @pytest.mark.parametrize(
        "options",
        [
            {"genres": ["drama", "Horror"]},
            {"min_year": 1990, "max_year": 2005},
            {"min_mean_rating": 3.5},
            {"genres": ["Comedy"], "min_year": 1980, "min_mean_rating": 3.0},
        ],
    )
    def test_filters_hold_for_every_rpc(self, api, options):
        cat = api.catalog
        movie = int(cat.movie_ids[int(np.argmax(cat.popularity))])
        responses = [
            api.client.recommend(api.user, k=10, **options),
            api.client.recommend(history=[movie], k=10, **options),
            api.client.similar(movie, k=10, **options),
            api.client.popular(k=10, **options),
        ]
        mask = cat.allowed(
            Filters(tuple(options.get("genres", ())), options.get("min_year"), options.get("max_year"), options.get("min_mean_rating"))
        )
        for resp in responses:
            assert resp.items, options
            for m in ids(resp):
                assert mask[cat.item_of(m)], (options, m)

    def test_exclude_ids(self, api):
        first = ids(api.client.recommend(api.user, k=5))
        again = ids(api.client.recommend(api.user, k=5, exclude_movie_ids=first[:2]))
        assert not set(first[:2]) & set(again)

    def test_mmr_diversity_rises_as_lambda_falls(self, api):
        cat = api.catalog
        ild = {}
        for lam in (1.0, 0.5, 0.0):
            resp = api.client.recommend(api.user, k=10, mmr_lambda=lam, candidate_pool=50)
            ild[lam] = intra_list_diversity(cat.mmr_vectors[[cat.item_of(m) for m in ids(resp)]])
        assert ild[0.0] > ild[1.0] and ild[0.5] >= ild[1.0] - 1e-9, ild

    def test_per_genre_quota_and_freshness(self, api):
        cat = api.catalog
        resp = api.client.recommend(api.user, k=8, max_per_genre=2, candidate_pool=100)
        counts: dict[str, int] = {}
        for item in resp.items:
            for g in item.genres:
                counts[g] = counts.get(g, 0) + 1
        assert resp.items and max(counts.values()) <= 2
        plain = api.client.recommend(api.user, k=10, mmr_lambda=1.0, candidate_pool=100)
        fresh = api.client.recommend(api.user, k=10, mmr_lambda=1.0, candidate_pool=100, freshness_weight=1.0)
        years = lambda r: np.mean([i.year for i in r.items])  # noqa: E731
        assert years(fresh) > years(plain)
        assert all(cat.years[cat.item_of(m)] > 0 for m in ids(fresh)[:3])

    def test_similar(self, api):
        cat = api.catalog
        movie = int(cat.movie_ids[0])
        resp = api.client.similar(movie, k=5)
        assert len(resp.items) == 5 and movie not in ids(resp)
        scores = [i.score for i in resp.items]
        assert scores == sorted(scores, reverse=True) and all(-1.001 <= s <= 1.001 for s in scores)
        assert resp.items[0].explanation == f"similar to {cat.titles[0]}"
        seen = api.seen(api.user)
        assert not set(ids(api.client.similar(movie, k=20, user_id=api.user))) & seen

    def test_popular(self, api):
        cat = api.catalog
        resp = api.client.popular(k=5)
        assert ids(resp) == [int(cat.movie_ids[i]) for i in np.lexsort((np.arange(cat.n_items), -cat.popularity))[:5]]
        recent = api.client.popular(k=5, recent=True)
        assert [i.score for i in recent.items] == sorted(cat.recent_popularity.tolist(), reverse=True)[:5]
        assert all("Comedy" in i.genres for i in api.client.popular(k=5, genres=["comedy"]).items)

    def test_batch_recommend_reports_per_request_failures(self, api):
        reqs = [
            recommend_request(api.user, k=3),
            recommend_request(api.user, k=0),
            recommend_request(history=[UNKNOWN_MOVIE], k=2),
            recommend_request(api.user, k=3, genres=["NoSuchGenre"]),
        ]
        resp = api.client.batch_recommend(reqs)
        assert [r.index for r in resp.results] == [0, 1, 2, 3]
        assert [r.WhichOneof("outcome") for r in resp.results] == ["response", "failure", "response", "failure"], resp
        assert resp.results[1].failure.code == grpc.StatusCode.INVALID_ARGUMENT.value[0]
        assert "k must be in 1..500" in resp.results[1].failure.message
        assert ids(resp.results[0].response) == ids(api.client.recommend(api.user, k=3))
        with pytest.raises(E.InvalidArgument):
            api.client.batch_recommend([])

    def test_batch_recommend_equals_single_calls(self, api):
        """Batched models (one user-tower call, users padded to one candidate width) change no answer."""
        counts = api.ratings.user_id.value_counts()
        users = [int(u) for u in counts.index[len(counts) // 4 :: max(1, len(counts) // 8)][:5]]
        specs = [((u,), {}) for u in users]
        specs.append(((users[0],), {"genres": ["Comedy"]}))  # fewer candidates than the others
        specs.append(((), {"history": sorted(api.seen(api.user))[:3]}))
        specs.append(((), {"history": [UNKNOWN_MOVIE]}))  # cold start inside a batch
        resp = api.client.batch_recommend([recommend_request(*a, k=4, **kw) for a, kw in specs])
        assert [r.WhichOneof("outcome") for r in resp.results] == ["response"] * len(specs)
        for (a, kw), res in zip(specs, resp.results):
            single = api.client.recommend(*a, k=4, **kw)
            assert ids(res.response) == ids(single)
            assert [round(i.score, 4) for i in res.response.items] == [round(i.score, 4) for i in single.items]
            assert res.response.is_fallback == single.is_fallback

    def test_batch_recommend_where_no_user_has_a_candidate(self, api):
        """Filters that leave nothing to rank answer each query as a single call does (no ranker call)."""
        reqs = [recommend_request(api.user, k=3, min_year=2100), recommend_request(api.user, k=3, min_year=2100, genres=["Comedy"])]
        resp = api.client.batch_recommend(reqs)
        assert [r.WhichOneof("outcome") for r in resp.results] == ["response", "response"], resp
        single = api.client.recommend(api.user, k=3, min_year=2100)
        assert ids(resp.results[0].response) == ids(single) == []

    def test_record_interaction_is_reflected_in_the_next_recommend(self, api):
        user = api.user + 100_000  # a fresh user so the shared history stays untouched
        base = [int(m) for m in api.seen(api.user)]
        for i, m in enumerate(base):
            api.client.record_interaction(user, m, 4.0, 1_000_000 + i)
        pipeline = api.server.recommender
        query = Query(k=1, filters=Filters(), rerank=RerankOptions(1.0, 1), user_id=user)

        def user_vector() -> np.ndarray:  # what the user tower makes of the stored history now
            return pipeline.user_vector(query, pipeline.window(query)[0], Deadline(None, 5.0))

        vector_before = user_vector()
        before = api.client.recommend(user, k=10, mmr_lambda=1.0)
        target = ids(before)[0]
        rec = api.client.record_interaction(user, target, 5.0, 2_000_000)
        assert rec.created and rec.history_length == len(base) + 1 and rec.timestamp_s == 2_000_000
        assert not api.client.record_interaction(user, target, 5.0, 2_000_000).created  # idempotent retry
        after = api.client.recommend(user, k=10, mmr_lambda=1.0)
        assert target not in ids(after)  # now seen
        assert after.history_length == min(len(base) + 1, api.catalog.history_len)
        assert np.abs(user_vector() - vector_before).max() > 1e-4  # the embedding moved
        now = api.client.record_interaction(user, int(api.catalog.movie_ids[1]))
        assert abs(now.timestamp_s - time.time()) < 60  # 0 = the server's clock

    @pytest.mark.parametrize(
        "call, status, words",
        [
            (lambda c, u: c.recommend(u, k=0), grpc.StatusCode.INVALID_ARGUMENT, "k must be in 1..500"),
            (lambda c, u: c.recommend(u, k=501), grpc.StatusCode.INVALID_ARGUMENT, "k must be in 1..500"),
            (lambda c, u: c.recommend(u, min_year=2000, max_year=1990), grpc.StatusCode.INVALID_ARGUMENT, "after filters.max_year"),
            (lambda c, u: c.recommend(u, min_year=1500), grpc.StatusCode.INVALID_ARGUMENT, "min_year"),
            (lambda c, u: c.recommend(u, genres=["Actoin"]), grpc.StatusCode.INVALID_ARGUMENT, "unknown genre"),
            (lambda c, u: c.recommend(u, min_mean_rating=7.0), grpc.StatusCode.INVALID_ARGUMENT, "min_mean_rating"),
            (lambda c, u: c.recommend(u, mmr_lambda=1.5), grpc.StatusCode.INVALID_ARGUMENT, "mmr_lambda"),
            (lambda c, u: c.recommend(u, k=10, candidate_pool=5), grpc.StatusCode.INVALID_ARGUMENT, "candidate_pool"),
            (lambda c, u: c.recommend(u, freshness_weight=-0.1), grpc.StatusCode.INVALID_ARGUMENT, "freshness_weight"),
            (lambda c, u: c.recommend(u, max_per_genre=0), grpc.StatusCode.INVALID_ARGUMENT, "max_per_genre"),
            (lambda c, u: c.recommend(0), grpc.StatusCode.INVALID_ARGUMENT, "user_id must be >= 1"),
            (lambda c, u: c.recommend(history=[]), grpc.StatusCode.INVALID_ARGUMENT, "history.movie_ids is empty"),
            (lambda c, u: c.recommend(history=[1, 2], ratings=[4]), grpc.StatusCode.INVALID_ARGUMENT, "history.ratings"),
            (lambda c, u: c.recommend(history=[1], ratings=[9]), grpc.StatusCode.INVALID_ARGUMENT, "history.ratings[0]"),
            (lambda c, u: c.similar(UNKNOWN_MOVIE), grpc.StatusCode.NOT_FOUND, f"movie {UNKNOWN_MOVIE}"),
            (lambda c, u: c.similar(u, k=0), grpc.StatusCode.INVALID_ARGUMENT, "k must be"),
            (lambda c, u: c.popular(k=0), grpc.StatusCode.INVALID_ARGUMENT, "k must be"),
            (lambda c, u: c.record_interaction(u, UNKNOWN_MOVIE, 4.0), grpc.StatusCode.NOT_FOUND, f"movie {UNKNOWN_MOVIE}"),
            (lambda c, u: c.record_interaction(u, 0, 7.5), grpc.StatusCode.INVALID_ARGUMENT, "rating must be"),
            (lambda c, u: c.record_interaction(u, 0, 0.2), grpc.StatusCode.INVALID_ARGUMENT, "rating must be"),
            (lambda c, u: c.record_interaction(-3, 0, 4.0), grpc.StatusCode.INVALID_ARGUMENT, "user_id must be >= 1"),
            (lambda c, u: c.record_interaction(u, 0, 4.0, 2**40), grpc.StatusCode.INVALID_ARGUMENT, "timestamp_s"),
        ],
    )
    def test_bad_input_gets_a_precise_status(self, api, call, status, words):
        with pytest.raises(E.RecsysRpcError) as excinfo:
            call(api.client, api.user)
        assert code_of(excinfo) == status and words in excinfo.value.details
        assert type(excinfo.value) is E.ERRORS[status]

    def test_health_and_reflection(self, api):
        assert api.client.health() == "SERVING" and api.client.health("recsys.v1.Recommender") == "SERVING"
        with pytest.raises(E.NotFound):
            api.client.health("no.such.Service")
        db = ProtoReflectionDescriptorDatabase(api.client.channel)
        assert {"recsys.v1.Recommender", "grpc.health.v1.Health"} <= set(db.get_services())
        method = db.FindFileContainingSymbol("recsys.v1.Recommender").service[0].method
        assert {m.name for m in method} == {"Recommend", "Similar", "Popular", "BatchRecommend", "RecordInteraction", "DeleteUser"}

    def test_async_client_has_the_same_surface(self, api):
        target = api.server.address

        async def run():
            async with AsyncRecsysClient(target) as client:
                rec = await client.recommend(api.user, k=3)
                sim = await client.similar(int(api.catalog.movie_ids[0]), k=2)
                pop = await client.popular(k=2)
                health = await client.health()
                with pytest.raises(E.InvalidArgument):
                    await client.recommend(api.user, k=0)
                return rec, sim, pop, health

        rec, sim, pop, health = asyncio.run(run())
        assert ids(rec) == ids(api.client.recommend(api.user, k=3)) and len(sim.items) == 2 and len(pop.items) == 2
        assert health == "SERVING"


# ----------------------------------------------------------------------------- in-process only


class Wrapped:
    """An in-process backend whose calls can be slowed down, made to fail, or reported not ready."""

    name = "wrapped"

    def __init__(self, inner: InProcessBackend):
        self.inner = inner
        self.delay_s = 0.0
        self.fail: Exception | None = None
        self.is_ready = True
        self.seen: set[int] = set()

    @property
    def model_version(self) -> str:
        return self.inner.model_version

    def ready(self, timeout_s: float) -> bool:
        return self.is_ready

    def _gate(self, timeout_s: float) -> None:
        if self.fail is not None:
            raise self.fail
        if self.delay_s:  # like Triton with client_timeout: wait at most timeout_s
            time.sleep(min(self.delay_s, timeout_s))
            if self.delay_s > timeout_s:
                raise ModelTimeout("slow backend")

    def user_embedding(self, *args, timeout_s, version=None):
        self._gate(timeout_s)
        return self.inner.user_embedding(*args, timeout_s=timeout_s, version=version)

    def rank(self, *args, timeout_s, version=None):
        self._gate(timeout_s)
        return self.inner.rank(*args, timeout_s=timeout_s, version=version)

    def load_version(self, version, timeout_s):
        self.inner.load_version(version, timeout_s)

    def live(self, timeout_s):
        return True

    def version_ready(self, version, timeout_s):
        return self.is_ready and self.inner.version_ready(version, timeout_s)

    def close(self) -> None:
        self.inner.close()


@pytest.fixture(scope="module")
def wrapped(tiny_artifacts, tiny_repository, tmp_path_factory):
    backend = Wrapped(InProcessBackend(tiny_repository))
    s = ServeSettings(
        artifacts_dir=tiny_artifacts,
        model_repository=tiny_repository,
        triton_timeout_s=0.3,
        health_poll_s=0.05,
        history_db_path=tmp_path_factory.mktemp("wrapped") / "h.sqlite",
    )
    server, port = create_server(s, backend=backend)
    server.start()
    client = RecsysClient(f"127.0.0.1:{port}", timeout_s=5)
    client.wait_until_serving(30)
    ratings = pd.read_parquet(tiny_artifacts / "interactions.parquet")
    users = ratings.user_id.value_counts()
    user = int(users.index[len(users) // 2])
    backend.seen = set(ratings.loc[ratings.user_id == user, "movie_id"].tolist())
    yield backend, client, user
    backend.delay_s, backend.fail, backend.is_ready = 0.0, None, True
    client.close()
    server.stop()


def test_deadline_is_honoured_not_hung(wrapped):
    backend, client, user = wrapped
    backend.delay_s = 2.0
    try:
        t0 = time.monotonic()
        with pytest.raises(E.DeadlineExceeded):
            client.recommend(user, k=3, timeout_s=0.15)
        assert time.monotonic() - t0 < 1.0
        # the caller has time but the model does not answer within triton_timeout_s: fallback
        resp = client.recommend(user, k=3, timeout_s=3)
        assert resp.is_fallback and resp.fallback_reason == pb.FALLBACK_REASON_MODEL_TIMEOUT and len(resp.items) == 3
    finally:
        backend.delay_s = 0.0


def test_model_failures_fall_back_or_are_internal(wrapped):
    backend, client, user = wrapped
    try:
        backend.fail = ModelUnavailable("triton down")
        resp = client.recommend(user, k=4)
        assert resp.is_fallback and resp.fallback_reason == pb.FALLBACK_REASON_MODEL_UNAVAILABLE
        assert not {i.movie_id for i in resp.items} & backend.seen
        backend.fail = ModelError("contract broken")
        with pytest.raises(E.Internal) as excinfo:
            client.recommend(user, k=4)
        assert "reference" in excinfo.value.details and "contract" not in excinfo.value.details
    finally:
        backend.fail = None
    assert not client.recommend(user, k=4).is_fallback


class BrokenStore:
    """A history store whose backend is down."""

    def history(self, user_id):
        raise Unavailable("store down")

    def recent(self, user_id, n):
        raise Unavailable("store down")

    def record(self, *args):
        raise Unavailable("store down")

    def close(self):
        pass


def test_history_store_down(tiny_artifacts, tiny_repository):
    # no request log: it would default to the state dir beside a history DB this test never makes
    settings = ServeSettings(artifacts_dir=tiny_artifacts, model_repository=tiny_repository, request_log=False)
    server, port = create_server(settings, store=BrokenStore(), backend=InProcessBackend(tiny_repository))
    with server, RecsysClient(f"127.0.0.1:{port}", retries=0) as client:
        resp = client.recommend(1, k=3)  # popular can still answer
        assert resp.is_fallback and resp.fallback_reason == pb.FALLBACK_REASON_HISTORY_UNAVAILABLE and len(resp.items) == 3
        assert not client.recommend(history=[int(server.recommender.catalog.movie_ids[0])], k=3).is_fallback
        with pytest.raises(E.Unavailable):
            client.record_interaction(1, int(server.recommender.catalog.movie_ids[0]), 4.0)


def test_health_follows_the_backend(wrapped):
    backend, client, _ = wrapped
    backend.is_ready = False
    try:
        deadline = time.monotonic() + 5
        while client.health() != "NOT_SERVING" and time.monotonic() < deadline:
            time.sleep(0.05)
        assert client.health() == "NOT_SERVING"
    finally:
        backend.is_ready = True
    client.wait_until_serving(5)


def test_cli_commands_and_exit_codes(api, capsys):
    target = ["--target", api.server.address]
    assert main(["recommend", "--user", str(api.user), "-k", "3", *target]) == 0
    out = capsys.readouterr().out
    assert out.startswith(f"# user {api.user}: model 1") and len(out.strip().splitlines()) == 4
    assert main(["recommend", "--user", str(api.user), "-k", "3", "--genre", "Drama", "--json", *target]) == 0
    import json

    body = json.loads(capsys.readouterr().out)
    assert len(body["items"]) == 3 and all("Drama" in i["genres"] for i in body["items"])
    assert main(["similar", "--movie", str(int(api.catalog.movie_ids[0])), "-k", "2", *target]) == 0
    assert main(["popular", "--genre", "Comedy", "--recent", *target]) == 0
    assert main(["health", *target]) == 0
    capsys.readouterr()
    assert main(["recommend", "--user", str(api.user), "-k", "0", *target]) == 1
    assert "INVALID_ARGUMENT: k must be in 1..500" in capsys.readouterr().err
    assert main(["similar", "--movie", str(UNKNOWN_MOVIE), *target]) == 1
    with pytest.raises(SystemExit) as usage:
        main(["recommend", "-k", "3", *target])  # neither --user nor --history
    assert usage.value.code == 2
    assert main(["health", "--target", "127.0.0.1:1", "--timeout", "0.5"]) == 1


@pytest.mark.parametrize("rpc", ["Recommend", "Similar", "Popular", "BatchRecommend", "RecordInteraction", "DeleteUser"])
def test_undecodable_request_bodies_are_invalid_argument(api, rpc):
    """Bytes that are no message of the RPC: the caller's fault (INVALID_ARGUMENT), not INTERNAL."""
    call = api.client.channel.unary_unary(f"/recsys.v1.Recommender/{rpc}", request_serializer=None, response_deserializer=None)
    with pytest.raises(grpc.RpcError) as excinfo:
        call(b"\xff\xff\xff\xff\x0f", timeout=5)  # a truncated varint field key
    assert excinfo.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "not a valid recsys.v1." in excinfo.value.details()
    assert api.client.recommend(api.user, k=3).items  # and the server goes on answering
