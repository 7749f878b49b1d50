"""Politeness budgets: one per provider, a hard ceiling on request starts and on open requests.

A `Budget` admits a request in two steps:
1. `request()`: one of `max_inflight` slots (held until the response ends), after any pause in
   force (Retry-After, 429 back-off, a tripped breaker). A pause longer than `max_wait_s` is not
   waited out: `BudgetPaused` is raised and the row is left for a later run.
2. `start()`, called by `BudgetedConnector` once the connection is ready, just before the request
   is written: the start slot. Starts are spaced `1/rate + rate_guard_s` apart (1/floor(rate)
   for a fractional rate above 1), so no one-second window at the server ever holds more than
   `rate_per_s` starts, whatever TCP or TLS set-up cost, and there is no burst at start.
   (aiolimiter with capacity 1 and period = the spacing is exactly this; its default capacity of
   `max_rate` would let a burst through.) The pause is checked again after the slot is granted,
   because a 429 may have arrived while we waited; a slot granted before a pause is thrown away,
   so requests waiting out a pause do not all start together when it ends.

`Budgets` maps a host name to its budget: the first budget whose pattern (exact name or `*.suffix`)
matches wins; an unmatched host gets a budget of its own with the `default` numbers. All times
come from the running loop's clock.
"""

from __future__ import annotations

import asyncio
import contextvars
import math
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import aiohttp
from aiolimiter import AsyncLimiter

from .config import BudgetSpec


class BudgetPaused(Exception):
    """The budget is paused for longer than a run should wait; the row is left for later."""

    def __init__(self, budget: str, seconds: float) -> None:
        super().__init__(f"budget {budget} paused for {seconds:.0f} s more")
        self.seconds = seconds


# The budget whose start slot the next connection of this task must take (see BudgetedConnector).
_STARTING: contextvars.ContextVar[Budget | None] = contextvars.ContextVar("crawler_budget", default=None)


def spacing_s(rate_per_s: float, guard_s: float) -> float:
    """Seconds between starts so that no one-second window holds more than rate_per_s starts."""
    whole = rate_per_s if rate_per_s <= 1 or rate_per_s == int(rate_per_s) else math.floor(rate_per_s)
    return 1.0 / whole + guard_s


class Timeline:
    """Request starts per second of the run, per budget, for the report's politeness charts: the
    hosts no budget names (each a `default:<host>` budget of its own) are one line, the busiest
    of them each second, so thousands of hosts cost one line. Pauses too, the first
    MAX_PAUSES of them. Seconds count from `origin` (loop time)."""

    MAX_PAUSES = 2000

    def __init__(self) -> None:
        self.origin: float | None = None
        self.origin_unix: float | None = None  # the same moment on the wall clock: workers' charts merge by it
        self.starts: dict[str, dict[int, int]] = {}
        self.caps: dict[str, tuple[float, int]] = {}
        self.pauses: list[tuple[str, float, float, str]] = []
        self._current: dict[str, tuple[int, int]] = {}  # per budget: the second of its last start, starts in it

    @staticmethod
    def group(name: str) -> str:
        return "default" if name.startswith("default:") else name

    def _second(self, now: float) -> int:
        if self.origin is None:
            self.origin = now
            self.origin_unix = time.time()
        return int(now - self.origin)

    def started(self, budget: Budget, now: float) -> None:
        sec = self._second(now)
        last, count = self._current.get(budget.name, (-1, 0))
        count = count + 1 if last == sec else 1
        self._current[budget.name] = (sec, count)
        group = self.group(budget.name)
        seconds = self.starts.setdefault(group, {})
        if count > seconds.get(sec, 0):
            seconds[sec] = count
        self.caps.setdefault(group, (budget.rate_per_s, budget.max_inflight))

    def paused(self, budget: Budget, now: float, seconds: float, reason: str) -> None:
        if len(self.pauses) < self.MAX_PAUSES:
            self.pauses.append((budget.name, round(now - (self.origin if self.origin is not None else now), 3),
                                round(seconds, 3), reason))

    def as_dict(self) -> dict[str, Any]:
        return {"budgets": {g: {"cap_per_s": self.caps.get(g, (0, 0))[0], "max_inflight": self.caps.get(g, (0, 0))[1],
                                "starts": sorted(s.items())} for g, s in sorted(self.starts.items())},
                "pauses": [{"budget": b, "at_s": at, "seconds": s, "reason": r} for b, at, s, r in self.pauses],
                **({"origin_unix": round(self.origin_unix, 3)} if self.origin_unix is not None else {})}


@dataclass
class BudgetStats:
    started: int = 0
    inflight: int = 0
    paused_s: float = 0.0
    pauses: int = 0


class Budget:
    def __init__(self, name: str, max_inflight: int, rate_per_s: float, guard_s: float,
                 on_pause: Callable[[Budget, float, str], None] | None = None,
                 on_resume: Callable[[Budget], None] | None = None, max_wait_s: float = math.inf) -> None:
        self.name = name
        self.max_inflight = max_inflight
        self.rate_per_s = rate_per_s
        self.max_wait_s = max_wait_s
        self.spacing_s = spacing_s(rate_per_s, guard_s)
        self._limiter = AsyncLimiter(1, self.spacing_s)
        self._slots = asyncio.Semaphore(max_inflight)
        self._paused_until = 0.0
        self._pause_reason = ""
        self._on_pause = on_pause
        self._on_resume = on_resume
        self._pause_reported = False
        self.stats = BudgetStats()
        self.consecutive_refusals = 0  # 403/429 in a row, for the breaker
        self.timeline: Timeline | None = None
        self._loop: asyncio.AbstractEventLoop | None = None

    def _now(self) -> float:
        # The loop, found once (as aiolimiter does): asking for the running loop costs a getpid()
        # system call on Python 3.11, and a row reads this clock several times.
        loop = self._loop
        if loop is None or loop.is_closed():
            loop = self._loop = asyncio.get_running_loop()
        return loop.time()

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
        if self.timeline is not None:
            self.timeline.paused(self, now, when - now, reason)
        if self._on_pause is not None:
            self._on_pause(self, when - now, reason)

    async def _wait_pause(self) -> None:
        while (left := self._paused_until - self._now()) > 0:
            if left > self.max_wait_s:
                raise BudgetPaused(self.name, left)
            await asyncio.sleep(left)

    def request(self) -> _InFlight:
        """`async with budget.request():` holds one in-flight slot for a request; its start slot
        is taken by the connector."""
        return _InFlight(self)

    async def start(self) -> None:
        """Wait for this request's start slot (and any pause); called as the request goes out."""
        while True:
            if self._paused_until > self._now():
                await self._wait_pause()
            await self._limiter.acquire()
            if self._paused_until <= self._now():
                break
        self.stats.started += 1
        if self.timeline is not None:
            self.timeline.started(self, self._now())
        if self._pause_reported:  # the first start after a pause says the budget is moving again
            self._pause_reported = False
            if self._on_resume is not None:
                self._on_resume(self)


class _InFlight:
    """One request's in-flight slot, after any pause in force; while held, the budget is the one
    whose start slot this task's next connection takes. A class rather than a generator-based
    context manager: two of these a row, and the generator's machinery cost more than the slot."""

    __slots__ = ("_budget", "_token")

    def __init__(self, budget: Budget) -> None:
        self._budget = budget
        self._token: contextvars.Token[Budget | None] | None = None

    async def __aenter__(self) -> None:
        budget = self._budget
        if budget._paused_until > budget._now():
            await budget._wait_pause()
        await budget._slots.acquire()
        budget.stats.inflight += 1
        self._token = _STARTING.set(budget)

    async def __aexit__(self, *exc: object) -> None:
        budget = self._budget
        try:
            if self._token is not None:
                _STARTING.reset(self._token)
        finally:
            budget.stats.inflight -= 1
            budget._slots.release()


class BudgetedConnector(aiohttp.TCPConnector):
    """Takes the request's start slot once its connection is ready, so set-up time cannot move two
    starts closer together than the budget allows (aiohttp writes the request right after)."""

    async def connect(self, req: Any, traces: Any, timeout: Any) -> Any:
        conn = await super().connect(req, traces, timeout)
        budget = _STARTING.get()
        if budget is not None:
            try:
                await budget.start()
            except BaseException:
                conn.close()
                raise
        return conn


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
    max_wait_s: float = math.inf
    _named: dict[str, Budget] = field(default_factory=dict)
    _of_host: dict[str, Budget] = field(default_factory=dict)  # for_host's answers: asked for every request
    timeline: Timeline = field(default_factory=Timeline)

    def name_for(self, host: str) -> str:
        """The budget name a host falls under: a configured name, or `default:<host>`."""
        host = host.lower().rstrip(".")
        for spec in self.specs:
            if spec.name != "default" and any(host_matches(p, host) for p in spec.hosts):
                return spec.name
        return f"default:{host}"

    def for_host(self, host: str) -> Budget:
        known = self._of_host.get(host)
        if known is not None:  # (matching a host against every budget's patterns costs more)
            return known
        name = self.name_for(host)
        budget = self._named.get(name)
        if budget is None:
            spec_name = "default" if name.startswith("default:") else name
            spec = next(s for s in self.specs if s.name == spec_name)
            budget = Budget(name, spec.max_inflight, spec.rate_per_s, self.guard_s, self.on_pause, self.on_resume,
                            self.max_wait_s)
            budget.timeline = self.timeline
            self._named[name] = budget
        self._of_host[host] = budget
        return budget

    def all(self) -> list[Budget]:
        return list(self._named.values())
