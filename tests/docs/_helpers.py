"""Shared helpers for the tests that run the documentation's examples."""

from __future__ import annotations

import secrets
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from typing import Any

import anyio

from dartvex_auth_better import (
    AuthenticatedConvexClient,
    BetterAuthClient,
    BetterAuthSession,
    ConvexBetterAuthProvider,
    ConvexClient,
)
from dartvex_auth_better.testing import LocalBetterAuth, LocalConvex

__all__ = ["PASSWORD", "WAIT", "Authed", "new_email", "signed_up", "wait_for_value"]

PASSWORD = "correct horse battery staple"
# Every wait in these tests is bounded: a hang fails fast with a clear error instead.
WAIT = 10.0

Authed = AuthenticatedConvexClient[BetterAuthSession]


def new_email(prefix: str = "docs") -> str:
    return f"{prefix}-{secrets.token_hex(5)}@example.com"


@asynccontextmanager
async def signed_up(
    better_auth: LocalBetterAuth, convex: LocalConvex, name: str = "Test User"
) -> AsyncIterator[Authed]:
    """A live client signed up (and in) as a new user: the other side of a conversation."""
    async with (
        BetterAuthClient(convex.url, site_url=better_auth.url) as auth,
        ConvexClient(convex.url, expect_auth=True) as client,
    ):
        authed = client.with_auth(ConvexBetterAuthProvider(auth))
        await authed.sign_up(name, new_email(), PASSWORD)
        yield authed


async def wait_for_value(
    client: Authed,
    name: str,
    predicate: Callable[[Any], bool],
    args: dict[str, Any] | None = None,
) -> Any:
    """The first value of a live query that satisfies ``predicate`` (no polling)."""
    with anyio.fail_after(WAIT):
        async for value in client.subscribe(name, args):
            if predicate(value):
                return value
    raise AssertionError(f"the subscription to {name} ended")
