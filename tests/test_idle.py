"""Idle auto-stop without a VM: durations, the [idle] table, the decision, what install writes."""

from __future__ import annotations

import json
import shlex
from pathlib import Path
from typing import Any

import pytest

from dev_sync.config import parse_config
from dev_sync.errors import ConfigError, DevSyncError
from dev_sync.idle import (
    CRON_MARK,
    IdleConfig,
    Probe,
    choose_mechanism,
    cron_line,
    format_duration,
    install_files,
    parse_duration,
    parse_probe,
    settings_text,
    systemd_units,
)
from dev_sync.remote_idle import (
    Activity,
    Decision,
    Session,
    Settings,
    Sources,
    cpu_percent,
    decide,
    updated_state,
)

MIN = 60.0
T0 = 1_800_000_000.0  # the injected clock's origin
S = Settings(after=45 * MIN, warn_before=5 * MIN)


# --------------------------------------------------------------------------
# Durations and the [idle] table


@pytest.mark.parametrize(
    ("text", "seconds"),
    [("45m", 2700), ("2h", 7200), ("90s", 90), ("1h30m", 5400), (" 2H ", 7200), ("0", 0),
     ("1.5h", 5400), (600, 600)],
)
def test_durations(text: str | int, seconds: float) -> None:
    assert parse_duration(text) == seconds


@pytest.mark.parametrize("text", ["", "45", "m", "45 minutes", "1h-5m", "-5m", "h1", True, -3])
def test_bad_durations(text: object) -> None:
    with pytest.raises(ValueError, match="must"):
        parse_duration(text)


def test_format_duration_round_trips() -> None:
    for seconds in (90, 2700, 7200, 5400):
        assert parse_duration(format_duration(seconds)) == seconds
    assert format_duration(2700) == "45m" and format_duration(5400) == "1h30m"


def _config(idle: dict[str, Any]) -> IdleConfig:
    data = {"remote": {"host": "devbox", "path": "/srv/app"}, "idle": idle}
    return parse_config(data, Path("/p/dev-sync.toml")).idle


def test_idle_table_defaults_and_values() -> None:
    default = _config({})
    assert (default.after, default.warn_before, default.cpu_above) == (2700, 300, None)
    assert default.stop == "shutdown" and default.stop_command == []
    cfg = _config({"after": "2h", "warn_before": "10m", "cpu_above": 20.0, "stop": "command",
                   "stop_command": ["aws", "ec2", "stop-instances", "--instance-ids", "i-1"]})
    assert (cfg.after, cfg.warn_before, cfg.cpu_above) == (7200, 600, 20.0)


@pytest.mark.parametrize(
    ("idle", "message"),
    [
        ({"after": "soon"}, "[idle] after: must be a duration"),
        ({"after": "1m"}, "[idle] after: Input should be greater than or equal to 120"),
        ({"after": "10m", "warn_before": "10m"}, "warn_before (10m) must be shorter than after"),
        ({"stop": "command"}, 'stop = "command" needs stop_command'),
        ({"stop_command": ["true"]}, 'stop_command is used only with stop = "command"'),
        ({"stop": "halt"}, "[idle] stop: Input should be 'shutdown' or 'command'"),
        ({"cpu_above": 120.0}, "[idle] cpu_above"),
        ({"cpu_above": "20"}, "[idle] cpu_above"),
        ({"stop_command": "aws ec2", "stop": "command"}, "[idle] stop_command"),
        ({"after_": "2h"}, "[idle] after_: unknown key"),
    ],
)
def test_idle_table_is_strict(idle: dict[str, Any], message: str) -> None:
    with pytest.raises(ConfigError) as err:
        _config(idle)
    assert message in err.value.cause


# --------------------------------------------------------------------------
# The decision, with an injected clock


def _decide(now: float, state: dict[str, Any] | None = None, settings: Settings = S,
            **sources: Any) -> Decision:
    return decide(now, state or {}, Sources(**sources), settings)


def test_fresh_activity_keeps_the_machine() -> None:
    d = _decide(T0 + 10 * MIN, activity_file=T0)
    assert d.action == "keep" and d.last.what == "dev-sync"
    assert d.left == 35 * MIN and d.stop_at == T0 + 45 * MIN
    assert "stop in 35m" in d.reason


def test_old_activity_stops_after_a_warning() -> None:
    d = _decide(T0 + 50 * MIN, {"warned_for": T0 + 45 * MIN}, activity_file=T0)
    assert d.action == "stop" and d.left == -5 * MIN
    assert "idle for 50m" in d.reason


def test_a_session_with_recent_input_is_activity() -> None:
    session = Session("pts/0", "dev", T0 + 40 * MIN, 123)
    d = _decide(T0 + 50 * MIN, activity_file=T0, sessions=(session,))
    assert d.action == "keep" and d.last == Activity("ssh", T0 + 40 * MIN, "dev on pts/0")
    assert d.left == 35 * MIN


def test_an_idle_terminal_is_not_activity() -> None:
    # Logged in, but no keystroke for longer than the limit: the session alone keeps nothing up.
    session = Session("pts/0", "dev", T0, 123)
    d = _decide(T0 + 46 * MIN, {"warned_for": T0 + 45 * MIN}, sessions=(session,))
    assert d.action == "stop" and d.last.what == "ssh"


def test_the_latest_activity_wins_and_boot_counts() -> None:
    d = _decide(T0 + 30 * MIN, activity_file=T0, boot=T0 + 20 * MIN)
    assert d.last.what == "boot" and d.left == 35 * MIN


def test_keep_awake_deadline_postpones_the_stop() -> None:
    state = {"keep_awake_until": T0 + 3 * 60 * MIN}
    d = _decide(T0 + 2 * 60 * MIN, state, activity_file=T0)
    assert d.action == "keep" and d.stop_at == T0 + 3 * 60 * MIN and d.left == 60 * MIN
    assert d.keep_awake_until == T0 + 3 * 60 * MIN and "kept awake until" in d.reason
    # Inside the deadline's last minutes the users are warned like any countdown.
    late = _decide(T0 + 3 * 60 * MIN - 2 * MIN, state, activity_file=T0)
    assert late.action == "warn" and late.left == 2 * MIN
    # Past it, the ordinary rule again (and the deadline is dropped from the state).
    after = _decide(T0 + 3 * 60 * MIN + MIN, {**state, "warned_for": T0 + 45 * MIN},
                    activity_file=T0)
    assert after.action == "stop" and after.keep_awake_until is None
    assert "keep_awake_until" not in updated_state(state, after, T0 + 3 * 60 * MIN + MIN)


def test_a_deadline_earlier_than_the_idle_stop_changes_nothing() -> None:
    d = _decide(T0, {"keep_awake_until": T0 + MIN}, activity_file=T0)
    assert d.stop_at == T0 + 45 * MIN and "last activity" in d.reason


def test_cpu_above_the_threshold_is_activity() -> None:
    busy = Settings(after=45 * MIN, warn_before=5 * MIN, cpu_above=20.0)
    now = T0 + 60 * MIN
    d = _decide(now, settings=busy, activity_file=T0, cpu_percent=55.0)
    assert d.action == "keep" and d.last.what == "cpu" and d.last.at == now
    assert "55% > 20%" in d.last.detail
    # Remembered by the state, it keeps counting at the next checks.
    later = decide(now + 10 * MIN, updated_state({}, d, now), Sources(activity_file=T0,
                   cpu_percent=3.0), busy)
    assert later.last.what == "cpu" and later.left == 35 * MIN
    # Below the threshold, or with no threshold set, CPU is not activity.
    assert _decide(now, settings=busy, activity_file=T0, cpu_percent=19.0).last.what == "dev-sync"
    assert _decide(now, activity_file=T0, cpu_percent=99.0).last.what == "dev-sync"


def test_cpu_percent_from_two_samples() -> None:
    assert cpu_percent([1000, 800], (2000, 1300)) == 50.0
    assert cpu_percent(None, (2000, 1300)) is None
    assert cpu_percent([2000, 1300], (2000, 1300)) is None


def test_warn_once_then_stop() -> None:
    state: dict[str, Any] = {}
    seen = []
    for minute in (30, 40, 41, 42, 44, 45):
        now = T0 + minute * MIN
        d = decide(now, state, Sources(activity_file=T0), S)
        state = updated_state(state, d, now)
        seen.append(d.action)
    assert seen == ["keep", "warn", "keep", "keep", "keep", "stop"]
    assert state["stop_requested_at"] == T0 + 45 * MIN


def test_new_activity_starts_a_new_countdown_with_its_own_warning() -> None:
    state: dict[str, Any] = {}
    actions = []
    for minute, touched in ((41, T0), (43, T0 + 42 * MIN), (84, T0 + 42 * MIN),
                            (85, T0 + 42 * MIN), (87, T0 + 42 * MIN)):
        now = T0 + minute * MIN
        d = decide(now, state, Sources(activity_file=touched), S)
        state = updated_state(state, d, now)
        actions.append(d.action)
    assert actions == ["warn", "keep", "warn", "keep", "stop"]


def test_a_missed_warning_window_warns_before_stopping() -> None:
    # The checks did not run for a while (the timer was late): warn first, stop at the next.
    now = T0 + 60 * MIN
    d = _decide(now, activity_file=T0)
    assert d.action == "warn" and d.left < 0
    again = decide(now + MIN, updated_state({}, d, now), Sources(activity_file=T0), S)
    assert again.action == "stop"
    # With no warning time configured, the stop is immediate.
    silent = Settings(after=45 * MIN, warn_before=0)
    assert _decide(now, settings=silent, activity_file=T0).action == "stop"


def test_a_clock_stepped_back_does_not_keep_the_machine_forever() -> None:
    d = _decide(T0, {"last_activity": {"what": "cpu", "at": T0 + 10 * 24 * 60 * MIN}})
    assert d.last.at == T0 and d.left == 45 * MIN


def test_nothing_seen_yet_counts_from_now() -> None:
    d = _decide(T0)
    assert d.action == "keep" and d.last.what == "none" and d.left == 45 * MIN


# --------------------------------------------------------------------------
# Where and how it is installed


def _probe(**values: Any) -> Probe:
    base: dict[str, Any] = {
        "uid": 0, "user": "root", "lib": "/usr/local/lib/dev-sync/idle",
        "state": "/var/lib/dev-sync/idle", "activity": "/root/.local/state/dev-sync/activity",
        "sysunits": "/etc/systemd/system", "userunits": "/root/.config/systemd/user",
        "python": "/usr/bin/python3", "python_version": (3, 11),
    }
    base.update(values)
    return Probe(**base)


def test_probe_output_is_parsed() -> None:
    probe = parse_probe("uid=1000\nuser=dev\nlib=/home/dev/.local/share/dev-sync/idle\n"
                        "python=/usr/bin/python3\npython_version=3.8\nsystemd=running\n"
                        "user_manager=1\nlinger=yes\ncrontab=/usr/bin/crontab\ncron_daemon=\n"
                        "installed_mechanism=cron\n")
    assert probe.uid == 1000 and not probe.root and probe.python_version == (3, 8)
    assert probe.user_manager and probe.linger and probe.crontab and not probe.cron_daemon
    assert probe.installed_mechanism == "cron"


@pytest.mark.parametrize(
    ("values", "mechanism"),
    [
        ({"systemd": "running", "crontab": "/usr/bin/crontab"}, "systemd"),
        ({"systemd": "degraded"}, "systemd"),
        ({"systemd": "offline", "crontab": "/usr/bin/crontab"}, "cron"),
        ({"systemd": "absent", "crontab": "/usr/bin/crontab"}, "cron"),
        ({"uid": 1000, "systemd": "running", "user_manager": True, "linger": True},
         "systemd-user"),
        # A user manager without lingering ends at logout: cron is the safer choice.
        ({"uid": 1000, "systemd": "running", "user_manager": True,
          "crontab": "/usr/bin/crontab"}, "cron"),
    ],
)
def test_mechanism_choice(values: dict[str, Any], mechanism: str) -> None:
    assert choose_mechanism(_probe(**values)) == mechanism


def test_no_mechanism_says_how_to_fix_it() -> None:
    with pytest.raises(DevSyncError, match="neither systemd nor cron runs on vm") as neither:
        choose_mechanism(_probe(systemd="offline"), "vm")
    assert neither.value.fix is not None and "apt-get install cron" in neither.value.fix
    with pytest.raises(DevSyncError, match="no lingering") as linger:
        choose_mechanism(_probe(uid=1000, user="dev", systemd="running", user_manager=True))
    assert linger.value.fix is not None and "loginctl enable-linger dev" in linger.value.fix


def test_cron_line_quotes_paths_and_escapes_percent() -> None:
    probe = _probe(lib="/opt/my idle/100%", state="/var/lib/x y")
    line = cron_line(probe)
    assert line.startswith("* * * * * ") and line.endswith(CRON_MARK)
    command = line.removeprefix("* * * * * ").removesuffix(CRON_MARK)
    assert "\\%" in command and "100%/" not in command.replace("\\%", "")
    words = shlex.split(command.replace("\\%", "%"))
    assert words[:5] == ["/usr/bin/python3", "/opt/my idle/100%/watcher.py", "--settings",
                         "/opt/my idle/100%/settings.json", "check"]
    assert words[-1] == "2>>/var/lib/x y/idle.log"


def test_systemd_units_render() -> None:
    units = systemd_units(_probe(lib="/opt/idle 1%"))
    service, timer = units["dev-sync-idle.service"], units["dev-sync-idle.timer"]
    assert "Type=oneshot" in service
    assert ('ExecStart="/usr/bin/python3" "/opt/idle 1%%/watcher.py" "--settings" '
            '"/opt/idle 1%%/settings.json" "check"') in service
    assert "OnUnitActiveSec=1min" in timer and "OnBootSec=1min" in timer
    assert "WantedBy=timers.target" in timer


def test_install_files_per_mechanism() -> None:
    cfg = IdleConfig(after=3600, stop="command", stop_command=["touch", "/tmp/x"])
    probe = _probe()
    cron = {label: path for label, path, _ in install_files(cfg, probe, "cron")}
    assert cron == {"watcher": "/usr/local/lib/dev-sync/idle/watcher.py",
                    "settings": "/usr/local/lib/dev-sync/idle/settings.json",
                    "manifest": "/usr/local/lib/dev-sync/idle/installed"}
    system = {label: path for label, path, _ in install_files(cfg, probe, "systemd")}
    assert system["dev-sync-idle.timer"] == "/etc/systemd/system/dev-sync-idle.timer"
    user = {label: path for label, path, _ in install_files(cfg, probe, "systemd-user")}
    assert user["dev-sync-idle.service"] == "/root/.config/systemd/user/dev-sync-idle.service"
    text = settings_text(cfg, probe, "cron")
    settings = Settings.from_dict(json.loads(text))
    assert settings.after == 3600 and settings.stop_command == ("touch", "/tmp/x")
    assert settings.state_file == "/var/lib/dev-sync/idle/state.json"
    assert settings.activity_file == "/root/.local/state/dev-sync/activity"
