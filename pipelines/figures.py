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
import threading
import time
from collections import Counter, defaultdict
from dataclasses import dataclass, field
from datetime import timedelta
from pathlib import Path
from collections.abc import AsyncIterator
from typing import Any

import structlog

from crawler import engine, files, logs, media, paths, redact, sink as contract
from crawler.budgets import Budget, Budgets
from crawler.changeset import ChangesetFile, ChangesetWriter
from crawler.committer import Committer, PlacedFile, close_bounded
from crawler.config import Config
from crawler.db import Change, Database, DatabaseError, is_connection_error
from crawler.fetcher import Fetcher, FetchResult, make_session, parse_url
from crawler.git import GitRepo
from crawler.leases import UNPARSEABLE_UNIT, Leases, OwnLeases, unit_of
from crawler.netguard import GuardedResolver
from crawler.sink import Sink, iso, utcnow
from crawler.unrecorded import Unrecorded

log = structlog.get_logger()

UNPARSEABLE = UNPARSEABLE_UNIT  # the rows whose URL has no host: as a host, a budget and a lease unit
# Bodies up to this size ride along to their commit. At most about 2 × artifacts.max_uncommitted
# + workers are held (waiting, and being committed): under 30 MiB at the defaults.
KEEP_FOR_COMMIT = 32 << 10
_STOP = object()
IDLE_LOOK_S = 0.5      # how often a process with no unit of its own looks at the others' (leases, done)
GROUP_QUEUE_FACTOR = 8  # a group of hosts buffers up to this many × run.queue_rows rows, over all its hosts


@dataclass
class FigureOptions:
    limit: int | None = None
    host: str | None = None
    retry_failed: bool = False
    changeset: Path | None = None  # read-only repair: row changes go to this file (crawler/changeset.py)
    plan: bool = False             # only plan_only() is called: the changeset is only read
    expect_workers: int = 1        # processes of this run started together (--workers): wait for them to share
    shares_progress: bool = False  # one of a `--workers` run's processes: its progress goes with its lease heartbeat


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
        self._root_text = str(self.root)
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
        self._queues: dict[str, asyncio.Queue[Any]] = {}  # per budget
        self._workers_of: dict[str, int] = {}             # per budget: its workers (= its max_inflight)
        self._units: dict[str, _Unit] = {}                # the lease units served (now or before)
        self._unit_ended = asyncio.Event()
        self._limit_reached = False
        self.leases: Leases = OwnLeases([])
        # A lease statement or a flush that does not answer within this is treated as the
        # database away (the leases held stay ours until they run out).
        self._db_wait_s = max(cfg["run"]["lease_s"] / 3, 1.0)
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
        # Only this machine's dead processes' (and day-old ones): another process may be writing.
        fixed = self.cfg["artifacts"]["figure_path"].split("{", 1)[0].rsplit("/", 1)[0]
        if fixed and not self.cfg["artifacts"]["path_resolver"]:
            removed = await asyncio.to_thread(files.remove_stale_parts, self.root / fixed)
            if removed:
                log.info("run.stale_parts_removed", files=removed)
        units = await self._plan()
        resolver = GuardedResolver(self.http["connect_to"], self.http["allow_private_addresses"])
        session = make_session(self.http, resolver)
        self.fetcher = Fetcher(session, self.budgets, resolver, self.http, on_head_lies=self._on_head_lies)
        self.sink.start()
        self.committer.start()
        # Read-only (a changeset): nothing to coordinate through; this process serves everything.
        self.leases = (OwnLeases(list(units)) if self.db.read_only else
                       Leases(self.db, self.run_id, list(units), self.cfg["run"]["lease_s"],
                              progress=self.progress if self.opts.shares_progress else None))
        progress = asyncio.create_task(self._progress(), name="progress")
        interrupted = False
        try:
            if units:
                await asyncio.wait_for(self.leases.join(self.opts.expect_workers),
                                       self.cfg["run"]["lease_s"] + self._db_wait_s)
                await self._serve(units)
            if self._stopping.is_set():
                interrupted = self.fatal is None
                await self._drain(drain_timeout_s)
            for outcome in await asyncio.gather(*(u.producer for u in self._units.values() if u.producer),
                                                return_exceptions=True):
                if isinstance(outcome, Exception) and not isinstance(outcome, asyncio.CancelledError):
                    raise outcome  # e.g. the database went away: the run fails, loudly
        finally:
            workers = self._workers
            for w in workers:
                w.cancel()
            await asyncio.gather(*workers, return_exceptions=True)
            for u in self._units.values():
                if u.producer is not None:
                    u.producer.cancel()
            await asyncio.gather(*(u.producer for u in self._units.values() if u.producer), return_exceptions=True)
            progress.cancel()
            # file in place → commit → stamp: the committer flushes its stamps through the sink.
            # Bounded: a database or git that never answers must not hold the stop for ever; what
            # is left then is repaired by the next run (files on disk are adopted).
            # After a stop signal the operator waits: drain_timeout_s. A normal finish may need
            # a last commit that waits on git's index lock: git_timeout_s, and an outage.
            normal = max(drain_timeout_s, 2 * self.cfg["artifacts"]["git_timeout_s"] + 30)
            await self._bounded_close(drain_timeout_s if interrupted or self.fatal else normal)
            # Only now, with every outcome written, may another process take our units.
            try:
                await asyncio.wait_for(self.leases.release(), self.cfg["db"]["connect_timeout_s"])
            except Exception as exc:  # they expire on their own after run.lease_s
                log.warning("lease.release_failed", error=f"{type(exc).__name__}: {exc}")
            await session.close()
            if self.changes is not None:
                self.changes.release()
        return self._summary(interrupted)

    async def _serve(self, units: dict[str, list[str] | None]) -> None:
        """Serve the units whose lease we hold until every unit is swept (by us or the run's
        other processes) or we are stopped; renew and take leases every tick."""
        said_away = False
        while not self._stopping.is_set():
            self._unit_ended.clear()  # before looking: an end signalled while we look is not missed
            try:
                # Renewals every tick_s; a wake-up in between (a unit ended, or waiting on the
                # others') only looks: what was swept, what is free.
                gained, lost = await asyncio.wait_for(self.leases.wake(), self._db_wait_s)
                said_away = False
            except Exception as exc:
                if not (is_connection_error(exc) or isinstance(exc, TimeoutError)):
                    raise
                if not said_away:  # the units we hold stay ours until their lease runs out
                    log.warning("lease.renew_failed", error=f"{type(exc).__name__}: {exc}")
                    said_away = True
                gained, lost = [], []
            # Whatever a tick said or failed to say: a unit lost, or served and no longer surely
            # ours (its workers may already have seen its lease run out), is stopped.
            lost = set(lost) | set(self.leases.expired())
            for name, unit in list(self._units.items()):
                if name in lost or (unit.serving() and not self.leases.holds(name)):
                    self._stop_unit(name)
            for name in gained:
                if self._limit_reached:
                    continue  # taken, not served: given back at the end, not recorded as swept
                self._start_unit(name, units[name])
            for name, unit in list(self._units.items()):
                if not unit.finished() or unit.recorded:
                    continue
                try:  # its outcomes written before anyone may take it again
                    await asyncio.wait_for(self.sink.flush(), self._db_wait_s)
                    await asyncio.wait_for(self.leases.finish(name), self._db_wait_s)
                    unit.recorded = True
                except Exception as exc:
                    if not (is_connection_error(exc) or isinstance(exc, TimeoutError)):
                        raise
                    break  # the next tick tries again
            if self.leases.all_done():
                return
            if self._limit_reached and not any(u.serving() for u in self._units.values()):
                return  # --limit rows taken and done: the units not swept stay for others
            # The next tick, a stop, or a unit coming to its end, whichever comes first. With
            # nothing of our own to serve we are waiting on others' units: look more often, so
            # the run ends (or takes over) soon after they do, not a whole tick later.
            waits = [asyncio.ensure_future(self._stopping.wait()), asyncio.ensure_future(self._unit_ended.wait())]
            try:
                await asyncio.wait(waits, timeout=self._serve_wait_s(), return_when=asyncio.FIRST_COMPLETED)
            finally:
                for w in waits:
                    w.cancel()

    def _serve_wait_s(self) -> float:
        """How long the serve loop may sleep: until the next tick is due (a look between ticks
        does not put the renewal off), and no longer than IDLE_LOOK_S with nothing of our own to
        serve."""
        wait_s = self.leases.next_tick_in()
        if not any(u.serving() for u in self._units.values()):
            wait_s = min(wait_s, IDLE_LOOK_S)
        return min(wait_s, 3600.0)

    def _start_unit(self, name: str, hosts: list[str] | None) -> None:
        unit = _Unit(name)
        if name.startswith("default#"):
            unit.room = asyncio.Semaphore(GROUP_QUEUE_FACTOR * self.cfg["run"]["queue_rows"])
        self._units[name] = unit
        unit.producer = asyncio.create_task(self._produce(unit, hosts), name=f"producer:{name}")

    def _stop_unit(self, name: str) -> None:
        """Our lease on `name` is gone: its rows are its next holder's. Queued ones are left, and
        requests in flight are cut off (their temporary files removed), as their outcomes could
        no longer be recorded before the next holder asks again."""
        unit = self._units.get(name)
        if unit is None or unit.lost:
            return
        unit.lost = True
        if unit.producer is not None:
            unit.producer.cancel()
        for budget in unit.budgets:  # a unit taken again later gets queues and workers afresh
            _stop_queue(self._queues.pop(budget), self._workers_of.pop(budget))
        if unit.serving_rows():
            for w in unit.workers:
                w.cancel()
        self._unit_ended.set()

    async def _drain(self, drain_timeout_s: float) -> None:
        for u in self._units.values():
            if u.producer is not None:
                u.producer.cancel()
        log.info("run.draining", inflight=sum(b.stats.inflight for b in self.budgets.all()),
                 timeout_s=drain_timeout_s)
        for budget, queue in self._queues.items():  # rows not yet started stay for the next run
            _stop_queue(queue, self._workers_of[budget])
        done, pending = await asyncio.wait(self._workers, timeout=drain_timeout_s) if self._workers else (set(), set())
        for w in pending:
            w.cancel()
        await asyncio.gather(*self._workers, return_exceptions=True)

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
    async def _plan(self) -> dict[str, list[str] | None]:
        """The lease units with rows due now, each with its hosts (None: the rows whose URL has no
        host). A named budget is a unit; the hosts no budget names fall into run.lease_groups
        groups, so thousands of hosts make a bounded number of producers and scans."""
        no_url, bad = await self.db.figure_skipped()
        self.tally.counts["no_url"] = no_url
        self.tally.counts["bad_metadata"] = len(bad)
        for artifact_id in bad:
            log.error("row.bad_metadata", artifact_id=artifact_id,
                      error="metadata is not a JSON object; row left untouched")
        hosts = await self.db.figure_hosts(self._now_iso, self.opts.retry_failed, self.opts.host)
        self.tally.planned = sum(hosts.values())
        units: dict[str, list[str] | None] = {}
        groups = self.cfg["run"]["lease_groups"]
        for host, _n in sorted(hosts.items(), key=lambda kv: kv[0] or ""):
            if host is None:
                units[UNPARSEABLE_UNIT] = None
                continue
            unit = unit_of(self.budgets.name_for(host), host, groups)
            listed = units.setdefault(unit, [])
            assert listed is not None
            listed.append(host)
        log.info("run.plan", rows=self.tally.planned, no_url=no_url, bad_metadata=len(bad),
                 units={k: {"hosts": len(v or [])} for k, v in units.items()})
        return units

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

    async def _produce(self, unit: _Unit, hosts: list[str] | None) -> None:
        """One keyset scan over the unit's hosts; each row goes to its budget's queue (made, with
        its workers, when the budget's first row comes). A named budget's full queue holds the
        scan. In a group of hosts no budget names, a host's rows wait in a queue of its own and
        only the group's total is bounded (GROUP_QUEUE_FACTOR × run.queue_rows), so one slow host
        holds the others up only once the group's room is all its rows."""
        clean = False
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
                        self._limit_reached = True  # this unit is not swept: not recorded as such
                        return
                    self._taken += 1
                    row["on_disk"] = found
                    queue = self._queue_for(unit, row["host"])
                    if unit.room is not None:
                        await unit.room.acquire()  # released as a worker takes the row
                    await queue.put(row)
            clean = not self._stopping.is_set()
        except asyncio.CancelledError:
            raise
        except Exception as exc:
            # A scan that failed (not the database away: _page waits that out) ends the run: the
            # unit must not be taken for swept, and the cause is said now, not at the end.
            if self.fatal is None:
                self.fatal = f"reading the rows of {unit.name} failed: {type(exc).__name__}: {exc}"
                log.error("run.giving_up", error=self.fatal)
            self._stopping.set()
            raise
        finally:
            if not self._stopping.is_set() and not unit.lost:
                for budget in unit.budgets:
                    for _ in range(self._workers_of[budget]):
                        await self._queues[budget].put(_STOP)
            unit.scanned = clean
            unit.producer_done = True
            self._unit_ended.set()

    def _queue_for(self, unit: _Unit, host: str | None) -> asyncio.Queue[Any]:
        queue = unit.queue_of_host.get(host)
        if queue is not None:  # the row's host seen before: no budget lookup per row
            return queue
        budget = None if host is None else self.budgets.for_host(host)
        name = UNPARSEABLE if budget is None else budget.name
        queue = self._queues.get(name)
        if queue is None:
            inflight = 1 if budget is None else budget.max_inflight
            # Room for one stop marker per worker once the queue is emptied at a stop; in a group
            # of hosts, the group's room bounds them all (see _produce).
            queue = asyncio.Queue(0 if unit.room is not None else max(self.cfg["run"]["queue_rows"], inflight))
            self._queues[name] = queue
            self._workers_of[name] = inflight
            unit.budgets.append(name)
            tasks = [asyncio.create_task(self._work(unit, queue), name=f"worker:{name}:{i}") for i in range(inflight)]
            unit.workers += tasks
            self._workers += tasks
        unit.queue_of_host[host] = queue
        return queue

    # -- one row -------------------------------------------------------------------------------------
    async def _work(self, unit: _Unit, queue: asyncio.Queue[Any]) -> None:
        try:
            while True:
                row = await queue.get()
                if row is _STOP or self._stopping.is_set() or unit.lost:
                    return
                if unit.room is not None:
                    unit.room.release()
                await self._while_db_away()
                if self._stopping.is_set():
                    return  # left as it was: the next run takes it
                if unit.lost or not self.leases.holds(unit.name):
                    return  # our lease ran out (the database away): the unit's next holder takes it
                try:
                    await self._handle(row)
                except Exception as exc:
                    self._local_failure(row["id"], exc)
                else:
                    self._local_failures_in_a_row = 0
        finally:
            unit.workers_done += 1
            if not unit.serving_rows():  # the unit's last worker: its end is the serve loop's business
                self._unit_ended.set()

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
        parsed = parse_url(url)  # once a row: the fetcher takes it as it is
        host = (parsed.host or UNPARSEABLE).lower() if parsed is not None else UNPARSEABLE
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
        # Paths as text from here: pathlib's objects, a few a row, cost more than they say.
        temp_dir = os.path.dirname(os.path.join(self._root_text, candidates[".png"]))
        result = await self.fetcher.fetch(url, temp_dir, paths.safe_segment(row["id"]), parsed)
        if result.outcome == "deferred":  # never asked: the row stays as it was for a later run
            self.tally.counts["deferred"] += 1
            log.info("row.deferred", artifact_id=row["id"], host=host, budget_paused_s=round(result.retry_in_s or 0))
            return
        if result.outcome == "fetched":
            assert result.temp is not None and result.ext is not None
            rel = candidates[result.ext]
            body = await files.place_temp(result.temp, os.path.join(self._root_text, rel))
            # Small bodies ride along to the commit, which then need not read them back.
            keep = body if body is not None and len(body) <= KEEP_FOR_COMMIT else None
            await self.committer.add(PlacedFile(row["id"], rel, result.temp.sha256.hexdigest(), result.temp.size,
                                                result.content_type or "", utcnow(), str(url), data=keep))
            self.tally.add(host, "fetched")
            logs.row("row.outcome", artifact_id=row["id"], outcome="fetched", host=host, path=rel,
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
        logs.row("row.outcome", artifact_id=artifact_id, outcome="fetched", host=host, path=rel,
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
        logs.row("row.outcome", artifact_id=artifact_id, outcome=r.outcome, host=host, status=r.status,
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
            # CPU seconds of this process and of its children that ended (the commit worker, git).
            "cpu_s": _cpu_s(),
            # Work attempted but not recorded (exit 3): rows that failed on this machine, commits
            # that failed, rows the database refused.
            "unrecorded": (self.unrecorded.as_list() + self.committer.unrecorded.as_list()
                           + self.sink.unrecorded.as_list()),
            **({"fatal": self.fatal} if self.fatal else {}),
            **({"changeset": str(self.changes.path), "changeset_lines": self.changes.lines,
                "in_changeset": c["in_changeset"]} if self.changes is not None else {}),
        }


@dataclass
class _Unit:
    """A lease unit being served: its producer, the budgets its rows fell under, their workers."""

    name: str
    producer: asyncio.Task[None] | None = None
    budgets: list[str] = field(default_factory=list)
    workers: list[asyncio.Task[None]] = field(default_factory=list)
    workers_done: int = 0
    scanned: bool = False        # its scan came to the end of its rows
    producer_done: bool = False
    lost: bool = False
    recorded: bool = False       # recorded as swept for the run (lease_done)
    room: asyncio.Semaphore | None = None  # a group of hosts: rows queued across its hosts, at most
    queue_of_host: dict[str | None, asyncio.Queue[Any]] = field(default_factory=dict)

    def serving_rows(self) -> bool:
        return self.workers_done < len(self.workers)

    def serving(self) -> bool:
        """Taking or working on rows now."""
        return not self.lost and (not self.producer_done or self.serving_rows())

    def finished(self) -> bool:
        return self.scanned and not self.lost and not self.serving_rows()


def _stop_queue(queue: asyncio.Queue[Any], workers: int) -> None:
    """Rows not yet started stay for later; each worker gets a stop marker."""
    while not queue.empty():
        queue.get_nowait()
    for _ in range(workers):
        queue.put_nowait(_STOP)


def _cpu_s() -> dict[str, float]:
    """CPU seconds of this process (all its threads) and of its children; where the system tells,
    also the event loop's thread alone (`main_thread`: HTTP, hashing, bookkeeping) and the
    kernel's share of the process (`system`: files created, sockets, thread hand-offs)."""
    t = os.times()
    out = {"self": round(t.user + t.system, 3), "children": round(t.children_user + t.children_system, 3),
           "system": round(t.system, 3)}
    try:
        with open(f"/proc/self/task/{threading.main_thread().native_id}/stat") as fh:
            fields = fh.read().rsplit(")", 1)[1].split()
        out["main_thread"] = round((int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK"), 3)
    except (OSError, ValueError, IndexError):
        pass  # not Linux
    return out


def _local_reason(exc: BaseException) -> str:
    """What went wrong on this machine, in words that group rows by cause."""
    if isinstance(exc, OSError) and exc.errno is not None:
        return f"{os.strerror(exc.errno)} (on this machine; the rows were left as they were)"
    return f"{type(exc).__name__} (on this machine; the rows were left as they were)"


