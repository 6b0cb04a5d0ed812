"""The first command lines of a session, buildable before the program has loaded.

``dev-sync up`` starts its remote probe and its first rsync pass early (see
:mod:`dev_sync.prestart`), and the engine adopts them only when it would have
run exactly the same command lines. So both build them here, from one place,
and this module stays free of heavy imports (no pydantic, no asyncio).
"""

from __future__ import annotations

import posixpath
import re
import shlex
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from dev_sync.target import Target

MARKER = ".dev-sync-root"
MARKER_TEXT = "This folder is kept in sync by dev-sync. Do not edit files here by hand."
MIN_RSYNC = (3, 2, 3)

# Remote roots that are never a project folder: syncing with deletions into
# one of them would wipe a system or a home directory.
FORBIDDEN_ROOTS = frozenset(
    {
        "/", "/bin", "/boot", "/dev", "/etc", "/home", "/lib", "/lib32", "/lib64", "/media",
        "/mnt", "/opt", "/proc", "/root", "/run", "/sbin", "/srv", "/sys", "/tmp", "/usr",
        "/usr/local", "/var", "/var/lib", "/var/tmp", "/Users", "/Applications", "/System",
        "/Library", "/private", "/private/tmp", "/Volumes",
    }
)


def check_remote_root(path: str) -> str:
    """Return the normalised remote root, or raise ValueError saying why it is refused."""
    if not path.startswith("/"):
        raise ValueError(f"must be an absolute path (starting with /), got {path!r}")
    if "\0" in path or "\n" in path:
        raise ValueError("must not contain NUL or newline characters")
    parts = path.split("/")
    if ".." in parts:
        raise ValueError(f"must not contain '..' components, got {path!r}")
    norm = posixpath.normpath(path)
    if norm.startswith("//"):
        norm = "/" + norm.lstrip("/")
    if norm in FORBIDDEN_ROOTS:
        raise ValueError(f"{norm!r} is a system directory; use a project folder such as /srv/app")
    head, _, _ = norm.rpartition("/")
    if head in ("/home", "/Users"):
        raise ValueError(f"{norm!r} is a home directory; use a folder inside it, e.g. {norm}/app")
    return norm


def check_host(value: str) -> str:
    """An ssh destination ssh cannot read as an option, or raise ValueError saying why."""
    if not value or value.startswith("-") or any(c.isspace() for c in value):
        raise ValueError(
            f"must be an ssh destination such as devbox or dev@10.0.0.5, got {value!r}"
        )
    return value


def check_program(value: str) -> str:
    """A remote program name or path (``rsync_path``, ``python``), or raise ValueError."""
    if value.startswith("-") or any(c.isspace() for c in value):
        raise ValueError(f"must be a program name or path without spaces, got {value!r}")
    return value


# -- ssh over the master --------------------------------------------------------
# SshMaster builds the same lines (client_options, command, rsync_rsh); the
# engine compares whole argvs before adopting anything started early, so a
# difference only costs the head start, never a wrong command.


def client_options(target: Target) -> list[str]:
    return [*target.options(), "-S", str(target.control_path()), "-o", "ControlMaster=no"]


def ssh_command(target: Target, remote_argv: Sequence[str]) -> list[str]:
    """The ssh argv running ``remote_argv`` on the master (see ``SshMaster.command``)."""
    return ["ssh", *client_options(target), "-T", "--", target.host, shlex.join(remote_argv)]


def rsync_rsh(target: Target) -> str:
    return shlex.join(["ssh", *client_options(target)])


# -- the remote probe -------------------------------------------------------------

# Touch the idle watcher's activity file, creating its folder; $DEV_SYNC_IDLE_HOME
# relocates it (see dev_sync.idle).
ACTIVITY_TOUCH_SH = (
    'a=${DEV_SYNC_IDLE_HOME:+$DEV_SYNC_IDLE_HOME/activity}; '
    'a=${a:-$HOME/.local/state/dev-sync/activity}; '
    'mkdir -p -- "${a%/*}" && touch -- "$a"'
)

# $1 = remote root, $2 = "create" | "adopt" | "check", $3 = text for the marker,
# $4 = the rsync program. A session starting is use of the machine: the last
# line marks it for the idle watcher (see dev_sync.idle), never failing the probe.
PREPARE_SH = r"""
root=$1; mode=$2
printf 'rsync=%s\n' "$("$4" --version 2>/dev/null | head -n 1)"
if [ "$root" = "$HOME" ] || [ "$root/" = "$HOME" ]; then echo state=home; exit 0; fi
if [ -e "$root/.dev-sync-root" ]; then state=marked
elif [ -d "$root" ]; then
  if [ -z "$(ls -A -- "$root" 2>/dev/null)" ]; then state=empty; else state=nonempty; fi
elif [ -e "$root" ] || [ -L "$root" ]; then state=notdir
else state=missing; fi
echo "state=$state"
case "$mode:$state" in
  create:missing|create:empty|adopt:missing|adopt:empty|adopt:nonempty)
    mkdir -p -- "$root" && printf '%s\n' "$3" > "$root/.dev-sync-root" && echo created=1 ;;
esac
df -Pk -- "$root" 2>/dev/null | awk 'NR==2 {print "free_kb=" $4}'
""" + f"({ACTIVITY_TOUCH_SH}) 2>/dev/null || :\n"


def probe_argv(root: str, mode: str, rsync: str) -> list[str]:
    """The remote command of the probe; ``mode`` is create, adopt or check."""
    return ["sh", "-c", PREPARE_SH, "dev-sync", root, mode, MARKER_TEXT, rsync]


@dataclass(frozen=True)
class RemoteInfo:
    rsync_version: tuple[int, ...] | None
    rsync_banner: str
    state: str  # marked | empty | nonempty | missing | notdir | home
    created: bool
    free_kb: int | None

    @property
    def fresh(self) -> bool:
        """The probe has just created the root: nothing there can be lost."""
        return self.created and self.state in ("missing", "empty")


def parse_rsync_version(banner: str) -> tuple[int, ...] | None:
    m = re.search(r"version\s+v?(\d+)\.(\d+)\.(\d+)", banner)
    return tuple(int(x) for x in m.groups()) if m else None


def parse_probe(out: str) -> RemoteInfo:
    values: dict[str, str] = {}
    for line in out.splitlines():
        key, sep, value = line.partition("=")
        if sep:
            values[key.strip()] = value.strip()
    banner = values.get("rsync", "")
    free = values.get("free_kb", "")
    return RemoteInfo(
        rsync_version=parse_rsync_version(banner),
        rsync_banner=banner,
        state=values.get("state", "unknown"),
        created=values.get("created") == "1",
        free_kb=int(free) if free.isdigit() else None,
    )


# -- rsync ----------------------------------------------------------------------


def rsync_base(rsh: str, rsync_path: str, filter_rules: Sequence[str]) -> list[str]:
    """What every rsync run of a session starts with (see ``RsyncPusher``)."""
    args = [
        "rsync", "--recursive", "--links", "--perms", "--times",
        "--secluded-args", "--no-human-readable", "--stats",
        # Compare mtimes to the nanosecond: two saves of the same size
        # within one second must not look unchanged.
        "--modify-window=-1",
        "-e", rsh,
        f"--rsync-path={rsync_path}",
    ]
    args += [f"--filter={rule}" for rule in filter_rules]
    return args


def reconcile_argv(
    base: Sequence[str], local_root: Path, destination: str, *, fresh: bool, progress: bool,
    first_pass: bool,
) -> list[str]:
    """A reconcile's rsync: the first pass deletes nothing (``--max-delete=0``)."""
    argv = [*base, "--delete"]
    if not fresh:
        argv.append("--no-inc-recursive")
    if progress:
        argv.append("--info=progress2")
    if first_pass:
        argv.append("--max-delete=0")
    return [*argv, f"{local_root}/", destination]


def destination(target: Target, remote_root: str) -> str:
    return f"{target.host}:{remote_root.rstrip('/') or '/'}/"
