"""Work a run attempted but could not record: the difference between exit 0 and exit 3.

A commit that failed, a file left out of its commit, a row the database refused, a bind that
failed, a source that could not be read: each is said where it happens (an error line in the
log) and noted here, grouped by what and why, so the summary can list it and the run can end
`finished_with_errors` with exit 3 instead of a false `finished`.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

IDS_PER_GROUP = 20   # artifact ids named per (what, why); the count covers the rest
MAX_GROUPS = 100     # distinct reasons kept; beyond this they are counted under "other"


@dataclass
class Unrecorded:
    groups: dict[tuple[str, str], dict[str, Any]] = field(default_factory=dict)

    def add(self, what: str, why: str, artifact_ids: list[str] | tuple[str, ...] = (), count: int | None = None,
            source: str | None = None) -> None:
        """`what`: commit, database, bind, source. `count`: rows or files concerned (default: the ids)."""
        key = (what, why if len(self.groups) < MAX_GROUPS or (what, why) in self.groups else "other reasons")
        group = self.groups.get(key)
        if group is None:
            group = self.groups[key] = {"what": what, "why": key[1], "count": 0, "artifact_ids": []}
            if source is not None:
                group["source"] = source
        group["count"] += len(artifact_ids) if count is None else count
        room = IDS_PER_GROUP - len(group["artifact_ids"])
        if room > 0:
            group["artifact_ids"].extend(artifact_ids[:room])

    def __bool__(self) -> bool:
        return bool(self.groups)

    def as_list(self) -> list[dict[str, Any]]:
        return list(self.groups.values())
