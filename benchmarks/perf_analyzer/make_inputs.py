"""Real-data input files for perf_analyzer (``--input-data inputs/<model>.json``).

perf_analyzer fills inputs it has no data for with random values; for INT64 item ids and
demographic codes those index far out of range and the model fails (docs/platform.md). These
files hold real requests instead, cut from the artifacts:

* ``user_tower``: real users' history windows (the ``Histories.last`` rule, length ``L`` from
  the served config) with their ratings and demographic codes; one user per entry.
* ``item_tower``: item indices of the catalog; one item per entry.
* ``ranker_features`` / ``ranker_ensemble``: one entry per *user request* of a few users
  (their ``N`` candidates' item, retrieval score and 0-based rank as ``[N]`` tensors, the
  user's window once as ``[1, L]``; each input as ``{"content", "shape"}`` because these
  models have no batch axis), the top ``N`` of the user tower (run in process with
  onnxruntime on the published ``model.onnx``) over the item embeddings, seen items
  excluded: what the orchestrator sends.
* ``ranker``: the feature rows of the same candidates, computed by the published
  ``ranker_features`` graph.

Batching: perf_analyzer forms a batch of ``-b B`` from ``B`` consecutive entries (round
robin), so with one feature *row* per entry ``-b 200`` sends one user's 200 candidates per
``ranker`` request, the realistic ranker request; the unbatched ``ranker_features`` and
``ranker_ensemble`` take ``-b 1`` (one user's request per entry). ``meta.json`` records each
model's batch size for ``run``.

    python -m benchmarks.perf_analyzer.make_inputs --artifacts artifacts --repo model_repository \\
        --out benchmarks/perf_analyzer/inputs

The checked-in ``inputs/`` were generated this way from a model trained on the bundled
ml-latest-small (``recsys train`` + ``recsys export``, then this command with ``--data
data/ml-latest-small``); they are cut from that data set and carry its licence (data/README.md).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
from google.protobuf import text_format
from tritonclient.grpc import model_config_pb2

from orchestrator.contract import (
    FEATURES,
    HISTORY,
    ITEM,
    ITEM_TOWER,
    MODEL_NAMES,
    RANKER_ENSEMBLE,
    RANKER_FEATURES,
    RANKER_TREES,
    USER_EMBEDDING,
    USER_TOWER,
    candidate_feeds,
    published_versions,
)

MODELS = MODEL_NAMES
CANDIDATE_MODELS = (RANKER_FEATURES, RANKER_TREES, RANKER_ENSEMBLE)
REQUEST_MODELS = (RANKER_FEATURES, RANKER_ENSEMBLE)
"""Models without a batch axis: one entry is one whole request, shapes given explicitly."""
CPU_CONFIG = "configs/cpu.pbtxt"
DEFAULT_OUT = Path(__file__).resolve().parent / "inputs"

_NUMPY = {
    model_config_pb2.TYPE_INT64: np.int64,
    model_config_pb2.TYPE_INT32: np.int32,
    model_config_pb2.TYPE_FP32: np.float32,
}


def read_config(path: str | Path) -> model_config_pb2.ModelConfig:
    """Parses a ``config.pbtxt`` with Triton's own protobuf schema (what the server reads)."""
    return text_format.Parse(Path(path).read_text(), model_config_pb2.ModelConfig())


def input_specs(config: model_config_pb2.ModelConfig) -> dict[str, tuple[type, list[int]]]:
    """Input name -> (numpy dtype, dims without the batch axis)."""
    return {t.name: (_NUMPY[t.data_type], [int(d) for d in t.dims]) for t in config.input}


def latest_version(model_dir: Path) -> Path:
    """The highest numeric version folder of a model."""
    versions = published_versions(model_dir)
    if not versions:
        raise FileNotFoundError(f"{model_dir}: no version folder (run `recsys export` first)")
    return model_dir / str(versions[-1])


def _session(path: Path):
    import onnxruntime as ort

    opts = ort.SessionOptions()
    opts.intra_op_num_threads = 1
    opts.log_severity_level = 3
    return ort.InferenceSession(str(path), opts, providers=["CPUExecutionProvider"])


def _demo_cardinalities(artifacts: Path) -> list[int]:
    """The demographic vocabularies' sizes the user tower was built with (codes must stay below)."""
    import torch

    ckpt = torch.load(artifacts / "two_tower.pt", map_location="cpu", weights_only=True)
    return [int(c) for c in ckpt["demo_cardinalities"]]


def _values(array: np.ndarray) -> list:
    """A row as JSON numbers: exact ints, floats rounded to 6 decimals (small files; timing, not parity)."""
    if np.issubdtype(array.dtype, np.integer):
        return [int(v) for v in array.ravel()]
    return [round(float(v), 6) for v in array.ravel()]


def _entries(arrays: dict[str, np.ndarray]) -> list[dict[str, list]]:
    n = len(next(iter(arrays.values())))
    return [{name: _values(a[i]) for name, a in arrays.items()} for i in range(n)]


def make_inputs(
    artifacts: str | Path,
    repo: str | Path,
    out: str | Path = DEFAULT_OUT,
    *,
    users: int = 32,
    items: int = 64,
    ranker_users: int = 2,
    candidates: int | None = None,
    seed: int = 0,
    data_dir: str | Path | None = None,
) -> dict[str, Any]:
    """Writes ``<out>/<model>.json`` for every model and ``<out>/meta.json``.

    Args:
        artifacts: Folder written by ``recsys train``.
        repo: Model repository with an exported version (its CPU configs give the shapes).
        out: Output folder.
        users: Users (entries) for ``user_tower``.
        items: Items (entries) for ``item_tower``.
        ranker_users: Users whose candidates fill the candidate models' files.
        candidates: Candidates per user (default: the ranker's training depth, else 200);
            also the ``-b`` batch size recorded for the candidate models.
        seed: Which users and items are drawn.
        data_dir: Folder with ``users.csv`` for demographics (default: the manifest's).

    Returns:
        The ``meta.json`` content.
    """
    from export.batch_score import load_user_data, user_windows

    artifacts, repo, out = Path(artifacts), Path(repo), Path(out)
    configs = {m: read_config(repo / m / CPU_CONFIG) for m in MODELS}
    specs = {m: input_specs(c) for m, c in configs.items()}
    history_len = specs[USER_TOWER][HISTORY][1][0]
    n_features = specs[RANKER_TREES][FEATURES][1][0]
    manifest = json.loads((artifacts / "manifest.json").read_text())
    if candidates is None:
        candidates = int(manifest.get("ranker", {}).get("config", {}).get("candidates", 200))

    data = load_user_data(artifacts, data_dir)
    rng = np.random.default_rng(seed)
    active = data.histories.user_ids[np.diff(data.histories.offsets) > 0]
    chosen = np.sort(rng.choice(active, size=min(users, len(active)), replace=False))
    x, long_history, long_rating = user_windows(data, chosen, history_len)

    version = latest_version(repo / USER_TOWER)
    vectors = _session(version / "model.onnx").run([USER_EMBEDDING], x)[0]
    item_vectors = np.load(artifacts / "item_embeddings.npy").astype(np.float32)
    n_items = len(item_vectors)
    if n_items != data.n_items:
        raise ValueError(f"item_embeddings.npy has {n_items} rows, items.parquet {data.n_items}")

    # candidates of the first `ranker_users` users: exact top-N, seen items excluded, merged
    # with the other candidate sources as the orchestrator merges them
    from export.candidates import merged_from_ann
    from export.retrieval import top_k
    from orchestrator.candidates import TABLES_FILE, CandidateTables

    who = np.arange(min(ranker_users, len(chosen)))
    seen = data.histories.seen(chosen[who])
    ann, _ = top_k(vectors[who], item_vectors, candidates, seen)
    tables = CandidateTables.load(artifacts / TABLES_FILE)
    top, top_scores, sources = merged_from_ann(tables, ann, x[HISTORY][who], seen, vectors[who], item_vectors, candidates)
    keep = top >= 0
    features_session = _session(latest_version(repo / RANKER_FEATURES) / "model.onnx")
    requests, feature_rows = [], []
    for row in who:  # one request per user: its candidates [N], its window once [1, H]
        n = int(keep[row].sum())
        request = candidate_feeds(
            top[row, :n],
            top_scores[row, :n],
            np.arange(n),
            long_history[row : row + 1],
            long_rating[row : row + 1],
            sources[row, :n],
        )
        requests.append(request)
        feature_rows.append(features_session.run([FEATURES], request)[0])
    features = np.concatenate(feature_rows)
    if features.shape[1] != n_features:
        raise ValueError(f"ranker_features returns {features.shape[1]} features, the ranker config wants {n_features}")

    item_ids = np.sort(rng.choice(n_items, size=min(items, n_items), replace=False)).reshape(-1, 1).astype(np.int64)
    payloads = {
        USER_TOWER: x,
        ITEM_TOWER: {ITEM: item_ids},
        RANKER_FEATURES: requests,
        RANKER_TREES: {FEATURES: features.astype(np.float32)},
        RANKER_ENSEMBLE: requests,
    }
    out.mkdir(parents=True, exist_ok=True)
    models: dict[str, dict[str, Any]] = {}
    for model, arrays in payloads.items():
        # only the inputs the config names, in its order (the ensemble and the feature model
        # share the candidate rows)
        if model in REQUEST_MODELS:
            entries = [{name: {"content": _values(r[name]), "shape": list(r[name].shape)} for name in specs[model]} for r in arrays]
        else:
            entries = _entries({name: arrays[name] for name in specs[model]})
        path = out / f"{model}.json"
        path.write_text(json.dumps({"data": entries}, separators=(",", ":")) + "\n")
        models[model] = {
            "file": path.name,
            "entries": len(entries),
            "batch_size": int(candidates) if model == "ranker" else 1,
        }
    meta = {
        "generated_at": pd.Timestamp.now(tz="UTC").isoformat(),
        "generator": "python -m benchmarks.perf_analyzer.make_inputs",
        "artifacts": {
            "manifest_created_at": manifest.get("created_at"),
            "data_sha256": manifest.get("data", {}).get("sha256"),
            "data_path": manifest.get("data", {}).get("path"),
        },
        "model_version": int(version.name),
        "n_items": int(n_items),
        "history_len": int(history_len),
        "n_features": int(n_features),
        "demo_cardinalities": _demo_cardinalities(artifacts),
        "candidates": int(candidates),
        "seed": seed,
        "models": models,
    }
    (out / "meta.json").write_text(json.dumps(meta, indent=2) + "\n")
    return meta


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--artifacts", default="artifacts")
    parser.add_argument("--repo", default="model_repository")
    parser.add_argument("--out", default=str(DEFAULT_OUT))
    parser.add_argument("--users", type=int, default=32, help="user_tower entries (default: %(default)s)")
    parser.add_argument("--items", type=int, default=64, help="item_tower entries (default: %(default)s)")
    parser.add_argument("--ranker-users", type=int, default=2, help="users whose candidates fill the ranker files (default: %(default)s)")
    parser.add_argument("--candidates", type=int, default=None, help="candidates per user = -b of the ranker models")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--data", default=None, help="folder with users.csv (default: the manifest's data path)")
    args = parser.parse_args(argv)
    meta = make_inputs(
        args.artifacts,
        args.repo,
        args.out,
        users=args.users,
        items=args.items,
        ranker_users=args.ranker_users,
        candidates=args.candidates,
        seed=args.seed,
        data_dir=args.data,
    )
    print(json.dumps(meta["models"], indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
