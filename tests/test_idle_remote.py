"""Idle auto-stop against the sandbox sshd: install, status, keep-awake, uninstall, sessions.

The sandbox "remote" is this machine, logged in as the current user, so
the cron path runs for real with that user's crontab (saved before each
test and put back after it). This machine has no systemd; the systemd path
runs its remote scripts against a stand-in ``systemctl`` on PATH, and in a
private folder (``DEV_SYNC_IDLE_HOME``) instead of ``/etc/systemd``. Every
stop command here writes a marker file.
"""

from __future__ import annotations

import asyncio
import json
import os
import socket
import subprocess
import sys
import threading
import time
from collections.abc import AsyncIterator, Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from driver import run_cli
from helpers import Project, free_port, wait_until

from dev_sync import remote, remote_idle
from dev_sync.config import load_config
from dev_sync.idle import (
    CRON_MARK,
    Heartbeat,
    IdleConfig,
    install,
    status,
    touch_activity,
    uninstall,
)
from dev_sync.sandbox import SandboxInfo
from dev_sync.ssh import SshMaster, Target

USER_CRONTAB = 'MAILTO=""\n# a line of the user\'s own\n0 3 * * * true\n'


def _crontab() -> str | None:
    proc = subprocess.run(["crontab", "-l"], capture_output=True, text=True, check=False)
    if proc.returncode != 0:
        assert "no crontab" in proc.stderr, proc.stderr
        return None
    return proc.stdout


def _set_crontab(text: str | None) -> None:
    if text is None:
        subprocess.run(["crontab", "-r"], capture_output=True, check=False)
    else:
        subprocess.run(["crontab", "-"], input=text, text=True, check=True)


@pytest.fixture
def crontab() -> Iterator[None]:
    """The current user's crontab, put back as it was after the test."""
    if subprocess.run(["sh", "-c", "command -v crontab"], capture_output=True,
                      check=False).returncode != 0:
        reason = "cron is not installed (scripts/setup.sh installs it)"
        if os.environ.get("CI"):
            pytest.fail(reason + " (CI is set, so this is an error, not a skip)")
        pytest.skip(reason)
    saved = _crontab()
    try:
        yield
    finally:
        _set_crontab(saved)


@pytest.fixture
async def master(project: Project) -> AsyncIterator[SshMaster]:
    ssh = SshMaster(Target.from_config(load_config(project.config)))
    await ssh.connect()
    try:
        yield ssh
    finally:
        await ssh.close()


def _json(proc: subprocess.CompletedProcess[str]) -> dict[str, Any]:
    data: dict[str, Any] = json.loads(proc.stdout)
    return data


# --------------------------------------------------------------------------
# The commands, as a user runs them (cron, the user's own crontab and folders)


def test_install_status_keep_awake_uninstall(project: Project, crontab: None,
                                             tmp_path: Path) -> None:
    marker = tmp_path / "stopped"
    config = str(project.write_config(sections={"idle": {
        "after": "30m", "stop": "command", "stop_command": ["touch", str(marker)]}}))
    before = run_cli("idle", "status", "--json", "--config", config)
    if before.returncode == 0 and _json(before)["installed"]:
        pytest.skip("an idle watcher is installed for this user; this test would replace it")
    assert before.returncode == 3 and _json(before) == {"installed": False,
                                                         "host": project.sandbox.host}
    _set_crontab(USER_CRONTAB)
    try:
        _install_to_uninstall(config, marker)
    finally:
        run_cli("idle", "uninstall", "--config", config)  # whatever happened above


def _install_to_uninstall(config: str, marker: Path) -> None:
    first = run_cli("idle", "install", "--config", config)
    assert first.returncode == 0, first.stderr
    assert "idle auto-stop installed on dev-sync-sandbox (a crontab entry)" in first.stdout
    assert "created crontab entry" in first.stdout and "created watcher" in first.stdout
    table = _crontab()
    assert table is not None and table.startswith(USER_CRONTAB)
    ours = [line for line in table.splitlines() if CRON_MARK in line]
    assert len(ours) == 1 and ours[0].startswith("* * * * * ")

    # Installing again changes nothing; new settings are written in place.
    again = run_cli("idle", "install", "--config", config)
    assert again.returncode == 0, again.stderr
    assert "already installed, nothing changed" in again.stdout
    assert _crontab() == table
    longer = run_cli("idle", "install", "--after", "1h", "--config", config)
    assert longer.returncode == 0, longer.stderr
    assert "idle auto-stop updated on dev-sync-sandbox" in longer.stdout
    assert longer.stdout.splitlines()[1:] == ["  changed settings"]
    assert _crontab() == table

    shown = run_cli("idle", "status", "--json", "--config", config)
    assert shown.returncode == 0, shown.stderr
    data = _json(shown)
    assert data["installed"] and data["mechanism"] == "cron" and data["entry"]
    assert data["settings"]["after"] == 3600 and data["settings"]["stop"] == "command"
    assert data["last_activity"]["what"] == "dev-sync"  # install counts as use
    assert abs(data["left"] - 3600) < 120 and data["keep_awake_until"] is None
    human = run_cli("idle", "status", "--config", config)
    assert "last activity: dev-sync push or heartbeat" in human.stdout
    assert "stop in 59m" in human.stdout

    kept = run_cli("idle", "keep-awake", "--for", "2h", "--config", config)
    assert kept.returncode == 0, kept.stderr
    assert "dev-sync-sandbox stays up until" in kept.stdout
    data = _json(run_cli("idle", "status", "--json", "--config", config))
    assert abs(data["keep_awake_until"] - (time.time() + 7200)) < 120
    assert abs(data["left"] - 7200) < 120 and "kept awake until" in data["reason"]

    # The crontab entry works: run its command as cron would (sh -c).
    command = ours[0].removeprefix("* * * * * ").replace("\\%", "%")
    subprocess.run(["sh", "-c", command], check=True, timeout=60)
    data = _json(run_cli("idle", "status", "--json", "--config", config))
    assert data["last_check"] is not None and data["action"] == "keep"
    assert not marker.exists()

    gone = run_cli("idle", "uninstall", "--config", config)
    assert gone.returncode == 0, gone.stderr
    assert "removed crontab entry" in gone.stdout
    assert _crontab() == USER_CRONTAB
    assert run_cli("idle", "status", "--config", config).returncode == 3
    twice = run_cli("idle", "uninstall", "--config", config)
    assert "idle auto-stop was not installed on dev-sync-sandbox" in twice.stdout


def test_keep_awake_needs_an_installed_watcher(project: Project) -> None:
    if _json(run_cli("idle", "status", "--json", "--config", str(project.config)))["installed"]:
        pytest.skip("an idle watcher is installed for this user here")
    result = run_cli("idle", "keep-awake", "--for", "1h", "--config", str(project.config))
    assert result.returncode == 1 and "idle auto-stop is not installed" in result.stderr
    bad = run_cli("idle", "keep-awake", "--for", "soon", "--config", str(project.config))
    assert bad.returncode == 2 and "--for: must be a duration" in bad.stderr


# --------------------------------------------------------------------------
# systemd, through a stand-in systemctl (this machine's PID 1 is not systemd)

STUB_SYSTEMCTL = """\
#!/bin/sh
d=$(dirname "$0")
echo "$*" >> "$d/calls.log"
if [ "$1" = is-system-running ]; then cat "$d/system-state"; exit 0; fi
[ "$1" = --user ] && shift
case $1 in
  is-enabled) [ -f "$d/enabled" ] ;;
  is-active) [ -f "$d/active" ] ;;
  enable) touch "$d/enabled" ;;
  start) touch "$d/active" ;;
  disable) rm -f "$d/enabled" "$d/active" ;;
esac
"""


async def test_systemd_timer_install_switch_to_cron_and_uninstall(
    master: SshMaster, crontab: None, tmp_path: Path
) -> None:
    stub = tmp_path / "bin" / "systemctl"
    stub.parent.mkdir()
    stub.write_text(STUB_SYSTEMCTL)
    stub.chmod(0o755)
    state = stub.parent / "system-state"
    calls = stub.parent / "calls.log"
    home = tmp_path / "idle"
    prefix = ["env", f"PATH={stub.parent}:{os.environ['PATH']}", f"DEV_SYNC_IDLE_HOME={home}"]
    config = IdleConfig(stop="command", stop_command=["touch", str(tmp_path / "stopped")])
    units = home / "systemd" / "system"

    state.write_text("running\n")
    first = await install(master, config, prefix=prefix)
    assert first.mechanism == "systemd"
    assert {"created dev-sync-idle.service", "created dev-sync-idle.timer",
            "enabled systemd timer", "created watcher"} <= set(first.changes)
    service = (units / "dev-sync-idle.service").read_text()
    assert f'"{home}/lib/watcher.py" "--settings" "{home}/lib/settings.json" "check"' in service
    assert (units / "dev-sync-idle.timer").is_file()
    assert calls.read_text().splitlines() == [
        "is-system-running", "daemon-reload", "is-enabled --quiet dev-sync-idle.timer",
        "enable --quiet dev-sync-idle.timer", "is-active --quiet dev-sync-idle.timer",
        "start dev-sync-idle.timer",
    ]
    calls.unlink()
    again = await install(master, config, prefix=prefix)
    assert again.mechanism == "systemd" and again.changes == []
    assert "enable" not in calls.read_text().split() and "start" not in calls.read_text().split()
    shown = await status(master, prefix=prefix)
    assert shown["mechanism"] == "systemd" and shown["entry"] and shown["scheduler_running"]

    # systemd gone (the image changed): the next install moves to cron and removes the units.
    state.write_text("offline\n")
    _set_crontab(USER_CRONTAB)
    moved = await install(master, config, prefix=prefix)
    assert moved.mechanism == "cron"
    assert f"removed systemd timer ({units})" in moved.changes
    assert "created crontab entry" in moved.changes
    assert not (units / "dev-sync-idle.timer").exists()
    assert "disable --now dev-sync-idle.timer" in calls.read_text()
    table = _crontab()
    assert table is not None and f"{home}/lib/watcher.py" in table

    removed = await uninstall(master, prefix=prefix)
    assert "removed crontab entry" in removed
    assert _crontab() == USER_CRONTAB
    assert not (home / "lib").exists() and not (home / "state").exists()
    assert (await status(master, prefix=prefix)) == {"installed": False}


# --------------------------------------------------------------------------
# Heartbeat: the activity file dev-sync touches


async def _eventually(check: Callable[[], bool], timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while not check():
        assert time.monotonic() < deadline, f"{check} not met within {timeout}s"
        await asyncio.sleep(0.02)


async def test_heartbeat_touches_the_activity_file(master: SshMaster, tmp_path: Path) -> None:
    prefix = ["env", f"DEV_SYNC_IDLE_HOME={tmp_path}"]
    activity = tmp_path / "activity"
    assert await touch_activity(master, prefix=prefix)
    assert activity.is_file()
    os.utime(activity, (0, 0))

    beat = Heartbeat(master, interval=0.2, min_gap=60, prefix=prefix)
    beat.pushed()
    beat.pushed()  # in flight: shares the first touch
    await _eventually(lambda: activity.stat().st_mtime > 0)
    await _eventually(lambda: beat.touches == 1)
    beat.pushed()  # within min_gap of the last touch: nothing to add
    running = asyncio.create_task(beat.run())
    await _eventually(lambda: beat.touches >= 3)
    running.cancel()
    with pytest.raises(asyncio.CancelledError):
        await running

    # Unreachable: False, never an exception (the sync deals with lost connections);
    # with the master down the heartbeat does not even try.
    offline = SshMaster(Target("127.0.0.1", port=free_port(), connect_timeout=2))
    assert not await touch_activity(offline, prefix=prefix)
    await master.close()
    assert not await beat.touch() and beat.touches >= 3


async def test_a_session_start_marks_the_machine_as_used(master: SshMaster,
                                                         project: Project) -> None:
    activity = Path.home() / ".local" / "state" / "dev-sync" / "activity"
    started = time.time()
    await remote.prepare(master, str(project.remote), adopt=False)
    assert activity.stat().st_mtime >= started - 1


# --------------------------------------------------------------------------
# What counts as a session: a terminal does, a bare forward does not


class _Reader:
    """Collects a process's output on a thread, so tests wait on it without blocking."""

    def __init__(self, proc: subprocess.Popen[bytes]) -> None:
        self.proc = proc
        self.data = b""
        threading.Thread(target=self._read, daemon=True).start()

    def _read(self) -> None:
        assert self.proc.stdout is not None
        fd = self.proc.stdout.fileno()
        for chunk in iter(lambda: os.read(fd, 4096), b""):
            self.data += chunk

    def text(self) -> str:
        return self.data.decode("utf-8", "replace")


def _forward_answers(port: int) -> bool:
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=2) as sock:
            return sock.recv(4).startswith(b"SSH-")
    except OSError:
        return False


def test_a_terminal_session_is_activity_a_bare_forward_is_not(
    sandbox: SandboxInfo, tmp_path: Path
) -> None:
    marker = tmp_path / "stopped"
    activity = tmp_path / "activity"
    activity.touch()
    os.utime(activity, (0, 0))  # long ago
    settings = tmp_path / "settings.json"
    settings.write_text(json.dumps({
        "after": 600, "warn_before": 300, "stop": "command",
        "stop_command": ["touch", str(marker)], "activity_file": str(activity),
        "state_file": str(tmp_path / "state.json"), "log_file": str(tmp_path / "idle.log"),
    }))

    def watcher(command: str, now: float) -> dict[str, Any]:
        # Only sessions of the sandbox sshd: other terminals on this machine are not ours.
        argv = [sys.executable, remote_idle.__file__, "--settings", str(settings),
                "--now", repr(now), "--sessions-under", str(sandbox.pid), command]
        proc = subprocess.run(argv, capture_output=True, text=True, timeout=60, check=False)
        assert proc.returncode == 0, proc.stderr
        data: dict[str, Any] = json.loads(proc.stdout)
        return data

    ssh = ["ssh", "-F", str(sandbox.ssh_config)]
    port = free_port()
    procs: list[subprocess.Popen[bytes]] = []
    try:
        # A bare port forward, and a client running a command without a terminal.
        procs.append(subprocess.Popen([*ssh, "-N", "-L", f"127.0.0.1:{port}:127.0.0.1:"
                                       f"{sandbox.port}", sandbox.host],
                                      stdin=subprocess.DEVNULL, stderr=subprocess.DEVNULL))
        quiet = subprocess.Popen([*ssh, "-T", sandbox.host, "echo ready; exec sleep 120"],
                                 stdin=subprocess.DEVNULL, stdout=subprocess.PIPE)
        procs.append(quiet)
        wait_until(lambda: _forward_answers(port), timeout=15, message="no forward")
        quiet_out = _Reader(quiet)
        wait_until(lambda: "ready" in quiet_out.text(), timeout=15)
        seen = watcher("status", time.time())
        assert seen["sessions"] == []
        assert seen["last_activity"]["what"] != "ssh"

        # A login with a terminal.
        login = subprocess.Popen([*ssh, "-tt", sandbox.host], stdin=subprocess.PIPE,
                                 stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
        procs.append(login)
        screen = _Reader(login)
        sessions = wait_until(lambda: watcher("status", time.time())["sessions"], timeout=15)
        assert len(sessions) == 1 and sessions[0]["user"] == sandbox.user
        assert sessions[0]["tty"].startswith("pts/")
        last_input = sessions[0]["last_input"]
        now = watcher("status", time.time())
        assert now["last_activity"]["what"] == "ssh" and now["action"] == "keep"

        # The same terminal untouched for an hour (injected clock) keeps nothing up.
        later = watcher("status", last_input + 3600)
        assert later["action"] in ("warn", "stop") and later["left"] < 0
        assert later["sessions"][0]["idle"] == pytest.approx(3600, abs=1)

        # Near the end of its countdown, the user of that terminal is warned on it, once.
        warned = watcher("check", last_input + 400)
        assert warned["action"] == "warn" and warned["last_activity"]["what"] == "ssh"
        wait_until(lambda: "this machine stops for inactivity" in screen.text(), timeout=15,
                   message=lambda: f"terminal shows {screen.text()[-300:]!r}")
        assert watcher("check", last_input + 450)["action"] == "keep"
        assert screen.text().count("this machine stops for inactivity") == 1

        stopped = watcher("check", last_input + 601)
        assert stopped["action"] == "stop" and marker.exists()
        wait_until(lambda: "this machine is stopping now" in screen.text(), timeout=15)
    finally:
        for proc in procs:
            proc.terminate()
        for proc in procs:
            try:
                proc.wait(10)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
