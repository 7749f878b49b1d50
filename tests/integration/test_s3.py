"""S3Store against a real S3 API (moto in server mode on loopback), and tarballs streamed from it
into the scanner."""

from __future__ import annotations

import gzip
import hashlib
import io
import os
import tarfile
import uuid
from collections.abc import AsyncIterator
from datetime import datetime, timedelta, timezone
from pathlib import Path
from typing import Any

import pytest
import zstandard

from crawler.s3 import ObjectInfo, S3Error, S3Store, key_timestamp, latest, parse_s3_url
from crawler.tarscan import scan
from tests.s3server import REGION, fake_aws, s3_admin, s3_endpoint  # noqa: F401 - fixtures

MiB = 1 << 20


def tarball(files: dict[str, bytes]) -> bytes:
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w") as tf:
        for name, data in files.items():
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tf.addfile(info, io.BytesIO(data))
    return buf.getvalue()


async def new_bucket(admin: Any) -> str:
    name = f"scidex-{uuid.uuid4().hex[:12]}"
    await admin.create_bucket(Bucket=name)
    return name


# --- URLs and ordering (no server) -------------------------------------------------------------


@pytest.mark.parametrize("url, expected", [
    ("s3://scidex/backups/HOST/", ("scidex", "backups/HOST/")),
    ("s3://scidex", ("scidex", "")),
    ("s3://scidex/", ("scidex", "")),
    ("s3://my.bucket-1/a b/c.tar.gz", ("my.bucket-1", "a b/c.tar.gz")),
])
def test_parse_s3_url(url: str, expected: tuple[str, str]) -> None:
    assert parse_s3_url(url) == expected


@pytest.mark.parametrize("url, message", [
    ("", "not an s3:// URL"),
    ("scidex/backups/", "not an s3:// URL"),
    ("https://scidex.s3.amazonaws.com/backups/", "not an s3:// URL"),
    ("S3://scidex/x", "not an s3:// URL"),
    ("s3://", "no bucket"),
    ("s3:///backups/", "no bucket"),
    ("s3://a/x", "invalid bucket name 'a'"),
    ("s3://bad!bucket/x", "invalid bucket name"),
    ("s3://-scidex/x", "invalid bucket name"),
    ("s3://sci..dex/x", "invalid bucket name"),
    ("s3://scidex/a\nb", "control character"),
])
def test_parse_s3_url_rejects_garbage(url: str, message: str) -> None:
    with pytest.raises(ValueError, match=message) as info:
        parse_s3_url(url)
    assert repr(url) in str(info.value)  # the message names the URL it rejects


def test_key_timestamp() -> None:
    assert key_timestamp("backups/h/scidex-20260315T120000.tar.gz") == datetime(2026, 3, 15, 12, 0, 0)
    assert key_timestamp("backups/h/2026-03-15.tar.zst") == datetime(2026, 3, 15)
    assert key_timestamp("backups/h/2026-03-15_08-30-00.tgz") == datetime(2026, 3, 15, 8, 30)
    assert key_timestamp("backups/h/snapshot-1710500000000.tar") is None  # an epoch, not a date
    assert key_timestamp("backups/h/20261399.tar") is None  # digits, not a date
    assert key_timestamp("backups/2025-01-01/scidex-20260315.tar") == datetime(2026, 3, 15)  # the last


def test_latest_orders_by_last_modified_then_key_timestamp_then_key() -> None:
    t0 = datetime(2026, 3, 15, 12, 0, tzinfo=timezone.utc)
    objs = [
        ObjectInfo("p/old-20990101.tar.gz", 1, "e", t0 - timedelta(days=1)),  # stamp can't beat mtime
        ObjectInfo("p/b-2026-03-14.tar.gz", 1, "e", t0),
        ObjectInfo("p/a-20260315T000000.tgz", 1, "e", t0),
        ObjectInfo("p/nostamp.tar", 1, "e", t0),
        ObjectInfo("p/newest.tar.zst", 1, "e", t0 + timedelta(seconds=1)),
        ObjectInfo("p/newer-but-not-a-tarball.zip", 1, "e", t0 + timedelta(days=9)),
        ObjectInfo("p/x-20260316.tar.gz.sha256", 1, "e", t0 + timedelta(days=9)),
        ObjectInfo("p/z-2026-03-14.TAR.GZ", 1, "e", t0),
    ]
    assert [o.key for o in latest(objs, 10)] == [
        "p/newest.tar.zst", "p/a-20260315T000000.tgz", "p/z-2026-03-14.TAR.GZ",
        "p/b-2026-03-14.tar.gz", "p/nostamp.tar", "p/old-20990101.tar.gz"]
    assert [o.key for o in latest(objs, 2)] == ["p/newest.tar.zst", "p/a-20260315T000000.tgz"]
    assert latest(objs, 0) == []


# --- against the local S3 ------------------------------------------------------------------------


async def test_store_must_be_opened() -> None:
    store = S3Store("http://127.0.0.1:9", REGION)
    with pytest.raises(RuntimeError, match="async with"):
        await store.list("scidex", "")


async def test_list_pages_through_every_object(s3_admin: Any, s3_endpoint: str) -> None:
    bucket = await new_bucket(s3_admin)
    keys = [f"backups/HOST/obj-{i:02d}.bin" for i in range(7)]
    for i, key in enumerate(keys):
        await s3_admin.put_object(Bucket=bucket, Key=key, Body=b"x" * i)
    await s3_admin.put_object(Bucket=bucket, Key="backups/OTHER/obj.bin", Body=b"no")
    # The server honours a small page size, so 7 keys need 4 requests.
    page = await s3_admin.list_objects_v2(Bucket=bucket, Prefix="backups/HOST/", MaxKeys=2)
    assert page["IsTruncated"] and len(page["Contents"]) == 2

    async with S3Store(s3_endpoint, REGION) as store:
        listed = await store.list(bucket, "backups/HOST/", page_size=2)
        assert [o.key for o in listed] == keys
        assert [o.size for o in listed] == list(range(7))
        assert listed[3].etag == hashlib.md5(b"xxx").hexdigest()  # quotes stripped
        assert all(o.last_modified.tzinfo is not None for o in listed)
        assert await store.list(bucket, "backups/NONE/") == []
        with pytest.raises(S3Error) as info:
            await store.list(f"missing-{uuid.uuid4().hex[:8]}", "")
        assert info.value.code == "NoSuchBucket"


class CountingStore(S3Store):
    """Records every key whose body is opened."""

    def __init__(self, *args: Any, **kw: Any) -> None:
        super().__init__(*args, **kw)
        self.opened: list[str] = []

    def stream(self, bucket: str, key: str, chunk_bytes: int, **kw: Any) -> AsyncIterator[bytes]:
        self.opened.append(key)
        return super().stream(bucket, key, chunk_bytes, **kw)


async def test_latest_two_tarballs_are_scanned_and_the_third_never_read(
        s3_admin: Any, s3_endpoint: str, tmp_path: Path) -> None:
    bucket = await new_bucket(s3_admin)
    prefix = "backups/HOST/"
    backups = {  # oldest first, uploaded in that order
        f"{prefix}scidex-20260313T020000.tar": tarball({"datasets/x.csv": b"from the 13th"}),
        f"{prefix}scidex-20260314T020000.tar.gz": gzip.compress(tarball({"datasets/x.csv": b"from the 14th"})),
        f"{prefix}scidex-20260315T020000.tar.zst":
            zstandard.ZstdCompressor().compress(tarball({"datasets/x.csv": b"from the 15th"})),
    }
    for key, body in backups.items():
        await s3_admin.put_object(Bucket=bucket, Key=key, Body=body)
    for key in (f"{prefix}scidex-20990101T000000.log", f"{prefix}scidex-20260316T020000.tar.gz.sha256",
                "backups/OTHER/scidex-20990101T000000.tar"):
        await s3_admin.put_object(Bucket=bucket, Key=key, Body=b"not a backup of this host")

    async with CountingStore(s3_endpoint, REGION) as store:
        bucket_name, key_prefix = parse_s3_url(f"s3://{bucket}/{prefix}")
        newest = await store.latest_tarballs(bucket_name, key_prefix, 2, page_size=2)
        assert [o.key for o in newest] == [f"{prefix}scidex-20260315T020000.tar.zst",
                                           f"{prefix}scidex-20260314T020000.tar.gz"]
        found = []
        for obj in newest:
            result = await scan(store.stream(bucket, obj.key, 64 * 1024, etag=obj.etag),
                                lambda p, _size=0: p.startswith("datasets/"), tmp_path / obj.key.rsplit("/", 1)[1],
                                max_member_bytes=MiB, max_members=100)
            assert result.error is None
            assert result.bytes_read == obj.size
            found.append(result.extracted["datasets/x.csv"].staging_path.read_bytes())
    assert found == [b"from the 15th", b"from the 14th"]
    assert store.opened == [o.key for o in newest]  # the 13th was never opened


async def test_stream_a_multi_megabyte_tarball_end_to_end(s3_admin: Any, s3_endpoint: str,
                                                         tmp_path: Path) -> None:
    bucket = await new_bucket(s3_admin)
    files = {f"models/m{i}/weights.bin": os.urandom(700_000) for i in range(4)}
    files["models/README.md"] = b"# models\n" * 1000
    body = gzip.compress(tarball(files), compresslevel=1)
    key = "backups/HOST/scidex-20260315.tar.gz"
    await s3_admin.put_object(Bucket=bucket, Key=key, Body=body)

    chunks = 0

    async def counted(source: AsyncIterator[bytes]) -> AsyncIterator[bytes]:
        nonlocal chunks
        async for chunk in source:
            assert len(chunk) <= 16 * 1024
            chunks += 1
            yield chunk

    async with S3Store(s3_endpoint, REGION) as store:
        result = await scan(counted(store.stream(bucket, key, 16 * 1024)),
                            lambda p, _size=0: p.endswith("weights.bin"), tmp_path / "staging",
                            max_member_bytes=MiB, max_members=100, queue_chunks=2)
    assert result.error is None
    assert result.bytes_read == len(body)
    assert chunks >= len(body) // (16 * 1024)
    assert set(result.extracted) == {k for k in files if k.endswith("weights.bin")}
    for path, extracted in result.extracted.items():
        assert extracted.sha256 == hashlib.sha256(files[path]).hexdigest()
        assert extracted.staging_path.parent == tmp_path / "staging"


async def test_stream_failures_are_s3_errors(s3_admin: Any, s3_endpoint: str) -> None:
    bucket = await new_bucket(s3_admin)
    await s3_admin.put_object(Bucket=bucket, Key="k.tar", Body=b"v1")
    async with S3Store(s3_endpoint, REGION) as store:
        with pytest.raises(S3Error) as info:
            async for _ in store.stream(bucket, "missing.tar", 1024):
                pass
        assert info.value.code == "NoSuchKey" and f"s3://{bucket}/missing.tar" in str(info.value)

        # The object was replaced after it was listed: refuse rather than mix two backups.
        (listed,) = await store.list(bucket, "k.tar")
        await s3_admin.put_object(Bucket=bucket, Key="k.tar", Body=b"v2, a different backup")
        with pytest.raises(S3Error) as info:
            async for _ in store.stream(bucket, "k.tar", 1024, etag=listed.etag):
                pass
        assert info.value.code == "PreconditionFailed"


async def test_a_stream_cut_mid_way_resumes_from_the_byte_reached(s3_admin: Any, s3_endpoint: str) -> None:
    """The connection is reset twice mid-body: the reader asks for the rest with ranged GETs
    and yields exactly the object, never its start again."""
    from tests.s3proxy import CuttingProxy
    bucket = await new_bucket(s3_admin)
    body = os.urandom(3 << 20)
    await s3_admin.put_object(Bucket=bucket, Key="backups/HOST/big.tar.gz", Body=body)
    async with CuttingProxy(s3_endpoint, "big.tar.gz", cut_after=700_000, cuts=2) as proxy:
        async with S3Store(proxy.endpoint_url, REGION, max_attempts=1) as store:
            (listed,) = await store.list(bucket, "backups/HOST/big")
            got = bytearray()
            async for chunk in store.stream(bucket, listed.key, 1 << 16, etag=listed.etag, resumes=3, backoff_s=0):
                got += chunk
    assert bytes(got) == body
    assert proxy.cut_count == 2 and len(proxy.ranges) == 2
    assert all(r.startswith("bytes=") and int(r[6:-1]) > 0 for r in proxy.ranges)


async def test_a_stream_that_keeps_failing_gives_up_after_its_resumes(s3_admin: Any, s3_endpoint: str) -> None:
    from tests.s3proxy import CuttingProxy
    bucket = await new_bucket(s3_admin)
    await s3_admin.put_object(Bucket=bucket, Key="x.tar", Body=os.urandom(1 << 20))
    async with CuttingProxy(s3_endpoint, "x.tar", cut_after=100_000, cuts=100) as proxy:
        async with S3Store(proxy.endpoint_url, REGION, max_attempts=1) as store:
            with pytest.raises(S3Error):
                async for _ in store.stream(bucket, "x.tar", 1 << 16, resumes=2, backoff_s=0):
                    pass
    assert proxy.cut_count == 3
