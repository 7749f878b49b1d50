"""What a body is: image formats recognised by their magic bytes, and the extension each gets.

A 200 response is stored only when its first bytes are one of these formats and its
Content-Type does not say otherwise; publishers' soft-404 pages (HTML with status 200) fail here.
"""

from __future__ import annotations

import re

SNIFF_BYTES = 1024  # enough for every signature below, SVG's XML prologue included

_SVG = re.compile(rb"^\s*(<\?xml[^>]*>\s*)?(<!--.*?-->\s*)*(<!DOCTYPE svg[^>]*>\s*)?<svg[\s>]", re.S | re.I)

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


def sniff(head: bytes) -> str | None:
    """The extension for the image format `head` starts with, or None."""
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
    if _SVG.match(head[:SNIFF_BYTES]):
        return ".svg"
    return None


TAIL_BYTES = 64


def looks_complete(ext: str, head: bytes, tail: bytes, size: int) -> bool:
    """Whether a file of this format ends where the format says it ends. A file found at its
    canonical path after a crash or power loss may have been cut short (files are flushed to disk
    per commit, not per file); one that fails this is fetched again rather than adopted. TIFF has
    no end marker, so a TIFF found on disk is never trusted."""
    if ext == ".png":
        return tail.endswith(b"IEND\xaeB`\x82")
    if ext == ".jpg":
        return b"\xff\xd9" in tail  # the end-of-image marker (some writers pad after it)
    if ext == ".gif":
        return tail.rstrip(b"\x00").endswith(b";")
    if ext == ".webp":
        declared = int.from_bytes(head[4:8], "little") + 8
        return size in (declared, declared + 1)
    if ext == ".svg":
        return b"</svg>" in tail.lower()
    return False


def media_type(header: str | None) -> str:
    return (header or "").split(";", 1)[0].strip().lower()


def agrees(content_type: str | None, ext: str) -> bool:
    """Whether a Content-Type header is consistent with the sniffed format."""
    mt = media_type(content_type)
    return mt in NEUTRAL_TYPES or mt in KINDS[ext]
