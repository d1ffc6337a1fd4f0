"""ConvexClient against a real LocalConvex over real sockets; no mocks of our code.

Ports the client-level edge cases of the Dart original (test/client_test.dart,
test/transport/ws_manager_test.dart, test/conformance/protocol_conformance_test.dart):
reconnect replay, actions failing on a drop, read-your-writes, chunk reassembly, FatalError,
coalescing, the query-set version chain, connection status counters, cancellation, closing
with calls pending, and optimistic updates end to end. What went over the wire is read from
LocalConvex's per-connection frame records. Waiting is on events, frames and status changes
under ``anyio.fail_after``; reconnects are triggered with ``reconnect_now()`` once the client
has noticed a drop, so no test waits out a backoff.
"""

from __future__ import annotations

import asyncio
import gc
import sys
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from typing import Any

import anyio
import pytest

from dartvex_auth_better import (
    ClientClosedError,
    ConnectionLostError,
    ConnectionState,
    ConnectionStatus,
    ConvexClient,
    ConvexError,
    DartvexError,
    OptimisticLocalStore,
    ServerFatalError,
    Subscription,
)
from dartvex_auth_better.testing import LocalConvex, TestTokenIssuer
from dartvex_auth_better.testing._convex_server import (
    ActionCtx,
    ConnectionRecord,
    MutationCtx,
    QueryCtx,
)

pytestmark = [pytest.mark.anyio, pytest.mark.integration, pytest.mark.usefixtures("frame_reading")]

DEADLINE = 10.0


class App:
    """LocalConvex with a small app, plus gates and counters the tests steer it with."""

    def __init__(self, convex: LocalConvex) -> None:
        self.convex = convex
        self.calls: dict[str, int] = {}
        self.gate = asyncio.Event()  # releases gated:write and jobs:slow
        self.entered = asyncio.Event()  # set when a gated function starts running

        def count(name: str) -> None:
            self.calls[name] = self.calls.get(name, 0) + 1

        @convex.query("messages:list")
        def list_messages(ctx: QueryCtx, args: dict[str, Any]) -> list[str]:
            return [m["body"] for m in ctx.db.query("messages")]

        @convex.mutation("messages:send")
        def send(ctx: MutationCtx, args: dict[str, Any]) -> str:
            count("messages:send")
            return ctx.db.insert("messages", {"body": args["body"]})

        @convex.mutation("messages:reject")
        def reject(ctx: MutationCtx, args: dict[str, Any]) -> None:
            count("messages:reject")
            raise ConvexError("rejected", data={"code": "NOPE"})

        @convex.mutation("gated:write")
        async def gated_write(ctx: MutationCtx, args: dict[str, Any]) -> str:
            count("gated:write")
            self.entered.set()
            await self.gate.wait()
            return ctx.db.insert("messages", {"body": args["body"]})

        @convex.action("jobs:slow")
        async def slow(ctx: ActionCtx, args: dict[str, Any]) -> str:
            count("jobs:slow")
            self.entered.set()
            await self.gate.wait()
            return "done"

        @convex.action("jobs:echo")
        def echo(ctx: ActionCtx, args: dict[str, Any]) -> Any:
            return args

        @convex.query("echo:args")
        def echo_args(ctx: QueryCtx, args: dict[str, Any]) -> Any:
            return args

        @convex.query("big:text")
        def big(ctx: QueryCtx, args: dict[str, Any]) -> str:
            bodies = "".join(m["body"] for m in ctx.db.query("messages"))
            return "0123456789" * 500 + bodies

        @convex.query("users:whoami")
        def whoami(ctx: QueryCtx, args: dict[str, Any]) -> Any:
            identity = ctx.auth.get_user_identity()
            return None if identity is None else identity["subject"]

    def messages(self) -> list[str]:
        return [m["body"] for m in self.convex.db.query("messages")]


@asynccontextmanager
async def running(**server_options: Any) -> AsyncIterator[tuple[App, ConvexClient]]:
    with anyio.fail_after(DEADLINE):
        async with LocalConvex(**server_options) as convex:
            app = App(convex)
            async with ConvexClient(convex.url) as client:
                yield app, client


async def wait_status(
    client: ConvexClient, predicate: Callable[[ConnectionStatus], bool]
) -> ConnectionStatus:
    async for status in client.connection_statuses():
        if predicate(status):
            return status
    raise AssertionError("the status stream ended")


async def wait_disconnected(client: ConvexClient) -> None:
    await wait_status(client, lambda s: s.state is ConnectionState.RECONNECTING)


async def bounce(app: App, client: ConvexClient) -> ConnectionRecord:
    """Cut the socket, let the client notice, reconnect at once; returns the new socket's
    record once the client's restart frames (through the ModifyQuerySet) arrived."""
    count = len(app.convex.connections)
    await app.convex.drop_connections()
    await wait_disconnected(client)
    client.reconnect_now()
    record = await app.convex.wait_for_connections(count + 1)
    await record.wait_for_frame("ModifyQuerySet")
    return record


def frame_types(record: ConnectionRecord) -> list[str]:
    return [f["type"] for f in record.frames]


def request_ids(record: ConnectionRecord, frame_type: str) -> list[int]:
    return [f["requestId"] for f in record.frames_of_type(frame_type)]


def adds(record: ConnectionRecord) -> list[dict[str, Any]]:
    return [
        m
        for f in record.frames_of_type("ModifyQuerySet")
        for m in f["modifications"]
        if m["type"] == "Add"
    ]


def removes(record: ConnectionRecord) -> list[int]:
    return [
        m["queryId"]
        for f in record.frames_of_type("ModifyQuerySet")
        for m in f["modifications"]
        if m["type"] == "Remove"
    ]


def add_item(body: str) -> Callable[[OptimisticLocalStore], None]:
    def update(store: OptimisticLocalStore) -> None:
        current = store.get_query("messages:list") or []
        store.set_query("messages:list", None, [*current, f"{body} (sending)"])

    return update


# -- reconnect ------------------------------------------------------------------------------


async def test_a_reconnect_replays_the_session_queries_and_unanswered_mutations():
    async with running() as (app, client):
        subscription = client.subscribe("messages:list")
        assert await subscription.next() == []
        first = app.convex.connections[0]

        app.convex.pause()  # the Mutation reaches the server but is never handled
        async with anyio.create_task_group() as tg:
            results: list[Any] = []

            async def send() -> None:
                results.append(await client.mutation("messages:send", {"body": "hi"}))

            tg.start_soon(send)
            mutation = await first.wait_for_frame("Mutation")
            await app.convex.drop_connections()
            app.convex.resume()
            await wait_disconnected(client)
            client.reconnect_now()
            second = await app.convex.wait_for_connections(2)

        connect = second.frames[0]
        assert frame_types(second)[:3] == ["Connect", "ModifyQuerySet", "Mutation"]
        assert connect["sessionId"] == first.frames[0]["sessionId"] and connect["sessionId"]
        assert (first.frames[0]["connectionCount"], connect["connectionCount"]) == (0, 1)
        assert first.frames[0]["lastCloseReason"] == "InitialConnect"
        assert isinstance(connect["clientTs"], int) and connect["clientTs"] > 0
        assert second.frames[1]["baseVersion"] == 0 and second.frames[1]["newVersion"] == 1
        assert adds(second) == adds(first)  # same query id, args and journal
        assert second.frames[2] == mutation  # same request id
        assert results and app.calls["messages:send"] == 1
        # Read-your-writes: the write was visible when mutation() returned.
        assert subscription.current() == ["hi"]


async def test_a_reconnect_replays_args_as_they_were_at_subscribe_time():
    async with running() as (app, client):
        args: dict[str, Any] = {"tags": ["a"]}
        subscription = client.subscribe("echo:args", args)
        args["tags"].append("b")
        assert await subscription.next() == {"tags": ["a"]}
        second = await bounce(app, client)
        assert [a["args"] for a in adds(second)] == [[{"tags": ["a"]}]]


async def test_a_reconnect_replays_a_fixed_token_once_before_the_queries():
    issuer = TestTokenIssuer()
    async with running(jwks=issuer.jwks, issuer=issuer.issuer) as (app, client):
        token = issuer.mint("user-1")
        await client.set_auth(token)
        subscription = client.subscribe("users:whoami")
        assert await subscription.next() == "user-1"
        second = await bounce(app, client)
        assert frame_types(second)[:3] == ["Connect", "Authenticate", "ModifyQuerySet"]
        authenticate = second.frames_of_type("Authenticate")
        assert len(authenticate) == 1
        assert authenticate[0]["baseVersion"] == 0 and authenticate[0]["value"] == token
        assert await client.query("users:whoami") == "user-1"


async def test_an_action_in_flight_fails_on_a_drop_and_is_not_resent():
    async with running() as (app, client):
        await client.wait_connected()
        async with anyio.create_task_group() as tg:
            errors: list[ConnectionLostError] = []

            async def run_action() -> None:
                try:
                    await client.action("jobs:slow")
                except ConnectionLostError as exc:
                    errors.append(exc)

            tg.start_soon(run_action)
            await app.entered.wait()
            second = await bounce(app, client)
        assert len(errors) == 1 and errors[0].retryable
        assert "jobs:slow" in str(errors[0])

        # A later call goes through; the action was never sent again.
        assert await client.action("jobs:echo", {"n": 1}) == {"n": 1}
        assert "Action" in frame_types(second)
        assert request_ids(second, "Action") == [1]
        assert app.calls["jobs:slow"] == 1


async def test_an_action_in_flight_fails_at_once_when_the_server_goes_away():
    # Without a server to reconnect to, the action must not wait for a socket that may
    # never come back.
    async with running() as (app, client):
        await client.wait_connected()
        async with anyio.create_task_group() as tg:
            outcome: list[ConnectionLostError] = []

            async def run_action() -> None:
                try:
                    await client.action("jobs:slow")
                except ConnectionLostError as exc:
                    outcome.append(exc)

            tg.start_soon(run_action)
            await app.entered.wait()
            await app.convex.aclose()
        assert len(outcome) == 1 and outcome[0].retryable
        assert client.connection_state is ConnectionState.RECONNECTING


async def test_a_mutation_made_while_disconnected_is_sent_after_the_reconnect():
    async with running() as (app, client):
        subscription = client.subscribe("messages:list")
        assert await subscription.next() == []
        await app.convex.drop_connections()
        await wait_disconnected(client)
        async with anyio.create_task_group() as tg:
            tg.start_soon(client.mutation, "messages:send", {"body": "queued"})
            await wait_status(client, lambda s: s.inflight_mutations == 1)
            assert client.connection_state is ConnectionState.RECONNECTING
            client.reconnect_now()
        second = app.convex.connections[1]
        assert frame_types(second)[:3] == ["Connect", "ModifyQuerySet", "Mutation"]
        assert subscription.current() == ["queued"]
        assert app.messages() == ["queued"]


async def test_calls_made_on_reconnecting_go_out_after_the_replayed_mutations():
    async with running() as (app, client):
        await client.wait_connected()
        await app.convex.drop_connections()
        await wait_disconnected(client)

        async with anyio.create_task_group() as tg:
            tg.start_soon(client.mutation, "messages:send", {"body": "replayed"})
            await wait_status(client, lambda s: s.inflight_mutations == 1)

            async def on_connected() -> None:
                await wait_status(client, lambda s: s.state is ConnectionState.CONNECTED)
                await client.mutation("messages:send", {"body": "from listener"})

            tg.start_soon(on_connected)
            await anyio.wait_all_tasks_blocked()
            client.reconnect_now()

        second = app.convex.connections[1]
        bodies = [f["args"][0]["body"] for f in second.frames_of_type("Mutation")]
        assert bodies == ["replayed", "from listener"]
        assert app.messages() == ["replayed", "from listener"]


async def test_an_invalid_transition_makes_the_client_reconnect_and_recover():
    async with running() as (app, client):
        subscription = client.subscribe("messages:list")
        assert await subscription.next() == []
        app.convex.wrong_start_version_once()
        assert await client.mutation("messages:send", {"body": "once"})
        second = await app.convex.wait_for_connections(2)
        assert second.frames[0]["lastCloseReason"] == "InvalidServerMessage"
        assert subscription.current() == ["once"]
        assert app.calls["messages:send"] == 1  # re-sent, de-duplicated by the server


@pytest.mark.parametrize("where", ["value", "errorData", "mutation result"])
async def test_json_nested_too_deeply_makes_the_client_reconnect_not_die(where: str):
    # msgspec raises RecursionError (not DecodeError) past ~1,000 levels: still a bad
    # server message, so the socket is dropped and the client carries on.
    deep = "[" * 3000 + "1" + "]" * 3000
    async with running() as (app, client):
        subscription = client.subscribe("messages:list")
        assert await subscription.next() == []
        first = app.convex.connections[0]
        version = '{"querySet":1,"identity":0,"ts":"AAAAAAAAAAA="}'
        if where == "mutation result":
            frame = (
                '{"type":"MutationResponse","requestId":0,"success":true,"result":'
                + deep
                + ',"ts":"AAAAAAAAAAA=","logLines":[]}'
            )
        else:
            modification = (
                '{"type":"QueryUpdated","queryId":0,"value":' + deep + ',"logLines":[]}'
                if where == "value"
                else '{"type":"QueryFailed","queryId":0,"errorMessage":"x","logLines":[],'
                '"errorData":' + deep + "}"
            )
            frame = (
                '{"type":"Transition","startVersion":'
                + version
                + ',"endVersion":'
                + version.replace('"querySet":1', '"querySet":2')
                + ',"modifications":['
                + modification
                + "]}"
            )
        assert await first.send_raw(frame)
        second = await app.convex.wait_for_connections(2)
        await second.wait_for_frame("Connect")
        assert second.frames[0]["lastCloseReason"] == "InvalidServerMessage"
        await client.mutation("messages:send", {"body": "after"})
        assert subscription.current() == ["after"]
        assert client.connection_state is ConnectionState.CONNECTED


async def test_transition_chunks_are_reassembled():
    async with running() as (app, client):
        app.convex.transition_chunk_size = 256  # every Transition becomes ~20+ chunks
        subscription = client.subscribe("big:text")
        first = await subscription.next()
        assert first == "0123456789" * 500
        await client.mutation("messages:send", {"body": "!"})
        assert subscription.current() == "0123456789" * 500 + "!"
        assert len(app.convex.connections) == 1  # no reassembly error, no reconnect


# -- FatalError ------------------------------------------------------------------------------


async def pending_calls_then_fatal(
    app: App, client: ConvexClient
) -> tuple[dict[str, BaseException], list[ConnectionStatus]]:
    """Leave one of each kind of call pending, send FatalError; returns what each raised
    and the statuses seen until the status stream ended."""
    await client.wait_connected()
    app.convex.pause()
    errors: dict[str, BaseException] = {}
    statuses: list[ConnectionStatus] = []

    async def capture(name: str, call: Callable[[], Any]) -> None:
        try:
            await call()
        except DartvexError as exc:
            errors[name] = exc

    async def watch() -> None:
        async for status in client.connection_statuses():
            statuses.append(status)

    subscription = client.subscribe("messages:list")
    async with anyio.create_task_group() as tg:
        tg.start_soon(watch)
        tg.start_soon(capture, "mutation", lambda: client.mutation("messages:send", {"body": "x"}))
        tg.start_soon(capture, "action", lambda: client.action("jobs:echo"))
        tg.start_soon(capture, "query", lambda: client.query("messages:list"))
        tg.start_soon(capture, "subscription", subscription.next)
        record = app.convex.connections[0]
        await record.wait_for_frame("Action")
        await record.wait_for_frame("Mutation")
        await app.convex.send_fatal_error("boom: bad client")
    return errors, statuses


async def test_a_fatal_error_fails_every_pending_call_and_stops_for_good():
    async with running() as (app, client):
        errors, statuses = await pending_calls_then_fatal(app, client)
        assert sorted(errors) == ["action", "mutation", "query", "subscription"]
        assert statuses[-1].state is ConnectionState.FATAL  # and then the stream ended
        assert client.connection_state is ConnectionState.FATAL
        with pytest.raises(DartvexError):
            await client.mutation("messages:send", {"body": "after"})
        with pytest.raises(DartvexError):
            client.subscribe("messages:list")
        assert len(app.convex.connections) == 1  # never reconnected
        assert app.calls.get("messages:send") is None


async def test_a_fatal_error_reaches_callers_as_server_fatal_error_with_its_text():
    async with running() as (app, client):
        errors, _ = await pending_calls_then_fatal(app, client)
        for name, error in errors.items():
            assert isinstance(error, ServerFatalError), (name, error)
            assert "boom: bad client" in str(error)


# -- queries and subscriptions ---------------------------------------------------------------


async def test_identical_subscriptions_share_one_server_query():
    async with running() as (app, client):
        a = client.subscribe("echo:args", {"x": 1, "y": 2})
        b = client.subscribe("echo.js:args", {"y": 2, "x": 1})
        assert await a.next() == {"x": 1, "y": 2}
        assert await b.next() == {"x": 1, "y": 2}  # at once, from the shared query
        record = app.convex.connections[0]
        assert len(adds(record)) == 1

        a.close()
        marker = client.subscribe("echo:args", {"marker": True})
        await marker.next()
        assert removes(record) == []  # b still listens
        assert b.current() == {"x": 1, "y": 2}
        b.close()
        shared_id = adds(record)[0]["queryId"]
        await record.wait_for_frame(
            "ModifyQuerySet",
            predicate=lambda f: {"type": "Remove", "queryId": shared_id} in f["modifications"],
        )


async def test_a_query_subscribed_again_gets_a_new_id_and_fresh_data():
    async with running() as (app, client):
        first = client.subscribe("messages:list")
        assert await first.next() == []
        first.close()
        app.convex.db.insert("messages", {"body": "direct"})
        second = client.subscribe("messages:list")
        assert await second.next() == ["direct"]
        record = app.convex.connections[0]
        old_id, new_id = (a["queryId"] for a in adds(record))
        assert new_id > old_id and removes(record) == [old_id]


async def test_query_always_asks_the_server():
    async with running() as (app, client):
        assert await client.query("messages:list") == []
        app.convex.db.insert("messages", {"body": "written elsewhere"})
        assert await client.query("messages:list") == ["written elsewhere"]
        record = app.convex.connections[0]
        assert len(adds(record)) == 2
        await record.wait_for_frame("ModifyQuerySet", predicate=lambda f: len(removes(record)) == 2)


async def test_query_after_query_sends_one_modify_query_set_each():
    # A query's Remove waits for the end of the turn, so the next query's Add takes it
    # along: one frame, one Transition per query instead of two.
    async with running() as (app, client):
        for n in range(5):
            assert await client.query("echo:args", {"n": n}) == {"n": n}
        record = app.convex.connections[0]
        # (the socket's first ModifyQuerySet is the empty restart one)
        frames = [f for f in record.frames_of_type("ModifyQuerySet") if f["modifications"]]
        added = [a["queryId"] for a in adds(record)]
        assert [[m["type"] for m in f["modifications"]] for f in frames[:5]] == [
            ["Add"],
            *[["Remove", "Add"]] * 4,
        ]
        # The last Remove goes out on its own once the turn ends.
        await record.wait_for_frame("ModifyQuerySet", predicate=lambda f: len(removes(record)) == 5)
        assert removes(record) == added
        assert client.connection_state is ConnectionState.CONNECTED


@pytest.mark.parametrize("then", ["mutation", "subscribe"])
async def test_a_subscription_freed_by_the_collector_keeps_the_query_set_versions_in_order(
    then: str,
):
    # Subscription.__del__ runs wherever the cyclic collector runs: inside the core too,
    # between a ModifyQuerySet's version and its send. Its Remove must not go out there
    # (the server would see versions out of order and end the session with FatalError).
    # The collector is made to run at the k-th allocation after the setup, for k = 1..29.
    async with running() as (app, client):
        assert await client.query("echo:args", {"w": 0}) == {"w": 0}
        saved = gc.get_threshold()
        try:
            for k in range(1, 30):
                gc.disable()
                victim: Any = client.subscribe("echo:args", {"victim": k})
                victim.cycle = victim  # only the cyclic collector can free it
                del victim
                client.subscribe("echo:args", {"pending": k}).close()  # a Remove waits
                gc.set_threshold(gc.get_count()[0] + k)
                gc.enable()
                try:
                    if then == "mutation":
                        await client.mutation("messages:send", {"body": str(k)})
                    else:
                        client.subscribe("echo:args", {"probe": k}).close()
                finally:
                    gc.set_threshold(*saved)
                assert await client.query("echo:args", {"k": k}) == {"k": k}
                assert client.connection_state is ConnectionState.CONNECTED, f"k={k}"
        finally:
            gc.set_threshold(*saved)
            gc.enable()
        gc.collect()
        record = app.convex.connections[0]
        versions = [
            (f["baseVersion"], f["newVersion"]) for f in record.frames_of_type("ModifyQuerySet")
        ]
        assert versions == [(n, n + 1) for n in range(len(versions))]
        assert len(app.convex.connections) == 1
        # Every victim's Remove reached the server in the end.
        added = {a["queryId"] for a in adds(record)}
        await record.wait_for_frame(
            "ModifyQuerySet", predicate=lambda f: set(removes(record)) == added
        )


async def test_a_subscription_dropped_in_another_thread_is_still_removed():
    # Its finalizer runs in the thread that drops the last reference; the Remove is made
    # on the loop (in debug mode a plain call_soon from there would raise, and be lost).
    async with running() as (app, client):
        subscription = client.subscribe("echo:args", {"dropped": "elsewhere"})
        assert await subscription.next() == {"dropped": "elsewhere"}
        holder = [subscription]
        del subscription
        loop = asyncio.get_running_loop()
        loop.set_debug(True)
        try:
            await anyio.to_thread.run_sync(holder.clear)  # __del__ runs in that thread
        finally:
            loop.set_debug(False)
        record = app.convex.connections[0]
        (added,) = adds(record)
        await record.wait_for_frame(
            "ModifyQuerySet",
            predicate=lambda f: (
                {"type": "Remove", "queryId": added["queryId"]} in f["modifications"]
            ),
        )


async def test_function_log_lines_reach_the_function_logger_once(
    caplog: pytest.LogCaptureFixture,
):
    caplog.set_level("INFO", logger="dartvex_auth_better.convex.function")
    async with running() as (app, client):

        @app.convex.query("logged:count")
        def count(ctx: QueryCtx, args: dict[str, Any]) -> int:
            n = len(ctx.db.query("messages"))
            ctx.log("counted", n)
            return n

        @app.convex.mutation("logged:send")
        def send(ctx: MutationCtx, args: dict[str, Any]) -> None:
            ctx.log("sending")
            ctx.db.insert("messages", {"body": "x"})

        subscription = client.subscribe("logged:count")
        assert await subscription.next() == 0
        await client.mutation("logged:send")
        assert subscription.current() == 1
        await bounce(app, client)  # the server re-sends the unchanged result
        await wait_status(client, lambda s: s.synced)

    lines = [
        r.getMessage() for r in caplog.records if r.name == "dartvex_auth_better.convex.function"
    ]
    assert lines == [
        "query logged:count: [LOG] counted 0",
        "mutation logged:send: [LOG] sending",
        "query logged:count: [LOG] counted 1",
    ]


async def test_a_failing_query_raises_convex_error_and_keeps_listening():
    async with running() as (app, client):

        @app.convex.query("flaky:get")
        def flaky(ctx: QueryCtx, args: dict[str, Any]) -> int:
            rows = ctx.db.query("messages")
            if not rows:
                raise ConvexError("empty", data={"code": "EMPTY"})
            return len(rows)

        subscription = client.subscribe("flaky:get")
        with pytest.raises(ConvexError) as caught:
            await subscription.next()
        assert caught.value.data == {"code": "EMPTY"}
        app.convex.db.insert("messages", {"body": "one"})
        assert await subscription.next() == 1


async def test_leaving_an_async_for_loop_unsubscribes():
    async with running() as (app, client):
        subscription = client.subscribe("messages:list")
        async for value in subscription:
            assert value == []
            break
        record = app.convex.connections[0]
        query_id = adds(record)[0]["queryId"]
        await record.wait_for_frame(
            "ModifyQuerySet",
            predicate=lambda f: {"type": "Remove", "queryId": query_id} in f["modifications"],
        )
        with pytest.raises(StopAsyncIteration):
            await subscription.next()


async def test_a_cancelled_query_sends_exactly_one_remove():
    async with running() as (app, client):
        await client.wait_connected()
        app.convex.pause()  # the query never gets an answer
        record = app.convex.connections[0]
        with anyio.CancelScope() as scope:
            async with anyio.create_task_group() as tg:

                async def cancel_once_added() -> None:
                    await record.wait_for_frame(
                        "ModifyQuerySet",
                        predicate=lambda f: any(m["type"] == "Add" for m in f["modifications"]),
                    )
                    scope.cancel()

                tg.start_soon(cancel_once_added)
                await client.query("echo:args", {"n": 1})
        assert scope.cancelled_caught
        (added,) = adds(record)
        await record.wait_for_frame(
            "ModifyQuerySet", predicate=lambda f: removes(record) == [added["queryId"]]
        )
        app.convex.resume()
        assert await client.query("echo:args", {"n": 2}) == {"n": 2}
        assert removes(record).count(added["queryId"]) == 1


async def test_the_query_set_version_chain_survives_churn():
    async with running() as (app, client):

        async def churn(i: int) -> None:
            async with client.subscribe("echo:args", {"i": i % 5}) as subscription:
                await subscription.next()

        async with anyio.create_task_group() as tg:
            for i in range(30):
                tg.start_soon(churn, i)
        assert await client.query("echo:args", {"done": True}) == {"done": True}
        record = app.convex.connections[0]
        versions = [
            (f["baseVersion"], f["newVersion"]) for f in record.frames_of_type("ModifyQuerySet")
        ]
        assert versions == [(n, n + 1) for n in range(len(versions))]
        assert client.connection_state is ConnectionState.CONNECTED
        assert len(app.convex.connections) == 1  # the server never saw a mismatch


# -- connection status -----------------------------------------------------------------------


async def test_connection_status_counters_through_connect_flaps_and_sync():
    async with LocalConvex() as convex:
        App(convex)
        client = ConvexClient(convex.url)
        initial = client.connection_status
        assert (initial.has_ever_connected, initial.connection_count) == (False, 0)
        assert (initial.connection_retries, initial.inflight_mutations) == (0, 0)
        assert initial.inflight_actions == 0 and not initial.is_connected
        with anyio.fail_after(DEADLINE):
            convex.pause()  # sockets open, nothing is answered: never synced
            async with client:
                status = await wait_status(client, lambda s: s.is_connected)
                assert status.has_ever_connected and status.connection_count == 1
                assert not client.connection_status.synced

                for flap in (1, 2):
                    await convex.drop_connections()
                    await wait_disconnected(client)
                    assert client.connection_status.connection_retries == flap
                    client.reconnect_now()
                    await convex.wait_for_connections(flap + 1)
                status = await wait_status(client, lambda s: s.is_connected)
                assert status.connection_count == 3
                assert status.connection_retries == 2  # not synced since: no reset

                convex.resume()
                status = await wait_status(client, lambda s: s.synced)
                assert status.connection_retries == 0 and status.is_connected


async def test_in_flight_counts_rise_and_fall():
    async with running() as (app, client):
        await client.wait_connected()
        app.convex.pause()
        async with anyio.create_task_group() as tg:
            tg.start_soon(client.mutation, "messages:send", {"body": "a"})
            tg.start_soon(client.mutation, "messages:send", {"body": "b"})
            tg.start_soon(client.action, "jobs:echo")
            status = await wait_status(
                client, lambda s: (s.inflight_mutations, s.inflight_actions) == (2, 1)
            )
            assert status.is_connected
            app.convex.resume()
            await wait_status(
                client, lambda s: (s.inflight_mutations, s.inflight_actions) == (0, 0)
            )
        assert app.messages() == ["a", "b"]


# -- cancellation ------------------------------------------------------------------------------


async def test_a_mutation_cancelled_before_it_was_sent_is_never_sent():
    async with running() as (app, client):
        await client.wait_connected()
        await app.convex.drop_connections()
        await wait_disconnected(client)
        with anyio.CancelScope() as scope:
            scope.cancel()
            await client.mutation("messages:send", {"body": "cancelled"})
        assert scope.cancelled_caught
        assert client.connection_state is ConnectionState.RECONNECTING  # it had no socket
        assert client.connection_status.inflight_mutations == 0

        client.reconnect_now()
        assert await client.mutation("messages:send", {"body": "later"})
        second = app.convex.connections[1]
        assert [f["args"][0]["body"] for f in second.frames_of_type("Mutation")] == ["later"]
        assert request_ids(second, "Mutation") == [1]  # id 0 never went out
        assert app.messages() == ["later"]


async def test_a_mutation_cancelled_after_sending_is_resent_and_applied_exactly_once():
    async with running() as (app, client):
        subscription = client.subscribe("messages:list")
        assert await subscription.next() == []
        first = app.convex.connections[0]
        with anyio.CancelScope() as scope:
            async with anyio.create_task_group() as tg:

                async def cancel_once_running() -> None:
                    await app.entered.wait()  # the server is running it
                    scope.cancel()

                tg.start_soon(cancel_once_running)
                await client.mutation("gated:write", {"body": "exactly once"})
        assert scope.cancelled_caught
        sent = await first.wait_for_frame("Mutation")

        # The server commits it while the socket is down, so the answer is lost.
        await app.convex.drop_connections()
        app.gate.set()
        await wait_disconnected(client)
        client.reconnect_now()
        second = await app.convex.wait_for_connections(2)
        assert await second.wait_for_frame("Mutation") == sent  # re-sent, same request id

        await wait_status(client, lambda s: s.inflight_mutations == 0 and s.synced)
        assert app.calls["gated:write"] == 1
        assert app.messages() == ["exactly once"]
        assert subscription.current() == ["exactly once"]


# -- closing ------------------------------------------------------------------------------------


class LoopErrors:
    """Records what reaches the event loop's exception handler ("Task exception was never
    retrieved", "Future exception was never retrieved", exceptions in callbacks)."""

    def __init__(self) -> None:
        self.seen: list[dict[str, Any]] = []

    def __enter__(self) -> LoopErrors:
        self._loop = asyncio.get_running_loop()
        self._previous = self._loop.get_exception_handler()
        self._loop.set_exception_handler(lambda _loop, context: self.seen.append(context))
        return self

    def __exit__(self, *exc_info: object) -> None:
        gc.collect()  # unretrieved exceptions are reported when their futures die
        self._loop.set_exception_handler(self._previous)


async def capture(call: Callable[[], Any]) -> BaseException | None:
    try:
        await call()
    except BaseException as exc:
        return exc
    return None


async def test_closing_fails_pending_calls_with_client_closed_error():
    with LoopErrors() as loop_errors:
        async with running() as (app, client):
            await client.wait_connected()
            app.convex.pause()
            subscription = client.subscribe("echo:args", {"live": True})
            calls: dict[str, Callable[[], Any]] = {
                "mutation": lambda: client.mutation("messages:send", {"body": "x"}),
                "optimistic": lambda: client.mutation(
                    "messages:send", {"body": "x"}, optimistic_update=add_item("x")
                ),
                "action": lambda: client.action("jobs:echo"),
                "query": lambda: client.query("echo:args"),
                "subscription": subscription.next,
            }
            tasks = {name: asyncio.ensure_future(capture(call)) for name, call in calls.items()}
            await app.convex.connections[0].wait_for_frame("Action")
            assert [name for name, task in tasks.items() if task.done()] == []

            await client.aclose()

            outcomes = {name: await task for name, task in tasks.items()}
            for name, exc in outcomes.items():
                assert isinstance(exc, ClientClosedError), (name, exc)
            assert client.connection_state is ConnectionState.CLOSED
            late = await capture(lambda: client.mutation("messages:send"))
            assert isinstance(late, ClientClosedError)
            with pytest.raises(ClientClosedError):
                client.subscribe("messages:list")
    assert loop_errors.seen == []
    assert app.messages() == []


async def test_closing_in_the_same_step_as_the_calls_fails_them_cleanly():
    with LoopErrors() as loop_errors:
        async with running() as (_, client):
            await client.wait_connected()
            mutation = asyncio.ensure_future(client.mutation("messages:send", {"body": "x"}))
            action = asyncio.ensure_future(client.action("jobs:echo"))
            await client.aclose()
            results = await asyncio.gather(mutation, action, return_exceptions=True)
        assert all(isinstance(r, ClientClosedError) for r in results), results
    assert loop_errors.seen == []


async def test_closing_during_a_backoff_fails_a_queued_mutation():
    async with running() as (app, client):
        await client.wait_connected()
        await app.convex.drop_connections()
        await wait_disconnected(client)
        task = asyncio.ensure_future(
            capture(lambda: client.mutation("messages:send", {"body": "never"}))
        )
        await wait_status(client, lambda s: s.inflight_mutations == 1)
        await client.aclose()
        assert isinstance(await task, ClientClosedError)
        assert len(app.convex.connections) == 1 and app.messages() == []


async def test_aclose_works_from_inside_a_task_group_and_from_another_task():
    async with running() as (app, client):
        await client.wait_connected()
        app.convex.pause()
        async with anyio.create_task_group() as tg:
            outcome: list[BaseException | None] = []

            async def call() -> None:
                outcome.append(await capture(lambda: client.action("jobs:echo")))

            tg.start_soon(call)
            await app.convex.connections[0].wait_for_frame("Action")
            tg.start_soon(client.aclose)  # another task...
            await client.aclose()  # ...and this one, inside a task group: both fine
        assert len(outcome) == 1 and isinstance(outcome[0], ClientClosedError)
        assert client.connection_state is ConnectionState.CLOSED


# -- optimistic updates -------------------------------------------------------------------------


async def test_an_optimistic_update_shows_at_once_and_is_replaced_without_flicker():
    async with running() as (app, client):
        subscription = client.subscribe("messages:list")
        assert await subscription.next() == []
        app.convex.pause()  # nothing the server says can explain what we see next
        seen: list[tuple[list[str], bool]] = []

        async def read_until_settled() -> None:
            while True:
                value = await subscription.next()
                seen.append((value, subscription.has_pending_writes))
                if not subscription.has_pending_writes:
                    return

        async with anyio.create_task_group() as tg:
            tg.start_soon(read_until_settled)
            results: list[Any] = []

            async def send() -> None:
                results.append(
                    await client.mutation(
                        "messages:send", {"body": "hi"}, optimistic_update=add_item("hi")
                    )
                )
                # Read-your-writes: the server's value, the guess already gone.
                assert subscription.current() == ["hi"]
                assert not subscription.has_pending_writes

            tg.start_soon(send)
            await app.convex.connections[0].wait_for_frame("Mutation")
            assert subscription.current() == ["hi (sending)"]
            assert subscription.has_pending_writes
            app.convex.resume()

        assert results and app.messages() == ["hi"]
        # The guess, then the server's value; never back to [] and never both.
        assert seen == [(["hi (sending)"], True), (["hi"], False)]


async def test_a_failed_mutation_rolls_its_optimistic_update_back():
    async with running() as (app, client):
        subscription = client.subscribe("messages:list")
        assert await subscription.next() == []
        app.convex.pause()
        async with anyio.create_task_group() as tg:
            errors: list[ConvexError] = []

            async def send() -> None:
                try:
                    await client.mutation(
                        "messages:reject", {"body": "no"}, optimistic_update=add_item("no")
                    )
                except ConvexError as exc:
                    errors.append(exc)

            tg.start_soon(send)
            assert await subscription.next() == ["no (sending)"]
            app.convex.resume()
            assert await subscription.next() == []
        assert errors and errors[0].data == {"code": "NOPE"}
        assert not subscription.has_pending_writes


async def test_query_returns_the_server_value_not_an_optimistic_guess():
    async with running() as (app, client):
        subscription = client.subscribe("messages:list")
        assert await subscription.next() == []
        app.convex.pause()
        task = asyncio.ensure_future(
            client.mutation("messages:send", {"body": "hi"}, optimistic_update=add_item("hi"))
        )
        assert await subscription.next() == ["hi (sending)"]
        assert await client.query("messages:list") == []
        app.convex.resume()
        await task
        assert await client.query("messages:list") == ["hi"]


async def test_an_optimistic_update_that_raises_means_nothing_is_sent():
    async with running() as (app, client):
        subscription = client.subscribe("messages:list")
        assert await subscription.next() == []

        def broken(store: OptimisticLocalStore) -> None:
            store.set_query("messages:list", None, ["half done"])
            raise KeyError("bug in the update")

        with pytest.raises(KeyError, match="bug in the update"):
            await client.mutation("messages:send", {"body": "never"}, optimistic_update=broken)
        assert subscription.current() == [] and not subscription.has_pending_writes
        assert client.connection_status.inflight_mutations == 0

        assert await client.mutation("messages:send", {"body": "next"})
        record = app.convex.connections[0]
        assert [f["args"][0]["body"] for f in record.frames_of_type("Mutation")] == ["next"]
        assert app.messages() == ["next"]


# -- arguments that cannot be sent: rejected at the call, nothing registered ---------------------


def nested(depth: int) -> list[Any]:
    value: list[Any] = []
    for _ in range(depth):
        value = [value]
    return value


UNSENDABLE: dict[str, tuple[dict[str, Any], str]] = {
    "lone surrogate": ({"a": "\ud800"}, "lone surrogate"),
    "nested surrogate": ({"a": [{"b": "ok \udfff"}]}, "lone surrogate"),
    "too deep": ({"a": nested(5000)}, "nested too deeply"),
}


@pytest.mark.parametrize("kind", ["mutation", "action", "query", "subscribe"])
@pytest.mark.parametrize("case", list(UNSENDABLE))
async def test_unsendable_args_fail_at_the_call_and_the_client_carries_on(kind, case):
    args, message = UNSENDABLE[case]
    unraisable: list[Any] = []
    hook = sys.unraisablehook
    sys.unraisablehook = unraisable.append
    try:
        with LoopErrors() as loop_errors:
            async with running() as (app, client):
                live = client.subscribe("echo:args", {"live": 1})
                assert await live.next() == {"live": 1}
                calls: dict[str, Callable[[], Any]] = {
                    "mutation": lambda: client.mutation("messages:send", args),
                    "action": lambda: client.action("jobs:echo", args),
                    "query": lambda: client.query("echo:args", args),
                }
                with pytest.raises(ValueError, match=message) as caught:
                    if kind == "subscribe":
                        client.subscribe("echo:args", args)
                    else:
                        await calls[kind]()
                assert "\ud800" not in str(caught.value) and "\udfff" not in str(caught.value)
                gc.collect()
                status = client.connection_status
                assert (status.inflight_mutations, status.inflight_actions) == (0, 0)
                first = app.convex.connections[0]
                assert frame_types(first).count("Mutation") == 0
                assert frame_types(first).count("Action") == 0
                assert len(adds(first)) == 1  # only the live query

                # The next socket's replay is clean, and the client works as before.
                second = await bounce(app, client)
                assert [a["args"] for a in adds(second)] == [[{"live": 1}]]
                assert await client.mutation("messages:send", {"body": "next"})
                assert await client.query("echo:args", {"x": 1}) == {"x": 1}
                assert client.connection_state is ConnectionState.CONNECTED
        assert loop_errors.seen == []
        assert app.messages() == ["next"]
    finally:
        sys.unraisablehook = hook
    assert unraisable == []


async def test_a_function_name_with_a_lone_surrogate_fails_at_the_call():
    async with running() as (app, client):
        await client.wait_connected()
        with pytest.raises(ValueError, match="lone surrogate"):
            await client.mutation("messages:s\ud800nd", {"body": "x"})
        with pytest.raises(ValueError, match="lone surrogate"):
            client.subscribe("echo:\udc00")
        assert client.connection_status.inflight_mutations == 0
        await bounce(app, client)
        assert await client.mutation("messages:send", {"body": "ok"})
        assert client.connection_state is ConnectionState.CONNECTED


async def test_a_subscription_whose_registration_failed_is_dropped_quietly():
    # Subscription.__init__ raising (here: args that bypassed encode_args) must not make
    # its __del__ fail on the half-built object.
    unraisable: list[Any] = []
    hook = sys.unraisablehook
    sys.unraisablehook = unraisable.append
    try:
        async with running() as (_, client):
            await client.wait_connected()
            with pytest.raises(ValueError, match="lone surrogate"):
                Subscription(client._core, "echo:args", [{"a": "\ud800"}])
            gc.collect()
            assert len(client._core.query_set) == 0
    finally:
        sys.unraisablehook = hook
    assert unraisable == []


# -- one reader per Subscription ------------------------------------------------------------------


async def test_a_second_task_reading_a_subscription_gets_a_clear_error():
    async with running() as (app, client):
        subscription = client.subscribe("messages:list")
        assert await subscription.next() == []
        first = asyncio.ensure_future(subscription.next())
        await asyncio.sleep(0)  # the first reader is waiting now
        with pytest.raises(RuntimeError, match="one reader"):
            await subscription.next()
        with pytest.raises(RuntimeError, match="one reader"):
            async for _ in subscription:
                pass
        await client.mutation("messages:send", {"body": "a"})
        assert await first == ["a"]  # the first reader got the value, not split
        # One reader after another is fine, and so is a second subscribe() of the same query.
        other = client.subscribe("messages:list")
        second = asyncio.ensure_future(subscription.next())
        third = asyncio.ensure_future(other.next())
        assert await third == ["a"]
        await client.mutation("messages:send", {"body": "b"})
        assert await second == ["a", "b"]
        assert len(adds(app.convex.connections[0])) == 1  # one server query for both


async def test_a_cancelled_reader_leaves_the_subscription_readable():
    async with running() as (_, client):
        subscription = client.subscribe("messages:list")
        assert await subscription.next() == []
        waiting = asyncio.ensure_future(subscription.next())
        await asyncio.sleep(0)
        waiting.cancel()
        with pytest.raises(asyncio.CancelledError):
            await waiting
        reader = asyncio.ensure_future(subscription.next())
        await client.mutation("messages:send", {"body": "a"})
        assert await reader == ["a"]
