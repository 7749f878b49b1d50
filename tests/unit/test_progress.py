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
