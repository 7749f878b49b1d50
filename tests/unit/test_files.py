"""File-system steps on a real temporary directory."""

from crawler import files


async def test_look_finds_recorded_files_and_the_first_candidate_on_disk(tmp_path):
    (tmp_path / "a").mkdir()
    (tmp_path / "a" / "x.jpg").write_bytes(b"x")
    (tmp_path / "a" / "dir.png").mkdir()  # a folder under a candidate's name is not a file
    (tmp_path / "rec.png").write_bytes(b"r")
    (tmp_path / "a" / "link.gif").symlink_to(tmp_path / "rec.png")  # a link is never taken for a file
    present, found = await files.look(tmp_path, [
        ("rec.png", ["a/dir.png", "a/link.gif", "a/x.jpg"]),
        ("missing.png", ["gone/x.png", "gone/x.jpg"]),
        (None, []),
        ("a/link.gif", ["x" * 300 + ".png"]),  # a name the system refuses to look at: absent
    ])
    assert present == [True, False, False, False]
    assert found == ["a/x.jpg", None, None, None]


async def test_sync_to_disk_flushes_each_file_system_once(tmp_path, monkeypatch):
    (tmp_path / "sub").mkdir()
    flushed = []
    real = files._syncfs
    monkeypatch.setattr(files, "_syncfs", lambda path: (flushed.append(path), real(path)))
    await files.sync_to_disk([tmp_path, tmp_path / "sub"])  # one file system: one real syncfs
    assert flushed == [tmp_path]


def test_the_cli_puts_every_thread_on_one_malloc_arena_before_anything_else(monkeypatch):
    import platform

    import pytest

    from crawler import cli, native
    assert native.one_malloc_arena() is (platform.libc_ver()[0] == "glibc")
    calls = []
    monkeypatch.setattr(native, "one_malloc_arena", lambda: calls.append("arena") or True)
    with pytest.raises(SystemExit):
        cli.main(["--help"])
    assert calls == ["arena"]
