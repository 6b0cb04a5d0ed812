"""Grouping watcher events into batches: one transfer per burst, not per file.

A save is a handful of events within a millisecond, a ``git checkout`` is
thousands over a second. The batcher waits for a short quiet period (so one
save leaves at once, as one batch) but never longer than a cap (so a long
burst still flows), and collapses paths covered by a directory that is sent
as a whole anyway. Once a burst has been cut by the cap, the batches that
follow it may have a shorter cap of their own (``follow_delay``): the burst
is known by then, and a sender that can stream it takes what has come in as
soon as it is free, instead of idling while the backlog grows.
"""

from __future__ import annotations

import asyncio
import time
from dataclasses import dataclass


@dataclass(frozen=True)
class Batch:
    """Paths to push (relative, with 'whole subtree' flags), or a full reconcile."""

    changes: tuple[tuple[str, bool], ...]
    full: bool = False
    reasons: tuple[str, ...] = ()

    def __len__(self) -> int:
        return len(self.changes)


def collapse(changes: dict[str, bool]) -> tuple[tuple[str, bool], ...]:
    """Drop paths inside directories that are already sent recursively."""
    out: list[tuple[str, bool]] = []
    cover: str | None = None
    for rel in sorted(changes, key=lambda p: p.split("/")):
        if cover is not None and rel.startswith(cover):
            continue
        recursive = changes[rel]
        out.append((rel, recursive))
        cover = rel + "/" if recursive else None
    return tuple(out)


class Batcher:
    """Collects changed paths and hands them out in debounced batches."""

    def __init__(self, debounce: float, max_delay: float, max_paths: int = 50_000,
                 follow_delay: float | None = None) -> None:
        self.debounce = debounce
        self.max_delay = max_delay
        self.follow_delay = follow_delay
        self.max_paths = max_paths
        self._streaming = False  # the last batch was cut from a burst still going on
        self._changes: dict[str, bool] = {}
        self._full = False
        self._reasons: list[str] = []
        self._first = 0.0
        self._last = 0.0
        self._wake = asyncio.Event()

    @property
    def pending(self) -> int:
        return len(self._changes) + (1 if self._full else 0)

    def _touch(self) -> None:
        now = time.monotonic()
        if not self._changes and not self._full:
            self._first = now
            self._wake.set()  # only the first change wakes next_batch: see there
            if now - self._last >= self.max_delay:
                # Quiet for a whole cap: a new burst, or a lone save. (A shorter
                # pause, a writer that lost its core for a moment, does not end one.)
                self._streaming = False
        self._last = now

    def add(self, rel: str, recursive: bool = False) -> None:
        self._touch()
        self._changes[rel] = self._changes.get(rel, False) or recursive
        if len(self._changes) > self.max_paths:
            self.request_full("too many changes at once")

    def request_full(self, reason: str) -> None:
        """Everything may have changed: the next batch is a full reconcile."""
        self._touch()
        self._full = True
        self._changes.clear()
        if reason not in self._reasons:
            self._reasons.append(reason)

    def requeue(self, batch: Batch) -> None:
        """Put a batch back after a failed push (merging with newer changes)."""
        if batch.full:
            for reason in batch.reasons or ("retry",):
                self.request_full(reason)
            return
        for rel, recursive in batch.changes:
            self.add(rel, recursive)

    def _take(self) -> Batch:
        if self._full:
            batch = Batch((), full=True, reasons=tuple(self._reasons))
        else:
            batch = Batch(collapse(self._changes))
        self._changes = {}
        self._full = False
        self._reasons = []
        self._wake.clear()
        return batch

    async def next_batch(self) -> Batch:
        """Wait for changes, then for the burst to settle (or the cap), and take them.

        Safe to cancel: a cancellation either finds the changes untouched or
        comes after they were handed over. (``asyncio.wait_for`` would not do:
        when its inner wait has just finished, it swallows the cancellation,
        and the batch it goes on to take reaches nobody.)
        """
        while not self._changes and not self._full:
            self._wake.clear()
            await self._wake.wait()
        # Then sleep until the quiet period or the cap would end, and look
        # again. A change meanwhile only moves the deadline: waking for each
        # one would cost a task switch and a new timer per event in a burst.
        while True:
            now = time.monotonic()
            cap = self.max_delay
            if self._streaming and self.follow_delay is not None:
                cap = min(cap, self.follow_delay)
            quiet = self._last + self.debounce
            if now >= quiet:
                return self._take()
            if now >= self._first + cap:
                self._streaming = True
                return self._take()
            await asyncio.sleep(min(quiet, self._first + cap) - now)
