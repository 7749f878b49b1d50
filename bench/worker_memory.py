"""The commit worker's memory alone, at a small and a large repository, in minutes rather than
the half hour of the million-row job (`python -m bench.worker_memory`).

For each size: a repository with that many figures under `figures/papers/<paper>/` (five a
paper, as the job lays them out) is built with the worker's own pack writer in large calls, and
its checkout's index split (`git update-index --split-index`). Then a fresh process does what
the job's commit worker does for the last rows of a run: calls of 4 batches of 100 new 10 KB
files, each followed by keeping the index in step (crawler.gitindex.add), and reports its peak
RSS (VmHWM), with the part before the first call (Python and imports) given apart. The object
reader (`git cat-file`) is a process of its own and not counted here.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

OUT = Path(__file__).resolve().parent / "out"
WORK = OUT / "work" / "worker-memory"
PER_PAPER = 5
BATCH, BATCHES = 100, 4


def _blob(i: int, size: int) -> tuple[str, bytes]:
    data = (b"%07d" % i) * (size // 7 + 1) if size else b"%d" % i
    return f"figures/papers/PMID-{i // PER_PAPER:07d}/fig-{i:07d}.png", data[:size] if size else data


def _vm(key: str) -> int:
    with open("/proc/self/status") as fh:
        for line in fh:
            if line.startswith(key):
                return int(line.split()[1]) // 1024
    return 0


def fill(root: Path, files: int) -> str:
    """A repository holding `files` small figures, its index split; the tip."""
    from crawler import gitpack
    subprocess.run(["git", "init", "-q", "-b", "main", str(root)], check=True)
    packer = gitpack.PackCommitter(root, root / ".git" / "objects", dict(os.environ), 120, b"bench <bench@localhost>")
    tip = None
    step = 20_000
    try:
        for start in range(0, files, step):
            blobs = []
            for i in range(start, min(start + step, files)):
                path, data = _blob(i, 0)
                blobs.append(gitpack.Blob(path, b"100644", hashlib.sha1(b"blob %d\0" % len(data) + data).digest(),
                                          len(data), data))
            tip = packer.commit(tip, [(blobs, "fill")])[-1]
    finally:
        packer.close()
    subprocess.run(["git", "update-ref", "refs/heads/main", tip], cwd=root, check=True)
    subprocess.run("git ls-tree -r main | git update-index --index-info", shell=True, cwd=root, check=True)
    subprocess.run(["git", "-c", "splitIndex.maxPercentChange=5", "update-index", "--split-index"], cwd=root, check=True)
    return tip


def measure(root: Path, tip: str, first: int, calls: int, size: int) -> dict[str, float]:
    """In this process (a fresh one): `calls` calls of BATCHES x BATCH new files, each followed
    by the index step; peak RSS before and after."""
    from crawler import gitindex, gitpack, native
    native.one_malloc_arena()  # as the worker does (gitpack.serve)
    gitdir = root / ".git"
    packer = gitpack.PackCommitter(root, gitdir / "objects", dict(os.environ), 120, b"bench <bench@localhost>")
    before = _vm("VmHWM")
    t0 = time.perf_counter()
    i = first
    try:
        for _ in range(calls):
            batches = []
            for _b in range(BATCHES):
                blobs = []
                for _k in range(BATCH):
                    path, data = _blob(i, size)
                    blobs.append(gitpack.Blob(path, b"100644", hashlib.sha1(b"blob %d\0" % len(data) + data).digest(),
                                              len(data), data))
                    i += 1
                batches.append((blobs, "bench"))
            tip = packer.commit(tip, batches)[-1]
            gitindex.add(gitdir / "index", gitdir / "index.bench", gitindex.parse_index_info(packer.entries), gitdir)
            os.replace(gitdir / "index.bench", gitdir / "index")
            native.malloc_trim()
    finally:
        packer.close()
    return {"peak_mb": _vm("VmHWM"), "before_first_call_mb": before, "rss_end_mb": _vm("VmRSS"),
            "calls": calls, "s_per_call": round((time.perf_counter() - t0) / calls, 4)}


def run_size(files: int, calls: int, size: int) -> dict[str, float]:
    root = WORK / f"repo-{files}"
    shutil.rmtree(root, ignore_errors=True)
    root.parent.mkdir(parents=True, exist_ok=True)
    t = time.monotonic()
    tip = fill(root, files)
    print(f"  {files:,} files: repository built in {time.monotonic() - t:.0f} s", flush=True)
    out = subprocess.run([sys.executable, "-m", "bench.worker_memory", "--measure", str(root), tip, str(files),
                          str(calls), str(size)], check=True, capture_output=True, text=True,
                         cwd=Path(__file__).resolve().parents[1])
    result = json.loads(out.stdout.strip().splitlines()[-1])
    shutil.rmtree(root, ignore_errors=True)
    return result


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.worker_memory", description=__doc__.splitlines()[0])
    parser.add_argument("--small", type=int, default=10_000)
    parser.add_argument("--large", type=int, default=1_000_000)
    parser.add_argument("--calls", type=int, default=150, help="calls measured at each size")
    parser.add_argument("--measure", nargs=5, metavar=("ROOT", "TIP", "FIRST", "CALLS", "SIZE"), help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.measure:
        root, tip, first, calls, size = args.measure
        print(json.dumps(measure(Path(root), tip, int(first), int(calls), int(size))))
        return 0
    results = {}
    for files in (args.small, args.large):
        results[files] = run_size(files, args.calls, 10_000)
        print(f"  {files:,} files: {results[files]}", flush=True)
    small, large = results[args.small]["peak_mb"], results[args.large]["peak_mb"]
    print(f"commit worker peak RSS: {large} / {small} MB = {large / small:.2f} x "
          f"({args.large:,} against {args.small:,} files)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
