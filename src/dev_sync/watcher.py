"""Turning local file-system changes into dirty paths.

The watcher's only job is to name what needs syncing; rsync works out the
content. That lets it be cheap and conservative: a directory that appears is
reported once as a whole subtree (rsync recurses), and anything that might have
been missed (a queue overflow, the watch limit) is reported as "reconcile
everything" rather than silently lost.

Two backends share one :class:`Sink`:

* :class:`InotifyWatcher` (Linux, the default there): our own recursive watcher
  on :mod:`dev_sync.inotify`, one watch per *non-excluded* directory. The walk prunes the
  ignore rules before a watch is placed, so a 100k-file ``node_modules`` costs no
  watches, and the inotify fd is read by the event loop, so idling costs nothing.
  watchfiles and watchdog cannot do either (see ``notes/python-stack.md``, section 1).
* :class:`WatchfilesWatcher` (macOS and anything else): watchfiles' Rust core,
  with the rules applied after the fact.

Paths handed to the sink are POSIX paths relative to the root, decoded with
:func:`os.fsdecode`, so any byte string a file name can hold (newlines, invalid
UTF-8) survives the round trip through :func:`os.fsencode` unchanged.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import errno
import logging
import os
import stat
import sys
import threading
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Literal, Protocol, TypeAlias

from dev_sync import inotify

if TYPE_CHECKING:
    from watchfiles._rust_notify import RustNotify

    from dev_sync.ignore import RuleSet

__all__ = [
    "Backend",
    "InotifyWatcher",
    "Sink",
    "Watcher",
    "WatchfilesWatcher",
    "make_watcher",
]

log = logging.getLogger(__name__)

Backend: TypeAlias = Literal["auto", "inotify", "watchfiles"]

WATCH_LIMIT_FIX = (
    "sudo sysctl fs.inotify.max_user_watches=524288 (and add it to /etc/sysctl.d/ to keep it)"
)
INSTANCE_LIMIT_FIX = (
    "sudo sysctl fs.inotify.max_user_instances=1024 (and add it to /etc/sysctl.d/ to keep it)"
)
OVERFLOW_REASON = "inotify event queue overflowed"
ROOT_GONE_REASON = "the local root was removed or moved"


class Sink(Protocol):
    """Where a watcher reports; the engine implements it."""

    def changed(self, rel: str, recursive: bool) -> None:
        """``rel`` needs syncing (created, modified, deleted, chmod-ed, moved in or out).

        ``recursive`` is true when a directory appeared (created or moved in):
        its whole subtree must be re-sent, because files created in it before its
        watch landed produced no event of their own. It is also true when a
        directory was deleted or moved out: its remote copy is a subtree to clear.
        """

    def rescan(self, reason: str) -> None:
        """Events were lost (queue overflow, root moved): reconcile everything."""

    def degraded(self, cause: str, fix: str) -> None:
        """Not everything can be watched (watch or instance limit): fall back to polling."""

    def rules_changed(self, rel: str) -> None:
        """A ``.gitignore`` was created, modified or deleted: the rules must be rebuilt."""


class Watcher(Protocol):
    """What the engine drives; :func:`make_watcher` picks the implementation."""

    @property
    def watched_dirs(self) -> int:
        """How many directories are under watch (the non-excluded ones)."""

    async def start(self) -> None:
        """Walk the tree and place the watches; every later change is reported."""

    async def run(self) -> None:
        """Read events and call the sink until cancelled or closed."""

    def close(self) -> None:
        """Release the OS resources; idempotent."""

    def set_rules(self, rules: RuleSet) -> None:
        """Adopt new rules: watch newly included directories, drop newly excluded ones."""


def make_watcher(root: Path, rules: RuleSet, sink: Sink, backend: Backend = "auto") -> Watcher:
    """Build the watcher for this platform: inotify on Linux, watchfiles elsewhere."""
    if backend == "auto":
        backend = "inotify" if sys.platform.startswith("linux") else "watchfiles"
    if backend == "inotify":
        return InotifyWatcher(root, rules, sink)
    if backend == "watchfiles":
        return WatchfilesWatcher(root, rules, sink)
    raise ValueError(f"unknown watcher backend {backend!r}")


# -- shared helpers ------------------------------------------------------------


def _join(parent: str, name: str) -> str:
    return f"{parent}/{name}" if parent else name


def _abs(root: Path, rel: str) -> str:
    return os.path.join(root, rel) if rel else str(root)


def walk_tree(
    root: Path,
    rules: RuleSet,
    top: str = "",
    on_rule_file: Callable[[str], None] | None = None,
) -> Iterator[str]:
    """Yield ``top`` and every non-excluded directory below it, top-down.

    Unlike :func:`dev_sync.ignore.walk_dirs`, a directory is listed only *after*
    the caller has had it back (the generator lists it when resumed). The inotify
    watcher places the watch in between, which closes the race where a
    subdirectory created between "list" and "watch" would be neither seen by the
    walk nor reported by the watch (``mkdir -p a/b/c`` racing our walk).

    Each directory's ``.gitignore`` is loaded into ``rules`` before its children
    are judged; ``on_rule_file`` hears about every ``.gitignore`` found. Symlinks
    are never followed, and directories that vanish or cannot be read are
    skipped: whatever happened to them produces its own events.
    """
    stack = [top]
    while stack:
        rel = stack.pop()
        yield rel
        try:
            rules.load_dir(rel, included=rel != top)
        except OSError as exc:  # a .gitignore that vanished or cannot be read
            log.debug("cannot load rules of %r: %s", rel, exc)
        children: list[str] = []
        try:
            with os.scandir(_abs(root, rel)) as entries:
                for entry in entries:
                    child = _join(rel, entry.name)
                    try:
                        is_dir = entry.is_dir(follow_symlinks=False)
                    except OSError:
                        continue
                    if is_dir:
                        children.append(child)
                    elif on_rule_file is not None and rules.is_rule_file(child):
                        on_rule_file(child)
        except OSError as exc:
            log.debug("cannot list %r: %s", rel, exc)
            continue
        for child in sorted(children, reverse=True):
            if not rules.is_excluded_child(child, True):
                stack.append(child)


def _read_sysctl(name: str) -> str:
    try:
        return Path("/proc/sys/fs/inotify", name).read_text().strip()
    except OSError:
        return "unknown"


def _watch_limit_cause(need: int) -> str:
    limit = _read_sysctl("max_user_watches")
    return f"inotify watch limit reached (fs.inotify.max_user_watches = {limit}, need about {need})"


def _count_all_dirs(root: Path) -> int:
    """All directories under ``root``, excluded ones too (what a recursive OS watch needs)."""
    return 1 + sum(len(dirs) for _, dirs, _ in os.walk(root))


# -- inotify backend -----------------------------------------------------------

# Values from <sys/inotify.h>; they are kernel ABI.
IN_ATTRIB = 0x00000004
IN_CLOSE_WRITE = 0x00000008
IN_MOVED_FROM = 0x00000040
IN_MOVED_TO = 0x00000080
IN_CREATE = 0x00000100
IN_DELETE = 0x00000200
IN_DELETE_SELF = 0x00000400
IN_MOVE_SELF = 0x00000800
IN_UNMOUNT = 0x00002000
IN_Q_OVERFLOW = 0x00004000
IN_IGNORED = 0x00008000
IN_ONLYDIR = 0x01000000
IN_DONT_FOLLOW = 0x02000000
IN_EXCL_UNLINK = 0x04000000
IN_ISDIR = 0x40000000

WATCH_MASK = (
    IN_CREATE
    | IN_CLOSE_WRITE
    | IN_DELETE
    | IN_MOVED_FROM
    | IN_MOVED_TO
    | IN_ATTRIB
    | IN_DELETE_SELF
    | IN_MOVE_SELF
    | IN_ONLYDIR
    | IN_EXCL_UNLINK
)
"""No MODIFY: a file being written is reported once, at CLOSE_WRITE, not per write(2)."""

_FILE_EVENTS = IN_CLOSE_WRITE | IN_ATTRIB | IN_DELETE | IN_MOVED_FROM | IN_MOVED_TO
_READ_SIZE = 1 << 16  # a few thousand events per read(2)


class InotifyWatcher:
    """Recursive inotify watcher with pruning.

    Keeps a ``wd -> directory`` map (and the reverse), updated when a
    directory is renamed; the map is what lets a moved subtree's watches be
    dropped by path. A directory rename is handled as "old path deleted, new
    path appeared": the old subtree's watches are removed at MOVED_FROM and the
    new location is walked (with the rules, which may differ there) at MOVED_TO.

    The fd is read from an event-loop reader callback, one buffer of events per
    call for as long as it stays readable, so there are no timers and no
    wake-ups while nothing changes.
    """

    def __init__(self, root: Path, rules: RuleSet, sink: Sink) -> None:
        self._root = Path(os.path.abspath(root))
        self._rules = rules
        self._sink = sink
        self._inotify: inotify.Inotify | None = None
        self._wd_rel: dict[int, str] = {}
        self._rel_wd: dict[str, int] = {}
        self._limit_reported = False
        self._closed = False
        self._loop: asyncio.AbstractEventLoop | None = None
        self._reading = False
        self._done: asyncio.Future[None] | None = None

    @property
    def watched_dirs(self) -> int:
        """Directories currently watched (one inotify watch each)."""
        return len(self._rel_wd)

    async def start(self) -> None:
        """Create the inotify instance and watch every non-excluded directory.

        Limits are reported through :meth:`Sink.degraded`, never raised: with
        fewer watches (or none) the engine falls back to periodic reconciles.
        """
        if self._closed or self._inotify is not None:
            raise RuntimeError("watcher is closed or already started")
        try:
            self._inotify = inotify.Inotify()
        except OSError as exc:
            if exc.errno not in (errno.EMFILE, errno.ENFILE, errno.ENOMEM):
                raise
            self._sink.degraded(*_instance_limit_problem(exc))
            return
        self._watch_tree("")

    async def run(self) -> None:
        """Dispatch events until cancelled or :meth:`close` is called."""
        if self._closed:
            return
        loop = asyncio.get_running_loop()
        done: asyncio.Future[None] = loop.create_future()
        self._loop, self._done = loop, done
        if self._inotify is not None:
            # Events that arrived since start() are queued: the fd is readable,
            # so the reader runs at once.
            loop.add_reader(self._inotify.fd, self._on_readable)
            self._reading = True
        try:
            await done
        finally:
            self._stop_reading()
            self._done = None

    def close(self) -> None:
        """Stop reading, end :meth:`run`, and close the inotify fd. Idempotent."""
        if self._closed:
            return
        self._closed = True
        self._stop_reading()
        if self._done is not None and not self._done.done():
            self._done.set_result(None)
        if self._inotify is not None:
            self._inotify.close()
        self._wd_rel.clear()
        self._rel_wd.clear()

    def set_rules(self, rules: RuleSet) -> None:
        """Adopt new rules and bring the watch set in line with them.

        Newly included directories get watches, newly excluded ones lose them.
        Nothing is reported: a rules change already makes the engine reconcile.
        """
        self._rules = rules
        if self._inotify is not None and not self._closed:
            self._resync()

    # -- watch bookkeeping -------------------------------------------------------

    def _watch_tree(self, top: str, on_rule_file: Callable[[str], None] | None = None) -> set[str]:
        """Watch ``top`` and its non-excluded subdirectories; return the watched ones."""
        watched: set[str] = set()
        failed = 0
        for rel in walk_tree(self._root, self._rules, top, on_rule_file):
            result = self._watch_dir(rel)
            if result is True:
                watched.add(rel)
            elif result is None:
                failed += 1
        if failed and not self._limit_reported:
            self._limit_reported = True
            self._sink.degraded(_watch_limit_cause(self.watched_dirs + failed), WATCH_LIMIT_FIX)
        return watched

    def _watch_dir(self, rel: str) -> bool | None:
        """Add (or refresh) the watch of one directory.

        Returns True when watched, False when the directory is gone or unreadable
        (its disappearance is reported by its parent), None at the watch limit.
        """
        assert self._inotify is not None
        # Below the root, never follow a symlink: a directory swapped for a link
        # between our listing and this call must not pull an outside tree in.
        # (The root itself may be a symlink the user chose.)
        mask = WATCH_MASK if not rel else WATCH_MASK | IN_DONT_FOLLOW
        try:
            wd = self._inotify.add_watch(_abs(self._root, rel), mask)
        except OSError as exc:
            if exc.errno in (errno.ENOSPC, errno.ENOMEM):
                return None
            log.debug("cannot watch %r: %s", rel, exc)
            return False
        # Same inode seen under a new path (a move whose events are still
        # queued): the wd now belongs to the new path only.
        old_rel = self._wd_rel.get(wd)
        if old_rel is not None and old_rel != rel and self._rel_wd.get(old_rel) == wd:
            del self._rel_wd[old_rel]
        # The path now holds another directory than the one we watched there.
        old_wd = self._rel_wd.get(rel)
        if old_wd is not None and old_wd != wd:
            self._wd_rel.pop(old_wd, None)
        self._wd_rel[wd] = rel
        self._rel_wd[rel] = wd
        return True

    def _unwatch(self, rel: str) -> None:
        wd = self._rel_wd.pop(rel, None)
        if wd is None:
            return
        self._wd_rel.pop(wd, None)
        if self._inotify is not None:
            with contextlib.suppress(OSError):  # already gone with its directory
                self._inotify.rm_watch(wd)

    def _unwatch_subtree(self, rel: str) -> None:
        prefix = rel + "/"
        for sub in [r for r in self._rel_wd if r == rel or r.startswith(prefix)]:
            self._unwatch(sub)

    def _forget_wd(self, wd: int) -> None:
        rel = self._wd_rel.pop(wd, None)
        if rel is not None and self._rel_wd.get(rel) == wd:
            del self._rel_wd[rel]

    def _resync(self) -> None:
        """Re-walk everything: watch what is missing, drop what is no longer wanted."""
        watched = self._watch_tree("")
        for rel in [r for r in self._rel_wd if r not in watched]:
            self._unwatch(rel)

    # -- event loop side ---------------------------------------------------------

    def _stop_reading(self) -> None:
        if self._reading and self._loop is not None and self._inotify is not None:
            with contextlib.suppress(Exception):
                self._loop.remove_reader(self._inotify.fd)
        self._reading = False

    def _on_readable(self) -> None:
        """Read the queued events and handle them.

        One read takes at most ``_READ_SIZE`` bytes of whole events; if more
        are queued the fd stays readable and the loop calls back after other
        tasks had a turn. No timers, no wake-ups while nothing changes.
        """
        ino = self._inotify
        if self._closed or ino is None or not self._reading:
            return
        try:
            try:
                data = ino.read(_READ_SIZE)
            except BlockingIOError:
                return
            for wd, mask, name in inotify.parse(data):
                self._handle(wd, mask, name)
                if self._closed:
                    return
        except Exception as exc:  # a bug here or in the sink: fail run(), loudly
            self._stop_reading()
            if self._done is not None and not self._done.done():
                self._done.set_exception(exc)

    def _handle(self, wd: int, mask: int, name: bytes) -> None:
        if mask & IN_Q_OVERFLOW:
            # Lost events may include new directories: re-walk so they get
            # watches, then ask for a full reconcile.
            self._resync()
            self._sink.rescan(OVERFLOW_REASON)
            return
        if mask & IN_IGNORED:
            self._forget_wd(wd)
            return
        dir_rel = self._wd_rel.get(wd)
        if dir_rel is None:  # a watch we already dropped; its events are stale
            return
        if mask & (IN_DELETE_SELF | IN_MOVE_SELF | IN_UNMOUNT):
            if dir_rel == "":
                self._sink.rescan(ROOT_GONE_REASON)
            elif mask & IN_UNMOUNT:
                self._resync()
                self._sink.rescan("a file system under the local root was unmounted")
            # Otherwise the parent's watch reports the deletion or move.
            return
        if not name:  # an event about the watched directory itself
            return
        rel = _join(dir_rel, os.fsdecode(name))
        if mask & IN_ISDIR:
            self._handle_dir(rel, mask)
        else:
            self._handle_file(rel, mask)

    def _handle_dir(self, rel: str, mask: int) -> None:
        excluded = self._rules.is_excluded(rel, True)
        if mask & (IN_CREATE | IN_MOVED_TO):
            if excluded:
                return
            self._watch_tree(rel, self._sink.rules_changed)
            self._sink.changed(rel, True)
        elif mask & IN_MOVED_FROM:
            self._unwatch_subtree(rel)
            if not excluded:
                self._sink.changed(rel, True)
        elif mask & IN_DELETE:
            self._unwatch(rel)  # rmdir needs it empty: the subtree is gone already
            if not excluded:
                # The remote copy may still hold a subtree (and excluded content
                # that must survive): the pusher clears it as a whole.
                self._sink.changed(rel, True)
        elif mask & IN_ATTRIB and not excluded:
            self._sink.changed(rel, False)

    def _handle_file(self, rel: str, mask: int) -> None:
        if mask & IN_CREATE:
            try:
                st = os.lstat(_abs(self._root, rel))
            except OSError:
                pass  # gone already: report the deletion
            else:
                if stat.S_ISREG(st.st_mode) and st.st_nlink == 1:
                    return  # being written: CLOSE_WRITE follows with the content
        elif not mask & _FILE_EVENTS:
            return
        _report_file(self._rules, self._sink, rel, is_dir=False)


def _report_file(rules: RuleSet, sink: Sink, rel: str, is_dir: bool | None) -> None:
    """Report a non-directory change; ``is_dir=None`` when the type is unknown (deleted).

    A path of unknown type is dropped if excluded as a file *or* as a directory:
    reporting an excluded path could make the remote lose what it must keep.
    A ``.gitignore`` also raises :meth:`Sink.rules_changed`, even if it is
    itself excluded from the sync, because it still shapes the rules.
    """
    if not rules.is_excluded(rel, is_dir):
        sink.changed(rel, False)
    if rules.is_rule_file(rel):
        sink.rules_changed(rel)


def _instance_limit_problem(exc: OSError) -> tuple[str, str]:
    """Cause and fix when inotify_init fails: the per-user instance limit or the fd limit.

    Both give EMFILE; if opening any file fails too, it is the process's fd limit.
    """
    try:
        fd = os.open(os.devnull, os.O_RDONLY)
    except OSError:
        import resource

        soft, _ = resource.getrlimit(resource.RLIMIT_NOFILE)
        return (
            f"cannot create an inotify instance: too many open files (ulimit -n = {soft})",
            "raise the open-file limit, e.g. ulimit -n 4096",
        )
    os.close(fd)
    limit = _read_sysctl("max_user_instances")
    return (
        "cannot create an inotify instance: the per-user limit is reached "
        f"(fs.inotify.max_user_instances = {limit}, {os.strerror(exc.errno or 0)})",
        INSTANCE_LIMIT_FIX,
    )


# -- watchfiles backend --------------------------------------------------------

_ADDED, _MODIFIED, _DELETED = 1, 2, 3  # watchfiles.Change values
_WatchResult: TypeAlias = set[tuple[int, str]] | Literal["signal", "stop", "timeout"]
DEBOUNCE_MS = 20
STEP_MS = 5


class WatchfilesWatcher:
    """Portable backend on watchfiles' Rust core (FSEvents on macOS, kqueue, ...).

    Limitations, which is why Linux uses :class:`InotifyWatcher`:

    * The rules are applied after the fact. On Linux, watchfiles still places an
      OS watch in every directory, ignored ones included (``node_modules``), so a
      big tree can exhaust ``fs.inotify.max_user_watches`` (watchfiles#341).
    * The Rust loop polls its change set every ``STEP_MS`` (5 ms) in a thread,
      so idling is cheap but not free.
    * An event path that is not valid UTF-8 makes watchfiles fail for good; the
      watcher is then rebuilt and a full reconcile requested.
    * Event types are coarse (added/modified/deleted); deleted paths have no
      type, so they are filtered as both file and directory.

    It drives ``RustNotify`` (what ``watchfiles.awatch`` wraps) directly, because
    ``awatch`` creates its watcher lazily on first iteration and so cannot say
    when the watches are in place, which :meth:`start` must guarantee.
    """

    def __init__(self, root: Path, rules: RuleSet, sink: Sink) -> None:
        self._root = Path(os.path.abspath(root))
        self._prefixes = tuple(dict.fromkeys((str(self._root), os.path.realpath(self._root))))
        self._rules = rules
        self._sink = sink
        self._notify: RustNotify | None = None
        self._dirs = 0
        self._closed = False
        self._executor: concurrent.futures.ThreadPoolExecutor | None = None
        self._stop: threading.Event | None = None
        self._inflight: concurrent.futures.Future[_WatchResult] | None = None
        self._closed_event = asyncio.Event()

    @property
    def watched_dirs(self) -> int:
        """Non-excluded directories found at start (the OS may watch more, see above)."""
        return self._dirs

    async def start(self) -> None:
        """Load the rules of the whole tree and start watchfiles' watcher."""
        if self._closed or self._notify is not None:
            raise RuntimeError("watcher is closed or already started")
        self._dirs = sum(1 for _ in walk_tree(self._root, self._rules))
        self._notify = self._new_notify()
        self._executor = concurrent.futures.ThreadPoolExecutor(
            max_workers=1, thread_name_prefix="dev-sync-watchfiles"
        )

    def _new_notify(self) -> RustNotify | None:
        from watchfiles._rust_notify import RustNotify

        polling = os.environ.get("WATCHFILES_FORCE_POLLING", "").lower()
        force_polling = bool(polling) and polling not in ("false", "disable", "disabled")
        try:
            return RustNotify([str(self._root)], False, force_polling, 300, True, True)
        except OSError as exc:
            if "watch limit" not in str(exc) and exc.errno != errno.ENOSPC:
                raise
            self._sink.degraded(_watch_limit_cause(_count_all_dirs(self._root)), WATCH_LIMIT_FIX)
            return None

    async def run(self) -> None:
        """Wait for batches in a worker thread and dispatch them, until cancelled or closed."""
        from watchfiles._rust_notify import WatchfilesRustInternalError

        stop = threading.Event()
        self._stop = stop
        try:
            while not self._closed:
                notify, executor = self._notify, self._executor
                if notify is None or executor is None:
                    await self._closed_event.wait()  # degraded: nothing to read
                    return
                future = executor.submit(notify.watch, DEBOUNCE_MS, STEP_MS, 0, stop)
                self._inflight = future
                try:
                    raw = await asyncio.wrap_future(future)
                except WatchfilesRustInternalError as exc:
                    if self._closed:
                        return
                    # Sticky (e.g. a non-UTF-8 name): start over, events are lost.
                    notify.close()
                    self._notify = None
                    try:
                        self._notify = self._new_notify()
                    except OSError:  # the root is gone: nothing left to watch
                        self._sink.rescan(ROOT_GONE_REASON)
                        continue
                    self._sink.rescan(f"watchfiles failed ({exc}); watching again")
                    continue
                if isinstance(raw, str):  # "stop" (closed), or "timeout"/"signal"
                    continue
                for change, path in sorted(raw, key=lambda c: c[1]):  # parents first
                    self._dispatch(change, path)
        finally:
            stop.set()  # let the worker thread return if we were cancelled

    def close(self) -> None:
        """Stop the worker thread and watchfiles' watcher. Idempotent."""
        if self._closed:
            return
        self._closed = True
        self._closed_event.set()
        if self._stop is not None:
            self._stop.set()
        notify, self._notify = self._notify, None
        if notify is not None:
            inflight = self._inflight
            if inflight is not None and not inflight.done():
                # Closing under a running watch() makes it raise; close once it returned.
                inflight.add_done_callback(lambda _: notify.close())
            else:
                notify.close()
        if self._executor is not None:
            self._executor.shutdown(wait=False)
            self._executor = None

    def set_rules(self, rules: RuleSet) -> None:
        """Adopt new rules; the OS watches cover everything already."""
        self._rules = rules
        self._dirs = sum(1 for _ in walk_tree(self._root, rules))

    def _rel(self, path: str) -> str | None:
        for prefix in self._prefixes:
            if path == prefix:
                return ""
            if path.startswith(prefix + "/"):
                return path[len(prefix) + 1 :]
        return None

    def _dispatch(self, change: int, path: str) -> None:
        rel = self._rel(path)
        if rel is None:
            return
        if rel == "":
            if change == _DELETED or not os.path.isdir(path):
                self._sink.rescan(ROOT_GONE_REASON)
            return
        try:
            st = os.lstat(path)
        except OSError:
            st = None
        if change == _DELETED or st is None:
            _report_file(self._rules, self._sink, rel, is_dir=None)
            return
        if not stat.S_ISDIR(st.st_mode):
            _report_file(self._rules, self._sink, rel, is_dir=False)
        elif not self._rules.is_excluded(rel, True):
            if change == _ADDED:
                # Load the new subtree's .gitignore files before judging its contents.
                for _ in walk_tree(self._root, self._rules, rel, self._sink.rules_changed):
                    pass
            self._sink.changed(rel, change == _ADDED)
