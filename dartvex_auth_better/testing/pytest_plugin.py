"""pytest fixtures for testing an app against the local stack.

Installed as a pytest plugin with the package, so the fixtures are available in any test
suite: ``better_auth_server`` (one real Better Auth server per test session),
``convex_server`` (a fresh LocalConvex per test, verifying that server's JWTs, with the
demo app registered) and ``local_stack`` (both). Fixtures are async; run tests with
``@pytest.mark.anyio`` (anyio's pytest plugin).
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import TYPE_CHECKING, Any

import pytest

if TYPE_CHECKING:
    from ._better_auth import LocalBetterAuth
    from ._convex_server import LocalConvex

__all__ = ["better_auth_server", "convex_server", "local_stack"]


@pytest.fixture(scope="session")
async def better_auth_server() -> AsyncIterator[LocalBetterAuth]:
    """A real Better Auth server (Node) shared by the whole test session."""
    from ._better_auth import LocalBetterAuth

    async with LocalBetterAuth() as server:
        yield server


@pytest.fixture
async def convex_server(better_auth_server: LocalBetterAuth) -> AsyncIterator[LocalConvex]:
    """A fresh LocalConvex that trusts the session's Better Auth server, demo app included."""
    from ._convex_server import LocalConvex
    from ._demo_app import register_demo_app

    async with LocalConvex(
        jwks_url=better_auth_server.jwks_url, issuer=better_auth_server.issuer
    ) as server:
        register_demo_app(server)
        yield server


@pytest.fixture
async def local_stack(
    better_auth_server: LocalBetterAuth, convex_server: LocalConvex
) -> dict[str, Any]:
    """Both servers: ``{"better_auth": ..., "convex": ...}``."""
    return {"better_auth": better_auth_server, "convex": convex_server}
