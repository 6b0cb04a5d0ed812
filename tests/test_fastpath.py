"""The fast path end to end: a real sshd, a real agent on the remote, real files."""

from __future__ import annotations

import asyncio
import os
import shutil
import signal
import subprocess
from pathlib import Path

import pytest
from driver import Event, Session, json_events, run_cli
from helpers import Project, TcpProxy, children, processes, ssh_run, wait_in_sync, wait_until

from dev_sync import deps
from dev_sync.agent import VERSION, Agent, Channel
from dev_sync.runner import CommandError
from dev_sync.ssh import SshMaster, Target


@pytest.fixture(autouse=True)
def _isolated(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("DEV_SYNC_STATE_DIR", str(tmp_path / "state"))
    # The sandbox logs in as this user: keep the agent's cached copy out of ~.
    monkeypatch.setenv("DEV_SYNC_AGENT_CACHE", str(tmp_path / "agent-cache" / "agent.py"))


def excluded(rel: str) -> bool:
    parts = rel.split("/")
    return "node_modules" in parts or ".git" in parts or parts[0] == ".dev-sync"


def pushed_via(s: Session, path: str, via: str = "agent", timeout: float = 15) -> Event:
    return s.wait_for("pushed", lambda e: path in e["sample"] and e["via"] == via,
                      timeout=timeout)


def start(project: Project, *extra: str) -> Session:
    s = Session(project.config, *extra)
    s.wait_for("agent_ready", timeout=60)
    s.wait_watching()
    return s


def test_every_kind_of_change_goes_through_the_agent(project: Project) -> None:
    local = project.local
    (local / "src").mkdir()
    (local / "src" / "a.py").write_text("a = 1\n")
    (local / "node_modules" / "dep").mkdir(parents=True)
    (local / "node_modules" / "dep" / "index.js").write_text("local dep")
    with start(project) as s:
        wait_in_sync(local, project.remote, ignore=excluded)
        # The remote installed its own dependencies: they must survive everything below.
        (project.remote / "node_modules" / "remote-only").mkdir(parents=True)
        (project.remote / "node_modules" / "remote-only" / "x.js").write_text("remote")

        (local / "src" / "a.py").write_text("a = 2\n")
        pushed_via(s, "src/a.py")
        (local / "src" / "b.py").write_text("b\n")
        (local / "run.sh").write_text("#!/bin/sh\n")
        (local / "run.sh").chmod(0o755)
        os.symlink("src/a.py", local / "link")
        wait_in_sync(local, project.remote, ignore=excluded)
        os.unlink(local / "link")
        os.symlink("src/b.py", local / "link")
        (local / "src" / "a.py").unlink()
        (local / "deep" / "er").mkdir(parents=True)
        (local / "deep" / "er" / "f.txt").write_text("filled after mkdir -p")
        (local / "src" / "b.py").rename(local / "src" / "c.py")
        wait_in_sync(local, project.remote, ignore=excluded)
        # A folder renamed, a file replaced by a folder and back.
        (local / "deep").rename(local / "shallow")
        (local / "run.sh").unlink()
        (local / "run.sh").mkdir()
        (local / "run.sh" / "inside").write_text("now a folder")
        wait_in_sync(local, project.remote, ignore=excluded)
        shutil.rmtree(local / "run.sh")
        (local / "run.sh").write_text("a file again")
        wait_in_sync(local, project.remote, ignore=excluded)
        assert (project.remote / "node_modules" / "remote-only" / "x.js").read_text() == "remote"
        assert [e for e in s.of_kind("pushed") if e["via"] == "agent"]
        assert not s.of_kind("conflict_kept")
        assert s.stop() == 0
    # No temporary file of the agent is ever left behind.
    assert not [p for p in project.remote.rglob("*") if p.name.startswith(".~dev-sync.")]


def test_a_new_folder_moved_in_arrives_whole_through_the_agent(
    project: Project, tmp_path: Path
) -> None:
    """A folder that appears with its contents (moved in, unpacked) is walked and sent
    through the agent in one go: nested folders, a symlink, an executable, modes
    and times; what the rules exclude inside it stays out, and a fifo is skipped."""
    outside = tmp_path / "outside" / "pkg"
    (outside / "sub" / "deeper").mkdir(parents=True)
    (outside / "sub" / "x.txt").write_text("x")
    (outside / "sub" / "deeper" / "y.txt").write_text("y" * 5000)
    (outside / "run.sh").write_text("#!/bin/sh\n")
    (outside / "run.sh").chmod(0o750)
    os.utime(outside / "sub" / "x.txt", ns=(1_600_000_000_000_000_000,) * 2)
    os.symlink("sub/x.txt", outside / "link")
    os.mkfifo(outside / "pipe")
    (outside / "node_modules" / "dep").mkdir(parents=True)
    (outside / "node_modules" / "dep" / "i.js").write_text("excluded")
    with start(project) as s:
        wait_in_sync(project.local, project.remote, ignore=excluded)
        since = len(s.events)
        outside.rename(project.local / "pkg")
        pushed_via(s, "pkg")
        wait_in_sync(project.local, project.remote,
                     ignore=lambda rel: excluded(rel) or rel == "pkg/pipe")
        remote = project.remote / "pkg"
        assert not (remote / "node_modules").exists()
        assert not (remote / "pipe").exists()
        assert (remote / "run.sh").stat().st_mode & 0o777 == 0o750
        assert (remote / "sub" / "x.txt").stat().st_mtime_ns == 1_600_000_000_000_000_000
        assert os.readlink(remote / "link") == "sub/x.txt"
        assert {e["via"] for e in s.events[since:] if e["event"] == "pushed"} == {"agent"}
        # Too big as a whole (each file alone would fit): rsync sends that folder.
        big = tmp_path / "outside" / "big"
        big.mkdir()
        for n in range(3):
            (big / f"part{n}.bin").write_bytes(os.urandom(400_000))
        big.rename(project.local / "big")
        pushed_via(s, "big", via="rsync")
        wait_in_sync(project.local, project.remote,
                     ignore=lambda rel: excluded(rel) or rel == "pkg/pipe")
        assert s.stop() == 0


HOSTILE = ["-e", "--delete", "$(touch pwned)", "`id`", "a b", "new\nline", "back\\slash",
           "'single'", '"double"', "ünïcødé ☃", "#comment", ";semi", "x" * 200]


def test_hostile_names_are_data(project: Project) -> None:
    with start(project) as s:
        for name in HOSTILE:
            (project.local / name).write_text(name)
        (project.local / "-dir").mkdir()
        (project.local / "-dir" / "$(rm -rf ~)").write_text("inert")
        wait_in_sync(project.local, project.remote, ignore=excluded)
        for name in HOSTILE[:4]:
            (project.local / name).unlink()
        wait_in_sync(project.local, project.remote, ignore=excluded)
        assert not (project.remote / "pwned").exists() and not Path("pwned").exists()
        assert any(e["via"] == "agent" for e in s.of_kind("pushed"))


def test_big_files_go_through_rsync_and_renames_reuse_remote_content(project: Project) -> None:
    project.write_config(agent_max_bytes=512 * 1024)
    payload = os.urandom(300 * 1024)
    with start(project) as s:
        (project.local / "big.bin").write_bytes(os.urandom(700 * 1024))
        pushed_via(s, "big.bin", via="rsync")
        (project.local / "medium.bin").write_bytes(payload)
        pushed_via(s, "medium.bin")
        (project.local / "medium.bin").rename(project.local / "renamed.bin")
        event = s.wait_for("pushed", lambda e: "renamed.bin" in e["sample"])
        assert event["via"] == "agent" and event["bytes"] == 0, event  # moved, not sent
        shutil.copy2(project.local / "renamed.bin", project.local / "copy.bin")
        event = s.wait_for("pushed", lambda e: "copy.bin" in e["sample"])
        assert event["bytes"] == 0, event  # copied on the remote
        wait_in_sync(project.local, project.remote, ignore=excluded)
        assert (project.remote / "copy.bin").read_bytes() == payload


def test_a_remote_edit_is_kept_as_a_conflict_copy(project: Project) -> None:
    (project.local / "config.yml").write_text("local v1\n")
    (project.local / "gone.txt").write_text("v1\n")
    with start(project) as s:
        wait_in_sync(project.local, project.remote, ignore=excluded)
        # Someone edits the file on the VM, over ssh.
        ssh_run(project.sandbox, ["sh", "-c", 'printf "edited on the VM\\n" > "$1"', "sh",
                                  str(project.remote / "config.yml")])
        ssh_run(project.sandbox, ["sh", "-c", 'printf "VM notes\\n" >> "$1"', "sh",
                                  str(project.remote / "gone.txt")])
        (project.local / "config.yml").write_text("local v2\n")
        (project.local / "gone.txt").unlink()
        first = s.wait_for("conflict_kept", timeout=15)
        second = s.wait_for("conflict_kept", timeout=15)
        kept = {e["path"]: project.remote / e["kept"] for e in (first, second)}
        assert kept["config.yml"].read_text() == "edited on the VM\n"
        assert kept["gone.txt"].read_text() == "v1\nVM notes\n"
        assert "/conflicts/" in str(kept["config.yml"])
        wait_in_sync(project.local, project.remote, ignore=excluded)
        assert (project.remote / "config.yml").read_text() == "local v2\n"
        status = subprocess.run(
            [os.sys.executable, "-m", "dev_sync", "status", "--json", "--config",  # type: ignore[attr-defined]
             str(project.config)], capture_output=True, text=True, check=True)
        assert "config.yml" in status.stdout and "fast_path" in status.stdout


def test_an_old_agent_on_the_remote_is_replaced(project: Project, tmp_path: Path) -> None:
    cache = tmp_path / "agent-cache" / "agent.py"
    cache.parent.mkdir(parents=True)
    cache.write_text("# dev-sync agent 0000000000000000\nraise SystemExit('old agent ran')\n")
    with start(project) as s:
        assert s.of_kind("agent_ready")[0]["version"] == VERSION
        assert cache.read_text().startswith(f"# dev-sync agent {VERSION}\n")
        (project.local / "f").write_text("x")
        pushed_via(s, "f")
    # The next start runs the cached copy without sending it again.
    with start(project) as s:
        (project.local / "g").write_text("y")
        pushed_via(s, "g")


def test_without_python_on_the_remote_rsync_does_everything(project: Project) -> None:
    project.write_config(remote={"python": "python3-not-installed"})
    with Session(project.config) as s:
        s.wait_watching()
        problems = s.of_kind("problem")
        assert len([p for p in problems if "fast path off" in p["cause"]]) == 1, problems
        assert "python3" in problems[0]["fix"]
        (project.local / "f.txt").write_text("still synced")
        pushed_via(s, "f.txt", via="rsync")
        assert not s.of_kind("agent_ready")


def test_doctor_says_whether_the_fast_path_can_run(project: Project) -> None:
    ok = run_cli("doctor", "--config", str(project.config))
    assert ok.returncode == 0, ok.stdout + ok.stderr
    assert "the agent runs on python3 3." in ok.stdout
    project.write_config(remote={"python": "python3-not-installed"})
    missing = run_cli("doctor", "--config", str(project.config))
    assert missing.returncode == 0, missing.stdout  # a warning: everything still syncs
    assert "python3-not-installed is not available on the remote" in missing.stdout
    assert "Python 3.8" in missing.stdout


def _processes_naming(path: Path) -> list[int]:
    return processes(lambda args: str(path).encode() in args)


def _agent_pids(project: Project) -> list[int]:
    """The remote agent's python process."""
    root = str(project.remote).encode()
    return processes(lambda args: b"python" in args[0] and root in args and b"-c" in args)


def test_a_killed_agent_is_restarted_and_nothing_is_lost(project: Project) -> None:
    with start(project) as s:
        pids = wait_until(lambda: _agent_pids(project), message="no agent process found")
        for i in range(300):
            (project.local / f"burst-{i:03}.txt").write_text(str(i) * 100)
        os.kill(pids[0], signal.SIGKILL)
        for i in range(300, 400):
            (project.local / f"burst-{i:03}.txt").write_text(str(i) * 100)
        s.wait_for("problem", lambda e: "agent stopped" in e["cause"], timeout=30)
        s.wait_for("agent_ready", timeout=30)
        wait_in_sync(project.local, project.remote, ignore=excluded, timeout=30)
        (project.local / "after.txt").write_text("after")
        pushed_via(s, "after.txt")
        assert s.stop() == 0


def _nsenter(project: Project) -> list[str]:
    return ["nsenter", "--target", str(project.sandbox.pid), "--mount"]


@pytest.mark.skipif(os.geteuid() != 0, reason="mounting a small tmpfs needs root")
def test_a_full_disk_is_reported_per_path_and_retried(project: Project) -> None:
    ns = _nsenter(project)
    (project.local / "full").mkdir()
    with start(project) as s:
        full = project.remote / "full"
        wait_until(full.is_dir)
        subprocess.run([*ns, "mount", "-t", "tmpfs", "-o", "size=256k", "tmpfs", str(full)],
                       check=True)
        try:
            (project.local / "full" / "a.bin").write_bytes(os.urandom(400 * 1024))
            # The agent's answer names the file (a reconcile's rsync may also report).
            problem = s.wait_for("problem", lambda e: "full/a.bin" in e["cause"], timeout=30)
            assert "is full" in problem["cause"] and "free space" in problem["fix"], problem
            leftovers = ssh_run(project.sandbox, ["ls", "-A", str(full)]).out.split()
            assert leftovers == [], leftovers  # nothing half-written
            # Each later change retries once, not in a loop.
            (project.local / "other.txt").write_text("other")
            s.wait_for("problem", lambda e: "full" in e["cause"], timeout=30)
            assert len(s.of_kind("problem")) < 5, s.of_kind("problem")
            assert s.proc.poll() is None
            (project.local / "full" / "a.bin").write_bytes(b"small now")
            # The small disk is mounted where the remote side sees it: look through ssh.
            wait_until(lambda: ssh_run(project.sandbox, ["cat", str(full / "a.bin")],
                                       check=False).out == "small now", timeout=30)
        finally:
            subprocess.run([*ns, "umount", "-l", str(full)], check=False)
        assert s.stop() == 0


@pytest.mark.skipif(os.geteuid() != 0, reason="a read-only bind mount needs root")
def test_a_read_only_folder_is_reported_per_path(project: Project) -> None:
    ns = _nsenter(project)
    (project.local / "ro").mkdir()
    (project.local / "ro" / "old.txt").write_text("old")
    with start(project) as s:
        ro = project.remote / "ro"
        wait_in_sync(project.local, project.remote, ignore=excluded)
        subprocess.run([*ns, "mount", "--bind", str(ro), str(ro)], check=True)
        subprocess.run([*ns, "mount", "-o", "remount,bind,ro", str(ro)], check=True)
        try:
            (project.local / "ro" / "b.txt").write_text("b")
            problem = s.wait_for("problem", lambda e: "ro/b.txt" in e["cause"], timeout=30)
            assert "refused" in problem["cause"] and "permissions" in problem["fix"], problem
            assert s.proc.poll() is None
        finally:
            subprocess.run([*ns, "umount", "-l", str(ro)], check=False)
        (project.local / "ro" / "c.txt").write_text("c")
        wait_in_sync(project.local, project.remote, ignore=excluded, timeout=30)
        assert s.stop() == 0


def test_the_agent_needs_no_ssh_process_of_its_own(project: Project) -> None:
    with start(project) as s:
        (project.local / "a.txt").write_text("a")
        pushed_via(s, "a.txt")
        ssh = [args for _, name, args in children(s.proc.pid) if name == "ssh"]
        assert len(ssh) == 1 and b"-M" in ssh[0], ssh  # the master, nothing else
        assert s.stop() == 0


@pytest.mark.parametrize("direct", [True, False], ids=["on-the-master", "ssh-client"])
async def test_remote_commands_ride_the_agent(project: Project, direct: bool) -> None:
    target = Target(project.sandbox.host, None, None, project.sandbox.ssh_config, 10.0)
    master = SshMaster(target)
    await master.connect()
    project.remote.mkdir()
    try:
        agent = await Agent.start(master, str(project.remote), direct=direct)
        ssh_children = [name for _, name, _ in children(os.getpid()) if name == "ssh"]
        assert len(ssh_children) == (1 if direct else 2)
        channel = Channel(master)
        parent = ["sh", "-c", 'tr "\\0" " " < /proc/$PPID/cmdline']
        via_ssh = await channel.run(parent)
        channel.agent = agent
        via_agent = await channel.run(parent)
        assert VERSION in via_agent.out and VERSION not in via_ssh.out
        assert (await channel.run(["cat"], input=b"piped \x00 data")).stdout == b"piped \x00 data"
        with pytest.raises(CommandError) as failed:
            await channel.run(["sh", "-c", "echo oops >&2; exit 3"])
        assert failed.value.returncode == 3 and "oops" in failed.value.err
        missing = await channel.run(["no-such-program-here"], check=False)
        assert missing.returncode == 127 and "no-such-program-here: not found" in missing.err
        # Commands run side by side on one agent, and files go on meanwhile.
        slow = asyncio.ensure_future(channel.run(["sh", "-c", "sleep 0.5; echo slow"]))
        reply = await agent.call({"op": "write", "path": "w.txt", "mode": 0o644,
                                  "mtime_ns": 0}, b"written")
        assert reply.ok and not slow.done()
        assert (await slow).out == "slow\n"
        # Installs stream through it, merged and as they come; cancelling stops them.
        lines: list[str] = []
        result = await deps.stream(master, deps.command_argv(
            str(project.remote), "", 'echo out; echo err >&2; exit 4'), lines.append, via=channel)
        assert result.returncode == 4 and lines == ["out", "err"]
        marker = project.remote / "still-running"
        long = asyncio.ensure_future(deps.stream(master, deps.command_argv(
            str(project.remote), "", 'echo started; while :; do touch "$1"; sleep 0.05; done',
            [str(marker)]), lines.append, via=channel))
        await asyncio.to_thread(wait_until, marker.exists)
        long.cancel()
        with pytest.raises(asyncio.CancelledError):
            await long
        await asyncio.to_thread(wait_until, lambda: not _processes_naming(marker),
                                message="the remote command outlived its cancellation")
        await agent.close()
        # A closed agent: the channel falls back to ssh.
        assert (await channel.run(["echo", "fallback"])).out == "fallback\n"
    finally:
        await master.close()


def test_edits_made_on_the_vm_while_dev_sync_was_away_are_kept(project: Project) -> None:
    project.write_config(exclude=["*.log"])
    (project.local / "app.py").write_text("v1\n")
    (project.local / "notes.md").write_text("n1\n")
    (project.local / "server.log").write_text("local log\n")
    with start(project) as s:
        wait_in_sync(project.local, project.remote, ignore=lambda r: excluded(r) or
                     r.endswith(".log"))
        assert s.stop() == 0
    # While dev-sync is stopped: edits on the VM, a log the VM writes (excluded), a local edit.
    remote = project.remote
    ssh_run(project.sandbox, ["sh", "-c", 'printf "vm edit\\n" > "$1"; printf "vm log\\n" > "$2"; '
                              'printf "scratch\\n" > "$3"',
                              "sh", str(remote / "app.py"), str(remote / "server.log"),
                              str(remote / "scratch.txt")])
    (project.local / "notes.md").write_text("n2\n")
    # --once reconciles too, and keeps the VM's edit first.
    result = subprocess.run([os.sys.executable, "-m", "dev_sync", "up", "--once", "--json",  # type: ignore[attr-defined]
                             "--config", str(project.config)], capture_output=True, text=True,
                            timeout=60, check=False)
    assert result.returncode == 0, result.stderr
    kept = {e["path"]: remote / e["kept"] for e in json_events(result.stdout)
            if e["event"] == "conflict_kept"}
    assert sorted(kept) == ["app.py", "scratch.txt"], result.stdout
    assert kept["app.py"].read_text() == "vm edit\n"
    # Made on the VM alone: the reconcile mirrors the local tree, but keeps it first.
    assert kept["scratch.txt"].read_text() == "scratch\n"
    assert not (remote / "scratch.txt").exists()
    assert (remote / "app.py").read_text() == "v1\n"
    assert (remote / "notes.md").read_text() == "n2\n"
    assert (remote / "server.log").read_text() == "vm log\n"  # excluded: never touched
    # And in a watching session: nothing new to keep, nothing kept twice.
    ssh_run(project.sandbox, ["sh", "-c", 'printf "again\\n" >> "$1"', "sh",
                              str(remote / "notes.md")])
    with start(project) as s:  # the reconcile, and so the keeping, is done by then
        assert [e["path"] for e in s.of_kind("conflict_kept")] == ["notes.md"]
        wait_in_sync(project.local, project.remote, ignore=lambda r: excluded(r) or
                     r.endswith(".log"))
        assert len(s.of_kind("conflict_kept")) == 1


def test_a_watching_session_marks_the_vm_as_in_use(project: Project) -> None:
    activity = Path.home() / ".local" / "state" / "dev-sync" / "activity"
    with start(project) as s:
        before = activity.stat().st_mtime_ns  # the session start marked it already
        (project.local / "edit.txt").write_text("x")
        pushed_via(s, "edit.txt")
        wait_until(lambda: activity.stat().st_mtime_ns > before, timeout=10,
                   message="the activity file was not touched after a push")


@pytest.mark.parametrize("max_delay_ms", [2, 25, 150])
def test_a_burst_written_while_batches_flow_lands_whole(
    project: Project, max_delay_ms: int
) -> None:
    """Rewrites and new folders while earlier batches are still on their way (a
    20 ms link each way keeps several in flight): the last content of every
    file arrives, however the burst is cut into batches."""
    local = project.local
    for d in range(20):
        (local / "src" / f"d{d}").mkdir(parents=True)
        for f in range(20):
            (local / "src" / f"d{d}" / f"f{f}.ts").write_text(f"original {d} {f}\n" * 40)
    with TcpProxy(project.sandbox.port, delay=0.02) as proxy:
        project.write_config(remote=project.via_proxy(proxy), max_delay_ms=max_delay_ms)
        with start(project) as s:
            wait_in_sync(local, project.remote, ignore=excluded, timeout=30)
            for round_ in range(3):
                for d in range(20):
                    for f in range(0, 20, 2):
                        path = local / "src" / f"d{d}" / f"f{f}.ts"
                        with open(path, "wb") as fh:  # an editor's plain save
                            fh.write(f"round {round_} {d} {f}\n".encode() * (30 + round_))
                    new = local / "src" / f"d{d}" / f"co-{round_}"
                    new.mkdir()
                    for k in range(5):
                        (new / f"n{k}.ts").write_text(f"new {round_} {k}\n" * 20)
            wait_in_sync(local, project.remote, ignore=excluded, timeout=30)
            assert s.stop() == 0


async def test_a_master_that_refuses_the_session_falls_back_to_an_ssh_client(
    project: Project, monkeypatch: pytest.MonkeyPatch
) -> None:
    from dev_sync import mux

    async def refused(*_args: object, **_kwargs: object) -> mux.MuxSession:
        raise mux.MuxError("the master refused the session: Session open refused by peer")

    target = Target(project.sandbox.host, None, None, project.sandbox.ssh_config, 10.0)
    master = SshMaster(target)
    await master.connect()
    project.remote.mkdir()
    monkeypatch.setattr(mux, "open_session", refused)
    try:
        agent = await Agent.start(master, str(project.remote))
        assert [name for _, name, _ in children(os.getpid())].count("ssh") == 2
        assert (await agent.exec(["echo", "via a client"])).stdout == b"via a client\n"
        await agent.close()
    finally:
        await master.close()


def test_runs_of_writes_travel_as_one_request_and_come_back_per_file() -> None:
    from dev_sync.agent import Reply
    from dev_sync.fastpath import _Op, _per_step, _requests

    def write(rel: str, data: bytes) -> tuple[_Op, dict[str, object], bytes]:
        return (_Op(rel, "write", len(data)),
                {"op": "write", "path": rel, "mode": 0o644, "mtime_ns": 7}, data)

    mkdir_meta: dict[str, object] = {"op": "mkdir", "path": "d", "mode": 0o755}
    delete_meta: dict[str, object] = {"op": "delete", "path": "x"}
    mkdir = (_Op("d", "mkdir"), mkdir_meta, b"")
    delete = (_Op("x", "delete"), delete_meta, b"")
    part = [write("a", b"1"), write("b", b"22"), mkdir, write("d/c", b"333"), delete,
            write("e", b""), write("-e", b"55555")]
    requests, shape = _requests(part)
    assert shape == [2, 0, 0, 0, 2]
    assert requests[0] == ({"op": "writes", "files": [["a", 0o644, 7, 1, None],
                                                      ["b", 0o644, 7, 2, None]]}, b"122")
    assert [meta["op"] for meta, _ in requests] == ["writes", "mkdir", "write", "delete",
                                                    "writes"]
    assert requests[4][1] == b"55555"

    ok = Reply(True, {"ok": True})
    group = Reply(True, {"ok": True, "results": [
        {"ok": True, "conflict": "c"}, {"ok": False, "refused": True}]})
    whole = Reply(False, {"ok": False, "errno": "ENOSPC", "error": "full"})
    steps = _per_step([group, ok, ok, ok, whole], shape)
    assert [(r.ok, r.refused) for r in steps] == [
        (True, False), (False, True), (True, False), (True, False), (True, False),
        (False, False), (False, False)]
    assert steps[0].meta["conflict"] == "c" and steps[6].meta["errno"] == "ENOSPC"
