"""API-key scopes: every RPC of ``recsys.v1.Recommender`` called with a key of every scope.

A real server (port 0, in-process backend over the tiny exported repository), raw stubs with
``x-api-key`` metadata. The expected table below is written out here, independently of
``orchestrator.auth.RPC_SCOPES``: an RPC added to the proto without a decision here fails
(KeyError), and a check removed from the server fails its denied cases.
"""

from __future__ import annotations

from pathlib import Path

import grpc
import pandas as pd
import pytest

from orchestrator.auth import DEFAULT_SCOPE, SCOPES, parse_keys
from orchestrator.service import create_server
from orchestrator.settings import ServeSettings
from protos.recsys.v1 import recsys_pb2 as pb
from protos.recsys.v1 import recsys_pb2_grpc

METHODS = [m.name for m in pb.DESCRIPTOR.services_by_name["Recommender"].methods]
ALLOWED = {
    "Recommend": {"read", "interact", "admin"},
    "Similar": {"read", "interact", "admin"},
    "Popular": {"read", "interact", "admin"},
    "BatchRecommend": {"read", "interact", "admin"},
    "RecordInteraction": {"interact", "admin"},
    "DeleteUser": {"admin"},
}
KEYS = {"read": "read-key-0001", "interact": "interact-key-0002", "admin": "admin-key-0003"}
LEGACY_KEY = "legacy-key-0004"  # an entry written before scopes existed: no scope field
NEW_USER = 20_000_001


@pytest.fixture(scope="module")
def scoped(tiny_artifacts, tiny_repository, tmp_path_factory):
    tmp = tmp_path_factory.mktemp("scopes")
    (tmp / "keys.txt").write_text(f"{KEYS['read']}::read\n{KEYS['interact']}:100:interact\n{KEYS['admin']}:admin\n{LEGACY_KEY}:100\n")
    settings = ServeSettings(
        artifacts_dir=tiny_artifacts,
        model_repository=tiny_repository,
        history_db_path=tmp / "history.sqlite",
        health_poll_s=0.2,
        api_keys_file=tmp / "keys.txt",
    )
    server, port = create_server(settings)
    server.start()
    items = pd.read_parquet(tiny_artifacts / "items.parquet")
    movie = int(items.movie_id.iloc[0])
    with grpc.insecure_channel(f"127.0.0.1:{port}") as channel:
        yield recsys_pb2_grpc.RecommenderStub(channel), movie, server
    server.stop()


def request_of(rpc: str, movie: int) -> object:
    """A valid request of each RPC (state changes touch only a user no other test uses)."""
    recommend = pb.RecommendRequest(history=pb.History(movie_ids=[movie]), k=3)
    return {
        "Recommend": recommend,
        "Similar": pb.SimilarRequest(movie_id=movie, k=3),
        "Popular": pb.PopularRequest(k=3),
        "BatchRecommend": pb.BatchRecommendRequest(requests=[recommend]),
        "RecordInteraction": pb.RecordInteractionRequest(user_id=NEW_USER, movie_id=movie, rating=4.0),
        "DeleteUser": pb.DeleteUserRequest(user_id=NEW_USER),
    }[rpc]


def call(stub, rpc: str, movie: int, key: str) -> grpc.StatusCode:
    try:
        getattr(stub, rpc)(request_of(rpc, movie), metadata=[("x-api-key", key)], timeout=30)
    except grpc.RpcError as exc:
        return exc.code()
    return grpc.StatusCode.OK


@pytest.mark.parametrize("scope", SCOPES)
@pytest.mark.parametrize("rpc", METHODS)
def test_each_rpc_needs_its_scope(scoped, rpc, scope):
    stub, movie, _ = scoped
    code = call(stub, rpc, movie, KEYS[scope])
    if scope in ALLOWED[rpc]:
        assert code == grpc.StatusCode.OK
    else:
        assert code == grpc.StatusCode.PERMISSION_DENIED


@pytest.mark.parametrize("rpc", METHODS)
def test_keys_without_a_scope_get_the_documented_default(scoped, rpc):
    stub, movie, _ = scoped
    assert DEFAULT_SCOPE == "interact"
    expected = grpc.StatusCode.OK if DEFAULT_SCOPE in ALLOWED[rpc] else grpc.StatusCode.PERMISSION_DENIED
    assert call(stub, rpc, movie, LEGACY_KEY) == expected


def test_permission_denied_names_the_scope_needed_and_changes_nothing(scoped):
    stub, movie, server = scoped
    user = 20_000_002
    md = [("x-api-key", KEYS["interact"])]
    stub.RecordInteraction(pb.RecordInteractionRequest(user_id=user, movie_id=movie, rating=3.0), metadata=md, timeout=30)
    with pytest.raises(grpc.RpcError) as denied:
        stub.DeleteUser(pb.DeleteUserRequest(user_id=user), metadata=md, timeout=30)
    assert denied.value.code() == grpc.StatusCode.PERMISSION_DENIED
    assert "DeleteUser needs an API key of scope 'admin'" in denied.value.details()
    assert "scope is 'interact'" in denied.value.details()
    assert len(server.recommender.store.history(user)) == 1  # refused: nothing deleted
    gone = stub.DeleteUser(pb.DeleteUserRequest(user_id=user), metadata=[("x-api-key", KEYS["admin"])], timeout=30)
    assert gone.interactions_deleted == 1


def test_unlisted_methods_need_admin():
    from orchestrator.auth import covers, required_scope

    assert required_scope("/recsys.v1.Recommender/ReloadModels") == "admin"
    assert not covers("interact", "admin") and covers("admin", "read") and covers("read", "read")


def test_scope_field_parses(tmp_path: Path):
    keys = parse_keys(["a", "b:2", "c:admin", "d:2:read", "e::READ"], "keys.txt")
    assert sorted((k.rate_per_s or 0, k.scope) for k in keys.values()) == [
        (0, "admin"),
        (0, "interact"),
        (0, "read"),
        (2.0, "interact"),
        (2.0, "read"),
    ]
    for bad, words in ((["secret:2:root"], "scope 'root' is not one of"), (["secret:1:read:x"], "fields"), (["secret:owner"], "neither")):
        with pytest.raises(ValueError, match=words) as excinfo:
            parse_keys(bad, "keys.txt")
        assert "secret" not in str(excinfo.value)
