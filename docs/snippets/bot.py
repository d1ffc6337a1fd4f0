"""A chat bot that runs for days: it answers every "ping" in the room with "pong".

It signs in once and keeps its session in a file, so a restart needs no password; it
reacts to a live subscription instead of polling; and it logs its auth events, signing in
again if its session ever ends for good.

Configuration, from the environment: ``DARTVEX_URL`` (the deployment),
``DARTVEX_SITE_URL`` (where Better Auth answers, when not on the deployment's
``.convex.site`` host), ``BOT_EMAIL`` and ``BOT_PASSWORD`` (the bot's account), and
``BOT_SESSION_FILE`` (default ``bot-session.json``).
"""

from __future__ import annotations

import logging
import os
import random
from pathlib import Path
from typing import Any

import anyio

from dartvex_auth_better import (
    AuthenticatedConvexClient,
    AuthEvent,
    BetterAuthClient,
    BetterAuthSession,
    ConvexBetterAuthProvider,
    ConvexClient,
    ConvexError,
    DartvexError,
    FileSessionStore,
    InvalidCredentialsError,
    NoSessionError,
    SessionExpiredError,
)

log = logging.getLogger("pingbot")

Authed = AuthenticatedConvexClient[BetterAuthSession]


# --8<-- [start:run]
async def run_bot(
    convex_url: str,
    *,
    site_url: str | None,
    session_file: Path,
    email: str,
    password: str,
    max_replies: int | None = None,
) -> int:
    """Answer pings until cancelled (or after ``max_replies``); returns how many."""
    async with (
        BetterAuthClient(convex_url, site_url=site_url) as auth,
        ConvexClient(convex_url, expect_auth=True) as convex,
    ):
        provider = ConvexBetterAuthProvider(auth, store=FileSessionStore(session_file))
        authed = convex.with_auth(provider)
        await sign_in(authed, email, password)
        async with anyio.create_task_group() as tg:
            tg.start_soon(watch_auth, authed, email, password)
            replies = await answer_pings(authed, max_replies)
            tg.cancel_scope.cancel()  # stop watching auth
    return replies
    # --8<-- [end:run]


# --8<-- [start:sign_in]
async def sign_in(authed: Authed, email: str, password: str) -> None:
    """Restore the saved session; sign in with the password only when there is none."""
    try:
        session = await authed.login_from_cache()
        log.info("restored the session of %s", session.email)
    except (NoSessionError, SessionExpiredError):
        session = await authed.login(email, password)
        log.info("signed in as %s", session.email)
    # --8<-- [end:sign_in]


# --8<-- [start:pings]
async def answer_pings(authed: Authed, max_replies: int | None) -> int:
    replies = 0
    async with authed.subscribe("chat:list") as room:
        while max_replies is None or replies < max_replies:
            try:
                messages: list[dict[str, Any]] = await room.next()
            except ConvexError as exc:
                # The query failed (e.g. while signed out). The subscription stays:
                # next() waits for the query's next result.
                log.warning("chat:list failed: %s", exc)
                continue
            answered = {m["replyTo"] for m in messages if m["replyTo"] is not None}
            for message in messages:
                if message["body"] == "ping" and message["id"] not in answered:
                    await authed.mutation("chat:send", {"body": "pong", "replyTo": message["id"]})
                    replies += 1
    return replies
    # --8<-- [end:pings]


# --8<-- [start:watch_auth]
async def watch_auth(authed: Authed, email: str, password: str) -> None:
    """Log auth events; sign in again when the session ends for good."""
    async for event in authed.auth_events():
        log.info("auth event: %s", event.value)
        if event is AuthEvent.SIGNED_OUT:
            # The bot never logs out, so this is the server ending the session
            # (revoked, expired); the stored session is gone too.
            await sign_in_again(authed, email, password)


async def sign_in_again(authed: Authed, email: str, password: str) -> None:
    delay = 1.0
    while True:
        try:
            await authed.login(email, password)
            return
        except InvalidCredentialsError:
            raise  # nothing will fix that but a person
        except DartvexError as exc:
            if not exc.retryable:
                raise
            log.warning("sign-in failed (%s); retrying in %.0f s", exc, delay)
            await anyio.sleep(delay * random.uniform(0.5, 1.5))
            delay = min(delay * 2, 60.0)
    # --8<-- [end:watch_auth]


# --8<-- [start:main]
async def main() -> None:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    await run_bot(
        os.environ["DARTVEX_URL"],
        site_url=os.environ.get("DARTVEX_SITE_URL"),
        session_file=Path(os.environ.get("BOT_SESSION_FILE", "bot-session.json")),
        email=os.environ["BOT_EMAIL"],
        password=os.environ["BOT_PASSWORD"],
    )


if __name__ == "__main__":
    anyio.run(main)  # Ctrl-C stops it; everything is closed on the way out
# --8<-- [end:main]
