"""MovieLens CSV loader with validation.

Reads the CSV layout shared by ml-latest-small (bundled), ml-25m and ml-32m, and by ml-100k /
ml-1m once ``recsys data download`` (``export/download.py``) has converted them:

- ``ratings.csv``: ``userId,movieId,rating,timestamp``
- ``movies.csv``: ``movieId,title,genres`` (title carries "(YYYY)"; genres ``|``-joined)
- ``users.csv`` (optional; 100K and 1M only): ``userId,age,gender,occupation,zip``
- ``tags.csv`` / ``links.csv`` (optional): only checked to parse and counted.

Two kinds of problems are told apart:

- Structural problems (missing file or column, empty file, unparseable value, wrong
  number of fields) raise :class:`DataError` naming the file, the line and the problem.
- Row-level data-quality problems in ``ratings.csv`` (nulls, duplicates, out-of-range
  ratings, future timestamps, ratings of movies missing from ``movies.csv``) drop the
  row and are counted in the :class:`ValidationReport`, unless ``strict=True``.

The fast path hands the whole file to polars' multithreaded CSV reader with explicit
dtypes; only when that fails does the loader go looking for the offending line, so a
clean 32M-row file never pays for error reporting.

Line numbers are 1-based physical line numbers with the header on line 1. The fast path
maps data row ``i`` to line ``i + 2``, which holds for MovieLens files because their
records never span lines (polars keeps blank lines as all-null rows, so they do not
shift the count); the slow error path counts lines exactly, quoted newlines included.
"""

from __future__ import annotations

import re
import sys
import time
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import NoReturn

import numpy as np
import pandas as pd
import polars as pl
from tqdm.auto import tqdm

__all__ = [
    "DROP_REASONS",
    "DataError",
    "MovieLens",
    "ValidationReport",
    "load_movielens",
    "parse_title",
]

#: Reasons a ratings row can be dropped, in the order they are tested: a row that
#: fails several checks is counted once, under the first reason that applies.
DROP_REASONS: tuple[str, ...] = (
    "null",
    "duplicate",
    "rating_out_of_range",
    "future_timestamp",
    "movie_without_metadata",
)

NO_GENRES = "(no genres listed)"

# polars accepts dtype classes (pl.Int64) as well as instances (pl.Int64()).
_Dtype = pl.DataType | type[pl.DataType]
RATING_MIN = 0.5
RATING_MAX = 5.0

# Column name in the file -> (name in the returned frame, polars dtype).
_RATINGS_COLUMNS: dict[str, tuple[str, _Dtype]] = {
    "userId": ("user_id", pl.Int64),
    "movieId": ("movie_id", pl.Int64),
    "rating": ("rating", pl.Float32),
    "timestamp": ("timestamp", pl.Int64),
}
_MOVIES_COLUMNS: dict[str, tuple[str, _Dtype]] = {
    "movieId": ("movie_id", pl.Int64),
    "title": ("title", pl.String),
    "genres": ("genres", pl.String),
}
_USERS_COLUMNS: dict[str, tuple[str, _Dtype]] = {
    "userId": ("user_id", pl.Int64),
    "age": ("age", pl.Int32),
    "gender": ("gender", pl.String),
    "occupation": ("occupation", pl.String),
}
_TAGS_COLUMNS: dict[str, tuple[str, _Dtype]] = {
    "userId": ("user_id", pl.Int64),
    "movieId": ("movie_id", pl.Int64),
    "tag": ("tag", pl.String),
    "timestamp": ("timestamp", pl.Int64),
}
_LINKS_COLUMNS: dict[str, tuple[str, _Dtype]] = {
    "movieId": ("movie_id", pl.Int64),
    "imdbId": ("imdb_id", pl.Int64),
    "tmdbId": ("tmdb_id", pl.Int64),
}

# The year is the last parenthesised group at the very end of the title; a range such
# as "(1995-2000)" or an open one such as "(2016-)" (ASCII hyphen or en dash) counts
# from its first year. The lazy prefix makes "Seven (Se7en) (1995)" keep "(Se7en)".
# Written so Python's `re` and polars' Rust regex read it identically.
_TITLE_YEAR_PATTERN = r"^(.*?)\s*\((\d{4})(?:\s*[-\u2013]\s*(?:\d{4})?)?\)$"
_TITLE_YEAR_RE = re.compile(_TITLE_YEAR_PATTERN, re.DOTALL)

_LINE_COL = "_line"
_SCAN_CHUNK_BYTES = 1 << 24


class DataError(ValueError):
    """A MovieLens input file is unusable or (in strict mode) contains a bad row.

    Attributes:
        path: The offending file (or directory, when it is the thing missing).
        line: 1-based line number in the file, the header being line 1; None when the
            problem is not tied to a line (e.g. a missing file).
        problem: What is wrong, in words.
    """

    def __init__(self, path: str | Path, line: int | None, problem: str) -> None:
        self.path = Path(path)
        self.line = line
        self.problem = problem
        super().__init__(str(self))

    def __str__(self) -> str:
        if self.line is None:
            return f"{self.path}: {self.problem}"
        return f"{self.path}: line {self.line}: {self.problem}"

    def __reduce__(self):  # keep the exception picklable despite the custom __init__
        return (type(self), (self.path, self.line, self.problem))


@dataclass(frozen=True)
class ValidationReport:
    """What the loader read and what it dropped.

    Attributes:
        rows_read: File name -> number of data rows read (header and blank lines excluded).
        dropped: Drop reason -> number of ``ratings.csv`` rows dropped; every reason in
            :data:`DROP_REASONS` is present, 0 when nothing was dropped for it.
        first_line: Drop reason -> line in ``ratings.csv`` of the first dropped row,
            only for reasons that dropped something.
    """

    rows_read: dict[str, int]
    dropped: dict[str, int]
    first_line: dict[str, int] = field(default_factory=dict)

    @property
    def total_dropped(self) -> int:
        """Number of ratings rows dropped for any reason."""
        return sum(self.dropped.values())

    def summary(self) -> str:
        """Render the report as text: rows read per file, then one line per drop reason.

        Returns:
            A multi-line human-readable string.
        """
        lines = [f"{name}: {n:,} rows read" for name, n in self.rows_read.items()]
        for reason in DROP_REASONS:
            n = self.dropped.get(reason, 0)
            where = f" (first on line {self.first_line[reason]})" if reason in self.first_line else ""
            lines.append(f"dropped {reason}: {n:,}{where}")
        return "\n".join(lines)


# eq=False: field-wise equality (and the hash frozen would derive from it) is
# meaningless for DataFrames and arrays, so identity semantics are kept.
@dataclass(frozen=True, eq=False)
class MovieLens:
    """A loaded and validated MovieLens data set.

    Attributes:
        ratings: Columns ``user_id`` int64, ``movie_id`` int64, ``rating`` float32,
            ``timestamp`` int64 (Unix seconds); sorted by (timestamp, user_id, movie_id);
            RangeIndex.
        movies: Columns ``movie_id`` int64, ``title`` str (year removed), ``year`` int32
            (0 when unknown), ``genres`` str (as in the file, ``|``-joined); sorted by
            movie_id; RangeIndex.
        genres: Genre vocabulary, sorted, without "(no genres listed)".
        genre_matrix: float32 multi-hot ``[len(movies), len(genres)]`` aligned with
            ``movies`` rows.
        users: Columns ``user_id`` int64, ``age`` int32, ``gender`` str, ``occupation``
            str, sorted by user_id; None when there is no ``users.csv``.
        report: What was read and dropped.
    """

    ratings: pd.DataFrame
    movies: pd.DataFrame
    genres: list[str]
    genre_matrix: np.ndarray
    users: pd.DataFrame | None
    report: ValidationReport

    @property
    def n_ratings(self) -> int:
        """Number of ratings kept after validation."""
        return len(self.ratings)


def parse_title(title: str) -> tuple[str, int]:
    """Split a MovieLens title into the bare title and its release year.

    The year is the last "(YYYY)" at the end of the title (trailing whitespace ignored);
    ranges such as "(1995-2000)" give their first year.

    Args:
        title: A title such as "Seven (Se7en) (1995)".

    Returns:
        ``(title_without_year, year)``, e.g. ``("Seven (Se7en)", 1995)``; year is 0 and
        the title is only stripped when there is no year.
    """
    stripped = title.strip()
    match = _TITLE_YEAR_RE.match(stripped)
    if match is None:
        return stripped, 0
    return match.group(1).strip(), int(match.group(2))


def load_movielens(
    path: str | Path,
    *,
    now: int | None = None,
    strict: bool = False,
    progress: bool = True,
) -> MovieLens:
    """Load and validate a MovieLens directory in the ml-25m/ml-32m CSV layout.

    Args:
        path: Directory holding ``ratings.csv`` and ``movies.csv`` (and optionally
            ``users.csv``, ``tags.csv``, ``links.csv``).
        now: Unix time after which a rating's timestamp counts as in the future;
            defaults to the current time.
        strict: Raise :class:`DataError` on the first row-level problem instead of
            dropping and counting the offending rows.
        progress: Show stage progress on stderr.

    Returns:
        The loaded :class:`MovieLens` data set.

    Raises:
        DataError: On a structural problem, or on any row-level problem when ``strict``.
    """
    root = Path(path)
    if not root.is_dir():
        raise DataError(root, None, "MovieLens directory not found" if not root.exists() else "not a directory")
    now = int(time.time()) if now is None else int(now)
    ratings_path = root / "ratings.csv"
    movies_path = root / "movies.csv"
    for required in (ratings_path, movies_path):
        if not required.is_file():
            raise DataError(required, None, f"required file {required.name} not found in {root}")
    optional = [p for p in (root / "users.csv", root / "tags.csv", root / "links.csv") if p.is_file()]

    stages = ["read movies.csv", "read ratings.csv", "validate ratings", "build frames"]
    stages += [f"read {p.name}" for p in optional]
    bar = tqdm(total=len(stages), desc=f"load {root.name}", unit="stage", file=sys.stderr, disable=not progress, leave=False)
    stage_iter = iter(stages)
    started = [False]

    def next_stage() -> None:
        # Tick off the previous stage, then name the one starting now.
        if started[0]:
            bar.update(1)
        started[0] = True
        bar.set_postfix_str(next(stage_iter), refresh=True)

    rows_read: dict[str, int] = {}
    try:
        next_stage()
        movies_pl = _read_table(movies_path, _MOVIES_COLUMNS, with_lines=True)
        rows_read[movies_path.name] = movies_pl.height
        movies, genres, genre_matrix = _build_movies(movies_path, movies_pl)
        del movies_pl

        next_stage()
        ratings_pl = _read_table(ratings_path, _RATINGS_COLUMNS, with_lines=True, allow_nulls=True)

        next_stage()
        ratings_pl, n_read, dropped, first_line = _validate_ratings(
            ratings_path, ratings_pl, movies["movie_id"].to_numpy(), now=now, strict=strict
        )
        rows_read[ratings_path.name] = n_read

        next_stage()
        ratings = _ratings_to_pandas(ratings_pl)
        del ratings_pl

        users: pd.DataFrame | None = None
        for extra in optional:
            next_stage()
            if extra.name == "users.csv":
                users_pl = _read_table(extra, _USERS_COLUMNS, with_lines=True)
                users = _build_users(extra, users_pl)
                rows_read[extra.name] = users_pl.height
            else:
                columns = _TAGS_COLUMNS if extra.name == "tags.csv" else _LINKS_COLUMNS
                # Only the parse matters: the frame is counted and thrown away.
                rows_read[extra.name] = _read_table(extra, columns, allow_nulls=True).height
        bar.update(1)
    finally:
        bar.close()

    # Fixed order for a readable summary: ratings first, then the rest as found.
    order = [ratings_path.name, movies_path.name] + [p.name for p in optional]
    rows_read = {name: rows_read[name] for name in order if name in rows_read}
    report = ValidationReport(rows_read=rows_read, dropped=dropped, first_line=first_line)
    return MovieLens(ratings=ratings, movies=movies, genres=genres, genre_matrix=genre_matrix, users=users, report=report)


# --------------------------------------------------------------------------- reading


def _read_header(path: Path) -> list[str]:
    """Return the header's column names, raising DataError when the file has none."""
    with path.open("rb") as fh:
        first = fh.readline(1 << 20)
    text = first.decode("utf-8-sig", errors="replace").rstrip("\r\n")
    if not text.strip():
        raise DataError(path, 1, "empty file: no header row")
    return [name.strip().strip('"').strip() for name in text.split(",")]


def _read_table(
    path: Path,
    columns: Mapping[str, tuple[str, _Dtype]],
    *,
    with_lines: bool = False,
    allow_nulls: bool = False,
) -> pl.DataFrame:
    """Read the required columns of a CSV with explicit dtypes, renamed.

    Args:
        path: The CSV file.
        columns: File column -> (new name, dtype); all are required.
        with_lines: Add a ``_line`` u32/u64 column holding each row's line number.
        allow_nulls: If False, an empty value in a required column is a DataError.

    Returns:
        The renamed frame. Blank lines are kept as all-null rows (only when
        ``allow_nulls``; otherwise they are removed) so that row i stays on line i + 2.

    Raises:
        DataError: Missing column, empty file, unparseable value, wrong field count.
    """
    header = _read_header(path)
    missing = [name for name in columns if name not in header]
    if missing:
        raise DataError(path, 1, f"missing required column {', '.join(map(repr, missing))} (found columns: {', '.join(header)})")
    if len(set(header)) != len(header):
        dupes = sorted({name for name in header if header.count(name) > 1})
        raise DataError(path, 1, f"duplicate column name {', '.join(map(repr, dupes))}")
    try:
        df = pl.read_csv(
            path,
            columns=list(columns),
            schema_overrides={name: dtype for name, (_, dtype) in columns.items()},
            # Text columns keep "" as "", only numeric fields can be null.
            empty_string_is_null=False,
            infer_schema=False,
            raise_if_empty=False,
        )
    except pl.exceptions.PolarsError as exc:
        _raise_located_error(path, header, columns, exc)
    if df.height == 0:
        raise DataError(path, 2, "no data rows after the header")
    df = df.rename({name: new for name, (new, _) in columns.items()})
    if with_lines:
        df = df.with_row_index(_LINE_COL, offset=2)

    if not allow_nulls:
        value_cols = [new for new, _ in columns.values()]
        null_rows = df.select(pl.any_horizontal([pl.col(c).is_null() for c in value_cols]).arg_true())
        if null_rows.height:
            # A short record reads as nulls too: that one is structural.
            _check_field_counts(path, len(header))
            blank = _blank_lines(path)
            lines = null_rows.to_series().cast(pl.Int64) + 2
            bad = lines.filter(~lines.is_in(blank.implode()))
            if bad.len():
                first = int(bad[0])
                row = df.row(first - 2, named=True)
                col = next(file_col for file_col, (new, _) in columns.items() if row[new] is None)
                raise DataError(path, _row_to_line(path, first - 2), f"missing value in required column {col!r}")
            df = df.filter(~pl.int_range(2, pl.len() + 2, dtype=pl.Int64).is_in(blank.implode()))
    return df


def _raise_located_error(path: Path, header: list[str], columns: Mapping[str, tuple[str, _Dtype]], exc: Exception) -> NoReturn:
    """Find the line behind a failed fast-path read and raise a DataError for it.

    Only runs after polars' typed read failed, so a clean file never pays for it.
    """
    _check_field_counts(path, len(header))
    # Every record has the right field count, so a value must fail its dtype: read the
    # columns as text and find the first one that does not survive a non-strict cast.
    typed = {name: dtype for name, (_, dtype) in columns.items() if dtype != pl.String}
    fails = {name: pl.col(name).is_not_null() & pl.col(name).cast(dtype, strict=False).is_null() for name, dtype in typed.items()}
    # Streaming keeps memory flat: the whole file as text would be several GB at 32M rows.
    hit = (
        pl.scan_csv(path, infer_schema=False, empty_string_is_null=True, raise_if_empty=False)
        .select(list(typed))
        .with_row_index("_row")
        .filter(pl.any_horizontal(list(fails.values())))
        .head(1)
        .with_columns(**{f"_bad_{name}": expr for name, expr in fails.items()})
        .collect(engine="streaming")
    )
    if hit.height == 0:
        detail = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise DataError(path, None, f"could not parse file: {detail}") from exc
    row = hit.row(0, named=True)
    idx = int(row["_row"])
    name = next(n for n in header if n in typed and row[f"_bad_{n}"])
    value, dtype = row[name], typed[name]
    line = _row_to_line(path, idx)
    kind = "an integer" if dtype.is_integer() else "a number"
    raise DataError(path, line, f"column {name!r}: cannot parse {value!r} as {kind}") from exc


# --------------------------------------------------------------- exact line scanning


@dataclass
class _Records:
    """Per-record facts from one chunk of a raw CSV scan (header included)."""

    start_line: np.ndarray  # int64, physical line on which each record starts
    n_fields: np.ndarray  # int64
    blank: np.ndarray  # bool, record is an empty line


def _scan_records(path: Path, chunk_bytes: int = _SCAN_CHUNK_BYTES) -> Iterator[_Records]:
    """Split a CSV into records with RFC 4180 quoting, vectorised and chunked.

    A byte is inside quotes when an odd number of quote characters precede it (an
    escaped quote "" toggles twice), so quote parity from a running sum tells which
    commas separate fields and which newlines end records, without a per-row loop.

    Yields:
        Record facts for each chunk's completed records, in file order.

    Raises:
        DataError: If the file ends inside a quoted field.
    """
    parity = 0  # inside quotes at the end of the previous chunk
    lines_before = 0  # newlines in previous chunks
    pending_commas = 0  # separators of the record still open at the chunk end
    pending_len = 0  # bytes of that record, excluding a trailing '\r'
    pending_start = 1  # line on which that record started
    pending_last_cr = False
    with path.open("rb") as fh:
        while True:
            raw = fh.read(chunk_bytes)
            if not raw:
                break
            buf = np.frombuffer(raw, dtype=np.uint8)
            quotes = buf == 34
            if quotes.any():
                # uint8 wraps at 256, which keeps the parity, and saves 8x memory.
                inside = ((np.cumsum(quotes, dtype=np.uint8) + parity) & 1).astype(bool)
                new_parity = int(inside[-1])
            else:
                inside = np.full(buf.shape, bool(parity))
                new_parity = parity
            newlines = np.flatnonzero(buf == 10)
            ends = newlines[~inside[newlines]]
            commas = np.flatnonzero((buf == 44) & ~inside)

            starts = np.empty(len(ends), dtype=np.int64)
            if len(ends):
                starts[0] = 0
                starts[1:] = ends[:-1] + 1
            n_commas = np.searchsorted(commas, ends) - np.searchsorted(commas, starts)
            lengths = ends - starts
            # A '\r' before the '\n' belongs to the line ending, not the record.
            has_cr = np.zeros(len(ends), dtype=bool)
            nz = ends > 0
            has_cr[nz] = buf[ends[nz] - 1] == 13
            if len(ends):
                n_commas[0] += pending_commas
                lengths[0] += pending_len
                if ends[0] == 0:
                    has_cr[0] = pending_last_cr
            lengths = lengths - has_cr
            start_line = lines_before + 1 + np.searchsorted(newlines, starts)
            if len(ends):
                start_line[0] = pending_start
                yield _Records(start_line=start_line.astype(np.int64), n_fields=n_commas + 1, blank=lengths == 0)

            tail_from = int(ends[-1]) + 1 if len(ends) else 0
            tail_commas = len(commas) - int(np.searchsorted(commas, tail_from))
            if len(ends):
                pending_commas, pending_len = tail_commas, len(buf) - tail_from
                pending_start = lines_before + 1 + len(newlines[newlines < ends[-1]]) + 1
            else:
                pending_commas += tail_commas
                pending_len += len(buf)
            pending_last_cr = bool(buf[-1] == 13)
            lines_before += len(newlines)
            parity = new_parity
    if parity:
        raise DataError(path, pending_start, "unterminated quoted field at end of file")
    if pending_len > 0:
        trailing_cr = int(pending_last_cr)
        yield _Records(
            start_line=np.array([pending_start], dtype=np.int64),
            n_fields=np.array([pending_commas + 1], dtype=np.int64),
            blank=np.array([pending_len - trailing_cr == 0]),
        )


def _check_field_counts(path: Path, expected: int) -> None:
    """Raise DataError for the first non-blank record whose field count differs."""
    first_chunk = True
    for rec in _scan_records(path):
        n_fields, blank, start_line = rec.n_fields, rec.blank, rec.start_line
        if first_chunk:  # the header itself set `expected`
            n_fields, blank, start_line = n_fields[1:], blank[1:], start_line[1:]
            first_chunk = False
        bad = np.flatnonzero((n_fields != expected) & ~blank)
        if len(bad):
            i = int(bad[0])
            raise DataError(path, int(start_line[i]), f"wrong number of fields: expected {expected}, found {int(n_fields[i])}")


def _blank_lines(path: Path) -> pl.Series:
    """Line numbers of blank data records (polars reads them as all-null rows)."""
    parts = []
    for i, rec in enumerate(_scan_records(path)):
        lines = rec.start_line[rec.blank]
        parts.append(lines[lines > 1] if i == 0 else lines)
    return pl.Series(np.concatenate(parts) if parts else np.empty(0, dtype=np.int64))


def _row_to_line(path: Path, row: int) -> int:
    """Physical line of data row ``row`` (0-based), counting quoted newlines."""
    seen = -1  # the header is record -1
    for rec in _scan_records(path):
        if seen + len(rec.start_line) > row:
            return int(rec.start_line[row - seen])
        seen += len(rec.start_line)
    return row + 2


# ------------------------------------------------------------------------ validation


def _validate_ratings(
    path: Path,
    df: pl.DataFrame,
    movie_ids: np.ndarray,
    *,
    now: int,
    strict: bool,
) -> tuple[pl.DataFrame, int, dict[str, int], dict[str, int]]:
    """Drop (or, when strict, raise on) bad ratings rows and sort the rest.

    Returns:
        ``(clean frame sorted by timestamp/user/movie, rows read, dropped, first_line)``.
    """
    value_cols = [new for new, _ in _RATINGS_COLUMNS.values()]
    n_rows = df.height
    is_null = pl.any_horizontal([pl.col(c).is_null() for c in value_cols]) | pl.col("rating").is_nan()
    null_lines = df.filter(is_null)[_LINE_COL]
    if null_lines.len():
        # A short record also reads as nulls: tell "value missing" apart from "field
        # missing" (structural) and from blank lines, which are not rows at all.
        _check_field_counts(path, len(_read_header(path)))
        blank = _blank_lines(path)
        if blank.len():
            null_lines = null_lines.filter(~null_lines.is_in(blank.cast(null_lines.dtype).implode()))
            n_rows -= blank.len()
        df = df.filter(~is_null)

    # Sorting by the output order puts equal (user, movie, timestamp) keys next to each
    # other; the line tiebreak keeps the first occurrence in the file first.
    df = df.sort(["timestamp", "user_id", "movie_id", _LINE_COL])
    same_as_prev = (
        (pl.col("timestamp") == pl.col("timestamp").shift(1))
        & (pl.col("user_id") == pl.col("user_id").shift(1))
        & (pl.col("movie_id") == pl.col("movie_id").shift(1))
    ).fill_null(False)
    known = pl.Series("known", np.unique(movie_ids)).implode()
    checks = {
        "duplicate": same_as_prev,
        "rating_out_of_range": ~pl.col("rating").is_between(RATING_MIN, RATING_MAX),
        "future_timestamp": pl.col("timestamp") > now,
        "movie_without_metadata": ~pl.col("movie_id").is_in(known),
    }
    reasons = list(checks)
    # Each row is charged to the first failing check only; a small integer code (0 =
    # keep) costs 1 byte a row where a string column would cost 16.
    code = pl.lit(0, dtype=pl.UInt8)
    for i in reversed(range(len(reasons))):
        code = pl.when(checks[reasons[i]]).then(pl.lit(i + 1, dtype=pl.UInt8)).otherwise(code)
    df = df.with_columns(code.alias("_reason"))
    stats = (
        df.lazy()
        .filter(pl.col("_reason") > 0)
        .group_by("_reason")
        .agg(pl.len().alias("n"), pl.col(_LINE_COL).min().alias("first"))
        .collect()
    )
    dropped = dict.fromkeys(DROP_REASONS, 0)
    first_line: dict[str, int] = {}
    if null_lines.len():
        dropped["null"] = null_lines.len()
        first_line["null"] = int(null_lines.min())
    for code_value, n, first in stats.sort("_reason").iter_rows():
        reason = reasons[code_value - 1]
        dropped[reason] = int(n)
        first_line[reason] = int(first)

    if strict and first_line:
        reason = min(first_line, key=first_line.__getitem__)
        # Raising is the slow path anyway, so count lines exactly here.
        line = _row_to_line(path, first_line[reason] - 2)
        raise DataError(path, line, _describe_drop(reason, df, first_line[reason], now))

    if stats.height:
        df = df.filter(pl.col("_reason") == 0)
    return df.drop("_reason", _LINE_COL), n_rows, dropped, first_line


def _describe_drop(reason: str, df: pl.DataFrame, line: int, now: int) -> str:
    """Words for a strict-mode error on ``line``."""
    if reason == "null":
        return "missing value in a required column (userId, movieId, rating, timestamp)"
    row = df.filter(pl.col(_LINE_COL) == line).row(0, named=True)
    if reason == "duplicate":
        return f"duplicate rating of movie {row['movie_id']} by user {row['user_id']} at timestamp {row['timestamp']}"
    if reason == "rating_out_of_range":
        return f"rating {row['rating']:g} outside [{RATING_MIN}, {RATING_MAX}]"
    if reason == "future_timestamp":
        return f"timestamp {row['timestamp']} is in the future (now={now})"
    return f"movie {row['movie_id']} is not in movies.csv"


# -------------------------------------------------------------------- building frames


def _ratings_to_pandas(df: pl.DataFrame) -> pd.DataFrame:
    """Convert the clean ratings to pandas without going through pyarrow."""
    data = {}
    for name, dtype in (("user_id", np.int64), ("movie_id", np.int64), ("rating", np.float32), ("timestamp", np.int64)):
        data[name] = np.ascontiguousarray(df[name].to_numpy(), dtype=dtype)
    return pd.DataFrame(data, copy=False)


def _build_movies(path: Path, df: pl.DataFrame) -> tuple[pd.DataFrame, list[str], np.ndarray]:
    """Parse years and genres; raise DataError on duplicate movie ids."""
    first = df.select(pl.col("movie_id").is_first_distinct()).to_series()
    if not first.all():
        # The offending line is the second occurrence; the first one is fine.
        idx = int((~first).arg_true()[0])
        raise DataError(path, _row_to_line(path, int(df[_LINE_COL][idx]) - 2), f"duplicate movieId {df['movie_id'][idx]}")
    df = df.drop(_LINE_COL).sort("movie_id")
    title = df["title"].str.strip_chars()
    parts = title.str.extract_groups(_TITLE_YEAR_PATTERN)
    has_year = parts.struct.field("2").is_not_null()
    clean_title = pl.select(pl.when(has_year).then(parts.struct.field("1").str.strip_chars()).otherwise(title)).to_series()
    year = parts.struct.field("2").cast(pl.Int32).fill_null(0)

    genres_col = df["genres"]
    tokens = (
        pl.DataFrame({"row": np.arange(df.height, dtype=np.int64), "genre": genres_col.str.split("|")})
        .explode("genre")
        .with_columns(pl.col("genre").str.strip_chars())
        .filter(pl.col("genre").is_not_null() & (pl.col("genre") != "") & (pl.col("genre") != NO_GENRES))
    )
    vocab = sorted(tokens["genre"].unique().to_list())
    index = {g: i for i, g in enumerate(vocab)}
    matrix = np.zeros((df.height, len(vocab)), dtype=np.float32)
    if tokens.height:
        cols = tokens["genre"].replace_strict(index, return_dtype=pl.Int64).to_numpy()
        matrix[tokens["row"].to_numpy(), cols] = 1.0

    movies = pd.DataFrame(
        {
            "movie_id": df["movie_id"].to_numpy().astype(np.int64),
            "title": pd.array(clean_title.to_list(), dtype="str"),
            "year": year.to_numpy().astype(np.int32),
            "genres": pd.array(genres_col.to_list(), dtype="str"),
        }
    )
    return movies, vocab, matrix


def _build_users(path: Path, df: pl.DataFrame) -> pd.DataFrame:
    """Check user ids are unique and convert to pandas sorted by user_id."""
    first = df.select(pl.col("user_id").is_first_distinct()).to_series()
    if not first.all():
        idx = int((~first).arg_true()[0])
        raise DataError(path, _row_to_line(path, int(df[_LINE_COL][idx]) - 2), f"duplicate userId {df['user_id'][idx]}")
    df = df.sort("user_id")
    return pd.DataFrame(
        {
            "user_id": df["user_id"].to_numpy().astype(np.int64),
            "age": df["age"].to_numpy().astype(np.int32),
            "gender": pd.array(df["gender"].to_list(), dtype="str"),
            "occupation": pd.array(df["occupation"].to_list(), dtype="str"),
        }
    )
