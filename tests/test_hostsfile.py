"""The dev-sync block in a hosts file: text edits that touch nothing else, and safe writes."""

from __future__ import annotations

import errno
import ipaddress
import os
import shutil
import stat
import subprocess
import sys
import tempfile
import textwrap
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st

import dev_sync.hostsfile as hostsfile
from dev_sync.errors import DevSyncError
from dev_sync.hostsfile import (
    WriteResult,
    apply_block,
    find_block,
    read_hosts,
    remove_block,
    render_block,
    validate_address,
    validate_hostname,
    write_hosts,
)

ENTRIES = [("10.0.0.5", "api.dev.local"), ("10.0.0.5", "web.dev.local")]
BLOCK = (
    "# BEGIN dev-sync app\n10.0.0.5\tapi.dev.local\n10.0.0.5\tweb.dev.local\n# END dev-sync app\n"
)
HINT = "sudo dev-sync hosts apply --env teammate"
BASE = "127.0.0.1\tlocalhost\n::1\tlocalhost ip6-localhost\n"


# --- rendering and text edits ------------------------------------------------


def test_render_block_exact_text() -> None:
    assert render_block("app", ENTRIES) == BLOCK
    assert render_block("app", []) == "# BEGIN dev-sync app\n# END dev-sync app\n"


def test_render_block_normalizes_and_drops_exact_repeats() -> None:
    text = render_block("app", [("::0:1", "API.Dev.Local"), ("::1", "api.dev.local")])
    assert text == "# BEGIN dev-sync app\n::1\tapi.dev.local\n# END dev-sync app\n"


def test_render_block_refuses_one_name_with_two_addresses() -> None:
    with pytest.raises(ValueError, match="two addresses"):
        render_block("app", [("10.0.0.1", "api.dev.local"), ("10.0.0.2", "api.dev.local")])


@pytest.mark.parametrize("project", ["", " app", "app ", "a\nb", "a\rb", "a\x00b", "a\u2028b"])
def test_bad_project_names(project: str) -> None:
    with pytest.raises(ValueError, match="project name"):
        render_block(project, ENTRIES)
    with pytest.raises(ValueError, match="project name"):
        apply_block(BASE, project, ENTRIES)


def test_apply_appends_to_a_file_ending_with_a_newline() -> None:
    assert apply_block(BASE, "app", ENTRIES) == BASE + BLOCK


def test_apply_to_an_empty_file() -> None:
    assert apply_block("", "app", ENTRIES) == BLOCK
    assert remove_block(BLOCK, "app") == ""


def test_apply_after_a_last_line_without_newline() -> None:
    text = "127.0.0.1 localhost"
    applied = apply_block(text, "app", ENTRIES)
    # Not glued to the last line, and the file still ends without a newline.
    assert applied == text + "\n" + BLOCK[:-1]
    assert find_block(applied, "app") == ENTRIES
    assert apply_block(applied, "app", ENTRIES) == applied
    assert remove_block(applied, "app") == text


def test_apply_in_a_crlf_file_uses_crlf() -> None:
    text = "127.0.0.1 localhost\r\n# comment\r\n"
    applied = apply_block(text, "app", ENTRIES)
    assert applied == text + BLOCK.replace("\n", "\r\n")
    assert find_block(applied, "app") == ENTRIES
    assert remove_block(applied, "app") == text
    no_final = "127.0.0.1 localhost\r\n# comment"
    applied = apply_block(no_final, "app", ENTRIES)
    assert applied == no_final + "\r\n" + BLOCK.replace("\n", "\r\n")[:-2]
    assert remove_block(applied, "app") == no_final


def test_replace_in_place_keeps_everything_around_it() -> None:
    before = "# top\t comment ünïcode\n127.0.0.1 localhost\n\n"
    after = "\n# END dev-sync other\n10.1.1.1 tail  # trailing\n"
    text = before + render_block("app", [("10.9.9.9", "old.dev.local")]) + after
    assert apply_block(text, "app", ENTRIES) == before + BLOCK + after
    assert remove_block(text, "app") == before + after


def test_replace_keeps_the_line_ends_of_the_existing_block() -> None:
    old = render_block("app", [("10.9.9.9", "old.dev.local")]).replace("\n", "\r\n")
    text = "a\n" + old[:-2]  # CRLF block at the end, no final newline
    assert apply_block(text, "app", ENTRIES) == "a\n" + BLOCK.replace("\n", "\r\n")[:-2]


def test_applying_twice_is_a_no_op() -> None:
    once = apply_block(BASE, "app", ENTRIES)
    assert apply_block(once, "app", ENTRIES) == once
    assert apply_block(once, "app", list(reversed(ENTRIES))) != once


def test_a_project_that_is_a_prefix_of_another() -> None:
    text = apply_block(BASE, "app2", [("10.0.0.2", "two.dev.local")])
    text = apply_block(text, "app", [("10.0.0.1", "one.dev.local")])
    text = apply_block(text, "app 2", [("10.0.0.3", "three.dev.local")])
    assert find_block(text, "app") == [("10.0.0.1", "one.dev.local")]
    assert find_block(text, "app2") == [("10.0.0.2", "two.dev.local")]
    assert find_block(text, "app 2") == [("10.0.0.3", "three.dev.local")]
    assert find_block(text, "ap") is None
    only_app2 = remove_block(remove_block(text, "app"), "app 2")
    assert only_app2 == BASE + render_block("app2", [("10.0.0.2", "two.dev.local")])


def test_project_names_with_spaces_and_unicode() -> None:
    text = apply_block(BASE, "my app ü", ENTRIES)
    assert "# BEGIN dev-sync my app ü\n" in text
    assert find_block(text, "my app ü") == ENTRIES
    assert find_block(text, "my app") is None
    assert remove_block(text, "my app ü") == BASE


def test_several_blocks_coexist_and_each_is_replaced_alone() -> None:
    text = apply_block(BASE, "one", [("10.0.0.1", "a.one")])
    text = apply_block(text, "two", [("10.0.0.2", "a.two")])
    changed = apply_block(text, "one", [("10.0.0.9", "b.one")])
    assert changed == text.replace("10.0.0.1\ta.one", "10.0.0.9\tb.one")
    assert find_block(changed, "two") == [("10.0.0.2", "a.two")]


def test_trailing_spaces_after_a_marker_are_tolerated() -> None:
    text = BASE + BLOCK.replace("# BEGIN dev-sync app\n", "# BEGIN dev-sync app \t\n")
    assert find_block(text, "app") == ENTRIES
    assert remove_block(text, "app") == BASE


def test_find_block_parses_hosts_syntax() -> None:
    text = (
        "# BEGIN dev-sync app\r\n"
        "10.0.0.1   a.dev b.dev  # two names\r\n"
        "\r\n"
        "# a comment\r\n"
        "fe80::1\tc.dev\r\n"
        "# END dev-sync app\r\n"
    )
    assert find_block(text, "app") == [
        ("10.0.0.1", "a.dev"),
        ("10.0.0.1", "b.dev"),
        ("fe80::1", "c.dev"),
    ]
    assert find_block(BASE, "app") is None
    assert find_block("", "app") is None
    with pytest.raises(ValueError, match=r"line 2: '10\.0\.0\.1' has no hostname"):
        find_block("# BEGIN dev-sync app\n10.0.0.1\n# END dev-sync app\n", "app")


def test_remove_without_a_block_changes_nothing() -> None:
    for text in ("", BASE, "x", "# END dev-sync other\r\n", BASE + render_block("app2", ENTRIES)):
        assert remove_block(text, "app") == text


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("a\n# BEGIN dev-sync app\n10.0.0.1 x\n", "line 2: '# BEGIN dev-sync app' has no matching"),
        ("a\nb\n# END dev-sync app\n", "line 3: '# END dev-sync app' without"),
        (BLOCK + "x\n" + BLOCK, "line 6: a second '# BEGIN dev-sync app'"),
        (BLOCK + "# END dev-sync app\n", "line 5: '# END dev-sync app' without"),
        (
            "# BEGIN dev-sync app\n# BEGIN dev-sync other\n"
            "# END dev-sync other\n# END dev-sync app\n",
            "line 2: '# BEGIN dev-sync other' is inside",
        ),
        ("# BEGIN dev-sync app\n# BEGIN dev-sync app\n# END dev-sync app\n", "line 2"),
    ],
)
def test_a_damaged_block_is_refused_not_guessed(text: str, message: str) -> None:
    for call in (
        lambda: apply_block(text, "app", ENTRIES),
        lambda: remove_block(text, "app"),
        lambda: find_block(text, "app"),
    ):
        with pytest.raises(ValueError) as info:
            call()
        assert message in str(info.value)


def test_a_damaged_block_of_another_project_is_not_ours_to_judge() -> None:
    text = BASE + "# BEGIN dev-sync other\n10.0.0.1 x\n"
    assert apply_block(text, "app", ENTRIES) == text + BLOCK


def test_only_newline_ends_a_line() -> None:
    # \x85, \x0b, \x0c and U+2028 are line breaks to str.splitlines, not to a hosts file.
    text = "a\x85b\x0bc\x0cd\u2028e\n"
    applied = apply_block(text, "app", ENTRIES)
    assert applied == text + BLOCK
    assert remove_block(applied, "app") == text
    hidden = "x\u2028# BEGIN dev-sync app\ny\x85# END dev-sync app\n"
    assert find_block(hidden, "app") is None
    assert apply_block(hidden, "app", ENTRIES) == hidden + BLOCK


# --- validation ----------------------------------------------------------------


@pytest.mark.parametrize(
    ("name", "expected"),
    [
        ("api.dev.local", "api.dev.local"),
        ("API.Dev.Local", "api.dev.local"),
        ("a", "a"),
        ("my-service1.internal", "my-service1.internal"),
        ("xn--bcher-kva.example", "xn--bcher-kva.example"),
        ("1.dev.local", "1.dev.local"),
        ("a" * 63 + ".b", "a" * 63 + ".b"),
    ],
)
def test_good_hostnames(name: str, expected: str) -> None:
    assert validate_hostname(name) == expected


@pytest.mark.parametrize(
    ("name", "message"),
    [
        ("", "empty"),
        ("api dev", "whitespace"),
        (" api", "whitespace"),
        ("api\t", "whitespace"),
        ("_api.dev", "underscore"),
        ("my_api.dev", "underscore"),
        ("api.dev.", "ends with a dot"),
        (".api.dev", "empty label"),
        ("api..dev", "empty label"),
        ("-api.dev", "starts or ends with '-'"),
        ("api-.dev", "starts or ends with '-'"),
        ("a" * 64 + ".dev", "longer than 63"),
        (".".join(["a" * 50] * 5), "longer than 253"),
        ("büro.dev", "punycode"),
        ("api.dev/x", "'/'"),
        ("api#x", "'#'"),
        ("10.0.0.1", "IP address"),
        ("localhost", "localhost"),
        ("LocalHost", "localhost"),
    ],
)
def test_bad_hostnames(name: str, message: str) -> None:
    with pytest.raises(ValueError) as info:
        validate_hostname(name)
    assert message in str(info.value)
    with pytest.raises(ValueError):
        render_block("app", [("10.0.0.1", name)])


@pytest.mark.parametrize(
    ("addr", "expected"),
    [
        ("10.0.0.5", "10.0.0.5"),
        ("127.0.0.1", "127.0.0.1"),
        ("::1", "::1"),
        ("2001:DB8:0:0::1", "2001:db8::1"),
        ("fe80::1%eth0", "fe80::1%eth0"),
    ],
)
def test_good_addresses(addr: str, expected: str) -> None:
    assert validate_address(addr) == expected


@pytest.mark.parametrize(
    ("addr", "message"),
    [
        ("", "not an IPv4 or IPv6"),
        ("api.dev", "not an IPv4 or IPv6"),
        ("10.0.0", "not an IPv4 or IPv6"),
        ("10.0.0.256", "not an IPv4 or IPv6"),
        ("010.0.0.1", "not an IPv4 or IPv6"),
        (" 10.0.0.1", "not an IPv4 or IPv6"),
        ("10.0.0.1/24", "not an IPv4 or IPv6"),
        ("::g", "not an IPv4 or IPv6"),
        ("0.0.0.0", "unspecified"),
        ("::", "unspecified"),
        ("224.0.0.1", "multicast"),
    ],
)
def test_bad_addresses(addr: str, message: str) -> None:
    with pytest.raises(ValueError) as info:
        validate_address(addr)
    assert message in str(info.value)
    with pytest.raises(ValueError):
        render_block("app", [(addr, "api.dev.local")])


# --- properties -----------------------------------------------------------------

PROJECTS = ["app", "app2", "app 2", "ap", "my app", "ünï"]
_LETTERS = "abcdefghijklmnopqrstuvwxyz"
_label = st.sampled_from(_LETTERS) | st.builds(
    lambda first, middle, last: first + middle + last,
    st.sampled_from(_LETTERS),
    st.text(_LETTERS + "0123456789-", max_size=6),
    st.sampled_from("09az"),
)
hostnames = st.lists(_label, min_size=1, max_size=3).map(".".join)
addresses = (
    st.one_of(
        st.integers(1, 2**32 - 1).map(ipaddress.IPv4Address),
        st.integers(1, 2**128 - 1).map(ipaddress.IPv6Address),
    )
    .filter(lambda ip: not ip.is_multicast)
    .map(str)
)
entry_lists = st.lists(st.tuples(addresses, hostnames), max_size=5, unique_by=lambda e: e[1])
plain_lines = st.text(st.characters(exclude_characters="\n"), max_size=30)


@st.composite
def surroundings(draw: st.DrawFn, project: str) -> str:
    """Any hosts-file text that holds no block of ``project``, with other projects' blocks."""
    others = [p for p in PROJECTS if p != project]
    lines = draw(
        st.lists(
            st.one_of(
                plain_lines,
                st.sampled_from(others).map(lambda p: f"# END dev-sync {p}"),
                st.tuples(st.sampled_from(others), entry_lists).map(
                    lambda pe: render_block(pe[0], pe[1])[:-1]
                ),
            ),
            max_size=8,
        )
    )
    newline = draw(st.sampled_from(["\n", "\r\n"]))
    text = newline.join(line.replace("\n", newline) for line in lines)
    trailing = draw(st.booleans())
    if lines and trailing:
        text += newline
    try:
        assume(find_block(text, project) is None)
    except ValueError:
        assume(False)
    return text


@st.composite
def cases(draw: st.DrawFn) -> tuple[str, str, list[tuple[str, str]]]:
    project = draw(st.sampled_from(PROJECTS))
    return project, draw(surroundings(project)), draw(entry_lists)


PROPERTY = settings(max_examples=100, deadline=None, suppress_health_check=[HealthCheck.too_slow])


@PROPERTY
@given(cases())
def test_apply_then_remove_restores_every_byte(
    case: tuple[str, str, list[tuple[str, str]]],
) -> None:
    project, text, entries = case
    applied = apply_block(text, project, entries)
    assert applied.startswith(text)
    assert remove_block(applied, project) == text


@PROPERTY
@given(cases(), entry_lists)
def test_apply_is_idempotent_and_find_returns_what_was_applied(
    case: tuple[str, str, list[tuple[str, str]]], other_entries: list[tuple[str, str]]
) -> None:
    project, text, entries = case
    applied = apply_block(text, project, entries)
    assert apply_block(applied, project, entries) == applied
    assert find_block(applied, project) == entries
    # Replacing the block with other entries and back gives the same text again.
    assert apply_block(apply_block(applied, project, other_entries), project, entries) == applied
    # Other projects' blocks read the same as before.
    for other in PROJECTS:
        if other != project:
            try:
                before = find_block(text, other)
            except ValueError:
                continue
            assert find_block(applied, other) == before


@PROPERTY
@given(st.data())
def test_a_block_in_the_middle_is_replaced_where_it_stands(data: st.DataObject) -> None:
    project = data.draw(st.sampled_from(PROJECTS))
    before = data.draw(surroundings(project))
    if before and not before.endswith("\n"):
        before += "\n"
    after = data.draw(surroundings(project))
    old, new = data.draw(entry_lists), data.draw(entry_lists)
    text = before + render_block(project, old) + after
    assume(find_block(text, project) == old)  # ``after`` may not be a block's inside
    assert apply_block(text, project, new) == before + render_block(project, new) + after
    assert remove_block(text, project) == before + after


@settings(max_examples=200, deadline=None)
@given(st.text(max_size=80))
def test_validate_hostname_accepts_only_rfc1123(name: str) -> None:
    try:
        result = validate_hostname(name)
    except ValueError as exc:
        assert str(exc)
        return
    labels = result.split(".")
    assert result == name.lower() and len(result) <= 253
    assert all(0 < len(label) <= 63 for label in labels)
    assert all(set(label) <= set("abcdefghijklmnopqrstuvwxyz0123456789-") for label in labels)
    assert not any(label.startswith("-") or label.endswith("-") for label in labels)


@settings(max_examples=100, deadline=None)
@given(hostnames, addresses)
def test_generated_entries_validate(name: str, addr: str) -> None:
    assert validate_hostname(name) == name
    assert validate_address(addr) == addr


# --- writing the file -----------------------------------------------------------


def _temp_files(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.iterdir() if p.name.endswith(".dev-sync.tmp"))


@pytest.fixture
def hosts(tmp_path: Path) -> Path:
    path = tmp_path / "hosts"
    path.write_bytes(BASE.encode())
    path.chmod(0o640)
    return path


def test_read_hosts_keeps_crlf_and_bytes_that_are_not_utf8(tmp_path: Path) -> None:
    path = tmp_path / "hosts"
    raw = b"127.0.0.1 localhost\r\n# caf\xe9\r\n10.0.0.1 x"
    path.write_bytes(raw)
    text = read_hosts(path)
    result = write_hosts(path, apply_block(text, "app", ENTRIES), sudo_hint=HINT)
    assert result.changed
    written = path.read_bytes()
    assert written.startswith(raw + b"\r\n# BEGIN dev-sync app\r\n")
    write_hosts(path, remove_block(read_hosts(path), "app"), sudo_hint=HINT)
    assert path.read_bytes() == raw
    assert read_hosts(tmp_path / "missing") == ""


def test_atomic_write_keeps_mode_and_owner_and_backs_up(hosts: Path) -> None:
    if os.geteuid() == 0:
        os.chown(hosts, 4321, 4322)
    before = hosts.stat()
    result = write_hosts(hosts, BASE + BLOCK, sudo_hint=HINT)
    backup = hosts.with_name("hosts.dev-sync.bak")
    assert result == WriteResult(changed=True, path=hosts, backup=backup, in_place=False)
    after = hosts.stat()
    assert hosts.read_text() == BASE + BLOCK
    assert after.st_ino != before.st_ino  # renamed over, not rewritten
    assert stat.S_IMODE(after.st_mode) == 0o640
    assert (after.st_uid, after.st_gid) == (before.st_uid, before.st_gid)
    assert backup.read_text() == BASE
    assert stat.S_IMODE(backup.stat().st_mode) == 0o640
    assert _temp_files(hosts.parent) == []
    # The backup holds the content just before the latest change.
    write_hosts(hosts, BASE, sudo_hint=HINT)
    assert backup.read_text() == BASE + BLOCK


def test_same_content_touches_nothing(hosts: Path) -> None:
    os.utime(hosts, ns=(1_000_000_000, 1_000_000_000))
    before = hosts.stat()
    result = write_hosts(hosts, BASE, sudo_hint=HINT)
    assert result == WriteResult(changed=False, path=hosts, backup=None, in_place=False)
    after = hosts.stat()
    assert (after.st_mtime_ns, after.st_ino) == (before.st_mtime_ns, before.st_ino)
    assert sorted(p.name for p in hosts.parent.iterdir()) == ["hosts"]


def test_whole_flow_twice_reports_no_change(hosts: Path) -> None:
    first = write_hosts(hosts, apply_block(read_hosts(hosts), "app", ENTRIES), sudo_hint=HINT)
    mtime = hosts.stat().st_mtime_ns
    second = write_hosts(hosts, apply_block(read_hosts(hosts), "app", ENTRIES), sudo_hint=HINT)
    assert first.changed and not second.changed
    assert hosts.stat().st_mtime_ns == mtime


def test_new_file_and_no_backup(tmp_path: Path) -> None:
    path = tmp_path / "hosts"
    result = write_hosts(path, BLOCK, sudo_hint=HINT)
    assert result == WriteResult(changed=True, path=path, backup=None, in_place=False)
    assert stat.S_IMODE(path.stat().st_mode) == 0o644
    result = write_hosts(path, BASE, sudo_hint=HINT, backup=False)
    assert result.backup is None and path.read_text() == BASE
    assert sorted(p.name for p in tmp_path.iterdir()) == ["hosts"]


def test_a_symlinked_hosts_file_stays_a_symlink(tmp_path: Path) -> None:
    real = tmp_path / "private" / "hosts"
    real.parent.mkdir()
    real.write_text(BASE)
    link = tmp_path / "hosts"
    link.symlink_to(real)
    result = write_hosts(link, BASE + BLOCK, sudo_hint=HINT)
    assert link.is_symlink() and real.read_text() == BASE + BLOCK
    assert result.path == real and result.backup == real.with_name("hosts.dev-sync.bak")


@pytest.fixture
def immutable() -> Iterator[Callable[[Path], None]]:
    """Make paths immutable with chattr +i (refused even to root); undone afterwards."""
    if shutil.which("chattr") is None:
        pytest.skip("chattr is not installed")
    done: list[Path] = []

    def make(path: Path) -> None:
        proc = subprocess.run(["chattr", "+i", str(path)], capture_output=True, check=False)
        if proc.returncode != 0:
            pytest.skip(f"chattr +i is not possible here: {proc.stderr.decode().strip()}")
        done.append(path)

    yield make
    for path in done:
        subprocess.run(["chattr", "-i", str(path)], check=False)


def test_an_immutable_file_is_refused_and_left_alone(
    hosts: Path, immutable: Callable[[Path], None]
) -> None:
    immutable(hosts)
    with pytest.raises(DevSyncError) as info:
        write_hosts(hosts, BASE + BLOCK, sudo_hint=HINT)
    assert "it was not changed" in info.value.cause
    if os.geteuid() == 0:
        assert info.value.fix is not None and "chattr -i" in info.value.fix
    else:
        assert info.value.fix == HINT
    assert hosts.read_text() == BASE
    assert _temp_files(hosts.parent) == []


def test_an_unwritable_folder_is_refused(tmp_path: Path, immutable: Callable[[Path], None]) -> None:
    folder = tmp_path / "etc"
    folder.mkdir()
    path = folder / "hosts"
    path.write_text(BASE)
    immutable(folder)
    with pytest.raises(DevSyncError):
        write_hosts(path, BASE + BLOCK, sudo_hint=HINT)
    assert path.read_text() == BASE
    assert sorted(p.name for p in folder.iterdir()) == ["hosts"]


@pytest.mark.skipif(os.geteuid() != 0, reason="switching to another user needs root")
def test_a_normal_user_gets_the_sudo_command() -> None:
    folder = Path(tempfile.mkdtemp(prefix="dev-sync-hosts-"))
    try:
        folder.chmod(0o755)
        path = folder / "hosts"
        path.write_text(BASE)
        path.chmod(0o644)
        code = textwrap.dedent(
            f"""
            from pathlib import Path
            from dev_sync.errors import DevSyncError
            from dev_sync.hostsfile import write_hosts
            try:
                write_hosts(Path({str(path)!r}), "x\\n", sudo_hint={HINT!r})
            except DevSyncError as exc:
                print(exc.render())
            """
        )
        src = str(Path(hostsfile.__file__).resolve().parents[1])
        env = {"PATH": os.environ.get("PATH", "/usr/bin:/bin"), "PYTHONPATH": src}
        proc = None
        # The test's own interpreter may live where nobody can read (a pyenv under /root).
        for python in dict.fromkeys([sys.executable, "/usr/bin/python3"]):
            try:
                proc = subprocess.run(
                    [python, "-c", code],
                    user="nobody",
                    group="nogroup",
                    extra_groups=[],
                    capture_output=True,
                    text=True,
                    check=False,
                    cwd="/",
                    env=env,
                )
            except (PermissionError, FileNotFoundError, KeyError):
                continue
            if "Error" not in proc.stderr:
                break
        if proc is None or "Error" in proc.stderr:
            pytest.skip("no Python 3.11+ that user nobody can run with this package")
        assert proc.stdout == (
            f"error: no permission to write {path} (Permission denied); it was not changed\n"
            f"  fix: {HINT}\n"
        ), proc.stderr
        assert path.read_text() == BASE
        assert sorted(p.name for p in folder.iterdir()) == ["hosts"]
    finally:
        shutil.rmtree(folder)


@pytest.mark.parametrize("where", ["folder", "rename"])
def test_permission_errors_map_to_the_sudo_command(
    hosts: Path, monkeypatch: pytest.MonkeyPatch, where: str
) -> None:
    monkeypatch.setattr(hostsfile, "_is_root", lambda: False)

    def refuse(*args: object, **kwargs: object) -> None:
        raise PermissionError(errno.EACCES, "Permission denied")

    if where == "folder":
        monkeypatch.setattr(tempfile, "mkstemp", refuse)
    else:
        monkeypatch.setattr(os, "replace", refuse)
    with pytest.raises(DevSyncError) as info:
        write_hosts(hosts, BASE + BLOCK, sudo_hint=HINT, backup=False)
    assert info.value.fix == HINT
    assert (
        info.value.cause
        == f"no permission to write {hosts} (Permission denied); it was not changed"
    )
    assert hosts.read_text() == BASE
    assert sorted(p.name for p in hosts.parent.iterdir()) == ["hosts"]


def test_other_errors_leave_no_temp_file(hosts: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    def failing_disk(fd: int) -> None:
        raise OSError(errno.EIO, "Input/output error")

    monkeypatch.setattr(os, "fsync", failing_disk)
    with pytest.raises(DevSyncError) as info:
        write_hosts(hosts, BASE + BLOCK, sudo_hint=HINT)
    assert info.value.cause == f"cannot write {hosts}: Input/output error; it was not changed"
    assert info.value.fix is None
    assert hosts.read_text() == BASE
    assert sorted(p.name for p in hosts.parent.iterdir()) == ["hosts"]


def test_a_read_only_file_system_is_explained(hosts: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    def read_only(*args: object, **kwargs: object) -> None:
        raise OSError(errno.EROFS, "Read-only file system")

    monkeypatch.setattr(tempfile, "mkstemp", read_only)
    with pytest.raises(DevSyncError, match="read-only file system") as info:
        write_hosts(hosts, BASE + BLOCK, sudo_hint=HINT)
    assert info.value.fix != HINT


@pytest.fixture
def bind_mounted(tmp_path: Path) -> Iterator[tuple[Path, Path]]:
    """``etc/hosts`` as a bind mount of ``outside/hosts``, as Docker does with /etc/hosts."""
    if os.geteuid() != 0 or shutil.which("mount") is None:
        pytest.skip("a bind mount needs root and mount(8)")
    source = tmp_path / "outside" / "hosts"
    source.parent.mkdir()
    source.write_text(BASE)
    target = tmp_path / "etc" / "hosts"
    target.parent.mkdir()
    target.write_text("placeholder\n")
    proc = subprocess.run(
        ["mount", "--bind", str(source), str(target)], capture_output=True, text=True, check=False
    )
    if proc.returncode != 0:
        pytest.skip(f"mount --bind is not possible here: {proc.stderr.strip()}")
    try:
        yield source, target
    finally:
        subprocess.run(["umount", str(target)], check=False)


def test_a_bind_mounted_file_is_written_in_place(bind_mounted: tuple[Path, Path]) -> None:
    source, target = bind_mounted
    inode = target.stat().st_ino
    result = write_hosts(target, BASE + BLOCK, sudo_hint=HINT)
    backup = target.with_name("hosts.dev-sync.bak")
    assert result == WriteResult(changed=True, path=target, backup=backup, in_place=True)
    assert target.read_text() == BASE + BLOCK
    assert source.read_text() == BASE + BLOCK  # the same file, seen from outside the mount
    assert target.stat().st_ino == inode
    assert backup.read_text() == BASE
    assert _temp_files(target.parent) == []
    # Shorter content: the old tail is cut off.
    result = write_hosts(target, "10.0.0.1 x\n", sudo_hint=HINT)
    assert result.in_place and source.read_text() == "10.0.0.1 x\n"
    assert not write_hosts(target, "10.0.0.1 x\n", sudo_hint=HINT).changed


@pytest.mark.parametrize("code", [errno.EBUSY, errno.EXDEV])
def test_a_refused_rename_falls_back_to_in_place(
    hosts: Path, monkeypatch: pytest.MonkeyPatch, code: int
) -> None:
    def refuse(*args: object, **kwargs: object) -> None:
        raise OSError(code, os.strerror(code))

    inode = hosts.stat().st_ino
    real_replace = os.replace
    monkeypatch.setattr(
        os,
        "replace",
        lambda src, dst: refuse() if Path(dst) == hosts else real_replace(src, dst),
    )
    result = write_hosts(hosts, BASE + BLOCK, sudo_hint=HINT)
    assert result.in_place and result.changed
    assert hosts.read_text() == BASE + BLOCK and hosts.stat().st_ino == inode
    assert stat.S_IMODE(hosts.stat().st_mode) == 0o640
    assert _temp_files(hosts.parent) == []


def test_a_failed_in_place_write_puts_the_old_content_back(
    hosts: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    real_replace, real_fsync = os.replace, os.fsync
    refused: list[bool] = []

    def replace(src: str, dst: str) -> None:
        if Path(dst) == hosts:
            refused.append(True)
            raise OSError(errno.EBUSY, "Device or resource busy")
        real_replace(src, dst)

    def fsync(fd: int) -> None:
        if refused:
            raise OSError(errno.EIO, "Input/output error")
        real_fsync(fd)

    monkeypatch.setattr(os, "replace", replace)
    monkeypatch.setattr(os, "fsync", fsync)
    with pytest.raises(DevSyncError, match="Input/output error"):
        write_hosts(hosts, BASE + BLOCK + "x" * 100, sudo_hint=HINT)
    assert hosts.read_text() == BASE
    assert _temp_files(hosts.parent) == []
