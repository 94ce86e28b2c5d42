"""An embedded Triton Inference Server: the ``tritonserver`` binary of the nvidia-pytriton wheel.

No Docker and no GPU: the wheel carries Triton 2.51 with the Python backend, the ensemble
scheduler and dynamic batching (FIELD-NOTES). :class:`EmbeddedTriton` prepares what the
binary needs and runs it as a child process:

* ``LD_LIBRARY_PATH``: the wheel's ``nvidia_pytriton.libs`` (and the directory of this
  interpreter's ``libpython``, so the Python-backend stub runs the interpreter whose
  standard library it loads).
* a backend directory: a copy of the wheel's ``backends/python`` plus the stub for this
  Python version, cached under ``~/.cache/triton-recsys/backends`` (``$XDG_CACHE_HOME``).
* ``PATH`` starting with this interpreter's ``bin``: the stub's embedded Python finds its
  prefix by looking ``python3`` up on ``PATH``, so it sees this virtualenv (numpy<2,
  onnxruntime) and not the system's packages.
* ``--model-config-name=cpu`` (``configs/cpu.pbtxt``: Python backend on the CPU),
  ``--model-control-mode=explicit --load-model=*`` (everything at start, later loads and
  unloads through the repository API), endpoints bound to 127.0.0.1 on free ports.

``recsys triton`` runs it in the foreground until SIGINT/SIGTERM; ``recsys triton --check``
starts it, reports every model's state and exits 0 only if all are READY.
"""

from __future__ import annotations

import ctypes
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import sysconfig
import tempfile
import threading
import time
import urllib.error
import urllib.request
from dataclasses import dataclass
from importlib import metadata
from pathlib import Path

LOOPBACK = "127.0.0.1"


class TritonError(RuntimeError):
    """The embedded server could not be found, prepared, started or queried."""


@dataclass(frozen=True)
class TritonInstall:
    """Where the wheel keeps the server.

    Attributes:
        binary: The ``tritonserver`` executable.
        libs: The wheel's bundled shared libraries.
        python_backend: The Python backend (``libtriton_python.so`` and utilities).
        stub: The Python-backend stub built for this interpreter's Python version.
        version: nvidia-pytriton's version (keys the backend cache).
    """

    binary: Path
    libs: Path
    python_backend: Path
    stub: Path
    version: str


def find_triton() -> TritonInstall:
    """Locates ``tritonserver`` and its pieces inside the installed nvidia-pytriton wheel.

    Raises:
        TritonError: The wheel or one of its parts is missing.
    """
    try:
        import pytriton
    except ImportError as exc:
        raise TritonError("nvidia-pytriton is not installed in this environment (pip install nvidia-pytriton)") from exc
    root = Path(pytriton.__file__).resolve().parent / "tritonserver"
    pyver = f"{sys.version_info.major}.{sys.version_info.minor}"
    install = TritonInstall(
        binary=root / "bin" / "tritonserver",
        libs=root.parent.parent / "nvidia_pytriton.libs",
        python_backend=root / "backends" / "python",
        stub=root / "python_backend_stubs" / pyver / "triton_python_backend_stub",
        version=metadata.version("nvidia-pytriton"),
    )
    for path in (install.binary, install.libs, install.python_backend / "libtriton_python.so", install.stub):
        if not path.exists():
            raise TritonError(f"{path}: missing from the nvidia-pytriton wheel (Python {pyver})")
    return install


def cache_dir() -> Path:
    """``$XDG_CACHE_HOME/triton-recsys`` (``~/.cache/triton-recsys`` by default)."""
    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(base) / "triton-recsys"


def prepare_backends(install: TritonInstall, root: Path | None = None) -> Path:
    """A backend directory holding the Python backend and its stub; reused once built.

    The wheel keeps the stub outside the backend folder, but Triton looks for it beside
    ``libtriton_python.so``, hence the copy. It is built in a temporary sibling and renamed,
    so concurrent starts never see half a backend.

    Args:
        install: The located wheel.
        root: Cache root (default :func:`cache_dir`).

    Returns:
        The folder to pass as ``--backend-directory``.
    """
    root = root or cache_dir()
    key = f"pytriton-{install.version}-py{sys.version_info.major}{sys.version_info.minor}"
    backends = root / "backends" / key
    if (backends / "python" / "triton_python_backend_stub").is_file():
        return backends
    backends.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{key}-", dir=backends.parent))
    try:
        shutil.copytree(install.python_backend, tmp / "python", ignore=shutil.ignore_patterns("__pycache__"))
        shutil.copy2(install.stub, tmp / "python" / "triton_python_backend_stub")
        try:
            os.rename(tmp, backends)
        except OSError:
            if not (backends / "python" / "triton_python_backend_stub").is_file():
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return backends


def free_port() -> int:
    """A TCP port on the loopback interface that is free right now."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind((LOOPBACK, 0))
        return int(sock.getsockname()[1])


def _die_with_parent() -> None:
    """``preexec_fn``: SIGTERM the server if the process that started it dies.

    Keeps a crashed test run from leaving orphaned servers holding ports. Linux only (a
    no-op elsewhere); the signal follows the *thread* that forked, so start the server from
    a long-lived thread.
    """
    try:
        libc = ctypes.CDLL("libc.so.6", use_errno=True)
        libc.prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG
    except OSError:
        pass


class EmbeddedTriton:
    """A ``tritonserver`` child process serving a model repository on loopback.

    Use as a context manager (``with EmbeddedTriton(repo) as server: ...``) or call
    :meth:`start` / :meth:`stop`.

    Args:
        repo: Model repository.
        http_port: HTTP port (default: a free one); likewise ``grpc_port``, ``metrics_port``.
        config_name: ``--model-config-name`` (``cpu`` reads ``configs/cpu.pbtxt``; None or ""
            uses ``config.pbtxt``, the native GPU configs).
        load_models: Models loaded at start (``("*",)`` = all); later loads go through the
            repository API (explicit model control).
        startup_timeout: Seconds to wait for the server to become live.
        log_path: Server log file (default: a temporary file, removed by :meth:`stop`).
        exit_timeout: Seconds the server waits for in-flight requests on shutdown.
        extra_args: More ``tritonserver`` arguments.
    """

    def __init__(
        self,
        repo: str | Path,
        http_port: int | None = None,
        grpc_port: int | None = None,
        metrics_port: int | None = None,
        config_name: str | None = "cpu",
        load_models: tuple[str, ...] = ("*",),
        startup_timeout: float = 120.0,
        log_path: str | Path | None = None,
        exit_timeout: int = 5,
        extra_args: tuple[str, ...] = (),
    ):
        self.repo = Path(repo).resolve()
        self.http_port = http_port or free_port()
        self.grpc_port = grpc_port or free_port()
        self.metrics_port = metrics_port or free_port()
        self.config_name = config_name
        self.load_models = load_models
        self.startup_timeout = startup_timeout
        self.exit_timeout = exit_timeout
        self.extra_args = extra_args
        self._own_log = log_path is None
        self.log_path = Path(log_path) if log_path else None
        self._proc: subprocess.Popen | None = None
        self._log_fh = None

    # ------------------------------------------------------------------ addresses

    @property
    def grpc_url(self) -> str:
        """``host:port`` for ``tritonclient.grpc.InferenceServerClient``."""
        return f"{LOOPBACK}:{self.grpc_port}"

    @property
    def http_url(self) -> str:
        """``http://host:port`` of the HTTP/REST endpoint."""
        return f"http://{LOOPBACK}:{self.http_port}"

    @property
    def metrics_url(self) -> str:
        """The Prometheus metrics page."""
        return f"http://{LOOPBACK}:{self.metrics_port}/metrics"

    @property
    def pid(self) -> int | None:
        return self._proc.pid if self._proc else None

    def running(self) -> bool:
        """Whether the child process is alive."""
        return self._proc is not None and self._proc.poll() is None

    # ------------------------------------------------------------------ lifecycle

    def command(self, install: TritonInstall, backends: Path) -> list[str]:
        """The ``tritonserver`` command line."""
        cmd = [
            str(install.binary),
            f"--model-repository={self.repo}",
            f"--backend-directory={backends}",
            "--model-control-mode=explicit",
            *(f"--load-model={m}" for m in self.load_models),
            f"--http-address={LOOPBACK}",
            f"--http-port={self.http_port}",
            f"--grpc-address={LOOPBACK}",
            f"--grpc-port={self.grpc_port}",
            f"--metrics-address={LOOPBACK}",
            f"--metrics-port={self.metrics_port}",
            # a model that fails to load must not take the server down: --check reports it
            "--exit-on-error=false",
            "--strict-readiness=true",
            f"--exit-timeout-secs={self.exit_timeout}",
        ]
        if self.config_name:
            cmd.append(f"--model-config-name={self.config_name}")
        return cmd + list(self.extra_args)

    def environment(self, install: TritonInstall) -> dict[str, str]:
        """The child's environment (see the module docstring for why each variable)."""
        env = dict(os.environ)
        libdirs = [str(install.libs)]
        libpython = sysconfig.get_config_var("LIBDIR")
        if libpython and sysconfig.get_config_var("INSTSONAME") and (Path(libpython) / sysconfig.get_config_var("INSTSONAME")).exists():
            libdirs.append(libpython)
        if env.get("LD_LIBRARY_PATH"):
            libdirs.append(env["LD_LIBRARY_PATH"])
        env["LD_LIBRARY_PATH"] = os.pathsep.join(libdirs)
        env["PATH"] = os.pathsep.join([str(Path(sys.executable).parent), env.get("PATH", "")])
        # the stub imports each version's model.py: keep __pycache__ out of the model repository
        env["PYTHONDONTWRITEBYTECODE"] = "1"
        # a PYTHONHOME/PYTHONPATH meant for another interpreter would override the venv lookup
        env.pop("PYTHONHOME", None)
        env.pop("PYTHONPATH", None)
        return env

    def start(self, require_ready: bool = True) -> "EmbeddedTriton":
        """Starts the server and waits until it is live (and ready).

        Args:
            require_ready: Also require every loaded model to be READY (``--check`` passes
                False to report the states instead).

        Raises:
            TritonError: The server exited or did not become live/ready in time; the message
                ends with the tail of its log.
        """
        if self.running():
            return self
        if not self.repo.is_dir():
            raise TritonError(f"{self.repo}: model repository not found (run `recsys export` first)")
        install = find_triton()
        backends = prepare_backends(install)
        if self.log_path is None:
            fd, name = tempfile.mkstemp(prefix="tritonserver-", suffix=".log")
            os.close(fd)
            self.log_path = Path(name)
        self._log_fh = open(self.log_path, "ab")
        self._proc = subprocess.Popen(
            self.command(install, backends),
            env=self.environment(install),
            stdout=self._log_fh,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
            # own process group: a terminal's Ctrl-C reaches us, and we shut the server down in order
            start_new_session=True,
            preexec_fn=_die_with_parent if sys.platform.startswith("linux") else None,
        )
        try:
            self._wait(require_ready)
        except BaseException:
            self.stop()
            raise
        return self

    def _wait(self, require_ready: bool) -> None:
        deadline = time.monotonic() + self.startup_timeout
        live = False
        while time.monotonic() < deadline:
            if self._proc is not None and self._proc.poll() is not None:
                raise TritonError(f"tritonserver exited with code {self._proc.returncode} during start-up\n{self.log_tail()}")
            if not live:
                live = self._get("/v2/health/live") == 200
            # with --load-model=* the startup loads finish before the endpoints open, so once
            # live, readiness is final: ready, or some model failed
            if live:
                if not require_ready or self._get("/v2/health/ready") == 200:
                    return
                raise TritonError(f"tritonserver is up but not every model is READY:\n{self._failed_models()}\n{self.log_tail()}")
            time.sleep(0.2)
        raise TritonError(f"tritonserver not live after {self.startup_timeout:.0f} s\n{self.log_tail()}")

    def _get(self, path: str) -> int | None:
        try:
            with urllib.request.urlopen(self.http_url + path, timeout=2) as resp:
                return resp.status
        except urllib.error.HTTPError as exc:
            return exc.code
        except (urllib.error.URLError, OSError):
            return None

    def _failed_models(self) -> str:
        try:
            return "\n".join(
                f"  {m['name']} v{m.get('version', '?')}: {m.get('state', '?')} {m.get('reason', '')}".rstrip()
                for m in self.repository_index()
                if m.get("state") != "READY"
            )
        except TritonError as exc:
            return f"  (repository index unavailable: {exc})"

    def stop(self, grace: float = 15.0) -> int | None:
        """Stops the server: SIGTERM, wait ``grace`` seconds, then SIGKILL.

        Returns:
            The server's exit code (None if it was never started).
        """
        code = None
        if self._proc is not None:
            if self._proc.poll() is None:
                self._proc.terminate()
                try:
                    self._proc.wait(timeout=grace)
                except subprocess.TimeoutExpired:
                    self._proc.kill()
                    self._proc.wait()
            code = self._proc.returncode
            # the server's own session: Python-backend stubs left by a server that died (SIGKILL,
            # OOM) ignore SIGTERM and would live on; nothing else runs in that process group
            try:
                os.killpg(self._proc.pid, signal.SIGKILL)
            except (ProcessLookupError, PermissionError):
                pass
            self._proc = None
        if self._log_fh is not None:
            self._log_fh.close()
            self._log_fh = None
        if self._own_log and self.log_path is not None and code is not None and code == 0:
            self.log_path.unlink(missing_ok=True)
            self.log_path = None
        return code

    def wait(self, timeout: float | None = None) -> int | None:
        """Waits for the child to exit; its exit code (None on timeout or if not started)."""
        if self._proc is None:
            return None
        try:
            return self._proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            return None

    def __enter__(self) -> "EmbeddedTriton":
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()

    # ------------------------------------------------------------------ queries

    def log_tail(self, lines: int = 40) -> str:
        """The last ``lines`` lines of the server log."""
        if self.log_path is None or not self.log_path.exists():
            return "(no server log)"
        text = self.log_path.read_text(errors="replace").splitlines()
        return "--- tritonserver log (tail) ---\n" + "\n".join(text[-lines:])

    def _post_json(self, path: str, body: dict | None = None) -> object:
        data = json.dumps(body or {}).encode()
        req = urllib.request.Request(self.http_url + path, data=data, method="POST", headers={"Content-Type": "application/json"})
        try:
            with urllib.request.urlopen(req, timeout=30) as resp:
                payload = resp.read()
        except urllib.error.HTTPError as exc:
            raise TritonError(f"POST {path}: HTTP {exc.code}: {exc.read().decode(errors='replace')}") from exc
        except (urllib.error.URLError, OSError) as exc:
            raise TritonError(f"POST {path}: {exc}") from exc
        return json.loads(payload) if payload else None

    def repository_index(self) -> list[dict]:
        """Every model of the repository with its version, state and reason (``POST /v2/repository/index``)."""
        out = self._post_json("/v2/repository/index")
        return list(out or [])

    def server_metadata(self) -> dict:
        """``GET /v2``: server name, version and extensions."""
        try:
            with urllib.request.urlopen(self.http_url + "/v2", timeout=5) as resp:
                return json.loads(resp.read())
        except (urllib.error.URLError, OSError) as exc:
            raise TritonError(f"GET /v2: {exc}") from exc

    def status(self) -> dict:
        """``{"server_version", "models": {name: {"versions": [...], "state"}}}``.

        A model's state is READY only when every listed version is READY; otherwise the
        first other state (and its reason) is reported.
        """
        models: dict[str, dict] = {}
        for entry in self.repository_index():
            m = models.setdefault(entry["name"], {"versions": [], "state": "READY"})
            if entry.get("version"):
                m["versions"].append(int(entry["version"]))
            state = entry.get("state") or "UNAVAILABLE"
            if state != "READY" and m["state"] == "READY":
                m["state"] = state
                if entry.get("reason"):
                    m["reason"] = entry["reason"]
        for m in models.values():
            m["versions"].sort()
        return {"server_version": self.server_metadata().get("version"), "models": models}


def serve_forever(server: EmbeddedTriton, on_ready=None) -> int:
    """Runs a started server in the foreground until SIGINT/SIGTERM or until it dies.

    Args:
        server: A started server.
        on_ready: Called once before waiting (prints the addresses).

    Returns:
        0 after a signal-driven clean stop, 1 if the server died on its own.
    """
    stop = threading.Event()
    previous = {}

    def handler(signum, frame) -> None:  # noqa: ARG001 - signal handler signature
        stop.set()

    for sig in (signal.SIGINT, signal.SIGTERM):
        previous[sig] = signal.signal(sig, handler)
    try:
        if on_ready:
            on_ready()
        while not stop.wait(0.5):
            if not server.running():
                break
    finally:
        for sig, old in previous.items():
            signal.signal(sig, old)
    died = not server.running()
    code = server.stop()
    if died:
        print(f"recsys: tritonserver exited on its own (code {code})\n{server.log_tail()}", file=sys.stderr)
        return 1
    return 0


def check(server: EmbeddedTriton) -> tuple[dict, bool]:
    """Starts ``server`` (not requiring readiness), reads every model's state and stops it.

    Returns:
        ``(status, all_ready)``; an empty repository is not "all ready".
    """
    server.start(require_ready=False)
    try:
        status = server.status()
    finally:
        server.stop()
    ok = bool(status["models"]) and all(m["state"] == "READY" for m in status["models"].values())
    return status, ok
