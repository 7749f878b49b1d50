"""The PostgreSQL repository: the only module that imports asyncpg.

It runs the named statements of `crawler.sql.queries` with the configured identifiers, applies
the tool's own migrations on first use, and hands rows out as plain dicts. Pipelines call its
methods; they never see SQL.
"""

from __future__ import annotations

import importlib.resources
import json
import os
import re
import socket
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import asyncpg

from .sql import queries as Q


def to_json(value: Any) -> str:
    """JSON text PostgreSQL accepts: lone surrogates (undecodable file names) become "?"."""
    return json.dumps(value, ensure_ascii=False, default=str).encode("utf-8", "replace").decode("utf-8")


# A row's values the database refuses (a cast out of range, bad JSON text), or a row another
# session holds locked past db.lock_timeout_s: that row's problem, not the batch's.
DataError = (asyncpg.DataError, asyncpg.exceptions.LockNotAvailableError)


class DatabaseError(Exception):
    """The database cannot be reached or used; str() is one line for the operator."""


class JobBusy(Exception):
    """Another run of a one-at-a-time job holds its lock; str() names it, in one line."""


def quote_ident(name: str) -> str:
    return '"' + name.replace('"', '""') + '"'


def _migrations() -> list[tuple[int, str]]:
    folder = importlib.resources.files("crawler.sql").joinpath("migrations")
    out = []
    for entry in folder.iterdir():
        m = re.match(r"^(\d+)_.*\.sql$", entry.name)
        if m:
            out.append((int(m.group(1)), entry.read_text()))
    return sorted(out)


def schema_sql() -> str:
    return importlib.resources.files("crawler.sql").joinpath("schema.sql").read_text()


@dataclass(frozen=True)
class Change:
    """One row's change: the metadata keys to merge, an optional new file_path, a counter to bump."""

    artifact_id: str
    outcome: str
    patch: dict[str, Any]
    file_path: str | None = None
    bump_key: str | None = None
    detail: dict[str, Any] | None = None
    change_id: str | None = None  # given by the sink: unique, so a batch sent twice is written once
    # apply and undo: the values the row must hold to be changed ({"file_path"?, "metadata": {key:
    # value, null = absent}}), metadata keys to remove, and whether file_path is set even to null.
    expect: dict[str, Any] | None = None
    unset: tuple[str, ...] = ()
    set_file_path: bool = False


def is_connection_error(exc: BaseException) -> bool:
    """Whether `exc` says the database could not be reached or went away (a restart, a network
    cut, a shutdown), as opposed to refusing what was sent: the write is kept and sent again.
    A statement the server cancelled (statement_timeout) is not an outage."""
    if isinstance(exc, asyncpg.exceptions.QueryCanceledError):
        return False
    return isinstance(exc, (
        OSError, TimeoutError, asyncpg.exceptions.InterfaceError, asyncpg.exceptions.ConnectionDoesNotExistError,
        asyncpg.PostgresConnectionError, asyncpg.exceptions.OperatorInterventionError,
        asyncpg.exceptions.CannotConnectNowError))


def _decoded(records: Sequence[Any], keys: Sequence[str]) -> list[dict[str, Any]]:
    """Rows as dicts, their JSON columns `keys` decoded (None stays None)."""
    out = []
    for r in records:
        d = dict(r)
        for key in keys:
            d[key] = json.loads(d[key]) if d[key] is not None else None
        out.append(d)
    return out


class Database:
    def __init__(self, pool: asyncpg.Pool, table: str, schema: str, read_only: bool = False) -> None:
        self._pool = pool
        self.read_only = read_only
        self._dsn = ""
        self._connect_timeout_s = 10.0
        # Connections of their own ("beat": heartbeats, "lease": leases), never queued behind
        # pages: with a producer per unit the pool's connections can all be busy.
        self._own: dict[str, asyncpg.Connection] = {}
        self.table_name = table
        self.schema_name = schema
        self._idents = {"table": quote_ident(table), "schema": quote_ident(schema), "updated_at": ""}

    @classmethod
    async def connect(cls, dsn: str, table: str, schema: str, timeout_s: float, max_size: int = 4,
                      statement_timeout_s: float = 0, lock_timeout_s: float = 0,
                      idle_in_transaction_timeout_s: float = 0, read_only: bool = False) -> Database:
        # The server ends a statement, a wait for a row lock or a transaction left open after
        # these: a row another session holds locked can no longer hold up the sink for ever.
        settings = {"statement_timeout": f"{int(statement_timeout_s * 1000)}",
                    "lock_timeout": f"{int(lock_timeout_s * 1000)}",
                    "idle_in_transaction_session_timeout": f"{int(idle_in_transaction_timeout_s * 1000)}"}
        if read_only:  # every transaction read-only: a write that slipped in fails, it cannot land
            settings["default_transaction_read_only"] = "on"
        try:
            pool = await asyncpg.create_pool(
                dsn, min_size=1, max_size=max_size, timeout=timeout_s, server_settings=settings,
                # ... and the client gives up a little later, should the server not answer at all
                command_timeout=statement_timeout_s + timeout_s if statement_timeout_s else None)
        except (OSError, asyncpg.PostgresError, asyncpg.InterfaceError, TimeoutError, ValueError) as exc:
            raise DatabaseError(f"cannot connect to the database: {exc}") from None
        db = cls(pool, table, schema, read_only)
        db._dsn, db._connect_timeout_s = dsn, timeout_s
        return db

    async def close(self) -> None:
        for conn in self._own.values():
            if not conn.is_closed():
                await conn.close()
        self._own.clear()
        await self._pool.close()

    def _sql(self, text: str) -> str:
        return text.format(**self._idents)

    async def prepare(self) -> None:
        """Apply pending migrations of the tool's schema; check the artifacts table exists. Read
        only: only the check (the role may not be allowed to create a schema)."""
        async with self._pool.acquire() as conn:
            columns = {r["column_name"] for r in await conn.fetch(Q.TABLE_COLUMNS, self.table_name)}
            if not columns:
                raise DatabaseError(f"table {self.table_name!r} not found (db.artifacts_table)")
            missing = {"id", "artifact_type", "file_path", "metadata"} - columns
            if missing:
                raise DatabaseError(f"table {self.table_name!r} lacks column {sorted(missing)[0]!r}")
            if "updated_at" in columns:
                self._idents["updated_at"] = ", updated_at = now()"
            if self.read_only:
                return
            try:
                await self._migrate(conn)
            except asyncpg.InsufficientPrivilegeError as exc:
                raise DatabaseError(
                    f"the database role may not create or change the tool's schema {self.schema_name!r} ({exc}); "
                    "a role that may only read can run --plan, --changeset and --dry-run") from None

    async def _migrate(self, conn: asyncpg.Connection) -> None:
        async with conn.transaction():
            # Two runs starting together must not race to create the schema.
            await conn.execute(Q.LOCK_MIGRATIONS, self.schema_name)
            await conn.execute(self._sql(Q.CREATE_SCHEMA))
            await conn.execute(self._sql(Q.CREATE_VERSION_TABLE))
            applied = {r["version"] for r in await conn.fetch(self._sql(Q.APPLIED_VERSIONS))}
            for version, text in _migrations():
                if version not in applied:
                    await conn.execute(text.replace("{schema}", self._idents["schema"]))
                    await conn.execute(self._sql(Q.RECORD_VERSION), version)

    # -- one job at a time -------------------------------------------------------------------
    async def job_lock(self, name: str, holder: str, dsn: str, timeout_s: float) -> asyncpg.Connection:
        """A connection holding the advisory lock `name` for as long as it is open; its
        application_name (`holder`) is what a second run is told. Raises JobBusy naming the
        holder when someone else has it. Works in read-only mode (a lock is not a write)."""
        key = f"crawler:{self.schema_name}:{name}"
        conn = await asyncpg.connect(dsn, timeout=timeout_s, server_settings={"application_name": holder[:63]})
        try:
            if await conn.fetchval(Q.TRY_JOB_LOCK, key):
                return conn
            row = await conn.fetchrow(Q.JOB_LOCK_HOLDER, key)
        except BaseException:
            await conn.close()
            raise
        await conn.close()
        since = f" (connected since {row['backend_start']:%Y-%m-%d %H:%M:%S %Z})" if row and row["backend_start"] else ""
        who = f"{row['application_name']}{since}" if row and row["application_name"] \
            else "another run (this database role may not see which)"
        raise JobBusy(f"another {name} run holds its lock: {who}; one {name} at a time")

    # -- runs ---------------------------------------------------------------------------------
    async def start_run(self, run_id: str, command: str, config: dict[str, Any]) -> None:
        await self._pool.execute(self._sql(Q.START_RUN), run_id, command, json.dumps(config),
                                 socket.gethostname(), os.getpid())

    async def heartbeat(self, run_id: str, progress: dict[str, Any]) -> None:
        """On a connection of its own: with a producer per host the pool's connections can all
        be busy with pages, and a heartbeat waiting behind them would show a healthy run lost."""
        conn = await self._own_conn("beat")
        await conn.execute(self._sql(Q.HEARTBEAT), run_id, to_json(progress))

    async def _own_conn(self, name: str) -> asyncpg.Connection:
        conn = self._own.get(name)
        if conn is None or conn.is_closed():
            conn = self._own[name] = await asyncpg.connect(self._dsn, timeout=self._connect_timeout_s)
        return conn

    async def _lease_conn(self) -> asyncpg.Connection:
        return await self._own_conn("lease")

    # -- leases (crawler/leases.py) --------------------------------------------------------------

    async def lease_take(self, holder: str, run_id: str, lease_s: float, units: Sequence[str], limit: int) -> list[str]:
        conn = await self._lease_conn()
        return [r["unit"] for r in await conn.fetch(self._sql(Q.LEASE_TAKE), holder, run_id, float(lease_s),
                                                     list(units), limit)]

    async def lease_renew(self, holder: str, lease_s: float, units: Sequence[str]) -> set[str]:
        conn = await self._lease_conn()
        return {r["unit"] for r in await conn.fetch(self._sql(Q.LEASE_RENEW), holder, float(lease_s), list(units))}

    async def lease_done(self, holder: str, run_id: str, unit: str) -> None:
        conn = await self._lease_conn()
        await conn.execute(self._sql(Q.LEASE_DONE), holder, run_id, unit)

    async def lease_state(self, holder: str, run_id: str, units: Sequence[str]) -> tuple[set[str], int, int]:
        """(units swept for `holder` of `run_id`, processes alive, processes alive in the run)."""
        conn = await self._lease_conn()
        r = await conn.fetchrow(self._sql(Q.LEASE_STATE), run_id, list(units), holder)
        return set(r["done"]), r["alive"], r["alive_in_run"]

    async def lease_holder_seen(self, holder: str, run_id: str, lease_s: float, progress: dict[str, Any] | None) -> None:
        conn = await self._lease_conn()
        await conn.execute(self._sql(Q.LEASE_HOLDER_SEEN), holder, run_id, socket.gethostname(), os.getpid(),
                           float(lease_s), to_json(progress) if progress is not None else None)

    async def lease_release(self, holder: str) -> None:
        """Give back every lease of `holder` and its presence (a clean end: no wait for expiry)."""
        conn = await self._lease_conn()
        async with conn.transaction():
            await conn.execute(self._sql(Q.LEASE_RELEASE), holder)
            await conn.execute(self._sql(Q.LEASE_HOLDER_GONE), holder)
            await conn.execute(self._sql(Q.LEASE_HOLDERS_FORGET))

    async def lease_run_progress(self, run_id: str) -> list[dict[str, Any]]:
        return _decoded(await self._pool.fetch(self._sql(Q.LEASE_RUN_PROGRESS), run_id), ("progress",))

    async def recent_runs(self, limit: int, heartbeat_s: float) -> list[dict[str, Any]]:
        return _decoded(await self._pool.fetch(self._sql(Q.RECENT_RUNS), limit, float(heartbeat_s)),
                        ("progress", "summary"))

    async def latest_recover_summary(self) -> dict[str, Any] | None:
        value = await self._pool.fetchval(self._sql(Q.LATEST_RECOVER_SUMMARY))
        return json.loads(value) if value is not None else None

    async def row_states(self, now_iso: str) -> list[dict[str, Any]]:
        async with self._pool.acquire() as conn, conn.transaction(readonly=True):
            return [dict(r) for r in await conn.fetch(self._sql(Q.ROW_STATES), now_iso)]

    async def finish_run(self, run_id: str, status: str, summary: dict[str, Any]) -> None:
        await self._pool.execute(self._sql(Q.FINISH_RUN), run_id, status, json.dumps(summary))

    async def last_run_id(self) -> str | None:
        return await self._pool.fetchval(self._sql(Q.LAST_RUN))

    # -- figure rows --------------------------------------------------------------------------
    async def figure_hosts(self, now_iso: str, retry_failed: bool, host: str | None) -> dict[str | None, int]:
        rows = await self._pool.fetch(self._sql(Q.FIGURE_HOSTS), now_iso, retry_failed, host)
        return {r["host"]: r["n"] for r in rows}

    async def figure_skipped(self) -> tuple[int, list[str]]:
        """(rows without an image_url, ids of rows whose metadata is not a JSON object)."""
        row = await self._pool.fetchrow(self._sql(Q.FIGURE_SKIPPED))
        return row["no_url"] or 0, list(row["bad_metadata"] or [])

    async def figure_page(self, hosts: Sequence[str] | None, after_id: str, limit: int,
                          now_iso: str, retry_failed: bool) -> list[dict[str, Any]]:
        async with self._pool.acquire() as conn, conn.transaction(readonly=True):
            # The planner cannot estimate how many rows a host has (a regular expression over
            # JSON) and guesses a handful, so on a large table it sorts the whole table for every
            # page (2.5 s at 1,000,000 rows). Walking the primary key in order is always right for
            # a keyset page: it stops after `limit` matches.
            await conn.execute(Q.PREFER_KEY_ORDER)
            rows = await conn.fetch(self._sql(Q.FIGURE_PAGE), now_iso, retry_failed,
                                    None if hosts is None else list(hosts), after_id, limit)
        out = []
        for r in rows:
            d = dict(r)
            for key in ("image_url", "paper_id", "pmcid", "figure_label"):
                d[key] = json.loads(d[key]) if d[key] is not None else None
            out.append(d)
        return out

    # -- writes -------------------------------------------------------------------------------
    async def apply_changes(self, run_id: str, changes: Sequence[Change]) -> int:
        """Merge every change in one transaction and one round trip; journal each. Returns rows
        written. Changes with an expectation (apply, undo) are written only to rows that hold it."""
        expected = [c for c in changes if c.expect is not None]
        changes = [c for c in changes if c.expect is None]
        written = await self._apply_expected(run_id, expected) if expected else 0
        if not changes:
            return written
        cols: list[list[str | None]] = [[], [], [], [], [], [], []]
        for c in changes:
            cols[0].append(c.artifact_id)
            cols[1].append(c.outcome)
            cols[2].append(c.file_path)
            cols[3].append(to_json(c.patch))
            cols[4].append(c.bump_key)
            cols[5].append(to_json(c.detail or {}))
            cols[6].append(c.change_id)
        async with self._pool.acquire() as conn, conn.transaction():
            rows = await conn.fetch(self._sql(Q.APPLY_CHANGES), run_id, *cols)
        return written + len(rows)

    async def _apply_expected(self, run_id: str, changes: Sequence[Change]) -> int:
        cols: list[list[Any]] = [[] for _ in range(11)]
        for c in changes:
            expect = c.expect or {}
            for k, v in enumerate((c.artifact_id, c.outcome, c.set_file_path or c.file_path is not None, c.file_path,
                                   "file_path" in expect, expect.get("file_path"), to_json(expect.get("metadata") or {}),
                                   to_json(c.patch), to_json(list(c.unset)), to_json(c.detail or {}), c.change_id)):
                cols[k].append(v)
        async with self._pool.acquire() as conn, conn.transaction():
            rows = await conn.fetch(self._sql(Q.APPLY_EXPECTED), run_id, *cols)
        return len(rows)

    async def rows_by_id(self, ids: Sequence[str]) -> dict[str, dict[str, Any]]:
        """{id: {"file_path", "metadata"}} of the rows that exist (read in a read-only transaction)."""
        async with self._pool.acquire() as conn, conn.transaction(readonly=True):
            rows = await conn.fetch(self._sql(Q.ROWS_BY_ID), list(ids))
        return {r["id"]: {"file_path": r["file_path"], "metadata": json.loads(r["metadata"])} for r in rows}

    async def rows_with_file_paths(self, paths: Sequence[str]) -> dict[str, set[str]]:
        """{path: ids of the rows naming it as their file} for these paths."""
        out: dict[str, set[str]] = {}
        for r in await self._pool.fetch(self._sql(Q.ROWS_WITH_FILE_PATHS), list(paths)):
            out.setdefault(r["file_path"], set()).add(r["id"])
        return out

    async def has_state(self) -> bool:
        """Whether the tool's schema exists (a read-only run may find none); one the role may
        not read is said in one line."""
        exists, readable = await self._pool.fetchrow(Q.HAS_STATE_SCHEMA, self.schema_name)
        if exists and not readable:
            raise DatabaseError(f"the database role may not read the tool's schema {self.schema_name!r} "
                                "(its journal and runs): grant it usage and select there")
        return bool(exists)

    async def run_info(self, run_id: str) -> dict[str, Any] | None:
        row = await self._pool.fetchrow(self._sql(Q.RUN_EXISTS), run_id)
        return dict(row) if row else None

    async def run_journal(self, run_id: str) -> list[dict[str, Any]]:
        """Every change a run wrote, directly or by `apply` of its changeset, oldest first."""
        out = []
        for r in await self._pool.fetch(self._sql(Q.RUN_JOURNAL), run_id):
            d = dict(r)
            d["before_metadata"] = json.loads(d["before_metadata"])
            d["after_metadata"] = json.loads(d["after_metadata"])
            out.append(d)
        return out

    # -- recovery rows ---------------------------------------------------------------------------
    async def recovery_rows(self, types: Sequence[str], page_size: int) -> list[dict[str, Any]]:
        """Every row of these types, paged by key (the three types hold hundreds, not millions)."""
        out: list[dict[str, Any]] = []
        after = ""
        while True:
            rows = await self._pool.fetch(self._sql(Q.RECOVERY_PAGE), list(types), after, page_size)
            if not rows:
                return out
            for r in rows:
                out.append({"id": r["id"], "artifact_type": r["artifact_type"], "file_path": r["file_path"],
                            "metadata": json.loads(r["metadata"])})
            after = rows[-1]["id"]

    async def latest_references(self, ids: Sequence[str]) -> dict[str, dict[str, Any]]:
        """The latest artifact_references entry per id, where that optional table exists."""
        if not await self._pool.fetchval(Q.HAS_REFERENCES):
            return {}
        rows = await self._pool.fetch(Q.LATEST_REFERENCES, list(ids))
        return {r["artifact_id"]: dict(r) for r in rows}

    # -- tarball manifests -------------------------------------------------------------------------
    async def manifest_find(self, s3_url: str, etag: str, size: int) -> dict[str, Any] | None:
        row = await self._pool.fetchrow(self._sql(Q.MANIFEST_FIND), s3_url, etag, size)
        return dict(row) if row else None

    async def manifest_open(self, s3_url: str, etag: str, size: int, run_id: str) -> int:
        async with self._pool.acquire() as conn, conn.transaction():
            manifest_id = await conn.fetchval(self._sql(Q.MANIFEST_OPEN), s3_url, etag, size, run_id)
            await conn.execute(self._sql(Q.MANIFEST_CLEAR), manifest_id)
        return manifest_id

    async def manifest_add_members(self, records: Sequence[tuple[Any, ...]]) -> None:
        """Member rows in Q.MEMBERS_COLUMNS order, by COPY (a tarball may hold millions)."""
        if records:
            async with self._pool.acquire() as conn:
                await conn.copy_records_to_table("tarball_members", schema_name=self.schema_name,
                                                 columns=list(Q.MEMBERS_COLUMNS), records=records)

    async def manifest_close(self, manifest_id: int, error: str | None, members: int) -> None:
        await self._pool.execute(self._sql(Q.MANIFEST_CLOSE), manifest_id, error, members)

    async def manifest_extracted(self, manifest_id: int) -> list[dict[str, Any]]:
        return [dict(r) for r in await self._pool.fetch(self._sql(Q.MEMBERS_EXTRACTED), manifest_id)]

    async def manifest_paths(self, manifest_id: int) -> list[tuple[str, int, bool]]:
        """(normalised path, size, whether a copy was extracted) of its regular, unrefused members."""
        return [(r["path"], r["size"], r["extracted"])
                for r in await self._pool.fetch(self._sql(Q.MEMBER_PATHS), manifest_id)]

    # -- for tests and the sandbox ------------------------------------------------------------
    async def fetch(self, sql: str, *args: Any) -> list[asyncpg.Record]:
        return await self._pool.fetch(self._sql(sql), *args)

    async def execute(self, sql: str, *args: Any) -> str:
        return await self._pool.execute(self._sql(sql), *args)
