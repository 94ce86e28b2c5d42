"""A real Triton (the embedded server of nvidia-pytriton) serving the exported tiny models.

One server for the module; requests go through tritonclient gRPC and are compared with the
same graphs run in process by onnxruntime (and the ensemble with LightGBM itself).
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import threading
import urllib.request
from pathlib import Path

import lightgbm as lgb
import numpy as np
import pytest

from export.features import FEATURE_NAMES
from export.onnx_export import sample_candidate_inputs, sample_user_inputs, session
from orchestrator.contract import MODEL_NAMES
from orchestrator.tritonserver import EmbeddedTriton, check

grpcclient = pytest.importorskip("tritonclient.grpc")

ROOT = Path(__file__).resolve().parents[1]
TRITON_TYPES = {np.dtype(np.int64): "INT64", np.dtype(np.int32): "INT32", np.dtype(np.float32): "FP32"}


@pytest.fixture(scope="module")
def server(tiny_repository, start_triton):
    return start_triton(tiny_repository)


@pytest.fixture(scope="module")
def client(server):
    c = grpcclient.InferenceServerClient(server.grpc_url)
    yield c
    c.close()


@pytest.fixture(scope="module")
def shapes(tiny_repository):
    info = json.loads((tiny_repository / "user_tower" / "1" / "version.json").read_text())
    history = dict((name, dims) for name, _, dims in info["inputs"])["history"]
    n_items = int(np.load(Path(info["artifacts"]["path"]) / "item_embeddings.npy").shape[0])
    return {"L": history[1], "n_items": n_items}


def infer(client, model: str, inputs: dict[str, np.ndarray], outputs: list[str]) -> dict[str, np.ndarray]:
    tensors = []
    for name, array in inputs.items():
        t = grpcclient.InferInput(name, list(array.shape), TRITON_TYPES[array.dtype])
        t.set_data_from_numpy(array)
        tensors.append(t)
    result = client.infer(model, tensors, outputs=[grpcclient.InferRequestedOutput(o) for o in outputs])
    return {o: result.as_numpy(o) for o in outputs}


def local(repo: Path, model: str, inputs: dict[str, np.ndarray], output: str) -> np.ndarray:
    return session(repo / model / "1" / "model.onnx").run([output], inputs)[0]


def test_every_model_is_ready(server, client):
    status = server.status()
    assert status["server_version"]
    assert set(status["models"]) == set(MODEL_NAMES)
    for name, model in status["models"].items():
        assert model == {"versions": [1], "state": "READY"}, name
        assert client.is_model_ready(name)
    # the CPU configs are the ones served
    assert client.get_model_config("ranker").config.backend == "python"
    # ranker_ensemble's CPU config is one Python-backend model running both graphs (no ensemble hop)
    fused = client.get_model_config("ranker_ensemble").config
    assert (fused.platform, fused.backend) == ("", "python")
    assert fused.parameters["onnx_chain"].string_value == "ranker_features,ranker"


def test_user_tower_through_triton_equals_onnxruntime(client, tiny_repository, shapes):
    x = sample_user_inputs(5, shapes["n_items"], shapes["L"], (3, 3, 3), seed=1)
    x["history"][0] = -1
    got = infer(client, "user_tower", x, ["user_embedding"])["user_embedding"]
    np.testing.assert_allclose(got, local(tiny_repository, "user_tower", x, "user_embedding"), atol=1e-6)
    np.testing.assert_allclose(np.linalg.norm(got, axis=1), 1.0, atol=1e-5)


def test_item_tower_through_triton_equals_onnxruntime(client, tiny_repository, shapes):
    items = np.arange(shapes["n_items"], dtype=np.int64).reshape(-1, 1)
    got = infer(client, "item_tower", {"item": items}, ["item_embedding"])["item_embedding"]
    np.testing.assert_allclose(got, local(tiny_repository, "item_tower", {"item": items}, "item_embedding"), atol=1e-6)


def test_ranker_features_through_triton_equals_onnxruntime(client, tiny_repository, shapes):
    x = sample_candidate_inputs(30, shapes["n_items"], seed=2, users=3)  # histories sent once per user
    got = infer(client, "ranker_features", x, ["features"])["features"]
    assert got.shape == (30, len(FEATURE_NAMES))
    np.testing.assert_allclose(got, local(tiny_repository, "ranker_features", x, "features"), rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize(("batch", "users"), [(1, 1), (30, 3), (200, 1)])
def test_ranker_ensemble_equals_onnxruntime_and_lightgbm(client, tiny_repository, tiny_artifacts, shapes, batch, users):
    x = sample_candidate_inputs(batch, shapes["n_items"], seed=3 + batch, users=users)
    got = infer(client, "ranker_ensemble", x, ["score"])["score"]
    assert got.shape == (batch, 1)
    feats = local(tiny_repository, "ranker_features", x, "features")
    np.testing.assert_allclose(got, local(tiny_repository, "ranker", {"features": feats}, "score"), atol=1e-6)
    booster = lgb.Booster(model_file=str(tiny_artifacts / "ranker.lgb"))
    np.testing.assert_allclose(got.reshape(-1), booster.predict(feats), atol=1e-4)


def _concurrent_ranker_calls(url: str, tiny_repository: Path, shapes: dict) -> None:
    sizes = [1, 30, 7, 30, 1, 12, 30, 5]
    inputs = [sample_candidate_inputs(n, shapes["n_items"], seed=50 + i) for i, n in enumerate(sizes)]
    results: dict[int, np.ndarray] = {}
    errors: list[BaseException] = []
    start = threading.Barrier(len(sizes))

    def worker(i: int) -> None:
        c = grpcclient.InferenceServerClient(url)
        try:
            start.wait()
            results[i] = infer(c, "ranker_ensemble", inputs[i], ["score"])["score"]
        except BaseException as exc:  # surfaced below
            errors.append(exc)
        finally:
            c.close()

    threads = [threading.Thread(target=worker, args=(i,)) for i in range(len(sizes))]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    assert not errors, errors
    for i, x in enumerate(inputs):
        feats = local(tiny_repository, "ranker_features", x, "features")
        expected = local(tiny_repository, "ranker", {"features": feats}, "score")
        np.testing.assert_allclose(results[i], expected, atol=1e-6, err_msg=f"request {i} (size {sizes[i]})")


def test_concurrent_requests_are_answered_each_with_its_own_rows(server, tiny_repository, shapes):
    """Requests of different sizes at once on the fused model: each runs alone (no batch axis), none mixes."""
    _concurrent_ranker_calls(server.grpc_url, tiny_repository, shapes)


def test_the_ensemble_config_on_the_real_server(tiny_repository, tmp_path, start_triton, shapes):
    """The Triton ensemble (the GPU and onnx_cpu configs' ranker_ensemble) served with CPU leaves:
    an unbatched ensemble feeding the batching ``ranker`` step loads, and concurrent requests of
    different sizes (whatever the ranker step's dynamic batcher merges) come back split right."""
    from export.triton_config import ENSEMBLE

    repo = shutil.copytree(tiny_repository, tmp_path / "repo")
    shutil.copyfile(repo / ENSEMBLE / "config.pbtxt", repo / ENSEMBLE / "configs" / "cpu.pbtxt")
    url = start_triton(repo).grpc_url
    c = grpcclient.InferenceServerClient(url)
    try:
        assert c.get_model_config(ENSEMBLE).config.platform == "ensemble"
    finally:
        c.close()
    _concurrent_ranker_calls(url, tiny_repository, shapes)


def test_wrong_shape_is_rejected_by_triton(client, shapes):
    bad = {"history": np.zeros((1, shapes["L"] + 1), np.int64)}
    bad["history_rating"] = np.zeros((1, shapes["L"] + 1), np.float32)
    bad["demographics"] = np.zeros((1, 3), np.int64)
    with pytest.raises(grpcclient.InferenceServerException):
        infer(client, "user_tower", bad, ["user_embedding"])


def test_metrics_endpoint_on_loopback(server):
    with urllib.request.urlopen(server.metrics_url, timeout=5) as resp:
        assert b"nv_inference_request_success" in resp.read()
    assert server.grpc_url.startswith("127.0.0.1:") and server.http_url.startswith("http://127.0.0.1:")


def test_check_reports_a_model_that_fails_to_load(tiny_repository, tmp_path):
    repo = shutil.copytree(tiny_repository, tmp_path / "repo")
    (repo / "ranker" / "1" / "model.onnx").write_bytes(b"not an onnx graph")
    status, ok = check(EmbeddedTriton(repo, startup_timeout=90))
    assert not ok
    assert status["models"]["ranker"]["state"] == "UNAVAILABLE"
    assert "model.onnx" in status["models"]["ranker"]["reason"]
    assert status["models"]["user_tower"]["state"] == "READY"


def _recsys(*args: str) -> list[str]:
    return [sys.executable, "-m", "clients.cli", *args]


def test_recsys_triton_check_json(tiny_repository):
    out = subprocess.run(
        _recsys("triton", "--repo", str(tiny_repository), "--check", "--json"), cwd=ROOT, capture_output=True, text=True, timeout=120
    )
    assert out.returncode == 0, out.stderr
    status = json.loads(out.stdout)
    assert all(m["state"] == "READY" and m["versions"] == [1] for m in status["models"].values())
    assert set(status["models"]) == set(MODEL_NAMES)


def test_recsys_triton_stops_cleanly_on_sigint(tiny_repository):
    proc = subprocess.Popen(
        _recsys("triton", "--repo", str(tiny_repository), "--json"),
        cwd=ROOT,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env={**os.environ, "PYTHONUNBUFFERED": "1"},
    )
    try:
        lines = []
        while True:  # the addresses are printed once the server is ready
            line = proc.stdout.readline()
            assert line, proc.stderr.read()
            lines.append(line)
            if line.startswith("}"):
                break
        info = json.loads("".join(lines))
        c = grpcclient.InferenceServerClient(info["grpc"])
        assert c.is_server_ready()
        proc.send_signal(signal.SIGINT)
        assert proc.wait(timeout=60) == 0
        with pytest.raises(Exception):
            c.is_server_live(client_timeout=2)
        c.close()
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
