"""``recsys export``: artifacts -> ONNX graphs -> a versioned Triton model repository.

What is published, per model folder of ``model_repository/``::

    user_tower/         config.pbtxt (onnxruntime, GPU) + configs/cpu.pbtxt (python, CPU)
                        + configs/onnx_cpu.pbtxt (onnxruntime, CPU) + model.py
    item_tower/         same layout
    ranker_features/    same layout; the feature module of export/features.py as a graph
    ranker/             same layout; the LightGBM booster translated by Hummingbird
    ranker_ensemble/    ranker_features -> ranker, for every config name
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
([U, L], compact INT32 ids) and their N = U * C candidates ([N] per-candidate tensors), a shape
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
from export.two_tower import TwoTower, TwoTowerConfig
from orchestrator.artifacts import EXPORTED_FILES, file_sha256
from orchestrator.contract import (  # noqa: F401 - MODEL_NAMES, Tensor, ENSEMBLE_FEATURES: re-exported for the tests
    ENSEMBLE_FEATURES,
    GRAPH_MODELS,
    ITEM_TOWER,
    MODEL_NAMES,
    RANKER_ENSEMBLE,
    RANKER_MAX_ROWS,
    RANKER_FEATURES,
    RANKER_TREES,
    USER_TOWER,
    VERSION_INFO,
    Tensor,
    model_tensors,
    published_versions,
)

OPSET = 17
"""ONNX opset of every graph: supported by onnxruntime 1.32 and by Triton 2.51's onnxruntime backend."""

ENSEMBLE = RANKER_ENSEMBLE
LEAF_MODELS = GRAPH_MODELS
CONFIG_NAMES = ("config.pbtxt", "configs/cpu.pbtxt", "configs/onnx_cpu.pbtxt")
"""The configurations every model carries: native GPU (default name), ``--model-config-name=cpu``
(Python backend, the embedded Triton) and ``--model-config-name=onnx_cpu`` (NGC image, no GPU)."""
CONFIG_VARIANTS = {
    "config.pbtxt": {"cpu": False},
    "configs/cpu.pbtxt": {"cpu": True},
    "configs/onnx_cpu.pbtxt": {"cpu": True, "python_backend": False},
}
""":func:`render_config` keyword arguments of each name of :data:`CONFIG_NAMES`."""
ONNX_CPU_INTRA_OP_THREADS = 2
"""onnxruntime intra-op threads of one ``onnx_cpu`` instance. With one instance per model and
four leaf models, a busy server asks for about 4 x 2 threads: sized for an 8-core host. The
backend's default (0) gives every instance all cores, which oversubscribes a small host as
soon as two models run at once; raise it on a big host where one model dominates."""
ONNX_CPU_INTER_OP_THREADS = 1
"""Graphs are a chain of small ops: parallel branches buy nothing, extra threads only contend."""

TREE_IMPLEMENTATIONS = ("gemm", "tree_trav", "perf_tree_trav")
TIMING_ROWS = (200, 500)
"""Batch sizes the tree strategies are timed at: one to two users' worth of candidates."""
PARITY_BATCHES = {"user_tower": (1, 7, 256), "ranker_features": ((1, 1), (7, 7), (200, 1), (256, 4)), "ranker": (1, 7, 200, 4096)}
"""Batch sizes each graph is checked at (``ranker_features``: (candidates, users))."""
SERVING_THREADS = 1
"""onnxruntime intra-op threads inside Triton's Python backend (and for the timings, to match)."""

_ONNX_TO_TRITON = {onnx.TensorProto.INT64: "TYPE_INT64", onnx.TensorProto.INT32: "TYPE_INT32", onnx.TensorProto.FLOAT: "TYPE_FP32"}


class ExportError(ValueError):
    """The export refused to publish (contract mismatch, failed parity, bad artifacts)."""


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
    """Hummingbird's tree module with a pinned ``score`` [B, 1] output."""

    def __init__(self, executor: nn.Module):
        super().__init__()
        self.executor = executor

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        out = self.executor(features)
        if isinstance(out, (tuple, list)):  # classifiers return (label, proba); a ranker has one output
            out = out[0]
        return out.reshape(-1, 1)


@dataclass(frozen=True)
class Shapes:
    """The sizes the configs depend on.

    Attributes:
        history_len: ``L``, the user tower's history window.
        dim: Embedding size.
        n_features: Ranker feature count.
        candidates: Candidates per user (shapes the ranker's preferred batch sizes).
    """

    history_len: int
    dim: int
    n_features: int = len(FEATURE_NAMES)
    candidates: int = 200

    @classmethod
    def defaults(cls) -> "Shapes":
        """The shapes of a model trained with the default settings (the checked-in configs)."""
        from export.ranker import RankerConfig

        tt = TwoTowerConfig()
        return cls(history_len=tt.history_len, dim=tt.dim, candidates=RankerConfig().candidates)


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
    onnxruntime rejects as duplicate definitions (FIELD-NOTES).
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


def export_ranker_features(module: RankerFeatures, history_len: int, path: Path) -> None:
    """Writes ``ranker_features`` ONNX: U histories [U, L] + N = U * C candidates [N] -> features [N, F]."""
    L = history_len
    # traced with U=2, C=3 so neither axis is mistaken for a constant
    args = (
        torch.zeros(6, dtype=torch.int32),
        torch.zeros(6),
        torch.zeros(6),
        torch.full((2, L), -1, dtype=torch.int32),
        torch.zeros(2, L),
    )
    axes = {"item": {0: "n"}, "retrieval_score": {0: "n"}, "retrieval_rank": {0: "n"}, "history": {0: "u"}, "history_rating": {0: "u"}, "features": {0: "n"}}
    names = ("item", "retrieval_score", "retrieval_rank", "history", "history_rating")
    _export_graph(module, args, path, names, ("features",), dynamic_axes=axes)


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
    torch translation is exported here with the legacy exporter (FIELD-NOTES). Thresholds
    are made float32-exact first (:func:`float32_exact_booster`).

    Returns:
        How many axis-less ``Squeeze`` nodes were pinned (:func:`_pin_squeeze_axes`).
    """
    from hummingbird.ml import convert

    booster = float32_exact_booster(booster)
    n = booster.num_feature()
    sample = np.zeros((4, n), np.float32)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        hb = convert(booster, "torch", sample, extra_config={"tree_implementation": tree_implementation})
    _export_graph(RankerGraph(hb.model), (torch.zeros(2, n),), path, ("features",), ("score",))
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


def sample_candidate_inputs(n: int, n_items: int, history_len: int, seed: int = 0, users: int | None = None) -> dict[str, np.ndarray]:
    """Random but valid ``ranker_features`` inputs: ``n`` candidates of ``users`` users (default: one each)."""
    rng = np.random.default_rng(seed)
    users = n if users is None else users
    if users <= 0 or n % users:
        raise ValueError(f"{n} candidates do not split evenly over {users} users")
    user = sample_user_inputs(users, n_items, history_len, (1, 1, 1), seed)
    return {
        "item": rng.integers(0, n_items, n).astype(np.int32),
        "retrieval_score": rng.uniform(-1, 1, n).astype(np.float32),
        "retrieval_rank": rng.integers(0, 200, n).astype(np.float32),
        "history": user["history"].astype(np.int32),
        "history_rating": user["history_rating"],
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


# --------------------------------------------------------------------------- configs


@dataclass(frozen=True)
class ModelSpec:
    """What a model's two configs say.

    Attributes:
        name: Model (folder) name.
        inputs: Input tensors.
        outputs: Output tensors.
        max_batch_size: Largest batch Triton may form (rows: users, items or feature rows); 0: no
            batch axis, the dims are the full shapes.
        preferred_batch_sizes: Batch sizes the dynamic batcher aims for.
        max_queue_delay_us: How long a request may wait for others to batch with.
    """

    name: str
    inputs: tuple[Tensor, ...]
    outputs: tuple[Tensor, ...]
    max_batch_size: int
    preferred_batch_sizes: tuple[int, ...] = ()
    max_queue_delay_us: int = 500


def model_specs(shapes: Shapes) -> dict[str, ModelSpec]:
    """The four graph-backed models' tensors and batching, for ``shapes``."""
    tensors = model_tensors(shapes.history_len, shapes.dim, shapes.n_features)
    c = max(1, shapes.candidates)
    ranker_max = RANKER_MAX_ROWS
    # one request carries one user's candidates; preferring multiples of it lets the batcher
    # send a lone request at once and merge 2, 4, 8 users' worth under load
    ranker_pref = tuple(sorted({min(c * k, ranker_max) for k in (1, 2, 4, 8)}))
    return {
        USER_TOWER: ModelSpec(
            USER_TOWER,
            *tensors[USER_TOWER],
            max_batch_size=64,
            preferred_batch_sizes=(8, 16, 32),
            # one user per request: a lone request waits at most this long for company
            max_queue_delay_us=200,
        ),
        ITEM_TOWER: ModelSpec(
            ITEM_TOWER,
            *tensors[ITEM_TOWER],
            max_batch_size=4096,
            preferred_batch_sizes=(256, 1024, 4096),
            max_queue_delay_us=500,
        ),
        # no batch axis: histories [U, L] once per user with [N] candidates (orchestrator/contract.py)
        RANKER_FEATURES: ModelSpec(RANKER_FEATURES, *tensors[RANKER_FEATURES], max_batch_size=0),
        RANKER_TREES: ModelSpec(RANKER_TREES, *tensors[RANKER_TREES], ranker_max, ranker_pref, 500),
    }


QUEUE_MAX_REQUESTS = 64
"""Requests one model's dynamic batcher may hold waiting; more are rejected at once."""
QUEUE_TIMEOUT_US = 1_000_000
"""Longest a request may wait in a model's queue before Triton rejects it: the orchestrator's
default ``triton_timeout_s``, after which nobody waits for the answer any more (a request that
sets its own Triton timeout overrides it: ``allow_timeout_override``). 200 ms turned a hot
reload on a busy machine (load ~30) into popular fallbacks."""


def _tensor_block(kind: str, tensors: Sequence[Tensor]) -> str:
    rows = []
    for t in tensors:
        dims = ", ".join(str(d) for d in t.dims)
        rows.append(f'  {{\n    name: "{t.name}"\n    data_type: {t.data_type}\n    dims: [ {dims} ]\n  }}')
    return f"{kind} [\n" + ",\n".join(rows) + "\n]\n"


def render_config(spec: ModelSpec, cpu: bool, python_backend: bool | None = None) -> str:
    """The text of one of a leaf model's configs.

    Args:
        spec: The model.
        cpu: ``KIND_CPU`` instances (else ``KIND_GPU``).
        python_backend: Run the graph with onnxruntime inside Triton's Python backend
            (``configs/cpu.pbtxt``, for the embedded Triton that has no onnxruntime backend);
            False: Triton's native onnxruntime backend. None: the Python backend on the CPU,
            the native backend on the GPU (the two original configs).

    Returns:
        ``config.pbtxt`` (native, GPU), ``configs/cpu.pbtxt`` (Python backend, CPU) or
        ``configs/onnx_cpu.pbtxt`` (native, CPU) as text.
    """
    if python_backend is None:
        python_backend = cpu
    if cpu and not python_backend:
        head = (
            "# CPU config for Triton's onnxruntime backend (NGC image on a host without a GPU:\n"
            "# tritonserver --model-config-name=onnx_cpu), <version>/model.onnx.\n"
            "# Generated by recsys export; checked in.\n"
            f'name: "{spec.name}"\nbackend: "onnxruntime"\n'
        )
        group = "instance_group [ { kind: KIND_CPU, count: 1 } ]\n"
        params = (
            f'parameters {{ key: "intra_op_thread_count", value: {{ string_value: "{ONNX_CPU_INTRA_OP_THREADS}" }} }}\n'
            f'parameters {{ key: "inter_op_thread_count", value: {{ string_value: "{ONNX_CPU_INTER_OP_THREADS}" }} }}\n'
        )
    elif python_backend:
        head = (
            "# CPU config (tritonserver --model-config-name=cpu): the Python backend runs the same\n"
            "# <version>/model.onnx with onnxruntime (see model.py). Generated by recsys export; checked in.\n"
            f'name: "{spec.name}"\nbackend: "python"\n'
        )
        group = "instance_group [ { kind: KIND_CPU, count: 1 } ]\n"
        params = f'parameters {{ key: "intra_op_threads", value: {{ string_value: "{SERVING_THREADS}" }} }}\n'
    else:
        head = (
            "# Native config: Triton's onnxruntime backend on the GPU, <version>/model.onnx.\n"
            "# Generated by recsys export; checked in.\n"
            f'name: "{spec.name}"\nbackend: "onnxruntime"\n'
        )
        group = "instance_group [ { kind: KIND_GPU, count: 1 } ]\n"
        params = ""
    pref = ", ".join(str(p) for p in spec.preferred_batch_sizes)
    # queue policy: past QUEUE_MAX_REQUESTS waiting requests, or after QUEUE_TIMEOUT_US in the
    # queue, Triton rejects (UNAVAILABLE) instead of letting latency grow without bound; the
    # orchestrator answers such a call with its fallback, and its own admission gate keeps
    # the queue short in the first place
    batching = (
        "dynamic_batching {\n"
        f"  preferred_batch_size: [ {pref} ]\n"
        f"  max_queue_delay_microseconds: {spec.max_queue_delay_us}\n"
        "  default_queue_policy {\n"
        "    timeout_action: REJECT\n"
        f"    default_timeout_microseconds: {QUEUE_TIMEOUT_US}\n"
        "    allow_timeout_override: true\n"
        f"    max_queue_size: {QUEUE_MAX_REQUESTS}\n"
        "  }\n"
        "}\n"
        if spec.max_batch_size > 0
        else ""  # no batch axis, nothing to batch
    )
    # two versions side by side: the one being replaced keeps serving its pinned requests
    # while the next loads (hot reload), and an A/B test can route users to either
    policy = "version_policy: { latest: { num_versions: 2 } }\n"
    return (
        head
        + f"max_batch_size: {spec.max_batch_size}\n"
        + policy
        + _tensor_block("input", spec.inputs)
        + _tensor_block("output", spec.outputs)
        + group
        + batching
        + params
    )


def render_ensemble_config(specs: dict[str, ModelSpec]) -> str:
    """The text of ``ranker_ensemble``'s config (identical under every config name)."""
    feats, ranker = specs["ranker_features"], specs["ranker"]
    in_map = "\n".join(f'      input_map {{ key: "{t.name}", value: "{t.name}" }}' for t in feats.inputs)
    batch = min(feats.max_batch_size, ranker.max_batch_size)
    # an unbatched ensemble states the ranker's outputs with their batch axis ([N, 1])
    outputs = ranker.outputs if batch > 0 else tuple(Tensor(t.name, t.data_type, (-1, *t.dims)) for t in ranker.outputs)
    return (
        "# ranker_features -> ranker in one call: U users' histories [U, L] + their N = U * C candidates [N].\n"
        "# Generated by recsys export; checked in (the same text serves every config name).\n"
        f'name: "{ENSEMBLE}"\nplatform: "ensemble"\n'
        f"max_batch_size: {batch}\n"
        + _tensor_block("input", feats.inputs)
        + _tensor_block("output", outputs)
        + "ensemble_scheduling {\n  step [\n"
        "    {\n"
        '      model_name: "ranker_features"\n      model_version: -1\n'
        f"{in_map}\n"
        f'      output_map {{ key: "features", value: "{ENSEMBLE_FEATURES}" }}\n'
        "    },\n"
        "    {\n"
        '      model_name: "ranker"\n      model_version: -1\n'
        f'      input_map {{ key: "features", value: "{ENSEMBLE_FEATURES}" }}\n'
        f'      output_map {{ key: "score", value: "{ranker.outputs[0].name}" }}\n'
        "    }\n"
        "  ]\n}\n"
    )


PYTHON_MODEL = '''\
"""Triton Python-backend model: runs this version's model.onnx with onnxruntime on the CPU.

Generated by ``recsys export`` and checked in; the export copies it into every version folder
beside model.onnx. The implementation, shared by every graph-backed model, is
``export/triton_onnx_model.py`` in the project installed in the server's virtualenv.
"""

from export.triton_onnx_model import TritonPythonModel  # noqa: F401
'''


def write_repository_files(repo: str | Path, shapes: Shapes, overwrite: bool = False) -> list[Path]:
    """Writes the configs (every name of :data:`CONFIG_NAMES`) and ``model.py`` of every model into ``repo``.

    Args:
        repo: Model repository folder.
        shapes: Sizes the configs describe.
        overwrite: Replace existing files (``recsys export --write-configs``); otherwise only
            missing files are written, so checked-in configs stay authoritative.

    Returns:
        The files written.
    """
    repo = Path(repo)
    specs = model_specs(shapes)
    files: dict[Path, str] = {}
    for name, spec in specs.items():
        for config_name, variant in CONFIG_VARIANTS.items():
            files[repo / name / config_name] = render_config(spec, **variant)
        files[repo / name / "model.py"] = PYTHON_MODEL
    ensemble = render_ensemble_config(specs)
    for config_name in CONFIG_NAMES:
        files[repo / ENSEMBLE / config_name] = ensemble
    written = []
    for path, text in files.items():
        if path.exists() and not overwrite:
            continue
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text)
        written.append(path)
    return written


# --------------------------------------------------------------------------- contract checks


def read_config(path: str | Path):
    """Parses a ``.pbtxt`` into ``tritonclient.grpc.model_config_pb2.ModelConfig``.

    Raises:
        ExportError: The file is missing or does not parse.
    """
    from google.protobuf import text_format
    from tritonclient.grpc import model_config_pb2

    path = Path(path)
    if not path.is_file():
        raise ExportError(f"{path}: missing model config")
    try:
        return text_format.Parse(path.read_text(), model_config_pb2.ModelConfig())
    except text_format.ParseError as exc:
        raise ExportError(f"{path}: does not parse as a Triton ModelConfig: {exc}") from exc


def full_dims(config, tensor: Tensor) -> tuple[int, ...]:
    """A tensor's whole shape as a caller sends it: the batch axis (``-1``) first when the model batches."""
    return ((-1,) if config.max_batch_size > 0 else ()) + tuple(tensor.dims)


def config_tensors(config) -> tuple[list[Tensor], list[Tensor]]:
    """``(inputs, outputs)`` of a parsed config as :class:`Tensor` (dims without the batch axis)."""
    from tritonclient.grpc import model_config_pb2

    def conv(items) -> list[Tensor]:
        return [Tensor(t.name, model_config_pb2.DataType.Name(t.data_type), tuple(int(d) for d in t.dims)) for t in items]

    return conv(config.input), conv(config.output)


def onnx_tensors(path: str | Path) -> tuple[list[tuple[str, str, tuple]], list[tuple[str, str, tuple]]]:
    """``(inputs, outputs)`` of an ONNX graph: ``(name, Triton type, dims)``, a symbolic dim as its name."""
    model = onnx.load(str(path), load_external_data=False)

    def conv(values) -> list[tuple[str, str, tuple]]:
        out = []
        for v in values:
            tt = v.type.tensor_type
            dtype = _ONNX_TO_TRITON.get(tt.elem_type, f"ONNX:{onnx.TensorProto.DataType.Name(tt.elem_type)}")
            dims = tuple(d.dim_param if d.HasField("dim_param") or not d.HasField("dim_value") else int(d.dim_value) for d in tt.shape.dim)
            out.append((v.name, dtype, dims))
        return out

    initializers = {i.name for i in model.graph.initializer}
    return conv([v for v in model.graph.input if v.name not in initializers]), conv(model.graph.output)


def check_graph_against_config(model: str, config_name: str, config, graph_path: str | Path) -> list[str]:
    """Differences between an ONNX graph's signature and one config of its model.

    Checks that names match both ways (every graph input is fed, every config tensor
    exists), that types are equal, that the first graph dim is a dynamic batch axis when
    ``max_batch_size > 0``, and that the remaining dims equal the config's (``-1`` in the
    config accepts any dim).

    Returns:
        Human-readable problems, each naming the model, config, tensor and difference.
    """
    problems = []
    where = f"{model} ({config_name})"
    if config.name and config.name != model:
        problems.append(f"{where}: config name {config.name!r} is not the folder name")
    cfg_in, cfg_out = config_tensors(config)
    g_in, g_out = onnx_tensors(graph_path)
    batched = config.max_batch_size > 0
    for kind, cfg, graph in (("input", cfg_in, g_in), ("output", cfg_out, g_out)):
        by_name = {name: (dtype, dims) for name, dtype, dims in graph}
        cfg_names = {t.name for t in cfg}
        for t in cfg:
            if t.name not in by_name:
                problems.append(f"{where}: {kind} '{t.name}' is in the config but not in the ONNX graph (graph has {sorted(by_name)})")
                continue
            dtype, dims = by_name[t.name]
            if dtype != t.data_type:
                problems.append(f"{where}: {kind} '{t.name}' data_type {t.data_type} in config, {dtype} in ONNX")
            if batched:
                if not dims or isinstance(dims[0], int):
                    problems.append(f"{where}: {kind} '{t.name}' ONNX dims {list(dims)} lack a dynamic batch axis (max_batch_size {config.max_batch_size})")
                    continue
                dims = dims[1:]
            if len(dims) != len(t.dims) or any(c != -1 and c != g for c, g in zip(t.dims, dims)):
                problems.append(f"{where}: {kind} '{t.name}' dims {list(t.dims)} in config, {list(dims)} in ONNX (batch axis excluded)")
        if kind == "input":
            for name in sorted(set(by_name) - cfg_names):
                problems.append(f"{where}: ONNX input '{name}' is not declared in the config")
    return problems


def check_ensemble(name: str, config, leaf_configs: dict) -> list[str]:
    """Differences in an ensemble's wiring.

    Every step must name a known model and map every one of that model's inputs from an
    ensemble input or an earlier step's output (with matching types and dims), only from
    tensors that exist; every ensemble output must be produced by a step.

    Args:
        name: Ensemble model name.
        config: Its parsed config.
        leaf_configs: Parsed configs of the models it may call, by name.

    Returns:
        Problems, empty when the wiring closes.
    """
    problems = []
    if config.platform != "ensemble":
        return [f"{name}: platform is {config.platform!r}, not 'ensemble'"]
    ens_in, ens_out = config_tensors(config)
    # whole shapes, batch axis included: an unbatched ensemble may feed a batching step
    # ([N, F] into a ranker with dims [F]), which is the layout Triton checks too
    available: dict[str, Tensor] = {t.name: Tensor(t.name, t.data_type, full_dims(config, t)) for t in ens_in}
    for i, step in enumerate(config.ensemble_scheduling.step):
        where = f"{name} step {i} ({step.model_name})"
        if step.model_name not in leaf_configs:
            problems.append(f"{where}: unknown model")
            continue
        leaf = leaf_configs[step.model_name]
        s_in, s_out = config_tensors(leaf)
        s_in = [Tensor(t.name, t.data_type, full_dims(leaf, t)) for t in s_in]
        s_out = [Tensor(t.name, t.data_type, full_dims(leaf, t)) for t in s_out]
        s_in_by, s_out_by = {t.name: t for t in s_in}, {t.name: t for t in s_out}
        for t in s_in:
            if t.name not in step.input_map:
                problems.append(f"{where}: model input '{t.name}' is not mapped")
        for model_tensor, ens_tensor in step.input_map.items():
            if model_tensor not in s_in_by:
                problems.append(f"{where}: input_map key '{model_tensor}' is not an input of the model")
            elif ens_tensor not in available:
                problems.append(f"{where}: input '{model_tensor}' reads '{ens_tensor}', which no ensemble input or earlier step provides")
            else:
                src, dst = available[ens_tensor], s_in_by[model_tensor]
                if (src.data_type, src.dims) != (dst.data_type, dst.dims):
                    problems.append(
                        f"{where}: input '{model_tensor}' wants {dst.data_type} {list(dst.dims)}, "
                        f"'{ens_tensor}' is {src.data_type} {list(src.dims)}"
                    )
        for model_tensor, ens_tensor in step.output_map.items():
            if model_tensor not in s_out_by:
                problems.append(f"{where}: output_map key '{model_tensor}' is not an output of the model")
            else:
                available[ens_tensor] = Tensor(ens_tensor, s_out_by[model_tensor].data_type, s_out_by[model_tensor].dims)
    ens_out = [Tensor(t.name, t.data_type, full_dims(config, t)) for t in ens_out]
    for t in ens_out:
        if t.name not in available or t.name in {x.name for x in ens_in}:
            problems.append(f"{name}: output '{t.name}' is produced by no step")
        elif (available[t.name].data_type, available[t.name].dims) != (t.data_type, t.dims):
            got = available[t.name]
            problems.append(f"{name}: output '{t.name}' is {t.data_type} {list(t.dims)} in config, the step produces {got.data_type} {list(got.dims)}")
    return problems


def check_repository(repo: str | Path, graphs: dict[str, Path]) -> list[str]:
    """Every contract problem of a repository: graphs vs every config, and ensemble wiring.

    Args:
        repo: Model repository.
        graphs: ONNX file of each leaf model (staged or published).
    """
    repo = Path(repo)
    problems: list[str] = []
    for config_name in CONFIG_NAMES:
        leaves = {}
        for model in LEAF_MODELS:
            try:
                leaves[model] = read_config(repo / model / config_name)
            except ExportError as exc:
                problems.append(f"{model}: {exc}")
                continue
            if model in graphs:
                problems += check_graph_against_config(model, config_name, leaves[model], graphs[model])
        try:
            ens = read_config(repo / ENSEMBLE / config_name)
        except ExportError as exc:
            problems.append(f"{ENSEMBLE}: {exc}")
            continue
        problems += [f"{p} [{config_name}]" for p in check_ensemble(ENSEMBLE, ens, leaves)]
    return problems


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


def _parity(graphs: dict[str, Path], model: TwoTower, features: RankerFeatures, booster: lgb.Booster, cands: dict) -> dict[str, dict[str, float]]:
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
        x = sample_candidate_inputs(b, n_items, cfg.history_len, seed=b, users=users)
        out["ranker_features"][str(b)] = _max_diff(sess.run(["features"], x)[0], _features_torch(features, x))
    sess = session(graphs["ranker"])
    feats = _features_torch(features, cands)
    for b in PARITY_BATCHES["ranker"]:
        rows = feats[np.arange(b) % len(feats)]
        out["ranker"][str(b)] = _max_diff(
            sess.run(["score"], {"features": rows})[0], booster.predict(rows, num_threads=1).reshape(-1, 1)
        )
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
    for name in ("two_tower.pt", "ranker_features.pt", "ranker.lgb", "manifest.json"):
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
            export_ranker_features(features, cfg.history_len, graphs["ranker_features"])

            # realistic feature rows (from the feature module itself) for choosing and checking the trees
            cands = sample_candidate_inputs(4096, n_items, cfg.history_len, seed=11)
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
                if m in LEAF_MODELS:
                    shutil.copyfile(repo / m / "model.py", staging[m] / "model.py")
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
