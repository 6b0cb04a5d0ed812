"""Cloud VMs behind an environment: find the instance, wake it, reach it where it is now.

A development VM that is stopped overnight costs nothing but gets a new
public address at each start, so the address in a config file goes stale.
When an environment has ``[cloud]``, dev-sync asks the provider where the
VM is before it connects, starts it if it is stopped, and hands ssh the
fresh address as ``-o HostName=`` so the user's ssh config for ``host``
still applies.

The provider SDK (boto3) is imported only when a ``[cloud]`` table is used:
``dev-sync up`` without one never pays for loading it.
"""

from __future__ import annotations

import contextlib
import socket
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from typing import TYPE_CHECKING, Any, Protocol

from dev_sync import runner
from dev_sync.errors import ConnectionFailed, DevSyncError, UsageError
from dev_sync.events import Reporter, VmState
from dev_sync.target import Target

if TYPE_CHECKING:
    from dev_sync.config import CloudConfig, Config

class CloudError(DevSyncError):
    """The cloud API refused a request, or the VM did not come up in time (exit 1)."""


PENDING, RUNNING, STOPPING, STOPPED = "pending", "running", "stopping", "stopped"
GONE = frozenset({"shutting-down", "terminated"})

# Seconds between two looks at a booting VM: quick at first (a start often
# takes ~10 s), then patient, so a slow boot costs few API calls.
POLL = (0.5, 1.0, 2.0, 3.0, 5.0)

# Botocore's "standard" retry mode backs off exponentially (with jitter) on
# throttling and transient errors; this bounds how often it tries a call in
# all (about 3.5 s of backoff on average), so a dead network fails in seconds.
API_ATTEMPTS = 4


@dataclass(frozen=True)
class Instance:
    """One VM as the provider reports it now."""

    instance_id: str
    state: str
    public_ip: str | None = None
    public_dns: str | None = None
    private_ip: str | None = None
    name: str | None = None

    def address(self, kind: str) -> str | None:
        """The address of ``kind`` (public_ip, public_dns, private_ip), if it has one."""
        value: str | None = getattr(self, kind)
        return value or None

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


class Provider(Protocol):
    """What dev-sync needs from a cloud: look, start, stop."""

    def describe(self) -> Instance: ...

    def start(self, instance_id: str) -> None: ...

    def stop(self, instance_id: str) -> None: ...


def provider_for(cloud: CloudConfig, where: str) -> Provider:
    """The provider of ``cloud``; ``where`` names its table in messages."""
    return AwsProvider(cloud, where)


# --------------------------------------------------------------------------
# AWS


def _permission(action: str) -> str:
    return f"ec2:{action}"


def aws_error(exc: Exception, action: str, cloud: CloudConfig, where: str) -> DevSyncError:
    """One cause and one fix for a botocore failure of ``action`` (e.g. StartInstances).

    Kept a plain function of the exception so every branch can be checked
    with botocore's own exception objects.
    """
    from botocore import exceptions as bx

    profile = f"profile {cloud.profile!r}" if cloud.profile else "the default credentials"
    creds_fix = (
        "configure credentials with `aws configure` (or `aws sso login`), set AWS_PROFILE, "
        f"or set profile = \"NAME\" in {where}"
    )
    if isinstance(exc, bx.ProfileNotFound):
        return CloudError(f"the AWS profile {cloud.profile!r} is not configured on this machine",
                          f"run `aws configure --profile {cloud.profile}`, or fix profile in "
                          f"{where}")
    if isinstance(exc, bx.NoCredentialsError | bx.PartialCredentialsError):
        return CloudError(f"no AWS credentials found ({profile})", creds_fix)
    if isinstance(exc, bx.TokenRetrievalError | bx.SSOError | bx.UnauthorizedSSOTokenError):
        return CloudError(f"the AWS SSO session of {profile} has expired",
                          "run `aws sso login`" + (f" --profile {cloud.profile}"
                                                   if cloud.profile else ""))
    if isinstance(exc, bx.EndpointConnectionError | bx.ConnectTimeoutError
                  | bx.ReadTimeoutError | bx.ConnectionClosedError):
        url = cloud.endpoint_url or f"the EC2 endpoint of {cloud.region}"
        return CloudError(f"cannot reach {url}: {exc}",
                          "check your network connection" + (
                              f", and endpoint_url in {where}" if cloud.endpoint_url
                              else f", and region in {where}"))
    if isinstance(exc, bx.ClientError):
        error = exc.response.get("Error", {})
        code = str(error.get("Code", ""))
        message = str(error.get("Message", "")).split("Encoded authorization failure")[0]
        message = message.strip().rstrip(".")
        if code in ("UnauthorizedOperation", "AccessDenied", "AccessDeniedException"):
            return CloudError(
                f"AWS denied {_permission(action)} on {cloud.selector} ({profile})",
                f"allow {_permission(action)} for these credentials in IAM, or use a profile "
                f"that has it (profile in {where})",
            )
        if code in ("AuthFailure", "InvalidClientTokenId", "UnrecognizedClientException",
                    "SignatureDoesNotMatch", "IncompleteSignature"):
            return CloudError(f"AWS rejected the credentials of {profile}: {message or code}",
                              creds_fix)
        if code in ("ExpiredToken", "ExpiredTokenException", "RequestExpired"):
            return CloudError(f"the AWS credentials of {profile} have expired",
                              "refresh them (`aws sso login`, or new session credentials)")
        if code.startswith("InvalidInstanceID"):
            return CloudError(f"no instance {cloud.selector} in {cloud.region}: "
                              f"{message or code}",
                              f"check instance_id and region in {where} "
                              "(`aws ec2 describe-instances` lists them)")
        if code in ("RequestLimitExceeded", "Throttling", "ThrottlingException",
                    "TooManyRequestsException"):
            return CloudError(f"AWS is throttling EC2 requests ({code}), even after retries",
                              "wait a minute and run the command again")
        if code in ("OptInRequired", "UnsupportedOperation", "IncorrectInstanceState",
                    "InsufficientInstanceCapacity"):
            return CloudError(f"EC2 refused {action} for {cloud.selector}: {message or code}",
                              "see the message; the AWS console shows the instance's state")
        return CloudError(f"EC2 {action} failed: {code}: {message}",
                          "see the message; `aws ec2 describe-instances` shows the instance")
    if isinstance(exc, bx.NoRegionError):
        return CloudError("no AWS region set", f"set region in {where}")
    return CloudError(f"EC2 {action} failed: {exc}",
                      f"check {where} and your AWS credentials")


def _instance(data: dict[str, Any]) -> Instance:
    tags = {t.get("Key"): t.get("Value") for t in data.get("Tags", [])}
    return Instance(
        instance_id=str(data["InstanceId"]),
        state=str(data.get("State", {}).get("Name", "unknown")),
        public_ip=data.get("PublicIpAddress") or None,
        public_dns=data.get("PublicDnsName") or None,
        private_ip=data.get("PrivateIpAddress") or None,
        name=tags.get("Name"),
    )


class AwsProvider:
    """EC2 through boto3 and the standard credential chain (env, profile, SSO, roles)."""

    def __init__(self, cloud: CloudConfig, where: str) -> None:
        self.cloud = cloud
        self.where = where
        self._client: Any = None
        self._resolved_id: str | None = cloud.instance_id

    def _ec2(self) -> Any:
        if self._client is None:
            import boto3
            import botocore.config
            from botocore import exceptions as bx

            config = botocore.config.Config(
                retries={"mode": "standard", "total_max_attempts": API_ATTEMPTS},
                connect_timeout=10,
                read_timeout=30,
                user_agent_extra="dev-sync",
            )
            try:
                session = boto3.session.Session(profile_name=self.cloud.profile,
                                                region_name=self.cloud.region)
                self._client = session.client("ec2", endpoint_url=self.cloud.endpoint_url,
                                              config=config)
            except bx.BotoCoreError as exc:
                raise aws_error(exc, "DescribeInstances", self.cloud, self.where) from None
        return self._client

    def _call(self, action: str, **kwargs: Any) -> dict[str, Any]:
        from botocore import exceptions as bx

        snake = "".join("_" + c.lower() if c.isupper() else c for c in action).lstrip("_")
        try:
            result: dict[str, Any] = getattr(self._ec2(), snake)(**kwargs)
        except (bx.BotoCoreError, bx.ClientError) as exc:
            raise aws_error(exc, action, self.cloud, self.where) from None
        return result

    def _matches(self, **kwargs: Any) -> list[Instance]:
        found: list[Instance] = []
        token: str | None = None
        while True:
            page = self._call("DescribeInstances", **kwargs,
                              **({"NextToken": token} if token else {}))
            for reservation in page.get("Reservations", []):
                found += [_instance(i) for i in reservation.get("Instances", [])]
            token = page.get("NextToken")
            if not token:
                return found

    def describe(self) -> Instance:
        if self._resolved_id is not None:
            found = self._matches(InstanceIds=[self._resolved_id])
            if not found:
                raise CloudError(f"no instance {self._resolved_id} in {self.cloud.region}",
                                 f"check instance_id and region in {self.where}")
            return found[0]
        tags = self.cloud.tags or {}
        filters = [{"Name": f"tag:{k}", "Values": [v]} for k, v in tags.items()]
        # A terminated instance lingers in the listing for a while: never a match.
        live = [i for i in self._matches(Filters=filters) if i.state not in GONE]
        if len(live) != 1:
            wanted = ", ".join(f"{k}={v}" for k, v in tags.items())
            if not live:
                raise CloudError(f"no instance in {self.cloud.region} has the tags {wanted}",
                                 f"check tags and region in {self.where}")
            listed = "; ".join(f"{i.instance_id} ({i.state}"
                               + (f", Name={i.name}" if i.name else "") + ")" for i in live)
            raise CloudError(f"{len(live)} instances in {self.cloud.region} have the tags "
                             f"{wanted}: {listed}",
                             f"add a tag that tells them apart to tags in {self.where}, or "
                             "set instance_id instead")
        # Later looks during this run go by id: cheaper, and a retag cannot swap VMs.
        self._resolved_id = live[0].instance_id
        return live[0]

    def start(self, instance_id: str) -> None:
        self._call("StartInstances", InstanceIds=[instance_id])

    def stop(self, instance_id: str) -> None:
        self._call("StopInstances", InstanceIds=[instance_id])


# --------------------------------------------------------------------------
# Waiting


def _where(config: Config) -> str:
    if config.env == "default":
        return "[cloud]" if config.cloud is not None else "[remote.cloud]"
    return f"[envs.{config.env}.cloud]"


def _cloud(config: Config) -> CloudConfig:
    cloud = config.remote.cloud
    if cloud is None:
        table = "remote" if config.env == "default" else f"envs.{config.env}"
        raise UsageError(f"the environment {config.env!r} has no cloud VM",
                         f"add [{table}.cloud] with provider, region and instance_id or tags")
    return cloud


def wait_for_state(
    provider: Provider,
    wanted: str,
    deadline: float,
    timeout: float,
    on_state: Callable[[Instance], None],
) -> Instance:
    """Look until the VM is in ``wanted``; its intermediate states go to ``on_state``."""
    polls = iter(POLL)
    delay = POLL[0]
    while True:
        instance = provider.describe()
        if instance.state == wanted:
            return instance
        if instance.state in GONE:
            raise CloudError(f"{instance.instance_id} is {instance.state}",
                             "point [cloud] at a live instance")
        left = deadline - time.monotonic()
        if left <= 0:
            raise CloudError(
                f"{instance.instance_id} is still {instance.state} after {timeout:g} s "
                f"(waiting for {wanted})",
                "see the instance in the AWS console, or raise wake_timeout in [cloud]",
            )
        on_state(instance)
        delay = next(polls, POLL[-1])
        time.sleep(min(delay, left))


def _ssh_settings(target: Target) -> tuple[int, bool]:
    """The port ssh will use and whether it goes through a jump host (from ``ssh -G``)."""
    port, proxied = target.port or 22, False
    argv = ["ssh", *target.options(), "-G", "--", target.host]
    with contextlib.suppress(runner.CommandError):
        for line in runner.run(argv, timeout=10).out.splitlines():
            key, _, value = line.partition(" ")
            if key == "port" and value.isdigit():
                port = int(value)
            elif key in ("proxyjump", "proxycommand") and value not in ("", "none"):
                proxied = True
    return port, proxied


_TRANSIENT = ("connection refused", "timed out", "connection reset", "connection closed",
              "kex_exchange_identification", "no route to host", "network is unreachable",
              "broken pipe")


def wait_for_ssh(target: Target, instance_id: str, deadline: float, timeout: float,
                 on_wait: Callable[[], None]) -> None:
    """Return once sshd on the booting VM accepts our login, or raise CloudError.

    First a plain TCP connect (cheap, and says nothing to sshd's logs), then
    the real ssh login, since sshd may listen before the machine lets users
    in. A refused key or host key is final: waiting would not fix it.
    """
    address = target.hostname or target.host
    port, proxied = _ssh_settings(target)
    polls = iter(POLL)

    def pause() -> None:
        left = deadline - time.monotonic()
        if left <= 0:
            raise CloudError(
                f"{instance_id} is running but ssh on {address}:{port} did not answer within "
                f"{timeout:g} s",
                "check that the security group lets this machine reach that port and that "
                "sshd starts at boot; or raise wake_timeout in [cloud]",
            )
        on_wait()
        time.sleep(min(next(polls, POLL[-1]), left))

    while not proxied:  # through a jump host, only ssh itself can tell
        try:
            left = max(0.5, min(5.0, deadline - time.monotonic()))
            with socket.create_connection((address, port), timeout=left):
                break
        except OSError:
            pause()
    argv = ["ssh", *target.options(), "-o", "ControlMaster=no", "-o", "ControlPath=none",
            "-T", "--", target.host, "true"]
    while True:
        try:
            runner.run(argv, timeout=target.connect_timeout + 10)
            return
        except runner.CommandError as exc:
            text = exc.err.lower()
            if exc.returncode != 124 and not any(t in text for t in _TRANSIENT):
                from dev_sync.ssh import classify_ssh_failure

                failure = classify_ssh_failure(target, exc.err, exc.returncode)
                if "host key" in failure.cause:
                    failure = ConnectionFailed(
                        failure.cause,
                        f"the VM's address changes at each start: add `HostKeyAlias "
                        f"{target.host}` to its Host entry in your ssh config, then run "
                        f"`ssh -o HostName={address} {target.host} true` once to accept the key",
                    )
                raise failure from None
        pause()


# --------------------------------------------------------------------------
# What the commands call


class _Progress:
    """Reports each step of a wait, and always a last one.

    Whatever ends the wait (done, a timeout, Ctrl-C), the reporter hears a
    closing step, so a spinner on the terminal stops and a tool reading
    JSON events knows the wait is over.
    """

    def __init__(self, reporter: Reporter) -> None:
        self.reporter = reporter
        self.began = time.monotonic()
        self.last: Instance | None = None

    def __call__(self, instance: Instance, step: str, address: str = "") -> None:
        self.last = instance
        self.reporter.emit(VmState(instance.instance_id, instance.state, step, address,
                                   round(time.monotonic() - self.began, 1)))

    def __enter__(self) -> _Progress:
        return self

    def __exit__(self, kind: type[BaseException] | None, *_: object) -> None:
        if kind is not None and self.last is not None:
            self(self.last, "failed")


def ensure_running(config: Config, reporter: Reporter) -> Config:
    """Wake the environment's VM if needed and return the config that reaches it now.

    Without ``[cloud]`` the config comes back untouched (and no SDK is
    loaded). Otherwise: a stopping VM is waited for, a stopped one started,
    a pending one waited for until running; after a wake, until its sshd
    lets us in; all within ``wake_timeout``. The returned config connects to
    the address the cloud reports now.
    """
    cloud = config.remote.cloud
    if cloud is None:
        return config
    provider = provider_for(cloud, _where(config))
    with _Progress(reporter) as report:
        deadline = report.began + cloud.wake_timeout
        instance = provider.describe()
        woke = False
        if instance.state == STOPPING:
            report(instance, "waiting")
            instance = wait_for_state(provider, STOPPED, deadline, cloud.wake_timeout,
                                      lambda i: report(i, "waiting"))
        if instance.state == STOPPED:
            report(instance, "starting")
            provider.start(instance.instance_id)
            woke = True
        if instance.state != RUNNING:
            woke = True
            instance = wait_for_state(provider, RUNNING, deadline, cloud.wake_timeout,
                                      lambda i: report(i, "waiting"))
        address = _address(instance, cloud, config)
        config = config.model_copy(update={"remote": config.remote.with_cloud_address(address)})
        if woke:
            report(instance, "ssh", address)
            wait_for_ssh(Target.from_config(config), instance.instance_id, deadline,
                         cloud.wake_timeout, lambda: report(instance, "ssh", address))
        report(instance, "ready", address)
    return config


def locate(config: Config) -> Config:
    """The config that reaches the environment's running VM, without waking it."""
    cloud = config.remote.cloud
    if cloud is None:
        return config
    instance = provider_for(cloud, _where(config)).describe()
    if instance.state != RUNNING:
        raise CloudError(f"the VM of environment {config.env!r} ({instance.instance_id}) is "
                         f"{instance.state}",
                         "start it with `dev-sync vm start` (or `dev-sync up`, which wakes it)")
    address = _address(instance, cloud, config)
    return config.model_copy(update={"remote": config.remote.with_cloud_address(address)})


def _address(instance: Instance, cloud: CloudConfig, config: Config) -> str:
    address = instance.address(cloud.address)
    if address is None:
        other = [k for k in ("public_ip", "public_dns", "private_ip") if instance.address(k)]
        raise CloudError(
            f"{instance.instance_id} has no {cloud.address.replace('_', ' ')}",
            f"set address = {other[0]!r} in {_where(config)}" if other
            else "give the instance a public IP (or an Elastic IP)",
        )
    return address


def describe(config: Config) -> Instance:
    """The environment's VM as the cloud reports it now."""
    return provider_for(_cloud(config), _where(config)).describe()


def start(config: Config, reporter: Reporter) -> Config:
    """``dev-sync vm start``: what ``up`` does before it connects."""
    _cloud(config)
    return ensure_running(config, reporter)


def stop(config: Config, reporter: Reporter) -> Instance:
    """Stop the VM and wait until it is stopped (a stopping VM cannot be started)."""
    cloud = _cloud(config)
    provider = provider_for(cloud, _where(config))
    with _Progress(reporter) as report:
        deadline = report.began + cloud.wake_timeout
        instance = provider.describe()
        if instance.state in GONE:
            raise CloudError(f"{instance.instance_id} is {instance.state}",
                             "point [cloud] at a live instance")
        if instance.state != STOPPED:
            if instance.state == PENDING:
                # EC2 refuses to stop a VM that is still starting.
                instance = wait_for_state(provider, RUNNING, deadline, cloud.wake_timeout,
                                          lambda i: report(i, "waiting"))
            if instance.state == RUNNING:
                report(instance, "stopping")
                provider.stop(instance.instance_id)
            instance = wait_for_state(provider, STOPPED, deadline, cloud.wake_timeout,
                                      lambda i: report(i, "stopping"))
        report(instance, "stopped")
    return instance
