"""The live progress display's content, rendered as a terminal would show it."""

from __future__ import annotations

from rich.console import Console

from crawler import progress


def shown(renderable) -> str:
    console = Console(record=True, width=140, force_terminal=False, color_system=None)
    console.print(renderable)
    return console.export_text()


def test_figures_progress_shows_rows_rate_eta_budgets_and_pauses() -> None:
    text = shown(progress.render("figures", {
        "done": 2460, "planned": 4241, "rows_per_s": 61.39, "eta_s": 3725.0, "commits": 20,
        "counts": {"fetched": 1145, "hard_404": 1282, "transient": 4, "failed": 29},
        "budgets": {"europepmc": {"inflight": 4, "queue": 64, "requests": 1498, "paused_s": 0.0},
                    "pmc": {"inflight": 0, "queue": 64, "requests": 1384, "paused_s": 2.0,
                            "paused_until": "2026-12-02T08:21:59Z"},
                    "default": {"hosts": 2, "inflight": 2, "queue": 2, "requests": 428, "paused_s": 0.0,
                                "hosts_paused": 1}}}))
    assert "2,460 / 4,241 rows" in text and "61.4 rows/s" in text and "ETA 1:02:05" in text and "20 commits" in text
    assert "fetched 1,145" in text and "unavailable 1,282" in text
    assert "europepmc" in text and "1,498" in text and "until 08:21:59" in text
    assert "default (2 hosts)" in text and "428" in text and "1 hosts paused" in text


def test_recover_progress_shows_the_phase_and_the_tarball_being_read() -> None:
    text = shown(progress.render("recover", {
        "phase": "searching", "rows": 145, "decided": 12, "commits": 0,
        "reading": {"tarball": "s3://b/x.tar.gz", "tarball_size": 10 * 2**20, "tarball_bytes_read": 5 * 2**20}}))
    assert "searching" in text and "rows decided 12 / 145" in text and "5.0 / 10.0 MiB" in text and "s3://b/x.tar.gz" in text


def test_no_live_display_off_a_terminal() -> None:
    class NotATerminal:
        def isatty(self) -> bool:
            return False

    class Terminal:
        def isatty(self) -> bool:
            return True

    assert not progress.wanted(True, NotATerminal())
    assert progress.wanted(True, Terminal()) and not progress.wanted(False, Terminal())


def test_status_shows_a_workers_runs_processes_and_their_summed_counts():
    from crawler import status, workers
    merged = workers.merge_progress(
        [{"done": 10, "planned": 100, "rows_per_s": 2.0, "counts": {"fetched": 7, "hard_404": 3}, "commits": 1,
          "budgets": {"pmc": {"inflight": 1, "queue": 4, "requests": 20}}},
         {"done": 5, "planned": 100, "rows_per_s": 1.0, "counts": {"fetched": 5}, "commits": 2,
          "budgets": {"europepmc": {"inflight": 2, "queue": 1, "requests": 10}}}], alive=2, count=3)
    lines = status._progress_lines(merged)
    assert lines[0] == "2 of 3 worker processes alive"
    assert lines[1].startswith("15 / 100 rows, 3.0 rows/s") and "3 commits" in lines[1] and "fetched 12" in lines[1]
    assert "budget europepmc: 2 in flight, 1 queued" in lines and "budget pmc: 1 in flight, 4 queued" in lines
    assert status._progress_lines({"workers": 2, "workers_alive": 0}) == ["0 of 2 worker processes alive"]
