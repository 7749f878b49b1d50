"""Politeness budgets: one per provider, a hard ceiling on request starts and on open requests.

A `Budget` admits a request when three things hold, checked in this order every time:
1. fewer than `max_inflight` requests under it are open (a semaphore, held until the response ends);
2. no pause is in force (Retry-After, 429 back-off, a tripped breaker);
3. its start slot has come: starts are spaced `1/rate_per_s + rate_guard_s` apart, so no burst at
   start and no one-second window ever holds more than `rate_per_s` starts, even after the jitter
   between our clock and the server's. (aiolimiter with capacity 1 and period 1/rate is exactly
   this spacing; its default capacity of `max_rate` would let a burst through at once.)
The pause is checked again after the slot is granted, because a 429 may have arrived while we
waited; a slot granted before a pause is thrown away, never spent after it, so requests waiting
out a pause do not all start together when it ends.

`Budgets` maps a host name to its budget: the first budget whose pattern (exact name or `*.suffix`)
matches wins; an unmatched host gets a budget of its own with the `default` numbers. All times
come from the running loop's clock.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field

from aiolimiter import AsyncLimiter

from .config import BudgetSpec


@dataclass
class BudgetStats:
    started: int = 0
    inflight: int = 0
    paused_s: float = 0.0
    pauses: int = 0


class Budget:
    def __init__(self, name: str, max_inflight: int, rate_per_s: float, guard_s: float,
                 on_pause: Callable[[Budget, float, str], None] | None = None,
                 on_resume: Callable[[Budget], None] | None = None) -> None:
        self.name = name
        self.max_inflight = max_inflight
        self.rate_per_s = rate_per_s
        self.spacing_s = 1.0 / rate_per_s + guard_s
        self._limiter = AsyncLimiter(1, self.spacing_s)
        self._slots = asyncio.Semaphore(max_inflight)
        self._paused_until = 0.0
        self._pause_reason = ""
        self._on_pause = on_pause
        self._on_resume = on_resume
        self._pause_reported = False
        self.stats = BudgetStats()
        self.consecutive_refusals = 0  # 403/429 in a row, for the breaker

    @staticmethod
    def _now() -> float:
        return asyncio.get_running_loop().time()

    @property
    def paused_for_s(self) -> float:
        return max(0.0, self._paused_until - self._now())

    def pause_until(self, when: float, reason: str) -> None:
        """No request under this budget starts before loop time `when` (extends, never shortens)."""
        if when <= self._paused_until:
            return
        now = self._now()
        was_paused = self._paused_until > now
        self.stats.paused_s += when - max(now, self._paused_until)
        self._paused_until = when
        self._pause_reason = reason
        if not was_paused:
            self.stats.pauses += 1
        self._pause_reported = True
        if self._on_pause is not None:
            self._on_pause(self, when - now, reason)

    async def _wait_pause(self) -> None:
        while (left := self._paused_until - self._now()) > 0:
            await asyncio.sleep(left)

    @contextlib.asynccontextmanager
    async def request(self) -> AsyncIterator[None]:
        """Hold one in-flight slot and one start slot for the duration of a request."""
        async with self._slots:
            while True:
                await self._wait_pause()
                await self._limiter.acquire()
                if self._paused_until <= self._now():
                    break
            if self._pause_reported:  # the first start after a pause says the budget is moving again
                self._pause_reported = False
                if self._on_resume is not None:
                    self._on_resume(self)
            self.stats.started += 1
            self.stats.inflight += 1
            try:
                yield
            finally:
                self.stats.inflight -= 1


def host_matches(pattern: str, host: str) -> bool:
    if pattern.startswith("*."):
        return host.endswith(pattern[1:])
    return host == pattern


@dataclass
class Budgets:
    specs: list[BudgetSpec]
    guard_s: float
    on_pause: Callable[[Budget, float, str], None] | None = None
    on_resume: Callable[[Budget], None] | None = None
    _named: dict[str, Budget] = field(default_factory=dict)

    def name_for(self, host: str) -> str:
        """The budget name a host falls under: a configured name, or `default:<host>`."""
        host = host.lower().rstrip(".")
        for spec in self.specs:
            if spec.name != "default" and any(host_matches(p, host) for p in spec.hosts):
                return spec.name
        return f"default:{host}"

    def for_host(self, host: str) -> Budget:
        name = self.name_for(host)
        budget = self._named.get(name)
        if budget is None:
            spec_name = "default" if name.startswith("default:") else name
            spec = next(s for s in self.specs if s.name == spec_name)
            budget = Budget(name, spec.max_inflight, spec.rate_per_s, self.guard_s, self.on_pause, self.on_resume)
            self._named[name] = budget
        return budget

    def all(self) -> list[Budget]:
        return list(self._named.values())
