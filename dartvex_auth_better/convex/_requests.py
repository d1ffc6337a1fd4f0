"""Mutations and actions in flight, and what happens to them across reconnects.

A mutation's future resolves only when its write is visible: after its successful
MutationResponse *and* a Transition whose end timestamp reaches the mutation's ``ts``.
On reconnect every unresolved mutation is sent again (the server de-duplicates by session
id and request id); an action that was already sent fails with ``ConnectionLostError``,
because actions are not idempotent.
"""

from __future__ import annotations

import asyncio
import logging
from dataclasses import dataclass
from typing import Any, Literal

import msgspec

from .._errors import ConnectionLostError, ConvexError, DartvexError, ProtocolError
from .._json import JSON_ERRORS
from ._protocol import ActionMsg, ActionResponse, MutationMsg, MutationResponse, decode_ts
from ._values import decode_json, decode_raw_or_none

__all__ = ["Request", "RequestManager", "function_logger", "log_function_lines"]

function_logger = logging.getLogger("dartvex_auth_better.convex.function")
"""Server-side log lines of functions (``console.log`` in Convex), at INFO, once each."""


def log_function_lines(
    kind: Literal["query", "mutation", "action"],
    udf_path: str,
    lines: list[str],
    *,
    request_id: int | None = None,
    query_id: int | None = None,
) -> None:
    """Emit a function's log lines, one record per line, tagged with what produced them
    (``extra``: ``convex_kind``, ``convex_function`` and ``convex_request_id`` or
    ``convex_query_id``)."""
    if not lines or not function_logger.isEnabledFor(logging.INFO):
        return
    extra: dict[str, object] = {"convex_kind": kind, "convex_function": udf_path}
    if request_id is not None:
        extra["convex_request_id"] = request_id
    if query_id is not None:
        extra["convex_query_id"] = query_id
    for line in lines:
        function_logger.info("%s %s: %s", kind, udf_path, line, extra=extra)


# A call's result or error that cannot be decoded, or is not a valid Convex value.
_RESULT_ERRORS: tuple[type[Exception], ...] = (*JSON_ERRORS, DartvexError)


@dataclass(slots=True, eq=False)
class Request:
    message: MutationMsg | ActionMsg
    future: asyncio.Future[Any]
    # not_sent: waiting for a socket; sent: on the wire; completed: mutation succeeded,
    # waiting for a Transition to reach `ts`.
    status: Literal["not_sent", "sent", "completed"] = "not_sent"
    ts: int = 0
    result: msgspec.Raw | None = None

    @property
    def is_mutation(self) -> bool:
        return isinstance(self.message, MutationMsg)


class RequestManager:
    def __init__(self) -> None:
        self._next_request_id = 0
        self._inflight: dict[int, Request] = {}

    def __len__(self) -> int:
        return len(self._inflight)

    def new_request(
        self, kind: Literal["mutation", "action"], udf_path: str, args: list[Any]
    ) -> Request:
        request_id = self._next_request_id
        self._next_request_id += 1
        msg: MutationMsg | ActionMsg
        if kind == "mutation":
            msg = MutationMsg(request_id=request_id, udf_path=udf_path, args=args)
        else:
            msg = ActionMsg(request_id=request_id, udf_path=udf_path, args=args)
        request = Request(msg, asyncio.get_running_loop().create_future())
        self._inflight[request_id] = request
        return request

    def forget(self, request: Request) -> None:
        """Drop a request whose caller went away (cancelled)."""
        self._inflight.pop(request.message.request_id, None)

    def fail_unfinished(self, error: DartvexError) -> set[int]:
        """Fail every request whose outcome is not known yet (the identity it was made
        under is gone: it must not run under another one). Mutations already applied and
        only waiting to become visible keep their result."""
        failed: set[int] = set()
        for rid in sorted(self._inflight):
            request = self._inflight[rid]
            if request.status != "completed":
                del self._inflight[rid]
                _fail(request, error)
                failed.add(rid)
        return failed

    def claim_for_write(self, request_id: int) -> bool:
        """What the writer asks just before a request's frame goes on the wire: False when
        its caller gave up before it was written (the frame is skipped); otherwise the
        request counts as sent from now on (a later status is kept) and True."""
        request = self._inflight.get(request_id)
        if request is None:
            return False
        if request.status == "not_sent":
            request.status = "sent"
        return True

    def on_response(
        self, msg: MutationResponse | ActionResponse, observed_ts: int, ts: int | None = None
    ) -> set[int]:
        """Handle a response; returns the ids of requests it finished (for optimistic
        layers to drop). ``ts``: the response's ``ts``, when the caller decoded it already."""
        request = self._inflight.get(msg.request_id)
        if request is None or request.status == "completed":
            return set()  # a duplicate answer to a re-sent mutation, or a cancelled caller
        # The first answer only: a duplicate (above) is not logged again.
        if msg.log_lines:
            log_function_lines(
                "mutation" if request.is_mutation else "action",
                request.message.udf_path,
                msg.log_lines,
                request_id=msg.request_id,
            )
        if not msg.success:
            # Build the error before dropping the request: a malformed errorData must fail
            # this call (with the ProtocolError), never leave its future unset.
            error: DartvexError
            try:
                error = _function_error(msg)
            except _RESULT_ERRORS as exc:
                error = exc if isinstance(exc, DartvexError) else ProtocolError(str(exc))
            del self._inflight[msg.request_id]
            _fail(request, error)
            return {msg.request_id}
        if isinstance(msg, ActionResponse):
            del self._inflight[msg.request_id]
            _succeed(request, msg.result)
            return {msg.request_id}
        assert msg.ts is not None  # the decoder rejects a successful response without ts
        request.status = "completed"
        request.ts = decode_ts(msg.ts) if ts is None else ts
        request.result = msg.result
        if request.ts <= observed_ts:
            del self._inflight[msg.request_id]
            _succeed(request, request.result)
            return {msg.request_id}
        return set()

    def on_transition(self, ts: int) -> set[int]:
        """Resolve every completed mutation whose write this Transition made visible;
        returns their ids."""
        inflight = self._inflight
        if not inflight:
            return set()
        if len(inflight) == 1:  # one call at a time: no comprehension, no sort
            ((rid, request),) = inflight.items()
            if request.status != "completed" or request.ts > ts:
                return set()
            del inflight[rid]
            _succeed(request, request.result)
            return {rid}
        done = {rid for rid, r in inflight.items() if r.status == "completed" and r.ts <= ts}
        for rid in sorted(done):
            request = self._inflight.pop(rid)
            _succeed(request, request.result)
        return done

    def counts(self) -> tuple[int, int]:
        """(mutations, actions) in flight."""
        mutations = sum(1 for r in self._inflight.values() if r.is_mutation)
        return mutations, len(self._inflight) - mutations

    def on_disconnect(self) -> None:
        """The socket closed. Actions sent on it fail now (retryably), not when a later
        socket opens: that may take long, or never happen."""
        for rid in sorted(self._inflight):
            request = self._inflight[rid]
            if not request.is_mutation and request.status == "sent":
                del self._inflight[rid]
                _fail(request, _connection_lost(request))

    def restart(self) -> list[MutationMsg | ActionMsg]:
        """What to send on a new socket, in request order; fails actions already sent."""
        to_send: list[MutationMsg | ActionMsg] = []
        for rid in sorted(self._inflight):
            request = self._inflight[rid]
            if request.is_mutation:
                to_send.append(request.message)
            elif request.status == "sent":
                del self._inflight[rid]
                _fail(request, _connection_lost(request))
            else:
                to_send.append(request.message)
        return to_send

    def has_outstanding(self, request_ids: set[int]) -> bool:
        return any(rid in self._inflight for rid in request_ids)

    def outstanding_ids(self) -> set[int]:
        return set(self._inflight)

    def fail_all(self, error: DartvexError) -> None:
        requests = list(self._inflight.values())
        self._inflight.clear()
        for request in requests:
            _fail(request, error)


def _connection_lost(request: Request) -> ConnectionLostError:
    return ConnectionLostError(
        f"connection lost while action {request.message.udf_path!r} was in flight; it may "
        "or may not have run"
    )


def _function_error(msg: MutationResponse | ActionResponse) -> ConvexError:
    try:
        decoded = msgspec.json.decode(msg.result)
    except JSON_ERRORS:
        decoded = None
    message = decoded if isinstance(decoded, str) else "function failed"
    data = decode_raw_or_none(msg.error_data)
    return ConvexError(message, data=data, log_lines=msg.log_lines)


def _succeed(request: Request, raw: msgspec.Raw | None) -> None:
    if request.future.done():
        return
    try:
        value = decode_json(raw) if raw is not None else None
    except _RESULT_ERRORS as exc:
        _set_exception(request.future, exc)
        return
    request.future.set_result(value)


def _fail(request: Request, error: BaseException) -> None:
    if not request.future.done():
        _set_exception(request.future, error)


def _set_exception(future: asyncio.Future[Any], error: BaseException) -> None:
    # The caller awaiting the future still gets the error; a future nobody awaits (its
    # caller went away) must not log "Future exception was never retrieved" at exit.
    future.set_exception(error)
    future.exception()  # marks it retrieved
