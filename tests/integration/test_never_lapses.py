"""Acceptance: against the real Better Auth server issuing 5-second JWTs and a LocalConvex
that enforces expiry, an idle client and a busy one stay authenticated for more than six
token lifetimes, with no AuthError and no expired token ever sent."""

from __future__ import annotations

import secrets
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import Any

import anyio
import pytest

from dartvex_auth_better import (
    Authenticated,
    AuthEvent,
    BetterAuthClient,
    ConvexBetterAuthProvider,
    ConvexClient,
)
from dartvex_auth_better._jwt import token_claims
from dartvex_auth_better.testing import LocalBetterAuth, LocalConvex, register_demo_app

pytestmark = [pytest.mark.anyio, pytest.mark.integration]

JWT_TTL = 5
LIFETIMES = 6


@pytest.fixture(scope="module")
async def short_lived_better_auth() -> AsyncIterator[LocalBetterAuth]:
    async with LocalBetterAuth(jwt_ttl_seconds=JWT_TTL) as server:
        yield server


@dataclass
class ClientRun:
    user_id: str
    me: Any
    rows: list[Any]
    sent: int
    events: list[AuthEvent]


async def run_client(
    better_auth: LocalBetterAuth, convex: LocalConvex, *, busy: bool, until: float
) -> ClientRun:
    email = f"lapse-{secrets.token_hex(5)}@example.com"
    password = "correct horse battery staple"
    events: list[AuthEvent] = []
    sent = 0
    async with (
        BetterAuthClient(better_auth.url) as auth,
        ConvexClient(convex.url, expect_auth=True) as client,
    ):
        await auth.sign_up("Lapse Test", email, password)
        authed = client.with_auth(ConvexBetterAuthProvider(auth))

        async def collect() -> None:
            async for event in authed.auth_events():
                events.append(event)

        async with anyio.create_task_group() as tg:
            tg.start_soon(collect)
            await anyio.lowlevel.checkpoint()
            session = await authed.login(email, password)
            assert isinstance(authed.auth_state, Authenticated)
            while time.monotonic() < until:
                if busy:
                    await client.mutation("messages:send", {"body": f"m{sent}"})
                    sent += 1
                    await anyio.sleep(1)  # the workload's pace: one mutation a second
                else:
                    await anyio.sleep(until - time.monotonic())
            me = await client.query("users:whoami")
            rows = await client.query("messages:list")
            tg.cancel_scope.cancel()
    return ClientRun(session.user_id, me, rows, sent, events)


async def test_idle_and_busy_clients_never_lapse(short_lived_better_auth):
    async with LocalConvex(
        jwks_url=short_lived_better_auth.jwks_url, issuer=short_lived_better_auth.issuer
    ) as convex:
        register_demo_app(convex)
        until = time.monotonic() + LIFETIMES * JWT_TTL + 1
        results: dict[str, ClientRun] = {}

        async def run(name: str, busy: bool) -> None:
            results[name] = await run_client(
                short_lived_better_auth, convex, busy=busy, until=until
            )

        with anyio.fail_after(LIFETIMES * JWT_TTL + 30):
            async with anyio.create_task_group() as tg:
                tg.start_soon(run, "idle", False)
                tg.start_soon(run, "busy", True)

    tokens = convex.received_tokens
    lifetimes = {
        (claims["exp"] - claims["iat"])
        for claims in (token_claims(t.token) for t in tokens)
        if claims is not None
    }
    assert lifetimes == {JWT_TTL}
    # Every token was valid when sent, and the server accepted every one.
    assert tokens and all(not t.was_expired for t in tokens)
    assert all(t.accepted for t in tokens)
    # Each client refreshed at least once per lifetime and never had to reconnect.
    for name, result in results.items():
        theirs = [t for t in tokens if (token_claims(t.token) or {}).get("sub") == result.user_id]
        assert len(theirs) >= LIFETIMES + 1, (name, len(theirs))
        assert result.me is not None and result.me["subject"] == result.user_id
        assert result.events[0] is AuthEvent.SIGNED_IN
        assert AuthEvent.SIGNED_OUT not in result.events
        assert result.events.count(AuthEvent.TOKEN_REFRESHED) >= LIFETIMES
    busy = results["busy"]
    assert len(busy.rows) == busy.sent >= LIFETIMES * JWT_TTL - 2
    # No AuthError ever: each client stayed on its first socket.
    assert len(convex.connections) == 2
