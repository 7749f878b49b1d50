"""The whole recovery scene (145 rows) against a real S3 API (moto on loopback), PostgreSQL and git."""

from __future__ import annotations

import json
from pathlib import Path

import asyncpg
import pytest

from crawler.sandbox.recovery_scene import Tarball, build_recovery_scene, lay_out
from crawler.sandbox.s3local import LocalS3
from tests.harness import commits_by_tool, insert_artifacts, read_csv, recover_config, rows_by_id, run_recover

BUCKET = "scidex"
PREFIX = "backups/scidex-host/"


@pytest.fixture(scope="module")
def s3():
    with LocalS3() as server:
        yield server


def scene_config(dsn: str, repo: Path, tmp: Path, s3: LocalS3, prefix: str):
    cfg = recover_config(dsn, repo, tmp, s3_prefix=f"s3://{BUCKET}/{prefix}", ram_only_creators=["forge.session"])
    cfg.raw["s3"]["endpoint_url"] = s3.endpoint_url
    return cfg


async def test_the_scene_ends_as_an_honest_run_should(dsn, repo, tmp_path, s3):
    scene = build_recovery_scene()
    await lay_out(scene, repo, tmp_path / "wt")
    await insert_artifacts(dsn, [(r["id"], r["artifact_type"], r["metadata"], None) for r in scene.rows])
    conn = await asyncpg.connect(dsn)
    await conn.executemany("insert into artifact_references values ($1, $2, $3, $4)", scene.references)
    await conn.close()
    s3.upload(BUCKET, [(f"scene1/{t.key.rsplit('/', 1)[1]}", t.build()) for t in scene.tarballs])
    cfg = scene_config(dsn, repo, tmp_path, s3, "scene1/")
    _, summary = await run_recover(cfg)
    folder = Path(cfg["report"]["dir"]) / summary["run_id"]
    status = {}
    for t in ("dataset", "model", "tabular_dataset"):
        status.update({r["artifact_id"]: r["status"] for r in read_csv(folder / f"inventory_{t}.csv")})
    wrong = {rid: (status[rid], want) for rid, want in scene.expected.items() if status[rid] != want}
    assert wrong == {}
    # only the two newest tarballs were read: two manifests, none for the oldest
    conn = await asyncpg.connect(dsn)
    manifests = await conn.fetch("select s3_url, complete, error, members from artifact_recovery.tarball_manifests")
    skipped = await conn.fetch("select path, skipped from artifact_recovery.tarball_members where skipped is not null")
    await conn.close()
    assert sorted(m["s3_url"].rsplit("-", 1)[1] for m in manifests) == ["20260308T020000.tar.gz", "20260315T020000.tar.gz"]
    assert all(m["complete"] and m["error"] is None for m in manifests)
    assert {r["path"] for r in skipped} >= {"../../etc/cron.d/evil", "/etc/passwd"}
    assert not (tmp_path / "etc").exists() and not Path("/etc/cron.d/evil").exists()
    # the residual names what was expected and where it was looked for
    residual = {r["artifact_id"]: r["failure_mode"] for r in read_csv(folder / "residual.csv")}
    assert len(residual) == sum(1 for v in scene.expected.values() if v != "bound")
    lost = [r for r in scene.references if r[0] in residual]
    assert lost and all(f"last referenced {day:%Y-%m-%d} in analysis {sid}" in residual[rid] for rid, _, sid, day in lost)
    assert all("2 tarballs" in text for rid, text in residual.items() if scene.expected[rid] == "missing")

    # a second run re-reads no tarball and binds nothing twice
    commits = len(commits_by_tool(repo))
    before = await rows_by_id(dsn)
    _, again = await run_recover(cfg)
    log = (Path(cfg["report"]["dir"]) / again["run_id"] / "log.jsonl").read_text()
    assert '"event":"tarball.scan_start"' not in log and log.count('"event":"tarball.from_manifest"') == 2
    assert len(commits_by_tool(repo)) == commits and await rows_by_id(dsn) == before
    assert again["per_type"] == summary["per_type"]


async def test_a_truncated_tarball_is_reported_and_the_run_goes_on(dsn, repo, tmp_path, s3):
    good = Tarball("x", {"./datasets/ok.csv": b"a,b\n1,2\n"})
    first_part = Tarball("y", {"./datasets/early.csv": b"e\n1\n", "./datasets/late.csv": b"l\n" * 50000}).build()
    s3.upload(BUCKET, [("trunc/b-20260301.tar.gz", good.build()),
                       ("trunc/b-20260302.tar.gz", first_part[: len(first_part) * 2 // 3])])
    await insert_artifacts(dsn, [
        ("d-ok", "dataset", {"expected_path": "datasets/ok.csv"}, None),
        ("d-early", "dataset", {"expected_path": "datasets/early.csv"}, None),
        ("d-late", "dataset", {"expected_path": "datasets/late.csv"}, None),
    ])
    cfg = scene_config(dsn, repo, tmp_path, s3, "trunc/")
    code, summary = await run_recover(cfg)
    assert code == 0
    rows = await rows_by_id(dsn)
    assert rows["d-ok"]["file_path"] == "datasets/ok.csv" and rows["d-early"]["file_path"] == "datasets/early.csv"
    assert rows["d-late"]["file_path"] is None
    log = (Path(cfg["report"]["dir"]) / summary["run_id"] / "log.jsonl").read_text()
    damaged = [json.loads(line) for line in log.splitlines() if '"tarball.damaged"' in line]
    assert len(damaged) == 1 and damaged[0]["tarball"].endswith("b-20260302.tar.gz")


async def test_an_interrupted_scan_starts_that_tarball_over_cleanly(dsn, repo, tmp_path, s3):
    tarball = Tarball("x", {f"./datasets/f{i}.csv": b"v,%d\n" % i for i in range(5)})
    s3.upload(BUCKET, [("cut/c-20260301.tar.gz", tarball.build())])
    await insert_artifacts(dsn, [("d-f3", "dataset", {"expected_path": "datasets/f3.csv"}, None)])
    cfg = scene_config(dsn, repo, tmp_path, s3, "cut/")
    cfg.raw["recovery"]["git_history"] = False
    # a run killed mid-scan leaves an incomplete manifest with some of the members
    db = await asyncpg.connect(dsn)
    await db.execute("create schema if not exists artifact_recovery")
    await db.close()
    from crawler import engine
    handle = await engine.open_database(cfg)
    url = f"s3://{BUCKET}/cut/c-20260301.tar.gz"
    import hashlib
    body = tarball.build()
    etag = hashlib.md5(body).hexdigest()
    manifest_id = await handle.manifest_open(url, etag, len(body), "killed-run")
    await handle.manifest_add_members([(manifest_id, 0, "./datasets/f0.csv", "datasets/f0.csv", 5, "file", None, None, None)])
    await handle.close()

    _, summary = await run_recover(cfg)
    assert summary["per_type"]["dataset"]["bound"] == 1
    conn = await asyncpg.connect(dsn)
    manifest = await conn.fetchrow("select id, complete, members from artifact_recovery.tarball_manifests")
    members = await conn.fetchval("select count(*) from artifact_recovery.tarball_members")
    await conn.close()
    assert manifest["id"] == manifest_id and manifest["complete"] and manifest["members"] == members == 5


async def test_a_rescan_for_a_newly_wanted_member_replaces_its_staging(dsn, repo, tmp_path, s3):
    tarball = Tarball("x", {"./datasets/first.csv": b"1\n", "./datasets/second.csv": b"2\n"})
    s3.upload(BUCKET, [("again/a-20260301.tar.gz", tarball.build())])
    # d-first stays in review (its recorded size differs), so every scan extracts first.csv again
    await insert_artifacts(dsn, [("d-first", "dataset", {"expected_path": "datasets/first.csv",
                                                         "file_size_bytes": 999}, None)])
    cfg = scene_config(dsn, repo, tmp_path, s3, "again/")
    _, one = await run_recover(cfg)
    assert one["per_type"]["dataset"]["needs_review"] == 1
    # a new row wants a member the first scan did not keep: the tarball is read again
    await insert_artifacts(dsn, [("d-second", "dataset", {"expected_path": "datasets/second.csv"}, None)])
    code, two = await run_recover(cfg)
    assert code == 0 and two["per_type"]["dataset"]["bound"] == 1
    rows = await rows_by_id(dsn)
    assert (repo / rows["d-second"]["file_path"]).read_bytes() == b"2\n"


async def test_stop_during_a_search_ends_the_run_promptly(dsn, repo, tmp_path, monkeypatch):
    import asyncio

    from crawler import engine
    from pipelines import recover, tarballs
    started = asyncio.Event()

    async def endless(*args, **kwargs):  # a tarball that streams for ever
        started.set()
        await asyncio.Event().wait()

    monkeypatch.setattr(tarballs, "search", endless)
    await insert_artifacts(dsn, [("d-1", "dataset", {"filename": "x.csv"}, None)])
    cfg = recover_config(dsn, repo, tmp_path)
    db = await engine.open_database(cfg)
    try:
        job = recover.RecoverJob(cfg, db, "run-stop", recover.RecoverOptions())
        task = asyncio.create_task(job.run(5))
        await started.wait()
        job.stop()
        summary = await asyncio.wait_for(task, 10)
    finally:
        await db.close()
    assert summary["interrupted"] is True
    assert (await rows_by_id(dsn))["d-1"]["file_path"] is None


async def test_a_backup_that_cannot_be_read_is_named_and_the_rest_is_still_bound(dsn, repo, tmp_path, s3):
    """S3 cuts every read of the backup: after its resumes the tarball is given up, a row the
    checkout answers by sha256 is still bound, one it answers by path alone waits for review (the
    backup may hold another content), the summary and the residual name the unread tarball, and
    the run exits 3 (some work could not be done) rather than failing whole or claiming success."""
    import io
    import tarfile

    from tests.s3proxy import CuttingProxy
    (repo / "datasets").mkdir()
    (repo / "datasets" / "local.csv").write_bytes(b"a,b\n1,2\n")
    (repo / "datasets" / "bysha.csv").write_bytes(b"s,h,a\n")
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w:gz") as tar:
        data = __import__("os").urandom(600_000)
        info = tarfile.TarInfo("datasets/remote.csv")
        info.size = len(data)
        tar.addfile(info, io.BytesIO(data))
    s3.upload(BUCKET, [("unread/scidex-host-20260315T020000.tar.gz", buf.getvalue())])
    await insert_artifacts(dsn, [
        ("u-local", "dataset", {"expected_path": "datasets/local.csv"}, None),
        ("u-remote", "dataset", {"expected_path": "datasets/remote.csv"}, None),
        ("u-sha", "dataset", {"filename": "bysha.csv",
                              "file_sha256": __import__("hashlib").sha256(b"s,h,a\n").hexdigest()}, None),
    ])
    async with CuttingProxy(s3.endpoint_url, ".tar.gz", cut_after=100_000, cuts=1000) as proxy:
        cfg = recover_config(dsn, repo, tmp_path, s3_prefix=f"s3://{BUCKET}/unread/", stream_resumes=2)
        cfg.raw["s3"]["endpoint_url"] = proxy.endpoint_url
        status, summary = await run_recover(cfg)
    assert status == 3 and summary["status"] == "finished_with_errors"
    assert proxy.cut_count == 3  # the first read and its two resumes
    [source] = [u for u in summary["unrecorded"] if u["what"] == "source"]
    assert source["source"].endswith("20260315T020000.tar.gz") and "could not be read" in source["why"]
    got = await rows_by_id(dsn)
    # the checkout's file would bind by its expected path alone, but the unread backup may hold
    # another content there: for review, not bound (a recorded sha256 would still bind)
    assert got["u-local"]["file_path"] is None and got["u-remote"]["file_path"] is None
    assert got["u-sha"]["file_path"] == "datasets/bysha.csv"
    folder = Path(cfg["report"]["dir"]) / summary["run_id"]
    residual = {r["artifact_id"]: r["failure_mode"] for r in read_csv(folder / "residual.csv")}
    assert "not read: s3://scidex/unread/scidex-host-20260315T020000.tar.gz" in residual["u-remote"]


async def test_a_plan_or_changeset_run_reads_tarballs_writes_no_manifest_and_leaves_no_staging(dsn, repo, tmp_path, s3):
    """Manifests live in the tool's schema, which a read-only run may not write: that run keeps
    them in memory, and removes its extracted copies when it ends."""
    from crawler import engine
    from pipelines.recover import RecoverJob, RecoverOptions
    scene = build_recovery_scene()
    await lay_out(scene, repo, tmp_path / "wt")
    await insert_artifacts(dsn, [(r["id"], r["artifact_type"], r["metadata"], None) for r in scene.rows])
    s3.upload(BUCKET, [(f"scene5/{t.key.rsplit('/', 1)[1]}", t.build()) for t in scene.tarballs])
    cfg = scene_config(dsn, repo, tmp_path, s3, "scene5/")
    for opts in (RecoverOptions(plan=True), RecoverOptions(changeset=tmp_path / "c.jsonl")):
        db = await engine.open_database(cfg, read_only=True)
        try:
            status, summary = await engine.run_job(cfg, db, "recover", lambda rid: RecoverJob(cfg, db, rid, opts),
                                                   record_run=False)
        finally:
            await db.close()
        assert status == 0 and summary["searched"]["tarballs"] == 2
        staging = tmp_path / "staging"
        assert not staging.exists() or not any(staging.iterdir()), list(staging.iterdir())
    lines = [json.loads(x) for x in (tmp_path / "c.jsonl").read_text().splitlines()]
    assert any(x["after"].get("metadata", {}).get("file_bind_source", "").startswith("s3://") for x in lines)
    conn = await asyncpg.connect(dsn)
    assert await conn.fetchval("select to_regclass('artifact_recovery.tarball_manifests')") is None
    await conn.close()
