"""``python -m tests.benchmarks profile``: cProfile over our client's hot paths.

Runs, against the benchmark's server process, the subscription-throughput stream (decode,
apply Transition, deliver to the subscriber) and the mutation and query round trips, each
under cProfile, and prints the functions with the most own time. ``--out DIR`` also saves
the raw ``.prof`` files (for snakeviz / pstats).
"""

from __future__ import annotations

import argparse
import asyncio
import cProfile
import functools
import io
import pstats
import sys
from collections.abc import Awaitable, Callable, Sequence
from pathlib import Path
from typing import Any

from tests.benchmarks import _inproc
from tests.benchmarks._common import REPO_ROOT, RESULTS_DIR, Helper, quiet_logging


async def _profiled(
    label: str, work: Callable[[], Awaitable[Any]], top: int, out: Path | None
) -> None:
    profiler = cProfile.Profile()
    profiler.enable()
    try:
        await work()
    finally:
        profiler.disable()
    _report(label, profiler, top, out)


def _report(label: str, profiler: cProfile.Profile, top: int, out: Path | None) -> None:
    buffer = io.StringIO()
    stats = pstats.Stats(profiler, stream=buffer)
    stats.sort_stats("tottime").print_stats(top)
    print(f"===== {label} =====")
    print(buffer.getvalue())
    if out is not None:
        out.mkdir(parents=True, exist_ok=True)
        stats.dump_stats(out / f"{label.replace(' ', '_')}.prof")


async def run(args: argparse.Namespace) -> int:
    quiet_logging()
    servers = Helper(
        "servers",
        [sys.executable, "-m", "tests.benchmarks._servers", str(args.updates)],
        cwd=REPO_ROOT,
    )
    await servers.start()
    try:
        info = await servers.answer(120)
        for size in args.sizes:
            # Warm-up (imports, caches), then the profiled run.
            await _inproc.ours_throughput(info["push_url"], size, args.updates)
            await _profiled(
                f"throughput {size}",
                functools.partial(_inproc.ours_throughput, info["push_url"], size, args.updates),
                args.top,
                args.out,
            )
        for kind in args.kinds:
            await _profiled(
                f"{kind} round trip",
                functools.partial(
                    _inproc.ours_roundtrips, info["convex_url"], info["token"], kind, args.calls
                ),
                args.top,
                args.out,
            )
    finally:
        await servers.stop()
    return 0


def main(argv: Sequence[str]) -> int:
    parser = argparse.ArgumentParser(prog="python -m tests.benchmarks profile")
    parser.add_argument("--updates", type=int, default=20_000)
    parser.add_argument("--calls", type=int, default=1000)
    parser.add_argument("--top", type=int, default=30)
    parser.add_argument("--size", dest="sizes", action="append", choices=("small", "typical"))
    parser.add_argument("--kind", dest="kinds", action="append", choices=("mutation", "query"))
    parser.add_argument("--out", type=Path, default=RESULTS_DIR / "profiles")
    args = parser.parse_args(argv)
    args.sizes = args.sizes or ["small", "typical"]
    args.kinds = args.kinds if args.kinds is not None else ["mutation", "query"]
    return asyncio.run(run(args))
