"""The command line's own forms: the bare form, --version, config, report --list, -q."""

from __future__ import annotations

import json
import os
from pathlib import Path

from tests.acceptance.test_cli import run_cli
from tests.harness import figure_tree, insert_figures, to_toml


async def test_the_bare_form_with_a_config_file_runs_both_jobs(tmp_path: Path) -> None:
    cfg = tmp_path / "c.toml"
    cfg.write_text('[budgets.europepmc]\nrate_per_s = "fast"\n')
    code, _, err = await run_cli("--config", str(cfg))
    assert code == 2 and "budgets.europepmc.rate_per_s" in err and "invalid choice" not in err
    cfg.write_text("[report]\nconsole = false\n")
    code, _, err = await run_cli("--config", str(cfg))
    assert code == 2 and "no database configured" in err


async def test_version() -> None:
    code, out, _ = await run_cli("--version")
    assert code == 0 and out.startswith("crawler ") and out.strip() != "crawler"


async def test_config_prints_every_value_with_its_origin_secrets_masked(tmp_path: Path) -> None:
    cfg = tmp_path / "site.toml"
    cfg.write_text('[http]\ntimeout_s = 20\n[budgets.europepmc]\nrate_per_s = 1.5\n'
                   '[s3]\nendpoint_url = "http://key:s3secret@127.0.0.1:9000"\n')
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[2]),
           "CRAWLER_DSN": "postgresql://crawler:dbsecret@db.example/platform"}
    code, out, err = await run_cli("config", "--config", str(cfg), env=env)
    assert code == 0, err
    assert "dbsecret" not in out and "s3secret" not in out
    assert f"timeout_s = 20    # {cfg}" in out and "connect_timeout_s = 10    # default" in out
    assert "# environment (CRAWLER_DSN)" in out
    code, out, _ = await run_cli("config", "--json", "--config", str(cfg), env=env)
    values = json.loads(out)
    assert values["budgets.europepmc.rate_per_s"] == {"value": 1.5, "origin": str(cfg)}
    assert values["budgets.europepmc.max_inflight"]["origin"] == "default"
    assert values["db.dsn"]["value"] == "postgresql://crawler:***@db.example/platform"


async def test_report_list_and_a_quiet_console(dsn: str, repo: Path, sim, tmp_path: Path) -> None:
    await insert_figures(dsn, [("q-1", {"image_url": "http://cdn.example.com/none.png"}, None)])
    tree = figure_tree(dsn, repo, sim.port, tmp_path)
    tree["report"]["console"] = True
    cfg = tmp_path / "c.toml"
    cfg.write_text(to_toml(tree))
    code, _, loud = await run_cli("figures", "--config", str(cfg))
    assert code == 0 and " info  run.start " in loud
    code, _, quiet = await run_cli("figures", "-q", "--config", str(cfg))
    assert code == 0 and " info " not in quiet and "figures finished" in quiet
    code, out, _ = await run_cli("report", "--list", "--config", str(cfg))
    lines = out.splitlines()
    assert code == 0 and len(lines) == 3 and all("finished" in x for x in lines[1:])
    # (two runs in one second sort by their random suffix)
    assert sorted(x.split("  ")[-1].split()[0] for x in lines[1:]) == ["attempted=0", "attempted=1"]


async def test_a_prometheus_textfile_says_where_the_run_stands_and_how_it_ended(dsn: str, repo: Path, sim,
                                                                                 tmp_path: Path) -> None:
    await insert_figures(dsn, [("m-1", {"image_url": "http://cdn.example.com/none.png"}, None)])
    tree = figure_tree(dsn, repo, sim.port, tmp_path)
    tree["report"]["metrics_file"] = str(tmp_path / "crawler.prom")
    cfg = tmp_path / "c.toml"
    cfg.write_text(to_toml(tree))
    code, _, err = await run_cli("figures", "--config", str(cfg))
    assert code == 0, err
    text = (tmp_path / "crawler.prom").read_text()
    assert 'crawler_run_finished{run_id="' in text and 'status="finished"} 1' in text
    assert 'outcome="hard_404"} 1' in text and "crawler_rows_done{" in text
    assert "# TYPE crawler_outcomes_total counter" in text
    assert not list(tmp_path.glob(".crawler.prom.*"))  # written whole, then renamed
