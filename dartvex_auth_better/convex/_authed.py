"""AuthenticatedConvexClient: a ConvexClient driven by an AuthProvider's sign-in lifecycle."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Mapping
from typing import TYPE_CHECKING, Any, Generic, TypeVar

import anyio

from .._errors import LoginSupersededError
from .._logging import auth_logger as log
from .._watch import Watched
from ._auth_types import (
    Authenticated,
    AuthEvent,
    AuthLoading,
    AuthProvider,
    AuthState,
    Unauthenticated,
)

if TYPE_CHECKING:
    from ._client import ConnectionStatus, ConvexClient
    from ._optimistic import OptimisticUpdate
    from ._pagination import PaginatedQuery
    from ._subscription import Subscription

__all__ = ["AuthEventStream", "AuthenticatedConvexClient", "SessionT"]

SessionT = TypeVar("SessionT")


class AuthEventStream:
    """Auth events as an async iterator, queued from creation until closed."""

    def __init__(self, listeners: set[asyncio.Queue[AuthEvent | None]]) -> None:
        self._listeners = listeners
        # None marks the end: close() puts it, so a pending __anext__ wakes and stops.
        self._queue: asyncio.Queue[AuthEvent | None] = asyncio.Queue()
        listeners.add(self._queue)

    def __aiter__(self) -> AuthEventStream:
        return self

    async def __anext__(self) -> AuthEvent:
        event = await self._queue.get()
        if event is None:
            self._queue.put_nowait(None)  # stay ended for later calls
            raise StopAsyncIteration
        return event

    def close(self) -> None:
        """Stop listening; events already queued are still delivered. Idempotent."""
        if self._queue in self._listeners:
            self._listeners.discard(self._queue)
            self._queue.put_nowait(None)

    async def __aenter__(self) -> AuthEventStream:
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        self.close()

    def __del__(self) -> None:
        self._listeners.discard(self._queue)


class AuthenticatedConvexClient(Generic[SessionT]):
    """A ConvexClient plus a sign-in lifecycle.

    ``login``/``sign_up``/``login_from_cache`` go through the provider, hand its token
    source to the client and return once the Convex server has confirmed the identity.
    From then on the client keeps the identity fresh (see ConvexClient.set_auth). The auth
    state (Unauthenticated, AuthLoading, Authenticated(session)) is a current value and an
    async stream; ``auth_events()`` yields SIGNED_IN, TOKEN_REFRESHED and SIGNED_OUT.

    Function calls are the client's own: ``query``, ``subscribe``, ``mutation``,
    ``action``, ``paginated_query``.
    """

    def __init__(self, client: ConvexClient, provider: AuthProvider[SessionT]) -> None:
        self.client = client
        self.provider = provider
        self._state: Watched[AuthState] = Watched(Unauthenticated())
        self._pending: SessionT | None = None
        self._listeners: set[asyncio.Queue[AuthEvent | None]] = set()
        self._generation = 0
        # The provider call of the login under way, cancelled when a newer login or a
        # logout starts: only then can the provider never take on a stale session.
        self._sign_in_scope: anyio.CancelScope | None = None
        self._signed_in_announced = False  # a SIGNED_IN went out and no SIGNED_OUT since
        self._closed = False
        client._auth.on_confirmed = self._on_confirmed
        client._auth.on_signed_out = self._on_signed_out
        client._auth.on_closed = self._on_client_closed
        if client._auth.closed:
            self._on_client_closed()

    def __repr__(self) -> str:
        return f"AuthenticatedConvexClient({self.client!r}, state={self._state.value!r})"

    # -- the lifecycle -----------------------------------------------------------------

    async def login(self, *args: Any, **kwargs: Any) -> SessionT:
        """Sign in through the provider (e.g. ``login(email, password)``)."""
        return await self._start(self.provider.login(*args, **kwargs))

    async def sign_up(self, *args: Any, **kwargs: Any) -> SessionT:
        """Create an account through the provider and sign it in."""
        return await self._start(self.provider.sign_up(*args, **kwargs))

    async def login_from_cache(self) -> SessionT:
        """Restore the session the provider persisted (e.g. after a restart)."""
        return await self._start(self.provider.login_from_cache())

    async def logout(self) -> None:
        """Sign out on the server and here. The client is anonymous afterwards, even when
        the provider's sign-out call fails (its error propagates)."""
        generation = self._supersede()
        try:
            await self.provider.logout()
        finally:
            # A login started while the sign-out call ran is newer: it stands.
            if generation == self._generation:
                self._pending = None
                await self.client.clear_auth()
                # Read now, not before the sign-out call: the session may have ended by
                # itself meanwhile (a refresh found it gone), and SIGNED_OUT was emitted.
                self._signed_out()

    def _supersede(self) -> int:
        """Start a new identity change: the login under way (if any) is cancelled."""
        self._generation += 1
        self._pending = None  # a confirmation from now on is not the older login's
        if self._sign_in_scope is not None:
            self._sign_in_scope.cancel()
            self._sign_in_scope = None
        return self._generation

    def _signed_out(self) -> None:
        """Unauthenticated from now on; SIGNED_OUT unless that was the state already, so
        that one sign-out is announced once however many paths lead to it."""
        self._pending = None
        self._state.set(Unauthenticated())
        self._announce_signed_out()

    def _announce_signed_out(self) -> None:
        # SIGNED_OUT pairs with a SIGNED_IN: a login that never completed signs nobody out.
        if self._signed_in_announced:
            self._signed_in_announced = False
            self._emit(AuthEvent.SIGNED_OUT)

    async def refresh_now(self) -> None:
        """Get a fresh token at once and wait for the server to confirm it."""
        await self.client.refresh_auth_now()

    async def _start(self, sign_in: Any) -> SessionT:
        try:
            self.client._check_usable()  # a closed client signs nobody in
        except BaseException:
            sign_in.close()  # the provider call never starts
            raise
        generation = self._supersede()
        self._state.set(AuthLoading())
        fetch_token = self.provider.fetch_token
        # The whole sign-in (provider call, then the server's confirmation) runs in a scope
        # that a newer login or a logout cancels: a stale one never takes effect.
        scope = self._sign_in_scope = anyio.CancelScope()
        completed = False
        try:
            with scope:
                session: SessionT = await sign_in
                self._pending = session
                await self.client.set_auth(
                    fetch_token, initial_token=self.provider.token_of(session)
                )
                completed = True
        except BaseException:
            if generation == self._generation:
                # The login did not complete (it failed, or its caller went away): nothing
                # of it, nor of an identity it was replacing, may go on. The token in force
                # is withdrawn and no refresh runs for it.
                self._pending = None
                self._state.set(Unauthenticated())
                self.client._abandon_auth(fetch_token)
                self._announce_signed_out()
            raise
        finally:
            if self._sign_in_scope is scope:
                self._sign_in_scope = None
        if not completed:
            # A newer login or a logout took over, and cancelled this one.
            raise LoginSupersededError(
                "this sign-in was overtaken by a newer login or a logout, which stands"
            )
        return session

    def _on_confirmed(self, first: bool, changed: bool = True) -> None:
        if self._pending is not None and not isinstance(self._state.value, Authenticated):
            self._state.set(Authenticated(self._pending))
            self._signed_in_announced = True
            self._emit(AuthEvent.SIGNED_IN)
        elif changed and (not first or isinstance(self._state.value, Authenticated)):
            # Only a new token: a reconnect that re-confirms the same one is no refresh.
            self._emit(AuthEvent.TOKEN_REFRESHED)

    def _on_signed_out(self) -> None:
        log.info("signed out: the session ended")
        self._signed_out()

    def _on_client_closed(self) -> None:
        # Every stream ends (after what it already queued): nothing will happen any more.
        self._closed = True
        self._state.close()
        for queue in list(self._listeners):
            queue.put_nowait(None)
        self._listeners.clear()

    # -- state and events -------------------------------------------------------------------

    @property
    def auth_state(self) -> AuthState:
        return self._state.value

    def auth_states(self) -> AsyncIterator[AuthState]:
        """The current auth state, then every change (a slow reader sees the latest). It
        ends when the client closes."""
        return self._state.changes()

    @property
    def is_refreshing(self) -> bool:
        """True while the client re-authenticates after the server rejected a token."""
        return self.client.is_auth_refreshing

    def refreshing_states(self) -> AsyncIterator[bool]:
        """``is_refreshing`` now, then on every change; ends when the client closes."""
        return self.client.auth_refreshing_states()

    def auth_events(self) -> AuthEventStream:
        """Every auth event from this call on, none skipped (it listens from the moment
        it is called, so ``events = authed.auth_events()`` before ``login()`` sees
        SIGNED_IN). Iterate it with ``async for``; ``close()`` or leaving an
        ``async with`` stops listening. It ends when the client closes."""
        stream = AuthEventStream(self._listeners)
        if self._closed:
            stream.close()
        return stream

    def _emit(self, event: AuthEvent) -> None:
        log.debug("auth event %s", event.value)
        # A copy: a stream's finalizer (which leaves the set) may run during the loop.
        for queue in tuple(self._listeners):
            queue.put_nowait(event)

    # -- the client's calls -----------------------------------------------------------------

    def subscribe(self, name: str, args: Mapping[str, Any] | None = None) -> Subscription:
        return self.client.subscribe(name, args)

    async def query(self, name: str, args: Mapping[str, Any] | None = None) -> Any:
        return await self.client.query(name, args)

    async def mutation(
        self,
        name: str,
        args: Mapping[str, Any] | None = None,
        *,
        optimistic_update: OptimisticUpdate | None = None,
    ) -> Any:
        return await self.client.mutation(name, args, optimistic_update=optimistic_update)

    async def action(self, name: str, args: Mapping[str, Any] | None = None) -> Any:
        return await self.client.action(name, args)

    def paginated_query(
        self, name: str, args: Mapping[str, Any] | None = None, *, page_size: int = 20
    ) -> PaginatedQuery:
        return self.client.paginated_query(name, args, page_size=page_size)

    @property
    def connection_status(self) -> ConnectionStatus:
        return self.client.connection_status

    def connection_statuses(self) -> AsyncIterator[ConnectionStatus]:
        return self.client.connection_statuses()
