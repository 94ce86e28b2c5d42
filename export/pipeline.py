"""The offline pipeline: data -> split -> two-tower -> ranker -> artifacts.

Reads like the diagram::

    ml = load_movielens(data_dir)                       # validated CSVs
    split = time_split(ml.ratings)                      # train | val | test, one calendar cut
    two-tower on train, early-stopped on val Recall@100
    candidate sources (two-tower ANN, item neighbours, popular lists) merged; budgets on val
    LambdaRank ranker on the merged candidates for val users, labels from val
    two-tower refit on train+val for the best epoch count   (what is served and tested)
    save_artifacts(...)                                  # checkpoints, item table, manifest
    publish(...)                                         # ONNX + configs -> model_repository/N,
                                                         # tuned FAISS bundle -> artifacts/faiss

:func:`run` is that sequence, and the only one: ``recsys train``, ``recsys evaluate`` and
``recsys demo`` call it (``recsys export`` calls its last stage, :func:`publish`), so the
models that are evaluated are exactly the ones that are published and served.
"""

from __future__ import annotations

import hashlib
import json
import platform
import subprocess
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field, replace
from importlib import metadata
from pathlib import Path
from typing import Any

import lightgbm as lgb
import numpy as np
import pandas as pd
import torch
from tqdm.auto import tqdm

from export.candidates import build_tables, choose_budgets, merge_users, user_item_scores, user_source_lists
from export.data import MovieLens, load_movielens
from export.drift_reference import build_reference
from export.features import FEATURE_NAMES, EaseTables, RankerFeatures, cf_item_vectors, ease_tables
from export.history import Histories
from export.items import Catalog, ItemStats, item_stats
from export.ranker import RankerConfig, candidate_features, candidate_labels, train_ranker
from export.retrieval import top_k
from export.split import Split, relevant_items, rolling_splits, time_split
from export.two_tower import Demographics, TrainResult, TwoTower, TwoTowerConfig, train_two_tower
from orchestrator.artifacts import DRIFT_REFERENCE, FAISS_DIR, ITEM_EMBEDDINGS, MANIFEST, exported_from, file_sha256
from orchestrator.candidates import SOURCES, TABLES_FILE, CandidateTables
from orchestrator.contract import RANKER_HISTORY

MANIFEST_VERSION = 1


@dataclass(frozen=True)
class TrainSettings:
    """Everything that shapes a training run.

    Attributes:
        two_tower: Two-tower hyper-parameters.
        ranker: Ranker hyper-parameters.
        val_fraction: Share of interactions in the validation period.
        test_fraction: Share of interactions in the test period.
        refit: Refit the two-tower on train+val for the best epoch count before testing and
            publishing (the baselines are refit the same way).
        neighbours: Item-item neighbours kept per item for the ``item_knn`` source.
        budgets: Per-source shares of the merged candidate set (``orchestrator.candidates.SOURCES``
            order); None = chosen on validation recall (:func:`export.candidates.choose_budgets`).
    """

    two_tower: TwoTowerConfig = field(default_factory=TwoTowerConfig)
    ranker: RankerConfig = field(default_factory=RankerConfig)
    val_fraction: float = 0.1
    test_fraction: float = 0.1
    refit: bool = True
    neighbours: int = 100
    budgets: tuple[float, ...] | None = None


@dataclass(frozen=True)
class Period:
    """What is known at a cut-off: the past interactions, histories and item statistics."""

    cutoff: int
    past: pd.DataFrame
    histories: Histories
    stats: ItemStats
    cf_vectors: np.ndarray
    ease: EaseTables

    @classmethod
    def at(cls, past: pd.DataFrame, catalog: Catalog, cutoff: int) -> Period:
        past = past[past.timestamp < cutoff]
        histories = Histories.from_frame(past, catalog)
        stats = item_stats(past, catalog, cutoff)
        return cls(cutoff, past, histories, stats, cf_item_vectors(histories, catalog.n_items), ease_tables(histories, catalog.n_items))

    def tables(self, catalog: Catalog, settings: TrainSettings) -> CandidateTables:
        """Candidate-source tables from this period's past (default budgets until chosen)."""
        kwargs = {} if settings.budgets is None else {"budgets": settings.budgets}
        return build_tables(self.histories, self.stats, catalog, neighbours=settings.neighbours, **kwargs)


@dataclass
class Fitted:
    """The trained models and the context they were trained in.

    Attributes:
        catalog: Item attributes.
        split: The time split.
        demographics: User attributes.
        val_period: State as of the start of validation (train data only).
        test_period: State as of the start of test (train + val data).
        two_tower_val: Two-tower trained on train, early-stopped on val (ranker candidates).
        two_tower: Two-tower to test and publish (refit on train+val, or the same model).
        ranker: LightGBM LambdaRank booster.
        tables_val: Candidate tables as of validation (train data), ranker training.
        tables: Candidate tables as of test (train + val data), with the budgets chosen on
            validation: what is tested and published.
        budget_trials: The budget search on validation (recall per step).
        seconds: Wall time per stage.
    """

    catalog: Catalog
    split: Split
    demographics: Demographics
    val_period: Period
    test_period: Period
    two_tower_val: TrainResult
    two_tower: TrainResult
    ranker: lgb.Booster
    tables_val: CandidateTables
    tables: CandidateTables
    budget_trials: list[dict]
    seconds: dict[str, float]

    def ranker_features(self, period: Period, model: TwoTower) -> RankerFeatures:
        """The feature module for a period and the two-tower whose item vectors it compares."""
        return RankerFeatures(self.catalog, period.stats, model.item_vectors(), period.cf_vectors, period.ease)


def ranker_queries(val_ratings: pd.DataFrame, histories: Histories) -> np.ndarray:
    """The ranker's training queries: users who rated in the validation period and have a past
    in ``histories`` (sorted ids)."""
    active = np.unique(val_ratings.user_id.to_numpy())
    return active[histories.positions(active) >= 0]


def retrieve(
    model: TwoTower, period: Period, demographics: Demographics, user_ids: np.ndarray, k: int
) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Two-tower top-``k`` for users as of ``period``, excluding what they have seen.

    Returns:
        ``(items, scores, history, history_rating)``: candidates [n, k] and the history windows
        the user tower read [n, L].
    """
    hist, hist_r = period.histories.last(user_ids, model.config.history_len)
    users = model.user_vectors(hist, hist_r, demographics.lookup(user_ids))
    items, scores = top_k(users, model.item_vectors(), k, period.histories.seen(user_ids))
    return items, scores, hist, hist_r


@dataclass
class Candidates:
    """Merged candidate sets of many users (rows aligned with the users asked for).

    Attributes:
        items: int64 [n_users, n] merged candidates in merge order, -1 padded.
        scores: float32 [n_users, n] two-tower inner products (-inf for padding).
        sources: float32 [n_users, n, S] rank in each source, -1 absent (``candidate_sources``).
        ann: int64 [n_users, n] the two-tower's own top-n.
        history: int64 [n_users, H] the windows the features read (``RANKER_HISTORY``; the user
            tower and the item-to-item source read the last ``L``).
        history_rating: float32 [n_users, H].
        lists: Per user, every source's list (for budget search and per-source recall).
        user_vectors: float32 [n_users, d] the user tower's output.
        item_vectors: float32 [n_items, d].
    """

    items: np.ndarray
    scores: np.ndarray
    sources: np.ndarray
    ann: np.ndarray
    history: np.ndarray
    history_rating: np.ndarray
    lists: list[list[np.ndarray]]
    user_vectors: np.ndarray
    item_vectors: np.ndarray

    def with_budgets(self, budgets: np.ndarray, n: int) -> Candidates:
        """The same source lists merged with other budgets."""
        items, sources = merge_users(self.lists, budgets, n)
        scores = user_item_scores(self.user_vectors, self.item_vectors, items)
        return replace(self, items=items, scores=scores, sources=sources)


def merged_candidates(
    model: TwoTower,
    period: Period,
    demographics: Demographics,
    tables: CandidateTables,
    user_ids: np.ndarray,
    n: int,
    progress: bool = False,
) -> Candidates:
    """Every source for users as of ``period`` (seen items excluded), merged as the orchestrator does."""
    long_hist, long_r = period.histories.last(user_ids, RANKER_HISTORY)
    L = model.config.history_len
    hist, hist_r = long_hist[:, -L:], long_r[:, -L:]  # the same cut as history_windows(..., L)
    users = model.user_vectors(hist, hist_r, demographics.lookup(user_ids))
    item_vectors = model.item_vectors()
    seen = period.histories.seen(user_ids)
    ann, _ = top_k(users, item_vectors, n, seen)
    lists = user_source_lists(tables, ann, hist, seen, n, progress=progress)
    items, sources = merge_users(lists, tables.budgets, n)
    scores = user_item_scores(users, item_vectors, items)
    return Candidates(items, scores, sources, ann, long_hist, long_r, lists, users, item_vectors)


def users_with_history(relevant: dict[int, np.ndarray], period: Period) -> np.ndarray:
    """Users with relevant items in the evaluated period and some history before it."""
    users = np.fromiter(relevant.keys(), dtype=np.int64, count=len(relevant))
    return users[period.histories.positions(users) >= 0]


def fit_models(ml: MovieLens, settings: TrainSettings, progress: bool = True, split: Split | None = None) -> Fitted:
    """Trains the two-tower and the ranker on a time split of ``ml``.

    Args:
        ml: Loaded MovieLens data.
        settings: Hyper-parameters.
        progress: Show progress bars.
        split: The split to train on (a rolling-origin window); default: the single time
            split of ``settings``' fractions. Only ``split``'s rows are read.

    Returns:
        The :class:`Fitted` models.
    """
    seconds: dict[str, float] = {}
    t0 = time.perf_counter()
    catalog = Catalog.from_movies(ml.movies, ml.genres, ml.genre_matrix)
    if split is None:
        split = time_split(ml.ratings, settings.val_fraction, settings.test_fraction)
    demographics = Demographics.from_users(ml.users)
    val_period = Period.at(split.train, catalog, split.t_val)
    test_period = Period.at(split.train_val, catalog, split.t_test)
    seconds["split"] = time.perf_counter() - t0

    index = catalog.index_of()
    rel_val = relevant_items(split.val, index)
    val_users = users_with_history(rel_val, val_period)
    if len(val_users) == 0:
        raise ValueError("no validation user has both history and a relevant item: data set too small for this split")

    def validate(model: TwoTower) -> float:
        items, _, _, _ = retrieve(model, val_period, demographics, val_users, 100)
        hits = [np.isin(rel_val[u], row).sum() / len(rel_val[u]) for u, row in zip(val_users, items)]
        return float(np.mean(hits))

    t0 = time.perf_counter()
    tt_val = train_two_tower(settings.two_tower, catalog, val_period.stats, val_period.histories, demographics, validate, progress=progress)
    seconds["two_tower"] = time.perf_counter() - t0

    # candidate sources: tables from the past only; budgets by the merged set's recall on
    # validation users (the ranker's training users, never the test period)
    t0 = time.perf_counter()
    n_cand = settings.ranker.candidates
    tables_val = val_period.tables(catalog, settings)
    active = ranker_queries(split.val, val_period.histories)
    cands = merged_candidates(tt_val.model, val_period, demographics, tables_val, active, n_cand, progress)
    trials: list[dict] = []
    if settings.budgets is None:
        rel_active = [rel_val.get(int(u), np.empty(0, np.int64)) for u in active]
        has_rel = np.array([len(r) > 0 for r in rel_active])
        budgets, trials = choose_budgets(
            [cands.lists[i] for i in np.flatnonzero(has_rel)], [rel_active[i] for i in np.flatnonzero(has_rel)], n_cand
        )
        tables_val = tables_val.with_budgets(budgets)
        cands = cands.with_budgets(tables_val.budgets, n_cand)
    seconds["candidates"] = time.perf_counter() - t0

    # ranker: merged candidates for everybody active in validation who has a past, labels from validation
    t0 = time.perf_counter()
    feats = candidate_features(
        RankerFeatures(catalog, val_period.stats, tt_val.model.item_vectors(), val_period.cf_vectors, val_period.ease),
        cands.history,
        cands.history_rating,
        cands.items,
        cands.scores,
        cands.sources,
    )
    labels = candidate_labels(active, cands.items, split.val, catalog)
    booster = train_ranker(feats, labels, settings.ranker)
    seconds["ranker"] = time.perf_counter() - t0

    t0 = time.perf_counter()
    if settings.refit:
        tt_test = train_two_tower(
            settings.two_tower,
            catalog,
            test_period.stats,
            test_period.histories,
            demographics,
            None,
            epochs=tt_val.best_epoch,
            progress=progress,
        )
    else:
        tt_test = tt_val
    seconds["two_tower_refit"] = time.perf_counter() - t0
    tables = test_period.tables(catalog, settings).with_budgets(tables_val.budgets)
    return Fitted(catalog, split, demographics, val_period, test_period, tt_val, tt_test, booster, tables_val, tables, trials, seconds)


def git_sha() -> str | None:
    """The current commit of the project checkout, if any."""
    try:
        out = subprocess.run(["git", "rev-parse", "HEAD"], cwd=Path(__file__).parent, capture_output=True, text=True, timeout=5)
    except (OSError, subprocess.SubprocessError):
        return None
    return out.stdout.strip() or None


def data_hash(data_dir: str | Path) -> str:
    """sha256 over the bytes of the data set's CSV files (sorted by name)."""
    digest = hashlib.sha256()
    for path in sorted(Path(data_dir).glob("*.csv")):
        digest.update(path.name.encode())
        with path.open("rb") as fh:
            for block in iter(lambda: fh.read(1 << 22), b""):
                digest.update(block)
    return digest.hexdigest()


def package_versions() -> dict[str, str]:
    """Versions of the packages that shape the artifacts."""
    names = ("numpy", "torch", "lightgbm", "onnx", "onnxruntime", "hummingbird-ml", "faiss-cpu", "pandas", "polars")
    out = {"python": platform.python_version()}
    for name in names:
        try:
            out[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            pass
    return out


def item_table(fitted: Fitted) -> pd.DataFrame:
    """The item table the orchestrator serves from: ids, titles, genres, year, popularity, mean rating."""
    cat, stats = fitted.catalog, fitted.test_period.stats
    return pd.DataFrame(
        {
            "item": np.arange(cat.n_items, dtype=np.int64),
            "movie_id": cat.movie_ids,
            "title": cat.titles.astype(str),
            "genres": cat.genre_strings.astype(str),
            "year": cat.years,
            "popularity": stats.count.astype(np.int64),
            "recent_popularity": stats.recent_count.astype(np.int64),
            "mean_rating": stats.mean_rating,
        }
    )


def save_artifacts(fitted: Fitted, ml: MovieLens, data_dir: str | Path, out_dir: str | Path, settings: TrainSettings) -> dict:
    """Writes checkpoints, the item table, embeddings and ``manifest.json`` into ``out_dir``.

    Returns:
        The manifest.
    """
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    model = fitted.two_tower.model
    torch.save(
        {
            "config": asdict(model.config),
            "demo_cardinalities": fitted.demographics.cardinalities,
            "n_items": fitted.catalog.n_items,
            "n_genres": len(fitted.catalog.genres),
            "state_dict": model.state_dict(),
        },
        out / "two_tower.pt",
    )
    vectors = model.item_vectors()
    np.save(out / "item_embeddings.npy", vectors)
    features = fitted.ranker_features(fitted.test_period, model)
    torch.save(features.state_dict(), out / "ranker_features.pt")
    fitted.ranker.save_model(str(out / "ranker.lgb"))
    fitted.tables.save(out / TABLES_FILE)
    items = item_table(fitted)
    items.to_parquet(out / "items.parquet", index=False)
    # what serving should see: the served pipeline on every user's final history (export/drift_reference.py)
    build_reference(items, vectors, model, features, fitted.ranker, fitted.demographics, ml.ratings, fitted.tables).save(
        out / DRIFT_REFERENCE
    )
    ml.ratings.to_parquet(out / "interactions.parquet", index=False)
    (out / "demographics.json").write_text(json.dumps({"occupations": fitted.demographics.occupations}, indent=2))
    manifest = {
        "manifest_version": MANIFEST_VERSION,
        "created_at": pd.Timestamp.now(tz="UTC").isoformat(),
        "git_sha": git_sha(),
        "data": {
            "path": str(data_dir),
            "sha256": data_hash(data_dir),
            "ratings": int(ml.n_ratings),
            "items": int(fitted.catalog.n_items),
            "report": {"rows_read": ml.report.rows_read, "dropped": ml.report.dropped},
        },
        "split": fitted.split.protocol(),
        "two_tower": {
            "config": asdict(model.config),
            "best_epoch": fitted.two_tower_val.best_epoch,
            "training_log": fitted.two_tower_val.history,
            "refit": settings.refit,
        },
        "ranker": {"config": asdict(settings.ranker), "feature_names": list(FEATURE_NAMES), "trees": fitted.ranker.num_trees()},
        "candidates": {
            "sources": list(SOURCES),
            "budgets": [round(float(b), 4) for b in fitted.tables.budgets],
            "neighbours": int(fitted.tables.neighbours.shape[1]),
            "budget_search": fitted.budget_trials,
        },
        "seconds": {k: round(v, 2) for k, v in fitted.seconds.items()},
        "packages": package_versions(),
        "files": sorted(p.name for p in out.iterdir()),
    }
    manifest["files"] = sorted(set(manifest["files"]) | {"manifest.json"})
    (out / "manifest.json").write_text(json.dumps(manifest, indent=2))
    return manifest


def train(data_dir: str | Path, out_dir: str | Path, settings: TrainSettings | None = None, progress: bool = True) -> dict:
    """``recsys train``: load, split, fit both stages, write the artifacts. Returns the manifest."""
    return run(data_dir, out_dir, None, settings, progress)["manifest"]


# ------------------------------------------------------------------- the one composition


def run(
    data_dir: str | Path,
    artifacts_dir: str | Path | None,
    repo: str | Path | None = None,
    settings: TrainSettings | None = None,
    progress: bool = True,
    inspect: Callable[[MovieLens, Fitted], None] | None = None,
    windows: int = 1,
) -> dict[str, Any]:
    """The offline path, in the order of the diagram: load -> split -> fit -> save -> publish.

    Every command runs this one function (``recsys train``: up to save; ``recsys evaluate``:
    with ``inspect``; ``recsys demo``: all of it), so what is evaluated, saved and served are
    the same models. ``recsys export`` runs its last stage, :func:`publish`.

    Args:
        data_dir: MovieLens CSV folder.
        artifacts_dir: Where the artifacts are written (None: not saved, nor published).
        repo: Model repository to publish into (None: stop after saving).
        settings: Training settings.
        progress: Show progress bars.
        inspect: Called with the data and each window's fitted models before saving (evaluation).
        windows: Rolling-origin windows (:func:`export.split.rolling_splits`), oldest first;
            models are fitted per window and only the latest window's are saved and published
            (with one window, the single time split of ``recsys train``).

    Returns:
        ``{"ml": the loaded data, "fitted": the latest window's models, "manifest": ... or None,
        "published": ... or None}``.
    """
    settings = settings or TrainSettings()
    ml = load_movielens(data_dir, progress=progress)
    splits = rolling_splits(ml.ratings, windows, settings.val_fraction, settings.test_fraction)
    fitted: Fitted | None = None
    for split in tqdm(splits, desc="windows", unit="window", disable=not progress or len(splits) == 1):
        fitted = None  # only the latest window's models are kept: free the previous ones first
        fitted = fit_models(ml, settings, progress=progress, split=split)  # two-tower, ranker, refit
        if inspect is not None:
            inspect(ml, fitted)
    assert fitted is not None
    manifest = save_artifacts(fitted, ml, data_dir, artifacts_dir, settings) if artifacts_dir is not None else None
    published = publish(artifacts_dir, repo, progress=progress) if artifacts_dir is not None and repo is not None else None
    return {"ml": ml, "fitted": fitted, "manifest": manifest, "published": published}


def publish(
    artifacts_dir: str | Path,
    repo: str | Path,
    *,
    tree_implementation: str = "auto",
    write_configs: bool = False,
    repository: bool = True,
    index: bool = True,
    progress: bool = True,
) -> dict[str, Any]:
    """The last offline stage: the ONNX graphs into ``repo`` as version N+1, the tuned FAISS bundle into ``artifacts/faiss``.

    The index lives under the artifacts, outside the Triton repository (Triton takes every
    folder of its repository for a model).

    Args:
        artifacts_dir: Folder written by :func:`run` / ``recsys train``.
        repo: Model repository.
        tree_implementation: Hummingbird strategy ("auto": measured).
        write_configs: Regenerate the checked-in configs from the artifacts' shapes.
        repository: Export the graphs (False: the repository is current).
        index: Build, tune and write the FAISS bundle (False: keep the one there).
        progress: Show progress bars.

    Returns:
        ``{"repository": export summary or None, "faiss": index report or None}``.
    """
    from export.faiss_index import build_from_artifacts
    from export.onnx_export import export_repository  # imports this module: imported here

    summary = (
        export_repository(artifacts_dir, repo, tree_implementation=tree_implementation, write_configs=write_configs) if repository else None
    )
    report = build_from_artifacts(artifacts_dir, progress=progress, threads=1) if index else None
    return {"repository": summary, "faiss": report}


def index_is_current(artifacts_dir: str | Path) -> bool:
    """Whether ``artifacts/faiss`` holds a bundle built from the current item embeddings."""
    art = Path(artifacts_dir)
    meta_path = art / FAISS_DIR / "index.json"
    if not meta_path.is_file() or not (art / ITEM_EMBEDDINGS).is_file():
        return False
    recorded = json.loads(meta_path.read_text()).get("vectors", {}).get("sha256")
    return recorded == file_sha256(art / ITEM_EMBEDDINGS)


def prepare_serving(data_dir: str | Path, artifacts_dir: str | Path, repo: str | Path, progress: bool = True) -> dict[str, bool]:
    """What ``recsys demo`` needs before serving: trains when there is no manifest, publishes what is stale.

    Returns:
        ``{"trained": ..., "exported": ..., "indexed": ...}``: which stages ran.
    """
    art, repo = Path(artifacts_dir), Path(repo)
    if not (art / MANIFEST).is_file():
        run(data_dir, art, repo, progress=progress)
        return {"trained": True, "exported": True, "indexed": True}
    stale_repo, stale_index = not exported_from(art, repo), not index_is_current(art)
    if stale_repo or stale_index:
        publish(art, repo, repository=stale_repo, index=stale_index, progress=progress)
    return {"trained": False, "exported": stale_repo, "indexed": stale_index}
