"""Faults benchmark, the fuzz phase: hostile and edge-case requests, judged by status code.

See :mod:`benchmarks.faults` for what is measured and why.
"""

from __future__ import annotations

import math
import random
import re
import time
from collections import Counter
from typing import Any

import numpy as np

from benchmarks.common import log
from benchmarks.faults.load import Workload
from benchmarks.faults.stack import CLIENT_ERRORS, SERVER_DEFECTS, SERVICE, FaultSettings, Stack, _health

# ---------------------------------------------------------------------------- fuzz

INT32 = (-(2**31), 2**31 - 1)
INT64 = (-(2**63), 2**63 - 1)
EDGE_INTS = (0, -1, 1, 2, 10, 199, 200, 201, 499, 500, 501, 1_000, 1_001, 10_000, 2**31 - 1, -(2**31), 2**63 - 1, -(2**63))
EDGE_FLOATS = (math.nan, math.inf, -math.inf, 0.0, -0.0, 0.49, 0.5, 1.0, 4.99, 5.0, 5.01, -1.0, 1e-45, 3.4e38, -3.4e38)
HOSTILE_TEXT = (
    "",
    " ",
    "\t\n",
    "action",
    "ACTION",
    "Sci-Fi ",
    "Comedy|Drama",
    "(no genres listed)",
    "\x00",
    "\u202e",
    "\ufeffDrama",
    "💥",
    "Ação",
    "%s%n",
    "'; DROP TABLE interactions; --",
    "*",
    "Action" * 200,
)


def fuzz_calls(movies: np.ndarray, users: np.ndarray, genres: tuple[str, ...]) -> Any:
    """The Hypothesis strategy of ``(rpc name, request message)`` pairs.

    Each field is valid three times in four (:func:`mostly`) and every optional field is set
    half of the time, so that a good share of the requests passes validation and reaches the
    pipeline with odd but legal values (k = 500, empty genre matches, pools at their bounds);
    the rest carries one or more hostile values. Long id lists are drawn as a length and a
    seed and built with numpy: Hypothesis's own buffer would overflow long before 100,000 ids.
    """
    from hypothesis import strategies as st

    from protos.recsys.v1 import recsys_pb2 as pb

    now = int(time.time())  # once: a strategy that changes between examples is "flaky" to Hypothesis

    def mostly(valid: Any, hostile: Any) -> Any:
        # not st.one_of(valid, valid, valid, hostile): that drew the valid branch only ~40% of the time
        return st.sampled_from((valid, valid, valid, hostile)).flatmap(lambda chosen: chosen)

    present = st.sampled_from((True, True, True, False))

    edge32 = [v for v in EDGE_INTS if INT32[0] <= v <= INT32[1]]
    int32 = st.one_of(st.integers(*INT32), st.sampled_from(edge32), st.integers(-3, 600))
    int64 = st.one_of(st.integers(*INT64), st.sampled_from(EDGE_INTS))
    f32 = st.one_of(st.floats(width=32), st.sampled_from(EDGE_FLOATS), st.floats(-10, 10, width=32))
    movie = mostly(st.sampled_from([int(m) for m in movies]), int64)
    user = mostly(st.one_of(st.sampled_from([int(u) for u in users]), st.integers(1, 10**7)), int64)
    k = mostly(st.one_of(st.integers(1, 20), st.integers(1, 500)), int32)
    unit = mostly(st.floats(0, 1, width=32), f32)
    stars = mostly(st.floats(0, 5, width=32), f32)
    count = mostly(st.integers(1, 250), int32)
    names = list(genres) + [g.lower() for g in genres] + [g.upper() for g in genres]
    text = mostly(st.sampled_from(names), st.one_of(st.sampled_from(HOSTILE_TEXT), st.text(st.characters(codec="utf-8"), max_size=40)))
    year = mostly(
        st.integers(1900, 2010), st.one_of(st.integers(*INT32), st.integers(1700, 2200), st.sampled_from((1799, 1800, 2100, 2101)))
    )
    small = st.one_of(st.integers(0, 5), st.integers(0, 60))
    big = st.sampled_from((999, 1_000, 1_001, 9_999, 10_000, 10_001, 100_000))
    rare_big = st.one_of(small, small, small, big)

    def ids(rng: np.random.Generator, n: int) -> list[int]:
        pick = rng.random(n)
        known = movies[rng.integers(0, len(movies), n)]
        hostile = rng.integers(INT64[0], INT64[1], n, dtype=np.int64, endpoint=True)
        return np.where(pick < 0.8, known, np.where(pick < 0.9, -known, hostile)).tolist()

    @st.composite
    def id_list(draw: Any, sizes: Any) -> list[int]:
        return ids(np.random.default_rng(draw(st.integers(0, 2**32 - 1))), draw(sizes))

    @st.composite
    def filters(draw: Any, excluded: Any) -> pb.Filters:
        msg = pb.Filters(genres=draw(st.one_of(st.just([]), st.lists(text, max_size=3))))
        if draw(st.booleans()):
            msg.min_year = draw(year)
        if draw(st.booleans()):
            msg.max_year = draw(year)
        if draw(st.booleans()):
            msg.min_mean_rating = draw(stars)
        msg.exclude_movie_ids.extend(draw(id_list(excluded)))
        if draw(st.booleans()):
            msg.include_seen = draw(st.booleans())
        return msg

    @st.composite
    def rerank(draw: Any) -> pb.Rerank:
        msg = pb.Rerank()
        if draw(st.booleans()):
            msg.mmr_lambda = draw(unit)
        if draw(st.booleans()):
            msg.candidate_pool = draw(count)
        if draw(st.booleans()):
            msg.freshness_weight = draw(unit)
        if draw(st.booleans()):
            msg.max_per_genre = draw(count)
        return msg

    @st.composite
    def history(draw: Any, lengths: Any) -> pb.History:
        rng = np.random.default_rng(draw(st.integers(0, 2**32 - 1)))
        movie_ids = ids(rng, draw(lengths))
        mode = draw(st.sampled_from(("none", "valid", "hostile", "mismatch")))
        ratings: list[float] = []
        if mode in ("valid", "hostile"):
            ratings = rng.choice([0.0, 0.5, 1.0, 3.5, 5.0], len(movie_ids)).tolist()
            if mode == "hostile" and ratings:
                for _ in range(draw(st.integers(1, 3))):
                    ratings[int(rng.integers(len(ratings)))] = draw(f32)
        elif mode == "mismatch":
            ratings = [3.0] * draw(st.integers(0, len(movie_ids) + 2))
        return pb.History(movie_ids=movie_ids, ratings=ratings)

    @st.composite
    def recommend(draw: Any, lengths: Any = st.one_of(small, small, big), excluded: Any = rare_big) -> pb.RecommendRequest:
        msg = pb.RecommendRequest()
        subject = draw(mostly(st.sampled_from(("user", "history")), st.just("none")))
        if subject == "user":
            msg.user_id = draw(user)
        elif subject == "history":
            msg.history.CopyFrom(draw(history(lengths)))
        if draw(present):
            msg.k = draw(k)
        if draw(st.booleans()):
            msg.filters.CopyFrom(draw(filters(excluded)))
        if draw(st.booleans()):
            msg.rerank.CopyFrom(draw(rerank()))
        return msg

    @st.composite
    def similar(draw: Any) -> pb.SimilarRequest:
        msg = pb.SimilarRequest(movie_id=draw(movie))
        if draw(present):
            msg.k = draw(k)
        if draw(st.booleans()):
            msg.user_id = draw(user)
        if draw(st.booleans()):
            msg.filters.CopyFrom(draw(filters(rare_big)))
        if draw(st.booleans()):
            msg.rerank.CopyFrom(draw(rerank()))
        return msg

    @st.composite
    def popular(draw: Any) -> pb.PopularRequest:
        msg = pb.PopularRequest(window=draw(mostly(st.sampled_from((0, 1)), st.one_of(st.integers(-2, 3), st.integers(*INT32)))))
        if draw(present):
            msg.k = draw(k)
        if draw(st.booleans()):
            msg.filters.CopyFrom(draw(filters(rare_big)))
        return msg

    @st.composite
    def batch(draw: Any) -> pb.BatchRecommendRequest:
        # a full batch of 256 runs 256 pipelines: at the limit in 1 batch in 64 only
        n = draw(mostly(st.integers(1, 8), st.sampled_from((0,) * 5 + (257,) * 5 + (1_000,) * 5 + (256,))))
        distinct = draw(st.lists(recommend(small, small), min_size=1, max_size=4))
        return pb.BatchRecommendRequest(requests=[distinct[i % len(distinct)] for i in range(n)])

    @st.composite
    def record(draw: Any) -> pb.RecordInteractionRequest:
        msg = pb.RecordInteractionRequest()
        if draw(st.booleans()):
            msg.user_id = draw(user)
        if draw(st.booleans()):
            msg.movie_id = draw(movie)
        if draw(st.booleans()):
            msg.rating = draw(mostly(st.sampled_from((0.0, 0.5, 1.0, 2.5, 4.0, 5.0)), f32))
        if draw(st.booleans()):
            msg.timestamp_s = draw(
                mostly(st.integers(0, now + 86_400), st.one_of(st.integers(*INT64), st.sampled_from((-1, now + 86_401))))
            )
        return msg

    empty = st.sampled_from(
        [
            ("Recommend", pb.RecommendRequest()),
            ("Similar", pb.SimilarRequest()),
            ("Popular", pb.PopularRequest()),
            ("BatchRecommend", pb.BatchRecommendRequest()),
            ("RecordInteraction", pb.RecordInteractionRequest()),
        ]
    )
    return st.one_of(
        st.tuples(st.just("Recommend"), recommend()),
        st.tuples(st.just("Similar"), similar()),
        st.tuples(st.just("Popular"), popular()),
        st.tuples(st.just("BatchRecommend"), batch()),
        st.tuples(st.just("RecordInteraction"), record()),
        empty,
    )


def describe_request(msg: Any, limit: int = 600) -> str:
    """A one-line text form of a request, long id lists cut to their first few (with their length)."""
    from google.protobuf import text_format

    def trim(m: Any) -> None:
        for fd, value in m.ListFields():
            if fd.label == fd.LABEL_REPEATED:
                if fd.message_type is not None:
                    for sub in value:
                        trim(sub)
                    if len(value) > 3:
                        del value[3:]
                elif len(value) > 8:
                    n = len(value)
                    del value[8:]
                    lengths.append(f"{fd.name}: {n} values")
            elif fd.message_type is not None:
                trim(value)

    lengths: list[str] = []
    copy = type(msg)()
    copy.CopyFrom(msg)
    trim(copy)
    text = text_format.MessageToString(copy, as_one_line=True)
    if hasattr(msg, "requests") and len(msg.requests) > 3:
        lengths.append(f"requests: {len(msg.requests)}")
    text = text if len(text) <= limit else text[:limit] + "..."
    return text + (f"  [{'; '.join(lengths)}]" if lengths else "")


def _server_traceback(logs: str, details: str) -> str | None:
    """The orchestrator's logged exception for an opaque ``internal error (reference X)`` message."""
    m = re.search(r"reference ([0-9a-f]{12})", details or "")
    if not m:
        return None
    at = logs.find(f"internal error {m.group(1)}")
    if at < 0:
        return None
    block = logs[at:].splitlines()[1:60]
    tail = [line for line in block if line and not re.match(r"\d{4}-\d\d-\d\d ", line)]
    return "\n".join(tail[-6:]) or None


class FuzzJudge:
    """Sends each generated request through the raw stub and classifies the answer."""

    def __init__(self, stack: Stack, timeout_s: float):
        import grpc

        from protos.recsys.v1 import recsys_pb2_grpc

        self.grpc = grpc
        self.stack = stack
        self.timeout_s = timeout_s
        self._connect = lambda: grpc.insecure_channel(stack.target, options=[("grpc.max_send_message_length", -1)])
        self.channel = self._connect()
        self.stub = recsys_pb2_grpc.RecommenderStub(self.channel)
        self._stub_type = recsys_pb2_grpc.RecommenderStub
        self.requests = 0
        self.by_rpc: Counter = Counter()
        self.by_rpc_status: Counter = Counter()
        self.messages: Counter = Counter()
        self.statuses: Counter = Counter()
        self.internal = 0
        self.other = 0
        self.empty_messages = 0
        self.bad_ok = 0
        self.crashes = 0
        self.bench_errors = 0
        self.examples: list[dict[str, Any]] = []
        self.crash_examples: list[dict[str, Any]] = []
        self.other_examples: list[dict[str, Any]] = []

    def _example(self, into: list, rpc: str, msg: Any, status: str, details: str, where: str = "") -> None:
        if len(into) < 10:
            into.append({"rpc": rpc, "status": status, "details": details, "where": where, "request": describe_request(msg)})

    def __call__(self, rpc: str, msg: Any) -> None:
        self.requests += 1
        self.by_rpc[rpc] += 1
        try:
            resp = getattr(self.stub, rpc)(msg, timeout=self.timeout_s)
            code, details = "OK", ""
        except self.grpc.RpcError as exc:
            resp, code, details = None, exc.code().name, exc.details() or ""
        self.statuses[code] += 1
        self.by_rpc_status[f"{rpc} {code}"] += 1
        if code != "OK":
            self.messages[re.sub(r"-?\d[\w.+-]*", "N", details)[:70]] += 1
        if code == "OK":
            self._check_ok(rpc, msg, resp)
        elif code in SERVER_DEFECTS:
            self.internal += 1
            self._example(self.examples, rpc, msg, code, details)
        elif not self.stack.orchestrator_alive():
            self.crashes += 1
            self._example(self.crash_examples, rpc, msg, code, details, f"exit code {self.stack.orchestrator.returncode}")
            log(f"fuzz: the orchestrator died on {rpc} ({code}); restarting it")
            self.stack.start_orchestrator()
            self.channel.close()
            self.channel = self._connect()
            self.stub = self._stub_type(self.channel)
        elif code not in CLIENT_ERRORS:
            self.other += 1
            self._example(self.other_examples, rpc, msg, code, details)
        if code != "OK" and not details.strip():
            self.empty_messages += 1

    def _check_ok(self, rpc: str, msg: Any, resp: Any) -> None:
        k = getattr(msg, "k", None)
        if rpc in ("Recommend", "Similar", "Popular") and k is not None and len(resp.items) > max(k, 0):
            self.bad_ok += 1
            self._example(self.other_examples, rpc, msg, "OK", f"{len(resp.items)} items for k={k}")
        if rpc == "BatchRecommend":
            if [r.index for r in resp.results] != list(range(len(msg.requests))):
                self.bad_ok += 1
                self._example(self.other_examples, rpc, msg, "OK", "results do not match the requests one to one")
            for r in resp.results:
                if r.WhichOneof("outcome") != "failure":
                    continue
                name = f"CODE_{r.failure.code}"
                for c in self.grpc.StatusCode:
                    if c.value[0] == r.failure.code:
                        name = c.name
                if name in SERVER_DEFECTS:
                    self.internal += 1
                    self._example(self.examples, rpc, msg.requests[r.index], name, r.failure.message, f"BatchRecommend result {r.index}")
                elif name not in CLIENT_ERRORS:
                    self.other += 1
                    self._example(
                        self.other_examples, rpc, msg.requests[r.index], name, r.failure.message, f"BatchRecommend result {r.index}"
                    )
                if not r.failure.message.strip():
                    self.empty_messages += 1

    def close(self) -> None:
        self.channel.close()


def probe_undecodable(stack: Stack, n: int, seed: int, timeout_s: float) -> dict[str, Any]:
    """Random bytes as request bodies of every RPC: what the gRPC layer answers before any handler."""
    import grpc

    rng = random.Random(seed)
    statuses: Counter = Counter()
    rpcs = ("Recommend", "Similar", "Popular", "BatchRecommend", "RecordInteraction")
    with grpc.insecure_channel(stack.target) as channel:
        for i in range(n):
            call = channel.unary_unary(f"/{SERVICE}/{rpcs[i % len(rpcs)]}")  # no serializers: raw bytes
            body = rng.randbytes(rng.randint(1, 64))
            try:
                call(body, timeout=timeout_s)
                statuses["OK"] += 1
            except grpc.RpcError as exc:
                statuses[exc.code().name] += 1
    return {"requests": n, "by_status": dict(statuses)}


def phase_fuzz(stack: Stack, workload: Workload, s: FaultSettings) -> dict[str, Any]:
    """``fuzz``: Hypothesis-generated hostile requests through the raw stubs."""
    from hypothesis import HealthCheck, Phase, given, seed
    from hypothesis import settings as hsettings

    judge = FuzzJudge(stack, s.fuzz_timeout_s)
    calls = fuzz_calls(workload.movies, workload.users, workload.genres)
    t0 = time.monotonic()

    @seed(s.seed)
    @hsettings(
        max_examples=s.fuzz_requests,
        database=None,
        deadline=None,
        phases=[Phase.generate],
        suppress_health_check=list(HealthCheck),
        print_blob=False,
    )
    @given(calls)
    def probe(call: tuple[str, Any]) -> None:
        try:
            judge(*call)
        except Exception as exc:  # a benchmark defect must not end the run (Hypothesis would shrink it)
            judge.bench_errors += 1
            log(f"fuzz: benchmark error on {call[0]}: {exc!r}")
        if judge.requests % 1000 == 0:
            log(f"fuzz: {judge.requests:,} / {s.fuzz_requests:,}, internal {judge.internal}, crashes {judge.crashes}")

    probe()
    seconds = time.monotonic() - t0
    judge.close()
    undecodable = probe_undecodable(stack, s.undecodable, s.seed, s.fuzz_timeout_s) if s.undecodable else None
    logs = stack.orchestrator_logs()
    for ex in judge.examples:
        ex["server_traceback"] = _server_traceback(logs, ex["details"])
    alive = stack.orchestrator_alive()
    health = _health(stack.target)
    return {
        "requests": judge.requests,
        # undecodable bodies count too: the server answers them INVALID_ARGUMENT (service.add_servicer)
        "internal": judge.internal + sum((undecodable or {}).get("by_status", {}).get(c, 0) for c in ("INTERNAL", "UNKNOWN")),
        "crashes": judge.crashes + (0 if alive else 1),
        "other_status": judge.other,
        "empty_messages": judge.empty_messages,
        "inconsistent_ok": judge.bad_ok,
        "by_status": dict(judge.statuses),
        "by_rpc": dict(judge.by_rpc),
        "by_rpc_status": dict(sorted(judge.by_rpc_status.items())),
        "top_error_messages": dict(judge.messages.most_common(15)),
        "alive_at_end": alive,
        "health_at_end": health,
        "internal_examples": judge.examples,
        "crash_examples": judge.crash_examples,
        "other_examples": judge.other_examples,
        "bench_errors": judge.bench_errors,
        "undecodable": undecodable,
        "seconds": round(seconds, 1),
    }
