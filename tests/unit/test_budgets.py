"""The budget logic on a virtual clock: spacing, the in-flight cap, pauses (Retry-After, 429
back-off, 503 with both Retry-After forms) across a provider's host names, and the breaker at
the shipped threshold. Exact, instant, and deterministic."""

from __future__ import annotations

import asyncio
import random
from types import SimpleNamespace

import pytest

from crawler import config
from crawler.budgets import Budget, BudgetPaused, Budgets, spacing_s
from crawler.config import BudgetSpec
from crawler.fetcher import Fetcher, _Done
from crawler.sandbox.simulator import max_starts_in_window
from tests.virtualclock import run_virtual

HTTP = config.load_defaults()["http"]
SPECS = [BudgetSpec("default", (), 1, 1.0), BudgetSpec("europepmc", ("europepmc.org", "www.ebi.ac.uk"), 4, 2.0),
         BudgetSpec("pmc", ("*.ncbi.nlm.nih.gov",), 2, 2.0)]


async def _load(budget: Budget, n: int, hold_s: float) -> tuple[list[float], int]:
    """n requests through the budget, each open for hold_s: their start times, and the most open at once."""
    loop = asyncio.get_running_loop()
    starts: list[float] = []
    open_now = most = 0

    async def one() -> None:
        nonlocal open_now, most
        async with budget.request():
            await budget.start()  # what the connector does as the request goes out
            starts.append(loop.time())
            open_now += 1
            most = max(most, open_now)
            await asyncio.sleep(hold_s)
            open_now -= 1

    await asyncio.gather(*(one() for _ in range(n)))
    return starts, most


@pytest.mark.parametrize("rate, inflight, window_max", [(2.0, 4, 2), (1.0, 1, 1), (1.5, 2, 1), (0.5, 1, 1)])
def test_starts_are_spaced_and_in_flight_capped_exactly(rate, inflight, window_max):
    starts, most = run_virtual(_load(Budget("b", inflight, rate, 0.0), 20, hold_s=3.0))
    assert len(starts) == 20 and most <= inflight
    assert max_starts_in_window(starts, 1.0) <= window_max
    gaps = [b - a for a, b in zip(starts, starts[1:])]
    assert min(gaps) >= spacing_s(rate, 0.0) - 1e-9
    assert starts[0] == 0.0  # no waiting for the first, and no burst after it


def test_a_pause_holds_every_start_until_it_ends_and_they_resume_spaced():
    async def scene():
        loop = asyncio.get_running_loop()
        budget = Budget("b", 4, 2.0, 0.0)
        starts: list[float] = []

        async def one(i):
            async with budget.request():
                await budget.start()
                starts.append(loop.time())
                if i == 1:
                    budget.pause_until(loop.time() + 30.0, "http_429")  # a Retry-After of 30 s
                await asyncio.sleep(0.1)

        await asyncio.gather(*(one(i) for i in range(8)))
        return starts

    starts = run_virtual(scene())
    assert starts[:2] == [0.0, 0.5]
    later = starts[2:]
    assert min(later) >= 0.5 + 30.0
    assert max_starts_in_window(later, 1.0) <= 2  # waiting requests do not all start together


def test_a_pause_longer_than_a_run_waits_leaves_the_row():
    async def scene():
        budget = Budget("b", 1, 1.0, 0.0, max_wait_s=600)
        budget.pause_until(asyncio.get_running_loop().time() + 3600, "http_429")
        with pytest.raises(BudgetPaused):
            async with budget.request():
                pass
    run_virtual(scene())


def _response(status: int, retry_after: str | None = None, date: str | None = None):
    headers = {k: v for k, v in (("Retry-After", retry_after), ("Date", date)) if v is not None}
    return SimpleNamespace(status=status, headers=headers)


@pytest.mark.parametrize("status, retry_after, pause_s", [
    (429, None, None),          # no Retry-After: back-off with full jitter, still the whole budget
    (503, "7", 7.0),            # seconds
    (503, "date", 9.0),         # an HTTP date, counted from the response's Date
    (429, "12", 12.0),
])
def test_429_and_503_pause_the_whole_budget_across_its_host_names(status, retry_after, pause_s):
    async def scene():
        budgets = Budgets(SPECS, 0.0)
        fetcher = Fetcher(None, budgets, None, {**HTTP, "max_retries": 3}, rng=random.Random(1))  # type: ignore[arg-type]
        sent = "Wed, 02 Dec 2026 10:00:00 GMT"
        value = "Wed, 02 Dec 2026 10:00:09 GMT" if retry_after == "date" else retry_after
        own = fetcher._retry_wait(budgets.for_host("europepmc.org"), _response(status, value, sent), 0, None)
        other_name = budgets.for_host("www.ebi.ac.uk")  # the same provider under its other name
        assert other_name is budgets.for_host("europepmc.org")
        paused = other_name.paused_for_s
        assert budgets.for_host("pmc.ncbi.nlm.nih.gov").paused_for_s == 0  # another provider is not
        return own, paused

    own, paused = run_virtual(scene())
    assert own == 0.0  # nobody waits on their own: the budget waits
    if pause_s is None:
        assert 0 <= paused <= HTTP["backoff_base_s"]  # attempt 0: jitter in [0, base]
    else:
        assert paused == pytest.approx(pause_s)


def test_the_breaker_trips_at_the_shipped_threshold_and_a_success_resets_it():
    assert HTTP["breaker_threshold"] == 10

    async def scene():
        budgets = Budgets(SPECS, 0.0)
        fetcher = Fetcher(None, budgets, None, HTTP)  # type: ignore[arg-type]
        budget = budgets.for_host("cdn.example.com")
        for _ in range(9):
            fetcher._breaker(budget, 403)
        before = budget.paused_for_s
        fetcher._breaker(budget, 200)  # a success in between: counting starts over
        for _ in range(9):
            fetcher._breaker(budget, 429)
        still = budget.paused_for_s
        fetcher._breaker(budget, 403)  # the tenth refusal in a row
        return before, still, budget.paused_for_s

    before, still, tripped = run_virtual(scene())
    assert before == 0 and still == 0
    assert tripped == pytest.approx(HTTP["breaker_pause_s"])


def test_a_retry_after_beyond_max_wait_is_returned_not_slept():
    async def scene():
        budgets = Budgets(SPECS, 0.0)
        fetcher = Fetcher(None, budgets, None, HTTP)  # type: ignore[arg-type]
        with pytest.raises(_Done) as done:
            fetcher._retry_wait(budgets.for_host("europepmc.org"), _response(429, "7200"), 0, "u")
        return done.value.result

    result = run_virtual(scene())
    assert (result.outcome, result.error, result.retry_in_s) == ("transient", "http_429", 7200.0)


def test_an_empty_flush_does_not_end_an_outage_nor_restart_its_clock():
    """The producer found the database away; the sink has nothing to write. Its empty flushes
    must not say the database is back (which restarted the outage clock twice a second, so a
    run never gave up): only a real round trip does."""
    from crawler.sink import Sink

    class Away:
        async def apply_changes(self, run_id, changes):
            raise ConnectionRefusedError("the database is away")

    async def scene():
        gave_up: list[str] = []
        sink = Sink(Away(), "run", 10, 0.05, outage_max_s=5.0, on_outage_over=gave_up.append)  # type: ignore[arg-type]
        sink.start()
        sink.went_down(ConnectionRefusedError("page query refused"))
        await asyncio.sleep(3)
        still_down = sink.down_since is not None and not sink.healthy.is_set()
        await asyncio.sleep(3)
        sink.went_down(ConnectionRefusedError("page query refused"))  # the producer asks again
        sink._closing = True
        sink.wake()
        await sink._task
        return still_down, gave_up

    still_down, gave_up = run_virtual(scene())
    assert still_down and len(gave_up) == 1 and "unreachable for over 5 s" in gave_up[0]


def test_the_timeline_counts_starts_per_second_per_budget_and_the_busiest_unnamed_host():
    """The report's politeness chart: starts per second of the run for each budget (never above
    its cap), the hosts no budget names as one line (the busiest each second), and pauses."""
    async def scene():
        loop = asyncio.get_running_loop()
        budgets = Budgets(SPECS, 0.0)
        epmc, a, b = budgets.for_host("europepmc.org"), budgets.for_host("a.example"), budgets.for_host("b.example")
        await asyncio.gather(_load(epmc, 8, 0.1), _load(a, 3, 0.1), _load(b, 2, 0.1))
        epmc.pause_until(loop.time() + 5.0, "http_429")
        return budgets.timeline.as_dict()

    t = run_virtual(scene())
    epmc = t["budgets"]["europepmc"]
    assert epmc["cap_per_s"] == 2.0 and epmc["starts"] == [(0, 2), (1, 2), (2, 2), (3, 2)]
    assert t["budgets"]["default"]["starts"] == [(0, 1), (1, 1), (2, 1)]  # a.example's 3 and b.example's 2, 1/s each
    assert t["pauses"] == [{"budget": "europepmc", "at_s": 3.6, "seconds": 5.0, "reason": "http_429"}]
