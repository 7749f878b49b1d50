"""Nothing secret is ever written: DSN passwords (with `@` in them, or as `?password=`) and the
credentials in an image URL's userinfo reach no output, no report file and no table of the
tool's own schema. The CLI runs in a subprocess, as an operator runs it."""

from __future__ import annotations

import asyncpg

from crawler.sandbox import images
from crawler.sandbox.simulator import Behaviour, UpstreamSimulator
from tests.acceptance.test_cli import cli_env, run_cli
from tests.harness import figure_tree, insert_figures, rows_by_id, to_toml

SECRETS = ("Pw@ss-S3CRET-ONE", "Pw%40ss-S3CRET-ONE", "S3CRET-TWO", "S3CRET-THREE", "S3CRET-FOUR", "S3CRET-FIVE")


def with_password(dsn: str, password: str) -> str:
    """The test server's DSN (trust authentication: any password is accepted) with one planted."""
    scheme, rest = dsn.split("://", 1)
    user_info, _, tail = rest.partition("@")
    user = user_info.split(":", 1)[0]
    return f"{scheme}://{user}:{password}@{tail}"


async def state_schema_text(dsn: str) -> str:
    conn = await asyncpg.connect(dsn)
    try:
        tables = [r["table_name"] for r in await conn.fetch(
            "select table_name from information_schema.tables where table_schema = 'artifact_recovery'")]
        assert {"runs", "journal"} <= set(tables)
        out = []
        for table in tables:
            out += [r["t"] for r in await conn.fetch(f'select t::text as t from artifact_recovery."{table}" t')]
        return "\n".join(out)
    finally:
        await conn.close()


async def test_no_secret_reaches_any_output_file_or_table(dsn, repo, tmp_path):
    async with UpstreamSimulator() as sim:
        sim.set_route("cdn.example.com", "/ok.png", Behaviour(body=images.png(1, 2000)))
        sim.set_route("cdn.example.com", "/gone.png", Behaviour(status=404, content_type="text/html"))
        sim.set_route("cdn.example.com", "/html.png", Behaviour(body=b"<html>no</html>", content_type="text/html"))
        await insert_figures(dsn, [
            ("s-ok", {"image_url": "http://alice:S3CRET-THREE@cdn.example.com/ok.png", "paper_id": "P"}, None),
            ("s-gone", {"image_url": "http://S3CRET-FOUR@cdn.example.com/gone.png"}, None),
            ("s-failed", {"image_url": "http://bob:S3CRET-FIVE@cdn.example.com/html.png"}, None),
            ("s-blocked", {"image_url": "http://carol:S3CRET-FIVE@10.0.0.7/x.png"}, None),
        ])
        reports = tmp_path / "reports"
        tree = figure_tree(with_password(dsn, "Pw%40ss-S3CRET-ONE"), repo, sim.port, tmp_path)  # "@", encoded
        tree["report"]["console"] = True
        (tmp_path / "c.toml").write_text(to_toml(tree))
        code, out1, err1 = await run_cli("figures", "--config", str(tmp_path / "c.toml"), "-v", timeout=120)
        assert code == 0, err1[-2000:]
        # The second form: the password as a query parameter, from CRAWLER_DSN.
        sep = "&" if "?" in dsn else "?"
        tree["db"]["dsn"] = ""
        (tmp_path / "c2.toml").write_text(to_toml(tree))
        env = {**cli_env(), "CRAWLER_DSN": f"{dsn}{sep}password=S3CRET-TWO"}
        code, out2, err2 = await run_cli("figures", "--config", str(tmp_path / "c2.toml"), "--retry-failed", timeout=120, env=env)
        assert code == 0, err2[-2000:]
        code, out3, err3 = await run_cli("report", "--config", str(tmp_path / "c2.toml"), "--json", env=env)
        assert code == 0
    got = await rows_by_id(dsn)
    assert got["s-ok"]["metadata"]["image_fetch_outcome"] == "fetched"
    assert got["s-gone"]["metadata"]["image_unavailable"] is True
    assert got["s-failed"]["metadata"]["image_fetch_outcome"] == "failed"
    written = [out1, err1, out2, err2, out3, err3, await state_schema_text(dsn)]
    files = [p for p in reports.rglob("*") if p.is_file()]
    assert {p.name for p in files} >= {"log.jsonl", "summary.json", "summary.md"}
    written += [p.read_text(errors="replace") for p in files]
    for secret in SECRETS + ("S3CRET",):
        leaks = [i for i, text in enumerate(written) if secret in text]
        assert not leaks, f"{secret!r} written in outputs {leaks}"
    # ... and what was written still says where things came from, without the secret
    assert any("cdn.example.com/html.png" in text for text in written)
