"""The one user-facing error type, and the exit codes it maps to.

Every failure a user can cause or fix (bad config, unreachable host, a refused
remote root) is raised as :class:`DevSyncError` carrying a one-line cause and a
fix; the CLI prints both and exits with ``exit_code``. Anything else is a bug
and gets a traceback.
"""

from __future__ import annotations

EXIT_OK = 0
EXIT_FAILURE = 1
EXIT_USAGE = 2
EXIT_INTERRUPTED = 130


class DevSyncError(Exception):
    """A failure the user can act on: what went wrong and what to do."""

    exit_code = EXIT_FAILURE

    def __init__(self, cause: str, fix: str | None = None) -> None:
        super().__init__(cause)
        self.cause = cause
        self.fix = fix

    def render(self) -> str:
        """Cause and fix on two lines, the form every command prints."""
        if self.fix:
            return f"error: {self.cause}\n  fix: {self.fix}"
        return f"error: {self.cause}"


class ConfigError(DevSyncError):
    """Invalid or missing configuration (exit code 2)."""

    exit_code = EXIT_USAGE


class UsageError(DevSyncError):
    """A command used wrongly (exit code 2)."""

    exit_code = EXIT_USAGE


class ConnectionFailed(DevSyncError):
    """The remote could not be reached or authenticated."""


class SafetyStop(DevSyncError):
    """dev-sync refused to do something that could lose data."""
