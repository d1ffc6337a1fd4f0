"""ConvexClient lifecycle: fatal errors, closing in any order, unusable URLs."""

from __future__ import annotations

import asyncio
import gc
from typing import Any

import anyio
import anyio.lowlevel
import pytest
from aiohttp import web

from dartvex_auth_better import (
    AuthRejectedError,
    ClientClosedError,
    ConnectionState,
    ConvexClient,
    ServerFatalError,
    TransportError,
)
from dartvex_auth_better.testing import LocalConvex, TestTokenIssuer

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


async def test_calls_run_under_the_identity_set_before_them():
    issuer = TestTokenIssuer()
    async with LocalConvex(jwks=issuer.jwks, issuer=issuer.issuer) as convex:
        writers: list[str | None] = []

        @convex.mutation("m:who")
        def who(ctx: Any, args: dict[str, Any]) -> None:
            identity = ctx.auth.get_user_identity()
            writers.append(identity["subject"] if identity else None)

        async with ConvexClient(convex.url) as client:
            with anyio.fail_after(10):
                await client.wait_connected()
                async with anyio.create_task_group() as tg:
                    tg.start_soon(client.set_auth, issuer.mint("alice"))
                    await anyio.lowlevel.checkpoint()
                    tg.start_soon(client.mutation, "m:who")
                    await anyio.lowlevel.checkpoint()
                    tg.start_soon(client.set_auth, issuer.mint("bob"))
                    await anyio.lowlevel.checkpoint()
                    tg.start_soon(client.mutation, "m:who")
    assert writers == ["alice", "bob"]


async def test_a_mutation_cancelled_before_it_is_written_is_never_applied():
    async with LocalConvex() as convex:
        applied: list[int] = []

        @convex.mutation("m:inc")
        def inc(ctx: Any, args: dict[str, Any]) -> None:
            applied.append(1)

        @convex.query("q:count")
        def count(ctx: Any, args: dict[str, Any]) -> int:
            return len(applied)

        async with ConvexClient(convex.url) as client:
            with anyio.fail_after(10):
                await client.wait_connected()
                with anyio.move_on_after(0):
                    await client.mutation("m:inc")
                await client.mutation("m:inc")  # a later one goes through
                assert await client.query("q:count") == 1
    assert applied == [1]


async def test_query_after_a_reconnect_asks_the_server_again():
    async with LocalConvex() as convex:

        @convex.query("q:count")
        def count(ctx: Any, args: dict[str, Any]) -> int:
            return len(ctx.db.query("rows"))

        async with ConvexClient(convex.url, initial_backoff=0.05) as client:
            live = client.subscribe("q:count")
            with anyio.fail_after(10):
                assert await live.next() == 0
                convex.pause()
                convex.db.insert("rows", {"n": 1})  # the live subscription has not seen it
                await convex.drop_connections()
                convex.resume()
                await convex.wait_for_connections(2)
                # The live value (0) is from before the reconnect: query() must not use it.
                assert await client.query("q:count") == 1
            live.close()


async def test_an_expired_fixed_token_fails_calls_instead_of_running_them_anonymously():
    issuer = TestTokenIssuer()
    async with LocalConvex(jwks=issuer.jwks, issuer=issuer.issuer) as convex:
        writers: list[str | None] = []

        @convex.mutation("m:who")
        def who(ctx: Any, args: dict[str, Any]) -> None:
            identity = ctx.auth.get_user_identity()
            writers.append(identity["subject"] if identity else None)

        async with ConvexClient(convex.url) as client:
            with anyio.fail_after(10):
                await client.set_auth(issuer.mint("alice"))
                await client.mutation("m:who")
                # The server says the identity's token expired while it was in use.
                gate = asyncio.Event()
                results: list[BaseException | None] = []

                async def call() -> None:
                    try:
                        await client.mutation("m:who")
                        results.append(None)
                    except BaseException as exc:
                        results.append(exc)
                    finally:
                        gate.set()

                async with anyio.create_task_group() as tg:
                    convex.pause()
                    tg.start_soon(call)
                    record = await convex.wait_for_connections(1)
                    await record.wait_for_frame("Mutation", after=len(record.frames) - 1)
                    convex.resume()
                    await convex.send_auth_error("token expired", auth_update_attempted=False)
                    await gate.wait()
    assert writers == ["alice"]
    assert isinstance(results[0], AuthRejectedError)


async def test_a_subscription_never_iterated_is_released_when_dropped():
    async with LocalConvex() as convex:

        @convex.query("q:get")
        def get(ctx: Any, args: dict[str, Any]) -> int:
            return 1

        async with ConvexClient(convex.url) as client:
            subscription = client.subscribe("q:get")
            record = await convex.wait_for_connections(1)
            with anyio.fail_after(5):
                await record.wait_for_frame(
                    "ModifyQuerySet", predicate=lambda f: bool(f["modifications"])
                )
            del subscription
            gc.collect()
            with anyio.fail_after(5):
                await record.wait_for_frame(
                    "ModifyQuerySet",
                    predicate=lambda f: any(m["type"] == "Remove" for m in f["modifications"]),
                )


async def test_a_silent_server_is_dropped_after_the_inactivity_timeout():
    async with LocalConvex(ping_interval=60) as convex:

        @convex.query("q:get")
        def get(ctx: Any, args: dict[str, Any]) -> int:
            return 1

        async with ConvexClient(convex.url, inactivity_timeout=0.5, initial_backoff=0.05) as client:
            with anyio.fail_after(10):
                assert await client.query("q:get") == 1
                convex.pause()  # accepts frames, answers nothing
                await convex.wait_for_connections(2)
                convex.resume()
                second = convex.connections[1]
                connect = await second.wait_for_frame("Connect")
                assert await client.query("q:get") == 1
    assert connect["lastCloseReason"] == "InactiveServer"
    assert connect["connectionCount"] == 1
