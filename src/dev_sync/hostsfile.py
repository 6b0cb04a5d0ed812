"""A marked block of dev-sync entries in a hosts file, edited without touching the rest.

Each project owns one block::

    # BEGIN dev-sync <project>
    10.0.0.5\tapi.dev.local
    # END dev-sync <project>

The text functions (:func:`apply_block`, :func:`remove_block`, :func:`find_block`)
are pure: every byte outside the project's block is kept as it was (CRLF line
ends, a missing final newline, other projects' blocks, stray markers of other
projects), applying the same entries twice gives identical text, and a damaged
block (a BEGIN without its END, a second BEGIN, an END alone) raises
:class:`ValueError` naming the line instead of guessing.

:func:`write_hosts` puts new text in place: nothing happens when the content is
already right; otherwise the previous content goes to ``<file>.dev-sync.bak``
and the new content is written to a temporary file in the same folder, synced
and renamed over the file (mode and owner kept). A bind-mounted ``/etc/hosts``
(Docker) refuses the rename with EBUSY; the content is then written in place.
A refusal by the system becomes a :class:`DevSyncError` whose fix is the sudo
command the caller passes in.

Read the file with :func:`read_hosts`, not ``Path.read_text``: text mode would
turn CRLF into LF and fail on bytes that are not UTF-8.
"""

from __future__ import annotations

import contextlib
import errno
import ipaddress
import os
import re
import stat
import tempfile
import unicodedata
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from dev_sync.errors import DevSyncError

_ENCODING = "utf-8"
# Bytes that are not UTF-8 (a Latin-1 comment) survive a read and a write unchanged.
_ERRORS = "surrogateescape"
BACKUP_SUFFIX = ".dev-sync.bak"
_TEMP_SUFFIX = ".dev-sync.tmp"
_NEW_FILE_MODE = 0o644
_LABEL = re.compile(r"[a-z0-9](?:[a-z0-9-]{0,61}[a-z0-9])?")


# --- validation -------------------------------------------------------------


def validate_hostname(name: str) -> str:
    """Check a hostname against RFC 1123 and return it in lower case.

    Labels of letters, digits and inner hyphens, 1 to 63 characters each, at most
    253 in all, no trailing dot, a last label that is not all digits (that reads
    as an address), and never ``localhost`` itself.
    """
    if not name:
        raise ValueError("hostname is empty")
    shown = repr(name)
    if any(ch.isspace() for ch in name):
        raise ValueError(f"hostname {shown} contains whitespace")
    if not name.isascii():
        raise ValueError(
            f"hostname {shown} is not ASCII: write its punycode form (xn--...) instead"
        )
    if "_" in name:
        raise ValueError(f"hostname {shown} contains '_': underscores are not allowed (RFC 1123)")
    if name.endswith("."):
        raise ValueError(f"hostname {shown} ends with a dot: write it without the dot")
    if len(name) > 253:
        raise ValueError(f"hostname {shown} is longer than 253 characters")
    lowered = name.lower()
    for label in lowered.split("."):
        if not label:
            raise ValueError(f"hostname {shown} has an empty label (a leading dot or '..')")
        if len(label) > 63:
            raise ValueError(f"hostname {shown} has a label longer than 63 characters")
        if not _LABEL.fullmatch(label):
            bad = sorted({ch for ch in label if not (ch.isalnum() or ch == "-")})
            if bad:
                what = "contains " + ", ".join(repr(ch) for ch in bad)
            else:
                what = f"has the label {label!r}, which starts or ends with '-'"
            raise ValueError(
                f"hostname {shown} {what}: use letters, digits, inner hyphens and dots"
            )
    if lowered.rsplit(".", 1)[-1].isdigit():
        raise ValueError(f"hostname {shown} ends in an all-digit label and reads as an IP address")
    if lowered == "localhost":
        raise ValueError("hostname 'localhost' cannot be remapped: pick another name")
    return lowered


def validate_address(addr: str) -> str:
    """Check an IPv4 or IPv6 host address and return its canonical form."""
    try:
        ip = ipaddress.ip_address(addr)
    except ValueError:
        raise ValueError(f"{addr!r} is not an IPv4 or IPv6 address") from None
    if ip.is_unspecified:
        raise ValueError(f"{addr!r} is the unspecified address, not a host")
    if ip.is_multicast:
        raise ValueError(f"{addr!r} is a multicast address, not a host")
    return str(ip)


def _check_project(project: str) -> None:
    if not project or project != project.strip():
        raise ValueError(f"project name {project!r} is empty or starts or ends with whitespace")
    if any(unicodedata.category(ch) in ("Cc", "Zl", "Zp") for ch in project):
        raise ValueError(f"project name {project!r} contains a control character or line break")


def _markers(project: str) -> tuple[str, str]:
    _check_project(project)
    return f"# BEGIN dev-sync {project}", f"# END dev-sync {project}"


def _normalize(entries: Sequence[tuple[str, str]]) -> list[tuple[str, str]]:
    """Validated entries in order, exact repeats dropped; one name, one address."""
    seen: dict[str, str] = {}
    out: list[tuple[str, str]] = []
    for address, hostname in entries:
        addr = validate_address(address)
        name = validate_hostname(hostname)
        if name in seen:
            if seen[name] != addr:
                raise ValueError(
                    f"hostname {name!r} is given two addresses: {seen[name]} and {addr}"
                )
            continue
        seen[name] = addr
        out.append((addr, name))
    return out


# --- the block in text -------------------------------------------------------


def render_block(project: str, entries: Sequence[tuple[str, str]]) -> str:
    """The block for ``project`` with one ``address<TAB>hostname`` line per entry (LF ends)."""
    begin, end = _markers(project)
    lines = [begin, *(f"{addr}\t{name}" for addr, name in _normalize(entries)), end]
    return "\n".join(lines) + "\n"


def _split(text: str) -> list[str]:
    """Lines with their terminators; only ``\\n`` ends a line (never ``\\x85`` or U+2028)."""
    lines = text.split("\n")
    out = [line + "\n" for line in lines[:-1]]
    if lines[-1]:
        out.append(lines[-1])
    return out


def _ending(line: str) -> str:
    if line.endswith("\r\n"):
        return "\r\n"
    if line.endswith("\n"):
        return "\n"
    return ""


def _content(line: str) -> str:
    """A line as compared with a marker: trailing spaces, tabs and CR do not count."""
    return line.rstrip("\n").rstrip(" \t\r")


def _is_marker(content: str) -> bool:
    return content.startswith(("# BEGIN dev-sync ", "# END dev-sync "))


def _locate(lines: list[str], project: str) -> tuple[int, int] | None:
    """Indexes of the BEGIN and END lines of ``project``'s block, or None if it has none."""
    begin, end = _markers(project)
    start: int | None = None
    found: tuple[int, int] | None = None
    for index, line in enumerate(lines):
        content = _content(line)
        number = index + 1
        if start is not None:
            if content == end:
                found = (start, index)
                start = None
            elif _is_marker(content):
                raise ValueError(
                    f"line {number}: {content!r} is inside the block {begin!r} "
                    f"(line {start + 1}), which has no {end!r} before it"
                )
        elif content == begin:
            if found is not None:
                raise ValueError(
                    f"line {number}: a second {begin!r} (the first block ends on line "
                    f"{found[1] + 1}); remove one of them"
                )
            start = index
        elif content == end:
            raise ValueError(f"line {number}: {end!r} without a {begin!r} before it")
    if start is not None:
        raise ValueError(f"line {start + 1}: {begin!r} has no matching {end!r}")
    return found


def find_block(text: str, project: str) -> list[tuple[str, str]] | None:
    """The ``(address, hostname)`` entries of ``project``'s block, or None if it has none.

    A line naming several hostnames gives one entry per name; blank lines and
    comments are skipped; a line with an address and no name raises ValueError.
    """
    lines = _split(text)
    where = _locate(lines, project)
    if where is None:
        return None
    start, stop = where
    entries: list[tuple[str, str]] = []
    for index in range(start + 1, stop):
        fields = lines[index].split("#", 1)[0].split()
        if not fields:
            continue
        if len(fields) < 2:
            raise ValueError(f"line {index + 1}: {fields[0]!r} has no hostname after it")
        entries.extend((fields[0], name) for name in fields[1:])
    return entries


def apply_block(text: str, project: str, entries: Sequence[tuple[str, str]]) -> str:
    """``text`` with ``project``'s block holding exactly ``entries``.

    An existing block is replaced where it stands, keeping its line ends. Otherwise
    the block is appended with the file's line ends; after a last line without a
    newline, a newline is added first and the block ends without one, so the file
    still ends the way it did and :func:`remove_block` restores it exactly.
    """
    lines = _split(text)
    where = _locate(lines, project)
    block = render_block(project, entries)
    if where is not None:
        start, stop = where
        newline = _ending(lines[start])
        body = block[:-1].replace("\n", newline) + _ending(lines[stop])
        return "".join(lines[:start]) + body + "".join(lines[stop + 1 :])
    newline = next((_ending(line) for line in reversed(lines) if _ending(line)), "\n")
    body = block.replace("\n", newline)
    if not text or text.endswith("\n"):
        return text + body
    return text + newline + body[: -len(newline)]


def remove_block(text: str, project: str) -> str:
    """``text`` without ``project``'s block (unchanged if there is none)."""
    lines = _split(text)
    where = _locate(lines, project)
    if where is None:
        return text
    start, stop = where
    before = "".join(lines[:start])
    after = "".join(lines[stop + 1 :])
    if not _ending(lines[stop]) and start > 0:
        # Block appended after a last line without a newline: drop the newline added then.
        separator = _ending(lines[start])
        if before.endswith(separator):
            before = before[: -len(separator)]
    return before + after


# --- the file ---------------------------------------------------------------


@dataclass(frozen=True)
class WriteResult:
    """What :func:`write_hosts` did."""

    changed: bool  # False: the file already held this content and was not touched
    path: Path  # the file written (symlinks resolved)
    backup: Path | None  # where the previous content was saved, if it was
    in_place: bool  # True: the rename was refused (bind mount) and the file was rewritten


def read_hosts(path: Path) -> str:
    """The file's text exactly as stored (CRLF kept, any bytes kept); "" if it is missing."""
    try:
        data = Path(path).read_bytes()
    except FileNotFoundError:
        return ""
    except OSError as exc:
        raise DevSyncError(
            f"cannot read {path}: {exc.strerror or exc}",
            f"check that {path} is a readable file",
        ) from exc
    return data.decode(_ENCODING, _ERRORS)


def write_hosts(path: Path, new_text: str, *, sudo_hint: str, backup: bool = True) -> WriteResult:
    """Make ``path`` hold ``new_text``: atomically when possible, in place on a mount point.

    ``sudo_hint`` is the exact command that redoes this with sudo (for example
    ``"sudo dev-sync hosts apply --env teammate"``); it is the fix of the
    :class:`DevSyncError` raised when the system refuses the write. On any failure
    the file keeps its previous content and no temporary file is left behind.
    """
    target = Path(os.path.realpath(path))
    data = new_text.encode(_ENCODING, _ERRORS)
    try:
        current: bytes | None = target.read_bytes()
        info: os.stat_result | None = target.stat()
    except FileNotFoundError:
        current, info = None, None
    except OSError as exc:
        raise _write_error(exc, target, sudo_hint) from exc
    if current == data:
        return WriteResult(changed=False, path=target, backup=None, in_place=False)

    saved: Path | None = None
    try:
        if backup and current is not None and info is not None:
            saved = target.with_name(target.name + BACKUP_SUFFIX)
            _atomic_write(saved, current, info)
        try:
            _atomic_write(target, data, info)
        except _RenameRefused:
            # A bind-mounted file (Docker's /etc/hosts) cannot be renamed over.
            _write_in_place(target, data, current)
            return WriteResult(changed=True, path=target, backup=saved, in_place=True)
    except OSError as exc:
        raise _write_error(exc, target, sudo_hint) from exc
    return WriteResult(changed=True, path=target, backup=saved, in_place=False)


class _RenameRefused(OSError):
    """os.replace onto the target failed with EBUSY or EXDEV; the temporary file is gone."""


def _atomic_write(target: Path, data: bytes, like: os.stat_result | None) -> None:
    """Write ``data`` to a temporary file beside ``target``, sync it, rename it over ``target``.

    The mode and owner of ``like`` are given to the new file (the owner only where
    allowed). The temporary file is removed on every failure.
    """
    fd, temp_name = tempfile.mkstemp(
        prefix=f".{target.name}.", suffix=_TEMP_SUFFIX, dir=target.parent
    )
    try:
        try:
            if like is not None:
                os.fchmod(fd, stat.S_IMODE(like.st_mode))
                with contextlib.suppress(PermissionError):
                    os.fchown(fd, like.st_uid, like.st_gid)
            else:
                os.fchmod(fd, _NEW_FILE_MODE)
            view = memoryview(data)
            while view:
                view = view[os.write(fd, view) :]
            os.fsync(fd)
        finally:
            os.close(fd)
        try:
            os.replace(temp_name, target)
        except OSError as exc:
            if exc.errno in (errno.EBUSY, errno.EXDEV):
                raise _RenameRefused(exc.errno, exc.strerror) from exc
            raise
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(temp_name)
        raise
    _sync_folder(target.parent)


def _write_in_place(target: Path, data: bytes, previous: bytes | None) -> None:
    """Overwrite ``target`` through its open file; on failure put ``previous`` back."""
    with open(target, "r+b") as handle:
        try:
            handle.write(data)
            handle.truncate()
            handle.flush()
            os.fsync(handle.fileno())
        except OSError:
            if previous is not None:
                with contextlib.suppress(OSError):
                    handle.seek(0)
                    handle.write(previous)
                    handle.truncate()
                    handle.flush()
                    os.fsync(handle.fileno())
            raise


def _sync_folder(folder: Path) -> None:
    """Make a rename durable; some file systems cannot sync a folder, which is fine."""
    with contextlib.suppress(OSError):
        fd = os.open(folder, os.O_RDONLY | os.O_DIRECTORY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


def _write_error(exc: OSError, target: Path, sudo_hint: str) -> DevSyncError:
    """The user-facing error for a refused write; ``target`` was left as it was."""
    reason = exc.strerror or str(exc) or type(exc).__name__
    if isinstance(exc, PermissionError) or exc.errno in (errno.EACCES, errno.EPERM):
        if _is_root():
            return DevSyncError(
                f"cannot write {target} even as root ({reason}); it was not changed",
                f"check whether it is immutable (lsattr {target}; chattr -i {target} "
                "clears that) or protected by a security policy",
            )
        return DevSyncError(
            f"no permission to write {target} ({reason}); it was not changed", sudo_hint
        )
    if exc.errno == errno.EROFS:
        return DevSyncError(
            f"{target} is on a read-only file system; it was not changed",
            "add the entries where this system manages its hosts file",
        )
    return DevSyncError(f"cannot write {target}: {reason}; it was not changed")


def _is_root() -> bool:
    geteuid = getattr(os, "geteuid", None)
    return geteuid is not None and geteuid() == 0
