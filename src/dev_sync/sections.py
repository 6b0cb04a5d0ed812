"""The feature tables of ``dev-sync.toml``: [deps], [services.NAME], [idle], [provision].

They live apart from the code that acts on them because ``dev-sync up``
validates the whole file before its first rsync may start, so whatever
loading the config imports is paid on every start: here that is pydantic and
a few standard modules, never asyncio, the event types or the features'
remote code. The feature modules import their tables from here (and
re-export them), never the other way round.
"""

from __future__ import annotations

import fnmatch
import functools
import hashlib
import os
import posixpath
import re
from collections.abc import Iterator
from dataclasses import dataclass
from typing import TYPE_CHECKING, Annotated, Any, Literal

from pydantic import (
    AfterValidator,
    BaseModel,
    BeforeValidator,
    ConfigDict,
    Field,
    ValidationError,
    ValidationInfo,
    ValidatorFunctionWrapHandler,
    field_validator,
    model_validator,
)
from pydantic_core import InitErrorDetails, PydanticCustomError

if TYPE_CHECKING:
    import pathspec


class _Strict(BaseModel):
    # A misspelt key is an error, never silently ignored (see dev_sync.config).
    model_config = ConfigDict(extra="forbid", frozen=True, strict=True)


# --------------------------------------------------------------------------
# [deps]: the package-manager presets and custom rules


@dataclass(frozen=True)
class Preset:
    """A package manager dev-sync knows without configuration.

    ``globs`` match the lock file's name (its last path component) in any
    folder; ``command`` runs with ``sh -c`` in that folder, with the changed
    lock files as ``"$@"``.
    """

    name: str
    globs: tuple[str, ...]
    command: str

    def matches(self, rel: str) -> bool:
        base = rel.rsplit("/", 1)[-1]
        return any(fnmatch.fnmatchcase(base, g) for g in self.globs)


# pip: a venv next to the requirements file, created on first use, then one
# `pip install -r FILE` per changed requirements file (given as "$@").
_PIP = (
    '[ -x .venv/bin/python ] || python3 -m venv .venv || exit; '
    'n=$#; for f do set -- "$@" -r "$f"; done; shift "$n"; '
    'exec .venv/bin/python -m pip install "$@"'
)

PRESETS: dict[str, Preset] = {
    p.name: p
    for p in (
        Preset("npm", ("package-lock.json", "npm-shrinkwrap.json"),
               "npm install --no-audit --no-fund"),
        Preset("yarn", ("yarn.lock",), "yarn install"),
        Preset("pnpm", ("pnpm-lock.yaml",), "pnpm install"),
        Preset("pip", ("requirements*.txt",), _PIP),
        Preset("poetry", ("poetry.lock",), "poetry install --no-interaction"),
        Preset("uv", ("uv.lock",), "uv sync"),
        Preset("bundler", ("Gemfile.lock",), "bundle install"),
        Preset("go", ("go.sum",), "go mod download"),
    )
}
"""Built-in presets, in the order their jobs run within one folder."""


def _check_command(value: str) -> str:
    if not value.strip():
        raise ValueError("must not be empty (a shell command such as \"npm ci\")")
    if "\0" in value:
        raise ValueError("must not contain NUL characters")
    return value


class PresetConfig(_Strict):
    """``[deps.NAME]`` for a built-in preset: switch it off or change its command."""

    enabled: bool = True
    command: str | None = None  # None: the preset's own command

    @field_validator("command")
    @classmethod
    def _command(cls, value: str | None) -> str | None:
        return None if value is None else _check_command(value)


_RULE_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]*")


def _check_glob(pattern: str) -> None:
    """Raise ValueError if ``pattern`` is not a gitignore pattern that can match a file."""
    if not pattern.strip() or "\n" in pattern or "\r" in pattern or "\0" in pattern:
        raise ValueError(f"bad glob {pattern!r}: must be a non-empty single line")
    if pattern.startswith("#"):
        raise ValueError(f"bad glob {pattern!r}: a leading # makes it a comment (write \\#)")
    if ".." in pattern.lstrip("!").strip("/").split("/"):
        raise ValueError(f"bad glob {pattern!r}: globs are relative to the tree root; no '..'")
    try:
        import pathspec  # only projects with [[deps.rule]] pay for it

        spec = pathspec.GitIgnoreSpec.from_lines([pattern])
    except re.error as exc:  # e.g. a reversed range: [z-a]
        raise ValueError(f"bad glob {pattern!r}: {exc.msg}") from None
    except ValueError:  # pathspec's own refusal, e.g. a lone ! or a trailing backslash
        raise ValueError(f"bad glob {pattern!r}: not a valid gitignore pattern") from None
    if not spec.patterns or spec.patterns[0].include is None:
        raise ValueError(f"bad glob {pattern!r}: it can never match (an unclosed [ ?)")


class RuleConfig(_Strict):
    """``[[deps.rule]]``: a custom trigger, for what the presets do not cover."""

    name: str
    globs: list[str]
    command: str
    cwd: Literal["file", "root"] = "file"

    @field_validator("name")
    @classmethod
    def _name(cls, value: str) -> str:
        if not _RULE_NAME.fullmatch(value):
            raise ValueError(
                f"must be a short name (letters, digits, '.', '_', '-'), got {value!r}"
            )
        if value in PRESETS:
            raise ValueError(
                f"{value!r} is a built-in preset: configure it as [deps.{value}] instead"
            )
        return value

    @field_validator("globs")
    @classmethod
    def _globs(cls, value: list[str]) -> list[str]:
        if not value:
            raise ValueError('must list at least one glob, e.g. ["db/schema.sql"]')
        for pattern in value:
            _check_glob(pattern)
        if all(p.startswith("!") for p in value):
            raise ValueError("needs at least one pattern that is not a !negation")
        return value

    @field_validator("command")
    @classmethod
    def _command(cls, value: str) -> str:
        return _check_command(value)

    def matches(self, rel: str) -> bool:
        return _spec(tuple(self.globs)).match_file(rel)


@functools.lru_cache(maxsize=64)
def _spec(globs: tuple[str, ...]) -> pathspec.GitIgnoreSpec:
    import pathspec

    return pathspec.GitIgnoreSpec.from_lines(globs)


class DepsConfig(_Strict):
    """The ``[deps]`` section.

    ```toml
    [deps]
    enabled = true                 # master switch

    [deps.npm]
    command = "npm ci"             # replace a preset's command
    [deps.go]
    enabled = false                # or switch it off

    [[deps.rule]]                  # custom trigger
    name = "prisma"
    globs = ["prisma/schema.prisma"]   # gitignore syntax, relative to the tree root
    command = "npx prisma generate"
    cwd = "root"                   # "file" (default): the matched file's folder
    ```
    """

    enabled: bool = True
    npm: PresetConfig = Field(default_factory=PresetConfig)
    yarn: PresetConfig = Field(default_factory=PresetConfig)
    pnpm: PresetConfig = Field(default_factory=PresetConfig)
    pip: PresetConfig = Field(default_factory=PresetConfig)
    poetry: PresetConfig = Field(default_factory=PresetConfig)
    uv: PresetConfig = Field(default_factory=PresetConfig)
    bundler: PresetConfig = Field(default_factory=PresetConfig)
    go: PresetConfig = Field(default_factory=PresetConfig)
    rule: list[RuleConfig] = Field(default_factory=list)

    @model_validator(mode="wrap")
    @classmethod
    def _tables(cls, data: Any, handler: ValidatorFunctionWrapHandler) -> Any:
        """Name a misspelt preset table (``[deps.nmp]``) instead of "unknown key".

        The error is located at ``deps.nmp`` so the config error formatter
        prints ``[deps] nmp: unknown preset 'nmp'; known: ...``, and is reported
        together with every other problem of the section.
        """
        errors: list[InitErrorDetails] = []
        if isinstance(data, dict):
            known = ", ".join(PRESETS)
            for key, value in data.items():
                if key == "rule" and isinstance(value, dict):
                    errors.append(_error(
                        "rule_table", "must be an array of tables: write [[deps.rule]]",
                        key, value))
                elif key in PRESETS and not isinstance(value, dict):
                    errors.append(_error(
                        "preset_table", f"must be a table: write [deps.{key}] with "
                        "enabled = false or command = \"...\"", key, value))
                elif key not in cls.model_fields and isinstance(value, dict):
                    errors.append(_error(
                        "unknown_preset", f"unknown preset {key!r}; known: {known}",
                        key, value))
            if errors:
                bad = {str(e["loc"][0]) for e in errors}
                data = {k: v for k, v in data.items() if k not in bad}
        try:
            result = handler(data)
        except ValidationError as exc:
            if not errors:
                raise
            errors.extend(_reraise(exc))
        if errors:
            raise ValidationError.from_exception_data(cls.__name__, errors)
        return result

    @model_validator(mode="after")
    def _unique_rules(self) -> DepsConfig:
        seen: set[str] = set()
        for rule in self.rule:
            if rule.name in seen:
                raise ValueError(f"rule name {rule.name!r} is used twice; names must be unique")
            seen.add(rule.name)
        return self

    def preset(self, name: str) -> PresetConfig:
        value = getattr(self, name)
        assert isinstance(value, PresetConfig)
        return value


def _error(kind: str, message: str, key: str, value: object) -> InitErrorDetails:
    # The message is passed as context, so braces in a user's key stay literal.
    return {"type": PydanticCustomError(kind, "{message}", {"message": message}),
            "loc": (key,), "input": value}


def _reraise(exc: ValidationError) -> Iterator[InitErrorDetails]:
    """The errors of ``exc`` in the form ValidationError.from_exception_data takes."""
    for e in exc.errors():
        message = e["msg"].removeprefix("Value error, ")
        yield {"type": PydanticCustomError(e["type"], "{message}", {"message": message}),
               "loc": e["loc"], "input": e["input"]}


# --------------------------------------------------------------------------
# [services.NAME]

ManagerName = Literal["supervisor", "pm2", "systemd", "command"]

_NAME_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,63}")
# Names a manager may already use for a program: supervisor groups ("grp:web"),
# systemd template instances ("web@1.service").
_PROGRAM_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.:@-]{0,127}")
_ENV_RE = re.compile(r"[A-Za-z_][A-Za-z0-9_]*")
_HOST_LABEL_RE = re.compile(r"(?!-)[A-Za-z0-9-]{1,63}(?<!-)")


def check_service_name(name: str) -> str:
    """A service name becomes a file name and a program name on the remote: keep it plain."""
    if not _NAME_RE.fullmatch(name):
        raise ValueError(
            f"service names are letters, digits, '_', '.' and '-' (at most 64), got {name!r}"
        )
    return name


ServiceName = Annotated[str, AfterValidator(check_service_name)]
"""The key type for ``[services.NAME]`` tables: ``dict[ServiceName, ServiceConfig]``."""


def check_restart_pattern(pattern: str) -> str:
    """Validate one ``restart_on`` pattern (gitignore syntax, relative to the tree root).

    Parsed by the same code as the sync rules (:mod:`dev_sync.ignore`), so a
    pattern means here what it means in ``exclude``; a pattern git could never
    match (an unclosed ``[``, a trailing backslash) is an error, not a silent no-op.
    """
    if not pattern.strip():
        raise ValueError("patterns must not be empty")
    if any(c in pattern for c in "\n\r\0"):
        raise ValueError(f"patterns must be single lines, got {pattern!r}")
    if pattern.startswith("#"):
        raise ValueError(
            f"{pattern!r} would be a comment in gitignore syntax; write \\# for a literal #"
        )
    body = pattern.removeprefix("!").lstrip("/")
    if body.startswith("./") or ".." in body.split("/"):
        raise ValueError(
            f"patterns are relative to the tree root, without ./ or .. components, got {pattern!r}"
        )
    from dev_sync.ignore import _parse_line  # only projects with restart_on pay for it

    if _parse_line(os.fsencode(pattern)) is None:
        raise ValueError(
            f"{pattern!r} is not a valid gitignore pattern (unclosed [ or a trailing \\?)"
        )
    return pattern


class ServiceConfig(_Strict):
    """One ``[services.NAME]`` table.

    ``command`` runs with ``/bin/sh -c`` in ``cwd`` with ``env`` on top of the
    manager's environment (``PORT`` is set to ``port`` unless ``env`` sets it,
    the convention most frameworks read). ``program`` names the service in its
    manager: with a ``command`` dev-sync defines it under that name (default:
    the service's own name); without one it *adopts* a program the manager
    already runs (PM2 or systemd), which it then only restarts and watches.
    """

    # manager and program come first: the command check reads them.
    manager: ManagerName = "supervisor"
    program: str | None = None
    command: str | None = Field(default=None, validate_default=True)
    cwd: str = "."
    env: dict[str, str] = Field(default_factory=dict)
    restart_on: list[Annotated[str, AfterValidator(check_restart_pattern)]] = Field(
        default_factory=list
    )
    reload: Literal["restart", "self"] = "restart"
    port: int | None = Field(default=None, ge=1, le=65535)
    hostname: str | None = None

    @field_validator("command")
    @classmethod
    def _command(cls, value: str | None, info: ValidationInfo) -> str | None:
        if value is not None:
            if not value.strip() or "\0" in value:
                raise ValueError("must be a non-empty shell command")
            return value
        manager = info.data.get("manager", "supervisor")
        if info.data.get("program") is None:
            raise ValueError(
                "required: the shell command that runs the service "
                "(or set program = NAME to adopt one its manager already runs)"
            )
        if manager in ("supervisor", "command"):
            raise ValueError(
                f"required with manager = {manager!r} "
                "(only pm2 and systemd programs can be adopted by name)"
            )
        return value

    @field_validator("cwd")
    @classmethod
    def _cwd(cls, value: str) -> str:
        if not value or value.startswith("/") or any(c in value for c in "\n\0"):
            raise ValueError(f"must be a folder relative to the remote root, got {value!r}")
        norm = posixpath.normpath(value)
        if norm == ".." or norm.startswith("../"):
            raise ValueError(f"must stay inside the remote root, got {value!r}")
        return norm

    @field_validator("env")
    @classmethod
    def _env(cls, value: dict[str, str]) -> dict[str, str]:
        for key, val in value.items():
            if not _ENV_RE.fullmatch(key):
                raise ValueError(f"{key!r} is not an environment variable name")
            if "\0" in val:
                raise ValueError(f"the value of {key} holds a NUL character")
        return value

    @field_validator("hostname")
    @classmethod
    def _hostname(cls, value: str | None) -> str | None:
        if value is None:
            return value
        labels = value.rstrip(".").split(".")
        if len(value) > 253 or not all(_HOST_LABEL_RE.fullmatch(lb) for lb in labels):
            raise ValueError(f"must be a host name such as api.dev.local, got {value!r}")
        return value

    @field_validator("program")
    @classmethod
    def _program(cls, value: str | None) -> str | None:
        if value is not None and not _PROGRAM_RE.fullmatch(value):
            raise ValueError(
                f"must be a program name (letters, digits and _ . : @ -), got {value!r}"
            )
        return value

    @property
    def adopted(self) -> bool:
        """True when dev-sync only restarts and watches a program it did not define."""
        return self.command is None


# --------------------------------------------------------------------------
# [idle]: durations and the table

_DURATION_RE = re.compile(r"(\d+(?:\.\d+)?)\s*(h|m|s)")
_UNITS = {"h": 3600.0, "m": 60.0, "s": 1.0}


def parse_duration(value: object) -> float:
    """Seconds in ``45m``, ``2h``, ``90s``, ``1h30m`` (or a plain number of seconds)."""
    if isinstance(value, int | float) and not isinstance(value, bool):
        if value < 0:
            raise ValueError(f"must not be negative, got {value!r}")
        return float(value)
    text = value.strip().lower().replace(" ", "") if isinstance(value, str) else ""
    if text == "0":
        return 0.0
    pos, total = 0, 0.0
    for m in _DURATION_RE.finditer(text):
        if m.start() != pos:
            break
        total += float(m.group(1)) * _UNITS[m.group(2)]
        pos = m.end()
    if not text or pos != len(text):
        raise ValueError(f"must be a duration such as 45m, 2h or 90s, got {value!r}")
    return total


def format_duration(seconds: float) -> str:
    """The shortest of ``2h``, ``1h30m``, ``45m``, ``90s`` for a number of seconds."""
    s = round(seconds)
    if s and s % 3600 == 0:
        return f"{s // 3600}h"
    if s >= 3600 and s % 60 == 0:
        return f"{s // 3600}h{s % 3600 // 60}m"
    if s and s % 60 == 0:
        return f"{s // 60}m"
    return f"{s}s"


Duration = Annotated[float, BeforeValidator(parse_duration)]


class IdleConfig(BaseModel):
    """The ``[idle]`` table: when the VM counts as idle and how it is stopped."""

    model_config = ConfigDict(extra="forbid", frozen=True, strict=True)

    after: Duration = Field(default=2700.0, ge=120)
    warn_before: Duration = Field(default=300.0, ge=0)
    # Busy CPU (percent of all cores, over the minute between checks) counts as use.
    cpu_above: float | None = Field(default=None, gt=0, lt=100)
    stop: Literal["shutdown", "command"] = "shutdown"
    # Run as an argument list (no shell); with stop = "command" only.
    stop_command: list[str] = Field(default_factory=list)

    @model_validator(mode="after")
    def _consistent(self) -> IdleConfig:
        if self.warn_before >= self.after:
            raise ValueError(
                f"warn_before ({format_duration(self.warn_before)}) must be shorter than "
                f"after ({format_duration(self.after)})"
            )
        if self.stop == "command":
            if not self.stop_command or not self.stop_command[0].strip():
                raise ValueError(
                    'stop = "command" needs stop_command, an argument list such as '
                    '["aws", "ec2", "stop-instances", "--instance-ids", "i-0123"]'
                )
            if any("\0" in arg for arg in self.stop_command):
                raise ValueError("stop_command must not contain NUL characters")
        elif self.stop_command:
            raise ValueError('stop_command is used only with stop = "command"')
        return self


# --------------------------------------------------------------------------
# [provision]

PACKAGES_STEP = "packages"

_STEP_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,63}")
# Package names as apt, dnf and apk spell them (":" for an architecture, "+" in
# libstdc++); no "=" version pins, since the installed check looks names up.
_PACKAGE = re.compile(r"[A-Za-z0-9][A-Za-z0-9.+_:-]{0,127}")


def _check_argv(value: list[str] | None) -> list[str] | None:
    if value is None:
        return value
    if not value or not value[0].strip():
        raise ValueError('must be a non-empty argument list, e.g. ["make", "setup"]')
    if any("\0" in arg for arg in value):
        raise ValueError("arguments must not contain NUL characters")
    return value


def _check_folder(value: str) -> str:
    if not value or value.startswith("/") or any(c in value for c in "\n\0"):
        raise ValueError(f"must be a folder relative to the remote root, got {value!r}")
    norm = posixpath.normpath(value)
    if norm == ".." or norm.startswith("../"):
        raise ValueError(f"must stay inside the remote root, got {value!r}")
    return norm


class StepConfig(_Strict):
    """One ``[[provision.steps]]`` table: a command, where it runs, and its guard.

    ``run`` is an argument list, passed to the program as it is; ``shell`` is
    a shell command line, for pipes and ``&&``, and is the only place where
    text is interpreted by a shell. ``cwd``, ``creates`` and ``unless`` are
    relative to the remote root.
    """

    name: str
    run: list[str] | None = None
    shell: str | None = None
    cwd: str = "."
    creates: str | None = None
    unless: list[str] | None = None

    @field_validator("name")
    @classmethod
    def _name(cls, value: str) -> str:
        if not _STEP_NAME.fullmatch(value):
            raise ValueError(
                f"step names are letters, digits, '_', '.' and '-' (at most 64), got {value!r}"
            )
        if value == PACKAGES_STEP:
            raise ValueError(f"{value!r} is the name of the packages phase; pick another")
        return value

    @field_validator("run", "unless")
    @classmethod
    def _argv(cls, value: list[str] | None) -> list[str] | None:
        return _check_argv(value)

    @field_validator("shell")
    @classmethod
    def _shell(cls, value: str | None) -> str | None:
        if value is not None and (not value.strip() or "\0" in value):
            raise ValueError("must be a non-empty shell command line")
        return value

    @field_validator("cwd")
    @classmethod
    def _cwd(cls, value: str) -> str:
        return _check_folder(value)

    @field_validator("creates")
    @classmethod
    def _creates(cls, value: str | None) -> str | None:
        if value is not None and (not value.strip() or any(c in value for c in "\n\0")):
            raise ValueError(f"must be a path (absolute, or relative to cwd), got {value!r}")
        return value

    @model_validator(mode="after")
    def _one_command(self) -> StepConfig:
        if (self.run is None) == (self.shell is None):
            raise ValueError(
                f"step {self.name!r} needs exactly one of run = [argv...] or shell = \"...\""
            )
        return self

    def digest(self) -> str:
        """A hash of the whole definition: any change to it makes the step run again."""
        import json  # only provisioning needs it, not validating the file

        body = json.dumps(self.model_dump(), sort_keys=True, separators=(",", ":"))
        return hashlib.sha256(body.encode()).hexdigest()


class ProvisionConfig(_Strict):
    """The ``[provision]`` section.

    ```toml
    [provision]
    packages = ["rsync", "redis-server"]   # installed when missing (apt-get/dnf/yum/apk)
    script = "scripts/bootstrap.sh"        # or [[provision.steps]], not both

    [[provision.steps]]
    name = "database"
    shell = "createdb app || true"
    unless = ["psql", "-d", "app", "-c", "select 1"]
    ```
    """

    packages: list[str] = []
    script: str | None = None
    steps: list[StepConfig] = []

    @field_validator("packages")
    @classmethod
    def _packages(cls, value: list[str]) -> list[str]:
        for name in value:
            if not _PACKAGE.fullmatch(name):
                raise ValueError(
                    f"{name!r} is not a package name (letters, digits and . + _ : -; "
                    "no version pins)"
                )
        return value

    @field_validator("script")
    @classmethod
    def _script(cls, value: str | None) -> str | None:
        if value is None:
            return value
        if value.startswith("/"):
            raise ValueError(f"must be a file of the synced tree, relative to it, got {value!r}")
        return _check_folder(value)

    @model_validator(mode="after")
    def _script_or_steps(self) -> ProvisionConfig:
        if self.script is not None and self.steps:
            raise ValueError(
                "set either script or [[provision.steps]], not both "
                "(the script can be one of the steps: run = [\"sh\", \"SCRIPT\"])"
            )
        seen: set[str] = set()
        for step in self.steps:
            if step.name in seen:
                raise ValueError(f"step name {step.name!r} is used twice; names must be unique")
            seen.add(step.name)
        return self

    @property
    def empty(self) -> bool:
        return not (self.packages or self.script or self.steps)

