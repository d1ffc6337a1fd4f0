"""Scale: N authenticated clients in one process, one subscription each.

Each run is a fresh child process (``python -m tests.benchmarks._scale``) so that its
resident memory is its own; the servers run in the benchmark's server process. A run:

1. fetches N long-lived JWTs from the token endpoint (not timed);
2. connects N clients at once and waits until every subscription has its first value:
   **time to connect them all**;
3. collects garbage and reads RSS: **memory per client** = (RSS after - RSS before) / N,
   where "before" is measured after one client has connected and closed (imports and
   caches warm) and the shared aiohttp session exists;
4. measures process CPU over an idle window: **idle CPU**;
5. (ours only) the **refresh wave**: every client gets a new token with one common expiry
   (``set_auth(fetcher, initial_token=...)``), and the token endpoint records when each
   refresh call arrives. Without jitter they all land at ``exp - leeway``.

``ours`` clients borrow one shared ``aiohttp.ClientSession`` (what a server process holding
many users' clients does); ``floor`` is one bare aiohttp WebSocket per client with a
reader task, sending the same Connect/Authenticate/ModifyQuerySet frames.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import sys
import time
import uuid
from collections.abc import Sequence
from typing import Any

import aiohttp
import msgspec

from tests.benchmarks._common import (
    REPO_ROOT,
    Helper,
    Row,
    Spread,
    cpu_seconds,
    emit,
    percentile,
    quiet_logging,
    settle_memory,
    spread,
)

STORM_WINDOW = 0.1  # seconds
STORM_SHARE = 0.10  # more than this share of clients in one window is a storm


async def _tokens(session: aiohttp.ClientSession, url: str, n: int, **query: str) -> list[str]:
    semaphore = asyncio.Semaphore(50)

    async def one(i: int) -> str:
        async with semaphore, session.get(url, params={"sub": f"u{i}", **query}) as resp:
            resp.raise_for_status()
            token: str = (await resp.json())["token"]
            return token

    return list(await asyncio.gather(*(one(i) for i in range(n))))


# -- floor --------------------------------------------------------------------------------


class _FloorConn:
    def __init__(self) -> None:
        self.ws: aiohttp.ClientWebSocketResponse | None = None
        self.first = asyncio.Event()
        self.reader: asyncio.Task[None] | None = None

    async def open(self, session: aiohttp.ClientSession, sync_url: str, token: str, k: int) -> None:
        self.ws = ws = await session.ws_connect(sync_url, max_msg_size=0)
        encode = msgspec.json.encode
        await ws.send_frame(
            encode(
                {
                    "type": "Connect",
                    "sessionId": str(uuid.uuid4()),
                    "connectionCount": 0,
                    "lastCloseReason": "InitialConnect",
                    "clientTs": int(time.time() * 1000),
                }
            ),
            aiohttp.WSMsgType.TEXT,
        )
        await ws.send_frame(
            encode(
                {
                    "type": "Authenticate",
                    "baseVersion": 0,
                    "tokenType": "User",
                    "value": token,
                }
            ),
            aiohttp.WSMsgType.TEXT,
        )
        await ws.send_frame(
            encode(
                {
                    "type": "ModifyQuerySet",
                    "baseVersion": 0,
                    "newVersion": 1,
                    "modifications": [
                        {
                            "type": "Add",
                            "queryId": 0,
                            "udfPath": "scale:get",
                            "args": [{"k": float(k)}],
                        }
                    ],
                }
            ),
            aiohttp.WSMsgType.TEXT,
        )
        self.reader = asyncio.create_task(self._read())

    async def _read(self) -> None:
        assert self.ws is not None
        async for msg in self.ws:
            if msg.type is aiohttp.WSMsgType.TEXT and '"QueryUpdated"' in msg.data:
                self.first.set()

    async def close(self) -> None:
        if self.ws is not None:
            await self.ws.close()
        if self.reader is not None:
            self.reader.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self.reader


async def run_floor(convex_url: str, token_url: str, n: int, idle: float) -> dict[str, Any]:
    sync_url = convex_url.replace("http://", "ws://") + "/api/sync"
    connector = aiohttp.TCPConnector(limit=0)
    async with aiohttp.ClientSession(connector=connector) as session:
        tokens = await _tokens(session, token_url, n, ttl="3600")
        warm = _FloorConn()
        await warm.open(session, sync_url, tokens[0], -1)
        await warm.first.wait()
        await warm.close()
        del warm
        before = settle_memory()
        conns = [_FloorConn() for _ in range(n)]
        started = time.perf_counter()
        await asyncio.gather(
            *(c.open(session, sync_url, tokens[i], i) for i, c in enumerate(conns))
        )
        await asyncio.gather(*(c.first.wait() for c in conns))
        connect_seconds = time.perf_counter() - started
        del tokens
        after = settle_memory()
        cpu0, wall0 = cpu_seconds(), time.perf_counter()
        await asyncio.sleep(idle)
        idle_cpu = (cpu_seconds() - cpu0) / (time.perf_counter() - wall0)
        await asyncio.gather(*(c.close() for c in conns))
    return {
        "connect_seconds": connect_seconds,
        "bytes_per_client": (after - before) / n,
        "idle_cpu": idle_cpu,
    }


# -- ours ---------------------------------------------------------------------------------


async def run_ours(
    convex_url: str, token_url: str, n: int, idle: float, wave_in: float, servers: bool
) -> dict[str, Any]:
    from dartvex_auth_better import ConvexClient

    connector = aiohttp.TCPConnector(limit=0)
    fetches = 0
    calls: list[float] = []  # when each refresh call left a client (wall clock)
    wave_done = asyncio.Event()

    async with (
        aiohttp.ClientSession(connector=connector) as session,
        aiohttp.ClientSession() as token_session,
    ):

        def fetcher_for(i: int) -> Any:
            async def fetch(force: bool) -> str | None:
                nonlocal fetches
                calls.append(time.time())
                params = {"sub": f"u{i}", "ttl": "3600"}
                async with token_session.get(token_url, params=params) as resp:
                    resp.raise_for_status()
                    token: str = (await resp.json())["token"]
                fetches += 1
                if fetches >= n:
                    wave_done.set()
                return token

            return fetch

        tokens = await _tokens(token_session, token_url, n, ttl="3600")

        async def open_one(stack: contextlib.AsyncExitStack, i: int) -> Any:
            client = await stack.enter_async_context(ConvexClient(convex_url, session=session))
            await client.set_auth(fetcher_for(i), initial_token=tokens[i])
            sub = client.subscribe("scale:get", {"k": float(i)})
            await sub.next()
            return client, sub

        async with contextlib.AsyncExitStack() as warm_stack:
            await open_one(warm_stack, 0)
        before = settle_memory()
        async with contextlib.AsyncExitStack() as stack:
            started = time.perf_counter()
            opened = await asyncio.gather(*(open_one(stack, i) for i in range(n)))
            connect_seconds = time.perf_counter() - started
            tokens = []
            after = settle_memory()
            cpu0, wall0 = cpu_seconds(), time.perf_counter()
            await asyncio.sleep(idle)
            idle_cpu = (cpu_seconds() - cpu0) / (time.perf_counter() - wall0)
            result: dict[str, Any] = {
                "connect_seconds": connect_seconds,
                "bytes_per_client": (after - before) / n,
                "idle_cpu": idle_cpu,
            }
            if wave_in > 0:
                # Every client gets a token with one common expiry, as after a fleet-wide
                # sign-in; the refreshes then come due together unless something spreads
                # them.
                expiry = time.time() + wave_in
                short = await _tokens(token_session, token_url, n, exp=f"{expiry:.3f}")
                fetches = 0
                calls.clear()
                emit({"wave_armed": True, "exp": int(expiry)})  # the parent resets stats
                await asyncio.gather(
                    *(
                        client.set_auth(fetcher_for(i), initial_token=short[i])
                        for i, (client, _sub) in enumerate(opened)
                    )
                )
                # Wait for the wave: every client has refreshed (or the token expired).
                with contextlib.suppress(TimeoutError):
                    async with asyncio.timeout(wave_in + 10):
                        await wave_done.wait()
                result["wave_fetches"] = fetches
                result["wave_calls"] = list(calls)
                result["wave_exp"] = int(expiry)
    return result


def wave_stats(arrivals: Sequence[float], n: int, exp: float) -> dict[str, float]:
    if not arrivals:
        return {"calls": 0.0}
    ordered = sorted(arrivals)
    peak = 0
    j = 0
    for i, t in enumerate(ordered):
        while ordered[j] < t - STORM_WINDOW:
            j += 1
        peak = max(peak, i - j + 1)
    return {
        "calls": float(len(ordered)),
        "spread_seconds": ordered[-1] - ordered[0],
        "p5_p95_seconds": percentile(ordered, 95) - percentile(ordered, 5),
        "peak_per_window": float(peak),
        "peak_share": peak / n,
        "first_before_exp": exp - ordered[0],
        "last_before_exp": exp - ordered[-1],
    }


# -- the parent side --------------------------------------------------------------------------


async def _child(
    servers: Helper, info: dict[str, Any], impl: str, n: int, idle: float, wave_in: float
) -> dict[str, Any]:
    argv = [
        sys.executable,
        "-m",
        "tests.benchmarks._scale",
        "--impl",
        impl,
        "--n",
        str(n),
        "--convex-url",
        info["convex_url"],
        "--token-url",
        info["token_url"],
        "--idle",
        str(idle),
        "--wave-in",
        str(wave_in),
    ]
    child = Helper(f"scale-{impl}", argv, cwd=REPO_ROOT)
    await child.start()
    try:
        if impl == "ours" and wave_in > 0:
            armed = await child.answer(600)
            await servers.call({"op": "reset_token_stats"}, 30)
            result = await child.answer(600)
            stats = await servers.call({"op": "token_stats"}, 30)
            # When the calls left the clients (the storm, if any, is there); the server's
            # arrival times also include its own queueing (it mints one JWT at a time).
            result["wave"] = wave_stats(result.pop("wave_calls"), n, float(armed["exp"]))
            result["wave_server_arrivals"] = wave_stats(stats["arrivals"], n, float(armed["exp"]))
        else:
            result = await child.answer(600)
    finally:
        await child.stop()
    return result


async def run_scale(
    n: int, rounds: int, *, idle: float = 10.0, wave_in: float = 25.0
) -> dict[str, Any]:
    servers = Helper(
        "servers", [sys.executable, "-m", "tests.benchmarks._servers", "10"], cwd=REPO_ROOT
    )
    await servers.start()
    results: dict[str, list[dict[str, Any]]] = {"floor": [], "ours": []}
    try:
        info = await servers.answer(120)
        for index in range(rounds):
            order = ["floor", "ours"] if index % 2 == 0 else ["ours", "floor"]
            for impl in order:
                results[impl].append(await _child(servers, info, impl, n, idle, wave_in))
            print(f"  scale: round {index + 1}/{rounds} done", file=sys.stderr, flush=True)
    finally:
        await servers.stop()
    out: dict[str, Any] = {"clients": n, "idle_window_seconds": idle, "runs": results}
    out["ratios"] = {k: v.as_json() for k, v in ratios(results).items()}
    return out


RATIO_KEYS = ("connect_seconds", "bytes_per_client", "idle_cpu")


def ratios(runs: dict[str, list[dict[str, Any]]]) -> dict[str, Spread]:
    """ours/floor per round (the two ran in the same round) for each figure."""
    out: dict[str, Spread] = {}
    for key in RATIO_KEYS:
        out[key] = spread(
            o[key] / f[key] if f[key] else float("nan")
            for o, f in zip(runs["ours"], runs["floor"], strict=True)
        )
    return out


def rows(results: dict[str, Any], n: int) -> list[Row]:
    runs: dict[str, list[dict[str, Any]]] = results["runs"]
    title = f"scale: {n} authenticated clients, one subscription each"

    def col(key: str, scale: float = 1.0) -> dict[str, Spread | float | str]:
        return {impl: spread(r[key] * scale for r in rr) for impl, rr in runs.items()}

    memory = col("bytes_per_client", 1 / 1024)
    ours_kib = memory["ours"]
    assert isinstance(ours_kib, Spread)
    ratio = ratios(runs)

    def vs_floor(key: str) -> dict[str, Spread | float | str]:
        return {"ratio": ratio[key]}

    out = [
        Row(title, "time to connect all", col("connect_seconds"), "s"),
        Row(title, "time to connect all: ours/floor", vs_floor("connect_seconds"), "x"),
        Row(
            title,
            "memory per client",
            memory,
            "KiB",
            "< 32",
            "PASS" if ours_kib.median < 32 else "MISS",
        ),
        Row(title, "memory per client: ours/floor", vs_floor("bytes_per_client"), "x"),
        Row(title, "idle CPU (one core = 100)", col("idle_cpu", 100.0), "%"),
        Row(title, "idle CPU: ours/floor", vs_floor("idle_cpu"), "x"),
    ]
    waves = [r["wave"] for r in runs["ours"] if "wave" in r]
    if waves:
        peak = spread(w.get("peak_share", 1.0) * 100 for w in waves)
        out += [
            Row(
                title,
                "refresh wave: token calls (client side)",
                {"ours": spread(w["calls"] for w in waves)},
            ),
            Row(
                title,
                "refresh wave: first to last call",
                {"ours": spread(w.get("spread_seconds", 0.0) for w in waves)},
                "s",
            ),
            Row(
                title,
                f"refresh wave: peak calls in {STORM_WINDOW * 1000:.0f} ms",
                {"ours": spread(w.get("peak_per_window", 0.0) for w in waves)},
            ),
            Row(
                title,
                "refresh wave: peak share of clients",
                {"ours": peak},
                "%",
                f"<= {STORM_SHARE * 100:.0f} (no storm)",
                "PASS" if peak.median <= STORM_SHARE * 100 else "MISS (storm)",
            ),
        ]
    return out


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--impl", choices=("ours", "floor"), required=True)
    parser.add_argument("--n", type=int, required=True)
    parser.add_argument("--convex-url", required=True)
    parser.add_argument("--token-url", required=True)
    parser.add_argument("--idle", type=float, default=10.0)
    parser.add_argument("--wave-in", type=float, default=25.0)
    args = parser.parse_args()
    quiet_logging()
    if args.impl == "floor":
        result = asyncio.run(run_floor(args.convex_url, args.token_url, args.n, args.idle))
    else:
        result = asyncio.run(
            run_ours(args.convex_url, args.token_url, args.n, args.idle, args.wave_in, True)
        )
    emit(result)


if __name__ == "__main__":
    main()
