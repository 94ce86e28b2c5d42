"""``recsys data download`` against a real HTTP server on loopback serving archives built here.

The archives use the official file names and formats (``u.data``/``u.item``/``u.user`` for
100K, ``::``-separated latin-1 ``.dat`` files for 1M, the CSV layout for the newer releases);
the server is ``http.server`` in a thread, with byte ranges and a switch to break a transfer
off half way.
"""

from __future__ import annotations

import hashlib
import io
import json
import socket
import threading
import zipfile
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import numpy as np
import pytest

from clients.cli import main
from export.data import load_movielens
from export.download import BASE_URL_ENV, DownloadError, download

README = "SUMMARY\n\nUsage License\n=============\nResearch use only; cite Harper & Konstan (2015).\n"
GENRES = [
    "unknown",
    "Action",
    "Adventure",
    "Animation",
    "Children's",
    "Comedy",
    "Crime",
    "Documentary",
    "Drama",
    "Fantasy",
    "Film-Noir",
    "Horror",
    "Musical",
    "Mystery",
    "Romance",
    "Sci-Fi",
    "Thriller",
    "War",
    "Western",
]


CHILDREN = "Children's"


def _flags(*names: str) -> str:
    return "|".join("1" if g in names else "0" for g in GENRES)


def _zip(folder: str, files: dict[str, bytes]) -> bytes:
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w", zipfile.ZIP_DEFLATED) as zf:
        zf.writestr(f"{folder}/", b"")
        for name, data in files.items():
            zf.writestr(f"{folder}/{name}", data)
    return buf.getvalue()


def archive_100k(n_extra_ratings: int = 3000) -> bytes:
    """ml-100k.zip: 3 movies, 3 users; many ratings so the archive spans several blocks."""
    items = [
        f"1|Toy Story (1995)|01-Jan-1995||http://us.imdb.com/M/title-exact?Toy%20Story%20(1995)|{_flags('Animation', CHILDREN, 'Comedy')}",
        f"2|Misérables, Les (1995)|01-Jan-1995||http://us.imdb.com/x|{_flags('Drama', 'War')}",
        f"3|unknown||||{_flags('unknown')}",
    ]
    rng = np.random.default_rng(0)
    ratings = ["1\t1\t5\t881250949", "2\t2\t3\t891717742", "3\t3\t1\t878887116"]
    for i in range(n_extra_ratings):  # distinct (user, movie, timestamp): no duplicates dropped
        ratings.append(f"{rng.integers(1, 4)}\t{rng.integers(1, 4)}\t{rng.integers(1, 6)}\t{880000000 + i}")
    return _zip(
        "ml-100k",
        {
            "u.data": ("\n".join(ratings) + "\n").encode(),
            "u.item": ("\n".join(items) + "\n").encode("latin-1"),
            "u.user": b"1|24|M|technician|85711\n2|53|F|other|94043\n3|23|M|writer|32067\n",
            "u.genre": ("\n".join(f"{g}|{i}" for i, g in enumerate(GENRES)) + "\n\n").encode(),
            "README": README.encode(),
        },
    )


def archive_1m() -> bytes:
    return _zip(
        "ml-1m",
        {
            "ratings.dat": b"1::1193::5::978300760\n1::661::3::978302109\n2::1193::4::978298413\n",
            "movies.dat": "1193::One Flew Over the Cuckoo's Nest (1975)::Drama\n"
            "661::James and the Giant Peach (1996)::Animation|Children's|Musical\n"
            "2::Misérables, Les (1995)::Drama\n".encode("latin-1"),
            "users.dat": b"1::F::1::10::48067\n2::M::56::16::70072\n",
            "README": README.encode(),
        },
    )


def archive_csv(folder: str) -> bytes:
    return _zip(
        folder,
        {
            "ratings.csv": b"userId,movieId,rating,timestamp\n1,1,4.0,964982703\n1,3,3.5,964981247\n2,1,0.5,964982224\n",
            "movies.csv": b'movieId,title,genres\n1,Toy Story (1995),Adventure|Animation\n3,"Grumpier Old Men, The (1995)",Comedy|Romance\n',
            "tags.csv": b"userId,movieId,tag,timestamp\n2,1,funny,1445714994\n",
            "links.csv": b"movieId,imdbId,tmdbId\n1,0114709,862\n3,0113228,15602\n",
            "genome-scores.csv": b"movieId,tagId,relevance\n1,1,0.5\n",
            "README.txt": README.encode(),
        },
    )


class Server:
    """A loopback HTTP server for ``{path: bytes}`` with byte ranges (``If-Range`` on the ETag).

    Attributes:
        files: What it serves.
        requests: ``(path, Range header, status)`` of every request, in order.
        break_after: ``path -> n``: the next GET of ``path`` announces the whole length,
            sends ``n`` bytes and closes the connection.
        ranges: Honour ``Range`` (False: always 200 with the whole file).
    """

    def __init__(self) -> None:
        self.files: dict[str, bytes] = {}
        self.requests: list[tuple[str, str | None, int]] = []
        self.break_after: dict[str, int] = {}
        self.ranges = True
        outer = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args) -> None:
                pass

            def do_GET(self) -> None:
                body = outer.files.get(self.path)
                rng = self.headers.get("Range")
                if body is None:
                    outer.requests.append((self.path, rng, 404))
                    self.send_error(404)
                    return
                etag = '"' + hashlib.sha1(body).hexdigest() + '"'
                start = 0
                if rng and outer.ranges and self.headers.get("If-Range", etag) == etag:
                    start = int(rng.removeprefix("bytes=").split("-")[0])
                    if start >= len(body):
                        outer.requests.append((self.path, rng, 416))
                        self.send_error(416)
                        return
                status = 206 if start else 200
                outer.requests.append((self.path, rng, status))
                self.send_response(status)
                self.send_header("Content-Length", str(len(body) - start))
                self.send_header("ETag", etag)
                if start:
                    self.send_header("Content-Range", f"bytes {start}-{len(body) - 1}/{len(body)}")
                self.end_headers()
                cut = outer.break_after.pop(self.path, None)
                self.wfile.write(body[start:] if cut is None else body[start : start + cut])
                if cut is not None:
                    self.wfile.flush()
                    self.close_connection = True

        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}/datasets/movielens"
        self.thread = threading.Thread(target=self.httpd.serve_forever, daemon=True)

    def publish(self, name: str, archive: bytes, md5: str | None = "right") -> None:
        self.files[f"/datasets/movielens/{name}.zip"] = archive
        if md5 is not None:
            digest = hashlib.md5(archive).hexdigest() if md5 == "right" else md5
            self.files[f"/datasets/movielens/{name}.zip.md5"] = f"MD5 ({name}.zip) = {digest}\n".encode()


@pytest.fixture
def server() -> Iterator[Server]:
    srv = Server()
    srv.thread.start()
    try:
        yield srv
    finally:
        srv.httpd.shutdown()
        srv.httpd.server_close()


def leftovers(parent: Path) -> list[str]:
    """Hidden files the command may leave beside its output (parts, staging folders)."""
    return sorted(p.name for p in parent.iterdir() if p.name.startswith("."))


def test_100k_is_converted_and_the_loader_reads_it(server: Server, tmp_path: Path, capsys) -> None:
    server.publish("ml-100k", archive_100k())
    out = tmp_path / "data" / "ml-100k"
    assert main(["data", "download", "ml-100k", "--out", str(out), "--base-url", server.url, "--quiet"]) == 0
    record = json.loads(capsys.readouterr().out)
    assert record["dataset"] == "ml-100k" and record["redistributable"] is False
    assert "matches the published" in record["checks"]["md5"]

    ml = load_movielens(out, progress=False)
    assert ml.n_ratings == 3003 and ml.report.total_dropped == 0
    assert ml.movies["title"].tolist() == ["Toy Story", "Misérables, Les", "unknown"]
    assert ml.movies["genres"].tolist() == ["Animation|Children's|Comedy", "Drama|War", "unknown"]
    assert ml.users is not None and ml.users.iloc[1].to_dict() == {"user_id": 2, "age": 53, "gender": "F", "occupation": "other"}
    first = ml.ratings[ml.ratings.timestamp == 881250949].iloc[0]
    assert (first.user_id, first.movie_id, first.rating) == (1, 1, 5.0)
    assert (out / "ratings.csv").read_text().splitlines()[1] == "1,1,5.0,881250949"
    assert (out / "README").read_text() == README
    assert sorted(p.name for p in out.iterdir()) == ["README", "download.json", "movies.csv", "ratings.csv", "users.csv"]
    assert leftovers(out.parent) == []  # no part file, no staging folder


def test_1m_dat_files_are_converted(server: Server, tmp_path: Path) -> None:
    server.publish("ml-1m", archive_1m())
    out = tmp_path / "ml-1m"
    download("ml-1m", out, url=server.url, progress=False)
    ml = load_movielens(out, progress=False)
    assert ml.n_ratings == 3
    assert ml.movies.set_index("movie_id").loc[2, "title"] == "Misérables, Les"
    assert ml.movies.set_index("movie_id").loc[661, "genres"] == "Animation|Children's|Musical"
    users = ml.users.set_index("user_id")
    assert users.loc[1].to_dict() == {"age": 1, "gender": "F", "occupation": "K-12 student"}
    assert users.loc[2].to_dict() == {"age": 56, "gender": "M", "occupation": "self-employed"}
    assert (out / "README").is_file()


def test_a_csv_release_without_published_md5_is_checked_by_structure(server: Server, tmp_path: Path) -> None:
    server.publish("ml-32m", archive_csv("ml-32m"), md5=None)
    out = tmp_path / "ml-32m"
    record = download("ml-32m", out, url=server.url, progress=False)
    assert "no ml-32m.zip.md5 published" in record["checks"]["md5"]
    assert ("/datasets/movielens/ml-32m.zip.md5", None, 404) in server.requests
    assert sorted(p.name for p in out.iterdir()) == ["README.txt", "download.json", "links.csv", "movies.csv", "ratings.csv", "tags.csv"]
    ml = load_movielens(out, progress=False)
    assert ml.n_ratings == 3 and ml.users is None and ml.report.rows_read["tags.csv"] == 1


def test_md5_mismatch_deletes_the_archive_and_writes_nothing(server: Server, tmp_path: Path, capsys) -> None:
    server.publish("ml-latest-small", archive_csv("ml-latest-small"), md5="0" * 32)
    out = tmp_path / "ml-latest-small"
    args = ["data", "download", "ml-latest-small", "--out", str(out), "--base-url", server.url, "--quiet"]
    assert main(args) == 1
    err = capsys.readouterr().err
    assert "differs from the published " + "0" * 32 in err
    assert not out.exists() and leftovers(tmp_path) == []
    server.publish("ml-latest-small", archive_csv("ml-latest-small"))  # the right sum now
    assert main(args) == 0
    assert [r for r in server.requests if r[0].endswith(".zip")][-1][1] is None  # a fresh download, no Range


def test_an_interrupted_download_resumes_with_a_range_request(server: Server, tmp_path: Path) -> None:
    archive = archive_100k(n_extra_ratings=20000)
    server.publish("ml-100k", archive)
    server.break_after["/datasets/movielens/ml-100k.zip"] = cut = len(archive) // 3
    out = tmp_path / "ml-100k"
    with pytest.raises(DownloadError, match="run the same command again to resume"):
        download("ml-100k", out, url=server.url, progress=False)
    assert not out.exists()
    part = tmp_path / ".ml-100k.zip.part"
    assert part.stat().st_size == cut

    download("ml-100k", out, url=server.url, progress=False)
    gets = [r for r in server.requests if r[0].endswith(".zip")]
    assert gets == [("/datasets/movielens/ml-100k.zip", None, 200), ("/datasets/movielens/ml-100k.zip", f"bytes={cut}-", 206)]
    assert load_movielens(out, progress=False).n_ratings == 20003
    assert leftovers(tmp_path) == []


def test_a_server_without_ranges_restarts_cleanly(server: Server, tmp_path: Path) -> None:
    server.publish("ml-1m", archive_1m())
    server.ranges = False
    (tmp_path / ".ml-1m.zip.part").write_bytes(b"stale bytes of another attempt")
    download("ml-1m", tmp_path / "ml-1m", url=server.url, progress=False)
    assert [r[2] for r in server.requests if r[0].endswith(".zip")] == [200]
    assert load_movielens(tmp_path / "ml-1m", progress=False).n_ratings == 3


def test_no_network_names_the_url_and_where_to_put_the_archive(tmp_path: Path, capsys, monkeypatch) -> None:
    with socket.socket() as s:  # a port nothing listens on: connection refused
        s.bind(("127.0.0.1", 0))
        dead = f"http://127.0.0.1:{s.getsockname()[1]}/movielens"
    monkeypatch.setenv(BASE_URL_ENV, dead)
    out = tmp_path / "ml-100k"
    assert main(["data", "download", "ml-100k", "--out", str(out), "--quiet"]) == 1
    err = capsys.readouterr().err
    assert f"cannot reach {dead}/ml-100k.zip.md5" in err
    assert f"download {dead}/ml-100k.zip on a machine" in err and f"put it at {tmp_path / 'ml-100k.zip'}" in err
    assert list(tmp_path.iterdir()) == []

    # the user follows the advice: the same command then works offline
    (tmp_path / "ml-100k.zip").write_bytes(archive_100k())
    assert main(["data", "download", "ml-100k", "--out", str(out), "--quiet"]) == 0
    record = json.loads(capsys.readouterr().out)
    assert record["source"] == str(tmp_path / "ml-100k.zip") and "size and structure" in record["checks"]["md5"]
    assert load_movielens(out, progress=False).users is not None
    assert (tmp_path / "ml-100k.zip").is_file()  # the user's file is left alone


def test_wrong_archive_existing_output_and_http_errors(server: Server, tmp_path: Path) -> None:
    bad = _zip("ml-100k", {"u.data": b"1\t1\t5\t1\n", "README": b"x"})  # no u.item / u.user / u.genre
    server.publish("ml-100k", bad)
    with pytest.raises(DownloadError, match="not a ml-100k archive, ml-100k/u.item, ml-100k/u.user, ml-100k/u.genre missing"):
        download("ml-100k", tmp_path / "a", url=server.url, progress=False)
    assert leftovers(tmp_path) == []

    server.publish("ml-1m", archive_1m())
    out = tmp_path / "ml-1m"
    download("ml-1m", out, url=server.url, progress=False)
    n = len(server.requests)
    assert download("ml-1m", out, url=server.url, progress=False)["skipped"] is True  # complete: nothing fetched
    assert len(server.requests) == n
    (tmp_path / "other").mkdir()
    with pytest.raises(DownloadError, match="already exists; remove it or pass --force"):
        download("ml-1m", tmp_path / "other", url=server.url, progress=False)
    (out / "ratings.csv").write_text("damaged")
    download("ml-1m", out, url=server.url, force=True, progress=False)
    assert load_movielens(out, progress=False).n_ratings == 3

    with pytest.raises(DownloadError, match="HTTP 404"):
        download("ml-25m", tmp_path / "ml-25m", url=server.url, progress=False)
    with pytest.raises(DownloadError, match="unknown data set"):
        download("ml-20m", tmp_path / "x", url=server.url, progress=False)
