"""``recsys data download``: fetch a MovieLens release from GroupLens into the loader's layout.

    recsys data download ml-1m                        # -> data/ml-1m/
    recsys data download ml-25m --out /data/ml-25m
    recsys data download ml-100k --archive ~/Downloads/ml-100k.zip   # no network needed

Only ``ml-latest-small`` ships with the project: the MovieLens 100K and 1M licences forbid
redistribution, and ml-25m / ml-32m are too big to carry. Users fetch them the way RecBole,
LensKit or Surprise users do, from GroupLens's published archives
(``https://files.grouplens.org/datasets/movielens/<name>.zip``).

What one run does:

1. **Checksum.** GroupLens publishes ``<name>.zip.md5`` beside several archives; when the
   server has one the archive must match it. Otherwise the archive is checked by its size
   (the byte count the server announced) and its structure (every zip member's CRC, and the
   files the release must hold).
2. **Download.** Into ``.<name>.zip.part`` beside the output folder, with a progress bar. An
   interrupted download leaves only that file; the next run asks for the rest with an HTTP
   ``Range`` request (``If-Range`` with the validator the server gave, so a changed file is sent
   whole) and starts again from zero when the server does not resume. A failed checksum
   deletes the part file, so the next run starts clean.
3. **Conversion.** Into a temporary folder beside the output, renamed into place only when
   complete, so no half-written data set is ever left at ``--out``:

   * 100K: ``u.data`` (tab-separated), ``u.item`` and ``u.user`` (``|``-separated, latin-1)
     become ``ratings.csv``, ``movies.csv`` (genres from the 19 flags, named by ``u.genre``)
     and ``users.csv``;
   * 1M: ``ratings.dat``, ``movies.dat`` and ``users.dat`` (``::``-separated, latin-1)
     become the same three files (``users.dat``'s occupation codes become the names its
     README gives; its age codes are already the lower edges of its age groups);
   * latest-small, 25M, 32M: already in the CSV layout; ``ratings.csv``, ``movies.csv``,
     ``tags.csv`` and ``links.csv`` are copied (the tag-genome files, which nothing here
     reads, are left out).

   The release's own README (its licence and citation) is copied beside the data, and
   ``download.json`` records where the data came from and how it was checked.

Without network the command fails with exit code 1 and says which URL to fetch by other means
and how to hand the file over (``--archive``). ``--base-url`` or ``RECSYS_DATA_BASE_URL``
points at a mirror (the tests serve archives they build themselves from loopback).
"""

from __future__ import annotations

import contextlib
import csv
import hashlib
import io
import json
import os
import re
import shutil
import sys
import tempfile
import time
import urllib.error
import urllib.request
import zipfile
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any

__all__ = ["BASE_URL_ENV", "DATASETS", "DEFAULT_BASE_URL", "Dataset", "DownloadError", "download"]

DEFAULT_BASE_URL = "https://files.grouplens.org/datasets/movielens"
BASE_URL_ENV = "RECSYS_DATA_BASE_URL"
"""Environment variable that replaces :data:`DEFAULT_BASE_URL` (a mirror; the tests' server)."""

_CHUNK = 1 << 16
_TIMEOUT_S = 30.0
_MD5_RE = re.compile(r"\b([0-9a-fA-F]{32})\b")
RECORD = "download.json"
"""Written last into a converted folder: source, checksum, files. Its presence marks a complete download."""


class DownloadError(RuntimeError):
    """A download could not be completed; the message says what to do next."""


@dataclass(frozen=True)
class Dataset:
    """One MovieLens release as GroupLens publishes it.

    Attributes:
        name: The archive's stem, also the folder inside it (``ml-1m``).
        layout: ``100k`` (``u.*`` files), ``1m`` (``::``-separated ``.dat``) or ``csv``.
        members: Files the archive must hold, relative to its folder.
        readme: The release's README (licence, citation), copied beside the data.
        redistributable: Whether its licence allows passing the data on.
    """

    name: str
    layout: str
    members: tuple[str, ...]
    readme: str
    redistributable: bool

    @property
    def archive(self) -> str:
        """File name of the published archive."""
        return f"{self.name}.zip"


_CSV_MEMBERS = ("ratings.csv", "movies.csv")
_CSV_OPTIONAL = ("tags.csv", "links.csv")

DATASETS: dict[str, Dataset] = {
    "ml-100k": Dataset("ml-100k", "100k", ("u.data", "u.item", "u.user", "u.genre"), "README", False),
    "ml-1m": Dataset("ml-1m", "1m", ("ratings.dat", "movies.dat", "users.dat"), "README", False),
    "ml-latest-small": Dataset("ml-latest-small", "csv", _CSV_MEMBERS, "README.txt", True),
    "ml-25m": Dataset("ml-25m", "csv", _CSV_MEMBERS, "README.txt", True),
    "ml-32m": Dataset("ml-32m", "csv", _CSV_MEMBERS, "README.txt", True),
}

# users.dat of ml-1m stores occupations as codes; its README names them.
ML1M_OCCUPATIONS = (
    "other",
    "academic/educator",
    "artist",
    "clerical/admin",
    "college/grad student",
    "customer service",
    "doctor/health care",
    "executive/managerial",
    "farmer",
    "homemaker",
    "K-12 student",
    "lawyer",
    "programmer",
    "retired",
    "sales/marketing",
    "scientist",
    "self-employed",
    "technician/engineer",
    "tradesman/craftsman",
    "unemployed",
    "writer",
)
NO_GENRES = "(no genres listed)"


def default_out(name: str) -> Path:
    """Where ``recsys data download NAME`` writes without ``--out``: ``data/NAME``."""
    return Path("data") / name


def base_url(override: str | None = None) -> str:
    """The mirror to fetch from: ``override``, else ``$RECSYS_DATA_BASE_URL``, else GroupLens."""
    return (override or os.environ.get(BASE_URL_ENV) or DEFAULT_BASE_URL).rstrip("/")


def download(
    name: str,
    out: str | Path | None = None,
    *,
    url: str | None = None,
    archive: str | Path | None = None,
    force: bool = False,
    keep_archive: bool = False,
    progress: bool = True,
) -> dict[str, Any]:
    """Download (or take), verify and convert one MovieLens release into ``out``.

    Args:
        name: A key of :data:`DATASETS`.
        out: The data set's folder (default ``data/<name>``); must not exist yet unless
            ``force`` (a complete earlier download there is reported, not repeated).
        url: Base URL (default :func:`base_url`).
        archive: A ``<name>.zip`` already on disk (default: ``<name>.zip`` beside ``out``
            when there is one): no download; the published checksum is fetched when the
            network allows, the structure is always checked, the file is left in place.
        force: Replace an existing ``out``.
        keep_archive: Keep the verified archive beside ``out`` (``.<name>.zip``).
        progress: Show progress bars on stderr.

    Returns:
        The record written to ``out/download.json`` (plus ``"skipped": True`` when ``out``
        already held a complete download).

    Raises:
        DownloadError: Unknown name, no network, HTTP error, failed verification, or
            ``out`` in the way.
    """
    if name not in DATASETS:
        raise DownloadError(f"unknown data set {name!r}; choose one of {', '.join(DATASETS)}")
    ds = DATASETS[name]
    out = Path(out) if out is not None else default_out(name)
    root = base_url(url)
    archive_url = f"{root}/{ds.archive}"
    if out.exists() and not force:
        record = out / RECORD
        if record.is_file():
            done = json.loads(record.read_text())
            if done.get("dataset") == name:
                return {**done, "skipped": True}
        raise DownloadError(f"{out} already exists; remove it or pass --force to replace it")
    out.parent.mkdir(parents=True, exist_ok=True)
    drop = out.parent / ds.archive  # where a user without network puts the archive
    if archive is None and drop.is_file():
        archive = drop

    if archive is not None:
        zip_path = Path(archive)
        if not zip_path.is_file():
            raise DownloadError(f"archive {zip_path} not found")
        try:
            md5 = fetch_md5(archive_url)
        except DownloadError:
            md5 = None  # offline is the point of --archive: the structure check still runs
        size = zip_path.stat().st_size
        source = str(zip_path)
    else:
        md5 = fetch_md5(archive_url, drop)
        zip_path = out.parent / f".{ds.archive}.part"
        size = fetch(archive_url, zip_path, drop, progress=progress)
        source = archive_url

    try:
        checks = verify(zip_path, ds, md5)
    except DownloadError:
        if archive is None:
            zip_path.unlink(missing_ok=True)  # a corrupt part must not be resumed
        raise
    convert(
        zip_path,
        ds,
        out,
        force=force,
        progress=progress,
        extra={
            "dataset": name,
            "source": source,
            "bytes": size,
            "checks": checks,
            "downloaded_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
            "redistributable": ds.redistributable,
        },
    )
    if archive is None:
        if keep_archive:
            zip_path.replace(out.parent / f".{ds.archive}")
        else:
            zip_path.unlink(missing_ok=True)
    return json.loads((out / RECORD).read_text())


# ---------------------------------------------------------------------------- network


def _offline_hint(url: str, drop: Path | None, reason: object) -> DownloadError:
    """The no-network message: what to fetch, where to put it, what happens then."""
    archive_url = url.removesuffix(".md5")
    where = f"put it at {drop}" if drop is not None else "pass it with --archive"
    return DownloadError(
        f"cannot reach {url} ({reason}). Without network: download {archive_url} on a machine "
        f"that has it and {where}; the same command then verifies and converts it offline "
        f"(or point --base-url / {BASE_URL_ENV} at a mirror)"
    )


def _open(url: str, headers: dict[str, str] | None = None, drop: Path | None = None):
    """``urlopen`` with a timeout; network failures become the no-network DownloadError.

    Args:
        url: What to GET.
        headers: Extra request headers.
        drop: Where the user can put the archive instead (named in the no-network error).
    """
    request = urllib.request.Request(url, headers={"User-Agent": "triton-recsys", **(headers or {})})
    try:
        return urllib.request.urlopen(request, timeout=_TIMEOUT_S)  # noqa: S310 - http(s) URLs only
    except urllib.error.HTTPError:
        raise  # the server answered: the caller decides what a status means
    except (urllib.error.URLError, TimeoutError, ConnectionError) as exc:
        raise _offline_hint(url, drop, getattr(exc, "reason", exc)) from exc


def fetch_md5(url: str, drop: Path | None = None) -> str | None:
    """The md5 GroupLens publishes as ``<archive>.md5``, or None where it publishes none.

    Accepts both ``MD5 (ml-1m.zip) = <hex>`` (BSD) and ``<hex>  ml-1m.zip`` (GNU) forms.
    """
    try:
        with _open(f"{url}.md5", drop=drop) as resp:
            text = resp.read(4096).decode("ascii", errors="replace")
    except urllib.error.HTTPError as exc:
        if exc.code in (403, 404, 410):
            return None
        raise DownloadError(f"{url}.md5: the server answered HTTP {exc.code} {exc.reason}") from exc
    match = _MD5_RE.search(text)
    if match is None:
        raise DownloadError(f"{url}.md5 holds no md5 sum: {text[:80]!r}")
    return match.group(1).lower()


def fetch(url: str, part: Path, drop: Path | None = None, *, progress: bool = True) -> int:
    """Download ``url`` into ``part``, resuming what an earlier run left there.

    ``part.json`` beside it keeps the server's validator (ETag or Last-Modified) so a resume
    sends ``If-Range``: a file changed on the server then comes whole (200) and replaces
    the stale bytes instead of being glued to them.

    Returns:
        The archive's size in bytes.

    Raises:
        DownloadError: No network, an HTTP error, or the transfer stopped short (the part
            file is kept: run again to resume).
    """
    from tqdm.auto import tqdm  # imported here: the CLI lists the data sets without it

    meta_path = part.with_name(part.name + ".json")
    have = part.stat().st_size if part.is_file() else 0
    meta = json.loads(meta_path.read_text()) if have and meta_path.is_file() else {}
    headers = {}
    if have:
        headers["Range"] = f"bytes={have}-"
        if meta.get("validator"):
            headers["If-Range"] = meta["validator"]
    try:
        resp = _open(url, headers, drop)
    except urllib.error.HTTPError as exc:
        if exc.code == 416 and have:  # nothing left to send from there: restart cleanly
            part.unlink()
            meta_path.unlink(missing_ok=True)
            return fetch(url, part, drop, progress=progress)
        raise DownloadError(f"{url}: the server answered HTTP {exc.code} {exc.reason}") from exc
    with resp:
        length = resp.headers.get("Content-Length")
        if resp.status == 206:
            start, total = _content_range(resp.headers.get("Content-Range", ""))
            if start != have:
                raise DownloadError(f"{url}: asked to resume at byte {have}, the server sent from {start}")
            mode = "ab"
        else:  # 200: the whole file (no resume support, or the file changed)
            have, mode = 0, "wb"
            total = int(length) if length is not None else None
        validator = resp.headers.get("ETag") or resp.headers.get("Last-Modified")
        meta_path.write_text(json.dumps({"url": url, "validator": validator, "total": total}))
        bar = tqdm(
            total=total,
            initial=have,
            unit="B",
            unit_scale=True,
            unit_divisor=1024,
            desc=url.rsplit("/", 1)[-1],
            file=sys.stderr,
            disable=not progress,
            leave=False,
        )
        try:
            with part.open(mode) as fh:
                while block := _read(resp, url):
                    fh.write(block)
                    bar.update(len(block))
        finally:
            bar.close()
    size = part.stat().st_size
    if total is not None and size != total:
        raise DownloadError(f"{url}: the transfer stopped at {size:,} of {total:,} bytes; run the same command again to resume from {part}")
    meta_path.unlink(missing_ok=True)
    return size


def _read(resp: IO[bytes], url: str) -> bytes:
    """One block of the body; a dropped connection keeps what arrived (for the resume)."""
    try:
        return resp.read(_CHUNK)
    except (TimeoutError, ConnectionError, OSError) as exc:
        raise DownloadError(f"{url}: the connection dropped ({exc}); run the same command again to resume") from exc
    except Exception as exc:  # http.client.IncompleteRead and friends
        raise DownloadError(f"{url}: the transfer broke off ({type(exc).__name__}); run the same command again to resume") from exc


def _content_range(value: str) -> tuple[int, int | None]:
    """``bytes START-END/TOTAL`` -> (START, TOTAL or None when ``*``)."""
    match = re.fullmatch(r"\s*bytes\s+(\d+)-(\d+)/(\d+|\*)\s*", value)
    if match is None:
        raise DownloadError(f"unusable Content-Range {value!r} in a 206 answer")
    return int(match.group(1)), None if match.group(3) == "*" else int(match.group(3))


# ---------------------------------------------------------------------------- checks


def file_md5(path: Path) -> str:
    """md5 of a file, read in 1 MiB blocks."""
    digest = hashlib.md5(usedforsecurity=False)
    with path.open("rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def verify(zip_path: Path, ds: Dataset, md5: str | None) -> dict[str, str]:
    """Checks the archive: the published md5 when there is one, always every CRC and the members.

    Returns:
        What was checked, for ``download.json``.

    Raises:
        DownloadError: A check failed.
    """
    checks: dict[str, str] = {}
    actual = file_md5(zip_path)
    if md5 is not None:
        if actual != md5:
            raise DownloadError(
                f"{zip_path}: md5 {actual} differs from the published {md5}; "
                "the file was deleted, run the command again to download it afresh"
            )
        checks["md5"] = f"{actual} (matches the published {ds.archive}.md5)"
    else:
        checks["md5"] = f"{actual} (no {ds.archive}.md5 published: checked by size and structure)"
    try:
        with zipfile.ZipFile(zip_path) as zf:
            bad = zf.testzip()
            names = set(zf.namelist())
    except (zipfile.BadZipFile, OSError) as exc:
        raise DownloadError(f"{zip_path}: not a readable zip archive ({exc})") from exc
    if bad is not None:
        raise DownloadError(f"{zip_path}: member {bad} fails its CRC check")
    missing = [m for m in (*ds.members, ds.readme) if f"{ds.name}/{m}" not in names]
    if missing:
        raise DownloadError(f"{zip_path}: not a {ds.name} archive, {', '.join(f'{ds.name}/{m}' for m in missing)} missing")
    checks["structure"] = f"every CRC ok; {', '.join(ds.members)} and {ds.readme} present"
    return checks


# ---------------------------------------------------------------------------- conversion


@contextlib.contextmanager
def _staging(out: Path) -> Iterator[Path]:
    """A temporary folder beside ``out``, removed unless it was renamed into place."""
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.tmp-", dir=out.parent))
    try:
        yield tmp
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def convert(
    zip_path: Path, ds: Dataset, out: Path, *, force: bool = False, progress: bool = True, extra: dict[str, Any] | None = None
) -> list[str]:
    """Writes the loader's CSV layout of the archive into ``out``, atomically.

    Returns:
        The file names written, ``download.json`` last.
    """
    from tqdm.auto import tqdm

    writers: dict[str, Callable[[zipfile.ZipFile, Path], list[str]]] = {
        "100k": _convert_100k,
        "1m": _convert_1m,
        "csv": _convert_csv,
    }
    with _staging(out) as tmp, zipfile.ZipFile(zip_path) as zf:
        bar = tqdm(total=2, desc=f"convert {ds.name}", unit="step", file=sys.stderr, disable=not progress, leave=False)
        with bar:
            files = writers[ds.layout](_Prefixed(zf, ds.name), tmp)
            bar.update(1)
            _copy_member(zf, f"{ds.name}/{ds.readme}", tmp / ds.readme)
            files.append(ds.readme)
            record = {**(extra or {}), "files": files + [RECORD]}
            (tmp / RECORD).write_text(json.dumps(record, indent=2) + "\n")
            files.append(RECORD)
            bar.update(1)
        old = None
        if out.exists():
            if not force:
                raise DownloadError(f"{out} appeared while converting; nothing was replaced")
            old = out.with_name(f".{out.name}.old-{os.getpid()}")
            out.rename(old)
        tmp.rename(out)  # the one step that makes the data set visible
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)
    return files


class _Prefixed:
    """A zip archive's members below its top folder (``ml-1m/ratings.dat`` -> ``ratings.dat``)."""

    def __init__(self, zf: zipfile.ZipFile, folder: str):
        self.zf, self.folder = zf, folder

    def has(self, member: str) -> bool:
        return f"{self.folder}/{member}" in set(self.zf.namelist())

    def open(self, member: str) -> IO[bytes]:
        return self.zf.open(f"{self.folder}/{member}")

    def text(self, member: str, encoding: str) -> io.TextIOWrapper:
        return io.TextIOWrapper(self.open(member), encoding=encoding, newline="")

    def copy(self, member: str, dest: Path) -> None:
        _copy_member(self.zf, f"{self.folder}/{member}", dest)


def _copy_member(zf: zipfile.ZipFile, member: str, dest: Path) -> None:
    with zf.open(member) as src, dest.open("wb") as dst:
        shutil.copyfileobj(src, dst, _CHUNK * 16)


def _lines(stream: io.TextIOWrapper) -> Iterator[str]:
    """Non-empty lines without their line ending (the old files end in LF, some in CRLF)."""
    for line in stream:
        line = line.rstrip("\r\n")
        if line:
            yield line


def _writer(path: Path, header: list[str]) -> tuple[IO[str], Any]:
    fh = path.open("w", encoding="utf-8", newline="")
    w = csv.writer(fh, lineterminator="\n")
    w.writerow(header)
    return fh, w


def _write_ratings(rows: Iterator[list[str]], path: Path, source: str) -> None:
    """``userId,movieId,rating,timestamp`` with ratings as ``4.0`` (the newer files' form)."""
    fh, w = _writer(path, ["userId", "movieId", "rating", "timestamp"])
    with fh:
        for n, row in enumerate(rows, 1):
            if len(row) != 4:
                raise DownloadError(f"{source}: line {n}: expected 4 fields, found {len(row)}")
            user, movie, rating, ts = row
            w.writerow([user, movie, f"{float(rating):.1f}", ts])


def _convert_100k(zf: _Prefixed, out: Path) -> list[str]:
    """``u.data`` / ``u.item`` / ``u.user`` (+ ``u.genre`` for the flag names) -> CSV."""
    genres: dict[int, str] = {}
    for line in _lines(zf.text("u.genre", "latin-1")):
        label, _, index = line.rpartition("|")
        genres[int(index)] = label
    order = [genres[i] for i in range(len(genres))]

    _write_ratings((line.split("\t") for line in _lines(zf.text("u.data", "latin-1"))), out / "ratings.csv", "u.data")

    fh, w = _writer(out / "movies.csv", ["movieId", "title", "genres"])
    with fh:
        for n, line in enumerate(_lines(zf.text("u.item", "latin-1")), 1):
            fields = line.split("|")
            if len(fields) != 5 + len(order):
                raise DownloadError(f"u.item: line {n}: expected {5 + len(order)} fields, found {len(fields)}")
            flags = fields[5:]
            names = [g for g, f in zip(order, flags) if f.strip() == "1"]
            w.writerow([fields[0], fields[1], "|".join(names) or NO_GENRES])

    fh, w = _writer(out / "users.csv", ["userId", "age", "gender", "occupation", "zip"])
    with fh:
        for n, line in enumerate(_lines(zf.text("u.user", "latin-1")), 1):
            fields = line.split("|")
            if len(fields) != 5:
                raise DownloadError(f"u.user: line {n}: expected 5 fields, found {len(fields)}")
            w.writerow(fields)
    return ["ratings.csv", "movies.csv", "users.csv"]


def _convert_1m(zf: _Prefixed, out: Path) -> list[str]:
    """``ratings.dat`` / ``movies.dat`` / ``users.dat`` (``::``, latin-1) -> CSV."""
    _write_ratings((line.split("::") for line in _lines(zf.text("ratings.dat", "latin-1"))), out / "ratings.csv", "ratings.dat")

    fh, w = _writer(out / "movies.csv", ["movieId", "title", "genres"])
    with fh:
        for n, line in enumerate(_lines(zf.text("movies.dat", "latin-1")), 1):
            fields = line.split("::")
            if len(fields) != 3:
                raise DownloadError(f"movies.dat: line {n}: expected 3 fields, found {len(fields)}")
            w.writerow([fields[0], fields[1], fields[2] or NO_GENRES])

    fh, w = _writer(out / "users.csv", ["userId", "age", "gender", "occupation", "zip"])
    with fh:
        for n, line in enumerate(_lines(zf.text("users.dat", "latin-1")), 1):
            fields = line.split("::")
            if len(fields) != 5:
                raise DownloadError(f"users.dat: line {n}: expected 5 fields, found {len(fields)}")
            user, gender, age, occupation, zip_code = fields
            code = int(occupation)
            if not 0 <= code < len(ML1M_OCCUPATIONS):
                raise DownloadError(f"users.dat: line {n}: unknown occupation code {code}")
            w.writerow([user, age, gender, ML1M_OCCUPATIONS[code], zip_code])
    return ["ratings.csv", "movies.csv", "users.csv"]


def _convert_csv(zf: _Prefixed, out: Path) -> list[str]:
    """The newer releases are already in the layout: copy what the loader reads."""
    files = []
    for member in (*_CSV_MEMBERS, *_CSV_OPTIONAL):
        if zf.has(member):
            zf.copy(member, out / member)
            files.append(member)
    return files
