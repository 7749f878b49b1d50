"""The artifacts repository: committing exactly a given set of paths, nothing else.

`commit_paths` builds the commit in a private index (read HEAD's tree, add the paths, write a
tree, commit it, move the branch with compare-and-swap), so whatever the checkout has staged or
modified besides is neither included nor disturbed. The real index then learns the new entries
for those paths only, so `git status` stays clean for them. Commits are serialised by a lock
file in the git directory, so two processes never interleave. When a site's own commit helper
is configured, it gets the paths as arguments and we check its commit holds them.
"""

from __future__ import annotations

import asyncio
import fcntl
import os
import shlex
from collections.abc import Callable, Sequence
from pathlib import Path


class GitError(Exception):
    """A git command failed; str() is one line."""


class GitRepo:
    def __init__(self, root: Path, timeout_s: float, author_name: str, author_email: str,
                 commit_command: str = "", index_sync_commits: int = 1) -> None:
        self.root = root
        self.timeout_s = timeout_s
        self.commit_command = commit_command
        self.index_sync_commits = index_sync_commits
        self._index_built = False             # our private index exists and matches _index_head
        self._index_head: str | None = None   # the commit our private index matches
        self._head_tree: str | None = None    # that commit's tree
        self._git_dir: Path | None = None
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
        if not paths:
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
                    return await self._commit_with_helper(paths)
                return await self._commit_private_index(gitdir, paths, message)
            finally:
                os.close(lock_fd)

    async def _commit_private_index(self, gitdir: Path, paths: Sequence[str], message: str) -> str:
        stdin = b"".join(p.encode() + b"\0" for p in paths)
        index = gitdir / f"crawler-index-{os.getpid()}-{id(self)}"
        env = {**self._env, "GIT_INDEX_FILE": str(index)}
        for _attempt in range(3):  # another writer may move the branch between read and CAS
            if not self._index_built or not index.exists():
                # Built from HEAD once per run (again only if someone else moved the branch); the
                # split index then makes each update write a small delta, and git's cache-tree
                # makes write-tree redo only the directories this batch touched.
                self._index_head = await self.head()
                await self._run("read-tree", *(["HEAD"] if self._index_head else ["--empty"]), env=env)
                await self._run("update-index", "--split-index", env=env)
                self._head_tree = (await self._run("rev-parse", "HEAD^{tree}")) if self._index_head else None
                self._index_built = True
            # From here on HEAD is taken to be our last commit: update-ref's compare-and-swap
            # catches anyone else moving the branch, and then the index is rebuilt.
            head = self._index_head
            await self._run("update-index", "--add", "-z", "--stdin", stdin=stdin, env=env)
            tree = await self._run("write-tree", env=env)
            if head and tree == self._head_tree:
                self._unsynced.extend(paths)
                return head
            parents = ["-p", head] if head else []
            commit = await self._run("commit-tree", tree, *parents, "-m", message)
            # Written before the branch moves, so a kill between the two still leaves the paths
            # for the next sync to reconcile (it keeps only those HEAD really holds).
            await asyncio.to_thread(_append, gitdir / UNSYNCED, stdin)
            try:
                await self._run("update-ref", "-m", message, "HEAD", commit, head or "")
            except GitError:
                self._index_built = False
                continue
            self._index_head, self._head_tree = commit, tree
            self._unsynced.extend(paths)
            self._commits_since_sync += 1
            if self._commits_since_sync >= self.index_sync_commits:
                await self._sync_real_index()
            return commit
        raise GitError("the branch kept moving while committing; try again")

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
        """Sync the checkout's index and drop private indexes of this and of dead processes."""
        async with self._lock:
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
                self._index_built = False
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
