"""The Triton side of the repository: model configs rendered from the contract, and checked.

:func:`model_specs` turns the contract's tensors (:func:`orchestrator.contract.model_tensors`)
into each model's batching and instance settings; :func:`render_config` writes the native
``config.pbtxt``, the embedded CPU ``configs/cpu.pbtxt`` and the onnxruntime-CPU
``configs/onnx_cpu.pbtxt``; :func:`check_repository` validates every graph against its configs
and the ensemble's wiring before a version is published (``export/onnx_export.py``).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import onnx

from export.features import FEATURE_NAMES
from export.two_tower import TwoTowerConfig
from orchestrator.contract import (
    ENSEMBLE_FEATURES,
    GRAPH_MODELS,
    ITEM_TOWER,
    RANKER_ENSEMBLE,
    RANKER_FEATURES,
    RANKER_MAX_ROWS,
    RANKER_TREES,
    USER_TOWER,
    Tensor,
    model_tensors,
)

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

SERVING_THREADS = 1
"""onnxruntime intra-op threads inside Triton's Python backend (and for the timings, to match)."""

_ONNX_TO_TRITON = {onnx.TensorProto.INT64: "TYPE_INT64", onnx.TensorProto.INT32: "TYPE_INT32", onnx.TensorProto.FLOAT: "TYPE_FP32"}


class ExportError(ValueError):
    """The export refused to publish (contract mismatch, failed parity, bad artifacts)."""


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
    def defaults(cls) -> Shapes:
        """The shapes of a model trained with the default settings (the checked-in configs)."""
        from export.ranker import RankerConfig

        tt = TwoTowerConfig()
        return cls(history_len=tt.history_len, dim=tt.dim, candidates=RankerConfig().candidates)


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


def _queue_block(preferred: str, delay_us: int) -> str:
    """A ``dynamic_batching`` block with the queue policy (``preferred``: sizes, "" for none)."""
    # queue policy: past QUEUE_MAX_REQUESTS waiting requests, or after QUEUE_TIMEOUT_US in the
    # queue, Triton rejects (UNAVAILABLE) instead of letting latency grow without bound; the
    # orchestrator answers such a call with its fallback, and its own admission gate keeps
    # the queue short in the first place
    return (
        "dynamic_batching {\n"
        + (f"  preferred_batch_size: [ {preferred} ]\n" if preferred else "")
        + f"  max_queue_delay_microseconds: {delay_us}\n"
        "  default_queue_policy {\n"
        "    timeout_action: REJECT\n"
        f"    default_timeout_microseconds: {QUEUE_TIMEOUT_US}\n"
        "    allow_timeout_override: true\n"
        f"    max_queue_size: {QUEUE_MAX_REQUESTS}\n"
        "  }\n"
        "}\n"
    )


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
    batching = (
        _queue_block(pref, spec.max_queue_delay_us) if spec.max_batch_size > 0 else ""  # no batch axis, nothing to batch
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


FUSED_CHAIN = (RANKER_FEATURES, RANKER_TREES)
"""The graphs the CPU ``ranker_ensemble`` runs one after the other (``onnx_chain``)."""
FUSED_CONFIG_NAMES = frozenset({"configs/cpu.pbtxt"})
"""Config names under which ``ranker_ensemble`` is one Python-backend model running both graphs
(:func:`render_fused_ranker_config`); under the others it is a Triton ensemble. In the embedded
Triton each Python-backend model is a stub process, and the ensemble's hop from one stub to the
next is one more IPC round trip per call (BENCHMARKS.md "Tuning"); native backends hop in-process, so the GPU and ``onnx_cpu`` configs keep the ensemble."""
FUSED_INSTANCES = 2
"""Instances of the fused CPU ranker. It has no batch axis, so one instance runs one request at a
time on one core, where the ensemble's two stubs pipelined on two (and its ``ranker`` step
batched): measured on 2 cores at concurrency 16, one instance made about 0.7x the ensemble's
QPS, two instances more than the ensemble's (BENCHMARKS.md "Tuning"). Each instance is one more
stub process with its own onnxruntime sessions (~300 MB resident here)."""


def render_fused_ranker_config(specs: dict[str, ModelSpec]) -> str:
    """The text of ``ranker_ensemble``'s CPU config: one Python-backend model, both graphs.

    Same name, inputs and outputs as the ensemble (callers cannot tell them apart), so the
    orchestrator sends the same tensors to either. Version ``V`` of this model runs
    ``ranker_features/V`` and ``ranker/V`` (``export/triton_onnx_model.py``), so unlike the
    ensemble, whose steps follow the latest leaf versions, it can be pinned to a version.

    Without a batch axis the model cannot batch rows across requests (the ensemble's ``ranker``
    step did): each request runs alone on one of :data:`FUSED_INSTANCES` instances. A dynamic
    batcher with only a queue policy (no preferred sizes) still bounds its queue like the
    batched models' (Triton 2.51 accepts it at ``max_batch_size: 0``).
    """
    feats, ranker = specs[RANKER_FEATURES], specs[RANKER_TREES]
    outputs = tuple(Tensor(t.name, t.data_type, (-1, *t.dims)) for t in ranker.outputs)
    chain = ",".join(FUSED_CHAIN)
    return (
        "# CPU config (tritonserver --model-config-name=cpu): ranker_features -> ranker in ONE Python-backend\n"
        "# model: version V runs ranker_features/V/model.onnx then ranker/V/model.onnx with onnxruntime\n"
        "# (see model.py). The other config names keep the Triton ensemble. Generated by recsys export; checked in.\n"
        f'name: "{ENSEMBLE}"\nbackend: "python"\n'
        "max_batch_size: 0\n"
        "version_policy: { latest: { num_versions: 2 } }\n"
        + _tensor_block("input", feats.inputs)
        + _tensor_block("output", outputs)
        + f"instance_group [ {{ kind: KIND_CPU, count: {FUSED_INSTANCES} }} ]\n"
        + _queue_block("", 0)
        + f'parameters {{ key: "onnx_chain", value: {{ string_value: "{chain}" }} }}\n'
        + f'parameters {{ key: "intra_op_threads", value: {{ string_value: "{SERVING_THREADS}" }} }}\n'
    )


def render_ranker_ensemble(specs: dict[str, ModelSpec], config_name: str) -> str:
    """``ranker_ensemble``'s config under ``config_name``: fused on the embedded CPU config, else the ensemble."""
    return render_fused_ranker_config(specs) if config_name in FUSED_CONFIG_NAMES else render_ensemble_config(specs)


def render_ensemble_config(specs: dict[str, ModelSpec]) -> str:
    """The text of ``ranker_ensemble``'s config as a Triton ensemble (native configs)."""
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
"""Triton Python-backend model: runs this version's model.onnx with onnxruntime on the CPU
(``ranker_ensemble``'s CPU config: ranker_features' and ranker's graphs of this version).

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
    for config_name in CONFIG_NAMES:
        files[repo / ENSEMBLE / config_name] = render_ranker_ensemble(specs, config_name)
    files[repo / ENSEMBLE / "model.py"] = PYTHON_MODEL  # the fused CPU config runs it; the ensemble ignores it
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
                    problems.append(
                        f"{where}: {kind} '{t.name}' ONNX dims {list(dims)} lack a dynamic batch axis (max_batch_size {config.max_batch_size})"
                    )
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
            problems.append(
                f"{name}: output '{t.name}' is {t.data_type} {list(t.dims)} in config, the step produces {got.data_type} {list(got.dims)}"
            )
    return problems


def check_fused(name: str, config, leaf_configs: dict) -> list[str]:
    """Differences between the fused ``ranker_ensemble`` (:func:`render_fused_ranker_config`) and its graphs' models.

    It must run the Python backend over :data:`FUSED_CHAIN` (``onnx_chain``), take exactly the
    first model's inputs and return the last one's outputs (whole shapes, batch axis included),
    as the ensemble it replaces would.

    Returns:
        Problems, empty when the fused model stands in for the ensemble.
    """
    problems = []
    if config.backend != "python":
        problems.append(f"{name}: neither an ensemble nor the fused Python-backend model (backend {config.backend!r})")
    chain = config.parameters["onnx_chain"].string_value if "onnx_chain" in config.parameters else ""
    if tuple(m.strip() for m in chain.split(",")) != FUSED_CHAIN:
        problems.append(f"{name}: onnx_chain is {chain!r}, expected {','.join(FUSED_CHAIN)!r}")
    if config.max_batch_size != 0:
        problems.append(f"{name}: the fused model has no batch axis, max_batch_size is {config.max_batch_size}")
    first, last = (leaf_configs.get(m) for m in (FUSED_CHAIN[0], FUSED_CHAIN[-1]))
    if first is None or last is None:
        return problems + [f"{name}: the configs of {', '.join(FUSED_CHAIN)} are needed to check it"]
    got_in, got_out = config_tensors(config)
    want_in = [Tensor(t.name, t.data_type, full_dims(first, t)) for t in config_tensors(first)[0]]
    want_out = [Tensor(t.name, t.data_type, full_dims(last, t)) for t in config_tensors(last)[1]]
    for kind, got, want in (("inputs", got_in, want_in), ("outputs", got_out, want_out)):
        if got != want:
            problems.append(
                f"{name}: {kind} {[(t.name, t.data_type, list(t.dims)) for t in got]}, expected {[(t.name, t.data_type, list(t.dims)) for t in want]}"
            )
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
        check = check_ensemble if ens.platform == "ensemble" else check_fused
        problems += [f"{p} [{config_name}]" for p in check(ENSEMBLE, ens, leaves)]
    return problems
