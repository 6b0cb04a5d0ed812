"""What the engine tells the world, and the three places it goes.

The engine emits typed events and knows nothing of terminals: a console
reporter renders them for people, a JSON reporter prints one object per line
for tools, and the status file keeps the latest picture for `dev-sync status`.
"""

from __future__ import annotations

import json
import os
import sys
import time
from collections import deque
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Protocol, TextIO

from dev_sync.state import SessionFiles

if TYPE_CHECKING:  # rich costs ~100 ms to import: only the console reporter needs it
    from rich.console import Console
    from rich.progress import Progress, TaskID
    from rich.status import Status


_KINDS: dict[type, str] = {}


@dataclass(frozen=True)
class Event:
    @property
    def kind(self) -> str:
        kind = _KINDS.get(type(self))
        if kind is None:
            name = type(self).__name__
            kind = "".join("_" + c.lower() if c.isupper() else c for c in name).lstrip("_")
            _KINDS[type(self)] = kind
        return kind

    def fields(self) -> dict[str, Any]:
        """The fields by name. Every field is a plain value or a tuple of them, so
        this shallow copy is what ``dataclasses.asdict`` gives, without its deep
        copy of each: a burst emits dozens of pushes a second."""
        return dict(vars(self))


@dataclass(frozen=True)
class StateChanged(Event):
    state: str  # connecting | reconciling | watching | offline | stopped
    detail: str = ""


@dataclass(frozen=True)
class Connected(Event):
    host: str
    remote_root: str
    rsync: str
    adopted: bool = False
    created: bool = False


@dataclass(frozen=True)
class ReconcileProgress(Event):
    bytes: int
    percent: int
    rate: str
    files: int
    total: int | None


@dataclass(frozen=True)
class Reconciled(Event):
    files: int
    bytes: int
    deleted: int
    total: int
    ms: int
    reasons: tuple[str, ...] = ()
    # The first pass was started before the program had loaded (dev_sync.prestart).
    head_start: bool = False


@dataclass(frozen=True)
class Watching(Event):
    backend: str
    directories: int


@dataclass(frozen=True)
class Pushed(Event):
    paths: int
    files: int
    bytes: int
    deleted: int
    ms: int
    sample: tuple[str, ...] = ()
    via: str = "rsync"  # rsync | agent | agent+rsync


@dataclass(frozen=True)
class AgentReady(Event):
    """The fast path is on: small changes go through the agent on the remote."""

    version: str
    python: str
    ms: int


@dataclass(frozen=True)
class ConflictKept(Event):
    """A file edited on the remote was moved aside before dev-sync overwrote it."""

    path: str
    kept: str


@dataclass(frozen=True)
class Offline(Event):
    reason: str
    retry_in: float
    pending: int


@dataclass(frozen=True)
class Problem(Event):
    """Something the user should know about; the session carries on."""

    cause: str
    fix: str = ""
    level: str = "warning"


@dataclass(frozen=True)
class InstallStarted(Event):
    label: str
    directory: str
    command: str
    files: tuple[str, ...]


@dataclass(frozen=True)
class InstallLine(Event):
    label: str
    directory: str
    line: str


@dataclass(frozen=True)
class InstallFinished(Event):
    label: str
    directory: str
    ok: bool
    code: int
    ms: int
    tail: tuple[str, ...] = ()
    rerun: str = ""


@dataclass(frozen=True)
class ServiceRestarting(Event):
    name: str
    cause: str


@dataclass(frozen=True)
class ServiceRestarted(Event):
    name: str
    cause: str
    ok: bool
    ms: int
    state: str
    pid: int | None
    problem: str = ""
    log_tail: tuple[str, ...] = ()


@dataclass(frozen=True)
class ProvisionStep(Event):
    """A provision step (or the packages phase) started or ended.

    status: running | ok | unchanged (done before, same definition) |
    satisfied (its guard says the work is there) | failed.
    """

    name: str
    status: str
    detail: str = ""
    ms: int = 0
    code: int = 0
    tail: tuple[str, ...] = ()
    rerun: str = ""


@dataclass(frozen=True)
class ProvisionLine(Event):
    name: str
    line: str


@dataclass(frozen=True)
class ServicesInstalled(Event):
    names: tuple[str, ...]
    changed: tuple[str, ...]  # new or changed, so (re)started


@dataclass(frozen=True)
class Provisioned(Event):
    """The summary of a whole ``dev-sync provision`` run; ``changed`` is False on a no-op."""

    steps: tuple[tuple[str, str], ...]
    sent: int
    deleted: int
    installs: tuple[str, ...]
    services: tuple[str, ...]
    services_changed: tuple[str, ...]
    changed: bool


@dataclass(frozen=True)
class VmState(Event):
    """A cloud VM on its way up (or down), before any connection is made."""

    instance_id: str
    state: str  # as the cloud reports it: pending, running, stopping, stopped, ...
    step: str  # starting | waiting | ssh | ready | stopping | stopped | failed
    address: str = ""
    seconds: float = 0.0


@dataclass(frozen=True)
class Stopped(Event):
    reason: str = "stopped"


class Reporter(Protocol):
    def emit(self, event: Event) -> None: ...


def _size(n: int) -> str:
    value = float(n)
    for unit in ("B", "kB", "MB", "GB"):
        if value < 1000 or unit == "GB":
            return f"{value:.0f} {unit}" if unit == "B" else f"{value:.1f} {unit}"
        value /= 1000
    return f"{n} B"


class ConsoleReporter:
    """Human output: a line per batch, a progress bar for a long reconcile."""

    def __init__(self, console: Console | None = None) -> None:
        from rich.console import Console

        self.console = console or Console(highlight=False)
        self._progress: Progress | None = None
        self._task: TaskID | None = None
        self._progress_since = 0.0
        self._spinner: Status | None = None
        self._vm_seen = ""

    def _stamp(self) -> str:
        return time.strftime("%H:%M:%S")

    def _bar(self, event: ReconcileProgress) -> None:
        if not self.console.is_terminal:
            return
        now = time.monotonic()
        if self._progress is None:
            from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn

            if not self._progress_since:
                self._progress_since = now
            if now - self._progress_since < 0.5:  # only for what takes more than a moment
                return
            self._progress = Progress(
                TextColumn("reconciling"),
                BarColumn(),
                TextColumn("{task.percentage:>3.0f}%"),
                TextColumn("{task.fields[files]} files"),
                TextColumn("{task.fields[size]}"),
                TextColumn("{task.fields[rate]}"),
                TimeElapsedColumn(),
                console=self.console,
                transient=True,
            )
            self._progress.start()
            self._task = self._progress.add_task("sync", total=100, files=0, size="", rate="")
        assert self._task is not None
        self._progress.update(
            self._task,
            completed=event.percent,
            files=f"{event.files:,}",
            size=_size(event.bytes),
            rate=event.rate,
        )

    def _end_bar(self) -> None:
        if self._progress is not None:
            self._progress.stop()
        self._progress = None
        self._task = None
        self._progress_since = 0.0

    def emit(self, event: Event) -> None:
        c = self.console
        match event:
            case ReconcileProgress():
                self._bar(event)
            case StateChanged(state="connecting", detail=detail):
                c.print(f"[dim]{self._stamp()}[/] connecting to {detail}…")
            case StateChanged(state="reconciling", detail=detail):
                c.print(f"[dim]{self._stamp()}[/] reconciling{f' ({detail})' if detail else ''}…")
            case StateChanged():
                pass
            case Connected():
                note = " (adopted)" if event.adopted else " (created)" if event.created else ""
                c.print(
                    f"[dim]{self._stamp()}[/] connected to [bold]{event.host}[/]:"
                    f"{event.remote_root}{note}, remote rsync {event.rsync}"
                )
            case Reconciled():
                self._end_bar()
                c.print(
                    f"[dim]{self._stamp()}[/] [green]in sync[/]: {event.total:,} entries, "
                    f"sent {event.files:,} files ({_size(event.bytes)}), "
                    f"deleted {event.deleted:,}, {event.ms} ms"
                )
            case Watching():
                c.print(
                    f"[dim]{self._stamp()}[/] watching {event.directories:,} folders "
                    f"({event.backend}); Ctrl-C to stop"
                )
            case Pushed():
                what = ", ".join(event.sample[:3]) + ("…" if event.paths > 3 else "")
                dele = f", deleted {event.deleted}" if event.deleted else ""
                via = "" if event.via == "rsync" else f" via {event.via}"
                c.print(
                    f"[dim]{self._stamp()}[/] [cyan]↑[/] {_count(event.files, 'file')} "
                    f"({_size(event.bytes)}){dele} in {event.ms} ms{via}  [dim]{_escape(what)}[/]"
                )
            case AgentReady():
                c.print(f"[dim]{self._stamp()}[/] fast path on (agent {event.version[:8]}, "
                        f"python {event.python}, {event.ms} ms)")
            case ConflictKept():
                c.print(f"[dim]{self._stamp()}[/] [yellow]conflict[/]: "
                        f"{_escape(event.path)} was edited on the remote; that version is "
                        f"kept at {_escape(event.kept)}")
            case Offline():
                self._end_bar()
                c.print(
                    f"[dim]{self._stamp()}[/] [yellow]offline[/]: {_escape(event.reason)}; "
                    f"{event.pending} changes queued, retrying in {event.retry_in:.1f}s"
                )
            case Problem():
                color = "red" if event.level == "error" else "yellow"
                stamp = self._stamp()
                c.print(f"[dim]{stamp}[/] [{color}]{event.level}[/]: {_escape(event.cause)}")
                if event.fix:
                    c.print(f"  [dim]fix:[/] {_escape(event.fix)}")
            case InstallStarted():
                c.print(f"[dim]{self._stamp()}[/] [magenta]⚙[/] {_escape(event.label)}: "
                        f"{_escape(event.command)}")
            case InstallLine():
                c.print(f"  [dim]{_escape(event.directory or '.')} │[/] {_escape(event.line)}")
            case InstallFinished(ok=True):
                c.print(f"[dim]{self._stamp()}[/] [green]✓[/] {_escape(event.label)} "
                        f"({event.ms / 1000:.1f} s)")
            case InstallFinished():
                c.print(f"[dim]{self._stamp()}[/] [red]✗[/] {_escape(event.label)} failed "
                        f"(exit {event.code}); syncing goes on, the next change retries")
                for line in event.tail[-10:]:
                    c.print(f"  [dim]│[/] {_escape(line)}")
                c.print(f"  [dim]rerun:[/] {_escape(event.rerun)}")
            case ServiceRestarting():
                c.print(f"[dim]{self._stamp()}[/] [blue]↻[/] restarting {_escape(event.name)} "
                        f"({_escape(event.cause)} changed)")
            case ServiceRestarted(ok=True):
                c.print(f"[dim]{self._stamp()}[/] [green]✓[/] {_escape(event.name)} "
                        f"{event.state} (pid {event.pid})")
            case ServiceRestarted():
                c.print(f"[dim]{self._stamp()}[/] [red]✗[/] {_escape(event.name)} is "
                        f"crash-looping: {_escape(event.problem)}; not restarting it again "
                        "until the next change")
                for line in event.log_tail:
                    c.print(f"  [dim]│[/] {_escape(line)}")
            case Stopped():
                self._end_bar()
                c.print(f"[dim]{self._stamp()}[/] stopped ({event.reason})")
            case ProvisionStep():
                self._provision_step(event)
            case ProvisionLine():
                c.print(f"  [dim]{_escape(event.name)} │[/] {_escape(event.line)}")
            case ServicesInstalled():
                note = (f" (new or changed, so restarted: {', '.join(event.changed)})"
                        if event.changed else ", unchanged")
                c.print(f"[dim]{self._stamp()}[/] [green]✓[/] services "
                        f"{_escape(', '.join(event.names))}{_escape(note)}")
            case Provisioned():
                counts: dict[str, int] = {}
                for _, status in event.steps:
                    counts[status] = counts.get(status, 0) + 1
                steps = ", ".join(f"{n} {s}" for s, n in counts.items()) or "no steps"
                verdict = "provisioned" if event.changed else "already provisioned: no changes"
                c.print(f"[dim]{self._stamp()}[/] [green]{verdict}[/] ({steps}; "
                        f"sent {_count(event.sent, 'file')}, "
                        f"{_count(len(event.installs), 'install')})")
            case VmState():
                self._vm(event)
            case _:
                pass

    def _vm(self, event: VmState) -> None:
        """A spinner while a VM boots on a terminal; one line per new state elsewhere."""
        c, vm = self.console, event.instance_id
        if event.step in ("ready", "stopped", "failed"):
            if self._spinner is not None:
                self._spinner.stop()
                self._spinner = None
            self._vm_seen = ""
            if event.step == "failed":
                return  # the error itself follows
            if event.step == "stopped":
                c.print(f"[dim]{self._stamp()}[/] {vm} is stopped")
                return
            took = f" (after {event.seconds:.0f} s)" if event.seconds >= 1 else ""
            c.print(f"[dim]{self._stamp()}[/] {vm} is [green]running[/] at "
                    f"[bold]{_escape(event.address)}[/]{took}")
            return
        if event.step == "starting":
            text = f"starting {vm} (it was {event.state})"
        elif event.step == "stopping":
            text = f"stopping {vm}"
        elif event.step == "ssh":
            text = f"{vm} is running; waiting for ssh on {_escape(event.address)}"
        else:
            text = f"{vm} is {event.state}"
        if c.is_terminal:
            if event.step in ("starting", "stopping") and text != self._vm_seen:
                c.print(f"[dim]{self._stamp()}[/] {text}…")  # stays when the spinner goes
            if self._spinner is None:
                self._spinner = c.status(text)
                self._spinner.start()
            else:
                self._spinner.update(f"{text} ({event.seconds:.0f} s)")
        elif text != self._vm_seen:
            c.print(f"[dim]{self._stamp()}[/] {text}…")
        self._vm_seen = text


    def _provision_step(self, event: ProvisionStep) -> None:
        c = self.console
        name, detail = _escape(event.name), _escape(event.detail)
        match event.status:
            case "running":
                c.print(f"[dim]{self._stamp()}[/] [magenta]▶[/] {name}: {detail}")
            case "ok":
                c.print(f"[dim]{self._stamp()}[/] [green]✓[/] {name} ({event.ms / 1000:.1f} s)")
            case "failed":
                c.print(f"[dim]{self._stamp()}[/] [red]✗[/] {name} failed ({detail})")
            case _:
                c.print(f"[dim]{self._stamp()}[/] [dim]=[/] {name} {event.status} ({detail})")


def _count(n: int, noun: str) -> str:
    return f"{n:,} {noun}" if n == 1 else f"{n:,} {noun}s"


def _escape(text: str) -> str:
    from rich.markup import escape

    return escape(text.replace("\n", "\\n"))


STATUS_EVERY_S = 0.25


class JsonReporter:
    """One JSON object per line on stdout, for editors and scripts."""

    def __init__(self, stream: TextIO | None = None) -> None:
        self.stream = stream or sys.stdout

    def emit(self, event: Event) -> None:
        data: dict[str, Any] = {"event": event.kind, "ts": round(time.time(), 3), **event.fields()}
        self.stream.write(json.dumps(data, ensure_ascii=False) + "\n")
        self.stream.flush()


@dataclass
class StatusReporter:
    """Keeps ``status.json`` current for `dev-sync status` (and tray tools)."""

    files: SessionFiles
    info: dict[str, Any]
    pending: Any = None  # callable returning the queued change count
    state: str = "starting"
    since: float = field(default_factory=time.time)
    last_push: dict[str, Any] | None = None
    pushes: int = 0
    errors: deque[dict[str, Any]] = field(default_factory=lambda: deque(maxlen=5))
    fast_path: str | None = None
    conflicts: deque[dict[str, Any]] = field(default_factory=lambda: deque(maxlen=20))
    _written: float = field(default=0.0, init=False, repr=False)
    # The pending asyncio.TimerHandle of a deferred write.
    _later: Any = field(default=None, init=False, repr=False)

    def emit(self, event: Event) -> None:
        match event:
            case StateChanged(state=state):
                self.state, self.since = state, time.time()
            case Pushed():
                # A burst through the agent is dozens of pushes a second: the
                # file follows at most every STATUS_EVERY_S, the last one always.
                self.pushes += 1
                self.last_push = {"ts": time.time(), "kind": event.kind, **event.fields()}
                self._write_soon()
                return
            case Reconciled():
                self.pushes += 1
                self.last_push = {"ts": time.time(), "kind": event.kind, **event.fields()}
            case ServiceRestarted(ok=False):
                self.errors.append({"ts": time.time(), "kind": event.kind, "cause":
                                    f"{event.name} is crash-looping: {event.problem}",
                                    "fix": f"dev-sync logs {event.name}"})
            case InstallFinished(ok=False):
                self.errors.append({"ts": time.time(), "kind": event.kind, "cause":
                                    f"{event.label} failed (exit {event.code})",
                                    "fix": event.rerun})
            case Problem() | Offline():
                self.errors.append({"ts": time.time(), "kind": event.kind, **event.fields()})
            case AgentReady():
                self.fast_path = f"agent {event.version} (python {event.python})"
            case ConflictKept():
                self.conflicts.append({"ts": time.time(), **event.fields()})
            case Stopped():
                self.state, self.since = "stopped", time.time()
            case _:
                return
        self.write()

    def _write_soon(self) -> None:
        wait = self._written + STATUS_EVERY_S - time.monotonic()
        if wait <= 0:
            self.write()
            return
        if self._later is not None:
            return  # already due
        import asyncio

        try:
            self._later = asyncio.get_running_loop().call_later(wait, self.write)
        except RuntimeError:  # no event loop: nothing would run it later
            self.write()

    def write(self) -> None:
        if self._later is not None:
            self._later.cancel()
            self._later = None
        self._written = time.monotonic()
        self.files.write_status(
            {
                **self.info,
                "pid": os.getpid(),
                "state": self.state,
                "since": self.since,
                "pending": self.pending() if callable(self.pending) else 0,
                "pushes": self.pushes,
                "last_push": self.last_push,
                "errors": list(self.errors),
                "fast_path": self.fast_path,
                "conflicts": list(self.conflicts),
                "updated": time.time(),
            }
        )


class Fanout:
    def __init__(self, reporters: Sequence[Reporter]) -> None:
        self.reporters = list(reporters)

    def emit(self, event: Event) -> None:
        for r in self.reporters:
            r.emit(event)
