"""The whole path on real servers: Better Auth under Node, LocalConvex over a socket."""

from __future__ import annotations

import asyncio
import secrets
from typing import Any

import anyio
import pytest

from dartvex_auth_better import (
    AuthRejectedError,
    BetterAuthClient,
    ConnectionState,
    ConvexClient,
    ConvexError,
    InvalidCredentialsError,
    SessionExpiredError,
    UserAlreadyExistsError,
)
from dartvex_auth_better._jwt import token_claims

pytestmark = [pytest.mark.anyio, pytest.mark.integration]


def new_email() -> str:
    return f"user-{secrets.token_hex(6)}@example.com"


PASSWORD = "correct horse battery staple"


async def test_sign_up_then_sign_in_gives_a_convex_jwt(better_auth_server):
    email = new_email()
    async with BetterAuthClient(better_auth_server.url) as auth:
        signed_up = await auth.sign_up("Ada", email, PASSWORD)
        session = await auth.sign_in(email, PASSWORD)
    assert session.user_id and session.user_id == signed_up.user_id
    assert session.email == email and session.name == "Ada"
    claims = token_claims(session.token)
    assert claims is not None
    assert claims["sub"] == session.user_id
    assert claims["aud"] == "convex"
    assert claims["iss"] == better_auth_server.issuer
    assert claims["exp"] - claims["iat"] == better_auth_server.jwt_ttl_seconds
    assert session.session_token != signed_up.session_token


async def test_wrong_password_is_a_typed_error_without_the_password(better_auth_server):
    email = new_email()
    async with BetterAuthClient(better_auth_server.url) as auth:
        await auth.sign_up("Bob", email, PASSWORD)
        with pytest.raises(InvalidCredentialsError) as caught:
            await auth.sign_in(email, "wrong password 123")
    err = caught.value
    assert err.status == 401 and err.code == "INVALID_EMAIL_OR_PASSWORD"
    assert not err.retryable
    assert "wrong password 123" not in str(err) and "wrong password 123" not in repr(err)


async def test_duplicate_sign_up(better_auth_server):
    email = new_email()
    async with BetterAuthClient(better_auth_server.url) as auth:
        await auth.sign_up("Cy", email, PASSWORD)
        with pytest.raises(UserAlreadyExistsError) as caught:
            await auth.sign_up("Cy again", email.upper(), PASSWORD)
    assert caught.value.status == 422


async def test_get_session_then_sign_out(better_auth_server):
    email = new_email()
    async with BetterAuthClient(better_auth_server.url) as auth:
        session = await auth.sign_up("Dee", email, PASSWORD)
        restored = await auth.get_session(session.session_token)
        assert restored is not None
        assert restored.user_id == session.user_id and restored.email == email
        assert token_claims(restored.token)["sub"] == session.user_id  # type: ignore[index]
        await auth.sign_out(session.session_token)
        assert await auth.get_session(session.session_token) is None
        with pytest.raises(SessionExpiredError) as caught:
            await auth.convex_token(session.session_token)
    assert caught.value.status == 401 and not caught.value.retryable


async def test_convex_verifies_the_jwt_and_sees_the_identity(better_auth_server, convex_server):
    email = new_email()
    async with BetterAuthClient(better_auth_server.url) as auth:
        session = await auth.sign_up("Eve", email, PASSWORD)
    async with ConvexClient(convex_server.url) as client:
        assert await client.query("users:whoami") is None
        await client.set_auth(session.token)
        me = await client.query("users:whoami")
    assert me["subject"] == session.user_id
    assert me["email"] == email
    assert me["issuer"] == better_auth_server.issuer


async def test_a_bad_token_is_rejected_by_the_server(better_auth_server, convex_server):
    async with BetterAuthClient(better_auth_server.url) as auth:
        session = await auth.sign_up("Fay", new_email(), PASSWORD)
    header, payload, signature = session.token.split(".")
    forged = f"{header}.{payload}.{signature[::-1]}"
    async with ConvexClient(convex_server.url) as client:
        with pytest.raises(AuthRejectedError):
            with anyio.fail_after(10):
                await client.set_auth(forged)
        # The client recovers as an anonymous caller instead of resending the bad token.
        with anyio.fail_after(10):
            assert await client.query("users:whoami") is None


async def test_subscription_sees_each_mutation(better_auth_server, convex_server):
    async with BetterAuthClient(better_auth_server.url) as auth:
        session = await auth.sign_up("Gus", new_email(), PASSWORD)
    async with ConvexClient(convex_server.url) as client:
        await client.set_auth(session.token)
        updates: list[list[str]] = []
        subscription = client.subscribe("messages:list")
        with anyio.fail_after(10):
            updates.append([m["body"] for m in await subscription.next()])
            for body in ("one", "two"):
                await client.mutation("messages:send", {"body": body})
                # Read-your-writes: when mutation() returns, the query already shows it.
                updates.append([m["body"] for m in await subscription.next()])
        subscription.close()
    assert updates == [[], ["one"], ["one", "two"]]


async def test_unauthenticated_calls_are_rejected_by_the_function(convex_server):
    async with ConvexClient(convex_server.url) as client:
        with pytest.raises(ConvexError) as caught:
            await client.query("messages:list")
        assert caught.value.data == {"code": "UNAUTHENTICATED"}
        with pytest.raises(ConvexError) as caught_mutation:
            await client.mutation("messages:send", {"body": "sneaky"})
        assert caught_mutation.value.data == {"code": "UNAUTHENTICATED"}
    assert convex_server.db.query("messages") == []


def sdk_tasks() -> set[asyncio.Task[Any]]:
    # LocalConvex runs in the same event loop, so look only at the SDK's own tasks.
    return {
        t
        for t in asyncio.all_tasks()
        if not t.done() and t.get_name().startswith("dartvex_auth_better.convex")
    }


async def test_leaving_async_with_leaves_nothing_behind(convex_server):
    async with ConvexClient(convex_server.url) as client:
        with anyio.fail_after(10):
            await client.query("users:whoami")
        assert client.connection_state is ConnectionState.CONNECTED
        assert sdk_tasks(), "the client should run its socket in named background tasks"
        session = client._session
    assert sdk_tasks() == set()
    assert client.connection_state is ConnectionState.CLOSED
    assert session is not None and session.closed
    record = await convex_server.wait_for_connections(1)
    with anyio.fail_after(5):
        await record.wait_closed()
