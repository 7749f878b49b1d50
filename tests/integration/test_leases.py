"""Budget leases against a real PostgreSQL (crawler/leases.py, migration 006). Expiry is driven by
moving the lease rows' times in the database and a virtual local clock, never by sleeping."""

from __future__ import annotations

import asyncio

import asyncpg
import pytest

from crawler import engine
from crawler.leases import Leases, OwnLeases, unit_of
from tests.harness import recover_config

UNITS = ["europepmc", "pmc", "default#0", "default#1", "default#2"]


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


async def _db(dsn, tmp_path):
    cfg = recover_config(dsn, tmp_path / "repo", tmp_path)
    return await engine.open_database(cfg)


@pytest.fixture
async def open_db(dsn, tmp_path):
    """Opens a Database on the test's database; all closed at the end."""
    opened = []

    async def make():
        db = await _db(dsn, tmp_path)
        opened.append(db)
        return db
    yield make
    for db in opened:
        await db.close()


async def _expire(dsn: str, holder: str) -> None:
    """As if `holder` had been killed lease_s ago: its leases and its presence ran out."""
    conn = await asyncpg.connect(dsn)
    try:
        await conn.execute("update artifact_recovery.leases set expires_at = now() - interval '1 second' where holder = $1", holder)
        await conn.execute("update artifact_recovery.lease_holders set seen_at = now() - interval '1 hour' where holder = $1", holder)
    finally:
        await conn.close()


async def test_two_processes_share_the_units_and_never_hold_one_together(open_db):
    db_a, db_b = await open_db(), await open_db()
    a = Leases(db_a, "run-1", UNITS, 30, holder="a")
    b = Leases(db_b, "run-1", UNITS, 30, holder="b")
    await asyncio.gather(a.join(2, poll_s=0.01), b.join(2, poll_s=0.01))
    (got_a, lost_a), (got_b, lost_b) = await asyncio.gather(a.tick(), b.tick())
    assert not set(got_a) & set(got_b), "no unit held by both"
    assert lost_a == lost_b == []
    assert len(got_a) <= 3 and len(got_b) <= 3, "each takes its share (5 units over 2 processes)"
    # Later ticks take what is left, still never the other's.
    for _ in range(3):
        await a.tick()
        await b.tick()
    assert set(a.held) | set(b.held) == set(UNITS)
    assert not set(a.held) & set(b.held)


async def test_a_dead_holders_units_are_taken_over_and_it_learns_it_lost_them(dsn, open_db):
    db_a, db_b = await open_db(), await open_db()
    a = Leases(db_a, "run-1", UNITS, 30, holder="a")
    b = Leases(db_b, "run-1", UNITS, 30, holder="b")
    await a.join(1)
    await b.join(1)
    await a.tick()
    await b.tick()
    a_units = set(a.held)
    assert a_units and set(b.held)
    await _expire(dsn, "a")
    gained, _lost = await b.tick()
    assert set(gained) == a_units, "the survivor takes every unit the dead one held"
    assert set(b.held) == set(UNITS)
    # The "dead" one was only cut off: its next renewal tells it the units are gone.
    _gained, lost = await a.tick()
    assert set(lost) == a_units and not a.held


async def test_a_lease_not_renewed_in_time_stops_being_ours_locally(open_db):
    """The database away: past lease_s since the last renewal was sent, the unit is no longer
    ours to serve, whatever the database says later."""
    db = await open_db()
    clock = Clock()
    a = Leases(db, "run-1", ["europepmc"], 30, holder="a", clock=clock)
    await a.join(1)
    await a.tick()
    assert a.holds("europepmc")
    clock.now += 29.9
    assert a.holds("europepmc")
    clock.now += 0.2
    assert not a.holds("europepmc")
    assert a.expired() == ["europepmc"] and not a.held


async def test_a_swept_unit_is_not_taken_again_by_the_run_but_is_by_another_run(open_db):
    db_a, db_b, db_c = await open_db(), await open_db(), await open_db()
    a = Leases(db_a, "run-1", ["pmc"], 30, holder="a")
    b = Leases(db_b, "run-1", ["pmc"], 30, holder="b")
    c = Leases(db_c, "run-2", ["pmc"], 30, holder="c")
    await a.join(1)
    assert (await a.tick())[0] == ["pmc"]
    await a.finish("pmc")
    assert a.all_done() and a.holds("pmc"), "kept until its files are stamped (release)"
    await b.join(1)
    assert (await b.tick())[0] == [] and b.all_done(), "the run swept it: its other processes end"
    await c.join(1)
    assert (await c.tick())[0] == [], "held until a gives it back"
    await a.release()
    assert (await c.tick())[0] == ["pmc"], "another run sweeps it again (rows may be due again)"


async def test_released_leases_are_free_at_once(open_db):
    db_a, db_b = await open_db(), await open_db()
    a = Leases(db_a, "run-1", UNITS, 30, holder="a")
    b = Leases(db_b, "run-2", UNITS, 30, holder="b")
    await a.join(1)
    await a.tick()
    assert set(a.held) == set(UNITS)
    await b.join(1)
    assert (await b.tick())[0] == [], "all held by a live holder"
    await a.release()
    assert sorted((await b.tick())[0]) == sorted(UNITS), "free once given back (b alone now)"


def test_hosts_fall_into_a_fixed_number_of_groups():
    groups = {unit_of(f"default:h{k}.example.org", f"h{k}.example.org", 16) for k in range(5000)}
    assert groups == {f"default#{k}" for k in range(16)}
    assert unit_of("europepmc", "europepmc.org", 16) == "europepmc"
    # the same in every process and on every machine (crc32, not Python's salted hash())
    assert unit_of("default:x.org", "x.org", 16) == "default#12"


async def test_own_leases_serve_everything_without_a_database():
    own = OwnLeases(["a", "b"])
    gained, lost = await own.tick()
    assert sorted(gained) == ["a", "b"] and lost == [] and own.holds("a")
    await own.finish("a")
    await own.finish("b")
    assert own.all_done()


async def test_a_renewal_answered_after_the_lease_ran_out_counts_as_lost(open_db):
    """Workers stop on a unit the moment its lease runs out locally; a renewal that comes back
    later must not make it ours again behind their backs (the unit would never end)."""
    db = await open_db()
    clock = Clock()

    class Slow:
        """The store, with time passing while the renewal is on its way."""

        def __getattr__(self, name):
            return getattr(db, name)

        async def lease_renew(self, *args):
            kept = await db.lease_renew(*args)
            clock.now += 31
            return kept

    a = Leases(Slow(), "run-1", ["europepmc"], 30, holder="a", clock=clock)
    await a.join(1)
    assert (await a.tick())[0] == ["europepmc"]
    clock.now += 20  # within the lease; the renewal then takes 31 s to answer
    _gained, lost = await a.tick()
    assert "europepmc" in lost


async def test_a_scan_that_fails_ends_the_run_and_leaves_its_unit_unswept(dsn, sim, repo, tmp_path, monkeypatch):
    """A page read that fails for a reason other than the database being away must not pass
    for the end of the unit's rows: the run fails with the cause, and the unit stays due."""
    import pytest

    from crawler.db import Database
    from tests.harness import figure_config, insert_figures, run_figures, url

    await insert_figures(dsn, [(f"r{i}", {"image_url": url("europepmc.org", f"/{i}.png")}, None) for i in range(3)])
    cfg = figure_config(dsn, repo, sim.port, tmp_path)

    async def broken(self, *args, **kwargs):
        raise RuntimeError("the page query broke")

    monkeypatch.setattr(Database, "figure_page", broken)
    with pytest.raises(RuntimeError, match="the page query broke"):
        await run_figures(cfg)
    conn = await asyncpg.connect(dsn)
    try:
        assert await conn.fetchval("select count(*) from artifact_recovery.lease_done") == 0
        assert await conn.fetchval("select count(*) from artifact_recovery.leases") == 0, "given back at the end"
    finally:
        await conn.close()
    assert sim.log == []


async def test_two_overlapping_runs_each_count_the_others_sweep_and_end(open_db):
    """Two runs at once, each sweeping half the units: a unit the other run swept after this one
    started counts as swept for this one too. (Each keeps its swept units' leases until it ends,
    so waiting to sweep them itself would have each run wait for the other for ever.)"""
    db_a, db_b = await open_db(), await open_db()
    a = Leases(db_a, "run-1", ["u1", "u2"], 30, holder="a")
    b = Leases(db_b, "run-2", ["u1", "u2"], 30, holder="b")
    await a.join(1)
    await b.join(1)
    (got_a, _), (got_b, _) = await a.tick(), await b.tick()
    assert len(got_a) == len(got_b) == 1 and got_a != got_b
    await a.finish(got_a[0])
    await b.finish(got_b[0])
    await a.tick()
    await b.tick()
    assert a.all_done() and b.all_done()


class Counting:
    """The store, with the names of the statements asked of it."""

    def __init__(self, db) -> None:
        self.db = db
        self.asked: list[str] = []

    def __getattr__(self, name):
        method = getattr(self.db, name)

        async def counted(*args):
            self.asked.append(name)
            return await method(*args)
        return counted


async def test_a_look_between_ticks_renews_nothing_and_takes_what_is_free(open_db):
    db_a, db_b = await open_db(), await open_db()
    clock = Clock()
    store = Counting(db_a)
    a = Leases(store, "run-1", UNITS, 30, holder="a", clock=clock)
    b = Leases(db_b, "run-1", UNITS, 30, holder="b")
    await a.join(1)
    await b.join(1)
    assert a.tick_due(), "never renewed yet"
    await b.tick()
    await a.tick()
    assert not a.tick_due()
    assert set(a.held) | set(b.held) == set(UNITS) and not set(a.held) & set(b.held)
    store.asked.clear()
    assert await a.look() == [], "nothing free"
    assert set(store.asked) <= {"lease_state", "lease_take"}, "no renewal, no presence: at most two statements"
    b_units = set(b.held)
    await b.release()
    store.asked.clear()
    assert set(await a.look()) == b_units
    assert set(a.held) == set(UNITS), "b's units, given back, are taken at the next look"
    assert "lease_renew" not in store.asked and "lease_holder_seen" not in store.asked
    clock.now += 10
    assert a.tick_due(), "tick_s after the last renewal"


async def test_a_run_renews_per_tick_not_per_unit_that_ends(dsn, sim, repo, tmp_path, monkeypatch):
    """Each unit's end wakes the serve loop; that wake-up only looks. Renewing and saying the
    process is alive (with its progress, which only a `--workers` parent reads) wait for the
    tick, so a run of many units does not send a renewal per unit or per worker."""
    import time

    from crawler.db import Database
    from crawler.sandbox import images
    from crawler.sandbox.simulator import Behaviour
    from tests.harness import figure_config, insert_figures, run_figures, url

    png = images.png(5, 2000)
    hosts = ("cdn.example.com", "media.example.net", "www.ncbi.nlm.nih.gov", "europepmc.org")
    rows = []
    for i in range(24):
        host = hosts[i % len(hosts)]
        sim.set_route(host, f"/u/{i}.png", Behaviour(body=png))
        rows.append((f"u{i:02d}", {"image_url": url(host, f"/u/{i}.png"), "paper_id": f"P{i}"}, None))
    await insert_figures(dsn, rows)
    cfg = figure_config(dsn, repo, sim.port, tmp_path, run={"lease_s": 30.0, "lease_groups": 16})
    seen: list[dict | None] = []
    real = Database.lease_holder_seen

    async def counted(self, holder, run_id, lease_s, progress):
        seen.append(progress)
        return await real(self, holder, run_id, lease_s, progress)

    monkeypatch.setattr(Database, "lease_holder_seen", counted)
    started = time.monotonic()
    code, summary = await run_figures(cfg)
    elapsed = time.monotonic() - started
    assert code == 0 and summary["fetched"] == 24
    # join, then one per tick_s (10 s) of the run: not one per unit or worker that ended
    assert len(seen) <= 2 + int(elapsed // 10), (len(seen), elapsed)
    assert all(p is None for p in seen), "a run on its own keeps its progress out of the lease table"


async def test_the_next_tick_is_due_tick_s_after_the_last_began_even_if_it_failed(open_db):
    """Looks between ticks do not put the renewal off, and a tick that failed (the database
    away) is tried again a tick later, not at every wake-up."""
    db = await open_db()
    clock = Clock()

    class Failing:
        fail = False

        def __getattr__(self, name):
            return getattr(db, name)

        async def lease_renew(self, *args):
            if self.fail:
                raise ConnectionResetError("the database went away")
            return await db.lease_renew(*args)

    store = Failing()
    a = Leases(store, "run-1", ["pmc"], 30, holder="a", clock=clock)
    await a.join(1)
    assert a.tick_due() and a.next_tick_in() == 0
    await a.tick()
    assert not a.tick_due() and a.next_tick_in() == 10
    clock.now += 9.5
    await a.look()
    assert a.next_tick_in() == pytest.approx(0.5), "a look does not move the next renewal"
    clock.now += 0.5
    assert a.tick_due()
    store.fail = True
    with pytest.raises(ConnectionResetError):
        await a.tick()
    assert a.next_tick_in() == 10, "tried again a tick later"
    assert OwnLeases(["pmc"]).next_tick_in() == float("inf")


def test_the_serve_loop_sleeps_no_longer_than_to_the_next_tick():
    from types import SimpleNamespace

    from pipelines.figures import IDLE_LOOK_S, FigureJob

    clock = Clock()
    leases = Leases(None, "run-1", ["pmc"], 30, holder="a", clock=clock)
    leases.tick_began = clock.now - 9.9  # a tick began 9.9 s ago; a unit's end woke the loop since
    serving = SimpleNamespace(serving=lambda: True)
    job = SimpleNamespace(leases=leases, _units={"pmc": serving})
    assert FigureJob._serve_wait_s(job) == pytest.approx(0.1)
    leases.tick_began = clock.now
    assert FigureJob._serve_wait_s(job) == pytest.approx(10)
    job._units = {}
    assert FigureJob._serve_wait_s(job) == IDLE_LOOK_S, "nothing of our own: look at the others' often"
