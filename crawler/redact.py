"""Secrets never leave the process: passwords in DSNs, credentials in URLs.

Everything the tool writes outside the artifacts table (the JSON log, the console, the runs
table and journal of its own schema, the reports) passes what it says about a DSN or a URL
through here first, and the log writer scrubs every event once more (`scrub`), so a secret that
reaches a message some other way (an exception's text) is masked too.
"""

from __future__ import annotations

import re
from urllib.parse import parse_qsl, quote, urlencode, urlsplit, urlunsplit

MASK = "***"
# Query parameters that carry a secret in DSNs and presigned or token URLs.
SECRET_PARAMS = frozenset({
    "password", "passwd", "pass", "pwd", "sslpassword", "secret", "token", "access_token", "api_key", "apikey",
    "key", "sig", "signature", "x-amz-signature", "x-amz-credential", "x-amz-security-token", "auth",
})
# userinfo in any URL-like text: scheme://user:pass@ or scheme://token@ (up to the first / ? # or space).
_USERINFO = re.compile(r"(?P<scheme>[A-Za-z][A-Za-z0-9+.-]{0,30}://)(?P<info>[^/?#\s\"'<>]*)@")
# libpq keyword/value form: password=secret or password='se cret'
_KEYWORD = re.compile(r"(?P<key>\b(?:password|sslpassword)\s*=\s*)(?P<value>'(?:[^'\\]|\\.)*'|\S+)", re.I)


def url(text: object) -> str:
    """A URL with its userinfo and secret query values masked; anything else as text, scrubbed."""
    raw = str(text)
    try:
        parts = urlsplit(raw)
    except ValueError:
        return scrub(raw)
    if not parts.scheme or not parts.netloc:
        return scrub(raw)
    netloc = parts.netloc
    if "@" in netloc:
        netloc = f"{MASK}@{netloc.rpartition('@')[2]}"
    query = parts.query
    if query:
        pairs = parse_qsl(query, keep_blank_values=True)
        if any(k.lower() in SECRET_PARAMS for k, _ in pairs):
            query = urlencode([(k, MASK if k.lower() in SECRET_PARAMS else v) for k, v in pairs], quote_via=quote,
                              safe="*")
    return urlunsplit((parts.scheme, netloc, parts.path, query, parts.fragment))


def dsn(text: str) -> str:
    """A PostgreSQL DSN (URL or keyword/value form) with its password masked."""
    if "://" in text:
        return url(text)
    return _KEYWORD.sub(lambda m: m.group("key") + MASK, text)


def scrub(text: str, known: tuple[str, ...] = ()) -> str:
    """Free text with URL userinfo, keyword passwords and the `known` secrets masked."""
    if "@" in text:
        text = _USERINFO.sub(lambda m: m.group("scheme") + MASK + "@", text)
    if "=" in text:
        text = _KEYWORD.sub(lambda m: m.group("key") + MASK, text)
    for secret in known:
        if secret and secret in text:
            text = text.replace(secret, MASK)
    return text
