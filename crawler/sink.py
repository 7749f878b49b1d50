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
from collections.abc import Callable
from datetime import UTC, datetime, timedelta
from typing import Any

import structlog

from . import redact
from .db import Change, Database
from .unrecorded import Unrecorded

log = structlog.get_logger()


def asyncpg_errors() -> tuple[type[BaseException], ...]:
    """Errors that belong to the data, not the connection (a lost connection is retried whole)."""
    from .db import DataError
    return (DataError,)


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
    def __init__(self, db: Database, run_id: str, flush_rows: int, flush_interval_s: float,
                 on_written: Callable[[list[Change]], None] | None = None) -> None:
        self._db = db
        self._run_id = run_id
        self._flush_rows = flush_rows
        self._interval = flush_interval_s
        self._buffer: list[Change] = []
        self._lock = asyncio.Lock()
        self._wake = asyncio.Event()
        self._task: asyncio.Task[None] | None = None
        self._closing = False
        self._on_written = on_written
        self.written = 0
        self.refused: list[str] = []
        self.unrecorded = Unrecorded()

    def start(self) -> None:
        self._task = asyncio.create_task(self._loop(), name="sink")

    def record(self, change: Change) -> None:
        self._buffer.append(change)
        if len(self._buffer) >= self._flush_rows:
            self._wake.set()

    def wake(self) -> None:
        """Write what is buffered now rather than at the next interval."""
        self._wake.set()

    async def _loop(self) -> None:
        while not self._closing:
            try:
                await asyncio.wait_for(self._wake.wait(), self._interval)
            except TimeoutError:
                pass
            self._wake.clear()
            try:
                await self.flush()
            except Exception as exc:  # keep the buffer; the next flush tries again
                log.error("sink.write_failed", error=str(exc), waiting=len(self._buffer))

    async def flush(self) -> None:
        async with self._lock:
            while self._buffer:
                batch = self._buffer[: self._flush_rows]
                try:
                    await self._db.apply_changes(self._run_id, batch)
                except asyncpg_errors() as exc:
                    # One row the database refuses must not hold back every outcome behind it:
                    # write the batch row by row and set aside only the row that fails.
                    log.error("sink.batch_failed", rows=len(batch), error=str(exc))
                    batch = await self._one_by_one(batch)
                del self._buffer[: len(batch)]
                self.written += len(batch)
                if self._on_written is not None:
                    self._on_written(batch)

    async def _one_by_one(self, batch: list[Change]) -> list[Change]:
        for change in batch:
            try:
                await self._db.apply_changes(self._run_id, [change])
            except asyncpg_errors() as exc:
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
        # Stop the loop between batches, never inside one: a batch cut off mid-write would
        # only be repaired by the next run.
        self._closing = True
        self._wake.set()
        if self._task is not None:
            await self._task
            self._task = None
        await self.flush()
