"""Exit status 3: a run that finished but could not record some of its work says so, in the
exit status, the summary and one line per reason; exit 0 means everything attempted was
recorded. Through the CLI in a subprocess, as an operator (or a systemd unit) sees it."""

from __future__ import annotations

import json

import asyncpg

from crawler.sandbox import images
from crawler.sandbox.simulator import Behaviour
from tests.acceptance.test_cli import run_cli
from tests.harness import figure_tree, insert_figures, rows_by_id, to_toml, url


async def test_a_commit_that_failed_is_exit_3_listed_and_repaired_by_the_next_run(dsn, repo, sim, tmp_path):
    for i in range(3):
        sim.set_route("cdn.example.com", f"/c{i}.png", Behaviour(body=images.png(40 + i, 900)))
    await insert_figures(dsn, [(f"c-{i}", {"image_url": url("cdn.example.com", f"/c{i}.png"), "paper_id": "P"}, None)
                               for i in range(3)])
    config = tmp_path / "c.toml"
    config.write_text(to_toml(figure_tree(dsn, repo, sim.port, tmp_path, artifacts={"git_timeout_s": 1})))
    stale = repo / ".git" / "refs" / "heads" / "main.lock"
    stale.write_text("")  # left by a git that was killed: the branch cannot move
    code, _, err = await run_cli("figures", "--config", str(config))
    assert code == 3, err[-2000:]
    assert "not recorded: commit" in err and "main.lock" in err
    [summary] = [json.loads(p.read_text()) for p in (tmp_path / "reports").glob("*/summary.json")]
    assert summary["status"] == "finished_with_errors"
    [entry] = summary["unrecorded"]
    assert entry["what"] == "commit" and entry["count"] == 3 and sorted(entry["artifact_ids"]) == ["c-0", "c-1", "c-2"]
    assert all(r["file_path"] is None for r in (await rows_by_id(dsn)).values())
    conn = await asyncpg.connect(dsn)
    assert await conn.fetchval("select status from artifact_recovery.runs") == "finished_with_errors"
    await conn.close()
    md = next((tmp_path / "reports").glob("*/summary.md")).read_text()
    assert "Not recorded" in md and "c-0" in md

    stale.unlink()  # the operator clears the cause; the next run records everything, exit 0
    code, _, err = await run_cli("figures", "--config", str(config))
    assert code == 0, err[-2000:]
    assert all(r["metadata"].get("image_fetch_outcome") == "fetched" for r in (await rows_by_id(dsn)).values())
    assert len(sim.requests_for(method="GET")) == 3  # the files on disk were adopted, not fetched again
