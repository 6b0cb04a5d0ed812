"""The idle watcher that runs on the dev VM, every minute, and stops it when nobody uses it.

This one file is copied to the remote by ``dev-sync idle install`` and run
there by a systemd timer or a cron entry, so it uses the standard library
only and runs on Python 3.8 or newer (a VM's system Python, not ours).

Why the parts are split the way they are: :func:`decide` is a pure function
of the clock, the saved state, what was observed and the settings, so every
rule (fresh activity, a session, an idle terminal, a keep-awake deadline,
busy CPU, warn once then stop) is checked without a VM; :func:`main` only
gathers the real observations, acts on the decision and saves the state.

What counts as activity, and why:

* the activity file (a dev-sync push, its heartbeat, the start of a
  session): proof that someone is syncing work to this machine;
* an SSH login with a terminal, by the time of its last keystroke (the
  terminal's access time, as ``w`` and ``who -u`` read it): a terminal left
  open and untouched for longer than the idle limit is not activity;
* optionally, CPU busier than a threshold (a long build or test run).

Port forwards (``ssh -N -L``) and clients that reconnect without a terminal
are deliberately not activity: a forgotten tunnel or an editor's automatic
reconnect would otherwise keep a VM up forever.
"""

from __future__ import annotations

import argparse
import contextlib
import errno
import fcntl
import json
import os
import pwd
import shutil
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

# Processes that serve an SSH connection: the shell of a login with a
# terminal is a session leader whose parent is one of these.
SSH_SERVERS = ("sshd", "sshd-session", "dropbear")
# Character device majors of Unix98 pseudo-terminals (/dev/pts/N).
_PTS_MAJORS = range(136, 144)
# The log is cut back to its second half past this size.
_LOG_LIMIT = 128 * 1024


# --------------------------------------------------------------------------
# The decision


@dataclass(frozen=True)
class Settings:
    """What ``dev-sync idle install`` wrote into ``settings.json``."""

    after: float = 2700.0
    warn_before: float = 300.0
    cpu_above: float | None = None
    stop: str = "shutdown"
    stop_command: tuple[str, ...] = ()
    activity_file: str = ""
    state_file: str = ""
    log_file: str = ""
    mechanism: str = ""

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> Settings:
        cpu = data.get("cpu_above")
        return cls(
            after=float(data.get("after", 2700)),
            warn_before=float(data.get("warn_before", 300)),
            cpu_above=None if cpu is None else float(cpu),
            stop=str(data.get("stop", "shutdown")),
            stop_command=tuple(str(a) for a in data.get("stop_command", ())),
            activity_file=str(data.get("activity_file", "")),
            state_file=str(data.get("state_file", "")),
            log_file=str(data.get("log_file", "")),
            mechanism=str(data.get("mechanism", "")),
        )


@dataclass(frozen=True)
class Activity:
    """One sign of use: what it was, and when it last happened (epoch seconds)."""

    what: str  # dev-sync | ssh | cpu | boot | none
    at: float
    detail: str = ""

    def to_dict(self) -> dict[str, Any]:
        return {"what": self.what, "at": self.at, "detail": self.detail}

    @classmethod
    def from_dict(cls, data: Any) -> Activity | None:
        if not isinstance(data, dict) or not isinstance(data.get("at"), (int, float)):
            return None
        return cls(str(data.get("what", "")), float(data["at"]), str(data.get("detail", "")))

    def describe(self) -> str:
        label = {
            "dev-sync": "dev-sync push or heartbeat",
            "ssh": "ssh session",
            "cpu": "CPU busy",
            "boot": "machine start",
            "none": "watcher start (nothing seen yet)",
        }.get(self.what, self.what)
        return f"{label} ({self.detail})" if self.detail else label


@dataclass(frozen=True)
class Session:
    """An SSH login with a terminal; ``last_input`` is its last keystroke."""

    tty: str
    user: str
    last_input: float
    pid: int

    def to_dict(self, now: float) -> dict[str, Any]:
        return {
            "tty": self.tty,
            "user": self.user,
            "pid": self.pid,
            "last_input": self.last_input,
            "idle": max(0.0, now - self.last_input),
        }


@dataclass(frozen=True)
class Sources:
    """What the watcher observed at one check."""

    activity_file: float | None = None  # mtime of the activity file
    sessions: tuple[Session, ...] = ()
    cpu_percent: float | None = None  # busy share since the previous check
    boot: float | None = None


@dataclass(frozen=True)
class Decision:
    """What to do now: ``keep``, ``warn`` or ``stop``, why, and when the stop is due."""

    action: str
    reason: str
    left: float
    stop_at: float
    last: Activity
    keep_awake_until: float | None = None

    def to_dict(self) -> dict[str, Any]:
        return {
            "action": self.action,
            "reason": self.reason,
            "left": self.left,
            "stop_at": self.stop_at,
            "last_activity": self.last.to_dict(),
            "keep_awake_until": self.keep_awake_until,
        }


def span(seconds: float) -> str:
    """``1h05m``, ``12m``, ``40s``: how long, for people."""
    s = int(max(0.0, seconds) + 0.5)
    if s < 60:
        return f"{s}s"
    if s < 3600:
        return f"{s // 60}m" + (f"{s % 60:02d}s" if s < 600 and s % 60 else "")
    return f"{s // 3600}h{s % 3600 // 60:02d}m"


def activities(now: float, state: dict[str, Any], sources: Sources,
               settings: Settings) -> list[Activity]:
    """Every sign of use known at ``now``, none of them later than ``now``."""
    found: list[Activity] = []
    if sources.activity_file is not None:
        found.append(Activity("dev-sync", sources.activity_file))
    for s in sources.sessions:
        found.append(Activity("ssh", s.last_input, f"{s.user} on {s.tty}"))
    if (settings.cpu_above is not None and sources.cpu_percent is not None
            and sources.cpu_percent > settings.cpu_above):
        found.append(Activity("cpu", now, f"{sources.cpu_percent:.0f}% > "
                                          f"{settings.cpu_above:g}%"))
    if sources.boot is not None:
        found.append(Activity("boot", sources.boot))
    remembered = Activity.from_dict(state.get("last_activity"))
    if remembered is not None:
        found.append(remembered)
    # A clock that stepped back must not keep the machine up until it catches up.
    return [a if a.at <= now else Activity(a.what, now, a.detail) for a in found]


def decide(now: float, state: dict[str, Any], sources: Sources, settings: Settings) -> Decision:
    """Keep the machine, warn its users, or stop it.

    The stop is due ``after`` seconds past the latest activity, and never
    before a keep-awake deadline. Inside the last ``warn_before`` seconds
    the users are warned, once per countdown (see :func:`_warned`: new
    activity starts a new one). A stop always follows a
    warning: if the warning window was missed (the checks did not run), the
    warning goes out now and the stop waits for the next check.
    """
    found = activities(now, state, sources, settings)
    last = max(found, key=lambda a: a.at) if found else Activity("none", now)
    stop_at = last.at + settings.after
    keep = state.get("keep_awake_until")
    keep_until = float(keep) if isinstance(keep, (int, float)) and keep > now else None
    if keep_until is not None and keep_until > stop_at:
        stop_at = keep_until
    left = stop_at - now
    warned = _warned(state, stop_at)
    why = f"last activity: {last.describe()}, {span(now - last.at)} ago"
    if keep_until is not None and keep_until >= last.at + settings.after:
        why = f"kept awake until {_clock(keep_until)}"

    def made(action: str, reason: str) -> Decision:
        return Decision(action, reason, left, stop_at, last, keep_until)

    if left > settings.warn_before:
        return made("keep", f"{why}; stop in {span(left)}")
    if not warned and settings.warn_before > 0:
        return made("warn", f"{why}; stopping in {span(left)} unless it is used")
    if left > 0:
        return made("keep", f"{why}; users warned, stopping in {span(left)}")
    return made("stop", f"{why}; idle for {span(now - last.at)}")


def _warned(state: dict[str, Any], stop_at: float) -> bool:
    """Whether the users were warned of a stop due at ``stop_at`` (this countdown).

    New activity and keep-awake only ever move the stop later, which starts a
    new countdown with its own warning; a stop that moved earlier (a deadline
    that passed) was announced by the warning already given.
    """
    warned_for = state.get("warned_for")
    return isinstance(warned_for, (int, float)) and stop_at <= warned_for + 1.0


def updated_state(state: dict[str, Any], decision: Decision, now: float) -> dict[str, Any]:
    """The state to save after acting on ``decision`` at ``now``."""
    new = dict(state)
    new["last_check"] = now
    new["last_activity"] = decision.last.to_dict()
    new["last_decision"] = {"action": decision.action, "reason": decision.reason,
                            "left": decision.left, "at": now}
    if decision.action == "warn":
        new["warned_for"] = decision.stop_at
    if decision.action == "stop":
        new["stop_requested_at"] = now
    keep = new.get("keep_awake_until")
    if isinstance(keep, (int, float)) and keep <= now:
        del new["keep_awake_until"]
    return new


def _clock(ts: float) -> str:
    return time.strftime("%H:%M UTC", time.gmtime(ts))


# --------------------------------------------------------------------------
# Observations


def _proc_stat(pid: str, proc: str) -> tuple[str, int, int, int] | None:
    """(comm, ppid, session id, controlling tty) of one process, or None if it is gone."""
    try:
        with open(f"{proc}/{pid}/stat", "rb") as fh:
            raw = fh.read().decode("utf-8", "replace")
    except OSError:
        return None
    head, _, rest = raw.rpartition(")")
    comm = head.partition("(")[2]
    fields = rest.split()
    if len(fields) < 5:
        return None
    return comm, int(fields[1]), int(fields[3]), int(fields[4])


def _pts_name(tty_nr: int) -> str | None:
    major = (tty_nr >> 8) & 0xFFF
    minor = (tty_nr & 0xFF) | ((tty_nr >> 12) & 0xFFF00)
    if major not in _PTS_MAJORS:
        return None
    return f"pts/{(major - _PTS_MAJORS[0]) * 256 + minor}"


def _user(uid: int) -> str:
    try:
        return pwd.getpwuid(uid).pw_name
    except KeyError:
        return str(uid)


def ssh_sessions(proc: str = "/proc", dev: str = "/dev", under: int | None = None
                 ) -> list[Session]:
    """SSH logins with a terminal, found from the process table.

    The shell sshd starts for a login with a terminal is the leader of its
    own session, a child of sshd, with the pseudo-terminal as controlling
    terminal; ``ssh -N`` (forwards only) and commands run without a terminal
    have no such process. This works without utmp (containers, minimal
    images often have none), for every user. ``under``: only sessions
    served by that process (one SSH server of several).
    """
    table: dict[int, tuple[str, int, int, int]] = {}
    try:
        names = os.listdir(proc)
    except OSError:
        return []
    for name in names:
        if name.isdigit():
            info = _proc_stat(name, proc)
            if info is not None:
                table[int(name)] = info
    servers = {pid for pid, info in table.items() if info[0] in SSH_SERVERS}
    found: dict[str, Session] = {}
    for pid, (_, ppid, sid, tty_nr) in table.items():
        if pid != sid or ppid not in servers:
            continue
        if under is not None and not _descends(ppid, under, table):
            continue
        tty = _pts_name(tty_nr)
        if tty is None or tty in found:
            continue
        try:
            st = os.stat(os.path.join(dev, tty))
        except OSError:
            continue
        found[tty] = Session(tty, _user(st.st_uid), st.st_atime, pid)
    return sorted(found.values(), key=lambda s: s.tty)


def _descends(pid: int, ancestor: int, table: dict[int, tuple[str, int, int, int]]) -> bool:
    seen = set()
    while pid > 0 and pid not in seen:
        if pid == ancestor:
            return True
        seen.add(pid)
        pid = table[pid][1] if pid in table else 0
    return False


def cpu_sample(path: str = "/proc/stat") -> tuple[int, int] | None:
    """(total, idle) jiffies of all CPUs since boot."""
    try:
        with open(path) as fh:
            first = fh.readline().split()
    except OSError:
        return None
    if not first or first[0] != "cpu":
        return None
    values = [int(v) for v in first[1:9]]  # guest time is already in user/nice
    idle = values[3] + (values[4] if len(values) > 4 else 0)
    return sum(values), idle


def cpu_percent(previous: Any, sample: tuple[int, int] | None) -> float | None:
    """How busy the CPUs were between two samples, in percent."""
    if sample is None or not isinstance(previous, list) or len(previous) != 2:
        return None
    total = sample[0] - int(previous[0])
    idle = sample[1] - int(previous[1])
    if total <= 0:
        return None
    return max(0.0, min(100.0, 100.0 * (total - idle) / total))


def boot_time(path: str = "/proc/stat") -> float | None:
    try:
        with open(path) as fh:
            for line in fh:
                if line.startswith("btime "):
                    return float(line.split()[1])
    except (OSError, ValueError):
        return None
    return None


def _mtime(path: str) -> float | None:
    try:
        return os.stat(path).st_mtime
    except OSError:
        return None


# --------------------------------------------------------------------------
# Acting


def notify(sessions: list[Session], text: str, dev: str = "/dev") -> list[str]:
    """Write ``text`` on every session's terminal; the terminals reached.

    Written directly rather than through ``wall``: wall reads utmp, which
    many VM images and containers do not keep. Writing changes the
    terminal's modification time, not its access time, so a warning is not
    mistaken for a keystroke.
    """
    data = ("\r\n\a*** dev-sync: " + text + " ***\r\n").encode("utf-8", "replace")
    reached = []
    for s in sessions:
        try:
            fd = os.open(os.path.join(dev, s.tty), os.O_WRONLY | os.O_NOCTTY | os.O_NONBLOCK)
        except OSError:
            continue
        try:
            os.write(fd, data)
            reached.append(s.tty)
        except OSError:
            pass
        finally:
            os.close(fd)
    return reached


_SBIN = "/usr/local/sbin:/usr/sbin:/sbin"


def stop_argv(settings: Settings) -> list[str]:
    """The command that stops the machine.

    ``shutdown`` lives in sbin, which cron's PATH lacks; a user other than
    root needs ``sudo -n`` (never a prompt: nobody is there to answer).
    """
    if settings.stop == "command":
        return list(settings.stop_command)
    path = os.environ.get("PATH", "/usr/bin:/bin") + ":" + _SBIN
    shutdown = shutil.which("shutdown", path=path) or "shutdown"
    argv = [shutdown, "-h", "now"]
    if os.geteuid() != 0:
        argv = [shutil.which("sudo", path=path) or "sudo", "-n", *argv]
    return argv


def run_stop(argv: list[str]) -> tuple[int, str]:
    env = dict(os.environ)
    env["PATH"] = env.get("PATH", "/usr/bin:/bin") + ":" + _SBIN
    try:
        proc = subprocess.run(argv, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                              stderr=subprocess.STDOUT, timeout=300, env=env, check=False)
    except (OSError, subprocess.SubprocessError) as exc:
        return 127, str(exc)
    return proc.returncode, proc.stdout.decode("utf-8", "replace").strip()[-500:]


# --------------------------------------------------------------------------
# Files


def load_settings(path: str) -> Settings:
    with open(path) as fh:
        data = json.load(fh)
    settings = Settings.from_dict(data)
    base = os.path.dirname(os.path.abspath(path))
    defaults = {"state_file": "state.json", "log_file": "idle.log"}
    fill = {k: os.path.join(base, v) for k, v in defaults.items() if not getattr(settings, k)}
    if not settings.activity_file:
        fill["activity_file"] = os.path.expanduser("~/.local/state/dev-sync/activity")
    if fill:
        data = dict(data)
        data.update(fill)
        settings = Settings.from_dict(data)
    return settings


def load_state(path: str) -> dict[str, Any]:
    try:
        with open(path) as fh:
            data = json.load(fh)
    except (OSError, ValueError):
        return {}
    return data if isinstance(data, dict) else {}


def save_state(path: str, state: dict[str, Any]) -> None:
    os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
    tmp = f"{path}.tmp.{os.getpid()}"
    with open(tmp, "w") as fh:
        json.dump(state, fh, indent=1, sort_keys=True)
    os.replace(tmp, path)


@contextlib.contextmanager
def locked(state_file: str) -> Iterator[None]:
    """One writer of the state at a time: a check, and a keep-awake arriving meanwhile."""
    os.makedirs(os.path.dirname(state_file) or ".", exist_ok=True)
    with open(state_file + ".lock", "a") as fh:
        fcntl.flock(fh, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(fh, fcntl.LOCK_UN)


def log(settings: Settings, now: float, line: str) -> None:
    path = settings.log_file
    if not path:
        return
    try:
        if os.path.getsize(path) > _LOG_LIMIT:
            with open(path, "rb") as fh:
                fh.seek(-_LOG_LIMIT // 2, os.SEEK_END)
                keep = fh.read().partition(b"\n")[2]
            with open(path, "wb") as fh:
                fh.write(keep)
    except OSError:
        pass
    stamp = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(now))
    with contextlib.suppress(OSError), open(path, "a") as fh:
        fh.write(f"{stamp} {line}\n")


def _tail(path: str, lines: int = 5) -> list[str]:
    try:
        with open(path, "rb") as fh:
            fh.seek(0, os.SEEK_END)
            fh.seek(max(0, fh.tell() - 4096))
            text = fh.read().decode("utf-8", "replace")
    except OSError:
        return []
    return [ln for ln in text.splitlines() if ln.strip()][-lines:]


# --------------------------------------------------------------------------
# Commands


def check(settings: Settings, now: float, under: int | None = None) -> Decision:
    """One timer tick: observe, decide, act, remember."""
    with locked(settings.state_file):
        state = load_state(settings.state_file)
        sample = cpu_sample()
        sessions = ssh_sessions(under=under)
        sources = Sources(
            activity_file=_mtime(settings.activity_file),
            sessions=tuple(sessions),
            cpu_percent=cpu_percent(state.get("cpu"), sample),
            boot=boot_time(),
        )
        decision = decide(now, state, sources, settings)
        state = updated_state(state, decision, now)
        if sample is not None:
            state["cpu"] = list(sample)
        if sources.cpu_percent is not None:
            state["cpu_percent"] = round(sources.cpu_percent, 1)
        if decision.action == "warn":
            text = (f"this machine stops for inactivity in about {span(decision.left)} "
                    f"({decision.last.describe()} was the last activity). "
                    "Type here, or run `dev-sync idle keep-awake --for 1h`, to keep it up")
            reached = notify(sessions, text)
            log(settings, now, f"warn: {decision.reason}; told {', '.join(reached) or 'nobody'}")
        elif decision.action == "stop":
            notify(sessions, "this machine is stopping now for inactivity")
            argv = stop_argv(settings)
            log(settings, now, f"stop: {decision.reason}; running {argv}")
            save_state(settings.state_file, state)  # the stop may end this process
            code, out = run_stop(argv)
            state["stop_result"] = {"code": code, "output": out, "at": now}
            log(settings, now, f"stop command exited {code}" + (f": {out}" if out else ""))
        save_state(settings.state_file, state)
    return decision


def status(settings: Settings, now: float, under: int | None = None) -> dict[str, Any]:
    """What the next check would decide (without acting), and what the state says."""
    state = load_state(settings.state_file)
    sessions = ssh_sessions(under=under)
    sources = Sources(_mtime(settings.activity_file), tuple(sessions), None, boot_time())
    decision = decide(now, state, sources, settings)
    return {
        "now": now,
        "mechanism": settings.mechanism,
        "settings": {
            "after": settings.after,
            "warn_before": settings.warn_before,
            "cpu_above": settings.cpu_above,
            "stop": settings.stop,
            "stop_command": list(settings.stop_command),
            "activity_file": settings.activity_file,
        },
        **decision.to_dict(),
        "activity_file_mtime": sources.activity_file,
        "sessions": [s.to_dict(now) for s in sessions],
        "last_check": state.get("last_check"),
        "cpu_percent": state.get("cpu_percent"),
        "warned": _warned(state, decision.stop_at),
        "stop_requested_at": state.get("stop_requested_at"),
        "stop_result": state.get("stop_result"),
        "log": _tail(settings.log_file),
    }


def keep_awake(settings: Settings, now: float, seconds: float,
               under: int | None = None) -> dict[str, Any]:
    """Set (or with 0, clear) the deadline before which the machine is not stopped."""
    with locked(settings.state_file):
        state = load_state(settings.state_file)
        if seconds > 0:
            state["keep_awake_until"] = now + seconds
        else:
            state.pop("keep_awake_until", None)
        save_state(settings.state_file, state)
    log(settings, now, f"keep-awake: {span(seconds)}" if seconds > 0 else "keep-awake cleared")
    return status(settings, now, under)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="dev-sync-idle",
                                     description="dev-sync idle auto-stop watcher")
    parser.add_argument("--settings", required=True, help="settings.json written at install")
    parser.add_argument("--now", type=float, default=None,
                        help="the time to decide at (epoch seconds; default: the clock)")
    parser.add_argument("--sessions-under", type=int, default=None, metavar="PID",
                        help="count only SSH sessions served by this process (one sshd of several)")
    sub = parser.add_subparsers(dest="command")
    sub.add_parser("check", help="observe, decide and act (what the timer runs)")
    sub.add_parser("status", help="print what the next check would decide, as JSON")
    keep = sub.add_parser("keep-awake", help="do not stop before now + SECONDS (0 clears)")
    keep.add_argument("seconds", type=float)
    args = parser.parse_args(argv)
    now = time.time() if args.now is None else args.now
    try:
        settings = load_settings(args.settings)
    except (OSError, ValueError) as exc:
        print(f"dev-sync-idle: cannot read {args.settings}: {exc}", file=sys.stderr)
        return 2
    command = args.command or "check"
    under = args.sessions_under
    if command == "check":
        decision = check(settings, now, under)
        print(json.dumps(decision.to_dict()))
    elif command == "status":
        print(json.dumps(status(settings, now, under)))
    else:
        print(json.dumps(keep_awake(settings, now, args.seconds, under)))
    return 0


if __name__ == "__main__":
    try:
        sys.exit(main())
    except OSError as exc:
        if exc.errno == errno.EPIPE:
            sys.exit(0)
        raise
