"""deploy/k8s/: Kubernetes' own schemas, and the manifests against this project's real commands.

The schemas are Kubernetes' published OpenAPI definitions as JSON schemas, per release,
shipped in the pinned ``kubernetes-validate`` package (Apache-2.0): validated offline, in
strict mode (unknown fields are errors). The second half checks what a schema cannot: the
orchestrator's arguments are flags ``recsys serve`` accepts, its ``RECSYS_*`` variables are
settings :meth:`ServeSettings.from_env` reads, Services and budgets select pods that exist.
Last, ``python -m orchestrator.healthcheck`` (the compose probe) against a real gRPC server.
"""

from __future__ import annotations

import os
import subprocess
import sys
from concurrent import futures
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
K8S = ROOT / "deploy" / "k8s"
TRITON_IMAGE = "nvcr.io/nvidia/tritonserver:24.10-py3"
K8S_VERSIONS = ("1.30.0", "1.37.0")
"""Releases validated against: a conservative one still common in managed clusters, and the newest bundled."""

yaml = pytest.importorskip("yaml", reason="PyYAML (the dev extra) reads the manifests")


def _documents() -> list[dict]:
    docs = []
    for path in sorted(K8S.glob("*.yaml")):
        docs += [d for d in yaml.safe_load_all(path.read_text()) if d]
    return docs


@pytest.fixture(scope="module")
def docs() -> list[dict]:
    return _documents()


def _one(docs: list[dict], kind: str, name: str) -> dict:
    found = [d for d in docs if d["kind"] == kind and d["metadata"]["name"] == name]
    assert len(found) == 1, (kind, name, len(found))
    return found[0]


def _container(deployment: dict) -> dict:
    containers = deployment["spec"]["template"]["spec"]["containers"]
    assert len(containers) == 1
    return containers[0]


@pytest.mark.parametrize("version", K8S_VERSIONS)
def test_manifests_validate_against_kubernetes_schemas(docs, version):
    kv = pytest.importorskip("kubernetes_validate", reason="the dev extra pins kubernetes-validate (Kubernetes' schemas)")
    for doc in docs:
        kv.validate(doc, version, strict=True)  # raises ValidationError on anything unknown or mistyped


def test_the_validation_can_fail():
    kv = pytest.importorskip("kubernetes_validate")
    bad = yaml.safe_load((K8S / "orchestrator.yaml").read_text().split("\n---\n")[0])
    bad["spec"]["template"]["spec"]["containers"][0]["readinessProbe"]["grpcc"] = {"port": 50051}
    with pytest.raises(kv.ValidationError):
        kv.validate(bad, K8S_VERSIONS[-1], strict=True)
    bad = yaml.safe_load((K8S / "orchestrator.yaml").read_text().split("\n---\n")[0])
    bad["spec"]["replicas"] = "two"
    with pytest.raises(kv.ValidationError):
        kv.validate(bad, K8S_VERSIONS[-1], strict=True)


def test_every_object_is_namespaced_and_the_namespace_exists(docs):
    _one(docs, "Namespace", "recsys")
    for doc in docs:
        if doc["kind"] != "Namespace":
            assert doc["metadata"].get("namespace") == "recsys", doc["metadata"]["name"]


def test_triton_deployment(docs):
    triton = _container(_one(docs, "Deployment", "triton"))
    assert triton["image"] == TRITON_IMAGE
    assert triton["args"][0] == "tritonserver" and "--model-repository=/models" in triton["args"]
    assert triton["resources"]["requests"]["nvidia.com/gpu"] == triton["resources"]["limits"]["nvidia.com/gpu"] == "1"
    assert triton["readinessProbe"]["httpGet"]["path"] == "/v2/health/ready"
    ports = {p["name"]: p["containerPort"] for p in triton["ports"]}
    assert ports == {"http": 8000, "grpc": 8001, "metrics": 8002}
    assert triton["readinessProbe"]["httpGet"]["port"] in ports
    mounts = {m["mountPath"]: m for m in triton["volumeMounts"]}
    assert mounts["/models"]["readOnly"] is True


def test_orchestrator_deployment_runs_the_real_command_and_settings(docs):
    from clients.cli import build_parser
    from orchestrator.settings import ENV_PREFIX, ServeSettings

    orch = _container(_one(docs, "Deployment", "orchestrator"))
    args = orch["args"]
    assert args[:2] == ["recsys", "serve"]
    build_parser().parse_args(args[1:])  # exits (SystemExit) on a flag recsys serve does not have
    env = {e["name"]: e["value"] for e in orch["env"]}
    assert all(k.startswith(ENV_PREFIX) for k in env)
    settings = ServeSettings.from_env(env)  # every variable is a setting, every value parses
    assert settings.history_store == "redis" and settings.api_keys_file is not None
    fields = {f.upper() for f in ServeSettings.__dataclass_fields__}
    assert {k[len(ENV_PREFIX) :] for k in env} <= fields
    port = int(args[args.index("--port") + 1])
    for probe in ("startupProbe", "readinessProbe", "livenessProbe"):
        assert orch[probe]["grpc"]["port"] == port, probe
    assert orch["resources"]["requests"]["cpu"] and orch["resources"]["requests"]["memory"]
    # the Triton it calls and the Redis it shares are Services of this namespace
    triton_host = args[args.index("--triton-url") + 1].split(".")[0]
    _one(docs, "Service", triton_host)
    _one(docs, "Service", settings.redis_url.split("//")[1].split(".")[0])
    mounts = {m["mountPath"] for m in orch["volumeMounts"]}
    assert {"/artifacts", "/data", "/models"} <= mounts  # /data: users.csv demographics


def test_services_and_budgets_select_existing_pods(docs):
    pod_labels = {
        d["metadata"]["name"]: d["spec"]["template"]["metadata"]["labels"] for d in docs if d["kind"] in ("Deployment", "StatefulSet")
    }

    def matches(selector: dict) -> list[str]:
        return [n for n, labels in pod_labels.items() if selector.items() <= labels.items()]

    for doc in docs:
        if doc["kind"] == "Service":
            assert matches(doc["spec"]["selector"]), doc["metadata"]["name"]
        if doc["kind"] == "PodDisruptionBudget":
            assert matches(doc["spec"]["selector"]["matchLabels"]), doc["metadata"]["name"]
        if doc["kind"] in ("Deployment", "StatefulSet"):
            assert matches(doc["spec"]["selector"]["matchLabels"]) == [doc["metadata"]["name"]]
    for name in ("triton", "orchestrator", "redis"):
        assert any(d["kind"] == "PodDisruptionBudget" and matches(d["spec"]["selector"]["matchLabels"]) == [name] for d in docs), name


def test_grpc_services_suit_load_balancing(docs):
    headless = _one(docs, "Service", "orchestrator-headless")
    assert headless["spec"]["clusterIP"] == "None"  # every pod in DNS: client-side round_robin
    for name in ("orchestrator", "orchestrator-headless"):
        grpc_ports = [p for p in _one(docs, "Service", name)["spec"]["ports"] if p["name"] == "grpc"]
        assert grpc_ports and all(p.get("appProtocol") == "grpc" for p in grpc_ports)


def test_hpa_scales_the_orchestrator_on_cpu(docs):
    hpa = _one(docs, "HorizontalPodAutoscaler", "orchestrator")
    assert hpa["spec"]["scaleTargetRef"] == {"apiVersion": "apps/v1", "kind": "Deployment", "name": "orchestrator"}
    assert 2 <= hpa["spec"]["minReplicas"] < hpa["spec"]["maxReplicas"]
    metric = hpa["spec"]["metrics"][0]["resource"]
    assert metric["name"] == "cpu"
    # utilisation is relative to the request: the scaled container must request CPU
    assert _container(_one(docs, "Deployment", "orchestrator"))["resources"]["requests"]["cpu"]


def test_claims_exist(docs):
    claims = {d["metadata"]["name"] for d in docs if d["kind"] == "PersistentVolumeClaim"}
    for doc in docs:
        if doc["kind"] == "Deployment":
            for volume in doc["spec"]["template"]["spec"].get("volumes", []):
                if "persistentVolumeClaim" in volume:
                    assert volume["persistentVolumeClaim"]["claimName"] in claims


def test_redis_is_durable_like_the_sqlite_store(docs):
    redis = _one(docs, "StatefulSet", "redis")["spec"]["template"]["spec"]["containers"][0]
    args = redis["args"]
    assert args[args.index("--appendonly") + 1] == "yes" and args[args.index("--appendfsync") + 1] == "always"


# ----------------------------------------------------------------------------- the health probe


@pytest.fixture
def health_server():
    """A real gRPC server with the standard health service (what the orchestrator registers)."""
    import grpc
    from grpc_health.v1 import health, health_pb2, health_pb2_grpc

    from orchestrator.tritonserver import free_port

    server = grpc.server(futures.ThreadPoolExecutor(2))
    servicer = health.HealthServicer()
    health_pb2_grpc.add_HealthServicer_to_server(servicer, server)
    port = free_port()
    server.add_insecure_port(f"127.0.0.1:{port}")
    server.start()
    yield port, servicer, health_pb2.HealthCheckResponse
    server.stop(0)


def _probe(port: int) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if not k.startswith("RECSYS_")}
    env["RECSYS_PORT"] = str(port)
    return subprocess.run(
        [sys.executable, "-m", "orchestrator.healthcheck"], cwd=ROOT, env=env, capture_output=True, text=True, timeout=60, check=False
    )


def test_healthcheck_probe_follows_the_server_status(health_server):
    port, servicer, reply = health_server
    servicer.set("", reply.SERVING)
    ok = _probe(port)
    assert ok.returncode == 0 and ok.stdout.strip() == "SERVING", ok.stderr
    servicer.set("", reply.NOT_SERVING)
    down = _probe(port)
    assert down.returncode == 1 and down.stdout.strip() == "NOT_SERVING"


def test_healthcheck_probe_fails_when_nothing_listens():
    from orchestrator.tritonserver import free_port

    result = _probe(free_port())
    assert result.returncode == 1 and "UNAVAILABLE" in result.stderr
