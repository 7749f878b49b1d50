"""report.html through the CLI: self-contained, outcomes per host, each budget's starts per
second against its cap with its pauses, failed rows; parsed, not eyeballed."""

from __future__ import annotations

import json
from html.parser import HTMLParser
from pathlib import Path

from crawler.sandbox import images
from crawler.sandbox.simulator import Behaviour, UpstreamSimulator
from tests.acceptance.test_cli import run_cli
from tests.harness import figure_tree, insert_figures, to_toml


class Page(HTMLParser):
    def __init__(self) -> None:
        super().__init__()
        self.external: list[str] = []
        self.tags: list[tuple[str, dict[str, str]]] = []
        self.text: list[str] = []
        self.cells: list[str] = []
        self._in_td = False

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        a = {k: v or "" for k, v in attrs}
        self.tags.append((tag, a))
        for key in ("src", "href", "xlink:href"):
            if key in a:
                self.external.append(a[key])
        if tag == "link" or (tag == "script" and "src" in a):
            self.external.append(tag)
        self._in_td = tag in ("td", "th")

    def handle_endtag(self, tag: str) -> None:
        if tag in ("td", "th"):
            self._in_td = False

    def handle_data(self, data: str) -> None:
        self.text.append(data)
        if self._in_td:
            self.cells.append(data.strip())


async def test_the_html_report_shows_hosts_budgets_against_their_caps_and_failed_rows(dsn, repo, tmp_path):
    async with UpstreamSimulator() as sim:
        rows = []
        for i in range(12):
            host = "europepmc.org" if i % 2 else "cdn.example.com"
            path = f"/r/{i}.png"
            if i == 3:
                sim.set_route(host, path, [Behaviour(status=429, content_type="text/html", retry_after="1"),
                                           Behaviour(body=images.png(900 + i, 2000))])
            elif i == 4:
                sim.set_route(host, path, Behaviour(body=b"<html>not an image</html>", content_type="text/html"))
            else:
                sim.set_route(host, path, Behaviour(body=images.png(900 + i, 2000)))
            rows.append((f"h-{i:02}", {"image_url": f"http://{host}{path}", "paper_id": "P"}, None))
        await insert_figures(dsn, rows)
        tree = figure_tree(dsn, repo, sim.port, tmp_path, budgets={"europepmc": {"max_inflight": 2, "rate_per_s": 4.0}})
        cfg = tmp_path / "c.toml"
        cfg.write_text(to_toml(tree))
        code, _, err = await run_cli("figures", "--config", str(cfg))
        assert code == 0, err
        code, out, err = await run_cli("report", "--html", "--config", str(cfg))
        assert code == 0, err
        path = Path(out.strip())
        assert path.name == "report.html" and path.is_file()
        page = Page()
        page.feed(path.read_text())
        assert page.external == []  # nothing loaded from outside the file
        summary = json.loads((path.parent / "summary.json").read_text())
        # Outcomes per host, as the summary counts them.
        assert "europepmc.org" in page.cells and "cdn.example.com" in page.cells
        # One chart per budget, its bars the seconds the timeline holds, its cap drawn.
        charts = [a["data-budget"] for t, a in page.tags if t == "div" and "data-budget" in a]
        assert sorted(charts) == sorted(summary["timeline"]["budgets"]) == ["default", "europepmc"]
        paths = [a["d"] for t, a in page.tags if t == "path" and a.get("class") == "starts"]
        for d, name in zip(paths, charts):
            assert d.count("M") == len(summary["timeline"]["budgets"][name]["starts"])
        assert len([a for t, a in page.tags if t == "line" and a.get("class") == "cap"]) == 2
        assert max(n for _, n in summary["timeline"]["budgets"]["europepmc"]["starts"]) <= 4
        assert [a for t, a in page.tags if t == "rect" and a.get("class") == "pause"]  # the 429's Retry-After
        # The failed row, for a human.
        assert "h-04" in page.cells
