"""Port forwards and intercepts through the CLI, against real services on the sandbox."""

from __future__ import annotations

import http.server
import os
import signal
import subprocess
import sys
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest
from driver import Session, run_cli
from helpers import Project, TcpProxy, free_port, http_get, wait_until

SERVER = '''
import http.server, os
class H(http.server.BaseHTTPRequestHandler):
    def do_GET(self):
        self.send_response(200); self.end_headers(); self.wfile.write(b"remote")
    def log_message(self, *a): pass
http.server.HTTPServer(("127.0.0.1", int(os.environ["PORT"])), H).serve_forever()
'''


@pytest.fixture(autouse=True)
def _state_dir(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("DEV_SYNC_STATE_DIR", str(tmp_path / "state"))


@pytest.fixture
def service(project: Project) -> Iterator[int]:
    """A service named api under the plain command manager on the sandbox remote."""
    port = free_port()
    (project.local / "api").mkdir()
    (project.local / "api" / "server.py").write_text(SERVER)
    project.write_config(sections={"services.api": {
        "command": "python3 server.py", "cwd": "api", "port": port, "manager": "command"}})
    cfg = str(project.config)
    assert run_cli("up", "--once", "--config", cfg).returncode == 0
    installed = run_cli("services", "install", "--config", cfg)
    assert installed.returncode == 0, installed.stderr
    wait_until(lambda: http_get(port) == "remote", timeout=15)
    yield port
    pidfile = project.remote / ".dev-sync" / "run" / "api.pid"
    if pidfile.exists():
        try:
            os.killpg(int(pidfile.read_text().split()[0]), signal.SIGTERM)
        except (ProcessLookupError, ValueError):
            pass


class LocalServer:
    """The laptop side of an intercept: answers "local"."""

    def __init__(self) -> None:
        class H(http.server.BaseHTTPRequestHandler):
            def do_GET(self) -> None:
                self.send_response(200)
                self.end_headers()
                self.wfile.write(b"local")

            def log_message(self, *args: object) -> None:
                pass

        self.httpd = http.server.HTTPServer(("127.0.0.1", 0), H)
        self.port = int(self.httpd.server_address[1])
        threading.Thread(target=self.httpd.serve_forever, daemon=True).start()

    def close(self) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()


def spawn(*args: str) -> subprocess.Popen[str]:
    return subprocess.Popen([sys.executable, "-m", "dev_sync", *args], stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True)


def read_until(proc: subprocess.Popen[str], needle: str) -> str:
    assert proc.stdout is not None
    seen = []
    for line in proc.stdout:
        seen.append(line)
        if needle in line:
            return line
    raise AssertionError(f"{needle!r} never printed; output: {''.join(seen)}")


def test_forward_picks_the_next_free_port_and_carries_http(project: Project,
                                                           service: int) -> None:
    # The sandbox remote is this machine, so the service's own port is taken here.
    proc = spawn("forward", "--config", str(project.config))
    try:
        moved = read_until(proc, "is taken, using")
        local = int(moved.split("using ")[1].split()[0])
        read_until(proc, "Ctrl-C to stop")
        assert http_get(local) == "remote"
    finally:
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(15) == 0
    assert http_get(local) == ""


def test_up_forward_survives_a_reconnect(project: Project, service: int) -> None:
    with TcpProxy(project.sandbox.port) as proxy:
        project.write_config(remote=project.via_proxy(proxy), sections={"services.api": {
            "command": "python3 server.py", "cwd": "api", "port": service,
            "manager": "command"}})
        from dev_sync.config import load_config
        from dev_sync.forwards import plan_forwards

        local = plan_forwards(load_config(project.config).services)[0].local_port
        with Session(project.config, "--forward") as s:
            s.wait_watching()
            wait_until(lambda: http_get(local) == "remote", timeout=10)
            proxy.cut()
            s.wait_for("offline")
            proxy.restore()
            s.wait_for("connected", timeout=30)
            wait_until(lambda: http_get(local) == "remote", timeout=10)
            assert s.stop() == 0


def test_intercept_routes_remote_traffic_here_and_restores(project: Project,
                                                           service: int) -> None:
    laptop = LocalServer()
    cfg = str(project.config)
    try:
        proc = spawn("intercept", "api", "--port", str(laptop.port), "--config", cfg)
        try:
            read_until(proc, "now reaches")
            # A request made on the remote side, to the service's port there.
            assert http_get(service) == "local"
        finally:
            proc.send_signal(signal.SIGINT)
            out = proc.communicate(timeout=30)[0]
        assert proc.returncode == 0, out
        assert "runs on the remote again" in out
        wait_until(lambda: http_get(service) == "remote", timeout=15)

        # Killed mid-intercept: the next command puts the service back.
        proc = spawn("intercept", "api", "--port", str(laptop.port), "--config", cfg)
        read_until(proc, "now reaches")
        assert http_get(service) == "local"
        proc.kill()
        proc.wait(10)
        status = run_cli("services", "--json", "--config", cfg)
        assert status.returncode == 0, status.stdout + status.stderr
        assert "restored api" in status.stderr
        wait_until(lambda: http_get(service) == "remote", timeout=15)
    finally:
        laptop.close()


def test_intercept_ends_and_restores_when_the_connection_drops(project: Project,
                                                               service: int) -> None:
    laptop = LocalServer()
    try:
        with TcpProxy(project.sandbox.port) as proxy:
            project.write_config(remote=project.via_proxy(proxy), sections={"services.api": {
                "command": "python3 server.py", "cwd": "api", "port": service,
                "manager": "command"}})
            proc = spawn("intercept", "api", "--port", str(laptop.port),
                         "--config", str(project.config))
            read_until(proc, "now reaches")
            assert http_get(service) == "local"
            proxy.cut()
            read_until(proc, "connection lost")
            proxy.restore()
            out = proc.communicate(timeout=60)[0]
            assert proc.returncode == 1, out
            assert "intercept api" in out and "runs on the remote again" in out
            wait_until(lambda: http_get(service) == "remote", timeout=15)
    finally:
        laptop.close()
