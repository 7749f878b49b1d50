"""File-system steps: temporary files beside their target, atomic placement, hashing.

A body is streamed into `.crawler-<stem>-<token>.part` in the target's directory (same file
system, so the rename is atomic), fsynced, then renamed over the final name: a reader never
sees a partial file under a canonical name, and a crash leaves at most a `.part` file that
`remove_stale_parts` clears. Blocking calls run in worker threads, off the event loop.
"""

from __future__ import annotations

import asyncio
import hashlib
import os
import secrets
from pathlib import Path

import aiofiles

PART_PREFIX = ".crawler-"
PART_SUFFIX = ".part"


class TempFile:
    """A body on its way to a file, hashed and counted as it is written.

    Held in memory up to `buffer_bytes`, spilled beyond that to `.crawler-<stem>-<token>.part`
    in `directory`. A small body (most figures) then reaches disk in one worker-thread hop in
    `place_temp` (write, fsync, rename) instead of one hop per open, write, fsync and close."""

    def __init__(self, directory: Path, stem: str, buffer_bytes: int = 0) -> None:
        self.directory = directory
        self.name = f"{PART_PREFIX}{stem}-{secrets.token_hex(4)}{PART_SUFFIX}"
        self.sha256 = hashlib.sha256()
        self.size = 0
        self.buffer_bytes = buffer_bytes
        self.fsync = False
        self.on_disk = False
        self._buffer: list[bytes] = []
        self._fh: aiofiles.threadpool.binary.AsyncBufferedIOBase | None = None

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

    async def close(self, fsync: bool) -> None:
        """The body is complete; `fsync` says whether placing it must reach the disk first."""
        self.fsync = fsync
        if self._fh is not None:
            fh, self._fh = self._fh, None
            if fsync:
                await fh.flush()
                await asyncio.to_thread(os.fsync, fh.fileno())
            await fh.close()

    async def discard(self) -> None:
        self._buffer = []
        try:
            if self._fh is not None:
                fh, self._fh = self._fh, None
                await fh.close()
        finally:
            if self.on_disk:
                await asyncio.to_thread(self.path.unlink, True)


async def place_temp(temp: TempFile, final: Path) -> None:
    """Put a closed TempFile's body at `final` atomically (temporary file beside it, rename)."""
    data = None if temp.on_disk else b"".join(temp._buffer)

    def _do() -> None:
        final.parent.mkdir(parents=True, exist_ok=True)
        if data is None:
            os.replace(temp.path, final)
            return
        beside = final.parent / temp.name
        with open(beside, "wb") as fh:
            fh.write(data)
            if temp.fsync:
                fh.flush()
                os.fsync(fh.fileno())
        os.replace(beside, final)

    await asyncio.to_thread(_do)


async def copy(src: Path, dst: Path) -> None:
    """Copy a file's bytes (no metadata) in a worker thread."""
    import shutil
    await asyncio.to_thread(shutil.copyfile, src, dst)


async def place(temp: Path, final: Path) -> None:
    """Rename `temp` over `final` (atomic on one file system), creating the directory."""
    def _do() -> None:
        final.parent.mkdir(parents=True, exist_ok=True)
        os.replace(temp, final)
    await asyncio.to_thread(_do)


def _hash(path: Path, head_bytes: int, chunk: int) -> tuple[str, int, bytes]:
    h = hashlib.sha256()
    size = 0
    head = b""
    with open(path, "rb") as fh:
        while block := fh.read(chunk):
            if len(head) < head_bytes:
                head += block[: head_bytes - len(head)]
            h.update(block)
            size += len(block)
    return h.hexdigest(), size, head


async def hash_file(path: Path, head_bytes: int = 1024, chunk: int = 1 << 20) -> tuple[str, int, bytes]:
    """(sha256 hex, size, first `head_bytes`) of a file, read in a worker thread."""
    return await asyncio.to_thread(_hash, path, head_bytes, chunk)


async def first_existing(root: Path, candidates: list[str]) -> str | None:
    """The first relative path among `candidates` that is a regular file under root."""
    def _do() -> str | None:
        for rel in candidates:
            if (root / rel).is_file():
                return rel
        return None
    return await asyncio.to_thread(_do)


async def existing(root: Path, rels: list[str]) -> set[str]:
    """Which of these relative paths are regular files under root (one thread hop for all)."""
    return await asyncio.to_thread(lambda: {r for r in rels if (root / r).is_file()})


def remove_stale_parts(top: Path) -> int:
    """Delete `.crawler-*.part` leftovers of a killed run anywhere under `top`; return how many.

    Call only when no other run writes under `top`."""
    removed = 0
    for dirpath, dirnames, filenames in os.walk(top):
        dirnames[:] = [d for d in dirnames if d != ".git"]
        for name in filenames:
            if name.startswith(PART_PREFIX) and name.endswith(PART_SUFFIX):
                os.unlink(os.path.join(dirpath, name))
                removed += 1
    return removed
