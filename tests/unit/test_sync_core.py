"""SyncCore driven directly: crafted server frames in, captured client frames out.

Ports the edge cases the Dart original pins in test/sync/base_client_test.dart,
test/sync/local_state_test.dart, test/client_test.dart and test/conformance/*, wherever
the concept exists in the sans-IO core. No sockets: ``Socket`` below plays the socket loop
(``restart()`` on open, ``send`` queues, the writer builds frames and marks requests sent,
``send = None`` on close).
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from typing import Any

import anyio
import msgspec
import pytest

from dartvex_auth_better import (
    ClientClosedError,
    ConnectionLostError,
    ConvexError,
    ProtocolError,
    ServerFatalError,
)
from dartvex_auth_better.convex._optimistic import OptimisticLocalStore
from dartvex_auth_better.convex._protocol import (
    AuthError,
    ServerMessage,
    decode_server_message,
    encode_ts,
)
from dartvex_auth_better.convex._query_set import LocalQuery
from dartvex_auth_better.convex._requests import Request
from dartvex_auth_better.convex._subscription import Subscription
from dartvex_auth_better.convex._sync import Outgoing, SyncCore
from dartvex_auth_better.convex._values import encode_args, encode_value

pytestmark = pytest.mark.anyio

SESSION = "5f0c9a54-0000-4000-8000-000000000000"
_ABSENT = object()


# -- the socket loop, played by hand -------------------------------------------------------


class Socket:
    """What ``_client.py`` does around the core, minus the network."""

    def __init__(self, core: SyncCore) -> None:
        self.core = core
        self.queue: list[Outgoing] = list(core.restart())
        core.send = self.queue.append

    def flush(self) -> list[dict[str, Any]]:
        """Write everything queued, in order, as the writer task does."""
        written: list[dict[str, Any]] = []
        while self.queue:
            frame, request_id = self.queue.pop(0)
            if request_id is not None and not self.core.requests.claim_for_write(request_id):
                continue  # the writer skips what its caller gave up on
            written.append(msgspec.json.decode(frame))
        return written

    def close(self) -> None:
        """The socket ended; whatever was still queued is lost with it."""
        self.core.send = None
        self.queue.clear()


def types(frames: list[dict[str, Any]]) -> list[str]:
    return [f["type"] for f in frames]


class Server:
    """Crafts server frames whose versions chain from the last Transition."""

    def __init__(self) -> None:
        self.version = {"querySet": 0, "identity": 0, "ts": encode_ts(0)}

    def new_socket(self) -> None:
        self.version = {"querySet": 0, "identity": 0, "ts": encode_ts(0)}

    def transition(
        self,
        *modifications: dict[str, Any],
        query_set: int | None = None,
        identity: int | None = None,
        ts: int | None = None,
    ) -> ServerMessage:
        end = dict(self.version)
        if query_set is not None:
            end["querySet"] = query_set
        if identity is not None:
            end["identity"] = identity
        if ts is not None:
            end["ts"] = encode_ts(ts)
        frame = {
            "type": "Transition",
            "startVersion": self.version,
            "endVersion": end,
            "modifications": list(modifications),
        }
        self.version = end
        return msg(frame)


def msg(frame: dict[str, Any]) -> ServerMessage:
    return decode_server_message(msgspec.json.encode(frame))


def updated(query_id: int, value: Any, *, journal: Any = _ABSENT) -> dict[str, Any]:
    mod: dict[str, Any] = {
        "type": "QueryUpdated",
        "queryId": query_id,
        "value": encode_value(value),
        "logLines": [],
    }
    if journal is not _ABSENT:
        mod["journal"] = journal
    return mod


def failed(
    query_id: int, message: str, *, data: Any = _ABSENT, journal: Any = _ABSENT
) -> dict[str, Any]:
    mod: dict[str, Any] = {
        "type": "QueryFailed",
        "queryId": query_id,
        "errorMessage": message,
        "logLines": ["[LOG] failing"],
    }
    if data is not _ABSENT:
        mod["errorData"] = encode_value(data)
    if journal is not _ABSENT:
        mod["journal"] = journal
    return mod


def mutation_ok(request_id: int, result: Any, ts: int) -> ServerMessage:
    return msg(
        {
            "type": "MutationResponse",
            "requestId": request_id,
            "success": True,
            "result": encode_value(result),
            "ts": encode_ts(ts),
            "logLines": [],
        }
    )


def action_ok(request_id: int, result: Any) -> ServerMessage:
    return msg(
        {
            "type": "ActionResponse",
            "requestId": request_id,
            "success": True,
            "result": encode_value(result),
            "logLines": [],
        }
    )


def subscribe(core: SyncCore, name: str, args: dict[str, Any] | None = None) -> LocalQuery:
    return core.subscribe(name, encode_args(args), asyncio.Event())


def value(query: LocalQuery) -> Any:
    result = query.effective
    assert result is not None, "the query is loading"
    return result.unwrap()


def set_token(core: SyncCore, token: str | None) -> None:
    core.auth.set_fixed(token)


def mutate(
    core: SyncCore,
    name: str,
    args: dict[str, Any] | None = None,
    update: Callable[[OptimisticLocalStore], None] | None = None,
) -> Request:
    return core.request("mutation", name, encode_args(args), update)


def act(core: SyncCore, name: str) -> Request:
    return core.request("action", name, encode_args(None))


def outcome(request: Request) -> Any:
    """The request's result, or its exception; fails when it is still pending."""
    assert request.future.done(), "the request is still pending"
    exc = request.future.exception()
    return exc if exc is not None else request.future.result()


# -- what goes on the wire, and in which order -----------------------------------------------


async def test_restart_sends_connect_auth_queries_then_requests_in_request_order():
    core = SyncCore(SESSION)
    query = subscribe(core, "messages:list", {"channel": "a"})
    action = act(core, "jobs:run")  # request id 0
    mutation = mutate(core, "messages:send", {"body": "hi"})  # request id 1
    set_token(core, "header.payload.sig")

    frames = Socket(core).flush()

    assert types(frames) == ["Connect", "Authenticate", "ModifyQuerySet", "Action", "Mutation"]
    connect, auth, modify, action_frame, mutation_frame = frames
    assert connect["sessionId"] == SESSION
    assert connect["connectionCount"] == 0
    assert connect["lastCloseReason"] == "InitialConnect"
    assert isinstance(connect["clientTs"], int) and connect["clientTs"] > 0
    assert "maxObservedTimestamp" not in connect  # nothing observed yet
    assert auth == {
        "type": "Authenticate",
        "baseVersion": 0,
        "tokenType": "User",
        "value": "header.payload.sig",
    }
    assert modify == {
        "type": "ModifyQuerySet",
        "baseVersion": 0,
        "newVersion": 1,
        "modifications": [
            {
                "type": "Add",
                "queryId": query.query_id,
                "udfPath": "messages:list",
                "args": [{"channel": "a"}],
                "journal": None,
            }
        ],
    }
    assert (action_frame["requestId"], action_frame["udfPath"]) == (0, "jobs:run")
    assert (mutation_frame["requestId"], mutation_frame["args"]) == (1, [{"body": "hi"}])
    assert action.message.request_id == 0 and mutation.message.request_id == 1


async def test_restart_with_nothing_to_replay_still_sends_an_empty_query_set():
    core = SyncCore(SESSION)
    frames = Socket(core).flush()
    assert types(frames) == ["Connect", "ModifyQuerySet"]
    assert frames[1] == {
        "type": "ModifyQuerySet",
        "baseVersion": 0,
        "newVersion": 1,
        "modifications": [],
    }
    assert core.query_set.version == 1


async def test_every_socket_reuses_the_session_and_counts_connections():
    core = SyncCore(SESSION)
    server = Server()
    socket = Socket(core)
    first = socket.flush()[0]
    # The highest ts seen anywhere goes back in the next Connect; compared unsigned.
    core.handle(server.transition(query_set=1, ts=2**63 + 42))
    request = mutate(core, "m:f")
    socket.flush()
    core.handle(mutation_ok(request.message.request_id, None, 7))
    socket.close()
    core.last_close_reason = "InternalServerError"

    second = Socket(core).flush()[0]

    assert first["connectionCount"] == 0 and second["connectionCount"] == 1
    assert first["sessionId"] == second["sessionId"] == SESSION
    assert second["lastCloseReason"] == "InternalServerError"
    assert second["maxObservedTimestamp"] == encode_ts(2**63 + 42)


async def test_changes_made_while_disconnected_go_out_with_the_next_socket():
    core = SyncCore(SESSION)
    socket = Socket(core)
    socket.flush()
    socket.close()

    kept = subscribe(core, "q:kept")
    gone = subscribe(core, "q:gone")
    core.unsubscribe(gone, next(iter(gone.subscribers)))
    request = mutate(core, "m:f")
    assert request.status == "not_sent"

    frames = Socket(core).flush()

    assert types(frames) == ["Connect", "ModifyQuerySet", "Mutation"]
    assert [m["queryId"] for m in frames[1]["modifications"]] == [kept.query_id]
    assert frames[2]["requestId"] == request.message.request_id


async def test_query_set_versions_chain_and_restart_from_zero():
    core = SyncCore(SESSION)
    socket = Socket(core)
    socket.flush()  # ModifyQuerySet 0 -> 1
    a = subscribe(core, "q:a")
    subscribe(core, "q:b")
    core.unsubscribe(a, next(iter(a.subscribers)))
    frames = socket.flush()
    assert [(f["baseVersion"], f["newVersion"]) for f in frames] == [(1, 2), (2, 3), (3, 4)]
    assert frames[2]["modifications"] == [{"type": "Remove", "queryId": a.query_id}]

    socket.close()
    restart = Socket(core).flush()
    assert [(f["baseVersion"], f["newVersion"]) for f in restart[1:]] == [(0, 1)]
    assert [m["udfPath"] for m in restart[1]["modifications"]] == ["q:b"]


async def test_identical_subscriptions_share_one_server_query():
    core = SyncCore(SESSION)
    socket = Socket(core)
    socket.flush()
    first_waker, second_waker = asyncio.Event(), asyncio.Event()
    # The client canonicalises names before they reach the core; args differ only in order.
    first = core.subscribe("msgs:list", encode_args({"a": 1, "b": 2}), first_waker)
    second = core.subscribe("msgs:list", encode_args({"b": 2, "a": 1}), second_waker)

    assert first is second
    assert first.subscribers == {first_waker, second_waker}
    frames = socket.flush()
    assert len(frames) == 1 and len(frames[0]["modifications"]) == 1

    core.unsubscribe(first, first_waker)
    assert socket.flush() == []  # someone still listens
    core.unsubscribe(first, second_waker)
    assert socket.flush()[0]["modifications"] == [{"type": "Remove", "queryId": first.query_id}]


async def test_a_new_subscription_sends_journal_null():
    core = SyncCore(SESSION)
    socket = Socket(core)
    socket.flush()
    subscribe(core, "q:a")
    (frame,) = socket.flush()
    assert frame["modifications"][0]["journal"] is None
    assert "componentPath" not in frame["modifications"][0]


@pytest.mark.parametrize("kind", ["QueryUpdated", "QueryFailed"])
async def test_journals_are_kept_cleared_and_replayed(kind: str):
    def result(query_id: int, journal: Any = _ABSENT) -> dict[str, Any]:
        if kind == "QueryUpdated":
            return updated(query_id, 1, journal=journal)
        return failed(query_id, "boom", journal=journal)

    core = SyncCore(SESSION)
    server = Server()
    query = subscribe(core, "q:paged")

    def replayed_journal() -> Any:
        socket.close()
        server.new_socket()
        frames = Socket(core).flush()
        return frames[1]["modifications"][0]["journal"]

    socket = Socket(core)
    socket.flush()
    core.handle(server.transition(result(query.query_id, "cursor-a"), query_set=1))
    assert replayed_journal() == "cursor-a"

    # A result without the key keeps the journal...
    socket = Socket(core)
    core.handle(server.transition(result(query.query_id), query_set=1))
    assert replayed_journal() == "cursor-a"

    # ...and an explicit null clears it.
    socket = Socket(core)
    core.handle(server.transition(result(query.query_id, None), query_set=1))
    assert replayed_journal() is None


# -- server messages ---------------------------------------------------------------------------


async def test_ping_changes_nothing_and_sends_nothing():
    core = SyncCore(SESSION)
    socket = Socket(core)
    socket.flush()
    query = subscribe(core, "q:a")
    socket.flush()
    before = (core.remote_version, query.version, core.synced)
    core.handle(msg({"type": "Ping"}))
    assert socket.flush() == []
    assert (core.remote_version, query.version, core.synced) == before


async def test_fatal_error_raises_a_typed_error_carrying_the_server_text():
    core = SyncCore(SESSION)
    Socket(core).flush()
    with pytest.raises(ServerFatalError, match="boom"):
        core.handle(msg({"type": "FatalError", "error": "boom"}))


async def test_after_a_fatal_error_closing_the_socket_leaves_calls_to_terminate():
    # The socket loop closes the socket and then terminates with the FatalError: an
    # action in flight must get that error, not a retryable ConnectionLostError first.
    core = SyncCore(SESSION)
    socket = Socket(core)
    socket.flush()
    action = act(core, "a:f")
    socket.flush()
    with pytest.raises(ServerFatalError) as caught:
        core.handle(msg({"type": "FatalError", "error": "boom"}))
    socket.close()
    assert not action.future.done()
    core.terminate(caught.value)
    assert outcome(action) is caught.value


async def test_auth_error_is_handed_to_the_hook():
    core = SyncCore(SESSION)
    Socket(core).flush()
    seen: list[AuthError] = []
    core.on_auth_error = seen.append
    core.handle(msg({"type": "AuthError", "error": "expired", "baseVersion": 0}))
    assert [(e.error, e.base_version, e.auth_update_attempted) for e in seen] == [
        ("expired", 0, None)
    ]


async def test_a_transition_updates_subscribers_and_advances_the_version():
    core = SyncCore(SESSION)
    server = Server()
    Socket(core).flush()
    waker = asyncio.Event()
    query = core.subscribe("q:a", encode_args(None), waker)
    core.handle(server.transition(updated(query.query_id, ["x"]), query_set=1, ts=10))
    assert waker.is_set()
    assert value(query) == ["x"]
    assert core.remote_version == msgspec.convert(server.version, type(core.remote_version))


@pytest.mark.parametrize("field", ["querySet", "identity", "ts"])
async def test_a_transition_must_start_exactly_at_the_current_version(field: str):
    core = SyncCore(SESSION)
    Socket(core).flush()
    query = subscribe(core, "q:a")
    start: dict[str, Any] = {"querySet": 0, "identity": 0, "ts": encode_ts(0)}
    start[field] = encode_ts(1) if field == "ts" else 1
    frame = {
        "type": "Transition",
        "startVersion": start,
        "endVersion": {"querySet": 2, "identity": 1, "ts": encode_ts(5)},
        "modifications": [updated(query.query_id, 1)],
    }
    with pytest.raises(ProtocolError, match="current version"):
        core.handle(msg(frame))
    assert query.server is None  # nothing from the bad Transition was applied
    assert core.remote_version.query_set == 0


async def test_results_for_a_removed_query_are_not_delivered():
    core = SyncCore(SESSION)
    server = Server()
    socket = Socket(core)
    socket.flush()
    old = subscribe(core, "q:a")
    core.unsubscribe(old, next(iter(old.subscribers)))
    waker = asyncio.Event()
    new = core.subscribe("q:a", encode_args(None), waker)  # same query, new id
    socket.flush()
    assert new.query_id != old.query_id

    # The server had not processed the Remove yet: a result for the old id arrives.
    core.handle(server.transition(updated(old.query_id, "stale"), query_set=2))

    assert not waker.is_set()
    assert new.server is None and old.server is None
    core.handle(server.transition(updated(new.query_id, "fresh"), query_set=3))
    assert value(new) == "fresh"


async def test_a_query_removed_by_the_server_is_an_error_for_its_subscribers():
    core = SyncCore(SESSION)
    server = Server()
    Socket(core).flush()
    query = subscribe(core, "q:a")
    core.handle(server.transition(updated(query.query_id, 1), query_set=1))
    core.handle(server.transition({"type": "QueryRemoved", "queryId": query.query_id}))
    with pytest.raises(ConvexError, match="removed"):
        value(query)


async def test_a_failed_query_carries_message_data_and_log_lines():
    core = SyncCore(SESSION)
    server = Server()
    Socket(core).flush()
    query = subscribe(core, "q:a")
    core.handle(server.transition(failed(query.query_id, "nope", data={"code": 7}), query_set=1))
    with pytest.raises(ConvexError) as caught:
        value(query)
    assert caught.value.message == "nope"
    assert caught.value.data == {"code": 7}
    assert caught.value.log_lines == ["[LOG] failing"]


# -- mutations and actions ---------------------------------------------------------------------


async def test_a_mutation_resolves_only_once_a_transition_reaches_its_ts():
    core = SyncCore(SESSION)
    server = Server()
    socket = Socket(core)
    socket.flush()
    core.handle(server.transition(query_set=1, ts=1))
    request = mutate(core, "m:f")
    socket.flush()

    core.handle(mutation_ok(request.message.request_id, "ok", 20))
    assert not request.future.done()  # the write is not visible yet
    core.handle(server.transition(ts=19))
    assert not request.future.done()
    core.handle(server.transition(ts=20))
    assert outcome(request) == "ok"
    assert len(core.requests) == 0


async def test_a_mutation_already_covered_by_the_applied_ts_resolves_at_once():
    core = SyncCore(SESSION)
    server = Server()
    socket = Socket(core)
    socket.flush()
    core.handle(server.transition(query_set=1, ts=10))
    request = mutate(core, "m:f")
    socket.flush()
    core.handle(mutation_ok(request.message.request_id, 42, 4))
    assert outcome(request) == 42


async def test_a_parked_mutation_is_replayed_and_its_duplicate_answer_ignored():
    core = SyncCore(SESSION)
    server = Server()
    socket = Socket(core)
    socket.flush()
    request = mutate(core, "m:f")
    socket.flush()
    core.handle(mutation_ok(request.message.request_id, "original", 30))
    socket.close()

    # Answered but not yet visible: re-sent on the next socket (the server de-duplicates).
    server.new_socket()
    socket = Socket(core)
    frames = socket.flush()
    assert [f["requestId"] for f in frames if f["type"] == "Mutation"] == [
        request.message.request_id
    ]
    core.handle(mutation_ok(request.message.request_id, "duplicate", 30))
    assert not request.future.done()
    core.handle(server.transition(query_set=1, ts=31))
    assert outcome(request) == "original"


async def test_an_unanswered_mutation_is_replayed_with_the_same_request_id():
    core = SyncCore(SESSION)
    socket = Socket(core)
    socket.flush()
    warmup = mutate(core, "m:warmup")  # request id 0, answered below
    request = mutate(core, "m:f", {"x": [1, 2]})
    socket.flush()
    core.handle(msg({"type": "MutationResponse", "requestId": 0, "success": False, "result": "no"}))
    assert isinstance(outcome(warmup), ConvexError)
    socket.close()

    frames = Socket(core).flush()
    mutations = [f for f in frames if f["type"] == "Mutation"]
    assert mutations == [
        {"type": "Mutation", "requestId": 1, "udfPath": "m:f", "args": [{"x": [1, 2]}]}
    ]
    assert request.message.request_id == 1


async def test_a_failed_mutation_raises_convex_error_with_data():
    core = SyncCore(SESSION)
    socket = Socket(core)
    socket.flush()
    request = mutate(core, "m:f")
    socket.flush()
    core.handle(
        msg(
            {
                "type": "MutationResponse",
                "requestId": request.message.request_id,
                "success": False,
                "result": "Uncaught Error: nope",
                "errorData": {"code": "E"},
                "logLines": ["[ERROR] x"],
                "ts": encode_ts(5),  # ignored on failure
            }
        )
    )
    error = outcome(request)
    assert isinstance(error, ConvexError)
    assert (error.message, error.data, error.log_lines) == (
        "Uncaught Error: nope",
        {"code": "E"},
        ["[ERROR] x"],
    )
    assert core.max_observed_ts == 0


async def test_an_action_resolves_on_its_response():
    core = SyncCore(SESSION)
    socket = Socket(core)
    socket.flush()
    request = act(core, "a:f")
    assert socket.flush()[0] == {
        "type": "Action",
        "requestId": 0,
        "udfPath": "a:f",
        "args": [{}],
    }
    core.handle(action_ok(0, {"done": True}))
    assert outcome(request) == {"done": True}


async def test_an_action_sent_on_a_socket_that_closes_fails_at_once_and_is_not_replayed():
    core = SyncCore(SESSION)
    socket = Socket(core)
    socket.flush()
    request = act(core, "a:slow")
    socket.flush()
    socket.close()

    # Failing now, not when (if ever) the next socket opens: the caller must not hang
    # while the server is unreachable.
    error = outcome(request)
    assert isinstance(error, ConnectionLostError) and error.retryable
    assert "a:slow" in str(error)
    assert "Action" not in types(Socket(core).flush())


async def test_an_action_that_never_reached_the_wire_survives_a_disconnect():
    core = SyncCore(SESSION)
    socket = Socket(core)
    socket.flush()
    request = act(core, "a:f")
    socket.close()  # queued but never written
    assert not request.future.done()
    socket = Socket(core)
    assert [f["requestId"] for f in socket.flush() if f["type"] == "Action"] == [0]
    core.handle(action_ok(0, "ran once"))
    assert outcome(request) == "ran once"


async def test_replay_keeps_request_order_across_actions_and_mutations():
    core = SyncCore(SESSION)
    act(core, "a:first")
    mutate(core, "m:second")
    act(core, "a:third")
    frames = Socket(core).flush()
    assert [(f["type"], f["requestId"]) for f in frames[2:]] == [
        ("Action", 0),
        ("Mutation", 1),
        ("Action", 2),
    ]


# -- cancellation -----------------------------------------------------------------------------


async def test_a_mutation_cancelled_before_any_socket_had_it_is_never_sent():
    core = SyncCore(SESSION)
    request = mutate(core, "m:f")  # no socket: not queued anywhere
    request.future.cancel()
    core.abandon(request)
    assert len(core.requests) == 0
    assert "Mutation" not in types(Socket(core).flush())


async def test_a_mutation_cancelled_while_queued_on_the_socket_is_never_written():
    # The frame is already in the socket's queue: the writer skips it, so a mutation
    # whose caller gave up before it reached the wire is never applied.
    core = SyncCore(SESSION)
    server = Server()
    socket = Socket(core)
    socket.flush()
    core.handle(server.transition(query_set=1, ts=1))
    request = mutate(core, "m:f")
    request.future.cancel()
    core.abandon(request)

    written = socket.flush()
    assert "Mutation" not in types(written)
    assert len(core.requests) == 0
    socket.close()
    assert "Mutation" not in types(Socket(core).flush())


async def test_a_cancelled_mutation_whose_socket_closed_before_writing_it_is_never_sent():
    core = SyncCore(SESSION)
    socket = Socket(core)
    socket.flush()
    request = mutate(core, "m:f")
    request.future.cancel()
    core.abandon(request)
    socket.close()  # the queued frame dies with the socket
    assert len(core.requests) == 0
    assert "Mutation" not in types(Socket(core).flush())


async def test_a_mutation_cancelled_after_sending_is_replayed_until_applied():
    core = SyncCore(SESSION)
    server = Server()
    socket = Socket(core)
    socket.flush()
    request = mutate(core, "m:f")
    socket.flush()
    request.future.cancel()
    core.abandon(request)
    socket.close()

    server.new_socket()
    socket = Socket(core)
    frames = socket.flush()
    assert [f["requestId"] for f in frames if f["type"] == "Mutation"] == [0]
    assert core.connection_count == 2
    core.handle(mutation_ok(0, "applied once", 9))
    core.handle(server.transition(query_set=1, ts=9))
    assert len(core.requests) == 0
    assert request.future.cancelled()  # nobody is told; nothing is raised


async def test_terminate_fails_everything_pending_and_wakes_subscribers():
    core = SyncCore(SESSION)
    socket = Socket(core)
    socket.flush()
    waker = asyncio.Event()
    core.subscribe("q:a", encode_args(None), waker)
    mutation = mutate(core, "m:f")
    action = act(core, "a:f")
    socket.flush()  # both sent
    unsent = mutate(core, "m:g")

    error = ClientClosedError("closed")
    core.terminate(error)

    assert waker.is_set()
    assert outcome(mutation) is error and outcome(action) is error and outcome(unsent) is error
    assert core.terminal_error is error
    assert core.send is None
    core.terminate(ClientClosedError("again"))  # idempotent: the first error stays
    assert core.terminal_error is error


async def test_a_terminated_subscription_raises_the_terminal_error():
    core = SyncCore(SESSION)
    Socket(core).flush()
    subscription = Subscription(core, "q:a", encode_args(None))
    error = ServerFatalError("the Convex server reported a fatal error: boom")

    async def terminate_soon() -> None:
        core.terminate(error)

    with anyio.fail_after(1):
        async with anyio.create_task_group() as tg:
            tg.start_soon(terminate_soon)
            with pytest.raises(ServerFatalError, match="boom"):
                await subscription.next()


# -- "synced past the last reconnect" ----------------------------------------------------------


async def test_a_fresh_core_is_synced():
    assert SyncCore(SESSION).synced


async def test_synced_after_a_restart_with_no_queries_needs_the_first_transition():
    core = SyncCore(SESSION)
    server = Server()
    calls: list[bool] = []
    core.on_synced = lambda: calls.append(True)
    Socket(core).flush()
    assert not core.synced
    core.handle(server.transition(query_set=1))
    assert core.synced and calls == [True]


async def test_synced_needs_an_answer_for_every_query_re_added_even_known_ones():
    core = SyncCore(SESSION)
    server = Server()
    socket = Socket(core)
    socket.flush()
    a, b = subscribe(core, "q:a"), subscribe(core, "q:b")
    socket.flush()
    core.handle(server.transition(updated(a.query_id, 1), updated(b.query_id, 2), query_set=3))
    assert core.synced
    socket.close()

    calls: list[bool] = []
    core.on_synced = lambda: calls.append(True)
    server.new_socket()
    Socket(core).flush()
    core.handle(server.transition(updated(a.query_id, 1), query_set=1))
    assert not core.synced  # b had a result before, but not on this socket
    core.handle(server.transition(updated(b.query_id, 3)))
    assert core.synced and calls == [True]
    core.handle(server.transition(updated(b.query_id, 4)))
    assert calls == [True]  # reported once per reconnect


async def test_a_query_failure_or_removal_counts_as_an_answer():
    core = SyncCore(SESSION)
    server = Server()
    a, b = subscribe(core, "q:a"), subscribe(core, "q:b")
    Socket(core).flush()
    core.handle(server.transition(failed(a.query_id, "x"), query_set=1))
    assert not core.synced
    core.handle(server.transition({"type": "QueryRemoved", "queryId": b.query_id}))
    assert core.synced


async def test_unsubscribing_an_unanswered_query_resolves_it():
    core = SyncCore(SESSION)
    server = Server()
    a, b = subscribe(core, "q:a"), subscribe(core, "q:b")
    Socket(core).flush()
    core.handle(server.transition(updated(a.query_id, 1), query_set=1))
    assert not core.synced
    core.unsubscribe(b, next(iter(b.subscribers)))
    assert core.synced


async def test_a_replayed_mutation_is_outstanding_until_its_transition():
    core = SyncCore(SESSION)
    server = Server()
    request = mutate(core, "m:f")
    Socket(core).flush()
    core.handle(server.transition(query_set=1, ts=1))
    assert not core.synced  # queries are in sync; the request side is not
    core.handle(mutation_ok(request.message.request_id, None, 50))
    assert not core.synced
    core.handle(server.transition(ts=50))
    assert core.synced


async def test_requests_made_after_the_reconnect_do_not_hold_synced_back():
    core = SyncCore(SESSION)
    server = Server()
    socket = Socket(core)
    socket.flush()
    mutate(core, "m:later")
    socket.flush()
    core.handle(server.transition(query_set=1, ts=1))
    assert core.synced


async def test_auth_is_outstanding_until_the_identity_advances():
    core = SyncCore(SESSION)
    server = Server()
    set_token(core, "header.payload.sig")
    Socket(core).flush()
    core.handle(server.transition(query_set=1))
    assert not core.synced  # the query side is done, auth is not confirmed
    core.handle(server.transition(identity=1))
    assert core.synced


async def test_synced_is_not_reported_before_the_replayed_authenticate_is_confirmed():
    core = SyncCore(SESSION)
    query = subscribe(core, "q:a")
    set_token(core, "header.payload.sig")
    socket = Socket(core)  # restart frames queued, not yet written
    core.unsubscribe(query, next(iter(query.subscribers)))
    assert not core.synced
    socket.flush()


# -- optimistic updates through the core ---------------------------------------------------------


def append(item: str) -> Callable[[OptimisticLocalStore], None]:
    def update(store: OptimisticLocalStore) -> None:
        current = store.get_query("q:list") or []
        store.set_query("q:list", None, [*current, item])

    return update


def connected_with_list(initial: list[str]) -> tuple[SyncCore, Server, Socket, LocalQuery]:
    core = SyncCore(SESSION)
    server = Server()
    socket = Socket(core)
    socket.flush()
    query = subscribe(core, "q:list")
    socket.flush()
    core.handle(server.transition(updated(query.query_id, initial), query_set=2, ts=1))
    return core, server, socket, query


async def test_an_optimistic_update_is_visible_at_once_and_marks_pending_writes():
    core, _, socket, query = connected_with_list(["a"])
    waker = next(iter(query.subscribers))
    waker.clear()
    mutate(core, "m:add", None, append("b"))
    assert waker.is_set()  # before anything was sent or awaited
    assert value(query) == ["a", "b"] and query.has_pending_writes
    assert types(socket.flush()) == ["Mutation"]


async def test_an_optimistic_layer_is_replayed_on_top_of_new_server_data():
    core, server, _, query = connected_with_list(["a"])
    mutate(core, "m:add", None, append("b"))
    core.handle(server.transition(updated(query.query_id, ["a", "c"]), ts=2))
    assert value(query) == ["a", "c", "b"]


async def test_a_landed_mutation_replaces_its_guess_without_flicker():
    core, server, socket, query = connected_with_list(["a"])
    request = mutate(core, "m:add", None, append("b"))
    socket.flush()

    # The response alone keeps the guess: the server's data does not show the write yet.
    core.handle(mutation_ok(request.message.request_id, None, 10))
    assert value(query) == ["a", "b"] and query.has_pending_writes

    seen: list[Any] = []
    version = query.version
    core.handle(server.transition(updated(query.query_id, ["a", "b"]), ts=10))
    # One change, straight from the guess to the server's value: never back to ["a"], never
    # ["a", "b", "b"].
    assert query.version == version + 1
    seen.append(value(query))
    assert seen == [["a", "b"]] and not query.has_pending_writes
    assert outcome(request) is None

    core.handle(server.transition(updated(query.query_id, ["a", "b", "c"]), ts=11))
    assert value(query) == ["a", "b", "c"]  # the landed layer is not re-applied


async def test_a_failed_mutation_rolls_its_guess_back():
    core, _, socket, query = connected_with_list(["a"])
    request = mutate(core, "m:add", None, append("b"))
    socket.flush()
    waker = next(iter(query.subscribers))
    waker.clear()
    core.handle(msg({"type": "MutationResponse", "requestId": 0, "success": False, "result": "no"}))
    assert waker.is_set()
    assert value(query) == ["a"] and not query.has_pending_writes
    assert isinstance(outcome(request), ConvexError)


async def test_rolling_back_an_optimistic_only_value_shows_loading_again():
    core = SyncCore(SESSION)
    socket = Socket(core)
    socket.flush()
    query = subscribe(core, "q:list")  # no server answer yet
    request = mutate(core, "m:add", None, append("b"))
    assert value(query) == ["b"]
    socket.flush()
    core.handle(msg({"type": "MutationResponse", "requestId": 0, "success": False, "result": "no"}))
    assert query.effective is None and not query.has_pending_writes
    assert isinstance(outcome(request), ConvexError)


async def test_cancelling_a_mutation_rolls_its_guess_back():
    core, _, _, query = connected_with_list(["a"])
    request = mutate(core, "m:add", None, append("b"))
    request.future.cancel()
    core.abandon(request)
    assert value(query) == ["a"] and not query.has_pending_writes


async def test_stacked_guesses_roll_back_independently():
    core, _, socket, query = connected_with_list(["a"])
    first = mutate(core, "m:add", None, append("b"))
    mutate(core, "m:add", None, append("c"))
    assert value(query) == ["a", "b", "c"]
    socket.flush()
    core.handle(msg({"type": "MutationResponse", "requestId": 0, "success": False, "result": "no"}))
    assert isinstance(outcome(first), ConvexError)
    assert value(query) == ["a", "c"] and query.has_pending_writes


async def test_an_update_that_raises_sends_nothing_and_propagates():
    core, _, socket, query = connected_with_list(["a"])

    def broken(store: OptimisticLocalStore) -> None:
        store.set_query("q:list", None, ["half-done"])
        raise KeyError("bug in the update")

    with pytest.raises(KeyError, match="bug in the update"):
        mutate(core, "m:add", None, broken)
    assert socket.flush() == []
    assert len(core.requests) == 0 and len(core.optimistic) == 0
    assert value(query) == ["a"] and not query.has_pending_writes

    mutate(core, "m:add", None, append("b"))
    assert [f["requestId"] for f in socket.flush()] == [1]  # id 0 was never sent


async def test_a_layer_that_raises_on_replay_is_dropped_without_a_reconnect():
    core, server, _, query = connected_with_list(["a"])

    def needs_server_data(store: OptimisticLocalStore) -> None:
        current = store.get_query("q:list")
        store.set_query("q:list", None, [*current, "unsafe"])  # TypeError when None

    mutate(core, "m:add", None, needs_server_data)
    mutate(core, "m:add", None, append("safe"))
    assert value(query) == ["a", "unsafe", "safe"]

    # The query starts failing: replaying the first layer raises; it is dropped, the
    # second layer still applies, and handle() does not raise (no reconnect).
    core.handle(server.transition(failed(query.query_id, "gone"), ts=2))
    assert len(core.optimistic) == 1
    assert value(query) == ["safe"]


async def test_a_new_subscription_sees_an_optimistic_value_at_once():
    core = SyncCore(SESSION)
    Socket(core).flush()
    mutate(core, "m:add", None, append("guess"))  # no one subscribed to q:list yet
    subscription = Subscription(core, "q:list", encode_args(None))
    assert subscription.current() == ["guess"]
    with anyio.fail_after(1):
        assert await subscription.next() == ["guess"]
    assert subscription.has_pending_writes


# -- function log lines -------------------------------------------------------------------------

FUNCTION_LOGGER = "dartvex_auth_better.convex.function"


def function_logs(caplog: pytest.LogCaptureFixture) -> list[tuple[str, str, Any]]:
    """(message, kind, id) of every function log record so far."""
    return [
        (
            r.getMessage(),
            r.convex_kind,  # type: ignore[attr-defined]
            getattr(r, "convex_request_id", getattr(r, "convex_query_id", None)),
        )
        for r in caplog.records
        if r.name == FUNCTION_LOGGER
    ]


def logged_update(query_id: int, value: Any, lines: list[str]) -> dict[str, Any]:
    return {**updated(query_id, value), "logLines": lines}


async def test_query_log_lines_are_logged_once_per_result(caplog: pytest.LogCaptureFixture):
    caplog.set_level("INFO", logger=FUNCTION_LOGGER)
    core = SyncCore(SESSION)
    server = Server()
    socket = Socket(core)
    query = subscribe(core, "q:a")
    socket.flush()
    core.handle(server.transition(logged_update(query.query_id, 1, ["[LOG] a", "[LOG] b"])))
    assert function_logs(caplog) == [
        ("query q:a: [LOG] a", "query", 0),
        ("query q:a: [LOG] b", "query", 0),
    ]
    records = [r for r in caplog.records if r.name == FUNCTION_LOGGER]
    assert all(r.levelname == "INFO" and r.convex_function == "q:a" for r in records)  # type: ignore[attr-defined]

    # The same result again (as a reconnect re-sends it) is not logged again...
    socket.close()
    server.new_socket()
    socket = Socket(core)
    socket.flush()
    core.handle(server.transition(logged_update(query.query_id, 1, ["[LOG] a", "[LOG] b"])))
    assert len(function_logs(caplog)) == 2
    # ...a new result is, even with the same lines.
    core.handle(server.transition(logged_update(query.query_id, 2, ["[LOG] a", "[LOG] b"])))
    assert len(function_logs(caplog)) == 4
    core.handle(server.transition({**failed(query.query_id, "boom"), "logLines": ["[ERR] x"]}))
    assert function_logs(caplog)[-1] == ("query q:a: [ERR] x", "query", 0)


async def test_log_lines_of_a_query_no_longer_subscribed_are_not_logged(
    caplog: pytest.LogCaptureFixture,
):
    caplog.set_level("INFO", logger=FUNCTION_LOGGER)
    core = SyncCore(SESSION)
    server = Server()
    socket = Socket(core)
    query = subscribe(core, "q:a")
    socket.flush()
    core.unsubscribe(query, next(iter(query.subscribers)))
    core.handle(server.transition(logged_update(query.query_id, 1, ["[LOG] late"])))
    assert function_logs(caplog) == []


async def test_mutation_and_action_log_lines_are_logged_once(caplog: pytest.LogCaptureFixture):
    caplog.set_level("INFO", logger=FUNCTION_LOGGER)
    core = SyncCore(SESSION)
    server = Server()
    socket = Socket(core)
    socket.flush()
    mutation = mutate(core, "m:f")
    failing = mutate(core, "m:bad")
    action = act(core, "a:f")
    socket.flush()
    answer = {
        "type": "MutationResponse",
        "requestId": 0,
        "success": True,
        "result": 1,
        "ts": encode_ts(30),
        "logLines": ["[LOG] wrote"],
    }
    core.handle(msg(answer))
    core.handle(msg(answer))  # a duplicate answer for the parked mutation: not logged again
    core.handle(
        msg(
            {
                "type": "MutationResponse",
                "requestId": 1,
                "success": False,
                "result": "nope",
                "logLines": ["[ERROR] failed"],
            }
        )
    )
    core.handle(
        msg(
            {
                "type": "ActionResponse",
                "requestId": 2,
                "success": True,
                "result": None,
                "logLines": ["[LOG] acted"],
            }
        )
    )
    # Replayed on a new socket, answered again: still logged once.
    socket.close()
    server.new_socket()
    socket = Socket(core)
    socket.flush()
    core.handle(msg(answer))
    core.handle(server.transition(query_set=1, ts=30))
    assert outcome(mutation) == 1 and outcome(action) is None
    assert isinstance(outcome(failing), ConvexError)
    assert function_logs(caplog) == [
        ("mutation m:f: [LOG] wrote", "mutation", 0),
        ("mutation m:bad: [ERROR] failed", "mutation", 1),
        ("action a:f: [LOG] acted", "action", 2),
    ]


async def test_no_function_log_records_without_log_lines(caplog: pytest.LogCaptureFixture):
    caplog.set_level("INFO", logger=FUNCTION_LOGGER)
    core = SyncCore(SESSION)
    server = Server()
    socket = Socket(core)
    query = subscribe(core, "q:a")
    request = mutate(core, "m:f")
    socket.flush()
    core.handle(mutation_ok(request.message.request_id, None, 5))
    core.handle(server.transition(updated(query.query_id, 1), query_set=1, ts=5))
    assert outcome(request) is None
    assert function_logs(caplog) == []


# -- Removes wait for the end of the turn --------------------------------------------------


def deferring(core: SyncCore) -> list[Callable[[], None]]:
    """Give the core a ``defer`` hook; returns the callbacks due at the end of the turn."""
    due: list[Callable[[], None]] = []
    core.defer = due.append
    return due


def end_turn(due: list[Callable[[], None]]) -> None:
    while due:
        due.pop(0)()


def modifications(frames: list[dict[str, Any]]) -> list[list[tuple[str, int]]]:
    return [[(m["type"], m["queryId"]) for m in f["modifications"]] for f in frames]


def deferring_core_on_a_socket() -> tuple[SyncCore, list[Callable[[], None]], Socket]:
    """A core with a ``defer`` hook, on a socket whose restart frames are flushed."""
    core = SyncCore(SESSION)
    due = deferring(core)
    socket = Socket(core)
    socket.flush()
    return core, due, socket


def with_a_held_remove(
    name: str,
) -> tuple[SyncCore, list[Callable[[], None]], Socket, LocalQuery]:
    """A core on a socket, and a query whose Remove waits for the end of the turn."""
    core, due, socket = deferring_core_on_a_socket()
    query = subscribe(core, name)
    socket.flush()
    core.unsubscribe(query, next(iter(query.subscribers)))
    return core, due, socket, query


async def test_a_remove_rides_with_an_add_made_in_the_same_turn():
    core, due, socket, old = with_a_held_remove("q:a")
    assert socket.flush() == []  # waiting for the end of the turn
    new = subscribe(core, "q:b")
    frames = socket.flush()
    assert modifications(frames) == [[("Remove", old.query_id), ("Add", new.query_id)]]
    assert (frames[0]["baseVersion"], frames[0]["newVersion"]) == (2, 3)
    end_turn(due)
    assert socket.flush() == []  # already sent


async def test_removes_alone_go_out_together_at_the_end_of_the_turn():
    core, due, socket = deferring_core_on_a_socket()
    a, b = subscribe(core, "q:a"), subscribe(core, "q:b")
    socket.flush()
    core.unsubscribe(a, next(iter(a.subscribers)))
    core.unsubscribe(b, next(iter(b.subscribers)))
    assert socket.flush() == [] and len(due) == 1
    end_turn(due)
    frames = socket.flush()
    assert modifications(frames) == [[("Remove", a.query_id), ("Remove", b.query_id)]]
    assert (frames[0]["baseVersion"], frames[0]["newVersion"]) == (3, 4)


@pytest.mark.parametrize("then", ["mutation", "action", "authenticate"])
async def test_any_other_frame_sends_the_waiting_removes_before_it(then: str):
    core, due, socket, query = with_a_held_remove("q:a")
    if then == "mutation":
        mutate(core, "m:f")
    elif then == "action":
        act(core, "a:f")
    else:
        set_token(core, "header.payload.sig")
        core.send_authenticate()
    frames = socket.flush()
    expected = {"mutation": "Mutation", "action": "Action", "authenticate": "Authenticate"}
    assert types(frames) == ["ModifyQuerySet", expected[then]]
    assert modifications(frames[:1]) == [[("Remove", query.query_id)]]
    end_turn(due)
    assert socket.flush() == []


async def test_removes_waiting_when_the_socket_closes_are_dropped_not_sent_later():
    core, due, socket = deferring_core_on_a_socket()
    gone, kept = subscribe(core, "q:gone"), subscribe(core, "q:kept")
    socket.flush()
    core.unsubscribe(gone, next(iter(gone.subscribers)))
    socket.close()
    second = Socket(core)
    end_turn(due)  # the turn ends after the new socket opened
    frames = second.flush()
    assert types(frames) == ["Connect", "ModifyQuerySet"]  # no Remove for the new socket
    assert modifications(frames[1:]) == [[("Add", kept.query_id)]]
    assert (frames[1]["baseVersion"], frames[1]["newVersion"]) == (0, 1)


async def test_a_pause_sends_the_waiting_removes_first_and_removes_while_paused_are_held():
    core, due, socket, before = with_a_held_remove("q:before")
    core.pause()
    assert modifications(socket.flush()) == [[("Remove", before.query_id)]]
    during = subscribe(core, "q:during")
    core.unsubscribe(during, next(iter(during.subscribers)))
    end_turn(due)  # the callback from before the pause finds nothing waiting
    assert socket.flush() == []
    set_token(core, "header.payload.sig")
    core.resume()
    frames = socket.flush()
    # Held in order: the Remove of a query never goes out before its Add.
    assert types(frames) == ["Authenticate", "ModifyQuerySet", "ModifyQuerySet"]
    assert modifications(frames[1:]) == [[("Add", during.query_id)], [("Remove", during.query_id)]]


# -- pause and resume (a token fetch holding everything back) -------------------------------------


async def test_resume_sends_authenticate_first_then_what_was_held_in_order():
    core = SyncCore(SESSION)
    socket = Socket(core)
    socket.flush()
    core.pause()
    query = subscribe(core, "q:a")
    request = mutate(core, "m:f")
    core.send_authenticate()  # while paused: not built now (resume builds it)
    assert socket.flush() == []  # nothing goes out under the old identity
    set_token(core, "header.payload.sig")
    core.resume()
    frames = socket.flush()
    assert types(frames) == ["Authenticate", "ModifyQuerySet", "Mutation"]
    assert frames[0]["baseVersion"] == 0 and frames[0]["value"] == "header.payload.sig"
    assert frames[1]["modifications"][0]["queryId"] == query.query_id
    assert frames[2]["requestId"] == request.message.request_id
    assert request.status == "sent"


async def test_resume_without_a_pause_sends_nothing():
    core = SyncCore(SESSION)
    socket = Socket(core)
    socket.flush()
    core.resume()
    assert socket.flush() == []


async def test_calls_made_after_resume_follow_the_held_ones():
    core = SyncCore(SESSION)
    socket = Socket(core)
    socket.flush()
    core.pause()
    first = mutate(core, "m:first")
    set_token(core, "header.payload.sig")
    core.resume()
    second = mutate(core, "m:second")
    frames = socket.flush()
    assert types(frames) == ["Authenticate", "Mutation", "Mutation"]
    assert [f["requestId"] for f in frames[1:]] == [
        first.message.request_id,
        second.message.request_id,
    ]


async def test_held_frames_of_a_socket_that_closed_are_rebuilt_by_the_next_restart():
    core = SyncCore(SESSION)
    socket = Socket(core)
    socket.flush()
    core.pause()
    subscribe(core, "q:a")
    request = mutate(core, "m:f")
    socket.close()
    set_token(core, "header.payload.sig")
    core.resume()  # no socket: nothing to send now, nothing stays held
    assert socket.flush() == []
    frames = Socket(core).flush()
    assert types(frames) == ["Connect", "Authenticate", "ModifyQuerySet", "Mutation"]
    assert frames[1]["baseVersion"] == 0
    assert frames[3]["requestId"] == request.message.request_id
