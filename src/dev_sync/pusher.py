"""Getting local changes onto the remote with rsync over the SSH master.

Two operations: a full *reconcile* of the whole tree, and a *push* of one
batch of paths (``--files-from`` plus ``--delete-missing-args``). Both take
their filter rules from the one rule set the watcher also uses, passed as
``--filter`` arguments (rules read from a merge file are not applied to
receiver-side deletions in ``--files-from`` mode, which would let a batch
delete an excluded ``node_modules``).

Deletions are guarded: before anything is deleted that could be a large part
of the remote tree, a dry run counts it, and :class:`SafetyStop` is raised
instead of mirroring what is probably an accident (an emptied or unmounted
local root).
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import re
import shutil
import subprocess
import tempfile
import time
from collections import deque
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from dev_sync import commands, prestart, runner
from dev_sync.errors import DevSyncError, SafetyStop
from dev_sync.runner import CommandError
from dev_sync.ssh import SshMaster

# rsync exit codes that mean the connection, not the transfer, failed.
CONNECTION_CODES = frozenset({5, 10, 12, 30, 35, 255})
FILE_IO, PARTIAL, VANISHED, MAX_DELETE = 11, 23, 24, 25


class ConnectionLost(Exception):
    """The transport went away mid-operation; the engine reconnects and reconciles."""


@dataclass
class Stats:
    """What one rsync run did."""

    files: int = 0          # regular files transferred
    size: int = 0           # bytes of the files transferred
    deleted: int = 0
    total: int = 0          # entries in the sender's file list
    seconds: float = 0.0
    warnings: list[str] = field(default_factory=list)
    stderr: bytes = b""
    # (path, where the remote's own edit of it was kept) for each conflict
    conflicts: list[tuple[str, str]] = field(default_factory=list)
    via: str = "rsync"      # rsync | agent | agent+rsync
    head_start: bool = False  # the rsync started before the program loaded (prestart)


@dataclass(frozen=True)
class Progress:
    bytes: int
    percent: int
    rate: str
    files: int
    remaining: int | None
    total: int | None


class DeleteGuard:
    """How much deletion is too much to do without asking.

    Deletions are counted over a sliding window, not per batch: ``rm -rf *``
    arrives as one directory after another, and each alone may look small.
    """

    def __init__(
        self, share: float = 0.5, minimum: int = 50, allow: bool = False, window: float = 60.0
    ) -> None:
        self.share = share
        self.minimum = minimum
        self.allow = allow
        self.window = window
        self._recent: deque[tuple[float, int]] = deque()

    def _recent_total(self) -> int:
        cutoff = time.monotonic() - self.window
        while self._recent and self._recent[0][0] < cutoff:
            self._recent.popleft()
        return sum(n for _, n in self._recent)

    def record(self, deletions: int) -> None:
        if deletions:
            self._recent.append((time.monotonic(), deletions))

    def check(self, deletions: int, remote_total: int, *, local_empty: bool = False) -> None:
        if self.allow or deletions == 0:
            return
        total = deletions + self._recent_total()
        share = total / max(remote_total, total, 1)
        if local_empty or (total > self.minimum and share > self.share):
            why = "the local tree is empty" if local_empty else f"{share:.0%} of the remote tree"
            raise SafetyStop(
                f"refusing to delete {total} remote entries ({why}); "
                f"the last {deletions} were not deleted",
                "if the local tree is right (not an unmounted or half-checked-out folder), run "
                "`dev-sync up --once --allow-delete` once; otherwise restore the local files. "
                "The threshold is [sync] delete_guard",
            )


_STAT_PATTERNS = {
    "total": re.compile(rb"^Number of files: ([\d,]+)", re.M),
    "files": re.compile(rb"^Number of regular files transferred: ([\d,]+)", re.M),
    "deleted": re.compile(rb"^Number of deleted files: ([\d,]+)", re.M),
    "size": re.compile(rb"^Total transferred file size: ([\d,]+)", re.M),
}
_PROGRESS = re.compile(
    r"^\s*([\d,]+)\s+(\d+)%\s+(\S+/s)\s+\S+(?:\s+\(xfr#(\d+), \w+-chk=(\d+)/(\d+)\))?"
)
_SKIPPED = re.compile(rb"--max-delete limit \((\d+) skipped\)")
# What rsync says about files that changed under it: the watcher reports
# those paths again, so they are not the user's concern.
_EXPECTED_NOISE = (
    "non-empty directory",
    "file has vanished",
    "some files vanished",
    "parent dir is absent",
)
_DISK_FULL = re.compile(rb"No space left on device|Disk quota exceeded")
_NONEMPTY = re.compile(rb"^cannot delete non-empty directory: (.*)$", re.M)


def parse_stats(output: bytes) -> Stats:
    stats = Stats()
    for name, pattern in _STAT_PATTERNS.items():
        m = pattern.search(output)
        if m:
            setattr(stats, name, int(m.group(1).replace(b",", b"")))
    return stats


def parse_progress(line: str) -> Progress | None:
    m = _PROGRESS.match(line)
    if not m:
        return None
    total = int(m.group(6)) if m.group(6) else None
    remaining = int(m.group(5)) if m.group(5) else None
    return Progress(
        bytes=int(m.group(1).replace(",", "")),
        percent=int(m.group(2)),
        rate=m.group(3),
        files=int(m.group(4) or 0),
        remaining=remaining,
        total=total,
    )


def classify_failure(exc: CommandError, host: str, root: str) -> Exception:
    """Map a failed rsync run to ConnectionLost or a user-facing error."""
    err = exc.err
    if _DISK_FULL.search(exc.stderr):
        return DevSyncError(
            f"the remote disk holding {root} is full (rsync: No space left on device)",
            f"free space on {host} (see `df -h {root}`), then dev-sync resumes on the next change",
        )
    if exc.returncode == 127 or "rsync: command not found" in err or "rsync: not found" in err:
        return DevSyncError(
            "rsync is not installed here"
            if exc.returncode == 127
            else f"rsync is not installed on {host}",
            "install rsync (`sudo apt-get install rsync`, or `brew install rsync` on macOS)",
        )
    if exc.returncode in CONNECTION_CODES:
        return ConnectionLost(exc.last_line())
    return DevSyncError(f"rsync failed (exit {exc.returncode}): {exc.last_line()}")


class RsyncPusher:
    """Runs rsync from the local root to the remote root over the master."""

    def __init__(
        self,
        local_root: Path,
        remote_root: str,
        master: SshMaster,
        rsync_path: str,
        filter_rules: Callable[[], Sequence[str]],
        guard: DeleteGuard,
    ) -> None:
        self.local_root = local_root
        self.remote_root = remote_root.rstrip("/") or "/"
        self.master = master
        self.rsync_path = rsync_path
        self.filter_rules = filter_rules
        self.guard = guard
        # Entries the remote tree holds, as of the last reconcile: the
        # denominator of the mass-deletion guard.
        self.remote_total = 0

    @property
    def destination(self) -> str:
        return f"{self.master.target.host}:{self.remote_root}/"

    def _base(self) -> list[str]:
        return commands.rsync_base(
            self.master.rsync_rsh(), self.rsync_path, self.filter_rules()
        )

    async def _rsync(
        self,
        argv: list[str],
        *,
        files: Sequence[str] | None = None,
        ok: frozenset[int] = frozenset({0, VANISHED}),
        progress: Callable[[Progress], None] | None = None,
    ) -> runner.Result:
        # "./" keeps rsync from reading a name that starts with # or ; as a comment.
        data = None if files is None else b"".join(b"./" + os.fsencode(f) + b"\0" for f in files)
        if progress is None:
            result = await runner.arun(argv, input=data, check=False)
        else:
            result = await self._rsync_with_progress(argv, data, progress)
        return await self._checked(result, ok)

    async def _checked(self, result: runner.Result, ok: frozenset[int]) -> runner.Result:
        full_disk = result.returncode == PARTIAL and _DISK_FULL.search(result.stderr)
        if result.returncode not in ok or full_disk:
            error = classify_failure(
                CommandError(result.argv, result.returncode, result.stdout, result.stderr),
                self.master.target.label,
                self.remote_root,
            )
            if result.returncode == FILE_IO and not _DISK_FULL.search(result.stderr):
                error = await self._explain_io_error(error)
            raise error
        return result

    async def _adopted(
        self, run: prestart.Run, ok: frozenset[int], progress: Callable[[Progress], None] | None
    ) -> runner.Result:
        """Finish an rsync started before the program loaded (see dev_sync.prestart)."""
        if progress is not None:
            loop = asyncio.get_running_loop()

            def relay(raw: bytes) -> None:  # in the run's reader thread
                info = parse_progress(raw.decode("utf-8", "replace"))
                if info is not None:
                    loop.call_soon_threadsafe(progress, info)

            run.listen(relay)
        try:
            result = await asyncio.to_thread(run.result)
        except asyncio.CancelledError:
            run.listen(None)
            await asyncio.to_thread(run.stop)
            raise
        run.listen(None)
        return await self._checked(result, ok)

    async def _explain_io_error(self, error: Exception) -> Exception:
        """rsync's own message about a failed write is sometimes lost with the
        connection it was sent on; the remote's free space tells the likely cause."""
        try:
            out = (await self.master.run(["df", "-Pk", self.remote_root])).out
            free_kb = int(out.splitlines()[-1].split()[3])
        except (CommandError, IndexError, ValueError):
            return error
        host = self.master.target.label
        return DevSyncError(
            f"rsync could not write under {self.remote_root} on {host} (file I/O error); "
            f"the remote disk may be full: {free_kb // 1024} MB free there",
            f"free space on {host} (see `df -h {self.remote_root}`) or check permissions; "
            "dev-sync retries on the next change",
        )

    async def _rsync_with_progress(
        self, argv: list[str], data: bytes | None, progress: Callable[[Progress], None]
    ) -> runner.Result:
        proc = await runner.start(
            argv, stdin=subprocess.PIPE if data is not None else subprocess.DEVNULL
        )
        assert proc.stdout is not None and proc.stderr is not None
        if data is not None and proc.stdin is not None:
            proc.stdin.write(data)
            proc.stdin.close()
        err_task = asyncio.create_task(proc.stderr.read())
        out = bytearray()
        pending = b""
        try:
            while chunk := await proc.stdout.read(65536):
                out += chunk
                pending += chunk
                *lines, pending = re.split(rb"[\r\n]", pending)
                for raw in lines:
                    info = parse_progress(raw.decode("utf-8", "replace"))
                    if info is not None:
                        progress(info)
            code = await proc.wait()
        except asyncio.CancelledError:
            await runner.terminate(proc)
            err_task.cancel()
            raise
        return runner.Result(tuple(argv), code, bytes(out), await err_task)

    # -- reconcile -----------------------------------------------------------

    async def reconcile(
        self, progress: Callable[[Progress], None] | None = None, *, fresh: bool = False
    ) -> Stats:
        """Make the remote match the local tree, guarding against mass deletion.

        ``fresh``: the remote root was just created, so rsync's incremental
        recursion (sending while it still scans) is the faster way to fill it;
        otherwise the whole file list first saves round trips when little
        has changed.
        """
        started = time.monotonic()
        base = self._base()

        def argv(first_pass: bool) -> list[str]:
            return commands.reconcile_argv(
                base, self.local_root, self.destination, fresh=fresh,
                progress=progress is not None, first_pass=first_pass,
            )

        # First pass transfers everything but deletes nothing, counting what
        # it would delete; a second, cheap pass deletes when that is safe.
        first_ok = frozenset({0, VANISHED, MAX_DELETE})
        first_argv = argv(True)
        # `dev-sync up` may have started this very pass while it was loading.
        early = await prestart.adopt_rsync(first_argv)
        if early is not None:
            started = min(started, early.started)  # its whole run, for the figures
            first = await self._adopted(early, first_ok, progress)
        else:
            first = await self._rsync(first_argv, ok=first_ok, progress=progress)
        stats = parse_stats(first.stdout)
        stats.head_start = early is not None
        pending = 0
        if first.returncode == MAX_DELETE:
            m = _SKIPPED.search(first.stderr)
            pending = int(m.group(1)) if m else 1
        if pending:
            local_empty = not any(os.scandir(self.local_root))
            self.guard.check(pending, stats.total + pending, local_empty=local_empty)
            second = await self._rsync(argv(False))
            stats.deleted = parse_stats(second.stdout).deleted
        self.remote_total = stats.total
        stats.seconds = time.monotonic() - started
        return stats

    # -- batches -------------------------------------------------------------

    async def push(self, changes: Sequence[tuple[str, bool]]) -> Stats:
        """Send one batch: (relative path, whole subtree?) pairs."""
        started = time.monotonic()
        wanted: dict[str, bool] = {}
        for rel, recursive in changes:
            if not rel:
                continue
            if not os.path.lexists(self.local_root / rel):
                # rsync deletes a missing path only if its parent is still
                # there: name the topmost vanished ancestor instead.
                top = self._vanished_ancestor(rel)
                if top != rel:
                    rel, recursive = top, True
            wanted[rel] = wanted.get(rel, False) or recursive
        listed: list[str] = []
        subtree = False
        gone_dirs: list[str] = []
        gone = 0
        for rel, recursive in wanted.items():
            if not os.path.lexists(self.local_root / rel):
                gone += 1
                if recursive:
                    gone_dirs.append(rel)
            elif recursive:
                subtree = True
            listed.append(rel)
        cleared = 0
        if gone_dirs:
            cleared = await self._clear_dirs(gone_dirs, gone - len(gone_dirs))
        elif gone:
            self.guard.check(gone, self.remote_total)
            self.guard.record(gone)
        stats = await self._push_listed(listed, subtree)
        stuck = [os.fsdecode(p) for p in _NONEMPTY.findall(stats.stderr)]
        stuck = [p for p in stuck if p in listed and not os.path.lexists(self.local_root / p)]
        if stuck:
            # Directories deleted locally that the watcher did not flag as such.
            cleared += await self._clear_dirs(stuck, 0)
            more = await self._push_listed(stuck, False)
            stats.deleted += more.deleted
        stats.deleted += cleared
        stats.seconds = time.monotonic() - started
        return stats

    def _vanished_ancestor(self, rel: str) -> str:
        top = rel
        parent = os.path.dirname(rel)
        while parent and not os.path.lexists(self.local_root / parent):
            top, parent = parent, os.path.dirname(parent)
        return top

    async def _push_listed(self, listed: list[str], subtree: bool) -> Stats:
        argv = [*self._base(), "--from0", "--files-from=-", "--delete-missing-args"]
        if subtree:
            argv.append("--delete")
        else:
            argv.append("--no-recursive")
        argv += [f"{self.local_root}/", self.destination]
        result = await self._rsync(argv, files=listed, ok=frozenset({0, VANISHED, PARTIAL}))
        stats = parse_stats(result.stdout)
        stats.warnings = [
            ln for ln in result.err.splitlines()
            if ln.strip() and not any(quiet in ln for quiet in _EXPECTED_NOISE)
        ]
        stats.stderr = result.stderr
        return stats

    async def _clear_dirs(self, dirs: list[str], other_deletions: int) -> int:
        """Empty remote directories deleted locally, keeping what the rules exclude.

        rsync's ``--force`` would delete an excluded ``node_modules`` inside
        them, so instead an empty directory of the same name is synced onto
        each one with ``--delete`` (which honours the filter rules); the now
        empty directories go in the following batch.
        """
        with tempfile.TemporaryDirectory(prefix="dev-sync-shadow-") as shadow:
            for rel in dirs:
                (Path(shadow) / rel).mkdir(parents=True, exist_ok=True)
            argv = [
                *self._base(), "--from0", "--files-from=-", "--delete", "--itemize-changes",
                f"{shadow}/", self.destination,
            ]
            dry = await self._rsync([*argv, "--dry-run"], files=dirs)
            count = sum(1 for ln in dry.stdout.splitlines() if ln.startswith(b"*deleting"))
            self.guard.check(count + len(dirs) + other_deletions, self.remote_total)
            done = await self._rsync(argv, files=dirs)
            cleared = sum(1 for ln in done.stdout.splitlines() if ln.startswith(b"*deleting"))
            self.guard.record(cleared + len(dirs) + other_deletions)
            return cleared


def local_rsync_version() -> tuple[int, ...] | None:
    """The local rsync's version, or None when it is missing."""
    exe = shutil.which("rsync")
    if exe is None:
        return None
    with contextlib.suppress(CommandError):
        return commands.parse_rsync_version(runner.run([exe, "--version"]).out.splitlines()[0])
    return None
