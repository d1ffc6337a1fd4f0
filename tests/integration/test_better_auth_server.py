"""BetterAuthClient against the real Better Auth server (Node, with the convex plugin).

Every operation and every case the real server can produce: the password-reset and
magic-link flows through the test outbox, the errors Better Auth returns for bad input,
its origin check, its rate limiter, and the magic-link behaviour that deletes an
unverified user's password (better-auth-server.md §5.8).
"""

from __future__ import annotations

import secrets
from collections.abc import AsyncIterator
from urllib.parse import quote

import aiohttp
import pytest
from yarl import URL

from dartvex_auth_better import (
    BetterAuthClient,
    BetterAuthError,
    BetterAuthResponseError,
    InvalidCredentialsError,
    InvalidTokenError,
    RateLimitedError,
    SessionExpiredError,
    UserAlreadyExistsError,
)
from dartvex_auth_better._jwt import token_claims
from dartvex_auth_better.testing import LocalBetterAuth
from tests.better_auth_fakes import (
    assert_no_secrets,
    no_secrets_in_logs,
    secret,
    secret_session,
)

__all__ = ["no_secrets_in_logs"]  # a fixture used by name

pytestmark = [pytest.mark.anyio, pytest.mark.integration]

PASSWORD = secret("real server password 7#Tq")


def new_email(prefix: str = "user") -> str:
    return f"{prefix}-{secrets.token_hex(6)}@example.com"


@pytest.fixture
async def auth(better_auth_server: LocalBetterAuth) -> AsyncIterator[BetterAuthClient]:
    async with BetterAuthClient(better_auth_server.url) as client:
        yield client


# ------------------------------------------------------------------ email and password


async def test_sign_up_and_sign_in(auth, better_auth_server):
    email = new_email("Ada")  # mixed case on purpose
    signed_up = secret_session(await auth.sign_up("Ada", email, PASSWORD))
    session = secret_session(await auth.sign_in(email.upper(), PASSWORD))
    assert session.user_id == signed_up.user_id != ""
    # Better Auth stores emails in lower case; the session says what the server has.
    assert session.email == signed_up.email == email.lower()
    assert session.name == "Ada"
    # The bearer plugin's signed form `<token>.<signature>`, from set-auth-token.
    assert "." in session.session_token and session.session_token != signed_up.session_token
    # The server lists what it issued (tests/conftest.py checks every log for each one).
    issued = await better_auth_server.issued_session_tokens()
    for each in (signed_up, session):
        assert each.session_token.partition(".")[0] in issued
    claims = token_claims(session.token)
    assert claims is not None
    assert (claims["sub"], claims["aud"], claims["iss"]) == (
        session.user_id,
        "convex",
        better_auth_server.issuer,
    )


async def test_wrong_password_and_unknown_user_are_invalid_credentials(auth):
    email = new_email()
    secret_session(await auth.sign_up("Bob", email, PASSWORD))
    wrong = secret("not the password 123")
    for who, password in ((email, wrong), (new_email("nobody"), PASSWORD)):
        with pytest.raises(InvalidCredentialsError) as caught:
            await auth.sign_in(who, password)
        err = caught.value
        assert (err.status, err.code, err.retryable) == (401, "INVALID_EMAIL_OR_PASSWORD", False)
        assert err.server_message == "Invalid email or password"
        assert_no_secrets(err)


async def test_duplicate_sign_up_even_in_another_case(auth):
    email = new_email()
    secret_session(await auth.sign_up("Cy", email, PASSWORD))
    with pytest.raises(UserAlreadyExistsError) as caught:
        await auth.sign_up("Cy again", email.upper(), PASSWORD)
    err = caught.value
    assert (err.status, err.code) == (422, "USER_ALREADY_EXISTS_USE_ANOTHER_EMAIL")
    assert "User already exists" in str(err)


async def test_input_the_server_refuses(auth):
    with pytest.raises(BetterAuthError) as short:
        await auth.sign_up("Dee", new_email(), "2short")
    assert (short.value.status, short.value.code) == (400, "PASSWORD_TOO_SHORT")
    assert short.value.server_message == "Password too short" and not short.value.retryable
    with pytest.raises(BetterAuthError) as bad_email:
        await auth.sign_up("Dee", "not an email", PASSWORD)
    assert (bad_email.value.status, bad_email.value.code) == (400, "VALIDATION_ERROR")
    assert "[body.email]" in str(bad_email.value)


async def test_a_long_name_signs_up_and_in(auth):
    # The convex plugin puts the name in the JWT, and the JWT in a Set-Cookie: at 6,000
    # characters that header is over aiohttp's default limit of 8,190 bytes.
    for length in (6_000, 20_000):
        name, email = "n" * length, new_email()
        signed_up = secret_session(await auth.sign_up(name, email, PASSWORD))
        signed_in = secret_session(await auth.sign_in(email, PASSWORD))
        assert signed_up.name == signed_in.name == name
        claims = token_claims(signed_in.token)
        assert claims is not None and claims["name"] == name


async def test_a_header_too_long_to_read_is_a_response_error(auth, better_auth_server):
    email = new_email()
    with pytest.raises(BetterAuthResponseError) as caught:
        await auth.sign_up("n" * 70_000, email, PASSWORD)
    err = caught.value
    # Not "could not reach": the server answered, and created the account.
    assert not err.retryable and (err.endpoint, err.status) == ("/api/auth/sign-up/email", None)
    assert "over the 65536-byte limit (LineTooLong)" in str(err)
    assert "may have taken effect" in str(err)
    with pytest.raises(UserAlreadyExistsError):
        await auth.sign_up("short", email, PASSWORD)
    # The text quotes no header: neither the JWT nor the session token it carried.
    issued = await better_auth_server.issued_session_tokens()
    for text in (str(err), repr(err)):
        assert "better-auth" not in text and "eyJ" not in text
        assert not [token for token in issued if token in text]
    assert err.__context__ is None and err.__cause__ is None
    assert_no_secrets(err)


async def test_get_session_sign_out_then_the_session_is_gone(auth):
    session = secret_session(await auth.sign_up("Eve", new_email(), PASSWORD))
    bare = session.session_token.split(".", 1)[0]
    for token in (session.session_token, bare):  # the bearer plugin takes both forms
        restored = await auth.get_session(token)
        assert restored is not None
        secret_session(restored)
        assert (restored.user_id, restored.email, restored.name) == (
            session.user_id,
            session.email,
            "Eve",
        )
        assert restored.session_token == token  # no sliding refresh yet: no rotation
        assert token_claims(restored.token)["sub"] == session.user_id  # type: ignore[index]
    assert secret(await auth.convex_token(session.session_token)).count(".") == 2

    await auth.sign_out(session.session_token)
    await auth.sign_out(session.session_token)  # Better Auth answers success again
    assert await auth.get_session(session.session_token) is None
    assert await auth.get_session(bare) is None
    with pytest.raises(SessionExpiredError) as caught:
        await auth.convex_token(session.session_token)
    err = caught.value
    assert (err.status, err.code, err.retryable) == (401, "UNAUTHORIZED", False)
    assert_no_secrets(err)


@pytest.mark.parametrize("token", ["abc.def", "x" * 32])
async def test_get_session_with_a_token_that_never_was(auth, token):
    assert await auth.get_session(token) is None


# ------------------------------------------------------------------ password reset


async def test_password_reset_flow(auth, better_auth_server):
    email = new_email()
    old_session = secret_session(await auth.sign_up("Fay", email, PASSWORD))
    await auth.forgot_password(email)
    message = await better_auth_server.wait_for_message(email, "reset-password")
    token = secret(message["token"])
    new_password = secret("the new password 99!")

    with pytest.raises(BetterAuthError) as too_short:
        await auth.reset_password(token, "2short")
    assert too_short.value.code == "PASSWORD_TOO_SHORT"

    await auth.reset_password(token, new_password)
    with pytest.raises(InvalidCredentialsError):
        await auth.sign_in(email, PASSWORD)
    secret_session(await auth.sign_in(email, new_password))
    # Better Auth keeps existing sessions on a reset (revokeSessionsOnPasswordReset=false).
    assert await auth.get_session(old_session.session_token) is not None

    for used_or_bogus in (token, secret("bogusResetTokenBogusReset")):
        with pytest.raises(InvalidTokenError) as caught:
            await auth.reset_password(used_or_bogus, secret("yet another password 1"))
        assert (caught.value.status, caught.value.code) == (400, "INVALID_TOKEN")
        assert_no_secrets(caught.value)


async def test_forgot_password_for_an_unknown_email_sends_nothing(auth, better_auth_server):
    email = new_email("ghost")
    await auth.forgot_password(email)  # same answer as for a real account
    assert await better_auth_server.outbox(email=email) == []


async def test_the_reset_redirect_must_be_trusted(auth, better_auth_server):
    email = new_email()
    secret_session(await auth.sign_up("Gus", email, PASSWORD))
    with pytest.raises(BetterAuthError) as caught:
        await auth.forgot_password(email, redirect_to="https://evil.example/reset")
    err = caught.value
    assert (err.status, err.code) == (403, "INVALID_REDIRECT_URL")
    assert not isinstance(err, SessionExpiredError)

    await auth.forgot_password(email, redirect_to="http://localhost:3000/reset")
    message = await better_auth_server.wait_for_message(email, "reset-password")
    secret(message["token"])
    assert message["url"].endswith(f"?callbackURL={quote('http://localhost:3000/reset', '')}")


# ------------------------------------------------------------------ magic link


async def magic_token(better_auth_server: LocalBetterAuth, email: str) -> str:
    message = await better_auth_server.wait_for_message(email, "magic-link")
    return secret(message["token"])


async def test_magic_link_flow_for_a_new_user(auth, better_auth_server):
    email = new_email("link")
    await auth.send_magic_link(email, callback_url="/dashboard")
    token = await magic_token(better_auth_server, email)
    message = (await better_auth_server.outbox(email=email, type="magic-link"))[-1]
    assert "callbackURL=%2Fdashboard" in message["url"]

    session = secret_session(await auth.verify_magic_link(token))
    assert session.user_id and session.email == email
    assert token_claims(session.token)["emailVerified"] is True  # type: ignore[index]
    restored = await auth.get_session(session.session_token)
    assert restored is not None and restored.user_id == session.user_id
    secret_session(restored)

    for used_or_bogus in (token, secret("bogusMagicLinkTokenBogusMagicLink")):
        # Better Auth answers a redirect to `/?error=INVALID_TOKEN`, never JSON.
        with pytest.raises(InvalidTokenError) as caught:
            await auth.verify_magic_link(used_or_bogus)
        assert (caught.value.status, caught.value.code) == (302, "INVALID_TOKEN")
        assert_no_secrets(caught.value)


async def test_the_magic_link_callback_must_be_trusted(auth):
    with pytest.raises(BetterAuthError) as caught:
        await auth.send_magic_link(new_email(), callback_url="https://evil.example/")
    assert (caught.value.status, caught.value.code) == (403, "INVALID_CALLBACK_URL")


async def test_a_magic_link_for_an_unverified_password_user_deletes_password_and_sessions(
    auth, better_auth_server
):
    # Better Auth cannot tell who set the password of an unverified account, so verifying
    # a magic link removes that password and every session first (server reference §5.8).
    email = new_email()
    password_session = secret_session(await auth.sign_up("Hal", email, PASSWORD))
    await auth.send_magic_link(email)
    link_session = secret_session(
        await auth.verify_magic_link(await magic_token(better_auth_server, email))
    )
    assert link_session.user_id == password_session.user_id
    assert await auth.get_session(password_session.session_token) is None
    with pytest.raises(InvalidCredentialsError):
        await auth.sign_in(email, PASSWORD)
    assert await auth.get_session(link_session.session_token) is not None


async def test_a_magic_link_for_a_verified_user_keeps_other_sessions(auth, better_auth_server):
    email = new_email("verified")
    await auth.send_magic_link(email)
    first = secret_session(
        await auth.verify_magic_link(await magic_token(better_auth_server, email))
    )
    await better_auth_server.clear_outbox()
    await auth.send_magic_link(email)
    second = secret_session(
        await auth.verify_magic_link(await magic_token(better_auth_server, email))
    )
    assert second.user_id == first.user_id and second.session_token != first.session_token
    assert await auth.get_session(first.session_token) is not None


# ------------------------------------------------------------------ origin and sessions


def jar_with_a_cookie(url: str) -> aiohttp.CookieJar:
    # Any cookie turns on Better Auth's origin check (a CDN's __cf_bm is enough). The
    # jar keeps cookies for IP hosts, as aiohttp's default jar does for real host names.
    jar = aiohttp.CookieJar(unsafe=True)
    jar.update_cookies({"__cf_bm": "bot-management"}, URL(url))
    return jar


@pytest.mark.parametrize(
    ("origin", "code"),
    [
        (True, None),
        ("http://localhost:3000", None),  # trusted by the test server
        (False, "MISSING_OR_NULL_ORIGIN"),
        ("https://evil.example", "INVALID_ORIGIN"),
    ],
    ids=["default", "trusted", "none", "untrusted"],
)
async def test_the_origin_check_on_a_cookie_carrying_post(better_auth_server, origin, code):
    url = better_auth_server.url
    async with BetterAuthClient(url) as plain:
        email = new_email()
        secret_session(await plain.sign_up("Ivy", email, PASSWORD))
    async with (
        aiohttp.ClientSession(cookie_jar=jar_with_a_cookie(url)) as http,
        BetterAuthClient(url, session=http, origin=origin) as auth,
    ):
        if code is None:
            session = secret_session(await auth.sign_in(email, PASSWORD))
            assert session.email == email
        else:
            with pytest.raises(BetterAuthError) as caught:
                await auth.sign_in(email, PASSWORD)
            assert (caught.value.status, caught.value.code) == (403, code)
            assert not isinstance(caught.value, SessionExpiredError)


@pytest.mark.parametrize("keeps_ip_cookies", [False, True], ids=["default-jar", "unsafe-jar"])
async def test_a_borrowed_session_with_a_cookie_jar_never_mixes_users(
    better_auth_server, keeps_ip_cookies
):
    url = better_auth_server.url
    jar = aiohttp.CookieJar(unsafe=keeps_ip_cookies)
    async with aiohttp.ClientSession(cookie_jar=jar) as http:
        async with BetterAuthClient(url, session=http) as auth:
            ann = secret_session(await auth.sign_up("Ann", new_email(), PASSWORD))
            ben = secret_session(await auth.sign_up("Ben", new_email(), PASSWORD))
            # A token with a bad signature is ignored by the bearer plugin; a session
            # cookie left in the jar would then decide whose session this is.
            assert await auth.get_session("abc.def") is None
            for session in (ann, ben):
                restored = await auth.get_session(session.session_token)
                assert restored is not None and restored.user_id == session.user_id
                secret_session(restored)
            await auth.sign_out(ann.session_token)
            assert await auth.get_session(ann.session_token) is None
            assert await auth.get_session(ben.session_token) is not None
        assert not http.closed
    assert [m.key for m in jar] == []


async def test_the_real_rate_limiter_gives_a_retry_after():
    # Better Auth's rule for /sign-in/*: 3 requests per 10 s, then 429 with x-retry-after.
    async with (
        LocalBetterAuth(rate_limit_max=100) as server,
        BetterAuthClient(server.url) as auth,
    ):
        email = new_email()
        for _ in range(3):
            with pytest.raises(InvalidCredentialsError):
                await auth.sign_in(email, PASSWORD)
        with pytest.raises(RateLimitedError) as caught:
            await auth.sign_in(email, PASSWORD)
    err = caught.value
    assert err.status == 429 and err.retryable and err.retry_after == 10
    assert err.server_message == "Too many requests. Please try again later."
    assert_no_secrets(err)
