"""The committer: files in place → one commit per batch → database stamp, in that order.

Workers hand it files already renamed into place. It commits them at most `commit_batch` per
commit (sooner after `commit_interval_s`, and on close), and only then turns each into a Change
via a callback handed to the sink. With `durable`, the files and the commit are flushed to
disk (one syncfs) before any row is stamped: a stamp is the point after which a row is never
fetched again, so what it points at must survive a power loss. It holds at most `max_pending` files: `add` registers the
file at once, then waits while the backlog is full, so fetching never runs ahead of committing
(memory stays flat however large the table, and a stop has a bounded backlog to commit). A crash between any two steps leaves a state the next run
repairs: a file in place but uncommitted or unstamped is found on disk, committed and stamped
without another download.
"""

from __future__ import annotations

import asyncio
import dataclasses
import time
from collections.abc import Callable
from dataclasses import dataclass
from datetime import datetime
from typing import Any

import structlog

from . import files
from .db import Change
from .git import GitError, GitRepo
from .sink import Sink
from .unrecorded import Unrecorded

log = structlog.get_logger()


async def close_bounded(committer: Committer, sink: Sink, seconds: float, each: bool = False
                        ) -> list[tuple[str, BaseException]]:
    """Close the committer, then the sink (file → commit → stamp), within `seconds` in all (or
    each, with `each`): a database or git that never answers must not hold a run for ever; what
    is left is repaired by the next run. Returns the parts that failed, with why; never raises."""
    deadline = time.monotonic() + max(seconds, 1.0)
    failed: list[tuple[str, BaseException]] = []
    for name, closing in (("committer", committer.close), ("sink", sink.close)):
        left = max(seconds, 1.0) if each else max(deadline - time.monotonic(), 0.1)
        try:
            await asyncio.wait_for(closing(), left)
        except Exception as exc:  # a timeout, the database refusing, a bug: said, and handed back
            event = "run.close_timeout" if isinstance(exc, TimeoutError) else "run.close_failed"
            log.error(event, part=name, error=f"{type(exc).__name__}: {exc}",
                      waiting=committer.pending + sink.pending, note="the next run repairs what is left")
            failed.append((name, exc))
    return failed


@dataclass(frozen=True)
class PlacedFile:
    artifact_id: str
    rel_path: str
    sha256: str
    size: int
    content_type: str
    fetched_at: datetime
    source: str  # the URL (or location) it came from
    extra: dict[str, Any] | None = None
    data: bytes | None = None  # the bytes placed, when small enough to keep until the commit


class Committer:
    def __init__(self, repo: GitRepo, sink: Sink, batch: int, interval_s: float, run_id: str,
                 stamp: Callable[[PlacedFile, str], Change], what: str = "files", max_pending: int = 0, durable: bool = True,
                 keep_bytes: int = 2 << 20) -> None:
        self._repo = repo
        self._sink = sink
        self._batch = batch
        self._interval = interval_s
        self._run_id = run_id
        self._stamp = stamp
        self._what = what
        self._durable = durable
        self._max_pending = max(max_pending, batch)
        self._pending: list[PlacedFile] = []
        # Bytes of bodies riding along to their commit (PlacedFile.data), at most: beyond, a file
        # goes without and the commit reads it back from disk (checked against its sha256). When
        # commits lag (a big repository) the backlog grows to max_pending files; their bodies
        # must not make the job's memory grow with it.
        self._keep_max = keep_bytes
        self._kept = 0
        self._wake = asyncio.Event()
        self._room = asyncio.Condition()
        self._lock = asyncio.Lock()
        self._task: asyncio.Task[None] | None = None
        self._closing = False
        self.commits = 0
        self.committed_files = 0
        self.failed_files = 0
        self.failed_ids: set[str] = set()  # rows whose file could not be committed (left unstamped)
        self.unrecorded = Unrecorded()

    def start(self) -> None:
        self._task = asyncio.create_task(self._loop(), name="committer")

    async def add(self, placed: PlacedFile) -> None:
        """Register a placed file, then wait while the backlog is full. The file is registered
        before the wait, so a caller cancelled while waiting loses nothing."""
        if placed.data is not None:
            if self._kept + len(placed.data) > self._keep_max:
                placed = dataclasses.replace(placed, data=None)
            else:
                self._kept += len(placed.data)
        self._pending.append(placed)
        if len(self._pending) >= self._batch:
            self._wake.set()
        if len(self._pending) > self._max_pending and not self._closing:
            async with self._room:
                await self._room.wait_for(lambda: len(self._pending) <= self._max_pending or self._closing)

    async def _made_room(self) -> None:
        async with self._room:
            self._room.notify_all()

    @property
    def pending(self) -> int:
        return len(self._pending)

    async def _loop(self) -> None:
        while not self._closing:
            timed_out = False
            try:
                await asyncio.wait_for(self._wake.wait(), self._interval)
            except TimeoutError:
                timed_out = True
            self._wake.clear()
            # Woken by a full batch: commit full batches only; the rest waits for the interval.
            try:
                await self.commit_pending(full_only=not timed_out and not self._closing)
            except Exception as exc:  # never the end of the loop: workers wait on it for room
                log.error("committer.error", error=f"{type(exc).__name__}: {exc}")

    async def commit_pending(self, full_only: bool = False, everything: bool = False) -> None:
        """Commit what is waiting now: full batches only, or all of it. Files that arrive while
        committing wait for their own batch or the next interval (unless `everything`).
        Up to a backlog's worth of batches go to git together: one commit each, published, flushed
        to disk and stamped together (fewer packs, one disk flush)."""
        async with self._lock:
            waiting = len(self._pending)
            while self._pending and (everything or waiting > 0):
                group: list[list[PlacedFile]] = []
                while self._pending and len(group) * self._batch < self._max_pending:
                    if full_only and len(self._pending) < self._batch:
                        break
                    batch = self._pending[: self._batch]
                    del self._pending[: len(batch)]
                    waiting -= len(batch)
                    group.append(batch)
                if not group:
                    break
                try:
                    await self._commit(group)
                finally:
                    self._kept -= sum(len(p.data) for batch in group for p in batch if p.data is not None)
                await self._made_room()

    async def _commit(self, group: list[list[PlacedFile]]) -> None:
        # One path may be placed twice in a batch only if two rows share it; commit it once.
        batches = [sorted({p.rel_path for p in batch}) for batch in group]
        messages = [f"crawler: add {len(paths)} {self._what} (run {self._run_id})" for paths in batches]
        files_in = sum(len(batch) for batch in group)
        t0 = time.monotonic()
        try:
            # A path placed twice (two rows sharing it) holds what was placed last: its bytes, or
            # read back from disk, which must still be the content its row will be stamped with.
            last = {p.rel_path: p for batch in group for p in batch}
            known = {path: p.data for path, p in last.items() if p.data is not None}
            expected = {path: p.sha256 for path, p in last.items() if p.data is None and p.sha256}
            self._repo.index_s = 0.0
            commits = await self._repo.commit_batches(list(zip(batches, messages)), known, expected)
            t1 = time.monotonic()
            if self._durable:
                await files.sync_to_disk([self._repo.root, await self._repo.git_dir()])
        except Exception as exc:  # git, the disk, or a bug: never the end of the committer
            # Files stay in place; their rows stay unstamped and the next run commits them.
            self.failed_files += files_in
            self.failed_ids.update(p.artifact_id for batch in group for p in batch)
            error = str(exc) if isinstance(exc, (GitError, OSError)) else f"{type(exc).__name__}: {exc}"
            log.error("batch.commit_failed", files=files_in, error=error)
            self.unrecorded.add("commit", error, [p.artifact_id for batch in group for p in batch])
            return
        finally:
            for warning in self._repo.warnings:
                log.warning("repo.warning", error=warning)
            self._repo.warnings.clear()
        t2 = time.monotonic()
        refused = self._repo.refused
        # Stamps go to the sink, which writes them in its own batches: the next commit need not
        # wait for this one's database round trip (the order file → commit → stamp holds per row).
        for batch, commit in zip(group, commits):
            for placed in batch:
                if placed.rel_path in refused:  # left out of the commit: not stamped, retried next run
                    self.failed_files += 1
                    self.failed_ids.add(placed.artifact_id)
                    log.error("batch.file_refused", artifact_id=placed.artifact_id, path=placed.rel_path,
                              error=refused[placed.rel_path])
                    self.unrecorded.add("commit", "a file left out of its commit (see batch.file_refused in the log)",
                                        [placed.artifact_id])
                    continue
                self.committed_files += 1
                self._sink.record(self._stamp(placed, commit))
        self.commits += len(set(filter(None, commits)))
        self._sink.wake()
        # Where the time goes (git, the disk flush; shared by the commits made together): what to
        # tune when commits lag.
        timing = {"git_ms": round(1000 * (t1 - t0)), "index_ms": round(1000 * self._repo.index_s),
                  "sync_ms": round(1000 * (t2 - t1)), "together": len(commits)}
        for paths, commit in zip(batches, commits):
            log.info("batch.committed", commit=commit, files=len(paths), **timing)

    async def close(self) -> None:
        # Stop the loop between batches, never inside one: a batch cut off mid-write would
        # only be repaired by the next run.
        self._closing = True
        self._wake.set()
        await self._made_room()  # nobody waits for room on the way out
        if self._task is not None:
            await self._task
            self._task = None
        await self.commit_pending(everything=True)
        try:
            await self._repo.close()
        except (GitError, OSError) as exc:  # commits are made and the index knows them
            log.error("repo.close_failed", error=str(exc))
