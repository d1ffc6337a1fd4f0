"""``python -m dartvex_auth_better``: the command line."""

import sys

from .cli import main

sys.exit(main())
