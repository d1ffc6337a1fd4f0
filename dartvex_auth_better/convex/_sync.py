"""The sync core: the protocol state machine, with no sockets and no tasks.

It turns user operations into frames and server frames into results. The socket loop in
``_client.py`` feeds it whole server messages and gives it a ``send`` function that
queues frames on the current socket (or drops them while there is none: everything a
new socket needs is rebuilt by ``restart()``).
"""

from __future__ import annotations

import binascii
import functools
import time
from collections.abc import Callable
from typing import Any, Literal

from .._errors import DartvexError, ProtocolError, ServerFatalError
from .._logging import convex_logger, redact
from ._auth import AuthManager
from ._optimistic import OptimisticLayers, OptimisticUpdate
from ._protocol import (
    INITIAL_TS,
    ActionResponse,
    AddQuery,
    AuthError,
    Connect,
    FatalError,
    MutationResponse,
    Ping,
    QueryFailed,
    QueryUpdated,
    RemoveQuery,
    ServerMessage,
    StateVersion,
    Transition,
    TransitionChunk,
    decode_ts,
    encode_client_message,
    encode_ts,
)
from ._query_set import LocalQuery, QueryResult, QuerySet
from ._requests import Request, RequestManager, log_function_lines

__all__ = ["INITIAL_VERSION", "Outgoing", "SyncCore"]

INITIAL_VERSION = StateVersion(query_set=0, identity=0, ts=INITIAL_TS)

# A frame for the writer: the encoded bytes, plus the request id it carries (if any).
Outgoing = tuple[bytes, int | None]


_a2b_base64 = binascii.a2b_base64
_int_from_bytes = int.from_bytes


class SyncCore:
    def __init__(self, session_id: str, auth: AuthManager | None = None) -> None:
        self.session_id = session_id
        self.query_set = QuerySet()
        self.requests = RequestManager()
        self.optimistic = OptimisticLayers(self.query_set)
        self.auth = auth if auth is not None else AuthManager()
        self.remote_version = INITIAL_VERSION
        self._remote_ts = 0  # remote_version.ts, decoded (set with it)
        self.max_observed_ts = 0
        self.connection_count = 0
        self.last_close_reason: str | None = "InitialConnect"
        self.terminal_error: DartvexError | None = None
        self._send: Callable[[Outgoing], None] | None = None
        # Set when the server sent FatalError: the socket loop closes the socket, then
        # terminates with that error, which must reach every pending call.
        self._fatal_seen = False
        # Called with the AuthError message; the socket loop decides what happens next.
        self.on_auth_error: Callable[[AuthError], None] = self._default_auth_error
        self._restart_request_ids: set[int] = set()
        self.paused = False
        self._held: list[Outgoing] = []
        self._synced = True
        # Called when the client catches up after a reconnect (the socket loop resets its
        # backoff there).
        self.on_synced: Callable[[], None] = lambda: None
        # Removes not sent yet: they wait for the end of the event-loop turn, so that a
        # query closed and another opened in the same turn (a one-off query() after
        # another, a watch changing its args) go out as one ModifyQuerySet, answered by
        # one Transition. Any other frame sends them first, so the order on the wire is
        # the order of the calls. ``defer`` runs a callback at the end of the turn (the
        # client sets it to loop.call_soon); None sends every Remove at once.
        self.defer: Callable[[Callable[[], None]], object] | None = None
        # The same from any thread (loop.call_soon_threadsafe): for finalizers.
        self.defer_from_any_thread: Callable[[Callable[[], None]], object] | None = None
        self._removes: list[RemoveQuery] = []

    @property
    def send(self) -> Callable[[Outgoing], None] | None:
        """Set by the socket loop: queues a frame on the open socket; None while there is
        none. Setting it back to None tells the core that the socket closed."""
        return self._send

    @send.setter
    def send(self, send: Callable[[Outgoing], None] | None) -> None:
        closed = send is None and self._send is not None
        self._send = send
        self._removes = []  # for the old socket; a new one starts from restart()
        if closed and self.terminal_error is None and not self._fatal_seen:
            self.requests.on_disconnect()

    # -- user operations ------------------------------------------------------------------

    def _emit(self, frame: bytes, request_id: int | None = None) -> None:
        """Send a frame, after the Removes still waiting (calls leave in call order)."""
        if self._removes:
            self._send_removes()
        self._put(frame, request_id)

    def _put(self, frame: bytes, request_id: int | None = None) -> None:
        send = self._send
        if send is None:
            return
        if self.paused:
            self._held.append((frame, request_id))
        else:
            send((frame, request_id))

    def pause(self) -> None:
        """Hold every frame back (while the first token of a flow is being fetched), so
        nothing goes out under the wrong identity."""
        if self._removes:
            self._send_removes()  # made before the pause: they go out as they would have
        self.paused = True

    def resume(self) -> None:
        """Send the Authenticate for the token now in force, then what was held."""
        if not self.paused:
            return
        self.paused = False
        held, self._held = self._held, []
        if self.send is None:
            return  # the next socket's restart() rebuilds everything from state
        self._emit(self._build_authenticate())
        for frame in held:
            self.send(frame)

    def subscribe(self, udf_path: str, args: list[Any], waker: Any) -> LocalQuery:
        query, add = self.query_set.subscribe(udf_path, args, waker)
        if add is not None:
            self.optimistic.refresh(query)
            if query.effective is not None:
                query.notify()  # an optimistic value is already there: show it at once
            self._modify(add)
        return query

    def unsubscribe(self, query: LocalQuery, waker: Any) -> None:
        remove = self.query_set.unsubscribe(query, waker)
        if remove is not None:
            self._modify(remove)
            self._check_synced()

    def _modify(self, change: AddQuery | RemoveQuery) -> None:
        # While disconnected the change lives only in the query set; the restart
        # ModifyQuerySet on the next socket carries the whole set.
        if self._send is None:
            return
        removes = self._removes
        if type(change) is RemoveQuery:
            defer = self.defer
            if defer is not None and not self.paused:
                if not removes:
                    defer(self._send_removes)
                removes.append(change)
                return
        if removes:
            # The Removes waiting for the end of the turn go out with this change.
            self._removes = []
            changes: list[AddQuery | RemoveQuery] = [*removes, change]
        else:
            changes = [change]
        # _put, not _emit: this frame's version is taken, so nothing may go before it.
        self._put(encode_client_message(self.query_set.modify(changes)))

    def _send_removes(self) -> None:
        """Send the Removes still waiting (at the end of the turn, or before another
        frame); nothing when they were sent or dropped meanwhile."""
        removes = self._removes
        if not removes:
            return
        self._removes = []
        if self._send is not None:
            self._put(encode_client_message(self.query_set.modify([*removes])))

    def unsubscribe_soon(self, query: LocalQuery, waker: Any) -> None:
        """``unsubscribe`` on the loop's next turn: for a finalizer, which may run inside
        the core's own code (between a frame's version and its send, say), or in another
        thread (where the last reference went)."""
        defer = self.defer_from_any_thread
        if defer is None:
            self.unsubscribe(query, waker)
        else:
            defer(functools.partial(self.unsubscribe, query, waker))

    def request(
        self,
        kind: Literal["mutation", "action"],
        udf_path: str,
        args: list[Any],
        optimistic_update: OptimisticUpdate | None = None,
    ) -> Request:
        request = self.requests.new_request(kind, udf_path, args)
        # Encoded now, before anything else depends on the request: a frame that cannot be
        # encoded fails here, at the call, not when it is written or replayed on reconnect.
        try:
            frame = encode_client_message(request.message)
            changed = (
                self.optimistic.add(request.message.request_id, optimistic_update)
                if optimistic_update is not None
                else None
            )
        except BaseException:
            self.requests.forget(request)
            raise
        if changed:
            self._notify_tokens(changed)
        self._emit(frame, request.message.request_id)
        return request

    def abandon(self, request: Request) -> None:
        """The caller went away. A request not yet written to a socket is dropped (the
        writer skips its queued frame, ``RequestManager.claim_for_write``); one already
        written stays tracked, so a reconnect re-sends it and the server applies it exactly
        once."""
        if request.status == "not_sent":
            self.requests.forget(request)
        self._notify_tokens(self.optimistic.rebuild({request.message.request_id}))

    def send_authenticate(self) -> None:
        # Built now, with the token in force now: a later set_auth cannot rewrite it, and
        # calls made after this one go out after it.
        # Without a socket restart() sends it; while paused, resume() does (building one
        # now would put identity versions out of order).
        if self.send is not None and not self.paused:
            self._emit(self._build_authenticate())

    def _build_authenticate(self) -> bytes:
        msg = self.auth.authenticate_message()
        convex_logger.debug("sending Authenticate (%s)", redact(msg.value))
        return encode_client_message(msg)

    # -- socket lifecycle ------------------------------------------------------------------

    def restart(self) -> list[Outgoing]:
        """Everything a new socket must carry first, in the protocol's order: Connect,
        Authenticate, the whole query set, unanswered mutations and unsent actions (in
        request order). Actions already sent on the old socket fail, retryably."""
        self._held = []  # rebuilt below from state
        self._removes = []  # the query set below no longer holds them
        self.auth.reset_socket()
        self.remote_version = INITIAL_VERSION
        self._remote_ts = 0
        connect = Connect(
            session_id=self.session_id,
            connection_count=self.connection_count,
            last_close_reason=self.last_close_reason,
            client_ts=int(time.time() * 1000),
            max_observed_timestamp=(
                encode_ts(self.max_observed_ts) if self.max_observed_ts else None
            ),
        )
        frames: list[Outgoing] = [(encode_client_message(connect), None)]
        if self.auth.is_set:
            frames.append((self._build_authenticate(), None))
        frames.append((encode_client_message(self.query_set.restart()), None))
        for msg in self.requests.restart():
            frames.append((encode_client_message(msg), msg.request_id))
        self._restart_request_ids = self.requests.outstanding_ids()
        self._synced = False
        self.connection_count += 1
        self.last_close_reason = None
        return frames

    # -- server messages -------------------------------------------------------------------

    def handle(self, msg: ServerMessage) -> None:
        """Apply one server message. Raises ProtocolError for a violation (the caller
        reconnects) and ServerFatalError for FatalError (the caller stops)."""
        if isinstance(msg, Transition):
            self.handle_transition(msg)
        elif isinstance(msg, MutationResponse | ActionResponse):
            self.handle_response(msg)
        elif isinstance(msg, AuthError):
            self.on_auth_error(msg)
        elif isinstance(msg, FatalError):
            self._fatal_seen = True
            raise ServerFatalError(f"the Convex server reported a fatal error: {msg.error}")
        elif isinstance(msg, Ping):
            pass
        elif isinstance(msg, TransitionChunk):  # pragma: no cover - reassembled earlier
            raise ProtocolError("unexpected TransitionChunk")

    def handle_response(self, msg: MutationResponse | ActionResponse) -> None:
        """``handle`` for a call's response (the socket loop calls it directly)."""
        ts: int | None = None
        if type(msg) is MutationResponse and msg.success and msg.ts is not None:
            ts = decode_ts(msg.ts)
            if ts > self.max_observed_ts:
                self.max_observed_ts = ts
        dropped = self.requests.on_response(msg, self._remote_ts, ts)
        if dropped:
            self._notify_tokens(self.optimistic.rebuild(dropped))
        if not self._synced:
            self._check_synced()

    def handle_transition(self, msg: Transition) -> None:
        """``handle`` for a Transition (the socket loop calls it directly)."""
        start = msg.start_version
        if start != self.remote_version:
            raise ProtocolError(
                "Transition does not start at the client's current version "
                f"(expected {self.remote_version}, got {start})"
            )
        end = msg.end_version
        # decode_ts inlined (one Python call less per Transition); anything but 8 bytes of
        # strict base64 goes to decode_ts, which raises its ProtocolError.
        try:
            raw_ts = _a2b_base64(end.ts, strict_mode=True)
        except (ValueError, TypeError):  # binascii.Error is a ValueError
            raw_ts = b""
        end_ts = _int_from_bytes(raw_ts, "little") if len(raw_ts) == 8 else decode_ts(end.ts)
        mods = msg.modifications
        # (Private attributes of sibling classes below: a len() or property call per
        # Transition is measurable here.)
        if (
            len(mods) == 1
            and type(mods[0]) is QueryUpdated
            and not mods[0].log_lines
            and not self.requests._inflight
            and not self.optimistic._layers
        ):
            # The hot path of a busy subscription: one new value, and no request or
            # optimistic layer that could depend on this Transition. The same steps as
            # below, minus those that would do nothing.
            query = self.query_set.apply_value(mods[0])
            self.remote_version = end
            self._remote_ts = end_ts
            if end_ts > self.max_observed_ts:
                self.max_observed_ts = end_ts
            if query is not None:
                query.notify()
        else:
            changed = self.query_set.apply_transition(mods, self._log_query_lines) if mods else []
            self.remote_version = end
            self._remote_ts = end_ts
            if end_ts > self.max_observed_ts:
                self.max_observed_ts = end_ts
            completed = self.requests.on_transition(end_ts) if self.requests._inflight else None
            # Drop the layers of mutations this Transition made visible in the same pass
            # that shows their server results, so no value flickers.
            if self.optimistic._layers or (completed and self.optimistic._overlay):
                tokens = self.optimistic.rebuild(completed or set())
                for query in changed:
                    query.notify()
                self._notify_tokens(tokens, skip=changed)
            else:
                for query in changed:
                    query.notify()
        if end.identity > start.identity:
            self.auth.on_identity_advanced(start.identity, end.identity)
        if not self._synced:
            self._check_synced()

    @staticmethod
    def _log_query_lines(
        query: LocalQuery, previous: QueryResult | None, modification: QueryUpdated | QueryFailed
    ) -> None:
        # Once per result: the same result again (a reconnect re-sends it) does not log
        # again; a removed query's late result is not logged (it is not applied at all).
        if not _same_result(previous, modification):
            log_function_lines(
                "query", query.udf_path, modification.log_lines, query_id=query.query_id
            )

    def _notify_tokens(self, tokens: set[bytes], skip: list[LocalQuery] | None = None) -> None:
        for token in tokens:
            query = self.query_set.by_token(token)
            if query is not None and (skip is None or query not in skip):
                query.notify()

    def _check_synced(self) -> None:
        # "Synced past the reconnect": every query re-added has an answer, every request
        # outstanding at the reconnect has finished, and auth is confirmed.
        if self._synced:
            return
        if (
            self.query_set.synced()
            and not self.requests.has_outstanding(self._restart_request_ids)
            and not self.auth.awaiting_confirmation
        ):
            self._synced = True
            self.on_synced()

    @property
    def synced(self) -> bool:
        return self._synced

    def fail_unfinished(self, error: DartvexError) -> None:
        """The identity is gone for good: fail every request whose outcome is unknown, so
        none runs under another identity, and roll back their optimistic updates."""
        self._notify_tokens(self.optimistic.rebuild(self.requests.fail_unfinished(error)))

    def is_current(self, query: LocalQuery) -> bool:
        """True when the query's server result is current: the socket is open and the
        result arrived on it (not carried over from before a reconnect)."""
        return (
            self._send is not None
            and query.server is not None
            and self.query_set.answered_since_restart(query.query_id)
        )

    def _default_auth_error(self, msg: AuthError) -> None:
        self.auth.on_auth_error(msg)

    # -- termination ---------------------------------------------------------------------

    def terminate(self, error: DartvexError) -> None:
        """Fail everything pending with ``error``; no further use is possible."""
        if self.terminal_error is not None:
            return
        self.terminal_error = error
        self.send = None
        self.requests.fail_all(error)
        self.auth.fail_waiters(error)
        for query in self.query_set:
            for waker in query.subscribers:
                waker.set()


def _same_result(previous: QueryResult | None, modification: QueryUpdated | QueryFailed) -> bool:
    """Whether a server result repeats the one the query already has (value or error, and
    log lines)."""
    if previous is None or previous.log_lines != modification.log_lines:
        return False
    if isinstance(modification, QueryUpdated):
        return previous.raw is not None and bytes(previous.raw) == bytes(modification.value)
    return previous.error is not None and previous.error.message == modification.error_message
