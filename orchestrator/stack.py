"""Running the online stack: ``recsys serve`` (and the stack ``recsys demo`` asks).

``recsys serve`` starts the embedded Triton (``orchestrator/tritonserver.py``) on the model repository
unless ``--triton-url`` names an external one (docker-compose) or ``--in-process`` runs the
models with onnxruntime, then the orchestrator; it logs where both listen and stops both,
orchestrator first, on SIGINT or SIGTERM.

:func:`running_stack` is the one place that starts and stops the two processes; ``recsys
demo`` (``export/demo.py``) uses it too.
"""

from __future__ import annotations

import contextlib
import logging
import signal
import threading
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

from orchestrator.settings import ServeSettings

log = logging.getLogger(__name__)


@contextlib.contextmanager
def running_stack(settings: ServeSettings, start_triton: bool, triton_log: str | Path | None = None) -> Iterator[tuple[Any, Any]]:
    """Starts (embedded Triton and) the orchestrator; stops both on exit, orchestrator first.

    Args:
        settings: Serving settings; ``triton_url`` is filled in when Triton is started here.
        start_triton: Start the embedded Triton on ``settings.model_repository``.
        triton_log: Triton's log file (default: a temporary file).

    Yields:
        ``(server, triton)``: the started :class:`~orchestrator.service.Server` and the
        :class:`~orchestrator.tritonserver.EmbeddedTriton` (None when not started here).
    """
    from orchestrator.service import create_server

    triton = None
    with contextlib.ExitStack() as stack:
        if start_triton:
            from orchestrator.tritonserver import EmbeddedTriton

            triton = stack.enter_context(EmbeddedTriton(settings.model_repository, log_path=triton_log))
            settings = settings.with_(triton_url=triton.grpc_url)
        server, _ = create_server(settings)
        stack.callback(server.stop)
        server.start()
        yield server, triton


def serve(settings: ServeSettings, start_triton: bool, announce: Callable[[dict], None], stop: threading.Event | None = None) -> int:
    """``recsys serve``: runs until SIGINT/SIGTERM (or ``stop``), or until Triton dies.

    Returns:
        0 after a requested stop, 1 when the embedded Triton exited on its own.
    """
    stop = stop or threading.Event()
    previous = {}
    if threading.current_thread() is threading.main_thread():
        for sig in (signal.SIGINT, signal.SIGTERM):
            previous[sig] = signal.signal(sig, lambda *_: stop.set())
    try:
        with running_stack(settings, start_triton) as (server, triton):
            info = {
                "grpc": server.address,
                "triton": server.recommender.settings.triton_url or "in-process (onnxruntime)",
                "backend": server.recommender.backend.name,
                "model_versions": server.recommender.versions,
                "history_store": settings.history_store,
                "history_db": str(settings.history_db()) if settings.history_store == "sqlite" else settings.redis_url,
                "metrics_port": server.metrics_port,  # the /metrics page, None: off
                "request_log": str(settings.request_log_db()) if settings.request_log else "off",
                "tls": "on" if settings.tls_cert else "off",
                "api_keys": "required" if (settings.api_keys_file or settings.api_keys) else "off",
            }
            if triton is not None:
                info["triton_log"] = str(triton.log_path)
            announce(info)
            while not stop.wait(0.5):
                if triton is not None and not triton.running():
                    log.error("the embedded tritonserver exited on its own\n%s", triton.log_tail())
                    return 1
        return 0
    finally:
        for sig, old in previous.items():
            signal.signal(sig, old)
