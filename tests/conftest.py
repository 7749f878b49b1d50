"""Shared fixtures: a real PostgreSQL (embedded, or CRAWLER_TEST_DSN), a fresh database per test,
a git artifacts repo, and config trees pointing at them."""

from __future__ import annotations

import itertools
import os
import tempfile
from pathlib import Path

import pytest

from crawler.sandbox import pg
from tests.harness import git

_counter = itertools.count()


@pytest.fixture(scope="session")
def pg_admin_dsn() -> str:
    if os.environ.get("CRAWLER_TEST_DSN"):
        return os.environ["CRAWLER_TEST_DSN"]
    root = Path(tempfile.mkdtemp(prefix="crawler-test-pg-"))
    global EMBEDDED_PGDATA
    EMBEDDED_PGDATA = root / "data"
    return pg.start(EMBEDDED_PGDATA, keep=False)


EMBEDDED_PGDATA: Path | None = None  # the embedded server's data folder (tests that stop and start it)


@pytest.fixture
async def dsn(pg_admin_dsn: str) -> str:
    """A new, empty database holding the host platform's tables."""
    return await pg.ensure_database(pg_admin_dsn, f"t_{os.getpid()}_{next(_counter)}", fresh=True)


@pytest.fixture
async def sim():
    """The upstream simulator on a loopback port, every host routed to it by the config trees."""
    from crawler.sandbox.simulator import UpstreamSimulator
    async with UpstreamSimulator() as s:
        yield s


@pytest.fixture
def repo(tmp_path: Path) -> Path:
    root = tmp_path / "artifacts"
    root.mkdir()
    git(root, "init", "-q", "-b", "main")
    git(root, "-c", "user.name=t", "-c", "user.email=t@t", "commit", "-q", "--allow-empty", "-m", "init")
    return root
