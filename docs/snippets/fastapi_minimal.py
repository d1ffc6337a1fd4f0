"""The smallest FastAPI backend that uses both integration modes."""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Annotated, Any

import anyio
from fastapi import Depends, FastAPI
from pydantic import BaseModel

from dartvex_auth_better import (
    AuthenticatedConvexClient,
    BetterAuthSession,
    ConvexHttpClient,
    DartvexError,
)
from dartvex_auth_better.integrations.starlette import (
    ConvexLifespan,
    convex_error_handler,
    service_client,
    user_client,
)

# --8<-- [start:app]
# The service's own live client, and a one-shot client acting as the caller.
Service = Annotated[AuthenticatedConvexClient[BetterAuthSession], Depends(service_client)]
Caller = Annotated[ConvexHttpClient, Depends(user_client)]


class NewMessage(BaseModel):
    body: str


def create_app(convex_url: str, *, site_url: str | None, email: str, password: str) -> FastAPI:
    lifespan = ConvexLifespan(convex_url, site_url=site_url, email=email, password=password)
    app = FastAPI(lifespan=lifespan)
    # Convex or Better Auth unreachable, or a timeout: 503 instead of a stack trace.
    app.add_exception_handler(DartvexError, convex_error_handler)
    app.add_exception_handler(TimeoutError, convex_error_handler)

    @app.get("/service/whoami")
    async def service_whoami(convex: Service) -> Any:
        # The live client waits through reconnects; a web request should not.
        with anyio.fail_after(10):
            return await convex.query("users:whoami")

    @app.get("/me/messages")
    async def my_messages(convex: Caller) -> Any:
        return await convex.query("messages:list")

    @app.post("/me/messages", status_code=201)
    async def send_mine(message: NewMessage, convex: Caller) -> dict[str, str]:
        return {"id": await convex.mutation("messages:send", {"body": message.body})}

    return app
    # --8<-- [end:app]


# --8<-- [start:compose]
def create_app_with_more_state(convex_url: str, *, site_url: str | None) -> FastAPI:
    convex = ConvexLifespan(convex_url, site_url=site_url)  # per-request mode only

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[dict[str, Any]]:
        async with convex(app) as state:
            yield {**state, "started": True}  # your own state beside the SDK's

    app = FastAPI(lifespan=lifespan)

    @app.get("/me")
    async def me(convex: Caller) -> Any:
        return await convex.query("users:whoami")

    return app
    # --8<-- [end:compose]
