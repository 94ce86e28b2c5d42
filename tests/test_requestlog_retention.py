"""Request-log retention: rows pruned by age and by count, on demand and by the writer itself."""

from __future__ import annotations

import sqlite3
import time

import pytest

from orchestrator.requestlog import LogRow, RequestLog
from orchestrator.settings import ServeSettings


def row(n: int, ts: float, user: int = 1) -> LogRow:
    return LogRow(f"r{n:04d}", ts, user, "Recommend", [1, 2], [0.5, 0.4], 3.0, "1")


def stored(path) -> list[str]:
    with sqlite3.connect(path) as conn:
        return [r[0] for r in conn.execute("SELECT request_id FROM requests ORDER BY rowid")]


def test_prune_by_age_keeps_only_recent_rows(tmp_path):
    now = [1_000_000.0]
    log = RequestLog(tmp_path / "r.sqlite", max_age_s=3600, prune_interval_s=3600, clock=lambda: now[0])
    try:
        for n, age in enumerate((7200, 3601, 3599, 10)):
            log.log(row(n, now[0] - age))
        assert log.prune() == 2
        assert stored(tmp_path / "r.sqlite") == ["r0002", "r0003"]
        now[0] += 3000  # r0002 is now 6599 s old, r0003 3010 s
        assert log.prune() == 1 and stored(tmp_path / "r.sqlite") == ["r0003"]
    finally:
        log.close()


def test_prune_by_count_keeps_the_newest(tmp_path):
    log = RequestLog(tmp_path / "r.sqlite", max_rows=5, prune_interval_s=3600)
    try:
        for n in range(12):
            log.log(row(n, time.time()))
        assert log.prune() == 7
        assert stored(tmp_path / "r.sqlite") == [f"r{n:04d}" for n in range(7, 12)]
        assert log.prune() == 0
    finally:
        log.close()


def test_the_writer_prunes_on_its_own_and_an_idle_log_too(tmp_path):
    log = RequestLog(tmp_path / "r.sqlite", max_rows=3, max_age_s=60, prune_interval_s=0.05)
    try:
        for n in range(10):
            log.log(row(n, time.time()))
        log.log(row(99, time.time() - 120))  # already past its age
        log.flush()
        deadline = time.monotonic() + 10
        while len(stored(tmp_path / "r.sqlite")) > 3 and time.monotonic() < deadline:
            time.sleep(0.05)  # idle: nothing is queued, the writer still wakes up to prune
        kept = stored(tmp_path / "r.sqlite")
        assert "r0099" not in kept and kept == ["r0007", "r0008", "r0009"]
        assert log.pruned == 8
    finally:
        log.close()


def test_no_limits_keep_everything(tmp_path):
    log = RequestLog(tmp_path / "r.sqlite", prune_interval_s=0.01)
    try:
        for n in range(20):
            log.log(row(n, 0.0))
        log.flush()
        time.sleep(0.1)
        assert log.prune() == 0 and len(stored(tmp_path / "r.sqlite")) == 20
    finally:
        log.close()


def test_retention_settings_are_validated_and_documented_defaults_hold():
    s = ServeSettings()
    assert s.request_log_max_age_s == 30 * 86_400 and s.request_log_max_rows == 5_000_000
    assert ServeSettings.from_env({"RECSYS_REQUEST_LOG_MAX_ROWS": "0"}).request_log_max_rows == 0
    with pytest.raises(ValueError, match="request_log_max_age_s and request_log_max_rows must be >= 0"):
        ServeSettings(request_log_max_rows=-1)
    with pytest.raises(ValueError, match="max_rows must be >= 1"):
        RequestLog(":memory:", max_rows=0)
