"""The FastAPI example (docs/examples/fastapi_app.py) against the real local stack.

The app runs as an ASGI server would run it: the lifespan is started and stopped through
the ASGI lifespan protocol, and every request gets a copy of the lifespan state. Requests
go through httpx's ASGI transport.
"""

from __future__ import annotations

import asyncio
import secrets
from collections.abc import AsyncIterator, MutableMapping
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any
from urllib.parse import unquote

import aiohttp
import anyio
import httpx
import pytest
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from dartvex_auth_better import (
    Authenticated,
    AuthenticatedConvexClient,
    BetterAuthClient,
    BetterAuthSession,
    ConnectionState,
    ConvexBetterAuthProvider,
    InvalidCredentialsError,
    SessionExpiredError,
)
from dartvex_auth_better.integrations.starlette import STATE_KEY, ConvexResources
from dartvex_auth_better.testing import LocalBetterAuth, LocalConvex
from docs.examples.fastapi_app import Settings, create_app
from tests.better_auth_fakes import no_secrets_in_logs, secret, secret_session

__all__ = [
    "LifespanFailed",
    "no_secrets_in_logs",
    "serve",
    "service_session_token",
]  # a fixture used by name

pytestmark = [pytest.mark.anyio, pytest.mark.integration]

PASSWORD = secret("starlette example password 9$Kp")


class LifespanFailed(Exception):
    """The app reported a failed lifespan startup or shutdown without raising."""


def _with_state(app: ASGIApp, state: MutableMapping[str, Any]) -> ASGIApp:
    """The app, with each request's scope carrying a shallow copy of the lifespan state
    (what uvicorn and hypercorn do; httpx's transport knows nothing of lifespans)."""

    async def with_state(scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] in ("http", "websocket"):
            scope = {**scope, "state": dict(state)}
        await app(scope, receive, send)

    return with_state


@asynccontextmanager
async def serve(app: ASGIApp) -> AsyncIterator[tuple[httpx.AsyncClient, dict[str, Any]]]:
    """Start the app's lifespan, yield a client for it and the lifespan state, then shut
    the lifespan down and check that it said so. A startup failure raises the app's error.
    """
    state: dict[str, Any] = {}
    to_app_send, to_app_receive = anyio.create_memory_object_stream[Message](2)
    from_app_send, from_app_receive = anyio.create_memory_object_stream[Message](2)
    failure: list[Exception] = []

    async def lifespan() -> None:
        scope = {"type": "lifespan", "asgi": {"version": "3.0", "spec_version": "2.0"}}
        try:
            await app({**scope, "state": state}, to_app_receive.receive, from_app_send.send)
        except Exception as exc:  # the server's job: report it, as uvicorn logs it
            failure.append(exc)
        finally:
            # Whatever happened, whoever waits for an answer gets one.
            from_app_send.close()

    # A task of its own, as a server's lifespan task: a task group here would wrap the
    # test's own failures into ExceptionGroups.
    task = asyncio.get_running_loop().create_task(lifespan(), name="test lifespan")
    try:
        await to_app_send.send({"type": "lifespan.startup"})
        started = await _next_message(from_app_receive)
        if started.get("type") != "lifespan.startup.complete":
            await task
            if failure:
                raise failure[0]
            raise LifespanFailed(f"startup: {started}")
        try:
            transport = httpx.ASGITransport(app=_with_state(app, state))
            async with httpx.AsyncClient(transport=transport, base_url="http://app") as client:
                yield client, state
        finally:
            await to_app_send.send({"type": "lifespan.shutdown"})
            stopped = await _next_message(from_app_receive)
            await task
        if stopped.get("type") != "lifespan.shutdown.complete":
            raise LifespanFailed(f"shutdown: {stopped}") from (failure[0] if failure else None)
    finally:
        if not task.done():
            task.cancel()
            await asyncio.wait([task])
        for stream in (to_app_send, to_app_receive, from_app_send, from_app_receive):
            stream.close()


async def _next_message(stream: Any) -> Message:
    try:
        message: Message = await stream.receive()
    except anyio.EndOfStream:
        return {"type": "harness.app_returned"}
    return message


def new_email(prefix: str) -> str:
    return f"{prefix}-{secrets.token_hex(6)}@example.com"


async def sign_up(better_auth: LocalBetterAuth, name: str) -> tuple[str, str]:
    """A new Better Auth account: (email, session token)."""
    email = new_email(name.lower())
    async with BetterAuthClient(better_auth.url) as auth:
        session = secret_session(await auth.sign_up(name, email, PASSWORD))
    return email, session.session_token


async def browser_cookies(better_auth: LocalBetterAuth, email: str) -> dict[str, str]:
    """The cookies a browser holds after signing in: Better Auth's own Set-Cookie values."""
    async with (
        aiohttp.ClientSession() as http,
        http.post(
            f"{better_auth.url}/api/auth/sign-in/email",
            json={"email": email, "password": PASSWORD},
            headers={"Origin": better_auth.url},
        ) as response,
    ):
        assert response.status == 200
        # As sent back by a browser: the raw, still URL-encoded, values.
        cookies = {name: morsel.coded_value for name, morsel in response.cookies.items()}
    for value in cookies.values():
        secret(value)
        secret(unquote(value))
    return cookies


def cookie_header(cookies: dict[str, str]) -> str:
    return "; ".join(f"{name}={value}" for name, value in cookies.items())


def bearer(token: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {token}"}


def assert_no_token_in(response: httpx.Response, *tokens: str) -> None:
    text = response.text + "".join(f"{k}: {v}" for k, v in response.headers.items())
    for token in tokens:
        assert token not in text


@pytest.fixture
async def service_account(better_auth_server: LocalBetterAuth) -> str:
    """The email of a fresh service account (its password is PASSWORD)."""
    email, _ = await sign_up(better_auth_server, "Service")
    return email


@pytest.fixture
def settings(
    better_auth_server: LocalBetterAuth, convex_server: LocalConvex, service_account: str
) -> Settings:
    return Settings(
        convex_url=convex_server.url,
        better_auth_url=better_auth_server.url,
        service_email=service_account,
        service_password=PASSWORD,
    )


def resources_of(state: dict[str, Any]) -> ConvexResources:
    resources = state[STATE_KEY]
    assert isinstance(resources, ConvexResources)
    return resources


def service_session_token(service: AuthenticatedConvexClient[BetterAuthSession] | None) -> str:
    """The Better Auth session token the service identity holds now."""
    assert service is not None
    provider = service.provider
    assert isinstance(provider, ConvexBetterAuthProvider)
    token = provider.session_token
    assert token is not None
    return token


# -- service identity ------------------------------------------------------------------


async def test_service_routes_run_as_the_service_account(
    settings: Settings, better_auth_server: LocalBetterAuth, service_account: str
) -> None:
    async with serve(create_app(settings)) as (client, state):
        whoami = await client.get("/service/whoami")
        assert whoami.status_code == 200
        identity = whoami.json()
        assert identity["email"] == service_account
        assert identity["issuer"] == better_auth_server.issuer
        service = resources_of(state).service
        assert service is not None
        assert isinstance(service.auth_state, Authenticated)
        assert identity["subject"] == service.auth_state.session.user_id

        sent = await client.post("/service/messages", json={"body": "from the service"})
        assert sent.status_code == 201 and sent.json()["id"]
        listed = await client.get("/service/messages")
        assert listed.status_code == 200
        assert [m["body"] for m in listed.json()] == ["from the service"]
        assert (await client.get("/healthz")).json() == {"ok": True}


async def test_one_live_connection_serves_every_service_request(
    settings: Settings, convex_server: LocalConvex
) -> None:
    async with serve(create_app(settings)) as (client, _):
        answers = await asyncio.gather(*(client.get("/service/whoami") for _ in range(10)))
        assert {a.status_code for a in answers} == {200}
        assert len(convex_server.connections) == 1


async def test_a_session_file_lets_a_restart_skip_the_password(
    settings: Settings, service_account: str, tmp_path: Path
) -> None:
    stored = Settings(
        convex_url=settings.convex_url,
        better_auth_url=settings.better_auth_url,
        service_email=service_account,
        service_password=PASSWORD,
        service_session_file=tmp_path / "service-session.json",
    )
    async with serve(create_app(stored)) as (client, state):
        first_token = service_session_token(resources_of(state).service)
        assert (await client.get("/service/whoami")).json()["email"] == service_account
    assert (tmp_path / "service-session.json").exists()

    # The stored session is restored; the password is not even tried.
    wrong_password = Settings(
        convex_url=settings.convex_url,
        better_auth_url=settings.better_auth_url,
        service_email=service_account,
        service_password=secret("not the service password 1!"),
        service_session_file=tmp_path / "service-session.json",
    )
    async with serve(create_app(wrong_password)) as (client, state):
        assert service_session_token(resources_of(state).service) == first_token
        assert (await client.get("/service/whoami")).json()["email"] == service_account


async def test_the_service_signs_in_again_when_its_session_is_revoked(
    settings: Settings, better_auth_server: LocalBetterAuth, service_account: str
) -> None:
    async with serve(create_app(settings)) as (client, state):
        service = resources_of(state).service
        assert service is not None
        revoked = service_session_token(service)
        async with BetterAuthClient(better_auth_server.url) as auth:
            await auth.sign_out(revoked)
        # The next token fetch learns that the session is gone: the service is signed
        # out, and its watcher signs in again with the credentials.
        with pytest.raises(SessionExpiredError):
            await service.refresh_now()
        with anyio.fail_after(15):
            async for auth_state in service.auth_states():
                if isinstance(auth_state, Authenticated):
                    break
        assert service_session_token(service) != revoked
        whoami = await client.get("/service/whoami")
        assert whoami.status_code == 200 and whoami.json()["email"] == service_account


async def test_the_app_reads_its_settings_from_the_environment(
    better_auth_server: LocalBetterAuth,
    convex_server: LocalConvex,
    service_account: str,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setenv("CONVEX_URL", convex_server.url)
    monkeypatch.setenv("BETTER_AUTH_URL", better_auth_server.url)
    monkeypatch.setenv("SERVICE_EMAIL", service_account)
    monkeypatch.setenv("SERVICE_PASSWORD", PASSWORD)
    monkeypatch.delenv("SERVICE_SESSION_FILE", raising=False)
    async with serve(create_app()) as (client, _):
        assert (await client.get("/service/whoami")).json()["email"] == service_account


async def test_a_wrong_service_password_fails_startup_and_leaves_nothing(
    settings: Settings, service_account: str
) -> None:
    wrong = Settings(
        convex_url=settings.convex_url,
        better_auth_url=settings.better_auth_url,
        service_email=service_account,
        service_password=secret("wrong service password 2?"),
    )
    before = asyncio.all_tasks()
    with pytest.raises(InvalidCredentialsError):
        async with serve(create_app(wrong)):
            pytest.fail("the app started with a wrong password")
    assert asyncio.all_tasks() - before == set()


async def test_shutdown_closes_everything_and_signs_the_service_out(
    settings: Settings, better_auth_server: LocalBetterAuth, convex_server: LocalConvex
) -> None:
    user_email, user_token = await sign_up(better_auth_server, "Shutdown")
    before = asyncio.all_tasks()
    async with serve(create_app(settings)) as (client, state):
        resources = resources_of(state)
        service = resources.service
        assert service is not None
        service_token = service_session_token(service)
        assert (await client.get("/service/whoami")).status_code == 200
        assert (await client.get("/me", headers=bearer(user_token))).status_code == 200
        during = asyncio.all_tasks() - before
        assert any(t.get_name().startswith("dartvex_auth_better") for t in during)
    # No task the app started is left: not the socket, not the refresher, not the watcher.
    assert asyncio.all_tasks() - before == set()
    assert service.client.connection_state is ConnectionState.CLOSED
    assert resources.auth.closed and resources.http.closed
    # With no session store, nothing could restore the session: it was revoked.
    async with BetterAuthClient(better_auth_server.url) as auth:
        assert await auth.get_session(service_token) is None
        # The caller's session is the caller's: untouched.
        assert await auth.get_session(user_token) is not None
    assert user_email


# -- per request, as the caller -----------------------------------------------------------


async def test_a_bearer_token_acts_as_its_user(
    settings: Settings, better_auth_server: LocalBetterAuth, service_account: str
) -> None:
    email, token = await sign_up(better_auth_server, "Bearer")
    async with serve(create_app(settings)) as (client, _):
        me = await client.get("/me", headers=bearer(token))
        assert me.status_code == 200 and me.json()["email"] == email
        sent = await client.post("/me/messages", json={"body": "mine"}, headers=bearer(token))
        assert sent.status_code == 201
        await client.post("/service/messages", json={"body": "the service's"})
        mine = await client.get("/me/messages", headers=bearer(token))
        assert [m["body"] for m in mine.json()] == ["mine"]
        theirs = await client.get("/service/messages")
        assert [m["body"] for m in theirs.json()] == ["the service's"]
        assert_no_token_in(me, token)
    assert email != service_account


@pytest.mark.parametrize("prefix", ["", "__Secure-"])
async def test_the_session_cookie_acts_as_its_user(
    settings: Settings, better_auth_server: LocalBetterAuth, prefix: str
) -> None:
    email, _ = await sign_up(better_auth_server, "Cookie")
    cookies = await browser_cookies(better_auth_server, email)
    assert "better-auth.session_token" in cookies
    # Everything the browser holds is sent along, the JWT cookie included.
    sent = {prefix + name: value for name, value in cookies.items()}
    async with serve(create_app(settings)) as (client, _):
        me = await client.get("/me", headers={"Cookie": cookie_header(sent)})
        assert me.status_code == 200 and me.json()["email"] == email
        posted = await client.post(
            "/me/messages", json={"body": "by cookie"}, headers={"Cookie": cookie_header(sent)}
        )
        assert posted.status_code == 201
        mine = await client.get("/me/messages", headers={"Cookie": cookie_header(sent)})
        assert [m["body"] for m in mine.json()] == ["by cookie"]


async def test_anonymous_callers_get_401(settings: Settings) -> None:
    async with serve(create_app(settings)) as (client, _):
        for headers in ({}, {"Authorization": "Basic dXNlcjpwYXNz"}, bearer("")):
            response = await client.get("/me", headers=headers)
            assert response.status_code == 401, headers
            assert response.headers["WWW-Authenticate"].startswith("Bearer")
        unrelated = {"Cookie": "theme=dark; better-auth.session_data=abc"}
        assert (await client.get("/me/messages", headers=unrelated)).status_code == 401


async def test_a_signed_out_users_token_gets_401(
    settings: Settings, better_auth_server: LocalBetterAuth
) -> None:
    email, token = await sign_up(better_auth_server, "Gone")
    cookies = await browser_cookies(better_auth_server, email)
    async with serve(create_app(settings)) as (client, _):
        assert (await client.get("/me", headers=bearer(token))).status_code == 200
        async with BetterAuthClient(better_auth_server.url) as auth:
            await auth.sign_out(token)
        refused = await client.get("/me", headers=bearer(token))
        assert refused.status_code == 401
        assert refused.headers["WWW-Authenticate"] == 'Bearer error="invalid_token"'
        assert_no_token_in(refused, token)
        # The browser's own session (a second sign-in) is another session: still fine.
        still = await client.get("/me", headers={"Cookie": cookie_header(cookies)})
        assert still.status_code == 200 and still.json()["email"] == email


async def test_a_forged_token_gets_401(settings: Settings) -> None:
    forged = secret("forged" + secrets.token_hex(16) + ".c2lnbmF0dXJl")
    async with serve(create_app(settings)) as (client, _):
        response = await client.get("/me", headers=bearer(forged))
        assert response.status_code == 401
        assert_no_token_in(response, forged)
