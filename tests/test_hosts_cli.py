"""`dev-sync hosts`: apply, share with a teammate, point back, clear, show."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
from driver import run_cli

PROJECT = """
[remote]
host = "devbox"
path = "/srv/app"
address = "10.0.0.5"

[envs.teammate]
host = "alice-vm"
path = "/srv/app"
address = "10.0.0.9"

[services.api]
command = "python3 server.py"
hostname = "api.shop.test"
port = 8000

[services.web]
command = "node index.js"
hostname = "www.shop.test"

[services.worker]
command = "python3 worker.py"
"""

SURROUNDING = "127.0.0.1\tlocalhost\r\n# my own line\r\n10.1.1.1 intranet.corp  # keep\r\n"


@pytest.fixture(autouse=True)
def _isolated(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("DEV_SYNC_PERSONAL_CONFIG", str(tmp_path / "none.toml"))
    monkeypatch.setenv("DEV_SYNC_STATE_DIR", str(tmp_path / "state"))


def setup(tmp_path: Path, text: str = PROJECT) -> tuple[str, Path]:
    root = tmp_path / "shop"
    root.mkdir()
    (root / "dev-sync.toml").write_text(text)
    hosts = tmp_path / "hosts"
    hosts.write_bytes(SURROUNDING.encode())
    return str(root / "dev-sync.toml"), hosts


def test_apply_share_point_back_and_clear(tmp_path: Path) -> None:
    cfg, hosts = setup(tmp_path)
    common = ["--config", cfg, "--hosts-file", str(hosts)]
    first = run_cli("hosts", "apply", *common)
    assert first.returncode == 0, first.stderr
    text = hosts.read_bytes().decode()
    assert text.startswith(SURROUNDING)
    assert "# BEGIN dev-sync shop" in text and "10.0.0.5\tapi.shop.test" in text
    assert "worker" not in text
    again = run_cli("hosts", "apply", *common)
    assert "already maps" in again.stdout and hosts.read_bytes().decode() == text

    # Share a demo: the same names now reach the teammate's VM, then come back.
    assert run_cli("hosts", "apply", "--env", "teammate", *common).returncode == 0
    shown = run_cli("hosts", "show", *common).stdout
    assert "api.shop.test" in shown and "10.0.0.9" in shown
    assert run_cli("hosts", "apply", *common).returncode == 0
    assert hosts.read_bytes().decode() == text

    via = run_cli("hosts", "apply", "--via-forward", *common)
    assert via.returncode == 0 and "127.0.0.1\tapi.shop.test" in hosts.read_text()

    cleared = run_cli("hosts", "clear", *common)
    assert cleared.returncode == 0
    assert hosts.read_bytes() == SURROUNDING.encode()
    assert run_cli("hosts", "show", *common).returncode == 3


def test_invalid_hostname_exits_2_naming_it(tmp_path: Path) -> None:
    cfg, hosts = setup(tmp_path, PROJECT.replace("api.shop.test", "bad_name!.test"))
    result = run_cli("hosts", "apply", "--config", cfg, "--hosts-file", str(hosts))
    assert result.returncode == 2 and "bad_name!.test" in result.stderr
    assert hosts.read_bytes() == SURROUNDING.encode()


def test_invalid_address_exits_2_naming_the_key(tmp_path: Path) -> None:
    cfg, hosts = setup(tmp_path, PROJECT.replace('"10.0.0.9"', '"10.0.0.999"'))
    result = run_cli("hosts", "apply", "--env", "teammate", "--config", cfg,
                     "--hosts-file", str(hosts))
    assert result.returncode == 2 and "address" in result.stderr


@pytest.mark.skipif(os.geteuid() == 0, reason="root may write the file anyway")
def test_without_permission_prints_the_sudo_command(tmp_path: Path) -> None:
    cfg, hosts = setup(tmp_path)
    hosts.chmod(0o444)
    tmp_path.chmod(0o555)
    try:
        result = run_cli("hosts", "apply", "--config", cfg, "--hosts-file", str(hosts))
    finally:
        tmp_path.chmod(0o755)
    assert result.returncode == 1 and "sudo " in result.stderr and "hosts apply" in result.stderr
