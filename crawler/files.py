"""File-system steps: temporary files beside their target, atomic placement, hashing.

A body is streamed into `.crawler-<stem>-<token>.part` in the target's directory (same file
system, so the rename is atomic), then renamed over the final name: a reader never sees a
partial file under a canonical name, and a crash leaves at most a `.part` file that
`remove_stale_parts` clears. Durability is not bought file by file: `sync_to_disk` flushes
the whole file system once per commit batch, after the commit and before the rows are stamped
(see committer.py), which covers the files, their directory entries and git's objects and ref
at the cost of one flush instead of one journal commit per file. Blocking calls run in worker
threads, off the event loop.
"""

from __future__ import annotations

import asyncio
import atexit
import contextlib
import hashlib
import itertools
import os
import queue
import re
import socket
import stat
import threading
import time
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any, TypeVar

import aiofiles

from . import native

PART_PREFIX = ".crawler-"
PART_SUFFIX = ".part"
# Unique per machine, process and call: a `.part` name only has to differ from its neighbours'
# (several processes, on several machines, may write one folder), so a counter beats a random
# token. The machine and process in the name say whose it is: see remove_stale_parts.
_PART_IDS = itertools.count()
def _machine() -> str:
    """This machine's name, and its process-id namespace: containers may share a host name
    while each counts processes from 1, and a process id means something only within one."""
    name = re.sub(r"[^A-Za-z0-9.+-]+", "_", socket.gethostname())[:64] or "unknown"
    try:
        space = os.readlink("/proc/self/ns/pid").split("[", 1)[1].rstrip("]")
    except (OSError, IndexError):
        return name
    return f"{name}.{space}"


_MACHINE = _machine()
_PID = [os.getpid()]  # in every .part name: asked once (getpid is a system call), again after a fork
os.register_at_fork(after_in_child=lambda: _PID.__setitem__(0, os.getpid()))
STALE_PART_AGE_S = 86400  # another machine's leftover is removed once this old
T = TypeVar("T")


_Work = tuple[asyncio.AbstractEventLoop, asyncio.Future[Any], Callable[[], Any]]


class Placers:
    """Threads that place files, handed work through a plain queue: one file a row, and asyncio's
    run_in_executor (a concurrent.futures future chained to the loop's, a lock and a condition
    each) cost the event loop about 25 µs a hop against 8 here. Threads of their own: never
    queued behind other blocking work (hashing, git reads), and no more of them than cores, as
    creating files in one folder serialises in the kernel anyway (more threads only spin on the
    folder's lock). Started on first use (again in a forked child); at the process's exit the
    placements already handed over are finished first (`drain`), as an executor's would be: a
    file placed but not committed is adopted by the next run, where one dropped is fetched again."""

    def __init__(self, threads: int) -> None:
        self._count = threads
        self._queue: queue.SimpleQueue[_Work | None] | None = None
        self._threads: list[threading.Thread] = []

    def forget(self) -> None:
        """After a fork: the threads stayed in the parent."""
        self._queue, self._threads = None, []

    def run(self, fn: Callable[[], T]) -> asyncio.Future[T]:
        """`fn()` in a placer thread; its result (or exception) on the running loop."""
        loop = asyncio.get_running_loop()
        if self._queue is None:
            work: queue.SimpleQueue[_Work | None] = queue.SimpleQueue()
            threads = [threading.Thread(target=self._serve, args=(work,), name=f"place-{k}", daemon=True)
                       for k in range(self._count)]
            for t in threads:  # (one that cannot start raises here, before any work is queued)
                t.start()
            self._queue, self._threads = work, threads
        future: asyncio.Future[T] = loop.create_future()
        self._queue.put((loop, future, fn))
        return future

    def drain(self, timeout_s: float = 60.0) -> None:
        """Finish what was handed over, then let the threads end (at exit; the next `run`
        starts new ones)."""
        work, threads = self._queue, self._threads
        if work is None:
            return
        self._queue, self._threads = None, []
        for _ in threads:
            work.put(None)
        deadline = time.monotonic() + timeout_s
        for t in threads:
            t.join(max(0.0, deadline - time.monotonic()))

    @staticmethod
    def _serve(work: queue.SimpleQueue[_Work | None]) -> None:
        while True:
            item = work.get()
            if item is None:
                return
            loop, future, fn = item
            try:
                result, error = fn(), None
            except BaseException as exc:  # handed to the awaiting task, as run_in_executor does
                result, error = None, exc
            try:
                loop.call_soon_threadsafe(_settle, future, result, error)
            except RuntimeError:
                pass  # its loop closed meanwhile: no one awaits it any more


def _settle(future: asyncio.Future[Any], result: Any, error: BaseException | None) -> None:
    if future.cancelled():  # the awaiting task was cancelled (a stop): the file is in place all the same
        return
    if isinstance(error, StopIteration):  # a future refuses it (TypeError), and would never settle
        error = RuntimeError(f"StopIteration in a placer thread: {error!r}")
    if error is not None:
        future.set_exception(error)
    else:
        future.set_result(result)


_PLACERS = Placers(2)
os.register_at_fork(after_in_child=_PLACERS.forget)
atexit.register(_PLACERS.drain)


class TempFile:
    """A body on its way to a file, hashed and counted as it is written.

    Held in memory up to `buffer_bytes`, spilled beyond that to `.crawler-<stem>@<machine>@<pid>@<n>.part`
    in `directory`. A small body (most figures) then reaches disk in one worker-thread hop in
    `place_temp` (write, rename) instead of one hop per open, write and close."""

    def __init__(self, directory: Path | str, stem: str, buffer_bytes: int = 0) -> None:
        self._directory = directory  # a Path is made only when the body goes to disk: one a row costs
        self.name = f"{PART_PREFIX}{stem}@{_MACHINE}@{_PID[0]}@{next(_PART_IDS)}{PART_SUFFIX}"
        self.sha256 = hashlib.sha256()
        self.size = 0
        self.buffer_bytes = buffer_bytes
        self.on_disk = False
        self._buffer: list[bytes] = []
        self._fh: aiofiles.threadpool.binary.AsyncBufferedIOBase | None = None

    @property
    def directory(self) -> Path:
        return Path(self._directory)

    @property
    def path(self) -> Path:
        return self.directory / self.name

    async def open(self) -> TempFile:
        return self

    async def write(self, data: bytes) -> None:
        self.sha256.update(data)
        self.size += len(data)
        if not self.on_disk and self.size <= self.buffer_bytes:
            self._buffer.append(data)
            return
        if not self.on_disk:  # the body outgrew the buffer: continue on disk
            await asyncio.to_thread(self.directory.mkdir, parents=True, exist_ok=True)
            self._fh = await aiofiles.open(self.path, "wb")
            self.on_disk = True
            await self._fh.write(b"".join(self._buffer))
            self._buffer = []
        assert self._fh is not None
        await self._fh.write(data)

    async def close(self) -> None:
        """The body is complete."""
        if self._fh is not None:
            fh, self._fh = self._fh, None
            await fh.close()

    def read_range(self, offset: int, length: int) -> bytes:
        """Up to `length` bytes of the body from `offset` (blocking when it is on disk: call from a
        thread then). For format checks that look past the first and last bytes (TIFF)."""
        if offset < 0 or length <= 0:
            return b""
        if not self.on_disk:
            out, at = [], 0
            for piece in self._buffer:
                lo, hi = max(offset - at, 0), min(offset + length - at, len(piece))
                if lo < hi:
                    out.append(piece[lo:hi])
                at += len(piece)
            return b"".join(out)
        return range_reader(self.path)(offset, length)

    async def discard(self) -> None:
        self._buffer = []
        try:
            if self._fh is not None:
                fh, self._fh = self._fh, None
                await fh.close()
        finally:
            if self.on_disk:
                await asyncio.to_thread(self.path.unlink, True)


async def place_temp(temp: TempFile, final: Path | str) -> bytes | None:
    """Put a closed TempFile's body at `final` atomically (temporary file beside it, rename).
    Returns the body when it was held in memory (None when it had spilled to disk). Paths as
    text on this path: pathlib's objects cost more than the rest of placing a small file's Python."""
    data = None if temp.on_disk else b"".join(temp._buffer)
    folder = os.path.dirname(final)

    def _do() -> None:
        if data is None:
            try:
                os.makedirs(folder, exist_ok=True)
                os.replace(temp.path, final)
            except BaseException:
                temp.path.unlink(missing_ok=True)
                raise
            return
        beside = os.path.join(folder, temp.name)
        try:
            fh = open(beside, "wb")
        except FileNotFoundError:  # a new folder: one mkdir then, not one per file
            os.makedirs(folder, exist_ok=True)
            fh = open(beside, "wb")
        try:
            with fh:
                fh.write(data)
            os.replace(beside, final)
        except BaseException:  # a full disk mid-write: no .part left behind
            with contextlib.suppress(FileNotFoundError):
                os.unlink(beside)
            raise

    await _PLACERS.run(_do)
    return data


def _syncfs(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        if not native.syncfs(fd):  # not Linux: flush everything
            os.sync()
    except OSError as exc:
        raise OSError(exc.errno, f"syncfs {path}: {exc.strerror}") from None
    finally:
        os.close(fd)


async def sync_to_disk(paths: Iterable[Path]) -> None:
    """Flush each file system holding one of `paths` to stable storage (once per file system).

    One syncfs after a batch of files and their commit costs one journal commit, where an fsync
    per file costs one each; what it flushes besides (other writers' dirty pages) only adds time."""
    def _do() -> None:
        seen: set[int] = set()
        for path in paths:
            dev = os.stat(path).st_dev
            if dev not in seen:
                seen.add(dev)
                _syncfs(path)
    await asyncio.to_thread(_do)


async def copy_hashing(src: Path, dst: Path, chunk: int = 1 << 20) -> tuple[str, int]:
    """Copy a file's bytes (no metadata) in a worker thread; (sha256, size) of the very bytes
    copied, which a file changing meanwhile cannot make differ from what landed."""
    def _do() -> tuple[str, int]:
        h = hashlib.sha256()
        size = 0
        with open(src, "rb") as fin, open(dst, "wb") as fout:
            while block := fin.read(chunk):
                h.update(block)
                fout.write(block)
                size += len(block)
        return h.hexdigest(), size
    return await asyncio.to_thread(_do)


async def place(temp: Path, final: Path) -> None:
    """Rename `temp` over `final` (atomic on one file system), creating the directory."""
    def _do() -> None:
        final.parent.mkdir(parents=True, exist_ok=True)
        os.replace(temp, final)
    await asyncio.to_thread(_do)


def _hash(path: Path, head_bytes: int, chunk: int, tail_bytes: int = 0) -> tuple[str, int, bytes, bytes]:
    h = hashlib.sha256()
    size = 0
    head = tail = b""
    with open(path, "rb") as fh:
        while block := fh.read(chunk):
            if len(head) < head_bytes:
                head += block[: head_bytes - len(head)]
            if tail_bytes:
                tail = (tail + block)[-tail_bytes:]
            h.update(block)
            size += len(block)
    return h.hexdigest(), size, head, tail


async def hash_file(path: Path, head_bytes: int = 1024, chunk: int = 1 << 20) -> tuple[str, int, bytes]:
    """(sha256 hex, size, first `head_bytes`) of a file, read in a worker thread."""
    sha, size, head, _ = await asyncio.to_thread(_hash, path, head_bytes, chunk)
    return sha, size, head


async def hash_file_ends(path: Path, head_bytes: int = 1024, tail_bytes: int = 64) -> tuple[str, int, bytes, bytes]:
    """(sha256 hex, size, first `head_bytes`, last `tail_bytes`) of a file, in a worker thread."""
    return await asyncio.to_thread(_hash, path, head_bytes, 1 << 20, tail_bytes)


def range_reader(path: Path) -> Callable[[int, int], bytes]:
    """(offset, length) -> up to that many bytes of the file at `path` (blocking)."""
    def read(offset: int, length: int) -> bytes:
        if offset < 0 or length <= 0:
            return b""
        with open(path, "rb") as fh:
            fh.seek(offset)
            return fh.read(length)
    return read


async def look(root: Path, rows: list[tuple[str | None, list[str]]]) -> tuple[list[bool], list[str | None]]:
    """For each (recorded path, candidate paths): whether the recorded path is a regular file
    under root, and the first candidate that is. One thread hop for a whole page of rows; a
    folder that does not exist is looked at once, not once per candidate in it."""
    def _do() -> tuple[list[bool], list[str | None]]:
        folders: dict[str, bool] = {}

        def is_file(rel: str) -> bool:
            folder = os.path.dirname(rel)
            if folder not in folders:
                folders[folder] = os.path.isdir(root / folder)
            return folders[folder] and regular(rel)

        def regular(rel: str) -> bool:
            # A path the system refuses to look at (too long, no permission) counts as absent
            # here; the row then meets the same error where it is handled, alone.
            return _regular(root / rel)

        present = [rec is not None and regular(rec) for rec, _ in rows]
        found = [next((c for c in cands if is_file(c)), None) for _, cands in rows]
        return present, found
    return await asyncio.to_thread(_do)


def _regular(path: Path) -> bool:
    """A regular file itself, not a link to one (which could lead anywhere)."""
    try:
        return stat.S_ISREG(os.lstat(path).st_mode)
    except (OSError, ValueError):
        return False


async def existing(root: Path, rels: list[str]) -> set[str]:
    """Which of these relative paths (already confined to root) are regular files there, not
    links (one thread hop for all)."""
    return await asyncio.to_thread(lambda: {r for r in rels if _regular(root / r)})


def remove_stale_parts(top: Path) -> int:
    """Delete `.crawler-*.part` leftovers of killed runs anywhere under `top`; return how many.
    Other processes may be writing there (cooperating runs): a part is removed only when its
    process, on this machine, is gone, or when it is older than STALE_PART_AGE_S (another
    machine's, one named in an older form, or a process id taken again since)."""
    now = time.time()
    removed = 0
    for dirpath, dirnames, filenames in os.walk(top):
        dirnames[:] = [d for d in dirnames if d != ".git"]
        for name in filenames:
            if not (name.startswith(PART_PREFIX) and name.endswith(PART_SUFFIX)):
                continue
            path = os.path.join(dirpath, name)
            fields = name[len(PART_PREFIX):-len(PART_SUFFIX)].rsplit("@", 3)
            try:
                ours = len(fields) == 4 and fields[1] == _MACHINE and fields[2].isdigit()
                if (not ours or native.process_alive(fields[2])) and now - os.stat(path).st_mtime < STALE_PART_AGE_S:
                    continue
                os.unlink(path)
                removed += 1
            except FileNotFoundError:
                pass  # its writer renamed or removed it meanwhile
    return removed
