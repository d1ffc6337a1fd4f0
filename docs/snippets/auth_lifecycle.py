"""The auth lifecycle from the outside: states, events, and a token source of your own."""

from __future__ import annotations

import anyio
import anyio.lowlevel

from dartvex_auth_better import (
    Authenticated,
    AuthEvent,
    AuthLoading,
    AuthState,
    BetterAuthClient,
    ConvexBetterAuthProvider,
    ConvexClient,
    SessionExpiredError,
    Unauthenticated,
)


# --8<-- [start:states]
def describe(state: AuthState) -> str:
    match state:
        case Unauthenticated():
            return "signed out"
        case AuthLoading():
            return "signing in"
        case Authenticated(session=session):
            return f"signed in as {session.email}"
    raise AssertionError(state)


async def watch_a_login(convex_url: str, site_url: str | None, email: str, password: str) -> None:
    async with (
        BetterAuthClient(convex_url, site_url=site_url) as auth,
        ConvexClient(convex_url, expect_auth=True) as convex,
    ):
        authed = convex.with_auth(ConvexBetterAuthProvider(auth))
        print("now:", describe(authed.auth_state))

        async def log_events() -> None:
            async for event in authed.auth_events():
                print("event:", event.value)
                if event is AuthEvent.SIGNED_OUT:
                    return

        async with anyio.create_task_group() as tg:
            tg.start_soon(log_events)
            await anyio.lowlevel.checkpoint()  # let it start listening
            await authed.login(email, password)
            # login() returns once the Convex server has confirmed the identity.
            print("now:", describe(authed.auth_state))
            print("whoami:", (await authed.query("users:whoami"))["email"])
            await authed.logout()
            print("now:", describe(authed.auth_state))
    # --8<-- [end:states]


# --8<-- [start:fetch_token]
async def with_my_own_token_source(
    convex_url: str, site_url: str | None, email: str, password: str
) -> str:
    async with (
        BetterAuthClient(convex_url, site_url=site_url) as auth,
        ConvexClient(convex_url) as convex,
    ):
        session = await auth.sign_in(email, password)

        async def fetch_token(force_refresh: bool) -> str | None:
            # This source caches nothing, so force_refresh changes nothing.
            try:
                return await auth.convex_token(session.session_token)
            except SessionExpiredError:
                return None  # final: the client signs out and stops asking
            # Anything else (TransportError, a 5xx, a 429) propagates: the client
            # keeps the session and retries with backoff.

        # Start with the JWT the sign-in brought; set_auth returns once it is confirmed.
        await convex.set_auth(fetch_token, initial_token=session.token)
        me = await convex.query("users:whoami")
        return str(me["email"])
    # --8<-- [end:fetch_token]
