"""The committer's git path against a real repository."""

from crawler.git import GitRepo
from tests.harness import git


async def test_someone_else_committing_mid_run_is_kept_and_built_upon(repo):
    ours = GitRepo(repo, 60, "crawler", "c@c", index_sync_commits=1)
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
