"""`crawler tail [RUN_ID]`: follow a run's log as readable lines (CONTRACT.md §2).

Without RUN_ID it follows the newest run under `report.dir` that is still going; if none is, it
waits for the next run to start and follows that. A RUN_ID whose log does not appear within
NAMED_WAIT_S is no run: exit 2. It returns once the run it follows has ended (its
`run.finish` line), exit 0. A run whose log stays silent for longer than three progress
intervals (and at least `SILENT_MIN_S`) was killed: said in one line, exit 1.
"""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path
from typing import TextIO

from .logs import render_line

POLL_S = 0.2
# Silence that means a run was stopped without a word. Generous: a job's last commit, or an
# apply of a long changeset, may write nothing for minutes; `crawler status` (heartbeats) is
# the sharper test.
SILENT_MIN_S = 300.0
NAMED_WAIT_S = 10.0  # how long a named run's log may take to appear before "no such run"


def _runs(root: Path) -> list[Path]:
    return sorted(p for p in root.iterdir() if (p / "log.jsonl").is_file()) if root.is_dir() else []


def _ended(log: Path) -> bool:
    try:
        with open(log, "rb") as fh:
            fh.seek(max(0, log.stat().st_size - 65536))
            return b'"run.finish"' in fh.read()
    except OSError:
        return False


def newest_going(root: Path) -> Path | None:
    """The newest run whose log has no end yet (a plan that ended after it does not hide it)."""
    going = [r for r in _runs(root) if not _ended(r / "log.jsonl")]
    return going[-1] if going else None


def follow(root: Path, run_id: str | None, progress_interval_s: float, out: TextIO | None = None,
           max_wait_s: float | None = None) -> int:
    """Returns the exit status. `max_wait_s` bounds waiting for a run to start (None: no bound)."""
    out = sys.stdout if out is None else out
    silent_limit = max(3 * progress_interval_s, SILENT_MIN_S)
    began = time.monotonic()
    if run_id is not None:
        folder = root / run_id
        while not (folder / "log.jsonl").is_file():
            if max_wait_s is not None and time.monotonic() - began > max_wait_s:
                print(f"crawler: no run {run_id} under {root}/", file=sys.stderr)
                return 2
            time.sleep(POLL_S)
    else:
        runs = _runs(root)
        newest = runs[-1] if runs else None
        going = newest_going(root)
        if going is not None:
            folder = going
        else:
            print(f"crawler tail: waiting for the next run under {root}/", file=sys.stderr, flush=True)
            while True:
                runs = _runs(root)
                if runs and (newest is None or runs[-1].name > newest.name):
                    folder = runs[-1]
                    break
                if max_wait_s is not None and time.monotonic() - began > max_wait_s:
                    return 0
                time.sleep(POLL_S)
    print(f"crawler tail: following {folder.name}", file=sys.stderr, flush=True)
    with open(folder / "log.jsonl", "rb") as fh:
        pending = b""
        heard = time.monotonic()
        while True:
            chunk = fh.read(1 << 16)
            if chunk:
                heard = time.monotonic()
                pending += chunk
                *lines, pending = pending.split(b"\n")
                for raw in lines:
                    try:
                        event = json.loads(raw)
                    except ValueError:
                        continue  # a line being written; or not ours
                    out.write(render_line(event) + "\n")
                    if event.get("event") == "run.finish":
                        out.flush()
                        return 0
                out.flush()
                continue
            if time.monotonic() - heard > silent_limit:
                print(f"crawler: run {folder.name} has written nothing for {silent_limit:.0f} s and has not "
                      "finished: it was stopped without a chance to say so (crawler status shows it lost)",
                      file=sys.stderr)
                return 1
            time.sleep(POLL_S)
