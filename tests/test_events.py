"""The status file behind `dev-sync status`: current, without a write per push."""

from __future__ import annotations

import asyncio
from pathlib import Path

import pytest

from dev_sync.events import STATUS_EVERY_S, Problem, Pushed, StatusReporter
from dev_sync.state import SessionFiles


@pytest.fixture
def files(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> SessionFiles:
    monkeypatch.setenv("DEV_SYNC_STATE_DIR", str(tmp_path / "state"))
    config = tmp_path / "dev-sync.toml"
    config.write_text("")
    return SessionFiles(config)


def _push(n: int) -> Pushed:
    return Pushed(1, 1, 10, 0, 1, (f"file-{n}",), "agent")


async def test_a_burst_of_pushes_is_written_a_few_times_and_the_last_one_always(
    files: SessionFiles, monkeypatch: pytest.MonkeyPatch
) -> None:
    reporter = StatusReporter(files, {"project": "p"})
    writes: list[int] = []
    real = files.write_status

    def counting(data: dict[str, object]) -> None:
        writes.append(int(str(data["pushes"])))
        real(data)

    monkeypatch.setattr(files, "write_status", counting)
    for n in range(200):
        reporter.emit(_push(n))
    assert len(writes) == 1  # the first at once, the rest deferred
    await asyncio.sleep(STATUS_EVERY_S + 0.1)
    status = files.read_status()
    assert status is not None and status["pushes"] == 200
    assert status["last_push"]["sample"] == ["file-199"]
    assert writes == [1, 200]
    # Anything but a push is written at once, and carries the pushes along.
    reporter.emit(_push(200))
    reporter.emit(Problem("disk full", "free some space"))
    status = files.read_status()
    assert status is not None and status["pushes"] == 201 and status["errors"]
    await asyncio.sleep(STATUS_EVERY_S + 0.1)
    assert writes == [1, 200, 201]  # the deferred write went with the problem's


def test_without_an_event_loop_every_push_is_written(files: SessionFiles) -> None:
    reporter = StatusReporter(files, {})
    reporter.emit(_push(0))
    reporter.emit(_push(1))
    status = files.read_status()
    assert status is not None and status["pushes"] == 2


def _subclasses(cls: type) -> list[type]:
    out: list[type] = []
    subs: list[type] = cls.__subclasses__()
    for sub in subs:
        out += [sub, *_subclasses(sub)]
    return out


def _plain(value: object) -> bool:
    if isinstance(value, tuple):
        return all(_plain(v) for v in value)
    return value is None or isinstance(value, (str, int, float, bool))


def test_every_event_field_is_plain_so_the_shallow_copy_is_what_asdict_gives() -> None:
    """The reporters copy an event's fields shallowly: a list, dict or dataclass in
    a field would be shared with (and could change under) the status file."""
    import dataclasses
    import typing

    from dev_sync import events

    kinds = _subclasses(events.Event)
    assert events.Pushed in kinds and len(kinds) > 15
    samples: dict[object, object] = {str: "x", int: 1, float: 1.5, bool: True}
    for cls in kinds:
        hints = typing.get_type_hints(cls)
        args: dict[str, object] = {}
        for f in dataclasses.fields(cls):
            hint = hints[f.name]
            origin, inner = typing.get_origin(hint), typing.get_args(hint)
            if origin is tuple:
                element = inner[0]
                args[f.name] = ((samples[element],) if element in samples
                                else (tuple(samples[t] for t in typing.get_args(element)),))
            elif hint in samples:
                args[f.name] = samples[hint]
            else:  # an optional plain value
                plain = [t for t in inner if t is not type(None)]
                assert len(plain) == 1 and plain[0] in samples, (cls, f.name, hint)
                args[f.name] = samples[plain[0]]
        event = cls(**args)
        assert event.fields() == dataclasses.asdict(event), cls
        assert all(_plain(v) for v in event.fields().values()), cls
    assert events.Pushed(1, 1, 1, 0, 1).kind == "pushed"
    assert events.AgentReady("v", "3.11", 5).kind == "agent_ready"
