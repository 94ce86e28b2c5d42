"""The offline pipeline's stages on ML-32M-shaped data: time per stage, peak memory, targets.

    python -m benchmarks.offline_scale --data /tmp/ml32m-synth [--quick] [--out FILE]

(``recsys data synth --out /tmp/ml32m-synth`` writes the data: 32,000,204 ratings, 87,585
movies, 200,948 users.) Stages, each the project's own code (``export/``), timed separately:

1. ``load``: :func:`export.data.load_movielens`: read and validate the CSVs.
2. ``split``: :func:`export.split.time_split`, the global time split.
3. ``prepare``: what :func:`export.pipeline.fit_models` builds before training: the catalog,
   demographics, the validation-time :class:`export.pipeline.Period` (histories, item
   statistics, CF vectors), the validation users, and (full mode) the test-time period too,
   which ``fit_models`` also holds in memory.
4. ``two_tower``: **bounded, then extrapolated.** A full epoch is ~25M targets in ~0.7M
   windows of ``history_len + 1`` items (a step reads ``batch_size`` windows and trains every
   position of each, :func:`export.two_tower.training_windows`) and does not fit a benchmark
   run on 2 cores, so :func:`export.two_tower.train_two_tower` runs one epoch over a random
   subset of users whose windows make ``steps`` batches, with the full catalog (the item
   tower's embedding table, the sampled negatives and AdamW state are full size, so a step
   costs what it costs in the full run). Throughput (targets/s) x the full epoch's targets =
   the extrapolated epoch. The per-epoch validation pass of ``fit_models`` (exact
   top-100 for every validation user) is timed on ``val_users_timed`` users and extrapolated
   the same way; the epoch estimate is the sum.
5. ``ranker``: **bounded.** LambdaRank on ``ranker_users`` validation users x ``candidates``
   two-tower candidates (retrieval, features, labels and training timed separately), with
   the bounded two-tower of stage 4 providing the candidates. Users are those
   ``fit_models`` would take (active in validation, with a history); where there are fewer
   than ``ranker_users`` (323 on the synthetic ML-32M data) all are used, and the training
   time is also extrapolated, linearly in rows, to ``ranker_users x candidates`` (labelled).
6. ``faiss``: :func:`export.faiss_index.build_indexes` over the 87,585 item vectors of that
   two-tower (every kind, tuned, as ``recsys export`` does).

``--quick`` loads and splits the full data (the load target is still measured), counts the
full epoch's targets, then runs the other stages on 10 % of the users: under a minute, and
its figures other than load and split are indicative only.

Peak RSS is ``getrusage(RUSAGE_SELF).ru_maxrss`` after each stage (monotone: the stage that
raises it is the one that set it). Targets (issue #5): load <= 2 min, one two-tower epoch
<= 15 min, peak RSS <= 12 GiB; each verdict says whether it rests on a measured or an
extrapolated figure.
"""

from __future__ import annotations

import argparse
import gc
import sys
import time
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import torch

from benchmarks.common import GIB, REPORTS, LoadWatch, conditions, conditions_line, log, markdown_table, peak_rss_bytes, write_json
from export.history import Histories

LOAD_TARGET_S = 120.0
EPOCH_TARGET_S = 15 * 60.0
PEAK_RSS_TARGET_GIB = 12.0


@dataclass(frozen=True)
class OfflineScaleSettings:
    """What one run measures.

    Attributes:
        steps: Two-tower training steps actually run (the epoch is extrapolated from them).
        batch_size: Two-tower windows per step (the default config's).
        val_users_timed: Validation users whose retrieval is timed (extrapolated to all).
        ranker_users: Validation users whose candidates train the ranker.
        candidates: Candidates per ranker user.
        ranker_trees: Boosting rounds (the default config's 150; tests use fewer).
        faiss_kinds: Index kinds built over the 87,585 item vectors.
        faiss_threads: OpenMP threads for the index build (1, as ``recsys export`` builds).
        test_period: Also build the test-time period, as ``fit_models`` does (memory).
        torch_threads: torch intra-op threads. 1 by default: on the shared 2-core machine a
            two-tower step measured 0.22 s on one thread and 1.5 s on two (load average ~5;
            spinning intra-op threads wait for a core that another process holds).
        user_fraction: Run every stage after ``split`` on this random share of the users
            (quick mode: the load target is still measured on the full file; the other
            figures are then indicative only and labelled so).
        seed: User sampling seed.
    """

    steps: int = 100
    batch_size: int = 32
    val_users_timed: int = 2000
    ranker_users: int = 5000
    candidates: int = 200
    ranker_trees: int = 150
    faiss_kinds: tuple[str, ...] = ("flat", "ivf_flat", "ivf_pq", "hnsw")
    faiss_threads: int = 1
    test_period: bool = True
    torch_threads: int = 1
    user_fraction: float | None = None
    seed: int = 0

    @classmethod
    def quick(cls) -> OfflineScaleSettings:
        """Under a minute on 32M ratings: the full load, then 10 % of the users, 5 steps, 30 trees."""
        return cls(
            steps=5,
            val_users_timed=100,
            ranker_users=300,
            candidates=100,
            ranker_trees=30,
            faiss_kinds=("flat", "ivf_flat"),
            test_period=False,
            user_fraction=0.1,
        )


def subset_histories(histories: Histories, positions: np.ndarray) -> Histories:
    """The histories of the users at ``positions`` (rows of ``histories``), same layout."""
    positions = np.sort(positions)
    starts, ends = histories.offsets[positions], histories.offsets[positions + 1]
    lengths = ends - starts
    idx = np.concatenate([np.arange(s, e) for s, e in zip(starts, ends)]) if len(positions) else np.empty(0, np.int64)
    offsets = np.concatenate([[0], np.cumsum(lengths)]).astype(np.int64)
    return Histories(histories.user_ids[positions], offsets, histories.items[idx], histories.ratings[idx], histories.timestamps[idx])


def sample_users(split: Any, fraction: float, seed: int) -> Any:
    """The same time split restricted to a random ``fraction`` of the users (cut points kept)."""
    from export.split import Split

    ids = pd.unique(pd.concat([split.train.user_id, split.val.user_id, split.test.user_id]))
    keep = np.random.default_rng(seed).choice(ids, size=max(1, int(len(ids) * fraction)), replace=False)

    def cut(frame: pd.DataFrame) -> pd.DataFrame:
        return frame[frame.user_id.isin(keep)].reset_index(drop=True)

    return Split(train=cut(split.train), val=cut(split.val), test=cut(split.test), t_val=split.t_val, t_test=split.t_test)


def windows_per_user(lengths: np.ndarray, history_len: int) -> np.ndarray:
    """Training windows of users with ``lengths`` interactions (as :func:`training_windows` cuts)."""
    lengths = np.asarray(lengths, dtype=np.int64)
    return np.where(lengths > 1, -(-(lengths - 1) // history_len), 0)


def users_for_windows(histories: Histories, history_len: int, wanted: int, seed: int) -> np.ndarray:
    """Random user rows whose training windows add up to at least ``wanted`` (or all users)."""
    per_user = windows_per_user(np.diff(histories.offsets), history_len)
    order = np.random.default_rng(seed).permutation(histories.n_users)
    cum = np.cumsum(per_user[order])
    cut = int(np.searchsorted(cum, wanted)) + 1
    return order[: min(cut, len(order))]


class Stages:
    """Wall time and peak RSS after each named stage."""

    def __init__(self) -> None:
        self.records: dict[str, dict[str, float]] = {}

    def run(self, name: str, fn: Any, *args: Any, **kwargs: Any) -> Any:
        """Calls ``fn(*args, **kwargs)`` as stage ``name`` and returns its result."""
        log(f"stage {name}")
        t0 = time.perf_counter()
        out = fn(*args, **kwargs)
        self.records[name] = {"seconds": round(time.perf_counter() - t0, 2), "peak_rss_gib_after": round(peak_rss_bytes() / GIB, 2)}
        return out


def run_benchmark(data: str | Path, settings: OfflineScaleSettings) -> dict[str, Any]:
    """Runs every stage on ``data``; returns the report (nothing printed)."""
    from export.data import load_movielens
    from export.faiss_index import build_indexes
    from export.features import RankerFeatures
    from export.items import Catalog
    from export.pipeline import Period, TrainSettings, merged_candidates, ranker_queries, retrieve, users_with_history
    from export.ranker import RankerConfig, candidate_features, candidate_labels, train_ranker
    from export.split import relevant_items, time_split
    from export.two_tower import Demographics, TwoTowerConfig, train_two_tower, training_targets, training_windows

    torch.set_num_threads(settings.torch_threads)
    stages = Stages()
    tt_config = replace(TwoTowerConfig(), batch_size=settings.batch_size, epochs=1)
    out: dict[str, Any] = {}
    with LoadWatch() as load:
        ml = stages.run("load", load_movielens, data, progress=False)
        out["data"] = {
            "path": str(data),
            "ratings": int(ml.n_ratings),
            "movies": int(len(ml.movies)),
            "users": int(ml.ratings.user_id.nunique()),
            "dropped": ml.report.dropped,
        }
        split = stages.run("split", time_split, ml.ratings)
        full_targets: int | None = None
        if settings.user_fraction is not None:
            # quick: count the full epoch's targets first (every training interaction but each
            # user's first: training_targets with min_target_rating 0), then keep a user sample
            full_targets = int(len(split.train) - split.train.user_id.nunique())
            full_windows = int(windows_per_user(split.train.user_id.value_counts().to_numpy(), tt_config.history_len).sum())
            split = sample_users(split, settings.user_fraction, settings.seed)
            # drop the full frame so memory, too, reflects the sample
            ml = replace(ml, ratings=pd.concat([split.train, split.val, split.test], ignore_index=True))
            out["data"]["sampled_after_split"] = {"user_fraction": settings.user_fraction, "ratings": int(len(ml.ratings))}

        def prepare() -> tuple:
            catalog = Catalog.from_movies(ml.movies, ml.genres, ml.genre_matrix)
            demographics = Demographics.from_users(ml.users)
            val_period = Period.at(split.train, catalog, split.t_val)
            test_period = Period.at(split.train_val, catalog, split.t_test) if settings.test_period else None
            rel_val = relevant_items(split.val, catalog.index_of())
            val_users = users_with_history(rel_val, val_period)
            return catalog, demographics, val_period, test_period, val_users

        # test_period is never read: it is kept alive, as fit_models keeps it, so its memory counts
        catalog, demographics, val_period, test_period, val_users = stages.run("prepare", prepare)
        histories = val_period.histories

        # -- two-tower: a bounded epoch over a user subset, extrapolated to the full epoch
        if full_targets is None or tt_config.min_target_rating > 0:
            full_targets = len(training_targets(histories, tt_config.min_target_rating))
            full_windows = len(training_windows(histories, tt_config.history_len)[0])
        rows = users_for_windows(histories, tt_config.history_len, settings.steps * settings.batch_size, settings.seed)
        sub = subset_histories(histories, rows)
        sub_targets = len(training_targets(sub, tt_config.min_target_rating))
        sub_windows = len(training_windows(sub, tt_config.history_len)[0])
        result = stages.run(
            "two_tower_bounded", train_two_tower, tt_config, catalog, val_period.stats, sub, demographics, None, progress=False
        )
        train_s = stages.records["two_tower_bounded"]["seconds"]
        steps_run = -(-sub_windows // settings.batch_size)
        per_target = train_s / max(1, sub_targets)
        timed_users = np.random.default_rng(settings.seed).choice(
            val_users, size=min(settings.val_users_timed, len(val_users)), replace=False
        )
        stages.run("validation_bounded", retrieve, result.model, val_period, demographics, timed_users, 100)
        val_s = stages.records["validation_bounded"]["seconds"]
        # quick mode sees a user sample: scale its validation users back up to the full data
        val_users_full = len(val_users) / (settings.user_fraction or 1.0)
        val_full_s = val_s * val_users_full / max(1, len(timed_users))
        epoch_train_s = per_target * full_targets
        out["two_tower"] = {
            "basis": "extrapolated",
            "config": asdict(tt_config),
            "torch_threads": settings.torch_threads,
            "device": "cpu",
            "measured": {
                "users": int(len(rows)),
                "targets": int(sub_targets),
                "windows": int(sub_windows),
                "steps": int(steps_run),
                "seconds": train_s,
                "targets_per_s": round(sub_targets / max(train_s, 1e-9), 1),
                "ms_per_step": round(1e3 * train_s / max(1, steps_run), 1),
                "validation_users": int(len(timed_users)),
                "validation_seconds": val_s,
            },
            "full_epoch": {
                "targets": int(full_targets),
                "windows": int(full_windows),
                "steps": int(-(-full_windows // settings.batch_size)),
                "train_seconds_extrapolated": round(epoch_train_s, 1),
                "validation_users": int(round(val_users_full)),
                "validation_seconds_extrapolated": round(val_full_s, 1),
                "epoch_seconds_extrapolated": round(epoch_train_s + val_full_s, 1),
            },
        }
        del sub
        gc.collect()

        # -- ranker: bounded number of validation users x candidates
        active = ranker_queries(split.val, histories)
        users = np.sort(
            np.random.default_rng(settings.seed + 1).choice(active, size=min(settings.ranker_users, len(active)), replace=False)
        )
        model = result.model
        tables = stages.run("candidate_tables", val_period.tables, catalog, TrainSettings())
        cands = stages.run("ranker_retrieval", merged_candidates, model, val_period, demographics, tables, users, settings.candidates)
        cand = cands.items
        features = RankerFeatures(catalog, val_period.stats, model.item_vectors(), val_period.cf_vectors, val_period.ease)
        feats = stages.run(
            "ranker_features", candidate_features, features, cands.history, cands.history_rating, cand, cands.scores, cands.sources
        )
        labels = stages.run("ranker_labels", candidate_labels, users, cand, split.val, catalog)
        rconfig = RankerConfig(candidates=settings.candidates, n_estimators=settings.ranker_trees)
        booster = stages.run("ranker_train", train_ranker, feats, labels, rconfig)
        ranker_train_s = stages.records["ranker_train"]["seconds"]
        wanted_rows = settings.ranker_users * settings.candidates
        if len(users) < settings.ranker_users:
            basis = (
                f"all {len(users):,} validation users with a history (fit_models' rule), fewer than the "
                f"{settings.ranker_users:,} asked for, x {settings.candidates} candidates"
            )
        else:
            basis = f"bounded: {len(users):,} of {len(active):,} validation users with a history x {settings.candidates} candidates"
        out["ranker"] = {
            "basis": basis,
            "train_rows_per_s": round(feats.shape[0] / max(ranker_train_s, 1e-9), 1),
            # LightGBM's cost per tree is ~linear in rows at a fixed tree count: a labelled estimate
            "train_seconds_extrapolated_to_requested_rows": None
            if len(users) >= settings.ranker_users or settings.user_fraction is not None
            else {
                "rows": wanted_rows,
                "seconds": round(ranker_train_s * wanted_rows / max(1, feats.shape[0]), 1),
                "basis": "extrapolated, linear in rows",
            },
            "config": asdict(rconfig),
            "users": int(len(users)),
            "rows": int(feats.shape[0]),
            "queries_with_a_positive": int((labels.max(axis=1) > 0).sum()),
            "trees": int(booster.num_trees()),
            "candidates_from": f"the bounded two-tower ({steps_run} steps), not a fully trained one",
            "seconds": {k: stages.records[f"ranker_{k}"]["seconds"] for k in ("retrieval", "features", "labels", "train")},
        }
        del feats, labels, cand, cands
        gc.collect()

        # -- FAISS over the catalog's item vectors
        vectors = model.item_vectors()
        indexes = stages.run("faiss_build", build_indexes, vectors, settings.faiss_kinds, 0, threads=settings.faiss_threads)
        out["faiss"] = {
            "n": int(vectors.shape[0]),
            "dim": int(vectors.shape[1]),
            "kinds": list(settings.faiss_kinds),
            "build_seconds": {k: round(v, 2) for k, v in indexes.build_seconds.items()},
            "tune_seconds": {k: round(v, 2) for k, v in indexes.tune_seconds.items()},
            "total_seconds": stages.records["faiss_build"]["seconds"],
            "vectors": "item tower of the bounded two-tower",
            "build_threads": settings.faiss_threads,
        }
    peak = peak_rss_bytes() / GIB
    load_split_s = stages.records["load"]["seconds"] + stages.records["split"]["seconds"]
    epoch_s = out["two_tower"]["full_epoch"]["epoch_seconds_extrapolated"]
    out["targets"] = [
        {
            "name": "load + validate + split",
            "target": f"<= {LOAD_TARGET_S:.0f} s",
            "value": round(load_split_s, 1),
            "unit": "s",
            "met": load_split_s <= LOAD_TARGET_S,
            "basis": "measured",
        },
        {
            "name": "one two-tower epoch (train steps + validation pass)",
            "target": f"<= {EPOCH_TARGET_S:.0f} s",
            "value": epoch_s,
            "unit": "s",
            "met": epoch_s <= EPOCH_TARGET_S,
            "basis": f"extrapolated from {steps_run} steps and {len(timed_users):,} validation users"
            + ("" if settings.user_fraction is None else f" (quick: validation users of a {settings.user_fraction:.0%} user sample)"),
        },
        {
            "name": "peak RSS",
            "target": f"<= {PEAK_RSS_TARGET_GIB:.0f} GiB",
            "value": round(peak, 2),
            "unit": "GiB",
            "met": peak <= PEAK_RSS_TARGET_GIB,
            "basis": "measured over this run (full data, both periods)"
            if settings.test_period
            else "measured over this run (quick: without the test-time period fit_models also holds)",
        },
    ]
    out["stages"] = stages.records
    out["peak_rss_gib"] = round(peak, 2)
    return {
        "benchmark": "offline_scale",
        "conditions": conditions(load_average=load.record(), settings=asdict(settings), torch_threads=settings.torch_threads),
        **out,
    }


def table(report: dict[str, Any]) -> str:
    """Stage times and the targets as two Markdown tables."""
    stage_rows = [(name, r["seconds"], r["peak_rss_gib_after"]) for name, r in report["stages"].items()]
    tt = report["two_tower"]
    lines = [
        markdown_table(("stage", "seconds", "peak RSS GiB after"), stage_rows),
        "",
        f"two-tower: {tt['measured']['steps']} steps x {tt['config']['batch_size']} windows ({tt['measured']['targets']:,} targets) "
        f"in {tt['measured']['seconds']} s = {tt['measured']['targets_per_s']:,} targets/s, {tt['measured']['ms_per_step']} ms/step "
        f"({tt['torch_threads']} torch threads); full epoch {tt['full_epoch']['targets']:,} targets "
        f"-> EXTRAPOLATED {tt['full_epoch']['train_seconds_extrapolated'] / 60:.1f} min training + "
        f"{tt['full_epoch']['validation_seconds_extrapolated'] / 60:.1f} min validation",
        f"ranker: {report['ranker']['basis']}; {report['ranker']['rows']:,} rows, "
        f"{report['ranker']['queries_with_a_positive']:,} queries with a positive, {report['ranker']['trees']} trees, "
        f"trained at {report['ranker']['train_rows_per_s']:,} rows/s"
        + (
            f" (EXTRAPOLATED to {x['rows']:,} rows: {x['seconds']} s)"
            if (x := report["ranker"]["train_seconds_extrapolated_to_requested_rows"])
            else ""
        ),
        "",
        markdown_table(
            ("target", "limit", "value", "met", "basis"),
            [(t["name"], t["target"], f"{t['value']} {t['unit']}", t["met"], t["basis"]) for t in report["targets"]],
        ),
    ]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", required=True, help="MovieLens-layout folder (e.g. /tmp/ml32m-synth)")
    parser.add_argument("--quick", action="store_true", help="20 steps, 300 ranker users, 2 index kinds")
    parser.add_argument("--steps", type=int, default=None, help="two-tower steps to run (default 100)")
    parser.add_argument("--ranker-users", type=int, default=None, help="validation users for the ranker (default 5000)")
    parser.add_argument("--torch-threads", type=int, default=None)
    parser.add_argument("--out", default=None, help="JSON report (default: reports/benchmarks/offline_scale[_quick].json)")
    args = parser.parse_args(argv)
    settings = OfflineScaleSettings.quick() if args.quick else OfflineScaleSettings()
    overrides = {
        k: v for k, v in {"steps": args.steps, "ranker_users": args.ranker_users, "torch_threads": args.torch_threads}.items() if v
    }
    if overrides:
        settings = replace(settings, **overrides)
    if not Path(args.data, "ratings.csv").is_file():
        print(f"{args.data}/ratings.csv not found: run `recsys data synth --out {args.data}` first", file=sys.stderr)
        return 2
    out = Path(args.out) if args.out else REPORTS / ("offline_scale_quick.json" if args.quick else "offline_scale.json")
    report = run_benchmark(args.data, settings)
    report["conditions"]["command"] = " ".join(["python -m benchmarks.offline_scale", *(argv if argv is not None else sys.argv[1:])])
    write_json(out, report)
    print(table(report))
    print(f"\n{conditions_line(report['conditions'])}; torch threads {settings.torch_threads}")
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
