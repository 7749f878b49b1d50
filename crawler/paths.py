"""Canonical paths: where a fetched file lives under the artifacts root.

`artifacts.figure_path` is a template over the row's fields; a field the row lacks renders as
`unknown`. Each field is made safe for one path segment, and the final path is refused if it is
absolute or would leave the root once normalised (`..`, symlinks already on disk). A site may name
its own `module:function` in `artifacts.path_resolver`; it receives the same fields and its
answer passes the same checks.
"""

from __future__ import annotations

import functools
import hashlib
import importlib
import os
import re
import string
from collections.abc import Callable, Mapping
from pathlib import Path, PurePosixPath

FIELDS = ("artifact_id", "paper_id", "pmcid", "figure_label", "ext")
_UNSAFE = re.compile(r"[^A-Za-z0-9._+-]+")


class PathError(ValueError):
    """The canonical path would be unsafe (absolute, escaping the root) or cannot be built."""


def safe_segment(value: object) -> str:
    """A value made fit for one path segment: no separators, no leading dots, never empty."""
    text = _UNSAFE.sub("_", str(value)).strip("._")
    return text[:120] or "unknown"


def unique_segment(value: object) -> str:
    """Like safe_segment, but one-to-one: a value that had to be altered (or shortened) gets a
    short hash of the original, so "fig/1" and "fig_1" never share a file."""
    text = str(value)
    safe = safe_segment(text)
    if safe == text:
        return safe
    return f"{safe[:100]}-{hashlib.sha256(text.encode('utf-8', 'surrogatepass')).hexdigest()[:10]}"


Resolver = Callable[[Mapping[str, str]], str]


def template_resolver(template: str) -> Resolver:
    names = {f for _, f, _, _ in string.Formatter().parse(template) if f}
    unknown = names - set(FIELDS)
    if unknown:
        raise PathError(f"artifacts.figure_path uses unknown field {{{sorted(unknown)[0]}}}")

    def resolve(fields: Mapping[str, str]) -> str:
        return template.format(**{k: fields[k] for k in names})

    return resolve


def load_resolver(template: str, dotted: str) -> Resolver:
    if not dotted:
        return template_resolver(template)
    module, _, func = dotted.partition(":")
    try:
        return getattr(importlib.import_module(module), func)
    except (ImportError, AttributeError) as exc:
        raise PathError(f"artifacts.path_resolver {dotted!r} cannot be loaded: {exc}") from None


def figure_fields(artifact_id: str, metadata: Mapping[str, object], ext: str) -> dict[str, str]:
    def field(key: str) -> str:
        value = metadata.get(key)
        return safe_segment(value) if value not in (None, "") else "unknown"

    return {"artifact_id": unique_segment(artifact_id), "paper_id": field("paper_id"),
            "pmcid": field("pmcid"), "figure_label": field("figure_label"), "ext": ext}


def contain(root: Path, relative: str) -> str:
    """`relative` normalised, checked to stay inside `root`; returns the clean relative path."""
    if not isinstance(relative, str) or not relative or "\x00" in relative:
        raise PathError(f"empty or invalid path {relative!r}")
    pure = PurePosixPath(relative)
    if pure.is_absolute() or os.path.isabs(relative):
        raise PathError(f"absolute path {relative!r}")
    norm = os.path.normpath(relative)
    if norm == "." or norm.startswith(".."):
        raise PathError(f"path {relative!r} leaves the artifacts root")
    if norm.split(os.sep)[0] == ".git":
        raise PathError(f"path {relative!r} is inside .git")
    if any(len(part.encode("utf-8", "surrogateescape")) > 255 for part in norm.split(os.sep)):
        raise PathError(f"path {relative[:80]!r}... has a name longer than 255 bytes")
    # Symlinks already on disk could still lead out: compare the resolved parent with the root.
    if not _parent_inside(str(root), os.path.dirname(norm)):
        raise PathError(f"path {relative!r} leaves the artifacts root through a link")
    return norm


def recorded(root: Path, value: object) -> str | None:
    """A row's recorded `file_path` as a clean path inside `root`, or None when it cannot name a
    file there (not text, absolute, `..`, through a link leading out). A path outside the root
    never counts as the row's file: `/etc/hosts` is present on every machine."""
    if not isinstance(value, str) or not value:
        return None
    try:
        return contain(root, value)
    except PathError:
        return None


def contain_all(root: Path, relatives: list[str]) -> list[str]:
    """`contain` for several paths. Siblings (one folder, plain file names: a row's candidates
    for each extension) are checked through the first one alone: the folder is what could
    leave the root, and a plain name cannot."""
    if not relatives:
        return []
    first = contain(root, relatives[0])
    folder, _, _ = relatives[0].rpartition("/")
    first_folder, slash, _ = first.rpartition("/")
    out = [first]
    for rel in relatives[1:]:
        if not isinstance(rel, str) or rel.startswith("/"):
            out.append(contain(root, rel))  # refused there, with its own message
            continue
        parent, _, name = rel.rpartition("/")
        plain = (name not in ("", ".", "..") and "\x00" not in name and len(name.encode("utf-8", "surrogateescape")) <= 255
                 and not (not slash and name == ".git"))  # judged where the first one landed
        if parent == folder and plain:
            out.append(f"{first_folder}/{name}" if slash else name)
        else:
            out.append(contain(root, rel))
    return out


@functools.lru_cache(maxsize=1024)
def _parent_inside(root: str, parent: str) -> bool:
    """Whether root/parent resolves inside root. Cached: rows share directories (a paper's
    figures come one after the other), and resolving costs a system call per path component;
    a small cache, as a million rows fill any size and its entries (~330 B) are memory that grows. (A link planted mid-run is caught by the rename,
    which never follows a link out of an existing directory it did not resolve.)"""
    real_root = os.path.realpath(root)
    real_parent = os.path.realpath(os.path.join(real_root, parent))
    return real_parent == real_root or real_parent.startswith(real_root + os.sep)
