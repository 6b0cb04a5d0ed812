"""The local half of the fast path: start the remote agent and talk to it.

The agent (:mod:`dev_sync.remote_agent`) is one standard-library file. It is
started over the SSH master with a small bootstrap that runs the copy cached
on the remote when its first line carries this version, and otherwise asks
for the source on the same stdin, stores it and runs it: no install step, and
an old agent is replaced the first time a new dev-sync meets it. Requests are
written without waiting for earlier answers (pipelining); each gets its own
acknowledgement, matched by id.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from importlib import resources
from typing import Any

from dev_sync import mux, runner
from dev_sync.errors import AgentLost, AgentUnavailable
from dev_sync.remote_agent import (
    ACK,
    HEADER,
    HELLO,
    OUTPUT,
    REQUEST,
    decode_meta,
    frame,
    take_frames,
)
from dev_sync.ssh import SshMaster

CACHE = "~/.cache/dev-sync/agent.py"

# Kept tiny and on one screen: it is sent with every start. It runs the cached
# agent when the version matches, else receives the source on stdin first.
BOOT = r"""
import os,sys
v,r=sys.argv[1],sys.argv[2]
p=os.path.expanduser(sys.argv[3])
h=("# dev-sync agent "+v+"\n").encode()
try:
    with open(p,"rb") as f:s=f.read()
except OSError:
    s=b""
if not s.startswith(h):
    o=sys.stdout.buffer;o.write(b"need\n");o.flush()
    i=sys.stdin.buffer;n=int(i.readline());s=b""
    while len(s)<n:
        c=i.read(n-len(s))
        if not c:sys.exit(3)
        s+=c
    os.makedirs(os.path.dirname(p),exist_ok=True)
    t="%s.%d"%(p,os.getpid())
    with open(t,"wb") as f:f.write(s)
    os.replace(t,p)
sys.argv=[p,v,r]
exec(compile(s,p,"exec"),{"__name__":"__main__"})
""".strip()


def _source() -> tuple[str, bytes]:
    body = resources.files("dev_sync").joinpath("remote_agent.py").read_bytes()
    body = body.split(b"\n", 1)[1]  # the first line becomes the version header
    version = hashlib.sha256(body).hexdigest()[:16]
    return version, f"# dev-sync agent {version}\n".encode() + body


VERSION, SOURCE = _source()

__all__ = ["VERSION", "Agent", "AgentLost", "AgentUnavailable", "Channel", "Reply"]


@dataclass
class Reply:
    ok: bool
    meta: dict[str, Any]
    stdout: bytearray = field(default_factory=bytearray)
    stderr: bytearray = field(default_factory=bytearray)
    on_output: Callable[[bytes], None] | None = None

    @property
    def error(self) -> str:
        return str(self.meta.get("error", ""))

    @property
    def refused(self) -> bool:
        return bool(self.meta.get("refused"))


class Agent:
    """One running agent for one remote root."""

    def __init__(self, proc: runner.Child, hello: dict[str, Any]) -> None:
        self.proc = proc
        self.hello = hello
        self._next = 1
        self._waiting: dict[int, tuple[asyncio.Future[Reply], Reply]] = {}
        self._reader = asyncio.create_task(self._read())
        self._stderr = bytearray()
        self._err_reader = asyncio.create_task(self._read_stderr())
        self.closed = asyncio.Event()

    @classmethod
    async def start(
        cls, master: SshMaster, root: str, python: str = "python3", cache: str | None = None,
        *, direct: bool = True,
    ) -> Agent:
        """Start the agent for ``root``; the cached copy lives at ``cache`` on the remote
        (``$DEV_SYNC_AGENT_CACHE`` here, else ``~/.cache/dev-sync/agent.py``).

        The session is opened on the master directly (:mod:`dev_sync.mux`), so
        that no ssh client process waits beside dev-sync for as long as it runs;
        an ssh client carries it if the master will not (or ``direct`` is off).
        """
        import os
        import subprocess

        cache = cache or os.environ.get("DEV_SYNC_AGENT_CACHE") or CACHE
        remote_argv = [python, "-c", BOOT, VERSION, root, cache]
        proc: runner.Child | None = None
        if direct:
            with contextlib.suppress(mux.MuxError):
                proc = await mux.open_session(master.control_path,
                                              runner.remote_command(remote_argv))
        if proc is None:
            proc = await runner.start(master.command(remote_argv), stdin=subprocess.PIPE)
        assert proc.stdin is not None and proc.stdout is not None
        try:
            first = await proc.stdout.readexactly(1)
            if first == b"n":
                await proc.stdout.readuntil(b"\n")
                proc.stdin.write(b"%d\n" % len(SOURCE) + SOURCE)
                await proc.stdin.drain()
                first = await proc.stdout.readexactly(1)
            rest = await proc.stdout.readexactly(HEADER.size - 1)
            kind, _, meta_len, data_len = HEADER.unpack(first + rest)
            hello = decode_meta(await proc.stdout.readexactly(meta_len))
            await proc.stdout.readexactly(data_len)
        except (asyncio.IncompleteReadError, ConnectionError, ValueError) as exc:
            err = b""
            with contextlib.suppress(Exception):
                await runner.terminate(proc, grace=1.0)
                assert proc.stderr is not None
                err = await proc.stderr.read()
            text = err.decode("utf-8", "replace").strip()
            if proc.returncode in (126, 127) or "not found" in text:
                raise AgentUnavailable(
                    f"{python} is not available on the remote ({text or 'exit 127'})"
                ) from None
            if proc.returncode == 255:
                raise AgentLost(text or "the connection closed") from None
            raise AgentUnavailable(
                f"the agent did not start: {text or exc!s}"
            ) from None
        if kind != HELLO or not hello.get("ok"):
            await runner.terminate(proc, grace=1.0)
            raise AgentUnavailable(str(hello.get("error", "unexpected answer from the agent")))
        return cls(proc, hello)

    # -- requests -----------------------------------------------------------

    def send(self, meta: Mapping[str, Any], data: bytes = b"") -> asyncio.Future[Reply]:
        """Queue a request; the future resolves with its acknowledgement."""
        return self.send_many([(meta, data)])[0]

    def send_many(
        self, requests: Sequence[tuple[Mapping[str, Any], bytes]]
    ) -> list[asyncio.Future[Reply]]:
        """Queue requests in one write: a batch leaves as a few large SSH packets
        instead of one small write, and one small packet, per file."""
        return [future for _, future in self._send(requests)]

    def _send(
        self, requests: Sequence[tuple[Mapping[str, Any], bytes]],
        on_output: Callable[[bytes], None] | None = None,
    ) -> list[tuple[int, asyncio.Future[Reply]]]:
        if self.closed.is_set():
            raise AgentLost(self.why())
        loop = asyncio.get_running_loop()
        sent: list[tuple[int, asyncio.Future[Reply]]] = []
        frames: list[bytes] = []
        for meta, data in requests:
            ident = self._next
            self._next += 1
            future: asyncio.Future[Reply] = loop.create_future()
            self._waiting[ident] = (future, Reply(False, {}, on_output=on_output))
            frames.append(frame(REQUEST, ident, dict(meta), data))
            sent.append((ident, future))
        assert self.proc.stdin is not None
        self.proc.stdin.write(b"".join(frames))
        return sent

    async def flush(self) -> None:
        assert self.proc.stdin is not None
        try:
            await self.proc.stdin.drain()
        except (ConnectionError, RuntimeError) as exc:
            raise AgentLost(self.why() or str(exc)) from None

    async def call(self, meta: Mapping[str, Any], data: bytes = b"") -> Reply:
        future = self.send(meta, data)
        await self.flush()
        return await future

    async def exec(self, argv: Sequence[str], *, input: bytes | None = None) -> runner.Result:
        """Run a command on the remote through the agent: no new ssh process."""
        reply = await self.call({"op": "exec", "argv": list(argv)}, input or b"")
        return runner.Result(tuple(argv), int(reply.meta.get("code", 1)), bytes(reply.stdout),
                             bytes(reply.stderr))

    async def stream(self, argv: Sequence[str], on_output: Callable[[bytes], None]) -> int:
        """Run a long command (an install) with its output merged and handed over as it
        comes. Cancelling closes its stdin on the remote, as a closed ssh channel would."""
        [(ident, future)] = self._send(
            [({"op": "exec", "argv": list(argv), "hold": True, "merge": True}, b"")], on_output)
        await self.flush()
        try:
            reply = await asyncio.shield(future)
        except asyncio.CancelledError:
            with contextlib.suppress(AgentLost, ConnectionError, RuntimeError):
                self.send({"op": "cancel", "target": ident})
                await self.flush()
            raise
        return int(reply.meta.get("code", 1))

    async def _read(self) -> None:
        stream = self.proc.stdout
        assert stream is not None
        buf = bytearray()
        try:
            while chunk := await stream.read(1 << 20):
                buf += chunk
                for frame_ in take_frames(buf):
                    self._deliver(*frame_)
        except (ConnectionError, ValueError):
            pass
        finally:
            self.closed.set()
            for future, _ in self._waiting.values():
                if not future.done():
                    future.set_exception(AgentLost(self.why() or "the agent exited"))
            self._waiting.clear()

    def _deliver(self, kind: int, ident: int, meta: dict[str, Any], data: bytes) -> None:
        entry = self._waiting.get(ident)
        if entry is None:
            return
        future, reply = entry
        if kind == OUTPUT:
            if reply.on_output is not None:
                reply.on_output(data)
            else:
                (reply.stderr if meta.get("stream") == "stderr" else reply.stdout).extend(data)
        elif kind == ACK:
            del self._waiting[ident]
            reply.ok = bool(meta.get("ok"))
            reply.meta = meta
            if not future.done():
                future.set_result(reply)

    async def _read_stderr(self) -> None:
        assert self.proc.stderr is not None
        while chunk := await self.proc.stderr.read(4096):
            self._stderr += chunk
            del self._stderr[:-4096]

    def why(self) -> str:
        lines = self._stderr.decode("utf-8", "replace").strip().splitlines()
        return lines[-1] if lines else ""

    async def close(self) -> None:
        if self.proc.stdin is not None and not self.proc.stdin.is_closing():
            self.proc.stdin.close()
        with contextlib.suppress(Exception):
            await asyncio.wait_for(self.proc.wait(), 2.0)
        await runner.terminate(self.proc, grace=1.0)
        for task in (self._reader, self._err_reader):
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await task
        self.closed.set()


class Channel:
    """Remote commands for installs' records, restarts and status checks.

    Through the agent while one runs (no ssh process and no login shell per
    command), else one ssh client per command over the master, as before.
    Either way the command is an argument list, never a shell string.
    """

    def __init__(self, master: SshMaster) -> None:
        self.master = master
        self.agent: Agent | None = None

    @property
    def alive(self) -> bool:
        """Whether the connection is up: nothing is tried while it is down."""
        return self.master.alive

    async def run(
        self, remote_argv: Sequence[str], *, check: bool = True, input: bytes | None = None
    ) -> runner.Result:
        agent = self.agent
        if agent is not None and not agent.closed.is_set():
            with contextlib.suppress(AgentLost):
                result = await agent.exec(remote_argv, input=input)
                if check and result.returncode != 0:
                    raise runner.CommandError(result.argv, result.returncode, result.stdout,
                                              result.stderr)
                return result
        return await self.master.run(remote_argv, check=check, input=input)

    async def stream(
        self, remote_argv: Sequence[str], on_output: Callable[[bytes], None]
    ) -> int | None:
        agent = self.agent
        if agent is None or agent.closed.is_set():
            return None
        try:
            return await agent.stream(remote_argv, on_output)
        except AgentLost:
            return 255  # like ssh with its connection gone: the install is retried

