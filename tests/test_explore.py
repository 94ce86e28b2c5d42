"""``recsys explore``: the page's JSON endpoints and the page itself in a real headless Chromium.

One real stack for the module: the embedded Triton, the orchestrator on port 0 and the
explorer on port 0, talking through the public gRPC API. The browser tests drive Debian's
``chromium`` with its ``chromedriver`` through selenium; they are skipped, saying why, where
either is missing (``make test`` installs them when it runs as root).
"""

from __future__ import annotations

import asyncio
import importlib.util
import json
import os
import re
import shutil
import signal
import sqlite3
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

import pytest
from test_service import make_api

from clients import errors as E
from clients.client import AsyncRecsysClient, RecsysClient, popular_request, similar_request
from clients.explore.catalog import Movie, MovieTable
from clients.explore.queries import Explorer
from clients.explore.server import create_server
from orchestrator.service import create_server as create_orchestrator
from orchestrator.settings import ServeSettings
from protos.recsys.v1 import recsys_pb2 as pb

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def repo(tiny_repository, tmp_path_factory) -> Path:
    """A copy of the shared repository: Triton's Python backend writes __pycache__ into version folders."""
    return Path(shutil.copytree(tiny_repository, tmp_path_factory.mktemp("explore") / "model_repository"))


@pytest.fixture(scope="module")
def api(repo, start_triton, tiny_artifacts, tmp_path_factory):
    triton = start_triton(repo)
    a, server = make_api(tiny_artifacts, repo, tmp_path_factory.mktemp("explore_db") / "h.sqlite", triton_url=triton.grpc_url)
    yield a
    a.client.close()
    server.stop()


@pytest.fixture(scope="module")
def target(api) -> str:
    return f"127.0.0.1:{api.server.port}"


@pytest.fixture(scope="module")
def explorer(api, target, tiny_artifacts):
    client = RecsysClient(target, timeout_s=10)
    server, _ = create_server(Explorer(client, target, MovieTable.load(tiny_artifacts)), port=0)
    server.start()
    yield server
    server.stop()
    client.close()


def get(url: str, headers: dict | None = None, method: str = "GET") -> tuple[int, dict | str]:
    """Status and body (parsed when JSON) of one request; HTTP errors are answers too."""
    req = urllib.request.Request(url, headers=headers or {}, method=method)
    try:
        with urllib.request.urlopen(req, timeout=30) as resp:
            status, body, ctype = resp.status, resp.read(), resp.headers.get("Content-Type", "")
    except urllib.error.HTTPError as exc:
        status, body, ctype = exc.code, exc.read(), exc.headers.get("Content-Type", "")
    return status, json.loads(body) if ctype.startswith("application/json") else body.decode()


# ----------------------------------------------------------------------------- pieces


def test_title_search_prefers_prefixes_then_popularity():
    table = MovieTable(
        [
            Movie(1, "Toy Story", ("Animation",), 1995, 450),
            Movie(2, "The Story of Us", ("Drama",), 1999, 900),
            Movie(3, "Story of a Fox", (), 0, 10),
            Movie(4, "Heat", ("Action",), 1995, 300),
        ],
        "test",
    )
    assert [m.movie_id for m in table.search("story")] == [3, 2, 1]  # prefix first, then most rated
    assert [m.movie_id for m in table.search("STORY", limit=2)] == [3, 2]
    assert [m.movie_id for m in table.search("4")] == [4] and table.search("  ") == []
    assert table.genres == ["Action", "Animation", "Drama"] and table.get(9) is None and len(table) == 4


def test_answer_returns_the_request_id_sync_and_async(api, target):
    sync = api.client.answer(similar_request(int(api.catalog.movie_ids[0]), k=3))
    assert len(sync.response.items) == 3 and re.fullmatch(r"[0-9a-f]{32}", sync.request_id)
    with pytest.raises(TypeError, match="Recommend, Similar or Popular"):
        api.client.answer(pb.DeleteUserRequest(user_id=api.user))

    async def ask() -> list:
        async with AsyncRecsysClient(target) as client:
            answers = [await client.answer(popular_request(k=2)) for _ in range(2)]
            with pytest.raises(E.InvalidArgument) as bad:
                await client.answer(popular_request(k=0))
            return [*answers, bad.value]

    first, second, bad = asyncio.run(ask())
    assert [i.movie_id for i in first.response.items] == [i.movie_id for i in api.client.popular(k=2).items]
    assert first.request_id != second.request_id and re.fullmatch(r"[0-9a-f]{32}", bad.request_id)


# ----------------------------------------------------------------------------- JSON endpoints


def test_recommend_answers_what_the_api_answers(api, explorer):
    status, body = get(f"{explorer.url}api/recommend?user={api.user}&k=5&mmr_lambda=1")
    direct = api.client.recommend(api.user, k=5, mmr_lambda=1.0)
    assert status == 200
    assert [i["movie_id"] for i in body["items"]] == [i.movie_id for i in direct.items]
    assert [i["title"] for i in body["items"]] == [i.title for i in direct.items]
    assert re.fullmatch(r"[0-9a-f]{32}", body["request_id"])
    assert body["model_version"] == "1" and body["is_fallback"] is False and body["variant"] == ""
    assert body["history_length"] == direct.history_length > 0 and body["history"] is None
    assert body["timings"]["user_tower_ms"] > 0 and body["timings"]["ranking_ms"] > 0
    assert all(i["explanation"].startswith("because you watched ") for i in body["items"])
    _, cold = get(f"{explorer.url}api/recommend?user=10000001&k=3")  # a user without history
    assert cold["is_fallback"] is True and cold["fallback_reason"] == "FALLBACK_REASON_NO_HISTORY"
    assert cold["model_version"] == "popularity" and len(cold["items"]) == 3


def test_request_ids_are_the_ones_in_the_request_log(api, explorer):
    _, first = get(f"{explorer.url}api/recommend?user={api.user}&k=3")
    _, second = get(f"{explorer.url}api/popular?k=3")
    assert first["request_id"] != second["request_id"]
    log = api.server.request_log  # the server's own record of the calls
    log.flush()
    with sqlite3.connect(log.path) as db:
        rows = dict(db.execute("SELECT request_id, rpc FROM requests"))
    assert rows[first["request_id"]] == "Recommend" and rows[second["request_id"]] == "Popular"


def test_controls_change_the_answer(api, explorer, tiny_artifacts):
    base = f"{explorer.url}api/recommend?user={api.user}&k=8"
    _, plain = get(base)
    genre = next(g for i in plain["items"] for g in i["genres"])
    _, by_genre = get(f"{base}&genre={genre}")
    assert by_genre["items"] and all(genre in i["genres"] for i in by_genre["items"])
    _, quota = get(f"{base}&max_per_genre=1&mmr_lambda=1")
    counts: dict[str, int] = {}
    for item in quota["items"]:
        for g in item["genres"]:
            counts[g] = counts.get(g, 0) + 1
    assert max(counts.values()) == 1
    _, years = get(f"{base}&min_year=1990&max_year=2000")
    assert all(1990 <= i["year"] <= 2000 for i in years["items"])


def test_bad_input_gets_the_apis_message(api, explorer):
    cases = {
        "api/recommend?user=1&k=900": lambda: api.client.recommend(1, k=900),
        "api/recommend?user=1&min_year=2050&max_year=2000": lambda: api.client.recommend(1, min_year=2050, max_year=2000),
        "api/recommend?user=1&genre=Nosuchgenre": lambda: api.client.recommend(1, genres=["Nosuchgenre"]),
        "api/popular?k=0": lambda: api.client.popular(k=0),
    }
    for path, call in cases.items():
        with pytest.raises(E.InvalidArgument) as direct:
            call()
        status, body = get(explorer.url + path)
        assert status == 400, path
        assert body["error"]["code"] == "INVALID_ARGUMENT" and body["error"]["source"] == "api"
        assert body["error"]["message"] == direct.value.details
        assert re.fullmatch(r"[0-9a-f]{32}", body["error"]["request_id"])
    status, body = get(f"{explorer.url}api/similar?movie=999999")
    assert status == 404 and body["error"]["code"] == "NOT_FOUND" and "999999" in body["error"]["message"]
    status, body = get(f"{explorer.url}api/recommend?user=abc")
    assert status == 400 and body["error"]["source"] == "explorer" and "user must be a whole number" in body["error"]["message"]
    status, body = get(f"{explorer.url}api/recommend?k=5")
    assert status == 400 and "give a user id, or a history" in body["error"]["message"]


def test_history_search_and_similar(api, explorer):
    movies = explorer.explorer.movies
    first = movies.search("Synthetic Movie", limit=3)
    assert len(first) == 3
    status, found = get(f"{explorer.url}api/movies?q={first[0].title.replace(' ', '+')}")
    assert status == 200 and found["movies"][0]["movie_id"] == first[0].movie_id
    history = ",".join(str(m.movie_id) for m in first)
    _, answer = get(f"{explorer.url}api/recommend?history={history},999999&ratings=5,0,3.5,4&k=5")
    assert answer["ignored_movie_ids"] == [999999] and answer["history_length"] == 3
    assert [h["title"] for h in answer["history"][:3]] == [m.title for m in first]
    assert [h["rating"] for h in answer["history"]] == [5.0, 0.0, 3.5, 4.0] and answer["history"][3]["known"] is False
    _, similar = get(f"{explorer.url}api/similar?movie={first[0].movie_id}&k=4")
    assert similar["movie"]["title"] == first[0].title and len(similar["items"]) == 4
    assert first[0].movie_id not in [i["movie_id"] for i in similar["items"]]
    _, recent = get(f"{explorer.url}api/popular?k=5&window=recent")
    _, all_time = get(f"{explorer.url}api/popular?k=5")
    assert recent["window"] == "recent" and [i["movie_id"] for i in recent["items"]] == [
        i.movie_id for i in api.client.popular(k=5, recent=True).items
    ]
    assert [i["movie_id"] for i in all_time["items"]] == [i.movie_id for i in api.client.popular(k=5).items]


def test_the_page_is_served_read_only_on_loopback(explorer):
    status, page = get(explorer.url + "?user=1")
    assert status == 200 and "<title>recsys explorer</title>" in page and "/static/app.js" in page
    assert not re.search(r"(src|href)=\"(https?:)?//", page)  # nothing from outside
    for name in ("app.js", "style.css"):
        status, text = get(f"{explorer.url}static/{name}")
        assert status == 200 and "http://" not in text and "https://" not in text
    status, body = get(f"{explorer.url}api/recommend?user=1", method="POST")
    assert status == 405 and "read-only" in body["error"]["message"]
    status, body = get(f"{explorer.url}api/info", headers={"Host": f"attacker.example:{explorer.port}"})
    assert status == 403
    status, info = get(f"{explorer.url}api/info")
    assert info["health"] == "SERVING" and info["catalog"]["movies"] == len(explorer.explorer.movies)
    assert get(f"{explorer.url}nothing-here")[0] == 404


def test_api_keys_and_tls_reach_through_the_explorer(tiny_artifacts, tiny_repository, tmp_path):
    """The explorer is an API client like any other: the key and the CA are its, the page never sees them."""
    openssl = shutil.which("openssl")
    if openssl is None:
        pytest.skip("the openssl command is not installed")
    cert, key = tmp_path / "cert.pem", tmp_path / "key.pem"
    subprocess.run(
        [
            openssl,
            "req",
            "-x509",
            "-newkey",
            "ec",
            "-pkeyopt",
            "ec_paramgen_curve:prime256v1",
            "-nodes",
            "-days",
            "1",
            "-subj",
            "/CN=localhost",
            "-addext",
            "subjectAltName=DNS:localhost,IP:127.0.0.1",
            "-keyout",
            str(key),
            "-out",
            str(cert),
        ],
        check=True,
        capture_output=True,
    )
    settings = ServeSettings(
        artifacts_dir=tiny_artifacts,
        model_repository=tiny_repository,
        history_db_path=tmp_path / "h.sqlite",
        tls_cert=cert,
        tls_key=key,
        api_keys="page-key-0001",
    )
    server, port = create_orchestrator(settings)
    server.start()
    target = f"127.0.0.1:{port}"
    servers = []
    try:
        with RecsysClient(target, tls_ca=cert) as probe:
            probe.wait_until_serving(60)
        for api_key in ("page-key-0001", None):
            client = RecsysClient(target, tls_ca=cert, api_key=api_key, timeout_s=10)
            http, _ = create_server(Explorer(client, target), port=0)
            servers.append((http.start(), client))
        (keyed, _), (anonymous, _) = servers
        status, body = get(f"{keyed.url}api/popular?k=3")
        assert status == 200 and len(body["items"]) == 3
        status, body = get(f"{anonymous.url}api/popular?k=3")
        assert status == 401 and body["error"]["code"] == "UNAUTHENTICATED" and "x-api-key" in body["error"]["message"]
        status, body = get(f"{keyed.url}api/movies?q=x")
        assert status == 404 and "--artifacts" in body["error"]["message"]  # no item table: search says how to get one
    finally:
        for http, client in servers:
            http.stop()
            client.close()
        server.stop()


def test_recsys_explore_command_serves_until_sigterm(explorer, target, tiny_artifacts):
    proc = subprocess.Popen(
        [sys.executable, "-m", "clients.cli", "explore", "--target", target, "--port", "0", "--artifacts", str(tiny_artifacts), "--json"],
        cwd=ROOT,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        info = json.loads(proc.stdout.readline())
        assert info["target"] == target and info["catalog"].endswith("items.parquet")
        status, page = get(info["explorer"])
        assert status == 200 and "recsys explorer" in page
        assert get(info["explorer"] + "api/popular?k=2")[1]["items"]
    finally:
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=20) == 0
    bad = subprocess.run(
        [sys.executable, "-m", "clients.cli", "explore", "--target", target, "--port", "0", "--artifacts", "/nonexistent"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert bad.returncode == 1 and "items.parquet not found" in bad.stderr


# ----------------------------------------------------------------------------- the page in Chromium


def _screenshot_script():
    """scripts/explore_screenshot.py, the one home of how Chromium is started here."""
    spec = importlib.util.spec_from_file_location("explore_screenshot", ROOT / "scripts" / "explore_screenshot.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def browser(tmp_path_factory):
    """Debian's headless Chromium through its chromedriver (selenium), or a skip that says what is missing."""
    script = _screenshot_script()
    why = script.missing_browser()
    if why:
        pytest.skip(why)
    driver = script.start_chromium(tmp_path_factory.mktemp("chromium-profile"))
    yield driver
    driver.quit()


def wait_for(driver, predicate, timeout: float = 30.0, what: str = ""):
    from selenium.webdriver.support.ui import WebDriverWait

    return WebDriverWait(driver, timeout, poll_frequency=0.05).until(lambda d: predicate(d), message=what)


def ready(panel: str, renders_before: int = -1):
    """Waits for an answer drawn after ``renders_before``, ready or error."""

    def check(d):
        state = d.find_element("id", panel).get_attribute("data-state")
        return state in ("ready", "error") and d.execute_script("return window.explorer.renders") > renders_before

    return check


def rows(driver, table: str = "recs") -> list[dict]:
    return driver.execute_script(
        "return [...document.querySelectorAll(arguments[0])].map(r => ({id: Number(r.dataset.movieId),"
        " genres: [...r.querySelectorAll('.genre')].map(g => g.textContent), text: r.textContent}))",
        f"#{table} tbody tr[data-movie-id]",
    )


def test_page_for_a_user_in_chromium(browser, api, explorer, tmp_path):
    start = time.perf_counter()
    browser.get(f"{explorer.url}?user={api.user}")
    wait_for(browser, ready("recs-panel"), what="the first recommendations")
    wall_ms = (time.perf_counter() - start) * 1e3
    first_render_ms = browser.execute_script("return window.explorer.firstRenderMs")
    load = os.getloadavg()[0]
    print(
        f"\nexplorer first render for a user: {first_render_ms:.0f} ms after navigation start "
        f"({wall_ms:.0f} ms wall from driver.get; load average {load:.1f} on {os.cpu_count()} cores)"
    )
    assert browser.find_element("id", "recs-panel").get_attribute("data-state") == "ready"
    first = rows(browser)
    direct = api.client.recommend(api.user, k=10)
    assert [r["id"] for r in first] == [i.movie_id for i in direct.items]
    meta = browser.find_element("id", "recs-meta").text
    assert re.search(r"request [0-9a-f]{32}", meta) and "model 1" in browser.find_element("id", "recs-badges").text
    assert "user tower" in browser.find_element("id", "recs-timings").text

    # a control: one genre chip re-asks live; every movie of the new list has that genre
    wait_for(browser, lambda d: d.find_elements("css selector", "#genre-chips .chip"), what="the genre chips")
    genre = first[0]["genres"][0]
    renders = browser.execute_script("return window.explorer.renders")
    browser.find_element("css selector", f"#genre-chips .chip[data-genre='{genre}']").click()
    wait_for(browser, ready("recs-panel", renders), what="the list for one genre")
    by_genre = rows(browser)
    assert by_genre and all(genre in r["genres"] for r in by_genre)
    assert f"genre={genre}" in browser.current_url  # the link to this view can be shared

    # k re-asks too
    renders = browser.execute_script("return window.explorer.renders")
    k = browser.find_element("id", "k")
    k.clear()
    k.send_keys("3")
    wait_for(browser, ready("recs-panel", renders), what="the list for k=3")
    assert len(rows(browser)) == 3

    # similar to a movie of the page
    browser.find_element("css selector", "#recs tbody tr button[data-similar]").click()
    wait_for(browser, lambda d: d.find_element("id", "similar-panel").get_attribute("data-state") == "ready", what="similar")
    assert browser.find_elements("css selector", "#similar li[data-movie-id]")
    assert re.search(r"request [0-9a-f]{32}", browser.find_element("id", "similar-meta").text)

    # popular by window
    browser.find_element("css selector", "#pop_window option[value=recent]").click()
    wait_for(
        browser,
        lambda d: "pop_window=recent" in d.current_url and d.find_element("id", "popular-panel").get_attribute("data-state") == "ready",
    )
    popular = [
        int(x)
        for x in browser.execute_script("return [...document.querySelectorAll('#popular li[data-movie-id]')].map(li => li.dataset.movieId)")
    ]
    assert popular == [i.movie_id for i in api.client.popular(k=6, recent=True).items]

    # the screenshot: the user's page as it opens, the whole page tall
    shot = _screenshot_script().screenshot(browser, f"{explorer.url}?user={api.user}&similar={first[0]['id']}", tmp_path / "explore.png")
    assert shot.stat().st_size > 20_000
    if os.environ.get("RECSYS_EXPLORE_SCREENSHOT"):  # to look at it
        shutil.copy(shot, os.environ["RECSYS_EXPLORE_SCREENSHOT"])
    browser.set_window_size(1440, 1000)

    # bad input shows the API's message, not a blank page
    with pytest.raises(E.InvalidArgument) as direct_error:
        api.client.recommend(api.user, k=10, min_year=2050, max_year=2000)
    renders = browser.execute_script("return window.explorer.renders")
    for field, value in (("min_year", "2050"), ("max_year", "2000")):
        box = browser.find_element("id", field)
        box.clear()
        box.send_keys(value)
    wait_for(browser, lambda d: d.find_element("id", "recs-error").is_displayed(), what="the error")
    error = browser.find_element("id", "recs-error").text
    assert "INVALID_ARGUMENT" in error and direct_error.value.details in error
    assert browser.execute_script("return window.explorer.renders") > renders


def test_typed_history_in_chromium(browser, api, explorer):
    browser.get(f"{explorer.url}?mode=history")
    wait_for(browser, lambda d: d.find_element("id", "catalog-info").text, what="the header")
    movie = explorer.explorer.movies.search("Synthetic", limit=1)[0]
    search = browser.find_element("id", "movie-search")
    search.send_keys(movie.title)
    wait_for(browser, lambda d: d.find_elements("css selector", f"#suggestions li[data-movie-id='{movie.movie_id}']"), what="a suggestion")
    browser.find_element("css selector", f"#suggestions li[data-movie-id='{movie.movie_id}']").click()
    wait_for(browser, lambda d: d.find_element("id", "recs-panel").get_attribute("data-state") == "ready", what="recommendations")
    assert f"history={movie.movie_id}" in browser.current_url
    history_rows = rows(browser, "history")
    assert [r["id"] for r in history_rows] == [movie.movie_id] and movie.title in history_rows[0]["text"]
    direct = api.client.recommend(history=[movie.movie_id], k=10)
    assert [r["id"] for r in rows(browser)] == [i.movie_id for i in direct.items]
