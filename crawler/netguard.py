"""Where a request may connect: `http.connect_to` overrides and the private-address policy.

`GuardedResolver` is the aiohttp resolver for every connection the tool makes. For a
"host:port" listed in `http.connect_to` it answers the configured address (curl --connect-to:
the Host header, SNI and certificate check still use the URL's name); otherwise it resolves the
name and, unless `allow_private_addresses`, refuses when any answer is not a globally routable
unicast address (loopback, private, link-local, shared, reserved, multicast, unspecified...). Checking the addresses the socket will actually
use (not a separate lookup beforehand) leaves no window for DNS rebinding.

aiohttp does not consult the resolver for IP literals, so `check_literal` covers those.
"""

from __future__ import annotations

import ipaddress
import socket

from aiohttp.abc import AbstractResolver, ResolveResult
from aiohttp.resolver import ThreadedResolver


class BlockedAddress(OSError):
    """The URL's host is, or resolves to, an address the policy refuses."""


def is_blocked_ip(addr: str) -> bool:
    """Whether an address is anything but a globally routable unicast one: loopback, private,
    link-local, shared (100.64.0.0/10), documentation, benchmarking, reserved, multicast,
    unspecified, and IPv6 forms that carry such an IPv4 address inside (mapped, 6to4, Teredo)."""
    ip = ipaddress.ip_address(addr.split("%", 1)[0])
    looked_at: list[ipaddress.IPv4Address | ipaddress.IPv6Address] = [ip]
    if isinstance(ip, ipaddress.IPv6Address):
        looked_at += [a for a in (ip.ipv4_mapped, ip.sixtofour, *(ip.teredo or ())) if a is not None]
    return any(not a.is_global or a.is_private or a.is_loopback or a.is_link_local or a.is_multicast
               or a.is_reserved or a.is_unspecified for a in looked_at)


def _split_hostport(text: str) -> tuple[str, int]:
    host, _, port = text.rpartition(":")
    return host.strip("[]").lower(), int(port)


def parse_connect_to(table: dict[str, str]) -> dict[tuple[str, int], tuple[str, int]]:
    return {_split_hostport(src): _split_hostport(dst) for src, dst in table.items()}


class GuardedResolver(AbstractResolver):
    def __init__(self, connect_to: dict[str, str], allow_private: bool) -> None:
        self.connect_to = parse_connect_to(connect_to)
        self.allow_private = allow_private
        self._dns = ThreadedResolver()

    def is_overridden(self, host: str, port: int) -> bool:
        return (host.lower(), port) in self.connect_to

    def check_literal(self, host: str, port: int) -> None:
        """Raise BlockedAddress if `host` is an IP literal the policy refuses."""
        if self.allow_private or self.is_overridden(host, port):
            return
        try:
            blocked = is_blocked_ip(host.strip("[]"))
        except ValueError:
            return  # a name, not a literal: the resolver decides
        if blocked:
            raise BlockedAddress(f"{host} is a loopback/private/link-local address")

    async def resolve(self, host: str, port: int = 0,
                      family: socket.AddressFamily = socket.AF_INET) -> list[ResolveResult]:
        target = self.connect_to.get((host.lower(), port))
        if target is not None:
            addr, tport = target
            fam = socket.AF_INET6 if ":" in addr else socket.AF_INET
            return [ResolveResult(hostname=host, host=addr, port=tport, family=fam, proto=0,
                                  flags=socket.AI_NUMERICHOST | socket.AI_NUMERICSERV)]
        answers = await self._dns.resolve(host, port, family)
        if not self.allow_private:
            for answer in answers:
                if is_blocked_ip(answer["host"]):
                    raise BlockedAddress(f"{host} resolves to {answer['host']}, a loopback/private/link-local address")
        return answers

    async def close(self) -> None:
        await self._dns.close()
