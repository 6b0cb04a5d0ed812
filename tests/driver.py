"""Drive a real ``dev-sync up --json`` process and read its events.

Integration tests run the command exactly as a user would (a separate
process, real signals) and wait on the JSON events it prints, never on
fixed sleeps.
"""

from __future__ import annotations

import json
import os
import queue
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from types import TracebackType
from typing import Any

Event = dict[str, Any]


def run_cli(*args: str, timeout: float = 60, env: dict[str, str] | None = None
            ) -> subprocess.CompletedProcess[str]:
    """Run ``dev-sync ARGS`` to completion (a real process, as a user would)."""
    return subprocess.run(
        [sys.executable, "-m", "dev_sync", *args],
        capture_output=True,
        text=True,
        timeout=timeout,
        env={**os.environ, **(env or {})},
        check=False,
    )


def json_events(stdout: str) -> list[Event]:
    return [json.loads(line) for line in stdout.splitlines() if line.startswith("{")]


class Session:
    """A background ``dev-sync up --json`` with its event stream."""

    def __init__(self, config: Path, *extra: str, env: dict[str, str] | None = None) -> None:
        self.argv = [sys.executable, "-m", "dev_sync", "up", "--json", "--config", str(config),
                     *extra]
        self.proc = subprocess.Popen(
            self.argv,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            env={**os.environ, **(env or {})},
            start_new_session=True,
        )
        self.events: list[Event] = []
        self._queue: queue.Queue[Event | None] = queue.Queue()
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()
        self.stderr = ""

    def _read(self) -> None:
        assert self.proc.stdout is not None
        for line in self.proc.stdout:
            if line.startswith("{"):
                event = json.loads(line)
                self.events.append(event)
                self._queue.put(event)
        self._queue.put(None)

    def wait_for(
        self, kind: str, predicate: Callable[[Event], bool] | None = None, timeout: float = 30
    ) -> Event:
        """The next event of ``kind`` (matching ``predicate``) after those already consumed."""
        deadline = time.monotonic() + timeout
        while True:
            left = deadline - time.monotonic()
            if left <= 0:
                problems = [e.get("cause") for e in self.of_kind("problem")]
                raise AssertionError(
                    f"no {kind!r} event within {timeout}s; saw {self.kinds()}; "
                    f"problems: {problems}"
                )
            try:
                event = self._queue.get(timeout=left)
            except queue.Empty:
                continue
            if event is None:
                raise AssertionError(
                    f"dev-sync exited ({self.proc.wait()}) before a {kind!r} event; "
                    f"stderr: {self.read_stderr()}"
                )
            if event["event"] == kind and (predicate is None or predicate(event)):
                return event

    def wait_watching(self, timeout: float = 60) -> Event:
        return self.wait_for("watching", timeout=timeout)

    def kinds(self) -> list[str]:
        return [e["event"] for e in self.events]

    def of_kind(self, kind: str) -> list[Event]:
        return [e for e in self.events if e["event"] == kind]

    def read_stderr(self) -> str:
        if self.proc.poll() is not None and self.proc.stderr is not None and not self.stderr:
            self.stderr = self.proc.stderr.read()
        return self.stderr

    def stop(self, sig: int = signal.SIGTERM, timeout: float = 20) -> int:
        if self.proc.poll() is None:
            self.proc.send_signal(sig)
        code = self.proc.wait(timeout)
        self._reader.join(5)
        self.read_stderr()
        return code

    def __enter__(self) -> Session:
        return self

    def __exit__(
        self, et: type[BaseException] | None, ev: BaseException | None, tb: TracebackType | None
    ) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(20)
            except subprocess.TimeoutExpired:
                os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait()


def ssh_processes(needle: str) -> list[str]:
    """Command lines of live processes mentioning ``needle`` (e.g. a control socket)."""
    found = []
    for pid in os.listdir("/proc"):
        if not pid.isdigit():
            continue
        try:
            raw = Path(f"/proc/{pid}/cmdline").read_bytes()
        except OSError:
            continue
        args = raw.split(b"\0")
        if args and args[0].endswith(b"ssh") and needle.encode() in raw:
            found.append(" ".join(a.decode(errors="replace") for a in args))
    return found


def names(entries: Sequence[str]) -> set[str]:
    return set(entries)
