"""Handling the SDK's errors: retry what is retryable, sign in again, show app errors."""

from __future__ import annotations

import random
from collections.abc import Awaitable, Callable
from typing import TypeVar

import anyio

from dartvex_auth_better import (
    BetterAuthClient,
    BetterAuthSession,
    ConvexClient,
    ConvexError,
    ConvexHttpClient,
    DartvexError,
    InvalidCredentialsError,
    RateLimitedError,
)

T = TypeVar("T")


# --8<-- [start:retry]
async def with_retries(
    call: Callable[[], Awaitable[T]], *, attempts: int = 5, first_delay: float = 0.5
) -> T:
    """Run ``call()``, again after errors that say a retry can help."""
    delay = first_delay
    for attempt in range(1, attempts + 1):
        try:
            return await call()
        except DartvexError as exc:
            if not exc.retryable or attempt == attempts:
                raise
            wait = delay
            if isinstance(exc, RateLimitedError) and exc.retry_after is not None:
                wait = exc.retry_after  # the server said how long
            await anyio.sleep(wait * random.uniform(0.5, 1.5))
            delay *= 2
    raise AssertionError("unreachable")
    # --8<-- [end:retry]


# --8<-- [start:sign_in]
async def sign_in(auth: BetterAuthClient, email: str, password: str) -> BetterAuthSession | None:
    try:
        return await auth.sign_in(email, password)
    except InvalidCredentialsError:
        print("wrong email or password")  # Better Auth does not say which
    except RateLimitedError as exc:
        print(f"too many attempts; try again in {exc.retry_after or 60:.0f} s")
    except DartvexError as exc:
        if not exc.retryable:
            raise  # a misconfigured server or client: not the user's problem
        # Unreachable, a timeout, a 5xx: nothing is wrong with the credentials.
        print("the sign-in service is unavailable; try again later")
    return None
    # --8<-- [end:sign_in]


# --8<-- [start:app_error]
async def send(convex: ConvexClient | ConvexHttpClient, body: str) -> str | None:
    try:
        message_id: str = await convex.mutation("messages:send", {"body": body})
        return message_id
    except ConvexError as exc:
        # What the function threw: `throw new ConvexError({code: "BAD_ARGS"})` in
        # TypeScript arrives as exc.data == {"code": "BAD_ARGS"}.
        if isinstance(exc.data, dict) and exc.data.get("code") == "BAD_ARGS":
            print("refused:", exc.message)
            return None
        raise
    # --8<-- [end:app_error]
