"""Allow ``python -m dev_sync``."""

import sys

from dev_sync.launch import main

sys.exit(main())
