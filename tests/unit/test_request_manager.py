"""RequestManager: the lifecycle of mutations and actions.

Ports test/sync/request_manager_test.dart (sync tracking, drop signals, metrics) and the
request parts of base_client_test.dart. Not ported: the Dart ts-less-success path (dead
code: the decoder rejects a successful MutationResponse without ts) and wall-clock
"oldest in-flight" metrics (no such concept here; counts are).
"""

from __future__ import annotations

import asyncio
import gc
from typing import Any

import msgspec
import pytest

from dartvex_auth_better import ClientClosedError, ConnectionLostError, ConvexError, ProtocolError
from dartvex_auth_better.convex._protocol import (
    ActionMsg,
    ActionResponse,
    MutationMsg,
    MutationResponse,
    decode_server_message,
    encode_ts,
)
from dartvex_auth_better.convex._requests import Request, RequestManager
from dartvex_auth_better.convex._values import encode_value

pytestmark = pytest.mark.anyio


def response(
    kind: str, request_id: int, *, success: bool = True, result: Any = None, **extra: Any
) -> MutationResponse | ActionResponse:
    frame: dict[str, Any] = {
        "type": kind,
        "requestId": request_id,
        "success": success,
        "result": encode_value(result),
        **extra,
    }
    decoded = decode_server_message(msgspec.json.encode(frame))
    assert isinstance(decoded, MutationResponse | ActionResponse)
    return decoded


def ok(request_id: int, result: Any = None, ts: int = 5) -> MutationResponse | ActionResponse:
    return response("MutationResponse", request_id, result=result, ts=encode_ts(ts))


def outcome(request: Request) -> Any:
    assert request.future.done(), "still pending"
    exc = request.future.exception()
    return exc if exc is not None else request.future.result()


def sent(manager: RequestManager, kind: str, path: str = "m:f") -> Request:
    request = manager.new_request(kind, path, [{}])  # type: ignore[arg-type]
    assert manager.claim_for_write(request.message.request_id)
    return request


async def test_one_request_id_counter_shared_by_mutations_and_actions():
    manager = RequestManager()
    ids = [
        manager.new_request("mutation", "m:a", [{}]).message,
        manager.new_request("action", "a:b", [{}]).message,
        manager.new_request("mutation", "m:c", [{}]).message,
    ]
    assert [(type(m), m.request_id) for m in ids] == [
        (MutationMsg, 0),
        (ActionMsg, 1),
        (MutationMsg, 2),
    ]


async def test_claim_for_write_only_moves_a_request_forward():
    manager = RequestManager()
    request = manager.new_request("mutation", "m:f", [{}])
    assert request.status == "not_sent"
    assert manager.claim_for_write(0)
    assert request.status == "sent"
    manager.on_response(ok(0, ts=9), observed_ts=0)
    assert request.status == "completed"
    assert manager.claim_for_write(0)  # e.g. re-sent after a reconnect
    assert request.status == "completed"
    assert not manager.claim_for_write(42)  # unknown: not written


async def test_starts_with_nothing_outstanding():
    manager = RequestManager()
    assert manager.outstanding_ids() == set()
    assert manager.counts() == (0, 0)
    assert manager.restart() == []


async def test_a_parked_mutation_stays_outstanding_until_a_transition_covers_it():
    manager = RequestManager()
    request = sent(manager, "mutation")
    assert manager.on_response(ok(0, "r", ts=5), observed_ts=0) == set()
    restart_ids = manager.outstanding_ids()
    assert manager.restart() == [request.message]  # re-sent even though answered
    assert manager.has_outstanding(restart_ids)

    # The de-duplicated answer to the re-send changes nothing.
    assert manager.on_response(ok(0, "duplicate", ts=5), observed_ts=0) == set()
    assert manager.has_outstanding(restart_ids)
    assert manager.on_transition(4) == set()
    assert manager.on_transition(5) == {0}
    assert not manager.has_outstanding(restart_ids)
    assert outcome(request) == "r"


async def test_restart_fails_sent_actions_and_replays_unsent_ones():
    manager = RequestManager()
    in_flight = sent(manager, "action", "a:inflight")
    waiting = manager.new_request("action", "a:waiting", [{}])
    assert manager.restart() == [waiting.message]
    error = outcome(in_flight)
    assert isinstance(error, ConnectionLostError) and error.retryable
    assert "a:inflight" in str(error)
    assert manager.outstanding_ids() == {waiting.message.request_id}
    assert manager.on_response(response("ActionResponse", 1, result=3), 0) == {1}
    assert outcome(waiting) == 3
    assert manager.outstanding_ids() == set()


async def test_disconnect_fails_sent_actions_but_keeps_every_mutation():
    manager = RequestManager()
    action = sent(manager, "action")
    unsent_action = manager.new_request("action", "a:later", [{}])
    mutation = sent(manager, "mutation")
    parked = sent(manager, "mutation")
    manager.on_response(ok(parked.message.request_id, ts=50), observed_ts=0)

    manager.on_disconnect()

    assert isinstance(outcome(action), ConnectionLostError)
    assert not unsent_action.future.done()
    assert not mutation.future.done() and not parked.future.done()
    assert [m.request_id for m in manager.restart()] == [1, 2, 3]


async def test_the_writer_skips_a_queued_frame_whose_caller_gave_up():
    manager = RequestManager()
    kept = manager.new_request("mutation", "m:f", [{}])
    dropped = manager.new_request("mutation", "m:g", [{}])
    manager.forget(dropped)  # what SyncCore.abandon does for a request not yet written
    assert manager.claim_for_write(kept.message.request_id)
    assert not manager.claim_for_write(dropped.message.request_id)
    assert [m.request_id for m in manager.restart()] == [kept.message.request_id]


@pytest.mark.parametrize(
    "finish",
    ["failure", "forget", "fail_all"],
)
async def test_a_failure_forget_or_fail_all_clears_the_outstanding_entry(finish: str):
    manager = RequestManager()
    request = sent(manager, "mutation")
    ids = manager.outstanding_ids()
    if finish == "failure":
        dropped = manager.on_response(
            response("MutationResponse", 0, success=False, result="no"), 0
        )
        assert dropped == {0}
        assert isinstance(outcome(request), ConvexError)
    elif finish == "forget":
        manager.forget(request)
    else:
        error = ClientClosedError("closed")
        manager.fail_all(error)
        assert outcome(request) is error
    assert not manager.has_outstanding(ids)
    assert manager.restart() == []


async def test_drop_signals_say_which_optimistic_layers_can_go():
    manager = RequestManager()
    failing = sent(manager, "mutation")
    parked = sent(manager, "mutation")
    covered = sent(manager, "mutation")
    assert manager.on_response(response("MutationResponse", 0, success=False, result="x"), 0) == {0}
    assert manager.on_response(ok(1, ts=20), observed_ts=10) == set()
    assert manager.on_response(ok(2, "early", ts=10), observed_ts=10) == {2}
    assert outcome(covered) == "early"
    assert manager.on_transition(20) == {1}
    assert outcome(parked) is None
    assert isinstance(outcome(failing), ConvexError)


async def test_responses_for_unknown_requests_are_ignored():
    manager = RequestManager()
    assert manager.on_response(ok(7), observed_ts=0) == set()
    assert manager.on_response(response("ActionResponse", 8), observed_ts=0) == set()


async def test_a_failed_request_carries_message_data_and_log_lines():
    manager = RequestManager()
    request = sent(manager, "action")
    manager.on_response(
        response(
            "ActionResponse",
            0,
            success=False,
            result="Uncaught Error: nope",
            errorData={"code": "E"},
            logLines=["[ERROR] nope"],
        ),
        0,
    )
    error = outcome(request)
    assert isinstance(error, ConvexError) and not error.retryable
    assert (error.message, error.data, error.log_lines) == (
        "Uncaught Error: nope",
        {"code": "E"},
        ["[ERROR] nope"],
    )


async def test_a_failure_whose_result_is_not_a_message_gets_a_fallback_message():
    manager = RequestManager()
    request = sent(manager, "mutation")
    manager.on_response(response("MutationResponse", 0, success=False, result={"x": 1}), 0)
    error = outcome(request)
    assert isinstance(error, ConvexError) and error.message == "function failed"
    assert error.data is None and error.log_lines == []


async def test_an_invalid_result_value_fails_the_call_with_a_protocol_error():
    manager = RequestManager()
    request = sent(manager, "action")
    frame = b'{"type":"ActionResponse","requestId":0,"success":true,"result":{"$float":"AQ=="}}'
    decoded = decode_server_message(frame)
    assert isinstance(decoded, ActionResponse)
    manager.on_response(decoded, 0)
    assert isinstance(outcome(request), ProtocolError)


@pytest.mark.parametrize("kind", ["MutationResponse", "ActionResponse"])
async def test_a_failure_with_invalid_error_data_fails_the_call_with_a_protocol_error(kind: str):
    # The error is built before the request is dropped: a decode failure must still
    # finish the call, or it hangs forever (even a close could not reach it).
    manager = RequestManager()
    request = sent(manager, "mutation" if kind == "MutationResponse" else "action")
    frame = (
        b'{"type":"%s","requestId":0,"success":false,"result":"x","logLines":[],'
        b'"errorData":{"$integer":"AQ=="}}' % kind.encode()
    )
    decoded = decode_server_message(frame)
    assert isinstance(decoded, MutationResponse | ActionResponse)
    assert manager.on_response(decoded, 0) == {0}
    error = outcome(request)
    assert isinstance(error, ProtocolError) and "$integer" in str(error)
    assert len(manager) == 0 and manager.restart() == []


async def test_counts_rise_and_fall():
    manager = RequestManager()
    m1 = sent(manager, "mutation")
    sent(manager, "mutation")
    sent(manager, "action")
    assert manager.counts() == (2, 1)
    manager.on_response(ok(0, ts=9), observed_ts=0)
    assert manager.counts() == (2, 1)  # parked: still in flight until visible
    manager.on_transition(9)
    assert outcome(m1) is None
    manager.on_response(response("ActionResponse", 2), observed_ts=0)
    assert manager.counts() == (1, 0)
    assert len(manager) == 1


async def test_a_transition_resolves_exactly_the_mutations_it_covers():
    manager = RequestManager()
    requests = [sent(manager, "mutation") for _ in range(3)]
    for rid in (2, 0, 1):
        manager.on_response(ok(rid, f"r{rid}", ts=10 + rid), observed_ts=0)
    assert manager.on_transition(11) == {0, 1}
    assert not requests[2].future.done()
    assert manager.on_transition(12) == {2}
    assert [outcome(r) for r in requests] == ["r0", "r1", "r2"]
    assert len(manager) == 0


async def test_fail_all_fails_everything_and_nothing_is_replayed():
    manager = RequestManager()
    requests = [
        sent(manager, "mutation"),
        manager.new_request("action", "a:f", [{}]),
        sent(manager, "mutation"),
    ]
    manager.on_response(ok(2, ts=99), observed_ts=0)
    error = ClientClosedError("closed")
    manager.fail_all(error)
    assert all(outcome(r) is error for r in requests)
    assert manager.restart() == []
    assert manager.counts() == (0, 0)


async def test_a_cancelled_caller_is_not_sent_a_result():
    manager = RequestManager()
    request = sent(manager, "mutation")
    request.future.cancel()
    # Neither the answer nor a failure may touch the cancelled future.
    manager.on_response(ok(0, ts=1), observed_ts=5)
    assert request.future.cancelled() and len(manager) == 0
    other = sent(manager, "action")
    other.future.cancel()
    manager.fail_all(ClientClosedError("closed"))
    assert other.future.cancelled()


async def test_a_failed_request_nobody_awaits_does_not_log_an_unretrieved_exception():
    loop = asyncio.get_running_loop()
    seen: list[dict[str, Any]] = []
    previous = loop.get_exception_handler()
    loop.set_exception_handler(lambda _loop, context: seen.append(context))
    try:
        manager = RequestManager()
        manager.new_request("mutation", "m:f", [{}])
        sent(manager, "action")
        manager.fail_all(ClientClosedError("the Convex client was closed"))
        del manager
        gc.collect()
    finally:
        loop.set_exception_handler(previous)
    assert seen == []


async def test_an_awaited_failed_request_still_raises():
    manager = RequestManager()
    request = manager.new_request("mutation", "m:f", [{}])
    manager.fail_all(ClientClosedError("closed"))
    with pytest.raises(ClientClosedError):
        await request.future


async def test_claim_for_write_marks_a_live_request_sent_and_refuses_a_dropped_one():
    manager = RequestManager()
    kept = manager.new_request("action", "a:b", [{}])
    dropped = manager.new_request("action", "a:c", [{}])
    manager.forget(dropped)
    assert manager.claim_for_write(kept.message.request_id)
    assert kept.status == "sent"
    assert manager.claim_for_write(kept.message.request_id)  # a re-send: still allowed
    assert kept.status == "sent"
    assert not manager.claim_for_write(dropped.message.request_id)
    assert dropped.status == "not_sent"
