"""A bare aiohttp HEAD-then-GET loop over the lifted workload: no database, files, hashing or
commits. It is the ceiling the machine and simulator allow an aiohttp client, against which the
crawler's rows/s are read (the issue quotes about 4,000 rows/s on its reference machine).

    python -m bench.bare_run --port P --rows N --hosts H --inflight-per-host K [--store DIR]

With `--store DIR` it also does the least any job that keeps the images must: each body hashed
(sha256) and written to its own file under DIR at the crawler's path for the row (a temporary
file beside it, then a rename), right on the event loop, with no thread, database, log or commit.
Its CPU per row is the floor under the job's on this machine and file system, measured the same
way in the same run.

Prints one JSON line: rows, wall seconds, rows/s, CPU seconds of this process (and the kernel's
part of them).
"""

from __future__ import annotations

import argparse
import asyncio
import hashlib
import json
import os
import resource
import sys
import time
from collections import defaultdict

import aiohttp

from bench.rows import figure_path, lifted_hosts, spread, urls


def store(root: str, i: int, body: bytes) -> str:
    """Row `i`'s body at its path under `root`, whole or not at all; its sha256."""
    digest = hashlib.sha256(body).hexdigest()
    final = os.path.join(root, figure_path(i))
    part = f"{final}.part"
    try:
        fh = open(part, "wb")
    except FileNotFoundError:  # the paper's first figure: its folder is new
        os.makedirs(os.path.dirname(final), exist_ok=True)
        fh = open(part, "wb")
    with fh:
        fh.write(body)
    os.replace(part, final)
    return digest


async def run(port: int, rows: int, hosts: int, inflight: int, root: str | None = None) -> float:
    queues: dict[str, list[tuple[int, str, str]]] = defaultdict(list)
    for i, host, url in urls(spread(rows, lifted_hosts(hosts))):
        queues[host].append((i, host, url.replace(f"http://{host}", f"http://127.0.0.1:{port}", 1)))
    for q in queues.values():
        q.reverse()  # popped from the end: table order
    async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=0)) as session:
        async def worker(q: list[tuple[str, str]]) -> None:
            while q:
                i, host, url = q.pop()
                async with session.head(url, headers={"Host": host}) as resp:
                    ok = resp.status == 200
                if ok:
                    async with session.get(url, headers={"Host": host}) as resp:
                        body = await resp.read()
                    if root is not None and resp.status == 200:
                        store(root, i, body)
        started = time.perf_counter()
        await asyncio.gather(*[worker(q) for q in queues.values() for _ in range(inflight)])
        return time.perf_counter() - started


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.bare_run", description=__doc__.splitlines()[0])
    for name in ("--port", "--rows", "--hosts", "--inflight-per-host"):
        parser.add_argument(name, type=int, required=True)
    parser.add_argument("--store", metavar="DIR", help="also hash each body and write it to its file under DIR")
    args = parser.parse_args(argv)
    wall = asyncio.run(run(args.port, args.rows, args.hosts, args.inflight_per_host, args.store))
    usage = resource.getrusage(resource.RUSAGE_SELF)
    print(json.dumps({"rows": args.rows, "wall_s": round(wall, 3), "rows_per_s": round(args.rows / wall, 1),
                      "cpu_s": round(usage.ru_utime + usage.ru_stime, 3), "cpu_system_s": round(usage.ru_stime, 3)}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
