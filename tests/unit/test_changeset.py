"""crawler/changeset.py: the file (append, resume, a line cut short, garbage) and the values."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from crawler.changeset import ChangesetError, ChangesetFile, before_after, bumped, differs, same
from crawler.db import Change


def line(rid: str) -> dict:
    return {"artifact_id": rid, "before": {"metadata": {"k": None}}, "after": {"metadata": {"k": 1}}}


def test_lines_are_appended_and_held_across_opens(tmp_path: Path) -> None:
    path = tmp_path / "c.jsonl"
    first = ChangesetFile(path)
    assert not first.holds("a")
    first.append([line("a"), line("b")])
    with pytest.raises(ChangesetError, match="another run is writing"):
        ChangesetFile(path)  # two runs on one changeset would both fetch every row
    assert ChangesetFile(path, repair=False).lines == 2  # reading it is fine
    first.release()
    again = ChangesetFile(path)
    assert again.holds("a") and again.holds("b") and not again.holds("c") and again.lines == 2
    assert [e["artifact_id"] for e in again.entries()] == ["a", "b"]


def test_a_line_cut_short_by_a_crash_is_dropped_on_reopen(tmp_path: Path) -> None:
    path = tmp_path / "c.jsonl"
    first = ChangesetFile(path)
    first.append([line("a")])
    first.release()
    with open(path, "ab") as fh:
        fh.write(b'{"artifact_id": "b", "bef')  # the crash
    reader = ChangesetFile(path, repair=False)  # apply (and a plan) only read: the file is left alone
    assert [e["artifact_id"] for e in reader.entries()] == ["a"] and path.read_bytes().endswith(b"bef")
    writer = ChangesetFile(path)
    assert not writer.holds("b") and path.read_bytes().endswith(b"}\n")
    writer.append([line("b")])
    assert [e["artifact_id"] for e in ChangesetFile(path, repair=False).entries()] == ["a", "b"]


@pytest.mark.parametrize("text, says", [
    ("not json\n", "not JSON"),
    ('{"artifact_id": 1, "before": {}, "after": {}}\n', "not a changeset line"),
    ('{"artifact_id": "a", "before": {"x": 1}, "after": {}}\n', "only file_path and metadata"),
    ('{"artifact_id": "a", "before": {"metadata": {"k": null}}, "after": {"metadata": {"j": 1}}}\n', "different"),
    ('{"artifact_id": "a", "before": {"file_path": 3}, "after": {"file_path": "x"}}\n', "not text"),
])
def test_garbage_is_one_line_naming_file_and_line(tmp_path: Path, text: str, says: str) -> None:
    path = tmp_path / "c.jsonl"
    path.write_text(json.dumps(line("ok")) + "\n" + text)
    with pytest.raises(ChangesetError, match=says) as exc:
        ChangesetFile(path)
    assert str(path) in str(exc.value) and "line 2" in str(exc.value) and "\n" not in str(exc.value)


def test_before_and_after_as_the_database_computes_them() -> None:
    change = Change("a", "fetched", patch={"file_sha256": "ab", "note": None}, file_path="f/a.png",
                    bump_key="image_fetch_attempts")
    before, after = before_after(None, {"image_fetch_attempts": 2.7, "other": 1, "note": "x"}, change)
    assert before == {"file_path": None, "metadata": {"file_sha256": None, "note": "x", "image_fetch_attempts": 2.7}}
    assert after == {"file_path": "f/a.png", "metadata": {"file_sha256": "ab", "note": None, "image_fetch_attempts": 3}}
    assert before_after(None, ["not", "an", "object"], change) is None
    no_path = before_after("kept", {}, Change("a", "transient", patch={"k": 1}))
    assert no_path == ({"metadata": {"k": None}}, {"metadata": {"k": 1}})


@pytest.mark.parametrize("old, new", [(None, 1), (0, 1), (4, 5), (2.9, 3), ("7", 1), (True, 1), (-1, 1),
                                      (1e19, 1), (float("nan"), 1), ([1], 1)])
def test_a_garbage_counter_restarts_at_one(old: object, new: int) -> None:
    assert bumped(old) == new


def test_differs_tells_true_from_one_and_absent_from_present() -> None:
    assert same(1, 1.0) and not same(True, 1) and not same({"a": True}, {"a": 1})
    assert differs(None, {"k": 1}, {"metadata": {"k": 1, "gone": None}}) == []
    assert differs("x", {"k": True}, {"file_path": "y", "metadata": {"k": 1}}) == ["file_path", "metadata.k"]


def test_a_write_that_fails_half_way_leaves_no_fragment(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A full disk mid-line: the file is cut back to its last whole line, so the batch the
    sink sends again follows a whole line and the file stays readable."""
    import errno
    import os as os_module
    path = tmp_path / "c.jsonl"
    file = ChangesetFile(path)
    file.append([line("a")])
    real_write = os_module.write
    calls = {"n": 0}

    def short_then_full(fd: int, data: bytes) -> int:
        calls["n"] += 1
        if calls["n"] == 1:
            return real_write(fd, bytes(data[:7]))
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr("crawler.changeset.os.write", short_then_full)
    with pytest.raises(OSError):
        file.append([line("b")])
    monkeypatch.setattr("crawler.changeset.os.write", real_write)
    file.append([line("b")])
    file.release()
    assert [e["artifact_id"] for e in ChangesetFile(path, repair=False).entries()] == ["a", "b"]
