"""``nox -s bench``: every figure side by side, in one run, on the same local servers.

Contenders: ``ours`` (dartvex_auth_better's ConvexClient, in this process), ``floor`` (a
bare aiohttp + msgspec client, in this process), ``pypi`` (the official PyPI client, in a
driver process) and ``npm`` (the official npm ConvexClient under Node, in a driver
process). The servers run in a process of their own (``_servers.py``).

Each section runs several rounds; within a round every contender runs once, in an order
that rotates from round to round (interleaved), after one warm-up round that is not
counted. In a round-trip round every contender's client stays open and they take turns of
``ROUND_TRIP_TURN`` calls, so that all of them are measured over the same seconds; in a
throughput round each runs twice, in mirrored order (A B C D D C B A). A
figure is the median over rounds, shown with its range ``[min-max]``; a ratio is taken
within each round, then its median.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import sys
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from contextlib import AsyncExitStack, asynccontextmanager
from dataclasses import dataclass
from math import inf
from pathlib import Path
from typing import Any

from tests.benchmarks import _inproc
from tests.benchmarks._common import (
    REPO_ROOT,
    RESULTS_DIR,
    Helper,
    Row,
    Spread,
    machine_info,
    percentile,
    quiet_logging,
    render_table,
    spread,
)

HERE = Path(__file__).resolve().parent
CALL_TIMEOUT = 600.0  # seconds for one contender's part of a round


@dataclass
class Settings:
    rounds: int
    calls: int
    updates: int
    scale_clients: int
    scale_idle: float
    scale_wave_in: float
    signin_calls: int
    import_runs: int
    sections: list[str]
    json_path: Path
    contenders: list[str] | None = None
    smoke: bool = False
    quick: bool = False


def _verdict(ok: bool | None) -> str:
    return "n/a" if ok is None else ("PASS" if ok else "MISS")


class Contenders:
    """Starts and stops the driver processes; runs one contender on request."""

    def __init__(self, servers: dict[str, Any]) -> None:
        self.servers = servers
        self.pypi: Helper | None = None
        self.npm: Helper | None = None
        self.unavailable: dict[str, str] = {}
        self.only: list[str] | None = None

    async def start(self) -> None:
        env = dict(os.environ, PYTHONPATH=str(REPO_ROOT))
        self.pypi = Helper("pypi", [sys.executable, str(HERE / "pypi_driver.py")], env=env)
        await self.pypi.start()
        await self.pypi.answer(60)
        try:
            from tests.conformance._npm import ensure_npm_client, find_node_and_npm

            node, npm = find_node_and_npm()
            install = await ensure_npm_client(node, npm)
        except Exception as exc:  # Node missing or the install failed: report, go on
            self.unavailable["npm"] = f"{type(exc).__name__}: {exc}"
            return
        self.npm = Helper("npm", [node, str(HERE / "npm_driver.mjs"), str(install)])
        await self.npm.start()
        await self.npm.answer(60)

    async def stop(self) -> None:
        for helper in (self.pypi, self.npm):
            if helper is not None:
                await helper.stop()

    def names(self) -> list[str]:
        names = ["ours", "floor", "pypi"]
        if self.npm is not None:
            names.append("npm")
        if self.only is not None:
            names = [n for n in names if n in self.only]
        return names

    @asynccontextmanager
    async def round_trip_caller(
        self, name: str, kind: str, warm: int
    ) -> AsyncIterator[_inproc.Block]:
        """A connected, warmed client of contender ``name``, as a function that runs its
        next n sequential calls and returns their latencies (microseconds)."""
        url, token = self.servers["convex_url"], self.servers["token"]
        if name in ("ours", "floor"):
            caller = _inproc.ours_caller if name == "ours" else _inproc.floor_caller
            async with caller(url, token, kind, warm) as block:
                # The same bound as a driver's answer: a stuck client fails the run,
                # never hangs it.

                async def bounded(n: int) -> list[float]:
                    async with asyncio.timeout(CALL_TIMEOUT):
                        return await block(n)

                yield bounded
            return
        helper = self.pypi if name == "pypi" else self.npm
        assert helper is not None
        opened = {"op": "rt_open", "url": url, "token": token, "kind": kind, "warm": warm}
        await helper.call(opened, timeout=CALL_TIMEOUT)
        try:

            async def remote(n: int) -> list[float]:
                answer = await helper.call({"op": "rt_block", "n": n}, timeout=CALL_TIMEOUT)
                return [float(x) for x in answer["latencies"]]

            yield remote
        finally:
            await helper.call({"op": "rt_close"}, timeout=CALL_TIMEOUT)

    async def feed(self, name: str, size: str, n: int) -> tuple[float, int, bool]:
        """(seconds, values the consumer saw, final value delivered)."""
        url = self.servers["push_url"]
        if name in ("ours", "floor"):
            feed = _inproc.ours_throughput if name == "ours" else _inproc.floor_throughput
            async with asyncio.timeout(CALL_TIMEOUT):
                elapsed, seen, final = await feed(url, size, n)
            return elapsed, seen, isinstance(final, dict) and final.get("seq") == n - 1
        helper = self.pypi if name == "pypi" else self.npm
        assert helper is not None
        answer = await helper.call({"op": "feed", "url": url, "size": size, "n": n}, CALL_TIMEOUT)
        final_seq = answer.get("final_seq")
        return float(answer["elapsed"]), int(answer["seen"]), final_seq == n - 1


def _rotation(names: Sequence[str], round_index: int) -> list[str]:
    k = round_index % len(names)
    return [*names[k:], *names[:k]]


async def _rounds(
    names: Sequence[str],
    rounds: int,
    run: Callable[[str], Awaitable[dict[str, float]]],
    label: str,
    *,
    mirrored: bool = False,
) -> dict[str, list[dict[str, float]]]:
    """Warm-up round, then ``rounds`` interleaved rounds; per contender a list of figures.

    ``mirrored``: in a round every contender runs twice, in the round's order and then in
    reverse (A B C D D C B A), and its figure is the mean of the two runs. A drift of the
    machine's speed over the round then weighs on every contender alike."""
    results: dict[str, list[dict[str, float]]] = {name: [] for name in names}
    for index in range(rounds + 1):
        order = _rotation(names, index)
        runs: dict[str, list[dict[str, float]]] = {name: [] for name in names}
        for name in [*order, *reversed(order)] if mirrored else order:
            runs[name].append(await run(name))
        if index > 0:
            for name, figures in runs.items():
                results[name].append(
                    {key: sum(f[key] for f in figures) / len(figures) for key in figures[0]}
                )
        tag = "warm-up" if index == 0 else f"round {index}/{rounds}"
        print(f"  {label}: {tag} done", file=sys.stderr, flush=True)
    return results


def _collect(results: dict[str, list[dict[str, float]]], key: str) -> dict[str, Spread]:
    return {name: spread(r[key] for r in rows) for name, rows in results.items()}


def _ratio_spread(
    results: dict[str, list[dict[str, float]]], key: str, a: str, b: str
) -> Spread | None:
    """a/b per round (rounds are paired: both ran in the same round), as a Spread."""
    if a not in results or b not in results or not results[b]:
        return None
    return spread(
        x[key] / y[key] if y[key] else float("nan")
        for x, y in zip(results[a], results[b], strict=True)
    )


PEERS = ("floor", "pypi", "npm")


def _ratios(
    results: dict[str, list[dict[str, float]]], keys: Sequence[str]
) -> dict[str, dict[str, Spread]]:
    """``{"ours/<peer>": {key: per-round ratio}}`` for every peer that ran."""
    out: dict[str, dict[str, Spread]] = {}
    for peer in PEERS:
        per_key = {}
        for key in keys:
            ratio = _ratio_spread(results, key, "ours", peer)
            if ratio is not None:
                per_key[key] = ratio
        if per_key:
            out[f"ours/{peer}"] = per_key
    return out


def _ratios_json(ratios: dict[str, dict[str, Spread]]) -> dict[str, dict[str, Any]]:
    return {pair: {k: v.as_json() for k, v in keys.items()} for pair, keys in ratios.items()}


def _ratio_rows(
    title: str,
    ratios: dict[str, dict[str, Spread]],
    columns: dict[str, str],
    targets: dict[str, tuple[str, Callable[[dict[str, Spread]], bool]]],
) -> list[Row]:
    """One row per peer; ``columns`` maps a figure's key to its column's name."""
    rows: list[Row] = []
    for pair, per_key in ratios.items():
        values: dict[str, Spread | float | str] = {columns[k]: v for k, v in per_key.items()}
        target, verdict = "", ""
        if pair in targets:
            target, check = targets[pair]
            verdict = _verdict(check(per_key))
        rows.append(Row(title, pair, values, "x", target, verdict))
    return rows


# -- sections ---------------------------------------------------------------------------------


#: Calls per contender per turn in a round-trip round. Every contender's client stays open
#: for the whole round and the turns rotate, so a contender's 2,000 calls are spread over
#: the same seconds as everyone else's: this machine's speed drifts by up to 1.5x within
#: a minute, and one contender's calls made all at once would carry that drift into the
#: ratio (per-round ratios spread by about 0.1 that way, against 0.015 in turns of 100).
ROUND_TRIP_TURN = 100


async def _round_trip_round(
    c: Contenders, names: Sequence[str], kind: str, calls: int
) -> dict[str, list[float]]:
    """One round: every contender connected and warmed, then their calls in turns."""
    turn = max(1, min(ROUND_TRIP_TURN, calls))
    latencies: dict[str, list[float]] = {name: [] for name in names}
    async with AsyncExitStack() as stack:
        blocks = {
            name: await stack.enter_async_context(c.round_trip_caller(name, kind, turn))
            for name in names
        }
        done = 0
        index = 0
        while done < calls:
            n = min(turn, calls - done)
            for name in _rotation(names, index):
                latencies[name] += await blocks[name](n)
            done += n
            index += 1
    return latencies


async def section_roundtrip(c: Contenders, s: Settings, out: dict[str, Any]) -> list[Row]:
    rows: list[Row] = []
    names = c.names()
    for kind in ("mutation", "query"):
        results: dict[str, list[dict[str, float]]] = {name: [] for name in names}
        for index in range(s.rounds + 1):
            latencies = await _round_trip_round(c, _rotation(names, index), kind, s.calls)
            if index > 0:
                for name, values in latencies.items():
                    results[name].append(
                        {"p50": percentile(values, 50), "p99": percentile(values, 99)}
                    )
            tag = "warm-up" if index == 0 else f"round {index}/{s.rounds}"
            print(f"  {kind} round trip: {tag} done", file=sys.stderr, flush=True)
        title = f"{kind} round trip, {s.calls} sequential calls"
        rows.append(Row(title, "p50", dict(_collect(results, "p50")), "us"))
        rows.append(Row(title, "p99", dict(_collect(results, "p99")), "us"))
        ratios = _ratios(results, ("p50", "p99"))
        rows += _ratio_rows(
            title,
            ratios,
            {"p50": "ratio p50", "p99": "ratio p99"},
            {
                "ours/floor": ("p50 <= 1.15", lambda r: r["p50"].median <= 1.15),
                "ours/pypi": ("p50 <= 1.00", lambda r: r["p50"].median <= 1.0),
            },
        )
        out[f"{kind}_roundtrip_ratios"] = _ratios_json(ratios)
        out[f"{kind}_roundtrip"] = results
    return rows


async def section_throughput(c: Contenders, s: Settings, out: dict[str, Any]) -> list[Row]:
    rows: list[Row] = []
    for size in ("small", "typical"):

        async def run(name: str, size: str = size) -> dict[str, float]:
            elapsed, seen, final_ok = await c.feed(name, size, s.updates)
            return {"rate": s.updates / elapsed, "seen": float(seen), "final": float(final_ok)}

        # A run lasts well under a second, so the order within a round matters: mirrored.
        results = await _rounds(c.names(), s.rounds, run, f"throughput {size}", mirrored=True)
        title = f"subscription throughput, {s.updates} Transitions, {size} values"
        frames = c.servers.get("frame_bytes", {}).get(size)
        if frames:
            title += (
                f", {frames['message_min']:.0f}-{frames['message_max']:.0f} B frames"
                f" ({frames['wire_mean']:.0f} B on the wire)"
            )
        rows.append(
            Row(title, "updates processed per second", dict(_collect(results, "rate")), "/s")
        )
        rows.append(Row(title, "values the consumer saw", dict(_collect(results, "seen"))))
        finals = {
            name: "all" if all(r["final"] == 1.0 for r in rr) else "MISSED"
            for name, rr in results.items()
        }
        rows.append(
            Row(
                title,
                "final value delivered",
                dict(finals),
                "",
                "all",
                _verdict(finals.get("ours") == "all"),
            )
        )
        ratios = _ratios(results, ("rate",))
        rows += _ratio_rows(
            title,
            ratios,
            {"rate": "ratio rate"},
            {
                "ours/floor": ("rate >= 0.70", lambda r: r["rate"].median >= 0.7),
                "ours/pypi": ("rate >= 1.50", lambda r: r["rate"].median >= 1.5),
            },
        )
        out[f"throughput_{size}_ratios"] = _ratios_json(ratios)
        out[f"throughput_{size}"] = results
    return rows


async def section_scale(s: Settings, out: dict[str, Any]) -> list[Row]:
    from tests.benchmarks import _scale

    results = await _scale.run_scale(
        s.scale_clients,
        rounds=max(1, min(s.rounds, 3)),
        idle=s.scale_idle,
        wave_in=s.scale_wave_in,
    )
    out["scale"] = results
    return _scale.rows(results, s.scale_clients)


async def section_signin(s: Settings, out: dict[str, Any]) -> list[Row]:
    from tests.benchmarks import _signin

    results = await _signin.run_signin(s.signin_calls, rounds=s.rounds)
    out["signin"] = results
    return _signin.rows(results)


async def section_imports(s: Settings, out: dict[str, Any]) -> list[Row]:
    from tests.benchmarks import _imports

    results = await _imports.run_imports(s.import_runs)
    out["imports"] = results
    return _imports.rows(results)


SECTIONS = ("roundtrip", "throughput", "scale", "signin", "imports")


async def run_bench(s: Settings) -> int:
    quiet_logging()
    out: dict[str, Any] = {
        "machine": machine_info(),
        "settings": {
            "rounds": s.rounds,
            "calls": s.calls,
            "updates": s.updates,
            "scale_clients": s.scale_clients,
            "scale_idle_seconds": s.scale_idle,
            "scale_wave_in_seconds": s.scale_wave_in,
            "signin_calls": s.signin_calls,
            "import_runs": s.import_runs,
            "quick": s.quick,
        },
    }
    rows: list[Row] = []
    started = time.perf_counter()
    timings: dict[str, float] = {}
    out["section_seconds"] = timings

    def timed(name: str, since: float) -> None:
        timings[name] = time.perf_counter() - since

    needs_servers = any(x in s.sections for x in ("roundtrip", "throughput"))
    servers: Helper | None = None
    contenders: Contenders | None = None
    try:
        if needs_servers:
            t0 = time.perf_counter()
            servers = Helper(
                "servers",
                [sys.executable, "-m", "tests.benchmarks._servers", str(s.updates)],
                cwd=REPO_ROOT,
            )
            await servers.start()
            info = await servers.answer(120)
            contenders = Contenders(info)
            contenders.only = s.contenders
            await contenders.start()
            out["unavailable"] = contenders.unavailable
            out["contenders"] = contenders.names()
            out["throughput_frame_bytes"] = info.get("frame_bytes", {})
            timed("start servers and drivers", t0)
        if "roundtrip" in s.sections and contenders is not None:
            print("round trips...", file=sys.stderr, flush=True)
            t0 = time.perf_counter()
            rows += await section_roundtrip(contenders, s, out)
            timed("roundtrip", t0)
        if "throughput" in s.sections and contenders is not None:
            print("subscription throughput...", file=sys.stderr, flush=True)
            t0 = time.perf_counter()
            rows += await section_throughput(contenders, s, out)
            assert servers is not None
            out["push_stats"] = await servers.call({"op": "push_stats"}, 30)
            timed("throughput", t0)
    finally:
        if contenders is not None:
            await contenders.stop()
        if servers is not None:
            await servers.stop()
    later: list[tuple[str, Callable[[Settings, dict[str, Any]], Awaitable[list[Row]]]]] = [
        ("scale", section_scale),
        ("signin", section_signin),
        ("imports", section_imports),
    ]
    for name, section in later:
        if name in s.sections:
            print(f"{name}...", file=sys.stderr, flush=True)
            t0 = time.perf_counter()
            rows += await section(s, out)
            timed(name, t0)
    if s.quick:
        # Counts this small say nothing about the targets: show that, not PASS/MISS.
        for row in rows:
            if row.verdict:
                row.verdict = "(quick)"
    out["rows"] = [row.as_json() for row in rows]
    out["seconds"] = time.perf_counter() - started
    table = render_table(rows)
    print(table)
    print(
        "Figures: median [min-max] over the rounds; a ratio is taken within each round, "
        "then its median.\n"
        "Subscriptions: our client (and PyPI's) let a consumer slower than the stream skip "
        "to the latest value (documented policy); the final value is always delivered."
    )
    if s.quick:
        print("quick run: targets not judged (`nox -s bench` runs the full counts)")
    s.json_path.parent.mkdir(parents=True, exist_ok=True)
    s.json_path.write_text(json.dumps(out, indent=1, default=str))
    print(f"results written to {s.json_path} ({out['seconds']:.0f} s)")
    if s.smoke:
        return smoke_check(s)
    return 0


# The sections' titles start with these words (how the smoke check finds their rows).
_SECTION_TITLES = {
    "roundtrip": ("mutation round trip", "query round trip"),
    "throughput": ("subscription throughput",),
    "scale": ("scale:",),
    "signin": ("sign-in",),
    "imports": ("import time",),
}


def smoke_check(s: Settings) -> int:
    """Read the JSON back and check that the harness did its job: every section has rows,
    every figure of ours is a finite number, every contender ran, our client delivered
    every final value. Prints ``bench smoke: N passed, N failed``; non-zero when any
    failed. (Performance targets are not checked: a quick run's numbers mean nothing.)"""
    data = json.loads(s.json_path.read_text())
    rows: list[dict[str, Any]] = data.get("rows", [])
    checks: dict[str, bool] = {}
    for section in s.sections:
        prefixes = _SECTION_TITLES[section]
        found = [r for r in rows if r["section"].startswith(prefixes)]
        checks[f"{section}: has rows"] = bool(found)

    def finite(value: Any) -> bool:
        number = value.get("median") if isinstance(value, dict) else value
        return isinstance(number, int | float) and number == number and abs(number) != inf

    bad = [
        f"{r['section']} / {r['metric']}"
        for r in rows
        for name, value in r["values"].items()
        if (name == "ours" or name.startswith("ratio")) and not isinstance(value, str)
        if not finite(value)
    ]
    checks["every figure of ours and every ratio is a finite number"] = not bad
    if any(x in s.sections for x in ("roundtrip", "throughput")):
        wanted = s.contenders or ["ours", "floor", "pypi", "npm"]
        ran = data.get("contenders", [])
        checks[f"contenders ran: {', '.join(wanted)}"] = all(w in ran for w in wanted)
    finals = [r for r in rows if r["metric"] == "final value delivered"]
    if "throughput" in s.sections:
        checks["ours delivered every final value"] = bool(finals) and all(
            r["values"].get("ours") == "all" for r in finals
        )
    failed = [name for name, ok in checks.items() if not ok]
    print("-- bench smoke checks --")
    for name, ok in checks.items():
        print(f"{'PASS' if ok else 'FAIL'}  {name}")
    for item in bad[:10]:
        print(f"      not finite: {item}")
    if data.get("unavailable"):
        print(f"      unavailable: {data['unavailable']}")
    print(f"bench smoke: {len(checks) - len(failed)} passed, {len(failed)} failed")
    return 1 if failed else 0


def parse(argv: Sequence[str]) -> Settings:
    parser = argparse.ArgumentParser(prog="python -m tests.benchmarks bench")
    # Nine: a throughput run lasts well under a second, and this machine's speed drifts;
    # the median of nine paired rounds moves far less between runs than that of five.
    parser.add_argument("--rounds", type=int, default=9)
    parser.add_argument("--calls", type=int, default=2000)
    parser.add_argument("--updates", type=int, default=20_000)
    parser.add_argument("--clients", type=int, default=1000)
    parser.add_argument(
        "--scale-idle", type=float, default=10.0, help="idle-CPU window of the scale run (s)"
    )
    parser.add_argument(
        "--scale-wave-in",
        type=float,
        default=25.0,
        help="the refresh wave's common token expiry, this many seconds ahead (0: no wave)",
    )
    parser.add_argument("--signin-calls", type=int, default=40)
    parser.add_argument("--import-runs", type=int, default=10)
    parser.add_argument(
        "--only", action="append", choices=SECTIONS, help="run only these sections (repeatable)"
    )
    parser.add_argument(
        "--quick", action="store_true", help="small counts for a smoke run (not for reporting)"
    )
    parser.add_argument(
        "--smoke",
        action="store_true",
        help="--quick, then check that every section ran and wrote sane JSON (exit 1 if not)",
    )
    parser.add_argument(
        "--json",
        type=Path,
        default=None,
        help="results file (default .bench/bench.json; with --quick .bench/bench-quick.json)",
    )
    parser.add_argument(
        "--contenders", help="comma-separated subset of ours,floor,pypi,npm (default: all)"
    )
    args = parser.parse_args(argv)
    if args.smoke:
        args.quick = True
    if args.quick:
        args.rounds, args.calls, args.updates = 2, 200, 2000
        args.clients, args.signin_calls, args.import_runs = 100, 5, 3
        args.scale_idle, args.scale_wave_in = 2.0, 8.0
    return Settings(
        rounds=args.rounds,
        calls=args.calls,
        updates=args.updates,
        scale_clients=args.clients,
        scale_idle=args.scale_idle,
        scale_wave_in=args.scale_wave_in,
        signin_calls=args.signin_calls,
        import_runs=args.import_runs,
        sections=list(args.only or SECTIONS),
        json_path=args.json or RESULTS_DIR / ("bench-quick.json" if args.quick else "bench.json"),
        contenders=args.contenders.split(",") if args.contenders else None,
        smoke=args.smoke,
        quick=args.quick,
    )


def main(argv: Sequence[str]) -> int:
    return asyncio.run(run_bench(parse(argv)))
