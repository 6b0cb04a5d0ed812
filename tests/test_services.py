"""Services without a remote: config checks, restart matching, parsers, generated files.

What the managers print and what dev-sync writes for them is pinned here;
that the remote side really behaves so is shown by test_services_remote.py.
"""

from __future__ import annotations

import json
import subprocess
import tomllib
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import pytest
from pydantic import Field, ValidationError

from dev_sync import runner
from dev_sync.config import _format_error, _Strict
from dev_sync.errors import ConnectionFailed, DevSyncError, UsageError
from dev_sync.services import (
    CommandManager,
    ManagerName,
    Pm2Manager,
    ProcessManager,
    ServiceConfig,
    ServiceName,
    ServiceStatus,
    SupervisorManager,
    SystemdManager,
    clean_pm2_logs,
    launcher_text,
    managers_for,
    matches_restart_on,
    parse_command_status,
    parse_pm2_jlist,
    parse_supervisor_status,
    parse_systemd_show,
    restart_and_check,
    services_to_restart,
    supervisor_programs_text,
    supervisor_socket,
    supervisord_conf_text,
    systemd_status,
    systemd_unit_name,
    systemd_unit_text,
)


class _Project(_Strict):
    """The shape the top-level Config gives ``[services]``."""

    services: dict[ServiceName, ServiceConfig] = Field(default_factory=dict)


def parse(text: str) -> dict[str, ServiceConfig]:
    return _Project.model_validate(tomllib.loads(text)).services


def errors(text: str) -> list[str]:
    with pytest.raises(ValidationError) as exc:
        parse(text)
    return [_format_error(Path("dev-sync.toml"), e) for e in exc.value.errors()]


def svc(command: str = "run", **fields: Any) -> ServiceConfig:
    return ServiceConfig.model_validate({"command": command, **fields})


# --------------------------------------------------------------------------
# Configuration


def test_full_service_table_and_defaults() -> None:
    services = parse(
        """
        [services.api]
        command = "python3 server.py"
        cwd = "services/api/"
        env = { DEBUG = "1" }
        restart_on = ["services/api/**/*.py", "!**/test_*.py", "requirements.txt"]
        port = 8000
        hostname = "api.dev.local"

        [services.web]
        command = "npm run dev"
        reload = "self"
        manager = "pm2"

        [services.legacy]
        manager = "systemd"
        program = "legacy-app.service"
        """
    )
    api = services["api"]
    assert api.cwd == "services/api" and api.env == {"DEBUG": "1"} and api.port == 8000
    assert api.manager == "supervisor" and api.reload == "restart" and not api.adopted
    assert services["web"].reload == "self" and services["web"].cwd == "."
    assert services["legacy"].adopted and services["legacy"].command is None


@pytest.mark.parametrize(
    ("text", "needle"),
    [
        ('[services.web]\ncommand = "x"\nmanager = "docker"\n', "[services] web.manager: Input"),
        ('[services.web]\ncwd = "a"\n', "[services] web.command: required"),
        ('[services.web]\ncommand = "  "\n', "[services] web.command: must be a non-empty"),
        (
            '[services.web]\nprogram = "x"\n',
            "[services] web.command: required with manager = 'supervisor'",
        ),
        (
            '[services.web]\nprogram = "x"\nmanager = "command"\n',
            "[services] web.command: required with manager = 'command'",
        ),
        (
            '[services.web]\ncommand = "x"\nrestart_on = ["src/[ab"]\n',
            "[services] web.restart_on.0: 'src/[ab' is not a valid gitignore pattern",
        ),
        (
            '[services.web]\ncommand = "x"\nrestart_on = ["ok/*", ""]\n',
            "[services] web.restart_on.1: patterns must not be empty",
        ),
        (
            '[services.web]\ncommand = "x"\nrestart_on = ["../up/*.py"]\n',
            "[services] web.restart_on.0: patterns are relative to the tree root",
        ),
        (
            '[services.web]\ncommand = "x"\nrestart_on = ["#x"]\n',
            "would be a comment",
        ),
        ('[services.web]\ncommand = "x"\ncolour = 1\n', "[services] web.colour: unknown key"),
        ('[services.web]\ncommand = "x"\nport = 0\n', "[services] web.port: Input should be"),
        ('[services.web]\ncommand = "x"\nport = 70000\n', "[services] web.port"),
        ('[services.web]\ncommand = "x"\nport = "80"\n', "[services] web.port"),
        ('[services.web]\ncommand = "x"\nenv = { PORT = 80 }\n', "[services] web.env.PORT"),
        ('[services.web]\ncommand = "x"\nenv = { "A-B" = "1" }\n', "not an environment variable"),
        ('[services.web]\ncommand = "x"\ncwd = "../up"\n', "[services] web.cwd: must stay inside"),
        ('[services.web]\ncommand = "x"\ncwd = "/srv"\n', "[services] web.cwd: must be a folder"),
        ('[services.web]\ncommand = "x"\nreload = "hot"\n', "[services] web.reload: Input"),
        ('[services.web]\ncommand = "x"\nhostname = "a b"\n', "[services] web.hostname"),
        ('[services.web]\ncommand = "x"\nprogram = "a b"\n', "[services] web.program"),
        ('[services."a b"]\ncommand = "x"\n', "service names are letters"),
        ('[services."-x"]\ncommand = "x"\n', "service names are letters"),
    ],
)
def test_bad_service_config_names_the_key(text: str, needle: str) -> None:
    found = errors(text)
    assert any(needle in line for line in found), found


def test_models_are_frozen() -> None:
    service = svc()
    with pytest.raises(ValidationError):
        service.command = "other"


# --------------------------------------------------------------------------
# Which changes restart what


def test_services_to_restart_reports_the_first_matching_path() -> None:
    services = {
        "api": svc(restart_on=["services/api/**/*.py", "!**/test_*.py"]),
        "worker": svc(restart_on=["worker/", "requirements.txt"]),
        "web": svc(restart_on=["web/**"], reload="self"),
        "idle": svc(),
    }
    changed = [
        "README.md",
        "services/api/tests/test_server.py",
        "web/app.js",
        "services/api/server.py",
        "requirements.txt",
    ]
    assert services_to_restart(changed, services) == {
        "api": "services/api/server.py",
        "worker": "requirements.txt",
    }
    assert services_to_restart(iter(["worker/jobs/a.py"]), services) == {
        "worker": "worker/jobs/a.py"
    }
    assert services_to_restart([], services) == {}


@pytest.mark.parametrize(
    ("patterns", "path", "expected"),
    [
        (["*.py"], "a/b/c.py", True),  # floating: any depth
        (["/*.py"], "a/c.py", False),  # anchored at the root
        (["/*.py"], "c.py", True),
        (["src/"], "src/deep/file.txt", True),  # inside a matched folder
        (["src/"], "src", False),  # a file named src is not the folder
        (["src/"], "src/", True),  # the folder itself, changed as a whole
        (["src/**"], "src/", True),  # everything in it
        (["*.py"], "src/", False),  # some files in it: pass the files
        (["src/**", "!src/*.md"], "src/README.md", False),
        (["src/**", "!src/*.md"], "src/x/README.md", True),
        (["docs/", "!docs/keep.md"], "docs/keep.md", True),  # git: no re-include inside
        (["a/**/b.txt"], "a/b.txt", True),
        (["a/**/b.txt"], "a/x/y/b.txt", True),
        (["pkg/[ab].js"], "pkg/a.js", True),
        (["pkg/[ab].js"], "pkg/c.js", False),
        (["*.lock"], "./x.lock", True),
        ([], "anything", False),
    ],
)
def test_restart_on_uses_gitignore_semantics(
    patterns: list[str], path: str, expected: bool
) -> None:
    assert matches_restart_on(patterns, path) is expected


# --------------------------------------------------------------------------
# The launcher every manager runs


def test_launcher_keeps_every_value_literal(tmp_path: Path) -> None:
    root = tmp_path / "root dir; $(x)"
    (root / "svc 'a'").mkdir(parents=True)
    weird = 'it\'s "$HOME" `id` ; # % \\n'
    service = svc(
        command='printf "%s|%s|%s|%s\\n" "$PWD" "$WEIRD" "$PORT" "$0"; exit 7',
        cwd="svc 'a'",
        env={"WEIRD": weird},
        port=8123,
    )
    text = launcher_text("web", service, str(root))
    # Pure parsing check: run the launcher with the local sh.
    done = subprocess.run(["/bin/sh", "-c", text], capture_output=True, text=True, check=False)
    assert done.returncode == 7, done.stderr
    assert done.stdout == f"{root}/svc 'a'|{weird}|8123|/bin/sh\n"


def test_a_simple_command_is_execd_so_the_manager_sees_the_server(tmp_path: Path) -> None:
    service = svc(command="sh -c 'echo $$ > pid; exec sleep 5'", cwd=".")
    assert "exec /bin/sh -c" in launcher_text("web", service, str(tmp_path))
    simple = svc(command="python3 -c pass --flag 'two words'", cwd=".")
    text = launcher_text("web", simple, str(tmp_path))
    assert text.splitlines()[-1] == "exec python3 -c pass --flag 'two words'"
    # The launcher's own process becomes the program: same pid all the way.
    probe = svc(command=f"python3 {tmp_path / 'p.py'}", cwd=".")
    (tmp_path / "p.py").write_text("import os; print(os.getpid())\n")
    proc = subprocess.Popen(["/bin/sh", "-c", launcher_text("web", probe, str(tmp_path))],
                            stdout=subprocess.PIPE, text=True)
    out, _ = proc.communicate(timeout=30)
    assert int(out) == proc.pid


def test_launcher_port_does_not_override_env() -> None:
    text = launcher_text("web", svc(port=80, env={"PORT": "9000"}), "/srv/app")
    assert "export PORT=9000" in text and "export PORT=80" not in text


# --------------------------------------------------------------------------
# Supervisor


SUPERVISOR_STATUS = """\
web                              RUNNING   pid 4242, uptime 1 day, 2:03:04
api                              RUNNING   pid 17, uptime 0:00:05
crash                            BACKOFF   Exited too quickly (process log may have details)
dead                             FATAL     Exited too quickly (process log may have details)
done                             EXITED    Nov 27 09:38 AM
idle                             STOPPED   Not started
boot                             STARTING  {trailing}
grp:member                       STOPPING  {trailing}
nope: ERROR (no such process)
""".format(trailing="")


def test_parse_supervisor_status() -> None:
    found = parse_supervisor_status(SUPERVISOR_STATUS)
    assert found["web"] == ServiceStatus("web", "running", 4242, 93784.0, None, detail="running")
    assert found["api"].uptime_s == 5.0
    assert found["crash"].state == "crashed" and "Exited too quickly" in found["crash"].detail
    assert found["dead"].state == "crashed"
    assert found["done"].state == "crashed"
    assert found["idle"].state == "stopped" and found["idle"].pid is None
    assert found["boot"].state == "starting"
    assert found["grp:member"].state == "stopped"
    assert "nope" not in found and "nope:" not in found


def test_supervisor_files_hold_no_user_text() -> None:
    services = {"web": svc("node app.js ; # not a comment %(here)s"), "adopt": svc()}
    programs = supervisor_programs_text(services)
    assert "[program:web]" in programs and "node" not in programs
    assert "command = /bin/sh ../services/web.sh" in programs
    assert "stdout_logfile = %(here)s/../logs/web.log" in programs
    assert "stopasgroup = true" in programs and "startretries = 3" in programs
    named = supervisor_programs_text({"web": svc(program="frontend")})
    assert "[program:frontend]" in named and "../services/web.sh" in named


def test_supervisor_socket_moves_to_tmp_when_the_path_is_too_long() -> None:
    assert supervisor_socket("/srv/app") == "%(here)s/supervisor.sock"
    long_root = "/srv/" + "x" * 80
    sock = supervisor_socket(long_root)
    assert sock.startswith("/tmp/dev-sync-supervisor-") and len(sock) < 60
    assert sock == supervisor_socket(long_root) != supervisor_socket(long_root + "y")
    conf = supervisord_conf_text(long_root)
    assert f"file = {sock}" in conf and f"serverurl = unix://{sock}" in conf
    assert "files = programs.conf" in conf


# --------------------------------------------------------------------------
# PM2


def _proc(name: str, status: str, pid: int, restarts: int, started_ms: int) -> dict[str, Any]:
    env = {"status": status, "restart_time": restarts, "pm_uptime": started_ms}
    return {"name": name, "pid": pid, "pm2_env": env}


def test_parse_pm2_jlist_takes_the_last_json_array() -> None:
    procs = [_proc("web", "online", 99, 2, 1_000_000)]
    text = "\n".join(
        [
            "now=1100",
            "[PM2] Spawning PM2 daemon with pm2_home=/home/dev/.pm2",
            "\x1b[32m[PM2]\x1b[39m PM2 Successfully daemonized",
            ">>>> In-memory PM2 is out-of-date, do:",
            '{"not": "a list"}',
            "[oops not json",
            json.dumps(procs),
            "",
        ]
    )
    assert parse_pm2_jlist(text) == procs
    with pytest.raises(DevSyncError, match="no process list"):
        parse_pm2_jlist("[PM2] Spawning PM2 daemon\n")


async def test_pm2_status_mapping() -> None:
    procs = [
        _proc("web", "online", 99, 2, 1_000_000),
        _proc("bad", "errored", 0, 16, 1_000_000),
        _proc("off", "stopped", 0, 0, 1_000_000),
    ]
    remote = Canned((0, "now=1100\n" + json.dumps(procs) + "\n", ""))
    services = {
        "web": svc(manager="pm2", port=3000),
        "bad": svc(manager="pm2"),
        "off": svc(manager="pm2"),
        "gone": svc(manager="pm2"),
    }
    found = await Pm2Manager(remote, "/srv/app", "demo", services).status()
    assert found["web"] == ServiceStatus("web", "running", 99, 100.0, 2, 3000, "online")
    assert found["bad"].state == "crashed" and found["bad"].pid is None
    assert found["off"].state == "stopped"
    assert found["gone"].state == "unknown"
    assert remote.calls[0][:3] == ["env", "FORCE_COLOR=0", "/bin/sh"]


def test_clean_pm2_logs() -> None:
    raw = (
        "\x1b[90m[TAILING] Tailing last 5 lines for [crash] process (change the value "
        "with --lines option)\x1b[39m\n"
        "\x1b[90m/srv/app/.dev-sync/logs/crash.log last 5 lines:\x1b[39m\n"
        "boom\nboom 2\n\n"
    )
    assert clean_pm2_logs(raw) == "boom\nboom 2\n"


# --------------------------------------------------------------------------
# systemd


def test_systemd_unit_text_escapes_for_systemd() -> None:
    text = systemd_unit_text("web", svc(), '/srv/a "b" 100%$x')
    assert 'ExecStart=/bin/sh "/srv/a \\"b\\" 100%%$$x/.dev-sync/services/web.sh"' in text
    assert 'StandardOutput=append:/srv/a "b" 100%%$x/.dev-sync/logs/web.log' in text
    assert "Restart=on-failure" in text and "StartLimitBurst=3" in text
    assert "WantedBy=default.target" in text
    assert systemd_unit_name("web", svc()) == "devsync-web.service"
    assert systemd_unit_name("web", svc(program="front")) == "devsync-front.service"
    adopted = ServiceConfig(manager="systemd", program="legacy")
    assert systemd_unit_name("old", adopted) == "legacy.service"
    timer = ServiceConfig(manager="systemd", program="x@1.service")
    assert systemd_unit_name("old", timer) == "x@1.service"


SYSTEMD_SHOW = """\
Id=devsync-web.service
MainPID=321
NRestarts=0
ExecMainStartTimestampMonotonic=5000000
LoadState=loaded
ActiveState=active
SubState=running

ExecMainStartTimestampMonotonic=0
Id=devsync-crash.service
LoadState=loaded
ActiveState=activating
SubState=auto-restart
MainPID=0
NRestarts=4

Id=devsync-gone.service
LoadState=not-found
ActiveState=inactive
SubState=dead
MainPID=0
NRestarts=0
"""


def test_parse_systemd_show() -> None:
    units = parse_systemd_show(SYSTEMD_SHOW)
    assert set(units) == {"devsync-web.service", "devsync-crash.service", "devsync-gone.service"}
    web = systemd_status("web", units["devsync-web.service"], 12.5)
    assert web == ServiceStatus("web", "running", 321, 7.5, 0, detail="active (running)")
    crash = systemd_status("crash", units["devsync-crash.service"], 12.5)
    assert crash.state == "crashed" and crash.restarts == 4 and crash.pid is None
    assert systemd_status("gone", units["devsync-gone.service"], 1.0).state == "unknown"
    for active, sub, state in [
        ("failed", "failed", "crashed"),
        ("inactive", "dead", "stopped"),
        ("activating", "start", "starting"),
        ("deactivating", "stop-sigterm", "stopped"),
        ("reloading", "running", "running"),
    ]:
        props = {"ActiveState": active, "SubState": sub, "LoadState": "loaded"}
        assert systemd_status("x", props, None).state == state


async def test_systemd_show_through_the_adapter() -> None:
    remote = Canned((0, "uptime=12.5\n\n" + SYSTEMD_SHOW, ""))
    services = {"web": svc(manager="systemd", port=80), "gone": svc(manager="systemd")}
    found = await SystemdManager(remote, "/srv/app", "demo", services).status()
    assert found["web"].state == "running" and found["web"].port == 80
    assert found["web"].uptime_s == 7.5
    assert found["gone"].state == "unknown"


async def test_systemd_without_a_user_bus() -> None:
    remote = Canned((1, "", "Failed to connect to bus: No medium found\n"))
    manager = SystemdManager(remote, "/srv/app", "demo", {"web": svc(manager="systemd")})
    with pytest.raises(DevSyncError, match="systemd user instance is not reachable") as exc:
        await manager.status()
    assert exc.value.fix is not None and "enable-linger" in exc.value.fix


# --------------------------------------------------------------------------
# command


def test_parse_command_status() -> None:
    text = "web running 1234 17\napi stopped - -\nbad crashed 99 -\ngarbage\n"
    found = parse_command_status(text, {"web": 8000, "api": None, "bad": None})
    assert found["web"] == ServiceStatus("web", "running", 1234, 17.0, None, 8000)
    assert found["api"] == ServiceStatus("api", "stopped")
    assert found["bad"].state == "crashed" and found["bad"].pid == 99


# --------------------------------------------------------------------------
# Errors, through canned remote answers


class Canned:
    """A Remote answering each run with the next (code, stdout, stderr)."""

    def __init__(self, *answers: tuple[int, str, str]) -> None:
        self.answers = list(answers)
        self.calls: list[list[str]] = []

    async def run(
        self, remote_argv: Sequence[str], *, check: bool = True, input: bytes | None = None
    ) -> runner.Result:
        self.calls.append(list(remote_argv))
        code, out, err = self.answers.pop(0)
        return runner.Result(tuple(remote_argv), code, out.encode(), err.encode())


async def test_missing_manager_names_the_program_and_the_install() -> None:
    remote = Canned((127, "", "bash: line 1: supervisorctl: command not found\n"))
    manager = SupervisorManager(remote, "/srv/app", "demo", {"web": svc()})
    with pytest.raises(DevSyncError, match="supervisorctl is not installed on the remote") as e:
        await manager.status()
    assert e.value.fix is not None and "pip install supervisor" in e.value.fix

    remote = Canned((127, "", "pm2: command not found\n"))
    pm2 = Pm2Manager(remote, "/srv/app", "demo", {"web": svc(manager="pm2")})
    with pytest.raises(DevSyncError, match="pm2 is not installed") as e:
        await pm2.restart("web")
    assert e.value.fix is not None and "npm install -g pm2" in e.value.fix

    remote = Canned((127, "", "sh: 1: systemctl: not found\n"))
    systemd = SystemdManager(remote, "/srv/app", "demo", {"web": svc(manager="systemd")})
    with pytest.raises(DevSyncError, match="systemctl is not installed") as e:
        await systemd.status()
    assert e.value.fix is not None and 'manager = "supervisor"' in e.value.fix


@pytest.mark.parametrize(
    ("out", "needle", "fix"),
    [
        (
            "unix:///srv/app/.dev-sync/supervisor/supervisor.sock no such file\n",
            "supervisord is not running",
            "dev-sync services install",
        ),
        (
            "unix:///tmp/s.sock refused connection\n",
            "supervisord is not running",
            "dev-sync services install",
        ),
        (
            "error: <class 'PermissionError'>, [Errno 13] Permission denied: file: ...\n",
            "cannot talk to the project's supervisord",
            "remote user",
        ),
    ],
)
async def test_supervisor_socket_problems(out: str, needle: str, fix: str) -> None:
    manager = SupervisorManager(Canned((4, out, "")), "/srv/app", "demo", {"web": svc()})
    with pytest.raises(DevSyncError, match=needle) as exc:
        await manager.status()
    assert exc.value.fix is not None and fix in exc.value.fix
    assert "\n" not in exc.value.cause


async def test_supervisor_restart_of_a_program_it_does_not_have() -> None:
    remote = Canned((1, "web: ERROR (no such process)\n", ""))
    manager = SupervisorManager(remote, "/srv/app", "demo", {"web": svc()})
    with pytest.raises(DevSyncError, match="supervisord has no program 'web'"):
        await manager.restart("web")
    assert remote.calls == [
        ["supervisorctl", "-c", "/srv/app/.dev-sync/supervisor/supervisord.conf", "restart", "web"]
    ]


async def test_supervisor_spawn_error_is_not_an_exception() -> None:
    remote = Canned((7, "crash: stopped\ncrash: ERROR (spawn error)\n", ""))
    manager = SupervisorManager(remote, "/srv/app", "demo", {"crash": svc()})
    await manager.restart("crash")


async def test_unknown_service_lists_the_known_ones() -> None:
    services = {"web": svc(manager="command"), "api": svc(manager="command")}
    manager = CommandManager(Canned(), "/srv/app", "demo", services)
    with pytest.raises(UsageError, match="no service named 'nope'") as exc:
        await manager.restart("nope")
    assert exc.value.fix is not None and "known services: api, web" in exc.value.fix
    with pytest.raises(UsageError):
        manager.follow_argv("nope")


async def test_pm2_unknown_process() -> None:
    remote = Canned((1, "", "\x1b[31m[PM2][ERROR]\x1b[39m Process or Namespace front not found\n"))
    manager = Pm2Manager(remote, "/srv/app", "demo", {"web": svc(manager="pm2", program="front")})
    with pytest.raises(DevSyncError, match="pm2 has no process 'front'"):
        await manager.restart("web")


async def test_lost_connection() -> None:
    remote = Canned((255, "", "Connection to 10.0.0.5 closed by remote host.\n"))
    manager = SupervisorManager(remote, "/srv/app", "demo", {"web": svc()})
    with pytest.raises(ConnectionFailed, match="connection to the remote was lost"):
        await manager.status()


async def test_prefix_and_binary_paths_reach_the_remote_argv() -> None:
    remote = Canned((0, "web RUNNING pid 1, uptime 0:00:01\n", ""))
    manager = SupervisorManager(
        remote,
        "/srv/app/",
        "demo",
        {"web": svc()},
        supervisorctl="/opt/sv/bin/supervisorctl",
        prefix=["env", "PATH=/opt/bin:/usr/bin"],
    )
    assert (await manager.status())["web"].state == "running"
    assert remote.calls[0] == [
        "env",
        "PATH=/opt/bin:/usr/bin",
        "/opt/sv/bin/supervisorctl",
        "-c",
        "/srv/app/.dev-sync/supervisor/supervisord.conf",
        "status",
    ]
    assert manager.follow_argv("web")[-3:] == ["tail", "-f", "web"]


def test_managers_for_groups_services_by_manager() -> None:
    services = {
        "a": svc(),
        "b": svc(manager="pm2"),
        "c": svc(manager="command"),
        "d": svc(),
    }
    made = managers_for(
        Canned(), "/srv/app", "demo", services, supervisor={"supervisorctl": "/x/ctl"}
    )
    assert set(made) == {"supervisor", "pm2", "command"}
    assert set(made["supervisor"].services) == {"a", "d"}
    assert isinstance(made["supervisor"], SupervisorManager)
    assert made["supervisor"].supervisorctl == "/x/ctl"
    assert set(made["pm2"].services) == {"b"}


# --------------------------------------------------------------------------
# restart_and_check, against a scripted manager


class Scripted:
    """A ProcessManager whose status answers follow a script (the last one repeats)."""

    kind: ManagerName = "command"

    def __init__(self, *states: ServiceStatus) -> None:
        self.services: Mapping[str, ServiceConfig] = {"web": svc()}
        self.states = list(states)
        self.restarted = 0
        self.polls = 0

    async def install(self) -> list[str]:
        return []

    async def status(self, names: Sequence[str] | None = None) -> dict[str, ServiceStatus]:
        self.polls += 1
        state = self.states.pop(0) if len(self.states) > 1 else self.states[0]
        return {"web": state}

    async def restart(self, name: str) -> None:
        self.restarted += 1

    async def stop(self, name: str) -> None:
        pass

    async def logs(self, name: str, lines: int = 40) -> str:
        return "Traceback...\nSyntaxError: invalid syntax\n"

    def follow_argv(self, name: str, lines: int = 40) -> list[str]:
        return []

    async def shutdown(self) -> None:
        pass


def _st(state: str = "running", pid: int | None = 10, restarts: int | None = 1) -> ServiceStatus:
    return ServiceStatus("web", state, pid, 1.0, restarts)  # type: ignore[arg-type]


async def _check(manager: ProcessManager, settle: float = 0.2) -> Any:
    return await restart_and_check(manager, "web", settle=settle, interval=0.01)


async def test_healthy_restart() -> None:
    manager = Scripted(_st("starting", None, 1), _st(), _st())
    outcome = await _check(manager)
    assert outcome.ok and not outcome.crash_looping and outcome.log_tail == ""
    assert manager.restarted == 1 and manager.polls > 2


@pytest.mark.parametrize(
    ("states", "problem"),
    [
        ([_st(), _st("crashed", None)], "it crashed"),
        ([_st(), _st("stopped", None)], "it exited"),
        ([_st(), _st(restarts=2)], "restarted it 1 more time"),
        ([_st(), _st(pid=11)], "pid 10 -> 11"),
        ([_st("crashed", None)], "it crashed"),
        ([_st("unknown", None)], "does not know it"),
    ],
)
async def test_crash_loops_are_reported_once_with_the_log(
    states: list[ServiceStatus], problem: str
) -> None:
    manager = Scripted(*states)
    outcome = await _check(manager)
    assert outcome.crash_looping and problem in outcome.problem
    assert "SyntaxError" in outcome.log_tail
    assert manager.restarted == 1  # never restarted again here


async def test_settle_zero_checks_once() -> None:
    manager = Scripted(_st())
    assert (await _check(manager, settle=0)).ok
    assert manager.polls == 1


async def test_manager_errors_propagate() -> None:
    manager = CommandManager(Canned(), "/srv/app", "demo", {"web": svc(manager="command")})
    with pytest.raises(UsageError):
        await restart_and_check(manager, "api")
