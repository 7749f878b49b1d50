"""Commits written straight into a git pack: blobs, trees and commit objects in one pack file
per call, then its index; the caller moves the branch.

Why not `git fast-import`: it finds every path it sets by a linear scan of each folder on the
way, and every commit re-sorts, re-prints and re-deltas each folder it touched. The figures'
layout has one folder with an entry per paper (`figures/papers/<paper>/`), so that is work in
the number of papers for every file: at 200,000 papers a 100-file commit cost about 300 ms of
git's CPU, and 0.5 ms a file already at 20,000 rows.

Here a folder is kept as the bytes git itself would store, in git's order, cut into chunks of
about CHUNK entries: a name is found by bisecting the chunks' first keys, a change rewrites one
chunk, and a folder's next version in the same pack is stored as a delta that copies its
unchanged chunks from the version before. What still grows with a folder is hashing its bytes
(sha1; about 5 ms for the 8 MB of 200,000 entries) and its first version in each pack.
Only folders on the way to a changed path are read (through one `git cat-file --batch`), and
small ones are let go again once their pack is written. The big ones kept between calls keep
their chunks in a scratch file (`Spill`), not in memory: at a million figures the one-entry-per-
paper folder is 8 MB, which the worker's memory would otherwise grow by.

Formats: gitformat-pack(5) (pack v2, index v2, OFS_DELTA, delta copy/insert), and git's tree
order (names compared as bytes, a folder's name as if it ended in '/').
"""

from __future__ import annotations

import bisect
import collections
import hashlib
import os
import pickle
import stat
import struct
import subprocess
import sys
import tempfile
import time
import zlib
from collections.abc import Iterable, Iterator, Mapping, Sequence
from typing import Any, BinaryIO
from dataclasses import dataclass
from pathlib import Path

from . import gitindex, native

OBJ_COMMIT, OBJ_TREE, OBJ_BLOB, OBJ_OFS_DELTA = 1, 2, 3, 6
FOLDER_MODE = b"40000"
BLOB_MODES = frozenset({b"100644", b"100755", b"120000"})  # a file, an executable, a link
CHUNK = 32             # entries per chunk: a change rewrites ~1.3 KB of a folder, and its delta carries as much
DELTA_FROM = 4096      # folders at least this big are stored as deltas against their version before
MAX_DEPTH = 50         # deltas on deltas, at most (git's own default)
KEEP_LOADED = 64 << 10  # folders at least this big are kept between calls (their chunks spilled); smaller ones are read again
LET_GO_KEPT = 3 << 20   # ... unless among the most recently let go, up to this many bytes
LET_GO_OVERHEAD = 200   # bytes a let-go folder's body costs beyond its entries (its key, the bytes object, the dict's node)
SPILL_SLACK = 16 << 20  # a scratch file holding this much more than twice its live chunks is rewritten
BLOB_CHUNK = 1 << 20
READ_WHOLE = 1 << 20   # files up to this size are read in one go; larger ones are read twice (hashed, then written)
HOLD_MAX = 32 << 20    # bytes held in memory across one call, at most: files beyond are streamed from disk
RECYCLE_READER_PACKS = 8   # packs written before the object reader (git cat-file) is started afresh
DELTA_BASE_CACHE = "8m"    # the object reader's cache of delta bases (git's default is 96m)
# How much of the packs the object reader keeps mapped, in windows of what size (git's defaults on
# 64-bit: 32 TiB and 1 GiB, so every page it touched stays in its memory until it ends).
PACK_MAP_LIMIT = "32m"
PACK_MAP_WINDOW = "1m"
# Formats that are compressed already: zlib would spend CPU to gain nothing (`git gc` may still).
_COMPRESSED = (b"\x89PNG", b"\xff\xd8\xff", b"GIF8", b"PK\x03\x04", b"\x1f\x8b")


class PackError(Exception):
    """Reading the repository or writing the pack failed; str() is one line."""


class Refused(Exception):
    """This path cannot be committed as a file (the repository has something else in its way)."""


def _is_folder(mode: bytes) -> bool:
    return int(mode, 8) & 0o170000 == 0o040000


def _key(mode: bytes, name: bytes) -> bytes:
    """Git's sort key of a tree entry: a folder sorts as if its name ended in '/'."""
    return name + b"/" if _is_folder(mode) else name


def _entries(buf: bytes) -> Iterator[tuple[int, int, bytes, bytes, bytes]]:
    """(start, end, mode, name, object id) of each entry of serialised tree bytes."""
    i, n = 0, len(buf)
    while i < n:
        sp = buf.find(b" ", i)
        nul = buf.find(b"\0", sp + 1)
        end = nul + 21
        if sp < 0 or nul < 0 or end > n:
            raise PackError("a tree in the repository is malformed")
        yield i, end, buf[i:sp], buf[sp + 1:nul], buf[nul + 1:end]
        i = end


def _first_key(chunk: bytes) -> bytes:
    _s, _e, mode, name, _oid = next(_entries(chunk))
    return _key(mode, name)


class Spill:
    """Chunks kept in a scratch file instead of memory, each named by a handle (its offset and
    length in one int). Append-only: a chunk replaced stays readable (a pack being planned may
    still name it) and counts as garbage until the file is rewritten (`PackCommitter._compact`).
    The file has no name (unlinked at once), so nothing is left behind however the worker ends."""

    def __init__(self, directory: Path) -> None:
        self._fh = tempfile.TemporaryFile(dir=directory, prefix="tmp_crawler_folders_")
        self._fd = self._fh.fileno()
        self.end = 0    # bytes in the file
        self.live = 0   # of which chunks still in use

    def put(self, chunk: bytes) -> int:
        view, at = memoryview(chunk), self.end
        while view:
            n = os.pwrite(self._fd, view, at)
            view, at = view[n:], at + n
        handle = (self.end << 32) | len(chunk)
        self.end += len(chunk)
        self.live += len(chunk)
        return handle

    def get(self, handle: int) -> bytes:
        n = handle & 0xFFFFFFFF
        data = os.pread(self._fd, n, handle >> 32)
        if len(data) != n:
            raise PackError("the worker's scratch file of folders came back short")
        return data

    def drop(self, handle: int) -> None:
        self.live -= handle & 0xFFFFFFFF

    def close(self) -> None:
        self._fh.close()


class Folder:
    """One tree: its serialised entries in chunks, the id of that content (None: changed since),
    and the subfolders loaded below it. A chunk is its bytes, or, once the folder is spilled,
    a handle into the Spill holding them."""

    __slots__ = ("chunks", "firsts", "tree_id", "children", "written", "spill")

    def __init__(self, body: bytes = b"", tree_id: bytes | None = None, spill: Spill | None = None) -> None:
        """`spill`: keep the chunks there from the start (a big folder read from git: its body
        and a copy of it in chunks would both be in memory otherwise)."""
        self.chunks: list[Any] = []
        self.firsts: list[bytes] = []
        starts = [s for k, (s, _e, _m, _n, _o) in enumerate(_entries(body)) if k % CHUNK == 0]
        for a, b in zip(starts, starts[1:] + [len(body)]):
            chunk = body[a:b]
            self.chunks.append(chunk if spill is None else spill.put(chunk))
            self.firsts.append(_first_key(chunk))
        self.spill = spill
        self.tree_id = tree_id
        self.children: dict[bytes, Folder] = {}
        # The version last written into the pack being built: (offset, its chunks, delta depth).
        self.written: tuple[int, list[Any], int] | None = None

    def size(self) -> int:
        return sum(map(self.length, self.chunks))

    def length(self, chunk: Any) -> int:
        return len(chunk) if self.spill is None else chunk & 0xFFFFFFFF

    def read(self, chunk: Any) -> bytes:
        return chunk if self.spill is None else self.spill.get(chunk)

    def pieces(self, chunks: list[Any]) -> Iterator[bytes]:
        """The bytes of `chunks` (this folder's, now or at an earlier version), one at a time."""
        return iter(chunks) if self.spill is None else map(self.spill.get, chunks)

    def spill_to(self, spill: Spill) -> None:
        """Keep the chunks in `spill` from now on (or move them to it from another)."""
        if self.spill is spill:
            return
        self.chunks = [spill.put(c) for c in self.pieces(self.chunks)]
        self.spill = spill

    def body(self) -> bytes:
        return b"".join(self.pieces(self.chunks))

    def _chunk_of(self, key: bytes) -> int:
        return max(bisect.bisect_right(self.firsts, key) - 1, 0)

    def get(self, name: bytes) -> tuple[bytes, bytes] | None:
        """(mode, object id) of `name`, or None."""
        if not self.chunks:
            return None
        for ci in sorted({self._chunk_of(name), self._chunk_of(name + b"/")}):
            for _s, _e, mode, entry_name, oid in _entries(self.read(self.chunks[ci])):
                if entry_name == name:
                    return mode, oid
        return None

    def put(self, name: bytes, mode: bytes, oid: bytes) -> None:
        """Set `name` to (mode, id), replacing the entry of that name: one pass over one chunk.
        A name keeps its kind (callers refuse a file where a folder is, and the other way)."""
        key = _key(mode, name)
        raw = mode + b" " + name + b"\0" + oid
        self.tree_id = None
        if not self.chunks:
            self.chunks.append(raw if self.spill is None else self.spill.put(raw))
            self.firsts.append(key)
            return
        last = name + b"/"  # of the two keys `name` can have, the later
        ci = self._chunk_of(key)
        chunk = self.read(self.chunks[ci])
        at, drop = len(chunk), None
        for s, e, m, entry_name, _o in _entries(chunk):
            entry_key = _key(m, entry_name)
            if entry_name == name:
                if entry_key != key:
                    raise PackError(f"{name.decode(errors='replace')} would change kind")
                drop = (s, e)
            elif entry_key > key and at == len(chunk):
                at = s
            if entry_key > last:
                break
        if drop is None:
            chunk = chunk[:at] + raw + chunk[at:]
        else:  # where it was (the entry after it is the first with a greater key)
            chunk = chunk[:drop[0]] + raw + chunk[drop[1]:]
        self._set_chunk(ci, chunk)

    def _set_chunk(self, ci: int, chunk: bytes) -> None:
        pieces = [chunk]
        # Split one grown past 2 × CHUNK entries. Every entry has one NUL before its id (ids may
        # hold more), so the count is a cheap upper bound and the exact one is taken only then.
        if chunk.count(b"\0") > 2 * CHUNK:
            bounds = [s for s, _e, _m, _n, _o in _entries(chunk)]
            if len(bounds) > 2 * CHUNK:
                mid = bounds[len(bounds) // 2]
                pieces = [chunk[:mid], chunk[mid:]]
        if self.spill is not None:
            self.spill.drop(self.chunks[ci])
        self.chunks[ci:ci + 1] = pieces if self.spill is None else [self.spill.put(p) for p in pieces]
        self.firsts[ci:ci + 1] = [_first_key(p) for p in pieces]


@dataclass
class Blob:
    """A file to commit: its path, mode, git object id (20 bytes), size, and its bytes (None:
    read from `source` while writing, and checked against the id)."""

    path: str
    mode: bytes
    oid: bytes
    size: int
    data: bytes | None
    source: Path | None = None


def describe(root: Path, path: str, known: bytes | None = None, expected_sha256: str | None = None,
             hold: bool = True) -> Blob:
    """A file about to be committed: `known` is the bytes the caller itself just placed there
    (spares reading them back); otherwise the file as it is now, which must be a regular file.
    With `expected_sha256`, the bytes read must have that sha256 (the content the row will be
    stamped with): a file changed since it was checked is refused, never committed under a
    stamp that does not describe it. Read whole only when small and `hold` (the caller bounds
    what is held across a call); else streamed, hashed now and checked again as it is written."""
    if known is not None:
        oid = hashlib.sha1(b"blob %d\0" % len(known) + known).digest()
        return Blob(path, b"100644", oid, len(known), known)
    full = root / path
    st = os.lstat(full)
    if not stat.S_ISREG(st.st_mode):
        raise Refused(f"{path} is not a regular file; nothing was committed")
    mode = b"100755" if st.st_mode & 0o111 else b"100644"
    sha = hashlib.sha1(b"blob %d\0" % st.st_size)
    content = hashlib.sha256() if expected_sha256 else None
    if hold and st.st_size <= READ_WHOLE:
        with open(full, "rb") as fh:
            data = fh.read()
        if len(data) != st.st_size:
            raise Refused(f"{path} changed while being committed")
        sha.update(data)
        if content is not None:
            content.update(data)
        _check_content(path, content, expected_sha256)
        return Blob(path, mode, sha.digest(), st.st_size, data)
    seen = 0
    with open(full, "rb") as fh:
        while block := fh.read(BLOB_CHUNK):
            sha.update(block)
            if content is not None:
                content.update(block)
            seen += len(block)
    if seen != st.st_size:
        raise Refused(f"{path} changed while being committed")
    _check_content(path, content, expected_sha256)
    return Blob(path, mode, sha.digest(), st.st_size, None, full)


def _check_content(path: str, content: Any, expected: str | None) -> None:
    if content is not None and content.hexdigest() != (expected or "").lower():
        raise Refused(f"{path} is not the content that was checked (sha256 {content.hexdigest()[:12]}…, "
                      f"expected {(expected or '')[:12]}…): it changed since; nothing was committed for it")


# -- pack encoding ----------------------------------------------------------------------------------
def _object_header(kind: int, size: int) -> bytes:
    out = bytearray()
    byte = (kind << 4) | (size & 15)
    size >>= 4
    while size:
        out.append(byte | 0x80)
        byte = size & 0x7F
        size >>= 7
    out.append(byte)
    return bytes(out)


def _ofs_distance(distance: int) -> bytes:
    """An OFS_DELTA's distance back to its base (big-endian, 7 bits a byte, each continuation
    byte biased by one)."""
    out = [distance & 0x7F]
    distance >>= 7
    while distance:
        distance -= 1
        out.append(0x80 | (distance & 0x7F))
        distance >>= 7
    return bytes(reversed(out))


def _varint(n: int) -> bytes:
    """A delta's size field: little-endian, 7 bits a byte."""
    out = bytearray()
    while True:
        byte = n & 0x7F
        n >>= 7
        if n:
            out.append(byte | 0x80)
        else:
            out.append(byte)
            return bytes(out)


def _copy(offset: int, size: int) -> bytes:
    """Delta instructions copying base[offset:offset+size] (pieces of at most 0xFFFFFF)."""
    out = bytearray()
    while size:
        n = min(size, 0xFFFFFF)
        op, args = 0x80, bytearray()
        for i in range(4):
            if byte := (offset >> (8 * i)) & 0xFF:
                op |= 1 << i
                args.append(byte)
        for i in range(3):  # zero bytes are left out (a size field of none at all means 0x10000)
            if byte := (n >> (8 * i)) & 0xFF:
                op |= 0x10 << i
                args.append(byte)
        out.append(op)
        out += args
        offset += n
        size -= n
    return bytes(out)


def _insert(data: bytes) -> bytes:
    out = bytearray()
    for i in range(0, len(data), 0x7F):
        piece = data[i:i + 0x7F]
        out.append(len(piece))
        out += piece
    return bytes(out)


def tree_delta(base: list[Any], new: list[Any], folder: Folder | None = None) -> bytes:
    """A delta from the chunks `base` to the chunks `new` (of `folder`, when they are handles
    into its Spill): chunks they share (the same objects, or handles) are copied, the others
    inserted."""
    spilled = folder is not None and folder.spill is not None
    same = (lambda c: c) if spilled else id
    length = folder.length if folder is not None else len
    where: dict[int, int] = {}
    offset = 0
    for chunk in base:
        where[same(chunk)] = offset
        offset += length(chunk)
    out = [_varint(offset), _varint(sum(map(length, new)))]
    run_from = run_len = 0
    for chunk in new:
        at = where.get(same(chunk))
        if at is not None and run_len and at == run_from + run_len:
            run_len += length(chunk)
            continue
        if run_len:
            out.append(_copy(run_from, run_len))
            run_len = 0
        if at is not None:
            run_from, run_len = at, length(chunk)
        else:
            out.append(_insert(folder.read(chunk) if folder is not None else chunk))
    if run_len:
        out.append(_copy(run_from, run_len))
    return b"".join(out)


class PackWriter:
    """One pack file being written: objects appended in order, then the trailer, the index, and
    both renamed into place (fsynced first, as git does, so a ref never names a lost object)."""

    def __init__(self, pack_dir: Path, count: int) -> None:
        self.pack_dir = pack_dir
        fd, name = tempfile.mkstemp(prefix="tmp_pack_", dir=pack_dir)
        self._tmp = Path(name)
        self._fh = os.fdopen(fd, "wb", buffering=1 << 20)
        self._sha = hashlib.sha1()
        self.offset = 0
        self.count = count
        self._index: list[tuple[bytes, int, int]] = []  # (object id, offset, crc32)
        self._write(b"PACK" + struct.pack(">II", 2, count))

    def _write(self, data: bytes) -> None:
        self._fh.write(data)
        self._sha.update(data)
        self.offset += len(data)

    def add(self, oid: bytes, kind: int, size: int, pieces: Iterable[bytes], level: int = 1,
            base_offset: int | None = None) -> int:
        """Append one object (`pieces`: its content, or a delta's); returns its offset."""
        start = self.offset
        header = _object_header(kind, size)
        if base_offset is not None:
            header += _ofs_distance(start - base_offset)
        self._write(header)
        crc = zlib.crc32(header)
        z = zlib.compressobj(level)
        for piece in pieces:
            if out := z.compress(piece):
                self._write(out)
                crc = zlib.crc32(out, crc)
        out = z.flush()
        self._write(out)
        self._index.append((oid, start, zlib.crc32(out, crc)))
        return start

    def finish(self) -> str:
        """Close the pack and publish it with its index; returns its name."""
        if len(self._index) != self.count:
            raise PackError(f"pack holds {len(self._index)} objects, {self.count} announced")
        digest = self._sha.digest()
        self._fh.write(digest)
        self._fh.flush()
        os.fsync(self._fh.fileno())
        self._fh.close()
        name = f"pack-{digest.hex()}"
        idx_tmp = self.pack_dir / f"tmp_idx_{digest.hex()}"
        try:
            with open(idx_tmp, "wb") as fh:
                fh.write(_index_v2(self._index, digest))
                fh.flush()
                os.fsync(fh.fileno())
            os.chmod(self._tmp, 0o444)
            os.chmod(idx_tmp, 0o444)
            os.replace(self._tmp, self.pack_dir / f"{name}.pack")  # the pack before its index: git
            os.replace(idx_tmp, self.pack_dir / f"{name}.idx")     # looks for packs by their index
        finally:
            idx_tmp.unlink(missing_ok=True)
        folder = os.open(self.pack_dir, os.O_RDONLY)
        try:
            os.fsync(folder)  # the two names, before any ref can point into the pack
        finally:
            os.close(folder)
        return name

    def abandon(self) -> None:
        try:
            self._fh.close()
        finally:
            self._tmp.unlink(missing_ok=True)


def _index_v2(index: list[tuple[bytes, int, int]], pack_digest: bytes) -> bytes:
    index = sorted(index)
    fanout = [0] * 256
    for oid, _off, _crc in index:
        fanout[oid[0]] += 1
    total = 0
    for i in range(256):
        total += fanout[i]
        fanout[i] = total
    small, large = [], []
    for _oid, off, _crc in index:
        if off < 0x80000000:
            small.append(off)
        else:
            small.append(0x80000000 | len(large))
            large.append(off)
    body = b"".join([
        b"\377tOc", struct.pack(">I", 2), struct.pack(">256I", *fanout),
        b"".join(oid for oid, _o, _c in index),
        struct.pack(f">{len(index)}I", *(crc for _o, _f, crc in index)),
        struct.pack(f">{len(small)}I", *small),
        struct.pack(f">{len(large)}Q", *large),
        pack_digest,
    ])
    return body + hashlib.sha1(body).digest()


def _level(data: bytes) -> int:
    if data.startswith(_COMPRESSED) or (data[:4] == b"RIFF" and data[8:12] == b"WEBP"):
        return 0
    return 1


# -- reading the repository -----------------------------------------------------------------------
class ObjectReader:
    """`git cat-file --batch`: object contents by id (blocking; one question at a time). No timer
    of its own on this hot path (a folder read per paper): a hang is bounded by the job's
    watchdog on the whole worker call, which kills the worker and with it this pipe."""

    def __init__(self, root: Path, env: Mapping[str, str], timeout_s: float) -> None:
        # git keeps up to 96 MB of delta bases by default; the folders read here are deltas on
        # deltas (DELTA_FROM), so the reader's memory grew to that whatever the run's size.
        self.proc = subprocess.Popen(["git", "-c", f"core.deltaBaseCacheLimit={DELTA_BASE_CACHE}",
                                      "-c", f"core.packedGitLimit={PACK_MAP_LIMIT}",
                                      "-c", f"core.packedGitWindowSize={PACK_MAP_WINDOW}", "cat-file", "--batch"],
                                     cwd=root, env=dict(env),
                                     stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL)
        self.timeout_s = timeout_s

    def read(self, oid: bytes | str, kind: str) -> bytes:
        assert self.proc.stdin is not None and self.proc.stdout is not None
        name = oid.hex() if isinstance(oid, bytes) else oid
        try:
            self.proc.stdin.write(name.encode() + b"\n")
            self.proc.stdin.flush()
            header = self.proc.stdout.readline().split()
            if len(header) != 3 or header[1] != kind.encode():
                what = b" ".join(header[1:]).decode(errors="replace") or "no answer"
                raise PackError(f"git cat-file: {name} is not a {kind} ({what})")
            size = int(header[2])
            data = self.proc.stdout.read(size)  # and then its newline: no copy of a big folder to drop it
            if len(data) != size or self.proc.stdout.read(1) != b"\n":
                raise PackError(f"git cat-file stopped while reading {name}")
            return data
        except (BrokenPipeError, ValueError):
            raise PackError("git cat-file stopped") from None

    def close(self) -> None:
        try:
            self.proc.stdin.close()  # type: ignore[union-attr]  # its end of input: it exits
        except OSError:
            pass  # it is dead already
        try:
            self.proc.wait(self.timeout_s)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
        self.proc.stdout.close()  # type: ignore[union-attr]


# -- commits ----------------------------------------------------------------------------------------
@dataclass
class _Tree:
    oid: bytes
    chunks: list[Any]  # the folder's chunks at this version (bytes, or handles into its Spill)
    size: int
    folder: Folder


class PackCommitter:
    """Builds commits on a branch's tree kept in memory (the folders on the way to what we
    commit), and writes each call's objects as one pack. On the git thread."""

    def __init__(self, root: Path, objects_dir: Path, env: Mapping[str, str], timeout_s: float,
                 ident: bytes) -> None:
        self.root = root
        self.pack_dir = objects_dir / "pack"
        self.ident = ident  # "Name <email>"
        self._reader_args = (root, env, timeout_s)
        self._reader = ObjectReader(root, env, timeout_s)
        self._packs_since_reader = 0
        self.tip: str | None = None    # the commit the folders below are of
        self._top: Folder | None = None
        self.refused: dict[str, str] = {}
        self.entries: list[bytes] = []  # the index entries of the last commit() call's paths
        # Small folders let go after a call, by tree id, most recent last, as their bodies: a
        # paper's next figure often comes a few calls later (its rows are spread over the
        # budgets), and reading its folder again from git walks the index of every pack written since.
        self._let_go_recently: collections.OrderedDict[bytes, bytes] = collections.OrderedDict()
        self._let_go_bytes = 0
        self._spill: Spill | None = None  # the big folders' chunks

    def forget(self) -> None:
        """The branch is not where we think: read the folders again next time."""
        self.tip, self._top = None, None
        if self._spill is not None:
            self._spill.close()
            self._spill = None

    def _pack_written(self) -> None:
        """`git cat-file --batch` maps every pack it reads from and keeps the pages it touched:
        with one pack a call, a long run's reader grew without bound (210 MB at 100,000 rows).
        A fresh one every RECYCLE_READER_PACKS packs bounds it (each pack holds the big folders'
        first versions in full: 64 packs still let it reach 78 MB by 355,000 rows); the
        folders already loaded stay in this process, and starting git costs a few ms."""
        self._packs_since_reader += 1
        if self._packs_since_reader >= RECYCLE_READER_PACKS:
            self._reader.close()
            self._reader = ObjectReader(*self._reader_args)
            self._packs_since_reader = 0

    def alive(self) -> bool:
        return self._reader.proc.poll() is None

    def close(self) -> None:
        self._reader.close()
        if self._spill is not None:
            self._spill.close()
            self._spill = None

    def _load(self, oid: bytes) -> Folder:
        body = self._let_go_recently.pop(oid, None)
        if body is not None:
            self._let_go_bytes -= len(body) + LET_GO_OVERHEAD
            return Folder(body, oid)
        body = self._reader.read(oid, "tree")
        return Folder(body, oid, self._scratch() if len(body) >= KEEP_LOADED else None)

    def _start_from(self, tip: str | None) -> Folder:
        if self._top is not None and self.tip is not None and tip is not None and tip != self.tip:
            # The branch moved (another process, a user): what changed is applied to the folders
            # we hold, so the work grows with the changes and not with the big folders.
            try:
                caught_up = self._catch_up(tip)
            except (PackError, Refused, OSError, ValueError, subprocess.SubprocessError):
                caught_up = False
            if caught_up:
                self.tip = tip
                return self._top
        if self._top is None or self.tip != tip:
            # Otherwise the folders are read again, and the scratch file's chunks are all the old
            # tree's. Dropped with it, or it would grow by a big folder every call while counting
            # them live (nothing would rewrite it).
            self.forget()
            self._top = Folder() if tip is None else self._load(self._tree_of(tip))
            self.tip = tip
        return self._top

    def _catch_up(self, tip: str) -> bool:
        """Bring the folders held (the tree of `self.tip`) to `tip`'s tree by applying the files
        that differ (`git diff-tree`), when every difference is a file added or changed; then
        check the result against `tip`'s own tree id. False: read the folders again instead (a
        file deleted or turned into a folder, a tree id that does not match)."""
        assert self._top is not None and self.tip is not None
        root, env, timeout_s = self._reader_args
        out = subprocess.run(["git", "diff-tree", "-r", "-z", "--no-renames", "--raw", self.tip, tip],
                             cwd=root, env=dict(env), capture_output=True, timeout=timeout_s)
        if out.returncode != 0:
            return False
        fields = out.stdout.split(b"\0")
        changes: list[Blob] = []
        for k in range(0, len(fields) - 1, 2):
            meta, path = fields[k].split(), fields[k + 1]
            if len(meta) != 5 or meta[4] not in (b"A", b"M") or meta[1] not in BLOB_MODES:
                return False
            changes.append(Blob(path.decode("utf-8", "surrogateescape"), meta[1], bytes.fromhex(meta[3].decode()), 0, None))
        tree = self._tree_of(tip)
        for blob in changes:
            self._place(self._top, blob)
        return self._store(self._top, [], set()) == tree

    def _tree_of(self, tip: str) -> bytes:
        commit = self._reader.read(tip, "commit")
        if not commit.startswith(b"tree "):
            raise PackError(f"commit {tip} has no tree")
        return bytes.fromhex(commit[5:45].decode())

    def _place(self, top: Folder, blob: Blob) -> bool:
        """Put `blob` into the tree; False if that path already holds exactly it."""
        parts = blob.path.encode("utf-8", "surrogateescape").split(b"/")
        if any(p in (b"", b".", b"..") or p.lower() == b".git" or b"\0" in p for p in parts):
            raise Refused(f"{blob.path} is not a path git can hold")
        on_the_way = [top]
        folder = top
        for k, part in enumerate(parts[:-1]):
            child = folder.children.get(part)
            if child is None:
                found = folder.get(part)
                if found is None:
                    child = Folder()  # new from here down: nothing can be in the way below
                elif not _is_folder(found[0]):
                    raise Refused(f"{b'/'.join(parts[:k + 1]).decode(errors='replace')} is a file in the repository")
                else:
                    child = self._load(found[1])
                folder.children[part] = child
            folder = child
            on_the_way.append(folder)
        found = folder.get(parts[-1])
        # A folder may also be waiting to be stored (a path below this one, earlier in the call).
        if (found is not None and _is_folder(found[0])) or parts[-1] in folder.children:
            raise Refused(f"{blob.path} is a folder in the repository")
        if found == (blob.mode, blob.oid):
            return False
        folder.put(parts[-1], blob.mode, blob.oid)
        for f in on_the_way:
            f.tree_id = None
        return True

    def _store(self, folder: Folder, planned: list[_Tree], seen: set[bytes]) -> bytes:
        """Give `folder` (and its changed subfolders) their ids; plan their tree objects."""
        for name, child in folder.children.items():
            if child.tree_id is None:
                folder.put(name, FOLDER_MODE, self._store(child, planned, seen))
        chunks = list(folder.chunks)
        size = sum(map(folder.length, chunks))
        sha = hashlib.sha1(b"tree %d\0" % size)
        for piece in folder.pieces(chunks):
            sha.update(piece)
        folder.tree_id = oid = sha.digest()
        if oid not in seen:
            seen.add(oid)
            planned.append(_Tree(oid, chunks, size, folder))
        return oid

    def commit(self, tip: str | None, batches: Sequence[tuple[Sequence[Blob], str]]) -> list[str]:
        """One commit per (blobs, message) on top of `tip`, all in one pack; their ids. A batch
        changing nothing makes no commit and yields the id before it. Paths the tree has
        something else in the way of are left out and named in `refused`."""
        self.refused, self.entries = {}, []
        try:
            return self._commit(tip, batches)
        except BaseException:
            self.forget()  # the folders may be ahead of any commit that exists
            raise

    def _commit(self, tip: str | None, batches: Sequence[tuple[Sequence[Blob], str]]) -> list[str]:
        top = self._start_from(tip)
        plan: list[Blob | _Tree | tuple[bytes, bytes]] = []
        seen: set[bytes] = set()
        made: list[str] = []
        parent = tip
        for blobs, message in batches:
            changed = False
            for blob in blobs:
                try:
                    if self._place(top, blob):
                        changed = True
                        if blob.oid not in seen:
                            seen.add(blob.oid)
                            plan.append(blob)
                except Refused as exc:
                    self.refused[blob.path] = str(exc)
                    continue
                self.entries.append(b"%s blob %s\t%s" % (blob.mode, blob.oid.hex().encode(),
                                                          blob.path.encode("utf-8", "surrogateescape")))
            if not changed:  # nothing to commit in this batch: the commit before it ("" on an unborn branch)
                made.append(parent or "")
                continue
            trees: list[_Tree] = []
            tree_id = self._store(top, trees, seen)
            plan.extend(trees)
            when = b"%s %d +0000" % (self.ident, int(time.time()))
            body = b"tree %s\n" % tree_id.hex().encode()
            if parent is not None:
                body += b"parent %s\n" % parent.encode()
            body += b"author %s\ncommitter %s\n\n%s\n" % (when, when, message.encode("utf-8", "surrogateescape"))
            oid = hashlib.sha1(b"commit %d\0" % len(body) + body).digest()
            plan.append((oid, body))
            parent = oid.hex()
            made.append(parent)
        if plan:
            self._write(plan)
            self._pack_written()
        self.tip = parent
        try:
            self._let_go(top)
            self._compact()
        except OSError:
            # The scratch file cannot be written (a full disk): the commits are made and in
            # their pack all the same; the folders are read again from git next call.
            self.forget()
        return made

    def _write(self, plan: Sequence[Blob | _Tree | tuple[bytes, bytes]]) -> None:
        writer = PackWriter(self.pack_dir, len(plan))
        written: list[Folder] = []
        try:
            for item in plan:
                if isinstance(item, Blob):
                    if item.data is not None:
                        writer.add(item.oid, OBJ_BLOB, item.size, [item.data], _level(item.data[:16]))
                    else:
                        writer.add(item.oid, OBJ_BLOB, item.size, _read_checked(item), 1)
                elif isinstance(item, _Tree):
                    base = item.folder.written
                    if base is not None and item.size >= DELTA_FROM and base[2] < MAX_DEPTH:
                        delta = tree_delta(base[1], item.chunks, item.folder)
                        at = writer.add(item.oid, OBJ_OFS_DELTA, len(delta), [delta], 1, base_offset=base[0])
                        item.folder.written = (at, item.chunks, base[2] + 1)
                    else:
                        at = writer.add(item.oid, OBJ_TREE, item.size, item.folder.pieces(item.chunks), 1)
                        item.folder.written = (at, item.chunks, 0)
                    written.append(item.folder)
                else:
                    oid, body = item
                    writer.add(oid, OBJ_COMMIT, len(body), [body], 1)
            writer.finish()
        except BaseException:
            writer.abandon()
            raise
        finally:
            for folder in written:
                folder.written = None  # the next pack cannot use this one's objects as bases

    def _let_go(self, folder: Folder) -> None:
        """Forget small subfolders (read again when needed); the big ones stay, this one too,
        their chunks in the scratch file."""
        for name, child in list(folder.children.items()):
            self._let_go(child)
            if child.children or child.spill is not None:  # kept
                continue
            del folder.children[name]
            if child.tree_id is not None and child.tree_id not in self._let_go_recently:
                body = child.body()  # its objects are in a pack now
                self._let_go_recently[child.tree_id] = body
                self._let_go_bytes += len(body) + LET_GO_OVERHEAD
        while self._let_go_bytes > LET_GO_KEPT and self._let_go_recently:
            _oid, old = self._let_go_recently.popitem(last=False)
            self._let_go_bytes -= len(old) + LET_GO_OVERHEAD
        if folder.size() >= KEEP_LOADED:
            folder.spill_to(self._scratch())

    def _scratch(self) -> Spill:
        if self._spill is None:
            self._spill = Spill(self.pack_dir.parent)
        return self._spill

    def _compact(self) -> None:
        """Rewrite the scratch file with only its live chunks once it is mostly garbage (each
        call appends the chunks it changed): it stays within twice the big folders' size."""
        old = self._spill
        if old is None or old.end <= 2 * old.live + SPILL_SLACK:
            return
        new = Spill(self.pack_dir.parent)
        todo = [self._top] if self._top is not None else []
        while todo:
            folder = todo.pop()
            if folder.spill is old:
                folder.spill_to(new)
            todo.extend(folder.children.values())
        self._spill = new
        old.close()


def _read_checked(blob: Blob) -> Iterator[bytes]:
    """A large file's bytes from disk, as they are hashed: a file changed since its id was
    computed must not be stored under that id."""
    assert blob.source is not None
    sha = hashlib.sha1(b"blob %d\0" % blob.size)
    left = blob.size
    with open(blob.source, "rb") as fh:
        while left:
            block = fh.read(min(BLOB_CHUNK, left))
            if not block:
                raise PackError(f"{blob.path} shrank while being committed")
            sha.update(block)
            left -= len(block)
            yield block
    if sha.digest() != blob.oid:
        raise PackError(f"{blob.path} changed while being committed")


# -- the worker process -----------------------------------------------------------------------------
# Commits are built in a process of their own (`python -m crawler.gitpack`), as fast-import's
# were: the tree work is Python, and on a thread of the job it held the GIL the event loop needs
# (the job got slower, not faster), and its folders' memory would count against the job's.
# Requests and replies are pickles over stdin and stdout, one at a time:
#   ("commit", setup, tip, [([(path, bytes or None, sha256 to check or None), ...], message), ...])
#       → ("ok", commit ids, {path: why refused}, [index entry of each path committed])
#   ("forget",) → ("ok",)
#   ("index", index path or None, out path, [index-info line], git dir)
#       → ("ok", new shared part's file name or None) | ("unsupported", why): see gitindex.add
# A failure replies ("error", one line); the worker keeps serving.
Setup = tuple[str, str, dict[str, str], float, bytes]  # root, objects dir, git env, timeout_s, ident


def work(packer: PackCommitter, tip: str | None,
         batches: Sequence[tuple[Sequence[tuple[str, bytes | None, str | None]], str]]
         ) -> tuple[list[str], dict[str, str], list[bytes]]:
    """Describe the files (every one looked at before anything is written), then commit them.
    What is held in memory until the pack is written stays under HOLD_MAX, however many large
    files one call brings."""
    refused: dict[str, str] = {}
    described: list[tuple[list[Blob], str]] = []
    held = 0
    for paths, message in batches:
        blobs = []
        for path, known, expected in paths:
            try:
                blob = describe(packer.root, path, known, expected, hold=held < HOLD_MAX)
            except (Refused, OSError, ValueError) as exc:  # ValueError: a NUL in the path
                refused[path] = str(exc)
                continue
            held += len(blob.data) if blob.data is not None else 0
            blobs.append(blob)
        described.append((blobs, message))
    if not any(blobs for blobs, _ in described):
        return [], refused, []
    made = packer.commit(tip, described)
    refused.update(packer.refused)
    return made, refused, packer.entries


class _Worker:
    """The worker's state: the committer, kept between calls (its folders stay loaded)."""

    def __init__(self) -> None:
        self.packer: PackCommitter | None = None

    def commit(self, setup: Setup, tip: str | None,
               batches: Sequence[tuple[Sequence[tuple[str, bytes | None, str | None]], str]]
               ) -> tuple[list[str], dict[str, str], list[bytes]]:
        if self.packer is not None and not self.packer.alive():
            self.packer.close()  # its object reader died (killed, out of memory)
            self.packer = None
        if self.packer is None:
            root, objects, env, timeout_s, ident = setup
            self.packer = PackCommitter(Path(root), Path(objects), env, timeout_s, ident)
        return work(self.packer, tip, batches)

    def forget(self) -> None:
        """Our last commits did not become the branch."""
        if self.packer is not None:
            self.packer.forget()

    def close(self) -> None:
        if self.packer is not None:
            self.packer.close()


def serve(requests: BinaryIO, replies: BinaryIO) -> None:
    # One malloc arena, and memory freed after each call handed back to the system: a new
    # shared index part streams a hundred MB through short-lived objects, and glibc otherwise
    # keeps those pages (the job does the same: crawler/native.py).
    native.one_malloc_arena()
    worker = _Worker()
    while True:
        try:
            request = pickle.load(requests)
        except EOFError:
            break
        try:
            if request[0] == "commit":
                reply: tuple = ("ok", *worker.commit(*request[1:]))
            elif request[0] == "forget":
                worker.forget()
                reply = ("ok",)
            elif request[0] == "index":
                _kind, current, out, lines, gitdir = request
                try:
                    reply = ("ok", gitindex.add(Path(current) if current else None, Path(out),
                                                gitindex.parse_index_info(lines), Path(gitdir)))
                except gitindex.Unsupported as exc:
                    Path(out).unlink(missing_ok=True)
                    reply = ("unsupported", str(exc))
            else:
                reply = ("error", f"unknown request {request[0]!r}")
        except (PackError, OSError, subprocess.TimeoutExpired) as exc:
            reply = ("error", str(exc))
        except Exception as exc:  # a bug: said in one line, and this worker keeps serving
            reply = ("error", f"{type(exc).__name__}: {exc}")
        pickle.dump(reply, replies, protocol=pickle.HIGHEST_PROTOCOL)
        replies.flush()
        native.malloc_trim()
    worker.close()


if __name__ == "__main__":
    # The replies get a descriptor of their own; anything printed goes to stderr instead.
    replies = os.fdopen(os.dup(1), "wb")
    os.dup2(2, 1)
    serve(sys.stdin.buffer, replies)
