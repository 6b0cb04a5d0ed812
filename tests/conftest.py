"""Shared fixtures: one sandbox sshd per test session, and a fresh project per test.

One sshd for the whole session because starting one costs key generation
and a login (about half a second); each test still gets its own remote
folder, so tests cannot see each other's files.
"""

from __future__ import annotations

import os
import shutil
from collections.abc import Iterator
from pathlib import Path

import pytest
from helpers import Project, new_project

from dev_sync.errors import DevSyncError
from dev_sync.sandbox import Sandbox, SandboxInfo


def _missing_tools() -> list[str]:
    """The programs the integration tests need and this machine lacks."""
    missing = []
    # sshd lives in sbin, which is often not on a non-root PATH.
    if not (Path("/usr/sbin/sshd").exists() or shutil.which("sshd")):
        missing.append("sshd (package openssh-server)")
    for tool, package in (
        ("ssh", "openssh-client"),
        ("ssh-keygen", "openssh-client"),
        ("rsync", "rsync"),
    ):
        if shutil.which(tool) is None:
            missing.append(f"{tool} (package {package})")
    return missing


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    """Mark every test that uses the sandbox as ``integration``.

    So ``pytest -m "not integration"`` gives a quick run without sshd, and
    nobody has to remember the marker.
    """
    for item in items:
        if "sandbox" in getattr(item, "fixturenames", ()):
            item.add_marker(pytest.mark.integration)


@pytest.fixture(scope="session")
def sandbox(tmp_path_factory: pytest.TempPathFactory) -> Iterator[SandboxInfo]:
    """A running sandbox sshd with the shell rc files hidden (where possible).

    Skips when OpenSSH or rsync is missing, except under CI (``$CI`` set),
    where a silent skip would hide that the integration suite never ran.
    """
    missing = _missing_tools()
    if missing:
        reason = "integration tests need " + ", ".join(missing)
        if os.environ.get("CI"):
            pytest.fail(reason + " (CI is set, so this is an error, not a skip)")
        pytest.skip(reason)
    box = Sandbox(tmp_path_factory.mktemp("sandbox"), clean_shell=True)
    try:
        info = box.start()
    except DevSyncError as exc:
        pytest.fail(f"sandbox did not start: {exc.render()}")
    try:
        yield info
    finally:
        box.stop()


@pytest.fixture
def project(
    sandbox: SandboxInfo, tmp_path_factory: pytest.TempPathFactory, request: pytest.FixtureRequest
) -> Project:
    """A fresh local tree with a dev-sync.toml aimed at a new folder on the sandbox.

    ``project.remote`` does not exist yet: the first sync creates it, as it
    would on a real machine.
    """
    return new_project(sandbox, tmp_path_factory.mktemp("project"), request.node.name)
