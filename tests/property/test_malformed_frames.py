"""Property: whatever a server sends, the client either handles it or raises a typed
protocol error. Never a KeyError, TypeError, AttributeError or a hang."""

from __future__ import annotations

import asyncio
from collections.abc import Iterator
from typing import Any

import aiohttp
import msgspec
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from dartvex_auth_better import ProtocolError, ServerFatalError
from dartvex_auth_better.convex._protocol import decode_server_message, encode_ts
from dartvex_auth_better.convex._sync import SyncCore
from dartvex_auth_better.convex._values import encode_args

TS0 = encode_ts(0)
TS1 = encode_ts(1000)

VALID_FRAMES: list[dict[str, Any]] = [
    {
        "type": "Transition",
        "startVersion": {"querySet": 0, "identity": 0, "ts": TS0},
        "endVersion": {"querySet": 1, "identity": 0, "ts": TS1},
        "modifications": [
            {
                "type": "QueryUpdated",
                "queryId": 0,
                "value": {"n": {"$integer": "BQAAAAAAAAA="}},
                "logLines": [],
                "journal": None,
            },
            {
                "type": "QueryFailed",
                "queryId": 1,
                "errorMessage": "boom",
                "logLines": [],
                "errorData": {"code": "X"},
            },
            {"type": "QueryRemoved", "queryId": 2},
        ],
    },
    {
        "type": "MutationResponse",
        "requestId": 0,
        "success": True,
        "result": [1, 2],
        "ts": TS1,
        "logLines": [],
    },
    {
        "type": "MutationResponse",
        "requestId": 0,
        "success": False,
        "result": "failed",
        "logLines": [],
        "errorData": {"$bytes": "AQI="},
    },
    {"type": "ActionResponse", "requestId": 1, "success": True, "result": None, "logLines": []},
    {"type": "AuthError", "error": "bad token", "baseVersion": 0, "authUpdateAttempted": True},
    {"type": "FatalError", "error": "boom"},
    {"type": "Ping"},
    {
        "type": "TransitionChunk",
        "chunk": "{",
        "partNumber": 0,
        "totalParts": 2,
        "transitionId": "t",
    },
]
VALID_BYTES = [msgspec.json.encode(f) for f in VALID_FRAMES]

json_scalars = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(-(2**70), 2**70),
    st.floats(allow_nan=False),
    st.text(max_size=12),
)
json_values = st.recursive(
    json_scalars,
    lambda children: st.one_of(
        st.lists(children, max_size=4),
        st.dictionaries(st.text(max_size=12), children, max_size=4),
    ),
    max_leaves=12,
)


@st.composite
def corrupted_frames(draw: st.DrawFn) -> bytes:
    kind = draw(st.sampled_from(["truncate", "byteflip", "fieldswap", "random", "special"]))
    base = draw(st.sampled_from(VALID_FRAMES))
    if kind == "truncate":
        raw = msgspec.json.encode(base)
        return raw[: draw(st.integers(0, max(0, len(raw) - 1)))]
    if kind == "byteflip":
        flipped = bytearray(msgspec.json.encode(base))
        for _ in range(draw(st.integers(1, 4))):
            i = draw(st.integers(0, len(flipped) - 1))
            flipped[i] = draw(st.integers(0, 255))
        return bytes(flipped)
    if kind == "fieldswap":
        frame = _deep_copy(base)
        target = _random_dict(draw, frame)
        if target:
            key = draw(st.sampled_from(sorted(target)))
            if draw(st.booleans()):
                target[key] = draw(json_values)
            else:
                del target[key]
        return msgspec.json.encode(frame)
    if kind == "special":
        # Broken Convex values in otherwise valid positions.
        bad_value = draw(
            st.sampled_from(
                [
                    {"$integer": "AQ=="},
                    {"$float": "AAAAAAAA8D8="},
                    {"$bytes": 5},
                    {"$set": []},
                    {"$weird": 1},
                    {"$integer": "BQAAAAAAAAA=", "x": 1},
                ]
            )
        )
        frame = _deep_copy(VALID_FRAMES[draw(st.sampled_from([0, 1, 2]))])
        if frame["type"] == "Transition":
            frame["modifications"][draw(st.sampled_from([0, 1]))][
                "value" if draw(st.booleans()) else "errorData"
            ] = bad_value
        elif frame["success"]:
            frame["result"] = bad_value
        else:
            frame["errorData"] = bad_value
        return msgspec.json.encode(frame)
    frame = draw(json_values)
    if isinstance(frame, dict) and draw(st.booleans()):
        frame["type"] = draw(st.sampled_from([f["type"] for f in VALID_FRAMES] + ["Nope"]))
    return msgspec.json.encode(frame)


def _deep_copy(value: Any) -> Any:
    return msgspec.json.decode(msgspec.json.encode(value))


def _random_dict(draw: st.DrawFn, frame: dict[str, Any]) -> dict[str, Any] | None:
    candidates: list[dict[str, Any]] = []

    def walk(node: Any) -> None:
        if isinstance(node, dict):
            candidates.append(node)
            for v in node.values():
                walk(v)
        elif isinstance(node, list):
            for v in node:
                walk(v)

    walk(frame)
    return draw(st.sampled_from(candidates)) if candidates else None


def fresh_core() -> tuple[SyncCore, list[Any]]:
    """A core with two live queries and an outstanding mutation and action."""
    core = SyncCore("session")
    sent: list[Any] = []
    core.send = sent.append
    core.restart()
    waker = asyncio.Event()
    core.subscribe("q:a", encode_args({}), waker)
    core.subscribe("q:b", encode_args({"x": 1}), waker)
    return core, sent


def drive(core: SyncCore, frame: bytes) -> None:
    try:
        msg = decode_server_message(frame)
        core.handle(msg)
    except (ProtocolError, ServerFatalError):
        pass  # the typed outcomes: the socket loop reconnects or stops


@pytest.fixture(scope="module")
def loop() -> Iterator[asyncio.AbstractEventLoop]:
    # One loop for every example: the core needs a loop for its futures, not a fresh one.
    loop = asyncio.new_event_loop()
    yield loop
    loop.close()


@settings(
    max_examples=2000,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture],
)
@given(frames=st.lists(corrupted_frames(), min_size=1, max_size=4))
def test_decoder_and_core_only_handle_or_raise_typed_errors(
    loop: asyncio.AbstractEventLoop, frames: list[bytes]
) -> None:
    loop.run_until_complete(_check(frames))


async def _check(frames: list[bytes]) -> None:
    core, _ = fresh_core()
    mutation = core.request("mutation", "m:f", encode_args({}))
    action = core.request("action", "a:f", encode_args({}))
    for frame in frames:
        drive(core, frame)
        # Every request is either finished or still tracked (so a reconnect re-sends it
        # or a close fails it): never dropped with its future unset.
        outstanding = core.requests.outstanding_ids()
        for request in (mutation, action):
            assert request.future.done() or request.message.request_id in outstanding, (
                f"request {request.message.request_id} is neither done nor tracked"
            )
    # After whatever happened, a reconnect brings the core back to a working state.
    frames_out = core.restart()
    assert frames_out, "a restart always produces at least a Connect"
    good = (
        b'{"type":"Transition","startVersion":{"querySet":0,"identity":0,"ts":"AAAAAAAAAAA="},'
        b'"endVersion":{"querySet":1,"identity":0,"ts":"AAAAAAAAAAA="},"modifications":['
        b'{"type":"QueryUpdated","queryId":0,"value":7,"logLines":[]}]}'
    )
    core.handle(decode_server_message(good))
    query = core.query_set.get(0)
    assert query is not None and query.server is not None
    assert query.server.unwrap() == 7
    # Futures only ever hold values or typed errors.
    for request in (mutation, action):
        if request.future.done() and not request.future.cancelled():
            exc = request.future.exception()
            assert (
                exc is None
                or isinstance(exc, ProtocolError | ServerFatalError)
                or (type(exc).__name__ in {"ConvexError", "ConnectionLostError"})
            ), repr(exc)


# -- the same frames through the socket loop's TransitionChunk path -------------------------------


@st.composite
def chunked_runs(draw: st.DrawFn) -> list[bytes]:
    """A frame (valid or corrupted) sent as TransitionChunk parts, sometimes with the run
    broken: parts swapped, a wrong id or total, or another frame in the middle."""
    inner = draw(st.one_of(st.sampled_from(VALID_BYTES), corrupted_frames()))
    text = inner.decode("utf-8", "replace")
    cuts = sorted(draw(st.sets(st.integers(1, max(1, len(text) - 1)), max_size=4)))
    pieces = [text[a:b] for a, b in zip([0, *cuts], [*cuts, len(text)], strict=True)]
    parts: list[dict[str, Any]] = [
        {
            "type": "TransitionChunk",
            "chunk": piece,
            "partNumber": n,
            "totalParts": len(pieces),
            "transitionId": "t",
        }
        for n, piece in enumerate(pieces)
    ]
    raw = [msgspec.json.encode(p) for p in parts]
    breakage = draw(st.sampled_from(["none", "none", "swap", "id", "total", "interleave"]))
    if breakage == "swap" and len(raw) > 1:
        i = draw(st.integers(0, len(raw) - 2))
        raw[i], raw[i + 1] = raw[i + 1], raw[i]
    elif breakage in ("id", "total") and len(parts) > 1:
        i = draw(st.integers(1, len(parts) - 1))
        parts[i] = {**parts[i], "transitionId": "u"} if breakage == "id" else parts[i]
        if breakage == "total":
            parts[i] = {**parts[i], "totalParts": len(parts) + 1}
        raw[i] = msgspec.json.encode(parts[i])
    elif breakage == "interleave" and len(raw) > 1:
        raw.insert(draw(st.integers(1, len(raw) - 1)), draw(st.sampled_from(VALID_BYTES)))
    return raw


@settings(
    max_examples=300,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture],
)
@given(runs=st.lists(chunked_runs(), min_size=1, max_size=3))
def test_chunked_frames_are_handled_or_end_the_socket_typed(
    loop: asyncio.AbstractEventLoop, runs: list[list[bytes]]
) -> None:
    loop.run_until_complete(_check_chunked(runs))


async def _check_chunked(runs: list[list[bytes]]) -> None:
    from dartvex_auth_better.convex._client import ConvexClient, _ChunkBuffer, _SocketEnded

    client = ConvexClient("http://127.0.0.1:9", allow_insecure=True)  # no I/O: never entered
    core = client._core
    sent: list[Any] = []
    core.send = sent.append
    core.restart()
    core.subscribe("q:a", encode_args({}), asyncio.Event())
    mutation = core.request("mutation", "m:f", encode_args({}))
    action = core.request("action", "a:f", encode_args({}))
    for run in runs:
        for frame in run:
            message = aiohttp.WSMessage(
                aiohttp.WSMsgType.TEXT, frame.decode("utf-8", "replace"), None
            )
            # The socket loop's own dispatch: anything but "go on" or a typed ending is a bug.
            ended = client._handle_ws_message(None, message)  # type: ignore[arg-type]
            assert ended is None or isinstance(ended, _SocketEnded)
            outstanding = core.requests.outstanding_ids()
            for request in (mutation, action):
                assert request.future.done() or request.message.request_id in outstanding
            if ended is not None:
                assert ended.protocol_error or ended.fatal is not None, ended.reason
                if ended.fatal is not None:
                    return  # FatalError: the loop stops here
                # The loop opens a new socket: a fresh buffer and the restart frames.
                client._chunks = _ChunkBuffer()
                core.restart()
                break
