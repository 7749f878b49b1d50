"""C library calls the Python standard library lacks. glibc on Linux; elsewhere they are absent
and callers fall back."""

from __future__ import annotations

import ctypes
import ctypes.util
import os


def _load() -> ctypes.CDLL | None:
    try:
        return ctypes.CDLL(ctypes.util.find_library("c") or None, use_errno=True)
    except OSError:
        return None


_LIBC = _load()


def syncfs(fd: int) -> bool:
    """Flush the file system holding `fd`; False when this system has no syncfs."""
    if _LIBC is None or not hasattr(_LIBC, "syncfs"):
        return False
    if _LIBC.syncfs(fd) != 0:
        err = ctypes.get_errno()
        raise OSError(err, os.strerror(err))
    return True


def malloc_trim() -> None:
    """Return memory the allocator holds but no longer uses to the system (no-op elsewhere)."""
    if _LIBC is not None and hasattr(_LIBC, "malloc_trim"):
        _LIBC.malloc_trim(0)
