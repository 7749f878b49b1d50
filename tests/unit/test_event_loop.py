"""The command line's event loop: uvloop when installed (the `fast` extra), asyncio on request."""

from __future__ import annotations


def test_the_event_loop_is_uvloop_when_installed_unless_asked_for_asyncio(monkeypatch):
    import asyncio

    import pytest

    from crawler import cli
    pytest.importorskip("uvloop")

    async def which() -> str:
        return type(asyncio.get_running_loop()).__module__

    monkeypatch.delenv("CRAWLER_EVENT_LOOP", raising=False)
    assert cli._run_loop(which()).startswith("uvloop")
    monkeypatch.setenv("CRAWLER_EVENT_LOOP", "asyncio")
    assert cli._run_loop(which()).startswith("asyncio")
