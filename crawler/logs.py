"""Structured logs: JSON Lines to `reports/<run_id>/log.jsonl` and a readable line on stderr.

Every event carries `event`, `timestamp` (ISO-8601 UTC) and `run_id`. The file gets every
event; the console gets a short rendering (row outcomes only at debug verbosity, so a long run's
console shows progress, pauses and commits rather than thousands of rows).
"""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path
from typing import Any, TextIO

import structlog

from . import redact

QUIET_ON_CONSOLE = frozenset({"row.outcome"})  # shown at level debug only
LEVELS = ("debug", "info", "warning", "error")
_console_level = "info"


_console_writer: Any = None  # while a live display runs: it prints the console's lines above itself


def set_console_writer(writer: Any) -> None:
    global _console_writer
    _console_writer = writer


def console_level() -> str:
    return _console_level


def set_console_level(level: str) -> None:
    """The least level shown on the console (the JSON log keeps every event): `-v` is debug,
    `-q` warning."""
    global _console_level
    if level not in LEVELS:
        raise ValueError(f"log level must be one of {', '.join(LEVELS)}")
    _console_level = level


def _shown(event: dict[str, Any]) -> bool:
    level = event.get("level", "info")
    rank = LEVELS.index(level) if level in LEVELS else len(LEVELS) - 1
    if event["event"] in QUIET_ON_CONSOLE and level == "info":
        rank = 0
    return rank >= LEVELS.index(_console_level)
FLUSH_EVERY_S = 0.5
# json.dumps(event, default=str, separators=(",", ":")), its encoder made once, not once a line
_JSON_LINE = json.JSONEncoder(default=str, separators=(",", ":"))
# Long values the JSON log keeps and the console leaves out (the effective config, a run's
# per-host and per-error tables: the summary line and summary.md say them readably).
FILE_ONLY_KEYS = frozenset({"config", "per_host", "errors", "transient_errors", "failed_errors",
                            "requests_per_budget", "head_404_untrusted", "unrecorded", "refused_rows", "missing_rows"})


class _Fanout:
    def __init__(self, file: TextIO | None, console: TextIO | None, verbose: bool,
                 secrets: tuple[str, ...] = ()) -> None:
        self.file = file
        self.console = console
        self.verbose = verbose
        self.secrets = secrets
        self._flushed = time.monotonic()
        self.dropped = 0        # lines not written since the log file failed
        self._failed_at = 0.0

    def __call__(self, logger: Any, name: str, event: dict[str, Any]) -> str:
        self.emit(event)
        raise structlog.DropEvent

    def emit(self, event: dict[str, Any]) -> None:
        # Nothing secret is written: URL credentials, DSN passwords and the configuration's own
        # secrets are masked in every value, whatever put them there (an exception's text).
        event = redact.deep(event, self.secrets)
        if self.file is not None:
            self._to_file(event)
        if self.console is not None and (self.verbose or _shown(event)):
            try:
                if _console_writer is not None:
                    if event["event"] != "progress":  # the live display shows it
                        _console_writer(render_line(event))
                else:
                    self.console.write(render_line(event) + "\n")
                    self.console.flush()
            except (OSError, ValueError):
                pass  # a closed or broken terminal: the JSON log still has it

    def _to_file(self, event: dict[str, Any]) -> None:
        """One JSON line. A log that cannot be written (a full disk) never stops the run: lines
        are dropped, said once on stderr, and counted in the line written when it works again."""
        assert self.file is not None
        line = _JSON_LINE.encode(event) + "\n"
        now = time.monotonic()
        if self.dropped and now - self._failed_at < RETRY_FILE_S:
            self.dropped += 1
            return
        try:
            if self.dropped:
                self.file.write(json.dumps({"event": "log.lines_dropped", "level": "error", "lines": self.dropped,
                                            "timestamp": event.get("timestamp"), "run_id": event.get("run_id")}) + "\n")
            self.file.write(line)
            # `tail -f` sees a line within FLUSH_EVERY_S; a flush per row would cost a syscall each.
            if now - self._flushed >= FLUSH_EVERY_S or event["event"] != "row.outcome" or self.dropped:
                self.file.flush()
                self._flushed = now
            self.dropped = 0
        except OSError as exc:
            self.dropped += 1
            if self.dropped == 1:
                try:
                    sys.stderr.write(f"crawler: the log file cannot be written ({exc.strerror or exc}); "
                                     "its lines are dropped until it can\n")
                except (OSError, ValueError):
                    pass  # stderr on the same full disk: nothing more to say
            self._failed_at = now  # what the file's buffer still holds goes out with a later flush


def render_line(event: dict[str, Any]) -> str:
    """One event as a readable console line: `HH:MM:SS level event key=value ...`."""
    rest = " ".join(f"{k}={v}" for k, v in event.items()
                    if k not in ("event", "timestamp", "run_id", "level") and k not in FILE_ONLY_KEYS)
    return f"{str(event.get('timestamp', ''))[11:19]} {event.get('level', 'info'):5} {event.get('event')} {rest}".rstrip()


RETRY_FILE_S = 1.0  # a log file that failed is tried again this long after


_open_file: TextIO | None = None
_row_sink: tuple[_Fanout, Any, str | None] | None = None  # configure's fanout, time stamper and run id


def row(event: str, **fields: Any) -> None:
    """A per-row event at level info (a row's outcome): the very line `log.info(event, **fields)`
    writes, for half its CPU. A run writes one per row, and structlog's path (a logger bound per
    call, every context variable copied to find the run id, an exception to end the chain) cost
    about 25 µs of the figure job's per-row CPU; this one goes straight to the same fanout."""
    if _row_sink is None:
        structlog.get_logger().info(event, **fields)
        return
    fanout, stamp, run_id = _row_sink
    fields["event"] = event
    if run_id is not None:
        fields.setdefault("run_id", run_id)  # (as structlog's merge: a run_id given wins)
    fields["level"] = "info"
    fanout.emit(stamp(None, "info", fields))


def configure(run_id: str | None, log_file: Path | None, console: bool, verbose: bool = False,
              secrets: tuple[str, ...] = ()) -> None:
    """Route structlog to the run's JSON file and the console. Call again for the next run."""
    global _open_file, _row_sink
    if _open_file is not None:
        try:
            _open_file.close()
        except OSError as exc:  # its last lines could not be flushed (a full disk)
            sys.stderr.write(f"crawler: the log file's last lines could not be written ({exc.strerror or exc})\n")
        _open_file = None
    if log_file is not None:
        log_file.parent.mkdir(parents=True, exist_ok=True)
        _open_file = open(log_file, "a", buffering=1 << 16)
    stamp = structlog.processors.TimeStamper(fmt="iso", utc=True)
    processors: list[Any] = [structlog.contextvars.merge_contextvars, structlog.processors.add_log_level, stamp]
    structlog.contextvars.clear_contextvars()
    if run_id:
        structlog.contextvars.bind_contextvars(run_id=run_id)
    fanout = _Fanout(_open_file, sys.stderr if console else None, verbose, secrets)
    processors.append(fanout)
    structlog.configure(processors=processors, cache_logger_on_first_use=False)
    _row_sink = (fanout, stamp, run_id or None)


def close() -> None:
    configure(None, None, console=True)
