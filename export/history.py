"""Users' time-ordered histories, stored once and sliced into fixed-length windows.

A history window is what the user tower and the ranker features read: the last ``L`` items
(most recent last), left-padded with item ``-1`` and rating ``0`` (unknown). Windows are cut on
demand from one CSR-like layout, so a 32M-interaction data set never materialises
``n_samples x L`` arrays.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np
import pandas as pd

from export.items import Catalog
from orchestrator.contract import PAD_ITEM, history_windows  # noqa: F401 - PAD_ITEM re-exported

if TYPE_CHECKING:
    import scipy.sparse as sp


@dataclass(frozen=True)
class Histories:
    """Interactions grouped by user and ordered by time.

    Attributes:
        user_ids: int64 [n_users], sorted.
        offsets: int64 [n_users + 1]; user ``u``'s interactions are ``offsets[u]:offsets[u+1]``.
        items: int64 [nnz] item indices.
        ratings: float32 [nnz].
        timestamps: int64 [nnz].
    """

    user_ids: np.ndarray
    offsets: np.ndarray
    items: np.ndarray
    ratings: np.ndarray
    timestamps: np.ndarray

    @classmethod
    def from_frame(cls, frame: pd.DataFrame, catalog: Catalog) -> Histories:
        """Groups ``frame`` (user_id, movie_id, rating, timestamp) by user, time-ordered.

        Rows whose movie is not in the catalog are skipped. Ties in time are broken by movie id
        so that the order, and therefore training, is reproducible.
        """
        items = catalog.to_items(frame.movie_id.to_numpy())
        keep = items >= 0
        users = frame.user_id.to_numpy()[keep]
        ts = frame.timestamp.to_numpy()[keep]
        movie = frame.movie_id.to_numpy()[keep]
        order = np.lexsort((movie, ts, users))
        users, items = users[order], items[keep][order]
        ratings = frame.rating.to_numpy(np.float32)[keep][order]
        ts = ts[order]
        user_ids, starts = np.unique(users, return_index=True)
        offsets = np.append(starts, len(users)).astype(np.int64)
        return cls(user_ids.astype(np.int64), offsets, items.astype(np.int64), ratings, ts.astype(np.int64))

    @property
    def n_users(self) -> int:
        return len(self.user_ids)

    def positions(self, user_ids: np.ndarray) -> np.ndarray:
        """Row of each user id in this store, -1 for users without history."""
        user_ids = np.asarray(user_ids, dtype=np.int64)
        if self.n_users == 0:
            return np.full(len(user_ids), -1, dtype=np.int64)
        pos = np.clip(np.searchsorted(self.user_ids, user_ids), 0, self.n_users - 1)
        return np.where(self.user_ids[pos] == user_ids, pos, -1)

    def window(self, ends: np.ndarray, starts: np.ndarray, length: int) -> tuple[np.ndarray, np.ndarray]:
        """Items and ratings at ``[max(start, end - length), end)``, left-padded to ``length``.

        The serving side cuts its windows with the same function
        (:func:`orchestrator.contract.history_windows`).

        Args:
            ends: int64 [n] exclusive end positions in the flat arrays.
            starts: int64 [n] first position that belongs to the same user.
            length: Window length ``L``.

        Returns:
            ``(items int64 [n, L], ratings float32 [n, L])`` with ``-1`` / ``0`` padding.
        """
        return history_windows(self.items, self.ratings, starts, ends, length)

    def last(self, user_ids: np.ndarray, length: int) -> tuple[np.ndarray, np.ndarray]:
        """The last ``length`` interactions of each user (all padding for unknown users)."""
        pos = self.positions(user_ids)
        known = pos >= 0
        safe = np.where(known, pos, 0)
        ends = np.where(known, self.offsets[safe + 1], 0)
        starts = np.where(known, self.offsets[safe], 1)  # start > end -> nothing valid
        return self.window(ends, starts, length)

    def seen(self, user_ids: np.ndarray) -> list[np.ndarray]:
        """All item indices each user interacted with (empty for unknown users)."""
        pos = self.positions(user_ids)
        empty = np.empty(0, dtype=np.int64)
        return [self.items[self.offsets[p] : self.offsets[p + 1]] if p >= 0 else empty for p in pos]

    def user_of_position(self) -> np.ndarray:
        """int64 [nnz]: the row (user position) each flat interaction belongs to."""
        return np.repeat(np.arange(self.n_users), np.diff(self.offsets))

    def binary_matrix(self, n_items: int) -> sp.csr_matrix:
        """float32 users x items CSR (rows in store order, at least one): 1 where the user
        interacted, re-ratings counted once. What the item-item models (ItemKNN, EASE, the CF
        vectors) are fitted on."""
        import scipy.sparse as sp  # offline only: importing the histories does not load scipy

        users = self.user_of_position()
        x = sp.csr_matrix((np.ones(len(users), np.float32), (users, self.items)), shape=(max(self.n_users, 1), n_items))
        x.sum_duplicates()
        x.data[:] = 1.0
        return x
