"""The repository and sink against a real PostgreSQL."""

import json

import asyncpg

from crawler.db import Change, Database
from crawler.sink import Sink, figure_hard_404, figure_retryable, utcnow


async def open_db(dsn: str) -> Database:
    db = await Database.connect(dsn, "artifacts", "artifact_recovery", 10)
    await db.prepare()
    return db


async def insert(dsn: str, rows: list[tuple[str, str, str | None, object]]) -> None:
    conn = await asyncpg.connect(dsn)
    try:
        await conn.executemany(
            "insert into artifacts (id, artifact_type, file_path, metadata) values ($1, $2, $3, $4::jsonb)",
            [(i, t, fp, json.dumps(m)) for i, t, fp, m in rows])
    finally:
        await conn.close()


async def test_prepare_is_idempotent_and_concurrent(dsn):
    dbs = [await Database.connect(dsn, "artifacts", "artifact_recovery", 10) for _ in range(3)]
    try:
        import asyncio
        await asyncio.gather(*(db.prepare() for db in dbs))
        await dbs[0].prepare()
        versions = await dbs[0].fetch("select version from {schema}.schema_version")
        assert sorted(r["version"] for r in versions) == [1, 2, 3, 4, 5, 6]
    finally:
        for db in dbs:
            await db.close()


async def test_schema_file_equals_the_migrations(dsn, pg_admin_dsn):
    """schema.sql and the numbered migrations must build the same tables."""
    from crawler.db import schema_sql
    db = await open_db(dsn)
    try:
        conn = await asyncpg.connect(dsn)
        await conn.execute("create schema fromfile")
        await conn.execute(schema_sql().replace("{schema}", "fromfile"))
        q = """select table_name, column_name, data_type, is_nullable, column_default is not null as has_default
               from information_schema.columns where table_schema = $1 and table_name <> 'schema_version'
               order by 1, 2"""
        migrated = [tuple(r) for r in await conn.fetch(q, "artifact_recovery")]
        from_file = [tuple(r) for r in await conn.fetch(q, "fromfile")]
        await conn.close()
        assert migrated and migrated == from_file
    finally:
        await db.close()


async def test_changes_merge_keys_bump_counters_and_journal(dsn):
    await insert(dsn, [
        ("a", "paper_figure", None, {"image_url": "https://x.org/a.png", "keep": 1, "image_fetch_attempts": 2}),
        ("b", "paper_figure", None, {"image_url": "https://x.org/b.png", "image_fetch_attempts": "garbage"}),
        ("c", "paper_figure", None, ["not", "an", "object"]),
    ])
    db = await open_db(dsn)
    try:
        now = utcnow()
        written = await db.apply_changes("run-1", [
            figure_hard_404("a", 410, now, "https://x.org/a.png"),
            figure_retryable("b", "transient", "timeout", now, "https://x.org/b.png", now),
            figure_hard_404("c", 404, now, "https://x.org/c.png"),  # garbage metadata: untouched
        ])
        assert written == 2
        rows = {r["id"]: (json.loads(r["metadata"]), r["updated_at"])
                for r in await db.fetch("select id, metadata, updated_at from artifacts")}
        a, b, c = rows["a"][0], rows["b"][0], rows["c"][0]
        assert a["keep"] == 1 and a["image_unavailable"] is True and a["image_http_status"] == 410
        assert a["image_fetch_attempts"] == 3 and rows["a"][1] is not None
        assert b["image_fetch_outcome"] == "transient" and b["image_fetch_attempts"] == 1
        assert "image_unavailable" not in b
        assert c == ["not", "an", "object"] and rows["c"][1] is None
        journal = {r["artifact_id"]: r for r in await db.fetch("select * from {schema}.journal")}
        assert set(journal) == {"a", "b"}
        ja = journal["a"]
        assert json.loads(ja["before_metadata"]) == {"image_fetch_attempts": 2}
        after = json.loads(ja["after_metadata"])
        assert after["image_unavailable"] is True and after["image_fetch_attempts"] == 3 and "keep" not in after
        assert ja["outcome"] == "hard_404" and ja["run_id"] == "run-1"
    finally:
        await db.close()


async def test_sink_batches_and_flushes_on_close(dsn):
    await insert(dsn, [(f"r{i:03}", "paper_figure", None, {"image_url": "u"}) for i in range(25)])
    db = await open_db(dsn)
    try:
        batches: list[int] = []
        sink = Sink(db, "run-2", flush_rows=10, flush_interval_s=60, on_written=lambda b: batches.append(len(b)))
        sink.start()
        for i in range(25):
            sink.record(Change(f"r{i:03}", "x", {"k": i}))
        await sink.close()
        assert sum(batches) == 25 and max(batches) <= 10
        n = await db.fetch("select count(*) as n from artifacts where metadata ? 'k'")
        assert n[0]["n"] == 25
    finally:
        await db.close()


async def test_one_bad_value_never_holds_back_the_batch(dsn):
    await insert(dsn, [
        ("huge", "paper_figure", None, {"image_url": "u", "image_fetch_attempts": 1e19}),
        ("neg", "paper_figure", None, {"image_url": "u", "image_fetch_attempts": -4.5}),
        ("ok", "paper_figure", None, {"image_url": "u", "image_fetch_attempts": 2}),
        ("name", "dataset", None, {}),
    ])
    db = await open_db(dsn)
    try:
        sink = Sink(db, "run-3", flush_rows=10, flush_interval_s=60)
        now = utcnow()
        for rid in ("huge", "neg", "ok"):
            sink.record(figure_retryable(rid, "transient", "timeout", now, "u", now))
        sink.record(Change("name", "bound", {"file_bind_source": "worktree:caf\udce9"}))  # not UTF-8 on disk
        await sink.flush()
        rows = {r["id"]: json.loads(r["metadata"]) for r in await db.fetch("select id, metadata from artifacts")}
        assert rows["huge"]["image_fetch_attempts"] == 1 and rows["neg"]["image_fetch_attempts"] == 1
        assert rows["ok"]["image_fetch_attempts"] == 3
        assert rows["name"]["file_bind_source"] == "worktree:caf?"
        assert sink.refused == [] and sink.pending == 0
    finally:
        await db.close()


async def test_a_row_the_database_refuses_is_set_aside_alone(dsn, monkeypatch):
    await insert(dsn, [(f"r{i}", "paper_figure", None, {"image_url": "u"}) for i in range(3)])
    db = await open_db(dsn)
    try:
        real = db.apply_changes

        async def refuse_r1(run_id, changes):
            if any(c.artifact_id == "r1" for c in changes):
                raise asyncpg.exceptions.NumericValueOutOfRangeError("value out of range")
            return await real(run_id, changes)

        monkeypatch.setattr(db, "apply_changes", refuse_r1)
        sink = Sink(db, "run-4", flush_rows=10, flush_interval_s=60)
        for i in range(3):
            sink.record(Change(f"r{i}", "x", {"k": i}))
        await sink.flush()
        assert sink.refused == ["r1"] and sink.pending == 0
        [entry] = sink.unrecorded.as_list()  # the run ends finished_with_errors, exit 3, naming the row
        assert entry["what"] == "database" and entry["artifact_ids"] == ["r1"] and "out of range" in entry["why"]
        rows = {r["id"]: json.loads(r["metadata"]) for r in await db.fetch("select id, metadata from artifacts")}
        assert "k" in rows["r0"] and "k" not in rows["r1"] and "k" in rows["r2"]
    finally:
        await db.close()


def test_a_cancelled_statement_is_not_an_outage_but_a_lost_connection_is():
    from crawler.db import is_connection_error
    assert not is_connection_error(asyncpg.exceptions.QueryCanceledError("canceling statement due to statement timeout"))
    assert is_connection_error(asyncpg.exceptions.ConnectionDoesNotExistError("connection was closed"))
    assert is_connection_error(ConnectionRefusedError())
    assert not is_connection_error(asyncpg.DataError("value out of range"))
