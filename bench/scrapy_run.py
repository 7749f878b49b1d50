"""The same lifted workload through a minimal Scrapy spider, for an honest comparison.

    python -m bench.scrapy_run --port P --rows N --hosts H --inflight-per-host K --out DIR --summary FILE [--fsync]

Per URL it does what the crawler's fetcher does on the wire: HEAD, then GET when the HEAD
says 200; the body is hashed (sha256) and written to a temporary file beside its target, then
renamed into place at the path the crawler would use; with ``--fsync`` (the bench passes the
crawler runs' setting) the file system is flushed once per 100 files, as the crawler flushes once
per commit. What it leaves out, and the crawler does not: no database
reads or writes, no journal, no git commits, no image sniffing. The spider reaches the simulator
at 127.0.0.1:P and names the simulated host in the Host header; each host gets its own download
slot with the same in-flight cap as the crawler's per-host budget, and no delay (the crawler's
budgets are lifted too).
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import sys
from pathlib import Path
from typing import Any

import scrapy
from scrapy.crawler import CrawlerProcess

from bench.rows import figure_path, lifted_hosts, spread, urls


class FigureSpider(scrapy.Spider):
    name = "figures"

    def __init__(self, port: int, rows: int, hosts: int, out: str, fsync: bool, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.port, self.rows, self.hosts, self.out, self.fsync = port, rows, hosts, Path(out), fsync
        self.counts = {"rows": 0, "fetched": 0, "not_found": 0, "other_status": 0, "errors": 0, "bytes": 0}

    async def start(self):  # Scrapy pulls from this as it has room, like the crawler's producers
        for i, host, url in urls(spread(self.rows, lifted_hosts(self.hosts))):
            self.counts["rows"] += 1
            yield self._request(url, host, i, "HEAD", self.after_head)

    def _request(self, url: str, host: str, i: int, method: str, callback: Any) -> scrapy.Request:
        direct = url.replace(f"http://{host}/", f"http://127.0.0.1:{self.port}/", 1)
        return scrapy.Request(direct, method=method, headers={"Host": host}, callback=callback,
                              errback=self.failed, dont_filter=True, cb_kwargs={"i": i, "host": host, "url": url},
                              meta={"download_slot": host, "handle_httpstatus_all": True})

    def after_head(self, response: scrapy.http.Response, i: int, host: str, url: str):
        if response.status == 200:
            yield self._request(url, host, i, "GET", self.save)
        else:
            self.counts["not_found" if response.status == 404 else "other_status"] += 1

    def save(self, response: scrapy.http.Response, i: int, host: str, url: str) -> None:
        if response.status != 200:
            self.counts["not_found" if response.status == 404 else "other_status"] += 1
            return
        target = self.out / figure_path(i)
        target.parent.mkdir(parents=True, exist_ok=True)
        temp = target.with_name(f".{target.name}.part")
        digest = hashlib.sha256(response.body).hexdigest()
        with open(temp, "wb") as fh:
            fh.write(response.body)
        os.replace(temp, target)
        self.counts["fetched"] += 1
        if self.fsync and self.counts["fetched"] % 100 == 0:  # as the crawler's one flush per commit
            os.sync()  # (on the reactor's thread; the crawler's runs in a worker thread)
        self.counts["bytes"] += len(response.body)
        self.counts["last_sha256"] = digest  # kept (one value) so the hash is really used

    def failed(self, failure: Any) -> None:
        self.counts["errors"] += 1


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.scrapy_run", description=__doc__.splitlines()[0])
    for name in ("--port", "--rows", "--hosts", "--inflight-per-host"):
        parser.add_argument(name, type=int, required=True)
    parser.add_argument("--out", required=True, help="where the files go")
    parser.add_argument("--summary", required=True, help="JSON counts are written here")
    parser.add_argument("--fsync", action="store_true", help="flush the file system every 100 files, like the crawler's per-commit flush")
    args = parser.parse_args(argv)
    process = CrawlerProcess(settings={
        "CONCURRENT_REQUESTS": args.hosts * args.inflight_per_host,
        "CONCURRENT_REQUESTS_PER_DOMAIN": args.inflight_per_host,  # per download slot, i.e. per host
        "DOWNLOAD_DELAY": 0, "AUTOTHROTTLE_ENABLED": False,
        "ROBOTSTXT_OBEY": False, "COOKIES_ENABLED": False, "RETRY_ENABLED": False,
        "TELNETCONSOLE_ENABLED": False, "REMOTE_CONTROL_ENABLED": False, "LOG_LEVEL": "WARNING",
        # A callback yields at most one request; the default (100) starts 100 tasks per response.
        "CONCURRENT_ITEMS": 1,
        "USER_AGENT": "crawler-bench-scrapy/0.1 (+mailto:operators@example.org)",
    })
    crawler = process.create_crawler(FigureSpider)
    process.crawl(crawler, port=args.port, rows=args.rows, hosts=args.hosts, out=args.out, fsync=args.fsync)
    process.start()
    counts = crawler.spider.counts
    Path(args.summary).write_text(json.dumps(counts))
    return 0 if counts["fetched"] + counts["not_found"] == counts["rows"] else 1


if __name__ == "__main__":
    sys.exit(main())
