"""Port forwards and intercepts over the ssh master.

Two ways to reach services on the remote from the laptop, both riding on the
one ControlMaster connection (``ssh -O forward``), so neither costs a login:

* **Local forwards** (:class:`Forward`, :func:`add_forwards`): a port on the
  laptop (``127.0.0.1:8000``) carries connections to the same port on the
  remote's loopback, so ``http://127.0.0.1:8000`` in a local browser reaches
  the service running on the VM. :func:`plan_forwards` gives one per service
  with a ``port``, on the same number when it is free here, else on the next
  free one.
* **Intercepts** (:class:`Intercept`): one service runs on the laptop and the
  rest stay on the VM. The remote service is stopped through its process
  manager and a reverse forward (``-R``) takes its port on the remote
  loopback, so the other services, which call ``127.0.0.1:PORT`` as before,
  now reach the local process. On the way out the forward is cancelled and
  the remote service started again.

Facts that shaped the code (OpenSSH 9.2):

* Forwards live in the master process. When the connection drops they are
  gone, and a new master starts with none: after every reconnect the caller
  calls :func:`add_forwards` (and :meth:`Intercept.reattach`) again. Asking a
  master for a forward it already has succeeds without doing anything, so
  doing that is always safe and costs one local round trip per forward.
* ``ExitOnForwardFailure`` does not apply to ``-O forward``; the mux client
  exits 255 with ``Port forwarding failed`` (local bind failed) or ``remote
  port forwarding failed for listen port N`` (the remote sshd refused: the
  port is taken there, or ``AllowTcpForwarding`` forbids it) on stderr.
* ``-O cancel`` of a forward the master does not have exits 0 and prints
  ``port not forwarded``: cancelling is idempotent too.
* A process killed with SIGKILL leaves its master running (nothing tells an
  ssh child that its parent died), still holding its reverse forward on the
  remote. So an intercept records the master's pid and control path, and
  :func:`restore_stale` ends that orphan before restarting the service, or
  the service could not bind its port.
* A local forward to a port the remote sshd may not forward to
  (``AllowTcpForwarding no``) is set up fine and fails per connection; only
  reverse forwards are refused up front.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import math
import os
import re
import signal
import socket
import subprocess
import tempfile
import time
from collections.abc import Container, Coroutine, Iterable, Mapping
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from types import TracebackType
from typing import Any, TypeVar

from dev_sync import runner
from dev_sync.errors import ConnectionFailed, DevSyncError, UsageError
from dev_sync.services import ManagerName, ProcessManager, ServiceConfig
from dev_sync.ssh import SshMaster

__all__ = [
    "Forward",
    "ForwardError",
    "Intercept",
    "InterceptRecord",
    "active_intercepts",
    "add_forwards",
    "cancel_forwards",
    "marker_path",
    "master_pid",
    "pick_local_port",
    "plan_forwards",
    "port_free",
    "restore_stale",
    "wait_remote_port_free",
]

log = logging.getLogger(__name__)

T = TypeVar("T")

REMOTE_LOOPBACK = "127.0.0.1"
"""Where forwarded connections go on the remote, and where intercepts listen there."""

MUX_TIMEOUT = 20.0
"""Seconds a ``-O`` request may take; a reverse forward waits for the remote's answer."""

_MASTER_PID_RE = re.compile(r"Master running \(pid=(\d+)\)")
_POLL_INTERVAL = 0.05


# --------------------------------------------------------------------------
# Local forwards


def _host_port(host: str, port: int) -> str:
    """``host:port`` as ssh forward specs and URLs write it (IPv6 in brackets)."""
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


@dataclass(frozen=True)
class Forward:
    """``local_host:local_port`` here carries connections to ``127.0.0.1:remote_port`` there."""

    name: str
    remote_port: int
    local_port: int
    local_host: str = "127.0.0.1"

    @property
    def url(self) -> str:
        """Where to point a local browser: ``http://127.0.0.1:8000``."""
        return f"http://{_host_port(self.local_host, self.local_port)}"

    @property
    def moved(self) -> bool:
        """True when the local port differs from the remote one (that number was taken here)."""
        return self.local_port != self.remote_port

    @property
    def spec(self) -> str:
        """The ``ssh -L`` argument."""
        return (
            f"{_host_port(self.local_host, self.local_port)}:{REMOTE_LOOPBACK}:{self.remote_port}"
        )

    def describe(self) -> str:
        """One line for the terminal: ``api  http://127.0.0.1:8001 -> remote port 8000``."""
        return f"{self.name}  {self.url} -> remote port {self.remote_port}"


class ForwardError(DevSyncError):
    """A forward the master could not set up; ``forward`` says which (when it is one)."""

    def __init__(self, cause: str, fix: str | None = None, forward: Forward | None = None) -> None:
        super().__init__(cause, fix)
        self.forward = forward


def port_free(port: int, host: str = "127.0.0.1") -> bool:
    """Whether ``host:port`` can be listened on here right now.

    Bound with ``SO_REUSEADDR`` as ssh binds its forwards, so a port held only
    by connections in TIME_WAIT counts as free (ssh would get it), while any
    listener on it, on this address or on a wildcard one, makes it taken.
    """
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    with socket.socket(family, socket.SOCK_STREAM) as sock:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            sock.bind((host, port))
        except OSError:
            return False
        return True


def pick_local_port(wanted: int, taken: Container[int] = (), *, host: str = "127.0.0.1") -> int:
    """``wanted`` if it is free on ``host``, else the next free port upwards.

    ``taken`` holds ports already promised to other forwards of the same
    plan. The caller reports a move (``port 8000 is taken, using 8001``).
    """
    if not 1 <= wanted <= 65535:
        raise ValueError(f"not a TCP port: {wanted}")
    for port in range(wanted, 65536):
        if port not in taken and port_free(port, host):
            return port
    raise DevSyncError(
        f"no free local port from {wanted} up to 65535 on {host}",
        "stop some of the programs listening on local ports",
    )


def plan_forwards(
    services: Mapping[str, ServiceConfig], *, local_host: str = "127.0.0.1"
) -> list[Forward]:
    """One forward per service with a ``port``, in config order.

    Each gets the same port number here when it is free, else the next free
    one (never one an earlier forward of the plan got). Plan once per session
    and keep the result: after a reconnect the same forwards are added again,
    so a URL the user opened keeps working.
    """
    forwards: list[Forward] = []
    used: set[int] = set()
    for name, service in services.items():
        if service.port is None:
            continue
        local = pick_local_port(service.port, used, host=local_host)
        used.add(local)
        forwards.append(Forward(name, service.port, local, local_host))
    return forwards


# --------------------------------------------------------------------------
# Talking to the master (ssh -O)


def _mux_argv(master: SshMaster, op: str, *args: str) -> list[str]:
    return ["ssh", *master.client_options(), "-O", op, *args, "--", master.target.host]


def _last_line(text: str, code: int) -> str:
    lines = [ln.strip() for ln in text.splitlines() if ln.strip()]
    return lines[-1] if lines else f"exit code {code}"


async def _mux(master: SshMaster, op: str, *args: str) -> runner.Result:
    """One ``ssh -O`` request; a master that is not there raises ConnectionFailed."""
    argv = _mux_argv(master, op, *args)
    try:
        result = await asyncio.wait_for(runner.arun(argv, check=False), MUX_TIMEOUT)
    except TimeoutError:
        raise ConnectionFailed(
            f"the ssh connection to {master.target.label} did not answer "
            f"`ssh -O {op}` within {MUX_TIMEOUT:g}s",
            "it will be retried",
        ) from None
    except runner.CommandError:
        raise ConnectionFailed(
            "ssh is not installed here", "install OpenSSH (`sudo apt-get install openssh-client`)"
        ) from None
    text = result.err.lower()
    if result.returncode != 0 and "control socket connect" in text:
        raise ConnectionFailed(
            f"the ssh connection to {master.target.label} is not open "
            f"({_last_line(result.err, result.returncode)})",
            "it will be retried; forwards are set up again once it is back",
        )
    return result


async def master_pid(master: SshMaster) -> int:
    """The pid of the master process (``ssh -O check``), or ConnectionFailed."""
    result = await _mux(master, "check")
    m = _MASTER_PID_RE.search(result.err + result.out)
    if result.returncode != 0 or m is None:
        raise ConnectionFailed(
            f"the ssh connection to {master.target.label} is not open "
            f"({_last_line(result.err, result.returncode)})",
            "it will be retried",
        )
    return int(m.group(1))


async def _add_one(master: SshMaster, forward: Forward) -> None:
    result = await _mux(master, "forward", "-L", forward.spec)
    if result.returncode == 0:
        return
    last = _last_line(result.err, result.returncode)
    if "port forwarding failed" in result.err.lower():
        if not port_free(forward.local_port, forward.local_host):
            raise ForwardError(
                f"local port {forward.local_port} is in use: cannot forward it to "
                f"{forward.name}'s port {forward.remote_port} on the remote",
                f"stop the program listening on {forward.local_port} here "
                f"(`ss -ltnp 'sport = :{forward.local_port}'` or `lsof -i :{forward.local_port}` "
                "shows it), or restart dev-sync to pick another free port",
                forward,
            )
        raise ForwardError(
            f"ssh could not listen on {_host_port(forward.local_host, forward.local_port)} "
            f"for {forward.name} ({last})",
            f"check that {forward.local_host} is an address of this machine",
            forward,
        )
    raise ForwardError(
        f"ssh refused to forward local port {forward.local_port} to {forward.name}: {last}",
        "run `ssh -v` with the same destination to see why",
        forward,
    )


async def add_forwards(master: SshMaster, forwards: Iterable[Forward]) -> None:
    """Open ``forwards`` in the master; idempotent, so call it again after every reconnect.

    A forward the master already has is left as it is. The first failure is
    raised as :class:`ForwardError` (its ``forward`` says which), after the
    others were tried; a master that is gone raises :class:`ConnectionFailed`.
    """
    todo = list(forwards)
    results = await asyncio.gather(*(_add_one(master, f) for f in todo), return_exceptions=True)
    for outcome in results:
        if isinstance(outcome, ConnectionFailed):
            raise outcome
    for outcome in results:
        if isinstance(outcome, BaseException):
            raise outcome


async def cancel_forwards(master: SshMaster, forwards: Iterable[Forward]) -> None:
    """Close ``forwards`` in the master. One it does not have is no error."""
    for forward in forwards:
        result = await _mux(master, "cancel", "-L", forward.spec)
        if result.returncode != 0 and "not forwarded" not in result.err:
            raise ForwardError(
                f"ssh could not cancel the forward of local port {forward.local_port}: "
                f"{_last_line(result.err, result.returncode)}",
                "it goes away when dev-sync stops",
                forward,
            )


# --------------------------------------------------------------------------
# The remote port, and reverse forwards

# $1 port, $2 polls. Prints "free", "busy" (then who listens, when ss can tell)
# or "unknown" (no way to look on this system); exit 1 only for busy.
# /proc/net/tcp{,6} first (no extra process, and it sees the listeners of
# every user), then lsof and netstat (macOS, BSD).
_WAIT_FREE = r"""
port=$1 polls=$2
hex=$(printf '%04X' "$port")
files=
for f in /proc/net/tcp /proc/net/tcp6; do [ -r "$f" ] && files="$files $f"; done
listening() {
  if [ -n "$files" ]; then
    awk -v p=":$hex" 'FNR > 1 && $4 == "0A" && substr($2, length($2) - 4) == p { f = 1 }
      END { exit !f }' $files
    return
  fi
  if command -v lsof >/dev/null 2>&1; then
    lsof -nP -iTCP:"$port" -sTCP:LISTEN >/dev/null 2>&1
    return
  fi
  if command -v netstat >/dev/null 2>&1; then
    netstat -an 2>/dev/null | grep -E "[.:]$port[[:space:]].*LISTEN" >/dev/null
    return
  fi
  return 2
}
i=0
while :; do
  listening
  rc=$?
  [ "$rc" -eq 2 ] && { echo unknown; exit 0; }
  [ "$rc" -ne 0 ] && { echo free; exit 0; }
  i=$((i + 1))
  if [ "$i" -ge "$polls" ]; then
    echo busy
    if command -v ss >/dev/null 2>&1; then
      ss -Hltnp "sport = :$port" 2>/dev/null
    elif command -v lsof >/dev/null 2>&1; then
      lsof -nP -iTCP:"$port" -sTCP:LISTEN 2>/dev/null
    fi
    exit 1
  fi
  sleep 0.05 2>/dev/null || sleep 1
done
"""


async def wait_remote_port_free(
    master: SshMaster, port: int, timeout: float = 5.0
) -> tuple[bool, str]:
    """Wait (one remote command, polling every 50 ms) until nothing listens on ``port`` there.

    Returns ``(True, "")`` once it is free (or when the remote has no way to
    tell: the forward request then has the last word), ``(False, who)`` when it
    is still taken after ``timeout``, ``who`` naming the listener when the
    remote's ``ss`` can tell.
    """
    polls = max(1, math.ceil(timeout / _POLL_INTERVAL))
    argv = ["/bin/sh", "-c", _WAIT_FREE, "dev-sync", str(port), str(polls)]
    result = await master.run(argv, check=False)
    if result.returncode == 255 and not result.out:
        raise ConnectionFailed(
            f"the connection to {master.target.label} was lost: "
            f"{_last_line(result.err, result.returncode)}",
            "it will be retried",
        )
    first, _, rest = result.out.partition("\n")
    if first.strip() == "busy":
        return False, " ".join(rest.split())
    if first.strip() in ("free", "unknown"):
        return True, ""
    raise DevSyncError(
        f"could not check port {port} on {master.target.label}: "
        f"{_last_line(result.err, result.returncode)}",
        "check that /bin/sh works on the remote",
    )


def _reverse_spec(remote_port: int, local_port: int, local_host: str) -> str:
    return f"{REMOTE_LOOPBACK}:{remote_port}:{_host_port(local_host, local_port)}"


async def _open_reverse(master: SshMaster, spec: str, remote_port: int) -> None:
    result = await _mux(master, "forward", "-R", spec)
    if result.returncode == 0:
        return
    last = _last_line(result.err, result.returncode)
    if "remote port forwarding failed" in result.err.lower():
        raise DevSyncError(
            f"the remote refused the forward of port {remote_port} ({last})",
            f"something on {master.target.label} took 127.0.0.1:{remote_port} again, or its "
            "sshd forbids forwarding: set `AllowTcpForwarding yes` (or `remote`) in "
            "/etc/ssh/sshd_config there",
        )
    raise DevSyncError(
        f"ssh could not forward remote port {remote_port} here: {last}",
        f"run `ssh -v -R {spec} {master.target.host}` to see why",
    )


async def _close_reverse(master: SshMaster, spec: str) -> None:
    result = await _mux(master, "cancel", "-R", spec)
    if result.returncode != 0 and "not forwarded" not in result.err:
        raise DevSyncError(
            f"ssh could not cancel the reverse forward {spec}: "
            f"{_last_line(result.err, result.returncode)}",
            "it goes away when dev-sync stops",
        )


# --------------------------------------------------------------------------
# Markers: what an intercept must restore, kept until it is restored


def marker_path(state_dir: Path, name: str) -> Path:
    return state_dir / f"intercept-{name}.json"


def _process_start(pid: int) -> int | None:
    """The process's start time in clock ticks since boot (Linux), to tell a reused pid."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    fields = stat.rpartition(")")[2].split()
    try:
        return int(fields[19])
    except (IndexError, ValueError):
        return None


def _pid_alive(pid: int, started: int | None = None) -> bool:
    """True if ``pid`` runs, is not a zombie, and (when known) started at ``started``."""
    if pid <= 0:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        pass
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except FileNotFoundError:
        return not Path("/proc/self/stat").exists()  # no /proc here: kill(0) is all we have
    except OSError:
        return True
    fields = stat.rpartition(")")[2].split()
    if fields and fields[0] in ("Z", "X"):
        return False
    if started is not None:
        return _process_start(pid) in (started, None)
    return True


def _cmdline(pid: int) -> str:
    try:
        raw = Path(f"/proc/{pid}/cmdline").read_bytes()
        return raw.replace(b"\0", b" ").decode("utf-8", "replace")
    except OSError:
        pass
    try:
        out = subprocess.run(
            ["ps", "-o", "args=", "-p", str(pid)],
            capture_output=True,
            timeout=5,
            check=False,
        )
    except (OSError, subprocess.TimeoutExpired):
        return ""
    return out.stdout.decode("utf-8", "replace")


@dataclass(frozen=True)
class InterceptRecord:
    """The marker file's content: enough to undo an intercept from another process."""

    service: str
    manager: ManagerName
    remote_port: int
    local_port: int
    local_host: str
    pid: int  # the dev-sync process holding the intercept
    pid_start: int | None  # its start time (Linux), so a reused pid is not taken for it
    host: str  # the remote, as a label
    control_path: str  # the master's socket
    master_pid: int | None  # the master holding the reverse forward
    forward: str  # the -R spec, as given to the master
    started_at: float = field(default_factory=time.time)
    version: int = 1

    @property
    def alive(self) -> bool:
        """Whether the process holding this intercept still runs."""
        return _pid_alive(self.pid, self.pid_start)

    @classmethod
    def load(cls, path: Path) -> InterceptRecord:
        data: Any = json.loads(path.read_text())
        if not isinstance(data, dict):
            raise TypeError("not a JSON object")
        return cls(
            service=str(data["service"]),
            manager=data["manager"],
            remote_port=int(data["remote_port"]),
            local_port=int(data["local_port"]),
            local_host=str(data.get("local_host", "127.0.0.1")),
            pid=int(data["pid"]),
            pid_start=None if data.get("pid_start") is None else int(data["pid_start"]),
            host=str(data.get("host", "")),
            control_path=str(data.get("control_path", "")),
            master_pid=None if data.get("master_pid") is None else int(data["master_pid"]),
            forward=str(data.get("forward", "")),
            started_at=float(data.get("started_at", 0.0)),
            version=int(data.get("version", 1)),
        )

    def save(self, path: Path) -> None:
        """Write atomically: a reader (or a crash) never sees half a marker."""
        path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.")
        try:
            with os.fdopen(fd, "w") as f:
                json.dump(asdict(self), f, indent=1)
                f.flush()
                os.fsync(f.fileno())
            os.replace(tmp, path)
        except BaseException:
            with contextlib.suppress(OSError):
                os.unlink(tmp)
            raise


def _markers(state_dir: Path) -> list[Path]:
    if not state_dir.is_dir():
        return []
    return sorted(state_dir.glob("intercept-*.json"))


def active_intercepts(state_dir: Path) -> dict[str, InterceptRecord]:
    """Intercepts held by running processes, by service name.

    The engine must not restart these services on the remote (``restart_on``,
    ``services install``): the reverse forward holds their port there.
    """
    found: dict[str, InterceptRecord] = {}
    for path in _markers(state_dir):
        try:
            record = InterceptRecord.load(path)
        except (OSError, ValueError, KeyError, TypeError):
            continue
        if record.alive:
            found[record.service] = record
    return found


# --------------------------------------------------------------------------
# Cancellation-proof cleanup


async def _finish(coro: Coroutine[Any, Any, T]) -> T:
    """Run ``coro`` to its end even if the caller is cancelled (again) meanwhile.

    A Ctrl-C during the restore must not leave the remote service stopped; the
    cancellation is passed on once the restore is done.
    """
    task = asyncio.ensure_future(coro)
    cancelled = False
    while True:
        try:
            result = await asyncio.shield(task)
            break
        except asyncio.CancelledError:
            if task.done():
                if task.cancelled():
                    raise
                result = task.result()
                break
            cancelled = True
    if cancelled:
        raise asyncio.CancelledError
    return result


# --------------------------------------------------------------------------
# Intercept


class Intercept:
    """Run service ``name`` on the laptop while the rest of the stack stays on the VM.

    ``async with Intercept(...)``: on enter, the marker file is written first
    (so a dev-sync killed at any later point is undone by
    :func:`restore_stale`), the remote service is stopped through ``manager``,
    its port is awaited free, and a reverse forward makes
    ``127.0.0.1:remote_port`` on the remote reach ``local_host:local_port`` here.
    On exit (normal, exception or cancellation), the forward is cancelled, the
    service restarted, and the marker removed. If the restart fails the marker
    stays, and the next :func:`restore_stale` retries.
    """

    def __init__(
        self,
        master: SshMaster,
        manager: ProcessManager,
        name: str,
        remote_port: int,
        local_port: int,
        state_dir: Path,
        *,
        local_host: str = "127.0.0.1",
        free_timeout: float = 5.0,
    ) -> None:
        if name not in manager.services:
            known = ", ".join(sorted(manager.services)) or "none"
            raise UsageError(
                f"no service named {name!r} under {manager.kind}",
                f"known services: {known} (see [services] in dev-sync.toml)",
            )
        for port in (remote_port, local_port):
            if not 1 <= port <= 65535:
                raise UsageError(f"not a TCP port: {port}", "ports are 1 to 65535")
        self.master = master
        self.manager = manager
        self.name = name
        self.remote_port = remote_port
        self.local_port = local_port
        self.local_host = local_host
        self.state_dir = state_dir
        self.free_timeout = free_timeout
        self.marker = marker_path(state_dir, name)
        self.spec = _reverse_spec(remote_port, local_port, local_host)
        self.active = False
        self._record: InterceptRecord | None = None
        self._stopped = False
        self._forwarded = False

    def describe(self) -> str:
        return (
            f"{self.name}: port {self.remote_port} on {self.master.target.label} -> "
            f"{_host_port(self.local_host, self.local_port)} here"
        )

    def local_ready(self) -> bool:
        """Whether something listens on the local end yet (else remote callers get resets)."""
        return not port_free(self.local_port, self.local_host)

    async def __aenter__(self) -> Intercept:
        await self._check_previous()
        pid = await master_pid(self.master)
        self._record = InterceptRecord(
            service=self.name,
            manager=self.manager.kind,
            remote_port=self.remote_port,
            local_port=self.local_port,
            local_host=self.local_host,
            pid=os.getpid(),
            pid_start=_process_start(os.getpid()),
            host=self.master.target.label,
            control_path=str(self.master.control_path),
            master_pid=pid,
            forward=self.spec,
        )
        self._record.save(self.marker)
        try:
            await self._enter()
        except BaseException as exc:
            try:
                await _finish(self._leave())
            except Exception as undo:  # the first failure is the one to report
                exc.add_note(f"and undoing the intercept failed too: {undo}")
            raise
        self.active = True
        return self

    async def _check_previous(self) -> None:
        if not self.marker.exists():
            return
        try:
            previous = InterceptRecord.load(self.marker)
        except (OSError, ValueError, KeyError, TypeError):
            return  # unreadable: ours replaces it
        if previous.alive:
            raise UsageError(
                f"{self.name} is already intercepted (by dev-sync pid {previous.pid})",
                "stop that dev-sync first",
            )
        # Left by a killed dev-sync: its master may still hold the remote port.
        await _release_orphan(self.master, previous)

    async def _enter(self) -> None:
        self._stopped = True
        await self.manager.stop(self.name)
        free, who = await wait_remote_port_free(self.master, self.remote_port, self.free_timeout)
        if not free:
            holder = f" ({who})" if who else ""
            raise DevSyncError(
                f"port {self.remote_port} on {self.master.target.label} is still in use "
                f"{self.free_timeout:g}s after stopping {self.name}{holder}",
                f"stop what listens on port {self.remote_port} there, or check that "
                f"{self.name}'s port really is {self.remote_port}",
            )
        self._forwarded = True
        await _open_reverse(self.master, self.spec, self.remote_port)

    async def reattach(self) -> None:
        """Open the reverse forward again on the master's current connection.

        Call after every reconnect while the intercept is active (the old
        master took its forward with it). Idempotent on a master that has it.
        """
        if not self.active or self._record is None:
            return
        pid = await master_pid(self.master)
        if pid != self._record.master_pid:
            self._record = replace(self._record, master_pid=pid)
            self._record.save(self.marker)
        result = await _mux(self.master, "forward", "-R", self.spec)
        if result.returncode == 0:
            return
        # The remote may not have noticed yet that the old connection died.
        free, who = await wait_remote_port_free(self.master, self.remote_port, self.free_timeout)
        if not free:
            holder = f" ({who})" if who else ""
            raise DevSyncError(
                f"port {self.remote_port} on {self.master.target.label} is taken{holder}: "
                f"the intercept of {self.name} cannot be reopened",
                f"stop what listens on port {self.remote_port} there",
            )
        await _open_reverse(self.master, self.spec, self.remote_port)

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.active = False
        try:
            await _finish(self._leave())
        except DevSyncError as failure:
            if exc is None:
                raise
            # Keep the first exception (often the cancellation); say what is left.
            log.warning("%s", failure.render())
            exc.add_note(failure.render())

    async def _leave(self) -> None:
        """Undo what was done, in reverse; the marker goes only once the service is back."""
        if self._forwarded:
            with contextlib.suppress(ConnectionFailed):  # no connection: no forward either
                await _close_reverse(self.master, self.spec)
            self._forwarded = False
        if self._stopped:
            with contextlib.suppress(ConnectionFailed):
                # A cancel goes to the remote without waiting for its answer: make sure
                # the port is free before the service tries to bind it.
                await wait_remote_port_free(self.master, self.remote_port, 2.0)
            try:
                await self.manager.restart(self.name)
            except DevSyncError as exc:
                raise DevSyncError(
                    f"could not start {self.name} on the remote again after the intercept: "
                    f"{exc.cause}",
                    "the next dev-sync command that connects retries it "
                    f"(or run `dev-sync restart {self.name}`)",
                ) from exc
            self._stopped = False
        with contextlib.suppress(FileNotFoundError):
            self.marker.unlink()


# --------------------------------------------------------------------------
# Restoring intercepts of a dev-sync that was killed


async def _release_orphan(master: SshMaster, record: InterceptRecord) -> None:
    """End the reverse forward a killed dev-sync left in its (still running) master."""
    pid = record.master_pid
    if pid is None or not _pid_alive(pid):
        return  # the master died too: the remote closes its forwards with the connection
    try:
        current = await master_pid(master)
    except ConnectionFailed:
        current = None
    if pid == current:
        # The master we talk to is the one that made the forward (same process
        # as the intercept, which is therefore alive; or an adopted master).
        with contextlib.suppress(DevSyncError):
            await _close_reverse(master, record.forward)
        return
    cmdline = _cmdline(pid)
    if "ssh" not in cmdline or f"ControlPath={record.control_path}" not in cmdline:
        return  # the pid was reused by something else
    log.info("ending the ssh master (pid %d) left by a killed dev-sync", pid)
    with contextlib.suppress(ProcessLookupError):
        os.kill(pid, signal.SIGTERM)
    loop = asyncio.get_running_loop()
    deadline = loop.time() + 2.0
    while _pid_alive(pid) and loop.time() < deadline:
        await asyncio.sleep(_POLL_INTERVAL)
    if _pid_alive(pid):
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)


def _manager_for(
    managers: Mapping[ManagerName, ProcessManager], record: InterceptRecord
) -> ProcessManager | None:
    first = managers.get(record.manager)
    if first is not None and record.service in first.services:
        return first
    for manager in managers.values():
        if record.service in manager.services:
            return manager
    return None


async def restore_stale(
    master: SshMaster,
    managers: Mapping[ManagerName, ProcessManager],
    state_dir: Path,
) -> list[str]:
    """Undo intercepts whose dev-sync process is gone; return the services restarted.

    For each marker whose process no longer runs: end the master it left
    behind (its reverse forward holds the remote port), restart the service
    through its manager, delete the marker. Intercepts of running processes
    are left alone. A service no longer in the config loses its marker with a
    warning; a manager error (supervisord not running, ...) is logged and the
    marker kept, for the next call. A lost connection raises ConnectionFailed.
    """
    restored: list[str] = []
    for path in _markers(state_dir):
        try:
            record = InterceptRecord.load(path)
        except (OSError, ValueError, KeyError, TypeError) as exc:
            log.warning("removing unreadable intercept marker %s (%s)", path, exc)
            with contextlib.suppress(FileNotFoundError):
                path.unlink()
            continue
        if record.alive:
            continue
        await _release_orphan(master, record)
        manager = _manager_for(managers, record)
        if manager is None:
            log.warning(
                "service %s was intercepted by a dev-sync that was killed, and is no longer "
                "in dev-sync.toml: nothing to restart",
                record.service,
            )
            with contextlib.suppress(FileNotFoundError):
                path.unlink()
            continue
        with contextlib.suppress(ConnectionFailed):
            await wait_remote_port_free(master, record.remote_port, 2.0)
        try:
            await manager.restart(record.service)
        except ConnectionFailed:
            raise
        except DevSyncError as exc:
            log.warning(
                "could not restart %s after a killed intercept: %s", record.service, exc.render()
            )
            continue
        with contextlib.suppress(FileNotFoundError):
            path.unlink()
        restored.append(record.service)
    return restored
