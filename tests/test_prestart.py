"""The head start for `dev-sync up`: an ssh master begun before the program loads."""

from __future__ import annotations

import asyncio
import subprocess
from pathlib import Path

import pytest
from helpers import Project

from dev_sync import prestart
from dev_sync.config import load_config
from dev_sync.ssh import SshMaster
from dev_sync.target import Target


@pytest.fixture(autouse=True)
def _clean() -> None:
    prestart.discard()


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
