"""Adding entries to a checkout's split git index without loading it.

`git update-index` reads the whole index, shared part included, to add a few hundred entries:
about 260 MB of memory and 150-200 ms a call at a million tracked files. This module writes
git's own on-disk format (Documentation/gitformat-index.txt, split index in
gitformat-index's "Split index" and technical/split-index) itself, streaming, so its memory
does not grow with the index:

- Most calls rewrite only the small split part: its replacement entries as they were, its new
  entries merged with ours by name, the link to the shared part as it was, the tree cache with
  the folders above our paths marked invalid, the resolve-undo data as it was.
- Once the entries outside the shared part outweigh it (`reshare_due`), a call writes a new
  shared part: the old one with the split part's deletions and replacements applied, merged with
  the split part's new entries and ours, one entry at a time, and an empty split part linked to it.

Our entries are stage 0 and carry no stat data (as `update-index --index-info` writes them), so
git checks their content the first time it looks. An entry of ours replaces every entry of the
same name. Extensions that index entries by position or cache what our entries change (the
untracked cache, fsmonitor, the offset tables) are dropped, as git allows for optional ones.
What we do not write (index version 4, a sparse index, an unknown required extension, a part
whose checksum is wrong) raises Unsupported, and the caller lets git do it.
"""

from __future__ import annotations

import bisect
import hashlib
import math
import os
import struct
import time
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import BinaryIO

SIGNATURE = b"DIRC"
HASH_LEN = 20  # sha1 repositories only (gitpack refuses the others)
READ_CHUNK = 256 << 10  # bytes read (and written) at a time: a new shared part of 100 MB streams through this
# A new shared part once the entries outside it number more than sqrt(SPLIT_BALANCE * shared):
# with about 400 entries added per call, this balances rewriting the split part on every call
# (cost ~ its entries) against rewriting the shared part now and then (~ all entries), about
# 28,000 entries outside a shared part of a million.
SPLIT_BALANCE = 800
SPLIT_MIN = 2000
SHARED_EXPIRE_S = 3600  # superseded shared parts removed after an hour (unless splitIndex.sharedIndexExpire says)
_UNITS = {"second": 1, "minute": 60, "hour": 3600, "day": 86400, "week": 604800, "month": 2592000, "year": 31536000}


def expiry_s(setting: str) -> float | None:
    """splitIndex.sharedIndexExpire as seconds: "now" 0, "never" None, "<n>.<unit>[s].ago";
    anything else (a date) None: when unsure, keep."""
    text = setting.strip().lower()
    if not text:
        return SHARED_EXPIRE_S
    if text == "now":
        return 0.0
    parts = text.split(".")
    if len(parts) == 3 and parts[2] == "ago" and parts[0].isdigit() and parts[1].rstrip("s") in _UNITS:
        return int(parts[0]) * _UNITS[parts[1].rstrip("s")]
    return None
_DROPPED = {b"UNTR", b"FSMN", b"EOIE", b"IEOT"}  # by position, or caching what we change


class Unsupported(Exception):
    """An index this module does not write; git must do it."""


class _Stream:
    """Bytes of one file region, read in chunks, hashed as they are read."""

    def __init__(self, fh: BinaryIO, start: int, end: int, digest: hashlib._Hash | None = None) -> None:
        self.fh, self.left, self.digest = fh, end - start, digest
        self.end = end
        fh.seek(start)
        self.buf, self.pos = b"", 0

    def tell(self) -> int:
        """The file offset of the next byte `take` returns."""
        return self.end - self.left - (len(self.buf) - self.pos)

    def _fill(self, n: int) -> None:
        while len(self.buf) - self.pos < n:
            chunk = self.fh.read(min(READ_CHUNK, self.left))
            if not chunk:
                raise Unsupported("the index ends early")
            if self.digest is not None:
                self.digest.update(chunk)
            self.left -= len(chunk)
            self.buf, self.pos = self.buf[self.pos:] + chunk, 0

    def take(self, n: int) -> bytes:
        self._fill(n)
        out = self.buf[self.pos:self.pos + n]
        self.pos += n
        return out

    def until_nul(self) -> bytes:
        while True:
            at = self.buf.find(b"\0", self.pos)
            if at >= 0:
                out = self.buf[self.pos:at]
                self.pos = at + 1
                return out
            self._fill(len(self.buf) - self.pos + 1)

    def rest(self) -> None:
        """Read (and hash) what is left of the region."""
        while self.left:
            self._fill(len(self.buf) - self.pos + 1)
            self.buf, self.pos = b"", 0


class Entry:
    __slots__ = ("raw", "name", "stage", "name_at")

    def __init__(self, raw: bytes, name: bytes, stage: int, name_at: int) -> None:
        self.raw, self.name, self.stage, self.name_at = raw, name, stage, name_at

    def named(self, name: bytes) -> Entry:
        """This (stripped) replacement entry under `name`, as it stands in the merged index."""
        flags = int.from_bytes(self.raw[60:62], "big")
        flags = (flags & ~0xFFF) | min(len(name), 0xFFF)
        head = self.raw[:60] + flags.to_bytes(2, "big") + self.raw[62:self.name_at]
        return Entry(head + name + b"\0" * (_padded(self.name_at, len(name)) - self.name_at - len(name)),
                     name, self.stage, self.name_at)


def _padded(name_at: int, name_len: int) -> int:
    return (name_at + name_len + 8) & ~7


def _entry(s: _Stream, version: int) -> Entry:
    head = s.take(62)
    flags = int.from_bytes(head[60:62], "big")
    name_at = 62
    if flags & 0x4000:
        if version < 3:
            raise Unsupported("extended flags in a version 2 index")
        head += s.take(2)
        name_at = 64
    n = flags & 0xFFF
    if n < 0xFFF:
        rest = s.take(_padded(name_at, n) - name_at)
        name = rest[:n]
    else:  # 4095 bytes or more: the name runs to its NUL
        name = s.until_nul()
        rest = name + b"\0" + s.take(_padded(name_at, len(name)) - name_at - len(name) - 1)
    return Entry(head + rest, name, (flags >> 12) & 3, name_at)


def encode(mode: int, oid: bytes, name: bytes) -> Entry:
    """A stage-0 entry with no stat data, as `update-index --index-info` makes it (a regular
    file's mode normalised to 100644 or 100755, as git's create_ce_mode does)."""
    if mode & 0o170000 == 0o100000:
        mode = 0o100755 if mode & 0o100 else 0o100644
    head = struct.pack(">10I", 0, 0, 0, 0, 0, 0, mode, 0, 0, 0) + oid + min(len(name), 0xFFF).to_bytes(2, "big")
    return Entry(head + name + b"\0" * (_padded(62, len(name)) - 62 - len(name)), name, 0, 62)


def parse_index_info(lines: Sequence[bytes]) -> list[Entry]:
    """`<mode> blob <hex id>\\t<path>` lines (ls-tree's form) as entries, sorted, last one of a
    name kept."""
    by_name: dict[bytes, Entry] = {}
    for line in lines:
        meta, _tab, path = line.partition(b"\t")
        mode, _kind, hexid = meta.split(b" ")
        if not path or len(hexid) != 2 * HASH_LEN:
            raise ValueError(f"not an index entry: {line[:120]!r}")
        by_name[path] = encode(int(mode, 8), bytes.fromhex(hexid.decode()), path)
    return [by_name[k] for k in sorted(by_name)]


class _Part:
    """One index file: its header; after scan(), where its extensions lie, checksum checked."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.fh: BinaryIO = open(path, "rb")
        size = os.fstat(self.fh.fileno()).st_size
        self.head = self.fh.read(12)
        if len(self.head) < 12 or self.head[:4] != SIGNATURE or size < 12 + HASH_LEN:
            self.fh.close()
            raise Unsupported(f"{path.name} is not a git index")
        self.version, self.count = struct.unpack(">II", self.head[4:])
        if self.version not in (2, 3):
            self.fh.close()
            raise Unsupported(f"index version {self.version}")
        self.end = size - HASH_LEN
        self.ext_at = self.end  # until scan(): entries and extensions as one region
        self.extensions: dict[bytes, tuple[int, int]] = {}  # signature -> (offset of data, size)

    def scan(self) -> None:
        digest = hashlib.sha1(self.head)
        s = _Stream(self.fh, 12, self.end, digest)
        for _ in range(self.count):
            _entry(s, self.version)
        self.ext_at = at = s.tell()
        while at < self.end:
            sig = s.take(4)
            n = int.from_bytes(s.take(4), "big")
            if sig in self.extensions or at + 8 + n > self.end:
                raise Unsupported(f"a malformed extension in {self.path.name}")
            if not (b"A" <= sig[:1] <= b"Z") and sig != b"link":
                raise Unsupported(f"required index extension {sig!r}")  # sdir (a sparse index), or newer than us
            self.extensions[sig] = (at + 8, n)
            _skip(s, n)
            at += 8 + n
        self.check(s)

    def check(self, s: _Stream) -> None:
        """After `s` (a hashed stream from the first entry) has read its entries: the checksum."""
        s.rest()
        self.fh.seek(self.end)
        trailer = self.fh.read(HASH_LEN)
        assert s.digest is not None
        if trailer != s.digest.digest() and trailer != bytes(HASH_LEN):  # all zero: index.skipHash
            raise Unsupported(f"{self.path.name}: checksum does not match")

    def entries(self, skip: int = 0, hashed: bool = False) -> tuple[_Stream, int]:
        """A stream at its first entry (after skipping `skip`), and how many are left."""
        s = _Stream(self.fh, 12, self.ext_at, hashlib.sha1(self.head) if hashed else None)
        for _ in range(skip):
            _entry(s, self.version)
        return s, self.count - skip

    def extension(self, sig: bytes) -> bytes | None:
        if sig not in self.extensions:
            return None
        at, n = self.extensions[sig]
        self.fh.seek(at)
        return self.fh.read(n)

    def close(self) -> None:
        self.fh.close()


def _skip(s: _Stream, n: int) -> None:
    while n:
        step = min(n, READ_CHUNK)
        s.take(step)
        n -= step


def ewah_bits(data: bytes) -> tuple[list[int], int]:
    """The set positions of a serialised EWAH bitmap, and its length in bytes."""
    if len(data) < 8:
        raise Unsupported("a malformed bitmap in the link extension")
    bit_size, words = struct.unpack(">II", data[:8])
    end = 8 + 8 * words + 4
    if len(data) < end:
        raise Unsupported("a malformed bitmap in the link extension")
    out: list[int] = []
    pos, i = 0, 0
    while i < words:
        rlw = int.from_bytes(data[8 + 8 * i:16 + 8 * i], "big")
        i += 1
        run_bit, run_len, literals = rlw & 1, (rlw >> 1) & 0xFFFFFFFF, rlw >> 33
        if run_bit:
            out.extend(range(pos, pos + 64 * run_len))
        pos += 64 * run_len
        for _ in range(literals):
            if i >= words:
                raise Unsupported("a malformed bitmap in the link extension")
            word = int.from_bytes(data[8 + 8 * i:16 + 8 * i], "big")
            i += 1
            while word:
                low = word & -word
                out.append(pos + low.bit_length() - 1)
                word ^= low
            pos += 64
    return [p for p in out if p < bit_size], end


EMPTY_EWAH = struct.pack(">IIQI", 0, 1, 0, 0)  # what git writes for a bitmap with no bit set


class _Link:
    def __init__(self, data: bytes) -> None:
        if len(data) < HASH_LEN:
            raise Unsupported("a malformed link extension")
        self.raw, self.base = data, data[:HASH_LEN]
        rest = data[HASH_LEN:]
        self.deleted: list[int] = []
        self.replaced: list[int] = []
        if rest:
            self.deleted, n = ewah_bits(rest)
            self.replaced, m = ewah_bits(rest[n:])
            if n + m != len(rest):
                raise Unsupported("a malformed link extension")


def reshare_due(shared: int, outside: int) -> bool:
    return outside > max(SPLIT_MIN, math.isqrt(SPLIT_BALANCE * max(shared, 1)))


class _Writer:
    """An index file being written: entries counted, header patched and checksum added at the end."""

    def __init__(self, path: Path, version: int) -> None:
        self.path, self.version, self.count = path, version, 0
        self.fh = open(path, "wb")
        self.fh.write(SIGNATURE + struct.pack(">II", version, 0))
        self.pending: list[bytes] = []
        self.pending_n = 0
        self.at = 12  # where the next entry starts
        self.samples = Samples()

    def entry(self, e: Entry) -> None:
        if e.name_at == 64:
            self.version = 3
        if self.count % SAMPLE_EVERY == 0:
            self.samples.add(e.name, self.at)
        self.at += len(e.raw)
        self.pending.append(e.raw)
        self.pending_n += len(e.raw)
        self.count += 1
        if self.pending_n >= READ_CHUNK:
            self._flush()

    def _flush(self) -> None:
        self.fh.write(b"".join(self.pending))
        self.pending, self.pending_n = [], 0

    def abandon(self) -> None:
        self.fh.close()
        self.path.unlink(missing_ok=True)

    def extension(self, sig: bytes, data: bytes) -> None:
        self._flush()
        self.fh.write(sig + len(data).to_bytes(4, "big") + data)

    def finish(self) -> bytes:
        """Patch the header, append the checksum, flush to disk; the file's id."""
        self._flush()
        self.fh.seek(4)
        self.fh.write(struct.pack(">II", self.version, self.count))
        self.fh.flush()
        digest = hashlib.sha1()
        with open(self.path, "rb") as again:
            while chunk := again.read(READ_CHUNK):
                digest.update(chunk)
        self.fh.seek(0, os.SEEK_END)
        oid = digest.digest()
        self.fh.write(oid)
        self.fh.flush()
        os.fsync(self.fh.fileno())
        self.fh.close()
        return oid


def _tree_invalidated(data: bytes, dirs: set[bytes]) -> bytes:
    """The TREE extension with every folder in `dirs` (and the root) marked invalid, as git does
    when it adds an entry below them."""
    out: list[bytes] = []
    pos = 0
    stack: list[tuple[bytes, int]] = []  # (folder path, subtrees still to come)
    while pos < len(data):
        nul = data.index(b"\0", pos)
        component = data[pos:nul]
        nl = data.index(b"\n", nul)
        count_s, subtrees_s = data[nul + 1:nl].split(b" ")
        count, subtrees = int(count_s), int(subtrees_s)
        pos = nl + 1
        while stack and stack[-1][1] == 0:
            stack.pop()
        if stack:
            parent, left = stack[-1]
            stack[-1] = (parent, left - 1)
            path = parent + b"/" + component if parent else component
        else:
            path = b""
        oid = b""
        if count >= 0:
            oid = data[pos:pos + HASH_LEN]
            pos += HASH_LEN
        if count >= 0 and (path == b"" or path in dirs):
            count, oid = -1, b""
        out.append(component + b"\0" + str(count).encode() + b" " + subtrees_s + b"\n" + oid)
        stack.append((path, subtrees))
    return b"".join(out)


def _folders(entries: Sequence[Entry]) -> set[bytes]:
    dirs: set[bytes] = set()
    for e in entries:
        parts = e.name.split(b"/")[:-1]
        for i in range(1, len(parts) + 1):
            dirs.add(b"/".join(parts[:i]))
    return dirs


class _Clash:
    """Entries git would have to resolve when ours are added (update-index replaces them, and
    records resolve-undo for conflicted ones): a file where one of ours needs a folder, entries
    below a path of ours, a conflicted entry of a path of ours. We leave those to git."""

    def __init__(self, ours: Sequence[Entry]) -> None:
        self.names = {e.name for e in ours}
        self.folders = _folders(ours)
        self.area = self.names | self.folders

    def check(self, entries: Iterator[Entry]) -> Iterator[Entry]:
        for e in entries:
            name = e.name
            if name in self.folders:
                raise Unsupported(f"{name.decode(errors='replace')} is a file in the index where a path of ours needs a folder")
            if e.stage and name in self.names:
                raise Unsupported(f"{name.decode(errors='replace')} is in conflict in the index")
            at = name.find(b"/")
            while at > 0:  # its folders, from the top, while they are among ours
                head = name[:at]
                if head not in self.area:
                    break
                if head in self.names:
                    raise Unsupported(f"{name.decode(errors='replace')} is below a path of ours in the index")
                at = name.find(b"/", at + 1)
            yield e


SAMPLE_EVERY = 128  # one name in this many of a shared part is kept, with where it starts
_SAMPLED: dict[str, Samples] = {}  # by shared part path: the latest one (the worker process keeps it)


class Samples:
    """Every SAMPLE_EVERY-th name of a shared part and its offset: the entries near a name are
    found by reading one stretch of the file, not all of it (about 1 MB at a million entries)."""

    def __init__(self) -> None:
        self.names: list[bytes] = []
        self.offsets: list[int] = []

    def add(self, name: bytes, offset: int) -> None:
        self.names.append(name)
        self.offsets.append(offset)

    def around(self, part: _Part, ranges: list[tuple[bytes, bytes]]) -> Iterator[Entry]:
        """Every entry whose name lies in one of the [lo, hi) ranges, and some around them: the
        stretches of the file from the sample before each lo to the first name at or past its
        hi, each read once."""
        if not self.offsets:
            return
        read_to = 0
        for lo, hi in sorted(ranges):
            start = max(self.offsets[max(bisect.bisect_right(self.names, lo) - 1, 0)], read_to)
            if start >= part.ext_at:
                continue
            s = _Stream(part.fh, start, part.ext_at)
            while s.tell() < part.ext_at:
                e = _entry(s, part.version)
                read_to = s.tell()
                yield e
                if e.name >= hi:
                    break


def _samples(shared: _Part) -> Samples:
    """The shared part's samples: kept from when we wrote it, or read once (one written by git)."""
    key = str(shared.path)
    found = _SAMPLED.get(key)
    if found is None:
        found = Samples()
        s, n = shared.entries()
        for k in range(n):
            at = s.tell()
            e = _entry(s, shared.version)
            if k % SAMPLE_EVERY == 0:
                found.add(e.name, at)
        _SAMPLED.clear()
        _SAMPLED[key] = found
    return found


def _merged(*sources: Iterator[Entry]) -> Iterator[Entry]:
    """Entries of sorted sources, by (name, stage); for a name, only the entries of the last
    source that has it (later sources take precedence)."""
    heads: list[Entry | None] = [next(src, None) for src in sources]
    while True:
        names = [h.name for h in heads if h is not None]
        if not names:
            return
        low = min(names)
        group: list[Entry] = []
        for k, src in enumerate(sources):
            taken: list[Entry] = []
            while heads[k] is not None and heads[k].name == low:  # type: ignore[union-attr]
                taken.append(heads[k])  # type: ignore[arg-type]
                heads[k] = next(src, None)
            if taken:
                group = taken
        yield from sorted(group, key=lambda e: e.stage)


def _read(s: _Stream, n: int, version: int) -> Iterator[Entry]:
    for _ in range(n):
        yield _entry(s, version)


def add(index: Path | None, out: Path, ours: Sequence[Entry], gitdir: Path) -> str | None:
    """Write to `out` the index `index` (None: none yet) with `ours` added (sorted by name).
    Returns the file name of the new shared part, if one was written. The index must be left
    untouched by others meanwhile (git's index.lock held)."""
    part = _Part(index) if index is not None else None
    try:
        if part is not None:
            part.scan()
        link = None
        if part is not None and b"link" in part.extensions:
            link = _Link(part.extension(b"link") or b"")
            if link.base == bytes(HASH_LEN):
                raise Unsupported("a split index that needs no shared part")
        shared = None
        try:
            if link is not None:
                shared = _Part(gitdir / f"sharedindex.{link.base.hex()}")
                os.utime(shared.path)  # in use: not expired by anyone's next new shared part (git does the same)
            made = None
            if part is not None and link is not None and shared is not None and \
                    not reshare_due(shared.count, part.count + len(ours) + len(link.deleted)):
                _rewrite_split(part, link, shared, ours, out)
            else:
                made = _reshare(part, link, shared, ours, out, gitdir)
            if part is not None:
                # The old index's time, kept: git takes an entry whose file changed in the same
                # second as the index was written as "racily clean" and looks at its content;
                # a newer time would make such an entry look clean, and hide that change.
                st = os.fstat(part.fh.fileno())
                os.utime(out, ns=(st.st_atime_ns, st.st_mtime_ns))
            return made
        finally:
            if shared is not None:
                shared.close()
    finally:
        if part is not None:
            part.close()


def _extensions(w: _Writer, part: _Part | None, ours: Sequence[Entry], link: bytes) -> None:
    w.extension(b"link", link)
    if part is None:
        return
    for sig in part.extensions:
        if sig == b"link" or sig in _DROPPED:
            continue
        data = part.extension(sig) or b""
        if sig == b"TREE":
            try:
                data = _tree_invalidated(data, _folders(ours))
            except (ValueError, IndexError):
                continue  # an unreadable tree cache: dropped, as git ignores one it cannot read
        elif sig != b"REUC":
            continue  # an optional extension we do not know: dropped, as git allows
        w.extension(sig, data)


def _rewrite_split(part: _Part, link: _Link, shared: _Part, ours: Sequence[Entry], out: Path) -> None:
    clash = _Clash(ours)
    # The shared part is not read through: only where a name of ours, or a folder of one, would
    # sit ([folder, folder + NUL): that name exactly; [path, path + "0"): it and all below it).
    ranges = [(d, d + b"\0") for d in clash.folders] + [(n, n + b"0") for n in clash.names]
    for _ in clash.check(_samples(shared).around(shared, ranges)):
        pass
    w = _Writer(out, part.version)
    try:
        s, n = part.entries()
        replacements = len(link.replaced)
        if replacements > n:
            raise Unsupported("more replacements than entries in the split index")
        for e in _read(s, replacements, part.version):
            if e.name:
                raise Unsupported("a replacement entry with a name")
            w.entry(e)
        for e in _merged(clash.check(_read(s, n - replacements, part.version)), iter(ours)):
            w.entry(e)
        _extensions(w, part, ours, link.raw)
    except BaseException:
        w.abandon()
        raise
    w.finish()


def _reshare(part: _Part | None, link: _Link | None, shared: _Part | None, ours: Sequence[Entry],
             out: Path, gitdir: Path) -> str:
    if link is not None:
        assert part is not None and shared is not None
        base_s, base_n = shared.entries(hashed=True)
        base: Iterator[Entry] = _applied(_read(base_s, base_n, shared.version), link, part)
        news_s, news_n = part.entries(skip=len(link.replaced))
        news: Iterator[Entry] = _read(news_s, news_n, part.version)
        version = max(part.version, shared.version)
    elif part is not None:  # a whole index: all of it becomes the shared part
        s, n = part.entries()
        base, news, version = _read(s, n, part.version), iter(()), part.version
    else:
        base, news, version = iter(()), iter(()), 2
    tmp = gitdir / f"sharedindex_crawler.{os.getpid()}"
    w = _Writer(tmp, version)
    try:
        clash = _Clash(ours)
        for e in _merged(clash.check(base), clash.check(news), iter(ours)):
            w.entry(e)
        if shared is not None:
            shared.check(base_s)  # before anything is published
    except BaseException:
        w.abandon()
        raise
    oid = w.finish()
    name = f"sharedindex.{oid.hex()}"
    os.replace(tmp, gitdir / name)
    _SAMPLED.clear()
    _SAMPLED[str(gitdir / name)] = w.samples
    split = _Writer(out, version)
    try:
        _extensions(split, part, ours, oid + EMPTY_EWAH + EMPTY_EWAH)
    except BaseException:
        split.abandon()
        raise
    split.finish()
    return name


def _applied(base: Iterator[Entry], link: _Link, part: _Part) -> Iterator[Entry]:
    """The shared part's entries with the split part's deletions and replacements applied."""
    deleted = set(link.deleted)
    replaced = iter(link.replaced)
    s, _n = part.entries()
    next_replaced = next(replaced, None)
    for pos, e in enumerate(base):
        if pos == next_replaced:
            if pos in deleted:
                raise Unsupported("an entry both replaced and deleted")
            r = _entry(s, part.version)
            if r.name:
                raise Unsupported("a replacement entry with a name")
            next_replaced = next(replaced, None)
            yield r.named(e.name)
        elif pos not in deleted:
            yield e
    if next_replaced is not None:
        raise Unsupported("a replacement past the end of the shared index")


def expire_shared(gitdir: Path, keep: set[str], now: float | None = None,
                  expire_s: float | None = SHARED_EXPIRE_S) -> list[str]:
    """Remove shared parts not in `keep` untouched for `expire_s` (None: never), as git does
    when it writes one; the names removed."""
    if expire_s is None:
        return []
    now = time.time() if now is None else now
    removed = []
    for f in gitdir.glob("sharedindex.*"):
        if f.name in keep:
            continue
        try:
            if now - f.stat().st_mtime > expire_s:
                f.unlink()
                removed.append(f.name)
        except OSError:
            pass
    return removed
