"""Sessions opened on a real OpenSSH master through its control socket."""

from __future__ import annotations

import asyncio
import os
import uuid
from collections.abc import AsyncIterator
from pathlib import Path

import pytest
from helpers import children, processes, wait_until

from dev_sync import mux, runner
from dev_sync.sandbox import SandboxInfo
from dev_sync.ssh import SshMaster, Target


@pytest.fixture
async def master(sandbox: SandboxInfo) -> AsyncIterator[SshMaster]:
    target = Target(sandbox.host, None, None, sandbox.ssh_config, 10.0)
    m = SshMaster(target)
    await m.connect()
    try:
        yield m
    finally:
        await m.close()


def _remote_pids(marker: str) -> list[int]:
    return processes(lambda args: marker.encode() in args)


def _ssh_children() -> list[int]:
    """This process's ssh children: a direct session must add none."""
    return [pid for pid, name, _ in children(os.getpid()) if name == "ssh"]


async def test_streams_exit_status_and_hostile_arguments(master: SshMaster) -> None:
    before = _ssh_children()
    name = "-e $(touch pwned) ; `id` 'q' \"d\" \\ \n ünï"
    session = await mux.open_session(master.control_path, runner.remote_command(
        ["sh", "-c", 'printf "%s" "$1"; cat; echo err >&2; exit 7', "sh", name]))
    assert _ssh_children() == before
    assert session.stdin is not None
    session.stdin.write(b"in \x00 put")
    await session.stdin.drain()
    session.stdin.write_eof()
    assert await session.stdout.read() == name.encode() + b"in \x00 put"
    assert await session.stderr.read() == b"err\n"
    assert await session.wait() == 7 and session.returncode == 7
    missing = await mux.open_session(master.control_path,
                                     runner.remote_command(["no-such-program-here"]))
    assert "no-such-program-here" in (await missing.stderr.read()).decode()
    assert await missing.wait() == 127


async def test_many_sessions_side_by_side(master: SshMaster) -> None:
    sessions = await asyncio.gather(*(
        mux.open_session(master.control_path, runner.remote_command(["echo", str(i)]))
        for i in range(8)))
    outs = await asyncio.gather(*(s.stdout.read() for s in sessions))
    assert outs == [f"{i}\n".encode() for i in range(8)]
    assert await asyncio.gather(*(s.wait() for s in sessions)) == [0] * 8


async def test_terminate_ends_the_remote_command(master: SshMaster) -> None:
    marker = f"mux-{uuid.uuid4().hex}"
    session = await mux.open_session(master.control_path, runner.remote_command(
        ["sh", "-c", "cat; echo never", marker]))
    await asyncio.to_thread(wait_until, lambda: _remote_pids(marker))
    session.terminate()
    assert await session.wait() != 0
    await asyncio.to_thread(wait_until, lambda: not _remote_pids(marker),
                            message="the remote command outlived its session")


async def test_the_master_going_away_reads_as_a_lost_connection(master: SshMaster) -> None:
    session = await mux.open_session(master.control_path, runner.remote_command(["cat"]))
    await master.close()
    assert await asyncio.wait_for(session.wait(), 10) == 255
    assert await session.stdout.read() == b""


async def test_anything_but_a_master_is_refused(tmp_path: Path) -> None:
    with pytest.raises(mux.MuxError, match="control socket"):
        await mux.open_session(tmp_path / "nothing.sock", "true")
    # Something listening that does not speak the protocol.
    path = tmp_path / "other.sock"
    server = await asyncio.start_unix_server(_say_nonsense, path=str(path))
    async with server:
        with pytest.raises(mux.MuxError):
            await mux.open_session(path, "true")


async def _say_nonsense(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    writer.write(b"\x00\x00\x00\x08\x00\x00\x00\x01\x00\x00\x00\x03")  # hello, version 3
    await writer.drain()
    await reader.read(100)
    writer.close()


def test_messages_are_as_openssh_reads_them() -> None:
    request = mux.new_session_request(5, "echo hi")
    length = int.from_bytes(request[:4], "big")
    assert length == len(request) - 4
    body = request[4:]
    assert body[:8] == (0x10000002).to_bytes(4, "big") + (5).to_bytes(4, "big")
    assert body.endswith((7).to_bytes(4, "big") + b"echo hi")
    assert mux.parse_reason(b"\x00\x00\x00\x01\x00\x00\x00\x03why", 4) == "why"
    with pytest.raises(mux.MuxError):
        mux.parse_u32s(b"\x00", 1)
