"""The recovery job on the checkout, its history and worktrees: real PostgreSQL and git."""

from __future__ import annotations

import hashlib
from pathlib import Path

import asyncpg

from tests.harness import (commits_by_tool, git, insert_artifacts, read_csv, recover_config, rows_by_id,
                           run_recover)


def sha(b: bytes) -> str:
    return hashlib.sha256(b).hexdigest()


def put(root: Path, rel: str, body: bytes) -> None:
    (root / rel).parent.mkdir(parents=True, exist_ok=True)
    (root / rel).write_bytes(body)


GTEX = b"gene,tpm\nA,1\n"
RENAMED = b"sample,score\nS1,0.5\n"
HIST = b"old,data\n1,2\n"
UNIQUE = b"x,y\n1,2\n"
TWIN_A, TWIN_B = b"twin,a\n", b"twin,b\n"
MODEL = b"\x80\x04joblib-model"


async def scene(dsn: str, repo: Path, tmp: Path) -> None:
    wt1 = tmp / "wt" / "wt-1" / "data" / "scidex-artifacts"
    wt2 = tmp / "wt" / "wt-2" / "data" / "scidex-artifacts"
    # certain: recorded sha, found only under another name in a worktree
    put(wt1, "scratch/tmp_0042.bin", RENAMED)
    # high: expected path, deleted from the checkout in a later commit (history only)
    put(repo, "datasets/history.csv", HIST)
    git(repo, "add", "datasets/history.csv")
    git(repo, "-c", "user.name=p", "-c", "user.email=p@p", "commit", "-q", "-m", "add")
    git(repo, "rm", "-q", "datasets/history.csv")
    git(repo, "-c", "user.name=p", "-c", "user.email=p@p", "commit", "-q", "-m", "rm")
    # high in the checkout itself: the file is at its expected path but the row lost its file_path
    put(repo, "datasets/gtex.csv", GTEX)
    # medium: one content under the exact basename, in a worktree
    put(wt2, "datasets/unique_counts.csv", UNIQUE)
    # needs_review: two contents carry the same basename
    put(wt1, "datasets/twin.csv", TWIN_A)
    put(wt2, "exports/twin.csv", TWIN_B)
    # low: same stem, another extension
    put(wt1, "datasets/stemmy.parquet", b"PAR1")
    # a decoy that must not bind to the sha row
    put(repo, "datasets/samples.csv", b"decoy\n")
    await insert_artifacts(dsn, [
        ("d-certain", "dataset", {"filename": "samples.csv", "file_sha256": sha(RENAMED), "file_size_bytes": len(RENAMED)}, None),
        ("d-history", "dataset", {"expected_path": "datasets/history.csv", "file_size_bytes": len(HIST)}, None),
        ("d-high", "dataset", {"expected_path": "datasets/gtex.csv"}, "datasets/gone.csv"),
        ("d-medium", "dataset", {"filename": "unique_counts.csv"}, None),
        ("d-twin", "dataset", {"filename": "twin.csv"}, None),
        ("d-low", "dataset", {"filename": "stemmy.csv"}, None),
        ("d-missing", "dataset", {"filename": "gtex_tpm.parquet", "expected_path": "datasets/gtex_tpm.parquet"}, None),
        ("m-ram", "model", {"storage": "memory", "filename": "m.joblib"}, None),
        ("t-garbage", "tabular_dataset", ["garbage"], None),
        ("p-figure", "paper_figure", {"image_url": "http://x/y.png"}, None),
    ])
    conn = await asyncpg.connect(dsn)
    await conn.execute("insert into artifact_references values ('d-missing', 'analysis', 'SDA-2026-03-15-0042', '2026-03-15T10:00:00Z'),"
                       " ('d-missing', 'notebook', 'NB-1', '2026-01-01T00:00:00Z')")
    await conn.close()


async def test_recovery_binds_on_evidence_and_explains_the_rest(dsn, repo, tmp_path):
    await scene(dsn, repo, tmp_path)
    cfg = recover_config(dsn, repo, tmp_path)
    before_head = git(repo, "rev-parse", "HEAD")

    # --plan: decides everything, writes nothing
    _, plan = await run_recover(cfg, plan=True)
    assert git(repo, "rev-parse", "HEAD") == before_head
    assert all("file_bound_at" not in r["metadata"] for r in (await rows_by_id(dsn)).values()
               if isinstance(r["metadata"], dict))
    planned = read_csv(Path(cfg["report"]["dir"]) / plan["run_id"] / "plan.csv")
    assert {p["artifact_id"] for p in planned} == {"d-certain", "d-history", "d-high", "d-medium", "m-ram"}

    status, summary = await run_recover(cfg)
    assert status == 0
    rows = await rows_by_id(dsn)
    m = {k: v["metadata"] for k, v in rows.items()}
    expect = {"d-certain": ("certain", RENAMED, "worktree:wt-1"), "d-history": ("high", HIST, "history:"),
              "d-high": ("high", GTEX, "checkout"), "d-medium": ("medium", UNIQUE, "worktree:wt-2")}
    head = git(repo, "rev-parse", "HEAD")
    for rid, (confidence, body, source) in expect.items():
        path = rows[rid]["file_path"]
        assert (repo / path).read_bytes() == body, rid
        assert m[rid]["file_bind_confidence"] == confidence and m[rid]["file_bind_source"].startswith(source), rid
        assert m[rid]["file_sha256"] == sha(body) and m[rid]["file_size_bytes"] == len(body)
        assert m[rid]["file_bound_at"].endswith("Z")
        assert path in git(repo, "ls-tree", "-r", "--name-only", m[rid]["file_commit"]).split()
        assert git(repo, "merge-base", "--is-ancestor", m[rid]["file_commit"], head) == ""
    assert rows["d-history"]["file_path"] == "datasets/history.csv"
    assert rows["d-high"]["file_path"] == "datasets/gtex.csv"
    assert rows["d-certain"]["file_path"] != "datasets/samples.csv"  # the decoy stays where it was
    assert (repo / "datasets/samples.csv").read_bytes() == b"decoy\n"
    assert m["m-ram"]["file_unrecoverable"] is True and "memory" in m["m-ram"]["file_unrecoverable_reason"]
    for rid in ("d-twin", "d-low", "d-missing", "t-garbage"):
        assert rows[rid]["file_path"] is None and "file_unrecoverable" not in (m[rid] if isinstance(m[rid], dict) else {})
    assert m["p-figure"] == {"image_url": "http://x/y.png"}  # other types untouched

    assert summary["per_type"]["dataset"] == {"rows": 7, "bound": 4, "needs_review": 2, "unrecoverable": 0, "missing": 1}
    assert summary["per_type"]["model"]["unrecoverable"] == 1
    assert summary["per_type"]["tabular_dataset"]["missing"] == 1
    folder = Path(cfg["report"]["dir"]) / summary["run_id"]
    inventory = {r["artifact_id"]: r for r in read_csv(folder / "inventory_dataset.csv")}
    assert inventory["d-twin"]["status"] == "needs_review" and inventory["d-twin"]["candidates"].count("|low") == 0
    assert inventory["d-twin"]["candidates"].count(";") == 1
    assert inventory["d-low"]["confidence"] == "low"
    residual = {r["artifact_id"]: r for r in read_csv(folder / "residual.csv")}
    assert set(residual) == {"d-twin", "d-low", "d-missing", "m-ram", "t-garbage"}
    assert residual["d-missing"]["failure_mode"] == (
        "expected datasets/gtex_tpm.parquet; not in checkout, its history, 2 worktrees or 0 tarballs; "
        "last referenced 2026-03-15 in analysis SDA-2026-03-15-0042")
    assert "2 candidates found but none bound: 2 different contents" in residual["d-twin"]["failure_mode"]
    assert residual["m-ram"]["failure_mode"].startswith("lost for good")

    # a second run binds nothing twice and commits nothing
    commits = len(commits_by_tool(repo))
    _, again = await run_recover(cfg)
    assert again["per_type"]["dataset"]["bound"] == 4 and len(commits_by_tool(repo)) == commits
    conn = await asyncpg.connect(dsn)
    binds = await conn.fetchval("select count(*) from artifact_recovery.journal where outcome = 'bound'")
    await conn.close()
    assert binds == 4

    # an operator approves one of the twins: exactly that one is bound
    approvals = tmp_path / "approve.csv"
    approvals.write_text("artifact_id,candidate_location\nd-twin,worktree:wt-2:exports/twin.csv\n"
                         "d-low,worktree:wt-9:nothing.csv\n")
    _, approved = await run_recover(cfg, approve=approvals)
    rows = await rows_by_id(dsn)
    assert (repo / rows["d-twin"]["file_path"]).read_bytes() == TWIN_B
    assert rows["d-twin"]["metadata"]["file_bind_approved"] is True
    assert rows["d-low"]["file_path"] is None
    assert approved["per_type"]["dataset"]["bound"] == 5


async def test_a_bound_rows_file_is_never_bound_to_another_row_by_name(dsn, repo, tmp_path):
    put(repo, "datasets/results.csv", b"a's results\n")
    git(repo, "add", "datasets/results.csv")
    git(repo, "-c", "user.name=p", "-c", "user.email=p@p", "commit", "-q", "-m", "a")
    await insert_artifacts(dsn, [
        ("d-a", "dataset", {"filename": "results.csv"}, "datasets/results.csv"),
        ("d-b", "dataset", {"filename": "results.csv"}, None),
    ])
    _, summary = await run_recover(recover_config(dsn, repo, tmp_path))
    assert (await rows_by_id(dsn))["d-b"]["file_path"] is None
    assert summary["per_type"]["dataset"] == {"rows": 2, "bound": 1, "needs_review": 1, "unrecoverable": 0, "missing": 0}


async def test_a_recorded_path_outside_the_root_is_not_the_rows_file(dsn, repo, tmp_path):
    """`/etc/hosts` and a link leading out exist, but are no row's file: the rows are looked for
    and bound to the file found in the checkout."""
    outside = tmp_path / "secret.csv"
    outside.write_bytes(b"not,ours\n")
    put(repo, "datasets/a.csv", b"a,1\n")
    put(repo, "datasets/b.csv", b"b,2\n")
    (repo / "datasets" / "link.csv").symlink_to(outside)
    await insert_artifacts(dsn, [
        ("o-abs", "dataset", {"expected_path": "datasets/a.csv"}, "/etc/hosts"),
        ("o-link", "dataset", {"expected_path": "datasets/b.csv"}, "datasets/link.csv"),
    ])
    cfg = recover_config(dsn, repo, tmp_path)
    await run_recover(cfg)
    got = await rows_by_id(dsn)
    assert got["o-abs"]["file_path"] == "datasets/a.csv"
    assert got["o-link"]["file_path"] == "datasets/b.csv"
    assert got["o-abs"]["metadata"]["file_bind_confidence"] == "high"


async def test_a_worktree_file_changed_after_it_was_hashed_is_not_bound(dsn, repo, tmp_path, monkeypatch):
    """The row records a sha256; the worktree file had it when hashed, then someone rewrote it:
    nothing is placed or bound (the bytes bound are the bytes checked), the row is for review."""
    from pipelines.recover import RecoverJob
    wt = tmp_path / "wt" / "wt-1" / "data" / "scidex-artifacts"
    put(wt, "datasets/moving.csv", UNIQUE)
    await insert_artifacts(dsn, [("m-1", "dataset", {"filename": "moving.csv", "file_sha256": sha(UNIQUE)}, None)])
    real = RecoverJob._hash

    async def hash_then_rewrite(self, candidates):
        await real(self, candidates)
        (wt / "datasets" / "moving.csv").write_bytes(b"x,y\n9,9\n")  # after hashing, before binding

    monkeypatch.setattr(RecoverJob, "_hash", hash_then_rewrite)
    status, summary = await run_recover(recover_config(dsn, repo, tmp_path))
    got = await rows_by_id(dsn)
    assert got["m-1"]["file_path"] is None and "file_bound_at" not in got["m-1"]["metadata"]
    assert not (repo / "datasets" / "moving.csv").exists()
    assert not list(repo.rglob("*.part"))
    assert status == 3 and any(u["what"] == "bind" and "changed since it was hashed" in u["why"]
                               for u in summary["unrecorded"])


async def test_artifacts_commit_batch_caps_recovery_commits_and_the_inventory_names_every_rows_basenames(dsn, repo, tmp_path):
    await scene(dsn, repo, tmp_path)
    cfg = recover_config(dsn, repo, tmp_path)
    cfg.raw["artifacts"]["commit_batch"] = 2  # below recovery.commit_batch (100): the ceiling for every commit
    status, _ = await run_recover(cfg)
    assert status == 0
    commits = commits_by_tool(repo)
    assert commits and max(len(files) for files in commits) <= 2 and sum(len(f) for f in commits) >= 3
    # A second run: the rows bound by the first are not searched again, and still named.
    _, summary = await run_recover(cfg)
    inventory = {r["artifact_id"]: r for r in read_csv(Path(cfg["report"]["dir"]) / summary["run_id"] / "inventory_dataset.csv")}
    assert inventory["d-high"]["status"] == "bound" and inventory["d-high"]["expected_basenames"] == "gtex.csv"
    assert inventory["d-certain"]["expected_basenames"] == "samples.csv"


async def test_the_html_report_of_recover_lists_the_inventory_and_the_residuals_with_reasons(dsn, repo, tmp_path):
    from html.parser import HTMLParser
    await scene(dsn, repo, tmp_path)
    cfg = recover_config(dsn, repo, tmp_path)
    _, summary = await run_recover(cfg)
    page = (Path(cfg["report"]["dir"]) / summary["run_id"] / "report.html").read_text()
    tables: dict[str, list[str]] = {}

    class Cells(HTMLParser):
        current = ""

        def handle_starttag(self, tag, attrs):
            if tag == "table":
                self.current = dict(attrs).get("class") or ""
                tables.setdefault(self.current, [])

        def handle_data(self, data):
            if self.current and data.strip():
                tables[self.current].append(data.strip())

    Cells().feed(page)
    residual = {r["artifact_id"]: r["failure_mode"] for r in read_csv(Path(cfg["report"]["dir"]) / summary["run_id"] / "residual.csv")}
    assert set(residual) <= set(tables["residual"]) and residual["d-missing"] in tables["residual"]
    assert "d-certain" in tables["inventory"] and "bound" in tables["inventory"]
    assert "src=" not in page and "href=" not in page
