"""How long `crawler status --json` takes on a large table, against a bare `count(*)` of the
same table in the same run (the floor for anything that reads every row).

    python -m bench.status [--rows 1000000] [--repeat 3]

Builds the table with the bench's own rows (an embedded PostgreSQL of its own), a third of them
stamped as a run would (fetched, unavailable, transient), then times the CLI end to end (process
start included) and the aggregate query alone. Writes bench/out/status.json and status.md.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import asyncpg

from bench import rows, workload
from crawler.config import to_toml
from crawler.sandbox import pg

OUT = Path(__file__).resolve().parent / "out"
ROOT = Path(__file__).resolve().parent.parent


async def prepare(admin: str, n: int) -> str:
    dsn = await workload.fresh_database(admin, "bench_status", rows.spread(n, rows.lifted_hosts(10)))
    conn = await asyncpg.connect(dsn)
    try:  # a third of the rows with a run's stamps, so the states are not all "missing"
        await conn.execute("""
            update artifacts set
              file_path = case when (substr(id, 5)::int % 3) = 0 then 'figures/x/' || id || '.png' end,
              metadata = metadata || case (substr(id, 5)::int % 9)
                when 0 then '{"image_fetch_outcome": "fetched"}'::jsonb
                when 1 then '{"image_unavailable": true, "image_fetch_outcome": "hard_404"}'::jsonb
                when 2 then '{"image_fetch_outcome": "transient", "image_next_attempt_at": "2999-01-01T00:00:00Z"}'::jsonb
                else '{}'::jsonb end
            where substr(id, 5)::int % 3 = 0 or substr(id, 5)::int % 9 in (1, 2)""")
        await conn.execute("vacuum analyze artifacts")
    finally:
        await conn.close()
    return dsn


async def bare_count(dsn: str) -> float:
    conn = await asyncpg.connect(dsn)
    try:
        t0 = time.perf_counter()
        await conn.fetchval("select count(*) from artifacts")
        return time.perf_counter() - t0
    finally:
        await conn.close()


def cli_status(dsn: str, tmp: Path) -> float:
    cfg = tmp / "status.toml"
    cfg.write_text(to_toml({"db": {"dsn": dsn}, "report": {"dir": str(tmp / "reports")}}))
    t0 = time.perf_counter()
    out = subprocess.run([sys.executable, "-m", "crawler", "status", "--json", "--config", str(cfg)], cwd=ROOT,
                         env={**os.environ, "PYTHONPATH": str(ROOT)}, capture_output=True, text=True, timeout=600)
    took = time.perf_counter() - t0
    if out.returncode != 0:
        raise SystemExit(f"status failed: {out.stderr.strip()}")
    json.loads(out.stdout)
    return took


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, default=1_000_000)
    parser.add_argument("--repeat", type=int, default=3)
    args = parser.parse_args()
    # The folder stays until the embedded server, which removes its data when this process
    # exits, has stopped (removing it first leaves the server running).
    tmp = Path(tempfile.mkdtemp(prefix="bench-status-"))
    admin = pg.start(tmp / "pg", keep=False)
    dsn = asyncio.run(prepare(admin, args.rows))
    cli = [cli_status(dsn, tmp) for _ in range(args.repeat)]
    floor = [asyncio.run(bare_count(dsn)) for _ in range(args.repeat)]
    result = {"rows": args.rows, "status_cli_s": cli, "count_s": floor,
              "status_median_s": statistics.median(cli), "count_median_s": statistics.median(floor)}
    OUT.mkdir(parents=True, exist_ok=True)
    (OUT / "status.json").write_text(json.dumps(result, indent=2))
    text = (f"crawler status --json on {args.rows:,} rows: median {result['status_median_s']:.2f} s end to end "
            f"(process start included); select count(*) alone: {result['count_median_s']:.2f} s "
            f"({result['status_median_s'] / max(result['count_median_s'], 1e-9):.1f}x)\n")
    (OUT / "status.md").write_text(text)
    print(text, end="")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
