"""The sink: the one path that writes artifact rows, and the only place that knows the contract's
metadata keys (CONTRACT.md §1).

Pipelines hand it outcomes; it turns each into a `Change` (keys to merge, file_path, counter to
bump), buffers them, and writes a batch in one round trip and one transaction, journalled
before/after in the tool's schema. A batch goes out when `flush_rows` are waiting or the oldest
has waited `flush_interval_s`, and always on `close()`. A failed write is retried on the next
flush; nothing is dropped while the process lives, and a crash loses only unwritten outcomes,
whose rows the next run simply takes again.
"""

from __future__ import annotations

import asyncio
import itertools
import secrets
from collections.abc import Callable
from dataclasses import replace
from datetime import UTC, datetime, timedelta
from typing import Any

import structlog

from . import redact
from .db import Change, Database, DatabaseError, DataError, is_connection_error
from .unrecorded import Unrecorded

log = structlog.get_logger()


def iso(dt: datetime) -> str:
    """ISO-8601 UTC with a Z, second precision: sorts as text, as the queue query relies on."""
    return dt.astimezone(UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def utcnow() -> datetime:
    return datetime.now(UTC)


# -- the contract's keys, figure job ---------------------------------------------------------------

def figure_fetched(artifact_id: str, file_path: str, sha256: str, size: int, content_type: str,
                   commit: str, fetched_at: datetime, url: str) -> Change:
    return Change(artifact_id, "fetched", file_path=file_path, bump_key="image_fetch_attempts", patch={
        "file_sha256": sha256, "file_size_bytes": size, "file_content_type": content_type,
        "file_fetched_at": iso(fetched_at), "file_commit": commit,
        "image_fetch_outcome": "fetched", "image_last_attempt_at": iso(fetched_at),
    }, detail={"url": redact.url(url)})


def figure_hard_404(artifact_id: str, status: int, at: datetime, url: str,
                    blocked_by: str | None = None) -> Change:
    detail: dict[str, Any] = {"url": redact.url(url), "status": status}
    if blocked_by:
        detail["blocked_by"] = redact.url(blocked_by)
    return Change(artifact_id, "hard_404", bump_key="image_fetch_attempts", patch={
        "image_unavailable": True, "image_404_at": iso(at), "image_http_status": status,
        "image_fetch_outcome": "hard_404", "image_last_attempt_at": iso(at),
    }, detail=detail)


def figure_retryable(artifact_id: str, outcome: str, error: str, at: datetime, url: str,
                     next_attempt_at: datetime | None, status: int | None = None) -> Change:
    """A transient or failed attempt; never `image_unavailable`."""
    assert outcome in ("transient", "failed")
    patch: dict[str, Any] = {
        "image_fetch_outcome": outcome, "image_last_attempt_at": iso(at), "image_last_error": error,
    }
    if next_attempt_at is not None:
        patch["image_next_attempt_at"] = iso(next_attempt_at)
    if status is not None:
        patch["image_http_status"] = status
    return Change(artifact_id, outcome, patch=patch, bump_key="image_fetch_attempts",
                  detail={"url": redact.url(url), "error": error})


def transient_next_attempt(at: datetime, retry_after_s: float) -> datetime:
    return at + timedelta(seconds=retry_after_s)


# -- the contract's keys, recovery job -------------------------------------------------------------

def file_bound(artifact_id: str, file_path: str, sha256: str, size: int, source: str, confidence: str,
               commit: str, at: datetime, approved: bool = False) -> Change:
    patch: dict[str, Any] = {
        "file_sha256": sha256, "file_size_bytes": size, "file_bound_at": iso(at),
        "file_bind_source": source, "file_bind_confidence": confidence, "file_commit": commit,
    }
    if approved:
        patch["file_bind_approved"] = True
    return Change(artifact_id, "bound", patch=patch, file_path=file_path,
                  detail={"source": source, "confidence": confidence})


def file_unrecoverable(artifact_id: str, reason: str) -> Change:
    return Change(artifact_id, "unrecoverable",
                  patch={"file_unrecoverable": True, "file_unrecoverable_reason": reason}, detail={"reason": reason})


# -- the writer ------------------------------------------------------------------------------------

class Sink:
    """Buffers changes and writes them in journalled batches. While the database cannot be
    reached, writes are kept and sent again with back-off, and `healthy` is cleared so the job
    stops taking rows; past `outage_max_s` it calls `on_outage_over` once with a one-line reason.
    Every change gets an id, so a batch sent again after a lost answer is written once."""

    def __init__(self, db: Database, run_id: str, flush_rows: int, flush_interval_s: float,
                 on_written: Callable[[list[Change]], None] | None = None, outage_max_s: float = float("inf"),
                 on_outage_over: Callable[[str], None] | None = None, writer: Any = None) -> None:
        # Where batches go: the database, or (a read-only repair) a changeset file that has the
        # same apply_changes(run_id, changes) (crawler/changeset.py).
        self._writer = writer if writer is not None else db
        self._run_id = run_id
        self._flush_rows = flush_rows
        self._interval = flush_interval_s
        self._buffer: list[Change] = []
        self._lock = asyncio.Lock()
        self._wake = asyncio.Event()
        self._task: asyncio.Task[None] | None = None
        self._closing = False
        self._on_written = on_written
        self._ids = itertools.count()
        # Unique to this process: the processes of one --workers run share its run id, and a
        # change id met twice is taken for a batch sent again (written once).
        self._id_prefix = f"{run_id}:{secrets.token_hex(4)}"
        self.outage_max_s = outage_max_s
        self._on_outage_over = on_outage_over
        self.healthy = asyncio.Event()  # cleared while the database cannot be written
        self.healthy.set()
        self.down_since: float | None = None
        self.failed: str | None = None  # the outage outlasted outage_max_s: why, in one line
        self._backoff = BACKOFF_FIRST_S
        self.written = 0
        self.refused: list[str] = []
        self.unrecorded = Unrecorded()

    def start(self) -> None:
        self._task = asyncio.create_task(self._loop(), name="sink")

    def record(self, change: Change) -> None:
        self._buffer.append(replace(change, change_id=f"{self._id_prefix}:{next(self._ids)}"))
        if len(self._buffer) >= self._flush_rows:
            self._wake.set()

    def wake(self) -> None:
        """Write what is buffered now rather than at the next interval."""
        self._wake.set()

    async def _loop(self) -> None:
        while not self._closing:
            wait = self._interval if self.down_since is None else self._backoff
            try:
                await asyncio.wait_for(self._wake.wait(), wait)
            except TimeoutError:
                pass
            self._wake.clear()
            try:
                await self.flush()
            except Exception as exc:  # keep the buffer; the next flush tries again
                if not is_connection_error(exc):  # the server's disk full, read-only after a failover...
                    log.error("sink.write_failed", error=f"{type(exc).__name__}: {exc}", waiting=len(self._buffer))
                # Whatever the cause, outcomes that cannot be written pause the job and run the
                # outage clock: fetching on would spend the budgets on rows that cannot be recorded.
                self.went_down(exc)

    def went_down(self, exc: BaseException) -> None:
        """The database could not be reached: say so once, pause the job, count the outage."""
        now = asyncio.get_running_loop().time()
        if self.down_since is None:
            self.down_since = now
            self._backoff = BACKOFF_FIRST_S
            self.healthy.clear()
            log.error("db.unavailable", error=f"{type(exc).__name__}: {exc}", waiting=len(self._buffer),
                      note=f"fetching paused; writes kept and sent again for up to {self.outage_max_s:.0f} s")
        else:
            self._backoff = min(self._backoff * 2, BACKOFF_MAX_S)
        if now - self.down_since > self.outage_max_s and self.failed is None:
            self.failed = (f"the database has been unreachable for over {self.outage_max_s:.0f} s "
                           f"({type(exc).__name__}: {exc}); stopped (run again once it is back)")
            if self._on_outage_over is not None:
                self._on_outage_over(self.failed)

    @property
    def backoff_s(self) -> float:
        """How long to wait before asking the database again, while it is away."""
        return self._backoff

    def came_back(self) -> None:
        if self.down_since is not None:
            log.warning("db.back", after_s=round(asyncio.get_running_loop().time() - self.down_since, 1), waiting=len(self._buffer))
            self.down_since = None
            self.healthy.set()

    async def flush(self) -> None:
        async with self._lock:
            wrote = False
            while self._buffer:
                batch = self._buffer[: self._flush_rows]
                try:
                    await self._writer.apply_changes(self._run_id, batch)
                except DataError as exc:
                    # One row the database refuses must not hold back every outcome behind it:
                    # write the batch row by row and set aside only the row that fails.
                    log.error("sink.batch_failed", rows=len(batch), error=str(exc))
                    batch = await self._one_by_one(batch)
                del self._buffer[: len(batch)]
                self.written += len(batch)
                wrote = True
                if self._on_written is not None:
                    self._on_written(batch)
            if wrote:  # only a real round trip says the database is back (an empty flush says nothing)
                self.came_back()

    async def _one_by_one(self, batch: list[Change]) -> list[Change]:
        for change in batch:
            try:
                await self._writer.apply_changes(self._run_id, [change])
            except DataError as exc:
                self.refused.append(change.artifact_id)
                log.error("row.write_refused", artifact_id=change.artifact_id, outcome=change.outcome,
                          error=str(exc), note="left as it was; the next run takes it again")
                self.unrecorded.add("database", f"the database refused the row's {change.outcome} outcome: {exc}",
                                    [change.artifact_id])
        return batch

    @property
    def pending(self) -> int:
        return len(self._buffer)

    async def close(self) -> None:
        """Write what is left. While the database is away this keeps trying, until the outage
        passes outage_max_s (then DatabaseError); the caller bounds how long it waits."""
        # Stop the loop between batches, never inside one: a batch cut off mid-write would
        # only be repaired by the next run.
        self._closing = True
        self._wake.set()
        if self._task is not None:
            await self._task
            self._task = None
        while True:
            try:
                await self.flush()
                return
            except Exception as exc:
                self.went_down(exc)
                if self.failed is not None:
                    raise DatabaseError(f"{len(self._buffer)} outcomes could not be written: {self.failed}") from None
                await asyncio.sleep(self._backoff)


BACKOFF_FIRST_S = 0.25  # the first wait before writing again after the database went away
BACKOFF_MAX_S = 5.0
