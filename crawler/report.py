"""Run reports: `reports/<run_id>/summary.json` and `summary.md` (CONTRACT.md §4)."""

from __future__ import annotations

import csv
import json
from pathlib import Path
from typing import Any

def hms(seconds: float | None) -> str:
    """A duration as h:mm:ss ("-:--:--" when unknown)."""
    if seconds is None:
        return "-:--:--"
    s = int(round(seconds))
    return f"{s // 3600}:{s % 3600 // 60:02}:{s % 60:02}"


def counts_line(command: str | None, s: dict[str, Any]) -> str:
    """A run's outcome in a few words, for one-line listings (`report --list`, `status`)."""
    if command == "figures":
        return " ".join(f"{k}={s.get(k, 0)}" for k in ("attempted", "fetched", "hard_404", "transient", "failed"))
    if command == "recover":
        return "; ".join(f"{t}: {c.get('bound', 0)}/{c.get('rows', 0)} bound" for t, c in sorted(s.get("per_type", {}).items()))
    if command in ("apply", "undo"):
        return f"changed={s.get('changed', 0)} already={s.get('already', 0)} refused={s.get('refused', 0)}"
    return ""


def run_dir(report_root: Path, run_id: str) -> Path:
    return report_root / run_id


def worker_dir(run_folder: Path, index: int) -> Path:
    """Where process `index` of a `--workers` run writes its report, inside the run's folder."""
    return run_folder / f"worker-{index}"


def write_summary(folder: Path, summary: dict[str, Any]) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    tmp = folder / "summary.json.tmp"
    tmp.write_text(json.dumps(summary, indent=2, sort_keys=False, default=str) + "\n")
    tmp.replace(folder / "summary.json")
    (folder / "summary.md").write_text(render_markdown(summary, _residual(folder)))
    write_html(folder, summary)


def write_html(folder: Path, summary: dict[str, Any]) -> Path:
    """report.html beside summary.json: self-contained (crawler/html_report.py)."""
    from . import html_report
    path = folder / "report.html"
    path.write_text(html_report.render(summary, folder))
    return path


RESIDUAL_LISTED = 500  # residual rows written into summary.md (all are in residual.csv)


def _residual(folder: Path) -> list[dict[str, str]]:
    path = folder / "residual.csv"
    if not path.is_file():
        return []
    with open(path, newline="") as fh:
        return list(csv.DictReader(fh))


def _c(value: Any) -> str:
    """A table cell or inline value from outside (a host, a URL, an error): no markup, no line
    break, no `|` that would end the cell, no control character."""
    text = "".join(ch if ch.isprintable() else " " for ch in str(value))
    return text.replace("\\", "\\\\").replace("|", "\\|").replace("<", "&lt;").replace(">", "&gt;")


def _n(value: Any) -> str:
    return f"{value:,}" if isinstance(value, int) else str(value)


def _when(s: dict[str, Any]) -> str:
    start, end = str(s.get("started_at") or ""), str(s.get("finished_at") or "")
    same_day = start[:10] == end[:10]
    span = f"{start[:10]} {start[11:16]}–{end[11:16] if same_day else end[:16].replace('T', ' ')} UTC"
    minutes = float(s.get("duration_s") or 0) / 60
    return f"{span} ({minutes:.0f} min)" if minutes >= 1 else f"{span} ({float(s.get('duration_s') or 0):.0f} s)"


def render_markdown(s: dict[str, Any], residual: list[dict[str, str]] | None = None) -> str:
    """summary.md: a Work Log entry, ready to paste into the spec's Work Log: what was attempted,
    fetched or bound, marked, left and why, per host or type, and the residual list."""
    command = s.get("command", "run")
    lines = [f"### Work Log: {command} run {s.get('run_id')}, {_when(s)}: {s.get('status')}", ""]
    if command == "figures":
        lines += _figures(s)
    elif command == "recover":
        lines += _recover(s, residual or [])
    elif command in ("apply", "undo"):
        lines += _repair(s)
    if s.get("unrecorded"):
        lines += ["", "#### Not recorded (exit 3): run again once the cause is fixed", "",
                  "| what | rows or files | why | artifact ids (first 20) |", "|---|---:|---|---|"]
        for u in s["unrecorded"]:
            where = f" ({u['source']})" if u.get("source") else ""
            lines.append(f"| {_c(u['what'] + where)} | {u['count']} | {_c(u['why'])} | {_c(', '.join(u['artifact_ids']))} |")
    if s.get("fatal"):
        lines += ["", f"**Stopped:** {s['fatal']}"]
    if s.get("error"):
        lines += ["", f"**Failed:** {s['error']}"]
    return "\n".join(lines) + "\n"


def _figures(s: dict[str, Any]) -> list[str]:
    transient_why = ", ".join(f"{k} {v}" for k, v in sorted((s.get("transient_errors") or {}).items(),
                                                            key=lambda kv: -kv[1]))
    failed_why = ", ".join(f"{k} {v}" for k, v in sorted((s.get("failed_errors") or {}).items(), key=lambda kv: -kv[1]))
    changeset = f" (as a changeset, {s['changeset']}: the database was only read)" if s.get("changeset") else ""
    out = [f"Attempted **{_n(s.get('attempted', 0))}** paper_figure rows without their file "
           f"(of {_n(s.get('planned', 0))} due){changeset}:",
           f"- **fetched and committed {_n(s.get('fetched', 0))}** in {_n(s.get('commits', 0))} commits"
           + (f" ({_n(s['adopted_from_disk'])} found already in place after an earlier stop)" if s.get("adopted_from_disk") else ""),
           f"- **marked unavailable {_n(s.get('hard_404', 0))}** (HTTP 404, 410 or 451: never tried again)",
           f"- **left retryable {_n(s.get('transient', 0))}**" + (f" ({transient_why})" if transient_why and s.get("transient") else "")
           + " — due again after `http.transient_retry_after_s`, or the server's Retry-After",
           f"- **failed {_n(s.get('failed', 0))}**" + (f" ({failed_why})" if failed_why and s.get("failed") else "")
           + " — listed below for a human; `--retry-failed` takes them again"]
    skipped = [(s.get("present", 0), "already had their file"), (s.get("no_url", 0), "have no image URL"),
               (s.get("bad_metadata", 0), "have metadata that is not a JSON object (left untouched)"),
               (s.get("deferred", 0), "were deferred: their budget was paused past `http.max_wait_s`"),
               (s.get("in_changeset", 0), "were in the changeset already"),
               (s.get("local_error", 0), "failed on this machine and were left as they were")]
    said = [f"{_n(n)} {why}" for n, why in skipped if n]
    if said:
        out += ["", "Not attempted or not settled: " + "; ".join(said) + "."]
    if s.get("head_404_untrusted"):
        out += ["", f"Hosts whose HEAD said 404 for files GET then served (their HEADs were not trusted): "
                    f"{', '.join(s['head_404_untrusted'])}."]
    out += ["", "| host | attempted | fetched | unavailable | transient | failed |", "|---|---:|---:|---:|---:|---:|"]
    for host, c in sorted((s.get("per_host") or {}).items()):
        out.append(f"| {_c(host)} | {_n(c.get('attempted', 0))} | {_n(c.get('fetched', 0))} | {_n(c.get('hard_404', 0))} | "
                   f"{_n(c.get('transient', 0))} | {_n(c.get('failed', 0))} |")
    if s.get("requests_per_budget"):
        out += ["", "Requests per budget: " + ", ".join(f"{_c(k)} {_n(v)}" for k, v in sorted(s["requests_per_budget"].items())) + "."]
    if s.get("failed_rows"):
        out += ["", "#### Failed rows, for a human (first 100)", "", "| artifact_id | error | url |", "|---|---|---|"]
        out += [f"| {_c(r['artifact_id'])} | {_c(r['error'])} | {_c(r['url'])} |" for r in s["failed_rows"][:100]]
    return out


def _recover(s: dict[str, Any], residual: list[dict[str, str]]) -> list[str]:
    per_type = s.get("per_type") or {}
    rows = sum(c.get("rows", 0) for c in per_type.values())
    bound = sum(c.get("bound", 0) for c in per_type.values())
    conf = s.get("confidence") or {}
    searched = s.get("searched") or {}
    where = ["the checkout"] + (["its git history"] if searched.get("history") else []) + \
        [f"{searched.get('worktrees', 0)} worktrees", f"{searched.get('tarballs', 0)} backup tarballs"]
    plan = " (plan only: nothing was written)" if s.get("plan") else ""
    changeset = f" (as a changeset, {s['changeset']}: the database was only read)" if s.get("changeset") else ""
    out = [f"Looked at **{_n(rows)}** dataset, model and tabular_dataset rows{plan}{changeset}; searched "
           + ", ".join(where) + ".",
           f"- **bound {_n(bound)}**" + (" (" + ", ".join(f"{k} {v}" for k, v in sorted(conf.items())) + ")" if conf else ""),
           f"- **needs review {_n(sum(c.get('needs_review', 0) for c in per_type.values()))}** (candidates found, none bindable on evidence: see the inventory)",
           f"- **unrecoverable {_n(sum(c.get('unrecoverable', 0) for c in per_type.values()))}**",
           f"- **missing {_n(sum(c.get('missing', 0) for c in per_type.values()))}** (no candidate anywhere)"]
    if searched.get("unread"):
        out += ["", "Not read: " + "; ".join(f"{u['source']} ({u['error']})" for u in searched["unread"]) + "."]
    out += ["", "| type | rows | bound | needs_review | unrecoverable | missing |", "|---|---:|---:|---:|---:|---:|"]
    for t, c in sorted(per_type.items()):
        out.append(f"| {t} | {c['rows']} | {c['bound']} | {c['needs_review']} | {c['unrecoverable']} | {c['missing']} |")
    if residual:
        out += ["", f"#### Residual list: {len(residual)} rows left without a file", "",
                "| artifact_id | type | why |", "|---|---|---|"]
        out += [f"| {_c(r['artifact_id'])} | {_c(r['artifact_type'])} | {_c(r['failure_mode'])} |" for r in residual[:RESIDUAL_LISTED]]
        if len(residual) > RESIDUAL_LISTED:
            out.append(f"| … | | {len(residual) - RESIDUAL_LISTED} more in residual.csv |")
    return out


def _repair(s: dict[str, Any]) -> list[str]:
    what = f"the changeset {s.get('changeset')}" if s.get("command") == "apply" else f"run {s.get('undone_run')}"
    dry = " (dry run: nothing was written)" if s.get("dry_run") else ""
    out = [f"{'Applied' if s.get('command') == 'apply' else 'Undid'} {what}{dry}: changed {_n(s.get('changed', 0))} rows, "
           f"{_n(s.get('already', 0))} already as wanted, {_n(s.get('refused', 0))} refused."]
    if s.get("refused_rows"):
        out += ["", "| artifact_id | why | differs |", "|---|---|---|"]
        out += [f"| {_c(r['artifact_id'])} | {_c(r['why'])} | {_c(' '.join(r['differs']))} |" for r in s["refused_rows"][:100]]
    return out


def latest_run_dir(report_root: Path, run_id: str | None = None) -> Path | None:
    """The folder of `run_id`, or of the newest run with a summary (run ids sort by start time)."""
    if run_id:
        folder = report_root / run_id
        return folder if (folder / "summary.json").is_file() else None
    if not report_root.is_dir():
        return None
    runs = sorted(p for p in report_root.iterdir() if (p / "summary.json").is_file())
    return runs[-1] if runs else None
