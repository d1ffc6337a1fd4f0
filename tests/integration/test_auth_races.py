"""Races and edge cases of the auth lifecycle: flows replaced while a fetch is in flight,
sign-ins overtaken by sign-outs, a client closed under its watchers, a server that does
not close after an AuthError.

AuthManager-level cases drive the real manager with bare fetcher callables; everything
else runs the real ConvexClient against a real LocalConvex (and the real Better Auth
server under Node where a provider is involved). Nothing of the SDK is mocked.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator

import anyio
import anyio.lowlevel
import pytest

from dartvex_auth_better._jwt import token_claims
from dartvex_auth_better.convex._auth import AuthManager
from dartvex_auth_better.testing import LocalConvex, TestTokenIssuer, register_demo_app

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
