"""The remote agent's operations, run in-process on a real folder (no ssh)."""

from __future__ import annotations

import hashlib
import io
import os
import stat
from pathlib import Path
from typing import Any

import pytest

from dev_sync import remote_agent
from dev_sync.remote_agent import ACK, Agent, frame, take_frames


class Harness:
    def __init__(self, root: Path) -> None:
        self.root = root
        self.out = io.BytesIO()
        self.agent = Agent(str(root), self.out)
        self.n = 0

    def __call__(self, data: bytes = b"", /, **meta: Any) -> dict[str, Any]:
        self.n += 1
        self.agent.handle(self.n, meta, data)
        self.agent.release()
        kind, ident, reply, _ = self.answers()[0]
        self.out.seek(0)
        self.out.truncate()
        assert (kind, ident) == (ACK, self.n)
        return reply

    def answers(self) -> list[tuple[int, int, dict[str, Any], bytes]]:
        return take_frames(bytearray(self.out.getvalue()))

    def write(self, rel: str, data: bytes, mode: int = 0o644, mtime_ns: int = 10**18) -> \
            dict[str, Any]:
        return self(data, op="write", path=rel, mode=mode, mtime_ns=mtime_ns,
                    hash=hashlib.sha256(data).hexdigest())


@pytest.fixture
def h(tmp_path: Path) -> Harness:
    root = tmp_path / "root"
    root.mkdir()
    return Harness(root)


HOSTILE = ["-e", "$(touch pwned)", "a b\nc", "back\\slash", "'quote\"", "ünï", "#hash", "x" * 200]


@pytest.mark.parametrize("name", HOSTILE)
def test_any_name_is_written_literally(h: Harness, name: str) -> None:
    assert h.write(f"dir/{name}", b"data", 0o755, 1_600_000_000_123_456_789)["ok"]
    path = h.root / "dir" / name
    assert path.read_bytes() == b"data"
    st = path.stat()
    assert stat.S_IMODE(st.st_mode) == 0o755
    assert st.st_mtime_ns == 1_600_000_000_123_456_789
    assert not (h.root / "pwned").exists()
    assert sorted(os.listdir(h.root / "dir")) == [name]  # no temporary file left


def test_undecodable_names_round_trip_through_frames(h: Harness) -> None:
    name = os.fsdecode(b"bad-\xff-name")
    raw = frame(1, 7, {"op": "write", "path": name, "mode": 0o644, "mtime_ns": 0}, b"x")
    [(_, ident, meta, data)] = take_frames(bytearray(raw))
    h.agent.handle(ident, meta, data)
    h.agent.release()
    assert (h.root / name).read_bytes() == b"x"
    assert os.fsencode(name) in os.listdir(os.fsencode(h.root))


@pytest.mark.parametrize("rel", ["../out", "/etc/passwd", "a/../../out", "", "a//b", "./a",
                                 ".dev-sync/x", ".dev-sync-root"])
def test_paths_outside_the_tree_are_refused(h: Harness, rel: str) -> None:
    reply = h.write(rel, b"x")
    assert not reply["ok"] and reply["refused"]
    assert not (h.root.parent / "out").exists()


def test_a_symlinked_folder_is_never_written_through(h: Harness, tmp_path: Path) -> None:
    outside = tmp_path / "outside"
    outside.mkdir()
    (outside / "precious").write_text("keep")
    os.symlink(outside, h.root / "link")
    reply = h.write("link/file", b"x")
    assert not reply["ok"] and reply["refused"]
    assert h(op="delete", path="link/precious")["refused"]
    assert h(op="restat", paths=["link/precious"], recursive=True)["ok"]
    assert sorted(p.name for p in outside.iterdir()) == ["precious"]


def test_delete_of_a_non_empty_folder_is_left_to_rsync(h: Harness) -> None:
    h.write("d/f", b"x")
    reply = h(op="delete", path="d")
    assert reply["refused"] and (h.root / "d" / "f").exists()
    assert h(op="delete", path="d/f")["deleted"] == 1
    assert h(op="delete", path="d")["deleted"] == 1
    assert h(op="delete", path="never-was")["deleted"] == 0


def test_remote_edit_is_moved_aside_before_overwrite_and_delete(h: Harness) -> None:
    h.write("a.txt", b"synced")
    h.write("b.txt", b"synced")
    assert h(op="snapshot", entries=["a.txt", "b.txt", "gone.txt"])["entries"] == 2
    (h.root / "a.txt").write_bytes(b"edited on the VM")
    reply = h.write("a.txt", b"local")
    kept = h.root / reply["conflict"]
    assert reply["conflict"].startswith(".dev-sync/conflicts/")
    assert reply["conflict"].endswith("/a.txt")
    assert kept.read_bytes() == b"edited on the VM"
    assert (h.root / "a.txt").read_bytes() == b"local"
    # Unchanged since it was written: no copy.
    assert "conflict" not in h.write("a.txt", b"local 2")
    (h.root / "b.txt").write_bytes(b"edited too")
    reply = h(op="delete", path="b.txt")
    assert reply["deleted"] == 0 and (h.root / reply["conflict"]).read_bytes() == b"edited too"
    assert not (h.root / "b.txt").exists()


def test_a_file_created_on_the_vm_after_the_snapshot_is_kept(h: Harness) -> None:
    assert h(op="snapshot", entries=[])["ok"]
    (h.root / "new.txt").write_bytes(b"made on the VM")
    reply = h.write("new.txt", b"made locally")
    assert (h.root / reply["conflict"]).read_bytes() == b"made on the VM"


def test_files_rsync_wrote_are_not_conflicts_after_restat(h: Harness) -> None:
    assert h(op="snapshot", entries=[])["ok"]
    (h.root / "big.bin").write_bytes(b"by rsync")
    h(op="restat", paths=["big.bin"], recursive=False)
    assert "conflict" not in h.write("big.bin", b"by the agent")


def test_place_moves_or_copies_content_the_remote_has(h: Harness) -> None:
    data = os.urandom(100_000)
    digest = hashlib.sha256(data).hexdigest()
    h.write("old/name.bin", data)
    common: dict[str, Any] = {"hash": digest, "size": len(data), "mode": 0o600,
                              "mtime_ns": 5 * 10**17}
    reply = h(op="place", path="copy.bin", **{"from": ["old/name.bin"]}, move=False, **common)
    assert reply["ok"] and (h.root / "copy.bin").read_bytes() == data
    reply = h(op="place", path="new/name.bin", **{"from": ["nope", "old/name.bin"]}, move=True,
              **common)
    assert reply["ok"] and reply["from"] == "old/name.bin"
    assert not (h.root / "old" / "name.bin").exists()
    assert (h.root / "new" / "name.bin").read_bytes() == data
    assert (h.root / "new" / "name.bin").stat().st_mtime_ns == 5 * 10**17
    # Content that does not match is never used.
    (h.root / "other.bin").write_bytes(os.urandom(len(data)))
    reply = h(op="place", path="x.bin", **{"from": ["other.bin"]}, move=True, **common)
    assert reply["refused"] and not (h.root / "x.bin").exists()


def test_symlink_mkdir_and_folder_move(h: Harness) -> None:
    assert h(b"../target", op="symlink", path="d/link", mtime_ns=10**18)["ok"]
    assert os.readlink(h.root / "d" / "link") == "../target"
    assert h(op="mkdir", path="d/sub", mode=0o700, mtime_ns=10**18)["ok"]
    assert stat.S_IMODE((h.root / "d" / "sub").stat().st_mode) == 0o700
    assert h(op="move_dir", path="e", **{"from": "d"})["ok"]
    assert os.readlink(h.root / "e" / "link") == "../target"
    assert h(op="move_dir", path="f", **{"from": "missing"})["refused"]


def test_a_file_replacing_a_folder_is_left_to_rsync(h: Harness) -> None:
    (h.root / "thing").mkdir()
    assert h.write("thing", b"x")["refused"]


def test_os_errors_come_back_per_path(h: Harness) -> None:
    h.write("f", b"x")
    reply = h.write("f/child", b"y")  # a parent that is a file
    assert not reply["ok"]
    reply = h(b"", op="write", path="g", mode=0o644)  # no mtime: a bad request, not a crash
    assert not reply["ok"] and "bad request" in reply["error"]


def test_the_record_outlives_the_agent_and_finds_edits_made_meanwhile(h: Harness) -> None:
    for name in ("kept.txt", "edited.txt", "deleted.txt"):
        h.write(name, b"synced")
    h(op="snapshot", entries=["kept.txt", "edited.txt", "deleted.txt"], dirs=[""])
    h.agent.save()
    # dev-sync is gone; someone works on the VM.
    (h.root / "edited.txt").write_bytes(b"changed on the VM")
    (h.root / "deleted.txt").unlink()
    (h.root / "made-on-vm.txt").write_bytes(b"new on the VM")
    (h.root / "vm-dir" / "deep").mkdir(parents=True)
    (h.root / "vm-dir" / "deep" / "x.txt").write_bytes(b"deep")
    later = Harness(h.root)
    later.agent.load()
    found = later(op="changed")
    assert found["paths"] == ["edited.txt"]
    assert sorted(found["new"]) == ["made-on-vm.txt", "vm-dir/deep/x.txt"]
    kept = later(op="keep", paths=["edited.txt"])["kept"]
    assert [rel for rel, _ in kept] == ["edited.txt"]
    assert (h.root / kept[0][1]).read_bytes() == b"changed on the VM"
    assert not (h.root / "edited.txt").exists()
    assert (h.root / "kept.txt").read_bytes() == b"synced"


def test_answers_are_held_until_the_input_runs_dry(h: Harness) -> None:
    h.agent.handle(1, {"op": "ping"}, b"")
    h.agent.handle(2, {"op": "ping"}, b"")
    assert h.out.getvalue() == b""
    h.agent.release()
    assert [a[1] for a in h.answers()] == [1, 2]


def test_a_burst_of_writes_is_synced_once_and_renamed_in_order(h: Harness) -> None:
    for i in range(3):
        h.agent.handle(i, {"op": "write", "path": "f.txt", "mode": 0o644, "mtime_ns": i},
                       b"v%d" % i)
    assert not (h.root / "f.txt").exists()  # staged: nothing in place before the commit
    h.agent.handle(3, {"op": "delete", "path": "g.txt"}, b"")  # any other request commits
    assert (h.root / "f.txt").read_bytes() == b"v2"
    h.agent.release()
    answers = h.answers()
    assert [a[1] for a in answers] == [0, 1, 2, 3] and all(a[2]["ok"] for a in answers)
    assert [p.name for p in h.root.iterdir()] == ["f.txt"]


def test_the_record_is_written_when_requests_pause(h: Harness) -> None:
    """Writing it stalls the agent for milliseconds: not in the middle of a burst,
    and not never under a steady flow either."""
    agent = h.agent
    assert not agent.save_due(agent.saved + 100)  # nothing to write
    h.write("a.txt", b"x")
    agent.active = agent.saved + 5.0
    assert not agent.save_due(agent.active)  # requests are coming in
    assert not agent.save_due(agent.active + 0.4)
    assert agent.save_due(agent.active + 0.5)  # they paused
    agent.saved, agent.active = 100.0, 109.8
    assert not agent.save_due(109.9)
    agent.active = 109.9
    assert agent.save_due(110.0)  # a steady flow: written at most this late
    agent.save()
    assert not agent.save_due(agent.saved + 100)
    assert (h.root / ".dev-sync" / "record.json").is_file()


def test_several_writes_in_one_request_get_an_answer_each(h: Harness) -> None:
    (h.root / "vm").mkdir()
    h.write("vm/old.txt", b"before")
    h(op="snapshot", entries=["vm", "vm/old.txt"], dirs=["", "vm"])
    (h.root / "vm" / "old.txt").write_bytes(b"edited on the VM")  # kept aside, then replaced
    files = [("a.txt", b"first"), ("../out.txt", b"refused"), ("sub/deep/b.txt", b""),
             ("vm/old.txt", b"new"), ("-e", b"$(touch pwned)")]
    reply = h(b"".join(data for _, data in files), op="writes", files=[
        [rel, 0o640, 10**18 + i, len(data), None] for i, (rel, data) in enumerate(files)])
    results = reply["results"]
    assert reply["ok"] and len(results) == len(files)
    assert [bool(r.get("ok")) for r in results] == [True, False, True, True, True]
    assert results[1]["refused"]
    assert results[3]["conflict"].startswith(".dev-sync/conflicts/")
    for i, (rel, data) in enumerate(files):
        if i == 1:
            continue
        st = (h.root / rel).stat()
        assert (h.root / rel).read_bytes() == data
        assert (stat.S_IMODE(st.st_mode), st.st_mtime_ns) == (0o640, 10**18 + i)
    assert not (h.root.parent / "out.txt").exists()
    assert not (h.root / "pwned").exists()
    assert (h.root / results[3]["conflict"]).read_bytes() == b"edited on the VM"


def test_a_writes_request_larger_than_the_staging_limit_lands_whole(h: Harness) -> None:
    files = [(f"d/f{i}.txt", b"%d" % i) for i in range(remote_agent.MAX_STAGED + 10)]
    reply = h(b"".join(data for _, data in files), op="writes",
              files=[[rel, 0o644, 10**18, len(data), None] for rel, data in files])
    assert [r["ok"] for r in reply["results"]] == [True] * len(files)
    assert all((h.root / rel).read_bytes() == data for rel, data in files)


def test_a_writes_request_whose_sizes_do_not_add_up_is_refused_whole(h: Harness) -> None:
    reply = h(b"abc", op="writes", files=[["a.txt", 0o644, 10**18, 2, None]])
    assert not reply["ok"] and reply["refused"] and "bad request" in reply["error"]
    reply = h(b"", op="writes", files=[["a.txt", 0o644]])
    assert not reply["ok"] and reply["refused"]
    assert not (h.root / "a.txt").exists()
