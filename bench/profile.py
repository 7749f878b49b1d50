"""Where the figure job's own CPU goes: one lifted run (the bench's 10 hosts, 10 KB images, no
rate caps) under py-spy, folded into a table of functions by self and inclusive share.

    python -m bench.profile [--rows 5000] [--gil] [--top 40]

Needs py-spy (`pip install py-spy`; it is on the package index). Prints the job's CPU per row
(from its summary) beside the bare aiohttp client's on the same simulator, then the table; keeps
py-spy's raw stacks in bench/out/profile/stacks.txt for a flame graph. A development tool: its
figures are not targets, and the sampler costs the job a few per cent.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import shutil
import subprocess
import sys
import warnings
from collections import Counter
from pathlib import Path

from bench import workload
from bench.rows import lifted_hosts, spread
from bench.suite import LIFTED_HOSTS, OUT, PY, REPO, Simulator, bare_client, lifted_budgets
from crawler.config import to_toml
from crawler.sandbox import pg

HOME = OUT / "profile"


def fold(stacks: Path, top: int) -> str:
    """py-spy's raw format: one line per distinct stack, `frame;frame;... count`, root first."""
    own: Counter[str] = Counter()
    inclusive: Counter[str] = Counter()
    total = 0
    for line in stacks.read_text().splitlines():
        frames, _, count = line.rpartition(" ")
        if not count.isdigit():
            continue
        n = int(count)
        total += n
        names = [f.split(" (")[0] + " (" + f.split(" (")[-1].split(":")[0].rsplit("/", 1)[-1] + ")"
                 for f in frames.split(";") if f]
        if names:
            own[names[-1]] += n
        for name in set(names):
            inclusive[name] += n
    lines = [f"{total} samples", f"{'self %':>7} {'incl %':>7}  function"]
    for name, n in own.most_common(top):
        lines.append(f"{100 * n / total:7.1f} {100 * inclusive[name] / total:7.1f}  {name}")
    lines.append("")
    lines.append(f"{'incl %':>7}  function (inclusive, top {top})")
    for name, n in inclusive.most_common(top):
        lines.append(f"{100 * n / total:7.1f}  {name}")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.profile", description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, default=5000)
    parser.add_argument("--gil", action="store_true", help="sample only the thread holding the GIL")
    parser.add_argument("--top", type=int, default=40)
    parser.add_argument("--inflight-per-host", type=int, default=8)
    parser.add_argument("--plain", action="store_true",
                        help="no sampler: the job's user and system CPU per row, for before/after comparisons")
    parser.add_argument("--calls", action="store_true",
                        help="count calls per row (cProfile; slow) into bench/out/profile/calls.txt")
    parser.add_argument("--strace", action="store_true",
                        help="count the job's system calls (strace -c -f; slow) into bench/out/profile/syscalls.txt")
    args = parser.parse_args(argv)
    spy = shutil.which("py-spy") or str(Path(PY).parent / "py-spy")
    if not args.plain and not Path(spy).exists():
        print("bench.profile: py-spy is not installed (pip install py-spy)", file=sys.stderr)
        return 2
    shutil.rmtree(HOME, ignore_errors=True)
    HOME.mkdir(parents=True)
    warnings.filterwarnings("ignore", message=".*XDG_RUNTIME_DIR.*")
    admin_dsn = pg.start(HOME / "pg", keep=False)
    shares = spread(args.rows, lifted_hosts(LIFTED_HOSTS))
    dsn = asyncio.run(workload.fresh_database(admin_dsn, "bench_profile", shares))
    asyncio.run(workload.fresh_repo(HOME / "artifacts"))
    sim = Simulator()
    try:
        bare_row = bare_client(sim.port, args.rows, args.inflight_per_host)
        floor_row = bare_client(sim.port, args.rows, args.inflight_per_host, store=HOME / "bare-store")
        tree = workload.crawler_config(dsn=dsn, root=HOME / "artifacts", reports=HOME / "reports", port=sim.port,
                                       hosts=lifted_hosts(LIFTED_HOSTS), budgets=lifted_budgets(args.inflight_per_host),
                                       fsync=True, rate_guard_s=0.0)
        (HOME / "config.toml").write_text(to_toml(tree))
        stacks = HOME / "stacks.txt"
        job = ["crawler", "figures", "--config", str(HOME / "config.toml")]
        if args.calls:
            subprocess.run([PY, "-m", "cProfile", "-o", str(HOME / "calls.prof"), "-m", *job], cwd=REPO,
                           check=False, stdout=subprocess.DEVNULL, timeout=3600)
        elif args.strace:
            subprocess.run(["strace", "-f", "-c", "-o", str(HOME / "syscalls.txt"), PY, "-m", *job], cwd=REPO,
                           check=False, stdout=subprocess.DEVNULL, timeout=3600)
        elif args.plain:
            subprocess.run([PY, "-m", "bench.measured", str(HOME / "stats.json"), *job], cwd=REPO, check=False,
                           stdout=subprocess.DEVNULL, timeout=3600)
        else:
            subprocess.run([spy, "record", "--format", "raw", "--rate", "250", "--output", str(stacks),
                            *(["--gil"] if args.gil else []), "--", PY, "-m", *job],
                           cwd=REPO, check=False, stdout=subprocess.DEVNULL, timeout=3600)
    finally:
        sim.stop()
    summary = json.loads(sorted((HOME / "reports").glob("*/summary.json"))[-1].read_text())
    job_ms = 1000 * summary["cpu_s"]["self"] / max(summary["attempted"], 1)
    bare_ms = 1000 * bare_row["cpu_s"] / max(bare_row["rows"], 1)
    floor_ms = 1000 * floor_row["cpu_s"] / max(floor_row["rows"], 1)
    print(f"job CPU per row {job_ms:.3f} ms{'' if args.plain else ' (sampled)'}, bare client {bare_ms:.3f} ms: "
          f"{job_ms / bare_ms:.2f} x; bare client storing the bodies {floor_ms:.3f} ms "
          f"({1000 * floor_row['cpu_system_s'] / max(floor_row['rows'], 1):.3f} of it kernel): job {job_ms / floor_ms:.2f} x that")
    if args.strace:
        print((HOME / "syscalls.txt").read_text())
        return 0
    if args.calls:
        import pstats
        stats = pstats.Stats(str(HOME / "calls.prof"))
        rows = max(summary["attempted"], 1)
        top = sorted(stats.stats.items(), key=lambda kv: -kv[1][1])[:args.top]  # by primitive calls
        for (file, line, name), (_cc, nc, tt, ct, _callers) in top:
            print(f"{nc / rows:8.2f} calls/row {1e6 * tt / rows:8.1f} us self/row  {name} ({Path(file).name}:{line})")
        return 0
    if args.plain:
        stats = json.loads((HOME / "stats.json").read_text())
        print(f"of which system {1000 * stats['cpu_self_sys_s'] / max(summary['attempted'], 1):.3f} ms, "
              f"the event loop's thread {1000 * summary['cpu_s'].get('main_thread', 0) / max(summary['attempted'], 1):.3f} ms; "
              f"children (commit worker, git) {1000 * stats['cpu_children_s'] / max(summary['attempted'], 1):.3f} ms; "
              f"in the garbage collector {1000 * stats['gc_s'] / max(summary['attempted'], 1):.3f} ms "
              f"(collections by generation {stats['gc_collections']})")
        return 0
    print(fold(stacks, args.top))
    return 0


if __name__ == "__main__":
    sys.exit(main())
