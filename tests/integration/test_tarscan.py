"""The streaming tar scanner against real tarballs built here: hostile members, truncation and
corruption, gzip / zstd / plain, bounded memory, backpressure, cancellation."""

from __future__ import annotations

import asyncio
import bz2
import gzip
import lzma
import hashlib
import io
import os
import re
import tarfile
import tracemalloc
from collections.abc import AsyncIterator, Callable
from pathlib import Path

import pytest
import zstandard

from crawler.tarscan import MemberRecord, ScanResult, normalise_member_path, scan

MiB = 1 << 20
STAGING_NAME = re.compile(r"^\d{8}-[0-9a-f]{12}\.bin$")


def sha(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def member(name: str, data: bytes = b"", kind: bytes = tarfile.REGTYPE, **attrs: object) -> tuple:
    info = tarfile.TarInfo(name)
    info.type = kind
    info.size = len(data) if kind in (tarfile.REGTYPE, tarfile.AREGTYPE) else 0
    for key, value in attrs.items():
        setattr(info, key, value)
    return info, data


def make_tar(members: list[tuple], fmt: int = tarfile.PAX_FORMAT) -> bytes:
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=fmt) as tf:
        for info, data in members:
            tf.addfile(info, io.BytesIO(data) if info.isreg() else None)
    return buf.getvalue()


def zstd(data: bytes) -> bytes:
    return zstandard.ZstdCompressor(write_checksum=True).compress(data)


class Source:
    """An async chunk source that records how far it was read and whether it was closed."""

    def __init__(self, data: bytes, chunk: int = 4096, then: Callable[[], object] | None = None,
                 split_head: int = 0) -> None:
        self.data = data
        self.chunk = chunk
        self.then = then
        self.split_head = split_head  # yield this many leading bytes one at a time
        self.yielded = 0
        self.closed = False

    async def __call__(self) -> AsyncIterator[bytes]:
        try:
            head = min(self.split_head, len(self.data))
            for i in range(head):
                self.yielded += 1
                yield self.data[i:i + 1]
            for i in range(head, len(self.data), self.chunk):
                self.yielded += 1
                yield self.data[i:i + self.chunk]
            if self.then is not None:
                result = self.then()
                if asyncio.iscoroutine(result):
                    await result
        finally:
            self.closed = True


async def run(data: bytes, staging: Path, wanted: Callable[[str, int], bool] = lambda p, size: True,
              chunk: int = 4096, split_head: int = 0, **kw: object) -> tuple[ScanResult, list[MemberRecord]]:
    records: list[MemberRecord] = []
    kw.setdefault("max_member_bytes", 10 * MiB)
    kw.setdefault("max_members", 1000)
    source = Source(data, chunk, split_head=split_head)
    result = await scan(source(), wanted, staging, on_member=records.append, **kw)
    assert source.closed
    return result, records


def staged(staging: Path) -> set[str]:
    return {p.name for p in staging.iterdir()} if staging.exists() else set()


def assert_extracted(result: ScanResult, expected: dict[str, bytes]) -> None:
    assert set(result.extracted) == set(expected)
    for path, data in expected.items():
        got = result.extracted[path]
        assert got.size == len(data)
        assert got.sha256 == sha(data)
        assert got.staging_path.read_bytes() == data
        assert STAGING_NAME.match(got.staging_path.name)


# --- hostile members ---------------------------------------------------------------------------


async def test_hostile_tarball_writes_nothing_outside_staging(tmp_path: Path) -> None:
    staging = tmp_path / "deep" / "er" / "staging"
    outside = tmp_path / "outside"
    members = [
        member("data", kind=tarfile.DIRTYPE),
        member("data/ok.csv", b"a,b\n1,2\n"),
        member(str(outside / "abs.csv"), b"absolute"),
        member("../escape.csv", b"dotdot"),
        member("data/../../../escape2.csv", b"dotdot2"),
        member("data/passwd.csv", kind=tarfile.SYMTYPE, linkname="/etc/passwd"),
        member("data/hard.csv", kind=tarfile.LNKTYPE, linkname="../../../etc/passwd"),
        member("data/null.csv", kind=tarfile.CHRTYPE, devmajor=1, devminor=3),
        member("data/disk.csv", kind=tarfile.BLKTYPE, devmajor=8, devminor=0),
        member("data/pipe.csv", kind=tarfile.FIFOTYPE),
        member("data/dup.csv", b"first copy"),
        member("data/big.csv", b"x" * 5000),
        member("other/unwanted.txt", b"not wanted"),
        member("./data//dot.csv", b"dot"),
        member("data/dup.csv", b"second copy wins"),
        member("data/late.csv", b"beyond the member limit"),
    ]
    max_members = len(members) - 1
    tar = gzip.compress(make_tar(members))
    result, records = await run(tar, staging, wanted=lambda p, size: p.startswith("data/"),
                                max_member_bytes=4096, max_members=max_members)

    assert result.error is None
    assert result.members == len(members)
    assert_extracted(result, {"data/ok.csv": b"a,b\n1,2\n", "data/dot.csv": b"dot",
                              "data/dup.csv": b"second copy wins"})
    # The earlier copy of data/dup.csv was deleted; nothing else was ever written anywhere.
    assert staged(staging) == {e.staging_path.name for e in result.extracted.values()}
    written = {p.relative_to(tmp_path).as_posix() for p in tmp_path.rglob("*")}
    assert written == {"deep", "deep/er", "deep/er/staging",
                       *(f"deep/er/staging/{n}" for n in staged(staging))}

    # Every header reached on_member, in order, with what happened to it.
    assert [r.index for r in records] == list(range(len(members)))
    assert [r.path for r in records] == [m[0].name for m in members]
    types = {r.path: r.type for r in records}
    assert types["data"] == "dir" and types["data/passwd.csv"] == "symlink"
    assert types["data/hard.csv"] == "hardlink" and types["data/null.csv"] == "device"
    assert types["data/disk.csv"] == "device" and types["data/pipe.csv"] == "fifo"

    reasons = {r.path: r.skipped for r in result.skipped}
    assert reasons == {
        str(outside / "abs.csv"): "absolute path",
        "../escape.csv": "path contains '..'",
        "data/../../../escape2.csv": "path contains '..'",
        "data/passwd.csv": "symlink to '/etc/passwd'",
        "data/hard.csv": "hardlink to '../../../etc/passwd'",
        "data/null.csv": "device",
        "data/disk.csv": "device",
        "data/pipe.csv": "fifo",
        "data/big.csv": "size 5000 over max_member_bytes (4096)",
        "data/late.csv": f"beyond max_members ({max_members})",
    }
    by_path = {r.path: r for r in records}
    assert by_path["other/unwanted.txt"].skipped is None and by_path["other/unwanted.txt"].extracted is None
    assert by_path["data"].skipped is None
    assert result.bytes_read == len(tar)


async def test_wanted_sees_normalised_paths(tmp_path: Path) -> None:
    seen: list[str] = []

    def wanted(path: str, size: int) -> bool:
        seen.append(path)
        return True

    tar = make_tar([member("./a//b/./c.txt", b"c"), member("top.txt", b"t")])
    result, _ = await run(tar, tmp_path / "s", wanted=wanted)
    assert seen == ["a/b/c.txt", "top.txt"]
    assert set(result.extracted) == {"a/b/c.txt", "top.txt"}
    assert normalise_member_path("./x//y/.") == "x/y"


# --- formats -----------------------------------------------------------------------------------

LONG_NAME = "models/" + "very-long-directory-name/" * 6 + "weights.bin"
FORMAT_MEMBERS = [
    member("models", kind=tarfile.DIRTYPE),
    member(LONG_NAME, os.urandom(70_000)),
    member("datasets/table.parquet", b"PAR1" + bytes(range(256)) * 40),
    member("datasets/empty.csv", b""),
]
FORMAT_EXPECTED = {LONG_NAME: FORMAT_MEMBERS[1][1], "datasets/table.parquet": FORMAT_MEMBERS[2][1],
                   "datasets/empty.csv": b""}


@pytest.mark.parametrize("compress", [
    pytest.param(lambda t: t, id="tar"),
    pytest.param(lambda t: make_tar_gnu_gz(), id="gnu-tar.gz"),
    pytest.param(gzip.compress, id="tar.gz"),
    pytest.param(lambda t: gzip.compress(t[:5000]) + gzip.compress(t[5000:]) + bytes(1024),
                 id="multi-member-gzip-zero-padded"),
    pytest.param(zstd, id="tar.zst"),
    pytest.param(lambda t: zstd(t[:30000]) + zstd(t[30000:]), id="multi-frame-zstd"),
    pytest.param(lzma.compress, id="tar.xz"),
    pytest.param(lambda t: lzma.compress(t[:30000]) + bytes(8) + lzma.compress(t[30000:]), id="multi-stream-xz-padded"),
    pytest.param(bz2.compress, id="tar.bz2"),
    pytest.param(lambda t: bz2.compress(t[:30000]) + bz2.compress(t[30000:]), id="multi-stream-bz2"),
])
async def test_formats_are_recognised_by_content(tmp_path: Path, compress: Callable[[bytes], bytes]) -> None:
    data = compress(make_tar(FORMAT_MEMBERS))
    for split_head, chunk in ((0, 64 * 1024), (16, 777)):  # the magic may arrive byte by byte
        staging = tmp_path / f"staging-{chunk}"
        result, records = await run(data, staging, chunk=chunk, split_head=split_head)
        assert result.error is None, result.error
        assert result.members == len(FORMAT_MEMBERS)
        assert_extracted(result, FORMAT_EXPECTED)
        assert result.bytes_read == len(data)
        assert records[1].path == LONG_NAME


def make_tar_gnu_gz() -> bytes:
    return gzip.compress(make_tar(FORMAT_MEMBERS, fmt=tarfile.GNU_FORMAT))


@pytest.mark.parametrize("data, message", [
    (b"", "empty input"),
    (os.urandom(3000), "not a tar archive"),
    (b"\x04\x22\x4d\x18" + bytes(600), "unsupported compression: lz4"),
    (b"BZh91AY&SY" + bytes(600), "corrupt bzip2 data"),
    (b"\xfd7zXZ\x00" + bytes(600), "corrupt xz data"),
    (gzip.compress(b"just some text, not a tar"), "not a tar archive"),
])
async def test_not_a_tarball_is_an_error_not_an_exception(tmp_path: Path, data: bytes, message: str) -> None:
    result, records = await run(data, tmp_path / "s")
    assert result.error is not None and message in result.error
    assert result.members == 0 and not result.extracted and not records


# --- truncation and corruption -----------------------------------------------------------------

A, B, C = b"first member\n" * 10, b"second member\n" * 10, os.urandom(200_000)
ABC = make_tar([member("a.csv", A), member("b.csv", B), member("c.bin", C)])


async def test_truncated_gzip_keeps_earlier_members(tmp_path: Path) -> None:
    data = gzip.compress(ABC)
    cut = data[:len(data) // 2]  # C is incompressible: the cut falls inside its data
    staging = tmp_path / "s"
    result, records = await run(cut, staging)
    assert result.error is not None and result.error.startswith("short member 'c.bin'")
    assert "truncated" in result.error
    assert_extracted(result, {"a.csv": A, "b.csv": B})
    assert staged(staging) == {e.staging_path.name for e in result.extracted.values()}  # no partial c
    assert [r.path for r in records] == ["a.csv", "b.csv", "c.bin"]
    assert records[2].skipped and records[2].skipped.startswith("short member")
    assert result.bytes_read == len(cut)


async def test_truncated_gzip_trailer(tmp_path: Path) -> None:
    result, _ = await run(gzip.compress(ABC)[:-4], tmp_path / "s")
    assert_extracted(result, {"a.csv": A, "b.csv": B, "c.bin": C})
    assert result.error is not None
    assert result.error.startswith("truncated: the gzip stream ends inside a member")
    assert "after the end of the tar archive" in result.error


async def test_gzip_crc_mismatch_is_reported(tmp_path: Path) -> None:
    data = bytearray(gzip.compress(ABC))
    data[-8] ^= 0xFF  # the CRC32 in the gzip trailer
    result, _ = await run(bytes(data), tmp_path / "s")
    assert result.error is not None and "corrupt gzip data" in result.error
    assert "incorrect data check" in result.error


async def test_zstd_truncated_and_corrupt(tmp_path: Path) -> None:
    data = zstd(ABC)
    # zstd emits output a block (128 KiB) at a time: cut inside the second block, so the first
    # one, holding a.csv and b.csv, is complete.
    result, _ = await run(data[:len(data) - 20_000], tmp_path / "t")
    assert result.error is not None and result.error.startswith("short member 'c.bin'")
    assert_extracted(result, {"a.csv": A, "b.csv": B})

    result, _ = await run(data[:-1], tmp_path / "u")
    assert result.error is not None and "the zstd stream ends inside a frame" in result.error

    bad = bytearray(data)
    bad[-1] ^= 0xFF  # the frame's content checksum
    result, _ = await run(bytes(bad), tmp_path / "v")
    assert result.error is not None and "corrupt zstd data" in result.error


async def test_plain_tar_without_end_marker_is_truncated(tmp_path: Path) -> None:
    tar = make_tar([member("a.csv", A), member("b.csv", B)], fmt=tarfile.USTAR_FORMAT)
    end = 512 + 512 * ((len(A) + 511) // 512) + 512 + 512 * ((len(B) + 511) // 512)
    assert tar[end:] == bytes(len(tar) - end)  # only the end marker and padding follow

    result, _ = await run(tar[:end], tmp_path / "s")
    assert_extracted(result, {"a.csv": A, "b.csv": B})
    assert result.error == f"truncated: no end-of-archive marker at offset {end} after 2 members"

    result, _ = await run(tar[:end] + b"garbage!" * 64 + bytes(1024), tmp_path / "g")
    assert_extracted(result, {"a.csv": A, "b.csv": B})
    assert result.error is not None and result.error.startswith("corrupt tar: invalid header at offset")

    result, _ = await run(tar[:end + 100], tmp_path / "h")
    assert result.error is not None and result.error.startswith("truncated: partial header")


async def test_truncated_in_member_data_of_plain_tar(tmp_path: Path) -> None:
    result, records = await run(ABC[:len(ABC) - 50_000], tmp_path / "s")
    assert result.error is not None and result.error.startswith("short member 'c.bin'")
    assert_extracted(result, {"a.csv": A, "b.csv": B})
    assert staged(tmp_path / "s") == {e.staging_path.name for e in result.extracted.values()}


# --- resources: memory, backpressure, cancellation, callbacks ----------------------------------


class Zeros(io.RawIOBase):
    """A file of n zero bytes that never exists in memory whole."""

    def __init__(self, n: int) -> None:
        self.left = n

    def readable(self) -> bool:
        return True

    def readinto(self, b: memoryview) -> int:  # type: ignore[override]
        n = min(len(b), self.left)
        b[:n] = bytes(n)
        self.left -= n
        return n


def zero_bomb(size: int, fmt: str) -> bytes:
    out = io.BytesIO()
    if fmt == "gzip":
        sink = gzip.GzipFile(fileobj=out, mode="wb")
    elif fmt == "xz":
        sink = lzma.LZMAFile(out, mode="wb")
    elif fmt == "bzip2":
        sink = bz2.BZ2File(out, mode="wb")
    else:
        sink = zstandard.ZstdCompressor().stream_writer(out, closefd=False)
    with tarfile.open(fileobj=sink, mode="w|") as tf:
        info = tarfile.TarInfo("zeros.bin")
        info.size = size
        tf.addfile(info, Zeros(size))
    sink.close()
    return out.getvalue()


@pytest.mark.parametrize("fmt", ["gzip", "zstd", "xz", "bzip2"])
async def test_memory_stays_flat_on_a_highly_compressed_member(tmp_path: Path, fmt: str) -> None:
    size = 48 * MiB
    data = zero_bomb(size, fmt)
    assert len(data) < size // 200
    tracemalloc.start()
    try:
        result, _ = await run(data, tmp_path / "s", chunk=len(data), max_member_bytes=size,
                              inflate_bytes=MiB, copy_bytes=256 * 1024, queue_chunks=2)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert result.error is None
    assert result.extracted["zeros.bin"].size == size
    assert result.extracted["zeros.bin"].sha256 == hashlib.sha256(bytes(size)).hexdigest()
    window = 8 * MiB if fmt == "xz" else 0  # xz must hold its window (8 MiB at its default preset)
    assert peak < 8 * MiB + window, f"peak {peak / MiB:.1f} MiB"


async def test_backpressure_and_early_stop_close_the_source(tmp_path: Path) -> None:
    # A corrupt start followed by a long tail: the scan stops at once, the producer never ran
    # more than the queue ahead of it, and the source was closed.
    source = Source(b"\x1f\x8b" + bytes(10_000 * 64), chunk=64)
    result = await scan(source(), lambda p, _size=0: True, tmp_path / "s", max_member_bytes=MiB,
                        max_members=10, queue_chunks=3)
    assert result.error is not None and result.error.startswith("corrupt gzip data")
    assert source.yielded <= 3 + 3, source.yielded
    assert source.closed


async def test_cancellation_stops_the_worker_and_closes_the_source(tmp_path: Path) -> None:
    blocked = asyncio.Event()
    never = asyncio.Event()

    async def stall() -> None:
        blocked.set()
        await never.wait()

    tar = make_tar([member("a.csv", A), member("c.bin", C)])
    source = Source(tar[:len(tar) // 2], chunk=8192, then=stall)
    staging = tmp_path / "s"
    task = asyncio.create_task(scan(source(), lambda p, _size=0: True, staging, max_member_bytes=MiB,
                                    max_members=10))
    await blocked.wait()
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    assert source.closed
    # a.csv was complete and stays; c.bin was cut off: no partial file is left.
    assert len(staged(staging)) == 1


async def test_on_member_exception_propagates(tmp_path: Path) -> None:
    def boom(record: MemberRecord) -> None:
        raise RuntimeError(f"manifest full at {record.path}")

    source = Source(gzip.compress(ABC), chunk=1024)
    with pytest.raises(RuntimeError, match="manifest full at a.csv"):
        await scan(source(), lambda p, _size=0: False, tmp_path / "s", max_member_bytes=MiB,
                   max_members=10, on_member=boom)
    assert source.closed


async def test_source_failure_propagates(tmp_path: Path) -> None:
    def fail() -> None:
        raise ConnectionResetError("peer went away")

    source = Source(gzip.compress(ABC)[:3000], chunk=1000, then=fail)
    with pytest.raises(ConnectionResetError, match="peer went away"):
        await scan(source(), lambda p, _size=0: True, tmp_path / "s", max_member_bytes=MiB, max_members=10)
    assert source.closed
    # a.csv and b.csv were complete before the failure; c.bin, cut off by it, was discarded.
    assert len(staged(tmp_path / "s")) == 2


async def test_staging_has_a_size_limit(tmp_path: Path) -> None:
    """A scan extracts at most max_staging_bytes in all: the member that would pass it is
    skipped with that reason, and later smaller ones still fit."""
    data = make_tar([member("a.csv", b"a" * 600), member("b.csv", b"b" * 600), member("c.csv", b"c" * 300)])
    result, records = await run(data, tmp_path / "staging", max_staging_bytes=1000)
    assert set(result.extracted) == {"a.csv", "c.csv"}
    [skipped] = [r for r in records if r.skipped]
    assert skipped.path == "b.csv" and "staging full" in skipped.skipped
    assert sum(p.stat().st_size for p in (tmp_path / "staging").iterdir()) == 900


@pytest.mark.parametrize("compress, name", [(lzma.compress, "xz"), (bz2.compress, "bzip2")])
async def test_xz_and_bzip2_truncated_keep_earlier_members(tmp_path: Path, compress: Callable[[bytes], bytes],
                                                         name: str) -> None:
    # Two streams, the second cut short: the first stream's members are whole and kept.
    data = compress(ABC[:10240]) + compress(ABC[10240:])
    result, _ = await run(data[: len(data) - 2000], tmp_path / "s")
    assert result.error is not None and f"the {name} stream ends inside a stream" in result.error, result.error
    assert result.extracted["a.csv"].sha256 == hashlib.sha256(A).hexdigest()
