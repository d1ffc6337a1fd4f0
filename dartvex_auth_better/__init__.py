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
from .better_auth._client import BetterAuthClient
from .better_auth._provider import ConvexBetterAuthProvider
from .better_auth._session import BetterAuthSession
from .better_auth._storage import (
    FileSessionStore,
    KeyringSessionStore,
    MemorySessionStore,
    SessionStore,
)
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
from .convex._http import ConvexHttpClient
from .convex._optimistic import OptimisticLocalStore
from .convex._pagination import PaginatedQuery, PaginatedResult, PaginationStatus
from .convex._subscription import Subscription
from .convex._values import Int64

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
