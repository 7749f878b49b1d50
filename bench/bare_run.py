"""A bare aiohttp HEAD-then-GET loop over the lifted workload: no database, files, hashing or
commits. It is the ceiling the machine and simulator allow an aiohttp client, against which the
crawler's rows/s are read (the issue quotes about 4,000 rows/s on its reference machine).

    python -m bench.bare_run --port P --rows N --hosts H --inflight-per-host K

Prints one JSON line: rows, wall seconds, rows/s, CPU seconds of this process.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import resource
import sys
import time
from collections import defaultdict

import aiohttp

from bench.rows import lifted_hosts, spread, urls


async def run(port: int, rows: int, hosts: int, inflight: int) -> float:
    queues: dict[str, list[tuple[str, str]]] = defaultdict(list)
    for _i, host, url in urls(spread(rows, lifted_hosts(hosts))):
        queues[host].append((host, url.replace(f"http://{host}", f"http://127.0.0.1:{port}", 1)))
    for q in queues.values():
        q.reverse()  # popped from the end: table order
    async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=0)) as session:
        async def worker(q: list[tuple[str, str]]) -> None:
            while q:
                host, url = q.pop()
                async with session.head(url, headers={"Host": host}) as resp:
                    ok = resp.status == 200
                if ok:
                    async with session.get(url, headers={"Host": host}) as resp:
                        await resp.read()
        started = time.perf_counter()
        await asyncio.gather(*[worker(q) for q in queues.values() for _ in range(inflight)])
        return time.perf_counter() - started


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.bare_run", description=__doc__.splitlines()[0])
    for name in ("--port", "--rows", "--hosts", "--inflight-per-host"):
        parser.add_argument(name, type=int, required=True)
    args = parser.parse_args(argv)
    wall = asyncio.run(run(args.port, args.rows, args.hosts, args.inflight_per_host))
    usage = resource.getrusage(resource.RUSAGE_SELF)
    print(json.dumps({"rows": args.rows, "wall_s": round(wall, 3), "rows_per_s": round(args.rows / wall, 1),
                      "cpu_s": round(usage.ru_utime + usage.ru_stime, 3)}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
