"""Drift: PSI maths, fixed bins, thread-safe histograms, the export's reference, the metric on a real server."""

from __future__ import annotations

import json
import math
import threading
import urllib.request
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from prometheus_client.parser import text_string_to_metric_families

from clients.cli import main
from clients.client import RecsysClient
from orchestrator.artifacts import DRIFT_REFERENCE
from orchestrator.catalog import Catalog
from orchestrator.contract import read_version_info
from orchestrator.drift import (
    DISTRIBUTIONS,
    PSI_ALERT,
    Bins,
    DriftHistograms,
    DriftMonitor,
    DriftReference,
    DriftSample,
    drift_sample,
    psi,
    quantile_edges,
)
from orchestrator.service import create_server
from orchestrator.settings import ServeSettings

ROOT = Path(__file__).resolve().parents[1]

# ----------------------------------------------------------------------------- PSI maths


def test_psi_of_known_distributions():
    assert psi(np.array([50, 50]), np.array([500, 500])) == pytest.approx(0.0, abs=1e-12)
    # (0.9 - 0.5) ln(0.9 / 0.5) + (0.1 - 0.5) ln(0.1 / 0.5) = 0.87889
    assert psi(np.array([50, 50]), np.array([90, 10])) == pytest.approx(0.4 * math.log(1.8) - 0.4 * math.log(0.2), rel=1e-3)
    # ten equal bins vs one bin gaining 10 points from another: small, below the "stable" bound
    e = np.full(10, 100)
    a = e.copy()
    a[0], a[1] = 110, 90
    assert 0.0 < psi(e, a) < 0.01
    # PSI is symmetric in its two arguments
    assert psi(np.array([1, 2, 7]), np.array([3, 3, 4])) == pytest.approx(psi(np.array([3, 3, 4]), np.array([1, 2, 7])))


def test_psi_empty_bins_are_finite_and_no_data_is_nan():
    value = psi(np.array([100, 0]), np.array([0, 100]))
    assert math.isfinite(value) and value > 10  # smoothed: large, not infinite
    assert math.isnan(psi(np.array([1, 1]), np.array([0, 0])))
    with pytest.raises(ValueError, match="3 reference bins vs 2"):
        psi(np.array([1, 1, 1]), np.array([1, 1]))


def test_quantile_bins_equal_shares_mass_points_and_float_jitter():
    rng = np.random.default_rng(0)
    values = rng.normal(size=20_000)
    bins = Bins(edges=quantile_edges(values))
    counts = np.bincount(bins.index(values), minlength=bins.n_bins)
    assert bins.n_bins == 10 and np.all(np.abs(counts / len(values) - 0.1) < 0.005)
    full = np.r_[np.full(800, 10.0), np.arange(1, 10, dtype=float).repeat(20)]  # most windows full
    b = Bins(edges=quantile_edges(full))
    assert b.index(np.array([10.0]))[0] == b.n_bins - 1 and np.bincount(b.index(full))[-1] == 800
    norm = Bins(edges=quantile_edges(np.ones(100)))
    assert norm.index(np.array([0.99999994, 1.0, 1.0000001])).tolist() == [1, 1, 1]  # last bits do not move a value


def test_normal_samples_stay_below_0_1_and_a_shift_goes_above_the_alert():
    rng = np.random.default_rng(1)
    ref = Bins(edges=quantile_edges(rng.normal(size=30_000)))
    expected = np.bincount(ref.index(rng.normal(size=30_000)), minlength=ref.n_bins)
    same = np.bincount(ref.index(rng.normal(size=500)), minlength=ref.n_bins)
    shifted = np.bincount(ref.index(rng.normal(loc=0.8, size=500)), minlength=ref.n_bins)
    assert psi(expected, same) < 0.1
    assert psi(expected, shifted) > PSI_ALERT


# ----------------------------------------------------------------------------- histograms


def _reference(genres: int = 3) -> DriftReference:
    rng = np.random.default_rng(2)
    samples = [
        DriftSample(
            int(rng.integers(1, 11)),
            1.0,
            rng.normal(size=10).astype(np.float32),
            rng.normal(size=10).astype(np.float32),
            rng.integers(1, 100, 10).astype(np.float32),
            rng.integers(0, genres, 5),
        )
        for _ in range(500)
    ]
    return DriftReference.from_samples(samples, [f"g{i}" for i in range(genres)])


def test_a_sample_bins_the_same_live_and_read_back_from_the_log():
    """The live histogram and `recsys drift` (over the request log) see bit-identical values."""
    rng = np.random.default_rng(3)
    for scale in (1e-3, 1.0, 40.0):
        scores = (scale * rng.normal(size=(2, 50))).astype(np.float32)
        s = drift_sample(
            np.array([3, 1, -1]), rng.normal(size=8).astype(np.float32), scores[0], scores[1], np.arange(50), np.arange(60), np.eye(60, 4)
        )
        back = DriftSample.from_json(s.to_json())
        for name, live in s.values().items():
            np.testing.assert_array_equal(back.values()[name], live, err_msg=name)
    # a score a hair below an edge is rounded before either side bins it
    edge = Bins(edges=np.array([0.5]))
    hair = np.float32(0.5 - 0.5 * 1e-5 - 4e-7)
    s = drift_sample(np.array([0]), np.ones(2, np.float32), np.array([hair]), np.array([hair]), np.array([0]), np.ones(1), np.eye(1))
    assert edge.index(s.retrieval_scores) == edge.index(DriftSample.from_json(s.to_json()).retrieval_scores)


def test_reference_round_trips_and_rejects_damage(tmp_path):
    ref = _reference()
    ref.save(tmp_path / "r.json")
    back = DriftReference.load(tmp_path / "r.json")
    for d in DISTRIBUTIONS:
        assert back.counts[d].tolist() == ref.counts[d].tolist()
        assert back.bins[d].labels() == ref.bins[d].labels()
    raw = json.loads((tmp_path / "r.json").read_text())
    raw["distributions"]["user_norm"]["counts"].append(1)
    with pytest.raises(ValueError, match="user_norm"):
        DriftReference.from_json(raw)
    sample = DriftSample(3, 0.5, np.array([0.1], np.float32), np.array([0.2], np.float32), np.array([7.0], np.float32), np.array([0, 2]))
    assert DriftSample.from_json(sample.to_json()).values()["history_genres"].tolist() == [0, 2]
    with pytest.raises(ValueError, match="not a drift sample"):
        DriftSample.from_json('{"h": 1}')


def test_histograms_count_every_observation_from_many_threads():
    ref = _reference()
    hist = DriftHistograms(ref, window_requests=100_000, min_requests=1)
    sample = DriftSample(4, 1.0, np.zeros(10, np.float32), np.zeros(10, np.float32), np.ones(10, np.float32), np.array([0, 1, 1]))
    threads = [threading.Thread(target=lambda: [hist.observe(sample) for _ in range(2000)]) for _ in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    counts = hist.counts()
    assert hist.requests == 16_000
    assert counts["history_length"].sum() == 16_000 and counts["retrieval_score"].sum() == 160_000
    assert counts["history_genres"].tolist() == [16_000, 32_000, 0]


def test_histograms_window_is_bounded_and_forgets_old_traffic():
    ref = _reference()
    hist = DriftHistograms(ref, window_requests=50, min_requests=20)
    odd = DriftSample(1, 1.0, np.full(10, 9.0, np.float32), np.full(10, 9.0, np.float32), np.full(10, 1e6, np.float32), np.array([2] * 9))
    for _ in range(10):
        hist.observe(odd)
    assert all(math.isnan(v) for v in hist.psi().values())  # too few answers: no verdict
    for _ in range(60):
        hist.observe(odd)
    assert hist.requests <= 100 and max(hist.psi().values()) > PSI_ALERT
    rng = np.random.default_rng(2)  # traffic like the reference's for two windows: the drift is forgotten
    for _ in range(100):
        hist.observe(
            DriftSample(
                int(rng.integers(1, 11)),
                1.0,
                rng.normal(size=10).astype(np.float32),
                rng.normal(size=10).astype(np.float32),
                rng.integers(1, 100, 10).astype(np.float32),
                rng.integers(0, 3, 5),
            )
        )
    assert max(hist.psi().values()) < 0.25


def test_monitor_keeps_two_versions_and_drops_silent_ones():
    ref = _reference()
    mon = DriftMonitor(window_requests=10, min_requests=1, keep=2, stale_s=3600)
    s = DriftSample(4, 1.0, np.zeros(1, np.float32), np.zeros(1, np.float32), np.ones(1, np.float32), np.array([0]))
    for version in ("1", "2", "3"):
        mon.observe(version, ref, s)
    assert sorted(mon.histograms()) == ["2", "3"]
    mon.stale_s = 0.0
    assert mon.histograms() == {} or all(v in ("2", "3") for v in mon.histograms())


# ----------------------------------------------------------------------------- the export's reference


def test_export_writes_a_reference_covered_by_the_version_hashes(tiny_artifacts, tiny_repository):
    path = tiny_artifacts / DRIFT_REFERENCE
    ref = DriftReference.load(path)
    users = pd.read_parquet(tiny_artifacts / "interactions.parquet").user_id.nunique()
    assert ref.requests == users == ref.meta["users"]  # every tiny user got a model answer
    assert 9 * users <= ref.counts["retrieval_score"].sum() <= 10 * users and ref.bins["retrieval_score"].n_bins == 10
    recorded = read_version_info(tiny_repository, 1)["artifacts"]["files_sha256"]
    from orchestrator.artifacts import file_sha256

    assert recorded[DRIFT_REFERENCE] == file_sha256(path)
    assert Catalog.load(tiny_artifacts).drift_reference is not None


# ----------------------------------------------------------------------------- a real server


def _psi_metrics(port: int) -> dict[str, float]:
    text = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10).read().decode()
    return {
        s.labels["distribution"]: s.value for f in text_string_to_metric_families(text) for s in f.samples if s.name == "recsys_drift_psi"
    }


def test_metric_and_offline_table_on_a_real_server(tiny_artifacts, tiny_repository, tmp_path, capsys):
    users = sorted(pd.read_parquet(tiny_artifacts / "interactions.parquet").user_id.unique().tolist())
    items = pd.read_parquet(tiny_artifacts / "items.parquet")
    comedies = items[items.genres.str.contains("Comedy")].movie_id.tolist()
    s = ServeSettings(
        artifacts_dir=tiny_artifacts,
        model_repository=tiny_repository,
        history_db_path=tmp_path / "history.sqlite",
        request_log_path=tmp_path / "requests.sqlite",
        metrics_port=0,
        health_poll_s=0.2,
        drift_window_requests=len(users),
        drift_min_requests=50,
    )
    server, _ = create_server(s)
    server.start()
    try:
        with RecsysClient(server.address) as client:
            client.wait_until_serving(60)
            for u in users:  # ordinary traffic: the training users themselves
                client.recommend(int(u), k=10)
            normal = _psi_metrics(server.metrics_port)
            assert set(normal) == set(DISTRIBUTIONS)
            assert max(normal.values()) < 0.1, normal
            rng = np.random.default_rng(0)
            for _ in range(2 * len(users)):  # two windows of one-genre histories
                client.recommend(history=rng.choice(comedies, 8, replace=False).tolist(), k=10)
            shifted = _psi_metrics(server.metrics_port)
            assert shifted["history_genres"] > PSI_ALERT, shifted
    finally:
        server.stop()
    # the offline table reads the same samples from the request log and computes the same PSI
    n = 2 * len(users)
    assert (
        main(["drift", "--request-log", str(tmp_path / "requests.sqlite"), "--artifacts", str(tiny_artifacts), "--last", str(n), "--json"])
        == 0
    )
    offline = json.loads(capsys.readouterr().out)
    assert offline["answers"] == n and offline["alert"] is True
    for d in DISTRIBUTIONS:
        assert offline["psi"][d] == pytest.approx(shifted[d], rel=1e-6, abs=1e-9), d
    assert main(["drift", "--request-log", str(tmp_path / "requests.sqlite"), "--artifacts", str(tiny_artifacts)]) == 0
    table = capsys.readouterr().out
    assert "history_genres" in table and "DRIFT" in table
    assert main(["drift", "--request-log", str(tmp_path / "missing.sqlite"), "--artifacts", str(tiny_artifacts)]) == 1


def test_alert_rule_and_dashboard_use_the_metric():
    rules = (ROOT / "deploy" / "alerts.yml").read_text()
    assert "recsys_drift_psi" in rules and f"> {PSI_ALERT}" in rules and "for: 15m" in rules
    dashboard = json.loads((ROOT / "deploy" / "grafana" / "dashboards" / "orchestrator.json").read_text())
    exprs = [t.get("expr", "") for p in dashboard["panels"] for t in p.get("targets", [])]
    assert any("recsys_drift_psi" in e for e in exprs)
