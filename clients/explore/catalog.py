"""The movie table the explorer searches titles in: ``items.parquet`` of an artifacts folder, read-only.

The public API has no catalog or title-search RPC (``recsys.v1.Recommender`` addresses movies
by id only), so typing a history by title needs the item table itself. The explorer reads the
file ``recsys train`` publishes, once at start, with pyarrow alone (no pandas, no torch, no
orchestrator code). The trade-off: the explorer must run where that folder is readable, and
after a hot reload to a model trained on another catalog the titles it suggests can lag the
served ones until it is restarted (answers from the API always carry the served titles).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import pyarrow.parquet as pq

ITEM_TABLE = "items.parquet"
"""The item table's file name inside an artifacts folder."""

_COLUMNS = ("movie_id", "title", "genres", "year", "popularity")


@dataclass(frozen=True)
class Movie:
    """One row of the item table, as the page shows it.

    Attributes:
        movie_id: MovieLens movie id.
        title: Title without the year.
        genres: Genre names.
        year: Release year; 0 when unknown.
        popularity: Ratings up to the training cut-off (orders search results).
    """

    movie_id: int
    title: str
    genres: tuple[str, ...]
    year: int
    popularity: int

    def to_json(self) -> dict:
        """The JSON object the page reads (the fields of ``RecommendedItem`` it shares)."""
        return {"movie_id": self.movie_id, "title": self.title, "genres": list(self.genres), "year": self.year}


class MovieTable:
    """Titles, genres and years by movie id, and a title search.

    Args:
        movies: The rows, in any order.
        source: Where they were read from (shown on the page).
    """

    def __init__(self, movies: list[Movie], source: str):
        self.source = source
        self._by_id = {m.movie_id: m for m in movies}
        # most rated first: a search for "star" should offer the films people know
        self._ranked = sorted(movies, key=lambda m: (-m.popularity, m.movie_id))
        self._folded = [m.title.casefold() for m in self._ranked]
        self.genres: list[str] = sorted({g for m in movies for g in m.genres})

    def __len__(self) -> int:
        return len(self._by_id)

    @classmethod
    def load(cls, artifacts_dir: str | Path) -> "MovieTable":
        """Reads ``ARTIFACTS/items.parquet``.

        Raises:
            FileNotFoundError: The folder has no item table.
            ValueError: The table lacks a column the explorer needs.
        """
        path = Path(artifacts_dir) / ITEM_TABLE
        if not path.is_file():
            raise FileNotFoundError(f"{path} not found (run `recsys train` first, or start the explorer without --artifacts)")
        schema = pq.read_schema(path)
        missing = [c for c in _COLUMNS if c not in schema.names]
        if missing:
            raise ValueError(f"{path} lacks column(s) {missing}")
        rows = pq.read_table(path, columns=list(_COLUMNS)).to_pylist()
        movies = [
            Movie(
                movie_id=int(r["movie_id"]),
                title=str(r["title"]),
                genres=tuple(g for g in str(r["genres"] or "").split("|") if g),
                year=int(r["year"] or 0),
                popularity=int(r["popularity"] or 0),
            )
            for r in rows
        ]
        return cls(movies, str(path))

    def get(self, movie_id: int) -> Movie | None:
        """The movie, or None when the table does not have it."""
        return self._by_id.get(movie_id)

    def search(self, query: str, limit: int = 12) -> list[Movie]:
        """Movies whose title contains ``query`` (case-insensitive), most rated first.

        Titles that start with the query come before those that merely contain it; a query of
        digits also finds the movie with that id.
        """
        q = query.strip().casefold()
        if not q or limit <= 0:
            return []
        starts = [m for m, t in zip(self._ranked, self._folded) if t.startswith(q)]
        contains = [m for m, t in zip(self._ranked, self._folded) if q in t and not t.startswith(q)]
        by_id = [self._by_id[int(q)]] if q.isdigit() and int(q) in self._by_id else []
        out: list[Movie] = []
        for m in by_id + starts + contains:
            if m not in out:
                out.append(m)
            if len(out) >= limit:
                break
        return out
