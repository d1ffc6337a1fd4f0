"""Import time: ``import dartvex_auth_better`` vs ``import aiohttp`` alone.

Each measurement is a fresh interpreter (``python -c``) that times the import statement
itself with ``perf_counter`` (interpreter start-up is not counted), with the repository
root as the working directory. Runs alternate between the two.
"""

from __future__ import annotations

import asyncio
import os
import sys
from typing import Any

from tests.benchmarks._common import REPO_ROOT, Row, spread

_PROBE = (
    "import time, sys\n"
    "t = time.perf_counter()\n"
    "import {module}\n"
    "sys.stdout.write(repr((time.perf_counter() - t) * 1000))\n"
)


async def _one(module: str) -> float:
    env = dict(os.environ)
    # Both sides import from .pyc, as installed packages do: with this set (some shells
    # and CI images set it) the warm-up would write none for us while aiohttp's
    # site-packages copy has its own, and the figure would time our compiler instead.
    env.pop("PYTHONDONTWRITEBYTECODE", None)
    sdk = env.get("BENCH_SDK_PATH")
    if sdk:
        env["PYTHONPATH"] = sdk
    process = await asyncio.create_subprocess_exec(
        sys.executable,
        "-c",
        _PROBE.format(module=module),
        cwd=sdk or REPO_ROOT,
        env=env,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )
    out, err = await process.communicate()
    if process.returncode != 0:
        raise RuntimeError(f"import {module} failed: {err.decode(errors='replace')[-2000:]}")
    return float(out.decode())


async def run_imports(runs: int) -> dict[str, Any]:
    results: dict[str, list[float]] = {"dartvex_auth_better": [], "aiohttp": []}
    await _one("dartvex_auth_better")  # warm the page cache and .pyc files
    for index in range(runs):
        order = list(results) if index % 2 == 0 else list(reversed(results))
        for module in order:
            results[module].append(await _one(module))
    return {"ms": results}


def rows(results: dict[str, Any]) -> list[Row]:
    ms: dict[str, list[float]] = results["ms"]
    title = "import time (fresh interpreter)"
    ratio = spread(a / b for a, b in zip(ms["dartvex_auth_better"], ms["aiohttp"], strict=True))
    return [
        Row(title, "import", {k: spread(v) for k, v in ms.items()}, "ms"),
        Row(
            title,
            "dartvex_auth_better/aiohttp",
            {"ratio": ratio},
            "x",
            "<= 1.15",
            "PASS" if ratio.median <= 1.15 else "MISS",
        ),
    ]
