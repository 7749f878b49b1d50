"""A Prometheus textfile (`report.metrics_file`), rewritten at each progress tick and at the end
of a run, for node_exporter's textfile collector: where a run stands, without reading logs.

Written whole to a temporary file and renamed over the old one, so the collector never reads
half a file. Names follow Prometheus' conventions (`_total` counters, `_seconds` units).
"""

from __future__ import annotations

import os
import time
from pathlib import Path
from typing import Any


def _label(value: Any) -> str:
    return str(value).replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n")


def render(run_id: str, command: str, progress: dict[str, Any], status: str | None = None) -> str:
    labels = f'run_id="{_label(run_id)}",command="{_label(command)}"'
    lines = ["# HELP crawler_run_info The run this file describes (1).", "# TYPE crawler_run_info gauge",
             f"crawler_run_info{{{labels}}} 1",
             "# HELP crawler_last_update_timestamp_seconds When this file was written.",
             "# TYPE crawler_last_update_timestamp_seconds gauge",
             f"crawler_last_update_timestamp_seconds{{{labels}}} {time.time():.3f}"]
    if status is not None:
        lines += ["# HELP crawler_run_finished The run ended, with this status (1).",
                  "# TYPE crawler_run_finished gauge", f'crawler_run_finished{{{labels},status="{_label(status)}"}} 1']

    def gauge(name: str, help_: str, value: Any, extra: str = "") -> None:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            lines.extend([f"# HELP {name} {help_}", f"# TYPE {name} gauge", f"{name}{{{labels}{extra}}} {value}"])

    gauge("crawler_rows_done", "Rows with an outcome so far.", progress.get("done", progress.get("decided")))
    gauge("crawler_rows_planned", "Rows the run set out to do.", progress.get("planned", progress.get("rows")))
    gauge("crawler_rows_per_second", "Rows with an outcome per second, since the start.", progress.get("rows_per_s"))
    gauge("crawler_eta_seconds", "Seconds left at the current rate.", progress.get("eta_s"))
    gauge("crawler_commits_total", "Commits made.", progress.get("commits"))
    counts = progress.get("counts") or {}
    if counts:
        lines += ["# HELP crawler_outcomes_total Rows by outcome.", "# TYPE crawler_outcomes_total counter"]
        lines += [f'crawler_outcomes_total{{{labels},outcome="{_label(k)}"}} {v}' for k, v in sorted(counts.items())]
    budgets = progress.get("budgets") or {}
    if budgets:
        lines += ["# HELP crawler_budget_inflight Requests open under a budget.", "# TYPE crawler_budget_inflight gauge"]
        lines += [f'crawler_budget_inflight{{{labels},budget="{_label(n)}"}} {b.get("inflight", 0)}'
                  for n, b in sorted(budgets.items())]
        lines += ["# HELP crawler_budget_paused_seconds Seconds a budget stays paused (Retry-After, back-off).",
                  "# TYPE crawler_budget_paused_seconds gauge"]
        lines += [f'crawler_budget_paused_seconds{{{labels},budget="{_label(n)}"}} {b.get("paused_s", 0)}'
                  for n, b in sorted(budgets.items())]
        lines += ["# HELP crawler_budget_requests_total Requests started under a budget.",
                  "# TYPE crawler_budget_requests_total counter"]
        lines += [f'crawler_budget_requests_total{{{labels},budget="{_label(n)}"}} {b.get("requests", 0)}'
                  for n, b in sorted(budgets.items())]
    return "\n".join(lines) + "\n"


def write(path: Path, text: str) -> None:
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    tmp.write_text(text)
    os.replace(tmp, path)
