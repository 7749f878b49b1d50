"""The benchmark's rows, as plain data (no database, no crawler imports, so the Scrapy process
loads nothing it would not need): which host each row is on and what its URL serves.
"""

from __future__ import annotations

import itertools
from collections.abc import Iterator
from dataclasses import dataclass

FIGURES_PER_PAPER = 5  # figures/papers/<paper_id>/: about five files a folder, as on the platform


@dataclass(frozen=True)
class HostShare:
    """``rows`` rows on ``host``, of which ``images`` serve an image and the rest are 404."""

    host: str
    rows: int
    images: int


def lifted_hosts(count: int) -> list[str]:
    return [f"img{k}.bench.test" for k in range(count)]


def spread(rows: int, hosts: list[str]) -> list[HostShare]:
    """``rows`` rows, every one an image, dealt evenly over ``hosts``."""
    counts = [rows // len(hosts) + (k < rows % len(hosts)) for k in range(len(hosts))]
    return [HostShare(h, n, n) for h, n in zip(hosts, counts)]


def urls(shares: list[HostShare]) -> Iterator[tuple[int, str, str]]:
    """(row number, host, URL) for every row, hosts interleaved as rows of a real table are.

    Within a host the 404s are spread evenly among the images."""
    def kinds(s: HostShare) -> Iterator[tuple[str, str]]:
        for k in range(s.rows):
            yield s.host, "img" if k * s.images // s.rows != (k + 1) * s.images // s.rows else "gone"

    per_host = [kinds(s) for s in shares]
    interleaved = (x for group in itertools.zip_longest(*per_host) for x in group if x is not None)
    for i, (host, kind) in enumerate(interleaved):
        yield i, host, f"http://{host}/{kind}/{i:07d}.png"


def figure_path(i: int) -> str:
    """Where row ``i``'s file goes: the crawler's default template for the fields the bench gives it."""
    return f"figures/papers/PMID-{i // FIGURES_PER_PAPER:07d}/fig-{i:07d}.png"
