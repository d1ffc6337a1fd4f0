"""ConvexBetterAuthProvider: a Better Auth session as the AuthProvider a ConvexClient drives.

It holds the current session, hands out Convex JWTs for it (one HTTP call however many
callers ask at once), persists the session token in a SessionStore so a restarted process
can sign in again without credentials, and tells "signed out for good" (401/403: the
token fetch returns None, once, and then asks no server until the next login) from
"could not reach the server" (the error propagates and the session is kept).

The persisted value is a small versioned JSON record::

    {"version": 1, "session_token": "...", "user_id": "...", "email": "..."}

The Convex JWT is not in it: it lives 15 minutes, and a restore asks the server for the
session anyway (which proves it is still alive), getting a fresh JWT on the way.
"""

from __future__ import annotations

import hashlib
import hmac
import time
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Final

import anyio
import msgspec

from .._errors import NoSessionError, SessionExpiredError, SessionStoreError
from .._json import JSON_ERRORS
from .._jwt import token_claims, token_expiry
from .._logging import auth_logger as log
from .._logging import redact
from ._client import BetterAuthClient
from ._session import BetterAuthSession
from ._storage import MemorySessionStore, SessionStore

if TYPE_CHECKING:
    from ..convex._auth_types import AuthProvider

__all__ = ["ConvexBetterAuthProvider"]

_RECORD_VERSION: Final = 1
_GET_SESSION_ENDPOINT: Final = "/api/auth/get-session"

# A cached JWT is handed out only while it has this much life left, so that it is still
# valid when it reaches the Convex server (network time, clock skew). Short-lived tokens
# get a quarter of their lifetime instead, or they could never be reused at all.
_REUSE_MARGIN_SECONDS: Final = 10.0


class _RecordVersion(msgspec.Struct):
    """Just the version of a stored record, read before the rest."""

    version: int


class _SessionRecord(msgspec.Struct, kw_only=True):
    """The persisted form of a session (see the module docstring)."""

    version: int
    session_token: str
    user_id: str = ""
    email: str = ""


_version_decoder: Final = msgspec.json.Decoder(_RecordVersion)
_record_decoder: Final = msgspec.json.Decoder(_SessionRecord)


def _record_of(session: BetterAuthSession) -> _SessionRecord:
    return _SessionRecord(
        version=_RECORD_VERSION,
        session_token=session.session_token,
        user_id=session.user_id,
        email=session.email,
    )


def _parse_record(value: str) -> _SessionRecord | None:
    """The record in a stored value, or None (with a warning) when it is not one we can use."""
    # The warnings never quote the value: it may hold most of a token.
    try:
        version = _version_decoder.decode(value).version
        if version != _RECORD_VERSION:
            log.warning(
                "ignoring the stored session: record version %d is not %d (written by "
                "another version of dartvex_auth_better?)",
                version,
                _RECORD_VERSION,
            )
            return None
        record = _record_decoder.decode(value)
    except JSON_ERRORS:
        log.warning("ignoring the stored session: it is not a session record")
        return None
    if not record.session_token:
        log.warning("ignoring the stored session: the record has no session token")
        return None
    return record


def _password_digest(email: str, password: str) -> bytes:
    # Sign-up reuse only needs to recognise the same credentials again; a digest means the
    # password itself is not kept in memory after the call returns.
    return hashlib.sha256(f"{email}\0{password}".encode()).digest()


def _reusable(jwt: str) -> bool:
    """True when a cached JWT has enough life left to be handed out without a fetch."""
    exp = token_expiry(jwt)
    if exp is None:
        return True  # no exp to go by: let the server judge it
    claims = token_claims(jwt) or {}
    iat = claims.get("iat")
    margin = _REUSE_MARGIN_SECONDS
    if isinstance(iat, int | float) and not isinstance(iat, bool) and exp > iat:
        margin = min(margin, (exp - iat) / 4)
    return exp - margin > time.time()


@dataclass(eq=False)
class _Flight:
    """One ``/convex/token`` request that every concurrent fetch_token caller shares.

    The caller that started it (the leader) performs the request and records the outcome;
    the others wait on ``done``. ``settled`` stays False when the leader was cancelled:
    waiters then start over, and one of them leads a new request.
    """

    generation: int
    done: anyio.Event = field(default_factory=anyio.Event)
    settled: bool = False
    token: str | None = None
    error: BaseException | None = None


@dataclass(frozen=True, slots=True)
class _PendingSignUp:
    """Marks the session of a sign_up, for the next login with the same credentials."""

    generation: int
    digest: bytes


class ConvexBetterAuthProvider:
    """Signs in to Better Auth and hands out Convex JWTs: ``AuthProvider[BetterAuthSession]``.

    ``client`` is the BetterAuthClient to call; the provider borrows it and never closes
    it. ``initial_session_token`` is a Better Auth session token saved earlier, for
    :meth:`login_from_cache`. ``store`` persists the session between runs (default: a
    MemorySessionStore, so nothing outlives the process). The constructor does no I/O.

    Errors: SessionExpiredError (and None from :meth:`fetch_token`) means the session is
    gone for good and has been forgotten, store included; NoSessionError means there was
    no session to restore; anything retryable (TransportError, RequestTimeoutError,
    BetterAuthError for 5xx and 429) means the server could not answer, and the session
    and store are kept for a retry. Failing to write the store after a successful sign-in
    does not fail the sign-in (the session is live; it is logged as a warning); failing to
    clear it on :meth:`logout` raises SessionStoreError.

    One provider serves one identity at a time; sign-ins, restores and logouts replace
    it, and a token fetch that was in flight for a replaced session never leaks into the
    new one. When they overlap, the one started last wins: a sign-in, sign-up or restore
    that finishes after a newer one (or a logout) began returns its session to its
    caller but does not adopt or persist it.
    """

    def __init__(
        self,
        client: BetterAuthClient,
        *,
        initial_session_token: str | None = None,
        store: SessionStore | None = None,
    ) -> None:
        if initial_session_token is not None and (
            not isinstance(initial_session_token, str) or not initial_session_token
        ):
            raise ValueError("initial_session_token must be a non-empty string or None")
        self._client = client
        self._store: SessionStore = store if store is not None else MemorySessionStore()
        self._initial_session_token = initial_session_token
        self._session: BetterAuthSession | None = None
        # Bumped whenever the identity changes (sign-in, restore, logout, final expiry), so
        # that work begun for one session can tell that it no longer applies.
        self._generation = 0
        # Bumped when a sign-in, sign-up, restore or logout starts: the most recently
        # started one decides the identity, so a sign-in that finishes after a newer one
        # (or after a logout) began is not adopted. An involuntary end of the session (a
        # 401) does not count: it must not throw away a sign-in under way.
        self._latest_change = 0
        self._flight: _Flight | None = None
        self._pending_sign_up: _PendingSignUp | None = None
        # The record the store is known to hold, to skip writing the same one again.
        self._persisted: _SessionRecord | None = None
        self._store_lock = anyio.Lock()

    # -- state --------------------------------------------------------------------------------

    @property
    def client(self) -> BetterAuthClient:
        """The BetterAuthClient this provider calls."""
        return self._client

    @property
    def store(self) -> SessionStore:
        """Where the session is persisted."""
        return self._store

    @property
    def session(self) -> BetterAuthSession | None:
        """The current session, with the latest Convex JWT; None when signed out."""
        return self._session

    @property
    def session_token(self) -> str | None:
        """The current Better Auth session token; None when signed out."""
        return self._session.session_token if self._session is not None else None

    def __repr__(self) -> str:
        if self._session is None:
            return "<ConvexBetterAuthProvider signed out>"
        return f"<ConvexBetterAuthProvider user_id={self._session.user_id!r}>"

    # -- AuthProvider -------------------------------------------------------------------------

    async def login(self, email: str, password: str) -> BetterAuthSession:
        """Sign in with email and password; returns the new session and persists it.

        Right after :meth:`sign_up` with the same credentials this returns the sign-up's
        session without another request (while its JWT is fresh). Errors are the
        client's: InvalidCredentialsError, retryable transport and server errors.
        """
        pending, self._pending_sign_up = self._pending_sign_up, None
        current = self._session
        if (
            pending is not None
            and current is not None
            and pending.generation == self._generation
            and hmac.compare_digest(pending.digest, _password_digest(email, password))
            and _reusable(current.token)
        ):
            log.debug("login reuses the session from sign_up")
            return current
        change = self._start_change()
        session = await self._client.sign_in(email, password)
        await self._adopt(session, "signed in", change)
        return session

    async def sign_up(self, name: str, email: str, password: str) -> BetterAuthSession:
        """Create an account and sign it in; returns the new session and persists it."""
        change = self._start_change()
        session = await self._client.sign_up(name, email, password)
        if await self._adopt(session, "signed up", change):
            self._pending_sign_up = _PendingSignUp(
                self._generation, _password_digest(email, password)
            )
        return session

    async def login_from_cache(self) -> BetterAuthSession:
        """Restore the session without credentials; returns it with a fresh Convex JWT.

        The session token comes from the current session if there is one, else from
        ``initial_session_token``, else from the store. The server is asked whether the
        session still lives (``get-session``), which also yields a fresh JWT; a rotated
        session token is persisted.

        Raises NoSessionError when there is no session token to try (no request is made),
        SessionExpiredError when the server says the session is gone (it is forgotten:
        the store is cleared and the next call raises NoSessionError), SessionStoreError
        when the store cannot be read. Transient errors propagate and keep everything.
        """
        generation = self._generation
        change = self._start_change()
        session_token = await self._cached_session_token()
        if session_token is None:
            raise NoSessionError(
                "there is no Better Auth session to restore: no initial_session_token was "
                "given and the session store holds none; sign in with login()"
            )
        log.debug("restoring session %s", redact(session_token))
        try:
            session = await self._client.get_session(session_token)
        except SessionExpiredError:
            session = None
        if session is None:
            if generation == self._generation:
                await self._forget("the stored session is gone")
            raise SessionExpiredError(
                "the Better Auth session is gone (signed out, expired or revoked); sign in again",
                endpoint=_GET_SESSION_ENDPOINT,
            )
        await self._adopt(session, "restored", change)
        return session

    async def logout(self) -> None:
        """Sign out on the server and forget the session, here and in the store.

        The session signed out is the current one, else an ``initial_session_token`` not
        yet restored; with neither no request is made, and a record in the store is just
        removed (not revoked: it would take a read of the store and a request). The local
        state and the store are cleared even when the sign-out request fails; that error
        is raised afterwards. Raises SessionStoreError when the store cannot be cleared.
        Convex JWTs issued before stay valid until they expire.
        """
        self._start_change()
        session_token = self.session_token or self._initial_session_token
        await self._forget("logged out", sign_out=session_token, raise_store_errors=True)

    async def fetch_token(self, force_refresh: bool) -> str | None:
        """A Convex JWT for the current session, or None when there is none.

        Without ``force_refresh`` the JWT at hand is returned while it has enough life
        left; otherwise, and always with ``force_refresh``, the server is asked. However
        many callers ask at once, one request is made and they all get its outcome; a
        forced call that arrives while a request is in flight waits for that request.

        None means signed out for good: never signed in, logged out, or the server just
        answered 401/403, in which case the session is forgotten (store included) and no
        request is made again until the next sign-in. Transient failures raise (with
        ``retryable=True``) and keep the session.
        """
        session = self._session
        if session is None:
            return None
        if not force_refresh and _reusable(session.token):
            return session.token
        return await self._fetch_shared()

    def token_of(self, session: BetterAuthSession) -> str:
        """The Convex JWT a session carries."""
        return session.token

    # -- single-flight token fetch ------------------------------------------------------------

    async def _fetch_shared(self) -> str | None:
        while True:
            session = self._session
            if session is None:
                return None
            flight = self._flight
            if flight is None:
                flight = _Flight(self._generation)
                self._flight = flight
                await self._lead(flight, session)
            else:
                await flight.done.wait()
            # The outcome counts only for the session it was fetched for; after a
            # cancelled leader, or an identity change (which a 401 causes too), start over.
            if not flight.settled or flight.generation != self._generation:
                continue
            if flight.error is not None:
                raise flight.error
            return flight.token

    async def _lead(self, flight: _Flight, session: BetterAuthSession) -> None:
        """Perform the flight's request and publish its outcome, whatever happens."""
        try:
            try:
                token = await self._client.convex_token(session.session_token)
            except SessionExpiredError as exc:
                if flight.generation == self._generation:
                    log.debug("the token endpoint says the session is gone: %s", exc.message)
                    await self._forget("the session expired")
                flight.settled = True
            except Exception as exc:
                log.debug("token fetch failed: %r", exc)
                flight.error = exc
                flight.settled = True
            else:
                if flight.generation == self._generation:
                    self._session = msgspec.structs.replace(session, token=token)
                    log.debug("fetched a Convex JWT %s", redact(token))
                flight.token = token
                flight.settled = True
        finally:
            # Only this flight's own slot is cleared, never a newer one's.
            if self._flight is flight:
                self._flight = None
            flight.done.set()

    # -- identity changes and persistence -----------------------------------------------------

    def _start_change(self) -> int:
        self._latest_change += 1
        return self._latest_change

    async def _adopt(self, session: BetterAuthSession, how: str, change: int) -> bool:
        """Make ``session`` the current one, unless a newer sign-in or a logout started
        after the one that produced it (then it is dropped: not held, not persisted, and
        its caller still gets it). Returns whether it was adopted."""
        if change != self._latest_change:
            log.debug("%s, but a newer sign-in or a logout came first: not adopted", how)
            return False
        self._generation += 1
        self._session = session
        self._initial_session_token = None
        self._pending_sign_up = None
        log.debug("%s: user %s, session %s", how, session.user_id, redact(session.session_token))
        await self._persist(_record_of(session), self._generation)
        return True

    async def _persist(self, record: _SessionRecord, generation: int) -> None:
        async with self._store_lock:
            # A logout or another sign-in that came in meanwhile has the last word.
            if generation != self._generation or record == self._persisted:
                return
            try:
                await self._store.set(msgspec.json.encode(record).decode())
            except SessionStoreError as exc:
                # The session is live; only a restart would miss it. Failing the sign-in
                # for that would trade a working connection for a cache.
                log.warning("could not persist the session: %s", exc)
                self._persisted = None
            else:
                self._persisted = record

    async def _cached_session_token(self) -> str | None:
        if self._session is not None:
            return self._session.session_token
        if self._initial_session_token is not None:
            return self._initial_session_token
        async with self._store_lock:
            value = await self._store.get()
            record = _parse_record(value) if value is not None else None
            self._persisted = record
        return record.session_token if record is not None else None

    async def _forget(
        self, why: str, *, sign_out: str | None = None, raise_store_errors: bool = False
    ) -> None:
        """Drop the session locally, then sign out on the server (when given a session
        token), then clear the store.

        The local state goes first and synchronously, so nothing can use the session while
        the requests run. Clearing the store is shielded from cancellation, so a cancelled
        logout cannot leave the token behind. A sign-out error is raised after the store
        is cleared; a store error is raised only when asked and the sign-out went well
        (otherwise logged), so the first thing that went wrong is what the caller sees.
        """
        self._generation += 1
        self._session = None
        self._initial_session_token = None
        self._pending_sign_up = None
        log.debug("%s: session forgotten", why)
        signed_out = False
        try:
            if sign_out is not None:
                await self._client.sign_out(sign_out)
            signed_out = True
        finally:
            with anyio.CancelScope(shield=True):
                async with self._store_lock:
                    self._persisted = None
                    try:
                        await self._store.remove()
                    except SessionStoreError as exc:
                        if raise_store_errors and signed_out:
                            raise
                        log.warning("could not remove the persisted session: %s", exc)


if TYPE_CHECKING:
    _provider_check: type[AuthProvider[BetterAuthSession]] = ConvexBetterAuthProvider
