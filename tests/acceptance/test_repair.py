"""Read-only repair through the CLI, as an operator of a frozen database runs it: plan,
changeset (as a role that may only SELECT the artifacts table), review, apply, undo."""

from __future__ import annotations

import hashlib
import json
import os
import urllib.parse
from pathlib import Path
from typing import Any

import asyncpg

from crawler.sandbox import images, pg
from crawler.sandbox.simulator import Behaviour, UpstreamSimulator
from tests.acceptance.test_cli import run_cli
from tests.harness import figure_tree, git, insert_figures, recover_config, rows_by_id, to_toml

TIME_KEYS = ("image_last_attempt_at", "file_fetched_at", "image_404_at", "image_next_attempt_at", "file_commit")


async def snapshot(dsn: str) -> dict[str, Any]:
    """Every schema, table, row and sequence of the database, as text."""
    conn = await asyncpg.connect(dsn)
    try:
        schemas = [r[0] for r in await conn.fetch(
            "select nspname from pg_namespace where nspname not like 'pg\\_%' and nspname <> 'information_schema' "
            "order by 1")]
        out: dict[str, Any] = {"schemas": schemas}
        for s, t, kind in await conn.fetch(
                "select n.nspname, c.relname, c.relkind from pg_class c join pg_namespace n on n.oid = c.relnamespace "
                "where n.nspname = any($1::text[]) and c.relkind in ('r', 'S', 'i') order by 1, 2", schemas):
            name = f'"{s}"."{t}"'
            if kind == "r":
                out[name] = [r[0] for r in await conn.fetch(f"select x::text from {name} x order by 1")]
            elif kind == "S":
                out[name] = await conn.fetchval(f"select last_value::text || is_called::text from {name}")
            else:
                out[name] = "index"
        return out
    finally:
        await conn.close()


async def select_only_role(dsn: str) -> str:
    """A role that may only SELECT the artifacts table (no schema of its own, no other table)."""
    role = f"ro_{os.getpid()}_{abs(hash(dsn)) % 10_000_000}"
    conn = await asyncpg.connect(dsn)
    try:
        db = await conn.fetchval("select current_database()")
        await conn.execute(f"drop role if exists {role}")
        await conn.execute(f"create role {role} login")
        await conn.execute(f'grant connect on database "{db}" to {role}')
        await conn.execute("revoke create on schema public from public")
        await conn.execute(f"grant usage on schema public to {role}")
        await conn.execute(f"grant select on artifacts to {role}")
    finally:
        await conn.close()
    parts = urllib.parse.urlsplit(dsn)
    host = parts.netloc.rsplit("@", 1)[-1]
    return urllib.parse.urlunsplit(parts._replace(netloc=f"{role}@{host}"))


def scene(sim: UpstreamSimulator) -> tuple[list[tuple[str, dict[str, Any], None]], dict[str, bytes], set[str], set[str]]:
    rows, bodies, gone, flaky = [], {}, set(), set()
    for i in range(12):
        host = "europepmc.org" if i % 2 else "cdn.example.com"
        rid, path = f"r-{i:02}", f"/img/{i:02}.png"
        if i % 4 == 0:
            sim.set_route(host, path, Behaviour(status=404, content_type="text/html"))
            gone.add(rid)
        elif i == 5:
            sim.set_route(host, path, Behaviour(status=503, content_type="text/html"))
            flaky.add(rid)
        else:
            bodies[rid] = images.png(700 + i, 3000)
            sim.set_route(host, path, Behaviour(body=bodies[rid]))
        rows.append((rid, {"image_url": f"http://{host}{path}", "paper_id": f"P{i % 3}", "note": "kept"}, None))
    return rows, bodies, gone, flaky


def config(dsn: str, repo: Path, sim: UpstreamSimulator, tmp: Path, name: str) -> Path:
    tree = figure_tree(dsn, repo, sim.port, tmp, artifacts={"commit_batch": 4})
    tree["http"]["max_retries"] = 0
    path = tmp / f"{name}.toml"
    path.write_text(to_toml(tree))
    return path


def assert_truth(rows: dict[str, dict[str, Any]], repo: Path, bodies: dict[str, bytes], gone: set[str],
                 flaky: set[str], skip: set[str] = frozenset()) -> None:
    """Each row as the simulator's truth says it must end."""
    for rid, row in rows.items():
        if rid in skip:
            continue
        m = row["metadata"]
        assert m["note"] == "kept", rid  # keys the tool does not write are never dropped
        if rid in bodies:
            assert m["image_fetch_outcome"] == "fetched" and m["file_sha256"] == hashlib.sha256(bodies[rid]).hexdigest()
            assert (repo / row["file_path"]).read_bytes() == bodies[rid]
            assert row["file_path"] in git(repo, "ls-tree", "-r", "--name-only", m["file_commit"]).split()
        elif rid in gone:
            assert m["image_unavailable"] is True and m["image_http_status"] == 404 and row["file_path"] is None
        else:
            assert rid in flaky and m["image_fetch_outcome"] == "transient" and "image_unavailable" not in m
        assert m["image_fetch_attempts"] == 1, rid


def timeless(rows: dict[str, dict[str, Any]]) -> dict[str, Any]:
    return {k: {"file_path": v["file_path"], "metadata": {mk: mv for mk, mv in v["metadata"].items() if mk not in TIME_KEYS}}
            for k, v in rows.items()}


def run_id_of(tmp: Path, command: str) -> str:
    found = [json.loads(p.read_text()) for p in (tmp / "reports").glob("*/summary.json")]
    return max(s["run_id"] for s in found if s["command"] == command)


async def test_plan_changeset_review_apply_undo(dsn, pg_admin_dsn, repo, tmp_path):
    async with UpstreamSimulator() as sim:
        rows, bodies, gone, flaky = scene(sim)
        await insert_figures(dsn, rows)
        original = await rows_by_id(dsn)
        ro = config(await select_only_role(dsn), repo, sim, tmp_path, "ro")
        rw = config(dsn, repo, sim, tmp_path, "rw")
        changes = tmp_path / "changes.jsonl"
        frozen = await snapshot(dsn)

        # 1. The plan: no request, no write; rows per budget and host, and the least time.
        code, out, err = await run_cli("figures", "--plan", "--config", str(ro))
        assert code == 0, err
        assert "12 rows to try" in out and "europepmc" in out and "default:cdn.example.com" in out
        assert not sim.log and await snapshot(dsn) == frozen
        assert not (tmp_path / "reports").exists() or not list((tmp_path / "reports").iterdir())

        # 2. The changeset, as the SELECT-only role: files fetched and committed, rows untouched.
        code, _, err = await run_cli("figures", "--changeset", str(changes), "--config", str(ro))
        assert code == 0, err
        assert await snapshot(dsn) == frozen
        lines = [json.loads(x) for x in changes.read_text().splitlines()]
        assert sorted(x["artifact_id"] for x in lines) == sorted(original)
        for x in lines:
            assert x["before"]["metadata"]["image_fetch_attempts"] is None and x["after"]["metadata"]["image_fetch_attempts"] == 1
        tracked = set(git(repo, "ls-tree", "-r", "--name-only", "HEAD").split())
        fetched = {x["artifact_id"]: x["after"]["file_path"] for x in lines if "file_path" in x["after"]}
        assert set(fetched) == set(bodies) and set(fetched.values()) <= tracked
        changeset_run = lines[0]["run_id"]

        # 3. The same changeset again resumes: rows it holds are not asked for again.
        asked = len(sim.log)
        code, _, err = await run_cli("figures", "--changeset", str(changes), "--config", str(ro))
        assert code == 0, err
        assert len(sim.log) == asked and len(changes.read_text().splitlines()) == len(lines)
        assert await snapshot(dsn) == frozen

        # 4. Review: a dry run changes nothing either.
        code, _, err = await run_cli("apply", "--dry-run", str(changes), "--config", str(ro))
        assert code == 0, err
        assert "would change 12 rows" in err and await snapshot(dsn) == frozen

        # 5. Someone changes a row by hand before the apply: it keeps the hand's value, listed.
        conn = await asyncpg.connect(dsn)
        await conn.execute("""update artifacts set metadata = metadata || '{"image_fetch_attempts": 7}' where id = 'r-04'""")
        await conn.close()
        code, _, err = await run_cli("apply", str(changes), "--config", str(rw))
        assert code == 3, err
        assert "changed 11 rows" in err and "refused: r-04" in err
        applied = await rows_by_id(dsn)
        assert applied["r-04"]["metadata"] == {**original["r-04"]["metadata"], "image_fetch_attempts": 7}
        assert_truth(applied, repo, bodies, gone, flaky, skip={"r-04"})

        # ... which is what a direct run writes (the simulator's truth, in another database).
        direct = await pg.ensure_database(pg_admin_dsn, f"direct_{os.getpid()}", fresh=True)
        other = tmp_path / "other"
        other.mkdir()
        git(other, "init", "-q", "-b", "main")
        await insert_figures(direct, rows)
        code, _, err = await run_cli("figures", "--config", str(config(direct, other, sim, tmp_path, "direct")))
        assert code == 0, err
        direct_rows = timeless(await rows_by_id(direct))
        assert {k: v for k, v in timeless(applied).items() if k != "r-04"} == \
            {k: v for k, v in direct_rows.items() if k != "r-04"}

        # 6. A second apply changes nothing, updated_at included.
        async def table() -> list[str]:
            conn = await asyncpg.connect(dsn)
            try:
                return [r[0] for r in await conn.fetch("select x::text from artifacts x order by id")]
            finally:
                await conn.close()
        before_second = await table()
        code, _, err = await run_cli("apply", str(changes), "--config", str(rw))
        assert "changed 0 rows, 11 already applied" in err, err
        assert await table() == before_second

        # 7. Undo the changeset's run (written through apply): every value back, except a row
        #    changed by hand since, which is kept and listed.
        conn = await asyncpg.connect(dsn)
        await conn.execute("""update artifacts set metadata = metadata || '{"file_size_bytes": 1}' where id = 'r-01'""")
        await conn.close()
        code, _, err = await run_cli("undo", changeset_run, "--config", str(rw))
        assert code == 3, err
        assert "refused: r-01" in err and "changed 10 rows" in err
        undone = await rows_by_id(dsn)
        for rid in original:
            if rid in ("r-01", "r-04"):
                continue
            assert undone[rid] == original[rid], rid
        assert undone["r-01"]["metadata"]["file_size_bytes"] == 1
        assert undone["r-04"]["metadata"]["image_fetch_attempts"] == 7

        # 8. An undo is journalled too: undoing it puts the applied values back.
        undo_run = run_id_of(tmp_path, "undo")
        code, _, err = await run_cli("undo", undo_run, "--config", str(rw))
        assert code == 0, err
        again = await rows_by_id(dsn)
        for rid in original:
            if rid not in ("r-01", "r-04"):
                assert again[rid] == applied[rid], rid


async def test_a_file_that_is_not_a_changeset_is_one_line_and_exit_2(dsn, tmp_path):
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"artifact_id": "x", "before": {}, "after": {}}\nnot json\n')
    cfg = tmp_path / "c.toml"
    cfg.write_text(to_toml({"db": {"dsn": dsn}, "report": {"dir": str(tmp_path / "r"), "console": False}}))
    code, _, err = await run_cli("apply", str(bad), "--config", str(cfg))
    assert code == 2 and err.count("\n") == 1 and "line 2" in err
    code, _, err = await run_cli("apply", str(tmp_path / "none.jsonl"), "--config", str(cfg))
    assert code == 2 and err.count("\n") == 1 and "no such changeset" in err
    code, _, err = await run_cli("undo", "nosuchrun", "--config", str(cfg))
    assert code == 2 and err.count("\n") == 1 and "no run nosuchrun" in err


async def direct_run(dsn: str, repo: Path, sim: UpstreamSimulator, tmp_path: Path
                     ) -> tuple[dict[str, Any], Path, str, list[str]]:
    """The scene's rows, a direct figures run: (rows before, its config, its run id, the paths it committed)."""
    rows, bodies, _gone, _flaky = scene(sim)
    await insert_figures(dsn, rows)
    original = await rows_by_id(dsn)
    rw = config(dsn, repo, sim, tmp_path, "rw")
    code, _, err = await run_cli("figures", "--config", str(rw))
    assert code == 0, err
    fetched = await rows_by_id(dsn)
    return original, rw, run_id_of(tmp_path, "figures"), sorted(fetched[r]["file_path"] for r in bodies)


async def test_undo_with_revert_commits_takes_the_runs_files_off_the_branch(dsn, repo, tmp_path):
    async with UpstreamSimulator() as sim:
        original, rw, run, paths = await direct_run(dsn, repo, sim, tmp_path)
        head = git(repo, "rev-parse", "HEAD")

        frozen = await snapshot(dsn)
        code, _, err = await run_cli("undo", run, "--dry-run", "--revert-commits", "--config", str(rw))
        assert code == 0 and "would change 12 rows" in err, err
        assert await snapshot(dsn) == frozen and git(repo, "rev-parse", "HEAD") == head
        assert all((repo / p).is_file() for p in paths)

        code, _, err = await run_cli("undo", run, "--revert-commits", "--config", str(rw))
        assert code == 0, err
        assert f"{len(paths)} files taken off the branch" in err
        assert await rows_by_id(dsn) == original
        # artifacts.commit_batch (4 here) is the ceiling of every commit: two commits on top
        assert git(repo, "rev-parse", "HEAD~2") == head and len(paths) == 8
        for c in ("HEAD", "HEAD~1"):
            assert len(git(repo, "diff-tree", "-r", "--no-commit-id", "--name-only", c).split()) == 4
        tracked = set(git(repo, "ls-tree", "-r", "--name-only", "HEAD").split())
        assert not tracked & set(paths)
        assert set(paths) <= set(git(repo, "ls-tree", "-r", "--name-only", head).split())  # history keeps them
        assert not any((repo / p).exists() for p in paths)
        assert git(repo, "status", "--porcelain") == ""
        assert git(repo, "ls-files") == "\n".join(sorted(tracked)) if tracked else git(repo, "ls-files") == ""


async def test_recover_changeset_as_a_select_only_role_then_apply(dsn, repo, tmp_path):
    from tests.integration.test_recover_local import scene as recover_scene
    await recover_scene(dsn, repo, tmp_path)
    original = await rows_by_id(dsn)

    def recover_toml(d: str, name: str) -> Path:
        path = tmp_path / f"{name}.toml"
        path.write_text(to_toml(recover_config(d, repo, tmp_path).raw))
        return path

    ro, rw = recover_toml(await select_only_role(dsn), "ro"), recover_toml(dsn, "rw")
    changes = tmp_path / "recover.jsonl"
    frozen = await snapshot(dsn)
    code, _, err = await run_cli("recover", "--changeset", str(changes), "--config", str(ro))
    assert code == 0, err
    assert await snapshot(dsn) == frozen
    lines = [json.loads(x) for x in changes.read_text().splitlines()]
    assert sorted(x["artifact_id"] for x in lines) == ["d-certain", "d-high", "d-history", "d-medium", "m-ram"]
    # Run again with the same changeset: the rows it settled are seen as settled.
    code, _, err = await run_cli("recover", "--changeset", str(changes), "--config", str(ro))
    assert code == 0, err
    assert len(changes.read_text().splitlines()) == len(lines) and await snapshot(dsn) == frozen

    code, _, err = await run_cli("apply", str(changes), "--config", str(rw))
    assert code == 0 and "changed 5 rows" in err, err
    rows = await rows_by_id(dsn)
    for x in lines:
        rid = x["artifact_id"]
        assert rows[rid]["metadata"] == {**original[rid]["metadata"], **x["after"]["metadata"]}
        if "file_path" in x["after"]:
            assert (repo / rows[rid]["file_path"]).is_file()
            assert rows[rid]["file_path"] in git(repo, "ls-tree", "-r", "--name-only", "HEAD").split()
    assert rows["m-ram"]["metadata"]["file_unrecoverable"] is True
    # A direct run now finds every bound row bound: nothing left to change.
    code, _, err = await run_cli("recover", "--config", str(rw))
    assert code == 0, err
    assert await rows_by_id(dsn) == rows


async def test_a_changeset_that_changes_a_row_twice_applies_in_order_and_once(dsn, tmp_path):
    await insert_figures(dsn, [("dup", {"image_url": "http://x/y.png", "n": 0}, None)])
    changes = tmp_path / "twice.jsonl"
    changes.write_text(
        json.dumps({"artifact_id": "dup", "before": {"metadata": {"n": 0}}, "after": {"metadata": {"n": 1}},
                    "run_id": "r1", "outcome": "transient"}) + "\n" +
        json.dumps({"artifact_id": "dup", "before": {"metadata": {"n": 1}}, "after": {"metadata": {"n": 2}},
                    "run_id": "r2", "outcome": "transient"}) + "\n")
    cfg = tmp_path / "c.toml"
    cfg.write_text(to_toml({"db": {"dsn": dsn}, "report": {"dir": str(tmp_path / "r"), "console": False}}))
    code, _, err = await run_cli("apply", str(changes), "--config", str(cfg), timeout=60)
    assert code == 0 and "changed 2 rows" in err, err
    assert (await rows_by_id(dsn))["dup"]["metadata"]["n"] == 2
    code, _, err = await run_cli("apply", str(changes), "--config", str(cfg), timeout=60)
    # The first line's after is no longer there, and its before neither: the row moved on, by
    # this very changeset's second line. Said, not applied; the row keeps the last value.
    assert (await rows_by_id(dsn))["dup"]["metadata"]["n"] == 2
    assert "1 already applied" in err


async def test_a_revert_commit_that_failed_is_exit_3_and_the_same_undo_again_takes_the_files_off(dsn, repo, tmp_path):
    async with UpstreamSimulator() as sim:
        _, rw, run, paths = await direct_run(dsn, repo, sim, tmp_path)
        lock = repo / ".git" / "index.lock"
        lock.write_text("")  # someone's git, holding the index
        short = tmp_path / "short.toml"
        short.write_text(rw.read_text().replace('["artifacts"]\n', '["artifacts"]\n"git_timeout_s" = 1\n'))
        code, _, err = await run_cli("undo", run, "--revert-commits", "--config", str(short))
        assert code == 3 and "not recorded: commit" in err and "bad configuration" not in err, err
        assert set(paths) <= set(git(repo, "ls-tree", "-r", "--name-only", "HEAD").split())
        lock.unlink()
        code, _, err = await run_cli("undo", run, "--revert-commits", "--config", str(short))
        assert code == 0 and f"{len(paths)} files taken off the branch" in err, err
        assert not set(paths) & set(git(repo, "ls-tree", "-r", "--name-only", "HEAD").split())


async def test_a_select_only_role_asked_to_write_gets_one_line(dsn, repo, tmp_path):
    ro_dsn = await select_only_role(dsn)
    changes = tmp_path / "c.jsonl"
    changes.write_text("")
    cfg = tmp_path / "ro.toml"
    cfg.write_text(to_toml({"db": {"dsn": ro_dsn}, "report": {"dir": str(tmp_path / "r"), "console": False}}))
    code, _, err = await run_cli("apply", str(changes), "--config", str(cfg))
    assert code == 1 and err.count("\n") == 1 and "may not create or change the tool's schema" in err, err
    # The tool's schema made by someone else, which this role may not read.
    conn = await asyncpg.connect(dsn)
    await conn.execute("create schema artifact_recovery; create table artifact_recovery.journal (id int)")
    await conn.close()
    code, _, err = await run_cli("undo", "some-run", "--dry-run", "--config", str(cfg))
    assert code == 1 and err.count("\n") == 1 and "may not read the tool's schema" in err, err


async def test_a_plan_with_a_limit_counts_only_that_many_rows_per_budget(dsn, repo, tmp_path):
    async with UpstreamSimulator() as sim:
        rows, _, _, _ = scene(sim)
        await insert_figures(dsn, rows)
        tree = figure_tree(dsn, repo, sim.port, tmp_path, budgets={"europepmc": {"max_inflight": 1, "rate_per_s": 0.5}})
        path = tmp_path / "slow.toml"
        path.write_text(to_toml(tree))
        code, out, err = await run_cli("figures", "--plan", "--limit", "2", "--config", str(path))
        assert code == 0, err
        assert "2 rows to try" in out and "at least 0:00:04" in out, out  # 2 rows at 0.5/s, not 6
        assert not sim.log


async def test_a_second_recover_while_one_runs_is_exit_2_naming_the_holder(dsn, repo, tmp_path):
    from crawler import engine
    cfg_obj = recover_config(dsn, repo, tmp_path)
    path = tmp_path / "recover.toml"
    path.write_text(to_toml(cfg_obj.raw))
    db = await engine.open_database(cfg_obj)
    try:  # a recover run in progress elsewhere: the lock, held as the CLI holds it
        held = await db.job_lock("recover", "crawler 20261202T000000Z-recover-abcdef host-a pid 4242 since 07:00:00Z",
                                 dsn, 10)
        code, _, err = await run_cli("recover", "--config", str(path))
        assert code == 2 and err.count("\n") == 1, err
        assert "20261202T000000Z-recover-abcdef host-a pid 4242" in err and "one recover at a time" in err
        code, _, err = await run_cli("recover", "--plan", "--config", str(path))
        assert code == 0, err  # a plan changes nothing: it needs no lock
        await held.close()  # the other run ends (or dies: its connection goes, and the lock with it)
        code, _, err = await run_cli("recover", "--config", str(path))
        assert code == 0, err
    finally:
        await db.close()
