"""Shared helpers for the benchmarks: statistics, the results table, process probes and the
line protocol the helper processes speak.

Every helper process (the server process, the PyPI and npm drivers, the scale runs) prints
its answers as single stdout lines ``"@@bench " + JSON``; anything else it prints is
ignored (and kept for error messages).
"""

from __future__ import annotations

import asyncio
import gc
import json
import logging
import os
import platform
import resource
import statistics
import sys
import time
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Final

__all__ = [
    "MARK",
    "REPO_ROOT",
    "RESULTS_DIR",
    "Helper",
    "Row",
    "Spread",
    "emit",
    "machine_info",
    "open_sockets",
    "percentile",
    "quiet_logging",
    "rss_bytes",
    "settle_memory",
    "spread",
]

MARK: Final = "@@bench "
REPO_ROOT: Final = Path(__file__).resolve().parents[2]
RESULTS_DIR: Final = REPO_ROOT / ".bench"


def emit(payload: Mapping[str, Any]) -> None:
    """One answer line for the parent process."""
    sys.stdout.write(MARK + json.dumps(payload) + "\n")
    sys.stdout.flush()


def quiet_logging() -> None:
    """Logging off: nothing below CRITICAL is formatted or printed anywhere."""
    logging.disable(logging.ERROR)


def percentile(values: Sequence[float], q: float) -> float:
    """The q-th percentile (0..100) by linear interpolation; values need not be sorted."""
    if not values:
        return float("nan")
    ordered = sorted(values)
    if len(ordered) == 1:
        return ordered[0]
    position = (len(ordered) - 1) * q / 100.0
    low = int(position)
    high = min(low + 1, len(ordered) - 1)
    return ordered[low] + (ordered[high] - ordered[low]) * (position - low)


@dataclass(frozen=True, slots=True)
class Spread:
    """The median of per-round figures and their range."""

    median: float
    low: float
    high: float
    rounds: int

    def as_json(self) -> dict[str, float]:
        return {"median": self.median, "min": self.low, "max": self.high, "rounds": self.rounds}


def spread(values: Iterable[float]) -> Spread:
    data = [v for v in values if v == v]  # drop NaN
    if not data:
        return Spread(float("nan"), float("nan"), float("nan"), 0)
    return Spread(statistics.median(data), min(data), max(data), len(data))


@dataclass(slots=True)
class Row:
    """One line of the results table."""

    section: str
    metric: str
    values: dict[str, Spread | float | str] = field(default_factory=dict)
    unit: str = ""
    target: str = ""
    verdict: str = ""

    def as_json(self) -> dict[str, Any]:
        out: dict[str, Any] = {}
        for name, value in self.values.items():
            out[name] = value.as_json() if isinstance(value, Spread) else value
        return {
            "section": self.section,
            "metric": self.metric,
            "unit": self.unit,
            "values": out,
            "target": self.target,
            "verdict": self.verdict,
        }


def _fmt_number(value: float) -> str:
    if value != value:
        return "n/a"
    magnitude = abs(value)
    if magnitude >= 10_000:
        return f"{value:,.0f}"
    if magnitude >= 100:
        return f"{value:.0f}"
    if magnitude >= 10:
        return f"{value:.1f}"
    if magnitude >= 1:
        return f"{value:.2f}"
    return f"{value:.3f}"


def fmt_cell(value: Spread | float | str) -> str:
    if isinstance(value, str):
        return value
    if isinstance(value, Spread):
        if value.rounds <= 1 or value.low == value.high:
            return _fmt_number(value.median)
        return f"{_fmt_number(value.median)} [{_fmt_number(value.low)}-{_fmt_number(value.high)}]"
    return _fmt_number(value)


def render_table(rows: Sequence[Row]) -> str:
    """A plain-text table: one block per section, columns per contender."""
    lines: list[str] = []
    sections: dict[str, list[Row]] = {}
    for row in rows:
        sections.setdefault(row.section, []).append(row)
    for section, members in sections.items():
        columns: list[str] = []
        for row in members:
            for name in row.values:
                if name not in columns:
                    columns.append(name)
        header = ["metric", *columns, "target", "verdict"]
        body: list[list[str]] = []
        for row in members:
            label = f"{row.metric} ({row.unit})" if row.unit else row.metric
            cells = [fmt_cell(row.values[c]) if c in row.values else "" for c in columns]
            body.append([label, *cells, row.target, row.verdict])
        widths = [max(len(r[i]) for r in [header, *body]) for i in range(len(header))]
        lines.append(f"== {section} ==")
        lines.append("  ".join(h.ljust(w) for h, w in zip(header, widths, strict=True)))
        for r in body:
            lines.append("  ".join(c.ljust(w) for c, w in zip(r, widths, strict=True)))
        lines.append("")
    return "\n".join(lines)


def rss_bytes() -> int:
    """Resident set size of this process now (Linux /proc)."""
    with open("/proc/self/statm", "rb") as f:
        resident_pages = int(f.read().split()[1])
    return resident_pages * os.sysconf("SC_PAGE_SIZE")


def peak_rss_bytes() -> int:
    """The highest resident set size this process has had."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def settle_memory() -> int:
    """Collect garbage (all generations, twice) and return the RSS afterwards."""
    gc.collect()
    gc.collect()
    return rss_bytes()


def open_sockets() -> int:
    """How many socket file descriptors this process holds."""
    count = 0
    for name in os.listdir("/proc/self/fd"):
        try:
            if os.readlink(f"/proc/self/fd/{name}").startswith("socket:"):
                count += 1
        except OSError:
            continue
    return count


def cpu_seconds() -> float:
    """CPU time of this process (user + system, all threads), at nanosecond resolution
    (``os.times`` counts in clock ticks, 10 ms, too coarse for an idle window)."""
    return time.process_time()


def machine_info() -> dict[str, Any]:
    import aiohttp
    import msgspec

    return {
        "python": platform.python_version(),
        "implementation": platform.python_implementation(),
        "platform": platform.platform(),
        "cpus": os.cpu_count(),
        "aiohttp": aiohttp.__version__,
        "msgspec": msgspec.__version__,
        "time": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
    }


class HelperError(RuntimeError):
    pass


class Helper:
    """A long-lived helper process that answers one ``@@bench`` line per request line.

    Requests are JSON lines on its stdin; its stderr and unmarked stdout are kept (the last
    lines) for error messages. Closing stdin asks it to exit."""

    def __init__(
        self,
        name: str,
        argv: Sequence[str],
        *,
        cwd: Path | None = None,
        env: Mapping[str, str] | None = None,
    ) -> None:
        self.name = name
        self.argv = list(argv)
        self.cwd = cwd
        self.env = dict(env) if env is not None else None
        self.log: list[str] = []
        self._process: asyncio.subprocess.Process | None = None
        self._answers: asyncio.Queue[dict[str, Any] | None] = asyncio.Queue()
        self._readers: list[asyncio.Task[None]] = []

    async def start(self) -> None:
        self._process = await asyncio.create_subprocess_exec(
            *self.argv,
            cwd=self.cwd,
            env=self.env,
            stdin=asyncio.subprocess.PIPE,
            stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.PIPE,
            limit=64 * 1024 * 1024,
        )
        assert self._process.stdout is not None and self._process.stderr is not None
        self._readers = [
            asyncio.create_task(self._read(self._process.stdout, marked=True)),
            asyncio.create_task(self._read(self._process.stderr, marked=False)),
        ]

    async def _read(self, stream: asyncio.StreamReader, *, marked: bool) -> None:
        try:
            while True:
                raw = await stream.readline()
                if not raw:
                    break
                line = raw.decode(errors="replace").rstrip("\n")
                if marked and line.startswith(MARK):
                    self._answers.put_nowait(json.loads(line[len(MARK) :]))
                elif line.strip():
                    self.log.append(line)
                    del self.log[:-60]
        finally:
            if marked:
                self._answers.put_nowait(None)

    async def answer(self, timeout: float) -> dict[str, Any]:  # noqa: ASYNC109
        """The next answer line (e.g. the ready line printed at start-up)."""
        try:
            async with asyncio.timeout(timeout):
                got = await self._answers.get()
        except TimeoutError:
            raise HelperError(
                f"{self.name}: no answer within {timeout:g} s\n" + "\n".join(self.log[-30:])
            ) from None
        if got is None:
            raise HelperError(f"{self.name} exited\n" + "\n".join(self.log[-30:]))
        if "error" in got:
            raise HelperError(f"{self.name}: {got['error']}\n" + "\n".join(self.log[-30:]))
        return got

    async def call(self, request: Mapping[str, Any], timeout: float) -> dict[str, Any]:  # noqa: ASYNC109
        assert self._process is not None and self._process.stdin is not None
        self._process.stdin.write((json.dumps(request) + "\n").encode())
        await self._process.stdin.drain()
        return await self.answer(timeout)

    async def stop(self) -> None:
        process = self._process
        if process is None:
            return
        self._process = None
        if process.stdin is not None and not process.stdin.is_closing():
            process.stdin.close()
        try:
            async with asyncio.timeout(10):
                await process.wait()
        except TimeoutError:
            process.kill()
            await process.wait()
        for reader in self._readers:
            reader.cancel()
        await asyncio.gather(*self._readers, return_exceptions=True)
