"""Where a request may connect: `http.connect_to` overrides and the private-address policy.

`GuardedResolver` is the aiohttp resolver for every connection the tool makes. For a
"host:port" listed in `http.connect_to` it answers the configured address (curl --connect-to:
the Host header, SNI and certificate check still use the URL's name); otherwise it resolves the
name and, unless `allow_private_addresses`, refuses when any answer is loopback, private,
link-local, multicast, reserved or unspecified. Checking the addresses the socket will actually
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
    ip = ipaddress.ip_address(addr.split("%", 1)[0])
    if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is not None:
        ip = ip.ipv4_mapped
    return (ip.is_private or ip.is_loopback or ip.is_link_local or ip.is_multicast
            or ip.is_reserved or ip.is_unspecified)


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
