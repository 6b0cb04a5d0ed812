"""Config loading and its error messages (exit code 2, file, key, expectation)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from dev_sync.cli import main
from dev_sync.config import check_remote_root, find_config, load_config
from dev_sync.errors import ConfigError


def write(tmp_path: Path, text: str) -> Path:
    p = tmp_path / "dev-sync.toml"
    p.write_text(text)
    return p


def test_minimal_config_and_defaults(tmp_path: Path) -> None:
    cfg = load_config(write(tmp_path, '[remote]\nhost = "devbox"\npath = "/srv/app"\n'))
    assert cfg.remote.host == "devbox" and cfg.remote.path == "/srv/app"
    assert cfg.sync.gitignore and cfg.sync.exclude == []
    assert cfg.local_root == tmp_path.resolve()


def test_ssh_config_relative_to_the_file(tmp_path: Path) -> None:
    cfg = load_config(
        write(tmp_path, '[remote]\nhost = "h"\npath = "/srv/a"\nssh_config = "conf/ssh"\n')
    )
    assert cfg.ssh_config_path == tmp_path.resolve() / "conf/ssh"


@pytest.mark.parametrize(
    ("text", "needle"),
    [
        ('[remote]\nhost = "h"\npath = "app"\n', "[remote] path: must be an absolute path"),
        ('[remote]\nhost = "h"\npath = "/srv/a"\ncolour = 1\n', "[remote] colour: unknown key"),
        ('[remote]\nhost = "h"\npath = "/srv/a"\nport = "22"\n', "[remote] port"),
        ('[remote]\nhost = "h"\npath = "/srv/a"\nport = 70000\n', "[remote] port"),
        ('[remote]\nhost = "h"\n', "[remote] path: required key is missing"),
        ('[remote]\nhost = "h"\npath = "/srv/a"\n[sync]\nexclude = "x"\n', "[sync] exclude"),
        ('[remote]\nhost = "h"\npath = "/srv/a"\n[sync]\ngitignore = "yes"\n', "[sync] gitignore"),
        ('[remote]\nhost = "h"\npath = "/srv/a"\n[synk]\n', "[synk]: unknown key"),
        ('[remote]\nhost = "-oProxyCommand=x"\npath = "/srv/a"\n', "[remote] host"),
        ('[remote]\nhost = "h"\npath = "/"\n', "system directory"),
        ('[remote]\nhost = "h"\npath = "/home/dev"\n', "home directory"),
        ('[remote]\nhost = "h"\npath = "/srv/../etc"\n', "'..'"),
        ("[remote\n", "not valid TOML"),
    ],
)
def test_bad_config_names_file_and_key(tmp_path: Path, text: str, needle: str) -> None:
    path = write(tmp_path, text)
    with pytest.raises(ConfigError) as info:
        load_config(path)
    assert needle in info.value.cause
    assert str(path) in info.value.cause
    assert info.value.exit_code == 2


def test_cli_exits_2_with_one_line_cause_and_fix(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    path = write(tmp_path, '[remote]\nhost = "h"\npath = "relative"\n')
    assert main(["up", "--once", "--config", str(path)]) == 2
    err = capsys.readouterr().err
    assert "error:" in err and "[remote] path" in err and "fix:" in err
    assert "Traceback" not in err


def test_find_config_walks_upwards(tmp_path: Path) -> None:
    write(tmp_path, '[remote]\nhost = "h"\npath = "/srv/a"\n')
    deep = tmp_path / "a" / "b"
    deep.mkdir(parents=True)
    assert find_config(deep) == (tmp_path / "dev-sync.toml").resolve()


def test_no_config_anywhere(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                            capsys: pytest.CaptureFixture[str]) -> None:
    monkeypatch.chdir(tmp_path)
    assert main(["status"]) == 2
    assert "dev-sync init" in capsys.readouterr().err


def test_init_writes_a_valid_commented_file(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.chdir(tmp_path)
    assert main(["init", "--host", "box", "--path", "/srv/x"]) == 0
    text = (tmp_path / "dev-sync.toml").read_text()
    assert text.count("#") > 5
    cfg = load_config(tmp_path / "dev-sync.toml")
    assert cfg.remote.host == "box" and cfg.remote.path == "/srv/x"
    assert main(["init"]) == 2  # does not overwrite


@pytest.mark.parametrize("path", ["/", "/etc", "/home", "/usr/local", "/root", "/home/alice/"])
def test_forbidden_roots(path: str) -> None:
    with pytest.raises(ValueError, match="directory"):
        check_remote_root(path)


def test_ok_roots_are_normalised() -> None:
    assert check_remote_root("/srv/app/") == "/srv/app"
    assert check_remote_root("/home/alice/app") == "/home/alice/app"


# What `up` must not wait for before its first rsync: config validation runs first.
FEATURE_RUNTIME = (
    "asyncio",
    "dev_sync.events",
    "dev_sync.runner",
    "dev_sync.deps",
    "dev_sync.services",
    "dev_sync.idle",
    "dev_sync.provision",
    "dev_sync.cloud",
)

EVERY_SECTION = """\
[remote]
host = "devbox"
path = "/srv/app"
[remote.cloud]
provider = "aws"
region = "eu-west-1"
instance_id = "i-0123456789abcdef0"
[deps.npm]
command = "npm ci"
[[deps.rule]]
name = "prisma"
globs = ["prisma/schema.prisma"]
command = "npx prisma generate"
[services.web]
command = "npm start"
restart_on = ["src/**", "!src/**/*.test.js"]
[idle]
after = "1h"
[provision]
packages = ["rsync"]
[[provision.steps]]
name = "db"
shell = "createdb app || true"
"""


def test_loading_the_config_leaves_the_features_unloaded(tmp_path: Path) -> None:
    config = write(tmp_path, EVERY_SECTION)
    code = (
        "import sys, tomllib\n"
        "from pathlib import Path\n"
        "import dev_sync.config as c\n"
        "path = Path(sys.argv[1])\n"
        "c.parse_config(tomllib.loads(path.read_text()), path)\n"
        "print(*sorted(sys.modules), sep='\\n')\n"
    )
    result = subprocess.run(
        [sys.executable, "-c", code, str(config)], capture_output=True, text=True, check=True
    )
    loaded = set(result.stdout.split())
    assert "dev_sync.sections" in loaded
    assert sorted(loaded.intersection(FEATURE_RUNTIME)) == []
