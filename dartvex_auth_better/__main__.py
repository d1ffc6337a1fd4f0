"""``python -m dartvex_auth_better``: the command line (see dartvex_auth_better.cli)."""

import sys

from .cli import main

# Guarded so that tools which import every module (doc generators, test collectors) do
# not run the command line.
if __name__ == "__main__":
    sys.exit(main())
