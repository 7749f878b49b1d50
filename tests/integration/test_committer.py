"""The committer against a real repository and PostgreSQL: backpressure and the crash-safe order."""

from __future__ import annotations

import asyncio
import hashlib
from pathlib import Path

from crawler.committer import Committer, PlacedFile
from crawler.git import GitRepo
from crawler.sink import Sink, figure_fetched, utcnow
from tests.harness import git
from tests.integration.test_db import insert, open_db


class GatedRepo(GitRepo):
    """A real GitRepo whose commits wait for the test to open a gate, so a slow commit is
    simulated without sleeping."""

    def __init__(self, root: Path) -> None:
        super().__init__(root, 60, "crawler", "c@c")
        self.gate = asyncio.Event()
        self.entered = asyncio.Event()

    async def commit_batches(self, batches, known=None, expected=None):  # type: ignore[no-untyped-def]
        self.entered.set()
        await self.gate.wait()
        return await super().commit_batches(batches, known, expected)


def placed(repo: Path, n: int) -> PlacedFile:
    rel = f"figures/f{n}.png"
    (repo / rel).parent.mkdir(parents=True, exist_ok=True)
    body = b"\x89PNG" + bytes([n])
    (repo / rel).write_bytes(body)
    return PlacedFile(f"fig-{n}", rel, hashlib.sha256(body).hexdigest(), 5, "image/png", utcnow(), f"http://x/{n}")


def stamp(p: PlacedFile, commit: str):  # type: ignore[no-untyped-def]
    return figure_fetched(p.artifact_id, p.rel_path, p.sha256, p.size, p.content_type, commit, p.fetched_at, p.source)


async def spin() -> None:
    """Let every ready task run (no timing involved: a blocked task stays blocked)."""
    for _ in range(20):
        await asyncio.sleep(0)


async def test_add_waits_while_the_backlog_is_full_and_a_cancelled_wait_loses_nothing(repo, dsn):
    await insert(dsn, [(f"fig-{n}", "paper_figure", None, {"image_url": f"http://x/{n}"}) for n in range(8)])
    db = await open_db(dsn)
    gated = GatedRepo(repo)
    sink = Sink(db, "run-1", 100, 60)
    committer = Committer(gated, sink, batch=2, interval_s=3600, run_id="run-1", stamp=stamp, max_pending=4)
    committer.start()
    try:
        for n in range(4):  # within max_pending: no waiting
            await asyncio.wait_for(committer.add(placed(repo, n)), 5)
        await asyncio.wait_for(gated.entered.wait(), 5)  # a full batch woke the committer; its commit hangs
        for n in (4, 5):
            await asyncio.wait_for(committer.add(placed(repo, n)), 5)
        assert committer.pending == 4

        sixth = asyncio.create_task(committer.add(placed(repo, 6)))
        await spin()
        assert not sixth.done(), "add returned while the backlog was over max_pending"
        assert committer.pending == 5  # registered before waiting

        seventh = asyncio.create_task(committer.add(placed(repo, 7)))
        await spin()
        seventh.cancel()  # e.g. a worker cut off at the end of a stop's drain
        await asyncio.gather(seventh, return_exceptions=True)
        assert committer.pending == 6  # its file is still registered for a commit

        gated.gate.set()  # the commit completes: room is made and the waiting add returns
        await asyncio.wait_for(sixth, 5)
    finally:
        gated.gate.set()
        await committer.close()
        await sink.close()
    try:
        stamped = await db._pool.fetchval(
            "select count(*) from artifacts where metadata->>'image_fetch_outcome' = 'fetched'")
    finally:
        await db.close()
    committed = set(git(repo, "ls-tree", "-r", "--name-only", "HEAD").split())
    assert committed == {f"figures/f{n}.png" for n in range(8)}
    assert committer.committed_files == 8 and stamped == 8


async def test_files_and_commit_reach_the_disk_after_the_commit_and_before_the_stamp(repo, dsn, monkeypatch):
    """The order a power loss needs: file in place → commit → flush to disk → database stamp."""
    from crawler import committer as committer_module
    from crawler import files

    await insert(dsn, [(f"fig-{n}", "paper_figure", None, {"image_url": f"http://x/{n}"}) for n in range(3)])
    db = await open_db(dsn)
    seen: list[tuple[set[str], int]] = []
    real_sync = files.sync_to_disk

    async def observed_sync(paths):  # type: ignore[no-untyped-def]
        committed = set(git(repo, "ls-tree", "-r", "--name-only", "HEAD").split())
        stamped = await db._pool.fetchval("select count(*) from artifacts where metadata ? 'file_commit'")
        seen.append((committed, stamped))
        await real_sync(paths)  # the real syncfs, on the real file system

    monkeypatch.setattr(committer_module.files, "sync_to_disk", observed_sync)
    sink = Sink(db, "run-1", 100, 60)
    committer = Committer(GitRepo(repo, 60, "crawler", "c@c"), sink, batch=3, interval_s=3600, run_id="run-1",
                          stamp=stamp, durable=True)
    committer.start()
    for n in range(3):
        await committer.add(placed(repo, n))
    await committer.close()
    await sink.close()
    try:
        stamped = await db._pool.fetchval("select count(*) from artifacts where metadata ? 'file_commit'")
    finally:
        await db.close()
    assert seen == [({f"figures/f{n}.png" for n in range(3)}, 0)]  # committed, not yet stamped
    assert stamped == 3


async def test_bodies_ride_along_to_the_commit_only_up_to_keep_bytes(repo, dsn):
    """A lagging commit lets the backlog grow to max_pending files; only `keep_bytes` of their
    bodies stay in memory, the others are read back from disk (and checked) by the commit."""
    from dataclasses import replace

    class Recording(GitRepo):
        known_paths: list[set[str]] = []

        async def commit_batches(self, batches, known=None, expected=None):  # type: ignore[no-untyped-def]
            self.known_paths.append(set(known or {}))
            return await super().commit_batches(batches, known, expected)

    await insert(dsn, [(f"fig-{n}", "paper_figure", None, {"image_url": f"http://x/{n}"}) for n in range(6)])
    db = await open_db(dsn)
    sink = Sink(db, "run-1", 100, 60)
    recording = Recording(repo, 60, "crawler", "c@c")
    committer = Committer(recording, sink, batch=3, interval_s=3600, run_id="run-1", stamp=stamp, keep_bytes=12)
    try:
        for round_ in range(2):  # the bytes kept are given back once their commit is done
            for n in range(3 * round_, 3 * round_ + 3):
                p = placed(repo, n)  # 5 bytes each: two fit in 12
                await committer.add(replace(p, data=(repo / p.rel_path).read_bytes()))
            await committer.commit_pending(everything=True)
            assert committer._kept == 0
        await committer.close()
        await sink.close()
        stamped = await db._pool.fetchval("select count(*) from artifacts where metadata ? 'file_commit'")
    finally:
        await db.close()
    assert Recording.known_paths == [{"figures/f0.png", "figures/f1.png"}, {"figures/f3.png", "figures/f4.png"}]
    assert stamped == 6
    for n in range(6):  # kept or read back, each committed with its own bytes
        body = b"\x89PNG" + bytes([n])
        assert git(repo, "rev-parse", f"HEAD:figures/f{n}.png") == hashlib.sha1(b"blob 5\0" + body).hexdigest()


async def test_a_path_placed_twice_is_committed_with_what_was_placed_last(repo, dsn):
    """Two rows sharing a path: the first one's body rides along, the second overwrites the file
    after the kept bytes ran out. The commit holds the second one's bytes, as the disk does."""
    await insert(dsn, [("fig-a", "paper_figure", None, {"image_url": "http://x/a"}),
                       ("fig-b", "paper_figure", None, {"image_url": "http://x/b"})])
    db = await open_db(dsn)
    sink = Sink(db, "run-1", 100, 60)
    committer = Committer(GitRepo(repo, 60, "crawler", "c@c"), sink, batch=3, interval_s=3600, run_id="run-1",
                          stamp=stamp, keep_bytes=5)
    rel = "figures/shared.png"
    (repo / "figures").mkdir(exist_ok=True)
    try:
        for rid, body in (("fig-a", b"\x89PNGa"), ("fig-b", b"\x89PNGb")):
            (repo / rel).write_bytes(body)
            await committer.add(PlacedFile(rid, rel, hashlib.sha256(body).hexdigest(), 5, "image/png", utcnow(),
                                           f"http://x/{rid}", data=body))
        assert [p.data is not None for p in committer._pending] == [True, False]  # the second: over keep_bytes
        await committer.close()
        await sink.close()
    finally:
        await db.close()
    assert git(repo, "rev-parse", f"HEAD:{rel}") == hashlib.sha1(b"blob 5\0\x89PNGb").hexdigest()


async def test_a_file_gone_before_its_commit_is_not_stamped_and_its_batch_mates_are(repo, dsn):
    await insert(dsn, [(f"fig-{n}", "paper_figure", None, {"image_url": f"http://x/{n}"}) for n in range(3)])
    db = await open_db(dsn)
    sink = Sink(db, "run-1", 100, 60)
    committer = Committer(GitRepo(repo, 60, "crawler", "c@c"), sink, batch=3, interval_s=3600, run_id="run-1",
                          stamp=stamp, durable=False)
    committer.start()
    files = [placed(repo, n) for n in range(3)]
    (repo / files[1].rel_path).unlink()  # e.g. removed by hand between placing and committing
    for f in files:
        await committer.add(f)
    await committer.close()
    await sink.close()
    try:
        stamped = {r["id"] for r in await db._pool.fetch("select id from artifacts where metadata ? 'file_commit'")}
    finally:
        await db.close()
    assert stamped == {"fig-0", "fig-2"}
    assert committer.failed_ids == {"fig-1"} and committer.committed_files == 2


async def test_a_file_changed_on_disk_before_its_commit_is_not_committed_under_the_old_stamp(dsn, repo):
    """The bytes committed are the bytes whose sha256 the row is stamped with: a file rewritten
    between placing and committing is left out and its row left unstamped."""
    db = await open_db(dsn)
    try:
        sink = Sink(db, "run-x", flush_rows=10, flush_interval_s=60)
        committer = Committer(GitRepo(repo, 60, "crawler", "c@c"), sink, batch=3, interval_s=3600, run_id="run-x",
                              stamp=stamp, max_pending=10)
        keep, changed = placed(repo, 1), placed(repo, 2)
        (repo / changed.rel_path).write_bytes(b"\x89PNG rewritten by someone")
        await committer.add(keep)
        await committer.add(changed)
        await committer.commit_pending(everything=True)
        await committer.close()
        assert committer.failed_ids == {"fig-2"}
        assert git(repo, "ls-files").split() == ["figures/f1.png"]
    finally:
        await db.close()
