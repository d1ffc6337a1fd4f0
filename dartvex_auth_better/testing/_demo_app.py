"""The demo Convex app: a per-user message list, used by the demo, the tests and examples.

``messages:list`` and ``messages:send`` need a signed-in caller; ``users:whoami`` returns
the identity the server verified, or None for an anonymous caller.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from .._errors import ConvexError

if TYPE_CHECKING:
    from ._convex_server import LocalConvex

__all__ = ["register_demo_app"]


def _require_identity(ctx: Any) -> dict[str, Any]:
    identity: dict[str, Any] | None = ctx.auth.get_user_identity()
    if identity is None:
        raise ConvexError("Not authenticated", data={"code": "UNAUTHENTICATED"})
    return identity


def register_demo_app(convex: LocalConvex) -> None:
    """Register the demo functions on a LocalConvex."""

    @convex.query("messages:list")
    def list_messages(ctx: Any, args: dict[str, Any]) -> list[dict[str, Any]]:
        identity = _require_identity(ctx)
        return [
            {"body": m["body"], "author": m["author"], "at": m["_creationTime"]}
            for m in ctx.db.query("messages")
            if m["author"] == identity["subject"]
        ]

    @convex.mutation("messages:send")
    def send_message(ctx: Any, args: dict[str, Any]) -> str:
        identity = _require_identity(ctx)
        body = args.get("body")
        if not isinstance(body, str) or not body:
            raise ConvexError("body must be a non-empty string", data={"code": "BAD_ARGS"})
        message_id: str = ctx.db.insert("messages", {"author": identity["subject"], "body": body})
        return message_id

    @convex.query("users:whoami")
    def whoami(ctx: Any, args: dict[str, Any]) -> dict[str, Any] | None:
        identity: dict[str, Any] | None = ctx.auth.get_user_identity()
        if identity is None:
            return None
        return {
            "subject": identity.get("subject"),
            "email": identity.get("email"),
            "name": identity.get("name"),
            "issuer": identity.get("issuer"),
        }
