"""The auth vocabulary shared by the Convex client and any token source.

The Convex side knows nothing of Better Auth: anything that can produce Convex JWTs plugs
in through ``AuthProvider`` (for a full sign-in lifecycle) or a bare ``FetchToken``
callable (``ConvexClient.set_auth(fetch_token)``).
"""

from __future__ import annotations

import enum
from collections.abc import Awaitable, Callable
from typing import Any, Generic, Protocol, TypeVar

import msgspec

__all__ = [
    "AuthEvent",
    "AuthProvider",
    "AuthState",
    "Authenticated",
    "AuthLoading",
    "FetchToken",
    "Unauthenticated",
]

SessionT = TypeVar("SessionT")
SessionT_co = TypeVar("SessionT_co", covariant=True)

FetchToken = Callable[[bool], Awaitable[str | None]]
"""``await fetch_token(force_refresh)`` returns a Convex JWT, or None when the user is
signed out for good. ``force_refresh=True`` must bypass every cache. Transient failures
(network, timeouts, 5xx, 429) must *raise* (ideally an error with ``retryable=True``):
returning None for them would sign the user out."""


class AuthProvider(Protocol[SessionT_co]):
    """A source of sessions and Convex JWTs that ``ConvexClient.with_auth()`` drives.

    ``login``/``sign_up`` take provider-specific arguments; the rest is uniform.
    """

    async def login(self, *args: Any, **kwargs: Any) -> SessionT_co:
        """Sign in with credentials; returns the new session."""
        ...

    async def sign_up(self, *args: Any, **kwargs: Any) -> SessionT_co:
        """Create an account and sign it in; returns the new session."""
        ...

    async def login_from_cache(self) -> SessionT_co:
        """Restore the session from what the provider persisted; raises when there is
        none or it is gone."""
        ...

    async def logout(self) -> None:
        """End the session on the server and forget it locally."""
        ...

    async def fetch_token(self, force_refresh: bool) -> str | None:
        """A Convex JWT for the current session (see FetchToken)."""
        ...

    def token_of(self, session: Any) -> str:
        """The Convex JWT a session carries."""
        ...


class AuthEvent(enum.Enum):
    """What happened to the authenticated identity."""

    SIGNED_IN = "signed_in"  # the server confirmed the first token of a login
    TOKEN_REFRESHED = "token_refreshed"  # the server confirmed a fresh token
    SIGNED_OUT = "signed_out"  # logout, or the session ended for good


# The states are frozen msgspec Structs (equality, hash, repr and match patterns as frozen
# dataclasses; defining them costs microseconds at import instead of about a millisecond).
class Unauthenticated(msgspec.Struct, frozen=True):
    """No identity: never signed in, signed out, or the session ended."""


class AuthLoading(msgspec.Struct, frozen=True):
    """Signing in: waiting for credentials to be checked or the server to confirm."""


class Authenticated(msgspec.Struct, Generic[SessionT], frozen=True):
    """The Convex server has confirmed the identity of ``session``."""

    session: SessionT

    def __repr__(self) -> str:
        # The session's own repr is trusted to hide secrets (BetterAuthSession does).
        return f"Authenticated({self.session!r})"


AuthState = Unauthenticated | AuthLoading | Authenticated[Any]
