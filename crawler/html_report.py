"""`report.html`: one self-contained page per run (nothing loaded from outside the file).

Figures: outcomes per host; for each budget, request starts per second over the run against its
cap (politeness you can see), with its pauses (Retry-After, back-off) shaded; failed rows.
Recover: rows per type, the inventory and the residual list with their reasons. Both: what
could not be recorded. Built from summary.json and the CSVs beside it.
"""

from __future__ import annotations

import csv
import html
from pathlib import Path
from typing import Any

CHART_W, CHART_H = 760, 120
MAX_TABLE_ROWS = 2000

STYLE = """
body{font:14px/1.45 system-ui,-apple-system,Segoe UI,Roboto,sans-serif;margin:24px auto;max-width:1100px;color:#1d232a;padding:0 16px}
h1{font-size:22px;margin:0 0 4px}h2{font-size:17px;margin:28px 0 8px;border-bottom:1px solid #dde3ea;padding-bottom:4px}
h3{font-size:14px;margin:16px 0 4px}.meta{color:#5b6773}
.status{display:inline-block;padding:1px 8px;border-radius:10px;font-weight:600;font-size:12px}
.ok{background:#dff5e3;color:#17602a}.warn{background:#fff1cf;color:#7a5200}.bad{background:#fde2e1;color:#8a1c16}
.cards{display:flex;flex-wrap:wrap;gap:10px;margin:12px 0}.card{border:1px solid #dde3ea;border-radius:8px;padding:8px 14px;min-width:110px}
.card b{display:block;font-size:20px}.card span{color:#5b6773;font-size:12px}
table{border-collapse:collapse;width:100%;margin:6px 0 10px;font-size:13px}th,td{border-bottom:1px solid #eef1f4;padding:4px 8px;text-align:left;vertical-align:top}
th{background:#f6f8fa;font-weight:600}td.n,th.n{text-align:right;font-variant-numeric:tabular-nums}
.chart{margin:4px 0 14px}.chart svg{background:#fbfcfd;border:1px solid #eef1f4;border-radius:6px}
.legend{color:#5b6773;font-size:12px}.wrap{max-height:420px;overflow:auto;border:1px solid #eef1f4;border-radius:6px}
"""


def _e(value: Any) -> str:
    return html.escape(str(value), quote=True)


def _n(value: Any) -> str:
    return f"{value:,}" if isinstance(value, int) else _e(value)


def _table(headers: list[str], rows: list[list[Any]], numeric: set[int] = frozenset(), cls: str = "") -> str:
    head = "".join(f'<th class="n">{_e(h)}</th>' if i in numeric else f"<th>{_e(h)}</th>" for i, h in enumerate(headers))
    body = []
    for r in rows[:MAX_TABLE_ROWS]:
        body.append("<tr>" + "".join(f'<td class="n">{_n(v)}</td>' if i in numeric else f"<td>{_e(v)}</td>"
                                     for i, v in enumerate(r)) + "</tr>")
    more = f'<p class="legend">… and {len(rows) - MAX_TABLE_ROWS:,} more rows (see the CSV files)</p>' \
        if len(rows) > MAX_TABLE_ROWS else ""
    table = f'<table class="{cls}"><thead><tr>{head}</tr></thead><tbody>{"".join(body)}</tbody></table>'
    return (f'<div class="wrap">{table}</div>' if len(rows) > 25 else table) + more


def _cards(items: list[tuple[str, Any]]) -> str:
    return '<div class="cards">' + "".join(f'<div class="card"><b>{_n(v)}</b><span>{_e(k)}</span></div>'
                                           for k, v in items) + "</div>"


def _chart(name: str, b: dict[str, Any], pauses: list[dict[str, Any]], duration_s: float) -> str:
    """Starts per second as bars, the cap as a dashed line, pauses shaded."""
    starts = [(int(s), int(n)) for s, n in b.get("starts", [])]
    cap = float(b.get("cap_per_s") or 0)
    span = max(duration_s, (starts[-1][0] + 1) if starts else 1, 1)
    top = max([cap * 1.25, 1.0] + [n * 1.1 for _, n in starts])
    x = lambda s: 40 + (CHART_W - 50) * s / span  # noqa: E731
    y = lambda v: 10 + (CHART_H - 30) * (1 - v / top)  # noqa: E731
    width = max((CHART_W - 50) / span, 0.8)
    parts = [f'<svg width="{CHART_W}" height="{CHART_H}" role="img" aria-label="{_e(name)} request starts per second">']
    for p in pauses:
        x0, x1 = x(float(p["at_s"])), x(min(float(p["at_s"]) + float(p["seconds"]), span))
        parts.append(f'<rect class="pause" x="{x0:.1f}" y="10" width="{max(x1 - x0, 1):.1f}" height="{CHART_H - 30}" '
                     f'fill="#fde2e1"><title>paused {float(p["seconds"]):.1f} s at {float(p["at_s"]):.0f} s: '
                     f'{_e(p["reason"])}</title></rect>')
    bars = " ".join(f"M{x(s):.1f},{y(0):.1f}V{y(n):.1f}" for s, n in starts)
    parts.append(f'<path class="starts" d="{bars}" stroke="#2f6fb2" stroke-width="{width:.2f}" fill="none"/>')
    if cap:
        parts.append(f'<line class="cap" x1="40" x2="{CHART_W - 10}" y1="{y(cap):.1f}" y2="{y(cap):.1f}" '
                     f'stroke="#c0392b" stroke-dasharray="5,4"><title>cap {cap:g}/s</title></line>')
        parts.append(f'<text x="{CHART_W - 12}" y="{y(cap) - 3:.1f}" text-anchor="end" font-size="11" fill="#c0392b">'
                     f'cap {cap:g}/s</text>')
    parts.append(f'<text x="4" y="{y(0):.1f}" font-size="11" fill="#5b6773">0</text>'
                 f'<text x="4" y="{y(top * 0.9):.1f}" font-size="11" fill="#5b6773">{top * 0.9:.1f}</text>'
                 f'<text x="40" y="{CHART_H - 4}" font-size="11" fill="#5b6773">0 s</text>'
                 f'<text x="{CHART_W - 10}" y="{CHART_H - 4}" text-anchor="end" font-size="11" fill="#5b6773">{span:.0f} s</text>')
    parts.append("</svg>")
    peak = max((n for _, n in starts), default=0)
    total = sum(n for _, n in starts) if name != "default" else None
    said = (f"at most {peak} starts in a second (cap {cap:g}/s, {int(b.get('max_inflight') or 0)} in flight)"
            + (f", {total:,} second-counted starts" if total is not None else ", the busiest unnamed host each second")
            + (f"; {len(pauses)} pauses" if pauses else ""))
    return (f'<div class="chart" data-budget="{_e(name)}"><h3>{_e(name)}</h3>' + "".join(parts)
            + f'<div class="legend">{_e(said)}</div></div>')


def render(s: dict[str, Any], folder: Path) -> str:
    status = str(s.get("status"))
    cls = {"finished": "ok", "finished_with_errors": "warn", "interrupted": "warn"}.get(status, "bad")
    out = [f'<!doctype html><html lang="en"><head><meta charset="utf-8"><title>crawler {_e(s.get("command"))} '
           f'{_e(s.get("run_id"))}</title><style>{STYLE}</style></head><body>',
           f'<h1>crawler {_e(s.get("command"))} <span class="status {cls}">{_e(status)}</span></h1>',
           f'<p class="meta">run {_e(s.get("run_id"))} · {_e(s.get("started_at"))} → {_e(s.get("finished_at"))} · '
           f'{float(s.get("duration_s") or 0):,.0f} s</p>']
    if s.get("command") == "figures":
        out += _figures(s)
    elif s.get("command") == "recover":
        out += _recover(s, folder)
    elif s.get("command") in ("apply", "undo"):
        out.append(_cards([("changed", s.get("changed", 0)), ("already", s.get("already", 0)),
                           ("refused", s.get("refused", 0))]))
        if s.get("refused_rows"):
            out += ["<h2>Refused rows</h2>", _table(["artifact_id", "why", "differs"],
                                                    [[r["artifact_id"], r["why"], " ".join(r["differs"])]
                                                     for r in s["refused_rows"]])]
    if s.get("unrecorded"):
        out += ["<h2>Not recorded (exit 3)</h2>",
                _table(["what", "rows or files", "why", "artifact ids (first 20)"],
                       [[u["what"] + (f" ({u['source']})" if u.get("source") else ""), u["count"], u["why"],
                         ", ".join(u["artifact_ids"])] for u in s["unrecorded"]], numeric={1})]
    if s.get("fatal"):
        out.append(f'<p class="status bad">stopped: {_e(s["fatal"])}</p>')
    out.append("</body></html>")
    return "\n".join(out) + "\n"


def _figures(s: dict[str, Any]) -> list[str]:
    out = [_cards([("attempted", s.get("attempted", 0)), ("fetched", s.get("fetched", 0)),
                   ("unavailable (404/410/451)", s.get("hard_404", 0)), ("transient", s.get("transient", 0)),
                   ("failed", s.get("failed", 0)), ("no URL", s.get("no_url", 0)),
                   ("already on disk", s.get("present", 0)), ("commits", s.get("commits", 0))])]
    hosts = sorted((s.get("per_host") or {}).items(), key=lambda kv: -kv[1].get("attempted", 0))
    out += ["<h2>Outcomes per host</h2>",
            _table(["host", "attempted", "fetched", "unavailable", "transient", "failed"],
                   [[h, c.get("attempted", 0), c.get("fetched", 0), c.get("hard_404", 0), c.get("transient", 0),
                     c.get("failed", 0)] for h, c in hosts], numeric={1, 2, 3, 4, 5}, cls="hosts")]
    timeline = s.get("timeline") or {}
    budgets = timeline.get("budgets") or {}
    if budgets:
        out.append("<h2>Politeness: request starts per second, against each budget's cap</h2>")
        out.append('<p class="legend">Bars: requests started in each second of the run (HEAD and GET). Dashed: the '
                   "budget's cap. Shaded: pauses (Retry-After, 429/503 back-off). Hosts no budget names each have a "
                   "budget of their own; they are drawn as one line, the busiest of them each second.</p>")
        pauses = timeline.get("pauses") or []
        for name, b in budgets.items():
            mine = [p for p in pauses if (p["budget"] == name or (name == "default" and p["budget"].startswith("default:")))]
            out.append(_chart(name, b, mine, float(s.get("duration_s") or 0)))
    errors = {**{f"transient: {k}": v for k, v in (s.get("transient_errors") or {}).items()},
              **{f"failed: {k}": v for k, v in (s.get("failed_errors") or {}).items()}}
    if errors:
        out += ["<h2>Transient and failed, by error</h2>",
                _table(["error", "rows"], [[k, v] for k, v in sorted(errors.items(), key=lambda kv: -kv[1])], numeric={1})]
    if s.get("failed_rows"):
        out += ["<h2>Failed rows, for a human</h2>",
                _table(["artifact_id", "error", "url"], [[r["artifact_id"], r["error"], r["url"]] for r in s["failed_rows"]],
                       cls="failed")]
    return out


def _csv(path: Path) -> list[dict[str, str]]:
    if not path.is_file():
        return []
    with open(path, newline="") as fh:
        return list(csv.DictReader(fh))


def _recover(s: dict[str, Any], folder: Path) -> list[str]:
    per_type = s.get("per_type") or {}
    total = {k: sum(c.get(k, 0) for c in per_type.values()) for k in ("rows", "bound", "needs_review", "unrecoverable", "missing")}
    out = [_cards([("rows", total["rows"]), ("bound", total["bound"]), ("needs review", total["needs_review"]),
                   ("unrecoverable", total["unrecoverable"]), ("missing", total["missing"])])]
    out += ["<h2>Rows per type</h2>",
            _table(["type", "rows", "bound", "needs_review", "unrecoverable", "missing"],
                   [[t, c["rows"], c["bound"], c["needs_review"], c["unrecoverable"], c["missing"]]
                    for t, c in sorted(per_type.items())], numeric={1, 2, 3, 4, 5}, cls="types")]
    residual = _csv(folder / "residual.csv")
    if residual:
        out += [f"<h2>Residual: {len(residual)} rows left without a file, and why</h2>",
                _table(["artifact_id", "type", "why"], [[r["artifact_id"], r["artifact_type"], r["failure_mode"]]
                                                        for r in residual], cls="residual")]
    for t in sorted(per_type):
        inv = _csv(folder / f"inventory_{t}.csv")
        if inv:
            out += [f"<h2>Inventory: {_e(t)}</h2>",
                    _table(["artifact_id", "status", "confidence", "expected", "file_path", "candidates", "reason"],
                           [[r["artifact_id"], r["status"], r["confidence"], r["expected_basenames"], r["file_path"],
                             r["candidates"].replace(";", "; "), r["reason"]] for r in inv], cls="inventory")]
    return out
