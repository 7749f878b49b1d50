"""The recovery job: dataset, model and tabular_dataset rows — search everywhere once, bind only
on evidence, explain the rest.

    rows ─▶ expectations ─▶ Wanted ─┬─▶ checkout + worktrees (walked concurrently)
                                    ├─▶ checkout history (git blobs)          ─▶ candidates
                                    └─▶ the N newest S3 tarballs (streamed once; manifests)
    candidates ─▶ hash what could match ─▶ evidence ladder ─▶ binds: copy → commit (≤100) → stamp
                                                           └─▶ inventory_<type>.csv, residual.csv

Rows already bound (their file is under the root) or marked unrecoverable are counted, not
searched. RAM-only rows are marked unrecoverable. `--plan` does everything but write the
database and the repository, and writes the changes it would make to plan.csv instead.
"""

from __future__ import annotations

import asyncio
import csv
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import structlog

from crawler import evidence as ev
from crawler import files, localsearch, paths, sink as contract
from crawler.changeset import ChangesetFile, ChangesetWriter, overlay_of, with_overlay
from crawler.committer import Committer, PlacedFile, close_bounded
from crawler.config import Config
from crawler.db import Change, Database
from crawler.evidence import Candidate, Decision, Expectation, TypeRules
from crawler.git import GitError, GitRepo, History
from crawler.sink import Sink, utcnow
from crawler.unrecorded import Unrecorded
from pipelines import tarballs
from pipelines.tarballs import MemoryManifests

log = structlog.get_logger()

STATUSES = ("bound", "needs_review", "unrecoverable", "missing")


class ChangedWhileBinding(OSError):
    """A candidate's bytes differ from the ones hashed when it was chosen."""


@dataclass
class RecoverOptions:
    plan: bool = False
    approve: Path | None = None
    changeset: Path | None = None  # read-only repair: row changes go to this file (crawler/changeset.py)


@dataclass
class RowState:
    row: dict[str, Any]
    expectation: Expectation | None = None
    decision: Decision | None = None
    related: list[tuple[str, Candidate]] = field(default_factory=list)
    file_path: str | None = None


class RecoverJob:
    def __init__(self, cfg: Config, db: Database, run_id: str, opts: RecoverOptions) -> None:
        self.cfg = cfg
        self.db = db
        self.run_id = run_id
        self.opts = opts
        rec = cfg["recovery"]
        self.rec = rec
        self.rules = {t: TypeRules(tuple(v["dirs"]), tuple(v["extensions"]), v["path"]) for t, v in rec["types"].items()}
        self.root = Path(cfg["artifacts"]["root"])
        self.checkout = Path(rec["checkout"])
        self.repo = GitRepo(self.root, cfg["artifacts"]["git_timeout_s"], cfg["artifacts"]["commit_author_name"],
                            cfg["artifacts"]["commit_author_email"], cfg["artifacts"]["commit_command"],
                            cfg["artifacts"]["split_index"], cfg["artifacts"]["git_min_bytes_per_s"])
        self.history = History(GitRepo(self.checkout, cfg["artifacts"]["git_timeout_s"], "", ""))
        self.folder = Path(cfg["report"]["dir"]) / run_id
        # With a changeset the database is only read: changes go to the file, and the rows are
        # seen as the file's earlier lines left them (a rerun of the same changeset resumes).
        self.changes = (ChangesetFile(opts.changeset, repair=not opts.plan, optional=opts.plan)
                        if opts.changeset is not None else None)
        self.overlay: dict[str, dict[str, Any]] = {}
        self.sink = Sink(db, run_id, cfg["db"]["flush_rows"], cfg["db"]["flush_interval_s"],
                         outage_max_s=cfg["db"]["outage_max_s"],
                         writer=ChangesetWriter(db, self.changes, self.overlay) if self.changes is not None else None)
        # Tarball manifests live in our schema; a plan or a changeset run writes nothing there and
        # keeps this run's in memory.
        self.manifests: Any = MemoryManifests() if opts.plan or self.changes is not None else db
        # artifacts.commit_batch is the ceiling for every commit the tool makes, this job's too.
        self.committer = Committer(self.repo, self.sink, min(rec["commit_batch"], cfg["artifacts"]["commit_batch"]),
                                   cfg["artifacts"]["commit_interval_s"],
                                   run_id, self._stamp, "recovered files", cfg["artifacts"]["max_uncommitted"],
                                   cfg["artifacts"]["fsync"])
        self._stopping = False
        self.searched: dict[str, Any] = {"worktrees": 0, "tarballs": 0, "history": False}
        self.unrecorded = Unrecorded()
        self.planned: list[dict[str, Any]] = []
        self.phase = "starting"
        self.rows_total = 0
        self.rows_decided = 0
        self._search_task: asyncio.Task[list[Candidate]] | None = None

    def stop(self) -> None:
        """Stop soon: a search under way (a tarball being streamed) is cancelled, binds stop
        between rows; what is placed is still committed and stamped. Run again to resume: a
        tarball cut off is read again from its start."""
        self._stopping = True
        if self._search_task is not None:
            self._search_task.cancel()

    def abort(self) -> None:
        self.stop()

    async def run(self, drain_timeout_s: float) -> dict[str, Any]:
        if not self.opts.plan:
            await self.repo.check()
        ticker = asyncio.create_task(self._progress(), name="progress")
        try:
            return await self._run()
        finally:
            ticker.cancel()
            if self.changes is not None:
                self.changes.release()
            if isinstance(self.manifests, MemoryManifests):
                await asyncio.to_thread(self.manifests.remove_staging, Path(self.rec["staging_dir"]).resolve())

    async def _progress(self) -> None:
        while True:
            await asyncio.sleep(self.cfg["report"]["progress_interval_s"])
            log.info("progress", **self.progress())

    def progress(self) -> dict[str, Any]:
        """Where the run stands: its phase, what it searched, the tarball being read (bytes read
        of its size), rows decided and bound so far."""
        return {"phase": self.phase, **{k: v for k, v in self.searched.items()},
                "rows": self.rows_total, "decided": self.rows_decided,
                "commits": self.committer.commits, "commit_pending": self.committer.pending}

    async def _run(self) -> dict[str, Any]:
        self.phase = "loading rows"
        states = await self._load()
        self.rows_total = len(states)
        self.rows_decided = sum(1 for s in states.values() if s.decision is not None)
        self.phase = "searching"
        todo = [s for s in states.values() if s.expectation is not None and s.decision is None]
        self._search_task = asyncio.create_task(self._search([s.expectation for s in todo if s.expectation]))
        try:
            candidates = await self._search_task
        except asyncio.CancelledError:
            if not self._stopping:
                raise
            log.warning("recover.search_cut_off", note="stopped while searching; nothing was bound")
            return {**self._summary(states), "interrupted": True}
        finally:
            self._search_task = None
        if self._stopping:
            return {**self._summary(states), "interrupted": True}
        self.phase = "hashing candidates"
        await self._hash(candidates)
        self.phase = "deciding and binding"
        decisions = ev.decide_all([s.expectation for s in todo if s.expectation], candidates,
                                  await self._bound_contents(states))
        unread = ", ".join(u["source"] for u in self.searched.get("unread", []))
        for s in todo:
            assert s.expectation is not None
            s.decision = decisions[s.row["id"]]
            s.related = [(r, c) for c in candidates if (r := ev.relevant(s.expectation, c))]
            d = s.decision
            if unread and d.status == "bound" and d.confidence in ("high", "medium"):
                # Those rungs need the one content among every location searched; a backup that
                # could not be read may hold another. Only a recorded sha256 still binds.
                s.decision = ev.Decision("needs_review", d.confidence, None, d.evidence,
                                         reason=f"would bind ({d.confidence}), but {unread} could not be read "
                                                "and may hold another content; run again once it can be")
        self._apply_approvals(states)
        if not self.opts.plan:
            self.sink.start()
            self.committer.start()
        try:
            self.rows_decided = len(states)
            for s in states.values():
                if self._stopping:
                    break
                try:
                    await self._settle(s)
                except (OSError, GitError) as exc:  # this row's trouble, not the run's
                    log.error("row.bind_failed", artifact_id=s.row["id"], error=f"{type(exc).__name__}: {exc}")
                    self.unrecorded.add("bind", f"{type(exc).__name__}: {exc}", [s.row["id"]])
                    assert s.decision is not None
                    s.decision = Decision("needs_review", s.decision.confidence, None, s.decision.evidence,
                                          reason=f"binding failed: {exc}")
                    s.file_path = None
        finally:
            if not self.opts.plan:
                await self._bounded_close()
        self._write_reports(states, await self.db.latest_references(list(states)))
        return self._summary(states)

    async def _bounded_close(self) -> None:
        """Commit and write what is left, bounded: a database or git that never answers must not
        hold the run for ever (what is left is repaired by the next run)."""
        bound = 2 * self.cfg["artifacts"]["git_timeout_s"] + self.cfg["db"]["outage_max_s"]
        for name, exc in await close_bounded(self.committer, self.sink, bound, each=True):
            self.unrecorded.add("database" if name == "sink" else "commit",
                                f"closing the {name} failed: {type(exc).__name__}: {exc}",
                                count=self.sink.pending + self.committer.pending)

    # -- rows and expectations ------------------------------------------------------------------
    async def _load(self) -> dict[str, RowState]:
        rows = await self.db.recovery_rows(list(self.rules), self.cfg["db"]["page_size"])
        if self.changes is not None:
            self.overlay.update(overlay_of(self.changes, {r["id"] for r in rows}))
            rows = [with_overlay(r, self.overlay.get(r["id"])) for r in rows]
        # A recorded path counts only inside the root, and not through a link: `/etc/hosts` or
        # `../x` is no row's file.
        recorded = {r["id"]: paths.recorded(self.root, r["file_path"]) for r in rows}
        present = await files.existing(self.root, [p for p in recorded.values() if p is not None])
        states: dict[str, RowState] = {}
        for r in rows:
            s = RowState(r)
            states[r["id"]] = s
            meta = r["metadata"] if isinstance(r["metadata"], dict) else {}
            if recorded[r["id"]] in present:
                s.decision = Decision("bound", meta.get("file_bind_confidence"), reason="already bound")
                s.file_path = r["file_path"]
                continue
            if meta.get("file_unrecoverable") is True:
                s.decision = Decision("unrecoverable", reason=str(meta.get("file_unrecoverable_reason") or "marked unrecoverable"))
                continue
            s.expectation = ev.expect(r["id"], r["artifact_type"], r["metadata"], self.rules[r["artifact_type"]],
                                      self.rec["ram_only_creators"])
            for note in s.expectation.notes:
                log.warning("row.bad_metadata", artifact_id=r["id"], error=note)
        log.info("recover.rows", rows=len(rows), to_search=sum(1 for s in states.values() if s.decision is None),
                 per_type=dict(Counter(r["artifact_type"] for r in rows)))
        return states

    # -- search ----------------------------------------------------------------------------------
    async def _search(self, expectations: list[Expectation]) -> list[Candidate]:
        searchable = [e for e in expectations if not e.lost_reason]
        if not searchable:
            return []
        wanted = localsearch.Wanted.of(searchable)
        worktrees = localsearch.find_worktrees(self.rec["worktrees"], self.checkout)
        self.searched["worktrees"] = len(worktrees)
        jobs: list[Any] = [localsearch.walk_locations(self.checkout, worktrees, wanted)]
        if self.rec["git_history"]:
            jobs.append(localsearch.history_candidates(self.history, wanted))
            self.searched["history"] = True
        jobs.append(tarballs.search(self.cfg, self.manifests, self.run_id, wanted, self.searched))
        found = await asyncio.gather(*jobs)
        candidates = [c for batch in found for c in batch]
        for source in self.searched.get("unread", []):
            self.unrecorded.add("source", f"could not be read: {source['error']}", count=1, source=source["source"])
        log.info("recover.searched", candidates=len(candidates), worktrees=len(worktrees),
                 tarballs=self.searched["tarballs"], history=self.searched["history"])
        return candidates

    async def _bound_contents(self, states: dict[str, RowState]) -> list[tuple[str, str, str]]:
        """(id, type, sha256) of rows that already have their file: their content is claimed."""
        out = []
        for s in states.values():
            if s.decision is not None and s.decision.status == "bound" and s.file_path:
                meta = s.row["metadata"] if isinstance(s.row["metadata"], dict) else {}
                sha = ev.normalise_sha256(meta.get("file_sha256"))
                if sha is None:
                    try:
                        sha, _, _ = await files.hash_file(self.root / s.file_path)
                    except OSError:
                        continue
                out.append((s.row["id"], s.row["artifact_type"], sha))
        return out

    async def _hash(self, candidates: list[Candidate]) -> None:
        gate = asyncio.Semaphore(4)  # a few files at a time: disks, not cores, bound hashing

        async def one(c: Candidate) -> None:
            async with gate:
                try:
                    await localsearch.hash_candidate(c, self.history)
                except OSError as exc:
                    log.warning("candidate.unreadable", candidate=c.ref, error=str(exc))
        await asyncio.gather(*(one(c) for c in candidates))

    def _apply_approvals(self, states: dict[str, RowState]) -> None:
        if self.opts.approve is None:
            return
        with open(self.opts.approve, newline="") as fh:
            for line_no, rec in enumerate(csv.DictReader(fh), start=2):
                rid, ref = (rec.get("artifact_id") or "").strip(), (rec.get("candidate_location") or "").strip()
                s = states.get(rid)
                if s is None or s.expectation is None or s.decision is None or s.decision.status == "bound":
                    log.warning("approval.ignored", line=line_no, artifact_id=rid,
                                error="no such row awaiting a file")
                    continue
                approved = ev.approve(s.expectation, s.related, ref)
                if approved is None:
                    log.warning("approval.ignored", line=line_no, artifact_id=rid, candidate=ref,
                                error="the row has no such candidate (or it contradicts the recorded sha256)")
                    continue
                s.decision = approved
                log.info("approval.accepted", artifact_id=rid, candidate=ref)

    # -- writing ---------------------------------------------------------------------------------
    async def _settle(self, s: RowState) -> None:
        d = s.decision
        rid = s.row["id"]
        if d is None or s.expectation is None:
            return  # counted as it was found (already bound or unrecoverable)
        if d.status == "unrecoverable":
            self._change(contract.file_unrecoverable(rid, d.reason))
            return
        if d.status != "bound" or d.chosen is None:
            return
        c = d.chosen
        try:
            rel = await self._destination(s.expectation, c)
        except paths.PathError as exc:
            s.decision = Decision("needs_review", d.confidence, None, d.evidence, reason=str(exc))
            return
        s.file_path = rel
        log.info("row.bind", artifact_id=rid, source=c.where, path=rel, confidence=d.confidence, plan=self.opts.plan)
        if self.opts.plan:
            self.planned.append({"artifact_id": rid, "file_path": rel, "source": c.ref, "confidence": d.confidence,
                                 "sha256": c.sha256, "size": c.size})
            return
        target = self.root / rel
        if not (target.is_file() and target.resolve() == Path(str(c.handle)).resolve()):
            temp = files.TempFile(target.parent, paths.safe_segment(rid))
            await asyncio.to_thread(target.parent.mkdir, parents=True, exist_ok=True)
            try:
                copied = await localsearch.copy_candidate(c, self.history, temp.path)
                if copied != c.sha256:
                    # The source changed after it was hashed: what was decided on is not what
                    # would be bound. Nothing is placed; a human (or the next run) looks again.
                    raise ChangedWhileBinding(f"{c.ref} changed since it was hashed (sha256 {copied[:12]}… "
                                              f"instead of {str(c.sha256)[:12]}…); not bound")
                await files.place(temp.path, target)
            except BaseException:
                await asyncio.to_thread(temp.path.unlink, True)
                raise
        await self.committer.add(PlacedFile(rid, rel, c.sha256 or "", c.size, "", utcnow(), c.where,
                                      {"confidence": d.confidence, "approved": d.reason == "approved by an operator"}))

    async def _destination(self, e: Expectation, c: Candidate) -> str:
        """expected_path when the row names one, else the type's template; never over other content."""
        name = c.basename if not e.basenames else sorted(e.basenames)[0]
        ext = ev.extension_of(name, e.extensions)
        choices = list(e.expected_paths) or [self.rules[e.artifact_type].path.format(
            artifact_id=paths.unique_segment(e.artifact_id), basename=name, ext=ext)]
        choices.append(f"{choices[0].rsplit('/', 1)[0]}/{paths.unique_segment(e.artifact_id)}/{name}")
        for choice in choices:
            rel = paths.contain(self.root, choice)
            target = self.root / rel
            if not target.exists():
                return rel
            sha, _, _ = await files.hash_file(target)
            if sha == c.sha256:
                return rel
        raise paths.PathError(f"{choices[0]} already holds other content")

    def _change(self, change: Change) -> None:
        if self.opts.plan:
            self.planned.append({"artifact_id": change.artifact_id, "change": change.outcome, **change.patch})
        else:
            self.sink.record(change)

    @staticmethod
    def _stamp(p: PlacedFile, commit: str) -> Change:
        extra = p.extra or {}
        return contract.file_bound(p.artifact_id, p.rel_path, p.sha256, p.size, p.source,
                                   extra.get("confidence", "medium"), commit, p.fetched_at, extra.get("approved", False))

    # -- reports -----------------------------------------------------------------------------------
    def _write_reports(self, states: dict[str, RowState], refs: dict[str, dict[str, Any]]) -> None:
        self.folder.mkdir(parents=True, exist_ok=True)
        by_type: dict[str, list[RowState]] = {t: [] for t in self.rules}
        for s in states.values():
            by_type[s.row["artifact_type"]].append(s)
        for t, rows in by_type.items():
            with open(self.folder / f"inventory_{t}.csv", "w", newline="") as fh:
                w = csv.writer(fh)
                w.writerow(["artifact_id", "expected_basenames", "expected_paths", "recorded_sha256", "recorded_size",
                            "candidates", "confidence", "status", "bind_source", "file_path", "reason"])
                for s in rows:
                    d = s.decision
                    # Rows settled before this run (bound, or marked unrecoverable) were not
                    # searched; the inventory still names what each expects.
                    e = s.expectation or ev.expect(s.row["id"], s.row["artifact_type"], s.row["metadata"],
                                                   self.rules[s.row["artifact_type"]], self.rec["ram_only_creators"])
                    cands = ";".join(f"{c.ref}|{c.size}|{c.sha256 or ''}|{rung}" for rung, c in s.related)
                    w.writerow([s.row["id"], " ".join(sorted(e.basenames)) if e else "",
                                " ".join(e.expected_paths) if e else "", (e.sha256 or "") if e else "",
                                "" if not e or e.size is None else e.size, cands, (d.confidence or "") if d else "",
                                self._status(s), d.chosen.ref if d and d.chosen else "", s.file_path or "",
                                d.reason if d else ""])
        with open(self.folder / "residual.csv", "w", newline="") as fh:
            w = csv.writer(fh)
            w.writerow(["artifact_id", "artifact_type", "failure_mode"])
            for s in states.values():
                if self._status(s) != "bound":
                    w.writerow([s.row["id"], s.row["artifact_type"], self._failure_mode(s, refs.get(s.row["id"]))])
        if self.opts.plan:
            with open(self.folder / "plan.csv", "w", newline="") as fh:
                keys = sorted({k for p in self.planned for k in p})
                w = csv.DictWriter(fh, fieldnames=keys)
                w.writeheader()
                w.writerows(self.planned)

    def _status(self, s: RowState) -> str:
        d = s.decision
        if d is not None and d.status == "bound" and s.row["id"] in self.committer.failed_ids:
            return "needs_review"  # placed but not committed, so not stamped: a human should look
        return "missing" if d is None else d.status

    def _failure_mode(self, s: RowState, ref: dict[str, Any] | None) -> str:
        e, d = s.expectation, s.decision
        expected = (" or ".join(e.expected_paths or sorted(e.basenames)) if e and (e.expected_paths or e.basenames)
                    else (f"a file with sha256 {e.sha256[:12]}…" if e and e.sha256 else "a file the row does not name"))
        where = ["checkout"]
        if self.searched["history"]:
            where.append("its history")
        where.append(f"{self.searched['worktrees']} worktree{'s' if self.searched['worktrees'] != 1 else ''}")
        where.append(f"{self.searched['tarballs']} tarball{'s' if self.searched['tarballs'] != 1 else ''}")
        searched = ", ".join(where[:-1]) + " or " + where[-1]
        unread = self.searched.get("unread", [])
        if unread:
            searched += "; not read: " + ", ".join(f"{u['source']} ({u['error'][:120]})" for u in unread)
        status = self._status(s)
        if status == "unrecoverable":
            text = f"lost for good: {d.reason if d else ''}"
        elif status == "needs_review":
            n = len(s.related)
            text = f"expected {expected}; {n} candidate{'s' if n != 1 else ''} found but none bound: {d.reason if d else ''}"
        else:
            text = f"expected {expected}; not in {searched}"
        if ref:
            text += (f"; last referenced {ref['referenced_at']:%Y-%m-%d} in {ref['source_kind']} {ref['source_id']}")
        return text

    def _summary(self, states: dict[str, RowState]) -> dict[str, Any]:
        per_type: dict[str, dict[str, int]] = {t: {"rows": 0, **{k: 0 for k in STATUSES}} for t in self.rules}
        for s in states.values():
            c = per_type[s.row["artifact_type"]]
            c["rows"] += 1
            c[self._status(s)] += 1
        confidence = Counter(s.decision.confidence for s in states.values()
                             if s.decision and s.decision.status == "bound" and s.file_path and s.decision.confidence)
        return {"per_type": per_type, "plan": self.opts.plan, "confidence": dict(confidence),
                **({"changeset": str(self.changes.path), "changeset_lines": self.changes.lines}
                   if self.changes is not None else {}),
                "searched": self.searched, "commits": self.committer.commits,
                "commit_failed_files": self.committer.failed_files, "interrupted": self._stopping,
                # Work attempted but not recorded (exit 3): binds, commits, database writes, sources.
                "unrecorded": (self.unrecorded.as_list() + self.committer.unrecorded.as_list()
                               + self.sink.unrecorded.as_list())}
