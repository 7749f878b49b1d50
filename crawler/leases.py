"""Budget leases: which budgets this process serves, when several processes work on one table.

A *unit* is what one process serves at a time: a named budget, a group of the hosts no budget
names (`default#k`, see `unit_of`), or the rows whose URL has no host. Its rows are requested
only by the holder of its lease, so no row is requested twice and each budget's caps hold across
every process, with no round trip per request. Leases live in PostgreSQL (`leases`, migration
006); why a table with expiry rather than advisory locks is in docs/scale-out.md.

Every `tick_s` (lease_s / 3) a process, in one `tick()`:
1. renews its leases; one not renewed (another took it after it expired) is lost;
2. says it is alive (`lease_holders`), with its progress when a `--workers` parent reads it;
3. takes free units up to its fair share: the units its run has not swept, over the processes
   alive. Each process tries them in an order of its own, so processes asking at once spread.
Between ticks (a unit of its own came to its end, or it waits on others' units and looks twice
a second) it only `look()`s: step 3, in one or two statements, with nothing renewed.

A lease is *surely ours* until the local clock reached, before the renewing statement was sent,
plus lease_s: the database's expiry is later than that, so no one else can hold it while we
think we do. Past that without a renewal (the database away) the unit is dropped: its rows stay
for whoever takes it next. A unit swept to its end is recorded as done for the run (`lease_done`);
the run's processes do not take it again (nor does a process of another run that started before
that sweep ended: see SWEPT_FOR_US in crawler/sql/queries.py), and a process ends once every unit is done, so a
process killed mid-run has its units taken over by the others before they end. Leases are given
back at the very end (`release`), once what was fetched is committed and stamped.
"""

from __future__ import annotations

import asyncio
import math
import os
import secrets
import socket
import time
import zlib
from collections.abc import Callable, Sequence
from typing import Any, Protocol, cast

import structlog

log = structlog.get_logger()

UNPARSEABLE_UNIT = "(unparseable)"


def unit_of(budget_name: str, host: str, groups: int) -> str:
    """The lease unit of a host: its named budget, or for a `default:<host>` budget one of
    `groups` groups, by a hash of the host that every process computes alike."""
    if not budget_name.startswith("default:"):
        return budget_name
    return f"default#{zlib.crc32(host.encode('utf-8', 'surrogateescape')) % groups}"


class LeaseStore(Protocol):
    async def lease_take(self, holder: str, run_id: str, lease_s: float, units: Sequence[str], limit: int) -> list[str]: ...
    async def lease_renew(self, holder: str, lease_s: float, units: Sequence[str]) -> set[str]: ...
    async def lease_done(self, holder: str, run_id: str, unit: str) -> None: ...
    async def lease_state(self, holder: str, run_id: str, units: Sequence[str]) -> tuple[set[str], int, int]: ...
    async def lease_holder_seen(self, holder: str, run_id: str, lease_s: float, progress: dict[str, Any] | None) -> None: ...
    async def lease_release(self, holder: str) -> None: ...


def new_holder() -> str:
    return f"{socket.gethostname()}:{os.getpid()}:{secrets.token_hex(3)}"


class Leases:
    def __init__(self, store: LeaseStore, run_id: str, units: Sequence[str], lease_s: float,
                 progress: Callable[[], dict[str, Any]] | None = None,
                 clock: Callable[[], float] = time.monotonic, holder: str | None = None) -> None:
        self.store = store
        self.run_id = run_id
        self.units = sorted(set(units))
        self.lease_s = float(lease_s)
        self.tick_s = self.lease_s / 3
        self.holder = holder or new_holder()
        self.progress = progress
        self.clock = clock
        self.held: dict[str, float] = {}  # unit -> local time until which it is surely ours
        self.done: set[str] = set()
        self.alive = 1
        self.tick_began = -math.inf  # local time the last tick began (whether it worked or not)
        # Each process its own order of trying units: processes asking at once get different ones.
        key = zlib.crc32(self.holder.encode())
        self._order = sorted(self.units, key=lambda u: zlib.crc32(u.encode()) ^ key)

    def holds(self, unit: str) -> bool:
        return self.held.get(unit, 0.0) > self.clock()

    def all_done(self) -> bool:
        return self.done.issuperset(self.units)

    async def join(self, expect: int, poll_s: float = 0.2) -> None:
        """Say we are here, then wait (at most lease_s) until `expect` processes of the run are:
        processes started together share the units instead of the first taking them all."""
        await self.store.lease_holder_seen(self.holder, self.run_id, self.lease_s, None)
        deadline = self.clock() + self.lease_s
        while expect > 1 and self.clock() < deadline:
            _done, _alive, in_run = await self.store.lease_state(self.holder, self.run_id, self.units)
            if in_run >= expect:
                return
            await asyncio.sleep(poll_s)

    def expired(self) -> list[str]:
        """Units whose lease could not be renewed in time: no longer ours to serve."""
        now = self.clock()
        gone = [u for u, until in self.held.items() if until <= now]
        for u in gone:
            del self.held[u]
        return gone

    def tick_due(self) -> bool:
        """Whether the last tick began tick_s ago or more (or none did yet). A tick that failed
        (the database away) is tried again tick_s later, as when every tick was on a timer:
        lease_s is three ticks, so a lease survives two failed renewals in a row."""
        return self.next_tick_in() <= 0

    def next_tick_in(self) -> float:
        """Seconds until the next tick is due (0: now). Whatever else wakes the caller in
        between (a unit ending), it must not sleep past this."""
        return max(0.0, self.tick_began + self.tick_s - self.clock())

    async def wake(self) -> tuple[list[str], list[str]]:
        """Whatever woke the caller: a tick when one is due, else a look. (units gained, units lost)"""
        return await self.tick() if self.tick_due() else (await self.look(), [])

    async def tick(self) -> tuple[list[str], list[str]]:
        """Renew, say we are alive, take our share: (units gained, units lost)."""
        lost = self.expired()
        sent = self.tick_began = self.clock()
        if self.held:
            kept = await self.store.lease_renew(self.holder, self.lease_s, list(self.held))
            answered = self.clock()
            for unit, until in list(self.held.items()):
                # Renewed too late (the answer came after it ran out): its workers may have
                # stopped on it already, so it is lost all the same.
                if unit in kept and until > answered:
                    self.held[unit] = sent + self.lease_s
                else:
                    del self.held[unit]
                    lost.append(unit)
        await self.store.lease_holder_seen(self.holder, self.run_id, self.lease_s,
                                           self.progress() if self.progress is not None else None)
        for unit in lost:
            log.warning("lease.lost", unit=unit, holder=self.holder,
                        note="not renewed in time; its rows are left for whoever takes it next")
        return await self.look(), lost

    async def look(self) -> list[str]:
        """Which units the run's processes swept, and our share of the free ones taken (the
        units gained); nothing renewed."""
        done, self.alive, _in_run = await self.store.lease_state(self.holder, self.run_id, self.units)
        self.done |= done
        open_units = [u for u in self._order if u not in self.done]
        share = math.ceil(len(open_units) / max(self.alive, 1))
        want = share - sum(1 for u in self.held if u not in self.done)
        gained: list[str] = []
        candidates = [u for u in open_units if u not in self.held] if want > 0 else []
        if candidates:
            sent = self.clock()
            for unit in await self.store.lease_take(self.holder, self.run_id, self.lease_s, candidates, want):
                self.held[unit] = sent + self.lease_s
                gained.append(unit)
        if gained:
            log.info("lease.taken", units=gained, holder=self.holder, alive=self.alive)
        return gained

    async def finish(self, unit: str) -> None:
        """`unit` swept to its end (its outcomes written): done for this run. Its lease is kept
        (renewed) until `release`, when its last files are committed and stamped."""
        await self.store.lease_done(self.holder, self.run_id, unit)
        self.done.add(unit)

    async def release(self) -> None:
        """At the end (whatever it was): every lease and our presence given back."""
        self.held.clear()
        await self.store.lease_release(self.holder)


class OwnLeases(Leases):
    """No database to coordinate through (a read-only run): this process serves every unit, its
    leases never ending. Every method that would ask the store is replaced: it has none."""

    def __init__(self, units: Sequence[str]) -> None:
        super().__init__(cast(LeaseStore, None), "", units, math.inf, holder="local")

    async def join(self, expect: int, poll_s: float = 0.2) -> None:
        return None

    def next_tick_in(self) -> float:
        return math.inf  # nothing to renew

    async def tick(self) -> tuple[list[str], list[str]]:
        return await self.look(), []

    async def look(self) -> list[str]:
        gained = [u for u in self.units if u not in self.held and u not in self.done]
        for u in gained:
            self.held[u] = math.inf
        return gained

    async def finish(self, unit: str) -> None:
        self.held.pop(unit, None)
        self.done.add(unit)

    async def release(self) -> None:
        self.held.clear()
