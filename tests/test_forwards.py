"""Forwards and intercepts against the sandbox sshd, with real HTTP on both ends.

The sandbox "remote" is this machine, so a remote port is also a local one.
Each server therefore answers its own random token: the remote service one,
the laptop-side server another, and a test that expects the laptop's token on
the remote port knows the request went through the reverse forward. The
remote service runs under the ``command`` manager (dev-sync's own pid-file
runner); every test stops what it started, and a safety net kills leftovers.
"""

from __future__ import annotations

import asyncio
import contextlib
import http.server
import os
import shlex
import signal
import socket
import subprocess
import sys
import threading
import uuid
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
from helpers import Project, free_port, http_get, wait_until

from dev_sync.errors import DevSyncError
from dev_sync.forwards import (
    Forward,
    ForwardError,
    Intercept,
    InterceptRecord,
    active_intercepts,
    add_forwards,
    cancel_forwards,
    marker_path,
    master_pid,
    pick_local_port,
    plan_forwards,
    restore_stale,
)
from dev_sync.sandbox import SandboxInfo
from dev_sync.services import CommandManager, ServiceConfig
from dev_sync.ssh import SshMaster, Target

SERVER = """\
import http.server
import os

TOKEN = os.environ["TOKEN"].encode()


class Handler(http.server.BaseHTTPRequestHandler):
    def do_GET(self):
        self.send_response(200)
        self.send_header("Content-Length", str(len(TOKEN)))
        self.end_headers()
        self.wfile.write(TOKEN)

    def log_message(self, *args):
        pass


http.server.HTTPServer(("127.0.0.1", int(os.environ["PORT"])), Handler).serve_forever()
"""

# Run on the remote side: a GET to 127.0.0.1:PORT there, as another service would do.
REMOTE_FETCH = """\
import sys, urllib.request
opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))
try:
    print(opener.open("http://127.0.0.1:%s/" % sys.argv[1], timeout=3).read().decode(), end="")
except Exception as exc:
    print("error:", exc, end="")
"""

# A dev-sync stand-in that holds an intercept until it is killed.
HOLDER = """\
import asyncio
import sys
from pathlib import Path

from dev_sync.forwards import Intercept
from dev_sync.services import CommandManager, ServiceConfig
from dev_sync.ssh import SshMaster, Target


async def main() -> None:
    host, ssh_config, root, command, token, port, local_port, state_dir = sys.argv[1:]
    master = SshMaster(Target(host, ssh_config=Path(ssh_config)))
    await master.connect()
    service = ServiceConfig(
        manager="command", command=command, cwd="app", env={"TOKEN": token}, port=int(port)
    )
    manager = CommandManager(master, root, "demo", {"web": service})
    async with Intercept(master, manager, "web", int(port), int(local_port), Path(state_dir)):
        print("ready", flush=True)
        await asyncio.sleep(3600)


asyncio.run(main())
"""

def _answers(port: int, token: str, timeout: float = 10.0) -> None:
    wait_until(
        lambda: http_get(port) == token,
        timeout=timeout,
        interval=0.05,
        message=lambda: f"port {port} answers {http_get(port)!r}, not {token!r}",
    )


async def _remote_fetch(master: SshMaster, port: int) -> str:
    result = await master.run([sys.executable, "-c", REMOTE_FETCH, str(port)])
    return result.out


def _pid_alive(pid: int) -> bool:
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return False
    return stat.rpartition(")")[2].split()[0] != "Z"


@contextlib.contextmanager
def local_server(token: str) -> Iterator[int]:
    """An HTTP server on the laptop side answering ``token``; yields its port."""
    body = token.encode()

    class Handler(http.server.BaseHTTPRequestHandler):
        def do_GET(self) -> None:
            self.send_response(200)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, format: str, *args: object) -> None:
            pass

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield server.server_address[1]
    finally:
        server.shutdown()
        server.server_close()
        thread.join(5)


@dataclass
class Web:
    """The remote service: its manager, port, token and config."""

    manager: CommandManager
    port: int
    token: str
    service: ServiceConfig
    command: str


def _target(sandbox: SandboxInfo) -> Target:
    return Target(sandbox.host, ssh_config=sandbox.ssh_config.absolute())


@pytest.fixture
async def master(project: Project, sandbox: SandboxInfo) -> AsyncIterator[SshMaster]:
    project.remote.mkdir(parents=True)
    ssh = SshMaster(_target(sandbox))
    await ssh.connect()
    try:
        yield ssh
    finally:
        await ssh.close()
        # Safety net for a test that failed half-way: the command manager's groups.
        for pidfile in (project.remote / ".dev-sync" / "run").glob("*.pid"):
            with contextlib.suppress(OSError, ValueError):
                os.killpg(int(pidfile.read_text().strip()), signal.SIGKILL)


@pytest.fixture
async def web(master: SshMaster, project: Project) -> AsyncIterator[Web]:
    """Service ``web`` running on the remote under the command manager."""
    app = project.remote / "app"
    app.mkdir()
    (app / "server.py").write_text(SERVER)
    port = free_port()
    token = f"remote-{uuid.uuid4().hex[:8]}"
    command = f"{shlex.quote(sys.executable)} server.py"
    service = ServiceConfig(
        manager="command", command=command, cwd="app", env={"TOKEN": token}, port=port
    )
    manager = CommandManager(master, str(project.remote), "demo", {"web": service})
    await manager.install()
    try:
        _answers(port, token)
        yield Web(manager, port, token, service, command)
    finally:
        with contextlib.suppress(DevSyncError):
            await manager.shutdown()


# --------------------------------------------------------------------------
# Local forwards


def test_pick_local_port_skips_taken_ports() -> None:
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        picked = pick_local_port(port)
        assert picked > port
        assert pick_local_port(picked, taken={picked}) > picked
    free = free_port()
    assert pick_local_port(free) == free
    forward = Forward("api", 8000, 8001)
    assert forward.url == "http://127.0.0.1:8001" and forward.moved
    assert forward.spec == "127.0.0.1:8001:127.0.0.1:8000"
    assert Forward("api", 8000, 8000, "::1").url == "http://[::1]:8000"


async def test_local_forward_carries_http_and_moves_off_a_taken_port(
    master: SshMaster, web: Web
) -> None:
    # On the sandbox the remote service listens on this machine too, so its port
    # is taken here: the plan moves the forward to the next free port.
    services = {"web": web.service, "worker": ServiceConfig(manager="command", command="true")}
    [forward] = plan_forwards(services)
    assert forward.name == "web" and forward.remote_port == web.port
    assert forward.moved and forward.local_port > web.port
    try:
        await add_forwards(master, [forward])
        assert http_get(forward.local_port) == web.token
        await add_forwards(master, [forward])  # again: a no-op, no error
        assert http_get(forward.local_port) == web.token

        # A local port someone else holds: the cause and which forward.
        with socket.socket() as busy:
            busy.bind(("127.0.0.1", 0))
            busy.listen()
            taken = Forward("web", web.port, busy.getsockname()[1])
            with pytest.raises(ForwardError, match=f"local port {taken.local_port} is in use") as e:
                await add_forwards(master, [taken])
            assert e.value.forward == taken and e.value.fix
    finally:
        await cancel_forwards(master, [forward])
    assert http_get(forward.local_port) == ""
    await cancel_forwards(master, [forward])  # cancelling twice is no error


async def test_forwards_come_back_after_a_reconnect(master: SshMaster, web: Web) -> None:
    [forward] = plan_forwards({"web": web.service})
    await add_forwards(master, [forward])
    _answers(forward.local_port, web.token)

    # The connection goes (the forwards with it), a new one comes; adding again restores them.
    await master.close()
    assert http_get(forward.local_port) == ""
    await master.connect()
    assert http_get(forward.local_port) == ""
    await add_forwards(master, [forward])
    assert http_get(forward.local_port) == web.token
    await cancel_forwards(master, [forward])


# --------------------------------------------------------------------------
# Intercepts


async def test_intercept_sends_the_remote_port_to_the_laptop(
    master: SshMaster, web: Web, tmp_path: Path
) -> None:
    state = tmp_path / "state"
    token = f"local-{uuid.uuid4().hex[:8]}"
    with local_server(token) as local_port:
        assert await _remote_fetch(master, web.port) == web.token
        intercept = Intercept(master, web.manager, "web", web.port, local_port, state)
        async with intercept:
            record = InterceptRecord.load(marker_path(state, "web"))
            assert (record.service, record.manager, record.remote_port) == (
                "web",
                "command",
                web.port,
            )
            assert record.pid == os.getpid() and record.master_pid == await master_pid(master)
            assert (await web.manager.status(["web"]))["web"].state == "stopped"
            # Another service on the remote calls 127.0.0.1:PORT and reaches the laptop.
            assert await _remote_fetch(master, web.port) == token
            assert set(active_intercepts(state)) == {"web"}
            # A live intercept is not stale: left alone.
            assert await restore_stale(master, {"command": web.manager}, state) == []
            assert marker_path(state, "web").exists()
            assert intercept.local_ready()
            await intercept.reattach()  # on a master that has the forward: a no-op
            assert await _remote_fetch(master, web.port) == token

            # A reconnect takes the reverse forward with the old master; reattach reopens it.
            await master.close()
            await master.connect()
            await intercept.reattach()
            assert await _remote_fetch(master, web.port) == token
            record = InterceptRecord.load(marker_path(state, "web"))
            assert record.master_pid == await master_pid(master)
        assert not marker_path(state, "web").exists()
        assert active_intercepts(state) == {}
        assert (await web.manager.status(["web"]))["web"].state == "running"
        _answers(web.port, web.token)
        assert await _remote_fetch(master, web.port) == web.token


async def test_intercept_is_undone_on_cancellation_errors_and_a_busy_port(
    master: SshMaster, web: Web, tmp_path: Path
) -> None:
    state = tmp_path / "state"
    token = f"local-{uuid.uuid4().hex[:8]}"
    with local_server(token) as local_port:
        # Cancelled while held (what Ctrl-C or SIGTERM becomes in the CLI).
        entered = asyncio.Event()

        async def hold() -> None:
            async with Intercept(master, web.manager, "web", web.port, local_port, state):
                entered.set()
                await asyncio.sleep(3600)

        task = asyncio.create_task(hold())
        await asyncio.wait_for(entered.wait(), 20)
        assert await _remote_fetch(master, web.port) == token
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
        assert not marker_path(state, "web").exists()
        _answers(web.port, web.token)

        # An exception inside the block.
        with pytest.raises(RuntimeError, match="boom"):
            async with Intercept(master, web.manager, "web", web.port, local_port, state):
                assert http_get(web.port) == token
                raise RuntimeError("boom")
        assert not marker_path(state, "web").exists()
        _answers(web.port, web.token)

        # The port stays taken after the stop (here: an unrelated listener on the port
        # the intercept names): a clear failure, and the service is started again.
        with socket.socket() as squatter:
            squatter.bind(("127.0.0.1", 0))
            squatter.listen()
            other = squatter.getsockname()[1]
            busy = Intercept(master, web.manager, "web", other, local_port, state, free_timeout=0.3)
            with pytest.raises(DevSyncError, match=f"port {other} .* is still in use") as e:
                await busy.__aenter__()
            assert e.value.fix and str(other) in e.value.fix
        assert not marker_path(state, "web").exists()
        _answers(web.port, web.token)


async def test_restore_stale_after_the_holder_is_killed(
    master: SshMaster, web: Web, project: Project, sandbox: SandboxInfo, tmp_path: Path
) -> None:
    state = tmp_path / "state"
    script = tmp_path / "holder.py"
    script.write_text(HOLDER)
    token = f"local-{uuid.uuid4().hex[:8]}"
    # The holder uses the same control path, as a later dev-sync run would: let it have it.
    await master.close()
    orphan: int | None = None
    with local_server(token) as local_port:
        holder = subprocess.Popen(
            [
                sys.executable,
                str(script),
                sandbox.host,
                str(sandbox.ssh_config.absolute()),
                str(project.remote),
                web.command,
                web.token,
                str(web.port),
                str(local_port),
                str(state),
            ],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
        )
        try:
            assert holder.stdout is not None
            line = await asyncio.wait_for(asyncio.to_thread(holder.stdout.readline), 20)
            assert line == b"ready\n", holder.stderr.read() if holder.stderr else b""
            _answers(web.port, token)
            record = InterceptRecord.load(marker_path(state, "web"))
            assert record.pid == holder.pid and record.master_pid
            orphan = record.master_pid

            holder.kill()  # SIGKILL: no cleanup runs
            holder.wait(10)
            # Its master outlives it and still holds the remote port.
            assert _pid_alive(orphan)
            assert http_get(web.port) == token

            # The next dev-sync command connects, then restores.
            await master.connect()
            restored = await restore_stale(master, {"command": web.manager}, state)
            assert restored == ["web"]
            assert not marker_path(state, "web").exists()
            wait_until(lambda: not _pid_alive(orphan or 0), timeout=5)
            _answers(web.port, web.token)
            assert await _remote_fetch(master, web.port) == web.token
            assert (await web.manager.status(["web"]))["web"].state == "running"
            assert await restore_stale(master, {"command": web.manager}, state) == []
        finally:
            if holder.poll() is None:
                holder.kill()
                holder.wait(10)
            for stream in (holder.stdout, holder.stderr):
                if stream is not None:
                    stream.close()
            if orphan is not None and _pid_alive(orphan):
                os.kill(orphan, signal.SIGKILL)
            if not master.alive:
                await master.connect()  # for the fixtures' teardown
