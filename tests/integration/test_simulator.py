"""The upstream simulator and the figure scene behave as their contracts say."""

from __future__ import annotations

import asyncio
import email.utils
import hashlib
import pickle
import socket
import time

import aiohttp
import pytest
from aiohttp.abc import AbstractResolver
from yarl import URL

from crawler.sandbox import images
from crawler.sandbox.population import SPECIAL_KINDS, build_figure_scene
from crawler.sandbox.simulator import (
    Behaviour,
    RequestRecord,
    UpstreamSimulator,
    http_date_in,
    max_starts_in_window,
)

HOST = "europepmc.org"


class LoopbackResolver(AbstractResolver):
    """Every host name resolves to the simulator, as the crawler's sandbox resolver does."""

    def __init__(self, port: int) -> None:
        self.port = port

    async def resolve(self, host: str, port: int = 0, family: int = socket.AF_INET) -> list[dict]:
        return [{"hostname": host, "host": "127.0.0.1", "port": self.port,
                 "family": socket.AF_INET, "proto": 0, "flags": 0}]

    async def close(self) -> None:
        pass


def session(sim: UpstreamSimulator, **connector_kw) -> aiohttp.ClientSession:
    connector = aiohttp.TCPConnector(resolver=LoopbackResolver(sim.port), **connector_kw)
    return aiohttp.ClientSession(connector=connector)


def local(sim: UpstreamSimulator, url: str) -> URL:
    """The plain-HTTP twin of an upstream URL (same host, path and query)."""
    return URL(url).with_scheme("http").with_port(sim.port)


async def test_scripted_sequence_429_then_200() -> None:
    body = images.png(1, 3000)
    sim = UpstreamSimulator({(HOST, "/f.png"): [Behaviour(429, retry_after="1"), Behaviour(body=body)]})
    async with sim, session(sim) as http:
        statuses = []
        for _ in range(3):
            async with http.get(local(sim, f"https://{HOST}/f.png")) as resp:
                statuses.append((resp.status, resp.headers.get("Retry-After"), await resp.read()))
    assert statuses[0][:2] == (429, "1")
    assert statuses[1:] == [(200, None, body)] * 2
    assert [r.status for r in sim.requests_for(HOST, "/f.png", "GET")] == [429, 200, 200]


async def test_head_advances_sequence_and_head_status() -> None:
    body = images.jpeg(2, 5000)
    sim = UpstreamSimulator({
        (HOST, "/seq"): [Behaviour(503), Behaviour(body=body, content_type="image/jpeg")],
        (HOST, "/h"): Behaviour(body=body, content_type="image/jpeg", head_status=405),
    })
    async with sim, session(sim) as http:
        async with http.head(local(sim, f"https://{HOST}/seq")) as resp:
            assert resp.status == 503
        async with http.get(local(sim, f"https://{HOST}/seq")) as resp:
            assert resp.status == 200 and await resp.read() == body
        async with http.head(local(sim, f"https://{HOST}/h")) as resp:
            assert resp.status == 405
            assert resp.headers["Content-Length"] == str(len(body))
            assert resp.headers["Content-Type"] == "image/jpeg"
            assert await resp.read() == b""
        async with http.get(local(sim, f"https://{HOST}/h")) as resp:
            assert resp.status == 200 and await resp.read() == body
    assert [(r.method, r.status) for r in sim.requests_for(path="/h")] == [("HEAD", 405), ("GET", 200)]


async def test_reset_is_a_client_error_and_logged_as_status_0() -> None:
    sim = UpstreamSimulator({(HOST, "/reset"): Behaviour(reset=True)})
    async with sim, session(sim) as http:
        with pytest.raises(aiohttp.ClientError):
            async with http.get(local(sim, f"https://{HOST}/reset")) as resp:
                await resp.read()
    records = sim.requests_for(HOST, "/reset")
    # aiohttp (3.14) silently retries an idempotent request once after a ClientOSError,
    # so one GET from the caller's view may reach the server twice.
    assert 1 <= len(records) <= 2
    assert all(r.status == 0 and r.method == "GET" and r.end >= r.start for r in records)


async def test_truncated_body_is_shorter_than_content_length() -> None:
    body = images.png(3, 40_000)
    sim = UpstreamSimulator({(HOST, "/t.png"): Behaviour(body=body, truncate_to=1000)})
    async with sim, session(sim) as http:
        async with http.get(local(sim, f"https://{HOST}/t.png")) as resp:
            assert resp.status == 200 and resp.content_length == len(body)
            with pytest.raises(aiohttp.ClientPayloadError):
                await resp.read()


async def test_host_dispatch_default_404_and_headers() -> None:
    sim = UpstreamSimulator({
        (HOST, "/a?x=1&y=2"): Behaviour(body=b"raw", content_type=None),
        ("www.ncbi.nlm.nih.gov", "/a?x=1&y=2"): Behaviour(302, location="/b", content_type=None),
        ("www.ncbi.nlm.nih.gov", "/b"): Behaviour(429, retry_after=http_date_in(1.0)),
    })
    async with sim, session(sim) as http:
        url = f"http://127.0.0.1:{sim.port}/a?x=1&y=2"
        async with http.get(url, headers={"Host": "EuropePMC.org:443"}) as resp:
            assert resp.status == 200 and await resp.read() == b"raw"
            assert "Content-Type" not in resp.headers  # really absent, not octet-stream
        async with http.get(url, headers={"Host": "www.ncbi.nlm.nih.gov"}) as resp:
            assert resp.status == 429 and resp.history[0].status == 302
            retry_at = email.utils.parsedate_to_datetime(resp.headers["Retry-After"]).timestamp()
            assert time.time() < retry_at <= time.time() + 2.5
        async with http.get(url, headers={"Host": "example.org"}) as resp:
            assert resp.status == 404 and resp.content_type == "text/html"
    assert [r.host for r in sim.log] == [HOST, "www.ncbi.nlm.nih.gov", "www.ncbi.nlm.nih.gov", "example.org"]


async def test_stop_does_not_wait_for_idle_keep_alive_clients() -> None:
    sim = UpstreamSimulator({(HOST, "/k"): Behaviour(body=b"x")})
    await sim.start()
    try:
        async with session(sim) as http:
            async with http.get(local(sim, f"https://{HOST}/k")) as resp:
                await resp.read()
            t0 = time.monotonic()
            await sim.stop()  # the pooled keep-alive connection is still open
            assert time.monotonic() - t0 < 2.0
    finally:
        await sim.stop()  # idempotent


def test_max_starts_in_window_is_exact() -> None:
    assert max_starts_in_window([]) == 0
    assert max_starts_in_window([0, 0.5, 1.0]) == 2
    assert max_starts_in_window([0, 0.4, 0.9999]) == 3
    assert max_starts_in_window([5.0, 0.1, 5.5, 0.2, 5.9, 0.3, 6.95]) == 3
    assert max_starts_in_window([1, 1, 1, 2], window_s=1.0) == 3
    assert max_starts_in_window([0, 0.25, 0.5], window_s=0.25) == 1


def test_max_inflight_counts_overlaps_per_host() -> None:
    sim = UpstreamSimulator()

    def rec(host: str, start: float, end: float) -> RequestRecord:
        return RequestRecord(host, "GET", "/", start, end, 200)

    sim.log = [
        rec("a", 0.0, 2.0), rec("a", 1.0, 3.0), rec("b", 1.5, 1.6),
        rec("a", 2.0, 2.5),  # starts exactly as the first ends: not an overlap
        rec("a", 4.0, 5.0),
    ]
    assert sim.max_inflight({"a"}) == 2
    assert sim.max_inflight({"a", "b"}) == 3
    assert sim.max_inflight({"b"}) == 1
    assert sim.max_inflight({"c"}) == 0


async def test_max_inflight_sees_concurrent_live_requests() -> None:
    sim = UpstreamSimulator({(HOST, "/slow"): Behaviour(body=b"x", delay_s=0.5), ("other.org", "/"): Behaviour()})
    async with sim, session(sim) as http:
        async def fetch() -> int:
            async with http.get(local(sim, f"https://{HOST}/slow")) as resp:
                await resp.read()
                return resp.status

        assert await asyncio.gather(*(fetch() for _ in range(3))) == [200, 200, 200]
    assert sim.max_inflight({HOST}) == 3
    assert sim.max_inflight({"other.org"}) == 0


# -- the figure scene --------------------------------------------------------------

@pytest.fixture(scope="module")
def scene():
    return build_figure_scene()


def digest(scene) -> str:
    """A fingerprint of the whole scene (pickle: fast on tens of MB of image bodies)."""
    return hashlib.sha256(pickle.dumps(scene)).hexdigest()


def test_scene_is_deterministic_and_shaped(scene) -> None:
    assert digest(scene) == digest(build_figure_scene())
    assert digest(scene) != digest(build_figure_scene(seed=1))
    rows = scene.rows
    assert len(rows) == 4302
    ids = [r["id"] for r in rows]
    assert ids == sorted(ids) and len(set(ids)) == len(ids) and ids[0] == "fig-000001"
    with_files = [r for r in rows if r["file_path"]]
    assert with_files == rows[:15]
    for r in with_files:
        assert r["file_path"] == f"figures/papers/{r['metadata']['paper_id']}/{r['id']}.png"
        assert scene.files[r["file_path"]].startswith(b"\x89PNG\r\n\x1a\n")
    assert len(scene.files) == 15
    for r in rows:
        md = r["metadata"]
        assert r["artifact_type"] == "paper_figure" and r["title"]
        assert md["paper_id"].startswith("PMID-3") and md["pmcid"].startswith("PMC")
        assert md["figure_label"].startswith("Figure ")


def test_scene_urls_parse_and_are_routed(scene) -> None:
    garbage = 0
    for r in scene.rows:
        raw = r["metadata"].get("image_url")
        kind = scene.kinds[r["id"]]
        if kind == "garbage":
            garbage += 1
            assert raw in (None, "", "not a url", "ftp://x/y.png", "http://")
            continue
        url = URL(raw)
        assert url.scheme == "https" and url.host in scene.hosts and url.raw_path
        assert ((url.host, url.raw_path_qs) in scene.routes) == (kind != "present")
    assert 60 <= garbage <= 110
    assert sum("image_url" not in r["metadata"] for r in scene.rows) >= 3
    kinds = list(scene.kinds.values())
    assert all(kinds.count(k) == 3 for k in SPECIAL_KINDS)
    hosts = [URL(r["metadata"]["image_url"]).host for r in scene.rows[15:] if scene.kinds[r["id"]] != "garbage"]
    epmc = sum(h in ("europepmc.org", "www.ebi.ac.uk") for h in hosts) / len(scene.rows)
    pmc = sum(h.endswith("ncbi.nlm.nih.gov") for h in hosts) / len(scene.rows)
    assert 0.55 < epmc < 0.65 and 0.24 < pmc < 0.32


async def test_scene_routes_serve_what_kinds_say(scene) -> None:
    """One row of each kind, fetched the way the crawler will (real URL, loopback resolver)."""
    first = {}
    for r in scene.rows:
        first.setdefault(scene.kinds[r["id"]], r["metadata"].get("image_url"))
    expected = {"image": 200, "404": 404, "410": 410, "451": 451, "429-seconds": 429, "429-date": 429,
                "503-then-200": 503, "503-forever": 503, "soft-404": 200, "403": 403, "head-405": 200,
                "redirect": 200, "slow": 200}
    sim = UpstreamSimulator(scene.routes)
    async with sim, session(sim) as http:
        for kind, status in expected.items():
            async with http.get(local(sim, first[kind])) as resp:
                body = await resp.read()
                assert resp.status == status, kind
                if status == 200 and kind != "soft-404":
                    assert images.MAKERS[resp.content_type](0, 10)[:4] == body[:4], kind
        async with http.get(local(sim, first["451"])) as resp:
            assert 'rel="blocked-by"' in resp.headers["Link"]
        async with http.head(local(sim, first["head-405"])) as resp:
            assert resp.status == 405
