"""Local candidates: files in the checkout and its worktrees, and blobs in the checkout's history.

`Wanted` says what could match any row: names, stems, expected paths, recorded sizes. Walks keep
only files that could match (memory grows with matches, not with the tree), run in worker
threads, one per location, concurrently. Content is hashed only for kept candidates, streaming,
off the event loop. Git history: every blob reachable from any ref (`git rev-list --all
--objects`) whose path could match, read with `git cat-file`.
"""

from __future__ import annotations

import asyncio
import glob
import hashlib
import os
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath

import structlog

from . import files
from .evidence import Candidate, Expectation, extension_of, stem_of
from .git import GitError, History

log = structlog.get_logger()

GLOB_CHARS = set("*?[")


@dataclass
class Wanted:
    names: set[str] = field(default_factory=set)
    stems: set[str] = field(default_factory=set)
    paths: set[str] = field(default_factory=set)
    sizes: set[int] = field(default_factory=set)
    extensions: set[str] = field(default_factory=set)

    @classmethod
    def of(cls, expectations: Iterable[Expectation]) -> Wanted:
        w = cls()
        for e in expectations:
            if e.lost_reason:
                continue
            w.names |= e.basenames
            w.stems |= e.stems
            w.paths |= set(e.expected_paths)
            w.extensions |= set(e.extensions)
            if e.sha256 and e.size is not None:
                w.sizes.add(e.size)
        return w

    def __call__(self, rel_path: str, size: int | None) -> bool:
        name = PurePosixPath(rel_path).name
        if name in self.names or rel_path in self.paths or (size is not None and size in self.sizes):
            return True
        return extension_of(name, self.extensions) in self.extensions and stem_of(name, self.extensions) in self.stems


def worktree_name(pattern: str, match: str) -> str:
    """The parts of `match` that the wildcards of `pattern` stood for ("wt-3")."""
    parts = [m for p, m in zip(Path(pattern).parts, Path(match).parts) if GLOB_CHARS & set(p)]
    return "/".join(parts) or Path(match).name


def find_worktrees(patterns: Iterable[str], checkout: Path) -> list[tuple[str, Path]]:
    out: dict[Path, str] = {}
    for pattern in patterns:
        for match in sorted(glob.glob(pattern)):
            path = Path(match)
            if path.is_dir() and path.resolve() != checkout.resolve():
                out.setdefault(path.resolve(), worktree_name(pattern, match))
    return sorted(((name, path) for path, name in out.items()), key=lambda t: t[0])


def _walk(root: Path, where: str, kind: str, wanted: Wanted) -> list[Candidate]:
    found = []
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames[:] = [d for d in dirnames if d != ".git"]
        for name in filenames:
            if name.startswith(files.PART_PREFIX):
                continue
            full = os.path.join(dirpath, name)
            rel = os.path.relpath(full, root).replace(os.sep, "/")
            try:
                st = os.lstat(full)
            except OSError:
                continue
            if not os.path.isfile(full) or os.path.islink(full):
                continue  # a link could point anywhere; only regular files are evidence
            if wanted(rel, st.st_size):
                found.append(Candidate(where, kind, rel, st.st_size, handle=Path(full)))
    return found


async def walk_locations(checkout: Path, worktrees: list[tuple[str, Path]], wanted: Wanted) -> list[Candidate]:
    jobs = [asyncio.to_thread(_walk, checkout, "checkout", "checkout", wanted)]
    jobs += [asyncio.to_thread(_walk, path, f"worktree:{name}", "worktree", wanted) for name, path in worktrees]
    return [c for batch in await asyncio.gather(*jobs) for c in batch]


async def history_candidates(history: History, wanted: Wanted) -> list[Candidate]:
    """Blobs reachable from any ref whose path could match (sizes from cat-file)."""
    paths: dict[str, str] = {}
    try:
        objects = await history.objects()
    except GitError as exc:  # a checkout that is not a repository has no history to search
        log.warning("recover.history_unavailable", error=str(exc))
        return []
    for sha, path in objects:
        # With sizes wanted (sha-recorded rows), every blob is a candidate until its size is known.
        if sha not in paths and (wanted.sizes or wanted(path, None)):
            paths[sha] = path
    sizes = await history.blob_sizes(list(paths))
    return [Candidate(f"history:{sha[:12]}", "history", paths[sha], size, handle=sha)
            for sha, size in sizes.items() if wanted(paths[sha], size)]


async def hash_candidate(c: Candidate, history: History, chunk: int = 1 << 20) -> None:
    """Fill in c.sha256 from its content (a file, a staged member, or a git blob)."""
    if c.sha256 is not None:
        return
    if isinstance(c.handle, Path):
        c.sha256, _, _ = await files.hash_file(c.handle, chunk=chunk)
        return
    h = hashlib.sha256()
    await history.read_blob(str(c.handle), h.update, chunk)
    c.sha256 = h.hexdigest()


async def copy_candidate(c: Candidate, history: History, temp: Path) -> str:
    """Write the candidate's bytes to `temp` (the caller then renames it into place); the sha256
    of the bytes written, for the caller to hold against the one it decided on (a worktree file
    may have changed since it was hashed)."""
    if isinstance(c.handle, Path):
        sha, _ = await files.copy_hashing(c.handle, temp)
        return sha
    h = hashlib.sha256()

    def both(block: bytes) -> None:
        h.update(block)
        out.write(block)

    with open(temp, "wb") as out:
        await history.read_blob(str(c.handle), both)
    return h.hexdigest()
