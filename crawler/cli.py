"""The command line (CONTRACT.md §2): `python -m crawler [COMMAND] [--config FILE] [options]`."""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
from pathlib import Path

from . import config as config_mod
from . import engine, logs, native, redact, report
from .config import Config, ConfigError
from .db import Database, DatabaseError, is_connection_error
from .git import GitError
from .paths import PathError

COMMANDS = {
    "figures": "re-download missing paper_figure files, politely (the figure job)",
    "recover": "find and bind lost dataset, model and tabular_dataset files (the recovery job)",
    "run": "figures, then recover, each a run of its own (the default)",
    "report": "print the summary of the last run, or of RUN_ID",
    "demo": "the whole thing end to end on an embedded sandbox, no set-up by hand",
}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="crawler", description="Recover lost artifact files, or record truthfully that they are gone.",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog="exit status: 0 finished, everything attempted recorded; 1 error; 2 bad configuration or usage; "
               "3 finished, but some work could not be recorded (listed in the summary); "
               "130 interrupted (run again to resume)")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--config", metavar="FILE", help="TOML overriding config/default.toml key by key")
    common.add_argument("-v", "--verbose", action="store_true", help="every row's outcome on the console too")
    job = argparse.ArgumentParser(add_help=False)
    job.add_argument("--limit", type=int, metavar="N", help="take at most N rows this run")
    job.add_argument("--host", metavar="NAME", help="only rows whose image URL is on this host")
    job.add_argument("--retry-failed", action="store_true", help="also take rows whose last outcome was failed")
    recover = argparse.ArgumentParser(add_help=False)
    recover.add_argument("--plan", action="store_true",
                         help="search and decide, write the changes it would make to the report folder; change nothing")
    recover.add_argument("--approve", metavar="FILE",
                         help="CSV (artifact_id,candidate_location) of candidates an operator approved after reading the inventory")
    sub.add_parser("figures", parents=[common, job], help=COMMANDS["figures"], description=COMMANDS["figures"])
    sub.add_parser("recover", parents=[common, recover], help=COMMANDS["recover"], description=COMMANDS["recover"])
    sub.add_parser("run", parents=[common, job, recover], help=COMMANDS["run"], description=COMMANDS["run"])
    rep = sub.add_parser("report", parents=[common], help=COMMANDS["report"], description=COMMANDS["report"])
    rep.add_argument("run_id", nargs="?", metavar="RUN_ID")
    rep.add_argument("--json", action="store_true", help="print summary.json instead of summary.md")
    demo = sub.add_parser("demo", parents=[common], help=COMMANDS["demo"], description=COMMANDS["demo"])
    demo.add_argument("--fresh", action="store_true", help="delete the sandbox and start over")
    return parser


_SECRETS: tuple[str, ...] = ()  # the loaded configuration's, masked in every line printed


def fail(message: str, status: int) -> int:
    print(f"crawler: {redact.scrub(message, _SECRETS)}", file=sys.stderr)
    return status


def main(argv: list[str] | None = None) -> int:
    native.one_malloc_arena()  # before any thread: see native.py
    args = build_parser().parse_args(argv)
    command = args.command or "run"
    if command == "run" and args.command is None:
        args = build_parser().parse_args(["run", *(argv if argv is not None else sys.argv[1:])])
    try:
        cfg = config_mod.load(args.config)
    except ConfigError as exc:
        return fail(f"bad configuration: {exc}", engine.EXIT_USAGE)
    global _SECRETS
    _SECRETS = cfg.secrets()
    if getattr(args, "limit", None) is not None and args.limit < 1:
        return fail("--limit must be at least 1", engine.EXIT_USAGE)
    if command == "report":
        return print_report(cfg, args.run_id, args.json)
    if command == "demo":
        from .sandbox import demo
        return demo.main(cfg, fresh=args.fresh, verbose=args.verbose)
    if not cfg["db"]["dsn"]:
        return fail("no database configured: set db.dsn in a --config file or CRAWLER_DSN "
                    "(to see the tool work on its own sandbox: python -m crawler demo)", engine.EXIT_USAGE)
    try:
        return asyncio.run(run_commands(cfg, command, args))
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
    async def body(db: Database) -> int:
        status = engine.EXIT_OK
        if command in ("figures", "run"):
            status, summary = await run_figures(cfg, db, args)
            print_summary_line(summary)
            if status not in (engine.EXIT_OK, engine.EXIT_UNRECORDED):
                return status
        if command in ("recover", "run"):
            recovered = await run_recover(cfg, db, args)
            status = recovered if recovered != engine.EXIT_OK else status  # a figures exit 3 still counts
        return status
    return await engine.with_database(cfg, body)


async def run_figures(cfg: Config, db: Database, args: argparse.Namespace) -> tuple[int, dict]:
    from pipelines.figures import FigureJob, FigureOptions
    opts = FigureOptions(limit=args.limit, host=(args.host or "").lower() or None, retry_failed=args.retry_failed)
    return await engine.run_job(cfg, db, "figures", lambda run_id: FigureJob(cfg, db, run_id, opts),
                                verbose=args.verbose)


async def run_recover(cfg: Config, db: Database, args: argparse.Namespace) -> int:
    from pipelines.recover import RecoverJob, RecoverOptions
    approve = Path(args.approve) if getattr(args, "approve", None) else None
    if approve is not None and not approve.is_file():
        raise ConfigError(f"--approve {approve}: no such file")
    opts = RecoverOptions(plan=getattr(args, "plan", False), approve=approve)
    status, summary = await engine.run_job(cfg, db, "recover", lambda run_id: RecoverJob(cfg, db, run_id, opts),
                                           verbose=args.verbose, record_run=not opts.plan)
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


def print_report(cfg: Config, run_id: str | None, as_json: bool) -> int:
    folder = report.latest_run_dir(Path(cfg["report"]["dir"]), run_id)
    if folder is None:
        what = f"run {run_id}" if run_id else "any run"
        return fail(f"no report for {what} under {cfg['report']['dir']}/", engine.EXIT_USAGE)
    if as_json:
        print(json.dumps(json.loads((folder / "summary.json").read_text()), indent=2))
    else:
        print((folder / "summary.md").read_text(), end="")
    return engine.EXIT_OK
