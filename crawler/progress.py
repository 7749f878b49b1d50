"""The live progress display, when stderr is a terminal (rich): where the run stands, redrawn in
place, with the log's warnings and errors printed above it. Off a terminal the console keeps its
plain lines, and the JSON log stays the record either way.

figures: done / planned as a bar, rows/s, ETA (h:mm:ss), outcomes, commits, and per budget what
is in flight, queued, paused and until when (the hosts no budget names summed in one line).
recover: the phase, rows decided, and the tarball being read (bytes read of its size).
"""

from __future__ import annotations

import asyncio
from typing import Any

from rich.console import Console, Group, RenderableType
from rich.live import Live
from rich.progress_bar import ProgressBar
from rich.table import Table
from rich.text import Text

from . import logs
from .report import hms

REFRESH_S = 0.5
NAMED_SHOWN = 12  # budget lines shown; the rest summed


def progress_of(job: Any) -> dict[str, Any]:
    """Where a job stands (its progress()), or nothing for a job that does not say."""
    return job.progress() if hasattr(job, "progress") else {}


def render(command: str, p: dict[str, Any]) -> RenderableType:
    if "phase" in p:
        return _recover(p)
    return _figures(command, p)


def _bar(done: int, total: int) -> ProgressBar:
    return ProgressBar(total=max(total, 1), completed=min(done, max(total, 1)), width=40)


def _figures(command: str, p: dict[str, Any]) -> RenderableType:
    done, planned = int(p.get("done", 0)), int(p.get("planned", 0))
    head = Table.grid(padding=(0, 1))
    head.add_row(Text(command, style="bold"), _bar(done, planned),
                 Text(f"{done:,} / {planned:,} rows  {p.get('rows_per_s', 0):,.1f} rows/s  "
                      f"ETA {hms(p.get('eta_s'))}  {p.get('commits', 0):,} commits"))
    counts = p.get("counts") or {}
    outcome = Text("  ".join(f"{k.replace('hard_404', 'unavailable')} {v:,}" for k, v in counts.items()), style="dim")
    budgets = Table(box=None, padding=(0, 2), show_edge=False, header_style="bold")
    for col, right in (("budget", False), ("in flight", True), ("queued", True), ("requests", True), ("paused", False)):
        budgets.add_column(col, justify="right" if right else "left")
    for name, b in sorted((p.get("budgets") or {}).items())[:NAMED_SHOWN]:
        if name == "default" and "hosts" in b:  # the hosts no budget names, summed by the job
            paused = f"{b['hosts_paused']} hosts paused" if b.get("hosts_paused") else ""
            name = f"default ({b['hosts']} hosts)"
        else:
            paused = f"until {b['paused_until'][11:19]}" if b.get("paused_until") else ""
        budgets.add_row(_plain(name), str(b.get("inflight", 0)), str(b.get("queue", 0)), f"{b.get('requests', 0):,}",
                        paused)
    return Group(head, outcome, budgets)


def _plain(text: str) -> str:
    """No control characters from a host name on the terminal."""
    return "".join(c if c.isprintable() else "?" for c in text)


def _recover(p: dict[str, Any]) -> RenderableType:
    rows = Table.grid(padding=(0, 1))
    rows.add_row(Text("recover", style="bold"), Text(str(p.get("phase")), style="cyan"),
                 Text(f"rows decided {p.get('decided', 0):,} / {p.get('rows', 0):,}  {p.get('commits', 0):,} commits"))
    parts: list[RenderableType] = [rows]
    reading = p.get("reading")
    if reading:
        grid = Table.grid(padding=(0, 1))
        grid.add_row(Text("tarball", style="bold"), _bar(int(reading["tarball_bytes_read"]), int(reading["tarball_size"])),
                     Text(f"{reading['tarball_bytes_read'] / 2**20:,.1f} / {reading['tarball_size'] / 2**20:,.1f} MiB  "
                          f"{_plain(reading['tarball'])}"))
        parts.append(grid)
    return Group(*parts)


def wanted(console_on: bool, stream: Any) -> bool:
    """A live display only for a person at a terminal, with the console at its normal level."""
    try:
        return console_on and stream.isatty() and logs.console_level() == "info"
    except (AttributeError, ValueError):
        return False


async def show(job: Any, command: str) -> None:
    """Redraw until cancelled; log lines go above the display meanwhile."""
    console = Console(stderr=True)
    with Live(console=console, refresh_per_second=1 / REFRESH_S, transient=True) as live:
        logs.set_console_writer(lambda line: live.console.print(line, markup=False, highlight=False))
        try:
            while True:
                try:
                    live.update(render(command, progress_of(job)))
                except Exception:  # a display that cannot draw must never stop the run
                    pass
                await asyncio.sleep(REFRESH_S)
        finally:
            logs.set_console_writer(None)
