"""The command line's event loop: asyncio's own, always; uvloop only in the bench's comparison."""

from __future__ import annotations

import asyncio

import pytest

from bench import measured
from crawler import cli


async def _which() -> str:
    return type(asyncio.get_running_loop()).__module__


def test_the_jobs_run_on_asyncios_loop_whatever_the_environment_says(monkeypatch):
    monkeypatch.setenv("CRAWLER_EVENT_LOOP", "uvloop")  # the switch of earlier versions: gone
    assert cli._run_loop(_which()).startswith("asyncio")


def test_the_bench_can_run_a_job_on_uvloop():
    pytest.importorskip("uvloop")
    try:
        measured.use_event_loop("uvloop")
        assert cli._run_loop(_which()).startswith("uvloop")
    finally:
        asyncio.set_event_loop_policy(None)
    assert cli._run_loop(_which()).startswith("asyncio")
    with pytest.raises(SystemExit, match="asyncio or uvloop"):
        measured.use_event_loop("trio")
