"""Start ``dev-sync up``'s first steps before the program has loaded.

Importing dev-sync (pydantic, asyncio, ...) takes a few hundred milliseconds,
and so does an SSH key exchange; doing them one after the other is a delay
every ``up`` pays. This module reads the config with the standard library,
starts the master connection, and lets :class:`dev_sync.ssh.SshMaster` adopt
it if the fully validated config asks for exactly the same command.

Threads then go one step further, for the common first ``up`` into a new
remote folder: once the master is ready one runs the remote probe
(:func:`dev_sync.remote.prepare`'s, same command line) while a process of its
own walks the tree for the ignore rules; if the probe has just created the root
(nothing there can be lost), the reconcile's first rsync pass, which never
deletes, starts as soon as :func:`validate` (called by the launcher, with the
same ``load_config`` the CLI then uses) has found the whole config valid.
The engine adopts each of them only if it would have run exactly the same
command line (:func:`adopt_probe`, :func:`adopt_rsync`); anything else is
stopped and waited for, and the normal path runs. So a config the CLI
rejects never gets an early rsync; at most the probe has created the empty
root with its marker, which the next ``up`` finds and uses. A ``.gitignore``
changed between the early walk and the engine's makes the rules differ: the
early pass is stopped, and what it had already sent that the new rules
exclude stays on the remote (excluded paths are never deleted).

Anything unusual (no config, odd values, a socket already there, another
environment, ``--adopt``) means no head start, never a different behaviour.
"""

from __future__ import annotations

import atexit
import contextlib
import os
import re
import subprocess
import sys
import threading
import time
import tomllib
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import IO, TYPE_CHECKING, Any

from dev_sync import commands, runner
from dev_sync.runner import CommandError
from dev_sync.target import READY, Target

if TYPE_CHECKING:
    from dev_sync.ignore import RuleSet

_started: tuple[list[str], subprocess.Popen[bytes]] | None = None
_head: HeadStart | None = None


def _explicit_config(args: Sequence[str]) -> Path | None:
    for i, arg in enumerate(args):
        if arg == "--config" and i + 1 < len(args):
            return Path(args[i + 1])
        if arg.startswith("--config="):
            return Path(arg.split("=", 1)[1])
    return None


def _config_path(args: Sequence[str]) -> Path | None:
    explicit = _explicit_config(args)
    if explicit is not None:
        return explicit
    here = Path.cwd()
    for folder in (here, *here.parents):
        candidate = folder / "dev-sync.toml"
        if candidate.is_file():
            return candidate
    return None


def _target(remote: Any, path: Path) -> Target | None:
    try:
        host, user, port = remote["host"], remote.get("user"), remote.get("port")
        ssh_config, timeout = remote.get("ssh_config"), remote.get("connect_timeout", 10.0)
    except (KeyError, TypeError, AttributeError):
        return None
    if not isinstance(host, str) or not host or host.startswith("-"):
        return None
    optional = ((user, str), (port, int), (ssh_config, str))
    if any(value is not None and not isinstance(value, kind) for value, kind in optional):
        return None
    if not isinstance(timeout, int | float):
        return None
    cfg = None
    if ssh_config is not None:
        p = Path(ssh_config).expanduser()
        cfg = p if p.is_absolute() else path.resolve().parent / p
    return Target(host, user, port, cfg, float(timeout))


def _early_target(path: Path) -> tuple[dict[str, Any], Target] | None:
    """The config's table and its ssh target, when an early connection is sure to be right."""
    try:
        data = tomllib.loads(path.read_text())
    except (OSError, ValueError):
        return None
    remote = data.get("remote")
    if "cloud" in data or (isinstance(remote, dict) and "cloud" in remote):
        return None  # the VM may be stopped or elsewhere: the cloud says where, later
    target = _target(remote, path)
    return None if target is None else (data, target)


@dataclass(frozen=True)
class Plan:
    """What the first reconcile of a new remote folder needs, read without pydantic."""

    target: Target
    local_root: Path
    remote_root: str
    rsync_path: str
    exclude: tuple[str, ...]
    gitignore: bool


def _personal_config_exists() -> bool:
    """Whether a personal config may pick another environment (see config.load_config)."""
    if os.environ.get("DEV_SYNC_PERSONAL_CONFIG") or os.environ.get("DEV_SYNC_ENV"):
        return True
    xdg = os.environ.get("XDG_CONFIG_HOME")
    base = Path(xdg) if xdg else Path.home() / ".config"
    return (base / "dev-sync" / "config.toml").exists()


_PLAIN_FLAGS = frozenset({"--once", "--json", "--allow-delete", "--forward"})


def _plan(args: Sequence[str], data: dict[str, Any], path: Path, target: Target) -> Plan | None:
    """The head start's plan, or None at the least doubt."""
    rest = list(args[1:])
    while rest:  # only flags known to change nothing here (not --adopt, not --env)
        arg = rest.pop(0)
        if arg == "--config" and rest:
            rest.pop(0)
        elif arg not in _PLAIN_FLAGS and not arg.startswith("--config="):
            return None
    if "env" in data or _personal_config_exists():
        return None
    remote, sync = data.get("remote"), data.get("sync", {})
    if not isinstance(remote, dict) or not isinstance(sync, dict):
        return None
    root, rsync = remote.get("path"), remote.get("rsync_path", "rsync")
    exclude, gitignore = sync.get("exclude", []), sync.get("gitignore", True)
    if not isinstance(root, str) or not isinstance(rsync, str) or not rsync:
        return None
    if not isinstance(gitignore, bool) or not isinstance(exclude, list):
        return None
    if not all(isinstance(p, str) and p.strip() and "\n" not in p for p in exclude):
        return None
    try:
        remote_root = commands.check_remote_root(root)
        commands.check_program(rsync)
        local_root = path.resolve().parent
    except (ValueError, OSError):
        return None
    return Plan(target, local_root, remote_root, rsync, tuple(exclude), gitignore)


def maybe_start(args: Sequence[str]) -> None:
    """If ``args`` is a foreground ``up``, start its master connection now."""
    global _started, _head
    if not args or args[0] != "up" or {"--detach", "-h", "--help"} & set(args):
        return
    path = _config_path(args)
    if path is None:
        return
    early = _early_target(path)
    if early is None:
        return
    data, target = early
    if os.path.exists(target.control_path()):
        return
    plan = _plan(args, data, path, target)
    argv = target.master_argv()
    try:
        proc = runner.spawn(argv)
    except (runner.CommandError, OSError):
        return
    _started = (argv, proc)
    atexit.register(discard)
    if plan is not None:
        _head = HeadStart(plan, proc)


def adopt(argv: Sequence[str]) -> subprocess.Popen[bytes] | None:
    """The early master if it was started with exactly ``argv``; else none (and it goes)."""
    global _started
    if _started is None:
        return None
    started_argv, proc = _started
    if list(argv) == started_argv:
        _started = None  # even if it already failed: its stderr says why
        return proc
    discard()
    return None


def discard() -> None:
    """Stop what nobody adopted (config error, a session already running, another target)."""
    global _started
    _drop_head()
    if _started is not None:
        proc = _started[1]
        _started = None
        proc.terminate()
        try:
            proc.wait(2)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


def validate(args: Sequence[str]) -> None:
    """Let the early rsync start once the whole config is known to be valid.

    Called by the launcher before the CLI loads: the CLI needs these modules
    first anyway, and validates the same file again. If it is invalid, or not
    what the head start read, nothing more starts (the CLI reports the error).
    """
    try:
        _validate(args)
    except Exception:  # never in the way of the CLI, which reports what is wrong
        _drop_head()


def _validate(args: Sequence[str]) -> None:
    head = _head
    if head is None:
        return
    from dev_sync.config import find_config, load_config
    from dev_sync.errors import DevSyncError

    plan = head.plan
    try:
        config = load_config(_explicit_config(args) or find_config(), None)
    except DevSyncError:
        _drop_head()  # the CLI says why
        return
    same = (
        Target.from_config(config) == plan.target
        and config.local_root == plan.local_root
        and config.remote.path == plan.remote_root
        and config.remote.rsync_path == plan.rsync_path
        and tuple(config.sync.exclude) == plan.exclude
        and config.sync.gitignore == plan.gitignore
    )
    if not same:
        _drop_head()
        return
    # As the CLI decides it: a progress bar only on a terminal, never with --json.
    progress = False
    if "--json" not in args:
        from rich.console import Console

        progress = Console(highlight=False).is_terminal
    head.release(progress)


async def adopt_probe(argv: Sequence[str]) -> runner.Result | None:
    """The early remote probe's result if it ran exactly ``argv`` (an ssh command line).

    Raises CommandError if it failed, as :meth:`SshMaster.run` would. A different
    command (or none started) stops everything begun early.
    """
    import asyncio

    head = _head
    if head is None:
        return None
    run = head.take_probe(list(argv))
    if run is None:
        await asyncio.to_thread(_drop_head)
        return None
    try:
        result = await asyncio.to_thread(run.result)
    except asyncio.CancelledError:
        await asyncio.to_thread(run.stop)
        raise
    if result.returncode != 0:
        raise CommandError(result.argv, result.returncode, result.stdout, result.stderr)
    return result


async def adopt_rsync(argv: Sequence[str]) -> Run | None:
    """The early first rsync pass if it was started with exactly ``argv``.

    Anything else started early is stopped first (and waited for), so the
    caller's own rsync never runs beside it.
    """
    import asyncio

    global _head
    head = _head
    if head is None:
        return None
    _head = None
    run = await asyncio.to_thread(head.take_rsync, list(argv))
    if run is None:
        await asyncio.to_thread(head.cancel)
    return run


def walked_rules(rules: RuleSet) -> RuleSet | None:
    """``rules`` with every .gitignore the early walk found loaded, without a walk
    of its own; None if there was none or it does not give the same rules.

    Blocking (waits for the walk). The rules are rebuilt from the same files,
    read again, and must come out exactly as the walk had them: a rule file
    changed meanwhile, or other settings, mean a walk of the caller's own.
    """
    head = _head
    return None if head is None else head.walked(rules)


def _drop_head() -> None:
    global _head
    head, _head = _head, None
    if head is not None:
        head.cancel()


class Run:
    """A command started early. Its output is read as it comes, since a full
    pipe would stall it while the program is still loading."""

    def __init__(self, argv: list[str]) -> None:
        self.argv = argv
        self.started = time.monotonic()
        self.proc = runner.spawn(argv)
        self._out = bytearray()
        self._err = bytearray()
        self._listener: Callable[[bytes], None] | None = None
        assert self.proc.stdout is not None and self.proc.stderr is not None
        self._readers = [
            threading.Thread(target=self._read_out, args=(self.proc.stdout,), daemon=True),
            threading.Thread(target=self._read_err, args=(self.proc.stderr,), daemon=True),
        ]
        for reader in self._readers:
            reader.start()

    def listen(self, listener: Callable[[bytes], None] | None) -> None:
        """Call ``listener`` (in a reader thread) with each output line from now on."""
        self._listener = listener

    def _read_out(self, stream: IO[bytes]) -> None:
        pending = b""
        while chunk := stream.read1(65536):  # type: ignore[attr-defined]
            self._out += chunk
            pending += chunk
            *lines, pending = re.split(rb"[\r\n]", pending)
            listener = self._listener
            if listener is not None:
                for line in lines:
                    listener(line)
        stream.close()

    def _read_err(self, stream: IO[bytes]) -> None:
        self._err += stream.read()
        stream.close()

    def result(self) -> runner.Result:
        """Wait for the command to end (blocking) and return what it left."""
        code = self.proc.wait()
        for reader in self._readers:
            reader.join()
        return runner.Result(tuple(self.argv), code, bytes(self._out), bytes(self._err))

    def stop(self) -> None:
        """Stop it and wait for it (blocking)."""
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(2)
            except subprocess.TimeoutExpired:
                self.proc.kill()
        self.result()


class HeadStart:
    """The thread that runs the probe, and the first rsync pass, while the program loads."""

    def __init__(self, plan: Plan, master: subprocess.Popen[bytes]) -> None:
        self.plan = plan
        self._lock = threading.Lock()
        self._cancelled = False
        self._released = False
        self._progress = False
        # The first pass's argv without and with progress, once the probe and the
        # walk allow it; whichever comes last of this and release() starts it.
        self._argvs: tuple[list[str], list[str]] | None = None
        self._spawned = False
        self._decided = threading.Event()  # set: nothing more will be started
        self._probe: Run | None = None
        self._rsync: Run | None = None
        self.probe_argv = commands.ssh_command(
            plan.target, commands.probe_argv(plan.remote_root, "create", plan.rsync_path)
        )
        # The engine learns that the master is ready from its stdout (the READY
        # line); this thread needs to know it first, so it reads the real pipe
        # and passes what it reads on through a new one.
        real = master.stdout
        assert real is not None
        read_end, self._relay = os.pipe()
        master.stdout = open(read_end, "rb")  # noqa: SIM115 - SshMaster owns and closes it
        self._rules: list[str] | None = None
        self._rule_files: list[str] = []
        self._walker = threading.Thread(target=self._read_rules, daemon=True)
        self._walker.start()
        self._thread = threading.Thread(target=self._main, args=(real,), daemon=True)
        self._thread.start()

    # -- the thread --------------------------------------------------------------

    def _main(self, real: IO[bytes]) -> None:
        try:
            if self._relay_until_ready(real):
                self._work()
        except Exception:  # a head start never changes the outcome
            self.cancel()
        finally:
            with self._lock:
                gave_up = self._argvs is None
            if gave_up:
                self._decided.set()
        for _ in iter(real.readline, b""):  # nothing more comes; close at the master's exit
            pass
        real.close()

    def _relay_until_ready(self, real: IO[bytes]) -> bool:
        try:
            for line in iter(real.readline, b""):
                if READY.encode() in line:
                    # Started before the engine can see READY, so that it finds
                    # the probe when it gets there.
                    self._start_probe()
                    os.write(self._relay, line)
                    return True
                os.write(self._relay, line)
            return False
        except OSError:
            return False
        finally:
            os.close(self._relay)

    def _work(self) -> None:
        probe = self._probe
        if probe is None:
            return
        done = probe.result()
        if done.returncode != 0:
            return
        info = commands.parse_probe(done.out)
        version = info.rsync_version
        if not info.fresh or version is None or version < commands.MIN_RSYNC:
            return
        self._walker.join()
        rules = self._rules
        if rules is None:
            return
        plan = self.plan
        base = commands.rsync_base(commands.rsync_rsh(plan.target), plan.rsync_path, rules)
        dest = commands.destination(plan.target, plan.remote_root)
        without, with_progress = (
            commands.reconcile_argv(base, plan.local_root, dest, fresh=True, progress=progress,
                                    first_pass=True)
            for progress in (False, True)
        )
        with self._lock:
            self._argvs = (without, with_progress)
            released = self._released
        if released:
            self._start_rsync()

    def _start_rsync(self) -> None:
        with self._lock:
            if self._argvs is not None and not self._spawned and not self._cancelled:
                self._spawned = True
                argv = self._argvs[1 if self._progress else 0]
                # If it cannot start, there is no head start: the engine runs it itself.
                with contextlib.suppress(Exception):
                    self._rsync = Run(argv)
        self._decided.set()

    def _read_rules(self) -> None:
        """The rsync filter rules, as the engine will have them; None if rsync cannot
        run here. The walk runs in a process of its own: in a thread here it would
        hold the interpreter lock the loading program needs."""
        plan = self.plan
        try:
            walker = subprocess.Popen(
                [sys.executable, "-P", "-c", _WALK, str(plan.local_root),
                 "1" if plan.gitignore else "0", *plan.exclude],
                stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL,
            )
            local = _local_rsync_version()
            out, _ = walker.communicate()
            if walker.returncode != 0 or local is None or local < commands.MIN_RSYNC:
                return
            rules, _, files = out.partition(b"\0\0")  # no entry is empty
            self._rules = [os.fsdecode(rule) for rule in (rules + b"\0").split(b"\0")[:-1]]
            self._rule_files = [os.fsdecode(f) for f in files.split(b"\0")[:-1]]
        except Exception:  # no head start then
            return

    def _start_probe(self) -> None:
        with self._lock:
            if self._cancelled:
                return
            try:
                self._probe = Run(self.probe_argv)
            except Exception:  # no head start then: the engine runs it itself
                return

    # -- the engine's side -------------------------------------------------------

    def release(self, progress: bool) -> None:
        """The config is valid: start the first pass now if it is ready (in the
        caller's thread, which holds the interpreter lock anyway), else as soon as
        it is."""
        with self._lock:
            self._progress = progress
            self._released = True
            ready = self._argvs is not None
        if ready:
            self._start_rsync()

    def walked(self, rules: RuleSet) -> RuleSet | None:
        """See :func:`walked_rules`."""
        from dev_sync.ignore import RULE_FILE, RuleSet

        plan = self.plan
        if (rules.root, rules.exclude, rules.gitignore) != (
            plan.local_root, plan.exclude, plan.gitignore
        ):
            return None
        self._walker.join()
        if self._rules is None:
            return None
        fresh = RuleSet(rules.root, rules.exclude, rules.gitignore)
        dirs = [f.removesuffix(RULE_FILE).removesuffix("/") for f in self._rule_files]
        for rel in sorted(dirs, key=lambda d: (d.count("/") + bool(d), d)):
            fresh.load_dir(rel)  # parents first: a rule file in an excluded folder is refused
        return fresh if fresh.rsync_filter_rules() == self._rules else None

    def take_probe(self, argv: list[str]) -> Run | None:
        with self._lock:
            run = self._probe
            if self._cancelled or run is None or run.argv != argv:
                return None
            return run

    def take_rsync(self, argv: list[str]) -> Run | None:
        """Blocking: waits for the thread to have started the rsync or given up."""
        with self._lock:
            if not self._released:
                return None  # nobody released it: not a session started by the CLI
        self._decided.wait()
        with self._lock:
            run, self._rsync = self._rsync, None
            if self._cancelled or run is None:
                return None
            if run.argv != argv:
                self._rsync = run  # cancel() stops it
                return None
            return run

    def cancel(self) -> None:
        """Stop whatever was started and not adopted; the thread starts nothing more."""
        with self._lock:
            self._cancelled = True
            rsync, self._rsync = self._rsync, None
        self._decided.set()
        if rsync is not None:
            rsync.stop()


# Loads every .gitignore as the engine does (dev_sync.engine._read_rules), then
# prints the rules, NUL-terminated, as the bytes rsync gets; an empty entry; and
# the rule files it read, NUL-terminated too (see HeadStart.walked).
_WALK = """
import os, sys
from pathlib import Path
from dev_sync.ignore import RuleSet, walk_dirs
root, gitignore, *exclude = sys.argv[1:]
rules = RuleSet(Path(root), exclude, gitignore == "1")
for _ in walk_dirs(rules):
    pass
sys.stdout.buffer.write(b"".join(os.fsencode(r) + b"\\0" for r in rules.rsync_filter_rules())
                        + b"\\0"
                        + b"".join(os.fsencode(f) + b"\\0" for f in rules.rule_files()))
"""


def _local_rsync_version() -> tuple[int, ...] | None:
    import shutil

    exe = shutil.which("rsync")
    if exe is None:
        return None
    try:
        banner = runner.run([exe, "--version"], timeout=10).out.splitlines()[0]
    except (CommandError, IndexError):
        return None
    return commands.parse_rsync_version(banner)
