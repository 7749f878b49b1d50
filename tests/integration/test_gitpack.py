"""Packs written by crawler/gitpack.py, checked by git itself: fsck, and tree ids equal to the
ones git computes for the same entries."""

import hashlib
import os
import random
import subprocess

import pytest

from crawler import gitpack
from crawler.git import GitError, GitRepo
from tests.harness import git


def blob_id(data: bytes) -> str:
    return hashlib.sha1(b"blob %d\0" % len(data) + data).hexdigest()


def git_tree_for(repo, base: str, files: dict[str, bytes], tmp_path) -> str:
    """The tree git itself makes from `base` plus `files` (through an index of its own)."""
    env = {**os.environ, "GIT_INDEX_FILE": str(tmp_path / "oracle-index")}
    subprocess.run(["git", "read-tree", base], cwd=repo, env=env, check=True)
    info = "".join(f"100644 {blob_id(d)}\t{p}\n" for p, d in files.items())
    subprocess.run(["git", "update-index", "--index-info"], cwd=repo, env=env, input=info.encode(), check=True)
    return subprocess.run(["git", "write-tree", "--missing-ok"], cwd=repo, env=env, check=True,
                          capture_output=True, text=True).stdout.strip()


@pytest.fixture
def small_chunks(monkeypatch):
    # Tiny chunks and deltas from 64 bytes, so a few hundred files split chunks and make chains.
    monkeypatch.setattr(gitpack, "CHUNK", 4)
    monkeypatch.setattr(gitpack, "DELTA_FROM", 64)
    monkeypatch.setattr(gitpack, "MAX_DEPTH", 3)


@pytest.mark.parametrize("spilled", [False, True], ids=["in-memory", "spilled"])
async def test_trees_are_the_ones_git_makes_and_the_repository_is_sound(repo, tmp_path, small_chunks, spilled,
                                                                          monkeypatch):
    # A folder git made (one entry per paper), then ours inserted among them in random order,
    # over several calls of several batches: the same tree ids as git's own, and fsck is clean.
    # Spilled: every folder kept between calls keeps its chunks in the scratch file, which is
    # rewritten after every call (deltas then copy from chunks read back from it).
    if spilled:
        monkeypatch.setattr(gitpack, "KEEP_LOADED", 200)
        monkeypatch.setattr(gitpack, "SPILL_SLACK", -1)
    rng = random.Random(7)
    existing = {f"figures/papers/P{i:04d}/f{i}.png": b"old %d" % i for i in range(0, 400, 3)}
    # Files named like a folder plus a suffix: git sorts "P0010.txt" before the folder "P0010".
    existing.update({f"figures/papers/P{i:04d}.txt": b"note %d" % i for i in range(0, 200, 10)})
    for path, data in existing.items():
        (repo / path).parent.mkdir(parents=True, exist_ok=True)
        (repo / path).write_bytes(data)
    git(repo, "add", "figures")
    git(repo, "-c", "user.name=t", "-c", "user.email=t@t", "commit", "-q", "-m", "theirs")
    base = git(repo, "rev-parse", "HEAD")
    new = [i for i in range(400) if i % 3]
    rng.shuffle(new)
    # In this process (the chunk sizes above apply), moving the branch as GitRepo does.
    packer = gitpack.PackCommitter(repo, repo / ".git" / "objects", dict(os.environ), 60, b"c <c@c>")
    added: dict[str, bytes] = {}
    for call in range(4):
        batches, known = [], {}
        for b in range(3):
            paths = []
            for i in new[call * 66 + b * 22: call * 66 + (b + 1) * 22]:
                path = f"figures/papers/P{i // 2:04d}/g{i}.png"  # new files in old and new folders
                data = b"\x89PNG new %d" % i if i % 2 else b"text %d" % i
                (repo / path).parent.mkdir(parents=True, exist_ok=True)
                (repo / path).write_bytes(data)
                paths.append((path, data if call % 2 else None, None))
                known[path] = data
            batches.append((paths, f"call {call} batch {b}"))
        tip = git(repo, "rev-parse", "HEAD")
        made, refused, _entries = gitpack.work(packer, tip, batches)
        assert refused == {} and len(made) == 3
        git(repo, "update-ref", "refs/heads/main", made[-1], tip)
        added.update(known)
        assert (packer._spill is not None) == spilled
        if spilled:  # rewritten just now: only the live chunks are left in it
            big = packer._top.children[b"figures"].children[b"papers"]
            assert big.spill is packer._spill
            assert packer._spill.end == packer._spill.live >= big.size()
    packer.close()
    git(repo, "add", "figures")  # the checkout's index (GitRepo syncs it; here git does)
    assert git(repo, "rev-parse", "HEAD^{tree}") == git_tree_for(repo, base, added, tmp_path)
    assert git(repo, "rev-list", "--count", f"{base}..HEAD") == "12"
    assert git(repo, "fsck", "--full", "--strict", "--no-dangling") == ""
    assert git(repo, "status", "--porcelain") == ""
    chains = [line for pack in (repo / ".git/objects/pack").glob("pack-*.idx")
              for line in git(repo, "verify-pack", "-v", str(pack)).splitlines() if line.startswith("chain length")]
    assert chains, "no tree was stored as a delta"


async def test_the_second_call_reads_the_folders_again_after_someone_else_commits(repo, tmp_path):
    ours = GitRepo(repo, 60, "crawler", "c@c")
    await ours.commit_batches([(["d/a.png"], "one")], {"d/a.png": b"a"})
    (repo / "d").mkdir(exist_ok=True)
    (repo / "d" / "b.txt").write_text("theirs")
    git(repo, "add", "d/b.txt")
    git(repo, "-c", "user.name=t", "-c", "user.email=t@t", "commit", "-q", "-m", "theirs")
    (repo / "d" / "a.png").write_bytes(b"a")
    theirs = git(repo, "rev-parse", "HEAD")
    (made,) = await ours.commit_batches([(["d/c.png"], "two")], {"d/c.png": b"c"})
    await ours.close()
    assert git(repo, "rev-parse", f"{made}^") == theirs
    assert git(repo, "ls-tree", "-r", "--name-only", "HEAD").split() == ["d/a.png", "d/b.txt", "d/c.png"]
    assert git(repo, "fsck", "--full", "--strict", "--no-dangling") == ""


async def test_something_in_the_way_refuses_that_path_only(repo):
    (repo / "taken.png").write_bytes(b"a file")
    (repo / "folder.png").mkdir()
    (repo / "folder.png" / "inside").write_bytes(b"x")
    git(repo, "add", ".")
    git(repo, "-c", "user.name=t", "-c", "user.email=t@t", "commit", "-q", "-m", "theirs")
    ours = GitRepo(repo, 60, "crawler", "c@c")
    known = {"taken.png/under.png": b"1", "folder.png": b"2", "fine/ok.png": b"3"}
    (made,) = await ours.commit_batches([(sorted(known), "one")], known)
    refused = dict(ours.refused)
    await ours.close()
    assert refused.keys() == {"taken.png/under.png", "folder.png"}
    assert "is a file in the repository" in refused["taken.png/under.png"]
    assert "is a folder in the repository" in refused["folder.png"]
    assert git(repo, "show", "--name-only", "--format=", made) == "fine/ok.png"


def test_a_file_changed_while_written_leaves_no_pack_and_no_commit(repo, tmp_path):
    # Its id was computed from other bytes: storing it under that id would corrupt the repository.
    big = repo / "big.png"
    big.write_bytes(b"y" * 3000)
    packer = gitpack.PackCommitter(repo, repo / ".git" / "objects", dict(os.environ), 60, b"c <c@c>")
    stale = gitpack.Blob("big.png", b"100644", bytes.fromhex(blob_id(b"x" * 3000)), 3000, None, big)
    before = sorted(os.listdir(repo / ".git" / "objects" / "pack"))
    with pytest.raises(gitpack.PackError, match="changed while being committed"):
        packer.commit(git(repo, "rev-parse", "HEAD"), [([stale], "one")])
    packer.close()
    assert sorted(os.listdir(repo / ".git" / "objects" / "pack")) == before
    assert packer.tip is None  # its folders are read again next time


async def test_a_sha256_repository_is_refused_with_one_line(tmp_path):
    root = tmp_path / "r"
    root.mkdir()
    git(root, "init", "-q", "--object-format=sha256", "-b", "main")
    git(root, "-c", "user.name=t", "-c", "user.email=t@t", "commit", "-q", "--allow-empty", "-m", "init")
    ours = GitRepo(root, 60, "crawler", "c@c")
    with pytest.raises(GitError, match="sha256"):
        await ours.commit_batches([(["a.png"], "one")], {"a.png": b"a"})
    await ours.close()


def test_deltas_copy_shared_chunks_and_insert_the_rest():
    a, b, c, d = b"A" * 100, b"B" * 70_000, b"C" * 5, b"D" * 300
    delta = gitpack.tree_delta([a, b, c], [a, b, d, c])
    assert apply_delta(a + b + c, delta) == a + b + d + c
    assert len(delta) < 400  # 70 kB copied, not carried


def apply_delta(base: bytes, delta: bytes) -> bytes:
    """git's patch-delta, as gitformat-pack(5) describes it: an independent reading."""
    def varint(i):
        n = shift = 0
        while True:
            byte = delta[i]
            i += 1
            n |= (byte & 0x7F) << shift
            shift += 7
            if not byte & 0x80:
                return n, i
    src, i = varint(0)
    dst, i = varint(i)
    assert src == len(base)
    out = bytearray()
    while i < len(delta):
        op = delta[i]
        i += 1
        if op & 0x80:
            offset = size = 0
            for k in range(4):
                if op & (1 << k):
                    offset |= delta[i] << (8 * k)
                    i += 1
            for k in range(3):
                if op & (0x10 << k):
                    size |= delta[i] << (8 * k)
                    i += 1
            out += base[offset:offset + (size or 0x10000)]
        else:
            assert op, "opcode 0 is reserved"
            out += delta[i:i + op]
            i += op
    assert len(out) == dst
    return bytes(out)


@pytest.mark.parametrize("order", [("x/a/b.png", "x/a"), ("x/a", "x/a/b.png")])
def test_a_file_and_a_folder_of_one_name_in_one_call_refuse_the_later(repo, order):
    packer = gitpack.PackCommitter(repo, repo / ".git" / "objects", dict(os.environ), 60, b"c <c@c>")
    tip = git(repo, "rev-parse", "HEAD")
    made, refused, _entries = gitpack.work(packer, tip, [([(p, b"data", None) for p in order], "one")])
    packer.close()
    assert set(refused) == {order[1]}
    git(repo, "update-ref", "refs/heads/main", made[-1], tip)
    assert git(repo, "ls-tree", "-r", "--name-only", "HEAD") == order[0]
    assert git(repo, "fsck", "--full", "--strict", "--no-dangling") == ""


def test_a_path_git_cannot_hold_is_refused_and_the_rest_go_ahead(repo):
    packer = gitpack.PackCommitter(repo, repo / ".git" / "objects", dict(os.environ), 60, b"c <c@c>")
    tip = git(repo, "rev-parse", "HEAD")
    paths = [("nul\0byte.png", b"1"), ("nul\0read.png", None), ("x/../y.png", b"2"), (".git/config", b"3"),
             ("fine.png", b"4")]
    made, refused, _entries = gitpack.work(packer, tip, [([(p, d, None) for p, d in paths], "one")])
    packer.close()
    assert set(refused) == {p for p, _ in paths} - {"fine.png"}
    assert git(repo, "show", "--name-only", "--format=", made[-1]) == "fine.png"


async def test_a_branch_ref_that_cannot_be_written_is_said_not_retried(repo):
    lock = repo / ".git" / "refs" / "heads" / "main.lock"
    lock.write_text("")  # left by a git that was killed
    ours = GitRepo(repo, 60, "crawler", "c@c")
    with pytest.raises(GitError, match="lock"):
        await ours.commit_batches([(["a.png"], "one")], {"a.png": b"a"})
    await ours.close()
    assert git(repo, "log", "--format=%s") == "init"
    assert git(repo, "ls-files") == ""  # the index was put back: it holds nothing the branch lacks
    assert not (repo / ".git" / "index.lock").exists()


async def test_a_relative_root_and_python_files_in_it_are_harmless(repo, monkeypatch):
    monkeypatch.chdir(repo.parent)
    (repo / "bisect.py").write_text("raise SystemExit('imported from the artifacts root')\n")
    ours = GitRepo(type(repo)(repo.name), 60, "crawler", "c@c")
    (made,) = await ours.commit_batches([(["a.png"], "one")], {"a.png": b"a"})
    await ours.close()
    assert git(repo, "show", "--name-only", "--format=", made) == "a.png"


def test_the_object_reader_is_started_afresh_as_packs_pile_up(repo, monkeypatch):
    """One pack per call: the reader (which maps every pack it reads) is replaced every
    RECYCLE_READER_PACKS packs, and committing goes on unchanged across the change."""
    monkeypatch.setattr(gitpack, "RECYCLE_READER_PACKS", 3)
    packer = gitpack.PackCommitter(repo, repo / ".git" / "objects", dict(os.environ), 60, b"c <c@c>")
    readers = set()
    for i in range(7):
        tip = git(repo, "rev-parse", "HEAD")
        made, refused, _ = gitpack.work(packer, tip, [([(f"d/f{i}.png", b"%d" % i, None)], f"c{i}")])
        assert refused == {}
        git(repo, "update-ref", "refs/heads/main", made[-1], tip)
        readers.add(packer._reader.proc.pid)
    packer.close()
    assert len(readers) == 3  # started afresh after the 3rd and the 6th pack
    assert git(repo, "ls-tree", "--name-only", "HEAD:d").split() == [f"f{i}.png" for i in range(7)]
    assert git(repo, "fsck", "--full", "--strict", "--no-dangling") == ""


def test_a_small_folder_let_go_is_taken_back_without_asking_git(repo, monkeypatch):
    """A paper's figures come over several calls: its folder, let go after a call, is kept
    among the recently let go (up to LET_GO_KEPT bytes) and taken back from there, not read
    again from git (whose reader walks the index of every pack written since)."""
    packer = gitpack.PackCommitter(repo, repo / ".git" / "objects", dict(os.environ), 60, b"c <c@c>")
    reads: list[str] = []
    real_read = gitpack.ObjectReader.read

    def counting(self, oid, kind):
        reads.append(oid.hex() if isinstance(oid, bytes) else str(oid))
        return real_read(self, oid, kind)

    monkeypatch.setattr(gitpack.ObjectReader, "read", counting)
    for i in range(6):  # papers p0..p2, two figures each, in separate calls
        tip = git(repo, "rev-parse", "HEAD")
        made, refused, _ = gitpack.work(packer, tip, [([(f"figures/p{i % 3}/f{i}.png", b"%d" % i, None)], f"c{i}")])
        assert refused == {}
        git(repo, "update-ref", "refs/heads/main", made[-1], tip)
    assert len(reads) == 2  # the first call's start: the tip commit and its tree
    monkeypatch.setattr(gitpack, "LET_GO_KEPT", 0)  # nothing kept: each paper folder read again
    for i in range(6, 9):
        tip = git(repo, "rev-parse", "HEAD")
        made, _, _ = gitpack.work(packer, tip, [([(f"figures/p{i % 3}/f{i}.png", b"%d" % i, None)], f"c{i}")])
        git(repo, "update-ref", "refs/heads/main", made[-1], tip)
    packer.close()
    # p0 (and figures/) were taken back before the limit applied; then figures/ and p1, figures/ and p2 read
    assert len(reads) == 2 + 4
    assert git(repo, "ls-tree", "-r", "--name-only", "HEAD:figures/p0").split() == ["f0.png", "f3.png", "f6.png"]
    assert git(repo, "fsck", "--full", "--strict", "--no-dangling") == ""


def test_the_scratch_file_starts_afresh_when_someone_else_moved_the_branch(repo, monkeypatch):
    """With --workers, or a user's commit, the branch moves between our calls and the folders are
    read again. The old tree's spilled chunks go with it: the scratch file holds one tree's
    worth, not one more big folder every call."""
    monkeypatch.setattr(gitpack, "KEEP_LOADED", 200)
    packer = gitpack.PackCommitter(repo, repo / ".git" / "objects", dict(os.environ), 60, b"c <c@c>")
    sizes = []
    for i in range(12):
        tip = git(repo, "rev-parse", "HEAD")
        batch = [(f"figures/p{k:03d}/f{i}.png", b"%d-%d" % (i, k), None) for k in range(40)]
        made, refused, _ = gitpack.work(packer, tip, [(batch, f"ours {i}")])
        assert refused == {}
        git(repo, "update-ref", "refs/heads/main", made[-1], tip)
        # someone else commits on top: our next call starts from a tip we did not make
        git(repo, "-c", "user.name=t", "-c", "user.email=t@t", "commit", "-q", "--allow-empty", "-m", f"theirs {i}")
        sizes.append(packer._spill.end)
    packer.close()
    assert max(sizes) < 3 * sizes[1], sizes  # the folder grows 40 entries a call; the file does not pile up
    assert git(repo, "fsck", "--full", "--strict", "--no-dangling") == ""


def test_a_scratch_file_that_cannot_be_written_costs_no_commit(repo, monkeypatch):
    """A full disk while keeping the big folders between calls (after the pack is written): the
    commits stand, and the next call reads the folders again from git."""
    monkeypatch.setattr(gitpack, "KEEP_LOADED", 200)
    packer = gitpack.PackCommitter(repo, repo / ".git" / "objects", dict(os.environ), 60, b"c <c@c>")
    real_put = gitpack.Spill.put

    def full(self, chunk):  # type: ignore[no-untyped-def]
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(gitpack.Spill, "put", full)
    tip = git(repo, "rev-parse", "HEAD")
    made, refused, _ = gitpack.work(packer, tip, [([(f"figures/p{k:03d}/f.png", b"%d" % k, None) for k in range(40)],
                                                   "while the disk is full")])
    assert refused == {} and len(made) == 1
    git(repo, "update-ref", "refs/heads/main", made[-1], tip)
    monkeypatch.setattr(gitpack.Spill, "put", real_put)
    made2, _, _ = gitpack.work(packer, made[-1], [([("figures/p000/g.png", b"g", None)], "after")])
    git(repo, "update-ref", "refs/heads/main", made2[-1], made[-1])
    packer.close()
    assert len(git(repo, "ls-tree", "-r", "--name-only", "HEAD").split()) == 41
    assert git(repo, "fsck", "--full", "--strict", "--no-dangling") == ""


def test_a_branch_moved_by_another_committer_is_caught_up_without_reading_the_folders_again(repo, monkeypatch):
    """Two processes committing in turn (--workers): each applies the other's files to the
    folders it holds (git diff-tree) instead of reading them again, and the trees are git's."""
    monkeypatch.setattr(gitpack, "KEEP_LOADED", 200)  # the papers' folder is a big one, spilled
    env = dict(os.environ)
    a = gitpack.PackCommitter(repo, repo / ".git" / "objects", env, 60, b"a <a@a>")
    b = gitpack.PackCommitter(repo, repo / ".git" / "objects", env, 60, b"b <b@b>")
    loads: list[int] = []  # the size of each folder read from git

    def counted(oid, real):
        folder = real(oid)
        loads.append(folder.size())
        return folder
    for p in (a, b):
        monkeypatch.setattr(p, "_load", lambda oid, real=p._load: counted(oid, real))
    tip = git(repo, "rev-parse", "HEAD")
    expected: dict[str, bytes] = {}
    for i in range(6):
        for name, p in (("a", a), ("b", b)):
            batch = [(f"figures/papers/P{i}{name}{k:02d}/f.png", b"%s-%d-%d" % (name.encode(), i, k), None)
                     for k in range(30)]
            batch.append((f"figures/papers/P0a00/more-{name}{i}.png", b"more", None))  # a folder both write to
            made, refused, _ = gitpack.work(p, tip, [(batch, f"{name} {i}")])
            assert refused == {}
            git(repo, "update-ref", "refs/heads/main", made[-1], tip)
            tip = made[-1]
            expected.update({path: data for path, data, _ in batch})
        if i == 0:
            loads.clear()  # each has read the folders once, to start
    a.close()
    b.close()
    assert all(size < gitpack.KEEP_LOADED for size in loads), f"a big folder was read again: {loads}"
    listed = git(repo, "ls-tree", "-r", "HEAD", "figures/papers").splitlines()
    assert {line.split("\t")[1]: line.split()[2] for line in listed} == {p: blob_id(d) for p, d in expected.items()}
    assert git(repo, "fsck", "--full", "--strict", "--no-dangling") == ""


def test_a_file_deleted_by_someone_else_makes_the_folders_read_again(repo):
    packer = gitpack.PackCommitter(repo, repo / ".git" / "objects", dict(os.environ), 60, b"c <c@c>")
    tip = git(repo, "rev-parse", "HEAD")
    made, _, _ = gitpack.work(packer, tip, [([("d/a.png", b"a", None), ("d/b.png", b"b", None)], "ours")])
    git(repo, "update-ref", "refs/heads/main", made[-1], tip)
    # Someone else's commit deletes d/a.png (through an index of its own).
    env = {**os.environ, "GIT_INDEX_FILE": str(repo / ".git" / "theirs-index"), "GIT_AUTHOR_NAME": "t",
           "GIT_AUTHOR_EMAIL": "t@t", "GIT_COMMITTER_NAME": "t", "GIT_COMMITTER_EMAIL": "t@t"}

    def plumb(*args: str) -> str:
        return subprocess.run(["git", *args], cwd=repo, env=env, check=True, capture_output=True, text=True).stdout.strip()
    plumb("read-tree", made[-1])
    plumb("update-index", "--force-remove", "d/a.png")
    tip = plumb("commit-tree", plumb("write-tree"), "-p", made[-1], "-m", "theirs: a deleted")
    git(repo, "update-ref", "refs/heads/main", tip, made[-1])
    made, _, _ = gitpack.work(packer, tip, [([("d/c.png", b"c", None)], "ours again")])
    packer.close()
    git(repo, "update-ref", "refs/heads/main", made[-1], tip)
    assert git(repo, "ls-tree", "-r", "--name-only", "HEAD").split() == ["d/b.png", "d/c.png"]
    assert git(repo, "fsck", "--full", "--strict", "--no-dangling") == ""
