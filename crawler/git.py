"""The artifacts repository: committing exactly a given set of paths, nothing else.

Commits are written straight into a pack by crawler/gitpack.py: each batch is a commit built on
the branch's tree as git stores it (only the batch's paths change, so whatever the checkout has
staged or modified besides is neither included nor disturbed), one pack per call, then the
branch moves by compare-and-swap from where it was read, never over anyone's newer or older tip.
No process per commit, no loose object per file, and no work per commit that grows with a big
folder beyond hashing it: this is where a commit's time went (fast-import, before, scanned and
re-sorted the one-entry-per-paper folder for every file). The checkout's own index then learns
the new entries for those paths only (every `index_sync_commits` commits and at close), so
`git status` stays clean for them. Commits are serialised by a lock file in the git directory,
so two processes never interleave; a branch moved by anyone else is noticed and built upon.
When a site's own commit helper is configured, it gets the paths as arguments and we check its
commit holds them.
"""

from __future__ import annotations

import asyncio
import collections
import concurrent.futures
import fcntl
import os
import shlex
import pickle
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

from . import gitpack



class GitError(Exception):
    """A git command failed; str() is one line."""


class GitRepo:
    def __init__(self, root: Path, timeout_s: float, author_name: str, author_email: str,
                 commit_command: str = "", index_sync_commits: int = 1, index_sync_interval_s: float = 0.0) -> None:
        self.root = root
        self.timeout_s = timeout_s
        self.commit_command = commit_command
        self.index_sync_commits = index_sync_commits
        # A sync rewrites the whole index file (about 100 bytes a tracked file): with a million
        # files, a second of git's CPU. So it also waits this long since the last one.
        self.index_sync_interval_s = index_sync_interval_s
        self._last_sync = time.monotonic()
        self._git_dir: Path | None = None
        self._branch: str | None = None       # the checked-out branch, refs/heads/...
        self._worker: _PackWorker | None = None
        self._pack_setup: gitpack.Setup | None = None
        # Commits run start to finish on a thread of their own, with blocking pipes and plain
        # subprocess calls: on the event loop each of their dozen steps waited behind every
        # worker's callbacks (a 100-file commit took ~1 s there, ~60 ms here).
        self._thread: concurrent.futures.ThreadPoolExecutor | None = None
        self.warnings: list[str] = []  # said by the git thread, logged by the caller
        self.refused: dict[str, str] = {}  # paths the last commit_batches left out, and why
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
                await self._on_git_thread(self._drop_worker)
                raise GitError(f"the repository {gitdir} is gone; nothing was committed")
            if self.commit_command:
                lock_fd = await asyncio.to_thread(_flock, gitdir / "crawler-commit.lock", self.timeout_s)
                try:
                    return [await self._commit_with_helper(paths) for paths, _ in batches]
                finally:
                    os.close(lock_fd)
            return await self._on_git_thread(self._commit_pack, gitdir, batches, known or {})

    async def _on_git_thread(self, fn: Callable[..., Any], *args: Any) -> Any:
        if self._thread is None:
            self._thread = concurrent.futures.ThreadPoolExecutor(1, thread_name_prefix="git")
        # A cancelled caller does not stop the step: it finishes on its thread (a commit made but
        # not stamped is adopted by the next run), and the next step queues behind it.
        return await asyncio.wrap_future(self._thread.submit(fn, *args))

    # -- on the git thread -------------------------------------------------------------------------
    def _git(self, *args: str, stdin: bytes | None = None, absent_ok: bool = False) -> str:
        """git's output; with `absent_ok`, "" when git exits 1 saying nothing (`--verify -q`:
        no such ref), any other failure still raised."""
        try:
            proc = subprocess.run(["git", *args], cwd=self.root, env=self._env, input=stdin,
                                  capture_output=True, timeout=self.timeout_s)
        except subprocess.TimeoutExpired:
            raise GitError(f"git {args[0]} took longer than {self.timeout_s:.0f} s") from None
        if absent_ok and proc.returncode == 1 and not proc.stdout.strip() and not proc.stderr.strip():
            return ""
        if proc.returncode != 0:
            first = (proc.stderr or proc.stdout).decode(errors="replace").strip().splitlines()
            raise GitError(f"git {args[0]} failed: {first[0] if first else proc.returncode}")
        return proc.stdout.decode(errors="surrogateescape").strip()

    def _tip_now(self) -> str | None:
        """Where the branch we commit to is now (None: not born yet). Any other failure is
        raised, not taken for an unborn branch."""
        return self._git("rev-parse", "--verify", "-q", f"{self._branch}^{{commit}}", absent_ok=True) or None

    def _commit_pack(self, gitdir: Path, batches: Sequence[tuple[Sequence[str], str]],
                     known: Mapping[str, bytes]) -> list[str]:
        lock_fd = _flock(gitdir / "crawler-commit.lock", self.timeout_s)
        try:
            setup = self._setup()  # refuses what we cannot write before anything is noted
            every = [p for paths, _ in batches for p in paths]
            _append(gitdir / UNSYNCED, b"".join(_bytes(p) + b"\0" for p in every))
            request = [([(p, known.get(p)) for p in paths], message) for paths, message in batches]
            for _attempt in range(3):  # someone else may move the branch between our read and our update
                tip = self._tip_now()
                made, refused = self._worker_now().commit(setup, tip, request)
                self.refused = refused
                if not made:  # every file refused
                    if tip is None:
                        raise GitError("nothing could be committed on an empty branch")
                    return [tip] * len(batches)
                if made[-1] != tip:
                    try:
                        self._git("update-ref", "-m", "crawler: commit", self._branch or "", made[-1], tip or "")
                    except GitError:
                        self._worker_now().forget()
                        if self._tip_now() != tip:
                            continue  # moved meanwhile: build again on where it is now
                        raise  # not moved: the ref cannot be written (a stale lock, a full disk)
                self._commits_since_sync += len(batches)
                if (self._commits_since_sync >= self.index_sync_commits
                        and time.monotonic() - self._last_sync >= self.index_sync_interval_s):
                    try:
                        self._sync_real_index()
                    except GitError as exc:  # the commits stand; `git status` lags until a later sync
                        self.warnings.append(f"the checkout's index was not updated: {exc}")
                        self._commits_since_sync = 0
                return made
            raise GitError("the branch kept moving while committing; try again")
        finally:
            os.close(lock_fd)

    def _drop_worker(self) -> None:
        if self._worker is not None:
            self._worker.stop()
            self._worker = None

    def _worker_now(self) -> _PackWorker:
        if self._worker is not None and not self._worker.alive():
            self._drop_worker()  # died between calls (killed, out of memory): a new one
        if self._worker is None:
            self._worker = _PackWorker(self.root, self._env, self.timeout_s)
        return self._worker

    def _setup(self) -> gitpack.Setup:
        if self._pack_setup is None:
            if self._git("rev-parse", "--show-object-format") != "sha1":
                raise GitError(f"{self.root} names objects by sha256; only sha1 repositories are supported")
            objects = Path(self.root, self._git("rev-parse", "--git-path", "objects")).resolve()
            name = self._env["GIT_COMMITTER_NAME"].translate(_IDENT_UNSAFE).strip()
            email = self._env["GIT_COMMITTER_EMAIL"].translate(_IDENT_UNSAFE).strip()
            self._pack_setup = (str(self.root.resolve()), str(objects), dict(self._env), self.timeout_s,
                                f"{name} <{email}>".encode("utf-8", "surrogateescape"))
        return self._pack_setup

    def _sync_real_index(self) -> None:
        """Teach the checkout's own index the committed entries of our paths (this run's, and any
        a killed run left in the intent log) that HEAD holds, so `git status` shows them clean.
        The worker does it: it knows the entries it committed, so nothing per path is kept in
        this process. (On the git thread, lock held.)"""
        assert self._git_dir is not None
        intent = self._git_dir / UNSYNCED
        if intent.exists():
            self._worker_now().sync(self._setup(), str(intent))
        intent.unlink(missing_ok=True)
        self._commits_since_sync = 0
        self._last_sync = time.monotonic()

    def _close_on_thread(self, gitdir: Path) -> None:
        lock_fd = _flock(gitdir / "crawler-commit.lock", self.timeout_s)
        try:
            if (gitdir / UNSYNCED).exists():
                self._sync_real_index()
            for f in gitdir.glob("crawler-index-*"):  # private indexes of earlier versions' runs
                if not _alive(f.name.split("-")[2]):
                    f.unlink(missing_ok=True)
        finally:
            os.close(lock_fd)
            self._drop_worker()
        # Refs that earlier versions' fast-import left when their run was killed (their commits
        # are on the branch, or were never published and are garbage).
        for ref in self._git("for-each-ref", "--format=%(refname)", "refs/crawler/").split():
            pid = ref.rsplit("/", 1)[-1].split("-")[1] if ref.rsplit("/", 1)[-1].startswith("import-") else ""
            if pid and not _alive(pid):
                try:
                    self._git("update-ref", "-d", ref)
                except GitError:
                    pass

    async def close(self) -> None:
        """End the commit worker and sync the checkout's index."""
        async with self._lock:
            try:
                gitdir: Path | None = await self.git_dir()
            except GitError:
                gitdir = None
            if gitdir is not None and gitdir.is_dir():
                await self._on_git_thread(self._close_on_thread, gitdir)
            elif self._worker is not None:
                await self._on_git_thread(self._drop_worker)  # the repository is gone: just end it
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


_IDENT_UNSAFE = str.maketrans("", "", "<>\n\0")
_PACKAGE_PARENT = str(Path(__file__).resolve().parent.parent)  # where `crawler` is importable from


class _PackWorker:
    """The `python -m crawler.gitpack` process that builds and writes commits (blocking; on the
    git thread). A call that outlives its timeout kills it; a dead one is replaced."""

    def __init__(self, root: Path, env: Mapping[str, str], timeout_s: float) -> None:
        path = os.pathsep.join(filter(None, [_PACKAGE_PARENT, env.get("PYTHONPATH", "")]))
        # -P: nothing is imported from the artifacts root (its cwd), whatever files land there.
        self.proc = subprocess.Popen([sys.executable, "-P", "-m", "crawler.gitpack"], cwd=root,
                                     env={**env, "PYTHONPATH": path}, stdin=subprocess.PIPE,
                                     stdout=subprocess.PIPE, stderr=subprocess.PIPE)
        self.timeout_s = timeout_s
        self._said: collections.deque[str] = collections.deque(maxlen=20)  # its last stderr lines
        self._stderr = threading.Thread(target=self._read_stderr, daemon=True)
        self._stderr.start()

    def _read_stderr(self) -> None:
        for line in self.proc.stderr:  # type: ignore[union-attr]
            if line.strip():
                self._said.append(line.decode(errors="replace").strip())

    def alive(self) -> bool:
        return self.proc.poll() is None

    def _call(self, request: tuple[Any, ...], timeout_s: float) -> tuple[Any, ...]:
        watchdog = threading.Timer(timeout_s, self.proc.kill)
        watchdog.start()
        try:
            pickle.dump(request, self.proc.stdin, protocol=pickle.HIGHEST_PROTOCOL)
            self.proc.stdin.flush()  # type: ignore[union-attr]
            reply = pickle.load(self.proc.stdout)  # type: ignore[arg-type]
        except (EOFError, OSError, pickle.UnpicklingError):
            self.stop()
            last = self._said[-1] if self._said else "no message"
            raise GitError(f"the commit worker stopped (exit code {self.proc.returncode}: {last}); "
                           "nothing was committed") from None
        finally:
            watchdog.cancel()
        if reply[0] != "ok":
            raise GitError(reply[1])
        return reply

    def commit(self, setup: gitpack.Setup, tip: str | None,
               batches: list[tuple[list[tuple[str, bytes | None]], str]]) -> tuple[list[str], dict[str, str]]:
        _ok, made, refused = self._call(("commit", setup, tip, batches), self.timeout_s * (1 + len(batches)))
        return made, refused

    def sync(self, setup: gitpack.Setup, intent: str) -> None:
        self._call(("sync", setup, intent), self.timeout_s * 4)

    def forget(self) -> None:
        self._call(("forget",), self.timeout_s)

    def stop(self) -> None:
        try:
            self.proc.stdin.close()  # type: ignore[union-attr]  # its end of input: it exits
        except OSError:
            pass
        try:
            self.proc.wait(self.timeout_s)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
        self._stderr.join(5)
        for stream in (self.proc.stdout, self.proc.stderr):
            stream.close()  # type: ignore[union-attr]


def _append(path: Path, data: bytes) -> None:
    with open(path, "ab") as fh:
        fh.write(data)


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
