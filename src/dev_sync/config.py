"""``dev-sync.toml``: finding it, validating it strictly, and the starter file.

Validation is strict on purpose: a misspelt key silently ignored is a sync
that does something other than what the engineer wrote. Every error names
the file, the key and what was expected, and exits 2.
"""

from __future__ import annotations

import os
import tomllib
from collections.abc import Mapping
from pathlib import Path
from typing import Annotated, Any, Literal

from pydantic import (
    Field,
    PrivateAttr,
    StringConstraints,
    ValidationError,
    field_validator,
    model_validator,
)

from dev_sync.commands import FORBIDDEN_ROOTS as FORBIDDEN_ROOTS
from dev_sync.commands import check_host as check_host
from dev_sync.commands import check_program
from dev_sync.commands import check_remote_root as check_remote_root
from dev_sync.errors import ConfigError
from dev_sync.sections import (
    DepsConfig,
    IdleConfig,
    ProvisionConfig,
    ServiceConfig,
    ServiceName,
)
from dev_sync.sections import _Strict as _Strict

CONFIG_NAME = "dev-sync.toml"


CloudAddress = Literal["public_ip", "public_dns", "private_ip"]


class CloudConfig(_Strict):
    """The cloud instance behind an environment, so dev-sync can wake it and find it.

    An instance is named by id or by tags: tags survive re-creating the VM
    from a template, an id is unambiguous. Credentials are never read here:
    the provider's own chain (environment, profile, SSO) stays the one place.
    """

    provider: Literal["aws"]
    instance_id: str | None = Field(default=None, pattern=r"^i-[0-9a-f]{8,17}$")
    tags: dict[str, str] | None = None
    region: str = Field(pattern=r"^[a-z0-9][a-z0-9-]{1,40}$")
    profile: str | None = Field(default=None, min_length=1)
    endpoint_url: str | None = Field(default=None, pattern=r"^https?://[^\s]+$")
    wake_timeout: float = Field(default=300.0, gt=0, le=3600)
    address: CloudAddress = "public_ip"

    @field_validator("tags")
    @classmethod
    def _tags(cls, value: dict[str, str] | None) -> dict[str, str] | None:
        if value is not None and not value:
            raise ValueError('must name at least one tag, e.g. { Name = "dev-alice" }')
        return value

    @model_validator(mode="after")
    def _one_selector(self) -> CloudConfig:
        if (self.instance_id is None) == (self.tags is None):
            raise ValueError('set exactly one of instance_id = "i-..." or tags = { Name = "..." }')
        return self

    @property
    def selector(self) -> str:
        """The instance as the user named it, for messages."""
        if self.instance_id is not None:
            return self.instance_id
        return "tags " + ", ".join(f"{k}={v}" for k, v in (self.tags or {}).items())


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
    # The Python that runs the fast-path agent on the remote (3.8 or newer).
    python: str = Field(default="python3", min_length=1)
    # Where the machine's services answer (for the hosts block); default: host.
    address: str | None = None
    # The cloud VM behind this environment: woken by `up`, its address looked up.
    cloud: CloudConfig | None = None
    # The address the cloud reported for this run; never read from a file.
    _cloud_address: str | None = PrivateAttr(default=None)

    @property
    def cloud_address(self) -> str | None:
        """Where ssh goes instead of what ``host`` resolves to, once the cloud was asked."""
        return self._cloud_address

    def with_cloud_address(self, address: str) -> RemoteConfig:
        """A copy that reaches the VM at ``address`` (its address changes at each start)."""
        copy = self.model_copy()
        copy._cloud_address = address
        return copy

    @field_validator("address")
    @classmethod
    def _address(cls, value: str | None) -> str | None:
        if value is None:
            return value
        import ipaddress

        try:
            return str(ipaddress.ip_address(value))
        except ValueError:
            raise ValueError(f"must be an IPv4 or IPv6 address, got {value!r}") from None

    @field_validator("path")
    @classmethod
    def _path(cls, value: str) -> str:
        return check_remote_root(value)

    @field_validator("host")
    @classmethod
    def _host(cls, value: str) -> str:
        return check_host(value)

    @field_validator("rsync_path", "python")
    @classmethod
    def _rsync_path(cls, value: str) -> str:
        return check_program(value)

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
    # No cap set: a short one while the agent streams batches without waiting
    # for their answers, a longer one for rsync, where each batch is one run.
    debounce_ms: int = Field(default=4, ge=0, le=10_000)
    max_delay_ms: int | None = Field(default=None, ge=1, le=60_000)
    # Full reconcile every N seconds when the watcher cannot see everything.
    poll_interval: float = Field(default=30.0, gt=0)
    watcher: Literal["auto", "inotify", "watchfiles"] = "auto"
    # Send small changes through an agent on the remote (one round trip)
    # instead of an rsync run each; rsync still does reconciles and big files.
    agent: bool = True
    # Files up to this size go through the agent.
    agent_max_bytes: int = Field(default=1 << 20, ge=0, le=64 << 20)

    @field_validator("exclude")
    @classmethod
    def _exclude(cls, value: list[str]) -> list[str]:
        for pattern in value:
            if not pattern.strip() or "\n" in pattern:
                raise ValueError(f"patterns must be non-empty single lines, got {pattern!r}")
        return value


ENV_NAME = r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,62}$"
DEFAULT_ENV = "default"


class Config(_Strict):
    """The whole project file, plus where it was found and which environment is active.

    ``remote`` is the active environment: ``[remote]`` itself (named "default")
    or one of ``[envs.NAME]``, chosen by ``--env``, ``DEV_SYNC_ENV`` or the
    personal config, so every command works the same against any of them.
    """

    remote: RemoteConfig
    envs: dict[Annotated[str, StringConstraints(pattern=ENV_NAME)], RemoteConfig] = Field(
        default_factory=dict
    )
    env: str = Field(default=DEFAULT_ENV, exclude=True)
    sync: SyncConfig = Field(default_factory=SyncConfig)
    deps: DepsConfig = Field(default_factory=DepsConfig)
    services: dict[ServiceName, ServiceConfig] = Field(default_factory=dict)
    provision: ProvisionConfig = Field(default_factory=ProvisionConfig)
    idle: IdleConfig = Field(default_factory=IdleConfig)
    # Top-level [cloud]: the cloud VM of [remote] (the default environment).
    cloud: CloudConfig | None = None
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


def _read_toml(source: Path, what: str) -> dict[str, Any]:
    try:
        raw = source.read_bytes()
    except FileNotFoundError:
        raise ConfigError(f"{source}: no such file", f"check the {what} path") from None
    except OSError as exc:
        raise ConfigError(f"{source}: cannot read: {exc.strerror}") from None
    try:
        return tomllib.loads(raw.decode("utf-8"))
    except (tomllib.TOMLDecodeError, UnicodeDecodeError) as exc:
        raise ConfigError(
            f"{source}: not valid TOML: {exc}", f"fix the syntax in {source}"
        ) from None


def personal_config_path() -> Path:
    """The engineer's own settings (which VM is mine), outside the shared repository."""
    env = os.environ.get("DEV_SYNC_PERSONAL_CONFIG")
    if env:
        return Path(env)
    xdg = os.environ.get("XDG_CONFIG_HOME")
    return (Path(xdg) if xdg else Path.home() / ".config") / "dev-sync" / "config.toml"


class PersonalConfig(_Strict):
    """``~/.config/dev-sync/config.toml``: personal environments and the default choice."""

    env: str | None = None
    envs: dict[Annotated[str, StringConstraints(pattern=ENV_NAME)], dict[str, Any]] = Field(
        default_factory=dict
    )


def _personal() -> tuple[Path, PersonalConfig] | None:
    path = personal_config_path()
    if not path.is_file():
        return None
    data = _read_toml(path, "personal config")
    try:
        personal = PersonalConfig.model_validate(data)
    except ValidationError as exc:
        lines = [_format_error(path, e) for e in exc.errors()]
        raise ConfigError("\n  ".join(lines), f"edit {path}") from None
    # An ssh_config there is relative to that file, not to each project.
    for table in personal.envs.values():
        cfg = table.get("ssh_config")
        if isinstance(cfg, str) and not Path(cfg).expanduser().is_absolute():
            table["ssh_config"] = str(path.parent / cfg)
    return path, personal


def load_config(path: Path | None = None, env: str | None = None) -> Config:
    """Load the given file (or the nearest one upwards) with the active environment.

    The environment is ``env``, else ``$DEV_SYNC_ENV``, else the personal
    config's ``env``, else ``[remote]``. Personal ``[envs.NAME]`` tables add to
    (and override) the project's, so the shared file names no one's own VM.
    """
    source = (path if path is not None else find_config()).resolve()
    data = _read_toml(source, "--config")
    personal = _personal()
    envs = data.get("envs", {})
    if personal is not None and isinstance(envs, dict):
        envs = {**envs, **personal[1].envs}
        data["envs"] = envs
    chosen = env or os.environ.get("DEV_SYNC_ENV") or (personal[1].env if personal else None)
    if chosen and chosen != DEFAULT_ENV:
        if not isinstance(envs, dict) or chosen not in envs:
            known = ", ".join([DEFAULT_ENV, *sorted(envs)]) if isinstance(envs, dict) else ""
            raise ConfigError(
                f"{source}: no environment named {chosen!r} (known: {known})",
                f"add [envs.{chosen}] to {source} or to {personal_config_path()}",
            )
        data["remote"] = envs[chosen]
    elif "remote" not in data:
        raise ConfigError(
            f"{source}: [remote]: required table is missing and no environment was chosen",
            "add [remote] with host and path, or pick one of [envs] with --env NAME",
        )
    if "env" in data:
        raise ConfigError(f"{source}: env: unknown key",
                          "choose the environment with --env NAME or DEV_SYNC_ENV")
    config = parse_config(data, source)
    if chosen and chosen != DEFAULT_ENV:
        config = config.model_copy(update={"env": chosen})
    elif config.cloud is not None:
        if config.remote.cloud is not None:
            raise ConfigError(
                f"{source}: [cloud] and [remote.cloud] both describe the default environment's VM",
                f"keep one of them in {source}",
            )
        remote = config.remote.model_copy(update={"cloud": config.cloud})
        config = config.model_copy(update={"remote": remote})
    return config


STARTER = """\
# dev-sync.toml: keep a remote development machine in lockstep with this folder.
# Reference: https://github.com/dev-sync/dev-sync#configuration

[remote]
# Any ssh destination: a Host alias from ~/.ssh/config, or user@address.
host = {host}
# Absolute path of the project on the remote. dev-sync creates it and marks it
# with a .dev-sync-root file; it refuses a non-empty folder it did not create.
path = {path}
# user = "dev"                  # overrides the user from the ssh config
# port = 22
# ssh_config = "ssh_config"     # an ssh config file (passed as ssh -F), relative to this file
# connect_timeout = 10          # seconds
# rsync_path = "rsync"          # the rsync program on the remote
# python = "python3"            # runs the fast-path agent on the remote (3.8+)

# A cloud VM that `dev-sync up` starts when it is stopped:
# [remote.cloud]
# provider = "aws"
# region = "eu-west-1"
# instance_id = "i-0123456789abcdef0"   # or: tags = {{ Name = "dev-alice" }}

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
# Small changes go through a tiny agent on the remote (one round trip);
# without python3 there, everything goes through rsync.
# agent = true
# agent_max_bytes = 1048576
"""


def toml_string(value: str) -> str:
    """A TOML basic string holding ``value`` exactly, whatever characters it has."""
    out = []
    for ch in value:
        if ch in '"\\':
            out.append("\\" + ch)
        elif ord(ch) < 0x20 or ord(ch) == 0x7F:
            out.append(f"\\u{ord(ch):04x}")
        else:
            out.append(ch)
    return '"' + "".join(out) + '"'


def toml_key(key: str) -> str:
    """A TOML key: bare when it can be, quoted otherwise (a dot would start a sub-table)."""
    if key and all(c.isascii() and (c.isalnum() or c in "_-") for c in key):
        return key
    return toml_string(key)


def starter_text(host: str, path: str) -> str:
    """The commented starter file; values are quoted, so any host or path stays one value."""
    return STARTER.format(host=toml_string(host), path=toml_string(path))
