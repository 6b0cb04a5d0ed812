"""Where a session keeps its pid lock, status file and log.

One folder per project (keyed by the config file's path) under the user's
state directory, so `dev-sync status` and `dev-sync stop` find the session
started from any folder of the project, and nothing is written into the
synced tree.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import json
import os
import tempfile
from pathlib import Path
from typing import Any, TextIO


def state_root() -> Path:
    env = os.environ.get("DEV_SYNC_STATE_DIR")
    if env:
        return Path(env)
    xdg = os.environ.get("XDG_STATE_HOME")
    base = Path(xdg) if xdg else Path.home() / ".local" / "state"
    return base / "dev-sync"


class SessionFiles:
    """The files of one project's session."""

    def __init__(self, config_path: Path, env: str = "default") -> None:
        # One session per project and environment: syncing to two VMs at once is fine.
        ident = str(config_path.resolve()) + ("" if env == "default" else f"\0{env}")
        key = hashlib.sha256(ident.encode()).hexdigest()[:12]
        self.dir = state_root() / "projects" / key
        self.status = self.dir / "status.json"
        self.lock = self.dir / "session.lock"
        self.log = self.dir / "session.log"
        self._lock_file: TextIO | None = None

    def ensure(self) -> None:
        self.dir.mkdir(parents=True, exist_ok=True, mode=0o700)

    def acquire(self) -> bool:
        """Take the session lock; False if another live session holds it."""
        self.ensure()
        f = self.lock.open("a+")
        try:
            fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            f.close()
            return False
        f.seek(0)
        f.truncate()
        f.write(str(os.getpid()))
        f.flush()
        self._lock_file = f
        return True

    def release(self) -> None:
        if self._lock_file is not None:
            with contextlib.suppress(OSError):
                self.lock.unlink()
            self._lock_file.close()
            self._lock_file = None

    def running_pid(self) -> int | None:
        """The pid of the live session holding the lock, if any."""
        try:
            f = self.lock.open("r")
        except FileNotFoundError:
            return None
        with f:
            try:
                fcntl.flock(f, fcntl.LOCK_SH | fcntl.LOCK_NB)
            except BlockingIOError:
                text = f.read().strip()
                return int(text) if text.isdigit() else -1
            fcntl.flock(f, fcntl.LOCK_UN)
            return None

    def write_status(self, data: dict[str, Any]) -> None:
        """Replace the status file atomically: readers never see half of it."""
        self.ensure()
        fd, tmp = tempfile.mkstemp(dir=self.dir, prefix=".status-")
        try:
            with os.fdopen(fd, "w") as f:
                json.dump(data, f)
            os.replace(tmp, self.status)
        except BaseException:
            with contextlib.suppress(OSError):
                os.unlink(tmp)
            raise

    def read_status(self) -> dict[str, Any] | None:
        try:
            data = json.loads(self.status.read_text())
        except (FileNotFoundError, json.JSONDecodeError):
            return None
        return data if isinstance(data, dict) else None
