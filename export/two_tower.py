"""Two-tower retrieval model: an item tower and a history-reading user tower.

* Item tower: item id embedding + genres + release-year bucket + popularity bucket -> MLP ->
  64-d, L2-normalised.
* User tower: the user's last ``L`` items (each encoded by the *same* item encoder, plus an
  embedding of the rating given and of the recency position) -> one self-attention block ->
  attention pooling, + demographics where known -> MLP -> 64-d, L2-normalised. There is no
  user-id embedding: a user the model never saw is served from a handful of ratings.

Training: InfoNCE over in-batch negatives (Oord et al. 2018; Yi et al. 2019 "Sampling-bias
corrected neural modeling") with a learnable temperature and the logQ correction, which
subtracts ``log q(item)`` from every logit so that popular items are not over-punished for
appearing often as negatives. Warm-up then cosine learning rate; early stopping on
validation Recall@100; automatic mixed precision when CUDA is present; seeded.
"""

from __future__ import annotations

import copy
import math
from dataclasses import asdict, dataclass
from typing import Callable

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from tqdm.auto import tqdm

from export.history import Histories
from export.items import POP_BUCKETS, YEAR_BUCKETS, Catalog, ItemStats
from orchestrator.artifacts import AGE_BUCKETS, Demographics  # noqa: F401 - the codes the tower embeds; re-exported

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
        batch_size: Training batch size (= 1 positive + batch_size-1 in-batch negatives).
        lr: Peak learning rate of AdamW.
        weight_decay: AdamW weight decay.
        warmup_frac: Share of the steps spent in linear warm-up.
        temperature: Initial softmax temperature (learned, clamped to [0.01, 1]).
        logq: Whether to apply the logQ popularity correction.
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
    batch_size: int = 512
    lr: float = 2e-3
    weight_decay: float = 1e-4
    warmup_frac: float = 0.05
    temperature: float = 0.07
    logq: bool = True
    patience: int = 3
    rating_dropout: float = 0.3
    demo_dropout: float = 0.3
    min_target_rating: float = 0.0
    seed: int = 0


class ItemEncoder(nn.Module):
    """Encodes item indices (``-1`` = padding, encoded as zeros) from id and side features."""

    def __init__(self, genre_matrix: np.ndarray, year_bucket: np.ndarray, pop_bucket: np.ndarray, width: int):
        super().__init__()
        n_items, n_genres = genre_matrix.shape
        self.register_buffer("genres", torch.tensor(np.asarray(genre_matrix), dtype=torch.float32))
        self.register_buffer("year_bucket", torch.tensor(np.asarray(year_bucket), dtype=torch.long))
        self.register_buffer("pop_bucket", torch.tensor(np.asarray(pop_bucket), dtype=torch.long))
        self.id_emb = nn.Embedding(n_items, width)
        self.genre_proj = nn.Linear(n_genres, width, bias=False)
        self.year_emb = nn.Embedding(len(YEAR_BUCKETS) + 1, width)
        self.pop_emb = nn.Embedding(POP_BUCKETS, width)
        nn.init.normal_(self.id_emb.weight, std=0.02)

    def forward(self, items: torch.Tensor) -> torch.Tensor:
        valid = items >= 0
        idx = torch.where(valid, items, torch.zeros_like(items))
        x = (
            self.id_emb(idx)
            + self.genre_proj(self.genres[idx])
            + self.year_emb(self.year_bucket[idx])
            + self.pop_emb(self.pop_bucket[idx])
        )
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
    ):
        super().__init__()
        self.encoder = encoder
        self.heads = heads
        self.rating_emb = nn.Embedding(11, width)  # half stars 0.5..5 -> 1..10, 0 unknown
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

    def forward(self, history: torch.Tensor, history_rating: torch.Tensor, demographics: torch.Tensor) -> torch.Tensor:
        batch, length = history.shape
        valid = (history >= 0).to(torch.float32)
        rating_code = torch.clamp(torch.round(history_rating * 2.0), 0, 10).to(torch.long)
        positions = torch.arange(length, device=history.device)
        x = self.encoder(history) + self.rating_emb(rating_code) + self.pos_emb(positions).unsqueeze(0)
        x = x * valid.unsqueeze(-1)
        # one pre-computed additive mask serves the self-attention and the pooling
        neg = (1.0 - valid) * -1e4
        q, k, v = self.qkv(x).chunk(3, dim=-1)
        head_dim = q.shape[-1] // self.heads
        q = q.reshape(batch, length, self.heads, head_dim).transpose(1, 2)
        k = k.reshape(batch, length, self.heads, head_dim).transpose(1, 2)
        v = v.reshape(batch, length, self.heads, head_dim).transpose(1, 2)
        scores = q @ k.transpose(-1, -2) / math.sqrt(head_dim) + neg[:, None, None, :]
        attn = torch.softmax(scores, dim=-1) @ v
        attn = attn.transpose(1, 2).reshape(batch, length, -1)
        x = self.norm1(x + self.drop(self.attn_out(attn)))
        x = self.norm2(x + self.drop(self.ffn(x)))
        w = torch.softmax(self.pool_score(x).squeeze(-1) + neg, dim=-1) * valid
        pooled = (w.unsqueeze(-1) * x).sum(1) / (w.sum(1, keepdim=True) + 1e-6)
        demo = sum(emb(demographics[:, i]) for i, emb in enumerate(self.demo_embs))
        return F.normalize(self.mlp(torch.cat([pooled, demo], dim=-1)), dim=-1)


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
        encoder = ItemEncoder(catalog.genre_matrix, catalog.year_buckets(), stats.pop_buckets(), config.hidden)
        self.item_tower = ItemTower(encoder, config.hidden, config.dim, config.dropout)
        self.user_tower = UserTower(
            encoder, config.hidden, config.dim, config.history_len, config.heads, config.dropout, demo_cardinalities
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
        out = [
            self.item_tower(torch.arange(s, min(s + batch_size, n), device=device)).float().cpu()
            for s in range(0, n, batch_size)
        ]
        return torch.cat(out).numpy()

    @torch.no_grad()
    def user_vectors(
        self, history: np.ndarray, history_rating: np.ndarray, demographics: np.ndarray, batch_size: int = 4096
    ) -> np.ndarray:
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


def train_two_tower(
    config: TwoTowerConfig,
    catalog: Catalog,
    stats: ItemStats,
    histories: Histories,
    demographics: Demographics,
    validate: Callable[[TwoTower], float] | None = None,
    epochs: int | None = None,
    progress: bool = True,
) -> TrainResult:
    """Trains the two-tower model on every (history window -> next item) pair of ``histories``.

    Args:
        config: Hyper-parameters.
        catalog: Item attributes.
        stats: Item statistics as of the end of the training data (popularity buckets).
        histories: Training interactions grouped by user.
        demographics: User attributes (may be empty).
        validate: Returns validation Recall@100 for a model; drives early stopping.
        epochs: Overrides ``config.epochs`` (used when refitting for a known best epoch).
        progress: Show a progress bar.

    Returns:
        A :class:`TrainResult`.
    """
    seed_everything(config.seed)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    model = TwoTower(config, catalog, stats, demographics.cardinalities).to(device)
    n_epochs = epochs if epochs is not None else config.epochs
    targets = training_targets(histories, config.min_target_rating)
    if len(targets) == 0:
        raise ValueError("no training pairs: every user has a single interaction")
    user_pos = histories.user_of_position()
    demo_all = demographics.lookup(histories.user_ids)
    counts = np.bincount(histories.items[targets], minlength=catalog.n_items).astype(np.float64)
    log_q = torch.as_tensor(np.log((counts + 1.0) / (counts.sum() + catalog.n_items)), dtype=torch.float32, device=device)

    optimizer = torch.optim.AdamW(model.parameters(), lr=config.lr, weight_decay=config.weight_decay)
    steps_per_epoch = math.ceil(len(targets) / config.batch_size)
    total = max(1, steps_per_epoch * n_epochs)
    warmup = max(1, int(config.warmup_frac * total))

    def lr_lambda(step: int) -> float:
        if step < warmup:
            return (step + 1) / warmup
        return 0.5 * (1.0 + math.cos(math.pi * min(1.0, (step - warmup) / max(1, total - warmup))))

    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lr_lambda)
    use_amp = device.type == "cuda"
    scaler = torch.amp.GradScaler("cuda", enabled=use_amp)
    rng = np.random.default_rng(config.seed)
    best_state, best_score, best_epoch, stale = None, -1.0, 0, 0
    log: list[dict] = []
    bar = tqdm(total=n_epochs * steps_per_epoch, desc="two-tower", unit="step", disable=not progress, leave=False)
    for epoch in range(1, n_epochs + 1):
        model.train()
        order = rng.permutation(targets)
        losses = []
        for s in range(0, len(order), config.batch_size):
            pos = order[s : s + config.batch_size]
            users = user_pos[pos]
            hist, hist_r = histories.window(pos, histories.offsets[users], config.history_len)
            hist_r = np.where(rng.random(hist_r.shape) < config.rating_dropout, 0.0, hist_r).astype(np.float32)
            demo = demo_all[users] * (rng.random((len(pos), 1)) >= config.demo_dropout)
            target = torch.as_tensor(histories.items[pos], device=device)
            with torch.autocast(device_type=device.type, enabled=use_amp):
                u = model.user_tower(
                    torch.as_tensor(hist, device=device),
                    torch.as_tensor(hist_r, device=device),
                    torch.as_tensor(demo, device=device),
                )
                v = model.item_tower(target)
                logits = (u @ v.T).float() / model.temperature()
            if config.logq:
                logits = logits - log_q[target][None, :]
            # the same movie twice in a batch is not a negative of itself
            same = target[:, None] == target[None, :]
            same.fill_diagonal_(False)
            logits = logits.masked_fill(same, -1e4)
            loss = F.cross_entropy(logits, torch.arange(len(pos), device=device))
            optimizer.zero_grad(set_to_none=True)
            scaler.scale(loss).backward()
            scaler.unscale_(optimizer)
            torch.nn.utils.clip_grad_norm_(model.parameters(), 5.0)
            scaler.step(optimizer)
            scaler.update()
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
