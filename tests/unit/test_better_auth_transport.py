"""BetterAuthClient: error statuses, transport failures, lifecycle, URLs, headers, cookies.

Against a scripted aiohttp server on 127.0.0.1 (tests/better_auth_fakes.py), over a real
socket: the shapes a proxy or a struggling server produces, which the real Better Auth
server does not produce on demand.
"""

from __future__ import annotations

import email.utils
import re
import socket
import time
from collections.abc import Callable
from typing import Any
from urllib.parse import quote

import aiohttp
import anyio
import pytest
from aiohttp import web
from aiohttp.abc import AbstractResolver, ResolveResult
from yarl import URL

from dartvex_auth_better import (
    BetterAuthClient,
    BetterAuthError,
    BetterAuthResponseError,
    ClientClosedError,
    InvalidCredentialsError,
    InvalidTokenError,
    RateLimitedError,
    RequestTimeoutError,
    SessionExpiredError,
    TransportError,
    UserAlreadyExistsError,
    __version__,
)
from dartvex_auth_better.better_auth._client import MAX_HEADER_LINE, _scrub
from tests.better_auth_fakes import (
    SECRETS,
    FakeBetterAuth,
    Reply,
    assert_no_secrets,
    fake_better_auth,
    make_jwt,
    no_secrets_in_logs,
    raw_http_server,
    secret,
)

__all__ = ["fake_better_auth", "no_secrets_in_logs"]  # fixtures used by name

pytestmark = pytest.mark.anyio

SIGN_IN = "/api/auth/sign-in/email"
SIGN_OUT = "/api/auth/sign-out"
GET_SESSION = "/api/auth/get-session"
CONVEX_TOKEN = "/api/auth/convex/token"
REQUEST_RESET = "/api/auth/request-password-reset"
RESET_PASSWORD = "/api/auth/reset-password"
MAGIC_LINK = "/api/auth/sign-in/magic-link"
VERIFY = "/api/auth/magic-link/verify"

PASSWORD = secret("transport test password 5%x")
TOKEN = secret("sessionTokenForTransportTests0001.c2lnbmF0dXJlLXNpZ25hdHVyZQ==")
JWT = secret(make_jwt({"sub": "user-9", "email": "tess@example.com", "name": "Tess"}))
LINK_TOKEN = secret("magicLinkTokenForTransportTest01")
RESET_TOKEN = secret("resetTokenForTransportTests00001")
NEW_PASSWORD = secret("transport new password 6&y")
USER = {"id": "user-9", "email": "tess@example.com", "name": "Tess"}
SIGNED_IN = Reply(
    json={"token": TOKEN, "user": USER},
    headers=[
        ("set-auth-token", TOKEN),
        ("Set-Cookie", f"better-auth.session_token={TOKEN}; Max-Age=604800; Path=/; HttpOnly"),
        ("Set-Cookie", f"better-auth.convex_jwt={JWT}; Max-Age=900; Path=/; HttpOnly"),
    ],
)


def client(fake: FakeBetterAuth, **options: Any) -> BetterAuthClient:
    return BetterAuthClient(fake.url, **options)


def free_port() -> int:
    """A port on 127.0.0.1 with nothing listening (bound, then released)."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
    return port


# ------------------------------------------------------------------ statuses


@pytest.mark.parametrize(
    ("reply", "error_type", "retryable", "expected"),
    [
        (
            Reply(status=500, json={"message": "Internal error", "code": "INTERNAL"}),
            BetterAuthError,
            True,
            "failed with HTTP 500: Internal error (INTERNAL)",
        ),
        (
            Reply(
                status=502, body="<html><h1>502 Bad Gateway</h1></html>", content_type="text/html"
            ),
            BetterAuthError,
            True,
            "HTTP 502 and a body that is not JSON (content-type text/html), perhaps from a proxy",
        ),
        (Reply(status=503, body=""), BetterAuthError, True, "failed with HTTP 503"),
        (
            Reply(status=400, json={"message": "Password too short", "code": "PASSWORD_TOO_SHORT"}),
            BetterAuthError,
            False,
            "Password too short (PASSWORD_TOO_SHORT)",
        ),
        (
            Reply(status=401, json={"message": "Invalid", "code": "INVALID_EMAIL_OR_PASSWORD"}),
            InvalidCredentialsError,
            False,
            "HTTP 401",
        ),
        (
            Reply(status=422, json={"code": "USER_ALREADY_EXISTS_USE_ANOTHER_EMAIL"}),
            UserAlreadyExistsError,
            False,
            "HTTP 422: USER_ALREADY_EXISTS_USE_ANOTHER_EMAIL",
        ),
        (
            Reply(status=400, json={"message": "Invalid token", "code": "INVALID_TOKEN"}),
            InvalidTokenError,
            False,
            "Invalid token",
        ),
        (
            Reply(status=403, json={"message": "Invalid origin", "code": "INVALID_ORIGIN"}),
            BetterAuthError,
            False,
            "pass origin= an origin the server trusts",
        ),
        (Reply(status=418, json={"teapot": True}), BetterAuthError, False, "without an error"),
    ],
    ids=["500", "502-html", "503-empty", "400", "401", "422", "400-token", "403-origin", "418"],
)
async def test_error_statuses_are_typed(fake_better_auth, reply, error_type, retryable, expected):
    fake_better_auth.on("POST", SIGN_IN, reply)
    async with client(fake_better_auth) as auth:
        with pytest.raises(error_type) as caught:
            await auth.sign_in("tess@example.com", PASSWORD)
    err = caught.value
    assert type(err) is error_type
    assert expected in str(err) and SIGN_IN in str(err)
    assert (err.status, err.endpoint, err.retryable) == (reply.status, SIGN_IN, retryable)
    if isinstance(reply.json, dict):
        assert err.code == reply.json.get("code")
        assert err.server_message == reply.json.get("message")
    assert "<html>" not in str(err)
    assert_no_secrets(err)


@pytest.mark.parametrize(
    ("call", "path", "method", "hint"),
    [
        (lambda a: a.sign_in("t@example.com", PASSWORD), SIGN_IN, "POST", "emailAndPassword"),
        (lambda a: a.forgot_password("t@example.com"), REQUEST_RESET, "POST", "sendResetPassword"),
        (lambda a: a.send_magic_link("t@example.com"), MAGIC_LINK, "POST", "magicLink() plugin"),
        (lambda a: a.verify_magic_link(LINK_TOKEN), VERIFY, "GET", "magicLink() plugin"),
        (lambda a: a.convex_token(TOKEN), CONVEX_TOKEN, "GET", "convex() plugin"),
        (lambda a: a.get_session(TOKEN), GET_SESSION, "GET", ".convex.site host"),
    ],
    ids=["sign-in", "reset", "magic-link", "verify", "convex-token", "get-session"],
)
async def test_an_empty_404_says_the_route_was_not_found(
    fake_better_auth, call, path, method, hint
):
    # The fake answers unscripted routes with an empty 404, as Better Auth does.
    async with client(fake_better_auth) as auth:
        with pytest.raises(BetterAuthError) as caught:
            await call(auth)
    err = caught.value
    assert f"{path} failed with HTTP 404: the route was not found at {auth.site_url}" in str(err)
    assert hint in str(err)
    # A local backend: Convex answers on :3210, its HTTP actions (Better Auth) on :3211.
    assert "HTTP actions on port 3211" in str(err) and "site_url=" in str(err)
    assert (err.status, err.code, err.retryable) == (404, None, False)
    assert [(r.method, r.path) for r in fake_better_auth.received] == [(method, path)]


async def test_a_404_with_a_better_auth_code_is_not_a_missing_route(fake_better_auth):
    fake_better_auth.on(
        "POST", SIGN_IN, Reply(status=404, json={"message": "User not found", "code": "NOPE"})
    )
    async with client(fake_better_auth) as auth:
        with pytest.raises(BetterAuthError) as caught:
            await auth.sign_in("t@example.com", PASSWORD)
    assert "route was not found" not in str(caught.value)
    assert caught.value.code == "NOPE"


async def test_a_redirect_outside_verify_is_an_error_and_not_followed(fake_better_auth):
    fake_better_auth.on(
        "POST",
        SIGN_IN,
        Reply(status=301, headers=[("Location", f"{fake_better_auth.url}/moved?ref=abc")]),
    )
    fake_better_auth.on("POST", "/moved", SIGNED_IN)
    async with client(fake_better_auth) as auth:
        with pytest.raises(BetterAuthError) as caught:
            await auth.sign_in("t@example.com", PASSWORD)
    assert f"redirects to {fake_better_auth.url}/moved, check site_url" in str(caught.value)
    assert "ref=abc" not in str(caught.value) and caught.value.status == 301
    assert fake_better_auth.requests("/moved") == []


async def test_a_redirect_does_not_show_a_token_in_its_path(fake_better_auth):
    # Some front ends answer a reset with a redirect to /reset/<token>: the path is shown
    # (it tells a wrong URL apart), the token in it is not.
    location = f"{fake_better_auth.url}/reset/{RESET_TOKEN}?token={RESET_TOKEN}"
    fake_better_auth.on("POST", RESET_PASSWORD, Reply(status=302, headers=[("Location", location)]))
    async with client(fake_better_auth) as auth:
        with pytest.raises(BetterAuthError) as caught:
            await auth.reset_password(RESET_TOKEN, NEW_PASSWORD)
    err = caught.value
    assert f"redirects to {fake_better_auth.url}/reset/<redacted>, check site_url" in str(err)
    assert (err.status, err.endpoint, err.retryable) == (302, RESET_PASSWORD, False)
    assert_no_secrets(err)
    assert len(fake_better_auth.received) == 1  # not followed


# ------------------------------------------------------------------ 429


def http_date(seconds_from_now: float) -> str:
    return email.utils.formatdate(time.time() + seconds_from_now, usegmt=True)


@pytest.mark.parametrize(
    ("headers", "low", "high"),
    [
        ([("Retry-After", "7")], 7, 7),
        ([("X-Retry-After", "10")], 10, 10),  # Better Auth's own header
        ([("Retry-After", "2.5"), ("X-Retry-After", "10")], 2.5, 2.5),
        ([("Retry-After", "date+30")], 20, 30),
        ([("Retry-After", "date-30")], 0, 0),
        ([("Retry-After", "soon")], None, None),
        ([("Retry-After", "inf")], None, None),
        ([], None, None),
    ],
    ids=["seconds", "x-retry-after", "both", "date", "past-date", "garbage", "inf", "none"],
)
async def test_429_is_rate_limited_with_the_delay(fake_better_auth, headers, low, high):
    # Dates are made now, not at collection time, which may be long before.
    headers = [
        (name, http_date(float(value[4:])) if value.startswith("date") else value)
        for name, value in headers
    ]
    # Better Auth's 429: a JSON body labelled text/plain.
    body = '{"message":"Too many requests. Please try again later."}'
    reply = Reply(status=429, body=body, content_type="text/plain", headers=headers)
    fake_better_auth.on("POST", SIGN_IN, reply)
    async with client(fake_better_auth) as auth:
        with pytest.raises(RateLimitedError) as caught:
            await auth.sign_in("t@example.com", PASSWORD)
    err = caught.value
    assert err.retryable and err.status == 429 and err.endpoint == SIGN_IN
    assert err.server_message == "Too many requests. Please try again later."
    if low is None:
        assert err.retry_after is None
    else:
        assert err.retry_after is not None and low <= err.retry_after <= high
        assert f"retry after {err.retry_after:g} s" in str(err)


@pytest.mark.parametrize("path", [GET_SESSION, CONVEX_TOKEN])
async def test_429_from_the_session_endpoints_is_not_a_sign_out(fake_better_auth, path):
    fake_better_auth.on("GET", path, Reply(status=429, headers=[("Retry-After", "3")]))
    async with client(fake_better_auth) as auth:
        with pytest.raises(RateLimitedError) as caught:
            if path == GET_SESSION:
                await auth.get_session(TOKEN)
            else:
                await auth.convex_token(TOKEN)
    assert caught.value.retry_after == 3 and not isinstance(caught.value, SessionExpiredError)


# ------------------------------------------------------------------ transport


async def test_a_server_that_never_answers_times_out(fake_better_auth):
    arrived = anyio.Event()

    async def hang(request: web.Request) -> web.StreamResponse:
        arrived.set()
        await fake_better_auth.release.wait()  # set only when the fake server stops
        return web.Response(status=500)

    fake_better_auth.on("GET", GET_SESSION, hang)
    # Long enough for connecting and dispatching on a loaded machine, so that the time
    # runs out while the handler hangs (checked by `arrived`).
    async with client(fake_better_auth, timeout=0.5) as auth:
        with anyio.fail_after(10), pytest.raises(RequestTimeoutError) as caught:
            await auth.get_session(TOKEN)
    assert arrived.is_set()
    err = caught.value
    assert isinstance(err, TimeoutError) and isinstance(err, TransportError)
    assert err.retryable and GET_SESSION in str(err) and "0.5 s" in str(err)
    assert err.__context__ is None and err.__cause__ is None
    assert_no_secrets(err)


async def test_connection_refused_is_a_retryable_transport_error():
    url = f"http://127.0.0.1:{free_port()}"
    async with BetterAuthClient(url) as auth:
        with pytest.raises(TransportError) as caught:
            await auth.verify_magic_link(LINK_TOKEN)
    err = caught.value
    assert type(err) is TransportError and err.retryable
    assert f"could not reach Better Auth at {url} for {VERIFY}" in str(err)
    assert "ClientConnectorError" in str(err)
    assert err.__context__ is None  # aiohttp's exception holds the request's headers
    assert_no_secrets(err)


async def test_a_connection_dropped_mid_answer_is_a_transport_error(fake_better_auth):
    async def drop(request: web.Request) -> web.StreamResponse:
        response = web.StreamResponse(status=200)
        response.content_length = 1000
        await response.prepare(request)
        await response.write(b'{"token": "')
        assert request.transport is not None
        request.transport.close()
        return response

    fake_better_auth.on("POST", SIGN_IN, drop)
    async with client(fake_better_auth) as auth:
        with pytest.raises(TransportError) as caught:
            await auth.sign_in("t@example.com", PASSWORD)
    assert type(caught.value) is TransportError and caught.value.retryable
    assert SIGN_IN in str(caught.value)


def signed_in_with_jwt(jwt: str) -> Reply:
    """Better Auth's sign-in answer, its convex_jwt cookie carrying *jwt*."""
    return Reply(
        json={"token": TOKEN, "user": USER},
        headers=[
            ("set-auth-token", TOKEN),
            ("Set-Cookie", f"better-auth.session_token={TOKEN}; Path=/; HttpOnly"),
            ("Set-Cookie", f"better-auth.convex_jwt={jwt}; Max-Age=900; Path=/; HttpOnly"),
        ],
    )


def jwt_of_about(size: int) -> str:
    """A JWT of at least *size* characters: the convex plugin puts the user's name in it."""
    return secret(make_jwt({"sub": "user-9", "name": "n" * (size * 3 // 4)}))


def assert_quotes_no_header(err: BaseException) -> None:
    text = f"{err} {err!r}"
    assert "better-auth" not in text and "eyJ" not in text and "Set-Cookie" not in text, text
    assert err.__context__ is None and err.__cause__ is None  # aiohttp's text is not kept
    assert_no_secrets(err)


async def test_a_set_cookie_over_aiohttps_default_limit_is_read(fake_better_auth):
    # A long user name makes the convex_jwt cookie longer than aiohttp's 8,190 bytes.
    jwt = jwt_of_about(40_000)
    fake_better_auth.on("POST", SIGN_IN, signed_in_with_jwt(jwt))
    async with client(fake_better_auth) as auth:
        session = await auth.sign_in("t@example.com", PASSWORD)
    assert session.token == jwt and session.session_token == TOKEN
    assert fake_better_auth.requests(CONVEX_TOKEN) == []  # the JWT came in the cookie


async def test_a_header_over_the_limit_is_a_response_error_that_quotes_nothing(
    fake_better_auth,
):
    fake_better_auth.on("POST", SIGN_IN, signed_in_with_jwt(jwt_of_about(MAX_HEADER_LINE + 1)))
    async with client(fake_better_auth) as auth:
        with pytest.raises(BetterAuthResponseError) as caught:
            await auth.sign_in("t@example.com", PASSWORD)
        # The server answered: it is no transport failure, and a retry would not help.
        err = caught.value
        assert not isinstance(err, TransportError) and not err.retryable
        assert (err.endpoint, err.status) == (SIGN_IN, None)
        assert str(err) == (
            f"Better Auth {SIGN_IN} answered with a response the client could not read: "
            f"a status or header line over the {MAX_HEADER_LINE}-byte limit (LineTooLong). "
            "The server did answer, so the request may have taken effect"
        )
        assert_quotes_no_header(err)
        # The connection was dropped, not spoiled: the next call gets its answer.
        fake_better_auth.on("POST", SIGN_IN, SIGNED_IN)
        assert (await auth.sign_in("t@example.com", PASSWORD)).token == JWT


async def test_a_borrowed_session_keeps_its_own_header_limits(fake_better_auth):
    fake_better_auth.on("POST", SIGN_IN, signed_in_with_jwt(jwt_of_about(20_000)))
    async with aiohttp.ClientSession() as http, client(fake_better_auth, session=http) as auth:
        with pytest.raises(BetterAuthResponseError) as caught:
            await auth.sign_in("t@example.com", PASSWORD)
    assert "the limit of the aiohttp session passed in" in str(caught.value)
    assert "max_field_size=" in str(caught.value)
    assert_quotes_no_header(caught.value)


@pytest.mark.parametrize(
    ("head", "kinds"),
    [
        # Named by aiohttp's C parser, or by its pure-Python one (AIOHTTP_NO_EXTENSIONS).
        (
            b"HTTP/1.1 200 OK\r\nset-auth-token " + TOKEN.encode() + b"\r\n",
            {"BadHttpMessage", "InvalidHeader"},
        ),
        (b"HTTP/1.1 2OO " + TOKEN.encode() + b"\r\n", {"BadStatusLine"}),
    ],
)
async def test_a_malformed_answer_is_a_response_error_that_quotes_nothing(head, kinds):
    answer = head + b"Content-Length: 2\r\nConnection: close\r\n\r\n{}"
    async with raw_http_server(answer) as url, BetterAuthClient(url) as auth:
        with pytest.raises(BetterAuthResponseError) as caught:
            await auth.get_session(TOKEN)
    err = caught.value
    assert not err.retryable and (err.endpoint, err.status) == (GET_SESSION, None)
    found = re.search(r"could not read: a malformed status line or header \((\w+)\)\.", str(err))
    assert found and found.group(1) in kinds, str(err)
    assert_quotes_no_header(err)


class HangingResolver(AbstractResolver):
    """A name server that never answers: connecting cannot finish."""

    def __init__(self) -> None:
        self.asked = anyio.Event()
        self.answer = anyio.Event()  # never set: the lookup is cancelled by the timeout

    async def resolve(
        self, host: str, port: int = 0, family: socket.AddressFamily = socket.AF_INET
    ) -> list[ResolveResult]:
        self.asked.set()
        await self.answer.wait()
        raise AssertionError("the hanging resolver was released")

    async def close(self) -> None:
        pass


async def test_connecting_is_bounded_by_connect_timeout(fake_better_auth):
    resolver = HangingResolver()
    # No DNS cache: aiohttp awaits the resolver directly, so the timeout cancels it.
    connector = aiohttp.TCPConnector(resolver=resolver, use_dns_cache=False)
    async with (
        aiohttp.ClientSession(connector=connector) as http,
        BetterAuthClient(
            f"http://auth.invalid:{fake_better_auth.port}",
            allow_insecure=True,
            session=http,
            timeout=60,
            connect_timeout=0.2,
        ) as auth,
    ):
        # Well below the total timeout: only connect_timeout can end the call in time.
        with anyio.fail_after(30), pytest.raises(RequestTimeoutError) as caught:
            await auth.get_session(TOKEN)
    assert resolver.asked.is_set() and fake_better_auth.received == []
    err = caught.value
    assert isinstance(err, TimeoutError) and err.retryable
    assert "could not connect to Better Auth at http://auth.invalid:" in str(err)
    assert f"for {GET_SESSION} within connect_timeout (0.2 s)" in str(err)
    assert err.__context__ is None and err.__cause__ is None
    assert_no_secrets(err)


async def test_the_fake_server_registers_what_it_receives_and_hands_out(fake_better_auth):
    # tests/conftest.py checks every log record against these, so that the whole suite
    # is covered even where a test never called secret().
    unregistered_password = "a password only the fake server saw 7?"
    handed_out = "tokenOnlyTheFakeHandedOut0000001"
    fake_better_auth.on(
        "POST",
        SIGN_IN,
        Reply(json={"token": handed_out, "user": USER}, headers=[("set-auth-token", handed_out)]),
    )
    fake_better_auth.on("GET", CONVEX_TOKEN, Reply(json={"token": JWT}))
    async with client(fake_better_auth) as auth:
        await auth.sign_in("t@example.com", unregistered_password)
    assert unregistered_password in SECRETS and handed_out in SECRETS


def test_the_suite_log_check_finds_secrets_and_token_shapes():
    from tests.conftest import _Chunk, _leaks

    unregistered_jwt = make_jwt({"sub": "nobody-registered-this", "iat": 7})
    signed = "A1b2C3d4E5f6G7h8I9j0K1l2M3n4O5p6." + "x/Y+" * 10 + "abc="
    texts = [
        "dartvex_auth_better.better_auth DEBUG GET /api/auth/get-session -> HTTP 200 in 3 ms",
        f"dartvex_auth_better.auth DEBUG signed in (session <…{TOKEN[-4:]}>)",
        f"dartvex_auth_better.x DEBUG password {PASSWORD}",
        f"dartvex_auth_better.x DEBUG token {unregistered_jwt}",
        f"dartvex_auth_better.x DEBUG cookie {quote(signed, safe='')}",
    ]
    found = _leaks(_Chunk("a test", texts), shapes=True)
    assert len(found) == 3, found
    assert [("registered" in f, "token-shaped" in f) for f in found] == [
        (True, False),
        (False, True),
        (False, True),
    ]
    for text in found:  # the failure itself must not show the secret
        assert PASSWORD not in text and unregistered_jwt not in text and signed not in text
    assert _leaks(_Chunk("a clean test", texts[:2]), shapes=True) == []


def test_transport_texts_are_scrubbed_of_the_request_secrets():
    text = f"Cannot fetch http://h/api/auth/magic-link/verify?token={LINK_TOKEN}"
    assert _scrub(text, [LINK_TOKEN], min_length=1) == (
        "Cannot fetch http://h/api/auth/magic-link/verify?token=<redacted>"
    )
    assert _scrub("a+b c%2Bd", ["a+b c"], min_length=1) == "<redacted>%2Bd"
    assert _scrub("x a%2Bb%20c", ["a+b c"], min_length=1) == "x <redacted>"


async def test_a_password_echoed_by_the_server_is_scrubbed(fake_better_auth):
    echo = {"message": f"rejected password {PASSWORD!r} from you", "code": "VALIDATION_ERROR"}
    fake_better_auth.on("POST", SIGN_IN, Reply(status=400, json=echo))
    async with client(fake_better_auth) as auth:
        with pytest.raises(BetterAuthError) as caught:
            await auth.sign_in("t@example.com", PASSWORD)
    assert caught.value.server_message == "rejected password '<redacted>' from you"
    assert_no_secrets(caught.value)


async def test_short_secrets_do_not_garble_server_messages(fake_better_auth):
    # Scrubbing a 5-letter password out of "Password too short" would garble it; no token
    # is that short, and Better Auth refuses such a password before using it.
    too_short = {"message": "Password too short", "code": "PASSWORD_TOO_SHORT"}
    fake_better_auth.on("POST", SIGN_IN, Reply(status=400, json=too_short))
    async with client(fake_better_auth) as auth:
        with pytest.raises(BetterAuthError) as caught:
            await auth.sign_in("t@example.com", "short")
    assert caught.value.server_message == "Password too short"


# ------------------------------------------------------------------ lifecycle


async def test_one_connection_serves_a_burst_of_calls(fake_better_auth):
    fake_better_auth.on("POST", SIGN_IN, SIGNED_IN)
    fake_better_auth.on("GET", GET_SESSION, Reply(json={"session": {"id": "s"}, "user": USER}))
    fake_better_auth.on("GET", CONVEX_TOKEN, Reply(json={"token": JWT}))
    fake_better_auth.on("POST", SIGN_OUT, Reply(json={"success": True}))
    fake_better_auth.on("POST", REQUEST_RESET, Reply(json={"status": True}))
    async with client(fake_better_auth) as auth:
        session = await auth.sign_in("tess@example.com", PASSWORD)
        assert await auth.get_session(session.session_token) is not None
        assert await auth.convex_token(session.session_token) == JWT
        await auth.forgot_password("tess@example.com")
        await auth.sign_out(session.session_token)
    received = fake_better_auth.received
    assert len(received) == 6  # get_session made a /convex/token call of its own
    assert len({r.peer for r in received}) == 1
    assert all(r.path.startswith("/api/auth/") for r in received)
    assert {r.headers["User-Agent"] for r in received} == {f"dartvex-auth-better/{__version__}"}


async def test_an_owned_session_is_closed_and_the_client_refuses_further_calls(fake_better_auth):
    fake_better_auth.on("POST", SIGN_OUT, Reply(json={"success": True}))
    auth = client(fake_better_auth)
    assert auth._session is None  # created on first use
    async with auth:
        await auth.sign_out(TOKEN)
        http = auth._session
        assert http is not None and not http.closed
    assert http.closed and auth.closed
    await auth.aclose()  # idempotent
    with pytest.raises(ClientClosedError):
        await auth.sign_out(TOKEN)
    with pytest.raises(ClientClosedError):
        async with auth:
            pass
    assert len(fake_better_auth.received) == 1


async def test_a_borrowed_session_is_never_closed(fake_better_auth):
    fake_better_auth.on("POST", SIGN_OUT, Reply(json={"success": True}))
    async with aiohttp.ClientSession() as http:
        async with client(fake_better_auth, session=http) as auth:
            await auth.sign_out(TOKEN)
        assert not http.closed
        async with http.post(f"{fake_better_auth.url}{SIGN_OUT}") as response:
            assert response.status == 200  # still usable by its owner
    # The caller's session keeps its own User-Agent.
    assert "dartvex" not in fake_better_auth.received[0].headers["User-Agent"]
    async with client(fake_better_auth, session=http) as auth:
        with pytest.raises(ClientClosedError, match="aiohttp session"):
            await auth.sign_out(TOKEN)


async def test_a_borrowed_session_that_raises_for_status_still_gives_typed_errors(
    fake_better_auth,
):
    wrong = {"message": "Invalid email or password", "code": "INVALID_EMAIL_OR_PASSWORD"}
    fake_better_auth.on("POST", SIGN_IN, Reply(status=401, json=wrong))
    async with (
        aiohttp.ClientSession(raise_for_status=True) as http,
        client(fake_better_auth, session=http) as auth,
    ):
        with pytest.raises(InvalidCredentialsError):
            await auth.sign_in("t@example.com", PASSWORD)


async def test_closing_the_client_ends_a_call_in_flight(fake_better_auth):
    arrived = anyio.Event()

    async def hang(request: web.Request) -> web.StreamResponse:
        arrived.set()
        await fake_better_auth.release.wait()
        return web.Response(status=500)

    fake_better_auth.on("GET", CONVEX_TOKEN, hang)
    outcome: list[BaseException] = []
    auth = client(fake_better_auth)

    async def call() -> None:
        try:
            await auth.convex_token(TOKEN)
        except Exception as exc:
            outcome.append(exc)

    with anyio.fail_after(10):
        async with anyio.create_task_group() as tg:
            tg.start_soon(call)
            await arrived.wait()
            await auth.aclose()
    [err] = outcome
    assert isinstance(err, ClientClosedError) and CONVEX_TOKEN in str(err)


# ------------------------------------------------------------------ origin and cookies


@pytest.mark.parametrize(
    ("origin", "expected"),
    [(True, "site"), ("https://app.example.com/", "https://app.example.com"), (False, None)],
    ids=["default", "custom", "none"],
)
async def test_the_origin_header(fake_better_auth, origin, expected):
    fake_better_auth.on("POST", SIGN_OUT, Reply(json={"success": True}))
    async with client(fake_better_auth, origin=origin) as auth:
        await auth.sign_out(TOKEN)
    if expected == "site":
        expected = fake_better_auth.url
    assert auth.origin == expected
    assert fake_better_auth.received[0].headers.get("Origin") == expected


@pytest.mark.parametrize(
    ("origin", "error_type"),
    [
        ("https://app.example.com/login", ValueError),
        ("app.example.com", ValueError),
        (1, TypeError),
    ],
)
def test_a_malformed_origin_is_refused(origin, error_type):
    with pytest.raises(error_type, match="origin"):
        BetterAuthClient("https://a.convex.cloud", origin=origin)


async def test_cookies_set_by_auth_answers_do_not_stay_in_a_borrowed_jar(fake_better_auth):
    # A jar that keeps cookies for IP hosts (aiohttp's default jar would not, for 127.0.0.1;
    # it would on a real *.convex.site).
    fake_better_auth.on("POST", SIGN_IN, SIGNED_IN)
    fake_better_auth.on("POST", SIGN_OUT, Reply(json={"success": True}))
    jar = aiohttp.CookieJar(unsafe=True)
    jar.update_cookies({"theme": "dark"}, URL(fake_better_auth.url))
    jar.update_cookies({"better-auth.session_token": "elsewhere"}, URL("http://example.org/"))
    async with (
        aiohttp.ClientSession(cookie_jar=jar) as http,
        client(fake_better_auth, session=http) as auth,
    ):
        session = await auth.sign_in("tess@example.com", PASSWORD)
        await auth.sign_out(session.session_token)
    kept = sorted((m["domain"], m.key, m.value) for m in jar)
    assert kept == [
        ("127.0.0.1", "theme", "dark"),
        ("example.org", "better-auth.session_token", "elsewhere"),
    ]
    sign_out = fake_better_auth.requests(SIGN_OUT)[0]
    assert sign_out.headers["Cookie"] == "theme=dark"


# ------------------------------------------------------------------ URLs and arguments


class ConvexSiteResolver(AbstractResolver):
    """Resolves every name to 127.0.0.1, remembering which names were asked for."""

    def __init__(self) -> None:
        self.asked: list[str] = []

    async def resolve(
        self, host: str, port: int = 0, family: socket.AddressFamily = socket.AF_INET
    ) -> list[ResolveResult]:
        self.asked.append(host)
        return [
            ResolveResult(
                hostname=host,
                host="127.0.0.1",
                port=port,
                family=socket.AF_INET,
                proto=0,
                flags=socket.AI_NUMERICHOST,
            )
        ]

    async def close(self) -> None:
        pass


async def test_a_convex_cloud_url_sends_auth_calls_to_convex_site(fake_better_auth):
    fake_better_auth.on("POST", SIGN_OUT, Reply(json={"success": True}))
    resolver = ConvexSiteResolver()
    port = fake_better_auth.port
    async with (
        aiohttp.ClientSession(connector=aiohttp.TCPConnector(resolver=resolver)) as http,
        BetterAuthClient(
            f"http://happy-otter-123.convex.cloud:{port}/", allow_insecure=True, session=http
        ) as auth,
    ):
        await auth.sign_out(TOKEN)
    assert resolver.asked == ["happy-otter-123.convex.site"]
    [request] = fake_better_auth.received
    assert request.headers["Host"] == f"happy-otter-123.convex.site:{port}"
    assert request.headers["Origin"] == f"http://happy-otter-123.convex.site:{port}"


@pytest.mark.parametrize(
    ("args", "base", "site"),
    [
        (
            ("https://happy-otter-123.convex.cloud/",),
            "https://happy-otter-123.convex.cloud",
            "https://happy-otter-123.convex.site",
        ),
        (("http://localhost:3210",), "http://localhost:3210", "http://localhost:3210"),
        (
            ("http://127.0.0.1:3210", "http://127.0.0.1:3211/"),
            "http://127.0.0.1:3210",
            "http://127.0.0.1:3211",
        ),
        (
            ("https://convex.example.com", "https://auth.example.com"),
            "https://convex.example.com",
            "https://auth.example.com",
        ),
    ],
    ids=["cloud", "local", "local-site", "self-hosted"],
)
def test_urls_are_normalised_and_the_site_derived(args, base, site):
    # No event loop here: the constructor does no I/O.
    site_url = args[1] if len(args) > 1 else None
    auth = BetterAuthClient(args[0], site_url=site_url)
    assert (auth.base_url, auth.site_url, auth.origin) == (base, site, site)
    assert auth._session is None
    assert site in repr(auth)


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"base_url": "https://x.convex.cloud/api"}, "base_url must be a bare origin"),
        ({"base_url": "https://x.convex.cloud?a=1"}, "base_url must be a bare origin"),
        ({"base_url": "https://x.convex.cloud#f"}, "base_url must be a bare origin"),
        ({"base_url": "http://x.convex.cloud"}, "allow_insecure"),
        ({"base_url": "x.convex.cloud"}, "base_url must start with https://"),
        (
            {"base_url": "https://x.convex.cloud", "site_url": "https://x.convex.site/auth"},
            "site_url must be a bare origin",
        ),
        ({"base_url": "https://x.convex.cloud", "timeout": 0}, "timeout must be a positive"),
        ({"base_url": "https://x.convex.cloud", "timeout": float("nan")}, "timeout"),
        ({"base_url": "https://x.convex.cloud", "connect_timeout": -1}, "connect_timeout"),
        ({"base_url": "https://x.convex.cloud", "timeout": True}, "timeout"),
    ],
)
def test_bad_urls_and_timeouts_are_refused(kwargs, message):
    with pytest.raises(ValueError, match=message):
        BetterAuthClient(**kwargs)


def test_plain_http_is_allowed_off_loopback_only_when_asked():
    auth = BetterAuthClient("http://x.convex.cloud", allow_insecure=True)
    assert auth.site_url == "http://x.convex.site"


@pytest.mark.parametrize(
    "call",
    [
        lambda a: a.get_session(""),
        lambda a: a.convex_token("tok en"),
        lambda a: a.sign_out("token\r\nX-Injected: 1"),
        lambda a: a.verify_magic_link(""),
        lambda a: a.reset_password("", "new password 123"),
    ],
    ids=["empty", "space", "crlf", "verify", "reset"],
)
async def test_malformed_tokens_are_refused_before_any_request(
    fake_better_auth, call: Callable[[BetterAuthClient], Any]
):
    async with client(fake_better_auth) as auth:
        with pytest.raises(ValueError, match="token must") as caught:
            await call(auth)
    assert "X-Injected" not in str(caught.value) and "tok en" not in str(caught.value)
    assert fake_better_auth.received == []
