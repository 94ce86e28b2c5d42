"""The Triton contract: configs (all three names) vs ONNX graphs, ensemble wiring, checked-in files.

The comparisons here parse the configs with Triton's own protobuf schema and read the ONNX
graphs directly, independently of the export's checking code (which is tested too).
"""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import onnx
import pytest
from google.protobuf import text_format
from tritonclient.grpc import model_config_pb2 as mc

from export.triton_config import (
    CONFIG_NAMES,
    CONFIG_VARIANTS,
    ENSEMBLE,
    FUSED_CHAIN,
    FUSED_CONFIG_NAMES,
    LEAF_MODELS,
    ONNX_CPU_INTER_OP_THREADS,
    ONNX_CPU_INTRA_OP_THREADS,
    PYTHON_MODEL,
    Shapes,
    check_ensemble,
    check_fused,
    check_repository,
    model_specs,
    read_config,
    render_config,
    render_ensemble_config,
    render_ranker_ensemble,
)
from orchestrator.contract import MODEL_NAMES

ROOT = Path(__file__).resolve().parents[1]
CHECKED_IN = ROOT / "model_repository"
ONNX_TYPES = {onnx.TensorProto.INT64: mc.TYPE_INT64, onnx.TensorProto.INT32: mc.TYPE_INT32, onnx.TensorProto.FLOAT: mc.TYPE_FP32}


def parse(path: Path) -> mc.ModelConfig:
    return text_format.Parse(path.read_text(), mc.ModelConfig())


def graph_signature(path: Path) -> dict[str, tuple[int, list]]:
    g = onnx.load(str(path)).graph
    init = {i.name for i in g.initializer}
    out = {}
    for v in [*g.input, *g.output]:
        if v.name in init:
            continue
        tt = v.type.tensor_type
        dims = [d.dim_param or None if not d.HasField("dim_value") else d.dim_value for d in tt.shape.dim]
        out[v.name] = (ONNX_TYPES.get(tt.elem_type, -1), dims)
    return out


def wiring_closes(ensemble: mc.ModelConfig, leaves: dict[str, mc.ModelConfig]) -> list[str]:
    """An independent check: inputs come from the ensemble or earlier steps; outputs are produced."""
    problems = []
    available = {t.name for t in ensemble.input}
    for step in ensemble.ensemble_scheduling.step:
        leaf = leaves[step.model_name]
        if set(step.input_map) != {t.name for t in leaf.input}:
            problems.append(f"{step.model_name}: input_map keys {sorted(step.input_map)}")
        problems += [f"{step.model_name}: '{v}' unavailable" for v in step.input_map.values() if v not in available]
        if not set(step.output_map) <= {t.name for t in leaf.output}:
            problems.append(f"{step.model_name}: output_map keys {sorted(step.output_map)}")
        available |= set(step.output_map.values())
    problems += [f"output '{t.name}' never produced" for t in ensemble.output if t.name not in available]
    return problems


@pytest.mark.parametrize("config_name", CONFIG_NAMES)
@pytest.mark.parametrize("model", MODEL_NAMES)
def test_checked_in_configs_parse(model, config_name):
    config = parse(CHECKED_IN / model / config_name)
    assert config.name == model
    # the feature step (and so the ensemble) takes [U, L] histories with [N] candidates: no batch axis
    unbatched = model in ("ranker_features", ENSEMBLE)
    assert (config.max_batch_size == 0) if unbatched else (config.max_batch_size > 0)
    if model == ENSEMBLE and config_name not in FUSED_CONFIG_NAMES:
        assert config.platform == "ensemble"
        return
    if model == ENSEMBLE:  # the embedded CPU config: both graphs in one Python-backend model, queue bounded
        assert config.backend == "python"
        assert config.parameters["onnx_chain"].string_value == ",".join(FUSED_CHAIN)
        assert list(config.dynamic_batching.preferred_batch_size) == []
        policy = config.dynamic_batching.default_queue_policy
        assert policy.timeout_action == mc.ModelQueuePolicy.REJECT and policy.max_queue_size > 0
        return
    cpu = config_name != "config.pbtxt"
    assert config.backend == ("python" if config_name == "configs/cpu.pbtxt" else "onnxruntime")
    kind = mc.ModelInstanceGroup.KIND_CPU if cpu else mc.ModelInstanceGroup.KIND_GPU
    assert [g.kind for g in config.instance_group] == [kind]
    if unbatched:
        assert not config.HasField("dynamic_batching")
        return
    assert config.HasField("dynamic_batching")
    assert config.dynamic_batching.max_queue_delay_microseconds > 0
    policy = config.dynamic_batching.default_queue_policy  # overload: reject, never queue without bound
    assert policy.timeout_action == mc.ModelQueuePolicy.REJECT
    assert policy.max_queue_size > 0 and policy.default_timeout_microseconds > 0
    assert all(0 < p <= config.max_batch_size for p in config.dynamic_batching.preferred_batch_size)


@pytest.mark.parametrize("model", LEAF_MODELS)
def test_every_config_of_a_model_describes_the_same_tensors(model):
    native, *others = (parse(CHECKED_IN / model / n) for n in CONFIG_NAMES)
    for other in others:
        assert list(native.input) == list(other.input)
        assert list(native.output) == list(other.output)
        assert native.max_batch_size == other.max_batch_size
        assert native.dynamic_batching == other.dynamic_batching
        assert native.version_policy == other.version_policy


@pytest.mark.parametrize("model", LEAF_MODELS)
def test_onnx_cpu_config_is_the_native_config_on_cpu_with_bounded_threads(model):
    """The NGC image on a host without a GPU: same backend as config.pbtxt, KIND_CPU, and thread
    counts set (the backend's default gives each instance every core)."""
    native = parse(CHECKED_IN / model / "config.pbtxt")
    onnx_cpu = parse(CHECKED_IN / model / "configs/onnx_cpu.pbtxt")
    assert onnx_cpu.backend == native.backend == "onnxruntime"
    assert [g.kind for g in onnx_cpu.instance_group] == [mc.ModelInstanceGroup.KIND_CPU]
    assert all(g.count >= 1 and not g.gpus for g in onnx_cpu.instance_group)
    params = {k: v.string_value for k, v in onnx_cpu.parameters.items()}
    assert params == {
        "intra_op_thread_count": str(ONNX_CPU_INTRA_OP_THREADS),
        "inter_op_thread_count": str(ONNX_CPU_INTER_OP_THREADS),
    }
    assert ONNX_CPU_INTRA_OP_THREADS >= 1 and ONNX_CPU_INTER_OP_THREADS >= 1
    # the rest is the native config: strip what differs and compare whole messages
    for config in (native, onnx_cpu):
        del config.instance_group[:]
        config.ClearField("parameters")
    assert native == onnx_cpu


def test_checked_in_files_are_what_the_generator_writes():
    """Drift guard. After a deliberate shape change (e.g. a new ranker feature) regenerate with
    ``python -c "from export.triton_config import *; write_repository_files('model_repository', Shapes.defaults(), overwrite=True)"``
    (or ``recsys export --write-configs`` with full-size artifacts) and commit the result."""
    specs = model_specs(Shapes.defaults())
    for model, spec in specs.items():
        for config_name in CONFIG_NAMES:
            expected = text_format.Parse(render_config(spec, **CONFIG_VARIANTS[config_name]), mc.ModelConfig())
            assert parse(CHECKED_IN / model / config_name) == expected, (model, config_name)
        assert (CHECKED_IN / model / "model.py").read_text() == PYTHON_MODEL, model
    for config_name in CONFIG_NAMES:
        expected = text_format.Parse(render_ranker_ensemble(specs, config_name), mc.ModelConfig())
        assert parse(CHECKED_IN / ENSEMBLE / config_name) == expected, config_name
    assert (CHECKED_IN / ENSEMBLE / "model.py").read_text() == PYTHON_MODEL
    assert FUSED_CONFIG_NAMES == {"configs/cpu.pbtxt"}  # the GPU and onnx_cpu configs stay real ensembles
    assert text_format.Parse(render_ensemble_config(specs), mc.ModelConfig()).platform == "ensemble"


@pytest.mark.parametrize("config_name", sorted(set(CONFIG_NAMES) - FUSED_CONFIG_NAMES))
def test_checked_in_ensemble_wiring_closes(config_name):
    leaves = {m: parse(CHECKED_IN / m / config_name) for m in LEAF_MODELS}
    ensemble = parse(CHECKED_IN / ENSEMBLE / config_name)
    assert wiring_closes(ensemble, leaves) == []
    assert check_ensemble(ENSEMBLE, ensemble, leaves) == []
    # the ensemble takes exactly the feature model's inputs and returns the ranker's output
    assert list(ensemble.input) == list(leaves["ranker_features"].input)
    # the unbatched ensemble states the ranker's batched [1] output with its batch axis
    assert [(t.name, t.data_type, [-1, *t.dims]) for t in leaves["ranker"].output] == [
        (t.name, t.data_type, list(t.dims)) for t in ensemble.output
    ]
    steps = ensemble.ensemble_scheduling.step
    assert [s.model_name for s in steps] == ["ranker_features", "ranker"]
    assert steps[0].output_map["features"] == steps[1].input_map["features"]  # a named intermediate tensor
    assert steps[0].output_map["features"] not in {t.name for t in ensemble.input}


@pytest.mark.parametrize("config_name", CONFIG_NAMES)
@pytest.mark.parametrize("model", LEAF_MODELS)
def test_exported_graphs_match_both_configs(tiny_repository, model, config_name):
    config = parse(tiny_repository / model / config_name)
    sig = graph_signature(tiny_repository / model / "1" / "model.onnx")
    declared = [*config.input, *config.output]
    assert {t.name for t in declared} == set(sig), model
    for t in declared:
        dtype, dims = sig[t.name]
        assert dtype == t.data_type, (model, t.name)
        assert isinstance(dims[0], str), (model, t.name, "batch axis must be dynamic")
        if config.max_batch_size > 0:
            assert dims[1:] == list(t.dims), (model, t.name)
        else:  # whole shapes in the config: -1 where the graph's axis is symbolic
            assert [-1 if isinstance(d, str) else d for d in dims] == list(t.dims), (model, t.name)


def test_exported_repository_passes_the_export_checks(tiny_repository):
    graphs = {m: tiny_repository / m / "1" / "model.onnx" for m in LEAF_MODELS}
    assert check_repository(tiny_repository, graphs) == []
    for config_name in set(CONFIG_NAMES) - FUSED_CONFIG_NAMES:
        leaves = {m: parse(tiny_repository / m / config_name) for m in LEAF_MODELS}
        assert wiring_closes(parse(tiny_repository / ENSEMBLE / config_name), leaves) == []
    for version in (p for p in (tiny_repository / ENSEMBLE).iterdir() if p.name.isdigit()):
        assert (version / "model.py").read_text() == PYTHON_MODEL  # what the fused config runs


@pytest.mark.parametrize("config_name", sorted(FUSED_CONFIG_NAMES))
def test_fused_ranker_stands_in_for_the_ensemble(config_name):
    """Same inputs and outputs as the ensemble it replaces, and a broken one is reported."""
    leaves = {m: parse(CHECKED_IN / m / config_name) for m in LEAF_MODELS}
    fused = parse(CHECKED_IN / ENSEMBLE / config_name)
    ensemble = parse(CHECKED_IN / ENSEMBLE / "config.pbtxt")
    assert check_fused(ENSEMBLE, fused, leaves) == []
    assert (list(fused.input), list(fused.output), fused.max_batch_size) == (list(ensemble.input), list(ensemble.output), 0)
    assert fused.version_policy == leaves["ranker"].version_policy  # two versions side by side, like its graphs

    chain = mc.ModelConfig()
    chain.CopyFrom(fused)
    chain.parameters["onnx_chain"].string_value = "ranker,ranker_features"
    assert any("onnx_chain is 'ranker,ranker_features'" in p for p in check_fused(ENSEMBLE, chain, leaves))
    dropped = mc.ModelConfig()
    dropped.CopyFrom(fused)
    del dropped.input[-1]
    assert any(p.startswith(f"{ENSEMBLE}: inputs ") for p in check_fused(ENSEMBLE, dropped, leaves))
    # the ensemble check would refuse it: check_repository picks the check by the platform
    assert check_ensemble(ENSEMBLE, fused, leaves) == [f"{ENSEMBLE}: platform is '', not 'ensemble'"]


def test_broken_ensemble_wiring_is_reported(tiny_repository):
    leaves = {m: read_config(tiny_repository / m / "config.pbtxt") for m in LEAF_MODELS}
    good = read_config(tiny_repository / ENSEMBLE / "config.pbtxt")

    renamed = mc.ModelConfig()
    renamed.CopyFrom(good)
    renamed.ensemble_scheduling.step[1].input_map["features"] = "typo_features"
    problems = check_ensemble(ENSEMBLE, renamed, leaves)
    assert any("reads 'typo_features', which no ensemble input or earlier step provides" in p for p in problems)
    assert wiring_closes(renamed, leaves)

    swapped = mc.ModelConfig()
    swapped.CopyFrom(good)
    steps = list(swapped.ensemble_scheduling.step)
    del swapped.ensemble_scheduling.step[:]
    swapped.ensemble_scheduling.step.extend(reversed(steps))  # ranker before its features exist
    assert any("no ensemble input or earlier step provides" in p for p in check_ensemble(ENSEMBLE, swapped, leaves))

    no_output = mc.ModelConfig()
    no_output.CopyFrom(good)
    del no_output.ensemble_scheduling.step[1].output_map["score"]
    assert f"{ENSEMBLE}: output 'score' is produced by no step" in check_ensemble(ENSEMBLE, no_output, leaves)

    unmapped = mc.ModelConfig()
    unmapped.CopyFrom(good)
    del unmapped.ensemble_scheduling.step[0].input_map["history"]
    assert any("model input 'history' is not mapped" in p for p in check_ensemble(ENSEMBLE, unmapped, leaves))


def test_a_config_that_does_not_parse_is_reported(tiny_repository, tmp_path):
    repo = shutil.copytree(tiny_repository, tmp_path / "repo")
    (repo / "ranker" / "configs" / "cpu.pbtxt").write_text("max_batch_size: [oops\n")
    graphs = {m: repo / m / "1" / "model.onnx" for m in LEAF_MODELS}
    problems = check_repository(repo, graphs)
    assert any(p.startswith("ranker: ") and "does not parse as a Triton ModelConfig" in p for p in problems)


def test_gitignore_keeps_versions_out_and_configs_in():
    if shutil.which("git") is None or not (ROOT / ".git").exists():
        pytest.skip("not a git checkout")

    def ignored(path: str) -> bool:
        return subprocess.run(["git", "check-ignore", "-q", path], cwd=ROOT).returncode == 0

    for model in MODEL_NAMES:
        assert ignored(f"model_repository/{model}/1/model.onnx")
        assert ignored(f"model_repository/{model}/12/version.json")
        assert ignored(f"model_repository/{model}/3/model.py")
        assert not ignored(f"model_repository/{model}/config.pbtxt")
        for config_name in CONFIG_NAMES:
            assert not ignored(f"model_repository/{model}/{config_name}")
    for model in LEAF_MODELS:
        assert not ignored(f"model_repository/{model}/model.py")
