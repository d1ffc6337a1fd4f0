"""The two in-process contenders: our ConvexClient and the floor.

The **floor** is the least a correct client can do: a bare aiohttp WebSocket that sends the
same frames as ours (Connect, Authenticate, ModifyQuerySet, Mutation; a query's Remove
rides with the next query's Add, as ours sends it) and decodes every
reply with typed msgspec Structs (values kept as ``msgspec.Raw``, like ours), checks that
each Transition starts at the version it is at, and waits for a mutation's Transition
before returning, as read-your-writes requires. No reconnects, no subscriptions API, no
auth refresh: nothing but the protocol.

Both run in the benchmark process, against the same servers, with the same aiohttp
options (no message-size cap, no compression, text frames handed over as bytes).
"""

from __future__ import annotations

import asyncio
import base64
import struct
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from typing import Any, Literal

import aiohttp
import msgspec

from dartvex_auth_better import ConvexClient

__all__ = [
    "Block",
    "FloorClient",
    "floor_caller",
    "floor_throughput",
    "ours_caller",
    "ours_roundtrips",
    "ours_throughput",
]


# -- the floor's own wire types (independent of the SDK's) -------------------------------


class _Version(msgspec.Struct, frozen=True, rename="camel"):
    query_set: int
    identity: int
    ts: str


class _Updated(msgspec.Struct, tag_field="type", tag="QueryUpdated", rename="camel"):
    query_id: int
    value: msgspec.Raw
    log_lines: list[str] = []
    journal: str | None = None


class _Failed(msgspec.Struct, tag_field="type", tag="QueryFailed", rename="camel"):
    query_id: int
    error_message: str


class _Removed(msgspec.Struct, tag_field="type", tag="QueryRemoved", rename="camel"):
    query_id: int


class _Transition(msgspec.Struct, tag_field="type", tag="Transition", rename="camel"):
    start_version: _Version
    end_version: _Version
    modifications: list[_Updated | _Failed | _Removed]


class _MutationResponse(msgspec.Struct, tag_field="type", tag="MutationResponse", rename="camel"):
    request_id: int
    success: bool
    result: msgspec.Raw = msgspec.Raw(b"null")
    ts: str | None = None


class _Other(msgspec.Struct, tag_field="type", tag="Ping"):
    pass


_decoder = msgspec.json.Decoder(_Transition | _MutationResponse | _Other)
_encoder = msgspec.json.Encoder()


def _ts(text: str) -> int:
    value: int = struct.unpack("<Q", base64.b64decode(text))[0]
    return value


class FloorClient:
    def __init__(self, url: str) -> None:
        self.sync_url = url.replace("http://", "ws://", 1) + "/api/sync"
        self._session: aiohttp.ClientSession | None = None
        self._ws: aiohttp.ClientWebSocketResponse[Literal[False]] | None = None
        self.version = _Version(0, 0, "AAAAAAAAAAA=")
        self._query_set = 0
        self._next_query = 0
        self._removes: list[dict[str, Any]] = []
        self._next_request = 0

    async def connect(self, token: str | None = None) -> None:
        self._session = aiohttp.ClientSession()
        self._ws = await self._session.ws_connect(
            self.sync_url,
            headers={"Convex-Client": "python-bench-floor"},
            max_msg_size=0,
            decode_text=False,
        )
        await self._send(
            {
                "type": "Connect",
                "sessionId": str(uuid.uuid4()),
                "connectionCount": 0,
                "lastCloseReason": "InitialConnect",
                "clientTs": int(time.time() * 1000),
            }
        )
        if token is not None:
            await self._send(
                {"type": "Authenticate", "baseVersion": 0, "tokenType": "User", "value": token}
            )
            while self.version.identity < 1:
                await self._next()

    async def close(self) -> None:
        if self._ws is not None:
            await self._ws.close()
        if self._session is not None:
            await self._session.close()

    async def _send(self, frame: dict[str, Any]) -> None:
        assert self._ws is not None
        await self._ws.send_frame(_encoder.encode(frame), aiohttp.WSMsgType.TEXT)

    async def _next(self) -> _Transition | _MutationResponse | _Other:
        assert self._ws is not None
        msg = await self._ws.receive()
        if msg.type is not aiohttp.WSMsgType.TEXT:
            raise ConnectionError(f"floor socket ended: {msg.type}")
        decoded: _Transition | _MutationResponse | _Other = _decoder.decode(msg.data)
        if isinstance(decoded, _Transition):
            if decoded.start_version != self.version:
                raise ConnectionError("Transition does not start at our version")
            self.version = decoded.end_version
        return decoded

    def _modify(self, modification: dict[str, Any]) -> dict[str, Any]:
        # A query's Remove goes out with the next change, as ours sends it (its Removes
        # wait for the end of the event-loop turn, and query() after query() is one turn).
        modifications = [*self._removes, modification]
        self._removes = []
        frame = {
            "type": "ModifyQuerySet",
            "baseVersion": self._query_set,
            "newVersion": self._query_set + 1,
            "modifications": modifications,
        }
        self._query_set += 1
        return frame

    async def mutation(self, udf_path: str, args: dict[str, Any]) -> Any:
        request_id = self._next_request
        self._next_request += 1
        await self._send(
            {"type": "Mutation", "requestId": request_id, "udfPath": udf_path, "args": [args]}
        )
        while True:
            msg = await self._next()
            if isinstance(msg, _MutationResponse) and msg.request_id == request_id:
                break
        if not msg.success or msg.ts is None:
            raise RuntimeError(f"mutation failed: {bytes(msg.result)!r}")
        ts = _ts(msg.ts)
        # Read-your-writes: the result counts once a Transition has reached its ts.
        while _ts(self.version.ts) < ts:
            await self._next()
        return msgspec.json.decode(msg.result)

    async def query(self, udf_path: str, args: dict[str, Any]) -> Any:
        query_id = self._next_query
        self._next_query += 1
        add = {"type": "Add", "queryId": query_id, "udfPath": udf_path, "args": [args]}
        await self._send(self._modify(add))
        value: msgspec.Raw | None = None
        while value is None:
            msg = await self._next()
            if isinstance(msg, _Transition):
                for mod in msg.modifications:
                    if isinstance(mod, _Updated) and mod.query_id == query_id:
                        value = mod.value
        self._removes.append({"type": "Remove", "queryId": query_id})
        return msgspec.json.decode(value)

    async def feed(self, size: str, n: int) -> tuple[float, int, Any]:
        """Subscribe to bench:ping, then time bench:feed until its n-th value.

        Returns (seconds, values seen, final value)."""
        await self._send(
            self._modify({"type": "Add", "queryId": 0, "udfPath": "bench:ping", "args": [{}]})
        )
        while self.version.query_set < 1:
            await self._next()
        started = time.perf_counter()
        feed = {
            "type": "Add",
            "queryId": 1,
            "udfPath": "bench:feed",
            "args": [{"size": size, "n": n}],
        }
        await self._send(self._modify(feed))
        latest: msgspec.Raw | None = None
        seen = 0
        while seen < n:
            msg = await self._next()
            if isinstance(msg, _Transition):
                for mod in msg.modifications:
                    if isinstance(mod, _Updated) and mod.query_id == 1:
                        latest = mod.value
                        seen += 1
        assert latest is not None
        final = msgspec.json.decode(latest)
        return time.perf_counter() - started, seen, final


# -- round trips ------------------------------------------------------------------------

#: Seconds a client may take to connect, authenticate and warm up.
SETUP_TIMEOUT = 120.0

#: Runs the next n sequential calls and returns their latencies in microseconds.
Block = Callable[[int], Awaitable[list[float]]]


def _block_runner(call: Callable[[int], Awaitable[Any]]) -> Block:
    clock = time.perf_counter_ns
    next_arg = 0

    async def block(n: int) -> list[float]:
        nonlocal next_arg
        out: list[float] = []
        for i in range(next_arg, next_arg + n):
            started = clock()
            await call(i)
            out.append((clock() - started) / 1000.0)
        next_arg += n
        return out

    return block


def _bench_call(client: ConvexClient | FloorClient, kind: str) -> Callable[[int], Awaitable[Any]]:
    if kind == "mutation":
        return lambda i: client.mutation("bench:mut", {"n": float(i)})
    return lambda i: client.query("bench:get", {"n": float(i)})


async def _warm(call: Callable[[int], Awaitable[Any]], warm: int) -> None:
    # Connected, authenticated and past the first calls' one-off costs before timing, as
    # in the drivers.
    for i in range(max(1, warm)):
        await call(-1 - i)


@asynccontextmanager
async def ours_caller(url: str, token: str, kind: str, warm: int) -> AsyncIterator[Block]:
    async with ConvexClient(url) as client:
        call = _bench_call(client, kind)
        async with asyncio.timeout(SETUP_TIMEOUT):
            await client.set_auth(token)
            await client.wait_connected()
            await _warm(call, warm)
        yield _block_runner(call)


@asynccontextmanager
async def floor_caller(url: str, token: str, kind: str, warm: int) -> AsyncIterator[Block]:
    client = FloorClient(url)
    try:
        call = _bench_call(client, kind)
        async with asyncio.timeout(SETUP_TIMEOUT):
            await client.connect(token)
            await _warm(call, warm)
        yield _block_runner(call)
    finally:
        await client.close()


async def ours_roundtrips(url: str, token: str, kind: str, n: int) -> list[float]:
    """n sequential calls on one client of ours, after one untimed call (the profile's run)."""
    async with ours_caller(url, token, kind, 1) as block:
        return await block(n)


# -- subscription throughput ---------------------------------------------------------------


async def ours_throughput(url: str, size: str, n: int) -> tuple[float, int, Any]:
    async with ConvexClient(url) as client:
        ping = client.subscribe("bench:ping")
        await ping.next()
        started = time.perf_counter()
        seen = 0
        final: Any = None
        async for value in client.subscribe("bench:feed", {"size": size, "n": n}):
            seen += 1
            if value["seq"] == n - 1:
                final = value
                break
        elapsed = time.perf_counter() - started
        ping.close()
        return elapsed, seen, final


async def floor_throughput(url: str, size: str, n: int) -> tuple[float, int, Any]:
    client = FloorClient(url)
    await client.connect()
    try:
        return await client.feed(size, n)
    finally:
        await client.close()
