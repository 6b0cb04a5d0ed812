"""The head start for `dev-sync up`: an ssh master begun before the program loads."""

from __future__ import annotations

import asyncio
import os
import pty
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest
from driver import Event, json_events, run_cli
from helpers import IgnoreFn, Project, wait_in_sync, wait_until

from dev_sync import cli, prestart
from dev_sync.config import load_config
from dev_sync.errors import DevSyncError
from dev_sync.ignore import RuleSet, walk_dirs
from dev_sync.pusher import DeleteGuard, RsyncPusher
from dev_sync.ssh import SshMaster
from dev_sync.state import SessionFiles
from dev_sync.target import Target


@pytest.fixture(autouse=True)
def _clean() -> Iterator[None]:
    prestart.discard()
    yield
    prestart.discard()  # nothing begun early outlives its test


def test_nothing_started_without_up_or_config(tmp_path: Path,
                                              monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    prestart.maybe_start(["up"])
    assert prestart.adopt(["ssh"]) is None
    (tmp_path / "dev-sync.toml").write_text('[remote]\nhost = "h"\npath = "/srv/x"\n')
    for args in (["status"], ["up", "--detach"], ["up", "--help"], []):
        prestart.maybe_start(args)
        assert prestart.adopt(Target("h").master_argv()) is None


def test_odd_values_mean_no_head_start(tmp_path: Path) -> None:
    cfg = tmp_path / "dev-sync.toml"
    cfg.write_text('[remote]\nhost = "-oProxyCommand=x"\npath = "/srv/x"\n')
    prestart.maybe_start(["up", "--config", str(cfg)])
    assert prestart._started is None
    cfg.write_text('[remote]\nhost = "h"\nport = "22"\npath = "/srv/x"\n')
    prestart.maybe_start(["up", f"--config={cfg}"])
    assert prestart._started is None


def test_only_a_plain_up_gets_more_than_the_master(project: Project,
                                                   monkeypatch: pytest.MonkeyPatch) -> None:
    cfg = str(project.config)
    plain = ["up", "--once", "--json", "--config", cfg]
    for args in (["up", "--adopt", "--config", cfg], ["up", "--env", "x", "--config", cfg],
                 ["up", f"--config={cfg}", "--env=x"], ["up", "--config", cfg, "--bogus"]):
        prestart.maybe_start(args)
        assert prestart._started is not None and prestart._head is None, args
        prestart.discard()
    monkeypatch.setenv("DEV_SYNC_ENV", "x")  # a personal choice may be another environment
    prestart.maybe_start(plain)
    assert prestart._started is not None and prestart._head is None
    prestart.discard()
    monkeypatch.delenv("DEV_SYNC_ENV")
    prestart.maybe_start(plain)
    assert prestart._head is not None
    prestart.discard()
    assert not project.remote.exists() or [p.name for p in project.remote.iterdir()] == [
        ".dev-sync-root"]


def test_the_session_adopts_the_early_master(project: Project) -> None:
    prestart.maybe_start(["up", "--once", "--config", str(project.config)])
    assert prestart._started is not None
    early = prestart._started[1]
    master = SshMaster(Target.from_config(load_config(project.config)))

    async def go() -> None:
        await master.connect()
        try:
            assert master._proc is early
            # Clients must ride on it: its socket is there, and -O check answers.
            assert master.control_path.exists()
            check = await master.run(["true"])
            assert check.returncode == 0
            ok = subprocess.run(["ssh", *master.client_options(), "-O", "check", "--",
                                 master.target.host], capture_output=True, check=False)
            assert ok.returncode == 0, ok.stderr
            assert (await master.run(["echo", "hi"])).out == "hi\n"
        finally:
            await master.close()

    asyncio.run(go())
    assert early.poll() is not None


def test_a_different_target_discards_it(project: Project) -> None:
    prestart.maybe_start(["up", "--config", str(project.config)])
    assert prestart._started is not None
    early = prestart._started[1]
    assert prestart.adopt(Target("elsewhere").master_argv()) is None
    assert early.poll() is not None


# -- the probe and the first rsync pass, started while the program loads -------------


def _rsync_logger(project: Project) -> Path:
    """Make [remote] rsync_path a wrapper that logs each call on the remote, then runs rsync.

    The probe calls it once with --version; every transfer runs it once as --server.
    """
    log = project.local.parent / "remote-rsync.log"
    wrapper = project.local.parent / "rsync-logged"
    wrapper.write_text(f'#!/bin/sh\nprintf "%s\\n" "$*" >> {log}\nexec rsync "$@"\n')
    wrapper.chmod(0o755)
    project.write_config(remote={"rsync_path": str(wrapper)},
                         exclude=["*.log"])
    return log


def _calls(log: Path) -> tuple[int, int]:
    """(probes, transfers) seen by the logging wrapper."""
    lines = log.read_text().splitlines() if log.exists() else []
    return (sum(ln == "--version" for ln in lines), sum("--server" in ln for ln in lines))


def _fill(local: Path) -> None:
    (local / "src" / "deep").mkdir(parents=True)
    for i in range(200):
        (local / "src" / f"f{i}.py").write_text(f"print({i})\n" * (i + 1))
    (local / "src" / "deep" / "run.sh").write_text("#!/bin/sh\necho hi\n")
    (local / "src" / "deep" / "run.sh").chmod(0o755)
    (local / "link").symlink_to("src/f1.py")
    (local / "node_modules" / "pkg").mkdir(parents=True)
    (local / "node_modules" / "pkg" / "index.js").write_text("x")
    (local / "build").mkdir()
    (local / "build" / "out.bin").write_bytes(b"\0" * 1000)
    (local / "debug.log").write_text("log")
    (local / ".gitignore").write_text("build/\n")


def _ignored(names: set[str]) -> IgnoreFn:
    def ignore(rel: str) -> bool:
        return rel.split("/")[0] + ("/" if "/" in rel else "") in names or rel.endswith(".log")
    return ignore


def _reconciled(stdout: str) -> list[Event]:
    return [e for e in json_events(stdout) if e["event"] == "reconciled"]


def test_up_once_into_a_new_folder_adopts_the_early_probe_and_rsync(project: Project) -> None:
    log = _rsync_logger(project)
    _fill(project.local)
    result = run_cli("up", "--once", "--json", "--config", str(project.config))
    assert result.returncode == 0, result.stderr
    (event,) = _reconciled(result.stdout)
    assert event["head_start"] is True
    # One probe and one transfer in all: the engine ran neither of its own.
    assert _calls(log) == (1, 1)
    assert event["files"] == 203  # 200 sources, run.sh, .gitignore and dev-sync.toml
    wait_in_sync(project.local, project.remote,
                 ignore=_ignored({"node_modules/", "build/"}), timeout=1)
    assert not (project.remote / "build").exists()
    assert not (project.remote / "node_modules").exists()
    assert (project.remote / ".dev-sync-root").is_file()


def test_a_root_that_exists_gets_no_head_start(project: Project) -> None:
    log = _rsync_logger(project)
    _fill(project.local)
    first = run_cli("up", "--once", "--json", "--config", str(project.config))
    assert first.returncode == 0, first.stderr
    (project.local / "src" / "new.py").write_text("new\n")
    (project.local / "src" / "f3.py").unlink()
    log.unlink()
    second = run_cli("up", "--once", "--json", "--config", str(project.config))
    assert second.returncode == 0, second.stderr
    (event,) = _reconciled(second.stdout)
    assert event["head_start"] is False
    assert event["deleted"] == 1
    # The probe found the marked root: nothing else was started early.
    assert _calls(log) == (1, 2)  # the engine's own passes: copy, then the deletion
    wait_in_sync(project.local, project.remote,
                 ignore=_ignored({"node_modules/", "build/"}), timeout=1)


def test_a_non_empty_unmarked_root_is_still_refused_with_nothing_written(
    project: Project,
) -> None:
    log = _rsync_logger(project)
    _fill(project.local)
    project.remote.mkdir()
    (project.remote / "precious.txt").write_text("keep me")
    result = run_cli("up", "--once", "--json", "--config", str(project.config))
    assert result.returncode == 1, result.stderr
    assert "not empty" in result.stderr
    assert sorted(p.name for p in project.remote.iterdir()) == ["precious.txt"]
    assert (project.remote / "precious.txt").read_text() == "keep me"
    assert _calls(log)[1] == 0


def test_a_gitignore_changed_after_the_early_start_discards_the_early_rsync(
    project: Project, capsys: pytest.CaptureFixture[str],
) -> None:
    log = _rsync_logger(project)
    _fill(project.local)
    args = ["up", "--once", "--json", "--config", str(project.config)]
    prestart.maybe_start(args)  # what the launcher does before it loads the CLI
    prestart.validate(args)
    assert prestart._head is not None
    # The early pass has reached the remote, with build/ still ignored...
    wait_until(lambda: _calls(log)[1] == 1, timeout=20)
    early = prestart._head._rsync
    assert early is not None
    # ...when the rules change: build/ is now synced.
    (project.local / ".gitignore").write_text("# nothing ignored here\n")
    assert cli.main(args) == 0
    (event,) = _reconciled(capsys.readouterr().out)
    assert event["head_start"] is False
    assert early.proc.poll() is not None  # stopped (or done) before the engine's own pass
    assert _calls(log) == (1, 2)  # the early probe was still the engine's
    wait_in_sync(project.local, project.remote, ignore=_ignored({"node_modules/"}), timeout=1)
    assert (project.remote / "build" / "out.bin").is_file()


def test_a_config_that_fails_validation_starts_no_rsync(project: Project) -> None:
    """Exit 2, and the early work may have gone as far as the probe: at most an
    empty root holding its marker (a later `up` finds it marked and carries on)."""
    log = _rsync_logger(project)
    _fill(project.local)
    text = project.config.read_text()
    project.config.write_text(text.replace("[sync]\n", "[sync]\ndebounce_ms = -5\n"))
    result = run_cli("up", "--once", "--json", "--config", str(project.config))
    assert result.returncode == 2, result.stderr
    assert "debounce_ms" in result.stderr
    assert _calls(log)[1] == 0
    if project.remote.exists():
        assert [p.name for p in project.remote.iterdir()] == [".dev-sync-root"]
    project.config.write_text(text)
    fixed = run_cli("up", "--once", "--json", "--config", str(project.config))
    assert fixed.returncode == 0, fixed.stderr
    wait_in_sync(project.local, project.remote,
                 ignore=_ignored({"node_modules/", "build/"}), timeout=1)


def test_on_a_terminal_the_adopted_rsync_feeds_the_progress_bar(
    project: Project, tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
) -> None:
    """With a bar to show, the early pass runs with --info=progress2 and its output
    reaches the engine's bar through the reader thread."""
    log = _rsync_logger(project)
    _fill(project.local)
    (project.local / "big.bin").write_bytes(os.urandom(4 << 20))
    monkeypatch.setenv("DEV_SYNC_STATE_DIR", str(tmp_path / "state"))
    leader, follower = pty.openpty()
    proc = subprocess.Popen(
        [sys.executable, "-m", "dev_sync", "up", "--once", "--config", str(project.config)],
        stdin=subprocess.DEVNULL, stdout=follower, stderr=subprocess.PIPE,
        env={**os.environ, "COLUMNS": "120", "TERM": "xterm"},
    )
    os.close(follower)
    screen = b""
    while True:
        try:
            chunk = os.read(leader, 65536)
        except OSError:  # EIO: the terminal's last writer has gone
            break
        if not chunk:
            break
        screen += chunk
    os.close(leader)
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == 0, err
    assert b"in sync" in screen
    status = SessionFiles(project.config).read_status()
    assert status is not None and status["last_push"]["head_start"] is True
    assert _calls(log) == (1, 1)
    wait_in_sync(project.local, project.remote,
                 ignore=_ignored({"node_modules/", "build/"}), timeout=1)


def test_an_adopted_run_is_read_without_blocking_the_loop() -> None:
    """Progress lines of a run started early reach the loop as they come, and a
    failure is classified as for any rsync run."""
    line = "  {b:,}  {p}%%  1.00MB/s  0:00:01 (xfr#{p}, to-chk={r}/10)\r"
    script = "".join(f"printf '{line.format(b=p * 1000, p=p, r=10 - p)}'; sleep 0.05; "
                     for p in range(1, 10))
    # Lines written before the engine takes the run over only go to its output.
    run = prestart.Run(["sh", "-c", "sleep 0.3; " + script + "echo 'Number of files: 10'; exit 24"])
    pusher = RsyncPusher(Path("/nonexistent"), "/srv/x", SshMaster(Target("h")), "rsync",
                         list, DeleteGuard())
    seen: list[int] = []
    ticks = 0

    async def go() -> bytes:
        nonlocal ticks

        async def tick() -> None:
            nonlocal ticks
            while True:
                await asyncio.sleep(0.01)
                ticks += 1

        ticker = asyncio.create_task(tick())
        result = await pusher._adopted(run, frozenset({0, 24}), lambda p: seen.append(p.percent))
        ticker.cancel()
        return result.stdout

    out = asyncio.run(go())
    assert seen and seen == list(range(seen[0], 10)) and seen[0] <= 3, seen
    assert b"Number of files: 10" in out
    assert ticks >= 30  # the loop kept running while the run went on (~0.75 s)

    failing = prestart.Run(["sh", "-c", "echo 'rsync: write failed: No space left on device' >&2;"
                                        " exit 11"])
    with pytest.raises(DevSyncError, match="disk holding /srv/x is full"):
        asyncio.run(pusher._adopted(failing, frozenset({0}), None))


def test_the_engine_takes_the_early_walks_rule_files_only_while_they_are_unchanged(
    project: Project,
) -> None:
    """The walk that fed the early pass also serves the engine, so it does not walk
    the tree again beside that pass; each rule file is read again, and any change
    since (or other settings) means no answer, and a walk of its own."""
    _rsync_logger(project)  # exclude = ["*.log"]
    _fill(project.local)  # .gitignore: build/
    (project.local / "src" / ".gitignore").write_text("*.tmp\n!keep.tmp\n")
    (project.local / "build" / ".gitignore").write_text("!out.bin\n")  # excluded: unread
    args = ["up", "--once", "--json", "--config", str(project.config)]
    prestart.maybe_start(args)
    prestart.validate(args)
    assert prestart._head is not None

    def walked_here(exclude: tuple[str, ...] = ("*.log",)) -> RuleSet:
        rules = RuleSet(project.local, exclude, True)
        for _ in walk_dirs(rules):
            pass
        return rules

    early = prestart.walked_rules(RuleSet(project.local, ("*.log",), True))
    assert early is not None
    assert early.rule_files() == walked_here().rule_files() == [".gitignore", "src/.gitignore"]
    assert early.rsync_filter_rules() == walked_here().rsync_filter_rules()
    assert early.is_excluded("src/a.tmp", False) and not early.is_excluded("src/keep.tmp", False)

    assert prestart.walked_rules(RuleSet(project.local, ("*.bak",), True)) is None
    assert prestart.walked_rules(RuleSet(project.local, ("*.log",), False)) is None
    (project.local / "src" / ".gitignore").write_text("*.tmp\n")
    assert prestart.walked_rules(RuleSet(project.local, ("*.log",), True)) is None
