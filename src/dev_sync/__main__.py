"""Allow ``python -m dev_sync``."""

import sys

from dev_sync.cli import main

sys.exit(main())
