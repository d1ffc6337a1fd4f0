"""dartvex_auth_better: sign in to Better Auth and stay authenticated on a live Convex
connection, from asyncio.

The whole public API is importable from this package; submodules are private.
"""

from ._errors import (
    AuthRejectedError,
    BetterAuthError,
    BetterAuthResponseError,
    ClientClosedError,
    ConnectionLostError,
    ConvexError,
    ConvexHttpError,
    ConvexHttpResponseError,
    DartvexError,
    InvalidCredentialsError,
    InvalidTokenError,
    LoginSupersededError,
    NoSessionError,
    ProtocolError,
    RateLimitedError,
    RequestTimeoutError,
    ServerFatalError,
    SessionExpiredError,
    SessionStoreError,
    TransportError,
    UserAlreadyExistsError,
)
from ._version import __version__
from .convex._auth_types import (
    Authenticated,
    AuthEvent,
    AuthLoading,
    AuthProvider,
    AuthState,
    FetchToken,
    Unauthenticated,
)
from .convex._authed import AuthenticatedConvexClient
from .convex._client import ConnectionState, ConnectionStatus, ConvexClient
from .convex._optimistic import OptimisticLocalStore
from .convex._subscription import Subscription
from .convex._values import Int64

TYPE_CHECKING = False
if TYPE_CHECKING:
    from .better_auth._client import BetterAuthClient
    from .better_auth._provider import ConvexBetterAuthProvider
    from .better_auth._session import BetterAuthSession
    from .better_auth._storage import (
        FileSessionStore,
        KeyringSessionStore,
        MemorySessionStore,
        SessionStore,
    )
    from .convex._http import ConvexHttpClient
    from .convex._pagination import PaginatedQuery, PaginatedResult, PaginationStatus
del TYPE_CHECKING

# Loaded on first use (module __getattr__): the Better Auth half, the HTTP client and
# pagination are not needed to import the package or to run a ConvexClient, and the
# Better Auth half alone (email.utils, http.cookies, hashlib) is a fifth of the import.
_LAZY = {
    "BetterAuthClient": ".better_auth._client",
    "ConvexBetterAuthProvider": ".better_auth._provider",
    "BetterAuthSession": ".better_auth._session",
    "FileSessionStore": ".better_auth._storage",
    "KeyringSessionStore": ".better_auth._storage",
    "MemorySessionStore": ".better_auth._storage",
    "SessionStore": ".better_auth._storage",
    "ConvexHttpClient": ".convex._http",
    "PaginatedQuery": ".convex._pagination",
    "PaginatedResult": ".convex._pagination",
    "PaginationStatus": ".convex._pagination",
}


def __getattr__(name: str) -> object:
    module = _LAZY.get(name)
    if module is None:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    import importlib

    value = getattr(importlib.import_module(module, __name__), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(__all__))


__all__ = (
    "AuthEvent",
    "AuthLoading",
    "AuthProvider",
    "AuthRejectedError",
    "AuthState",
    "Authenticated",
    "AuthenticatedConvexClient",
    "BetterAuthClient",
    "BetterAuthError",
    "BetterAuthResponseError",
    "BetterAuthSession",
    "ClientClosedError",
    "ConnectionLostError",
    "ConnectionState",
    "ConnectionStatus",
    "ConvexBetterAuthProvider",
    "ConvexClient",
    "ConvexError",
    "ConvexHttpClient",
    "ConvexHttpError",
    "ConvexHttpResponseError",
    "DartvexError",
    "FetchToken",
    "FileSessionStore",
    "Int64",
    "InvalidCredentialsError",
    "InvalidTokenError",
    "KeyringSessionStore",
    "LoginSupersededError",
    "MemorySessionStore",
    "NoSessionError",
    "OptimisticLocalStore",
    "PaginatedQuery",
    "PaginatedResult",
    "PaginationStatus",
    "ProtocolError",
    "RateLimitedError",
    "RequestTimeoutError",
    "ServerFatalError",
    "SessionExpiredError",
    "SessionStore",
    "SessionStoreError",
    "Subscription",
    "TransportError",
    "Unauthenticated",
    "UserAlreadyExistsError",
    "__version__",
)
