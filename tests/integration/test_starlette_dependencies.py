"""The Starlette integration's parts, in a plain Starlette app (no FastAPI): where the
caller's token is found, how upstream failures map to HTTP statuses, the error handler,
configuration mistakes, and the service identity's lifecycle: its edge cases, and its
token refreshed in the background while the app serves (3-second JWTs).

Upstream failures come from the scripted FakeBetterAuth; the rest runs on the real stack.
"""

from __future__ import annotations

import asyncio
import importlib
import itertools
import socket
import sys
import time
from collections import Counter
from collections.abc import Callable
from pathlib import Path
from typing import Any

import aiohttp
import anyio
import httpx
import pytest
from starlette.applications import Starlette
from starlette.requests import HTTPConnection, Request
from starlette.responses import JSONResponse
from starlette.routing import Route

from dartvex_auth_better import (
    AuthEvent,
    BetterAuthClient,
    ClientClosedError,
    ConvexError,
    DartvexError,
    FileSessionStore,
    RateLimitedError,
    SessionExpiredError,
    TransportError,
)
from dartvex_auth_better.integrations.starlette import (
    ConvexLifespan,
    caller_session_token,
    convex_error_handler,
    convex_resources,
    service_client,
    user_client,
)
from dartvex_auth_better.testing import LocalBetterAuth, LocalConvex, register_demo_app
from tests.better_auth_fakes import FakeBetterAuth, Reply, fake_better_auth, no_secrets_in_logs
from tests.integration.test_starlette_example import (
    PASSWORD,
    bearer,
    serve,
    service_session_token,
    sign_up,
)

__all__ = ["fake_better_auth", "no_secrets_in_logs"]  # fixtures used by name

pytestmark = [pytest.mark.anyio, pytest.mark.integration]

TOKEN_PATH = "/api/auth/convex/token"
# A well-formed signed session token; the fake server does not check it.
SOME_TOKEN = "abcdefghijklmnopqrstuvwxyz012345.c2lnbmF0dXJlc2lnbmF0dXJlc2lnbmF0dXJl"


def app_with(lifespan: ConvexLifespan | None) -> Starlette:
    """A plain Starlette app using the integration the way its docstrings say."""

    async def me(request: Request) -> JSONResponse:
        convex = await user_client(request)
        return JSONResponse(await convex.query("users:whoami"))

    async def service(request: Request) -> JSONResponse:
        convex = await service_client(request)
        with anyio.fail_after(10):
            return JSONResponse(await convex.query("users:whoami"))

    return Starlette(
        routes=[Route("/me", me), Route("/service", service)],
        lifespan=lifespan,
        exception_handlers={DartvexError: convex_error_handler},
    )


def closed_port_url() -> str:
    """A loopback URL where nothing listens (the port was just free)."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    return f"http://127.0.0.1:{port}"


def connection(headers: list[tuple[str, str]]) -> HTTPConnection:
    scope = {
        "type": "http",
        "headers": [(k.lower().encode("latin-1"), v.encode("latin-1")) for k, v in headers],
    }
    return HTTPConnection(scope)


# -- finding the caller's token ---------------------------------------------------------


def test_the_bearer_header_wins_over_the_cookie() -> None:
    conn = connection(
        [("Authorization", "Bearer from-header"), ("Cookie", "better-auth.session_token=c")]
    )
    assert caller_session_token(conn) == "from-header"
    assert caller_session_token(connection([("Authorization", "bEaReR  spaced ")])) == "spaced"


def test_another_authorization_scheme_falls_back_to_the_cookie() -> None:
    conn = connection(
        [("Authorization", "Basic dXNlcjpwYXNz"), ("Cookie", "better-auth.session_token=c")]
    )
    assert caller_session_token(conn) == "c"
    assert caller_session_token(connection([("Authorization", "Basic dXNlcjpwYXNz")])) is None


@pytest.mark.parametrize(
    ("cookie", "expected"),
    [
        ("better-auth.session_token=abc.sig%3D", "abc.sig="),
        ("__Secure-better-auth.session_token=s; better-auth.session_token=p", "s"),
        ("better-auth.session_token=p; __Secure-better-auth.session_token=s", "s"),
        ("better-auth.session_data=x; better-auth.convex_jwt=y", None),
        ("better-auth.session_token=", None),
        ("better-auth.session_token_backup=z", None),
    ],
)
def test_the_session_cookie_is_matched_by_suffix(cookie: str, expected: str | None) -> None:
    assert caller_session_token(connection([("Cookie", cookie)])) == expected


# -- upstream failures ------------------------------------------------------------------


def per_request_lifespan(site_url: str) -> ConvexLifespan:
    # The Convex URL is never reached: these requests fail at the token exchange.
    return ConvexLifespan(closed_port_url(), site_url=site_url, auth_timeout=5)


@pytest.mark.parametrize(
    ("reply", "status", "retry_after"),
    [
        (Reply(401, json={"code": "UNAUTHORIZED"}), 401, None),
        (Reply(403), 401, None),
        (Reply(429, json={"message": "slow down"}, headers=[("Retry-After", "6.2")]), 503, "7"),
        (Reply(429), 503, None),
        (Reply(503, body="<html>down</html>", content_type="text/html"), 503, None),
        (Reply(404), 502, None),
        (Reply(200, json={"token": ""}), 502, None),
    ],
)
async def test_token_exchange_failures_map_to_statuses(
    fake_better_auth: FakeBetterAuth, reply: Reply, status: int, retry_after: str | None
) -> None:
    fake_better_auth.on("GET", TOKEN_PATH, reply)
    async with serve(app_with(per_request_lifespan(fake_better_auth.url))) as (client, _):
        response = await client.get("/me", headers=bearer(SOME_TOKEN))
    assert response.status_code == status
    assert response.headers.get("Retry-After") == retry_after
    assert SOME_TOKEN not in response.text
    [received] = fake_better_auth.requests(TOKEN_PATH)
    assert received.headers["Authorization"] == f"Bearer {SOME_TOKEN}"


async def test_an_unreachable_auth_server_is_503() -> None:
    async with serve(app_with(per_request_lifespan(closed_port_url()))) as (client, _):
        response = await client.get("/me", headers=bearer(SOME_TOKEN))
    assert response.status_code == 503
    assert "unavailable" in response.text


@pytest.mark.parametrize(
    "token", ["two words", "x" * 5000, "caf\u00e9"], ids=["space", "long", "non-ascii"]
)
async def test_a_malformed_token_is_401_without_asking_upstream(
    fake_better_auth: FakeBetterAuth, token: str
) -> None:
    async with serve(app_with(per_request_lifespan(fake_better_auth.url))) as (client, _):
        # As bytes: httpx would refuse to encode the non-ASCII one itself.
        raw = [(b"authorization", f"Bearer {token}".encode())]
        response = await client.get("/me", headers=raw)
    assert response.status_code == 401
    assert response.headers["WWW-Authenticate"] == 'Bearer error="invalid_token"'
    assert fake_better_auth.requests() == []


# -- the error handler ------------------------------------------------------------------


@pytest.mark.parametrize(
    ("error", "status", "retry_after"),
    [
        (TransportError("could not reach Convex"), 503, None),
        (RateLimitedError("limited", retry_after=2.5), 503, "3"),
        (ClientClosedError("the Convex client was closed"), 503, None),
        (TimeoutError(), 504, None),
    ],
)
async def test_the_error_handler_maps_transient_errors(
    error: Exception, status: int, retry_after: str | None
) -> None:
    async def fail(request: Request) -> JSONResponse:
        raise error

    app = Starlette(
        routes=[Route("/", fail)],
        exception_handlers={DartvexError: convex_error_handler, TimeoutError: convex_error_handler},
    )
    async with httpx.AsyncClient(
        transport=httpx.ASGITransport(app=app), base_url="http://app"
    ) as client:
        response = await client.get("/")
    assert response.status_code == status
    assert response.headers.get("Retry-After") == retry_after


async def test_the_error_handler_leaves_other_errors_alone() -> None:
    async def fail(request: Request) -> JSONResponse:
        raise ConvexError("the function threw", data={"code": "NOPE"})

    app = Starlette(
        routes=[Route("/", fail)], exception_handlers={DartvexError: convex_error_handler}
    )
    async with httpx.AsyncClient(
        transport=httpx.ASGITransport(app=app), base_url="http://app"
    ) as client:
        with pytest.raises(ConvexError, match="the function threw"):
            await client.get("/")


# -- configuration ----------------------------------------------------------------------


@pytest.mark.parametrize(
    "make",
    [
        lambda: ConvexLifespan("http://127.0.0.1:1", email="a@example.com"),
        lambda: ConvexLifespan("http://127.0.0.1:1", password="pw"),
        lambda: ConvexLifespan("http://127.0.0.1:1", email="", password=""),
        lambda: ConvexLifespan("https://example.com/path"),
        lambda: ConvexLifespan("http://example.com"),
        lambda: ConvexLifespan("http://127.0.0.1:1", startup_timeout=0),
        lambda: ConvexLifespan("http://127.0.0.1:1", call_timeout=True),
    ],
)
def test_bad_configuration_fails_at_construction(make: Callable[[], ConvexLifespan]) -> None:
    with pytest.raises(ValueError):
        make()


def test_the_repr_never_shows_the_password() -> None:
    lifespan = ConvexLifespan("https://x.convex.cloud", email="bot@example.com", password="pw-42")
    assert "pw-42" not in repr(lifespan) and "bot@example.com" in repr(lifespan)
    assert lifespan.has_service_identity
    assert not ConvexLifespan("https://x.convex.cloud").has_service_identity


async def test_without_the_lifespan_the_dependencies_say_how_to_fix_it() -> None:
    async with httpx.AsyncClient(
        transport=httpx.ASGITransport(app=app_with(None)), base_url="http://app"
    ) as client:
        with pytest.raises(RuntimeError, match="no ConvexLifespan is running"):
            await client.get("/me", headers=bearer(SOME_TOKEN))


async def test_service_client_without_a_service_identity_is_a_setup_error(
    convex_server: LocalConvex, better_auth_server: LocalBetterAuth
) -> None:
    lifespan = ConvexLifespan(convex_server.url, site_url=better_auth_server.url)
    async with serve(app_with(lifespan)) as (client, state):
        assert convex_resources_from(state).service is None
        with pytest.raises(RuntimeError, match="no service identity"):
            await client.get("/service")


def test_a_missing_starlette_gives_an_install_hint(monkeypatch: pytest.MonkeyPatch) -> None:
    module = "dartvex_auth_better.integrations.starlette"
    monkeypatch.delitem(sys.modules, module)
    for name in ("starlette", "starlette.exceptions", "starlette.requests"):
        monkeypatch.setitem(sys.modules, name, None)
    with pytest.raises(ImportError, match=r"pip install 'dartvex-auth-better\[starlette\]'"):
        importlib.import_module(module)


def convex_resources_from(state: dict[str, Any]) -> Any:
    return convex_resources(HTTPConnection({"type": "http", "headers": [], "state": state}))


# -- per request, on the real stack -----------------------------------------------------


async def test_requests_share_one_http_session(
    convex_server: LocalConvex,
    better_auth_server: LocalBetterAuth,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    email, token = await sign_up(better_auth_server, "Shared")
    created: list[aiohttp.ClientSession] = []
    original_init = aiohttp.ClientSession.__init__

    def counting_init(self: aiohttp.ClientSession, *args: Any, **kwargs: Any) -> None:
        created.append(self)
        original_init(self, *args, **kwargs)

    lifespan = ConvexLifespan(convex_server.url, site_url=better_auth_server.url)
    async with serve(app_with(lifespan)) as (client, state):
        # A first request lets LocalConvex create its own (lazy, server-side) JWKS session.
        assert (await client.get("/me", headers=bearer(token))).status_code == 200
        monkeypatch.setattr(aiohttp.ClientSession, "__init__", counting_init)
        answers = await asyncio.gather(
            *(client.get("/me", headers=bearer(token)) for _ in range(5))
        )
        monkeypatch.undo()
        assert [a.json()["email"] for a in answers] == [email] * 5
        assert created == []
        assert not convex_resources_from(state).http.closed
        # Per-request mode is one-shot HTTP calls: no sync WebSocket was ever opened.
        assert convex_resources_from(state).service is None
        assert convex_server.connections == []


# -- the service identity's edge cases ---------------------------------------------------


async def active_sessions(better_auth: LocalBetterAuth, session_token: str) -> int:
    """How many live sessions the token's user has (Better Auth's ``list-sessions``)."""
    async with (
        aiohttp.ClientSession() as http,
        http.get(
            f"{better_auth.url}/api/auth/list-sessions",
            headers={"Authorization": f"Bearer {session_token}", "Origin": better_auth.url},
        ) as response,
    ):
        assert response.status == 200
        sessions = await response.json()
    assert isinstance(sessions, list)
    return len(sessions)


async def test_startup_gives_up_when_convex_never_confirms(
    better_auth_server: LocalBetterAuth,
) -> None:
    email, own_token = await sign_up(better_auth_server, "Unconfirmed")
    lifespan = ConvexLifespan(
        closed_port_url(),
        site_url=better_auth_server.url,
        email=email,
        password=PASSWORD,
        startup_timeout=1,
    )
    before = asyncio.all_tasks()
    sessions_before = await active_sessions(better_auth_server, own_token)
    assert sessions_before == 1
    with pytest.raises(TimeoutError, match="startup_timeout"):
        async with serve(app_with(lifespan)):
            pytest.fail("the app started without a confirmed identity")
    assert asyncio.all_tasks() - before == set()
    # The Better Auth sign-in had worked: that session was revoked on the way out.
    assert await active_sessions(better_auth_server, own_token) == sessions_before


async def test_a_store_only_service_that_loses_its_session_answers_503(
    convex_server: LocalConvex, better_auth_server: LocalBetterAuth, tmp_path: Path
) -> None:
    store = FileSessionStore(tmp_path / "session.json")
    email, _ = await sign_up(better_auth_server, "StoreOnly")
    seed = ConvexLifespan(
        convex_server.url,
        site_url=better_auth_server.url,
        email=email,
        password=PASSWORD,
        store=store,
    )
    async with seed.run() as resources:
        session_token = service_session_token(resources.service)
    assert await store.get() is not None

    # Restarted from the store alone, with no credentials to fall back on.
    store_only = ConvexLifespan(convex_server.url, site_url=better_auth_server.url, store=store)
    async with serve(app_with(store_only)) as (client, state):
        ok = await client.get("/service")
        assert ok.status_code == 200 and ok.json()["email"] == email
        service = convex_resources_from(state).service
        async with BetterAuthClient(better_auth_server.url) as auth:
            await auth.sign_out(session_token)
        with pytest.raises(SessionExpiredError):
            await service.refresh_now()
        refused = await client.get("/service")
        assert refused.status_code == 503
    assert await store.get() is None  # the dead session was forgotten


async def test_a_store_without_a_session_and_no_credentials_fails_startup(
    convex_server: LocalConvex, better_auth_server: LocalBetterAuth, tmp_path: Path
) -> None:
    store = FileSessionStore(tmp_path / "empty.json")
    lifespan = ConvexLifespan(convex_server.url, site_url=better_auth_server.url, store=store)
    with pytest.raises(DartvexError, match="no email and password"):
        async with serve(app_with(lifespan)):
            pytest.fail("the app started without a service identity")


# The shortest JWT lifetime the SDK schedules a refresh for is anything over
# MIN_TOKEN_LIFETIME (2 s). With the leeway capped at half the lifetime, a 3-second token
# is replaced about 1.3 to 1.5 s after it was issued: always in a later second than its
# predecessor, so always a different JWT.
SHORT_JWT_TTL = 3


async def test_the_service_token_is_refreshed_in_the_background_while_serving() -> None:
    async with (
        LocalBetterAuth(jwt_ttl_seconds=SHORT_JWT_TTL) as better_auth,
        LocalConvex(jwks_url=better_auth.jwks_url, issuer=better_auth.issuer) as convex,
    ):
        register_demo_app(convex)
        email, _ = await sign_up(better_auth, "Refreshed")
        lifespan = ConvexLifespan(
            convex.url, site_url=better_auth.url, email=email, password=PASSWORD
        )
        statuses: Counter[int] = Counter()
        refreshes = 0
        async with serve(app_with(lifespan)) as (client, state):
            service = convex_resources_from(state).service
            events = service.auth_events()
            started = time.monotonic()

            async def keep_requesting() -> None:
                while True:  # paced by the requests themselves
                    response = await client.get("/service")
                    statuses[response.status_code] += 1
                    assert response.status_code != 200 or response.json()["email"] == email

            # Serve across two token lifetimes (and at least two refreshes), then stop.
            with anyio.fail_after(2 * SHORT_JWT_TTL + 5):
                async with anyio.create_task_group() as tg:
                    tg.start_soon(keep_requesting)
                    async for event in events:
                        assert event is AuthEvent.TOKEN_REFRESHED
                        refreshes += 1
                        if refreshes >= 2 and time.monotonic() - started >= 2 * SHORT_JWT_TTL:
                            break
                    tg.cancel_scope.cancel()
            events.close()

        assert statuses[200] > refreshes and set(statuses) == {200}, statuses  # never a 503
        # The sign-in's token, then one new token per refresh, each accepted, each sent
        # before its predecessor expired, all on the one socket.
        tokens = convex.received_tokens
        assert len(tokens) == refreshes + 1 >= 3
        assert len({t.token for t in tokens}) == len(tokens)
        assert all(t.accepted and not t.was_expired for t in tokens)
        for previous, current in itertools.pairwise(tokens):
            assert previous.exp is not None and current.received_at < previous.exp
        assert len(convex.connections) == 1
