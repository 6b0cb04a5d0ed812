"""One OpenSSH ControlMaster connection per remote, owned by dev-sync.

We shell out to the user's own ``ssh`` so that everything their
``~/.ssh/config`` says (ProxyJump, IdentityFile, agents, host keys) keeps
working. The master runs as our child process on a private control socket;
every later ssh or rsync call rides on it and costs one channel open instead
of a TCP and key exchange. When the master exits, the connection is gone:
the engine watches for that instead of discovering it on the next push.
"""

from __future__ import annotations

import asyncio
import contextlib
import shlex
import subprocess
import threading
from collections import deque
from collections.abc import Sequence
from typing import IO

from dev_sync import prestart, runner
from dev_sync.errors import ConnectionFailed
from dev_sync.target import READY, Target

__all__ = ["READY", "SshMaster", "Target", "classify_ssh_failure"]


def classify_ssh_failure(target: Target, stderr: str, code: int) -> ConnectionFailed:
    """Turn ssh's stderr into one cause and one fix."""
    text = stderr.lower()
    host = target.label
    lines = [ln.strip() for ln in stderr.splitlines() if ln.strip()]
    last = lines[-1] if lines else f"ssh exited {code}"
    if "could not resolve hostname" in text or "name or service not known" in text:
        return ConnectionFailed(
            f"cannot resolve host {target.host!r} (DNS)",
            "check [remote] host in dev-sync.toml, or add a Host entry to your ssh config",
        )
    if "connection refused" in text:
        return ConnectionFailed(
            f"{host} refused the connection (no ssh server listening on that port)",
            "start sshd on the machine (or the VM itself), or check [remote] port",
        )
    if "timed out" in text or code == 124:
        return ConnectionFailed(
            f"no answer from {host} within {target.connect_timeout:g}s",
            "check that the machine is running and reachable (VPN, firewall, address)",
        )
    if "no route to host" in text or "network is unreachable" in text:
        return ConnectionFailed(
            f"{host} is unreachable: {last}", "check your network connection and the address"
        )
    if "host key verification failed" in text or "remote host identification has changed" in text:
        return ConnectionFailed(
            f"the host key of {host} is unknown or has changed",
            f"run `ssh {target.host}` once to check and accept the key "
            "(or fix the entry in known_hosts)",
        )
    if "permission denied" in text or "too many authentication failures" in text:
        return ConnectionFailed(
            f"{host} rejected the login ({last})",
            f"make `ssh {target.host} true` work without a prompt: load your key with "
            "`ssh-add`, or set IdentityFile/User in your ssh config",
        )
    if "connection closed" in text or "connection reset" in text or "broken pipe" in text:
        return ConnectionFailed(f"the connection to {host} was lost: {last}", "it will be retried")
    return ConnectionFailed(f"ssh to {host} failed: {last}", f"try `ssh -v {target.host} true`")


class SshMaster:
    """The long-lived master connection and the client commands that use it."""

    def __init__(self, target: Target) -> None:
        self.target = target
        self.control_path = target.control_path()
        self._proc: subprocess.Popen[bytes] | None = None
        self._stderr: deque[str] = deque(maxlen=20)
        self._stderr_thread: threading.Thread | None = None

    # -- client side -------------------------------------------------------

    def client_options(self) -> list[str]:
        return [
            *self.target.options(),
            "-S", str(self.control_path),
            "-o", "ControlMaster=no",
        ]

    def command(self, remote_argv: Sequence[str], *, tty: bool = False) -> list[str]:
        """An ssh argv running ``remote_argv`` (quoted for the remote shell) on the master."""
        args = ["ssh", *self.client_options(), "-T" if not tty else "-t", "--", self.target.host]
        return [*args, runner.remote_command(remote_argv)]

    def rsync_rsh(self) -> str:
        """The ``rsync -e`` value: rsync splits it on spaces and honours quotes."""
        return shlex.join(["ssh", *self.client_options()])

    async def run(
        self, remote_argv: Sequence[str], *, check: bool = True, input: bytes | None = None
    ) -> runner.Result:
        return await runner.arun(self.command(remote_argv), check=check, input=input)

    # -- master ------------------------------------------------------------
    # The master is a plain Popen watched by threads rather than an asyncio
    # child: that lets it be started before the event loop exists (see
    # dev_sync.prestart), and a thread blocked in wait() costs nothing idle.

    @property
    def alive(self) -> bool:
        return self._proc is not None and self._proc.poll() is None

    def _drain_stderr(self, stream: IO[bytes]) -> None:
        for line in iter(stream.readline, b""):
            self._stderr.append(line.decode("utf-8", "replace").rstrip())

    async def connect(self) -> None:
        """Start the master and return once it accepts clients, or raise ConnectionFailed."""
        await self.spawn()
        await self.wait_ready()

    async def spawn(self) -> None:
        """Start the master process; the handshake goes on while the caller works."""
        if self._proc is not None:
            await self.close()
        argv = self.target.master_argv()
        proc = prestart.adopt(argv)
        if proc is None:
            with contextlib.suppress(FileNotFoundError):
                self.control_path.unlink()  # a stale socket of ours from a killed run
            try:
                proc = runner.spawn(argv)
            except runner.CommandError:
                raise ConnectionFailed(
                    "ssh is not installed here",
                    "install OpenSSH (`sudo apt-get install openssh-client`)",
                ) from None
        self._stderr.clear()
        self._proc = proc
        assert proc.stderr is not None
        self._stderr_thread = threading.Thread(
            target=self._drain_stderr, args=(proc.stderr,), daemon=True
        )
        self._stderr_thread.start()

    def _read_ready(self, proc: subprocess.Popen[bytes]) -> bool:
        assert proc.stdout is not None
        return any(READY.encode() in line for line in iter(proc.stdout.readline, b""))

    async def wait_ready(self) -> None:
        """Wait until the spawned master accepts clients, or raise ConnectionFailed."""
        proc = self._proc
        assert proc is not None, "spawn() first"
        # The master prints READY (its LocalCommand) after authentication, once
        # it listens on the control socket; EOF means it exited.
        try:
            ready = await asyncio.wait_for(
                asyncio.to_thread(self._read_ready, proc), self.target.connect_timeout + 5
            )
        except TimeoutError:
            await self.close()
            raise classify_ssh_failure(self.target, "timed out", 124) from None
        if not ready:
            code = await asyncio.to_thread(proc.wait)
            if self._stderr_thread is not None:
                await asyncio.to_thread(self._stderr_thread.join, 2)
            stderr = "\n".join(self._stderr)
            self._proc = None
            raise classify_ssh_failure(self.target, stderr, code)

    async def wait_closed(self) -> int:
        """Return when the master exits (the connection is gone)."""
        if self._proc is None:
            return 0
        return await asyncio.to_thread(self._proc.wait)

    def last_error(self) -> str:
        return self._stderr[-1] if self._stderr else ""

    async def close(self) -> None:
        proc, self._proc = self._proc, None
        if proc is not None and proc.poll() is None:
            proc.terminate()
            try:
                await asyncio.to_thread(proc.wait, 2)
            except subprocess.TimeoutExpired:
                proc.kill()
                await asyncio.to_thread(proc.wait)
        if proc is None:
            return  # nothing of ours: the socket may belong to an adopted master
        for stream in (proc.stdout, proc.stderr):
            if stream is not None:
                stream.close()
        with contextlib.suppress(FileNotFoundError):
            self.control_path.unlink()
