"""What keeping the checkout's index in step with the branch costs per commit.

    python -m bench.index [--sizes 20000,200000] [--calls 30]

Every commit call of the job (up to four batches of 100 files) now also rewrites the checkout's
index under git's index.lock, so that a user's `git commit` can never record the deletion of the
job's files. For each size N this builds a repository whose branch and index already track N
figure files (one entry per file, five per paper folder, as the figure layout has them), then
makes `--calls` commit calls of 400 new files through the job's own GitRepo, twice:
  split     the shipped setting (artifacts.split_index): the index kept split, so a call
            rewrites the entries changed since the shared part;
  full      split_index = false: the whole index rewritten on every call (the baseline).
Reported per call: wall time of the whole call, the part spent on the index, and its median
and worst; the index's share of the call. Writes bench/out/index.json and index.md.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from crawler.git import GitRepo

OUT = Path(__file__).resolve().parent / "out"
WORK = OUT / "work" / "index"
PER_PAPER = 5
FILES_PER_CALL = 400
BATCH = 100


def git(root: Path, *args: str, stdin: bytes | None = None) -> str:
    return subprocess.run(["git", *args], cwd=root, input=stdin, check=True, capture_output=True).stdout.decode().strip()


def build(root: Path, n: int) -> None:
    """A repository whose branch and index track n files (one shared blob: only the index and
    the trees matter here), with no files on disk for them."""
    shutil.rmtree(root, ignore_errors=True)
    root.mkdir(parents=True)
    git(root, "init", "-q", "-b", "main")
    blob = git(root, "hash-object", "-w", "--stdin", stdin=b"\x89PNG existing figure")
    entries = b"".join(b"100644 blob %s\tfigures/papers/P%07d/f%08d.png\0" % (blob.encode(), k // PER_PAPER, k)
                       for k in range(n))
    git(root, "update-index", "-z", "--index-info", stdin=entries)
    tree = git(root, "write-tree")
    commit = git(root, "-c", "user.name=b", "-c", "user.email=b@b", "commit-tree", tree, "-m", "existing figures")
    git(root, "update-ref", "refs/heads/main", commit)


async def measure(root: Path, n: int, calls: int, split: bool) -> dict[str, Any]:
    repo = GitRepo(root, 600, "crawler", "crawler@localhost", split_index=split)
    await repo.check()
    walls, index = [], []
    k = n
    for call in range(calls):
        batches = []
        known: dict[str, bytes] = {}
        for b in range(FILES_PER_CALL // BATCH):
            paths = []
            for _ in range(BATCH):
                rel = f"figures/papers/P{k // PER_PAPER:07d}/f{k:08d}.png"
                body = b"\x89PNG new figure %d" % k
                (root / rel).parent.mkdir(parents=True, exist_ok=True)
                (root / rel).write_bytes(body)
                known[rel] = body
                paths.append(rel)
                k += 1
            batches.append((paths, f"call {call} batch {b}"))
        repo.index_s = 0.0
        t0 = time.perf_counter()
        await repo.commit_batches(batches, known)
        walls.append(time.perf_counter() - t0)
        index.append(repo.index_s)
    await repo.close()
    tracked = len(git(root, "ls-files").splitlines())  # every file, old and new, known to the index
    size = (root / ".git" / "index").stat().st_size
    shared = [p.stat().st_size for p in (root / ".git").glob("sharedindex.*")]
    return {
        "mode": "split" if split else "full", "files_before": n, "files_after": tracked, "calls": calls,
        "call_ms_median": round(1000 * statistics.median(walls), 1), "call_ms_max": round(1000 * max(walls), 1),
        "index_ms_median": round(1000 * statistics.median(index), 1), "index_ms_max": round(1000 * max(index), 1),
        "index_ms_mean": round(1000 * statistics.fmean(index), 1),
        "index_share": round(sum(index) / sum(walls), 3),
        "index_file_bytes": size, "shared_index_files": len(shared), "shared_index_bytes": max(shared, default=0),
    }


def table(rows: list[dict[str, Any]]) -> str:
    head = ("| files tracked | index | call ms (median / max) | index ms (median / mean / max) | index share of call "
            "| index file | shared part |")
    lines = [head, "|---:|---|---:|---:|---:|---:|---:|"]
    for r in rows:
        lines.append(f"| {r['files_before']:,} | {r['mode']} | {r['call_ms_median']} / {r['call_ms_max']} "
                     f"| {r['index_ms_median']} / {r['index_ms_mean']} / {r['index_ms_max']} | {r['index_share']:.0%} "
                     f"| {r['index_file_bytes'] / 1e6:.2f} MB | {r['shared_index_bytes'] / 1e6:.2f} MB |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.index", description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", default="20000,200000", help="files tracked before the calls, comma-separated")
    parser.add_argument("--calls", type=int, default=30, help="commit calls of 400 files per size and mode")
    args = parser.parse_args(argv)
    rows = []
    for n in (int(x) for x in args.sizes.split(",")):
        for split in (True, False):
            root = WORK / f"{n}-{'split' if split else 'full'}"
            print(f"index: {n:,} files tracked, {'split' if split else 'full'} index: building", flush=True)
            build(root, n)
            rows.append(asyncio.run(measure(root, n, args.calls, split)))
            shutil.rmtree(root, ignore_errors=True)
    OUT.mkdir(parents=True, exist_ok=True)
    (OUT / "index.json").write_text(json.dumps(rows, indent=2) + "\n")
    text = table(rows)
    (OUT / "index.md").write_text(text + "\n")
    print()
    print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
