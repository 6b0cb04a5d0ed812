"""``dev-sync provision``: make a fresh VM ready to run the project, idempotently.

One command takes a new machine from "ssh works" to "services running":

1. **packages**: the system packages ``[provision] packages`` names that are
   missing are installed with the remote's own package manager (apt-get, dnf,
   yum or apk, found on the remote; ``sudo -n`` when not root). This comes
   first because the sync itself needs rsync on the remote, and a fresh VM
   may not have it; it only needs ``sh`` over plain ssh.
2. **sync**: the first full reconcile, the same one ``dev-sync up --once``
   runs (creating and marking the remote root), so the steps see the tree.
3. **steps**: ``[provision] script`` (a file of the synced tree) or
   ``[[provision.steps]]``, run one after the other from the remote root,
   output streamed and prefixed with the step's name.
4. **installs**: every ``[deps]`` install whose lock file differs from the
   remote record, as ``dev-sync up`` does at start.
5. **services**: ``dev-sync services install``.

Idempotency: each finished step is recorded on the remote in
``<root>/.dev-sync/provision.json`` with a hash of its definition (for a
script, of its contents). A step whose hash is recorded does not run again;
a changed definition runs again. A step with a guard (``creates`` or
``unless``) is decided by its guard instead, like Ansible's ``creates``: it
runs exactly when its guard says its work is missing. Packages are probed
every time, installs follow their own record, and services install only what
changed, so a second ``provision`` changes nothing and says so.

A failing step stops everything after it (exit 1) with its last lines and the
ssh command that runs it again by hand; the steps before it stay recorded.
"""

from __future__ import annotations

import hashlib
import json
import posixpath
import re
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

from dev_sync import deps
from dev_sync.errors import DevSyncError, UsageError
from dev_sync.events import (
    Event,
    InstallStarted,
    Provisioned,
    ProvisionLine,
    ProvisionStep,
    Reconciled,
    Reporter,
    ServicesInstalled,
    Stopped,
)
from dev_sync.sections import PACKAGES_STEP
from dev_sync.sections import ProvisionConfig as ProvisionConfig

if TYPE_CHECKING:
    from dev_sync.config import Config
    from dev_sync.ssh import SshMaster

RECORD_PATH = ".dev-sync/provision.json"
"""The record of finished steps, relative to the remote root."""


# --------------------------------------------------------------------------
# Steps as they run


@dataclass(frozen=True)
class Step:
    """A step ready to run: ``sh -c COMMAND sh ARGS...`` in ``cwd`` of the remote root."""

    name: str
    command: str
    args: tuple[str, ...]
    cwd: str  # relative to the remote root, "" for the root itself
    digest: str
    creates: str | None = None
    unless: tuple[str, ...] | None = None

    @property
    def guarded(self) -> bool:
        return self.creates is not None or self.unless is not None

    @property
    def display(self) -> str:
        """The command as people read it."""
        if self.command == _EXEC_ARGS:
            import shlex

            return shlex.join(self.args)
        return self.command if not self.args else f"{self.command} {' '.join(self.args)}"


# An argument list runs as the positional parameters of a fixed script: the
# remote shell never parses the user's arguments.
_EXEC_ARGS = 'exec "$@"'
# A script runs directly when it is executable (its #! line counts), else with sh.
_RUN_SCRIPT = 'if [ -x "$1" ]; then exec "$@"; else exec sh "$@"; fi'


def plan_steps(config: ProvisionConfig, local_root: Path) -> list[Step]:
    """The steps of ``[provision]`` in order; the script, if any, is read locally for its hash.

    Raises UsageError when the script is missing here: it reaches the remote
    through the sync, so it has to exist in the local tree.
    """
    if config.script is not None:
        path = local_root / config.script
        try:
            body = path.read_bytes()
        except OSError:
            raise UsageError(
                f"[provision] script {config.script!r} is not a file in {local_root}",
                "fix the path (relative to the folder of dev-sync.toml) or create the script",
            ) from None
        digest = hashlib.sha256(b"script\0" + config.script.encode() + b"\0" + body).hexdigest()
        return [Step(config.script, _RUN_SCRIPT, (f"./{config.script}",), "", digest)]
    steps = []
    for s in config.steps:
        command, args = (_EXEC_ARGS, tuple(s.run)) if s.run is not None else (s.shell or "", ())
        steps.append(Step(
            s.name, command, args, "" if s.cwd == "." else s.cwd, s.digest(),
            s.creates, tuple(s.unless) if s.unless is not None else None,
        ))
    return steps


def check_script_synced(config: ProvisionConfig, local_root: Path, is_excluded:
                        Callable[[str], bool]) -> None:
    """Refuse a script the sync leaves out: it would never reach the remote."""
    if config.script is not None and is_excluded(config.script):
        raise UsageError(
            f"[provision] script {config.script!r} is excluded from the sync, so it never "
            "reaches the remote",
            "remove it from [sync] exclude or .gitignore, or move the script",
        )


# $1 = remote root, $2 = folder relative to it, $3 = creates ("" for none),
# then the unless argv (if any). Prints one word: creates | unless | run.
_GUARD = r"""
dir=$1${2:+/$2}; creates=$3; shift 3
cd -- "$dir" 2>/dev/null || { echo run; exit 0; }
if [ -n "$creates" ] && [ -e "$creates" ]; then echo creates; exit 0; fi
if [ "$#" -gt 0 ] && "$@" </dev/null >/dev/null 2>&1; then echo unless; exit 0; fi
echo run
"""


def guard_argv(remote_root: str, step: Step) -> list[str]:
    return ["sh", "-c", _GUARD, "dev-sync-guard", remote_root, step.cwd, step.creates or "",
            *(step.unless or ())]


# --------------------------------------------------------------------------
# The remote record of finished steps

_SHA256 = re.compile(r"[0-9a-f]{64}")


def parse_record(raw: bytes) -> dict[str, str]:
    """Step name -> digest; a corrupt record reads as empty (every step runs again)."""
    try:
        data = json.loads(raw or b"{}")
    except ValueError:
        return {}
    steps = data.get("steps") if isinstance(data, dict) else None
    if not isinstance(steps, dict):
        return {}
    out = {}
    for name, entry in steps.items():
        digest = entry.get("hash") if isinstance(entry, dict) else None
        if isinstance(name, str) and isinstance(digest, str) and _SHA256.fullmatch(digest):
            out[name] = digest
    return out


async def read_record(master: SshMaster, root: str) -> dict[str, str]:
    return parse_record(await deps.read_state(master, root, posixpath.basename(RECORD_PATH)))


async def write_record(master: SshMaster, root: str, record: Mapping[str, str]) -> None:
    steps = {name: {"hash": digest} for name, digest in sorted(record.items())}
    body = json.dumps({"version": 1, "steps": steps}, indent=1)
    await deps.write_state(master, root, posixpath.basename(RECORD_PATH), body.encode() + b"\n")


# --------------------------------------------------------------------------
# System packages

PackageManager = Literal["apt", "dnf", "yum", "apk"]

# $@ = package names. Prints pm=, uid=, sudo= and one missing= per package
# that is not installed. dpkg-query, rpm and apk look names up locally: no
# network, no lock, so probing on every run costs one round trip.
_PROBE = r"""
if command -v apt-get >/dev/null 2>&1 && command -v dpkg-query >/dev/null 2>&1; then pm=apt
elif command -v dnf >/dev/null 2>&1; then pm=dnf
elif command -v yum >/dev/null 2>&1; then pm=yum
elif command -v apk >/dev/null 2>&1; then pm=apk
else pm=none; fi
echo "pm=$pm"
echo "uid=$(id -u)"
if command -v sudo >/dev/null 2>&1; then echo sudo=1; else echo sudo=0; fi
for p do
  case $pm in
    apt) case $(dpkg-query -W -f='${Status}' "$p" 2>/dev/null) in
           *" installed") continue ;; esac ;;
    dnf|yum) rpm -q --quiet "$p" >/dev/null 2>&1 && continue ;;
    apk) apk info -e "$p" >/dev/null 2>&1 && continue ;;
  esac
  echo "missing=$p"
done
"""


@dataclass(frozen=True)
class PackageProbe:
    """What the remote said about its package manager and the wanted packages."""

    manager: PackageManager | None
    root: bool
    sudo: bool
    missing: tuple[str, ...]


def probe_argv(packages: Sequence[str]) -> list[str]:
    return ["sh", "-c", _PROBE, "dev-sync-packages", *packages]


def parse_probe(out: str) -> PackageProbe:
    values: dict[str, str] = {}
    missing: list[str] = []
    for line in out.splitlines():
        key, sep, value = line.partition("=")
        if not sep:
            continue
        if key == "missing":
            missing.append(value)
        else:
            values[key] = value.strip()
    managers: dict[str, PackageManager] = {"apt": "apt", "dnf": "dnf", "yum": "yum",
                                           "apk": "apk"}
    return PackageProbe(managers.get(values.get("pm", "")), values.get("uid") == "0",
                        values.get("sudo") == "1", tuple(missing))


def package_commands(probe: PackageProbe) -> list[list[str]]:
    """The remote argvs that install ``probe.missing``, in order ([] when nothing is missing).

    Not root: through ``sudo -n``, which fails at once instead of waiting for
    a password nobody can type (provision runs without a terminal). apt-get
    refreshes its lists first: a fresh VM's are often empty.
    """
    if not probe.missing:
        return []
    names = list(probe.missing)
    if probe.manager is None:
        raise DevSyncError(
            f"cannot install {', '.join(names)}: no apt-get, dnf, yum or apk on the remote",
            "install them by hand, or remove them from [provision] packages",
        )
    if probe.root:
        sudo: list[str] = []
    elif probe.sudo:
        sudo = ["sudo", "-n"]
    else:
        raise DevSyncError(
            f"cannot install {', '.join(names)}: the remote user is not root and has no sudo",
            "install them as root, or log in as a user who may use sudo",
        )
    if probe.manager == "apt":
        return [
            [*sudo, "apt-get", "update", "-q"],
            [*sudo, "env", "DEBIAN_FRONTEND=noninteractive", "apt-get", "install", "-y", "-q",
             "--no-install-recommends", *names],
        ]
    if probe.manager == "apk":
        return [[*sudo, "apk", "add", "--no-cache", *names]]
    return [[*sudo, probe.manager, "install", "-y", *names]]


# --------------------------------------------------------------------------
# Running it all


@dataclass
class _Tally:
    """Passes events on and keeps what the summary needs."""

    inner: Reporter
    sent: int = 0
    deleted: int = 0
    installs: list[str] = field(default_factory=list)
    stopped: bool = False

    def emit(self, event: Event) -> None:
        match event:
            case Stopped():
                self.stopped = True
            case Reconciled():
                self.sent += event.files
                self.deleted += event.deleted
            case InstallStarted():
                self.installs.append(event.label)
            case _:
                pass
        self.inner.emit(event)


@dataclass(frozen=True)
class ProvisionReport:
    steps: tuple[tuple[str, str], ...]  # (name, status) in order, packages first
    sent: int
    deleted: int
    installs: tuple[str, ...]
    services: tuple[str, ...]
    services_changed: tuple[str, ...]

    @property
    def changed(self) -> bool:
        return bool(
            any(status not in ("unchanged", "satisfied") for _, status in self.steps)
            or self.sent or self.deleted or self.installs or self.services_changed
        )


class Provisioner:
    """The five phases of ``dev-sync provision`` for one configuration."""

    def __init__(
        self, config: Config, reporter: Reporter, *, state_dir: Path | None = None,
        adopt: bool = False,
    ) -> None:
        self.config = config
        self.tally = _Tally(reporter)
        self.state_dir = state_dir
        self.adopt = adopt
        self.root = config.remote.path
        self.statuses: list[tuple[str, str]] = []

    def _emit(self, event: Event) -> None:
        self.tally.emit(event)

    def _ssh_args(self) -> list[str]:
        r = self.config.remote
        args = ["-F", str(self.config.ssh_config_path)] if self.config.ssh_config_path else []
        if r.port is not None:
            args += ["-p", str(r.port)]
        if r.user is not None:
            args += ["-l", r.user]
        return args

    async def run(self) -> ProvisionReport:
        from dev_sync.ignore import RuleSet

        config = self.config
        sync = config.sync
        rules = RuleSet(config.local_root, sync.exclude, sync.gitignore).reload()
        steps = plan_steps(config.provision, config.local_root)
        check_script_synced(config.provision, config.local_root,
                            lambda rel: rules.is_excluded(rel, False))
        if config.provision.packages:
            await self._with_master(self._packages)
        await self._sync()
        changed: list[str] = []
        await self._with_master(lambda m: self._after_sync(m, steps, rules, changed))
        report = ProvisionReport(
            tuple(self.statuses), self.tally.sent, self.tally.deleted,
            tuple(self.tally.installs), tuple(sorted(config.services)), tuple(sorted(changed)),
        )
        self._emit(Provisioned(report.steps, report.sent, report.deleted, report.installs,
                               report.services, report.services_changed, report.changed))
        return report

    async def _with_master(self, work: Callable[[SshMaster], Any]) -> None:
        from dev_sync.ssh import SshMaster, Target

        master = SshMaster(Target.from_config(self.config))
        await master.connect()
        try:
            await work(master)
        finally:
            await master.close()

    # -- 1. packages ------------------------------------------------------------

    async def _packages(self, master: SshMaster) -> None:
        from dev_sync.runner import CommandError

        wanted = self.config.provision.packages
        started = time.monotonic()
        try:
            result = await master.run(probe_argv(wanted))
        except CommandError as exc:
            raise DevSyncError(f"could not check the packages on {master.target.label}: "
                               f"{exc.last_line()}") from None
        probe = parse_probe(result.out)
        commands = package_commands(probe)
        if not commands:
            self._status(PACKAGES_STEP, "unchanged", f"{', '.join(wanted)} already installed")
            return
        self._emit(ProvisionStep(PACKAGES_STEP, "running",
                                 f"{probe.manager}: installing {', '.join(probe.missing)}"))
        for argv in commands:
            command = deps.command_argv("/", "", _EXEC_ARGS, argv, label="dev-sync-packages")
            outcome = await deps.stream(master, command, self._line(PACKAGES_STEP))
            if outcome.returncode != 0:
                import shlex

                by_hand = ["sudo", *argv[2:]] if argv[:2] == ["sudo", "-n"] else argv
                hint = shlex.join(["ssh", "-t", *self._ssh_args(), self.config.remote.host,
                                   shlex.join(by_hand)])
                self._fail(PACKAGES_STEP, outcome.returncode, started, outcome.tail, hint)
        self._status(PACKAGES_STEP, "ok", f"installed {', '.join(probe.missing)}",
                     started=started)

    # -- 2. the first sync ----------------------------------------------------------

    async def _sync(self) -> None:
        """The reconcile of ``dev-sync up --once``, installs left for after the steps."""
        from dev_sync.deps import DepsConfig
        from dev_sync.engine import Engine

        quiet = self.config.model_copy(update={"deps": DepsConfig(enabled=False)})
        engine = Engine(quiet, self.tally, once=True, adopt=self.adopt, progress=False,
                        state_dir=self.state_dir)
        try:
            await engine.run()
        except DevSyncError as exc:
            if exc.cause.startswith("rsync is not installed") and (
                "rsync" not in self.config.provision.packages
            ):
                raise DevSyncError(exc.cause, 'add "rsync" to [provision] packages, so '
                                   "provision installs it before the first sync") from None
            raise
        if self.tally.stopped:
            # The engine takes Ctrl-C as a clean stop; here it must stop everything.
            raise KeyboardInterrupt

    # -- 3-5. steps, installs, services -------------------------------------------------

    async def _after_sync(self, master: SshMaster, steps: Sequence[Step], rules: Any,
                          changed: list[str]) -> None:
        await self._steps(master, steps)
        await self._installs(master, rules)
        if self.config.services:
            from dev_sync.services import install_all

            changed += await install_all(master, self.root, self.config.local_root.name,
                                         self.config.services)
            self._emit(ServicesInstalled(tuple(sorted(self.config.services)),
                                         tuple(sorted(changed))))

    async def _steps(self, master: SshMaster, steps: Sequence[Step]) -> None:
        from dev_sync.runner import CommandError

        if not steps:
            return
        try:
            record = await read_record(master, self.root)
        except CommandError as exc:
            raise DevSyncError(f"could not read {RECORD_PATH} on the remote: "
                               f"{exc.last_line()}") from None
        for step in steps:
            done = record.get(step.name) == step.digest
            if step.guarded:
                result = await master.run(guard_argv(self.root, step), check=False)
                verdict = result.out.strip()
                if verdict in ("creates", "unless"):
                    why = (f"{step.creates} exists" if verdict == "creates"
                           else "its unless command succeeded")
                    self._status(step.name, "unchanged" if done else "satisfied", why)
                    if not done:
                        record[step.name] = step.digest
                        await write_record(master, self.root, record)
                    continue
            elif done:
                self._status(step.name, "unchanged", "ran before with this definition")
                continue
            await self._run_step(master, step)
            record[step.name] = step.digest
            # Written after each step: a later failure must not make this one run again.
            await write_record(master, self.root, record)

    async def _run_step(self, master: SshMaster, step: Step) -> None:

        started = time.monotonic()
        self._emit(ProvisionStep(step.name, "running", step.display))
        argv = deps.command_argv(self.root, step.cwd, step.command, step.args,
                                 label="dev-sync-provision")
        outcome = await deps.stream(master, argv, self._line(step.name))
        if outcome.returncode != 0:
            where = posixpath.join(self.root, step.cwd) if step.cwd else self.root
            if step.command == _EXEC_ARGS:  # an argument list: shown as one, not as sh -c
                import shlex

                from dev_sync.runner import remote_command

                remote = f"cd {shlex.quote(where)} && {remote_command(step.args)}"
                hint = shlex.join(["ssh", "-t", *self._ssh_args(), self.config.remote.host,
                                   remote])
            else:
                hint = deps.rerun_command(self.config.remote.host, where, step.command,
                                          step.args, ssh_args=self._ssh_args())
            self._fail(step.name, outcome.returncode, started, outcome.tail, hint)
        self._status(step.name, "ok", step.display, started=started)

    async def _installs(self, master: SshMaster, rules: Any) -> None:
        from dev_sync.actions import Actions

        if not self.config.deps.enabled:
            return
        actions = Actions(self.config, master, lambda: rules, self.tally,
                          self.state_dir / "actions.log" if self.state_dir else None,
                          self.state_dir)
        try:
            await actions.refresh()
            await actions.queue.idle()
            failed = sorted(actions.failed)
        finally:
            await actions.close()
        if failed:
            labels = ", ".join(_job_label(key) for key in failed)
            raise DevSyncError(
                f"the tree is synced and the steps ran, but {len(failed)} dependency "
                f"install(s) failed on the remote: {labels}",
                "see the output above; fix the cause and run `dev-sync provision` again "
                "(finished steps do not run again)",
            )

    # -- reporting ---------------------------------------------------------------------

    def _line(self, name: str) -> Callable[[str], None]:
        return lambda line: self._emit(ProvisionLine(name, line))

    def _status(self, name: str, status: str, detail: str, *, started: float | None = None
                ) -> None:
        ms = round((time.monotonic() - started) * 1000) if started is not None else 0
        self.statuses.append((name, status))
        self._emit(ProvisionStep(name, status, detail, ms=ms))

    def _fail(self, name: str, code: int, started: float, tail: Sequence[str], hint: str
              ) -> None:
        ms = round((time.monotonic() - started) * 1000)
        self.statuses.append((name, "failed"))
        self._emit(ProvisionStep(name, "failed", f"exit {code}", ms=ms, code=code,
                                 tail=tuple(tail), rerun=hint))
        shown = "\n".join(f"  | {line}" for line in list(tail)[-15:])
        raise DevSyncError(
            f"provision step {name!r} failed (exit {code}); the steps after it did not run"
            + (f"\n{shown}" if shown else ""),
            f"run it by hand: {hint}\n  then run `dev-sync provision` again "
            "(finished steps do not run again)",
        )


def _job_label(key: str) -> str:
    """An install queue key ("npm:web") as the install events name it ("npm in web")."""
    name, _, directory = key.partition(":")
    return f"{name} in {directory}" if directory else f"{name} at the root"
