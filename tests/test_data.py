"""Tests of the MovieLens CSV loader (export/data.py)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from export.data import DROP_REASONS, DataError, MovieLens, load_movielens, parse_title

ML_LATEST_SMALL = Path(__file__).parents[1] / "data" / "ml-latest-small"

RATINGS_HEADER = "userId,movieId,rating,timestamp\n"
MOVIES = (
    "movieId,title,genres\n"
    "1,Toy Story (1995),Animation|Children|Comedy\n"
    '2,"City of Lost Children, The (Cité des enfants perdus, La) (1995)",Adventure|Drama\n'
    "3,Babylon 5,(no genres listed)\n"
)
NOW = 1_700_000_000


def write_dataset(root: Path, ratings: str | None, movies: str | None = MOVIES) -> Path:
    root.mkdir(parents=True, exist_ok=True)
    if ratings is not None:
        (root / "ratings.csv").write_text(ratings, encoding="utf-8")
    if movies is not None:
        (root / "movies.csv").write_text(movies, encoding="utf-8")
    return root


# -------------------------------------------------------- the bundled ml-latest-small


@pytest.fixture(scope="module")
def small() -> MovieLens:
    return load_movielens(ML_LATEST_SMALL, progress=False)


def test_ml_latest_small_counts(small: MovieLens) -> None:
    # the figures of its README.txt: 100,836 ratings and 3,683 tags by 610 users, 9,742 movies
    assert small.n_ratings == 100_836
    assert small.ratings["user_id"].nunique() == 610
    assert len(small.movies) == 9_742
    assert small.users is None  # no demographics in the newer releases
    assert small.report.rows_read == {"ratings.csv": 100_836, "movies.csv": 9_742, "tags.csv": 3_683, "links.csv": 9_742}
    assert small.report.dropped == dict.fromkeys(DROP_REASONS, 0)
    assert small.report.first_line == {}
    assert (ML_LATEST_SMALL / "README.txt").is_file()  # its licence travels with it


def test_ml_latest_small_frames(small: MovieLens) -> None:
    ratings = small.ratings
    assert list(ratings.columns) == ["user_id", "movie_id", "rating", "timestamp"]
    assert [str(t) for t in ratings.dtypes] == ["int64", "int64", "float32", "int64"]
    keys = ratings[["timestamp", "user_id", "movie_id"]].to_numpy()
    assert (np.lexsort(keys.T[::-1]) == np.arange(len(keys))).all()  # already sorted
    assert ratings.index.equals(pd.RangeIndex(len(ratings)))
    # half stars, 0.5 to 5
    assert sorted(ratings["rating"].unique().tolist()) == [x / 2 for x in range(1, 11)]

    movies = small.movies
    assert list(movies.columns) == ["movie_id", "title", "year", "genres"]
    assert movies["movie_id"].is_monotonic_increasing
    assert str(movies["year"].dtype) == "int32"
    toy = movies.iloc[0]
    assert toy["movie_id"] == 1 and toy["title"] == "Toy Story" and toy["year"] == 1995
    assert toy["genres"] == "Adventure|Animation|Children|Comedy|Fantasy"

    assert "Comedy" in small.genres and small.genres == sorted(small.genres)
    assert "(no genres listed)" not in small.genres
    assert small.genre_matrix.shape == (9_742, len(small.genres))
    assert small.genre_matrix.dtype == np.float32
    assert small.genre_matrix[0].sum() == 5
    assert small.genre_matrix[0, small.genres.index("Comedy")] == 1


def test_summary_lists_every_reason(small: MovieLens) -> None:
    text = small.report.summary()
    for reason in DROP_REASONS:
        assert reason in text


def test_users_csv_in_the_100k_layout_is_read(tmp_path: Path) -> None:
    root = write_dataset(tmp_path, RATINGS_HEADER + "1,1,4.0,100\n2,2,3.5,200\n")
    (root / "users.csv").write_text("userId,age,gender,occupation,zip\n2,53,F,other,94043\n1,24,M,technician,85711\n")
    users = load_movielens(root, now=NOW, progress=False).users
    assert users is not None
    assert list(users.columns) == ["user_id", "age", "gender", "occupation"]
    assert users.iloc[0].to_dict() == {"user_id": 1, "age": 24, "gender": "M", "occupation": "technician"}


# ----------------------------------------------------------------- structural errors


def test_missing_column(tmp_path: Path) -> None:
    root = write_dataset(tmp_path, "userId,movieId,score,timestamp\n1,1,4.0,100\n")
    with pytest.raises(DataError) as info:
        load_movielens(root, progress=False)
    err = info.value
    assert err.path == root / "ratings.csv" and err.line == 1
    assert "missing required column 'rating'" in err.problem
    assert "score" in err.problem  # lists what was found
    assert str(err).startswith(f"{root / 'ratings.csv'}: line 1: ")


def test_non_numeric_rating_line(tmp_path: Path) -> None:
    rows = "".join(f"{u},1,4.0,{100 + u}\n" for u in range(1, 6)) + "6,1,abc,200\n7,1,3.0,300\n"
    root = write_dataset(tmp_path, RATINGS_HEADER + rows)
    with pytest.raises(DataError) as info:
        load_movielens(root, progress=False)
    err = info.value
    assert err.path == root / "ratings.csv"
    assert err.line == 7  # header is line 1, "6,1,abc,200" is the 6th data row
    assert "'rating'" in err.problem and "'abc'" in err.problem
    assert str(err) == f"{root / 'ratings.csv'}: line 7: {err.problem}"


def test_non_integer_timestamp_line(tmp_path: Path) -> None:
    root = write_dataset(tmp_path, RATINGS_HEADER + "1,1,4.0,100\n2,1,4.0,x\n")
    with pytest.raises(DataError, match=r"line 3: column 'timestamp'"):
        load_movielens(root, progress=False)


@pytest.mark.parametrize("row, found", [("2,1,4.0,100,9", 5), ("2,1,4.0", 3)])
def test_wrong_field_count(tmp_path: Path, row: str, found: int) -> None:
    root = write_dataset(tmp_path, RATINGS_HEADER + f"1,1,4.0,100\n{row}\n3,1,4.0,100\n")
    with pytest.raises(DataError) as info:
        load_movielens(root, progress=False)
    assert info.value.line == 3
    assert f"wrong number of fields: expected 4, found {found}" == info.value.problem


def test_empty_file(tmp_path: Path) -> None:
    root = write_dataset(tmp_path, "")
    with pytest.raises(DataError) as info:
        load_movielens(root, progress=False)
    assert info.value.path == root / "ratings.csv" and info.value.line == 1
    assert "empty file" in info.value.problem


def test_header_only(tmp_path: Path) -> None:
    root = write_dataset(tmp_path, RATINGS_HEADER)
    with pytest.raises(DataError) as info:
        load_movielens(root, progress=False)
    assert info.value.path == root / "ratings.csv" and info.value.line == 2
    assert "no data rows" in info.value.problem


def test_missing_ratings_file(tmp_path: Path) -> None:
    root = write_dataset(tmp_path, None)
    with pytest.raises(DataError) as info:
        load_movielens(root, progress=False)
    err = info.value
    assert err.path == root / "ratings.csv" and err.line is None
    assert "not found" in err.problem
    assert str(err) == f"{root / 'ratings.csv'}: {err.problem}"


def test_missing_directory(tmp_path: Path) -> None:
    with pytest.raises(DataError, match="not found"):
        load_movielens(tmp_path / "nope", progress=False)


def test_duplicate_movie_id(tmp_path: Path) -> None:
    root = write_dataset(tmp_path, RATINGS_HEADER + "1,1,4.0,100\n", MOVIES + "2,Again (2000),Drama\n")
    with pytest.raises(DataError) as info:
        load_movielens(root, progress=False)
    assert info.value.path == root / "movies.csv" and info.value.line == 5
    assert "duplicate movieId 2" in info.value.problem


def test_quoted_newline_counts_lines(tmp_path: Path) -> None:
    movies = 'movieId,title,genres\n1,"Two\nLines (1990)",Drama\nx,Bad,Drama\n'
    root = write_dataset(tmp_path, RATINGS_HEADER + "1,1,4.0,100\n", movies)
    with pytest.raises(DataError) as info:
        load_movielens(root, progress=False)
    assert info.value.line == 4 and "'movieId'" in info.value.problem


# ------------------------------------------------------------------ dropped rows


# One row of each problem, each on a known line.
DIRTY = RATINGS_HEADER + (
    "1,1,4.0,100\n"  # line 2: fine
    "1,2,,100\n"  # line 3: null rating
    "1,1,4.0,100\n"  # line 4: duplicate of line 2
    "1,3,7,100\n"  # line 5: rating out of range
    f"1,2,3.5,{NOW + 1}\n"  # line 6: future
    "1,99,3.0,100\n"  # line 7: unknown movie
    "2,2,3.0,50\n"  # line 8: fine
)


def test_dirty_rows_dropped_and_counted(tmp_path: Path) -> None:
    ml = load_movielens(write_dataset(tmp_path, DIRTY), now=NOW, progress=False)
    report = ml.report
    assert report.rows_read["ratings.csv"] == 7
    assert report.dropped == {
        "null": 1,
        "duplicate": 1,
        "rating_out_of_range": 1,
        "future_timestamp": 1,
        "movie_without_metadata": 1,
    }
    assert report.first_line == {
        "null": 3,
        "duplicate": 4,
        "rating_out_of_range": 5,
        "future_timestamp": 6,
        "movie_without_metadata": 7,
    }
    assert ml.n_ratings == 2
    # Sorted by timestamp: (2, 2, t=50) before (1, 1, t=100).
    assert ml.ratings[["user_id", "movie_id", "timestamp"]].values.tolist() == [[2, 2, 50], [1, 1, 100]]
    assert "duplicate: 1 (first on line 4)" in report.summary()


def test_duplicate_keeps_first(tmp_path: Path) -> None:
    ratings = RATINGS_HEADER + "1,1,2.0,100\n1,1,5.0,100\n1,1,3.0,200\n"
    ml = load_movielens(write_dataset(tmp_path, ratings), now=NOW, progress=False)
    assert ml.ratings["rating"].tolist() == [2.0, 3.0]  # same movie, new timestamp is kept
    assert ml.report.dropped["duplicate"] == 1


def test_blank_lines_are_not_rows(tmp_path: Path) -> None:
    ratings = RATINGS_HEADER + "1,1,4.0,100\n\n2,1,3.0,100\n\n"
    ml = load_movielens(write_dataset(tmp_path, ratings), now=NOW, progress=False)
    assert ml.n_ratings == 2 and ml.report.rows_read["ratings.csv"] == 2
    assert ml.report.dropped["null"] == 0


@pytest.mark.parametrize("drop_line", [3, 4, 5, 6, 7])
def test_strict_raises_first_problem(tmp_path: Path, drop_line: int) -> None:
    # Keep only the first problem row in front of `drop_line`, so each reason leads once.
    lines = DIRTY.splitlines(keepends=True)
    kept = lines[:2] + lines[drop_line - 1 :]
    root = write_dataset(tmp_path, "".join(kept))
    with pytest.raises(DataError) as info:
        load_movielens(root, now=NOW, strict=True, progress=False)
    assert info.value.path == root / "ratings.csv"
    assert info.value.line == 3  # the problem row now sits right after the first row
    reason_words = {3: "missing value", 4: "duplicate", 5: "outside", 6: "future", 7: "not in movies.csv"}
    assert reason_words[drop_line] in info.value.problem


def test_strict_names_first_line_of_many(tmp_path: Path) -> None:
    with pytest.raises(DataError, match=r"line 3: missing value"):
        load_movielens(write_dataset(tmp_path, DIRTY), now=NOW, strict=True, progress=False)


def test_default_now_is_current_time(tmp_path: Path) -> None:
    ratings = RATINGS_HEADER + "1,1,4.0,100\n1,2,4.0,99999999999\n"
    ml = load_movielens(write_dataset(tmp_path, ratings), progress=False)
    assert ml.report.dropped["future_timestamp"] == 1


def test_optional_files_counted(tmp_path: Path) -> None:
    root = write_dataset(tmp_path, RATINGS_HEADER + "1,1,4.0,100\n")
    (root / "tags.csv").write_text('userId,movieId,tag,timestamp\n1,1,"funny, sad",100\n')
    (root / "links.csv").write_text("movieId,imdbId,tmdbId\n1,0114709,862\n2,0113497,\n")
    ml = load_movielens(root, now=NOW, progress=False)
    assert ml.report.rows_read["tags.csv"] == 1 and ml.report.rows_read["links.csv"] == 2
    assert ml.users is None
    (root / "links.csv").write_text("movieId,imdbId,tmdbId\n1,0114709,862\n2,tt01,5\n")
    with pytest.raises(DataError, match=r"links.csv: line 3: column 'imdbId'"):
        load_movielens(root, now=NOW, progress=False)


# ------------------------------------------------------------------------- titles


@pytest.mark.parametrize(
    "title, expected",
    [
        ("Toy Story (1995)", ("Toy Story", 1995)),
        ("Seven (Se7en) (1995)", ("Seven (Se7en)", 1995)),
        (
            "City of Lost Children, The (Cité des enfants perdus, La) (1995)",
            ("City of Lost Children, The (Cité des enfants perdus, La)", 1995),
        ),
        ("Toy Story (1995)   ", ("Toy Story", 1995)),
        ("Fawlty Towers (1975-1979)", ("Fawlty Towers", 1975)),
        ("Stranger Things (2016\u2013)", ("Stranger Things", 2016)),
        ("Babylon 5", ("Babylon 5", 0)),
        ("1984 (1984)", ("1984", 1984)),
        ("Movie (1995) Director's Cut", ("Movie (1995) Director's Cut", 0)),
    ],
)
def test_parse_title(title: str, expected: tuple[str, int]) -> None:
    assert parse_title(title) == expected


def test_loader_years_match_parse_title(tmp_path: Path) -> None:
    titles = [
        "Seven (Se7en) (1995)",
        "Fawlty Towers (1975-1979)",
        "Toy Story (1995)  ",
        "City of Lost Children, The (Cité des enfants perdus, La) (1995)",
        "Babylon 5",
    ]
    movies = "movieId,title,genres\n" + "".join(f'{i},"{t}",(no genres listed)\n' for i, t in enumerate(titles, start=1))
    ml = load_movielens(write_dataset(tmp_path, RATINGS_HEADER + "1,1,4.0,100\n", movies), now=NOW, progress=False)
    assert list(zip(ml.movies["title"], ml.movies["year"])) == [parse_title(t) for t in titles]
    assert ml.genres == [] and ml.genre_matrix.shape == (5, 0)


def test_genre_matrix_small(tmp_path: Path) -> None:
    ml = load_movielens(write_dataset(tmp_path, RATINGS_HEADER + "1,1,4.0,100\n"), now=NOW, progress=False)
    assert ml.genres == ["Adventure", "Animation", "Children", "Comedy", "Drama"]
    assert ml.genre_matrix.tolist() == [[0, 1, 1, 1, 0], [1, 0, 0, 0, 1], [0, 0, 0, 0, 0]]
    assert ml.movies["year"].tolist() == [1995, 1995, 0]
