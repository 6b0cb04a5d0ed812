"""Services on the remote: what runs there, and restarting it when its code changes.

A service is a long-running command on the remote (``[services.NAME]`` in
``dev-sync.toml``). dev-sync hands it to a process manager that already knows
how to keep programs alive (Supervisor, PM2, systemd user units), or runs it
itself (``manager = "command"``), and after a batch lands it restarts the
services whose ``restart_on`` patterns match what changed.

Design points:

* **Every manager sees the same launcher.** For each service dev-sync writes
  ``<root>/.dev-sync/services/NAME.sh`` (cd, exports, ``exec /bin/sh -c
  COMMAND``, each value quoted by :func:`shlex.quote`) and the manager runs
  ``/bin/sh`` on that file. So the user's command, environment and folder never
  pass through the manager's own config syntax (supervisord strips `` ;``
  and `` #`` as inline comments, systemd expands ``%`` and ``$``), the launcher
  is re-read at every start (a changed command takes effect at the next
  restart), and all managers behave alike.
* **Few round trips.** Status, restart and logs are one remote command each,
  an install one or two: a fixed ``sh`` script that gets every path and value
  as a positional argument, never pasted into its text (see
  :mod:`dev_sync.remote` for the same pattern).
* **Crash loops stop.** :func:`restart_and_check` watches a restarted service
  for a few seconds and reports a crash with the tail of its log instead of
  restarting again; the generated configs cap the managers' own retries
  (Supervisor ``startretries``, PM2 ``max_restarts``, systemd
  ``StartLimitBurst``), so a half-finished edit cannot start a restart storm.
* **No root, no system config.** The Supervisor adapter runs a private
  ``supervisord`` per project, its files (and its socket, unless that path is
  too long for one) in the project's ``.dev-sync`` folder; systemd units are
  user units; PM2 runs as the remote user. Launchers and logs live in that
  folder too, which rsync never syncs nor deletes (``ignore.INTERNAL_EXCLUDES``).
"""

from __future__ import annotations

import asyncio
import functools
import hashlib
import json
import os
import posixpath
import re
import shlex
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Literal, Protocol

from dev_sync import runner
from dev_sync.errors import ConnectionFailed, DevSyncError, UsageError
from dev_sync.ignore import _parse_line, _Rules
from dev_sync.sections import ManagerName as ManagerName
from dev_sync.sections import ServiceConfig as ServiceConfig
from dev_sync.sections import ServiceName as ServiceName

ServiceState = Literal["running", "stopped", "starting", "crashed", "unknown"]

# The folder on the remote (under the remote root) that holds everything below.
STATE_DIR = ".dev-sync"

_ANSI_RE = re.compile(r"\x1b\[[0-9;?]*[A-Za-z]")
# "sh: 1: pm2: not found", "bash: line 1: pm2: command not found", our own need().
_NOT_FOUND_RE = re.compile(r"([^\s:]+): (?:command )?not found")


# --------------------------------------------------------------------------
# Names, and which changes restart what


def program_name(name: str, service: ServiceConfig) -> str:
    """The service's name inside its manager."""
    return service.program or name


@functools.lru_cache(maxsize=256)
def _compile(patterns: tuple[str, ...]) -> _Rules:
    parsed = (_parse_line(os.fsencode(p)) for p in patterns)
    return _Rules([p for p in parsed if p is not None])


def matches_restart_on(patterns: Sequence[str], rel: str) -> bool:
    """Whether a changed path (relative to the tree root) is covered by ``patterns``.

    gitignore semantics: the last matching pattern wins, ``!`` negates, and a
    path inside a matched folder is matched whatever the rules say about the
    path itself. A folder changed as a whole is passed with a trailing ``/``;
    it matches a pattern naming it or everything in it (``api/``, ``api/**``),
    not one naming only some files in it (``*.py``): pass the files for that.
    """
    compiled = _compile(tuple(patterns))
    if not compiled:
        return False
    is_dir = rel.endswith("/")
    parts = [p for p in rel.split("/") if p and p != "."]
    if not parts:
        return False
    for depth in range(1, len(parts)):
        hit = compiled.last_match(os.fsencode("/".join(parts[:depth])), True)
        if hit is not None and not hit.negated:
            return True
    path = os.fsencode("/".join(parts))
    hit = compiled.last_match(path, is_dir)
    if hit is not None:
        return not hit.negated
    if is_dir:
        # A name no literal pattern can hold: only "dir/*", "dir/**"-like patterns match it.
        hit = compiled.last_match(path + b"/\x01", False)
        return hit is not None and not hit.negated
    return False


def services_to_restart(
    changed: Iterable[str], services: Mapping[str, ServiceConfig]
) -> dict[str, str]:
    """Service name -> the first changed path that matched its ``restart_on``.

    The path is for the log line ("restarting api (services/api/server.py
    changed)"): users of every tool in this space ask which file caused a
    restart. Services that reload themselves (``reload = "self"``) never appear.
    """
    paths = list(changed)
    found: dict[str, str] = {}
    for name, service in services.items():
        if service.reload == "self" or not service.restart_on:
            continue
        for rel in paths:
            if matches_restart_on(service.restart_on, rel):
                found[name] = rel
                break
    return found


# --------------------------------------------------------------------------
# Results


@dataclass(frozen=True)
class ServiceStatus:
    """One service as its manager sees it, in terms common to every manager."""

    name: str
    state: ServiceState
    pid: int | None = None
    uptime_s: float | None = None
    restarts: int | None = None  # restarts counted by the manager (None: it does not count)
    port: int | None = None
    detail: str = ""  # the manager's own words: "Exited too quickly", "errored", ...


@dataclass(frozen=True)
class RestartOutcome:
    """What :func:`restart_and_check` saw after restarting one service."""

    name: str
    ok: bool
    status: ServiceStatus  # the last status seen
    problem: str = ""  # why it is judged crash-looping ("it exited: ...")
    log_tail: str = ""  # the end of its log when not ok

    @property
    def crash_looping(self) -> bool:
        return not self.ok


# --------------------------------------------------------------------------
# Talking to the remote


class Remote(Protocol):
    """What the adapters need from a connection: :class:`dev_sync.ssh.SshMaster` has it."""

    async def run(
        self, remote_argv: Sequence[str], *, check: bool = True, input: bytes | None = None
    ) -> runner.Result: ...


class ProcessManager(Protocol):
    """One process manager on the remote, holding the services assigned to it.

    Methods take dev-sync's service names (the ``[services.NAME]`` keys) and
    raise :class:`DevSyncError` with a fix when the manager is missing, not
    running, or does not know the service. A service that fails to start is
    not an error: it shows in :meth:`status` as ``crashed``.
    """

    kind: ManagerName
    services: Mapping[str, ServiceConfig]

    async def install(self) -> list[str]:
        """Define the services, start the manager if needed, start what is not running.

        Returns the names whose definition changed (restarted if they were running).
        """
        ...

    async def status(self, names: Sequence[str] | None = None) -> dict[str, ServiceStatus]:
        """Status of ``names`` (default: all of this manager's services), in one round trip."""
        ...

    async def restart(self, name: str) -> None: ...

    async def stop(self, name: str) -> None: ...

    async def logs(self, name: str, lines: int = 40) -> str:
        """The last ``lines`` lines the service wrote (stdout and stderr)."""
        ...

    def follow_argv(self, name: str, lines: int = 40) -> list[str]:
        """A remote argv that streams the log until interrupted (run it with ssh)."""
        ...

    async def shutdown(self) -> None:
        """Stop every service dev-sync defined here, and the manager if dev-sync owns it."""
        ...


def launcher_text(name: str, service: ServiceConfig, remote_root: str) -> str:
    """The ``sh`` script every manager runs for a service it got from dev-sync.

    Values are quoted with :func:`shlex.quote`, so any command, folder or
    environment value arrives as written.
    """
    assert service.command is not None, "adopted services have no launcher"
    cwd = posixpath.normpath(posixpath.join(remote_root, service.cwd))
    env = dict(service.env)
    if service.port is not None:
        env.setdefault("PORT", str(service.port))
    lines = [
        f"# dev-sync launcher for service {name} (generated from dev-sync.toml; "
        "edits are overwritten)",
        f"cd {shlex.quote(cwd)} || exit 126",
    ]
    lines += [f"export {key}={shlex.quote(val)}" for key, val in env.items()]
    words = _simple_command(service.command)
    if words is not None:
        # Exec'd directly, the manager's pid is the server's own (and its
        # signals reach it), rather than a shell waiting for it.
        lines.append(f"exec {shlex.join(words)}")
    else:
        lines.append(f"exec /bin/sh -c {shlex.quote(service.command)}")
    return "\n".join(lines) + "\n"


_SHELL_SYNTAX = frozenset(";&|<>()$`*?[]{}~#\n\\")


def _simple_command(command: str) -> list[str] | None:
    """The words of a command that needs no shell (no pipes, globs, variables...)."""
    if any(ch in _SHELL_SYNTAX for ch in command):
        return None
    try:
        words = shlex.split(command)
    except ValueError:
        return None
    if not words or "=" in words[0]:
        return None
    return words


class _Paths:
    """Where dev-sync keeps a project's service files on the remote."""

    def __init__(self, remote_root: str) -> None:
        self.root = remote_root.rstrip("/") or "/"
        self.base = posixpath.join(self.root, STATE_DIR)

    def launcher(self, name: str) -> str:
        return f"{self.base}/services/{name}.sh"

    def log(self, name: str) -> str:
        return f"{self.base}/logs/{name}.log"


# Shell functions shared by the install scripts.
# put LABEL PATH CONTENT: write CONTENT to PATH only if it differs (atomically,
# through a temporary file) and print "created LABEL" or "changed LABEL".
# need PROGRAM: exit 127 with the shell's own wording when it is missing.
_SH_COMMON = r"""
changed=
put() {
  mkdir -p -- "$(dirname -- "$2")" || exit 1
  if [ -f "$2" ]; then
    [ "$(cat -- "$2")" = "$(printf '%s' "$3")" ] && return 0
    how=changed
  else
    how=created
  fi
  printf '%s' "$3" > "$2.tmp.$$" && mv -f -- "$2.tmp.$$" "$2" || exit 1
  [ "$how" = changed ] && changed="$changed/$1/"
  echo "$how $1"
}
need() {
  command -v "$1" >/dev/null 2>&1 || { echo "$1: command not found" >&2; exit 127; }
}
"""


def _put_args(files: Sequence[tuple[str, str, str]]) -> list[str]:
    """Positional arguments for a ``put`` loop: the count, then label/path/content triples."""
    args = [str(len(files))]
    for label, path, content in files:
        args += [label, path, content]
    return args


_SH_PUT_LOOP = r"""
n=$1; shift
while [ "$n" -gt 0 ]; do put "$1" "$2" "$3"; shift 3; n=$((n - 1)); done
"""


def _changes(out: str) -> tuple[set[str], set[str]]:
    """Labels that ``put`` reported as created and as changed."""
    created: set[str] = set()
    changed: set[str] = set()
    for line in out.splitlines():
        how, _, label = line.partition(" ")
        if how == "created":
            created.add(label)
        elif how == "changed":
            changed.add(label)
    return created, changed


def _last_line(result: runner.Result) -> str:
    text = _ANSI_RE.sub("", result.err + "\n" + result.out)
    lines = [ln.strip() for ln in text.splitlines() if ln.strip()]
    return lines[-1] if lines else f"exit code {result.returncode}"


def _tail_lines(text: str, lines: int) -> str:
    """The last ``lines`` lines of ``text``, trailing blank lines not counted."""
    all_lines = text.rstrip().splitlines()
    kept = all_lines[-lines:] if lines > 0 else []
    return "\n".join(kept) + ("\n" if kept else "")


class _Adapter:
    """What every adapter shares: the remote, the services, name checks, error mapping."""

    kind: ManagerName
    missing_fix: str = ""

    def __init__(
        self,
        remote: Remote,
        remote_root: str,
        project: str,
        services: Mapping[str, ServiceConfig],
        *,
        prefix: Sequence[str] = (),
    ) -> None:
        self.remote = remote
        self.paths = _Paths(remote_root)
        self.project = project
        self.services: Mapping[str, ServiceConfig] = dict(services)
        # Put before every remote command, e.g. ["env", "PATH=/opt/bin:/usr/bin"].
        self.prefix = list(prefix)

    def _check_name(self, name: str) -> ServiceConfig:
        service = self.services.get(name)
        if service is None:
            known = ", ".join(sorted(self.services)) or "none"
            raise UsageError(
                f"no service named {name!r} under {self.kind}",
                f"known services: {known} (see [services] in dev-sync.toml)",
            )
        return service

    def _names(self, names: Sequence[str] | None) -> list[str]:
        if names is None:
            return list(self.services)
        for name in names:
            self._check_name(name)
        return list(names)

    def program(self, name: str) -> str:
        return program_name(name, self._check_name(name))

    def _defined(self) -> dict[str, ServiceConfig]:
        return {n: s for n, s in self.services.items() if not s.adopted}

    async def _run(
        self, argv: Sequence[str], *, input: bytes | None = None, tool: str = ""
    ) -> runner.Result:
        """Run on the remote; a missing program or a lost connection raises, nothing else."""
        result = await self.remote.run([*self.prefix, *argv], check=False, input=input)
        if result.returncode == 255 and not result.out:
            raise ConnectionFailed(
                f"the connection to the remote was lost: {_last_line(result)}",
                "it will be retried",
            )
        if result.returncode == 127:
            named = _NOT_FOUND_RE.search(result.err)
            missing = named.group(1) if named else tool or argv[0]
            raise DevSyncError(
                f"{missing} is not installed on the remote ({_last_line(result)})",
                self.missing_fix,
            )
        return result

    def _script(self, script: str, *args: str) -> list[str]:
        return ["/bin/sh", "-c", _SH_COMMON + script, "dev-sync", *args]


# --------------------------------------------------------------------------
# Supervisor

_SUPERVISOR_STATES: dict[str, ServiceState] = {
    "RUNNING": "running",
    "STARTING": "starting",
    "BACKOFF": "crashed",
    "FATAL": "crashed",
    "EXITED": "crashed",
    "STOPPED": "stopped",
    "STOPPING": "stopped",
    "UNKNOWN": "unknown",
}
_SUPERVISOR_LINE = re.compile(r"^(\S+)\s+([A-Z]+)\b\s*(.*)$")
_SUPERVISOR_RUNNING = re.compile(r"pid (\d+), uptime (?:(\d+) days?, )?(\d+):(\d\d):(\d\d)")


def parse_supervisor_status(text: str) -> dict[str, ServiceStatus]:
    """Parse ``supervisorctl status`` lines, keyed by program name.

    ``web  RUNNING   pid 123, uptime 1 day, 0:00:05`` and ``crash  BACKOFF
    Exited too quickly``; error lines (``x: ERROR (no such process)``) are skipped.
    """
    found: dict[str, ServiceStatus] = {}
    for line in text.splitlines():
        m = _SUPERVISOR_LINE.match(line.strip())
        if m is None or m.group(2) not in _SUPERVISOR_STATES:
            continue
        name, raw, rest = m.groups()
        pid: int | None = None
        uptime: float | None = None
        detail = rest.strip()
        run = _SUPERVISOR_RUNNING.search(rest)
        if run is not None:
            pid = int(run.group(1))
            days, hours, minutes, seconds = (int(g or 0) for g in run.groups()[1:])
            uptime = float(((days * 24 + hours) * 60 + minutes) * 60 + seconds)
            detail = ""
        found[name] = ServiceStatus(
            name, _SUPERVISOR_STATES[raw], pid, uptime, detail=detail or raw.lower()
        )
    return found


def supervisor_socket(remote_root: str) -> str:
    """The supervisord socket: in the project's folder, unless that path is too long.

    A unix socket path holds at most 104-108 bytes; past that the socket goes
    to /tmp under a name derived from the root (only sockets go there).
    """
    local = f"{_Paths(remote_root).base}/supervisor/supervisor.sock"
    if len(os.fsencode(local)) <= 100:
        return "%(here)s/supervisor.sock"
    digest = hashlib.sha256(os.fsencode(remote_root)).hexdigest()[:16]
    return f"/tmp/dev-sync-supervisor-{digest}.sock"


def supervisord_conf_text(remote_root: str) -> str:
    """dev-sync's own supervisord config (everything relative to its folder: ``%(here)s``)."""
    sock = supervisor_socket(remote_root)
    return f"""\
; dev-sync's own supervisord for this project (generated; edits are overwritten)
[unix_http_server]
file = {sock}
chmod = 0700

[supervisord]
logfile = %(here)s/supervisord.log
logfile_maxbytes = 1MB
logfile_backups = 1
pidfile = %(here)s/supervisord.pid
childlogdir = %(here)s/../logs
identifier = dev-sync

[rpcinterface:supervisor]
supervisor.rpcinterface_factory = supervisor.rpcinterface:make_main_rpcinterface

[supervisorctl]
serverurl = unix://{sock}

[include]
files = programs.conf
"""


def supervisor_programs_text(services: Mapping[str, ServiceConfig]) -> str:
    """One ``[program:x]`` per defined service.

    Only names and fixed relative paths appear here: the command, folder and
    environment live in the launcher, out of reach of supervisor's config
    syntax (inline ``;`` comments, ``%`` expansion).
    """
    parts = ["; dev-sync's programs for this project (generated; edits are overwritten)\n"]
    for name, service in services.items():
        if service.adopted:
            continue
        prog = program_name(name, service)
        parts.append(
            f"""
[program:{prog}]
command = /bin/sh ../services/{name}.sh
directory = %(here)s
autostart = true
autorestart = true
startsecs = 1
startretries = 3
stopasgroup = true
killasgroup = true
stopwaitsecs = 5
redirect_stderr = true
stdout_logfile = %(here)s/../logs/{name}.log
stdout_logfile_maxbytes = 5MB
stdout_logfile_backups = 1
"""
        )
    return "".join(parts)


# $1 supervisord, $2 supervisorctl, $3 config file, then the put arguments, then
# LABEL PROGRAM pairs: a program whose launcher (put label) changed is restarted,
# the others are started (a no-op for a running one; a retry for a FATAL one).
_SUPERVISOR_INSTALL = (
    r"""
d=$1 ctl=$2 conf=$3; shift 3
need "$d"; need "$ctl"
"""
    + _SH_PUT_LOOP
    + r"""
dir=$(dirname -- "$conf")
mkdir -p -- "$dir/../logs" || exit 1
running() {
  pid=$("$ctl" -c "$conf" pid 2>/dev/null) || return 1
  [ -n "$pid" ] && [ "$pid" = "$(cat -- "$dir/supervisord.pid" 2>/dev/null)" ]
}
if ! running; then
  "$d" -c "$conf" || { echo "supervisord failed to start; see $dir/supervisord.log" >&2; exit 1; }
  i=0
  until running; do
    i=$((i + 1))
    if [ "$i" -ge 100 ]; then
      echo "supervisord did not answer; see $dir/supervisord.log" >&2
      tail -n 3 -- "$dir/supervisord.log" >&2
      exit 1
    fi
    sleep 0.1
  done
fi
"$ctl" -c "$conf" update
while [ "$#" -ge 2 ]; do
  case $changed in
    *"/$1/"*) "$ctl" -c "$conf" restart "$2" ;;
    *) "$ctl" -c "$conf" start "$2" ;;
  esac
  shift 2
done
exit 0
"""
)


class SupervisorManager(_Adapter):
    """Services under dev-sync's own ``supervisord``, driven by ``supervisorctl``.

    One supervisord per project with its config, pidfile, log and (when the
    path is short enough) socket in ``<root>/.dev-sync/supervisor/``, so it
    needs no root and cannot touch a system supervisord. ``supervisorctl``
    over the ssh master is one round trip per operation, like XML-RPC over a
    forwarded socket would be, without a second channel to keep alive.
    """

    kind: ManagerName = "supervisor"
    missing_fix = (
        "install it on the remote: `pip install supervisor` (or `sudo apt-get install "
        "supervisor`), so that supervisord and supervisorctl are on the PATH"
    )

    def __init__(
        self,
        remote: Remote,
        remote_root: str,
        project: str,
        services: Mapping[str, ServiceConfig],
        *,
        supervisord: str = "supervisord",
        supervisorctl: str = "supervisorctl",
        prefix: Sequence[str] = (),
    ) -> None:
        super().__init__(remote, remote_root, project, services, prefix=prefix)
        self.supervisord = supervisord
        self.supervisorctl = supervisorctl
        self.conf = f"{self.paths.base}/supervisor/supervisord.conf"

    def _ctl(self, *args: str) -> list[str]:
        return [self.supervisorctl, "-c", self.conf, *args]

    def _raise_for(self, result: runner.Result, program: str | None = None) -> None:
        """Map supervisorctl's wording (on stdout, whatever the exit code) to an error."""
        text = result.out + result.err
        if ("no such file" in text and "unix://" in text) or "refused connection" in text:
            raise DevSyncError(
                f"the project's supervisord is not running ({_last_line(result)})",
                "run `dev-sync services install` (or `dev-sync up`) to start it",
            )
        if "Permission denied" in text:
            raise DevSyncError(
                f"cannot talk to the project's supervisord: {_last_line(result)}",
                "run dev-sync as the remote user that started it, or stop that "
                "supervisord and run `dev-sync services install`",
            )
        if program is not None and "no such process" in text:
            raise DevSyncError(
                f"supervisord has no program {program!r}",
                "run `dev-sync services install` to define it",
            )

    async def install(self) -> list[str]:
        defined = self._defined()
        files = [
            ("supervisord.conf", self.conf, supervisord_conf_text(self.paths.root)),
            (
                "programs.conf",
                f"{self.paths.base}/supervisor/programs.conf",
                supervisor_programs_text(defined),
            ),
        ]
        files += [
            (name, self.paths.launcher(name), launcher_text(name, svc, self.paths.root))
            for name, svc in defined.items()
        ]
        if "%" in self.paths.root:
            raise DevSyncError(
                f"supervisord cannot run programs under {self.paths.root!r}: its config "
                "format reads % as an expansion",
                'use a remote path without %, or manager = "command" for these services',
            )
        pairs = [x for n, s in defined.items() for x in (n, program_name(n, s))]
        argv = self._script(
            _SUPERVISOR_INSTALL,
            self.supervisord,
            self.supervisorctl,
            self.conf,
            *_put_args(files),
            *pairs,
        )
        result = await self._run(argv, tool="supervisord or supervisorctl")
        if result.returncode != 0:
            raise DevSyncError(
                f"could not start the project's supervisord: {_last_line(result)}",
                f"see {self.paths.base}/supervisor/supervisord.log on the remote",
            )
        _, changed = _changes(result.out)
        return [n for n in defined if n in changed]

    async def status(self, names: Sequence[str] | None = None) -> dict[str, ServiceStatus]:
        wanted = self._names(names)
        result = await self._run(self._ctl("status"))
        self._raise_for(result)
        by_program = parse_supervisor_status(result.out)
        found: dict[str, ServiceStatus] = {}
        for name in wanted:
            service = self.services[name]
            st = by_program.get(program_name(name, service))
            if st is None:
                found[name] = ServiceStatus(
                    name, "unknown", port=service.port, detail="not installed"
                )
            else:
                found[name] = ServiceStatus(
                    name, st.state, st.pid, st.uptime_s, None, service.port, st.detail
                )
        return found

    async def restart(self, name: str) -> None:
        prog = self.program(name)
        # Waits until the program is RUNNING (startsecs) or supervisor gives up;
        # "spawn error" is a crash that status() reports, not a failure here.
        result = await self._run(self._ctl("restart", prog))
        self._raise_for(result, prog)

    async def stop(self, name: str) -> None:
        prog = self.program(name)
        result = await self._run(self._ctl("stop", prog))
        self._raise_for(result, prog)

    async def logs(self, name: str, lines: int = 40) -> str:
        prog = self.program(name)
        # supervisorctl tails bytes, not lines: ask for enough and cut.
        want = min(max(lines * 200, 4096), 1 << 20)
        result = await self._run(self._ctl("tail", f"-{want}", prog))
        self._raise_for(result, prog)
        text = result.out
        if len(result.stdout) >= want:
            text = text.partition("\n")[2]  # the first line is cut in the middle
        return _tail_lines(text, lines)

    def follow_argv(self, name: str, lines: int = 40) -> list[str]:
        return [*self.prefix, *self._ctl("tail", "-f", self.program(name))]

    async def shutdown(self) -> None:
        pidfile = f"{self.paths.base}/supervisor/supervisord.pid"
        result = await self._run(self._ctl("shutdown"))
        text = result.out + result.err
        if result.returncode != 0 and "no such file" not in text and "refused" not in text:
            self._raise_for(result)
            raise DevSyncError(
                f"supervisord did not shut down: {_last_line(result)}",
                f"stop it by hand: kill $(cat {pidfile})",
            )
        # `supervisorctl shutdown` returns while supervisord still stops its
        # programs: done means the daemon is gone, not that it was asked.
        await self._run(self._script(_WAIT_GONE, pidfile))


# $1 = a pid file; waits up to 10 s for its process to exit.
_WAIT_GONE = r"""
pid=$(cat -- "$1" 2>/dev/null) || exit 0
[ -n "$pid" ] || exit 0
i=0
while kill -0 "$pid" 2>/dev/null && [ "$i" -lt 200 ]; do sleep 0.05; i=$((i + 1)); done
"""


# --------------------------------------------------------------------------
# PM2

_PM2_STATES: dict[str, ServiceState] = {
    "online": "running",
    "launching": "starting",
    "waiting restart": "crashed",
    "errored": "crashed",
    "stopped": "stopped",
    "stopping": "stopped",
    "one-launch-status": "stopped",
}


def parse_pm2_jlist(text: str) -> list[dict[str, Any]]:
    """The process list from ``pm2 jlist`` output.

    Its stdout has carried other lines before the JSON (the daemon's start-up
    banner, "In-memory PM2 is out-of-date"), so the answer is the last line
    that parses as a JSON array.
    """
    for line in reversed(text.splitlines()):
        line = _ANSI_RE.sub("", line).strip()
        if not line.startswith("["):
            continue
        try:
            value = json.loads(line)
        except ValueError:
            continue
        if isinstance(value, list):
            return [p for p in value if isinstance(p, dict)]
    raise DevSyncError(
        "pm2 jlist printed no process list",
        "run `pm2 jlist` on the remote to see what it prints",
    )


def _pm2_status(name: str, proc: Mapping[str, Any], now: float | None) -> ServiceStatus:
    env = proc.get("pm2_env")
    env = env if isinstance(env, dict) else {}
    raw = str(env.get("status", ""))
    state = _PM2_STATES.get(raw, "unknown")
    pid = proc.get("pid")
    restarts = env.get("restart_time")
    started = env.get("pm_uptime")
    uptime: float | None = None
    if state == "running" and now is not None and isinstance(started, int | float):
        uptime = max(0.0, now - started / 1000.0)
    return ServiceStatus(
        name,
        state,
        pid if isinstance(pid, int) and pid > 0 else None,
        uptime,
        restarts if isinstance(restarts, int) else None,
        detail=raw,
    )


def pm2_app(name: str, service: ServiceConfig, paths: _Paths, project: str) -> dict[str, Any]:
    """The ecosystem-file entry for a service (a JSON object, no quoting to get wrong).

    ``DEV_SYNC_SPEC`` carries a hash of the definition so that install can
    tell a changed app (delete and start again: pm2 keeps an app's script and
    folder across restarts) from an unchanged one (left running).
    """
    log = paths.log(name)
    app: dict[str, Any] = {
        "name": program_name(name, service),
        "namespace": "dev-sync",
        "script": "/bin/sh",
        "args": [paths.launcher(name)],
        "interpreter": "none",
        "cwd": paths.root,
        "autorestart": True,
        "watch": False,
        "max_restarts": 3,
        "min_uptime": 1000,
        "restart_delay": 200,
        "kill_timeout": 5000,
        "treekill": True,
        "out_file": log,
        "error_file": log,
        "merge_logs": True,
        "time": False,
        "env": {"DEV_SYNC_PROJECT": project},
    }
    spec = hashlib.sha256(json.dumps(app, sort_keys=True).encode()).hexdigest()[:16]
    app["env"]["DEV_SYNC_SPEC"] = spec
    return app


# $1 pm2, $2 ecosystem file, then the put arguments; prints "now=EPOCH" and jlist.
_PM2_PREPARE = (
    r"""
pm2=$1; shift
need "$pm2"
"""
    + _SH_PUT_LOOP
    + r"""
echo "now=$(date +%s)"
"$pm2" jlist
"""
)

# $1 pm2, $2 ecosystem file, $3 names to delete, $4 to start, $5 to restart
# (comma-separated; empty: nothing to do).
_PM2_APPLY = r"""
pm2=$1 eco=$2
rc=0
if [ -n "$3" ]; then IFS=,; set -f; "$pm2" delete $3 >/dev/null || rc=1; unset IFS; fi
if [ -n "$4" ]; then "$pm2" start "$eco" --only "$4" || rc=1; fi
if [ -n "$5" ]; then IFS=,; set -f; "$pm2" restart $5 || rc=1; unset IFS; fi
exit $rc
"""

# $1 pm2, then its arguments: a missing pm2 exits 127 in every shell.
_PM2_RUN = r"""
pm2=$1; shift
need "$pm2"
echo "now=$(date +%s)"
exec "$pm2" "$@"
"""


def _pm2_now(text: str) -> float | None:
    m = re.search(r"^now=(\d+)$", text, re.MULTILINE)
    return float(m.group(1)) if m else None


class Pm2Manager(_Adapter):
    """Services under PM2, through its CLI.

    ``home`` is the ``PM2_HOME`` to use (None: the remote user's default
    ``~/.pm2``, where programs to adopt live). Apps dev-sync defines run the
    shared launcher with ``interpreter: none`` and PM2's watch mode off, so
    PM2 never restarts on its own what dev-sync restarts.
    """

    kind: ManagerName = "pm2"
    missing_fix = "install it on the remote: `npm install -g pm2` (needs Node.js)"

    def __init__(
        self,
        remote: Remote,
        remote_root: str,
        project: str,
        services: Mapping[str, ServiceConfig],
        *,
        pm2: str = "pm2",
        home: str | None = None,
        prefix: Sequence[str] = (),
    ) -> None:
        env = ["env", "FORCE_COLOR=0"] + ([f"PM2_HOME={home}"] if home else [])
        super().__init__(remote, remote_root, project, services, prefix=[*prefix, *env])
        self.pm2 = pm2
        self.home = home
        self.ecosystem = f"{self.paths.base}/pm2.config.json"

    async def _pm2(self, *args: str) -> runner.Result:
        return await self._run(self._script(_PM2_RUN, self.pm2, *args), tool=self.pm2)

    def _raise_for(self, result: runner.Result, program: str | None = None) -> None:
        text = _ANSI_RE.sub("", result.out + result.err)
        if program is not None and "not found" in text:
            raise DevSyncError(
                f"pm2 has no process {program!r}",
                "run `dev-sync services install` to define it"
                if program in self._defined_programs()
                else "start it under pm2 first, or check `program` in dev-sync.toml",
            )
        if result.returncode != 0:
            raise DevSyncError(f"pm2 failed: {_last_line(result)}", "run `pm2 ls` on the remote")

    def _defined_programs(self) -> set[str]:
        return {program_name(n, s) for n, s in self._defined().items()}

    async def _jlist(self) -> tuple[list[dict[str, Any]], float | None]:
        result = await self._pm2("jlist")
        if result.returncode != 0:
            self._raise_for(result)
        return parse_pm2_jlist(result.out), _pm2_now(result.out)

    async def install(self) -> list[str]:
        defined = self._defined()
        apps = {n: pm2_app(n, s, self.paths, self.project) for n, s in defined.items()}
        eco = json.dumps({"apps": list(apps.values())}, indent=2) + "\n"
        files = [("ecosystem", self.ecosystem, eco)]
        files += [
            (name, self.paths.launcher(name), launcher_text(name, svc, self.paths.root))
            for name, svc in defined.items()
        ]
        argv = self._script(_PM2_PREPARE, self.pm2, *_put_args(files))
        result = await self._run(argv, tool=self.pm2)
        if result.returncode != 0:
            self._raise_for(result)
        _, changed_files = _changes(result.out)
        procs = {str(p.get("name")): p for p in parse_pm2_jlist(result.out)}
        delete: list[str] = []
        start: list[str] = []
        restart: list[str] = []
        changed: list[str] = []
        for name, app in apps.items():
            prog = app["name"]
            proc = procs.get(prog)
            env = proc.get("pm2_env", {}) if proc else {}
            env = env if isinstance(env, dict) else {}
            inner = env.get("env") if isinstance(env.get("env"), dict) else {}
            spec = env.get("DEV_SYNC_SPEC") or (inner or {}).get("DEV_SYNC_SPEC")
            if proc is None:
                start.append(prog)
                continue
            if spec != app["env"]["DEV_SYNC_SPEC"]:
                delete.append(prog)  # pm2 keeps an app's script and folder: replace it
                start.append(prog)
            elif env.get("status") != "online":
                start.append(prog)
            elif name in changed_files:
                restart.append(prog)  # the launcher is re-read at every start
            if spec != app["env"]["DEV_SYNC_SPEC"] or name in changed_files:
                changed.append(name)
        if start or restart:
            argv = self._script(
                _PM2_APPLY,
                self.pm2,
                self.ecosystem,
                ",".join(delete),
                ",".join(start),
                ",".join(restart),
            )
            applied = await self._run(argv, tool=self.pm2)
            if applied.returncode != 0:
                raise DevSyncError(
                    f"pm2 could not start the services: {_last_line(applied)}",
                    f"run `pm2 start {self.ecosystem}` on the remote to see why",
                )
        return changed

    async def status(self, names: Sequence[str] | None = None) -> dict[str, ServiceStatus]:
        wanted = self._names(names)
        procs, now = await self._jlist()
        by_name = {str(p.get("name")): p for p in procs}
        found: dict[str, ServiceStatus] = {}
        for name in wanted:
            service = self.services[name]
            proc = by_name.get(program_name(name, service))
            if proc is None:
                found[name] = ServiceStatus(
                    name, "unknown", port=service.port, detail="not known to pm2"
                )
                continue
            st = _pm2_status(name, proc, now)
            found[name] = ServiceStatus(
                name, st.state, st.pid, st.uptime_s, st.restarts, service.port, st.detail
            )
        return found

    async def restart(self, name: str) -> None:
        prog = self.program(name)
        result = await self._pm2("restart", prog)
        if result.returncode != 0:
            self._raise_for(result, prog)

    async def stop(self, name: str) -> None:
        prog = self.program(name)
        result = await self._pm2("stop", prog)
        if result.returncode != 0:
            self._raise_for(result, prog)

    async def logs(self, name: str, lines: int = 40) -> str:
        prog = self.program(name)
        result = await self._pm2("logs", prog, "--lines", str(lines), "--nostream", "--raw")
        if result.returncode != 0:
            self._raise_for(result, prog)
        text = result.out.partition("\n")[2]  # after the now= line of _PM2_RUN
        return _tail_lines(clean_pm2_logs(text), lines)

    def follow_argv(self, name: str, lines: int = 40) -> list[str]:
        return [*self.prefix, self.pm2, "logs", self.program(name), "--raw", "--lines", str(lines)]

    async def shutdown(self) -> None:
        """Delete the apps dev-sync defined; stop the daemon if nothing else runs in it."""
        programs = sorted(self._defined_programs())
        script = r"""
pm2=$1; shift
need "$pm2"
[ "$#" -gt 0 ] && "$pm2" delete "$@" >/dev/null 2>&1
case $("$pm2" jlist 2>/dev/null | tail -n 1) in
  "[]") "$pm2" kill >/dev/null 2>&1 ;;
esac
exit 0
"""
        await self._run(self._script(script, self.pm2, *programs), tool=self.pm2)


def clean_pm2_logs(text: str) -> str:
    """``pm2 logs --raw`` output without colours and its "[TAILING] ..." headers."""
    kept = []
    for line in _ANSI_RE.sub("", text).splitlines():
        if line.startswith("[TAILING]"):
            continue
        if re.match(r"^\S.* last \d+ lines:$", line):
            continue
        kept.append(line)
    while kept and not kept[-1].strip():
        kept.pop()
    return "\n".join(kept) + ("\n" if kept else "")


# --------------------------------------------------------------------------
# systemd user units


def _systemd_escape(value: str) -> str:
    """A double-quoted systemd word: backslash escapes, ``%%`` for specifiers, ``$$``."""
    text = value.replace("\\", "\\\\").replace('"', '\\"')
    return '"' + text.replace("%", "%%").replace("$", "$$") + '"'


def systemd_unit_name(name: str, service: ServiceConfig) -> str:
    """``devsync-NAME.service`` for units dev-sync writes; the adopted unit's own name otherwise."""
    if service.adopted:
        prog = program_name(name, service)
        return prog if "." in prog else f"{prog}.service"
    return f"devsync-{program_name(name, service)}.service"


def systemd_unit_text(name: str, service: ServiceConfig, remote_root: str) -> str:
    """A user unit running the shared launcher, logging to the project's log file.

    ``Restart=on-failure`` with a start limit of 3 in 30 s mirrors the other
    managers: a crash loop ends in ``failed`` instead of spinning forever.
    """
    paths = _Paths(remote_root)
    log = paths.log(name).replace("%", "%%")
    return f"""\
# dev-sync unit for service {name} (generated from dev-sync.toml; edits are overwritten)
[Unit]
Description=dev-sync service {name}
StartLimitIntervalSec=30
StartLimitBurst=3

[Service]
Type=simple
ExecStart=/bin/sh {_systemd_escape(paths.launcher(name))}
Restart=on-failure
RestartSec=1
KillMode=control-group
TimeoutStopSec=5
StandardOutput=append:{log}
StandardError=inherit

[Install]
WantedBy=default.target
"""


def parse_systemd_show(text: str) -> dict[str, dict[str, str]]:
    """``systemctl show -p ...`` output (blank-line separated blocks), keyed by ``Id``."""
    units: dict[str, dict[str, str]] = {}
    block: dict[str, str] = {}
    for line in [*text.splitlines(), ""]:
        if not line.strip():
            if "Id" in block:
                units[block["Id"]] = block
            block = {}
            continue
        key, sep, value = line.partition("=")
        if sep:
            block[key.strip()] = value.strip()
    return units


def systemd_status(name: str, props: Mapping[str, str], now_s: float | None) -> ServiceStatus:
    """One unit's ``show`` properties in common terms.

    Uptime compares ``ExecMainStartTimestampMonotonic`` (microseconds) with
    the remote's ``/proc/uptime``; both count from boot.
    """
    if props.get("LoadState") == "not-found":
        return ServiceStatus(name, "unknown", detail="no such unit")
    active = props.get("ActiveState", "")
    sub = props.get("SubState", "")
    state: ServiceState
    if active in ("active", "reloading"):
        state = "running"
    elif active == "activating":
        state = "crashed" if sub == "auto-restart" else "starting"
    elif active == "failed":
        state = "crashed"
    elif active in ("inactive", "deactivating"):
        state = "stopped"
    else:
        state = "unknown"
    pid_text = props.get("MainPID", "0")
    pid = int(pid_text) if pid_text.isdigit() and int(pid_text) > 0 else None
    restarts_text = props.get("NRestarts", "")
    restarts = int(restarts_text) if restarts_text.isdigit() else None
    started = props.get("ExecMainStartTimestampMonotonic", "0")
    uptime: float | None = None
    if state == "running" and now_s is not None and started.isdigit() and int(started) > 0:
        uptime = max(0.0, now_s - int(started) / 1e6)
    detail = f"{active} ({sub})" if sub else active
    return ServiceStatus(name, state, pid, uptime, restarts, detail=detail)


# $1 systemctl, then the put arguments (paths relative to the user unit folder
# are made absolute here: $HOME is only known remotely), then units to restart
# after "--restart" and units to start after "--start".
_SYSTEMD_INSTALL = r"""
ctl=$1; shift
need "$ctl"
units="${XDG_CONFIG_HOME:-$HOME/.config}/systemd/user"
n=$1; shift
while [ "$n" -gt 0 ]; do
  case $2 in /*) p=$2 ;; *) p="$units/$2" ;; esac
  put "$1" "$p" "$3"; shift 3; n=$((n - 1))
done
"$ctl" --user daemon-reload || exit 1
mode=
for arg in "$@"; do
  case $arg in
    --restart|--start) mode=${arg#--} ;;
    *) "$ctl" --user enable --quiet "$arg" && "$ctl" --user "$mode" "$arg" ;;
  esac
done
exit 0
"""

_SYSTEMD_SHOW = r"""
ctl=$1; shift
need "$ctl"
echo "uptime=$(cut -d' ' -f1 /proc/uptime 2>/dev/null)"
echo
exec "$ctl" --user show -p Id,LoadState,ActiveState,SubState,MainPID,NRestarts,\
ExecMainStartTimestampMonotonic "$@"
"""


class SystemdManager(_Adapter):
    """Services as systemd *user* units: no root, survives logout with lingering.

    Units dev-sync writes go to ``~/.config/systemd/user/devsync-NAME.service``
    and run the shared launcher; logs go to the project's log file (journald
    keeps user logs only with persistent storage), adopted units' logs come
    from ``journalctl --user``.
    """

    kind: ManagerName = "systemd"
    missing_fix = 'this remote has no systemd: use manager = "supervisor" for these services'

    def __init__(
        self,
        remote: Remote,
        remote_root: str,
        project: str,
        services: Mapping[str, ServiceConfig],
        *,
        systemctl: str = "systemctl",
        journalctl: str = "journalctl",
        prefix: Sequence[str] = (),
    ) -> None:
        super().__init__(remote, remote_root, project, services, prefix=prefix)
        self.systemctl = systemctl
        self.journalctl = journalctl

    def unit(self, name: str) -> str:
        return systemd_unit_name(name, self._check_name(name))

    def _raise_for(self, result: runner.Result, unit: str | None = None) -> None:
        text = result.out + result.err
        if "Failed to connect to bus" in text or "No medium found" in text:
            raise DevSyncError(
                f"the systemd user instance is not reachable on the remote ({_last_line(result)})",
                "run `loginctl enable-linger $USER` there (a user manager that runs without "
                'a login), or use manager = "supervisor"',
            )
        if unit is not None and ("not found" in text or "not loaded" in text):
            raise DevSyncError(
                f"systemd has no unit {unit!r}", "run `dev-sync services install` to define it"
            )
        if result.returncode != 0 and unit is None:
            raise DevSyncError(
                f"systemctl --user failed: {_last_line(result)}",
                "run `systemctl --user status` on the remote",
            )

    async def install(self) -> list[str]:
        defined = self._defined()
        files: list[tuple[str, str, str]] = []
        for name, svc in defined.items():
            files.append(
                (name, self.paths.launcher(name), launcher_text(name, svc, self.paths.root))
            )
            files.append(
                (name, systemd_unit_name(name, svc), systemd_unit_text(name, svc, self.paths.root))
            )
        # The changed ones are only known remotely: restart all units whose files
        # changed in a second step, start the rest in this one.
        argv = self._script(
            _SYSTEMD_INSTALL,
            self.systemctl,
            *_put_args(files),
            "--start",
            *(systemd_unit_name(n, s) for n, s in defined.items()),
        )
        result = await self._run(argv, tool=self.systemctl)
        self._raise_for(result)
        _, changed = _changes(result.out)
        names = [n for n in defined if n in changed]
        for name in names:
            await self.restart(name)
        return names

    async def status(self, names: Sequence[str] | None = None) -> dict[str, ServiceStatus]:
        wanted = self._names(names)
        units = {name: systemd_unit_name(name, self.services[name]) for name in wanted}
        argv = self._script(_SYSTEMD_SHOW, self.systemctl, *units.values())
        result = await self._run(argv, tool=self.systemctl)
        self._raise_for(result)
        head, _, body = result.out.partition("\n\n")
        now: float | None = None
        m = re.search(r"uptime=([\d.]+)", head)
        if m:
            now = float(m.group(1))
        shown = parse_systemd_show(body)
        found: dict[str, ServiceStatus] = {}
        for name, unit in units.items():
            st = systemd_status(name, shown.get(unit, {"LoadState": "not-found"}), now)
            found[name] = ServiceStatus(
                name,
                st.state,
                st.pid,
                st.uptime_s,
                st.restarts,
                self.services[name].port,
                st.detail,
            )
        return found

    async def _unit_command(self, verb: str, name: str) -> None:
        unit = self.unit(name)
        result = await self._run([self.systemctl, "--user", verb, unit], tool=self.systemctl)
        if result.returncode == 0:
            return
        self._raise_for(result, unit)
        if "start-limit" in result.out + result.err or "failed" in result.err:
            return  # the unit failed to start: a crash status() shows, not an error
        raise DevSyncError(
            f"systemctl --user {verb} {unit} failed: {_last_line(result)}",
            f"run `systemctl --user status {unit}` on the remote",
        )

    async def restart(self, name: str) -> None:
        await self._unit_command("restart", name)

    async def stop(self, name: str) -> None:
        await self._unit_command("stop", name)

    async def logs(self, name: str, lines: int = 40) -> str:
        service = self._check_name(name)
        if service.adopted:
            argv = [
                self.journalctl,
                "--user",
                "-u",
                self.unit(name),
                "-n",
                str(lines),
                "--no-pager",
                "-o",
                "cat",
            ]
        else:
            argv = ["tail", "-n", str(lines), "--", self.paths.log(name)]
        result = await self._run(argv)
        return _tail_lines(result.out, lines)

    def follow_argv(self, name: str, lines: int = 40) -> list[str]:
        if self._check_name(name).adopted:
            return [
                *self.prefix,
                self.journalctl,
                "--user",
                "-u",
                self.unit(name),
                "-f",
                "-n",
                str(lines),
                "-o",
                "cat",
            ]
        return [*self.prefix, "tail", "-n", str(lines), "-F", "--", self.paths.log(name)]

    async def shutdown(self) -> None:
        units = [systemd_unit_name(n, s) for n, s in self._defined().items()]
        if units:
            result = await self._run(
                [self.systemctl, "--user", "disable", "--now", *units], tool=self.systemctl
            )
            self._raise_for(result)


# --------------------------------------------------------------------------
# command: dev-sync runs the service itself

# $1 action (start|stop|restart|status), $2 the project's .dev-sync folder, then names.
# A service runs as "setsid /bin/sh LAUNCHER" in its own process group (so stop
# reaches its children), its pid in run/NAME.pid; a pidfile whose process is
# gone means the service died on its own (a deliberate stop removes the file).
_COMMAND = r"""
action=$1 base=$2; shift 2
alive() {
  kill -0 "$1" 2>/dev/null || return 1
  [ -r "/proc/$1/stat" ] || return 0
  case $(sed 's/.*) //' "/proc/$1/stat" 2>/dev/null) in Z*) return 1 ;; esac
  return 0
}
start() {
  pf="$base/run/$1.pid"
  if [ -f "$pf" ] && alive "$(cat -- "$pf")"; then return 0; fi
  [ -f "$base/services/$1.sh" ] || {
    echo "$1: not installed (no $base/services/$1.sh)" >&2; return 3; }
  mkdir -p -- "$base/run" "$base/logs" || return 1
  if command -v setsid >/dev/null 2>&1; then
    nohup setsid /bin/sh "$base/services/$1.sh" </dev/null >>"$base/logs/$1.log" 2>&1 &
  else
    nohup /bin/sh "$base/services/$1.sh" </dev/null >>"$base/logs/$1.log" 2>&1 &
  fi
  echo $! > "$pf"
}
stop() {
  pf="$base/run/$1.pid"
  [ -f "$pf" ] || return 0
  p=$(cat -- "$pf")
  if [ -n "$p" ] && alive "$p"; then
    kill -TERM "-$p" 2>/dev/null || kill -TERM "$p" 2>/dev/null
    i=0
    while alive "$p" && [ "$i" -lt 50 ]; do sleep 0.1; i=$((i + 1)); done
    if alive "$p"; then kill -KILL "-$p" 2>/dev/null || kill -KILL "$p" 2>/dev/null; fi
  fi
  rm -f -- "$pf"
}
status() {
  pf="$base/run/$1.pid"
  if [ ! -f "$pf" ]; then echo "$1 stopped - -"; return 0; fi
  p=$(cat -- "$pf")
  if [ -n "$p" ] && alive "$p"; then
    t=$(stat -c %Y -- "$pf" 2>/dev/null || stat -f %m "$pf" 2>/dev/null)
    echo "$1 running $p $(( $(date +%s) - ${t:-0} ))"
  else
    echo "$1 crashed ${p:--} -"
  fi
}
rc=0
for name in "$@"; do
  case $action in
    start) start "$name" || rc=$? ;;
    stop) stop "$name" ;;
    restart) stop "$name"; start "$name" || rc=$? ;;
    status) status "$name" ;;
  esac
done
exit $rc
"""


def parse_command_status(text: str, ports: Mapping[str, int | None]) -> dict[str, ServiceStatus]:
    """Lines ``NAME STATE PID UPTIME`` (``-`` for none) from the command script."""
    found: dict[str, ServiceStatus] = {}
    for line in text.splitlines():
        fields = line.split()
        if len(fields) != 4 or fields[1] not in ("running", "stopped", "crashed"):
            continue
        name, state, pid, uptime = fields
        found[name] = ServiceStatus(
            name,
            "running" if state == "running" else "stopped" if state == "stopped" else "crashed",
            int(pid) if pid.isdigit() else None,
            float(uptime) if uptime.lstrip("-").isdigit() else None,
            None,
            ports.get(name),
            "exited" if state == "crashed" else "",
        )
    return found


class CommandManager(_Adapter):
    """dev-sync starts and stops the service itself, for remotes without a manager.

    No automatic restart after a crash (that is what the managers add): a
    service that dies shows as ``crashed`` until the next restart.
    """

    kind: ManagerName = "command"

    async def _action(self, action: str, names: Sequence[str]) -> runner.Result:
        argv = ["/bin/sh", "-c", _COMMAND, "dev-sync", action, self.paths.base, *names]
        result = await self._run(argv)
        if result.returncode != 0:
            raise DevSyncError(
                f"could not {action} {', '.join(names)}: {_last_line(result)}",
                "run `dev-sync services install`",
            )
        return result

    async def install(self) -> list[str]:
        files = [
            (name, self.paths.launcher(name), launcher_text(name, svc, self.paths.root))
            for name, svc in self.services.items()
        ]
        script = _SH_PUT_LOOP + "\n"
        result = await self._run(self._script(script, *_put_args(files)))
        if result.returncode != 0:
            raise DevSyncError(
                f"could not write the service launchers: {_last_line(result)}",
                f"check that {self.paths.base} is writable on the remote",
            )
        _, changed = _changes(result.out)
        names = [n for n in self.services if n in changed]
        if names:
            await self._action("restart", names)
        rest = [n for n in self.services if n not in changed]
        if rest:
            await self._action("start", rest)
        return names

    async def status(self, names: Sequence[str] | None = None) -> dict[str, ServiceStatus]:
        wanted = self._names(names)
        result = await self._action("status", wanted)
        ports = {n: self.services[n].port for n in wanted}
        found = parse_command_status(result.out, ports)
        return {n: found.get(n, ServiceStatus(n, "unknown", port=ports[n])) for n in wanted}

    async def restart(self, name: str) -> None:
        self._check_name(name)
        await self._action("restart", [name])

    async def stop(self, name: str) -> None:
        self._check_name(name)
        await self._action("stop", [name])

    async def logs(self, name: str, lines: int = 40) -> str:
        self._check_name(name)
        result = await self._run(["tail", "-n", str(lines), "--", self.paths.log(name)])
        return _tail_lines(result.out, lines)

    def follow_argv(self, name: str, lines: int = 40) -> list[str]:
        self._check_name(name)
        return [*self.prefix, "tail", "-n", str(lines), "-F", "--", self.paths.log(name)]

    async def shutdown(self) -> None:
        if self.services:
            await self._action("stop", list(self.services))


# --------------------------------------------------------------------------
# Choosing adapters, and restarting with a check

_ADAPTERS: dict[ManagerName, Callable[..., ProcessManager]] = {
    "supervisor": SupervisorManager,
    "pm2": Pm2Manager,
    "systemd": SystemdManager,
    "command": CommandManager,
}


def managers_for(
    remote: Remote,
    remote_root: str,
    project: str,
    services: Mapping[str, ServiceConfig],
    **options: Mapping[str, Any],
) -> dict[ManagerName, ProcessManager]:
    """One adapter per manager in use, each holding its services.

    ``options`` maps a manager to its adapter's keyword arguments, e.g.
    ``supervisor={"supervisorctl": "/opt/sv/bin/supervisorctl"}``.
    """
    grouped: dict[ManagerName, dict[str, ServiceConfig]] = {}
    for name, service in services.items():
        grouped.setdefault(service.manager, {})[name] = service
    made: dict[ManagerName, ProcessManager] = {}
    for kind, members in grouped.items():
        kwargs = dict(options.get(kind, {}))
        made[kind] = _ADAPTERS[kind](remote, remote_root, project, members, **kwargs)
    return made


async def install_all(
    remote: Remote, remote_root: str, project: str, services: Mapping[str, ServiceConfig]
) -> list[str]:
    """Write every manager's configuration and start everything: ``dev-sync services install``.

    Returns the services that were new or changed (and so were restarted);
    one place for the command and for ``dev-sync provision``, which ends with it.
    """
    changed: list[str] = []
    for manager in managers_for(remote, remote_root, project, services).values():
        changed += await manager.install()
    return changed


def _crash_sign(first: ServiceStatus, now: ServiceStatus, elapsed: float) -> str:
    """Why ``now`` (seen ``elapsed`` s after the restart) means a crash loop, or ""."""
    detail = f" ({now.detail})" if now.detail and now.detail != now.state else ""
    if now.state == "crashed":
        return f"it crashed{detail}"
    if now.state == "stopped":
        return f"it exited{detail} right after the restart"
    if now.state == "unknown":
        return f"its manager does not know it{detail}"
    if first.restarts is not None and now.restarts is not None and now.restarts > first.restarts:
        return (
            f"its manager restarted it {now.restarts - first.restarts} more time(s) "
            f"within {elapsed:.1f}s"
        )
    if first.pid is not None and now.pid is not None and now.pid != first.pid:
        return f"its process was replaced (pid {first.pid} -> {now.pid}): it exited and respawned"
    return ""


async def restart_and_check(
    manager: ProcessManager,
    name: str,
    settle: float = 3.0,
    *,
    interval: float = 0.5,
    log_lines: int = 20,
) -> RestartOutcome:
    """Restart ``name``, then watch it for ``settle`` seconds.

    A service that crashes or exits, or whose restart count (or pid) keeps
    changing, is reported as crash-looping with the tail of its log, and is not
    restarted again here: a half-finished edit across several files is fixed
    by the next save, which triggers the next restart. Errors of the manager
    itself (missing, not running, unknown name) raise :class:`DevSyncError`.
    """
    await manager.restart(name)
    loop = asyncio.get_running_loop()
    started = loop.time()
    first: ServiceStatus | None = None
    while True:
        now = (await manager.status([name]))[name]
        elapsed = loop.time() - started
        if first is None:
            first = now
        problem = _crash_sign(first, now, elapsed)
        if problem:
            tail = await manager.logs(name, log_lines)
            return RestartOutcome(name, False, now, problem, tail)
        if first.state == "starting" and now.state == "running":
            first = now  # the pid and count to watch are the running ones
        remaining = settle - elapsed
        if remaining <= 0:
            return RestartOutcome(name, True, now)
        await asyncio.sleep(min(interval, remaining))
