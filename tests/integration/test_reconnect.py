"""How the socket loop ends a socket and what the next one says about it: reconnect
reasons and delays, send failures, the protocol guard, chunk runs, timeouts and keepalive.

A real ConvexClient against a real LocalConvex over real sockets. Faults are injected per
socket (``ConnectionRecord.close/drop/send_raw/pause_reading``, ``hold_handshakes``);
waiting is on frames, status changes and server events under ``anyio.fail_after``. The
chosen reconnect delay is read from the client's own log line, so a band can be checked
without waiting out a long backoff.
"""

from __future__ import annotations

import asyncio
import logging
import re
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from typing import Any

import anyio
import msgspec
import pytest

from dartvex_auth_better import (
    ConnectionLostError,
    ConnectionState,
    ConnectionStatus,
    ConvexClient,
    DartvexError,
    ProtocolError,
    ServerFatalError,
)
from dartvex_auth_better.testing import LocalConvex
from dartvex_auth_better.testing._convex_server import ActionCtx, ConnectionRecord, QueryCtx

pytestmark = [pytest.mark.anyio, pytest.mark.integration, pytest.mark.usefixtures("frame_reading")]

DEADLINE = 10.0
WS_LOGGER = "dartvex_auth_better.convex.ws"
ZERO = {"querySet": 0, "identity": 0, "ts": "AAAAAAAAAAA="}
# Decodes fine, but starts at a version no client is at: an InvalidServerMessage.
BAD_TRANSITION = msgspec.json.encode(
    {
        "type": "Transition",
        "startVersion": {**ZERO, "querySet": 99},
        "endVersion": {**ZERO, "querySet": 100},
        "modifications": [],
    }
)


def install(convex: LocalConvex) -> None:
    @convex.query("q:get")
    def get(ctx: QueryCtx, args: dict[str, Any]) -> int:
        return 1

    @convex.query("q:text")
    def text(ctx: QueryCtx, args: dict[str, Any]) -> str:
        return "h\u00e9llo \u2713 \U0001f389"

    @convex.query("q:big")
    def big(ctx: QueryCtx, args: dict[str, Any]) -> str:
        return "x" * int(args["n"])

    @convex.action("a:echo")
    def echo(ctx: ActionCtx, args: dict[str, Any]) -> int:
        return len(args["blob"])


@asynccontextmanager
async def running(
    server: dict[str, Any] | None = None, **client_options: Any
) -> AsyncIterator[tuple[LocalConvex, ConvexClient]]:
    with anyio.fail_after(DEADLINE):
        async with LocalConvex(**(server or {})) as convex:
            install(convex)
            async with ConvexClient(convex.url, **client_options) as client:
                yield convex, client


async def wait_status(
    client: ConvexClient, predicate: Callable[[ConnectionStatus], bool]
) -> ConnectionStatus:
    async for status in client.connection_statuses():
        if predicate(status):
            return status
    raise AssertionError("the status stream ended")


async def synced_on(client: ConvexClient, connection: int) -> None:
    """Wait until the client is connected and synced on its ``connection``-th socket."""
    await wait_status(
        client, lambda s: s.is_connected and s.synced and s.connection_count == connection
    )


async def next_connect(convex: LocalConvex, n: int) -> dict[str, Any]:
    """The Connect frame of the ``n``-th socket (waits for it)."""
    record = await convex.wait_for_connections(n)
    return await record.wait_for_frame("Connect")


def reconnect_delays(caplog: pytest.LogCaptureFixture) -> list[float]:
    """Every reconnect delay the client chose, from its log, in order."""
    delays = []
    for record in caplog.records:
        if record.name == WS_LOGGER:
            found = re.search(r"reconnecting in ([0-9.]+) s", record.getMessage())
            if found:
                delays.append(float(found.group(1)))
    return delays


@pytest.fixture
def ws_log(caplog: pytest.LogCaptureFixture) -> pytest.LogCaptureFixture:
    caplog.set_level(logging.INFO, logger=WS_LOGGER)
    return caplog


# -- the status stream ----------------------------------------------------------------------


async def test_the_status_stream_starts_with_the_status_now():
    async with running() as (_, client):
        # Synced while nobody watched the stream.
        assert await client.query("q:get") == 1
        assert client.connection_status.synced
        async for status in client.connection_statuses():
            assert status == client.connection_status
            break


# -- server closes: reasons and backoff -------------------------------------------------------


async def test_an_overload_close_backs_off_in_its_band_and_is_reported(ws_log):
    # initial_backoff scales the server-side starts: 0.1 s here, so an overload reason
    # starts at 0.3 s, jittered into [0.15, 0.45); an ordinary one into [0.05, 0.15).
    async with running(initial_backoff=0.1) as (convex, client):
        assert await client.query("q:get") == 1
        await synced_on(client, 1)
        started = time.monotonic()
        await convex.connections[0].close(1011, "SubscriptionsWorkerFullError")
        connect = await next_connect(convex, 2)
        elapsed = time.monotonic() - started
        assert connect["lastCloseReason"] == "SubscriptionsWorkerFullError"
        [delay] = reconnect_delays(ws_log)
        assert 0.15 <= delay <= 0.45
        assert elapsed >= delay - 0.01  # it really waited


async def test_a_code_only_close_is_reported_with_its_code(ws_log):
    async with running(initial_backoff=0.1) as (convex, client):
        await synced_on(client, 1)
        await convex.connections[0].close(4001, "")
        connect = await next_connect(convex, 2)
        assert connect["lastCloseReason"] == "closed with code 4001"
        [delay] = reconnect_delays(ws_log)
        assert 0.05 <= delay <= 0.15  # a server-caused start (0.1 s here)


async def test_a_close_with_no_status_is_reported_as_1005(ws_log):
    async with running(initial_backoff=0.1) as (convex, client):
        await synced_on(client, 1)
        await convex.connections[0].close(None)  # aiohttp reports this as code 0
        connect = await next_connect(convex, 2)
        assert connect["lastCloseReason"] == "closed with code 1005"


async def test_a_websocket_protocol_error_reconnects(ws_log):
    # A text frame that is not UTF-8: aiohttp reports WSMsgType.ERROR.
    async with running() as (convex, client):
        await synced_on(client, 1)
        assert await convex.connections[0].send_raw(b"\xff\xfe")
        connect = await next_connect(convex, 2)
        assert connect["lastCloseReason"] == "WebSocketError"
        [delay] = reconnect_delays(ws_log)
        assert delay <= 0.15  # client-caused: the 100 ms start
        assert await client.query("q:get") == 1


async def test_a_text_frame_that_is_not_ascii_is_read_as_utf8():
    # aiohttp decodes text frames; a value with accents, symbols and emoji survives it.
    async with running() as (convex, client):
        assert await client.query("q:text") == "h\u00e9llo \u2713 \U0001f389"
        async for value in client.subscribe("q:text"):
            assert value == "h\u00e9llo \u2713 \U0001f389"
            break
        assert len(convex.connections) == 1


# -- big frames and keepalive -------------------------------------------------------------------


async def test_a_six_megabyte_query_result_arrives_in_one_frame():
    async with running() as (convex, client):
        assert convex.transition_chunk_size is None
        result = await client.query("q:big", {"n": 6_000_000})
        assert len(result) == 6_000_000
        assert len(convex.connections) == 1  # no size cap tripped, no reconnect


async def test_server_pings_keep_an_idle_socket_alive():
    async with running({"ping_interval": 0.1}, inactivity_timeout=0.5) as (convex, client):
        assert await client.query("q:get") == 1
        # What is under test is that nothing happens: let 4x the timeout pass.
        await anyio.sleep(2.0)
        assert len(convex.connections) == 1
        assert client.connection_state is ConnectionState.CONNECTED


# -- reconnect_now ------------------------------------------------------------------------------


async def test_a_reconnect_requested_during_a_connect_does_not_leak_into_a_later_close(ws_log):
    with anyio.fail_after(DEADLINE):
        async with LocalConvex() as convex:
            install(convex)
            convex.hold_handshakes()
            async with ConvexClient(convex.url, initial_backoff=0.1) as client:
                await convex.wait_for_handshake_attempts(1)
                client.reconnect_now("Early")  # mid-connect: only the reason is kept
                convex.release_handshakes()
                assert await client.query("q:get") == 1
                assert (await next_connect(convex, 1))["lastCloseReason"] == "Early"  # once
                await synced_on(client, 1)

                await convex.connections[0].close(1011, "SubscriptionsWorkerFullError")
                # The server's close is the server's: its reason, its (overload) backoff.
                second = await next_connect(convex, 2)
                assert second["lastCloseReason"] == "SubscriptionsWorkerFullError"
                [delay] = reconnect_delays(ws_log)
                assert 0.15 <= delay <= 0.45
                assert len(convex.connections) == 2


# -- send failures --------------------------------------------------------------------------------


async def cut_off_a_big_action(
    convex: LocalConvex,
    client: ConvexClient,
    fault: Callable[[ConnectionRecord], Awaitable[object]] = ConnectionRecord.drop,
) -> tuple[list[BaseException | int], dict[str, Any] | None]:
    """Stall the socket under a big Action frame, then apply ``fault`` (by default: cut
    it); returns the action's outcome and the next socket's Connect (None when the client
    ended instead)."""
    await synced_on(client, 1)
    first = convex.connections[0]
    frames_before = first.raw_frame_count
    first.pause_reading()  # a stalled network: the client's big write cannot finish
    outcome: list[BaseException | int] = []

    async def call() -> None:
        try:
            outcome.append(await client.action("a:echo", {"blob": "x" * 16_000_000}))
        except DartvexError as exc:
            outcome.append(exc)

    connect = None
    async with anyio.create_task_group() as tg:
        tg.start_soon(call)
        await anyio.wait_all_tasks_blocked()  # the writer is stuck mid-frame
        assert outcome == [] and first.raw_frame_count == frames_before
        await fault(first)
        with anyio.move_on_after(5):
            async for status in client.connection_statuses():
                if status.state is ConnectionState.FATAL:
                    break
                if len(convex.connections) > 1:
                    connect = await next_connect(convex, 2)
                    break
    return outcome, connect


async def test_an_action_whose_write_was_cut_off_fails_and_is_not_sent_again():
    async with running() as (convex, client):
        outcome, _ = await cut_off_a_big_action(convex, client)
        # The frame was on its way: the action may have run, so it is not sent again.
        assert len(outcome) == 1 and isinstance(outcome[0], ConnectionLostError), outcome
        await synced_on(client, 2)
        assert convex.connections[1].frames_of_type("Action") == []


async def test_a_failed_send_is_a_client_caused_reconnect(ws_log):
    async with running() as (convex, client):
        _, connect = await cut_off_a_big_action(convex, client)
        assert connect is not None and connect["lastCloseReason"] == "FailedToSendMessage"
        [delay] = reconnect_delays(ws_log)
        assert delay <= 0.15  # the client's 100 ms start, not the server's 1 s


# -- TransitionChunk runs over the wire ------------------------------------------------------------


def writer_tasks() -> list[asyncio.Task[Any]]:
    return [t for t in asyncio.all_tasks() if t.get_name() == "dartvex_auth_better.convex.writer"]


async def test_a_writer_task_runs_only_while_a_write_waits_for_the_network():
    async with running() as (convex, client):
        await synced_on(client, 1)
        assert await client.query("q:get") == 1
        assert writer_tasks() == []  # every frame so far was written by its caller
        first = convex.connections[0]
        first.pause_reading()
        outcome: list[int] = []

        async def call() -> None:
            outcome.append(await client.action("a:echo", {"blob": "x" * 16_000_000}))

        async with anyio.create_task_group() as tg:
            tg.start_soon(call)
            await anyio.wait_all_tasks_blocked()
            assert len(writer_tasks()) == 1  # finishing the big frame
            first.resume_reading()
        assert outcome == [16_000_000]
        await anyio.wait_all_tasks_blocked()
        assert writer_tasks() == []  # it ended with its work
        assert await client.query("q:get") == 1  # written by the caller again
        assert writer_tasks() == [] and len(convex.connections) == 1


def chunk_frame(text: str, part: int, total: int, transition_id: str = "t") -> bytes:
    return msgspec.json.encode(
        {
            "type": "TransitionChunk",
            "chunk": text,
            "partNumber": part,
            "totalParts": total,
            "transitionId": transition_id,
        }
    )


@pytest.mark.parametrize(
    "frames",
    [
        [chunk_frame("{", 1, 2)],  # a part out of order
        [chunk_frame("{", 0, 2), chunk_frame("}", 1, 2, "other")],  # another id
        [chunk_frame("{", 0, 2), chunk_frame("}", 1, 3)],  # another total
        [chunk_frame("{", 0, 2), b'{"type":"Ping"}'],  # another message mid-run
        [chunk_frame('{"type":', 0, 2), chunk_frame('"Ping"}', 1, 2)],  # not a Transition
    ],
    ids=["out-of-order", "mismatched-id", "mismatched-total", "interleaved", "not-transition"],
)
async def test_a_broken_chunk_run_is_an_invalid_server_message(frames: list[bytes], ws_log):
    async with running() as (convex, client):
        await synced_on(client, 1)
        for frame in frames:
            assert await convex.connections[0].send_raw(frame)
        connect = await next_connect(convex, 2)
        assert connect["lastCloseReason"] == "InvalidServerMessage"
        [delay] = reconnect_delays(ws_log)
        assert delay <= 0.15  # client-caused
        assert await client.query("q:get") == 1


async def test_a_fatal_error_in_the_middle_of_a_chunk_run_is_fatal():
    async with running() as (convex, client):
        await synced_on(client, 1)
        record = convex.connections[0]
        assert await record.send_raw(chunk_frame("{", 0, 2))
        assert await record.send_raw(b'{"type":"FatalError","error":"boom mid-run"}')
        with pytest.raises(ServerFatalError, match="boom mid-run"):
            await client.query("q:get")
        assert client.connection_state is ConnectionState.FATAL
        assert len(convex.connections) == 1  # never reconnected


# -- the protocol guard ------------------------------------------------------------------------


async def test_a_server_that_syncs_then_sends_garbage_every_time_is_given_up_on(ws_log):
    async with running() as (convex, client):
        subscription = client.subscribe("q:get")
        assert await subscription.next() == 1
        for n in (1, 2, 3):
            # Each socket syncs (the backoff resets), then breaks the protocol.
            await synced_on(client, n)
            assert await convex.connections[n - 1].send_raw(BAD_TRANSITION)
        with pytest.raises(ProtocolError, match="kept sending invalid messages"):
            while True:  # each new socket re-delivers the value; then the client gives up
                assert await subscription.next() == 1
        assert client.connection_state is ConnectionState.FATAL
        with pytest.raises(ProtocolError):
            await client.query("q:get")
        assert len(convex.connections) == 3
        assert len(reconnect_delays(ws_log)) == 2  # two quick retries, then it stopped


async def test_protocol_failures_apart_from_each_other_do_not_add_up(ws_log):
    async with running(initial_backoff=0.1) as (convex, client):
        assert await client.query("q:get") == 1
        for n in (1, 2, 3, 4):
            await synced_on(client, n)
            if n % 2:
                assert await convex.connections[n - 1].send_raw(BAD_TRANSITION)
            else:
                # A socket that ends for another reason breaks the streak.
                await convex.connections[n - 1].close(1011, "InternalServerError")
        await synced_on(client, 5)
        assert await convex.connections[4].send_raw(BAD_TRANSITION)
        await synced_on(client, 6)
        assert client.connection_state is ConnectionState.CONNECTED
        assert await client.query("q:get") == 1


async def test_a_protocol_failure_after_a_stable_period_starts_a_new_streak(monkeypatch):
    from dartvex_auth_better.convex import _client

    # Every socket counts as having worked long enough (the real period is 60 s).
    monkeypatch.setattr(_client, "_STABLE_SOCKET_SECONDS", 0.0)
    async with running() as (convex, client):
        assert await client.query("q:get") == 1
        for n in (1, 2, 3, 4):
            await synced_on(client, n)
            assert await convex.connections[n - 1].send_raw(BAD_TRANSITION)
        await synced_on(client, 5)
        assert client.connection_state is ConnectionState.CONNECTED


# -- connecting ---------------------------------------------------------------------------------


async def test_a_connect_that_hangs_times_out_and_is_retried(ws_log):
    with anyio.fail_after(DEADLINE):
        async with LocalConvex() as convex:
            install(convex)
            convex.hold_handshakes()  # TCP accepted, the upgrade never answered
            async with ConvexClient(
                convex.url, connect_timeout=0.2, initial_backoff=0.05
            ) as client:
                await convex.wait_for_handshake_attempts(2)  # the first one timed out
                assert convex.connections == []
                assert client.connection_state is ConnectionState.RECONNECTING
                convex.release_handshakes()
                assert await client.query("q:get") == 1
                connect = convex.connections[0].frames[0]
                assert connect["lastCloseReason"] == "ConnectTimeout after 200ms"
                # A server-side start (scaled to 0.05 s here), not the client's 100 ms.
                assert 0.025 <= reconnect_delays(ws_log)[0] <= 0.075


async def test_a_write_stuck_on_a_silent_server_ends_as_inactive_server():
    async with running(inactivity_timeout=0.5) as (convex, client):

        async def stay_silent(record: ConnectionRecord) -> None:
            pass  # the server sends nothing: the client's inactivity timer fires

        outcome, connect = await cut_off_a_big_action(convex, client, stay_silent)
        assert connect is not None and connect["lastCloseReason"] == "InactiveServer"
        assert len(outcome) == 1 and isinstance(outcome[0], ConnectionLostError)


async def test_a_fatal_error_wins_over_a_write_stuck_at_the_same_time():
    async with running() as (convex, client):

        async def fatal(record: ConnectionRecord) -> None:
            # What the server does: FatalError, then a Close with no status.
            assert await record.send_raw(b'{"type":"FatalError","error":"stop"}')
            await record.close(None)

        outcome, connect = await cut_off_a_big_action(convex, client, fatal)
        assert connect is None and client.connection_state is ConnectionState.FATAL
        assert len(outcome) == 1 and isinstance(outcome[0], ServerFatalError)
        assert len(convex.connections) == 1
