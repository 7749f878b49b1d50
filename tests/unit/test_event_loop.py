"""The command line's event loop: asyncio's own; uvloop only when the bench asks for it."""

from __future__ import annotations

import asyncio

import pytest

from crawler import cli


async def _which() -> str:
    return type(asyncio.get_running_loop()).__module__


def test_the_jobs_run_on_asyncios_loop_unless_the_bench_asks_for_uvloop(monkeypatch):
    monkeypatch.delenv("CRAWLER_EVENT_LOOP", raising=False)
    assert cli._run_loop(_which()).startswith("asyncio")
    pytest.importorskip("uvloop")
    monkeypatch.setenv("CRAWLER_EVENT_LOOP", "uvloop")
    assert cli._run_loop(_which()).startswith("uvloop")
