"""The inotify binding against the real kernel interface."""

from __future__ import annotations

import errno
import os
import select
import sys
from pathlib import Path

import pytest

from dev_sync import inotify, watcher

pytestmark = pytest.mark.skipif(not sys.platform.startswith("linux"), reason="inotify is Linux")


def read_all(ino: inotify.Inotify) -> list[tuple[int, int, bytes]]:
    select.select([ino.fd], [], [], 5)
    events: list[tuple[int, int, bytes]] = []
    while True:
        try:
            events.extend(inotify.parse(ino.read(1 << 16)))
        except BlockingIOError:
            return events


def test_events_name_the_files_byte_for_byte(tmp_path: Path) -> None:
    ino = inotify.Inotify()
    try:
        wd = ino.add_watch(str(tmp_path), watcher.WATCH_MASK)
        # Names of several lengths: the kernel pads each to its own size.
        names = [b"plain", b"a" * 255, b"\xff\xfe not utf-8", b"-e", b"x"]
        for name in names:
            fd = os.open(os.path.join(os.fsencode(tmp_path), name), os.O_WRONLY | os.O_CREAT)
            os.close(fd)
        events = read_all(ino)
        closed = [name for got_wd, mask, name in events
                  if got_wd == wd and mask & watcher.IN_CLOSE_WRITE]
        assert closed == names
    finally:
        ino.close()


def test_a_removed_watch_says_so_and_the_fd_is_nonblocking(tmp_path: Path) -> None:
    ino = inotify.Inotify()
    try:
        with pytest.raises(BlockingIOError):
            ino.read(1 << 16)
        wd = ino.add_watch(str(tmp_path), watcher.WATCH_MASK)
        assert ino.add_watch(str(tmp_path), watcher.WATCH_MASK) == wd  # same inode, same wd
        ino.rm_watch(wd)
        assert [(w, m & watcher.IN_IGNORED, n) for w, m, n in read_all(ino)] == [
            (wd, watcher.IN_IGNORED, b"")]
        with pytest.raises(OSError) as info:
            ino.rm_watch(wd)
        assert info.value.errno == errno.EINVAL
    finally:
        ino.close()


def test_a_missing_path_raises_with_the_path(tmp_path: Path) -> None:
    ino = inotify.Inotify()
    try:
        with pytest.raises(FileNotFoundError) as info:
            ino.add_watch(str(tmp_path / "missing"), watcher.WATCH_MASK)
        assert info.value.filename == str(tmp_path / "missing")
    finally:
        ino.close()
    ino.close()  # idempotent
    assert ino.fd == -1


def test_the_fd_is_not_inherited(tmp_path: Path) -> None:
    ino = inotify.Inotify()
    try:
        assert not os.get_inheritable(ino.fd)
    finally:
        ino.close()
