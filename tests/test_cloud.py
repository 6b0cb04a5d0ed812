"""Cloud VMs: [cloud] config, the EC2 provider, `dev-sync vm`, and `up` waking a stopped VM.

EC2 is moto in server mode on loopback, reached through ``endpoint_url``
exactly as an AWS-compatible cloud would be, with dummy credentials; no
test ever talks to AWS. A VM whose address dev-sync connects to is
launched into a 127.0.0.0/24 subnet with the private address 127.0.0.1 and
configured with ``address = "private_ip"``, so the sandbox sshd is the VM's
sshd and every connection stays on this machine. The ssh alias itself
points at 127.0.0.2, where nothing listens: a session only works if it
used the address the cloud reported.
"""

from __future__ import annotations

import http.server
import io
import json
import subprocess
import sys
import threading
import urllib.request
import uuid
from collections.abc import Callable, Iterator, Mapping
from pathlib import Path
from typing import Any

import boto3
import pytest
from botocore.exceptions import (
    ClientError,
    EndpointConnectionError,
    NoCredentialsError,
    ProfileNotFound,
)
from driver import json_events, run_cli
from helpers import Project, TomlValue, free_port, toml_value
from moto.backends import get_backend
from moto.core.models import DEFAULT_ACCOUNT_ID
from moto.server import ThreadedMotoServer
from rich.console import Console

from dev_sync import cloud, prestart
from dev_sync.cloud import CloudError
from dev_sync.config import CloudConfig, load_config
from dev_sync.errors import ConfigError
from dev_sync.events import ConsoleReporter, Event, VmState
from dev_sync.sandbox import SandboxInfo, client_config_lines
from dev_sync.target import Target

REGION = "eu-west-1"
AMI = "ami-12c6146b"
ALIAS = "cloud-dev"


# --------------------------------------------------------------------------
# A fake EC2 on loopback


@pytest.fixture(scope="session")
def moto_url() -> Iterator[str]:
    """One moto server for the whole run; each test resets its state."""
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    host, port = server.get_host_and_port()
    try:
        yield f"http://{host}:{port}"
    finally:
        server.stop()


def _post(url: str, body: bytes = b"") -> None:
    # text/plain: a form content type would hide the body from moto.
    request = urllib.request.Request(url, data=body, method="POST",
                                     headers={"Content-Type": "text/plain"})
    opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))
    with opener.open(request, timeout=10) as response:
        response.read()


@pytest.fixture
def aws(moto_url: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> str:
    """Dummy credentials, no ~/.aws, no instance metadata, and an empty moto."""
    _post(f"{moto_url}/moto-api/reset")
    empty = tmp_path / "aws-empty"
    empty.write_text("")
    for name in ("AWS_PROFILE", "AWS_DEFAULT_PROFILE", "AWS_SESSION_TOKEN", "AWS_REGION",
                 "AWS_DEFAULT_REGION", "AWS_ENDPOINT_URL", "AWS_ENDPOINT_URL_EC2",
                 "AWS_CONTAINER_CREDENTIALS_RELATIVE_URI", "AWS_CONTAINER_CREDENTIALS_FULL_URI",
                 "AWS_WEB_IDENTITY_TOKEN_FILE", "AWS_ROLE_ARN"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "testing")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "testing")
    monkeypatch.setenv("AWS_SHARED_CREDENTIALS_FILE", str(empty))
    monkeypatch.setenv("AWS_CONFIG_FILE", str(empty))
    # Never ask 169.254.169.254 for credentials: nothing may leave loopback.
    monkeypatch.setenv("AWS_EC2_METADATA_DISABLED", "true")
    monkeypatch.setenv("DEV_SYNC_PERSONAL_CONFIG", str(tmp_path / "no-personal.toml"))
    monkeypatch.setenv("DEV_SYNC_STATE_DIR", str(tmp_path / "state"))
    monkeypatch.delenv("DEV_SYNC_ENV", raising=False)
    return moto_url


@pytest.fixture
def ec2(aws: str) -> Any:
    """A boto3 client on the fake EC2, to set the scene."""
    return boto3.client("ec2", region_name=REGION, endpoint_url=aws)


def launch(ec2: Any, *, tags: Mapping[str, str] | None = None, loopback: bool = False) -> str:
    """Run an instance and return its id; ``loopback`` gives it the private address 127.0.0.1."""
    kwargs: dict[str, Any] = {"ImageId": AMI, "MinCount": 1, "MaxCount": 1}
    if tags:
        kwargs["TagSpecifications"] = [{"ResourceType": "instance", "Tags": [
            {"Key": k, "Value": v} for k, v in tags.items()]}]
    if loopback:
        vpc = ec2.create_vpc(CidrBlock="127.0.0.0/16")["Vpc"]["VpcId"]
        subnet = ec2.create_subnet(VpcId=vpc, CidrBlock="127.0.0.0/24")["Subnet"]["SubnetId"]
        kwargs.update(SubnetId=subnet, PrivateIpAddress="127.0.0.1")
    instance_id: str = ec2.run_instances(**kwargs)["Instances"][0]["InstanceId"]
    return instance_id


def described(ec2: Any, instance_id: str) -> dict[str, Any]:
    found: dict[str, Any] = ec2.describe_instances(InstanceIds=[instance_id])[
        "Reservations"][0]["Instances"][0]
    return found


def set_state(instance_id: str, state: str) -> None:
    """Put an instance in a transition state, as EC2 shows while it boots or shuts down.

    Moto's own start and stop jump straight to running and stopped; the
    states in between are set on its in-process model, which the server
    then reports like any other.
    """
    codes = {"pending": 0, "running": 16, "stopping": 64, "stopped": 80}
    instance = get_backend("ec2")[DEFAULT_ACCOUNT_ID][REGION].get_instance(instance_id)
    instance._state.name = state
    instance._state.code = codes[state]


# --------------------------------------------------------------------------
# Config files


def cloud_table(endpoint: str, **keys: TomlValue) -> dict[str, TomlValue]:
    return {"provider": "aws", "region": REGION, "endpoint_url": endpoint, **keys}


def write_toml(path: Path, tables: Mapping[str, Mapping[str, TomlValue]]) -> Path:
    parts = []
    for name, table in tables.items():
        body = "".join(f"{key} = {toml_value(val)}\n" for key, val in table.items())
        parts.append(f"[{name}]\n{body}")
    path.write_text("\n".join(parts))
    return path


def plain_config(tmp_path: Path, endpoint: str,
                 extra: Mapping[str, Mapping[str, TomlValue]] | None = None,
                 **cloud_keys: TomlValue) -> Path:
    """A project on a VM that no test connects to: only the cloud API is used."""
    return write_toml(tmp_path / "dev-sync.toml", {
        "remote": {"host": "devbox", "path": "/srv/app"},
        "remote.cloud": cloud_table(endpoint, **cloud_keys),
        **(extra or {}),
    })


def stale_alias_config(sandbox: SandboxInfo, path: Path, port: int | None = None) -> Path:
    """An ssh config whose alias points at 127.0.0.2, where no sshd listens.

    Same key, user and pinned host key as the sandbox: only the address
    the cloud reports (127.0.0.1) reaches it.
    """
    lines = client_config_lines(ALIAS, port or sandbox.port, sandbox.base / "id_ed25519",
                                sandbox.base / "known_hosts", 5)
    lines = ["  HostName 127.0.0.2" if ln.strip().startswith("HostName") else ln
             for ln in lines]
    path.write_text("\n".join([*lines, ""]))
    return path


def cloud_project(project: Project, endpoint: str, instance_id: str,
                  port: int | None = None, **cloud_keys: TomlValue) -> Path:
    ssh_config = stale_alias_config(project.sandbox, project.local.parent / "ssh_config", port)
    return project.write_config(
        remote={"host": ALIAS, "ssh_config": str(ssh_config)},
        sections={"remote.cloud": cloud_table(endpoint, instance_id=instance_id,
                                              address="private_ip", **cloud_keys)},
    )


class Events:
    """A reporter that keeps what it is told and can act on it, like a user watching."""

    def __init__(self, react: Callable[[VmState], None] | None = None) -> None:
        self.seen: list[VmState] = []
        self.react = react

    def emit(self, event: Event) -> None:
        if isinstance(event, VmState):
            self.seen.append(event)
            if self.react is not None:
                self.react(event)

    def steps(self) -> list[tuple[str, str]]:
        return [(e.step, e.state) for e in self.seen]


# --------------------------------------------------------------------------
# Config


@pytest.mark.parametrize(
    ("cloud_keys", "needle"),
    [
        ({"provider": "gcp", "instance_id": "i-0123456789abcdef0"}, "[remote] cloud.provider"),
        ({"instance_id": "i-0123456789abcdef0", "tags": {"Name": "x"}}, "exactly one of"),
        ({}, "exactly one of"),
        ({"instance_id": "vm-1"}, "[remote] cloud.instance_id"),
        ({"tags": {}}, "cloud.tags: must name at least one tag"),
        ({"instance_id": "i-0123456789abcdef0", "wake_timeout": 0}, "cloud.wake_timeout"),
        ({"instance_id": "i-0123456789abcdef0", "address": "ipv6"}, "cloud.address"),
        ({"instance_id": "i-0123456789abcdef0", "endpoint_url": "localhost"},
         "cloud.endpoint_url"),
        ({"instance_id": "i-0123456789abcdef0", "zone": "a"}, "cloud.zone: unknown key"),
    ],
)
def test_bad_cloud_table_exits_2_naming_file_and_key(
    aws: str, tmp_path: Path, cloud_keys: dict[str, TomlValue], needle: str
) -> None:
    path = plain_config(tmp_path, aws, None, **cloud_keys)
    result = run_cli("vm", "status", "--config", str(path))
    assert result.returncode == 2, result.stderr
    assert needle in result.stderr and str(path) in result.stderr


def test_top_level_cloud_belongs_to_the_default_env(aws: str, tmp_path: Path) -> None:
    path = write_toml(tmp_path / "dev-sync.toml", {
        "remote": {"host": "devbox", "path": "/srv/app"},
        "cloud": cloud_table(aws, tags={"Name": "dev"}),
        "envs.other": {"host": "other", "path": "/srv/app"},
        "envs.mine": {"host": "mine", "path": "/srv/app"},
        "envs.mine.cloud": cloud_table(aws, instance_id="i-0123456789abcdef0", wake_timeout=5),
    })
    default = load_config(path)
    assert default.remote.cloud is not None and default.remote.cloud.tags == {"Name": "dev"}
    assert load_config(path, "other").remote.cloud is None
    mine = load_config(path, "mine").remote.cloud
    assert mine is not None and mine.wake_timeout == 5 and mine.address == "public_ip"


def test_envs_lists_the_vms_and_vm_needs_one(aws: str, tmp_path: Path) -> None:
    path = write_toml(tmp_path / "dev-sync.toml", {
        "remote": {"host": "devbox", "path": "/srv/app"},
        "cloud": cloud_table(aws, tags={"Name": "dev"}),
        "envs.plain": {"host": "plain", "path": "/srv/app"},
    })
    rows = json.loads(run_cli("envs", "--json", "--config", str(path)).stdout)
    assert [(r["name"], r["cloud"]) for r in rows] == [("default", "tags Name=dev"),
                                                        ("plain", None)]
    result = run_cli("vm", "status", "--env", "plain", "--config", str(path))
    assert result.returncode == 2
    assert "the environment 'plain' has no cloud VM" in result.stderr
    assert "[envs.plain.cloud]" in result.stderr


def test_cloud_twice_for_the_default_env_is_refused(aws: str, tmp_path: Path) -> None:
    path = plain_config(tmp_path, aws, {"cloud": cloud_table(aws, tags={"Name": "dev"})},
                        instance_id="i-0123456789abcdef0")
    with pytest.raises(ConfigError) as info:
        load_config(path)
    assert "[cloud] and [remote.cloud]" in info.value.cause and info.value.exit_code == 2


def test_personal_config_can_hold_my_vm(aws: str, tmp_path: Path,
                                        monkeypatch: pytest.MonkeyPatch) -> None:
    personal = tmp_path / "personal.toml"
    write_toml(personal, {"envs.mine": {"host": "mine", "path": "/srv/app"},
                          "envs.mine.cloud": cloud_table(aws, tags={"Owner": "me"})})
    monkeypatch.setenv("DEV_SYNC_PERSONAL_CONFIG", str(personal))
    project = write_toml(tmp_path / "dev-sync.toml", {"sync": {"gitignore": True}})
    remote_cloud = load_config(project, "mine").remote.cloud
    assert remote_cloud is not None and remote_cloud.tags == {"Owner": "me"}


def test_ssh_keeps_the_alias_and_overrides_only_the_address() -> None:
    plain = Target("devbox", port=2222)
    moved = Target("devbox", port=2222, hostname="203.0.113.7")
    assert "-o" in moved.options() and "HostName=203.0.113.7" in moved.options()
    assert "HostName=203.0.113.7" not in plain.options()
    assert moved.master_argv()[-1] == "devbox"
    assert moved.control_path() != plain.control_path()
    assert "203.0.113.7" in moved.label


def test_no_head_start_for_a_cloud_vm(tmp_path: Path) -> None:
    """``up`` starts ssh before loading the program, but a cloud VM may be stopped or moved."""
    path = tmp_path / "dev-sync.toml"
    path.write_text('[remote]\nhost = "devbox"\npath = "/srv/app"\n')
    assert prestart._early_target(path) is not None
    path.write_text('[remote]\nhost = "devbox"\npath = "/srv/app"\n[remote.cloud]\n'
                    'provider = "aws"\nregion = "eu-west-1"\ninstance_id = "i-0123456789abcdef0"\n')
    assert prestart._early_target(path) is None


def test_up_without_cloud_never_loads_boto3(tmp_path: Path) -> None:
    path = tmp_path / "dev-sync.toml"
    path.write_text('[remote]\nhost = "devbox"\npath = "/srv/app"\n')
    code = (
        "import sys\n"
        "from pathlib import Path\n"
        "import dev_sync.cli\n"
        "from dev_sync.cloud import ensure_running\n"
        "from dev_sync.config import load_config\n"
        f"config = load_config(Path({str(path)!r}))\n"
        "assert ensure_running(config, None) is config\n"
        "loaded = sorted(m for m in sys.modules if m.split('.')[0] in ('boto3', 'botocore'))\n"
        "assert not loaded, loaded\n"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                            check=False)
    assert result.returncode == 0, result.stderr


# --------------------------------------------------------------------------
# vm status / start / stop and the provider


def test_vm_status_text_and_json(ec2: Any, aws: str, tmp_path: Path) -> None:
    instance_id = launch(ec2, tags={"Name": "dev-alice"})
    info = described(ec2, instance_id)
    path = plain_config(tmp_path, aws, instance_id=instance_id)
    result = run_cli("vm", "status", "--json", "--config", str(path))
    assert result.returncode == 0, result.stderr
    data = json.loads(result.stdout)
    assert data["instance_id"] == instance_id and data["state"] == "running"
    assert data["name"] == "dev-alice" and data["env"] == "default"
    assert data["public_ip"] == info["PublicIpAddress"] == data["address"]
    assert data["private_ip"] == info["PrivateIpAddress"]
    assert data["public_dns"] == info["PublicDnsName"]
    text = run_cli("vm", "status", "--config", str(path))
    assert text.returncode == 0, text.stderr
    assert f"{instance_id} (dev-alice): running" in text.stdout
    assert f"public_ip   {info['PublicIpAddress']}  <- ssh" in text.stdout


def test_vm_stop_then_the_public_address_changes_on_start(
    ec2: Any, aws: str, tmp_path: Path
) -> None:
    instance_id = launch(ec2)
    first = described(ec2, instance_id)["PublicIpAddress"]
    path = plain_config(tmp_path, aws, instance_id=instance_id)
    result = run_cli("vm", "stop", "--json", "--config", str(path))
    assert result.returncode == 0, result.stderr
    events = json_events(result.stdout)
    assert events[0]["event"] == "vm_state" and events[0]["step"] == "stopping"
    assert events[-1]["step"] == "stopped" and events[-1]["state"] == "stopped"
    stopped = json.loads(run_cli("vm", "status", "--json", "--config", str(path)).stdout)
    assert stopped["state"] == "stopped" and stopped["public_ip"] is None
    again = run_cli("vm", "stop", "--config", str(path))
    assert again.returncode == 0 and f"{instance_id} is stopped" in again.stdout

    ec2.start_instances(InstanceIds=[instance_id])
    config = load_config(path)
    moved = cloud.locate(config)
    assert moved.remote.cloud_address == described(ec2, instance_id)["PublicIpAddress"] != first
    assert f"HostName={moved.remote.cloud_address}" in Target.from_config(moved).options()


def test_commands_that_connect_refuse_a_stopped_vm(ec2: Any, aws: str, tmp_path: Path) -> None:
    instance_id = launch(ec2)
    ec2.stop_instances(InstanceIds=[instance_id])
    path = plain_config(tmp_path, aws, {"services.api": {"command": "true", "port": 8000}},
                        instance_id=instance_id)
    for args in (["forward"], ["services"], ["exec", "--config", str(path), "--", "true"]):
        result = run_cli(*args, "--config", str(path)) if args[0] != "exec" else run_cli(*args)
        assert result.returncode == 1, (args, result.stderr)
        assert f"({instance_id}) is stopped" in result.stderr
        assert "dev-sync vm start" in result.stderr


def test_hosts_apply_follows_the_new_address(ec2: Any, aws: str, tmp_path: Path) -> None:
    instance_id = launch(ec2)
    path = plain_config(tmp_path, aws, {"services.api": {"command": "true",
                                                         "hostname": "api.dev.test"}},
                        instance_id=instance_id)
    hosts = tmp_path / "hosts"
    hosts.write_text("127.0.0.1 localhost\n")

    def apply() -> str:
        result = run_cli("hosts", "apply", "--hosts-file", str(hosts), "--config", str(path))
        assert result.returncode == 0, result.stderr
        return hosts.read_text()

    first = described(ec2, instance_id)["PublicIpAddress"]
    assert f"{first}\tapi.dev.test" in apply()
    ec2.stop_instances(InstanceIds=[instance_id])
    ec2.start_instances(InstanceIds=[instance_id])
    second = described(ec2, instance_id)["PublicIpAddress"]
    assert second != first
    text = apply()
    assert f"{second}\tapi.dev.test" in text and first not in text
    assert text.startswith("127.0.0.1 localhost\n")


def test_unknown_instance(ec2: Any, aws: str, tmp_path: Path) -> None:
    path = plain_config(tmp_path, aws, None, instance_id="i-0123456789abcdef0")
    result = run_cli("vm", "status", "--config", str(path))
    assert result.returncode == 1, result.stderr
    assert "no instance i-0123456789abcdef0 in eu-west-1" in result.stderr
    assert "fix: check instance_id and region in [remote.cloud]" in result.stderr


def test_tags_must_match_exactly_one_live_instance(ec2: Any, aws: str, tmp_path: Path) -> None:
    team = uuid.uuid4().hex[:8]
    path = plain_config(tmp_path, aws, tags={"Team": team})
    none = run_cli("vm", "status", "--config", str(path))
    assert none.returncode == 1 and f"no instance in eu-west-1 has the tags Team={team}" in (
        none.stderr)

    gone = launch(ec2, tags={"Team": team, "Name": "old"})
    ec2.terminate_instances(InstanceIds=[gone])
    first = launch(ec2, tags={"Team": team, "Name": "web"})
    one = json.loads(run_cli("vm", "status", "--json", "--config", str(path)).stdout)
    assert one["instance_id"] == first  # the terminated one lingers but never matches

    second = launch(ec2, tags={"Team": team, "Name": "db"})
    several = run_cli("vm", "status", "--config", str(path))
    assert several.returncode == 1
    assert "2 instances in eu-west-1 have the tags" in several.stderr
    assert f"{first} (running, Name=web)" in several.stderr
    assert f"{second} (running, Name=db)" in several.stderr
    assert "set instance_id instead" in several.stderr


def test_no_credentials_says_how_to_configure(
    ec2: Any, aws: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    instance_id = launch(ec2)
    monkeypatch.delenv("AWS_ACCESS_KEY_ID")
    monkeypatch.delenv("AWS_SECRET_ACCESS_KEY")
    path = plain_config(tmp_path, aws, instance_id=instance_id)
    result = run_cli("vm", "status", "--config", str(path))
    assert result.returncode == 1, result.stderr
    assert "no AWS credentials found" in result.stderr
    assert "aws configure" in result.stderr and "AWS_PROFILE" in result.stderr

    named = plain_config(tmp_path, aws, instance_id=instance_id, profile="nobody")
    result = run_cli("vm", "status", "--config", str(named))
    assert result.returncode == 1
    assert "the AWS profile 'nobody' is not configured" in result.stderr


def test_a_profile_from_the_shared_files_is_used(
    ec2: Any, aws: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    instance_id = launch(ec2)
    monkeypatch.delenv("AWS_ACCESS_KEY_ID")
    monkeypatch.delenv("AWS_SECRET_ACCESS_KEY")
    creds = tmp_path / "credentials"
    creds.write_text("[dev]\naws_access_key_id = testing\naws_secret_access_key = testing\n")
    monkeypatch.setenv("AWS_SHARED_CREDENTIALS_FILE", str(creds))
    path = plain_config(tmp_path, aws, instance_id=instance_id, profile="dev")
    result = run_cli("vm", "status", "--json", "--config", str(path))
    assert result.returncode == 0, result.stderr
    assert json.loads(result.stdout)["state"] == "running"


@pytest.fixture
def enforced_iam(aws: str) -> Iterator[Callable[[list[str]], dict[str, str]]]:
    """Turn on moto's IAM checks; the callable makes a user allowed only ``actions``."""
    iam = boto3.client("iam", region_name="us-east-1", endpoint_url=aws)

    def user(actions: list[str]) -> dict[str, str]:
        name = f"dev-{uuid.uuid4().hex[:8]}"
        iam.create_user(UserName=name)
        iam.put_user_policy(UserName=name, PolicyName="dev", PolicyDocument=json.dumps({
            "Version": "2012-10-17",
            "Statement": [{"Effect": "Allow", "Action": actions, "Resource": "*"}],
        }))
        key = iam.create_access_key(UserName=name)["AccessKey"]
        return {"AWS_ACCESS_KEY_ID": key["AccessKeyId"],
                "AWS_SECRET_ACCESS_KEY": key["SecretAccessKey"]}

    yield user
    _post(f"{aws}/moto-api/reset-auth", b"inf")


def test_missing_permission_is_named(
    ec2: Any, aws: str, tmp_path: Path, enforced_iam: Callable[[list[str]], dict[str, str]]
) -> None:
    instance_id = launch(ec2)
    ec2.stop_instances(InstanceIds=[instance_id])
    looker = enforced_iam(["ec2:DescribeInstances"])
    _post(f"{aws}/moto-api/reset-auth", b"0")
    path = plain_config(tmp_path, aws, instance_id=instance_id)
    seen = run_cli("vm", "status", "--json", "--config", str(path), env=looker)
    assert seen.returncode == 0, seen.stderr  # describing is allowed...
    result = run_cli("vm", "start", "--config", str(path), env=looker)
    assert result.returncode == 1, result.stderr  # ...starting is not
    assert "AWS denied ec2:StartInstances" in result.stderr
    assert "allow ec2:StartInstances" in result.stderr
    bad = run_cli("vm", "status", "--config", str(path),
                  env={"AWS_ACCESS_KEY_ID": "AKIAWRONGWRONGWRONG0", "AWS_SECRET_ACCESS_KEY": "x"})
    assert bad.returncode == 1 and "AWS rejected the credentials" in bad.stderr


class _Throttler(http.server.BaseHTTPRequestHandler):
    """Answers the first ``budget`` calls as EC2 does when throttling, then relays to moto."""

    budget = 0
    calls = 0
    upstream = ""
    url = ""

    def do_POST(self) -> None:
        body = self.rfile.read(int(self.headers.get("Content-Length", "0")))
        type(self).calls += 1
        if type(self).budget > 0:
            type(self).budget -= 1
            reply = (b"<?xml version=\"1.0\" encoding=\"UTF-8\"?><Response><Errors><Error>"
                     b"<Code>RequestLimitExceeded</Code><Message>Request limit exceeded."
                     b"</Message></Error></Errors><RequestID>1</RequestID></Response>")
            self.send_response(503)
        else:
            headers = {k: v for k, v in self.headers.items() if k.lower() != "host"}
            request = urllib.request.Request(self.upstream, data=body, headers=headers)
            opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))
            with opener.open(request, timeout=10) as response:
                reply = response.read()
            self.send_response(200)
        self.send_header("Content-Type", "text/xml")
        self.send_header("Content-Length", str(len(reply)))
        self.end_headers()
        self.wfile.write(reply)

    def log_message(self, format: str, *args: Any) -> None:
        pass


@pytest.fixture
def throttler(aws: str) -> Iterator[type[_Throttler]]:
    handler: type[_Throttler] = type(
        "Throttler", (_Throttler,), {"upstream": aws + "/", "budget": 0, "calls": 0})
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    handler.url = f"http://127.0.0.1:{server.server_address[1]}"
    try:
        yield handler
    finally:
        server.shutdown()
        server.server_close()


def test_throttling_is_retried_with_backoff(
    ec2: Any, tmp_path: Path, throttler: type[_Throttler], monkeypatch: pytest.MonkeyPatch
) -> None:
    instance_id = launch(ec2)
    config = load_config(plain_config(tmp_path, throttler.url, instance_id=instance_id))
    throttler.budget = 2
    assert cloud.describe(config).state == "running"
    assert throttler.calls == 3

    monkeypatch.setattr(cloud, "API_ATTEMPTS", 2)  # a shorter give-up, same code path
    throttler.budget, throttler.calls = 5, 0
    with pytest.raises(CloudError) as info:
        cloud.describe(config)
    assert "throttling" in info.value.cause and throttler.calls == 2


def test_unreachable_endpoint(aws: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(cloud, "API_ATTEMPTS", 1)
    dead = f"http://127.0.0.1:{free_port()}"
    config = load_config(plain_config(tmp_path, dead, instance_id="i-0123456789abcdef0"))
    with pytest.raises(CloudError) as info:
        cloud.describe(config)
    assert f"cannot reach {dead}" in info.value.cause
    assert info.value.fix is not None and "endpoint_url in [remote.cloud]" in info.value.fix


def _client_error(code: str, action: str, message: str = "") -> ClientError:
    return ClientError({"Error": {"Code": code, "Message": message}}, action)


@pytest.mark.parametrize(
    ("exc", "action", "cause", "fix"),
    [
        (_client_error("UnauthorizedOperation", "StopInstances",
                       "You are not authorized. Encoded authorization failure message: xyz"),
         "StopInstances", "AWS denied ec2:StopInstances on i-0123456789abcdef0",
         "allow ec2:StopInstances"),
        (_client_error("RequestLimitExceeded", "DescribeInstances"), "DescribeInstances",
         "throttling", "wait a minute"),
        (_client_error("AuthFailure", "DescribeInstances", "bad key"), "DescribeInstances",
         "AWS rejected the credentials", "aws configure"),
        (_client_error("ExpiredToken", "DescribeInstances"), "DescribeInstances",
         "have expired", "refresh"),
        (_client_error("InvalidInstanceID.Malformed", "DescribeInstances", "Invalid id"),
         "DescribeInstances", "no instance i-0123456789abcdef0", "check instance_id"),
        (_client_error("IncorrectInstanceState", "StartInstances", "is not in a state"),
         "StartInstances", "EC2 refused StartInstances", "AWS console"),
        (NoCredentialsError(), "DescribeInstances", "no AWS credentials found", "AWS_PROFILE"),
        (ProfileNotFound(profile="p"), "DescribeInstances", "profile 'p'",
         "aws configure --profile p"),
        (EndpointConnectionError(endpoint_url="https://ec2.eu-west-1.amazonaws.com/"),
         "DescribeInstances", "cannot reach the EC2 endpoint of eu-west-1", "region in"),
    ],
)
def test_every_aws_failure_has_a_cause_and_a_fix(
    exc: Exception, action: str, cause: str, fix: str
) -> None:
    config = CloudConfig(provider="aws", region=REGION, instance_id="i-0123456789abcdef0",
                         profile="p" if isinstance(exc, ProfileNotFound) else None)
    error = cloud.aws_error(exc, action, config, "[remote.cloud]")
    assert isinstance(error, CloudError) and error.exit_code == 1
    assert cause in error.cause and "\n" not in error.cause
    assert error.fix is not None and fix in error.fix
    assert "Encoded authorization failure" not in error.cause


def test_a_terminal_gets_a_spinner_that_always_stops(ec2: Any, aws: str, tmp_path: Path) -> None:
    screen = io.StringIO()
    reporter = ConsoleReporter(Console(file=screen, force_terminal=True, width=100))
    instance_id = launch(ec2)
    config = load_config(plain_config(tmp_path, aws, instance_id=instance_id))
    cloud.stop(config, reporter)
    assert reporter._spinner is None and f"{instance_id} is stopped" in screen.getvalue()

    set_state(instance_id, "pending")  # it never finishes booting
    timeout = load_config(plain_config(tmp_path, aws, instance_id=instance_id, wake_timeout=1))
    with pytest.raises(CloudError):
        cloud.ensure_running(timeout, reporter)
    assert reporter._spinner is None  # stopped, so the terminal gets its cursor back


# --------------------------------------------------------------------------
# Waking a VM, against the sandbox sshd


def test_vm_start_waits_for_stopping_then_starts(
    ec2: Any, aws: str, project: Project
) -> None:
    instance_id = launch(ec2, loopback=True)
    ec2.stop_instances(InstanceIds=[instance_id])
    set_state(instance_id, "stopping")
    config = load_config(cloud_project(project, aws, instance_id))

    def shutdown_finishes(event: VmState) -> None:
        if event.state == "stopping":
            set_state(instance_id, "stopped")

    events = Events(shutdown_finishes)
    woken = cloud.ensure_running(config, events)
    assert events.steps()[:2] == [("waiting", "stopping"), ("starting", "stopped")]
    assert events.seen[-1].step == "ready" and events.seen[-1].address == "127.0.0.1"
    assert ("ssh", "running") in events.steps()
    assert described(ec2, instance_id)["State"]["Name"] == "running"
    assert woken.remote.cloud_address == "127.0.0.1"


def test_a_pending_vm_is_waited_for(ec2: Any, aws: str, project: Project) -> None:
    instance_id = launch(ec2, loopback=True)
    set_state(instance_id, "pending")
    config = load_config(cloud_project(project, aws, instance_id))

    def boot_finishes(event: VmState) -> None:
        if event.state == "pending":
            set_state(instance_id, "running")

    events = Events(boot_finishes)
    cloud.ensure_running(config, events)
    assert events.steps()[0] == ("waiting", "pending")
    assert events.steps()[-2:] == [("ssh", "running"), ("ready", "running")]


def test_a_running_vm_costs_one_look_and_no_probe(ec2: Any, aws: str, project: Project) -> None:
    instance_id = launch(ec2, loopback=True)
    # The ssh port is closed: a probe would fail, so passing shows there was none.
    config = load_config(cloud_project(project, aws, instance_id, port=free_port()))
    events = Events()
    cloud.ensure_running(config, events)
    assert events.steps() == [("ready", "running")]


def test_up_once_wakes_a_stopped_vm_and_syncs(ec2: Any, aws: str, project: Project) -> None:
    instance_id = launch(ec2, loopback=True)
    ec2.stop_instances(InstanceIds=[instance_id])
    (project.local / "hello.txt").write_text("hi")
    path = cloud_project(project, aws, instance_id)
    result = run_cli("up", "--once", "--json", "--config", str(path))
    assert result.returncode == 0, result.stderr
    assert (project.remote / "hello.txt").read_text() == "hi"
    events = json_events(result.stdout)
    vm = [(e["step"], e["state"]) for e in events if e["event"] == "vm_state"]
    assert vm[0] == ("starting", "stopped") and vm[-1] == ("ready", "running")
    ready = [e for e in events if e["event"] == "vm_state"][-1]
    assert ready["instance_id"] == instance_id and ready["address"] == "127.0.0.1"
    kinds = [e["event"] for e in events]
    assert kinds.index("vm_state") < kinds.index("connected")
    assert described(ec2, instance_id)["State"]["Name"] == "running"

    # Other commands also go where the cloud says, not to the alias's 127.0.0.2.
    exec_result = run_cli("exec", "--config", str(path), "--", "cat", "hello.txt")
    assert exec_result.returncode == 0 and exec_result.stdout == "hi"


def test_up_in_a_log_prints_each_step_then_the_address(
    ec2: Any, aws: str, project: Project
) -> None:
    instance_id = launch(ec2, loopback=True)
    ec2.stop_instances(InstanceIds=[instance_id])
    path = cloud_project(project, aws, instance_id)
    result = run_cli("up", "--once", "--config", str(path))
    assert result.returncode == 0, result.stderr
    assert f"starting {instance_id} (it was stopped)" in result.stdout
    assert f"{instance_id} is running at 127.0.0.1" in result.stdout


def test_up_gives_up_when_the_vm_stays_pending(ec2: Any, aws: str, project: Project) -> None:
    instance_id = launch(ec2, loopback=True)
    set_state(instance_id, "pending")
    path = cloud_project(project, aws, instance_id, wake_timeout=1)
    result = run_cli("up", "--once", "--config", str(path))
    assert result.returncode == 1, result.stderr
    assert f"{instance_id} is still pending after 1 s" in result.stderr
    assert "wake_timeout" in result.stderr
    assert not project.remote.exists()


def test_up_gives_up_when_ssh_never_answers(ec2: Any, aws: str, project: Project) -> None:
    instance_id = launch(ec2, loopback=True)
    ec2.stop_instances(InstanceIds=[instance_id])
    closed = free_port()
    path = cloud_project(project, aws, instance_id, port=closed, wake_timeout=2)
    result = run_cli("up", "--once", "--json", "--config", str(path))
    assert result.returncode == 1, result.stderr
    assert f"ssh on 127.0.0.1:{closed} did not answer within 2 s" in result.stderr
    assert "security group" in result.stderr
    steps = [e["step"] for e in json_events(result.stdout)]
    assert steps[-2:] == ["ssh", "failed"]
