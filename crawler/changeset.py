"""Changesets: row changes written to a file instead of the database (CONTRACT.md §2).

For a database that may only be read (a frozen one, changed only by a reviewed "read-only
repair"), a run with `--changeset FILE` hands its row changes to a `ChangesetWriter` instead of
the database: one JSON line per change, appended and flushed to disk before the run counts it
written, in the order the file's crash-safety needs (file in place → commit → line).

    {"artifact_id": "...", "before": {"file_path": null, "metadata": {"file_sha256": null}},
     "after": {"file_path": "figures/...", "metadata": {"file_sha256": "..."}},
     "outcome": "fetched", "run_id": "...", "change_id": "...", "at": "..."}

`before` and `after` hold the columns the change touches and, under `metadata`, the keys it
touches; a key absent before is null in `before`. `after` is computed exactly as the database
would (crawler/sql/queries.py APPLY_CHANGES): keys merged, a counter bumped from its value, the
file path set only when the change names one. `crawler apply` checks `before` against the row
and writes `after` through the journal.
"""

from __future__ import annotations

import array
import fcntl
import hashlib
import json
import math
import os
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

from .db import Change, Database, to_json
from .sink import iso, utcnow


class ChangesetError(Exception):
    """The file is not a changeset; str() is one line naming the file and line."""


def _key(artifact_id: str) -> int:
    return int.from_bytes(hashlib.blake2b(artifact_id.encode("utf-8", "surrogatepass"), digest_size=8).digest(), "big")


def bumped(old: Any) -> int:
    """A counter's next value, as APPLY_CHANGES computes it: garbage restarts at 1."""
    if isinstance(old, (int, float)) and not isinstance(old, bool) and math.isfinite(old) and 0 <= old <= 1_000_000_000:
        return 1 + math.floor(old)
    return 1


def before_after(file_path: str | None, metadata: Any, change: Change) -> tuple[dict[str, Any], dict[str, Any]] | None:
    """The change's `before` and `after` against a row as it stands (None: the row's metadata
    is not an object, which the database would not update either)."""
    if not isinstance(metadata, dict):
        return None
    after_meta = dict(change.patch)
    if change.bump_key is not None:
        after_meta[change.bump_key] = bumped(metadata.get(change.bump_key))
    before: dict[str, Any] = {"metadata": {k: metadata.get(k) for k in after_meta}}
    after: dict[str, Any] = {"metadata": after_meta}
    if change.file_path is not None:
        before["file_path"] = file_path
        after["file_path"] = change.file_path
    return before, after


def same(a: Any, b: Any) -> bool:
    """JSON equality that tells true from 1 (Python's == does not)."""
    if isinstance(a, bool) or isinstance(b, bool):
        return isinstance(a, bool) and isinstance(b, bool) and a == b
    if isinstance(a, dict) and isinstance(b, dict):
        return a.keys() == b.keys() and all(same(a[k], b[k]) for k in a)
    if isinstance(a, list) and isinstance(b, list):
        return len(a) == len(b) and all(same(x, y) for x, y in zip(a, b))
    return type(a) in (int, float) and type(b) in (int, float) and a == b or a == b


def differs(file_path: str | None, metadata: Any, values: dict[str, Any]) -> list[str]:
    """The columns and metadata keys (as `metadata.<key>`) of a row that differ from `values`
    (a changeset's `before` or `after`); a key absent from the row is null."""
    out = []
    if "file_path" in values and file_path != values["file_path"]:
        out.append("file_path")
    meta = metadata if isinstance(metadata, dict) else {}
    for k, v in (values.get("metadata") or {}).items():
        if not same(meta.get(k), v):
            out.append(f"metadata.{k}")
    return out


class ChangesetFile:
    """One changeset on disk: the ids it holds (to resume), appended to line by line."""

    def __init__(self, path: Path, repair: bool = True, optional: bool = False) -> None:
        """`repair`: a run that appends to it. It holds the file locked until `release()` (two
        runs writing one changeset would both fetch every row), and cuts off a last line a
        crash left unfinished. Otherwise (apply, a plan) the file is only read, and must exist
        unless `optional`."""
        self.path = path
        self._keys = array.array("Q")
        self.lines = 0
        self._lock_fd: int | None = None
        if not repair and not path.is_file() and not (optional and not path.exists()):
            raise ChangesetError(f"{path}: no such changeset file")
        if repair:
            try:
                self._lock_fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
            except OSError as exc:
                raise ChangesetError(f"{path}: cannot open the changeset: {exc.strerror or exc}") from None
            try:
                fcntl.flock(self._lock_fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except OSError:
                self.release()
                raise ChangesetError(f"{path}: another run is writing this changeset (one run at a time)") from None
        if path.exists():
            if not path.is_file():
                raise ChangesetError(f"{path}: not a file")
            keys = []
            for line_no, entry in self._read(repair=repair):
                keys.append(_key(entry["artifact_id"]))
                self.lines = line_no
            keys.sort()
            self._keys = array.array("Q", keys)  # 8 bytes a row: a million rows in 8 MB

    def _read(self, repair: bool = False) -> Iterator[tuple[int, dict[str, Any]]]:
        with open(self.path, "rb") as fh:
            line_no, at = 0, 0
            for raw in fh:
                if not raw.endswith(b"\n"):  # a line a crash cut short: it was never counted written
                    if repair:
                        fh.close()
                        os.truncate(self.path, at)
                    return
                line_no += 1
                at += len(raw)
                if not raw.strip():
                    continue
                yield line_no, parse_line(raw, self.path, line_no)

    def release(self) -> None:
        if self._lock_fd is not None:
            os.close(self._lock_fd)
            self._lock_fd = None

    def entries(self) -> Iterator[dict[str, Any]]:
        if not self.path.exists():  # a run with a new changeset: nothing yet
            return
        for _line_no, entry in self._read():
            yield entry

    def holds(self, artifact_id: str) -> bool:
        """Whether the file had a line for this row when opened (a 64-bit hash of the id: a
        false yes, one in 10^12 at a million rows, only leaves that row for a later run)."""
        k = _key(artifact_id)
        lo, hi = 0, len(self._keys)
        while lo < hi:
            mid = (lo + hi) // 2
            if self._keys[mid] < k:
                lo = mid + 1
            else:
                hi = mid
        return lo < len(self._keys) and self._keys[lo] == k

    def append(self, entries: Sequence[dict[str, Any]]) -> None:
        """Lines on disk (flushed and synced) before this returns: then they count as written."""
        data = "".join(to_json(e) + "\n" for e in entries).encode("utf-8")
        fd = os.open(self.path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
        try:
            size = os.fstat(fd).st_size
            try:
                view = memoryview(data)
                while view:
                    view = view[os.write(fd, view):]
                os.fsync(fd)
            except BaseException:
                # Part of a line (a full disk): cut back, so the batch sent again follows a whole
                # line, not a fragment that would make the file unreadable.
                os.ftruncate(fd, size)
                raise
        finally:
            os.close(fd)
        self.lines += len(entries)


def parse_line(raw: bytes, path: Path, line_no: int) -> dict[str, Any]:
    try:
        entry = json.loads(raw)
    except ValueError as exc:
        raise ChangesetError(f"{path} line {line_no}: not JSON ({exc})") from None
    if not (isinstance(entry, dict) and isinstance(entry.get("artifact_id"), str)
            and isinstance(entry.get("before"), dict) and isinstance(entry.get("after"), dict)):
        raise ChangesetError(f"{path} line {line_no}: not a changeset line (artifact_id, before and after)")
    for side in ("before", "after"):
        values = entry[side]
        if not isinstance(values.get("metadata", {}), dict) or set(values) - {"file_path", "metadata"}:
            raise ChangesetError(f"{path} line {line_no}: {side} may hold only file_path and metadata")
        if "file_path" in values and not isinstance(values["file_path"], (str, type(None))):
            raise ChangesetError(f"{path} line {line_no}: {side}.file_path is not text")
    if ("file_path" in entry["before"]) != ("file_path" in entry["after"]) or \
            set(entry["before"].get("metadata", {})) != set(entry["after"].get("metadata", {})):
        raise ChangesetError(f"{path} line {line_no}: before and after name different columns or keys")
    return entry


class ChangesetWriter:
    """In place of the database for the sink: each batch's rows are read (read-only), their
    before and after computed, and the lines appended. With `overlay`, rows this changeset
    already changed are taken as changed (the recovery job may change a row twice)."""

    def __init__(self, db: Database, file: ChangesetFile, overlay: dict[str, dict[str, Any]] | None = None) -> None:
        self._db = db
        self.file = file
        self.overlay = overlay

    async def apply_changes(self, run_id: str, changes: Sequence[Change]) -> int:
        if not changes:
            return 0
        rows = await self._db.rows_by_id(sorted({c.artifact_id for c in changes}))
        if self.overlay is not None:
            rows = {k: with_overlay(r, self.overlay.get(k)) for k, r in rows.items()}
        entries = []
        at = iso(utcnow())
        for c in changes:
            row = rows.get(c.artifact_id)
            if row is None:
                continue
            pair = before_after(row["file_path"], row["metadata"], c)
            if pair is None:
                continue
            before, after = pair
            entries.append({"artifact_id": c.artifact_id, "before": before, "after": after, "outcome": c.outcome,
                            "run_id": run_id, "change_id": c.change_id, "at": at, "detail": c.detail or {}})
            rows[c.artifact_id] = with_overlay(row, after)
            if self.overlay is not None:
                merge_into(self.overlay.setdefault(c.artifact_id, {"metadata": {}}), after)
        if entries:
            self.file.append(entries)
        return len(entries)


def overlay_of(file: ChangesetFile, ids: set[str]) -> dict[str, dict[str, Any]]:
    """What the changeset's lines change of these rows: {id: {"file_path"?, "metadata": {...}}},
    later lines over earlier ones."""
    out: dict[str, dict[str, Any]] = {}
    for entry in file.entries():
        if entry["artifact_id"] in ids:
            merge_into(out.setdefault(entry["artifact_id"], {"metadata": {}}), entry["after"])
    return out


def merge_into(overlay: dict[str, Any], after: dict[str, Any]) -> None:
    if "file_path" in after:
        overlay["file_path"] = after["file_path"]
    overlay["metadata"].update(after.get("metadata", {}))


def with_overlay(row: dict[str, Any], overlay: dict[str, Any] | None) -> dict[str, Any]:
    """A row ({"file_path", "metadata", ...}) as it stands once `overlay` is applied."""
    if not overlay or not isinstance(row.get("metadata"), dict):
        return row
    return {**row, "file_path": overlay.get("file_path", row["file_path"]),
            "metadata": {**row["metadata"], **overlay.get("metadata", {})}}
