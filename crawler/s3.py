"""S3, read-only: listing a backup prefix, picking its newest tarballs, streaming one object.

This is the only module that talks S3 (aiobotocore). The contract:

- `parse_s3_url("s3://bucket/prefix/")` -> `("bucket", "prefix/")`; anything else is a
  `ValueError` whose message names the bad URL and why.
- `S3Store(endpoint_url, region)` is an async context manager holding one client. An empty
  `endpoint_url` means AWS's own endpoint; any other endpoint (MinIO, Ceph, moto) is addressed
  path-style. Credentials come from botocore's standard chain (the AWS_* variables first).
- `list` pages through list_objects_v2 and returns every object under the prefix.
- `latest_tarballs` returns the n newest keys ending in .tar, .tar.gz, .tgz, .tar.zst, .tar.xz,
  .txz, .tar.bz2, .tbz2 or .tbz, newest
  first: by LastModified, then by a timestamp embedded in the key (20260315T120000,
  2026-03-15, ...), then by key. The ordering itself is the pure function `latest`.
- `stream` yields an object's body in chunks of at most `chunk_bytes` as they arrive; nothing is
  buffered beyond one chunk, nothing touches the disk, and the body is closed however the
  consumer stops (exhaustion, `aclose()`, cancellation).
- Every S3 or transport failure surfaces as `S3Error` (one line, with an error code), so
  callers never need botocore's or aiohttp's exception types.
"""

from __future__ import annotations

import asyncio
import re
from collections.abc import AsyncIterator, Iterable
from dataclasses import dataclass
from datetime import datetime
from typing import Any

import aiohttp
import structlog
from aiobotocore.config import AioConfig
from aiobotocore.session import get_session
from botocore.exceptions import BotoCoreError, ClientError

log = structlog.get_logger()

TARBALL_SUFFIXES = (".tar", ".tar.gz", ".tgz", ".tar.zst", ".tar.xz", ".txz", ".tar.bz2", ".tbz2", ".tbz")

# S3's bucket naming rules (3-63 characters, lower case, digits, dots, hyphens, alphanumeric at
# both ends), plus the upper case and underscores that buckets created before 2018 may carry.
_BUCKET = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{1,61}[A-Za-z0-9]")

# A date, optionally followed by a time, written with or without separators:
# 20260315T120000, 2026-03-15, 2026-03-15_12-00-00, 2026-03-15T12:00:00Z. Digits on either side
# mean it is part of a longer number (an epoch, a size), not a date.
_STAMP = re.compile(
    r"(?<!\d)(\d{4})-?(\d{2})-?(\d{2})"
    r"(?:[T_. -]?(\d{2})[:-]?(\d{2})(?:[:-]?(\d{2}))?)?(?!\d)"
)


class S3Error(Exception):
    """An S3 request or body stream failed. str() is one line; `code` is S3's error code
    (NoSuchKey, AccessDenied, PreconditionFailed, ...) or the transport error's class name."""

    def __init__(self, message: str, code: str) -> None:
        super().__init__(message)
        self.code = code


@dataclass(frozen=True)
class ObjectInfo:
    """One object as listed. `etag` is without its surrounding quotes."""

    key: str
    size: int
    etag: str
    last_modified: datetime


def parse_s3_url(url: str) -> tuple[str, str]:
    """Split `s3://bucket/prefix` into (bucket, prefix); the prefix may be empty.

    Raises ValueError naming the URL when it is not an s3:// URL with a valid bucket name.
    """
    if not isinstance(url, str) or not url.startswith("s3://"):
        raise ValueError(f"not an s3:// URL: {url!r}")
    bucket, _, prefix = url[len("s3://"):].partition("/")
    if not bucket:
        raise ValueError(f"no bucket in S3 URL {url!r}")
    if not _BUCKET.fullmatch(bucket) or ".." in bucket:
        raise ValueError(f"invalid bucket name {bucket!r} in S3 URL {url!r}")
    if any(ord(c) < 0x20 or c == "\x7f" for c in prefix):
        raise ValueError(f"control character in S3 URL {url!r}")
    return bucket, prefix


def is_tarball(key: str) -> bool:
    """Whether a key names a tarball by its suffix (case-insensitive)."""
    return key.lower().endswith(TARBALL_SUFFIXES)


def key_timestamp(key: str) -> datetime | None:
    """The last valid date(-time) written in a key, naive, or None. Used only to break ties."""
    found = None
    for m in _STAMP.finditer(key):
        year, month, day, hour, minute, second = (int(g) if g else 0 for g in m.groups())
        try:
            found = datetime(year, month, day, hour, minute, second)
        except ValueError:  # 20261399 is digits, not a date
            continue
    return found


def latest(objects: Iterable[ObjectInfo], n: int) -> list[ObjectInfo]:
    """The n newest tarballs among `objects`, newest first (see the module docstring)."""
    if n <= 0:
        return []
    tarballs = [o for o in objects if is_tarball(o.key)]
    # Keys without a timestamp lose a LastModified tie to keys with one.
    tarballs.sort(key=lambda o: (o.last_modified, key_timestamp(o.key) or datetime.min, o.key),
                  reverse=True)
    return tarballs[:n]


def _s3_error(exc: Exception, where: str) -> S3Error:
    if isinstance(exc, ClientError):
        err = exc.response.get("Error", {})
        code = str(err.get("Code") or exc.response.get("ResponseMetadata", {}).get("HTTPStatusCode"))
        message = err.get("Message") or code
        return S3Error(f"{where}: {code}: {message}", code)
    code = type(exc).__name__
    return S3Error(f"{where}: {code}: {str(exc).splitlines()[0] if str(exc) else code}", code)


# What a request or a body read can raise besides our own bugs: S3 said no (ClientError), the
# SDK or the connection failed (BotoCoreError, including read timeouts and short bodies), or
# aiohttp reported a broken payload that aiobotocore passes through unwrapped.
_S3_FAILURES = (ClientError, BotoCoreError, aiohttp.ClientError)


class S3Store:
    """A read-only S3 client for one endpoint and region. Use as `async with S3Store(...) as s3:`."""

    def __init__(self, endpoint_url: str, region: str, *, connect_timeout_s: float = 10.0,
                 read_timeout_s: float = 60.0, max_attempts: int = 3) -> None:
        self.endpoint_url = endpoint_url
        self.region = region
        self._config = AioConfig(
            connect_timeout=connect_timeout_s,
            read_timeout=read_timeout_s,
            retries={"max_attempts": max_attempts, "mode": "standard"},
            # Non-AWS endpoints (MinIO, Ceph, moto, an IP address) rarely have per-bucket DNS
            # names, so virtual-host addressing would send requests to a host that doesn't exist.
            s3={"addressing_style": "path"} if endpoint_url else None,
        )
        self._client_cm: Any = None
        self._client: Any = None

    async def __aenter__(self) -> S3Store:
        self._client_cm = get_session().create_client(
            "s3", region_name=self.region, endpoint_url=self.endpoint_url or None, config=self._config)
        self._client = await self._client_cm.__aenter__()
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        cm, self._client_cm, self._client = self._client_cm, None, None
        if cm is not None:
            await cm.__aexit__(*exc_info)

    def _require_client(self) -> Any:
        if self._client is None:
            raise RuntimeError("S3Store is not open: use `async with S3Store(...) as s3:`")
        return self._client

    async def list(self, bucket: str, prefix: str, *, page_size: int | None = None) -> list[ObjectInfo]:
        """Every object whose key starts with `prefix`, in key order, across all pages.

        `page_size` asks for at most that many keys per request (S3's default is 1000).
        """
        client = self._require_client()
        pagination = {"PageSize": page_size} if page_size else {}
        found: list[ObjectInfo] = []
        try:
            paginator = client.get_paginator("list_objects_v2")
            async for page in paginator.paginate(Bucket=bucket, Prefix=prefix, PaginationConfig=pagination):
                for obj in page.get("Contents", ()):
                    found.append(ObjectInfo(key=obj["Key"], size=int(obj["Size"]),
                                            etag=str(obj.get("ETag", "")).strip('"'),
                                            last_modified=obj["LastModified"]))
        except _S3_FAILURES as exc:
            raise _s3_error(exc, f"s3://{bucket}/{prefix}") from exc
        return found

    async def latest_tarballs(self, bucket: str, prefix: str, n: int, *,
                              page_size: int | None = None) -> list[ObjectInfo]:
        """The n most recent tarballs under the prefix, newest first (see `latest`)."""
        return latest(await self.list(bucket, prefix, page_size=page_size), n)

    async def stream(self, bucket: str, key: str, chunk_bytes: int, *,
                     etag: str | None = None, resumes: int = 0, backoff_s: float = 0.5) -> AsyncIterator[bytes]:
        """Yield the object's bytes in order, each chunk at most `chunk_bytes` (often less: a
        chunk is what the connection has delivered, not a fixed size).

        A read that fails mid-stream (a reset, a 5xx, a body cut short) is resumed from the byte
        reached with a ranged GET, at most `resumes` times in all: a large backup is not read
        from its start again for one network hiccup. With `etag` (as `ObjectInfo.etag` gives
        it), every read fails with code PreconditionFailed if the object was replaced since it
        was listed, rather than mixing two backups. What S3 refuses for good (no such key, access
        denied, replaced) is not retried. A body shorter than its Content-Length raises S3Error,
        never a silent EOF.
        """
        if chunk_bytes <= 0:
            raise ValueError(f"chunk_bytes must be positive, got {chunk_bytes}")
        client = self._require_client()
        extra = {"IfMatch": f'"{etag}"'} if etag else {}
        offset = 0
        failures = 0
        total: int | None = None
        while True:
            if total is not None and offset >= total:
                return  # every byte arrived; what failed was the end of the response
            ranged = {"Range": f"bytes={offset}-"} if offset else {}
            try:
                response = await client.get_object(Bucket=bucket, Key=key, **extra, **ranged)
                if not offset:
                    total = int(response.get("ContentLength") or 0) or None
                if offset and not str(response.get("ContentRange", "")).startswith(f"bytes {offset}-"):
                    async with response["Body"]:
                        pass  # closed, not left half-read
                    raise S3Error(f"s3://{bucket}/{key}: asked for bytes from {offset}, got "
                                  f"{response.get('ContentRange') or 'the whole object'}", "BadRange")
                # `async with` closes the HTTP response whether the consumer reads to the end or
                # stops early (aclose/cancellation), so a connection is never left half-read.
                # iter_chunks is the async API: the body's sync iteration is blocked in aiobotocore.
                async with response["Body"] as body:
                    async for chunk in body.iter_chunks(chunk_bytes):
                        offset += len(chunk)
                        yield chunk
                return
            except _S3_FAILURES as exc:
                error = _s3_error(exc, f"s3://{bucket}/{key}")
                if error.code in FINAL_CODES or failures >= resumes:
                    raise error from exc
                failures += 1
                log.warning("s3.stream_resumed", url=f"s3://{bucket}/{key}", at_byte=offset, attempt=failures,
                            error=str(error))
                await asyncio.sleep(backoff_s * failures)


# S3 answers that another try cannot change.
FINAL_CODES = frozenset({"NoSuchKey", "NoSuchBucket", "AccessDenied", "PreconditionFailed", "InvalidAccessKeyId",
                         "SignatureDoesNotMatch", "403", "404", "412", "NoCredentialsError", "InvalidRange", "416"})
