"""Linux inotify: the three system calls, and the events parsed from a read.

asyncinotify wraps the same calls, but its reader builds a ``Path``, a
``Mask`` enum and an event object for every event, which was about an eighth
of dev-sync's CPU during a burst of saves; and its table of watches forgets
one only when its own reader sees ``IN_IGNORED``, so reading the fd directly
beside it would leak an entry per removed folder. The watcher needs neither:
it keeps its own ``wd -> folder`` map, and reads the fd from the event loop.
"""

from __future__ import annotations

import os
import struct
from collections.abc import Iterator
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import ctypes

__all__ = ["Inotify", "parse"]

_IN_CLOEXEC = os.O_CLOEXEC
_IN_NONBLOCK = os.O_NONBLOCK
_EVENT = struct.Struct("iIII")  # struct inotify_event before its name: wd, mask, cookie, len


def _libc() -> ctypes.CDLL:
    import ctypes  # here, not at import: the watcher module loads on every platform

    libc = ctypes.CDLL(None, use_errno=True)
    libc.inotify_init1.argtypes = [ctypes.c_int]
    libc.inotify_init1.restype = ctypes.c_int
    libc.inotify_add_watch.argtypes = [ctypes.c_int, ctypes.c_char_p, ctypes.c_uint32]
    libc.inotify_add_watch.restype = ctypes.c_int
    libc.inotify_rm_watch.argtypes = [ctypes.c_int, ctypes.c_int]
    libc.inotify_rm_watch.restype = ctypes.c_int
    return libc


def _error(path: str | None = None) -> OSError:
    import ctypes

    code = ctypes.get_errno()
    return OSError(code, os.strerror(code), path)


class Inotify:
    """One inotify instance: a non-blocking, close-on-exec fd."""

    def __init__(self) -> None:
        self._libc = _libc()
        fd = self._libc.inotify_init1(_IN_NONBLOCK | _IN_CLOEXEC)
        if fd < 0:
            raise _error()
        self.fd: int = fd

    def add_watch(self, path: str, mask: int) -> int:
        """Watch ``path`` (or update its watch); the watch descriptor, which is the
        same for a path already watched through the same inode."""
        wd = self._libc.inotify_add_watch(self.fd, os.fsencode(path), mask)
        if wd < 0:
            raise _error(path)
        return int(wd)

    def rm_watch(self, wd: int) -> None:
        """Stop watching; the kernel queues ``IN_IGNORED`` for ``wd``."""
        if self._libc.inotify_rm_watch(self.fd, wd) < 0:
            raise _error()

    def read(self, size: int) -> bytes:
        """Whole events, at most ``size`` bytes of them; BlockingIOError when none."""
        return os.read(self.fd, size)

    def close(self) -> None:
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1


def parse(data: bytes) -> Iterator[tuple[int, int, bytes]]:
    """(wd, mask, name) per event in a read's bytes; ``b""`` when there is no name."""
    size, pos, unpack, head = len(data), 0, _EVENT.unpack_from, _EVENT.size
    while pos < size:
        wd, mask, _cookie, length = unpack(data, pos)
        pos += head
        # The kernel pads the name with NULs, which no file name can hold.
        yield wd, mask, data[pos:pos + length].rstrip(b"\0") if length else b""
        pos += length
