"""The sync session: connect, reconcile, then watch and push until stopped.

A small state machine on asyncio (connecting, reconciling, watching,
offline). The watcher feeds the batcher; the main loop takes batches and
hands them to the pusher. A lost connection never loses a change: the
session goes offline, keeps collecting changes, reconnects with backoff and
reconciles the whole tree once, which also covers everything queued.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import random
import signal
import stat
import time
from collections import deque
from collections.abc import Awaitable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, TypeVar

from dev_sync import prestart, remote
from dev_sync.actions import Actions
from dev_sync.batcher import Batch, Batcher
from dev_sync.config import Config
from dev_sync.errors import (
    AgentLost,
    AgentUnavailable,
    ConnectionFailed,
    DevSyncError,
    SafetyStop,
)
from dev_sync.events import (
    AgentReady,
    ConflictKept,
    Connected,
    Offline,
    Problem,
    Pushed,
    Reconciled,
    ReconcileProgress,
    Reporter,
    StateChanged,
    Stopped,
    Watching,
)
from dev_sync.forwards import Forward, add_forwards, restore_stale
from dev_sync.idle import Heartbeat
from dev_sync.ignore import RuleSet, walk_dirs
from dev_sync.pusher import (
    ConnectionLost,
    DeleteGuard,
    Progress,
    RsyncPusher,
    Stats,
    local_rsync_version,
)
from dev_sync.ssh import SshMaster, Target
from dev_sync.watcher import Watcher, make_watcher

if TYPE_CHECKING:
    from dev_sync.agent import Agent, Channel
    from dev_sync.fastpath import FastPusher, Sent

T = TypeVar("T")

BACKOFF = (0.2, 0.5, 1.0, 2.0, 3.0, 5.0)
HEARTBEAT_S = 30.0
AGENT_MAX_DELAY_MS = 20
AGENT_FOLLOW_DELAY_MS = 10  # the cap once a burst is streaming: see follow_cap
RSYNC_MAX_DELAY_MS = 150
# Batches sent to the agent whose answers are not collected yet. A burst streams
# a batch every 10 ms or so, and a batch is answered one round trip later: on a
# slow link that is a dozen in flight. They hold no file contents (see send).
MAX_INFLIGHT = 32


class Engine:
    """One session between a local tree and its remote twin."""

    def __init__(
        self,
        config: Config,
        reporter: Reporter,
        *,
        once: bool = False,
        adopt: bool = False,
        allow_delete: bool = False,
        progress: bool = True,
        state_dir: Path | None = None,
        forwards: Sequence[Forward] = (),
    ) -> None:
        self.config = config
        self.root = config.local_root
        self.reporter = reporter
        self.once = once
        self.adopt = adopt
        sync = config.sync
        self.rules = RuleSet(self.root, sync.exclude, sync.gitignore)
        self.batcher = Batcher(sync.debounce_ms / 1000, batch_cap(sync.max_delay_ms, agent=False))
        self.master = SshMaster(Target.from_config(config))
        self.pusher = RsyncPusher(
            self.root,
            config.remote.path,
            self.master,
            config.remote.rsync_path,
            lambda: self.rules.rsync_filter_rules(),
            DeleteGuard(sync.delete_guard, sync.delete_guard_min, allow_delete),
        )
        # The fast path (and its modules) only when it is used: see _connect.
        self.fast: FastPusher | None = None
        self.channel: Channel | None = None
        self.idle_heartbeat: Heartbeat | None = None
        self._inflight: deque[tuple[Batch, list[tuple[str, bool]], Sent]] = deque()
        self._agent_task: asyncio.Task[None] | None = None
        self._heartbeat_task: asyncio.Task[None] | None = None
        self._agent_off = False
        self._agent_off_said = False
        self._agent_restarts: list[float] = []
        self.state_dir = state_dir
        self.forwards = list(forwards)
        self.actions = Actions(
            config, self.master, lambda: self.rules, reporter,
            state_dir / "actions.log" if state_dir else None, state_dir, self.channel,
        )
        self.watcher: Watcher | None = None
        self._stop = asyncio.Event()
        self._lost = asyncio.Event()
        self._rules_dirty = False
        self._degraded = False
        self._tasks: list[asyncio.Task[None]] = []
        self._last_progress = 0.0
        self._progress = progress
        self._fresh_remote = False

    # -- watcher sink ----------------------------------------------------------

    def changed(self, rel: str, recursive: bool) -> None:
        self.batcher.add(rel, recursive)

    def rescan(self, reason: str) -> None:
        self.batcher.request_full(reason)

    def degraded(self, cause: str, fix: str) -> None:
        self.reporter.emit(Problem(cause + "; falling back to a full reconcile every "
                                   f"{self.config.sync.poll_interval:g}s", fix))
        if not self._degraded:
            self._degraded = True
            self._tasks.append(asyncio.create_task(self._poll()))
        self.batcher.request_full("watcher degraded")

    def rules_changed(self, rel: str) -> None:
        self._rules_dirty = True
        self.batcher.request_full(f"{rel} changed")

    # -- lifecycle -------------------------------------------------------------

    def stop(self) -> None:
        self._stop.set()

    async def run(self) -> None:
        """Run until done (``once``) or stopped; errors propagate as DevSyncError."""
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGINT, signal.SIGTERM):
            with contextlib.suppress(NotImplementedError, RuntimeError):
                loop.add_signal_handler(sig, self.stop)
        main = asyncio.create_task(self._main())
        stopper = asyncio.create_task(self._stop.wait())
        try:
            done, _ = await asyncio.wait({main, stopper}, return_when=asyncio.FIRST_COMPLETED)
            if main in done:
                main.result()
            else:
                main.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await main
                self.reporter.emit(Stopped("signal"))
        finally:
            stopper.cancel()
            for sig in (signal.SIGINT, signal.SIGTERM):
                with contextlib.suppress(NotImplementedError, RuntimeError):
                    loop.remove_signal_handler(sig)
            await self._cleanup()

    async def _cleanup(self) -> None:
        for task in self._tasks:
            task.cancel()
        for task in self._tasks:
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await task
        self._tasks.clear()
        if self.watcher is not None:
            self.watcher.close()
        await self._drop_agent()
        await self.actions.close()
        await self.master.close()

    def _state(self, state: str, detail: str = "") -> None:
        self.reporter.emit(StateChanged(state, detail))

    def _check_local(self) -> None:
        version = local_rsync_version()
        if version is None:
            raise DevSyncError(
                "rsync is not installed on this machine",
                "install it: `sudo apt-get install rsync` (Debian/Ubuntu) or `brew install rsync`",
            )
        if version < remote.MIN_RSYNC:
            have = ".".join(map(str, version))
            raise DevSyncError(
                f"the local rsync is {have}; dev-sync needs 3.2.3 or newer",
                "upgrade rsync (on macOS the built-in openrsync is too old: `brew install rsync`)",
            )
        if not self.root.is_dir():
            raise SafetyStop(f"the local root {self.root} is missing", "restore it or fix --config")

    async def _connect(self, *, spawned: bool = False) -> None:
        if not spawned:
            self._state("connecting", self.master.target.label)
            await self.master.spawn()
        await self.master.wait_ready()
        info = await remote.prepare(
            self.master, self.config.remote.path, adopt=self.adopt,
            rsync=self.config.remote.rsync_path,
        )
        self._fresh_remote = info.created and info.state in ("missing", "empty")
        # A watching session uses the agent for pushes; any session uses it to
        # keep VM edits aside before a reconcile, unless the folder is brand new.
        use_agent = not self.once or not self._fresh_remote
        if self.config.sync.agent and use_agent and not self._agent_off:
            self._setup_fast()
        if self.config.services and self.state_dir is not None:
            for name in await restore_stale(self.master, self.actions.managers(), self.state_dir):
                self.reporter.emit(Problem(f"restored {name} on the remote: an intercept "
                                           "was left behind by a stopped dev-sync"))
        if self.forwards:
            # Forwards live in the master: every new connection needs them again.
            await add_forwards(self.master, self.forwards)
        self._lost.clear()
        self._tasks = [t for t in self._tasks if not t.done()]
        self._tasks.append(asyncio.create_task(self._monitor_master()))
        if self.fast is not None and not self._agent_off:
            # Starts while the rest of the session gets ready.
            self._agent_task = asyncio.create_task(self._start_agent())
        self.reporter.emit(
            Connected(
                self.master.target.label,
                self.config.remote.path,
                ".".join(map(str, info.rsync_version or ())),
                adopted=self.adopt and info.state == "nonempty",
                created=info.created,
            )
        )

    async def _main(self) -> None:
        self._check_local()
        # The ssh handshake runs in its own process while the tree is walked
        # (every .gitignore read, every folder watched): neither waits for the other.
        self._state("connecting", self.master.target.label)
        await self.master.spawn()
        if self.once:
            walking = asyncio.create_task(asyncio.to_thread(_read_rules, self.rules))
            try:
                await self._connect(spawned=True)
            finally:
                self.rules = await walking
        else:
            self.watcher = make_watcher(self.root, self.rules, self, self.config.sync.watcher)
            await self.watcher.start()
            await self._connect(spawned=True)
        try:
            await self._reconcile(("start",))
        except ConnectionLost as exc:
            if self.once or self.watcher is None:
                raise DevSyncError(
                    f"the connection to {self.master.target.label} was lost during the sync "
                    f"({exc})",
                    "run the command again once the machine is reachable",
                ) from None
            await self._recover(str(exc))
        if self.once or self.watcher is None:
            await self.actions.idle()
            if self.actions.failed:
                raise DevSyncError(
                    f"the tree is in sync, but {len(self.actions.failed)} dependency "
                    "install(s) failed on the remote",
                    "see the output above: fix the cause and run `dev-sync up` again",
                )
            return
        self._tasks.append(asyncio.create_task(self._watch()))
        # Keeps the VM's idle auto-stop away while this session runs (and after
        # each push); through the agent when there is one.
        self.idle_heartbeat = Heartbeat(self.channel or self.master)
        self._tasks.append(asyncio.create_task(self.idle_heartbeat.run()))
        self.reporter.emit(Watching(type(self.watcher).__name__.removesuffix("Watcher").lower(),
                                    self.watcher.watched_dirs))
        await self._loop()

    async def _watch(self) -> None:
        assert self.watcher is not None
        await self.watcher.run()

    async def _monitor_master(self) -> None:
        await self.master.wait_closed()
        self._lost.set()

    async def _poll(self) -> None:
        while True:
            await asyncio.sleep(self.config.sync.poll_interval)
            self.batcher.request_full("periodic reconcile")

    # -- work ------------------------------------------------------------------

    def _on_progress(self, p: Progress) -> None:
        now = time.monotonic()
        if now - self._last_progress >= 0.1 or p.percent == 100:
            self._last_progress = now
            self.reporter.emit(ReconcileProgress(p.bytes, p.percent, p.rate, p.files, p.total))

    async def _reconcile(self, reasons: tuple[str, ...]) -> None:
        if not self.root.is_dir():
            raise SafetyStop(
                f"the local root {self.root} was removed or moved; nothing was deleted remotely",
                "restore the folder and start dev-sync again",
            )
        if self._rules_dirty:
            self._rules_dirty = False
            self.rules = self.rules.reload()
            if self.watcher is not None:
                self.watcher.set_rules(self.rules)
        self._state("reconciling", ", ".join(r for r in reasons if r != "start"))
        if not self._fresh_remote:
            await self._keep_remote_edits()
        stats = await self.pusher.reconcile(
            self._on_progress if self._progress else None, fresh=self._fresh_remote
        )
        self._fresh_remote = False
        await self._ensure_agent()
        try:
            if self.fast is not None:
                await self.fast.snapshot()
        except AgentLost:
            self.batcher.request_full("the remote agent stopped")
        self.reporter.emit(
            Reconciled(stats.files, stats.size, stats.deleted, stats.total,
                       round(stats.seconds * 1000), reasons, stats.head_start)
        )
        if self.watcher is not None and not self.once:
            self._state("watching")
            give_back_memory()
        await self.actions.refresh()

    def _included(self, rel: str) -> bool:
        """rsync does not apply rules to the parents of listed names: filter here too."""
        as_file = self.rules.is_excluded(rel, False)
        if as_file == self.rules.is_excluded(rel, True):
            return not as_file  # the usual case: no rule depends on the type here
        try:
            is_dir: bool | None = stat.S_ISDIR(os.lstat(f"{self.root}/{rel}").st_mode)
        except OSError:
            is_dir = None
        return not self.rules.is_excluded(rel, is_dir)

    def _setup_fast(self) -> None:
        if self.fast is not None:
            return
        from dev_sync.agent import Channel
        from dev_sync.fastpath import FastPusher

        self.fast = FastPusher(self.pusher, lambda: self.rules,
                               max_bytes=self.config.sync.agent_max_bytes)
        self.channel = Channel(self.master)
        self.actions.use_remote(self.channel, self.channel)

    async def _keep_remote_edits(self) -> None:
        """rsync would overwrite files edited on the VM since the agent last saw them:
        have the agent move those aside first."""
        await self._ensure_agent()
        if self.fast is None or self.fast.agent is None:
            return
        try:
            kept = await self.fast.protect()
        except AgentLost:
            return  # the reconcile restarts it; this round goes unguarded
        for path, aside in kept:
            self.reporter.emit(ConflictKept(path, aside))

    async def _start_agent(self) -> None:
        from dev_sync.agent import VERSION, Agent

        assert self.fast is not None and self.channel is not None
        started = time.monotonic()
        try:
            agent = await Agent.start(self.master, self.config.remote.path,
                                      self.config.remote.python)
        except AgentUnavailable as exc:
            self._agent_off = True
            if not self._agent_off_said:
                self._agent_off_said = True
                self.reporter.emit(Problem(
                    f"fast path off, every change goes through rsync: {exc}",
                    "install python3 (3.8 or newer) on the remote or set [remote] python; "
                    "or set [sync] agent = false",
                ))
            return
        except (AgentLost, OSError, DevSyncError):
            return  # the connection is going: the master monitor takes over
        await self.fast.attach(agent)
        self.channel.agent = agent
        self._set_caps(agent=True)
        self._heartbeat_task = asyncio.create_task(self._heartbeat(agent))
        self.reporter.emit(AgentReady(VERSION, str(agent.hello.get("python", "")),
                                      round((time.monotonic() - started) * 1000)))

    async def _drop_agent(self) -> None:
        self._forget_inflight()
        for task in (self._agent_task, self._heartbeat_task):
            if task is not None:
                task.cancel()
                with contextlib.suppress(asyncio.CancelledError, Exception):
                    await task
        self._agent_task = self._heartbeat_task = None
        if self.channel is not None:
            self.channel.agent = None
        if self.fast is not None:
            await self.fast.attach(None)
        self._set_caps(agent=False)

    def _set_caps(self, *, agent: bool) -> None:
        """The batcher's caps for the way batches now go: the agent or rsync alone."""
        self.batcher.max_delay = batch_cap(self.config.sync.max_delay_ms, agent=agent)
        self.batcher.follow_delay = follow_cap(self.config.sync.max_delay_ms, agent=agent)

    async def _ensure_agent(self) -> None:
        """After a reconcile: the agent is up, or restarted if it died (within reason)."""
        if self.fast is None or self._agent_off:
            return
        if self._agent_task is not None:
            await self._agent_task
            self._agent_task = None
        agent = self.fast.agent
        if agent is not None and not agent.closed.is_set():
            return
        if agent is not None:
            why = agent.why() or "no reason given"
            await self._drop_agent()
            if not self.master.alive:
                raise ConnectionLost(why)
            now = time.monotonic()
            self._agent_restarts = [t for t in self._agent_restarts if now - t < 300]
            self._agent_restarts.append(now)
            if len(self._agent_restarts) > 3:
                self._agent_off = True
                self.reporter.emit(Problem(
                    f"fast path off: the remote agent keeps stopping ({why}); "
                    "every change goes through rsync",
                    "see the remote's logs (out of memory?), or set [sync] agent = false",
                ))
                return
            self.reporter.emit(Problem(f"the remote agent stopped ({why}); restarted it "
                                       "and reconciled"))
        await self._start_agent()

    async def _heartbeat(self, agent: Agent) -> None:
        """A sign of life both ways: the agent notices we are here, we notice if it is gone."""
        try:
            while True:
                await asyncio.sleep(HEARTBEAT_S)
                await asyncio.wait_for(agent.call({"op": "ping"}), HEARTBEAT_S)
        except (AgentLost, TimeoutError):
            self.batcher.request_full("the remote agent stopped")

    async def _push(self, batch: Batch) -> None:
        changes = [(rel, rec) for rel, rec in batch.changes if self._included(rel)]
        if not changes:
            return
        sent = await self.fast.send(changes) if self.fast is not None else None
        if sent is None:
            await self._settle()
            stats = await (self.fast or self.pusher).push(changes)
            self._pushed(batch, changes, stats)
            return
        if sent.by_rsync or not sent.futures:
            # rsync has work in it: nothing may overtake that.
            await self._settle()
            await self._finish((batch, changes, sent))
            return
        # Pipelined: this batch is on its way before the earlier ones' answers
        # are collected, so a burst costs about one round trip, not one per batch.
        self._inflight.append((batch, changes, sent))
        while len(self._inflight) > MAX_INFLIGHT:
            await self._finish(self._inflight.popleft())

    async def _finish(self, inflight: tuple[Batch, list[tuple[str, bool]], Sent]) -> None:
        batch, changes, sent = inflight
        assert self.fast is not None
        self._pushed(batch, changes, await self.fast.finish(sent))

    async def _settle(self, *, landed_only: bool = False) -> None:
        """Collect the batches in flight, in order (all, or those whose answers are in)."""
        while self._inflight:
            if landed_only and not all(f.done() for f in self._inflight[0][2].futures):
                return
            await self._finish(self._inflight.popleft())

    def _pushed(self, batch: Batch, changes: list[tuple[str, bool]], stats: Stats) -> None:
        if self.idle_heartbeat is not None:
            self.idle_heartbeat.pushed()
        self.reporter.emit(
            Pushed(len(batch), stats.files, stats.size, stats.deleted,
                   round(stats.seconds * 1000), tuple(rel for rel, _ in batch.changes[:5]),
                   stats.via)
        )
        for line in stats.warnings[:5]:
            self.reporter.emit(Problem(line))
        for path, kept in stats.conflicts:
            self.reporter.emit(ConflictKept(path, kept))
        self.actions.after_push(changes)

    async def _next(self) -> Batch | None:
        """The next batch; ``_LANDED`` when the batch in flight has its answers; None
        when the connection dropped first."""
        if self._lost.is_set():
            return None
        if not self._inflight:
            return await _first(self.batcher.next_batch(), self._lost.wait())
        futures = self._inflight[0][2].futures
        batch = await _first(self.batcher.next_batch(),
                             _either(asyncio.wait(futures), self._lost.wait()))
        if batch is None and not self._lost.is_set():
            return _LANDED
        return batch

    async def _loop(self) -> None:
        retry_full = False
        while True:
            batch = await self._next()
            if batch is None:
                await self._recover(self.master.last_error() or "connection closed")
                continue
            if retry_full and not batch.full and batch is not _LANDED:
                # The reconcile covers this batch's changes too. Requeueing
                # them instead would retry at once, in a loop, while the
                # cause (a full disk) lasts: the next change retries.
                batch = Batch((), full=True, reasons=("retry after an error",))
            retry_full = False
            try:
                if batch is _LANDED:
                    await self._settle(landed_only=True)
                elif batch.full:
                    await self._settle()
                    await self._reconcile(batch.reasons)
                else:
                    await self._push(batch)
            except AgentLost:
                # Part of the batch may have landed: a reconcile settles it,
                # and restarts the agent (or finds the connection gone).
                self._forget_inflight()
                if batch is not _LANDED:
                    self.batcher.requeue(batch)
                self.batcher.request_full("the remote agent stopped")
            except ConnectionLost as exc:
                self._forget_inflight()
                if batch is not _LANDED:
                    self.batcher.requeue(batch)
                await self._recover(str(exc))
            except SafetyStop:
                raise
            except DevSyncError as exc:
                # Disk full, permissions...: report, keep watching, and retry
                # everything with a reconcile on the next change.
                self._forget_inflight()
                self.reporter.emit(Problem(exc.cause, exc.fix or "", level="error"))
                retry_full = True

    def _forget_inflight(self) -> None:
        """A reconcile redoes the batches in flight: drop them without waiting."""
        if self._inflight:
            from dev_sync.fastpath import forget

            while self._inflight:
                forget(self._inflight.popleft()[2].futures)

    async def _recover(self, reason: str) -> None:
        """Offline until the remote answers again, then reconcile everything."""
        await self._drop_agent()
        await self.master.close()
        self._state("offline", reason)
        for attempt in range(1_000_000):
            delay = BACKOFF[min(attempt, len(BACKOFF) - 1)] * random.uniform(0.8, 1.2)  # noqa: S311
            self.reporter.emit(Offline(reason, round(delay, 1), self.batcher.pending))
            await asyncio.sleep(delay)
            try:
                await self._connect()
            except ConnectionFailed as exc:
                reason = exc.cause
                continue
            self.batcher.request_full("reconnected")
            return


def _read_rules(rules: RuleSet) -> RuleSet:
    """``rules`` with every .gitignore loaded: those ``dev-sync up``'s early walk
    found if it can vouch for them (a walk of the tree, in a thread, holds the
    interpreter lock while the first rsync pass runs beside it), else walked."""
    early = prestart.walked_rules(rules)
    if early is not None:
        return early
    for _ in walk_dirs(rules):  # loads every .gitignore on the way
        pass
    return rules


_LANDED = Batch((), reasons=("landed",))
"""Not a batch: the batch in flight has all its answers (see Engine._next)."""


def give_back_memory() -> None:
    """Return the memory a reconcile used to the system, before a long idle watch.

    Walking a large tree and listing it for the agent leaves freed memory in
    the C allocator's pools, where it counts as resident for as long as the
    session runs. glibc's ``malloc_trim`` hands it back; elsewhere this does
    nothing.
    """
    import ctypes
    import gc

    gc.collect()
    try:
        ctypes.CDLL(None).malloc_trim(0)
    except (AttributeError, OSError):
        pass


def batch_cap(max_delay_ms: int | None, *, agent: bool) -> float:
    """How long a burst is held before a batch leaves, in seconds.

    Through the agent, batches are pipelined: cutting a burst finely lets the
    remote write while the editor or git still writes here, so little is left
    to send when it stops. Each rsync batch is a run with round trips of its
    own: there, fewer and bigger batches are faster. A configured cap wins.
    """
    if max_delay_ms is None:
        max_delay_ms = AGENT_MAX_DELAY_MS if agent else RSYNC_MAX_DELAY_MS
    return max_delay_ms / 1000


def follow_cap(max_delay_ms: int | None, *, agent: bool) -> float | None:
    """The cap for the batches after a burst's first, while it goes on (None: the same).

    The first cut already tells a burst from a save, so an editor's few events
    are never split by it. After it, the agent's sender takes what has come in
    about as soon as its last batch is out: with the 20 ms cap throughout, it
    idled for half of every batch while the backlog grew, and a 500-file burst
    on two cores left over a hundred files for after the last write. rsync
    batches stay coarse (each is a run with round trips of its own), and a
    configured cap wins.
    """
    if max_delay_ms is not None or not agent:
        return None
    return AGENT_FOLLOW_DELAY_MS / 1000


async def _either(a: Awaitable[object], b: Awaitable[object]) -> None:
    """Return when either is done (cancelling the other)."""
    ta, tb = asyncio.ensure_future(a), asyncio.ensure_future(b)
    try:
        await asyncio.wait({ta, tb}, return_when=asyncio.FIRST_COMPLETED)
    finally:
        for t in (ta, tb):
            if not t.done():
                t.cancel()


async def _first(a: Awaitable[T], b: Awaitable[object]) -> T | None:
    """Await both; return a's result if it finishes first, else None (cancelling a).

    A cancelled ``a`` is waited for: if it finishes with a result all the same
    (a cancellation swallowed on its way), that result is returned, not lost.
    """
    ta = asyncio.ensure_future(a)
    tb = asyncio.ensure_future(b)
    try:
        await asyncio.wait({ta, tb}, return_when=asyncio.FIRST_COMPLETED)
    finally:
        if not tb.done():
            tb.cancel()
        if not ta.done():
            ta.cancel()
            await asyncio.wait({ta})
    if ta.cancelled():
        return None
    return ta.result()


