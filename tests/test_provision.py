"""``dev-sync provision``: the [provision] section, and whole runs against the sandbox sshd.

The runs are real: a separate ``dev-sync provision --json`` process, the
sandbox sshd, real rsync, a custom [deps] rule as the install (no network)
and a service under the command manager. Each step appends to a counter file
outside the remote root, so the tests count executions instead of trusting
the report alone.
"""

from __future__ import annotations

import contextlib
import json
import os
import shlex
import signal
import subprocess
from pathlib import Path
from typing import Any

import pytest
from driver import json_events, run_cli
from helpers import Project, ssh_run, wait_until

from dev_sync import runner
from dev_sync.config import parse_config
from dev_sync.errors import ConfigError
from dev_sync.provision import (
    PackageProbe,
    ProvisionConfig,
    package_commands,
    parse_probe,
    parse_record,
    plan_steps,
    probe_argv,
)
from dev_sync.sandbox import SandboxInfo


@pytest.fixture(autouse=True)
def _state_dir(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("DEV_SYNC_STATE_DIR", str(tmp_path / "state"))


# --------------------------------------------------------------------------
# Configuration


def _parse(provision: str) -> ProvisionConfig:
    import tomllib

    text = f'[remote]\nhost = "box"\npath = "/srv/app"\n{provision}'
    return parse_config(tomllib.loads(text), Path("dev-sync.toml")).provision


def test_steps_script_and_packages_parse() -> None:
    cfg = _parse(
        '[provision]\npackages = ["rsync", "libstdc++6", "libc6:amd64"]\n'
        '[[provision.steps]]\nname = "db"\nrun = ["createdb", "app"]\n'
        'unless = ["psql", "-d", "app", "-c", ""]\n'
        '[[provision.steps]]\nname = "assets"\nshell = "make assets && touch done"\n'
        'creates = "done"\ncwd = "web/"\n'
    )
    assert cfg.packages == ["rsync", "libstdc++6", "libc6:amd64"]
    assert [s.name for s in cfg.steps] == ["db", "assets"]
    assert cfg.steps[1].cwd == "web"
    assert _parse('[provision]\nscript = "scripts/bootstrap.sh"\n').script == "scripts/bootstrap.sh"
    assert _parse("").empty


@pytest.mark.parametrize(
    ("text", "needle"),
    [
        ('[provision]\nscript = "a.sh"\n[[provision.steps]]\nname = "x"\nrun = ["true"]\n',
         "either script"),
        ('[[provision.steps]]\nname = "x"\n', "exactly one of run"),
        ('[[provision.steps]]\nname = "x"\nrun = ["a"]\nshell = "b"\n', "exactly one of run"),
        ('[[provision.steps]]\nname = "x"\nrun = []\n', "non-empty argument list"),
        ('[[provision.steps]]\nname = "x"\nshell = "a"\n[[provision.steps]]\nname = "x"\n'
         'shell = "b"\n', "used twice"),
        ('[[provision.steps]]\nname = "a b"\nshell = "a"\n', "step names"),
        ('[[provision.steps]]\nname = "packages"\nshell = "a"\n', "packages phase"),
        ('[[provision.steps]]\nname = "x"\nshell = "a"\ncwd = "../up"\n', "inside the remote"),
        ('[provision]\npackages = ["-oDebug=1"]\n', "not a package name"),
        ('[provision]\npackages = ["redis=7"]\n', "not a package name"),
        ('[provision]\nscript = "/etc/passwd"\n', "relative"),
        ('[provision]\ncommand = "x"\n', "unknown key"),
    ],
)
def test_bad_provision_config_names_the_key(text: str, needle: str) -> None:
    with pytest.raises(ConfigError) as err:
        _parse(text)
    assert "[provision]" in err.value.cause and needle in err.value.cause


def test_step_digest_follows_the_definition(tmp_path: Path) -> None:
    one = plan_steps(_parse('[[provision.steps]]\nname = "a"\nshell = "echo 1"\n'), tmp_path)
    same = plan_steps(_parse('[[provision.steps]]\nname = "a"\nshell = "echo 1"\n'), tmp_path)
    other = plan_steps(_parse('[[provision.steps]]\nname = "a"\nshell = "echo 2"\n'), tmp_path)
    guarded = plan_steps(
        _parse('[[provision.steps]]\nname = "a"\nshell = "echo 1"\ncreates = "x"\n'), tmp_path)
    assert one[0].digest == same[0].digest
    assert len({one[0].digest, other[0].digest, guarded[0].digest}) == 3

    script = tmp_path / "boot.sh"
    script.write_text("echo 1\n")
    first = plan_steps(_parse('[provision]\nscript = "boot.sh"\n'), tmp_path)[0]
    script.write_text("echo 2\n")
    second = plan_steps(_parse('[provision]\nscript = "boot.sh"\n'), tmp_path)[0]
    assert first.name == "boot.sh" and first.digest != second.digest
    assert first.args == ("./boot.sh",)


def test_run_steps_keep_their_arguments_as_data(tmp_path: Path) -> None:
    hostile = ["printf", "%s\\n", "$(touch pwned)", "; rm -rf /", "-n"]
    step = plan_steps(_parse(
        "[[provision.steps]]\nname = \"a\"\nrun = [" + ", ".join(json.dumps(a) for a in hostile)
        + "]\n"), tmp_path)[0]
    assert step.args == tuple(hostile)
    out = runner.run(["sh", "-c", step.command, "sh", *step.args], cwd=str(tmp_path)).out
    assert out.splitlines() == ["$(touch pwned)", "; rm -rf /", "-n"]
    assert not (tmp_path / "pwned").exists()


# --------------------------------------------------------------------------
# Packages


def test_package_commands_per_manager_and_user() -> None:
    missing = ("redis-server", "libpq-dev")
    assert package_commands(PackageProbe("apt", True, False, ())) == []
    assert package_commands(PackageProbe("apt", True, False, missing)) == [
        ["apt-get", "update", "-q"],
        ["env", "DEBIAN_FRONTEND=noninteractive", "apt-get", "install", "-y", "-q",
         "--no-install-recommends", "redis-server", "libpq-dev"],
    ]
    assert package_commands(PackageProbe("apt", False, True, missing))[0] == [
        "sudo", "-n", "apt-get", "update", "-q"]
    assert package_commands(PackageProbe("dnf", False, True, missing)) == [
        ["sudo", "-n", "dnf", "install", "-y", "redis-server", "libpq-dev"]]
    assert package_commands(PackageProbe("yum", True, True, ("git",))) == [
        ["yum", "install", "-y", "git"]]
    assert package_commands(PackageProbe("apk", False, True, ("git",))) == [
        ["sudo", "-n", "apk", "add", "--no-cache", "git"]]
    with pytest.raises(Exception, match="no sudo"):
        package_commands(PackageProbe("apt", False, False, ("git",)))
    with pytest.raises(Exception, match="no apt-get"):
        package_commands(PackageProbe(None, True, False, ("git",)))


def test_parse_probe_and_record() -> None:
    probe = parse_probe("pm=dnf\nuid=1000\nsudo=1\nmissing=git\nmissing=libstdc++\n")
    assert probe == PackageProbe("dnf", False, True, ("git", "libstdc++"))
    assert parse_probe("pm=none\nuid=0\nsudo=0\n").manager is None
    digest = "a" * 64
    assert parse_record(json.dumps({"steps": {"a": {"hash": digest}, "b": {"hash": "x"}}})
                        .encode()) == {"a": digest}
    assert parse_record(b"not json") == {} and parse_record(b"") == {}


def test_probe_on_the_real_remote_finds_only_the_missing(sandbox: SandboxInfo) -> None:
    """The sandbox is this Debian machine: rsync and openssh-client are installed."""
    if runner.run(["sh", "-c", "command -v dpkg-query"], check=False).returncode != 0:
        pytest.skip("needs a dpkg-based machine")
    wanted = ["rsync", "openssh-client", "dev-sync-no-such-package"]
    probe = parse_probe(ssh_run(sandbox, probe_argv(wanted)).out)
    assert probe.manager == "apt"
    assert probe.root == (os.getuid() == 0)
    assert probe.missing == ("dev-sync-no-such-package",)
    assert package_commands(parse_probe(ssh_run(sandbox, probe_argv(wanted[:2])).out)) == []


# --------------------------------------------------------------------------
# Whole runs


def _provision(project: Project, *args: str) -> tuple[subprocess.CompletedProcess[str],
                                                       list[dict[str, Any]]]:
    proc = run_cli("provision", "--json", "--config", str(project.config), *args, timeout=180)
    return proc, json_events(proc.stdout)


def _statuses(events: list[dict[str, Any]]) -> dict[str, str]:
    """Each step's final status (the last provision_step event of each name)."""
    return {e["name"]: e["status"] for e in events
            if e["event"] == "provision_step" and e["status"] != "running"}


def _count(path: Path) -> int:
    return len(path.read_text().splitlines()) if path.exists() else 0


def _stop_services(remote: Path) -> None:
    """Stop what the command manager started (its process groups), so nothing outlives a test."""
    for pidfile in (remote / ".dev-sync" / "run").glob("*.pid"):
        with contextlib.suppress(OSError, ValueError):
            os.killpg(int(pidfile.read_text().strip()), signal.SIGKILL)


def _first(events: list[dict[str, Any]], kind: str, **match: object) -> int:
    for i, e in enumerate(events):
        if e["event"] == kind and all(e.get(k) == v for k, v in match.items()):
            return i
    raise AssertionError(f"no {kind} {match} in {[e['event'] for e in events]}")


def _config(project: Project, counts: Path, steps: list[dict[str, Any]]) -> None:
    # What a step creates in the remote root must be excluded from the sync,
    # or the next reconcile deletes it as a file the local tree does not have.
    project.write_config(exclude=["/made.flag", "generated.txt"], sections={
        "provision": {"packages": ["rsync", "openssh-client"], "steps": steps},
        "deps": {"rule": [{"name": "gen", "globs": ["gen.lock"],
                           "command": f"cp gen.lock generated.txt; echo ran >> {counts}/gen"}]},
        "services.idle": {"manager": "command",
                          "command": f"echo started >> {counts}/service; exec sleep 600"},
    })


def test_provision_twice_changes_nothing_the_second_time(project: Project,
                                                         tmp_path: Path) -> None:
    counts = tmp_path / "counts"
    counts.mkdir()
    (project.local / "app.txt").write_text("hello from the tree\n")
    (project.local / "gen.lock").write_text("v1\n")
    (project.local / "sub").mkdir()
    (project.local / "sub" / "gen.lock").write_text("sub v1\n")
    steps: list[dict[str, Any]] = [
        {"name": "argv", "run": ["sh", "-c", 'echo ran >> "$1"; echo "argv says $2"', "sh",
                                 str(counts / "argv"), "$(not expanded)"]},
        {"name": "reads-tree", "shell": f"echo ran >> {counts}/shell && cat app.txt"},
        {"name": "makes-flag", "shell": f"echo ran >> {counts}/flag; touch made.flag",
         "creates": "made.flag"},
        {"name": "already", "shell": f"echo ran >> {counts}/already",
         "unless": ["test", "-e", "app.txt"]},
    ]
    _config(project, counts, steps)
    try:
        first, events = _provision(project)
        assert first.returncode == 0, first.stderr
        assert _statuses(events) == {"packages": "unchanged", "argv": "ok", "reads-tree": "ok",
                                     "makes-flag": "ok", "already": "satisfied"}
        lines = [(e["name"], e["line"]) for e in events if e["event"] == "provision_line"]
        assert ("argv", "argv says $(not expanded)") in lines
        assert ("reads-tree", "hello from the tree") in lines  # the tree was synced first
        # Order: packages, sync, steps, installs, services.
        order = [_first(events, "provision_step", name="packages"),
                 _first(events, "reconciled"),
                 _first(events, "provision_step", name="argv"),
                 _first(events, "install_started"),
                 _first(events, "services_installed")]
        assert order == sorted(order)
        done = events[-1]
        assert done["event"] == "provisioned" and done["changed"] is True
        # Every folder with a lock file gets its install, in that folder.
        assert done["installs"] == ["gen at the root", "gen in sub"] and done["sent"] >= 3
        assert (project.remote / "generated.txt").read_text() == "v1\n"
        assert (project.remote / "sub" / "generated.txt").read_text() == "sub v1\n"
        record = json.loads((project.remote / ".dev-sync" / "provision.json").read_text())
        assert set(record["steps"]) == {"argv", "reads-tree", "makes-flag", "already"}
        wait_until(lambda: _count(counts / "service") == 1, timeout=10)
        listed = run_cli("services", "--json", "--config", str(project.config))
        assert [(s["name"], s["state"]) for s in json.loads(listed.stdout)] == [
            ("idle", "running")], listed.stderr

        second, events = _provision(project)
        assert second.returncode == 0, second.stderr
        assert _statuses(events) == {"packages": "unchanged", "argv": "unchanged",
                                     "reads-tree": "unchanged", "makes-flag": "unchanged",
                                     "already": "unchanged"}
        assert not [e for e in events if e["event"] in ("provision_line", "install_started")]
        done = events[-1]
        assert done["changed"] is False, done
        assert done["sent"] == 0 and done["deleted"] == 0
        assert done["services_changed"] == []
        assert {name: _count(counts / name) for name in
                ("argv", "shell", "flag", "already", "gen", "service")} == {
            "argv": 1, "shell": 1, "flag": 1, "already": 0, "gen": 2, "service": 1}

        # The human report of a no-op run says so.
        text = run_cli("provision", "--config", str(project.config), timeout=180)
        assert text.returncode == 0, text.stderr
        assert "already provisioned: no changes" in text.stdout

        # A changed definition runs that step again, and only that one.
        steps[1] = {**steps[1], "shell": steps[1]["shell"] + " && echo second version"}
        _config(project, counts, steps)
        third, events = _provision(project)
        assert third.returncode == 0, third.stderr
        assert _statuses(events) == {"packages": "unchanged", "argv": "unchanged",
                                     "reads-tree": "ok", "makes-flag": "unchanged",
                                     "already": "unchanged"}
        assert _count(counts / "shell") == 2 and _count(counts / "argv") == 1

        # A guard is checked every time: the work gone, the step runs again.
        (project.remote / "made.flag").unlink()
        fourth, events = _provision(project)
        assert fourth.returncode == 0, fourth.stderr
        assert _statuses(events)["makes-flag"] == "ok" and _count(counts / "flag") == 2
    finally:
        _stop_services(project.remote)


def test_failing_step_stops_with_exit_1_tail_and_rerun(project: Project, tmp_path: Path,
                                                        sandbox: SandboxInfo) -> None:
    counts = tmp_path / "counts"
    counts.mkdir()
    steps: list[dict[str, Any]] = [
        {"name": "before", "shell": f"echo ran >> {counts}/before"},
        {"name": "boom", "shell": "echo some context; echo the real cause >&2; exit 7"},
        {"name": "boom-argv", "run": ["sh", "-c", "echo argv cause; exit 5"]},
        {"name": "after", "shell": f"echo ran >> {counts}/after"},
    ]
    project.write_config(sections={"provision": {"steps": steps}})
    proc, events = _provision(project)
    assert proc.returncode == 1
    assert _statuses(events) == {"before": "ok", "boom": "failed"}
    assert "'boom' failed (exit 7)" in proc.stderr
    assert "the real cause" in proc.stderr and "some context" in proc.stderr
    assert _count(counts / "after") == 0
    failed = next(e for e in events if e.get("status") == "failed")
    assert failed["code"] == 7 and "the real cause" in failed["tail"]
    assert failed["rerun"] in proc.stderr
    # The printed command runs the same step by hand.
    by_hand = runner.run(shlex.split(failed["rerun"]), check=False, timeout=30)
    assert by_hand.returncode == 7 and "the real cause" in by_hand.out + by_hand.err
    assert not [e for e in events if e["event"] == "provisioned"]
    record = json.loads((project.remote / ".dev-sync" / "provision.json").read_text())
    assert set(record["steps"]) == {"before"}

    # Fixed: the finished step stays done, the rest runs (up to the next failure).
    steps[1] = {"name": "boom", "shell": "echo fixed"}
    project.write_config(sections={"provision": {"steps": steps}})
    proc, events = _provision(project)
    assert proc.returncode == 1
    assert _statuses(events) == {"before": "unchanged", "boom": "ok", "boom-argv": "failed"}
    failed = next(e for e in events if e.get("status") == "failed")
    # An argument list reads as one: "cd ROOT && sh -c '...'", not wrapped in another sh -c.
    assert shlex.split(failed["rerun"])[-1].endswith("&& sh -c 'echo argv cause; exit 5'")
    by_hand = runner.run(shlex.split(failed["rerun"]), check=False, timeout=30)
    assert by_hand.returncode == 5 and "argv cause" in by_hand.out

    steps[2] = {"name": "boom-argv", "run": ["true"]}
    project.write_config(sections={"provision": {"steps": steps}})
    proc, events = _provision(project)
    assert proc.returncode == 0, proc.stderr
    assert _statuses(events) == {"before": "unchanged", "boom": "unchanged", "boom-argv": "ok",
                                 "after": "ok"}
    assert _count(counts / "before") == 1 and _count(counts / "after") == 1


def test_script_runs_once_per_version(project: Project, tmp_path: Path) -> None:
    counter = tmp_path / "script-runs"
    script = project.local / "scripts" / "bootstrap.sh"
    script.parent.mkdir()
    script.write_text(f'#!/bin/sh\necho ran >> {counter}\necho "bootstrapping in $(pwd)"\n')
    script.chmod(0o755)
    project.write_config(sections={"provision": {"script": "scripts/bootstrap.sh"}})
    proc, events = _provision(project)
    assert proc.returncode == 0, proc.stderr
    assert _statuses(events) == {"scripts/bootstrap.sh": "ok"}
    assert f"bootstrapping in {project.remote}" in [
        e["line"] for e in events if e["event"] == "provision_line"]
    proc, events = _provision(project)
    assert _statuses(events) == {"scripts/bootstrap.sh": "unchanged"}
    assert _count(counter) == 1
    script.write_text(script.read_text() + "echo v2\n")
    proc, events = _provision(project)
    assert proc.returncode == 0, proc.stderr
    assert _statuses(events) == {"scripts/bootstrap.sh": "ok"} and _count(counter) == 2


def test_script_that_the_sync_excludes_is_refused(project: Project) -> None:
    (project.local / "boot.sh").write_text("true\n")
    (project.local / ".gitignore").write_text("boot.sh\n")
    project.write_config(sections={"provision": {"script": "boot.sh"}})
    proc, _ = _provision(project)
    assert proc.returncode == 2
    assert "excluded from the sync" in proc.stderr
    assert not project.remote.exists()
