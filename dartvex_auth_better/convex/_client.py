"""ConvexClient: the facade users hold, and the socket loop behind it."""

from __future__ import annotations

import asyncio
import enum
import math
import time
import uuid
from collections.abc import AsyncGenerator, Callable, Mapping
from types import TracebackType
from typing import Any, Literal, Self

import aiohttp
import anyio
import anyio.abc
from anyio.streams.memory import MemoryObjectReceiveStream, MemoryObjectSendStream

from .._errors import ClientClosedError, DartvexError, ProtocolError, ServerFatalError
from .._logging import convex_logger, redact, ws_logger
from .._urls import normalize_base_url, sync_url_for
from .._version import __version__
from ._auth import AuthState
from ._protocol import (
    INITIAL_TS,
    ActionResponse,
    AuthError,
    Connect,
    FatalError,
    MutationResponse,
    Ping,
    QueryRemoved,
    StateVersion,
    Transition,
    TransitionChunk,
    decode_server_message,
    decode_ts,
    encode_client_message,
    encode_ts,
)
from ._query_set import LocalQuery, QuerySet, canonical_udf_path
from ._requests import RequestManager
from ._transport import (
    CLIENT_INITIAL_BACKOFF,
    backoff_delay,
    initial_backoff_for,
    open_socket,
)
from ._values import encode_args

__all__ = ["ConnectionState", "ConvexClient", "Subscription"]

_INITIAL_VERSION = StateVersion(query_set=0, identity=0, ts=INITIAL_TS)

# A frame waiting for the writer: encoded bytes, or a builder called at send time (so an
# Authenticate reads the token in force when it goes out), plus the request id it carries.
_Outgoing = tuple[bytes | Callable[[], bytes], int | None]


class ConnectionState(enum.Enum):
    """Where the client's socket is."""

    DISCONNECTED = "disconnected"
    CONNECTING = "connecting"
    CONNECTED = "connected"
    CLOSED = "closed"
    FATAL = "fatal"


class _SocketEnded(Exception):
    """Internal: why a socket ended, and whether we or the server caused it."""

    def __init__(self, reason: str, *, server_caused: bool) -> None:
        super().__init__(reason)
        self.reason = reason
        self.server_caused = server_caused


class ConvexClient:
    """An asyncio client for a Convex deployment over the sync WebSocket.

    ``async with ConvexClient(url) as client:`` opens the socket in the background and
    keeps it open, reconnecting with jittered backoff when it drops; leaving the block
    cancels every background task and closes the socket (and the aiohttp session, when
    the client created it). The constructor does no I/O.
    """

    def __init__(
        self,
        deployment_url: str,
        *,
        session: aiohttp.ClientSession | None = None,
        allow_insecure: bool = False,
        connect_timeout: float = 10.0,
        inactivity_timeout: float = 60.0,
    ) -> None:
        self.url = normalize_base_url(
            deployment_url, name="deployment_url", allow_insecure=allow_insecure
        )
        self._sync_url = sync_url_for(self.url)
        self._session = session
        self._owns_session = session is None
        self._connect_timeout = connect_timeout
        self._inactivity_timeout = inactivity_timeout
        self._client_header = f"python-dartvex-auth-better-{__version__}"

        self._session_id = str(uuid.uuid4())
        self._query_set = QuerySet()
        self._requests = RequestManager()
        self._auth = AuthState()
        self._remote_version = _INITIAL_VERSION
        self._max_observed_ts = 0
        self._connection_count = 0
        self._last_close_reason: str | None = "InitialConnect"
        self._retries = 0
        self._synced_since_reconnect = True
        self._restart_request_ids: set[int] = set()

        self._out: MemoryObjectSendStream[_Outgoing] | None = None
        self._state = ConnectionState.DISCONNECTED
        self._state_changed = asyncio.Event()
        self._terminal_error: DartvexError | None = None
        self._task_group: anyio.abc.TaskGroup | None = None
        self._started = False

    # -- lifecycle -----------------------------------------------------------------------

    async def __aenter__(self) -> Self:
        if self._started:
            raise RuntimeError("a ConvexClient can be entered only once")
        self._started = True
        if self._session is None:
            self._session = aiohttp.ClientSession()
        self._task_group = anyio.create_task_group()
        await self._task_group.__aenter__()
        self._task_group.start_soon(self._run, name="dartvex_auth_better.convex.socket")
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.aclose()

    async def aclose(self) -> None:
        """Close the socket, fail pending calls with ClientClosedError, stop every task."""
        if self._state is ConnectionState.CLOSED:
            return
        self._terminate(ClientClosedError("the Convex client was closed"), ConnectionState.CLOSED)
        task_group, self._task_group = self._task_group, None
        try:
            if task_group is not None:
                task_group.cancel_scope.cancel()
                await task_group.__aexit__(None, None, None)
        finally:
            if self._owns_session and self._session is not None:
                with anyio.CancelScope(shield=True):
                    await self._session.close()

    @property
    def connection_state(self) -> ConnectionState:
        return self._state

    async def wait_connected(self) -> None:
        """Wait until the socket is open and the handshake is sent."""
        while self._state is not ConnectionState.CONNECTED:
            self._check_usable()
            self._state_changed.clear()
            await self._state_changed.wait()

    # -- auth ----------------------------------------------------------------------------

    async def set_auth(self, token: str | None) -> None:
        """Authenticate the connection with a JWT (None signs out of Convex).

        Returns once the server has confirmed the new identity; raises AuthRejectedError
        when the server refuses the token. Calls made after ``set_auth`` go out after the
        Authenticate, so awaiting it is not needed for ordering.
        """
        self._check_usable()
        self._auth.set_token(token)
        convex_logger.debug("auth token set (%s)", redact(token))
        waiter = self._auth.add_waiter()
        self._send_authenticate()
        await waiter

    # -- functions -----------------------------------------------------------------------

    def subscribe(self, name: str, args: Mapping[str, Any] | None = None) -> Subscription:
        """Subscribe to a query; iterate the result for its value now and on every change.

        Identical subscriptions share one server query. Leaving the ``async for`` loop (by
        ``break``, an exception or cancellation) or calling ``close()`` unsubscribes. A
        slow consumer skips intermediate values but always gets the latest one.
        """
        self._check_usable()
        return Subscription(self, canonical_udf_path(name), encode_args(args))

    async def query(self, name: str, args: Mapping[str, Any] | None = None) -> Any:
        """Run a query once and return its result (asks the server; no stale cache)."""
        subscription = self.subscribe(name, args)
        try:
            return await subscription.next()
        finally:
            subscription.close()

    async def mutation(self, name: str, args: Mapping[str, Any] | None = None) -> Any:
        """Run a mutation; returns once its write is visible to this client's queries."""
        return await self._request("mutation", name, args)

    async def action(self, name: str, args: Mapping[str, Any] | None = None) -> Any:
        """Run an action. If the socket drops after it was sent, ConnectionLostError."""
        return await self._request("action", name, args)

    async def _request(
        self, kind: Literal["mutation", "action"], name: str, args: Mapping[str, Any] | None
    ) -> Any:
        self._check_usable()
        request = self._requests.new_request(kind, canonical_udf_path(name), encode_args(args))
        self._send(encode_client_message(request.message), request.message.request_id)
        try:
            return await request.future
        finally:
            if not request.future.done() and request.status == "not_sent":
                self._requests.forget(request)

    # -- internals used by Subscription -----------------------------------------------------

    def _subscribe(self, udf_path: str, args: list[Any], waker: asyncio.Event) -> LocalQuery:
        query, add = self._query_set.subscribe(udf_path, args, waker)
        if add is not None:
            self._send_query_set_change(add)
        return query

    def _unsubscribe(self, query: LocalQuery, waker: asyncio.Event) -> None:
        remove = self._query_set.unsubscribe(query, waker)
        if remove is not None:
            self._send_query_set_change(remove)

    def _send_query_set_change(self, change: Any) -> None:
        # While disconnected the change lives only in the query set; the restart
        # ModifyQuerySet on the next socket carries the whole set.
        if self._out is not None:
            self._send(encode_client_message(self._query_set.modify([change])))

    def _check_usable(self) -> None:
        if self._terminal_error is not None:
            raise self._terminal_error
        if not self._started:
            raise RuntimeError("use the ConvexClient inside 'async with' (or call __aenter__)")

    # -- sending ----------------------------------------------------------------------------

    def _send(self, frame: bytes | Callable[[], bytes], request_id: int | None = None) -> None:
        if self._out is not None:
            self._out.send_nowait((frame, request_id))

    def _send_authenticate(self) -> None:
        if self._out is not None:
            self._send(self._build_authenticate)

    def _build_authenticate(self) -> bytes:
        msg = self._auth.authenticate_message()
        ws_logger.debug("sending %r", msg)
        return encode_client_message(msg)

    def _restart_frames(self) -> list[_Outgoing]:
        """Everything a new socket must carry first, in the protocol's order."""
        self._auth.reset_socket()
        self._remote_version = _INITIAL_VERSION
        frames: list[_Outgoing] = [
            (
                encode_client_message(
                    Connect(
                        session_id=self._session_id,
                        connection_count=self._connection_count,
                        last_close_reason=self._last_close_reason,
                        client_ts=int(time.time() * 1000),
                        max_observed_timestamp=(
                            encode_ts(self._max_observed_ts) if self._max_observed_ts else None
                        ),
                    )
                ),
                None,
            )
        ]
        if self._auth.is_set:
            frames.append((self._build_authenticate, None))
        frames.append((encode_client_message(self._query_set.restart()), None))
        for msg in self._requests.restart():
            frames.append((encode_client_message(msg), msg.request_id))
        self._restart_request_ids = self._requests.outstanding_ids()
        self._synced_since_reconnect = False
        return frames

    # -- the socket loop -----------------------------------------------------------------------

    def _set_state(self, state: ConnectionState) -> None:
        if self._state in (ConnectionState.CLOSED, ConnectionState.FATAL):
            return
        self._state = state
        self._state_changed.set()

    async def _run(self) -> None:
        try:
            await self._connect_forever()
        except Exception as exc:
            # A bug must not leave callers hanging: fail everything with a typed error.
            convex_logger.exception("the Convex socket task failed")
            self._terminate(
                DartvexError(f"the Convex client failed internally: {type(exc).__name__}"),
                ConnectionState.FATAL,
            )

    async def _connect_forever(self) -> None:
        assert self._session is not None
        while True:
            self._set_state(ConnectionState.CONNECTING)
            try:
                with anyio.fail_after(self._connect_timeout):
                    ws = await open_socket(
                        self._session,
                        self._sync_url,
                        client_header=self._client_header,
                        close_timeout=self._connect_timeout,
                    )
            except (aiohttp.ClientError, OSError, TimeoutError) as exc:
                ended = _SocketEnded(f"ConnectFailed: {type(exc).__name__}", server_caused=False)
                ws_logger.info("connect to %s failed: %s", self._sync_url, type(exc).__name__)
            else:
                try:
                    ended = await self._serve_socket(ws)
                except ServerFatalError as exc:
                    self._terminate(exc, ConnectionState.FATAL)
                    await ws.close()
                    return
                finally:
                    self._out = None
                    with anyio.CancelScope(shield=True):
                        await ws.close()
            self._set_state(ConnectionState.DISCONNECTED)
            self._last_close_reason = ended.reason
            initial = (
                initial_backoff_for(ended.reason) if ended.server_caused else CLIENT_INITIAL_BACKOFF
            )
            delay = backoff_delay(initial, self._retries)
            self._retries += 1
            ws_logger.info("socket ended (%s); reconnecting in %.2f s", ended.reason, delay)
            await anyio.sleep(delay)

    async def _serve_socket(self, ws: aiohttp.ClientWebSocketResponse) -> _SocketEnded:
        send, receive = anyio.create_memory_object_stream[_Outgoing](math.inf)
        for frame in self._restart_frames():
            send.send_nowait(frame)
        self._connection_count += 1
        self._out = send
        self._set_state(ConnectionState.CONNECTED)
        with send, receive:
            async with anyio.create_task_group() as tg:
                tg.start_soon(self._write_frames, ws, receive)
                ended = await self._read_frames(ws)
                tg.cancel_scope.cancel()
        return ended

    async def _write_frames(
        self, ws: aiohttp.ClientWebSocketResponse, frames: MemoryObjectReceiveStream[_Outgoing]
    ) -> None:
        try:
            async for frame, request_id in frames:
                data = frame if isinstance(frame, bytes) else frame()
                await ws.send_frame(data, aiohttp.WSMsgType.TEXT)
                if request_id is not None:
                    self._requests.mark_sent(request_id)
        except (aiohttp.ClientError, ConnectionError, RuntimeError) as exc:
            # The reader sees the socket close and reconnects.
            ws_logger.info("send failed: %s", type(exc).__name__)
            await ws.close()

    async def _read_frames(self, ws: aiohttp.ClientWebSocketResponse) -> _SocketEnded:
        while True:
            try:
                msg = await ws.receive(timeout=self._inactivity_timeout)
            except TimeoutError:
                return _SocketEnded("InactiveServer", server_caused=False)
            if msg.type is aiohttp.WSMsgType.TEXT:
                data: str | bytes = msg.data
            elif msg.type is aiohttp.WSMsgType.BINARY:
                data = msg.data
            elif msg.type in (
                aiohttp.WSMsgType.CLOSE,
                aiohttp.WSMsgType.CLOSING,
                aiohttp.WSMsgType.CLOSED,
            ):
                reason = (msg.extra if isinstance(msg.extra, str) else "") or (
                    f"closed with code {ws.close_code}"
                )
                return _SocketEnded(reason, server_caused=True)
            else:
                return _SocketEnded("WebSocketError", server_caused=False)
            try:
                self._handle_frame(data)
            except ProtocolError as exc:
                ws_logger.warning("invalid server message, reconnecting: %s", exc)
                return _SocketEnded("InvalidServerMessage", server_caused=False)

    # -- server messages ----------------------------------------------------------------------

    def _handle_frame(self, data: str | bytes) -> None:
        msg = decode_server_message(data)
        if isinstance(msg, Transition):
            self._on_transition(msg)
        elif isinstance(msg, MutationResponse | ActionResponse):
            if isinstance(msg, MutationResponse) and msg.ts is not None:
                self._max_observed_ts = max(self._max_observed_ts, decode_ts(msg.ts))
            self._requests.on_response(msg, decode_ts(self._remote_version.ts))
            self._check_synced()
        elif isinstance(msg, AuthError):
            self._on_auth_error(msg)
        elif isinstance(msg, FatalError):
            raise ServerFatalError(f"the Convex server reported a fatal error: {msg.error}")
        elif isinstance(msg, Ping):
            pass
        elif isinstance(msg, TransitionChunk):
            raise ProtocolError("TransitionChunk is not sent on /api/sync")

    def _on_transition(self, msg: Transition) -> None:
        if msg.start_version != self._remote_version:
            raise ProtocolError("Transition does not start at the client's current version")
        end_ts = decode_ts(msg.end_version.ts)
        for modification in msg.modifications:
            if not isinstance(modification, QueryRemoved):
                self._query_set.apply(modification)
        self._remote_version = msg.end_version
        self._max_observed_ts = max(self._max_observed_ts, end_ts)
        self._requests.on_transition(end_ts)
        if self._auth.on_identity_advanced(msg.start_version.identity, msg.end_version.identity):
            convex_logger.debug("server confirmed auth (%s)", redact(self._auth.token))
        self._check_synced()

    def _check_synced(self) -> None:
        # The backoff resets only once the client has caught up after a reconnect: every
        # query re-added has an answer and every request outstanding then has finished.
        if self._synced_since_reconnect:
            return
        if self._query_set.has_all_results() and not self._requests.has_outstanding(
            self._restart_request_ids
        ):
            self._synced_since_reconnect = True
            self._retries = 0

    def _on_auth_error(self, msg: AuthError) -> None:
        ws_logger.warning("server rejected auth: %s", msg.error)
        self._auth.on_rejected(msg.error)

    def _terminate(self, error: DartvexError, state: ConnectionState) -> None:
        if self._terminal_error is not None:
            return
        self._set_state(state)
        self._state = state
        self._terminal_error = error
        self._out = None
        self._requests.fail_all(error)
        self._auth.fail_waiters(error)
        for query in self._query_set.queries():
            for waker in query.subscribers:
                waker.set()


class Subscription:
    """A live query. Iterate it with ``async for``; each item is the query's current value.

    A failing query raises ConvexError from the iteration; the subscription stays
    registered, so iterating again waits for the next result. Closing the client ends
    every subscription with ClientClosedError.
    """

    def __init__(self, client: ConvexClient, udf_path: str, args: list[Any]) -> None:
        self._client = client
        self._waker = asyncio.Event()
        self._query: LocalQuery | None = client._subscribe(udf_path, args, self._waker)
        self._seen_version = 0
        self.name = udf_path

    def __repr__(self) -> str:
        state = "closed" if self._query is None else f"query_id={self._query.query_id}"
        return f"<Subscription {self.name} {state}>"

    async def next(self) -> Any:
        """Wait for a result newer than the last one returned, and return it.

        Raises StopAsyncIteration once the subscription is closed.
        """
        while True:
            query = self._query
            if query is None:
                raise StopAsyncIteration
            if self._client._terminal_error is not None:
                raise self._client._terminal_error
            if query.result_version > self._seen_version and query.result is not None:
                self._seen_version = query.result_version
                return query.result.unwrap()
            self._waker.clear()
            await self._waker.wait()

    def close(self) -> None:
        """Unsubscribe. Idempotent."""
        query, self._query = self._query, None
        self._waker.set()  # wake a pending next() so it sees the subscription is closed
        if query is not None and self._client._terminal_error is None:
            self._client._unsubscribe(query, self._waker)

    async def aclose(self) -> None:
        self.close()

    async def __aenter__(self) -> Self:
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        self.close()

    async def __aiter__(self) -> AsyncGenerator[Any, None]:
        try:
            while True:
                try:
                    value = await self.next()
                except StopAsyncIteration:
                    return
                yield value
        finally:
            self.close()
