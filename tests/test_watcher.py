"""The watchers against the real file system and real inotify.

Nothing here is mocked: each test builds a tree under ``tmp_path``, starts a
watcher, changes files and waits (with a deadline, never a fixed sleep) for the
sink to hear about them. A negative claim ("never reported") is checked after a
barrier: a marker file written last and seen by the sink proves every earlier
event has been dispatched, since both backends deliver in order or in batches.
"""

from __future__ import annotations

import asyncio
import contextlib
import fcntl
import itertools
import os
import resource
import shutil
import time
from collections.abc import AsyncIterator, Callable, Iterator
from pathlib import Path

import pytest

from dev_sync.ignore import RuleSet
from dev_sync.watcher import (
    OVERFLOW_REASON,
    ROOT_GONE_REASON,
    WATCH_LIMIT_FIX,
    Backend,
    InotifyWatcher,
    Watcher,
    WatchfilesWatcher,
    make_watcher,
)

BACKENDS: list[Backend] = ["inotify", "watchfiles"]
WAIT = 5.0  # seconds; generous for a loaded CI machine, reached only on failure


class Collector:
    """A Sink that records calls and lets a test await a condition on them."""

    def __init__(self) -> None:
        self.changes: list[tuple[str, bool]] = []
        self.rescans: list[str] = []
        self.problems: list[tuple[str, str]] = []
        self.rules: list[str] = []
        self._wakeup = asyncio.Event()

    def changed(self, rel: str, recursive: bool) -> None:
        self.changes.append((rel, recursive))
        self._wakeup.set()

    def rescan(self, reason: str) -> None:
        self.rescans.append(reason)
        self._wakeup.set()

    def degraded(self, cause: str, fix: str) -> None:
        self.problems.append((cause, fix))
        self._wakeup.set()

    def rules_changed(self, rel: str) -> None:
        self.rules.append(rel)
        self._wakeup.set()

    def paths(self) -> set[str]:
        return {rel for rel, _ in self.changes}

    def clear(self) -> None:
        self.changes.clear()
        self.rescans.clear()
        self.rules.clear()

    async def wait_for(self, what: Callable[[], bool], timeout: float = WAIT) -> None:
        try:
            async with asyncio.timeout(timeout):
                while not what():
                    self._wakeup.clear()
                    await self._wakeup.wait()
        except TimeoutError:
            raise AssertionError(
                f"timed out; changes={self.changes} rescans={self.rescans} "
                f"rules={self.rules} problems={self.problems}"
            ) from None

    async def wait_paths(self, *rels: str) -> None:
        await self.wait_for(lambda: set(rels) <= self.paths())


_barriers = itertools.count()


async def settle(root: Path, col: Collector) -> None:
    """Write a marker and wait for it: every earlier event has been dispatched by then."""
    name = f"barrier-{next(_barriers)}"
    (root / name).write_text("x")
    await col.wait_paths(name)


@pytest.fixture(params=BACKENDS)
def backend(request: pytest.FixtureRequest) -> Backend:
    value: Backend = request.param
    return value


@contextlib.asynccontextmanager
async def watching(
    root: Path, backend: Backend, rules: RuleSet | None = None
) -> AsyncIterator[tuple[Watcher, Collector]]:
    """Start a watcher with run() in a task; on exit close it and check run() ends."""
    col = Collector()
    watcher = make_watcher(root, rules or RuleSet(root), col, backend)
    await watcher.start()
    task = asyncio.create_task(watcher.run())
    try:
        yield watcher, col
    finally:
        watcher.close()
        watcher.close()  # idempotent
        await asyncio.wait_for(task, 2)  # close() ends run(), and run() raised nothing


def write(path: Path | bytes, data: bytes = b"x") -> None:
    with open(path, "wb") as f:
        f.write(data)


def make_tree(root: Path, *rels: str) -> None:
    """Create files (``a/b.txt``) and directories (``a/c/``) under root."""
    for rel in rels:
        path = root / rel
        if rel.endswith("/"):
            path.mkdir(parents=True, exist_ok=True)
        else:
            path.parent.mkdir(parents=True, exist_ok=True)
            write(path)


def kernel_watch_count() -> int:
    """inotify watches held by this process, as the kernel counts them."""
    total = 0
    for fd in os.listdir("/proc/self/fd"):
        try:
            if os.readlink(f"/proc/self/fd/{fd}") != "anon_inode:inotify":
                continue
            with open(f"/proc/self/fdinfo/{fd}") as f:
                total += sum(1 for line in f if line.startswith("inotify wd:"))
        except OSError:
            continue
    return total


def user_watch_count() -> int:
    """inotify watches held by every process of this user (what max_user_watches limits)."""
    uid, total = os.getuid(), 0
    for pid in filter(str.isdigit, os.listdir("/proc")):
        try:
            if os.stat(f"/proc/{pid}").st_uid != uid:
                continue
            fds = os.listdir(f"/proc/{pid}/fd")
        except OSError:
            continue
        for fd in fds:
            try:
                if os.readlink(f"/proc/{pid}/fd/{fd}") != "anon_inode:inotify":
                    continue
                with open(f"/proc/{pid}/fdinfo/{fd}") as f:
                    total += sum(1 for line in f if line.startswith("inotify wd:"))
            except OSError:
                continue
    return total


@contextlib.contextmanager
def sysctl(name: str, value: int) -> Iterator[None]:
    """Set /proc/sys/fs/inotify/<name> for the block, then restore it; skip if we can't.

    A lock file serialises test processes on this machine, so two runs can never
    save each other's lowered value as the one to restore.
    """
    path = Path("/proc/sys/fs/inotify", name)
    if os.geteuid() != 0 or not os.access(path, os.W_OK):
        pytest.skip(f"needs root and a writable {path}")
    with open("/tmp/dev-sync-test-inotify-sysctl.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        old = path.read_text()
        try:
            path.write_text(f"{value}\n")
        except OSError as exc:
            pytest.skip(f"cannot write {path}: {exc}")
        try:
            yield
        finally:
            path.write_text(old)


# -- both backends -------------------------------------------------------------


async def test_edit_create_delete_rename_file(tmp_path: Path, backend: Backend) -> None:
    make_tree(tmp_path, "a.txt", "sub/b.txt")
    async with watching(tmp_path, backend) as (_, col):
        write(tmp_path / "a.txt", b"edited")
        await col.wait_for(lambda: ("a.txt", False) in col.changes)

        write(tmp_path / "sub" / "new.txt")
        await col.wait_for(lambda: ("sub/new.txt", False) in col.changes)

        col.clear()
        (tmp_path / "sub" / "b.txt").unlink()
        await col.wait_for(lambda: ("sub/b.txt", False) in col.changes)

        col.clear()
        (tmp_path / "sub" / "new.txt").rename(tmp_path / "renamed.txt")
        await col.wait_for(
            lambda: {("sub/new.txt", False), ("renamed.txt", False)} <= set(col.changes)
        )
        assert not col.rescans


async def test_links_and_special_files_reported_at_once(tmp_path: Path, backend: Backend) -> None:
    make_tree(tmp_path, "orig.txt")
    async with watching(tmp_path, backend) as (_, col):
        os.link(tmp_path / "orig.txt", tmp_path / "hard.txt")  # no CLOSE_WRITE will follow
        os.mkfifo(tmp_path / "pipe")
        await col.wait_paths("hard.txt", "pipe")


async def test_changes_between_start_and_run_are_kept(tmp_path: Path, backend: Backend) -> None:
    col = Collector()
    watcher = make_watcher(tmp_path, RuleSet(tmp_path), col, backend)
    await watcher.start()
    try:
        write(tmp_path / "early.txt")
        (tmp_path / "early-dir").mkdir()
        task = asyncio.create_task(watcher.run())
        await col.wait_for(lambda: {("early.txt", False), ("early-dir", True)} <= set(col.changes))
    finally:
        watcher.close()
    await asyncio.wait_for(task, 2)


async def test_rename_directory(tmp_path: Path, backend: Backend) -> None:
    make_tree(tmp_path, "d/sub/f.txt", "d/g.txt")
    async with watching(tmp_path, backend) as (watcher, col):
        (tmp_path / "d").rename(tmp_path / "e")
        # inotify knows "d" was a directory (a subtree to clear remotely);
        # watchfiles cannot tell what a vanished path was.
        gone = ("d", backend == "inotify")
        await col.wait_for(lambda: {gone, ("e", True)} <= set(col.changes))
        if backend != "inotify":
            return
        assert watcher.watched_dirs == 3  # root, e, e/sub
        col.clear()
        write(tmp_path / "e" / "sub" / "f.txt", b"edited")
        await col.wait_paths("e/sub/f.txt")
        assert not any(rel.startswith("d/") for rel in col.paths())

        # The old name reused at once: both directories are watched separately.
        (tmp_path / "e").rename(tmp_path / "d")
        (tmp_path / "e").mkdir()
        write(tmp_path / "e" / "new")
        await col.wait_for(lambda: {("d", True), ("e", True)} <= set(col.changes))
        col.clear()
        write(tmp_path / "d" / "sub" / "f.txt", b"again")
        write(tmp_path / "e" / "new", b"again")
        await col.wait_paths("d/sub/f.txt", "e/new")
        assert watcher.watched_dirs == 4  # root, d, d/sub, e
        shutil.rmtree(tmp_path / "e")
        await col.wait_paths("e")
        (tmp_path / "d").rename(tmp_path / "e")
        await col.wait_for(lambda: ("e", True) in col.changes)

        # Out of the tree: a deletion here, and its watches go.
        outside = tmp_path.parent / f"{tmp_path.name}-outside"
        col.clear()
        (tmp_path / "e").rename(outside)
        await col.wait_paths("e")
        assert watcher.watched_dirs == 1
        # And back in: a new subtree, watched again.
        outside.rename(tmp_path / "back")
        await col.wait_for(lambda: ("back", True) in col.changes)
        assert watcher.watched_dirs == 3
        write(tmp_path / "back" / "sub" / "x")
        await col.wait_paths("back/sub/x")


async def test_mkdir_p_then_fill_fast(tmp_path: Path, backend: Backend) -> None:
    async with watching(tmp_path, backend) as (watcher, col):
        for i in range(20):
            (tmp_path / f"m{i}" / "b" / "c").mkdir(parents=True)
            write(tmp_path / f"m{i}" / "b" / "c" / "f")
        # One recursive report per new top directory covers what was inside.
        await col.wait_for(lambda: all((f"m{i}", True) in col.changes for i in range(20)))
        if backend == "inotify":
            assert watcher.watched_dirs == 1 + 3 * 20
            assert not any(rel.endswith("/f") and rec for rel, rec in col.changes)
        # The deepest directories are watched: later writes there are seen.
        for i in range(20):
            write(tmp_path / f"m{i}" / "b" / "c" / "g")
        await col.wait_paths(*(f"m{i}/b/c/g" for i in range(20)))


async def test_chmod_x(tmp_path: Path, backend: Backend) -> None:
    make_tree(tmp_path, "run.sh")
    async with watching(tmp_path, backend) as (_, col):
        os.chmod(tmp_path / "run.sh", 0o755)
        await col.wait_for(lambda: ("run.sh", False) in col.changes)


async def test_symlinks(tmp_path: Path, backend: Backend) -> None:
    make_tree(tmp_path, "target.txt", "other.txt", "dir/inside.txt")
    async with watching(tmp_path, backend) as (watcher, col):
        dirs_before = watcher.watched_dirs
        os.symlink("target.txt", tmp_path / "link")
        os.symlink("dir", tmp_path / "dirlink")
        await col.wait_for(lambda: {("link", False), ("dirlink", False)} <= set(col.changes))

        col.clear()
        os.symlink("other.txt", tmp_path / "link.tmp")  # ln -sfn: new link renamed over
        os.replace(tmp_path / "link.tmp", tmp_path / "link")
        await col.wait_for(lambda: ("link", False) in col.changes)

        col.clear()
        (tmp_path / "link").unlink()
        os.symlink("dir", tmp_path / "link")
        await col.wait_for(lambda: ("link", False) in col.changes)

        # A symlink to a directory is never followed: no watch, no paths through it.
        col.clear()
        write(tmp_path / "dir" / "inside.txt", b"edited")
        await col.wait_paths("dir/inside.txt")
        await settle(tmp_path, col)
        assert not any(rel.startswith(("dirlink/", "link/")) for rel in col.paths())
        assert not any(rec for rel, rec in col.changes if "link" in rel)
        if backend == "inotify":
            assert watcher.watched_dirs == dirs_before


async def test_file_replaced_by_directory_and_back(tmp_path: Path, backend: Backend) -> None:
    make_tree(tmp_path, "thing")
    async with watching(tmp_path, backend) as (_, col):
        (tmp_path / "thing").unlink()
        (tmp_path / "thing").mkdir()
        write(tmp_path / "thing" / "inner")
        await col.wait_for(lambda: ("thing", True) in col.changes)
        if backend == "inotify":
            assert ("thing", False) in col.changes  # the file's deletion

        shutil.rmtree(tmp_path / "thing")
        await col.wait_for(lambda: col.changes.count(("thing", False)) >= 1)
        await settle(tmp_path, col)
        col.clear()
        write(tmp_path / "thing", b"a file again")
        await col.wait_for(lambda: ("thing", False) in col.changes)
        await settle(tmp_path, col)
        assert ("thing", True) not in col.changes


HOSTILE = [
    b"new\nline",
    b"-rf",
    b"--help",
    b"$(rm -rf x)",
    b"`id`;echo",
    b"quote'\"s",
    b"back\\slash",
    b" leading and trailing ",
    b"*glob?[ab]",
    "ünïcødé-日本語-🙂".encode(),
    b"tab\there",
]
INVALID_UTF8 = b"bad-\xff\xfe-name"


async def test_hostile_names(tmp_path: Path, backend: Backend) -> None:
    broot = os.fsencode(tmp_path)
    async with watching(tmp_path, backend) as (_, col):
        for name in HOSTILE:
            write(os.path.join(broot, name))
        os.mkdir(os.path.join(broot, b"dir $(x)\n"))
        await col.wait_paths(*(os.fsdecode(n) for n in HOSTILE))
        await col.wait_for(lambda: ("dir $(x)\n", True) in col.changes)

        write(os.path.join(broot, b"dir $(x)\n", b"-n \\ 'q'"))
        await col.wait_paths("dir $(x)\n/-n \\ 'q'")

        # Reported names turn back into the exact bytes on disk.
        for rel in col.paths():
            assert os.path.lexists(os.path.join(broot, os.fsencode(rel)))

        # Not valid UTF-8: inotify reports it losslessly (surrogateescape);
        # watchfiles cannot decode it and asks for a full reconcile instead.
        col.clear()
        write(os.path.join(broot, INVALID_UTF8))
        rel = os.fsdecode(INVALID_UTF8)
        if backend == "inotify":
            await col.wait_paths(rel)
            assert os.fsencode(rel) == INVALID_UTF8
        else:
            await col.wait_for(lambda: rel in col.paths() or bool(col.rescans))
        # And the watcher still works afterwards.
        await settle(tmp_path, col)


async def test_excluded_paths_never_reported(tmp_path: Path, backend: Backend) -> None:
    make_tree(
        tmp_path,
        "node_modules/pkg/lib/index.js",
        "build/out/o.txt",
        "src/app.py",
        "src/node_modules/x/y.js",
        ".git/objects/ab/cd",
    )
    (tmp_path / ".gitignore").write_text("build/\n*.log\n")

    def excluded(rel: str) -> bool:
        parts = rel.split("/")
        return "node_modules" in parts or parts[0] in ("build", ".git") or rel.endswith(".log")

    async with watching(tmp_path, backend) as (watcher, col):
        if backend == "inotify":
            assert watcher.watched_dirs == 2  # root and src
        write(tmp_path / "node_modules" / "pkg" / "lib" / "index.js", b"edited")
        write(tmp_path / "node_modules" / "pkg" / "new.js")
        write(tmp_path / "build" / "out" / "o.txt", b"edited")
        write(tmp_path / "debug.log")
        write(tmp_path / "src" / "trace.log")
        make_tree(tmp_path, "src/node_modules/z/", ".git/HEAD")
        (tmp_path / "build" / "out" / "o.txt").unlink()
        shutil.rmtree(tmp_path / "build")
        (tmp_path / "debug.log").unlink()
        shutil.rmtree(tmp_path / "node_modules")
        make_tree(tmp_path, "node_modules/again/index.js")  # created in a watched dir
        # A new directory: reported, but its excluded insides are not watched.
        make_tree(tmp_path, "fresh/node_modules/m/f.js", "fresh/x.log", "fresh/ok.txt")
        await col.wait_for(lambda: ("fresh", True) in col.changes)
        write(tmp_path / "fresh" / "node_modules" / "m" / "f.js", b"edited")
        write(tmp_path / "fresh" / "x.log", b"edited")
        await settle(tmp_path, col)
        reported = col.paths()
        assert not [rel for rel in reported if excluded(rel)]
        assert "src/app.py" not in reported  # untouched
        assert not col.rules and not col.rescans
        if backend == "inotify":
            assert watcher.watched_dirs == 3  # root, src, fresh
            assert kernel_watch_count() == 3


async def test_gitignore_changes_report_rules(tmp_path: Path, backend: Backend) -> None:
    make_tree(tmp_path, "sub/a.txt")
    async with watching(tmp_path, backend) as (_, col):
        (tmp_path / ".gitignore").write_text("*.tmp\n")
        await col.wait_for(lambda: ".gitignore" in col.rules)
        assert (".gitignore", False) in col.changes  # the file itself is synced too

        (tmp_path / "sub" / ".gitignore").write_text("x\n")
        await col.wait_for(lambda: "sub/.gitignore" in col.rules)
        col.clear()
        (tmp_path / "sub" / ".gitignore").unlink()
        await col.wait_for(lambda: "sub/.gitignore" in col.rules)
        assert ("sub/.gitignore", False) in col.changes

        # A directory arriving with its own rules.
        staged = tmp_path.parent / f"{tmp_path.name}-staged"
        make_tree(staged, "pkg/.gitignore", "pkg/deep/.gitignore")
        col.clear()
        (staged / "pkg").rename(tmp_path / "pkg")
        await col.wait_for(lambda: {"pkg/.gitignore", "pkg/deep/.gitignore"} <= set(col.rules))
        assert ("pkg", True) in col.changes


async def test_set_rules_follows_gitignore(tmp_path: Path, backend: Backend) -> None:
    make_tree(tmp_path, "a/f", "b/f", "b/c/f")
    async with watching(tmp_path, backend) as (watcher, col):
        if backend == "inotify":
            assert watcher.watched_dirs == 4
        (tmp_path / ".gitignore").write_text("b/\n")
        await col.wait_for(lambda: ".gitignore" in col.rules)
        watcher.set_rules(RuleSet(tmp_path))
        if backend == "inotify":
            assert watcher.watched_dirs == 2
            assert kernel_watch_count() == 2
        col.clear()
        write(tmp_path / "b" / "c" / "f", b"edited")
        write(tmp_path / "a" / "f", b"edited")
        await col.wait_paths("a/f")
        await settle(tmp_path, col)
        assert not any(rel.startswith("b/") for rel in col.paths())

        (tmp_path / ".gitignore").write_text("")
        await col.wait_for(lambda: col.rules.count(".gitignore") >= 1)
        watcher.set_rules(RuleSet(tmp_path))
        if backend == "inotify":
            assert watcher.watched_dirs == 4
        write(tmp_path / "b" / "c" / "f", b"again")
        await col.wait_paths("b/c/f")


async def test_root_removed(tmp_path: Path, backend: Backend) -> None:
    root = tmp_path / "root"
    make_tree(root, "a/f")
    async with watching(root, backend) as (_, col):
        shutil.rmtree(root)
        await col.wait_for(lambda: ROOT_GONE_REASON in col.rescans)


async def test_root_moved(tmp_path: Path) -> None:
    root = tmp_path / "root"
    make_tree(root, "a/f")
    async with watching(root, "inotify") as (_, col):
        root.rename(tmp_path / "elsewhere")
        await col.wait_for(lambda: ROOT_GONE_REASON in col.rescans)


# -- inotify only --------------------------------------------------------------


def test_backend_choice(tmp_path: Path) -> None:
    rules, col = RuleSet(tmp_path), Collector()
    assert isinstance(make_watcher(tmp_path, rules, col), InotifyWatcher)  # this is Linux
    assert isinstance(make_watcher(tmp_path, rules, col, "watchfiles"), WatchfilesWatcher)
    with pytest.raises(ValueError, match="unknown watcher backend"):
        make_watcher(tmp_path, rules, col, "polling")  # type: ignore[arg-type]


async def test_watches_only_included_dirs(tmp_path: Path) -> None:
    make_tree(tmp_path, "src/a/", "src/b/", "docs/", ".git/refs/heads/")
    for i in range(300):
        (tmp_path / "node_modules" / f"p{i}" / "lib").mkdir(parents=True)
    async with watching(tmp_path, "inotify") as (watcher, _):
        assert watcher.watched_dirs == 5  # root, src, src/a, src/b, docs
        assert kernel_watch_count() == 5


async def test_burst_of_2000_writes(tmp_path: Path) -> None:
    make_tree(tmp_path, "d0/", "d1/", "d2/", "d3/")
    names = [f"d{i % 4}/file-{i}.txt" for i in range(2000)]
    async with watching(tmp_path, "inotify") as (_, col):
        for name in names:  # no await: all queue up in the kernel meanwhile
            write(tmp_path / name, b"payload")
        await col.wait_paths(*names)
        assert not col.rescans
        assert all(not rec for _, rec in col.changes)


async def test_idle_costs_no_cpu(tmp_path: Path) -> None:
    for i in range(20):
        make_tree(tmp_path, *(f"d{i}/f{j}" for j in range(10)))
    async with watching(tmp_path, "inotify") as (_, col):
        await asyncio.sleep(0.05)
        cpu, wall = time.process_time(), time.monotonic()
        await asyncio.sleep(0.3)
        used = time.process_time() - cpu
        assert time.monotonic() - wall >= 0.3
        assert used < 0.03, f"{used:.3f} s of CPU in 0.3 s of idling"
        assert not col.changes


async def test_queue_overflow_asks_for_rescan_and_rewatches(tmp_path: Path) -> None:
    make_tree(tmp_path, "d/")
    col = Collector()
    watcher = InotifyWatcher(tmp_path, RuleSet(tmp_path), col)
    with sysctl("max_queued_events", 32):  # read when the instance is created
        await watcher.start()
    task = asyncio.create_task(watcher.run())
    try:
        for i in range(300):  # 600 events, no await in between: the queue overflows
            write(tmp_path / "d" / f"f{i}")
        (tmp_path / "lost" / "deep").mkdir(parents=True)  # its CREATE is dropped
        await col.wait_for(lambda: OVERFLOW_REASON in col.rescans)
        # The re-walk after the overflow watched the directory whose event was lost.
        write(tmp_path / "lost" / "deep" / "f")
        await col.wait_paths("lost/deep/f")
        assert watcher.watched_dirs == 4
    finally:
        watcher.close()
    await asyncio.wait_for(task, 2)


async def test_watch_limit_degrades_once(tmp_path: Path) -> None:
    for i in range(10):
        make_tree(tmp_path, f"d{i}/s0/", f"d{i}/s1/")  # 31 directories with the root
    col = Collector()
    watcher = InotifyWatcher(tmp_path, RuleSet(tmp_path), col)
    with sysctl("max_user_watches", user_watch_count() + 8):  # checked at each add_watch
        await watcher.start()
    task = asyncio.create_task(watcher.run())
    try:
        assert len(col.problems) == 1, col.problems
        cause, fix = col.problems[0]
        assert cause.startswith("inotify watch limit reached (fs.inotify.max_user_watches = ")
        assert cause.endswith(", need about 31)")
        assert fix == WATCH_LIMIT_FIX
        assert 1 <= watcher.watched_dirs <= 8
        # What is watched is still reported (the root is watched first).
        write(tmp_path / "top.txt")
        await col.wait_paths("top.txt")
        # New directories are watched now the limit is back, and no second report.
        make_tree(tmp_path, "new/f")
        await col.wait_for(lambda: ("new", True) in col.changes)
        write(tmp_path / "new" / "g")
        await col.wait_paths("new/g")
        assert len(col.problems) == 1
    finally:
        watcher.close()
    await asyncio.wait_for(task, 2)


async def test_no_inotify_instance_degrades(tmp_path: Path) -> None:
    col = Collector()
    watcher = InotifyWatcher(tmp_path, RuleSet(tmp_path), col)
    fd = os.open(os.devnull, os.O_RDONLY)
    os.close(fd)  # fd is now the lowest free descriptor
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (fd, hard))  # the next fd gets EMFILE
    try:
        await watcher.start()
    finally:
        resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))
    assert len(col.problems) == 1
    assert "inotify instance" in col.problems[0][0]
    assert watcher.watched_dirs == 0
    task = asyncio.create_task(watcher.run())
    await asyncio.sleep(0.05)
    assert not task.done()  # idles, without crashing, until closed
    watcher.close()
    await asyncio.wait_for(task, 2)
