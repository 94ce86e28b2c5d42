"""Offline side of the candidate sources: build the tables, merge for many users, choose budgets.

The sources and the merge themselves live in :mod:`orchestrator.candidates` (the online
reader owns them; this writer imports them), so a user's candidates offline and online come
from the same code. What is only offline is here:

* :func:`build_tables`: the item-item neighbour table (top-M shrunk cosine of co-occurrence,
  the :class:`export.baselines.ItemKNN` similarity) and the popular lists, from the
  interactions before a cut-off only;
* :func:`merged_candidates`: every user's merged set, two-tower scores and source ranks;
* :func:`choose_budgets`: per-source budgets that maximise the merged set's recall on
  validation users (greedy, in steps of ``1 / steps``).
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
from tqdm.auto import tqdm

from export.baselines import ItemKNN
from export.history import Histories
from export.items import Catalog, ItemStats
from orchestrator.candidates import SOURCES, CandidateTables, blocked_mask, merge, source_lists, two_tower_scores

DEFAULT_BUDGETS = (0.5, 0.2, 0.1, 0.1, 0.1)
"""Shares used when no validation measurement chose others (aligned with ``SOURCES``)."""


def _order(values: np.ndarray) -> np.ndarray:
    """Item indices by ``values`` descending, ties by item index (what the orchestrator does too)."""
    return np.lexsort((np.arange(len(values)), -np.asarray(values)))


def neighbour_table(histories: Histories, n_items: int, neighbours: int, shrink: float) -> tuple[np.ndarray, np.ndarray]:
    """Top-``neighbours`` items by shrunk co-occurrence cosine for every item.

    Entry ``[i, :]`` lists the items ``j`` whose ItemKNN score gains ``sim(i, j)`` when the user
    has ``i`` (ItemKNN keeps each target's best neighbours; a row keeps its strongest of those).

    Returns:
        ``(int32 [n_items, neighbours] -1 padded, float32 [n_items, neighbours])``.
    """
    x = histories.binary_matrix(n_items)
    sim = ItemKNN(neighbours=max(1, min(neighbours, n_items - 1)), shrink=shrink).fit(x).similarity.tocsr()
    ids = np.full((n_items, neighbours), -1, np.int32)
    vals = np.zeros((n_items, neighbours), np.float32)
    for i in range(n_items):
        lo, hi = sim.indptr[i], sim.indptr[i + 1]
        if hi == lo:
            continue
        cols, data = sim.indices[lo:hi], sim.data[lo:hi]
        top = np.lexsort((cols, -data))[:neighbours]
        ids[i, : len(top)] = cols[top]
        vals[i, : len(top)] = data[top]
    return ids, vals


def build_tables(
    histories: Histories,
    stats: ItemStats,
    catalog: Catalog,
    neighbours: int = 100,
    shrink: float = 10.0,
    pool: int = 2000,
    budgets: Sequence[float] = DEFAULT_BUDGETS,
) -> CandidateTables:
    """The tables of the non-ANN sources as of ``stats.cutoff`` (``histories`` hold only the past).

    Args:
        histories: Interactions before the cut-off.
        stats: Item statistics as of the cut-off.
        catalog: Items and genres.
        neighbours: ``M``, neighbours kept per item.
        shrink: Cosine shrinkage (as ItemKNN's).
        pool: Length ``P`` of the popular lists (long enough to survive a heavy user's exclusions).
        budgets: Per-source shares.
    """
    n = catalog.n_items
    ids, vals = neighbour_table(histories, n, neighbours, shrink)
    pool = min(pool, n)
    by_count = _order(stats.count)
    recent = _order(stats.recent_count + stats.count / (stats.count.max() + 1.0))  # ties: all-time count
    genres = np.asarray(catalog.genre_matrix, np.float32)
    per_genre = np.full((genres.shape[1], pool), -1, np.int64)
    for g in range(genres.shape[1]):
        members = by_count[genres[by_count, g] > 0][:pool]
        per_genre[g, : len(members)] = members
    b = np.asarray(budgets, np.float32)
    return CandidateTables(
        neighbours=ids,
        neighbour_sims=vals,
        popular=by_count[:pool].astype(np.int64),
        recent_popular=recent[:pool].astype(np.int64),
        genre_popular=per_genre,
        log_count=np.log1p(stats.count).astype(np.float32),
        genre_matrix=genres,
        budgets=b / b.sum(),
    )


def user_source_lists(
    tables: CandidateTables,
    ann: np.ndarray,
    history: np.ndarray,
    seen: Sequence[np.ndarray],
    n: int,
    progress: bool = False,
) -> list[list[np.ndarray]]:
    """Every source's list for many users (seen items excluded), as the orchestrator builds them.

    Args:
        tables: The tables.
        ann: int64 [n_users, >= n] two-tower top-K (seen excluded, -1 padded).
        history: int64 [n_users, L] history windows.
        seen: Items each user interacted with before the cut-off.
        n: List length.
        progress: Show a progress bar.
    """
    out = []
    for row in tqdm(range(len(history)), desc="candidate sources", disable=not progress, leave=False):
        blocked = blocked_mask(tables.n_items, seen[row])
        a = ann[row]
        out.append(source_lists(tables, a[a >= 0], history[row], blocked, n))
    return out


def merge_users(lists: list[list[np.ndarray]], budgets: np.ndarray, n: int) -> tuple[np.ndarray, np.ndarray]:
    """:func:`~orchestrator.candidates.merge` for every user.

    Returns:
        ``(items int64 [n_users, n] -1 padded, sources float32 [n_users, n, S] -1 padded)``.
    """
    items = np.full((len(lists), n), -1, np.int64)
    ranks = np.full((len(lists), n, len(SOURCES)), -1.0, np.float32)
    for row, per_source in enumerate(lists):
        merged, r = merge(per_source, budgets, n)
        items[row, : len(merged)] = merged
        ranks[row, : len(merged)] = r
    return items, ranks


def recall(cands: np.ndarray, relevant: Sequence[np.ndarray]) -> float:
    """Mean over users of the share of their relevant items found in their candidate row."""
    if len(relevant) == 0:
        return 0.0
    return float(np.mean([np.isin(rel, row).mean() if len(rel) else 0.0 for row, rel in zip(cands, relevant)]))


def choose_budgets(lists: list[list[np.ndarray]], relevant: Sequence[np.ndarray], n: int, steps: int = 10) -> tuple[np.ndarray, list[dict]]:
    """Per-source budgets maximising the merged set's recall of ``relevant`` (validation users).

    Greedy: ``steps`` times, the share ``1 / steps`` goes to the source whose extra share
    raises recall the most (ties: the source holding the most share, then the earlier in
    ``SOURCES``).

    Returns:
        ``(budgets float32 [S] summing to 1, trials)`` with the recall of every step.
    """
    counts = np.zeros(len(SOURCES))
    trials = []
    for _ in range(steps):
        best, best_recall = 0, -1.0
        # ties (a share that changes nothing, e.g. to an empty source): the source already
        # holding the most, then the earlier one
        for s in sorted(range(len(SOURCES)), key=lambda i: (-counts[i], i)):
            trial = counts.copy()
            trial[s] += 1
            r = recall(merge_users(lists, trial / trial.sum(), n)[0], relevant)
            if r > best_recall + 1e-12:
                best, best_recall = s, r
        counts[best] += 1
        trials.append({"budgets": (counts / counts.sum()).round(4).tolist(), "recall": round(best_recall, 5)})
    return (counts / counts.sum()).astype(np.float32), trials


def source_recalls(lists: list[list[np.ndarray]], relevant: Sequence[np.ndarray], n: int) -> dict[str, float]:
    """Recall of each source's own top-``n`` list (what each source alone would give the ranker)."""
    out = {}
    for s, name in enumerate(SOURCES):
        rows = np.full((len(lists), n), -1, np.int64)
        for row, per_source in enumerate(lists):
            lst = per_source[s][:n]
            rows[row, : len(lst)] = lst
        out[name] = round(recall(rows, relevant), 5)
    return out


def user_item_scores(user_vectors: np.ndarray, item_vectors: np.ndarray, cands: np.ndarray) -> np.ndarray:
    """float32 [n_users, n] two-tower inner products of each candidate (-inf for padding)."""
    return (
        np.concatenate(
            [two_tower_scores(user_vectors[s : s + 1024], item_vectors, cands[s : s + 1024]) for s in range(0, len(cands), 1024)]
        )
        if len(cands)
        else np.zeros(cands.shape, np.float32)
    )


def merged_from_ann(
    tables: CandidateTables,
    ann: np.ndarray,
    history: np.ndarray,
    seen: Sequence[np.ndarray],
    user_vectors: np.ndarray,
    item_vectors: np.ndarray,
    n: int,
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Merged candidates of many users from their ANN lists (what ``batch-score`` and benchmarks send).

    Returns:
        ``(items int64 [u, n] -1 padded, scores float32 [u, n] -inf padded, sources float32 [u, n, S])``.
    """
    lists = user_source_lists(tables, ann, history, seen, n)
    items, sources = merge_users(lists, tables.budgets, n)
    return items, user_item_scores(user_vectors, item_vectors, items), sources
