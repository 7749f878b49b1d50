"""A streaming tar scanner: read a (compressed) tarball once, front to back, extracting only the
members a predicate wants into generated file names in a staging directory.

The contract of `scan`:

- Input is an async iterator of byte chunks (an S3 body, a file). It is read exactly once, in
  order, never seeked and never stored whole: memory stays bounded by `queue_chunks` chunks,
  `inflate_bytes` of decompressed data and `copy_bytes` of member data, whatever the size of
  the tarball or of any member, and however well it compresses.
- The compression is recognised from the content, not the name: gzip (one or several
  members, zero padding after them tolerated), zstd (one or several frames), xz and bzip2 (one
  or several streams), else plain tar.
- Parsing (Python's `tarfile` in stream mode) and decompression run in one worker thread; the
  event loop only moves chunks into a bounded queue, so it never blocks, and a slow scanner
  holds the producer back instead of buffering.
- Every member header is reported, in archive order, to `on_member` (called on the event loop
  thread, after the member was dealt with). A member's path is never used as an output path.
  A member is extracted only if it is a regular file, its path is relative without `..`,
  `wanted(normalised path, header size)` is true, its size is within `max_member_bytes`, and fewer than
  `max_members` headers precede it. Each refusal is recorded with a reason (`skipped`);
  directories and unwanted members are neither extracted nor "skipped".
- A truncated or corrupt tarball is a result, not an exception: `ScanResult.error` says what
  went wrong, and everything extracted before it is complete, sha256-verified against the
  bytes written, and kept. Trailer checks (gzip CRC and length, zstd checksum) run after the
  last member, so such an error can concern data already extracted: the message says so.
- Exceptions are kept for failures that are not the tarball's: the chunk source raising (e.g.
  a dropped S3 connection) re-raises that exception, `on_member` raising re-raises its
  exception, a local I/O error (disk full) raises, and cancellation cancels. In every case the
  worker thread has stopped and the chunk source has been closed before `scan` returns or
  raises; files already extracted stay in `staging`, which belongs to the caller.
"""

from __future__ import annotations

import asyncio
import bz2
import hashlib
import lzma
import tarfile
import threading
import zlib
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import zstandard

GZIP_MAGIC = b"\x1f\x8b"
ZSTD_MAGIC = b"\x28\xb5\x2f\xfd"
XZ_MAGIC = b"\xfd7zXZ\x00"
BZIP2_MAGIC = b"BZh"
_UNSUPPORTED_MAGIC = {b"\x04\x22\x4d\x18": "lz4"}
_SNIFF_BYTES = max(len(m) for m in (GZIP_MAGIC, ZSTD_MAGIC, XZ_MAGIC, BZIP2_MAGIC, *_UNSUPPORTED_MAGIC))
# xz and bzip2 (the standard library's lzma and bz2) bound each call's output themselves
# (max_length) and keep what they have not yet returned: they are fed only when they ask.
_ASKING = ("xz", "bzip2")
# xz's window (8 MiB at its default preset, 64 MiB at -9) must be held to decompress; a stream
# asking for more (a hostile header: up to 1.5 GiB) is refused as corrupt.
XZ_MEMLIMIT = 96 << 20

# The most output one input byte can produce, from the formats' definitions: deflate's longest
# match (258 bytes) costs at least a quarter byte; a zstd RLE block regenerates up to 128 KiB
# from 4 bytes. Input is fed in slices of inflate_bytes / ratio so that no single
# decompress call can produce more than inflate_bytes, even from a decompression bomb.
_DEFLATE_MAX_RATIO = 1032
_ZSTD_MAX_RATIO = (128 * 1024) // 4


@dataclass
class Extracted:
    """A member's bytes, written to `staging_path` (a generated name), with their sha256 and size."""

    staging_path: Path
    sha256: str
    size: int


@dataclass
class MemberRecord:
    """One member header. `path` is as in the header; `type` is one of file, dir, symlink,
    hardlink, device, fifo, other. `skipped` is the reason it was refused, else None."""

    index: int
    path: str
    size: int
    type: str
    skipped: str | None = None
    extracted: Extracted | None = None


@dataclass
class ScanResult:
    """What a scan found. `extracted` maps a member's normalised path to its last extracted
    copy; `error` is None for a complete, intact tarball; `bytes_read` counts input bytes."""

    members: int = 0
    extracted: dict[str, Extracted] = field(default_factory=dict)
    skipped: list[MemberRecord] = field(default_factory=list)
    error: str | None = None
    bytes_read: int = 0


def normalise_member_path(path: str) -> str:
    """A member path without empty or `.` components: `./data//a.csv` -> `data/a.csv`.

    This is the form `wanted` receives and `ScanResult.extracted` is keyed by, so that `a` and
    `./a` are the same member, as they are when tar extracts them.
    """
    return "/".join(p for p in path.split("/") if p not in ("", "."))


def member_type(info: tarfile.TarInfo) -> str:
    """The coarse type of a member: file, dir, symlink, hardlink, device, fifo or other."""
    if info.isreg():
        return "file"
    if info.isdir():
        return "dir"
    if info.issym():
        return "symlink"
    if info.islnk():
        return "hardlink"
    if info.ischr() or info.isblk():
        return "device"
    if info.isfifo():
        return "fifo"
    return "other"


async def scan(chunks: AsyncIterator[bytes], wanted: Callable[[str, int], bool], staging: Path, *,
               max_member_bytes: int, max_members: int, max_staging_bytes: int | None = None,
               on_member: Callable[[MemberRecord], None] | None = None,
               queue_chunks: int = 8, copy_bytes: int = 1 << 20,
               inflate_bytes: int = 8 << 20) -> ScanResult:
    """Scan a tarball streamed as `chunks`, extracting wanted regular files into `staging`.

    `wanted` is called from the worker thread and must be a pure predicate. `staging` is
    created if missing; extracted files are named `{index:08d}-{sha256(path)[:12]}.bin`.
    `queue_chunks` bounds the chunks read ahead of the parser, `copy_bytes` the piece of a
    member held at once, `inflate_bytes` the decompressed data held at once. `max_staging_bytes`
    bounds what one scan extracts in all: a wanted member that would pass it is skipped, with
    that reason.
    See the module docstring for the rules and for what is raised rather than reported.
    """
    for name, value in (("queue_chunks", queue_chunks), ("copy_bytes", copy_bytes),
                        ("inflate_bytes", inflate_bytes)):
        if value <= 0:
            raise ValueError(f"{name} must be positive, got {value}")
    loop = asyncio.get_running_loop()
    queue: asyncio.Queue[Any] = asyncio.Queue(maxsize=queue_chunks)
    abort = threading.Event()
    callback_errors: list[BaseException] = []

    def deliver(record: MemberRecord) -> None:
        if on_member is None or callback_errors:
            return
        try:
            on_member(record)
        except Exception as exc:  # noqa: BLE001 - handed back to scan's caller below
            callback_errors.append(exc)
            abort.set()
            _unblock(queue)

    def post(record: MemberRecord) -> None:
        if on_member is None:
            return
        # call_soon_threadsafe keeps the order, and scan's own wake-up is queued behind every
        # record the worker posted, so all of them have been delivered when scan returns.
        loop.call_soon_threadsafe(deliver, record)

    feed = _Feed(loop, queue, abort)
    job = _Job(feed, wanted, staging, post, max_member_bytes=max_member_bytes,
               max_members=max_members, copy_bytes=copy_bytes, inflate_bytes=inflate_bytes,
               max_staging_bytes=max_staging_bytes)
    pump = asyncio.create_task(_pump(chunks, queue))
    worker = asyncio.ensure_future(asyncio.to_thread(job.run))
    try:
        result = await asyncio.shield(worker)
    except _SourceFailed as exc:
        raise exc.cause from None
    except _Aborted:
        if callback_errors:
            raise callback_errors[0] from None
        raise
    finally:
        # Whatever happened (done, error, cancelled): stop the producer, make sure a worker
        # waiting for a chunk wakes up and stops, and wait for it so that nothing writes into
        # staging after we return. Then close the source (an S3 body releases its connection).
        abort.set()
        pump.cancel()
        _unblock(queue)
        await asyncio.wait({worker, pump})
        for task in (worker, pump):  # retrieved so neither is logged as a lost exception
            if task.done() and not task.cancelled():
                task.exception()
        aclose = getattr(chunks, "aclose", None)
        if aclose is not None:
            await aclose()
    if callback_errors:
        raise callback_errors[0]
    return result


# --- the event loop side -----------------------------------------------------------------

_END = object()    # the source is exhausted
_ABORT = object()  # stop now: cancelled, or on_member failed


@dataclass
class _Failed:
    exc: BaseException


class _SourceFailed(Exception):
    def __init__(self, cause: BaseException) -> None:
        super().__init__(str(cause))
        self.cause = cause


class _Aborted(Exception):
    pass


async def _pump(chunks: AsyncIterator[bytes], queue: asyncio.Queue[Any]) -> None:
    """Move chunks into the bounded queue; `put` waiting on a full queue is the backpressure."""
    try:
        async for chunk in chunks:
            if chunk:
                await queue.put(bytes(chunk))
    except Exception as exc:  # noqa: BLE001 - relayed to the worker, re-raised by scan
        await queue.put(_Failed(exc))
        return
    await queue.put(_END)


def _unblock(queue: asyncio.Queue[Any]) -> None:
    """Replace whatever is queued by _ABORT, so a worker waiting for a chunk stops at once."""
    while not queue.empty():
        queue.get_nowait()
    queue.put_nowait(_ABORT)


# --- the worker thread side ------------------------------------------------------------------


class _BadArchive(Exception):
    """The tarball itself is truncated or corrupt; str() is the ScanResult.error message."""


class _Feed:
    """The worker's end of the queue: blocking reads of compressed chunks, counted."""

    def __init__(self, loop: asyncio.AbstractEventLoop, queue: asyncio.Queue[Any],
                 abort: threading.Event) -> None:
        self._loop = loop
        self._queue = queue
        self._abort = abort
        self._buf = b""
        self._pos = 0
        self._eof = False
        self.bytes_read = 0

    def _next_chunk(self) -> bool:
        if self._eof:
            return False
        if self._abort.is_set():
            raise _Aborted()
        item = asyncio.run_coroutine_threadsafe(self._queue.get(), self._loop).result()
        if item is _ABORT or self._abort.is_set():
            raise _Aborted()
        if isinstance(item, _Failed):
            raise _SourceFailed(item.exc)
        if item is _END:
            self._eof = True
            return False
        self.bytes_read += len(item)
        if self._pos < len(self._buf):
            self._buf = self._buf[self._pos:] + item
        else:
            self._buf = item
        self._pos = 0
        return True

    def peek(self, n: int) -> bytes:
        """The next n bytes (fewer at the end) without consuming them."""
        while len(self._buf) - self._pos < n and self._next_chunk():
            pass
        return self._buf[self._pos:self._pos + n]

    def read(self, n: int) -> bytes:
        """Up to n bytes; b"" only at the end of the source."""
        if self._pos >= len(self._buf) and not self._next_chunk():
            return b""
        out = self._buf[self._pos:self._pos + n]
        self._pos += len(out)
        return out


class _Inflater:
    """A file-like reader of decompressed bytes over a multi-member gzip or multi-frame zstd
    stream, whose `read` never holds more than `out_bytes` of output at once."""

    def __init__(self, feed: _Feed, fmt: str, out_bytes: int) -> None:
        self._feed = feed
        self._fmt = fmt
        self._out_bytes = out_bytes
        ratio = {"gzip": _DEFLATE_MAX_RATIO, "zstd": _ZSTD_MAX_RATIO}.get(fmt, 1)
        self._in_bytes = max(1, min(out_bytes // ratio, 1 << 16))
        self._obj: Any = None       # the current member's decompressor; None between members
        self._pending = b""         # input read but not yet consumed by a decompressor
        self._out = b""
        self._out_pos = 0

    def read(self, n: int = -1) -> bytes:
        while self._out_pos >= len(self._out):
            self._out, self._out_pos = self._produce(), 0
            if not self._out:
                return b""
        size = len(self._out) - self._out_pos if n is None or n < 0 else n
        piece = self._out[self._out_pos:self._out_pos + size]
        self._out_pos += len(piece)
        return piece

    def _new_member(self) -> bool:
        data = self._pending
        while True:
            # gzip(1) and xz(1) take zero padding after a member or stream (tape blocking, xz's
            # stream padding); zstd and bzip2 do not.
            if self._fmt in ("gzip", "xz"):
                data = data.lstrip(b"\0")
            if data:
                break
            data = self._feed.read(self._in_bytes)
            if not data:
                return False  # the stream ends cleanly between members
        self._pending = data
        self._obj = {"gzip": lambda: zlib.decompressobj(wbits=31),
                     "zstd": lambda: zstandard.ZstdDecompressor().decompressobj(),
                     "xz": lambda: lzma.LZMADecompressor(format=lzma.FORMAT_XZ, memlimit=XZ_MEMLIMIT),
                     "bzip2": bz2.BZ2Decompressor}[self._fmt]()
        return True

    def _produce(self) -> bytes:
        while True:
            if self._obj is None and not self._new_member():
                return b""
            obj = self._obj
            if self._fmt in _ASKING and not obj.needs_input:
                data = b""  # it still holds output from what it was given: no more input yet
            else:
                data = self._pending or self._feed.read(self._in_bytes)
            try:
                out = obj.decompress(data, self._out_bytes) if self._fmt != "zstd" else obj.decompress(data)
            except (zlib.error, zstandard.ZstdError, lzma.LZMAError, OSError, EOFError) as exc:
                raise _BadArchive(f"corrupt {self._fmt} data: {exc}") from None
            self._pending = obj.unconsumed_tail if self._fmt not in _ASKING else b""
            if obj.eof:
                self._pending = obj.unused_data
                self._obj = None
            elif self._fmt in _ASKING and not obj.needs_input:
                data = b"."  # more output waits: not the end of the input
            if out:
                return out
            if not data and not self._pending and self._obj is not None:
                unit = {"gzip": "member", "zstd": "frame"}.get(self._fmt, "stream")
                raise _BadArchive(f"truncated: the {self._fmt} stream ends inside a {unit}")


def _open_input(feed: _Feed, inflate_bytes: int) -> tuple[str, Any]:
    """Pick the decompressor from the first bytes; returns (format name, readable)."""
    head = feed.peek(_SNIFF_BYTES)
    if not head:
        raise _BadArchive("empty input: no tar archive")
    if head.startswith(GZIP_MAGIC):
        return "gzip", _Inflater(feed, "gzip", inflate_bytes)
    if head.startswith(ZSTD_MAGIC):
        return "zstd", _Inflater(feed, "zstd", inflate_bytes)
    if head.startswith(XZ_MAGIC):
        return "xz", _Inflater(feed, "xz", inflate_bytes)
    if head.startswith(BZIP2_MAGIC) and head[3:4].isdigit():
        return "bzip2", _Inflater(feed, "bzip2", inflate_bytes)
    for magic, name in _UNSUPPORTED_MAGIC.items():
        if head.startswith(magic):
            raise _BadArchive(f"unsupported compression: {name}")
    return "tar", feed


class _ShortMember(Exception):
    pass


class _Job:
    """One scan, run in the worker thread by `run`."""

    def __init__(self, feed: _Feed, wanted: Callable[[str, int], bool], staging: Path,
                 post: Callable[[MemberRecord], None], *, max_member_bytes: int, max_members: int,
                 copy_bytes: int, inflate_bytes: int, max_staging_bytes: int | None = None) -> None:
        self.feed = feed
        self.wanted = wanted
        self.staging = staging
        self.post = post
        self.max_member_bytes = max_member_bytes
        self.max_members = max_members
        self.copy_bytes = copy_bytes
        self.inflate_bytes = inflate_bytes
        self.max_staging_bytes = max_staging_bytes
        self.staged = 0  # bytes extracted into staging by this scan (a replaced copy no longer counts)
        self.result = ScanResult()

    def run(self) -> ScanResult:
        self.staging.mkdir(parents=True, exist_ok=True)
        result = self.result
        fmt, phase = "tar", "members"
        try:
            fmt, reader = _open_input(self.feed, self.inflate_bytes)
            self._scan_tar(reader)
            # The tar's end marker comes before the compression's trailer (gzip CRC and length,
            # zstd checksum): read to the end so those checks run and bytes_read counts the
            # whole object. Whatever follows the end marker is otherwise ignored.
            phase = "trailer"
            while reader.read(self.inflate_bytes):
                pass
        except _BadArchive as exc:
            result.error = str(exc)
            if phase == "trailer":
                result.error += (f" (after the end of the tar archive: the extracted members are"
                                 f" complete, but the {fmt} integrity check over them failed or"
                                 f" could not run)")
        except tarfile.TarError as exc:
            result.error = f"corrupt tar: {exc}"
        finally:
            result.bytes_read = self.feed.bytes_read
        return result

    def _scan_tar(self, reader: Any) -> None:
        ends: list[tarfile.HeaderError] = []

        class _TarInfo(tarfile.TarInfo):
            # tarfile in stream mode treats a missing, short or invalid header after the first
            # as the end of the archive, silently. Remember why it stopped, to tell a real end
            # marker (a zero block) from truncation or corruption.
            @classmethod
            def fromtarfile(cls, tf: tarfile.TarFile) -> tarfile.TarInfo:
                try:
                    return super().fromtarfile(tf)
                except tarfile.HeaderError as exc:
                    ends.append(exc)
                    raise

        try:
            tf = tarfile.open(fileobj=reader, mode="r|", tarinfo=_TarInfo, encoding="utf-8",
                              errors="surrogateescape")
        except tarfile.ReadError as exc:
            raise _BadArchive(f"not a tar archive: {exc}") from None
        with tf:
            index = 0
            while True:
                header_offset = tf.offset
                info = tf.next()
                if info is None:
                    break
                # Stream mode still keeps every header in tf.members; drop them so memory does
                # not grow with the number of members.
                tf.members.clear()
                self.result.members = index + 1
                self._member(tf, index, info)
                index += 1
            end = ends[-1] if ends else None
            if isinstance(end, tarfile.EOFHeaderError):
                return
            where = f"at offset {header_offset} after {index} members"
            if end is None or isinstance(end, tarfile.EmptyHeaderError):
                raise _BadArchive(f"truncated: no end-of-archive marker {where}")
            if isinstance(end, tarfile.TruncatedHeaderError):
                raise _BadArchive(f"truncated: partial header {where}")
            raise _BadArchive(f"corrupt tar: invalid header {where} ({end})")

    def _refusal(self, index: int, info: tarfile.TarInfo, kind: str, norm: str) -> str | None:
        """Why the member is not extracted (a skip reason), "" if it is just not wanted, None
        if it is to be extracted."""
        path = info.name
        if index >= self.max_members:
            return f"beyond max_members ({self.max_members})"
        if path.startswith("/"):
            return "absolute path"
        if ".." in path.split("/"):
            return "path contains '..'"
        if kind in ("symlink", "hardlink"):
            return f"{kind} to {info.linkname!r}"
        if kind in ("device", "fifo"):
            return kind
        if kind == "other":
            return f"unsupported member type {info.type!r}"
        if kind != "file":
            return ""
        if not norm:
            return "empty path"
        if not self.wanted(norm, info.size):
            return ""
        if info.size > self.max_member_bytes:
            return f"size {info.size} over max_member_bytes ({self.max_member_bytes})"
        if self.max_staging_bytes is not None and self.staged + info.size > self.max_staging_bytes:
            return (f"staging full: {info.size} more bytes would pass recovery.staging_max_bytes "
                    f"({self.max_staging_bytes}; {self.staged} staged)")
        return None

    def _member(self, tf: tarfile.TarFile, index: int, info: tarfile.TarInfo) -> None:
        kind = member_type(info)
        norm = normalise_member_path(info.name)
        record = MemberRecord(index=index, path=info.name, size=info.size, type=kind)
        refusal = self._refusal(index, info, kind, norm)
        if refusal:
            record.skipped = refusal
            self.result.skipped.append(record)
        elif refusal is None:
            try:
                record.extracted = self._extract(tf, index, info, norm)
            except _ShortMember as exc:
                record.skipped = str(exc)
                self.result.skipped.append(record)
                self.post(record)
                raise _BadArchive(str(exc)) from None
            previous = self.result.extracted.pop(norm, None)
            if previous is not None:  # a later copy of the same path wins, as with tar
                previous.staging_path.unlink(missing_ok=True)
                self.staged -= previous.size
            self.result.extracted[norm] = record.extracted
            self.staged += record.extracted.size
        self.post(record)

    def _extract(self, tf: tarfile.TarFile, index: int, info: tarfile.TarInfo, norm: str) -> Extracted:
        name_hash = hashlib.sha256(norm.encode("utf-8", "surrogateescape")).hexdigest()[:12]
        dest = self.staging / f"{index:08d}-{name_hash}.bin"
        digest = hashlib.sha256()
        written = 0
        source = tf.extractfile(info)
        assert source is not None  # a regular file always has a data stream
        try:
            # "x": never follow or overwrite something already at the generated name.
            with open(dest, "xb") as out:
                while block := source.read(self.copy_bytes):
                    digest.update(block)
                    out.write(block)
                    written += len(block)
        except (_BadArchive, tarfile.TarError) as exc:
            dest.unlink(missing_ok=True)
            raise _ShortMember(f"short member {info.name!r}: {written} of {info.size} bytes ({exc})") from None
        except BaseException:
            dest.unlink(missing_ok=True)
            raise
        if written != info.size:
            dest.unlink(missing_ok=True)
            raise _ShortMember(f"short member {info.name!r}: {written} of {info.size} bytes")
        return Extracted(staging_path=dest, sha256=digest.hexdigest(), size=written)
