"""Starlette and FastAPI integration: a lifespan that owns the SDK's clients, and
dependencies that hand them to request handlers.

Two ways for a backend to talk to Convex:

**Service identity.** The service signs in as its own Better Auth account (email and
password, or a session restored from a :class:`~dartvex_auth_better.SessionStore`) once,
at startup, and keeps one live, authenticated ConvexClient for its whole life; the SDK
refreshes the Convex JWT in the background. Handlers get it from :func:`service_client`.

**Per request, as the caller.** A backend acting for the browser or app that called it
takes the caller's Better Auth session token (``Authorization: Bearer`` or the Better
Auth session cookie), exchanges it for a Convex JWT and makes one-shot HTTP calls with
it: no socket, no background refresh, nothing kept after the request, so the backend
never competes with the caller's own client over the session. Handlers get a
:class:`~dartvex_auth_better.ConvexHttpClient` from :func:`user_client`.

::

    from typing import Annotated
    import anyio
    from fastapi import Depends, FastAPI
    from dartvex_auth_better import AuthenticatedConvexClient, BetterAuthSession
    from dartvex_auth_better import ConvexHttpClient, DartvexError
    from dartvex_auth_better.integrations.starlette import (
        ConvexLifespan, convex_error_handler, service_client, user_client,
    )

    Service = Annotated[AuthenticatedConvexClient[BetterAuthSession], Depends(service_client)]
    Caller = Annotated[ConvexHttpClient, Depends(user_client)]

    app = FastAPI(lifespan=ConvexLifespan(CONVEX_URL, email=EMAIL, password=PASSWORD))
    app.add_exception_handler(DartvexError, convex_error_handler)

    @app.get("/service/whoami")
    async def service_whoami(convex: Service) -> dict[str, object]:
        with anyio.fail_after(10):  # the live client waits through reconnects
            return await convex.query("users:whoami")

    @app.get("/me/messages")
    async def my_messages(convex: Caller) -> list[dict[str, object]]:
        return await convex.query("messages:list")

Both modes share one ``aiohttp.ClientSession`` and one
:class:`~dartvex_auth_better.BetterAuthClient`, created at startup and closed at
shutdown, so a request costs one call to Better Auth and none of them opens a connection
pool of its own.

Only this module imports Starlette (``pip install 'dartvex-auth-better[starlette]'``).
"""

from __future__ import annotations

import asyncio
import logging
import math
import random
from collections.abc import AsyncIterator, Mapping
from contextlib import AsyncExitStack, asynccontextmanager
from typing import Final, TypedDict
from urllib.parse import unquote

import aiohttp
import anyio

from .._errors import (
    ClientClosedError,
    DartvexError,
    InvalidCredentialsError,
    NoSessionError,
    RateLimitedError,
    SessionExpiredError,
)
from .._urls import normalize_base_url
from .._version import __version__
from ..better_auth._client import BetterAuthClient
from ..better_auth._provider import ConvexBetterAuthProvider
from ..better_auth._session import BetterAuthSession
from ..better_auth._storage import SessionStore
from ..better_auth._tokens import SESSION_COOKIE
from ..convex._auth_types import Authenticated, Unauthenticated
from ..convex._authed import AuthenticatedConvexClient
from ..convex._client import ConvexClient
from ..convex._http import ConvexHttpClient

try:
    from starlette.exceptions import HTTPException
    from starlette.requests import HTTPConnection, Request
    from starlette.responses import JSONResponse, Response
except ImportError as exc:  # pragma: no cover - depends on the environment
    raise ImportError(
        "dartvex_auth_better.integrations.starlette needs Starlette (FastAPI includes it): "
        "pip install 'dartvex-auth-better[starlette]'"
    ) from exc

__all__ = [
    "STATE_KEY",
    "ConvexLifespan",
    "ConvexResources",
    "ConvexState",
    "caller_session_token",
    "convex_error_handler",
    "convex_resources",
    "service_client",
    "user_client",
]

log = logging.getLogger(__name__)

STATE_KEY: Final = "dartvex_auth_better"
"""The key of :class:`ConvexResources` in the lifespan state (and so in ``request.state``)."""

# Longer than any token Better Auth issues (a session token plus its signature is under
# 100 characters); a bound keeps a hostile header from being forwarded upstream.
_MAX_TOKEN_LENGTH: Final = 4096
_SECURE_PREFIX: Final = "__Secure-"

# Signing the service in again after its session ended: exponential backoff with jitter.
_RELOGIN_FIRST_DELAY: Final = 1.0
_RELOGIN_MAX_DELAY: Final = 60.0
# A sign-out at shutdown must not hold the process up when Better Auth is unreachable.
_SHUTDOWN_SIGN_OUT_TIMEOUT: Final = 5.0


class ConvexResources:
    """What a running :class:`ConvexLifespan` shares with every request.

    ``auth`` is the BetterAuthClient of the service (and of per-request token exchanges),
    ``http`` the one aiohttp session every call goes through, and ``service`` the
    signed-in live client of the service identity, or None when none was configured.
    Created by the lifespan; handlers reach it through the dependencies, or
    :func:`convex_resources` for anything else.
    """

    def __init__(
        self,
        *,
        url: str,
        auth: BetterAuthClient,
        http: aiohttp.ClientSession,
        service: AuthenticatedConvexClient[BetterAuthSession] | None,
        call_timeout: float,
        allow_insecure: bool,
    ) -> None:
        self.url = url
        self.auth = auth
        self.http = http
        self.service = service
        self._call_timeout = call_timeout
        self._allow_insecure = allow_insecure

    def __repr__(self) -> str:
        service = "yes" if self.service is not None else "no"
        return f"<ConvexResources url={self.url!r} service={service}>"

    async def client_for(self, session_token: str) -> ConvexHttpClient:
        """A ConvexHttpClient authenticated as the owner of a Better Auth session token.

        Makes one request, for a fresh Convex JWT (``/api/auth/convex/token``); the
        client it returns borrows the shared aiohttp session and holds nothing else, so
        it needs no closing. Nothing is cached: a session that was signed out is refused
        on the very next request. Raises what
        :meth:`BetterAuthClient.convex_token <dartvex_auth_better.BetterAuthClient.convex_token>`
        raises (SessionExpiredError when the session is gone; retryable errors when
        Better Auth could not answer).
        """
        jwt = await self.auth.convex_token(session_token)
        return ConvexHttpClient(
            self.url,
            token=jwt,
            session=self.http,
            timeout=self._call_timeout,
            allow_insecure=self._allow_insecure,
        )


class ConvexState(TypedDict):
    """The lifespan state a :class:`ConvexLifespan` yields: merge it into your own state
    when you compose lifespans."""

    dartvex_auth_better: ConvexResources


class ConvexLifespan:
    """A Starlette/FastAPI lifespan that owns the SDK's clients for the app's lifetime.

    Pass it as the app's lifespan, ``FastAPI(lifespan=ConvexLifespan(url, ...))``, or
    enter it from your own lifespan and merge its state into yours::

        from contextlib import asynccontextmanager

        convex = ConvexLifespan(CONVEX_URL)

        @asynccontextmanager
        async def lifespan(app):
            async with convex(app) as state:
                yield {**state, "db": db}  # your own state beside the SDK's

        app = FastAPI(lifespan=lifespan)

    ``url`` is the Convex deployment URL; Better Auth is reached on its ``.convex.site``
    host unless ``site_url`` says otherwise (self-hosted and local setups).

    The service identity is configured by ``email`` and ``password`` (both or neither),
    ``store``, or both. At startup a session persisted in ``store`` is restored first;
    when there is none, or it is gone, the service signs in with the credentials (and
    persists the new session in ``store``). Startup fails, and the app does not start,
    when neither works or the Convex server has not confirmed the identity within
    ``startup_timeout`` seconds. With neither credentials nor store there is no service
    identity and only the per-request mode is available.

    While the app runs, the SDK keeps the service's Convex JWT fresh. If the Better Auth
    session itself ends (revoked, expired), the service signs in again with its
    credentials, retrying with backoff; without credentials it stays signed out (and
    :func:`service_client` answers 503) until restarted.

    At shutdown everything is closed. ``sign_out_on_shutdown`` also revokes the
    service's session; by default it does so only when no ``store`` was given, since
    then nothing could ever restore that session.

    ``auth_timeout`` bounds each call to Better Auth and ``call_timeout`` each
    per-request Convex call, in seconds. ``allow_insecure`` permits plain ``http://`` to
    non-loopback hosts. One instance may be started again after it stopped; each run
    gets fresh clients. The constructor does no I/O.
    """

    def __init__(
        self,
        url: str,
        *,
        site_url: str | None = None,
        email: str | None = None,
        password: str | None = None,
        store: SessionStore | None = None,
        sign_out_on_shutdown: bool | None = None,
        startup_timeout: float = 30.0,
        auth_timeout: float = 10.0,
        call_timeout: float = 30.0,
        allow_insecure: bool = False,
    ) -> None:
        self._url = normalize_base_url(url, name="url", allow_insecure=allow_insecure)
        self._site_url = (
            normalize_base_url(site_url, name="site_url", allow_insecure=allow_insecure)
            if site_url is not None
            else None
        )
        if (email is None) != (password is None):
            raise ValueError("pass both email and password for the service identity, or neither")
        if email is not None and password is not None and not (email and password):
            raise ValueError("email and password must be non-empty")
        for name, value in (
            ("startup_timeout", startup_timeout),
            ("auth_timeout", auth_timeout),
            ("call_timeout", call_timeout),
        ):
            if isinstance(value, bool) or not isinstance(value, int | float) or not value > 0:
                raise ValueError(f"{name} must be a positive number of seconds")
        self._email = email
        self._password = password
        self._store = store
        self._sign_out_on_shutdown = (
            sign_out_on_shutdown if sign_out_on_shutdown is not None else store is None
        )
        self._startup_timeout = float(startup_timeout)
        self._auth_timeout = float(auth_timeout)
        self._call_timeout = float(call_timeout)
        self._allow_insecure = allow_insecure

    @property
    def url(self) -> str:
        """The Convex deployment URL, normalised."""
        return self._url

    @property
    def has_service_identity(self) -> bool:
        """True when credentials or a store configure a service identity."""
        return self._email is not None or self._store is not None

    def __repr__(self) -> str:
        # Never the password; the email names an account, not a secret.
        who = f" email={self._email!r}" if self._email is not None else ""
        store = " store" if self._store is not None else ""
        return f"<ConvexLifespan url={self._url!r}{who}{store}>"

    @asynccontextmanager
    async def __call__(self, app: object) -> AsyncIterator[ConvexState]:
        """Run the clients for ``app``: start them, yield the lifespan state, close them."""
        async with self.run() as resources:
            yield {STATE_KEY: resources}

    @asynccontextmanager
    async def run(self) -> AsyncIterator[ConvexResources]:
        """Start the clients, yield them, close them: the lifespan without an app.

        For code that is not a Starlette app (a worker, a test) but wants the same setup.
        """
        async with AsyncExitStack() as stack:
            # Auth travels in headers only. A real cookie jar, shared by every request,
            # would carry one caller's session cookie into the next caller's calls.
            http = aiohttp.ClientSession(
                cookie_jar=aiohttp.DummyCookieJar(),
                headers={"User-Agent": f"dartvex-auth-better/{__version__}"},
            )
            stack.push_async_callback(http.close)
            auth = BetterAuthClient(
                self._url,
                site_url=self._site_url,
                session=http,
                timeout=self._auth_timeout,
                connect_timeout=min(self._auth_timeout, 10.0),
                allow_insecure=self._allow_insecure,
            )
            stack.push_async_callback(auth.aclose)
            service = None
            if self.has_service_identity:
                service = await stack.enter_async_context(self._service_identity(auth, http))
            yield ConvexResources(
                url=self._url,
                auth=auth,
                http=http,
                service=service,
                call_timeout=self._call_timeout,
                allow_insecure=self._allow_insecure,
            )

    # -- the service identity ------------------------------------------------------------

    @asynccontextmanager
    async def _service_identity(
        self, auth: BetterAuthClient, http: aiohttp.ClientSession
    ) -> AsyncIterator[AuthenticatedConvexClient[BetterAuthSession]]:
        provider = ConvexBetterAuthProvider(auth, store=self._store)
        try:
            # expect_auth: the service must never send a request anonymously, not even
            # while it signs in.
            async with ConvexClient(
                self._url, session=http, expect_auth=True, allow_insecure=self._allow_insecure
            ) as convex:
                authed = convex.with_auth(provider)
                await self._sign_in(authed)
                # An owned task rather than a task group around the yield: a task group
                # would wrap whatever the app's lifespan raises into an ExceptionGroup.
                watcher = asyncio.get_running_loop().create_task(
                    self._keep_signed_in(authed),
                    name="dartvex_auth_better.integrations.starlette.keep_signed_in",
                )
                try:
                    yield authed
                finally:
                    watcher.cancel()
                    with anyio.CancelScope(shield=True):
                        await asyncio.wait([watcher])
        finally:
            # After the socket is closed, so no refresh can race the sign-out.
            if self._sign_out_on_shutdown and provider.session is not None:
                await self._sign_out(provider)

    async def _sign_in(self, authed: AuthenticatedConvexClient[BetterAuthSession]) -> None:
        """Restore or sign in, and wait until the Convex server confirmed the identity."""
        how = "restored from the store"
        try:
            with anyio.fail_after(self._startup_timeout):
                session = None
                if self._store is not None:
                    try:
                        session = await authed.login_from_cache()
                    except (NoSessionError, SessionExpiredError) as exc:
                        if self._email is None:
                            raise NoSessionError(
                                "the service identity has no usable session in its store "
                                f"({exc.message}) and no email and password to sign in with"
                            ) from None
                        log.info("no usable stored service session (%s); signing in", exc)
                if session is None:
                    assert self._email is not None and self._password is not None
                    how = "signed in"
                    session = await authed.login(self._email, self._password)
        except TimeoutError:
            raise TimeoutError(
                f"the service identity was not authenticated on Convex within "
                f"{self._startup_timeout:g} s (startup_timeout): is the deployment at "
                f"{self._url} reachable, and does it trust this Better Auth server?"
            ) from None
        log.info("service identity %s: %s (user %s)", how, session.email, session.user_id)

    async def _keep_signed_in(self, authed: AuthenticatedConvexClient[BetterAuthSession]) -> None:
        """Sign the service in again whenever its session ends, until cancelled.

        Nothing but cancellation ends it: an error here is logged, never raised, since
        nobody awaits this task until shutdown.
        """
        try:
            async for state in authed.auth_states():
                if not isinstance(state, Unauthenticated):
                    continue
                if self._email is None or self._password is None:
                    log.error(
                        "the service's Better Auth session ended and there are no credentials "
                        "to sign in again; service calls fail until the app is restarted"
                    )
                    continue
                await self._sign_in_again(authed, self._email, self._password)
        except Exception:
            log.exception("the service sign-in watcher failed; it will not sign in again")

    async def _sign_in_again(
        self, authed: AuthenticatedConvexClient[BetterAuthSession], email: str, password: str
    ) -> None:
        delay = _RELOGIN_FIRST_DELAY
        while True:
            log.warning("the service's Better Auth session ended; signing in again")
            try:
                session = await authed.login(email, password)
            except InvalidCredentialsError:
                log.error(
                    "the service's credentials were refused (INVALID_EMAIL_OR_PASSWORD); it "
                    "stays signed out until the app is restarted with the right ones"
                )
                return
            except DartvexError as exc:
                wait = delay * random.uniform(0.5, 1.5)
                log.warning("signing the service in again failed (%s); retry in %.1f s", exc, wait)
                await anyio.sleep(wait)
                delay = min(delay * 2, _RELOGIN_MAX_DELAY)
                continue
            log.info("service identity signed in again: %s", session.user_id)
            return

    async def _sign_out(self, provider: ConvexBetterAuthProvider) -> None:
        # Shielded: a shutdown being cancelled must still not leave a live session
        # behind when it can help it, and bounded, so it cannot hang the shutdown.
        with anyio.CancelScope(shield=True), anyio.move_on_after(_SHUTDOWN_SIGN_OUT_TIMEOUT):
            try:
                await provider.logout()
            except DartvexError as exc:
                log.warning("could not sign the service out at shutdown: %s", exc)
                return
            log.debug("service identity signed out at shutdown")


# -- request-side helpers ----------------------------------------------------------------


def convex_resources(conn: HTTPConnection) -> ConvexResources:
    """The running lifespan's :class:`ConvexResources`, from a request or WebSocket.

    Raises RuntimeError when no :class:`ConvexLifespan` put them in the lifespan state: a
    setup mistake, not a client error, so it becomes a 500.
    """
    resources = conn.scope.get("state", {}).get(STATE_KEY)
    if not isinstance(resources, ConvexResources):
        raise RuntimeError(
            "no ConvexLifespan is running for this app: pass lifespan=ConvexLifespan(...) "
            f"to the app, or merge its state (key {STATE_KEY!r}) into your lifespan's state"
        )
    return resources


def caller_session_token(conn: HTTPConnection) -> str | None:
    """The caller's Better Auth session token, or None when the request carries none.

    Looks at ``Authorization: Bearer <token>`` first, then at the Better Auth session
    cookie, matched by name suffix (``better-auth.session_token``, with or without the
    ``__Secure-`` prefix that Better Auth adds on https; a ``__Secure-`` one wins). An
    ``Authorization`` header with another scheme is not ours and is ignored. The value is
    returned as sent (URL-decoded, for a cookie): whether it is valid only Better Auth can
    say.
    """
    header = conn.headers.get("authorization")
    if header is not None:
        scheme, _, token = header.strip().partition(" ")
        if scheme.lower() == "bearer":
            return token.strip()
    found: str | None = None
    for name, value in conn.cookies.items():
        if not name.endswith(SESSION_COOKIE) or not value:
            continue
        if found is None or name.startswith(_SECURE_PREFIX):
            found = unquote(value)
    return found


async def service_client(conn: HTTPConnection) -> AuthenticatedConvexClient[BetterAuthSession]:
    """Dependency: the service identity's live, authenticated Convex client.

    Use as ``Annotated[AuthenticatedConvexClient[BetterAuthSession],
    Depends(service_client)]`` in FastAPI, or ``await service_client(request)`` in a
    Starlette endpoint. Raises HTTPException 503 while the service is not signed in (its
    session ended and it is signing in again), and RuntimeError (a 500) when the
    lifespan has no service identity configured.

    Its calls wait through reconnects rather than fail: bound them in handlers (for
    example ``with anyio.fail_after(10):``).
    """
    service = convex_resources(conn).service
    if service is None:
        raise RuntimeError(
            "ConvexLifespan has no service identity: give it email and password, or a store"
        )
    if not isinstance(service.auth_state, Authenticated):
        raise HTTPException(503, "the service is not signed in to Convex right now; retry later")
    return service


async def user_client(conn: HTTPConnection) -> ConvexHttpClient:
    """Dependency: a ConvexHttpClient authenticated as the caller, for this request only.

    Takes the caller's session token (see :func:`caller_session_token`), exchanges it for
    a Convex JWT with one call to Better Auth, and returns a client that makes one-shot
    HTTP calls with it; nothing runs in the background and nothing is cached between
    requests, so a sign-out takes effect at once. Failures become HTTPExceptions whose
    text never contains a token:

    * no token, or a malformed one: 401 (``WWW-Authenticate: Bearer``);
    * Better Auth says the session is gone (SessionExpiredError): 401;
    * Better Auth unreachable, timing out, 5xx or 429 (retryable errors): 503, with
      ``Retry-After`` when Better Auth said how long to wait;
    * any other answer from Better Auth (a misconfiguration): 502.

    When you accept the cookie for requests that change state, protect those routes
    against cross-site request forgery (Better Auth's cookies are ``SameSite=Lax``, which
    covers cross-site POSTs from browsers that honour it).
    """
    resources = convex_resources(conn)
    token = caller_session_token(conn)
    if not token:
        raise HTTPException(401, "not signed in", headers={"WWW-Authenticate": "Bearer"})
    if len(token) > _MAX_TOKEN_LENGTH or not all("!" <= ch <= "~" for ch in token):
        raise HTTPException(
            401,
            "the session token is malformed",
            headers={"WWW-Authenticate": 'Bearer error="invalid_token"'},
        )
    try:
        return await resources.client_for(token)
    except SessionExpiredError:
        raise HTTPException(
            401,
            "the session has expired or was signed out; sign in again",
            headers={"WWW-Authenticate": 'Bearer error="invalid_token"'},
        ) from None
    except DartvexError as exc:
        # The SDK's messages never carry tokens; say what happened in the log, and only
        # that the upstream failed in the response.
        if exc.retryable or isinstance(exc, ClientClosedError):
            log.warning("could not get a Convex token for the caller: %s", exc)
            raise HTTPException(
                503, "the auth server is unavailable; retry later", headers=_retry_after(exc)
            ) from None
        log.error("Better Auth gave an unusable answer for a caller's Convex token: %s", exc)
        raise HTTPException(502, "the auth server gave an unusable answer") from None


async def convex_error_handler(request: Request, exc: Exception) -> Response:
    """Exception handler for the SDK's transient errors raised in handlers.

    Register it for ``DartvexError`` (and, if you like, ``TimeoutError``)::

        app.add_exception_handler(DartvexError, convex_error_handler)

    A retryable error (Convex or Better Auth unreachable, a timeout, a 5xx or 429), or a
    client closed because the app is shutting down, becomes 503 (with ``Retry-After``
    when the upstream said how long to wait); a plain ``TimeoutError`` (your own
    ``anyio.fail_after``) becomes 504. Anything else is raised again, so it reaches the
    handlers and error pages it would have reached without this one: a ConvexError from
    your function is yours to map. Register a more specific handler (for ConvexError,
    say) alongside: Starlette picks the most specific one.
    """
    if isinstance(exc, DartvexError):
        if exc.retryable or isinstance(exc, ClientClosedError):
            log.warning("%s %s: upstream unavailable: %s", request.method, request.url.path, exc)
            return JSONResponse(
                {"detail": "an upstream service is unavailable; retry later"},
                status_code=503,
                headers=_retry_after(exc),
            )
        raise exc
    if isinstance(exc, TimeoutError):
        log.warning("%s %s: timed out waiting for Convex", request.method, request.url.path)
        return JSONResponse({"detail": "an upstream service timed out"}, status_code=504)
    raise exc


def _retry_after(exc: DartvexError) -> Mapping[str, str] | None:
    if isinstance(exc, RateLimitedError) and exc.retry_after is not None:
        return {"Retry-After": str(max(1, math.ceil(exc.retry_after)))}
    return None
