"""Which paths are synced: one rule set for the watcher and for rsync.

The watcher asks :meth:`RuleSet.is_excluded` about each event and never watches
inside an excluded directory; rsync gets :meth:`RuleSet.rsync_filter_rules` as a
merge file. Both come from the same parsed patterns, so a path the watcher
ignores is a path rsync neither sends nor deletes.

Semantics are git's ``.gitignore`` semantics, reimplemented rather than
delegated to pathspec: pathspec answers "does this path or anything above it
match", while git (and rsync) decide per path component with several files of
different precedence, which is what the two sides must agree on.

Precedence, highest first:

1. ``INTERNAL_EXCLUDES`` and ``DEFAULT_EXCLUDES``: always excluded, no ``!``
   can bring them back.
2. The user's ``exclude`` list, anchored at the root; within it the last
   matching pattern wins, and if one matches the ``.gitignore`` files are not
   consulted (like ``git ls-files -x``).
3. ``.gitignore`` files, the deepest directory first; within a file the last
   matching pattern wins.

A path inside an excluded directory is excluded whatever the rules say about
the path itself; ``.gitignore`` files in excluded directories are never read.

Matching works on bytes (``os.fsencode`` of the path), as git and rsync do:
``?`` matches one byte, not one character, and undecodable names work.
Each ``exclude`` entry is read like one line of a .gitignore (so ``#`` starts
a comment and trailing spaces go), unlike ``git -x``, which takes it verbatim.

Where this knowingly differs from git:

- Only the .gitignore files in the tree count, not ``.git/info/exclude`` or
  ``core.excludesFile``, which are personal and may differ between teammates.
- The index is not consulted: a tracked file that matches a rule is excluded,
  where git would keep tracking it.
- Matching is case-sensitive, as rsync's is, even where git has
  ``core.ignorecase`` (macOS, Windows).
- A *file* named ``.git`` (a submodule's or worktree's pointer) is synced;
  git never lists one. Submodule contents also see the outer repository's rules.

For rsync callers: the rules protect excluded receiver files only because
plain ``-`` rules apply on both sides, so never add ``--delete-excluded``. And
rsync judges ``--files-from`` names one by one without looking at their parent
directories, so such lists must be filtered with :meth:`RuleSet.is_excluded`.
"""

from __future__ import annotations

import enum
import itertools
import os
import re
import sys
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

# Version control, and the folders package managers fill on the remote
# (npm, pip's virtualenv, bundler): never sent, never deleted there.
DEFAULT_EXCLUDES: tuple[str, ...] = (".git/", "node_modules/", ".venv/", "**/vendor/bundle/")
# Remote-side bookkeeping that is never synced and never deleted, anchored at the root:
INTERNAL_EXCLUDES: tuple[str, ...] = ("/.dev-sync-root", "/.dev-sync/")

RULE_FILE = ".gitignore"

_SLASH = ord("/")
_BACKSLASH = ord("\\")
_STAR = ord("*")
_SPACE = ord(" ")
_NL = ord("\n")
_CR = ord("\r")
# Bytes a file name can hold: anything but NUL and "/".
_NAME_BYTES = frozenset(range(1, 256)) - {_SLASH}
# Bytes rsync reads as the end of a merge-file line; they cannot appear raw in a rule.
_LINE_ENDS = frozenset({_NL, _CR})
# A rule holding one of these is matched with wildmatch (backslash escapes work);
# any other rule is compared literally, backslashes included.
_RSYNC_WILDCARDS = frozenset(b"*?[")
_RSYNC_SPECIAL = _RSYNC_WILDCARDS | {_BACKSLASH}
# Characters that need a backslash inside a bracket expression.
_BRACKET_SPECIAL = frozenset(b"\\]-[!^")


def _ascii_set(*ranges: tuple[int, int]) -> frozenset[int]:
    return frozenset(b for lo, hi in ranges for b in range(lo, hi + 1))


# Git's character classes (its own ASCII-only ctype table, see git's ctype.c):
# note that [:space:] is tab, LF, CR and space, without VT and FF.
_CLASSES: dict[bytes, frozenset[int]] = {
    b"alnum": _ascii_set((0x30, 0x39), (0x41, 0x5A), (0x61, 0x7A)),
    b"alpha": _ascii_set((0x41, 0x5A), (0x61, 0x7A)),
    b"blank": frozenset(b" \t"),
    b"cntrl": _ascii_set((0x00, 0x1F), (0x7F, 0x7F)),
    b"digit": _ascii_set((0x30, 0x39)),
    b"graph": _ascii_set((0x21, 0x7E)),
    b"lower": _ascii_set((0x61, 0x7A)),
    b"print": _ascii_set((0x20, 0x7E)),
    b"punct": _ascii_set((0x21, 0x2F), (0x3A, 0x40), (0x5B, 0x60), (0x7B, 0x7E)),
    b"space": frozenset(b"\t\n\r "),
    b"upper": _ascii_set((0x41, 0x5A)),
    b"xdigit": _ascii_set((0x30, 0x39), (0x41, 0x46), (0x61, 0x66)),
}


class _Wild(enum.Enum):
    STAR = "*"  # any run of bytes within one path component
    ANY = "?"  # one byte other than "/"
    DSTAR = "**"  # any run of bytes, "/" included (only at component boundaries)
    ANYDIRS = "**/"  # zero or more whole directories


# A pattern token: a literal byte, a wildcard, or a bracket expression as the set
# of bytes it matches ("/" never included).
_Token = int | _Wild | frozenset[int]


@dataclass(frozen=True)
class _Pattern:
    """One gitignore line, reduced to tokens anchored at its file's directory.

    Floating patterns (no slash) are stored as ``**/pattern``, which is the same
    thing: git matches them against the last component only.
    """

    negated: bool
    dir_only: bool
    tokens: tuple[_Token, ...]
    regex: re.Pattern[bytes]

    def matches(self, rel: bytes, is_dir: bool) -> bool:
        """Whether this pattern matches ``rel`` (relative to the pattern's directory)."""
        if self.dir_only and not is_dir:
            return False
        return self.regex.fullmatch(rel) is not None

    @property
    def name_only(self) -> bool:
        """Whether only the last component decides (``**/`` then no "/" at all), as for
        most lines of a .gitignore: ``*.log``, ``dist/``."""
        rest = self.tokens[1:]
        return (bool(rest) and self.tokens[0] is _Wild.ANYDIRS
                and all(t is not _Wild.ANYDIRS and t is not _Wild.DSTAR and t != _SLASH
                        for t in rest))


class _Rules:
    """The patterns of one source (a .gitignore, the user's list), matched together.

    One regular expression per kind of path holds every pattern as an
    alternative, the last line first, so the alternative that matches is the
    line that decides (git: the last matching line wins). A changed file is
    judged against every list on its way: one C-level match per list instead
    of a Python call per line. Lines that only look at the name are matched
    against the last component, which spares the regex from trying every "/".
    """

    __slots__ = ("_by_type", "patterns")

    def __init__(self, patterns: Sequence[_Pattern]) -> None:
        self.patterns = tuple(patterns)
        self._by_type = (self._compile(False), self._compile(True))

    def __bool__(self) -> bool:
        return bool(self.patterns)

    def _compile(self, is_dir: bool) -> tuple[_Alternatives, _Alternatives]:
        usable = [i for i, p in enumerate(self.patterns) if is_dir or not p.dir_only]
        names = [i for i in usable if self.patterns[i].name_only]
        paths = [i for i in usable if not self.patterns[i].name_only]
        return (self._alternatives(names, True), self._alternatives(paths, False))

    def _alternatives(self, indices: list[int], names: bool) -> _Alternatives:
        if not indices:
            return None
        order = tuple(reversed(indices))
        sources = [(_regex(self.patterns[i].tokens[1:]) if names else self.patterns[i].regex)
                   .pattern for i in order]
        return re.compile(b"|".join(b"(" + src + b")" for src in sources), re.DOTALL), order

    def last_match(self, rel: bytes, is_dir: bool) -> _Pattern | None:
        """The line that decides for ``rel`` (relative to the list's directory), if any."""
        names, paths = self._by_type[is_dir]
        best = -1
        if names is not None:
            found = names[0].fullmatch(rel.rpartition(b"/")[2])
            if found is not None and found.lastindex:
                best = names[1][found.lastindex - 1]
        if paths is not None:
            found = paths[0].fullmatch(rel)
            if found is not None and found.lastindex:
                best = max(best, paths[1][found.lastindex - 1])
        return self.patterns[best] if best >= 0 else None


# A compiled alternation and, per group, the index of its pattern.
_Alternatives = tuple[re.Pattern[bytes], tuple[int, ...]] | None


def _trim_trailing_spaces(line: bytes) -> bytes:
    """Drop unescaped trailing spaces, exactly as git's trim_trailing_spaces() does."""
    last_space: int | None = None
    i = 0
    while i < len(line):
        c = line[i]
        if c == _SPACE:
            if last_space is None:
                last_space = i
        elif c == _BACKSLASH:
            i += 1
            if i >= len(line):
                return line
            last_space = None
        else:
            last_space = None
        i += 1
    return line if last_space is None else line[:last_space]


def _parse_bracket(p: bytes, i: int) -> tuple[frozenset[int], int] | None:
    """Parse the bracket expression starting at ``p[i] == '['``, as git's wildmatch does.

    Returns the set of bytes it matches and the index after the closing ``]``,
    or None when it is malformed (git then lets the whole pattern match nothing).
    """
    n = len(p)
    i += 1
    negated = i < n and p[i] in b"!^"
    if negated:
        i += 1
    matched: set[int] = set()
    prev = 0
    first = True
    while True:
        if i >= n:
            return None
        c = p[i]
        if c == ord("]") and not first:
            break
        first = False
        if c == _BACKSLASH:
            i += 1
            if i >= n:
                return None
            c = p[i]
            matched.add(c)
        elif c == ord("-") and prev and i + 1 < n and p[i + 1] != ord("]"):
            i += 1
            hi = p[i]
            if hi == _BACKSLASH:
                i += 1
                if i >= n:
                    return None
                hi = p[i]
            matched.update(range(prev, hi + 1))
            c = 0  # a range cannot start another range
        elif c == ord("[") and i + 1 < n and p[i + 1] == ord(":"):
            end = p.find(b"]", i + 2)
            if end < 0:
                return None
            name = p[i + 2 : end]
            if not name.endswith(b":"):
                matched.add(c)  # not a class after all: a literal "["
            else:
                members = _CLASSES.get(name[:-1])
                if members is None:
                    return None
                matched.update(members)
                i = end
                c = 0
        else:
            matched.add(c)
        prev = c
        i += 1
    members = _NAME_BYTES - matched if negated else _NAME_BYTES & matched
    return frozenset(members), i + 1


def _tokenize(body: bytes) -> list[_Token] | None:
    """Tokenize an anchored pattern body; None if git could never match it.

    A run of stars is ``**`` only when it fills a whole component. Git also
    treats it so when it is the first wildcard after a literal prefix
    (``a/b**/c``), because match_pathname() strips that prefix before calling
    wildmatch; we copy that so the two agree.
    """
    specials = [k for k, ch in enumerate(body) if ch in b"*?[\\"]
    first_special = specials[0] if specials else len(body)
    tokens: list[_Token] = []
    i, n = 0, len(body)
    while i < n:
        c = body[i]
        if c == _BACKSLASH:
            if i + 1 >= n:
                return None
            tokens.append(body[i + 1])
            i += 2
        elif c == _STAR:
            j = i
            while j < n and body[j] == _STAR:
                j += 1
            whole = j - i >= 2 and (i == first_special or body[i - 1] == _SLASH)
            if whole and j < n and body[j] == _SLASH:
                tokens.append(_Wild.ANYDIRS)
                j += 1
            elif whole and (j == n or body[j : j + 2] == b"\\/"):
                # Before an escaped "/" git skips its zero-directories shortcut,
                # so the "/" must match one: plain "**" then a literal "/".
                tokens.append(_Wild.DSTAR)
            else:
                tokens.append(_Wild.STAR)
            i = j
        elif c == ord("?"):
            tokens.append(_Wild.ANY)
            i += 1
        elif c == ord("["):
            parsed = _parse_bracket(body, i)
            if parsed is None:
                return None
            members, i = parsed
            tokens.append(members)
        else:
            tokens.append(c)
            i += 1
    return tokens


def _collapse_anydirs(tokens: list[_Token]) -> list[_Token]:
    """``**/**/`` means the same as ``**/``; collapsing keeps rsync variants few."""
    out: list[_Token] = []
    for t in tokens:
        if not (t is _Wild.ANYDIRS and out and out[-1] is t):
            out.append(t)
    return out


def _byte_class(members: frozenset[int]) -> bytes:
    return b"[" + b"".join(b"\\x%02x" % b for b in sorted(members)) + b"]"


def _regex(tokens: Sequence[_Token]) -> re.Pattern[bytes]:
    parts: list[bytes] = []
    for t in tokens:
        if t is _Wild.ANYDIRS:
            parts.append(b"(?:.*/)?")
        elif t is _Wild.DSTAR:
            parts.append(b".*")
        elif t is _Wild.STAR:
            parts.append(b"[^/]*")
        elif t is _Wild.ANY:
            parts.append(b"[^/]")
        elif isinstance(t, frozenset):
            parts.append(_byte_class(t))
        else:
            parts.append(re.escape(bytes([t])))
    return re.compile(b"".join(parts), re.DOTALL)


def _parse_line(line: bytes) -> _Pattern | None:
    """One .gitignore line (comment and CR already dropped) to a pattern, or None."""
    line = _trim_trailing_spaces(line)
    negated = line.startswith(b"!")
    if negated:
        line = line[1:]
    dir_only = line.endswith(b"/")
    if dir_only:
        line = line[:-1]
    floating = b"/" not in line
    if line.startswith(b"/"):
        line = line[1:]
    if not line:
        return None
    tokens = _tokenize(line)
    if tokens is None or frozenset() in tokens:  # e.g. "[/]": nothing can match
        return None
    if floating:
        # On a single component "**" is just "*"; rsync would let it cross "/".
        tokens = [_Wild.STAR if t is _Wild.DSTAR else t for t in tokens]
        tokens = [_Wild.ANYDIRS, *tokens]
    tokens = _collapse_anydirs(tokens)
    return _Pattern(negated, dir_only, tuple(tokens), _regex(tokens))


def _parse_lines(lines: Iterable[bytes]) -> list[_Pattern]:
    patterns = []
    for line in lines:
        if line.endswith(b"\r"):
            line = line[:-1]
        if not line or line.startswith(b"#"):
            continue
        pattern = _parse_line(line)
        if pattern is not None:
            patterns.append(pattern)
    return patterns


def _parse_file(data: bytes) -> list[_Pattern]:
    """Parse .gitignore contents the way git's add_patterns_from_buffer() does."""
    data = data.removeprefix(b"\xef\xbb\xbf")
    return _parse_lines(data.split(b"\n"))


def _depth(rel_dir: str) -> int:
    return rel_dir.count("/") + 1 if rel_dir else 0


# What os.fsencode does, without its call per path.
_FS_ENCODING = sys.getfilesystemencoding()
_FS_ERRORS = sys.getfilesystemencodeerrors()

# Rules that no .gitignore or user pattern can override.
_FIXED_PATTERNS = _Rules(
    _parse_lines(os.fsencode(p) for p in INTERNAL_EXCLUDES + DEFAULT_EXCLUDES)
)


class RuleSet:
    """The ignore rules of one tree: defaults, the user's excludes, and .gitignore files.

    Construction does not walk the tree, because the watcher loads rule files as
    it discovers directories; use :func:`walk_dirs` or :meth:`reload` to load them.
    """

    def __init__(self, root: Path, exclude: Sequence[str] = (), gitignore: bool = True) -> None:
        self.root = root
        self.exclude = tuple(exclude)
        self.gitignore = gitignore
        # Each entry is one config line; a newline inside one would be two lines in a file.
        self._user = _Rules(_parse_lines(
            line for entry in self.exclude for line in os.fsencode(entry).split(b"\n")
        ))
        # Directory (relative, "" for the root) -> patterns of its .gitignore.
        self._files: dict[str, _Rules] = {}
        # The same, deepest first, as (b"<dir>/", rules); b"" for the root's.
        self._by_depth: list[tuple[bytes, _Rules]] | None = None
        # Folder -> excluded by its own rules (ancestors aside); see is_excluded.
        self._folder_cache: dict[str, bool] = {}
        # Path -> whole decision, as a file and as a folder: a changed file is
        # judged by the watcher and again by the engine before it is sent.
        self._decided: tuple[dict[str, bool], dict[str, bool]] = ({}, {})

    def load_dir(self, rel_dir: str, *, included: bool = False) -> None:
        """Read (or re-read) ``<root>/<rel_dir>/.gitignore``, or forget it if it is gone.

        Refuses directories that are excluded, because git never reads rule files
        there and a rule read from one could re-include what git keeps out
        (``included=True``: the caller, a walk, has just checked that).
        Like git, a .gitignore that is a symlink is not followed.
        """
        if self._files.pop(rel_dir, None) is not None:
            self._forget_decisions()
        if not self.gitignore or (
            rel_dir and not included and self.is_excluded(rel_dir, is_dir=True)
        ):
            return
        path = os.path.join(self.root, rel_dir, RULE_FILE)  # no pathlib: walks call this a lot
        try:
            fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC)
        except OSError:
            return
        try:
            with open(fd, "rb") as f:
                data = f.read()
        except OSError:  # a directory named .gitignore, or it vanished mid-read
            return
        self._files[rel_dir] = _Rules(_parse_file(data))
        self._forget_decisions()

    def _forget_decisions(self) -> None:
        """The rules changed: decisions below the folder may too. (Only then: a burst
        that makes new folders, each loaded here, keeps its cached decisions.)"""
        self._by_depth = None
        self._folder_cache.clear()
        for decided in self._decided:
            decided.clear()

    def is_excluded(self, rel: str, is_dir: bool | None) -> bool:
        """Whether ``rel`` (root-relative POSIX path) is excluded, itself or by an ancestor.

        ``is_dir`` is about ``rel`` itself; a symlink to a directory is not a
        directory (git and rsync --links do not follow it either). ``None``
        means the type is unknown (the path is gone): then it counts as
        excluded if it would be either way, since treating an excluded path as
        included could delete what the remote must keep.
        """
        if not rel:
            return False
        if is_dir is None:
            return self.is_excluded(rel, False) or self.is_excluded(rel, True)
        decided = self._decided[is_dir]
        known = decided.get(rel)
        if known is not None:
            return known
        if len(decided) > 10_000:
            decided.clear()
        cache = self._folder_cache
        cut = rel.find("/")
        while cut != -1:
            # Folders repeat from path to path (a burst lands in a few of them).
            key = rel[:cut]
            excluded = cache.get(key)
            if excluded is None:
                if len(cache) > 100_000:
                    cache.clear()
                excluded = cache[key] = self._excluded_itself(key, True)
            if excluded:
                decided[rel] = True
                return True
            cut = rel.find("/", cut + 1)
        decided[rel] = excluded = self._excluded_itself(rel, is_dir)
        return excluded

    def is_excluded_child(self, rel: str, is_dir: bool) -> bool:
        """:meth:`is_excluded` for a path whose parent is known to be included.

        A walk that prunes as it goes knows that already; judging only the last
        component makes walking a tree several times cheaper.
        """
        return bool(rel) and self._excluded_itself(rel, is_dir)

    def _excluded_itself(self, rel: str, is_dir: bool) -> bool:
        """The decision for one path, its ancestors assumed included."""
        path = rel.encode(_FS_ENCODING, _FS_ERRORS)
        if _FIXED_PATTERNS.last_match(path, is_dir) is not None:
            return True
        pattern = self._user.last_match(path, is_dir)
        if pattern is not None:
            return not pattern.negated
        # The .gitignore files of the folders above, deepest first. With fewer of
        # them than folders above (most trees have one or a handful), trying each
        # is quicker than looking up every folder.
        by_depth = self._by_depth
        if by_depth is None:
            by_depth = self._by_depth = [
                (os.fsencode(d + "/") if d else b"", self._files[d])
                for d in sorted(self._files, key=lambda d: -_depth(d))]
        if len(by_depth) <= path.count(b"/") + 1:
            for prefix, rules in by_depth:
                if path.startswith(prefix):
                    pattern = rules.last_match(path[len(prefix):], is_dir)
                    if pattern is not None:
                        return not pattern.negated
            return False
        end = len(rel)
        while end != -1:
            end = rel.rfind("/", 0, end)
            found = self._files.get(rel[:end] if end != -1 else "")
            if found:
                sub = rel[end + 1:].encode(_FS_ENCODING, _FS_ERRORS)
                pattern = found.last_match(sub, is_dir)
                if pattern is not None:
                    return not pattern.negated
        return False

    def rsync_filter_rules(self) -> list[str]:
        """rsync filter rules, first match wins: for a merge file (``--filter='merge FILE'``)
        or as one ``--filter=RULE`` argument each.

        The order turns git's precedence into rsync's: fixed excludes, then the
        user's list reversed, then .gitignore files deepest first, each reversed.
        Every rule is anchored at its file's directory so it cannot touch paths
        outside it. Excluded paths are protected on the receiver because plain
        ``-`` rules apply to both sides; never combine these with
        ``--delete-excluded``.

        Lines may hold raw non-UTF-8 bytes as surrogate escapes: write them with
        :func:`os.fsencode` (or :meth:`write_rsync_filter`), never as UTF-8 text.
        """
        lines: list[str] = []
        for pattern in _FIXED_PATTERNS.patterns:
            lines.extend(_rsync_rules(pattern, ""))
        for pattern in reversed(self._user.patterns):
            lines.extend(_rsync_rules(pattern, ""))
        for rel_dir in sorted(self._files, key=lambda d: (-_depth(d), d)):
            for pattern in reversed(self._files[rel_dir].patterns):
                lines.extend(_rsync_rules(pattern, rel_dir))
        return lines

    def write_rsync_filter(self, path: Path) -> None:
        """Write :meth:`rsync_filter_rules` to ``path`` as the bytes rsync expects."""
        path.write_bytes(b"".join(os.fsencode(line) + b"\n" for line in self.rsync_filter_rules()))

    def rule_files(self) -> list[str]:
        """Root-relative paths of the .gitignore files currently loaded."""
        return sorted(f"{d}/{RULE_FILE}" if d else RULE_FILE for d in self._files)

    @staticmethod
    def is_rule_file(rel: str) -> bool:
        """Whether a change to ``rel`` changes the rules (then call :meth:`reload`)."""
        return rel.rsplit("/", 1)[-1] == RULE_FILE

    def reload(self) -> RuleSet:
        """A fresh rule set with the same settings and every reachable .gitignore loaded.

        A changed rule file can include or exclude whole subtrees (and the rule
        files inside them), so rebuilding is simpler and safer than patching.
        """
        fresh = RuleSet(self.root, self.exclude, self.gitignore)
        for _ in walk_dirs(fresh):
            pass
        return fresh


def _rsync_set(members: frozenset[int]) -> bytes:
    """A bracket expression for ``members``, or b"" if it needs splitting.

    Only range ends are written out, so LF and CR (which end a merge-file line)
    are fine inside a range but not at its ends; then the negated form is tried.
    """
    if members == _NAME_BYTES:
        return b"?"
    for negate, chosen in ((False, members), (True, frozenset(range(1, 256)) - members)):
        runs: list[tuple[int, int]] = []
        for b in sorted(chosen):
            if runs and runs[-1][1] == b - 1:
                runs[-1] = (runs[-1][0], b)
            else:
                runs.append((b, b))
        if any(lo in _LINE_ENDS or hi in _LINE_ENDS for lo, hi in runs):
            continue
        body = b"".join(
            _bracket_char(lo) if lo == hi else _bracket_char(lo) + b"-" + _bracket_char(hi)
            for lo, hi in runs
        )
        return b"[" + (b"!" if negate else b"") + body + b"]"
    return b""


def _bracket_char(b: int) -> bytes:
    return (b"\\" if b in _BRACKET_SPECIAL else b"") + bytes([b])


def _split_set(members: frozenset[int]) -> list[frozenset[int]]:
    """Split a set rsync cannot write as one bracket into sets it can (rare: CR in a class)."""
    if _rsync_set(members):
        return [members]
    parts = [members - _LINE_ENDS] + [frozenset({b}) for b in sorted(members & _LINE_ENDS)]
    return [p for p in parts if p]


def _variants(tokens: Sequence[_Token]) -> Iterator[list[_Token]]:
    """rsync spellings whose union matches what ``tokens`` match in git.

    rsync's ``**/`` needs at least one directory where git's also matches none,
    so each ``**/`` is tried both present and dropped.
    """
    choices: list[list[list[_Token]]] = []
    for t in tokens:
        if t is _Wild.ANYDIRS:
            choices.append([[_Wild.DSTAR, _SLASH], []])
        elif isinstance(t, frozenset):
            choices.append([[part] for part in _split_set(t)])
        else:
            choices.append([[t]])
    for combo in itertools.product(*choices):
        yield [t for group in combo for t in group]


def _has_empty_component(tokens: Sequence[_Token]) -> bool:
    return tokens[-1] == _SLASH or any(
        a == _SLASH and b == _SLASH for a, b in itertools.pairwise(tokens)
    )


def _rsync_rules(pattern: _Pattern, rel_dir: str) -> Iterator[str]:
    """The rsync rules for one pattern of the .gitignore in ``rel_dir``, anchored there."""
    prefix = [_SLASH, *os.fsencode(rel_dir), _SLASH] if rel_dir else [_SLASH]
    action = b"+ " if pattern.negated else b"- "
    seen: set[bytes] = set()
    for variant in _variants(pattern.tokens):
        tokens = prefix + variant
        # "a//b" or "a/" match no path, in git as in rsync; and a trailing "/"
        # would be read by rsync as its directory-only marker.
        if _has_empty_component(tokens):
            continue
        rule = action + _render(tokens) + (b"/" if pattern.dir_only else b"")
        if rule not in seen:
            seen.add(rule)
            yield os.fsdecode(rule)


def _render(tokens: Sequence[_Token]) -> bytes:
    """Spell tokens in rsync's wildmatch syntax.

    rsync honours backslash escapes only in rules that contain a wildcard
    character (``*?[``), and compares other rules literally; so literals are
    escaped only when the rule is a wildcard rule anyway. LF and CR end a
    merge-file line, so they are written as brackets, making the rule a wildcard rule.
    """
    wild = any(not isinstance(t, int) or t in _RSYNC_WILDCARDS | _LINE_ENDS for t in tokens)
    out: list[bytes] = []
    for t in tokens:
        if isinstance(t, _Wild):
            out.append(t.value.encode())
        elif isinstance(t, frozenset):
            out.append(_rsync_set(t))
        elif t in _LINE_ENDS:
            out.append(_rsync_set(frozenset({t})))  # cannot be written raw
        elif wild and t in _RSYNC_SPECIAL:
            out.append(b"\\" + bytes([t]))
        else:
            out.append(bytes([t]))
    return b"".join(out)


def walk_dirs(rules: RuleSet) -> Iterator[str]:
    """Yield every non-excluded directory under ``rules.root`` ('' first), top-down.

    Pruned, because node_modules and .git can hold more directories than the
    rest of the tree together. A directory's .gitignore is loaded before its
    children are judged, since it may exclude them. Symlinks to directories are
    not followed (git and rsync --links treat them as files). A directory that
    vanishes or cannot be read is skipped: the tree changes while we walk it.
    """
    root = str(rules.root)
    stack = [""]
    while stack:
        rel = stack.pop()
        has_rules = False
        subdirs = []
        try:
            with os.scandir(os.path.join(root, rel)) as it:
                for entry in it:
                    if _is_real_dir(entry):
                        subdirs.append(entry.name)
                    elif entry.name == RULE_FILE:
                        has_rules = True
        except OSError:
            continue
        subdirs.sort()
        # Most folders have no .gitignore: skip the open() that would fail
        # (unless one was read here before and must now be forgotten).
        if has_rules or rel in rules._files:
            rules.load_dir(rel, included=True)
        yield rel
        for name in reversed(subdirs):
            child = f"{rel}/{name}" if rel else name
            if not rules.is_excluded_child(child, is_dir=True):
                stack.append(child)


def _is_real_dir(entry: os.DirEntry[str]) -> bool:
    try:
        return entry.is_dir(follow_symlinks=False)
    except OSError:
        return False
