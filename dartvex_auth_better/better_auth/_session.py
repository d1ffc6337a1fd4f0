"""BetterAuthSession: what a successful sign-in gives you."""

from __future__ import annotations

import msgspec

from .._logging import redact

__all__ = ["BetterAuthSession"]


class BetterAuthSession(msgspec.Struct, frozen=True, kw_only=True):
    """A signed-in Better Auth session and the Convex JWT it yields.

    ``token`` is the Convex JWT (short-lived, for ``ConvexClient.set_auth``);
    ``session_token`` is the Better Auth bearer token (long-lived; persist it to sign in
    again after a restart). Neither is ever shown by ``repr`` or ``str``.
    """

    token: str
    session_token: str
    user_id: str
    email: str
    name: str | None = None

    def __repr__(self) -> str:
        return (
            f"BetterAuthSession(user_id={self.user_id!r}, email={self.email!r}, "
            f"name={self.name!r}, token={redact(self.token)}, "
            f"session_token={redact(self.session_token)})"
        )

    __str__ = __repr__
