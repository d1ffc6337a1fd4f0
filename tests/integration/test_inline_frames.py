"""InlineFrames on a real aiohttp WebSocket to a real LocalConvex: text frames handled in
aiohttp's data callback, everything else handed to the reader, in order.

The client's own behaviour on both paths (inline, and ``ws.receive()`` only) is covered
by test_convex_client.py and test_reconnect.py, which run every test on each
(the ``frame_reading`` fixture in tests/conftest.py).
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from typing import Any

import aiohttp
import anyio
import pytest

from dartvex_auth_better._urls import sync_url_for
from dartvex_auth_better.convex import _inline
from dartvex_auth_better.convex._inline import ENDED, HANDED_BACK, TAKEN, InlineFrames
from dartvex_auth_better.testing import LocalConvex
from dartvex_auth_better.testing._convex_server import ConnectionRecord

pytestmark = [pytest.mark.anyio, pytest.mark.integration]

DEADLINE = 10.0


@asynccontextmanager
async def raw_socket() -> AsyncIterator[
    tuple[LocalConvex, ConnectionRecord, aiohttp.ClientWebSocketResponse]
]:
    """A bare aiohttp socket to LocalConvex's sync endpoint (no Convex client on it)."""
    with anyio.fail_after(DEADLINE):
        async with LocalConvex() as convex, aiohttp.ClientSession() as session:
            ws = await session.ws_connect(sync_url_for(convex.url), max_msg_size=0)
            try:
                record = await convex.wait_for_connections(1)
                yield convex, record, ws
            finally:
                await ws.close()


def attach(
    ws: aiohttp.ClientWebSocketResponse, on_text: Callable[[aiohttp.WSMessage], int]
) -> InlineFrames:
    """InlineFrames on ``ws``: it must attach on the aiohttp releases it supports; on any
    other the test is skipped (the client then reads every frame with ``ws.receive()``,
    which the frame_reading tests cover)."""
    if not _inline._VERSION_OK:
        pytest.skip(f"aiohttp {aiohttp.__version__} is outside {_inline._SUPPORTED}")
    if not _inline.ENABLED:
        pytest.skip("inline frame reading is switched off (DARTVEX_AUTH_BETTER_INLINE_FRAMES=0)")
    inline = InlineFrames.attach(ws, on_text)
    assert inline is not None, f"aiohttp {aiohttp.__version__}: internals not recognised"
    return inline


def parser_holder(ws: aiohttp.ClientWebSocketResponse) -> Any:
    """aiohttp's protocol object of the socket (whose ``_payload_parser`` is wrapped)."""
    assert ws._conn is not None
    return ws._conn.protocol


class Taker:
    """An on_text that records what it took (and in which task) and hands back the frames
    ``hand_back`` picks."""

    def __init__(
        self,
        hand_back: Callable[[str], bool] = lambda text: False,
        handled: Handled | None = None,
    ) -> None:
        self.taken: list[str] = []
        self.in_task: list[bool] = []
        self.hand_back = hand_back
        self.handled = handled
        self.changed = asyncio.Event()

    def __call__(self, msg: aiohttp.WSMessage) -> int:
        self.in_task.append(asyncio.current_task() is not None)
        if self.hand_back(msg.data):
            return HANDED_BACK
        self.taken.append(msg.data)
        if self.handled is not None:
            self.handled.add(msg.data)
        self.changed.set()
        return TAKEN

    async def wait_taken(self, n: int) -> None:
        with anyio.fail_after(5):
            while len(self.taken) < n:
                await self.changed.wait()
                self.changed.clear()


class Handled:
    """Every frame handled, by whoever handled it, in the order it was handled."""

    def __init__(self, expected: int) -> None:
        self.texts: list[str] = []
        self.expected = expected
        self.complete = asyncio.Event()

    def add(self, text: str) -> None:
        self.texts.append(text)
        if len(self.texts) >= self.expected:
            self.complete.set()


async def reader_turn(
    inline: InlineFrames, ws: aiohttp.ClientWebSocketResponse, handled: Handled | None = None
) -> list[str]:
    """What the client's reader task does when woken: the held frame, then receive() while
    frames wait. Returns the frames it took (also added to ``handled`` as taken)."""
    await inline.wait()
    got: list[str] = []

    def took(text: str) -> None:
        got.append(text)
        if handled is not None:
            handled.add(text)

    inline.reader_active = True
    try:
        held, inline.held = inline.held, None
        if held is not None:
            took(held.data)
        while inline.pending():
            msg = await ws.receive()
            if msg.type is not aiohttp.WSMsgType.TEXT:
                took(f"<{msg.type.name}>")
                break
            took(msg.data)
    finally:
        inline.reader_active = False
    inline.drain()
    return got


async def test_inline_frames_attach_to_the_installed_aiohttp_and_detach_cleanly():
    async with raw_socket() as (_, _, ws):
        protocol = parser_holder(ws)
        parser = protocol._payload_parser
        inline = attach(ws, Taker())
        assert protocol._payload_parser is inline
        inline.detach()
        assert protocol._payload_parser is parser
        assert inline.stopped


async def test_attach_is_refused_when_switched_off(monkeypatch: pytest.MonkeyPatch):
    monkeypatch.setattr(_inline, "ENABLED", False)
    async with raw_socket() as (_, _, ws):
        parser = parser_holder(ws)._payload_parser
        assert InlineFrames.attach(ws, Taker()) is None
        assert parser_holder(ws)._payload_parser is parser


async def test_text_frames_are_taken_in_order_in_the_data_callback_not_in_a_task():
    async with raw_socket() as (_, record, ws):
        taker = Taker()
        inline = attach(ws, taker)
        texts = [f"frame {i}" for i in range(50)]
        for text in texts:
            assert await record.send_raw(text)
        await taker.wait_taken(len(texts))
        assert taker.taken == texts
        assert not any(taker.in_task)  # all handled in aiohttp's callback
        assert not inline.pending()


async def test_a_frame_handed_back_and_those_after_it_reach_the_reader_in_order():
    texts = [f"frame {i}" for i in range(30)]
    handled = Handled(len(texts))
    async with raw_socket() as (_, record, ws):
        taker = Taker(hand_back=lambda text: text.endswith("7"), handled=handled)
        inline = attach(ws, taker)
        by_reader: list[str] = []

        async def reader() -> None:
            while True:
                by_reader.extend(await reader_turn(inline, ws, handled))

        async with anyio.create_task_group() as tg:
            tg.start_soon(reader)
            for text in texts:
                assert await record.send_raw(text)
            with anyio.fail_after(5):
                await handled.complete.wait()
            tg.cancel_scope.cancel()
        # Every frame once, in the order sent: after a hand-back the callback takes
        # nothing until the reader has taken that frame and those queued behind it.
        assert handled.texts == texts
        assert {"frame 7", "frame 17", "frame 27"} <= set(by_reader)
        assert set(taker.taken).isdisjoint(by_reader)
        assert not any(taker.in_task)


async def test_a_ping_wakes_the_reader_and_text_after_it_still_arrives():
    async with raw_socket() as (_, record, ws):
        taker = Taker()
        inline = attach(ws, taker)
        server_ws = record._conn.ws  # type: ignore[union-attr]
        await server_ws.ping(b"are you there")
        with anyio.fail_after(5):
            await inline.wait()  # a control frame is the reader's
            assert inline.pending()
            inline.reader_active = True
            receiving = asyncio.ensure_future(ws.receive())  # pongs, then waits for text
            assert await record.send_raw("after the ping")
            msg = await receiving
            inline.reader_active = False
        assert msg.type is aiohttp.WSMsgType.TEXT and msg.data == "after the ping"
        assert taker.taken == []
        inline.drain()
        assert await record.send_raw("inline again")
        await taker.wait_taken(1)
        assert taker.taken == ["inline again"]


async def test_the_end_of_the_stream_wakes_the_reader():
    async with raw_socket() as (_, record, ws):
        inline = attach(ws, Taker())
        await record.drop()
        with anyio.fail_after(5):
            assert await reader_turn(inline, ws) in (["<CLOSED>"], ["<CLOSE>"], ["<ERROR>"])


async def test_an_error_raised_by_on_text_is_kept_for_the_reader_and_stops_inline():
    def explode(msg: aiohttp.WSMessage) -> int:
        raise KeyError("a bug in the handler")

    async with raw_socket() as (_, record, ws):
        inline = attach(ws, explode)
        assert await record.send_raw("boom")
        with anyio.fail_after(5):
            await inline.wait()
        assert isinstance(inline.error, KeyError) and inline.stopped
        assert await record.send_raw("not taken")
        with anyio.fail_after(5):
            msg = await ws.receive()  # stopped: later frames stay in aiohttp's queue
        assert msg.data == "not taken"


async def test_a_cancelled_wait_lets_close_skip_the_servers_reply():
    async with raw_socket() as (_, record, ws):
        inline = attach(ws, Taker())
        record.pause_reading()  # the server will never answer our Close
        with anyio.move_on_after(0.05):
            await inline.wait()
        inline.detach()
        with anyio.fail_after(2):  # not the default 10 s close timeout
            await ws.close()
        assert ws.close_code == aiohttp.WSCloseCode.ABNORMAL_CLOSURE


async def test_a_frame_that_ends_the_socket_stops_inline_and_wakes_the_reader():
    taken: list[str] = []

    def end_at_two(msg: aiohttp.WSMessage) -> int:
        taken.append(msg.data)
        return ENDED if msg.data == "2" else TAKEN

    async with raw_socket() as (_, record, ws):
        inline = attach(ws, end_at_two)
        for text in ("1", "2", "3"):
            assert await record.send_raw(text)
        with anyio.fail_after(5):
            await inline.wait()
            assert inline.stopped and inline.error is None and inline.held is None
            msg = await ws.receive()  # left in aiohttp's queue, for whoever closes
        assert taken == ["1", "2"] and msg.data == "3"
