"""`crawler figures --workers N`: N cooperating processes on this machine, one run.

The parent records the run, starts N children (`python -m crawler figures --worker-of RUN
--worker-index k --expect-workers N`, the same options otherwise) and waits for them. Each child
is a full figure job: it takes budget leases (crawler/leases.py) and serves only what it holds,
so the children never request one row twice and every budget's caps hold across them. A child
writes its report to `<run folder>/worker-<k>/`; the parent merges their summaries into the run's.

Children run in sessions of their own: Ctrl-C at the terminal reaches the parent only, which
passes each stop on (a first signal: finish rows in flight; a second: cut them off; a third: the
children are killed and the parent exits at once). A child that dies (killed, out of memory)
leaves its leases to expire; the others take its budgets over and the run goes on.
"""

from __future__ import annotations

import asyncio
import json
import os
import signal
import sys
from collections import Counter
from pathlib import Path
from typing import Any

import structlog

from . import report
from .config import Config
from .db import Database

log = structlog.get_logger()

# Counts that add up across workers; the table-wide ones (computed alike by each) are the largest.
SUMMED = ("attempted", "fetched", "hard_404", "transient", "failed", "present", "adopted_from_disk",
          "deferred", "local_error", "commits", "commit_failed_files", "in_changeset")
TABLE_WIDE = ("no_url", "bad_metadata", "planned")


def worker_count(value: Any) -> int:
    """How many processes `value` (config.worker_count_ok) means on this machine."""
    if value == "auto":
        return os.cpu_count() or 1
    return int(value)


def child_argv(args: Any, run_id: str, index: int, count: int) -> list[str]:
    """The child's command line: the parent's figure options (a `--limit` shared out among the
    children), plus which run it joins and who it is."""
    out = [sys.executable, "-m", "crawler", "figures"]
    if args.config:
        out += ["--config", str(args.config)]
    if args.limit is not None:  # the parent starts at most --limit children: each gets one row or more
        out += ["--limit", str(args.limit // count + (index < args.limit % count))]
    if args.host:
        out += ["--host", args.host]
    if args.retry_failed:
        out.append("--retry-failed")
    if args.verbose:
        out.append("-v")
    if args.quiet:
        out.append("-q")
    if args.log_level:
        out += ["--log-level", args.log_level]
    return out + ["--worker-of", run_id, "--worker-index", str(index), "--expect-workers", str(count)]


class WorkersJob:
    """The parent's job: start the children, pass stops on, merge what they did."""

    def __init__(self, cfg: Config, db: Database, run_id: str, args: Any, count: int) -> None:
        self.cfg = cfg
        self.db = db
        self.run_id = run_id
        self.args = args
        # No more children than --limit rows: each takes at least one.
        self.count = min(count, args.limit) if getattr(args, "limit", None) else count
        self.folder = report.run_dir(Path(cfg["report"]["dir"]), run_id)
        self.procs: list[asyncio.subprocess.Process] = []
        self._signals = 0
        self._progress: dict[str, Any] = {}

    def _signal_children(self, sig: int) -> None:
        for p in self.procs:
            if p.returncode is None:
                try:
                    p.send_signal(sig)
                except ProcessLookupError:
                    pass

    def stop(self) -> None:
        """A first stop drains each child; a second (abort) cuts their requests off: each child
        counts the signals it gets, as the parent does."""
        self._signals += 1
        self._signal_children(signal.SIGTERM)

    abort = stop

    def exit_now(self) -> None:
        self._signal_children(signal.SIGKILL)

    def progress(self) -> dict[str, Any]:
        return self._progress

    async def _watch_progress(self) -> None:
        """The children's latest progress (each says it with its lease heartbeat), summed."""
        every = max(float(self.cfg["run"]["lease_s"]) / 3, 0.5)
        while True:
            await asyncio.sleep(every)
            try:
                rows = await self.db.lease_run_progress(self.run_id)
            except Exception:
                continue
            self._progress = merge_progress([r["progress"] for r in rows if r["alive"] and r["progress"]],
                                            alive=sum(1 for r in rows if r["alive"]), count=self.count)
            if "done" in self._progress:  # the run's log says it too: `crawler tail`, the bench
                log.info("progress", **self._progress)

    async def run(self, drain_timeout_s: float) -> dict[str, Any]:
        for k in range(self.count):
            proc = await asyncio.create_subprocess_exec(
                *child_argv(self.args, self.run_id, k, self.count), start_new_session=True,
                stdin=asyncio.subprocess.DEVNULL)
            self.procs.append(proc)
            for _ in range(self._signals):  # a stop that came while it was starting
                proc.send_signal(signal.SIGTERM)
        log.info("workers.started", workers=self.count, pids=[p.pid for p in self.procs])
        watch = asyncio.create_task(self._watch_progress())
        try:
            codes = [await p.wait() for p in self.procs]
        finally:
            watch.cancel()
            self._signal_children(signal.SIGKILL)  # only those still running: the parent is leaving
        summaries = []
        for k in range(self.count):
            path = report.worker_dir(self.folder, k) / "summary.json"
            try:
                summaries.append(json.loads(path.read_text()))
            except (OSError, ValueError):
                summaries.append(None)
        return merge_run(summaries, codes, [p.pid for p in self.procs])


def merge_run(summaries: list[dict[str, Any] | None], codes: list[int], pids: list[int]) -> dict[str, Any]:
    """The run's summary from its children's (None: a child that wrote none) and exit statuses."""
    merged = merge_summaries([s for s in summaries if s is not None])
    merged["workers"] = [{"index": k, "pid": pids[k], "exit": codes[k], "status": (summaries[k] or {}).get("status", "lost")}
                         for k in range(len(codes))]
    # A child that ended on an error of its own (exit 1, 2) fails the run; one killed by a
    # signal (a negative status) was lost, and its budgets taken over by the others.
    failed = [(w, summaries[w["index"]]) for w in merged["workers"] if w["exit"] in (1, 2)]
    if failed:
        merged["fatal"] = "; ".join(
            f"worker {w['index']} failed (exit {w['exit']}): "
            + str((s or {}).get("fatal") or (s or {}).get("error") or "see its log") for w, s in failed)
    lost = [w for w in merged["workers"] if w["exit"] < 0]
    if lost:
        # Its units were taken over by the others, which end only once every unit is swept:
        # the run's work is done; what the lost worker had in flight was taken again.
        merged["workers_lost"] = len(lost)
        log.warning("workers.lost", workers=lost,
                    note="their budgets were taken over by the others once their leases ran out")
    if all(s is None for s in summaries):
        merged["fatal"] = f"no worker finished (exit statuses {codes})"
    return merged


def merge_summaries(summaries: list[dict[str, Any]]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for key in SUMMED:
        if any(key in s for s in summaries):
            out[key] = sum(s.get(key, 0) or 0 for s in summaries)
    for key in TABLE_WIDE:
        out[key] = max((s.get(key, 0) or 0 for s in summaries), default=0)
    out["interrupted"] = any(s.get("interrupted") for s in summaries)
    per_host: dict[str, Counter[str]] = {}
    for s in summaries:
        for host, counts in s.get("per_host", {}).items():
            per_host.setdefault(host, Counter()).update(counts)
    out["per_host"] = {h: dict(c) for h, c in sorted(per_host.items())}
    for key in ("errors", "transient_errors", "failed_errors", "requests_per_budget"):
        total: Counter[str] = Counter()
        for s in summaries:
            total.update(s.get(key, {}))
        out[key] = dict(total)
    out["failed_rows"] = [r for s in summaries for r in s.get("failed_rows", [])][:1000]
    out["head_404_untrusted"] = sorted({h for s in summaries for h in s.get("head_404_untrusted", [])})
    out["unrecorded"] = [u for s in summaries for u in s.get("unrecorded", [])]
    fatal = [s["fatal"] for s in summaries if s.get("fatal")]
    if fatal:
        out["fatal"] = "; ".join(dict.fromkeys(fatal))
    out["timeline"] = merge_timelines([s.get("timeline") or {} for s in summaries])
    out["cpu_s"] = {k: round(sum((s.get("cpu_s") or {}).get(k, 0.0) for s in summaries), 3)
                    for k in ("self", "children", "system", "main_thread")
                    if k in ("self", "children") or all(k in (s.get("cpu_s") or {}) for s in summaries)}
    return out


def merge_timelines(timelines: list[dict[str, Any]]) -> dict[str, Any]:
    """One chart from each worker's: seconds counted from the earliest worker's start (each
    says its start as `origin_unix`; to the second). A named budget is served by one worker at
    a time, so its starts add up; `default` is the busiest host's each second, so the larger."""
    origins = [t.get("origin_unix") for t in timelines if t.get("origin_unix") is not None]
    first = min(origins) if origins else None
    budgets: dict[str, dict[str, Any]] = {}
    pauses: list[dict[str, Any]] = []
    for t in timelines:
        shift = round(t["origin_unix"] - first) if first is not None and t.get("origin_unix") is not None else 0
        for name, b in t.get("budgets", {}).items():
            into = budgets.setdefault(name, {"cap_per_s": b.get("cap_per_s"), "max_inflight": b.get("max_inflight"),
                                             "starts": {}})
            for sec, n in b.get("starts", []):
                at = sec + shift
                into["starts"][at] = max(into["starts"].get(at, 0), n) if name == "default" else into["starts"].get(at, 0) + n
        for p in t.get("pauses", []):
            pauses.append({**p, "at_s": p.get("at_s", 0) + shift})
    for b in budgets.values():
        b["starts"] = sorted(b["starts"].items())
    out: dict[str, Any] = {"budgets": dict(sorted(budgets.items())), "pauses": pauses}
    if first is not None:
        out["origin_unix"] = first
    return out


def merge_progress(parts: list[dict[str, Any]], alive: int, count: int) -> dict[str, Any]:
    out: dict[str, Any] = {"workers": count, "workers_alive": alive}
    if not parts:
        return out
    out["done"] = sum(p.get("done", 0) for p in parts)
    out["planned"] = max(p.get("planned", 0) for p in parts)
    out["rows_per_s"] = round(sum(p.get("rows_per_s", 0.0) for p in parts), 2)
    todo = max(0, out["planned"] - out["done"])
    out["eta_s"] = round(todo / out["rows_per_s"], 1) if out["rows_per_s"] > 0 else None
    counts: Counter[str] = Counter()
    for p in parts:
        counts.update(p.get("counts", {}))
    out["counts"] = {k: counts.get(k, 0) for k in ("fetched", "hard_404", "transient", "failed")}
    out["commit_pending"] = sum(p.get("commit_pending", 0) for p in parts)
    out["sink_pending"] = sum(p.get("sink_pending", 0) for p in parts)
    out["commits"] = sum(p.get("commits", 0) for p in parts)
    budgets: dict[str, dict[str, Any]] = {}
    for p in parts:
        for name, b in p.get("budgets", {}).items():
            into = budgets.setdefault(name, {})
            for k, v in b.items():
                if isinstance(v, (int, float)) and not isinstance(v, bool):
                    into[k] = max(into.get(k, 0), v) if k in ("paused_s",) else into.get(k, 0) + v
                else:
                    into[k] = v
    out["budgets"] = budgets
    return out
