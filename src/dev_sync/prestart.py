"""Start the SSH handshake for ``dev-sync up`` before the program has loaded.

Importing dev-sync (pydantic, asyncio, ...) takes a few hundred milliseconds,
and so does an SSH key exchange; doing them one after the other is a delay
every ``up`` pays. This module reads only the ``[remote]`` table of the
config with the standard library, starts the master connection, and lets
:class:`dev_sync.ssh.SshMaster` adopt it if the fully validated config asks
for exactly the same command. Anything unusual (no config, odd values, a
socket already there) means no head start, never a different behaviour.
"""

from __future__ import annotations

import atexit
import os
import subprocess
import tomllib
from collections.abc import Sequence
from pathlib import Path

from dev_sync import runner
from dev_sync.target import Target

_started: tuple[list[str], subprocess.Popen[bytes]] | None = None


def _config_path(args: Sequence[str]) -> Path | None:
    for i, arg in enumerate(args):
        if arg == "--config" and i + 1 < len(args):
            return Path(args[i + 1])
        if arg.startswith("--config="):
            return Path(arg.split("=", 1)[1])
    here = Path.cwd()
    for folder in (here, *here.parents):
        candidate = folder / "dev-sync.toml"
        if candidate.is_file():
            return candidate
    return None


def _target(path: Path) -> Target | None:
    try:
        data = tomllib.loads(path.read_text())
        remote = data["remote"]
        if "cloud" in data or "cloud" in remote:
            return None  # the VM may be stopped or elsewhere: the cloud says where, later
        host, user, port = remote["host"], remote.get("user"), remote.get("port")
        ssh_config, timeout = remote.get("ssh_config"), remote.get("connect_timeout", 10.0)
    except (OSError, ValueError, KeyError, TypeError):
        return None
    if not isinstance(host, str) or not host or host.startswith("-"):
        return None
    optional = ((user, str), (port, int), (ssh_config, str))
    if any(value is not None and not isinstance(value, kind) for value, kind in optional):
        return None
    if not isinstance(timeout, int | float):
        return None
    cfg = None
    if ssh_config is not None:
        p = Path(ssh_config).expanduser()
        cfg = p if p.is_absolute() else path.resolve().parent / p
    return Target(host, user, port, cfg, float(timeout))


def maybe_start(args: Sequence[str]) -> None:
    """If ``args`` is a foreground ``up``, start its master connection now."""
    global _started
    if not args or args[0] != "up" or {"--detach", "-h", "--help"} & set(args):
        return
    path = _config_path(args)
    target = _target(path) if path is not None else None
    if target is None or os.path.exists(target.control_path()):
        return
    argv = target.master_argv()
    try:
        proc = runner.spawn(argv)
    except (runner.CommandError, OSError):
        return
    _started = (argv, proc)
    atexit.register(discard)


def adopt(argv: Sequence[str]) -> subprocess.Popen[bytes] | None:
    """The early master if it was started with exactly ``argv``; else none (and it goes)."""
    global _started
    if _started is None:
        return None
    started_argv, proc = _started
    if list(argv) == started_argv:
        _started = None  # even if it already failed: its stderr says why
        return proc
    discard()
    return None


def discard() -> None:
    """Stop an early master nobody adopted (config error, a session already running)."""
    global _started
    if _started is not None:
        proc = _started[1]
        _started = None
        proc.terminate()
        try:
            proc.wait(2)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
