"""What runs on the remote after a push: dependency installs, then restarts.

The sync loop never waits for an action: a batch lands, its actions are
queued here, and the next batch goes out while ``npm install`` runs. One
worker does installs first (one at a time, folded per folder and burst by
:class:`dev_sync.deps.InstallQueue`), then the restarts that the same
changes asked for, so a service never restarts on half-installed packages.
Which lock files were installed is recorded on the remote, so a restart of
dev-sync or a reconnect installs only what changed meanwhile.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import TextIO

from dev_sync import deps, services
from dev_sync.config import Config
from dev_sync.errors import DevSyncError
from dev_sync.events import (
    InstallFinished,
    InstallLine,
    InstallStarted,
    Problem,
    Reporter,
    ServiceRestarted,
    ServiceRestarting,
)
from dev_sync.forwards import active_intercepts
from dev_sync.ignore import RuleSet
from dev_sync.runner import CommandError
from dev_sync.ssh import SshMaster


class Actions:
    """Installs (and later restarts) triggered by pushed changes."""

    def __init__(
        self,
        config: Config,
        master: SshMaster,
        rules: Callable[[], RuleSet],
        reporter: Reporter,
        log_path: Path | None = None,
        state_dir: Path | None = None,
        remote: services.Remote | None = None,
    ) -> None:
        self.config = config
        self.root = config.local_root
        self.remote_root = config.remote.path
        self.master = master
        # Short commands (records, restarts, status): through the agent when
        # there is one. Installs stream over their own ssh channel.
        self.remote: services.Remote = remote or master
        self.streamer: deps.Streamer | None = None
        self.rules = rules
        self.reporter = reporter
        self.log_path = log_path
        self.state_dir = state_dir
        self._log: TextIO | None = None
        self._record: dict[str, str] | None = None
        self._record_lock = asyncio.Lock()
        self.failed: set[str] = set()
        self.queue = deps.InstallQueue(self._install)
        self._inflight: dict[str, str] = {}
        self._restarts: dict[str, str] = {}
        self._restart_wake = asyncio.Event()
        self._restarter: asyncio.Task[None] | None = None
        self._restarting = 0
        self.settle = 3.0
        self._managers: dict[services.ManagerName, services.ProcessManager] | None = None

    def use_remote(self, remote: services.Remote, streamer: deps.Streamer | None = None) -> None:
        """Send commands through ``remote`` (installs through ``streamer``) from now on."""
        self.remote = remote
        self.streamer = streamer
        self._managers = None

    @property
    def enabled(self) -> bool:
        return self.config.deps.enabled

    # -- triggers --------------------------------------------------------------

    async def refresh(self) -> None:
        """Compare every lock file with the remote record; install where they differ.

        Run after every full reconcile (start, reconnect, overflow): a branch
        switched while dev-sync was off or offline is caught here.
        """
        if not self.enabled:
            return
        found = await asyncio.to_thread(deps.lock_files, self.rules(), self.config.deps)
        try:
            self._record = await deps.read_record(self.remote, self.remote_root)
        except CommandError:
            return  # the connection went: the next reconcile comes back here
        self._submit(found)

    def after_push(self, changes: Sequence[tuple[str, bool]]) -> None:
        """Queue what a pushed batch calls for (its files have landed)."""
        if self.enabled:
            self._submit(deps.changed_lock_files(self.rules(), changes, self.config.deps))
        if self.config.services:
            paths = [f"{rel}/" if recursive else rel for rel, recursive in changes]
            for name, cause in services.services_to_restart(paths, self.config.services).items():
                self._restarts.setdefault(name, cause)
            if self._restarts:
                self._restart_wake.set()
                if self._restarter is None:
                    self._restarter = asyncio.create_task(self._restart_worker())

    def _submit(self, files: list[str]) -> None:
        if not files:
            return
        hashes = deps.local_hashes(self.root, files)
        # What is being installed right now counts as installed: saving the
        # same lock file again during `npm install` needs no second run.
        changed = deps.stale(hashes, {**(self._record or {}), **self._inflight})
        jobs = deps.plan(changed, self.config.deps, root=self.root)
        if jobs:
            self.queue.submit(jobs)

    async def idle(self) -> None:
        await self.queue.idle()
        while self._restarts or self._restarting:
            await asyncio.sleep(0.05)

    def managers(self) -> dict[services.ManagerName, services.ProcessManager]:
        if self._managers is None:
            self._managers = services.managers_for(
                self.remote, self.remote_root, self.root.name, self.config.services
            )
        return self._managers

    async def _restart_worker(self) -> None:
        """Restarts wait for the installs queued before them, then run side by side."""
        while True:
            await self._restart_wake.wait()
            self._restart_wake.clear()
            await self.queue.idle()
            todo, self._restarts = self._restarts, {}
            if not todo:
                continue
            self._restarting = len(todo)
            try:
                await asyncio.gather(*(self._restart(n, c) for n, c in todo.items()))
            finally:
                self._restarting = 0

    async def _restart(self, name: str, cause: str) -> None:
        if self.state_dir is not None and name in active_intercepts(self.state_dir):
            # Its port is forwarded to the laptop: starting it on the remote
            # would only crash-loop on a taken port.
            self.reporter.emit(Problem(f"{name} is intercepted: not restarting it on the remote "
                                       f"({cause} changed)"))
            return
        self.reporter.emit(ServiceRestarting(name, cause))
        started = time.monotonic()
        try:
            manager = self.managers()[self.config.services[name].manager]
            outcome = await services.restart_and_check(manager, name, self.settle)
        except DevSyncError as exc:
            self.reporter.emit(Problem(f"restarting {name}: {exc.cause}", exc.fix or ""))
            return
        ms = round((time.monotonic() - started) * 1000)
        self.reporter.emit(ServiceRestarted(
            name, cause, outcome.ok, ms, outcome.status.state, outcome.status.pid,
            outcome.problem, tuple(outcome.log_tail.splitlines()[-15:]),
        ))

    async def close(self) -> None:
        if self._restarter is not None:
            self._restarter.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._restarter
            self._restarter = None
        await self.queue.close()
        if self._log is not None:
            self._log.close()
            self._log = None

    # -- running -------------------------------------------------------------------

    def _write_log(self, label: str, line: str) -> None:
        if self.log_path is None:
            return
        if self._log is None:
            self.log_path.parent.mkdir(parents=True, exist_ok=True)
            self._log = self.log_path.open("a", encoding="utf-8", errors="replace")
        self._log.write(f"{time.strftime('%H:%M:%S')} [{label}] {line}\n")
        self._log.flush()

    async def _install(self, job: deps.InstallJob) -> bool:
        hashes = deps.local_hashes(self.root, job.files)
        self._inflight.update(hashes)
        try:
            return await self._run_install(job, hashes)
        finally:
            for rel in hashes:
                self._inflight.pop(rel, None)

    async def _run_install(self, job: deps.InstallJob, hashes: dict[str, str]) -> bool:
        self.reporter.emit(InstallStarted(job.label, job.directory, job.command, job.files))
        self._write_log(job.label, f"$ {job.command} {' '.join(job.args)}".rstrip())

        def on_line(line: str) -> None:
            self._write_log(job.label, line)
            self.reporter.emit(InstallLine(job.label, job.directory, line))

        result = await deps.run_install(self.master, self.remote_root, job, on_line,
                                        via=self.streamer)
        if result.returncode == 255 and not self.master.alive:
            # The connection dropped, not the install: the reconcile after the
            # reconnect compares the record again and retries it.
            return False
        if result.ok:
            # Recorded before it is reported: whoever sees "finished" (and stops
            # dev-sync) must not get the same install again at the next start.
            async with self._record_lock:
                record = dict(self._record or {})
                record.update(hashes)
                with contextlib.suppress(CommandError):
                    await deps.write_record(self.remote, self.remote_root, record)
                    self._record = record
        ms = round(result.duration * 1000)
        ssh_args = ["-F", str(self.config.ssh_config_path)] if self.config.ssh_config_path else []
        hint = deps.rerun_hint(job, self.config.remote.host, self.remote_root, ssh_args=ssh_args)
        self.reporter.emit(InstallFinished(
            job.label, job.directory, result.ok, result.returncode, ms,
            () if result.ok else result.tail, "" if result.ok else hint,
        ))
        self._write_log(job.label, f"exit {result.returncode} after {ms} ms")
        if not result.ok:
            self.failed.add(job.key)
            if result.command_not_found:
                self.reporter.emit(Problem(
                    f"{job.label}: command not found on the remote",
                    "tools installed with nvm/asdf/pyenv are often only on PATH in "
                    "interactive shells: set them up in ~/.profile or ~/.bashrc before its "
                    "early return, or use an absolute path in [deps] command",
                ))
            return False
        self.failed.discard(job.key)
        return True
