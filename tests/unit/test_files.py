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


def test_stale_parts_of_live_or_other_machines_processes_are_kept(tmp_path):
    """Cooperating processes write `.part` files in the same folders: a start removes only its
    own machine's dead processes' leftovers, and anyone's older than a day."""
    import os
    import subprocess
    import sys

    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    dead_pid = int(dead.stdout)
    me = files._MACHINE
    names = {
        "mine_alive": f".crawler-a@{me}@{os.getpid()}@1.part",
        "mine_dead": f".crawler-b@{me}@{dead_pid}@2.part",
        "other_machine": f".crawler-c@elsewhere@{dead_pid}@3.part",
        "other_machine_old": f".crawler-d@elsewhere@{dead_pid}@4.part",
        "old_form_recent": f".crawler-e-{dead_pid}-5.part",
        "not_a_part": "keep.png",
    }
    for name in names.values():
        (tmp_path / name).write_bytes(b"x")
    old = (tmp_path / names["other_machine_old"]).stat().st_mtime - files.STALE_PART_AGE_S - 10
    os.utime(tmp_path / names["other_machine_old"], (old, old))
    assert files.remove_stale_parts(tmp_path) == 2
    left = {p.name for p in tmp_path.iterdir()}
    assert left == {names[k] for k in ("mine_alive", "other_machine", "old_form_recent", "not_a_part")}


def test_part_names_say_their_machine_and_process(tmp_path):
    import os
    t = files.TempFile(tmp_path, "stem")
    assert t.name.startswith(".crawler-stem@") and f"@{os.getpid()}@" in t.name and t.name.endswith(".part")


def test_placers_hand_back_results_and_errors_on_each_loop_and_outlive_a_cancelled_wait(tmp_path):
    import asyncio
    import threading

    placers = files.Placers(2)
    gate = threading.Event()

    def blocked() -> str:
        gate.wait(30)
        return "placed"

    def fails() -> None:
        raise OSError(28, "No space left on device")

    async def first_loop() -> None:
        troubles: list[dict] = []
        asyncio.get_running_loop().set_exception_handler(lambda loop, context: troubles.append(context))
        assert await placers.run(lambda: 41 + 1) == 42
        try:
            await placers.run(fails)
        except OSError as exc:
            assert exc.errno == 28
        else:
            raise AssertionError("the thread's error reaches the awaiting task")
        # A stop cancels a task waiting on its file: the placement goes on, the thread lives.
        waiting = asyncio.ensure_future(placers.run(blocked))
        await asyncio.sleep(0)
        waiting.cancel()
        gate.set()
        assert await placers.run(lambda: "next") == "next"
        # StopIteration cannot be set on a future: it arrives as a RuntimeError, never a hang.
        try:
            await placers.run(lambda: next(iter(())))
        except RuntimeError as exc:
            assert "StopIteration" in str(exc)
        else:
            raise AssertionError("StopIteration reaches the awaiting task as RuntimeError")
        await asyncio.sleep(0)
        assert troubles == [], "a result for a wait that was cancelled is dropped quietly"

    asyncio.run(first_loop())
    # A second event loop (the next run in one process) is served by the same threads.
    assert asyncio.run(_placed(placers, tmp_path)) == b"body"


async def _placed(placers, tmp_path):
    target = tmp_path / "f.bin"
    await placers.run(lambda: target.write_bytes(b"body"))
    return target.read_bytes()


def test_placers_finish_what_was_handed_over_before_the_process_exits(tmp_path):
    """At exit (atexit: files._PLACERS.drain) the placements already queued are done, as an
    executor's are: a file placed but not committed is adopted by the next run."""
    import asyncio
    import threading

    placers = files.Placers(1)
    slow = threading.Event()
    targets = [tmp_path / f"f{k}" for k in range(5)]

    async def hand_over() -> None:
        placers.run(lambda: slow.wait(30))  # the thread is busy; the five below wait in the queue
        for t in targets:
            placers.run(lambda t=t: t.write_bytes(b"x"))

    asyncio.run(hand_over())  # the loop is gone before any of them is done
    slow.set()
    placers.drain()
    assert all(t.read_bytes() == b"x" for t in targets)
    assert asyncio.run(_placed(placers, tmp_path)) == b"body", "a later run starts threads afresh"
