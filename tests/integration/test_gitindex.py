"""crawler/gitindex.py against git itself: whatever index it writes, git reads as the same index
`git update-index --index-info` would have made from the same one, in every shape a checkout's
index takes (none yet, whole, split with replacements and deletions, conflicted, with a tree
cache), and over many calls mixed with a user's own git commands."""

from __future__ import annotations

import os
import random
import shutil
import subprocess
from pathlib import Path

import pytest

from crawler import gitindex

EMPTY_BLOB = "e69de29bb2d1d6434b8b29ae775ad8c2e48c5391"


def run(root: Path, *args: str, index: Path | None = None, stdin: bytes | None = None, ok: bool = True) -> bytes:
    env = {**os.environ, "GIT_CONFIG_NOSYSTEM": "1", "HOME": str(root)}
    if index is not None:
        env["GIT_INDEX_FILE"] = str(index)
    proc = subprocess.run(["git", "-c", "user.name=u", "-c", "user.email=u@u", *args], cwd=root, env=env,
                          input=stdin, capture_output=True)
    if ok and proc.returncode:
        raise AssertionError(f"git {' '.join(args)}: {proc.stderr.decode()}")
    return proc.stdout


def blob(root: Path, data: bytes) -> str:
    return run(root, "hash-object", "-w", "--stdin", stdin=data).decode().strip()


def lines_for(root: Path, paths: list[str], salt: str = "") -> list[bytes]:
    return [b"100644 blob %s\t%s" % (blob(root, f"{p}{salt}".encode()).encode(), p.encode()) for p in paths]


def ours_then_git(root: Path, lines: list[bytes]) -> tuple[Path, Path]:
    """The checkout's index with `lines` added, by gitindex and by git (the reference)."""
    gitdir = root / ".git"
    index = gitdir / "index"
    out, ref = gitdir / "index.ours", gitdir / "index.ref"
    if index.exists():
        shutil.copyfile(index, ref)
    else:
        ref.unlink(missing_ok=True)
    gitindex.add(index if index.exists() else None, out, gitindex.parse_index_info(lines), gitdir)
    run(root, "update-index", "-z", "--index-info", index=ref, stdin=b"".join(x + b"\0" for x in lines))
    return out, ref


def same(root: Path, out: Path, ref: Path, trees: bool = True) -> None:
    assert run(root, "ls-files", "-s", "-z", index=out) == run(root, "ls-files", "-s", "-z", index=ref)
    assert run(root, "diff", "--cached", "--name-status", "-z", index=out) == \
        run(root, "diff", "--cached", "--name-status", "-z", index=ref)
    if trees:  # the tree cache: a stale one would make write-tree leave our entries out
        assert run(root, "write-tree", index=out) == run(root, "write-tree", index=ref)


@pytest.fixture()
def checkout(tmp_path: Path) -> Path:
    root = tmp_path / "co"
    root.mkdir()
    run(root, "init", "-q", "-b", "main")
    for i in range(30):
        (root / "figures" / f"p{i % 7}").mkdir(parents=True, exist_ok=True)
        (root / "figures" / f"p{i % 7}" / f"f{i}.png").write_bytes(b"x%d" % i)
    (root / "README").write_text("hi\n")
    run(root, "add", ".")
    run(root, "commit", "-q", "-m", "start")
    return root


def publish(root: Path, out: Path) -> None:
    os.replace(out, root / ".git" / "index")


def test_no_index_yet(tmp_path: Path) -> None:
    root = tmp_path / "new"
    root.mkdir()
    run(root, "init", "-q")
    out, ref = ours_then_git(root, lines_for(root, ["b/x.png", "a.png", "b/y/z.png"]))
    same(root, out, ref)


def test_a_whole_index_becomes_split_with_its_tree_cache_invalidated(checkout: Path) -> None:
    run(checkout, "write-tree")  # a full tree cache in the index
    (checkout / "staged.txt").write_text("a user's staged file\n")
    run(checkout, "add", "staged.txt")
    lines = lines_for(checkout, ["figures/p1/new.png", "figures/p3/f3.png", "figures/q/new.png"], salt="v2")
    out, ref = ours_then_git(checkout, lines)
    same(checkout, out, ref)
    publish(checkout, out)
    assert list((checkout / ".git").glob("sharedindex.*"))
    assert run(checkout, "status", "--porcelain", "-z", "--", "staged.txt") == b"A  staged.txt\0"


def split_with_replacements_and_deletions(root: Path) -> None:
    run(root, "-c", "core.splitIndex=true", "update-index", "--split-index")
    for i in (1, 2, 9):  # new stat data: git stores these as (nameless) replacements of shared entries
        f = root / "figures" / f"p{i % 7}" / f"f{i}.png"
        os.utime(f, (1_700_000_000 + i, 1_700_000_000 + i))
    run(root, "update-index", "--refresh")
    run(root, "rm", "-q", "--cached", "figures/p4/f4.png")  # a deletion
    (root / "late.txt").write_text("late\n")
    run(root, "add", "late.txt")  # a new entry in the split part
    run(root, "write-tree")


def test_a_split_index_with_replacements_deletions_and_new_entries(checkout: Path) -> None:
    split_with_replacements_and_deletions(checkout)
    lines = lines_for(checkout, ["figures/p2/f9.png", "figures/p4/f4.png", "late.txt", "figures/z/new.png"], salt="v3")
    out, ref = ours_then_git(checkout, lines)
    same(checkout, out, ref)


def test_a_new_shared_part_applies_them(checkout: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    split_with_replacements_and_deletions(checkout)
    monkeypatch.setattr(gitindex, "SPLIT_MIN", 0)
    monkeypatch.setattr(gitindex, "SPLIT_BALANCE", 0)
    lines = lines_for(checkout, ["figures/p2/f9.png", "figures/p4/f4.png", "figures/z/new.png"], salt="v4")
    out, ref = ours_then_git(checkout, lines)
    same(checkout, out, ref)
    publish(checkout, out)
    # The new split part holds nothing but the link: all entries are in the new shared part.
    assert run(checkout, "ls-files", "-s").count(b"\n") == 30 + 1 + 1 + 1


def test_conflicted_entries_of_a_path_of_ours_are_left_to_git(checkout: Path) -> None:
    """git records resolve-undo data when a stage-0 entry replaces a conflict: that, git does."""
    run(checkout, "checkout", "-q", "-b", "side")
    (checkout / "README").write_text("side\n")
    run(checkout, "commit", "-q", "-am", "side")
    run(checkout, "checkout", "-q", "main")
    (checkout / "README").write_text("main\n")
    run(checkout, "commit", "-q", "-am", "main")
    run(checkout, "merge", "-q", "side", ok=False)
    assert b" 1\tREADME" in run(checkout, "ls-files", "-s")
    gitdir = checkout / ".git"
    ours = gitindex.parse_index_info(lines_for(checkout, ["README", "figures/c/x.png"], salt="v5"))
    with pytest.raises(gitindex.Unsupported, match="conflict"):
        gitindex.add(gitdir / "index", gitdir / "index.ours", ours, gitdir)
    # A conflict elsewhere is kept as it is.
    out, ref = ours_then_git(checkout, lines_for(checkout, ["figures/c/x.png"], salt="v6"))
    same(checkout, out, ref, trees=False)


@pytest.mark.parametrize("split", [False, True])
def test_a_file_where_we_need_a_folder_or_entries_below_our_file_are_left_to_git(checkout: Path, split: bool) -> None:
    """update-index replaces such entries (a file `foo` when `foo/x` is added, `d/*` when `d` is);
    git reading a split index keeps both, and the next write-tree would fail."""
    (checkout / "foo").write_text("x")
    (checkout / "d").mkdir()
    (checkout / "d" / "x").write_text("y")
    run(checkout, "add", "foo", "d")
    if split:
        run(checkout, "-c", "core.splitIndex=true", "update-index", "--split-index")
    gitdir = checkout / ".git"
    for path in ("foo/bar.png", "d"):
        ours = gitindex.parse_index_info(lines_for(checkout, [path]))
        with pytest.raises(gitindex.Unsupported, match="folder|below"):
            gitindex.add(gitdir / "index", gitdir / "index.ours", ours, gitdir)


@pytest.mark.parametrize("split", [False, True])
def test_a_change_in_the_same_second_as_the_index_stays_visible(checkout: Path, split: bool) -> None:
    """git takes an entry whose file changed in the second its index was written as racily
    clean and reads its content: the new index keeps the old one's time, so an edit made then
    is not hidden behind matching stat data."""
    if split:
        run(checkout, "-c", "core.splitIndex=true", "update-index", "--split-index")
    f = checkout / "F"
    moment = 1_800_000_000
    f.write_text("aaaa")
    os.utime(f, (moment, moment))
    run(checkout, "add", "F")
    index = checkout / ".git" / "index"
    os.utime(index, (moment, moment))  # the index written in that same second
    f.write_text("bbbb")  # same size, same second: only the content tells
    os.utime(f, (moment, moment))
    out, ref = ours_then_git(checkout, lines_for(checkout, ["figures/new.png"]))
    assert run(checkout, "status", "--porcelain", "--", "F", index=ref) == b"AM F\n"
    assert run(checkout, "status", "--porcelain", "--", "F", index=out) == b"AM F\n"


def test_modes_are_normalised_as_git_does(checkout: Path) -> None:
    line = b"100664 blob %s\tfigures/m.png" % blob(checkout, b"").encode()
    out, ref = ours_then_git(checkout, [line])
    same(checkout, out, ref)
    assert b"100644 " + EMPTY_BLOB.encode() in run(checkout, "ls-files", "-s", "figures/m.png", index=out)


def test_an_unreadable_tree_cache_is_dropped(checkout: Path) -> None:
    import hashlib
    run(checkout, "write-tree")
    index = checkout / ".git" / "index"
    data = bytearray(index.read_bytes()[:-20])
    at = data.find(b"TREE")
    assert at > 0
    data[at + 8:at + 12] = b"\xff\xfe\x00\x01"  # its first record's path and counts, garbled
    index.write_bytes(bytes(data) + hashlib.sha1(bytes(data)).digest())
    gitdir = checkout / ".git"
    ours = gitindex.parse_index_info(lines_for(checkout, ["figures/t.png"]))
    gitindex.add(index, gitdir / "index.ours", ours, gitdir)
    assert b"TREE" not in (gitdir / "index.ours").read_bytes()
    assert b"figures/t.png" in run(checkout, "ls-files", index=gitdir / "index.ours")
    run(checkout, "write-tree", index=gitdir / "index.ours")


def test_shared_part_expiry_follows_the_repositorys_setting() -> None:
    assert gitindex.expiry_s("") == gitindex.SHARED_EXPIRE_S
    assert gitindex.expiry_s("2.weeks.ago") == 14 * 86400 and gitindex.expiry_s("1.hour.ago") == 3600
    assert gitindex.expiry_s("now") == 0 and gitindex.expiry_s("never") is None
    assert gitindex.expiry_s("2026-01-01") is None  # a date: when unsure, keep


def test_many_calls_mixed_with_a_users_git_commands(checkout: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Calls of ours, with new shared parts often, between a user's adds, removals and
    refreshes; after each, the index git reads is the one git would have made."""
    monkeypatch.setattr(gitindex, "SPLIT_MIN", 10)
    monkeypatch.setattr(gitindex, "SPLIT_BALANCE", 4)
    run(checkout, "-c", "core.splitIndex=true", "update-index", "--split-index")
    rng = random.Random(7)
    gitdir = checkout / ".git"
    reference = gitdir / "index.model"
    shutil.copyfile(gitdir / "index", reference)
    made = 0
    for step in range(40):
        what = rng.random()
        if what < 0.6:
            paths = [f"figures/p{rng.randrange(12)}/n{made + k}.png" for k in range(rng.randrange(1, 6))]
            if rng.random() < 0.3:
                paths.append(f"figures/p{rng.randrange(7)}/f{rng.randrange(30)}.png")  # one that exists
            made += len(paths)
            lines = lines_for(checkout, paths, salt=str(step))
            out, ref = ours_then_git(checkout, lines)
            same(checkout, out, ref)
            publish(checkout, out)
            run(checkout, "update-index", "-z", "--index-info", index=reference,
                stdin=b"".join(x + b"\0" for x in lines))
        elif what < 0.75:
            name = f"user{step}.txt"
            (checkout / name).write_text(name)
            run(checkout, "add", name)
            run(checkout, "add", name, index=reference)
        elif what < 0.85:
            listed = run(checkout, "ls-files", "-z").split(b"\0")
            victim = rng.choice([p for p in listed if p]).decode()
            run(checkout, "rm", "-q", "--cached", "--", victim)
            run(checkout, "rm", "-q", "--cached", "--", victim, index=reference)
        else:
            run(checkout, "update-index", "-q", "--refresh", ok=False)
        assert run(checkout, "ls-files", "-s", "-z") == run(checkout, "ls-files", "-s", "-z", index=reference)
    assert run(checkout, "write-tree") == run(checkout, "write-tree", index=reference)
    assert len(list(gitdir.glob("sharedindex.*"))) > 2  # new shared parts were written on the way


def test_what_it_does_not_write_is_left_to_git(checkout: Path) -> None:
    gitdir = checkout / ".git"
    ours = gitindex.parse_index_info(lines_for(checkout, ["figures/p1/n.png"]))
    run(checkout, "update-index", "--index-version", "4")
    with pytest.raises(gitindex.Unsupported, match="version 4"):
        gitindex.add(gitdir / "index", gitdir / "index.ours", ours, gitdir)
    run(checkout, "update-index", "--index-version", "2")
    data = bytearray((gitdir / "index").read_bytes())
    data[-1] ^= 1
    (gitdir / "index.bad").write_bytes(bytes(data))
    with pytest.raises(gitindex.Unsupported, match="checksum"):
        gitindex.add(gitdir / "index.bad", gitdir / "index.ours", ours, gitdir)
    (gitdir / "index.bad").write_bytes(b"DIRC\0\0\0\2")
    with pytest.raises(gitindex.Unsupported):
        gitindex.add(gitdir / "index.bad", gitdir / "index.ours", ours, gitdir)


def test_superseded_shared_parts_expire_after_an_hour(tmp_path: Path) -> None:
    for name in ("sharedindex.old", "sharedindex.young", "sharedindex.kept"):
        (tmp_path / name).write_bytes(b"x")
    os.utime(tmp_path / "sharedindex.old", (1_000, 1_000))
    os.utime(tmp_path / "sharedindex.kept", (1_000, 1_000))
    removed = gitindex.expire_shared(tmp_path, keep={"sharedindex.kept"}, now=1_000 + 3_601)
    assert removed == ["sharedindex.old"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["sharedindex.kept", "sharedindex.young"]


def test_long_names_round_trip(tmp_path: Path) -> None:
    root = tmp_path / "long"
    root.mkdir()
    run(root, "init", "-q")
    name = "d/" + "n" * 5000 + ".png"
    out, ref = ours_then_git(root, lines_for(root, [name, "a.png"]))
    same(root, out, ref, trees=False)
    publish(root, out)
    out2, ref2 = ours_then_git(root, lines_for(root, ["b.png"]))
    same(root, out2, ref2, trees=False)
