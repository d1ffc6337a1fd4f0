import pytest


# The local stack's fixtures are async and the Better Auth server lives for the whole
# test session, so the anyio backend must be session-scoped too.
@pytest.fixture(scope="session")
def anyio_backend() -> str:
    return "asyncio"
