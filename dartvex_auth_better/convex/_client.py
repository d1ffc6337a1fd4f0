"""ConvexClient: the facade users hold, and the socket loop behind it."""

from __future__ import annotations

import asyncio
import enum
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable, Mapping
from types import TracebackType
from typing import TYPE_CHECKING, Any, Literal, Self

import aiohttp
import anyio
import msgspec

from .._errors import (
    ClientClosedError,
    DartvexError,
    ProtocolError,
    ServerFatalError,
    SessionExpiredError,
    TransportError,
)
from .._logging import convex_logger, redact, ws_logger
from .._signal import Flag
from .._urls import normalize_base_url, sync_url_for
from .._version import __version__
from .._watch import Watched
from ._auth import AuthManager
from ._auth_types import AuthProvider, FetchToken
from ._authed import AuthenticatedConvexClient, SessionT
from ._inline import ENDED, HANDED_BACK, TAKEN, InlineFrames
from ._optimistic import OptimisticUpdate
from ._outbox import Outbox, checkpoint_if_cancelled
from ._protocol import (
    ActionResponse,
    AuthError,
    DecodeError,
    FatalError,
    MutationResponse,
    ServerMessage,
    Transition,
    TransitionChunk,
    check_server_message,
    decode_error,
    decode_frame,
    decode_server_message,
)
from ._query_set import canonical_udf_path
from ._subscription import Subscription
from ._sync import SyncCore
from ._transport import (
    CLIENT_INITIAL_BACKOFF,
    backoff_delay,
    initial_backoff_for,
    open_socket,
)
from ._values import encode_args

if TYPE_CHECKING:
    from ._pagination import PaginatedQuery

__all__ = ["ConnectionState", "ConnectionStatus", "ConvexClient"]

# A socket that keeps sending frames we cannot use is not going to get better: after this
# many reconnects in a row that end that way, stop and fail every pending call. The streak
# is broken by a socket that ends any other way, or that worked this long before it broke
# (catching up after a reconnect is not enough: a server can sync and then send garbage).
_MAX_PROTOCOL_FAILURES = 3
_STABLE_SOCKET_SECONDS = 60.0
_CLIENT_HEADER = f"python-dartvex-auth-better-{__version__}"
_TEXT = aiohttp.WSMsgType.TEXT
_BINARY = aiohttp.WSMsgType.BINARY


class ConnectionState(enum.Enum):
    """Where the client's socket is."""

    CONNECTING = "connecting"  # opening the first socket
    CONNECTED = "connected"  # a socket is open
    RECONNECTING = "reconnecting"  # the socket dropped; waiting or opening another
    CLOSED = "closed"  # the client was closed
    FATAL = "fatal"  # the server sent FatalError, or the protocol broke for good


# A frozen msgspec Struct rather than a frozen dataclass: the same fields, equality, hash
# and repr, but defining it costs ~20 us at import instead of ~1 ms, and one is built for
# every status change.
class ConnectionStatus(msgspec.Struct, frozen=True):
    """A snapshot of the connection, for dashboards and health checks."""

    state: ConnectionState
    has_ever_connected: bool
    connection_count: int
    connection_retries: int
    inflight_mutations: int
    inflight_actions: int
    synced: bool
    """True once the client has caught up after the last (re)connect: every query has an
    answer, every request outstanding at the reconnect finished, auth is confirmed."""

    @property
    def is_connected(self) -> bool:
        return self.state is ConnectionState.CONNECTED


class _SocketEnded(Exception):
    """Internal: why a socket ended, and whether we or the server caused it."""

    def __init__(
        self,
        reason: str,
        *,
        server_caused: bool,
        protocol_error: bool = False,
        fatal: DartvexError | None = None,
        close_frame: bool = False,
    ) -> None:
        super().__init__(reason)
        self.reason = reason
        self.server_caused = server_caused
        self.protocol_error = protocol_error
        self.fatal = fatal
        self.close_frame = close_frame  # the server sent a Close frame (not just gone)


class _ChunkBuffer:
    """Reassembles a Transition the server split into TransitionChunk parts: parts in
    order, one id and one total, nothing else in between."""

    def __init__(self) -> None:
        self._parts: list[str] = []
        self._key: tuple[str, int] | None = None

    @property
    def pending(self) -> bool:
        return bool(self._parts)

    def add(self, chunk: TransitionChunk) -> Transition | None:
        key = (chunk.transition_id, chunk.total_parts)
        if chunk.part_number != len(self._parts) or (self._parts and key != self._key):
            raise ProtocolError("TransitionChunk out of order or mismatched")
        self._key = key
        self._parts.append(chunk.chunk)
        if len(self._parts) < chunk.total_parts:
            return None
        whole = decode_server_message("".join(self._parts))
        self._parts, self._key = [], None
        if not isinstance(whole, Transition):
            raise ProtocolError("TransitionChunk parts did not form a Transition")
        return whole


class ConvexClient:
    """An asyncio client for a Convex deployment over the sync WebSocket.

    ``async with ConvexClient(url) as client:`` opens the socket in the background and
    keeps it open, reconnecting with jittered backoff when it drops (queries are re-added,
    unanswered mutations re-sent; the server applies each exactly once). Leaving the block
    cancels every background task and closes the socket (and the aiohttp session, when the
    client created it). The constructor does no I/O.

    Auth: ``set_auth(token)`` for a fixed JWT, ``set_auth(fetch_token)`` for a refreshing
    token source, or ``with_auth(provider)`` for a whole sign-in lifecycle. With
    ``expect_auth=True`` nothing (not even the socket) goes out before the first token.
    ``auth_refresh_leeway`` is how many seconds before expiry a token is replaced;
    ``reuse_initial_token=False`` swaps a login's first token for a fresh one as soon as the
    server confirms it (the official client's behaviour; it costs a second token call).
    ``wall_clock`` is what token expiry is checked against (tests can move it).

    Reconnects wait ``initial_backoff`` seconds (3x for overload reasons; 100 ms after a
    client-side problem), doubling per retry up to ``max_backoff``, jittered by +-50%.

    Calls have no built-in timeout: wrap them in ``anyio.fail_after`` or
    ``asyncio.timeout``. A mutation cancelled after it was sent stays tracked and is re-sent
    on reconnect, so it applies exactly once; one cancelled before it was sent is dropped.
    """

    def __init__(
        self,
        deployment_url: str,
        *,
        session: aiohttp.ClientSession | None = None,
        allow_insecure: bool = False,
        connect_timeout: float = 10.0,
        inactivity_timeout: float = 60.0,
        expect_auth: bool = False,
        initial_backoff: float = 1.0,
        max_backoff: float = 16.0,
        auth_refresh_leeway: float = 10.0,
        reuse_initial_token: bool = True,
        wall_clock: Callable[[], float] = time.time,
    ) -> None:
        if connect_timeout <= 0 or inactivity_timeout <= 0:
            raise ValueError("connect_timeout and inactivity_timeout must be positive")
        if not 0 < initial_backoff <= max_backoff:
            raise ValueError("backoff must satisfy 0 < initial_backoff <= max_backoff")
        self._initial_backoff = initial_backoff
        self._max_backoff = max_backoff
        self.url = normalize_base_url(
            deployment_url, name="deployment_url", allow_insecure=allow_insecure
        )
        self._sync_url = sync_url_for(self.url)
        self._session = session
        self._owns_session = session is None
        self._connect_timeout = connect_timeout
        self._inactivity_timeout = inactivity_timeout
        self._client_header = _CLIENT_HEADER

        self._auth = AuthManager(
            leeway=auth_refresh_leeway,
            reuse_initial_token=reuse_initial_token,
            expect_auth=expect_auth,
            clock=wall_clock,
        )
        self._core = SyncCore(str(uuid.uuid4()), self._auth)
        self._core.on_synced = self._on_synced
        self._core.on_auth_error = self._on_auth_error
        self._auth.send_authenticate = self._core.send_authenticate
        self._auth.on_identity_lost = self._core.fail_unfinished
        self._restart_immediately = False
        self._chunks = _ChunkBuffer()
        self._retries = 0
        self._protocol_failures = 0
        self._has_ever_connected = False
        self._state = ConnectionState.CONNECTING
        self._status = Watched(self._snapshot())
        self._reconnect_requested = Flag()
        self._socket_scope: anyio.CancelScope | None = None
        self._runner: asyncio.Task[None] | None = None
        self._tg: anyio.abc.TaskGroup | None = None
        self._started = False
        self._closing = False

    def __repr__(self) -> str:
        return f"ConvexClient({self.url!r}, state={self._state.value})"

    # -- lifecycle -----------------------------------------------------------------------

    async def __aenter__(self) -> Self:
        if self._started:
            raise RuntimeError("a ConvexClient can be entered only once")
        self._started = True
        if self._session is None:
            self._session = aiohttp.ClientSession()
        # The background work lives in a task group inside one runner task the client
        # owns, so the client can be closed from any task and in any order.
        loop = asyncio.get_running_loop()
        self._core.defer = loop.call_soon  # Removes wait for the end of the turn
        self._core.defer_from_any_thread = loop.call_soon_threadsafe
        self._runner = loop.create_task(
            self._run_background(), name="dartvex_auth_better.convex.runner"
        )
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.aclose()

    async def aclose(self) -> None:
        """Close the socket, fail pending calls with ClientClosedError, stop every task.

        Idempotent; may be called from any task."""
        if self._closing:
            return
        self._closing = True
        self._terminate(ClientClosedError("the Convex client was closed"), ConnectionState.CLOSED)
        self._state = ConnectionState.CLOSED
        runner, self._runner = self._runner, None
        try:
            if runner is not None:
                runner.cancel()
                with anyio.CancelScope(shield=True):
                    await asyncio.wait([runner])
        finally:
            if self._owns_session and self._session is not None:
                with anyio.CancelScope(shield=True):
                    await self._session.close()

    async def _run_background(self) -> None:
        # The socket loop runs in the runner task itself; a token refresh gets a task of
        # its own only while one is due (no task waits for it meanwhile).
        async with anyio.create_task_group() as tg:
            self._tg = tg
            self._auth.attach(self._spawn)
            try:
                await self._connect_forever()
            except ClientClosedError:
                pass  # closing: nothing to report
            except Exception as exc:
                self._failed_internally(exc)
            finally:
                self._auth.attach(None)
                self._tg = None
                self._stop_if_terminal()

    def _spawn(self, work: Callable[[], Awaitable[None]]) -> None:
        """Start a background task (a token refresh) in the client's task group."""
        if self._tg is not None:
            self._tg.start_soon(self._guarded, work, name="dartvex_auth_better.convex.auth_refresh")

    def _spawn_writer(self, work: Callable[[], Awaitable[None]]) -> bool:
        """Start a socket's writer task (Outbox), only while it has a write to finish;
        False when the client is closing (there is no task group to start it in)."""
        if self._tg is None:
            return False
        self._tg.start_soon(self._guarded, work, name="dartvex_auth_better.convex.writer")
        return True

    # -- connection state --------------------------------------------------------------------

    @property
    def connection_state(self) -> ConnectionState:
        return self._state

    @property
    def connection_status(self) -> ConnectionStatus:
        return self._snapshot()

    async def connection_statuses(self) -> AsyncIterator[ConnectionStatus]:
        """The current status, then every change (a slow reader sees the latest)."""
        if self._core.terminal_error is None:
            # Counters are published only while someone watches: bring them up to date.
            self._status.set(self._snapshot())
        async for status in self._status.changes():
            yield status

    async def wait_connected(self) -> None:
        """Wait until a socket is open (raises if the client is closed or failed)."""
        async for status in self.connection_statuses():
            self._check_usable()
            if status.state is ConnectionState.CONNECTED:
                return
        self._check_usable()

    def reconnect_now(self, reason: str = "ReconnectRequested") -> None:
        """Drop the current socket (or skip the current backoff wait) and reconnect."""
        self._core.last_close_reason = reason
        self._reconnect_requested.set()
        if self._socket_scope is not None:
            self._socket_scope.cancel()

    def _snapshot(self) -> ConnectionStatus:
        mutations, actions = self._core.requests.counts()
        return ConnectionStatus(
            state=self._state,
            has_ever_connected=self._has_ever_connected,
            connection_count=self._core.connection_count,
            connection_retries=self._retries,
            inflight_mutations=mutations,
            inflight_actions=actions,
            synced=self._core.synced,
        )

    def _publish_status(self) -> None:
        if self._status.watchers:
            self._status.set(self._snapshot())

    def _set_state(self, state: ConnectionState) -> None:
        if self._state in (ConnectionState.CLOSED, ConnectionState.FATAL):
            return
        self._state = state
        self._status.set(self._snapshot())

    # -- auth ----------------------------------------------------------------------------

    async def set_auth(
        self, auth: str | FetchToken | None, *, initial_token: str | None = None
    ) -> None:
        """Authenticate the connection, and return once the server has confirmed it.

        * ``set_auth("<jwt>")``: a fixed token, never refreshed. If the server rejects it,
          AuthRejectedError, and the client carries on anonymously.
        * ``set_auth(fetch_token)``: ``await fetch_token(force_refresh)`` supplies tokens
          (see FetchToken). The client refreshes before expiry, re-authenticates after
          server AuthErrors, and keeps the session through transient failures. Requests
          made meanwhile are held back, never sent anonymously. Pass ``initial_token`` to
          start with a token you already have (one that has expired by the wall clock is
          replaced by a forced fetch before anything is sent). SessionExpiredError when
          the source says the session is over.
        * ``set_auth(None)``: sign out of Convex (anonymous from now on).

        Calls made after ``set_auth`` go out after its Authenticate. A ``set_auth``
        replaced by a newer one while it fetched its first token returns at once (the
        newer one is in force).
        """
        self._check_usable()
        if auth is None or isinstance(auth, str):
            self._auth.set_fixed(auth)
            convex_logger.debug("auth token set (%s)", redact(auth))
            self._send_authenticate_now()
        else:
            if not callable(auth):
                raise TypeError(
                    f"set_auth takes a token, a FetchToken callable or None, not "
                    f"{type(auth).__name__}"
                )
            generation = self._auth.set_fetcher(auth, initial_token)
            if self._auth.token is None:  # no initial token, or an expired one
                self._core.pause()
                try:
                    await self._auth.initial_fetch()
                except BaseException:
                    # The first token never came: this flow must not go on fetching, and
                    # with expect_auth what was held for it must not go out anonymously.
                    if generation == self._auth.generation:
                        self._auth.clear()
                        if self._auth.expect_auth:
                            self._core.fail_unfinished(
                                SessionExpiredError("the first token could not be fetched")
                            )
                        # clear() starts a new generation, so the finally below does not
                        # resume: this does (Authenticate None, then what was held).
                        self._send_authenticate_now()
                    raise
                finally:
                    if generation == self._auth.generation:
                        self._core.resume()
                if generation != self._auth.generation:
                    return  # superseded: the newer flow owns the gating and the waiting
                if self._auth.signed_out:
                    raise SessionExpiredError("the token source has no session; sign in")
            else:
                self._send_authenticate_now()
        await self._auth.add_waiter()

    def _abandon_auth(self, fetcher: FetchToken) -> None:
        """A ``set_auth(fetcher)`` whose caller failed or went away: if its flow is still
        the one in force, stop it and tell the server the client is anonymous. At once and
        without waiting for the server, so it works under cancellation too."""
        if self._core.terminal_error is not None or not self._auth.runs(fetcher):
            return
        self._auth.clear()
        convex_logger.debug("auth withdrawn: its set_auth did not complete")
        self._send_authenticate_now()

    def _send_authenticate_now(self) -> None:
        """Send one Authenticate for the token now in force: while the socket is paused
        for a replaced flow's first token, resuming sends it (then what was held)."""
        if self._core.paused:
            self._core.resume()
        else:
            self._core.send_authenticate()

    async def clear_auth(self) -> None:
        """Stop refreshing and sign out of Convex (anonymous from now on)."""
        await self.set_auth(None)

    async def refresh_auth_now(self) -> None:
        """Fetch a fresh token at once (a forced fetch) and wait for the server to confirm
        it. Raises SessionExpiredError when the session is over."""
        self._check_usable()
        if await self._auth.refresh_now():
            await self._auth.add_waiter()

    @property
    def is_auth_refreshing(self) -> bool:
        """True while the client re-authenticates after the server rejected a token."""
        return self._auth.refreshing.value

    def auth_refreshing_states(self) -> AsyncIterator[bool]:
        """``is_auth_refreshing`` now, then on every change."""
        return self._auth.refreshing.changes()

    def with_auth(self, provider: AuthProvider[SessionT]) -> AuthenticatedConvexClient[SessionT]:
        """Wrap this client with a sign-in lifecycle driven by ``provider`` (e.g. a
        ConvexBetterAuthProvider). Use one wrapper per client."""
        return AuthenticatedConvexClient(self, provider)

    def _on_auth_error(self, msg: AuthError) -> None:
        if self._auth.on_auth_error(msg):
            # Stop the socket (the reader does so after this message), force-fetch and
            # reconnect without backoff (an ignored, stale AuthError changes nothing: the
            # server's close that follows gets the ordinary backoff).
            self._restart_immediately = True

    # -- functions -----------------------------------------------------------------------

    def subscribe(self, name: str, args: Mapping[str, Any] | None = None) -> Subscription:
        """Subscribe to a query; iterate the result for its value now and on every change.

        Identical subscriptions share one server query. See Subscription for details.
        """
        self._check_callable()
        return Subscription(self._core, canonical_udf_path(name), encode_args(args))

    async def query(self, name: str, args: Mapping[str, Any] | None = None) -> Any:
        """Run a query once and return its result.

        It asks the server: the answer is the server's (an existing live subscription to
        the same query is kept current by the server, so its answer is used), never an
        optimistic guess or a value cached from an earlier subscription.
        """
        subscription = self.subscribe(name, args)
        try:
            return await subscription._next_server_result()
        finally:
            subscription.close()

    def paginated_query(
        self, name: str, args: Mapping[str, Any] | None = None, *, page_size: int = 20
    ) -> PaginatedQuery:
        """A live, growing list over a paginated query (one that takes ``paginationOpts``).

        See PaginatedQuery: iterate it for aggregate snapshots, call ``load_more()`` for
        the next page.
        """
        self._check_callable()
        from ._pagination import PaginatedQuery  # loaded on first use

        return PaginatedQuery(self._core, canonical_udf_path(name), args, page_size=page_size)

    async def mutation(
        self,
        name: str,
        args: Mapping[str, Any] | None = None,
        *,
        optimistic_update: OptimisticUpdate | None = None,
    ) -> Any:
        """Run a mutation; returns once its write is visible to this client's queries.

        ``optimistic_update(store)`` edits the local view of queries at once; the edit is
        replaced by the server's data when the mutation lands, and rolled back if it fails.
        If the update function raises, the mutation is not sent and the error propagates.
        """
        return await self._request("mutation", name, args, optimistic_update)

    async def action(self, name: str, args: Mapping[str, Any] | None = None) -> Any:
        """Run an action. If the socket drops after it was sent: ConnectionLostError
        (retryable; the action may or may not have run)."""
        return await self._request("action", name, args, None)

    async def _request(
        self,
        kind: Literal["mutation", "action"],
        name: str,
        args: Mapping[str, Any] | None,
        optimistic_update: OptimisticUpdate | None,
    ) -> Any:
        self._check_callable()
        core, status = self._core, self._status
        if core._send is not None and not core.paused:
            # Its frame would be written at once (Outbox.push): a call made where it is
            # already cancelled must not get that far (it is dropped, never sent).
            await checkpoint_if_cancelled()
        request = core.request(kind, canonical_udf_path(name), encode_args(args), optimistic_update)
        if status.watchers:  # (checked here: a call per status publish is measurable)
            self._publish_status()
        future = request.future
        try:
            return await future
        finally:
            if not future.done() or future.cancelled():
                core.abandon(request)
            if status.watchers:
                self._publish_status()

    def _check_callable(self) -> None:
        """For function calls: usable, and not signed out under expect_auth."""
        self._check_usable()
        if self._auth.expect_auth and self._auth.signed_out:
            # The session ended: with expect_auth nothing may run anonymously, so calls
            # fail until the next sign-in instead.
            raise SessionExpiredError("the session ended; sign in again")

    def _check_usable(self) -> None:
        if self._core.terminal_error is not None:
            raise self._core.terminal_error
        if not self._started:
            raise RuntimeError("use the ConvexClient inside 'async with' (or call __aenter__)")

    # -- the socket loop -----------------------------------------------------------------------

    async def _guarded(self, work: Callable[[], Awaitable[None]]) -> None:
        try:
            await work()
        except ClientClosedError:
            pass  # closing: nothing to report
        except Exception as exc:
            self._failed_internally(exc)
        finally:
            self._stop_if_terminal()

    def _failed_internally(self, exc: Exception) -> None:
        # A bug must not leave callers hanging: fail everything with a typed error.
        convex_logger.exception("a Convex client background task failed", exc_info=exc)
        self._terminate(
            DartvexError(f"the Convex client failed internally: {type(exc).__name__}"),
            ConnectionState.FATAL,
        )

    def _stop_if_terminal(self) -> None:
        if self._core.terminal_error is not None and self._runner is not None:
            # Nothing more to do: stop the sibling tasks too.
            self._runner.cancel()

    async def _connect_forever(self) -> None:
        assert self._session is not None
        while True:
            self._reconnect_requested.clear()
            self._restart_immediately = False
            # Holds the connection until auth is configured (expect_auth) and the token
            # in force is not expired by the wall clock.
            await self._auth.before_connect()
            try:
                with anyio.fail_after(self._connect_timeout):
                    ws = await open_socket(
                        self._session,
                        self._sync_url,
                        client_header=self._client_header,
                        close_timeout=self._connect_timeout,
                    )
            except aiohttp.WSServerHandshakeError as exc:
                if (
                    not self._has_ever_connected
                    and 400 <= exc.status < 500
                    and exc.status
                    not in (
                        408,
                        429,
                    )
                ):
                    # Not a Convex sync endpoint (a wrong URL, e.g. the .convex.site host):
                    # retrying cannot help, and hanging every call would hide the mistake.
                    self._terminate(
                        TransportError(
                            f"{self._sync_url} refused the WebSocket with HTTP {exc.status}; "
                            "is this the Convex deployment URL (https://<name>.convex.cloud)?",
                            retryable=False,
                        ),
                        ConnectionState.FATAL,
                    )
                    return
                ended = _SocketEnded(f"ConnectFailed: HTTP {exc.status}", server_caused=True)
                ws_logger.warning("connect to %s failed: HTTP %s", self._sync_url, exc.status)
            except TimeoutError:
                reason = f"ConnectTimeout after {round(self._connect_timeout * 1000)}ms"
                ended = _SocketEnded(reason, server_caused=True)
                ws_logger.warning("connect to %s failed: %s", self._sync_url, reason)
            except (aiohttp.ClientError, OSError) as exc:
                ended = _SocketEnded(f"ConnectFailed: {type(exc).__name__}", server_caused=True)
                ws_logger.warning("connect to %s failed: %s", self._sync_url, type(exc).__name__)
            else:
                opened_at = anyio.current_time()
                try:
                    ended = await self._serve_socket(ws)
                finally:
                    self._socket_scope = None
                    self._core.send = None
                    with anyio.CancelScope(shield=True):
                        await ws.close()
                if (
                    not ended.protocol_error
                    or anyio.current_time() - opened_at >= _STABLE_SOCKET_SECONDS
                ):
                    self._protocol_failures = 0
            if ended.fatal is not None:
                self._terminate(ended.fatal, ConnectionState.FATAL)
                return
            if self._reconnect_requested.is_set():
                ended = _SocketEnded(self._core.last_close_reason or "", server_caused=False)
            self._set_state(ConnectionState.RECONNECTING)
            if self._restart_immediately:
                # Stop, force-fetch, restart: the auth manager gets a fresh token while
                # the socket is down, and the new socket authenticates with it.
                if self._auth.reauth_pending:
                    await self._auth.reauthenticate()
                self._core.last_close_reason = None
                continue
            self._core.last_close_reason = ended.reason
            if ended.protocol_error:
                self._protocol_failures += 1
                if self._protocol_failures >= _MAX_PROTOCOL_FAILURES:
                    self._terminate(
                        ProtocolError(
                            f"the Convex server kept sending invalid messages ({ended.reason})"
                        ),
                        ConnectionState.FATAL,
                    )
                    return
            scale = self._initial_backoff  # 1.0 by default: the official client's numbers
            initial = (
                initial_backoff_for(ended.reason) * scale
                if ended.server_caused
                else min(CLIENT_INITIAL_BACKOFF, scale)
            )
            delay = backoff_delay(initial, self._retries, maximum=self._max_backoff)
            self._retries += 1
            ws_logger.info("socket ended (%s); reconnecting in %.2f s", ended.reason, delay)
            with anyio.move_on_after(delay):
                await self._reconnect_requested.wait()

    async def _serve_socket(self, ws: aiohttp.ClientWebSocketResponse) -> _SocketEnded:
        # Frames are written by the task that makes them (Outbox.push); the writer task
        # only finishes writes the transport made wait, and what queued behind them.
        outbox = Outbox(ws, self._core.requests, self._spawn_writer)
        # A reconnect_now() made while this socket was connecting is spent: its reason goes
        # out in this Connect, and this socket's own end is judged on its own.
        self._reconnect_requested.clear()
        for frame in self._core.restart():
            outbox.push(frame)
        self._chunks = _ChunkBuffer()
        self._core.send = outbox.push
        self._has_ever_connected = True
        self._set_state(ConnectionState.CONNECTED)
        ended = _SocketEnded("ReconnectRequested", server_caused=False)
        with anyio.CancelScope() as scope:
            # reconnect_now() cancels this scope to drop the socket.
            self._socket_scope = scope
            try:
                ended = await self._read_frames(ws)
            finally:
                await outbox.aclose()
        if (
            (outbox.send_failed or outbox.writing)
            and ended.server_caused
            and not (ended.close_frame or ended.fatal)
        ):
            # The connection went while a write failed or was half done (the writer would
            # fail next): the client's reconnect. A Close frame from the server keeps its
            # own reason and backoff; an inactivity timeout or a FatalError keeps its own.
            ended = _SocketEnded("FailedToSendMessage", server_caused=False)
        return ended

    async def _read_frames(self, ws: aiohttp.ClientWebSocketResponse) -> _SocketEnded:
        # Inactivity: one timer that re-arms itself, rather than a timeout around every
        # receive (that setup and teardown was a third of the per-frame cost).
        # Frames are timed with time.monotonic (one C call; loop.time() wraps it in a
        # Python call), the timer only needs relative delays.
        loop = asyncio.get_running_loop()
        clock = time.monotonic
        timeout = self._inactivity_timeout
        last_frame = clock()
        watchdog: asyncio.TimerHandle | None = None
        with anyio.CancelScope() as idle_scope:

            def check_idle() -> None:
                nonlocal watchdog
                idle = clock() - last_frame
                if idle >= timeout:
                    idle_scope.cancel()
                else:
                    watchdog = loop.call_later(timeout - idle, check_idle)

            watchdog = loop.call_later(timeout, check_idle)
            receive, handle = ws.receive, self._handle_ws_message
            # The common frames (a whole Transition, a call's response) are handled here,
            # not in _handle_ws_message: fewer Python calls per frame. _core, _status and
            # _chunks stay the same objects for the whole socket (not _chunks._parts).
            chunks, status, core = self._chunks, self._status, self._core
            handle_transition, handle_response = core.handle_transition, core.handle_response
            ended_inline: _SocketEnded | None = None

            def take_inline(msg: aiohttp.WSMessage) -> int:
                # Runs in aiohttp's data callback (InlineFrames): only bookkeeping that
                # needs no task. A Transition that moves the identity (auth confirmed),
                # anything but a Transition or a call's response, and a chunk run go to
                # the reader task instead.
                nonlocal last_frame, ended_inline
                last_frame = clock()
                if chunks._parts:
                    return HANDED_BACK
                try:
                    server_msg = decode_frame(msg.data)
                except DecodeError as exc:
                    ended_inline = self._ended_by_error(decode_error(exc))
                    return ENDED
                try:
                    if type(server_msg) is Transition:
                        if server_msg.end_version.identity != server_msg.start_version.identity:
                            return HANDED_BACK
                        handle_transition(server_msg)
                    elif type(server_msg) is MutationResponse or type(server_msg) is ActionResponse:
                        check_server_message(server_msg)
                        handle_response(server_msg)
                    else:
                        return HANDED_BACK
                except (ServerFatalError, ProtocolError) as exc:
                    ended_inline = self._ended_by_error(exc)
                    return ENDED
                if status.watchers:
                    self._publish_status()
                if self._restart_immediately:
                    ended_inline = _SocketEnded("AuthError", server_caused=True)
                    return ENDED
                return TAKEN

            inline = InlineFrames.attach(ws, take_inline)
            try:
                if inline is not None:
                    inline.drain()  # what arrived before it was attached
                    # The reader task takes only what take_inline leaves: it waits, takes
                    # that frame and any after it with receive(), then waits again.
                    while True:
                        await inline.wait()
                        if inline.error is not None:
                            raise inline.error
                        if ended_inline is not None:
                            return ended_inline
                        inline.reader_active = True
                        try:
                            msg = inline.held
                            inline.held = None
                            if msg is not None:
                                ended = handle(ws, msg)
                                if ended is not None:
                                    return ended
                            while inline.pending():
                                msg = await receive()
                                last_frame = clock()
                                ended = handle(ws, msg)
                                if ended is not None:
                                    return ended
                        finally:
                            inline.reader_active = False
                        inline.drain()  # what came while the reader task was taking frames
                while True:
                    msg = await receive()
                    last_frame = clock()
                    if msg.type is _TEXT and not chunks._parts:
                        try:
                            server_msg = decode_frame(msg.data)
                        except DecodeError as exc:
                            return self._ended_by_error(decode_error(exc))
                        if type(server_msg) is Transition:
                            try:
                                handle_transition(server_msg)
                            except (ServerFatalError, ProtocolError) as exc:
                                return self._ended_by_error(exc)
                            if status.watchers:
                                self._publish_status()
                            if self._restart_immediately:
                                return _SocketEnded("AuthError", server_caused=True)
                            continue
                        ended = self._handle_server_message(server_msg)
                    else:
                        ended = handle(ws, msg)
                    if ended is not None:
                        return ended
            finally:
                if inline is not None:
                    inline.detach()
                if watchdog is not None:
                    watchdog.cancel()
        return _SocketEnded("InactiveServer", server_caused=False)

    def _handle_ws_message(
        self, ws: aiohttp.ClientWebSocketResponse, msg: aiohttp.WSMessage
    ) -> _SocketEnded | None:
        """Apply one WebSocket message; returns why the socket ended, or None to go on."""
        kind = msg.type
        if kind is _TEXT or kind is _BINARY:
            data: str | bytes = msg.data
        elif kind in (
            aiohttp.WSMsgType.CLOSE,
            aiohttp.WSMsgType.CLOSING,
            aiohttp.WSMsgType.CLOSED,
        ):
            close_frame = msg.type is aiohttp.WSMsgType.CLOSE
            # The code in the server's Close frame (ws.close_code may already be 1006 from
            # the close handshake); aiohttp reports a Close with no status as 0: 1005.
            code = msg.data if close_frame and isinstance(msg.data, int) else ws.close_code
            reason = (msg.extra if isinstance(msg.extra, str) else "") or (
                f"closed with code {1005 if code == 0 else code}"
            )
            return _SocketEnded(reason, server_caused=True, close_frame=close_frame)
        else:
            return _SocketEnded("WebSocketError", server_caused=False)
        try:
            server_msg = decode_frame(data)
        except DecodeError as exc:
            return self._ended_by_error(decode_error(exc))
        return self._handle_server_message(server_msg)

    def _handle_server_message(self, server_msg: ServerMessage) -> _SocketEnded | None:
        """Apply one decoded server message; returns why the socket ended, or None."""
        try:
            if type(server_msg) is Transition and not self._chunks._parts:
                # The common case first: one whole Transition.
                self._core.handle_transition(server_msg)
            else:
                check_server_message(server_msg)
                if isinstance(server_msg, TransitionChunk):
                    whole = self._chunks.add(server_msg)
                    if whole is None:
                        return None
                    server_msg = whole
                elif self._chunks.pending and not isinstance(server_msg, FatalError):
                    # (A FatalError wins: it ends the client, whatever was being reassembled.)
                    raise ProtocolError("a message arrived in the middle of a TransitionChunk run")
                self._core.handle(server_msg)
        except (ServerFatalError, ProtocolError) as exc:
            return self._ended_by_error(exc)
        if self._status.watchers:
            self._publish_status()
        if self._restart_immediately:
            # A handled AuthError: stop the socket now rather than wait for the server to
            # close it (it may be slow to, or never do); then force-fetch and restart.
            return _SocketEnded("AuthError", server_caused=True)
        return None

    @staticmethod
    def _ended_by_error(exc: ServerFatalError | ProtocolError) -> _SocketEnded:
        if isinstance(exc, ServerFatalError):
            ws_logger.error("%s", exc)
            return _SocketEnded("FatalError", server_caused=True, fatal=exc)
        ws_logger.warning("invalid server message, reconnecting: %s", exc)
        return _SocketEnded("InvalidServerMessage", server_caused=False, protocol_error=True)

    def _on_synced(self) -> None:
        # Backoff resets only once the client has caught up after a reconnect, so a server
        # that accepts sockets and then drops them keeps the delays growing.
        self._retries = 0
        self._publish_status()

    def _terminate(self, error: DartvexError, state: ConnectionState) -> None:
        if self._core.terminal_error is not None:
            return
        self._set_state(state)
        self._auth.close()
        self._core.terminate(error)
        self._status.set(self._snapshot())
        self._status.close()
