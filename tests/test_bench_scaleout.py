"""``recsys bench scaleout`` on the tiny model with short phases: 2 real orchestrators, 2 real
embedded Tritons, a real redis-server and a real HAProxy (Debian's), real SIGKILLs.

Skipped, saying why, where redis-server or haproxy is not installed (``make scaleout-deps``
installs both when run as root). No timing is asserted (the machines are shared); what is
checked does not depend on speed: the report's keys, every call answered through the
replica deaths (the client's retry service config), every acknowledged write in Redis and
each replica seeing the other's writes.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from benchmarks.scaleout import PHASES, REPORT_KEYS

ROOT = Path(__file__).resolve().parents[1]


def _missing() -> list[str]:
    return [b for b in ("redis-server", "haproxy") if not (shutil.which(b) or Path(f"/usr/sbin/{b}").is_file())]


@pytest.mark.skipif(bool(_missing()), reason=f"not installed: {', '.join(_missing())} (make scaleout-deps, as root)")
def test_bench_scaleout_quick_on_the_tiny_model(tiny_artifacts, tiny_repository, tmp_path):
    pytest.importorskip("redis")
    out = tmp_path / "scaleout.json"
    cmd = [
        sys.executable,
        "-m",
        "clients.cli",
        "bench",
        "scaleout",
        "--artifacts",
        str(tiny_artifacts),
        "--repo",
        str(tiny_repository),
        "--phase-s",
        "3",
        "--down-s",
        "1",
        "--out",
        str(out),
    ]
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=900, check=False)
    assert out.is_file(), proc.stderr[-3000:]
    report = json.loads(out.read_text())

    assert tuple(report) == REPORT_KEYS
    assert report["orchestrators"] == report["tritons"] == 2
    assert report["balancer"]["name"] == "haproxy" and report["balancer"]["version"]
    assert report["requests"] > 0
    assert report["failed"] == 0, proc.stderr[-3000:]
    assert [(k["process"], k["signal"]) for k in report["killed"]] == [("orchestrator", "SIGKILL"), ("triton", "SIGKILL")]
    assert report["history_consistent"] is True, proc.stderr[-3000:]
    assert set(report["qps"]) == set(PHASES) and all(q > 0 for q in report["qps"].values())
    assert proc.returncode == 0
