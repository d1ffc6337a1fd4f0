"""ConvexHttpClient over real sockets.

Most tests run against LocalConvex, which serves the real HTTP function API and verifies
JWTs. Answers LocalConvex never gives (proxy HTML pages, empty 502s, 560 bodies, JSON
arrays, a server that never answers) come from a tiny aiohttp.web app started in the test
on 127.0.0.1:0. Waiting is on events; a held handler waits on an event that is set only
at teardown, never as a timing device.
"""

from __future__ import annotations

import asyncio
import json
import logging
import math
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass
from typing import Any

import aiohttp
import anyio
import pytest
from aiohttp import web

from dartvex_auth_better import (
    AuthRejectedError,
    ClientClosedError,
    ConvexError,
    ConvexHttpClient,
    ConvexHttpError,
    ConvexHttpResponseError,
    Int64,
    ProtocolError,
    RequestTimeoutError,
    TransportError,
    __version__,
)
from dartvex_auth_better.testing._convex_server import (
    ActionCtx,
    LocalConvex,
    MutationCtx,
    QueryCtx,
    TestTokenIssuer,
)

pytestmark = [pytest.mark.anyio, pytest.mark.integration]

DEADLINE = 10.0


# -- LocalConvex ------------------------------------------------------------------------


@pytest.fixture(scope="module")
def issuer() -> TestTokenIssuer:
    return TestTokenIssuer()


def install_functions(convex: LocalConvex) -> None:
    @convex.query("messages:list")
    def list_messages(ctx: QueryCtx, args: dict[str, Any]) -> list[dict[str, Any]]:
        return [{"body": m["body"], "author": m["author"]} for m in ctx.db.query("messages")]

    @convex.mutation("messages:send")
    def send(ctx: MutationCtx, args: dict[str, Any]) -> str:
        identity = ctx.auth.get_user_identity()
        author = identity["subject"] if identity else "anonymous"
        return ctx.db.insert("messages", {"body": args["body"], "author": author})

    @convex.action("messages:countViaAction")
    async def count_via_action(ctx: ActionCtx, args: dict[str, Any]) -> dict[str, Any]:
        messages = await ctx.run_query("messages:list")
        return {"count": len(messages), "tag": args["tag"]}

    @convex.query("values:echo")
    def echo(ctx: QueryCtx, args: dict[str, Any]) -> Any:
        return args["value"]

    @convex.mutation("values:store")
    def store(ctx: MutationCtx, args: dict[str, Any]) -> Any:
        doc_id = ctx.db.insert("values", {"value": args["value"]})
        stored = ctx.db.get(doc_id)
        assert stored is not None
        return stored["value"]

    @convex.mutation("messages:reject")
    def reject(ctx: MutationCtx, args: dict[str, Any]) -> None:
        ctx.log("rejecting", args["reason"])
        raise ConvexError("rejected", data={"code": "NOPE", "n": Int64(3)})

    @convex.query("broken:query")
    def broken(ctx: QueryCtx, args: dict[str, Any]) -> None:
        raise ValueError("boom")

    @convex.query("users:whoami")
    def whoami(ctx: QueryCtx, args: dict[str, Any]) -> dict[str, Any] | None:
        return ctx.auth.get_user_identity()

    @convex.mutation("notes:add")
    def add_note(ctx: MutationCtx, args: dict[str, Any]) -> str:
        if ctx.auth.get_user_identity() is None:
            raise ConvexError("not signed in", data={"code": "UNAUTHENTICATED"})
        return ctx.db.insert("notes", {"text": args["text"]})

    @convex.mutation("log:append")
    def append(ctx: MutationCtx, args: dict[str, Any]) -> int:
        ctx.db.insert("log", {"i": args["i"]})
        return len(ctx.db.query("log"))

    @convex.query("log:list")
    def log_list(ctx: QueryCtx, args: dict[str, Any]) -> list[Any]:
        return [doc["i"] for doc in ctx.db.query("log")]


@pytest.fixture
async def convex(issuer: TestTokenIssuer) -> AsyncIterator[LocalConvex]:
    async with LocalConvex(jwks=issuer.jwks, issuer=issuer.issuer) as server:
        install_functions(server)
        yield server


async def test_query_mutation_and_action(convex: LocalConvex):
    async with ConvexHttpClient(convex.url) as client:
        assert await client.query("messages:list") == []
        doc_id = await client.mutation("messages:send", {"body": "hi"})
        assert isinstance(doc_id, str) and doc_id
        # "messages.js:list" names the same function as "messages:list".
        assert await client.query("messages.js:list") == [{"body": "hi", "author": "anonymous"}]
        assert await client.action("messages:countViaAction", {"tag": "t"}) == {
            "count": 1,
            "tag": "t",
        }
    assert convex.db.query("messages")[0]["_id"] == doc_id


async def test_int64_bytes_and_special_floats_round_trip(convex: LocalConvex):
    value = {
        "big": Int64(2**62 + 1),
        "negative": Int64(-(2**63)),
        "blob": b"\x00\xff\x10binary",
        "nan": math.nan,
        "inf": math.inf,
        "ninf": -math.inf,
        "nzero": -0.0,
        "plain": 1.5,
        "whole": 7,
        "nested": [Int64(-1), b"", {"deep": Int64(0)}],
    }
    async with ConvexHttpClient(convex.url) as client:
        for result in (
            await client.query("values:echo", {"value": value}),
            await client.mutation("values:store", {"value": value}),
        ):
            assert type(result["big"]) is Int64 and result["big"] == 2**62 + 1
            assert type(result["negative"]) is Int64 and result["negative"] == -(2**63)
            assert result["blob"] == b"\x00\xff\x10binary" and type(result["blob"]) is bytes
            assert math.isnan(result["nan"])
            assert result["inf"] == math.inf and result["ninf"] == -math.inf
            assert result["nzero"] == 0.0 and math.copysign(1.0, result["nzero"]) == -1.0
            assert result["plain"] == 1.5
            assert result["whole"] == 7 and type(result["whole"]) is not Int64
            assert result["nested"] == [Int64(-1), b"", {"deep": Int64(0)}]
            assert type(result["nested"][0]) is Int64
    stored = convex.db.query("values")[0]["value"]
    assert type(stored["big"]) is Int64


async def test_convex_error_carries_data_and_log_lines(convex: LocalConvex):
    async with ConvexHttpClient(convex.url) as client:
        with pytest.raises(ConvexError) as caught:
            await client.mutation("messages:reject", {"reason": "because"})
    err = caught.value
    assert err.message == "rejected"
    assert err.data == {"code": "NOPE", "n": 3}
    assert type(err.data["n"]) is Int64
    assert err.log_lines == ["[LOG] rejecting because"]
    assert err.retryable is False


async def test_uncaught_function_error_is_a_convex_error_without_data(convex: LocalConvex):
    async with ConvexHttpClient(convex.url) as client:
        with pytest.raises(ConvexError) as caught:
            await client.query("broken:query")
        with pytest.raises(ConvexError) as missing:
            await client.query("nope:missing")
    assert caught.value.data is None
    assert "Uncaught ValueError: boom" in caught.value.message
    assert "nope:missing" in missing.value.message


async def test_the_function_sees_the_callers_identity(convex: LocalConvex, issuer: TestTokenIssuer):
    token = issuer.mint("user-1", email="ada@example.com", name="Ada")
    async with ConvexHttpClient(convex.url, token=token) as client:
        me = await client.query("users:whoami")
        assert me["subject"] == "user-1"
        assert me["email"] == "ada@example.com" and me["name"] == "Ada"
        assert me["tokenIdentifier"] == f"{issuer.issuer}|user-1"
        await client.mutation("messages:send", {"body": "signed"})

        client.set_auth(issuer.mint("user-2"))
        assert (await client.query("users:whoami"))["subject"] == "user-2"
        client.clear_auth()
        assert await client.query("users:whoami") is None
        client.set_auth(token)
        assert (await client.query("users:whoami"))["subject"] == "user-1"
        client.set_auth(None)
        assert await client.query("users:whoami") is None
    assert convex.db.query("messages")[0]["author"] == "user-1"


async def test_a_forged_token_is_rejected_without_leaking_it(
    convex: LocalConvex, issuer: TestTokenIssuer
):
    # Same issuer, key id and claims, signed by a key the deployment does not trust.
    forged = TestTokenIssuer(issuer=issuer.issuer, kid=issuer.kid).mint("user-1")
    signature = forged.rsplit(".", 1)[1]
    async with ConvexHttpClient(convex.url, token=forged) as client:
        with pytest.raises(AuthRejectedError) as caught:
            await client.query("users:whoami")
        with pytest.raises(AuthRejectedError):
            await client.mutation("messages:send", {"body": "x"})
    err = caught.value
    assert "users:whoami" in str(err) and "401" in str(err)
    assert "Unauthenticated" in str(err)  # the server's code is passed on
    assert err.retryable is False
    for text in (str(err), repr(err), repr(client)):
        assert forged not in text and signature not in text
    assert err.__cause__ is None and err.__context__ is None
    assert convex.db.query("messages") == []


async def test_an_anonymous_call_can_be_refused_by_the_function(
    convex: LocalConvex, issuer: TestTokenIssuer
):
    async with ConvexHttpClient(convex.url) as client:
        with pytest.raises(ConvexError) as caught:
            await client.mutation("notes:add", {"text": "hello"})
        assert caught.value.data == {"code": "UNAUTHENTICATED"}
        assert not isinstance(caught.value, AuthRejectedError)
        client.set_auth(issuer.mint("user-1"))
        await client.mutation("notes:add", {"text": "hello"})
    assert [n["text"] for n in convex.db.query("notes")] == ["hello"]


async def test_concurrent_mutations_are_applied_in_call_order(convex: LocalConvex):
    async with ConvexHttpClient(convex.url) as client:
        with anyio.fail_after(DEADLINE):
            positions = await asyncio.gather(
                *(client.mutation("log:append", {"i": i}) for i in range(20))
            )
        assert positions == list(range(1, 21))
        assert await client.query("log:list") == list(range(20))


async def test_a_borrowed_session_is_left_open(convex: LocalConvex):
    async with aiohttp.ClientSession(cookie_jar=aiohttp.DummyCookieJar()) as session:
        async with ConvexHttpClient(convex.url, session=session) as client:
            await client.mutation("messages:send", {"body": "one"})
        assert not session.closed
        async with ConvexHttpClient(convex.url, session=session) as other:
            assert len(await other.query("messages:list")) == 1
        assert not session.closed
        with pytest.raises(ClientClosedError):
            await client.query("messages:list")


async def test_an_owned_session_is_created_lazily_and_closed(convex: LocalConvex):
    client = ConvexHttpClient(convex.url)
    assert client._session is None  # the constructor did no I/O
    assert await client.query("messages:list") == []
    owned = client._session
    assert owned is not None and not owned.closed
    await client.aclose()
    assert owned.closed
    await client.aclose()  # idempotent
    with pytest.raises(ClientClosedError):
        await client.query("messages:list")
    with pytest.raises(ClientClosedError):
        await client.mutation("messages:send", {"body": "late"})
    with pytest.raises(ClientClosedError):
        async with client:
            pass
    assert convex.db.query("messages") == []


async def test_debug_log_names_function_status_and_time_only(
    convex: LocalConvex, issuer: TestTokenIssuer, caplog: pytest.LogCaptureFixture
):
    token = issuer.mint("user-1")
    secret_arg = "do-not-log-this-argument"
    with caplog.at_level(logging.DEBUG, logger="dartvex_auth_better.convex"):
        async with ConvexHttpClient(convex.url, token=token) as client:
            await client.mutation("messages:send", {"body": secret_arg})
    records = [r for r in caplog.records if r.name == "dartvex_auth_better.convex"]
    assert records
    text = "\n".join(r.getMessage() for r in records)
    assert "messages:send" in text and "200" in text and " ms" in text
    assert secret_arg not in text
    assert token not in text and token.rsplit(".", 1)[1] not in text


# -- a scripted server for answers LocalConvex never gives -------------------------------


@dataclass
class Recorded:
    kind: str
    headers: dict[str, str]
    body: Any
    transport: asyncio.Transport | None

    @property
    def arg(self) -> Any:
        return self.body["args"][0].get("i")


Respond = Callable[[Recorded], Awaitable[web.StreamResponse]]


class FakeConvex:
    """Records every POST /api/{kind} and answers with ``respond``."""

    def __init__(self, respond: Respond) -> None:
        self.respond = respond
        self.requests: list[Recorded] = []
        self.url = ""
        # Held handlers wait on this; only teardown sets it, so they can finish.
        self.teardown = asyncio.Event()

    async def handle(self, request: web.Request) -> web.StreamResponse:
        raw = await request.read()
        recorded = Recorded(
            request.match_info["kind"], dict(request.headers), json.loads(raw), request.transport
        )
        self.requests.append(recorded)
        return await self.respond(recorded)

    async def hold(self) -> web.StreamResponse:
        await self.teardown.wait()
        return web.Response(status=599)


@asynccontextmanager
async def fake_convex(respond: Respond | None = None) -> AsyncIterator[FakeConvex]:
    fake = FakeConvex(respond or (lambda _: success(None)))
    app = web.Application()
    app.router.add_post("/api/{kind}", fake.handle)
    runner = web.AppRunner(app, handle_signals=False, access_log=None, shutdown_timeout=1.0)
    await runner.setup()
    try:
        site = web.TCPSite(runner, "127.0.0.1", 0)
        await site.start()
        fake.url = f"http://127.0.0.1:{runner.addresses[0][1]}"
        yield fake
    finally:
        fake.teardown.set()
        await runner.cleanup()


async def reply(payload: Any, status: int = 200) -> web.StreamResponse:
    return web.Response(body=json.dumps(payload), status=status, content_type="application/json")


def success(value: Any) -> Awaitable[web.StreamResponse]:
    return reply({"status": "success", "value": value})


def always(response: Callable[[], Awaitable[web.StreamResponse]]) -> Respond:
    async def respond(_: Recorded) -> web.StreamResponse:
        return await response()

    return respond


async def test_the_request_carries_path_format_args_and_headers():
    five = always(lambda: success({"$integer": "BQAAAAAAAAA="}))
    async with (
        fake_convex(five) as fake,
        ConvexHttpClient(fake.url, token="header.payload.sig") as client,
    ):
        assert await client.mutation("tasks.js:add", {"b": Int64(1), "a": b"\x01"}) == 5
        client.clear_auth()
        await client.query("tasks")
        await client.action("tasks:run")
    first, second, third = fake.requests
    assert [r.kind for r in fake.requests] == ["mutation", "query", "action"]
    assert first.body == {
        "path": "tasks:add",
        "format": "convex_encoded_json",
        "args": [{"a": {"$bytes": "AQ=="}, "b": {"$integer": "AQAAAAAAAAA="}}],
    }
    assert first.headers["Content-Type"] == "application/json"
    assert first.headers["Convex-Client"] == f"python-dartvex-auth-better-{__version__}"
    assert first.headers["Authorization"] == "Bearer header.payload.sig"
    assert "Authorization" not in second.headers and "Cookie" not in second.headers
    assert second.body["path"] == "tasks:default" and second.body["args"] == [{}]
    assert third.body["path"] == "tasks:run"


@pytest.mark.parametrize(
    ("status", "body", "content_type", "retryable", "described"),
    [
        (500, b"<html><body>Internal Server Error</body></html>", "text/html", True, "not JSON"),
        (502, b"", "text/plain", True, "an empty body"),
        (503, b'{"unexpected": true}', "application/json", True, "JSON object that is not"),
        (404, b"<html>Not Found</html>", "text/html", False, "not JSON"),
        (200, b"[1, 2, 3]", "application/json", False, "JSON an array"),
        (200, b"<html>captive portal</html>", "text/html", False, "not JSON"),
        (200, b'{"status": "pending"}', "application/json", False, "JSON object that is not"),
        (200, b'{"status": "success"}', "application/json", False, "without a 'value'"),
        (200, b'{"status": "error"}', "application/json", False, "without an 'errorMessage'"),
        (
            200,
            b'{"status": "success", "value": {"$float": "AAAAAAAA8D8="}}',
            "application/json",
            False,
            "invalid Convex value",
        ),
        (560, b"null", "application/json", False, "JSON null"),
    ],
)
async def test_unusable_bodies_are_protocol_errors_naming_path_and_status(
    status: int, body: bytes, content_type: str, retryable: bool, described: str
):
    async def respond(_: Recorded) -> web.StreamResponse:
        return web.Response(body=body, status=status, content_type=content_type)

    async with fake_convex(respond) as fake, ConvexHttpClient(fake.url) as client:
        with pytest.raises(ConvexHttpResponseError) as caught:
            await client.query("tasks:list")
    err = caught.value
    assert isinstance(err, ProtocolError) and isinstance(err, ConvexHttpError)
    assert f"HTTP {status}" in str(err) and "query tasks:list" in str(err)
    assert described in str(err)
    assert err.status == status and err.path == "tasks:list"
    assert err.retryable is retryable
    assert "<html" not in str(err)  # the body itself is not pasted into the message


async def test_a_560_error_body_is_a_convex_error():
    payload = {
        "status": "error",
        "errorMessage": "limit reached",
        "errorData": {"code": "LIMIT", "max": {"$integer": "BQAAAAAAAAA="}},
        "logLines": ["[LOG] checking", 42],
    }
    respond = always(lambda: reply(payload, 560))
    async with fake_convex(respond) as fake, ConvexHttpClient(fake.url) as client:
        with pytest.raises(ConvexError) as caught:
            await client.action("limits:check")
    err = caught.value
    assert err.message == "limit reached"
    assert err.data == {"code": "LIMIT", "max": Int64(5)}
    assert type(err.data["max"]) is Int64
    assert err.log_lines == ["[LOG] checking"]  # a malformed entry is dropped


async def test_a_560_success_body_is_a_value():
    respond = always(lambda: reply({"status": "success", "value": 1}, 560))
    async with fake_convex(respond) as fake, ConvexHttpClient(fake.url) as client:
        assert await client.query("x:y") == 1


@pytest.mark.parametrize(
    ("status", "retryable"), [(400, False), (404, False), (429, True), (500, True), (503, True)]
)
async def test_infrastructure_errors_carry_status_code_and_message(status: int, retryable: bool):
    body = {"code": "SomeCode", "message": "something went wrong"}
    respond = always(lambda: reply(body, status))
    async with fake_convex(respond) as fake, ConvexHttpClient(fake.url) as client:
        with pytest.raises(ConvexHttpError) as caught:
            await client.mutation("tasks:add")
    err = caught.value
    assert not isinstance(err, ProtocolError | ConvexError | AuthRejectedError)
    assert (err.status, err.code, err.server_message) == (
        status,
        "SomeCode",
        "something went wrong",
    )
    assert err.path == "tasks:add" and err.retryable is retryable
    assert f"mutation tasks:add failed with HTTP {status}: SomeCode: something went wrong" in (
        str(err)
    )


@pytest.mark.parametrize("status", [401, 403])
async def test_401_and_403_with_a_token_are_auth_rejected_without_the_token(status: int):
    token = "eyJhbGciOiJSUzI1NiJ9.eyJzdWIiOiJ1In0.c2lnbmF0dXJlLXNlY3JldA"

    async def respond(recorded: Recorded) -> web.StreamResponse:
        # A careless proxy that echoes the header back.
        echoed = recorded.headers.get("Authorization", "")
        return await reply({"code": "Unauthenticated", "message": f"bad {echoed}"}, status)

    async with fake_convex(respond) as fake, ConvexHttpClient(fake.url, token=token) as client:
        with pytest.raises(AuthRejectedError) as caught:
            await client.query("users:whoami")
        client.clear_auth()
        # Without a token there is nothing to reject: an ordinary HTTP error.
        with pytest.raises(ConvexHttpError) as anonymous:
            await client.query("users:whoami")
    err = caught.value
    assert f"HTTP {status}" in str(err) and "users:whoami" in str(err)
    assert "Unauthenticated" in str(err) and "bad Bearer" in str(err)
    assert token not in str(err) and token not in repr(err)
    assert "c2lnbmF0dXJlLXNlY3JldA" not in str(err)
    assert not isinstance(anonymous.value, AuthRejectedError)
    assert anonymous.value.status == status and anonymous.value.retryable is False


async def test_redirects_are_not_followed():
    async def respond(_: Recorded) -> web.StreamResponse:
        return web.Response(status=307, headers={"Location": "https://elsewhere.test/api/query"})

    async with fake_convex(respond) as fake, ConvexHttpClient(fake.url, token="a.b.c") as client:
        with pytest.raises(ConvexHttpError) as caught:
            await client.query("tasks:list")
    assert caught.value.status == 307 and caught.value.retryable is False
    assert "https://elsewhere.test/api/query" in str(caught.value)
    assert len(fake.requests) == 1


async def test_a_server_that_never_answers_times_out_and_frees_the_queue():
    async def respond(recorded: Recorded) -> web.StreamResponse:
        if recorded.arg == "hang":
            return await fake.hold()
        return await success(recorded.arg)

    async with fake_convex(respond) as fake, ConvexHttpClient(fake.url, timeout=0.3) as client:
        with anyio.fail_after(DEADLINE):
            with pytest.raises(RequestTimeoutError) as caught:
                await client.mutation("tasks:add", {"i": "hang"})
            # A timed-out mutation leaves the queue: the next one goes through.
            assert await client.mutation("tasks:add", {"i": "next"}) == "next"
    err = caught.value
    assert isinstance(err, TimeoutError) and isinstance(err, TransportError)
    assert err.retryable is True
    assert "tasks:add" in str(err)


async def test_a_dropped_connection_is_a_transport_error():
    async def drop(recorded: Recorded) -> web.StreamResponse:
        # Cut the TCP connection before any response is written.
        assert recorded.transport is not None
        recorded.transport.close()
        return await fake.hold()

    async with fake_convex(drop) as fake, ConvexHttpClient(fake.url) as client:
        with pytest.raises(TransportError) as caught:
            await client.query("tasks:list")
    err = caught.value
    assert type(err) is TransportError and err.retryable is True
    assert "query tasks:list" in str(err)


async def test_nothing_listening_is_a_transport_error():
    async with fake_convex() as fake:
        url = fake.url
    async with ConvexHttpClient(url) as client:
        with pytest.raises(TransportError) as caught:
            await client.query("tasks:list")
    assert type(caught.value) is TransportError and caught.value.retryable is True


async def test_mutations_go_one_at_a_time_and_skip_queue_goes_past():
    first_arrived = asyncio.Event()
    release_first = asyncio.Event()
    in_flight = 0
    most_in_flight = 0

    async def respond(recorded: Recorded) -> web.StreamResponse:
        nonlocal in_flight, most_in_flight
        if recorded.kind != "mutation" or recorded.arg == "skip":
            return await success(recorded.arg)
        in_flight += 1
        most_in_flight = max(most_in_flight, in_flight)
        try:
            if recorded.arg == 0:
                first_arrived.set()
                await release_first.wait()
            return await success(recorded.arg)
        finally:
            in_flight -= 1

    async with fake_convex(respond) as fake, ConvexHttpClient(fake.url) as client:
        with anyio.fail_after(DEADLINE):
            tasks = [
                asyncio.create_task(client.mutation("log:append", {"i": i})) for i in range(20)
            ]
            await first_arrived.wait()
            # Sent while mutation 0 is held: the other 19 are still waiting their turn.
            assert await client.mutation("log:append", {"i": "skip"}, skip_queue=True) == "skip"
            assert [r.arg for r in fake.requests] == [0, "skip"]
            # Queries and actions are not queued behind mutations either.
            assert await client.query("log:list", {"i": "q"}) == "q"
            release_first.set()
            results = await asyncio.gather(*tasks)
    assert results == list(range(20))
    mutations = [r.arg for r in fake.requests if r.kind == "mutation"]
    assert mutations == [0, "skip", *range(1, 20)]
    assert most_in_flight == 1


async def test_a_cancelled_queued_mutation_keeps_the_others_in_order():
    first_arrived = asyncio.Event()
    release_first = asyncio.Event()

    async def respond(recorded: Recorded) -> web.StreamResponse:
        if recorded.arg == 0:
            first_arrived.set()
            await release_first.wait()
        return await success(recorded.arg)

    async with fake_convex(respond) as fake, ConvexHttpClient(fake.url) as client:
        with anyio.fail_after(DEADLINE):
            tasks = [asyncio.create_task(client.mutation("m:f", {"i": i})) for i in range(5)]
            await first_arrived.wait()
            tasks[2].cancel()
            release_first.set()
            results = await asyncio.gather(*tasks, return_exceptions=True)
    assert isinstance(results[2], asyncio.CancelledError)
    assert [results[i] for i in (0, 1, 3, 4)] == [0, 1, 3, 4]
    assert [r.arg for r in fake.requests] == [0, 1, 3, 4]


async def test_aclose_fails_the_call_in_flight_and_the_queued_ones():
    arrived = asyncio.Event()

    async def respond(_: Recorded) -> web.StreamResponse:
        arrived.set()
        return await fake.hold()

    async with fake_convex(respond) as fake:
        client = ConvexHttpClient(fake.url)
        with anyio.fail_after(DEADLINE):
            in_flight = asyncio.create_task(client.mutation("m:f", {"i": 1}))
            queued = asyncio.create_task(client.mutation("m:f", {"i": 2}))
            await arrived.wait()
            await client.aclose()
            with pytest.raises(ClientClosedError):
                await in_flight
            with pytest.raises(ClientClosedError):
                await queued
    assert [r.arg for r in fake.requests] == [1]


async def test_constructor_and_set_auth_validate_without_echoing_secrets():
    with pytest.raises(ValueError, match="deployment_url"):
        ConvexHttpClient("happy-otter-123.convex.cloud")
    with pytest.raises(ValueError, match="http://"):
        ConvexHttpClient("http://example.com")
    assert ConvexHttpClient("http://example.com", allow_insecure=True).url == "http://example.com"
    with pytest.raises(ValueError, match="timeout"):
        ConvexHttpClient("https://a.convex.cloud", timeout=0)
    secret = "secret-part\nInjected: header"
    with pytest.raises(ValueError) as caught:
        ConvexHttpClient("https://a.convex.cloud", token=secret)
    assert "secret-part" not in str(caught.value)
    client = ConvexHttpClient("https://a.convex.cloud/", token="x.y.z")
    assert client.url == "https://a.convex.cloud"
    assert repr(client) == "ConvexHttpClient(url='https://a.convex.cloud', authenticated=True)"
    for bad in ("", "has space", secret):
        with pytest.raises(ValueError):
            client.set_auth(bad)
    with pytest.raises(TypeError):
        client.set_auth(b"bytes")  # type: ignore[arg-type]
    with pytest.raises(TypeError):
        await client.query("x:y", ["not", "a", "mapping"])  # type: ignore[arg-type]
    assert client._session is None  # nothing above opened a connection
    await client.aclose()
