"""Ignore rules: git's semantics, and rsync agreeing with them on real trees.

The agreement tests are the ones that matter: they run the real rsync with the
generated merge file and compare what lands with what :meth:`RuleSet.is_excluded`
promised, and then check that ``--delete`` leaves excluded receiver content
alone. Where git is installed, ``git ls-files --others`` is the oracle for the
semantics themselves.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import tempfile
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from dev_sync.ignore import (
    INTERNAL_EXCLUDES,
    RuleSet,
    _parse_lines,
    _Rules,
    walk_dirs,
)


@dataclass(frozen=True)
class Link:
    """A symlink in a tree spec."""

    target: str


# A directory: names to file contents (str, written with os.fsencode), dirs or links.
Tree = Mapping[str, "str | Link | Tree"]


def make_tree(root: Path, tree: Tree) -> None:
    root.mkdir(parents=True, exist_ok=True)
    for name, value in tree.items():
        path = root / name
        if isinstance(value, str):
            path.write_bytes(os.fsencode(value))
        elif isinstance(value, Link):
            path.symlink_to(value.target)
        else:
            make_tree(path, value)


def scan(root: Path) -> tuple[set[str], set[str]]:
    """Non-directories and directories ('' for the root) under ``root``, links not followed."""
    files: set[str] = set()
    dirs: set[str] = {""}
    stack = [""]
    while stack:
        rel = stack.pop()
        with os.scandir(root / rel) as it:
            for entry in it:
                child = f"{rel}/{entry.name}" if rel else entry.name
                if entry.is_dir(follow_symlinks=False):
                    dirs.add(child)
                    stack.append(child)
                else:
                    files.add(child)
    return files, dirs


def expected(rules: RuleSet) -> tuple[set[str], set[str]]:
    """What should be synced, by walk_dirs and is_excluded alone."""
    files: set[str] = set()
    dirs: set[str] = set()
    for rel in walk_dirs(rules):
        dirs.add(rel)
        with os.scandir(rules.root / rel) as it:
            for entry in it:
                child = f"{rel}/{entry.name}" if rel else entry.name
                if not entry.is_dir(follow_symlinks=False) and not rules.is_excluded(child, False):
                    files.add(child)
    return files, dirs


def rules_with(tmp_path: Path, gitignore: str, exclude: Sequence[str] = ()) -> RuleSet:
    """A rule set with one root .gitignore; the paths asked about need not exist."""
    (tmp_path / ".gitignore").write_bytes(os.fsencode(gitignore))
    rules = RuleSet(tmp_path, exclude)
    rules.load_dir("")
    return rules


# --------------------------------------------------------------------------
# is_excluded: one feature at a time

SYNTAX_CASES: list[tuple[str, str, bool, bool]] = [
    # (root .gitignore, path, is_dir, excluded)
    ("*.log", "a.log", False, True),
    ("*.log", "deep/er/a.log", False, True),
    ("*.log", "a.txt", False, False),
    ("*.log", "a.log.txt", False, False),
    ("#comment", "#comment", False, False),
    ("\\#hash", "#hash", False, True),
    (" #not-a-comment", " #not-a-comment", False, True),
    ("\\!bang", "!bang", False, True),
    ("*.log\n!keep.log", "keep.log", False, False),
    ("*.log\n!keep.log", "x.log", False, True),
    ("!keep.log\n*.log", "keep.log", False, True),  # the last match wins
    ("foo  ", "foo", False, True),  # unescaped trailing spaces are dropped
    ("foo  ", "foo ", False, False),
    ("foo\\ ", "foo ", False, True),  # an escaped one is kept
    ("foo\\ ", "foo", False, False),
    ("foo \\ ", "foo  ", False, True),
    ("foo\r", "foo", False, True),  # CRLF line endings
    ("\ufeffbom", "bom", False, True),  # a UTF-8 byte order mark is skipped
    ("build/", "build", True, True),
    ("build/", "build", False, False),  # dir-only does not match a file
    ("build/", "src/build", True, True),
    ("build/", "build/x", False, True),  # inside an excluded directory
    ("/build", "build", False, True),  # a leading slash anchors
    ("/build", "src/build", False, False),
    ("src/gen", "src/gen", False, True),  # so does a middle slash
    ("src/gen", "x/src/gen", False, False),
    ("src/*.c", "src/a.c", False, True),
    ("src/*.c", "src/sub/a.c", False, False),  # "*" does not cross "/"
    ("**/gen", "gen", True, True),
    ("**/gen", "a/b/gen", True, True),
    ("out/**", "out", True, False),
    ("out/**", "out/x", False, True),
    ("out/**", "out/x/y", False, True),
    ("a/**/b", "a/b", False, True),  # zero directories
    ("a/**/b", "a/x/y/b", False, True),
    ("a/**/b", "ab", False, False),
    ("a/**/b", "a/xb", False, False),
    ("**\\/x", "x", False, False),  # before an escaped "/", "**" matches at least one dir
    ("**\\/x", "d/x", False, True),
    ("a/**\\/b", "a/b", False, False),
    ("a/**\\/b", "a/d/e/b", False, True),
    ("a\\/b", "a/b", False, True),
    ("**foo", "xfoo", False, True),  # not a whole component: same as "*"
    ("x/**foo", "x/a/foo", False, False),
    ("x/a**/b", "x/a/y/z/b", False, True),  # git's prefix quirk: "**" after a literal prefix
    ("?.txt", "a.txt", False, True),
    ("?.txt", "ab.txt", False, False),
    ("?.txt", "\u00e9.txt", False, False),  # "?" is one byte, "é" is two in UTF-8
    ("??.txt", "\u00e9.txt", False, True),
    ("[ab].txt", "a.txt", False, True),
    ("[ab].txt", "c.txt", False, False),
    ("[!ab].txt", "c.txt", False, True),
    ("[^ab].txt", "a.txt", False, False),
    ("[a-c]x", "bx", False, True),
    ("[]]x", "]x", False, True),
    ("[[:digit:]]*", "1st", False, True),
    ("[[:digit:]]*", "first", False, False),
    ("a[[:space:]]b", "a b", False, True),
    ("a[[:space:]]b", "a\vb", False, False),  # git's [:space:] has no VT
    ("a[[:bogus:]]b", "a b", False, False),  # a malformed class matches nothing
    ("[abc", "[abc", False, False),  # so does an unterminated bracket
    ("\\[x]", "[x]", False, True),
    ("[x]", "x", False, True),
    ("a\\*b", "a*b", False, True),
    ("a\\*b", "axb", False, False),
    ("back\\\\slash", "back\\slash", False, True),
    ("new*", "new\nline", False, True),
    ("-rf", "-rf", False, True),
    ("$(touch pwned)", "$(touch pwned)", False, True),
    ("*", "anything/at/all", False, True),
    ("*\n!*/\n!*.py", "pkg/mod.py", False, False),
    ("*\n!*/\n!*.py", "pkg/data.json", False, True),
]


@pytest.mark.parametrize(("gitignore", "path", "is_dir", "excluded"), SYNTAX_CASES)
def test_syntax(tmp_path: Path, gitignore: str, path: str, is_dir: bool, excluded: bool) -> None:
    rules = rules_with(tmp_path, gitignore + "\n")
    assert rules.is_excluded(path, is_dir) is excluded


def test_non_utf8_names(tmp_path: Path) -> None:
    (tmp_path / ".gitignore").write_bytes(b"\xff*\n")
    rules = RuleSet(tmp_path)
    rules.load_dir("")
    assert rules.is_excluded(os.fsdecode(b"\xffname"), False)
    assert not rules.is_excluded(os.fsdecode(b"\xfename"), False)


def test_defaults_cannot_be_reincluded(tmp_path: Path) -> None:
    rules = rules_with(tmp_path, "!node_modules/\n!.git/\n!*\n", exclude=["!node_modules/"])
    assert rules.is_excluded("node_modules", True)
    assert rules.is_excluded("web/node_modules", True)
    assert rules.is_excluded("web/node_modules/pkg/index.js", False)
    assert rules.is_excluded(".git", True)
    assert rules.is_excluded("vendor/lib/.git/HEAD", False)
    assert not rules.is_excluded("node_modules", False)  # a file of that name is fine
    assert not rules.is_excluded("node_modules.txt", False)


def test_internal_excludes_are_root_only(tmp_path: Path) -> None:
    rules = rules_with(tmp_path, "!.dev-sync-root\n")
    assert INTERNAL_EXCLUDES == ("/.dev-sync-root", "/.dev-sync/")
    assert rules.is_excluded(".dev-sync-root", False)
    assert rules.is_excluded(".dev-sync/state.json", False)
    assert not rules.is_excluded("sub/.dev-sync-root", False)
    assert not rules.is_excluded(".dev-sync", False)


def test_exclude_beats_gitignore(tmp_path: Path) -> None:
    rules = rules_with(tmp_path, "!keep.log\n!/secrets\n", exclude=["*.log", "/secrets"])
    assert rules.is_excluded("keep.log", False)
    assert rules.is_excluded("secrets", True)
    assert not rules.is_excluded("app/secrets", True)  # exclude is anchored at the root


def test_exclude_negation_decides_over_gitignore(tmp_path: Path) -> None:
    """Like git's command-line excludes: a matching exclude line settles it either way."""
    rules = rules_with(tmp_path, "*.log\n", exclude=["*.tmp", "!keep.log"])
    assert not rules.is_excluded("keep.log", False)
    assert rules.is_excluded("other.log", False)


def test_exclude_entry_with_trailing_space_is_trimmed(tmp_path: Path) -> None:
    rules = rules_with(tmp_path, "", exclude=["dist/ ", "cache\\ "])
    assert rules.is_excluded("dist", True)
    assert rules.is_excluded("cache ", False)


def test_nested_files_are_relative_and_deeper_wins(tmp_path: Path) -> None:
    make_tree(
        tmp_path,
        {
            ".gitignore": "*.log\n/top\n",
            "a": {
                ".gitignore": "!keep.log\n/only-here\nsub/gen\n",
                "b": {".gitignore": "keep.log\n"},
            },
        },
    )
    rules = RuleSet(tmp_path).reload()
    assert rules.rule_files() == [".gitignore", "a/.gitignore", "a/b/.gitignore"]
    assert rules.is_excluded("keep.log", False)
    assert not rules.is_excluded("a/keep.log", False)
    assert not rules.is_excluded("a/x/keep.log", False)
    assert rules.is_excluded("a/b/keep.log", False)
    assert rules.is_excluded("a/b/c/keep.log", False)
    assert rules.is_excluded("a/x.log", False)  # no match in a/.gitignore: the root decides
    assert rules.is_excluded("a/only-here", False)
    assert not rules.is_excluded("only-here", False)
    assert not rules.is_excluded("a/b/only-here", False)
    assert rules.is_excluded("a/sub/gen", False)
    assert not rules.is_excluded("sub/gen", False)
    assert rules.is_excluded("top", False)
    assert not rules.is_excluded("a/top", False)


def test_no_reinclude_under_excluded_dir(tmp_path: Path) -> None:
    rules = rules_with(tmp_path, "build/\n!build/keep.txt\nout/*\n!out/keep.txt\n")
    assert rules.is_excluded("build/keep.txt", False)
    assert not rules.is_excluded("out", True)
    assert not rules.is_excluded("out/keep.txt", False)
    assert rules.is_excluded("out/other.txt", False)


def test_rule_files_in_excluded_dirs_are_never_read(tmp_path: Path) -> None:
    make_tree(
        tmp_path,
        {
            ".gitignore": "vendor/\n",
            "vendor": {".gitignore": "!*\n", "x": "x"},
            "node_modules": {".gitignore": "!*\n"},
        },
    )
    rules = RuleSet(tmp_path).reload()
    assert rules.rule_files() == [".gitignore"]
    rules.load_dir("vendor")  # refused even when asked directly
    assert rules.rule_files() == [".gitignore"]
    assert rules.is_excluded("vendor/x", False)


def test_gitignore_false_reads_no_rule_files(tmp_path: Path) -> None:
    make_tree(tmp_path, {".gitignore": "*\n", "a": {".gitignore": "*\n"}})
    rules = RuleSet(tmp_path, exclude=["*.log"], gitignore=False).reload()
    assert rules.rule_files() == []
    assert not rules.is_excluded("a/x", False)
    assert rules.is_excluded("a/x.log", False)
    assert rules.is_excluded("node_modules", True)


def test_load_dir_rereads_and_forgets(tmp_path: Path) -> None:
    rules = rules_with(tmp_path, "*.log\n")
    assert rules.is_excluded("x.log", False)
    (tmp_path / ".gitignore").write_text("*.tmp\n")
    rules.load_dir("")
    assert not rules.is_excluded("x.log", False)
    assert rules.is_excluded("x.tmp", False)
    (tmp_path / ".gitignore").unlink()
    rules.load_dir("")
    assert rules.rule_files() == []
    assert not rules.is_excluded("x.tmp", False)


def test_decisions_below_a_reread_folder_change_too(tmp_path: Path) -> None:
    (tmp_path / "a" / "b").mkdir(parents=True)
    rules = rules_with(tmp_path, "")
    judged = [("a/b/x.tmp", False), ("a/b/x.tmp", True), ("a/b", True), ("a/b/c/y", False)]
    assert [rules.is_excluded(p, d) for p, d in judged] == [False] * 4
    assert [rules.is_excluded(p, d) for p, d in judged] == [False] * 4  # asked again
    (tmp_path / "a" / ".gitignore").write_text("*.tmp\nb/\n")
    rules.load_dir("a")
    assert [rules.is_excluded(p, d) for p, d in judged] == [True] * 4


def test_a_folder_without_rules_keeps_the_decisions_and_one_that_loses_them_not(
    tmp_path: Path,
) -> None:
    """A burst making new folders loads each (no rule file): nothing changed, so the
    decisions already made stay; a rule file gone from a folder does change them."""
    (tmp_path / "a" / "new").mkdir(parents=True)
    (tmp_path / "a" / ".gitignore").write_text("*.tmp\n")
    rules = RuleSet(tmp_path).reload()
    assert rules.is_excluded("a/x.tmp", False)
    assert not rules.is_excluded("a/y", False)
    rules.load_dir("a/new")
    assert rules._decided[False] == {"a/x.tmp": True, "a/y": False}
    (tmp_path / "a" / ".gitignore").unlink()
    rules.load_dir("a")
    assert not rules._decided[False]
    assert not rules.is_excluded("a/x.tmp", False)


def test_rule_file_that_is_a_symlink_or_dir_is_not_read(tmp_path: Path) -> None:
    """git refuses in-tree .gitignore symlinks; a directory of that name is no rule file."""
    make_tree(
        tmp_path,
        {
            "real": "*\n",
            "a": {".gitignore": Link("../real"), "x": "x"},
            "b": {".gitignore": {}, "y": "y"},
        },
    )
    rules = RuleSet(tmp_path).reload()
    assert rules.rule_files() == []
    assert not rules.is_excluded("a/x", False)


def test_is_rule_file() -> None:
    assert RuleSet.is_rule_file(".gitignore")
    assert RuleSet.is_rule_file("a/b/.gitignore")
    assert not RuleSet.is_rule_file("a/.gitignore.bak")
    assert not RuleSet.is_rule_file("a.gitignore")


def test_reload_keeps_settings_and_sees_changes(tmp_path: Path) -> None:
    make_tree(tmp_path, {"a": {"x.log": "x"}})
    rules = RuleSet(tmp_path, exclude=["*.tmp"], gitignore=True).reload()
    assert not rules.is_excluded("a/x.log", False)
    (tmp_path / "a" / ".gitignore").write_text("*.log\n")
    fresh = rules.reload()
    assert fresh is not rules
    assert fresh.is_excluded("a/x.log", False)
    assert fresh.is_excluded("a/y.tmp", False)
    assert fresh.rule_files() == ["a/.gitignore"]


# --------------------------------------------------------------------------
# walk_dirs


def test_walk_prunes_defaults_and_nested_rules(tmp_path: Path) -> None:
    make_tree(
        tmp_path,
        {
            ".git": {"objects": {"ab": {}}},
            "node_modules": {"pkg": {".gitignore": "*\n"}},
            "web": {"node_modules": {"x": {}}, "src": {}},
            "app": {
                ".gitignore": "gen/\n",
                "gen": {"deep": {".gitignore": "!*\n"}},
                "lib": {"gen": {}},
                "gen.txt": "x",
            },
        },
    )
    rules = RuleSet(tmp_path)
    dirs = list(walk_dirs(rules))
    assert dirs[0] == ""
    assert sorted(dirs) == ["", "app", "app/lib", "web", "web/src"]
    assert rules.rule_files() == ["app/.gitignore"]


def test_walk_is_top_down(tmp_path: Path) -> None:
    make_tree(tmp_path, {"a": {"b": {"c": {}}, "d": {}}, "e": {}})
    dirs = list(walk_dirs(RuleSet(tmp_path)))
    assert sorted(dirs) == ["", "a", "a/b", "a/b/c", "a/d", "e"]
    for rel in dirs[1:]:
        parent = rel.rpartition("/")[0]
        assert dirs.index(parent) < dirs.index(rel)


def test_walk_does_not_follow_symlinks(tmp_path: Path) -> None:
    make_tree(tmp_path / "outside", {"x": {}})
    make_tree(tmp_path / "root", {"real": {}, "link": Link("real"), "out": Link("../outside")})
    assert sorted(walk_dirs(RuleSet(tmp_path / "root"))) == ["", "real"]


def test_walk_survives_vanishing_dirs(tmp_path: Path) -> None:
    make_tree(tmp_path, {"a": {"x": {}}, "b": {"y": {}}})
    walk = walk_dirs(RuleSet(tmp_path))
    assert next(walk) == ""
    shutil.rmtree(tmp_path / "b")
    shutil.rmtree(tmp_path / "a" / "x")
    assert list(walk) == ["a"]


def test_walk_of_missing_root_yields_nothing(tmp_path: Path) -> None:
    assert list(walk_dirs(RuleSet(tmp_path / "nope"))) == []


@pytest.mark.skipif(os.geteuid() == 0, reason="root can read any directory")
def test_walk_skips_unreadable_dirs(tmp_path: Path) -> None:
    make_tree(tmp_path, {"locked": {"inner": {}}, "open": {}})
    (tmp_path / "locked").chmod(0)
    try:
        assert sorted(walk_dirs(RuleSet(tmp_path))) == ["", "open"]
    finally:
        (tmp_path / "locked").chmod(0o755)


# --------------------------------------------------------------------------
# rsync filter rules


def test_filter_rules_start_with_internal_excludes(tmp_path: Path) -> None:
    rules = rules_with(tmp_path, "!*\n")
    assert rules.rsync_filter_rules()[:2] == ["- /.dev-sync-root", "- /.dev-sync/"]


def test_filter_rules_anchor_and_escape_the_base(tmp_path: Path) -> None:
    make_tree(tmp_path, {"a*b": {".gitignore": "/x\n"}, "p\\q": {".gitignore": "/y\n"}})
    rules = RuleSet(tmp_path).reload()
    lines = rules.rsync_filter_rules()
    assert "- /a\\*b/x" in lines  # wildcard rule: escapes are honoured
    assert "- /p\\q/y" in lines  # no wildcard: rsync compares literally


def test_filter_rules_order_is_first_match(tmp_path: Path) -> None:
    """Fixed, then exclude, then deeper files first, each file reversed: git's precedence."""
    make_tree(tmp_path, {".gitignore": "*.log\n!keep.log\n", "a": {".gitignore": "keep.log\n"}})
    assert RuleSet(tmp_path, exclude=["*.tmp"]).reload().rsync_filter_rules() == [
        "- /.dev-sync-root",
        "- /.dev-sync/",
        "- /**/.git/",
        "- /.git/",
        "- /**/node_modules/",
        "- /node_modules/",
        "- /**/.venv/",
        "- /.venv/",
        "- /**/vendor/bundle/",
        "- /vendor/bundle/",
        "- /**/*.tmp",
        "- /*.tmp",
        "- /a/**/keep.log",
        "- /a/keep.log",
        "+ /**/keep.log",
        "+ /keep.log",
        "- /**/*.log",
        "- /*.log",
    ]


# --------------------------------------------------------------------------
# Agreement with the real rsync


def rsync(src: Path, dst: Path, filters: list[str], *extra: str) -> None:
    args = ["rsync", "-r", "--links", *extra, *filters, f"{src}/", f"{dst}/"]
    result = subprocess.run(args, capture_output=True, text=True, errors="replace")
    assert result.returncode == 0, result.stderr


def check_agreement(
    work: Path, tree: Tree, exclude: Sequence[str], junk: Tree, via: str = "merge"
) -> None:
    """rsync sends exactly the included paths, and --delete spares excluded receiver content.

    ``junk`` is laid over the receiver after the first transfer: the paths in it
    that the rules exclude must survive a ``--delete`` run, every other
    receiver-only path must go. ``via`` is how rsync gets the rules: a merge
    file, or one ``--filter`` argument per rule (how the pusher passes them).
    """
    src, dst, rules_file = work / "src", work / "dst", work / "rules"
    make_tree(src, tree)
    rules = RuleSet(src, exclude)
    want_files, want_dirs = expected(rules)
    if via == "merge":
        rules.write_rsync_filter(rules_file)
        filters = [f"--filter=merge {rules_file}"]
    else:
        filters = [f"--filter={rule}" for rule in rules.rsync_filter_rules()]

    rsync(src, dst, filters)
    assert scan(dst) == (want_files, want_dirs)

    make_tree(dst, junk)
    got_files, got_dirs = scan(dst)
    kept = {p for p in got_files if rules.is_excluded(p, False)}
    kept |= {p for p in got_dirs if rules.is_excluded(p, True)}
    ancestors = {p.rsplit("/", i)[0] for p in kept for i in range(1, p.count("/") + 1)}
    rsync(src, dst, filters, "--delete")
    assert scan(dst) == (
        want_files | (kept & got_files),
        want_dirs | (kept & got_dirs) | ancestors,
    )


HOSTILE = ["[x]", "a*b", "-rf", "new\nline", "cr\rx", os.fsdecode(b"\xffbin"), "trail ",
           "q?", "back\\slash", "$(touch pwned)", "it's \"q\"", "#hash", "!bang", "\u00fc"]

AGREEMENT_CASES: dict[str, tuple[Tree, list[str], Tree]] = {
    "file re-included under an excluded dir stays out": (
        {
            ".gitignore": "build/\n!build/keep.txt\nout/*\n!out/keep.txt\n",
            "build": {"keep.txt": "x", "o.o": "x"},
            "out": {"keep.txt": "x", "o.o": "x", "sub": {"keep.txt": "x"}},
        },
        [],
        {"build": {"remote-only": "x"}, "out": {"o.o": "remote", "stale": "x"}},
    ),
    "only python files": (
        {
            ".gitignore": "*\n!*/\n!*.py\n",
            "pkg": {"a.py": "x", "data.json": "x", "sub": {"b.py": "x", "c.txt": "x"}},
            "top.txt": "x",
        },
        [],
        {"pkg": {"stale.py": "x", "remote.json": "x"}, "gone.py": "x"},
    ),
    "nested overrides": (
        {
            ".gitignore": "*.log\n/top\n",
            "a": {
                ".gitignore": "!keep.log\n/only-here\n",
                "keep.log": "x",
                "x.log": "x",
                "only-here": "x",
                "b": {".gitignore": "keep.log\n", "keep.log": "x", "c": {"keep.log": "x"}},
            },
            "top": {"x": "x"},
            "keep.log": "x",
        },
        [],
        {"a": {"b": {"remote.log": "x", "keep.log": "remote"}, "new.log": "x"}, "top": {"r": "x"}},
    ),
    "hostile names": (
        {
            name: {
                ".gitignore": "*.log\n/x\n!keep.log\n",
                "x": "x",
                "keep.log": "x",
                "a.log": "x",
                name: {"x": "x", "a.log": "x", "f": "x"},
            }
            for name in HOSTILE
        }
        | {".gitignore": "".join(f"/{n}/{n}/f\n" for n in ["[x]", "a*b", "-rf", "q?"])},
        [],
        {name: {"stale": "x", "r.log": "x"} for name in HOSTILE},
    ),
    "defaults and internal files": (
        {
            ".gitignore": "!node_modules/\n!.git/\n",
            "node_modules": {"pkg": {"index.js": "x"}},
            "web": {"node_modules": {"x": "x"}, "app.js": "x"},
            ".git": {"HEAD": "x"},
            ".dev-sync-root": "x",
            "sub": {".dev-sync-root": "x", ".dev-sync": {"x": "x"}},
        },
        ["!node_modules/"],
        {
            "node_modules": {"remote-only": "x"},
            ".dev-sync-root": "remote",
            ".dev-sync": {"state": "x"},
            ".git": {"config": "x"},
            "web": {"node_modules": {"y": "x"}},
        },
    ),
    "exclude beats gitignore": (
        {
            ".gitignore": "!keep.log\n!secrets\n",
            "keep.log": "x",
            "secrets": {"k": "x"},
            "app": {"secrets": {"k": "x"}},
        },
        ["*.log", "/secrets"],
        {"secrets": {"remote": "x"}, "app": {"remote.log": "x", "stale": "x"}},
    ),
    "double star forms": (
        {
            ".gitignore": "**/gen\na/**/b\nc/**\n!c/keep\n/**/x.log\nd/e**/f\n",
            "gen": "x",
            "p": {"gen": {"x": "x"}},
            "a": {"b": "x", "q": {"r": {"b": "x"}}, "ab": "x"},
            "c": {"keep": "x", "drop": "x"},
            "x.log": "x",
            "s": {"t": {"x.log": "x"}},
            "d": {"e": {"f": "x"}, "ex": {"y": {"f": "x"}}},
        },
        [],
        {"a": {"q": {"r": {"b": "remote"}}, "stale": "x"}, "c": {"new": "x"}},
    ),
    "line breaks in names and in brackets": (
        {
            # A CR inside a line is part of the pattern; rsync cannot read one raw.
            ".gitignore": "x[!\t\r]y\nz[[:space:]]\n",
            **{f"x{c}y": "x" for c in "\n\r\ta"},
            **{f"z{c}": "x" for c in "\n\r\t\v "},
            "d\ne": {".gitignore": "*\n!keep\n", "keep": "x", "drop": "x"},
            "d\re": {".gitignore": "/k*\n", "keep": "x", "drop": "x"},
        },
        [],
        {"d\ne": {"r": "x"}, "d\re": {"r": "x"}, "x\ny": "remote"},
    ),
    "symlinks are not directories": (
        {
            ".gitignore": "link/\ndangling\n",
            "real": {"x": "x"},
            "link": Link("real"),
            "dangling": Link("nowhere"),
            "other": Link("dangling"),
        },
        [],
        {"stale-link-dir": {"x": "x"}},
    ),
}


@pytest.mark.parametrize("via", ["merge", "args"])
@pytest.mark.parametrize("case", AGREEMENT_CASES)
def test_rsync_agrees(tmp_path: Path, case: str, via: str) -> None:
    tree, exclude, junk = AGREEMENT_CASES[case]
    check_agreement(tmp_path, tree, exclude, junk, via)


def test_delete_spares_excluded_remote_content(tmp_path: Path) -> None:
    """The safety promise, spelt out for the common cases."""
    tree: Tree = {".gitignore": "*.log\n", "app": {"main.py": "x"}}
    junk: Tree = {
        "node_modules": {"x": "x"},
        "app": {"debug.log": "x", "stale.py": "x", "tmp": {"a.log": "x", "b.py": "x"}},
        ".dev-sync-root": "x",
        "gone.py": "x",
    }
    check_agreement(tmp_path, tree, [], junk)
    files, _ = scan(tmp_path / "dst")
    assert files == {
        ".gitignore", "app/main.py", "node_modules/x", "app/debug.log", "app/tmp/a.log",
        ".dev-sync-root",
    }


# Names and patterns for generated trees: the usual suspects plus names built to
# break shell quoting, rsync's wildcard syntax and line-based rule files.
NAMES = ["a", "b", "build", "gen", "keep.txt", "x.log", "keep.log", "node_modules",
         *HOSTILE, "sp ace", "tab\tx", "*", "-", "\\"]
PATTERNS = [
    "*.log", "!keep.log", "build/", "/build", "!build/keep.txt", "a/b", "**/b", "a/**",
    "a/**/b", "*", "!*/", "!a", "b/", "/a/", "[x]", "\\[x]", "a\\*b", "a*b", "sp ace",
    "trail\\ ", "trail ", "\\#hash", "\\!bang", "#comment", "", "-rf", "node_modules",
    "!node_modules/", "?", "!*.txt", "x.lo[gx]", "[!a]*", "**", "/**/x.log", "a/*", "\u00fc",
    "new*", "new?line", "cr[[:space:]]x", "$(touch pwned)", "back\\\\slash", "*\\\\*",
    "!**/", "/**", "b/**/", "!b/**/x.log", "*ash", "[[:alpha:]]", "\udcff*", "gen/**/keep.txt",
    "!gen/", "q\\?", "*/*", "!/*/keep.txt", "**\\/b", "a\\/b", "*/**/*.log", "**/**/gen",
]
EXCLUDES = ["*.log", "!keep.log", "/build", "gen/", "!a", "b", "[x]", "**/q?", "a/**"]

leaf = st.sampled_from(["x", "y"]) | st.sampled_from([Link("a"), Link("nowhere")])
rule_text = st.lists(st.sampled_from(PATTERNS), min_size=1, max_size=6).map(
    lambda lines: "\n".join(lines) + "\n"
)


def _dir(children: st.SearchStrategy[str | Link | Tree]) -> st.SearchStrategy[Tree]:
    def attach(entries: dict[str, str | Link | Tree], rules: str | None) -> Tree:
        return entries if rules is None else {**entries, ".gitignore": rules}

    return st.builds(
        attach, st.dictionaries(st.sampled_from(NAMES), children, max_size=4), st.none() | rule_text
    )


trees = _dir(st.recursive(leaf, _dir, max_leaves=14))
excludes = st.lists(st.sampled_from(EXCLUDES), max_size=3)


def _junk_for(tree: Tree) -> st.SearchStrategy[Tree]:
    """Receiver-only paths: in existing directories (excluded ones too) or new ones."""
    dirs = [""]
    stack: list[tuple[str, Tree]] = [("", tree)]
    while stack:
        rel, node = stack.pop()
        for name, value in node.items():
            if not isinstance(value, (str, Link)):
                child = f"{rel}/{name}" if rel else name
                dirs.append(child)
                stack.append((child, value))

    def place(spots: list[tuple[str, str, bool]]) -> Tree:
        junk: dict[str, str | Link | Tree] = {}
        for parent, name, is_dir in spots:
            node: Tree = tree
            out = junk
            for part in parent.split("/") if parent else []:
                child, sub = node[part], out.setdefault(part, {})
                assert not isinstance(child, (str, Link)) and isinstance(sub, dict)
                node, out = child, sub
            if name in node or name in out:
                continue
            out[name] = {"inner.log": "j", "inner": "j"} if is_dir else "junk"
        return junk

    spot = st.tuples(st.sampled_from(dirs), st.sampled_from(NAMES), st.booleans())
    return st.lists(spot, max_size=5).map(place)


@settings(max_examples=60, deadline=None)
@given(tree=trees, exclude=excludes, data=st.data())
def test_rsync_agrees_on_generated_trees(
    tree: Tree, exclude: list[str], data: st.DataObject
) -> None:
    junk = data.draw(_junk_for(tree))
    with tempfile.TemporaryDirectory() as work:
        check_agreement(Path(work), tree, exclude, junk)


# --------------------------------------------------------------------------
# Agreement with git itself


@pytest.fixture(scope="module")
def git_dir(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Path]:
    """An empty repository kept outside the trees, so they hold no .git of their own."""
    if shutil.which("git") is None:
        pytest.skip("git is not installed")
    path = tmp_path_factory.mktemp("git") / "repo.git"
    subprocess.run(["git", "init", "-q", "--bare", str(path)], check=True, env=_git_env())
    yield path


def _git_env() -> dict[str, str]:
    return dict(os.environ, GIT_CONFIG_NOSYSTEM="1", GIT_CONFIG_GLOBAL=os.devnull, LC_ALL="C")


def git_included_files(root: Path, git_dir: Path, exclude: Sequence[str]) -> set[str]:
    """Untracked, not ignored files as git sees them: our precedence, in git's terms.

    ``--exclude`` patterns outrank every .gitignore, and the last one that
    matches wins, so the fixed excludes go last to make them unbeatable.
    """
    fixed = [*INTERNAL_EXCLUDES, ".git/", "node_modules/"]
    args = [
        "git", f"--git-dir={git_dir}", f"--work-tree={root}", "-c", "core.ignorecase=false",
        "ls-files", "-z", "--others", "--exclude-per-directory=.gitignore",
        *(f"--exclude={pattern}" for pattern in [*exclude, *fixed]),
    ]
    out = subprocess.run(args, cwd=root, env=_git_env(), capture_output=True, check=True).stdout
    return {os.fsdecode(path) for path in out.split(b"\0") if path}


@settings(max_examples=100, deadline=None)
@given(tree=trees, exclude=excludes)
def test_is_excluded_agrees_with_git(git_dir: Path, tree: Tree, exclude: list[str]) -> None:
    with tempfile.TemporaryDirectory() as work:
        root = Path(work) / "src"
        make_tree(root, tree)
        files, _ = expected(RuleSet(root, exclude))
        assert files == git_included_files(root, git_dir, exclude)


@pytest.mark.parametrize(("gitignore", "path", "is_dir", "excluded"), SYNTAX_CASES)
def test_syntax_cases_agree_with_git(
    git_dir: Path, tmp_path: Path, gitignore: str, path: str, is_dir: bool, excluded: bool
) -> None:
    """The hand-written expectations above are git's, not just ours.

    Files are checked with ls-files, which also applies excluded parents;
    directories with check-ignore, since ls-files lists no directories.
    """
    make_tree(tmp_path, {".gitignore": gitignore + "\n"})
    target = tmp_path / path
    target.parent.mkdir(parents=True, exist_ok=True)
    if is_dir:
        target.mkdir()
        args = ["git", f"--git-dir={git_dir}", f"--work-tree={tmp_path}", "check-ignore", "-q"]
        result = subprocess.run([*args, "--no-index", "--", path], cwd=tmp_path, env=_git_env())
        assert result.returncode in (0, 1)
        assert (result.returncode == 0) is excluded
    else:
        target.write_bytes(b"")
        assert (path not in git_included_files(tmp_path, git_dir, [])) is excluded


# --------------------------------------------------------------------------
# The lists' combined matching against a line-by-line reading

PATH_PARTS = ["a", "b", "build", "x.log", "keep.log", "gen", "keep.txt", "q1", "\u00fc", "sp ace"]


@settings(max_examples=300, deadline=None)
@given(lines=st.lists(st.sampled_from(PATTERNS), max_size=12),
       path=st.lists(st.sampled_from(PATH_PARTS), min_size=1, max_size=4),
       is_dir=st.booleans())
def test_combined_lines_pick_the_last_matching_line(
    lines: list[str], path: list[str], is_dir: bool
) -> None:
    """One regular expression per list must decide as git's reading does: the last
    line that matches, name-only lines and dir-only lines included."""
    patterns = _parse_lines(os.fsencode(line) for line in lines)
    rel = os.fsencode("/".join(path))
    by_line = next((p for p in reversed(patterns) if p.matches(rel, is_dir)), None)
    assert _Rules(patterns).last_match(rel, is_dir) is by_line


def test_name_only_lines_look_at_the_last_component_only() -> None:
    rules = _Rules(_parse_lines([b"*.log", b"!keep.log", b"a/*.log", b"build/"]))
    assert rules.last_match(b"x/y.log", False) is rules.patterns[0]
    assert rules.last_match(b"x/keep.log", False) is rules.patterns[1]
    assert rules.last_match(b"a/keep.log", False) is rules.patterns[2]  # the later line wins
    assert rules.last_match(b"x/build", False) is None  # folders only
    assert rules.last_match(b"x/build", True) is rules.patterns[3]
    assert rules.last_match(b"x/build.txt", True) is None
