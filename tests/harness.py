"""Helpers shared by the integration and acceptance tests: config trees, rows, runs, git."""

from __future__ import annotations

import json
import subprocess
from pathlib import Path
from typing import Any

import asyncpg

from crawler import config
from crawler.config import Config

SIM_HOSTS = ("europepmc.org", "www.ebi.ac.uk", "www.ncbi.nlm.nih.gov", "pmc.ncbi.nlm.nih.gov",
             "cdn.example.com", "media.example.net", "localhost")


def url(host: str, path: str) -> str:
    return f"http://{host}{path}"


def figure_tree(dsn: str, root: Path, port: int, tmp: Path, **sections: dict[str, Any]) -> dict[str, Any]:
    """A config tree for tests: fast, small budgets, every simulated host mapped to the simulator."""
    tree: dict[str, Any] = {
        "db": {"dsn": dsn, "flush_interval_s": 0.05},
        "artifacts": {"root": str(root), "commit_interval_s": 0.2, "fsync": False},
        "http": {"timeout_s": 5, "connect_timeout_s": 2, "max_retries": 1, "backoff_base_s": 0.05,
                 "backoff_max_s": 0.1, "rate_guard_s": 0.002,
                 "connect_to": {f"{h}:80": f"127.0.0.1:{port}" for h in SIM_HOSTS if h != "localhost"}},
        "budgets": {"default": {"max_inflight": 4, "rate_per_s": 200.0},
                    "europepmc": {"max_inflight": 4, "rate_per_s": 200.0},
                    "pmc": {"max_inflight": 4, "rate_per_s": 200.0}},
        "report": {"dir": str(tmp / "reports"), "progress_interval_s": 0.5, "console": False},
        "run": {"drain_timeout_s": 5},
    }
    for name, values in sections.items():
        for key, value in values.items():
            if isinstance(value, dict) and isinstance(tree.get(name, {}).get(key), dict):
                tree[name][key].update(value)
            else:
                tree.setdefault(name, {})[key] = value
    return tree


def figure_config(*args: Any, **kwargs: Any) -> Config:
    return config.from_tree(figure_tree(*args, **kwargs))


async def insert_figures(dsn: str, rows: list[tuple[str, dict[str, Any] | Any, str | None]]) -> None:
    """rows: (id, metadata, file_path)."""
    conn = await asyncpg.connect(dsn)
    try:
        await conn.executemany(
            "insert into artifacts (id, artifact_type, title, file_path, metadata) values ($1, 'paper_figure', $1, $3, $2::jsonb)",
            [(i, json.dumps(m), fp) for i, m, fp in rows])
    finally:
        await conn.close()


async def rows_by_id(dsn: str) -> dict[str, dict[str, Any]]:
    conn = await asyncpg.connect(dsn)
    try:
        return {r["id"]: {"file_path": r["file_path"], "metadata": json.loads(r["metadata"])}
                for r in await conn.fetch("select id, file_path, metadata from artifacts")}
    finally:
        await conn.close()


async def run_figures(cfg: Config, **opts: Any) -> tuple[int, dict[str, Any]]:
    from crawler import engine
    from pipelines.figures import FigureJob, FigureOptions
    db = await engine.open_database(cfg)
    try:
        return await engine.run_job(cfg, db, "figures", lambda rid: FigureJob(cfg, db, rid, FigureOptions(**opts)))
    finally:
        await db.close()


def git(root: Path, *args: str) -> str:
    return subprocess.run(["git", *args], cwd=root, check=True, capture_output=True, text=True).stdout.rstrip("\n")


def commits_by_tool(root: Path) -> list[list[str]]:
    """Files of each commit the tool made, oldest first."""
    shas = git(root, "log", "--reverse", "--format=%H", "--author=crawler").split()
    return [git(root, "show", "--name-only", "--format=", sha).split() for sha in shas]


to_toml = config.to_toml  # tests write CLI config files with the same writer as the bench


async def insert_artifacts(dsn: str, rows: list[tuple[str, str, dict[str, Any] | Any, str | None]]) -> None:
    """rows: (id, artifact_type, metadata, file_path)."""
    conn = await asyncpg.connect(dsn)
    try:
        await conn.executemany(
            "insert into artifacts (id, artifact_type, title, file_path, metadata) values ($1, $2, $1, $4, $3::jsonb)",
            [(i, t, json.dumps(m), fp) for i, t, m, fp in rows])
    finally:
        await conn.close()


def recover_config(dsn: str, root: Path, tmp: Path, **recovery: Any) -> Config:
    tree = {
        "db": {"dsn": dsn, "flush_interval_s": 0.05},
        "artifacts": {"root": str(root), "commit_interval_s": 0.2, "fsync": False},
        "recovery": {"checkout": str(root), "worktrees": [str(tmp / "wt" / "*" / "data" / "scidex-artifacts")],
                     "s3_prefix": "", "staging_dir": str(tmp / "staging"), **recovery},
        "report": {"dir": str(tmp / "reports"), "console": False},
    }
    return config.from_tree(tree)


async def run_recover(cfg: Config, **opts: Any) -> tuple[int, dict[str, Any]]:
    from crawler import engine
    from pipelines.recover import RecoverJob, RecoverOptions
    db = await engine.open_database(cfg)
    try:
        return await engine.run_job(cfg, db, "recover", lambda rid: RecoverJob(cfg, db, rid, RecoverOptions(**opts)))
    finally:
        await db.close()


def read_csv(path: Path) -> list[dict[str, str]]:
    import csv
    with open(path, newline="") as fh:
        return list(csv.DictReader(fh))
