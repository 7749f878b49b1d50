"""Read-only repair, second half: `apply` a reviewed changeset, `undo` a run.

    changeset lines ─▶ read the rows ─▶ as `after` already: skip (applying twice changes nothing)
                                     ├▶ as `before`: Sink (journalled, checked again in the UPDATE)
                                     └▶ otherwise: refused and listed (changed since)

    journal of RUN_ID (and of applies of its changeset) ─▶ per row: the values before its first
    change, those after its last ─▶ row as after: restore (journalled: an undo can be undone)
                                   ├▶ row as before: already undone, skip
                                   └▶ otherwise: refused and listed (changed since)

Both are runs of their own (run id, log, report, journal); `--dry-run` reads only and says what
would happen. Neither knows the contract's metadata keys: they move the values a changeset or
the journal holds, whatever they are.
"""

from __future__ import annotations

import asyncio
import csv
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import structlog

from crawler.changeset import ChangesetFile, differs
from crawler.config import Config, ConfigError
from crawler.db import Change, Database
from crawler.sink import Sink
from crawler.unrecorded import Unrecorded

log = structlog.get_logger()

CHUNK = 500          # rows read per round trip while checking
LISTED = 1000        # refused rows named in the summary (all are in refused.csv)


@dataclass
class Outcome:
    """What an apply or undo did, for the summary."""

    done: int = 0                  # rows changed (or, dry run, that would be)
    already: int = 0               # rows that already held the target values
    refused: list[dict[str, Any]] = field(default_factory=list)
    missing: list[str] = field(default_factory=list)

    @property
    def refused_count(self) -> int:
        return len(self.refused)

    def refuse(self, artifact_id: str, why: str, keys: list[str]) -> None:
        self.refused.append({"artifact_id": artifact_id, "why": why, "differs": keys})


class _RepairJob:
    """Shared by apply and undo: a stop waits for nothing (the sink writes what it holds)."""

    def __init__(self, cfg: Config, db: Database, run_id: str, dry_run: bool) -> None:
        self.cfg, self.db, self.run_id, self.dry_run = cfg, db, run_id, dry_run
        self.sink = Sink(db, run_id, cfg["db"]["flush_rows"], cfg["db"]["flush_interval_s"],
                         outage_max_s=cfg["db"]["outage_max_s"])
        self.outcome = Outcome()
        self.extra_unrecorded = Unrecorded()
        self._stopping = False
        self.folder = Path(cfg["report"]["dir"]) / run_id

    def stop(self) -> None:
        self._stopping = True

    def abort(self) -> None:
        self._stopping = True

    async def _write(self, planned: list[tuple[Change, dict[str, Any]]]) -> None:
        """Send the changes (each with its expectation) and check what they left: a row changed
        by someone between our read and our write was skipped by the UPDATE and is refused."""
        if self.dry_run or not planned:
            self.outcome.done += len(planned)
            return
        for change, _target in planned:
            self.sink.record(change)
        await self.sink.flush()
        now = await self.db.rows_by_id([c.artifact_id for c, _ in planned])
        for change, target in planned:
            row = now.get(change.artifact_id)
            keys = differs(row["file_path"], row["metadata"], target) if row else ["row"]
            if keys:
                self.outcome.refuse(change.artifact_id, "changed while this run wrote it", keys)
            else:
                self.outcome.done += 1

    def _report(self, extra: dict[str, Any]) -> dict[str, Any]:
        o = self.outcome
        self.folder.mkdir(parents=True, exist_ok=True)
        if o.refused:
            with open(self.folder / "refused.csv", "w", newline="") as fh:
                w = csv.writer(fh)
                w.writerow(["artifact_id", "why", "differs"])
                for r in o.refused:
                    w.writerow([r["artifact_id"], r["why"], " ".join(r["differs"])])
        unrecorded = Unrecorded()
        for r in o.refused:
            unrecorded.add("refused", f"{r['why']} ({', '.join(r['differs'][:3])})", [r["artifact_id"]])
        if o.missing:
            unrecorded.add("refused", "no such row in the table", o.missing)
        return {"dry_run": self.dry_run, "changed": o.done, "already": o.already, "refused": o.refused_count,
                "refused_rows": o.refused[:LISTED], "missing_rows": o.missing[:LISTED],
                "unrecorded": unrecorded.as_list() + self.sink.unrecorded.as_list() + self.extra_unrecorded.as_list(),
                "interrupted": self._stopping, **extra}


class ApplyJob(_RepairJob):
    """`crawler apply FILE`: a reviewed changeset, written as the run itself would have."""

    def __init__(self, cfg: Config, db: Database, run_id: str, file: ChangesetFile, dry_run: bool) -> None:
        super().__init__(cfg, db, run_id, dry_run)
        self.path = file.path
        self.file = file
        self.lines = 0

    async def run(self, drain_timeout_s: float) -> dict[str, Any]:
        self.sink.start()
        try:
            chunk: list[dict[str, Any]] = []
            ids: set[str] = set()
            for entry in self.file.entries():
                self.lines += 1
                # A row the chunk already changes (a changeset that changed it twice): the chunk
                # is written first, so this line finds the row as the line before left it.
                if entry["artifact_id"] in ids or len(chunk) >= CHUNK:
                    await self._chunk(chunk)
                    chunk, ids = [], set()
                    if self._stopping:
                        break
                chunk.append(entry)
                ids.add(entry["artifact_id"])
            if chunk and not self._stopping:
                await self._chunk(chunk)
        finally:
            await asyncio.wait_for(self.sink.close(), max(drain_timeout_s, self.cfg["db"]["outage_max_s"]))
        log.info("apply.done", changeset=str(self.path), lines=self.lines, applied=self.outcome.done,
                 already=self.outcome.already, refused=self.outcome.refused_count, dry_run=self.dry_run)
        return self._report({"changeset": str(self.path), "lines": self.lines})

    async def _chunk(self, entries: list[dict[str, Any]]) -> None:
        rows = await self.db.rows_by_id(sorted({e["artifact_id"] for e in entries}))
        planned: list[tuple[Change, dict[str, Any]]] = []
        for e in entries:
            rid = e["artifact_id"]
            row = rows.get(rid)
            if row is None:
                self.outcome.missing.append(rid)
                continue
            if not differs(row["file_path"], row["metadata"], e["after"]):
                self.outcome.already += 1
                continue
            keys = differs(row["file_path"], row["metadata"], e["before"])
            if keys:
                self.outcome.refuse(rid, "changed since the changeset was made", keys)
                log.warning("apply.refused", artifact_id=rid, differs=keys)
                continue
            after = e["after"]
            planned.append((Change(
                rid, str(e.get("outcome") or "apply"), patch=dict(after.get("metadata", {})),
                file_path=after.get("file_path"), set_file_path="file_path" in after, expect=e["before"],
                detail={"from_run": e.get("run_id"), "change_id": e.get("change_id"), "changeset": self.path.name}),
                after))
        await self._write(planned)


ABSENT = object()


class UndoJob(_RepairJob):
    """`crawler undo RUN_ID`: every artifacts-table value that run wrote (directly, or by apply
    of its changeset), back to what it was before the run."""

    def __init__(self, cfg: Config, db: Database, run_id: str, target: str, dry_run: bool,
                 revert_commits: bool = False) -> None:
        super().__init__(cfg, db, run_id, dry_run)
        self.target = target
        self.revert_commits = revert_commits
        self.restored_paths: list[str] = []
        self.restoring: set[str] = set()  # rows restored now, or found as before the run already
        self.revert_commit: str | None = None
        self.revert_error: str | None = None

    async def run(self, drain_timeout_s: float) -> dict[str, Any]:
        if not await self.db.has_state():
            raise ConfigError(f"no run {self.target}: the database holds no journal (db.state_schema)")
        journal = await self.db.run_journal(self.target)
        info = await self.db.run_info(self.target)
        if info is None and not journal:
            raise ConfigError(f"no run {self.target} in the journal")
        net = _net_changes(journal)
        self.sink.start()
        try:
            ids = list(net)
            for i in range(0, len(ids), CHUNK):
                if self._stopping:
                    break
                await self._chunk({k: net[k] for k in ids[i:i + CHUNK]})
        finally:
            await asyncio.wait_for(self.sink.close(), max(drain_timeout_s, self.cfg["db"]["outage_max_s"]))
        if self.revert_commits and self.restored_paths and not self._stopping:
            await self._revert_commits()
        log.info("undo.done", undone_run=self.target, rows=len(net), restored=self.outcome.done,
                 already=self.outcome.already, refused=self.outcome.refused_count, dry_run=self.dry_run)
        if self.revert_error is not None:
            self.extra_unrecorded.add("commit", f"taking the run's files off the branch failed: {self.revert_error}",
                                      count=len(self.restored_paths))
        return self._report({"undone_run": self.target, "rows": len(net), "journal_entries": len(journal),
                             "files_taken_off": len(self.restored_paths) if self.revert_commits else 0,
                             "revert_commit": self.revert_commit})

    async def _chunk(self, net: dict[str, dict[str, Any]]) -> None:
        rows = await self.db.rows_by_id(list(net))
        planned: list[tuple[Change, dict[str, Any]]] = []
        for rid, n in net.items():
            row = rows.get(rid)
            if row is None:
                self.outcome.missing.append(rid)
                continue
            after, before = n["after_values"], n["before_values"]
            # The run's file is taken off the branch (--revert-commits) for a row restored now and
            # for one found as before the run already (an earlier undo, or one whose commit failed).
            if n["fp_touched"] and n["fp_after"] and n["fp_after"] != n["fp_before"]:
                self.restored_paths.append(n["fp_after"])
            if differs(row["file_path"], row["metadata"], after):
                if not differs(row["file_path"], row["metadata"], before):
                    self.outcome.already += 1
                    self.restoring.add(rid)
                    continue
                keys = differs(row["file_path"], row["metadata"], after)
                self.outcome.refuse(rid, "changed since the run", keys)
                log.warning("undo.refused", artifact_id=rid, differs=keys)
                continue
            patch = {k: v for k, v in n["before"].items() if v is not ABSENT}
            unset = tuple(k for k, v in n["before"].items() if v is ABSENT)
            planned.append((Change(rid, "undo", patch=patch, unset=unset, file_path=n["fp_before"],
                                   set_file_path=n["fp_touched"], expect=after,
                                   detail={"undoes": self.target}), before))
            self.restoring.add(rid)
        await self._write(planned)

    async def _revert_commits(self) -> None:
        """One commit taking the run's files off the branch (history keeps them), leaving any
        that another row still names."""
        from crawler.git import GitError, GitRepo
        named = await self.db.rows_with_file_paths(self.restored_paths)
        # A file stays if a row other than those this undo restores names it (after a dry run's
        # check, the rows it would restore still name theirs).
        paths = sorted(p for p in set(self.restored_paths) if not (named.get(p, set()) - self.restoring))
        self.restored_paths = paths
        if self.dry_run or not paths:
            return
        a = self.cfg["artifacts"]
        repo = GitRepo(Path(a["root"]), a["git_timeout_s"], a["commit_author_name"], a["commit_author_email"],
                       "", a["split_index"], a["git_min_bytes_per_s"])
        try:
            await repo.check()
            self.revert_commit = await repo.remove_paths(paths, f"crawler: undo {self.target} ({len(paths)} files)",
                                                         a["commit_batch"])
        except GitError as exc:  # the rows are restored; the same undo again takes the files off
            self.revert_error = str(exc)
            log.error("undo.revert_failed", files=len(paths), error=str(exc),
                      note="the rows are restored; run the same undo with --revert-commits again")
            return
        finally:
            await repo.close()
        log.info("undo.files_taken_off", files=len(paths), commit=self.revert_commit)


def _net_changes(journal: list[dict[str, Any]]) -> dict[str, dict[str, Any]]:
    """Per row, from its journal entries (oldest first): each key's value before the first
    change that touched it and after the last, and the same for file_path."""
    net: dict[str, dict[str, Any]] = {}
    for j in journal:
        n = net.setdefault(j["artifact_id"], {"before": {}, "after": {}, "fp_touched": False,
                                               "fp_before": None, "fp_after": None})
        for k in set(j["before_metadata"]) | set(j["after_metadata"]):
            if k not in n["before"]:
                n["before"][k] = j["before_metadata"].get(k, ABSENT)
            n["after"][k] = j["after_metadata"].get(k, ABSENT)
        if j["before_file_path"] != j["after_file_path"]:
            if not n["fp_touched"]:
                n["fp_touched"], n["fp_before"] = True, j["before_file_path"]
            n["fp_after"] = j["after_file_path"]
    for n in net.values():
        n["after_values"] = _values(n["after"], n["fp_touched"], n["fp_after"])
        n["before_values"] = _values(n["before"], n["fp_touched"], n["fp_before"])
    return net


def _values(meta: dict[str, Any], fp_touched: bool, fp: str | None) -> dict[str, Any]:
    out: dict[str, Any] = {"metadata": {k: (None if v is ABSENT else v) for k, v in meta.items()}}
    if fp_touched:
        out["file_path"] = fp
    return out
