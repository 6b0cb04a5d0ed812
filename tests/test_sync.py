"""End-to-end sync against a real sshd and real rsync: reconcile, watch, safety, faults."""

from __future__ import annotations

import os
import signal
import subprocess
import time
from pathlib import Path

import pytest
from driver import Session, json_events, run_cli, ssh_processes
from helpers import Project, TcpProxy, ssh_run, tree_snapshot, wait_in_sync, wait_until

from dev_sync.ssh import Target


@pytest.fixture(autouse=True)
def _state_dir(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("DEV_SYNC_STATE_DIR", str(tmp_path / "state"))


def excluded(rel: str) -> bool:
    parts = rel.split("/")
    return "node_modules" in parts or ".git" in parts


def make_tree(root: Path) -> None:
    (root / "src" / "pkg").mkdir(parents=True)
    (root / "src" / "pkg" / "mod.py").write_text("print('hi')\n")
    (root / "src" / "main.py").write_text("import pkg\n")
    (root / "bin").mkdir()
    (root / "bin" / "run").write_text("#!/bin/sh\necho run\n")
    (root / "bin" / "run").chmod(0o755)
    (root / "empty" / "nested").mkdir(parents=True)
    os.symlink("src/main.py", root / "link-to-main")
    os.symlink("does/not/exist", root / "dangling")
    (root / "blob.bin").write_bytes(bytes(range(256)) * 400)
    (root / "node_modules" / "left").mkdir(parents=True)
    (root / "node_modules" / "left" / "index.js").write_text("x")
    (root / ".git").mkdir()
    (root / ".git" / "HEAD").write_text("ref: refs/heads/main\n")


def once(project: Project, *args: str) -> subprocess.CompletedProcess[str]:
    return run_cli("up", "--once", "--json", "--config", str(project.config), *args)


def reconciled(result: subprocess.CompletedProcess[str]) -> dict[str, int]:
    events = [e for e in json_events(result.stdout) if e["event"] == "reconciled"]
    assert events, result.stdout + result.stderr
    return events[-1]


# -- reconcile -------------------------------------------------------------------


def test_once_mirrors_tree_and_second_run_sends_nothing(project: Project) -> None:
    make_tree(project.local)
    result = once(project)
    assert result.returncode == 0, result.stderr
    wait_in_sync(project.local, project.remote, ignore=excluded, timeout=1)
    assert (project.remote / ".dev-sync-root").is_file()
    assert not (project.remote / "node_modules").exists()
    assert not (project.remote / ".git").exists()
    assert os.access(project.remote / "bin" / "run", os.X_OK)
    assert os.readlink(project.remote / "link-to-main") == "src/main.py"
    assert (project.remote / "empty" / "nested").is_dir()
    assert reconciled(result)["files"] > 0

    again = once(project)
    assert again.returncode == 0, again.stderr
    assert reconciled(again)["files"] == 0
    assert reconciled(again)["deleted"] == 0


def test_once_propagates_deletions_but_keeps_excluded_remote_content(project: Project) -> None:
    make_tree(project.local)
    assert once(project).returncode == 0
    # Installed on the remote only: must survive every sync.
    (project.remote / "node_modules" / "dep").mkdir(parents=True)
    (project.remote / "node_modules" / "dep" / "index.js").write_text("remote")
    (project.remote / "src" / "node_modules" / "x").mkdir(parents=True)
    (project.remote / "remote-only.log").write_text("log")
    (project.local / ".gitignore").write_text("*.log\n")
    (project.local / "src" / "main.py").unlink()
    (project.local / "empty" / "nested").rmdir()
    result = once(project)
    assert result.returncode == 0, result.stderr
    wait_in_sync(project.local, project.remote,
                 ignore=lambda r: excluded(r) or r.endswith(".log"), timeout=1)
    assert (project.remote / "node_modules" / "dep" / "index.js").read_text() == "remote"
    assert (project.remote / "src" / "node_modules" / "x").is_dir()
    assert (project.remote / "remote-only.log").exists()


def test_gitignore_nested_and_negation(project: Project) -> None:
    (project.local / ".gitignore").write_text("*.tmp\nbuild/\n")
    (project.local / "a").mkdir()
    (project.local / "a" / ".gitignore").write_text("!keep.tmp\nsecret.txt\n")
    for rel in ["x.tmp", "a/keep.tmp", "a/drop.tmp", "a/secret.txt", "a/ok.txt", "build/out.js"]:
        (project.local / rel).parent.mkdir(parents=True, exist_ok=True)
        (project.local / rel).write_text(rel)
    project.write_config(exclude=["*.secret"])
    (project.local / "k.secret").write_text("k")
    assert once(project).returncode == 0
    have = set(tree_snapshot(project.remote))
    assert "a/keep.tmp" in have and "a/ok.txt" in have
    for gone in ["x.tmp", "a/drop.tmp", "a/secret.txt", "build", "k.secret"]:
        assert gone not in have


HOSTILE = [
    "with space.txt",
    "new\nline.txt",
    "-e",
    "--delete",
    "$(touch PWNED)",
    "`touch PWNED`",
    "quote'single.txt",
    'quote"double.txt',
    "back\\slash.txt",
    "ünïcødé-日本.txt",
    "semi;colon&amp|pipe.txt",
    "star*?[x].txt",
    "#hash.txt",
    "L" * 240,
]


def test_hostile_names_are_data(project: Project) -> None:
    d = project.local / "-dir with $(x)"
    d.mkdir()
    for name in HOSTILE:
        (project.local / name).write_text(name)
        (d / name).write_text(name)
    result = once(project)
    assert result.returncode == 0, result.stderr
    wait_in_sync(project.local, project.remote, timeout=1)
    assert not list(Path("/").glob("PWNED")) and not (project.remote / "PWNED").exists()
    assert not (project.local / "PWNED").exists()


# -- safety ----------------------------------------------------------------------


def test_refuses_non_empty_root_without_marker_unless_adopted(project: Project) -> None:
    project.remote.mkdir()
    (project.remote / "precious.txt").write_text("keep me")
    (project.local / "a.txt").write_text("a")
    result = once(project)
    assert result.returncode == 1
    assert "not empty" in result.stderr and "--adopt" in result.stderr
    assert (project.remote / "precious.txt").read_text() == "keep me"
    assert not (project.remote / "a.txt").exists()

    adopted = once(project, "--adopt")
    assert adopted.returncode == 0, adopted.stderr
    assert (project.remote / "a.txt").exists() and (project.remote / ".dev-sync-root").exists()


def test_mass_deletion_stops_without_deleting(project: Project) -> None:
    for i in range(120):
        (project.local / f"f{i:03}.txt").write_text(str(i))
    assert once(project).returncode == 0
    for i in range(120):
        (project.local / f"f{i:03}.txt").unlink()
    result = once(project)
    assert result.returncode == 1
    assert "refusing to delete" in result.stderr and "--allow-delete" in result.stderr
    assert len(list(project.remote.glob("f*.txt"))) == 120
    forced = once(project, "--allow-delete")
    assert forced.returncode == 0, forced.stderr
    assert not list(project.remote.glob("f*.txt"))


def test_unreachable_host_exits_1_with_cause(project: Project) -> None:
    with TcpProxy(project.sandbox.port) as proxy:
        project.write_config(remote={**project.via_proxy(proxy), "connect_timeout": 3})
        proxy.cut()
        started = time.monotonic()
        result = once(project)
    assert result.returncode == 1
    assert "refused" in result.stderr and "fix:" in result.stderr
    assert time.monotonic() - started < 10


def test_unknown_host_says_dns(project: Project) -> None:
    project.write_config(remote={"host": "no-such-host.invalid", "ssh_config": "/dev/null",
                                 "connect_timeout": 3})
    result = once(project)
    assert result.returncode == 1
    assert "resolve" in result.stderr


# -- watching --------------------------------------------------------------------


def test_watch_pushes_every_kind_of_change(project: Project) -> None:
    make_tree(project.local)
    local, remote = project.local, project.remote
    with Session(project.config) as s:
        s.wait_watching()
        wait_in_sync(local, remote, ignore=excluded)

        (local / "src" / "main.py").write_text("edited\n")
        (local / "new.txt").write_text("new")
        wait_in_sync(local, remote, ignore=excluded)

        (local / "blob.bin").unlink()
        (local / "src" / "pkg").rename(local / "src" / "renamed")
        (local / "new.txt").rename(local / "moved.txt")
        wait_in_sync(local, remote, ignore=excluded)

        (local / "src" / "renamed" / "inside.py").write_text("after rename")
        deep = local / "x" / "y" / "z"
        deep.mkdir(parents=True)
        (deep / "f.txt").write_text("deep")
        (local / "moved.txt").chmod(0o755)
        os.unlink(local / "link-to-main")
        os.symlink("bin/run", local / "link-to-main")
        wait_in_sync(local, remote, ignore=excluded)

        # A file replaced by a directory and back.
        (local / "moved.txt").unlink()
        (local / "moved.txt").mkdir()
        (local / "moved.txt" / "child").write_text("c")
        (local / "bin" / "run").unlink()
        (local / "bin" / "run").mkdir()
        wait_in_sync(local, remote, ignore=excluded)
        (local / "bin" / "run").rmdir()
        (local / "bin" / "run").write_text("file again")
        wait_in_sync(local, remote, ignore=excluded)

        # Excluded paths never travel.
        (local / "node_modules" / "new").mkdir()
        (local / "node_modules" / "new" / "x.js").write_text("x")
        (local / "marker.txt").write_text("after excluded change")
        wait_in_sync(local, remote, ignore=excluded)
        assert not (remote / "node_modules").exists()

        pushes = s.of_kind("pushed")
        assert pushes and all(p["ms"] >= 0 and "files" in p and "bytes" in p for p in pushes)
        assert s.stop() == 0


def test_watch_deleting_a_directory_keeps_remote_node_modules(project: Project) -> None:
    svc = project.local / "svc"
    (svc / "lib").mkdir(parents=True)
    (svc / "lib" / "a.js").write_text("a")
    (svc / "index.js").write_text("i")
    with Session(project.config) as s:
        s.wait_watching()
        wait_in_sync(project.local, project.remote)
        (project.remote / "svc" / "node_modules" / "dep").mkdir(parents=True)
        (project.remote / "svc" / "node_modules" / "dep" / "i.js").write_text("installed")
        subprocess.run(["rm", "-rf", str(svc)], check=True)
        # rm -rf may reach dev-sync as more than one batch: wait for all of it.
        wait_until(lambda: not (project.remote / "svc" / "lib").exists()
                   and not (project.remote / "svc" / "index.js").exists(), timeout=10)
        assert (project.remote / "svc" / "node_modules" / "dep" / "i.js").read_text() == "installed"
        assert s.stop() == 0


def test_watch_hostile_names(project: Project) -> None:
    with Session(project.config) as s:
        s.wait_watching()
        d = project.local / "--sub dir"
        d.mkdir()
        for name in HOSTILE:
            (project.local / name).write_text(name)
            (d / name).write_text(name)
        wait_in_sync(project.local, project.remote)
        for name in HOSTILE[:6]:
            (project.local / name).unlink()
        wait_in_sync(project.local, project.remote)
        assert not (project.remote / "PWNED").exists()
        assert s.stop() == 0


@pytest.mark.parametrize("agent", [True, False], ids=["agent", "rsync-only"])
def test_git_checkout_sized_burst_is_a_few_transfers(project: Project, agent: bool) -> None:
    """A burst is never sent file by file. Through rsync it is one or a few runs.
    Through the agent it is streamed while the writing goes on, in batches cut
    every 20 ms (or when the writer pauses for the 4 ms debounce, which a busy
    machine makes it do now and then), and with no rsync run at all."""
    project.write_config(agent=agent)
    with Session(project.config) as s:
        s.wait_watching()
        started = time.monotonic()
        files = 2000
        for i in range(files):
            sub = project.local / f"d{i % 20}"
            sub.mkdir(exist_ok=True)
            (sub / f"f{i}.ts").write_text(f"export const x = {i};\n")
        writing = time.monotonic() - started
        wait_in_sync(project.local, project.remote, timeout=60)
        pushed = s.of_kind("pushed")
        runs = [b for b in pushed if b["via"] != "agent"] + s.of_kind("reconciled")[1:]
        if agent:
            assert not runs, runs
            assert 1 <= len(pushed) <= files // 8, (len(pushed), f"{writing:.2f} s of writing")
        else:
            assert 1 <= len(runs) <= 15, [(b["event"], b.get("paths")) for b in runs]
        assert s.stop() == 0


def test_sigterm_and_sigint_stop_cleanly_without_leftover_ssh(project: Project) -> None:
    (project.local / "a").write_text("a")
    cfg = project.write_config()
    from dev_sync.config import load_config

    control = str(Target.from_config(load_config(cfg)).control_path())
    for sig in (signal.SIGTERM, signal.SIGINT):
        with Session(project.config) as s:
            s.wait_watching()
            assert ssh_processes(control), "the master connection should be up"
            assert os.path.exists(control), "clients must find the master's socket"
            assert s.stop(sig) == 0
            assert s.of_kind("stopped")
        wait_until(lambda: not ssh_processes(control), timeout=5,
                   message=lambda: str(ssh_processes(control)))
        assert not os.path.exists(control)


def test_connection_cut_goes_offline_and_converges(project: Project) -> None:
    (project.local / "before.txt").write_text("before")
    with TcpProxy(project.sandbox.port) as proxy:
        project.write_config(remote=project.via_proxy(proxy))
        from dev_sync.config import load_config

        control = str(Target.from_config(load_config(project.config)).control_path())
        with Session(project.config) as s:
            s.wait_watching()
            wait_in_sync(project.local, project.remote)
            proxy.cut()
            s.wait_for("offline", timeout=30)
            (project.local / "during.txt").write_text("written while offline")
            (project.local / "before.txt").unlink()
            (project.local / "dir").mkdir()
            (project.local / "dir" / "f").write_text("f")
            # Still offline: nothing can have landed.
            assert not (project.remote / "during.txt").exists()
            proxy.restore()
            wait_in_sync(project.local, project.remote, timeout=30)
            assert s.of_kind("reconciled")[-1]["reasons"]
            # One master, not one per attempt.
            masters = [p for p in ssh_processes(control) if " -M " in f" {p} "]
            assert len(masters) == 1, masters
            # Normal pushes carry on afterwards.
            (project.local / "after.txt").write_text("after")
            wait_in_sync(project.local, project.remote)
            assert s.stop() == 0
        wait_until(lambda: not ssh_processes(control), timeout=5)


def test_status_detach_and_stop(project: Project) -> None:
    (project.local / "a").write_text("a")
    cfg = str(project.config)
    result = run_cli("up", "--detach", "--config", cfg)
    assert result.returncode == 0, result.stderr
    try:
        st = run_cli("status", "--json", "--config", cfg)
        assert st.returncode == 0, st.stdout + st.stderr
        import json

        data = json.loads(st.stdout)
        assert data["running"] and data["state"] == "watching"
        (project.local / "b").write_text("b")
        wait_in_sync(project.local, project.remote)

        def pushed() -> bool:
            d = json.loads(run_cli("status", "--json", "--config", cfg).stdout)
            return bool(d.get("last_push")) and d["last_push"]["kind"] == "pushed"

        wait_until(pushed, timeout=10)
        human = run_cli("status", "--config", cfg)
        assert "watching" in human.stdout and "last push" in human.stdout
        again = run_cli("up", "--config", cfg, "--once")
        assert again.returncode == 1 and "already running" in again.stderr
    finally:
        stopped = run_cli("stop", "--config", cfg)
    assert stopped.returncode == 0 and "stopped" in stopped.stdout
    after = run_cli("status", "--json", "--config", cfg)
    assert after.returncode == 3


def test_doctor_reports_ok_and_failures(project: Project) -> None:
    ok = run_cli("doctor", "--config", str(project.config))
    assert ok.returncode == 0, ok.stdout + ok.stderr
    for word in ("ssh", "remote rsync", "local rsync", "remote root", "inotify"):
        assert word in ok.stdout
    project.remote.mkdir()
    (project.remote / "x").write_text("x")
    bad = run_cli("doctor", "--config", str(project.config))
    assert bad.returncode == 1 and "--adopt" in bad.stdout


def test_watchfiles_backend(project: Project) -> None:
    project.write_config(watcher="watchfiles")
    (project.local / "a.txt").write_text("a")
    with Session(project.config) as s:
        ev = s.wait_watching()
        assert ev["backend"] == "watchfiles"
        (project.local / "b.txt").write_text("b")
        (project.local / "d" / "e").mkdir(parents=True)
        (project.local / "d" / "e" / "f.txt").write_text("f")
        wait_in_sync(project.local, project.remote)
        (project.local / "a.txt").unlink()
        (project.local / "d").rename(project.local / "d2")
        wait_in_sync(project.local, project.remote)
        assert s.stop() == 0


def _variant_ssh_config(project: Project, tmp_path: Path, replace: dict[str, str]) -> Path:
    """The sandbox's ssh config with some option lines replaced."""
    lines = []
    for line in project.sandbox.ssh_config.read_text().splitlines():
        key = line.strip().split(" ", 1)[0]
        lines.append(f"  {key} {replace[key]}" if key in replace else line)
    path = tmp_path / "variant.ssh_config"
    path.write_text("\n".join(lines) + "\n")
    return path


def test_unknown_host_key_is_named(project: Project, tmp_path: Path) -> None:
    empty = tmp_path / "empty_known_hosts"
    empty.write_text("")
    cfg = _variant_ssh_config(project, tmp_path, {"UserKnownHostsFile": str(empty)})
    project.write_config(remote={"ssh_config": str(cfg)})
    result = once(project)
    assert result.returncode == 1
    assert "host key" in result.stderr and "fix:" in result.stderr


def test_rejected_key_is_an_auth_error(project: Project, tmp_path: Path) -> None:
    key = tmp_path / "wrong_key"
    subprocess.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-f", str(key)], check=True)
    cfg = _variant_ssh_config(project, tmp_path, {"IdentityFile": str(key)})
    project.write_config(remote={"ssh_config": str(cfg)})
    result = once(project)
    assert result.returncode == 1
    assert "rejected the login" in result.stderr and "ssh-add" in result.stderr


def test_gitignore_change_while_watching(project: Project) -> None:
    (project.local / "keep.txt").write_text("k")
    (project.local / "gen").mkdir()
    (project.local / "gen" / "out.js").write_text("generated")
    with Session(project.config) as s:
        s.wait_watching()
        wait_in_sync(project.local, project.remote)
        # Newly ignored: stays on the remote (never deleted) and stops syncing.
        (project.local / ".gitignore").write_text("gen/\n")
        s.wait_for("reconciled", lambda e: any(".gitignore" in r for r in e["reasons"]))
        (project.local / "gen" / "out.js").write_text("changed locally")
        (project.local / "gen" / "new.js").write_text("new")
        (project.local / "keep.txt").write_text("k2")
        wait_until(lambda: (project.remote / "keep.txt").read_text() == "k2", timeout=10)
        assert (project.remote / "gen" / "out.js").read_text() == "generated"
        assert not (project.remote / "gen" / "new.js").exists()
        # Un-ignored again: the folder is sent as it is now.
        (project.local / ".gitignore").unlink()
        wait_in_sync(project.local, project.remote)
        (project.local / "gen" / "later.js").write_text("watched again")
        wait_in_sync(project.local, project.remote)
        assert s.stop() == 0


WATCHES = Path("/proc/sys/fs/inotify/max_user_watches")


@pytest.mark.skipif(os.geteuid() != 0 or not os.access(WATCHES, os.W_OK),
                    reason="needs root to lower fs.inotify.max_user_watches")
def test_watch_limit_falls_back_to_periodic_reconcile(project: Project) -> None:
    import fcntl

    for i in range(5):
        (project.local / f"d{i}").mkdir()
        (project.local / f"d{i}" / "f").write_text(str(i))
    project.write_config(poll_interval=1.0)
    # The same lock as the watcher tests: never two tests changing the limit at once.
    with open("/tmp/dev-sync-test-inotify-sysctl.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        saved = WATCHES.read_text()
        try:
            WATCHES.write_text("1\n")
            s = Session(project.config)
            problem = s.wait_for("problem", lambda e: "max_user_watches" in e["cause"])
        finally:
            WATCHES.write_text(saved)
    with s:
        assert "sysctl" in problem["fix"]
        s.wait_watching()
        (project.local / "d3" / "f").write_text("seen by the periodic reconcile")
        (project.local / "d4" / "new").write_text("new")
        wait_in_sync(project.local, project.remote, timeout=15)
        assert s.proc.poll() is None
        assert s.stop() == 0


def test_watch_stops_before_mirroring_an_emptied_tree(project: Project) -> None:
    for d in range(6):
        (project.local / f"pkg{d}").mkdir()
        for i in range(30):
            (project.local / f"pkg{d}" / f"f{i}.py").write_text(str(i))
    with Session(project.config) as s:
        s.wait_watching()
        wait_in_sync(project.local, project.remote)
        # One folder after another, each pushed before the next goes: a
        # sliding count, not a per-batch one, must notice.
        for d in range(6):
            subprocess.run(["rm", "-rf", str(project.local / f"pkg{d}")], check=True)
            if d < 2:
                s.wait_for("pushed", lambda e: e["deleted"] > 0)
        code = s.proc.wait(30)
        assert code == 1
        assert "refusing to delete" in s.read_stderr()
    remaining = {p.parent.name for p in project.remote.rglob("*.py")}
    assert {"pkg3", "pkg4", "pkg5"} <= remaining


def test_missing_remote_rsync_is_named_with_the_fix(project: Project) -> None:
    project.write_config(remote={"rsync_path": "/nonexistent/rsync"})
    (project.local / "a").write_text("a")
    result = once(project)
    assert result.returncode == 1
    assert "rsync is not installed" in result.stderr and "apt-get install rsync" in result.stderr
    doctor = run_cli("doctor", "--config", str(project.config))
    assert doctor.returncode == 1 and "rsync is not installed" in doctor.stdout


@pytest.mark.skipif(os.geteuid() != 0, reason="mounting a small tmpfs needs root")
def test_full_remote_disk_is_reported_and_syncing_goes_on(project: Project) -> None:
    # The sandbox sshd may live in its own mount namespace (clean shell): mount
    # the small disk where the remote side sees it, and look through ssh.
    ns = ["nsenter", "--target", str(project.sandbox.pid), "--mount"]
    project.remote.mkdir()
    subprocess.run([*ns, "mount", "-t", "tmpfs", "-o", "size=1m", "tmpfs", str(project.remote)],
                   check=True)

    def remote_ls() -> list[str]:
        return ssh_run(project.sandbox, ["ls", "-A", str(project.remote)]).out.split()

    try:
        (project.local / "small.txt").write_text("small")
        with Session(project.config) as s:
            s.wait_watching()
            (project.local / "big.bin").write_bytes(os.urandom(3 * 1024 * 1024))
            problem = s.wait_for("problem", lambda e: "full" in e["cause"], timeout=30)
            assert "full" in problem["cause"], s.of_kind("problem")
            assert "free space" in problem["fix"]
            # Nothing half-written: no partial file, no rsync temp file.
            assert not [n for n in remote_ls() if "big" in n]
            assert s.proc.poll() is None
            # Still syncing: make room and the rest arrives.
            (project.local / "big.bin").unlink()
            (project.local / "after.txt").write_text("after")
            wait_until(lambda: "after.txt" in remote_ls(), timeout=15)
            assert "small.txt" in remote_ls()
            assert s.stop() == 0
    finally:
        subprocess.run([*ns, "umount", "-l", str(project.remote)], check=False)
