"""``recsys batch-score`` against a real embedded Triton serving the tiny exported models.

The scores are compared with an in-process reference: onnxruntime on the same published
``model.onnx`` files and the same FAISS bundle, with its own top-K code. Resuming is tested
by interrupting runs after some chunks (a callback raising, and the CLI's hidden option).
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from export.batch_score import (
    BatchScoreError,
    StopRequested,
    batch_score,
    load_user_data,
    parts_dir,
    resolve_users,
    top_k_per_user,
    user_bounds,
)
from orchestrator.contract import RANKER_HISTORY

K = 10
CHUNK = 64  # 300 users -> 5 chunks; also the user tower's max_batch_size


@pytest.fixture(scope="module")
def artifacts(tiny_artifacts, tiny_repository, tmp_path_factory) -> Path:
    """A copy of the tiny artifacts with an exact (flat) FAISS bundle.

    Depends on ``tiny_repository`` so the copy has the manifest's export section too. Flat
    only: exact, and the cheapest to build.
    """
    from export.faiss_index import build_from_artifacts

    copy = tmp_path_factory.mktemp("bs") / "artifacts"
    shutil.copytree(tiny_artifacts, copy)
    build_from_artifacts(copy, kinds=("flat",), progress=False, n_queries=50, threads=1)
    return copy


@pytest.fixture(scope="module")
def server(tiny_repository, start_triton):
    return start_triton(tiny_repository)


@pytest.fixture(scope="module")
def full_run(artifacts, server, tmp_path_factory) -> tuple[pd.DataFrame, dict]:
    """One uninterrupted run over every user: the result the other tests compare with."""
    out = tmp_path_factory.mktemp("full") / "recs.parquet"
    summary = batch_score(artifacts, out, "all", url=server.http_url, k=K, batch_size=CHUNK, progress=False)
    return pd.read_parquet(out), summary


def reference(artifacts: Path, repo: Path, user_ids: np.ndarray, k: int, candidates: int) -> pd.DataFrame:
    """The same recommendations computed in process: onnxruntime graphs + FAISS + the
    orchestrator's per-user candidate merge + a plain sort."""
    from export.onnx_export import session
    from orchestrator.ann import load_index_bundle
    from orchestrator.candidates import TABLES_FILE, CandidateTables, blocked_mask
    from orchestrator.candidates import candidates as merged

    data = load_user_data(artifacts)
    tower = session(repo / "user_tower" / "1" / "model.onnx")
    features = session(repo / "ranker_features" / "1" / "model.onnx")
    ranker = session(repo / "ranker" / "1" / "model.onnx")
    L = tower.get_inputs()[0].shape[1]
    bundle = load_index_bundle(artifacts / "faiss")
    tables = CandidateTables.load(artifacts / TABLES_FILE)
    item_vectors = np.load(artifacts / "item_embeddings.npy")
    rows = []
    # the user tower is run on the same 64-user groups as the Triton requests, so that the
    # vectors (and with them FAISS's order) are the same to the last bit
    for lo in range(0, len(user_ids), CHUNK):
        users = user_ids[lo : lo + CHUNK]
        hist, rating = data.histories.last(users, L)
        long_hist, long_rating = data.histories.last(users, RANKER_HISTORY)  # the ranker's window
        demo = data.demographics.lookup(users)
        vec = tower.run(["user_embedding"], {"history": hist, "history_rating": rating, "demographics": demo})[0]
        seen = data.histories.seen(users)
        ann, _ = bundle.search(vec, candidates, exclude=seen)
        for u, user in enumerate(users):
            cand, sources = merged(tables, ann[u][ann[u] >= 0], hist[u], blocked_mask(data.n_items, seen[u]), candidates)
            n = len(cand)
            feed = {
                "item": cand.astype(np.int32),
                "retrieval_score": (item_vectors[cand] @ vec[u]).astype(np.float32),
                "retrieval_rank": np.arange(n, dtype=np.float32),
                # one history row per candidate, as batch-score sends them (U = N): the grouped
                # layout sums some per-user features in another order (last-bit differences
                # that can swap near-tied candidates)
                "history": np.repeat(long_hist[u : u + 1], n, axis=0).astype(np.int32),
                "history_rating": np.repeat(long_rating[u : u + 1], n, axis=0).astype(np.float32),
                "candidate_sources": sources,
            }
            f = features.run(["features"], feed)[0]
            s = ranker.run(["score"], {"features": f})[0].reshape(-1)
            ranked = sorted(range(n), key=lambda j: (-float(s[j]), j))[:k]
            for r, j in enumerate(ranked):
                rows.append((int(user), r + 1, int(data.movie_ids[cand[j]]), float(s[j])))
    return pd.DataFrame(rows, columns=["user_id", "rank", "movie_id", "score"])


def test_matches_in_process_reference(full_run, artifacts, tiny_repository):
    got, summary = full_run
    assert summary["users"] == 300 and summary["chunks"] == 5 and summary["chunks_resumed"] == 0
    assert summary["model_versions"] == {"user_tower": 1, "ranker_ensemble": 1}
    assert list(got.columns) == ["user_id", "rank", "movie_id", "score", "model_version"]
    assert str(got["rank"].dtype) == "int32" and str(got["score"].dtype) == "float32"
    assert (got["model_version"] == 1).all()
    users = np.sort(got["user_id"].unique())
    want = reference(artifacts, tiny_repository, users, K, summary["candidates"])
    assert len(got) == len(want)
    np.testing.assert_array_equal(got["user_id"].to_numpy(), want["user_id"].to_numpy())
    np.testing.assert_array_equal(got["rank"].to_numpy(), want["rank"].to_numpy())
    np.testing.assert_array_equal(got["movie_id"].to_numpy(), want["movie_id"].to_numpy())
    np.testing.assert_allclose(got["score"].to_numpy(), want["score"].to_numpy(), rtol=0, atol=1e-5)


def test_output_is_well_formed(full_run, artifacts):
    got, _ = full_run
    assert not got.duplicated(["user_id", "rank"]).any()
    assert not got.duplicated(["user_id", "movie_id"]).any()
    per_user = got.groupby("user_id")["rank"].agg(["min", "max", "count"])
    assert (per_user["min"] == 1).all() and (per_user["count"] == per_user["max"]).all() and (per_user["max"] <= K).all()
    # seen items are never recommended
    seen = pd.read_parquet(artifacts / "interactions.parquet", columns=["user_id", "movie_id"])
    assert got.merge(seen, on=["user_id", "movie_id"]).empty
    # scores descend within a user
    assert (got.groupby("user_id")["score"].diff().dropna() <= 0).all()


def test_interrupted_run_resumes_without_duplicates(full_run, artifacts, server, tmp_path):
    out = tmp_path / "recs.parquet"
    calls = []

    def stop_after_two(chunk, table) -> None:
        calls.append(chunk)
        if len(calls) == 2:
            raise StopRequested

    with pytest.raises(StopRequested):
        batch_score(artifacts, out, "all", url=server.http_url, k=K, batch_size=CHUNK, progress=False, on_chunk=stop_after_two)
    assert not out.exists()
    parts = parts_dir(out)
    state = json.loads((parts / "state.json").read_text())
    assert state["done"] == [0, 1] and state["n_chunks"] == 5
    # a crash between a part's rename and the state update leaves an unrecorded part: it
    # must be recomputed (overwritten), not appended
    (parts / "part-00003.parquet").write_bytes(b"not parquet")

    summary = batch_score(artifacts, out, "all", url=server.http_url, k=K, batch_size=CHUNK, progress=False)
    assert summary["chunks_resumed"] == 2 and summary["users_computed"] == 300 - 2 * CHUNK
    got = pd.read_parquet(out)
    assert not got.duplicated(["user_id", "rank"]).any()
    pd.testing.assert_frame_equal(got, full_run[0])
    assert not parts.exists()


def test_resume_refuses_a_different_run(artifacts, server, tmp_path):
    out = tmp_path / "recs.parquet"

    def stop(chunk, table) -> None:
        raise StopRequested

    with pytest.raises(StopRequested):
        batch_score(artifacts, out, 100, url=server.http_url, k=K, batch_size=CHUNK, progress=False, on_chunk=stop)
    with pytest.raises(BatchScoreError, match="different run.*k"):
        batch_score(artifacts, out, 100, url=server.http_url, k=K - 1, batch_size=CHUNK, progress=False)
    summary = batch_score(artifacts, out, 100, url=server.http_url, k=K - 1, batch_size=CHUNK, progress=False, restart=True)
    assert summary["chunks_resumed"] == 0 and summary["rows"] == len(pd.read_parquet(out))


def test_cli_stop_and_resume(full_run, artifacts, server, tmp_path, capsys):
    from clients.cli import main

    users = tmp_path / "users.txt"
    wanted = full_run[0]["user_id"].drop_duplicates().to_numpy()[[5, 0, 77, 200, 13]]
    users.write_text("\n".join(str(u) for u in wanted) + "\n")
    out = tmp_path / "cli.parquet"
    argv = [
        "batch-score",
        "--artifacts",
        str(artifacts),
        "--url",
        server.http_url,
        "--users",
        str(users),
        "--k",
        str(K),
        "--out",
        str(out),
        "--batch-size",
        "2",
        "--quiet",
    ]
    assert main([*argv, "--stop-after-chunks", "1"]) == 3
    assert not out.exists()
    assert main(argv) == 0
    summary = json.loads(capsys.readouterr().out)
    assert summary["chunks"] == 3 and summary["chunks_resumed"] == 1
    got = pd.read_parquet(out)
    assert list(dict.fromkeys(got["user_id"])) == list(wanted)  # the file's order is kept
    expected = full_run[0].set_index("user_id").loc[wanted].reset_index()
    pd.testing.assert_frame_equal(got, expected)


def test_embedded_server_when_no_url(artifacts, tiny_repository, full_run, tmp_path):
    out = tmp_path / "recs.parquet"
    summary = batch_score(artifacts, out, 3, repo=tiny_repository, k=K, progress=False)
    assert summary["embedded_triton"] is True
    got = pd.read_parquet(out)
    expected = full_run[0][full_run[0]["user_id"].isin(got["user_id"].unique())].reset_index(drop=True)
    pd.testing.assert_frame_equal(got, expected)


def test_bad_arguments(artifacts, server, tmp_path):
    with pytest.raises(BatchScoreError, match="exceeds the retrieval depth"):
        batch_score(artifacts, tmp_path / "x.parquet", 5, url=server.http_url, k=1000, progress=False)
    with pytest.raises(BatchScoreError, match="neither"):
        batch_score(artifacts, tmp_path / "x.parquet", "nobody.txt", url=server.http_url, k=K, progress=False)


def test_resolve_users(artifacts, tmp_path):
    h = load_user_data(artifacts).histories
    assert np.array_equal(resolve_users("all", h), h.user_ids)
    assert np.array_equal(resolve_users("3", h), h.user_ids[:3])
    f = tmp_path / "u.csv"
    pd.DataFrame({"user_id": [7, 3, 7, 99999]}).to_csv(f, index=False)
    assert resolve_users(str(f), h).tolist() == [7, 3, 99999]  # unknown users are kept (cold start)


def test_user_bounds_keep_users_whole():
    user_row = np.repeat(np.arange(5), [3, 0, 4, 2, 9])
    bounds = user_bounds(user_row, 5, max_rows=6)
    assert bounds[0] == (0, 3) and bounds[1] == (3, 9)  # users 0 | 2+3
    assert all(hi - lo <= 6 for lo, hi in bounds)
    assert sum(hi - lo for lo, hi in bounds) == len(user_row)
    for lo, hi in bounds[:2]:
        assert lo == 0 or user_row[lo] != user_row[lo - 1]


def test_top_k_breaks_ties_by_retrieval_rank():
    user_row = np.array([0, 0, 0, 1, 1])
    rank = np.array([0, 1, 2, 0, 1])
    item = np.array([10, 11, 12, 20, 21])
    score = np.array([0.5, 0.9, 0.9, 0.1, 0.2], np.float32)
    u, r, i, s = top_k_per_user(user_row, rank, item, score, 2, 2)
    assert u.tolist() == [0, 0, 1, 1] and r.tolist() == [1, 2, 1, 2] and i.tolist() == [11, 12, 21, 20]


def test_parts_folder_is_locked_while_in_use(tmp_path):
    from export.batch_score import PartStore

    out = tmp_path / "recs.parquet"
    first = PartStore(out, {"k": 1}, n_chunks=2)
    with pytest.raises(BatchScoreError, match="in use"):
        PartStore(out, {"k": 1}, n_chunks=2)
    first.close()
    with pytest.raises(BatchScoreError, match="different run"):
        PartStore(out, {"k": 2}, n_chunks=2)
    PartStore(out, {"k": 2}, n_chunks=2, restart=True).close()  # the refused store released its lock
