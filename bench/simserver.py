"""The upstream simulator in a process of its own, for the benchmark.

    python -m bench.simserver [--latency-ms N] [--keep-log] [--max-seconds S]

Prints ``PORT <n>`` once it listens on 127.0.0.1, serves until SIGTERM/SIGINT (or
``--max-seconds``), then prints one JSON line of what it saw and exits.

It holds nothing per row, so a million-row table costs it no memory: the URL path decides the
answer. ``/img/...`` is a ~10 KB PNG unique to that path (its sha256 differs per row, so git
stores a blob per file, as in real life); any other path is the simulator's default 404.
``--latency-ms`` delays every response, standing in for a real server's think time.

The request log is folded into counters every second instead of growing for the whole run,
unless ``--keep-log``, which keeps every record for the politeness figures (small runs only).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import resource
import signal
import struct
import sys
import time
import zlib
from collections import Counter, defaultdict
from typing import Any

from crawler.sandbox import images
from crawler.sandbox.simulator import Behaviour, UpstreamSimulator, max_starts_in_window

IMAGE_PREFIX = "/img/"
IMAGE_BYTES = 10_000
PNG_HEAD_BYTES = 8 + 25  # the signature and the IHDR chunk: a path chunk goes right after them


def _png_chunk(kind: bytes, data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))


class BenchSimulator(UpstreamSimulator):
    """The sandbox simulator, answering by path pattern instead of a per-row route table."""

    def __init__(self, latency_s: float) -> None:
        super().__init__(default=Behaviour(
            status=404, body=b"<html><body><h1>404 Not Found</h1></body></html>",
            content_type="text/html", delay_s=latency_s))
        self.latency_s = latency_s
        base = images.png(20260315, IMAGE_BYTES)
        self._png_head, self._png_rest = base[:PNG_HEAD_BYTES], base[PNG_HEAD_BYTES:]

    def _next_behaviour(self, key: tuple[str, str]) -> Behaviour:
        # The simulator's own lookup hook: building the body here, per request, is what keeps
        # memory flat. A private ancillary chunk naming the path makes each body a distinct,
        # still valid PNG for the cost of one small CRC (a fresh images.png() costs ~100 µs).
        host, path = key
        if not path.startswith(IMAGE_PREFIX):
            return self.default
        body = self._png_head + _png_chunk(b"paTh", f"{host}{path}".encode()) + self._png_rest
        return Behaviour(body=body, content_type="image/png", delay_s=self.latency_s)


class Tally:
    """Counters folded from the simulator's log, so the log never holds more than ~1 s of records."""

    def __init__(self) -> None:
        self.by_host: defaultdict[str, Counter[str]] = defaultdict(Counter)
        self.first_start: float | None = None
        self.last_end: float | None = None

    def fold(self, records: list[Any]) -> None:
        for r in records:
            counts = self.by_host[r.host]
            counts[r.method] += 1
            counts[f"status_{r.status}"] += 1
            self.first_start = r.start if self.first_start is None else min(self.first_start, r.start)
            self.last_end = r.end if self.last_end is None else max(self.last_end, r.end)


async def serve(latency_s: float, keep_log: bool, max_seconds: float) -> dict[str, Any]:
    sim = BenchSimulator(latency_s)
    tally = Tally()
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    port = await sim.start("127.0.0.1", 0)
    print(f"PORT {port}", flush=True)
    deadline = time.monotonic() + max_seconds
    while not stop.is_set() and time.monotonic() < deadline:
        try:
            await asyncio.wait_for(stop.wait(), 1.0)
        except TimeoutError:
            pass
        if not keep_log:
            # Handlers append in their `finally`, on this same thread: swap, then fold.
            records, sim.log = sim.log, []
            tally.fold(records)
    await sim.stop()
    tally.fold(sim.log)
    usage = resource.getrusage(resource.RUSAGE_SELF)
    out: dict[str, Any] = {
        "requests": sum(c["HEAD"] + c["GET"] for c in tally.by_host.values()),
        "by_host": {h: dict(c) for h, c in sorted(tally.by_host.items())},
        # CLOCK_MONOTONIC is system-wide on Linux, so the caller can compare these with its own.
        "first_start": tally.first_start, "last_end": tally.last_end,
        "cpu_s": round(usage.ru_utime + usage.ru_stime, 3), "max_rss_kb": usage.ru_maxrss,
        "stopped_by_deadline": not stop.is_set(),
    }
    if keep_log:
        out["log"] = [[r.host, r.method, r.start, r.end, r.status] for r in sim.log]
        out["max_starts_in_1s"] = {h: max_starts_in_window([r.start for r in sim.log if r.host == h])
                                   for h in tally.by_host}
        out["max_inflight"] = {h: sim.max_inflight([h]) for h in tally.by_host}
        # The same request (host, method, path) seen more than once: what cooperating processes
        # must never do.
        seen = Counter((r.host, r.method, r.path) for r in sim.log)
        out["repeated"] = sum(n - 1 for n in seen.values() if n > 1)
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.simserver", description=__doc__.splitlines()[0])
    parser.add_argument("--latency-ms", type=float, default=0.0, help="delay before every response")
    parser.add_argument("--keep-log", action="store_true", help="keep and report every request (small runs)")
    parser.add_argument("--max-seconds", type=float, default=3600.0, help="stop by itself after this long")
    args = parser.parse_args(argv)
    result = asyncio.run(serve(args.latency_ms / 1000, args.keep_log, args.max_seconds))
    sys.stdout.write(json.dumps(result) + "\n")
    sys.stdout.flush()
    return 0


if __name__ == "__main__":
    sys.exit(main())
