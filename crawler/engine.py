"""A run's life: id, log, database bookkeeping, signals, the job, the report, the exit status.

    run.start ─▶ job.run() ─▶ (SIGINT/SIGTERM: job.stop(), drain ≤ drain_timeout_s;
                 │             a second signal: job.abort()) ─▶ summary ─▶ run.finish ─▶ exit
Exit statuses follow CONTRACT.md §2: 0 finished with everything attempted recorded; 3 finished,
but some work could not be recorded (the summary's `unrecorded` says what and why); 130
interrupted (run again to resume).
"""

from __future__ import annotations

import asyncio
import os
import secrets
import signal
import sys
import time
from collections.abc import Awaitable, Callable
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, Protocol

import structlog

from . import logs, native, redact, report
from . import progress as progress_display
from .config import Config
from .db import Database, is_connection_error
from .sink import BACKOFF_FIRST_S, BACKOFF_MAX_S, iso, utcnow

log = structlog.get_logger()

EXIT_OK, EXIT_FAILED, EXIT_USAGE, EXIT_UNRECORDED, EXIT_INTERRUPTED = 0, 1, 2, 3, 130
EXIT_FOR = {"finished": EXIT_OK, "finished_with_errors": EXIT_UNRECORDED, "interrupted": EXIT_INTERRUPTED,
            "failed": EXIT_FAILED}


class Job(Protocol):
    def stop(self) -> None: ...
    def abort(self) -> None: ...
    async def run(self, drain_timeout_s: float) -> dict[str, Any]: ...


def new_run_id(command: str) -> str:
    return f"{datetime.now(UTC):%Y%m%dT%H%M%S}Z-{command}-{secrets.token_hex(3)}"


async def open_database(cfg: Config, read_only: bool = False) -> Database:
    """The database, its tool schema migrated; `read_only`: only read, in read-only
    transactions, and nothing created (a plan, a changeset run, a dry run)."""
    db = await Database.connect(cfg["db"]["dsn"], cfg["db"]["artifacts_table"], cfg["db"]["state_schema"],
                                cfg["db"]["connect_timeout_s"], statement_timeout_s=cfg["db"]["statement_timeout_s"],
                                lock_timeout_s=cfg["db"]["lock_timeout_s"],
                                idle_in_transaction_timeout_s=cfg["db"]["idle_in_transaction_timeout_s"],
                                read_only=read_only)
    try:
        await db.prepare()
    except BaseException:
        await db.close()
        raise
    return db


async def run_job(cfg: Config, db: Database, command: str,
                  make_job: Callable[[str], Job], verbose: bool = False,
                  record_run: bool = True, run_id: str | None = None, worker: int | None = None
                  ) -> tuple[int, dict[str, Any]]:
    """Run one job as a run of its own; returns (exit status, summary). With `record_run`
    false (a plan) the database is not written at all, not even the runs table: the run exists
    only in its report folder. `worker` k: one of the processes of a `--workers` run (its parent
    records the run); its report goes to the run's folder under `worker-<k>/`."""
    run_id = run_id or new_run_id(command)
    folder = report.run_dir(Path(cfg["report"]["dir"]), run_id)
    if worker is not None:
        folder = report.worker_dir(folder, worker)
    logs.configure(run_id, folder / "log.jsonl", cfg["report"]["console"], verbose, cfg.secrets())
    started = utcnow()
    t0 = time.monotonic()
    # The job is built before the run is recorded: one that cannot be built (a bad path
    # resolver) leaves no run `running` for ever.
    try:
        job = make_job(run_id)
    except BaseException:
        logs.close()
        raise
    if record_run:
        await db.start_run(run_id, command, cfg.masked())
    log.info("run.start", command=command, config=cfg.masked(), report_dir=str(folder))
    signals = 0
    beat = asyncio.create_task(_heartbeat(db, run_id, job, float(cfg["run"]["heartbeat_s"]))) if record_run else None
    metrics_file = Path(cfg["report"]["metrics_file"]) if cfg["report"]["metrics_file"] and worker is None else None
    ticker = (asyncio.create_task(_metrics(metrics_file, run_id, command, job, float(cfg["report"]["progress_interval_s"])))
              if metrics_file is not None else None)
    live = None
    if not verbose and worker is None and progress_display.wanted(cfg["report"]["console"], sys.stderr):
        live = asyncio.create_task(progress_display.show(job, command))

    def on_signal(signum: int) -> None:
        nonlocal signals
        signals += 1
        if signals == 1:
            log.warning("run.stopping", signal=signal.Signals(signum).name,
                        note="finishing rows in flight; a second signal stops at once")
            job.stop()
        elif signals == 2:
            log.warning("run.aborting", signal=signal.Signals(signum).name,
                        note="cutting requests in flight; committing what is placed; a third signal exits at once")
            job.abort()
        else:
            # Whatever hangs (a database or git that never answers), the operator gets the process
            # back. Nothing is lost: what was placed but not stamped is adopted by the next run.
            log.warning("run.exiting_now", signal=signal.Signals(signum).name)
            if hasattr(job, "exit_now"):  # processes of its own (--workers): they go too
                job.exit_now()
            logs.close()
            os._exit(EXIT_INTERRUPTED)

    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, on_signal, sig)
    status = "failed"
    summary: dict[str, Any] = {}
    try:
        summary = await job.run(float(cfg["run"]["drain_timeout_s"]))
        if summary.get("fatal"):
            status = "failed"  # the job stopped itself: its cause is in `fatal`, in one line
        elif summary.get("interrupted") or signals:
            status = "interrupted"
        else:
            status = "finished_with_errors" if summary.get("unrecorded") else "finished"
    except Exception as exc:
        log.error("run.failed", error=f"{type(exc).__name__}: {exc}")
        summary = {"error": f"{type(exc).__name__}: {exc}"}
        raise
    finally:
        for task in (beat, ticker, live):
            if task is not None:
                task.cancel()
                await asyncio.gather(task, return_exceptions=True)
        if metrics_file is not None:
            _write_metrics(metrics_file, run_id, command, job, status)
        # The handlers stay until the very end: a signal while the summary and the run's row are
        # written must not kill the process half-way (a third one still exits at once).
        summary = {"run_id": run_id, "command": command, "status": status, "started_at": iso(started),
                   "finished_at": iso(utcnow()), "duration_s": round(time.monotonic() - t0, 3), **summary}
        summary = redact.deep(summary, cfg.secrets())  # an error's text may quote a DSN or a URL
        try:
            report.write_summary(folder, summary)
        except OSError as exc:  # a full disk: the runs table below still gets the summary
            log.error("report.write_failed", folder=str(folder), error=str(exc))
        try:
            if record_run:
                await _finish_run(db, run_id, status, _lean(summary), float(cfg["db"]["outage_max_s"]))
        finally:
            log.info("run.finish", **_lean(summary))
            logs.close()
            for sig in (signal.SIGINT, signal.SIGTERM):
                loop.remove_signal_handler(sig)
    return EXIT_FOR[status], summary


async def _metrics(path: Path, run_id: str, command: str, job: Job, every_s: float) -> None:
    while True:
        _write_metrics(path, run_id, command, job)
        await asyncio.sleep(every_s)


def _write_metrics(path: Path, run_id: str, command: str, job: Job, status: str | None = None) -> None:
    """The Prometheus textfile; one that cannot be written is said once per run, never fatal."""
    from . import metrics
    try:
        metrics.write(path, metrics.render(run_id, command, progress_display.progress_of(job), status))
    except Exception as exc:
        global _metrics_failed
        if _metrics_failed != run_id:
            _metrics_failed = run_id
            log.warning("report.metrics_failed", file=str(path), error=f"{type(exc).__name__}: {exc}")


_metrics_failed: str | None = None


async def _heartbeat(db: Database, run_id: str, job: Job, every_s: float) -> None:
    """The run's row says it is alive, and where it stands, every `every_s`: `crawler status`
    shows live counts, and a run that stopped beating (killed) as `lost`. A beat that cannot
    be written (the database away) is skipped; the run goes on."""
    said = False
    while True:
        await asyncio.sleep(every_s)
        try:
            progress = progress_display.progress_of(job)
            await asyncio.wait_for(db.heartbeat(run_id, progress), max(every_s, 1.0) * 2)
            said = False
        except Exception as exc:
            if not said:
                log.warning("run.heartbeat_failed", error=f"{type(exc).__name__}: {exc}")
                said = True


async def _finish_run(db: Database, run_id: str, status: str, summary: dict[str, Any], outage_max_s: float) -> None:
    """The run's row gets its end, riding out a database that is away for a while (a row left
    `running` would look like a run still going)."""
    deadline = time.monotonic() + outage_max_s
    wait = BACKOFF_FIRST_S
    while True:
        try:
            await db.finish_run(run_id, status, summary)
            return
        except Exception as exc:
            if not is_connection_error(exc) or time.monotonic() + wait > deadline:
                log.error("run.finish_not_recorded", error=f"{type(exc).__name__}: {exc}",
                          note="the runs table still says running for this run")
                return
            await asyncio.sleep(wait)
            wait = min(wait * 2, BACKOFF_MAX_S)


def _lean(summary: dict[str, Any]) -> dict[str, Any]:
    """The summary without its long lists, for the log line and the runs table."""
    return {k: v for k, v in summary.items() if k not in ("failed_rows", "timeline")}


async def with_database(cfg: Config, body: Callable[[Database], Awaitable[int]], read_only: bool = False) -> int:
    db = await open_database(cfg, read_only)
    try:
        return await body(db)
    finally:
        await db.close()


def release_free_memory() -> None:
    """Hand memory the allocator holds but no longer uses back to the system (glibc only).

    Python's live objects stay flat over a long run, yet RSS crept (68 → 77 MB over 100,000
    rows): bodies and pipe buffers come and go on several threads, each with its own malloc
    arena, and the freed pages stay with the process. A trim every progress interval costs
    about a millisecond."""
    native.malloc_trim()
