"""Many processes on one table (issue 12): budget leases in PostgreSQL, --workers, takeover.

Every run here is the real command line (`python -m crawler figures`) in processes of its own,
against one PostgreSQL, one artifacts repository and the simulator in this process."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import sys
from collections import Counter
from pathlib import Path

import asyncpg
import pytest

from crawler.sandbox import images
from crawler.sandbox.simulator import Behaviour, max_starts_in_window
from tests.harness import figure_tree, git, insert_figures, rows_by_id, to_toml, url

ROOT = Path(__file__).resolve().parents[2]
PNG = images.png(7, 3000)
NAMED = ("europepmc.org", "www.ebi.ac.uk")                       # the europepmc budget
OTHERS = ("cdn.example.com", "media.example.net")                # a default budget each


def _env() -> dict[str, str]:
    env = dict(os.environ)
    env.pop("CRAWLER_DSN", None)
    env["PYTHONPATH"] = str(ROOT)
    return env


async def _start(config: Path, *args: str) -> asyncio.subprocess.Process:
    return await asyncio.create_subprocess_exec(
        sys.executable, "-m", "crawler", "figures", "--config", str(config), "-q", *args,
        cwd=ROOT, env=_env(), stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE)


def _routes(sim, hosts: tuple[str, ...], n: int, delay_s: float = 0.0) -> list[tuple[str, dict, None]]:
    """n rows spread over `hosts`: every third is gone (404), the rest exist."""
    rows = []
    for i in range(n):
        host = hosts[i % len(hosts)]
        path = f"/f/{i}.png"
        if i % 3 == 2:
            sim.set_route(host, path, Behaviour(status=404, content_type="text/html", body=b"nf", delay_s=delay_s))
        else:
            sim.set_route(host, path, Behaviour(body=PNG, delay_s=delay_s))
        rows.append((f"row-{i:04d}", {"image_url": url(host, path), "paper_id": f"P{i // 4}",
                                      "figure_label": f"F{i}"}, None))
    return rows


def _config(tmp_path: Path, dsn: str, repo: Path, port: int, extra_hosts: tuple[str, ...] = (), **sections) -> Path:
    tree = figure_tree(dsn, repo, port, tmp_path, **sections)
    tree["http"]["connect_to"].update({f"{h}:80": f"127.0.0.1:{port}" for h in extra_hosts})
    path = tmp_path / "c.toml"
    path.write_text(to_toml(tree))
    return path


def _assert_each_url_once(sim, rows) -> None:
    heads = Counter((r.host, r.path) for r in sim.log if r.method == "HEAD")
    gets = Counter((r.host, r.path) for r in sim.log if r.method == "GET")
    assert len(heads) == len(rows), "every row was asked about"
    assert max(heads.values()) == 1, f"a URL got two HEADs: {[k for k, v in heads.items() if v > 1][:5]}"
    assert max(gets.values(), default=0) <= 1, "a URL got two GETs"


async def _assert_all_done(dsn: str, repo: Path, n: int) -> None:
    rows = await rows_by_id(dsn)
    assert len(rows) == n
    gone = {f"row-{i:04d}" for i in range(n) if i % 3 == 2}
    for rid, r in rows.items():
        if rid in gone:
            assert r["metadata"].get("image_unavailable") is True and r["file_path"] is None, rid
        else:
            assert r["file_path"], f"{rid} has no file"
            assert (repo / r["file_path"]).read_bytes() == PNG
            assert r["metadata"]["file_commit"] and r["metadata"]["image_fetch_attempts"] == 1, rid
    tracked = set(git(repo, "ls-tree", "-r", "--name-only", "HEAD").split())
    assert {r["file_path"] for r in rows.values() if r["file_path"]} <= tracked, "every stamped file is on the branch"
    assert git(repo, "status", "--porcelain", "--untracked-files=no") == "", "the checkout's index agrees"


async def _three_budgets(dsn: str, sim, repo: Path, tmp_path: Path, delay_s: float, lease_s: float
                         ) -> tuple[list[tuple[str, dict, None]], Path]:
    """240 rows over the europepmc and pmc budgets and two default hosts, each budget 2 in flight
    and 20 starts a second: enough for two workers to both be serving for a while."""
    rows = _routes(sim, NAMED + OTHERS + ("www.ncbi.nlm.nih.gov", "pmc.ncbi.nlm.nih.gov"), 240, delay_s=delay_s)
    await insert_figures(dsn, rows)
    config = _config(tmp_path, dsn, repo, sim.port,
                     budgets={"europepmc": {"max_inflight": 2, "rate_per_s": 20.0},
                              "pmc": {"max_inflight": 2, "rate_per_s": 20.0},
                              "default": {"max_inflight": 2, "rate_per_s": 20.0}},
                     run={"lease_s": lease_s})
    return rows, config


async def test_two_runs_started_together_request_each_url_once(dsn, sim, repo, tmp_path):
    """A cron overlap: two `crawler figures` on one table at the same moment. Each budget is
    served by one of them at a time, so no URL gets a second HEAD or GET, and the europepmc
    budget's caps (2 in flight, 10 starts a second) hold across both at the server."""
    rows = _routes(sim, NAMED + OTHERS, 96, delay_s=0.02)
    await insert_figures(dsn, rows)
    config = _config(tmp_path, dsn, repo, sim.port,
                     budgets={"europepmc": {"max_inflight": 2, "rate_per_s": 10.0},
                              "default": {"max_inflight": 1, "rate_per_s": 50.0}},
                     run={"lease_s": 10.0})
    a, b = await asyncio.gather(_start(config), _start(config))
    outs = await asyncio.gather(a.communicate(), b.communicate())
    assert (a.returncode, b.returncode) == (0, 0), [o[1].decode()[-2000:] for o in outs]
    _assert_each_url_once(sim, rows)
    named = [r for r in sim.log if r.host in NAMED]
    assert sim.max_inflight(NAMED) <= 2
    assert max_starts_in_window([r.start for r in named]) <= 10
    await _assert_all_done(dsn, repo, len(rows))


async def test_workers_share_the_work_and_merge_their_counts(dsn, sim, repo, tmp_path):
    """`--workers 3` on many hosts no budget names: the hosts are served in run.lease_groups
    groups (producers, scans and leases bounded by that, not by the hosts), no URL is asked
    twice, the database sees a bounded number of connections, and the run's summary adds up
    what the three did."""
    hosts = tuple(f"h{k:03d}.example.org" for k in range(120))
    rows = _routes(sim, hosts, 600)
    await insert_figures(dsn, rows)
    config = _config(tmp_path, dsn, repo, sim.port, extra_hosts=hosts,
                     budgets={"default": {"max_inflight": 1, "rate_per_s": 100.0}},
                     run={"lease_s": 10.0, "lease_groups": 6})
    proc = await _start(config, "--workers", "3")
    admin = await asyncpg.connect(dsn)
    most = 0
    try:
        waiting = asyncio.ensure_future(proc.communicate())
        for _ in range(10_000):  # bounded; ends with the run
            most = max(most, await admin.fetchval(
                "select count(*) from pg_stat_activity where datname = current_database() and pid <> pg_backend_pid()"))
            done, _ = await asyncio.wait([waiting], timeout=0.05)
            if done:
                break
        out, err = await waiting
        units = await admin.fetch("select unit, count(*) from artifact_recovery.lease_done group by unit")
    finally:
        await admin.close()
    assert proc.returncode == 0, err.decode()[-3000:]
    _assert_each_url_once(sim, rows)
    await _assert_all_done(dsn, repo, len(rows))
    assert {u["unit"] for u in units} <= {f"default#{k}" for k in range(6)}, "at most lease_groups units"
    # Each process: a pool of at most 4, one heartbeat or lease connection, one git lock; the
    # parent too. Not the 120 hosts.
    assert most <= 4 * 7, most
    reports = tmp_path / "reports"
    (run_dir,) = [p for p in reports.iterdir() if p.is_dir()]
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["attempted"] == 600 and summary["fetched"] == 400 and summary["hard_404"] == 200
    assert [w["exit"] for w in summary["workers"]] == [0, 0, 0]
    assert sum(json.loads((run_dir / f"worker-{k}" / "summary.json").read_text())["attempted"] for k in range(3)) == 600


async def test_a_killed_worker_has_its_budgets_taken_over(dsn, sim, repo, tmp_path):
    """SIGKILL one of two workers mid-run: its leases run out after run.lease_s, the other takes
    its budgets over, and the run finishes with every row right, every file committed and
    stamped. Only what the killed worker had in flight can have been asked twice."""
    rows, config = await _three_budgets(dsn, sim, repo, tmp_path, delay_s=0.01, lease_s=2.0)
    proc = await _start(config, "--workers", "2")
    waiting = asyncio.ensure_future(proc.communicate())
    admin = await asyncpg.connect(dsn)
    victim = None
    try:
        for _ in range(2_000):  # bounded: until a worker holds a lease and has made requests
            if len(sim.log) >= 30:
                held = await admin.fetch("select h.pid from artifact_recovery.leases l join artifact_recovery.lease_holders h "
                                         "on h.holder = l.holder where l.expires_at > now() order by l.unit")
                if held:
                    victim = held[0]["pid"]
                    break
            await asyncio.wait([waiting], timeout=0.05)
        assert victim is not None, "the workers never started"
        os.kill(victim, signal.SIGKILL)
        killed_at = len(sim.log)
        out, err = await waiting
    finally:
        await admin.close()
    assert proc.returncode == 0, err.decode()[-3000:]
    await _assert_all_done(dsn, repo, len(rows))
    heads = Counter((r.host, r.path) for r in sim.log if r.method == "HEAD")
    twice = [k for k, v in heads.items() if v > 1]
    assert max(heads.values()) <= 2
    assert len(twice) <= 6 * 2, "more asked twice than the killed worker's budgets had in flight and queued for commit"
    assert killed_at < len(sim.log), "the run went on after the kill"
    (run_dir,) = [p for p in (tmp_path / "reports").iterdir() if p.is_dir()]
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["workers_lost"] == 1
    assert sorted(w["exit"] for w in summary["workers"]) == [-9, 0]


@pytest.mark.parametrize("value", ["0", "x", "-2"])
async def test_workers_must_be_a_count(tmp_path, value):
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "crawler", "figures", "--workers", value, cwd=ROOT, env=_env(),
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE)
    _out, err = await proc.communicate()
    assert proc.returncode == 2 and b"--workers" in err


async def test_a_stop_reaches_every_worker_and_a_rerun_finishes_the_rest(dsn, sim, repo, tmp_path):
    """SIGTERM to the parent of `--workers 2` while both serve: it passes the stop on, each
    worker finishes what it has in flight and commits it, the run exits 130 and leaves no
    process behind; the next run does the rest, and no URL is asked twice over the two."""
    rows, config = await _three_budgets(dsn, sim, repo, tmp_path, delay_s=0.02, lease_s=10.0)
    proc = await _start(config, "--workers", "2")
    waiting = asyncio.ensure_future(proc.communicate())
    admin = await asyncpg.connect(dsn)
    pids: set[int] = set()
    try:
        for _ in range(2_000):  # bounded: until both workers hold leases and requests are flowing
            if len(sim.log) >= 20:  # (the lease tables exist by then)
                pids = {r["pid"] for r in await admin.fetch(
                    "select h.pid from artifact_recovery.leases l join artifact_recovery.lease_holders h "
                    "on h.holder = l.holder where l.expires_at > now()")}
                if len(pids) == 2:
                    break
            done, _ = await asyncio.wait([waiting], timeout=0.05)
            assert not done, "the run ended before both workers served"
        assert len(pids) == 2, "the two workers never both held a lease"
        proc.send_signal(signal.SIGTERM)
        _out, err = await waiting
    finally:
        await admin.close()
    assert proc.returncode == 130, err.decode()[-3000:]
    for pid in pids:  # none left running on its own
        with pytest.raises(ProcessLookupError):
            os.kill(pid, 0)
    # The stop reached each worker: each drained and wrote its own summary, saying so (a worker
    # the parent had to kill on its way out writes none).
    [run_folder] = [p for p in (tmp_path / "reports").iterdir() if p.is_dir()]
    for k in range(2):
        summary = json.loads((run_folder / f"worker-{k}" / "summary.json").read_text())
        assert summary["interrupted"] is True, (k, summary.get("status"))
    assert len({(r.host, r.path) for r in sim.log if r.method == "HEAD"}) < len(rows), "stopped before the end"
    rerun = await _start(config)
    _out, err = await rerun.communicate()
    assert rerun.returncode == 0, err.decode()[-3000:]
    _assert_each_url_once(sim, rows)
    await _assert_all_done(dsn, repo, len(rows))
