"""The watcher script run for real, as the timer runs it: a process, files, a clock override.

The stop command is a harmless one that writes a marker file. Sessions are
limited to those served by this test process (``--sessions-under``), which
serves none: the terminals of whoever else uses this machine are neither
counted nor written to.
"""

from __future__ import annotations

import glob
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest

from dev_sync import remote_idle

SCRIPT = remote_idle.__file__
# Far enough ahead that the machine's start and everyone's terminals are old news.
BASE = time.time() + 86_400.0


def _settings(tmp: Path, **extra: Any) -> Path:
    marker = tmp / "stopped"
    data = {
        "after": 600,
        "warn_before": 120,
        "stop": "command",
        "stop_command": [sys.executable, "-c",
                         "import pathlib, sys; pathlib.Path(sys.argv[1]).write_text('stopped')",
                         str(marker)],
        "activity_file": str(tmp / "activity"),
        "state_file": str(tmp / "state" / "state.json"),
        "log_file": str(tmp / "state" / "idle.log"),
        "mechanism": "cron",
        **extra,
    }
    path = tmp / "settings.json"
    path.write_text(json.dumps(data))
    return path


def _touch(path: Path, at: float) -> None:
    path.touch()
    os.utime(path, (at, at))


def _watcher(settings: Path, *args: str, now: float, python: str = sys.executable
             ) -> dict[str, Any]:
    argv = [python, SCRIPT, "--settings", str(settings), "--now", repr(now),
            "--sessions-under", str(os.getpid()), *args]
    proc = subprocess.run(argv, capture_output=True, text=True, timeout=60, check=False)
    assert proc.returncode == 0, proc.stderr
    result: dict[str, Any] = json.loads(proc.stdout)
    return result


def test_check_keeps_warns_once_then_runs_the_stop_command(tmp_path: Path) -> None:
    settings = _settings(tmp_path)
    _touch(tmp_path / "activity", BASE)
    marker = tmp_path / "stopped"

    fresh = _watcher(settings, "check", now=BASE + 300)
    assert fresh["action"] == "keep" and fresh["left"] == pytest.approx(300)
    assert fresh["last_activity"]["what"] == "dev-sync"

    warn = _watcher(settings, "check", now=BASE + 500)
    assert warn["action"] == "warn" and warn["left"] == pytest.approx(100)
    assert _watcher(settings, "check", now=BASE + 550)["action"] == "keep"
    assert not marker.exists()

    stop = _watcher(settings, "check", now=BASE + 601)
    assert stop["action"] == "stop"
    assert marker.read_text() == "stopped"

    state = json.loads((tmp_path / "state" / "state.json").read_text())
    assert state["stop_requested_at"] == BASE + 601
    assert state["stop_result"]["code"] == 0
    assert len(state["cpu"]) == 2 and isinstance(state["cpu_percent"], float)
    log = (tmp_path / "state" / "idle.log").read_text()
    assert log.count(" warn: ") == 1 and "told nobody" in log
    assert "stop command exited 0" in log

    status = _watcher(settings, "status", now=BASE + 602)
    assert status["stop_requested_at"] == BASE + 601
    assert status["mechanism"] == "cron" and status["sessions"] == []
    assert any("stop command exited 0" in line for line in status["log"])


def test_new_activity_cancels_the_countdown(tmp_path: Path) -> None:
    settings = _settings(tmp_path)
    _touch(tmp_path / "activity", BASE)
    assert _watcher(settings, "check", now=BASE + 500)["action"] == "warn"
    _touch(tmp_path / "activity", BASE + 550)  # a push arrives
    after = _watcher(settings, "check", now=BASE + 700)
    assert after["action"] == "keep" and after["left"] == pytest.approx(450)
    assert not (tmp_path / "stopped").exists()


def test_keep_awake_is_honoured_by_the_check(tmp_path: Path) -> None:
    settings = _settings(tmp_path)
    _touch(tmp_path / "activity", BASE)
    kept = _watcher(settings, "keep-awake", "3600", now=BASE + 500)
    assert kept["keep_awake_until"] == BASE + 4100
    assert kept["left"] == pytest.approx(3600) and "kept awake" in kept["reason"]
    assert _watcher(settings, "check", now=BASE + 2000)["action"] == "keep"
    assert _watcher(settings, "check", now=BASE + 4000)["action"] == "warn"
    assert not (tmp_path / "stopped").exists()
    assert _watcher(settings, "check", now=BASE + 4101)["action"] == "stop"
    assert (tmp_path / "stopped").exists()

    cleared = _watcher(settings, "keep-awake", "0", now=BASE + 4200)
    assert cleared["keep_awake_until"] is None


def test_a_failing_stop_command_is_logged_and_retried(tmp_path: Path) -> None:
    settings = _settings(tmp_path, stop_command=["sh", "-c", "echo no credentials >&2; exit 3"])
    _touch(tmp_path / "activity", BASE)
    _watcher(settings, "check", now=BASE + 500)
    assert _watcher(settings, "check", now=BASE + 601)["action"] == "stop"
    state = json.loads((tmp_path / "state" / "state.json").read_text())
    assert state["stop_result"] == {"code": 3, "output": "no credentials", "at": BASE + 601}
    assert _watcher(settings, "check", now=BASE + 661)["action"] == "stop"
    log = (tmp_path / "state" / "idle.log").read_text()
    assert log.count("stop command exited 3: no credentials") == 2


def test_missing_settings_exit_2(tmp_path: Path) -> None:
    proc = subprocess.run([sys.executable, SCRIPT, "--settings", str(tmp_path / "none.json")],
                          capture_output=True, text=True, timeout=60, check=False)
    assert proc.returncode == 2 and "cannot read" in proc.stderr


def _python38() -> str | None:
    """A Python 3.8 to run the script with, the oldest a VM may bring."""
    candidates = [shutil.which("python3.8") or ""]
    candidates += sorted(glob.glob(os.path.expanduser("~/.pyenv/versions/3.8*/bin/python3.8")))
    for candidate in candidates:
        if not candidate:
            continue
        probe = subprocess.run([candidate, "-c", "import sys; print(sys.version_info[:2])"],
                               capture_output=True, text=True, timeout=30, check=False)
        if probe.returncode == 0 and probe.stdout.strip() == "(3, 8)":
            return candidate
    return None


def test_the_script_runs_on_python_3_8(tmp_path: Path) -> None:
    python = _python38()
    if python is None:
        pytest.skip("no Python 3.8 on this machine")
    settings = _settings(tmp_path)
    _touch(tmp_path / "activity", BASE)
    assert _watcher(settings, "check", now=BASE + 500, python=python)["action"] == "warn"
    assert _watcher(settings, "check", now=BASE + 601, python=python)["action"] == "stop"
    assert (tmp_path / "stopped").read_text() == "stopped"
    assert _watcher(settings, "status", now=BASE, python=python)["stop_result"]["code"] == 0
