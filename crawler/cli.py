"""The command line (CONTRACT.md §2): `python -m crawler [COMMAND] [--config FILE] [options]`."""

from __future__ import annotations

import argparse
import asyncio
import gc
import json
import os
import socket
import sys
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from . import config as config_mod
from . import engine, logs, native, redact, report
from .changeset import ChangesetError, ChangesetFile
from .config import Config, ConfigError
from .db import Database, DatabaseError, JobBusy, is_connection_error
from .git import GitError
from .paths import PathError

GC_YOUNG_EVERY = 10_000  # new containers between young collections (Python's default: 700); see _run_loop

COMMANDS = {
    "figures": "re-download missing paper_figure files, politely (the figure job)",
    "recover": "find and bind lost dataset, model and tabular_dataset files (the recovery job)",
    "run": "figures, then recover, each a run of its own (the default)",
    "report": "print the summary of the last run, or of RUN_ID",
    "demo": "the whole thing end to end on an embedded sandbox, no set-up by hand",
    "tail": "follow the newest run still going (or the next to start, or RUN_ID) as readable lines, until it ends",
    "status": "runs going now and recent ones, budgets in flight or paused, rows per type by state (reads only)",
    "config": "print the effective configuration, secrets masked, each value with where it came from",
    "apply": "apply a reviewed changeset (from --changeset) through the journal",
    "undo": "restore every value a run wrote (directly, or by apply of its changeset), from the journal",
}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="crawler", description="Recover lost artifact files, or record truthfully that they are gone.",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog="exit status: 0 finished, everything attempted recorded; 1 error; 2 bad configuration or usage; "
               "3 finished, but some work could not be recorded (listed in the summary); "
               "130 interrupted (run again to resume)")
    parser.add_argument("--version", action="version", version=f"crawler {version()}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--config", metavar="FILE", help="TOML overriding config/default.toml key by key")
    common.add_argument("-v", "--verbose", action="store_true", help="every row's outcome on the console too")
    common.add_argument("-q", "--quiet", action="store_true", help="only warnings and errors on the console")
    common.add_argument("--log-level", choices=logs.LEVELS, metavar="LEVEL",
                        help="the least level shown on the console: debug (every row), info (default), warning, "
                             "error; the JSON log always has every event")
    job = argparse.ArgumentParser(add_help=False)
    job.add_argument("--limit", type=int, metavar="N", help="take at most N rows this run")
    job.add_argument("--host", metavar="NAME", help="only rows whose image URL is on this host")
    job.add_argument("--retry-failed", action="store_true", help="also take rows whose last outcome was failed")
    workers = argparse.ArgumentParser(add_help=False)
    workers.add_argument("--workers", metavar="N", type=_workers_arg,
                         help='cooperating processes on this machine (default run.workers, 1; "auto" = one per core); '
                              "the same command on other machines against one database joins the same work")
    # A child of --workers: which run it joins, which worker it is, how many were started.
    workers.add_argument("--worker-of", metavar="RUN_ID", help=argparse.SUPPRESS)
    workers.add_argument("--worker-index", type=int, default=0, help=argparse.SUPPRESS)
    workers.add_argument("--expect-workers", type=int, default=1, help=argparse.SUPPRESS)
    repair = argparse.ArgumentParser(add_help=False)
    repair.add_argument("--plan", action="store_true",
                        help="say what the run would do and change nothing: figures prints rows per budget and host "
                             "and the least time the budgets allow (no request sent); recover searches and decides, "
                             "and writes the changes it would make to plan.csv in the report folder")
    repair.add_argument("--changeset", metavar="FILE",
                        help="read-only repair: only read the database (nothing is written to it, not even the "
                             "tool's schema) and append every row change to FILE (JSON Lines) for review and "
                             "`crawler apply`; files are still fetched and committed. The same FILE again resumes")
    recover = argparse.ArgumentParser(add_help=False)
    recover.add_argument("--approve", metavar="FILE",
                         help="CSV (artifact_id,candidate_location) of candidates an operator approved after reading the inventory")
    sub.add_parser("figures", parents=[common, job, repair, workers], help=COMMANDS["figures"], description=COMMANDS["figures"])
    sub.add_parser("recover", parents=[common, repair, recover], help=COMMANDS["recover"],
                   description=COMMANDS["recover"])
    sub.add_parser("run", parents=[common, job, repair, recover], help=COMMANDS["run"], description=COMMANDS["run"])
    rep = sub.add_parser("report", parents=[common], help=COMMANDS["report"], description=COMMANDS["report"])
    rep.add_argument("run_id", nargs="?", metavar="RUN_ID")
    rep.add_argument("--json", action="store_true", help="print summary.json instead of summary.md")
    rep.add_argument("--list", action="store_true", help="list the runs whose reports are under report.dir")
    rep.add_argument("--html", action="store_true", help="write the run's report.html (self-contained) and print its path")
    tl = sub.add_parser("tail", parents=[common], help=COMMANDS["tail"], description=COMMANDS["tail"])
    tl.add_argument("run_id", nargs="?", metavar="RUN_ID")
    st = sub.add_parser("status", parents=[common], help=COMMANDS["status"], description=COMMANDS["status"])
    st.add_argument("--json", action="store_true", help="one JSON object: runs (newest first) and rows by type")
    st.add_argument("--watch", action="store_true", help="show it again every run.heartbeat_s until interrupted")
    conf = sub.add_parser("config", parents=[common], help=COMMANDS["config"], description=COMMANDS["config"])
    conf.add_argument("--json", action="store_true", help="one JSON object: key -> {value, origin}")
    demo = sub.add_parser("demo", parents=[common], help=COMMANDS["demo"], description=COMMANDS["demo"])
    demo.add_argument("--fresh", action="store_true", help="delete the sandbox and start over")
    demo.add_argument("--repair", action="store_true",
                      help="run both jobs as a read-only repair: plan, changeset, apply --dry-run, apply")
    apply = sub.add_parser("apply", parents=[common], help=COMMANDS["apply"], description=COMMANDS["apply"])
    apply.add_argument("file", metavar="FILE", help="the changeset (JSON Lines: artifact_id, before, after)")
    apply.add_argument("--dry-run", action="store_true", help="check every line against the table, change nothing")
    undo = sub.add_parser("undo", parents=[common], help=COMMANDS["undo"], description=COMMANDS["undo"])
    undo.add_argument("run_id", metavar="RUN_ID", help="the run to undo (an undo run too: an undo can be undone)")
    undo.add_argument("--dry-run", action="store_true", help="check every row against the journal, change nothing")
    undo.add_argument("--revert-commits", action="store_true",
                      help="also add one commit taking that run's files off the branch (history keeps them)")
    return parser


class UsageError(Exception):
    """Asked for something that is not there (a run id the journal does not know); one line."""


def _workers_arg(text: str) -> int | str:
    value: int | str = int(text) if text.lstrip("-").isdigit() else text
    if not config_mod.worker_count_ok(value):
        raise argparse.ArgumentTypeError(f"{config_mod.WORKERS_RULE}, got {text!r}")
    return value


def version() -> str:
    from importlib.metadata import PackageNotFoundError
    from importlib.metadata import version as installed
    try:
        return installed("crawler")
    except PackageNotFoundError:
        return "0+unknown"


_SECRETS: tuple[str, ...] = ()  # the loaded configuration's, masked in every line printed


def fail(message: str, status: int) -> int:
    print(f"crawler: {redact.scrub(message, _SECRETS)}", file=sys.stderr)
    return status


def main(argv: list[str] | None = None) -> int:
    native.one_malloc_arena()  # before any thread: see native.py
    argv = list(sys.argv[1:] if argv is None else argv)
    # The bare form runs both jobs: `crawler`, `crawler --config FILE` (options, no command).
    if not argv or (argv[0].startswith("-") and argv[0] not in ("-h", "--help", "--version")):
        argv = ["run", *argv]
    args = build_parser().parse_args(argv)
    command = args.command
    logs.set_console_level("debug" if args.verbose else "warning" if args.quiet else args.log_level or "info")
    try:
        cfg = config_mod.load(args.config)
    except ConfigError as exc:
        return fail(f"bad configuration: {exc}", engine.EXIT_USAGE)
    if command == "config":
        return print_config(cfg, args.json)
    if command == "tail":
        from . import tail
        try:
            return tail.follow(Path(cfg["report"]["dir"]), args.run_id, float(cfg["report"]["progress_interval_s"]),
                               max_wait_s=tail.NAMED_WAIT_S if args.run_id else None)
        except KeyboardInterrupt:
            return engine.EXIT_INTERRUPTED
    global _SECRETS
    _SECRETS = cfg.secrets()
    if getattr(args, "limit", None) is not None and args.limit < 1:
        return fail("--limit must be at least 1", engine.EXIT_USAGE)
    if command == "report":
        return list_reports(cfg) if args.list else print_report(cfg, args.run_id, args.json, args.html)
    if command == "demo":
        from .sandbox import demo
        return demo.main(cfg, fresh=args.fresh, verbose=args.verbose, repair=args.repair)
    if not cfg["db"]["dsn"]:
        return fail("no database configured: set db.dsn in a --config file or CRAWLER_DSN "
                    "(to see the tool work on its own sandbox: python -m crawler demo)", engine.EXIT_USAGE)
    try:
        if command == "status":
            return asyncio.run(show_status(cfg, args.json, args.watch))
        if command in ("apply", "undo"):
            return asyncio.run(run_repair(cfg, command, args))
        return _run_loop(run_commands(cfg, command, args))
    except (ChangesetError, UsageError, JobBusy) as exc:
        return fail(str(exc), engine.EXIT_USAGE)
    except ConfigError as exc:
        return fail(f"bad configuration: {exc}", engine.EXIT_USAGE)
    except (GitError, PathError) as exc:
        return fail(f"bad configuration: {exc}", engine.EXIT_USAGE)
    except DatabaseError as exc:
        return fail(str(exc), engine.EXIT_FAILED)
    except Exception as exc:
        if isinstance(exc, OSError) and not isinstance(exc, ConnectionError) and exc.filename is not None:
            return fail(f"{exc.strerror or exc}: {exc.filename}", engine.EXIT_FAILED)  # a file of ours, not the database
        if is_connection_error(exc):
            return fail(f"the database went away: {type(exc).__name__}: {exc}", engine.EXIT_FAILED)
        raise
    except KeyboardInterrupt:
        return engine.EXIT_INTERRUPTED
    finally:
        logs.close()


async def run_commands(cfg: Config, command: str, args: argparse.Namespace) -> int:
    changeset = _changeset_path(args)

    async def body(db: Database) -> int:
        status = engine.EXIT_OK
        if command in ("figures", "run") and args.plan:
            print_figures_plan(await plan_figures(cfg, db, args, changeset))
        elif command in ("figures", "run"):
            status, summary = await run_figures(cfg, db, args, changeset)
            print_summary_line(summary)
            if status not in (engine.EXIT_OK, engine.EXIT_UNRECORDED):
                return status
        if command in ("recover", "run"):
            recovered = await run_recover(cfg, db, args)
            status = recovered if recovered != engine.EXIT_OK else status  # a figures exit 3 still counts
        return status
    # A plan and a read-only repair only read: read-only transactions, no migration of our schema.
    return await engine.with_database(cfg, body, read_only=bool(args.plan or changeset))


def _run_loop(main: Any) -> Any:
    """The jobs' event loop: asyncio's own. uvloop cut the figure job's CPU per row by 14 % in
    the bench, but libuv reads its clock once per loop iteration, in whole milliseconds, and
    fires timers against that reading, so a budget's starts could come closer together than its
    rate allows by up to an iteration's length (the bench's politeness check saw 0.992 x 1/rate
    at the server on a busy machine). The bench can still run a job on it (bench/measured.py)."""
    # The cyclic collector, left as it is, spent about 6 % of the figure job's CPU: a young
    # collection every 700 new containers (a few a row), and each older one walking every
    # module, class and function imported. What exists now lives until exit: frozen out of the
    # collector's sight. Young collections every 10,000 containers: rarer, each the same work
    # per object, and the garbage they wait for is at most a few MB.
    gc.collect()  # (what is garbage already is not frozen with the rest)
    gc.freeze()
    gc.set_threshold(GC_YOUNG_EVERY, *gc.get_threshold()[1:])
    return asyncio.run(main)


def _changeset_path(args: argparse.Namespace) -> Path | None:
    if not getattr(args, "changeset", None):
        return None
    path = Path(args.changeset)
    if not path.parent.is_dir():
        raise ConfigError(f"--changeset {path}: no folder {path.parent}")
    ChangesetFile(path, repair=False, optional=True)  # a file that is not a changeset stops here: read only
    return path


def _figure_options(args: argparse.Namespace, changeset: Path | None) -> Any:
    from pipelines.figures import FigureOptions
    return FigureOptions(limit=args.limit, host=(args.host or "").lower() or None, retry_failed=args.retry_failed,
                         changeset=changeset, plan=bool(args.plan),
                         expect_workers=getattr(args, "expect_workers", 1) or 1,
                         shares_progress=bool(getattr(args, "worker_of", None)))


async def run_figures(cfg: Config, db: Database, args: argparse.Namespace, changeset: Path | None = None
                      ) -> tuple[int, dict]:
    from pipelines.figures import FigureJob

    from . import workers
    opts = _figure_options(args, changeset)
    worker_of = getattr(args, "worker_of", None)  # one of the processes a `--workers N` run started
    count = 1 if worker_of else workers.worker_count(getattr(args, "workers", None) or cfg["run"]["workers"])
    if count > 1 and changeset is None:  # a changeset run only reads the database: no leases, one process
        return await engine.run_job(cfg, db, "figures",
                                    lambda run_id: workers.WorkersJob(cfg, db, run_id, args, count),
                                    verbose=args.verbose)
    # A worker's run is recorded by its parent, under the parent's run id.
    return await engine.run_job(cfg, db, "figures", lambda run_id: FigureJob(cfg, db, run_id, opts),
                                verbose=args.verbose, record_run=changeset is None and not worker_of,
                                run_id=worker_of, worker=args.worker_index if worker_of else None)


async def plan_figures(cfg: Config, db: Database, args: argparse.Namespace, changeset: Path | None) -> dict:
    from pipelines.figures import FigureJob
    return await FigureJob(cfg, db, "plan", _figure_options(args, changeset)).plan_only()


def print_figures_plan(plan: dict) -> None:
    """The plan on stdout: rows per budget and host, and the least time the budgets allow."""
    out = [f"figures plan: {plan['to_try']} rows to try"
           + (f" (--limit {plan['limit']})" if plan["limit"] else "")
           + f"; {plan['present']} already on disk, {plan['in_changeset']} already in the changeset, "
             f"{plan['no_url']} without an image URL, {plan['bad_metadata']} with unreadable metadata",
           "", f"{'budget':<28} {'hosts':>5} {'rows':>9} {'rate/s':>7} {'in flight':>9} {'at least':>10} {'if all exist':>13}"]
    for name, b in sorted(plan["budgets"].items(), key=lambda kv: -kv[1]["least_s"]):
        rate = f"{b['rate_per_s']:g}" if b["rate_per_s"] else "-"
        out.append(f"{name[:28]:<28} {len(b['hosts']):>5} {b['rows']:>9} {rate:>7} {b['max_inflight']:>9} "
                   f"{report.hms(b['least_s']):>10} {report.hms(b['if_all_exist_s']):>13}")
    out += ["", f"the run takes at least {report.hms(plan['least_s'])} (one request a row, at the slowest budget: "
                f"{plan['slowest_budget'] or '-'}), {report.hms(plan['if_all_exist_s'])} if every file exists (HEAD and GET)",
            "", f"{'host':<40} {'to try':>9} {'on disk':>9} {'in changeset':>13}"]
    for host, c in plan["per_host"].items():
        out.append(f"{host[:40]:<40} {c.get('to_try', 0):>9} {c.get('present', 0):>9} {c.get('in_changeset', 0):>13}")
    print("\n".join(out))


async def run_repair(cfg: Config, command: str, args: argparse.Namespace) -> int:
    """`apply FILE` and `undo RUN_ID`: runs of their own; `--dry-run` only reads."""
    from pipelines.repair import ApplyJob, UndoJob
    dry = args.dry_run
    file = ChangesetFile(Path(args.file), repair=False) if command == "apply" else None

    async def body(db: Database) -> int:
        if command == "apply":
            assert file is not None
            make: Any = lambda run_id: ApplyJob(cfg, db, run_id, file, dry)
        else:
            if not await db.has_state() or (await db.run_info(args.run_id) is None and not await db.run_journal(args.run_id)):
                raise UsageError(f"no run {args.run_id} in the journal of {cfg['db']['state_schema']}")
            make = lambda run_id: UndoJob(cfg, db, run_id, args.run_id, dry, args.revert_commits)
        status, summary = await engine.run_job(cfg, db, command, make, verbose=args.verbose, record_run=not dry)
        print_repair_lines(command, summary)
        return status
    return await engine.with_database(cfg, body, read_only=dry)


def print_repair_lines(command: str, s: dict) -> None:
    what = f"apply {s.get('changeset')}" if command == "apply" else f"undo {s.get('undone_run')}"
    verb = "would change" if s.get("dry_run") else "changed"
    line = (f"{what} {s.get('status')}{' (dry run: nothing written)' if s.get('dry_run') else ''}: "
            f"{verb} {s.get('changed', 0)} rows, {s.get('already', 0)} already "
            f"{'applied' if command == 'apply' else 'as before the run'}, {s.get('refused', 0)} refused")
    if s.get("missing_rows"):
        line += f", {len(s['missing_rows'])} not in the table"
    if command == "undo" and s.get("revert_commit"):
        line += f"; {s.get('files_taken_off')} files taken off the branch in {s['revert_commit'][:12]}"
    print(f"{line} (report: {s.get('run_id')})", file=sys.stderr)
    for r in s.get("refused_rows", [])[:20]:
        print(f"  refused: {r['artifact_id']}: {r['why']} ({', '.join(r['differs'])})", file=sys.stderr)
    if s.get("refused", 0) > 20:
        print(f"  ... and {s['refused'] - 20} more (refused.csv in the report folder)", file=sys.stderr)
    for u in s.get("unrecorded", []):
        if u["what"] != "refused":  # the refused rows are listed above
            print(f"  not recorded: {u['what']}: {u['count']} — {u['why']}", file=sys.stderr)


async def run_recover(cfg: Config, db: Database, args: argparse.Namespace) -> int:
    from pipelines.recover import RecoverJob, RecoverOptions
    approve = Path(args.approve) if getattr(args, "approve", None) else None
    if approve is not None and not approve.is_file():
        raise ConfigError(f"--approve {approve}: no such file")
    opts = RecoverOptions(plan=getattr(args, "plan", False), approve=approve, changeset=_changeset_path(args))
    run_id = engine.new_run_id("recover")
    lock = None
    if not opts.plan:  # one recover at a time (two would bind, copy and commit the same files)
        since = datetime.now(UTC).strftime("%H:%M:%SZ")
        lock = await db.job_lock("recover", f"crawler {run_id} {socket.gethostname()} pid {os.getpid()} since {since}",
                                 cfg["db"]["dsn"], cfg["db"]["connect_timeout_s"])
    try:
        status, summary = await engine.run_job(cfg, db, "recover", lambda rid: RecoverJob(cfg, db, rid, opts),
                                               verbose=args.verbose, record_run=not (opts.plan or opts.changeset),
                                               run_id=run_id)
    finally:
        if lock is not None:
            await lock.close()
    print_recover_line(summary)
    return status


def print_recover_line(summary: dict) -> None:
    parts = []
    for t, c in sorted(summary.get("per_type", {}).items()):
        parts.append(f"{t}: {c['rows']} rows, {c['bound']} bound, {c['needs_review']} needs_review, "
                     f"{c['unrecoverable']} unrecoverable, {c['missing']} missing")
    plan = " (plan only: nothing written)" if summary.get("plan") else ""
    print(f"recover {summary.get('status')}{plan}: " + "; ".join(parts) + f" (report: {summary.get('run_id')})",
          file=sys.stderr)
    print_unrecorded(summary)


def print_summary_line(summary: dict) -> None:
    keys = ("attempted", "fetched", "hard_404", "transient", "failed", "no_url")
    counts = " ".join(f"{k}={summary.get(k, 0)}" for k in keys)
    print(f"figures {summary.get('status')}: {counts} (report: {summary.get('run_id')})", file=sys.stderr)
    print_unrecorded(summary)
    if summary.get("fatal"):
        print(f"crawler: {summary['fatal']}", file=sys.stderr)


def print_unrecorded(summary: dict) -> None:
    """One line per reason some work could not be recorded (exit 3)."""
    for u in summary.get("unrecorded", []):
        where = f" ({u['source']})" if u.get("source") else ""
        print(f"  not recorded: {u['what']}{where}: {u['count']} — {u['why']}", file=sys.stderr)


async def show_status(cfg: Config, as_json: bool, watch: bool) -> int:
    """`crawler status`: read-only (read-only transactions, nothing created)."""
    from . import status
    db = await engine.open_database(cfg, read_only=True)
    try:
        while True:
            state = await status.gather(cfg, db)
            text = json.dumps(state, indent=2) if as_json else status.render(state)
            if watch and sys.stdout.isatty():
                sys.stdout.write("\033[H\033[2J")  # the screen redrawn, not scrolled
            print(text, flush=True)
            if not watch:
                return engine.EXIT_OK
            await asyncio.sleep(float(cfg["run"]["heartbeat_s"]))
    finally:
        await db.close()


def print_config(cfg: Config, as_json: bool) -> int:
    """The effective configuration, secrets masked, each value with its origin."""
    values = config_mod.flatten(cfg.masked())
    origins = cfg.origins
    if as_json:
        print(json.dumps({k: {"value": v, "origin": origins.get(k, "default")} for k, v in values.items()}, indent=2))
        return engine.EXIT_OK
    section = None
    for key, value in values.items():
        head, _, name = key.rpartition(".")
        if head != section:
            print(f"{'' if section is None else chr(10)}[{head}]")
            section = head
        print(f"{name} = {json.dumps(value)}    # {origins.get(key, 'default')}")
    return engine.EXIT_OK


def list_reports(cfg: Config) -> int:
    """One line per run with a report under report.dir, newest last."""
    root = Path(cfg["report"]["dir"])
    runs = sorted(p for p in root.iterdir() if (p / "summary.json").is_file()) if root.is_dir() else []
    if not runs:
        return fail(f"no reports under {root}/", engine.EXIT_USAGE)
    print(f"{'run id':<44} {'status':<21} {'duration':>9}  what")
    for folder in runs:
        try:
            s = json.loads((folder / "summary.json").read_text())
        except (OSError, ValueError):
            print(f"{folder.name:<44} {'(unreadable summary)':<21}")
            continue
        print(f"{folder.name:<44} {str(s.get('status')):<21} {report.hms(float(s.get('duration_s') or 0)):>9}  {report.counts_line(s.get('command'), s)}")
    return engine.EXIT_OK


def print_report(cfg: Config, run_id: str | None, as_json: bool, as_html: bool = False) -> int:
    folder = report.latest_run_dir(Path(cfg["report"]["dir"]), run_id)
    if folder is None:
        what = f"run {run_id}" if run_id else "any run"
        return fail(f"no report for {what} under {cfg['report']['dir']}/", engine.EXIT_USAGE)
    if as_html:
        print(report.write_html(folder, json.loads((folder / "summary.json").read_text())).resolve())
    elif as_json:
        print(json.dumps(json.loads((folder / "summary.json").read_text()), indent=2))
    else:
        print((folder / "summary.md").read_text(), end="")
    return engine.EXIT_OK
