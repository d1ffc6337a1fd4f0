"""Sign-in plus JWT: ``BetterAuthClient.sign_in`` vs the same two HTTP calls made bare.

Against the real Better Auth server (``LocalBetterAuth``, Node). ``ours`` is
``BetterAuthClient.sign_in(email, password)`` (sign-in, then ``/convex/token`` when the
response carries no ``convex_jwt`` cookie). ``bare`` is one aiohttp session making the
same two requests with the same headers (Accept, Origin, Content-Type, Bearer) and
reading the session token and the JWT out of the JSON. Both reuse one session/keep-alive
connection. Rounds interleave the two; the figure is the per-round median latency.
"""

from __future__ import annotations

import statistics
import sys
import time
from typing import Any

import aiohttp
import msgspec

from tests.benchmarks._common import Row, spread

EMAIL = "bench-signin@example.com"
PASSWORD = "correct horse battery staple"


async def _bare_sign_in(http: aiohttp.ClientSession, site: str) -> str:
    headers = {"Accept": "application/json", "Origin": site, "Content-Type": "application/json"}
    body = msgspec.json.encode({"email": EMAIL, "password": PASSWORD})
    async with http.post(f"{site}/api/auth/sign-in/email", data=body, headers=headers) as resp:
        data = msgspec.json.decode(await resp.read())
        session_token = resp.headers.get("set-auth-token") or data["token"]
    headers = {
        "Accept": "application/json",
        "Origin": site,
        "Authorization": f"Bearer {session_token}",
    }
    async with http.get(f"{site}/api/auth/convex/token", headers=headers) as resp:
        jwt: str = msgspec.json.decode(await resp.read())["token"]
    return jwt


async def run_signin(calls: int, rounds: int) -> dict[str, Any]:
    from dartvex_auth_better import BetterAuthClient
    from dartvex_auth_better.testing import LocalBetterAuth

    results: dict[str, list[float]] = {"ours": [], "bare": []}
    async with LocalBetterAuth(jwt_ttl_seconds=900) as server:
        site = server.url
        async with (
            BetterAuthClient(site) as auth,
            aiohttp.ClientSession(cookie_jar=aiohttp.DummyCookieJar()) as http,
        ):
            await auth.sign_up("Bench", EMAIL, PASSWORD)

            async def ours() -> None:
                session = await auth.sign_in(EMAIL, PASSWORD)
                assert session.token

            async def bare() -> None:
                assert await _bare_sign_in(http, site)

            runners = {"ours": ours, "bare": bare}
            for index in range(rounds + 1):
                order = ["ours", "bare"] if index % 2 == 0 else ["bare", "ours"]
                for name in order:
                    latencies = []
                    for _ in range(calls):
                        started = time.perf_counter()
                        await runners[name]()
                        latencies.append((time.perf_counter() - started) * 1000)
                    if index > 0:
                        results[name].append(statistics.median(latencies))
                tag = "warm-up" if index == 0 else f"round {index}/{rounds}"
                print(f"  sign-in: {tag} done", file=sys.stderr, flush=True)
    return {"calls_per_round": calls, "median_ms": results}


def rows(results: dict[str, Any]) -> list[Row]:
    per_round: dict[str, list[float]] = results["median_ms"]
    title = "sign-in + JWT against the real Better Auth server"
    ratio = spread(a / b for a, b in zip(per_round["ours"], per_round["bare"], strict=True))
    return [
        Row(title, "median latency", {k: spread(v) for k, v in per_round.items()}, "ms"),
        Row(
            title,
            "ours/bare",
            {"ratio": ratio},
            "x",
            "<= 1.05",
            "PASS" if ratio.median <= 1.05 else "MISS",
        ),
    ]
