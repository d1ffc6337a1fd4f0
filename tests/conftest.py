"""Shared test configuration. Fixtures for the local stack come from the package's own
pytest plugin (dartvex_auth_better.testing.pytest_plugin)."""

from __future__ import annotations

import pytest


@pytest.fixture(scope="session")
def anyio_backend() -> str:
    # Session scope lets the session-wide Better Auth server fixture share one event loop
    # runner with the tests. The SDK is asyncio-native (aiohttp).
    return "asyncio"
