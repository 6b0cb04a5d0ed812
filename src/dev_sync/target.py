"""Where a remote is and the exact ssh command lines that reach it.

Kept free of heavy imports (no pydantic, no asyncio) so that ``dev-sync up``
can start the SSH handshake before the rest of the program has loaded.
"""

from __future__ import annotations

import hashlib
import os
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from dev_sync.config import Config

READY = "dev-sync-master-ready"


@dataclass(frozen=True)
class Target:
    """How to reach one remote: the ssh destination and the options we add."""

    host: str
    user: str | None = None
    port: int | None = None
    ssh_config: Path | None = None
    connect_timeout: float = 10.0
    # Where to connect instead of what ``host`` resolves to (a cloud VM's
    # current address): ``host`` stays the destination, so the user's ssh
    # config for that alias (User, IdentityFile, ProxyJump, ...) still applies.
    hostname: str | None = None

    @classmethod
    def from_config(cls, config: Config) -> Target:
        r = config.remote
        return cls(r.host, r.user, r.port, config.ssh_config_path, r.connect_timeout,
                   r.cloud_address)

    @property
    def label(self) -> str:
        who = f"{self.user}@" if self.user else ""
        port = f":{self.port}" if self.port else ""
        at = f" (at {self.hostname})" if self.hostname else ""
        return f"{who}{self.host}{port}{at}"

    def options(self) -> list[str]:
        """Options shared by the master and every client call."""
        args: list[str] = []
        if self.ssh_config is not None:
            args += ["-F", str(self.ssh_config)]
        if self.port is not None:
            args += ["-p", str(self.port)]
        if self.user is not None:
            args += ["-l", self.user]
        if self.hostname is not None:
            args += ["-o", f"HostName={self.hostname}"]
        args += [
            "-o", "BatchMode=yes",
            "-o", f"ConnectTimeout={max(1, round(self.connect_timeout))}",
            "-o", "ServerAliveInterval=5",
            "-o", "ServerAliveCountMax=3",
        ]
        return args

    def control_path(self) -> Path:
        """A short, private socket path (sun_path is limited to ~104 bytes)."""
        parts = [self.host, self.user or "", str(self.port or ""), str(self.ssh_config or "")]
        if self.hostname is not None:
            parts.append(self.hostname)
        key = "\0".join(parts)
        digest = hashlib.sha256(key.encode()).hexdigest()[:16]
        folder = Path(tempfile.gettempdir()) / f"dev-sync-{os.getuid()}"
        folder.mkdir(mode=0o700, exist_ok=True)
        return folder / f"{digest}.sock"

    def master_argv(self) -> list[str]:
        """The master: prints READY (its LocalCommand) once it accepts clients."""
        return [
            "ssh", *self.options(),
            "-M", "-N",
            "-o", f"ControlPath={self.control_path()}",
            "-o", "ControlPersist=no",
            "-o", "PermitLocalCommand=yes",
            "-o", f"LocalCommand=echo {READY}",
            "--", self.host,
        ]
