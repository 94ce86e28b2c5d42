"""perf_analyzer input files are valid requests for the served configs.

perf_analyzer sends exactly what these files hold (``-b B`` takes ``B`` consecutive entries
as the rows of one request), so every entry must name every config input with the config's
element count and type, and every id must index inside its table. Checked for the
checked-in set against the checked-in configs, and for files generated from the
tiny model against its repository. No network and no perf_analyzer binary needed.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from tritonclient.grpc import model_config_pb2

from benchmarks.perf_analyzer.make_inputs import DEFAULT_OUT, MODELS, make_inputs, read_config
from benchmarks.perf_analyzer.run import entry_fits
from export.features import FEATURE_NAMES

ROOT = Path(__file__).resolve().parents[1]
CONFIG_FILES = ("config.pbtxt", "configs/cpu.pbtxt")


def check_inputs(inputs: Path, repo: Path, n_items: int | None = None) -> dict:
    """Asserts every ``<model>.json`` in ``inputs`` is valid for both configs in ``repo``; returns meta."""
    meta = json.loads((inputs / "meta.json").read_text())
    n_items = n_items or meta["n_items"]
    cards = meta["demo_cardinalities"]
    for model in MODELS:
        entries = json.loads((inputs / f"{model}.json").read_text())["data"]
        info = meta["models"][model]
        assert isinstance(entries, list) and len(entries) == info["entries"] >= 1, model
        for config_file in CONFIG_FILES:
            config = read_config(repo / model / config_file)
            assert config.name == model
            b = info["batch_size"]
            assert 1 <= b <= max(config.max_batch_size, 1), (model, config_file)
            # -b B builds each request from B consecutive entries; whole users need len % B == 0
            assert len(entries) >= b and len(entries) % b == 0, model
            specs = {t.name: t for t in config.input}
            for i, entry in enumerate(entries):
                assert set(entry) == set(specs), (model, i, set(entry) ^ set(specs))
                for name, t in specs.items():
                    assert entry_fits(entry[name], list(t.dims)), (model, name)
                    values = entry[name]["content"] if isinstance(entry[name], dict) else entry[name]
                    if t.data_type in (model_config_pb2.TYPE_INT64, model_config_pb2.TYPE_INT32):
                        assert all(type(v) is int for v in values), (model, name)
                    elif t.data_type == model_config_pb2.TYPE_FP32:
                        arr = np.asarray(values, dtype=np.float64)
                        assert np.isfinite(arr).all() and (np.abs(arr) < np.finfo(np.float32).max).all(), (model, name)
                    else:
                        pytest.fail(f"{model}.{name}: unexpected type {t.data_type}")
        check_ranges(model, entries, n_items, cards, meta)
    return meta


def check_ranges(model: str, entries: list[dict], n_items: int, cards: list[int], meta: dict) -> None:
    """Ids index inside their tables; histories are left-padded windows with matching ratings."""
    for entry in entries:
        # a whole request (no batch axis): check each of its rows as a row entry
        entry = {k: (v["content"] if isinstance(v, dict) else v) for k, v in entry.items()}
        if "item" in entry:
            assert all(0 <= v < n_items for v in entry["item"]), model
        if "history" in entry:
            hist = np.asarray(entry["history"]).reshape(-1, meta["history_len"])
            rating = np.asarray(entry["history_rating"]).reshape(hist.shape)
            assert ((hist >= -1) & (hist < n_items)).all(), model
            pad = hist == -1
            # padding only on the left: once a real item appears, no -1 follows
            assert not (np.maximum.accumulate(~pad, axis=1) & pad).any(), model
            assert (rating[pad] == 0).all() and ((rating[~pad] >= 0) & (rating[~pad] <= 5)).all(), model
        if "demographics" in entry:
            assert all(0 <= v < c for v, c in zip(entry["demographics"], cards)), model
        if "retrieval_rank" in entry:
            assert all(0 <= r < meta["candidates"] for r in entry["retrieval_rank"]), model
            assert all(-1.0 - 1e-6 <= v <= 1.0 + 1e-6 for v in entry["retrieval_score"]), model  # cosine of unit vectors


def test_checked_in_inputs_fit_the_checked_in_configs():
    meta = check_inputs(DEFAULT_OUT, ROOT / "model_repository")
    assert meta["history_len"] == 50 and meta["n_features"] == len(FEATURE_NAMES)
    assert meta["models"]["ranker"]["batch_size"] == meta["candidates"]  # one user's rows per request
    for model in ("ranker_features", "ranker_ensemble"):  # no batch axis: one entry is one request
        assert meta["models"][model]["batch_size"] == 1
    # the feature model and the ensemble get the same requests
    assert (DEFAULT_OUT / "ranker_features.json").read_text() == (DEFAULT_OUT / "ranker_ensemble.json").read_text()


def test_checked_in_inputs_match_local_artifacts():
    """Where the bundled data's artifacts are present, the files index the same catalog."""
    items = ROOT / "artifacts" / "items.parquet"
    if not items.is_file():
        pytest.skip("no local artifacts")
    import pandas as pd

    n_items = len(pd.read_parquet(items, columns=["item"]))
    assert json.loads((DEFAULT_OUT / "meta.json").read_text())["n_items"] == n_items


def test_generated_inputs_fit_other_shapes(tiny_artifacts, tiny_repository, tmp_path):
    """The generator follows the repository's shapes (tiny: L = 10, 30 candidates)."""
    meta = make_inputs(tiny_artifacts, tiny_repository, tmp_path, users=5, items=7, ranker_users=2)
    assert meta["history_len"] == 10 and meta["candidates"] == 30
    assert meta["models"]["ranker_ensemble"]["entries"] == 2  # one request per user
    assert meta["models"]["ranker"]["entries"] == 60
    check_inputs(tmp_path, tiny_repository)
    # a file cut for other dims is caught
    with pytest.raises(AssertionError):
        check_inputs(DEFAULT_OUT, tiny_repository)


def test_run_helpers_without_the_binary(tmp_path):
    from benchmarks.perf_analyzer.run import PerfAnalyzer, _merge_csv, summarise
    from benchmarks.perf_analyzer.run import check_inputs as run_check

    run_check(DEFAULT_OUT, ROOT / "model_repository", list(MODELS))
    pa = PerfAnalyzer(binary=tmp_path / "pa" / "perf_analyzer", root=tmp_path / "root")
    cmd = pa.command("-m", "ranker")
    assert cmd[:3] == [
        str(tmp_path / "root/usr/lib/x86_64-linux-gnu/ld-linux-x86-64.so.2"),
        "--library-path",
        str(tmp_path / "root/usr/lib/x86_64-linux-gnu"),
    ]
    header = "Concurrency,Inferences/Second,Client Send,p50 latency,p90 latency,p95 latency,p99 latency\n"
    for c, thr in ((1, "1000.5"), (2, "1800.0")):
        (tmp_path / f"c{c}.csv").write_text(header + f"{c},{thr},10,900,1000,1100,1500\n")
    _merge_csv([tmp_path / "c1.csv", tmp_path / "c2.csv"], tmp_path / "m.csv")
    lines = (tmp_path / "m.csv").read_text().splitlines()
    assert lines[0] == header.strip() and len(lines) == 3
    row = summarise("ranker", 200, {"Concurrency": "2", "Inferences/Second": "1800.0", "p50 latency": "900", "p99 latency": "1500"})
    assert row == {
        "model": "ranker",
        "batch": 200,
        "concurrency": 2,
        "infer_per_s": 1800.0,
        "requests_per_s": 9.0,
        "p50_us": 900,
        "p99_us": 1500,
    }
