"""The ``dev-sync`` executable: give ``up`` its head start (see prestart), then load the CLI."""

from __future__ import annotations

import sys
from collections.abc import Sequence


def main(argv: Sequence[str] | None = None) -> int:
    args = list(sys.argv[1:] if argv is None else argv)
    from dev_sync import prestart

    prestart.maybe_start(args)
    prestart.validate(args)
    from dev_sync.cli import main as cli_main

    code = cli_main(args)
    if argv is None and args[:1] == ["up"]:
        _leave(code)
    return code


def _leave(code: int) -> None:
    """Exit without the interpreter's own teardown, when nothing else still runs.

    Unloading pydantic and the rest takes about 0.1 s at the end of every
    ``up --once``, and none of it matters once the exit handlers have run and
    the output is out.
    """
    import atexit
    import os
    import threading

    if any(t.is_alive() and not t.daemon for t in threading.enumerate()
           if t is not threading.main_thread()):
        return  # the normal exit waits for them
    atexit._run_exitfuncs()
    try:
        sys.stdout.flush()
        sys.stderr.flush()
    except (OSError, ValueError):
        return  # let the normal exit report it
    os._exit(code)
