"""What a lost row expects to find, and the evidence ladder that decides a bind (CONTRACT.md §1).

Pure functions over in-memory values: no I/O, so every rung is unit-tested directly.

Rungs, strongest first; a row binds on the first rung that holds:
- `certain`: a candidate's sha256 equals the sha256 recorded on the row (whatever its name).
- `high`: a candidate sits at the row's expected path (relative to the root of its location),
  its size matches where one is recorded, and all such candidates hold one content.
- `medium`: exactly one distinct content among candidates with the exact expected basename and an
  extension of the row's type, across every location, and no other row of the type claims it.
- `low`: anything weaker (same stem with another extension, several contents) — never bound
  automatically; an operator may approve one.
A row that records a sha256 binds only to that content. Matching is scoped per artifact type.
"""

from __future__ import annotations

import re
from collections import defaultdict
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import PurePosixPath
from typing import Any

_SHA = re.compile(r"^[0-9a-fA-F]{64}$")
# Where several candidates hold the same content, bind the one easiest to trust and to copy.
LOCATION_PREFERENCE = ("checkout", "worktree", "history", "s3")


def extension_of(name: str, known: Iterable[str]) -> str:
    """The longest known extension `name` ends with (".csv.gz" before ".gz"), else its last suffix."""
    lower = name.lower()
    best = ""
    for ext in known:
        if lower.endswith(ext.lower()) and len(ext) > len(best):
            best = ext.lower()
    return best or PurePosixPath(lower).suffix


def stem_of(name: str, known: Iterable[str]) -> str:
    ext = extension_of(name, known)
    return name[: len(name) - len(ext)] if ext else name


def clean_relative(path: object) -> str | None:
    """A relative, normalised POSIX path inside its root, or None for garbage or escapes."""
    if not isinstance(path, str) or not path.strip() or "\x00" in path:
        return None
    pure = PurePosixPath(path.strip())
    if pure.is_absolute():
        return None
    parts = [p for p in pure.parts if p not in ("", ".")]
    if not parts or ".." in parts:
        return None
    return "/".join(parts)


UNREADABLE_SHA = "unreadable"


def normalise_sha256(value: object) -> str | None:
    """Lower-case hex from forms like "ABC…", " abc… ", "sha256:abc…"; None if not a sha256."""
    if not isinstance(value, str):
        return None
    text = value.strip().lower()
    if text.startswith("sha256:") or text.startswith("sha256="):
        text = text[7:]
    return text if _SHA.match(text) else None


@dataclass(frozen=True)
class TypeRules:
    dirs: tuple[str, ...]
    extensions: tuple[str, ...]
    path: str


@dataclass(frozen=True)
class Expectation:
    artifact_id: str
    artifact_type: str
    basenames: frozenset[str]
    expected_paths: tuple[str, ...]
    extensions: tuple[str, ...]
    sha256: str | None
    size: int | None
    lost_reason: str | None = None
    notes: tuple[str, ...] = ()

    @property
    def stems(self) -> frozenset[str]:
        return frozenset(stem_of(b, self.extensions) for b in self.basenames)


def expect(artifact_id: str, artifact_type: str, metadata: Any, rules: TypeRules,
           ram_only_creators: Iterable[str] = ()) -> Expectation:
    """Read what the row says about its file; garbage values are ignored and noted."""
    meta: Mapping[str, Any] = metadata if isinstance(metadata, Mapping) else {}
    notes: list[str] = [] if isinstance(metadata, Mapping) else ["metadata is not a JSON object"]
    basenames: set[str] = set()
    expected: list[str] = []
    filename = meta.get("filename")
    if filename is not None:
        name = PurePosixPath(str(filename)).name if isinstance(filename, str) else ""
        if name and name not in (".", ".."):
            basenames.add(name)
        else:
            notes.append(f"unusable filename {filename!r}")
    if meta.get("expected_path") is not None:
        rel = clean_relative(meta.get("expected_path"))
        if rel:
            expected.append(rel)
            basenames.add(PurePosixPath(rel).name)
        else:
            notes.append(f"unusable expected_path {meta.get('expected_path')!r}")
    extensions = list(rules.extensions)
    fmt = meta.get("format")
    if isinstance(fmt, str) and fmt.strip():
        ext = "." + fmt.strip().lower().lstrip(".")
        if ext not in extensions:
            extensions.append(ext)
    sha = meta.get("file_sha256")
    sha256 = normalise_sha256(sha)
    if sha not in (None, "") and sha256 is None:
        # A sha256 was recorded but cannot be read: nothing may be bound automatically, since
        # only that content could be the row's file.
        notes.append(f"unusable file_sha256 {sha!r}")
        sha256 = UNREADABLE_SHA
    size = meta.get("file_size_bytes")
    size_ok = size if isinstance(size, int) and not isinstance(size, bool) and size >= 0 else None
    lost = None
    creator = meta.get("created_by")
    if meta.get("storage") == "memory":
        lost = "the object was held in memory only (metadata.storage = memory) and never written to a file"
    elif isinstance(creator, str) and creator in set(ram_only_creators):
        lost = f"its creator {creator} keeps objects in memory and never writes a file"
    return Expectation(artifact_id, artifact_type, frozenset(basenames), tuple(expected), tuple(extensions),
                       sha256, size_ok, lost, tuple(notes))


@dataclass
class Candidate:
    """A file somewhere that might be a row's file. `where` is its bind source."""

    where: str        # "checkout", "worktree:<name>", "history:<commit>", "s3://bucket/key#member"
    kind: str         # one of LOCATION_PREFERENCE
    rel_path: str     # relative to the root of its location (checkout, worktree, tarball tree)
    size: int
    sha256: str | None = None
    handle: Any = None  # how to read it: a Path, a git blob id, a staging Path

    @property
    def ref(self) -> str:
        """The one string naming this candidate, in the inventory and in approvals."""
        return self.where if self.kind == "s3" else f"{self.where}:{self.rel_path}"

    @property
    def basename(self) -> str:
        return PurePosixPath(self.rel_path).name


@dataclass
class Decision:
    status: str                                  # bound | needs_review | unrecoverable | missing
    confidence: str | None = None                # certain | high | medium (or low for review)
    chosen: Candidate | None = None
    evidence: dict[str, str] = field(default_factory=dict)  # candidate ref → rung it reached
    reason: str = ""


def relevant(e: Expectation, c: Candidate) -> str | None:
    """The strongest relation between a row and a candidate, before content is compared."""
    if e.sha256 and c.sha256 == e.sha256:
        return "certain"
    if c.rel_path in e.expected_paths:
        return "high"
    ext = extension_of(c.basename, e.extensions)
    if c.basename in e.basenames:
        # The exact name with an extension the type does not list is still worth a human's look.
        return "medium" if ext in e.extensions else "low"
    if stem_of(c.basename, e.extensions) in e.stems and ext in e.extensions:
        return "low"
    return None


def _prefer(cands: list[Candidate]) -> Candidate:
    return min(cands, key=lambda c: (LOCATION_PREFERENCE.index(c.kind), c.ref))


def decide_all(expectations: list[Expectation], candidates: list[Candidate],
               bound: Iterable[tuple[str, str, str]] = ()) -> dict[str, Decision]:
    """Decide every row at once (claims are judged across the rows of a type).

    `bound`: (artifact_id, type, sha256) of rows that already have their file; their content is
    claimed, so no other row of the type binds to it on a name alone."""
    related: dict[str, list[tuple[str, Candidate]]] = defaultdict(list)
    claims: dict[tuple[str, str], set[str]] = defaultdict(set)  # (type, sha) → rows naming it
    for artifact_id, artifact_type, sha in bound:
        claims[(artifact_type, sha)].add(artifact_id)
    for e in expectations:
        if e.lost_reason:
            continue
        for c in candidates:
            rung = relevant(e, c)
            if rung is not None:
                related[e.artifact_id].append((rung, c))
                if rung in ("certain", "high", "medium") and c.sha256:
                    claims[(e.artifact_type, c.sha256)].add(e.artifact_id)
    return {e.artifact_id: decide(e, related[e.artifact_id], claims) for e in expectations}


def decide(e: Expectation, related: list[tuple[str, Candidate]],
           claims: Mapping[tuple[str, str], set[str]]) -> Decision:
    if e.lost_reason:
        return Decision("unrecoverable", reason=e.lost_reason)
    evidence = {c.ref: rung for rung, c in related}
    if not related:
        return Decision("missing", evidence=evidence)
    by_rung: dict[str, list[Candidate]] = defaultdict(list)
    for rung, c in related:
        by_rung[rung].append(c)
    if by_rung["certain"]:
        return Decision("bound", "certain", _prefer(by_rung["certain"]), evidence)
    if e.sha256 == UNREADABLE_SHA:
        return Decision("needs_review", "low", evidence=evidence,
                        reason="the row records a file_sha256 that cannot be read, so nothing binds without a human")
    if e.sha256:
        return Decision("needs_review", "low", evidence=evidence,
                        reason="candidates exist, but none has the sha256 recorded on the row")
    high = [c for c in by_rung["high"] if e.size is None or c.size == e.size]
    if high and len({c.sha256 for c in high}) == 1 and high[0].sha256:
        return Decision("bound", "high", _prefer(high), evidence)
    medium = [c for c in by_rung["medium"] + by_rung["high"] if e.size is None or c.size == e.size]
    contents = {c.sha256 for c in medium}
    if medium and len(contents) == 1 and medium[0].sha256:
        claimers = claims.get((e.artifact_type, medium[0].sha256), set())
        if claimers <= {e.artifact_id}:
            return Decision("bound", "medium", _prefer(medium), evidence)
        return Decision("needs_review", "low", evidence=evidence,
                        reason=f"the one matching content is also claimed by {', '.join(sorted(claimers - {e.artifact_id}))}")
    if len(contents) > 1:
        reason = f"{len(contents)} different contents carry the expected name"
    elif by_rung["high"] or by_rung["medium"]:
        reason = "a file with the expected name has a size other than the one recorded"
    else:
        reason = "only files with the same stem and another extension"
    return Decision("needs_review", "low", evidence=evidence, reason=reason)


def approve(e: Expectation, related: list[tuple[str, Candidate]], ref: str) -> Decision | None:
    """An operator's approval of one candidate by its ref; None if the row has no such candidate.

    Even an approval cannot bind a content other than a sha256 recorded on the row."""
    for _rung, c in related:
        if c.ref == ref and (e.sha256 is None or c.sha256 == e.sha256):
            return Decision("bound", "medium", c, {c.ref: "approved"}, reason="approved by an operator")
    return None
