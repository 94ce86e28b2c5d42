"""The docker-compose stack, its Dockerfile and the Prometheus / Grafana provisioning.

No Docker engine runs in CI: these tests read the files and check that they agree with each
other (service names, ports, mounts, health checks, scrape targets), and validate
docker-compose.yml against the Compose specification's JSON schema (the copy vendored, with
its Apache-2.0 licence, in the pinned ``check-jsonschema`` package). docker-compose.yml uses
YAML anchors (the cpu profile reuses the gpu profile's orchestrator settings), so it is read
with PyYAML (a dev dependency); the Prometheus and Grafana files are also read with
:func:`mini_yaml`, a small reader for the block-style subset they are written in (it fails
loudly on anything else).
"""

from __future__ import annotations

import json
import re
import shlex
import tomllib
from pathlib import Path
from typing import Any

import pytest

ROOT = Path(__file__).resolve().parents[1]
COMPOSE = ROOT / "docker-compose.yml"
PROMETHEUS = ROOT / "deploy" / "prometheus.yml"
GRAFANA = ROOT / "deploy" / "grafana"
DOCKERFILE = ROOT / "orchestrator" / "Dockerfile"
TRITON_IMAGE = "nvcr.io/nvidia/tritonserver:24.10-py3"


# ----------------------------------------------------------------------------- YAML reading


def _scalar(text: str) -> Any:
    text = text.strip()
    if text[:1] in ("'", '"'):
        if text[-1:] != text[0] or len(text) < 2:
            raise ValueError(f"unterminated string: {text}")
        body = text[1:-1]
        if text[0] == "'":
            return body.replace("''", "'")
        if "\\" in body:
            raise ValueError(f"escapes in double-quoted strings are not supported: {text}")
        return body
    if text.startswith("[") and text.endswith("]"):
        inner = text[1:-1].strip()
        return [_scalar(part) for part in _split_flow(inner)] if inner else []
    if text[:1] in ("{", "&", "*", "!", "|", ">"):
        raise ValueError(f"unsupported YAML: {text}")
    if text in ("", "~", "null"):
        return None
    if text in ("true", "false"):
        return text == "true"
    if re.fullmatch(r"[-+]?\d+", text):
        return int(text)
    if re.fullmatch(r"[-+]?\d+\.\d*", text):
        return float(text)
    return text


def _split_flow(text: str) -> list[str]:
    """Splits ``a, "b, c", d`` at the commas outside quotes."""
    parts, current, quote = [], "", ""
    for ch in text:
        if quote:
            quote = "" if ch == quote else quote
        elif ch in ("'", '"'):
            quote = ch
        elif ch == ",":
            parts.append(current)
            current = ""
            continue
        current += ch
    parts.append(current)
    return parts


def _strip_comment(line: str) -> str:
    quote = ""
    for i, ch in enumerate(line):
        if quote:
            quote = "" if ch == quote else quote
        elif ch in ("'", '"'):
            quote = ch
        elif ch == "#" and (i == 0 or line[i - 1] in " \t"):
            return line[:i].rstrip()
    return line.rstrip()


_KEY = re.compile(r"^([A-Za-z0-9_.\-/]+):(?:\s+(.*))?$")


def mini_yaml(text: str) -> Any:
    """Reads block-style YAML: mappings, ``-`` sequences, plain / quoted scalars, ``[a, b]``."""
    lines = []
    for raw in text.splitlines():
        line = _strip_comment(raw)
        if line.strip():
            if "\t" in line[: len(line) - len(line.lstrip())]:
                raise ValueError("tabs in indentation")
            lines.append((len(line) - len(line.lstrip()), line.strip()))

    def block(i: int, indent: int) -> tuple[Any, int]:
        if lines[i][1].startswith("- ") or lines[i][1] == "-":
            return sequence(i, indent)
        return mapping(i, indent)

    def value_after(rest: str | None, i: int, indent: int) -> tuple[Any, int]:
        if rest:
            return _scalar(rest), i + 1
        if i + 1 < len(lines) and lines[i + 1][0] > indent:
            return block(i + 1, lines[i + 1][0])
        # a sequence may sit at the key's own indentation (compose style "key:\n- a")
        if i + 1 < len(lines) and lines[i + 1][0] == indent and lines[i + 1][1].startswith("- "):
            return sequence(i + 1, indent)
        return None, i + 1

    def mapping(i: int, indent: int) -> tuple[dict, int]:
        out: dict[str, Any] = {}
        while i < len(lines) and lines[i][0] == indent and not lines[i][1].startswith("- "):
            match = _KEY.match(lines[i][1])
            if not match:
                raise ValueError(f"cannot read line: {lines[i][1]!r}")
            key = match.group(1)
            if key in out:
                raise ValueError(f"duplicate key {key!r}")
            out[key], i = value_after(match.group(2), i, indent)
        if i < len(lines) and lines[i][0] > indent:
            raise ValueError(f"bad indentation at {lines[i][1]!r}")
        return out, i

    def sequence(i: int, indent: int) -> tuple[list, int]:
        out: list[Any] = []
        while i < len(lines) and lines[i][0] == indent and lines[i][1].startswith("-"):
            content = lines[i][1][1:].strip()
            if not content:
                value, i = block(i + 1, lines[i + 1][0])
            elif content[:1] not in ("'", '"', "[") and _KEY.match(content):
                # "- key: value" starts a mapping whose keys sit two columns deeper
                inner = indent + 2
                lines[i] = (inner, content)
                value, i = mapping(i, inner)
            else:
                value, i = _scalar(content), i + 1
            out.append(value)
        return out, i

    if not lines:
        return None
    result, end = block(0, lines[0][0])
    if end != len(lines):
        raise ValueError(f"unread YAML from {lines[end][1]!r}")
    return result


def load_yaml(path: Path) -> Any:
    try:
        import yaml  # type: ignore[import-untyped]
    except ImportError:  # not a project dependency; the subset reader covers these files
        return mini_yaml(path.read_text())
    return yaml.safe_load(path.read_text())


@pytest.fixture(scope="module")
def compose() -> dict:
    yaml = pytest.importorskip("yaml", reason="docker-compose.yml uses anchors: PyYAML (the dev extra) reads it")
    return yaml.safe_load(COMPOSE.read_text())


@pytest.fixture(scope="module")
def services(compose) -> dict:
    return compose["services"]


def _command(cmd: Any) -> list[str]:
    return shlex.split(cmd) if isinstance(cmd, str) else [str(c) for c in cmd]


def _flag(cmd: list[str], name: str) -> str | None:
    """The value of ``--name value`` or ``--name=value`` in an argv list."""
    for i, arg in enumerate(cmd):
        if arg == name and i + 1 < len(cmd):
            return cmd[i + 1]
        if arg.startswith(name + "="):
            return arg.split("=", 1)[1]
    return None


def _container_ports(service: dict) -> set[int]:
    out = set()
    for spec in service.get("ports", []):
        assert isinstance(spec, str), f"port {spec!r} should be a quoted string (YAML 1.1 reads 8000:8000 as base 60)"
        out.add(int(spec.split(":")[-1].split("/")[0]))
    return out


def _mounts(service: dict) -> dict[str, tuple[str, str]]:
    """container path -> (source, mode) for short-syntax volumes."""
    out = {}
    for spec in service.get("volumes", []):
        parts = spec.split(":")
        source, target, mode = parts[0], parts[1], parts[2] if len(parts) > 2 else "rw"
        out[target] = (source, mode)
    return out


# ----------------------------------------------------------------------------- the reader itself


def test_mini_yaml_reads_the_subset():
    text = """
a: 1   # comment
b:
  - x
  - "y: z # not a comment"
  - [gpu, "c, d"]
c:
  - name: n
    k: v
  - plain
d: "true"
e: true
f:
"""
    assert mini_yaml(text) == {
        "a": 1,
        "b": ["x", "y: z # not a comment", ["gpu", "c, d"]],
        "c": [{"name": "n", "k": "v"}, "plain"],
        "d": "true",
        "e": True,
        "f": None,
    }
    with pytest.raises(ValueError):
        mini_yaml("a: &anchor 1\nb: *anchor\n")


def test_files_parse_with_the_subset_reader_too():
    # The fallback must read the real files the same way PyYAML would: spot-check shapes.
    for path in (PROMETHEUS, *sorted(GRAFANA.glob("provisioning/*/*.yml"))):
        assert isinstance(mini_yaml(path.read_text()), dict), path
    assert mini_yaml(PROMETHEUS.read_text()) == load_yaml(PROMETHEUS)


# ----------------------------------------------------------------------------- compose


def test_services_and_pinned_images(services):
    assert {"triton", "orchestrator", "prometheus", "grafana"} <= set(services)
    assert services["triton"]["image"] == TRITON_IMAGE  # 24.10 = Triton 2.51
    for name, svc in services.items():
        image = svc.get("image")
        if "build" in svc and name == "orchestrator":
            continue
        assert image, f"{name} has neither image nor build"
        tag = image.rsplit("/", 1)[-1].partition(":")[2]
        assert tag and tag != "latest", f"{name}: image {image} is not pinned to a tag"


def test_triton_service(services):
    triton = services["triton"]
    cmd = _command(triton["command"])
    assert cmd[0] == "tritonserver"
    assert _flag(cmd, "--model-repository") == "/models"
    assert _flag(cmd, "--model-control-mode") == "explicit"
    assert _flag(cmd, "--load-model") == "*"
    assert isinstance(triton["command"], list), "exec form, so the shell cannot glob-expand '*'"
    assert _mounts(triton)["/models"] == ("./model_repository", "ro")
    assert {8000, 8001, 8002} <= _container_ports(triton)
    test = triton["healthcheck"]["test"]
    assert test[0] in ("CMD", "CMD-SHELL") and "curl" in " ".join(test)
    assert "localhost:8000/v2/health/ready" in " ".join(test) and "-f" in test


@pytest.mark.parametrize("name", ["triton", "orchestrator"])
def test_gpu_reservation(services, name):
    devices = services[name]["deploy"]["resources"]["reservations"]["devices"]
    assert any(d["driver"] == "nvidia" and "gpu" in d["capabilities"] for d in devices)


def test_orchestrator_service(services):
    orch = services["orchestrator"]
    assert orch["build"]["dockerfile"] == "orchestrator/Dockerfile"
    assert (ROOT / orch["build"]["context"] / orch["build"]["dockerfile"]).is_file()
    cmd = _command(orch["command"])
    assert cmd[:2] == ["recsys", "serve"]
    assert _flag(cmd, "--triton-url") == "triton:8001"
    assert _flag(cmd, "--artifacts") == "/artifacts"
    port, metrics = int(_flag(cmd, "--port")), int(_flag(cmd, "--metrics-port"))
    assert (port, metrics) == (50051, 9100)
    assert {port, metrics} <= _container_ports(orch)
    assert _mounts(orch)["/artifacts"] == ("./artifacts", "ro")
    assert orch["depends_on"]["triton"]["condition"] == "service_healthy"
    # the probe (orchestrator/healthcheck.py) asks localhost on the server's port (default 50051)
    assert port == 50051


@pytest.mark.parametrize("name", ["orchestrator", "orchestrator-cpu"])
def test_orchestrator_healthcheck_is_the_project_probe(services, name):
    assert services[name]["healthcheck"]["test"] == ["CMD", "python", "-m", "orchestrator.healthcheck"]
    assert (ROOT / "orchestrator" / "healthcheck.py").is_file()


def test_every_depends_on_names_a_service_with_a_known_condition(services):
    for name, svc in services.items():
        deps = svc.get("depends_on", {})
        for dep, spec in deps.items() if isinstance(deps, dict) else ((d, {}) for d in deps):
            assert dep in services, f"{name} depends on unknown service {dep}"
            assert spec.get("condition", "service_started") in ("service_started", "service_healthy", "service_completed_successfully")
            if spec.get("condition") == "service_healthy":
                assert "healthcheck" in services[dep], f"{dep} has no healthcheck to wait for"


def _profile(services: dict, profile: str) -> dict:
    """The services ``docker compose --profile PROFILE up`` starts."""
    return {n: s for n, s in services.items() if not s.get("profiles") or profile in s["profiles"]}


@pytest.mark.parametrize("profile", ["gpu", "cpu"])
def test_published_ports_are_unique_within_a_profile(services, profile):
    published = [spec.split(":")[-2] for svc in _profile(services, profile).values() for spec in svc.get("ports", []) if ":" in spec]
    assert len(published) == len(set(published))


def test_every_port_is_published_on_loopback_only(services):
    """Safe by default: nothing (the API with DeleteUser included) faces the network until opened."""
    for name, svc in services.items():
        for spec in svc.get("ports", []):
            assert spec.startswith("127.0.0.1:"), f"{name} publishes {spec} beyond loopback"


def test_compose_file_matches_the_compose_specification_schema(compose):
    """The Compose specification's JSON schema (vendored in check-jsonschema with its licence)."""
    jsonschema = pytest.importorskip("jsonschema")
    pytest.importorskip("check_jsonschema", reason="the dev extra pins check-jsonschema (it ships the compose-spec schema)")
    from importlib.resources import files

    schema = json.loads(files("check_jsonschema.builtin_schemas.vendor").joinpath("compose-spec.json").read_text())
    errors = sorted(jsonschema.validators.validator_for(schema)(schema).iter_errors(compose), key=lambda e: list(e.path))
    assert not errors, [f"{'/'.join(map(str, e.path))}: {e.message}" for e in errors]
    # and a broken file is caught, so the check above can fail
    broken = json.loads(json.dumps(compose))
    broken["services"]["orchestrator"]["healthcheck"]["intervall"] = "10s"
    broken["services"]["triton"]["restart_policy"] = "always"
    assert len(list(jsonschema.validators.validator_for(schema)(schema).iter_errors(broken))) >= 2


@pytest.mark.parametrize("profile", ["gpu", "cpu"])
def test_each_profile_has_one_triton_and_one_orchestrator_under_the_shared_names(services, profile):
    chosen = _profile(services, profile)
    for alias in ("triton", "orchestrator"):
        holders = [n for n, s in chosen.items() if alias in s.get("networks", {}).get("default", {}).get("aliases", [])]
        assert len(holders) == 1, (profile, alias, holders)
    assert {"prometheus", "grafana"} <= set(chosen)
    if profile == "cpu":
        for name in ("triton-cpu", "orchestrator-cpu"):
            assert "deploy" not in chosen[name], f"{name} must not reserve a GPU"


def test_cpu_triton_runs_the_same_image_with_the_onnx_cpu_configs(services):
    gpu, cpu = services["triton"], services["triton-cpu"]
    assert cpu["image"] == gpu["image"] == TRITON_IMAGE
    cmd = _command(cpu["command"])
    name = _flag(cmd, "--model-config-name")
    assert name == "onnx_cpu"
    assert _flag(_command(gpu["command"]), "--model-config-name") is None  # config.pbtxt, KIND_GPU
    for model in ("user_tower", "item_tower", "ranker_features", "ranker", "ranker_ensemble"):
        config = (ROOT / "model_repository" / model / "configs" / f"{name}.pbtxt").read_text()
        assert "KIND_GPU" not in config, model
    # otherwise the very same server command
    assert [c for c in cmd if not c.startswith("--model-config-name")] == _command(gpu["command"])
    assert _mounts(cpu) == _mounts(gpu) and cpu["healthcheck"] == gpu["healthcheck"]


@pytest.mark.parametrize("name", ["orchestrator", "orchestrator-cpu"])
def test_orchestrator_state_lives_on_a_named_volume(compose, services, name):
    """History DB and request log: set by the image under /state, /state a named volume."""
    from orchestrator.settings import ENV_PREFIX, ServeSettings

    instructions = "\n".join(line for line in DOCKERFILE.read_text().splitlines() if not line.lstrip().startswith("#"))
    env = dict(re.findall(r"(RECSYS_\w+)=(\S+)", instructions))
    settings = ServeSettings.from_env({k: v for k, v in env.items() if k != "RECSYS_HOST"})
    mounts = _mounts(services[name])
    state_source, mode = mounts["/state"]
    assert state_source in compose["volumes"] and mode == "rw", "a named volume, writable"
    for path in (settings.history_db(), settings.request_log_db()):
        assert path.parent == Path("/state"), path
    assert f"{ENV_PREFIX}HISTORY_DB_PATH" in env and f"{ENV_PREFIX}REQUEST_LOG_PATH" in env
    assert re.search(r"chown recsys\S* /state", DOCKERFILE.read_text()), "the unprivileged user owns /state"


@pytest.mark.parametrize("name", ["orchestrator", "orchestrator-cpu"])
def test_orchestrator_sees_the_training_data_for_demographics(services, name):
    """orchestrator/catalog.py looks for users.csv in <artifacts>/../<manifest data path>."""
    source, mode = _mounts(services[name])["/data"]
    assert (source, mode) == ("./data", "ro")
    assert (ROOT / "data").is_dir()


def test_bind_mount_sources_exist_or_are_generated(services):
    generated = {"./artifacts"}  # written by `recsys train` / `recsys export`
    for name, svc in services.items():
        for _, (source, _) in _mounts(svc).items():
            if source.startswith("./") and source not in generated:
                assert (ROOT / source).exists(), f"{name} mounts missing {source}"


# ----------------------------------------------------------------------------- prometheus, grafana


def test_prometheus_scrapes_triton_and_orchestrator(services):
    config = load_yaml(PROMETHEUS)
    prom = services["prometheus"]
    assert _mounts(prom)["/etc/prometheus/prometheus.yml"] == ("./deploy/prometheus.yml", "ro")
    targets = {target for job in config["scrape_configs"] for static in job.get("static_configs", []) for target in static["targets"]}
    assert {"triton:8002", "orchestrator:9100"} <= targets
    for target in targets:
        host, port = target.rsplit(":", 1)
        if host == "localhost":
            continue  # Prometheus itself
        assert host in services, f"scrape target {target} is not a compose service"
        listening = _container_ports(services[host]) | {int(_flag(_command(services[host].get("command", [])), "--metrics-port") or 0)}
        assert int(port) in listening, f"{host} does not listen on {port}"


def test_grafana_provisioning(services):
    grafana = services["grafana"]
    mounts = _mounts(grafana)
    assert mounts["/etc/grafana/provisioning"][0] == "./deploy/grafana/provisioning"
    datasources = load_yaml(GRAFANA / "provisioning" / "datasources" / "prometheus.yml")["datasources"]
    prom = next(d for d in datasources if d["type"] == "prometheus")
    assert prom["url"] == "http://prometheus:9090" and 9090 in _container_ports(services["prometheus"])
    providers = load_yaml(GRAFANA / "provisioning" / "dashboards" / "dashboards.yml")["providers"]
    dash_dir = providers[0]["options"]["path"]
    source = next(src for target, (src, _) in mounts.items() if target == dash_dir)
    dashboards = list((ROOT / source).glob("*.json"))
    assert dashboards
    exprs = []
    for path in dashboards:
        dash = json.loads(path.read_text())
        assert dash["uid"] and dash["panels"]
        for panel in dash["panels"]:
            assert panel["datasource"]["uid"] == prom["uid"]
            exprs += [t["expr"] for t in panel["targets"]]
    text = " ".join(exprs)
    assert "nv_inference_request_success" in text and "nv_inference_queue_duration_us" in text


# ----------------------------------------------------------------------------- Dockerfile


def test_orchestrator_dockerfile_installs_the_serving_side_only():
    text = DOCKERFILE.read_text()
    instructions = [line.strip() for line in text.splitlines() if line.strip() and not line.lstrip().startswith("#")]
    assert instructions[0] == "FROM python:3.11-slim"
    assert re.search(r"pip install\s+\"?\.\[gpu,redis\]\"?", text), "installs the project's base set with the gpu and redis extras"
    assert "offline" not in " ".join(i for i in instructions if "pip install" in i), "the training stack stays out of the image"
    assert "COPY pyproject.toml" in text
    copied = set(re.findall(r"^COPY (\w+)/ ", text, re.M))
    assert copied == {"orchestrator", "clients", "protos"}, copied  # the offline rooms are not shipped
    assert re.search(r"^CMD \[\"recsys\", \"serve\"", text, re.M)
    assert "USER " in text


def test_serving_dependencies_exclude_the_training_stack():
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    base = {re.split(r"[\[=<>]", d)[0].lower() for d in project["dependencies"]}
    assert not base & {"torch", "lightgbm", "hummingbird-ml", "scikit-learn", "implicit", "onnx", "onnxscript"}, base
    offline = {re.split(r"[\[=<>]", d)[0].lower() for d in project["optional-dependencies"]["offline"]}
    assert {"torch", "lightgbm", "hummingbird-ml"} <= offline
