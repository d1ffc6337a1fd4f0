"""The benchmark's server process: LocalConvex, a token endpoint and a push server.

Run as ``python -m tests.benchmarks._servers``. It serves, on 127.0.0.1 only:

* **LocalConvex** with a TestTokenIssuer's JWKS and the benchmark's functions
  (``bench:mut``, ``bench:get`` for the round trips, ``scale:get`` for the scale run);
* a **token endpoint** (``GET /token?sub=..&ttl=..``) that mints RS256 JWTs with the same
  issuer and records when each call arrived (for the refresh wave);
* a **push server**: a WebSocket endpoint that speaks just enough of the sync protocol for
  the subscription-throughput run. ``bench:ping`` gets one QueryUpdated; ``bench:feed``
  (args ``{size, n}``) gets ``n`` valid, chained Transitions written back to back as one
  pre-encoded blob of WebSocket frames (so the pusher is never the bottleneck).

The servers live in their own process so that their CPU never counts against the client
being measured (the machine has two cores: one for the servers, one for the client).
It prints one ``@@bench`` ready line, then answers JSON requests on stdin (``token_stats``,
``reset_token_stats``); closing stdin stops it.
"""

from __future__ import annotations

import asyncio
import base64
import struct
import sys
import time
from collections.abc import Callable
from typing import Any, Final

import msgspec
from aiohttp import WSMsgType, web

from dartvex_auth_better.testing import LocalConvex, TestTokenIssuer
from tests.benchmarks._common import emit, quiet_logging

__all__ = ["PushServer", "TokenServer", "feed_value", "ws_frame"]

INITIAL_TS: Final = "AAAAAAAAAAA="


def encode_ts(ts: int) -> str:
    return base64.b64encode(struct.pack("<Q", ts)).decode("ascii")


def ws_frame(payload: bytes) -> bytes:
    """One unmasked server-to-client WebSocket text frame."""
    size = len(payload)
    if size < 126:
        header = bytes((0x81, size))
    elif size < 65536:
        header = bytes((0x81, 126)) + struct.pack("!H", size)
    else:
        header = bytes((0x81, 127)) + struct.pack("!Q", size)
    return header + payload


# The two value shapes of the throughput run, sized by the whole Transition frame (the
# WebSocket message), since the envelope around one QueryUpdated (versions, timestamps,
# logLines, journal) is itself about 240 bytes:
# * "small": the value is just the sequence number, the smallest frame one query's update
#   can be (about 245-250 bytes; "about 200 bytes" is not reachable with a valid frame);
# * "typical": a 16-item list of documents, a frame of about 1.3 KB.
# The exact sizes are measured when the stream is built and reported (``frame_bytes``).
_TYPICAL_ITEMS: Final[list[dict[str, Any]]] = [
    {"_id": f"msgs_{i:04d}", "_creationTime": 1712345678901 + i, "body": f"msg {i:02d}"}
    for i in range(16)
]


def feed_value(size: str, seq: int) -> dict[str, Any]:
    if size == "small":
        return {"seq": seq}
    return {"seq": seq, "items": _TYPICAL_ITEMS}


def _frame_stats(payload_sizes: list[int]) -> dict[str, float]:
    """Sizes of the frames of one stream: the JSON message, and on the wire (plus the
    WebSocket header)."""
    wire = [n + (2 if n < 126 else 4 if n < 65536 else 10) for n in payload_sizes]
    return {
        "frames": float(len(payload_sizes)),
        "message_min": float(min(payload_sizes)),
        "message_mean": sum(payload_sizes) / len(payload_sizes),
        "message_max": float(max(payload_sizes)),
        "wire_mean": sum(wire) / len(wire),
    }


def _version(query_set: int, identity: int, ts: int) -> dict[str, Any]:
    return {"querySet": query_set, "identity": identity, "ts": encode_ts(ts)}


class PushServer:
    """The sync endpoint of the throughput run (see the module docstring)."""

    def __init__(self) -> None:
        self._cache: dict[tuple[Any, ...], bytes] = {}
        self.streams = 0
        self.cache_misses = 0
        self.frame_bytes: dict[str, dict[str, float]] = {}

    def app(self) -> web.Application:
        app = web.Application()
        app.router.add_get("/api/sync", self.handle)
        app.router.add_get(r"/api/{version:[0-9][^/]*}/sync", self.handle)
        return app

    def _blob(
        self, qid: int, qs_from: int, qs_to: int, identity: int, ts_from: int, size: str, n: int
    ) -> bytes:
        key = (qid, qs_from, qs_to, identity, ts_from, size, n)
        blob = self._cache.get(key)
        if blob is None:
            self.cache_misses += 1
            messages = [
                msgspec.json.encode(
                    {
                        "type": "Transition",
                        "startVersion": _version(
                            qs_from if i == 0 else qs_to, identity, ts_from + i
                        ),
                        "endVersion": _version(qs_to, identity, ts_from + i + 1),
                        "modifications": [
                            {
                                "type": "QueryUpdated",
                                "queryId": qid,
                                "value": feed_value(size, i),
                                "logLines": [],
                                "journal": None,
                            }
                        ],
                    }
                )
                for i in range(n)
            ]
            blob = b"".join(ws_frame(m) for m in messages)
            self.frame_bytes[size] = _frame_stats([len(m) for m in messages])
            self._cache[key] = blob
        return blob

    def prebuild(self, n: int) -> None:
        """Encode the streams the four clients will ask for (ping is query 0, the feed
        query 1, anonymous) before any timing starts."""
        for size in ("small", "typical"):
            self._blob(1, 1, 2, 0, 1, size, n)
        self.cache_misses = 0

    async def handle(self, request: web.Request) -> web.StreamResponse:
        # compress=False: no permessage-deflate, so the raw frames we write are valid.
        ws = web.WebSocketResponse(compress=False, max_msg_size=0)
        await ws.prepare(request)
        transport = request.transport
        query_set, identity, ts = 0, 0, 0
        async for msg in ws:
            if msg.type is not WSMsgType.TEXT:
                continue
            frame = msgspec.json.decode(msg.data)
            kind = frame.get("type")
            if kind == "Authenticate":
                end = (query_set, identity + 1, ts + 1)
                await ws.send_frame(
                    self._transition((query_set, identity, ts), end, []), WSMsgType.TEXT
                )
                query_set, identity, ts = end
                continue
            if kind != "ModifyQuerySet":
                continue  # Connect, Mutation, Event...: nothing to answer here
            new_qs = int(frame["newVersion"])
            mods: list[dict[str, Any]] = []
            feed: tuple[int, str, int] | None = None
            for mod in frame["modifications"]:
                if mod.get("type") == "Remove":
                    mods.append({"type": "QueryRemoved", "queryId": mod["queryId"]})
                elif str(mod.get("udfPath", "")).replace(".js", "") == "bench:feed":
                    args = mod["args"][0]
                    feed = (int(mod["queryId"]), str(args["size"]), int(args["n"]))
                else:
                    mods.append(
                        {
                            "type": "QueryUpdated",
                            "queryId": mod["queryId"],
                            "value": {"pong": True},
                            "logLines": [],
                            "journal": None,
                        }
                    )
            if feed is None:
                end = (new_qs, identity, ts + 1)
                await ws.send_frame(
                    self._transition((query_set, identity, ts), end, mods), WSMsgType.TEXT
                )
                query_set, identity, ts = end
                continue
            qid, size, n = feed
            blob = self._blob(qid, query_set, new_qs, identity, ts, size, n)
            self.streams += 1
            if transport is None:
                break
            # One write of n pre-framed Transitions: nothing else writes meanwhile.
            transport.write(blob)
            query_set, ts = new_qs, ts + n
        return ws

    @staticmethod
    def _transition(
        start: tuple[int, int, int], end: tuple[int, int, int], mods: list[dict[str, Any]]
    ) -> bytes:
        return msgspec.json.encode(
            {
                "type": "Transition",
                "startVersion": _version(*start),
                "endVersion": _version(*end),
                "modifications": mods,
            }
        )


class TokenServer:
    """``GET /token?sub=&ttl=``: a freshly minted JWT, and when each call arrived.

    ``fail`` decides per call: None to answer, ``"5xx"`` for HTTP 503, ``"timeout"`` to
    hang for ``hang_seconds`` (the caller's timeout fires first)."""

    def __init__(self, issuer: TestTokenIssuer, *, default_ttl: float = 600.0) -> None:
        self.issuer = issuer
        self.default_ttl = default_ttl
        self.arrivals: list[float] = []
        self.failures = 0
        self.hang_seconds = 30.0
        self.fail: Callable[[], str | None] = lambda: None

    def app(self) -> web.Application:
        app = web.Application()
        app.router.add_get("/token", self.handle)
        return app

    async def handle(self, request: web.Request) -> web.StreamResponse:
        self.arrivals.append(time.time())
        mode = self.fail()
        if mode == "5xx":
            self.failures += 1
            return web.Response(status=503, text="token endpoint unavailable (chaos)")
        if mode == "timeout":
            self.failures += 1
            await asyncio.sleep(self.hang_seconds)
            return web.Response(status=504)
        sub = request.query.get("sub", "bench-user")
        now = time.time()
        if "exp" in request.query:  # a common expiry for a whole fleet (the refresh wave)
            ttl = float(request.query["exp"]) - now
        else:
            ttl = float(request.query.get("ttl", self.default_ttl))
        token = self.issuer.mint(sub, ttl=ttl, iat=now, email=f"{sub}@example.com")
        return web.json_response({"token": token})


async def start_app(app: web.Application) -> tuple[web.AppRunner, int]:
    runner = web.AppRunner(app, handle_signals=False, access_log=None, shutdown_timeout=1.0)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0, backlog=2048)
    await site.start()
    return runner, int(runner.addresses[0][1])


async def stdin_lines() -> asyncio.StreamReader:
    loop = asyncio.get_running_loop()
    reader = asyncio.StreamReader(limit=16 * 1024 * 1024)
    await loop.connect_read_pipe(lambda: asyncio.StreamReaderProtocol(reader), sys.stdin)
    return reader


def register_bench_functions(convex: LocalConvex) -> None:
    state: dict[str, str] = {}

    def counter_id(ctx: Any) -> str:
        doc_id = state.get("counter")
        if doc_id is None or ctx.db.get(doc_id) is None:
            doc_id = ctx.db.insert("bench_counter", {"n": 0.0, "label": "round trip"})
            state["counter"] = doc_id
        return doc_id

    @convex.mutation("bench:mut")
    def mut(ctx: Any, args: dict[str, Any]) -> dict[str, Any]:
        ctx.db.patch(counter_id(ctx), {"n": args["n"]})
        return {"ok": True, "n": args["n"]}

    @convex.query("bench:get")
    def get(ctx: Any, args: dict[str, Any]) -> dict[str, Any]:
        return {"n": args.get("n", 0), "title": "query round trip", "done": False}

    @convex.query("scale:get")
    def scale_get(ctx: Any, args: dict[str, Any]) -> dict[str, Any]:
        identity = ctx.auth.get_user_identity()
        return {"user": identity["subject"] if identity else None, "k": args.get("k", 0)}


async def main() -> None:
    quiet_logging()
    issuer = TestTokenIssuer()
    push = PushServer()
    push.prebuild(int(sys.argv[1]) if len(sys.argv) > 1 else 20_000)
    tokens = TokenServer(issuer)
    async with LocalConvex(jwks=issuer.jwks, issuer=issuer.issuer) as convex:
        register_bench_functions(convex)
        push_runner, push_port = await start_app(push.app())
        token_runner, token_port = await start_app(tokens.app())
        try:
            emit(
                {
                    "convex_url": convex.url,
                    "push_url": f"http://127.0.0.1:{push_port}",
                    "token_url": f"http://127.0.0.1:{token_port}/token",
                    "token": issuer.mint("bench-user", ttl=6 * 3600, email="bench@example.com"),
                    "frame_bytes": push.frame_bytes,
                }
            )
            reader = await stdin_lines()
            while line := await reader.readline():
                request = msgspec.json.decode(line)
                op = request.get("op")
                if op == "token_stats":
                    emit({"arrivals": tokens.arrivals, "failures": tokens.failures})
                elif op == "reset_token_stats":
                    tokens.arrivals = []
                    emit({"ok": True})
                elif op == "push_stats":
                    emit(
                        {
                            "streams": push.streams,
                            "cache_misses": push.cache_misses,
                            "frame_bytes": push.frame_bytes,
                        }
                    )
                elif op == "convex_stats":
                    emit(
                        {
                            "open": len(convex.open_connections),
                            "expired_tokens": sum(t.was_expired for t in convex.received_tokens),
                        }
                    )
                else:
                    emit({"error": f"unknown op {op!r}"})
        finally:
            await push_runner.cleanup()
            await token_runner.cleanup()


if __name__ == "__main__":
    asyncio.run(main())
