"""Defects a review found in status, tail, the heartbeat, the run's row and summary.md."""

from __future__ import annotations

import asyncio
import json
import time
from pathlib import Path

import asyncpg
import pytest

from crawler import engine, report, status, tail
from tests.harness import figure_config, insert_artifacts, insert_figures


async def test_every_row_is_counted_in_one_state_only(dsn: str, tmp_path: Path) -> None:
    await insert_artifacts(dsn, [
        ("d-1", "dataset", {"file_unrecoverable": True}, "datasets/gone.csv"),   # marked, with a stale path
        ("d-2", "dataset", {"file_unrecoverable": True}, None),
        ("d-3", "dataset", {}, "datasets/x.csv"),
        ("f-1", "paper_figure", {"image_unavailable": True, "image_fetch_outcome": "hard_404"}, None),
        ("f-2", "paper_figure", {"image_fetch_outcome": "transient", "image_next_attempt_at": "2999-01-01T00:00:00Z"},
         "figures/old.png"),
        ("f-3", "paper_figure", {"image_fetch_outcome": "fetched"}, "figures/f.png"),
        ("f-4", "paper_figure", ["not", "an", "object"], None)])
    cfg = figure_config(dsn, tmp_path, 1, tmp_path)
    db = await engine.open_database(cfg)
    try:
        rows = (await status.gather(cfg, db))["rows"]
    finally:
        await db.close()
    assert rows["dataset"] == {"rows": 3, "bound": 1, "needs_review": 0, "unrecoverable": 2, "missing": 0}
    f = rows["paper_figure"]
    assert f["rows"] == 4 and (f["unavailable"], f["transient_later"], f["fetched"], f["missing"]) == (1, 1, 1, 1)
    assert sum(v for k, v in f.items() if k != "rows") == 4


async def test_lost_is_judged_by_the_runs_own_heartbeat_and_review_counts_by_the_latest_recover(dsn, tmp_path):
    cfg = figure_config(dsn, tmp_path, 1, tmp_path)  # heartbeat_s 5 here
    db = await engine.open_database(cfg)
    try:
        await insert_artifacts(dsn, [("d-1", "dataset", {}, None)])
        conn = await asyncpg.connect(dsn)
        await conn.execute("""insert into artifact_recovery.runs (run_id, command, status, config, heartbeat_at, summary)
            values ('slow', 'figures', 'running', '{"run": {"heartbeat_s": 60}}', now() - interval '20 seconds', null),
                   ('quick', 'figures', 'running', '{"run": {"heartbeat_s": 1}}', now() - interval '20 seconds', null),
                   ('rec', 'recover', 'finished', '{}', null,
                    '{"per_type": {"dataset": {"needs_review": 1}}}')""")
        await conn.execute("update artifact_recovery.runs set started_at = now() - interval '1 hour' where run_id = 'rec'")
        for i in range(12):  # newer runs push the recover out of the recent list
            await conn.execute("insert into artifact_recovery.runs (run_id, command, status, started_at) "
                               "values ($1, 'figures', 'finished', now() - interval '30 minutes')", f"later-{i}")
        await conn.close()
        state = await status.gather(cfg, db)
    finally:
        await db.close()
    states = {r["run_id"]: r["status"] for r in state["runs"]}
    assert states.get("slow") == "running" and states.get("quick") == "lost"
    assert state["rows"]["dataset"]["needs_review"] == 1


async def test_the_heartbeat_is_not_queued_behind_a_busy_pool(dsn, tmp_path):
    cfg = figure_config(dsn, tmp_path, 1, tmp_path)
    db = await engine.open_database(cfg)
    held = []
    try:
        for _ in range(4):  # every pooled connection busy (pages of a producer per host)
            held.append(await db._pool.acquire())
        conn = await asyncpg.connect(dsn)
        await conn.execute("insert into artifact_recovery.runs (run_id, command) values ('r', 'figures')")
        await conn.close()
        await asyncio.wait_for(db.heartbeat("r", {"done": 7}), 5)
        conn = await asyncpg.connect(dsn)
        assert json.loads(await conn.fetchval("select progress from artifact_recovery.runs where run_id = 'r'")) == {"done": 7}
        await conn.close()
    finally:
        for c in held:
            await db._pool.release(c)
        await db.close()


async def test_a_job_that_cannot_be_built_leaves_no_run_running(dsn, tmp_path):
    cfg = figure_config(dsn, tmp_path, 1, tmp_path)
    db = await engine.open_database(cfg)

    def broken(run_id: str):
        raise ValueError("a site's path resolver could not be loaded")

    try:
        with pytest.raises(ValueError):
            await engine.run_job(cfg, db, "figures", broken)
        conn = await asyncpg.connect(dsn)
        assert await conn.fetchval("select count(*) from artifact_recovery.runs") == 0
        await conn.close()
    finally:
        await db.close()


def _log(folder: Path, events: list[str]) -> None:
    folder.mkdir(parents=True)
    (folder / "log.jsonl").write_text("".join(json.dumps({"event": e, "timestamp": "2026-12-02T09:00:00Z"}) + "\n"
                                              for e in events))


def test_tail_follows_the_newest_run_still_going_and_knows_no_such_run(tmp_path: Path, capsys) -> None:
    _log(tmp_path / "20261202T090000Z-figures-aaaaaa", ["run.start", "progress"])     # still going
    _log(tmp_path / "20261202T090100Z-recover-bbbbbb", ["run.start", "run.finish"])   # a plan, ended after it
    assert tail.newest_going(tmp_path) == tmp_path / "20261202T090000Z-figures-aaaaaa"
    with open(tmp_path / "20261202T090000Z-figures-aaaaaa" / "log.jsonl", "a") as fh:
        fh.write(json.dumps({"event": "run.finish", "timestamp": "2026-12-02T09:02:00Z"}) + "\n")
    assert tail.follow(tmp_path, "20261202T090000Z-figures-aaaaaa", 5.0) == 0
    assert "run.finish" in capsys.readouterr().out
    t0 = time.monotonic()
    assert tail.follow(tmp_path, "no-such-run", 5.0, max_wait_s=0.3) == 2
    assert time.monotonic() - t0 < 30


def test_summary_md_keeps_hostile_values_inside_their_cells(tmp_path: Path) -> None:
    s = {"run_id": "R", "command": "figures", "status": "finished", "started_at": "2026-12-02T09:00:00Z",
         "finished_at": "2026-12-02T09:00:05Z", "duration_s": 5,
         "per_host": {"evil|<img src=x onerror=alert(1)>\x1b[2J": {"attempted": 1, "failed": 1}},
         "failed_rows": [{"artifact_id": "a|b", "error": "bad\nline", "url": "http://x/<script>"}]}
    report.write_summary(tmp_path, s)
    md = (tmp_path / "summary.md").read_text()
    assert "<img" not in md and "<script>" not in md and "\x1b" not in md
    assert "| evil\\|&lt;img src=x onerror=alert(1)&gt; [2J | 1 |" in md and "| a\\|b | bad line |" in md
