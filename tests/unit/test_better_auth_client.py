"""BetterAuthClient operations against a scripted server over a real socket.

These are the response shapes the real server (tests/integration/test_better_auth_server.py)
does not produce on demand, and the Dart original's client tests
(dartvex_auth_better/test/better_auth_client_test.dart), each with a counterpart here.
"""

from __future__ import annotations

from typing import Any
from urllib.parse import quote

import msgspec
import pytest
from aiohttp import web

from dartvex_auth_better import (
    BetterAuthClient,
    BetterAuthError,
    BetterAuthResponseError,
    BetterAuthSession,
    InvalidCredentialsError,
    InvalidTokenError,
    SessionExpiredError,
)
from dartvex_auth_better.better_auth._client import _Response
from tests.better_auth_fakes import (
    FakeBetterAuth,
    Reply,
    assert_no_secrets,
    fake_better_auth,
    make_jwt,
    no_secrets_in_logs,
    secret,
)

__all__ = ["fake_better_auth", "no_secrets_in_logs"]  # fixtures used by name

pytestmark = pytest.mark.anyio

SIGN_UP = "/api/auth/sign-up/email"
SIGN_IN = "/api/auth/sign-in/email"
SIGN_OUT = "/api/auth/sign-out"
GET_SESSION = "/api/auth/get-session"
CONVEX_TOKEN = "/api/auth/convex/token"
REQUEST_RESET = "/api/auth/request-password-reset"
RESET_PASSWORD = "/api/auth/reset-password"
MAGIC_LINK = "/api/auth/sign-in/magic-link"
VERIFY = "/api/auth/magic-link/verify"

PASSWORD = secret("fake password 8f3!Kq")
BARE_TOKEN = secret("xBIoC0nCQqwKwkoC88hpv88YwKJZDpiY")
SIGNED_TOKEN = secret(f"{BARE_TOKEN}.0FqlkXRPCdKRc5ItPftJewzacBAx2JSfLdirRMFyPaQ=")
OTHER_TOKEN = secret("rotatedSessionTokenRotatedToken1")
JWT = secret(make_jwt({"sub": "user-1", "email": "ada@example.com", "name": "Ada", "aud": "c"}))
OTHER_JWT = secret(make_jwt({"sub": "user-1", "email": "ada@example.com", "iat": 2}))
ANONYMOUS_JWT = secret(make_jwt({"iat": 1, "aud": "convex"}))  # no user claims at all
RESET_TOKEN = secret("NChpyNRCOD72c6IwFOibyvEb")
LINK_TOKEN = secret("magicLinkTokenMagicLinkToken0001")
USER = {"id": "user-1", "email": "ada@example.com", "name": "Ada", "emailVerified": False}
SESSION_ROW = {"id": "s1", "token": BARE_TOKEN, "userId": "user-1", "expiresAt": "2099-01-01"}


def session_cookie(value: str, name: str = "better-auth.session_token") -> tuple[str, str]:
    return ("Set-Cookie", f"{name}={quote(value, safe='')}; Max-Age=604800; Path=/; HttpOnly")


def jwt_cookie(value: str, name: str = "better-auth.convex_jwt") -> tuple[str, str]:
    return ("Set-Cookie", f"{name}={value}; Max-Age=900; Path=/; HttpOnly; SameSite=Lax")


def signed_in(body: Any = None, *, header: bool = True, cookies: bool = True) -> Reply:
    """A sign-in-like success, as the real server sends it unless told otherwise."""
    headers = [("set-auth-token", SIGNED_TOKEN)] if header else []
    if cookies:
        headers += [session_cookie(SIGNED_TOKEN), jwt_cookie(JWT)]
    if body is None:
        body = {"redirect": False, "token": BARE_TOKEN, "user": USER}
    return Reply(json=body, headers=headers)


def client(fake: FakeBetterAuth, **options: Any) -> BetterAuthClient:
    return BetterAuthClient(fake.url, **options)


def bearer(request: Any) -> str:
    value: str = request.headers["Authorization"]
    assert value.startswith("Bearer ")
    return value[len("Bearer ") :]


# ------------------------------------------------------------------ sign-in and sign-up


async def test_sign_in_posts_credentials_and_reads_the_jwt_cookie(fake_better_auth):
    fake_better_auth.on("POST", SIGN_IN, signed_in())
    async with client(fake_better_auth) as auth:
        session = await auth.sign_in("ada@example.com", PASSWORD)
    assert session == BetterAuthSession(
        token=JWT,
        session_token=SIGNED_TOKEN,  # the header wins over the body's bare token
        user_id="user-1",
        email="ada@example.com",
        name="Ada",
    )
    [request] = fake_better_auth.received  # the cookie saved the /convex/token round trip
    assert (request.method, request.path) == ("POST", SIGN_IN)
    assert request.json() == {"email": "ada@example.com", "password": PASSWORD}
    assert request.headers["Content-Type"] == "application/json"
    assert request.headers["Origin"] == fake_better_auth.url
    assert "Authorization" not in request.headers


async def test_sign_up_takes_the_jwt_from_convex_token_without_a_cookie(fake_better_auth):
    # Dart: "signUp: the token comes from /convex/token, and userId, email, name are parsed".
    fake_better_auth.on(
        "POST", SIGN_UP, signed_in({"token": BARE_TOKEN, "user": USER}, cookies=False)
    )
    fake_better_auth.on("GET", CONVEX_TOKEN, Reply(json={"token": JWT}))
    async with client(fake_better_auth) as auth:
        session = await auth.sign_up("Ada", "ada@example.com", PASSWORD)
    assert (session.token, session.user_id, session.email, session.name) == (
        JWT,
        "user-1",
        "ada@example.com",
        "Ada",
    )
    sign_up, token_call = fake_better_auth.received
    assert sign_up.json() == {"name": "Ada", "email": "ada@example.com", "password": PASSWORD}
    assert (token_call.method, token_call.path) == ("GET", CONVEX_TOKEN)
    assert bearer(token_call) == SIGNED_TOKEN


async def test_the_body_token_is_the_bearer_when_the_header_is_missing(fake_better_auth):
    fake_better_auth.on("POST", SIGN_IN, signed_in(header=False, cookies=False))
    fake_better_auth.on("GET", CONVEX_TOKEN, Reply(json={"token": JWT}))
    async with client(fake_better_auth) as auth:
        session = await auth.sign_in("ada@example.com", PASSWORD)
    assert session.session_token == BARE_TOKEN
    assert bearer(fake_better_auth.requests(CONVEX_TOKEN)[0]) == BARE_TOKEN


async def test_header_only_answer(fake_better_auth):
    # The bearer plugin's header, a body without a token, no cookies at all.
    fake_better_auth.on(
        "POST", SIGN_IN, signed_in({"redirect": False, "user": USER}, cookies=False)
    )
    fake_better_auth.on("GET", CONVEX_TOKEN, Reply(json={"token": JWT}))
    async with client(fake_better_auth) as auth:
        session = await auth.sign_in("ada@example.com", PASSWORD)
    assert (session.session_token, session.token) == (SIGNED_TOKEN, JWT)
    assert bearer(fake_better_auth.requests(CONVEX_TOKEN)[0]) == SIGNED_TOKEN


async def test_cookie_only_answer_with_secure_prefix_and_folded_expires(fake_better_auth):
    # Dart: cookies with a comma inside Expires give both tokens, no /convex/token call.
    # A proxy folded both cookies into one header; https deployments add __Secure-.
    expires = "Expires=Wed, 09 Jun 2031 10:18:14 GMT"
    folded = (
        f"__Secure-better-auth.session_token={quote(SIGNED_TOKEN, safe='')}; {expires}; "
        f"Path=/; Secure, __Secure-better-auth.convex_jwt={JWT}; {expires}; Path=/; Secure"
    )
    fake_better_auth.on(
        "POST", SIGN_IN, Reply(json={"user": USER}, headers=[("Set-Cookie", folded)])
    )
    async with client(fake_better_auth) as auth:
        session = await auth.sign_in("ada@example.com", PASSWORD)
    assert (session.session_token, session.token) == (SIGNED_TOKEN, JWT)
    assert fake_better_auth.requests(CONVEX_TOKEN) == []


async def test_no_session_token_anywhere_names_the_bearer_plugin(fake_better_auth):
    fake_better_auth.on("POST", SIGN_IN, Reply(json={"redirect": False, "user": USER}))
    async with client(fake_better_auth) as auth:
        with pytest.raises(BetterAuthResponseError) as caught:
            await auth.sign_in("ada@example.com", PASSWORD)
    text = str(caught.value)
    for needle in (
        SIGN_IN,
        "bearer()",
        "Access-Control-Expose-Headers: set-auth-token",
        "JSON token",
        "Set-Cookie",
    ):
        assert needle in text
    assert caught.value.status == 200 and not caught.value.retryable
    assert fake_better_auth.requests(CONVEX_TOKEN) == []


async def test_malformed_user_scalars_fall_back(fake_better_auth):
    # Dart: id becomes "", email falls back to the input, name becomes None.
    body = {"token": BARE_TOKEN, "user": {"id": 42, "email": None, "name": ["A"]}}
    fake_better_auth.on("POST", SIGN_IN, signed_in(body, header=False, cookies=False))
    fake_better_auth.on("GET", CONVEX_TOKEN, Reply(json={"token": ANONYMOUS_JWT}))
    async with client(fake_better_auth) as auth:
        session = await auth.sign_in("input@example.com", PASSWORD)
    assert (session.user_id, session.email, session.name) == ("", "input@example.com", None)


async def test_a_missing_user_is_read_from_the_jwt_claims(fake_better_auth):
    # The JWT the same server just issued names the user: `sub`, `email`, `name`.
    fake_better_auth.on("POST", SIGN_IN, signed_in({"token": BARE_TOKEN}))
    async with client(fake_better_auth) as auth:
        session = await auth.sign_in("INPUT@example.com", PASSWORD)
    assert (session.user_id, session.email, session.name) == ("user-1", "ada@example.com", "Ada")


@pytest.mark.parametrize(
    ("code", "field", "error_type"),
    [
        ("INVALID_EMAIL_OR_PASSWORD", "message", InvalidCredentialsError),
        ("SOMETHING_WENT_WRONG", "error", BetterAuthError),
    ],
)
async def test_a_200_with_an_error_code_raises(fake_better_auth, code, field, error_type):
    fake_better_auth.on("POST", SIGN_IN, Reply(json={"code": code, field: "went wrong"}))
    async with client(fake_better_auth) as auth:
        with pytest.raises(error_type) as caught:
            await auth.sign_in("ada@example.com", PASSWORD)
    err = caught.value
    assert (err.status, err.code, err.server_message) == (200, code, "went wrong")
    assert "went wrong" in str(err) and SIGN_IN in str(err)
    assert not err.retryable
    assert fake_better_auth.requests(CONVEX_TOKEN) == []


async def test_a_200_with_an_informational_message_but_no_code_succeeds(fake_better_auth):
    body = {"token": BARE_TOKEN, "user": USER, "message": "welcome back", "error": "none"}
    fake_better_auth.on("POST", SIGN_IN, signed_in(body))
    async with client(fake_better_auth) as auth:
        session = await auth.sign_in("ada@example.com", PASSWORD)
    assert session.user_id == "user-1"


@pytest.mark.parametrize(
    ("reply", "expected"),
    [
        (Reply(body="OK", content_type="text/plain"), "not JSON (content-type text/plain)"),
        (Reply(body=""), "an empty body"),
        (Reply(json=[]), "not an object (an array)"),
        (Reply(json="OK"), "not an object (str)"),
        (Reply(json={"token": 42, "user": USER}), "a token that is not text"),
        (Reply(json={"token": BARE_TOKEN, "user": "ada"}), "a user that is not an object"),
        (
            Reply(body="<html><body>Bad gateway</body></html>", content_type="text/html"),
            "not JSON (content-type text/html)",
        ),
    ],
    ids=["text", "empty", "array", "string", "token-int", "user-str", "html"],
)
async def test_a_200_body_we_cannot_use_is_a_typed_error(fake_better_auth, reply, expected):
    fake_better_auth.on("POST", SIGN_IN, reply)
    async with client(fake_better_auth) as auth:
        with pytest.raises(BetterAuthResponseError) as caught:
            await auth.sign_in("ada@example.com", PASSWORD)
    err = caught.value
    assert expected in str(err)
    assert f"{SIGN_IN} answered HTTP 200" in str(err)
    assert (err.endpoint, err.status, err.retryable) == (SIGN_IN, 200, False)
    assert "<html>" not in str(err)
    assert_no_secrets(err)


# ------------------------------------------------------------------ other operations


async def test_sign_out_sends_the_bearer_and_an_empty_object(fake_better_auth):
    fake_better_auth.on("POST", SIGN_OUT, Reply(json={"success": True}))
    async with client(fake_better_auth) as auth:
        await auth.sign_out(SIGNED_TOKEN)
    [request] = fake_better_auth.received
    assert bearer(request) == SIGNED_TOKEN
    assert request.json() == {}


async def test_request_bodies_are_exact_and_omit_unset_options(fake_better_auth):
    ok = Reply(json={"status": True, "message": "If this email exists, check your email"})
    for path in (REQUEST_RESET, RESET_PASSWORD, MAGIC_LINK):
        fake_better_auth.on("POST", path, ok)
    new_password = secret("brand new password 42")
    async with client(fake_better_auth) as auth:
        await auth.forgot_password("ada@example.com", redirect_to="https://app.example/reset")
        await auth.forgot_password("ada@example.com")
        await auth.reset_password(RESET_TOKEN, new_password)
        await auth.send_magic_link("ada@example.com", callback_url="/dashboard")
        await auth.send_magic_link("ada@example.com")
    bodies = [(r.path, r.json()) for r in fake_better_auth.received]
    assert bodies == [
        (REQUEST_RESET, {"email": "ada@example.com", "redirectTo": "https://app.example/reset"}),
        (REQUEST_RESET, {"email": "ada@example.com"}),
        (RESET_PASSWORD, {"token": RESET_TOKEN, "newPassword": new_password}),
        (MAGIC_LINK, {"email": "ada@example.com", "callbackURL": "/dashboard"}),
        (MAGIC_LINK, {"email": "ada@example.com"}),
    ]
    assert all("Authorization" not in r.headers for r in fake_better_auth.received)


async def test_a_200_html_page_is_not_a_successful_sign_out(fake_better_auth):
    # A site_url that points at a web app whose catch-all route answers 200 with HTML:
    # treating that as success would leave the session alive on the server.
    page = Reply(body="<!doctype html><title>App</title>", content_type="text/html")
    fake_better_auth.on("POST", SIGN_OUT, page)
    async with client(fake_better_auth) as auth:
        with pytest.raises(BetterAuthResponseError, match="not JSON") as caught:
            await auth.sign_out(SIGNED_TOKEN)
    assert caught.value.status == 200 and caught.value.endpoint == SIGN_OUT


async def test_an_error_code_in_a_200_fails_the_fire_and_forget_calls(fake_better_auth):
    fake_better_auth.on(
        "POST", RESET_PASSWORD, Reply(json={"code": "INVALID_TOKEN", "message": "Invalid token"})
    )
    async with client(fake_better_auth) as auth:
        with pytest.raises(InvalidTokenError) as caught:
            await auth.reset_password(RESET_TOKEN, "another new password")
    assert (caught.value.status, caught.value.code) == (200, "INVALID_TOKEN")


# ------------------------------------------------------------------ get_session


def session_body(user: Any = USER) -> dict[str, Any]:
    return {"session": SESSION_ROW, "user": user}


async def test_get_session_returns_a_fresh_jwt_and_the_user(fake_better_auth):
    fake_better_auth.on("GET", GET_SESSION, Reply(json=session_body()))
    fake_better_auth.on("GET", CONVEX_TOKEN, Reply(json={"token": OTHER_JWT}))
    async with client(fake_better_auth) as auth:
        session = await auth.get_session(SIGNED_TOKEN)
    assert session == BetterAuthSession(
        token=OTHER_JWT,
        session_token=SIGNED_TOKEN,
        user_id="user-1",
        email="ada@example.com",
        name="Ada",
    )
    assert [bearer(r) for r in fake_better_auth.received] == [SIGNED_TOKEN, SIGNED_TOKEN]


async def test_get_session_uses_the_jwt_cookie_when_the_server_sends_one(fake_better_auth):
    fake_better_auth.on("GET", GET_SESSION, Reply(json=session_body(), headers=[jwt_cookie(JWT)]))
    async with client(fake_better_auth) as auth:
        session = await auth.get_session(SIGNED_TOKEN)
    assert session is not None and session.token == JWT
    assert fake_better_auth.requests(CONVEX_TOKEN) == []


async def test_get_session_returns_a_rotated_session_token(fake_better_auth):
    # The Dart original dropped it (behaviour §6 #8); the new token is the one to keep.
    fake_better_auth.on(
        "GET", GET_SESSION, Reply(json=session_body(), headers=[("set-auth-token", OTHER_TOKEN)])
    )
    fake_better_auth.on("GET", CONVEX_TOKEN, Reply(json={"token": JWT}))
    async with client(fake_better_auth) as auth:
        session = await auth.get_session(SIGNED_TOKEN)
    assert session is not None and session.session_token == OTHER_TOKEN
    assert bearer(fake_better_auth.requests(CONVEX_TOKEN)[0]) == OTHER_TOKEN


@pytest.mark.parametrize(
    "reply",
    [
        Reply(json=None),  # what Better Auth sends for a gone session
        Reply(json={"session": None, "user": None}),
        Reply(status=401, json={"message": "Unauthorized", "code": "UNAUTHORIZED"}),
        Reply(status=403, body=""),
    ],
    ids=["null", "null-session", "401", "403"],
)
async def test_get_session_returns_none_when_the_session_is_gone(fake_better_auth, reply):
    fake_better_auth.on("GET", GET_SESSION, reply)
    fake_better_auth.on("GET", CONVEX_TOKEN, Reply(json={"token": JWT}))
    async with client(fake_better_auth) as auth:
        assert await auth.get_session(SIGNED_TOKEN) is None
    assert fake_better_auth.requests(CONVEX_TOKEN) == []


async def test_get_session_returns_none_when_the_token_endpoint_says_gone(fake_better_auth):
    fake_better_auth.on("GET", GET_SESSION, Reply(json=session_body()))
    fake_better_auth.on(
        "GET", CONVEX_TOKEN, Reply(status=401, json={"message": "Unauthorized", "code": "X"})
    )
    async with client(fake_better_auth) as auth:
        assert await auth.get_session(SIGNED_TOKEN) is None
    assert len(fake_better_auth.requests(CONVEX_TOKEN)) == 1


async def test_get_session_503_is_retryable_and_carries_the_message(fake_better_auth):
    fake_better_auth.on(
        "GET", GET_SESSION, Reply(status=503, json={"message": "deploy in progress"})
    )
    async with client(fake_better_auth) as auth:
        with pytest.raises(BetterAuthError) as caught:
            await auth.get_session(SIGNED_TOKEN)
    err = caught.value
    assert type(err) is BetterAuthError
    assert err.retryable and err.status == 503 and "deploy in progress" in str(err)
    assert err.server_message == "deploy in progress"


async def test_get_session_then_a_503_from_convex_token_is_retryable(fake_better_auth):
    fake_better_auth.on("GET", GET_SESSION, Reply(json=session_body()))
    fake_better_auth.on(
        "GET", CONVEX_TOKEN, Reply(status=503, json={"message": "keys are rotating"})
    )
    async with client(fake_better_auth) as auth:
        with pytest.raises(BetterAuthError) as caught:
            await auth.get_session(SIGNED_TOKEN)
    assert caught.value.retryable and "keys are rotating" in str(caught.value)
    assert caught.value.endpoint == CONVEX_TOKEN


@pytest.mark.parametrize(
    ("body", "expected"),
    [
        # The Dart original returned null for a session that is not an object; a broken
        # answer is not proof that the session is gone (prior art §2 #6), so it raises.
        ({"session": "yes", "user": USER}, "a session that is not an object"),
        ({"session": SESSION_ROW, "user": ["ada"]}, "a user that is not an object"),
        ([SESSION_ROW], "neither an object nor null"),
        ("OK", "neither an object nor null"),
        # Better Auth says "gone" with `null` or `"session": null`, never by leaving the
        # field out: an object without it (a proxy's `{}`, some app's greeting) proves
        # nothing, and returning None would make the caller throw the token away.
        ({}, "without a session field"),
        ({"message": "hello from the app"}, "without a session field"),
        ({"user": USER}, "without a session field"),
    ],
)
async def test_get_session_rejects_broken_shapes(fake_better_auth, body, expected):
    fake_better_auth.on("GET", GET_SESSION, Reply(json=body))
    fake_better_auth.on("GET", CONVEX_TOKEN, Reply(json={"token": JWT}))
    async with client(fake_better_auth) as auth:
        with pytest.raises(BetterAuthResponseError, match=expected) as caught:
            await auth.get_session(SIGNED_TOKEN)
    err = caught.value
    assert err.endpoint == GET_SESSION and err.status == 200 and not err.retryable
    assert f"{GET_SESSION} answered HTTP 200" in str(err)
    assert fake_better_auth.requests(CONVEX_TOKEN) == []
    assert_no_secrets(err)


@pytest.mark.parametrize("raw", ["OK", ""], ids=["text", "empty"])
async def test_get_session_non_json_200_raises(fake_better_auth, raw):
    fake_better_auth.on("GET", GET_SESSION, Reply(body=raw, content_type="text/plain"))
    async with client(fake_better_auth) as auth:
        with pytest.raises(BetterAuthResponseError, match=f"{GET_SESSION} answered HTTP 200"):
            await auth.get_session(SIGNED_TOKEN)


async def test_get_session_non_string_user_scalars(fake_better_auth):
    # Dart: non-string user id/email become "" and a non-string name becomes None.
    user = {"id": 7, "email": False, "name": {"first": "Ada"}}
    fake_better_auth.on("GET", GET_SESSION, Reply(json=session_body(user)))
    fake_better_auth.on("GET", CONVEX_TOKEN, Reply(json={"token": ANONYMOUS_JWT}))
    async with client(fake_better_auth) as auth:
        session = await auth.get_session(SIGNED_TOKEN)
    assert session is not None
    assert (session.user_id, session.email, session.name) == ("", "", None)


async def test_get_session_with_an_error_code_in_a_200_raises(fake_better_auth):
    fake_better_auth.on("GET", GET_SESSION, Reply(json={"code": "BROKEN", "message": "db down"}))
    async with client(fake_better_auth) as auth:
        with pytest.raises(BetterAuthError, match="db down"):
            await auth.get_session(SIGNED_TOKEN)


# ------------------------------------------------------------------ convex_token


@pytest.mark.parametrize(
    ("reply", "expected"),
    [
        (Reply(json={}), "without a token"),
        (Reply(json={"token": None}), "without a token"),
        (Reply(json={"token": ""}), "without a token"),
        (Reply(json={"token": 42}), "a token that is not text"),
        (Reply(json="OK"), "not an object"),
        (Reply(json=[JWT]), "not an object (an array)"),
        (Reply(body="OK", content_type="text/plain"), "not JSON"),
        (Reply(body=""), "an empty body"),
    ],
    ids=["no-key", "null", "empty-string", "int", "string", "array", "text", "empty"],
)
async def test_convex_token_bodies_without_a_token(fake_better_auth, reply, expected):
    # Dart raised BetterAuthSessionExpiredException here. The session may be alive: the
    # answer is broken, so this is a protocol error (never a silent None, prior art #6).
    fake_better_auth.on("GET", CONVEX_TOKEN, reply)
    async with client(fake_better_auth) as auth:
        with pytest.raises(BetterAuthResponseError) as caught:
            await auth.convex_token(SIGNED_TOKEN)
    err = caught.value
    assert expected in str(err) and f"{CONVEX_TOKEN} answered HTTP 200" in str(err)
    assert not isinstance(err, SessionExpiredError) and not err.retryable


@pytest.mark.parametrize(
    "reply",
    [
        Reply(status=401, json={"message": "Invalid token", "code": "INVALID_TOKEN"}),
        Reply(status=401, json={"message": "Unauthorized", "code": "UNAUTHORIZED"}),
        Reply(status=403, body=""),
        Reply(status=403, body="<html>Forbidden</html>", content_type="text/html"),
    ],
    ids=["401-invalid-token", "401", "403-empty", "403-html"],
)
async def test_convex_token_401_or_403_is_always_session_expired(fake_better_auth, reply):
    fake_better_auth.on("GET", CONVEX_TOKEN, reply)
    async with client(fake_better_auth) as auth:
        with pytest.raises(SessionExpiredError) as caught:
            await auth.convex_token(SIGNED_TOKEN)
    err = caught.value
    assert type(err) is SessionExpiredError  # not InvalidTokenError, whatever the code
    assert err.status == reply.status and not err.retryable
    if isinstance(reply.json, dict):
        assert (err.code, err.server_message) == (reply.json["code"], reply.json["message"])
    assert_no_secrets(err)


# ------------------------------------------------------------------ magic link


async def test_verify_sends_only_the_token_and_reads_a_json_answer(fake_better_auth):
    body = {"token": BARE_TOKEN, "user": {**USER, "emailVerified": True}, "session": SESSION_ROW}
    fake_better_auth.on("GET", VERIFY, signed_in(body))
    async with client(fake_better_auth) as auth:
        session = await auth.verify_magic_link(LINK_TOKEN)
    assert (session.session_token, session.token, session.user_id) == (
        SIGNED_TOKEN,
        JWT,
        "user-1",
    )
    [request] = fake_better_auth.received
    assert dict(request.query) == {"token": LINK_TOKEN}


async def test_verify_accepts_a_redirect_that_carries_the_session(fake_better_auth):
    landing_hits = []

    async def landing(request: web.Request) -> web.StreamResponse:
        landing_hits.append(request)
        return web.Response(text="<html>app</html>", content_type="text/html")

    fake_better_auth.on("GET", "/dashboard", landing)
    fake_better_auth.on(
        "GET",
        VERIFY,
        Reply(
            status=302,
            headers=[
                ("Location", f"{fake_better_auth.url}/dashboard"),
                ("set-auth-token", SIGNED_TOKEN),
                session_cookie(SIGNED_TOKEN),
                jwt_cookie(JWT),
            ],
        ),
    )
    async with client(fake_better_auth) as auth:
        session = await auth.verify_magic_link(LINK_TOKEN)
    # The user comes from the JWT's claims: a redirect has no JSON body.
    assert session == BetterAuthSession(
        token=JWT, session_token=SIGNED_TOKEN, user_id="user-1", email="ada@example.com", name="Ada"
    )
    assert landing_hits == []  # never followed


@pytest.mark.parametrize(
    ("error", "error_type"),
    [
        ("INVALID_TOKEN", InvalidTokenError),
        ("EXPIRED_TOKEN", InvalidTokenError),
        ("failed_to_create_session", BetterAuthError),
    ],
)
async def test_verify_error_redirects_are_typed(fake_better_auth, error, error_type):
    location = f"{fake_better_auth.url}/?error={error}"
    fake_better_auth.on("GET", VERIFY, Reply(status=302, headers=[("Location", location)]))
    async with client(fake_better_auth) as auth:
        with pytest.raises(error_type) as caught:
            await auth.verify_magic_link(LINK_TOKEN)
    err = caught.value
    assert type(err) is error_type
    assert (err.status, err.code, err.endpoint) == (302, error, VERIFY)
    assert not err.retryable
    assert len(fake_better_auth.received) == 1  # the error page was not fetched
    assert_no_secrets(err)


async def test_a_verify_error_redirect_that_echoes_the_token_does_not_show_it(
    fake_better_auth,
):
    location = f"{fake_better_auth.url}/?error=bad-{quote(LINK_TOKEN)}"
    fake_better_auth.on("GET", VERIFY, Reply(status=302, headers=[("Location", location)]))
    async with client(fake_better_auth) as auth:
        with pytest.raises(BetterAuthError) as caught:
            await auth.verify_magic_link(LINK_TOKEN)
    err = caught.value
    assert err.code == "bad-<redacted>" and "error=bad-<redacted>" in str(err)
    assert_no_secrets(err)


async def test_verify_redirect_without_a_session_or_an_error(fake_better_auth):
    fake_better_auth.on("GET", VERIFY, Reply(status=302, headers=[("Location", "/")]))
    async with client(fake_better_auth) as auth:
        with pytest.raises(BetterAuthResponseError, match=r"a redirect \(HTTP 302\)") as caught:
            await auth.verify_magic_link(LINK_TOKEN)
    assert "bearer()" in str(caught.value)


async def test_verify_status_true_body_uses_the_header_and_the_token_endpoint(fake_better_auth):
    fake_better_auth.on("GET", VERIFY, signed_in({"status": True}, cookies=False))
    fake_better_auth.on("GET", CONVEX_TOKEN, Reply(json={"token": JWT}))
    async with client(fake_better_auth) as auth:
        session = await auth.verify_magic_link(LINK_TOKEN)
    assert (session.session_token, session.token) == (SIGNED_TOKEN, JWT)
    assert (session.user_id, session.email) == ("user-1", "ada@example.com")
    assert bearer(fake_better_auth.requests(CONVEX_TOKEN)[0]) == SIGNED_TOKEN


async def test_verify_body_without_a_token_falls_back_to_the_cookie(fake_better_auth):
    fake_better_auth.on("GET", VERIFY, signed_in({"status": True}, header=False))
    async with client(fake_better_auth) as auth:
        session = await auth.verify_magic_link(LINK_TOKEN)
    assert (session.session_token, session.token) == (SIGNED_TOKEN, JWT)


async def test_verify_uses_the_body_token_when_the_header_is_missing(fake_better_auth):
    fake_better_auth.on(
        "GET", VERIFY, signed_in({"token": BARE_TOKEN, "user": USER}, header=False, cookies=False)
    )
    fake_better_auth.on("GET", CONVEX_TOKEN, Reply(json={"token": JWT}))
    async with client(fake_better_auth) as auth:
        session = await auth.verify_magic_link(LINK_TOKEN)
    assert session.session_token == BARE_TOKEN
    assert bearer(fake_better_auth.requests(CONVEX_TOKEN)[0]) == BARE_TOKEN


@pytest.mark.parametrize(
    ("reply", "error_type", "expected"),
    [
        (Reply(json=[]), BetterAuthResponseError, "not an object"),
        (Reply(body=""), BetterAuthResponseError, "an empty body"),
        # The Dart original skipped this check on verify (behaviour §6 #7).
        (
            Reply(json={"code": "INVALID_TOKEN", "message": "Invalid token"}),
            InvalidTokenError,
            "Invalid token",
        ),
    ],
    ids=["array", "empty", "error-code"],
)
async def test_verify_200_bodies_that_fail(fake_better_auth, reply, error_type, expected):
    fake_better_auth.on("GET", VERIFY, reply)
    async with client(fake_better_auth) as auth:
        with pytest.raises(error_type, match=expected) as caught:
            await auth.verify_magic_link(LINK_TOKEN)
    assert caught.value.status == 200 and caught.value.endpoint == VERIFY


# ------------------------------------------------------------------ the session value


def test_session_repr_str_and_rich_repr_hide_both_tokens():
    session = BetterAuthSession(
        token=JWT, session_token=SIGNED_TOKEN, user_id="user-1", email="a@b.c", name="A"
    )
    texts = [repr(session), str(session), f"{session}", repr(session.__rich_repr__())]
    for text in texts:
        assert JWT not in text and SIGNED_TOKEN not in text and BARE_TOKEN not in text
        assert "user-1" in text and "a@b.c" in text
    # Storing it is deliberate: msgspec encodes every field.
    stored = msgspec.json.decode(msgspec.json.encode(session), type=BetterAuthSession)
    assert stored == session and stored.session_token == SIGNED_TOKEN


def test_a_response_repr_hides_what_can_carry_secrets():
    response = _Response(
        GET_SESSION,
        200,
        {"set-auth-token": SIGNED_TOKEN, "Content-Type": "application/json"},
        (f"better-auth.convex_jwt={JWT}; Path=/",),
        msgspec.json.encode({"token": BARE_TOKEN, "echo": PASSWORD}),
        (SIGNED_TOKEN, PASSWORD),
    )
    text = repr(response)
    assert GET_SESSION in text and "200" in text
    for hidden in (SIGNED_TOKEN, BARE_TOKEN, JWT, PASSWORD, "set-auth-token", "convex_jwt"):
        assert hidden not in text
    assert response.body and response.secrets  # hidden from the repr, still there


def test_session_is_a_frozen_value():
    def make(token: str) -> BetterAuthSession:
        return BetterAuthSession(token=token, session_token=SIGNED_TOKEN, user_id="u", email="e")

    assert make(JWT) == make(JWT) and hash(make(JWT)) == hash(make(JWT))
    assert make(JWT) != make(OTHER_JWT)
    assert make(JWT).name is None
    with pytest.raises(AttributeError):
        make(JWT).token = OTHER_JWT  # type: ignore[misc]
