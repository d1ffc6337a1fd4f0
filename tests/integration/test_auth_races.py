"""Races and edge cases of the auth lifecycle: flows replaced while a fetch is in flight,
sign-ins overtaken by sign-outs, a client closed under its watchers, a server that does
not close after an AuthError.

AuthManager-level cases drive the real manager with bare fetcher callables; everything
else runs the real ConvexClient against a real LocalConvex (and the real Better Auth
server under Node where a provider is involved). Nothing of the SDK is mocked.
"""

from __future__ import annotations

import asyncio
import json
import secrets
import time
from collections.abc import AsyncIterator
from typing import Any

import anyio
import pytest

from dartvex_auth_better import (
    Authenticated,
    AuthEvent,
    BetterAuthClient,
    ConvexBetterAuthProvider,
    ConvexClient,
    SessionExpiredError,
    Unauthenticated,
)
from dartvex_auth_better._jwt import token_claims
from dartvex_auth_better.convex._auth import AuthManager
from dartvex_auth_better.convex._authed import AuthenticatedConvexClient, AuthEventStream
from dartvex_auth_better.testing import (
    LocalBetterAuth,
    LocalConvex,
    TestTokenIssuer,
    register_demo_app,
)
from tests.integration.test_provider import FaultyProxy

pytestmark = [pytest.mark.anyio]

TEST_TIMEOUT = 15


class Gate:
    """Holds a call until ``release`` is set; ``entered`` is set when it arrives."""

    def __init__(self) -> None:
        self.entered = asyncio.Event()
        self.release = asyncio.Event()

    async def pass_through(self) -> None:
        self.entered.set()
        await self.release.wait()


@pytest.fixture
async def issuer() -> TestTokenIssuer:
    return TestTokenIssuer()


@pytest.fixture
async def convex(issuer: TestTokenIssuer) -> AsyncIterator[LocalConvex]:
    async with LocalConvex(jwks=issuer.jwks, issuer=issuer.issuer) as server:
        register_demo_app(server)
        yield server


PASSWORD = "correct horse battery staple"
SIGN_OUT = "/api/auth/sign-out"


@pytest.fixture
async def proxy(better_auth_server: LocalBetterAuth) -> AsyncIterator[FaultyProxy]:
    async with FaultyProxy(better_auth_server.url) as running:
        yield running


@pytest.fixture
async def auth(proxy: FaultyProxy) -> AsyncIterator[BetterAuthClient]:
    async with BetterAuthClient(proxy.url) as client:
        yield client


async def new_account(better_auth: LocalBetterAuth) -> tuple[str, str]:
    """A fresh account, created on the side; returns (email, user id)."""
    email = f"races-{secrets.token_hex(6)}@example.com"
    async with BetterAuthClient(better_auth.url) as direct:
        session = await direct.sign_up("Ada", email, PASSWORD)
    return email, session.user_id


def quick_client(convex: LocalConvex, **options: Any) -> ConvexClient:
    # Quick reconnects: some tests drop sockets on purpose.
    return ConvexClient(convex.url, initial_backoff=0.01, max_backoff=0.05, **options)


async def drained(events: AuthEventStream) -> list[AuthEvent]:
    events.close()
    return [event async for event in events]


async def whoami(authed: AuthenticatedConvexClient[Any]) -> Any:
    me = await authed.query("users:whoami")
    return None if me is None else me["subject"]


# -- the single-flight slot belongs to one flow, and to one kind of fetch ----------------


async def test_a_new_flow_never_adopts_the_old_flows_token_in_flight(issuer):
    manager = AuthManager()
    old_gate, new_gate = Gate(), Gate()
    new_calls: list[bool] = []
    seen: dict[str, str | None] = {}
    old_done, joined = asyncio.Event(), asyncio.Event()

    async def old_user(force_refresh: bool) -> str:
        await old_gate.pass_through()
        token: str = issuer.mint("old-user")
        return token

    async def new_user(force_refresh: bool) -> str:
        new_calls.append(force_refresh)
        await new_gate.pass_through()
        token: str = issuer.mint("new-user")
        return token

    async def old_flow() -> None:
        await manager.initial_fetch()
        old_done.set()

    async def new_flow() -> None:
        await manager.initial_fetch()
        seen["new flow"] = manager.token

    async def another_caller() -> None:
        joined.set()  # runs on into initial_fetch until it waits for a fetch
        await manager.initial_fetch()

    with anyio.fail_after(TEST_TIMEOUT):
        async with anyio.create_task_group() as tg:
            manager.set_fetcher(old_user, None)
            tg.start_soon(old_flow)
            await old_gate.entered.wait()
            manager.set_fetcher(new_user, None)  # e.g. another user signs in
            tg.start_soon(new_flow)
            await new_gate.entered.wait()
            old_gate.release.set()  # the old user's token arrives first
            await old_done.wait()
            # Another caller of the new flow shares the new flow's fetch: the old flow's
            # fetch, finishing, did not empty the new flow's slot.
            tg.start_soon(another_caller)
            await joined.wait()
            new_gate.release.set()
    assert issuer_subject(seen["new flow"]) == "new-user"
    assert issuer_subject(manager.token) == "new-user"
    assert new_calls == [False]


async def test_a_forced_fetch_does_not_take_the_answer_of_an_unforced_one(issuer):
    manager = AuthManager()
    gate = Gate()
    calls: list[bool] = []
    tokens: list[str] = []

    async def source(force_refresh: bool) -> str:
        calls.append(force_refresh)
        if len(calls) == 1:
            await gate.pass_through()
        token: str = issuer.mint("user-1", iat=time.time(), n=len(calls))
        tokens.append(token)
        return token

    with anyio.fail_after(TEST_TIMEOUT):
        async with anyio.create_task_group() as tg:
            manager.set_fetcher(source, None)
            tg.start_soon(manager.initial_fetch)  # an unforced fetch: a cached JWT will do
            await gate.entered.wait()
            sent: list[bool] = []

            async def refresh() -> None:
                sent.append(await manager.refresh_now())  # must bypass every cache

            tg.start_soon(refresh)
            await anyio.wait_all_tasks_blocked()
            gate.release.set()
    assert calls == [False, True]
    assert sent == [True]
    assert manager.token == tokens[-1]


async def test_concurrent_forced_fetches_share_one_call(issuer):
    manager = AuthManager()
    gate = Gate()
    calls: list[bool] = []

    async def source(force_refresh: bool) -> str:
        calls.append(force_refresh)
        await gate.pass_through()
        token: str = issuer.mint("user-1", iat=time.time(), n=len(calls))
        return token

    manager.set_fetcher(source, issuer.mint("user-1"))
    results: list[bool] = []

    async def refresh() -> None:
        results.append(await manager.refresh_now())

    with anyio.fail_after(TEST_TIMEOUT):
        async with anyio.create_task_group() as tg:
            for _ in range(5):
                tg.start_soon(refresh)
            await gate.entered.wait()
            await anyio.wait_all_tasks_blocked()
            gate.release.set()
    assert calls == [True]
    assert results.count(True) == 1 and len(results) == 5


def issuer_subject(token: str | None) -> object:
    assert token is not None
    claims = token_claims(token)
    assert claims is not None
    return claims["sub"]


# -- AuthenticatedConvexClient ---------------------------------------------------------------


async def test_a_session_that_ends_during_logout_is_signed_out_once(
    better_auth_server, convex_server, auth, proxy
):
    email, _ = await new_account(better_auth_server)
    provider = ConvexBetterAuthProvider(auth)
    async with quick_client(convex_server) as client:
        authed = client.with_auth(provider)
        events = authed.auth_events()
        with anyio.fail_after(TEST_TIMEOUT):
            await authed.login(email, PASSWORD)
            hold = proxy.hold_next(SIGN_OUT)  # the sign-out request is slow
            async with anyio.create_task_group() as tg:
                tg.start_soon(authed.logout)
                await hold.entered.wait()
                # Meanwhile a refresh asks the provider, which has already forgotten the
                # session: the client signs out by itself.
                with pytest.raises(SessionExpiredError):
                    await authed.refresh_now()
                assert authed.auth_state == Unauthenticated()
                hold.release.set()
            assert await whoami(authed) is None
    assert await drained(events) == [AuthEvent.SIGNED_IN, AuthEvent.SIGNED_OUT]


async def test_a_login_cancelled_while_awaiting_confirmation_leaves_nothing_running(
    better_auth_server, convex_server, auth
):
    email, _ = await new_account(better_auth_server)
    provider = ConvexBetterAuthProvider(auth)
    async with quick_client(convex_server) as client:
        authed = client.with_auth(provider)
        events = authed.auth_events()
        with anyio.fail_after(TEST_TIMEOUT):
            await client.wait_connected()
            record = await convex_server.wait_for_connections(1)
            convex_server.pause()  # the server holds its answer to the Authenticate
            with anyio.move_on_after(TEST_TIMEOUT) as scope:
                async with anyio.create_task_group() as tg:
                    tg.start_soon(authed.login, email, PASSWORD)
                    await record.wait_for_frame(
                        "Authenticate", predicate=lambda f: f["tokenType"] == "User"
                    )
                    scope.cancel()  # the caller gave up
            convex_server.resume()
            # The held Authenticate is answered now; the client told the server it is
            # anonymous after it, and no longer refreshes a login nobody waits for.
            assert await whoami(authed) is None
            assert authed.auth_state == Unauthenticated()
            assert not client._auth.has_fetcher
            frames = record.frames_of_type("Authenticate")
            assert [f["tokenType"] for f in frames] == ["User", "None"]
    assert await drained(events) == []


async def test_auth_streams_end_when_the_client_closes(better_auth_server, convex_server, auth):
    email, _ = await new_account(better_auth_server)
    provider = ConvexBetterAuthProvider(auth)
    ended: list[str] = []
    async with quick_client(convex_server) as client:
        authed = client.with_auth(provider)
        with anyio.fail_after(TEST_TIMEOUT):
            await authed.login(email, PASSWORD)
            started = asyncio.Event()
            waiting = 0

            async def consume(name: str, stream: AsyncIterator[Any]) -> None:
                nonlocal waiting
                async for _ in stream:
                    waiting += 1
                    if waiting == 3:
                        started.set()
                ended.append(name)

            events = authed.auth_events()
            async with anyio.create_task_group() as tg:
                tg.start_soon(consume, "auth_states", authed.auth_states())
                tg.start_soon(consume, "refreshing_states", authed.refreshing_states())
                tg.start_soon(consume, "connection_statuses", authed.connection_statuses())
                tg.start_soon(consume, "auth_events", events)
                await started.wait()  # the three state streams yielded their current value
                await client.aclose()
            # A stream asked for after the close ends at once too.
            late = [e async for e in authed.auth_events()]
            late_states = [s async for s in authed.auth_states()]
    assert sorted(ended) == [
        "auth_events",
        "auth_states",
        "connection_statuses",
        "refreshing_states",
    ]
    assert late == []
    assert len(late_states) == 1 and isinstance(late_states[0], Authenticated)


async def test_token_refreshed_only_for_a_new_token(better_auth_server, convex_server, auth):
    email, user_id = await new_account(better_auth_server)
    provider = ConvexBetterAuthProvider(auth)
    # Without reuse the login's first token is swapped for a fresh one at once: a new
    # token, confirmed, so one TOKEN_REFRESHED.
    async with quick_client(convex_server, reuse_initial_token=False) as client:
        authed = client.with_auth(provider)
        events = authed.auth_events()
        with anyio.fail_after(TEST_TIMEOUT):
            await authed.login(email, PASSWORD)
            seen: list[AuthEvent] = []
            async for event in events:
                seen.append(event)
                if event is AuthEvent.TOKEN_REFRESHED:
                    break
            assert seen == [AuthEvent.SIGNED_IN, AuthEvent.TOKEN_REFRESHED]
            # Reconnects re-confirm that same token: no refresh.
            for n in (2, 3):
                await convex_server.drop_connections()
                record = await convex_server.wait_for_connections(n)
                await record.wait_for_frame("Authenticate")
                assert await whoami(authed) == user_id  # answered after the Authenticate
    assert await drained(events) == []


# -- ConvexClient ------------------------------------------------------------------------------


async def test_a_fixed_token_set_while_paused_is_sent_once(issuer, convex):
    gate = Gate()

    async def hanging(force_refresh: bool) -> str:
        await gate.pass_through()
        token: str = issuer.mint("user-1")
        return token

    fixed: str = issuer.mint("user-2")
    async with quick_client(convex) as client:
        with anyio.fail_after(TEST_TIMEOUT):
            await client.wait_connected()
            record = await convex.wait_for_connections(1)
            async with anyio.create_task_group() as tg:
                tg.start_soon(client.set_auth, hanging)  # pauses the socket for its fetch
                await gate.entered.wait()
                await client.set_auth(fixed)
                gate.release.set()
            me = await client.query("users:whoami")
    assert me["subject"] == "user-2"
    frames = record.frames_of_type("Authenticate")
    assert [f.get("value") for f in frames] == [fixed]
    assert [f["baseVersion"] for f in frames] == [0]


async def test_an_auth_error_stops_the_socket_without_waiting_for_the_server(issuer, convex):
    calls: list[bool] = []
    tokens: list[str] = []

    async def source(force_refresh: bool) -> str:
        calls.append(force_refresh)
        token: str = issuer.mint("user-1", iat=time.time(), n=len(calls))
        tokens.append(token)
        return token

    async with quick_client(convex) as client:
        with anyio.fail_after(TEST_TIMEOUT):
            await client.set_auth(source)
            first = convex.connections[0]
            # A server that says AuthError but does not close the socket (a slow close,
            # or a proxy holding it open): the client stops the socket itself.
            assert len(first.frames_of_type("Authenticate")) == 1  # identity version 1
            await first.send_raw(
                json.dumps(
                    {
                        "type": "AuthError",
                        "error": "token expired (test)",
                        "baseVersion": 1,
                        "authUpdateAttempted": False,
                    }
                )
            )
            await first.wait_closed()
            second = await convex.wait_for_connections(2)
            auth = await second.wait_for_frame("Authenticate")
            me = await client.query("users:whoami")
    assert calls == [False, True]
    assert auth["value"] == tokens[-1]
    assert me["subject"] == "user-1"
    assert not client.is_auth_refreshing


async def test_an_expired_initial_token_is_replaced_before_it_is_sent(issuer, convex):
    calls: list[bool] = []

    async def source(force_refresh: bool) -> str:
        calls.append(force_refresh)
        token: str = issuer.mint("user-1", iat=time.time(), n=len(calls))
        return token

    # Saved an hour ago, expired 45 minutes ago: not clock skew, just old.
    stale: str = issuer.mint("user-1", ttl=900, iat=time.time() - 3600)
    async with quick_client(convex) as client:
        with anyio.fail_after(TEST_TIMEOUT):
            await client.set_auth(source, initial_token=stale)
            me = await client.query("users:whoami")
    assert me["subject"] == "user-1"
    assert calls == [True]  # forced: the source must not hand back a cached JWT
    assert [t.token for t in convex.received_tokens] != [stale]
    assert convex.received_tokens and not any(t.was_expired for t in convex.received_tokens)
    assert len(convex.connections) == 1  # no AuthError, no reconnect
