#!/usr/bin/env python3
"""dev-sync benchmark: each figure beside plain rsync's, measured in the same run.

    .venv/bin/python bench/run.py [--quick]

Starts everything it needs itself: a private sshd on 127.0.0.1 whose sessions
do not read shell rc files (dev_sync.sandbox, clean_shell=True), synthetic
trees under /var/tmp/dev-sync-bench/ (reused between runs), and dev-sync
sessions with their state in a temporary folder. Measures

1. initial sync of a 20k-file tree: ``dev-sync up --once`` vs one plain
   ``rsync -a --exclude node_modules/ --exclude .git/`` (one untimed run of each, then
   the median of 5);
2. save-to-visible latency: one file saved N times while ``dev-sync up`` runs,
   until the remote copy has the new content (seen with inotify on the remote
   folder, then read back), vs a plain ``rsync --files-from`` of that file
   over an open ControlMaster;
3. a 2,000-file burst (git-checkout-like) until all of it is on the remote,
   vs one plain ``rsync --files-from`` of the same files over the master;
4. idle cost of ``dev-sync up`` watching a 100k-file tree: CPU and RSS of the
   process tree.

Progress goes to stderr; a Markdown table goes to stdout and everything
measured to bench/results/<time>.json. See bench/README.md.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import hashlib
import itertools
import json
import math
import os
import platform
import posixpath
import random
import re
import select
import shlex
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Awaitable, Callable, Iterable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import treegen

from dev_sync import __version__ as DEV_SYNC_VERSION
from dev_sync.sandbox import Sandbox, SandboxInfo

# Starts a plain rsync of the given relative path(s); the benchmark waits for it.
Push = Callable[[str | list[str]], Awaitable[asyncio.subprocess.Process]]

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
WORK = Path("/var/tmp/dev-sync-bench")
CLK_TCK = os.sysconf("SC_CLK_TCK")
T_START = time.monotonic()

# Targets from the project brief: (figure, limit, how it compares).
TARGETS = {
    "initial_ratio": 1.15,
    "latency_median_ms": 50.0,
    "latency_p99_ms": 100.0,
    "burst_ratio": 1.5,
    "idle_cpu_pct": 1.0,
    "idle_rss_mb": 80.0,
}


def say(msg: str) -> None:
    print(f"[{time.monotonic() - T_START:7.1f}s] {msg}", file=sys.stderr, flush=True)


# --------------------------------------------------------------------------
# small helpers


def pct(values: list[float], p: float) -> float:
    """Nearest-rank percentile (p in 0..100) of a non-empty list."""
    s = sorted(values)
    k = max(1, math.ceil(p / 100 * len(s)))
    return s[k - 1]


def summary(values: list[float]) -> dict[str, float | int]:
    if not values:
        return {"n": 0}
    return {
        "n": len(values),
        "median": statistics.median(values),
        "p90": pct(values, 90),
        "p99": pct(values, 99),
        "max": max(values),
        "min": min(values),
        "mean": statistics.fmean(values),
    }


def ms(seconds: float) -> float:
    return round(seconds * 1000, 1)


def compile_bytecode() -> str:
    """Compile dev-sync's modules, as installing a package does.

    An editable install compiles them at first import, unless
    PYTHONDONTWRITEBYTECODE is set (as in some containers): then every run
    would compile them again, about 0.1 s that no installed copy pays.
    """
    import compileall

    import dev_sync

    folder = Path(dev_sync.__file__).parent
    compileall.compile_dir(str(folder), quiet=1)
    return f"bytecode of {folder} compiled before timing (as an install does)"


def write_file(path: Path, data: bytes) -> None:
    """An editor's plain save: open, write, close (no rename)."""
    with open(path, "wb") as fh:
        fh.write(data)


def rmtree(path: Path) -> None:
    if path.exists() or path.is_symlink():
        shutil.rmtree(path)


def tree_listing(root: Path, skip_top: Iterable[str] = ()) -> dict[str, int]:
    """rel path -> size (-1 for directories), without node_modules and .git."""
    out: dict[str, int] = {}
    skip = set(skip_top)
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames[:] = [d for d in dirnames if d not in ("node_modules", ".git")]
        rel_dir = os.path.relpath(dirpath, root)
        rel_dir = "" if rel_dir == "." else rel_dir
        for d in dirnames:
            out[posixpath.join(rel_dir, d)] = -1
        for f in filenames:
            rel = posixpath.join(rel_dir, f)
            if rel in skip:
                continue
            out[rel] = os.lstat(os.path.join(dirpath, f)).st_size
    return out


def diff_listing(a: dict[str, int], b: dict[str, int]) -> list[str]:
    problems = []
    for rel in sorted(a.keys() | b.keys()):
        if a.get(rel) != b.get(rel):
            problems.append(f"{rel}: {a.get(rel)} vs {b.get(rel)}")
    return problems


# --------------------------------------------------------------------------
# /proc: CPU and memory of a process tree


def _proc_table() -> dict[int, tuple[int, int, int]]:
    """pid -> (ppid, own utime+stime ticks, reaped children's ticks)."""
    table: dict[int, tuple[int, int, int]] = {}
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat") as fh:
                text = fh.read()
        except OSError:
            continue
        rest = text.rpartition(")")[2].split()
        # rest[0] is field 3 (state): ppid=4, utime=14, stime=15, cutime=16, cstime=17
        table[int(entry)] = (int(rest[1]), int(rest[11]) + int(rest[12]),
                             int(rest[13]) + int(rest[14]))
    return table


def process_tree(root: int, table: dict[int, tuple[int, int, int]] | None = None) -> list[int]:
    table = table if table is not None else _proc_table()
    if root not in table:
        return []
    children: dict[int, list[int]] = {}
    for pid, (ppid, _, _) in table.items():
        children.setdefault(ppid, []).append(pid)
    out, todo = [], [root]
    while todo:
        pid = todo.pop()
        out.append(pid)
        todo.extend(children.get(pid, ()))
    return out


def proc_kb(pid: int, file: str, field: str) -> int:
    """A kB figure from /proc/<pid>/<file> (0 once the process is gone)."""
    try:
        with open(f"/proc/{pid}/{file}") as fh:
            for line in fh:
                if line.startswith(field):
                    return int(line.split()[1])
    except OSError:
        pass
    return 0


def _rss_kb(pid: int) -> int:
    return proc_kb(pid, "status", "VmRSS:")


def _cmd(pid: int) -> str:
    try:
        raw = Path(f"/proc/{pid}/cmdline").read_bytes()
    except OSError:
        return "?"
    return " ".join(a.decode(errors="replace") for a in raw.split(b"\0") if a)[:160]


@dataclass
class TreeSample:
    t: float
    ticks: int
    rss_kb: int
    pids: list[int]
    rss_by_pid: dict[int, int]


def sample_tree(root: int) -> TreeSample:
    table = _proc_table()
    pids = process_tree(root, table)
    ticks = sum(table[p][1] + table[p][2] for p in pids)
    rss = {p: _rss_kb(p) for p in pids}
    return TreeSample(time.monotonic(), ticks, sum(rss.values()), pids, rss)


# --------------------------------------------------------------------------
# the remote side, watched with inotify


class RemoteObserver:
    """Tells when files under a remote root hold expected bytes: the client of
    ``remote_watch.py``, which watches with inotify in a process of its own.

    There, events are time-stamped as the kernel hands them over, also while
    this process is busy writing a burst (see that file for why, and for how
    a file counts as arrived). Times are ``time.perf_counter`` values.
    ``fallback_hits`` counts files seen only by the 250 ms backup check, and
    should stay at zero.
    """

    def __init__(self, root: Path) -> None:
        self.root = root
        self.proc: subprocess.Popen[bytes] | None = None
        self.fallback_hits = 0
        self.overflows = 0
        self.events = 0
        self._buf = b""  # what the watcher wrote beyond the last full line

    def start(self) -> RemoteObserver:
        self.proc = subprocess.Popen(
            [sys.executable, str(Path(__file__).with_name("remote_watch.py")), str(self.root)],
            stdin=subprocess.PIPE, stdout=subprocess.PIPE, bufsize=0,
        )
        return self

    async def close(self) -> None:
        proc = self.proc
        if proc is None:
            return
        self.proc = None
        assert proc.stdin is not None
        with contextlib.suppress(OSError):
            proc.stdin.close()
        try:
            await asyncio.to_thread(proc.wait, 10)
        except subprocess.TimeoutExpired:
            proc.kill()
            await asyncio.to_thread(proc.wait)

    def _send(self, msg: dict[str, Any]) -> None:
        assert self.proc is not None and self.proc.stdin is not None
        self.proc.stdin.write(json.dumps(msg).encode() + b"\n")
        self.proc.stdin.flush()

    def _reply(self, timeout: float) -> dict[str, Any] | None:
        """The watcher's next line, or None after ``timeout``. Its output is read
        unbuffered and split here, so a second line never waits unseen in a buffer
        that select() knows nothing of."""
        assert self.proc is not None and self.proc.stdout is not None
        deadline = time.monotonic() + timeout
        while b"\n" not in self._buf:
            ready, _, _ = select.select([self.proc.stdout], [], [],
                                        max(0.0, deadline - time.monotonic()))
            if not ready:
                return None
            chunk = os.read(self.proc.stdout.fileno(), 1 << 16)
            if not chunk:
                raise RuntimeError(f"the remote watcher exited ({self.proc.poll()})")
            self._buf += chunk
        line, self._buf = self._buf.split(b"\n", 1)
        reply: dict[str, Any] = json.loads(line)
        return reply

    def arm(self, expected: dict[str, bytes]) -> None:
        """Start expecting ``expected`` (rel path -> bytes); call before the change."""
        self._send({"arm": {rel: hashlib.sha256(data).hexdigest()
                            for rel, data in expected.items()}})
        reply = self._reply(60)
        if reply is None or "error" in reply:
            why = "no answer" if reply is None else reply["error"]
            if reply is not None and reply.get("missing"):
                raise FileNotFoundError(why)
            raise RuntimeError(why)

    async def wait(self, timeout: float) -> float:
        """perf_counter time at which the last expected file arrived."""
        reply = await asyncio.to_thread(self._reply, timeout)
        if reply is None:
            self._send({"status": True})
            status = await asyncio.to_thread(self._reply, 10) or {}
            raise TimeoutError(f"{status.get('pending')} files not on the remote after "
                               f"{timeout:g}s, e.g. {status.get('sample')}")
        self.fallback_hits = int(reply["fallback_hits"])
        self.overflows = int(reply["overflows"])
        self.events = int(reply["events"])
        return float(reply["done"])


# --------------------------------------------------------------------------
# processes: dev-sync sessions and a plain ssh master


class Session:
    """A background ``dev-sync up --json`` and its time-stamped events."""

    def __init__(self, argv: list[str], env: dict[str, str], label: str) -> None:
        self.argv = argv
        self.env = env
        self.label = label
        self.proc: asyncio.subprocess.Process | None = None
        self.events: list[dict[str, Any]] = []
        self.stderr = b""
        self.exit_code: int | None = None
        self.leftovers: list[str] = []
        self._cond = asyncio.Condition()
        self._eof = False
        self._tasks: list[asyncio.Task[Any]] = []

    async def start(self) -> Session:
        self.proc = await asyncio.create_subprocess_exec(
            *self.argv, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
            stderr=subprocess.PIPE, env=self.env, start_new_session=True,
        )
        self._tasks = [asyncio.create_task(self._read_out()), asyncio.create_task(self._read_err())]
        return self

    @property
    def pid(self) -> int:
        assert self.proc is not None
        return self.proc.pid

    async def _read_out(self) -> None:
        assert self.proc is not None and self.proc.stdout is not None
        async for line in self.proc.stdout:
            t = time.perf_counter()
            if not line.startswith(b"{"):
                continue
            try:
                event = json.loads(line)
            except ValueError:
                continue
            event["_t"] = t
            async with self._cond:
                self.events.append(event)
                self._cond.notify_all()
        async with self._cond:
            self._eof = True
            self._cond.notify_all()

    async def _read_err(self) -> None:
        assert self.proc is not None and self.proc.stderr is not None
        self.stderr = await self.proc.stderr.read()

    def of_kind(self, kind: str, since: int = 0) -> list[dict[str, Any]]:
        return [e for e in self.events[since:] if e.get("event") == kind]

    async def wait_for(self, kind: str, timeout: float, since: int = 0) -> dict[str, Any]:
        def found() -> dict[str, Any] | None:
            hits = self.of_kind(kind, since)
            return hits[0] if hits else None

        async with self._cond:
            try:
                await asyncio.wait_for(
                    self._cond.wait_for(lambda: found() is not None or self._eof), timeout)
            except TimeoutError:
                raise TimeoutError(f"{self.label}: no {kind!r} event within {timeout:g}s; "
                                   f"saw {[e['event'] for e in self.events][-8:]}") from None
        hit = found()
        if hit is None:
            await asyncio.sleep(0.2)  # let stderr drain
            raise RuntimeError(f"{self.label}: dev-sync exited before {kind!r}: "
                               f"{self.stderr.decode(errors='replace').strip()[-800:]}")
        problems = self.of_kind("problem", since)
        for p in problems:
            say(f"  {self.label}: problem event: {p.get('cause')}")
        return hit

    async def stop(self, timeout: float = 15.0) -> int | None:
        """SIGTERM, then wait; SIGKILL the whole group if it hangs."""
        if self.proc is None:
            return None
        tree = process_tree(self.proc.pid)
        if self.proc.returncode is None:
            with contextlib.suppress(ProcessLookupError):
                self.proc.send_signal(signal.SIGTERM)
            try:
                await asyncio.wait_for(self.proc.wait(), timeout)
            except TimeoutError:
                say(f"  {self.label}: no exit {timeout:g}s after SIGTERM; killing its group")
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(self.proc.pid, signal.SIGKILL)
                await self.proc.wait()
        self.exit_code = self.proc.returncode
        for task in self._tasks:
            with contextlib.suppress(Exception):
                await asyncio.wait_for(task, 5)
        await asyncio.sleep(0.3)
        alive = [p for p in tree[1:] if os.path.exists(f"/proc/{p}")]
        self.leftovers = [f"{p}: {_cmd(p)}" for p in alive]
        for p in alive:  # ours: started by this session
            with contextlib.suppress(ProcessLookupError):
                os.kill(p, signal.SIGTERM)
        return self.exit_code


class PlainMaster:
    """An ssh ControlMaster for the plain-rsync runs (as a user would keep one open)."""

    def __init__(self, ssh_config: Path, host: str, control: Path) -> None:
        self.base = ["ssh", "-F", str(ssh_config)]
        self.host = host
        self.control = control
        self.proc: asyncio.subprocess.Process | None = None

    @property
    def rsh(self) -> str:
        return shlex.join([*self.base, "-S", str(self.control), "-o", "ControlMaster=no"])

    async def start(self) -> PlainMaster:
        self.proc = await asyncio.create_subprocess_exec(
            *self.base, "-M", "-N", "-S", str(self.control), "-o", "ControlPersist=no",
            self.host, stdin=subprocess.DEVNULL, start_new_session=True,
        )
        deadline = time.monotonic() + 15
        while time.monotonic() < deadline:
            check = await asyncio.create_subprocess_exec(
                *self.base, "-S", str(self.control), "-O", "check", self.host,
                stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
            if await check.wait() == 0:
                return self
            if self.proc.returncode is not None:
                break
            await asyncio.sleep(0.05)
        raise RuntimeError("the plain ssh ControlMaster did not come up")

    async def stop(self) -> None:
        if self.proc is not None and self.proc.returncode is None:
            self.proc.terminate()
            try:
                await asyncio.wait_for(self.proc.wait(), 5)
            except TimeoutError:
                self.proc.kill()
                await self.proc.wait()
        self.control.unlink(missing_ok=True)


# --------------------------------------------------------------------------
# changes to the local tree, undone at the end


class Mutations:
    """Remembers what the benchmark changed in a reusable tree, to put it back."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self.originals: dict[str, tuple[bytes, int, int]] = {}
        self.new_dirs: set[str] = set()
        self.new_files: set[str] = set()
        self.started = False

    def begin(self) -> None:
        if not self.started:
            treegen.set_dirty(self.root, True)
            self.started = True

    def remember(self, rels: Iterable[str]) -> None:
        self.begin()
        for rel in rels:
            if rel in self.originals or rel in self.new_files:
                continue
            path = self.root / rel
            if path.exists():
                st = path.stat()
                self.originals[rel] = (path.read_bytes(), st.st_atime_ns, st.st_mtime_ns)
            else:
                self.new_files.add(rel)
                top = rel
                while not (self.root / posixpath.dirname(top)).exists():
                    top = posixpath.dirname(top)
                if top != rel:
                    self.new_dirs.add(top)

    def original(self, rel: str) -> bytes:
        return self.originals[rel][0]

    def restore(self) -> None:
        if not self.started:
            return
        for rel in self.new_files:
            with contextlib.suppress(FileNotFoundError):
                (self.root / rel).unlink()
        for rel in sorted(self.new_dirs, key=len, reverse=True):
            rmtree(self.root / rel)
        for rel, (data, atime, mtime) in self.originals.items():
            path = self.root / rel
            path.write_bytes(data)
            os.utime(path, ns=(atime, mtime))
        treegen.set_dirty(self.root, False)
        self.started = False


# --------------------------------------------------------------------------
# the benchmark


@dataclass
class Options:
    quick: bool
    saves: int
    spacing: float
    repeats: int
    warmup: bool
    burst_files: int
    burst_rounds: int
    idle_seconds: float
    files: int
    idle_files: int
    nm_files: int
    seed: int
    remote_base: Path | None = None
    only: set[str] = field(default_factory=set)


@dataclass
class Trees:
    tree: Path
    stats: treegen.TreeStats
    idle_tree: Path | None = None
    idle_stats: treegen.TreeStats | None = None


def prepare_trees(opts: Options) -> Trees:
    """Make (or reuse) the trees; plain blocking code, before any process is started."""
    spec = treegen.TreeSpec(opts.files, opts.nm_files, opts.seed)
    tree, stats, reused = treegen.ensure_tree(WORK / "trees", spec, log=say)
    say(f"tree {tree.name}: {stats.files:,} files ({stats.bytes / 1e6:.0f} MB), "
        f"{stats.dirs:,} folders, +{stats.nm_files:,} in node_modules"
        + (" (reused)" if reused else f" (made in {stats.seconds:.0f}s)"))
    trees = Trees(tree, stats)
    if "idle" in opts.only:
        ispec = treegen.TreeSpec(opts.idle_files, opts.nm_files, opts.seed)
        trees.idle_tree, trees.idle_stats, reused = treegen.ensure_tree(
            WORK / "trees", ispec, log=say)
        say(f"idle tree {trees.idle_tree.name}: {trees.idle_stats.files:,} files, "
            f"{trees.idle_stats.dirs:,} folders"
            + (" (reused)" if reused else f" (made in {trees.idle_stats.seconds:.0f}s)"))
    return trees


async def run_timed(argv: list[str], env: dict[str, str], timeout: float,
                    ) -> tuple[float, int, bytes, bytes]:
    """Run to completion: (seconds, exit code, stdout, stderr); killed if we are cancelled."""
    t0 = time.perf_counter()
    proc = await asyncio.create_subprocess_exec(
        *argv, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=env)
    try:
        out, err = await asyncio.wait_for(proc.communicate(), timeout)
    except BaseException:
        with contextlib.suppress(ProcessLookupError):
            proc.terminate()
        with contextlib.suppress(Exception):
            await asyncio.wait_for(proc.wait(), 5)
        raise
    elapsed = time.perf_counter() - t0
    assert proc.returncode is not None
    return elapsed, proc.returncode, out, err


class Bench:
    def __init__(self, opts: Options, trees: Trees) -> None:
        self.o = opts
        self.tree = trees.tree
        self.tree_stats = trees.stats
        if trees.idle_tree is not None and trees.idle_stats is not None:
            self.idle_tree = trees.idle_tree
            self.idle_stats = trees.idle_stats
        self.tmp = Path(tempfile.mkdtemp(prefix="dev-sync-bench-"))
        self.env = {**os.environ, "DEV_SYNC_STATE_DIR": str(self.tmp / "state"),
                    "LC_ALL": "C"}
        self.sandbox: Sandbox | None = None
        self.info: SandboxInfo | None = None
        self.sessions: list[Session] = []
        self.masters: list[PlainMaster] = []
        self.mutations: list[Mutations] = []
        self.configs: list[Path] = []
        self.results: dict[str, Any] = {}
        self.anomalies: list[str] = []
        exe = Path(sys.executable).parent / "dev-sync"
        self.dev_sync = [str(exe)] if exe.exists() else [sys.executable, "-m", "dev_sync"]
        self.bytecode = compile_bytecode()

    def note(self, text: str) -> None:
        say(f"  NOTE: {text}")
        self.anomalies.append(text)

    # -- setup and teardown ----------------------------------------------------

    def start_sandbox(self) -> None:
        say(f"work folder {self.tmp}")
        say("starting the sandbox sshd (clean shell)")
        self.sandbox = Sandbox(self.tmp / "sandbox", clean_shell=True)
        self.info = self.sandbox.start()
        if not self.info.clean_shell:
            self.note("the sandbox sshd could not hide the shell rc files; every ssh call "
                      "pays for them")
        say(f"sandbox on 127.0.0.1:{self.info.port} (pid {self.info.pid})")
        # The remote copies live on tmpfs when there is one: the figures are about
        # the tools, and a busy or discard-mounted disk makes file creation on
        # the receiving side swing by a factor of five between runs.
        base = self.o.remote_base
        if base is None:
            base = Path("/dev/shm") if Path("/dev/shm").is_dir() else self.info.remote_dir
        self.remote_parent = Path(tempfile.mkdtemp(prefix="dev-sync-bench-", dir=base))
        self.remote_ds = self.remote_parent / "devsync"
        self.remote_plain = self.remote_parent / "plain"
        self.results["remote_folder"] = str(self.remote_parent)
        say(f"remote copies go to {self.remote_parent}")

    async def teardown(self) -> None:
        for s in self.sessions:
            try:
                await s.stop()
            except Exception as exc:
                say(f"stopping {s.label} failed: {exc}")
        for m in self.masters:
            with contextlib.suppress(Exception):
                await m.stop()
        for mut in self.mutations:
            try:
                mut.restore()
            except Exception as exc:
                say(f"restoring {mut.root} failed ({exc}); it will be rebuilt next run")
        for cfg in self.configs:
            cfg.unlink(missing_ok=True)
        if self.sandbox is not None:
            try:
                self.sandbox.stop()
            except Exception as exc:
                say(f"stopping the sandbox failed: {exc}")
        if getattr(self, "remote_parent", None) is not None:
            shutil.rmtree(self.remote_parent, ignore_errors=True)
        shutil.rmtree(self.tmp, ignore_errors=True)
        say("stopped everything")

    def write_config(self, tree: Path, remote: Path) -> Path:
        assert self.info is not None
        cfg = tree / "dev-sync.toml"
        cfg.write_text(
            "# written by bench/run.py\n"
            "[remote]\n"
            f"host = {json.dumps(self.info.host)}\n"
            f"path = {json.dumps(str(remote))}\n"
            f"ssh_config = {json.dumps(str(self.info.ssh_config))}\n\n"
            "[sync]\n"
            'exclude = ["node_modules/", ".git/"]\n\n'
            "# The synthetic lock files name packages no registry here has: this\n"
            "# benchmark measures the sync, not installs (bench/actions.py does).\n"
            "[deps]\n"
            "enabled = false\n"
        )
        self.configs.append(cfg)
        return cfg

    async def start_session(self, cfg: Path, label: str, timeout: float) -> Session:
        session = await Session([*self.dev_sync, "up", "--json", "--config", str(cfg)],
                                self.env, label).start()
        self.sessions.append(session)
        started = time.perf_counter()
        await session.wait_for("watching", timeout)
        say(f"  {label}: watching after {time.perf_counter() - started:.1f}s "
            f"(pid {session.pid})")
        return session

    async def stop_session(self, session: Session) -> None:
        code = await session.stop()
        self.sessions.remove(session)
        if code != 0:
            self.note(f"{session.label}: dev-sync exited {code} after SIGTERM; stderr: "
                      f"{session.stderr.decode(errors='replace').strip()[-300:]}")
        if not session.of_kind("stopped"):
            self.note(f"{session.label}: no 'stopped' event after SIGTERM")
        if session.leftovers:
            self.note(f"{session.label}: processes left running after exit: {session.leftovers}")

    async def plain_master(self) -> PlainMaster:
        assert self.info is not None
        master = await PlainMaster(self.info.ssh_config, self.info.host,
                                   self.tmp / "plain-master.sock").start()
        self.masters.append(master)
        return master

    # -- 1. initial sync ---------------------------------------------------------

    async def _run_once(self, cfg: Path) -> tuple[float, dict[str, Any], dict[str, float]]:
        os.sync()
        wall0 = time.time()
        elapsed, code, out, err = await run_timed(
            [*self.dev_sync, "up", "--once", "--json", "--config", str(cfg)], self.env, 900)
        if code != 0:
            raise RuntimeError(f"dev-sync up --once exited {code}: "
                               f"{err.decode(errors='replace').strip()[-800:]}")
        events = [json.loads(ln) for ln in out.splitlines() if ln.startswith(b"{")]
        rec = [e for e in events if e.get("event") == "reconciled"]
        # Where the time went, from the events' own time stamps (ms resolution).
        first: dict[str, float] = {}
        for e in events:
            key = e["event"] if e["event"] != "state_changed" else f"state:{e.get('state')}"
            first.setdefault(key, e["ts"])
        parts: dict[str, float] = {}
        if "state:connecting" in first and "connected" in first and rec:
            parts = {
                "start_to_connecting_ms": ms(first["state:connecting"] - wall0),
                "connect_and_probe_ms": ms(first["connected"] - first["state:connecting"]),
                "connected_to_rsync_start_ms": ms(rec[-1]["ts"] - rec[-1]["ms"] / 1000
                                                  - first["connected"]),
                "rsync_ms": float(rec[-1]["ms"]),
                "after_rsync_to_exit_ms": ms(wall0 + elapsed - rec[-1]["ts"]),
            }
        return elapsed, (rec[-1] if rec else {}), parts

    async def _run_plain_full(self, dest: Path) -> float:
        assert self.info is not None
        os.sync()
        argv = ["rsync", "-a", "--exclude", "node_modules/", "--exclude", ".git/",
                "-e", shlex.join(["ssh", "-F", str(self.info.ssh_config)]),
                f"{self.tree}/", f"{self.info.host}:{dest}/"]
        elapsed, code, _, err = await run_timed(argv, self.env, 900)
        if code != 0:
            raise RuntimeError(f"plain rsync exited {code}: "
                               f"{err.decode(errors='replace').strip()[-500:]}")
        return elapsed

    async def initial_sync(self) -> None:
        say(f"[1/4] initial sync, {self.o.repeats} round(s), each into an empty folder")
        cfg = self.write_config(self.tree, self.remote_ds)
        if self.o.warmup:
            # Untimed: the first run after the trees are made pays for cold caches
            # (the tree's pages, the remote's tmpfs, Python's files), whichever
            # contender it is, and would weigh on the median for no reason of its own.
            rmtree(self.remote_ds)
            await self._run_once(cfg)
            rmtree(self.remote_plain)
            await self._run_plain_full(self.remote_plain)
            say("  warm-up round done (one run of each, not counted)")
        ds_times: list[float] = []
        plain_times: list[float] = []
        rsync_ms: list[int] = []
        breakdown: list[dict[str, float]] = []
        for rep in range(self.o.repeats):
            order = ("dev-sync", "plain") if rep % 2 == 0 else ("plain", "dev-sync")
            for who in order:
                if who == "dev-sync":
                    rmtree(self.remote_ds)
                    t, rec, parts = await self._run_once(cfg)
                    ds_times.append(t)
                    rsync_ms.append(int(rec.get("ms", 0)))
                    breakdown.append(parts)
                    say(f"  round {rep + 1}: dev-sync up --once {t:6.2f}s "
                        f"({rec.get('files', '?')} files sent; "
                        + ", ".join(f"{k.removesuffix('_ms')} {v:.0f}" for k, v in parts.items())
                        + " ms)")
                else:
                    rmtree(self.remote_plain)
                    t = await self._run_plain_full(self.remote_plain)
                    plain_times.append(t)
                    say(f"  round {rep + 1}: plain rsync      {t:6.2f}s")
            if rep == 0:
                self._check_copies(cfg)
        ds_med, plain_med = statistics.median(ds_times), statistics.median(plain_times)
        self.results["initial_sync"] = {
            "files": self.tree_stats.files - self.tree_stats.git_files + 1,
            "bytes": self.tree_stats.bytes,
            "dev_sync_s": ds_times, "plain_s": plain_times,
            "dev_sync_median_s": ds_med, "plain_median_s": plain_med,
            "ratio": ds_med / plain_med,
            "dev_sync_reconcile_ms": rsync_ms,
            "dev_sync_breakdown": breakdown,
            "loadavg": Path("/proc/loadavg").read_text().split()[:3],
            "plain_transport": "own ssh connection (no ControlMaster); dev-sync also opens "
                               "exactly one connection (its master)",
        }
        say(f"  => initial sync: dev-sync {ds_med:.2f}s vs plain rsync {plain_med:.2f}s "
            f"= {ds_med / plain_med:.2f}x (target <= {TARGETS['initial_ratio']}x)")

    def _check_copies(self, cfg: Path) -> None:
        local = tree_listing(self.tree)
        ds = tree_listing(self.remote_ds, skip_top=(".dev-sync-root",))
        plain = tree_listing(self.remote_plain)
        for name, remote in (("dev-sync", ds), ("plain rsync", plain)):
            diff = diff_listing(local, remote)
            if diff:
                self.note(f"after the initial sync the {name} copy differs from the local "
                          f"tree in {len(diff)} entries, e.g. {diff[:3]}")
        if not diff_listing(local, ds) and not diff_listing(local, plain):
            say(f"  both copies match the local tree ({len(local):,} entries)")

    # -- 2+3. latency and burst ------------------------------------------------

    def _pick_latency_file(self) -> str:
        rng = random.Random(self.o.seed * 31 + 7)
        cands = sorted(
            rel for rel, size in tree_listing(self.tree).items()
            if rel.startswith("services/") and "/src/" in rel and rel.endswith(".ts")
            and 2_000 <= size <= 8_000
        )
        return rng.choice(cands)

    def _burst_plan(self, tag: str, mut: Mutations) -> dict[str, bytes]:
        """~75% existing sources rewritten, ~25% new files in new folders (like a checkout)."""
        rng = random.Random(f"{self.o.seed}-{tag}")
        listing = self._listing
        cands = sorted(r for r, size in listing.items() if size > 0 and "/src/" in r
                       and r.endswith((".ts", ".tsx", ".css")))
        n = self.o.burst_files
        n_new = n // 4
        per_dir = 10
        modified = rng.sample(cands, n - n_new)
        parents = rng.sample(sorted({posixpath.dirname(r) for r in cands}),
                             math.ceil(n_new / per_dir))
        new: list[str] = []
        for k in range(n_new):
            parent = parents[k // per_dir]
            new.append(f"{parent}/co-{tag}/{rng.choice(treegen.WORDS)}-{k}.ts")
        mut.remember([*modified, *new])
        plan: dict[str, bytes] = {}
        for rel in modified:
            orig = mut.original(rel)
            cut = orig.find(b"\n", len(orig) // 2) + 1
            plan[rel] = orig[:cut] + f"// checkout {tag}: {rng.random()}\n".encode() + orig[cut:]
        for rel in new:
            size = int(math.exp(rng.uniform(math.log(300), math.log(12_000))))
            body = self._pool.slice(rng, size, f"// {rel}\n")
            plan[rel] = body
        return plan

    def _apply(self, plan: dict[str, bytes]) -> None:
        made: set[str] = set()
        for rel, data in plan.items():
            path = self.tree / rel
            parent = posixpath.dirname(rel)
            if parent not in made:
                path.parent.mkdir(parents=True, exist_ok=True)
                made.add(parent)
            write_file(path, data)

    async def _save_loop(self, who: str, remote: Path, rel: str, mut: Mutations,
                         push: Push | None) -> dict[str, Any]:
        """N saves of ``rel``; ``push`` (or None for dev-sync) starts the transfer."""
        obs = RemoteObserver(remote).start()
        lat: list[float] = []
        exits: list[float] = []
        t0s: list[float] = []
        missed = 0
        orig = mut.original(rel)
        token = f"{who}-{os.getpid()}-{time.time_ns()}"
        next_at = time.perf_counter() + 0.2
        try:
            for i in range(self.o.saves):
                # Each save one byte longer than the last: rsync's quick check
                # (size + mtime in whole seconds) must never be what decides;
                # see same_size_check() for what happens when it is.
                data = orig + f"// saved {i:04d} {token} ".encode() + b"=" * i + b"\n"
                obs.arm({rel: data})
                await asyncio.sleep(max(0.0, next_at - time.perf_counter()))
                t0 = time.perf_counter()
                write_file(self.tree / rel, data)
                proc = await push(rel) if push is not None else None
                try:
                    t_vis = await obs.wait(10)
                    lat.append(t_vis - t0)
                except TimeoutError as exc:
                    missed += 1
                    self.note(f"{who}: save {i} not visible: {exc}")
                if proc is not None:
                    code = await proc.wait()
                    exits.append(time.perf_counter() - t0)
                    if code != 0:
                        self.note(f"{who}: rsync exited {code}")
                t0s.append(t0)
                next_at = max(t0 + self.o.spacing, time.perf_counter() + 0.02)
        finally:
            fallback, overflow = obs.fallback_hits, obs.overflows
            await obs.close()
        if fallback or overflow:
            self.note(f"{who} latency: {fallback} arrivals seen only by the 250 ms fallback "
                      f"check, {overflow} inotify overflows")
        return {"latencies_ms": [ms(x) for x in lat], "rsync_exit_ms": [ms(x) for x in exits],
                "missed": missed, "t0": t0s, "summary_ms": {k: (ms(v) if k != "n" else v)
                                                            for k, v in summary(lat).items()}}

    async def same_size_check(self, who: str, remote: Path, rel: str, mut: Mutations,
                              push: Push | None, attempts: int,
                              session: Session | None = None) -> dict[str, Any]:
        """Two saves of one size within one second: does the second reach the remote?

        rsync's quick check skips a file whose size and mtime (in whole seconds,
        unless --modify-window=-1) match the receiver's, so a sync tool that
        relies on it can miss a same-size edit saved right after a push.
        """
        obs = RemoteObserver(remote).start()
        orig = mut.original(rel)
        outcome: list[dict[str, Any]] = []

        async def save(data: bytes, timeout: float) -> float | None:
            obs.arm({rel: data})
            t0 = time.perf_counter()
            write_file(self.tree / rel, data)
            proc = await push(rel) if push is not None else None
            try:
                return (await obs.wait(timeout)) - t0
            except TimeoutError:
                return None
            finally:
                if proc is not None:
                    await proc.wait()

        try:
            for k in range(attempts):
                tag = f"{k}-{time.time_ns()}"
                first = orig + f"// size probe {tag} A\n".encode()
                second = orig + f"// size probe {tag} B\n".encode()
                await asyncio.sleep(1.02 - time.time() % 1.0)  # start of a second
                wall = time.time()
                a = await save(first, 5)
                await asyncio.sleep(max(0.0, wall + 0.35 - time.time()))
                same_second = int(time.time()) == int(wall)
                since = len(session.events) if session is not None else 0
                b = await save(second, 3)
                outcome.append({"first_ms": ms(a) if a is not None else None,
                                "second_ms": ms(b) if b is not None else None,
                                "same_second": same_second})
                if session is not None:
                    outcome[-1]["pushed_after_second"] = [
                        {"files": e.get("files"), "bytes": e.get("bytes"), "ms": e.get("ms")}
                        for e in session.of_kind("pushed", since)]
                # Back to a state rsync cannot mistake, whatever happened.
                await save(orig + f"// size probe {tag} reset, longer\n".encode(), 5)
        finally:
            await obs.close()
        missed = sum(1 for o in outcome if o["second_ms"] is None)
        say(f"  {who}: same-size save within one second: {attempts - missed}/{attempts} arrived")
        return {"attempts": attempts, "missed": missed, "detail": outcome}

    async def _burst(self, who: str, remote: Path, tag: str, mut: Mutations,
                     push: Push | None) -> dict[str, Any]:
        plan = self._burst_plan(tag, mut)
        obs = RemoteObserver(remote).start()
        try:
            obs.arm(plan)
            await asyncio.sleep(0.3)
            t0 = time.perf_counter()
            wall0 = time.time()
            self._apply(plan)
            t_written = time.perf_counter()
            proc = await push(list(plan)) if push is not None else None
            t_done = await obs.wait(120)
            code = await proc.wait() if proc is not None else None
            t_exit = time.perf_counter()
            # Final check, outside the timing: every file right, nothing missing.
            wrong = [r for r, d in plan.items() if (remote / r).read_bytes() != d]
            if wrong:
                self.note(f"{who} burst {tag}: {len(wrong)} remote files differ after the burst")
        finally:
            fallback, overflow = obs.fallback_hits, obs.overflows
            await obs.close()
        if fallback or overflow:
            self.note(f"{who} burst {tag}: {fallback} arrivals seen only by the 250 ms "
                      f"fallback check, {overflow} inotify overflows")
        if code not in (None, 0):
            self.note(f"{who} burst: rsync exited {code}")
        return {"seconds": t_done - t0, "write_s": t_written - t0,
                "after_last_write_s": t_done - t_written,
                "rsync_exit_s": (t_exit - t0) if proc is not None else None,
                "files": len(plan), "wall0": wall0, "t0": t0, "t_done": t_done}

    async def devsync_phase(self) -> None:
        say(f"[2/4] save-to-visible latency, {self.o.saves} saves ~{self.o.spacing * 1000:.0f} ms "
            f"apart; [3/4] {self.o.burst_files:,}-file burst x{self.o.burst_rounds}")
        assert self.info is not None
        if not (self.remote_ds / ".dev-sync-root").exists():
            rmtree(self.remote_ds)  # a fresh start if the initial-sync step did not run
        cfg = self.write_config(self.tree, self.remote_ds)
        mut = Mutations(self.tree)
        self.mutations.append(mut)
        self._listing = tree_listing(self.tree)
        self._pool = treegen.TextPool(random.Random(self.o.seed + 99), target=400_000)
        rel = self._pick_latency_file()
        mut.remember([rel])
        self.results["latency_file"] = {"path": rel, "bytes": len(mut.original(rel))}
        say(f"  saved file: {rel} ({len(mut.original(rel)):,} bytes)")

        # dev-sync session: latency, then bursts.
        say("  starting dev-sync up --json on the 20k tree")
        session = await self.start_session(cfg, "dev-sync (20k tree)", timeout=600)
        rec = session.of_kind("reconciled")
        watching = session.of_kind("watching")[0]
        self.results["session_start"] = {"reconciled": rec[-1] if rec else None,
                                         "watching": watching}
        since = len(session.events)
        ds_lat = await self._save_loop("dev-sync", self.remote_ds, rel, mut, None)
        await asyncio.sleep(0.5)
        pushes = session.of_kind("pushed", since)
        ds_lat.update(self._attribute(pushes, ds_lat["t0"], ds_lat["latencies_ms"]))
        s = ds_lat["summary_ms"]
        say(f"  dev-sync    latency: median {s.get('median')} ms, p90 {s.get('p90')}, "
            f"p99 {s.get('p99')}, max {s.get('max')} ({len(pushes)} pushed events for "
            f"{self.o.saves} saves; medians: push began "
            f"{ds_lat.get('until_push_start_ms_median')} ms after the write, and took "
            f"{ds_lat.get('push_ms_median')} ms to the end of rsync)")
        probe = {"dev_sync": await self.same_size_check(
            "dev-sync", self.remote_ds, rel, mut, None, 1 if self.o.quick else 3, session)}
        if probe["dev_sync"]["missed"]:
            self.note(f"dev-sync never sent {probe['dev_sync']['missed']} of "
                      f"{probe['dev_sync']['attempts']} saves that kept the file's size and "
                      "came within the same second as the previous push (rsync's quick check "
                      "skipped them; the remote kept the older content)")
        ds_bursts = []
        for r in range(self.o.burst_rounds):
            await asyncio.sleep(1.0)
            since = len(session.events)
            b = await self._burst("dev-sync", self.remote_ds, f"d{r}", mut, None)
            await asyncio.sleep(1.0)  # trailing pushed events
            pushes = [e for e in session.of_kind("pushed", since) if e["ts"] >= b["wall0"]]
            b["pushed_events"] = len(pushes)
            b["pushed_paths"] = sum(int(e.get("paths", 0)) for e in pushes)
            b["pushed_files"] = sum(int(e.get("files", 0)) for e in pushes)
            b["pushed_ms"] = [e.get("ms") for e in pushes]
            b["problems"] = [e.get("cause") for e in session.of_kind("problem", since)]
            b["reconciles"] = len(session.of_kind("reconciled", since))
            ds_bursts.append(b)
            say(f"  dev-sync    burst {r + 1}: {b['seconds']:.2f}s until all {b['files']} files "
                f"were on the remote (writing took {b['write_s'] * 1000:.0f} ms, then "
                f"{b['after_last_write_s'] * 1000:.0f} ms; "
                f"{b['pushed_events']} pushed events, rsync ms {b['pushed_ms']})")
            if b["reconciles"]:
                self.note(f"dev-sync burst {r + 1}: the session ran {b['reconciles']} full "
                          "reconcile(s) during the burst")
        await self.stop_session(session)

        # plain rsync over an open master, with no session running.
        master = await self.plain_master()
        rsh = master.rsh
        host = self.info.host

        async def push_one(paths: str | list[str]) -> asyncio.subprocess.Process:
            listed = [paths] if isinstance(paths, str) else paths
            proc = await asyncio.create_subprocess_exec(
                "rsync", "-a", "--files-from=-", "--from0", "-e", rsh,
                f"{self.tree}/", f"{host}:{self.remote_plain}/",
                stdin=subprocess.PIPE, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
            assert proc.stdin is not None
            proc.stdin.write(b"".join(os.fsencode(p) + b"\0" for p in listed))
            proc.stdin.close()
            return proc

        if not self.remote_plain.is_dir():
            say("  (the plain copy is missing; making it)")
            await self._run_plain_full(self.remote_plain)
        plain_lat = await self._save_loop("plain", self.remote_plain, rel, mut, push_one)
        s2 = plain_lat["summary_ms"]
        exits = plain_lat["rsync_exit_ms"]
        say(f"  plain rsync latency: median {s2.get('median')} ms, p90 {s2.get('p90')}, "
            f"p99 {s2.get('p99')}, max {s2.get('max')} (rsync itself exited after "
            f"{statistics.median(exits) if exits else '-'} ms, median)")
        probe["plain"] = await self.same_size_check(
            "plain rsync -a", self.remote_plain, rel, mut, push_one, 1)
        self.results["same_size_saves"] = probe
        plain_bursts = []
        for r in range(self.o.burst_rounds):
            await asyncio.sleep(0.5)
            b = await self._burst("plain", self.remote_plain, f"p{r}", mut, push_one)
            plain_bursts.append(b)
            say(f"  plain rsync burst {r + 1}: {b['seconds']:.2f}s until all {b['files']} files "
                f"were on the remote (writing took {b['write_s'] * 1000:.0f} ms, then "
                f"{b['after_last_write_s'] * 1000:.0f} ms; rsync exited at "
                f"{b['rsync_exit_s']:.2f}s)")
        await master.stop()
        self.masters.remove(master)
        for lat in (ds_lat, plain_lat):
            lat.pop("t0", None)
        self.results["latency"] = {"dev_sync": ds_lat, "plain": plain_lat,
                                   "loadavg": Path("/proc/loadavg").read_text().split()[:3],
                                   "spacing_ms": self.o.spacing * 1000,
                                   "plain_transport": "rsync -a --files-from over an open "
                                                      "ControlMaster"}
        ds_b = statistics.median(b["seconds"] for b in ds_bursts)
        pl_b = statistics.median(b["seconds"] for b in plain_bursts)
        ds_tail = statistics.median(b["after_last_write_s"] for b in ds_bursts)
        pl_tail = statistics.median(b["after_last_write_s"] for b in plain_bursts)
        self.results["burst"] = {
            "files": self.o.burst_files, "rounds": self.o.burst_rounds,
            "dev_sync": ds_bursts, "plain": plain_bursts,
            "dev_sync_median_s": ds_b, "plain_median_s": pl_b, "ratio": ds_b / pl_b,
            "dev_sync_after_last_write_median_s": ds_tail,
            "plain_after_last_write_median_s": pl_tail,
            "loadavg": Path("/proc/loadavg").read_text().split()[:3],
            "pushed_events_median": statistics.median(b["pushed_events"] for b in ds_bursts),
        }
        say(f"  => latency median {s.get('median')} ms vs {s2.get('median')} ms; "
            f"p99 {s.get('p99')} ms vs {s2.get('p99')} ms")
        say(f"  => burst {ds_b:.2f}s vs {pl_b:.2f}s = {ds_b / pl_b:.2f}x "
            f"(target <= {TARGETS['burst_ratio']}x)")
        mut.restore()
        self.mutations.remove(mut)

    def _attribute(self, pushes: list[dict[str, Any]], t0s: list[float],
                   lat_ms: list[float]) -> dict[str, Any]:
        """Split each save's latency: before the push started, and the push itself."""
        offset = time.time() - time.perf_counter()
        per_save: list[int] = []
        before: list[float] = []
        during: list[float] = []
        bounds = [*t0s[1:], float("inf")]
        for t0, end in zip(t0s, bounds, strict=True):
            mine = [e for e in pushes if t0 + offset <= e["ts"] < end + offset]
            per_save.append(len(mine))
            if mine:
                first = mine[0]
                start_wall = first["ts"] - first["ms"] / 1000
                before.append((start_wall - (t0 + offset)) * 1000)
                during.append(float(first["ms"]))
        out: dict[str, Any] = {
            "pushed_events": len(pushes),
            "saves_with_more_than_one_push": sum(1 for n in per_save if n > 1),
            "saves_without_push": sum(1 for n in per_save if n == 0),
        }
        if before:
            out["until_push_start_ms_median"] = round(statistics.median(before), 1)
            out["until_push_start_ms_p99"] = round(pct(before, 99), 1)
            out["push_ms_median"] = statistics.median(during)
            out["push_ms_p99"] = pct(during, 99)
            out["until_push_start_ms"] = [round(x, 1) for x in before]
            out["push_ms"] = during
        if out["saves_with_more_than_one_push"]:
            self.note(f"dev-sync pushed more than once for {out['saves_with_more_than_one_push']} "
                      "of the saves")
        return out

    # -- 4. idle ------------------------------------------------------------------

    async def idle(self) -> None:
        say(f"[4/4] idle cost: dev-sync up on {self.idle_stats.files:,} files, "
            f"{self.o.idle_seconds:g}s")
        remote = WORK / "remotes" / self.idle_tree.name
        remote.parent.mkdir(parents=True, exist_ok=True)
        if remote.exists() and not (remote / ".dev-sync-root").exists():
            rmtree(remote)
        if not remote.exists():
            say("  (first run: the initial copy of the idle tree takes a while; it is kept in "
                f"{remote} for later runs)")
        cfg = self.write_config(self.idle_tree, remote)
        started = time.perf_counter()
        session = await self.start_session(cfg, "dev-sync (idle tree)", timeout=1800)
        ready_s = time.perf_counter() - started
        rec = session.of_kind("reconciled")
        watching = session.of_kind("watching")[0]
        since = len(session.events)
        first = sample_tree(session.pid)
        samples = [first]
        peak_rss = first.rss_kb
        peak_by_pid: dict[int, int] = dict(first.rss_by_pid)
        names = {p: _cmd(p) for p in first.pids}
        end = first.t + self.o.idle_seconds
        while time.monotonic() < end:
            await asyncio.sleep(min(1.0, max(0.0, end - time.monotonic())))
            s = sample_tree(session.pid)
            samples.append(s)
            peak_rss = max(peak_rss, s.rss_kb)
            for p, v in s.rss_by_pid.items():
                peak_by_pid[p] = max(peak_by_pid.get(p, 0), v)
                if p not in names:
                    names[p] = _cmd(p)
        last = samples[-1]
        elapsed = last.t - first.t
        cpu_pct = (last.ticks - first.ticks) / CLK_TCK / elapsed * 100
        per_sec = [
            round((b.ticks - a.ticks) / CLK_TCK / (b.t - a.t) * 100, 2)
            for a, b in itertools.pairwise(samples)
        ]
        events = [e["event"] for e in session.events[since:]]
        await self.stop_session(session)
        self.results["idle"] = {
            "files": self.idle_stats.files, "folders": self.idle_stats.dirs,
            "watched_dirs": watching.get("directories"), "backend": watching.get("backend"),
            "seconds": round(elapsed, 1), "cpu_pct": round(cpu_pct, 3),
            "cpu_ticks": last.ticks - first.ticks, "clock_ticks_per_s": CLK_TCK,
            "cpu_pct_per_second": per_sec,
            "rss_mb_max": round(peak_rss / 1024, 1),
            "rss_mb_by_process": {f"{p} {names.get(p, '?')[:70]}": round(v / 1024, 1)
                                  for p, v in peak_by_pid.items()},
            "processes": len(last.pids),
            "startup_s": round(ready_s, 2),
            "startup_reconciled": rec[-1] if rec else None,
            "events_while_idle": events,
        }
        say(f"  => idle: {cpu_pct:.3f}% of one core, max RSS {peak_rss / 1024:.1f} MB over "
            f"{len(last.pids)} processes ({watching.get('directories')} folders watched; "
            f"ready after {ready_s:.1f}s)")
        if events:
            self.note(f"events while idle: {events[:10]}")

    # -- driver -----------------------------------------------------------------

    async def run(self) -> None:
        phases = [("initial", self.initial_sync), ("live", self.devsync_phase),
                  ("idle", self.idle)]
        for name, phase in phases:
            if name not in self.o.only:
                continue
            try:
                await phase()
            except asyncio.CancelledError:
                raise
            except Exception as exc:
                self.results.setdefault("errors", {})[name] = f"{type(exc).__name__}: {exc}"
                self.note(f"{name} failed: {type(exc).__name__}: {exc}")
                for s in list(self.sessions):
                    await self.stop_session(s)


# --------------------------------------------------------------------------
# report


def machine() -> dict[str, Any]:
    cpu = "?"
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break

    def first_line(argv: list[str]) -> str:
        try:
            res = subprocess.run(argv, capture_output=True, text=True, timeout=10, check=False)
        except OSError:
            return "?"
        return (res.stdout or res.stderr).strip().splitlines()[0] if (res.stdout or res.stderr) \
            else "?"

    commit = first_line(["git", "-C", str(REPO), "rev-parse", "--short", "HEAD"])
    # "?" means no output: nothing under src/ differs from the commit.
    dirty = first_line(["git", "-C", str(REPO), "status", "--porcelain", "--", "src"]) != "?"
    banner = first_line(["rsync", "--version"])
    m = re.search(r"version\s+(\S+)", banner)
    return {
        "cpu": cpu, "cores": os.cpu_count(), "kernel": platform.release(),
        "python": platform.python_version(), "dev_sync": DEV_SYNC_VERSION,
        "commit": commit + ("+dirty src" if dirty else ""),
        "rsync": banner, "ssh": first_line(["ssh", "-V"]),
        "rsync_version": m.group(1) if m else "?",
        "loadavg_at_start": Path("/proc/loadavg").read_text().split()[:3],
    }


def _ok(value: float | None, limit: float) -> str:
    if value is None:
        return "-"
    return "yes" if value <= limit else "**no**"


def markdown(results: dict[str, Any], opts: Options) -> str:
    rows: list[tuple[str, str, str, str, str, str]] = []
    init = results.get("initial_sync")
    if init:
        mb = init["bytes"] / 1e6
        rows.append((
            f"Initial sync, {opts.files:,}-file tree ({mb:.0f} MB; median of {opts.repeats})",
            f"{init['dev_sync_median_s']:.2f} s", f"{init['plain_median_s']:.2f} s",
            f"{init['ratio']:.2f}x", f"<= {TARGETS['initial_ratio']}x",
            _ok(init["ratio"], TARGETS["initial_ratio"])))
    lat = results.get("latency")
    if lat:
        d, p = lat["dev_sync"]["summary_ms"], lat["plain"]["summary_ms"]
        n = d.get("n", 0)
        for key, label, target in (("median", "median", "latency_median_ms"),
                                   ("p90", "p90", None), ("p99", "p99", "latency_p99_ms"),
                                   ("max", "max", None)):
            dv, pv = d.get(key), p.get(key)
            rows.append((
                f"Save-to-visible, {label} (N={n})",
                f"{dv:.0f} ms" if dv is not None else "-",
                f"{pv:.0f} ms" if pv is not None else "-",
                f"{dv / pv:.2f}x" if dv and pv else "-",
                f"< {TARGETS[target]:.0f} ms" if target else "",
                _ok(dv, TARGETS[target]) if target else ""))
    burst = results.get("burst")
    if burst:
        rows.append((
            f"Burst of {burst['files']:,} files until all on the remote "
            f"(median of {burst['rounds']})",
            f"{burst['dev_sync_median_s']:.2f} s", f"{burst['plain_median_s']:.2f} s",
            f"{burst['ratio']:.2f}x", f"<= {TARGETS['burst_ratio']}x",
            _ok(burst["ratio"], TARGETS["burst_ratio"])))
        d_tail = burst["dev_sync_after_last_write_median_s"]
        p_tail = burst["plain_after_last_write_median_s"]
        rows.append(("Burst: of which after the last file was written",
                     f"{d_tail:.2f} s", f"{p_tail:.2f} s", f"{d_tail / p_tail:.2f}x", "", ""))
        rows.append(("Burst: transfers (pushed events / rsync runs)",
                     f"{burst['pushed_events_median']:g}", "1", "", "", ""))
    probe = results.get("same_size_saves")
    if probe:
        d, p = probe["dev_sync"], probe["plain"]
        rows.append(("Same-size save within 1 s of the last push reaches the remote",
                     f"{d['attempts'] - d['missed']}/{d['attempts']}",
                     f"{p['attempts'] - p['missed']}/{p['attempts']} (`-a`)", "", "all",
                     "yes" if not d["missed"] else "**no**"))
    idle = results.get("idle")
    if idle:
        if idle.get("cpu_ticks") == 0:  # below what /proc can show over the window
            resolution = 100 / (idle["clock_ticks_per_s"] * idle["seconds"])
            cpu = f"< {resolution:.2f} % of a core"
        else:
            cpu = f"{idle['cpu_pct']:.2f} % of a core"
        rows.append((f"Idle CPU, {idle['files']:,} files watched ({idle['seconds']:.0f} s)",
                     cpu, "-", "", "< 1 %",
                     _ok(idle["cpu_pct"], TARGETS["idle_cpu_pct"])))
        rows.append(("Idle memory (max RSS, dev-sync + ssh master)",
                     f"{idle['rss_mb_max']:.0f} MB", "-", "", "< 80 MB",
                     _ok(idle["rss_mb_max"], TARGETS["idle_rss_mb"])))
    head = ("Measurement", "dev-sync", "plain rsync", "ratio", "target", "met")
    lines = ["| " + " | ".join(head) + " |", "|---|---:|---:|---:|---|---|"]
    lines += ["| " + " | ".join(r) + " |" for r in rows]
    m = results["machine"]
    notes = [
        "",
        f"Loopback SSH to a private sshd (no shell rc files); {m['cores']} cores, {m['cpu']}, "
        f"Linux {m['kernel']}, rsync {m['rsync_version']}, {m['ssh'].split(',')[0]}; "
        f"dev-sync {m['dev_sync']} ({m['commit']}). Local trees on disk, remote copies on "
        f"{'tmpfs' if str(results.get('remote_folder', '')).startswith('/dev/shm') else 'disk'}"
        " (the 100k-file idle tree's copy on disk).",
        f"Timing starts from an installed state: {m.get('bytecode', '?')}.",
        "Plain rsync: the initial sync opens its own SSH connection (no ControlMaster, as "
        "dev-sync opens one master); saves and the burst use `rsync -a --files-from` over an "
        "already open ControlMaster, started right after the write.",
    ]
    if results.get("errors"):
        notes.append("Failed: " + "; ".join(f"{k}: {v}" for k, v in results["errors"].items()))
    return "\n".join(lines + notes)


def parse_args(argv: list[str] | None) -> Options:
    ap = argparse.ArgumentParser(description="Benchmark dev-sync against plain rsync.")
    ap.add_argument("--quick", action="store_true",
                    help="20 saves, 1 round of initial sync and burst, 10 s idle")
    ap.add_argument("--saves", type=int, help="number of saves (default 100; --quick 20)")
    ap.add_argument("--spacing-ms", type=float, default=150.0, help="time between saves")
    ap.add_argument("--repeats", type=int, help="initial-sync rounds (default 5; --quick 1)")
    ap.add_argument("--no-warmup", dest="warmup", action="store_false",
                    help="skip the untimed first run of each contender before the initial sync")
    ap.add_argument("--burst-files", type=int, default=2000)
    ap.add_argument("--burst-rounds", type=int, help="default 3; --quick 1")
    ap.add_argument("--idle-seconds", type=float, help="default 60; --quick 10")
    ap.add_argument("--files", type=int, default=20_000, help="files outside node_modules")
    ap.add_argument("--idle-files", type=int, default=100_000)
    ap.add_argument("--nm-files", type=int, default=30_000, help="files in node_modules")
    ap.add_argument("--seed", type=int, default=1)
    ap.add_argument("--remote-base", type=Path, default=None,
                    help="where the remote copies of the 20k tree go (default /dev/shm)")
    ap.add_argument("--only", default="initial,live,idle",
                    help="comma-separated subset of: initial, live (latency+burst), idle")
    a = ap.parse_args(argv)
    q = a.quick
    return Options(
        quick=q,
        saves=a.saves or (20 if q else 100),
        spacing=a.spacing_ms / 1000,
        repeats=a.repeats or (1 if q else 5),
        warmup=a.warmup,
        burst_files=a.burst_files,
        burst_rounds=a.burst_rounds or (1 if q else 3),
        idle_seconds=a.idle_seconds or (10.0 if q else 60.0),
        files=a.files, idle_files=a.idle_files, nm_files=a.nm_files, seed=a.seed,
        remote_base=a.remote_base,
        only={s.strip() for s in a.only.split(",") if s.strip()},
    )


async def amain(opts: Options, trees: Trees) -> int:
    bench = Bench(opts, trees)
    results = bench.results
    results["machine"] = machine()
    results["machine"]["bytecode"] = bench.bytecode
    results["options"] = {k: (sorted(v) if isinstance(v, set) else v)
                          for k, v in asdict(opts).items()}
    results["started"] = time.strftime("%Y-%m-%dT%H:%M:%S%z")
    loop = asyncio.get_running_loop()
    me = asyncio.current_task()
    assert me is not None
    loop.add_signal_handler(signal.SIGTERM, me.cancel)
    try:
        bench.start_sandbox()
        results["tree"] = {"name": bench.tree.name, **asdict(bench.tree_stats)}
        await bench.run()
    finally:
        await bench.teardown()
    save_results(results, bench.anomalies, T_START, "", opts.quick)
    print(markdown(results, opts))
    return 1 if results.get("errors") else 0


def save_results(
    results: dict[str, Any], anomalies: list[str], started: float, prefix: str, quick: bool
) -> None:
    """Write the raw numbers to bench/results/ and list the anomalies on stderr."""
    results["anomalies"] = anomalies
    results["duration_s"] = round(time.monotonic() - started, 1)
    out_dir = HERE / "results"
    out_dir.mkdir(exist_ok=True)
    stamp = time.strftime("%Y%m%d-%H%M%S")
    out = out_dir / f"{prefix}{stamp}{'-quick' if quick else ''}.json"
    out.write_text(json.dumps(results, indent=2, default=str) + "\n")
    say(f"results written to {out.relative_to(REPO)} (run took {results['duration_s']:.0f}s)")
    if anomalies:
        say("anomalies:")
        for a in anomalies:
            say(f"  - {a}")


def main(argv: list[str] | None = None) -> int:
    opts = parse_args(argv)
    try:
        trees = prepare_trees(opts)
        return asyncio.run(amain(opts, trees))
    except (KeyboardInterrupt, asyncio.CancelledError):
        say("interrupted")
        return 130


if __name__ == "__main__":
    sys.exit(main())
