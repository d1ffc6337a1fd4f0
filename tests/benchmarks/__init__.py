"""Benchmarks and the soak run (``nox -s bench``, ``nox -s soak``); never part of pytest.

``python -m tests.benchmarks bench [--quick] [--only SECTION]`` and
``python -m tests.benchmarks soak --minutes N`` (``--short`` for the CI-sized pass/fail run).
Results go to ``.bench/`` as JSON.
"""

import os as _os
import sys as _sys

# BENCH_SDK_PATH=/some/dir puts another copy of dartvex_auth_better first on sys.path (to
# measure a proposed change on a scratch copy). Set it before anything imports the SDK.
_sdk = _os.environ.get("BENCH_SDK_PATH")
if _sdk and _sdk not in _sys.path:
    _sys.path.insert(0, _sdk)
