"""``python -m tests.benchmarks bench|soak|profile [options]``."""

from __future__ import annotations

import sys


def main() -> int:
    if len(sys.argv) < 2 or sys.argv[1] not in ("bench", "soak", "profile"):
        print("usage: python -m tests.benchmarks bench|soak|profile [options]", file=sys.stderr)
        return 2
    command, rest = sys.argv[1], sys.argv[2:]
    if command == "bench":
        from tests.benchmarks import _bench

        return _bench.main(rest)
    if command == "soak":
        from tests.benchmarks import _soak

        return _soak.main(rest)
    from tests.benchmarks import _profile

    return _profile.main(rest)


if __name__ == "__main__":
    sys.exit(main())
