"""The ranker's features: ONE definition, used offline for training and online inside Triton.

:class:`RankerFeatures` is a ``torch.nn.Module`` whose lookup tables (item statistics as of a
cut-off, item embeddings, genres, years) are buffers. Offline it computes the LightGBM
training matrix; for serving it is exported to ONNX as the ``ranker_features`` model, the
first step of the ``ranker_features -> ranker`` ensemble. There is no second copy of this
logic anywhere, so training and serving cannot drift apart.

One output row per candidate; the user's history is sent once per user, not once per
candidate. A call scores U users with C candidates each (N = U * C rows, grouped by user:
rows ``u*C .. u*C+C-1`` belong to user ``u``). Per-user work (history lookups, genre profile,
mean rating, ...) runs once per user; the candidate-by-history similarities are batched
matrix products ``[U, C, D] x [U, D, L]`` (L = ``FEATURE_WINDOW``). Offline, where every row
has its own history, the same graph runs with U = N and C = 1. Inputs:

* ``item`` int32/int64 [N]: candidate item index.
* ``retrieval_score`` float32 [N]: the two-tower inner product.
* ``retrieval_rank`` float32 [N]: 0-based rank of the candidate in retrieval.
* ``history`` int32/int64 [U, H]: each user's last H items (``RANKER_HISTORY``), most recent
  last, ``-1`` padding. ``ease_lowrank_long`` reads all of them; every other history feature
  reads the last ``FEATURE_WINDOW``.
* ``history_rating`` float32 [U, H]: their ratings, 0 = unknown.
* ``candidate_sources`` float32 [N, S]: the candidate's 0-based rank in each candidate source,
  -1 where the source did not propose it (``orchestrator/candidates.py``); passed through as
  the last ``S`` features.

Per-candidate inputs keep the leading axis N (a further per-candidate input is an [N, ...]
tensor); per-user inputs have the leading axis U, and N must be a multiple of U.

Output: ``features`` float32 [N, len(FEATURE_NAMES)].
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from export.history import Histories
from export.items import Catalog, ItemStats
from orchestrator.candidates import SOURCE_FEATURE_NAMES

FEATURE_NAMES = (
    "retrieval_score",
    "retrieval_rank",
    "item_log_count",
    "item_log_recent_count",
    "item_mean_rating",
    "item_year",
    "item_days_since_first_rating",
    "user_genre_affinity",
    "user_genre_share",
    "user_history_len",
    "user_mean_rating",
    "user_rated_share",
    "user_mean_log_count",
    "popularity_gap",
    "year_gap",
    "sim_last5_max",
    "sim_last5_mean",
    "sim_history_mean",
    "sim_history_max",
    "cf_sim_history_mean",
    "cf_sim_history_max",
    "cf_sim_last5_max",
    "cf_sim_history_sum",
    "ease_score",
    "ease_score_last5",
    "ease_lowrank_long",
) + SOURCE_FEATURE_NAMES
"""Column names of the feature matrix, in order."""

FEATURE_WINDOW = 50
"""The most recent history items the similarity, genre, rating and ``ease_score`` features read
(the ``history`` input is longer: ``RANKER_HISTORY``)."""

LAST_N = 5
"""How many of the most recent items the ``sim_last5_*`` features compare the candidate with."""

CF_DIM = 32
"""Size of the collaborative-filtering item vectors (truncated SVD of the interaction matrix)."""


def cf_item_vectors(histories: Histories, n_items: int, dim: int = CF_DIM, seed: int = 0) -> np.ndarray:
    """Item vectors whose cosines approximate item-item co-occurrence cosines.

    The binary users x items matrix ``X`` (from the past only) gets L2-normalised columns
    ``Xn``; ``Xn^T Xn`` is the item-item cosine matrix that ItemKNN uses. A rank-``dim``
    truncated SVD ``Xn ~ U S V^T`` gives ``Xn^T Xn ~ (V S)(V S)^T``, so the rows of ``V S``
    carry that similarity in ``dim`` floats per item: it scales to large catalogs where an
    ``n_items^2`` matrix cannot, and it is a lookup table that exports to ONNX.

    Returns:
        float32 [n_items, dim] (zero rows for items nobody interacted with).
    """
    from sklearn.utils.extmath import randomized_svd

    x = histories.binary_matrix(n_items)
    norms = np.sqrt(np.asarray(x.power(2).sum(axis=0))).ravel()
    x = x @ _diag(np.divide(1.0, norms, out=np.zeros_like(norms), where=norms > 0))
    rank = max(1, min(dim, min(x.shape) - 1))
    _, sing, vt = randomized_svd(x, n_components=rank, random_state=seed, n_iter=4)
    vectors = np.zeros((n_items, dim), dtype=np.float32)
    vectors[:, :rank] = (vt.T * sing).astype(np.float32)
    return vectors


EASE_LAM = 300.0
"""L2 strength of the EASE weights behind ``ease_score`` (the middle of the baseline's grid, where
its validation choice falls most often on ml-100k, ml-latest-small and the synthetic sample)."""

EASE_NEIGHBOURS = 64
"""EASE weights kept per history item (the largest; the rest of the row is dropped)."""

EASE_MAX_ITEMS = 10_000
"""Most-rated items the EASE weights are solved over: a dense n x n inverse (0.8 GiB in float64
at 10,000). Items outside get no weights and score 0; smaller catalogs are solved whole."""


EASE_RANK = 64
"""Rank of the factorised EASE weights behind ``ease_lowrank_long``."""


@dataclass(frozen=True)
class EaseTables:
    """The EASE weights (Steck, 2019) as the feature graph reads them, both from one fit.

    EASE scores item ``j`` for a user as ``sum_(h in history) B[h, j]``. Two lookup tables of
    ``B`` turn that sum into gathers over the history:

    Attributes:
        items: int32 [n_items, width] each item's ``width`` largest weights' columns, -1 padded
            (``ease_score``, ``ease_score_last5``: the last ``FEATURE_WINDOW`` items).
        weights: float32 [n_items, width] those weights.
        rows: int32 [n_items] each item's row in ``p`` / ``q``; ``len(p) - 1`` (a zero row) for
            items outside the fit.
        p: float32 [k + 1, EASE_RANK] and
        q: float32 [k + 1, EASE_RANK]: ``B ~ P Q^T``, its rank-``EASE_RANK`` truncated SVD over the
            ``k`` fitted items, so a user's scores are ``(sum of P over the history) Q^T`` at 128
            floats an item (``ease_lowrank_long``: the whole ``RANKER_HISTORY``).
    """

    items: np.ndarray
    weights: np.ndarray
    rows: np.ndarray
    p: np.ndarray
    q: np.ndarray


def ease_tables(
    histories: Histories,
    n_items: int,
    lam: float = EASE_LAM,
    width: int = EASE_NEIGHBOURS,
    max_items: int = EASE_MAX_ITEMS,
    rank: int = EASE_RANK,
) -> EaseTables:
    """Fits EASE on the binary interactions of ``histories`` and cuts its two lookup tables."""
    from export.baselines import EASE

    items = np.full((n_items, width), -1, np.int32)
    weights = np.zeros((n_items, width), np.float32)
    x = histories.binary_matrix(n_items)
    counts = np.asarray(x.sum(axis=0)).ravel()
    keep = np.flatnonzero(counts > 0)
    if len(keep) > max_items:
        keep = np.sort(keep[np.argsort(-counts[keep], kind="stable")[:max_items]])
    k = min(width, len(keep) - 1)
    if k < 1:
        return EaseTables(items, weights, np.zeros(n_items, np.int32), np.zeros((1, rank), np.float32), np.zeros((1, rank), np.float32))
    b = EASE(lam=lam, max_items=max(max_items, len(keep))).fit(x[:, keep]).weights
    assert b is not None
    rows = np.full(n_items, len(keep), np.int32)
    rows[keep] = np.arange(len(keep), dtype=np.int32)
    p, q = ease_factors(b, rank)
    b[np.diag_indices(len(keep))] = -np.inf  # an item is not its own neighbour (its weight is 0)
    for s in range(0, len(keep), 2048):  # row chunks bound the argpartition's index copy
        chunk = b[s : s + 2048]
        top = np.argpartition(-chunk, k - 1, axis=1)[:, :k]
        vals = np.take_along_axis(chunk, top, axis=1)
        order = np.argsort(-vals, axis=1, kind="stable")
        items[keep[s : s + 2048], :k] = keep[np.take_along_axis(top, order, axis=1)]
        weights[keep[s : s + 2048], :k] = np.take_along_axis(vals, order, axis=1)
    return EaseTables(items, weights, rows, p, q)


def ease_factors(b: np.ndarray, rank: int = EASE_RANK) -> tuple[np.ndarray, np.ndarray]:
    """``(P, Q)``, each [k + 1, rank] with a last zero row, ``P Q^T`` the truncated SVD of ``b`` [k, k]
    (ARPACK from a fixed start vector, so a refit gives the same factors)."""
    from scipy.sparse.linalg import svds

    n = b.shape[0]
    p = np.zeros((n + 1, rank), np.float32)
    q = np.zeros((n + 1, rank), np.float32)
    r = min(rank, n - 1)
    if r >= 1:
        u, s, vt = svds(np.asarray(b, np.float64), k=r, v0=np.full(n, 1.0 / np.sqrt(n)))
        p[:n, :r], q[:n, :r] = u * s, vt.T
    return p, q


def _diag(values: np.ndarray):
    from scipy.sparse import diags

    return diags(values.astype(np.float32))


class RankerFeatures(nn.Module):
    """Per-candidate ranker features from item tables and the user's history window."""

    def __init__(
        self,
        catalog: Catalog,
        stats: ItemStats,
        item_vectors: np.ndarray,
        cf_vectors: np.ndarray,
        ease: EaseTables,
    ):
        super().__init__()
        self.register_buffer("log_count", torch.tensor(np.asarray(np.log1p(stats.count)), dtype=torch.float32))
        self.register_buffer("log_recent", torch.tensor(np.asarray(np.log1p(stats.recent_count)), dtype=torch.float32))
        self.register_buffer("mean_rating", torch.tensor(np.asarray(stats.mean_rating), dtype=torch.float32))
        self.register_buffer("first_days", torch.tensor(np.asarray(stats.first_seen_days), dtype=torch.float32))
        self.register_buffer("year", torch.tensor(np.asarray(catalog.years), dtype=torch.float32))
        genres = torch.tensor(np.asarray(catalog.genre_matrix), dtype=torch.float32)
        self.register_buffer("genres", genres)
        self.register_buffer("vectors", F.normalize(torch.tensor(np.asarray(item_vectors), dtype=torch.float32), dim=-1))
        self.register_buffer("cf_vectors", torch.tensor(np.asarray(cf_vectors), dtype=torch.float32))
        # EASE table with -1 padding pointing at an extra all-zero column (index n_items)
        n_items = len(stats.count)
        self.register_buffer("ease_items", torch.tensor(np.where(ease.items >= 0, ease.items, n_items), dtype=torch.long))
        self.register_buffer("ease_weights", torch.tensor(np.asarray(ease.weights), dtype=torch.float32))
        self.register_buffer("ease_zeros", torch.zeros(n_items + 1))
        # the factor rows of every item, the padding (-1, read as the last item) sent to the zero row
        rows = np.append(np.asarray(ease.rows, np.int64), len(ease.p) - 1)
        self.register_buffer("ease_rows", torch.tensor(rows, dtype=torch.long))
        self.register_buffer("ease_p", torch.tensor(np.asarray(ease.p), dtype=torch.float32))
        self.register_buffer("ease_q", torch.tensor(np.asarray(ease.q), dtype=torch.float32))

    @classmethod
    def from_state_dict(cls, state: dict[str, torch.Tensor]) -> RankerFeatures:
        """Rebuilds the module from a saved ``state_dict`` (all of its state is buffers)."""
        module = cls.__new__(cls)
        nn.Module.__init__(module)
        for name, value in state.items():
            module.register_buffer(name, value.clone())
        return module

    def forward(
        self,
        item: torch.Tensor,
        retrieval_score: torch.Tensor,
        retrieval_rank: torch.Tensor,
        history: torch.Tensor,
        history_rating: torch.Tensor,
        candidate_sources: torch.Tensor,
    ) -> torch.Tensor:
        # U users, C candidates each, N = U * C rows grouped by user (see the module docstring)
        long_history = history.to(torch.long)
        history = long_history[:, -FEATURE_WINDOW:]
        history_rating = history_rating[:, -FEATURE_WINDOW:].to(torch.float32)
        n_users = history.shape[0]
        item = item.reshape(-1).to(torch.long)
        item_uc = item.reshape(n_users, -1)  # [U, C]

        # EASE through its factors over the whole long window: (sum of P over it) . Q[candidate]
        long_rows = self.ease_rows[long_history]  # -1 padding indexes the last entry: the zero row
        user_p = self.ease_p[long_rows].sum(1)  # [U, R]
        ease_long = torch.matmul(self.ease_q[self.ease_rows[item_uc]], user_p.unsqueeze(-1)).squeeze(-1)  # [U, C]

        # per-user work, once per user: [U, L] and [U] tensors
        valid = (history >= 0).to(torch.float32)
        hist = torch.where(history >= 0, history, torch.zeros_like(history))
        n_hist = valid.sum(1)
        denom = torch.clamp(n_hist, min=1.0)
        has_hist = (n_hist > 0).to(torch.float32)
        hist_genres = self.genres[hist] * valid.unsqueeze(-1)  # [U, L, G]
        profile = hist_genres.sum(1)  # [U, G]
        rated = (history_rating > 0).to(torch.float32) * valid
        n_rated = rated.sum(1)
        user_mean_rating = (history_rating * rated).sum(1) / torch.clamp(n_rated, min=1.0)
        user_mean_count = (self.log_count[hist] * valid).sum(1) / denom
        hist_year = self.year[hist] * valid
        known_year = (hist_year > 0).to(torch.float32).sum(1)
        mean_year = hist_year.sum(1) / torch.clamp(known_year, min=1.0)
        hist_vec = self.vectors[hist]  # [U, L, D]
        cf_hist = self.cf_vectors[hist]  # [U, L, K]
        cf_hist_norm = cf_hist.norm(dim=-1)  # [U, L]
        mask = valid.unsqueeze(1)  # [U, 1, L]: broadcast over a user's candidates
        recent = mask[:, :, -LAST_N:]
        n_recent = torch.clamp(recent.sum(-1), min=1.0)  # [U, 1]

        # candidate x history work as batched matrix products: [U, C, L]
        cand_genres = self.genres[item_uc]  # [U, C, G]
        affinity = (cand_genres * profile.unsqueeze(1)).sum(-1) / (profile.norm(dim=1).unsqueeze(1) * cand_genres.norm(dim=-1) + 1e-6)
        overlap = torch.matmul(cand_genres, hist_genres.transpose(1, 2))
        share = ((overlap > 0).to(torch.float32) * mask).sum(-1) / denom.unsqueeze(1)

        cand_year = self.year[item_uc]
        year_gap = torch.where(
            (cand_year > 0) & (known_year.unsqueeze(1) > 0), cand_year - mean_year.unsqueeze(1), torch.zeros_like(cand_year)
        )

        sims = torch.matmul(self.vectors[item_uc], hist_vec.transpose(1, 2))  # cosines (unit vectors)
        masked = sims * mask - (1.0 - mask) * 2.0  # cosine >= -1, so -2 never wins a max
        per_user = has_hist.unsqueeze(1)
        last_max = masked[:, :, -LAST_N:].max(-1).values * per_user
        last_mean = (sims[:, :, -LAST_N:] * recent).sum(-1) / n_recent
        hist_mean = (sims * mask).sum(-1) / denom.unsqueeze(1)
        hist_max = masked.max(-1).values * per_user

        # collaborative similarity (co-occurrence cosines, unnormalised CF vectors)
        cf_cand = self.cf_vectors[item_uc]  # [U, C, K]
        cf_dots = torch.matmul(cf_cand, cf_hist.transpose(1, 2))
        cf_norms = cf_hist_norm.unsqueeze(1) * cf_cand.norm(dim=-1).unsqueeze(2) + 1e-6
        cf_sims = cf_dots / cf_norms * mask
        cf_masked = cf_sims - (1.0 - mask) * 2.0
        cf_mean = cf_sims.sum(-1) / denom.unsqueeze(1)
        cf_max = cf_masked.max(-1).values * per_user
        cf_last_max = cf_masked[:, :, -LAST_N:].max(-1).values * per_user
        cf_sum = (cf_dots * mask).sum(-1)

        # EASE: scatter each user's history rows of B into a dense [U, n_items + 1] score row,
        # then read the candidates' entries (the last column collects the padding)
        ease_idx = self.ease_items[hist].reshape(n_users, -1)  # [U, L * M]
        ease_w = self.ease_weights[hist] * valid.unsqueeze(-1)  # [U, L, M]
        zeros = valid[:, :1] * self.ease_zeros  # [U, n_items + 1]
        ease_all = torch.gather(zeros.scatter_add(1, ease_idx, ease_w.reshape(n_users, -1)), 1, item_uc)
        ease_idx_last = self.ease_items[hist[:, -LAST_N:]].reshape(n_users, -1)
        ease_w_last = ease_w[:, -LAST_N:].reshape(n_users, -1)
        ease_last = torch.gather(zeros.scatter_add(1, ease_idx_last, ease_w_last), 1, item_uc)

        ones = torch.ones_like(affinity)  # [U, C]: spreads a per-user value over its candidates
        item_count = self.log_count[item]
        user_count = (user_mean_count.unsqueeze(1) * ones).reshape(-1)
        cols = [
            retrieval_score.reshape(-1),
            retrieval_rank.reshape(-1),
            item_count,
            self.log_recent[item],
            self.mean_rating[item],
            self.year[item],
            self.first_days[item],
            affinity.reshape(-1),
            share.reshape(-1),
            (n_hist.unsqueeze(1) * ones).reshape(-1),
            (user_mean_rating.unsqueeze(1) * ones).reshape(-1),
            ((n_rated / denom).unsqueeze(1) * ones).reshape(-1),
            user_count,
            item_count - user_count,
            year_gap.reshape(-1),
            last_max.reshape(-1),
            last_mean.reshape(-1),
            hist_mean.reshape(-1),
            hist_max.reshape(-1),
            cf_mean.reshape(-1),
            cf_max.reshape(-1),
            cf_last_max.reshape(-1),
            cf_sum.reshape(-1),
            ease_all.reshape(-1),
            ease_last.reshape(-1),
            ease_long.reshape(-1),
        ]
        return torch.cat([torch.stack(cols, dim=1), candidate_sources.to(torch.float32).reshape(item.shape[0], -1)], dim=1)

    @torch.no_grad()
    def compute(
        self,
        item: np.ndarray,
        retrieval_score: np.ndarray,
        retrieval_rank: np.ndarray,
        history: np.ndarray,
        history_rating: np.ndarray,
        candidate_sources: np.ndarray,
        batch_rows: int = 65536,
    ) -> np.ndarray:
        """Numpy convenience wrapper: float32 [N, len(FEATURE_NAMES)].

        ``history`` / ``history_rating`` hold one row per user, N = U * C rows grouped by user as
        in the served graph (U = N: one history row per candidate). Users are fed in slices
        that bound both the rows per call and the dense EASE score rows ([users, n_items]).
        """
        n, users = len(item), len(history)
        if n == 0:
            return np.zeros((0, len(FEATURE_NAMES)), dtype=np.float32)
        if users == 0 or n % users:
            raise ValueError(f"{n} candidate rows do not split evenly over {users} history rows")
        per_user = n // users
        step = max(1, min(batch_rows // per_user, (1 << 25) // len(self.ease_zeros)))
        out = []
        for s in range(0, users, step):
            rows = slice(s * per_user, (s + step) * per_user)
            out.append(
                self(
                    torch.as_tensor(item[rows], dtype=torch.long),
                    torch.as_tensor(retrieval_score[rows], dtype=torch.float32),
                    torch.as_tensor(retrieval_rank[rows], dtype=torch.float32),
                    torch.as_tensor(history[s : s + step], dtype=torch.long),
                    torch.as_tensor(history_rating[s : s + step], dtype=torch.float32),
                    torch.as_tensor(candidate_sources[rows], dtype=torch.float32),
                ).numpy()
            )
        return np.concatenate(out).astype(np.float32)
