"""The per-row log line's short path writes what structlog's path writes."""

from __future__ import annotations

import json
from pathlib import Path

import structlog

from crawler import logs


def test_row_line_is_structlogs_line(tmp_path: Path) -> None:
    logs.configure("run-1", tmp_path / "log.jsonl", console=False, secrets=("s3cret-token",))
    try:
        fields = {"artifact_id": "fig-1", "outcome": "failed", "host": "h.test", "status": None, "size": 10,
                  "error": "http_403", "url": "https://user:pw@h.test/a.png?key=s3cret-token", "ratio": 0.5,
                  "done": True, "extra": {"nested": "https://u:p@x.test/"}}
        structlog.get_logger().info("row.outcome", **fields)
        logs.row("row.outcome", **fields)
        structlog.get_logger().info("row.outcome", run_id="given", **fields)
        logs.row("row.outcome", run_id="given", **fields)
    finally:
        logs.close()
    slow, fast, slow_given, fast_given = (json.loads(line) for line in (tmp_path / "log.jsonl").read_text().splitlines())
    for a, b in ((slow, fast), (slow_given, fast_given)):
        assert list(b) == list(a)  # same keys, same order
        assert b.pop("timestamp").endswith("Z") and a.pop("timestamp").endswith("Z")
        assert b == a
    assert fast_given["run_id"] == "given"
    assert fast["run_id"] == "run-1" and fast["level"] == "info" and fast["event"] == "row.outcome"
    assert "pw@" not in fast["url"] and "s3cret-token" not in fast["url"]
    assert "u:p@" not in fast["extra"]["nested"]


def test_row_line_on_the_console_only_at_debug(capsys) -> None:
    logs.close()  # no run's file: the console alone
    logs.row("row.outcome", artifact_id="fig-2", outcome="fetched")
    assert "fig-2" not in capsys.readouterr().err  # a long run's console is not a line per row
    logs.set_console_level("debug")
    try:
        logs.row("row.outcome", artifact_id="fig-3", outcome="fetched")
    finally:
        logs.set_console_level("info")
    assert "row.outcome artifact_id=fig-3 outcome=fetched" in capsys.readouterr().err
