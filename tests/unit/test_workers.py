"""The --workers parent: its children's command lines and how their summaries add up."""

from __future__ import annotations

import argparse

from crawler import workers


def _args(**kw):
    base = dict(config="site.toml", limit=None, host=None, retry_failed=False, verbose=False, quiet=True, log_level=None)
    return argparse.Namespace(**{**base, **kw})


def test_children_get_the_figure_options_and_a_share_of_the_limit():
    argv = workers.child_argv(_args(limit=10, host="pmc.ncbi.nlm.nih.gov", retry_failed=True), "RUN", 0, 3)
    assert argv[2:] == ["crawler", "figures", "--config", "site.toml", "--limit", "4", "--host", "pmc.ncbi.nlm.nih.gov",
                        "--retry-failed", "-q", "--worker-of", "RUN", "--worker-index", "0", "--expect-workers", "3"]
    limits = [int(a[a.index("--limit") + 1]) for a in (workers.child_argv(_args(limit=10), "R", k, 3) for k in range(3))]
    assert limits == [4, 3, 3]
    assert "--limit" not in workers.child_argv(_args(), "R", 1, 2)


def test_a_child_parses_to_a_job_that_shares_its_progress_and_a_plain_run_does_not():
    """The parent sums its children's progress from their lease heartbeats (workers.merge_progress):
    the child's command line, parsed as the CLI does, must ask its job for it."""
    from crawler import cli

    parser = cli.build_parser()
    child = parser.parse_args(workers.child_argv(_args(), "RUN", 1, 2)[3:])
    plain = parser.parse_args(["figures", "--config", "site.toml"])
    assert cli._figure_options(child, None).shares_progress is True
    assert cli._figure_options(child, None).expect_workers == 2
    assert cli._figure_options(plain, None).shares_progress is False


def test_summaries_add_up_and_table_wide_counts_do_not():
    a = {"attempted": 6, "fetched": 4, "hard_404": 2, "no_url": 3, "planned": 20, "per_host": {"x.org": {"attempted": 6}},
         "errors": {"timeout": 1}, "requests_per_budget": {"pmc": 10}, "unrecorded": [{"reason": "r1"}],
         "cpu_s": {"self": 1.5, "children": 0.5},
         "timeline": {"origin_unix": 1000.2, "budgets": {"pmc": {"cap_per_s": 2, "max_inflight": 1, "starts": [[0, 2], [1, 1]]}},
                      "pauses": []}}
    b = {"attempted": 4, "fetched": 4, "no_url": 3, "planned": 20, "per_host": {"x.org": {"attempted": 2}, "y.org": {"attempted": 2}},
         "errors": {"timeout": 2}, "requests_per_budget": {"pmc": 1, "europepmc": 5}, "fatal": "disk full",
         "cpu_s": {"self": 1.0, "children": 0.25},
         "timeline": {"origin_unix": 1002.0, "budgets": {"pmc": {"cap_per_s": 2, "max_inflight": 1, "starts": [[0, 1]]},
                                                          "default": {"cap_per_s": 1, "max_inflight": 1, "starts": [[0, 1]]}},
                      "pauses": [{"budget": "pmc", "at_s": 1.0, "seconds": 3, "reason": "429"}]}}
    m = workers.merge_summaries([a, b])
    assert (m["attempted"], m["fetched"], m["hard_404"]) == (10, 8, 2)
    assert (m["no_url"], m["planned"]) == (3, 20)
    assert m["per_host"] == {"x.org": {"attempted": 8}, "y.org": {"attempted": 2}}
    assert m["errors"] == {"timeout": 3} and m["requests_per_budget"] == {"pmc": 11, "europepmc": 5}
    assert m["unrecorded"] == [{"reason": "r1"}] and m["fatal"] == "disk full"
    assert m["cpu_s"] == {"self": 2.5, "children": 0.75}
    t = m["timeline"]
    assert t["origin_unix"] == 1000.2
    # b started 2 s later: its second 0 is the run's second 2.
    assert t["budgets"]["pmc"]["starts"] == [(0, 2), (1, 1), (2, 1)]
    assert t["pauses"] == [{"budget": "pmc", "at_s": 3.0, "seconds": 3, "reason": "429"}]


def test_worker_count(monkeypatch):
    assert workers.worker_count(3) == 3
    monkeypatch.setattr(workers.os, "cpu_count", lambda: 6)
    assert workers.worker_count("auto") == 6
    monkeypatch.setattr(workers.os, "cpu_count", lambda: None)  # the system cannot tell
    assert workers.worker_count("auto") == 1


def test_no_more_children_than_limit_rows():
    cfg = {"report": {"dir": "reports"}, "run": {"lease_s": 30}}
    assert workers.WorkersJob(cfg, None, "R", _args(limit=2), 4).count == 2
    assert workers.WorkersJob(cfg, None, "R", _args(), 4).count == 4
    assert [workers.child_argv(_args(limit=2), "R", k, 2)[7] for k in range(2)] == ["1", "1"]


def test_a_failed_child_fails_the_run():
    ok = {"status": "finished", "attempted": 3}
    crashed = {"status": "failed", "error": "RuntimeError: the page query broke"}
    m = workers.merge_run([ok, crashed], [0, 1], [11, 12])
    assert m["fatal"] == "worker 1 failed (exit 1): RuntimeError: the page query broke"
    assert [w["status"] for w in m["workers"]] == ["finished", "failed"]
    killed = workers.merge_run([ok, None], [0, -9], [11, 12])
    assert "fatal" not in killed and killed["workers_lost"] == 1 and killed["workers"][1]["status"] == "lost"
    assert workers.merge_run([None, None], [-9, -9], [1, 2])["fatal"].startswith("no worker finished")

