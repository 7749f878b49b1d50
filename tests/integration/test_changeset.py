"""A changeset's `after` is what the database itself writes for the same change."""

from __future__ import annotations

from pathlib import Path

from crawler import engine, sink as contract
from crawler.changeset import ChangesetFile, ChangesetWriter, with_overlay
from crawler.db import Change
from crawler.sink import utcnow
from tests.harness import figure_config, insert_figures, rows_by_id


async def test_after_is_what_apply_changes_writes(dsn: str, tmp_path: Path) -> None:
    garbage = ["7", 1e19, -3.5, True, [1], {"a": 1}, None, 2.5, 0]
    await insert_figures(dsn, [(f"g{i}", {"image_fetch_attempts": v, "keep": i}, None if i % 2 else "old/path.png")
                               for i, v in enumerate(garbage)] + [("absent", {"keep": "x"}, None)])
    now = utcnow()
    changes = [contract.figure_fetched("g0", "f/g0.png", "ab" * 32, 10, "image/png", "c" * 40, now, "http://h/x"),
               contract.figure_hard_404("g1", 410, now, "http://h/y")]
    changes += [contract.figure_retryable(f"g{i}", "transient", "timeout", now, "http://h/z", now)
                for i in range(2, len(garbage))]
    changes.append(Change("absent", "transient", patch={"image_fetch_outcome": "transient"}, bump_key="image_fetch_attempts"))
    cfg = figure_config(dsn, tmp_path, 1, tmp_path)
    db = await engine.open_database(cfg)
    try:
        original = await rows_by_id(dsn)
        file = ChangesetFile(tmp_path / "c.jsonl")
        assert await ChangesetWriter(db, file).apply_changes("run", changes) == len(changes)
        assert await rows_by_id(dsn) == original  # the writer only reads
        await db.apply_changes("run", changes)
        written = await rows_by_id(dsn)
    finally:
        await db.close()
    lines = list(file.entries())
    assert len(lines) == len(changes)
    for entry in lines:
        rid = entry["artifact_id"]
        assert with_overlay(original[rid], entry["after"]) == written[rid], rid
        for k, v in entry["before"]["metadata"].items():
            assert original[rid]["metadata"].get(k) == v, (rid, k)
