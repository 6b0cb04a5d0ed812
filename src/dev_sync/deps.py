"""Dependency installs on the remote when a lock file changes.

Why: code synced to the VM is only half the story; when a teammate's commit
(or a branch switch) changes ``package-lock.json``, the remote ``node_modules``
is stale until someone runs ``npm install`` there. dev-sync notices the lock
file in the batch it just pushed and runs the install in that file's folder.

The pieces, each usable on its own:

* :class:`DepsConfig`: the ``[deps]`` section. Built-in presets (npm, yarn,
  pnpm, pip, poetry, uv, bundler, go) work with no configuration; each can be
  given another command or switched off, and ``[[deps.rule]]`` adds custom
  triggers (gitignore-style globs relative to the tree root).
* :func:`plan`: changed paths to :class:`InstallJob` s, one per folder and
  preset or rule, so a burst that touches a lock file five times, or two
  requirements files of one folder, installs once.
* :class:`InstallQueue`: runs jobs one at a time in submission order and folds
  a job into an identical one that is still waiting, so installs never overlap
  (two ``npm install`` in one folder corrupt ``node_modules``) and a burst
  during a long install costs one more run, not one per change.
* :func:`run_install`: one ssh command over the master, output streamed line by
  line, stopped on the remote when dev-sync stops or the connection dies.
* :func:`read_record` / :func:`write_record` / :func:`stale`: what was last
  installed, kept on the remote in ``<root>/.dev-sync/deps.json`` (a folder
  dev-sync never syncs or deletes). It lives with the installed files it
  describes, so a branch switched while dev-sync was off is caught at the next
  start, and a restart does not reinstall what is already in place.

The ``[deps]`` table itself lives in :mod:`dev_sync.sections`, so that
validating ``dev-sync.toml`` does not load this module (nor asyncio with it).
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import json
import logging
import os
import posixpath
import re
import shlex
import subprocess
import time
from collections import OrderedDict, deque
from collections.abc import Awaitable, Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import TYPE_CHECKING, Protocol

from dev_sync import runner
from dev_sync.ignore import RuleSet, walk_dirs
from dev_sync.sections import PRESETS as PRESETS
from dev_sync.sections import DepsConfig as DepsConfig

if TYPE_CHECKING:
    from dev_sync.services import Remote
    from dev_sync.ssh import SshMaster

log = logging.getLogger(__name__)

RECORD_PATH = ".dev-sync/deps.json"
"""The install record, relative to the remote root."""
TAIL_LINES = 20
# Longest output line kept (a minified bundle printed by a postinstall is one line).
_MAX_LINE = 4096
_SHA256 = re.compile(r"[0-9a-f]{64}")


# --------------------------------------------------------------------------
# Planning


@dataclass(frozen=True)
class _Trigger:
    name: str
    command: str
    per_file_dir: bool  # cwd "file" (presets always) or "root"
    matches: Callable[[str], bool]
    preset: bool


def _triggers(config: DepsConfig) -> list[_Trigger]:
    if not config.enabled:
        return []
    out = []
    for name, preset in PRESETS.items():
        conf = config.preset(name)
        if conf.enabled:
            out.append(_Trigger(name, conf.command or preset.command, True, preset.matches, True))
    for rule in config.rule:
        out.append(_Trigger(rule.name, rule.command, rule.cwd == "file", rule.matches, False))
    return out


def matches(rel: str, config: DepsConfig) -> bool:
    """Whether a change to ``rel`` can trigger anything (for filtering walks and batches)."""
    return any(t.matches(rel) for t in _triggers(config))


@dataclass(frozen=True)
class InstallJob:
    """One install to run: a command in one folder, and the files that asked for it."""

    key: str  # "<name>:<directory>": the identity the queue coalesces on
    directory: str  # relative to the tree root, "" for the root itself
    command: str  # run with sh -c, the files as "$@"
    files: tuple[str, ...]  # root-relative lock files that triggered it, sorted
    label: str  # for people: "npm in services/web"
    name: str  # preset or rule name

    @property
    def args(self) -> tuple[str, ...]:
        """The files as the command sees them: relative to its folder.

        A name starting with "-" is given as "./-name", so that a command such
        as ``cat "$@"`` cannot read it as an option.
        """
        out = []
        for f in self.files:
            rel = posixpath.relpath(f, self.directory or ".")
            out.append("./" + rel if rel.startswith("-") else rel)
        return tuple(out)


def _label(name: str, directory: str) -> str:
    return f"{name} in {directory}" if directory else f"{name} at the root"


def plan(
    changed: Iterable[str], config: DepsConfig, *, root: Path | None = None
) -> list[InstallJob]:
    """Map changed root-relative paths to install jobs: one per (folder, preset or rule).

    ``root``, when given, drops paths that are no longer regular files there:
    a deleted lock file installs nothing (there is nothing to install from).
    Order: preset jobs first, by folder (so the root installs before the
    packages inside it) and preset order, then rules in the order written,
    because rules usually consume what installs produce (code generation,
    migrations).
    """
    triggers = _triggers(config)
    if not triggers:
        return []
    groups: dict[tuple[int, str], set[str]] = {}
    for rel in changed:
        rel = rel.strip("/")
        if not rel:
            continue
        if root is not None and not (root / rel).is_file():
            continue
        for index, t in enumerate(triggers):
            if t.matches(rel):
                directory = posixpath.dirname(rel) if t.per_file_dir else ""
                groups.setdefault((index, directory), set()).add(rel)

    def order(item: tuple[tuple[int, str], set[str]]) -> tuple[int, int | str, str | int]:
        (index, directory), _ = item
        if triggers[index].preset:
            return (0, directory, index)
        return (1, index, directory)

    jobs = []
    for (index, directory), files in sorted(groups.items(), key=order):
        t = triggers[index]
        jobs.append(InstallJob(
            key=f"{t.name}:{directory}",
            directory=directory,
            command=t.command,
            files=tuple(sorted(files)),
            label=_label(t.name, directory),
            name=t.name,
        ))
    return jobs


def changed_lock_files(
    rules: RuleSet, changes: Iterable[tuple[str, bool]], config: DepsConfig
) -> list[str]:
    """The existing files a pushed batch touched that a preset or rule matches.

    ``changes`` are a batch's ``(path, recursive)`` pairs: a recursive entry is
    a folder that arrived as a whole (a ``git checkout``, a moved-in tree), so
    the lock files inside it are found by a pruned walk. Deleted paths drop out.
    """
    triggers = _triggers(config)
    if not triggers:
        return []
    found: set[str] = set()
    for rel, recursive in changes:
        rel = rel.strip("/")
        if recursive:
            path = rules.root / rel if rel else rules.root
            if path.is_dir() and not path.is_symlink():
                found.update(_matching_files(rules, rel, triggers))
                continue
        # The name first: a burst pushes hundreds of files, hardly any a lock file.
        if rel and any(t.matches(rel) for t in triggers) and (rules.root / rel).is_file():
            found.add(rel)
    return sorted(found)


def _matching_files(rules: RuleSet, start: str, triggers: Sequence[_Trigger]) -> Iterator[str]:
    """Files under ``start`` (a folder known to be included) that a trigger matches."""
    stack = [start]
    while stack:
        rel_dir = stack.pop()
        try:
            with os.scandir(rules.root / rel_dir if rel_dir else rules.root) as it:
                entries = [(e.name, _kind(e)) for e in it]
        except OSError:
            continue
        for name, kind in entries:
            rel = f"{rel_dir}/{name}" if rel_dir else name
            if kind is None or rules.is_excluded_child(rel, is_dir=kind == "dir"):
                continue
            if kind == "dir":
                stack.append(rel)
            elif any(t.matches(rel) for t in triggers):
                yield rel


def _kind(entry: os.DirEntry[str]) -> str | None:
    try:
        if entry.is_dir(follow_symlinks=False):
            return "dir"
        if entry.is_file(follow_symlinks=False):
            return "file"
    except OSError:
        pass
    return None


# --------------------------------------------------------------------------
# Scheduling


class InstallQueue:
    """Runs install jobs one at a time, in submission order, folding duplicates.

    * ``submit`` never blocks: the watcher and pusher must keep going while
      ``npm install`` takes a minute.
    * One worker, so installs never overlap (two package managers writing one
      tree, or one lock file, corrupt it).
    * A job whose key is already waiting is merged into it (files unioned,
      the newest command kept), keeping its place in line.
    * A job whose key is running waits for one more run after it, however
      many submits arrive meanwhile: the running install may have read the
      lock file before the last change landed.
    * A failing job (``run`` returns False or raises) does not stop the queue.

    Create it inside the event loop that will run it.
    """

    def __init__(self, run: Callable[[InstallJob], Awaitable[bool]]) -> None:
        self._run = run
        self._waiting: OrderedDict[str, InstallJob] = OrderedDict()
        self._wake = asyncio.Event()
        self._idle = asyncio.Event()
        self._idle.set()
        self._worker: asyncio.Task[None] | None = None
        self._closed = False
        self.running: InstallJob | None = None
        self.results: dict[str, bool] = {}
        """The outcome of the last finished run of each key."""

    @property
    def pending(self) -> list[InstallJob]:
        """Jobs waiting to run, next first."""
        return list(self._waiting.values())

    def submit(self, jobs: Iterable[InstallJob]) -> None:
        if self._closed:
            raise RuntimeError("InstallQueue is closed")
        added = False
        for job in jobs:
            queued = self._waiting.get(job.key)
            if queued is not None:
                files = tuple(sorted(set(queued.files) | set(job.files)))
                job = replace(job, files=files)
            self._waiting[job.key] = job  # an existing key keeps its position
            added = True
        if not added:
            return
        self._idle.clear()
        self._wake.set()
        if self._worker is None:
            self._worker = asyncio.create_task(self._work(), name="dev-sync-installs")

    async def idle(self) -> None:
        """Return once nothing is waiting or running."""
        await self._idle.wait()

    async def close(self) -> None:
        """Stop the worker, cancelling a running install; waiting jobs are dropped."""
        self._closed = True
        self._waiting.clear()
        worker, self._worker = self._worker, None
        if worker is not None:
            worker.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await worker
        self.running = None
        self._idle.set()

    async def _work(self) -> None:
        while True:
            if not self._waiting:
                self._idle.set()
                self._wake.clear()
                await self._wake.wait()
                continue
            _, job = self._waiting.popitem(last=False)
            self.running = job
            try:
                ok = await self._run(job)
            except asyncio.CancelledError:
                raise
            except Exception:
                # A bug in ``run``, not a failed install (that returns False):
                # log it, but keep serving the other folders.
                log.exception("install %s raised", job.label)
                ok = False
            finally:
                self.running = None
            self.results[job.key] = ok


# --------------------------------------------------------------------------
# Remote execution

# $1 = remote root, $2 = folder relative to it ("" for the root), $3 = the
# command, $4... = the files (relative to that folder).
# stdin is our pipe, which dev-sync holds open and never writes: its EOF means
# dev-sync stopped or the connection died, and then the install is killed (its
# whole session when setsid exists), so an abandoned `npm install` cannot run
# on beside the next one. The command itself gets /dev/null: nothing prompts.
# setsid does not fork here (a background job of a shell without job control
# is never a process group leader), so $! is the new session's leader.
_INSTALL = r"""
dir=$1${2:+/$2}; cmd=$3; shift 3
cd -- "$dir" 2>/dev/null || { printf 'dev-sync: cannot enter %s on the remote\n' "$dir"; exit 1; }
exec 3<&0 2>&1
if command -v setsid >/dev/null 2>&1; then
  setsid sh -c "$cmd" sh "$@" </dev/null 3<&- &
else
  sh -c "$cmd" sh "$@" </dev/null 3<&- &
fi
pid=$!
{ cat >/dev/null 2>&1; kill -TERM -"$pid" 2>/dev/null || kill -TERM "$pid" 2>/dev/null; } <&3 &
watch=$!
exec 3<&-
wait "$pid"; rc=$?
kill "$watch" 2>/dev/null
exit "$rc"
"""


@dataclass(frozen=True)
class InstallResult:
    """How an install ended: exit code, wall time, and its last lines for the error report."""

    job: InstallJob
    returncode: int
    duration: float  # seconds
    tail: tuple[str, ...]

    @property
    def ok(self) -> bool:
        return self.returncode == 0

    @property
    def command_not_found(self) -> bool:
        """sh's 127: the tool is missing, or not on PATH for non-interactive ssh shells
        (nvm, asdf and pyenv often set PATH only in interactive rc files)."""
        return self.returncode == 127


def _target(remote_root: str, directory: str) -> str:
    root = remote_root.rstrip("/") or "/"
    return posixpath.join(root, directory) if directory else root


def install_argv(remote_root: str, job: InstallJob) -> list[str]:
    """The remote argv of :func:`run_install`: a fixed script, everything else as data."""
    return command_argv(remote_root, job.directory, job.command, job.args)


def command_argv(
    remote_root: str, directory: str, command: str, args: Sequence[str] = (),
    *, label: str = "dev-sync-install",
) -> list[str]:
    """The remote argv that runs ``sh -c COMMAND sh ARGS...`` in ``directory`` of the root.

    The same fixed script as the installs (so it is stopped on the remote when
    dev-sync stops or the connection dies); ``args`` reach the command verbatim
    as ``"$@"``, so ``command = 'exec "$@"'`` runs an argument list as it is.
    """
    return ["sh", "-c", _INSTALL, label, remote_root, directory, command, *args]


@dataclass(frozen=True)
class StreamResult:
    """How a streamed remote command ended: exit code, wall time and its last lines."""

    returncode: int
    duration: float  # seconds
    tail: tuple[str, ...]


class Streamer(Protocol):
    """Runs a remote command and hands its output over as it comes (the agent's channel)."""

    async def stream(
        self, remote_argv: Sequence[str], on_output: Callable[[bytes], None]
    ) -> int | None:
        """The exit code, or None when it cannot run the command (then ssh does)."""
        ...


class _Lines:
    """Cuts streamed output into lines; a line redrawn with \\r counts as its last state."""

    def __init__(self, on_line: Callable[[str], None]) -> None:
        self.on_line = on_line
        self.tail: deque[str] = deque(maxlen=TAIL_LINES)
        self.buf = b""

    def emit(self, raw: bytes) -> None:
        text = raw.decode("utf-8", "replace").rstrip("\r")
        text = text.rsplit("\r", 1)[-1][:_MAX_LINE]
        self.tail.append(text)
        self.on_line(text)

    def feed(self, chunk: bytes) -> None:
        self.buf += chunk
        *lines, self.buf = self.buf.split(b"\n")
        for line in lines:
            self.emit(line)
        if len(self.buf) > _MAX_LINE:  # a line that never ends: keep only its last redraw
            cut = self.buf.rfind(b"\r")
            self.buf = self.buf[cut + 1:] if cut >= 0 else self.buf
            if len(self.buf) > _MAX_LINE:
                self.emit(self.buf)
                self.buf = b""

    def close(self) -> None:
        if self.buf:
            self.emit(self.buf)
            self.buf = b""


async def stream(
    master: SshMaster, remote_argv: Sequence[str], on_line: Callable[[str], None],
    *, via: Streamer | None = None,
) -> StreamResult:
    """Run ``remote_argv`` on the remote and hand its output to ``on_line`` line by line.

    Through ``via`` (the agent) when it can, else over the master.
    stdout and stderr are merged; a progress line redrawn with carriage
    returns is reported as its last state. A missing tool or a lost
    connection end as a non-zero result (255 with a dead master is the
    connection), never as an exception. Cancelling closes the command's
    stdin, which stops a command started by :func:`command_argv` on the remote.
    """
    started = time.monotonic()
    lines = _Lines(on_line)
    if via is not None:
        code = await via.stream(remote_argv, lines.feed)
        if code is not None:
            lines.close()
            return StreamResult(code, time.monotonic() - started, tuple(lines.tail))
    argv = master.command(remote_argv)
    try:
        proc = await runner.start(argv, stdin=subprocess.PIPE, stderr=subprocess.STDOUT)
    except runner.CommandError as exc:  # no ssh binary
        lines.emit(exc.stderr)
        return StreamResult(exc.returncode, time.monotonic() - started, tuple(lines.tail))
    assert proc.stdout is not None
    try:
        while chunk := await proc.stdout.read(65536):
            lines.feed(chunk)
        lines.close()
        code = await proc.wait()
    except BaseException:
        await runner.terminate(proc)
        raise
    finally:
        if proc.stdin is not None:
            proc.stdin.close()
    return StreamResult(code, time.monotonic() - started, tuple(lines.tail))


async def run_install(
    master: SshMaster, remote_root: str, job: InstallJob, on_line: Callable[[str], None],
    *, via: Streamer | None = None,
) -> InstallResult:
    """Run ``job`` on the remote and stream its output (stdout and stderr merged).

    Lines reach ``on_line`` as they arrive; a progress line redrawn with
    carriage returns is reported as its last state. A missing folder, a
    missing tool or a lost connection end as a non-zero result (255 with a
    dead master is the connection), never as an exception. Cancelling stops
    the remote command too.
    """
    result = await stream(master, install_argv(remote_root, job), on_line, via=via)
    return InstallResult(job, result.returncode, result.duration, result.tail)


def rerun_hint(
    job: InstallJob, host: str, remote_root: str, *, ssh_args: Sequence[str] = ()
) -> str:
    """The ssh command a user can paste to run ``job`` again by hand (with a terminal).

    It runs the same ``sh -c`` with the same positional files as
    :func:`run_install`, so a command using ``"$@"`` behaves the same.
    ``ssh_args`` are extra options such as ``-F FILE`` or ``-p PORT``.
    """
    return rerun_command(host, _target(remote_root, job.directory), job.command, job.args,
                         ssh_args=ssh_args)


def rerun_command(
    host: str, directory: str, command: str, args: Sequence[str] = (),
    *, ssh_args: Sequence[str] = (),
) -> str:
    """The ssh command line that runs ``sh -c COMMAND sh ARGS...`` in the remote ``directory``."""
    remote = " ".join([
        "cd", shlex.quote(directory), "&&",
        runner.remote_command(["sh", "-c", command, "sh", *args]),
    ])
    return shlex.join(["ssh", "-t", *ssh_args, host, remote])


# --------------------------------------------------------------------------
# The record of what was installed (on the remote)

# $1 = remote root, $2 = a file name in <root>/.dev-sync/. A missing file is
# not an error; an unreadable one is.
_READ = r"""
f=$1/.dev-sync/$2
if [ -f "$f" ]; then cat -- "$f"; fi
"""

# $1 = remote root, $2 = a file name; the content arrives on stdin. Temp file
# then rename, so a reader (or a dropped connection mid-write) never sees half.
_WRITE = r"""
d=$1/.dev-sync
mkdir -p -- "$d" || exit
t=$d/$2.tmp.$$
if cat > "$t" && mv -f -- "$t" "$d/$2"; then exit 0; fi
rm -f -- "$t"; exit 1
"""


async def read_state(remote: Remote, root: str, name: str) -> bytes:
    """A file of ``<root>/.dev-sync/`` on the remote (empty if missing); raises
    :class:`runner.CommandError` when it cannot be asked."""
    return (await remote.run(["sh", "-c", _READ, "dev-sync-record", root, name])).stdout


async def write_state(remote: Remote, root: str, name: str, body: bytes) -> None:
    """Replace a file of ``<root>/.dev-sync/`` on the remote atomically."""
    await remote.run(["sh", "-c", _WRITE, "dev-sync-record", root, name], input=body)


async def read_record(master: Remote, root: str) -> dict[str, str]:
    """The remote record: lock file (root-relative) -> sha256 of what was installed.

    A missing or corrupt record reads as empty (everything is stale, so it
    heals itself); a failure to ask (connection lost) raises
    :class:`runner.CommandError`, since "empty" would reinstall everything.
    """
    raw = await read_state(master, root, posixpath.basename(RECORD_PATH))
    try:
        data = json.loads(raw or b"{}")
    except ValueError:
        return {}
    files = data.get("files") if isinstance(data, dict) else None
    if not isinstance(files, dict):
        return {}
    return {
        k: v for k, v in files.items()
        if isinstance(k, str) and isinstance(v, str) and _SHA256.fullmatch(v)
    }


async def write_record(master: Remote, root: str, record: Mapping[str, str]) -> None:
    """Replace the remote record atomically; raises :class:`runner.CommandError` on failure."""
    body = json.dumps({"version": 1, "files": dict(sorted(record.items()))}, indent=1)
    await write_state(master, root, posixpath.basename(RECORD_PATH), body.encode() + b"\n")


def lock_files(rules: RuleSet, config: DepsConfig) -> list[str]:
    """Every file of the local tree that a preset or rule matches, root-relative, sorted.

    The same pruned walk as the sync (never inside node_modules or an
    excluded folder). It walks a fresh copy of ``rules`` because walking loads
    .gitignore files into the rule set, and the caller may run this in a
    thread while the event loop uses the original.
    """
    triggers = _triggers(config)
    if not triggers:
        return []
    fresh = RuleSet(rules.root, rules.exclude, rules.gitignore)
    found = []
    for rel_dir in walk_dirs(fresh):
        try:
            with os.scandir(rules.root / rel_dir if rel_dir else rules.root) as it:
                names = [e.name for e in it if _kind(e) == "file"]
        except OSError:
            continue
        for name in names:
            rel = f"{rel_dir}/{name}" if rel_dir else name
            if not fresh.is_excluded_child(rel, is_dir=False) and any(
                t.matches(rel) for t in triggers
            ):
                found.append(rel)
    return sorted(found)


def hash_file(path: Path) -> str:
    """sha256 of a file's contents, hex: a lock file rewritten unchanged is not a change."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(1 << 20):
            digest.update(chunk)
    return digest.hexdigest()


def local_hashes(root: Path, files: Iterable[str]) -> dict[str, str]:
    """:func:`hash_file` of each root-relative file; files that vanished are left out."""
    out = {}
    for rel in files:
        with contextlib.suppress(OSError):
            out[rel] = hash_file(root / rel)
    return out


def stale(local_hashes: Mapping[str, str], record: Mapping[str, str]) -> list[str]:
    """Lock files whose contents differ from what was last installed (or never were)."""
    return sorted(rel for rel, digest in local_hashes.items() if record.get(rel) != digest)
