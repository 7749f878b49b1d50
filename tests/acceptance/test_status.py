"""`crawler status` through the CLI: live counts from heartbeats, `lost` for a killed run, rows
per type by state; it only reads."""

from __future__ import annotations

import asyncio
import json
import signal
from pathlib import Path

from crawler.sandbox.simulator import UpstreamSimulator
from tests.acceptance.test_cli import config_file, run_cli, scene, start_cli
from tests.acceptance.test_repair import snapshot
from tests.harness import insert_artifacts


async def status(cfg: Path) -> dict:
    code, out, err = await run_cli("status", "--json", "--config", str(cfg))
    assert code == 0, err
    return json.loads(out)


async def test_status_shows_a_running_run_live_then_lost_once_killed(dsn, repo, tmp_path):
    async with UpstreamSimulator() as sim:
        await scene(dsn, sim)
        await insert_artifacts(dsn, [("d-1", "dataset", {"filename": "x.csv"}, None),
                                     ("m-1", "model", {"file_unrecoverable": True}, None)])
        cfg = config_file(dsn, repo, sim, tmp_path)
        cfg.write_text(cfg.read_text().replace('["run"]\n', '["run"]\n"heartbeat_s" = 0.2\n'))
        assert '"heartbeat_s" = 0.2' in cfg.read_text()
        proc = await start_cli("figures", "--config", str(cfg))
        try:
            running = None
            for _ in range(500):  # until a heartbeat with counts is in (bounded: the job ends by itself)
                state = await status(cfg)
                running = next((r for r in state["runs"] if r["status"] == "running" and r.get("progress")), None)
                if running is not None and running["progress"]["done"] > 0:
                    break
                assert proc.returncode is None, "the run ended before a heartbeat was seen"
            assert running is not None and running["command"] == "figures"
            p = running["progress"]
            assert p["planned"] == 48 and 0 < p["done"] <= 48 and "europepmc" in p["budgets"]
        finally:
            proc.send_signal(signal.SIGKILL)
            await proc.wait()
        frozen = await snapshot(dsn)
        for _ in range(500):
            state = await status(cfg)
            if state["runs"][0]["status"] == "lost":
                break
            await asyncio.sleep(0.05)
        assert state["runs"][0]["status"] == "lost" and state["runs"][0]["run_id"] == running["run_id"]
        assert await snapshot(dsn) == frozen  # status only reads
        rows = state["rows"]
        figures = rows["paper_figure"]
        assert figures["rows"] == 48 and sum(figures[k] for k in ("missing", "fetched", "unavailable", "transient_due",
                                                                   "transient_later", "failed")) == 48
        assert rows["dataset"] == {"rows": 1, "bound": 0, "needs_review": 0, "unrecoverable": 0, "missing": 1}
        assert rows["model"]["unrecoverable"] == 1
        code, out, _ = await run_cli("status", "--config", str(cfg))
        assert code == 0 and "lost" in out and "paper_figure" in out and "no run going now" in out


async def test_tail_follows_a_run_that_starts_after_it_and_returns_when_it_ends(dsn, repo, tmp_path):
    async with UpstreamSimulator() as sim:
        await scene(dsn, sim)
        cfg = config_file(dsn, repo, sim, tmp_path)
        tail = await start_cli("tail", "--config", str(cfg))
        for _ in range(500):  # until tail says it waits (bounded)
            if tail.stderr is not None and b"waiting" in await tail.stderr.readline():
                break
        code, _, err = await run_cli("figures", "--config", str(cfg))
        assert code == 0, err
        out, rest = await asyncio.wait_for(tail.communicate(), 60)
        assert tail.returncode == 0, rest.decode()
        lines = out.decode().splitlines()
        assert " run.start " in lines[0] and " run.finish " in lines[-1]
        assert any(" progress " in x for x in lines) or any(" commit" in x for x in lines)
        run_id = next(p.name for p in (tmp_path / "reports").iterdir())
        assert f"following {run_id}" in rest.decode()
        # A named run that has ended: its whole log, then back at once.
        code, again, _ = await run_cli("tail", run_id, "--config", str(cfg))
        assert code == 0 and again.splitlines() == lines


async def test_a_terminal_gets_a_live_progress_display_and_the_final_line(dsn, repo, tmp_path):
    import os
    import pty
    import sys

    from tests.acceptance.test_cli import ROOT, cli_env
    async with UpstreamSimulator() as sim:
        await scene(dsn, sim)
        cfg = config_file(dsn, repo, sim, tmp_path)
        master, slave = pty.openpty()
        proc = await asyncio.create_subprocess_exec(
            sys.executable, "-m", "crawler", "figures", "--config", str(cfg), cwd=ROOT,
            env={**cli_env(), "COLUMNS": "140", "TERM": "xterm"}, stdout=asyncio.subprocess.PIPE, stderr=slave)
        os.close(slave)
        seen = bytearray()
        loop = asyncio.get_running_loop()

        def drain() -> None:
            while True:  # until the child's end closes the terminal (EIO), bounded by the run itself
                try:
                    chunk = os.read(master, 65536)
                except OSError:
                    return
                if not chunk:
                    return
                seen.extend(chunk)

        reader = loop.run_in_executor(None, drain)
        await asyncio.wait_for(proc.wait(), 60)
        await asyncio.wait_for(reader, 10)
        os.close(master)
        text = seen.decode(errors="replace")
        assert proc.returncode == 0, text[-2000:]
        assert "rows/s" in text and "ETA" in text and "/ 48 rows" in text  # the live display drew
        assert "figures finished: attempted=48" in text  # and the final line stays
