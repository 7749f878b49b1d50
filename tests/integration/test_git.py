"""The committer's git path against a real repository."""

import os

from crawler.git import GitRepo
from tests.harness import git


async def test_someone_else_committing_mid_run_is_kept_and_built_upon(repo):
    ours = GitRepo(repo, 60, "crawler", "c@c")
    (repo / "a.png").write_bytes(b"a")
    first = await ours.commit_paths(["a.png"], "ours 1")
    (repo / "theirs.txt").write_text("someone else\n")
    git(repo, "add", "theirs.txt")
    git(repo, "-c", "user.name=o", "-c", "user.email=o@o", "commit", "-q", "-m", "theirs")
    theirs = git(repo, "rev-parse", "HEAD")
    (repo / "b.png").write_bytes(b"b")
    second = await ours.commit_paths(["b.png"], "ours 2")
    await ours.close()
    assert git(repo, "rev-parse", f"{second}^") == theirs and git(repo, "rev-parse", f"{theirs}^") == first
    assert set(git(repo, "ls-tree", "-r", "--name-only", "HEAD").split()) == {"a.png", "b.png", "theirs.txt"}
    assert git(repo, "status", "--porcelain") == ""


async def test_committing_what_head_already_holds_makes_no_commit(repo):
    ours = GitRepo(repo, 60, "crawler", "c@c")
    (repo / "a.png").write_bytes(b"a")
    first = await ours.commit_paths(["a.png"], "ours")
    assert await ours.commit_paths(["a.png"], "again") == first
    await ours.close()
    assert git(repo, "rev-parse", "HEAD") == first


async def test_a_vanished_git_directory_never_leads_to_an_enclosing_repository(tmp_path):
    """The bench once deleted a running job's artifacts repo: git then found the project's own
    repository above it and the job committed there. Pinned, it fails instead."""
    import shutil

    import pytest

    from crawler.git import GitError
    outer = tmp_path / "outer"
    inner = outer / "work" / "artifacts"
    inner.mkdir(parents=True)
    for root in (outer, inner):
        git(root, "init", "-q", "-b", "main")
        git(root, "-c", "user.name=t", "-c", "user.email=t@t", "commit", "-q", "--allow-empty", "-m", "init")
    outer_head = git(outer, "rev-parse", "HEAD")
    ours = GitRepo(inner, 60, "crawler", "c@c")
    await ours.check()
    (inner / "a.png").write_bytes(b"a")
    await ours.commit_paths(["a.png"], "ours")
    shutil.rmtree(inner / ".git")
    (inner / "b.png").write_bytes(b"b")
    with pytest.raises(GitError):
        await ours.commit_paths(["b.png"], "would land in the outer repository")
    await ours.close()
    assert ours._worker is None
    assert git(outer, "rev-parse", "HEAD") == outer_head
    assert git(outer, "status", "--porcelain", "--untracked-files=no") == ""


async def test_a_run_leaves_nothing_of_its_own_behind_and_the_index_is_split(repo):
    ours = GitRepo(repo, 60, "crawler", "c@c")
    await ours.check()
    for i in range(12):
        (repo / f"f{i}.png").write_bytes(b"%d" % i)
        await ours.commit_paths([f"f{i}.png"], f"c{i}")
    await ours.close()
    leftovers = [p.name for p in (repo / ".git").iterdir()
                 if p.name.startswith("crawler-") and p.name != "crawler-commit.lock" or p.name == "index.lock"]
    assert leftovers == [] and git(repo, "status", "--porcelain") == ""
    index = (repo / ".git" / "index").read_bytes()
    link = index.find(b"link\0\0\0")  # the split index's extension naming its shared part
    assert link > 0 and (repo / ".git" / f"sharedindex.{index[link + 8:link + 28].hex()}").is_file()
    import subprocess
    unset = subprocess.run(["git", "config", "--get", "core.splitIndex"], cwd=repo, capture_output=True)
    assert unset.returncode == 1  # the repository's own configuration is untouched


async def test_awkward_names_large_files_and_several_batches_commit_exactly(repo):
    from crawler.gitpack import READ_WHOLE
    big = READ_WHOLE + 5000  # the first file is streamed, not read whole
    names = ["with space.png", 'quote"d.png', "ünïcode/fig 1.png", "back\\slash.png"]
    for i, name in enumerate(names):
        (repo / name).parent.mkdir(parents=True, exist_ok=True)
        (repo / name).write_bytes(bytes([i]) * (big if i == 0 else 10))
    (repo / "unrelated.txt").write_text("the operator's own change, not ours\n")
    ours = GitRepo(repo, 60, "crawler", "c@c")
    first, second = await ours.commit_batches([(names[:2], "one"), (names[2:], "two")])
    await ours.close()
    assert git(repo, "rev-parse", f"{second}^") == first
    def changed(commit: str) -> list[str]:
        return sorted(filter(None, git(repo, "diff-tree", "-z", "-r", "--no-commit-id", "--name-only", commit).split("\0")))
    assert changed(first) == sorted(names[:2]) and changed(second) == sorted(names[2:])
    assert git(repo, "cat-file", "-p", "HEAD:with space.png").encode("latin-1") == bytes([0]) * big
    assert git(repo, "status", "--porcelain") == "?? unrelated.txt"
    assert git(repo, "fsck", "--full", "--strict", "--no-dangling") == ""


async def test_a_symlink_is_refused_and_nothing_is_committed(repo, tmp_path):
    (tmp_path / "outside.png").write_bytes(b"x")
    (repo / "link.png").symlink_to(tmp_path / "outside.png")
    head = git(repo, "rev-parse", "HEAD")
    ours = GitRepo(repo, 60, "crawler", "c@c")
    assert await ours.commit_paths(["link.png"], "no") == head
    assert "not a regular file" in ours.refused["link.png"]
    await ours.close()
    assert git(repo, "rev-parse", "HEAD") == head


async def test_a_dead_commit_worker_is_replaced_for_the_next_batch(repo):
    ours = GitRepo(repo, 60, "crawler", "c@c")
    (repo / "a.png").write_bytes(b"a")
    first = await ours.commit_paths(["a.png"], "one")
    assert ours._worker is not None
    ours._worker.proc.kill()  # e.g. the OOM killer
    ours._worker.proc.wait()
    (repo / "b.png").write_bytes(b"b")
    second = await ours.commit_paths(["b.png"], "two")
    await ours.close()
    assert git(repo, "rev-parse", f"{second}^") == first
    assert git(repo, "show", "--name-only", "--format=", second) == "b.png"


async def test_a_detached_head_is_refused_with_one_line(repo):
    import pytest

    from crawler.git import GitError
    git(repo, "checkout", "-q", "--detach")
    with pytest.raises(GitError, match="detached HEAD"):
        await GitRepo(repo, 60, "crawler", "c@c").check()


async def test_bytes_handed_over_are_committed_and_an_unchanged_file_makes_no_commit(repo):
    ours = GitRepo(repo, 60, "crawler", "c@c")
    (repo / "k.png").write_bytes(b"placed bytes")
    (first,) = await ours.commit_batches([(["k.png"], "one")], {"k.png": b"placed bytes"})
    (again,) = await ours.commit_batches([(["k.png"], "two")], {"k.png": b"placed bytes"})
    await ours.close()
    assert again == first == git(repo, "rev-parse", "HEAD")
    assert git(repo, "cat-file", "-p", "HEAD:k.png") == "placed bytes"
    assert git(repo, "status", "--porcelain") == ""


async def test_a_branch_moved_back_by_an_operator_stays_where_they_put_it(repo):
    """The branch is moved only by compare-and-swap from where we read it: a branch reset back
    is built upon, never taken for an old tip of ours to fast-forward."""
    base = git(repo, "rev-parse", "HEAD")
    ours = GitRepo(repo, 60, "crawler", "c@c")
    (repo / "a.png").write_bytes(b"a")
    first = await ours.commit_paths(["a.png"], "one")
    git(repo, "update-ref", "refs/heads/main", base)  # the operator moves the branch back
    (repo / "b.png").write_bytes(b"b")
    second = await ours.commit_paths(["b.png"], "two")
    await ours.close()
    assert second != first and git(repo, "rev-parse", f"{second}^") == base
    assert git(repo, "rev-parse", "HEAD") == second  # and closing did not move it again
    assert set(git(repo, "ls-tree", "-r", "--name-only", "HEAD").split()) == {"b.png"}
    assert git(repo, "for-each-ref", "refs/crawler") == ""  # our own ref is gone


async def test_a_file_that_cannot_be_committed_is_left_out_and_the_rest_go_ahead(repo):
    ours = GitRepo(repo, 60, "crawler", "c@c")
    (repo / "good.png").write_bytes(b"g")
    commit = await ours.commit_paths(["good.png", "vanished.png"], "one")
    refused = dict(ours.refused)
    await ours.close()
    assert set(refused) == {"vanished.png"}
    assert git(repo, "show", "--name-only", "--format=", commit) == "good.png"


async def test_refs_left_by_a_killed_runs_fast_import_are_removed(repo):
    import subprocess
    gone = subprocess.Popen(["true"])
    gone.wait()  # a process id that no longer runs
    git(repo, "update-ref", f"refs/crawler/import-{gone.pid}-1", "HEAD")
    ours = GitRepo(repo, 60, "crawler", "c@c")
    (repo / "a.png").write_bytes(b"a")
    await ours.commit_paths(["a.png"], "one")
    await ours.close()
    assert git(repo, "for-each-ref", "refs/crawler/") == ""


async def test_a_commit_lock_held_too_long_fails_the_commit_instead_of_hanging(repo):
    import fcntl
    import os

    import pytest

    from crawler.git import GitError
    holder = os.open(repo / ".git" / "crawler-commit.lock", os.O_RDWR | os.O_CREAT)
    fcntl.flock(holder, fcntl.LOCK_EX)  # someone else, stuck while committing
    try:
        ours = GitRepo(repo, 0.2, "crawler", "c@c")
        (repo / "a.png").write_bytes(b"a")
        with pytest.raises(GitError, match="held"):
            await ours.commit_paths(["a.png"], "one")
    finally:
        os.close(holder)
    await ours.close()
    assert git(repo, "log", "--format=%s") == "init"


async def test_the_checkouts_index_learns_what_was_committed_not_what_is_on_disk_now(repo):
    ours = GitRepo(repo, 60, "crawler", "c@c")
    (repo / "a.png").write_bytes(b"committed")
    commit = await ours.commit_paths(["a.png"], "one")
    (repo / "a.png").write_bytes(b"changed on disk afterwards")
    await ours.close()  # the sync at close
    staged = git(repo, "ls-files", "-s", "a.png").split()[1]
    assert staged == git(repo, "rev-parse", f"{commit}:a.png")
    assert git(repo, "diff", "--cached", "--name-only") == ""  # nothing staged against HEAD
    assert git(repo, "status", "--porcelain") == " M a.png"  # the disk change shows as a change


async def test_the_index_knows_each_commit_as_the_branch_moves(repo):
    ours = GitRepo(repo, 60, "crawler", "c@c")
    for name in ("a.png", "b.png"):
        (repo / name).write_bytes(name.encode())
        await ours.commit_paths([name], name)
        assert name in git(repo, "ls-files", "--", name)
        assert git(repo, "status", "--porcelain") == ""
    await ours.close()


async def test_a_split_index_setting_of_the_repository_is_kept(repo):
    git(repo, "config", "core.splitIndex", "false")
    ours = GitRepo(repo, 60, "crawler", "c@c")
    (repo / "a.png").write_bytes(b"a")
    await ours.commit_paths(["a.png"], "one")
    await ours.close()
    assert not [p for p in (repo / ".git").iterdir() if p.name.startswith("sharedindex.")]
    assert git(repo, "status", "--porcelain") == ""


def _user_commit(repo, name: str) -> bool:
    """An ordinary user in the checkout: `git add x && git commit`. False when git's index lock
    was held (git fails at once then, as it does for any two git commands)."""
    import subprocess
    (repo / name).write_text(f"{name}\n")
    env = {"GIT_AUTHOR_NAME": "u", "GIT_AUTHOR_EMAIL": "u@u", "GIT_COMMITTER_NAME": "u", "GIT_COMMITTER_EMAIL": "u@u",
           "PATH": __import__("os").environ["PATH"]}
    if subprocess.run(["git", "add", name], cwd=repo, env=env, capture_output=True).returncode != 0:
        return False
    # Staged, the user commits: when the job holds the index lock at that moment git fails at
    # once, and the user tries again (else the file would stay staged, not committed).
    for _ in range(500):  # bounded
        if subprocess.run(["git", "commit", "-q", "-m", f"user {name}"], cwd=repo, env=env,
                          capture_output=True).returncode == 0:
            return True
    raise AssertionError(f"the user's commit of {name} failed 500 times")


def _deleted_anywhere(repo) -> set[str]:
    return set(git(repo, "log", "--all", "--diff-filter=D", "--name-only", "--format=").split())


async def test_an_ordinary_commit_in_the_checkout_never_deletes_the_jobs_files(repo):
    """The branch and the checkout's index move together: a user's `git add x && git commit`
    right after one of our commits keeps our files (the index knew them)."""
    ours = GitRepo(repo, 60, "crawler", "c@c")
    (repo / "a.png").write_bytes(b"a")
    await ours.commit_paths(["a.png"], "ours")
    assert _user_commit(repo, "notes.txt")
    assert set(git(repo, "ls-tree", "-r", "--name-only", "HEAD").split()) == {"a.png", "notes.txt"}
    (repo / "b.png").write_bytes(b"b")
    await ours.commit_paths(["b.png"], "ours again")
    await ours.close()
    assert _deleted_anywhere(repo) == set()
    assert set(git(repo, "ls-tree", "-r", "--name-only", "HEAD").split()) == {"a.png", "b.png", "notes.txt"}
    assert git(repo, "status", "--porcelain") == ""


async def test_no_interleaving_of_the_job_and_a_user_commits_a_deletion(repo):
    """A user commits in a loop while the job commits batch after batch: whatever the order, no
    commit deletes a file of the job's, and every file of both is on the branch at the end."""
    import asyncio
    import threading

    ours = GitRepo(repo, 60, "crawler", "c@c")
    stop = threading.Event()
    made: list[str] = []

    def user() -> None:
        for i in range(400):  # bounded; stops when the job is done
            if stop.is_set():
                return
            if _user_commit(repo, f"u{i:03}.txt"):
                made.append(f"u{i:03}.txt")

    worker = threading.Thread(target=user)
    worker.start()
    ours_files = []
    try:
        for b in range(25):
            batch = [f"figs/b{b:02}-{k}.png" for k in range(4)]
            for name in batch:
                (repo / name).parent.mkdir(exist_ok=True)
                (repo / name).write_bytes(name.encode())
            await ours.commit_paths(batch, f"batch {b}")
            ours_files += batch
            await asyncio.sleep(0)
    finally:
        stop.set()
        await asyncio.to_thread(worker.join)
        await ours.close()
    assert made, "the user committed at least once"
    assert _deleted_anywhere(repo) == set()
    tracked = set(git(repo, "ls-tree", "-r", "--name-only", "HEAD").split())
    assert set(ours_files) <= tracked and set(made) <= tracked
    assert git(repo, "status", "--porcelain", "--untracked-files=no") == ""


def _plant_our_stale_index_lock(repo, pid: int):
    """git's index.lock as a run of ours killed while holding it leaves it: the lock, and the
    owner note naming the process, the lock's inode and its mtime."""
    import os

    from crawler.git import IndexLock
    lock = repo / ".git" / "index.lock"
    lock.write_bytes(b"")
    st = os.stat(lock)
    (repo / ".git" / IndexLock.OWNER).write_text(f"{pid} {st.st_ino} {st.st_mtime_ns}\n")
    return lock


async def test_an_index_lock_a_killed_run_of_ours_left_is_removed(repo):
    """SIGKILL while holding git's index.lock: the owner note names a dead process and that very
    lock file, so the next commit removes it and goes ahead."""
    import subprocess
    gone = subprocess.Popen(["true"])
    gone.wait()
    lock = _plant_our_stale_index_lock(repo, gone.pid)
    ours = GitRepo(repo, 60, "crawler", "c@c")
    (repo / "a.png").write_bytes(b"a")
    await ours.commit_paths(["a.png"], "one")
    warnings = list(ours.warnings)
    await ours.close()
    assert not lock.exists() and any("killed" in w for w in warnings)
    assert "a.png" in git(repo, "ls-files")


async def test_someone_elses_index_lock_is_waited_for_then_reported_never_removed(repo):
    import pytest

    from crawler.git import GitError
    lock = repo / ".git" / "index.lock"
    lock.write_bytes(b"")  # a git command still running, or one that crashed
    head = git(repo, "rev-parse", "HEAD")
    ours = GitRepo(repo, 0.3, "crawler", "c@c")
    (repo / "a.png").write_bytes(b"a")
    with pytest.raises(GitError, match="index.lock"):
        await ours.commit_paths(["a.png"], "one")
    await ours.close()
    assert lock.exists() and git(repo, "rev-parse", "HEAD") == head
    lock.unlink()
    assert git(repo, "ls-files") == ""


async def test_a_bloated_split_index_gets_a_new_shared_part(repo):
    """After a `git status` refreshed many entries, the split part can hold nearly the whole
    index (as nameless replacements); the next commit then writes a new shared part and the
    split part is small again."""
    for i in range(2500):
        (repo / f"u{i}.txt").write_text(str(i))
    git(repo, "add", ".")
    git(repo, "-c", "user.name=o", "-c", "user.email=o@o", "commit", "-q", "-m", "theirs")
    git(repo, "-c", "core.splitIndex=true", "update-index", "--split-index")
    for i in range(2500):
        os.utime(repo / f"u{i}.txt", (1_700_000_000, 1_700_000_000))
    git(repo, "update-index", "-q", "--refresh")  # each refreshed entry: a replacement in the split part
    index = repo / ".git" / "index"
    bloated = index.stat().st_size
    before = {p.name for p in (repo / ".git").glob("sharedindex.*")}
    ours = GitRepo(repo, 60, "crawler", "c@c")
    (repo / "b.png").write_bytes(b"b")
    await ours.commit_paths(["b.png"], "two")
    await ours.close()
    after = {p.name for p in (repo / ".git").glob("sharedindex.*")}
    assert after - before, "a new shared part was written"
    assert index.stat().st_size < bloated // 10
    assert len(git(repo, "ls-files").split()) == 2501 and git(repo, "status", "--porcelain") == ""


SHIELD_SCRIPT = r"""
import asyncio, os, signal, sys
from pathlib import Path
from crawler.git import GitRepo

async def main(root):
    stopped = asyncio.Event()
    for sig in (signal.SIGINT, signal.SIGTERM):
        asyncio.get_running_loop().add_signal_handler(sig, stopped.set)  # as the job does
    ours = GitRepo(Path(root), 60, "crawler", "c@c")
    (Path(root) / "a.png").write_bytes(b"a")
    await ours.commit_paths(["a.png"], "one")
    print(ours._worker.proc.pid, flush=True)
    await asyncio.wait_for(stopped.wait(), 60)
    (Path(root) / "b.png").write_bytes(b"b")
    await ours.commit_paths(["b.png"], "two")  # committed after the signal, by the same worker
    print(ours._worker.proc.pid, flush=True)
    await ours.close()

asyncio.run(main(sys.argv[1]))
"""


def test_a_ctrl_c_to_the_whole_process_group_reaches_the_job_not_its_commit_worker(repo):
    """A terminal's Ctrl-C (or systemd's stop) signals every process of the group: the commit
    worker must not die mid-commit; the job decides when it stops."""
    import os
    import signal
    import subprocess
    import sys
    from pathlib import Path
    proc = subprocess.Popen([sys.executable, "-c", SHIELD_SCRIPT, str(repo)], stdout=subprocess.PIPE, text=True,
                            start_new_session=True, cwd=Path(__file__).resolve().parents[2])
    with proc:
        try:
            first = proc.stdout.readline().strip()
            os.killpg(proc.pid, signal.SIGINT)
            os.killpg(proc.pid, signal.SIGTERM)  # what systemd sends to the whole group
            second = proc.stdout.readline().strip()
            assert proc.wait(60) == 0
        finally:
            proc.kill()
    assert first and second == first, "the same worker committed after the signals"
    assert git(repo, "log", "--format=%s") == "two\none\ninit"


async def test_a_branch_with_no_commit_yet_gets_its_first_from_us(tmp_path):
    """`git init` and nothing else: the first call makes the root commit, even when its first
    batch has nothing committable (a file that vanished)."""
    root = tmp_path / "fresh"
    root.mkdir()
    git(root, "init", "-q", "-b", "main")
    ours = GitRepo(root, 60, "crawler", "c@c")
    (root / "b.png").write_bytes(b"b")
    first, second = await ours.commit_batches([(["gone.png"], "one"), (["b.png"], "two")])
    refused = dict(ours.refused)
    await ours.close()
    assert set(refused) == {"gone.png"}
    assert second == git(root, "rev-parse", "HEAD") and git(root, "log", "--format=%s") == "two"
    assert git(root, "ls-files") == "b.png" and git(root, "status", "--porcelain") == ""


async def test_a_branch_with_no_commit_yet_and_nothing_committable_fails_nothing(tmp_path):
    root = tmp_path / "fresh"
    root.mkdir()
    git(root, "init", "-q", "-b", "main")
    ours = GitRepo(root, 60, "crawler", "c@c")
    await ours.commit_batches([(["gone.png"], "one")])
    assert set(ours.refused) == {"gone.png"}
    await ours.close()


async def test_large_files_are_streamed_with_bounded_memory_and_a_watchdog_that_grows_with_them(repo, monkeypatch):
    """160 files of 1 MiB in one call: the commit worker holds at most gitpack.HOLD_MAX of them
    (the rest stream from disk), and the call's watchdog allows for reading every byte."""
    from crawler import git as git_module
    from crawler.gitpack import HOLD_MAX
    timeouts: list[float] = []
    real_call = git_module._PackWorker._call

    def spy(self, request, timeout_s, also=()):
        timeouts.append(timeout_s)
        return real_call(self, request, timeout_s, also)

    monkeypatch.setattr(git_module._PackWorker, "_call", spy)
    names = []
    for i in range(160):
        name = f"models/m{i:03}.bin"
        (repo / name).parent.mkdir(exist_ok=True)
        (repo / name).write_bytes(bytes([i]) * (1 << 20))
        names.append(name)
    ours = GitRepo(repo, 5, "crawler", "c@c", min_bytes_per_s=1 << 20)
    await ours.commit_batches([(names[:80], "one"), (names[80:], "two")])
    with open(f"/proc/{ours._worker.proc.pid}/status") as fh:
        peak_kb = next(int(line.split()[1]) for line in fh if line.startswith("VmHWM:"))
    await ours.close()
    assert git(repo, "cat-file", "-s", "HEAD:models/m159.bin") == str(1 << 20)
    assert peak_kb * 1024 < (HOLD_MAX + (60 << 20)), f"worker peak {peak_kb} kB: files were held, not streamed"
    assert timeouts[0] >= 5 * 3 + 2 * 160  # per-batch allowance + reading 160 MiB twice at 1 MiB/s


async def test_a_stale_index_lock_of_ours_is_removed_even_if_its_process_id_lives_again(repo):
    """In a container the next run may have the killed run's process id: the owner note's inode
    and mtime decide, not the id (every holder of our lock holds the commit flock we hold)."""
    import os
    lock = _plant_our_stale_index_lock(repo, os.getpid())
    ours = GitRepo(repo, 60, "crawler", "c@c")
    (repo / "a.png").write_bytes(b"a")
    await ours.commit_paths(["a.png"], "one")
    await ours.close()
    assert not lock.exists() and "a.png" in git(repo, "ls-files")


async def test_a_failed_wait_for_the_index_lock_keeps_the_note_of_a_killed_runs_lock(repo):
    import pytest

    from crawler.git import GitError, IndexLock
    lock = repo / ".git" / "index.lock"
    lock.write_bytes(b"")
    note = repo / ".git" / IndexLock.OWNER
    note.write_text("1 1 1\n")  # names some other file: this lock is not ours, so it is waited for
    ours = GitRepo(repo, 0.2, "crawler", "c@c")
    (repo / "a.png").write_bytes(b"a")
    with pytest.raises(GitError, match="index.lock"):
        await ours.commit_paths(["a.png"], "one")
    await ours.close()
    assert note.read_text() == "1 1 1\n" and lock.exists()


async def test_the_intent_log_of_an_older_version_survives_a_commit_that_fails(repo):
    """Paths an older version committed without teaching the index: the log is removed only once
    an index holding them is published with the branch moved; a failed commit keeps it."""
    import pytest

    from crawler.git import LEGACY_UNSYNCED, GitError
    (repo / "old.png").write_bytes(b"old")
    git(repo, "add", "old.png")
    git(repo, "-c", "user.name=o", "-c", "user.email=o@o", "commit", "-q", "-m", "older version")
    git(repo, "rm", "-q", "--cached", "old.png")  # the index never learned it
    (repo / ".git" / LEGACY_UNSYNCED).write_bytes(b"old.png\0")
    stale_ref = repo / ".git" / "refs" / "heads" / "main.lock"
    stale_ref.write_text("")
    ours = GitRepo(repo, 60, "crawler", "c@c")
    (repo / "a.png").write_bytes(b"a")
    with pytest.raises(GitError):
        await ours.commit_paths(["a.png"], "one")
    assert (repo / ".git" / LEGACY_UNSYNCED).exists()
    stale_ref.unlink()
    await ours.commit_paths(["a.png"], "one")
    await ours.close()
    assert not (repo / ".git" / LEGACY_UNSYNCED).exists()
    assert set(git(repo, "ls-files").split()) == {"a.png", "old.png"} and git(repo, "status", "--porcelain") == ""


async def test_an_index_it_does_not_write_is_left_to_git(repo):
    """Index version 4 (prefix-compressed names) is not written by crawler/gitindex.py: the
    commit still keeps the index in step, through git update-index, and says so once."""
    (repo / "u.txt").write_text("u")
    git(repo, "add", "u.txt")
    git(repo, "update-index", "--index-version", "4")
    ours = GitRepo(repo, 60, "crawler", "c@c")
    (repo / "a.png").write_bytes(b"a")
    (repo / "b.png").write_bytes(b"b")
    await ours.commit_paths(["a.png"], "one")
    await ours.commit_paths(["b.png"], "two")
    await ours.close()
    assert [w for w in ours.warnings if "left to git update-index: index version 4" in w] == [ours.warnings[0]]
    assert len(ours.warnings) == 1
    assert git(repo, "ls-files").split() == ["a.png", "b.png", "u.txt"]
    assert git(repo, "status", "--porcelain") == "A  u.txt"
