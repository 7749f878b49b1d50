"""The artifacts repository: committing exactly a given set of paths, nothing else.

Commits are written straight into a pack by crawler/gitpack.py: each batch is a commit built on
the branch's tree as git stores it (only the batch's paths change, so whatever the checkout has
staged or modified besides is neither included nor disturbed), one pack per call, then the
branch moves by compare-and-swap from where it was read, never over anyone's newer or older tip.
No process per commit, no loose object per file, and no work per commit that grows with a big
folder beyond hashing it: this is where a commit's time went (fast-import, before, scanned and
re-sorted the one-entry-per-paper folder for every file).

The checkout's own index moves with the branch, under git's own `index.lock` (IndexLock): it
learns the committed entries of our paths, then the branch moves. A user's `git commit` holds
that lock from reading the index until it moves the branch, so it sees both or neither and can
never commit the deletion of our files; `git status` stays clean for them. The index is kept
split (core.splitIndex) so that each commit rewrites the entries changed since its shared part
was written, not the million the checkout may hold. Commits of our own processes are serialised
by a lock file in the git directory. When a site's own commit helper is configured, it gets the
paths as arguments and we check its commit holds them.
"""

from __future__ import annotations

import asyncio
import collections
import concurrent.futures
import fcntl
import os
import pickle
import shlex
import shutil
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

from . import gitindex, gitpack, native



class GitError(Exception):
    """A git command failed; str() is one line."""


class GitRepo:
    def __init__(self, root: Path, timeout_s: float, author_name: str, author_email: str,
                 commit_command: str = "", split_index: bool = True, min_bytes_per_s: float = 4 << 20) -> None:
        self.root = root
        self.timeout_s = timeout_s
        self.commit_command = commit_command
        # Each commit rewrites the checkout's index; split, that is the entries changed since its
        # shared part was written, not all of them (about 100 bytes a tracked file: 100 MB at a
        # million files).
        self.split_index = split_index
        self._split_config: str | None = None
        self._expire_config: str | None = None
        self._legacy_done: Path | None = None
        self._new_shared: str | None = None  # the shared index part the last index write made
        self._said_unsupported = False
        self.index_s = 0.0  # time spent rewriting the checkout's index, for the commit log line
        self.min_bytes_per_s = min_bytes_per_s  # the slowest reading of files a commit is allowed
        self._read_s = 0.0
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
                             known: Mapping[str, bytes] | None = None,
                             expected: Mapping[str, str] | None = None) -> list[str]:
        """One commit per (paths, message), in order, published together; HEAD after each.
        `known`: the bytes of some of those paths, as the caller has just written them (spares
        reading them back). `expected`: the sha256 some paths must have when read (a path whose
        bytes differ is refused: a stamp never names content that was not committed)."""
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
            return await self._on_git_thread(self._commit_pack, gitdir, batches, known or {}, expected or {})

    async def remove_paths(self, paths: Sequence[str], message: str, batch: int = 100) -> str | None:
        """A commit taking `paths` off the branch (history keeps them; several commits of at most
        `batch` files, published together, when there are more), the checkout's index in step;
        each file is removed from the work tree too if it still holds what the branch held.
        Returns the last commit (None: the branch held none of them). For `undo
        --revert-commits`: a rare step an operator asks for, so plain git commands on a
        temporary index do it."""
        if "GIT_DIR" not in self._env:
            await self.check()
        async with self._lock:
            gitdir = await self.git_dir()
            return await self._on_git_thread(self._remove_paths, gitdir, list(paths), message, max(batch, 1))

    async def _on_git_thread(self, fn: Callable[..., Any], *args: Any) -> Any:
        if self._thread is None:
            self._thread = concurrent.futures.ThreadPoolExecutor(1, thread_name_prefix="git",
                                                                 initializer=_shield_children)
        # A cancelled caller does not stop the step: it finishes on its thread (a commit made but
        # not stamped is adopted by the next run), and the next step queues behind it.
        return await asyncio.wrap_future(self._thread.submit(fn, *args))

    # -- on the git thread -------------------------------------------------------------------------
    def _git(self, *args: str, stdin: bytes | None = None, absent_ok: bool = False) -> str:
        """git's output as text; with `absent_ok`, "" when git exits 1 saying nothing (`--verify
        -q`: no such ref), any other failure still raised."""
        return self._git_bytes(*args, stdin=stdin, absent_ok=absent_ok).decode(errors="surrogateescape").strip()

    def _git_bytes(self, *args: str, stdin: bytes | None = None, env: Mapping[str, str] | None = None,
                   absent_ok: bool = False) -> bytes:
        """One git command on the git thread (whose signal mask its children inherit: see
        _shield_children), in a session of its own: a terminal's Ctrl-C reaches the job, which
        decides when its git commands stop, not them."""
        try:
            proc = subprocess.run(["git", *args], cwd=self.root, env=dict(env or self._env), input=stdin,
                                  capture_output=True, timeout=self.timeout_s, start_new_session=True)
        except subprocess.TimeoutExpired:
            raise GitError(f"git {args[0]} took longer than {self.timeout_s:.0f} s") from None
        if absent_ok and proc.returncode == 1 and not proc.stdout.strip() and not proc.stderr.strip():
            return b""
        if proc.returncode != 0:
            first = (proc.stderr or proc.stdout).decode(errors="replace").strip().splitlines()
            name = next((a for a in args if not a.startswith("-") and "=" not in a), args[0])
            raise GitError(f"git {name} failed: {first[0] if first else proc.returncode}")
        return proc.stdout

    def _tip_now(self) -> str | None:
        """Where the branch we commit to is now (None: not born yet). Any other failure is
        raised, not taken for an unborn branch."""
        return self._git("rev-parse", "--verify", "-q", f"{self._branch}^{{commit}}", absent_ok=True) or None

    def _commit_pack(self, gitdir: Path, batches: Sequence[tuple[Sequence[str], str]],
                     known: Mapping[str, bytes], expected: Mapping[str, str]) -> list[str]:
        lock_fd = _flock(gitdir / "crawler-commit.lock", self.timeout_s)
        try:
            setup = self._setup()  # refuses what we cannot write before anything is noted
            request = [([(p, known.get(p), expected.get(p)) for p in paths], message) for paths, message in batches]
            # The worker's watchdog grows with the bytes it must read: a large model is not
            # killed mid-commit on every run.
            self._read_s = _bytes_on_disk(self.root, [p for paths, _ in batches for p in paths if p not in known]) \
                / self.min_bytes_per_s
            # The pack is built before git's index lock is taken: a user's `git add` waits for no
            # hashing or pack writing of ours, only for the few steps under the lock.
            tip = self._tip_now()
            made, refused, entries = self._worker_now().commit(setup, tip, request, self._read_s)
            with IndexLock(gitdir, self.timeout_s, self.warnings) as index:
                for _attempt in range(3):
                    now = self._tip_now()
                    if now != tip:  # moved while we built: build again, under the lock (no git commit can move it now)
                        self._worker_now().forget()
                        tip = now
                        made, refused, entries = self._worker_now().commit(setup, tip, request, self._read_s)
                    self.refused = refused
                    if not made:  # every file refused: the branch stays where it is ("" if not born yet)
                        return [tip or ""] * len(batches)
                    # The checkout's index learns our entries before the branch moves, both under
                    # git's own index.lock: a user's commit (which holds that lock from reading the
                    # index to moving the branch) sees either neither or both, so it can never
                    # commit the deletion of our files. A crash in between leaves the index ahead
                    # of the branch (our files staged), never behind.
                    lines = self._index_entries(entries)
                    index.stage(lambda current, nxt: self._write_index(lines, current, nxt, gitdir))
                    if made[-1] and made[-1] != tip:
                        try:
                            self._git("update-ref", "-m", "crawler: commit", self._branch or "", made[-1], tip or "")
                        except GitError:
                            now = self._tip_now()
                            if now != made[-1]:  # (update-ref may fail after moving it: then it moved)
                                index.restore()
                                self._worker_now().forget()
                                if now != tip:
                                    continue  # moved by something that takes no index lock (update-ref, a push)
                                raise  # not moved: the ref cannot be written (a stale lock, a full disk)
                    index.done()
                    if self._new_shared is not None:  # superseded shared parts, as git expires them
                        if self._expire_config is None:  # read once a run, as core.splitIndex is
                            self._expire_config = self._git("config", "--get", "splitIndex.sharedIndexExpire",
                                                            absent_ok=True)
                        gitindex.expire_shared(gitdir, keep={self._new_shared},
                                               expire_s=gitindex.expiry_s(self._expire_config))
                        self._new_shared = None
                    # Only now, with the index published and the branch moved, is the older
                    # version's intent log repaired for good.
                    if self._legacy_done is not None:
                        self._legacy_done.unlink(missing_ok=True)
                        self._legacy_done = None
                    return made
            raise GitError("the branch kept moving while committing; try again")
        finally:
            os.close(lock_fd)

    def _remove_paths(self, gitdir: Path, paths: list[str], message: str, batch: int) -> str | None:
        lock_fd = _flock(gitdir / "crawler-commit.lock", self.timeout_s)
        temp_index = gitdir / f"crawler-revert-index-{os.getpid()}"
        try:
            with IndexLock(gitdir, self.timeout_s, self.warnings) as index:
                tip = self._tip_now()
                if tip is None:
                    return None
                held: dict[str, str] = {}
                for i in range(0, len(paths), 500):
                    listed = self._git_bytes("ls-tree", "-z", tip, "--", *paths[i:i + 500])
                    for entry in filter(None, listed.split(b"\0")):
                        meta, _, path = entry.partition(b"\t")
                        if meta.split(b" ")[1] == b"blob":
                            held[path.decode("utf-8", "surrogateescape")] = meta.split(b" ")[2].decode()
                if not held:
                    return None
                names = sorted(held)
                listing = b"".join(_bytes(p) + b"\0" for p in names)
                env = {**self._env, "GIT_INDEX_FILE": str(temp_index)}
                self._git_bytes("read-tree", tip, env=env)
                commit, parts = tip, (len(names) + batch - 1) // batch
                for k in range(parts):  # artifacts.commit_batch files a commit, at most
                    chunk = b"".join(_bytes(p) + b"\0" for p in names[k * batch:(k + 1) * batch])
                    self._git_bytes("update-index", "-z", "--force-remove", "--stdin", stdin=chunk, env=env)
                    tree = self._git_bytes("write-tree", env=env).decode().strip()
                    said = message if parts == 1 else f"{message} ({k + 1}/{parts})"
                    commit = self._git_bytes("commit-tree", tree, "-p", commit, "-m", said).decode().strip()

                index.stage(lambda current, nxt: self._update_index_copy(
                    current, nxt, "--force-remove", "--stdin", stdin=listing))
                try:
                    self._git("update-ref", "-m", "crawler: undo", self._branch or "", commit, tip)
                except GitError:
                    index.restore()
                    raise
                index.done()
            # Off the work tree too, or the next run would find them at their canonical paths and
            # adopt them again; a file changed since (not what the branch held) is left alone.
            names = [n for n in sorted(held) if "\n" not in n and (self.root / n).is_file()]
            if not names:
                return commit
            now = self._git_bytes("hash-object", "--no-filters", "--stdin-paths",
                                  stdin=_bytes("".join(p + "\n" for p in names))).split()
            for name, oid in zip(names, now):
                if oid.decode() == held[name]:
                    (self.root / name).unlink(missing_ok=True)
            return commit
        finally:
            temp_index.unlink(missing_ok=True)
            os.close(lock_fd)

    def _index_entries(self, entries: Sequence[bytes]) -> list[bytes]:
        """`update-index --index-info` lines: the entries just committed, plus those of paths an
        earlier version of this tool committed without teaching the index (its intent log)."""
        out = list(entries)
        assert self._git_dir is not None
        self._legacy_done = None
        intent = self._git_dir / LEGACY_UNSYNCED
        if intent.exists():
            wanted = sorted({p for p in intent.read_bytes().split(b"\0") if p})
            for i in range(0, len(wanted), 500):  # pathspecs on the command line, in slices
                listed = self._git_bytes("ls-tree", "-r", "-z", "HEAD", "--",
                                         *(p.decode("utf-8", "surrogateescape") for p in wanted[i:i + 500]))
                out += [e for e in listed.split(b"\0") if e]
            self._legacy_done = intent
        return out

    def _write_index(self, lines: list[bytes], current: Path | None, nxt: Path, gitdir: Path) -> None:
        """Write to `nxt` the index `current` (None: none yet) with `lines` added. Split (unless
        the repository says otherwise), by the commit worker in git's own format with memory
        that does not grow with the index (crawler/gitindex.py); what that does not write, by
        `git update-index`."""
        t0 = time.monotonic()
        try:
            if self.split_index and self._split_unset():
                try:
                    size = sum(f.stat().st_size for f in [*gitdir.glob("sharedindex.*"), *([current] if current else [])])
                    self._new_shared = self._worker_now().index(str(current) if current else None, str(nxt), lines,
                                                                str(gitdir), size / self.min_bytes_per_s)
                    return
                except gitindex.Unsupported as exc:
                    if not self._said_unsupported:
                        self.warnings.append(f"the checkout's index is left to git update-index: {exc}")
                        self._said_unsupported = True
            self._git_index(b"".join(x + b"\0" for x in lines), current, nxt)
        finally:
            self.index_s += time.monotonic() - t0

    def _git_index(self, stdin: bytes, current: Path | None, nxt: Path) -> None:
        """`git update-index --index-info` on `nxt`, a copy of the checkout's index `current`."""
        config: list[str] = []
        extra: list[str] = []
        if self.split_index and self._split_unset():
            config = ["-c", "core.splitIndex=true", *SPLIT_INDEX_TUNING]
            if current is not None and _split_part_bloated(current):
                extra.append("--split-index")  # a new shared part: see _split_part_bloated
        # --index-info must come last
        self._update_index_copy(current, nxt, *extra, "--index-info", stdin=stdin, config=config)

    def _update_index_copy(self, current: Path | None, nxt: Path, *args: str, stdin: bytes,
                           config: Sequence[str] = ()) -> None:
        """`git update-index -z ARGS` on `nxt`, a copy of `current` (None: no index yet)."""
        if current is not None:
            shutil.copy2(current, nxt)  # its time too: git's racily-clean check reads it
        self._git_bytes(*config, "update-index", "-z", *args, stdin=stdin, env={**self._env, "GIT_INDEX_FILE": str(nxt)})

    def _split_unset(self) -> bool:
        """Whether the repository leaves core.splitIndex unset (an operator's own setting wins)."""
        if self._split_config is None:
            self._split_config = self._git("config", "--get", "core.splitIndex", absent_ok=True)
        return self._split_config == ""

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

    def _close_on_thread(self, gitdir: Path) -> None:
        lock_fd = _flock(gitdir / "crawler-commit.lock", self.timeout_s)
        try:
            for f in gitdir.glob("crawler-index-*"):  # private indexes of earlier versions' runs
                if not native.process_alive(f.name.split("-")[2]):
                    f.unlink(missing_ok=True)
            for f in gitdir.glob("sharedindex_crawler.*"):  # a shared index part a killed worker was writing
                if not native.process_alive(f.name.rsplit(".", 1)[1]):
                    f.unlink(missing_ok=True)
            for f in gitdir.glob("crawler-indexlock-*"):  # a killed run's own file for the index lock
                pid = f.name.rsplit("-", 1)[1]
                if pid.isdigit() and not native.process_alive(pid):
                    f.unlink(missing_ok=True)
        finally:
            os.close(lock_fd)
            self._drop_worker()
        # Refs that earlier versions' fast-import left when their run was killed (their commits
        # are on the branch, or were never published and are garbage).
        for ref in self._git("for-each-ref", "--format=%(refname)", "refs/crawler/").split():
            pid = ref.rsplit("/", 1)[-1].split("-")[1] if ref.rsplit("/", 1)[-1].startswith("import-") else ""
            if pid and not native.process_alive(pid):
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


# git's split index, tuned for one writer adding a few hundred entries per commit to an index of up
# to a million (measured with git 2.39: bench/RESULTS.md). A new shared part once 5 % of the
# entries are outside it (git's default 20 % lets the split file grow to 18 MB at a million
# entries, rewritten by every commit); superseded shared parts (88 MB each at a million) removed
# after an hour, not two weeks. Never sooner: the index kept for `restore` still names the last one.
SPLIT_INDEX_TUNING = ("-c", "splitIndex.maxPercentChange=5",
                      "-c", f"splitIndex.sharedIndexExpire={gitindex.SHARED_EXPIRE_S}.seconds.ago")


def _split_part_bloated(index_file: Path) -> bool:
    """Whether the split part has grown past half the shared part. `git status` refreshes
    entries and stores each one it touched in the split part as a replacement, which git's
    percentage rule does not count: the split file can grow to nearly the whole index and stay
    so, rewritten by every commit. `--split-index` then writes a new shared part, which costs one
    shared part and pays for itself within two commits. (The split part always holds the tree
    cache too: about 50 bytes a folder, a tenth of the index with five files a folder.)"""
    try:
        size = index_file.stat().st_size
        shared = max((p.stat().st_size for p in index_file.parent.glob("sharedindex.*")), default=0)
    except OSError:
        return False
    return shared > 0 and size > shared // 2 and size > 1 << 20


# Paths an earlier version committed before the checkout's index knew them (it synced the index
# in batches); the first commit of this version teaches the index their entries and removes it.
LEGACY_UNSYNCED = "crawler-unsynced"


_IDENT_UNSAFE = str.maketrans("", "", "<>\n\0")
_PACKAGE_PARENT = str(Path(__file__).resolve().parent.parent)  # where `crawler` is importable from


class _PackWorker:
    """The `python -m crawler.gitpack` process that builds and writes commits (blocking; on the
    git thread). A call that outlives its timeout kills it; a dead one is replaced."""

    def __init__(self, root: Path, env: Mapping[str, str], timeout_s: float) -> None:
        path = os.pathsep.join(filter(None, [_PACKAGE_PARENT, env.get("PYTHONPATH", "")]))
        # -P: nothing is imported from the artifacts root (its cwd), whatever files land there.
        # A session of its own, and SIGINT/SIGTERM blocked (inherited from the git thread): a
        # terminal's Ctrl-C or a stop signal to the whole group cannot cut a commit in half; the
        # job ends the worker when it has committed what it holds (end of its input).
        self.proc = subprocess.Popen([sys.executable, "-P", "-m", "crawler.gitpack"], cwd=root,
                                     env={**env, "PYTHONPATH": path}, stdin=subprocess.PIPE,
                                     stdout=subprocess.PIPE, stderr=subprocess.PIPE, start_new_session=True)
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

    def _call(self, request: tuple[Any, ...], timeout_s: float, also: tuple[str, ...] = ()) -> tuple[Any, ...]:
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
        if reply[0] != "ok" and reply[0] not in also:
            raise GitError(reply[1])
        return reply

    def commit(self, setup: gitpack.Setup, tip: str | None,
               batches: list[tuple[list[tuple[str, bytes | None, str | None]], str]], read_s: float = 0.0
               ) -> tuple[list[str], dict[str, str], list[bytes]]:
        """(commit ids, {path: why refused}, index entries of the paths committed). `read_s`: the
        time reading the files may take, on top of the per-batch allowance."""
        _ok, made, refused, entries = self._call(("commit", setup, tip, batches),
                                                 self.timeout_s * (1 + len(batches)) + 2 * read_s)
        return made, refused, entries

    def forget(self) -> None:
        self._call(("forget",), self.timeout_s)

    def index(self, current: str | None, out: str, lines: list[bytes], gitdir: str, read_s: float) -> str | None:
        """crawler.gitindex.add in the worker (its CPU off our event loop's interpreter): the file
        name of the new shared part, if it wrote one. Raises gitindex.Unsupported."""
        reply = self._call(("index", current, out, lines, gitdir), self.timeout_s + 2 * read_s, also=("unsupported",))
        if reply[0] == "unsupported":
            raise gitindex.Unsupported(reply[1])
        return reply[1]

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


class IndexLock:
    """git's own index lock (`index.lock` beside the index, created exclusively, as git does),
    held while the checkout's index and the branch move together; on the git thread.

    `stage` writes the new index (a copy of the current one with the given entries, by `git
    update-index` on the copy) and renames it over the index, keeping a link to the one before
    for `restore`. git fails a command at once when it finds the lock taken; we wait for it
    up to `timeout_s`, as its holders are git commands that take moments. A lock that a killed
    run of ours left (its owner file names a dead process and the lock's inode) is removed;
    anyone else's is waited for and then reported, never removed."""

    OWNER = "crawler-indexlock-owner"   # "pid inode mtime_ns" of the index.lock we hold, or are about to
    NEXT = "crawler-next-index"
    PREV = "crawler-prev-index"

    def __init__(self, gitdir: Path, timeout_s: float, warnings: list[str]) -> None:
        self.gitdir = gitdir
        self.index = gitdir / "index"
        self.lock = gitdir / "index.lock"
        self.timeout_s = timeout_s
        self.warnings = warnings
        self._had_index = False
        self._staged = False

    def __enter__(self) -> IndexLock:
        # The lock is made as a file of our own first and linked into place (link, like O_EXCL,
        # fails if the name exists): the owner note names its inode before the lock exists, so
        # no moment leaves a lock of ours that a later run could not tell from someone else's.
        note_path = self.gitdir / self.OWNER
        previous = note_path.read_bytes() if note_path.exists() else None  # a killed run's, if it left its lock
        stale = self._owner_note()
        own = self.gitdir / f"crawler-indexlock-{os.getpid()}"
        own.unlink(missing_ok=True)
        own.write_bytes(b"")
        st = os.stat(own)  # a later file may reuse the inode, never with the same change time too
        _write_replace(note_path, f"{os.getpid()} {st.st_ino} {st.st_mtime_ns}\n".encode())
        deadline = time.monotonic() + self.timeout_s
        locked = False
        try:
            while True:
                try:
                    os.link(own, self.lock)
                    locked = True
                    break
                except FileExistsError:
                    if stale is not None and self._remove_if_stale(stale):
                        stale = None
                        continue
                    if time.monotonic() >= deadline:
                        raise GitError(f"git's {self.lock} has been held for over {self.timeout_s:.0f} s (a git command "
                                       "still running, or one that crashed: remove the file if no git runs); "
                                       "nothing was committed") from None
                    time.sleep(0.02)
            for leftover in (self.NEXT, self.NEXT + ".lock", self.PREV):  # a killed run's, under the lock now
                (self.gitdir / leftover).unlink(missing_ok=True)
        except BaseException:
            if locked:
                self._release()
            elif previous is not None and stale is not None:
                _write_replace(note_path, previous)  # the evidence of a killed run's lock is kept for the next try
            raise
        finally:
            own.unlink(missing_ok=True)
        return self

    def _owner_note(self) -> tuple[str, int, int] | None:
        try:
            pid, inode, mtime = (self.gitdir / self.OWNER).read_text().split()
            return pid, int(inode), int(mtime)
        except (OSError, ValueError):
            return None

    def _remove_if_stale(self, note: tuple[str, int, int]) -> bool:
        """Remove the lock if it is the very file a run of ours made. That run is gone: every
        holder of our index lock holds the commit flock, which we hold now (so no check of its
        process id, which a container may give the next run too)."""
        pid, inode, mtime = note
        try:
            st = os.stat(self.lock)
        except OSError:
            return False
        if (st.st_ino, st.st_mtime_ns) != (inode, mtime):
            return False
        self.lock.unlink(missing_ok=True)
        self.warnings.append(f"removed {self.lock}, left by a run of ours that was killed (process {pid})")
        return True

    def stage(self, write: Callable[[Path | None, Path], None]) -> None:
        """The new index in place: `write(index, file)` writes to `file` the new version of
        `index` (None: there is none yet)."""
        nxt, prev = self.gitdir / self.NEXT, self.gitdir / self.PREV
        self._had_index = self.index.exists()
        if self._had_index:
            os.link(self.index, prev)
        write(self.prev_or_none(), nxt)
        with open(nxt, "rb+") as fh:
            os.fsync(fh.fileno())  # before the branch can name what the index must know
        os.replace(nxt, self.index)
        self._staged = True

    def prev_or_none(self) -> Path | None:
        return self.gitdir / self.PREV if self._had_index else None

    def restore(self) -> None:
        """The index as it was before `stage` (the branch did not move)."""
        if not self._staged:
            return
        if self._had_index:
            os.replace(self.gitdir / self.PREV, self.index)
        else:
            self.index.unlink(missing_ok=True)
        self._staged = False

    def done(self) -> None:
        self._staged = False

    def __exit__(self, *exc: object) -> None:
        try:
            if self._staged:  # left mid-way by an error: the branch did not move
                self.restore()
        finally:
            self._release()

    def _release(self) -> None:
        try:
            for name in (self.NEXT, self.PREV):
                (self.gitdir / name).unlink(missing_ok=True)
        finally:
            self.lock.unlink(missing_ok=True)  # the lock before its owner note: a lock never outlives the note naming it ours
            (self.gitdir / self.OWNER).unlink(missing_ok=True)


def _bytes_on_disk(root: Path, rels: Sequence[str]) -> int:
    total = 0
    for rel in rels:
        try:
            total += os.lstat(root / rel).st_size
        except (OSError, ValueError):
            pass  # refused later, with its reason
    return total


def _shield_children() -> None:
    """The git thread blocks SIGINT and SIGTERM: the kernel delivers them to the main thread (the
    job's handlers) instead, and every child started from this thread (the commit worker and the
    git commands of a commit) starts with them blocked, as a blocked mask survives exec. A stop
    signal sent to the whole process group (systemd's default, a terminal's Ctrl-C) then reaches
    the job, which finishes the commit under way and ends its children itself."""
    signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGINT, signal.SIGTERM})


def _write_replace(path: Path, data: bytes) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_bytes(data)
    os.replace(tmp, path)


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
