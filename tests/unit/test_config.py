from pathlib import Path

import pytest

from crawler import config
from crawler.config import ConfigError


def write(tmp_path: Path, text: str) -> Path:
    p = tmp_path / "c.toml"
    p.write_text(text)
    return p


def test_defaults_hold_the_contract_budgets():
    cfg = config.load(env={})
    by_name = {b.name: b for b in cfg.budgets}
    assert by_name["europepmc"].hosts == ("europepmc.org", "www.ebi.ac.uk")
    assert (by_name["europepmc"].max_inflight, by_name["europepmc"].rate_per_s) == (4, 2.0)
    assert (by_name["pmc"].max_inflight, by_name["pmc"].rate_per_s) == (2, 2.0)
    assert (by_name["default"].max_inflight, by_name["default"].rate_per_s) == (1, 1.0)
    assert cfg["artifacts"]["commit_batch"] == 100


def test_override_key_by_key_and_env_dsn(tmp_path):
    p = write(tmp_path, '[http]\ntimeout_s = 5\n[budgets.pmc]\nrate_per_s = 1\n[http.connect_to]\n"a.org:443" = "127.0.0.1:8443"\n')
    cfg = config.load(p, env={"CRAWLER_DSN": "postgresql://u:secret@h/db"})
    assert cfg["http"]["timeout_s"] == 5
    assert cfg["http"]["connect_timeout_s"] == 10  # untouched default
    pmc = next(b for b in cfg.budgets if b.name == "pmc")
    assert (pmc.rate_per_s, pmc.max_inflight, pmc.hosts) == (1.0, 2, ("*.ncbi.nlm.nih.gov",))
    assert cfg["db"]["dsn"] == "postgresql://u:secret@h/db"
    assert "secret" not in str(cfg.masked())


@pytest.mark.parametrize("text, key", [
    ("[http]\ntimeout_s = 'slow'\n", "http.timeout_s"),
    ("[http]\ntimout_s = 5\n", "http.timout_s"),
    ("[budgets.pmc]\nrate_per_s = 0\n", "budgets.pmc.rate_per_s"),
    ("[budgets.cdn]\nmax_inflight = 1\nrate_per_s = 1\n", "budgets.cdn.hosts"),
    ("[budgets.cdn]\nhosts=['x.org']\nmax_inflight = 0\nrate_per_s = 1\n", "budgets.cdn.max_inflight"),
    ("[db]\nartifacts_table = 'a; drop table x'\n", "db.artifacts_table"),
    ("[artifacts]\nfigure_path = 'figures/{artifact_id}'\n", "artifacts.figure_path"),
    # two rows could share one file: refused before anything is fetched
    ("[artifacts]\nfigure_path = 'figures/{paper_id}/{figure_label}{ext}'\n", "artifacts.figure_path"),
    ("[artifacts]\nfigure_path = 'figures/{artifact_id}/../x{ext}'\n", "artifacts.figure_path"),
    ("[artifacts]\nfigure_path = '/srv/{artifact_id}{ext}'\n", "artifacts.figure_path"),
    ("[http]\nretry_after_max_s = 0\n", "http.retry_after_max_s"),
    ("[http]\nca_file = '/nonexistent/ca.pem'\n", "http.ca_file"),
    ("[http.connect_to]\n'europepmc.org' = '127.0.0.1:1'\n", "http.connect_to"),
    ("[artifacts]\ncommit_batch = 0\n", "artifacts.commit_batch"),
    ("[recovery]\ns3_prefix = 'scidex/backups'\n", "recovery.s3_prefix"),
])
def test_bad_config_names_the_key_in_one_line(tmp_path, text, key):
    with pytest.raises(ConfigError) as err:
        config.load(write(tmp_path, text), env={})
    message = str(err.value)
    assert key in message and "\n" not in message and str(tmp_path) in message


def test_unreadable_and_invalid_toml(tmp_path):
    with pytest.raises(ConfigError, match="cannot read"):
        config.load(tmp_path / "absent.toml", env={})
    with pytest.raises(ConfigError, match="not valid TOML"):
        config.load(write(tmp_path, "[http\n"), env={})
