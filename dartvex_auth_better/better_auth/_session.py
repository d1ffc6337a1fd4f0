"""BetterAuthSession: what a successful sign-in gives you."""

from __future__ import annotations

from typing import Any

import msgspec

from .._logging import redact

__all__ = ["BetterAuthSession"]


class BetterAuthSession(msgspec.Struct, frozen=True, kw_only=True):
    """A signed-in Better Auth session and the Convex JWT it yields.

    ``token`` is the Convex JWT (short-lived, for ``ConvexClient.set_auth``);
    ``session_token`` is the Better Auth bearer token (long-lived; persist it to sign in
    again after a restart with :meth:`BetterAuthClient.get_session`). ``user_id`` is the
    Better Auth user id (the JWT's ``sub``), ``email`` and ``name`` the user's, when the
    server told us.

    Immutable, compared and hashed by value. Neither token is ever shown by ``repr``,
    ``str`` or rich's pretty printer (only their last characters); encode the struct with
    ``msgspec`` when you do want to store them.
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

    def __rich_repr__(self) -> list[tuple[str, Any]]:
        # msgspec's own __rich_repr__ lists every field as it is, tokens included.
        return [
            ("user_id", self.user_id),
            ("email", self.email),
            ("name", self.name),
            ("token", redact(self.token)),
            ("session_token", redact(self.session_token)),
        ]
