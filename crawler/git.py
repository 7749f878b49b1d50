"""The artifacts repository: committing exactly a given set of paths, nothing else.

Commits are written by one long-lived `git fast-import` per run: each batch is a commit built
on the branch's tree in fast-import's memory (only the batch's paths change, so whatever the
checkout has staged or modified besides is neither included nor disturbed), then a checkpoint
writes the pack and moves the branch, refusing anything but a fast-forward. One process and one
pack per call instead of four processes and a loose object per file: this is where most of a
commit's time went. The checkout's own index then learns the new entries for those paths only
(every `index_sync_commits` commits and at close), so `git status` stays clean for them.
Commits are serialised by a lock file in the git directory, so two processes never interleave;
a branch moved by anyone else is noticed and built upon. When a site's own commit helper is
configured, it gets the paths as arguments and we check its commit holds them.
"""

from __future__ import annotations

import asyncio
import collections
import fcntl
import hashlib
import os
import shlex
import stat
import time
from collections.abc import Callable, Sequence
from pathlib import Path

# fast-import's settings: zlib level 1 (figures are compressed already; gc can recompress) and
# every blob stored whole, as deltas against the previous, unrelated file cost time and gain
# nothing (trees are still stored as deltas, which keeps a commit's rewritten folder small).
FAST_IMPORT = ["-c", "pack.compression=1", "fast-import", "--quiet", "--big-file-threshold=1k"]
READ_WHOLE = 8 << 20  # files up to this size are read in one go; larger ones are streamed twice


class GitError(Exception):
    """A git command failed; str() is one line."""


class GitRepo:
    def __init__(self, root: Path, timeout_s: float, author_name: str, author_email: str,
                 commit_command: str = "", index_sync_commits: int = 1) -> None:
        self.root = root
        self.timeout_s = timeout_s
        self.commit_command = commit_command
        self.index_sync_commits = index_sync_commits
        self._git_dir: Path | None = None
        self._branch: str | None = None       # the checked-out branch, refs/heads/...
        self._importer: asyncio.subprocess.Process | None = None
        self._importer_tip: str | None = None  # the branch tip as fast-import last knew it
        self._importer_err: collections.deque[str] = collections.deque(maxlen=20)
        self._importer_err_task: asyncio.Task[None] | None = None
        self._marks = 0
        self._shared_before: set[Path] = set()
        self._unsynced: list[str] = []        # committed paths the checkout's index has not learnt
        self._commits_since_sync = 0
        self._env = {**os.environ, "GIT_AUTHOR_NAME": author_name, "GIT_AUTHOR_EMAIL": author_email,
                     "GIT_COMMITTER_NAME": author_name, "GIT_COMMITTER_EMAIL": author_email,
                     "GIT_TERMINAL_PROMPT": "0"}
        self._lock = asyncio.Lock()

    async def _run(self, *args: str, stdin: bytes | None = None, env: dict[str, str] | None = None,
                   argv: Sequence[str] | None = None) -> str:
        cmd = list(argv) if argv is not None else ["git", *args]
        proc = await asyncio.create_subprocess_exec(
            *cmd, cwd=self.root, env=env or self._env, stdin=asyncio.subprocess.PIPE,
            stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE)
        try:
            out, err = await asyncio.wait_for(proc.communicate(stdin), self.timeout_s)
        except (TimeoutError, asyncio.CancelledError):
            proc.kill()
            await proc.wait()
            raise
        if proc.returncode != 0:
            first = (err or out).decode(errors="replace").strip().splitlines()
            raise GitError(f"{cmd[0]} {cmd[1] if len(cmd) > 1 else ''} failed: {first[0] if first else proc.returncode}")
        return out.decode(errors="replace").strip()

    async def git_dir(self) -> Path:
        if self._git_dir is None:
            self._git_dir = Path(self.root, await self._run("rev-parse", "--git-dir")).resolve()
        return self._git_dir

    async def check(self) -> None:
        """Raise GitError unless root is the top of a git work tree; then pin every later git
        call to that repository (GIT_DIR, GIT_WORK_TREE). Unpinned, a root whose .git vanished
        mid-run would make git find an enclosing repository and commit into it."""
        try:
            top = await self._run("rev-parse", "--show-toplevel")
            gitdir = Path(self.root, await self._run("rev-parse", "--git-dir")).resolve()
        except (GitError, OSError) as exc:
            raise GitError(f"{self.root} is not a git work tree ({exc})") from None
        if Path(top).resolve() != self.root.resolve():
            raise GitError(f"{self.root} is inside the git work tree {top}, not its top")
        self._git_dir = gitdir
        self._env.update({"GIT_DIR": str(gitdir), "GIT_WORK_TREE": str(self.root.resolve())})
        self._shared_before = set(gitdir.glob("sharedindex.*"))
        if not self.commit_command:
            try:
                self._branch = await self._run("symbolic-ref", "-q", "HEAD")
            except GitError:
                raise GitError(f"{self.root} has a detached HEAD; check out the branch to commit to") from None

    async def head(self) -> str | None:
        try:
            return await self._run("rev-parse", "--verify", "-q", "HEAD")
        except GitError:
            return None

    async def holds(self, commit: str, paths: Sequence[str]) -> bool:
        listed = await self._run("ls-tree", "-r", "--name-only", "-z", commit, "--", *paths)
        return set(paths) <= set(filter(None, listed.split("\0")))

    async def commit_paths(self, paths: Sequence[str], message: str) -> str:
        """Commit exactly `paths` (relative to root) onto the checked-out branch; return HEAD after.

        Idempotent: if HEAD already holds these contents, no commit is made and HEAD is returned.
        """
        return (await self.commit_batches([(paths, message)]))[-1]

    async def commit_batches(self, batches: Sequence[tuple[Sequence[str], str]]) -> list[str]:
        """One commit per (paths, message), in order, published together; HEAD after each."""
        if not batches or not all(paths for paths, _ in batches):
            raise ValueError("nothing to commit")
        if "GIT_DIR" not in self._env:
            await self.check()
        async with self._lock:
            gitdir = await self.git_dir()
            if not gitdir.is_dir():
                raise GitError(f"the repository {gitdir} is gone; nothing was committed")
            lock_fd = await asyncio.to_thread(_flock, gitdir / "crawler-commit.lock")
            try:
                if self.commit_command:
                    return [await self._commit_with_helper(paths) for paths, _ in batches]
                return await self._commit_fast_import(gitdir, batches)
            finally:
                os.close(lock_fd)

    async def _commit_fast_import(self, gitdir: Path, batches: Sequence[tuple[Sequence[str], str]]) -> list[str]:
        every = [p for paths, _ in batches for p in paths]
        await asyncio.to_thread(_append, gitdir / UNSYNCED, b"".join(p.encode() + b"\0" for p in every))
        for _attempt in range(3):  # someone else may move the branch between our read and the checkpoint
            head = await self.head()
            try:
                made = await self._import(head, batches)
            except BaseException:
                await self._stop_importer(kill=True)  # never let a half-written commit be finished
                raise
            after = await self.head()
            if after == made[-1]:
                self._unsynced.extend(every)
                self._commits_since_sync += len(batches)
                if self._commits_since_sync >= self.index_sync_commits:
                    await self._sync_real_index()
                return made
            # fast-import refused a non-fast-forward: the branch moved under us. Start again on it.
            self._importer_tip = None
        raise GitError("the branch kept moving while committing; try again")

    async def _start_importer(self) -> asyncio.subprocess.Process:
        if self._importer is None or self._importer.returncode is not None:
            self._importer = await asyncio.create_subprocess_exec(
                "git", *FAST_IMPORT, cwd=self.root, env=self._env, stdin=asyncio.subprocess.PIPE,
                stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE)
            self._importer_tip = None
            self._importer_err.clear()
            self._importer_err_task = asyncio.create_task(self._drain_importer_errors(self._importer))
        return self._importer

    async def _drain_importer_errors(self, proc: asyncio.subprocess.Process) -> None:
        assert proc.stderr is not None
        while line := await proc.stderr.readline():
            self._importer_err.append(line.decode(errors="replace").strip())

    async def _stop_importer(self, kill: bool) -> None:
        proc, self._importer = self._importer, None
        if proc is None:
            return
        if proc.returncode is None:
            if kill:
                proc.kill()
            else:
                assert proc.stdin is not None
                proc.stdin.close()
            try:
                await asyncio.wait_for(proc.wait(), self.timeout_s)
            except TimeoutError:
                proc.kill()
                await proc.wait()
        if self._importer_err_task is not None:
            await asyncio.gather(self._importer_err_task, return_exceptions=True)
            self._importer_err_task = None

    def _importer_failed(self, what: str) -> GitError:
        last = next((line for line in reversed(self._importer_err) if line), "no message")
        return GitError(f"git fast-import {what}: {last}")

    async def _import(self, head: str | None, batches: Sequence[tuple[Sequence[str], str]]) -> list[str]:
        """Write one commit per batch on top of `head`, checkpoint, and return their ids (a batch
        changing nothing makes no commit and yields the id before it)."""
        proc = await self._start_importer()
        assert proc.stdin is not None and proc.stdout is not None
        out, inp = proc.stdin, proc.stdout

        async def reply() -> str:
            try:
                line = await asyncio.wait_for(inp.readline(), self.timeout_s)
            except TimeoutError:
                raise self._importer_failed("did not answer in time") from None
            if not line:
                await self._stop_importer(kill=True)
                raise self._importer_failed("stopped")
            return line.decode(errors="replace").rstrip("\n")

        made: list[str] = []
        tip = head
        for paths, message in batches:
            blobs = await asyncio.to_thread(_describe, self.root, list(paths))
            self._marks += 1
            mark = self._marks
            name, email = self._env["GIT_COMMITTER_NAME"], self._env["GIT_COMMITTER_EMAIL"]
            header = (f"commit {self._branch}\nmark :{mark}\n"
                      f"committer {name} <{email}> {int(time.time())} +0000\n").encode()
            msg = message.encode()
            out.write(header + b"data %d\n%s\n" % (len(msg), msg))
            if tip != self._importer_tip:  # fast-import's branch is not where HEAD is: move it
                out.write(b"from %s\n" % tip.encode() if tip else b"")
            # What the parent holds at these paths (fast-import answers from its in-memory tree).
            for b in blobs:
                out.write(b"ls %s\n" % b.quoted)
            await out.drain()
            changed = [b for b in blobs if (await reply()).split("\t", 1)[0] != b.listing]
            for b in changed:
                out.write(b"M %s inline %s\ndata %d\n" % (b.mode, b.quoted, b.size))
                if b.data is not None:
                    out.write(b.data)
                else:
                    await _stream_into(out, self.root / b.path, b.size)
                out.write(b"\n")
                await out.drain()
            out.write(b"\n")
            if not changed:  # nothing new: drop the empty commit, the branch stays where it was
                out.write(f"reset {self._branch}\n".encode() + (b"from %s\n\n" % tip.encode() if tip else b"\n"))
                self._importer_tip = tip
                if tip is None:
                    raise GitError("nothing to commit on an empty branch")
                made.append(tip)
                continue
            out.write(b"get-mark :%d\n" % mark)
            await out.drain()
            tip = await reply()
            self._importer_tip = tip
            made.append(tip)
        out.write(b"checkpoint\nprogress crawler-%d\n" % self._marks)
        await out.drain()
        said = await reply()
        if said != f"progress crawler-{self._marks}":
            raise self._importer_failed(f"said {said[:80]!r}")
        return made

    async def _sync_real_index(self) -> None:
        """Teach the checkout's own index the committed entries of our paths (this run's, and any
        a killed run left in the intent log) that HEAD holds, so `git status` shows them clean.
        Batched: each update rewrites that whole index file."""
        gitdir = await self.git_dir()
        intent = gitdir / UNSYNCED
        logged = await asyncio.to_thread(_read_paths, intent)
        wanted = sorted(set(self._unsynced) | set(logged))
        if wanted:
            held: list[str] = []
            for i in range(0, len(wanted), 500):  # pathspecs on the command line, in slices
                listed = await self._run("ls-tree", "-r", "--name-only", "-z", "HEAD", "--", *wanted[i:i + 500])
                held += [p for p in listed.split("\0") if p]
            if held:
                await self._run("update-index", "--add", "-z", "--stdin", stdin=b"".join(p.encode() + b"\0" for p in held))
        intent.unlink(missing_ok=True)
        self._unsynced.clear()
        self._commits_since_sync = 0

    async def close(self) -> None:
        """End fast-import, sync the checkout's index, drop leftovers of older versions' runs."""
        async with self._lock:
            await self._stop_importer(kill=False)
            try:
                gitdir = await self.git_dir()
            except GitError:
                return
            lock_fd = await asyncio.to_thread(_flock, gitdir / "crawler-commit.lock")
            try:
                if self._unsynced or (gitdir / UNSYNCED).exists():
                    await self._sync_real_index()
                for f in gitdir.glob("crawler-index-*"):
                    pid = f.name.split("-")[2]
                    if f.name.startswith(f"crawler-index-{os.getpid()}-{id(self)}") or not _alive(pid):
                        f.unlink(missing_ok=True)
                # Shared parts of our split private indexes: git would keep them for two weeks.
                keep = set()
                try:
                    keep.add(Path(await self._run("rev-parse", "--shared-index-path")).resolve())
                except GitError:
                    pass
                for f in set(gitdir.glob("sharedindex.*")) - self._shared_before:
                    if f.resolve() not in keep:
                        f.unlink(missing_ok=True)
            finally:
                os.close(lock_fd)

    async def _commit_with_helper(self, paths: Sequence[str]) -> str:
        # The site's helper commits as the site says, not under our author identity.
        await self._run(argv=[*shlex.split(self.commit_command), *paths], env=dict(os.environ))
        head = await self.head()
        if head is None or not await self.holds(head, paths):
            raise GitError(f"artifacts.commit_command did not commit the {len(paths)} files it was given")
        return head


UNSYNCED = "crawler-unsynced"  # paths committed, or about to be, that the checkout's index may lack


class _Blob:
    """A file about to be committed: its mode, size, git blob id and (when small) its bytes."""

    __slots__ = ("path", "quoted", "mode", "size", "data", "listing")

    def __init__(self, root: Path, path: str) -> None:
        full = root / path
        st = os.lstat(full)
        if not stat.S_ISREG(st.st_mode):
            raise GitError(f"{path} is not a regular file; nothing was committed")
        self.path = path
        self.quoted = _quote(path)
        self.mode = b"100755" if st.st_mode & 0o111 else b"100644"
        self.size = st.st_size
        sha = hashlib.sha1(b"blob %d\0" % st.st_size)
        if st.st_size <= READ_WHOLE:
            with open(full, "rb") as fh:
                self.data: bytes | None = fh.read()
            if len(self.data) != st.st_size:
                raise GitError(f"{path} changed while being committed")
            sha.update(self.data)
        else:
            self.data = None
            with open(full, "rb") as fh:
                while block := fh.read(1 << 20):
                    sha.update(block)
        # How fast-import's `ls` lists this exact content (before the tab and the path).
        self.listing = f"{self.mode.decode()} blob {sha.hexdigest()}"


def _describe(root: Path, paths: list[str]) -> list[_Blob]:
    return [_Blob(root, p) for p in paths]


def _quote(path: str) -> bytes:
    """A path as fast-import reads it: C-style quoted, so spaces, quotes and newlines are safe."""
    raw = path.encode("utf-8", "surrogateescape")
    out = bytearray(b'"')
    for byte in raw:
        if byte in (0x22, 0x5C):
            out += b"\\" + bytes([byte])
        elif byte < 0x20 or byte == 0x7F:
            out += b"\\%03o" % byte
        else:
            out.append(byte)
    return bytes(out + b'"')


async def _stream_into(out: asyncio.StreamWriter, path: Path, size: int) -> None:
    """Copy exactly `size` bytes of a large file into fast-import's input, a block at a time."""
    fh = await asyncio.to_thread(open, path, "rb")
    try:
        left = size
        while left:
            block = await asyncio.to_thread(fh.read, min(1 << 20, left))
            if not block:
                raise GitError(f"{path.name} shrank while being committed")
            out.write(block)
            await out.drain()
            left -= len(block)
    finally:
        fh.close()


def _append(path: Path, data: bytes) -> None:
    with open(path, "ab") as fh:
        fh.write(data)


def _read_paths(path: Path) -> list[str]:
    try:
        return [p for p in path.read_bytes().decode(errors="surrogateescape").split("\0") if p]
    except FileNotFoundError:
        return []


def _alive(pid: str) -> bool:
    try:
        os.kill(int(pid), 0)
    except (ValueError, ProcessLookupError):
        return False
    except PermissionError:
        return True
    return True


def _flock(path: Path) -> int:
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    fcntl.flock(fd, fcntl.LOCK_EX)
    return fd


async def init_repo(root: Path) -> None:
    """A new repository with one empty commit (the sandbox and tests)."""
    root.mkdir(parents=True, exist_ok=True)
    repo = GitRepo(root, 60, "sandbox", "sandbox@localhost")
    await repo._run("init", "-q", "-b", "main")
    await repo._run("commit", "-q", "--allow-empty", "-m", "artifacts repository")


class History:
    """Read-only access to the blobs in a repository's history."""

    def __init__(self, repo: GitRepo) -> None:
        self.repo = repo

    async def objects(self) -> list[tuple[str, str]]:
        """(object id, path) of every object reachable from any ref, first path seen."""
        await self.repo.check()  # pinned: never the history of an enclosing repository
        listing = await self.repo._run("rev-list", "--all", "--objects")
        out = []
        for line in listing.splitlines():
            sha, _, path = line.partition(" ")
            if path:
                out.append((sha, path))
        return out

    async def blob_sizes(self, shas: Sequence[str]) -> dict[str, int]:
        """Sizes of those ids that are blobs."""
        if not shas:
            return {}
        checks = await self.repo._run("cat-file", "--batch-check=%(objectname) %(objecttype) %(objectsize)",
                                      stdin="\n".join(shas).encode() + b"\n")
        sizes = {}
        for line in checks.splitlines():
            parts = line.split()
            if len(parts) == 3 and parts[1] == "blob":
                sizes[parts[0]] = int(parts[2])
        return sizes

    async def read_blob(self, sha: str, sink: Callable[[bytes], None], chunk: int = 1 << 20) -> None:
        """Stream a blob's bytes into `sink`."""
        proc = await asyncio.create_subprocess_exec("git", "cat-file", "blob", sha, cwd=self.repo.root,
                                                    stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.DEVNULL)
        assert proc.stdout is not None
        while block := await proc.stdout.read(chunk):
            sink(block)
        if await proc.wait() != 0:
            raise GitError(f"git cat-file blob {sha} failed")
