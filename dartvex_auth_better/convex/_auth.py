"""AuthManager: the token in force on one ConvexClient, and keeping it fresh.

Rules it keeps:

* The token is read when an Authenticate frame is built, never captured earlier, and it
  is checked against the wall clock before every (re)connect: an expired one is replaced
  before it is sent.
* Auth counts as confirmed only when a Transition raises the identity version past the
  Authenticate that carried the token.
* A task replaces the token ``leeway`` seconds before it expires (delay from
  the token's own lifetime, clamped to what is left of it by the wall clock; the leeway is
  capped at half the lifetime so short-lived tokens never cause a refresh storm). The
  delay is shortened at random by up to 15%, never lengthened, so that clients which
  signed in together do not refresh together. The wall clock is re-read at least every
  few seconds (one shared timer, see _Ticker; the task is started only when the refresh
  is due), so a machine that slept, or a loop that woke late, refreshes at once instead
  of sending an expired token.
* Transient fetch failures (anything but ``None`` or SessionExpiredError) never sign the
  user out: they are retried with jittered backoff while the session is kept. ``None`` or
  SessionExpiredError signs out exactly once, and nothing is fetched again until the next
  ``set_auth``.
* An AuthError from the server makes the socket loop stop, force-fetch, and reconnect with
  the fresh token. Only fresh tokens (from forced fetches) count against the budget: a
  rejected cached or initial one is free, two rejected fresh tokens are replaced again,
  and the third in a row (no confirmation between) signs the user out. (A fixed token
  cannot be replaced: its rejection signs out of Convex at once.)
* Every fetch goes through one single-flight slot: concurrent needs share one call.
"""

from __future__ import annotations

import asyncio
import heapq
import logging
import random
import time
import weakref
from collections.abc import Awaitable, Callable
from typing import Any

import anyio

from .._errors import AuthRejectedError, ClientClosedError, DartvexError, SessionExpiredError
from .._jwt import refresh_delay, token_deadline, token_times
from .._logging import auth_logger as log
from .._logging import redact
from .._signal import Flag
from .._watch import Watched
from ._auth_types import FetchToken
from ._protocol import Authenticate, AuthError

__all__ = ["AuthManager"]

# The refresh task never sleeps longer than this before re-reading the wall clock.
_WAKE_SLICE = 5.0
_RETRY_INITIAL = 0.5
# A failed token fetch is retried after at most this long (jittered up to 1.5x): the
# socket's own backoff cap, so after an outage a client is back within ~25 s, not ~45 s.
_RETRY_MAX = 16.0
# A server's Retry-After is honoured up to this long.
_RETRY_AFTER_MAX = 60.0
_MAX_REJECTED_FRESH_TOKENS = 2
# A scheduled refresh answered with the token in force asks again after this long, doubling.
_SAME_TOKEN_RETRY = 1.0

_REFRESH_JITTER = 0.15
# A token fetch attempt gets half the leeway (at least this long) before it is retried;
# the allowance doubles with each failure in a row (an endpoint that is merely slow then
# gets through), up to the token's remaining lifetime while it has one, and this.
_MIN_ATTEMPT_TIMEOUT = 5.0
_MAX_ATTEMPT_TIMEOUT = 120.0
# Treat a token this close to expiry as already expired when (re)connecting: it would not
# survive the handshake.
_CONNECT_MARGIN = 2.0
# Jitter source, shared: a Random is 2.5 KB of Mersenne state, too much to keep per client.
_RNG = random.Random()


# The hooks' defaults (shared, not one closure per client).
def _nothing() -> None:
    pass


def _nothing_confirmed(first: bool, changed: bool) -> None:
    pass


def _nothing_lost(error: DartvexError) -> None:
    pass


class _SignedOut(Exception):
    """Internal: the token source says the session is over."""


class _Superseded(Exception):
    """Internal: a newer set_auth/clear replaced the flow this fetch belonged to."""


class _Flight:
    """The fetch in the single-flight slot: which flow it belongs to, whether it is
    forced, and its outcome for whoever shares it."""

    __slots__ = ("force", "future", "generation")

    def __init__(self, generation: int, force: bool, future: asyncio.Future[str | None]) -> None:
        self.generation = generation
        self.force = force
        self.future = future


class AuthManager:
    # One per client: slots keep it small (a dict of this many attributes is not shared).
    __slots__ = (
        "__weakref__",
        "_awaiting_initial",
        "_awaiting_version",
        "_base_attempt_timeout",
        "_clock",
        "_closed",
        "_configured",
        "_confirmed_token",
        "_deadline",
        "_due",
        "_failures",
        "_fetcher",
        "_fresh_rejections",
        "_generation",
        "_had_confirmation",
        "_inflight",
        "_initial_force",
        "_refresh_at",
        "_refresh_running",
        "_retry_not_before",
        "_rng",
        "_same_token_answers",
        "_signed_out_latch",
        "_spawn",
        "_ticker",
        "_ticker_entry",
        "_timer",
        "_token_fresh",
        "_waiters",
        "expect_auth",
        "identity_version",
        "leeway",
        "on_closed",
        "on_confirmed",
        "on_identity_lost",
        "on_signed_out",
        "reauth_pending",
        "refreshing",
        "reuse_initial_token",
        "send_authenticate",
        "token",
    )

    def __init__(
        self,
        *,
        leeway: float = 10.0,
        reuse_initial_token: bool = True,
        expect_auth: bool = False,
        clock: Callable[[], float] = time.time,
    ) -> None:
        if leeway < 0:
            raise ValueError("leeway must be >= 0")
        self.leeway = leeway
        self.reuse_initial_token = reuse_initial_token
        self.expect_auth = expect_auth
        self._clock = clock

        self.token: str | None = None
        self._fetcher: FetchToken | None = None
        # Bumped by every set_auth/clear: results of fetches started before are dropped.
        self._generation = 0
        self._signed_out_latch = False
        self._configured = Flag(not expect_auth)

        # Identity version on the current socket: the base of the next Authenticate.
        self.identity_version = 0
        self._awaiting_version: int | None = None
        self._awaiting_initial = False
        self._initial_force = False
        # Rejected fresh tokens (from forced fetches) since the last confirmation; a
        # rejected cached, initial or fixed token is free.
        self._fresh_rejections = 0
        self._token_fresh = False
        self._waiters: list[asyncio.Future[None]] = []
        self._had_confirmation = False
        self._confirmed_token: str | None = None

        self._refresh_at: float | None = None  # wall-clock time
        # When the token in force expires, on this machine's wall clock.
        self._deadline: float | None = None
        # The wake-up for the next refresh (see _schedule): a timer of its own once the
        # refresh is under one slice away, before that one shared per event loop.
        self._timer: asyncio.TimerHandle | None = None
        self._ticker: _Ticker | None = None
        self._ticker_entry: _Entry | None = None
        self._refresh_running = False
        # How a due refresh runs: spawned by the client (attach), or woken in
        # run_refresh_loop's task.
        self._spawn: Callable[[Callable[[], Awaitable[None]]], None] | None = None
        self._due: Flag | None = None
        self.reauth_pending = False
        self.refreshing = Watched(False)

        self._inflight: _Flight | None = None
        self._base_attempt_timeout = max(_MIN_ATTEMPT_TIMEOUT, leeway / 2)
        self._failures = 0
        self._same_token_answers = 0
        self._retry_not_before = 0.0  # event-loop time of the next allowed attempt
        self._closed = Flag()
        self._rng = _RNG

        # Hooks the client sets.
        self.send_authenticate: Callable[[], None] = _nothing
        # Called on every confirmation: whether it is the flow's first, and whether the
        # token differs from the one confirmed before (a reconnect re-confirms the same).
        self.on_confirmed: Callable[[bool, bool], None] = _nothing_confirmed
        self.on_signed_out: Callable[[], None] = _nothing
        # Called when the identity is lost for good (not on an explicit clear): requests
        # made under it must fail rather than run anonymously.
        self.on_identity_lost: Callable[[DartvexError], None] = _nothing_lost
        # Called once when the client closes (or fails for good).
        self.on_closed: Callable[[], None] = _nothing

    # -- configuration -------------------------------------------------------------------

    @property
    def generation(self) -> int:
        return self._generation

    @property
    def is_set(self) -> bool:
        return self.token is not None

    @property
    def has_fetcher(self) -> bool:
        return self._fetcher is not None

    def runs(self, fetcher: FetchToken) -> bool:
        """Whether the flow in force is ``fetcher``'s and still fetching (not signed out)."""
        return self._fetcher is not None and self._fetcher == fetcher and not self._signed_out_latch

    @property
    def awaiting_confirmation(self) -> bool:
        return self._awaiting_version is not None

    def set_fixed(self, token: str | None) -> None:
        """A fixed token (no refresh), or None to sign out of Convex."""
        self._reset()
        self._use_token(token, fetched=False)
        self._configured.set()
        if token is None:
            self._signed_out_by_caller()

    def _signed_out_by_caller(self) -> None:
        # With expect_auth nothing may run anonymously: once signed out, function calls
        # fail (SessionExpiredError) until the next set_auth, as after a session's end.
        if self.expect_auth:
            self._signed_out_latch = True

    def set_fetcher(self, fetcher: FetchToken, initial_token: str | None) -> int:
        """Start a refreshing flow; returns its generation.

        An ``initial_token`` that has expired by the wall clock (or expires within the
        connect margin) is not used: ``token`` stays None and ``initial_fetch`` replaces
        it with a forced fetch before anything is sent."""
        self._reset()
        self._fetcher = fetcher
        self._initial_force = False
        if initial_token is not None and self._expired_on_arrival(initial_token):
            log.info("the initial token has expired; fetching a fresh one instead")
            self._initial_force = True
            initial_token = None
        self._use_token(initial_token, fetched=False)
        self._awaiting_initial = True
        self._configured.set()
        return self._generation

    def _expired_on_arrival(self, token: str) -> bool:
        _, exp = token_times(token)
        return exp is not None and exp <= self._clock() + _CONNECT_MARGIN

    def clear(self) -> None:
        """Stop refreshing and forget the token (the caller sends Authenticate None)."""
        self._reset()
        self._configured.set()
        self._signed_out_by_caller()

    def _reset(self) -> None:
        self._generation += 1
        self._fetcher = None
        self._use_token(None)
        self._signed_out_latch = False
        self._fresh_rejections = 0
        self._awaiting_initial = False
        self._had_confirmation = False
        self._confirmed_token = None
        self._failures = 0
        self._same_token_answers = 0
        self._retry_not_before = 0.0
        # A fetch in flight now belongs to a replaced flow: nobody joins it any more.
        self._inflight = None
        self.reauth_pending = False
        self.refreshing.set(False)
        self._schedule()

    # -- frames --------------------------------------------------------------------------

    def reset_socket(self) -> None:
        """A new socket starts with identity version 0 on both sides, and anonymous."""
        self.identity_version = 0
        self._awaiting_version = None
        if self.token is None:
            self._resolve_waiters()

    def authenticate_message(self) -> Authenticate:
        """Build the next Authenticate from the token in force right now."""
        base = self.identity_version
        self.identity_version += 1
        self._awaiting_version = self.identity_version
        if self.token is None:
            return Authenticate(base_version=base, token_type="None")
        return Authenticate(base_version=base, token_type="User", value=self.token)

    def add_waiter(self) -> asyncio.Future[None]:
        """A future resolved when the server confirms the token now in force."""
        future: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        if self.token is None and self._awaiting_version is None:
            future.set_result(None)
        else:
            self._waiters.append(future)
        return future

    def _resolve_waiters(self) -> None:
        waiters, self._waiters = self._waiters, []
        for w in waiters:
            if not w.done():
                w.set_result(None)

    def fail_waiters(self, error: BaseException) -> None:
        waiters, self._waiters = self._waiters, []
        for w in waiters:
            if not w.done():
                w.set_exception(error)

    # -- server events ---------------------------------------------------------------------

    def on_identity_advanced(self, start: int, end: int) -> bool:
        """Called for every Transition; True when it confirmed the pending token."""
        if end <= start or self._awaiting_version is None or end < self._awaiting_version:
            return False
        self._awaiting_version = None
        self._resolve_waiters()
        if self.token is None:
            return True
        first = not self._had_confirmation
        self._had_confirmation = True
        self._fresh_rejections = 0
        changed = self.token != self._confirmed_token
        self._confirmed_token = self.token
        self.refreshing.set(False)
        log.debug("server confirmed the token (%s)", redact(self.token))
        if self._fetcher is not None:
            if self._awaiting_initial and not self.reuse_initial_token:
                # Parity with the official client: swap the first token for a fresh one.
                self._refresh_at = self._clock()
                self._schedule()
            self._awaiting_initial = False
        self.on_confirmed(first, changed)
        return True

    def on_auth_error(self, msg: AuthError) -> bool:
        """The server rejected a token (the socket closes next). Returns False when the
        error was about an older token and is ignored (the close is then an ordinary one,
        with backoff)."""
        if msg.auth_update_attempted is False and self._awaiting_version is not None:
            # About the previous, expiring token while a new one awaits confirmation.
            log.debug("ignoring an AuthError about the previous token: %s", msg.error)
            return False
        if msg.base_version is not None and msg.base_version + 1 < self.identity_version:
            log.debug("ignoring a stale AuthError: %s", msg.error)
            return False
        log.warning("the Convex server rejected the token: %s", msg.error)
        self._awaiting_version = None
        if self._fetcher is None or self._signed_out_latch:
            # A fixed token cannot be replaced: sign out of Convex instead of resending it.
            self._use_token(None)
            error = AuthRejectedError(f"the Convex server rejected the token: {msg.error}")
            self.fail_waiters(error)
            self.on_identity_lost(error)
            self.on_signed_out()
            return True
        if self._token_fresh:
            self._fresh_rejections += 1
        self.reauth_pending = True
        self.refreshing.set(True)
        return True

    # -- fetching ----------------------------------------------------------------------------

    async def _fetch(self, force: bool) -> str | None:
        """One fetch through the single-flight slot. Raises _SignedOut at the end of the
        session, _Superseded when a newer flow replaced this one; other errors propagate
        (transient).

        A fetch in flight is shared only within its own flow (a replaced flow's fetcher
        may answer for another user), and a forced caller never takes the answer of an
        unforced fetch (it may be a cached JWT): it waits for that one to end, then
        fetches forced.
        """
        if self._signed_out_latch or self._fetcher is None:
            raise _SignedOut
        generation = self._generation
        while True:
            if generation != self._generation:
                raise _Superseded
            flight = self._inflight
            if flight is None or flight.generation != generation:
                break  # lead a fetch of our own
            if force and not flight.force:
                await asyncio.wait([flight.future])  # however it ends; then fetch forced
                continue
            try:
                token = await asyncio.shield(flight.future)
            except asyncio.CancelledError:
                if flight.future.cancelled():
                    continue  # the leader was cancelled: try to lead
                raise
            return self._accept(token, generation)
        fetcher = self._fetcher
        if fetcher is None or self._signed_out_latch:
            raise _SignedOut
        flight = _Flight(generation, force, asyncio.get_running_loop().create_future())
        self._inflight = flight
        try:
            token = await fetcher(force)
        except BaseException as exc:
            if isinstance(exc, asyncio.CancelledError):
                flight.future.cancel()
            else:
                flight.future.set_exception(exc)
                flight.future.exception()  # retrieved: waiters re-raise their own copy
            raise
        else:
            flight.future.set_result(token)
        finally:
            # Only this flight's own slot is cleared, never a newer flow's.
            if self._inflight is flight:
                self._inflight = None
        return self._accept(token, generation)

    def _accept(self, token: str | None, generation: int) -> str | None:
        if generation != self._generation:
            raise _Superseded
        if token is None:
            raise _SignedOut
        return token

    async def _fetch_until_done(self, force: bool, *, first: bool = False) -> str:
        """Fetch, retrying transient failures with jittered backoff (at least what a 429's
        ``retry_after`` asks for). Raises _SignedOut, or ClientClosedError once the client
        is closed.

        The retry schedule belongs to the manager, not to the caller: the refresh task,
        the connect gate and set_auth all wait for the same next attempt, so they never
        double the calls on a struggling token endpoint.
        """
        loop = asyncio.get_running_loop()
        while True:
            if self._closed.is_set():
                raise ClientClosedError("the Convex client was closed")
            pause = self._retry_not_before - loop.time()
            if pause > 0:
                with anyio.move_on_after(pause):
                    await self._closed.wait()
                continue
            try:
                token = await self._fetch_checked(force)
            except (_SignedOut, _Superseded, asyncio.CancelledError):
                raise
            except SessionExpiredError as exc:
                raise _SignedOut from exc
            except Exception as exc:
                if first and not _transient(exc):
                    # No session yet to keep: a first fetch that fails for good (a bug, a
                    # refused request) is the caller's error, not something to retry.
                    raise
                self._failures += 1
                base = min(_RETRY_INITIAL * 2 ** min(self._failures - 1, 16), _RETRY_MAX)
                wait = base * self._rng.uniform(0.5, 1.5)
                retry_after = getattr(exc, "retry_after", None)
                if isinstance(retry_after, int | float) and retry_after > 0:
                    wait = max(wait, min(float(retry_after), _RETRY_AFTER_MAX))
                self._retry_not_before = max(self._retry_not_before, loop.time() + wait)
                # Only None or SessionExpiredError end a session; anything else keeps it.
                # One that does not call itself retryable is likely a bug or a broken
                # deployment: say so louder, but still never sign the user out for it.
                level = logging.WARNING if getattr(exc, "retryable", True) else logging.ERROR
                log.log(
                    level,
                    "token fetch failed (%s); keeping the session and retrying in %.1f s",
                    type(exc).__name__,
                    wait,
                )
            else:
                self._failures = 0
                return token

    def close(self) -> None:
        """The client is closing: pending fetch loops end with ClientClosedError, and the
        auth streams (``refreshing`` and whatever ``on_closed`` ends) stop."""
        if self._closed.is_set():
            return
        self._closed.set()
        self._schedule()
        self.refreshing.close()
        self.on_closed()

    @property
    def closed(self) -> bool:
        return self._closed.is_set()

    def _attempt_timeout(self) -> float:
        """How long the next fetch attempt may take. The first is bounded well inside the
        leeway, so one stalled request cannot use up the time left before the token
        expires; each failure in a row doubles it (a slow endpoint gets through in the
        end), but while the token in force is valid never past its remaining lifetime."""
        base = self._base_attempt_timeout
        grown = min(base * 2.0 ** min(self._failures, 16), _MAX_ATTEMPT_TIMEOUT)
        if self.token is not None and self._deadline is not None:
            left = self._deadline - self._clock()
            if left > 0:
                return max(base, min(grown, left))
        return max(base, grown)

    async def _fetch_checked(self, force: bool) -> str:
        with anyio.fail_after(self._attempt_timeout()):
            token = await self._fetch(force)
        assert token is not None
        return token

    def _sign_out(self) -> None:
        if self._signed_out_latch:
            return
        log.info("the session ended; signed out")
        self._signed_out_latch = True
        self._use_token(None)
        self.reauth_pending = False
        self.refreshing.set(False)
        error = SessionExpiredError("the session ended; sign in again")
        self.fail_waiters(error)
        self.on_identity_lost(error)
        self.send_authenticate()
        self.on_signed_out()

    # -- the socket loop's hooks ------------------------------------------------------------------

    async def _fetch_for_flow(self, force: bool, *, first: bool = False) -> str | None:
        """A token for the flow in force now, or None when there is none to use: a newer
        set_auth/clear superseded this flow, or the session ended (signed out here, once).
        With ``first``, an error not marked retryable propagates instead of being retried.
        """
        generation = self._generation
        try:
            token = await self._fetch_until_done(force, first=first)
        except _Superseded:
            return None
        except _SignedOut:
            if generation == self._generation:
                self._sign_out()
            return None
        return token if generation == self._generation else None

    async def before_connect(self) -> None:
        """Hold the connection until auth is configured (expect_auth) and the token in
        force is not expired by the wall clock."""
        await self._configured.wait()
        if self._fetcher is None or self._signed_out_latch:
            return
        if self.token is not None and not self._expires_within(_CONNECT_MARGIN):
            return
        force = self.token is not None
        token = await self._fetch_for_flow(force=force)
        if token is not None:
            self._use_token(token, fresh=force)

    async def reauthenticate(self) -> None:
        """After an AuthError: get a fresh token (the socket is down meanwhile)."""
        self.reauth_pending = False
        if self._fresh_rejections > _MAX_REJECTED_FRESH_TOKENS:
            log.error(
                "the Convex server rejected %d fresh tokens in a row; check the deployment's "
                "auth config (issuer, audience, JWKS). Signing out.",
                self._fresh_rejections,
            )
            self._sign_out()
            return
        previous = self.token
        token = await self._fetch_for_flow(force=True)
        if token is None:
            return
        if token == previous and self._expires_within(0):
            log.warning("the token source returned the same, expired token")
        self._use_token(token, fresh=True)

    async def initial_fetch(self) -> None:
        """For set_auth(fetcher) without a usable initial token: the first token,
        retrying transient failures (errors marked ``retryable``; any other propagates);
        non-forced, unless it replaces an expired initial token. Signs out when the
        source has no session."""
        token = await self._fetch_for_flow(force=self._initial_force, first=True)
        if token is not None:
            self._use_token(token, fresh=self._initial_force)

    @property
    def signed_out(self) -> bool:
        """True once the token source said the session is over (until the next flow)."""
        return self._signed_out_latch

    async def refresh_now(self) -> bool:
        """A forced fetch now; a new token is sent at once. Returns whether a new token was
        sent (the source may answer with the one in force). Raises SessionExpiredError
        when the session is over."""
        if self._fetcher is None or self._signed_out_latch:
            raise SessionExpiredError("there is no session to refresh; sign in")
        token = await self._fetch_for_flow(force=True)
        if token is None:
            if self._signed_out_latch:
                raise SessionExpiredError("the session ended; sign in again")
            return False
        if token != self.token:
            self._use_token(token, fresh=True)
            self.send_authenticate()
            return True
        return False

    def _use_token(self, token: str | None, *, fetched: bool = True, fresh: bool = False) -> None:
        """Put a token in force and schedule its replacement (see ``_jwt.refresh_delay``:
        its expiry on this machine's clock is ``exp``, but never later than now plus its
        own lifetime). A token just ``fetched`` that looks expired on arrival means this
        clock runs ahead of the issuer's: then the lifetime alone counts. A token handed
        in (a fixed or initial one) gets no such benefit of the doubt. ``fresh``: it came
        from a forced fetch (its rejection counts against the rejected-token budget)."""
        self.token = token
        self._token_fresh = fresh and token is not None
        self._deadline = None
        self._refresh_at = None
        if token is None:
            self._schedule()
            return
        now = self._clock()
        iat, exp = token_times(token)
        if exp is None:
            self._schedule()
            return  # no expiry to honour; the server decides
        if fetched and iat is not None and exp <= now + 1:
            log.warning(
                "a fresh token already looks expired by this machine's clock; the clock is "
                "probably ahead of the issuer's. Using the token's lifetime instead."
            )
        self._deadline = token_deadline(iat, exp, now=now, fresh=fetched)
        if self._fetcher is None:
            return
        # A leeway as long as the token's life would refresh non-stop: use at most half.
        # Up to 15% early, never late: a fleet of clients that signed in together does not
        # hit the token endpoint in one wave.
        delay = refresh_delay(
            iat,
            exp,
            leeway=self.leeway,
            now=now,
            fresh=fetched,
            max_leeway_share=0.5,
            jitter=self._rng.uniform(0.0, _REFRESH_JITTER),
        )
        if delay is None:
            log.warning("the token has no usable iat/exp or lives too briefly; not refreshing")
            return
        self._refresh_at = now + delay
        self._schedule()
        log.debug("next token refresh in %.1f s", delay)

    def _expires_within(self, margin: float) -> bool:
        return self._deadline is not None and self._clock() >= self._deadline - margin

    # -- the refresh schedule -------------------------------------------------------------

    # No task waits for a refresh: a timer wakes up when one is due and only then is a
    # refresh task started (in the client's task group). The wall clock is re-read at
    # least every _WAKE_SLICE seconds, so a machine that slept, or a loop that woke late,
    # refreshes at once instead of sending an expired token; that check is one timer for
    # every client on the event loop, not one wake-up per client.

    def attach(self, spawn: Callable[[Callable[[], Awaitable[None]]], None] | None) -> None:
        """The client's task group is up (``spawn`` starts a task in it) or gone (None)."""
        self._spawn = spawn
        self._schedule()

    async def run_refresh_loop(self) -> None:
        """Run the refreshes in this task instead (when no client spawns them)."""
        due = self._due = Flag()
        try:
            while True:
                self._schedule()
                await due.wait()
                due.clear()
                await self._refresh_while_due()
        finally:
            self._due = None
            self._schedule()

    def _schedule(self) -> None:
        """(Re)arm the wake-up for the refresh due at ``_refresh_at``, or start it."""
        timer, self._timer = self._timer, None
        if timer is not None:
            timer.cancel()
        due = self._refresh_at
        if (
            due is None
            or self._refreshing_ended()
            or self._refresh_running
            or (self._spawn is None and self._due is None)
        ):
            self._leave_ticker()
            return
        remaining = due - self._clock()
        if remaining <= 0:
            self._leave_ticker()
            if self._due is not None:
                self._due.set()
            elif self._spawn is not None:
                self._refresh_running = True
                self._spawn(self._refresh_while_due)
            return
        entry = self._ticker_entry
        if remaining > _WAKE_SLICE and entry is not None and entry[0] == due:
            return  # the shared ticker looks again in time
        try:
            loop = asyncio.get_running_loop()
        except RuntimeError:
            return  # no loop yet: attach() or run_refresh_loop() schedules it
        self._leave_ticker()
        if remaining <= _WAKE_SLICE:
            self._timer = loop.call_later(remaining, self._schedule)
        else:
            self._ticker = _Ticker.for_clock(loop, self._clock)
            self._ticker_entry = self._ticker.join(loop, self, due)

    def _refreshing_ended(self) -> bool:
        """No token source, signed out, or closed: no refresh is due, whatever the time."""
        return self._fetcher is None or self._signed_out_latch or self._closed.is_set()

    def _leave_ticker(self) -> None:
        ticker, self._ticker = self._ticker, None
        entry, self._ticker_entry = self._ticker_entry, None
        if ticker is not None and entry is not None:
            ticker.leave(entry)

    async def _refresh_while_due(self) -> None:
        """Refresh while a refresh is due (the refresh task's body)."""
        self._refresh_running = True
        try:
            while True:
                due = self._refresh_at
                if due is None or self._refreshing_ended() or due > self._clock():
                    return
                await self._refresh_once()
        finally:
            self._refresh_running = False
            self._schedule()

    async def _refresh_once(self) -> None:
        self._refresh_at = None
        previous = self.token
        token = await self._fetch_for_flow(force=True)
        if token is None:
            return
        if token == previous:
            # Same token (the server issues identical JWTs within one second): try again
            # shortly instead of giving up on refreshing, but back off (1 s, 2 s, 4 s, ...
            # at most 16 s) so a source that always answers this token is not asked every
            # second for ever.
            self._same_token_answers += 1
            delay = min(_SAME_TOKEN_RETRY * 2 ** min(self._same_token_answers - 1, 16), _RETRY_MAX)
            self._refresh_at = self._clock() + delay
            log.debug("the token source answered the same token; asking again in %.0f s", delay)
            return
        self._same_token_answers = 0
        self._use_token(token, fresh=True)
        self.send_authenticate()


# A ticker entry: [due (wall clock), sequence number, weak reference to the manager, or
# None once withdrawn].
_Entry = list[Any]


class _Ticker:
    """Every _WAKE_SLICE seconds, re-reads the wall clock for every client on one event
    loop whose refresh is further off than that (a timer, not a task; it stops when no
    client needs it). Entries are kept in a heap by due time, so a tick only visits the
    clients whose refresh has come within a slice: idle clients cost nothing.

    It holds no strong reference to a client nor to the loop (which keys _TICKERS
    weakly): a client that was never closed, or a loop that ended with clients still
    open, is not kept alive by it."""

    __slots__ = ("__weakref__", "_armed", "_clock", "_heap", "_live", "_seq")

    def __init__(self, clock: Callable[[], float]) -> None:
        self._clock = clock
        self._heap: list[_Entry] = []
        self._live = 0
        self._seq = 0
        self._armed = False  # a tick is pending (when nobody is left, it finds nothing)

    @classmethod
    def for_clock(cls, loop: asyncio.AbstractEventLoop, clock: Callable[[], float]) -> _Ticker:
        by_clock = _TICKERS.get(loop)
        if by_clock is None:
            by_clock = _TICKERS[loop] = {}
        ticker = by_clock.get(clock)
        if ticker is None:
            ticker = by_clock[clock] = cls(clock)
        return ticker

    def join(self, loop: asyncio.AbstractEventLoop, manager: AuthManager, due: float) -> _Entry:
        self._seq += 1
        entry: _Entry = [due, self._seq, weakref.ref(manager)]
        heapq.heappush(self._heap, entry)
        self._live += 1
        if not self._armed:
            self._armed = True
            loop.call_later(_WAKE_SLICE, self._tick)
        return entry

    def leave(self, entry: _Entry) -> None:
        if entry[2] is None:
            return
        entry[2] = None  # withdrawn: skipped when it comes up
        self._live -= 1
        if not self._live:
            self._heap.clear()
        elif len(self._heap) > 2 * self._live + 64:
            self._heap = [e for e in self._heap if e[2] is not None]
            heapq.heapify(self._heap)

    def _tick(self) -> None:
        self._armed = False
        heap = self._heap
        limit = self._clock() + _WAKE_SLICE
        while heap and heap[0][0] <= limit:
            entry = heapq.heappop(heap)
            ref = entry[2]
            if ref is None:
                continue
            entry[2] = None
            self._live -= 1
            manager: AuthManager | None = ref()
            if manager is None:
                continue  # dropped without being closed
            manager._ticker = manager._ticker_entry = None
            manager._schedule()  # its own timer now, or the refresh itself
        if not self._live:
            heap.clear()
        elif not self._armed:
            self._armed = True
            asyncio.get_running_loop().call_later(_WAKE_SLICE, self._tick)


_TICKERS: weakref.WeakKeyDictionary[
    asyncio.AbstractEventLoop, dict[Callable[[], float], _Ticker]
] = weakref.WeakKeyDictionary()


def _transient(exc: BaseException) -> bool:
    """Worth retrying: marked ``retryable``, or a timeout or OS-level network error."""
    retryable = getattr(exc, "retryable", None)
    if retryable is not None:
        return retryable is True
    return isinstance(exc, TimeoutError | OSError)
