"""Sessions opened on the SSH master directly, without an ssh client process.

``ssh -S socket host command`` starts a client that hands its standard
streams to the master over the control socket and then only waits: for a
session that lasts as long as dev-sync (the remote agent) that is a second
``ssh`` process, about 9 MB of resident memory, doing nothing. OpenSSH
documents the exchange (``PROTOCOL.mux`` in its sources, version 4, stable
since OpenSSH 5.x), so dev-sync speaks it itself: a hello, a new-session
request carrying the command, the three descriptors passed with
``SCM_RIGHTS``, then the exit status when the session ends. The master and
its connection stay the user's own ``ssh``; closing the control socket ends
the session just as killing that client would.

Anything unexpected raises :class:`MuxError`, and the caller starts an ssh
client instead: this is an optimisation, never a requirement.
"""

from __future__ import annotations

import asyncio
import contextlib
import socket
import struct
from pathlib import Path

VERSION = 4
HELLO = 0x00000001
NEW_SESSION = 0x10000002
S_PERMISSION_DENIED = 0x80000002
S_FAILURE = 0x80000003
S_EXIT_MESSAGE = 0x80000004
S_SESSION_OPENED = 0x80000006
S_TTY_ALLOC_FAIL = 0x80000008
NO_ESCAPE = 0xFFFFFFFF
_MAX_PACKET = 256 * 1024
_U32 = struct.Struct(">I")


class MuxError(Exception):
    """The master could not open the session this way."""


def _string(data: bytes) -> bytes:
    return _U32.pack(len(data)) + data


def _packet(*fields: int | bytes) -> bytes:
    body = b"".join(_U32.pack(f) if isinstance(f, int) else _string(f) for f in fields)
    return _string(body)


def new_session_request(request_id: int, command: str) -> bytes:
    """No terminal, no X11 or agent forwarding, not a subsystem, no escape character."""
    return _packet(NEW_SESSION, request_id, b"", 0, 0, 0, 0, NO_ESCAPE, b"",
                   command.encode("utf-8", "surrogateescape"))


def parse_u32s(body: bytes, count: int) -> tuple[int, ...]:
    if len(body) < 4 * count:
        raise MuxError(f"short message from the master ({len(body)} bytes)")
    return struct.unpack_from(f">{count}I", body)


def parse_reason(body: bytes, offset: int) -> str:
    """The text of a failure reply, as much of it as is there."""
    if len(body) < offset + 4:
        return ""
    (length,) = _U32.unpack_from(body, offset)
    return body[offset + 4:offset + 4 + length].decode("utf-8", "replace")


class MuxSession:
    """A remote command on the master, shaped like an asyncio child process.

    ``stdin`` and ``stdout`` are the two directions of one socket pair, so
    closing ``stdin`` ends both; ``stderr`` has its own.
    """

    def __init__(
        self, control: socket.socket, stdin: asyncio.StreamWriter,
        stdout: asyncio.StreamReader, stderr: asyncio.StreamReader,
        err_writer: asyncio.StreamWriter,
    ) -> None:
        self._control = control
        self.stdin = stdin
        self.stdout = stdout
        self.stderr = stderr
        self._err_writer = err_writer
        self.returncode: int | None = None
        self._done = asyncio.Event()
        self._watch = asyncio.create_task(self._wait_exit())

    async def _wait_exit(self) -> None:
        # The status can come before the last output is written: the master
        # closes the control connection only once the session is gone, and
        # closing it first would make the master drop what is still buffered.
        code = 255  # no status at all: as ssh reports a lost connection
        with contextlib.suppress(OSError, MuxError, asyncio.IncompleteReadError):
            while True:
                kind, body = await _read_packet(self._control)
                if kind == S_EXIT_MESSAGE:
                    code = parse_u32s(body, 2)[1]
                # MUX_S_TTY_ALLOC_FAIL and anything newer: nothing to do here
        self._finish(code)

    def _finish(self, code: int) -> None:
        if self.returncode is None:
            self.returncode = code
        self._control.close()
        self._err_writer.close()
        self._done.set()

    async def wait(self) -> int:
        await self._done.wait()
        assert self.returncode is not None
        return self.returncode

    def terminate(self) -> None:
        """End the session: the master closes the channel, the remote sees end of input."""
        if self.returncode is not None:
            return
        self._watch.cancel()
        self.stdin.close()
        self._finish(-15)

    kill = terminate


async def _recv_exactly(sock: socket.socket, size: int) -> bytes:
    loop = asyncio.get_running_loop()
    buf = bytearray()
    while len(buf) < size:
        chunk = await loop.sock_recv(sock, size - len(buf))
        if not chunk:
            raise MuxError("the master closed the control connection")
        buf += chunk
    return bytes(buf)


async def _read_packet(sock: socket.socket) -> tuple[int, bytes]:
    (length,) = _U32.unpack(await _recv_exactly(sock, 4))
    if not 4 <= length <= _MAX_PACKET:
        raise MuxError(f"unexpected message length {length} from the master")
    body = await _recv_exactly(sock, length)
    return _U32.unpack_from(body)[0], body[4:]


async def open_session(control_path: Path, command: str, request_id: int = 1) -> MuxSession:
    """Run ``command`` (already quoted for the remote shell) on the master at ``control_path``."""
    control = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    control.setblocking(False)
    io_ours, io_theirs = socket.socketpair()
    err_ours, err_theirs = socket.socketpair()
    try:
        await _handshake(control, control_path, command, request_id,
                         (io_theirs.fileno(), io_theirs.fileno(), err_theirs.fileno()))
    except BaseException as exc:
        for sock in (control, io_ours, err_ours):
            sock.close()
        if isinstance(exc, OSError):
            raise MuxError(f"cannot use the control socket: {exc}") from None
        raise
    finally:
        io_theirs.close()  # the master has its own copies now
        err_theirs.close()
    stdout, stdin = await asyncio.open_unix_connection(sock=io_ours)
    stderr, err_writer = await asyncio.open_unix_connection(sock=err_ours)
    return MuxSession(control, stdin, stdout, stderr, err_writer)


async def _handshake(
    control: socket.socket, control_path: Path, command: str, request_id: int,
    fds: tuple[int, int, int],
) -> None:
    loop = asyncio.get_running_loop()
    await loop.sock_connect(control, str(control_path))
    await loop.sock_sendall(control, _packet(HELLO, VERSION))
    kind, body = await _read_packet(control)
    if kind != HELLO or parse_u32s(body, 1)[0] != VERSION:
        raise MuxError(f"the master speaks another multiplexing protocol ({kind:#x})")
    await loop.sock_sendall(control, new_session_request(request_id, command))
    for fd in fds:  # stdin, stdout, stderr: one byte and one descriptor per message
        await _send_fd(control, fd)
    kind, body = await _read_packet(control)
    if kind in (S_FAILURE, S_PERMISSION_DENIED):
        raise MuxError(f"the master refused the session: {parse_reason(body, 4)}")
    if kind != S_SESSION_OPENED or parse_u32s(body, 1)[0] != request_id:
        raise MuxError(f"unexpected answer {kind:#x} from the master")


async def _send_fd(control: socket.socket, fd: int) -> None:
    loop = asyncio.get_running_loop()
    while True:
        try:
            socket.send_fds(control, [b"\0"], [fd])
            return
        except BlockingIOError:
            waiter = loop.create_future()
            loop.add_writer(control, waiter.set_result, None)
            try:
                await waiter
            finally:
                loop.remove_writer(control)
