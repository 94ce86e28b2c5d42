"""Promotion slots (``Rerank.promotions``) on a real server through the typed client and the CLI."""

from __future__ import annotations

import json

import numpy as np
import pytest
from test_service import NEW_USER, UNKNOWN_MOVIE, ids, make_api

from clients import errors as E
from clients.cli import main
from clients.client import Promoted, recommend_request
from orchestrator.rerank import place_promotions
from protos.recsys.v1 import recsys_pb2 as pb


@pytest.fixture(scope="module")
def api(tiny_artifacts, tiny_repository, tmp_path_factory):
    a, server = make_api(tiny_artifacts, tiny_repository, tmp_path_factory.mktemp("promo") / "history.sqlite")
    yield a
    a.client.close()
    server.stop()


def unseen_outside(api, exclude: set[int], n: int) -> list[int]:
    """``n`` catalog movies the user has not seen and that are not in ``exclude``."""
    seen = api.seen(api.user)
    return [int(m) for m in api.catalog.movie_ids if int(m) not in seen and int(m) not in exclude][-n:]


def test_place_promotions_pins_fills_and_closes_short_lists():
    items, source = place_promotions(np.array([10, 11, 12, 13]), 4, np.array([12, 99]), np.array([0, 2]))
    assert items.tolist() == [12, 10, 99, 11] and source.tolist() == [0, -1, 1, -1]
    items, source = place_promotions(np.array([10]), 5, np.array([7, 8]), np.array([4, 1]))
    assert items.tolist() == [10, 8, 7] and source.tolist() == [-1, 1, 0]  # no gaps, position order
    assert place_promotions(np.array([1, 2, 3]), 2, np.array([], np.int64), np.array([], np.int64))[0].tolist() == [1, 2]


def test_promotions_take_their_positions_and_ranked_movies_fill_the_rest(api):
    k = 8
    organic = ids(api.client.recommend(api.user, k=k + 2))
    first, fifth = unseen_outside(api, set(organic), 2)
    resp = api.client.recommend(api.user, k=k, promotions=[Promoted(first, 1), Promoted(fifth, 5, "editorial")])
    got = ids(resp)
    assert len(got) == k and got[0] == first and got[4] == fifth
    assert resp.items[0].explanation == "sponsored" and resp.items[4].explanation == "editorial pick"
    assert resp.items[0].score == 0 and resp.items[4].score == 0
    assert [m for n, m in enumerate(got) if n not in (0, 4)] == organic[: k - 2]  # ranked order kept
    assert all(i.explanation.startswith("because you watched") for n, i in enumerate(resp.items) if n not in (0, 4))
    assert list(resp.dropped_promotion_ids) == [] and not resp.is_fallback


def test_a_promoted_movie_that_was_ranked_anyway_is_shown_once(api):
    organic = ids(api.client.recommend(api.user, k=7))
    resp = api.client.recommend(api.user, k=6, promotions=[Promoted(organic[3], 1)])
    got = ids(resp)
    assert got[0] == organic[3] and len(got) == len(set(got)) == 6
    assert got[1:] == [m for m in organic if m != organic[3]][:5]


def test_filtered_and_seen_promotions_are_dropped_not_shown(api):
    seen = sorted(api.seen(api.user))[0]
    comedy = next(
        int(m) for m, g in zip(api.catalog.movie_ids, api.catalog.genres) if "Drama" not in g and int(m) not in api.seen(api.user)
    )
    excluded = unseen_outside(api, {comedy}, 1)[0]
    promos = [Promoted(seen, 1), Promoted(comedy, 2), Promoted(excluded, 3)]
    resp = api.client.recommend(api.user, k=5, genres=["Drama"], exclude_movie_ids=[excluded], promotions=promos)
    assert not {seen, comedy, excluded} & set(ids(resp)) and len(resp.items) == 5
    assert list(resp.dropped_promotion_ids) == [seen, comedy, excluded]
    assert all(i.explanation.startswith("because") for i in resp.items)
    shown = api.client.recommend(api.user, k=5, include_seen=True, promotions=[Promoted(seen, 2)])
    assert ids(shown)[1] == seen and list(shown.dropped_promotion_ids) == []


def test_promotions_apply_to_the_popular_fallback_and_batches(api):
    movie = int(api.catalog.movie_ids[-1])
    cold = api.client.recommend(NEW_USER, k=4, promotions=[Promoted(movie, 3)])
    assert cold.is_fallback and ids(cold)[2] == movie and cold.items[2].explanation == "sponsored"
    assert [m for m in ids(cold) if m != movie] == [m for m in ids(api.client.popular(k=4)) if m != movie][:3]
    good = recommend_request(api.user, k=3, promotions=[Promoted(movie, 2)])
    bad = recommend_request(api.user, k=3, promotions=[Promoted(UNKNOWN_MOVIE, 1)])
    results = api.client.batch_recommend([good, bad]).results
    assert ids(results[0].response)[1] == movie
    assert results[1].failure.code == 3 and f"movie_id {UNKNOWN_MOVIE} is not in the catalog" in results[1].failure.message


@pytest.mark.parametrize(
    "promos, words",
    [
        ([Promoted(UNKNOWN_MOVIE, 1)], f"rerank.promotions\\[0\\].movie_id {UNKNOWN_MOVIE} is not in the catalog"),
        ([Promoted(1, 0)], r"rerank.promotions\[0\].position must be in 1..k \(5\), got 0"),
        ([Promoted(1, 6)], r"position must be in 1..k \(5\), got 6"),
        ([Promoted(1, 2), Promoted(2, 2)], r"promotions\[1\].position 2 is already taken by rerank.promotions\[0\]"),
        ([Promoted(1, 2), Promoted(1, 3)], r"promotions\[1\].movie_id 1 is already promoted"),
        ([pb.Promotion(movie_id=1, position=1)], "kind must be PROMOTION_KIND_SPONSORED or PROMOTION_KIND_EDITORIAL"),
        ([Promoted(m, m) for m in range(1, 7)], r"holds 6 entries, at most k \(5\)"),
    ],
)
def test_invalid_promotions_are_invalid_argument(api, promos, words):
    with pytest.raises(E.InvalidArgument, match=words):
        api.client.recommend(api.user, k=5, promotions=promos)


def test_similar_refuses_promotions(api):
    with pytest.raises(E.InvalidArgument, match="not Similar"):
        api.client.similar(int(api.catalog.movie_ids[0]), k=3, promotions=[Promoted(int(api.catalog.movie_ids[1]), 1)])


def test_cli_promote_flag(api, capsys):
    movie = unseen_outside(api, set(ids(api.client.recommend(api.user, k=6))), 1)[0]
    seen = sorted(api.seen(api.user))[0]
    target = ["--target", api.server.address]
    argv = ["recommend", "--user", str(api.user), "-k", "3", "--promote", f"{movie}@2:editorial", "--promote", f"{seen}@1", *target]
    assert main([*argv, "--json"]) == 0
    body = json.loads(capsys.readouterr().out)
    assert int(body["items"][1]["movie_id"]) == movie and body["items"][1]["explanation"] == "editorial pick"
    assert [int(m) for m in body["dropped_promotion_ids"]] == [seen]
    assert main(argv) == 0
    assert f"promotions dropped (filtered or seen): [{seen}]" in capsys.readouterr().out
    with pytest.raises(SystemExit) as usage:
        main(["recommend", "--user", "1", "--promote", "12:3", *target])
    assert usage.value.code == 2
