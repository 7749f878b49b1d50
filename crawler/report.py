"""Run reports: `reports/<run_id>/summary.json` and `summary.md` (CONTRACT.md §4)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

FIGURE_COUNTS = ("attempted", "fetched", "hard_404", "transient", "failed", "no_url")


def run_dir(report_root: Path, run_id: str) -> Path:
    return report_root / run_id


def write_summary(folder: Path, summary: dict[str, Any]) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    tmp = folder / "summary.json.tmp"
    tmp.write_text(json.dumps(summary, indent=2, sort_keys=False, default=str) + "\n")
    tmp.replace(folder / "summary.json")
    (folder / "summary.md").write_text(render_markdown(summary))


def render_markdown(s: dict[str, Any]) -> str:
    lines = [f"# {s.get('command', 'run')} run {s.get('run_id')}", "",
             f"- status: **{s.get('status')}**",
             f"- started: {s.get('started_at')}", f"- finished: {s.get('finished_at')}",
             f"- duration: {s.get('duration_s')} s", ""]
    if s.get("command") == "figures":
        lines += ["| count | rows |", "|---|---:|"]
        lines += [f"| {k} | {s.get(k, 0)} |" for k in (*FIGURE_COUNTS, "present", "bad_metadata")]
        lines += ["", "## Per host", "", "| host | " + " | ".join(FIGURE_COUNTS[:5]) + " |",
                  "|---|" + "---:|" * 5]
        for host, c in sorted(s.get("per_host", {}).items()):
            lines.append(f"| {host} | " + " | ".join(str(c.get(k, 0)) for k in FIGURE_COUNTS[:5]) + " |")
        if s.get("errors"):
            lines += ["", "## Transient and failed, by error", "", "| error | rows |", "|---|---:|"]
            lines += [f"| {k} | {v} |" for k, v in sorted(s["errors"].items())]
        if s.get("failed_rows"):
            lines += ["", "## Failed rows for a human (first 100)", "", "| artifact_id | error | url |", "|---|---|---|"]
            lines += [f"| {r['artifact_id']} | {r['error']} | {r['url']} |" for r in s["failed_rows"][:100]]
    if s.get("unrecorded"):
        lines += ["", "## Not recorded (exit 3): run again once the cause is fixed", "",
                  "| what | rows or files | why | artifact ids (first 20) |", "|---|---:|---|---|"]
        for u in s["unrecorded"]:
            where = f" ({u['source']})" if u.get("source") else ""
            lines.append(f"| {u['what']}{where} | {u['count']} | {u['why']} | {', '.join(u['artifact_ids'])} |")
        lines.append("")
    if s.get("per_type"):
        lines += ["| type | rows | bound | needs_review | unrecoverable | missing |", "|---|---:|---:|---:|---:|---:|"]
        for t, c in sorted(s["per_type"].items()):
            lines.append(f"| {t} | {c['rows']} | {c['bound']} | {c['needs_review']} | {c['unrecoverable']} | {c['missing']} |")
    return "\n".join(lines) + "\n"


def latest_run_dir(report_root: Path, run_id: str | None = None) -> Path | None:
    """The folder of `run_id`, or of the newest run with a summary (run ids sort by start time)."""
    if run_id:
        folder = report_root / run_id
        return folder if (folder / "summary.json").is_file() else None
    if not report_root.is_dir():
        return None
    runs = sorted(p for p in report_root.iterdir() if (p / "summary.json").is_file())
    return runs[-1] if runs else None
