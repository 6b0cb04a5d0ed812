"""A private local "remote": an OpenSSH server on 127.0.0.1 that only dev-sync uses.

Why it exists: trying dev-sync, and testing it, should not need a VM. The
sandbox is a real ``sshd`` with its own host key, client key, known_hosts and
``ssh_config``, all inside one folder, so the whole ssh + rsync path is
exercised exactly as against a real machine, while nothing of the user's
(``~/.ssh``, the system sshd, its port 22) is read or changed.

Layout of the sandbox folder (mode 0700)::

    ssh_host_ed25519_key{,.pub}  host key (the server's identity)
    id_ed25519{,.pub}            client key (ours)
    authorized_keys              the client key, accepted from loopback only
    known_hosts                  the host key, pinned to [127.0.0.1]:PORT
    sshd_config, sshd.pid, sshd.log
    ssh_config                   ``Host dev-sync-sandbox``: pass it as ``ssh -F``
    remote/                      where synced projects go

Facts that shaped the code (OpenSSH 9.2):

* ``sshd`` daemonizes *before* it binds its port, so the launching process
  exits 0 even when the port is taken. The PID file is written only once the
  listening socket is bound, so "PID file present" means "ready", and a bind
  failure shows up only in the log (``-E``).
* ``sshd`` runs every command through the user's login shell, which reads rc
  files (on Debian bash reads ``~/.bashrc`` for ssh commands). On a machine
  whose rc files are slow (pyenv, nvm, conda) every remote command pays for
  them; ``clean_shell`` hides them from this sshd only, using a private mount
  namespace, so measurements reflect a plain VM.
"""

from __future__ import annotations

import contextlib
import fcntl
import os
import pwd
import re
import shutil
import signal
import socket
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from dev_sync import runner
from dev_sync.errors import DevSyncError

SANDBOX_HOST = "dev-sync-sandbox"
"""Host alias written into the sandbox ``ssh_config``."""

_LOOPBACK = "127.0.0.1"
_START_TIMEOUT = 10.0
_STOP_TIMEOUT = 5.0
_PORT_ATTEMPTS = 5
# Exit code of the clean-shell wrapper when a bind mount fails, distinct from
# unshare's own 1 and sshd's 255 when reading a failed start by hand.
_WRAPPER_MOUNT_FAILED = 97
# Binds /dev/null over each path argument up to "--", then becomes the command
# after it. Paths arrive as positional arguments, never inside the script text.
_CLEAN_SHELL_SCRIPT = (
    'while [ "$1" != "--" ]; do '
    f'mount --bind /dev/null "$1" || exit {_WRAPPER_MOUNT_FAILED}; shift; '
    'done; shift; exec "$@"'
)


def default_sandbox_dir() -> Path:
    """Where the sandbox lives unless told otherwise.

    ``$DEV_SYNC_SANDBOX_DIR`` wins (tests, several sandboxes side by side);
    otherwise the XDG state folder, since the sandbox is machine-local state
    that can be rebuilt, not configuration.
    """
    explicit = os.environ.get("DEV_SYNC_SANDBOX_DIR")
    if explicit:
        return Path(explicit).expanduser()
    state = os.environ.get("XDG_STATE_HOME")
    if state and Path(state).is_absolute():
        return Path(state) / "dev-sync" / "sandbox"
    return Path.home() / ".local" / "state" / "dev-sync" / "sandbox"


@dataclass(frozen=True)
class SandboxInfo:
    """A running sandbox: everything a client needs to reach it."""

    base: Path
    port: int
    pid: int
    ssh_config: Path
    host: str
    remote_dir: Path
    user: str
    # True when this sshd runs with the user's shell rc files hidden.
    clean_shell: bool = False


def _current_user() -> str:
    # pwd, not $USER/$LOGNAME: those can be stale after su/sudo, and sshd
    # checks AllowUsers against the real account name.
    return pwd.getpwuid(os.getuid()).pw_name


def _find_program(name: str, *candidates: str) -> str | None:
    for candidate in candidates:
        if os.access(candidate, os.X_OK):
            return candidate
    found = shutil.which(name)
    return str(Path(found).resolve()) if found else None


def _free_port() -> int:
    """A port nobody listens on right now (it may be taken again before sshd binds)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind((_LOOPBACK, 0))
        port: int = sock.getsockname()[1]
        return port


def _cfg_path(path: Path, *, tokens: bool = False) -> str:
    """A path as one ssh/sshd config argument.

    Both parsers split on whitespace and honour double quotes; options that
    expand ``%`` tokens need ``%%`` for a literal percent sign.
    """
    text = str(path)
    if tokens:
        text = text.replace("%", "%%")
    if re.search(r"[\s#']", text):
        text = f'"{text}"'
    return text


def client_config_lines(
    host: str, port: int, identity: Path, known_hosts: Path, connect_timeout: int = 10
) -> list[str]:
    """An ssh config block reaching the sandbox sshd on ``port`` as ``host``.

    Pinned to the sandbox's own key and known_hosts, so nothing of the
    user's ssh set-up is read or changed.
    """
    return [
        f"Host {host}",
        f"  HostName {_LOOPBACK}",
        f"  Port {port}",
        f"  User {_current_user()}",
        f"  IdentityFile {_cfg_path(identity, tokens=True)}",
        "  IdentitiesOnly yes",
        "  IdentityAgent none",
        f"  UserKnownHostsFile {_cfg_path(known_hosts, tokens=True)}",
        "  GlobalKnownHostsFile /dev/null",
        "  StrictHostKeyChecking yes",
        "  HostKeyAlgorithms ssh-ed25519",
        "  UpdateHostKeys no",
        "  CheckHostIP no",
        "  BatchMode yes",
        "  PasswordAuthentication no",
        f"  ConnectTimeout {connect_timeout}",
    ]


def _check_base_path(base: Path) -> None:
    text = str(base)
    # ssh_config has no escape for ${...} (environment expansion), and
    # quotes, backslashes and newlines cannot be written reliably.
    if any(c in text for c in '"\\\n\r\0') or "${" in text:
        raise DevSyncError(
            f"the sandbox folder {text!r} holds characters an ssh config file cannot hold",
            "set DEV_SYNC_SANDBOX_DIR to a plain path, e.g. /tmp/dev-sync-sandbox",
        )


def _pid_alive(pid: int) -> bool:
    """True if ``pid`` exists and is not a zombie.

    A zombie counts as gone: a stopped sshd whose parent (often a container's
    init) never reaps it still answers ``kill(pid, 0)``.
    """
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return True  # no /proc (macOS): kill(0) is all we have
    return stat.rpartition(")")[2].split()[0] != "Z"


def _children(pid: int) -> list[int]:
    """Direct children of ``pid`` (Linux only; empty elsewhere)."""
    found: list[int] = []
    with contextlib.suppress(OSError):
        for entry in os.scandir("/proc"):
            if not entry.name.isdigit():
                continue
            try:
                stat = Path(entry.path, "stat").read_text()
            except OSError:
                continue
            fields = stat.rpartition(")")[2].split()
            if len(fields) > 1 and fields[1] == str(pid):
                found.append(int(entry.name))
    return found


def _wait_gone(pids: list[int], timeout: float) -> bool:
    deadline = time.monotonic() + timeout
    while any(_pid_alive(p) for p in pids):
        if time.monotonic() >= deadline:
            return False
        time.sleep(0.01)
    return True


def _signal(pids: list[int], sig: signal.Signals) -> None:
    for pid in pids:
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.kill(pid, sig)


def _same_mount_namespace(pid: int) -> bool:
    try:
        return Path(f"/proc/{pid}/ns/mnt").readlink() == Path("/proc/self/ns/mnt").readlink()
    except OSError:
        return True


class Sandbox:
    """Start, inspect and stop the sandbox sshd living in one folder.

    Every operation re-reads the folder, so separate processes (``dev-sync
    sandbox start`` in one terminal, ``stop`` in another) agree on its state;
    start and stop hold a lock file so two starts cannot race.
    """

    def __init__(self, base: Path | None = None, *, clean_shell: bool = False) -> None:
        self.base = (base if base is not None else default_sandbox_dir()).absolute()
        self.clean_shell = clean_shell

    # -- paths ---------------------------------------------------------------
    @property
    def ssh_config(self) -> Path:
        return self.base / "ssh_config"

    @property
    def sshd_config(self) -> Path:
        return self.base / "sshd_config"

    @property
    def pid_file(self) -> Path:
        return self.base / "sshd.pid"

    @property
    def log_file(self) -> Path:
        return self.base / "sshd.log"

    @property
    def remote_dir(self) -> Path:
        return self.base / "remote"

    @property
    def _host_key(self) -> Path:
        return self.base / "ssh_host_ed25519_key"

    @property
    def _client_key(self) -> Path:
        return self.base / "id_ed25519"

    @property
    def _authorized_keys(self) -> Path:
        return self.base / "authorized_keys"

    @property
    def _known_hosts(self) -> Path:
        return self.base / "known_hosts"

    # -- public API ----------------------------------------------------------
    def status(self) -> SandboxInfo | None:
        """The running sandbox, or None (no folder, no PID file, or a dead PID)."""
        pid = self._read_pid()
        port = self._configured_port()
        if pid is None or port is None or not self._is_our_sshd(pid):
            return None
        return self._info(port, pid)

    def start(self) -> SandboxInfo:
        """Start the sandbox, or return the one already running.

        Raises DevSyncError when OpenSSH is missing, no port could be bound,
        sshd rejects the configuration, or a real ``ssh ... true`` fails.
        """
        sshd = _find_program("sshd", "/usr/sbin/sshd", "/usr/local/sbin/sshd")
        if sshd is None:
            raise DevSyncError(
                "the OpenSSH server (sshd) is not installed; the sandbox runs one on 127.0.0.1",
                "install it: `sudo apt-get install openssh-server` (Debian/Ubuntu; "
                "`dnf install openssh-server` on Fedora); on macOS sshd ships with "
                "the system (System Settings > General > Sharing > Remote Login)",
            )
        keygen = _find_program("ssh-keygen", "/usr/bin/ssh-keygen")
        ssh = _find_program("ssh", "/usr/bin/ssh")
        if keygen is None or ssh is None:
            raise DevSyncError(
                "the OpenSSH client (ssh, ssh-keygen) is not installed",
                "install it: `sudo apt-get install openssh-client` (Debian/Ubuntu)",
            )
        _check_base_path(self.base)
        self._make_base()
        with self._locked():
            running = self.status()
            if running is not None:
                return running
            self._ensure_keys(keygen)
            self._ensure_privsep_dir()
            info = self._launch(sshd)
            self._write_client_files(info.port)
        self._verify(ssh, info)
        return info

    def stop(self) -> bool:
        """Stop the sandbox sshd and the connections it serves.

        Returns True if it was running. Waits until the processes are gone,
        so a caller can remove the folder or start again right away.
        """
        if not self.base.is_dir():
            return False
        with self._locked():
            pid = self._read_pid()
            if pid is None or not self._is_our_sshd(pid):
                self.pid_file.unlink(missing_ok=True)
                return False
            # Connection handlers are children of the listener; collect them
            # before it goes, since they are re-parented (and keep serving
            # open ControlMaster connections) once it has exited.
            pids = [pid, *_children(pid)]
            _signal(pids, signal.SIGTERM)
            if not _wait_gone(pids, _STOP_TIMEOUT):
                _signal(pids, signal.SIGKILL)
                if not _wait_gone(pids, _STOP_TIMEOUT):
                    raise DevSyncError(
                        f"the sandbox sshd (pid {pid}) did not exit after SIGKILL",
                        f"check it with `ps -p {pid}`",
                    )
            self.pid_file.unlink(missing_ok=True)
            return True

    # -- internals -----------------------------------------------------------
    def _info(self, port: int, pid: int) -> SandboxInfo:
        return SandboxInfo(
            base=self.base,
            port=port,
            pid=pid,
            ssh_config=self.ssh_config,
            host=SANDBOX_HOST,
            remote_dir=self.remote_dir,
            user=_current_user(),
            clean_shell=not _same_mount_namespace(pid),
        )

    def _read_pid(self) -> int | None:
        try:
            text = self.pid_file.read_text().strip()
        except OSError:
            return None
        return int(text) if text.isdigit() else None

    def _configured_port(self) -> int | None:
        try:
            text = self.sshd_config.read_text()
        except OSError:
            return None
        match = re.search(r"^Port (\d+)$", text, re.MULTILINE)
        return int(match.group(1)) if match else None

    def _is_our_sshd(self, pid: int) -> bool:
        """Alive, and (where /proc tells) started with our config: PIDs get reused."""
        if not _pid_alive(pid):
            return False
        if not Path("/proc/self").exists():
            return True  # macOS: no cheap way to read another process's argv
        try:
            cmdline = Path(f"/proc/{pid}/cmdline").read_bytes()
        except FileNotFoundError:
            return False  # exited since the check above
        except OSError:
            return True
        # sshd rewrites its argv into one proctitle string, so search the bytes.
        return os.fsencode(self.sshd_config) in cmdline

    def _make_base(self) -> None:
        try:
            self.base.mkdir(parents=True, exist_ok=True)
            self.base.chmod(0o700)
            self.remote_dir.mkdir(exist_ok=True)
        except OSError as exc:
            raise DevSyncError(
                f"cannot create the sandbox folder {self.base}: {exc.strerror}",
                "set DEV_SYNC_SANDBOX_DIR to a folder you can write",
            ) from None

    @contextlib.contextmanager
    def _locked(self) -> Iterator[None]:
        with (self.base / ".lock").open("a") as fh:
            fcntl.flock(fh, fcntl.LOCK_EX)
            try:
                yield
            finally:
                fcntl.flock(fh, fcntl.LOCK_UN)

    def _ensure_keys(self, keygen: str) -> None:
        """Create the host and client keys once; later starts keep them.

        Keeping them means an ssh_config copied elsewhere, or a known_hosts
        entry someone made, stays valid across restarts.
        """
        for key, comment in ((self._host_key, "host"), (self._client_key, "client")):
            pub = key.with_name(key.name + ".pub")
            if key.is_file() and pub.is_file():
                continue
            key.unlink(missing_ok=True)
            pub.unlink(missing_ok=True)
            runner.run(
                [
                    keygen,
                    "-q",
                    "-t",
                    "ed25519",
                    "-N",
                    "",
                    "-C",
                    f"dev-sync-sandbox {comment}",
                    "-f",
                    str(key),
                ]
            )
        client_pub = self._client_key.with_name(self._client_key.name + ".pub").read_text().strip()
        # from=: the key is only good on loopback, even if the port were reachable.
        self._authorized_keys.write_text(f'from="127.0.0.1,::1" {client_pub}\n')
        self._authorized_keys.chmod(0o600)

    def _ensure_privsep_dir(self) -> None:
        # A root sshd refuses to start without its privilege separation
        # directory; it is normally made by the init system, which containers
        # often lack. A non-root sshd does not use it.
        if os.geteuid() != 0 or not Path("/run").is_dir():
            return
        privsep = Path("/run/sshd")
        if not privsep.is_dir():
            privsep.mkdir(mode=0o755, exist_ok=True)

    def _sshd_config_text(self, port: int, user: str) -> str:
        return "\n".join(
            [
                "# Written by dev-sync sandbox; rewritten at every start.",
                f"Port {port}",
                f"ListenAddress {_LOOPBACK}",
                f"HostKey {_cfg_path(self._host_key)}",
                f"PidFile {_cfg_path(self.pid_file)}",
                f"AuthorizedKeysFile {_cfg_path(self._authorized_keys, tokens=True)}",
                "AuthorizedPrincipalsFile none",
                "PubkeyAuthentication yes",
                "PasswordAuthentication no",
                "KbdInteractiveAuthentication no",
                "HostbasedAuthentication no",
                "PermitEmptyPasswords no",
                "UsePAM no",
                # The folder may sit in /tmp or a group-writable home.
                "StrictModes no",
                # The current user may be root (containers, CI).
                "PermitRootLogin prohibit-password",
                f"AllowUsers {user}",
                "UseDNS no",
                "PrintMotd no",
                "PrintLastLog no",
                "X11Forwarding no",
                "PermitUserEnvironment no",
                # dev-sync multiplexes many commands over one connection and
                # tests open connections in bursts.
                "MaxSessions 64",
                "MaxStartups 64:30:128",
                "LoginGraceTime 20",
                "Subsystem sftp internal-sftp",
                "",
            ]
        )

    def _shell_rc_files(self) -> list[Path]:
        home = Path(pwd.getpwuid(os.getuid()).pw_dir)
        names = (".bashrc", ".profile", ".bash_profile", ".bash_login", ".zshenv")
        candidates = [home / n for n in names] + [Path("/etc/bash.bashrc")]
        return [p for p in candidates if p.is_file()]

    def _can_hide_rc_files(self) -> bool:
        # Only root may make a mount namespace without a user namespace, and
        # a user namespace would change who sshd thinks it runs as.
        return (
            self.clean_shell
            and os.geteuid() == 0
            and shutil.which("unshare") is not None
            and shutil.which("mount") is not None
        )

    def _launch_argv(self, sshd: str, *, clean: bool) -> list[str]:
        """The command that starts sshd, optionally with the shell rc files hidden."""
        argv = [sshd, "-f", str(self.sshd_config), "-E", str(self.log_file)]
        if not clean:
            return argv
        rc_files = [str(p) for p in self._shell_rc_files()]
        unshare = shutil.which("unshare") or "unshare"
        wrapper = [
            unshare,
            "--mount",
            "--propagation",
            "private",
            "sh",
            "-c",
            _CLEAN_SHELL_SCRIPT,
            "dev-sync-sandbox",
            *rc_files,
            "--",
        ]
        return wrapper + argv

    def _launch(self, sshd: str) -> SandboxInfo:
        user = _current_user()
        ports = [p for p in (self._configured_port(),) if p is not None]
        checked = False
        for attempt in range(_PORT_ATTEMPTS):
            port = ports[attempt] if attempt < len(ports) else _free_port()
            self.sshd_config.write_text(self._sshd_config_text(port, user))
            if not checked:
                self._config_test(sshd)
                checked = True
            pid = self._spawn(sshd)
            if pid is not None:
                return self._info(port, pid)
        raise DevSyncError(
            f"the sandbox sshd could not bind a port on {_LOOPBACK} "
            f"({_PORT_ATTEMPTS} attempts, last {port}): another program took each one",
            f"run `dev-sync sandbox start` again; the log is {self.log_file}",
        )

    def _config_test(self, sshd: str) -> None:
        try:
            runner.run([sshd, "-t", "-f", str(self.sshd_config)], timeout=30)
        except runner.CommandError as exc:
            # sshd ends with "terminating, N bad configuration options"; the
            # line naming the option comes before it.
            lines = [ln.strip() for ln in exc.err.splitlines() if ln.strip()]
            telling = [ln for ln in lines if not ln.startswith("terminating")] or lines
            detail = telling[0] if telling else exc.last_line()
            raise DevSyncError(
                f"sshd rejected the sandbox configuration: {detail}",
                f"check {self.sshd_config}; `{sshd} -t -f {self.sshd_config}` repeats the test",
            ) from None

    def _spawn(self, sshd: str) -> int | None:
        """Start sshd; its PID once it listens, or None if the port was taken."""
        self.pid_file.unlink(missing_ok=True)
        offset = self.log_file.stat().st_size if self.log_file.exists() else 0
        clean = self._can_hide_rc_files()
        result = runner.run(self._launch_argv(sshd, clean=clean), check=False, timeout=30)
        if result.returncode != 0 and clean:
            # No right to make a mount namespace here (an unprivileged
            # container): the clean shell is an optimisation, so go without.
            result = runner.run(self._launch_argv(sshd, clean=False), check=False, timeout=30)
        if result.returncode != 0:
            failure = runner.CommandError(
                result.argv, result.returncode, result.stdout, result.stderr
            )
            raise DevSyncError(f"sshd did not start: {failure.last_line()}", f"see {self.log_file}")
        deadline = time.monotonic() + _START_TIMEOUT
        while True:
            pid = self._read_pid()
            if pid is not None and _pid_alive(pid):
                return pid
            log = self._log_since(offset)
            if "Cannot bind any address" in log:
                return None
            if time.monotonic() >= deadline:
                tail = log.strip().splitlines()[-1:] or ["no log output"]
                raise DevSyncError(
                    f"the sandbox sshd did not come up within {_START_TIMEOUT:g}s: {tail[0]}",
                    f"see {self.log_file}",
                )
            time.sleep(0.005)

    def _log_since(self, offset: int) -> str:
        try:
            with self.log_file.open("rb") as fh:
                fh.seek(offset)
                return fh.read().decode("utf-8", "replace")
        except OSError:
            return ""

    def _write_client_files(self, port: int) -> None:
        host_pub = self._host_key.with_name(self._host_key.name + ".pub").read_text().split()
        self._known_hosts.write_text(f"[{_LOOPBACK}]:{port} {host_pub[0]} {host_pub[1]}\n")
        header = [
            "# Written by dev-sync sandbox; rewritten at every start.",
            f"# Use: ssh -F {_cfg_path(self.ssh_config)} {SANDBOX_HOST}",
        ]
        body = client_config_lines(SANDBOX_HOST, port, self._client_key, self._known_hosts)
        self.ssh_config.write_text("\n".join([*header, *body, ""]))

    def _verify(self, ssh: str, info: SandboxInfo) -> None:
        """One real login: proves keys, known_hosts, AllowUsers and the shell all work.

        On failure the sshd is stopped again, so the next start() retries
        from scratch instead of returning a sandbox nobody can log in to.
        """
        try:
            runner.run([ssh, "-F", str(info.ssh_config), info.host, "true"], timeout=30)
        except runner.CommandError as exc:
            self.stop()
            raise DevSyncError(
                f"the sandbox sshd started (port {info.port}) but `ssh {info.host} true` "
                f"failed: {exc.last_line()}",
                f"see the server side in {self.log_file}",
            ) from None
