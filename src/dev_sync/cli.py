"""The ``dev-sync`` command: a thin layer of click over the library.

``main(argv) -> int`` never raises for a user's mistake: a DevSyncError
becomes its one-line cause and fix on stderr and its exit code; click's own
usage errors exit 2; Ctrl-C exits 130 outside a session (inside one it is a
clean stop, exit 0).
"""

from __future__ import annotations

import asyncio
import json
import os
import shlex
import shutil
import signal
import subprocess
import sys
import time
import tomllib
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import asdict
from pathlib import Path
from typing import TYPE_CHECKING, Any, TypeVar

import click

from dev_sync import __version__, runner
from dev_sync.config import (
    CONFIG_NAME,
    DEFAULT_ENV,
    Config,
    load_config,
    parse_config,
)
from dev_sync.errors import EXIT_INTERRUPTED, EXIT_USAGE, DevSyncError, UsageError
from dev_sync.events import ConsoleReporter, Fanout, JsonReporter, Reporter, StatusReporter
from dev_sync.forwards import (
    Forward,
    Intercept,
    active_intercepts,
    add_forwards,
    plan_forwards,
    restore_stale,
)
from dev_sync.idle import IdleConfig
from dev_sync.services import (
    ManagerName,
    ProcessManager,
    RestartOutcome,
    ServiceStatus,
    install_all,
    managers_for,
    restart_and_check,
)
from dev_sync.ssh import SshMaster, Target
from dev_sync.state import SessionFiles

if TYPE_CHECKING:
    from dev_sync.detect import Detection

T = TypeVar("T")

def _remember_env(ctx: click.Context, _param: click.Parameter, value: str | None) -> None:
    if value is not None:
        ctx.meta["dev_sync.env"] = value


def config_option(func: Callable[..., Any]) -> Callable[..., Any]:
    """``--config FILE`` and ``--env NAME``, which every command takes."""
    func = click.option(
        "--env",
        "env_name",
        default=None,
        expose_value=False,
        callback=_remember_env,
        help="Environment from [envs] (default: [remote], or DEV_SYNC_ENV).",
    )(func)
    return click.option(
        "--config",
        "config_path",
        type=click.Path(dir_okay=False, path_type=Path),
        default=None,
        help=f"Config file (default: the nearest {CONFIG_NAME} upwards).",
    )(func)


def _load(config_path: Path | None) -> Config:
    ctx = click.get_current_context(silent=True)
    env = ctx.meta.get("dev_sync.env") if ctx is not None else None
    return load_config(config_path, env)


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(__version__, prog_name="dev-sync")
def cli() -> None:
    """Keep a remote development machine in lockstep with this checkout."""


@cli.command()
@config_option
@click.option("--host", default=None, help="ssh destination (default: asked, or devbox).")
@click.option("--path", "remote_path", default=None,
              help="Remote root, absolute (default: asked, or /srv/<folder name>).")
@click.option("--yes", "-y", is_flag=True, help="Accept every proposal; ask nothing.")
@click.option("--no-detect", is_flag=True, help="Look at nothing: write the plain starter.")
@click.option("--force", is_flag=True, help="Overwrite an existing file.")
def init(config_path: Path | None, host: str | None, remote_path: str | None, yes: bool,
         no_detect: bool, force: bool) -> None:
    """Write a commented dev-sync.toml, with what the project needs found in its tree.

    Lock files become [deps], Procfile entries and package.json dev/start/serve
    scripts become [services], a script/bootstrap becomes [provision]. On a
    terminal each proposal is asked about; with --yes, or when stdin is not a
    terminal (scripts, CI), every proposal is accepted and nothing is asked.
    """
    from dev_sync.config import check_host, check_remote_root
    from dev_sync.detect import Detection, detect, render, unfold

    target = (config_path or Path.cwd() / CONFIG_NAME).absolute()
    if target.exists() and not force:
        raise UsageError(f"{target} already exists", "edit it, or pass --force to overwrite it")
    root = target.parent
    found = Detection() if no_detect else detect(root, ["*.log"])
    ask = not yes and sys.stdin.isatty()
    _show_found(root, found)

    def valid(check: Callable[[str], str]) -> Callable[[str], str]:
        def proc(value: str) -> str:
            try:
                return check(value.strip())
            except ValueError as exc:
                raise click.UsageError(str(exc)) from None
        return proc

    default_path = f"/srv/{root.name or 'app'}"
    if ask:
        host = host or click.prompt("ssh destination of the VM (Host alias or user@address)",
                                    default="devbox", value_proc=valid(check_host))
        remote_path = remote_path or click.prompt("project folder on the VM",
                                                  default=default_path,
                                                  value_proc=valid(check_remote_root))
        keep_deps = [d.name for d in found.deps
                     if click.confirm(f"Run {d.describe()}?", default=True)]
        keep_services = [s.name for s in found.services
                         if click.confirm(f"Add {s.describe()}?", default=True)]
        keep_bootstrap = bool(found.bootstrap) and click.confirm(
            f"Run {found.bootstrap} in `dev-sync provision`?", default=True)
    else:
        keep_deps = [d.name for d in found.deps]
        keep_services = [s.name for s in found.services]
        keep_bootstrap = True
        if not yes and not found.empty:
            click.echo("not a terminal: every proposal is accepted "
                       "(--no-detect leaves them out)")
    accepted, declined = unfold(found, keep_deps, keep_services, keep_bootstrap)
    text = render(host or "devbox", remote_path or default_path, accepted, declined)
    parse_config(tomllib.loads(text), target)  # what is written must load
    target.write_text(text)
    click.echo(f"wrote {target}; check [remote], then run `dev-sync provision` on a new VM "
               "or `dev-sync up`")


def _show_found(root: Path, found: Detection) -> None:
    from dev_sync.detect import comment_text

    if found.empty and not found.notes:
        return
    click.echo(f"found in {root}:")
    for d in found.deps:
        click.echo(f"  [deps]      {d.name}: {comment_text(', '.join(d.files))}")
    for s in found.services:
        click.echo(f"  [services]  {s.name}: {comment_text(s.command)} "
                   f"(in {comment_text(s.cwd)}, from {comment_text(s.source)})")
    if found.bootstrap:
        click.echo(f"  [provision] script {found.bootstrap}")
    for note in found.notes:
        click.echo(f"  note: {comment_text(note)}")


@cli.command()
@config_option
@click.option("--once", is_flag=True, help="Reconcile once and exit.")
@click.option("--detach", is_flag=True, help="Run the session in the background.")
@click.option("--json", "as_json", is_flag=True, help="One JSON event per line on stdout.")
@click.option("--adopt", is_flag=True, help="Take over a non-empty remote root.")
@click.option(
    "--allow-delete", is_flag=True, help="Allow deleting beyond the [sync] delete_guard share."
)
@click.option("--forward", "with_forwards", is_flag=True,
              help="Also forward every service port to this machine.")
def up(
    config_path: Path | None,
    once: bool,
    detach: bool,
    as_json: bool,
    adopt: bool,
    allow_delete: bool,
    with_forwards: bool,
) -> None:
    """Reconcile, then watch and push every change (until Ctrl-C)."""
    config = _load(config_path)
    files = SessionFiles(config.source, config.env)
    if detach:
        if once:
            raise UsageError("--detach and --once do not go together")
        _detach(config, files, adopt=adopt, allow_delete=allow_delete, forward=with_forwards)
        return
    if not files.acquire():
        raise DevSyncError(
            f"a dev-sync session for {config.source} is already running "
            f"(pid {files.running_pid()})",
            "see `dev-sync status`, or stop it with `dev-sync stop`",
        )
    try:
        forwards = _plan_forwards(config) if with_forwards else []
        if forwards and not as_json:
            click.echo("forwards (kept through reconnects):")
            _print_forwards(forwards)
        code = _run_session(config, files, once=once, as_json=as_json, adopt=adopt,
                            allow_delete=allow_delete, forwards=forwards)
    finally:
        files.release()
    if code:
        sys.exit(code)


def _run_session(
    config: Config, files: SessionFiles, *, once: bool, as_json: bool, adopt: bool,
    allow_delete: bool, forwards: Sequence[Forward],
) -> int:
    from dev_sync.engine import Engine

    human: Reporter = JsonReporter() if as_json else ConsoleReporter()
    status = StatusReporter(
        files,
        {
            "config": str(config.source),
            "local_root": str(config.local_root),
            "remote": f"{config.remote.host}:{config.remote.path}",
            "started": time.time(),
            "log": str(files.log),
        },
    )
    # rsync's per-file progress lines cost CPU to parse: only for a visible bar.
    progress = isinstance(human, ConsoleReporter) and human.console.is_terminal
    engine = Engine(config, Fanout([human, status]), once=once, adopt=adopt,
                    allow_delete=allow_delete, progress=progress,
                    state_dir=files.dir, forwards=forwards)
    status.pending = lambda: engine.batcher.pending
    try:
        asyncio.run(engine.run())
    except DevSyncError as exc:
        status.state = "failed"
        status.errors.append({"ts": time.time(), "cause": exc.cause, "fix": exc.fix or ""})
        status.write()
        raise
    status.state = "stopped" if not once else "done"
    status.write()
    return 0


def _detach(
    config: Config, files: SessionFiles, *, adopt: bool, allow_delete: bool, forward: bool
) -> None:
    pid = files.running_pid()
    if pid is not None:
        raise DevSyncError(
            f"a dev-sync session for {config.source} is already running (pid {pid})",
            "see `dev-sync status`, or stop it with `dev-sync stop`",
        )
    files.ensure()
    argv = [sys.executable, "-m", "dev_sync", "up", "--config", str(config.source),
            "--env", config.env]
    if adopt:
        argv.append("--adopt")
    if allow_delete:
        argv.append("--allow-delete")
    if forward:
        argv.append("--forward")
    with files.log.open("ab") as log:
        log.write(f"\n--- {time.strftime('%Y-%m-%d %H:%M:%S')} dev-sync up --detach\n".encode())
        log.flush()
        started = time.time()
        proc = subprocess.Popen(
            argv,
            stdin=subprocess.DEVNULL,
            stdout=log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
            cwd=str(config.local_root),
            env={**os.environ, "COLUMNS": "120", "TERM": "dumb"},
        )
    # Wait until the session is watching (or has failed), so errors show here.
    while True:
        code = proc.poll()
        status = files.read_status() or {}
        fresh = status.get("pid") == proc.pid and status.get("updated", 0) >= started
        if code is not None:
            tail = files.log.read_text(errors="replace").strip().splitlines()[-6:]
            raise DevSyncError(
                "the background session exited at start:\n  " + "\n  ".join(tail),
                f"see {files.log}",
            )
        if fresh and status.get("state") == "watching":
            break
        time.sleep(0.05)
    click.echo(f"dev-sync is running in the background (pid {proc.pid}); log: {files.log}")
    click.echo("`dev-sync status` shows it, `dev-sync stop` ends it")


@cli.command()
@config_option
@click.option("--json", "as_json", is_flag=True, help="Machine-readable output.")
def status(config_path: Path | None, as_json: bool) -> None:
    """Show the running session: state, last push, pending changes, errors."""
    config = _load(config_path)
    files = SessionFiles(config.source, config.env)
    pid = files.running_pid()
    data: dict[str, Any] = files.read_status() or {}
    data["running"] = pid is not None
    if pid is None and data.get("state") not in (None, "failed"):
        data["state"] = "stopped"
    if as_json:
        click.echo(json.dumps(data, indent=2, default=str))
        sys.exit(0 if pid is not None else 3)
    if pid is None:
        click.echo(f"no dev-sync session running for {config.source}")
        if data.get("errors"):
            last = data["errors"][-1]
            click.echo(f"last error: {last.get('cause') or last.get('reason')}")
        sys.exit(3)
    from rich.console import Console

    console = Console(highlight=False)
    console.print(f"[bold]{data.get('state', '?')}[/] since {_ago(data.get('since'))}  (pid {pid})")
    console.print(f"  {data.get('local_root')} → {data.get('remote')}")
    last = data.get("last_push")
    if last:
        console.print(
            f"  last push {_ago(last.get('ts'))}: {last.get('files')} files, "
            f"{last.get('bytes')} bytes, {last.get('ms')} ms"
        )
    console.print(f"  pending changes: {data.get('pending', 0)}, pushes: {data.get('pushes', 0)}")
    for err in data.get("errors", [])[-3:]:
        console.print(f"  [yellow]{err.get('kind', 'error')}[/] {_ago(err.get('ts'))}: "
                      f"{err.get('cause') or err.get('reason')}")
    console.print(f"  log: {data.get('log')}")


def _ago(ts: object) -> str:
    if not isinstance(ts, int | float):
        return "?"
    secs = max(0, int(time.time() - ts))
    if secs < 60:
        return f"{secs}s ago"
    if secs < 3600:
        return f"{secs // 60}m ago"
    return f"{secs // 3600}h{secs % 3600 // 60:02d}m ago"


@cli.command()
@config_option
def stop(config_path: Path | None) -> None:
    """Stop the background session of this project."""
    config = _load(config_path)
    files = SessionFiles(config.source, config.env)
    pid = files.running_pid()
    if pid is None or pid <= 0:
        click.echo("no dev-sync session running")
        return
    os.kill(pid, signal.SIGTERM)
    deadline = time.monotonic() + 15
    while files.running_pid() is not None:
        if time.monotonic() > deadline:
            os.kill(pid, signal.SIGKILL)
            break
        time.sleep(0.05)
    click.echo(f"stopped the session (pid {pid})")


@cli.command()
@config_option
def doctor(config_path: Path | None) -> None:
    """Check ssh, rsync on both ends, the remote root and inotify limits."""
    from dev_sync.doctor import run_doctor

    ok = run_doctor(_load(config_path))
    if not ok:
        sys.exit(1)


def _on_remote(config: Config, work: Callable[[SshMaster], Awaitable[T]]) -> T:
    """Run ``work`` with a connected master, closing it whatever happens.

    An intercept left behind by a killed dev-sync is undone first, so its
    service runs on the remote again before anything else touches it.
    """

    async def go() -> T:
        master = SshMaster(Target.from_config(config))
        await master.connect()
        try:
            await _restore_intercepts(config, master)
            return await work(master)
        finally:
            await master.close()

    return asyncio.run(go())


async def _restore_intercepts(config: Config, master: SshMaster) -> None:
    if not config.services:
        return
    state = SessionFiles(config.source, config.env).dir
    for name in await restore_stale(master, _managers(config, master), state):
        click.echo(f"restored {name} on the remote (an intercept was left behind)", err=True)


def _service_name(config: Config, name: str) -> None:
    if name not in config.services:
        known = ", ".join(sorted(config.services)) or "none are configured"
        raise UsageError(
            f"no service named {name!r} in {config.source} (services: {known})",
            "add it as [services.NAME] in dev-sync.toml, or use one of those names",
        )


def _managers(config: Config, master: SshMaster) -> dict[ManagerName, ProcessManager]:
    return managers_for(master, config.remote.path, config.local_root.name, config.services)


@cli.group("services", invoke_without_command=True)
@config_option
@click.option("--json", "as_json", is_flag=True, help="Machine-readable output.")
@click.pass_context
def services_group(ctx: click.Context, config_path: Path | None, as_json: bool) -> None:
    """Show the remote services: state, pid, uptime, restarts, port."""
    if ctx.invoked_subcommand is not None:
        return
    config = _load(config_path)
    if not config.services:
        raise UsageError(f"no [services] in {config.source}",
                         "add [services.NAME] tables (see the README)")

    async def work(master: SshMaster) -> list[tuple[str, str, ServiceStatus]]:
        rows = []
        for kind, manager in _managers(config, master).items():
            for name, st in (await manager.status()).items():
                rows.append((name, kind, st))
        return sorted(rows, key=lambda r: r[0])

    rows = _on_remote(config, work)
    if as_json:
        click.echo(json.dumps([{"name": n, "manager": k, **asdict(st)} for n, k, st in rows],
                              indent=2))
        return
    from rich.console import Console
    from rich.table import Table

    table = Table("service", "manager", "state", "pid", "uptime", "restarts", "port")
    for name, kind, st in rows:
        uptime = "" if st.uptime_s is None else _ago(time.time() - st.uptime_s).removesuffix(
            " ago")
        table.add_row(name, kind, st.state, str(st.pid or ""), uptime,
                      "" if st.restarts is None else str(st.restarts), str(st.port or ""))
    Console(highlight=False).print(table)


@services_group.command("install")
@config_option
def services_install(config_path: Path | None) -> None:
    """Write the process-manager configuration on the remote and start everything."""
    config = _load(config_path)
    if not config.services:
        raise UsageError(f"no [services] in {config.source}",
                         "add [services.NAME] tables (see the README)")

    busy = active_intercepts(SessionFiles(config.source, config.env).dir)
    if busy:
        raise UsageError(
            f"{', '.join(sorted(busy))} is intercepted: its traffic goes to this machine",
            "end the intercept (Ctrl-C in its terminal) and run this again",
        )

    async def work(master: SshMaster) -> list[str]:
        return await install_all(master, config.remote.path, config.local_root.name,
                                 config.services)

    changed = _on_remote(config, work)
    names = ", ".join(sorted(config.services))
    click.echo(f"services on {config.remote.host}: {names}"
               + (f" (new or changed, so restarted: {', '.join(sorted(changed))})"
                  if changed else ""))


@cli.command()
@config_option
@click.option("--json", "as_json", is_flag=True, help="One JSON event per line on stdout.")
@click.option("--adopt", is_flag=True, help="Take over a non-empty remote root.")
def provision(config_path: Path | None, as_json: bool, adopt: bool) -> None:
    """Bootstrap the VM: packages, first sync, [provision] steps, installs, services.

    Safe to run again: what is already done is reported as unchanged.
    """
    from dev_sync.provision import Provisioner

    config = _load(config_path)
    files = SessionFiles(config.source, config.env)
    busy = active_intercepts(files.dir)
    if busy and config.services:
        raise UsageError(
            f"{', '.join(sorted(busy))} is intercepted: its traffic goes to this machine",
            "end the intercept (Ctrl-C in its terminal) and run this again",
        )
    if not files.acquire():
        raise DevSyncError(
            f"a dev-sync session for {config.source} is running (pid {files.running_pid()})",
            "stop it with `dev-sync stop` (or Ctrl-C), then provision",
        )
    reporter: Reporter = JsonReporter() if as_json else ConsoleReporter()
    try:
        asyncio.run(Provisioner(config, reporter, state_dir=files.dir, adopt=adopt).run())
    finally:
        files.release()


@cli.command()
@config_option
@click.argument("name")
def restart(config_path: Path | None, name: str) -> None:
    """Restart one remote service now (and check it stays up)."""
    config = _load(config_path)
    _service_name(config, name)

    async def work(master: SshMaster) -> RestartOutcome:
        manager = _managers(config, master)[config.services[name].manager]
        return await restart_and_check(manager, name)

    outcome = _on_remote(config, work)
    if outcome.ok:
        click.echo(f"{name} restarted: {outcome.status.state} (pid {outcome.status.pid})")
        return
    raise DevSyncError(
        f"{name} is crash-looping after the restart: {outcome.problem}\n"
        + "\n".join(f"  | {ln}" for ln in outcome.log_tail.splitlines()[-15:]),
        f"see `dev-sync logs {name}`",
    )


@cli.command()
@config_option
@click.argument("name")
@click.option("-f", "--follow", is_flag=True, help="Keep printing new lines.")
@click.option("-n", "--lines", default=40, show_default=True, help="Lines to show.")
def logs(config_path: Path | None, name: str, follow: bool, lines: int) -> None:
    """Print the log of a remote service."""
    config = _load(config_path)
    _service_name(config, name)

    async def work(master: SshMaster) -> int:
        manager = _managers(config, master)[config.services[name].manager]
        if not follow:
            click.echo(await manager.logs(name, lines), nl=False)
            return 0
        proc = await runner.start(master.command(manager.follow_argv(name, lines)),
                                  stdout=None, stderr=None)
        try:
            return await proc.wait()
        except asyncio.CancelledError:
            await runner.terminate(proc)
            raise

    try:
        _on_remote(config, work)
    except KeyboardInterrupt:
        pass


@cli.command("exec", context_settings={"ignore_unknown_options": True,
                                       "allow_interspersed_args": False})
@config_option
@click.option("--service", "service", default=None,
              help="Run in this service's folder with its environment.")
@click.argument("command", nargs=-1, required=True, type=click.UNPROCESSED)
def exec_(config_path: Path | None, service: str | None, command: tuple[str, ...]) -> None:
    """Run a command in the remote root (dev-sync exec -- npm test)."""
    config = _load(config_path)
    cwd, env = config.remote.path, {}
    if service is not None:
        _service_name(config, service)
        svc = config.services[service]
        cwd = f"{config.remote.path.rstrip('/')}/{svc.cwd}".rstrip("/.") or "/"
        env = dict(svc.env)
        if svc.port is not None:
            env.setdefault("PORT", str(svc.port))  # as the service itself sees it
    argv = ["sh", "-c", 'cd -- "$1" && shift && exec env "$@"', "dev-sync-exec", cwd,
            *[f"{k}={v}" for k, v in env.items()], *command]

    async def work(master: SshMaster) -> int:
        proc = await runner.start(master.command(argv, tty=sys.stdin.isatty()),
                                  stdin=None, stdout=None, stderr=None)
        return await proc.wait()

    code = _on_remote(config, work)
    if code:
        sys.exit(code)


def _plan_forwards(config: Config) -> list[Forward]:
    forwards = plan_forwards(config.services)
    if not forwards:
        raise UsageError(f"no service in {config.source} has a port",
                         "set port = N in the [services.NAME] tables to forward")
    for f in forwards:
        if f.moved:
            click.echo(f"local port {f.remote_port} is taken, using {f.local_port} for {f.name}")
    return forwards


def _print_forwards(forwards: Sequence[Forward]) -> None:
    for f in forwards:
        click.echo(f"  {f.name:<16} {f.url}  ->  remote 127.0.0.1:{f.remote_port}")


@cli.command()
@config_option
def forward(config_path: Path | None) -> None:
    """Forward every service port to this machine until Ctrl-C (reconnects by itself)."""
    config = _load(config_path)
    forwards = _plan_forwards(config)

    async def go() -> None:
        master = SshMaster(Target.from_config(config))
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGINT, signal.SIGTERM):
            loop.add_signal_handler(sig, stop.set)
        try:
            await master.connect()
            await _restore_intercepts(config, master)
            await add_forwards(master, forwards)
            click.echo(f"forwarding {len(forwards)} port(s) from {config.remote.host}; "
                       "Ctrl-C to stop:")
            _print_forwards(forwards)
            delay = 0.5
            while not stop.is_set():
                lost = asyncio.create_task(master.wait_closed())
                stopping = asyncio.create_task(stop.wait())
                await asyncio.wait({lost, stopping}, return_when=asyncio.FIRST_COMPLETED)
                lost.cancel()
                stopping.cancel()
                if stop.is_set():
                    break
                click.echo(f"connection lost; reconnecting in {delay:.1f}s", err=True)
                try:
                    await asyncio.wait_for(stop.wait(), delay)
                    break
                except TimeoutError:
                    pass
                try:
                    await master.connect()
                    await add_forwards(master, forwards)
                    click.echo("forwards restored", err=True)
                    delay = 0.5
                except DevSyncError as exc:
                    click.echo(f"still offline: {exc.cause}", err=True)
                    delay = min(delay * 2, 5.0)
        finally:
            await master.close()

    asyncio.run(go())


@cli.command()
@config_option
@click.argument("name")
@click.option("--port", "local_port", type=click.IntRange(1, 65535), default=None,
              help="Local port of your process (default: the service's port).")
def intercept(config_path: Path | None, name: str, local_port: int | None) -> None:
    """Route one service's traffic on the VM to a process on this machine, until Ctrl-C."""
    config = _load(config_path)
    _service_name(config, name)
    svc = config.services[name]
    if svc.port is None:
        raise UsageError(f"[services.{name}] has no port to intercept",
                         f"set port = N in [services.{name}]")
    state = SessionFiles(config.source, config.env)
    state.ensure()
    remote_port, local = svc.port, local_port or svc.port
    dropped = False

    async def go() -> None:
        nonlocal dropped
        master = SshMaster(Target.from_config(config))
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGINT, signal.SIGTERM):
            loop.add_signal_handler(sig, stop.set)
        await master.connect()
        try:
            await _restore_intercepts(config, master)
            manager = _managers(config, master)[svc.manager]
            async with Intercept(master, manager, name, remote_port, local, state.dir) as ic:
                click.echo(f"{name}: traffic to 127.0.0.1:{remote_port} on {config.remote.host} "
                           f"now reaches 127.0.0.1:{local} here; Ctrl-C to end")
                if not ic.local_ready():
                    click.echo(f"  note: nothing listens on 127.0.0.1:{local} here yet", err=True)
                lost = asyncio.create_task(master.wait_closed())
                stopping = asyncio.create_task(stop.wait())
                await asyncio.wait({lost, stopping}, return_when=asyncio.FIRST_COMPLETED)
                lost.cancel()
                stopping.cancel()
                if not stop.is_set():
                    # The reverse forward died with the connection: nothing on the
                    # VM can reach this machine now, so the service goes back there.
                    dropped = True
                    click.echo(f"connection lost; reconnecting to start {name} on the remote "
                               "again", err=True)
                    await _reconnect(master, stop)
            click.echo(f"{name} runs on the remote again")
        finally:
            await master.close()

    asyncio.run(go())
    if dropped:
        raise DevSyncError(f"the connection to {config.remote.host} was lost, so the intercept "
                           f"of {name} ended", f"run `dev-sync intercept {name}` again")


async def _reconnect(master: SshMaster, stop: asyncio.Event) -> None:
    delay = 0.5
    while not stop.is_set():
        try:
            await master.connect()
            return
        except DevSyncError:
            try:
                await asyncio.wait_for(stop.wait(), delay)
            except TimeoutError:
                pass
            delay = min(delay * 2, 5.0)


DEFAULT_HOSTS = Path("/etc/hosts")
hosts_file_option = click.option(
    "--hosts-file", type=click.Path(dir_okay=False, path_type=Path), default=DEFAULT_HOSTS,
    show_default=True, help="The hosts file to edit.",
)


def _address_of(config: Config) -> str:
    """Where the active environment's services answer: its address, or its host's."""
    if config.remote.address:
        return config.remote.address
    import ipaddress
    import socket

    argv = ["ssh", *Target.from_config(config).options(), "-G", "--", config.remote.host]
    try:
        out = runner.run(argv, timeout=10).out
    except runner.CommandError as exc:
        raise DevSyncError(f"cannot read the ssh settings of {config.remote.host}: "
                           f"{exc.last_line()}", "set address = \"IP\" in the environment"
                           ) from None
    name = next((ln.split(None, 1)[1] for ln in out.splitlines()
                 if ln.startswith("hostname ")), config.remote.host)
    try:
        return str(ipaddress.ip_address(name))
    except ValueError:
        pass
    try:
        return str(socket.getaddrinfo(name, None, type=socket.SOCK_STREAM)[0][4][0])
    except OSError:
        table = "remote" if config.env == DEFAULT_ENV else f"envs.{config.env}"
        raise DevSyncError(
            f"cannot resolve {name!r} (the address of environment {config.env})",
            f'set address = "IP" in [{table}]',
        ) from None


def _hosts_entries(config: Config, address: str) -> list[tuple[str, str]]:
    from dev_sync.hostsfile import validate_address, validate_hostname

    names = [(n, s.hostname) for n, s in sorted(config.services.items()) if s.hostname]
    if not names:
        raise UsageError(f"no service in {config.source} has a hostname",
                         "set hostname = \"api.dev.local\" in the [services.NAME] tables")
    try:
        addr = validate_address(address)
        return [(addr, validate_hostname(host)) for _, host in names]
    except ValueError as exc:
        raise UsageError(str(exc), "fix the hostname or address in dev-sync.toml") from None


def _sudo_hint(args: Sequence[str]) -> str:
    exe = shutil.which("dev-sync") or "dev-sync"
    return "sudo " + shlex.join([exe, *args])


@cli.group()
def hosts() -> None:
    """Point service hostnames at the VM through a marked block in /etc/hosts."""


@hosts.command("apply")
@config_option
@hosts_file_option
@click.option("--via-forward", is_flag=True,
              help="Map the names to 127.0.0.1 (with `dev-sync forward` running).")
def hosts_apply(config_path: Path | None, hosts_file: Path, via_forward: bool) -> None:
    """Map every service hostname to the active environment's address."""
    from dev_sync.hostsfile import apply_block, read_hosts, write_hosts

    config = _load(config_path)
    address = "127.0.0.1" if via_forward else _address_of(config)
    entries = _hosts_entries(config, address)
    project = config.local_root.name
    args = ["hosts", "apply", "--config", str(config.source), "--env", config.env]
    if hosts_file != DEFAULT_HOSTS:
        args += ["--hosts-file", str(hosts_file)]
    if via_forward:
        args.append("--via-forward")
    try:
        text = apply_block(read_hosts(hosts_file), project, entries)
    except ValueError as exc:
        raise DevSyncError(f"{hosts_file}: {exc}", "repair or remove that block by hand"
                           ) from None
    result = write_hosts(hosts_file, text, sudo_hint=_sudo_hint(args))
    names = ", ".join(host for _, host in entries)
    if not result.changed:
        click.echo(f"{hosts_file} already maps {names} to {address} ({config.env})")
        return
    how = " (written in place: the file is a mount point)" if result.in_place else ""
    click.echo(f"{names} -> {address} ({config.env}) in {hosts_file}{how}")


@hosts.command("clear")
@config_option
@hosts_file_option
def hosts_clear(config_path: Path | None, hosts_file: Path) -> None:
    """Remove this project's block from the hosts file."""
    from dev_sync.hostsfile import read_hosts, remove_block, write_hosts

    config = _load(config_path)
    args = ["hosts", "clear", "--config", str(config.source)]
    if hosts_file != DEFAULT_HOSTS:
        args += ["--hosts-file", str(hosts_file)]
    try:
        text = remove_block(read_hosts(hosts_file), config.local_root.name)
    except ValueError as exc:
        raise DevSyncError(f"{hosts_file}: {exc}", "repair or remove that block by hand"
                           ) from None
    result = write_hosts(hosts_file, text, sudo_hint=_sudo_hint(args))
    click.echo(f"removed the dev-sync block from {hosts_file}" if result.changed
               else f"{hosts_file} has no dev-sync block for this project")


@hosts.command("show")
@config_option
@hosts_file_option
def hosts_show(config_path: Path | None, hosts_file: Path) -> None:
    """Show where this project's hostnames point now."""
    from dev_sync.hostsfile import find_block, read_hosts

    config = _load(config_path)
    try:
        entries = find_block(read_hosts(hosts_file), config.local_root.name)
    except ValueError as exc:
        raise DevSyncError(f"{hosts_file}: {exc}", "repair or remove that block by hand"
                           ) from None
    if entries is None:
        click.echo(f"{hosts_file} has no dev-sync block for this project")
        sys.exit(3)
    for address, host in entries:
        click.echo(f"{host:<32} {address}")


@cli.command()
@config_option
@click.option("--json", "as_json", is_flag=True, help="Machine-readable output.")
def envs(config_path: Path | None, as_json: bool) -> None:
    """List the environments ([remote] and [envs]) and which one is active."""
    config = _load(config_path)
    rows: list[dict[str, Any]] = []
    try:
        default = load_config(config.source, DEFAULT_ENV).remote
    except DevSyncError:
        default = None  # no [remote]: only [envs]
    choices = ([(DEFAULT_ENV, default)] if default is not None else []) + sorted(
        config.envs.items()
    )
    for name, remote in choices:
        rows.append({"name": name, "active": name == config.env, "host": remote.host,
                     "path": remote.path, "address": remote.address})
    if as_json:
        click.echo(json.dumps(rows, indent=2))
        return
    for row in rows:
        mark = "*" if row["active"] else " "
        address = f"  address {row['address']}" if row["address"] else ""
        click.echo(f"{mark} {row['name']:<12} {row['host']}:{row['path']}{address}")


@cli.group("idle")
def idle_group() -> None:
    """Stop the VM by itself when nobody uses it (a check on the VM, every minute)."""


def _duration(value: str | None, option: str) -> float | None:
    from dev_sync.idle import parse_duration

    if value is None:
        return None
    try:
        return parse_duration(value)
    except ValueError as exc:
        raise UsageError(f"{option}: {exc}", "write it as 45m, 2h, 90s or 1h30m") from None


def _idle_settings(config: Config, **updates: object) -> IdleConfig:
    from pydantic import ValidationError

    from dev_sync.config import _format_error

    given = {k: v for k, v in updates.items() if v is not None}
    if not given:
        return config.idle
    try:
        return IdleConfig.model_validate({**config.idle.model_dump(), **given})
    except ValidationError as exc:
        lines = [_format_error(config.source, {**e, "loc": ("idle", *e["loc"])})
                 for e in exc.errors()]
        raise UsageError("\n  ".join(lines), "change the option or [idle] in dev-sync.toml"
                         ) from None


def _clock(ts: object) -> str:
    if not isinstance(ts, int | float):
        return "?"
    return time.strftime("%H:%M", time.localtime(ts))


def _in(seconds: object) -> str:
    from dev_sync.remote_idle import span

    return span(float(seconds)) if isinstance(seconds, int | float) else "?"


@idle_group.command("install")
@config_option
@click.option("--after", default=None, help="Idle time before the stop, e.g. 45m ([idle] after).")
@click.option("--warn-before", default=None,
              help="Warn logged-in users this long before the stop ([idle] warn_before).")
@click.option("--cpu-above", type=click.FloatRange(0, 100, min_open=True, max_open=True),
              default=None, help="Count CPU busier than this percent as use ([idle] cpu_above).")
def idle_install(config_path: Path | None, after: str | None, warn_before: str | None,
                 cpu_above: float | None) -> None:
    """Install (or update) the idle watcher on the VM."""
    from dev_sync import idle

    config = _load(config_path)
    settings = _idle_settings(config, after=_duration(after, "--after"),
                              warn_before=_duration(warn_before, "--warn-before"),
                              cpu_above=cpu_above)
    host = config.remote.host
    result = _on_remote(config, lambda m: idle.install(m, settings, host=host))
    how = {"systemd": "a systemd timer", "systemd-user": "a systemd user timer",
           "cron": "a crontab entry"}[result.mechanism]
    stop = "shutdown" if settings.stop == "shutdown" else shlex.join(settings.stop_command)
    verb = ("already installed, nothing changed" if not result.changes
            else "updated" if result.was_installed else "installed")
    click.echo(f"idle auto-stop {verb} on {host} ({how}): after "
               f"{idle.format_duration(settings.after)} without use it runs `{stop}`, "
               f"warning {idle.format_duration(settings.warn_before)} before")
    for change in result.changes:
        click.echo(f"  {change}")
    for warning in result.warnings:
        click.echo(f"warning: {warning}", err=True)


@idle_group.command("uninstall")
@config_option
def idle_uninstall(config_path: Path | None) -> None:
    """Remove the idle watcher, its timer or crontab entry, and its files from the VM."""
    from dev_sync import idle

    config = _load(config_path)
    removed = _on_remote(config, idle.uninstall)
    if not removed:
        click.echo(f"idle auto-stop was not installed on {config.remote.host}")
        return
    click.echo(f"idle auto-stop removed from {config.remote.host}")
    for line in removed:
        click.echo(f"  {line}")


@idle_group.command("status")
@config_option
@click.option("--json", "as_json", is_flag=True, help="Machine-readable output.")
def idle_status(config_path: Path | None, as_json: bool) -> None:
    """Whether the VM stops by itself, its last activity, the time left (exit 3: not installed)."""
    from dev_sync import idle

    config = _load(config_path)
    data = _on_remote(config, idle.status)
    data["host"] = config.remote.host
    if as_json:
        click.echo(json.dumps(data, indent=2))
        sys.exit(0 if data["installed"] else 3)
    _print_idle(data)
    if not data["installed"]:
        sys.exit(3)


def _print_idle(data: dict[str, Any]) -> None:
    from dev_sync.remote_idle import Activity

    host = data["host"]
    if not data["installed"]:
        click.echo(f"idle auto-stop is not installed on {host} (`dev-sync idle install`)")
        return
    settings = data.get("settings", {})
    click.echo(f"idle auto-stop on {host}: {data['mechanism']}, stops after "
               f"{_in(settings.get('after'))} without use")
    last = Activity.from_dict(data.get("last_activity"))
    if last is not None:
        click.echo(f"  last activity: {last.describe()}, {_ago(last.at)}")
    keep = data.get("keep_awake_until")
    if keep:
        click.echo(f"  kept awake until {_clock(keep)}")
    action = data.get("action")
    left = data.get("left")
    if action == "stop" or (isinstance(left, int | float) and left <= 0):
        click.echo("  stop: due at the next check")
    else:
        click.echo(f"  stop in {_in(left)} (at {_clock(data.get('stop_at'))})")
    for s in data.get("sessions", []):
        click.echo(f"  session: {s['user']} on {s['tty']}, idle {_in(s['idle'])}")
    last_check = data.get("last_check")
    click.echo(f"  last check: {_ago(last_check) if last_check else 'never'}")
    if not data.get("entry"):
        click.echo("warning: the timer or crontab entry is missing: run `dev-sync idle install`",
                   err=True)
    elif not data.get("scheduler_running"):
        click.echo(f"warning: no cron daemon runs on {host}, so the check does not run: start "
                   "it (`sudo service cron start`)", err=True)


@idle_group.command("keep-awake")
@config_option
@click.option("--for", "duration", required=True,
              help="How long the VM stays up at least, e.g. 2h (0 clears it).")
def idle_keep_awake(config_path: Path | None, duration: str) -> None:
    """Postpone the stop: the VM stays up for at least this long."""
    from dev_sync import idle

    seconds = _duration(duration, "--for")
    assert seconds is not None
    config = _load(config_path)
    data = _on_remote(config, lambda m: idle.keep_awake(m, seconds))
    data["host"] = config.remote.host
    if seconds:
        click.echo(f"{config.remote.host} stays up until {_clock(data.get('keep_awake_until'))} "
                   "at least")
    else:
        click.echo(f"{config.remote.host}: keep-awake cleared")
    click.echo(f"  stop in {_in(data.get('left'))} (at {_clock(data.get('stop_at'))}) "
               "unless it is used")


@cli.group()
def sandbox() -> None:
    """A private local sshd to try dev-sync without a VM."""


@sandbox.command("start")
@click.option("--clean-shell", is_flag=True, help="Hide your shell rc files from the sandbox.")
def sandbox_start(clean_shell: bool) -> None:
    """Start the sandbox sshd (idempotent) and print how to use it."""
    from dev_sync.sandbox import Sandbox

    info = Sandbox(clean_shell=clean_shell).start()
    click.echo(f"sandbox sshd running on 127.0.0.1:{info.port} (pid {info.pid})")
    click.echo(f"  host:       {info.host}")
    click.echo(f"  ssh_config: {info.ssh_config}")
    click.echo(f"  remote dir: {info.remote_dir}")
    click.echo(f"  try:        ssh -F {info.ssh_config} {info.host} true")


@sandbox.command("stop")
def sandbox_stop() -> None:
    """Stop the sandbox sshd."""
    from dev_sync.sandbox import Sandbox

    was = Sandbox().stop()
    click.echo("sandbox stopped" if was else "sandbox was not running")


@sandbox.command("status")
def sandbox_status() -> None:
    """Show whether the sandbox sshd runs."""
    from dev_sync.sandbox import Sandbox

    info = Sandbox().status()
    if info is None:
        click.echo("sandbox is not running (start it with `dev-sync sandbox start`)")
        sys.exit(3)
    click.echo(f"sandbox running on 127.0.0.1:{info.port} (pid {info.pid}); "
               f"ssh_config {info.ssh_config}")


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point: run the CLI and map every failure to an exit code."""
    try:
        cli.main(args=list(argv) if argv is not None else None, prog_name="dev-sync",
                 standalone_mode=False)
    except DevSyncError as exc:
        click.echo(exc.render(), err=True)
        return exc.exit_code
    except click.exceptions.Exit as exc:
        return int(exc.exit_code)
    except click.ClickException as exc:
        exc.show()
        return EXIT_USAGE if isinstance(exc, click.UsageError) else exc.exit_code
    except click.exceptions.Abort:
        return EXIT_INTERRUPTED
    except KeyboardInterrupt:
        return EXIT_INTERRUPTED
    except SystemExit as exc:
        return exc.code if isinstance(exc.code, int) else (0 if exc.code is None else 1)
    return 0
