"""Parsing the remote probe and judging what it found (no network needed)."""

from __future__ import annotations

import pytest

from dev_sync.errors import DevSyncError, SafetyStop
from dev_sync.remote import _parse, check_rsync, parse_rsync_version, refuse_unsafe_state


def test_parse_probe_output() -> None:
    info = _parse("rsync=rsync  version 3.2.7  protocol version 31\nstate=empty\ncreated=1\n"
                  "free_kb=123456\n")
    assert info.rsync_version == (3, 2, 7) and info.state == "empty"
    assert info.created and info.free_kb == 123456


@pytest.mark.parametrize(
    ("banner", "version"),
    [
        ("rsync  version 3.5.0  protocol version 32", (3, 5, 0)),
        ("rsync  version v3.2.3  protocol version 31", (3, 2, 3)),
        ("openrsync: protocol version 29", None),
        ("", None),
    ],
)
def test_rsync_versions(banner: str, version: tuple[int, ...] | None) -> None:
    assert parse_rsync_version(banner) == version


def test_old_or_missing_rsync_is_refused_with_a_fix() -> None:
    with pytest.raises(DevSyncError, match="too old") as old:
        check_rsync(_parse("rsync=rsync  version 3.1.3  protocol version 31\nstate=empty\n"), "vm")
    assert old.value.fix and "upgrade" in old.value.fix
    with pytest.raises(DevSyncError, match="not installed") as missing:
        check_rsync(_parse("rsync=\nstate=empty\n"), "vm")
    assert missing.value.fix and "apt-get install rsync" in missing.value.fix


@pytest.mark.parametrize("state", ["home", "notdir", "nonempty"])
def test_unsafe_remote_states_stop(state: str) -> None:
    with pytest.raises(SafetyStop):
        refuse_unsafe_state(_parse(f"state={state}\n"), "/srv/app", "vm")


def test_marked_or_empty_roots_are_fine() -> None:
    for state in ("marked", "empty", "missing"):
        refuse_unsafe_state(_parse(f"state={state}\n"), "/srv/app", "vm")
