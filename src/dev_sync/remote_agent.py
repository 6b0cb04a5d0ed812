# dev-sync agent
"""The remote half of dev-sync's fast path: one standard-library file.

dev-sync starts it over the SSH master (``python3 -c BOOT``, see
:mod:`dev_sync.agent`) and talks to it over stdin/stdout in frames, so a
small change costs one message each way instead of the several round trips
of an rsync run. It must run on any Python 3.8+ a VM may have: no
third-party imports, no syntax newer than 3.8.

Frame: a 13-byte header ``>BIII`` (kind, request id, meta length, data
length), then the meta (JSON) and the data (raw bytes). Paths travel as JSON
strings with undecodable bytes kept as surrogates, so any file name is data.

Requests are handled in order, and each gets one acknowledgement carrying
``ok`` or the error for that path. The agent remembers the signature of every
file dev-sync wrote or saw after a sync (its *record*); a file whose
signature changed since was edited on the VM, and is moved aside to
``.dev-sync/conflicts/<time>/<path>`` before it is overwritten or deleted.
"""

from __future__ import annotations

import errno
import hashlib
import json
import os
import shutil
import stat
import struct
import subprocess
import sys
import threading
import time
from typing import IO, Any, BinaryIO, Dict, Iterable, Iterator, List, Optional, Set, Tuple

HEADER = struct.Struct(">BIII")
HELLO, REQUEST, ACK, OUTPUT = 0, 1, 2, 3
INTERNAL = ".dev-sync"
TMP_PREFIX = ".~dev-sync."
MAX_STAGED = 256  # open files held between a write and its fsync
# Writing the record holds the interpreter for about 10 ms per 5,000 entries:
# it waits until requests pause this long, or at most this long under a
# steady flow, so a burst is not stalled in its middle.
SAVE_QUIET_S = 0.5
SAVE_AT_MOST_S = 10.0

Signature = Tuple[int, int, int]


def encode_meta(meta: Dict[str, Any]) -> bytes:
    return json.dumps(meta, separators=(",", ":")).encode("ascii", "surrogateescape")


def decode_meta(raw: bytes) -> Dict[str, Any]:
    value = json.loads(raw.decode("ascii", "surrogateescape"))
    if not isinstance(value, dict):
        raise ValueError("a frame's meta must be an object")
    return value


def frame(kind: int, ident: int, meta: Dict[str, Any], data: bytes = b"") -> bytes:
    raw = encode_meta(meta)
    return HEADER.pack(kind, ident, len(raw), len(data)) + raw + data


def take_frames(buf: bytearray) -> List[Tuple[int, int, Dict[str, Any], bytes]]:
    """Cut every complete frame off the front of ``buf``; a partial one stays."""
    frames = []
    pos = 0
    while len(buf) - pos >= HEADER.size:
        kind, ident, meta_len, data_len = HEADER.unpack_from(buf, pos)
        start = pos + HEADER.size
        end = start + meta_len + data_len
        if len(buf) < end:
            break
        frames.append((kind, ident, decode_meta(bytes(buf[start:start + meta_len])),
                       bytes(buf[start + meta_len:end])))
        pos = end
    del buf[:pos]
    return frames


class Refused(Exception):
    """The change does not fit the fast path: dev-sync sends it with rsync instead."""


def signature(st: os.stat_result) -> Signature:
    # ctime moves on every write, chmod or rename: any edit on the VM shows.
    return (st.st_size, st.st_mtime_ns, st.st_ctime_ns)


def file_hash(path: str) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 16), b""):
            digest.update(block)
    return digest.hexdigest()


class Agent:
    def __init__(self, root: str, out: BinaryIO) -> None:
        self.root = root.rstrip("/") or "/"
        # What a relative path is appended to after a "/": string joins, since
        # os.path.join was a sixth of the agent's time in a burst of writes.
        self.base = self.root.rstrip("/")
        self.out = out
        self.lock = threading.Lock()
        self.held = bytearray()
        self.record: Dict[str, Signature] = {}
        self.dirs: Set[str] = set()  # synced folders, as of the last snapshot
        self.hashes: Dict[str, str] = {}
        self.known = False  # a snapshot was taken: unknown files are the VM's own
        self.stamp = ""
        self.dirty = False
        self.staged: List[Tuple[Any, str, str, str, int, int, Optional[str]]] = []
        # Requests of several writes (``writes``) still waiting for some of
        # their files: request id -> [answers by file, how many are missing].
        self.groups: Dict[int, List[Any]] = {}
        # Folders found to be real folders (not symlinks) while handling the
        # requests of one read: a burst writes many files into few folders.
        # Forgotten after each read and after anything but a write, so what
        # changes on the remote meanwhile is seen as before.
        self.real_dirs: Set[str] = set()
        self.running: Dict[int, subprocess.Popen[bytes]] = {}
        self.record_path = os.path.join(self.root, INTERNAL, "record.json")
        self.active = 0.0  # time.monotonic() of the last input
        self.saved = time.monotonic()

    # -- plumbing ------------------------------------------------------------

    def send(self, kind: int, ident: int, meta: Dict[str, Any], data: bytes = b"") -> None:
        """Write a frame now (from any thread)."""
        with self.lock:
            self.out.write(bytes(self.held) + frame(kind, ident, meta, data))
            self.held.clear()
            self.out.flush()

    def hold(self, kind: int, ident: int, meta: Dict[str, Any]) -> None:
        """Queue an answer; the loop writes all it holds once the input runs dry, so a
        pipelined batch gets its answers in a few writes instead of one per file."""
        with self.lock:
            self.held += frame(kind, ident, meta)

    def release(self) -> None:
        self.flush_staged()
        self.real_dirs.clear()
        with self.lock:
            if self.held:
                self.out.write(bytes(self.held))
                self.held.clear()
                self.out.flush()

    def path(self, rel: str) -> str:
        """The absolute path for ``rel``, refusing anything that leaves the root."""
        parts = rel.split("/")
        if not rel or rel.startswith("/") or any(p in ("", ".", "..") for p in parts):
            raise Refused("not a plain relative path: %r" % rel)
        if parts[0] in (INTERNAL, ".dev-sync-root"):
            raise Refused("dev-sync's own files are not synced")
        current = self.base
        for part in parts[:-1]:
            current = current + "/" + part
            if current in self.real_dirs:
                continue
            st = _lstat(current)
            if st is None:
                break
            if stat.S_ISLNK(st.st_mode):
                # Following it could reach outside the root: rsync decides instead.
                raise Refused("a parent is a symlink on the remote: %r" % current)
            if stat.S_ISDIR(st.st_mode):
                self.real_dirs.add(current)
        return self.base + "/" + rel

    def lookup(
        self, rels: Iterable[str]
    ) -> Iterator[Tuple[str, str, Optional[os.stat_result]]]:
        """Each of ``rels`` that stays inside the root, with its full path and lstat
        (None if it is not there); the others are skipped."""
        for rel in rels:
            try:
                full = self.path(rel)
            except Refused:
                continue
            yield rel, full, _lstat(full)

    def parents(self, rel: str) -> None:
        """Make the parent folders exist, never through a symlink (that could lead out)."""
        current = self.base
        for part in rel.split("/")[:-1]:
            current = current + "/" + part
            if current in self.real_dirs:
                continue
            try:
                st = os.lstat(current)
            except FileNotFoundError:
                os.mkdir(current)
                self.real_dirs.add(current)
                continue
            if not stat.S_ISDIR(st.st_mode):
                raise Refused("a parent is not a folder on the remote: %r" % current)
            self.real_dirs.add(current)

    def keep_aside(self, rel: str, full: str, st: Optional[os.stat_result]) -> Optional[str]:
        """Move a file edited on the VM out of the way; return where it went."""
        if st is None or stat.S_ISDIR(st.st_mode):
            return None
        seen = self.record.get(rel)
        if seen == signature(st) or (seen is None and not self.known):
            return None
        if not self.stamp:
            self.stamp = time.strftime("%Y%m%dT%H%M%SZ", time.gmtime())
        aside = "/".join((INTERNAL, "conflicts", self.stamp, rel))
        target = os.path.join(self.root, *aside.split("/"))
        os.makedirs(os.path.dirname(target), exist_ok=True)
        while os.path.lexists(target):
            target += "~"
            aside += "~"
        os.rename(full, target)
        self.record.pop(rel, None)
        self.dirty = True
        return aside

    def remember(self, rel: str, full: str, digest: Optional[str] = None) -> None:
        st = os.lstat(full)
        self.dirty = True
        self.record[rel] = signature(st)
        if digest:
            self.hashes[rel] = digest
        else:
            self.hashes.pop(rel, None)

    # -- operations ----------------------------------------------------------

    # Writes are done in two steps. ``stage`` writes the data to a temporary
    # file next to its target; ``commit`` fsyncs all staged files, then renames
    # each into place. Between a burst's writes and their fsyncs the disk
    # commits its journal once, where one fsync per file would commit it once
    # per file (milliseconds each on a cloud disk). Any other request commits
    # first, so requests still take effect in the order they came.

    def stage(self, ident: Any, meta: Dict[str, Any], data: Any) -> None:
        if len(self.staged) >= MAX_STAGED:
            self.flush_staged()
        rel = meta["path"]
        full = self.path(rel)
        self.parents(rel)
        mode, mtime = meta["mode"] & 0o7777, meta["mtime_ns"]
        tmp = _temp_beside(full)
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        try:
            view = memoryview(data)
            while view:
                view = view[os.write(fd, view):]
            os.fchmod(fd, mode)
        except BaseException:
            os.close(fd)
            _unlink(tmp)
            raise
        self.staged.append((ident, rel, full, tmp, fd, mtime, meta.get("hash")))

    def commit(self) -> List[Tuple[Any, Dict[str, Any]]]:
        """Finish the staged writes: (request id, answer) for each, in order."""
        staged, self.staged = self.staged, []
        done: List[Tuple[Any, Dict[str, Any]]] = []
        for ident, rel, full, tmp, fd, mtime, digest in staged:
            try:
                try:
                    os.fsync(fd)
                    os.utime(fd, ns=(mtime, mtime))
                finally:
                    os.close(fd)
                st = _lstat(full)
                if st is not None and stat.S_ISDIR(st.st_mode):
                    raise Refused("a folder on the remote")
                conflict = self.keep_aside(rel, full, st)
                os.rename(tmp, full)
                self.remember(rel, full, digest)
                reply: Dict[str, Any] = {"ok": True}
                if conflict:
                    reply["conflict"] = conflict
            except Refused as exc:
                _unlink(tmp)
                reply = _refused(exc)
            except OSError as exc:
                _unlink(tmp)
                reply = _os_error(exc)
            done.append((ident, reply))
        return done

    def flush_staged(self) -> None:
        for ident, reply in self.commit():
            self.answer(ident, reply)

    def answer(self, ident: Any, reply: Dict[str, Any]) -> None:
        """Acknowledge a request, or one file of a ``writes`` request (``(id, slot)``):
        that one is acknowledged once, with every file's answer, when the last is known."""
        if not isinstance(ident, tuple):
            self.hold(ACK, ident, reply)
            return
        request, slot = ident
        group = self.groups[request]
        group[0][slot] = reply
        group[1] -= 1
        if group[1] == 0:
            del self.groups[request]
            self.hold(ACK, request, {"ok": True, "results": group[0]})

    def stage_many(self, ident: int, meta: Dict[str, Any], data: bytes) -> None:
        """Several small files in one request: ``files`` lists [path, mode, mtime_ns,
        size, hash or null] and the data is their contents one after the other. Saves
        a request and an answer per file in a burst; each file still gets its own
        answer (in the one acknowledgement), so one refused path fails alone."""
        files = [(str(rel), int(mode), int(mtime), int(size), digest)
                 for rel, mode, mtime, size, digest in meta["files"]]
        if sum(f[3] for f in files) != len(data) or any(f[3] < 0 for f in files):
            raise ValueError("the sizes do not add up to the data")
        if not files:
            self.hold(ACK, ident, {"ok": True, "results": []})
            return
        self.groups[ident] = [[None] * len(files), len(files)]
        view = memoryview(data)
        pos = 0
        for slot, (rel, mode, mtime, size, digest) in enumerate(files):
            chunk = view[pos:pos + size]
            pos += size
            try:
                self.stage((ident, slot), {"path": rel, "mode": mode, "mtime_ns": mtime,
                                           "hash": digest}, chunk)
            except Refused as exc:
                self.answer((ident, slot), _refused(exc))
            except OSError as exc:
                self.answer((ident, slot), _os_error(exc))

    def op_place(self, meta: Dict[str, Any], data: bytes) -> Dict[str, Any]:
        """Make ``path`` from content the remote has: a rename (``move``) or a copy."""
        rel = meta["path"]
        full = self.path(rel)
        want = meta["hash"]
        source = None
        for candidate, src, st in self.lookup(meta["from"]):
            if st is None or not stat.S_ISREG(st.st_mode) or st.st_size != meta["size"]:
                continue
            known = self.hashes.get(candidate)
            if self.record.get(candidate) == signature(st) and known == want:
                source = (candidate, src)
                break
            if file_hash(src) == want:
                source = (candidate, src)
                break
        if source is None:
            raise Refused("no remote file has that content")
        self.parents(rel)
        st = _lstat(full)
        if st is not None and stat.S_ISDIR(st.st_mode):
            raise Refused("a folder on the remote")
        conflict = self.keep_aside(rel, full, st)
        if meta.get("move"):
            os.rename(source[1], full)
            self.record.pop(source[0], None)
            self.hashes.pop(source[0], None)
        else:
            tmp = _temp_beside(full)
            try:
                shutil.copyfile(source[1], tmp)
                os.rename(tmp, full)
            except BaseException:
                _unlink(tmp)
                raise
        os.chmod(full, meta["mode"] & 0o7777)
        os.utime(full, ns=(meta["mtime_ns"], meta["mtime_ns"]))
        self.remember(rel, full, want)
        reply: Dict[str, Any] = {"from": source[0]}
        if conflict:
            reply["conflict"] = conflict
        return reply

    def op_move_dir(self, meta: Dict[str, Any], data: bytes) -> Dict[str, Any]:
        """A renamed folder: move the remote one; dev-sync then checks it with rsync."""
        src_rel, rel = meta["from"], meta["path"]
        src, full = self.path(src_rel), self.path(rel)
        st = _lstat(src)
        if st is None or not stat.S_ISDIR(st.st_mode) or os.path.lexists(full):
            raise Refused("no folder to move, or the destination exists")
        self.parents(rel)
        os.rename(src, full)
        prefix = src_rel + "/"
        self.dirty = True
        for key in [k for k in self.record if k.startswith(prefix)]:
            self.record[rel + "/" + key[len(prefix):]] = self.record.pop(key)
        for key in [k for k in self.hashes if k.startswith(prefix)]:
            self.hashes[rel + "/" + key[len(prefix):]] = self.hashes.pop(key)
        return {}

    def op_symlink(self, meta: Dict[str, Any], data: bytes) -> Dict[str, Any]:
        rel = meta["path"]
        full = self.path(rel)
        self.parents(rel)
        st = _lstat(full)
        if st is not None and stat.S_ISDIR(st.st_mode):
            raise Refused("a folder on the remote")
        conflict = self.keep_aside(rel, full, st)
        tmp = _temp_beside(full)
        os.symlink(os.fsdecode(data), tmp)
        try:
            os.utime(tmp, ns=(meta["mtime_ns"], meta["mtime_ns"]), follow_symlinks=False)
            os.rename(tmp, full)
        except BaseException:
            _unlink(tmp)
            raise
        self.remember(rel, full)
        return {"conflict": conflict} if conflict else {}

    def op_mkdir(self, meta: Dict[str, Any], data: bytes) -> Dict[str, Any]:
        rel = meta["path"]
        full = self.path(rel)
        self.parents(rel)
        st = _lstat(full)
        conflict = None
        if st is not None and not stat.S_ISDIR(st.st_mode):
            conflict = self.keep_aside(rel, full, st)
            if conflict is None:
                os.unlink(full)
            st = None
        if st is None:
            os.mkdir(full)
        os.chmod(full, meta["mode"] & 0o7777)
        if "mtime_ns" in meta:
            os.utime(full, ns=(meta["mtime_ns"], meta["mtime_ns"]))
        self.remember(rel, full)
        return {"conflict": conflict} if conflict else {}

    def op_delete(self, meta: Dict[str, Any], data: bytes) -> Dict[str, Any]:
        rel = meta["path"]
        full = self.path(rel)
        st = _lstat(full)
        self.hashes.pop(rel, None)
        self.dirty = True
        if st is None:
            self.record.pop(rel, None)
            return {"deleted": 0}
        if stat.S_ISDIR(st.st_mode):
            try:
                os.rmdir(full)
            except OSError as exc:
                if exc.errno in (errno.ENOTEMPTY, errno.EEXIST):
                    raise Refused("a non-empty folder on the remote") from None
                raise
            self.record.pop(rel, None)
            return {"deleted": 1}
        conflict = self.keep_aside(rel, full, st)
        if conflict:
            return {"deleted": 0, "conflict": conflict}
        os.unlink(full)
        self.record.pop(rel, None)
        return {"deleted": 1}

    def op_snapshot(self, meta: Dict[str, Any], data: bytes) -> Dict[str, Any]:
        """Record every synced entry (dev-sync lists them) just after a full sync."""
        record: Dict[str, Signature] = {}
        for rel, _full, st in self.lookup(meta["entries"]):
            if st is not None:
                record[rel] = signature(st)
        self.record = record
        self.dirs = set(meta.get("dirs", ())) | {""}
        self.hashes = {k: v for k, v in self.hashes.items() if k in record}
        self.known = True
        self.dirty = True
        return {"entries": len(record)}

    def op_changed(self, meta: Dict[str, Any], data: bytes) -> Dict[str, Any]:
        """Synced files that changed on the VM since dev-sync last wrote or saw them
        (``paths``), and files made on the VM inside synced folders (``new``).

        Asked before a reconcile, which would overwrite or delete them; dev-sync
        picks the ones its rules sync and has them kept aside (``keep``).
        """
        limit = meta.get("limit", 10000)
        changed = []
        for rel, seen in list(self.record.items()):
            st = _lstat(os.path.join(self.root, *rel.split("/")))
            if st is None or stat.S_ISDIR(st.st_mode) or signature(st) == seen:
                continue
            changed.append(rel)
            if len(changed) >= limit:
                break
        new: List[str] = []
        for folder in sorted(self.dirs):
            base = os.path.join(self.root, *folder.split("/")) if folder else self.root
            try:
                with os.scandir(base) as entries:
                    names = [(e.name, e.is_dir(follow_symlinks=False)) for e in entries]
            except OSError:
                continue
            for name, is_dir in names:
                rel = folder + "/" + name if folder else name
                if rel in self.record or name.startswith(TMP_PREFIX):
                    continue
                if not folder and name in (INTERNAL, ".dev-sync-root"):
                    continue
                if not is_dir:
                    new.append(rel)
                    continue
                for top, _dirs, files in os.walk(os.path.join(base, name)):
                    sub = os.path.relpath(top, self.root).replace(os.sep, "/")
                    new.extend(sub + "/" + f for f in files)
            if len(new) >= limit:
                break
        return {"paths": changed, "new": new[:limit]}

    def op_keep(self, meta: Dict[str, Any], data: bytes) -> Dict[str, Any]:
        """Move the listed files aside (dev-sync chose them from ``changed``)."""
        kept = []
        for rel, full, st in self.lookup(meta["paths"]):
            if st is None or stat.S_ISDIR(st.st_mode):
                continue
            self.record[rel] = (-1, -1, -1)  # differs from anything: keep_aside moves it
            aside = self.keep_aside(rel, full, st)
            if aside:
                kept.append([rel, aside])
        return {"kept": kept}

    def op_restat(self, meta: Dict[str, Any], data: bytes) -> Dict[str, Any]:
        """Take note of what rsync just wrote, so it does not look like a VM edit later."""
        for rel, full, st in self.lookup(meta["paths"]):
            self.hashes.pop(rel, None)
            self.dirty = True
            if st is None:
                self.record.pop(rel, None)
                continue
            self.record[rel] = signature(st)
            if stat.S_ISDIR(st.st_mode) and meta.get("recursive"):
                for top, dirs, files in os.walk(full):
                    for name in dirs + files:
                        path = os.path.join(top, name)
                        sub = os.path.relpath(path, self.root).replace(os.sep, "/")
                        st2 = _lstat(path)
                        if st2 is not None:
                            self.record[sub] = signature(st2)
        return {}

    def op_ping(self, meta: Dict[str, Any], data: bytes) -> Dict[str, Any]:
        touch = meta.get("touch")
        if touch:
            path = os.path.expanduser(touch)
            os.makedirs(os.path.dirname(path), exist_ok=True)
            with open(path, "ab"):
                pass
            os.utime(path)
        return {"time": time.time()}

    def op_exec(self, ident: int, meta: Dict[str, Any], data: bytes) -> None:
        """Run a command; its output streams back while other requests go on."""
        thread = threading.Thread(target=self._exec, args=(ident, meta, data), daemon=True)
        thread.start()

    def _exec(self, ident: int, meta: Dict[str, Any], data: bytes) -> None:
        argv = meta["argv"]
        hold = bool(meta.get("hold"))  # stdin stays open until a cancel, as over ssh
        try:
            proc = subprocess.Popen(
                argv, cwd=meta.get("cwd") or None,
                stdin=subprocess.PIPE if data or hold else subprocess.DEVNULL,
                stdout=subprocess.PIPE,
                stderr=subprocess.STDOUT if meta.get("merge") else subprocess.PIPE,
                env=dict(os.environ, **meta.get("env", {})),
            )
        except OSError as exc:
            # Worded as a shell would, so callers read it the same either way.
            reason = "not found" if exc.errno == errno.ENOENT else exc.strerror
            self.send(OUTPUT, ident, {"stream": "stderr"},
                      ("%s: %s\n" % (argv[0] if argv else "", reason)).encode())
            self.send(ACK, ident, {"ok": True, "code": 127 if exc.errno == errno.ENOENT
                                   else 126})
            return
        if data:
            def feed() -> None:
                assert proc.stdin is not None
                try:
                    proc.stdin.write(data)
                    if not hold:
                        proc.stdin.close()
                    else:
                        proc.stdin.flush()
                except OSError:
                    pass

            threading.Thread(target=feed, daemon=True).start()
        self.running[ident] = proc

        def pump(stream: IO[bytes], name: str) -> None:
            for chunk in iter(lambda: stream.read1(65536), b""):  # type: ignore[attr-defined]
                self.send(OUTPUT, ident, {"stream": name}, chunk)

        assert proc.stdout is not None
        err = None
        if proc.stderr is not None:
            err = threading.Thread(target=pump, args=(proc.stderr, "stderr"), daemon=True)
            err.start()
        pump(proc.stdout, "stdout")
        if err is not None:
            err.join()
        code = proc.wait()
        self.running.pop(ident, None)
        if proc.stdin is not None:
            try:
                proc.stdin.close()
            except OSError:
                pass
        self.send(ACK, ident, {"ok": True, "code": code})

    def op_cancel(self, meta: Dict[str, Any], data: bytes) -> Dict[str, Any]:
        """Stop a running command the way a closed ssh channel would: close its stdin."""
        proc = self.running.get(meta["target"])
        if proc is not None:
            if proc.stdin is not None:
                try:
                    proc.stdin.close()
                except OSError:
                    pass
            else:
                proc.terminate()
        return {"found": proc is not None}

    # -- the record on disk ----------------------------------------------------
    # Kept in the remote root so the next session (after a reconnect, or the
    # next day) can tell what changed on the VM while dev-sync was away.

    def load(self) -> None:
        try:
            with open(self.record_path, "rb") as handle:
                data = json.loads(handle.read().decode("ascii", "surrogateescape"))
            entries = data["entries"]
            self.record = {k: (int(v[0]), int(v[1]), int(v[2])) for k, v in entries.items()}
            self.dirs = {str(d) for d in data.get("dirs", ())}
        except (OSError, ValueError, KeyError, TypeError, IndexError, AttributeError):
            self.record = {}
            self.dirs = set()

    def save(self) -> None:
        if not self.dirty:
            return
        self.dirty = False
        self.saved = time.monotonic()
        entries = dict(self.record.items())  # one C-level copy: safe beside the main thread
        body = encode_meta({"version": 1, "entries": entries, "dirs": sorted(set(self.dirs))})
        tmp = "%s.%d" % (self.record_path, os.getpid())
        try:
            os.makedirs(os.path.dirname(self.record_path), exist_ok=True)
            with open(tmp, "wb") as handle:
                handle.write(body)
            os.replace(tmp, self.record_path)
        except OSError:
            self.dirty = True  # a full disk, say: try again later
            _unlink(tmp)

    def save_due(self, now: float) -> bool:
        return self.dirty and (now - self.active >= SAVE_QUIET_S
                               or now - self.saved >= SAVE_AT_MOST_S)

    def saver(self, stop: threading.Event) -> None:
        while not stop.wait(1.0):
            if self.save_due(time.monotonic()):
                self.save()

    # -- loop ----------------------------------------------------------------

    def handle(self, ident: int, meta: Dict[str, Any], data: bytes) -> None:
        op = meta.get("op")
        if op == "exec":
            self.op_exec(ident, meta, data)
            return
        method = getattr(self, "op_%s" % op, None)
        try:
            if op == "write":
                self.stage(ident, meta, data)
                return
            if op == "writes":
                self.stage_many(ident, meta, data)
                return
            self.flush_staged()
            if method is None:
                raise Refused("unknown operation %r" % op)
            try:
                reply = method(meta, data)
            finally:
                self.real_dirs.clear()  # it may have moved, made or removed folders
            reply["ok"] = True
        except Refused as exc:
            reply = _refused(exc)
        except OSError as exc:
            reply = _os_error(exc)
        except (KeyError, TypeError, ValueError) as exc:
            reply = {"ok": False, "refused": True, "error": "bad request: %s" % exc}
        self.hold(ACK, ident, reply)

    def serve(self, fd: int) -> None:
        # Read from the descriptor itself: the client sends nothing before our
        # hello, so no request can sit in sys.stdin's buffer from the bootstrap.
        buf = bytearray()
        while True:
            for kind, ident, meta, data in take_frames(buf):
                if kind == REQUEST:
                    self.handle(ident, meta, data)
            self.release()
            chunk = os.read(fd, 1 << 20)
            if not chunk:
                return
            self.active = time.monotonic()
            buf += chunk


def _temp_beside(full: str) -> str:
    """A fresh temporary name in the folder of ``full`` (opened with O_EXCL)."""
    return full[:full.rindex("/") + 1] + TMP_PREFIX + os.urandom(6).hex()


def _lstat(path: str) -> Optional[os.stat_result]:
    try:
        return os.lstat(path)
    except FileNotFoundError:
        return None
    except NotADirectoryError:
        return None


def _refused(exc: Refused) -> Dict[str, Any]:
    return {"ok": False, "refused": True, "error": str(exc)}


def _os_error(exc: OSError) -> Dict[str, Any]:
    return {"ok": False, "errno": errno.errorcode.get(exc.errno or 0, "EIO"),
            "error": exc.strerror or str(exc)}


def _unlink(path: str) -> None:
    try:
        os.unlink(path)
    except OSError:
        pass


def main(argv: List[str]) -> int:
    version, root = argv[0], argv[1]
    out = sys.stdout.buffer
    sys.stdout = sys.stderr  # a stray print must never corrupt the frames
    agent = Agent(root, out)
    if not os.path.isdir(root):
        agent.send(HELLO, 0, {"ok": False, "error": "the remote root %s is missing" % root})
        return 1
    agent.load()
    agent.send(HELLO, 0, {"ok": True, "version": version, "pid": os.getpid(),
                          "python": "%d.%d" % sys.version_info[:2],
                          "record": len(agent.record)})
    stop = threading.Event()
    threading.Thread(target=agent.saver, args=(stop,), daemon=True).start()
    try:
        agent.serve(sys.stdin.fileno())
    finally:
        stop.set()
        agent.save()
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
