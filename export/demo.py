"""``recsys demo``: the whole path in one command, offline then online.

Runs the offline composition (:func:`export.pipeline.prepare_serving`: train when the
artifacts have no manifest, publish the ONNX repository and the tuned FAISS bundle when the
repository's latest version was not made from these artifacts), starts Triton and the
orchestrator (:func:`orchestrator.stack.running_stack`), asks three questions through the real
client, prints them, stops everything.
"""

from __future__ import annotations

import tempfile
from pathlib import Path
from typing import Any

from clients.client import RecsysClient
from export import DEFAULT_DATA_DIR
from export.pipeline import prepare_serving
from orchestrator.settings import ServeSettings
from orchestrator.stack import running_stack

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
    artifacts, repo = Path(artifacts), Path(repo)
    setup: dict[str, Any] = dict(prepare_serving(Path(data), artifacts, repo, progress))
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
