"""Every check on response bytes is linear in the bytes it looks at and looks at a bounded part.

A check that backtracks runs on the event loop: budgets, timeouts and signal handlers stop with
it, and every later run freezes on the same row. The hostile inputs run in a child process so a
check that never returns fails this test instead of hanging the suite.
"""

from __future__ import annotations

import json
import random
import subprocess
import sys

from crawler import media
from crawler.fetcher import blocked_by, parse_retry_after
from crawler.sandbox import images

# Generous: each call takes microseconds; the backtracking SVG pattern took days on the first.
PER_CALL_S = 1.0
CHILD_S = 60.0

HOSTILE = {
    "svg_nested_comments": b"<!---->" * 40 + b"x",
    "svg_many_comments_then_no_svg": b"<!-- a -->" * 200,
    "svg_open_comment": b"<!--" + b"-" * 5000,
    "svg_xml_no_end": b"<?xml" + b" " * 5000,
    "svg_doctype_no_end": b"<!DOCTYPE svg" + b"[" * 5000,
    "svg_spaces": b" " * 100_000 + b"<svg>",
    "svg_comment_spaces": (b"<!--" + b" " * 50 + b"-->" + b" " * 50) * 100 + b"<svg>",
    "long_random": random.Random(1).randbytes(1 << 20),
}

CHILD = r"""
import json, sys, time
from crawler import media
from crawler.fetcher import blocked_by, parse_retry_after
inputs = {k: bytes.fromhex(v) for k, v in json.loads(sys.stdin.read()).items()}
worst = {}
for name, data in inputs.items():
    calls = [
        lambda: media.sniff(data),
        lambda: [media.looks_complete(e, data[:media.SNIFF_BYTES], data[-media.TAIL_BYTES:], len(data),
                                      lambda off, n: data[off:off + n]) for e in media.EXTENSIONS],
        lambda: blocked_by(data[:8000].decode("latin-1")),
        lambda: parse_retry_after(data[:8000].decode("latin-1"), data[:200].decode("latin-1")),
    ]
    for i, call in enumerate(calls):
        t0 = time.perf_counter()
        call()
        worst[f"{name}#{i}"] = time.perf_counter() - t0
print(json.dumps(worst))
"""


def test_hostile_bodies_and_headers_are_checked_in_bounded_time():
    link_hostile = {"link_many_lt": b"<" * 8000, "link_semicolons": b"<x>" + b";" * 8000,
                    "link_no_rel": (b"<a>; " + b"x" * 50 + b",") * 150}
    payload = json.dumps({k: v.hex() for k, v in {**HOSTILE, **link_hostile}.items()})
    try:
        proc = subprocess.run([sys.executable, "-c", CHILD], input=payload, capture_output=True, text=True,
                              timeout=CHILD_S)
    except subprocess.TimeoutExpired:
        raise AssertionError(f"a check on hostile bytes did not return within {CHILD_S:.0f} s") from None
    assert proc.returncode == 0, proc.stderr
    worst = json.loads(proc.stdout)
    slow = {k: round(v, 3) for k, v in worst.items() if v > PER_CALL_S}
    assert not slow, f"checks slower than {PER_CALL_S} s a call: {slow}"


def test_sniff_looks_only_at_a_bounded_prefix():
    rng = random.Random(7)
    bodies = [maker(seed) for maker in images.MAKERS.values() for seed in range(3)]
    bodies += [rng.randbytes(rng.randrange(0, 3000)) for _ in range(300)]
    bodies += [b"<!-- c -->" * rng.randrange(0, 200) + b"<svg>" for _ in range(50)]
    for body in bodies:
        tail = rng.randbytes(rng.randrange(0, 4000))
        assert media.sniff(body + tail) == media.sniff((body + tail)[:media.SNIFF_BYTES])


def test_svg_forms_still_recognised():
    for head in (b'<svg xmlns="http://www.w3.org/2000/svg">', b"\n  <svg>",
                 b'<?xml version="1.0"?>\n<!-- made by hand -->\n<!DOCTYPE svg PUBLIC "-//W3C//DTD SVG 1.1//EN">\n<SVG\n>',
                 b"\xef\xbb\xbf<?xml version='1.0'?><svg>", b"<!-- a --><!-- b --><svg "):
        assert media.sniff(head) == ".svg", head
    for head in (b"<svgx>", b"<!-- <svg> -->", b"<html><svg>", b"<!-- open <svg>", b"<?xml <svg>"[:5]):
        assert media.sniff(head) is None, head


def test_random_bytes_never_raise():
    rng = random.Random(11)
    for _ in range(2000):
        data = rng.randbytes(rng.randrange(0, 200))
        for prefix in (b"", b"II*\x00", b"MM\x00*", b"RIFF", b"<svg", b"\x89PNG\r\n\x1a\n"):
            body = prefix + data
            media.sniff(body)
            for ext in media.EXTENSIONS:
                media.looks_complete(ext, body[:1024], body[-64:], len(body), lambda off, n: body[off:off + n])
        text = data.decode("latin-1")
        blocked_by(text)
        parse_retry_after(text, text)
