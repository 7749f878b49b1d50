"""Run a module as ``__main__`` in this process, then write what it cost as JSON.

    python -m bench.measured STATS_FILE MODULE [ARGS...]

The figures are about this process alone: its peak RSS (VmHWM) is the module's, not that of a
git or any other child, whose CPU is reported apart (RUSAGE_CHILDREN). Measuring from inside is
the only way to get the crawler's own peak: a parent's wait4() folds the children's peaks into
it, and a forked child's peak is the parent's size at the fork, so it says nothing either.
"""

from __future__ import annotations

import gc
import json
import os
import resource
import runpy
import sys
import time
from pathlib import Path


def vm_hwm_kb() -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1])
    return -1


def use_event_loop(name: str) -> None:
    """`BENCH_EVENT_LOOP=uvloop`: the module's asyncio.run() gets uvloop's loop (the `bench`
    extra), for the loop scenario's comparison; the tool itself always runs on asyncio's own."""
    if name == "uvloop":
        import asyncio

        import uvloop
        asyncio.set_event_loop_policy(uvloop.EventLoopPolicy())
    elif name not in ("", "asyncio"):
        raise SystemExit(f"BENCH_EVENT_LOOP={name!r}: asyncio or uvloop")


class GcClock:
    """Wall time spent in Python's cyclic garbage collector, and collections per generation."""

    def __init__(self) -> None:
        self.seconds = 0.0
        self.collections = [0, 0, 0]
        self._began = 0.0

    def __call__(self, phase: str, info: dict[str, int]) -> None:
        if phase == "start":
            self._began = time.perf_counter()
        else:
            self.seconds += time.perf_counter() - self._began
            self.collections[info["generation"]] += 1


def main() -> int:
    use_event_loop(os.environ.get("BENCH_EVENT_LOOP", ""))
    gc_clock = GcClock()
    gc.callbacks.append(gc_clock)
    stats_file, module, *args = sys.argv[1:]
    sys.argv = [module, *args]
    started = time.monotonic()
    code: int | str | None = 0
    try:
        runpy.run_module(module, run_name="__main__", alter_sys=True)
    except SystemExit as exc:
        code = exc.code
    wall = time.monotonic() - started
    own = resource.getrusage(resource.RUSAGE_SELF)
    kids = resource.getrusage(resource.RUSAGE_CHILDREN)
    Path(stats_file).write_text(json.dumps({
        "exit": code if isinstance(code, int) else (0 if code is None else 1),
        "wall_s": round(wall, 3),
        "cpu_self_s": round(own.ru_utime + own.ru_stime, 3),
        "cpu_self_sys_s": round(own.ru_stime, 3),
        "cpu_children_s": round(kids.ru_utime + kids.ru_stime, 3),
        "peak_rss_kb": vm_hwm_kb(),
        "gc_s": round(gc_clock.seconds, 3),
        "gc_collections": gc_clock.collections,
    }))
    return code if isinstance(code, int) else (0 if code is None else 1)


if __name__ == "__main__":
    sys.exit(main())
