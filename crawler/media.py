"""What a body is: image formats recognised by their magic bytes, and the extension each gets.

A 200 response is stored only when its first bytes are one of these formats and its
Content-Type does not say otherwise; publishers' soft-404 pages (HTML with status 200) fail here.

Every check here runs on bytes a server sent, on the event loop: each is a plain scan, linear in
the bytes it looks at, and looks only at a bounded part of the body (SNIFF_BYTES at the start,
TAIL_BYTES at the end, and for TIFF the directory and tables its header points to). No regular
expression: a pattern that backtracks turns a few hundred hostile bytes into days of CPU.
"""

from __future__ import annotations

import struct
from collections.abc import Callable

SNIFF_BYTES = 1024  # enough for every signature below, SVG's XML prologue included
TAIL_BYTES = 64     # where each format's end marker must be
# A TIFF whose first directory lists more strips or tiles than this is not checked (and so not
# taken as complete): reading its tables would be unbounded.
TIFF_MAX_STRIPS = 1 << 16

# (extension, content types that agree with it)
KINDS = {
    ".png": ("image/png",),
    ".jpg": ("image/jpeg", "image/jpg", "image/pjpeg"),
    ".gif": ("image/gif",),
    ".tif": ("image/tiff",),
    ".webp": ("image/webp",),
    ".svg": ("image/svg+xml",),
}
EXTENSIONS = tuple(KINDS)
# Content types some servers send for any binary; the magic bytes decide then.
NEUTRAL_TYPES = ("", "application/octet-stream", "binary/octet-stream", "application/x-download")

Reader = Callable[[int, int], bytes]  # (offset, length) -> at most that many bytes of the body


def sniff(head: bytes) -> str | None:
    """The extension for the image format `head` starts with, or None. Only the first
    SNIFF_BYTES are looked at."""
    head = head[:SNIFF_BYTES]
    if head.startswith(b"\x89PNG\r\n\x1a\n"):
        return ".png"
    if head.startswith(b"\xff\xd8\xff"):
        return ".jpg"
    if head.startswith((b"GIF87a", b"GIF89a")):
        return ".gif"
    if head.startswith((b"II*\x00", b"MM\x00*")):
        return ".tif"
    if len(head) >= 12 and head.startswith(b"RIFF") and head[8:12] == b"WEBP":
        return ".webp"
    if _is_svg(head):
        return ".svg"
    return None


_SPACE = b" \t\r\n\f\v"


def _skip_space(text: bytes, i: int) -> int:
    n = len(text)
    while i < n and text[i] in _SPACE:
        i += 1
    return i


def _is_svg(text: bytes) -> bool:
    """Whether `text` is an SVG document's start: an optional BOM and XML declaration, then
    comments and an SVG doctype in any order, then `<svg` followed by a space or `>`.
    Each step moves forward and each search starts where the last ended: one pass."""
    i = _skip_space(text, 3 if text.startswith(b"\xef\xbb\xbf") else 0)
    if text.startswith(b"<?xml", i):
        end = text.find(b"?>", i + 5)
        if end < 0:
            return False
        i = _skip_space(text, end + 2)
    while True:
        if text.startswith(b"<!--", i):
            end = text.find(b"-->", i + 4)
            if end < 0:
                return False
            i = _skip_space(text, end + 3)
        elif text[i:i + 13].lower() == b"<!doctype svg":
            end = text.find(b">", i + 13)
            if end < 0:
                return False
            i = _skip_space(text, end + 1)
        else:
            break
    return text[i:i + 4].lower() == b"<svg" and len(text) > i + 4 and text[i + 4] in _SPACE + b">"


def looks_complete(ext: str, head: bytes, tail: bytes, size: int, read: Reader | None = None) -> bool:
    """Whether a body of this format ends where the format says it ends: a close-delimited
    response cut short, or a file found at its canonical path after a crash or power loss (files
    are flushed to disk per commit, not per file), must not be taken for the image. `head` and
    `tail` are the first and last bytes (at least SNIFF_BYTES and TAIL_BYTES of them where the
    body is that long). TIFF has no end marker: it is complete when everything its first
    directory points to lies inside the body, which needs `read`; without it a TIFF is never
    taken as complete."""
    tail = tail[-TAIL_BYTES:]
    if ext == ".png":
        return tail.endswith(b"IEND\xaeB`\x82")
    if ext == ".jpg":
        return b"\xff\xd9" in tail  # the end-of-image marker (some writers pad after it)
    if ext == ".gif":
        return tail.rstrip(b"\x00").endswith(b";")
    if ext == ".webp":
        if len(head) < 8:
            return False
        declared = int.from_bytes(head[4:8], "little") + 8
        return size in (declared, declared + 1)
    if ext == ".svg":
        return b"</svg>" in tail.lower()
    if ext == ".tif":
        return read is not None and _tiff_complete(head, size, read)
    return False


# TIFF field types and their sizes in bytes (TIFF 6.0, plus IFD = 13); others are skipped.
_TIFF_TYPE_SIZE = {1: 1, 2: 1, 3: 2, 4: 4, 5: 8, 6: 1, 7: 1, 8: 2, 9: 4, 10: 8, 11: 4, 12: 8, 13: 4}
_STRIP_OFFSETS, _STRIP_COUNTS, _TILE_OFFSETS, _TILE_COUNTS = 273, 279, 324, 325


def _tiff_complete(head: bytes, size: int, read: Reader) -> bool:
    """Every byte the first image directory names (the directory itself, values stored out of
    line, and every strip or tile of image data) lies within `size`. Reads the directory and the
    two offset/count tables only: bounded by TIFF_MAX_STRIPS."""
    if len(head) < 8 or head[:4] not in (b"II*\x00", b"MM\x00*"):
        return False
    order = "<" if head[:2] == b"II" else ">"
    (ifd,) = struct.unpack(order + "I", head[4:8])
    if ifd < 8 or ifd + 2 > size:
        return False
    raw = read(ifd, 2)
    if len(raw) < 2:
        return False
    (count,) = struct.unpack(order + "H", raw)
    end = ifd + 2 + 12 * count + 4
    if count == 0 or end > size:
        return False
    table = read(ifd + 2, 12 * count)
    if len(table) < 12 * count:
        return False
    arrays: dict[int, tuple[int, int, int]] = {}  # tag -> (type, count, value field as offset or inline)
    for k in range(count):
        tag, kind, n, value = struct.unpack(order + "HHII", table[12 * k:12 * k + 12])
        width = _TIFF_TYPE_SIZE.get(kind)
        if width is None:
            continue
        if n * width > 4 and value + n * width > size:
            return False  # a value stored beyond the end
        if tag in (_STRIP_OFFSETS, _STRIP_COUNTS, _TILE_OFFSETS, _TILE_COUNTS):
            arrays[tag] = (kind, n, value)
    for offsets_tag, counts_tag in ((_STRIP_OFFSETS, _STRIP_COUNTS), (_TILE_OFFSETS, _TILE_COUNTS)):
        if offsets_tag in arrays and counts_tag in arrays:
            offsets = _tiff_values(order, arrays[offsets_tag], read)
            counts = _tiff_values(order, arrays[counts_tag], read)
            if offsets is None or counts is None or len(offsets) != len(counts):
                return False
            return all(o + c <= size for o, c in zip(offsets, counts))
    return False  # no image data named: nothing to say it is all there


def _tiff_values(order: str, field: tuple[int, int, int], read: Reader) -> list[int] | None:
    """The SHORT or LONG values of one offset/count field, from inline or out of line."""
    kind, n, value = field
    if kind not in (3, 4) or n < 1 or n > TIFF_MAX_STRIPS:
        return None
    width = 2 if kind == 3 else 4
    if n * width <= 4:
        raw = struct.pack(order + "I", value)[: n * width]
    else:
        raw = read(value, n * width)
        if len(raw) < n * width:
            return None
    return list(struct.unpack(f"{order}{n}{'H' if kind == 3 else 'I'}", raw))


def media_type(header: str | None) -> str:
    return (header or "").split(";", 1)[0].strip().lower()


def agrees(content_type: str | None, ext: str) -> bool:
    """Whether a Content-Type header is consistent with the sniffed format."""
    mt = media_type(content_type)
    return mt in NEUTRAL_TYPES or mt in KINDS[ext]
