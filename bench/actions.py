#!/usr/bin/env python3
"""dev-sync benchmark of remote actions: service restarts and dependency installs.

    .venv/bin/python bench/actions.py [--quick]

Starts everything it needs itself: a private sshd on 127.0.0.1 whose sessions
do not read shell rc files (dev_sync.sandbox, clean_shell=True), a small
project in a temporary folder, its remote copy in the sandbox's folder, the
project's own supervisord (``dev-sync services install``) and dev-sync
sessions with their state in the temporary folder. Measures, over loopback:

1. edit to new response: ``api/server.py`` (a stdlib HTTP server run by
   Supervisor as ``[services.api]``) is rewritten to answer a new token while
   ``dev-sync up --json`` runs; timed from just before the write until a GET
   on its port (polled every 5 ms) returns that token. Beside it, the restart
   alone: (a) from the ``service_restarting`` event to that response, and
   (b) ``supervisorctl restart api`` run by hand, with no dev-sync running
   (both split into: until the old process gets SIGTERM, until the new one
   starts, until it answers; the server notes both times itself);
2. lock-file save to install start: a ``[[deps.rule]]`` whose command
   appends ``date +%s.%N`` on the remote; timed from just before the local
   write until that time stamp, and until the ``install_started`` event.
   Beside it, the same time stamp taken by one plain ``ssh`` command over an
   already open ControlMaster.

Reuses bench/run.py's pieces (Session, RemoteObserver, PlainMaster, machine).
Progress goes to stderr, a Markdown table to stdout, every raw number to
bench/results/actions-<date>-<time>.json. See bench/README.md.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import random
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

from run import (  # bench/ is not a package: run.py is found on sys.path
    PlainMaster,
    RemoteObserver,
    Session,
    machine,
    pct,
    process_tree,
    save_results,
    say,
    write_file,
)

from dev_sync.sandbox import Sandbox, SandboxInfo

# The service: answers "<token> <pid> <start time>", so a response tells which
# process sent it and when that process started; on SIGTERM it notes the time
# in a file before it exits, so a restart can be split into stop, start, ready.
SERVER = """\
import os, time
STARTED = time.time()
import http.server, signal
def stopped(*_):
    with open({stops!r}, "a") as fh:
        fh.write(f"{{os.getpid()}} {{time.time()!r}}\\n")
    os._exit(0)
signal.signal(signal.SIGTERM, stopped)
BODY = f"{token} {{os.getpid()}} {{STARTED!r}}".encode()
class H(http.server.BaseHTTPRequestHandler):
    def do_GET(self):
        self.send_response(200)
        self.send_header("Content-Length", str(len(BODY)))
        self.end_headers()
        self.wfile.write(BODY)
    def log_message(self, *a):
        pass
http.server.HTTPServer(("127.0.0.1", int(os.environ["PORT"])), H).serve_forever()
"""

POLL_S = 0.005  # how often the port is asked for the new token
LOCK_REL = "deps/stamp.lock"
SERVER_REL = "api/server.py"


@dataclass
class Options:
    quick: bool
    edits: int
    restarts: int
    saves: int
    gap: float


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def stats_ms(values: list[float]) -> dict[str, float | int]:
    """Summary of values in seconds, as milliseconds."""
    if not values:
        return {"n": 0}
    return {
        "n": len(values),
        "median": round(statistics.median(values) * 1000, 1),
        "p90": round(pct(values, 90) * 1000, 1),
        "p99": round(pct(values, 99) * 1000, 1),
        "min": round(min(values) * 1000, 1),
        "max": round(max(values) * 1000, 1),
    }


async def http_get(port: int, timeout: float = 2.0) -> str | None:
    """The body of ``GET /`` on 127.0.0.1:port, or None (refused, reset, not 200)."""
    try:
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
    except OSError:
        return None
    try:
        writer.write(b"GET / HTTP/1.0\r\nHost: 127.0.0.1\r\n\r\n")
        data = await asyncio.wait_for(reader.read(), timeout)
    except (OSError, TimeoutError):
        return None
    finally:
        writer.close()
        with contextlib.suppress(OSError):
            await writer.wait_closed()
    head, _, body = data.partition(b"\r\n\r\n")
    lines = head.split(b"\r\n")
    status = lines[0].split()
    if len(status) < 2 or status[1] != b"200":
        return None
    # A server stopped halfway through its answer sends the headers and no body.
    length = [ln.split(b":", 1)[1].strip() for ln in lines[1:]
              if ln.lower().startswith(b"content-length:")]
    if not length or length[0] != str(len(body)).encode() or not body:
        return None
    return body.decode(errors="replace")


async def poll_until(port: int, wanted: Any, timeout: float) -> tuple[float, str, int]:
    """Poll the port every POLL_S until ``wanted(body)``: (wall time of that response, body,
    attempts)."""
    deadline = time.monotonic() + timeout
    attempts = 0
    while True:
        attempts += 1
        body = await http_get(port)
        t = time.time()
        if body is not None and wanted(body):
            return t, body, attempts
        if time.monotonic() > deadline:
            raise TimeoutError(f"port {port}: no matching response within {timeout:g}s "
                               f"(last: {body!r})")
        await asyncio.sleep(POLL_S)


def wall(perf: float) -> float:
    """A perf_counter time (RemoteObserver, Session._t) as wall-clock time."""
    return perf + (time.time() - time.perf_counter())


class ActionsBench:
    def __init__(self, opts: Options) -> None:
        self.o = opts
        self.tmp = Path(tempfile.mkdtemp(prefix="dev-sync-bench-actions-"))
        self.env = {**os.environ, "DEV_SYNC_STATE_DIR": str(self.tmp / "state"),
                    "LC_ALL": "C"}
        exe = Path(sys.executable).parent / "dev-sync"
        self.dev_sync = [str(exe)] if exe.exists() else [sys.executable, "-m", "dev_sync"]
        self.local = self.tmp / "project"
        self.stamps = self.tmp / "install-stamps.txt"
        self.stops = self.tmp / "server-stops.txt"
        self.sandbox: Sandbox | None = None
        self.info: SandboxInfo | None = None
        self.remote: Path | None = None
        self.port = 0
        self.server_pid = 0
        self.sessions: list[Session] = []
        self.master: PlainMaster | None = None
        self.results: dict[str, Any] = {}
        self.anomalies: list[str] = []

    def note(self, text: str) -> None:
        say(f"  NOTE: {text}")
        self.anomalies.append(text)

    def server_code(self, token: str) -> bytes:
        return SERVER.format(token=token, stops=str(self.stops)).encode()

    def stop_time(self, pid: int) -> float | None:
        """When the server with ``pid`` got its SIGTERM (its own note), if it did."""
        with contextlib.suppress(OSError):
            for line in self.stops.read_text().splitlines():
                who, _, when = line.partition(" ")
                if who == str(pid):
                    return float(when)
        return None

    def split_restart(self, began: float, old_pid: int, body: str, answered: float,
                      ) -> dict[str, float | None]:
        """A restart from ``began`` to ``answered``: until the old process got SIGTERM,
        until the new one started, until it answered (seconds)."""
        stopped = self.stop_time(old_pid)
        started = float(body.split()[2])
        return {
            "to_sigterm_s": stopped - began if stopped is not None else None,
            "sigterm_to_new_process_s": started - stopped if stopped is not None else None,
            "new_process_to_answer_s": answered - started,
        }

    @property
    def supervisor_conf(self) -> Path:
        assert self.remote is not None
        return self.remote / ".dev-sync" / "supervisor" / "supervisord.conf"

    # -- setup and teardown ----------------------------------------------------

    def setup(self) -> None:
        say(f"work folder {self.tmp}")
        say("starting the sandbox sshd (clean shell)")
        self.sandbox = Sandbox(self.tmp / "sandbox", clean_shell=True)
        self.info = self.sandbox.start()
        if not self.info.clean_shell:
            self.note("the sandbox sshd could not hide the shell rc files; every ssh call "
                      "pays for them")
        say(f"sandbox on 127.0.0.1:{self.info.port} (pid {self.info.pid})")
        self.remote = self.info.remote_dir / "actions-bench"
        self.port = free_port()
        (self.local / "api").mkdir(parents=True)
        (self.local / "deps").mkdir()
        write_file(self.local / SERVER_REL, self.server_code("start"))
        write_file(self.local / LOCK_REL, b"lock 0\n")
        stamp_cmd = f't=$(date +%s.%N); echo "$t $(cat stamp.lock)" >> {self.stamps}'
        (self.local / "dev-sync.toml").write_text(
            "# written by bench/actions.py\n"
            "[remote]\n"
            f"host = {json.dumps(self.info.host)}\n"
            f"path = {json.dumps(str(self.remote))}\n"
            f"ssh_config = {json.dumps(str(self.info.ssh_config))}\n\n"
            "[[deps.rule]]\n"
            'name = "stamp"\n'
            f"globs = [{json.dumps(LOCK_REL)}]\n"
            f"command = {json.dumps(stamp_cmd)}\n\n"
            "[services.api]\n"
            'command = "python3 server.py"\n'
            'cwd = "api"\n'
            f"port = {self.port}\n"
            'restart_on = ["api/**/*.py"]\n'
        )

    async def cli(self, *args: str, timeout: float = 120) -> str:
        proc = await asyncio.create_subprocess_exec(
            *self.dev_sync, *args, "--config", str(self.local / "dev-sync.toml"),
            stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
            env=self.env)
        try:
            out, err = await asyncio.wait_for(proc.communicate(), timeout)
        except BaseException:
            with contextlib.suppress(ProcessLookupError):
                proc.terminate()
            with contextlib.suppress(Exception):
                await asyncio.wait_for(proc.wait(), 5)
            raise
        if proc.returncode != 0:
            raise RuntimeError(f"dev-sync {' '.join(args)} exited {proc.returncode}: "
                               f"{err.decode(errors='replace').strip()[-600:]}")
        return out.decode(errors="replace")

    async def start_services(self) -> None:
        say("dev-sync up --once, then dev-sync services install")
        await self.cli("up", "--once")
        await self.cli("services", "install")
        _, body, _ = await poll_until(self.port, lambda b: b.startswith("start "), 20)
        self.server_pid = int(body.split()[1])
        say(f"  api answers on port {self.port} (pid {self.server_pid})")

    async def start_session(self) -> Session:
        argv = [*self.dev_sync, "up", "--json", "--config", str(self.local / "dev-sync.toml")]
        session = await Session(argv, self.env, "dev-sync up").start()
        self.sessions.append(session)
        started = time.perf_counter()
        await session.wait_for("watching", 60)
        self.check_master(session)
        say(f"  dev-sync up --json watching after {time.perf_counter() - started:.1f}s "
            f"(pid {session.pid})")
        # An install the start-up reconcile found necessary runs first.
        await asyncio.sleep(0.5)
        if session.of_kind("install_started"):
            await session.wait_for("install_finished", 30)
        return session

    async def stop_session(self, session: Session) -> None:
        code = await session.stop()
        self.sessions.remove(session)
        if code != 0:
            self.note(f"dev-sync up exited {code} after SIGTERM; stderr: "
                      f"{session.stderr.decode(errors='replace').strip()[-300:]}")
        if session.leftovers:
            self.note(f"processes left running after dev-sync exited: {session.leftovers}")

    def ssh_logins(self) -> int:
        """Logins the sandbox sshd has accepted so far: each is a new SSH connection."""
        assert self.sandbox is not None
        try:
            return self.sandbox.log_file.read_text(errors="replace").count("Accepted ")
        except OSError:
            return -1

    def check_master(self, session: Session) -> None:
        """Is the session's ControlMaster socket there? Without it every ssh and rsync
        call quietly opens a connection of its own (a key exchange each time)."""
        found: list[dict[str, Any]] = []
        for pid in process_tree(session.pid)[1:]:
            try:
                args = Path(f"/proc/{pid}/cmdline").read_bytes().decode().split("\0")
            except OSError:
                continue
            if args and Path(args[0]).name == "ssh" and "-M" in args:
                path = next((a.split("=", 1)[1] for a in args if a.startswith("ControlPath=")),
                            None)
                found.append({"pid": pid, "control_path": path,
                              "socket_exists": path is not None and os.path.exists(path)})
        self.results["session_master"] = found
        if not found:
            self.note("found no ssh ControlMaster process under the dev-sync session")
        for m in found:
            if not m["socket_exists"]:
                self.note(f"the session's ssh master (pid {m['pid']}) is running but its "
                          f"control socket {m['control_path']} does not exist: every push, "
                          "install and restart opens a new SSH connection")

    def _supervisord_pid(self) -> int | None:
        with contextlib.suppress(OSError, ValueError):
            return int((self.supervisor_conf.parent / "supervisord.pid").read_text().strip())
        return None

    async def teardown(self) -> None:
        for s in list(self.sessions):
            try:
                await self.stop_session(s)
            except Exception as exc:
                say(f"stopping dev-sync failed: {exc}")
        if self.master is not None:
            with contextlib.suppress(Exception):
                await self.master.stop()
        if self.remote is not None and self.supervisor_conf.exists():
            pid = self._supervisord_pid()
            res = subprocess.run(["supervisorctl", "-c", str(self.supervisor_conf), "shutdown"],
                                 capture_output=True, text=True, timeout=30, check=False)
            if pid is not None:
                deadline = time.monotonic() + 10
                while os.path.exists(f"/proc/{pid}") and time.monotonic() < deadline:
                    await asyncio.sleep(0.05)
                if os.path.exists(f"/proc/{pid}"):
                    self.note(f"supervisord (pid {pid}) still running after shutdown: "
                              f"{res.stdout.strip()} {res.stderr.strip()}")
            still = await http_get(self.port, 0.5) if self.port else None
            if still is not None:
                self.note(f"the api still answers on port {self.port} after shutdown: {still!r}")
        if self.sandbox is not None:
            try:
                self.sandbox.stop()
            except Exception as exc:
                say(f"stopping the sandbox failed: {exc}")
        shutil.rmtree(self.tmp, ignore_errors=True)
        say("stopped everything")

    # -- 1. edit to new response ------------------------------------------------

    async def edits(self, session: Session) -> None:
        n = self.o.edits
        say(f"[1/4] edit to new response: {n} edits of {SERVER_REL}, each after the last "
            "restart was reported")
        assert self.remote is not None
        obs = RemoteObserver(self.remote).start()
        nonce = f"{os.getpid()}-{time.time_ns() % 10**9}"
        rows: list[dict[str, Any]] = []
        logins = self.ssh_logins()
        try:
            for i in range(n):
                token = f"v{i}-{nonce}"
                data = self.server_code(token)
                obs.arm({SERVER_REL: data})
                since = len(session.events)
                await asyncio.sleep(self.o.gap + random.uniform(0, 0.1))
                t0 = time.time()
                write_file(self.local / SERVER_REL, data)
                poll = asyncio.create_task(
                    poll_until(self.port, lambda b, t=token: b.startswith(t + " "), 30))
                try:
                    arrived = wall(await obs.wait(15))
                    t_resp, body, attempts = await poll
                finally:
                    poll.cancel()
                    with contextlib.suppress(BaseException):
                        await poll
                restarting = await session.wait_for("service_restarting", 15, since)
                restarted = await session.wait_for("service_restarted", 30, since)
                pushes = [e for e in session.of_kind("pushed", since) if e["ts"] >= t0 - 0.001]
                pid = int(body.split()[1])
                split = self.split_restart(restarting["ts"], self.server_pid, body, t_resp)
                self.server_pid = pid
                row = {
                    "t0": t0,
                    "edit_to_response_s": t_resp - t0,
                    "edit_to_remote_file_s": arrived - t0,
                    "edit_to_push_start_s": (pushes[0]["ts"] - pushes[0]["ms"] / 1000 - t0)
                    if pushes else None,
                    "push_ms": pushes[0]["ms"] if pushes else None,
                    "edit_to_restarting_event_s": restarting["ts"] - t0,
                    "restarting_event_to_response_s": t_resp - restarting["ts"],
                    "remote_file_to_restarting_event_s": restarting["ts"] - arrived,
                    "restarted_event_ms": restarted.get("ms"),
                    "restarted_ok": restarted.get("ok"),
                    "restarted_state": restarted.get("state"),
                    "restarted_pid": restarted.get("pid"),
                    "response_pid": pid,
                    "restarting_cause": restarting.get("cause"),
                    **{f"restart_{k}": v for k, v in split.items()},
                    "polls": attempts,
                    "pushed_events": len(pushes),
                    "restart_events": len(session.of_kind("service_restarting", since)),
                }
                rows.append(row)
                if not restarted.get("ok"):
                    self.note(f"edit {i}: service_restarted ok=false: {restarted.get('problem')}")
                say(f"  edit {i + 1:2d}: new response after {row['edit_to_response_s'] * 1000:6.1f}"
                    f" ms (file on remote {row['edit_to_remote_file_s'] * 1000:5.1f} ms, "
                    f"service_restarting at {row['edit_to_restarting_event_s'] * 1000:5.0f} ms; "
                    f"service_restarted after {restarted.get('ms')} ms)")
        finally:
            fallback = obs.fallback_hits
            await obs.close()
        if fallback:
            self.note(f"edits: {fallback} arrivals seen only by the 250 ms fallback check")
        other_pid = [r for r in rows if r["restarted_pid"] not in (None, r["response_pid"])]
        if other_pid:
            last = other_pid[-1]
            what = ""
            with contextlib.suppress(OSError, ValueError, IndexError):
                stat = Path(f"/proc/{last['response_pid']}/stat").read_text()
                ppid = int(stat.rpartition(")")[2].split()[1])
                cmd = Path(f"/proc/{last['restarted_pid']}/cmdline").read_bytes()
                cmd_text = " ".join(a.decode() for a in cmd.split(b"\0") if a)
                what = (f"; pid {last['restarted_pid']} is `{cmd_text}`, "
                        + ("the server's parent" if ppid == last["restarted_pid"]
                           else f"the server's parent is {ppid}"))
            self.note(f"in {len(other_pid)} of {len(rows)} restarts the pid in service_restarted "
                      f"is not the server's ({last['restarted_pid']} reported, "
                      f"{last['response_pid']} answered{what})")
        extra = [r for r in rows if r["restart_events"] != 1 or r["pushed_events"] != 1]
        if extra:
            self.note(f"{len(extra)} edits did not give exactly one push and one restart: "
                      f"{[(r['pushed_events'], r['restart_events']) for r in extra][:5]}")

        def col(key: str) -> list[float]:
            return [r[key] for r in rows if r[key] is not None]

        self.results["edit_to_response"] = {
            "n": len(rows),
            "new_ssh_logins": self.ssh_logins() - logins,
            "summary_ms": {k: stats_ms(col(k)) for k in (
                "edit_to_response_s", "edit_to_remote_file_s", "edit_to_push_start_s",
                "edit_to_restarting_event_s", "remote_file_to_restarting_event_s",
                "restarting_event_to_response_s", "restart_to_sigterm_s",
                "restart_sigterm_to_new_process_s", "restart_new_process_to_answer_s")},
            "restarted_event_ms_median": statistics.median(
                r["restarted_event_ms"] for r in rows if r["restarted_event_ms"] is not None),
            "edits": rows,
            "loadavg": Path("/proc/loadavg").read_text().split()[:3],
        }
        if self.results["edit_to_response"]["new_ssh_logins"]:
            self.note(f"{self.results['edit_to_response']['new_ssh_logins']} new SSH logins "
                      f"during the {n} edits (none expected: all should use the master)")
        s = self.results["edit_to_response"]["summary_ms"]
        say(f"  => edit to new response: median {s['edit_to_response_s']['median']} ms, "
            f"p99 {s['edit_to_response_s']['p99']} ms; service_restarting to response "
            f"median {s['restarting_event_to_response_s']['median']} ms")

    async def supervisorctl_restarts(self) -> None:
        n = self.o.restarts
        say(f"[3/4] supervisorctl restart api by hand, {n} times (no dev-sync running)")
        conf = str(self.supervisor_conf)
        rows: list[dict[str, Any]] = []
        _, body, _ = await poll_until(self.port, lambda b: True, 10)
        for i in range(n):
            old_pid = int(body.split()[1])
            await asyncio.sleep(self.o.gap + random.uniform(0, 0.1))
            t0 = time.time()
            proc = await asyncio.create_subprocess_exec(
                "supervisorctl", "-c", conf, "restart", "api",
                stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
            poll = asyncio.create_task(
                poll_until(self.port, lambda b, p=old_pid: int(b.split()[1]) != p, 30))
            out, _ = await asyncio.wait_for(proc.communicate(), 60)
            t_exit = time.time()
            try:
                t_serving, body, _ = await poll
            finally:
                poll.cancel()
                with contextlib.suppress(BaseException):
                    await poll
            split = self.split_restart(t0, old_pid, body, t_serving)
            text = out.decode(errors="replace").strip()
            if proc.returncode != 0 or "started" not in text:
                self.note(f"supervisorctl restart {i}: exit {proc.returncode}: {text!r}")
            rows.append({"t0": t0, "command_s": t_exit - t0, "serving_s": t_serving - t0,
                         **split, "output": text})
            say(f"  restart {i + 1:2d}: new process answering after "
                f"{(t_serving - t0) * 1000:6.1f} ms, supervisorctl returned after "
                f"{(t_exit - t0) * 1000:6.1f} ms")
        self.results["supervisorctl_restart"] = {
            "n": len(rows),
            "command_ms": stats_ms([r["command_s"] for r in rows]),
            "serving_ms": stats_ms([r["serving_s"] for r in rows]),
            "split_ms": {k: stats_ms([r[k] for r in rows if r[k] is not None]) for k in (
                "to_sigterm_s", "sigterm_to_new_process_s", "new_process_to_answer_s")},
            "restarts": rows,
            "startsecs": 1,
            "loadavg": Path("/proc/loadavg").read_text().split()[:3],
        }

    # -- 3. lock-file save to install start --------------------------------------

    def _stamps(self) -> list[tuple[float, str]]:
        try:
            lines = self.stamps.read_text().splitlines()
        except FileNotFoundError:
            return []
        out = []
        for line in lines:
            t, _, tag = line.partition(" ")
            out.append((float(t), tag))
        return out

    async def installs(self, session: Session) -> None:
        n = self.o.saves
        say(f"[2/4] lock-file save to install start: {n} saves of {LOCK_REL}, each after the "
            "last install finished")
        assert self.remote is not None
        obs = RemoteObserver(self.remote).start()
        rows: list[dict[str, Any]] = []
        nonce = f"{os.getpid()}-{time.time_ns() % 10**9}"
        logins = self.ssh_logins()
        try:
            for i in range(n):
                tag = f"save-{i}-{nonce}"
                data = f"lock {tag}\n".encode()
                obs.arm({LOCK_REL: data})
                since = len(session.events)
                before = len(self._stamps())
                await asyncio.sleep(self.o.gap + random.uniform(0, 0.1))
                t0 = time.time()
                write_file(self.local / LOCK_REL, data)
                arrived = wall(await obs.wait(15))
                started = await session.wait_for("install_started", 15, since)
                finished = await session.wait_for("install_finished", 30, since)
                stamps = self._stamps()[before:]
                mine = [t for t, s in stamps if s == f"lock {tag}"]
                if len(stamps) != 1 or not mine:
                    self.note(f"save {i}: {len(stamps)} install runs stamped, "
                              f"{len(mine)} with this save's content")
                if not finished.get("ok"):
                    self.note(f"save {i}: install failed: {finished.get('tail')}")
                if not mine:
                    continue
                pushes = [e for e in session.of_kind("pushed", since) if e["ts"] >= t0 - 0.001]
                row = {
                    "t0": t0,
                    "save_to_remote_start_s": mine[0] - t0,
                    "save_to_remote_file_s": arrived - t0,
                    "save_to_push_start_s": (pushes[0]["ts"] - pushes[0]["ms"] / 1000 - t0)
                    if pushes else None,
                    "save_to_started_event_s": started["ts"] - t0,
                    "remote_file_to_remote_start_s": mine[0] - arrived,
                    "started_event_to_remote_start_s": mine[0] - started["ts"],
                    "install_ms": finished.get("ms"),
                    "install_runs": len(session.of_kind("install_started", since)),
                }
                rows.append(row)
                say(f"  save {i + 1:2d}: install started on the remote after "
                    f"{row['save_to_remote_start_s'] * 1000:6.1f} ms (lock file there after "
                    f"{row['save_to_remote_file_s'] * 1000:5.1f} ms; install_started event at "
                    f"{row['save_to_started_event_s'] * 1000:5.0f} ms; run took "
                    f"{finished.get('ms')} ms)")
        finally:
            fallback = obs.fallback_hits
            await obs.close()
        if fallback:
            self.note(f"installs: {fallback} arrivals seen only by the 250 ms fallback check")

        def col(key: str) -> list[float]:
            return [r[key] for r in rows if r[key] is not None]

        self.results["save_to_install"] = {
            "n": len(rows),
            "new_ssh_logins": self.ssh_logins() - logins,
            "summary_ms": {k: stats_ms(col(k)) for k in (
                "save_to_remote_start_s", "save_to_remote_file_s", "save_to_push_start_s",
                "save_to_started_event_s", "remote_file_to_remote_start_s",
                "started_event_to_remote_start_s")},
            "install_ms": stats_ms([r["install_ms"] / 1000 for r in rows
                                    if r["install_ms"] is not None]),
            "saves": rows,
            "loadavg": Path("/proc/loadavg").read_text().split()[:3],
        }
        if self.results["save_to_install"]["new_ssh_logins"]:
            self.note(f"{self.results['save_to_install']['new_ssh_logins']} new SSH logins "
                      f"during the {n} lock-file saves (none expected: all should use the "
                      "master)")
        s = self.results["save_to_install"]["summary_ms"]
        say(f"  => save to install start: median {s['save_to_remote_start_s']['median']} ms, "
            f"p90 {s['save_to_remote_start_s']['p90']} ms; install_started event median "
            f"{s['save_to_started_event_s']['median']} ms")

    async def plain_ssh(self) -> None:
        """The baseline for an install start: one ssh command over an open master."""
        assert self.info is not None
        n = self.o.saves
        say(f"[4/4] baseline: {n} x `ssh HOST date +%s.%N` over an open ControlMaster")
        self.master = await PlainMaster(self.info.ssh_config, self.info.host,
                                        self.tmp / "plain-master.sock").start()
        starts: list[float] = []
        totals: list[float] = []
        argv = [*self.master.base, "-S", str(self.master.control), "-o", "ControlMaster=no",
                self.info.host, "date +%s.%N"]
        for _ in range(n):
            await asyncio.sleep(0.1 + random.uniform(0, 0.05))
            t0 = time.time()
            proc = await asyncio.create_subprocess_exec(
                *argv, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                stderr=subprocess.PIPE, env=self.env)
            out, err = await asyncio.wait_for(proc.communicate(), 30)
            t1 = time.time()
            if proc.returncode != 0:
                raise RuntimeError(f"plain ssh exited {proc.returncode}: {err.decode()[-300:]}")
            starts.append(float(out.split()[0]) - t0)
            totals.append(t1 - t0)
        await self.master.stop()
        self.master = None
        self.results["plain_ssh_command"] = {"start_ms": stats_ms(starts),
                                             "round_trip_ms": stats_ms(totals)}
        say(f"  => plain ssh: remote command started after "
            f"{statistics.median(starts) * 1000:.1f} ms, returned after "
            f"{statistics.median(totals) * 1000:.1f} ms (medians)")

    # -- driver -----------------------------------------------------------------

    async def run(self) -> None:
        self.setup()
        await self.start_services()
        session = await self.start_session()
        await self.edits(session)
        await self.installs(session)
        await self.stop_session(session)
        await self.supervisorctl_restarts()
        await self.plain_ssh()


# --------------------------------------------------------------------------
# report


SPLIT = ("to_sigterm_s", "sigterm_to_new_process_s", "new_process_to_answer_s")


def _ms3(values: list[float | None]) -> str:
    return " / ".join("-" if v is None else f"{v:.0f}" for v in values) + " ms"


def markdown(r: dict[str, Any]) -> str:
    rows: list[tuple[str, str, str]] = []
    e = r.get("edit_to_response")
    sc = r.get("supervisorctl_restart")
    if e:
        s = e["summary_ms"]
        resp, file_, ev, a = (s["edit_to_response_s"], s["edit_to_remote_file_s"],
                              s["edit_to_restarting_event_s"],
                              s["restarting_event_to_response_s"])
        rows.append((f"Edit to new HTTP response, median (N={e['n']})",
                     f"{resp['median']:.0f} ms",
                     f"the edited file is on the remote after {file_['median']:.0f} ms; "
                     f"`service_restarting` after {ev['median']:.0f} ms"))
        rows.append((f"Edit to new HTTP response, p99 (N={e['n']})", f"{resp['p99']:.0f} ms",
                     f"file on the remote: p99 {file_['p99']:.0f} ms"))
        if sc:
            cmp_a = (f"(b) `supervisorctl restart` by hand: new process answers after "
                     f"{sc['serving_ms']['median']:.0f} ms (p99 {sc['serving_ms']['p99']:.0f})")
        else:
            cmp_a = "-"
        rows.append(("(a) restart inside dev-sync: `service_restarting` event to new response, "
                     "median / p99", f"{a['median']:.0f} / {a['p99']:.0f} ms", cmp_a))
        parts = [s.get(f"restart_{k}", {}).get("median") for k in SPLIT]
        by_hand = [sc["split_ms"][k].get("median") for k in SPLIT] if sc else []
        rows.append(("(a) split, medians: to the old process's SIGTERM / to the new process "
                     "started / to its first answer", _ms3(parts),
                     f"(b) by hand: {_ms3(by_hand)}" if by_hand else "-"))
    if sc:
        c = sc["command_ms"]
        rows.append((f"(b) `supervisorctl restart api` until it returns, median / p99 "
                     f"(N={sc['n']})", f"{c['median']:.0f} / {c['p99']:.0f} ms",
                     f"waits for Supervisor's `startsecs = {sc['startsecs']}` s; the new "
                     f"process answers after {sc['serving_ms']['median']:.0f} ms"))
    if e:
        rows.append(("`service_restarted` event, its `ms` (median)",
                     f"{e['restarted_event_ms_median']:.0f} ms",
                     "restart plus dev-sync's 3 s crash watch; the next restart waits for it"))
    d = r.get("save_to_install")
    plain = r.get("plain_ssh_command")
    if d:
        s = d["summary_ms"]
        start, file_, ev = (s["save_to_remote_start_s"], s["save_to_remote_file_s"],
                            s["save_to_started_event_s"])
        base = (f"; one plain `ssh` command over an open master starts "
                f"{plain['start_ms']['median']:.0f} ms after it is run") if plain else ""
        rows.append((f"Lock-file save to install command started on the remote, median / p90 "
                     f"(N={d['n']})", f"{start['median']:.0f} / {start['p90']:.0f} ms",
                     f"the lock file is on the remote after {file_['median']:.0f} / "
                     f"{file_['p90']:.0f} ms{base}"))
        rows.append(("Lock-file save to `install_started` event, median / p90",
                     f"{ev['median']:.0f} / {ev['p90']:.0f} ms",
                     "the event is printed just before the ssh command is started"))
        rows.append(("Whole install run (`install_finished` ms, a one-line command), median",
                     f"{d['install_ms']['median']:.0f} ms",
                     f"plain ssh command round trip: {plain['round_trip_ms']['median']:.0f} ms"
                     if plain else "-"))
    lines = ["| figure | value | what it compares to |", "|---|---:|---|"]
    lines += ["| " + " | ".join(row) + " |" for row in rows]
    m = r["machine"]
    lines += ["", f"Loopback SSH to a private sshd (no shell rc files); {m['cores']} cores, "
              f"{m['cpu']}, Linux {m['kernel']}, {m['ssh'].split(',')[0]}, supervisor "
              f"{r.get('supervisor_version', '?')}, Python {m['python']}; dev-sync "
              f"{m['dev_sync']} ({m['commit']}); load average at start "
              f"{' '.join(m['loadavg_at_start'])}."]
    logins = [(x["new_ssh_logins"], x["n"], what) for x, what in
              ((e, "edits"), (d, "lock-file saves")) if x and x.get("new_ssh_logins")]
    if logins:
        lines.append("dev-sync opened new SSH connections while measuring ("
                     + ", ".join(f"{a} during {b} {w}" for a, b, w in logins)
                     + "): its ControlMaster was not used, so each push, install and restart "
                     "paid a key exchange.")
    if r.get("errors"):
        lines.append("Failed: " + "; ".join(f"{k}: {v}" for k, v in r["errors"].items()))
    return "\n".join(lines)


def parse_args(argv: list[str] | None) -> Options:
    ap = argparse.ArgumentParser(description="Benchmark dev-sync's remote actions.")
    ap.add_argument("--quick", action="store_true", help="8 of each instead of 30")
    ap.add_argument("--edits", type=int, help="edits of server.py (default 30; --quick 8)")
    ap.add_argument("--restarts", type=int,
                    help="supervisorctl restarts by hand (default: as many as edits)")
    ap.add_argument("--saves", type=int, help="lock-file saves (default 30; --quick 8)")
    ap.add_argument("--gap-ms", type=float, default=250.0,
                    help="pause after each measurement before the next (plus 0-100 ms)")
    a = ap.parse_args(argv)
    n = 8 if a.quick else 30
    edits = a.edits or n
    return Options(quick=a.quick, edits=edits, restarts=a.restarts or edits,
                   saves=a.saves or n, gap=a.gap_ms / 1000)


async def amain(opts: Options) -> int:
    t_start = time.monotonic()
    bench = ActionsBench(opts)
    results = bench.results
    results["machine"] = machine()
    ver = subprocess.run(["supervisord", "--version"], capture_output=True, text=True,
                         check=False)
    results["supervisor_version"] = ver.stdout.strip() or "?"
    results["options"] = vars(opts)
    results["started"] = time.strftime("%Y-%m-%dT%H:%M:%S%z")
    loop = asyncio.get_running_loop()
    me = asyncio.current_task()
    assert me is not None
    loop.add_signal_handler(signal.SIGTERM, me.cancel)
    try:
        await bench.run()
    except asyncio.CancelledError:
        raise
    except Exception as exc:
        results["errors"] = {"run": f"{type(exc).__name__}: {exc}"}
        bench.note(f"failed: {type(exc).__name__}: {exc}")
    finally:
        await bench.teardown()
    save_results(results, bench.anomalies, t_start, "actions-", opts.quick)
    print(markdown(results))
    return 1 if results.get("errors") else 0


def main(argv: list[str] | None = None) -> int:
    opts = parse_args(argv)
    try:
        return asyncio.run(amain(opts))
    except (KeyboardInterrupt, asyncio.CancelledError):
        say("interrupted")
        return 130


if __name__ == "__main__":
    sys.exit(main())
