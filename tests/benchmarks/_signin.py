"""Sign-in plus JWT: ``BetterAuthClient.sign_in`` vs the same work done with bare aiohttp.

Against the real Better Auth server (``LocalBetterAuth``, Node). ``ours`` is
``BetterAuthClient.sign_in(email, password)``: the sign-in request, whose response carries
the Convex JWT in the ``convex_jwt`` cookie, so one request (``/convex/token`` only when
that cookie is missing). Two bare aiohttp + msgspec baselines, each on one session with a
keep-alive connection and the same headers (Accept, Origin, Content-Type, Bearer):

* ``bare`` does the same work as ours: the sign-in request, the session token from
  ``set-auth-token`` (else the JSON ``token``) and the JWT from the ``convex_jwt``
  Set-Cookie, falling back to ``/convex/token`` only when the cookie is missing. The
  headline ratio is ours/bare.
* ``bare_2calls`` always makes both requests (sign-in, then ``/convex/token``): what a
  client that ignores the cookie pays. Its ratio is a second column.

How many HTTP requests each made per sign-in is counted (outside the timed calls for
ours, by an aiohttp trace on a borrowed session) and shown, so that "the same work" is
checked, not assumed. In a round the three take turns call by call, in a rotating order;
a round's figure is the median latency of its calls, and ratios are taken per round.
"""

from __future__ import annotations

import statistics
import sys
import time
from collections.abc import Awaitable, Callable
from types import SimpleNamespace
from typing import Any
from urllib.parse import unquote

import aiohttp
import msgspec

from tests.benchmarks._common import Row, Spread, spread

EMAIL = "bench-signin@example.com"
PASSWORD = "correct horse battery staple"
CONVEX_JWT_COOKIE = "convex_jwt"  # Better Auth prefixes it ("better-auth.convex_jwt")
VARIANTS = ("ours", "bare", "bare_2calls")


def _cookie(set_cookies: list[str], suffix: str) -> str | None:
    """The value of the last non-empty cookie whose name ends with ``suffix``."""
    found: str | None = None
    for header in set_cookies:
        name, sep, rest = header.partition("=")
        if sep and name.strip().endswith(suffix):
            value = rest.split(";", 1)[0].strip()
            if value:
                found = unquote(value)
    return found


class _Bare:
    """The bare baselines, on one aiohttp session; counts the requests they make."""

    def __init__(self, http: aiohttp.ClientSession, site: str) -> None:
        self.http = http
        self.site = site
        self.requests = 0

    async def _sign_in(self) -> tuple[str, str | None]:
        """POST sign-in: (session token, the JWT from the cookie or None)."""
        site = self.site
        headers = {"Accept": "application/json", "Origin": site, "Content-Type": "application/json"}
        body = msgspec.json.encode({"email": EMAIL, "password": PASSWORD})
        self.requests += 1
        async with self.http.post(
            f"{site}/api/auth/sign-in/email", data=body, headers=headers
        ) as resp:
            data = msgspec.json.decode(await resp.read())
            session_token: str = resp.headers.get("set-auth-token") or data["token"]
            jwt = _cookie(resp.headers.getall("Set-Cookie", []), CONVEX_JWT_COOKIE)
        return session_token, jwt

    async def _convex_token(self, session_token: str) -> str:
        headers = {
            "Accept": "application/json",
            "Origin": self.site,
            "Authorization": f"Bearer {session_token}",
        }
        self.requests += 1
        async with self.http.get(f"{self.site}/api/auth/convex/token", headers=headers) as resp:
            jwt: str = msgspec.json.decode(await resp.read())["token"]
        return jwt

    async def same_work(self) -> str:
        session_token, jwt = await self._sign_in()
        if jwt is None:
            jwt = await self._convex_token(session_token)
        return jwt

    async def two_calls(self) -> str:
        session_token, _cookie_jwt = await self._sign_in()
        return await self._convex_token(session_token)


async def _requests_per_sign_in(site: str) -> float:
    """How many HTTP requests one ``BetterAuthClient.sign_in`` makes (not timed)."""
    from dartvex_auth_better import BetterAuthClient

    count = 0

    async def on_request_start(
        _session: aiohttp.ClientSession, _ctx: SimpleNamespace, _params: Any
    ) -> None:
        nonlocal count
        count += 1

    trace = aiohttp.TraceConfig()
    trace.on_request_start.append(on_request_start)
    async with (
        aiohttp.ClientSession(cookie_jar=aiohttp.DummyCookieJar(), trace_configs=[trace]) as http,
        BetterAuthClient(site, session=http) as auth,
    ):
        calls = 3
        for _ in range(calls):
            await auth.sign_in(EMAIL, PASSWORD)
    return count / calls


async def run_signin(calls: int, rounds: int) -> dict[str, Any]:
    from dartvex_auth_better import BetterAuthClient
    from dartvex_auth_better.testing import LocalBetterAuth

    results: dict[str, list[float]] = {name: [] for name in VARIANTS}
    requests = dict.fromkeys(VARIANTS, 0.0)
    async with LocalBetterAuth(jwt_ttl_seconds=900) as server:
        site = server.url
        async with (
            BetterAuthClient(site) as auth,
            aiohttp.ClientSession(cookie_jar=aiohttp.DummyCookieJar()) as http,
        ):
            await auth.sign_up("Bench", EMAIL, PASSWORD)
            bare = _Bare(http, site)

            async def ours() -> None:
                session = await auth.sign_in(EMAIL, PASSWORD)
                assert session.token

            async def same_work() -> None:
                assert await bare.same_work()

            async def two_calls() -> None:
                assert await bare.two_calls()

            runners: dict[str, Callable[[], Awaitable[None]]] = {
                "ours": ours,
                "bare": same_work,
                "bare_2calls": two_calls,
            }
            bare_requests = {"bare": 0, "bare_2calls": 0}
            for index in range(rounds + 1):
                # The three take turns call by call (the order rotating), so that each
                # one's calls meet the same server: Better Auth's own time per sign-in
                # drifts by 10-20 % over the seconds a round lasts.
                latencies: dict[str, list[float]] = {name: [] for name in VARIANTS}
                for turn in range(calls):
                    k = (index + turn) % len(VARIANTS)
                    for name in [*VARIANTS[k:], *VARIANTS[:k]]:
                        before = bare.requests
                        started = time.perf_counter()
                        await runners[name]()
                        latencies[name].append((time.perf_counter() - started) * 1000)
                        if name in bare_requests:
                            bare_requests[name] += bare.requests - before
                if index > 0:
                    for name, values in latencies.items():
                        results[name].append(statistics.median(values))
                tag = "warm-up" if index == 0 else f"round {index}/{rounds}"
                print(f"  sign-in: {tag} done", file=sys.stderr, flush=True)
            for name, made in bare_requests.items():
                requests[name] = made / ((rounds + 1) * calls)
        requests["ours"] = await _requests_per_sign_in(site)
    return {"calls_per_round": calls, "median_ms": results, "requests_per_sign_in": requests}


def rows(results: dict[str, Any]) -> list[Row]:
    per_round: dict[str, list[float]] = results["median_ms"]
    requests: dict[str, float] = results.get("requests_per_sign_in", {})
    title = "sign-in + JWT against the real Better Auth server"

    def ratio(a: str, b: str) -> Spread:
        return spread(x / y for x, y in zip(per_round[a], per_round[b], strict=True))

    same = ratio("ours", "bare")
    two = ratio("ours", "bare_2calls")
    out = [
        Row(title, "median latency", {k: spread(v) for k, v in per_round.items()}, "ms"),
        Row(title, "HTTP requests per sign-in", dict(requests)),
        Row(
            title,
            "ours/bare (same requests)",
            {"ratio": same, "ratio vs bare_2calls": two},
            "x",
            "<= 1.05",
            "PASS" if same.median <= 1.05 else "MISS",
        ),
    ]
    return out
