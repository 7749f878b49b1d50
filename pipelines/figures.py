"""The figure job: every missing paper_figure row, tried once, politely.

    PostgreSQL ──producer per budget──▶ bounded queue ──max_inflight workers──▶ Fetcher (HTTP)
        ▲                                                                         │
        └──── Sink (journalled stamps) ◀── Committer (≤100 files/commit) ◀── file in place
                       ▲                                                         │
                       └─────────── hard_404 / transient / failed ◀──────────────┘

PostgreSQL is the queue: a row is taken when its columns say it needs work (never attempted, or
transient and due, or failed with --retry-failed). Each budget gets its own keyset-paginated
producer over the rows whose URL host falls under it, so a slow provider never holds up a fast
one and memory is bounded by page size × budgets, not by the table. Before any request a worker
looks on disk: a file already at the canonical path (a crash after placing it) is committed and
stamped as it is.
"""

from __future__ import annotations

import asyncio
import os
import time
from collections import Counter, defaultdict
from dataclasses import dataclass, field
from datetime import timedelta
from pathlib import Path
from collections.abc import AsyncIterator
from typing import Any

import structlog
from yarl import URL

from crawler import engine, files, media, paths, redact, sink as contract
from crawler.budgets import Budget, Budgets
from crawler.changeset import ChangesetFile, ChangesetWriter
from crawler.committer import Committer, PlacedFile, close_bounded
from crawler.config import Config
from crawler.db import Change, Database, DatabaseError, is_connection_error
from crawler.fetcher import Fetcher, FetchResult, make_session
from crawler.git import GitRepo
from crawler.netguard import GuardedResolver
from crawler.sink import Sink, iso, utcnow
from crawler.unrecorded import Unrecorded

log = structlog.get_logger()

UNPARSEABLE = "(unparseable)"
# Bodies up to this size ride along to their commit. At most about 2 × artifacts.max_uncommitted
# + workers are held (waiting, and being committed): under 30 MiB at the defaults.
KEEP_FOR_COMMIT = 32 << 10
_STOP = object()


@dataclass
class FigureOptions:
    limit: int | None = None
    host: str | None = None
    retry_failed: bool = False
    changeset: Path | None = None  # read-only repair: row changes go to this file (crawler/changeset.py)
    plan: bool = False             # only plan_only() is called: the changeset is only read


@dataclass
class Tally:
    """What this run did, for progress events and the summary."""

    counts: Counter[str] = field(default_factory=Counter)
    per_host: dict[str, Counter[str]] = field(default_factory=lambda: defaultdict(Counter))
    errors: Counter[str] = field(default_factory=Counter)
    errors_by_outcome: dict[str, Counter[str]] = field(default_factory=lambda: defaultdict(Counter))
    failed_rows: list[dict[str, str]] = field(default_factory=list)
    planned: int = 0

    def add(self, host: str, outcome: str, error: str | None = None) -> None:
        self.counts["attempted"] += 1
        self.counts[outcome] += 1
        self.per_host[host]["attempted"] += 1
        self.per_host[host][outcome] += 1
        if error:
            self.errors[error] += 1
            self.errors_by_outcome[outcome][error] += 1


class FigureJob:
    def __init__(self, cfg: Config, db: Database, run_id: str, opts: FigureOptions) -> None:
        self.cfg = cfg
        self.db = db
        self.run_id = run_id
        self.opts = opts
        self.root = Path(cfg["artifacts"]["root"])
        self.http = cfg["http"]
        self.tally = Tally()
        self.resolve_path = paths.load_resolver(cfg["artifacts"]["figure_path"], cfg["artifacts"]["path_resolver"])
        self.budgets = Budgets(cfg.budgets, self.http["rate_guard_s"], on_pause=self._on_pause,
                               on_resume=self._on_resume, max_wait_s=self.http["max_wait_s"])
        self.repo = GitRepo(self.root, cfg["artifacts"]["git_timeout_s"], cfg["artifacts"]["commit_author_name"],
                            cfg["artifacts"]["commit_author_email"], cfg["artifacts"]["commit_command"],
                            cfg["artifacts"]["split_index"], cfg["artifacts"]["git_min_bytes_per_s"])
        # With a changeset the database is only read: outcomes go to the file, and rows the file
        # already holds (an earlier run of the same changeset) are not taken again.
        self.changes = (ChangesetFile(opts.changeset, repair=not opts.plan, optional=opts.plan)
                        if opts.changeset is not None else None)
        self.sink = Sink(db, run_id, cfg["db"]["flush_rows"], cfg["db"]["flush_interval_s"],
                         outage_max_s=cfg["db"]["outage_max_s"], on_outage_over=self._give_up,
                         writer=ChangesetWriter(db, self.changes) if self.changes is not None else None)
        self.committer = Committer(self.repo, self.sink, cfg["artifacts"]["commit_batch"],
                                   cfg["artifacts"]["commit_interval_s"], run_id, self._stamp_fetched, "figures",
                                   cfg["artifacts"]["max_uncommitted"], cfg["artifacts"]["fsync"])
        self._stopping = asyncio.Event()
        self._workers: list[asyncio.Task[None]] = []
        self._taken = 0
        self._queues: dict[str, asyncio.Queue[Any]] = {}
        self._started = time.monotonic()
        self._now_iso = iso(utcnow())
        self.fetcher: Fetcher | None = None
        self.unrecorded = Unrecorded()
        self._local_failures_in_a_row = 0
        self.fatal: str | None = None  # why the run stopped on its own, in one line

    # -- lifecycle ---------------------------------------------------------------------------------
    def stop(self) -> None:
        """Take no new rows; rows in hand finish (the caller bounds how long)."""
        self._stopping.set()

    def abort(self) -> None:
        """Stop now: in-flight requests are cut off (their temporary files removed); what was
        already placed is still committed and stamped on the way out."""
        self._stopping.set()
        for w in self._workers:
            w.cancel()

    async def run(self, drain_timeout_s: float) -> dict[str, Any]:
        await self.repo.check()
        # A killed run may have left temporary files; they live under the template's fixed prefix.
        fixed = self.cfg["artifacts"]["figure_path"].split("{", 1)[0].rsplit("/", 1)[0]
        if fixed and not self.cfg["artifacts"]["path_resolver"]:
            removed = await asyncio.to_thread(files.remove_stale_parts, self.root / fixed)
            if removed:
                log.info("run.stale_parts_removed", files=removed)
        plan = await self._plan()
        resolver = GuardedResolver(self.http["connect_to"], self.http["allow_private_addresses"])
        session = make_session(self.http, resolver)
        self.fetcher = Fetcher(session, self.budgets, resolver, self.http, on_head_lies=self._on_head_lies)
        self.sink.start()
        self.committer.start()
        producers: list[asyncio.Task[None]] = []
        workers = self._workers
        for name, (hosts, inflight) in plan.items():
            # Room for one stop marker per worker once the queue is emptied at a stop.
            queue: asyncio.Queue[Any] = asyncio.Queue(max(self.cfg["run"]["queue_rows"], inflight))
            self._queues[name] = queue
            producers.append(asyncio.create_task(self._produce(hosts, queue, inflight), name=f"producer:{name}"))
            workers += [asyncio.create_task(self._work(queue), name=f"worker:{name}:{i}") for i in range(inflight)]
        progress = asyncio.create_task(self._progress(), name="progress")
        interrupted = False
        try:
            stop_wait = asyncio.create_task(self._stopping.wait())
            all_workers = asyncio.gather(*workers)
            await asyncio.wait([stop_wait, all_workers], return_when=asyncio.FIRST_COMPLETED)
            if self._stopping.is_set():
                interrupted = self.fatal is None
                for p in producers:
                    p.cancel()
                log.info("run.draining", inflight=sum(b.stats.inflight for b in self.budgets.all()),
                         timeout_s=drain_timeout_s)
                for q in self._queues.values():  # rows not yet started stay for the next run
                    while not q.empty():
                        q.get_nowait()
                    for _ in range(q.maxsize):
                        q.put_nowait(_STOP)
                done, pending = await asyncio.wait(workers, timeout=drain_timeout_s)
                for w in pending:
                    w.cancel()
                await asyncio.gather(*workers, return_exceptions=True)
                await asyncio.gather(all_workers, return_exceptions=True)
            else:
                await all_workers
            stop_wait.cancel()
            for outcome in await asyncio.gather(*producers, return_exceptions=True):
                if isinstance(outcome, Exception):
                    raise outcome  # e.g. the database went away: the run fails, loudly
        finally:
            for w in workers:
                w.cancel()
            await asyncio.gather(*workers, return_exceptions=True)
            progress.cancel()
            # file in place → commit → stamp: the committer flushes its stamps through the sink.
            # Bounded: a database or git that never answers must not hold the stop for ever; what
            # is left then is repaired by the next run (files on disk are adopted).
            # After a stop signal the operator waits: drain_timeout_s. A normal finish may need
            # a last commit that waits on git's index lock: git_timeout_s, and an outage.
            normal = max(drain_timeout_s, 2 * self.cfg["artifacts"]["git_timeout_s"] + 30)
            await self._bounded_close(drain_timeout_s if interrupted or self.fatal else normal)
            await session.close()
            if self.changes is not None:
                self.changes.release()
        return self._summary(interrupted)

    async def _bounded_close(self, seconds: float) -> None:
        for name, exc in await close_bounded(self.committer, self.sink, seconds):
            if isinstance(exc, TimeoutError):
                why = (f"the {name} could not finish within run.drain_timeout_s "
                       f"({self.sink.failed or 'the database or git did not answer'})")
            else:
                why = str(exc) if isinstance(exc, DatabaseError) else f"closing the {name} failed: {type(exc).__name__}: {exc}"
            self.fatal = self.fatal or why

    # -- a plan: what a run would do, without a request or a write --------------------------------------
    async def plan_only(self) -> dict[str, Any]:
        """Rows per budget and host that a run would try now (rows whose file is on disk, or that
        the changeset already holds, cost no request), and the least time the budgets allow: a
        row takes one request at least (HEAD), two when the file exists (HEAD, GET). Reads the
        database only; nothing is written, nothing is sent."""
        no_url, bad = await self.db.figure_skipped()
        eligible = await self.db.figure_hosts(self._now_iso, self.opts.retry_failed, self.opts.host)
        per_host: dict[str, Counter[str]] = defaultdict(Counter)
        for group in (sorted(h for h in eligible if h is not None), None):
            if group is not None and not group:
                continue
            if group is None and None not in eligible:
                continue
            async for rows, present, _found in self._pages(group):
                for row, is_present in zip(rows, present):
                    counts = per_host[row["host"] or UNPARSEABLE]
                    if self.changes is not None and self.changes.holds(row["id"]):
                        counts["in_changeset"] += 1
                    elif is_present:
                        counts["present"] += 1
                    else:
                        counts["to_try"] += 1
        budgets: dict[str, dict[str, Any]] = {}
        for host, counts in sorted(per_host.items()):
            if host == UNPARSEABLE:  # never requested: no budget
                b = budgets.setdefault(UNPARSEABLE, {"hosts": [], "rows": 0, "rate_per_s": None, "max_inflight": 0})
            else:
                budget = self.budgets.for_host(host)
                b = budgets.setdefault(budget.name, {"hosts": [], "rows": 0, "rate_per_s": budget.rate_per_s,
                                                     "max_inflight": budget.max_inflight})
            b["hosts"].append(host)
            b["rows"] += counts["to_try"]
        for b in budgets.values():
            if self.opts.limit is not None:  # a run takes at most --limit rows, whichever budget they fall under
                b["rows"] = min(b["rows"], self.opts.limit)
            rate = b["rate_per_s"]
            b["least_s"] = b["rows"] / rate if rate else 0.0
            b["if_all_exist_s"] = 2 * b["rows"] / rate if rate else 0.0
        slowest = max(budgets.items(), key=lambda kv: kv[1]["least_s"], default=(None, {"least_s": 0.0, "if_all_exist_s": 0.0}))
        limit = self.opts.limit
        total = sum(c["to_try"] for c in per_host.values())
        return {
            "to_try": min(total, limit) if limit else total, "eligible": sum(eligible.values()),
            "present": sum(c["present"] for c in per_host.values()),
            "in_changeset": sum(c["in_changeset"] for c in per_host.values()),
            "no_url": no_url, "bad_metadata": len(bad), "limit": limit,
            "per_host": {h: dict(c) for h, c in sorted(per_host.items())},
            "budgets": budgets,
            "slowest_budget": slowest[0], "least_s": slowest[1]["least_s"],
            "if_all_exist_s": max((b["if_all_exist_s"] for b in budgets.values()), default=0.0),
        }

    # -- planning and producing ---------------------------------------------------------------------
    async def _plan(self) -> dict[str, tuple[list[str] | None, int]]:
        no_url, bad = await self.db.figure_skipped()
        self.tally.counts["no_url"] = no_url
        self.tally.counts["bad_metadata"] = len(bad)
        for artifact_id in bad:
            log.error("row.bad_metadata", artifact_id=artifact_id,
                      error="metadata is not a JSON object; row left untouched")
        hosts = await self.db.figure_hosts(self._now_iso, self.opts.retry_failed, self.opts.host)
        self.tally.planned = sum(hosts.values())
        plan: dict[str, tuple[list[str] | None, int]] = {}
        for host, n in sorted(hosts.items(), key=lambda kv: kv[0] or ""):
            if host is None:
                plan[UNPARSEABLE] = (None, 1)
                continue
            budget = self.budgets.for_host(host)
            listed, inflight = plan.get(budget.name, ([], budget.max_inflight))
            assert listed is not None
            listed.append(host)
            plan[budget.name] = (listed, inflight)
        log.info("run.plan", rows=self.tally.planned, no_url=no_url, bad_metadata=len(bad),
                 budgets={k: {"hosts": len(v[0] or []), "workers": v[1]} for k, v in plan.items()})
        return plan

    async def _pages(self, hosts: list[str] | None) -> AsyncIterator[tuple[list[dict[str, Any]], list[bool], list[Any]]]:
        """Keyset pages of the rows due whose host is in `hosts` (None: rows whose host cannot
        be parsed), each with where its file would go and what is already on disk: found in one
        thread hop per page, so a row never waits on the file system before its request."""
        after = ""
        page_size = self.cfg["db"]["page_size"]
        while not self._stopping.is_set():
            rows = await self._page(hosts, after, page_size)
            if not rows:
                return
            after = rows[-1]["id"]
            for row in rows:
                row["candidates"] = self._candidates(row)
            present, on_disk = await files.look(self.root, [
                (paths.recorded(self.root, r["file_path"]),
                 list(r["candidates"].values()) if r["candidates"] else []) for r in rows])
            yield rows, present, on_disk

    async def _produce(self, hosts: list[str] | None, queue: asyncio.Queue[Any], workers: int) -> None:
        try:
            async for rows, present, on_disk in self._pages(hosts):
                for row, is_present, found in zip(rows, present, on_disk):
                    if self.changes is not None and self.changes.holds(row["id"]):
                        self.tally.counts["in_changeset"] += 1
                        continue
                    if is_present:
                        self.tally.counts["present"] += 1
                        continue
                    if self.opts.limit is not None and self._taken >= self.opts.limit:
                        return
                    self._taken += 1
                    row["on_disk"] = found
                    await queue.put(row)
        finally:
            if not self._stopping.is_set():
                for _ in range(workers):
                    await queue.put(_STOP)

    # -- one row -------------------------------------------------------------------------------------
    async def _work(self, queue: asyncio.Queue[Any]) -> None:
        while True:
            row = await queue.get()
            if row is _STOP or self._stopping.is_set():
                return
            await self._while_db_away()
            if self._stopping.is_set():
                return  # left as it was: the next run takes it
            try:
                await self._handle(row)
            except Exception as exc:
                self._local_failure(row["id"], exc)
            else:
                self._local_failures_in_a_row = 0

    def _give_up(self, why: str) -> None:
        """Stop on our own (the database away too long): the cause, in one line, ends the run."""
        if self.fatal is None:
            self.fatal = why
            log.error("run.giving_up", error=why)
        self._stopping.set()

    async def _while_db_away(self) -> None:
        """Take no row while the database cannot be written: its outcome could not be recorded."""
        if self.sink.healthy.is_set():
            return
        stop = asyncio.ensure_future(self._stopping.wait())
        back = asyncio.ensure_future(self.sink.healthy.wait())
        try:
            await asyncio.wait([stop, back], return_when=asyncio.FIRST_COMPLETED)
        finally:
            stop.cancel()
            back.cancel()

    async def _page(self, hosts: list[str] | None, after: str, page_size: int) -> list[dict[str, Any]]:
        """One page of rows; while the database is away, wait and ask again (the sink keeps the
        outage's clock and ends the run when it lasts too long)."""
        while True:
            try:
                rows = await self.db.figure_page(hosts, after, page_size, self._now_iso, self.opts.retry_failed)
                self.sink.came_back()
                return rows
            except Exception as exc:
                if not is_connection_error(exc) or self._stopping.is_set():
                    raise
                self.sink.went_down(exc)
                if self.sink.failed is not None:
                    return []
                await asyncio.sleep(self.sink.backoff_s)

    def _local_failure(self, artifact_id: str, exc: BaseException) -> None:
        """Trouble on our side (a full disk, a file system gone read-only, a bug) is not the
        upstream's fault: the row is left exactly as it was, due again at once, and nothing is
        stamped. `run.local_failure_limit` rows in a row failing so stop the run: fetching on
        would download the whole table only to throw it away."""
        error = f"{type(exc).__name__}: {exc}"
        log.error("row.local_error", artifact_id=artifact_id, error=error,
                  note="left as it was: the next run takes it again")
        self.tally.counts["local_error"] += 1
        self.unrecorded.add("local", _local_reason(exc), [artifact_id])
        self._local_failures_in_a_row += 1
        if self._local_failures_in_a_row >= self.cfg["run"]["local_failure_limit"] and self.fatal is None:
            self.fatal = (f"{self._local_failures_in_a_row} rows in a row failed on this machine, the last with "
                          f"{error}; stopped taking rows (run again once that is fixed)")
            log.error("run.local_failures", rows=self._local_failures_in_a_row, error=error,
                      note="stopped taking rows: the cause is on this machine, not upstream")
            self._stopping.set()

    def _candidates(self, row: dict[str, Any]) -> dict[str, str] | None:
        """The row's canonical path for each image extension; None when the path would be unsafe."""
        meta = {k: row[k] for k in ("paper_id", "pmcid", "figure_label")}
        try:
            fields = paths.figure_fields(row["id"], meta, "")
            rels = [self.resolve_path({**fields, "ext": ext}) for ext in media.EXTENSIONS]
            return dict(zip(media.EXTENSIONS, paths.contain_all(self.root, rels)))
        except paths.PathError as exc:
            row["path_error"] = ("failed", "unsafe_path", str(exc))
        except Exception as exc:  # a site's resolver broke on this row: our trouble, not the row's
            row["path_error"] = exc
        return None

    async def _handle(self, row: dict[str, Any]) -> None:
        url = row["image_url"]
        host = host_of(url)
        candidates = row["candidates"]
        if candidates is None:
            if isinstance(row["path_error"], BaseException):
                raise row["path_error"]
            outcome, code, message = row["path_error"]
            log.error("row.bad_path", artifact_id=row["id"], error=message)
            self._record(row["id"], host, FetchResult(outcome, str(url), code))
            return
        # A crash after the rename but before the stamp left the file in place: use it as it is.
        on_disk = row["on_disk"]
        if on_disk is not None and await self._adopt(row["id"], on_disk, host, str(url)):
            return
        if not isinstance(url, str):
            self._record(row["id"], host, FetchResult("failed", str(url), "bad_url"))
            return
        temp_dir = (self.root / candidates[".png"]).parent
        result = await self.fetcher.fetch(url, temp_dir, paths.safe_segment(row["id"]))
        if result.outcome == "deferred":  # never asked: the row stays as it was for a later run
            self.tally.counts["deferred"] += 1
            log.info("row.deferred", artifact_id=row["id"], host=host, budget_paused_s=round(result.retry_in_s or 0))
            return
        if result.outcome == "fetched":
            assert result.temp is not None and result.ext is not None
            rel = candidates[result.ext]
            body = await files.place_temp(result.temp, self.root / rel)
            # Small bodies ride along to the commit, which then need not read them back.
            keep = body if body is not None and len(body) <= KEEP_FOR_COMMIT else None
            await self.committer.add(PlacedFile(row["id"], rel, result.temp.sha256.hexdigest(), result.temp.size,
                                                result.content_type or "", utcnow(), str(url), data=keep))
            self.tally.add(host, "fetched")
            log.info("row.outcome", artifact_id=row["id"], outcome="fetched", host=host, path=rel,
                     size=result.temp.size, requests=result.requests)
            return
        self._record(row["id"], host, result)

    async def _adopt(self, artifact_id: str, rel: str, host: str, url: str) -> bool:
        sha, size, head, tail = await files.hash_file_ends(self.root / rel, tail_bytes=media.TAIL_BYTES)
        ext = media.sniff(head)
        if ext is None or not rel.endswith(ext):
            log.warning("row.foreign_file", artifact_id=artifact_id, path=rel,
                        error="a file that is not the expected image sits at the canonical path; fetching anew")
            return False
        if not await asyncio.to_thread(media.looks_complete, ext, head, tail, size,
                                       files.range_reader(self.root / rel)):
            log.warning("row.incomplete_file", artifact_id=artifact_id, path=rel,
                        error="the file at the canonical path may have been cut short; fetching anew")
            return False
        await self.committer.add(PlacedFile(artifact_id, rel, sha, size, media.KINDS[ext][0], utcnow(), url))
        self.tally.add(host, "fetched")
        self.tally.counts["adopted_from_disk"] += 1
        log.info("row.outcome", artifact_id=artifact_id, outcome="fetched", host=host, path=rel,
                 size=size, requests=0, adopted=True)
        return True

    def _record(self, artifact_id: str, host: str, r: FetchResult) -> None:
        now = utcnow()
        change: Change
        if r.outcome == "hard_404":
            assert r.status is not None
            change = contract.figure_hard_404(artifact_id, r.status, now, r.url, r.blocked_by)
        else:
            wait = r.retry_in_s if r.retry_in_s is not None else self.http["transient_retry_after_s"]
            next_at = contract.transient_next_attempt(now, max(wait, 0.0)) if r.outcome == "transient" else None
            change = contract.figure_retryable(artifact_id, r.outcome, r.error or "unknown", now, r.url, next_at, r.status)
            if r.outcome == "failed" and len(self.tally.failed_rows) < 1000:
                self.tally.failed_rows.append({"artifact_id": artifact_id, "error": r.error or "",
                                               "url": redact.url(r.url)})
        self.sink.record(change)
        self.tally.add(host, r.outcome, r.error)
        log.info("row.outcome", artifact_id=artifact_id, outcome=r.outcome, host=host, status=r.status,
                 error=r.error, requests=r.requests, **({"blocked_by": r.blocked_by} if r.blocked_by else {}))

    @staticmethod
    def _stamp_fetched(p: PlacedFile, commit: str) -> Change:
        return contract.figure_fetched(p.artifact_id, p.rel_path, p.sha256, p.size, p.content_type,
                                       commit, p.fetched_at, p.source)

    # -- observing -------------------------------------------------------------------------------------
    def _on_pause(self, budget: Budget, seconds: float, reason: str) -> None:
        log.warning("budget.paused", budget=budget.name, seconds=round(seconds, 3), reason=reason)

    def _on_head_lies(self, host: str, url: str) -> None:
        log.warning("host.head_404_untrusted", host=host, url=redact.url(url),
                    note="a GET served what its HEAD called gone: this host's rows go straight to GET this run")

    def _on_resume(self, budget: Budget) -> None:
        log.info("budget.resumed", budget=budget.name)

    async def _progress(self) -> None:
        interval = self.cfg["report"]["progress_interval_s"]
        while True:
            await asyncio.sleep(interval)
            log.info("progress", **self.progress())
            engine.release_free_memory()

    def progress(self) -> dict[str, Any]:
        elapsed = time.monotonic() - self._started
        done = self.tally.counts["attempted"]
        rate = done / elapsed if elapsed > 0 else 0.0
        todo = max(0, (min(self.tally.planned, self.opts.limit) if self.opts.limit else self.tally.planned) - done)
        return {
            "done": done, "planned": self.tally.planned, "rows_per_s": round(rate, 2),
            "eta_s": round(todo / rate, 1) if rate > 0 else None,
            "counts": {k: self.tally.counts[k] for k in ("fetched", "hard_404", "transient", "failed")},
            "commit_pending": self.committer.pending, "sink_pending": self.sink.pending,
            "budgets": self._budget_progress(),
            "commits": self.committer.commits,
        }

    def _budget_progress(self) -> dict[str, dict[str, Any]]:
        """Per budget: queued, in flight, paused (until when), requests. The hosts no budget names
        (a budget each) are summed in one entry, "default", with how many there are: thousands of
        hosts must not make every progress line, heartbeat and metrics file grow with them."""
        out: dict[str, dict[str, Any]] = {}
        for b in self.budgets.all():
            entry = {"queue": self._queues[b.name].qsize() if b.name in self._queues else 0,
                     "inflight": b.stats.inflight, "paused_s": round(b.paused_for_s, 2), "requests": b.stats.started}
            if not b.name.startswith("default:"):
                if b.paused_for_s > 0:
                    entry["paused_until"] = iso(utcnow() + timedelta(seconds=b.paused_for_s))
                out[b.name] = entry
                continue
            d = out.setdefault("default", {"hosts": 0, "queue": 0, "inflight": 0, "paused_s": 0.0, "requests": 0,
                                           "hosts_paused": 0})
            d["hosts"] += 1
            d["inflight"] += entry["inflight"]
            d["requests"] += entry["requests"]
            d["paused_s"] = max(d["paused_s"], entry["paused_s"])
            d["hosts_paused"] += b.paused_for_s > 0
        queue = sum(q.qsize() for n, q in self._queues.items() if n.startswith("default:"))
        if "default" in out:
            out["default"]["queue"] = queue
        return out

    def _summary(self, interrupted: bool) -> dict[str, Any]:
        c = self.tally.counts
        return {
            "attempted": c["attempted"], "fetched": c["fetched"], "hard_404": c["hard_404"],
            "transient": c["transient"], "failed": c["failed"], "no_url": c["no_url"],
            "present": c["present"], "bad_metadata": c["bad_metadata"],
            "adopted_from_disk": c["adopted_from_disk"], "deferred": c["deferred"], "planned": self.tally.planned,
            "interrupted": interrupted,
            "per_host": {h: {k: v.get(k, 0) for k in ("attempted", "fetched", "hard_404", "transient", "failed", "no_url")}
                         for h, v in sorted(self.tally.per_host.items())},
            "errors": dict(self.tally.errors),
            "transient_errors": dict(self.tally.errors_by_outcome["transient"]),
            "failed_errors": dict(self.tally.errors_by_outcome["failed"]),
            "failed_rows": self.tally.failed_rows,
            "commits": self.committer.commits,
            "commit_failed_files": self.committer.failed_files,
            "requests_per_budget": {b.name: b.stats.started for b in self.budgets.all()},
            # Request starts per second per budget, and pauses: the report's politeness charts.
            "timeline": self.budgets.timeline.as_dict(),
            # Hosts that answered HEAD 404 for files GET then served: their HEAD 404s were not trusted.
            "head_404_untrusted": self.fetcher.head_untrusted if self.fetcher is not None else [],
            "local_error": c["local_error"],
            # Work attempted but not recorded (exit 3): rows that failed on this machine, commits
            # that failed, rows the database refused.
            "unrecorded": (self.unrecorded.as_list() + self.committer.unrecorded.as_list()
                           + self.sink.unrecorded.as_list()),
            **({"fatal": self.fatal} if self.fatal else {}),
            **({"changeset": str(self.changes.path), "changeset_lines": self.changes.lines,
                "in_changeset": c["in_changeset"]} if self.changes is not None else {}),
        }


def _local_reason(exc: BaseException) -> str:
    """What went wrong on this machine, in words that group rows by cause."""
    if isinstance(exc, OSError) and exc.errno is not None:
        return f"{os.strerror(exc.errno)} (on this machine; the rows were left as they were)"
    return f"{type(exc).__name__} (on this machine; the rows were left as they were)"


def host_of(url: Any) -> str:
    try:
        return (URL(url).host or UNPARSEABLE).lower() if isinstance(url, str) else UNPARSEABLE
    except (ValueError, TypeError):
        return UNPARSEABLE
