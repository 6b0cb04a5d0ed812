"""Building blocks for integration tests against the sandbox sshd.

Kept apart from conftest.py so tests can import them by name (``from helpers
import wait_until``) and so their types are checked like any other module.
"""

from __future__ import annotations

import contextlib
import os
import selectors
import socket
import stat
import struct
import threading
import time
import urllib.request
import uuid
from collections import deque
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType
from typing import NamedTuple, TypeVar

from dev_sync import runner
from dev_sync.config import toml_string
from dev_sync.sandbox import SandboxInfo, client_config_lines

T = TypeVar("T")

REMOTE_MARKER = ".dev-sync-root"
"""The file dev-sync writes at the remote root; absent from the local tree."""

REMOTE_STATE = ".dev-sync"
"""dev-sync's own folder in the remote root (records, conflict copies); never synced."""

PROXY_HOST = "dev-sync-sandbox-proxy"
"""Host alias written by :func:`proxy_ssh_config`."""


# --------------------------------------------------------------------------
# Waiting


def wait_until(
    predicate: Callable[[], T],
    timeout: float = 10.0,
    interval: float = 0.01,
    message: str | Callable[[], str] | None = None,
) -> T:
    """Poll ``predicate`` until it returns something truthy, and return that.

    Tests wait for a condition instead of sleeping a fixed time: fast where
    the machine is fast, patient where CI is slow, and a failure says what
    was awaited. ``message`` (or a callable producing it, evaluated on
    timeout, to describe the last state) goes into the AssertionError.
    """
    deadline = time.monotonic() + timeout
    while True:
        result = predicate()
        if result:
            return result
        if time.monotonic() >= deadline:
            name = getattr(predicate, "__name__", repr(predicate))
            detail = message() if callable(message) else message
            text = f"condition {name} not met within {timeout:g}s"
            raise AssertionError(f"{text}: {detail}" if detail else text)
        time.sleep(interval)


# --------------------------------------------------------------------------
# Ports and HTTP

_NO_PROXY = urllib.request.build_opener(urllib.request.ProxyHandler({}))


def free_port() -> int:
    """A TCP port nothing listens on right now (on 127.0.0.1)."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


def http_get(port: int, timeout: float = 2.0) -> str:
    """The body served at http://127.0.0.1:PORT/, or "" when nothing answers."""
    try:
        with _NO_PROXY.open(f"http://127.0.0.1:{port}/", timeout=timeout) as response:
            body: bytes = response.read()
            return body.decode()
    except OSError:  # URLError, refused, reset and timeouts are all OSErrors
        return ""


# --------------------------------------------------------------------------
# Trees


class Entry(NamedTuple):
    """One path of a tree, as sync must reproduce it."""

    kind: str  # "file", "dir", "symlink" or "other"
    data: bytes | None = None  # file contents
    executable: bool = False  # owner execute bit (files only)
    target: str | None = None  # symlink target, verbatim


IgnoreFn = Callable[[str], bool]


def tree_snapshot(root: Path, ignore: IgnoreFn | None = None) -> dict[str, Entry]:
    """Everything under ``root`` that sync is responsible for, by relative POSIX path.

    Symlinks are recorded, never followed. ``ignore`` receives the relative
    path, with a trailing ``/`` for directories (the convention gitignore
    matchers such as pathspec use), and an ignored directory is skipped
    whole. Times and owners are left out: sync does not promise them.
    """
    snapshot: dict[str, Entry] = {}

    def walk(folder: Path, prefix: str) -> None:
        try:
            with os.scandir(folder) as listing:
                entries = sorted(listing, key=lambda e: e.name)
        except FileNotFoundError:
            snapshot[prefix.rstrip("/")] = Entry("vanished")
            return
        for item in entries:
            rel = prefix + item.name
            try:
                one(item, rel)
            except FileNotFoundError:
                # Changing under our feet (an rsync temp file, a rename): a
                # state no comparison accepts, so the caller looks again.
                snapshot[rel] = Entry("vanished")

    def one(item: os.DirEntry[str], rel: str) -> None:
        st = item.stat(follow_symlinks=False)
        if stat.S_ISDIR(st.st_mode):
            if ignore is not None and ignore(rel + "/"):
                return
            snapshot[rel] = Entry("dir")
            walk(Path(item.path), rel + "/")
            return
        if ignore is not None and ignore(rel):
            return
        if stat.S_ISLNK(st.st_mode):
            snapshot[rel] = Entry("symlink", target=os.readlink(item.path))
        elif stat.S_ISREG(st.st_mode):
            data = Path(item.path).read_bytes()
            snapshot[rel] = Entry("file", data, bool(st.st_mode & stat.S_IXUSR))
        else:
            snapshot[rel] = Entry("other")

    walk(root, "")
    return snapshot


def _short(entry: Entry | None) -> str:
    if entry is None:
        return "missing"
    if entry.kind == "file":
        assert entry.data is not None
        head = entry.data[:40]
        more = "..." if len(entry.data) > 40 else ""
        mode = " +x" if entry.executable else ""
        return f"file {len(entry.data)}B{mode} {head!r}{more}"
    if entry.kind == "symlink":
        return f"symlink -> {entry.target}"
    return entry.kind


def tree_diff(left: Mapping[str, Entry], right: Mapping[str, Entry], limit: int = 20) -> list[str]:
    """Readable differences between two snapshots (at most ``limit`` lines)."""
    lines = []
    for path in sorted(set(left) | set(right)):
        a, b = left.get(path), right.get(path)
        if a != b:
            lines.append(f"{path}: {_short(a)} != {_short(b)}")
    if len(lines) > limit:
        lines = [*lines[:limit], f"... and {len(lines) - limit} more"]
    return lines


def wait_in_sync(
    local: Path,
    remote: Path,
    *,
    ignore: IgnoreFn | None = None,
    timeout: float = 10.0,
) -> dict[str, Entry]:
    """Wait until ``remote`` mirrors ``local``; return the final snapshot.

    The sandbox "remote" is on this machine, so the remote tree can be read
    directly. ``ignore`` applies to both sides; the remote marker file is
    always left out of the remote side, and so is dev-sync's own ``.dev-sync/`` folder.
    """

    def remote_ignore(rel: str) -> bool:
        internal = rel == REMOTE_MARKER or rel.split("/")[0] == REMOTE_STATE
        return internal or (ignore is not None and ignore(rel))

    state: dict[str, list[str]] = {"diff": []}

    def in_sync() -> bool:
        want = tree_snapshot(local, ignore)
        have = tree_snapshot(remote, remote_ignore) if remote.is_dir() else {}
        state["diff"] = tree_diff(want, have)
        return not state["diff"]

    wait_until(
        in_sync,
        timeout=timeout,
        interval=0.02,
        message=lambda: "local != remote:\n  " + "\n  ".join(state["diff"]),
    )
    return tree_snapshot(local, ignore)


# --------------------------------------------------------------------------
# ssh


def ssh_argv(ssh_config: Path, host: str, command: Sequence[str]) -> list[str]:
    """An ssh command line running ``command`` (an argument list) on ``host``."""
    return ["ssh", "-F", str(ssh_config), host, "--", runner.remote_command(command)]


def ssh_run(
    sandbox: SandboxInfo,
    command: Sequence[str],
    *,
    ssh_config: Path | None = None,
    host: str | None = None,
    check: bool = True,
    timeout: float = 30.0,
) -> runner.Result:
    """Run ``command`` on the sandbox (or through another config, e.g. the proxy's)."""
    argv = ssh_argv(ssh_config or sandbox.ssh_config, host or sandbox.host, command)
    return runner.run(argv, check=check, timeout=timeout)


def proxy_ssh_config(
    sandbox: SandboxInfo, proxy_port: int, path: Path, host: str = PROXY_HOST
) -> Path:
    """Write an ssh config whose ``host`` reaches the sandbox through ``proxy_port``.

    Same user, key and host key as the sandbox, so only the network path
    differs; known_hosts gets its own file because ssh pins host keys to
    ``[address]:port`` and the proxy has a port of its own.
    """
    known = path.with_name(path.name + ".known_hosts")
    lines = sandbox.base.joinpath("known_hosts").read_text().split()
    known.write_text(f"[127.0.0.1]:{proxy_port} {lines[1]} {lines[2]}\n")
    body = client_config_lines(host, proxy_port, sandbox.base / "id_ed25519", known, 5)
    path.write_text("\n".join([*body, ""]))
    return path


# --------------------------------------------------------------------------
# Processes (the sandbox remote is this machine, so its processes are visible here)


def processes(match: Callable[[list[bytes]], bool]) -> list[int]:
    """Processes whose argument list ``match`` accepts."""
    found = []
    for pid in filter(str.isdigit, os.listdir("/proc")):
        try:
            args = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
        except OSError:
            continue
        if match(args):
            found.append(int(pid))
    return found


def children(parent: int) -> list[tuple[int, str, list[bytes]]]:
    """The pid, name and arguments of each child of ``parent``."""
    found = []
    for pid in filter(str.isdigit, os.listdir("/proc")):
        try:
            stat = Path(f"/proc/{pid}/stat").read_text()
            args = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
        except OSError:
            continue
        if int(stat[stat.rindex(")") + 2:].split()[1]) == parent:
            found.append((int(pid), stat[stat.index("(") + 1:stat.rindex(")")], args))
    return found


# --------------------------------------------------------------------------
# A TCP proxy that can cut the network


class _Link:
    """One proxied connection: two sockets and a pump thread per direction."""

    def __init__(self, client: socket.socket, server: socket.socket, proxy: TcpProxy) -> None:
        self.client = client
        self.server = server
        self.proxy = proxy
        self.blackholed = False
        self._lock = threading.Lock()
        self._closed = False
        self._pumps_left = 2

    def start(self) -> None:
        for src, dst in ((self.client, self.server), (self.server, self.client)):
            threading.Thread(target=self._pump, args=(src, dst), daemon=True).start()

    def _pump(self, src: socket.socket, dst: socket.socket) -> None:
        delay = self.proxy.delay
        queue: deque[tuple[float, bytes]] = deque()
        ready = threading.Condition()
        if delay:
            threading.Thread(target=self._deliver, args=(queue, ready, dst), daemon=True).start()
        try:
            while True:
                data = src.recv(65536)
                if not data:
                    break
                if self.blackholed:
                    continue  # the bytes vanish, as on a dead network path
                if delay:
                    with ready:
                        queue.append((time.monotonic() + delay, data))
                        ready.notify()
                else:
                    dst.sendall(data)
        except OSError:
            pass
        if delay:
            with ready:
                queue.append((0.0, b""))  # the end: deliver what is queued, then close
                ready.notify()
            return
        self._done(dst)

    def _deliver(
        self, queue: deque[tuple[float, bytes]], ready: threading.Condition, dst: socket.socket
    ) -> None:
        """Send each chunk ``delay`` after it arrived, in order: a link's latency."""
        try:
            while True:
                with ready:
                    while not queue:
                        ready.wait()
                    due, data = queue.popleft()
                if not data:
                    break
                wait = due - time.monotonic()
                if wait > 0:
                    time.sleep(wait)
                dst.sendall(data)
        except OSError:
            pass
        self._done(dst)

    def _done(self, dst: socket.socket) -> None:
        # Half-close so the other direction can still drain, as TCP would.
        with contextlib.suppress(OSError):
            dst.shutdown(socket.SHUT_WR)
        with self._lock:
            self._pumps_left -= 1
            last = self._pumps_left == 0
        if last:
            self.close()

    def close(self, *, reset: bool = False) -> None:
        with self._lock:
            if self._closed:
                return
            self._closed = True
        for sock in (self.client, self.server):
            with contextlib.suppress(OSError):
                if reset:
                    # Linger 0: close() sends RST, as a dropped NAT mapping would.
                    sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, _LINGER_ZERO)
                # shutdown() wakes a pump blocked in recv(); close() alone does not.
                sock.shutdown(socket.SHUT_RDWR)
            with contextlib.suppress(OSError):
                sock.close()
        self.proxy._forget(self)


_LINGER_ZERO = struct.pack("ii", 1, 0)


class TcpProxy:
    """A TCP forwarder on 127.0.0.1 in front of the sandbox sshd, to cut the network.

    ``cut()`` closes every live connection and stops accepting (a new
    connection is refused). ``cut(silent=True)`` instead keeps connections
    open but drops every byte, and accepts new connections into the same
    void: what a laptop leaving Wi-Fi looks like, where nothing fails and
    everything goes quiet until keep-alives time out. ``restore()`` accepts
    and forwards again on the same port (silenced connections are closed
    then). Threads, not asyncio, so it works beside any event loop a test
    runs; one thread owns the listening socket, so cut and restore never
    race with an accept.
    """

    def __init__(
        self, target_port: int, target_host: str = "127.0.0.1", port: int = 0,
        delay: float = 0.0,
    ) -> None:
        self.target = (target_host, target_port)
        self.port = port
        self.delay = delay
        """Seconds each chunk is held in each direction (half the round trip)."""
        self.accepted = 0
        """Connections accepted since start (a reconnect shows up here)."""
        self._links: set[_Link] = set()
        self._lock = threading.Lock()
        self._listener: socket.socket | None = None
        self._pending: list[socket.socket | None] = []
        self._ack = threading.Event()
        self._wake_r, self._wake_w = socket.socketpair()
        self._thread: threading.Thread | None = None
        self._silent = False
        self._stopping = False

    # -- lifecycle ---------------------------------------------------------------
    def start(self) -> TcpProxy:
        """Listen (on ``port``, or a free one) and start forwarding."""
        self._listener = self._bind()
        self._thread = threading.Thread(target=self._accept_loop, daemon=True, name="tcp-proxy")
        self._thread.start()
        return self

    def close(self) -> None:
        """Stop for good: close the listener and every connection."""
        self._stopping = True
        self._wake()
        if self._thread is not None:
            self._thread.join(5)
        if self._listener is not None:
            self._listener.close()
            self._listener = None
        self._close_links(reset=False)
        self._wake_r.close()
        self._wake_w.close()

    def __enter__(self) -> TcpProxy:
        return self.start()

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()

    # -- faults --------------------------------------------------------------------
    def cut(self, *, silent: bool = False) -> None:
        """Break the network path now; see the class docstring for the two kinds."""
        if silent:
            self._silent = True
            with self._lock:
                links = list(self._links)
            for link in links:
                link.blackholed = True
            return
        self._swap_listener(None)  # after this no new connection can arrive
        self._close_links(reset=True)

    def restore(self) -> None:
        """Forward again, on the same port."""
        if self._silent:
            self._silent = False
            self._close_links(reset=True)
        if self._listener is None:
            self._swap_listener(self._bind())

    @property
    def connections(self) -> int:
        """Connections currently open through the proxy."""
        with self._lock:
            return len(self._links)

    # -- internals -------------------------------------------------------------------
    def _bind(self) -> socket.socket:
        sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        # SO_REUSEADDR: restore() must rebind the port that cut connections
        # still hold in TIME_WAIT.
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            sock.bind(("127.0.0.1", self.port))
        except OSError:
            sock.close()
            raise
        sock.listen(128)
        sock.setblocking(False)
        self.port = sock.getsockname()[1]
        return sock

    def _swap_listener(self, new: socket.socket | None) -> None:
        """Hand the accept thread a new listener (or none) and wait until it took it."""
        with self._lock:
            self._pending.append(new)
            self._ack.clear()
        self._wake()
        if not self._ack.wait(5):
            raise RuntimeError("TcpProxy accept thread did not respond")

    def _close_links(self, *, reset: bool) -> None:
        with self._lock:
            links = list(self._links)
        for link in links:
            link.close(reset=reset)

    def _forget(self, link: _Link) -> None:
        with self._lock:
            self._links.discard(link)

    def _wake(self) -> None:
        with contextlib.suppress(OSError):
            self._wake_w.send(b"\0")

    def _accept_loop(self) -> None:
        with selectors.DefaultSelector() as sel:
            sel.register(self._wake_r, selectors.EVENT_READ)
            if self._listener is not None:
                sel.register(self._listener, selectors.EVENT_READ)
            while not self._stopping:
                for key, _ in sel.select(timeout=1.0):
                    if key.fileobj is self._wake_r:
                        with contextlib.suppress(OSError):
                            self._wake_r.recv(4096)
                    elif key.fileobj is self._listener:
                        self._accept(self._listener)
                with self._lock:
                    pending, self._pending = self._pending, []
                for new in pending:
                    if self._listener is not None:
                        sel.unregister(self._listener)
                        self._listener.close()
                    if new is not None:
                        sel.register(new, selectors.EVENT_READ)
                    self._listener = new
                if pending:
                    self._ack.set()

    def _accept(self, listener: socket.socket) -> None:
        try:
            client, _ = listener.accept()
        except OSError:
            return
        client.setblocking(True)
        self.accepted += 1
        try:
            server = socket.create_connection(self.target, timeout=5)
        except OSError:
            client.close()
            return
        server.settimeout(None)
        for sock in (client, server):
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        link = _Link(client, server, self)
        link.blackholed = self._silent
        with self._lock:
            self._links.add(link)
        link.start()


@contextlib.contextmanager
def tcp_proxy(sandbox: SandboxInfo) -> Iterator[TcpProxy]:
    """A started :class:`TcpProxy` in front of the sandbox sshd."""
    with TcpProxy(sandbox.port) as proxy:
        yield proxy


# --------------------------------------------------------------------------
# Projects


TomlValue = str | int | float | bool | Sequence["TomlValue"] | Mapping[str, "TomlValue"]


def toml_value(value: TomlValue) -> str:
    """A TOML literal for ``value``: strings as basic strings with every escape TOML needs."""
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int | float):
        return repr(value)
    if isinstance(value, str):
        return toml_string(value)
    if isinstance(value, Mapping):
        return "{" + ", ".join(f"{k} = {toml_value(v)}" for k, v in value.items()) + "}"
    return "[" + ", ".join(toml_value(v) for v in value) + "]"


@dataclass
class Project:
    """A local tree and its not-yet-existing remote folder on the sandbox."""

    local: Path
    remote: Path
    config: Path
    sandbox: SandboxInfo

    def write_config(
        self,
        *,
        remote: Mapping[str, TomlValue] | None = None,
        sections: Mapping[str, Mapping[str, TomlValue]] | None = None,
        **sync_options: TomlValue,
    ) -> Path:
        """Rewrite ``dev-sync.toml``: the sandbox [remote], plus [sync] keys.

        ``remote`` overrides or adds [remote] keys (e.g. the proxy's host and
        ssh_config); ``sections`` adds whole tables such as ``{"deps": {...}}``.
        """
        remote_table: dict[str, TomlValue] = {
            "host": self.sandbox.host,
            "path": str(self.remote),
            "ssh_config": str(self.sandbox.ssh_config.absolute()),
        }
        remote_table.update(remote or {})
        tables: dict[str, Mapping[str, TomlValue]] = {"remote": remote_table}
        if sync_options:
            tables["sync"] = sync_options
        tables.update(sections or {})
        parts = []
        for name, table in tables.items():
            body = "".join(f"{key} = {toml_value(val)}\n" for key, val in table.items())
            parts.append(f"[{name}]\n{body}")
        self.config.write_text("\n".join(parts))
        return self.config

    def via_proxy(self, proxy: TcpProxy, ssh_config: Path | None = None) -> dict[str, TomlValue]:
        """[remote] keys that route through ``proxy``: pass them as ``write_config(remote=...)``."""
        path = ssh_config or self.local.parent / f"proxy-{proxy.port}.ssh_config"
        proxy_ssh_config(self.sandbox, proxy.port, path)
        return {"host": PROXY_HOST, "ssh_config": str(path)}


def new_project(sandbox: SandboxInfo, workdir: Path, name: str) -> Project:
    """A fresh local tree in ``workdir`` and a unique remote folder for it."""
    safe = "".join(c if c.isalnum() or c in "-_" else "-" for c in name)[:40] or "project"
    local = workdir / "local"
    local.mkdir(parents=True)
    remote = sandbox.remote_dir / f"{safe}-{uuid.uuid4().hex[:8]}"
    project = Project(local=local, remote=remote, config=local / "dev-sync.toml", sandbox=sandbox)
    project.write_config()
    return project
