"""What dev-sync learns about, and prepares on, the remote before syncing.

One ssh command does it all (a round trip costs more than the work): report
the remote rsync version and the state of the remote root, and create the
root with its ``.dev-sync-root`` marker when that is safe. Paths are passed
to a fixed script as positional arguments, never pasted into it.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from dev_sync.errors import DevSyncError, SafetyStop
from dev_sync.idle import ACTIVITY_TOUCH_SH
from dev_sync.runner import CommandError
from dev_sync.ssh import SshMaster, classify_ssh_failure

MARKER = ".dev-sync-root"
MIN_RSYNC = (3, 2, 3)

# $1 = remote root, $2 = "create" | "adopt" | "check", $3 = text for the marker,
# $4 = the rsync program. A session starting is use of the machine: the last
# line marks it for the idle watcher (see dev_sync.idle), never failing the probe.
_PREPARE = r"""
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


@dataclass(frozen=True)
class RemoteInfo:
    rsync_version: tuple[int, ...] | None
    rsync_banner: str
    state: str  # marked | empty | nonempty | missing | notdir | home
    created: bool
    free_kb: int | None


def parse_rsync_version(banner: str) -> tuple[int, ...] | None:
    m = re.search(r"version\s+v?(\d+)\.(\d+)\.(\d+)", banner)
    return tuple(int(x) for x in m.groups()) if m else None


def _parse(out: str) -> RemoteInfo:
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


def check_rsync(info: RemoteInfo, host: str, program: str = "rsync") -> None:
    if info.rsync_version is None:
        where = "" if program == "rsync" else f" (looked for {program!r})"
        raise DevSyncError(
            f"rsync is not installed on {host}{where}",
            "install it on the remote: `sudo apt-get install rsync` (or dnf/yum/apk install "
            "rsync), or set [remote] rsync_path",
        )
    if info.rsync_version < MIN_RSYNC:
        have = ".".join(map(str, info.rsync_version))
        raise DevSyncError(
            f"rsync {have} on {host} is too old (dev-sync needs 3.2.3 or newer for "
            "--delete-missing-args in batches)",
            "upgrade rsync on the remote (Debian 11+/Ubuntu 22.04+ ship a new enough one)",
        )


async def prepare(
    master: SshMaster, root: str, *, adopt: bool, create: bool = True, rsync: str = "rsync"
) -> RemoteInfo:
    """Probe the remote and create the marked root if that is safe; raise if it is not."""
    mode = "adopt" if adopt else ("create" if create else "check")
    marker_text = "This folder is kept in sync by dev-sync. Do not edit files here by hand."
    argv = ["sh", "-c", _PREPARE, "dev-sync", root, mode, marker_text, rsync]
    try:
        result = await master.run(argv)
    except CommandError as exc:
        if exc.returncode == 255:
            raise classify_ssh_failure(master.target, exc.err, exc.returncode) from None
        raise DevSyncError(
            f"could not inspect {root} on {master.target.label}: {exc.last_line()}",
            "check that the remote user may create that folder",
        ) from None
    info = _parse(result.out)
    check_rsync(info, master.target.label, rsync)
    refuse_unsafe_state(info, root, master.target.label)
    if create and not info.created and info.state in ("missing", "empty"):
        raise DevSyncError(
            f"could not create {root} on {master.target.label}",
            "check that the remote user may write there (or pick another [remote] path)",
        )
    return info


def refuse_unsafe_state(info: RemoteInfo, root: str, host: str) -> None:
    if info.state == "home":
        raise SafetyStop(
            f"{root} is the home directory of the remote user; syncing there could delete files",
            f"set [remote] path to a project folder such as {root.rstrip('/')}/app",
        )
    if info.state == "notdir":
        raise SafetyStop(f"{root} on {host} exists and is not a directory", "pick another path")
    if info.state == "nonempty" and not info.created:
        raise SafetyStop(
            f"{root} on {host} is not empty and was not created by dev-sync "
            f"(no {MARKER} in it); syncing would overwrite and delete files there",
            "pick an empty or new [remote] path, or pass --adopt if this folder is meant to "
            "mirror your local tree",
        )
