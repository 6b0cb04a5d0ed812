"""Idle auto-stop: a watcher on the VM that stops it when nobody has used it for a while.

A VM left running overnight costs money and does nothing. ``dev-sync idle
install`` copies one standard-library script (:mod:`dev_sync.remote_idle`)
to the remote and has it run every minute by a systemd timer, or by a cron
entry where systemd does not run. The check runs on the VM itself, so it
works while the laptop sleeps or is gone.

What keeps the VM up is described in :mod:`dev_sync.remote_idle`; the part
that comes from here is the **activity file**: dev-sync touches
``~/.local/state/dev-sync/activity`` on the remote when a session starts,
after pushes and every few minutes while it runs (:class:`Heartbeat`).

Remote layout (the remote user's, chosen on the remote):

* root: ``/usr/local/lib/dev-sync/idle/`` (script, settings, what was
  installed), ``/var/lib/dev-sync/idle/`` (state, log), a system timer in
  ``/etc/systemd/system`` or a line in root's crontab;
* another user: ``~/.local/share/dev-sync/idle/`` and
  ``~/.local/state/dev-sync/idle/``, a user timer (only with lingering, as a
  user manager without it ends at logout, exactly when the check matters) or
  a line in the user's crontab;
* ``$DEV_SYNC_IDLE_HOME`` on the remote, when set, holds all of it (units
  included), for a second, separate installation.

Every remote command is a fixed ``sh`` script getting paths and values as
positional arguments (the pattern of :mod:`dev_sync.services`).
"""

from __future__ import annotations

import asyncio
import contextlib
import importlib.resources
import json
import shlex
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any, Literal

from dev_sync import runner
from dev_sync.commands import ACTIVITY_TOUCH_SH
from dev_sync.errors import ConnectionFailed, DevSyncError
from dev_sync.sections import IdleConfig as IdleConfig
from dev_sync.sections import format_duration as format_duration
from dev_sync.sections import parse_duration as parse_duration
from dev_sync.services import _SH_COMMON, Remote, _put_args, _systemd_escape

# --------------------------------------------------------------------------
# The activity file and the heartbeat

ACTIVITY_FILE = "~/.local/state/dev-sync/activity"
"""Where dev-sync marks use of the VM, in the remote user's home."""

HEARTBEAT_INTERVAL = 120.0
"""Seconds between touches while a session runs: well inside any idle limit (at least 2m)."""

HEARTBEAT_MIN_GAP = 15.0
"""Pushes closer together than this share one touch: the watcher looks once a minute."""

def heartbeat_argv() -> list[str]:
    """The remote command that marks the VM as in use (for :meth:`SshMaster.run`)."""
    return ["sh", "-c", ACTIVITY_TOUCH_SH]


async def touch_activity(remote: Remote, *, prefix: Sequence[str] = ()) -> bool:
    """Mark the VM as in use now; False (never an exception) when that failed.

    A heartbeat that cannot reach the remote changes nothing for the sync,
    which handles the lost connection itself.
    """
    try:
        result = await remote.run([*prefix, *heartbeat_argv()], check=False)
    except (DevSyncError, OSError, runner.CommandError):
        return False
    return result.returncode == 0


class Heartbeat:
    """Keeps the activity file fresh while a sync session runs.

    :meth:`pushed` after each push (it returns at once: the touch runs
    beside the sync, never in its way), and :meth:`run` as a task for the
    session's life, which touches every ``interval`` seconds.
    """

    def __init__(
        self,
        remote: Remote,
        *,
        interval: float = HEARTBEAT_INTERVAL,
        min_gap: float = HEARTBEAT_MIN_GAP,
        prefix: Sequence[str] = (),
    ) -> None:
        self.remote = remote
        self.interval = interval
        self.min_gap = min_gap
        self.prefix = list(prefix)
        self.touches = 0
        self._last = float("-inf")
        self._pending: asyncio.Task[bool] | None = None

    async def touch(self) -> bool:
        """Touch now, unless the connection is down (no ssh of its own while offline)."""
        self._last = asyncio.get_running_loop().time()
        if not getattr(self.remote, "alive", True):
            return False
        ok = await touch_activity(self.remote, prefix=self.prefix)
        if ok:
            self.touches += 1
        return ok

    def pushed(self) -> None:
        """A push landed: touch the activity file in the background (coalesced)."""
        if self._pending is not None and not self._pending.done():
            return
        if asyncio.get_running_loop().time() - self._last < self.min_gap:
            return
        self._pending = asyncio.create_task(self.touch())

    async def run(self) -> None:
        """Touch every ``interval`` seconds until cancelled."""
        try:
            while True:
                await asyncio.sleep(self.interval)
                await self.touch()
        finally:
            if self._pending is not None and not self._pending.done():
                self._pending.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await self._pending


# --------------------------------------------------------------------------
# The remote side: layout, probe and mechanism

Mechanism = Literal["systemd", "systemd-user", "cron"]
SYSTEMD_UP = frozenset({"running", "degraded", "starting", "initializing", "maintenance"})
CRON_MARK = "# dev-sync idle auto-stop"
UNIT = "dev-sync-idle"
MIN_PYTHON = (3, 8)

# Sets lib, state, activity, sysunits and userunits (see the module docstring).
_SH_LAYOUT = r"""
if [ -n "${DEV_SYNC_IDLE_HOME:-}" ]; then
  lib=$DEV_SYNC_IDLE_HOME/lib state=$DEV_SYNC_IDLE_HOME/state
  activity=$DEV_SYNC_IDLE_HOME/activity
  sysunits=$DEV_SYNC_IDLE_HOME/systemd/system userunits=$DEV_SYNC_IDLE_HOME/systemd/user
else
  activity=$HOME/.local/state/dev-sync/activity
  sysunits=/etc/systemd/system userunits=${XDG_CONFIG_HOME:-$HOME/.config}/systemd/user
  if [ "$(id -u)" = 0 ]; then
    lib=/usr/local/lib/dev-sync/idle state=/var/lib/dev-sync/idle
  else
    lib=$HOME/.local/share/dev-sync/idle state=$HOME/.local/state/dev-sync/idle
  fi
fi
installed() { sed -n "s/^$1=//p" "$lib/installed" 2>/dev/null; }
cron_daemon() { grep -l -x -E 'cron|crond|cronie' /proc/[0-9]*/comm 2>/dev/null | head -n 1; }
"""

# Crontab editing that keeps every other line as it is: ours carries MARK.
# cron_set LINE replaces our line in place (or appends it); cron_set "" removes
# it, and removes the crontab when nothing else is left in it.
_SH_CRON = f"\nMARK={shlex.quote(CRON_MARK)}\n" + r"""
cron_read() {
  e="${TMPDIR:-/tmp}/dev-sync-crontab.$$"
  if cur=$(crontab -l 2>"$e"); then rm -f -- "$e"; return 0; fi
  if grep -q -i "no crontab" "$e"; then cur=; rm -f -- "$e"; return 0; fi
  cat -- "$e" >&2; rm -f -- "$e"; return 1
}
cron_set() {
  command -v crontab >/dev/null 2>&1 || return 0
  cron_read || exit 1
  if [ -z "$cur" ]; then new=$1
  else
    new=$(printf '%s\n' "$cur" | M="$MARK" L="$1" awk 'index($0, ENVIRON["M"]) {
        if (!done && ENVIRON["L"] != "") print ENVIRON["L"]; done = 1; next }
      { print }
      END { if (!done && ENVIRON["L"] != "") print ENVIRON["L"] }')
  fi
  [ "$new" = "$cur" ] && return 0
  if [ -z "$new" ]; then crontab -r || exit 1
  else printf '%s\n' "$new" | crontab - || exit 1
  fi
  if [ -z "$1" ]; then echo "removed crontab entry"
  elif [ -z "$cur" ] || [ "$new" = "$(printf '%s\n%s' "$cur" "$1")" ]; then
    echo "created crontab entry"
  else echo "changed crontab entry"
  fi
}
units_off() {
  [ -f "$2/dev-sync-idle.timer" ] || [ -f "$2/dev-sync-idle.service" ] || return 0
  systemctl $1 disable --now dev-sync-idle.timer >/dev/null 2>&1
  rm -f -- "$2/dev-sync-idle.timer" "$2/dev-sync-idle.service"
  systemctl $1 daemon-reload >/dev/null 2>&1
  echo "removed systemd timer ($2)"
}
"""

_PROBE = r"""
echo "uid=$(id -u)"
echo "user=$(id -un)"
echo "lib=$lib"
echo "state=$state"
echo "activity=$activity"
echo "sysunits=$sysunits"
echo "userunits=$userunits"
py=$(command -v python3 2>/dev/null)
echo "python=$py"
[ -n "$py" ] && echo "python_version=$("$py" -c \
  'import sys; print("%d.%d" % sys.version_info[:2])' 2>/dev/null)"
if command -v systemctl >/dev/null 2>&1; then
  echo "systemd=$(systemctl is-system-running 2>/dev/null | head -n 1)"
  if [ "$(id -u)" != 0 ]; then
    systemctl --user show-environment >/dev/null 2>&1 && echo "user_manager=1"
    echo "linger=$(loginctl show-user "$(id -un)" -p Linger --value 2>/dev/null)"
  fi
else
  echo "systemd=absent"
fi
echo "crontab=$(command -v crontab 2>/dev/null)"
echo "cron_daemon=$(cron_daemon)"
if [ "$(id -u)" != 0 ]; then
  s=$(PATH=$PATH:/usr/local/sbin:/usr/sbin:/sbin command -v shutdown 2>/dev/null)
  [ -n "$s" ] && sudo -n -l "$s" >/dev/null 2>&1 && echo "sudo_shutdown=1"
fi
echo "installed_mechanism=$(installed mechanism)"
"""


@dataclass(frozen=True)
class Probe:
    """What the remote has for running the watcher, and where its files go."""

    uid: int
    user: str
    lib: str
    state: str
    activity: str
    sysunits: str
    userunits: str
    python: str = ""
    python_version: tuple[int, ...] = ()
    systemd: str = "absent"  # systemctl is-system-running, or "absent"
    user_manager: bool = False
    linger: bool = False
    crontab: str = ""
    cron_daemon: bool = False
    sudo_shutdown: bool = False
    installed_mechanism: str = ""

    @property
    def root(self) -> bool:
        return self.uid == 0


def parse_probe(text: str) -> Probe:
    values: dict[str, str] = {}
    for line in text.splitlines():
        key, sep, value = line.partition("=")
        if sep:
            values[key.strip()] = value.strip()
    version = tuple(int(p) for p in values.get("python_version", "").split(".") if p.isdigit())
    uid = values.get("uid", "")
    return Probe(
        uid=int(uid) if uid.isdigit() else -1,
        user=values.get("user", ""),
        lib=values.get("lib", ""),
        state=values.get("state", ""),
        activity=values.get("activity", ""),
        sysunits=values.get("sysunits", ""),
        userunits=values.get("userunits", ""),
        python=values.get("python", ""),
        python_version=version,
        systemd=values.get("systemd") or "absent",
        user_manager=values.get("user_manager") == "1",
        linger=values.get("linger") == "yes",
        crontab=values.get("crontab", ""),
        cron_daemon=bool(values.get("cron_daemon")),
        sudo_shutdown=values.get("sudo_shutdown") == "1",
        installed_mechanism=values.get("installed_mechanism", ""),
    )


def choose_mechanism(probe: Probe, host: str = "the remote") -> Mechanism:
    """systemd where it runs the machine (a user timer only if it outlives logouts), else cron.

    A systemd that is installed but not running (containers, WSL without
    systemd) reports ``offline`` and does not count.
    """
    systemd = probe.systemd in SYSTEMD_UP
    if systemd and probe.root:
        return "systemd"
    if systemd and probe.user_manager and probe.linger:
        return "systemd-user"
    if probe.crontab:
        return "cron"
    if systemd:
        raise DevSyncError(
            f"systemd runs on {host}, but a timer of {probe.user or 'this user'} would stop "
            "at logout (no lingering), and there is no cron",
            f"run `sudo loginctl enable-linger {probe.user or '$USER'}` on {host} "
            "(or install cron), then `dev-sync idle install` again",
        )
    raise DevSyncError(
        f"neither systemd nor cron runs on {host}: nothing could run the idle check "
        "every minute",
        f"install cron on {host} (`sudo apt-get install cron`, or `sudo dnf install cronie`) "
        "and start it (`sudo service cron start`), then run `dev-sync idle install` again",
    )


# --------------------------------------------------------------------------
# What install writes


@dataclass(frozen=True)
class Paths:
    """The files of one installation, from the probe's layout."""

    lib: str
    state: str

    @property
    def watcher(self) -> str:
        return f"{self.lib}/watcher.py"

    @property
    def settings(self) -> str:
        return f"{self.lib}/settings.json"

    @property
    def manifest(self) -> str:
        return f"{self.lib}/installed"

    @property
    def state_file(self) -> str:
        return f"{self.state}/state.json"

    @property
    def log(self) -> str:
        return f"{self.state}/idle.log"


def watcher_source() -> str:
    """The watcher script, as shipped inside this package."""
    return importlib.resources.files("dev_sync").joinpath("remote_idle.py").read_text("utf-8")


def settings_text(config: IdleConfig, probe: Probe, mechanism: Mechanism) -> str:
    paths = Paths(probe.lib, probe.state)
    data = {
        "after": config.after,
        "warn_before": config.warn_before,
        "cpu_above": config.cpu_above,
        "stop": config.stop,
        "stop_command": list(config.stop_command),
        "activity_file": probe.activity,
        "state_file": paths.state_file,
        "log_file": paths.log,
        "mechanism": mechanism,
    }
    return json.dumps(data, indent=2, sort_keys=True) + "\n"


def watcher_argv(probe: Probe) -> list[str]:
    """What the timer or cron runs."""
    paths = Paths(probe.lib, probe.state)
    return [probe.python, paths.watcher, "--settings", paths.settings, "check"]


def cron_line(probe: Probe) -> str:
    """The crontab line: every minute, errors appended to the watcher's log.

    cron hands the line to ``/bin/sh`` (so every word is quoted) and turns
    an unescaped ``%`` into a newline (so each is escaped).
    """
    paths = Paths(probe.lib, probe.state)
    command = f"{shlex.join(watcher_argv(probe))} >/dev/null 2>>{shlex.quote(paths.log)}"
    return f"* * * * * {command.replace('%', chr(92) + '%')} {CRON_MARK}"


def systemd_units(probe: Probe) -> dict[str, str]:
    """The service (one check) and the timer (every minute, from a minute after boot)."""
    argv = " ".join(_systemd_escape(arg) for arg in watcher_argv(probe))
    service = f"""\
# dev-sync idle auto-stop (written by `dev-sync idle install`; removed by `idle uninstall`)
[Unit]
Description=dev-sync idle check: stop this machine when nobody uses it

[Service]
Type=oneshot
ExecStart={argv}
"""
    timer = """\
# dev-sync idle auto-stop (written by `dev-sync idle install`; removed by `idle uninstall`)
[Unit]
Description=Run the dev-sync idle check every minute

[Timer]
OnBootSec=1min
OnUnitActiveSec=1min
AccuracySec=5s

[Install]
WantedBy=timers.target
"""
    return {f"{UNIT}.service": service, f"{UNIT}.timer": timer}


def manifest_text(probe: Probe, mechanism: Mechanism) -> str:
    return f"mechanism={mechanism}\npython={probe.python}\n"


def install_files(config: IdleConfig, probe: Probe,
                  mechanism: Mechanism) -> list[tuple[str, str, str]]:
    """(label, path, content) of every file install writes."""
    paths = Paths(probe.lib, probe.state)
    files = [
        ("watcher", paths.watcher, watcher_source()),
        ("settings", paths.settings, settings_text(config, probe, mechanism)),
        ("manifest", paths.manifest, manifest_text(probe, mechanism)),
    ]
    if mechanism in ("systemd", "systemd-user"):
        folder = probe.sysunits if mechanism == "systemd" else probe.userunits
        for name, text in systemd_units(probe).items():
            files.append((name, f"{folder}/{name}", text))
    return files


# $1 mechanism, $2 the crontab line, then the put arguments.
_INSTALL = r"""
mech=$1 line=$2; shift 2
old=$(installed mechanism)
""" + r"""
n=$1; shift
while [ "$n" -gt 0 ]; do put "$1" "$2" "$3"; shift 3; n=$((n - 1)); done
mkdir -p -- "$state" || exit 1
if [ -n "$old" ] && [ "$old" != "$mech" ]; then
  case $old in
    cron) cron_set "" ;;
    systemd) units_off "" "$sysunits" ;;
    systemd-user) units_off --user "$userunits" ;;
  esac
fi
case $mech in
  cron) cron_set "$line" ;;
  systemd|systemd-user)
    o=; [ "$mech" = systemd-user ] && o=--user
    systemctl $o daemon-reload || exit 1
    if ! systemctl $o is-enabled --quiet dev-sync-idle.timer 2>/dev/null; then
      systemctl $o enable --quiet dev-sync-idle.timer || exit 1
      echo "enabled systemd timer"
    fi
    systemctl $o is-active --quiet dev-sync-idle.timer 2>/dev/null \
      || systemctl $o start dev-sync-idle.timer || exit 1
    ;;
esac
mkdir -p -- "$(dirname -- "$activity")" && touch -- "$activity"
"""

_UNINSTALL = r"""
cron_set ""
units_off "" "$sysunits"
units_off --user "$userunits"
for f in "$lib/watcher.py" "$lib/settings.json" "$lib/installed" "$state/state.json" \
    "$state/state.json.lock" "$state/idle.log"; do
  if [ -e "$f" ]; then rm -f -- "$f" && echo "removed $f"; fi
done
rm -f -- "$state"/state.json.tmp.* 2>/dev/null
# The folders install made, each only once empty (the activity file stays).
for d in "$lib" "$state" "${lib%/*}" "${state%/*}"; do
  [ -d "$d" ] && rmdir -- "$d" 2>/dev/null
done
exit 0
"""

# Prints key=value lines, then (when installed) the watcher's JSON on the last line.
_STATUS = r"""
mech=$(installed mechanism)
if [ -z "$mech" ]; then echo "installed=0"; exit 0; fi
echo "installed=1"
echo "mechanism=$mech"
case $mech in
  cron)
    crontab -l 2>/dev/null | grep -q -F -e "$MARK" && echo "entry=1"
    [ -n "$(cron_daemon)" ] && echo "scheduler=1" ;;
  systemd|systemd-user)
    o=; [ "$mech" = systemd-user ] && o=--user
    systemctl $o is-active --quiet dev-sync-idle.timer 2>/dev/null && echo "entry=1 scheduler=1" ;;
esac
exec "$(installed python)" "$lib/watcher.py" --settings "$lib/settings.json" "$@"
"""


def _script(body: str, *args: str) -> list[str]:
    return ["/bin/sh", "-c", _SH_COMMON + _SH_LAYOUT + _SH_CRON + body, "dev-sync", *args]


# --------------------------------------------------------------------------
# Commands


@dataclass(frozen=True)
class InstallResult:
    mechanism: Mechanism
    changes: list[str]  # what was created or changed; empty: nothing to do
    warnings: list[str] = field(default_factory=list)
    paths: Paths | None = None
    was_installed: bool = False  # an earlier install was there (this one updated it)


def _last_line(result: runner.Result) -> str:
    lines = [ln.strip() for ln in (result.err + "\n" + result.out).splitlines() if ln.strip()]
    return lines[-1] if lines else f"exit code {result.returncode}"


async def _run(remote: Remote, argv: Sequence[str], what: str) -> runner.Result:
    result = await remote.run(argv, check=False)
    if result.returncode == 255 and not result.out:
        raise ConnectionFailed(f"the connection to the remote was lost: {_last_line(result)}",
                               "run the command again")
    if result.returncode != 0:
        raise DevSyncError(f"could not {what} on the remote: {_last_line(result)}",
                           "see the message above; `dev-sync idle status` shows what is there")
    return result


async def probe(remote: Remote, *, prefix: Sequence[str] = ()) -> Probe:
    result = await _run(remote, [*prefix, *_script(_PROBE)], "inspect the remote")
    return parse_probe(result.out)


async def install(
    remote: Remote, config: IdleConfig, *, host: str = "the remote", prefix: Sequence[str] = ()
) -> InstallResult:
    """Install (or update in place) the watcher; running it again changes nothing."""
    found = await probe(remote, prefix=prefix)
    if not found.python:
        raise DevSyncError(
            f"python3 is not installed on {host}; the idle watcher is a Python script",
            f"install it on {host} (`sudo apt-get install python3`)",
        )
    if found.python_version and found.python_version < MIN_PYTHON:
        have = ".".join(map(str, found.python_version))
        raise DevSyncError(
            f"python3 on {host} is {have}; the idle watcher needs 3.8 or newer",
            "install a newer python3 on the remote",
        )
    if any("\n" in p for p in (found.lib, found.state, found.activity, found.python)):
        raise DevSyncError(f"the home folder of the remote user on {host} has a newline in it")
    mechanism = choose_mechanism(found, host)
    files = install_files(config, found, mechanism)
    line = cron_line(found) if mechanism == "cron" else ""
    argv = _script(_INSTALL, mechanism, line, *_put_args(files))
    result = await _run(remote, [*prefix, *argv], "install the idle watcher")
    changes = [ln.strip() for ln in result.out.splitlines()
               if ln.split()[:1] in (["created"], ["changed"], ["enabled"], ["removed"])]
    warnings = []
    if mechanism == "cron" and not found.cron_daemon:
        warnings.append(
            f"no cron daemon runs on {host}, so the check will not run until one does: "
            "start it (`sudo service cron start`, or `sudo systemctl enable --now cron`)"
        )
    if config.stop == "shutdown" and not found.root and not found.sudo_shutdown:
        warnings.append(
            f"{found.user or 'the remote user'} cannot run `sudo -n shutdown` on {host}, so the "
            "watcher could warn but not stop the machine: allow it in sudoers "
            f"(`{found.user} ALL=(root) NOPASSWD: /usr/sbin/shutdown`), or set "
            '[idle] stop = "command"'
        )
    return InstallResult(mechanism, changes, warnings, Paths(found.lib, found.state),
                         bool(found.installed_mechanism))


async def uninstall(remote: Remote, *, prefix: Sequence[str] = ()) -> list[str]:
    """Remove the timer or crontab line and the watcher's files; what was removed."""
    result = await _run(remote, [*prefix, *_script(_UNINSTALL)], "remove the idle watcher")
    return [ln.strip() for ln in result.out.splitlines() if ln.strip()]


def _parse_status(out: str) -> dict[str, Any]:
    lines = [ln for ln in out.splitlines() if ln.strip()]
    flags: dict[str, str] = {}
    data: dict[str, Any] = {}
    for line in lines:
        if line.startswith("{"):
            data = json.loads(line)
            continue
        for word in line.split():
            key, _, value = word.partition("=")
            flags[key] = value
    if flags.get("installed") != "1":
        return {"installed": False}
    return {
        "installed": True,
        "mechanism": flags.get("mechanism", ""),
        "entry": flags.get("entry") == "1",
        "scheduler_running": flags.get("scheduler") == "1",
        **data,
    }


async def status(remote: Remote, *, prefix: Sequence[str] = ()) -> dict[str, Any]:
    """Installed or not, the mechanism, the last activity and the time left."""
    result = await _run(remote, [*prefix, *_script(_STATUS, "status")], "read the idle state")
    try:
        return _parse_status(result.out)
    except ValueError as exc:
        raise DevSyncError(f"the idle watcher on the remote answered oddly: {exc}",
                           "run `dev-sync idle install` again") from None


async def keep_awake(remote: Remote, seconds: float, *,
                     prefix: Sequence[str] = ()) -> dict[str, Any]:
    """Do not stop before ``seconds`` from now (0 clears the deadline); the new status."""
    argv = _script(_STATUS, "keep-awake", repr(float(seconds)))
    result = await _run(remote, [*prefix, *argv], "set the keep-awake deadline")
    data = _parse_status(result.out)
    if not data["installed"]:
        raise DevSyncError("idle auto-stop is not installed on the remote",
                           "run `dev-sync idle install` first")
    return data
