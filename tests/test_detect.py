"""``dev-sync init`` on sample trees: what it finds, what it writes, and that it loads.

Every written file goes through the real ``load_config``; the interactive
run is a real ``dev-sync init`` process on a pseudo-terminal, answered the
way a person would, waiting on its prompts rather than on time.
"""

from __future__ import annotations

import json
import os
import pty
import select
import subprocess
import sys
import time
from pathlib import Path

import pytest

from dev_sync.cli import main
from dev_sync.config import Config, load_config
from dev_sync.detect import detect, render, service_name, unfold
from dev_sync.services import matches_restart_on


def _write(root: Path, files: dict[str, str]) -> None:
    for rel, text in files.items():
        path = root / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text)


def _package(name: str, **scripts: str) -> str:
    return json.dumps({"name": name, "version": "1.0.0", "scripts": scripts})


def _init(root: Path, *args: str) -> Config:
    """``dev-sync init`` in ``root`` (not a terminal here), then the real loader."""
    cwd = Path.cwd()
    os.chdir(root)
    try:
        assert main(["init", "--host", "box", "--path", "/srv/demo", *args]) == 0
    finally:
        os.chdir(cwd)
    return load_config(root / "dev-sync.toml")


@pytest.fixture(autouse=True)
def _no_personal_config(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("DEV_SYNC_PERSONAL_CONFIG", str(tmp_path / "no-personal.toml"))


def test_node_monorepo(tmp_path: Path) -> None:
    _write(tmp_path, {
        "package.json": json.dumps({"name": "mono", "private": True,
                                    "workspaces": ["packages/*"]}),
        "package-lock.json": "{}",
        "packages/web/package.json": _package("@acme/web", dev="vite", start="vite preview"),
        "packages/web/package-lock.json": "{}",
        "packages/api/package.json": _package("api", start="node server.js", test="jest"),
        "packages/api/package-lock.json": "{}",
        "packages/lib/package.json": _package("lib", test="jest"),
        # Installed on the laptop by mistake: never looked into.
        "node_modules/left-pad/package.json": _package("left-pad", start="x"),
        "node_modules/left-pad/package-lock.json": "{}",
        "packages/web/node_modules/vite/package.json": _package("vite", dev="y"),
    })
    found = detect(tmp_path)
    assert [(d.name, d.files) for d in found.deps] == [("npm", (
        "package-lock.json", "packages/api/package-lock.json", "packages/web/package-lock.json"))]
    cfg = _init(tmp_path, "--yes")
    assert set(cfg.services) == {"web", "api"}
    web, api = cfg.services["web"], cfg.services["api"]
    # dev wins over start (a dev server, which reloads itself); npm from the lock files.
    assert (web.command, web.cwd, web.manager, web.reload) == (
        "npm run dev", "packages/web", "command", "self")
    assert (api.command, api.cwd, api.reload) == ("npm run start", "packages/api", "restart")
    assert matches_restart_on(api.restart_on, "packages/api/server.js")
    assert not matches_restart_on(api.restart_on, "packages/web/index.js")
    assert cfg.deps.enabled and cfg.deps.npm.enabled
    text = (tmp_path / "dev-sync.toml").read_text()
    assert "#   npm      package-lock.json, packages/api/package-lock.json" in text


def test_python_project_with_poetry_and_a_procfile(tmp_path: Path) -> None:
    _write(tmp_path, {
        "pyproject.toml": "[tool.poetry]\nname = 'app'\n",
        "poetry.lock": "# lock\n",
        "requirements-dev.txt": "pytest\n",
        "Procfile": "# processes\n"
                    "web: gunicorn app:app --bind 0.0.0.0:$PORT\n"
                    "worker:   celery -A app worker --loglevel=info\n"
                    "release: python manage.py migrate\n",
        "scripts/bootstrap.sh": "#!/bin/sh\napt-get install -y postgresql\n",
        # a package.json next to the Procfile proposes nothing: the Procfile says what runs
        "package.json": _package("assets", start="webpack --watch"),
    })
    found = detect(tmp_path)
    assert [d.name for d in found.deps] == ["pip", "poetry"]
    assert found.bootstrap == "scripts/bootstrap.sh"
    assert any("'release'" in n for n in found.notes)
    cfg = _init(tmp_path)  # no terminal, no --yes: every proposal is accepted
    assert list(cfg.services) == ["web", "worker"]
    assert cfg.services["web"].command == "gunicorn app:app --bind 0.0.0.0:$PORT"
    assert cfg.services["worker"].command == "celery -A app worker --loglevel=info"
    assert cfg.services["worker"].cwd == "." and cfg.services["worker"].manager == "command"
    assert cfg.provision.script == "scripts/bootstrap.sh" and not cfg.provision.steps


def test_mixed_tree_ignores_what_the_sync_ignores(tmp_path: Path) -> None:
    _write(tmp_path, {
        ".gitignore": "build/\n/tmp-*\n",
        "go.sum": "",
        "Gemfile.lock": "",
        "Pipfile.lock": "{}",
        "services/rust/Cargo.lock": "",
        "services/rust/Procfile": "app: cargo run\n",
        "web/yarn.lock": "",
        "web/package.json": _package("front", serve="serve -s dist"),
        "web/node_modules/a/package-lock.json": "{}",
        "web/node_modules/a/Procfile": "evil: rm -rf /\n",
        "node_modules/b/yarn.lock": "",
        "vendor/bundle/ruby/Gemfile.lock": "",
        ".venv/lib/requirements.txt": "",
        ".git/poetry.lock": "",
        "build/package-lock.json": "{}",
        "tmp-copy/go.sum": "",
    })
    found = detect(tmp_path)
    assert {d.name: d.files for d in found.deps} == {
        "yarn": ("web/yarn.lock",), "bundler": ("Gemfile.lock",), "go": ("go.sum",),
        "pipenv": ("Pipfile.lock",), "cargo": ("services/rust/Cargo.lock",)}
    cfg = _init(tmp_path, "--yes")
    assert {n: (s.command, s.cwd) for n, s in cfg.services.items()} == {
        "app": ("cargo run", "services/rust"), "front": ("yarn run serve", "web")}
    assert {(r.name, tuple(r.globs), r.command) for r in cfg.deps.rule} == {
        ("pipenv", ("Pipfile.lock",), "pipenv sync"), ("cargo", ("Cargo.lock",), "cargo fetch")}


def test_hostile_names_become_keys_or_notes(tmp_path: Path) -> None:
    odd = "odd\ndir"
    _write(tmp_path, {
        "Procfile": "web server: python -m http.server\n"
                    "$(touch pwned): echo hi\n"
                    "web.1: ./run --port=1\n"
                    '"quoted": echo "q"\n'
                    "日本語: echo nihongo\n"
                    "web: first\n"
                    "no colon here\n"
                    "empty:\n",
        "api/Procfile": "web: second\n",
        "ui/package.json": json.dumps({"name": 'we"b\\', "scripts": {"dev": "next dev"}}),
        "broken/package.json": "{ not json",
        f"{odd}/package-lock.json": "{}",
        f"{odd}/Procfile": "x: y\n",
        "-rf/package.json": _package("-rf", start="node ."),
    })
    found = detect(tmp_path)
    notes = "\n".join(found.notes)
    assert "'日本語'" in notes and "no usable service name" in notes
    assert "Procfile:7: not a 'name: command' line" in notes
    assert "Procfile:8" in notes
    assert "control characters" in notes
    cfg = _init(tmp_path, "--yes")
    assert {n: s.command for n, s in cfg.services.items()} == {
        "web-server": "python -m http.server",
        "touch-pwned": "echo hi",
        "web.1": "./run --port=1",
        "quoted": 'echo "q"',
        "web": "first",
        "api-web": "second",
        "rf": "npm run start",
        "we-b": "npm run dev",
    }
    assert cfg.services["rf"].cwd == "-rf"
    assert not (tmp_path / "pwned").exists()
    # The lock file in the odd folder is listed, on one comment line.
    text = (tmp_path / "dev-sync.toml").read_text()
    assert "odd?dir/package-lock.json" in text
    assert '[services."web.1"]' in text


def test_service_name_rules() -> None:
    assert service_name("web") == "web"
    assert service_name("Web Server!") == "Web-Server"
    assert service_name("--x--") == "x"
    assert service_name("a" * 80) == "a" * 64
    assert service_name("日本") is None and service_name("...") is None


def test_declined_presets_are_switched_off_and_values_are_quoted(tmp_path: Path) -> None:
    _write(tmp_path, {"package-lock.json": "{}", "go.sum": "", "Cargo.lock": ""})
    found = detect(tmp_path)
    accepted, declined = unfold(found, ["go"], [], False)
    assert declined == ["npm"]
    text = render('dev@"box"', '/srv/a "b"', accepted, declined)
    path = tmp_path / "dev-sync.toml"
    path.write_text(text)
    cfg = load_config(path)  # the quotes stay data: one value each
    assert cfg.remote.host == 'dev@"box"' and cfg.remote.path == '/srv/a "b"'
    assert not cfg.deps.npm.enabled and cfg.deps.go.enabled and cfg.deps.rule == []


def test_no_detect_force_and_an_empty_tree(tmp_path: Path, capsys: pytest.CaptureFixture[str]
                                           ) -> None:
    _write(tmp_path, {"Procfile": "web: x\n", "package-lock.json": "{}"})
    cfg = _init(tmp_path, "--no-detect")
    assert cfg.services == {} and cfg.provision.empty
    cwd = Path.cwd()
    os.chdir(tmp_path)
    try:
        assert main(["init", "--yes"]) == 2  # never overwritten without --force
        assert "already exists" in capsys.readouterr().err
        assert main(["init", "--yes", "--force", "--host", "box2"]) == 0
    finally:
        os.chdir(cwd)
    cfg = load_config(tmp_path / "dev-sync.toml")
    assert cfg.remote.host == "box2" and cfg.remote.path == f"/srv/{tmp_path.name}"
    assert list(cfg.services) == ["web"]
    empty = tmp_path / "empty"
    empty.mkdir()
    cfg = _init(empty)
    assert cfg.services == {} and cfg.deps.rule == []
    assert "[provision]" in (empty / "dev-sync.toml").read_text()  # as a commented example


# --------------------------------------------------------------------------
# On a terminal


class Terminal:
    """``dev-sync init`` on a pseudo-terminal: read its prompts, type answers."""

    def __init__(self, cwd: Path, *args: str) -> None:
        self.fd, replica = pty.openpty()
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "dev_sync", "init", *args],
            stdin=replica, stdout=replica, stderr=replica, cwd=cwd,
            env={**os.environ, "TERM": "dumb", "COLUMNS": "200"}, start_new_session=True,
        )
        os.close(replica)
        self.out = ""
        self.seen = 0

    def expect(self, text: str, timeout: float = 20) -> None:
        """Wait until ``text`` appears after what was already matched."""
        deadline = time.monotonic() + timeout
        while text not in self.out[self.seen:]:
            left = deadline - time.monotonic()
            if left <= 0:
                raise AssertionError(f"no {text!r} within {timeout}s; output:\n{self.out}")
            ready, _, _ = select.select([self.fd], [], [], left)
            if ready:
                try:
                    chunk = os.read(self.fd, 4096)
                except OSError:  # the process closed the terminal
                    chunk = b""
                if not chunk:
                    raise AssertionError(f"init exited before {text!r}; output:\n{self.out}")
                self.out += chunk.decode("utf-8", "replace").replace("\r\n", "\n")
        self.seen = self.out.index(text, self.seen) + len(text)

    def answer(self, prompt: str, reply: str) -> None:
        self.expect(prompt)
        os.write(self.fd, reply.encode() + b"\n")

    def finish(self, timeout: float = 20) -> int:
        try:
            while True:  # drain, so the process never blocks on a full terminal
                ready, _, _ = select.select([self.fd], [], [], timeout)
                if not ready:
                    break
                chunk = os.read(self.fd, 4096)
                if not chunk:
                    break
                self.out += chunk.decode("utf-8", "replace").replace("\r\n", "\n")
        except OSError:
            pass
        finally:
            os.close(self.fd)
        return self.proc.wait(timeout)


def test_interactive_init_asks_and_checks_answers(tmp_path: Path) -> None:
    _write(tmp_path, {
        "package-lock.json": "{}",
        "poetry.lock": "",
        "Procfile": "web: python -m http.server\nworker: python worker.py\n",
        "script/bootstrap": "#!/bin/sh\n",
    })
    term = Terminal(tmp_path)
    term.expect("[services]  worker: python worker.py")
    term.answer("ssh destination of the VM", "not valid")
    term.answer("must be an ssh destination", "dev@box")
    term.answer("project folder on the VM", "/etc")
    term.answer("system directory", "/srv/demo")
    term.answer("Run npm installs", "n")
    term.answer("Run poetry installs", "")  # the default: yes
    term.answer("Add service web:", "y")
    term.answer("Add service worker:", "n")
    term.answer("Run script/bootstrap in `dev-sync provision`?", "n")
    assert term.finish() == 0, term.out
    assert "wrote" in term.out
    cfg = load_config(tmp_path / "dev-sync.toml")
    assert (cfg.remote.host, cfg.remote.path) == ("dev@box", "/srv/demo")
    assert not cfg.deps.npm.enabled and cfg.deps.poetry.enabled
    assert list(cfg.services) == ["web"]
    assert cfg.provision.empty


def test_interactive_init_takes_flags_without_asking_for_them(tmp_path: Path) -> None:
    _write(tmp_path, {"Procfile": "web: x\n"})
    term = Terminal(tmp_path, "--host", "box", "--path", "/srv/flagged")
    term.answer("Add service web:", "y")
    assert term.finish() == 0, term.out
    assert "ssh destination" not in term.out
    assert load_config(tmp_path / "dev-sync.toml").remote.path == "/srv/flagged"
    # --yes on a terminal asks nothing at all.
    term = Terminal(tmp_path, "--yes", "--force")
    assert term.finish() == 0, term.out
    assert "?" not in term.out.replace("?dir", "")
    assert list(load_config(tmp_path / "dev-sync.toml").services) == ["web"]
