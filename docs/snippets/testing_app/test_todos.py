"""Tests of an app's Convex functions and client code, against the local stack."""

from __future__ import annotations

import secrets
from typing import Any

import anyio
import pytest

from dartvex_auth_better import (
    BetterAuthClient,
    ConvexBetterAuthProvider,
    ConvexClient,
    ConvexError,
)
from dartvex_auth_better.testing import LocalBetterAuth, LocalConvex, TestTokenIssuer

pytestmark = pytest.mark.anyio


# --8<-- [start:functions]
def register_todos(convex: LocalConvex) -> None:
    """Python stand-ins for the app's Convex functions (convex/todos.ts)."""

    @convex.mutation("todos:add")
    def add(ctx: Any, args: dict[str, Any]) -> str:
        user = ctx.auth.get_user_identity()
        if user is None:
            raise ConvexError("sign in first", data={"code": "UNAUTHENTICATED"})
        todo_id: str = ctx.db.insert("todos", {"owner": user["subject"], "text": args["text"]})
        return todo_id

    @convex.query("todos:mine")
    def mine(ctx: Any, args: dict[str, Any]) -> list[str]:
        user = ctx.auth.get_user_identity()
        if user is None:
            return []
        return [t["text"] for t in ctx.db.query("todos") if t["owner"] == user["subject"]]

    # --8<-- [end:functions]


# --8<-- [start:real_sign_in]
async def test_a_user_sees_their_own_todos(
    better_auth_server: LocalBetterAuth, convex_server: LocalConvex
) -> None:
    register_todos(convex_server)
    email = f"ada-{secrets.token_hex(4)}@example.com"
    async with (
        BetterAuthClient(convex_server.url, site_url=better_auth_server.url) as auth,
        ConvexClient(convex_server.url, expect_auth=True) as convex,
    ):
        authed = convex.with_auth(ConvexBetterAuthProvider(auth))
        await authed.sign_up("Ada", email, "correct horse battery staple")
        await authed.mutation("todos:add", {"text": "write tests"})
        assert await authed.query("todos:mine") == ["write tests"]
    # What the server saw: the table, and a token that was valid when it arrived.
    assert [t["text"] for t in convex_server.db.query("todos")] == ["write tests"]
    assert convex_server.received_tokens[-1].accepted
    # --8<-- [end:real_sign_in]


# --8<-- [start:anonymous]
async def test_anonymous_callers_are_refused(convex_server: LocalConvex) -> None:
    register_todos(convex_server)
    async with ConvexClient(convex_server.url) as convex:
        with pytest.raises(ConvexError) as refused:
            await convex.mutation("todos:add", {"text": "sneaky"})
    assert refused.value.data == {"code": "UNAUTHENTICATED"}
    # --8<-- [end:anonymous]


# --8<-- [start:minted]
async def test_with_minted_tokens_and_no_better_auth() -> None:
    issuer = TestTokenIssuer()
    async with (
        LocalConvex(jwks=issuer.jwks, issuer=issuer.issuer) as server,
        ConvexClient(server.url) as convex,
    ):
        register_todos(server)
        await convex.set_auth(issuer.mint("user-1", email="one@example.com"))
        await convex.mutation("todos:add", {"text": "mine"})
        await convex.set_auth(issuer.mint("user-2"))
        assert await convex.query("todos:mine") == []
    # --8<-- [end:minted]


# --8<-- [start:faults]
async def test_a_live_query_survives_a_dropped_connection(
    better_auth_server: LocalBetterAuth, convex_server: LocalConvex
) -> None:
    register_todos(convex_server)
    async with (
        BetterAuthClient(convex_server.url, site_url=better_auth_server.url) as auth,
        ConvexClient(convex_server.url, expect_auth=True, initial_backoff=0.05) as convex,
    ):
        authed = convex.with_auth(ConvexBetterAuthProvider(auth))
        email = f"bo-{secrets.token_hex(4)}@example.com"
        await authed.sign_up("Bo", email, "correct horse battery staple")
        with anyio.fail_after(10):
            async with authed.subscribe("todos:mine") as todos:
                assert await todos.next() == []
                await convex_server.drop_connections()  # a network cut: no Close frame
                await convex_server.wait_for_connections(2)  # the client reconnects
                await authed.mutation("todos:add", {"text": "after the cut"})
                assert await todos.next() == ["after the cut"]

            # The server rejects the token, as when it expires: the client fetches a
            # fresh one from Better Auth and authenticates again on a new socket.
            tokens = len(convex_server.received_tokens)
            await convex_server.send_auth_error("token expired")
            await convex_server.wait_for_tokens(tokens + 1)
            assert await authed.query("todos:mine") == ["after the cut"]
    # --8<-- [end:faults]
