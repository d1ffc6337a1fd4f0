"""A FastAPI backend for a Convex app that uses Better Auth, in both integration modes.

* ``/service/...`` runs as the service's own account: one live Convex connection, signed
  in at startup and kept fresh in the background.
* ``/me...`` runs as the caller: it takes the caller's Better Auth session token (an
  ``Authorization: Bearer`` header or the Better Auth session cookie), exchanges it for a
  Convex JWT and makes one-shot HTTP calls with it.

The Convex functions are the demo app's (``users:whoami``, ``messages:list``,
``messages:send``; see ``dartvex_auth_better.testing.register_demo_app``).

Configuration, from the environment:

``CONVEX_URL``
    The deployment URL, e.g. ``https://happy-otter-123.convex.cloud`` (required).
``BETTER_AUTH_URL``
    Where Better Auth answers, when it is not the deployment's ``.convex.site`` host.
``SERVICE_EMAIL``, ``SERVICE_PASSWORD``
    The service account. Without them the ``/service`` routes answer 500 and only the
    per-request routes work.
``SERVICE_SESSION_FILE``
    Persist the service's session in this file (mode 0600), so a restart reuses it
    instead of signing in again.
``CALL_TIMEOUT``
    Seconds a Convex call may take before the route gives up with 504 (default 10).

Run it with uvicorn (``pip install 'dartvex-auth-better[starlette]' fastapi uvicorn``)::

    CONVEX_URL=https://happy-otter-123.convex.cloud \\
    SERVICE_EMAIL=bot@example.com SERVICE_PASSWORD=... \\
        uvicorn --factory --app-dir docs/examples fastapi_app:create_app
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated, Any

import anyio
from fastapi import Depends, FastAPI, Request
from fastapi.responses import JSONResponse
from pydantic import BaseModel, Field

from dartvex_auth_better import (
    Authenticated,
    AuthenticatedConvexClient,
    BetterAuthSession,
    ConvexError,
    ConvexHttpClient,
    DartvexError,
    FileSessionStore,
)
from dartvex_auth_better.integrations.starlette import (
    ConvexLifespan,
    convex_error_handler,
    convex_resources,
    service_client,
    user_client,
)

# What handlers declare to get a client: the service's own, or one acting for the caller.
ServiceConvex = Annotated[AuthenticatedConvexClient[BetterAuthSession], Depends(service_client)]
CallerConvex = Annotated[ConvexHttpClient, Depends(user_client)]


@dataclass(frozen=True)
class Settings:
    """The example's configuration (see the module docstring for the variables)."""

    convex_url: str
    better_auth_url: str | None = None
    service_email: str | None = None
    service_password: str | None = None
    service_session_file: Path | None = None
    call_timeout: float = 10.0

    @classmethod
    def from_env(cls, env: Mapping[str, str] = os.environ) -> Settings:
        """Read the settings from environment variables."""
        url = env.get("CONVEX_URL")
        if not url:
            raise RuntimeError("set CONVEX_URL to the Convex deployment URL")
        session_file = env.get("SERVICE_SESSION_FILE")
        return cls(
            convex_url=url,
            better_auth_url=env.get("BETTER_AUTH_URL") or None,
            service_email=env.get("SERVICE_EMAIL") or None,
            service_password=env.get("SERVICE_PASSWORD") or None,
            service_session_file=Path(session_file) if session_file else None,
            call_timeout=float(env.get("CALL_TIMEOUT", "10")),
        )


class NewMessage(BaseModel):
    """The body of a POST to a messages route."""

    body: str = Field(min_length=1, max_length=2000)


def create_app(settings: Settings | None = None) -> FastAPI:
    """Build the app; without ``settings`` they come from the environment, read now.

    A factory rather than a module-level ``app`` so that importing this module needs no
    configuration (``uvicorn --factory`` calls it at startup).
    """
    settings = settings if settings is not None else Settings.from_env()
    store = (
        FileSessionStore(settings.service_session_file)
        if settings.service_session_file is not None
        else None
    )
    convex = ConvexLifespan(
        settings.convex_url,
        site_url=settings.better_auth_url,
        email=settings.service_email,
        password=settings.service_password,
        store=store,
    )
    app = FastAPI(title="dartvex_auth_better example", lifespan=convex)
    # Convex or Better Auth briefly unreachable: 503, not a stack trace.
    app.add_exception_handler(DartvexError, convex_error_handler)
    app.add_exception_handler(TimeoutError, convex_error_handler)
    app.add_exception_handler(ConvexError, _convex_function_error)
    timeout = settings.call_timeout

    @app.get("/healthz")
    async def healthz(request: Request) -> JSONResponse:
        """Whether the service identity is signed in (for a load balancer's check)."""
        service = convex_resources(request).service
        ok = service is None or isinstance(service.auth_state, Authenticated)
        return JSONResponse({"ok": ok}, status_code=200 if ok else 503)

    @app.get("/service/whoami")
    async def service_whoami(convex: ServiceConvex) -> Any:
        """The identity Convex sees for the service account."""
        # The live client waits through reconnects; a web request should not.
        with anyio.fail_after(timeout):
            return await convex.query("users:whoami")

    @app.get("/service/messages")
    async def service_messages(convex: ServiceConvex) -> Any:
        """The service account's messages."""
        with anyio.fail_after(timeout):
            return await convex.query("messages:list")

    @app.post("/service/messages", status_code=201)
    async def service_send(message: NewMessage, convex: ServiceConvex) -> dict[str, Any]:
        """Post a message as the service account."""
        with anyio.fail_after(timeout):
            message_id = await convex.mutation("messages:send", {"body": message.body})
        return {"id": message_id}

    @app.get("/me")
    async def me(convex: CallerConvex) -> Any:
        """The identity Convex sees for the caller."""
        return await convex.query("users:whoami")

    @app.get("/me/messages")
    async def my_messages(convex: CallerConvex) -> Any:
        """The caller's messages."""
        return await convex.query("messages:list")

    @app.post("/me/messages", status_code=201)
    async def my_send(message: NewMessage, convex: CallerConvex) -> dict[str, Any]:
        """Post a message as the caller."""
        message_id = await convex.mutation("messages:send", {"body": message.body})
        return {"id": message_id}

    return app


async def _convex_function_error(request: Request, exc: Exception) -> JSONResponse:
    """A Convex function refused the request: show what it threw with ``ConvexError(data)``.

    A function that failed without data (a bug, or a message not meant for users) is
    raised again and becomes an ordinary 500.
    """
    if not isinstance(exc, ConvexError) or exc.data is None:
        raise exc
    return JSONResponse({"detail": exc.message, "data": exc.data}, status_code=400)
