"""What dev-sync learns about, and prepares on, the remote before syncing.

One ssh command does it all (a round trip costs more than the work): report
the remote rsync version and the state of the remote root, and create the
root with its ``.dev-sync-root`` marker when that is safe. Paths are passed
to a fixed script as positional arguments, never pasted into it.
"""

from __future__ import annotations

from dev_sync import prestart
from dev_sync.commands import MARKER as MARKER
from dev_sync.commands import MIN_RSYNC as MIN_RSYNC
from dev_sync.commands import RemoteInfo as RemoteInfo
from dev_sync.commands import parse_probe, probe_argv
from dev_sync.commands import parse_rsync_version as parse_rsync_version
from dev_sync.errors import DevSyncError, SafetyStop
from dev_sync.runner import CommandError
from dev_sync.ssh import SshMaster, classify_ssh_failure

# The probe's script and parser live in dev_sync.commands: `dev-sync up` may
# have run this very probe before the program loaded (see dev_sync.prestart).
_parse = parse_probe


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
    argv = probe_argv(root, mode, rsync)
    try:
        # The same probe, started early over the same master, if there was one.
        early = await prestart.adopt_probe(master.command(argv))
        result = await master.run(argv) if early is None else early
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
