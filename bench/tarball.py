"""Tarball scan benchmark: the recovery job's streaming scanner on a ≥ 1 GB .tar.gz.

    python -m bench.tarball [--size-mb N] [--small-mb M]

1. Builds a .tar.gz of about N MB compressed (default 1100) in bench/out/work: members of
   4 MiB, half random bytes and half CSV-like text, compressed with `gzip -1`.
2. Baseline: `gzip -dc FILE | tar -t > /dev/null`, timed.
3. The scanner, in a fresh subprocess (so its peak RSS is its own), fed two ways:
   - from the local file, in 1 MiB chunks (the scanner alone);
   - streamed from a local S3 (moto's server in a process of its own, on loopback) through
     crawler.s3, as the job reads a backup.
   Each extracts the handful of members a `wanted` predicate names, hashing them.
4. Peak RSS of the scanner on an M MB tarball (default 256) against the N MB one: flat means
   memory does not follow the tarball's size.
Prints a table and writes bench/out/tarball.json and tarball.md.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import socket
import subprocess
import sys
import tarfile
import tempfile
import time
from pathlib import Path

OUT = Path(__file__).resolve().parent / "out"
WORK = OUT / "work"
MEMBER_BYTES = 4 << 20
WANTED = {"data/member_000007.csv", "data/member_000123.csv", "data/member_000200.csv"}


def build(path: Path, target_mb: int) -> int:
    """A .tar.gz of about `target_mb` MB; returns the member count. Reuses a file of the right size."""
    if path.exists() and path.stat().st_size >= target_mb * 1_000_000 * 0.97:
        with open(path.with_suffix(".members"), "r") as fh:
            return int(fh.read())
    rng = os.urandom
    text = b"".join(b"%d,sample_%d,%f,GENE%05d\n" % (i, i % 97, i * 0.001, i % 20000) for i in range(60000))
    members = 0
    with open(path, "wb") as out:
        gz = subprocess.Popen(["gzip", "-1", "-c"], stdin=subprocess.PIPE, stdout=out)
        assert gz.stdin is not None
        with tarfile.open(fileobj=gz.stdin, mode="w|") as tar:
            while out.tell() < target_mb * 1_000_000 or members == 0:
                body = rng(MEMBER_BYTES // 2) + (text * (MEMBER_BYTES // 2 // len(text) + 1))[: MEMBER_BYTES // 2]
                info = tarfile.TarInfo(f"data/member_{members:06d}.csv")
                info.size = len(body)
                tar.addfile(info, _Reader(body))
                members += 1
                out.flush()
        gz.stdin.close()
        gz.wait()
    path.with_suffix(".members").write_text(str(members))
    return members


class _Reader:
    def __init__(self, data: bytes) -> None:
        self.data, self.pos = memoryview(data), 0

    def read(self, n: int = -1) -> bytes:
        chunk = self.data[self.pos: self.pos + n if n >= 0 else None]
        self.pos += len(chunk)
        return bytes(chunk)


def baseline(path: Path) -> float:
    t0 = time.perf_counter()
    subprocess.run(f"gzip -dc '{path}' | tar -t > /dev/null", shell=True, check=True)
    return time.perf_counter() - t0


def run_child(*args: str, env: dict[str, str] | None = None) -> dict:
    """Run `python -m bench.tarball --child ...` and return its JSON line (with its peak RSS)."""
    proc = subprocess.run([sys.executable, "-m", "bench.tarball", "--child", *args], capture_output=True,
                          text=True, env=env, cwd=Path(__file__).resolve().parents[1], check=False)
    if proc.returncode != 0:
        raise RuntimeError(proc.stderr[-2000:])
    return json.loads(proc.stdout.strip().splitlines()[-1])


async def child(source: str, path: str, endpoint: str) -> dict:
    from crawler import tarscan
    staging = Path(tempfile.mkdtemp(prefix="bench-staging-", dir=WORK))

    async def from_file():
        with open(path, "rb") as fh:
            while chunk := fh.read(1 << 20):
                yield chunk

    t0 = time.perf_counter()
    if source == "file":
        result = await tarscan.scan(from_file(), lambda p, size: p in WANTED, staging,
                                    max_member_bytes=1 << 40, max_members=10**9)
    else:
        from crawler.s3 import S3Store
        async with S3Store(endpoint, "us-east-1") as store:
            result = await tarscan.scan(store.stream("bench", "backup.tar.gz", 1 << 20), lambda p, size: p in WANTED,
                                        staging, max_member_bytes=1 << 40, max_members=10**9)
    wall = time.perf_counter() - t0
    rss_mb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    for f in staging.iterdir():
        f.unlink()
    staging.rmdir()
    return {"wall_s": wall, "members": result.members, "extracted": len(result.extracted),
            "error": result.error, "bytes_read": result.bytes_read, "peak_rss_mb": rss_mb}


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def upload(endpoint: str, path: Path) -> None:
    import boto3
    from boto3.s3.transfer import TransferConfig
    client = boto3.client("s3", endpoint_url=endpoint, region_name="us-east-1",
                          aws_access_key_id="bench", aws_secret_access_key="bench")
    client.create_bucket(Bucket="bench")
    client.upload_file(str(path), "bench", "backup.tar.gz", Config=TransferConfig(multipart_chunksize=64 << 20))


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--size-mb", type=int, default=1100)
    ap.add_argument("--small-mb", type=int, default=256)
    ap.add_argument("--child", nargs=3, metavar=("SOURCE", "PATH", "ENDPOINT"))
    args = ap.parse_args()
    if args.child:
        import asyncio
        print(json.dumps(asyncio.run(child(*args.child))))
        return
    WORK.mkdir(parents=True, exist_ok=True)
    big, small = WORK / f"backup-{args.size_mb}.tar.gz", WORK / f"backup-{args.small_mb}.tar.gz"
    print(f"building {big.name} and {small.name} ...", file=sys.stderr)
    members = build(big, args.size_mb)
    build(small, args.small_mb)
    size_mb = big.stat().st_size / 1e6
    base = min(baseline(big) for _ in range(2))
    scan_file = run_child("file", str(big), "")
    scan_small = run_child("file", str(small), "")
    port = free_port()
    env = {**os.environ, "AWS_ACCESS_KEY_ID": "bench", "AWS_SECRET_ACCESS_KEY": "bench", "AWS_DEFAULT_REGION": "us-east-1"}
    moto = subprocess.Popen([sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(port)],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        endpoint = f"http://127.0.0.1:{port}"
        for _ in range(100):
            try:
                socket.create_connection(("127.0.0.1", port), 0.2).close()
                break
            except OSError:
                time.sleep(0.1)
        upload(endpoint, big)
        scan_s3 = run_child("s3", str(big), endpoint, env=env)
    finally:
        moto.terminate()
        moto.wait(10)
    rows = [
        ("`gzip -dc \| tar -t` (baseline)", base, None),
        ("scanner, from the local file", scan_file["wall_s"], scan_file["peak_rss_mb"]),
        ("scanner, streamed from local S3 (moto)", scan_s3["wall_s"], scan_s3["peak_rss_mb"]),
    ]
    lines = [f"### Tarball scan (`python -m bench.tarball`): {size_mb:,.0f} MB .tar.gz, {members} members of 4 MiB",
             "", "| reader | wall s | MB/s (compressed) | vs baseline | peak RSS MB |", "|---|---:|---:|---:|---:|"]
    for name, wall, rss in rows:
        lines.append(f"| {name} | {wall:.1f} | {size_mb / wall:,.0f} | {base / wall:.2f}× | {'' if rss is None else f'{rss:.0f}'} |")
    lines += ["", f"- peak RSS of the scanner: {scan_small['peak_rss_mb']:.0f} MB on {small.stat().st_size / 1e6:,.0f} MB, "
              f"{scan_file['peak_rss_mb']:.0f} MB on {size_mb:,.0f} MB (flat: {scan_file['peak_rss_mb'] <= 1.2 * scan_small['peak_rss_mb']})",
              f"- members read: {scan_file['members']} (file), {scan_s3['members']} (S3); extracted {scan_file['extracted']} wanted; "
              f"errors: {scan_file['error']}, {scan_s3['error']}",
              "- the baseline only lists; the scanner also records every header, hashes and writes the wanted members"]
    text = "\n".join(lines) + "\n"
    print(text)
    (OUT / "tarball.md").write_text(text)
    (OUT / "tarball.json").write_text(json.dumps({"size_mb": size_mb, "members": members, "baseline_s": base,
                                                  "file": scan_file, "s3": scan_s3, "small": scan_small}, indent=2))


if __name__ == "__main__":
    main()
