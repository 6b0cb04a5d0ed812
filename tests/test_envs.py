"""Environments: [envs.NAME] beside [remote], --env, DEV_SYNC_ENV and the personal config."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from driver import run_cli
from helpers import Project

from dev_sync.config import load_config
from dev_sync.errors import ConfigError

PROJECT = """
[remote]
host = "devbox"
path = "/srv/app"
address = "10.0.0.5"

[envs.teammate]
host = "alice-vm"
path = "/srv/app"
address = "10.0.0.9"
"""


@pytest.fixture(autouse=True)
def _isolated(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    personal = tmp_path / "personal" / "config.toml"
    monkeypatch.setenv("DEV_SYNC_PERSONAL_CONFIG", str(personal))
    monkeypatch.setenv("DEV_SYNC_STATE_DIR", str(tmp_path / "state"))
    monkeypatch.delenv("DEV_SYNC_ENV", raising=False)
    return personal


def project_file(tmp_path: Path, text: str = PROJECT) -> Path:
    path = tmp_path / "dev-sync.toml"
    path.write_text(text)
    return path


def test_default_is_remote(tmp_path: Path) -> None:
    cfg = load_config(project_file(tmp_path))
    assert cfg.env == "default" and cfg.remote.host == "devbox"
    assert cfg.remote.address == "10.0.0.5"


def test_env_flag_and_variable_choose(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    path = project_file(tmp_path)
    cfg = load_config(path, "teammate")
    assert (cfg.env, cfg.remote.host, cfg.remote.address) == ("teammate", "alice-vm", "10.0.0.9")
    monkeypatch.setenv("DEV_SYNC_ENV", "teammate")
    assert load_config(path).remote.host == "alice-vm"
    assert load_config(path, "default").remote.host == "devbox"  # the flag wins


def test_personal_config_adds_my_env_and_default(tmp_path: Path, _isolated: Path) -> None:
    _isolated.parent.mkdir()
    (_isolated.parent / "my_ssh").write_text("")
    _isolated.write_text('env = "mine"\n[envs.mine]\nhost = "bob-vm"\npath = "/home/bob/app"\n'
                         'ssh_config = "my_ssh"\n')
    # The shared file need not name anyone's VM at all.
    cfg = load_config(project_file(tmp_path, "[sync]\ngitignore = true\n"))
    assert (cfg.env, cfg.remote.host) == ("mine", "bob-vm")
    assert cfg.ssh_config_path == _isolated.parent / "my_ssh"


def test_unknown_env_lists_the_known_ones(tmp_path: Path) -> None:
    with pytest.raises(ConfigError) as info:
        load_config(project_file(tmp_path), "nope")
    assert "default, teammate" in info.value.cause and info.value.exit_code == 2


@pytest.mark.parametrize(
    ("text", "needle"),
    [
        (PROJECT + '\n[envs.bad]\nhost = "h"\npath = "/srv/x"\naddress = "999.1.1.1"\n',
         "bad.address"),
        (PROJECT + '\n[envs.bad]\nhost = "h"\n', "bad.path"),
        (PROJECT + '\n[envs."no spaces"]\nhost = "h"\npath = "/srv/x"\n', "[envs]"),
        ('[sync]\ngitignore = true\n', "[remote]: required table is missing"),
        (PROJECT + 'env = "teammate"\n', "env: unknown key"),
    ],
)
def test_bad_envs_exit_2_naming_the_key(tmp_path: Path, text: str, needle: str) -> None:
    result = run_cli("status", "--config", str(project_file(tmp_path, text)))
    assert result.returncode == 2, result.stderr
    assert needle in result.stderr


def test_bad_personal_config_names_that_file(tmp_path: Path, _isolated: Path) -> None:
    _isolated.parent.mkdir()
    _isolated.write_text("colour = 1\n")
    with pytest.raises(ConfigError) as info:
        load_config(project_file(tmp_path))
    assert str(_isolated) in info.value.cause and "colour" in info.value.cause


def test_envs_command_marks_the_active_one(tmp_path: Path) -> None:
    path = str(project_file(tmp_path))
    out = run_cli("envs", "--config", path)
    assert out.returncode == 0, out.stderr
    lines = out.stdout.splitlines()
    assert lines[0].startswith("* default") and lines[1].startswith("  teammate")
    data = json.loads(run_cli("envs", "--json", "--env", "teammate", "--config", path).stdout)
    assert [(e["name"], e["active"]) for e in data] == [("default", False), ("teammate", True)]


def test_up_once_syncs_to_the_chosen_env(project: Project) -> None:
    other = project.remote.with_name(project.remote.name + "-other")
    (project.local / "a.txt").write_text("a")
    project.write_config(sections={"envs.other": {
        "host": project.sandbox.host, "path": str(other),
        "ssh_config": str(project.sandbox.ssh_config)}})
    result = run_cli("up", "--once", "--env", "other", "--config", str(project.config))
    assert result.returncode == 0, result.stderr
    assert (other / "a.txt").read_text() == "a"
    assert not project.remote.exists()
