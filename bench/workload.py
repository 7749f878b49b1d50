"""What a benchmark job works on: its rows in a fresh PostgreSQL database, a fresh artifacts
repository, and the crawler config (TOML) pointing at the simulator.

Rows are made on the fly and sent with COPY in chunks, so a million of them cost neither the
bench's memory nor minutes of INSERTs. A row's URL says what the simulator answers
(bench/simserver.py): ``/img/...`` an image, ``/gone/...`` a 404.
"""

from __future__ import annotations

import itertools
import json
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any

import asyncpg

from crawler.git import init_repo
from crawler.sandbox import pg

from bench.rows import FIGURES_PER_PAPER, HostShare, urls

COPY_CHUNK = 10_000


def _records(shares: list[HostShare]) -> Iterator[tuple[str, str, str, None, str]]:
    for i, _host, url in urls(shares):
        paper = i // FIGURES_PER_PAPER
        metadata = {"image_url": url, "paper_id": f"PMID-{paper:07d}", "pmcid": f"PMC{1_000_000 + paper}",
                    "figure_label": f"Figure {i % FIGURES_PER_PAPER + 1}"}
        yield f"fig-{i:07d}", "paper_figure", f"Figure {i}", None, json.dumps(metadata)


def _chunks(items: Iterable[Any], size: int) -> Iterator[list[Any]]:
    it = iter(items)
    while chunk := list(itertools.islice(it, size)):
        yield chunk


async def fresh_database(admin_dsn: str, name: str, shares: list[HostShare]) -> str:
    """A new database ``name`` holding the host platform's tables and these rows; returns its DSN."""
    conn = await asyncpg.connect(admin_dsn)
    try:
        await conn.execute(f'drop database if exists "{name}"')
        await conn.execute(f'create database "{name}"')
    finally:
        await conn.close()
    dsn = pg.with_database(admin_dsn, name)
    conn = await asyncpg.connect(dsn)
    try:
        await conn.execute(pg.HOST_TABLES)
        for chunk in _chunks(_records(shares), COPY_CHUNK):
            await conn.copy_records_to_table(
                "artifacts", columns=["id", "artifact_type", "title", "file_path", "metadata"], records=chunk)
        await conn.execute("analyze artifacts")
    finally:
        await conn.close()
    return dsn


async def drop_database(admin_dsn: str, name: str) -> None:
    conn = await asyncpg.connect(admin_dsn)
    try:
        await conn.execute(f'drop database if exists "{name}"')
    finally:
        await conn.close()


async def fresh_repo(root: Path) -> None:
    await init_repo(root)


def crawler_config(*, dsn: str, root: Path, reports: Path, port: int, hosts: Iterable[str],
                   budgets: dict[str, dict[str, Any]], fsync: bool, rate_guard_s: float) -> dict[str, Any]:
    """The override tree for one run; every key not named keeps config/default.toml's value."""
    return {
        "db": {"dsn": dsn},
        "artifacts": {"root": str(root), "fsync": fsync},
        "http": {"rate_guard_s": rate_guard_s, "connect_to": {f"{h}:80": f"127.0.0.1:{port}" for h in hosts}},
        "budgets": budgets,
        "report": {"dir": str(reports), "console": False},
    }
