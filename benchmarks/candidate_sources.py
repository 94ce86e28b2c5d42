"""What each candidate source buys: one two-tower training, the ranker retrained per source mix.

For one data set and one time split (``export.split``), the two-tower is trained and
early-stopped once (exactly as ``recsys evaluate`` does), then for each row of
:data:`MIXES` the validation candidates are merged with that mix's budgets, the LambdaRank
ranker is retrained on them, and on the test period it reports:

* ``cand_recall@200``: recall of the merged candidate set (the ranker's ceiling);
* ``two_tower_recall@100``: the two-tower alone (the same model in every row);
* ``ranker_ndcg@10``: the ranker over that mix's candidates;

next to every baseline (tuned on validation, refit on train+val, as ``recsys evaluate``)
with its Recall@200 and NDCG@10. The mix ``chosen`` is the one the greedy search on
validation recall picks (:func:`export.candidates.choose_budgets`): what ``recsys train``
publishes. Nothing from the test period is used to choose anything.

    python -m benchmarks.candidate_sources --data data/ml-100k --out reports/benchmarks/candidates.json
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import numpy as np

from benchmarks.common import LoadWatch, conditions, log, markdown_table, write_json
from export import baselines
from export.candidates import recall
from export.data import load_movielens
from export.evaluate import interaction_matrix, rank_with, tune_baseline
from export.features import RankerFeatures
from export.pipeline import TrainSettings, fit_models, merged_candidates, ranker_queries, users_with_history
from export.ranker import candidate_features, candidate_labels, rerank, train_ranker
from export.ranking_metrics import ndcg_at_k
from export.split import relevant_items
from orchestrator.candidates import SOURCES

MIXES: dict[str, tuple[float, ...]] = {
    "two_tower only": (1, 0, 0, 0, 0),
    "+ item_knn": (0.5, 0.5, 0, 0, 0),
    "+ popular lists": (0.5, 0, 0.2, 0.15, 0.15),
    "all, even": (0.2, 0.2, 0.2, 0.2, 0.2),
}
"""Fixed source mixes (``SOURCES`` order) measured beside the validation-chosen one."""


def run(data: str, baseline_names: tuple[str, ...] = ("popularity", "item_knn", "ease", "als")) -> dict:
    """Trains once, evaluates every mix and baseline on the test period. Returns the report."""
    started = time.perf_counter()
    settings = TrainSettings()
    n = settings.ranker.candidates
    ml = load_movielens(data, progress=False)
    fitted = fit_models(ml, settings, progress=False)
    cat, split = fitted.catalog, fitted.split
    index = cat.index_of()

    # validation candidates (as fit_models builds them) for retraining the ranker per mix
    rel_val = relevant_items(split.val, index)
    active = ranker_queries(split.val, fitted.val_period.histories)
    val = merged_candidates(fitted.two_tower_val.model, fitted.val_period, fitted.demographics, fitted.tables_val, active, n)
    val_features = RankerFeatures(
        cat, fitted.val_period.stats, fitted.two_tower_val.model.item_vectors(), fitted.val_period.cf_vectors, fitted.val_period.ease
    )

    rel_test = relevant_items(split.test, index)
    users = users_with_history(rel_test, fitted.test_period)
    relevant = [rel_test[u] for u in users]
    test = merged_candidates(fitted.two_tower.model, fitted.test_period, fitted.demographics, fitted.tables, users, n)
    test_features = fitted.ranker_features(fitted.test_period, fitted.two_tower.model)
    tt_recall = float(np.mean([np.isin(r, row[:100]).mean() for r, row in zip(relevant, test.ann)]))

    rows = []
    mixes = {**MIXES, "chosen on validation": tuple(float(b) for b in fitted.tables.budgets)}
    for name, budgets in mixes.items():
        b = np.asarray(budgets, np.float32) / sum(budgets)
        v = val.with_budgets(b, n)
        booster = train_ranker(
            candidate_features(val_features, v.history, v.history_rating, v.items, v.scores, v.sources),
            candidate_labels(active, v.items, split.val, cat),
            settings.ranker,
        )
        t = test.with_budgets(b, n)
        ranked, _ = rerank(booster, candidate_features(test_features, t.history, t.history_rating, t.items, t.scores, t.sources), t.items)
        ndcg = [ndcg_at_k(r, rel, 10) for r, rel in zip(ranked, relevant)]
        rows.append(
            {
                "mix": name,
                "budgets": [round(float(x), 3) for x in b],
                "cand_recall@200": round(recall(t.items[:, :200], relevant), 4),
                "val_cand_recall@200": round(recall(v.items[:, :200], [rel_val.get(int(u), np.empty(0)) for u in active]), 4),
                "two_tower_recall@100": round(tt_recall, 4),
                "ranker_ndcg@10": round(float(np.mean(ndcg)), 4),
                "per_user_ndcg@10": ndcg,
            }
        )
        log(f"{name}: {rows[-1]['cand_recall@200']} recall@200, {rows[-1]['ranker_ndcg@10']} ndcg@10")

    period = fitted.test_period
    matrix = interaction_matrix(period.histories, period.histories.user_ids, cat.n_items)
    pos, seen = period.histories.positions(users), period.histories.seen(users)
    base = {}
    for name in baseline_names:
        params, _ = tune_baseline(name, fitted, progress=False)
        ranked = rank_with(baselines.make(name, **params).fit(matrix), matrix, pos, seen, 200)
        per_user = [ndcg_at_k(r, rel, 10) for r, rel in zip(ranked, relevant)]
        base[name] = {
            "params": params,
            "recall@200": round(recall(ranked, relevant), 4),
            "recall@100": round(recall(ranked[:, :100], relevant), 4),
            "ndcg@10": round(float(np.mean(per_user)), 4),
            "per_user_ndcg@10": per_user,
        }
        log(f"{name}: {base[name]['recall@200']} recall@200, {base[name]['ndcg@10']} ndcg@10")
    best = max(base, key=lambda k: base[k]["ndcg@10"]) if base else None
    for row in rows:
        if best is not None:
            diff = np.asarray(row["per_user_ndcg@10"]) - np.asarray(base[best]["per_user_ndcg@10"])
            boot = diff[np.random.default_rng(0).integers(0, len(diff), (2000, len(diff)))].mean(1)
            row[f"vs {best} ndcg@10 ratio"] = round(row["ranker_ndcg@10"] / max(base[best]["ndcg@10"], 1e-12), 3)
            row["ci95_diff"] = [round(float(x), 4) for x in np.percentile(boot, [2.5, 97.5])]
    return {
        "data": data,
        "test_users": int(len(users)),
        "test_starts": split.protocol().get("test_starts"),
        "sources": list(SOURCES),
        "budget_search": fitted.budget_trials,
        "mixes": rows,
        "baselines": base,
        "best_baseline_by_ndcg@10": best,
        "seconds": round(time.perf_counter() - started, 1),
    }


def table(report: dict) -> str:
    """The markdown table of a report (mixes, then baselines)."""
    head = ["model / mix", "budgets", "cand recall@200", "two_tower recall@100", "ranker NDCG@10", "vs best", "95% CI diff"]
    best = report["best_baseline_by_ndcg@10"]
    rows = [
        [
            r["mix"],
            "/".join(f"{b:g}" for b in r["budgets"]),
            r["cand_recall@200"],
            r["two_tower_recall@100"],
            r["ranker_ndcg@10"],
            r.get(f"vs {best} ndcg@10 ratio"),
            r.get("ci95_diff"),
        ]
        for r in report["mixes"]
    ]
    rows += [[f"baseline {k}", "", v["recall@200"], "", v["ndcg@10"], "", ""] for k, v in report["baselines"].items()]
    return markdown_table(head, rows)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--data", required=True, help="MovieLens CSV folder")
    parser.add_argument("--out", default="reports/benchmarks/candidate_sources.json")
    args = parser.parse_args(argv)
    with LoadWatch() as load:
        report = run(args.data)
    report["conditions"] = conditions(load_average=load.record())
    write_json(Path(args.out), report)
    print(table(report))
    print(f"\n{report['data']}: {report['test_users']} test users, test from {report['test_starts']}, {report['seconds']} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
