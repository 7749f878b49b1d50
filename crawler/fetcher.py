"""The downloader: one URL → HEAD then GET → an outcome, every request inside its budget.

Per URL: HEAD (405/501 → straight to GET; a host's first HEAD 404s are confirmed by a GET, and
a host caught answering HEAD 404 for what GET serves is not asked HEAD again); on 200, GET streaming the body into a temporary file
beside the target while hashing. Each redirect hop is a request of its own, under the budget of
the host it goes to. 429 and 503 are retried a bounded number of times: a Retry-After (seconds,
or an HTTP date counted against the response's Date) pauses the whole budget — as does any 429,
with exponential back-off and full jitter when it names no time — while a 503 without one only
delays this URL; a wait longer than `max_wait_s` is not slept through but returned as transient
with its next-attempt time. A run of 403/429 trips the budget's breaker.

Outcomes (CONTRACT.md §1): fetched; hard_404 (404, 410, 451); transient (timeouts, resets,
refused connections, DNS failures, 5xx, 429/503 after retries, truncated bodies); failed (the
rest: 401/403, a 200 that is not an image, too large, redirect loops, bad or blocked URLs).
"""

from __future__ import annotations

import asyncio
import datetime
import email.utils
import random
import ssl
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import aiohttp
import structlog
from yarl import URL

from . import media
from .budgets import Budget, BudgetedConnector, BudgetPaused, Budgets
from .files import TempFile
from .netguard import BlockedAddress, GuardedResolver

log = structlog.get_logger()

HARD_404 = frozenset({404, 410, 451})
REDIRECTS = frozenset({301, 302, 303, 307, 308})
RETRYABLE = frozenset({429, 503})


@dataclass
class FetchResult:
    outcome: str                      # fetched | hard_404 | transient | failed
    url: str
    error: str | None = None          # short code for transient/failed
    status: int | None = None
    temp: TempFile | None = None      # fetched: the body, closed, not yet placed
    ext: str | None = None
    content_type: str | None = None
    blocked_by: str | None = None     # 451: the Link rel="blocked-by" target
    retry_in_s: float | None = None   # transient: wait at least this long before the next attempt
    requests: int = 0


class _Done(Exception):
    def __init__(self, result: FetchResult) -> None:
        self.result = result


def parse_retry_after(value: str | None, date_header: str | None, max_s: float = float("inf")) -> float | None:
    """Seconds to wait from a Retry-After header (delta-seconds or HTTP date), clamped to
    [0, max_s] (`http.retry_after_max_s`: a value of years, or a date in year 9999, would
    otherwise park a budget or a row for ever); None when absent or unreadable. Only ASCII digits count as delta-seconds
    (str.isdigit() also takes "²" and Arabic-Indic digits, which float() then refuses)."""
    if not value:
        return None
    value = value.strip()[:64]  # an HTTP date is 29 characters; anything longer is not one
    if value and value.isascii() and value.isdigit():
        return min(float(int(value[:12])), max_s)
    try:
        when = email.utils.parsedate_to_datetime(value)
    except (TypeError, ValueError, IndexError, OverflowError):
        return None
    base = None
    if date_header:
        try:
            base = email.utils.parsedate_to_datetime(date_header.strip()[:64])
        except (TypeError, ValueError, IndexError, OverflowError):
            base = None
    if base is None or base.tzinfo is None or when.tzinfo is None:
        base = datetime.datetime.now(datetime.UTC)
        if when.tzinfo is None:
            when = when.replace(tzinfo=datetime.UTC)
    try:
        delay = (when - base).total_seconds()
    except OverflowError:
        return max_s
    return min(max(0.0, delay), max_s)


def parse_url(url: Any) -> URL | None:
    """`url` parsed, or None when it is not text or yarl refuses it, its host included: yarl
    parses some hosts it cannot decode (`http://xn--a.com/`) and raises on `.host` then."""
    try:
        u = URL(url) if isinstance(url, str) else None
        if u is not None:
            u.host  # noqa: B018 (decoded now, or refused here)
        return u
    except (ValueError, TypeError):
        return None


def blocked_by(link_header: str | None) -> str | None:
    """The target of a Link header's rel="blocked-by" entry (RFC 7725), or None. A plain split,
    linear in the header's length."""
    for entry in (link_header or "")[:8192].split(","):
        target, sep, params = entry.partition(">")
        target = target.strip()
        if not sep or not target.startswith("<"):
            continue
        for param in params.split(";"):
            name, _, val = param.partition("=")
            if name.strip().lower() == "rel" and "blocked-by" in val.strip().strip('"').lower().split():
                return target[1:]
    return None


def make_session(http: dict[str, Any], resolver: GuardedResolver) -> aiohttp.ClientSession:
    """The one client session: our resolver, no connection cap (budgets cap), no silent re-sends."""
    ssl_ctx: ssl.SSLContext | bool = True
    if http["ca_file"]:
        ssl_ctx = ssl.create_default_context()
        ssl_ctx.load_verify_locations(http["ca_file"])
    connector = BudgetedConnector(resolver=resolver, limit=0, use_dns_cache=False, ssl=ssl_ctx)
    timeout = aiohttp.ClientTimeout(total=http["timeout_s"], sock_connect=http["connect_timeout_s"])
    session = aiohttp.ClientSession(
        connector=connector, timeout=timeout, auto_decompress=False,
        # identity: we store bytes as served and hash them; a compressed body would be stored compressed
        headers={"User-Agent": http["user_agent"].format(contact=http["contact"]), "Accept-Encoding": "identity"})
    # aiohttp re-sends an idempotent request once after a reset on a kept-alive connection; that
    # request would start outside its budget, so switch it off (and fail loudly if it moves).
    if not hasattr(session, "_retry_connection"):
        raise RuntimeError("aiohttp no longer exposes _retry_connection; re-check silent re-sends")
    session._retry_connection = False
    return session


@dataclass
class HeadTrust:
    """Whether a host's HEAD 404s may be taken as final. Some servers and CDNs answer HEAD with
    404 (or a 405 disguised as one) while GET serves the file: a HEAD 404 taken on trust would
    mark such rows unavailable for ever. So each host's first `http.head_404_confirm` HEAD 404s
    are asked again with a GET; once one GET succeeds, the host's HEADs are not asked again this
    run (its rows go straight to GET)."""

    confirmed: int = 0     # HEAD 404s a GET agreed with
    lying: bool = False    # a GET served what its HEAD called gone
    seen: int = 0          # HEAD 404s from this host: every `head_404_recheck_every`-th is confirmed
                           # too, so a host that starts lying mid-run (one node of several) is caught


class Fetcher:
    def __init__(self, session: aiohttp.ClientSession, budgets: Budgets, resolver: GuardedResolver,
                 http: dict[str, Any], rng: random.Random | None = None,
                 on_head_lies: Callable[[str, str], None] | None = None) -> None:
        self.session = session
        self.budgets = budgets
        self.resolver = resolver
        self.http = http
        self.rng = rng or random.Random()
        self.head_trust: dict[str, HeadTrust] = {}
        self._on_head_lies = on_head_lies

    @property
    def head_untrusted(self) -> list[str]:
        """Hosts whose HEAD 404s turned out false this run."""
        return sorted(h for h, t in self.head_trust.items() if t.lying)

    async def fetch(self, url: str, temp_dir: Path | str, stem: str, parsed: URL | None = None) -> FetchResult:
        """Try `url` once (with its bounded retries); never raises for network or HTTP trouble.
        `parsed`: the caller's URL(url) already, so a row's URL is parsed once."""
        state = FetchResult("failed", url)
        try:
            target = self._parse(url, parsed)
            if self._trust(target.host or "").lying:
                get_from, confirming = target, None
            else:
                get_from, confirming = await self._chain("HEAD", target, state, self._after_head)
            await self._chain("GET", get_from, state,
                              lambda r, u: self._body(r, u, state, temp_dir, stem, confirming))
        except _Done as done:
            done.result.requests = state.requests
            return done.result
        raise AssertionError("unreachable: the GET chain always ends in _Done")

    def _trust(self, host: str) -> HeadTrust:
        trust = self.head_trust.get(host)
        if trust is None:
            trust = self.head_trust[host] = HeadTrust()
        return trust

    # -- steps ------------------------------------------------------------------------------------
    def _parse(self, url: str, parsed: URL | None = None) -> URL:
        u = parsed if parsed is not None else parse_url(url)
        if u is None or u.scheme not in ("http", "https") or not u.host or u.port is None:
            raise _Done(FetchResult("failed", str(url), "bad_url"))
        try:
            self.resolver.check_literal(u.host, u.port)
        except BlockedAddress:
            raise _Done(FetchResult("failed", url, "blocked_address")) from None
        return u

    async def _after_head(self, resp: aiohttp.ClientResponse, url: URL) -> tuple[URL, str | None]:
        """Where GET goes next (the URL HEAD ended on, after its redirects), and the host whose
        HEAD 404 that GET confirms, if it does."""
        if resp.status == 200 or resp.status in (405, 501):
            return url, None
        if resp.status in HARD_404:
            host = url.host or ""
            trust = self._trust(host)
            trust.seen += 1
            every = self.http["head_404_recheck_every"]
            if trust.lying or trust.confirmed < self.http["head_404_confirm"] or (every and trust.seen % every == 0):
                return url, host
        raise _Done(self._classify(resp, url))

    async def _body(self, resp: aiohttp.ClientResponse, url: URL, state: FetchResult,
                    temp_dir: Path | str, stem: str, confirming: str | None = None) -> None:
        if confirming is not None:
            trust = self._trust(confirming)
            if resp.status in HARD_404:
                trust.confirmed += 1
            elif resp.status == 200 and not trust.lying:
                trust.lying = True
                if self._on_head_lies is not None:
                    self._on_head_lies(confirming, str(url))
        if resp.status != 200:
            raise _Done(self._classify(resp, url))
        ctype = resp.headers.get("Content-Type", "")
        max_bytes = self.http["max_bytes"]
        if resp.content_length is not None and resp.content_length > max_bytes:
            raise _Done(FetchResult("failed", str(url), "too_large", 200))
        temp = await TempFile(temp_dir, stem, self.http["buffer_bytes"]).open()
        ext = None
        head = tail = b""
        try:
            async for chunk in resp.content.iter_chunked(self.http["chunk_bytes"]):
                if ext is None:
                    head += chunk
                    if len(head) >= media.SNIFF_BYTES or not chunk:
                        ext = self._check_image(head, ctype, url)
                if temp.size + len(chunk) > max_bytes:
                    raise _Done(FetchResult("failed", str(url), "too_large", 200))
                await temp.write(chunk)
                tail = (tail + chunk)[-media.TAIL_BYTES:] if len(chunk) < media.TAIL_BYTES else chunk[-media.TAIL_BYTES:]
            if ext is None:
                ext = self._check_image(head, ctype, url)
            if resp.content_length is not None and temp.size < resp.content_length:
                raise _Done(FetchResult("transient", str(url), "truncated", 200))
            await temp.close()
            # A body that ends early with no length to check it by (HTTP/1.0, or `Connection:
            # close` without Content-Length) looks complete to HTTP: the format's end says. A
            # framed body (Content-Length, which is checked above, or chunked, whose end aiohttp
            # checks) is what the server holds: an image with bytes after its end marker (some
            # writers append data) is stored, not refetched as `truncated` on every run.
            framed = (resp.content_length is not None
                      or "chunked" in resp.headers.get("Transfer-Encoding", "").lower())
            if not framed and not await self._complete(temp, ext, head, tail):
                raise _Done(FetchResult("transient", str(url), "truncated", 200))
        except BaseException:
            await temp.discard()
            raise
        raise _Done(FetchResult("fetched", str(url), None, 200, temp=temp, ext=ext,
                                content_type=media.media_type(ctype) or media.KINDS[ext][0]))

    @staticmethod
    async def _complete(temp: TempFile, ext: str, head: bytes, tail: bytes) -> bool:
        def check() -> bool:
            return media.looks_complete(ext, head, tail, temp.size, temp.read_range)
        return await asyncio.to_thread(check) if temp.on_disk and ext == ".tif" else check()

    def _check_image(self, head: bytes, ctype: str, url: URL) -> str:
        ext = media.sniff(head)
        if ext is None or not media.agrees(ctype, ext):
            raise _Done(FetchResult("failed", str(url), "not_an_image", 200))
        return ext

    def _classify(self, resp: aiohttp.ClientResponse, url: URL) -> FetchResult:
        s = resp.status
        if s in HARD_404:
            return FetchResult("hard_404", str(url), None, s, blocked_by=blocked_by(resp.headers.get("Link")))
        if s >= 500:
            return FetchResult("transient", str(url), f"http_{s}", s)
        return FetchResult("failed", str(url), f"http_{s}", s)

    # -- the request chain -----------------------------------------------------------------------
    async def _chain(self, method: str, url: URL, state: FetchResult,
                     on_final: Callable[[aiohttp.ClientResponse, URL], Awaitable[Any]]) -> Any:
        """Follow redirects hop by hop (each under its host's budget); hand the final response on."""
        seen = {str(url)}
        for _hop in range(self.http["max_redirects"] + 1):
            outcome = await self._send(method, url, state, on_final)
            if not isinstance(outcome, URL):
                return outcome[1]
            if str(outcome) in seen:
                raise _Done(FetchResult("failed", str(url), "redirect_loop"))
            seen.add(str(outcome))
            url = self._parse(str(outcome))
        raise _Done(FetchResult("failed", str(url), "too_many_redirects"))

    async def _send(self, method: str, url: URL, state: FetchResult,
                    on_final: Callable[[aiohttp.ClientResponse, URL], Awaitable[Any]]) -> URL | tuple[None, Any]:
        """One hop, with the 429/503 retries; returns the redirect target or (None, on_final's value)."""
        budget = self.budgets.for_host(url.host or "")
        for attempt in range(self.http["max_retries"] + 1):
            own_wait = 0.0
            try:
                async with budget.request():
                    state.requests += 1
                    try:
                        async with self.session.request(method, url, allow_redirects=False) as resp:
                            self._breaker(budget, resp.status)
                            if resp.status in REDIRECTS and resp.headers.get("Location"):
                                try:
                                    return url.join(URL(resp.headers["Location"]))
                                except ValueError:
                                    raise _Done(FetchResult("failed", str(url), "bad_redirect", resp.status)) from None
                            if resp.status not in RETRYABLE:
                                return None, await on_final(resp, url)
                            own_wait = self._retry_wait(budget, resp, attempt, url)
                    except (_Done, BudgetPaused):
                        raise
                    except Exception as exc:
                        raise _Done(self._network_outcome(exc, url)) from None
            except BudgetPaused as paused:
                # The row is not tried: its budget rests longer than a run waits. Left as it was.
                raise _Done(FetchResult("deferred", str(url), "budget_paused", retry_in_s=paused.seconds)) from None
            if own_wait > 0:
                await asyncio.sleep(own_wait)
        raise AssertionError("unreachable: the last retry raises from _retry_wait")

    def _retry_wait(self, budget: Budget, resp: aiohttp.ClientResponse, attempt: int, url: URL) -> float:
        """Pause the budget or pick this URL's own wait for a 429/503; raise when retrying is over."""
        loop_now = asyncio.get_running_loop().time()
        delay = parse_retry_after(resp.headers.get("Retry-After"), resp.headers.get("Date"),
                                  self.http["retry_after_max_s"])
        named = delay is not None
        if delay is None:
            cap = min(self.http["backoff_max_s"], self.http["backoff_base_s"] * 2 ** attempt)
            delay = self.rng.uniform(0, cap)
        if named or resp.status == 429:
            # The whole budget waits, even when this row gives up: no request under it starts
            # before the time the server named (CONTRACT §3).
            budget.pause_until(loop_now + delay, f"http_{resp.status}")
            own = 0.0
        else:
            own = delay
        if delay > self.http["max_wait_s"]:
            raise _Done(FetchResult("transient", str(url), f"http_{resp.status}", resp.status, retry_in_s=delay))
        if attempt >= self.http["max_retries"]:
            raise _Done(FetchResult("transient", str(url), f"http_{resp.status}", resp.status,
                                    retry_in_s=delay if named else None))
        return own

    def _breaker(self, budget: Budget, status: int) -> None:
        if status in (403, 429):
            budget.consecutive_refusals += 1
            if budget.consecutive_refusals >= self.http["breaker_threshold"]:
                budget.consecutive_refusals = 0
                now = asyncio.get_running_loop().time()
                budget.pause_until(now + self.http["breaker_pause_s"], "breaker")
        else:
            budget.consecutive_refusals = 0

    @staticmethod
    def _network_outcome(exc: BaseException, url: URL) -> FetchResult:
        u = str(url)
        if isinstance(exc, aiohttp.ClientConnectorError):
            cause = exc.os_error
            if isinstance(cause, BlockedAddress) or isinstance(exc.__cause__, BlockedAddress):
                return FetchResult("failed", u, "blocked_address")
            if isinstance(exc, aiohttp.ClientConnectorCertificateError) or isinstance(exc, aiohttp.ClientSSLError):
                return FetchResult("failed", u, "tls_error")
            if isinstance(exc, aiohttp.ClientConnectorDNSError):
                return FetchResult("transient", u, "dns")
            if isinstance(cause, ConnectionRefusedError):
                return FetchResult("transient", u, "connection_refused")
            return FetchResult("transient", u, "connect_error")
        if isinstance(exc, TimeoutError):
            return FetchResult("transient", u, "timeout")
        if isinstance(exc, aiohttp.ClientPayloadError):
            return FetchResult("transient", u, "truncated")
        if isinstance(exc, (aiohttp.ServerDisconnectedError, aiohttp.ClientOSError, ConnectionResetError)):
            return FetchResult("transient", u, "connection_reset")
        if isinstance(exc, aiohttp.InvalidURL):
            return FetchResult("failed", u, "bad_url")
        if isinstance(exc, aiohttp.ClientResponseError):
            return FetchResult("failed", u, "bad_response")
        if isinstance(exc, aiohttp.ClientError):
            return FetchResult("transient", u, type(exc).__name__)
        raise exc
