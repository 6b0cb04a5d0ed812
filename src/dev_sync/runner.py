"""The single place where dev-sync starts processes.

Commands are always argument lists, never shell strings, so a path is passed
to a program as one argument whatever characters it holds. Remote commands go
through :func:`remote_command`, which quotes every argument for the remote
shell (ssh joins its arguments into one string that the remote login shell
parses, so quoting there is the only way to keep data as data).
"""

from __future__ import annotations

import os
import shlex
import subprocess
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Protocol

if TYPE_CHECKING:  # asyncio is imported where used: `dev-sync up` starts ssh before loading it
    import asyncio


class Child(Protocol):
    """A running command as asyncio hands it over, or a session opened on the
    SSH master directly (:mod:`dev_sync.mux`), which behaves the same."""

    @property
    def stdin(self) -> asyncio.StreamWriter | None: ...
    @property
    def stdout(self) -> asyncio.StreamReader | None: ...
    @property
    def stderr(self) -> asyncio.StreamReader | None: ...
    @property
    def returncode(self) -> int | None: ...
    async def wait(self) -> int: ...
    def terminate(self) -> None: ...
    def kill(self) -> None: ...


@dataclass(frozen=True)
class Result:
    """What a finished command left behind."""

    argv: tuple[str, ...]
    returncode: int
    stdout: bytes
    stderr: bytes

    @property
    def out(self) -> str:
        return self.stdout.decode("utf-8", "replace")

    @property
    def err(self) -> str:
        return self.stderr.decode("utf-8", "replace")


@dataclass
class CommandError(Exception):
    """A command exited non-zero (or could not start).

    Carries the command, its exit code and its stderr so callers can map a
    failure to a user-facing cause without re-running anything.
    """

    argv: tuple[str, ...]
    returncode: int
    stdout: bytes = b""
    stderr: bytes = b""
    extra: dict[str, str] = field(default_factory=dict)

    def __post_init__(self) -> None:
        super().__init__(self.argv, self.returncode)

    @property
    def err(self) -> str:
        return self.stderr.decode("utf-8", "replace")

    def last_line(self) -> str:
        """The most telling line of stderr (the last non-empty one)."""
        lines = [ln.strip() for ln in self.err.splitlines() if ln.strip()]
        return lines[-1] if lines else f"exit code {self.returncode}"

    def __str__(self) -> str:
        return f"{shlex.join(self.argv)} exited {self.returncode}: {self.last_line()}"


def child_env(extra: Mapping[str, str] | None) -> dict[str, str]:
    env = dict(os.environ)
    # Stable, parseable output from rsync and ssh whatever the user's locale.
    env["LC_ALL"] = "C"
    if extra:
        env.update(extra)
    return env


def run(
    argv: Sequence[str],
    *,
    input: bytes | None = None,
    check: bool = True,
    timeout: float | None = None,
    env: Mapping[str, str] | None = None,
    cwd: str | None = None,
) -> Result:
    """Run a command to completion and capture its output."""
    args = tuple(argv)
    try:
        proc = subprocess.run(
            args,
            input=input,
            stdin=None if input is not None else subprocess.DEVNULL,
            capture_output=True,
            timeout=timeout,
            env=child_env(env),
            cwd=cwd,
            check=False,
        )
    except FileNotFoundError as exc:
        raise CommandError(args, 127, b"", f"{args[0]}: command not found".encode()) from exc
    except subprocess.TimeoutExpired as exc:
        raise CommandError(
            args, 124, exc.stdout or b"", f"timed out after {timeout:g}s".encode()
        ) from exc
    result = Result(args, proc.returncode, proc.stdout, proc.stderr)
    if check and proc.returncode != 0:
        raise CommandError(args, proc.returncode, proc.stdout, proc.stderr)
    return result


async def start(
    argv: Sequence[str],
    *,
    stdin: int | None = subprocess.DEVNULL,
    stdout: int | None = subprocess.PIPE,
    stderr: int | None = subprocess.PIPE,
    env: Mapping[str, str] | None = None,
) -> asyncio.subprocess.Process:
    """Start a command under asyncio; the caller owns the process."""
    import asyncio

    args = tuple(argv)
    try:
        return await asyncio.create_subprocess_exec(
            *args, stdin=stdin, stdout=stdout, stderr=stderr, env=child_env(env)
        )
    except FileNotFoundError as exc:
        raise CommandError(args, 127, b"", f"{args[0]}: command not found".encode()) from exc


async def arun(
    argv: Sequence[str],
    *,
    input: bytes | None = None,
    check: bool = True,
    env: Mapping[str, str] | None = None,
) -> Result:
    """Async twin of :func:`run`: the event loop keeps serving the watcher."""
    import asyncio

    args = tuple(argv)
    proc = await start(
        args,
        stdin=subprocess.PIPE if input is not None else subprocess.DEVNULL,
        env=env,
    )
    try:
        out, err = await proc.communicate(input)
    except asyncio.CancelledError:
        await terminate(proc)
        raise
    assert proc.returncode is not None
    result = Result(args, proc.returncode, out, err)
    if check and proc.returncode != 0:
        raise CommandError(args, proc.returncode, out, err)
    return result


async def terminate(proc: Child, grace: float = 2.0) -> None:
    """Stop a child: SIGTERM, then SIGKILL if it does not go within ``grace``."""
    import asyncio

    if proc.returncode is not None:
        return
    try:
        proc.terminate()
    except ProcessLookupError:
        return
    try:
        await asyncio.wait_for(proc.wait(), grace)
    except TimeoutError:
        try:
            proc.kill()
        except ProcessLookupError:
            return
        await proc.wait()


def spawn(argv: Sequence[str]) -> subprocess.Popen[bytes]:
    """Start a long-lived command with piped output, outside any event loop."""
    args = tuple(argv)
    try:
        return subprocess.Popen(
            args,
            stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            env=child_env(None),
        )
    except FileNotFoundError as exc:
        raise CommandError(args, 127, b"", f"{args[0]}: command not found".encode()) from exc


def remote_command(argv: Sequence[str]) -> str:
    """Quote an argument list for the remote login shell that ssh hands it to."""
    return shlex.join(argv)
