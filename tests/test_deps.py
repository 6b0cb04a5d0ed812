"""Dependency installs: [deps] config errors, matching, planning, the queue, the record helpers.

No ssh here: the queue is tested with a fake ``run`` (the queue's semantics
are the thing under test), and the shell snippets are run with the local
``sh`` standing in for the remote one.
"""

from __future__ import annotations

import asyncio
import os
import shlex
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest
from pydantic import Field

import dev_sync.config as config_module
from dev_sync.config import Config, load_config, parse_config
from dev_sync.deps import (
    PRESETS,
    DepsConfig,
    InstallJob,
    InstallQueue,
    changed_lock_files,
    hash_file,
    install_argv,
    local_hashes,
    lock_files,
    plan,
    rerun_hint,
    stale,
)
from dev_sync.errors import ConfigError
from dev_sync.ignore import RuleSet

REMOTE = '[remote]\nhost = "h"\npath = "/srv/a"\n'


@pytest.fixture(autouse=True)
def deps_in_config(monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    """Give the top-level Config its [deps] section if it does not have one yet.

    The section is wired into config.py separately; until then these tests
    add it the same way (a ``deps`` field), so errors still go through the
    real loader and error formatter.
    """
    if "deps" not in Config.model_fields:

        class WithDeps(Config):
            deps: DepsConfig = Field(default_factory=DepsConfig)

        monkeypatch.setattr(config_module, "Config", WithDeps)
    yield


def load(tmp_path: Path, text: str) -> DepsConfig:
    path = tmp_path / "dev-sync.toml"
    path.write_text(REMOTE + text)
    deps = getattr(load_config(path), "deps")  # noqa: B009 (the field may be added above)
    assert isinstance(deps, DepsConfig)
    return deps


def config_error(tmp_path: Path, text: str) -> ConfigError:
    with pytest.raises(ConfigError) as info:
        load(tmp_path, text)
    assert info.value.exit_code == 2
    return info.value


def job(key: str, *files: str, command: str = "true") -> InstallJob:
    name, _, directory = key.partition(":")
    return InstallJob(key, directory, command, tuple(files), f"{name} in {directory}", name)


# --------------------------------------------------------------------------
# Config


def test_defaults_need_no_configuration(tmp_path: Path) -> None:
    deps = load(tmp_path, "")
    assert deps.enabled and deps.rule == []
    assert all(deps.preset(name).enabled for name in PRESETS)
    assert [j.command for j in plan(["package-lock.json"], deps)] == [
        "npm install --no-audit --no-fund"
    ]


def test_preset_command_and_switches(tmp_path: Path) -> None:
    deps = load(tmp_path, '[deps.npm]\ncommand = "npm ci"\n[deps.go]\nenabled = false\n')
    assert [j.command for j in plan(["package-lock.json", "go.sum"], deps)] == ["npm ci"]
    off = load(tmp_path, "[deps]\nenabled = false\n")
    assert plan(["package-lock.json", "go.sum"], off) == []


def test_full_example_parses(tmp_path: Path) -> None:
    deps = load(
        tmp_path,
        '[deps]\nenabled = true\n[deps.npm]\ncommand = "npm ci"\n'
        '[[deps.rule]]\nname = "prisma"\nglobs = ["prisma/schema.prisma"]\n'
        'command = "npx prisma generate"\ncwd = "root"\n'
        '[[deps.rule]]\nname = "migrate"\nglobs = ["db/migrations/", "!*.md"]\n'
        'command = "make migrate"\n',
    )
    assert [r.name for r in deps.rule] == ["prisma", "migrate"]
    assert deps.rule[0].cwd == "root" and deps.rule[1].cwd == "file"


@pytest.mark.parametrize(
    ("text", "needles"),
    [
        (
            '[deps.nmp]\ncommand = "x"\n',
            ["[deps] nmp: unknown preset 'nmp'; known: npm, yarn, pnpm, pip"],
        ),
        ("[deps]\nenabeld = true\n", ["[deps] enabeld: unknown key"]),
        ('[deps.npm]\ncomand = "npm ci"\n', ["[deps] npm.comand: unknown key"]),
        ('[deps.npm]\ncommand = "  "\n', ["[deps] npm.command: must not be empty"]),
        ('[deps]\nenabled = "yes"\n', ["[deps] enabled"]),
        ("[deps]\nnpm = false\n", ["[deps] npm: must be a table: write [deps.npm]"]),
        (
            '[deps.rule]\nname = "x"\n',
            ["[deps] rule: must be an array of tables: write [[deps.rule]]"],
        ),
        (
            '[[deps.rule]]\nname = "x"\nglobs = ["a/[z-a]"]\ncommand = "c"\n',
            ["[deps] rule.0.globs: bad glob 'a/[z-a]'"],
        ),
        (
            '[[deps.rule]]\nname = "x"\nglobs = ["a["]\ncommand = "c"\n',
            ["[deps] rule.0.globs: bad glob 'a['", "never match"],
        ),
        (
            '[[deps.rule]]\nname = "x"\nglobs = ["!"]\ncommand = "c"\n',
            ["[deps] rule.0.globs: bad glob '!'"],
        ),
        (
            '[[deps.rule]]\nname = "x"\nglobs = ["../up"]\ncommand = "c"\n',
            ["[deps] rule.0.globs: bad glob '../up'", "'..'"],
        ),
        (
            '[[deps.rule]]\nname = "x"\nglobs = ["!*.md"]\ncommand = "c"\n',
            ["[deps] rule.0.globs: needs at least one pattern that is not a !negation"],
        ),
        (
            '[[deps.rule]]\nname = "x"\nglobs = []\ncommand = "c"\n',
            ["[deps] rule.0.globs: must list at least one glob"],
        ),
        ('[[deps.rule]]\nname = "x"\nglobs = "a"\ncommand = "c"\n', ["[deps] rule.0.globs"]),
        (
            '[[deps.rule]]\nname = "x"\nglobs = ["a"]\ncommand = ""\n',
            ["[deps] rule.0.command: must not be empty"],
        ),
        (
            '[[deps.rule]]\nname = "x"\nglobs = ["a"]\n',
            ["[deps] rule.0.command: required key is missing"],
        ),
        (
            '[[deps.rule]]\nname = "x"\nglobs = ["a"]\ncommand = "c"\ncwd = "here"\n',
            ["[deps] rule.0.cwd"],
        ),
        (
            '[[deps.rule]]\nname = "x"\nglobs = ["a"]\ncommand = "c"\nshell = "bash"\n',
            ["[deps] rule.0.shell: unknown key"],
        ),
        (
            '[[deps.rule]]\nname = "npm"\nglobs = ["a"]\ncommand = "c"\n',
            ["[deps] rule.0.name: 'npm' is a built-in preset"],
        ),
        ('[[deps.rule]]\nname = "a b"\nglobs = ["a"]\ncommand = "c"\n', ["[deps] rule.0.name"]),
        (
            '[[deps.rule]]\nname = "x"\nglobs = ["a"]\ncommand = "c"\n'
            '[[deps.rule]]\nname = "x"\nglobs = ["b"]\ncommand = "c"\n',
            ["[deps]: rule name 'x' is used twice"],
        ),
    ],
)
def test_bad_deps_config_names_section_and_key(
    tmp_path: Path, text: str, needles: list[str]
) -> None:
    err = config_error(tmp_path, text)
    for needle in needles:
        assert needle in err.cause
    assert str(tmp_path / "dev-sync.toml") in err.cause


def test_every_problem_is_reported_at_once(tmp_path: Path) -> None:
    err = config_error(tmp_path, '[deps]\ncolour = 1\n[deps.nmp]\n[deps.npm]\ncommand = ""\n')
    assert "[deps] nmp: unknown preset" in err.cause
    assert "[deps] colour: unknown key" in err.cause
    assert "[deps] npm.command: must not be empty" in err.cause


def test_parse_config_accepts_deps(tmp_path: Path) -> None:
    cfg = parse_config(
        {"remote": {"host": "h", "path": "/srv/a"}, "deps": {"yarn": {"enabled": False}}},
        tmp_path / "dev-sync.toml",
    )
    deps = getattr(cfg, "deps")  # noqa: B009
    assert isinstance(deps, DepsConfig) and not deps.yarn.enabled


# --------------------------------------------------------------------------
# Matching and planning


@pytest.mark.parametrize(
    ("path", "preset"),
    [
        ("package-lock.json", "npm"),
        ("services/web/package-lock.json", "npm"),
        ("a/b/c/d/npm-shrinkwrap.json", "npm"),
        ("yarn.lock", "yarn"),
        ("web/pnpm-lock.yaml", "pnpm"),
        ("requirements.txt", "pip"),
        ("api/requirements-dev.txt", "pip"),
        ("requirements_test.txt", "pip"),
        ("poetry.lock", "poetry"),
        ("svc/uv.lock", "uv"),
        ("Gemfile.lock", "bundler"),
        ("cmd/tool/go.sum", "go"),
    ],
)
def test_presets_match_lock_files_in_any_folder(path: str, preset: str) -> None:
    jobs = plan([path], DepsConfig())
    assert [(j.name, j.directory, j.files) for j in jobs] == [
        (preset, path.rpartition("/")[0], (path,))
    ]


@pytest.mark.parametrize(
    "path",
    [
        "package.json",
        "package-lock.json.bak",
        "requirements.in",
        "dev-requirements.txt",
        "docs/requirements.md",
        "go.mod",
        "Gemfile",
        "yarn.lock/readme",
    ],
)
def test_presets_ignore_other_files(path: str) -> None:
    assert plan([path], DepsConfig()) == []


def test_deleted_lock_files_trigger_nothing(tmp_path: Path) -> None:
    (tmp_path / "web").mkdir()
    (tmp_path / "web" / "package-lock.json").write_text("{}")
    (tmp_path / "api").mkdir()  # api/requirements.txt was deleted
    jobs = plan(["web/package-lock.json", "api/requirements.txt"], DepsConfig(), root=tmp_path)
    assert [j.key for j in jobs] == ["npm:web"]


def test_one_job_per_directory_and_preset() -> None:
    changed = [
        "api/requirements.txt",
        "api/requirements-dev.txt",
        "api/requirements.txt",
        "web/package-lock.json",
        "web/yarn.lock",
        "package-lock.json",
        "web/src/app.ts",
    ]
    jobs = plan(changed, DepsConfig())
    assert [(j.key, j.files, j.label) for j in jobs] == [
        ("npm:", ("package-lock.json",), "npm at the root"),
        ("pip:api", ("api/requirements-dev.txt", "api/requirements.txt"), "pip in api"),
        ("npm:web", ("web/package-lock.json",), "npm in web"),
        ("yarn:web", ("web/yarn.lock",), "yarn in web"),
    ]
    # The command sees the files relative to its own folder.
    assert jobs[1].args == ("requirements-dev.txt", "requirements.txt")


def rule_config(**rule: object) -> DepsConfig:
    base: dict[str, object] = {"name": "gen", "command": "make gen"}
    return DepsConfig.model_validate({"rule": [{**base, **rule}]})


def test_rule_globs_are_gitignore_patterns_from_the_root() -> None:
    deps = rule_config(globs=["/schema/*.graphql", "**/migrations/", "!**/migrations/*.md"])
    hits = [
        "schema/a.graphql",
        "db/migrations/001.sql",
        "migrations/x/002.sql",
    ]
    misses = ["app/schema/a.graphql", "schema/sub/a.graphql", "db/migrations/README.md"]
    for path in hits:
        assert [j.name for j in plan([path], deps)] == ["gen"], path
    for path in misses:
        assert plan([path], deps) == [], path


def test_rule_cwd_file_groups_by_folder_and_root_runs_once() -> None:
    changed = ["a/x.proto", "a/y.proto", "b/z.proto"]
    per_dir = plan(changed, rule_config(globs=["*.proto"]))
    assert [(j.key, j.directory, j.args) for j in per_dir] == [
        ("gen:a", "a", ("x.proto", "y.proto")),
        ("gen:b", "b", ("z.proto",)),
    ]
    at_root = plan(changed, rule_config(globs=["*.proto"], cwd="root"))
    assert [(j.key, j.directory, j.files, j.args, j.label) for j in at_root] == [
        ("gen:", "", tuple(changed), tuple(changed), "gen at the root"),
    ]


def test_rules_run_after_presets_in_the_order_written() -> None:
    deps = DepsConfig.model_validate(
        {
            "rule": [
                {"name": "second", "globs": ["package-lock.json"], "command": "b"},
                {"name": "first", "globs": ["*.lock"], "command": "a", "cwd": "root"},
            ]
        }
    )
    jobs = plan(["z/package-lock.json", "a/yarn.lock"], deps)
    assert [j.key for j in jobs] == ["yarn:a", "npm:z", "second:z", "first:"]


def test_dash_names_reach_the_command_as_paths_not_options() -> None:
    deps = rule_config(globs=["*.sql"])
    (only,) = plan(["-db/-init.sql"], deps)
    assert only.directory == "-db" and only.args == ("./-init.sql",)


# --------------------------------------------------------------------------
# The queue


class FakeRunner:
    """A ``run`` callable whose jobs finish when the test says so."""

    def __init__(self) -> None:
        self.started: list[InstallJob] = []
        self.active = 0
        self.max_active = 0
        self.gates: dict[int, asyncio.Event] = {}
        self.fail: set[str] = set()
        self.auto = False

    async def __call__(self, job: InstallJob) -> bool:
        index = len(self.started)
        self.started.append(job)
        self.active += 1
        self.max_active = max(self.max_active, self.active)
        try:
            if not self.auto:
                gate = self.gates.setdefault(index, asyncio.Event())
                await gate.wait()
            else:
                await asyncio.sleep(0)
            if job.key in self.fail:
                raise RuntimeError("install failed")
            return True
        finally:
            self.active -= 1

    def release(self, index: int) -> None:
        self.gates.setdefault(index, asyncio.Event()).set()

    async def wait_started(self, count: int) -> None:
        async with asyncio.timeout(5):
            while len(self.started) < count:
                await asyncio.sleep(0.001)


async def test_queue_runs_in_submission_order_one_at_a_time() -> None:
    fake = FakeRunner()
    fake.auto = True
    queue = InstallQueue(fake)
    try:
        queue.submit([job("npm:a", "a/package-lock.json"), job("pip:b", "b/requirements.txt")])
        queue.submit([job("go:c", "c/go.sum")])
        async with asyncio.timeout(5):
            await queue.idle()
        assert [j.key for j in fake.started] == ["npm:a", "pip:b", "go:c"]
        assert fake.max_active == 1
        assert queue.results == {"npm:a": True, "pip:b": True, "go:c": True}
    finally:
        await queue.close()


async def test_waiting_job_is_merged_and_keeps_its_place() -> None:
    fake = FakeRunner()
    queue = InstallQueue(fake)
    try:
        queue.submit([job("npm:busy", "busy/package-lock.json")])
        await fake.wait_started(1)
        queue.submit([job("pip:a", "a/requirements.txt"), job("go:b", "b/go.sum")])
        queue.submit([job("pip:a", "a/requirements-dev.txt", command="newer")])
        assert [(j.key, j.files) for j in queue.pending] == [
            ("pip:a", ("a/requirements-dev.txt", "a/requirements.txt")),
            ("go:b", ("b/go.sum",)),
        ]
        assert queue.pending[0].command == "newer"
        for i in range(3):
            fake.release(i)
        async with asyncio.timeout(5):
            await queue.idle()
        assert [j.key for j in fake.started] == ["npm:busy", "pip:a", "go:b"]
    finally:
        await queue.close()


async def test_ten_submits_while_running_give_exactly_one_more_run() -> None:
    fake = FakeRunner()
    queue = InstallQueue(fake)
    try:
        queue.submit([job("npm:web", "web/package-lock.json")])
        await fake.wait_started(1)
        assert queue.running is not None and queue.running.key == "npm:web"
        for _ in range(10):
            queue.submit([job("npm:web", "web/package-lock.json")])
        assert len(queue.pending) == 1
        fake.release(0)
        await fake.wait_started(2)
        fake.release(1)
        async with asyncio.timeout(5):
            await queue.idle()
        assert [j.key for j in fake.started] == ["npm:web", "npm:web"]
        assert fake.max_active == 1
    finally:
        await queue.close()


async def test_a_failure_does_not_stop_the_queue() -> None:
    fake = FakeRunner()
    fake.auto = True
    fake.fail = {"npm:a"}

    async def run(j: InstallJob) -> bool:
        if j.key == "pip:b":
            return False
        return await fake(j)

    queue = InstallQueue(run)
    try:
        queue.submit([job("npm:a"), job("pip:b"), job("go:c")])
        async with asyncio.timeout(5):
            await queue.idle()
        assert queue.results == {"npm:a": False, "pip:b": False, "go:c": True}
        queue.submit([job("npm:a")])  # still accepting work afterwards
        async with asyncio.timeout(5):
            await queue.idle()
        assert [j.key for j in fake.started] == ["npm:a", "go:c", "npm:a"]
    finally:
        await queue.close()


async def test_submit_never_blocks_and_idle_waits_for_the_running_job() -> None:
    fake = FakeRunner()
    queue = InstallQueue(fake)
    try:
        await queue.idle()  # nothing submitted: idle at once
        queue.submit([job("npm:a")])  # returns at once though the job is held
        idle = asyncio.create_task(queue.idle())
        await fake.wait_started(1)
        await asyncio.sleep(0.01)
        assert not idle.done()
        fake.release(0)
        async with asyncio.timeout(5):
            await idle
        assert queue.running is None and queue.pending == []
    finally:
        await queue.close()


async def test_close_cancels_the_running_install() -> None:
    cancelled = asyncio.Event()

    async def run(j: InstallJob) -> bool:
        try:
            await asyncio.sleep(60)
        except asyncio.CancelledError:
            cancelled.set()
            raise
        return True

    queue = InstallQueue(run)
    queue.submit([job("npm:a"), job("npm:b")])
    await asyncio.sleep(0.01)
    async with asyncio.timeout(5):
        await queue.close()
    assert cancelled.is_set() and queue.pending == []
    await queue.idle()
    with pytest.raises(RuntimeError):
        queue.submit([job("npm:c")])


# --------------------------------------------------------------------------
# The local tree and the record helpers


def make_tree(root: Path, files: dict[str, str]) -> None:
    for rel, text in files.items():
        path = root / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text)


def test_lock_files_uses_the_pruned_walk(tmp_path: Path) -> None:
    make_tree(
        tmp_path,
        {
            ".gitignore": "build/\n",
            "package-lock.json": "{}",
            "web/package-lock.json": "{}",
            "web/node_modules/dep/package-lock.json": "{}",
            "build/requirements.txt": "x",
            "api/requirements-dev.txt": "x",
            "api/.gitignore": "requirements-local.txt\n",
            "api/requirements-local.txt": "x",
            "vendor/go.sum": "",
            ".git/yarn.lock": "",
            "src/main.py": "",
        },
    )
    rules = RuleSet(tmp_path, exclude=["vendor/"])
    assert lock_files(rules, DepsConfig()) == [
        "api/requirements-dev.txt",
        "package-lock.json",
        "web/package-lock.json",
    ]
    assert rules.rule_files() == []  # the caller's rule set is left as it was
    assert lock_files(rules, DepsConfig(enabled=False)) == []
    deps = rule_config(globs=["src/*.py"])
    assert "src/main.py" in lock_files(rules, deps)


def test_changed_lock_files_walks_new_folders_and_drops_deleted(tmp_path: Path) -> None:
    make_tree(
        tmp_path,
        {
            "new/app/package-lock.json": "{}",
            "new/app/node_modules/x/package-lock.json": "{}",
            "new/api/requirements.txt": "x",
            "new/api/readme.md": "",
            "go.sum": "",
            "odd/yarn.lock/inner": "",
        },
    )
    rules = RuleSet(tmp_path)
    changes = [
        ("new", True),
        ("go.sum", False),
        ("odd/yarn.lock", False),  # a folder by a lock file's name
        ("gone/yarn.lock", False),
        ("gone-dir", True),
        ("new/api/readme.md", False),
    ]
    assert changed_lock_files(rules, changes, DepsConfig()) == [
        "go.sum",
        "new/api/requirements.txt",
        "new/app/package-lock.json",
    ]


def test_hashes_and_staleness(tmp_path: Path) -> None:
    make_tree(tmp_path, {"a/package-lock.json": "one", "b/go.sum": "two"})
    digest = hash_file(tmp_path / "a/package-lock.json")
    assert len(digest) == 64 and digest == hash_file(tmp_path / "a/package-lock.json")
    hashes = local_hashes(tmp_path, ["a/package-lock.json", "b/go.sum", "vanished/go.sum"])
    assert set(hashes) == {"a/package-lock.json", "b/go.sum"}
    assert stale(hashes, {}) == ["a/package-lock.json", "b/go.sum"]
    assert stale(hashes, dict(hashes)) == []
    record = {**hashes, "b/go.sum": "0" * 64, "removed/yarn.lock": "1" * 64}
    assert stale(hashes, record) == ["b/go.sum"]


# --------------------------------------------------------------------------
# Shell pieces, run by the local sh


def test_pip_preset_installs_each_changed_file(tmp_path: Path) -> None:
    """The pip command builds `-r FILE` per positional file, and makes the venv only if missing."""
    bin_dir = tmp_path / ".venv" / "bin"
    bin_dir.mkdir(parents=True)
    fake = bin_dir / "python"
    fake.write_text('#!/bin/sh\nprintf "<%s>" "$@"\n')
    fake.chmod(0o755)
    (only,) = plan(["requirements-dev.txt", "requirements.txt"], DepsConfig())
    out = subprocess.run(
        ["sh", "-c", only.command, "sh", *only.args],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    assert out == "<-m><pip><install><-r><requirements-dev.txt><-r><requirements.txt>"


def test_rerun_hint_is_the_same_command(tmp_path: Path) -> None:
    folder = "-odd dir/$(touch pwned)"
    (tmp_path / folder).mkdir(parents=True)
    deps = rule_config(globs=["*.txt"], command='printf "%s|" "$PWD" "$@"')
    (only,) = plan([f"{folder}/a b.txt"], deps)
    hint = rerun_hint(only, "devbox", str(tmp_path), ssh_args=["-F", "/x/ssh config"])
    argv = shlex.split(hint)
    assert argv[:5] == ["ssh", "-t", "-F", "/x/ssh config", "devbox"] and len(argv) == 6
    # What ssh hands the remote login shell; our sh stands in for it.
    out = subprocess.run(["sh", "-c", argv[5]], capture_output=True, text=True, check=True)
    assert out.stdout == f"{tmp_path}/{folder}|a b.txt|"
    assert not any(p.name == "pwned" for p in tmp_path.rglob("*"))
    assert not Path("pwned").exists()


def test_install_script_keeps_names_as_data(tmp_path: Path) -> None:
    """The fixed install script, with our sh as the remote, its stdin held open."""
    folder = "-x $(touch pwned) 'q'"
    (tmp_path / folder).mkdir()
    deps = rule_config(globs=["*.lock"], command='printf "[%s]" "$PWD" "$@"; echo oops >&2; exit 3')
    (only,) = plan([f"{folder}/-a.lock"], deps)
    proc = subprocess.Popen(
        install_argv(str(tmp_path), only),
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        env={**os.environ},
    )
    assert proc.stdout is not None and proc.stdin is not None
    out = proc.stdout.read().decode()
    assert proc.wait(10) == 3
    proc.stdin.close()
    assert out == f"[{tmp_path}/{folder}][./-a.lock]oops\n"
    assert not any(p.name == "pwned" for p in tmp_path.rglob("*"))
