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
import concurrent.futures
import fcntl
import hashlib
import os
import shlex
import select
import stat
import subprocess
import threading
import time
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

# fast-import's settings: zlib level 1 (figures are compressed already; gc can recompress) and
# every blob stored whole, as deltas against the previous, unrelated file cost time and gain
# nothing (trees are still stored as deltas, which keeps a commit's rewritten folder small).
# It writes to a ref of its own (--force: that ref may jump to wherever the branch is); the
# branch itself is moved by update-ref with compare-and-swap.
FAST_IMPORT = ["-c", "pack.compression=1", "fast-import", "--quiet", "--force", "--big-file-threshold=1k"]
LS_CHUNK = 200  # `ls` questions in flight at once: their answers must fit the pipe back
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
        self._importer: _FastImport | None = None
        # Commits run start to finish on a thread of their own, with blocking pipes and plain
        # subprocess calls: on the event loop each of their dozen steps waited behind every
        # worker's callbacks (a 100-file commit took ~1 s there, ~60 ms here).
        self._thread: concurrent.futures.ThreadPoolExecutor | None = None
        self.warnings: list[str] = []  # said by the git thread, logged by the caller
        self.refused: dict[str, str] = {}  # paths the last commit_batches left out, and why
        self._unsynced: list[str] = []        # committed paths the checkout's index has not learnt
        # Index entries ("mode blob id<TAB>path") of what we committed since the last sync, and
        # the commit they are true of: a sync needs no `ls-tree` while the branch is still there.
        self._entries: dict[str, str] = {}
        self._entries_at: str | None = None
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

    async def commit_batches(self, batches: Sequence[tuple[Sequence[str], str]],
                             known: Mapping[str, bytes] | None = None) -> list[str]:
        """One commit per (paths, message), in order, published together; HEAD after each.
        `known`: the bytes of some of those paths, as the caller has just written them (spares
        reading them back)."""
        if not batches or not all(paths for paths, _ in batches):
            raise ValueError("nothing to commit")
        if "GIT_DIR" not in self._env:
            await self.check()
        async with self._lock:
            self.refused = {}
            gitdir = await self.git_dir()
            if not gitdir.is_dir():
                raise GitError(f"the repository {gitdir} is gone; nothing was committed")
            if self.commit_command:
                lock_fd = await asyncio.to_thread(_flock, gitdir / "crawler-commit.lock", self.timeout_s)
                try:
                    return [await self._commit_with_helper(paths) for paths, _ in batches]
                finally:
                    os.close(lock_fd)
            return await self._on_git_thread(self._commit_fast_import, gitdir, batches, known or {})

    async def _on_git_thread(self, fn: Callable[..., Any], *args: Any) -> Any:
        if self._thread is None:
            self._thread = concurrent.futures.ThreadPoolExecutor(1, thread_name_prefix="git")
        # A cancelled caller does not stop the step: it finishes on its thread (a commit made but
        # not stamped is adopted by the next run), and the next step queues behind it.
        return await asyncio.wrap_future(self._thread.submit(fn, *args))

    # -- on the git thread -------------------------------------------------------------------------
    def _git(self, *args: str, stdin: bytes | None = None) -> str:
        try:
            proc = subprocess.run(["git", *args], cwd=self.root, env=self._env, input=stdin,
                                  capture_output=True, timeout=self.timeout_s)
        except subprocess.TimeoutExpired:
            raise GitError(f"git {args[0]} took longer than {self.timeout_s:.0f} s") from None
        if proc.returncode != 0:
            first = (proc.stderr or proc.stdout).decode(errors="replace").strip().splitlines()
            raise GitError(f"git {args[0]} failed: {first[0] if first else proc.returncode}")
        return proc.stdout.decode(errors="surrogateescape").strip()

    def _tip_now(self) -> str | None:
        """Where the branch we commit to is now (None: not born yet)."""
        try:
            return self._git("rev-parse", "--verify", "-q", f"{self._branch}^{{commit}}")
        except GitError:
            return None

    def _commit_fast_import(self, gitdir: Path, batches: Sequence[tuple[Sequence[str], str]],
                            known: Mapping[str, bytes]) -> list[str]:
        lock_fd = _flock(gitdir / "crawler-commit.lock", self.timeout_s)
        try:
            every = [p for paths, _ in batches for p in paths]
            _append(gitdir / UNSYNCED, b"".join(_bytes(p) + b"\0" for p in every))
            for _attempt in range(3):  # someone else may move the branch between our read and our update
                tip = self._tip_now()
                if self._importer is not None and not self._importer.alive():
                    self._importer.stop(kill=True)  # died between batches (killed, out of memory)
                    self._importer = None
                if self._importer is None:
                    self._importer = _FastImport(self.root, self._env, self.timeout_s, self._private_ref())
                try:
                    made = self._importer.commit(tip, batches, self.root, known)
                    self.refused = dict(self._importer.refused)
                except BaseException:
                    self._importer.stop(kill=True)  # never let a half-written commit be finished
                    self._importer = None
                    raise
                if made[-1] != tip:
                    # fast-import wrote to a ref of its own; the branch moves only from exactly
                    # where we read it (compare-and-swap), never over anyone's newer or older tip.
                    try:
                        self._git("update-ref", "-m", "crawler: commit", self._branch or "", made[-1], tip or "")
                    except GitError:
                        continue  # moved meanwhile: build again on where it is now
                self._unsynced.extend(every)
                if self._entries and self._entries_at != tip:
                    self._entries.clear()  # someone else committed since: their tree decides
                self._entries.update(self._importer.entries)
                self._entries_at = made[-1]
                self._commits_since_sync += len(batches)
                if self._commits_since_sync >= self.index_sync_commits:
                    try:
                        self._sync_real_index()
                    except GitError as exc:  # the commits stand; `git status` lags until a later sync
                        self.warnings.append(f"the checkout's index was not updated: {exc}")
                        self._commits_since_sync = 0
                return made
            raise GitError("the branch kept moving while committing; try again")
        finally:
            os.close(lock_fd)

    def _private_ref(self) -> str:
        return f"refs/crawler/import-{os.getpid()}-{id(self)}"

    def _sync_real_index(self) -> None:
        """Teach the checkout's own index the committed entries of our paths (this run's, and any
        a killed run left in the intent log) that HEAD holds, so `git status` shows them clean.
        Batched: each update rewrites that whole index file. (On the git thread, lock held.)"""
        assert self._git_dir is not None
        intent = self._git_dir / UNSYNCED
        wanted = sorted(set(self._unsynced) | set(_read_paths(intent)))
        if wanted:
            # The committed entries themselves (mode, blob, path), not whatever is on disk now.
            # Ours are known while the branch is still at our last commit; the rest (a killed
            # run's, or after someone else committed) are asked of git, which at 150,000 files
            # costs 0.75 s per 1,000 paths.
            known = self._entries if self._entries_at is not None and self._tip_now() == self._entries_at else {}
            entries = [known[p] for p in wanted if p in known]
            ask = [p for p in wanted if p not in known]
            for i in range(0, len(ask), 500):  # pathspecs on the command line, in slices
                listed = self._git("ls-tree", "-r", "-z", "HEAD", "--", *ask[i:i + 500])
                entries += [e for e in listed.split("\0") if e]
            if entries:
                self._git("update-index", "-z", "--index-info",
                          stdin=b"".join(_bytes(e) + b"\0" for e in entries))
        intent.unlink(missing_ok=True)
        self._unsynced.clear()
        self._entries.clear()
        self._commits_since_sync = 0

    def _close_on_thread(self, gitdir: Path) -> None:
        if self._importer is not None:
            self._importer.stop(kill=False)  # everything it wrote is checkpointed and published
            self._importer = None
        try:
            self._git("update-ref", "-d", self._private_ref())
        except GitError:
            pass  # never created
        # fast-import's refs left by runs that were killed (their commits are on the branch, or
        # were never published and are garbage).
        for ref in self._git("for-each-ref", "--format=%(refname)", "refs/crawler/").split():
            pid = ref.rsplit("/", 1)[-1].split("-")[1] if ref.rsplit("/", 1)[-1].startswith("import-") else ""
            if pid and not _alive(pid):
                try:
                    self._git("update-ref", "-d", ref)
                except GitError:
                    pass
        lock_fd = _flock(gitdir / "crawler-commit.lock", self.timeout_s)
        try:
            if self._unsynced or (gitdir / UNSYNCED).exists():
                self._sync_real_index()
            for f in gitdir.glob("crawler-index-*"):  # private indexes of earlier versions' runs
                if not _alive(f.name.split("-")[2]):
                    f.unlink(missing_ok=True)
        finally:
            os.close(lock_fd)

    async def close(self) -> None:
        """End fast-import and sync the checkout's index."""
        async with self._lock:
            try:
                gitdir = await self.git_dir()
            except GitError:
                return
            if gitdir.is_dir():
                await self._on_git_thread(self._close_on_thread, gitdir)
            if self._thread is not None:
                self._thread.shutdown(wait=True)
                self._thread = None

    async def _commit_with_helper(self, paths: Sequence[str]) -> str:
        # The site's helper commits as the site says, not under our author identity.
        await self._run(argv=[*shlex.split(self.commit_command), *paths], env=dict(os.environ))
        head = await self.head()
        if head is None or not await self.holds(head, paths):
            raise GitError(f"artifacts.commit_command did not commit the {len(paths)} files it was given")
        return head


def _bytes(text: str) -> bytes:
    """A path as git has it: our str paths carry undecodable bytes as surrogates."""
    return text.encode("utf-8", "surrogateescape")


UNSYNCED = "crawler-unsynced"  # paths committed, or about to be, that the checkout's index may lack


class _Blob:
    """A file about to be committed: its mode, size, git blob id and (when small) its bytes."""

    __slots__ = ("path", "quoted", "mode", "size", "data", "listing")

    def __init__(self, root: Path, path: str, known: bytes | None = None) -> None:
        self.path = path
        self.quoted = _quote(path)
        if known is not None:  # the bytes the caller itself just placed there
            self.mode, self.size, self.data = b"100644", len(known), known
            blob_id = hashlib.sha1(b"blob %d\0" % len(known) + known).hexdigest()
            self.listing = f"100644 blob {blob_id}"
            return
        full = root / path
        st = os.lstat(full)
        if not stat.S_ISREG(st.st_mode):
            raise GitError(f"{path} is not a regular file; nothing was committed")
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


class _FastImport:
    """One `git fast-import` process and the conversation with it (blocking; on the git thread)."""

    def __init__(self, root: Path, env: dict[str, str], timeout_s: float, ref: str) -> None:
        self.proc = subprocess.Popen(["git", *FAST_IMPORT], cwd=root, env=env, stdin=subprocess.PIPE,
                                     stdout=subprocess.PIPE, stderr=subprocess.PIPE)
        assert self.proc.stdin is not None and self.proc.stdout is not None and self.proc.stderr is not None
        self.out = self.proc.stdin
        self.timeout_s = timeout_s
        self.ref = ref
        self._committer = f"committer {env['GIT_COMMITTER_NAME']} <{env['GIT_COMMITTER_EMAIL']}>".encode()
        self.tip: str | None = None  # where fast-import's ref is
        self.marks = 0
        self.refused: dict[str, str] = {}  # path → why, for the last commit() call
        self.entries: dict[str, str] = {}  # path → its index entry, for the last commit() call
        self._pending = b""
        self._errors: collections.deque[str] = collections.deque(maxlen=20)
        self._err_reader = threading.Thread(target=self._read_errors, args=(self.proc.stderr,), daemon=True)
        self._err_reader.start()

    def _read_errors(self, stream: Any) -> None:
        for line in stream:
            self._errors.append(line.decode(errors="replace").strip())

    def alive(self) -> bool:
        return self.proc.poll() is None

    def failed(self, what: str) -> GitError:
        last = next((line for line in reversed(self._errors) if line), "no message")
        return GitError(f"git fast-import {what}: {last}")

    def reply(self) -> str:
        """One line fast-import wrote back, waiting at most timeout_s."""
        fd = self.proc.stdout.fileno()  # type: ignore[union-attr]
        deadline = time.monotonic() + self.timeout_s
        while b"\n" not in self._pending:
            left = deadline - time.monotonic()
            if left <= 0 or not select.select([fd], [], [], left)[0]:
                raise self.failed("did not answer in time")
            block = os.read(fd, 65536)
            if not block:
                self.proc.wait()
                self._err_reader.join(1)
                raise self.failed("stopped")
            self._pending += block
        line, _, self._pending = self._pending.partition(b"\n")
        return line.decode(errors="replace")

    def commit(self, tip: str | None, batches: Sequence[tuple[Sequence[str], str]], root: Path,
               known: Mapping[str, bytes]) -> list[str]:
        """One commit per batch on top of `tip`, then a checkpoint; their ids. A batch changing
        nothing makes no commit and yields the id before it. A path that cannot be committed (gone,
        not a regular file, unreadable) is left out and named in `refused`; the rest go ahead."""
        # Writes into a pipe have no timeout of their own: past the deadline the process is
        # killed, and a blocked write fails.
        watchdog = threading.Timer(self.timeout_s * (1 + len(batches)), self.proc.kill)
        watchdog.start()
        try:
            return self._commit(tip, batches, root, known)
        except (BrokenPipeError, ValueError):
            raise self.failed("stopped while being written to") from None
        finally:
            watchdog.cancel()

    def _commit(self, tip: str | None, batches: Sequence[tuple[Sequence[str], str]], root: Path,
                known: Mapping[str, bytes]) -> list[str]:
        self.refused = {}
        self.entries = {}
        described: list[tuple[list[_Blob], str]] = []
        for paths, message in batches:  # every file looked at before anything is written
            blobs = []
            for p in paths:
                try:
                    blobs.append(_Blob(root, p, known.get(p)))
                except (GitError, OSError) as exc:
                    self.refused[p] = str(exc)
            described.append((blobs, message))
        out = self.out
        made: list[str] = []
        for blobs, message in described:
            if not blobs:
                if tip is None:
                    raise GitError("nothing could be committed on an empty branch")
                made.append(tip)
                continue
            self.marks += 1
            msg = message.encode("utf-8", "surrogateescape")
            out.write(f"commit {self.ref}\nmark :{self.marks}\n".encode())
            out.write(self._committer + b" %d +0000\ndata %d\n%s\n" % (int(time.time()), len(msg), msg))
            if tip != self.tip and tip is not None:  # build on the branch, wherever it is now
                out.write(b"from %s\n" % tip.encode())
            # What the parent holds at these paths (from fast-import's in-memory tree), asked a
            # chunk at a time so the answers never fill the pipe while we are still asking.
            changed: list[_Blob] = []
            for i in range(0, len(blobs), LS_CHUNK):
                chunk = blobs[i:i + LS_CHUNK]
                out.write(b"".join(b"ls %s\n" % b.quoted for b in chunk))
                out.flush()
                changed += [b for b in chunk if self.reply().split("\t", 1)[0] != b.listing]
            self.entries.update((b.path, f"{b.listing}\t{b.path}") for b in blobs)
            for b in changed:
                out.write(b"M %s inline %s\ndata %d\n" % (b.mode, b.quoted, b.size))
                if b.data is not None:
                    out.write(b.data)
                else:
                    _stream_into(out, root / b.path, b.size)
                out.write(b"\n")
            out.write(b"\n")
            if not changed:
                # Nothing new: the empty commit just written stays unreferenced (gc drops it)
                # and our ref goes back to where it was.
                if tip is None:
                    raise GitError("nothing to commit on an empty branch")
                out.write(f"reset {self.ref}\nfrom {tip}\n\n".encode())
                self.tip = tip
                made.append(tip)
                continue
            out.write(b"get-mark :%d\n" % self.marks)
            out.flush()
            tip = self.tip = self.reply()
            made.append(tip)
        out.write(b"checkpoint\nprogress crawler-%d\n" % self.marks)
        out.flush()
        said = self.reply()
        if said != f"progress crawler-{self.marks}":
            raise self.failed(f"said {said[:80]!r}")
        return made

    def stop(self, kill: bool) -> None:
        if self.proc.poll() is None:
            if kill:
                self.proc.kill()
            else:
                try:
                    self.out.close()
                except OSError:
                    pass
            try:
                self.proc.wait(self.timeout_s)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self._err_reader.join(5)
        for stream in (self.proc.stdin, self.proc.stdout, self.proc.stderr):
            try:
                stream.close()  # type: ignore[union-attr]
            except OSError:
                pass


def _stream_into(out: Any, path: Path, size: int) -> None:
    """Copy exactly `size` bytes of a large file into fast-import's input, a block at a time."""
    with open(path, "rb") as fh:
        left = size
        while left:
            block = fh.read(min(1 << 20, left))
            if not block:
                raise GitError(f"{path.name} shrank while being committed")
            out.write(block)
            left -= len(block)


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


def _flock(path: Path, timeout_s: float) -> int:
    """Take the commit lock, waiting at most timeout_s: a holder that never lets go must not
    hold up a stop for ever."""
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    deadline = time.monotonic() + timeout_s
    while True:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            return fd
        except BlockingIOError:
            if time.monotonic() >= deadline:
                os.close(fd)
                raise GitError(f"another process has held {path.name} for over {timeout_s:.0f} s; "
                               "nothing was committed") from None
            time.sleep(0.05)


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
