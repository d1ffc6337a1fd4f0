"""LocalConvex driven over a real socket by a raw aiohttp WebSocket client sending JSON.

Each test is a plain function that runs its body with ``anyio.run``. Waiting is always on
frames or server events under ``anyio.fail_after``; the only timed waits are for a token's
wall-clock expiry and short windows that assert that nothing arrives.
"""

from __future__ import annotations

import asyncio
import json
import math
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from typing import Any

import aiohttp
import anyio
import pytest
from aiohttp import web

from dartvex_auth_better._errors import ConvexError
from dartvex_auth_better.convex._values import Int64
from dartvex_auth_better.testing._convex_server import (
    ActionCtx,
    LocalConvex,
    MutationCtx,
    QueryCtx,
    TestTokenIssuer,
    decode_ts,
    encode_ts,
)

pytestmark = pytest.mark.integration

ZERO_TS = "AAAAAAAAAAA="
TEST_DEADLINE = 15.0


def run(body: Callable[[], Awaitable[None]]) -> None:
    async def main() -> None:
        with anyio.fail_after(TEST_DEADLINE):
            await body()

    anyio.run(main)


def install_functions(convex: LocalConvex) -> None:
    @convex.query("messages:list")
    def list_messages(ctx: QueryCtx, args: dict[str, Any]) -> list[dict[str, Any]]:
        return [
            m for m in ctx.db.query("messages") if m["channel"] == args.get("channel", "general")
        ]

    @convex.query("messages:count")
    async def count(ctx: QueryCtx, args: dict[str, Any]) -> float:
        ctx.log("counting")
        return len(ctx.db.query("messages"))

    @convex.mutation("messages:send")
    def send(ctx: MutationCtx, args: dict[str, Any]) -> str:
        identity = ctx.auth.get_user_identity()
        author = identity["subject"] if identity else "anonymous"
        return ctx.db.insert(
            "messages",
            {"channel": args.get("channel", "general"), "body": args["body"], "author": author},
        )

    @convex.mutation("messages:sendThenFail")
    def send_then_fail(ctx: MutationCtx, args: dict[str, Any]) -> None:
        ctx.db.insert("messages", {"channel": "general", "body": "never", "author": "x"})
        raise ValueError("boom")

    @convex.mutation("messages:reject")
    def reject(ctx: MutationCtx, args: dict[str, Any]) -> None:
        raise ConvexError("rejected", data={"code": "NOPE", "n": Int64(3)})

    @convex.query("users:whoami")
    def whoami(ctx: QueryCtx, args: dict[str, Any]) -> dict[str, Any] | None:
        return ctx.auth.get_user_identity()

    @convex.query("secret:get")
    def secret(ctx: QueryCtx, args: dict[str, Any]) -> str:
        identity = ctx.auth.get_user_identity()
        if identity is None:
            raise ConvexError("not signed in", data={"code": "UNAUTHENTICATED"})
        return f"secret for {identity['subject']}"

    @convex.query("bad:write")
    def write_in_query(ctx: QueryCtx, args: dict[str, Any]) -> None:
        ctx.db.insert("messages", {"channel": "general", "body": "x", "author": "x"})

    @convex.action("messages:shout")
    async def shout(ctx: ActionCtx, args: dict[str, Any]) -> dict[str, Any]:
        doc_id = await ctx.run_mutation("messages:send", {"body": args["body"].upper()})
        total = await ctx.run_query("messages:count", {})
        ctx.log("shouted", args["body"])
        return {"id": doc_id, "total": total}


class Client:
    """A raw protocol client: JSON frames over an aiohttp WebSocket."""

    def __init__(self, ws: aiohttp.ClientWebSocketResponse) -> None:
        self.ws = ws
        self.version: dict[str, Any] = {"querySet": 0, "identity": 0, "ts": ZERO_TS}

    async def send(self, frame: dict[str, Any]) -> None:
        await self.ws.send_str(json.dumps(frame))

    async def connect(self, session_id: str = "session-1", **extra: Any) -> None:
        await self.send(
            {
                "type": "Connect",
                "sessionId": session_id,
                "connectionCount": 0,
                "lastCloseReason": "InitialConnect",
                **extra,
            }
        )

    async def recv(self, *, skip_pings: bool = True) -> dict[str, Any]:
        while True:
            msg = await self.ws.receive()
            assert msg.type is aiohttp.WSMsgType.TEXT, f"expected a text frame, got {msg!r}"
            frame: dict[str, Any] = json.loads(msg.data)
            if skip_pings and frame["type"] == "Ping":
                continue
            return frame

    async def recv_type(self, frame_type: str) -> dict[str, Any]:
        frame = await self.recv()
        assert frame["type"] == frame_type, frame
        return frame

    async def transition(self) -> dict[str, Any]:
        """Receive a Transition and check it starts exactly where the last one ended."""
        frame = await self.recv_type("Transition")
        assert frame["startVersion"] == self.version
        self.version = frame["endVersion"]
        return frame

    async def expect_close(self) -> aiohttp.WSMessage:
        msg = await self.ws.receive()
        assert msg.type in (
            aiohttp.WSMsgType.CLOSE,
            aiohttp.WSMsgType.CLOSED,
            aiohttp.WSMsgType.ERROR,
        ), msg
        return msg

    async def assert_silent(self, seconds: float = 0.3) -> None:
        with anyio.move_on_after(seconds):
            msg = await self.ws.receive()
            raise AssertionError(f"expected silence, got {msg!r}")


@asynccontextmanager
async def client(
    convex: LocalConvex, path: str = "/api/sync", headers: dict[str, str] | None = None
) -> AsyncIterator[Client]:
    async with (
        aiohttp.ClientSession() as session,
        session.ws_connect(convex.url + path, headers=headers) as ws,
    ):
        yield Client(ws)


def add(query_id: int, path: str, args: dict[str, Any] | None = None) -> dict[str, Any]:
    return {
        "type": "Add",
        "queryId": query_id,
        "udfPath": path,
        "args": [args or {}],
        "journal": None,
    }


def mqs(base: int, *modifications: dict[str, Any]) -> dict[str, Any]:
    return {
        "type": "ModifyQuerySet",
        "baseVersion": base,
        "newVersion": base + 1,
        "modifications": list(modifications),
    }


def mutation(request_id: int, path: str, args: dict[str, Any]) -> dict[str, Any]:
    return {"type": "Mutation", "requestId": request_id, "udfPath": path, "args": [args]}


def user_token(token: str, base: int = 0) -> dict[str, Any]:
    return {"type": "Authenticate", "baseVersion": base, "tokenType": "User", "value": token}


def updated(transition: dict[str, Any], query_id: int) -> dict[str, Any]:
    mods = [m for m in transition["modifications"] if m.get("queryId") == query_id]
    assert len(mods) == 1, transition
    mod: dict[str, Any] = mods[0]
    return mod


# --------------------------------------------------------------------------------------
# Sync protocol basics
# --------------------------------------------------------------------------------------


def test_first_transition_starts_at_zero_and_carries_query_result() -> None:
    async def body() -> None:
        async with LocalConvex() as convex:
            install_functions(convex)
            convex.db.insert("messages", {"channel": "general", "body": "seed", "author": "a"})
            async with client(convex, headers={"Convex-Client": "python-test-1"}) as c:
                await c.connect("sess-A", clientTs=int(time.time() * 1000))
                await c.send(mqs(0, add(7, "messages.js:list", {"channel": "general"})))
                t = await c.recv_type("Transition")
                assert t["startVersion"] == {"querySet": 0, "identity": 0, "ts": ZERO_TS}
                assert t["endVersion"]["querySet"] == 1
                assert t["endVersion"]["identity"] == 0
                assert decode_ts(t["endVersion"]["ts"]) == convex.latest_ts > 0
                assert "clientClockSkew" in t and abs(t["clientClockSkew"]) < 60_000
                mod = updated(t, 7)
                assert mod["type"] == "QueryUpdated"
                assert mod["journal"] is None and mod["logLines"] == []
                assert [m["body"] for m in mod["value"]] == ["seed"]

                record = await convex.wait_for_connections(1)
                assert record.session_id == "sess-A"
                assert record.client_header == "python-test-1"
                assert record.path == "/api/sync"
                assert [f["type"] for f in record.frames] == ["Connect", "ModifyQuerySet"]

    run(body)


def test_versioned_sync_path_and_remove_gives_query_removed() -> None:
    async def body() -> None:
        async with LocalConvex() as convex:
            install_functions(convex)
            async with client(convex, path="/api/1.48.0/sync") as c:
                await c.connect()
                await c.send(mqs(0, add(0, "messages:count")))
                first = await c.transition()
                assert updated(first, 0)["value"] == 0
                assert updated(first, 0)["logLines"] == ["[LOG] counting"]
                await c.send(mqs(1, {"type": "Remove", "queryId": 0}))
                second = await c.transition()
                assert second["modifications"] == [{"type": "QueryRemoved", "queryId": 0}]
                assert second["endVersion"]["querySet"] == 2
            assert convex.connections[0].path == "/api/1.48.0/sync"

    run(body)


def test_mutation_response_then_transition_reaching_its_ts() -> None:
    async def body() -> None:
        async with LocalConvex() as convex:
            install_functions(convex)
            async with client(convex) as c:
                await c.connect()
                await c.send(mqs(0, add(0, "messages:list", {"channel": "general"})))
                assert updated(await c.transition(), 0)["value"] == []
                await c.send(mutation(0, "messages:send", {"body": "hi"}))
                response = await c.recv_type("MutationResponse")
                assert response["requestId"] == 0 and response["success"] is True
                doc_id = response["result"]
                t = await c.transition()
                assert decode_ts(t["endVersion"]["ts"]) >= decode_ts(response["ts"])
                value = updated(t, 0)["value"]
                assert [(m["_id"], m["body"], m["author"]) for m in value] == [
                    (doc_id, "hi", "anonymous")
                ]
                assert isinstance(value[0]["_creationTime"], float)

                # A failing mutation writes nothing and resolves without ts.
                await c.send(mutation(1, "messages:sendThenFail", {}))
                failed = await c.recv_type("MutationResponse")
                assert failed["success"] is False and "ts" not in failed
                assert failed["result"] == "Uncaught ValueError: boom"
                assert "errorData" not in failed
                assert [m["body"] for m in convex.db.query("messages")] == ["hi"]

                # ConvexError carries errorData.
                await c.send(mutation(2, "messages:reject", {}))
                rejected = await c.recv_type("MutationResponse")
                assert rejected["success"] is False and rejected["result"] == "rejected"
                assert rejected["errorData"] == {"code": "NOPE", "n": {"$integer": "AwAAAAAAAAA="}}

    run(body)


def test_resent_mutation_after_reconnect_is_applied_once() -> None:
    async def body() -> None:
        async with LocalConvex() as convex:
            install_functions(convex)
            async with client(convex) as c:
                await c.connect("sticky-session")
                await c.send(mutation(0, "messages:send", {"body": "once"}))
                first = await c.recv_type("MutationResponse")
                await c.transition()
            await (await convex.wait_for_connections(1)).wait_closed()

            async with client(convex) as c2:
                await c2.connect("sticky-session", maxObservedTimestamp=first["ts"])
                await c2.send(mutation(0, "messages:send", {"body": "once"}))
                again = await c2.recv_type("MutationResponse")
                assert again == first
                t = await c2.transition()
                assert decode_ts(t["endVersion"]["ts"]) >= decode_ts(first["ts"])
                # A new request id from the same session is a new mutation.
                await c2.send(mutation(1, "messages:send", {"body": "twice"}))
                assert (await c2.recv_type("MutationResponse"))["success"] is True
            assert [m["body"] for m in convex.db.query("messages")] == ["once", "twice"]

    run(body)


def test_base_version_mismatch_is_fatal() -> None:
    async def body() -> None:
        async with LocalConvex() as convex:
            install_functions(convex)
            async with client(convex) as c:
                await c.connect()
                await c.send(mqs(0, add(0, "messages:count")))
                await c.transition()
                await c.send(mqs(0, add(1, "messages:count")))  # base should be 1
                fatal = await c.recv_type("FatalError")
                assert "BaseVersionMismatch" in fatal["error"]
                close = await c.expect_close()
                assert close.type is aiohttp.WSMsgType.CLOSE and close.data == 0  # no status
            record = convex.connections[0]
            await record.wait_closed()
            assert record.closed

    run(body)


@pytest.mark.parametrize(
    ("frames", "fragment"),
    [
        ([mqs(0, {"type": "Remove", "queryId": 42})], "unknown query ID 42"),
        (["not json at all"], "not JSON"),
        ([{"type": "Mutation", "requestId": "zero"}], "Invalid client message"),
        (
            [{"type": "Connect", "sessionId": "s", "maxObservedTimestamp": encode_ts(2**63)}],
            "ahead",
        ),
    ],
    ids=["remove-unknown", "malformed-json", "bad-shape", "observed-ts-ahead"],
)
def test_protocol_violations_are_fatal(frames: list[Any], fragment: str) -> None:
    async def body() -> None:
        async with LocalConvex() as convex, client(convex) as c:
            if frames[0] == "not json at all" or frames[0].get("type") != "Connect":
                await c.connect()
            for frame in frames:
                if isinstance(frame, str):
                    await c.ws.send_str(frame)
                else:
                    await c.send(frame)
            fatal = await c.recv_type("FatalError")
            assert fragment in fatal["error"]
            await c.expect_close()

    run(body)


# --------------------------------------------------------------------------------------
# Authentication
# --------------------------------------------------------------------------------------


def test_authenticate_bumps_identity_and_functions_see_the_user() -> None:
    async def body() -> None:
        issuer = TestTokenIssuer()
        async with LocalConvex(jwks=issuer.jwks, issuer=issuer.issuer) as convex:
            install_functions(convex)
            async with client(convex) as c:
                await c.connect("auth-session")
                await c.send(user_token(issuer.mint("user-1", email="ada@example.com", name="Ada")))
                t = await c.transition()
                assert t["startVersion"]["identity"] == 0 and t["endVersion"]["identity"] == 1
                assert t["modifications"] == []

                await c.send(mqs(0, add(0, "users:whoami")))
                who = updated(await c.transition(), 0)["value"]
                assert who["subject"] == "user-1"
                assert who["issuer"] == issuer.issuer
                assert who["tokenIdentifier"] == f"{issuer.issuer}|user-1"
                assert who["email"] == "ada@example.com" and who["name"] == "Ada"

                # A fresh token for the same user: identity bumps, the result is unchanged,
                # so the Transition carries no QueryUpdated.
                await c.send(
                    user_token(issuer.mint("user-1", email="ada@example.com", name="Ada"), 1)
                )
                t = await c.transition()
                assert t["endVersion"]["identity"] == 2 and t["modifications"] == []

                # Logging out re-runs the query as anonymous.
                await c.send({"type": "Authenticate", "baseVersion": 2, "tokenType": "None"})
                t = await c.transition()
                assert t["endVersion"]["identity"] == 3
                assert updated(t, 0)["value"] is None

            record = convex.connections[0]
            assert record.identity is None
            assert len(convex.received_tokens) == 2
            first = convex.received_tokens[0]
            assert first.accepted is True and first.was_expired is False
            assert first.session_id == "auth-session"
            assert first.exp is not None and first.exp > time.time()
            assert first.token not in repr(first)

    run(body)


def test_convex_error_for_anonymous_then_result_after_login() -> None:
    async def body() -> None:
        issuer = TestTokenIssuer()
        async with LocalConvex(jwks=issuer.jwks, issuer=issuer.issuer) as convex:
            install_functions(convex)
            async with client(convex) as c:
                await c.connect()
                await c.send(mqs(0, add(3, "secret:get")))
                failed = updated(await c.transition(), 3)
                assert failed["type"] == "QueryFailed"
                assert failed["errorMessage"] == "not signed in"
                assert failed["errorData"] == {"code": "UNAUTHENTICATED"}
                assert failed["journal"] is None

                await c.send(user_token(issuer.mint("bob")))
                ok = updated(await c.transition(), 3)
                assert ok == {
                    "type": "QueryUpdated",
                    "queryId": 3,
                    "value": "secret for bob",
                    "logLines": [],
                    "journal": None,
                }

    run(body)


@pytest.mark.parametrize("case", ["expired", "other-key-same-kid", "unknown-kid", "wrong-audience"])
def test_bad_token_gives_auth_error_and_close(case: str) -> None:
    async def body() -> None:
        issuer = TestTokenIssuer(kid="key-1")
        async with LocalConvex(jwks=issuer.jwks, issuer=issuer.issuer) as convex:
            if case == "expired":
                token = issuer.mint("user-1", iat=time.time() - 3600, ttl=60)
            elif case == "other-key-same-kid":
                token = TestTokenIssuer(issuer=issuer.issuer, kid="key-1").mint("user-1")
            elif case == "unknown-kid":
                token = TestTokenIssuer(issuer=issuer.issuer).mint("user-1")
            else:
                token = issuer.mint("user-1", aud="someone-else")
            async with client(convex) as c:
                await c.connect()
                await c.send(user_token(token))
                error = await c.recv_type("AuthError")
                assert error["authUpdateAttempted"] is True
                assert error["baseVersion"] == 0
                assert token not in error["error"]
                close = await c.expect_close()
                assert close.type is not aiohttp.WSMsgType.CLOSE or close.data == 0
            received = await convex.wait_for_tokens(1)
            assert received.accepted is False
            assert received.was_expired is (case == "expired")

    run(body)


def test_auth_error_after_accepted_token_reports_the_received_identity_version() -> None:
    async def body() -> None:
        issuer = TestTokenIssuer()
        async with (
            LocalConvex(jwks=issuer.jwks, issuer=issuer.issuer) as convex,
            client(convex) as c,
        ):
            await c.connect()
            await c.send(user_token(issuer.mint("u")))
            await c.transition()
            await c.send(user_token("not-a-jwt", 1))
            error = await c.recv_type("AuthError")
            assert error == {
                "type": "AuthError",
                "error": error["error"],
                "baseVersion": 1,
                "authUpdateAttempted": True,
            }
            await c.expect_close()
            # The rejected token did not replace the identity in force.
            record = convex.connections[0]
            assert record.identity is not None and record.identity["sub"] == "u"
            assert [t.accepted for t in convex.received_tokens] == [True, False]

    run(body)


def test_admin_auth_and_identity_version_mismatch_are_refused() -> None:
    async def body() -> None:
        async with LocalConvex() as convex:
            async with client(convex) as c:
                await c.connect()
                await c.send(
                    {"type": "Authenticate", "baseVersion": 0, "tokenType": "Admin", "value": "k"}
                )
                error = await c.recv_type("AuthError")
                assert error["authUpdateAttempted"] is True
                await c.expect_close()
            async with client(convex) as c:
                await c.connect()
                await c.send({"type": "Authenticate", "baseVersion": 5, "tokenType": "None"})
                assert "IdentityVersionMismatch" in (await c.recv_type("FatalError"))["error"]

    run(body)


def test_expired_identity_is_enforced_when_a_function_is_about_to_run() -> None:
    async def body() -> None:
        issuer = TestTokenIssuer()
        async with LocalConvex(jwks=issuer.jwks, issuer=issuer.issuer) as convex:
            install_functions(convex)
            async with client(convex) as c:
                await c.connect()
                exp = math.floor(time.time()) + 2  # PyJWT reads exp as whole seconds
                await c.send(user_token(issuer.mint("short-lived", exp=exp)))
                await c.send(mqs(0, add(0, "users:whoami")))
                assert updated(await c.transition(), 0)["value"]["subject"] == "short-lived"
                # Waiting for the wall clock to pass the token's exp (not synchronisation).
                await anyio.sleep(max(0.0, exp - time.time()) + 0.05)
                await c.send(mutation(0, "messages:send", {"body": "too late"}))
                error = await c.recv_type("AuthError")
                assert error["authUpdateAttempted"] is False
                assert error["baseVersion"] == 1
                await c.expect_close()
            assert convex.db.query("messages") == []

    run(body)


def test_jwks_url_is_fetched_once_and_refetched_on_unknown_kid() -> None:
    async def body() -> None:
        first = TestTokenIssuer(issuer="https://auth.local")
        rotated = TestTokenIssuer(issuer="https://auth.local")
        stranger = TestTokenIssuer(issuer="https://auth.local")
        served = {"keys": first.jwks["keys"]}
        fetches: list[float] = []

        async def jwks_handler(request: web.Request) -> web.Response:
            fetches.append(time.time())
            return web.json_response(served)

        app = web.Application()
        app.router.add_get("/.well-known/jwks.json", jwks_handler)
        runner = web.AppRunner(app)
        await runner.setup()
        site = web.TCPSite(runner, "127.0.0.1", 0)
        await site.start()
        port = runner.addresses[0][1]
        try:
            url = f"http://127.0.0.1:{port}/.well-known/jwks.json"
            async with LocalConvex(jwks_url=url, issuer="https://auth.local") as convex:
                install_functions(convex)

                async def authenticate(token: str) -> dict[str, Any]:
                    async with client(convex) as c:
                        await c.connect()
                        await c.send(user_token(token))
                        return await c.recv()

                assert (await authenticate(first.mint("a")))["type"] == "Transition"
                assert (await authenticate(first.mint("b")))["type"] == "Transition"
                assert len(fetches) == 1  # cached

                served["keys"] = first.jwks["keys"] + rotated.jwks["keys"]
                assert (await authenticate(rotated.mint("c")))["type"] == "Transition"
                assert len(fetches) == 2  # one re-fetch for the new kid

                error = await authenticate(stranger.mint("d"))
                assert error["type"] == "AuthError" and error["authUpdateAttempted"] is True
                assert len(fetches) == 3  # re-fetched once, still unknown
        finally:
            await runner.cleanup()

    run(body)


# --------------------------------------------------------------------------------------
# Actions, function errors, canonical names
# --------------------------------------------------------------------------------------


def test_action_runs_query_and_mutation_and_updates_subscribers() -> None:
    async def body() -> None:
        async with LocalConvex() as convex:
            install_functions(convex)
            async with client(convex) as c:
                await c.connect()
                await c.send(mqs(0, add(0, "messages:count")))
                assert updated(await c.transition(), 0)["value"] == 0
                await c.send(
                    {
                        "type": "Action",
                        "requestId": 5,
                        "udfPath": "messages:shout",
                        "args": [{"body": "hey"}],
                    }
                )
                frames = [await c.recv(), await c.recv()]
                response = next(f for f in frames if f["type"] == "ActionResponse")
                transition = next(f for f in frames if f["type"] == "Transition")
                assert response["requestId"] == 5 and response["success"] is True
                assert response["result"]["total"] == 1
                assert response["logLines"] == ["[LOG] counting", "[LOG] shouted hey"]
                assert "ts" not in response
                assert updated(transition, 0)["value"] == 1
                assert convex.db.query("messages")[0]["body"] == "HEY"

                await c.send(
                    {"type": "Action", "requestId": 6, "udfPath": "messages:nope", "args": [{}]}
                )
                missing = await c.recv_type("ActionResponse")
                assert missing["success"] is False
                assert "Could not find public function for 'messages:nope'" in missing["result"]

    run(body)


def test_function_errors_and_kinds() -> None:
    async def body() -> None:
        async with LocalConvex() as convex:
            install_functions(convex)
            async with client(convex) as c:
                await c.connect()
                await c.send(
                    mqs(
                        0,
                        add(0, "bad:write"),
                        add(1, "messages:send", {"body": "x"}),
                        add(2, "nowhere"),
                    )
                )
                t = await c.transition()
                assert "read-only" in updated(t, 0)["errorMessage"]
                assert "as Query, but it is defined as Mutation" in updated(t, 1)["errorMessage"]
                assert "'nowhere:default'" in updated(t, 2)["errorMessage"]
                assert all("errorData" not in m for m in t["modifications"])
            assert convex.db.query("messages") == []

    run(body)


# --------------------------------------------------------------------------------------
# HTTP API
# --------------------------------------------------------------------------------------


def test_http_query_mutation_and_errors() -> None:
    async def body() -> None:
        issuer = TestTokenIssuer()
        async with LocalConvex(jwks=issuer.jwks, issuer=issuer.issuer) as convex:
            install_functions(convex)

            @convex.query("numbers:big")
            def big(ctx: QueryCtx, args: dict[str, Any]) -> dict[str, Any]:
                return {"n": Int64(2**40), "raw": b"\x01\x02"}

            auth = {"Authorization": f"Bearer {issuer.mint('http-user')}"}
            async with aiohttp.ClientSession() as session:

                async def post(
                    kind: str, payload: dict[str, Any], headers: dict[str, str] | None = None
                ) -> tuple[int, Any]:
                    async with session.post(
                        f"{convex.url}/api/{kind}", json=payload, headers=headers
                    ) as resp:
                        return resp.status, await resp.json()

                status, sent = await post(
                    "mutation",
                    {
                        "path": "messages:send",
                        "args": [{"body": "via http"}],
                        "format": "convex_encoded_json",
                    },
                    auth,
                )
                assert status == 200 and sent["status"] == "success"
                assert "logLines" not in sent  # omitted when empty, as the real server does

                status, listed = await post(
                    "query", {"path": "messages:list", "args": {"channel": "general"}}
                )
                assert status == 200
                assert [(m["_id"], m["author"]) for m in listed["value"]] == [
                    (sent["value"], "http-user")
                ]

                status, counted = await post("query", {"path": "messages:count", "args": []})
                assert counted == {"status": "success", "value": 1, "logLines": ["[LOG] counting"]}

                status, secret = await post("query", {"path": "secret:get", "args": [{}]})
                assert status == 200
                assert secret == {
                    "status": "error",
                    "errorMessage": "not signed in",
                    "errorData": {"code": "UNAUTHENTICATED"},
                }

                status, encoded = await post("query", {"path": "numbers:big", "args": [{}]})
                assert encoded["value"] == {
                    "n": {"$integer": "AAAAAAABAAA="},
                    "raw": {"$bytes": "AQI="},
                }
                status, clean = await post(
                    "query", {"path": "numbers:big", "args": [{}], "format": "json"}
                )
                assert clean["value"] == {"n": str(2**40), "raw": "AQI="}

                status, action = await post(
                    "action", {"path": "messages:shout", "args": [{"body": "a"}]}, auth
                )
                assert status == 200 and action["value"]["total"] == 2

                expired = {
                    "Authorization": f"Bearer {issuer.mint('u', iat=time.time() - 100, ttl=10)}"
                }
                status, denied = await post(
                    "query", {"path": "messages:count", "args": [{}]}, expired
                )
                assert status == 401 and denied["code"] == "Unauthenticated"

                async with session.post(f"{convex.url}/api/query", data=b"{nope") as resp:
                    assert resp.status == 400

    run(body)


# --------------------------------------------------------------------------------------
# Pings and hooks
# --------------------------------------------------------------------------------------


def test_ping_after_ping_interval_of_silence() -> None:
    async def body() -> None:
        async with LocalConvex(ping_interval=0.2) as convex:
            install_functions(convex)
            async with client(convex) as c:
                await c.connect()
                await c.send(mqs(0, add(0, "messages:count")))
                await c.transition()
                started = anyio.current_time()
                ping = await c.recv(skip_pings=False)
                assert ping == {"type": "Ping"}
                assert anyio.current_time() - started >= 0.15

    run(body)


def test_drop_connections_cuts_sockets_without_a_close_handshake() -> None:
    async def body() -> None:
        async with LocalConvex() as convex:
            async with client(convex) as c:
                await c.connect()
                record = await convex.wait_for_connections(1)
                await record.wait_for_frame("Connect")
                await convex.drop_connections()
                assert record.closed
                msg = await c.expect_close()
                assert msg.type is not aiohttp.WSMsgType.CLOSE  # no Close frame was sent
            assert convex.open_connections == []

    run(body)


def test_close_connections_sends_code_and_reason() -> None:
    async def body() -> None:
        async with LocalConvex() as convex:
            async with client(convex) as c:
                await c.connect()
                await (await convex.wait_for_connections(1)).wait_for_frame("Connect")
                await convex.close_connections(code=1011, reason="InternalServerError")
                msg = await c.expect_close()
                assert msg.type is aiohttp.WSMsgType.CLOSE
                assert msg.data == 1011 and msg.extra == "InternalServerError"
            await convex.connections[0].wait_closed()

    run(body)


def test_send_fatal_error_and_send_auth_error() -> None:
    async def body() -> None:
        issuer = TestTokenIssuer()
        async with LocalConvex(jwks=issuer.jwks, issuer=issuer.issuer) as convex:
            async with client(convex) as c:
                await c.connect()
                await (await convex.wait_for_connections(1)).wait_for_frame("Connect")
                await convex.send_fatal_error("go away")
                assert await c.recv() == {"type": "FatalError", "error": "go away"}
                assert (await c.expect_close()).data == 0

            async with client(convex) as c:
                await c.connect()
                await c.send(user_token(issuer.mint("u")))
                await c.transition()
                await convex.send_auth_error("TokenExpired")
                assert await c.recv() == {
                    "type": "AuthError",
                    "error": "TokenExpired",
                    "baseVersion": 1,
                    "authUpdateAttempted": False,
                }
                await c.expect_close()

    run(body)


def test_pause_and_resume() -> None:
    async def body() -> None:
        async with LocalConvex(ping_interval=0.1) as convex:
            install_functions(convex)
            async with client(convex) as c:
                await c.connect()
                record = await convex.wait_for_connections(1)
                convex.pause()
                assert convex.paused
                await c.send(mqs(0, add(0, "messages:count")))
                await record.wait_for_frame("ModifyQuerySet")  # read and recorded...
                await c.assert_silent(0.4)  # ...but neither answered nor pinged
                convex.resume()
                t = await c.transition()
                assert updated(t, 0)["value"] == 0

    run(body)


def test_transition_chunks_reassemble_to_the_transition() -> None:
    async def body() -> None:
        async with LocalConvex() as convex:
            install_functions(convex)
            for i in range(20):
                convex.db.insert(
                    "messages", {"channel": "general", "body": f"message {i} é", "author": "a"}
                )
            convex.transition_chunk_size = 300
            async with client(convex) as c:
                await c.connect()
                await c.send(mqs(0, add(0, "messages:list", {"channel": "general"})))
                chunks = [await c.recv_type("TransitionChunk")]
                while len(chunks) < chunks[0]["totalParts"]:
                    chunks.append(await c.recv_type("TransitionChunk"))
                assert chunks[0]["totalParts"] > 1
                assert [ch["partNumber"] for ch in chunks] == list(range(len(chunks)))
                assert len({ch["transitionId"] for ch in chunks}) == 1
                assert all(len(ch["chunk"]) <= 300 for ch in chunks)
                transition = json.loads("".join(ch["chunk"] for ch in chunks))
                assert transition["type"] == "Transition"
                assert transition["startVersion"]["ts"] == ZERO_TS
                assert len(updated(transition, 0)["value"]) == 20

    run(body)


def test_wrong_start_version_once() -> None:
    async def body() -> None:
        async with LocalConvex() as convex:
            install_functions(convex)
            async with client(convex) as c:
                await c.connect()
                await c.send(mqs(0, add(0, "messages:count")))
                await c.transition()
                convex.wrong_start_version_once()
                await c.send(mqs(1))
                bad = await c.recv_type("Transition")
                assert bad["startVersion"] != c.version
                c.version = bad["endVersion"]
                await c.send(mqs(2))
                await c.transition()  # only once: the next one is consistent again

    run(body)


def test_aclose_closes_sockets_and_leaves_no_task_behind() -> None:
    async def body() -> None:
        convex = LocalConvex()
        install_functions(convex)
        await convex.start()
        await convex.start()  # idempotent
        async with client(convex) as c:
            await c.connect()
            await c.send(mqs(0, add(0, "messages:count")))
            await c.transition()
            await convex.aclose()
            msg = await c.expect_close()
            assert msg.type is aiohttp.WSMsgType.CLOSE and msg.data == 1001
        await convex.aclose()  # idempotent
        assert convex.connections[0].closed
        current = asyncio.current_task()
        assert [t for t in asyncio.all_tasks() if t is not current] == []

    run(body)


def test_mutations_are_serial_across_the_server_and_actions_concurrent() -> None:
    async def body() -> None:
        async with LocalConvex() as convex:
            install_functions(convex)
            gate = anyio.Event()

            @convex.mutation("slow:mutate")
            async def slow_mutate(ctx: MutationCtx, args: dict[str, Any]) -> str:
                await gate.wait()
                return ctx.db.insert("log", {"who": "slow"})

            @convex.action("slow:act")
            async def slow_act(ctx: ActionCtx, args: dict[str, Any]) -> str:
                await gate.wait()
                return "slow action"

            @convex.action("fast:act")
            def fast_act(ctx: ActionCtx, args: dict[str, Any]) -> str:
                return "fast action"

            async with client(convex) as a, client(convex) as b:
                await a.connect("A")
                await b.connect("B")
                record_a = await convex.wait_for_connections(1)
                await a.send(mutation(0, "slow:mutate", {}))
                await a.send(
                    {"type": "Action", "requestId": 1, "udfPath": "slow:act", "args": [{}]}
                )
                await record_a.wait_for_frame("Action")
                await b.send(mutation(0, "messages:send", {"body": "fast"}))
                await b.send(
                    {"type": "Action", "requestId": 1, "udfPath": "fast:act", "args": [{}]}
                )
                # The fast action is not held up by the slow one...
                assert (await b.recv_type("ActionResponse"))["result"] == "fast action"
                # ...but B's mutation waits behind A's.
                await b.assert_silent(0.2)
                assert convex.db.query("messages") == []
                gate.set()
                first = await a.recv()
                second = await a.recv()
                by_type = {first["type"]: first, second["type"]: second}
                assert set(by_type) >= {"MutationResponse"}
                slow_ts = decode_ts(by_type["MutationResponse"]["ts"])
                fast = await b.recv_type("MutationResponse")
                assert decode_ts(fast["ts"]) > slow_ts

    run(body)


def test_direct_db_writes_refresh_only_affected_subscriptions() -> None:
    async def body() -> None:
        async with LocalConvex() as convex:
            install_functions(convex)

            @convex.query("other:table")
            def other(ctx: QueryCtx, args: dict[str, Any]) -> int:
                return len(ctx.db.query("other"))

            async with client(convex) as reader, client(convex) as bystander:
                await reader.connect("reader")
                await bystander.connect("bystander")
                await reader.send(mqs(0, add(0, "messages:list", {"channel": "general"})))
                await bystander.send(mqs(0, add(0, "other:table")))
                await reader.transition()
                await bystander.transition()

                doc_id = convex.db.insert(
                    "messages", {"channel": "general", "body": "seeded", "author": "t"}
                )
                t = await reader.transition()
                assert [m["_id"] for m in updated(t, 0)["value"]] == [doc_id]
                assert decode_ts(t["endVersion"]["ts"]) == convex.latest_ts

                convex.db.patch(doc_id, {"body": "edited"})
                assert updated(await reader.transition(), 0)["value"][0]["body"] == "edited"
                convex.db.delete(doc_id)
                assert updated(await reader.transition(), 0)["value"] == []
                await bystander.assert_silent(0.2)

    run(body)


def test_response_delay_holds_every_answer() -> None:
    async def main() -> None:
        async with LocalConvex() as convex:

            @convex.query("q:get")
            def get(ctx: Any, args: dict[str, Any]) -> int:
                return 1

            convex.response_delay = 0.3
            async with (
                aiohttp.ClientSession() as session,
                session.ws_connect(convex.url.replace("http", "ws") + "/api/sync") as ws,
            ):
                await ws.send_json(
                    {
                        "type": "Connect",
                        "sessionId": "s",
                        "connectionCount": 0,
                        "lastCloseReason": "InitialConnect",
                        "clientTs": 0,
                    }
                )
                started = time.monotonic()
                await ws.send_json(
                    {
                        "type": "ModifyQuerySet",
                        "baseVersion": 0,
                        "newVersion": 1,
                        "modifications": [
                            {"type": "Add", "queryId": 0, "udfPath": "q:get", "args": [{}]}
                        ],
                    }
                )
                with anyio.fail_after(5):
                    msg = await ws.receive_json()
                elapsed = time.monotonic() - started
            assert msg["type"] == "Transition"
            assert elapsed >= 0.3

    anyio.run(main)


# --------------------------------------------------------------------------------------
# Per-connection fault injection and raw frame counts
# --------------------------------------------------------------------------------------


def test_raw_frame_count_includes_frames_that_are_not_json_objects() -> None:
    async def body() -> None:
        async with LocalConvex() as convex:
            for n, malformed in enumerate(["[1, 2]", "not json"], start=1):
                async with client(convex) as c:
                    await c.connect()
                    await c.ws.send_str(malformed)  # the server answers FatalError
                    assert (await c.recv())["type"] == "FatalError"
                    record = await convex.wait_for_connections(n)
                    # The reader counted the frame before the dispatcher answered it.
                    assert record.raw_frame_count == 2
                    assert [f["type"] for f in record.frames] == ["Connect"]

    run(body)


def test_a_record_drops_or_closes_only_its_own_socket() -> None:
    async def body() -> None:
        async with LocalConvex() as convex, client(convex) as a, client(convex) as b:
            await a.connect("a")
            await b.connect("b")
            first = await convex.wait_for_connections(1)
            second = await convex.wait_for_connections(2)
            await first.wait_for_frame("Connect")
            await second.wait_for_frame("Connect")

            await first.close(4001, "GoAway")
            msg = await a.expect_close()
            assert (msg.type, msg.data, msg.extra) == (aiohttp.WSMsgType.CLOSE, 4001, "GoAway")
            await first.wait_closed()
            assert not second.closed

            await second.drop()
            assert second.closed
            assert (await b.expect_close()).type is not aiohttp.WSMsgType.CLOSE  # no handshake
            await second.drop()  # a no-op once closed
            await second.close()
            assert convex.open_connections == []

    run(body)


def test_send_raw_sends_a_frame_verbatim_even_one_that_is_not_utf8() -> None:
    async def body() -> None:
        async with LocalConvex() as convex, client(convex) as c:
            await c.connect()
            record = await convex.wait_for_connections(1)
            await record.wait_for_frame("Connect")
            convex.pause()  # send_raw ignores the pause switch
            assert await record.send_raw('{"type":"Nope"}')
            assert await c.recv() == {"type": "Nope"}
            assert await record.send_raw(b"\x00\x01", binary=True)
            msg = await c.ws.receive()
            assert (msg.type, msg.data) == (aiohttp.WSMsgType.BINARY, b"\x00\x01")
            assert await record.send_raw(b"\xff\xfe")  # a text frame that is not UTF-8
            msg = await c.ws.receive()
            assert msg.type is aiohttp.WSMsgType.ERROR
            await record.wait_closed()
            assert not await record.send_raw("{}")

    run(body)


def test_hold_handshakes_holds_new_sockets_until_released() -> None:
    async def body() -> None:
        async with LocalConvex() as convex, aiohttp.ClientSession() as session:
            convex.hold_handshakes()
            # A client that gives up on a held handshake: the request is dropped later.
            with pytest.raises(TimeoutError):
                await asyncio.wait_for(session.ws_connect(convex.sync_url), timeout=0.2)
            assert convex.handshake_attempts == 1 and convex.connections == []

            pending = asyncio.ensure_future(session.ws_connect(convex.sync_url))
            await convex.wait_for_handshake_attempts(2)
            assert not pending.done() and convex.connections == []
            convex.release_handshakes()
            ws = await pending
            try:
                record = await convex.wait_for_connections(1)
                await ws.send_json({"type": "Connect", "sessionId": "s", "connectionCount": 0})
                assert (await record.wait_for_frame("Connect"))["sessionId"] == "s"
                assert len(convex.connections) == 1  # the abandoned request never opened
            finally:
                await ws.close()

    run(body)


def test_a_record_closes_with_no_status_when_asked() -> None:
    async def body() -> None:
        async with LocalConvex() as convex, client(convex) as c:
            await c.connect()
            record = await convex.wait_for_connections(1)
            await record.wait_for_frame("Connect")
            await record.close(None)
            msg = await c.expect_close()
            assert (msg.type, msg.data) == (aiohttp.WSMsgType.CLOSE, 0)  # aiohttp: no status

    run(body)


def test_pause_reading_holds_the_clients_frames_until_resumed() -> None:
    async def body() -> None:
        async with LocalConvex() as convex, client(convex) as c:
            record = await convex.wait_for_connections(1)
            record.pause_reading()
            await c.connect()
            await anyio.sleep(0.2)  # nothing may happen: the frame waits in the kernel
            assert record.raw_frame_count == 0
            record.resume_reading()
            assert (await record.wait_for_frame("Connect"))["sessionId"] == "session-1"

    run(body)
