"""Dependency installs against the sandbox sshd: streaming, failures, hostile names, the record,
and a real ``npm install``.

The sandbox "remote" is this machine, so remote folders are prepared and
inspected directly with local file operations.
"""

from __future__ import annotations

import asyncio
import contextlib
import io
import json
import os
import shlex
import shutil
import tarfile
import time
from collections.abc import AsyncIterator
from pathlib import Path

import pytest
from helpers import Project, wait_until

from dev_sync import runner
from dev_sync.deps import (
    DepsConfig,
    InstallJob,
    InstallQueue,
    InstallResult,
    local_hashes,
    lock_files,
    plan,
    read_record,
    rerun_hint,
    run_install,
    stale,
    write_record,
)
from dev_sync.ignore import RuleSet
from dev_sync.sandbox import SandboxInfo
from dev_sync.ssh import SshMaster, Target


@contextlib.asynccontextmanager
async def connected(sandbox: SandboxInfo) -> AsyncIterator[SshMaster]:
    master = SshMaster(Target(host=sandbox.host, ssh_config=sandbox.ssh_config))
    try:
        await master.connect()
        yield master
    finally:
        await master.close()


def remote_root(project: Project) -> Path:
    project.remote.mkdir(parents=True, exist_ok=True)
    return project.remote


def custom(command: str, *files: str, cwd: str = "file") -> InstallJob:
    """The job a [[deps.rule]] with ``command`` plans for ``files``."""
    deps = DepsConfig.model_validate(
        {
            "rule": [{"name": "t", "globs": ["*.lock"], "command": command, "cwd": cwd}],
            "yarn": {"enabled": False},
        }
    )
    (job,) = plan(files, deps)
    return job


class Lines:
    """An ``on_line`` sink that remembers when each line arrived."""

    def __init__(self) -> None:
        self.lines: list[str] = []
        self.times: list[float] = []

    def __call__(self, line: str) -> None:
        self.lines.append(line)
        self.times.append(time.monotonic())


async def test_output_streams_line_by_line(sandbox: SandboxInfo, project: Project) -> None:
    root = remote_root(project)
    job = custom("echo first; sleep 0.6; echo second >&2; echo third", "x.lock")
    sink = Lines()
    async with connected(sandbox) as master:
        result = await run_install(master, str(root), job, sink)
    assert result.ok and result.returncode == 0
    assert sink.lines == ["first", "second", "third"]
    assert result.tail == ("first", "second", "third")
    # "first" was delivered while the command was still sleeping, not at the end.
    assert sink.times[1] - sink.times[0] > 0.4
    assert result.duration >= 0.6


async def test_failure_gives_the_exit_code_and_the_tail(
    sandbox: SandboxInfo, project: Project
) -> None:
    root = remote_root(project)
    job = custom(
        'i=0; while [ $i -lt 30 ]; do i=$((i+1)); echo "line $i"; done; echo boom >&2; exit 7',
        "x.lock",
    )
    sink = Lines()
    async with connected(sandbox) as master:
        result = await run_install(master, str(root), job, sink)
        assert result.returncode == 7 and not result.ok
        assert len(sink.lines) == 31
        assert result.tail == (*[f"line {i}" for i in range(12, 31)], "boom")

        gone = await run_install(master, str(root), custom("true", "nope/x.lock"), sink)
        assert gone.returncode != 0
        assert "cannot enter" in gone.tail[-1] and "nope" in gone.tail[-1]

        missing = await run_install(
            master, str(root), custom("no-such-tool-4242 --x", "x.lock"), sink
        )
        assert missing.returncode == 127 and missing.command_not_found
        assert "no-such-tool-4242" in missing.tail[-1]


@pytest.mark.parametrize(
    "folder", ["with space", "$(touch pwned)", "-leading-dash", "q'uo\"te\\s", "*glob?"]
)
async def test_hostile_folder_names(sandbox: SandboxInfo, project: Project, folder: str) -> None:
    root = remote_root(project)
    (root / folder / "sub").mkdir(parents=True)
    job = custom('printf "%s\\n" "$PWD" "$@" > ran.txt', f"{folder}/sub/-a b.lock")
    async with connected(sandbox) as master:
        result = await run_install(master, str(root), job, lambda line: None)
        assert result.ok, result.tail
        ran = (root / folder / "sub" / "ran.txt").read_text().splitlines()
        assert ran == [str(root / folder / "sub"), "./-a b.lock"]

        at_root = custom(
            'printf "%s\\n" "$PWD" "$@" > ran.txt', f"{folder}/sub/-a b.lock", cwd="root"
        )
        assert (await run_install(master, str(root), at_root, lambda line: None)).ok
        rel = f"{folder}/sub/-a b.lock"
        arg = "./" + rel if rel.startswith("-") else rel  # never readable as an option
        assert (root / "ran.txt").read_text().splitlines() == [str(root), arg]
    assert not list(root.rglob("pwned")) and not Path("pwned").exists()


async def test_rerun_hint_runs_the_same_command(sandbox: SandboxInfo, project: Project) -> None:
    root = remote_root(project)
    (root / "-odd dir").mkdir()
    job = custom('printf "%s|" "$PWD" "$@" > hint.txt', "-odd dir/a b.lock")
    hint = rerun_hint(job, sandbox.host, str(root), ssh_args=["-F", str(sandbox.ssh_config)])
    assert hint.startswith("ssh -t -F ")
    # Pasted into a shell: no terminal here, so ssh only warns about -t.
    runner.run(["sh", "-c", hint], timeout=30)
    assert (root / "-odd dir" / "hint.txt").read_text() == f"{root}/-odd dir|a b.lock|"


def _alive(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except (FileNotFoundError, IndexError):
        return False
    return state != "Z"


async def test_cancelling_stops_the_remote_command(sandbox: SandboxInfo, project: Project) -> None:
    """dev-sync stopping (or the connection dying) must not leave an install running."""
    root = remote_root(project)
    job = custom("sh -c 'echo $$; exec sleep 30' & wait", "x.lock")
    first_line: asyncio.Queue[str] = asyncio.Queue()
    async with connected(sandbox) as master:
        task = asyncio.create_task(run_install(master, str(root), job, first_line.put_nowait))
        async with asyncio.timeout(10):
            pid = int(await first_line.get())
        assert _alive(pid)
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
        # A grandchild of the command, so the whole remote process group went.
        wait_until(lambda: not _alive(pid), timeout=10, message=f"remote pid {pid} still runs")


async def test_queue_runs_real_installs_in_turn(sandbox: SandboxInfo, project: Project) -> None:
    root = remote_root(project)
    log = root / "order.log"
    async with connected(sandbox) as master:
        results: list[InstallResult] = []

        async def run(job: InstallJob) -> bool:
            result = await run_install(master, str(root), job, lambda line: None)
            results.append(result)
            return result.ok

        queue = InstallQueue(run)
        try:
            cmd = (
                f'echo "start $1" >> {shlex.quote(str(log))}; sleep 0.2; '
                f'echo "end $1" >> {shlex.quote(str(log))}'
            )
            (root / "b").mkdir()
            queue.submit([custom(cmd, "a.lock"), custom(cmd, "b/b.lock")])
            queue.submit([custom(cmd, "a.lock")])  # waiting: merged
            async with asyncio.timeout(20):
                await queue.idle()
        finally:
            await queue.close()
    assert log.read_text().splitlines() == [
        "start a.lock",
        "end a.lock",
        "start b.lock",
        "end b.lock",
    ]
    assert [r.ok for r in results] == [True, True]


async def test_record_round_trip(sandbox: SandboxInfo, project: Project) -> None:
    root = project.remote  # not created yet: reading must still work
    record = {"package-lock.json": "a" * 64, "we ird/$(x)/requirements.txt": "b" * 64}
    async with connected(sandbox) as master:
        assert await read_record(master, str(root)) == {}
        root.mkdir(parents=True)
        assert await read_record(master, str(root)) == {}
        await write_record(master, str(root), record)
        assert await read_record(master, str(root)) == record
        assert sorted(p.name for p in (root / ".dev-sync").iterdir()) == ["deps.json"]

        await write_record(master, str(root), {"go.sum": "c" * 64})
        assert await read_record(master, str(root)) == {"go.sum": "c" * 64}

        path = root / ".dev-sync" / "deps.json"
        for corrupt in ("{not json", "[1, 2]", '{"files": []}', ""):
            path.write_text(corrupt)
            assert await read_record(master, str(root)) == {}
        path.write_text(json.dumps({"files": {"ok.lock": "d" * 64, "bad.lock": "nothex"}}))
        assert await read_record(master, str(root)) == {"ok.lock": "d" * 64}


async def test_restart_installs_only_what_changed(sandbox: SandboxInfo, project: Project) -> None:
    """Start-up flow: local lock files vs the remote record."""
    local = project.local
    for rel in ("package-lock.json", "api/requirements.txt", "node_modules/x/package-lock.json"):
        (local / rel).parent.mkdir(parents=True, exist_ok=True)
        (local / rel).write_text(rel)
    root = str(remote_root(project))
    deps = DepsConfig()
    found = lock_files(RuleSet(local), deps)
    assert found == ["api/requirements.txt", "package-lock.json"]
    async with connected(sandbox) as master:
        hashes = local_hashes(local, found)
        assert stale(hashes, await read_record(master, root)) == found  # fresh VM: all
        await write_record(master, root, hashes)  # after the installs succeeded
        assert stale(local_hashes(local, found), await read_record(master, root)) == []
        (local / "api/requirements.txt").write_text("flask\n")  # e.g. a branch switch
        changed = stale(local_hashes(local, found), await read_record(master, root))
        assert changed == ["api/requirements.txt"]
        assert [j.key for j in plan(changed, deps, root=local)] == ["pip:api"]


def _npm_project(base: Path, dependency: str) -> Path:
    """An app depending on ``dependency``; npm stays offline with its cache in ``base``."""
    app = base / "app"
    app.mkdir(parents=True, exist_ok=True)
    (app / "package.json").write_text(
        json.dumps(
            {
                "name": "app",
                "version": "1.0.0",
                "private": True,
                "dependencies": {"mylib": dependency},
            }
        )
    )
    (app / ".npmrc").write_text(
        f"cache={base / '.npm-cache'}\noffline=true\nupdate-notifier=false\n"
    )
    return app


def _mylib(base: Path, version: str) -> None:
    lib = base / "mylib"
    lib.mkdir(parents=True, exist_ok=True)
    (lib / "package.json").write_text(json.dumps({"name": "mylib", "version": version}))
    (lib / "index.js").write_text(f"module.exports = {json.dumps(version)};\n")


def _mylib_tarball(base: Path, version: str) -> str:
    """A packed mylib, as ``npm pack`` makes it (everything under package/)."""
    name = f"mylib-{version}.tgz"
    base.mkdir(parents=True, exist_ok=True)
    with tarfile.open(base / name, "w:gz") as tar:
        for member, text in (
            ("package.json", json.dumps({"name": "mylib", "version": version})),
            ("index.js", f"module.exports = {json.dumps(version)};\n"),
        ):
            data = text.encode()
            info = tarfile.TarInfo(f"package/{member}")
            info.size, info.mode = len(data), 0o644
            tar.addfile(info, io.BytesIO(data))
    return name


def _locked_version(app: Path, key: str) -> str:
    lock = json.loads((app / "package-lock.json").read_text())
    version = lock["packages"][key]["version"]
    assert isinstance(version, str)
    return version


def _need_npm() -> None:
    """Skip without npm, except under CI (which installs it): there a skip would hide a gap."""
    if shutil.which("npm") is None:
        reason = "npm is not installed (apt-get install npm, or install Node.js)"
        if os.environ.get("CI"):
            pytest.fail(reason + " (CI is set, so this is an error, not a skip)")
        pytest.skip(reason)


async def test_real_npm_install_of_local_dependencies(
    sandbox: SandboxInfo, project: Project
) -> None:
    _need_npm()
    root = remote_root(project)
    (job,) = plan(["app/package-lock.json"], DepsConfig())
    assert job.label == "npm in app"
    linked = root / "linked"
    packed = root / "packed"
    _mylib(linked, "1.0.0")
    _npm_project(linked, "file:../mylib")
    async with connected(sandbox) as master:

        async def install(base: Path) -> list[str]:
            sink = Lines()
            result = await run_install(master, str(base), job, sink)
            assert result.ok, "\n".join(sink.lines)
            assert result.tail == tuple(sink.lines[-20:])
            return sink.lines

        # A folder dependency: npm links it, and records its version in the lock.
        assert any("added 1 package" in line for line in await install(linked))
        app = linked / "app"
        assert (app / "node_modules" / "mylib" / "index.js").exists()
        assert _locked_version(app, "../mylib") == "1.0.0"
        _mylib(linked, "1.1.0")
        await install(linked)
        assert _locked_version(app, "../mylib") == "1.1.0"

        # A packed dependency: npm copies it, so only a new install brings the new version.
        old = _mylib_tarball(packed, "1.0.0")
        new = _mylib_tarball(packed, "1.1.0")
        app = _npm_project(packed, f"file:../{old}")
        assert any("added 1 package" in line for line in await install(packed))
        installed = app / "node_modules" / "mylib"
        assert not installed.is_symlink()
        assert json.loads((installed / "package.json").read_text())["version"] == "1.0.0"
        _npm_project(packed, f"file:../{new}")
        assert any("changed 1 package" in line for line in await install(packed))
        assert json.loads((installed / "package.json").read_text())["version"] == "1.1.0"
        assert (installed / "index.js").read_text() == 'module.exports = "1.1.0";\n'
    assert os.listdir(root / "packed" / "app" / "node_modules")  # nothing left half-done
