"""End-to-end remote actions: real npm installs and real supervisord restarts on the sandbox."""

from __future__ import annotations

import json
import shutil
import subprocess
from pathlib import Path

import pytest
from driver import Session, run_cli
from helpers import Project, TomlValue, free_port, http_get, wait_until


@pytest.fixture(autouse=True)
def _state_dir(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("DEV_SYNC_STATE_DIR", str(tmp_path / "state"))


def installs(s: Session, label_part: str) -> list[dict[str, object]]:
    return [e for e in s.of_kind("install_started") if label_part in str(e["label"])]


# -- dependency installs ---------------------------------------------------------


def _npm_project(project: Project, version: str) -> None:
    lib = project.local / "mylib"
    lib.mkdir(exist_ok=True)
    (lib / "package.json").write_text(json.dumps({"name": "mylib", "version": version}))
    (lib / "index.js").write_text(f"module.exports = '{version}';\n")
    web = project.local / "web"
    web.mkdir(exist_ok=True)
    (web / "package.json").write_text(json.dumps(
        {"name": "web", "version": "1.0.0", "dependencies": {"mylib": "file:../mylib"}}))
    subprocess.run(["npm", "install", "--package-lock-only", "--no-audit", "--no-fund",
                    "--silent"], cwd=web, check=True, timeout=120)


@pytest.mark.skipif(shutil.which("npm") is None, reason="npm is not installed")
def test_npm_install_runs_on_lock_change_once_per_burst(project: Project) -> None:
    _npm_project(project, "1.0.0")
    remote_lib = project.remote / "web" / "node_modules" / "mylib"
    with Session(project.config) as s:
        s.wait_watching()
        done = s.wait_for("install_finished", timeout=120)
        assert done["ok"], done
        assert json.loads((remote_lib / "package.json").read_text())["version"] == "1.0.0"

        # A new version of the local dependency: the lock file changes, written
        # several times in a burst (as npm does); one install follows.
        (project.local / "mylib" / "package.json").write_text(
            json.dumps({"name": "mylib", "version": "1.0.1"}))
        scratch = project.local.parent / "scratch-web"
        shutil.copytree(project.local / "web", scratch)
        shutil.copytree(project.local / "mylib", project.local.parent / "mylib",
                        dirs_exist_ok=True)
        subprocess.run(["npm", "install", "--package-lock-only", "--no-audit", "--no-fund",
                        "--silent"], cwd=scratch, check=True, timeout=120)
        text = (scratch / "package-lock.json").read_text()
        lock = project.local / "web" / "package-lock.json"
        assert lock.read_text() != text
        for _ in range(10):
            lock.write_text(text)
        second = s.wait_for("install_finished", timeout=120)
        assert second["ok"], second
        wait_until(lambda: json.loads((remote_lib / "package.json").read_text())["version"]
                   == "1.0.1", timeout=10)
        assert len(installs(s, "npm in web")) == 2
        assert "node_modules" not in {p.name for p in (project.local / "web").iterdir()}
        assert s.stop() == 0

    # A restart of dev-sync finds the record up to date: nothing reinstalls.
    with Session(project.config) as s:
        s.wait_watching()
        (project.local / "touch.txt").write_text("x")
        s.wait_for("pushed")
        assert not installs(s, "npm"), [e for e in s.events if "install" in e["event"]]
        assert s.stop() == 0


def test_failed_install_reports_tail_and_rerun_and_sync_goes_on(project: Project) -> None:
    project.write_config(sections={"deps": {"rule": [
        {"name": "build", "globs": ["build.lock"], "command": "echo boom >&2; exit 3"}]}})
    with Session(project.config) as s:
        s.wait_watching()
        (project.local / "build.lock").write_text("1")
        failed = s.wait_for("install_finished", timeout=30)
        assert not failed["ok"] and failed["code"] == 3
        assert "boom" in failed["tail"]
        assert failed["rerun"].startswith("ssh ")
        # Syncing goes on, and the next change retries.
        (project.local / "after.txt").write_text("after")
        wait_until(lambda: (project.remote / "after.txt").exists(), timeout=10)
        (project.local / "build.lock").write_text("2")
        s.wait_for("install_finished", timeout=30)
        assert len(installs(s, "build")) == 2
        assert s.stop() == 0


def test_change_during_an_install_queues_exactly_one_more_run(project: Project,
                                                               tmp_path: Path) -> None:
    marker = tmp_path / "runs.txt"
    project.write_config(sections={"deps": {"rule": [{
        "name": "slow", "globs": ["slow.lock"], "cwd": "root",
        "command": f"echo start >> {marker}; sleep 1.5; cat slow.lock >> {marker}; "
                   f"echo end >> {marker}"}]}})
    with Session(project.config) as s:
        s.wait_watching()
        (project.local / "slow.lock").write_text("a\n")
        s.wait_for("install_started", timeout=30)
        for i in range(5):
            (project.local / "slow.lock").write_text(f"b{i}\n")
        s.wait_for("install_finished", timeout=30)
        s.wait_for("install_finished", timeout=30)
        lines = marker.read_text().split()
        # Never overlapping: start/end pairs in order; the second run saw the last write.
        assert lines[0] == "start" and lines[2] == "end" and lines[3] == "start"
        assert lines[-2:] == ["b4", "end"]
        assert len(installs(s, "slow")) == 2
        assert s.stop() == 0


# -- services --------------------------------------------------------------------


SERVER = '''
import http.server, os
class H(http.server.BaseHTTPRequestHandler):
    def do_GET(self):
        body = {text!r}.encode()
        self.send_response(200); self.end_headers(); self.wfile.write(body)
    def log_message(self, *a): pass
http.server.HTTPServer(("127.0.0.1", int(os.environ["PORT"])), H).serve_forever()
'''


@pytest.mark.skipif(shutil.which("supervisord") is None, reason="supervisor is not installed")
def test_supervisor_service_restarts_on_edit_and_self_reloader_does_not(
        project: Project) -> None:
    api_port, hot_port = free_port(), free_port()
    for name, text in (("api", "v1"), ("hot", "hot-v1")):
        (project.local / name).mkdir()
        (project.local / name / "server.py").write_text(SERVER.format(text=text))
    project.write_config(sections={
        "services.api": {"command": "python3 server.py", "cwd": "api", "port": api_port,
                         "restart_on": ["api/**/*.py"]},
        "services.hot": {"command": "python3 server.py", "cwd": "hot", "port": hot_port,
                         "restart_on": ["hot/**"], "reload": "self"},
    })
    cfg = str(project.config)
    try:
        assert run_cli("up", "--once", "--config", cfg).returncode == 0
        installed = run_cli("services", "install", "--config", cfg)
        assert installed.returncode == 0, installed.stderr
        wait_until(lambda: http_get(api_port) == "v1", timeout=15)
        listed = run_cli("services", "--json", "--config", cfg)
        assert {s["name"]: s["state"] for s in json.loads(listed.stdout)} == {
            "api": "running", "hot": "running"}

        with Session(project.config) as s:
            s.wait_watching()
            (project.local / "api" / "server.py").write_text(SERVER.format(text="v2"))
            (project.local / "hot" / "server.py").write_text(SERVER.format(text="hot-v2"))
            restarted = s.wait_for("service_restarted", timeout=30)
            assert restarted["name"] == "api" and restarted["ok"]
            assert restarted["cause"] == "api/server.py"
            wait_until(lambda: http_get(api_port) == "v2", timeout=10)
            # The self-reloading service was synced but not restarted.
            assert (project.remote / "hot" / "server.py").read_text().count("hot-v2")
            assert http_get(hot_port) == "hot-v1"
            assert [e["name"] for e in s.of_kind("service_restarting")] == ["api"]
            assert s.stop() == 0

        by_hand = run_cli("restart", "api", "--config", cfg)
        assert by_hand.returncode == 0 and "restarted" in by_hand.stdout
        unknown = run_cli("restart", "nope", "--config", cfg)
        assert unknown.returncode == 2 and "api, hot" in unknown.stderr
        log = run_cli("logs", "api", "--config", cfg)
        assert log.returncode == 0
        out = run_cli("exec", "--config", cfg, "--service", "api", "--", "sh", "-c",
                      'pwd; echo "$PORT"')
        assert out.returncode == 0, out.stderr
        assert out.stdout.split() == [str(project.remote / "api"), str(api_port)]
    finally:
        subprocess.run(["supervisorctl", "-c",
                        str(project.remote / ".dev-sync" / "supervisor" / "supervisord.conf"),
                        "shutdown"], capture_output=True, check=False)


def test_bad_services_and_deps_config_exit_2(project: Project) -> None:
    cases: list[tuple[dict[str, dict[str, TomlValue]], str]] = [
        ({"services.web": {"manager": "upstart", "command": "x"}}, "web.manager"),
        ({"services.web": {"cwd": "."}}, "web.command"),
        ({"services.web": {"command": "x", "restart_on": ["src/[ab"]}}, "restart_on"),
        ({"deps.nmp": {"command": "x"}}, "unknown preset 'nmp'"),
    ]
    for sections, needle in cases:
        project.write_config(sections=sections)
        result = run_cli("up", "--once", "--config", str(project.config))
        assert result.returncode == 2, (sections, result.stderr)
        assert needle in result.stderr, (needle, result.stderr)
