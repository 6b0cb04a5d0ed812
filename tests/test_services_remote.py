"""Service managers against the sandbox sshd: real supervisord, PM2 and ssh.

Each test runs its managers on the sandbox "remote" (this machine, over ssh)
in the project's own remote folder, talks to the services over HTTP like a
user would, and stops every daemon it started in its teardown. Supervisor
comes from the test extra (the venv's ``supervisord``, passed by path since
the remote PATH does not hold the venv); PM2 from ``npm install -g pm2``,
with a private ``PM2_HOME`` so the user's own PM2 is never touched. systemd
runs only where ``systemctl --user`` works; elsewhere its remote scripts run
against a stand-in ``systemctl`` that records its calls.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import shlex
import shutil
import signal
import subprocess
import sys
import tempfile
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import pytest
from helpers import Project, free_port, http_get, wait_until

from dev_sync.config import load_config
from dev_sync.errors import DevSyncError, UsageError
from dev_sync.services import (
    CommandManager,
    Pm2Manager,
    ProcessManager,
    ServiceConfig,
    ServiceStatus,
    SupervisorManager,
    SystemdManager,
    restart_and_check,
    services_to_restart,
)
from dev_sync.ssh import SshMaster, Target

VENV_BIN = Path(sys.executable).parent
PYTHON = shlex.quote(sys.executable)

SERVER = """\
import http.server
import os

MESSAGE = {message!r}


class Handler(http.server.BaseHTTPRequestHandler):
    def do_GET(self):
        body = MESSAGE.encode()
        self.send_response(200)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, *args):
        pass


print("serving", MESSAGE, flush=True)
http.server.HTTPServer(("127.0.0.1", int(os.environ["PORT"])), Handler).serve_forever()
"""


def _need(tool: str, path: Path | str | None) -> str:
    """The tool's path, or skip (fail under CI, where a skip would hide a gap)."""
    if path is not None and Path(path).exists():
        return str(path)
    reason = f"{tool} is not installed"
    if os.environ.get("CI"):
        pytest.fail(reason + " (CI is set, so this is an error, not a skip)")
    pytest.skip(reason)


def _serves(port: int, message: str, timeout: float = 10.0) -> None:
    wait_until(
        lambda: http_get(port) == message,
        timeout=timeout,
        interval=0.05,
        message=lambda: f"port {port} answers {http_get(port)!r}",
    )


def _write_server(root: Path, message: str) -> None:
    app = root / "app"
    app.mkdir(parents=True, exist_ok=True)
    (app / "server.py").write_text(SERVER.format(message=message))


def _pid_alive(pid: int) -> bool:
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return False
    return stat.rpartition(")")[2].split()[0] != "Z"


async def _settled(manager: ProcessManager, name: str, timeout: float = 10.0) -> ServiceStatus:
    """The service's status once it has left "starting" (managers start asynchronously)."""
    deadline = asyncio.get_running_loop().time() + timeout
    while True:
        status = (await manager.status([name]))[name]
        if status.state != "starting" or asyncio.get_running_loop().time() > deadline:
            return status
        await asyncio.sleep(0.1)


def _kill_leftovers(base: Path) -> None:
    """Kill what a failed test may have left: supervisord, and command-manager groups.

    The tests stop everything through the managers; this is the safety net
    for a test that failed half-way, so no daemon outlives the run.
    """
    pidfiles = [(base / "supervisor" / "supervisord.pid", False)]
    pidfiles += [(p, True) for p in (base / "run").glob("*.pid")]
    for pidfile, group in pidfiles:
        try:
            pid = int(pidfile.read_text().strip())
        except (OSError, ValueError):
            continue
        if _pid_alive(pid):
            with contextlib.suppress(OSError):
                if group:
                    os.killpg(pid, signal.SIGKILL)
                else:
                    os.kill(pid, signal.SIGTERM)


@pytest.fixture
async def master(project: Project) -> AsyncIterator[SshMaster]:
    """An ssh master to the sandbox, with the project's remote folder created."""
    project.remote.mkdir(parents=True)
    ssh = SshMaster(Target.from_config(load_config(project.config)))
    await ssh.connect()
    try:
        yield ssh
    finally:
        await ssh.close()
        _kill_leftovers(project.remote / ".dev-sync")


def _web(port: int, **extra: object) -> ServiceConfig:
    return ServiceConfig.model_validate(
        {
            "command": f"{PYTHON} server.py",
            "cwd": "app",
            "port": port,
            "restart_on": ["app/**/*.py"],
            **extra,
        }
    )


CRASH = ServiceConfig(command="echo boom-$SECRET; sleep 0.2; exit 3", env={"SECRET": "42"})


# --------------------------------------------------------------------------
# Supervisor


async def test_supervisor_install_restart_and_crash_loop(
    master: SshMaster, project: Project
) -> None:
    supervisord = _need("supervisord (pip install supervisor)", VENV_BIN / "supervisord")
    supervisorctl = _need("supervisorctl (pip install supervisor)", VENV_BIN / "supervisorctl")
    port = free_port()
    _write_server(project.remote, "v1")
    services = {"web": _web(port), "crash": CRASH}
    manager = SupervisorManager(
        master,
        str(project.remote),
        "demo",
        services,
        supervisord=supervisord,
        supervisorctl=supervisorctl,
    )
    try:
        assert await manager.install() == []
        status = {name: await _settled(manager, name) for name in services}
        assert status["web"].state == "running" and status["web"].pid
        assert status["web"].port == port
        assert status["crash"].state == "crashed"
        _serves(port, "v1")

        # An edit, the change it makes, and the restart it triggers.
        _write_server(project.remote, "v2")
        assert services_to_restart(["README.md", "app/server.py"], services) == {
            "web": "app/server.py"
        }
        outcome = await restart_and_check(manager, "web", settle=1.0)
        assert outcome.ok, outcome
        assert outcome.status.pid != status["web"].pid
        _serves(port, "v2")

        crash = await restart_and_check(manager, "crash", settle=2.0)
        assert crash.crash_looping and "crashed" in crash.problem
        assert "boom-42" in crash.log_tail
        assert "boom-42" in await manager.logs("crash", lines=5)

        with pytest.raises(UsageError) as unknown:
            await manager.restart("nope")
        assert unknown.value.fix is not None and "crash, web" in unknown.value.fix

        # A second install with nothing changed leaves the running service alone;
        # a changed definition is applied by restarting it.
        pid = (await manager.status(["web"]))["web"].pid
        assert await manager.install() == []
        assert (await manager.status(["web"]))["web"].pid == pid
        services["web"] = _web(port, env={"EXTRA": "1"})
        manager = SupervisorManager(
            master,
            str(project.remote),
            "demo",
            services,
            supervisord=supervisord,
            supervisorctl=supervisorctl,
        )
        assert await manager.install() == ["web"]
        restarted = await _settled(manager, "web")
        assert restarted.state == "running" and restarted.pid != pid
        pid = restarted.pid
        _serves(port, "v2")
    finally:
        await manager.shutdown()
    assert not _pid_alive(pid or 0)
    with pytest.raises(DevSyncError, match="supervisord is not running") as stopped:
        await manager.status()
    assert stopped.value.fix is not None and "dev-sync services install" in stopped.value.fix


async def test_supervisor_missing_on_the_remote(master: SshMaster, project: Project) -> None:
    # The remote PATH (sshd's default) does not hold the venv, so plain names are missing,
    # unless a system supervisor is installed: then use names nobody has.
    plain = shutil.which("supervisorctl", path="/usr/local/bin:/usr/bin:/bin") is None
    names = {} if plain else {"supervisord": "no-supervisord", "supervisorctl": "no-supervisorctl"}
    manager = SupervisorManager(master, str(project.remote), "demo", {"web": _web(1234)}, **names)
    with pytest.raises(DevSyncError, match="is not installed on the remote") as missing:
        await manager.status()
    assert missing.value.fix is not None and "pip install supervisor" in missing.value.fix
    with pytest.raises(DevSyncError, match="is not installed on the remote"):
        await manager.install()


# --------------------------------------------------------------------------
# PM2


@pytest.fixture
def pm2_home() -> Iterator[str]:
    """A private, short PM2_HOME (its sockets live there); its daemon is killed after."""
    home = tempfile.mkdtemp(prefix="ds-pm2-", dir="/tmp")
    try:
        yield home
    finally:
        pm2 = shutil.which("pm2")
        if pm2 is not None and Path(home, "pm2.pid").exists():
            subprocess.run(
                [pm2, "kill"],
                env={**os.environ, "PM2_HOME": home},
                capture_output=True,
                timeout=30,
                check=False,
            )
        shutil.rmtree(home, ignore_errors=True)


async def test_pm2_install_restart_status_and_adopt(
    master: SshMaster, project: Project, pm2_home: str
) -> None:
    pm2 = _need("pm2 (npm install -g pm2)", shutil.which("pm2"))
    port = free_port()
    _write_server(project.remote, "v1")
    services = {
        "web": _web(port, manager="pm2"),
        "crash": CRASH.model_copy(update={"manager": "pm2"}),
    }
    manager = Pm2Manager(master, str(project.remote), "demo", services, pm2=pm2, home=pm2_home)
    try:
        await manager.install()
        wait_until(lambda: http_get(port) == "v1", timeout=15, interval=0.05)
        status = (await manager.status(["web"]))["web"]
        assert status.state == "running" and status.pid and status.restarts == 0

        _write_server(project.remote, "v2")
        outcome = await restart_and_check(manager, "web", settle=1.0)
        assert outcome.ok, outcome
        assert outcome.status.restarts == 1
        _serves(port, "v2")

        crash = await restart_and_check(manager, "crash", settle=3.0)
        assert crash.crash_looping, crash
        assert "boom-42" in crash.log_tail

        # A program PM2 already runs, adopted by name: restarted and watched, never defined.
        adopted = {"legacy": ServiceConfig(manager="pm2", program="web")}
        other = Pm2Manager(master, str(project.remote), "demo", adopted, pm2=pm2, home=pm2_home)
        assert await other.install() == []
        legacy = await restart_and_check(other, "legacy", settle=0.5)
        assert legacy.ok and legacy.status.restarts == 2
        _serves(port, "v2")

        with pytest.raises(UsageError, match="no service named 'nope'"):
            await manager.logs("nope")

        # Installing again: an unchanged app keeps running, a changed one is replaced.
        pid = (await manager.status(["web"]))["web"].pid
        assert await manager.install() == []
        assert (await manager.status(["web"]))["web"].pid == pid
        services["web"] = _web(port, manager="pm2", env={"EXTRA": "1"})
        manager = Pm2Manager(master, str(project.remote), "demo", services, pm2=pm2, home=pm2_home)
        assert await manager.install() == ["web"]
        assert (await _settled(manager, "web")).pid != pid
        _serves(port, "v2")
    finally:
        await manager.shutdown()
    assert not Path(pm2_home, "pm2.pid").exists(), "the PM2 daemon was left running"


async def test_pm2_missing_on_the_remote(master: SshMaster, project: Project) -> None:
    service = _web(1234, manager="pm2")
    manager = Pm2Manager(master, str(project.remote), "demo", {"web": service}, pm2="no-pm2-here")
    with pytest.raises(DevSyncError, match="no-pm2-here is not installed") as missing:
        await manager.restart("web")
    assert missing.value.fix is not None and "npm install -g pm2" in missing.value.fix


# --------------------------------------------------------------------------
# command: dev-sync runs it


async def test_command_manager_start_restart_stop(master: SshMaster, project: Project) -> None:
    port = free_port()
    _write_server(project.remote, "v1")
    services = {
        "web": _web(port, manager="command"),
        "crash": CRASH.model_copy(update={"manager": "command"}),
    }
    manager = CommandManager(master, str(project.remote), "demo", services)
    try:
        await manager.install()
        _serves(port, "v1")
        first = (await manager.status(["web"]))["web"]
        assert first.state == "running" and first.pid and first.port == port

        _write_server(project.remote, "v2")
        outcome = await restart_and_check(manager, "web", settle=0.5)
        assert outcome.ok, outcome
        assert outcome.status.pid != first.pid
        assert first.pid is not None and not _pid_alive(first.pid)
        _serves(port, "v2")
        assert "serving v2" in await manager.logs("web")

        crash = await restart_and_check(manager, "crash", settle=2.0)
        assert crash.crash_looping and crash.status.state == "crashed"
        assert "boom-42" in crash.log_tail

        # A changed command is applied by the next install, which restarts it.
        services["web"] = _web(port, manager="command", env={"EXTRA": "1"})
        manager = CommandManager(master, str(project.remote), "demo", services)
        assert await manager.install() == ["web"]
        _serves(port, "v2")

        await manager.stop("web")
        stopped = (await manager.status(["web"]))["web"]
        assert stopped.state == "stopped" and stopped.pid is None
        assert http_get(port) == ""
    finally:
        await manager.shutdown()
    pidfiles = list((project.remote / ".dev-sync" / "run").glob("*.pid"))
    assert pidfiles == [], "shutdown left services behind"


# --------------------------------------------------------------------------
# systemd user units (only where a user instance runs)


async def test_systemd_user_units(master: SshMaster, project: Project) -> None:
    probe = await master.run(["systemctl", "--user", "show", "-p", "Version"], check=False)
    if probe.returncode != 0:
        why = (probe.err.strip().splitlines() or [f"exit code {probe.returncode}"])[-1]
        pytest.skip(f"`systemctl --user` does not work on this machine: {why}")
    port = free_port()
    _write_server(project.remote, "v1")
    name = f"t{os.getpid()}"
    manager = SystemdManager(
        master, str(project.remote), "demo", {name: _web(port, manager="systemd")}
    )
    try:
        await manager.install()
        _serves(port, "v1")
        _write_server(project.remote, "v2")
        outcome = await restart_and_check(manager, name, settle=1.0)
        assert outcome.ok, outcome
        _serves(port, "v2")
    finally:
        await manager.shutdown()
        unit = Path.home() / ".config/systemd/user" / f"devsync-{name}.service"
        with contextlib.suppress(FileNotFoundError):
            unit.unlink()


STUB_SYSTEMCTL = """\
#!/bin/sh
echo "$*" >> "$(dirname "$0")/calls.log"
case "$*" in
  *" show "*) printf '%s\\n' Id=devsync-web.service LoadState=loaded ActiveState=active \\
    SubState=running MainPID=4242 NRestarts=2 ExecMainStartTimestampMonotonic=1000000 ;;
esac
"""


async def test_systemd_scripts_with_a_stub_systemctl(
    master: SshMaster, project: Project, tmp_path: Path
) -> None:
    """The systemd adapter's remote scripts, run for real over ssh with a stand-in systemctl."""
    stub = tmp_path / "bin" / "systemctl"
    stub.parent.mkdir()
    stub.write_text(STUB_SYSTEMCTL)
    stub.chmod(0o755)
    config_home = tmp_path / "config"
    manager = SystemdManager(
        master,
        str(project.remote),
        "demo",
        {"web": _web(8000, manager="systemd")},
        systemctl=str(stub),
        prefix=["env", f"XDG_CONFIG_HOME={config_home}"],
    )
    assert await manager.install() == []
    unit = config_home / "systemd" / "user" / "devsync-web.service"
    assert "ExecStart=/bin/sh" in unit.read_text()
    assert (project.remote / ".dev-sync" / "services" / "web.sh").is_file()
    calls = (stub.parent / "calls.log").read_text().splitlines()
    assert calls == [
        "--user daemon-reload",
        "--user enable --quiet devsync-web.service",
        "--user start devsync-web.service",
    ]

    status = (await manager.status())["web"]
    assert status.state == "running" and status.pid == 4242 and status.restarts == 2
    assert status.uptime_s is not None and status.uptime_s > 0

    # A changed definition: the unit file is rewritten and the unit restarted.
    manager = SystemdManager(
        master,
        str(project.remote),
        "demo",
        {"web": _web(8000, manager="systemd", env={"EXTRA": "1"})},
        systemctl=str(stub),
        prefix=["env", f"XDG_CONFIG_HOME={config_home}"],
    )
    assert await manager.install() == ["web"]
    calls = (stub.parent / "calls.log").read_text().splitlines()
    assert calls[-1] == "--user restart devsync-web.service"
    await manager.shutdown()
    assert (stub.parent / "calls.log").read_text().splitlines()[-1] == (
        "--user disable --now devsync-web.service"
    )
