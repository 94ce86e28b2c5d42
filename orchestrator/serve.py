"""Running the online path: ``recsys serve`` and ``recsys demo``.

``recsys serve`` starts the embedded Triton (``export/triton.py``) on the model repository
unless ``--triton-url`` names an external one (docker-compose) or ``--in-process`` runs the
models with onnxruntime, then the orchestrator; it logs where both listen and stops both,
orchestrator first, on SIGINT or SIGTERM.

``recsys demo`` is the whole online path in one command: train on ``data/ml-latest-small`` when
the artifacts have no manifest, export when the repository's latest version was not made
from these artifacts, start Triton and the orchestrator, ask through the real client, print,
stop everything.
"""

from __future__ import annotations

import contextlib
import json
import logging
import signal
import tempfile
import threading
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

from orchestrator.settings import ServeSettings
from export.files import DEFAULT_DATA_DIR, file_sha256 as _sha256

log = logging.getLogger(__name__)

EXPORTED_FILES = ("two_tower.pt", "ranker_features.pt", "ranker.lgb", "item_embeddings.npy", "items.parquet")
"""Artifact files whose hashes the export records in ``version.json``: a match means no re-export."""


@contextlib.contextmanager
def running_stack(settings: ServeSettings, start_triton: bool, triton_log: str | Path | None = None) -> Iterator[tuple[Any, Any]]:
    """Starts (embedded Triton and) the orchestrator; stops both on exit, orchestrator first.

    Args:
        settings: Serving settings; ``triton_url`` is filled in when Triton is started here.
        start_triton: Start the embedded Triton on ``settings.model_repository``.
        triton_log: Triton's log file (default: a temporary file).

    Yields:
        ``(server, triton)``: the started :class:`~orchestrator.service.Server` and the
        :class:`~export.triton.EmbeddedTriton` (None when not started here).
    """
    from orchestrator.service import create_server

    triton = None
    with contextlib.ExitStack() as stack:
        if start_triton:
            from export.triton import EmbeddedTriton

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


# ---------------------------------------------------------------------------- demo





def exported_from(artifacts: Path, repo: Path) -> bool:
    """Whether the repository's latest version was exported from exactly these artifacts."""
    from orchestrator.backends import USER_TOWER, latest_version

    try:
        version = latest_version(repo, (USER_TOWER, "ranker_features", "ranker", "ranker_ensemble"))
    except FileNotFoundError:
        return False
    info_path = repo / USER_TOWER / str(version) / "version.json"
    if not info_path.is_file():
        return False
    recorded = json.loads(info_path.read_text()).get("artifacts", {}).get("files_sha256", {})
    return all(recorded.get(n) == _sha256(artifacts / n) for n in EXPORTED_FILES if (artifacts / n).exists())


def prepare(artifacts: Path, repo: Path, data: Path, progress: bool = True) -> dict[str, bool]:
    """Trains when there is no manifest, exports when the repository is stale."""
    done = {"trained": False, "exported": False}
    if not (artifacts / "manifest.json").is_file():
        from export.pipeline import train

        train(data, artifacts, progress=progress)
        done["trained"] = True
    if not exported_from(artifacts, repo):
        from export.onnx_export import export_repository

        export_repository(artifacts, repo)
        done["exported"] = True
    return done


def _pick_examples(server: Any) -> dict[str, Any]:
    """A known active user, a history-only user and a movie for Similar, from the data."""
    import numpy as np
    import pandas as pd

    rec = server.recommender
    cat = rec.catalog
    frame = pd.read_parquet(rec.settings.artifacts_dir / "interactions.parquet", columns=["user_id"])
    counts = frame.user_id.value_counts()  # most active first
    # an active user, but not one who has seen most of the catalog (nothing left to suggest)
    user = int(counts.index[min(len(counts) - 1, len(counts) // 10)])
    by_pop = np.argsort(-cat.popularity, kind="stable")
    # a new user who liked three popular movies of one genre: the catalog's most common genre
    genre = cat.filter.genres[int(np.argmax(cat.genre_matrix.sum(0)))]
    of_genre = [i for i in by_pop if genre in cat.genres[i]][:3]
    return {
        "user_id": user,
        "history": [int(cat.movie_ids[i]) for i in of_genre],
        "history_genre": genre,
        "movie_id": int(cat.movie_ids[by_pop[0]]),
    }


def _as_dict(response: Any) -> dict:
    from google.protobuf.json_format import MessageToDict

    return MessageToDict(response, preserving_proto_field_name=True, always_print_fields_with_no_presence=True)


def demo(
    artifacts: str | Path = "artifacts",
    repo: str | Path = "model_repository",
    data: str | Path = DEFAULT_DATA_DIR,
    k: int = 10,
    progress: bool = True,
) -> dict[str, Any]:
    """``recsys demo``: the three example queries through Triton + orchestrator + client.

    The history store is a temporary file, so the demo leaves no state behind.

    Returns:
        ``{"recommend": ..., "recommend_by_history": ..., "similar": ..., "setup": ...}``
        (responses as JSON-able dicts).
    """
    from clients.client import RecsysClient

    artifacts, repo = Path(artifacts), Path(repo)
    setup: dict[str, Any] = prepare(artifacts, repo, Path(data), progress)
    with tempfile.TemporaryDirectory(prefix="recsys-demo-") as tmp:
        settings = ServeSettings(artifacts_dir=artifacts, model_repository=repo, history_db_path=Path(tmp) / "history.sqlite")
        with running_stack(settings, start_triton=True) as (server, _):
            examples = _pick_examples(server)
            with RecsysClient(server.address, timeout_s=30) as client:
                client.wait_until_serving(60)
                out = {
                    "recommend": _as_dict(client.recommend(examples["user_id"], k=k)),
                    "recommend_by_history": _as_dict(client.recommend(history=examples["history"], k=k)),
                    "similar": _as_dict(client.similar(examples["movie_id"], k=k)),
                }
    setup.update(examples)
    out["setup"] = setup
    return out


def demo_table(result: dict[str, Any]) -> str:
    """The demo's answers as plain-text tables."""
    s = result["setup"]
    sections = [
        ("recommend", f"Recommend for user {s['user_id']} (history from the store)"),
        ("recommend_by_history", f"Recommend for a new user who watched {s['history']} ({s['history_genre']})"),
        ("similar", f"Similar to movie {s['movie_id']}"),
    ]
    lines = []
    for key, title in sections:
        resp = result[key]
        extra = f", fallback: {resp.get('fallback_reason')}" if resp.get("is_fallback") else ""
        lines += ["", f"{title}: model {resp.get('model_version')}, {resp.get('latency_ms', 0):.1f} ms{extra}"]
        lines.append(f"  {'#':>2}  {'movie':>6}  {'score':>7}  {'year':>4}  title / why")
        for i, item in enumerate(resp.get("items", []), 1):
            lines.append(
                f"  {i:>2}  {item['movie_id']:>6}  {item['score']:>7.3f}  {item['year']:>4}  "
                f"{item['title']} [{'|'.join(item['genres'])}] - {item['explanation']}"
            )
    return "\n".join(lines).lstrip("\n")
