"""The CLI in a subprocess, as an operator runs it: exit statuses, signals, crash and resume."""

from __future__ import annotations

import asyncio
import hashlib
import json
import os
import signal
import sys
from collections import Counter
from pathlib import Path

import asyncpg
import pytest

from crawler.sandbox import images
from crawler.sandbox.simulator import Behaviour, UpstreamSimulator
from tests.harness import figure_tree, git, insert_figures, rows_by_id, to_toml

ROOT = Path(__file__).resolve().parents[2]
ROWS = 48


def cli_env() -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k != "CRAWLER_DSN"}
    env["PYTHONPATH"] = str(ROOT)
    return env


async def start_cli(*args: str, env: dict[str, str] | None = None) -> asyncio.subprocess.Process:
    return await asyncio.create_subprocess_exec(
        sys.executable, "-m", "crawler", *args, cwd=ROOT, env=env or cli_env(),
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE)


async def run_cli(*args: str, timeout: float = 60, env: dict[str, str] | None = None) -> tuple[int, str, str]:
    proc = await start_cli(*args, env=env)
    out, err = await asyncio.wait_for(proc.communicate(), timeout)
    return proc.returncode, out.decode(), err.decode()


def test_help_lists_every_command():
    import subprocess
    out = subprocess.run([sys.executable, "-m", "crawler", "--help"], cwd=ROOT, env=cli_env(),
                         capture_output=True, text=True, check=True).stdout
    for command in ("figures", "recover", "run", "report", "demo"):
        assert command in out


async def test_no_database_says_so_in_one_line_and_points_at_the_demo():
    code, out, err = await run_cli("figures")
    assert code == 2 and err.count("\n") == 1 and "python -m crawler demo" in err


async def test_bad_config_exits_2_with_one_line_naming_the_key(tmp_path):
    bad = tmp_path / "bad.toml"
    bad.write_text('[budgets.europepmc]\nrate_per_s = "fast"\n')
    code, out, err = await run_cli("figures", "--config", str(bad))
    assert code == 2 and err.count("\n") == 1
    assert "budgets.europepmc.rate_per_s" in err and str(bad) in err


async def test_root_that_is_not_a_repo_is_a_config_error(dsn, tmp_path):
    cfg = tmp_path / "c.toml"
    cfg.write_text(to_toml(figure_tree(dsn, tmp_path / "nowhere", 1, tmp_path)))
    code, _, err = await run_cli("figures", "--config", str(cfg))
    assert code == 2 and "not a git work tree" in err and err.count("\n") == 1


async def scene(dsn: str, sim: UpstreamSimulator) -> dict[str, bytes]:
    """ROWS rows on one provider: every third a 404, the rest slow-ish images."""
    bodies = {}
    rows = []
    for i in range(ROWS):
        path = f"/k{i:02}.png"
        if i % 3 == 0:
            sim.set_route("europepmc.org", path, Behaviour(status=404, content_type="text/html", delay_s=0.05))
        else:
            bodies[f"k-{i:02}"] = images.png(500 + i, 6000)
            sim.set_route("europepmc.org", path, Behaviour(body=bodies[f"k-{i:02}"], chunk_delay_s=0.02, delay_s=0.05))
        rows.append((f"k-{i:02}", {"image_url": f"http://europepmc.org{path}", "paper_id": "P"}, None))
    await insert_figures(dsn, rows)
    return bodies


def config_file(dsn: str, repo: Path, sim: UpstreamSimulator, tmp_path: Path) -> Path:
    tree = figure_tree(dsn, repo, sim.port, tmp_path, budgets={"europepmc": {"max_inflight": 4, "rate_per_s": 20.0}},
                       artifacts={"commit_batch": 5, "commit_interval_s": 0.3})
    tree["report"]["console"] = True
    path = tmp_path / "crawler.toml"
    path.write_text(to_toml(tree))
    return path


async def wait_for_outcomes(reports: Path, n: int, proc: asyncio.subprocess.Process) -> None:
    """Until the running job's log shows n row outcomes (bounded: the job itself ends)."""
    for _ in range(2000):
        logs = list(reports.glob("*/log.jsonl"))
        if logs and logs[0].read_text().count('"event":"row.outcome"') >= n:
            return
        if proc.returncode is not None:
            raise AssertionError("the job ended before the kill point")
        await asyncio.sleep(0.01)
    raise AssertionError("the job never reached the kill point")


async def wait_for_event(reports: Path, event: str, proc: asyncio.subprocess.Process) -> None:
    for _ in range(2000):
        logs = list(reports.glob("*/log.jsonl"))
        if logs and f'"event":"{event}"' in logs[0].read_text():
            return
        if proc.returncode is not None:
            raise AssertionError(f"the job ended before {event}")
        await asyncio.sleep(0.01)
    raise AssertionError(f"the job never logged {event}")


async def assert_consistent(dsn: str, repo: Path, bodies: dict[str, bytes]) -> None:
    """Every row in exactly one state; database, files and git agree."""
    rows = await rows_by_id(dsn)
    tracked = set(git(repo, "ls-tree", "-r", "--name-only", "HEAD").split())
    for rid, row in rows.items():
        m = row["metadata"]
        if rid in bodies:
            assert m.get("image_fetch_outcome") == "fetched" and not m.get("image_unavailable"), rid
            path = row["file_path"]
            assert (repo / path).read_bytes() == bodies[rid]
            assert m["file_sha256"] == hashlib.sha256(bodies[rid]).hexdigest()
            assert path in git(repo, "ls-tree", "-r", "--name-only", m["file_commit"]).split()
            assert path in tracked
        else:
            assert m.get("image_unavailable") is True and row["file_path"] is None, rid
    on_disk = {str(p.relative_to(repo)) for p in (repo / "figures").rglob("*") if p.is_file()}
    assert on_disk == {rows[r]["file_path"] for r in bodies}, "no stray or temporary files"
    assert git(repo, "status", "--porcelain") == ""


@pytest.mark.parametrize("stop", [signal.SIGTERM, signal.SIGINT])
async def test_a_stop_signal_drains_exits_130_and_the_next_run_resumes(dsn, repo, tmp_path, stop):
    async with UpstreamSimulator() as sim:
        bodies = await scene(dsn, sim)
        cfg = config_file(dsn, repo, sim, tmp_path)
        proc = await start_cli("figures", "--config", str(cfg))
        await wait_for_outcomes(tmp_path / "reports", 10, proc)
        proc.send_signal(stop)
        _, err = await asyncio.wait_for(proc.communicate(), 60)
        assert proc.returncode == 130, err.decode()[-2000:]
        [first] = [json.loads(p.read_text()) for p in (tmp_path / "reports").glob("*/summary.json")]
        assert first["status"] == "interrupted" and 0 < first["attempted"] < ROWS
        code, _, err = await run_cli("figures", "--config", str(cfg))
        assert code == 0, err[-2000:]
        # rows in flight at the signal finished during the drain: no row was asked for twice
        gets = Counter(r.path for r in sim.log if r.method == "HEAD")
        assert len(gets) == ROWS and max(gets.values()) == 1
        await assert_consistent(dsn, repo, bodies)
        code, out, _ = await run_cli("report", "--config", str(cfg), "--json")
        last = json.loads(out)
        assert code == 0 and last["status"] == "finished"
        assert first["attempted"] + last["attempted"] == ROWS


@pytest.mark.parametrize("kill_after", [2, 13, 29])
async def test_sigkill_at_any_moment_then_a_run_repairs_everything(dsn, repo, tmp_path, kill_after):
    async with UpstreamSimulator() as sim:
        bodies = await scene(dsn, sim)
        cfg = config_file(dsn, repo, sim, tmp_path)
        proc = await start_cli("figures", "--config", str(cfg))
        await wait_for_outcomes(tmp_path / "reports", kill_after, proc)
        proc.kill()
        await proc.wait()
        conn = await asyncpg.connect(dsn)
        durable = {r["artifact_id"] for r in await conn.fetch("select artifact_id from artifact_recovery.journal")}
        await conn.close()
        code, _, err = await run_cli("figures", "--config", str(cfg))
        assert code == 0, err[-2000:]
        await assert_consistent(dsn, repo, bodies)
        total = Counter(r.path for r in sim.log if r.method == "HEAD")
        asked_twice = {p for p, n in total.items() if n > 1}
        assert all(n <= 2 for n in total.values())
        ids_twice = {f"k-{p[2:4]}" for p in asked_twice}
        # only rows whose outcome was not yet durable at the kill are asked again, and they are
        # at most the rows in flight plus the few outcomes waiting for their database write
        assert not ids_twice & durable
        assert len(ids_twice) <= 4 + 4


async def test_a_second_signal_aborts_at_once_and_is_still_safe(dsn, repo, tmp_path):
    async with UpstreamSimulator() as sim:
        bodies = await scene(dsn, sim)
        for i in range(ROWS):  # slow answers, so requests are in flight at the signals
            if f"k-{i:02}" in bodies:
                sim.set_route("europepmc.org", f"/k{i:02}.png", Behaviour(body=bodies[f"k-{i:02}"], delay_s=0.4))
        cfg = config_file(dsn, repo, sim, tmp_path)
        proc = await start_cli("figures", "--config", str(cfg))
        await wait_for_outcomes(tmp_path / "reports", 6, proc)
        proc.send_signal(signal.SIGTERM)
        await wait_for_event(tmp_path / "reports", "run.stopping", proc)  # signals do not queue
        proc.send_signal(signal.SIGTERM)
        _, err = await asyncio.wait_for(proc.communicate(), 60)
        assert proc.returncode == 130 and "run.aborting" in err.decode()
        [first] = [json.loads(p.read_text()) for p in (tmp_path / "reports").glob("*/summary.json")]
        assert first["status"] == "interrupted"
        code, _, err = await run_cli("figures", "--config", str(cfg))
        assert code == 0, err[-2000:]
        await assert_consistent(dsn, repo, bodies)


async def test_kill_9_at_ten_random_moments_then_a_run_to_the_end(dsn, repo, tmp_path):
    """kill, rerun, kill, ... at ten moments of one long job (anywhere: starting, fetching,
    committing, stamping), then a run to the end: the database, the files and the branch agree,
    and no URL was asked more often than the kills explain."""
    import random
    rng = random.Random(20261202)
    async with UpstreamSimulator() as sim:
        bodies = await scene(dsn, sim)
        cfg = config_file(dsn, repo, sim, tmp_path)
        kills = 0
        for _ in range(10):
            proc = await start_cli("figures", "--config", str(cfg))
            try:
                await asyncio.wait_for(proc.wait(), rng.uniform(0.3, 2.5))  # a moment chosen at random
            except TimeoutError:
                proc.kill()
                kills += 1
            await proc.communicate()
        code, _, err = await run_cli("figures", "--config", str(cfg))
        assert code == 0, err[-2000:]
        await assert_consistent(dsn, repo, bodies)
        asked = Counter(r.path for r in sim.log if r.method == "HEAD")
        assert len(asked) == ROWS
        # A kill can cost a second request only for rows in flight or waiting for their database
        # write at that moment: max_inflight (4) plus a flush's worth.
        assert max(asked.values()) <= 1 + kills
        assert sum(n - 1 for n in asked.values()) <= kills * 8


async def test_a_second_signal_cuts_requests_in_flight(dsn, repo, tmp_path):
    """Answers that take a minute and a drain that would wait a minute: after the second
    signal the job exits long before either, with what it had placed committed and stamped."""
    import time
    async with UpstreamSimulator() as sim:
        bodies = await scene(dsn, sim)
        cfg = config_file(dsn, repo, sim, tmp_path)
        slow_drain = cfg.read_text().replace('"drain_timeout_s" = 5\n', '"drain_timeout_s" = 60\n')
        assert slow_drain != cfg.read_text()
        cfg.write_text(slow_drain)
        for i in range(8, ROWS):  # the first rows answer at once; the rest hang for a minute
            if f"k-{i:02}" in bodies:
                sim.set_route("europepmc.org", f"/k{i:02}.png", Behaviour(body=bodies[f"k-{i:02}"], delay_s=60))
        proc = await start_cli("figures", "--config", str(cfg))
        await wait_for_outcomes(tmp_path / "reports", 4, proc)
        proc.send_signal(signal.SIGTERM)
        await wait_for_event(tmp_path / "reports", "run.stopping", proc)
        t0 = time.monotonic()
        proc.send_signal(signal.SIGTERM)
        await asyncio.wait_for(proc.communicate(), 60)
        assert proc.returncode == 130 and time.monotonic() - t0 < 30, "in-flight requests were cut, not waited for"
        code, out, _ = await run_cli("report", "--config", str(cfg), "--json")
        assert code == 0 and json.loads(out)["status"] == "interrupted"


async def _database_text(dsn: str) -> str:
    """Every row of every table the tool can see (the host's and its own schema), as text."""
    conn = await asyncpg.connect(dsn)
    try:
        tables = await conn.fetch("""select table_schema, table_name from information_schema.tables
                                     where table_schema in ('public', 'artifact_recovery') order by 1, 2""")
        out = []
        for t in tables:
            rows = await conn.fetch(f'select t::text as r from "{t["table_schema"]}"."{t["table_name"]}" t order by 1')
            out.append(f"{t['table_schema']}.{t['table_name']}: " + "\n".join(r["r"] for r in rows))
        return "\n".join(out)
    finally:
        await conn.close()


def _tree_bytes(root: Path) -> dict[str, bytes]:
    """Every file under the work tree, .git included (index, refs, objects), by its bytes."""
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


async def test_recover_plan_through_the_cli_changes_nothing_at_all(dsn, repo, tmp_path):
    """--plan: the database (every table, the journal and runs included), and the work tree
    with its .git, byte for byte as they were; the plan itself goes to the report folder."""
    from tests.harness import insert_artifacts, recover_config
    (repo / "datasets").mkdir()
    (repo / "datasets" / "found.csv").write_bytes(b"a,b\n1,2\n")
    await insert_artifacts(dsn, [("p-1", "dataset", {"expected_path": "datasets/found.csv"}, None),
                                 ("p-2", "dataset", {"filename": "nowhere.csv"}, None)])
    cfg = recover_config(dsn, repo, tmp_path)
    config = tmp_path / "recover.toml"
    config.write_text(to_toml(cfg.raw))
    code, _, err = await run_cli("recover", "--config", str(config), "--plan")  # the schema is made once
    assert code == 0, err[-2000:]
    before_db, before_tree = await _database_text(dsn), _tree_bytes(repo)
    code, _, err = await run_cli("recover", "--config", str(config), "--plan")
    assert code == 0, err[-2000:]
    assert await _database_text(dsn) == before_db
    assert _tree_bytes(repo) == before_tree
    plans = sorted((tmp_path / "reports").glob("*/plan.csv"))
    assert plans and "p-1" in plans[-1].read_text()


async def test_a_third_signal_exits_at_once_whatever_hangs(dsn, repo, tmp_path):
    """A commit that hangs (a site helper that sleeps; 30 s, so nothing lingers long after the
    test) holds the drain and the close:
    the third signal gives the operator the process back at once, with exit 130."""
    import time
    async with UpstreamSimulator() as sim:
        await scene(dsn, sim)
        cfg = config_file(dsn, repo, sim, tmp_path)
        text = cfg.read_text().replace('"commit_batch" = 5', '"commit_batch" = 5\n"commit_command" = "sh -c \'sleep 30\'"')
        cfg.write_text(text.replace('"drain_timeout_s" = 5\n', '"drain_timeout_s" = 120\n'))
        assert "sleep 30" in cfg.read_text() and '"drain_timeout_s" = 120' in cfg.read_text()
        proc = await start_cli("figures", "--config", str(cfg))
        await wait_for_outcomes(tmp_path / "reports", 6, proc)
        proc.send_signal(signal.SIGTERM)
        await wait_for_event(tmp_path / "reports", "run.stopping", proc)
        proc.send_signal(signal.SIGTERM)
        await wait_for_event(tmp_path / "reports", "run.aborting", proc)  # now closing waits on the hung commit
        t0 = time.monotonic()
        proc.send_signal(signal.SIGTERM)
        _, err = await asyncio.wait_for(proc.communicate(), 60)
        assert proc.returncode == 130 and time.monotonic() - t0 < 30, err.decode()[-3000:]
        assert "run.exiting_now" in err.decode()
