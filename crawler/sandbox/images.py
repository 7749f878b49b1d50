"""Tiny valid images made in code, for the upstream simulator and tests.

Contract: every function ``fmt(seed, size)`` returns bytes that

* start with the format's real magic bytes and decode as a 1x1 (or small) image,
* differ for each ``seed`` (so their sha256 differs), and
* are about ``size`` bytes long (never much shorter than the format's minimum).

The bulk is seeded random padding inside a place each format's readers skip:
a private PNG chunk, JPEG COM segments, GIF comment blocks, a WebP unknown chunk,
unreferenced bytes before the TIFF IFD, an SVG comment.
"""

from __future__ import annotations

import random
import struct
import zlib

__all__ = ["png", "jpeg", "gif", "webp", "tiff", "svg", "MAKERS"]

# A 1x1 grey baseline JPEG (made once with Pillow, quality 50); seeded COM segments go after SOI.
_JPEG_1X1 = bytes.fromhex(
    "ffd8ffe000104a46494600010100000100010000ffdb004300100b0c0e0c0a100e0d0e1211"
    "101318281a181616183123251d283a333d3c3933383740485c4e404457453738506d51575f"
    "626768673e4d71797064785c656763ffc0000b080001000101011100ffc4001f0000010501"
    "010101010100000000000000000102030405060708090a0bffc400b5100002010303020403"
    "050504040000017d01020300041105122131410613516107227114328191a1082342b1c115"
    "52d1f02433627282090a161718191a25262728292a3435363738393a434445464748494a53"
    "5455565758595a636465666768696a737475767778797a838485868788898a929394959697"
    "98999aa2a3a4a5a6a7a8a9aab2b3b4b5b6b7b8b9bac2c3c4c5c6c7c8c9cad2d3d4d5d6d7d8"
    "d9dae1e2e3e4e5e6e7e8e9eaf1f2f3f4f5f6f7f8f9faffda0008010100003f002bffd9"
)
# A lossless 1x1 VP8L bitstream (Pillow); wrapped in the extended (VP8X) layout so padding may follow.
_VP8L_1X1 = bytes.fromhex("2f000000000710058cfe0722a2ff01")


def _pad(seed: int, n: int) -> bytes:
    """Seeded filler; the seed is spelled out first so even n=0-ish outputs differ per seed."""
    head = f"seed={seed};".encode()
    return head + random.Random(seed).randbytes(max(0, n - len(head)))


def _text_pad(seed: int, n: int) -> bytes:
    """Seeded printable (hex) filler, for formats whose padding must be text."""
    head = f"seed={seed};".encode()
    return head + random.Random(seed).randbytes(max(0, n - len(head) + 1) // 2).hex().encode()


def png(seed: int, size: int = 4096) -> bytes:
    """A real 8x8 RGB PNG (zlib + struct) whose colour and private ``paDd`` chunk depend on seed."""

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    rng = random.Random(seed)
    pixel = bytes(rng.randrange(256) for _ in range(3))
    raw = (b"\x00" + pixel * 8) * 8  # filter byte 0 on each of 8 rows
    head = b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", 8, 8, 8, 2, 0, 0, 0))
    idat = chunk(b"IDAT", zlib.compress(raw))
    tail = chunk(b"IEND", b"")
    # "paDd": ancillary, private, safe-to-copy, so decoders skip it.
    pad = chunk(b"paDd", _pad(seed, size - len(head) - len(idat) - len(tail) - 12))
    return head + pad + idat + tail


def jpeg(seed: int, size: int = 4096) -> bytes:
    """A 1x1 baseline JPEG with seeded COM segments (each at most 65533 bytes) after SOI."""
    filler = _pad(seed, size - len(_JPEG_1X1) - 4)
    segments = b"".join(
        b"\xff\xfe" + struct.pack(">H", len(part) + 2) + part
        for part in (filler[i : i + 65533] for i in range(0, len(filler), 65533))
    )
    return _JPEG_1X1[:2] + segments + _JPEG_1X1[2:]


def gif(seed: int, size: int = 2048) -> bytes:
    """A 1x1 GIF89a whose palette colour and comment extension depend on seed."""
    rng = random.Random(seed)
    colour = bytes(rng.randrange(256) for _ in range(3))
    filler = _pad(seed, max(1, size - 40 - size // 255))
    comment = b"\x21\xfe" + b"".join(
        bytes([len(part)]) + part for part in (filler[i : i + 255] for i in range(0, len(filler), 255))
    ) + b"\x00"
    return (
        b"GIF89a\x01\x00\x01\x00\x80\x00\x00" + colour + b"\x00\x00\x00" + comment
        + b",\x00\x00\x00\x00\x01\x00\x01\x00\x00\x02\x02D\x01\x00;"
    )


def webp(seed: int, size: int = 2048) -> bytes:
    """A 1x1 lossless WebP in the extended layout: VP8X, VP8L, then a seeded unknown ``PADx`` chunk."""

    def chunk(kind: bytes, data: bytes) -> bytes:
        return kind + struct.pack("<I", len(data)) + data + (b"\x00" if len(data) % 2 else b"")

    body = chunk(b"VP8X", b"\x00\x00\x00\x00" + b"\x00\x00\x00" * 2) + chunk(b"VP8L", _VP8L_1X1)
    body += chunk(b"PADx", _pad(seed, size - len(body) - 20))
    return b"RIFF" + struct.pack("<I", len(body) + 4) + b"WEBP" + body


def tiff(seed: int, size: int = 2048) -> bytes:
    """A little-endian 1x1 8-bit greyscale TIFF; seeded bytes sit unreferenced before the IFD."""
    filler = _pad(seed, size - 8 - 1 - 2 - 8 * 12 - 4)
    pixel_at = 8 + len(filler)
    ifd_at = pixel_at + 1 + (pixel_at + 1) % 2  # IFDs start on a word boundary
    tags = [(256, 3, 1), (257, 3, 1), (258, 3, 8), (259, 3, 1), (262, 3, 1), (273, 4, pixel_at), (278, 3, 1), (279, 4, 1)]
    ifd = struct.pack("<H", len(tags)) + b"".join(struct.pack("<HHII", t, k, 1, v) for t, k, v in tags) + b"\x00" * 4
    pixel = bytes([random.Random(seed).randrange(256)])
    return b"II*\x00" + struct.pack("<I", ifd_at) + filler + pixel + b"\x00" * (ifd_at - pixel_at - 1) + ifd


def svg(seed: int, size: int = 1024) -> bytes:
    """A small SVG document whose fill colour and comment depend on seed."""
    colour = f"#{random.Random(seed).randrange(1 << 24):06x}"
    head = (
        '<?xml version="1.0" encoding="UTF-8"?>\n'
        '<svg xmlns="http://www.w3.org/2000/svg" width="16" height="16" viewBox="0 0 16 16">\n'
        f'<rect width="16" height="16" fill="{colour}"/>\n<!-- '
    ).encode()
    tail = b" -->\n</svg>\n"
    return head + _text_pad(seed, size - len(head) - len(tail)) + tail


# content type -> maker, for code that picks a format by the Content-Type it will serve.
MAKERS = {
    "image/png": png,
    "image/jpeg": jpeg,
    "image/gif": gif,
    "image/webp": webp,
    "image/tiff": tiff,
    "image/svg+xml": svg,
}
