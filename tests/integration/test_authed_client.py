"""ConvexClient.with_auth(provider): the sign-in lifecycle on real servers.

The Python counterparts of dartvex's ``auth_test.dart`` (ConvexClientWithAuth), ported to
the real Better Auth server under Node and a LocalConvex that verifies its JWTs. The
provider is the real ConvexBetterAuthProvider behind a small hand-written AuthProvider
(``Scripted``) that logs the calls the client makes and lets a test hold one on an event
or make it fail. HTTP calls to Better Auth are counted with an aiohttp trace on the
client's own session. Nothing of the SDK is mocked.

Better Auth puts the Convex JWT of a sign-in into a cookie of the sign-in answer, so a
password login costs one ``sign-in/email`` request and no ``/convex/token`` request.
"""

from __future__ import annotations

import contextlib
import secrets
from collections import Counter
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field
from types import SimpleNamespace
from typing import Any

import aiohttp
import anyio
import anyio.abc
import pytest

from dartvex_auth_better import (
    Authenticated,
    AuthEvent,
    AuthLoading,
    AuthState,
    BetterAuthClient,
    BetterAuthSession,
    ClientClosedError,
    ConvexBetterAuthProvider,
    ConvexClient,
    InvalidCredentialsError,
    LoginSupersededError,
    MemorySessionStore,
    SessionExpiredError,
    Unauthenticated,
)
from dartvex_auth_better._jwt import token_claims
from dartvex_auth_better.convex._auth_types import AuthProvider
from dartvex_auth_better.convex._authed import AuthenticatedConvexClient, AuthEventStream
from dartvex_auth_better.testing import LocalBetterAuth, LocalConvex

pytestmark = [pytest.mark.anyio, pytest.mark.integration]

PASSWORD = "correct horse battery staple"
TOKEN = "/api/auth/convex/token"
GET_SESSION = "/api/auth/get-session"
SIGN_IN = "/api/auth/sign-in/email"
SIGN_UP = "/api/auth/sign-up/email"
SIGN_OUT = "/api/auth/sign-out"

# Generous for one test's real round trips, far below the suite's own timeout.
TEST_TIMEOUT = 15


# -- counting HTTP calls ---------------------------------------------------------------------


class RequestLog:
    """Every request a BetterAuthClient makes, by path (an aiohttp trace on its session)."""

    def __init__(self) -> None:
        self.counts: Counter[str] = Counter()
        self._changed = anyio.Event()

    def trace_config(self) -> aiohttp.TraceConfig:
        config = aiohttp.TraceConfig()
        config.on_request_start.append(self._on_request_start)
        return config

    async def _on_request_start(
        self,
        session: aiohttp.ClientSession,
        context: SimpleNamespace,
        params: aiohttp.TraceRequestStartParams,
    ) -> None:
        self.counts[params.url.path] += 1
        self._changed.set()
        self._changed = anyio.Event()

    async def wait_for(self, path: str, n: int) -> None:
        while self.counts[path] < n:
            await self._changed.wait()


@dataclass
class Stack:
    better_auth: LocalBetterAuth
    convex: LocalConvex
    auth: BetterAuthClient  # its requests are counted in ``log``
    log: RequestLog

    def client(self, **options: Any) -> ConvexClient:
        # Quick reconnects: the tests drop sockets on purpose.
        options.setdefault("initial_backoff", 0.01)
        options.setdefault("max_backoff", 0.05)
        return ConvexClient(self.convex.url, **options)


@pytest.fixture
async def stack(
    better_auth_server: LocalBetterAuth, convex_server: LocalConvex
) -> AsyncIterator[Stack]:
    log = RequestLog()
    async with (
        aiohttp.ClientSession(
            cookie_jar=aiohttp.DummyCookieJar(), trace_configs=[log.trace_config()]
        ) as http,
        BetterAuthClient(better_auth_server.url, session=http) as auth,
    ):
        yield Stack(better_auth_server, convex_server, auth, log)


async def new_account(better_auth: LocalBetterAuth, name: str = "Ada") -> tuple[str, str]:
    """A fresh account, created on the side (not counted); returns (email, user id)."""
    email = f"authed-{secrets.token_hex(6)}@example.com"
    async with BetterAuthClient(better_auth.url) as auth:
        session = await auth.sign_up(name, email, PASSWORD)
    return email, session.user_id


def subject_of(jwt: str | None) -> Any:
    assert jwt is not None
    claims = token_claims(jwt)
    assert claims is not None
    return claims["sub"]


# -- a hand-written AuthProvider around the real one ---------------------------------------


class ProviderBroke(Exception):
    """What a Scripted provider raises when told to fail."""


@dataclass(eq=False)
class Gate:
    """Holds one call until ``release`` is set; ``entered`` is set when it arrives."""

    entered: anyio.Event = field(default_factory=anyio.Event)
    release: anyio.Event = field(default_factory=anyio.Event)

    async def pass_through(self) -> None:
        self.entered.set()
        await self.release.wait()


class Scripted:
    """The real ConvexBetterAuthProvider, with a log of the client's calls and hooks to
    hold or fail them. ``login_gates[email]`` holds that login before it reaches the
    server (a slow sign-in request); ``returning_gates[email]`` holds its answer after the
    server signed the user in (a slow response)."""

    def __init__(self, inner: ConvexBetterAuthProvider) -> None:
        self.inner = inner
        self.calls: list[str] = []
        self.fetches: list[bool] = []
        self.login_gates: dict[str, Gate] = {}
        self.returning_gates: dict[str, Gate] = {}
        self.login_error: Exception | None = None
        self.logout_error: Exception | None = None
        self.fetch_error: Exception | None = None
        self.fetch_gate: Gate | None = None  # holds the next fetch before it is made
        self.fetch_answer_gate: Gate | None = None  # holds the next fetch's answer
        self.after_inner_logout: Callable[[], Awaitable[None]] | None = None

    async def login(self, email: str, password: str) -> BetterAuthSession:
        self.calls.append("login")
        if self.login_error is not None:
            raise self.login_error
        if email in self.login_gates:
            await self.login_gates[email].pass_through()
        session = await self.inner.login(email, password)
        if email in self.returning_gates:
            await self.returning_gates[email].pass_through()
        return session

    async def sign_up(self, name: str, email: str, password: str) -> BetterAuthSession:
        self.calls.append("sign_up")
        return await self.inner.sign_up(name, email, password)

    async def login_from_cache(self) -> BetterAuthSession:
        self.calls.append("login_from_cache")
        return await self.inner.login_from_cache()

    async def logout(self) -> None:
        self.calls.append("logout")
        if self.logout_error is not None:
            raise self.logout_error
        await self.inner.logout()
        if self.after_inner_logout is not None:
            await self.after_inner_logout()

    async def fetch_token(self, force_refresh: bool) -> str | None:
        self.fetches.append(force_refresh)
        if self.fetch_gate is not None:
            gate, self.fetch_gate = self.fetch_gate, None
            await gate.pass_through()
        if self.fetch_error is not None:
            raise self.fetch_error
        token = await self.inner.fetch_token(force_refresh)
        if self.fetch_answer_gate is not None:
            gate, self.fetch_answer_gate = self.fetch_answer_gate, None
            await gate.pass_through()
        return token

    def token_of(self, session: BetterAuthSession) -> str:
        return self.inner.token_of(session)


_scripted_is_a_provider: type[AuthProvider[BetterAuthSession]] = Scripted


def scripted(stack: Stack, store: MemorySessionStore | None = None) -> Scripted:
    return Scripted(ConvexBetterAuthProvider(stack.auth, store=store))


async def login_outcome(
    authed: AuthenticatedConvexClient[BetterAuthSession], email: str, outcome: list[object]
) -> None:
    """``authed.login(email)``, its session or its LoginSupersededError put in *outcome*."""
    try:
        outcome.append(await authed.login(email, PASSWORD))
    except LoginSupersededError as exc:
        outcome.append(exc)


# -- watching states and events ------------------------------------------------------------


class StateLog:
    """Every auth state a watcher of ``auth_states()`` saw, from the current one on."""

    def __init__(self) -> None:
        self.seen: list[AuthState] = []
        self._changed = anyio.Event()

    async def run(
        self,
        authed: AuthenticatedConvexClient[Any],
        *,
        task_status: anyio.abc.TaskStatus[None] = anyio.TASK_STATUS_IGNORED,
    ) -> None:
        started = False
        async for state in authed.auth_states():
            self.seen.append(state)
            self._changed.set()
            self._changed = anyio.Event()
            if not started:
                started = True
                task_status.started()

    async def wait_for(self, state: AuthState) -> None:
        while not self.seen or self.seen[-1] != state:
            await self._changed.wait()


async def drained(events: AuthEventStream) -> list[AuthEvent]:
    """Stop listening and return every event the stream had queued."""
    events.close()
    return [event async for event in events]


async def whoami(authed: AuthenticatedConvexClient[Any]) -> Any:
    me = await authed.query("users:whoami")
    return None if me is None else me["subject"]


def user_tokens(record: Any) -> list[str]:
    return [f["value"] for f in record.frames_of_type("Authenticate") if f["tokenType"] == "User"]


# -- login: loading until the server confirms ------------------------------------------------


async def test_login_is_loading_until_a_transition_confirms_the_identity(stack: Stack):
    email, user_id = await new_account(stack.better_auth)
    provider = scripted(stack)
    states = StateLog()
    async with stack.client() as client, anyio.create_task_group() as tg:
        authed = client.with_auth(provider)
        events = authed.auth_events()
        with anyio.fail_after(TEST_TIMEOUT):
            await tg.start(states.run, authed)
            await client.wait_connected()
            record = await stack.convex.wait_for_connections(1)
            stack.convex.pause()  # frames are recorded but nothing is answered
            result: list[BetterAuthSession] = []
            logged_in = anyio.Event()

            async def login() -> None:
                result.append(await authed.login(email, PASSWORD))
                logged_in.set()

            tg.start_soon(login)
            frame = await record.wait_for_frame(
                "Authenticate", predicate=lambda f: f["tokenType"] == "User"
            )
            # The token was fetched and sent, but the server has not confirmed it.
            assert provider.inner.session is not None
            assert frame["value"] == provider.inner.session.token
            assert authed.auth_state == AuthLoading()
            assert result == []

            stack.convex.resume()
            await states.wait_for(Authenticated(provider.inner.session))
            await logged_in.wait()
            assert await whoami(authed) == user_id
        tg.cancel_scope.cancel()

    session = result[0]
    assert states.seen == [Unauthenticated(), AuthLoading(), Authenticated(session)]
    assert await drained(events) == [AuthEvent.SIGNED_IN]
    # Exactly one Authenticate, carrying the login's token, and the server took it.
    assert user_tokens(record) == [provider.token_of(session)]
    assert [t.accepted for t in stack.convex.received_tokens] == [True]
    assert provider.calls == ["login"]


async def test_login_returns_authenticated_against_a_server_that_answers_at_once(
    stack: Stack,
):
    email, user_id = await new_account(stack.better_auth)
    provider = scripted(stack)
    async with stack.client() as client:
        authed = client.with_auth(provider)
        events = authed.auth_events()
        with anyio.fail_after(TEST_TIMEOUT):
            session = await authed.login(email, PASSWORD)
            # login() returns once the server confirmed the identity.
            assert authed.auth_state == Authenticated(session)
            assert session.user_id == user_id
            assert await whoami(authed) == user_id
    assert await drained(events) == [AuthEvent.SIGNED_IN]
    assert len(stack.convex.received_tokens) == 1


# -- a failed login ----------------------------------------------------------------------------


async def test_a_wrong_password_is_a_typed_error_and_leaves_no_identity(stack: Stack):
    email, _ = await new_account(stack.better_auth)
    provider = scripted(stack)
    states = StateLog()
    async with stack.client() as client, anyio.create_task_group() as tg:
        authed = client.with_auth(provider)
        events = authed.auth_events()
        with anyio.fail_after(TEST_TIMEOUT):
            await tg.start(states.run, authed)
            with pytest.raises(InvalidCredentialsError):
                await authed.login(email, "not the password at all")
            assert authed.auth_state == Unauthenticated()
            await states.wait_for(Unauthenticated())
            assert await whoami(authed) is None
        tg.cancel_scope.cancel()
    assert states.seen == [Unauthenticated(), AuthLoading(), Unauthenticated()]
    assert await drained(events) == []
    assert stack.convex.received_tokens == []
    assert provider.inner.session is None
    assert stack.log.counts[SIGN_IN] == 1 and stack.log.counts[TOKEN] == 0


async def test_a_provider_that_raises_leaves_the_client_unauthenticated_and_usable(
    stack: Stack,
):
    email, user_id = await new_account(stack.better_auth)
    provider = scripted(stack)
    provider.login_error = ProviderBroke("the provider broke")
    async with stack.client() as client:
        authed = client.with_auth(provider)
        events = authed.auth_events()
        with anyio.fail_after(TEST_TIMEOUT):
            with pytest.raises(ProviderBroke):
                await authed.login(email, PASSWORD)
            assert authed.auth_state == Unauthenticated()
            assert await whoami(authed) is None
            assert await drained(events) == []
            assert stack.convex.received_tokens == []
            assert provider.fetches == []

            # Nothing is left half-done: the next login works.
            provider.login_error = None
            events = authed.auth_events()
            session = await authed.login(email, PASSWORD)
            assert authed.auth_state == Authenticated(session)
            assert await whoami(authed) == user_id
    assert await drained(events) == [AuthEvent.SIGNED_IN]
    assert provider.calls == ["login", "login"]


async def test_a_cancelled_login_leaves_no_identity_behind(stack: Stack):
    email, _ = await new_account(stack.better_auth)
    provider = scripted(stack)
    async with stack.client() as client:
        authed = client.with_auth(provider)
        events = authed.auth_events()
        with anyio.fail_after(TEST_TIMEOUT):
            await client.wait_connected()
            record = await stack.convex.wait_for_connections(1)
            stack.convex.pause()
            async with anyio.create_task_group() as tg:
                tg.start_soon(authed.login, email, PASSWORD)
                await record.wait_for_frame(
                    "Authenticate", predicate=lambda f: f["tokenType"] == "User"
                )
                tg.cancel_scope.cancel()  # the caller gave up while waiting
            stack.convex.resume()
            assert authed.auth_state == Unauthenticated()
            # The server answers the held Authenticate now; the client must not be
            # signed in by it, nor keep refreshing a login nobody waits for.
            assert await whoami(authed) is None
            assert authed.auth_state == Unauthenticated()
    assert await drained(events) == []


# -- concurrent logins -------------------------------------------------------------------------


@pytest.mark.parametrize("slow", ["sign_in_request", "sign_in_answer"])
async def test_concurrent_logins_the_last_one_wins(stack: Stack, slow: str):
    first_email, first_id = await new_account(stack.better_auth, "First")
    second_email, second_id = await new_account(stack.better_auth, "Second")
    provider = scripted(stack)
    gate = Gate()
    # sign_in_request: the first login reaches Better Auth only after the second is
    # done; sign_in_answer: it signed in first, but its answer arrives last.
    gates = provider.login_gates if slow == "sign_in_request" else provider.returning_gates
    gates[first_email] = gate
    outcome: list[object] = []
    async with stack.client() as client:
        authed = client.with_auth(provider)
        with anyio.fail_after(TEST_TIMEOUT):
            async with anyio.create_task_group() as tg:
                tg.start_soon(login_outcome, authed, first_email, outcome)
                await gate.entered.wait()
                second = await authed.login(second_email, PASSWORD)
                assert authed.auth_state == Authenticated(second)
                gate.release.set()
            # The stale login was cancelled before its session was taken on.
            assert len(outcome) == 1 and isinstance(outcome[0], LoginSupersededError), outcome

            # Whatever the stale login did, state, provider and server agree: second.
            state = authed.auth_state
            assert isinstance(state, Authenticated)
            assert state.session.user_id == second_id
            assert provider.inner.session is not None
            assert provider.inner.session.user_id == second_id
            assert await whoami(authed) == second_id
            # The provider's next token is the second user's too.
            await authed.refresh_now()
            assert await whoami(authed) == second_id
    subjects = [subject_of(t.token) for t in stack.convex.received_tokens]
    assert first_id not in subjects
    assert subjects and set(subjects) == {second_id}


async def test_a_new_login_does_not_adopt_the_previous_users_token_in_flight(stack: Stack):
    first_email, first_id = await new_account(stack.better_auth, "First")
    second_email, second_id = await new_account(stack.better_auth, "Second")
    provider = scripted(stack)
    gate = Gate()
    async with stack.client() as client:
        authed = client.with_auth(provider)
        with anyio.fail_after(TEST_TIMEOUT):
            await authed.login(first_email, PASSWORD)
            async with anyio.create_task_group() as tg:

                async def refresh() -> None:
                    # Superseded by the next login: whether it raises is open.
                    with contextlib.suppress(Exception):
                        await authed.refresh_now()

                # A refresh for the first user: its token is fetched, the answer is slow.
                provider.fetch_answer_gate = gate
                tg.start_soon(refresh)
                await gate.entered.wait()
                second = await authed.login(second_email, PASSWORD)
                assert authed.auth_state == Authenticated(second)
                # A refresh for the second user while the first user's fetch is open.
                tg.start_soon(authed.refresh_now)
                await anyio.wait_all_tasks_blocked()
                gate.release.set()
            assert await whoami(authed) == second_id
            state = authed.auth_state
            assert isinstance(state, Authenticated) and state.session.user_id == second_id
    subjects = [subject_of(t.token) for t in stack.convex.received_tokens]
    assert subjects[0] == first_id
    assert set(subjects[1:]) == {second_id}, subjects


# -- login_from_cache --------------------------------------------------------------------------


async def test_login_from_cache_uses_only_the_cache_path(stack: Stack):
    email, user_id = await new_account(stack.better_auth)
    store = MemorySessionStore()
    # An earlier run signed in and persisted its session (not counted).
    async with BetterAuthClient(stack.better_auth.url) as earlier:
        await ConvexBetterAuthProvider(earlier, store=store).login(email, PASSWORD)
    provider = scripted(stack, store)
    async with stack.client() as client:
        authed = client.with_auth(provider)
        events = authed.auth_events()
        with anyio.fail_after(TEST_TIMEOUT):
            session = await authed.login_from_cache()
            assert authed.auth_state == Authenticated(session)
            assert await whoami(authed) == user_id
            record = stack.convex.connections[0]
    assert provider.calls == ["login_from_cache"]
    assert stack.log.counts[SIGN_IN] == 0 and stack.log.counts[SIGN_UP] == 0
    assert stack.log.counts[GET_SESSION] == 1
    assert user_tokens(record) == [session.token]
    assert await drained(events) == [AuthEvent.SIGNED_IN]


# -- logout ------------------------------------------------------------------------------------


async def test_logout_sends_no_token_signs_out_once_and_clears_the_store(stack: Stack):
    email, user_id = await new_account(stack.better_auth)
    store = MemorySessionStore()
    provider = scripted(stack, store)
    async with stack.client() as client:
        authed = client.with_auth(provider)
        events = authed.auth_events()
        with anyio.fail_after(TEST_TIMEOUT):
            session = await authed.login(email, PASSWORD)
            assert await store.get() is not None
            record = stack.convex.connections[0]
            signed_in_at = len(record.frames)
            await authed.logout()
            await record.wait_for_frame(
                "Authenticate", after=signed_in_at, predicate=lambda f: f["tokenType"] == "None"
            )
            assert authed.auth_state == Unauthenticated()
            assert await whoami(authed) is None
    assert provider.calls == ["login", "logout"]
    assert await drained(events) == [AuthEvent.SIGNED_IN, AuthEvent.SIGNED_OUT]
    assert await store.get() is None and provider.inner.session is None
    assert stack.log.counts[SIGN_OUT] == 1
    # Signed out on the server too: the session token is dead.
    async with BetterAuthClient(stack.better_auth.url) as direct:
        assert await direct.get_session(session.session_token) is None
    assert user_id == session.user_id


async def test_a_login_started_during_logout_stands(stack: Stack):
    first_email, _ = await new_account(stack.better_auth, "First")
    second_email, second_id = await new_account(stack.better_auth, "Second")
    provider = scripted(stack)
    gate = Gate()
    async with stack.client() as client:
        authed = client.with_auth(provider)
        with anyio.fail_after(TEST_TIMEOUT):
            await authed.login(first_email, PASSWORD)
            provider.after_inner_logout = gate.pass_through  # the sign-out answer is slow
            async with anyio.create_task_group() as tg:
                tg.start_soon(authed.logout)
                await gate.entered.wait()
                second = await authed.login(second_email, PASSWORD)
                gate.release.set()
            # The logout finished after the newer login: it must not undo it.
            assert authed.auth_state == Authenticated(second)
            assert provider.inner.session is not None
            assert provider.inner.session.user_id == second_id
            assert await whoami(authed) == second_id


async def test_a_logout_during_a_login_cancels_it(stack: Stack):
    email, _ = await new_account(stack.better_auth)
    store = MemorySessionStore()
    provider = scripted(stack, store)
    gate = Gate()
    provider.returning_gates[email] = gate  # signed in on the server, answer not yet back
    outcome: list[object] = []
    async with stack.client() as client:
        authed = client.with_auth(provider)
        events = authed.auth_events()
        with anyio.fail_after(TEST_TIMEOUT):
            async with anyio.create_task_group() as tg:
                tg.start_soon(login_outcome, authed, email, outcome)
                await gate.entered.wait()
                await authed.logout()
            assert len(outcome) == 1 and isinstance(outcome[0], LoginSupersededError), outcome
            assert authed.auth_state == Unauthenticated()
            assert provider.inner.session is None and await store.get() is None
            assert await whoami(authed) is None
    assert stack.convex.received_tokens == []  # the cancelled login's token was never sent
    assert await drained(events) == []


async def test_a_newer_login_supersedes_one_awaiting_confirmation(stack: Stack):
    first_email, first_id = await new_account(stack.better_auth, "First")
    second_email, second_id = await new_account(stack.better_auth, "Second")
    provider = scripted(stack)
    gate = Gate()
    provider.login_gates[second_email] = gate  # the second login is slow to sign in
    outcome: list[object] = []
    async with stack.client() as client:
        authed = client.with_auth(provider)
        events = authed.auth_events()
        with anyio.fail_after(TEST_TIMEOUT):
            await client.wait_connected()
            record = await stack.convex.wait_for_connections(1)
            stack.convex.pause()  # the first login's token is sent, not yet confirmed
            async with anyio.create_task_group() as tg:
                tg.start_soon(login_outcome, authed, first_email, outcome)
                await record.wait_for_frame(
                    "Authenticate", predicate=lambda f: f["tokenType"] == "User"
                )
                tg.start_soon(authed.login, second_email, PASSWORD)
                await gate.entered.wait()
                # The first login's confirmation arrives while the second one signs in.
                stack.convex.resume()
                await anyio.wait_all_tasks_blocked()
                assert outcome and isinstance(outcome[0], LoginSupersededError), outcome
                assert authed.auth_state == AuthLoading()  # not the first user's
                gate.release.set()
            state = authed.auth_state
            assert isinstance(state, Authenticated) and state.session.user_id == second_id
            assert await whoami(authed) == second_id
    assert await drained(events) == [AuthEvent.SIGNED_IN]
    assert first_id != second_id


async def test_a_logout_supersedes_a_login_awaiting_confirmation(stack: Stack):
    email, _ = await new_account(stack.better_auth)
    provider = scripted(stack)
    outcome: list[object] = []
    async with stack.client() as client:
        authed = client.with_auth(provider)
        events = authed.auth_events()
        with anyio.fail_after(TEST_TIMEOUT):
            await client.wait_connected()
            record = await stack.convex.wait_for_connections(1)
            stack.convex.pause()
            async with anyio.create_task_group() as tg:
                tg.start_soon(login_outcome, authed, email, outcome)
                await record.wait_for_frame(
                    "Authenticate", predicate=lambda f: f["tokenType"] == "User"
                )
                tg.start_soon(authed.logout)
                await anyio.wait_all_tasks_blocked()
                stack.convex.resume()
            assert len(outcome) == 1 and isinstance(outcome[0], LoginSupersededError), outcome
            assert authed.auth_state == Unauthenticated()
            assert await whoami(authed) is None
    assert await drained(events) == []


async def test_a_failed_login_after_a_signed_in_one_leaves_no_identity(stack: Stack):
    email, _ = await new_account(stack.better_auth)
    provider = scripted(stack)
    async with stack.client() as client:
        authed = client.with_auth(provider)
        events = authed.auth_events()
        with anyio.fail_after(TEST_TIMEOUT):
            await authed.login(email, PASSWORD)
            with pytest.raises(InvalidCredentialsError):
                await authed.login(email, "not the password")
            # The state says nobody, and so does the server: the old token was withdrawn.
            assert authed.auth_state == Unauthenticated()
            assert await whoami(authed) is None
            fetches = len(provider.fetches)
            connections = len(stack.convex.connections)
            client.reconnect_now()
            await stack.convex.wait_for_connections(connections + 1)
            assert await whoami(authed) is None
            assert len(provider.fetches) == fetches  # no refresh runs for the old identity
    assert await drained(events) == [AuthEvent.SIGNED_IN, AuthEvent.SIGNED_OUT]


async def test_a_provider_whose_logout_raises_still_ends_unauthenticated(stack: Stack):
    email, _ = await new_account(stack.better_auth)
    provider = scripted(stack)
    async with stack.client() as client:
        authed = client.with_auth(provider)
        events = authed.auth_events()
        with anyio.fail_after(TEST_TIMEOUT):
            await authed.login(email, PASSWORD)
            record = stack.convex.connections[0]
            signed_in_at = len(record.frames)
            provider.logout_error = ProviderBroke("sign-out failed")
            with pytest.raises(ProviderBroke):
                await authed.logout()
            await record.wait_for_frame(
                "Authenticate", after=signed_in_at, predicate=lambda f: f["tokenType"] == "None"
            )
            assert authed.auth_state == Unauthenticated()
            assert await whoami(authed) is None
    assert await drained(events) == [AuthEvent.SIGNED_IN, AuthEvent.SIGNED_OUT]
    # The client stopped using the provider, although the provider kept its session.
    assert provider.fetches == []


async def test_a_refresh_that_ends_the_session_during_logout_signs_out_once(stack: Stack):
    email, _ = await new_account(stack.better_auth)
    provider = scripted(stack)
    refreshed = anyio.Event()
    async with stack.client() as client:
        authed = client.with_auth(provider)
        events = authed.auth_events()
        with anyio.fail_after(TEST_TIMEOUT):
            await authed.login(email, PASSWORD)
            gate = Gate()
            provider.fetch_gate = gate

            async def refresh() -> None:
                try:
                    await authed.refresh_now()
                except SessionExpiredError:
                    pass  # the session ended under it: expected
                finally:
                    refreshed.set()

            async def let_the_refresh_finish() -> None:
                # The provider has forgotten the session; the held refresh now learns
                # that there is none, while logout() is still running.
                gate.release.set()
                await refreshed.wait()

            provider.after_inner_logout = let_the_refresh_finish
            async with anyio.create_task_group() as tg:
                tg.start_soon(refresh)
                await gate.entered.wait()
                await authed.logout()
            assert authed.auth_state == Unauthenticated()
            assert await whoami(authed) is None
    assert await drained(events) == [AuthEvent.SIGNED_IN, AuthEvent.SIGNED_OUT]


# -- the session ends on the server --------------------------------------------------------------


async def test_a_final_401_signs_out_once_and_then_asks_for_no_more_tokens(stack: Stack):
    email, _ = await new_account(stack.better_auth)
    store = MemorySessionStore()
    provider = scripted(stack, store)
    async with stack.client() as client:
        authed = client.with_auth(provider)
        events = authed.auth_events()
        with anyio.fail_after(TEST_TIMEOUT):
            session = await authed.login(email, PASSWORD)
            # Revoked elsewhere (another device signed this session out).
            async with BetterAuthClient(stack.better_auth.url) as elsewhere:
                await elsewhere.sign_out(session.session_token)
            with pytest.raises(SessionExpiredError):
                await authed.refresh_now()
            assert stack.log.counts[TOKEN] == 1  # the one that answered 401
            assert authed.auth_state == Unauthenticated()
            assert await whoami(authed) is None
            assert await store.get() is None

            # Latched: neither a refresh nor a reconnect asks Better Auth again.
            with pytest.raises(SessionExpiredError):
                await authed.refresh_now()
            await stack.convex.drop_connections()
            await stack.convex.wait_for_connections(2)
            await client.wait_connected()
            assert await whoami(authed) is None
    assert stack.log.counts[TOKEN] == 1
    assert provider.fetches == [True]
    assert await drained(events) == [AuthEvent.SIGNED_IN, AuthEvent.SIGNED_OUT]


# -- reconnects ---------------------------------------------------------------------------------


async def test_a_reconnect_replays_the_token_without_asking_the_provider(stack: Stack):
    email, user_id = await new_account(stack.better_auth)
    provider = scripted(stack)
    async with stack.client() as client:
        authed = client.with_auth(provider)
        events = authed.auth_events()
        with anyio.fail_after(TEST_TIMEOUT):
            session = await authed.login(email, PASSWORD)
            # Were the provider asked now, it would fail.
            provider.fetch_error = ProviderBroke("the token endpoint is down")
            await stack.convex.drop_connections()
            second = await stack.convex.wait_for_connections(2)
            connect = await second.wait_for_frame("Connect")
            auth = await second.wait_for_frame("Authenticate")
            assert await whoami(authed) == user_id
            assert authed.auth_state == Authenticated(session)
    assert connect["connectionCount"] == 1
    assert auth["tokenType"] == "User" and auth["value"] == session.token
    assert second.frames.index(connect) < second.frames.index(auth)
    assert provider.fetches == []
    assert AuthEvent.SIGNED_OUT not in await drained(events)


async def test_a_reconnect_reconfirming_the_same_token_is_not_a_token_refresh(stack: Stack):
    email, user_id = await new_account(stack.better_auth)
    provider = scripted(stack)
    async with stack.client() as client:
        authed = client.with_auth(provider)
        events = authed.auth_events()
        with anyio.fail_after(TEST_TIMEOUT):
            await authed.login(email, PASSWORD)
            await stack.convex.drop_connections()
            await stack.convex.wait_for_connections(2)
            # Answered on the new socket, so its Authenticate has been confirmed.
            assert await whoami(authed) == user_id
    assert await drained(events) == [AuthEvent.SIGNED_IN]


# -- the streams end with the client --------------------------------------------------------------


async def test_auth_streams_end_when_the_client_closes(stack: Stack):
    email, _ = await new_account(stack.better_auth)
    provider = scripted(stack)
    ended: set[str] = set()
    all_ended = anyio.Event()

    async def consume(name: str, stream: AsyncIterator[Any]) -> None:
        async for _ in stream:
            pass
        ended.add(name)
        if len(ended) == 3:
            all_ended.set()

    async with anyio.create_task_group() as tg:
        with anyio.fail_after(TEST_TIMEOUT):
            async with stack.client() as client:
                authed = client.with_auth(provider)
                tg.start_soon(consume, "auth_states", authed.auth_states())
                tg.start_soon(consume, "auth_events", authed.auth_events())
                tg.start_soon(consume, "refreshing_states", authed.refreshing_states())
                await authed.login(email, PASSWORD)
                assert ended == set()
        # Closing is local: the streams end at once, or not at all.
        with anyio.move_on_after(1):
            await all_ended.wait()
        tg.cancel_scope.cancel()
    assert ended == {"auth_states", "auth_events", "refreshing_states"}


# -- refreshing ----------------------------------------------------------------------------------


async def test_is_refreshing_is_true_while_re_authenticating_after_an_auth_error(stack: Stack):
    email, user_id = await new_account(stack.better_auth)
    provider = scripted(stack)
    seen: list[bool] = []
    changed = anyio.Event()

    async def watch(
        authed: AuthenticatedConvexClient[Any],
        *,
        task_status: anyio.abc.TaskStatus[None] = anyio.TASK_STATUS_IGNORED,
    ) -> None:
        nonlocal changed
        async for value in authed.refreshing_states():
            seen.append(value)
            changed.set()
            changed = anyio.Event()
            if len(seen) == 1:
                task_status.started()

    async with stack.client() as client, anyio.create_task_group() as tg:
        authed = client.with_auth(provider)
        with anyio.fail_after(TEST_TIMEOUT):
            session = await authed.login(email, PASSWORD)
            await tg.start(watch, authed)
            assert authed.is_refreshing is False
            # The server refuses the token in force (as when it expired).
            await stack.convex.send_auth_error("Token expired")
            while seen[-1:] != [False] or len(seen) < 3:
                await changed.wait()
            assert authed.is_refreshing is False
            assert await whoami(authed) == user_id
            assert authed.auth_state == Authenticated(session)
        tg.cancel_scope.cancel()
    assert seen == [False, True, False]
    assert provider.fetches == [True]  # one forced fetch while the socket was down
    assert len(stack.convex.connections) == 2


async def test_refresh_now_forces_one_fetch_and_keeps_the_identity(stack: Stack):
    email, user_id = await new_account(stack.better_auth)
    provider = scripted(stack)
    async with stack.client() as client:
        authed = client.with_auth(provider)
        with anyio.fail_after(TEST_TIMEOUT):
            session = await authed.login(email, PASSWORD)
            await authed.refresh_now()
            assert authed.is_refreshing is False
            assert authed.auth_state == Authenticated(session)
            assert await whoami(authed) == user_id
    assert provider.fetches == [True]
    assert stack.log.counts[TOKEN] == 1
    assert all(t.accepted for t in stack.convex.received_tokens)


# -- token calls per login (prior art bug #1) ---------------------------------------------------


async def test_one_login_costs_one_token_fetch_when_the_first_token_is_reused(stack: Stack):
    email, user_id = await new_account(stack.better_auth)
    provider = scripted(stack)
    async with stack.client(reuse_initial_token=True) as client:
        authed = client.with_auth(provider)
        with anyio.fail_after(TEST_TIMEOUT):
            await authed.login(email, PASSWORD)
            # A round trip after the confirmation: a refetch it triggered would be out.
            assert await whoami(authed) == user_id
            assert await whoami(authed) == user_id
    # The sign-in's answer carried the JWT; nothing asked for another.
    assert stack.log.counts[SIGN_IN] == 1
    assert stack.log.counts[TOKEN] == 0
    assert provider.fetches == []
    assert len(stack.convex.received_tokens) == 1


async def test_without_reuse_the_first_token_is_swapped_for_a_fresh_one(stack: Stack):
    email, _ = await new_account(stack.better_auth)
    provider = scripted(stack)
    async with stack.client(reuse_initial_token=False) as client:
        authed = client.with_auth(provider)
        with anyio.fail_after(TEST_TIMEOUT):
            await authed.login(email, PASSWORD)
            await stack.log.wait_for(TOKEN, 1)
    assert stack.log.counts[SIGN_IN] == 1
    assert provider.fetches[:1] == [True]


async def test_expect_auth_sends_nothing_anonymously_after_logout(stack: Stack):
    email, user_id = await new_account(stack.better_auth)
    provider = scripted(stack)
    async with stack.client(expect_auth=True) as client:
        authed = client.with_auth(provider)
        with anyio.fail_after(TEST_TIMEOUT):
            await authed.login(email, PASSWORD)
            assert await whoami(authed) == user_id
            await authed.logout()
            with pytest.raises(SessionExpiredError):
                await authed.query("users:whoami")
            # Signing in again makes calls go out, under the new sign-in's identity.
            await authed.login(email, PASSWORD)
            assert await whoami(authed) == user_id


async def test_login_on_a_closed_client_signs_nobody_in(stack: Stack):
    email, _ = await new_account(stack.better_auth)
    store = MemorySessionStore()
    provider = scripted(stack, store)
    async with stack.client() as client:
        authed = client.with_auth(provider)
    with pytest.raises(ClientClosedError):
        await authed.login(email, PASSWORD)
    assert provider.calls == []  # refused before the provider was asked
    assert provider.inner.session is None and await store.get() is None
    assert stack.log.counts[SIGN_IN] == 0
