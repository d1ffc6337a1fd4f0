"""Shared helpers for the tests that run the documentation's examples."""

from __future__ import annotations

import asyncio
import secrets
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from typing import Any

import anyio
import httpx
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from dartvex_auth_better import (
    AuthenticatedConvexClient,
    BetterAuthClient,
    BetterAuthSession,
    ConvexBetterAuthProvider,
    ConvexClient,
)
from dartvex_auth_better.testing import LocalBetterAuth, LocalConvex

__all__ = ["PASSWORD", "WAIT", "Authed", "new_email", "serve", "signed_up", "wait_for_value"]

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


@asynccontextmanager
async def serve(app: ASGIApp) -> AsyncIterator[tuple[httpx.AsyncClient, dict[str, Any]]]:
    """Run an ASGI app as a server would: its lifespan started (through the ASGI lifespan
    protocol) and stopped around the block, and each request given a copy of the
    lifespan state. Yields an httpx client for the app, and the state."""
    state: dict[str, Any] = {}
    to_app, app_receives = anyio.create_memory_object_stream[Message](2)
    app_sends, from_app = anyio.create_memory_object_stream[Message](2)
    failures: list[BaseException] = []

    async def lifespan() -> None:
        scope = {"type": "lifespan", "asgi": {"version": "3.0"}, "state": state}
        try:
            await app(scope, app_receives.receive, app_sends.send)
        except Exception as exc:  # a server logs it; here the test sees it
            failures.append(exc)
        finally:
            app_sends.close()

    async def answer() -> str:
        try:
            message = await from_app.receive()
        except anyio.EndOfStream:  # the app returned instead of answering
            raise AssertionError(f"the app's lifespan ended: {failures}") from None
        return str(message["type"])

    async def with_state(scope: Scope, receive: Receive, send: Send) -> None:
        await app({**scope, "state": dict(state)}, receive, send)

    # A task of its own, like a server's lifespan task: a task group would wrap the
    # test's own failures in ExceptionGroups.
    task = asyncio.get_running_loop().create_task(lifespan())
    try:
        await to_app.send({"type": "lifespan.startup"})
        assert await answer() == "lifespan.startup.complete", failures
        transport = httpx.ASGITransport(app=with_state)
        async with httpx.AsyncClient(transport=transport, base_url="http://app") as client:
            yield client, state
        await to_app.send({"type": "lifespan.shutdown"})
        assert await answer() == "lifespan.shutdown.complete", failures
    finally:
        task.cancel()
        await asyncio.wait([task])
        for stream in (to_app, app_receives, app_sends, from_app):
            stream.close()
