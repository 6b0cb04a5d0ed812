#!/usr/bin/env python3
"""dev-sync's fast path (the remote agent) over an emulated round trip, beside rsync.

    .venv/bin/python bench/fastpath.py [--quick] [--rtt-ms 40] [--saves 50]

Loopback has no network delay, and this kernel has no netem, so every SSH
connection goes through a small TCP proxy (in a child process) that holds each
chunk for half the round trip in each direction, in order. Behind the proxy
is a private sshd with no shell rc files (dev_sync.sandbox, clean_shell=True).
Measures, each figure beside its rsync-only counterparts from the same run:

1. one saved small file until the remote copy holds it: ``dev-sync up`` with
   the agent, ``dev-sync up`` with ``[sync] agent = false``, and a plain
   ``rsync -a --files-from`` of that file over an open ControlMaster;
2. a burst of small files saved at once (a checkout), until all of them are
   on the remote: the same three;
3. idle cost of a watching ``dev-sync up``, with the agent and without: CPU
   and RSS of the local process tree, and RSS of the agent on the remote.

Reuses bench/run.py (sessions, remote observer, trees, saves, bursts).
Progress goes to stderr, a Markdown table to stdout, and everything measured
to bench/results/fastpath-<time>.json. See bench/README.md.
"""

from __future__ import annotations

import argparse
import asyncio
import bisect
import contextlib
import dataclasses
import functools
import json
import os
import random
import signal
import socket
import statistics
import subprocess
import sys
import time
from collections import Counter, deque
from collections.abc import Awaitable, Callable, Iterator
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

import run as base  # bench/ is not a package: run.py is found on sys.path
import treegen

from dev_sync.sandbox import SandboxInfo, client_config_lines

say = base.say
DELAYED_HOST = "dev-sync-bench-delayed"

# In-flight bytes per direction the proxy holds before it stops reading (a
# receive window of sorts): 8 MB over 20 ms is ~400 MB/s, far above what
# the tools move here, so the link is not what limits them.
IN_FLIGHT_HIGH = 8 << 20
IN_FLIGHT_LOW = 2 << 20
# epoll waits in whole milliseconds, rounded up, so a timer fires up to ~1 ms
# after its time: fire half a millisecond early and write what is due within
# that half millisecond, which centres the error on zero.
EARLY = 0.0005
LATE_LOGGED = 0.002


# --------------------------------------------------------------------------
# the delaying proxy (runs in its own process: the benchmark's event loop
# and its file writes must not hold the forwarded chunks back)


class ProxyStats:
    """How closely the proxy kept its delay: each write's lateness (negative: early)."""

    def __init__(self) -> None:
        self.connections = 0
        self.chunks = 0
        self.bytes = 0
        self.writes = 0
        self.late_max = 0.0
        self.late_min = 0.0
        self.late_sum = 0.0
        self.late_over_1ms = 0
        self.late_over_5ms = 0
        self.holds = 0
        # (wall time, seconds late) of writes more than LATE_LOGGED late, to tell
        # afterwards whether any fell inside a measurement.
        self.late_log: list[tuple[float, float]] = []

    def late(self, seconds: float) -> None:
        self.writes += 1
        self.late_sum += seconds
        self.late_max = max(self.late_max, seconds)
        self.late_min = min(self.late_min, seconds)
        if seconds > 0.001:
            self.late_over_1ms += 1
        if seconds > 0.005:
            self.late_over_5ms += 1
        if seconds > LATE_LOGGED and len(self.late_log) < 20_000:
            self.late_log.append((round(time.time(), 4), round(seconds, 5)))

    def as_dict(self) -> dict[str, Any]:
        return {
            "connections": self.connections, "chunks": self.chunks, "bytes": self.bytes,
            "write_late_ms_max": round(self.late_max * 1000, 3),
            "write_late_ms_min": round(self.late_min * 1000, 3),
            "write_late_ms_mean": round(self.late_sum / self.writes * 1000, 4)
            if self.writes else 0.0,
            "writes_late_over_1ms": self.late_over_1ms,
            "writes_late_over_5ms": self.late_over_5ms,
            "reading_paused": self.holds,
            "nice": os.getpriority(os.PRIO_PROCESS, 0),
            "late_log": self.late_log,
        }


class _End(asyncio.Protocol):
    """One socket of a proxied connection.

    What this end receives is queued on its peer and written there ``delay``
    seconds after it arrived, in arrival order. One timer per end, always for
    the head of its queue (equal deadlines in the loop's heap are not
    guaranteed to run in the order they were scheduled).
    """

    def __init__(self, delay: float, stats: ProxyStats,
                 target: tuple[str, int] | None = None) -> None:
        self.delay = delay
        self.stats = stats
        self.target = target
        self.loop = asyncio.get_running_loop()
        self.transport: asyncio.Transport | None = None
        self.peer: _End | None = None
        self.queue: deque[tuple[float, str, bytes]] = deque()
        self.queued = 0
        self.timer: asyncio.TimerHandle | None = None
        self.holds: set[str] = set()
        self.got_eof = False
        self.sent_eof = False
        self.lost = False
        self._connecting: asyncio.Task[None] | None = None

    # -- asyncio callbacks --------------------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        assert isinstance(transport, asyncio.Transport)
        self.transport = transport
        sock = transport.get_extra_info("socket")
        if sock is not None:
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        if self.target is not None:  # a client: connect to the real server first
            self.hold("connecting")
            self._connecting = self.loop.create_task(self._connect(self.target))

    async def _connect(self, target: tuple[str, int]) -> None:
        up = _End(self.delay, self.stats)
        up.peer, self.peer = self, up
        try:
            await self.loop.create_connection(lambda: up, *target)
        except OSError:
            if self.transport is not None:
                self.transport.close()
            return
        self.stats.connections += 1
        self.release("connecting")

    def data_received(self, data: bytes) -> None:
        self.stats.chunks += 1
        self.stats.bytes += len(data)
        if self.peer is not None:
            self.peer.enqueue("data", data)

    def eof_received(self) -> bool:
        self.got_eof = True
        if self.peer is not None:
            self.peer.enqueue("eof", b"")
        if self.sent_eof and self.transport is not None:
            self.transport.close()
        return True  # half-open: the other direction may still carry data

    def connection_lost(self, exc: Exception | None) -> None:
        self.lost = True
        if self.timer is not None:
            self.timer.cancel()
            self.timer = None
        self.queue.clear()
        if self.peer is not None:
            self.peer.enqueue("close", b"")
            self.peer.release("in flight")
            self.peer.release("buffer")

    def pause_writing(self) -> None:
        if self.peer is not None:
            self.peer.hold("buffer")

    def resume_writing(self) -> None:
        if self.peer is not None:
            self.peer.release("buffer")

    # -- flow ---------------------------------------------------------------

    def hold(self, why: str) -> None:
        if not self.holds and self.transport is not None:
            self.transport.pause_reading()
            self.stats.holds += 1
        self.holds.add(why)

    def release(self, why: str) -> None:
        if why not in self.holds:
            return
        self.holds.discard(why)
        if not self.holds and self.transport is not None and not self.lost:
            self.transport.resume_reading()

    def enqueue(self, kind: str, data: bytes) -> None:
        if self.lost:
            return
        due = self.loop.time() + self.delay
        self.queue.append((due, kind, data))
        self.queued += len(data)
        if self.timer is None:
            self.timer = self.loop.call_at(due - EARLY, self._flush)
        if self.queued > IN_FLIGHT_HIGH and self.peer is not None:
            self.peer.hold("in flight")

    def _flush(self) -> None:
        self.timer = None
        now = self.loop.time()
        transport = self.transport
        while self.queue and self.queue[0][0] <= now + EARLY:
            due, kind, data = self.queue.popleft()
            self.queued -= len(data)
            if transport is None or self.lost:
                continue
            if kind == "data":
                self.stats.late(now - due)
                transport.write(data)
            elif kind == "eof":
                self.sent_eof = True
                if transport.can_write_eof():
                    transport.write_eof()
                if self.got_eof:
                    transport.close()
            else:
                transport.close()
        if self.queue:
            self.timer = self.loop.call_at(self.queue[0][0] - EARLY, self._flush)
        if self.queued < IN_FLIGHT_LOW and self.peer is not None:
            self.peer.release("in flight")


async def _serve_proxy(delay: float, targets: list[int]) -> None:
    loop = asyncio.get_running_loop()
    stats = ProxyStats()
    servers: list[asyncio.Server] = []
    ports: list[int] = []
    for port in targets:
        server = await loop.create_server(functools.partial(
            _End, delay, stats, ("127.0.0.1", port)), "127.0.0.1", 0)
        servers.append(server)
        ports.append(server.sockets[0].getsockname()[1])
    print(json.dumps({"ports": ports}), flush=True)
    stop = asyncio.Event()
    loop.add_signal_handler(signal.SIGTERM, stop.set)
    loop.add_signal_handler(signal.SIGINT, stop.set)
    fd = sys.stdin.fileno()

    def parent_gone() -> None:  # stdin reaches EOF when the benchmark exits, however
        if not os.read(fd, 4096):
            loop.remove_reader(fd)
            stop.set()

    loop.add_reader(fd, parent_gone)
    await stop.wait()
    for server in servers:
        server.close()
    print(json.dumps(stats.as_dict()), flush=True)


def proxy_child(argv: list[str]) -> int:
    delay = float(argv[0])
    # Emulates a network, which does not wait for a CPU: ahead of the tools
    # it carries when the machine is busy (root may raise its priority).
    with contextlib.suppress(OSError):
        os.setpriority(os.PRIO_PROCESS, 0, -10)
    asyncio.run(_serve_proxy(delay, [int(p) for p in argv[1:]]))
    return 0


class DelayProxy:
    """The proxy process: one listening port per target port, each way delayed by rtt/2."""

    def __init__(self, rtt: float, targets: list[int]) -> None:
        self.rtt = rtt
        self.targets = targets
        self.ports: list[int] = []
        self.proc: asyncio.subprocess.Process | None = None
        self.stats: dict[str, Any] = {}

    async def start(self) -> DelayProxy:
        self.proc = await asyncio.create_subprocess_exec(
            sys.executable, str(Path(__file__).resolve()), "--proxy-child",
            repr(self.rtt / 2), *map(str, self.targets),
            stdin=subprocess.PIPE, stdout=subprocess.PIPE, start_new_session=True)
        assert self.proc.stdout is not None
        line = await asyncio.wait_for(self.proc.stdout.readline(), 15)
        if not line:
            raise RuntimeError("the delay proxy did not start")
        self.ports = list(json.loads(line)["ports"])
        return self

    async def stop(self) -> dict[str, Any]:
        proc = self.proc
        if proc is None:
            return self.stats
        self.proc = None
        if proc.returncode is None:
            with contextlib.suppress(ProcessLookupError):
                proc.send_signal(signal.SIGTERM)
        assert proc.stdout is not None
        try:
            out = await asyncio.wait_for(proc.stdout.read(), 5)
            await asyncio.wait_for(proc.wait(), 5)
        except TimeoutError:
            proc.kill()
            await proc.wait()
            return self.stats
        with contextlib.suppress(ValueError, IndexError):
            self.stats = json.loads(out.splitlines()[-1])
        return self.stats


# --------------------------------------------------------------------------
# a local echo/sink server, reached through the proxy to check the link


async def _link_server(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    sock = writer.get_extra_info("socket")
    if sock is not None:
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    try:
        mode = await reader.readexactly(1)
        if mode == b"p":  # ping-pong: echo every byte
            while byte := await reader.read(1):
                writer.write(byte)
        elif mode == b"s":  # sink: read n bytes, answer one byte
            left = int.from_bytes(await reader.readexactly(8), "big")
            while left > 0:
                chunk = await reader.read(min(left, 1 << 20))
                if not chunk:
                    break
                left -= len(chunk)
            writer.write(b"!")
            await writer.drain()
    except (asyncio.IncompleteReadError, ConnectionError):
        pass
    finally:
        writer.close()


async def _open(port: int) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    writer.get_extra_info("socket").setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    return reader, writer


async def ping_pong(port: int, rounds: int) -> list[float]:
    reader, writer = await _open(port)
    out: list[float] = []
    try:
        writer.write(b"p")
        for i in range(rounds + 1):
            t0 = time.perf_counter()
            writer.write(b"x")
            await reader.readexactly(1)
            if i:  # the first one also carried the mode byte
                out.append(time.perf_counter() - t0)
    finally:
        writer.close()
    return out


async def bulk(port: int, size: int) -> float:
    """Seconds from the first byte sent until the sink's one-byte answer."""
    reader, writer = await _open(port)
    block = os.urandom(1 << 18)
    try:
        t0 = time.perf_counter()
        writer.write(b"s" + size.to_bytes(8, "big"))
        sent = 0
        while sent < size:
            writer.write(block[: size - sent])
            sent += min(len(block), size - sent)
            await writer.drain()
        await reader.readexactly(1)
        return time.perf_counter() - t0
    finally:
        writer.close()


# --------------------------------------------------------------------------
# the remote agent process (same machine: found in /proc)


def find_agents(remote_root: Path) -> list[int]:
    """PIDs of python processes started with ``-c`` whose arguments name the root."""
    root = str(remote_root)
    found: list[int] = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            raw = Path(f"/proc/{entry}/cmdline").read_bytes()
        except OSError:
            continue
        args = [a.decode(errors="replace") for a in raw.split(b"\0") if a]
        if args and os.path.basename(args[0]).startswith("python") and "-c" in args \
                and root in args:
            found.append(int(entry))
    return found


def pss_kb(pid: int) -> int:
    """Proportional set size: shared pages split between the processes sharing them."""
    return base.proc_kb(pid, "smaps_rollup", "Pss:")


def attribute(pushes: list[dict[str, Any]], t0s: list[float]) -> dict[str, Any]:
    """Match each save with the pushes that *started* after it (and before the next save).

    run.py's Bench._attribute goes by when a push ended, which hands a slow push
    to the following save. ``t0s`` are perf_counter times; events carry wall
    times (``ts`` at the end, ``ms`` long; both rounded to the millisecond).
    """
    offset = time.time() - time.perf_counter()
    starts = [t + offset for t in t0s]
    mine: list[list[dict[str, Any]]] = [[] for _ in starts]
    overlaps = 0
    prev_end = 0.0
    for e in sorted(pushes, key=lambda e: e["ts"] - e["ms"] / 1000):
        begin = e["ts"] - e["ms"] / 1000
        if begin < prev_end - 0.002:
            overlaps += 1
        prev_end = max(prev_end, e["ts"])
        i = bisect.bisect_right(starts, begin + 0.002) - 1
        if i >= 0:
            mine[i].append(e)
    before = [(m[0]["ts"] - m[0]["ms"] / 1000 - t0) * 1000 for m, t0 in zip(mine, starts,
                                                                             strict=True) if m]
    during = [float(m[0]["ms"]) for m in mine if m]
    out: dict[str, Any] = {
        "pushed_events": len(pushes),
        "saves_with_more_than_one_push": sum(1 for m in mine if len(m) > 1),
        "saves_without_push": sum(1 for m in mine if not m),
        "pushes_started_before_the_previous_ended": overlaps,
    }
    if before:
        out["until_push_start_ms_median"] = round(statistics.median(before), 1)
        out["until_push_start_ms_p99"] = round(base.pct(before, 99), 1)
        out["push_ms_median"] = statistics.median(during)
        out["push_ms_p99"] = base.pct(during, 99)
        out["until_push_start_ms"] = [round(x, 1) for x in before]
        out["push_ms"] = during
    return out


def own_ticks(pid: int) -> int | None:
    row = base._proc_table().get(pid)
    return None if row is None else row[1] + row[2]


# --------------------------------------------------------------------------
# the benchmark


@dataclasses.dataclass
class FastOptions:
    rtt: float
    quick: bool
    saves: int
    spacing: float
    burst_files: int
    burst_rounds: int
    idle_seconds: float
    files: int
    nm_files: int
    seed: int
    remote_base: Path | None
    settle: float = 2.0


def targets_for(o: FastOptions) -> dict[str, float]:
    rtt_ms = o.rtt * 1000
    return {
        "latency_median_ms": rtt_ms / 2 + 15,
        "latency_p99_ms": 2 * rtt_ms,
        "idle_cpu_extra_pp": 0.25,   # percentage points of one core
        "idle_rss_extra_pct": 5.0,   # of the rsync-only session's local RSS
    }


class FastBench(base.Bench):
    """bench/run.py's Bench, pointed at the delayed link, with three contenders."""

    def __init__(self, fo: FastOptions, trees: base.Trees) -> None:
        opts = base.Options(
            quick=fo.quick, saves=fo.saves, spacing=fo.spacing, repeats=1, warmup=False,
            burst_files=fo.burst_files, burst_rounds=fo.burst_rounds,
            idle_seconds=fo.idle_seconds, files=fo.files, idle_files=0, nm_files=fo.nm_files,
            seed=fo.seed, remote_base=fo.remote_base, only={"live"})
        super().__init__(opts, trees)
        self.fo = fo
        self.env["DEV_SYNC_AGENT_CACHE"] = str(self.tmp / "agent-cache" / "agent.py")
        self.proxy: DelayProxy | None = None
        self.direct: SandboxInfo | None = None
        self.link_server: asyncio.Server | None = None
        self.master: base.PlainMaster | None = None
        self.mut = base.Mutations(self.tree)
        self.mutations.append(self.mut)
        self.rel = ""
        self.last_burst_bytes = 0
        # Wall-clock spans of the measurements, to place the proxy's late writes.
        self.windows: list[dict[str, Any]] = []

    @contextlib.contextmanager
    def window(self, label: str) -> Iterator[None]:
        start = time.time()
        try:
            yield
        finally:
            self.windows.append({"label": label, "start": start, "end": time.time()})

    # -- set-up ----------------------------------------------------------------

    async def setup(self) -> None:
        self.start_sandbox()
        assert self.info is not None and self.sandbox is not None
        direct = self.direct = self.info
        self.results["sandbox"] = {"sshd_port": direct.port, "clean_shell": direct.clean_shell}
        self.link_server = await asyncio.start_server(_link_server, "127.0.0.1", 0)
        link_port = self.link_server.sockets[0].getsockname()[1]
        self.proxy = await DelayProxy(self.fo.rtt, [direct.port, link_port]).start()
        ssh_port, self.link_port = self.proxy.ports
        say(f"delay proxy (pid {self.proxy.proc.pid if self.proxy.proc else '?'}): "
            f"127.0.0.1:{ssh_port} -> sshd :{direct.port}, {self.fo.rtt * 500:g} ms each way")
        # The sandbox's known_hosts pins the key to the sshd's own port.
        key_type, key = (self.sandbox.base / "ssh_host_ed25519_key.pub").read_text().split()[:2]
        known = self.tmp / "delayed_known_hosts"
        known.write_text(f"[127.0.0.1]:{ssh_port} {key_type} {key}\n")
        cfg = self.tmp / "delayed_ssh_config"
        lines = client_config_lines(DELAYED_HOST, ssh_port, self.sandbox.base / "id_ed25519",
                                    known)
        cfg.write_text("\n".join(["# bench/fastpath.py: the sandbox behind the delay proxy",
                                  *lines, ""]))
        # Everything Bench does over ssh (configs, plain master, plain rsync)
        # now goes through the proxy.
        self.info = dataclasses.replace(direct, port=ssh_port, ssh_config=cfg,
                                        host=DELAYED_HOST)
        self.master = await self.plain_master()
        self.remotes = {k: self.remote_parent / k for k in ("agent", "rsync", "plain")}

    async def check_link(self) -> None:
        assert self.master is not None and self.info is not None
        rtt_ms = self.fo.rtt * 1000
        pings = await ping_pong(self.link_port, 20)
        size = 32 << 20
        bulk_s = await bulk(self.link_port, size)
        ping_med = statistics.median(pings)
        rate = size / max(bulk_s - ping_med, 1e-6)
        ssh_true: list[float] = []
        argv = [*self.master.base, "-S", str(self.master.control), "-o", "ControlMaster=no",
                self.info.host, "true"]
        for _ in range(7):
            t, code, _, err = await base.run_timed(argv, self.env, 30)
            if code != 0:
                raise RuntimeError(f"ssh over the master failed: {err.decode().strip()}")
            ssh_true.append(t)
        fresh, code, _, _ = await base.run_timed(
            ["ssh", "-F", str(self.info.ssh_config), self.info.host, "true"], self.env, 60)
        # The same over a master straight to the sshd: what ssh costs without any delay.
        direct = self.direct
        assert direct is not None
        direct_master = await base.PlainMaster(direct.ssh_config, direct.host,
                                               self.tmp / "direct-master.sock").start()
        self.masters.append(direct_master)
        direct_true: list[float] = []
        for _ in range(7):
            t, _, _, _ = await base.run_timed(
                [*direct_master.base, "-S", str(direct_master.control), "-o",
                 "ControlMaster=no", direct.host, "true"], self.env, 30)
            direct_true.append(t)
        await direct_master.stop()
        self.masters.remove(direct_master)
        self.link_rate = rate
        self.results["link"] = {
            "rtt_ms_set": rtt_ms,
            "ping_pong_ms": [base.ms(x) for x in pings],
            "ping_pong_ms_median": base.ms(ping_med),
            "ping_pong_ms_max": base.ms(max(pings)),
            "bulk_bytes": size, "bulk_s": round(bulk_s, 4),
            "bulk_mb_per_s": round(rate / 1e6, 1),
            "ssh_master_true_ms": [base.ms(x) for x in ssh_true],
            "ssh_master_true_ms_median": base.ms(statistics.median(ssh_true)),
            "ssh_new_connection_true_ms": base.ms(fresh),
            "ssh_master_true_ms_no_delay": [base.ms(x) for x in direct_true],
            "ssh_master_true_ms_no_delay_median": base.ms(statistics.median(direct_true)),
        }
        say(f"link check: ping-pong through the proxy median {base.ms(ping_med)} ms "
            f"(max {base.ms(max(pings))}, set {rtt_ms:g}); "
            f"`ssh -S <master> host true` median {base.ms(statistics.median(ssh_true))} ms "
            f"(runs {[base.ms(x) for x in ssh_true]}; without the proxy "
            f"{base.ms(statistics.median(direct_true))} ms); a new ssh connection "
            f"{base.ms(fresh)} ms; bulk {rate / 1e6:.0f} MB/s ({size >> 20} MB in "
            f"{bulk_s * 1000:.0f} ms, a lower bound: both ends run in this process)")
        if abs(ping_med * 1000 - rtt_ms) > max(3.0, rtt_ms * 0.1):
            self.note(f"ping-pong through the proxy took {base.ms(ping_med)} ms, "
                      f"not ~{rtt_ms:g} ms")

    def prepare_tree_state(self) -> None:
        self._listing = base.tree_listing(self.tree)
        self._pool = treegen.TextPool(random.Random(self.o.seed + 99), target=400_000)
        self.rel = self._pick_latency_file()
        self.mut.remember([self.rel])
        self.results["latency_file"] = {"path": self.rel,
                                        "bytes": len(self.mut.original(self.rel))}
        say(f"saved file: {self.rel} ({len(self.mut.original(self.rel)):,} bytes)")

    def write_session_config(self, key: str, remote: Path, agent: bool) -> Path:
        assert self.info is not None
        cfg = self.tree / f"dev-sync-bench-{key}.toml"
        cfg.write_text(
            "# written by bench/fastpath.py\n"
            "[remote]\n"
            f"host = {json.dumps(self.info.host)}\n"
            f"path = {json.dumps(str(remote))}\n"
            f"ssh_config = {json.dumps(str(self.info.ssh_config))}\n\n"
            "[sync]\n"
            'exclude = ["node_modules/", ".git/"]\n'
            f"agent = {'true' if agent else 'false'}\n\n"
            "[deps]\n"
            "enabled = false\n"
        )
        self.configs.append(cfg)
        return cfg

    def _apply(self, plan: dict[str, bytes]) -> None:
        self.last_burst_bytes = sum(len(d) for d in plan.values())
        super()._apply(plan)

    # -- measurements ----------------------------------------------------------

    async def idle_cost(self, session: base.Session, remote: Path | None) -> dict[str, Any]:
        """CPU and RSS of the session's local process tree (and the remote agent)."""
        agents = find_agents(remote) if remote is not None else []
        if remote is not None and len(agents) != 1:
            self.note(f"{session.label}: {len(agents)} agent processes found for {remote}")
        agent = agents[0] if agents else None
        since = len(session.events)
        first = base.sample_tree(session.pid)
        samples = [first]
        pss = [sum(pss_kb(p) for p in first.pids)]
        names = {p: base._cmd(p) for p in first.pids}
        peak_by_pid = dict(first.rss_by_pid)
        agent_t0 = own_ticks(agent) if agent else None
        agent_rss = [base._rss_kb(agent)] if agent else []
        end = first.t + self.fo.idle_seconds
        while time.monotonic() < end:
            await asyncio.sleep(min(1.0, max(0.0, end - time.monotonic())))
            s = base.sample_tree(session.pid)
            samples.append(s)
            pss.append(sum(pss_kb(p) for p in s.pids))
            for p, v in s.rss_by_pid.items():
                peak_by_pid[p] = max(peak_by_pid.get(p, 0), v)
                names.setdefault(p, base._cmd(p))
            if agent:
                agent_rss.append(base._rss_kb(agent))
        last = samples[-1]
        elapsed = last.t - first.t
        agent_t1 = own_ticks(agent) if agent else None
        out: dict[str, Any] = {
            "seconds": round(elapsed, 1),
            "cpu_ticks": last.ticks - first.ticks, "clock_ticks_per_s": base.CLK_TCK,
            "cpu_pct": round((last.ticks - first.ticks) / base.CLK_TCK / elapsed * 100, 3),
            "rss_mb_max": round(max(s.rss_kb for s in samples) / 1024, 1),
            "pss_mb_max": round(max(pss) / 1024, 1),
            "dev_sync_rss_mb_max": round(peak_by_pid.get(session.pid, 0) / 1024, 1),
            "rss_mb_by_process": {f"{p} {names.get(p, '?')[:70]}": round(v / 1024, 1)
                                  for p, v in peak_by_pid.items()},
            "processes": len(last.pids),
            "events_while_idle": [e["event"] for e in session.events[since:]],
            "loadavg": Path("/proc/loadavg").read_text().split()[:3],
        }
        if agent is not None:
            out["agent_pid"] = agent
            out["agent_cmd"] = base._cmd(agent)[:100]
            out["agent_rss_mb_max"] = round(max(agent_rss) / 1024, 1)
            if agent_t0 is not None and agent_t1 is not None:
                out["agent_cpu_ticks"] = agent_t1 - agent_t0
                out["agent_cpu_pct"] = round((agent_t1 - agent_t0) / base.CLK_TCK / elapsed
                                             * 100, 3)
        say(f"  {session.label}: idle {out['cpu_pct']:.2f}% of one core, max RSS "
            f"{out['rss_mb_max']} MB over {out['processes']} local processes"
            + (f"; remote agent RSS {out.get('agent_rss_mb_max')} MB, "
               f"CPU {out.get('agent_cpu_pct')}%" if agent else ""))
        if out["events_while_idle"]:
            self.note(f"{session.label}: events while idle: {out['events_while_idle'][:10]}")
        return out

    async def latency(self, who: str, remote: Path, session: base.Session | None,
                      push: base.Push | None) -> dict[str, Any]:
        since = len(session.events) if session is not None else 0
        with self.window(f"{who}: saves"):
            lat = await self._save_loop(who, remote, self.rel, self.mut, push)
        if session is not None:
            await asyncio.sleep(0.5)  # a trailing pushed event
            pushes = session.of_kind("pushed", since)
            lat.update(attribute(pushes, lat["t0"]))
            if lat["saves_with_more_than_one_push"] or lat["saves_without_push"]:
                self.note(f"{who}: {lat['saves_with_more_than_one_push']} saves pushed more "
                          f"than once, {lat['saves_without_push']} without a push of their own")
            if lat["pushes_started_before_the_previous_ended"]:
                self.note(f"{who}: {lat['pushes_started_before_the_previous_ended']} pushes "
                          "started before the previous one had ended (saves too close)")
            lat["via"] = dict(Counter(str(e.get("via")) for e in pushes))
            lat["pushed_files"] = sum(int(e.get("files", 0)) for e in pushes)
        lat.pop("t0", None)
        lat["loadavg"] = Path("/proc/loadavg").read_text().split()[:3]
        s = lat["summary_ms"]
        extra = ""
        if session is not None:
            extra = (f"; pushed via {lat['via']}; medians: push began "
                     f"{lat.get('until_push_start_ms_median')} ms after the write, took "
                     f"{lat.get('push_ms_median')} ms")
        else:
            exits = lat["rsync_exit_ms"]
            extra = f"; rsync exited after {statistics.median(exits) if exits else '-'} ms"
        say(f"  {who}: save-to-visible median {s.get('median')} ms, p90 {s.get('p90')}, "
            f"p99 {s.get('p99')}, max {s.get('max')}{extra}")
        return lat

    async def bursts(self, who: str, key: str, remote: Path, session: base.Session | None,
                     push: base.Push | None) -> list[dict[str, Any]]:
        out: list[dict[str, Any]] = []
        for r in range(self.fo.burst_rounds):
            await asyncio.sleep(1.0)
            since = len(session.events) if session is not None else 0
            with self.window(f"{who}: burst {r + 1}"):
                b = await self._burst(who, remote, f"{key}{r}", self.mut, push)
            b["bytes"] = self.last_burst_bytes
            b["loadavg"] = Path("/proc/loadavg").read_text().split()[:3]
            if session is not None:
                await asyncio.sleep(1.0)  # trailing pushed events
                pushes = [e for e in session.of_kind("pushed", since) if e["ts"] >= b["wall0"]]
                b["pushed_events"] = len(pushes)
                b["pushed_files"] = sum(int(e.get("files", 0)) for e in pushes)
                b["pushed_bytes"] = sum(int(e.get("bytes", 0)) for e in pushes)
                b["pushed_ms"] = [e.get("ms") for e in pushes]
                b["pushed_files_each"] = [e.get("files") for e in pushes]
                written = b["wall0"] + b["write_s"]
                # Push start and end, ms after the last file was written.
                b["pushes_after_last_write_ms"] = [
                    (round((e["ts"] - e["ms"] / 1000 - written) * 1000),
                     round((e["ts"] - written) * 1000)) for e in pushes]
                b["via"] = [str(e.get("via")) for e in pushes]
                b["reconciles"] = len(session.of_kind("reconciled", since))
                b["problems"] = [e.get("cause") for e in session.of_kind("problem", since)]
                if b["reconciles"]:
                    self.note(f"{who} burst {r + 1}: {b['reconciles']} full reconcile(s)")
            detail = (f"; {b['pushed_events']} pushed events via {b['via']}, start/end ms after "
                      f"the last write {b['pushes_after_last_write_ms']}"
                      if session is not None else
                      f"; rsync exited at {b['rsync_exit_s'] * 1000:.0f} ms")
            say(f"  {who} burst {r + 1}: {b['seconds'] * 1000:.0f} ms until all {b['files']} "
                f"files ({b['bytes'] / 1e6:.2f} MB) were on the remote (writing took "
                f"{b['write_s'] * 1000:.0f} ms, then {b['after_last_write_s'] * 1000:.0f} ms)"
                + detail)
            out.append(b)
        return out

    async def session_phase(self, key: str, agent: bool) -> None:
        label = "agent" if agent else "rsync-only"
        remote = self.remotes[key]
        say(f"[{label}] dev-sync up --json, [sync] agent = {'true' if agent else 'false'}")
        cfg = self.write_session_config(key, remote, agent)
        started = time.perf_counter()
        session = await self.start_session(cfg, f"dev-sync ({label})", timeout=600)
        res: dict[str, Any] = {"watching_after_s": round(time.perf_counter() - started, 2)}
        self.results[key] = res
        rec = session.of_kind("reconciled")
        res["reconciled"] = rec[-1] if rec else None
        if agent:
            ready = await session.wait_for("agent_ready", 60)
            res["agent_ready"] = {k: v for k, v in ready.items() if k != "_t"}
            say(f"  agent ready: {res['agent_ready']}")
        elif session.of_kind("agent_ready"):
            self.note("the rsync-only session reported agent_ready")
        await asyncio.sleep(self.fo.settle)
        with self.window(f"{key}: idle"):
            res["idle"] = await self.idle_cost(session, remote if agent else None)
        res["latency"] = await self.latency(f"dev-sync ({label})", remote, session, None)
        via = res["latency"].get("via", {})
        expected = "agent" if agent else "rsync"
        others = {k: v for k, v in via.items() if k != expected}
        if others:
            self.note(f"dev-sync ({label}): of the latency loop's pushes, {others} went "
                      f"other than via {expected!r}")
        res["burst"] = await self.bursts(f"dev-sync ({label})", key[0], remote, session, None)
        await self.stop_session(session)

    async def push_plain(self, paths: str | list[str]) -> asyncio.subprocess.Process:
        assert self.master is not None and self.info is not None
        listed = [paths] if isinstance(paths, str) else paths
        proc = await asyncio.create_subprocess_exec(
            "rsync", "-a", "--files-from=-", "--from0", "-e", self.master.rsh,
            f"{self.tree}/", f"{self.info.host}:{self.remotes['plain']}/",
            stdin=subprocess.PIPE, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
        assert proc.stdin is not None
        proc.stdin.write(b"".join(os.fsencode(p) + b"\0" for p in listed))
        proc.stdin.close()
        return proc

    async def plain_phase(self) -> None:
        say("[plain rsync] rsync -a --files-from over an open ControlMaster")
        remote = self.remotes["plain"]
        t = await self._run_plain_full(remote)
        say(f"  plain copy made in {t:.1f}s (its own ssh connection, through the proxy)")
        res: dict[str, Any] = {"initial_copy_s": round(t, 2)}
        self.results["plain"] = res
        res["latency"] = await self.latency("plain rsync", remote, None, self.push_plain)
        res["burst"] = await self.bursts("plain rsync", "p", remote, None, self.push_plain)

    async def run_all(self) -> None:
        phases: list[tuple[str, Callable[[], Awaitable[None]]]] = [
            ("agent", lambda: self.session_phase("agent", True)),
            ("rsync", lambda: self.session_phase("rsync", False)),
            ("plain", self.plain_phase),
        ]
        for name, phase in phases:
            try:
                await phase()
            except asyncio.CancelledError:
                raise
            except Exception as exc:
                self.results.setdefault("errors", {})[name] = f"{type(exc).__name__}: {exc}"
                self.note(f"{name} failed: {type(exc).__name__}: {exc}")
                for s in list(self.sessions):
                    await self.stop_session(s)

    async def teardown(self) -> None:
        try:
            await super().teardown()
        finally:
            if self.proxy is not None:
                self.results["proxy"] = await self.proxy.stop()
            if self.link_server is not None:
                self.link_server.close()


# --------------------------------------------------------------------------
# report


def _med(values: list[float]) -> float | None:
    return statistics.median(values) if values else None


def _fmt_ms(v: float | None) -> str:
    return "-" if v is None else f"{v:.0f} ms" if v >= 100 else f"{v:.1f} ms"


def _yes(ok: bool | None) -> str:
    return "-" if ok is None else "yes" if ok else "**no**"


def burst_figures(res: dict[str, Any]) -> dict[str, Any]:
    """Medians over a contender's burst rounds (empty if it did not run)."""
    bursts = (res or {}).get("burst") or []
    if not bursts:
        return {}
    return {
        "total_ms": _med([b["seconds"] * 1000 for b in bursts]),
        "after_write_ms": _med([b["after_last_write_s"] * 1000 for b in bursts]),
        "write_ms": _med([b["write_s"] * 1000 for b in bursts]),
        "bytes": bursts[0]["bytes"], "files": bursts[0]["files"],
        "pushes": _med([float(b.get("pushed_events", 1)) for b in bursts]),
        "via": sorted({v for b in bursts for v in b.get("via", [])}),
    }


def verdicts(results: dict[str, Any], fo: FastOptions) -> dict[str, Any]:
    t = targets_for(fo)
    a, r, p = (results.get(k) or {} for k in ("agent", "rsync", "plain"))
    out: dict[str, Any] = {"targets": t}
    la = (a.get("latency") or {}).get("summary_ms", {})
    if la.get("n"):
        out["latency_median"] = la["median"] <= t["latency_median_ms"]
        out["latency_p99"] = la["p99"] <= t["latency_p99_ms"]
    ba, bp = burst_figures(a), burst_figures(p)
    if ba:
        rtt_ms = results.get("link", {}).get("ping_pong_ms_median", fo.rtt * 1000)
        rate = results.get("link", {}).get("bulk_mb_per_s")
        transfer_ms = ba["bytes"] / (rate * 1e6) * 1000 if rate else 0.0
        out["burst_limit_ms"] = rtt_ms + transfer_ms
        out["burst_transfer_ms_at_link_speed"] = round(transfer_ms, 1)
        out["burst_within_rtt"] = ba["after_write_ms"] <= out["burst_limit_ms"]
        if bp:
            out["burst_faster_than_plain"] = ba["total_ms"] < bp["total_ms"]
    ia, ir = a.get("idle"), r.get("idle")
    if ia and ir:
        out["idle_cpu"] = ia["cpu_pct"] <= ir["cpu_pct"] + t["idle_cpu_extra_pp"]
        out["idle_rss"] = ia["rss_mb_max"] <= ir["rss_mb_max"] * (1 + t["idle_rss_extra_pct"]
                                                                  / 100)
    return out


def markdown(results: dict[str, Any], fo: FastOptions) -> str:
    v = results.get("verdicts", {})
    t = v.get("targets", targets_for(fo))
    a, r, p = (results.get(k) or {} for k in ("agent", "rsync", "plain"))
    rows: list[tuple[str, ...]] = []
    sums = [(x.get("latency") or {}).get("summary_ms", {}) for x in (a, r, p)]
    n = max((s.get("n", 0) for s in sums), default=0)
    for key, target, verdict in (("median", f"<= {t['latency_median_ms']:g} ms",
                                  "latency_median"),
                                 ("p90", "", None),
                                 ("p99", f"<= {t['latency_p99_ms']:g} ms", "latency_p99"),
                                 ("max", "", None)):
        rows.append((f"Save to visible, one small file: {key} (N={n})",
                     *(_fmt_ms(s.get(key)) for s in sums), target,
                     _yes(v.get(verdict)) if verdict else ""))
    la, lr = a.get("latency") or {}, r.get("latency") or {}
    if la or lr:
        rows.append(("of which: until the push began (median)",
                     _fmt_ms(la.get("until_push_start_ms_median")),
                     _fmt_ms(lr.get("until_push_start_ms_median")), "-", "", ""))
        via = la.get("via", {})
        total = sum(via.values())
        share = f"{via.get('agent', 0)}/{total} via agent" if total else "-"
        rows.append(("Pushes of those saves", share,
                     f"{sum(lr.get('via', {}).values())} via rsync" if lr else "-",
                     f"{n} rsync runs" if p.get("latency") else "-", "all via agent",
                     _yes(bool(total) and via.get("agent", 0) == total) if total else "-"))
    bs = [burst_figures(x) for x in (a, r, p)]
    if any(bs):
        ref = next(b for b in bs if b)
        rounds = len(a.get("burst") or r.get("burst") or p.get("burst") or [])
        rows.append((f"Burst of {ref['files']} small files ({ref['bytes'] / 1e6:.2f} MB), "
                     f"first write until all on the remote (median of {rounds})",
                     *(_fmt_ms(b.get("total_ms")) for b in bs), "agent < plain rsync",
                     _yes(v.get("burst_faster_than_plain"))))
        rows.append(("Burst: of which after the last file was written",
                     *(_fmt_ms(b.get("after_write_ms")) for b in bs),
                     f"agent <= 1 RTT + transfer = {v.get('burst_limit_ms', 0):.0f} ms"
                     if "burst_limit_ms" in v else "",
                     _yes(v.get("burst_within_rtt"))))
        rows.append(("Burst: writing the files locally took (part of the first row)",
                     *(_fmt_ms(b.get("write_ms")) for b in bs), "", ""))
        rows.append(("Burst: transfers (pushed events; via)",
                     *(f"{b['pushes']:g} ({', '.join(b['via'])})" if b and b.get("via")
                       else ("1 rsync run" if b else "-") for b in bs), "", ""))
    ia, ir = a.get("idle"), r.get("idle")
    if ia or ir:
        secs = (ia or ir or {}).get("seconds", 0)

        def cpu(x: dict[str, Any] | None) -> str:
            if not x:
                return "-"
            if x["cpu_ticks"] == 0:
                return f"< {100 / (x['clock_ticks_per_s'] * x['seconds']):.2f} %"
            return f"{x['cpu_pct']:.2f} %"

        rows.append((f"Idle CPU, local process tree ({secs:.0f} s, % of one core)",
                     cpu(ia), cpu(ir), "-",
                     f"<= rsync-only + {t['idle_cpu_extra_pp']:g} pp", _yes(v.get("idle_cpu"))))
        rows.append(("Idle memory, local process tree (max RSS sum)",
                     f"{ia['rss_mb_max']:.1f} MB ({ia['processes']} proc.)" if ia else "-",
                     f"{ir['rss_mb_max']:.1f} MB ({ir['processes']} proc.)" if ir else "-",
                     "-", f"<= rsync-only + {t['idle_rss_extra_pct']:g} %",
                     _yes(v.get("idle_rss"))))
        rows.append(("of which the dev-sync process (RSS)",
                     f"{ia['dev_sync_rss_mb_max']:.1f} MB" if ia else "-",
                     f"{ir['dev_sync_rss_mb_max']:.1f} MB" if ir else "-", "-", "", ""))
        rows.append(("Idle memory, local process tree (max PSS sum: shared pages split)",
                     f"{ia['pss_mb_max']:.1f} MB" if ia else "-",
                     f"{ir['pss_mb_max']:.1f} MB" if ir else "-", "-", "", ""))
        if ia and "agent_rss_mb_max" in ia:
            rows.append(("Idle, the agent on the remote: RSS / CPU",
                         f"{ia['agent_rss_mb_max']:.1f} MB / {ia.get('agent_cpu_pct', 0):.2f} %",
                         "no agent", "-", "(new process: reported)", ""))
    head = ("Figure", "agent", "rsync-only dev-sync", "plain rsync", "target", "met?")
    lines = ["| " + " | ".join(head) + " |", "|---|---:|---:|---:|---|---|"]
    lines += ["| " + " | ".join(row) + " |" for row in rows]
    m = results["machine"]
    link = results.get("link", {})
    proxy = results.get("proxy") or {}
    spans = proxy.get("late_writes_during_measurements", [])
    notes = [
        "",
        f"Emulated RTT {fo.rtt * 1000:g} ms: a TCP proxy holds every chunk {fo.rtt * 500:g} ms "
        f"each way (measured: ping-pong {link.get('ping_pong_ms_median', '?')} ms median, "
        f"`ssh -S <master> host true` {link.get('ssh_master_true_ms_median', '?')} ms "
        f"({link.get('ssh_master_true_ms_no_delay_median', '?')} ms without the proxy), "
        f"a new ssh connection {link.get('ssh_new_connection_true_ms', '?')} ms). "
        f"The link is not bandwidth-limited (bulk through the proxy "
        f"{link.get('bulk_mb_per_s', '?')} MB/s, a lower bound), so transfer time is small "
        "beside the RTT.",
        f"Private sshd with no shell rc files, on {m['cores']} cores ({m['cpu']}), Linux "
        f"{m['kernel']}, rsync {m['rsync_version']}, {m['ssh'].split(',')[0]}; dev-sync "
        f"{m['dev_sync']} ({m['commit']}). Tree of {results.get('tree', {}).get('files', '?'):,} "
        "files; remote copies on tmpfs. Load average at start "
        f"{' '.join(m['loadavg_at_start'])}, at the end {' '.join(results.get('loadavg_end', []))}"
        " (other work shares the machine).",
        f"The proxy's writes were {proxy.get('write_late_ms_mean', '?')} ms late on average "
        f"(priority {proxy.get('nice', '?')}); during the measurements "
        f"{sum(w['late_writes'] for w in spans)} writes were more than "
        f"{LATE_LOGGED * 1000:g} ms late, the worst by "
        f"{max((w['late_ms_max'] for w in spans), default=0):.1f} ms.",
        "Plain rsync: `rsync -a --files-from` of the saved file(s) over an already open "
        "ControlMaster, started right after the write; no session running meanwhile.",
    ]
    if results.get("errors"):
        notes.append("Failed: " + "; ".join(f"{k}: {e}" for k, e in results["errors"].items()))
    return "\n".join(lines + notes)


# --------------------------------------------------------------------------
# driver


def parse_args(argv: list[str] | None) -> FastOptions:
    ap = argparse.ArgumentParser(
        description="dev-sync's fast path vs rsync over an emulated round trip.")
    ap.add_argument("--rtt-ms", type=float, default=40.0, help="emulated round trip (40)")
    ap.add_argument("--quick", action="store_true",
                    help="15 saves, one burst round, 5 s idle")
    ap.add_argument("--saves", type=int, help="saves per contender (50; --quick 15)")
    ap.add_argument("--spacing-ms", type=float, default=500.0,
                    help="time between saves (500: a push over rsync takes ~9 RTT, and a save "
                         "must not wait for the previous one's)")
    ap.add_argument("--burst-files", type=int, default=500)
    ap.add_argument("--burst-rounds", type=int, help="5; --quick 1")
    ap.add_argument("--idle-seconds", type=float, help="20; --quick 5")
    ap.add_argument("--files", type=int, default=5_000, help="files outside node_modules")
    ap.add_argument("--nm-files", type=int, default=2_000, help="files in node_modules")
    ap.add_argument("--seed", type=int, default=1)
    ap.add_argument("--remote-base", type=Path, default=None,
                    help="where the remote copies go (default /dev/shm)")
    a = ap.parse_args(argv)
    q = a.quick
    return FastOptions(
        rtt=a.rtt_ms / 1000, quick=q, saves=a.saves or (15 if q else 50),
        spacing=a.spacing_ms / 1000, burst_files=a.burst_files,
        burst_rounds=a.burst_rounds or (1 if q else 5),
        idle_seconds=a.idle_seconds or (5.0 if q else 20.0),
        files=a.files, nm_files=a.nm_files, seed=a.seed, remote_base=a.remote_base)


def late_in_windows(results: dict[str, Any], bench: FastBench) -> None:
    """Which measurements the proxy's late writes (> LATE_LOGGED) fell into."""
    proxy = results.get("proxy") or {}
    log: list[list[float]] = proxy.pop("late_log", [])
    proxy["writes_logged_late"] = len(log)
    spans = []
    worst: list[str] = []
    for w in bench.windows:
        hits = [late for t, late in log if w["start"] <= t <= w["end"]]
        spans.append({"label": w["label"], "seconds": round(w["end"] - w["start"], 2),
                      "late_writes": len(hits),
                      "late_ms_max": round(max(hits) * 1000, 2) if hits else 0.0})
        if hits and max(hits) > 0.005:
            worst.append(f"{w['label']} ({len(hits)}, max {max(hits) * 1000:.1f} ms)")
    if worst:
        bench.note(f"the proxy wrote chunks more than {LATE_LOGGED * 1000:g} ms late (some "
                   "over 5 ms) during: " + "; ".join(worst))
    proxy["late_writes_during_measurements"] = spans
    outside = len(log) - sum(s["late_writes"] for s in spans)
    if outside:
        say(f"the proxy wrote {outside} chunks more than {LATE_LOGGED * 1000:g} ms late outside "
            f"the measurements (set-up, initial copies, bulk check; max "
            f"{proxy.get('write_late_ms_max')} ms overall)")


async def amain(fo: FastOptions, trees: base.Trees) -> int:
    bench = FastBench(fo, trees)
    results = bench.results
    results["machine"] = base.machine()
    results["options"] = {k: str(v) if isinstance(v, Path) else v
                          for k, v in dataclasses.asdict(fo).items()}
    results["started"] = time.strftime("%Y-%m-%dT%H:%M:%S%z")
    results["tree"] = {"name": bench.tree.name, **dataclasses.asdict(bench.tree_stats)}
    loop = asyncio.get_running_loop()
    me = asyncio.current_task()
    assert me is not None
    loop.add_signal_handler(signal.SIGTERM, me.cancel)
    try:
        await bench.setup()
        await bench.check_link()
        bench.prepare_tree_state()
        await bench.run_all()
    except Exception as exc:
        results.setdefault("errors", {})["setup"] = f"{type(exc).__name__}: {exc}"
        bench.note(f"set-up failed: {type(exc).__name__}: {exc}")
    finally:
        results["loadavg_end"] = Path("/proc/loadavg").read_text().split()[:3]
        await bench.teardown()
    late_in_windows(results, bench)
    results["verdicts"] = verdicts(results, fo)
    base.save_results(results, bench.anomalies, base.T_START, "fastpath-", fo.quick)
    print(markdown(results, fo))
    return 1 if results.get("errors") else 0


def main(argv: list[str] | None = None) -> int:
    args = sys.argv[1:] if argv is None else argv
    if args[:1] == ["--proxy-child"]:
        return proxy_child(args[1:])
    fo = parse_args(args)
    try:
        spec = treegen.TreeSpec(fo.files, fo.nm_files, fo.seed)
        tree, stats, reused = treegen.ensure_tree(base.WORK / "trees", spec, log=say)
        say(f"tree {tree.name}: {stats.files:,} files ({stats.bytes / 1e6:.0f} MB), "
            f"+{stats.nm_files:,} in node_modules" + (" (reused)" if reused else ""))
        return asyncio.run(amain(fo, base.Trees(tree, stats)))
    except (KeyboardInterrupt, asyncio.CancelledError):
        say("interrupted")
        return 130


if __name__ == "__main__":
    sys.exit(main())
