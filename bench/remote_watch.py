#!/usr/bin/env python3
"""The benchmarks' eye on the remote copy, in a process of its own.

    python bench/remote_watch.py REMOTE_ROOT   (driven by run.RemoteObserver)

Tells when files under a remote root hold expected bytes. It watches the
folders the files land in (or, for folders that do not exist yet, their
nearest existing ancestor, following new folders down). A file counts as
arrived when an event names it (a finished temporary file renamed into
place: MOVED_TO; an in-place write: CLOSE_WRITE) *and* its content reads back
with the expected SHA-256. Each event is time-stamped as this process reads
it, on the system-wide monotonic clock (``time.perf_counter``), which the
benchmark shares.

It runs apart from the benchmark because the benchmark writes a burst's files
in one go, which holds its own event loop: an observer living there read the
remote's events only afterwards, and stamped a backlog of them late (by up to
35 ms for 500 files). Here nothing holds the reader back.

If no event comes for 250 ms while files are pending, all of them are read
(``fallback_hits`` counts the files found that way; their times are good to
250 ms only, and the count should stay at zero).

Protocol: one JSON object per line each way.
  -> {"arm": {rel: sha256hex}}   <- {"armed": true} | {"error": "...", "missing": bool}
  when the last armed file is there:  <- {"done": t, "fallback_hits": n, "overflows": n,
                                          "events": n}
  -> {"status": true}            <- {"pending": n, "sample": rel | null}
"""

from __future__ import annotations

import hashlib
import json
import os
import posixpath
import select
import sys
import time
from pathlib import Path
from typing import Any

from asyncinotify import Inotify, Mask

MASK = Mask.MOVED_TO | Mask.CLOSE_WRITE | Mask.CREATE
FALLBACK_S = 0.25


class Watch:
    def __init__(self, root: Path) -> None:
        self.root = root
        self.ino = Inotify()
        os.set_blocking(self.ino.fd, False)  # drained until EAGAIN after each select
        self.rel_of: dict[int, str] = {}
        self.watched: set[str] = set()
        self.pending: dict[str, str] = {}
        self.arrived: dict[str, float] = {}
        self.armed = False
        self.fallback_hits = 0
        self.overflows = 0
        self.events = 0

    def _watch(self, rel_dir: str) -> bool:
        if rel_dir in self.watched:
            return True
        try:
            w = self.ino.add_watch(self.root / rel_dir if rel_dir else self.root, MASK)
        except (FileNotFoundError, NotADirectoryError):
            return False
        self.rel_of[w.wd] = rel_dir
        self.watched.add(rel_dir)
        return True

    def arm(self, expected: dict[str, str]) -> dict[str, Any]:
        self.pending = dict(expected)
        self.arrived = {}
        self.armed = True
        for rel_dir in {posixpath.dirname(r) for r in expected}:
            cur = rel_dir
            while not self._watch(cur):
                if not cur:
                    return {"error": f"{self.root} is missing", "missing": True}
                cur = posixpath.dirname(cur)
        early = [r for r in self.pending if self._matches(r)]
        if early:
            return {"error": f"{len(early)} files already hold the new content, e.g. {early[0]}",
                    "missing": False}
        return {"armed": True}

    def _matches(self, rel: str) -> bool:
        try:
            with open(self.root / rel, "rb") as fh:
                return hashlib.sha256(fh.read()).hexdigest() == self.pending[rel]
        except OSError:
            return False

    def _check(self, rel: str, t: float) -> None:
        if rel in self.pending and self._matches(rel):
            del self.pending[rel]
            self.arrived[rel] = t

    def _new_dir(self, rel: str, t: float) -> None:
        prefix = rel + "/"
        if not any(p.startswith(prefix) for p in self.pending):
            return
        self._watch(rel)
        # Whatever landed before the watch did produced no event: look.
        for dirpath, dirnames, filenames in os.walk(self.root / rel):
            base = os.path.relpath(dirpath, self.root)
            for d in dirnames:
                self._watch(posixpath.join(base, d))
            for f in filenames:
                self._check(posixpath.join(base, f), t)

    def drain(self) -> None:
        while True:
            try:
                ev = self.ino.sync_get()
            except BlockingIOError:
                return
            if ev is None:
                return
            t = time.perf_counter()
            self.events += 1
            if ev.mask & Mask.Q_OVERFLOW:
                self.overflows += 1
                for rel in list(self.pending):
                    self._check(rel, t)
                continue
            if ev.name is None or ev.watch is None:
                continue
            base = self.rel_of.get(ev.watch.wd)
            if base is None:
                continue
            rel = posixpath.join(base, str(ev.name)) if base else str(ev.name)
            if ev.mask & Mask.ISDIR:
                if ev.mask & (Mask.CREATE | Mask.MOVED_TO):
                    self._new_dir(rel, t)
            elif rel in self.pending:
                self._check(rel, t)

    def fallback(self) -> None:
        # Events that came in since select() looked are not fallback hits, and a
        # file found by looking is stamped when it is found, never earlier.
        self.drain()
        before = len(self.pending)
        for rel in list(self.pending):
            self._check(rel, time.perf_counter())
        self.fallback_hits += before - len(self.pending)

    def done(self) -> dict[str, Any]:
        self.armed = False
        return {"done": max(self.arrived.values()), "fallback_hits": self.fallback_hits,
                "overflows": self.overflows, "events": self.events}


def say(obj: dict[str, Any]) -> None:
    sys.stdout.write(json.dumps(obj) + "\n")
    sys.stdout.flush()


def main(argv: list[str]) -> int:
    w = Watch(Path(argv[0]))
    buf = b""
    while True:
        waiting = w.armed and bool(w.pending)
        ready, _, _ = select.select([w.ino.fd, 0], [], [], FALLBACK_S if waiting else None)
        if w.ino.fd in ready:
            w.drain()
        elif not ready and waiting:
            w.fallback()
        if 0 in ready:
            chunk = os.read(0, 1 << 20)
            if not chunk:
                return 0
            buf += chunk
            while b"\n" in buf:
                line, buf = buf.split(b"\n", 1)
                msg = json.loads(line)
                if "arm" in msg:
                    say(w.arm(msg["arm"]))
                elif "status" in msg:
                    say({"pending": len(w.pending), "sample": next(iter(w.pending), None)})
        if w.armed and not w.pending:
            say(w.done())


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
