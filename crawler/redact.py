"""Secrets never leave the process: passwords in DSNs, credentials in URLs.

Everything the tool writes outside the artifacts table (the JSON log, the console, the runs
table and journal of its own schema, the reports) passes what it says about a DSN or a URL
through here first, and the log writer scrubs every event once more (`scrub`), so a secret that
reaches a message some other way (an exception's text) is masked too.
"""

from __future__ import annotations

import re
from typing import Any
from urllib.parse import parse_qsl, quote, unquote, urlencode, urlsplit, urlunsplit

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


def url(text: object, bare_user_is_secret: bool = True) -> str:
    """A URL with its userinfo and secret query values masked; anything else as text, scrubbed.
    `user:password@` keeps the user (who, not a secret); a bare `user@` is masked too unless
    told otherwise, as in a URL it is often a token."""
    raw = str(text)
    try:
        parts = urlsplit(raw)
    except ValueError:
        return scrub(raw)
    if not parts.scheme or not parts.netloc:
        return scrub(raw)
    rest = raw.partition("://")[2]
    if "@" not in parts.netloc and "@" in rest:
        # A password holding an unencoded / ? or # ends the authority early for every parser,
        # so its tail reads as a path: mask up to the last @ (too much, at worst; never too little).
        return f"{raw.partition('://')[0]}://{MASK}@{rest.rpartition('@')[2]}"
    netloc = parts.netloc
    if "@" in netloc:
        info, _, host = netloc.rpartition("@")
        user, colon, _ = info.partition(":")
        if colon:
            netloc = f"{user}:{MASK}@{host}"
        elif bare_user_is_secret:
            netloc = f"{MASK}@{host}"
    query = parts.query
    if query:
        pairs = parse_qsl(query, keep_blank_values=True)
        if any(k.lower() in SECRET_PARAMS for k, _ in pairs):
            query = urlencode([(k, MASK if k.lower() in SECRET_PARAMS else v) for k, v in pairs], quote_via=quote,
                              safe="*")
    return urlunsplit((parts.scheme, netloc, parts.path, query, parts.fragment))


def dsn(text: str) -> str:
    """A PostgreSQL DSN (URL or keyword/value form) with its password masked. In the URL form
    the user information ends at the last `@`: a password may hold `@`, `/`, `?` or `#`
    unencoded, and whatever libpq makes of that, none of it is written."""
    if "://" not in text:
        return _KEYWORD.sub(lambda m: m.group("key") + MASK, text)
    scheme, _, rest = text.partition("://")
    if "@" in rest:
        info, _, rest = rest.rpartition("@")
        user, colon, _ = info.partition(":")
        rest = f"{user}:{MASK}@{rest}" if colon else f"{info}@{rest}"
    return url(f"{scheme}://{rest}", bare_user_is_secret=False)


def secrets_in_dsn(text: str) -> tuple[str, ...]:
    """The secret values a DSN or URL holds (its password, secret query values, a keyword-form
    password), each as written and percent-decoded."""
    if not text:
        return ()
    found: list[str] = []
    if "://" in text:
        rest = text.partition("://")[2]
        if "@" in rest:
            info = rest.rpartition("@")[0]
            if ":" in info:
                found.append(info.partition(":")[2])
        query = rest.partition("?")[2]
        for pair in query.split("&"):
            key, eq, value = pair.partition("=")
            if eq and key.lower() in SECRET_PARAMS:
                found.append(value)
    for m in _KEYWORD.finditer(text):
        found.append(m.group("value").strip("'"))
    out = {s for s in found if len(s) >= 3}  # masking "a" everywhere would mangle every line
    out |= {unquote(s) for s in out}
    return tuple(sorted(out, key=len, reverse=True))


def deep(value: Any, known: tuple[str, ...] = ()) -> Any:
    """`scrub` applied to every string inside dicts and lists (a summary, a log event)."""
    if isinstance(value, str):
        return scrub(value, known)
    if isinstance(value, dict):
        out: dict[Any, Any] | None = None
        for k, v in value.items():
            kind = type(v)
            if kind is int or kind is float or kind is bool or v is None:
                continue  # nothing to mask, and most of a log line's values: no call for them
            masked = scrub(v, known) if kind is str else deep(v, known)
            if masked is not v:  # copied only when something was masked: every log line passes here
                out = out if out is not None else dict(value)
                out[k] = masked
        return out if out is not None else value
    if isinstance(value, (list, tuple)):
        items = [deep(v, known) for v in value]
        return items if any(a is not b for a, b in zip(items, value)) else value
    return value


def scrub(text: str, known: tuple[str, ...] = ()) -> str:
    """Free text with URL userinfo, keyword passwords and the `known` secrets masked."""
    if "@" in text and "://" in text:
        text = _USERINFO.sub(lambda m: m.group("scheme") + MASK + "@", text)
    if "=" in text and "ass" in text.lower():  # password=, sslpassword=
        text = _KEYWORD.sub(lambda m: m.group("key") + MASK, text)
    for secret in known:
        if secret and secret in text:
            text = text.replace(secret, MASK)
    return text
