"""A shared chat room, as Convex functions run by LocalConvex.

On a real deployment these are TypeScript functions in ``convex/chat.ts``. In tests,
the same names and behaviour are registered on a LocalConvex as Python callables; the
bot recipe's tests run against them.
"""

from __future__ import annotations

from typing import Any

from dartvex_auth_better import ConvexError
from dartvex_auth_better.testing import LocalConvex


# --8<-- [start:register]
def register_chat(convex: LocalConvex) -> None:
    """``chat:list`` (every message, oldest first) and ``chat:send`` (post one)."""

    def caller(ctx: Any) -> dict[str, Any]:
        identity: dict[str, Any] | None = ctx.auth.get_user_identity()
        if identity is None:
            raise ConvexError("Not authenticated", data={"code": "UNAUTHENTICATED"})
        return identity

    @convex.query("chat:list")
    def list_messages(ctx: Any, args: dict[str, Any]) -> list[dict[str, Any]]:
        caller(ctx)
        return [
            {"id": m["_id"], "author": m["author"], "body": m["body"], "replyTo": m["replyTo"]}
            for m in ctx.db.query("chat")
        ]

    @convex.mutation("chat:send")
    def send(ctx: Any, args: dict[str, Any]) -> str:
        author = caller(ctx)["subject"]
        body = args.get("body")
        if not isinstance(body, str) or not body:
            raise ConvexError("body must be a non-empty string", data={"code": "BAD_ARGS"})
        document = {"author": author, "body": body, "replyTo": args.get("replyTo")}
        message_id: str = ctx.db.insert("chat", document)
        return message_id

    # --8<-- [end:register]
