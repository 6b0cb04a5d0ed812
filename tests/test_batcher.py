"""The batcher: coalescing, subtree collapsing, quiet period and cap."""

from __future__ import annotations

import asyncio
import time

import pytest

from dev_sync.batcher import Batch, Batcher, collapse


def test_collapse_drops_paths_inside_recursive_dirs() -> None:
    changes = {"a": True, "a/b": False, "a/c/d": True, "a-b": False, "b/x": False, "b": False}
    assert collapse(changes) == (("a", True), ("a-b", False), ("b", False), ("b/x", False))


def test_collapse_keeps_siblings_with_common_prefix() -> None:
    assert collapse({"src": True, "src2/f": False, "src/f": False}) == (
        ("src", True),
        ("src2/f", False),
    )


def test_collapse_nested_recursive_inside_plain_dir() -> None:
    assert collapse({"a": False, "a/b": True, "a/b/c": False, "a/z": False}) == (
        ("a", False),
        ("a/b", True),
        ("a/z", False),
    )


async def test_single_change_leaves_after_quiet_period() -> None:
    b = Batcher(debounce=0.005, max_delay=1.0)
    b.add("f.txt")
    started = time.monotonic()
    batch = await asyncio.wait_for(b.next_batch(), 1)
    assert batch == Batch((("f.txt", False),))
    assert time.monotonic() - started < 0.5
    assert b.pending == 0


async def test_repeated_writes_coalesce_into_one_entry() -> None:
    b = Batcher(debounce=0.02, max_delay=1.0)
    for _ in range(10):
        b.add("package-lock.json")
    b.add("dir", recursive=True)
    b.add("dir", recursive=False)  # a later plain event never downgrades a subtree
    batch = await asyncio.wait_for(b.next_batch(), 1)
    assert batch.changes == (("dir", True), ("package-lock.json", False))


async def test_continuous_burst_is_cut_by_the_cap() -> None:
    b = Batcher(debounce=0.05, max_delay=0.1)

    async def feed() -> None:
        for i in range(1000):
            b.add(f"f{i}")
            await asyncio.sleep(0.01)

    feeder = asyncio.create_task(feed())
    try:
        first = await asyncio.wait_for(b.next_batch(), 2)
        # The feeder never pauses for the quiet period, yet a batch left.
        assert 0 < len(first) < 1000
    finally:
        feeder.cancel()


async def test_full_request_replaces_paths_and_keeps_reasons() -> None:
    b = Batcher(debounce=0.001, max_delay=1.0)
    b.add("x")
    b.request_full("overflow")
    b.request_full("overflow")
    b.add("y")  # covered by the reconcile
    batch = await asyncio.wait_for(b.next_batch(), 1)
    assert batch.full and batch.reasons == ("overflow",) and batch.changes == ()


async def test_too_many_paths_become_a_reconcile() -> None:
    b = Batcher(debounce=0.001, max_delay=1.0, max_paths=10)
    for i in range(11):
        b.add(f"f{i}")
    batch = await asyncio.wait_for(b.next_batch(), 1)
    assert batch.full


async def test_requeue_merges_with_newer_changes() -> None:
    b = Batcher(debounce=0.001, max_delay=1.0)
    b.add("new")
    b.requeue(Batch((("old", True), ("new", False))))
    batch = await asyncio.wait_for(b.next_batch(), 1)
    assert batch.changes == (("new", False), ("old", True))


async def test_waits_while_idle() -> None:
    b = Batcher(debounce=0.001, max_delay=0.01)
    with pytest.raises(TimeoutError):
        await asyncio.wait_for(b.next_batch(), 0.1)


async def test_a_cancelled_wait_takes_nothing() -> None:
    """Cancelled in the same turn as a change wakes it, a wait must either hand
    the batch over or leave every change pending: nothing may be taken and dropped."""
    b = Batcher(debounce=10.0, max_delay=0.2)
    b.add("a")
    waiting = asyncio.ensure_future(b.next_batch())
    await asyncio.sleep(0.02)  # it now sleeps towards the cap
    # The change's wake-up is queued before the cancellation is delivered.
    b.add("b")
    waiting.cancel()
    with pytest.raises(asyncio.CancelledError):
        await waiting
    await asyncio.sleep(0.3)  # past the cap
    assert b.pending == 2
    assert await asyncio.wait_for(b.next_batch(), 1) == Batch((("a", False), ("b", False)))


async def test_an_engine_wait_never_drops_a_batch() -> None:
    """The engine races the next batch against earlier answers landing; when both
    happen in one turn the batch is still handed over, never lost."""
    from dev_sync.engine import _first

    b = Batcher(debounce=10.0, max_delay=0.2)
    b.add("a")
    landed: asyncio.Future[None] = asyncio.get_running_loop().create_future()
    race = asyncio.ensure_future(_first(b.next_batch(), landed))
    await asyncio.sleep(0.02)
    landed.set_result(None)  # the answers land...
    b.add("b")  # ...in the same turn as a change
    first = await asyncio.wait_for(race, 1)
    await asyncio.sleep(0.3)
    later = b._take() if b.pending else None
    got = [rel for batch in (first, later) if batch is not None for rel, _ in batch.changes]
    assert sorted(got) == ["a", "b"]


async def test_an_engine_wait_keeps_a_result_that_outlived_its_cancellation() -> None:
    from dev_sync.engine import _first

    async def stubborn() -> str:
        try:
            await asyncio.sleep(10)
        except asyncio.CancelledError:
            return "taken anyway"  # as asyncio.wait_for may, when its wait just ended
        return "late"

    gone: asyncio.Future[None] = asyncio.get_running_loop().create_future()
    gone.set_result(None)
    assert await _first(stubborn(), gone) == "taken anyway"
    never: asyncio.Future[str] = asyncio.get_running_loop().create_future()
    assert await _first(never, gone) is None
    assert never.cancelled()


def test_the_cap_is_short_for_the_agent_unless_configured() -> None:
    from dev_sync.engine import batch_cap

    assert batch_cap(None, agent=True) < batch_cap(None, agent=False)
    assert batch_cap(None, agent=True) <= 0.025  # pipelined: stream a burst as it comes
    assert batch_cap(None, agent=False) == 0.150  # one rsync run per batch
    assert batch_cap(500, agent=True) == batch_cap(500, agent=False) == 0.5


class _Writer:
    """Adds a change every 10 ms until stopped: a checkout, seen by the batcher."""

    def __init__(self, b: Batcher) -> None:
        self.b = b
        self.n = 0
        self.task: asyncio.Task[None] | None = None

    async def _run(self) -> None:
        while True:
            self.b.add(f"f{self.n}")
            self.n += 1
            await asyncio.sleep(0.01)

    def start(self) -> None:
        self.task = asyncio.ensure_future(self._run())

    async def stop(self) -> None:
        assert self.task is not None
        self.task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await self.task


async def _timed(b: Batcher) -> float:
    started = time.monotonic()
    await asyncio.wait_for(b.next_batch(), 5)
    return time.monotonic() - started


async def test_once_a_burst_is_cut_the_batches_after_it_use_the_follow_up_cap() -> None:
    b = Batcher(debounce=0.05, max_delay=0.4, follow_delay=0.1)
    writer = _Writer(b)
    writer.start()
    try:
        assert await _timed(b) >= 0.35  # the first cut: the full cap
        await asyncio.sleep(0.2)  # the sender is busy; changes keep coming
        # Pending for longer than the follow-up cap: taken at once.
        assert await _timed(b) < 0.05
        # The next starts with the next change: the follow-up cap, not the full one.
        assert 0.08 <= await _timed(b) < 0.3
        # A pause longer than the quiet period but shorter than a cap (the writer
        # lost its core for a moment) does not end the burst.
        await writer.stop()
        b.add("last")
        assert await _timed(b) < 0.1  # what is pending goes on the quiet period
        await asyncio.sleep(0.15)
        writer.start()
        assert 0.08 <= await _timed(b) < 0.3
    finally:
        await writer.stop()


async def test_quiet_for_a_whole_cap_ends_a_burst() -> None:
    b = Batcher(debounce=0.05, max_delay=0.4, follow_delay=0.1)
    writer = _Writer(b)
    writer.start()
    try:
        assert await _timed(b) >= 0.35
        await writer.stop()
        b.add("last")
        await asyncio.wait_for(b.next_batch(), 1)
        await asyncio.sleep(0.45)
        # A lone save after the quiet: one batch on the quiet period, not split.
        b.add("a")
        b.add("b")
        assert await asyncio.wait_for(b.next_batch(), 1) == Batch((("a", False), ("b", False)))
        await asyncio.sleep(0.45)
        writer.start()
        assert await _timed(b) >= 0.35  # a new burst: the full cap again
    finally:
        await writer.stop()


async def test_without_a_follow_up_cap_every_cut_waits_the_full_cap() -> None:
    b = Batcher(debounce=0.05, max_delay=0.3)
    writer = _Writer(b)
    writer.start()
    try:
        assert await _timed(b) >= 0.25
        assert await _timed(b) >= 0.25
    finally:
        await writer.stop()
