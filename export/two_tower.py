"""Two-tower retrieval model: an item tower and a history-reading user tower.

* Item tower: item id embedding + genres + release-year bucket + popularity bucket -> MLP ->
  64-d, L2-normalised.
* User tower: the user's last ``L`` items (each encoded by the *same* item encoder, plus an
  embedding of the rating given) -> one *causal* self-attention block -> causal attention
  pooling, + demographics where known -> MLP -> 64-d, L2-normalised. Position enters as a
  learned bias by distance back from the reading position. There is no user-id embedding: a
  user the model never saw is served from a handful of ratings.

Training (SASRec-style, Kang & McAuley 2018): a user's sequence is cut into windows of
``L + 1`` items and one pass of the causal tower scores every position of a window against
the item that follows it, so an epoch trains every interaction as a target while running the
tower once per window instead of once per target (about ``L`` times less compute than one
window per target). Because position ``t`` sees items ``<= t`` only and positions are
relative, the prefix ending at ``t`` is embedded exactly as a served window ending there.
The loss is a softmax over the whole catalog when it is small (exact: popularity, which
dominates what MovieLens users rate next, is learned as it is), else over shared sampled
negatives (the step's own targets plus uniform draws) with the logQ correction of their
expected counts (Yi et al. 2019). Learned temperature; id-embedding dropout and weight
decay; optional recency weighting of targets; warm-up then cosine learning rate; the epoch
count is chosen on validation Recall@100; automatic mixed precision when CUDA is present;
seeded.
"""

from __future__ import annotations

import copy
import math
from collections.abc import Callable
from dataclasses import asdict, dataclass

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from tqdm.auto import tqdm

from export.history import Histories
from export.items import POP_BUCKETS, YEAR_BUCKETS, Catalog, ItemStats
from orchestrator.artifacts import AGE_BUCKETS, Demographics  # noqa: F401 - the codes the tower embeds; re-exported
from orchestrator.contract import RANKER_HISTORY


@dataclass(frozen=True)
class TwoTowerConfig:
    """Hyper-parameters of the two-tower model and its training.

    Attributes:
        dim: Output embedding size.
        hidden: Width of the towers' MLPs and of the item encoding.
        history_len: ``L``, the number of recent items the user tower reads.
        heads: Attention heads of the user tower's self-attention block.
        dropout: Dropout inside the towers.
        epochs: Maximum epochs.
        batch_size: Windows of ``history_len + 1`` items per step (every position of each is a
            target, so a step has up to ``batch_size * history_len`` targets).
        lr: Peak learning rate of AdamW.
        weight_decay: AdamW weight decay.
        warmup_frac: Share of the steps spent in linear warm-up.
        temperature: Initial softmax temperature (learned, clamped to [0.01, 1]).
        logq: Whether to apply the logQ correction to sampled negatives (catalogs larger than
            ``negatives``; a full softmax needs none).
        full_softmax_items: A catalog of at most this many items is scored whole at every
            step (exact softmax: nothing sampled, popularity learned as it is).
        negatives: Shared negatives per step on larger catalogs (their cost per target is
            ``negatives x dim``; the epoch-time budget of ML-32M sets it).
        sparse_id_items: A catalog of more than this many items trains the id embedding with
            sparse gradients and a lazy AdamW: a step computes, decays and moves only the rows
            it read (Adam moments of the other rows wait, as in TensorFlow's LazyAdam). On ML-32M's
            87,585 items the dense table's gradient and AdamW were most of a step's CPU time;
            smaller catalogs keep the dense AdamW over every row.
        uniform_share: Share of the sampled negatives drawn uniformly from the catalog; the
            rest are the step's own targets (popularity-distributed), so both popular and
            long-tail items are pushed against.
        id_dropout: Probability that an item's id embedding is hidden in training (its genre,
            year and popularity features remain): regularises ids of rarely seen items.
        relative_positions: Position enters as attention/pooling biases by distance back from
            each query (else as absolute window-slot embeddings, as SASRec does).
        recency_half_life: Targets are weighted ``0.5 ** (a / h)`` where ``a`` is how many
            training interactions (as a share of all) came after them and ``h`` this value;
            0 weighs every target alike. The future being evaluated looks like the recent past.
        patience: Epochs without a better validation Recall@100 before stopping.
        rating_dropout: Probability that a history rating is hidden in training, so the tower
            also serves histories given as bare movie ids.
        demo_dropout: Probability that a user's demographics are hidden in training.
        min_target_rating: Only interactions rated at least this are used as targets.
        seed: Seed of every random generator involved.
    """

    dim: int = 64
    hidden: int = 64
    history_len: int = 50
    heads: int = 2
    dropout: float = 0.1
    epochs: int = 20
    batch_size: int = 32
    lr: float = 2e-3
    weight_decay: float = 1e-4
    warmup_frac: float = 0.05
    temperature: float = 0.07
    logq: bool = True
    full_softmax_items: int = 20000
    negatives: int = 1024
    sparse_id_items: int = 20000
    uniform_share: float = 0.5
    id_dropout: float = 0.0
    relative_positions: bool = True
    recency_half_life: float = 0.1
    patience: int = 3
    rating_dropout: float = 0.3
    demo_dropout: float = 0.3
    min_target_rating: float = 0.0
    seed: int = 0

    def __post_init__(self) -> None:
        if not 1 <= self.history_len <= RANKER_HISTORY:
            # the tower's window is the last L of the ranker's H interactions (orchestrator/contract.py)
            raise ValueError(f"history_len must be in 1..{RANKER_HISTORY} (the ranker's window), got {self.history_len}")


class ItemEncoder(nn.Module):
    """Encodes item indices (``-1`` = padding, encoded as zeros) from id and side features."""

    def __init__(
        self,
        genre_matrix: np.ndarray,
        year_bucket: np.ndarray,
        pop_bucket: np.ndarray,
        width: int,
        id_dropout: float = 0.0,
        sparse_ids: bool = False,
    ):
        super().__init__()
        self.id_dropout = id_dropout
        n_items, n_genres = genre_matrix.shape
        self.register_buffer("genres", torch.tensor(np.asarray(genre_matrix), dtype=torch.float32))
        self.register_buffer("year_bucket", torch.tensor(np.asarray(year_bucket), dtype=torch.long))
        self.register_buffer("pop_bucket", torch.tensor(np.asarray(pop_bucket), dtype=torch.long))
        self.id_emb = nn.Embedding(n_items, width, sparse=sparse_ids)
        self.genre_proj = nn.Linear(n_genres, width, bias=False)
        self.year_emb = nn.Embedding(len(YEAR_BUCKETS) + 1, width)
        self.pop_emb = nn.Embedding(POP_BUCKETS, width)
        nn.init.normal_(self.id_emb.weight, std=0.02)

    def forward(self, items: torch.Tensor) -> torch.Tensor:
        valid = items >= 0
        idx = torch.where(valid, items, torch.zeros_like(items))
        ids = self.id_emb(idx)
        if self.training and self.id_dropout > 0:
            # hide whole id vectors (not single units): the item must then be told by its features
            keep = (torch.rand(ids.shape[:-1], device=ids.device) >= self.id_dropout).to(ids.dtype)
            ids = ids * keep.unsqueeze(-1)
        x = ids + self.genre_proj(self.genres[idx]) + self.year_emb(self.year_bucket[idx]) + self.pop_emb(self.pop_bucket[idx])
        return x * valid.unsqueeze(-1).to(x.dtype)


def _mlp(width: int, out: int, dropout: float) -> nn.Sequential:
    return nn.Sequential(nn.LayerNorm(width), nn.Linear(width, width), nn.GELU(), nn.Dropout(dropout), nn.Linear(width, out))


class ItemTower(nn.Module):
    """item index [B] -> L2-normalised embedding [B, dim]."""

    def __init__(self, encoder: ItemEncoder, width: int, dim: int, dropout: float):
        super().__init__()
        self.encoder = encoder
        self.mlp = _mlp(width, dim, dropout)

    def forward(self, items: torch.Tensor) -> torch.Tensor:
        return F.normalize(self.mlp(self.encoder(items)), dim=-1)


class UserTower(nn.Module):
    """(history [B, L], history_rating [B, L], demographics [B, 3]) -> L2-normalised [B, dim].

    History is most recent last, padded on the left with item -1; rating 0 means unknown.
    Masking uses large finite negatives, so an all-padding history yields a finite vector
    (the "no history" embedding) instead of NaN.
    """

    def __init__(
        self,
        encoder: ItemEncoder,
        width: int,
        dim: int,
        history_len: int,
        heads: int,
        dropout: float,
        demo_cardinalities: tuple[int, int, int],
        relative_positions: bool = True,
    ):
        super().__init__()
        self.encoder = encoder
        self.heads = heads
        self.rating_emb = nn.Embedding(11, width)  # half stars 0.5..5 -> 1..10, 0 unknown
        self.relative = relative_positions
        if relative_positions:
            # attention and pooling biases by distance back from the query (0 = itself): the
            # prefix ending at t then looks like a served window ending at its last item
            self.rel_attn = nn.Parameter(torch.zeros(heads, history_len))
            self.rel_pool = nn.Parameter(torch.zeros(history_len))
        else:
            self.pos_emb = nn.Embedding(history_len, width)
        self.qkv = nn.Linear(width, 3 * width)
        self.attn_out = nn.Linear(width, width)
        self.norm1 = nn.LayerNorm(width)
        self.ffn = nn.Sequential(nn.Linear(width, 2 * width), nn.GELU(), nn.Linear(2 * width, width))
        self.norm2 = nn.LayerNorm(width)
        self.pool_score = nn.Linear(width, 1)
        self.demo_embs = nn.ModuleList(nn.Embedding(c, width) for c in demo_cardinalities)
        self.drop = nn.Dropout(dropout)
        self.mlp = _mlp(2 * width, dim, dropout)

    def _distance(self, length: int, device: torch.device) -> torch.Tensor:
        """[L, L] steps back from query ``t`` to key ``s`` (``t - s``, 0 where ``s > t``)."""
        pos = torch.arange(length, device=device)
        return (pos[:, None] - pos[None, :]).clamp(min=0)

    def _block(self, history: torch.Tensor, history_rating: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """The causal self-attention block: hidden states [B, L, W] and the additive mask [B, L, L].

        Query ``t`` may read key ``s`` only when ``s <= t`` and ``s`` is an item (not padding).
        """
        batch, length = history.shape
        valid = (history >= 0).to(torch.float32)
        rating_code = torch.clamp(torch.round(history_rating * 2.0), 0, 10).to(torch.long)
        x = self.encoder(history) + self.rating_emb(rating_code)
        if not self.relative:
            x = x + self.pos_emb(torch.arange(length, device=history.device)).unsqueeze(0)
        x = x * valid.unsqueeze(-1)
        past = torch.tril(torch.ones(length, length, device=history.device))
        neg = (1.0 - valid[:, None, :] * past[None, :, :]) * -1e4
        q, k, v = self.qkv(x).chunk(3, dim=-1)
        head_dim = q.shape[-1] // self.heads
        q = q.reshape(batch, length, self.heads, head_dim).transpose(1, 2)
        k = k.reshape(batch, length, self.heads, head_dim).transpose(1, 2)
        v = v.reshape(batch, length, self.heads, head_dim).transpose(1, 2)
        scores = q @ k.transpose(-1, -2) / math.sqrt(head_dim) + neg[:, None, :, :]
        if self.relative:
            scores = scores + self.rel_attn[:, self._distance(length, history.device)].unsqueeze(0)
        attn = torch.softmax(scores, dim=-1) @ v
        attn = attn.transpose(1, 2).reshape(batch, length, -1)
        x = self.norm1(x + self.drop(self.attn_out(attn)))
        x = self.norm2(x + self.drop(self.ffn(x)))
        return x, neg

    def _head(self, pooled: torch.Tensor, demographics: torch.Tensor) -> torch.Tensor:
        demo = sum(emb(demographics[:, i]) for i, emb in enumerate(self.demo_embs))
        if pooled.dim() == 3:
            demo = demo.unsqueeze(1).expand(-1, pooled.shape[1], -1)
        return F.normalize(self.mlp(torch.cat([pooled, demo], dim=-1)), dim=-1)

    def sequence(self, history: torch.Tensor, history_rating: torch.Tensor, demographics: torch.Tensor) -> torch.Tensor:
        """Embeddings of every prefix, [B, L, dim]: position ``t`` reads items ``<= t`` only.

        Training calls this (one pass scores every position of a window, as SASRec does);
        :meth:`forward`, the served graph, computes the same thing for the last position alone.
        """
        x, neg = self._block(history, history_rating)
        allowed = (neg == 0).to(x.dtype)
        # causal attention pooling: prefix t averages positions <= t, weighted by a learned score
        score = self.pool_score(x).transpose(1, 2) + neg
        if self.relative:
            score = score + self.rel_pool[self._distance(x.shape[1], x.device)].unsqueeze(0)
        w = torch.softmax(score, dim=-1) * allowed
        pooled = (w @ x) / (w.sum(-1, keepdim=True) + 1e-6)
        return self._head(pooled, demographics)

    def forward(self, history: torch.Tensor, history_rating: torch.Tensor, demographics: torch.Tensor) -> torch.Tensor:
        x, neg = self._block(history, history_rating)
        last = neg[:, -1, :]  # the last query may read every item of the window
        score = self.pool_score(x).squeeze(-1) + last
        if self.relative:
            score = score + self.rel_pool.flip(0).unsqueeze(0)  # key s is L-1-s steps back
        w = torch.softmax(score, dim=-1) * (last == 0).to(x.dtype)
        pooled = (w.unsqueeze(-1) * x).sum(1) / (w.sum(1, keepdim=True) + 1e-6)
        return self._head(pooled, demographics)


class TwoTower(nn.Module):
    """Both towers over one shared item encoder, plus the learned temperature."""

    def __init__(
        self,
        config: TwoTowerConfig,
        catalog: Catalog,
        stats: ItemStats,
        demo_cardinalities: tuple[int, int, int],
    ):
        super().__init__()
        self.config = config
        sparse_ids = catalog.n_items > config.sparse_id_items
        encoder = ItemEncoder(
            catalog.genre_matrix, catalog.year_buckets(), stats.pop_buckets(), config.hidden, config.id_dropout, sparse_ids
        )
        self.item_tower = ItemTower(encoder, config.hidden, config.dim, config.dropout)
        self.user_tower = UserTower(
            encoder,
            config.hidden,
            config.dim,
            config.history_len,
            config.heads,
            config.dropout,
            demo_cardinalities,
            config.relative_positions,
        )
        self.log_temperature = nn.Parameter(torch.tensor(math.log(config.temperature)))

    def temperature(self) -> torch.Tensor:
        return torch.exp(self.log_temperature).clamp(0.01, 1.0)

    @torch.no_grad()
    def item_vectors(self, batch_size: int = 8192) -> np.ndarray:
        """float32 [n_items, dim] embeddings of the whole catalog."""
        self.eval()
        n = self.item_tower.encoder.genres.shape[0]
        device = self.log_temperature.device
        out = [self.item_tower(torch.arange(s, min(s + batch_size, n), device=device)).float().cpu() for s in range(0, n, batch_size)]
        return torch.cat(out).numpy()

    @torch.no_grad()
    def user_vectors(self, history: np.ndarray, history_rating: np.ndarray, demographics: np.ndarray, batch_size: int = 4096) -> np.ndarray:
        """float32 [n, dim] embeddings of users given their history windows."""
        self.eval()
        device = self.log_temperature.device
        out = []
        for s in range(0, len(history), batch_size):
            sl = slice(s, s + batch_size)
            out.append(
                self.user_tower(
                    torch.as_tensor(history[sl], device=device),
                    torch.as_tensor(history_rating[sl], device=device),
                    torch.as_tensor(demographics[sl], device=device),
                )
                .float()
                .cpu()
            )
        if not out:
            return np.zeros((0, self.config.dim), dtype=np.float32)
        return torch.cat(out).numpy()


def seed_everything(seed: int) -> None:
    """Seeds Python's, numpy's and torch's generators."""
    import random

    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


@dataclass
class TrainResult:
    """What :func:`train_two_tower` returns.

    Attributes:
        model: The best model (by validation Recall@100), or the last one without validation.
        best_epoch: 1-based epoch of the best model.
        history: Per-epoch ``{"epoch", "loss", "val_recall@100", "temperature"}``.
    """

    model: TwoTower
    best_epoch: int
    history: list[dict]


def training_targets(histories: Histories, min_rating: float) -> np.ndarray:
    """Flat positions that serve as targets: at least one earlier item of the same user."""
    user_pos = histories.user_of_position()
    has_past = np.arange(len(histories.items)) > histories.offsets[user_pos]
    return np.flatnonzero(has_past & (histories.ratings >= min_rating))


def training_windows(histories: Histories, history_len: int) -> tuple[np.ndarray, np.ndarray]:
    """Windows that cover every training target once: ``(ends, user_rows)``.

    A user's interactions ``a..b-1`` are cut from the end into windows of ``history_len + 1``
    items ending (exclusively) at ``b, b - L, b - 2L, ...``; window ``[e - L - 1, e)`` feeds its
    first ``L`` items to the user tower and takes the item after each position as that
    position's target, so the targets of consecutive windows, ``[e - L, e)``, tile the user's
    sequence and each interaction but the first is a target exactly once per epoch.

    Args:
        histories: Training interactions grouped by user.
        history_len: ``L``.

    Returns:
        ``ends`` int64 [n_windows] exclusive flat end positions and ``user_rows`` int64
        [n_windows] the user row of each.
    """
    lengths = np.diff(histories.offsets)
    # windows per user: targets (length - 1) split into chunks of L
    per_user = np.where(lengths > 1, -(-(lengths - 1) // history_len), 0)
    user_rows = np.repeat(np.arange(histories.n_users), per_user)
    first = np.cumsum(per_user) - per_user
    chunk = np.arange(len(user_rows)) - np.repeat(first, per_user)
    ends = histories.offsets[user_rows + 1] - chunk * history_len
    return ends.astype(np.int64), user_rows.astype(np.int64)


def recency_weights(histories: Histories, half_life: float) -> np.ndarray | None:
    """float32 [nnz] target weights halving every ``half_life`` share of later interactions.

    Uses only the training interactions' own timestamps (their rank), so nothing after the
    cut-off is read. ``None`` when ``half_life`` is 0 (uniform weights).
    """
    if half_life <= 0 or len(histories.timestamps) == 0:
        return None
    rank = np.argsort(np.argsort(histories.timestamps, kind="stable"), kind="stable")
    after = (len(rank) - 1 - rank) / len(rank)
    return np.power(0.5, after / half_life).astype(np.float32)


def _flat_window(values: np.ndarray, ends: np.ndarray, length: int) -> np.ndarray:
    """``values`` at the target positions ``[end - L, end)`` of each window, [n, L] (clipped)."""
    idx = np.clip(ends[:, None] - length + np.arange(length)[None, :], 0, len(values) - 1)
    return values[idx]


def _sequence_batch(
    histories: Histories, ends: np.ndarray, user_rows: np.ndarray, length: int, min_rating: float
) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Inputs [n, L] (items, ratings), targets [n, L] and the target mask [n, L] of windows."""
    items, ratings = histories.window(ends, histories.offsets[user_rows], length + 1)
    target, target_rating = items[:, 1:], ratings[:, 1:]
    # padding is on the left, so a valid input implies a valid target after it
    mask = (items[:, :-1] >= 0) & (target_rating >= min_rating)
    return items[:, :-1], ratings[:, :-1], target, mask


def _sampled_softmax_loss(
    model: TwoTower, u: torch.Tensor, target: torch.Tensor, sampled: torch.Tensor, log_q: torch.Tensor | None
) -> torch.Tensor:
    """Per-target cross-entropy of each target against the shared sampled negatives, [T].

    ``logsumexp([pos, negatives]) - pos`` with logits ``u . v / temperature`` less ``log_q`` of
    the item (when given); a negative that is the row's own target is masked out. Written as
    few passes over the [T, negatives] matrix as it takes (one matmul with the logQ bias, one
    mask, one logsumexp): on a large catalog this matrix is a step's largest tensor.
    """
    n_pos = len(target)
    uniq, inv = torch.unique(torch.cat([target, sampled]), return_inverse=True)
    v = model.item_tower(uniq)
    v_pos, v_neg = v[inv[:n_pos]], v[inv[n_pos:]]
    u = u / model.temperature()
    pos = (u * v_pos).sum(-1).float()
    if log_q is None:
        neg = (u @ v_neg.T).float()
    else:
        pos = pos - log_q[target]
        neg = torch.addmm(-log_q[sampled].to(u.dtype), u, v_neg.T).float()
    # a sampled negative that is the target itself is not a negative
    neg = neg.masked_fill_(sampled[None, :] == target[:, None], -1e4)
    return torch.logaddexp(pos, torch.logsumexp(neg, dim=1)) - pos


def _clip_and_decay_sparse(dense: list[nn.Parameter], ids: nn.Parameter, max_norm: float, decay: float) -> None:
    """``clip_grad_norm_`` over the dense grads and the sparse id grad together, then AdamW's
    decoupled weight decay (``decay = 1 - lr * weight_decay``) on the id rows the step read."""
    if ids.grad is None:
        return
    grad = ids.grad.coalesce()
    ids.grad = grad
    norms = [p.grad.detach().norm() for p in dense if p.grad is not None] + [grad._values().norm()]
    coef = torch.clamp(max_norm / (torch.linalg.vector_norm(torch.stack(norms)) + 1e-6), max=1.0)
    for p in dense:
        if p.grad is not None:
            p.grad.detach().mul_(coef)
    grad._values().mul_(coef)
    rows = grad._indices()[0]
    with torch.no_grad():
        ids[rows] = ids[rows] * decay


def train_two_tower(
    config: TwoTowerConfig,
    catalog: Catalog,
    stats: ItemStats,
    histories: Histories,
    demographics: Demographics,
    validate: Callable[[TwoTower], float] | None = None,
    epochs: int | None = None,
    progress: bool = True,
    device: torch.device | None = None,
) -> TrainResult:
    """Trains the two-tower model on every position of every user's training sequence.

    Each step reads ``batch_size`` windows of ``history_len + 1`` items (:func:`training_windows`)
    and scores all their positions at once with the causal user tower: position ``t`` (history
    up to ``t``) against the item at ``t + 1``. The softmax runs over the whole catalog when it
    has at most ``config.full_softmax_items`` items (exact, no sampling bias, so popularity is
    learned as it is); larger catalogs use ``negatives`` shared negatives per step, a mix of the step's own
    targets (popularity-distributed) and uniform draws, with the logQ correction of their
    expected counts.

    Args:
        config: Hyper-parameters.
        catalog: Item attributes.
        stats: Item statistics as of the end of the training data (popularity buckets).
        histories: Training interactions grouped by user.
        demographics: User attributes (may be empty).
        validate: Returns validation Recall@100 for a model; drives early stopping.
        epochs: Overrides ``config.epochs`` (used when refitting for a known best epoch).
        progress: Show a progress bar.
        device: Where to train (default: CUDA when present, else the CPU).

    Returns:
        A :class:`TrainResult`.
    """
    seed_everything(config.seed)
    device = device or torch.device("cuda" if torch.cuda.is_available() else "cpu")
    model = TwoTower(config, catalog, stats, demographics.cardinalities).to(device)
    n_epochs = epochs if epochs is not None else config.epochs
    L = config.history_len
    ends, rows = training_windows(histories, L)
    targets = training_targets(histories, config.min_target_rating)
    if len(targets) == 0:
        raise ValueError("no training pairs: every user has a single interaction")
    demo_all = demographics.lookup(histories.user_ids)
    n_items = catalog.n_items
    weights = recency_weights(histories, config.recency_half_life)
    full_softmax = n_items <= config.full_softmax_items
    n_uniform = int(round(config.negatives * config.uniform_share))
    n_batch_neg = config.negatives - n_uniform
    counts = np.bincount(histories.items[targets], minlength=n_items).astype(np.float64)
    p_target = (counts + 1.0) / (counts.sum() + n_items)
    # expected count of each item among a step's sampled negatives (the logQ of Yi et al. 2019)
    log_q = torch.as_tensor(np.log(n_batch_neg * p_target + n_uniform / n_items), dtype=torch.float32, device=device)
    all_items = torch.arange(n_items, device=device)

    id_weight = model.item_tower.encoder.id_emb.weight
    sparse_opt: torch.optim.SparseAdam | None = None
    if model.item_tower.encoder.id_emb.sparse:
        # large catalog: the id table gets a lazy AdamW (SparseAdam + decay of the rows read)
        dense_params = [p for p in model.parameters() if p is not id_weight]
        optimizer = torch.optim.AdamW(dense_params, lr=config.lr, weight_decay=config.weight_decay)
        sparse_opt = torch.optim.SparseAdam([id_weight], lr=config.lr)
    else:
        optimizer = torch.optim.AdamW(model.parameters(), lr=config.lr, weight_decay=config.weight_decay)
    steps_per_epoch = math.ceil(len(ends) / config.batch_size)
    total = max(1, steps_per_epoch * n_epochs)
    warmup = max(1, int(config.warmup_frac * total))

    def lr_lambda(step: int) -> float:
        if step < warmup:
            return (step + 1) / warmup
        return 0.5 * (1.0 + math.cos(math.pi * min(1.0, (step - warmup) / max(1, total - warmup))))

    schedulers = [torch.optim.lr_scheduler.LambdaLR(opt, lr_lambda) for opt in (optimizer, sparse_opt) if opt is not None]
    use_amp = device.type == "cuda"
    scaler = torch.amp.GradScaler("cuda", enabled=use_amp)
    rng = np.random.default_rng(config.seed)
    gen = torch.Generator(device=device).manual_seed(config.seed)
    best_state, best_score, best_epoch, stale = None, -1.0, 0, 0
    log: list[dict] = []
    bar = tqdm(total=n_epochs * steps_per_epoch, desc="two-tower", unit="step", disable=not progress, leave=False)
    for epoch in range(1, n_epochs + 1):
        model.train()
        order = rng.permutation(len(ends))
        losses = []
        for s in range(0, len(order), config.batch_size):
            pick = order[s : s + config.batch_size]
            hist, hist_r, tgt, mask = _sequence_batch(histories, ends[pick], rows[pick], L, config.min_target_rating)
            if not mask.any():
                bar.update(1)
                continue
            hist_r = np.where(rng.random(hist_r.shape) < config.rating_dropout, 0.0, hist_r).astype(np.float32)
            demo = demo_all[rows[pick]] * (rng.random((len(pick), 1)) >= config.demo_dropout)
            mask_t = torch.as_tensor(mask, device=device)
            target = torch.as_tensor(tgt, device=device)[mask_t]
            with torch.autocast(device_type=device.type, enabled=use_amp):
                u = model.user_tower.sequence(
                    torch.as_tensor(hist, device=device),
                    torch.as_tensor(hist_r, device=device),
                    torch.as_tensor(demo, device=device),
                )[mask_t]
                if full_softmax:
                    logits = (u @ model.item_tower(all_items).T).float() / model.temperature()
                    labels = target
                    per_target = None
                else:
                    sampled = torch.cat(
                        [
                            target[torch.randint(len(target), (n_batch_neg,), generator=gen, device=device)],
                            torch.randint(n_items, (n_uniform,), generator=gen, device=device),
                        ]
                    )
                    per_target = _sampled_softmax_loss(model, u, target, sampled, log_q if config.logq else None)
            if weights is None:
                loss = F.cross_entropy(logits, labels) if per_target is None else per_target.mean()
            else:
                w_flat = _flat_window(weights, ends[pick], L)[mask]
                w_t = torch.as_tensor(w_flat, dtype=torch.float32, device=device)
                if per_target is None:
                    per_target = F.cross_entropy(logits, labels, reduction="none")
                loss = (per_target * w_t).sum() / w_t.sum()
            optimizer.zero_grad(set_to_none=True)
            if sparse_opt is None:
                scaler.scale(loss).backward()
                scaler.unscale_(optimizer)
                torch.nn.utils.clip_grad_norm_(model.parameters(), 5.0)
                scaler.step(optimizer)
            else:
                sparse_opt.zero_grad(set_to_none=True)
                scaler.scale(loss).backward()
                scaler.unscale_(optimizer)
                scaler.unscale_(sparse_opt)
                _clip_and_decay_sparse(dense_params, id_weight, 5.0, 1.0 - sparse_opt.param_groups[0]["lr"] * config.weight_decay)
                scaler.step(optimizer)
                scaler.step(sparse_opt)
            scaler.update()
            for scheduler in schedulers:
                scheduler.step()
            losses.append(loss.item())
            bar.update(1)
        entry = {"epoch": epoch, "loss": float(np.mean(losses)), "temperature": model.temperature().item()}
        if validate is not None:
            score = float(validate(model))
            entry["val_recall@100"] = score
            if score > best_score:
                best_score, best_epoch, stale = score, epoch, 0
                best_state = copy.deepcopy(model.state_dict())
            else:
                stale += 1
        else:
            best_epoch = epoch
        log.append(entry)
        bar.set_postfix(loss=f"{entry['loss']:.3f}", val=f"{entry.get('val_recall@100', float('nan')):.4f}")
        if validate is not None and stale >= config.patience:
            break
    bar.close()
    if best_state is not None:
        model.load_state_dict(best_state)
    model.eval()
    return TrainResult(model=model, best_epoch=best_epoch, history=log)


def config_dict(config: TwoTowerConfig) -> dict:
    """The config as a JSON-able dict (for manifests)."""
    return asdict(config)
