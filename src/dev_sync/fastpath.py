"""Pushing a batch through the remote agent, with rsync for what does not fit.

An rsync run costs several network round trips before the first byte moves;
the agent needs one message each way, and the messages of a batch are
streamed without waiting for each answer. Small files, symlinks, folders and
file deletions go through the agent; large files, deleted or new folder
trees and anything the agent turns down (a folder where a file should go, a
non-empty folder to delete) go through rsync as before. A file or folder
that reappears under a new name is moved on the remote instead of sent
again, when the remote still has the old one.

Full reconciles stay with rsync. Afterwards the agent records what every
synced file looks like, so it can tell when one was edited on the VM and
keep that version aside before overwriting it.
"""

from __future__ import annotations

import asyncio
import hashlib
import os
import posixpath
import stat
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

from dev_sync.agent import Agent, AgentLost, Reply
from dev_sync.errors import DevSyncError
from dev_sync.ignore import RuleSet, walk_dirs
from dev_sync.pusher import RsyncPusher, Stats

# Below this size a file is just sent: the bytes cost less than a question.
SEND_ANYWAY = 64 * 1024
# Requests read and sent together before the next ones are read (see send).
SEND_SLICE = 8
# A new folder is sent through the agent when it is this small.
SMALL_TREE_ENTRIES = 200
HASH_MEMORY = 50_000


def forget(futures: Sequence[asyncio.Future[Reply]]) -> None:
    """The batch is redone by a reconcile: its answers will never come."""
    for f in futures:
        if not f.done():
            f.cancel()
        elif not f.cancelled():
            f.exception()


@dataclass(frozen=True)
class _Op:
    rel: str
    kind: str           # write | place | symlink | mkdir | delete | move_dir
    size: int = 0


_Planned = tuple[_Op, dict[str, object], bytes]


@dataclass(frozen=True)
class _Later:
    """A file whose contents are read when its part of the batch is sent."""

    rel: str
    gone: list[str]  # the batch's vanished files, complete by then: see _file_op


@dataclass
class Sent:
    """A batch whose agent part is on its way; :meth:`FastPusher.finish` completes it."""

    agent: Agent
    plan: list[_Planned]
    futures: list[asyncio.Future[Reply]]  # one per request (see _requests)
    by_rsync: dict[str, bool]
    started: float
    sequence: int
    shape: list[int]  # per request: 0 for one step of the plan, n for n files in one


def _requests(part: Sequence[_Planned]) -> tuple[list[tuple[dict[str, object], bytes]], list[int]]:
    """The requests for some steps of a plan: runs of file writes go as one ``writes``
    request (one frame and one answer for all of them), anything else as its own."""
    requests: list[tuple[dict[str, object], bytes]] = []
    shape: list[int] = []
    run: list[tuple[dict[str, object], bytes]] = []

    def end_run() -> None:
        if len(run) == 1:
            requests.append(run[0])
            shape.append(0)
        elif run:
            files = [[m["path"], m["mode"], m["mtime_ns"], len(d), m.get("hash")] for m, d in run]
            requests.append(({"op": "writes", "files": files}, b"".join(d for _, d in run)))
            shape.append(len(run))
        run.clear()

    for _op, meta, data in part:
        if meta["op"] == "write":
            run.append((meta, data))
            continue
        end_run()
        requests.append((meta, data))
        shape.append(0)
    end_run()
    return requests, shape


def _per_step(replies: Sequence[Reply], shape: Sequence[int]) -> list[Reply]:
    """One answer per step of the plan, a ``writes`` request's split by file."""
    out: list[Reply] = []
    for reply, n in zip(replies, shape, strict=True):
        results = reply.meta.get("results")
        if not n:
            out.append(reply)
        elif reply.ok and isinstance(results, list) and len(results) == n:
            out += [Reply(bool(r.get("ok")), r) for r in results]
        else:
            out += [reply] * n  # turned down as a whole: every file has that answer
    return out


def _hash(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


class FastPusher:
    """Sends batches through the agent when there is one, else through rsync."""

    def __init__(
        self,
        rsync: RsyncPusher,
        rules: Callable[[], RuleSet],
        *,
        max_bytes: int = 1 << 20,
    ) -> None:
        self.rsync = rsync
        self.rules = rules
        self.max_bytes = max_bytes
        self.agent: Agent | None = None
        self._sends = 0
        # Where the remote holds a given content, as last written by the agent:
        # a copied file is then copied there instead of sent.
        self._where: dict[str, str] = {}

    @property
    def local_root(self) -> Path:
        return self.rsync.local_root

    async def attach(self, agent: Agent | None) -> None:
        if self.agent is not None and self.agent is not agent:
            await self.agent.close()
        self.agent = agent
        self._where.clear()

    async def snapshot(self) -> None:
        """Let the agent record the synced tree as it is right after a reconcile."""
        if self.agent is None:
            return
        entries, dirs = await asyncio.to_thread(synced_entries, self.rules())
        await self.agent.call({"op": "snapshot", "entries": entries, "dirs": dirs})

    async def protect(self) -> list[tuple[str, str]]:
        """Before a reconcile: keep aside the synced files edited on the VM since the
        agent last recorded them (while dev-sync was stopped or offline, say)."""
        if self.agent is None:
            return []
        found = (await self.agent.call({"op": "changed"})).meta
        rules = self.rules()
        # Only what the rules sync: excluded files on the VM are never touched. A
        # file made on the VM that is also here is overwritten, one that is not is
        # deleted by the reconcile: either way its VM version is kept first.
        keep = [p for p in [*found.get("paths", []), *found.get("new", [])]
                if isinstance(p, str) and not rules.is_excluded(p, False)]
        if not keep:
            return []
        reply = await self.agent.call({"op": "keep", "paths": keep})
        return [(str(rel), str(aside)) for rel, aside in reply.meta.get("kept", [])]

    # -- one batch -----------------------------------------------------------

    async def push(self, changes: Sequence[tuple[str, bool]]) -> Stats:
        """Send one batch and wait until all of it has landed."""
        sent = await self.send(changes)
        if sent is None:
            return await self.rsync.push(changes)
        return await self.finish(sent)

    async def send(self, changes: Sequence[tuple[str, bool]]) -> Sent | None:
        """Plan a batch and stream its agent part, without waiting for the answers.

        The engine sends the next batch before it collects this one's answers
        (:meth:`finish`), so a burst is not a round trip per batch. None when
        there is no agent: then rsync does it all.
        """
        agent = self.agent
        if agent is None:
            return None
        started = time.monotonic()
        wanted: dict[str, bool] = {}
        for rel, recursive in changes:
            if rel:
                wanted[rel] = wanted.get(rel, False) or recursive
        by_rsync: dict[str, bool] = {}
        steps = self._plan(wanted, by_rsync)
        deletions = sum(1 for s in steps if isinstance(s, tuple) and s[0].kind == "delete")
        if deletions:
            self.rsync.guard.check(deletions, self.rsync.remote_total)
        self._sends += 1
        sequence = self._sends
        # Files are read and sent a slice at a time, each slice flushed before
        # the next is read: the agent starts writing the first files while the
        # last are still being read here, so a large batch is not read whole,
        # then sent whole, then written whole.
        plan: list[_Planned] = []
        futures: list[asyncio.Future[Reply]] = []
        shape: list[int] = []
        for start in range(0, len(steps), SEND_SLICE):
            part = [self._file_op(s.rel, s.gone) if isinstance(s, _Later) else s
                    for s in steps[start:start + SEND_SLICE]]
            part = [p for p in part if p[0].kind != "skip"]
            # The answers need the steps, not the bytes: a batch in flight
            # holds no file contents once they are handed to the channel.
            plan += [(op, meta, b"") for op, meta, _data in part]
            requests, part_shape = _requests(part)
            futures += agent.send_many(requests)
            shape += part_shape
            await self._flush(agent, futures)
            # A turn for the watcher: the next batch's clock starts when its
            # first change is read, not when this whole batch is out.
            await asyncio.sleep(0)
        return Sent(agent, plan, futures, by_rsync, started, sequence, shape)

    async def finish(self, sent: Sent) -> Stats:
        """Collect a sent batch's answers, then do with rsync what the agent could not."""
        agent, plan = sent.agent, sent.plan
        by_rsync = sent.by_rsync
        stats = Stats(via="agent")
        replies = _per_step(await self._replies(sent.futures), sent.shape)
        failures: list[tuple[str, Reply]] = []
        retry: list[_Planned] = []
        moved_dirs: list[str] = []
        for (op, meta, _data), reply in zip(plan, replies, strict=True):
            if reply.ok:
                self._count(op, meta, reply, stats)
                if op.kind == "move_dir":
                    moved_dirs.append(op.rel)
            elif reply.refused:
                if op.kind == "place":
                    retry.append(self._write_op(op.rel))
                elif op.kind == "move_dir":
                    by_rsync[op.rel] = True
                    by_rsync[str(meta["from"])] = True
                else:
                    # Turned down because of a folder on the remote: rsync
                    # replaces or clears it (keeping what is excluded).
                    by_rsync[op.rel] = True
            else:
                failures.append((op.rel, reply))
        retry = [r for r in retry if r[0].kind != "skip"]
        if retry:
            futures = agent.send_many([(meta, data) for _op, meta, data in retry])
            self._sends += 1
            await self._flush(agent, futures)
            for (op, meta, _data), reply in zip(retry, await self._replies(futures),
                                                strict=True):
                if reply.ok:
                    self._count(op, meta, reply, stats)
                elif reply.refused:
                    by_rsync[op.rel] = True
                else:
                    failures.append((op.rel, reply))
        self.rsync.guard.record(stats.deleted)
        for rel in moved_dirs:
            # The moved folder is checked against the local one: cheap when it matched.
            by_rsync[rel] = True
        if by_rsync:
            if self._sends != sent.sequence:
                # A later batch is on its way to the agent: it lands first, so
                # rsync (which sends the files as they are now) has the last word.
                await self._replies([agent.send({"op": "ping"})], flush=agent)
            more = await self.rsync.push(list(by_rsync.items()))
            stats.files += more.files
            stats.size += more.size
            stats.deleted += more.deleted
            stats.warnings += more.warnings
            stats.via = "agent+rsync" if plan else "rsync"
            for recursive in (False, True):
                paths = [r for r, rec in by_rsync.items() if rec is recursive]
                if paths:
                    await agent.call({"op": "restat", "paths": paths, "recursive": recursive})
        stats.seconds = time.monotonic() - sent.started
        if failures:
            raise _failure(failures, self.rsync.master.target.label, self.rsync.remote_root)
        return stats

    def _count(self, op: _Op, meta: dict[str, object], reply: Reply, stats: Stats) -> None:
        if op.kind in ("write", "place"):
            stats.files += 1
            if op.kind == "write":
                stats.size += op.size
            digest = meta.get("hash")
            if isinstance(digest, str):
                if len(self._where) >= HASH_MEMORY:
                    self._where.clear()
                self._where[digest] = op.rel
        stats.deleted += int(reply.meta.get("deleted", 0))
        conflict = reply.meta.get("conflict")
        if isinstance(conflict, str):
            stats.conflicts.append((op.rel, conflict))

    async def _flush(self, agent: Agent, futures: list[asyncio.Future[Reply]]) -> None:
        try:
            await agent.flush()
        except AgentLost:
            forget(futures)
            raise

    async def _replies(
        self, futures: list[asyncio.Future[Reply]], flush: Agent | None = None
    ) -> list[Reply]:
        if flush is not None:
            await self._flush(flush, futures)
        try:
            return list(await asyncio.gather(*futures))
        except AgentLost:
            forget(futures)
            raise

    # -- planning ------------------------------------------------------------

    def _plan(self, wanted: dict[str, bool], by_rsync: dict[str, bool]) -> list[_Planned | _Later]:
        """The batch's requests in the order they must apply; files still to be read."""
        root = self.local_root
        mkdirs: list[_Planned] = []
        writes: list[_Planned | _Later] = []
        deletes: list[_Planned] = []
        gone_files: list[str] = []
        gone_dirs: list[str] = []
        new_dirs: dict[str, os.stat_result] = {}
        base = f"{root}/"  # joined by hand: this runs per file of a burst
        for rel, recursive in wanted.items():
            try:
                st = os.lstat(base + rel)
            except (FileNotFoundError, NotADirectoryError):
                parent = posixpath.dirname(rel)
                if recursive:
                    gone_dirs.append(rel)
                elif parent and not os.path.lexists(root / parent):
                    by_rsync[rel] = False  # rsync names the topmost vanished folder
                else:
                    gone_files.append(rel)
                continue
            if stat.S_ISDIR(st.st_mode):
                if recursive:
                    new_dirs[rel] = st
                else:
                    mkdirs.append(self._mkdir_op(rel, st))
            elif stat.S_ISLNK(st.st_mode):
                writes.append((_Op(rel, "symlink"),
                               {"op": "symlink", "path": rel, "mtime_ns": st.st_mtime_ns},
                               os.fsencode(os.readlink(root / rel))))
            elif stat.S_ISREG(st.st_mode) and st.st_size <= self.max_bytes:
                writes.append(_Later(rel, gone_files))
            elif stat.S_ISREG(st.st_mode):
                by_rsync[rel] = False
        moves = self._dir_moves(gone_dirs, list(new_dirs))
        for rel, dir_st in new_dirs.items():
            if rel in moves:
                continue
            small = self._small_tree(rel, dir_st)
            if small is None:
                by_rsync[rel] = True
                continue
            for sub, sub_st in small:
                if stat.S_ISDIR(sub_st.st_mode):
                    mkdirs.append(self._mkdir_op(sub, sub_st))
                elif stat.S_ISLNK(sub_st.st_mode):
                    writes.append((_Op(sub, "symlink"),
                                   {"op": "symlink", "path": sub, "mtime_ns": sub_st.st_mtime_ns},
                                   os.fsencode(os.readlink(base + sub))))
                else:
                    writes.append(_Later(sub, gone_files))
        for rel in gone_dirs:
            if rel not in moves.values():
                by_rsync[rel] = True
        for rel in sorted(gone_files, key=lambda r: -r.count("/")):
            deletes.append((_Op(rel, "delete"), {"op": "delete", "path": rel}, b""))
        mkdirs.sort(key=lambda item: item[0].rel.count("/"))
        dir_moves: list[_Planned] = [
            (_Op(new, "move_dir"), {"op": "move_dir", "from": old, "path": new}, b"")
            for new, old in moves.items()
        ]
        # Folder moves first (files may land inside), files before the deletes
        # they may be made from.
        return [*dir_moves, *mkdirs, *writes, *deletes]

    def _mkdir_op(self, rel: str, st: os.stat_result) -> _Planned:
        return (_Op(rel, "mkdir"),
                {"op": "mkdir", "path": rel, "mode": stat.S_IMODE(st.st_mode),
                 "mtime_ns": st.st_mtime_ns}, b"")

    def _write_op(self, rel: str) -> _Planned:
        # Never follow a symlink, never block on a fifo that took the file's place.
        flags = os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC
        try:
            fd = os.open(f"{self.local_root}/{rel}", flags)
        except OSError:
            return (_Op(rel, "skip"), {}, b"")  # gone again: its own event follows
        try:
            st = os.fstat(fd)
            if not stat.S_ISREG(st.st_mode) or st.st_size > self.max_bytes:
                return (_Op(rel, "skip"), {}, b"")
            chunks = []
            left = self.max_bytes + 1
            while left > 0:
                want = min(left, max(st.st_size, 1 << 16))
                chunk = os.read(fd, want)
                chunks.append(chunk)
                left -= len(chunk)
                if len(chunk) < want:
                    break  # a short read of a regular file is its end: no read for b""
            data = b"".join(chunks)
        except OSError:
            return (_Op(rel, "skip"), {}, b"")
        finally:
            os.close(fd)
        if len(data) > self.max_bytes:
            return (_Op(rel, "skip"), {}, b"")  # grew past the limit: the next event sends it
        meta: dict[str, object] = {"op": "write", "path": rel, "mode": stat.S_IMODE(st.st_mode),
                                   "mtime_ns": st.st_mtime_ns}
        if len(data) > SEND_ANYWAY:  # worth finding again on the remote: see _file_op
            meta["hash"] = _hash(data)
        return (_Op(rel, "write", len(data)), meta, data)

    def _file_op(self, rel: str, gone: Sequence[str]) -> _Planned:
        """A write, or for a larger file a move or copy of content the remote holds."""
        op, meta, data = self._write_op(rel)
        if op.kind != "write" or op.size <= SEND_ANYWAY:
            return op, meta, data
        digest = str(meta["hash"])
        base = posixpath.basename(rel)
        # A rename shows as this file appearing and another vanishing in one batch.
        sources = [g for g in gone if posixpath.basename(g) == base]
        sources += [g for g in gone if g not in sources][: 8 - len(sources)]
        move = bool(sources)
        if not move:
            known = self._where.get(digest)
            if known is None or known == rel:
                return op, meta, data
            sources = [known]
        place: dict[str, object] = {
            "op": "place", "path": rel, "from": sources, "hash": digest, "size": op.size,
            "mode": meta["mode"], "mtime_ns": meta["mtime_ns"], "move": move,
        }
        return (_Op(rel, "place", op.size), place, b"")

    def _dir_moves(self, gone: list[str], new: list[str]) -> dict[str, str]:
        """Pair new folders with vanished ones of the same name: {new: old}."""
        pairs: dict[str, str] = {}
        if not gone or not new:
            return pairs
        for rel in new:
            same = [g for g in gone if posixpath.basename(g) == posixpath.basename(rel)
                    and g not in pairs.values()]
            if len(same) == 1:
                pairs[rel] = same[0]
            elif len(gone) == 1 and len(new) == 1:
                pairs[rel] = gone[0]
        return pairs

    def _small_tree(
        self, rel: str, st: os.stat_result
    ) -> list[tuple[str, os.stat_result]] | None:
        """Every synced entry under a new folder (``rel``, whose lstat is ``st``) with
        its lstat, if the whole is small enough to send here."""
        rules = self.rules()
        out: list[tuple[str, os.stat_result]] = [(rel, st)]
        size = 0
        stack = [rel]
        base = f"{self.local_root}/"  # joined by hand: a checkout makes many folders
        try:
            while stack:
                top = stack.pop()
                with os.scandir(base + top) as it:
                    entries = list(it)
                for entry in entries:
                    sub = f"{top}/{entry.name}"
                    is_dir = entry.is_dir(follow_symlinks=False)
                    if rules.is_excluded_child(sub, is_dir):  # its folder is synced
                        continue
                    if is_dir:
                        stack.append(sub)
                    elif not entry.is_file(follow_symlinks=False) and not entry.is_symlink():
                        continue
                    sub_st = entry.stat(follow_symlinks=False)
                    if stat.S_ISREG(sub_st.st_mode):
                        size += sub_st.st_size
                    out.append((sub, sub_st))
                    if len(out) > SMALL_TREE_ENTRIES or size > self.max_bytes:
                        return None
        except OSError:
            return None
        return out


def _failure(failures: list[tuple[str, Reply]], host: str, root: str) -> DevSyncError:
    names = ", ".join(f"{rel} ({reply.error})" for rel, reply in failures[:3])
    more = f" and {len(failures) - 3} more" if len(failures) > 3 else ""
    codes = {reply.meta.get("errno") for _, reply in failures}
    if {"ENOSPC", "EDQUOT"} & codes:
        return DevSyncError(
            f"the remote disk holding {root} is full: could not write {names}{more}",
            f"free space on {host} (see `df -h {root}`), then dev-sync resumes on the next change",
        )
    if {"EACCES", "EPERM", "EROFS"} & codes:
        return DevSyncError(
            f"the remote refused to write {names}{more}",
            f"fix the owner or permissions under {root} on {host}; "
            "dev-sync retries on the next change",
        )
    return DevSyncError(f"the remote could not apply {names}{more}",
                        "dev-sync retries on the next change")



def synced_entries(rules: RuleSet) -> tuple[list[str], list[str]]:
    """Every path the rules sync (folders, files, symlinks), and the folders, root-relative."""
    out: list[str] = []
    dirs: list[str] = []
    root = rules.root
    for folder in walk_dirs(rules):
        dirs.append(folder)
        if folder:
            out.append(folder)
        try:
            with os.scandir(root / folder if folder else root) as it:
                for entry in it:
                    if entry.is_dir(follow_symlinks=False):
                        continue  # walk_dirs yields the synced ones
                    rel = f"{folder}/{entry.name}" if folder else entry.name
                    if not rules.is_excluded_child(rel, False):
                        out.append(rel)
        except OSError:
            continue
    return out, dirs
