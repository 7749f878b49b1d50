"""A loopback aiohttp server that plays the upstream hosts (Europe PMC, PMC, publisher CDNs).

The client reaches it through a resolver that maps every upstream "host:port" to
127.0.0.1:PORT, so one server answers for all hosts and dispatches on the ``Host``
header (lower-cased, port stripped) plus the raw request target (path and query,
exactly as the client sent it).

Contract:

* A route is ``(host, path_qs) -> Behaviour | list[Behaviour]``. A list is a script:
  the k-th request (0-based, GET and HEAD alike) to that (host, path) gets item
  ``min(k, len - 1)``. Unrouted requests get ``default`` (a small text/html 404).
* Every request is appended to ``log`` as a :class:`RequestRecord` once it is over
  (response finished, connection dropped, or handler cancelled), so each record is
  complete; the log is in completion order.
* ``stop()`` returns within about 2 x ``shutdown_timeout`` (aiohttp waits once for
  handlers to finish, once more after cancelling them) even if clients hold
  connections open; idle keep-alive connections are closed at once.
* Concurrency (``max_inflight``) is measured from handler start to end; a handler
  that never awaits (no ``delay_s``/``chunk_delay_s``, small body) runs to completion
  in one event-loop step, so measure client concurrency with a ``delay_s``.
"""

from __future__ import annotations

import asyncio
import email.utils
import math
import socket
import ssl
import struct
import time
from collections import defaultdict
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path

from aiohttp import web

__all__ = [
    "Behaviour",
    "RequestRecord",
    "UpstreamSimulator",
    "abort_with_rst",
    "http_date_in",
    "make_tls",
    "max_starts_in_window",
]

CHUNK_SIZE = 16 * 1024


@dataclass
class Behaviour:
    """How the simulator answers one request.

    ``reset`` drops the TCP connection with an RST and sends nothing. ``truncate_to``
    announces the full Content-Length but sends only the first N body bytes, then
    closes; with ``close_delimited`` no length is announced at all (HTTP/1.0 style, the
    body ends with the connection), so a cut body looks complete to HTTP. HEAD answers with ``head_status`` (or ``status``) and the same headers as
    GET, Content-Length included, but no body. ``retry_after`` may be a callable that
    is evaluated per response, for HTTP dates relative to "now" (see :func:`http_date_in`).
    """

    status: int = 200
    body: bytes = b""
    content_type: str | None = "image/png"
    headers: dict[str, str] = field(default_factory=dict)
    delay_s: float = 0.0
    chunk_delay_s: float = 0.0
    reset: bool = False
    truncate_to: int | None = None
    head_status: int | None = None
    retry_after: str | Callable[[], str] | None = None
    location: str | None = None
    close_delimited: bool = False  # no Content-Length and no chunking: the body ends where the connection does


@dataclass
class RequestRecord:
    """One request as the server saw it; ``status`` is 0 for a reset."""

    host: str
    method: str
    path: str
    start: float
    end: float
    status: int


@dataclass(frozen=True)
class http_date_in:  # noqa: N801 - used like a function
    """A Retry-After value factory: an HTTP date at least ``seconds`` after the response is sent.

    Rounded up to the next whole second because HTTP dates have one-second resolution;
    a date fixed when the scene is built would already be in the past when it is served.
    A dataclass rather than a lambda so Behaviours holding one still compare equal.
    """

    seconds: float

    def __call__(self) -> str:
        return email.utils.formatdate(math.ceil(time.time() + self.seconds), usegmt=True)


def max_starts_in_window(starts: list[float], window_s: float = 1.0) -> int:
    """The most start times that fall in any half-open window [t, t + window_s).

    Exact: some maximal window begins at a start time, so a two-pointer sweep over the
    sorted times checks every candidate. O(n log n).
    """
    times = sorted(starts)
    best = 0
    hi = 0
    for lo, t in enumerate(times):
        while hi < len(times) and times[hi] < t + window_s:
            hi += 1
        best = max(best, hi - lo)
    return best


def make_tls(directory: Path, hosts: list[str]) -> tuple[ssl.SSLContext, Path]:
    """A throwaway CA and one server certificate for all ``hosts`` (wildcards allowed).

    Returns the server-side SSLContext and the path of the CA certificate PEM, written
    into ``directory``, which the client must trust.
    """
    import trustme  # sandbox-only dependency

    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    ca = trustme.CA()
    server_cert = ca.issue_cert(*hosts)
    ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    server_cert.configure_cert(ctx)
    ca_path = directory / "upstream-ca.pem"
    ca.cert_pem.write_to_path(str(ca_path))
    return ctx, ca_path


def _normalise_host(host: str) -> str:
    host = host.strip().lower()
    if host.startswith("["):  # IPv6 literal, maybe with a port
        return host[: host.find("]") + 1] if "]" in host else host
    name, sep, port = host.rpartition(":")
    return name if sep and port.isdigit() else host


class _Response(web.StreamResponse):
    """A StreamResponse that can leave out Content-Type entirely.

    aiohttp adds ``application/octet-stream`` to any non-empty body without one, but a
    test of "server sent no Content-Type" needs the header really absent. This relies
    on the private ``_prepare_headers`` hook, which runs just before headers are written.
    """

    omit_content_type = False

    async def _prepare_headers(self) -> None:
        await super()._prepare_headers()
        if self.omit_content_type:
            self.headers.popall("Content-Type", None)


def abort_with_rst(request: web.BaseRequest) -> None:
    """Drop the connection so the peer sees ECONNRESET, not a clean EOF."""
    transport = request.transport
    if transport is None:
        return
    sock = transport.get_extra_info("socket")
    if sock is not None:
        # SO_LINGER on, timeout 0: close() sends RST instead of FIN.
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    transport.abort()


class UpstreamSimulator:
    """Serves scripted :class:`Behaviour` per (host, path) on one loopback port."""

    def __init__(
        self,
        routes: dict[tuple[str, str], Behaviour | list[Behaviour]] | None = None,
        default: Behaviour | None = None,
        ssl_context: ssl.SSLContext | None = None,
        shutdown_timeout: float = 0.5,
    ) -> None:
        self._routes: dict[tuple[str, str], list[Behaviour]] = {}
        self._hits: defaultdict[tuple[str, str], int] = defaultdict(int)
        for (host, path), behaviour in (routes or {}).items():
            self.set_route(host, path, behaviour)
        self.default = default or Behaviour(
            status=404, body=b"<html><body><h1>404 Not Found</h1></body></html>", content_type="text/html"
        )
        self.ssl_context = ssl_context
        self.shutdown_timeout = shutdown_timeout
        self.log: list[RequestRecord] = []
        self._runner: web.AppRunner | None = None
        self._port: int | None = None

    # -- configuration -------------------------------------------------------------
    def set_route(self, host: str, path: str, behaviour: Behaviour | list[Behaviour]) -> None:
        """Route (host, path-with-query) to one Behaviour or a scripted list; resets its counter."""
        script = list(behaviour) if isinstance(behaviour, list) else [behaviour]
        if not script:
            raise ValueError("a behaviour list needs at least one item")
        key = (_normalise_host(host), path)
        self._routes[key] = script
        self._hits.pop(key, None)

    # -- lifecycle -----------------------------------------------------------------
    async def start(self, host: str = "127.0.0.1", port: int = 0) -> int:
        """Start listening; returns the bound port."""
        if self._runner is not None:
            raise RuntimeError("simulator already started")
        app = web.Application()
        app.router.add_route("*", "/{tail:.*}", self._handle)
        # access_log=None: no per-request logging under load.
        runner = web.AppRunner(app, access_log=None, shutdown_timeout=self.shutdown_timeout)
        await runner.setup()
        site = web.TCPSite(runner, host, port, ssl_context=self.ssl_context, backlog=1024)
        try:
            await site.start()
        except BaseException:
            await runner.cleanup()
            raise
        self._runner = runner
        self._port = runner.addresses[0][1]
        return self._port

    async def stop(self) -> None:
        """Stop the server (idempotent); in-flight handlers get ``shutdown_timeout`` s, then are cancelled."""
        runner, self._runner = self._runner, None
        if runner is not None:
            await runner.cleanup()

    @property
    def port(self) -> int:
        if self._port is None:
            raise RuntimeError("simulator not started")
        return self._port

    async def __aenter__(self) -> UpstreamSimulator:
        await self.start()
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self.stop()

    # -- inspection ----------------------------------------------------------------
    def requests_for(
        self, host: str | None = None, path: str | None = None, method: str | None = None
    ) -> list[RequestRecord]:
        """Logged requests matching every given filter."""
        host = _normalise_host(host) if host is not None else None
        method = method.upper() if method is not None else None
        return [
            r
            for r in self.log
            if (host is None or r.host == host)
            and (path is None or r.path == path)
            and (method is None or r.method == method)
        ]

    def max_inflight(self, hosts: Iterable[str] | None = None) -> int:
        """Most requests to ``hosts`` (None: any host) open at once, intervals [start, end)."""
        wanted = None if hosts is None else {_normalise_host(h) for h in hosts}
        events: list[tuple[float, int]] = []
        for r in self.log:
            if wanted is None or r.host in wanted:
                events.append((r.start, 1))
                events.append((r.end, -1))
        # At equal times, -1 sorts first: a request ending as another starts is not an overlap.
        events.sort()
        best = current = 0
        for _, delta in events:
            current += delta
            best = max(best, current)
        return best

    # -- serving -------------------------------------------------------------------
    def _next_behaviour(self, key: tuple[str, str]) -> Behaviour:
        script = self._routes.get(key)
        if script is None:
            return self.default
        k = self._hits[key]
        self._hits[key] = k + 1
        return script[min(k, len(script) - 1)]

    async def _handle(self, request: web.Request) -> web.StreamResponse:
        start = time.monotonic()
        host = _normalise_host(request.host)  # the Host header, else the socket address
        path = request.raw_path
        behaviour = self._next_behaviour((host, path))
        is_head = request.method == "HEAD"
        status = behaviour.head_status if is_head and behaviour.head_status is not None else behaviour.status
        resp = _Response(status=status)
        try:
            if behaviour.delay_s:
                await asyncio.sleep(behaviour.delay_s)
            if behaviour.reset:
                abort_with_rst(request)
                # Never sent: aiohttp's write fails on the aborted transport, which it
                # treats as a premature client disconnect (no error logged).
                return resp
            self._fill_headers(resp, behaviour)
            await resp.prepare(request)
            if is_head:
                await resp.write_eof()
                return resp
            body = behaviour.body
            truncated = behaviour.truncate_to is not None and behaviour.truncate_to < len(body)
            if truncated:
                body = body[: behaviour.truncate_to]
            for i in range(0, len(body), CHUNK_SIZE):
                if i and behaviour.chunk_delay_s:
                    await asyncio.sleep(behaviour.chunk_delay_s)
                await resp.write(body[i : i + CHUNK_SIZE])
            if truncated or behaviour.close_delimited:
                # Graceful close flushes the bytes already written, then FIN: the client
                # sees EOF before Content-Length is reached.
                request.protocol.force_close()
                return resp
            await resp.write_eof()
            return resp
        except ConnectionError:
            # The client went away mid-response; aiohttp will notice too.
            return resp
        finally:
            # 0 whenever no status line went out: a reset, or a handler cancelled by stop().
            sent = status if resp.prepared else 0
            self.log.append(RequestRecord(host, request.method, path, start, time.monotonic(), sent))

    @staticmethod
    def _fill_headers(resp: _Response, behaviour: Behaviour) -> None:
        if behaviour.content_type is None:
            resp.omit_content_type = True
        else:
            resp.headers["Content-Type"] = behaviour.content_type
        if behaviour.retry_after is not None:
            value = behaviour.retry_after
            resp.headers["Retry-After"] = value() if callable(value) else value
        if behaviour.location is not None:
            resp.headers["Location"] = behaviour.location
        resp.headers.update(behaviour.headers)
        if behaviour.close_delimited:
            resp._length_check = False  # neither Content-Length nor chunked framing (private, like _prepare_headers)
            resp.force_close()
        else:
            resp.content_length = len(behaviour.body)
