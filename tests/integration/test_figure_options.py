"""Narrowing runs, site hooks, the breaker and redirect accounting, on the real stack."""

from __future__ import annotations

from pathlib import Path


from crawler.sandbox import images
from crawler.sandbox.simulator import Behaviour, http_date_in
from tests.harness import figure_config, git, insert_figures, rows_by_id, run_figures

PNG = images.png(7, 2000)
NOT_FOUND = Behaviour(status=404, content_type="text/html")


async def test_limit_and_host_narrow_a_run(dsn, repo, sim, tmp_path):
    rows = []
    for i in range(6):
        host = "europepmc.org" if i < 4 else "cdn.example.com"
        sim.set_route(host, f"/n{i}.png", NOT_FOUND)
        rows.append((f"n-{i}", {"image_url": f"http://{host}/n{i}.png"}, None))
    await insert_figures(dsn, rows)
    cfg = figure_config(dsn, repo, sim.port, tmp_path)
    _, only_cdn = await run_figures(cfg, host="cdn.example.com")
    assert only_cdn["attempted"] == 2 and {r.host for r in sim.log} == {"cdn.example.com"}
    _, limited = await run_figures(cfg, limit=3)
    assert limited["attempted"] == 3
    _, rest = await run_figures(cfg)
    assert rest["attempted"] == 1
    assert all(r["metadata"]["image_unavailable"] for r in (await rows_by_id(dsn)).values())


async def test_site_path_resolver(dsn, repo, sim, tmp_path):
    sim.set_route("europepmc.org", "/s.png", Behaviour(body=PNG))
    await insert_figures(dsn, [("s-1", {"image_url": "http://europepmc.org/s.png", "pmcid": "PMC9",
                                        "figure_label": "Figure 2"}, None)])
    cfg = figure_config(dsn, repo, sim.port, tmp_path, artifacts={"path_resolver": "tests.sitehooks:figure_path"})
    _, summary = await run_figures(cfg)
    assert summary["fetched"] == 1
    assert (await rows_by_id(dsn))["s-1"]["file_path"] == "site/PMC9/Figure_2-s-1.png"


async def test_a_resolver_that_escapes_the_root_fails_the_row_and_writes_nothing(dsn, repo, sim, tmp_path):
    await insert_figures(dsn, [("e-1", {"image_url": "http://europepmc.org/e.png"}, None)])
    cfg = figure_config(dsn, repo, sim.port, tmp_path, artifacts={"path_resolver": "tests.sitehooks:escaping_path"})
    _, summary = await run_figures(cfg)
    m = (await rows_by_id(dsn))["e-1"]["metadata"]
    assert summary["failed"] == 1 and m["image_last_error"] == "unsafe_path"
    assert sim.log == [] and not (tmp_path / "outside").exists()


async def test_site_commit_command_gets_the_batch(dsn, repo, sim, tmp_path):
    helper = tmp_path / "commit-helper.sh"
    helper.write_text('#!/bin/sh\nset -e\necho "$@" >> "$0.calls"\ngit add -- "$@"\n'
                      'git -c user.name=site -c user.email=s@s commit -q -m "site helper" -- "$@"\n')
    helper.chmod(0o755)
    for i in range(3):
        sim.set_route("europepmc.org", f"/c{i}.png", Behaviour(body=images.png(30 + i, 900)))
    await insert_figures(dsn, [(f"c-{i}", {"image_url": f"http://europepmc.org/c{i}.png", "paper_id": "P"}, None)
                               for i in range(3)])
    cfg = figure_config(dsn, repo, sim.port, tmp_path, artifacts={"commit_command": str(helper)})
    _, summary = await run_figures(cfg)
    assert summary["fetched"] == 3
    calls = Path(f"{helper}.calls").read_text().split()
    assert sorted(calls) == [f"figures/papers/P/c-{i}.png" for i in range(3)]
    head = git(repo, "rev-parse", "HEAD")
    assert {r["metadata"]["file_commit"] for r in (await rows_by_id(dsn)).values()} == {head}
    assert git(repo, "log", "-1", "--format=%an") == "site"


async def test_a_failing_commit_helper_leaves_rows_unstamped_for_the_next_run(dsn, repo, sim, tmp_path):
    sim.set_route("europepmc.org", "/x.png", Behaviour(body=PNG))
    await insert_figures(dsn, [("x-1", {"image_url": "http://europepmc.org/x.png", "paper_id": "P"}, None)])
    cfg = figure_config(dsn, repo, sim.port, tmp_path, artifacts={"commit_command": "false"})
    _, summary = await run_figures(cfg)
    assert summary["commit_failed_files"] == 1
    assert (await rows_by_id(dsn))["x-1"]["file_path"] is None
    _, again = await run_figures(figure_config(dsn, repo, sim.port, tmp_path))
    assert again["adopted_from_disk"] == 1 and len(sim.log) == 2  # HEAD + GET once, ever
    assert (await rows_by_id(dsn))["x-1"]["file_path"] == "figures/papers/P/x-1.png"


async def test_a_run_of_refusals_trips_the_breaker(dsn, repo, sim, tmp_path):
    for i in range(6):
        sim.set_route("cdn.example.com", f"/r{i}.png", Behaviour(status=403, content_type="text/html"))
    await insert_figures(dsn, [(f"b-{i}", {"image_url": f"http://cdn.example.com/r{i}.png"}, None) for i in range(6)])
    cfg = figure_config(dsn, repo, sim.port, tmp_path, http={"breaker_threshold": 3, "breaker_pause_s": 0.5},
                        budgets={"default": {"max_inflight": 1, "rate_per_s": 100.0}})
    _, summary = await run_figures(cfg)
    assert summary["failed"] == 6
    starts = sorted(r.start for r in sim.log)
    ends = sorted(r.end for r in sim.log)
    # after the third 403 in a row the budget rests for breaker_pause_s before the fourth request
    assert starts[3] - ends[2] >= 0.5
    log_text = next((tmp_path / "reports").glob("*/log.jsonl")).read_text()
    assert '"reason":"breaker"' in log_text


async def test_each_redirect_hop_counts_against_the_budget_of_its_host(dsn, repo, sim, tmp_path):
    sim.set_route("europepmc.org", "/hop.png", Behaviour(status=301, location="http://cdn.example.com/land.png",
                                                          content_type=None))
    sim.set_route("cdn.example.com", "/land.png", Behaviour(body=PNG))
    sim.set_route("europepmc.org", "/loop1.png", Behaviour(status=302, location="/loop2.png", content_type=None))
    sim.set_route("europepmc.org", "/loop2.png", Behaviour(status=302, location="/loop1.png", content_type=None))
    sim.set_route("europepmc.org", "/h501.png", Behaviour(body=PNG, head_status=501))
    sim.set_route("europepmc.org", "/private.png", Behaviour(status=302, location="http://10.1.1.1/x.png", content_type=None))
    await insert_figures(dsn, [
        ("h-1", {"image_url": "http://europepmc.org/hop.png"}, None),
        ("h-2", {"image_url": "http://europepmc.org/loop1.png"}, None),
        ("h-3", {"image_url": "http://europepmc.org/h501.png"}, None),
        ("h-4", {"image_url": "http://europepmc.org/private.png"}, None),
    ])
    cfg = figure_config(dsn, repo, sim.port, tmp_path)
    _, summary = await run_figures(cfg)
    meta = {k: v["metadata"] for k, v in (await rows_by_id(dsn)).items()}
    assert meta["h-1"]["image_fetch_outcome"] == "fetched"
    assert meta["h-2"]["image_last_error"] == "redirect_loop"
    assert meta["h-3"]["image_fetch_outcome"] == "fetched"
    assert meta["h-4"]["image_last_error"] == "blocked_address"
    at_server = {h: len([r for r in sim.log if r.host == h]) for h in ("europepmc.org", "cdn.example.com")}
    counted = summary["requests_per_budget"]
    assert counted["default:cdn.example.com"] == at_server["cdn.example.com"] == 2  # HEAD + GET landed there
    assert counted["europepmc"] == at_server["europepmc.org"]


async def test_retry_after_as_an_http_date(dsn, repo, sim, tmp_path):
    sim.set_route("europepmc.org", "/dated.png", [Behaviour(status=503, retry_after=http_date_in(1.0),
                                                            content_type="text/html"), Behaviour(body=PNG)])
    await insert_figures(dsn, [("d-1", {"image_url": "http://europepmc.org/dated.png"}, None)])
    cfg = figure_config(dsn, repo, sim.port, tmp_path)
    _, summary = await run_figures(cfg)
    assert summary["fetched"] == 1
    first, second = sorted(sim.log, key=lambda r: r.start)[:2]
    assert first.status == 503 and second.start >= first.end + 0.5  # an HTTP date has 1-s resolution


async def test_a_body_larger_than_the_buffer_goes_through_disk(dsn, repo, sim, tmp_path):
    big = images.png(9, 50_000)
    sim.set_route("europepmc.org", "/big.png", Behaviour(body=big))
    sim.set_route("europepmc.org", "/cut.png", Behaviour(body=images.png(10, 50_000), truncate_to=30_000))
    await insert_figures(dsn, [("g-1", {"image_url": "http://europepmc.org/big.png", "paper_id": "P"}, None),
                               ("g-2", {"image_url": "http://europepmc.org/cut.png", "paper_id": "P"}, None)])
    cfg = figure_config(dsn, repo, sim.port, tmp_path, http={"buffer_bytes": 4096, "chunk_bytes": 4096})
    _, summary = await run_figures(cfg)
    assert summary["fetched"] == 1 and summary["transient"] == 1
    assert (repo / "figures/papers/P/g-1.png").read_bytes() == big
    assert sorted(p.name for p in (repo / "figures/papers/P").iterdir()) == ["g-1.png"]  # no .part left
