"""The sandbox sshd, and the test helpers built on it.

Everything here runs real OpenSSH: the point of the sandbox is that ssh and
rsync behave exactly as against a remote machine.
"""

from __future__ import annotations

import os
import socket
import subprocess
import tomllib
from collections.abc import Iterator
from pathlib import Path

import pytest
from helpers import (
    PROXY_HOST,
    Entry,
    Project,
    TcpProxy,
    proxy_ssh_config,
    ssh_argv,
    ssh_run,
    tcp_proxy,
    toml_value,
    tree_diff,
    tree_snapshot,
    wait_in_sync,
    wait_until,
)

from dev_sync import sandbox as sandbox_mod
from dev_sync.config import load_config
from dev_sync.errors import DevSyncError
from dev_sync.runner import run
from dev_sync.sandbox import SANDBOX_HOST, Sandbox, SandboxInfo, default_sandbox_dir

needs_openssh = pytest.mark.skipif(
    not Path("/usr/sbin/sshd").exists(), reason="needs OpenSSH server at /usr/sbin/sshd"
)


@pytest.fixture
def own_sandbox(tmp_path: Path, sandbox: SandboxInfo) -> Iterator[Sandbox]:
    """A second, private sandbox for tests that start and stop it (never the shared one).

    Depends on ``sandbox`` only to inherit its skip-when-missing logic.
    """
    box = Sandbox(tmp_path / "box")
    yield box
    box.stop()


# ----------------------------------------------------------------------------
# Locations


def test_default_dir_prefers_env_then_xdg_then_home(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    monkeypatch.setenv("DEV_SYNC_SANDBOX_DIR", str(tmp_path / "explicit"))
    monkeypatch.setenv("XDG_STATE_HOME", str(tmp_path / "state"))
    assert default_sandbox_dir() == tmp_path / "explicit"
    monkeypatch.delenv("DEV_SYNC_SANDBOX_DIR")
    assert default_sandbox_dir() == tmp_path / "state" / "dev-sync" / "sandbox"
    monkeypatch.delenv("XDG_STATE_HOME")
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    assert default_sandbox_dir() == tmp_path / "home" / ".local/state/dev-sync/sandbox"


# ----------------------------------------------------------------------------
# Lifecycle


def test_status_and_stop_without_a_sandbox(tmp_path: Path) -> None:
    box = Sandbox(tmp_path / "never-started")
    assert box.status() is None
    assert box.stop() is False
    assert not (tmp_path / "never-started").exists()


def test_start_status_stop_are_idempotent(own_sandbox: Sandbox) -> None:
    info = own_sandbox.start()
    assert info.host == SANDBOX_HOST
    assert info.ssh_config == own_sandbox.base / "ssh_config"
    assert info.remote_dir.is_dir()
    assert (info.base.stat().st_mode & 0o777) == 0o700
    assert own_sandbox.start() == info, "a second start returns the running sandbox"
    assert own_sandbox.status() == info
    assert Sandbox(own_sandbox.base).status() == info, "another handle sees the same state"

    host_key = (info.base / "ssh_host_ed25519_key.pub").read_text()
    assert own_sandbox.stop() is True
    assert own_sandbox.status() is None
    # Gone, or a zombie its new parent has yet to reap (this machine's init
    # reaps about a second later).
    assert not sandbox_mod._pid_alive(info.pid)
    assert own_sandbox.stop() is False

    again = own_sandbox.start()
    assert again.pid != info.pid
    assert (info.base / "ssh_host_ed25519_key.pub").read_text() == host_key, "keys are kept"
    assert again.port == info.port, "the previous port is tried first"
    run(ssh_argv(again.ssh_config, again.host, ["true"]))


def test_stop_ends_open_connections(own_sandbox: Sandbox) -> None:
    info = own_sandbox.start()
    argv = ssh_argv(info.ssh_config, info.host, ["sh", "-c", "echo ready; exec sleep 60"])
    with subprocess.Popen(argv, stdout=subprocess.PIPE, stdin=subprocess.DEVNULL) as proc:
        assert proc.stdout is not None
        assert proc.stdout.readline() == b"ready\n"
        own_sandbox.stop()
        assert proc.wait(timeout=10) != 0


def test_a_stale_pid_file_is_not_trusted(own_sandbox: Sandbox) -> None:
    """A reused PID must never be taken for the sandbox, let alone killed."""
    own_sandbox.start()
    own_sandbox.stop()
    own_sandbox.pid_file.write_text(f"{os.getpid()}\n")
    assert own_sandbox.status() is None
    assert own_sandbox.stop() is False
    info = own_sandbox.start()
    assert info.pid != os.getpid()


def test_restart_moves_to_a_new_port_when_the_old_one_is_taken(own_sandbox: Sandbox) -> None:
    first = own_sandbox.start()
    own_sandbox.stop()
    with socket.socket() as squatter:
        squatter.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        squatter.bind(("127.0.0.1", first.port))
        squatter.listen()
        second = own_sandbox.start()
        assert second.port != first.port
        assert f"[127.0.0.1]:{second.port} " in (second.base / "known_hosts").read_text()
        run(ssh_argv(second.ssh_config, second.host, ["true"]))


def test_a_folder_with_spaces_and_percent_signs_works(tmp_path: Path, sandbox: SandboxInfo) -> None:
    """ssh config files split on spaces and expand %: macOS homes can hold both."""
    box = Sandbox(tmp_path / "John Smith's 100% #1" / "box")
    try:
        info = box.start()
        assert ssh_run(info, ["echo", "ok"]).out == "ok\n"
    finally:
        box.stop()


def test_without_clean_shell_the_users_rc_files_apply(own_sandbox: Sandbox) -> None:
    bashrc = Path.home() / ".bashrc"
    if not bashrc.is_file():
        pytest.skip("no ~/.bashrc to compare")
    info = own_sandbox.start()
    assert info.clean_shell is False
    out = ssh_run(info, ["sh", "-c", 'wc -c < "$HOME/.bashrc"']).out.strip()
    assert int(out) == bashrc.stat().st_size


# ----------------------------------------------------------------------------
# The shared sandbox


def test_ssh_round_trip(sandbox: SandboxInfo) -> None:
    odd = "two words; $(not run) 'q' \"dq\" *"
    result = ssh_run(sandbox, ["printf", "%s|%s", odd, "x"])
    assert result.out == f"{odd}|x"
    assert ssh_run(sandbox, ["id", "-un"]).out.strip() == sandbox.user
    target = sandbox.remote_dir / "round-trip.txt"
    ssh_run(sandbox, ["sh", "-c", 'printf hi > "$1"', "sh", str(target)])
    assert target.read_text() == "hi", "the remote is this machine's filesystem"
    target.unlink()


def test_rsync_over_the_sandbox(sandbox: SandboxInfo, tmp_path: Path) -> None:
    src = tmp_path / "src"
    (src / "sub").mkdir(parents=True)
    (src / "sub" / "a.txt").write_text("a")
    (src / "link").symlink_to("sub/a.txt")
    dst = sandbox.remote_dir / "rsync-check"
    rsh = f"ssh -F {sandbox.ssh_config}"
    run(["rsync", "-a", "-e", rsh, f"{src}/", f"{sandbox.host}:{dst}/"])
    assert tree_snapshot(dst) == tree_snapshot(src)


def test_clean_shell_hides_the_users_rc_files(sandbox: SandboxInfo) -> None:
    if not sandbox.clean_shell:
        pytest.skip("clean_shell needs root and unshare; rc files stay visible here")
    bashrc = Path.home() / ".bashrc"
    before = bashrc.read_bytes() if bashrc.exists() else None
    out = ssh_run(sandbox, ["sh", "-c", 'cat "$HOME/.bashrc" 2>/dev/null | wc -c']).out
    assert int(out) == 0
    # The hiding is private to the sandbox sshd: the real file is untouched.
    assert (bashrc.read_bytes() if bashrc.exists() else None) == before


# ----------------------------------------------------------------------------
# Errors


def test_missing_sshd_says_how_to_install_it(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    real = sandbox_mod._find_program

    def no_sshd(name: str, *candidates: str) -> str | None:
        return None if name == "sshd" else real(name, *candidates)

    monkeypatch.setattr(sandbox_mod, "_find_program", no_sshd)
    with pytest.raises(DevSyncError) as err:
        Sandbox(tmp_path / "box").start()
    assert "sshd" in err.value.cause
    assert err.value.fix is not None
    assert "apt-get install openssh-server" in err.value.fix
    assert "Remote Login" in err.value.fix


def test_unrepresentable_folder_is_refused(tmp_path: Path) -> None:
    with pytest.raises(DevSyncError, match="ssh config file"):
        Sandbox(tmp_path / 'has"quote').start()


@pytest.mark.integration
@needs_openssh
def test_taken_port_is_reported(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    with socket.socket() as blocker:
        blocker.bind(("127.0.0.1", 0))
        blocker.listen()
        monkeypatch.setattr(sandbox_mod, "_free_port", lambda: blocker.getsockname()[1])
        box = Sandbox(tmp_path / "box")
        with pytest.raises(DevSyncError, match="could not bind a port"):
            box.start()
        assert box.status() is None


@pytest.mark.integration
@needs_openssh
def test_config_test_failure_is_reported(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    real = Sandbox._sshd_config_text

    def broken(self: Sandbox, port: int, user: str) -> str:
        return real(self, port, user) + "NoSuchOption yes\n"

    monkeypatch.setattr(Sandbox, "_sshd_config_text", broken)
    with pytest.raises(DevSyncError, match="sshd rejected the sandbox configuration") as err:
        Sandbox(tmp_path / "box").start()
    assert "NoSuchOption" in err.value.cause


def test_failed_login_is_reported_and_stops_sshd(
    monkeypatch: pytest.MonkeyPatch, own_sandbox: Sandbox
) -> None:
    real = Sandbox._sshd_config_text

    def nobody_allowed(self: Sandbox, port: int, user: str) -> str:
        return real(self, port, "no-such-user-here")

    monkeypatch.setattr(Sandbox, "_sshd_config_text", nobody_allowed)
    with pytest.raises(DevSyncError, match=r"ssh dev-sync-sandbox true` failed") as err:
        own_sandbox.start()
    assert "Permission denied" in err.value.cause
    assert own_sandbox.status() is None


# ----------------------------------------------------------------------------
# TcpProxy


def _proxy_ssh(sandbox: SandboxInfo, cfg: Path, *extra: str) -> list[str]:
    return ["ssh", "-F", str(cfg), *extra, PROXY_HOST, "--"]


def test_proxy_cut_and_restore(sandbox: SandboxInfo, tmp_path: Path) -> None:
    with tcp_proxy(sandbox) as proxy:
        port = proxy.port
        cfg = proxy_ssh_config(sandbox, proxy.port, tmp_path / "proxy.ssh_config")
        assert ssh_run(sandbox, ["echo", "via-proxy"], ssh_config=cfg, host=PROXY_HOST).out == (
            "via-proxy\n"
        )
        assert proxy.accepted == 1

        argv = [*_proxy_ssh(sandbox, cfg), "echo ready; exec sleep 60"]
        with subprocess.Popen(argv, stdout=subprocess.PIPE, stdin=subprocess.DEVNULL) as live:
            assert live.stdout is not None
            assert live.stdout.readline() == b"ready\n"
            assert proxy.connections == 1
            proxy.cut()
            assert live.wait(timeout=10) == 255, "an open session dies with the link"
        assert proxy.connections == 0
        failed = ssh_run(sandbox, ["true"], ssh_config=cfg, host=PROXY_HOST, check=False)
        assert failed.returncode == 255
        assert "refused" in failed.err

        proxy.restore()
        assert proxy.port == port
        assert ssh_run(sandbox, ["true"], ssh_config=cfg, host=PROXY_HOST).returncode == 0


def test_proxy_silent_cut_is_noticed_only_by_keepalives(
    sandbox: SandboxInfo, tmp_path: Path
) -> None:
    with TcpProxy(sandbox.port) as proxy:
        cfg = proxy_ssh_config(sandbox, proxy.port, tmp_path / "proxy.ssh_config")
        keepalive = ("-o", "ServerAliveInterval=1", "-o", "ServerAliveCountMax=1")
        argv = [*_proxy_ssh(sandbox, cfg, *keepalive), "echo ready; exec sleep 60"]
        with subprocess.Popen(
            argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE, stdin=subprocess.DEVNULL
        ) as live:
            assert live.stdout is not None
            assert live.stdout.readline() == b"ready\n"
            proxy.cut(silent=True)
            assert live.poll() is None, "nothing fails at once"
            assert live.wait(timeout=15) == 255
            assert live.stderr is not None
            assert b"Timeout" in live.stderr.read()
        quick = ("-o", "ConnectTimeout=1")
        hung = run([*_proxy_ssh(sandbox, cfg, *quick), "true"], check=False, timeout=20)
        assert hung.returncode == 255, "a new connection hangs in the void too"
        proxy.restore()
        assert ssh_run(sandbox, ["true"], ssh_config=cfg, host=PROXY_HOST).returncode == 0


# ----------------------------------------------------------------------------
# Fixtures and helpers


def test_project_fixture_is_a_valid_config(project: Project, sandbox: SandboxInfo) -> None:
    assert project.local.is_dir()
    assert not project.remote.exists()
    assert project.remote.parent == sandbox.remote_dir
    cfg = load_config(project.config)
    assert cfg.remote.host == sandbox.host
    assert cfg.remote.path == str(project.remote)
    assert cfg.ssh_config_path == sandbox.ssh_config
    assert cfg.local_root == project.local.resolve()

    project.write_config(exclude=["*.log", 'we"ird\\name'], gitignore=False, delete_guard=0.25)
    cfg = load_config(project.config)
    assert cfg.sync.exclude == ["*.log", 'we"ird\\name']
    assert cfg.sync.gitignore is False
    assert cfg.sync.delete_guard == 0.25
    assert cfg.remote.path == str(project.remote), "[remote] survives a rewrite"


def test_project_can_route_through_a_proxy(project: Project, sandbox: SandboxInfo) -> None:
    with tcp_proxy(sandbox) as proxy:
        project.write_config(remote=project.via_proxy(proxy))
        cfg = load_config(project.config)
        assert cfg.remote.host == PROXY_HOST
        assert cfg.ssh_config_path is not None
        ssh_run(sandbox, ["true"], ssh_config=cfg.ssh_config_path, host=cfg.remote.host)
        assert proxy.accepted == 1


@pytest.mark.parametrize(
    "value",
    ["plain", 'quote " and \\ backslash', "tab\there\nnewline", "ünïcödé ✓", "\x7f\x01"],
)
def test_toml_value_round_trips(value: str) -> None:
    assert tomllib.loads(f"k = {toml_value(value)}")["k"] == value
    assert tomllib.loads(f"k = {toml_value([value, value])}")["k"] == [value, value]


def test_tree_snapshot_records_what_sync_must_reproduce(tmp_path: Path) -> None:
    (tmp_path / "bin").mkdir()
    script = tmp_path / "bin" / "run.sh"
    script.write_text("#!/bin/sh\n")
    script.chmod(0o755)
    (tmp_path / "data.txt").write_bytes(b"\0bytes")
    (tmp_path / "link").symlink_to("bin/missing-target")
    (tmp_path / "node_modules" / "x").mkdir(parents=True)

    snap = tree_snapshot(tmp_path, ignore=lambda rel: rel == "node_modules/")
    assert snap == {
        "bin": Entry("dir"),
        "bin/run.sh": Entry("file", b"#!/bin/sh\n", True),
        "data.txt": Entry("file", b"\0bytes", False),
        "link": Entry("symlink", target="bin/missing-target"),
    }
    other = dict(snap)
    other["data.txt"] = Entry("file", b"changed", False)
    del other["link"]
    assert tree_diff(snap, other) == [
        "data.txt: file 6B b'\\x00bytes' != file 7B b'changed'",
        "link: symlink -> bin/missing-target != missing",
    ]


def test_wait_until_returns_the_value_or_says_what_it_waited_for() -> None:
    calls = iter([0, 0, 42])
    assert wait_until(lambda: next(calls), timeout=5, interval=0) == 42

    def never() -> bool:
        return False

    with pytest.raises(AssertionError, match=r"condition never not met within 0.05s: still 3"):
        wait_until(never, timeout=0.05, message=lambda: "still 3")


def test_wait_in_sync_ignores_the_remote_marker(tmp_path: Path) -> None:
    local, remote = tmp_path / "local", tmp_path / "remote"
    for root in (local, remote):
        (root / "d").mkdir(parents=True)
        (root / "d" / "f").write_text("same")
    (remote / ".dev-sync-root").write_text("")
    assert "d/f" in wait_in_sync(local, remote, timeout=1)
    (remote / "d" / "f").write_text("different")
    with pytest.raises(AssertionError, match="d/f: file 4B"):
        wait_in_sync(local, remote, timeout=0.1)
