"""The bench's event loop switch: uvloop for its comparison, asyncio's own otherwise."""

from __future__ import annotations

import asyncio

import pytest

from bench import measured
from crawler import cli


async def _which() -> str:
    return type(asyncio.get_running_loop()).__module__


def test_the_bench_can_run_a_job_on_uvloop():
    pytest.importorskip("uvloop")
    try:
        measured.use_event_loop("uvloop")
        assert cli._run_loop(_which()).startswith("uvloop")
    finally:
        asyncio.set_event_loop_policy(None)


def test_the_bench_refuses_an_event_loop_it_does_not_know():
    with pytest.raises(SystemExit, match="asyncio or uvloop"):
        measured.use_event_loop("trio")
