"""`crawler status`: where things stand, read from the database only (CONTRACT.md §2).

- runs going now, with the counts of their last heartbeat, and recent runs with their state; a
  running run whose heartbeat is older than 3 × `run.heartbeat_s` is `lost` (killed, or its
  machine gone);
- per budget of a running figure run, what is in flight, and paused until when;
- rows per artifact type by state, as their columns say, in one pass over the table.

Recovery rows without a file are split into `needs_review` and `missing` by the latest recover
run's own decision (the table records a bind or an unrecoverable mark, not a candidate), so the
split is as of that run.
"""

from __future__ import annotations

import json
from datetime import UTC, datetime
from typing import Any

from .config import Config
from .db import Database
from .report import counts_line, hms
from .sink import iso

RECENT = 10
FIGURE_STATES = ("missing", "fetched", "unavailable", "transient_due", "transient_later", "failed")
RECOVERY_STATES = ("bound", "needs_review", "unrecoverable", "missing")
RECOVERY_TYPES = ("dataset", "model", "tabular_dataset")


async def gather(cfg: Config, db: Database) -> dict[str, Any]:
    lost_after = 3 * float(cfg["run"]["heartbeat_s"])
    state = await db.has_state()
    runs = await db.recent_runs(RECENT, float(cfg["run"]["heartbeat_s"])) if state else []
    now = datetime.now(UTC)
    rows: dict[str, dict[str, int]] = {}
    latest_recover = await db.latest_recover_summary() if state else None
    for r in await db.row_states(iso(now)):
        t, n = r["type"], r["rows"]
        if t == "paper_figure":
            counts = {"fetched": r["with_file"], "unavailable": r["unavailable"], "transient_due": r["transient_due"],
                      "transient_later": r["transient_later"], "failed": r["failed"]}
            counts = {"missing": n - sum(counts.values()), **counts}
        else:
            bound = r["with_file"]
            unrecoverable = r["unrecoverable"]
            without = max(n - bound - unrecoverable, 0)
            review = 0
            if latest_recover is not None:
                review = min(without, latest_recover.get("per_type", {}).get(t, {}).get("needs_review", 0))
            counts = {"bound": bound, "needs_review": review, "unrecoverable": unrecoverable, "missing": without - review}
        rows[t] = {"rows": n, **counts}
    out_runs = []
    for r in runs:
        entry: dict[str, Any] = {
            "run_id": r["run_id"], "command": r["command"], "status": r["status"],
            "started_at": _iso(r["started_at"]), "finished_at": _iso(r["finished_at"]),
            "heartbeat_at": _iso(r["heartbeat_at"]), "host": r["host"], "pid": r["pid"],
        }
        if r["status"] in ("running", "lost") and r["progress"]:
            entry["progress"] = r["progress"]
        if r["summary"]:
            entry["summary"] = {k: v for k, v in r["summary"].items()
                                if k in ("attempted", "fetched", "hard_404", "transient", "failed", "per_type",
                                         "changed", "already", "refused")}
        out_runs.append(entry)
    return {"at": iso(now), "runs": out_runs, "rows": rows, "lost_after_s": lost_after}


def _iso(dt: datetime | None) -> str | None:
    return iso(dt) if dt is not None else None


def render(state: dict[str, Any]) -> str:
    lines = [f"crawler status at {state['at']}", ""]
    going = [r for r in state["runs"] if r["status"] == "running"]
    lines.append("runs going now:" if going else "no run going now")
    for r in going:
        lines.append(f"  {r['run_id']} ({r['command']}, {r['host']} pid {r['pid']}, heartbeat {r['heartbeat_at']})")
        lines += ["    " + x for x in _progress_lines(r.get("progress") or {})]
    lines += ["", "recent runs:"]
    for r in state["runs"]:
        tail = ""
        if r["status"] == "lost":
            tail = f"  (no heartbeat since {r['heartbeat_at'] or r['started_at']})"
        elif r.get("summary"):
            tail = "  " + counts_line(r["command"], r["summary"])
        lines.append(f"  {r['run_id']:<40} {r['status']:<21}{tail}")
    if not state["runs"]:
        lines.append("  (none recorded)")
    lines += ["", "rows:"]
    for t, c in state["rows"].items():
        states = FIGURE_STATES if t == "paper_figure" else RECOVERY_STATES if t in RECOVERY_TYPES else ()
        words = ", ".join(f"{c.get(s, 0)} {s.replace('_', ' ')}" for s in states)
        lines.append(f"  {t:<16} {c['rows']:>9} rows" + (f": {words}" if words else ""))
    return "\n".join(lines) + "\n"


def _progress_lines(p: dict[str, Any]) -> list[str]:
    if "workers" in p:  # a --workers run: its processes, then their counts summed
        head = [f"{p.get('workers_alive', 0)} of {p['workers']} worker processes alive"]
        return head + (_progress_lines({k: v for k, v in p.items() if k not in ("workers", "workers_alive")})
                       if "done" in p else [])
    if "done" in p:  # figures
        eta = p.get("eta_s")
        out = [f"{p['done']:,} / {p.get('planned', 0):,} rows, {p.get('rows_per_s', 0)} rows/s, "
               f"ETA {hms(eta) if eta is not None else '-'}, {p.get('commits', 0)} commits; "
               + ", ".join(f"{k} {v}" for k, v in (p.get("counts") or {}).items())]
        for name, b in sorted((p.get("budgets") or {}).items()):
            paused = f", paused until {b['paused_until']}" if b.get("paused_until") else ""
            if "hosts" in b:
                name = f"default ({b['hosts']} hosts)"
                paused = f", {b['hosts_paused']} hosts paused" if b.get("hosts_paused") else ""
            name = "".join(c if c.isprintable() else "?" for c in name)  # a host name is not trusted
            out.append(f"budget {name}: {b.get('inflight', 0)} in flight, {b.get('queue', 0)} queued{paused}")
        return out
    if "phase" in p:  # recover
        out = [f"phase: {p['phase']}; rows decided {p.get('decided', 0)} / {p.get('rows', 0)}"]
        reading = p.get("reading")
        if reading:
            out.append(f"reading {reading['tarball']}: {reading['tarball_bytes_read']:,} / "
                       f"{reading['tarball_size']:,} bytes")
        return out
    return [json.dumps(p)]
