"""Benchmarks, the soak run and the profiler (``nox -s bench``, ``nox -s bench_smoke``,
``nox -s soak``, ``nox -s profile``); never part of pytest.

``python -m tests.benchmarks bench [--quick | --smoke] [--only SECTION]``,
``python -m tests.benchmarks soak [--minutes N]`` (no options: the short CI-sized pass/fail
run) and ``python -m tests.benchmarks profile``. Results go to ``.bench/`` as JSON.
"""

import os as _os
import sys as _sys

# BENCH_SDK_PATH=/some/dir puts another copy of dartvex_auth_better first on sys.path (to
# measure a proposed change on a scratch copy). Set it before anything imports the SDK.
_sdk = _os.environ.get("BENCH_SDK_PATH")
if _sdk and _sdk not in _sys.path:
    _sys.path.insert(0, _sdk)
