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

    return cli_main(args)
