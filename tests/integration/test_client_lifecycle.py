"""ConvexClient lifecycle: fatal errors, closing in any order, unusable URLs."""

from __future__ import annotations

import asyncio
from typing import Any

import anyio
import pytest
from aiohttp import web

from dartvex_auth_better import (
    ClientClosedError,
    ConnectionState,
    ConvexClient,
    ServerFatalError,
    TransportError,
)
from dartvex_auth_better.testing import LocalConvex

pytestmark = [pytest.mark.anyio]


def sdk_tasks() -> list[asyncio.Task[Any]]:
    return [
        t
        for t in asyncio.all_tasks()
        if not t.done() and t.get_name().startswith("dartvex_auth_better.convex")
    ]


async def test_fatal_error_fails_everything_with_the_servers_message():
    gate = asyncio.Event()
    async with LocalConvex() as convex:

        @convex.query("q:get")
        def get(ctx: Any, args: dict[str, Any]) -> int:
            return 1

        @convex.mutation("m:slow")
        async def slow(ctx: Any, args: dict[str, Any]) -> int:
            await gate.wait()
            return 1

        async with ConvexClient(convex.url) as client:
            subscription = client.subscribe("q:get")
            with anyio.fail_after(5):
                assert await subscription.next() == 1
            outcome: list[BaseException] = []

            async def mutate() -> None:
                try:
                    await client.mutation("m:slow")
                except BaseException as exc:
                    outcome.append(exc)

            async with anyio.create_task_group() as tg:
                tg.start_soon(mutate)
                record = await convex.wait_for_connections(1)
                await record.wait_for_frame("Mutation")
                await convex.send_fatal_error("boom: unsupported client")
            gate.set()
            assert isinstance(outcome[0], ServerFatalError)
            assert "boom: unsupported client" in str(outcome[0])
            with pytest.raises(ServerFatalError):
                await subscription.next()
            with pytest.raises(ServerFatalError):
                await client.query("q:get")
            assert client.connection_state is ConnectionState.FATAL
            # The background tasks wind down by themselves after a fatal error.
            pending = sdk_tasks()
            if pending:
                _, still = await asyncio.wait(pending, timeout=5)
                assert not still
        assert len(convex.connections) == 1  # no reconnect after a fatal error


async def test_clients_close_in_any_order_and_from_other_tasks():
    async with LocalConvex() as convex:

        @convex.query("q:get")
        def get(ctx: Any, args: dict[str, Any]) -> int:
            return 1

        first = await ConvexClient(convex.url).__aenter__()
        second = await ConvexClient(convex.url).__aenter__()
        with anyio.fail_after(5):
            assert await first.query("q:get") == 1
            assert await second.query("q:get") == 1
        await first.aclose()  # not last-in-first-out
        assert await second.query("q:get") == 1  # the caller's task is unharmed

        async def close_elsewhere() -> None:
            await second.aclose()

        async with anyio.create_task_group() as tg:
            tg.start_soon(close_elsewhere)
        with pytest.raises(ClientClosedError):
            await second.query("q:get")
        assert sdk_tasks() == []


async def test_closing_while_calls_are_pending_fails_them_typed():
    async with LocalConvex() as convex:
        convex.pause()
        async with ConvexClient(convex.url) as client:
            results: list[BaseException] = []

            async def call() -> None:
                try:
                    await client.mutation("m:any")
                except BaseException as exc:
                    results.append(exc)

            async with anyio.create_task_group() as tg:
                for _ in range(3):
                    tg.start_soon(call)
                await anyio.wait_all_tasks_blocked()
                await client.aclose()
        assert len(results) == 3 and all(isinstance(r, ClientClosedError) for r in results)


async def test_a_url_that_is_not_a_sync_endpoint_fails_fast():
    app = web.Application()  # answers every path with 404
    runner = web.AppRunner(app)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    port = site._server.sockets[0].getsockname()[1]  # type: ignore[union-attr]
    try:
        async with ConvexClient(f"http://127.0.0.1:{port}") as client:
            with anyio.fail_after(5), pytest.raises(TransportError) as caught:
                await client.query("q:get")
        assert "HTTP 404" in str(caught.value)
        assert not caught.value.retryable
        assert client.connection_state is ConnectionState.CLOSED
    finally:
        await runner.cleanup()
