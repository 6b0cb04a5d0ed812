"""``dev-sync.toml``: finding it, validating it strictly, and the starter file.

Validation is strict on purpose: a misspelt key silently ignored is a sync
that does something other than what the engineer wrote. Every error names
the file, the key and what was expected, and exits 2.
"""

from __future__ import annotations

import posixpath
import tomllib
from collections.abc import Mapping
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

from dev_sync.deps import DepsConfig
from dev_sync.errors import ConfigError
from dev_sync.services import ServiceConfig, ServiceName

CONFIG_NAME = "dev-sync.toml"

# Remote roots that are never a project folder: syncing with deletions into
# one of them would wipe a system or a home directory.
FORBIDDEN_ROOTS = frozenset(
    {
        "/", "/bin", "/boot", "/dev", "/etc", "/home", "/lib", "/lib32", "/lib64", "/media",
        "/mnt", "/opt", "/proc", "/root", "/run", "/sbin", "/srv", "/sys", "/tmp", "/usr",
        "/usr/local", "/var", "/var/lib", "/var/tmp", "/Users", "/Applications", "/System",
        "/Library", "/private", "/private/tmp", "/Volumes",
    }
)


def check_remote_root(path: str) -> str:
    """Return the normalised remote root, or raise ValueError saying why it is refused."""
    if not path.startswith("/"):
        raise ValueError(f"must be an absolute path (starting with /), got {path!r}")
    if "\0" in path or "\n" in path:
        raise ValueError("must not contain NUL or newline characters")
    parts = path.split("/")
    if ".." in parts:
        raise ValueError(f"must not contain '..' components, got {path!r}")
    norm = posixpath.normpath(path)
    if norm.startswith("//"):
        norm = "/" + norm.lstrip("/")
    if norm in FORBIDDEN_ROOTS:
        raise ValueError(f"{norm!r} is a system directory; use a project folder such as /srv/app")
    head, _, _ = norm.rpartition("/")
    if head in ("/home", "/Users"):
        raise ValueError(f"{norm!r} is a home directory; use a folder inside it, e.g. {norm}/app")
    return norm


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True, strict=True)


class RemoteConfig(_Strict):
    """Where the remote tree lives and how to reach it."""

    host: str = Field(min_length=1)
    path: str
    user: str | None = None
    port: int | None = Field(default=None, ge=1, le=65535)
    ssh_config: str | None = None
    connect_timeout: float = Field(default=10.0, gt=0, le=300)
    # The rsync program on the remote (a name on its PATH, or an absolute path).
    rsync_path: str = Field(default="rsync", min_length=1)

    @field_validator("path")
    @classmethod
    def _path(cls, value: str) -> str:
        return check_remote_root(value)

    @field_validator("host")
    @classmethod
    def _host(cls, value: str) -> str:
        if value.startswith("-") or any(c.isspace() for c in value):
            raise ValueError(
                f"must be an ssh destination such as devbox or dev@10.0.0.5, got {value!r}"
            )
        return value

    @field_validator("rsync_path")
    @classmethod
    def _rsync_path(cls, value: str) -> str:
        if value.startswith("-") or any(c.isspace() for c in value):
            raise ValueError(f"must be a program name or path without spaces, got {value!r}")
        return value

    @field_validator("user")
    @classmethod
    def _user(cls, value: str | None) -> str | None:
        if value is not None and (not value or value.startswith("-") or "@" in value):
            raise ValueError(f"must be a user name, got {value!r}")
        return value


class SyncConfig(_Strict):
    """What is synced and how eagerly."""

    exclude: list[str] = Field(default_factory=list)
    gitignore: bool = True
    # Stop instead of deleting more than this share of the remote tree at once.
    delete_guard: float = Field(default=0.5, gt=0, le=1)
    # ...but never for fewer deletions than this (small trees churn legitimately).
    delete_guard_min: int = Field(default=50, ge=0)
    # Quiet period and cap that group a burst of events into one transfer.
    debounce_ms: int = Field(default=4, ge=0, le=10_000)
    max_delay_ms: int = Field(default=150, ge=1, le=60_000)
    # Full reconcile every N seconds when the watcher cannot see everything.
    poll_interval: float = Field(default=30.0, gt=0)
    watcher: Literal["auto", "inotify", "watchfiles"] = "auto"

    @field_validator("exclude")
    @classmethod
    def _exclude(cls, value: list[str]) -> list[str]:
        for pattern in value:
            if not pattern.strip() or "\n" in pattern:
                raise ValueError(f"patterns must be non-empty single lines, got {pattern!r}")
        return value


class Config(_Strict):
    """The whole project file, plus where it was found."""

    remote: RemoteConfig
    sync: SyncConfig = Field(default_factory=SyncConfig)
    deps: DepsConfig = Field(default_factory=DepsConfig)
    services: dict[ServiceName, ServiceConfig] = Field(default_factory=dict)
    source: Path = Field(default=Path(CONFIG_NAME), exclude=True)

    @property
    def local_root(self) -> Path:
        """The synced tree: the folder holding ``dev-sync.toml``."""
        return self.source.parent

    @property
    def ssh_config_path(self) -> Path | None:
        if self.remote.ssh_config is None:
            return None
        p = Path(self.remote.ssh_config).expanduser()
        return p if p.is_absolute() else (self.local_root / p)


def find_config(start: Path | None = None) -> Path:
    """The nearest ``dev-sync.toml`` in ``start`` or a parent folder."""
    here = (start or Path.cwd()).resolve()
    for folder in (here, *here.parents):
        candidate = folder / CONFIG_NAME
        if candidate.is_file():
            return candidate
    raise ConfigError(
        f"no {CONFIG_NAME} found in {here} or any parent folder",
        "run `dev-sync init` in your project root, or pass --config FILE",
    )


def _describe(loc: tuple[int | str, ...]) -> str:
    section = [str(p) for p in loc]
    if len(section) >= 2:
        return f"[{section[0]}] {'.'.join(section[1:])}"
    return f"[{section[0]}]" if section else "(top level)"


def _format_error(path: Path, err: Mapping[str, Any]) -> str:
    loc = tuple(err.get("loc", ()))
    kind = err.get("type", "")
    where = _describe(loc)
    if kind == "extra_forbidden":
        return f"{path}: {where}: unknown key"
    if kind == "missing":
        return f"{path}: {where}: required key is missing"
    msg = str(err.get("msg", "invalid value"))
    msg = msg.removeprefix("Value error, ")
    return f"{path}: {where}: {msg}"


def parse_config(data: dict[str, Any], source: Path) -> Config:
    """Validate already-parsed TOML, raising ConfigError with every problem."""
    try:
        return Config.model_validate({**data, "source": source})
    except ValidationError as exc:
        lines = [_format_error(source, e) for e in exc.errors()]
        raise ConfigError(
            lines[0] + ("" if len(lines) == 1 else "\n  " + "\n  ".join(lines[1:])),
            f"edit {source} (see `dev-sync init` for a commented example)",
        ) from None


def load_config(path: Path | None = None) -> Config:
    """Load the given file, or the nearest one upwards from the cwd."""
    source = (path if path is not None else find_config()).resolve()
    try:
        raw = source.read_bytes()
    except FileNotFoundError:
        raise ConfigError(f"{source}: no such file", "check the --config path") from None
    except OSError as exc:
        raise ConfigError(f"{source}: cannot read: {exc.strerror}") from None
    try:
        data = tomllib.loads(raw.decode("utf-8"))
    except (tomllib.TOMLDecodeError, UnicodeDecodeError) as exc:
        raise ConfigError(
            f"{source}: not valid TOML: {exc}", f"fix the syntax in {source}"
        ) from None
    return parse_config(data, source)


STARTER = """\
# dev-sync.toml: keep a remote development machine in lockstep with this folder.
# Reference: https://github.com/dev-sync/dev-sync#configuration

[remote]
# Any ssh destination: a Host alias from ~/.ssh/config, or user@address.
host = "{host}"
# Absolute path of the project on the remote. dev-sync creates it and marks it
# with a .dev-sync-root file; it refuses a non-empty folder it did not create.
path = "{path}"
# user = "dev"                  # overrides the user from the ssh config
# port = 22
# ssh_config = "ssh_config"     # an ssh config file (passed as ssh -F), relative to this file
# connect_timeout = 10          # seconds
# rsync_path = "rsync"          # the rsync program on the remote

[sync]
# Gitignore syntax, added to the rules of every .gitignore in the tree.
# .git/ and node_modules/ are always excluded; excluded paths are never sent
# and never deleted on the remote.
exclude = [
    "*.log",
]
gitignore = true
# Stop instead of deleting more than this share of the remote tree at once.
# delete_guard = 0.5
# delete_guard_min = 50
"""


def starter_text(host: str, path: str) -> str:
    return STARTER.format(host=host, path=path)
