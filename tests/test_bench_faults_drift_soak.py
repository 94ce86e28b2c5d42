"""``recsys bench faults`` drift and soak phases on the tiny model: real Triton, real orchestrator, its own /metrics.

The other phases are skipped (``tests/test_bench_faults.py`` runs them). What is asserted does
not depend on the machine's speed: the server's PSI on ordinary and on one-genre traffic, the
alert condition, and a soak without errors whose figures agree with its targets.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

from benchmarks.faults import PHASES, SECTION_KEYS

ROOT = Path(__file__).resolve().parents[1]


def test_drift_and_soak_phases(tiny_artifacts, tiny_repository, tmp_path):
    out = tmp_path / "faults.json"
    skip = [arg for p in PHASES if p not in ("drift", "soak") for arg in ("--skip", p)]
    cmd = [sys.executable, "-m", "clients.cli", "bench", "faults", "--artifacts", str(tiny_artifacts), "--repo", str(tiny_repository)]
    cmd += ["--quick", *skip, "--drift-window", "100", "--soak-minutes", "0.2", "--out", str(out)]
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert out.is_file(), proc.stderr[-3000:]
    report = json.loads(out.read_text())
    for phase in ("drift", "soak"):
        assert set(SECTION_KEYS[phase]) <= set(report[phase])

    drift = report["drift"]
    assert drift["requests_per_part"] == 300 and drift["window_requests"] == 100
    assert drift["by_status"]["normal"] == {"OK": 300} and drift["by_status"]["shifted"] == {"OK": 300}
    assert set(drift["psi_normal_by_distribution"]) == set(drift["psi_shifted_by_distribution"]) and drift["psi_normal_by_distribution"]
    assert drift["psi_normal"] < 0.1, drift["psi_normal_by_distribution"]
    assert drift["psi_shifted"] > 0.25 and drift["psi_shifted_by_distribution"]["history_genres"] > 0.25
    assert drift["alert"] is True
    assert all(t["met"] for t in drift["targets"])

    soak = report["soak"]
    assert soak["minutes"] == 0.2 and soak["requests"] > 0 and soak["errors"] == 0, soak["errors_by_status"]
    assert isinstance(soak["fds_delta"], int) and isinstance(soak["threads_delta"], int)
    assert soak["rss_growth_pct"] is not None and soak["baseline"]["t_s"] >= soak["warmup_s"] > 0
    met = {t["target"]: t["met"] for t in soak["targets"]}
    assert met["rss_growth_pct after warm-up"] == (soak["rss_growth_pct"] <= 5.0)
    assert met["fds_delta"] == (soak["fds_delta"] <= 0) and met["threads_delta"] == (soak["threads_delta"] <= 0)
    failed = [t for p in PHASES for t in report[p].get("targets", []) if t["met"] is False]
    assert proc.returncode == (1 if failed else 0), proc.stdout[-2000:]
