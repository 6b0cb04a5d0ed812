"""What ``dev-sync init`` finds in a tree, and the ``dev-sync.toml`` it proposes.

A new project should not start from a blank file: the tree already says how
its dependencies are installed (lock files), which processes it runs
(``Procfile`` s, ``package.json`` scripts) and how a machine is bootstrapped
(``script/bootstrap``). :func:`detect` collects that, walking the tree with the
same rules as the sync (so nothing inside ``node_modules``, ``.git`` or a
gitignored folder counts), and :func:`render` writes the proposals the user
accepted as a commented file that ``load_config`` reads.

Choices made here, in one place:

* Lock files map to the ``[deps]`` presets. Presets run without configuration,
  so an accepted one is only listed in a comment; a declined one is written
  as ``enabled = false``. Lock files with no preset (``Pipfile.lock``,
  ``Cargo.lock``) become ``[[deps.rule]]`` tables.
* Every ``name: command`` line of a ``Procfile`` is a service in the
  Procfile's folder, under the ``command`` manager (it needs nothing on the
  VM). ``release`` is Heroku's one-off release phase, not a process: skipped.
* A ``package.json`` gives at most one service: its ``dev`` script if it has
  one, else ``start``, else ``serve``. ``dev`` comes first because a remote
  development machine wants the development server (``next dev``, ``vite``),
  while ``start`` is often the production server that needs a build first;
  a ``dev`` server reloads itself, so it is written with ``reload = "self"``.
  The script runs with the folder's package manager (``pnpm`` or ``yarn``
  when their lock file is in the folder or above it, else ``npm``). A folder
  with a ``Procfile`` gets no ``package.json`` service: the Procfile already
  says what runs there.
* Names are data: a Procfile name that is not a valid service name is turned
  into one (``web server`` -> ``web-server``) or, when nothing is left of it,
  skipped with a note; two services with one name get their folder as prefix.
"""

from __future__ import annotations

import json
import os
import posixpath
import re
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from dev_sync.config import starter_text, toml_key, toml_string
from dev_sync.ignore import RuleSet, walk_dirs
from dev_sync.sections import PRESETS, check_service_name


@dataclass(frozen=True)
class DepsProposal:
    """One package manager found in the tree, with the lock files that show it."""

    name: str
    files: tuple[str, ...]
    command: str
    preset: bool  # a built-in preset (else written as a [[deps.rule]])
    globs: tuple[str, ...] = ()

    def describe(self) -> str:
        return f"{self.name} installs ({self.command}) for {', '.join(self.files)}"


@dataclass(frozen=True)
class ServiceProposal:
    """A process the tree declares, as a ``[services.NAME]`` table."""

    name: str
    command: str
    cwd: str  # relative to the root, "." for the root
    source: str  # where it was found, for the comment and the prompt
    reload_self: bool = False

    def describe(self) -> str:
        where = "" if self.cwd == "." else f" in {self.cwd}"
        return f"service {self.name}: {self.command}{where} (from {self.source})"


@dataclass(frozen=True)
class Detection:
    """Everything found, plus notes about what was left out and why."""

    deps: tuple[DepsProposal, ...] = ()
    services: tuple[ServiceProposal, ...] = ()
    bootstrap: str | None = None  # a provision script, root-relative
    notes: tuple[str, ...] = ()

    @property
    def empty(self) -> bool:
        return not (self.deps or self.services or self.bootstrap)


# Lock files no preset covers, as custom rules: name -> (lock file, command).
EXTRA_RULES: dict[str, tuple[str, str]] = {
    "pipenv": ("Pipfile.lock", "pipenv sync"),
    "cargo": ("Cargo.lock", "cargo fetch"),
}
# Scripts that conventionally bootstrap a machine for a project, first found wins.
# (Not bin/setup: Rails' one ends by starting the development server.)
BOOTSTRAP_SCRIPTS = ("script/bootstrap", "scripts/bootstrap.sh", "scripts/bootstrap",
                     "bootstrap.sh")
PACKAGE_SCRIPTS = ("dev", "start", "serve")
_NOT_A_PROCESS = {"release"}


def detect(root: Path, exclude: Sequence[str] = (), gitignore: bool = True) -> Detection:
    """Scan ``root`` with the sync's rules and propose ``[deps]``, services and a bootstrap."""
    rules = RuleSet(root, exclude, gitignore)
    files: dict[str, list[str]] = {}  # folder -> names of its files
    for rel_dir in walk_dirs(rules):
        try:
            with os.scandir(root / rel_dir if rel_dir else root) as it:
                names = sorted(e.name for e in it if _is_file(e))
        except OSError:
            continue
        kept = [n for n in names
                if not rules.is_excluded_child(_join(rel_dir, n), is_dir=False)]
        if kept:
            files[rel_dir] = kept
    notes: list[str] = []
    deps = _deps(files, notes)
    services = _services(root, files, notes)
    bootstrap = next((s for s in BOOTSTRAP_SCRIPTS
                      if posixpath.basename(s) in files.get(posixpath.dirname(s), [])), None)
    return Detection(tuple(deps), tuple(services), bootstrap, tuple(notes))


def _is_file(entry: os.DirEntry[str]) -> bool:
    try:
        return entry.is_file(follow_symlinks=False)
    except OSError:
        return False


def _join(folder: str, name: str) -> str:
    return f"{folder}/{name}" if folder else name


def _deps(files: dict[str, list[str]], notes: list[str]) -> list[DepsProposal]:
    found: dict[str, list[str]] = {}
    for folder, names in sorted(files.items()):
        node = []
        for name in names:
            rel = _join(folder, name)
            for preset in PRESETS.values():
                if preset.matches(rel):
                    found.setdefault(preset.name, []).append(rel)
                    if preset.name in ("npm", "yarn", "pnpm"):
                        node.append(name)
            for rule, (lock, _) in EXTRA_RULES.items():
                if name == lock:
                    found.setdefault(rule, []).append(rel)
        if len(set(node)) > 1:
            notes.append(f"{folder or 'the root'} has {' and '.join(sorted(set(node)))}: each "
                         "runs its own install there; delete the lock file you do not use")
    out = []
    for name, preset in PRESETS.items():
        if name in found:
            out.append(DepsProposal(name, tuple(found[name]), preset.command, True))
    for name, (lock, command) in EXTRA_RULES.items():
        if name in found:
            out.append(DepsProposal(name, tuple(found[name]), command, False, (lock,)))
    return out


_PROCFILE_LINE = re.compile(r"^([^:#\s][^:]*):(.*)$")


def service_name(raw: str) -> str | None:
    """``raw`` as a valid service name (odd characters become "-"), or None if none is left."""
    name = re.sub(r"[^A-Za-z0-9_.-]+", "-", raw)
    name = re.sub(r"-{2,}", "-", name).strip("-_.")[:64].rstrip("-_.")
    try:
        return check_service_name(name)
    except ValueError:
        return None


def _services(root: Path, files: dict[str, list[str]], notes: list[str]
              ) -> list[ServiceProposal]:
    found: list[ServiceProposal] = []
    taken: set[str] = set()

    def add(raw: str, command: str, folder: str, source: str, reload_self: bool) -> None:
        name = service_name(raw)
        if name is None:
            notes.append(f"{source}: skipped {raw!r}: no usable service name in it "
                         "(use letters, digits, '_', '.' and '-')")
            return
        if name != raw:
            notes.append(f"{source}: {raw!r} is named {name!r} (service names are letters, "
                         "digits, '_', '.' and '-')")
        if name in taken:
            prefixed = service_name(f"{posixpath.basename(folder) or root.name}-{name}")
            base = prefixed if prefixed else name
            name, n = base, 2
            while name in taken:
                name, n = f"{base[:60]}-{n}", n + 1
        taken.add(name)
        found.append(ServiceProposal(name, command, folder or ".", source, reload_self))

    for folder, names in sorted(files.items()):
        if ("Procfile" in names or "package.json" in names) and not _plain_text(folder):
            notes.append(f"{folder!r}: no service proposed there (its name holds control "
                         "characters, which a service folder cannot)")
            continue
        if "Procfile" in names:
            source = _join(folder, "Procfile")
            for raw, command in _procfile(root / source, source, notes):
                add(raw, command, folder, source, False)
        elif "package.json" in names:
            source = _join(folder, "package.json")
            script = _package_script(root / source)
            if script is None:
                continue
            key, raw_name = script
            runner = _node_runner(files, folder)
            fallback = posixpath.basename(folder) or root.name
            add(raw_name or fallback, f"{runner} run {key}", folder,
                f"{source} scripts.{key}", key == "dev")
    return found


def _procfile(path: Path, source: str, notes: list[str]) -> list[tuple[str, str]]:
    try:
        text = path.read_text(encoding="utf-8", errors="replace")
    except OSError:
        return []
    out = []
    for number, line in enumerate(text.splitlines(), 1):
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        m = _PROCFILE_LINE.match(line)
        command = m.group(2).strip() if m else ""
        if m is None or not command or "\0" in command:
            notes.append(f"{source}:{number}: not a 'name: command' line, skipped")
            continue
        raw = m.group(1).strip()
        if raw in _NOT_A_PROCESS:
            notes.append(f"{source}: skipped {raw!r} (a one-off release command, not a process)")
            continue
        out.append((raw, command))
    return out


def _package_script(path: Path) -> tuple[str, str | None] | None:
    """(script key, package name) of the script to run, or None."""
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    if not isinstance(data, dict) or not isinstance(data.get("scripts"), dict):
        return None
    scripts = data["scripts"]
    key = next((k for k in PACKAGE_SCRIPTS if isinstance(scripts.get(k), str)), None)
    if key is None:
        return None
    name = data.get("name")
    # "@acme/web" -> "web": the scope says who owns it, not what it is.
    return key, name.rsplit("/", 1)[-1] if isinstance(name, str) and name else None


def _node_runner(files: dict[str, list[str]], folder: str) -> str:
    """The package manager of ``folder``: the nearest lock file in it or above it."""
    here = folder
    while True:
        names = files.get(here, [])
        if "pnpm-lock.yaml" in names:
            return "pnpm"
        if "yarn.lock" in names:
            return "yarn"
        if "package-lock.json" in names or not here:
            return "npm"
        here = posixpath.dirname(here)


# --------------------------------------------------------------------------
# The file


_DEPS_INTRO = """\

[deps]
# Dependency installs on the remote: when a lock file changes, its package
# manager runs in that file's folder. Built-in presets need no table here.
"""

_SERVICES_INTRO = """\

# Services: long-running commands on the remote. manager = "command" means
# dev-sync starts them itself (nothing to install on the VM); "supervisor"
# also restarts them after a crash. restart_on: gitignore-style globs from
# the tree root whose changes restart the service.
"""

_PROVISION_EXAMPLE = """\

# `dev-sync provision` prepares a fresh VM: packages, the first sync, these
# steps (each runs once per definition), the installs and the services.
# [provision]
# packages = ["rsync"]                   # installed when missing (apt-get/dnf/yum/apk)
# [[provision.steps]]
# name = "database"
# run = ["createdb", "app"]              # an argument list; or shell = "..." for a shell line
# unless = ["psql", "-d", "app", "-c", "select 1"]  # skip when this succeeds, or: creates = "path"
"""


def render(
    host: str,
    path: str,
    accepted: Detection,
    declined_presets: Sequence[str] = (),
) -> str:
    """The commented ``dev-sync.toml`` for the accepted proposals (the starter when none)."""
    parts = [starter_text(host, path)]
    deps_rules = [d for d in accepted.deps if not d.preset]
    if accepted.deps or declined_presets:
        body = [_DEPS_INTRO]
        presets = [d for d in accepted.deps if d.preset]
        if presets:
            body.append("# Found by `dev-sync init`:\n")
            body += [f"#   {d.name:<8} {comment_text(', '.join(d.files))}\n" for d in presets]
            first = presets[0].name
            body.append(f"# Another command for one of them:\n# [deps.{first}]\n"
                        f"# command = {toml_string(presets[0].command)}\n")
        for name in declined_presets:
            body.append(f"\n[deps.{name}]\nenabled = false                 "
                        "# declined at `dev-sync init`\n")
        for d in deps_rules:
            body.append(f"\n[[deps.rule]]                   # found: "
                        f"{comment_text(', '.join(d.files))}\n"
                        f"name = {toml_string(d.name)}\n"
                        f"globs = [{', '.join(toml_string(g) for g in d.globs)}]\n"
                        f"command = {toml_string(d.command)}\n")
        parts.append("".join(body))
    if accepted.services:
        body = [_SERVICES_INTRO]
        for s in accepted.services:
            body.append(f"\n[services.{toml_key(s.name)}]\n"
                        f"# from {comment_text(s.source)}\n"
                        f"command = {toml_string(s.command)}\n"
                        f"cwd = {toml_string(s.cwd)}\n"
                        'manager = "command"\n')
            if s.reload_self:
                body.append('reload = "self"                 # a dev server reloads itself\n')
            elif s.cwd != "." and _PLAIN_FOLDER.fullmatch(s.cwd):
                body.append(f"restart_on = [{toml_string('/' + s.cwd + '/')}]\n")
            else:
                body.append('# restart_on = ["src/**"]      # restart it when these change\n')
            body.append("# port = 3000                   # also exported as PORT\n")
        parts.append("".join(body))
    if accepted.bootstrap:
        parts.append("\n# `dev-sync provision` prepares a fresh VM: packages, the first sync, "
                     "this\n# script (again only when it changes), the installs and the "
                     "services.\n[provision]\n"
                     f"script = {toml_string(accepted.bootstrap)}\n"
                     '# packages = ["rsync"]          # installed when missing\n')
    else:
        parts.append(_PROVISION_EXAMPLE)
    return "".join(parts)


# Folders written into a restart_on glob as they are: nothing gitignore reads specially.
_PLAIN_FOLDER = re.compile(r"[A-Za-z0-9_.-]+(?:/[A-Za-z0-9_.-]+)*")


def _plain_text(text: str) -> bool:
    return all(c.isprintable() for c in text)


def comment_text(text: str) -> str:
    """Text safe inside a TOML comment (one line, no control characters)."""
    return "".join(c if c.isprintable() else "?" for c in text)


def unfold(found: Detection, keep_deps: Sequence[str], keep_services: Sequence[str],
           keep_bootstrap: bool) -> tuple[Detection, list[str]]:
    """The accepted part of ``found`` and the presets to switch off (declined ones)."""
    deps = tuple(d for d in found.deps if d.name in keep_deps)
    declined = [d.name for d in found.deps if d.preset and d.name not in keep_deps]
    services = tuple(s for s in found.services if s.name in keep_services)
    return Detection(deps, services, found.bootstrap if keep_bootstrap else None,
                     found.notes), declined


