"""The recovery scene: 145 lost dataset/model/tabular_dataset rows and where their files survive.

Deterministic from a seed. Files are scattered over the checkout (some committed, some not), its
git history (added, then deleted), three worktrees and three S3 tarballs of which only the two
newest may be read. Around them: decoys with similar names, files findable only by their
recorded sha256 under another name, one basename with two different contents, RAM-only models
and rows whose files are nowhere. `expected` says what an honest run should conclude per row.
"""

from __future__ import annotations

import gzip
import hashlib
import io
import random
import tarfile
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from pathlib import Path


@dataclass
class Tarball:
    key: str
    members: dict[str, bytes]
    hostile: bool = False

    def build(self) -> bytes:
        """The .tar.gz bytes, identical on every call (so its ETag, and manifest, stay the same)."""
        buf = io.BytesIO()
        with tarfile.open(fileobj=buf, mode="w") as tar:
            for path, body in self.members.items():
                info = tarfile.TarInfo(path)
                info.size = len(body)
                info.mtime = 1773532800
                tar.addfile(info, io.BytesIO(body))
            if self.hostile:  # what a careless backup script or an attacker might leave behind
                for name, kind in (("../../etc/cron.d/evil", tarfile.REGTYPE), ("/etc/passwd", tarfile.REGTYPE),
                                   ("datasets/link_out.csv", tarfile.SYMTYPE)):
                    info = tarfile.TarInfo(name)
                    info.type = kind
                    if kind == tarfile.SYMTYPE:
                        info.linkname = "/etc/shadow"
                        tar.addfile(info)
                    else:
                        info.size = 4
                        tar.addfile(info, io.BytesIO(b"evil"))
        return gzip.compress(buf.getvalue(), mtime=0)


@dataclass
class RecoveryScene:
    rows: list[dict] = field(default_factory=list)
    checkout_committed: dict[str, bytes] = field(default_factory=dict)
    checkout_untracked: dict[str, bytes] = field(default_factory=dict)
    history_only: dict[str, bytes] = field(default_factory=dict)   # committed, then deleted
    worktrees: dict[str, dict[str, bytes]] = field(default_factory=dict)
    tarballs: list[Tarball] = field(default_factory=list)          # oldest first
    references: list[tuple[str, str, str, datetime]] = field(default_factory=list)
    expected: dict[str, str] = field(default_factory=dict)         # row id → status an honest run reaches


def _csv(rng: random.Random, name: str) -> bytes:
    lines = [f"id,{name}_value"] + [f"{i},{rng.random():.6f}" for i in range(rng.randint(5, 40))]
    return ("\n".join(lines) + "\n").encode()


def build_recovery_scene(seed: int = 20260315) -> RecoveryScene:
    rng = random.Random(seed)
    s = RecoveryScene(worktrees={"task-a1": {}, "task-b2": {}, "task-c3": {}})
    tar_old, tar_mid, tar_new = ({}, {}, {})  # type: ignore[var-annotated]
    wt_names = list(s.worktrees)
    n = 0

    def row(kind: str, artifact_type: str, meta: dict, expected: str) -> str:
        nonlocal n
        n += 1
        rid = f"{artifact_type[:2]}-{n:04d}"
        s.rows.append({"id": rid, "artifact_type": artifact_type, "title": f"{kind} {artifact_type} {n}",
                       "file_path": None, "metadata": {"created_by": "scidex.analysis", **meta}})
        s.expected[rid] = expected
        return rid

    def dataset_name(i: int) -> str:
        return f"{rng.choice(['gtex_tpm', 'tcga_counts', 'scrna_markers', 'eqtl_hits', 'cohort'])}_{i:03d}"

    # dataset, 132 rows
    for i in range(30):  # at its expected path in the checkout; half committed, half not
        name = f"{dataset_name(i)}.csv"
        body = _csv(rng, name)
        rel = f"datasets/{name}"
        (s.checkout_committed if i % 2 else s.checkout_untracked)[rel] = body
        row("checkout", "dataset", {"filename": name, "expected_path": rel, "file_size_bytes": len(body)}, "bound")
    for i in range(30, 45):  # deleted from the checkout; its history still has it
        name = f"{dataset_name(i)}.tsv"
        body = _csv(rng, name)
        s.history_only[f"datasets/{name}"] = body
        row("history", "dataset", {"filename": name, "expected_path": f"datasets/{name}", "format": "tsv"}, "bound")
    for i in range(45, 70):  # spilled into a worktree at the expected path
        name = f"{dataset_name(i)}.parquet"
        body = b"PAR1" + rng.randbytes(rng.randint(200, 2000)) + b"PAR1"
        s.worktrees[wt_names[i % 3]][f"datasets/{name}"] = body
        row("worktree", "dataset", {"filename": name, "expected_path": f"datasets/{name}", "format": "parquet"}, "bound")
    for i in range(70, 90):  # inside one of the two newest tarballs
        name = f"{dataset_name(i)}.jsonl"
        body = b"".join(b'{"k": %d, "v": %f}\n' % (j, rng.random()) for j in range(rng.randint(3, 30)))
        (tar_mid if i % 2 else tar_new)[f"./datasets/{name}"] = body
        row("tarball", "dataset", {"filename": name, "expected_path": f"datasets/{name}"}, "bound")
    for i in range(90, 96):  # only in the third-newest tarball, which must never be read
        name = f"{dataset_name(i)}.csv"
        tar_old[f"./datasets/{name}"] = _csv(rng, name)
        row("old-tarball", "dataset", {"filename": name, "expected_path": f"datasets/{name}"}, "missing")
    for i in range(96, 106):  # findable only by the sha256 recorded at creation, under another name
        name = f"{dataset_name(i)}.csv"
        body = _csv(rng, name)
        where = i % 4
        scratch = f"scratch/tmp_{rng.randrange(16**8):08x}.dat"
        if where == 3:
            tar_new[f"./{scratch}"] = body
        else:
            s.worktrees[wt_names[where]][scratch] = body
        row("renamed", "dataset", {"filename": name, "file_sha256": hashlib.sha256(body).hexdigest(),
                                   "file_size_bytes": len(body)}, "bound")
    for i in range(106, 114):  # a unique basename somewhere unexpected, no expected path
        name = f"{dataset_name(i)}.csv.gz"
        s.worktrees[wt_names[i % 3]][f"exports/old/{name}"] = b"\x1f\x8b" + rng.randbytes(300)
        row("basename", "dataset", {"filename": name}, "bound")
    for i in range(114, 116):  # one basename, two different contents: a human must choose
        name = f"shared_matrix_{i}.csv"
        s.checkout_untracked[f"old/{name}"] = _csv(rng, name)
        s.worktrees[wt_names[2]][f"exports/{name}"] = _csv(rng, name + "x")
        row("twin", "dataset", {"filename": name}, "needs_review")
    for i in range(116, 120):  # decoys: same stem, another extension
        stem = dataset_name(i)
        s.worktrees[wt_names[i % 3]][f"datasets/{stem}.parquet"] = b"PAR1decoyPAR1"
        row("decoy", "dataset", {"filename": f"{stem}.csv"}, "needs_review")
    for i in range(120, 132):  # nowhere at all
        name = f"{dataset_name(i)}.parquet"
        rid = row("lost", "dataset", {"filename": name, "expected_path": f"datasets/{name}"}, "missing")
        if i % 2:
            day = datetime(2026, 3, 1, tzinfo=UTC) + timedelta(days=i - 120)
            s.references.append((rid, "analysis", f"SDA-{day:%Y-%m-%d}-{i:04d}", day))
    # model, 9 rows
    for i in range(4):
        row("ram", "model", {"filename": f"forge_model_{i}.joblib", "storage": "memory",
                             "created_by": "forge.session"}, "unrecoverable")
    for i in range(3):
        rel = f"forge_runs/run_{i}/model.joblib"
        s.worktrees[wt_names[i]][rel] = b"\x80\x04joblib" + rng.randbytes(500)
        row("forge", "model", {"filename": "model.joblib", "expected_path": rel}, "bound")
    for i in range(2):
        row("lost", "model", {"filename": f"classifier_{i}.safetensors", "expected_path": f"models/classifier_{i}.safetensors"}, "missing")
    # tabular_dataset, 4 rows
    for i in range(2):
        rel = f"data/scidex-artifacts/datasets/table_{i}.csv"
        s.checkout_committed[rel] = _csv(rng, f"table_{i}")
        row("checkout", "tabular_dataset", {"filename": f"table_{i}.csv", "expected_path": rel}, "bound")
    tar_new["./datasets/tabular/table_2.csv"] = _csv(rng, "table_2")
    row("tarball", "tabular_dataset", {"filename": "table_2.csv", "expected_path": "datasets/tabular/table_2.csv"}, "bound")
    row("lost", "tabular_dataset", {"filename": "table_3.csv", "expected_path": "datasets/tabular/table_3.csv"}, "missing")

    prefix = "backups/scidex-host/scidex-artifacts-"
    s.tarballs = [Tarball(f"{prefix}20260301T020000.tar.gz", tar_old),
                  Tarball(f"{prefix}20260308T020000.tar.gz", tar_mid, hostile=True),
                  Tarball(f"{prefix}20260315T020000.tar.gz", tar_new)]
    return s


async def lay_out(scene: RecoveryScene, checkout: Path, worktrees_root: Path) -> None:
    """Put the scene's files in place: checkout (committed and not), history, worktrees."""
    from crawler.git import GitRepo

    repo = GitRepo(checkout, 60, "platform", "platform@localhost")

    def write(root: Path, files: dict[str, bytes]) -> None:
        for rel, body in files.items():
            (root / rel).parent.mkdir(parents=True, exist_ok=True)
            (root / rel).write_bytes(body)

    write(checkout, scene.history_only)
    try:
        await repo.commit_paths(sorted(scene.history_only), "datasets from the March analyses")
        await repo._run("rm", "-q", "--cached", "--", *sorted(scene.history_only))
        for rel in scene.history_only:
            (checkout / rel).unlink()
        await repo._run("commit", "-q", "-m", "clean up old datasets")
        write(checkout, scene.checkout_committed)
        await repo.commit_paths(sorted(scene.checkout_committed), "datasets kept in the checkout")
    finally:
        await repo.close()
    write(checkout, scene.checkout_untracked)
    for name, files in scene.worktrees.items():
        write(worktrees_root / name / "data" / "scidex-artifacts", files)
