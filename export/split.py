"""Global time-based split of the interactions into train / validation / test.

One calendar cut for everybody (not a per-user leave-last-out): every interaction before
``t_val`` is training data, ``[t_val, t_test)`` is validation, ``>= t_test`` is test.
Rolling-origin evaluation (:func:`rolling_splits`) repeats that cut at several origins: each
window's test period is the next slice of interactions by time, its validation period the
slice just before, and everything after the window's test period is dropped from that window. A model
evaluated on a period has only seen the past, as in production. Everything derived from
interactions (popularity, histories, mean ratings, the ranker's features) is computed from
the frame that precedes the evaluated period, never from the period itself.

Relevance rule for evaluation: an item is relevant to a user when the user rated it >= 4.0
(of 5) in the evaluated period. Ratings below 4 are still interactions (they enter histories
and the "seen" mask) but they are not counted as hits, because a recommender that surfaces a
movie the user then rates 2/5 has not served the user.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import pandas as pd

RELEVANCE_MIN_RATING = 4.0


@dataclass(frozen=True)
class Split:
    """A global time split.

    Attributes:
        train: Interactions with ``timestamp < t_val``.
        val: Interactions with ``t_val <= timestamp < t_test``.
        test: Interactions with ``t_test <= timestamp < t_end`` (no upper bound when
            ``t_end`` is None).
        t_val: First second of the validation period (Unix seconds).
        t_test: First second of the test period (Unix seconds).
        t_end: First second after the test period, or None when the test period runs to the
            end of the data.
    """

    train: pd.DataFrame
    val: pd.DataFrame
    test: pd.DataFrame
    t_val: int
    t_test: int
    t_end: int | None = None

    @property
    def train_val(self) -> pd.DataFrame:
        """Train and validation together: the past as seen from the test period."""
        return pd.concat([self.train, self.val], ignore_index=True)

    def protocol(self) -> dict:
        """A JSON-able description of the split for reports."""

        def span(frame: pd.DataFrame) -> dict:
            if frame.empty:
                return {"ratings": 0, "users": 0, "items": 0, "from": None, "to": None}
            return {
                "ratings": int(len(frame)),
                "users": int(frame.user_id.nunique()),
                "items": int(frame.movie_id.nunique()),
                "from": _iso(int(frame.timestamp.min())),
                "to": _iso(int(frame.timestamp.max())),
            }

        return {
            "split": "global time split",
            "val_starts": _iso(self.t_val),
            "test_starts": _iso(self.t_test),
            "test_ends": None if self.t_end is None else _iso(self.t_end),
            "train": span(self.train),
            "val": span(self.val),
            "test": span(self.test),
            "relevance": f"rating >= {RELEVANCE_MIN_RATING} in the evaluated period",
        }


def _iso(ts: int) -> str:
    return pd.Timestamp(ts, unit="s", tz="UTC").isoformat()


def time_split(ratings: pd.DataFrame, val_fraction: float = 0.1, test_fraction: float = 0.1) -> Split:
    """Cut ``ratings`` at two global timestamps.

    The cut points are the timestamp quantiles ``1 - val_fraction - test_fraction`` and
    ``1 - test_fraction``, so the periods hold roughly those shares of the interactions.
    Same as the last (and only) window of ``rolling_splits(ratings, 1, ...)``.

    Args:
        ratings: Frame with at least ``user_id, movie_id, rating, timestamp``.
        val_fraction: Share of interactions in the validation period.
        test_fraction: Share of interactions in the test period.

    Returns:
        The :class:`Split`.

    Raises:
        ValueError: When the fractions are out of range or a period would be empty.
    """
    return rolling_splits(ratings, 1, val_fraction, test_fraction)[0]


def rolling_splits(ratings: pd.DataFrame, windows: int, val_fraction: float = 0.1, test_fraction: float = 0.1) -> list[Split]:
    """Rolling-origin splits: ``windows`` consecutive test periods at the end of the data.

    Window ``k`` (0 = oldest, ``windows - 1`` = the latest) has its test period between the
    timestamp quantiles ``1 - (windows - k) * test_fraction`` and
    ``1 - (windows - k - 1) * test_fraction``, its validation period the ``val_fraction``
    of interactions just before, and its training period everything earlier. Interactions
    at or after the end of a window's test period are not in that window at all, so nothing
    from a window's test period (or later) reaches its training, tuning or features. With
    ``windows=1`` this is the single cut of :func:`time_split`.

    Args:
        ratings: Frame with at least ``user_id, movie_id, rating, timestamp``.
        windows: Number of test windows, ``>= 1``.
        val_fraction: Share of all interactions in each validation period.
        test_fraction: Share of all interactions in each test period.

    Returns:
        The splits, oldest test window first.

    Raises:
        ValueError: When the fractions or ``windows`` are out of range, or a period would be
            empty.
    """
    if isinstance(windows, bool) or not isinstance(windows, int) or windows < 1:
        raise ValueError(f"windows must be a positive integer, got {windows!r}")
    if not (0 < val_fraction < 1 and 0 < test_fraction < 1):
        raise ValueError(f"fractions must be in (0, 1), got {val_fraction}, {test_fraction}")
    if windows * test_fraction + val_fraction >= 1:
        raise ValueError(
            f"fractions leave no training data: {windows} test window(s) of {test_fraction} plus a validation "
            f"period of {val_fraction}; need windows * test_fraction + val_fraction < 1"
        )
    ts = ratings.timestamp.to_numpy()
    if len(ts) == 0:
        raise ValueError("cannot split an empty ratings frame")

    def cut(q: float) -> int:
        return int(np.quantile(ts, q, method="higher"))

    splits = []
    for k in range(windows):
        q_test = 1.0 - (windows - k) * test_fraction
        t_val, t_test = cut(q_test - val_fraction), cut(q_test)
        # the latest window runs to the end of the data (the max timestamp included)
        t_end = None if k == windows - 1 else cut(q_test + test_fraction)
        in_test = ts >= t_test if t_end is None else (ts >= t_test) & (ts < t_end)
        train = ratings[ts < t_val].reset_index(drop=True)
        val = ratings[(ts >= t_val) & (ts < t_test)].reset_index(drop=True)
        test = ratings[in_test].reset_index(drop=True)
        if train.empty or val.empty or test.empty:
            raise ValueError(
                f"time split (window {k + 1} of {windows}) left an empty period (train {len(train)}, "
                f"val {len(val)}, test {len(test)}): too few distinct timestamps"
            )
        splits.append(Split(train=train, val=val, test=test, t_val=t_val, t_test=t_test, t_end=t_end))
    return splits


def relevant_items(period: pd.DataFrame, item_index: dict[int, int] | pd.Series) -> dict[int, np.ndarray]:
    """Relevant item indices per user in an evaluated period (rating >= 4).

    Args:
        period: Interactions of the evaluated period.
        item_index: Maps movie_id to item index.

    Returns:
        ``{user_id: sorted unique item indices}`` for users with at least one relevant item.
    """
    rel = period[period.rating >= RELEVANCE_MIN_RATING]
    idx = rel.movie_id.map(item_index)
    rel = rel.assign(item=idx).dropna(subset=["item"])
    return {int(u): np.unique(g.item.to_numpy(dtype=np.int64)) for u, g in rel.groupby("user_id", sort=True)}
