"""`dev-sync doctor`: every precondition checked, each failure with its fix.

It runs the same code paths as a session (the same master connection, the
same remote probe) so that a green doctor means `dev-sync up` will start.
"""

from __future__ import annotations

import asyncio
import sys
import time
from dataclasses import dataclass
from pathlib import Path

from rich.console import Console

from dev_sync import remote
from dev_sync.config import Config
from dev_sync.errors import DevSyncError
from dev_sync.ignore import RuleSet, walk_dirs
from dev_sync.pusher import local_rsync_version
from dev_sync.ssh import SshMaster, Target


@dataclass(frozen=True)
class Check:
    name: str
    ok: bool
    detail: str
    fix: str = ""
    warning: bool = False


def _version(v: tuple[int, ...] | None) -> str:
    return ".".join(map(str, v)) if v else "missing"


def inotify_checks(config: Config) -> list[Check]:
    if not sys.platform.startswith("linux"):
        return [Check("watcher", True, "portable watcher (watchfiles)")]
    rules = RuleSet(config.local_root, config.sync.exclude, config.sync.gitignore)
    needed = sum(1 for _ in walk_dirs(rules))
    try:
        limit = int(Path("/proc/sys/fs/inotify/max_user_watches").read_text())
    except (OSError, ValueError):
        return [Check("inotify", False, "cannot read fs.inotify.max_user_watches", warning=True)]
    fix = (
        f"sudo sysctl fs.inotify.max_user_watches={max(524288, needed * 2)} and add the same "
        "line to /etc/sysctl.d/90-dev-sync.conf to keep it"
    )
    if needed > limit:
        return [Check("inotify", False, f"{needed:,} folders to watch but "
                      f"max_user_watches is {limit:,} (dev-sync would fall back to polling)", fix)]
    if needed > limit * 0.8:
        return [Check("inotify", True, f"{needed:,} folders of {limit:,} allowed watches "
                      "(other programs share that pool)", fix, warning=True)]
    return [Check("inotify", True, f"{needed:,} folders to watch, limit {limit:,}")]


async def remote_checks(config: Config) -> list[Check]:
    checks: list[Check] = []
    master = SshMaster(Target.from_config(config))
    started = time.monotonic()
    try:
        await master.connect()
    except DevSyncError as exc:
        return [Check("ssh", False, exc.cause, exc.fix or "")]
    try:
        ms = round((time.monotonic() - started) * 1000)
        checks.append(Check("ssh", True, f"connected to {master.target.label} in {ms} ms"))
        t0 = time.monotonic()
        await master.run(["true"])
        rtt = round((time.monotonic() - t0) * 1000)
        slow = rtt > 150
        checks.append(Check(
            "remote command", True, f"one command over the connection: {rtt} ms",
            "the remote shell start-up is slow: trim the remote user's ~/.bashrc "
            "(nvm, conda, pyenv lines) for non-interactive shells" if slow else "",
            warning=slow,
        ))
        info = None
        try:
            info = await remote.prepare(
                master, config.remote.path, adopt=False, create=False,
                rsync=config.remote.rsync_path,
            )
        except DevSyncError as exc:
            if "rsync" in exc.cause:
                checks.append(Check("remote rsync", False, exc.cause, exc.fix or ""))
            else:
                checks.append(Check("remote root", False, exc.cause, exc.fix or ""))
        if info is not None:
            checks.append(Check("remote rsync", True, _version(info.rsync_version)))
            state = {
                "marked": "exists and is marked as a dev-sync root",
                "empty": "exists and is empty (it will be marked at the first sync)",
                "missing": "does not exist yet (it will be created at the first sync)",
            }.get(info.state, info.state)
            checks.append(Check("remote root", True, f"{config.remote.path} {state}"))
            if info.free_kb is not None and info.free_kb < 1024 * 1024:
                checks.append(Check(
                    "remote disk", False, f"only {info.free_kb // 1024} MB free under the root",
                    "free space on the remote", warning=True,
                ))
        if config.sync.agent:
            checks.append(await _python_check(master, config.remote.python))
    finally:
        await master.close()
    return checks


async def _python_check(master: SshMaster, python: str) -> Check:
    """The fast path needs Python 3.8+ on the remote; without it rsync does everything."""
    fix = ("install Python 3.8 or newer on the remote (or set [remote] python); without it "
           "every change goes through rsync, a few round trips each")
    result = await master.run(
        [python, "-c", "import sys; print('%d.%d' % sys.version_info[:2])"], check=False)
    version = tuple(int(p) for p in result.out.strip().split(".") if p.isdigit())
    if result.returncode != 0 or len(version) != 2:
        lines = [ln.strip() for ln in result.err.splitlines() if ln.strip()]
        why = lines[-1] if lines else f"exit code {result.returncode}"
        return Check("fast path", False, f"{python} is not available on the remote ({why})",
                     fix, warning=True)
    if version < (3, 8):
        return Check("fast path", False, f"{python} is {version[0]}.{version[1]} on the remote",
                     fix, warning=True)
    return Check("fast path", True, f"the agent runs on {python} {version[0]}.{version[1]}")


def run_doctor(config: Config, console: Console | None = None) -> bool:
    """Print every check; True when nothing failed."""
    console = console or Console(highlight=False)
    checks = [Check("config", True, f"{config.source} (environment {config.env})")]
    local = local_rsync_version()
    checks.append(Check(
        "local rsync", local is not None and local >= remote.MIN_RSYNC, _version(local),
        "install rsync 3.2.3 or newer (`sudo apt-get install rsync`, `brew install rsync`)",
    ))
    checks += inotify_checks(config)
    checks += asyncio.run(remote_checks(config))
    failed = False
    for check in checks:
        if check.ok and not check.warning:
            mark = "[green]✓[/]"
        elif check.ok or check.warning:
            mark = "[yellow]![/]"
        else:
            mark = "[red]✗[/]"
            failed = True
        console.print(f"{mark} {check.name}: {check.detail}", markup=True)
        if check.fix and (not check.ok or check.warning):
            console.print(f"    fix: {check.fix}", markup=False)
    return not failed
