"""``recsys export``: artifacts -> ONNX graphs -> a versioned Triton model repository.

What is published, per model folder of ``model_repository/``::

    user_tower/         config.pbtxt (onnxruntime, GPU) + configs/cpu.pbtxt (python, CPU)
                        + configs/onnx_cpu.pbtxt (onnxruntime, CPU) + model.py
    item_tower/         same layout
    ranker_features/    same layout; the feature module of export/features.py as a graph
    ranker/             same layout; the LightGBM booster translated by Hummingbird
    ranker_ensemble/    ranker_features -> ranker: a Triton ensemble (config.pbtxt, onnx_cpu) and, in
                        configs/cpu.pbtxt, one Python-backend model running both graphs + model.py
    <model>/<N>/        model.onnx + model.py (copied) + version.json, written by the export

Configs and ``model.py`` are checked in; the export writes only numbered version folders
(git-ignored). A re-export publishes version ``N+1`` beside ``N`` (all five models get the
same number, so a version names one consistent set of graphs), each version folder staged
under a dot-name Triton ignores and renamed into place. Before anything is renamed, every
graph's inputs and outputs are checked against *every* config of its model and the
ensemble's wiring is checked; a mismatch refuses the whole publish with a message naming
the model, the tensor and the difference.

Tensor layout: users (``user_tower``), items (``item_tower``) and feature rows (``ranker``)
are the batch dimension, so Triton's dynamic batcher can merge requests. ``ranker_features``
(and so ``ranker_ensemble``) has ``max_batch_size: 0``: it takes U users' histories once
([U, H], compact INT32 ids) and their N = U * C candidates ([N] per-candidate tensors), a shape
that has no single batch axis; the orchestrator merges users itself (BatchRecommend), and the
``ranker`` step behind it still batches feature rows across requests.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import shutil
import statistics
import time
import warnings
from collections.abc import Callable, Iterator, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path

import lightgbm as lgb
import numpy as np
import onnx
import onnxruntime as ort
import pandas as pd
import torch
from onnx import numpy_helper, shape_inference
from torch import nn

from export.features import FEATURE_NAMES, RankerFeatures
from export.items import Catalog, ItemStats
from export.pipeline import git_sha
from export.ranker import split_linear_base
from export.triton_config import (
    SERVING_THREADS,
    ExportError,
    Shapes,
    check_repository,
    onnx_tensors,
    write_repository_files,
)
from export.two_tower import TwoTower, TwoTowerConfig
from orchestrator.artifacts import EXPORTED_FILES, file_sha256
from orchestrator.candidates import SOURCES, TABLES_FILE
from orchestrator.contract import (
    CANDIDATE_INPUTS,
    GRAPH_MODELS,
    MODEL_NAMES,
    RANKER_ENSEMBLE,
    RANKER_HISTORY,
    VERSION_INFO,
    published_versions,
)

OPSET = 17
"""ONNX opset of every graph: supported by onnxruntime 1.32 and by Triton 2.51's onnxruntime backend."""

ENSEMBLE = RANKER_ENSEMBLE
LEAF_MODELS = GRAPH_MODELS
TREE_IMPLEMENTATIONS = ("gemm", "tree_trav", "perf_tree_trav")
TIMING_ROWS = (200, 500)
"""Batch sizes the tree strategies are timed at: one to two users' worth of candidates."""
PARITY_BATCHES = {"user_tower": (1, 7, 256), "ranker_features": ((1, 1), (7, 7), (200, 1), (256, 4)), "ranker": (1, 7, 200, 4096)}
"""Batch sizes each graph is checked at (``ranker_features``: (candidates, users))."""


# --------------------------------------------------------------------------- loading artifacts


def load_two_tower(path: str | Path) -> TwoTower:
    """Rebuilds the :class:`TwoTower` saved by ``save_artifacts`` (``two_tower.pt``).

    The constructor wants a catalog and item statistics only to size and fill its lookup
    buffers; zeros of the right shape do, because ``load_state_dict`` then overwrites every
    buffer with the trained values.

    Args:
        path: The ``two_tower.pt`` checkpoint.

    Returns:
        The model in eval mode on the CPU.
    """
    ckpt = torch.load(path, map_location="cpu", weights_only=False)
    config = TwoTowerConfig(**ckpt["config"])
    n_items, n_genres = int(ckpt["n_items"]), int(ckpt["n_genres"])
    catalog = _dummy_catalog(n_items, n_genres)
    stats = _dummy_stats(n_items)
    model = TwoTower(config, catalog, stats, tuple(int(c) for c in ckpt["demo_cardinalities"]))
    model.load_state_dict(ckpt["state_dict"])
    return model.eval()


def load_ranker_features(path: str | Path) -> RankerFeatures:
    """Rebuilds the :class:`RankerFeatures` module from its state dict (``ranker_features.pt``).

    All of the module's state is buffers, so :meth:`RankerFeatures.from_state_dict` restores it
    without the catalog, statistics and vectors it was first built from.

    Args:
        path: The ``ranker_features.pt`` state dict.

    Returns:
        The module in eval mode on the CPU.
    """
    state = torch.load(path, map_location="cpu", weights_only=True)
    return RankerFeatures.from_state_dict(state).eval()


def _dummy_catalog(n_items: int, n_genres: int) -> Catalog:
    return Catalog(
        movie_ids=np.arange(n_items, dtype=np.int64),
        titles=np.full(n_items, "", dtype=object),
        years=np.zeros(n_items, np.int32),
        genres=[f"g{i}" for i in range(n_genres)],
        genre_matrix=np.zeros((n_items, n_genres), np.float32),
        genre_strings=np.full(n_items, "", dtype=object),
    )


def _dummy_stats(n_items: int) -> ItemStats:
    zeros = np.zeros(n_items, np.float32)
    return ItemStats(cutoff=0, count=zeros, recent_count=zeros, mean_rating=zeros, first_seen_days=zeros)


# --------------------------------------------------------------------------- graphs


class UserTowerGraph(nn.Module):
    """The user tower with the served signature."""

    def __init__(self, model: TwoTower):
        super().__init__()
        self.tower = model.user_tower

    def forward(self, history: torch.Tensor, history_rating: torch.Tensor, demographics: torch.Tensor) -> torch.Tensor:
        return self.tower(history, history_rating, demographics)


class ItemTowerGraph(nn.Module):
    """The item tower taking ``item`` [B, 1] (Triton dims ``[1]``) and returning [B, dim]."""

    def __init__(self, model: TwoTower):
        super().__init__()
        self.tower = model.item_tower

    def forward(self, item: torch.Tensor) -> torch.Tensor:
        return self.tower(item.reshape(-1))


class RankerGraph(nn.Module):
    """Hummingbird's tree module with a pinned ``score`` [B, 1] output, plus the booster's
    linear base term ``coef * features[:, j]`` when it has one (:func:`export.ranker.with_linear_base`)."""

    def __init__(self, executor: nn.Module, base: tuple[int, float] | None = None):
        super().__init__()
        self.executor = executor
        self.base = base

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        out = self.executor(features)
        if isinstance(out, (tuple, list)):  # classifiers return (label, proba); a ranker has one output
            out = out[0]
        out = out.reshape(-1, 1)
        if self.base is not None:
            j, coef = self.base
            out = out + coef * features[:, j : j + 1]
        return out


def _export_graph(
    module: nn.Module,
    args: tuple[torch.Tensor, ...],
    path: Path,
    input_names: Sequence[str],
    output_names: Sequence[str],
    dynamic_axes: dict[str, dict[int, str]] | None = None,
) -> None:
    """Traces ``module`` to ONNX with the legacy exporter and a dynamic batch axis.

    ``dynamo=False`` because the dynamo exporter names outputs after internal nodes, which
    onnxruntime rejects as duplicate definitions (docs/platform.md).
    ``dynamic_axes`` replaces the default (axis 0 of every tensor is one ``batch`` axis).
    """
    axes = dynamic_axes or {name: {0: "batch"} for name in (*input_names, *output_names)}
    with torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore")  # tracer warnings about Python ints are expected here
        torch.onnx.export(
            module.eval(),
            args,
            str(path),
            input_names=list(input_names),
            output_names=list(output_names),
            dynamic_axes=axes,
            opset_version=OPSET,
            do_constant_folding=True,
            dynamo=False,
        )
        reference = module(*args)
    # The tracer leaves some non-batch output dims symbolic (they pass through a computed
    # Reshape); Triton and the contract check need them concrete, so pin them to what the
    # module produces. The parity checks compare full output shapes, so a wrong pin fails.
    outputs = reference if isinstance(reference, (tuple, list)) else (reference,)
    graph = onnx.load(str(path))
    for value, out in zip(graph.graph.output, outputs):
        for i, dim in enumerate(value.type.tensor_type.shape.dim):
            if i > 0:
                dim.Clear()
                dim.dim_value = int(out.shape[i])
    onnx.checker.check_model(graph, full_check=True)
    onnx.save(graph, str(path))


def export_user_tower(model: TwoTower, path: Path) -> None:
    """Writes ``user_tower`` ONNX: (history, history_rating, demographics) -> user_embedding."""
    L = model.config.history_len
    args = (torch.full((2, L), -1, dtype=torch.long), torch.zeros(2, L), torch.zeros(2, 3, dtype=torch.long))
    _export_graph(UserTowerGraph(model), args, path, ("history", "history_rating", "demographics"), ("user_embedding",))


def export_item_tower(model: TwoTower, path: Path) -> None:
    """Writes ``item_tower`` ONNX: item [B, 1] -> item_embedding [B, dim]."""
    _export_graph(ItemTowerGraph(model), (torch.zeros(2, 1, dtype=torch.long),), path, ("item",), ("item_embedding",))


def export_ranker_features(module: RankerFeatures, path: Path) -> None:
    """Writes ``ranker_features`` ONNX: U histories [U, H] + N = U * C candidates [N] -> features [N, F]."""
    H = RANKER_HISTORY
    # traced with U=2, C=3 so neither axis is mistaken for a constant
    args = (
        torch.zeros(6, dtype=torch.int32),
        torch.zeros(6),
        torch.zeros(6),
        torch.full((2, H), -1, dtype=torch.int32),
        torch.zeros(2, H),
        torch.full((6, len(SOURCES)), -1.0),
    )
    axes = {
        "item": {0: "n"},
        "retrieval_score": {0: "n"},
        "retrieval_rank": {0: "n"},
        "history": {0: "u"},
        "history_rating": {0: "u"},
        "candidate_sources": {0: "n"},
        "features": {0: "n"},
    }
    _export_graph(module, args, path, CANDIDATE_INPUTS, ("features",), dynamic_axes=axes)


def float32_exact_booster(booster: lgb.Booster) -> lgb.Booster:
    """The same booster with every numerical threshold rounded *down* to a float32 value.

    LightGBM compares ``x <= t`` in double precision; Hummingbird's graph compares in float32
    with ``t`` rounded to the *nearest* float32. A feature that sits exactly on a bin edge
    (a mean of half-star ratings is 3.9 as often as not) then goes left in the graph and
    right in LightGBM, and the score jumps by a leaf value (0.16 seen on the tiny model).
    For a float32 ``x`` (all served features are FP32), ``x <= t`` holds exactly when
    ``x <= floor32(t)``, so these thresholds make the float32 graph take LightGBM's path on
    every input while LightGBM's own predictions do not change.
    """
    lines = booster.model_to_string().split("\n")
    threshold_at: int | None = None
    for i, line in enumerate(lines):
        if line.startswith("Tree="):
            threshold_at = None
        elif line.startswith("threshold="):
            threshold_at = i
        elif line.startswith("decision_type=") and threshold_at is not None:
            flags = np.array(line.split("=", 1)[1].split(), dtype=np.int64)
            values = np.array(lines[threshold_at].split("=", 1)[1].split(), dtype=np.float64)
            as32 = values.astype(np.float32)
            down = np.where(as32.astype(np.float64) > values, np.nextafter(as32, np.float32(-np.inf)), as32)
            numerical = (flags & 1) == 0  # bit 0 marks a categorical split, whose threshold is an index
            fixed = np.where(numerical, down.astype(np.float64), values)
            lines[threshold_at] = "threshold=" + " ".join(repr(float(v)) for v in fixed)
            threshold_at = None
    # tree_sizes= holds each tree's byte length, which the new thresholds change; without the
    # line LightGBM parses the trees sequentially instead of trusting stale offsets
    lines = [line for line in lines if not line.startswith("tree_sizes=")]
    return lgb.Booster(model_str="\n".join(lines))


def export_ranker(booster: lgb.Booster, tree_implementation: str, path: Path) -> int:
    """Writes ``ranker`` ONNX via Hummingbird: features [B, F] -> score [B, 1].

    ``convert(..., "onnx")`` fails with torch 2.13 (it uses the dynamo exporter), so the
    torch translation is exported here with the legacy exporter (docs/platform.md). Thresholds
    are made float32-exact first (:func:`float32_exact_booster`). Hummingbird has no linear
    trees, so a booster's linear base term (:func:`export.ranker.split_linear_base`) is taken
    off before the conversion and added back in :class:`RankerGraph`.

    Returns:
        How many axis-less ``Squeeze`` nodes were pinned (:func:`_pin_squeeze_axes`).
    """
    from hummingbird.ml import convert

    booster, base = split_linear_base(float32_exact_booster(booster))
    n = booster.num_feature()
    sample = np.zeros((4, n), np.float32)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        hb = convert(booster, "torch", sample, extra_config={"tree_implementation": tree_implementation})
    _export_graph(RankerGraph(hb.model, base), (torch.zeros(2, n),), path, ("features",), ("score",))
    return _pin_squeeze_axes(path)


def _pin_squeeze_axes(path: Path) -> int:
    """Gives every axis-less ``Squeeze`` explicit axes: the dims that are statically 1.

    Hummingbird's GBDT aggregation calls ``torch.squeeze(x)`` on [trees, 1, batch]; traced,
    that is an ONNX ``Squeeze`` without axes, which at run time also drops a batch of 1, and
    the next ``Transpose`` fails ("perm size: 2 does not match input rank: 1" — the known
    ``gemm`` batch-1 failure). Squeezing only the dims that are 1 whatever the batch keeps
    the batch axis and is what the graph means for every batch > 1. The parity checks at
    batch 1 decide whether the result is usable.

    Returns:
        How many nodes were pinned.
    """
    model = onnx.load(str(path))
    inferred = shape_inference.infer_shapes(model)
    shapes = {}
    for value in (*inferred.graph.value_info, *inferred.graph.input, *inferred.graph.output):
        dims = value.type.tensor_type.shape.dim
        shapes[value.name] = [d.dim_value if d.HasField("dim_value") else None for d in dims]
    pinned = 0
    for i, node in enumerate(model.graph.node):
        if node.op_type != "Squeeze" or len(node.input) > 1 or node.input[0] not in shapes:
            continue
        axes = [a for a, d in enumerate(shapes[node.input[0]]) if d == 1]
        if not axes:
            continue
        name = f"{node.name or node.output[0]}_pinned_axes"
        model.graph.initializer.append(numpy_helper.from_array(np.array(axes, np.int64), name))
        node.input.append(name)
        pinned += 1
    if pinned:
        onnx.checker.check_model(model, full_check=True)
        onnx.save(model, str(path))
    return pinned


def session(path: str | Path, threads: int = SERVING_THREADS) -> ort.InferenceSession:
    """An onnxruntime CPU session configured like the served one (few threads, sequential)."""
    opts = ort.SessionOptions()
    opts.intra_op_num_threads = threads
    opts.inter_op_num_threads = 1
    opts.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    opts.log_severity_level = 3
    return ort.InferenceSession(str(path), opts, providers=["CPUExecutionProvider"])


# --------------------------------------------------------------------------- sample inputs


def sample_user_inputs(n: int, n_items: int, history_len: int, demo_cardinalities: Sequence[int], seed: int = 0) -> dict[str, np.ndarray]:
    """Random but valid user-tower inputs: left-padded histories, half-star ratings, demographics."""
    rng = np.random.default_rng(seed)
    lengths = rng.integers(0, history_len + 1, n)
    history = rng.integers(0, n_items, (n, history_len)).astype(np.int64)
    history[np.arange(history_len)[None, :] < (history_len - lengths)[:, None]] = -1
    rating = (rng.integers(0, 11, (n, history_len)) / 2.0).astype(np.float32)
    rating[history < 0] = 0.0
    demo = np.stack([rng.integers(0, c, n) for c in demo_cardinalities], axis=1).astype(np.int64)
    return {"history": history, "history_rating": rating, "demographics": demo}


def sample_candidate_inputs(n: int, n_items: int, seed: int = 0, users: int | None = None) -> dict[str, np.ndarray]:
    """Random but valid ``ranker_features`` inputs: ``n`` candidates of ``users`` users (default: one
    each), histories of the ranker's window ``RANKER_HISTORY``."""
    rng = np.random.default_rng(seed)
    users = n if users is None else users
    if users <= 0 or n % users:
        raise ValueError(f"{n} candidates do not split evenly over {users} users")
    user = sample_user_inputs(users, n_items, RANKER_HISTORY, (1, 1, 1), seed)
    return {
        "item": rng.integers(0, n_items, n).astype(np.int32),
        "retrieval_score": rng.uniform(-1, 1, n).astype(np.float32),
        "retrieval_rank": rng.integers(0, 200, n).astype(np.float32),
        "history": user["history"].astype(np.int32),
        "history_rating": user["history_rating"],
        # a rank in some sources, -1 (absent) in the others
        "candidate_sources": np.where(rng.random((n, len(SOURCES))) < 0.5, rng.integers(0, 200, (n, len(SOURCES))), -1).astype(np.float32),
    }


def _features_torch(module: RankerFeatures, inputs: dict[str, np.ndarray]) -> np.ndarray:
    """The PyTorch reference, each candidate with its own user's history row (U = N, C = 1)."""
    n, users = len(inputs["item"]), len(inputs["history"])
    per_row = np.repeat(np.arange(users), n // users)
    return module.compute(
        inputs["item"].reshape(-1),
        inputs["retrieval_score"].reshape(-1),
        inputs["retrieval_rank"].reshape(-1),
        inputs["history"][per_row],
        inputs["history_rating"][per_row],
        inputs["candidate_sources"],
    )


# --------------------------------------------------------------------------- tree strategy


@dataclass
class TreeTrial:
    """One Hummingbird tree strategy, measured.

    Attributes:
        implementation: ``gemm``, ``tree_trav`` or ``perf_tree_trav``.
        max_abs_diff: Max ``|onnx - booster.predict|`` per batch size (None = the run failed).
        ms_p50: Median onnxruntime latency in ms per batch size of :data:`TIMING_ROWS`.
        error: Why the strategy is unusable, if it is.
        squeeze_nodes_pinned: Axis-less ``Squeeze`` nodes given explicit axes (the batch-1 fix).
    """

    implementation: str
    max_abs_diff: dict[str, float | None] = field(default_factory=dict)
    ms_p50: dict[str, float] = field(default_factory=dict)
    error: str | None = None
    squeeze_nodes_pinned: int = 0

    @property
    def ok(self) -> bool:
        return self.error is None


def _median_ms(run: Callable[[], object], budget_s: float = 0.25, min_runs: int = 10, max_runs: int = 500) -> float:
    """Median wall time of ``run()`` in ms: at least ``min_runs`` calls, then until ``budget_s``."""
    for _ in range(3):  # warm-up: first runs allocate
        run()
    times: list[float] = []
    start = time.perf_counter()
    while len(times) < min_runs or (time.perf_counter() - start < budget_s and len(times) < max_runs):
        t0 = time.perf_counter()
        run()
        times.append(time.perf_counter() - t0)
    return statistics.median(times) * 1e3


def trial_tree_implementation(
    booster: lgb.Booster, implementation: str, features: np.ndarray, workdir: Path, tolerance: float = 1e-4
) -> TreeTrial:
    """Exports the ranker with one strategy and measures correctness and latency.

    Correctness is checked at every batch size of ``PARITY_BATCHES['ranker']`` (batch 1
    included: unpatched ``gemm`` graphs fail there, see :func:`_pin_squeeze_axes`); latency
    at :data:`TIMING_ROWS` rows with the serving thread count.
    """
    trial = TreeTrial(implementation)
    path = workdir / f"ranker-{implementation}.onnx"
    try:
        trial.squeeze_nodes_pinned = export_ranker(booster, implementation, path)
        sess = session(path)
    except Exception as exc:  # a strategy that cannot even be built is simply not a candidate
        trial.error = f"export failed: {type(exc).__name__}: {exc}"
        return trial
    expected = booster.predict(features, num_threads=1).astype(np.float64)
    quiet = ort.RunOptions()
    quiet.log_severity_level = 4  # a failing strategy is an expected outcome here, not an error to log
    for b in PARITY_BATCHES["ranker"]:
        rows = features[np.arange(b) % len(features)]
        try:
            got = sess.run(["score"], {"features": rows}, quiet)[0]
            if got.shape != (b, 1):
                raise ExportError(f"score shape {got.shape}, expected {(b, 1)}")
        except Exception as exc:
            trial.max_abs_diff[str(b)] = None
            trial.error = trial.error or f"batch {b}: {type(exc).__name__}: {str(exc).splitlines()[0][:200]}"
            continue
        diff = float(np.max(np.abs(got.reshape(-1) - expected[np.arange(b) % len(features)])))
        trial.max_abs_diff[str(b)] = diff
        if not diff <= tolerance:
            trial.error = trial.error or f"batch {b}: max |onnx - lightgbm| = {diff:.3g} > {tolerance}"
    # timed even when wrong elsewhere (e.g. at batch 1), so the record shows what was given up
    for rows in TIMING_ROWS:
        feeds = {"features": features[np.arange(rows) % len(features)]}
        with contextlib.suppress(Exception):
            trial.ms_p50[str(rows)] = round(_median_ms(lambda: sess.run(None, feeds)), 4)
    return trial


def lightgbm_ms_p50(booster: lgb.Booster, features: np.ndarray) -> dict[str, float]:
    """LightGBM's own single-thread latency at :data:`TIMING_ROWS` rows, the yardstick for the trials."""
    out = {}
    for rows in TIMING_ROWS:
        x = features[np.arange(rows) % len(features)]
        out[str(rows)] = round(_median_ms(lambda: booster.predict(x, num_threads=1)), 4)
    return out


def choose_tree_implementation(
    booster: lgb.Booster, features: np.ndarray, workdir: Path, candidates: Sequence[str] = TREE_IMPLEMENTATIONS
) -> tuple[str, list[TreeTrial]]:
    """Picks the fastest correct Hummingbird strategy, by measurement.

    The score is the mean of the medians at :data:`TIMING_ROWS` rows; strategies that fail
    at any batch size (batch 1 included) are excluded.

    Returns:
        ``(chosen implementation, every trial)``.

    Raises:
        ExportError: No strategy is both exportable and correct.
    """
    trials = [trial_tree_implementation(booster, impl, features, workdir) for impl in candidates]
    good = [t for t in trials if t.ok and t.ms_p50]
    if not good:
        reasons = "; ".join(f"{t.implementation}: {t.error}" for t in trials)
        raise ExportError(f"ranker: no Hummingbird tree strategy is correct ({reasons})")
    best = min(good, key=lambda t: statistics.mean(t.ms_p50.values()))
    return best.implementation, trials


# --------------------------------------------------------------------------- publishing


@contextlib.contextmanager
def repository_lock(repo: Path) -> Iterator[None]:
    """Exclusive lock on the repository folder so two exports cannot claim the same version."""
    fd = os.open(repo, os.O_RDONLY)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        fcntl.flock(fd, fcntl.LOCK_UN)
        os.close(fd)


ARTIFACT_FILES = EXPORTED_FILES


def _artifacts_record(artifacts: Path, manifest: dict) -> dict:
    return {
        "path": str(artifacts.resolve()),
        "manifest_created_at": manifest.get("created_at"),
        "git_sha": manifest.get("git_sha"),
        "data_sha256": manifest.get("data", {}).get("sha256"),
        "files_sha256": {n: file_sha256(artifacts / n) for n in ARTIFACT_FILES if (artifacts / n).exists()},
    }


def _write_json_atomic(path: Path, payload: dict) -> None:
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    tmp.write_text(json.dumps(payload, indent=2, default=str))
    os.replace(tmp, path)


def _max_diff(a: np.ndarray, b: np.ndarray) -> float:
    if a.shape != b.shape:
        raise ExportError(f"output shape {a.shape} differs from the source's {b.shape}")
    return float(np.max(np.abs(np.asarray(a, np.float64) - np.asarray(b, np.float64)))) if a.size else 0.0


def _parity(
    graphs: dict[str, Path], model: TwoTower, features: RankerFeatures, booster: lgb.Booster, cands: dict
) -> dict[str, dict[str, float]]:
    """Max abs difference of each graph vs its PyTorch/LightGBM source at a few batch sizes."""
    cfg = model.config
    n_items = model.item_tower.encoder.genres.shape[0]
    demo_cards = [emb.num_embeddings for emb in model.user_tower.demo_embs]
    out: dict[str, dict[str, float]] = {m: {} for m in LEAF_MODELS}
    sess = session(graphs["user_tower"])
    for b in PARITY_BATCHES["user_tower"]:
        x = sample_user_inputs(b, n_items, cfg.history_len, demo_cards, seed=b)
        ref = model.user_vectors(x["history"], x["history_rating"], x["demographics"])
        out["user_tower"][str(b)] = _max_diff(sess.run(["user_embedding"], x)[0], ref)
    sess = session(graphs["item_tower"])
    items = np.arange(n_items, dtype=np.int64).reshape(-1, 1)
    ref = model.item_vectors()
    out["item_tower"]["1"] = _max_diff(sess.run(["item_embedding"], {"item": items[:1]})[0], ref[:1])
    out["item_tower"][str(n_items)] = _max_diff(sess.run(["item_embedding"], {"item": items})[0], ref)
    sess = session(graphs["ranker_features"])
    for b, users in PARITY_BATCHES["ranker_features"]:
        x = sample_candidate_inputs(b, n_items, seed=b, users=users)
        out["ranker_features"][str(b)] = _max_diff(sess.run(["features"], x)[0], _features_torch(features, x))
    sess = session(graphs["ranker"])
    feats = _features_torch(features, cands)
    for b in PARITY_BATCHES["ranker"]:
        rows = feats[np.arange(b) % len(feats)]
        out["ranker"][str(b)] = _max_diff(sess.run(["score"], {"features": rows})[0], booster.predict(rows, num_threads=1).reshape(-1, 1))
    return out


PARITY_TOLERANCE = {"user_tower": 1e-5, "item_tower": 1e-5, "ranker_features": 1e-4, "ranker": 1e-4}
"""Largest accepted |ONNX - source| per model; features include counts and years (magnitudes ~1e3)."""


def export_repository(
    artifacts: str | Path,
    repo: str | Path,
    tree_implementation: str = "auto",
    write_configs: bool = False,
    update_manifest: bool = True,
) -> dict:
    """``recsys export``: publishes the artifacts as version ``N+1`` of every model in ``repo``.

    Steps: load artifacts -> export the four graphs into a staging folder -> pick the tree
    strategy by measurement (unless forced) -> parity against PyTorch / LightGBM -> write
    missing configs -> validate graphs against every config and the ensemble wiring -> rename
    each staged version folder into place (leaf models first, the ensemble last) -> record
    the export in the artifacts' ``manifest.json``.

    Args:
        artifacts: Folder written by ``recsys train``.
        repo: Model repository.
        tree_implementation: ``auto`` (measure) or one of :data:`TREE_IMPLEMENTATIONS`.
        write_configs: Regenerate configs and ``model.py`` from the artifacts' shapes
            (otherwise existing files are kept and the graphs must match them).
        update_manifest: Add the ``export`` section to the artifacts' manifest.

    Returns:
        A summary: version, tree strategy and timings, parity, paths.

    Raises:
        ExportError: Contract mismatch, failed parity or unusable artifacts; nothing is published.
        FileNotFoundError: An artifact file is missing.
    """
    artifacts, repo = Path(artifacts), Path(repo)
    for name in ("two_tower.pt", "ranker_features.pt", "ranker.lgb", TABLES_FILE, "manifest.json"):
        if not (artifacts / name).is_file():
            raise FileNotFoundError(f"{artifacts / name}: missing artifact (run `recsys train` first)")
    if tree_implementation != "auto" and tree_implementation not in TREE_IMPLEMENTATIONS:
        raise ExportError(f"tree_implementation must be auto or one of {TREE_IMPLEMENTATIONS}, got {tree_implementation!r}")
    manifest = json.loads((artifacts / "manifest.json").read_text())
    model = load_two_tower(artifacts / "two_tower.pt")
    features = load_ranker_features(artifacts / "ranker_features.pt")
    booster = lgb.Booster(model_file=str(artifacts / "ranker.lgb"))
    cfg = model.config
    n_items = int(features.genres.shape[0])
    if booster.num_feature() != len(FEATURE_NAMES):
        raise ExportError(f"ranker: booster has {booster.num_feature()} features, FEATURE_NAMES has {len(FEATURE_NAMES)}")
    candidates = int(manifest.get("ranker", {}).get("config", {}).get("candidates", 200))
    shapes = Shapes(history_len=cfg.history_len, dim=cfg.dim, candidates=candidates)

    repo.mkdir(parents=True, exist_ok=True)
    written = write_repository_files(repo, shapes, overwrite=write_configs)
    t_start = time.perf_counter()
    with repository_lock(repo):
        version = 1 + max((v for m in MODEL_NAMES for v in published_versions(repo / m)), default=0)
        staging = {m: repo / m / f".staging-{version}-{os.getpid()}" for m in MODEL_NAMES}
        try:
            for m, path in staging.items():
                path.mkdir(parents=True)
            graphs = {m: staging[m] / "model.onnx" for m in LEAF_MODELS}
            export_user_tower(model, graphs["user_tower"])
            export_item_tower(model, graphs["item_tower"])
            export_ranker_features(features, graphs["ranker_features"])

            # realistic feature rows (from the feature module itself) for choosing and checking the trees
            cands = sample_candidate_inputs(4096, n_items, seed=11)
            feats = _features_torch(features, cands)
            if tree_implementation == "auto":
                chosen, trials = choose_tree_implementation(booster, feats, staging["ranker"])
                selection = "measured"
            else:
                chosen, trials = tree_implementation, [trial_tree_implementation(booster, tree_implementation, feats, staging["ranker"])]
                selection = "forced"
            for f in staging["ranker"].glob("ranker-*.onnx"):
                if f.name == f"ranker-{chosen}.onnx":
                    f.rename(graphs["ranker"])
                else:
                    f.unlink()
            if not graphs["ranker"].exists():
                raise ExportError(f"ranker: export with tree_implementation={chosen!r} failed: {trials[-1].error}")

            parity = _parity(graphs, model, features, booster, cands)
            bad = [
                f"{m}: max |onnx - source| {d:.3g} at batch {b} > {PARITY_TOLERANCE[m]}"
                for m, by_b in parity.items()
                for b, d in by_b.items()
                if not d <= PARITY_TOLERANCE[m]
            ]
            if bad:
                raise ExportError("parity check failed, nothing published: " + "; ".join(bad))
            problems = check_repository(repo, graphs)
            if problems:
                raise ExportError(
                    f"the ONNX graphs do not match the configs in {repo}, nothing published "
                    "(re-export with --write-configs if the model's shapes changed on purpose):\n  " + "\n  ".join(problems)
                )

            record = _artifacts_record(artifacts, manifest)
            created = pd.Timestamp.now(tz="UTC").isoformat()
            export_sha = git_sha()
            for m in MODEL_NAMES:
                info: dict = {"model": m, "version": version, "created_at": created, "export_git_sha": export_sha, "artifacts": record}
                if m in LEAF_MODELS or (repo / m / "model.py").is_file():  # the fused CPU ranker_ensemble runs one too
                    shutil.copyfile(repo / m / "model.py", staging[m] / "model.py")
                if m in LEAF_MODELS:
                    g_in, g_out = onnx_tensors(graphs[m])
                    info["onnx_sha256"] = file_sha256(graphs[m])
                    info["inputs"] = [list(map(str, t[:2])) + [list(t[2])] for t in g_in]
                    info["outputs"] = [list(map(str, t[:2])) + [list(t[2])] for t in g_out]
                if m == "ranker":
                    info["tree_implementation"] = chosen
                if m == ENSEMBLE:
                    info["steps"] = {"ranker_features": version, "ranker": version}
                (staging[m] / VERSION_INFO).write_text(json.dumps(info, indent=2))
            # leaf models first: a poller that sees the new ensemble version finds its steps in place
            for m in MODEL_NAMES:
                target = repo / m / str(version)
                if target.exists():
                    raise ExportError(f"{m}: version folder {target} appeared during the export; refusing to overwrite")
                os.rename(staging[m], target)
        finally:
            for path in staging.values():
                if path.exists():
                    shutil.rmtree(path, ignore_errors=True)

    summary = {
        "exported_at": pd.Timestamp.now(tz="UTC").isoformat(),
        "repository": str(repo.resolve()),
        "version": version,
        "models": list(MODEL_NAMES),
        "shapes": asdict(shapes),
        "configs_written": [str(p.relative_to(repo)) for p in written],
        "ranker": {
            "tree_implementation": chosen,
            "selection": selection,
            "onnxruntime_intra_op_threads": SERVING_THREADS,
            "timing_rows": list(TIMING_ROWS),
            "trials": [asdict(t) for t in trials],
            "lightgbm_native_ms_p50": lightgbm_ms_p50(booster, feats),
        },
        "parity_max_abs_diff": parity,
        "seconds": round(time.perf_counter() - t_start, 2),
    }
    if update_manifest:
        manifest["export"] = summary
        _write_json_atomic(artifacts / "manifest.json", manifest)
    return summary
