"""summary.md reads as a Work Log entry: attempted, fetched or bound, marked, left and why."""

from __future__ import annotations

import csv
from pathlib import Path

from crawler import report


def test_a_figures_summary_is_a_work_log_entry(tmp_path: Path) -> None:
    s = {"run_id": "R1", "command": "figures", "status": "finished", "started_at": "2026-12-02T07:10:00Z",
         "finished_at": "2026-12-02T07:40:00Z", "duration_s": 1800, "attempted": 4287, "planned": 4287,
         "fetched": 3900, "hard_404": 300, "transient": 80, "failed": 7, "present": 15, "no_url": 0, "commits": 39,
         "transient_errors": {"timeout": 50, "http_503": 30}, "failed_errors": {"not_image": 7},
         "per_host": {"europepmc.org": {"attempted": 4000, "fetched": 3700, "hard_404": 250, "transient": 45,
                                        "failed": 5}},
         "failed_rows": [{"artifact_id": "f-1", "error": "not_image", "url": "https://x/y"}], "unrecorded": []}
    report.write_summary(tmp_path, s)
    md = (tmp_path / "summary.md").read_text()
    assert md.startswith("### Work Log: figures run R1, 2026-12-02 07:10–07:40 UTC (30 min): finished")
    assert "Attempted **4,287** paper_figure rows" in md and "**fetched and committed 3,900** in 39 commits" in md
    assert "**marked unavailable 300**" in md and "**left retryable 80** (timeout 50, http_503 30)" in md
    assert "**failed 7** (not_image 7)" in md and "15 already had their file" in md
    assert "| europepmc.org | 4,000 | 3,700 | 250 | 45 | 5 |" in md and "| f-1 | not_image | https://x/y |" in md


def test_a_recover_summary_carries_the_residual_list(tmp_path: Path) -> None:
    with open(tmp_path / "residual.csv", "w", newline="") as fh:
        w = csv.writer(fh)
        w.writerow(["artifact_id", "artifact_type", "failure_mode"])
        w.writerow(["d-missing", "dataset", "expected datasets/x.csv; not in checkout or 2 tarballs"])
    s = {"run_id": "R2", "command": "recover", "status": "finished", "started_at": "2026-12-02T08:00:00Z",
         "finished_at": "2026-12-02T08:00:30Z", "duration_s": 30,
         "per_type": {"dataset": {"rows": 2, "bound": 1, "needs_review": 0, "unrecoverable": 0, "missing": 1}},
         "confidence": {"certain": 1}, "searched": {"worktrees": 3, "tarballs": 2, "history": True}, "unrecorded": []}
    report.write_summary(tmp_path, s)
    md = (tmp_path / "summary.md").read_text()
    assert "Looked at **2** dataset, model and tabular_dataset rows" in md and "**bound 1** (certain 1)" in md
    assert "#### Residual list: 1 rows left without a file" in md
    assert "| d-missing | dataset | expected datasets/x.csv; not in checkout or 2 tarballs |" in md
