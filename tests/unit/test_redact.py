"""Secrets in DSNs and URLs are masked in every form they are written in."""

from __future__ import annotations

import pytest

from crawler import config, redact


@pytest.mark.parametrize("dsn, secret", [
    ("postgresql://u:p@ss-SECRET@db.example.org:5432/x", "p@ss-SECRET"),
    ("postgresql://u:pa/ss?SECRET#x@db.example.org/x", "pa/ss?SECRET#x"),
    ("postgresql://u:p%40SECRET@h/x", "p%40SECRET"),
    ("postgresql://u@h/x?sslmode=require&password=SECRET", "SECRET"),
    ("postgresql:///x?host=/run/pg&PASSWORD=SECRET&user=u", "SECRET"),
    ("host=h dbname=x user=u password=SECRET", "SECRET"),
    ("host=h password='se cret SECRET' dbname=x", "se cret SECRET"),
])
def test_dsn_passwords_are_masked_in_every_form(dsn, secret):
    masked = redact.dsn(dsn)
    assert "SECRET" not in masked and redact.MASK in masked
    assert secret in redact.secrets_in_dsn(dsn)
    assert "SECRET" not in redact.scrub(f"error connecting with {dsn}: refused", redact.secrets_in_dsn(dsn))


def test_the_masked_dsn_still_says_where():
    assert redact.dsn("postgresql://u:p@ss@db.example.org:5432/x") == "postgresql://u:***@db.example.org:5432/x"
    assert redact.dsn("postgresql://u@h/x") == "postgresql://u@h/x"
    assert redact.dsn("") == ""


@pytest.mark.parametrize("url", [
    "http://alice:SECRET@cdn.example.com/x.png",
    "https://SECRET@cdn.example.com/x.png",
    "https://cdn.example.com/x.png?token=SECRET&w=2",
    "https://bucket.s3.amazonaws.com/x.png?X-Amz-Signature=SECRET&X-Amz-Credential=SECRET2",
    "https://alice:s3cr#tSECRET@cdn.example.com/x.png",
    "https://alice:pa/ssSECRET@cdn.example.com/x.png",
    "https://alice:pa?ssSECRET@cdn.example.com/x.png",
])
def test_url_credentials_are_masked(url):
    masked = redact.url(url)
    assert "SECRET" not in masked and "x.png" in masked


def test_free_text_is_scrubbed():
    text = 'GET http://alice:SECRET@cdn.example.com/x.png failed; dsn "postgresql://u:SECRET@h/x"; password=SECRET'
    assert "SECRET" not in redact.scrub(text)
    assert redact.deep({"a": [text, 3, {"b": text}]}, ())["a"][2]["b"] == redact.scrub(text)


def test_config_masks_its_secrets_and_names_them():
    cfg = config.from_tree({"db": {"dsn": "postgresql://u:p@ss-SECRET@h/x"},
                            "s3": {"endpoint_url": "http://key:S3SECRET@127.0.0.1:9000"}})
    assert "SECRET" not in str(cfg.masked())
    assert {"p@ss-SECRET", "S3SECRET"} <= set(cfg.secrets())
