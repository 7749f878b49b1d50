"""A loopback proxy in front of the local S3 that cuts object downloads short: the network
failing mid-stream, as the recovery job meets it reading a large backup.

Every request is passed to S3 as it came (same Host header, so signatures stay valid). A GET
whose path ends with `cut_suffix` has its body cut after `cut_after` bytes (the connection is
reset) for its first `cuts` responses; later ones pass whole. Ranged requests are counted in
`ranges`, so a test can see the reader resumed rather than starting over.
"""

from __future__ import annotations

import aiohttp
from aiohttp import web

from crawler.sandbox.simulator import abort_with_rst


class CuttingProxy:
    def __init__(self, upstream: str, cut_suffix: str, cut_after: int, cuts: int) -> None:
        self.upstream = upstream.rstrip("/")
        self.cut_suffix = cut_suffix
        self.cut_after = cut_after
        self.cuts_left = cuts
        self.ranges: list[str] = []
        self.cut_count = 0
        self._runner: web.AppRunner | None = None
        self._session: aiohttp.ClientSession | None = None
        self.endpoint_url = ""

    async def __aenter__(self) -> CuttingProxy:
        self._session = aiohttp.ClientSession(auto_decompress=False)
        app = web.Application(client_max_size=1 << 30)
        app.router.add_route("*", "/{tail:.*}", self._handle)
        self._runner = web.AppRunner(app, access_log=None, shutdown_timeout=0.5)
        await self._runner.setup()
        site = web.TCPSite(self._runner, "127.0.0.1", 0)
        await site.start()
        self.endpoint_url = f"http://127.0.0.1:{self._runner.addresses[0][1]}"
        return self

    async def __aexit__(self, *exc: object) -> None:
        if self._runner is not None:
            await self._runner.cleanup()
        if self._session is not None:
            await self._session.close()

    async def _handle(self, request: web.Request) -> web.StreamResponse:
        assert self._session is not None
        headers = {k: v for k, v in request.headers.items() if k.lower() not in ("content-length", "transfer-encoding")}
        body = await request.read()
        cut = (request.method == "GET" and request.path.endswith(self.cut_suffix) and self.cuts_left > 0)
        if request.method == "GET" and request.path.endswith(self.cut_suffix) and "Range" in request.headers:
            self.ranges.append(request.headers["Range"])
        async with self._session.request(request.method, self.upstream + request.path_qs, headers=headers,
                                         data=body or None, allow_redirects=False) as upstream:
            resp = web.StreamResponse(status=upstream.status)
            for k, v in upstream.headers.items():
                if k.lower() not in ("transfer-encoding", "connection", "content-encoding", "server", "date"):
                    resp.headers[k] = v
            await resp.prepare(request)
            sent = 0
            async for chunk in upstream.content.iter_chunked(65536):
                if cut and sent + len(chunk) > self.cut_after:
                    await resp.write(chunk[: self.cut_after - sent])
                    self.cuts_left -= 1
                    self.cut_count += 1
                    abort_with_rst(request)
                    return resp
                await resp.write(chunk)
                sent += len(chunk)
            await resp.write_eof()
            return resp
