"""A first script: create an account, send messages, watch the list change live.

Run it as it is and it starts the local stack itself (the real Better Auth server under
Node, and a local Convex server with the demo app). Point ``main`` at a deployment of
your own to run the same code there.
"""

from __future__ import annotations

import secrets

import anyio

from dartvex_auth_better import BetterAuthClient, ConvexBetterAuthProvider, ConvexClient


# --8<-- [start:main]
async def main(convex_url: str, site_url: str | None, email: str, password: str) -> list[str]:
    async with (
        BetterAuthClient(convex_url, site_url=site_url) as auth,
        ConvexClient(convex_url, expect_auth=True) as convex,
    ):
        authed = convex.with_auth(ConvexBetterAuthProvider(auth))
        # A new account, signed in. With an account that exists already:
        # session = await authed.login(email, password)
        session = await authed.sign_up("Ada", email, password)
        print("signed in as", session.email)

        await authed.mutation("messages:send", {"body": "hello"})
        bodies: list[str] = []
        async for messages in authed.subscribe("messages:list"):
            bodies = [m["body"] for m in messages]
            print(bodies)
            if len(bodies) == 2:
                break  # leaving the loop unsubscribes
            await authed.mutation("messages:send", {"body": "world"})
    return bodies
    # --8<-- [end:main]


# --8<-- [start:local]
async def with_local_stack() -> None:
    from dartvex_auth_better.testing import LocalBetterAuth, LocalConvex, register_demo_app

    async with (
        LocalBetterAuth() as better_auth,
        LocalConvex(jwks_url=better_auth.jwks_url, issuer=better_auth.issuer) as convex,
    ):
        register_demo_app(convex)  # messages:send, messages:list, users:whoami
        email = f"ada-{secrets.token_hex(4)}@example.com"
        await main(convex.url, better_auth.url, email, "correct horse battery staple")


if __name__ == "__main__":
    anyio.run(with_local_stack)
# --8<-- [end:local]
