"""Tarball candidates for the recovery job: the N newest backups under `recovery.s3_prefix`.

Each tarball is read at most once, as a stream: every member header goes to a manifest in the
tool's schema (keyed by URL + ETag + size) and only members that could match some row are
extracted, into `recovery.staging_dir/<manifest id>/` under generated names. A complete manifest
whose wanted members are all in staging answers later runs without reading the tarball again;
a scan that was cut off starts that tarball over. A truncated or corrupt tarball is reported and
the run goes on with what was read before the damage.
"""

from __future__ import annotations

import asyncio
import shutil
from pathlib import Path
from typing import Any

import structlog

from crawler.config import Config
from crawler.db import Database
from crawler.evidence import Candidate
from crawler.localsearch import Wanted

log = structlog.get_logger()

MANIFEST_BATCH = 10_000  # member rows per COPY while scanning


class MemoryManifests:
    """Manifests kept for this run only, in memory, for a run that may not write the database
    (a plan, a changeset): the tarballs are read again by the next such run. Only the members
    that were extracted are kept."""

    def __init__(self) -> None:
        self._extracted: dict[str, list[dict[str, Any]]] = {}
        self._n = 0

    async def manifest_find(self, s3_url: str, etag: str, size: int) -> None:
        return None

    async def manifest_open(self, s3_url: str, etag: str, size: int, run_id: str) -> str:
        self._n += 1
        manifest_id = f"{run_id}-{self._n}"  # a staging folder of its own, never a stored manifest's
        self._extracted[manifest_id] = []
        return manifest_id

    async def manifest_add_members(self, records: list[tuple[Any, ...]]) -> None:
        for manifest_id, _idx, path, norm_path, size, _type, _skipped, sha256, staging_path in records:
            if sha256 is not None:
                self._extracted[manifest_id].append({"path": path, "norm_path": norm_path, "size": size,
                                                     "sha256": sha256, "staging_path": staging_path})

    async def manifest_close(self, manifest_id: str, error: str | None, members: int) -> None:
        pass

    def remove_staging(self, staging_root: Path) -> None:
        """This run's extracted copies: the next such run reads its tarballs again anyway (after
        the binds, which copy what they need, or at the end of a plan)."""
        for manifest_id in self._extracted:
            shutil.rmtree(staging_root / manifest_id, ignore_errors=True)

    async def manifest_extracted(self, manifest_id: str) -> list[dict[str, Any]]:
        latest = {m["norm_path"]: m for m in self._extracted[manifest_id]}  # a later duplicate wins, as in tar
        return [latest[k] for k in sorted(latest)]


def storable(text: str) -> str:
    """A member name as PostgreSQL text: bytes that are not UTF-8 (kept by tarfile as surrogates)
    are written as \\xNN, so one odd name cannot stop a manifest."""
    return text.encode("utf-8", "surrogateescape").decode("utf-8", "backslashreplace")


async def search(cfg: Config, db: Database, run_id: str, wanted: Wanted, searched: dict[str, Any]) -> list[Candidate]:
    rec = cfg["recovery"]
    if not rec["s3_prefix"] or rec["tarballs"] == 0:
        log.info("recover.tarballs_off", reason="recovery.s3_prefix is empty or recovery.tarballs is 0")
        return []
    from crawler import s3, tarscan  # aiobotocore is heavy; only a run that reads S3 pays for it

    bucket, prefix = s3.parse_s3_url(rec["s3_prefix"])
    staging_root = Path(rec["staging_dir"]).resolve()
    out: list[Candidate] = []
    unread: list[dict[str, str]] = searched.setdefault("unread", [])
    async with s3.S3Store(cfg["s3"]["endpoint_url"], cfg["s3"]["region"]) as store:
        try:
            chosen = await store.latest_tarballs(bucket, prefix, rec["tarballs"])
        except s3.S3Error as exc:  # no credentials, no such bucket, the endpoint down: say so, bind the rest
            log.error("recover.tarballs_unlisted", prefix=rec["s3_prefix"], error=str(exc))
            unread.append({"source": rec["s3_prefix"], "error": str(exc)})
            return []
        searched["tarballs"] = len(chosen)
        log.info("recover.tarballs", chosen=[o.key for o in chosen])
        for obj in chosen:
            url = f"s3://{bucket}/{obj.key}"
            manifest = await db.manifest_find(url, obj.etag, obj.size)
            if manifest and manifest["complete"] and await _manifest_answers(db, manifest["id"], wanted, staging_root):
                log.info("tarball.from_manifest", tarball=url, members=manifest["members"], error=manifest["error"])
                manifest_id = manifest["id"]
            else:
                try:
                    manifest_id = await _scan(db, store, tarscan, bucket, obj, url, run_id, wanted, staging_root, rec,
                                              searched)
                except s3.S3Error as exc:
                    # Unreadable after its resumes: what other sources found is still bound; the
                    # tarball is named in the summary and the residual reasons; the next run reads
                    # it again (its manifest stays incomplete).
                    log.error("tarball.unreadable", tarball=url, error=str(exc))
                    unread.append({"source": url, "error": str(exc)})
                    searched.pop("reading", None)
                    continue
            for m in await db.manifest_extracted(manifest_id):
                out.append(Candidate(f"{url}#{m['path']}", "s3", m["norm_path"], m["size"], m["sha256"],
                                     handle=Path(m["staging_path"])))
    return out


async def _manifest_answers(db: Database, manifest_id: int, wanted: Wanted, staging_root: Path) -> bool:
    """Whether a complete manifest can stand in for reading the tarball again."""
    for path, size, extracted in await db.manifest_paths(manifest_id):
        if wanted(path, size) and not extracted:
            return False  # a member this run wants was not kept last time
    return all(Path(m["staging_path"]).is_file() for m in await db.manifest_extracted(manifest_id))


async def _scan(db: Database, store: Any, tarscan: Any, bucket: str, obj: Any, url: str, run_id: str,
                wanted: Wanted, staging_root: Path, rec: dict[str, Any], searched: dict[str, Any]) -> int:
    manifest_id = await db.manifest_open(url, obj.etag, obj.size, run_id)
    staging = staging_root / str(manifest_id)
    # A scan starts from nothing: an earlier, cut-off scan of this tarball left files under the
    # same generated names.
    await asyncio.to_thread(shutil.rmtree, staging, True)
    staging.mkdir(parents=True, exist_ok=True)
    pending: list[tuple[Any, ...]] = []

    def on_member(m: Any) -> None:
        pending.append((manifest_id, m.index, storable(m.path), storable(tarscan.normalise_member_path(m.path)),
                        m.size, m.type, m.skipped and storable(m.skipped),
                        m.extracted.sha256 if m.extracted else None,
                        str(m.extracted.staging_path) if m.extracted else None))
        if m.skipped and wanted(tarscan.normalise_member_path(m.path), m.size):
            log.warning("tarball.member_skipped", tarball=url, member=m.path, reason=m.skipped)

    log.info("tarball.scan_start", tarball=url, size=obj.size)
    progress = {"tarball": url, "tarball_size": obj.size, "tarball_bytes_read": 0}
    searched["reading"] = progress
    result = await tarscan.scan(
        _flushing(store.stream(bucket, obj.key, rec["chunk_bytes"], etag=obj.etag, resumes=rec["stream_resumes"]),
                  pending, db, progress),
        wanted, staging,
        max_member_bytes=rec["max_member_bytes"], max_members=rec["max_members"],
        max_staging_bytes=rec["staging_max_bytes"], on_member=on_member)
    await db.manifest_add_members(pending)
    pending.clear()
    searched.pop("reading", None)
    if result.error:
        log.error("tarball.damaged", tarball=url, error=result.error, members=result.members)
    await db.manifest_close(manifest_id, result.error, result.members)
    log.info("tarball.scanned", tarball=url, members=result.members, extracted=len(result.extracted),
             skipped=len(result.skipped), bytes=result.bytes_read)
    return manifest_id


async def _flushing(chunks: Any, pending: list[tuple[Any, ...]], db: Database, progress: dict[str, Any]) -> Any:
    """Pass the stream through, writing manifest rows between chunks so memory stays flat."""
    async for chunk in chunks:
        progress["tarball_bytes_read"] += len(chunk)
        if len(pending) >= MANIFEST_BATCH:
            batch = pending[:]
            pending.clear()
            await db.manifest_add_members(batch)
        yield chunk
