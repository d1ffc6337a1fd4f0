"""Command line: ``dartvex-auth-better ...`` or ``python -m dartvex_auth_better ...``."""

from __future__ import annotations

import argparse
import secrets
import sys
import time
from collections.abc import Sequence

import anyio

from ._errors import ConvexError, DartvexError
from ._jwt import token_claims

__all__ = ["main"]

EXIT_OK = 0
EXIT_ERROR = 1
EXIT_USAGE = 2
EXIT_INTERRUPTED = 130


class _Printer:
    """Prints progress lines with the time since the start."""

    def __init__(self) -> None:
        self._start = time.perf_counter()

    def __call__(self, message: str) -> None:
        print(f"[{time.perf_counter() - self._start:5.1f}s] {message}", flush=True)


async def run_demo(*, messages: Sequence[str], jwt_ttl_seconds: int) -> None:
    """Start the local stack, sign a user in, and watch a live query as mutations land."""
    # The testing extra is needed only here; import late so the CLI loads without it.
    from . import BetterAuthClient, ConvexClient
    from .testing import LocalBetterAuth, LocalConvex, register_demo_app
    from .testing._better_auth import ensure_better_auth_server

    say = _Printer()
    await ensure_better_auth_server(
        on_install=lambda: say("first run: installing the Better Auth server's npm packages")
    )
    say("starting the real Better Auth server (Node)")
    async with LocalBetterAuth(jwt_ttl_seconds=jwt_ttl_seconds) as better_auth:
        say(f"Better Auth is up at {better_auth.url}")
        async with LocalConvex(jwks_url=better_auth.jwks_url, issuer=better_auth.issuer) as convex:
            register_demo_app(convex)
            say(f"LocalConvex (sync protocol server) is up at {convex.url}")

            email = f"demo-{secrets.token_hex(4)}@example.com"
            password = secrets.token_urlsafe(16)
            async with BetterAuthClient(better_auth.url) as auth:
                say(f"signing up {email}")
                await auth.sign_up("Demo User", email, password)
                session = await auth.sign_in(email, password)
                claims = token_claims(session.token) or {}
                lifetime = int(claims.get("exp", 0)) - int(claims.get("iat", 0))
                say(f"signed in: user id {session.user_id}, Convex JWT valid for {lifetime} s")

                async with ConvexClient(convex.url) as client:
                    say("connecting to Convex and authenticating with the JWT")
                    await client.set_auth(session.token)
                    me = await client.query("users:whoami")
                    say(f"the server verified the token and sees: {me}")

                    seen = anyio.Event()
                    expected = 0

                    async def watch() -> None:
                        nonlocal seen
                        async for rows in client.subscribe("messages:list"):
                            bodies = [row["body"] for row in rows]
                            say(f"live update: {len(bodies)} message(s) {bodies}")
                            if len(bodies) >= expected:
                                seen.set()

                    async with anyio.create_task_group() as tg:
                        tg.start_soon(watch)
                        with anyio.fail_after(10):
                            await seen.wait()
                        for body in messages:
                            seen = anyio.Event()
                            expected += 1
                            say(f"mutation messages:send {body!r}")
                            await client.mutation("messages:send", {"body": body})
                            with anyio.fail_after(10):
                                await seen.wait()
                        tg.cancel_scope.cancel()

                    await client.set_auth(None)
                    try:
                        await client.query("messages:list")
                    except ConvexError as exc:
                        say(f"as an anonymous caller, messages:list is refused: {exc}")

                say("signing out")
                await auth.sign_out(session.session_token)
                after = await auth.get_session(session.session_token)
                say(f"get_session after sign-out: {after}")
            say("shutting down the local servers")
    say("done")


def _build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="dartvex-auth-better",
        description="Sign in to Better Auth and use a live Convex connection.",
    )
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    demo = commands.add_parser(
        "demo", help="run the local stack and watch a query update live as messages are sent"
    )
    demo.add_argument(
        "--message",
        dest="messages",
        action="append",
        help="a message to send (repeatable; default: three greetings)",
    )
    demo.add_argument("--jwt-ttl", type=int, default=900, help="Convex JWT lifetime in seconds")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point; returns the process exit status."""
    args = _build_parser().parse_args(argv)
    try:
        if args.command == "demo":
            messages = args.messages or ["hello", "from asyncio", "live over Convex"]
            anyio.run(lambda: run_demo(messages=messages, jwt_ttl_seconds=args.jwt_ttl))
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return EXIT_INTERRUPTED
    except DartvexError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return EXIT_ERROR
    return EXIT_OK
