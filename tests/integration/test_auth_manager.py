"""Auth that never lapses, driven by a bare token fetcher against a real LocalConvex.

The fetcher mints real RS256 JWTs (TestTokenIssuer) that LocalConvex verifies and whose
expiry it enforces; no part of the SDK is mocked.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator
from typing import Any

import anyio
import anyio.lowlevel
import pytest

from dartvex_auth_better import (
    AuthRejectedError,
    BetterAuthError,
    ClientClosedError,
    ConvexClient,
    RateLimitedError,
    SessionExpiredError,
    SessionStoreError,
    TransportError,
)
from dartvex_auth_better.convex._auth import AuthManager
from dartvex_auth_better.testing import LocalConvex, TestTokenIssuer, register_demo_app

pytestmark = [pytest.mark.anyio]


class TokenSource:
    """A fetcher with a call log. ``fail_next`` transient failures, then tokens; ``None``
    once ``signed_out`` is set."""

    def __init__(self, issuer: TestTokenIssuer, *, ttl: float = 900, sub: str = "user-1") -> None:
        self.issuer = issuer
        self.ttl = ttl
        self.sub = sub
        self.calls: list[bool] = []
        self.tokens: list[str] = []
        self.fail_next = 0
        self.signed_out = False
        self.bad_tokens = False
        self.called = asyncio.Event()

    async def __call__(self, force_refresh: bool) -> str | None:
        self.calls.append(force_refresh)
        self.called.set()
        await anyio.lowlevel.checkpoint()
        if self.signed_out:
            return None
        if self.fail_next:
            self.fail_next -= 1
            raise TransportError("token endpoint unreachable (test)")
        issuer = TestTokenIssuer(self.issuer.issuer) if self.bad_tokens else self.issuer
        # A distinct iat per call makes every token distinct (the real server's JWTs
        # repeat within the same second).
        token = issuer.mint(self.sub, ttl=self.ttl, iat=time.time(), n=len(self.calls))
        self.tokens.append(token)
        return token


@pytest.fixture
async def issuer() -> TestTokenIssuer:
    return TestTokenIssuer()


@pytest.fixture
async def convex(issuer: TestTokenIssuer) -> AsyncIterator[LocalConvex]:
    async with LocalConvex(jwks=issuer.jwks, issuer=issuer.issuer) as server:
        register_demo_app(server)
        yield server


async def test_fetcher_auth_is_confirmed_and_seen_by_functions(issuer, convex):
    source = TokenSource(issuer)
    async with ConvexClient(convex.url) as client:
        with anyio.fail_after(10):
            await client.set_auth(source)
            me = await client.query("users:whoami")
    assert me["subject"] == "user-1"
    # reuse_initial_token (the default): one fetch per login, not two.
    assert source.calls == [False]


async def test_parity_mode_swaps_the_first_token_for_a_fresh_one(issuer, convex):
    source = TokenSource(issuer)
    async with ConvexClient(convex.url, reuse_initial_token=False) as client:
        with anyio.fail_after(10):
            await client.set_auth(source)
            record = await convex.wait_for_connections(1)
            await record.wait_for_frame(
                "Authenticate", predicate=lambda f: f.get("value") == source.tokens[-1], after=0
            )
            while len(source.calls) < 2:
                source.called.clear()
                await source.called.wait()
            await convex.wait_for_tokens(2, timeout=20)
    assert source.calls == [False, True]
    assert [t.token for t in convex.received_tokens] == source.tokens


async def test_refresh_keeps_an_idle_client_authenticated(issuer, convex):
    # 4-second tokens, refreshed 2 s before expiry: several lifetimes in ~9 s.
    source = TokenSource(issuer, ttl=4)
    async with ConvexClient(convex.url, auth_refresh_leeway=2) as client:
        with anyio.fail_after(20):
            await client.set_auth(source)
            await convex.wait_for_tokens(4, timeout=20)
            me = await client.query("users:whoami")
    assert me["subject"] == "user-1"
    assert all(not t.was_expired for t in convex.received_tokens)
    assert all(t.accepted for t in convex.received_tokens)
    assert source.calls[0] is False and all(source.calls[1:])
    # Only one socket: refreshes re-authenticate in place.
    assert len(convex.connections) == 1


async def test_transient_failures_keep_the_session(issuer, convex):
    source = TokenSource(issuer, ttl=4)
    async with ConvexClient(convex.url, auth_refresh_leeway=2) as client:
        with anyio.fail_after(25):
            await client.set_auth(source)
            source.fail_next = 3  # the next refresh fails three times in a row
            await convex.wait_for_tokens(2, timeout=20)
            me = await client.query("users:whoami")
    assert me is not None and me["subject"] == "user-1"
    assert source.fail_next == 0
    assert len(source.calls) >= 5  # 1 initial + 3 failures + 1 success


async def test_signed_out_once_then_no_more_calls(issuer, convex):
    source = TokenSource(issuer, ttl=4)
    async with ConvexClient(convex.url, auth_refresh_leeway=2) as client:
        with anyio.fail_after(15):
            await client.set_auth(source)
            source.signed_out = True
            # The next scheduled refresh learns the session is over.
            while True:
                await client.query("users:whoami")
                if client._auth.token is None:
                    break
                source.called.clear()
                await source.called.wait()
            calls_at_sign_out = len(source.calls)
            assert await client.query("users:whoami") is None  # anonymous now
            with pytest.raises(SessionExpiredError):
                await client.refresh_auth_now()
    assert len(source.calls) == calls_at_sign_out


async def test_wall_clock_jump_past_exp_is_noticed(issuer, convex):
    offset = 0.0

    def clock() -> float:
        return time.time() + offset

    source = TokenSource(issuer, ttl=600)
    async with ConvexClient(convex.url, wall_clock=clock) as client:
        with anyio.fail_after(15):
            await client.set_auth(source)
            assert source.calls == [False]
            # The machine slept for an hour: the loop's timers did not notice, the wall
            # clock did. The refresh task re-reads the wall clock every few seconds.
            offset = 3600.0
            source.called.clear()
            await source.called.wait()
            await convex.wait_for_tokens(2, timeout=20)
    assert source.calls == [False, True]


async def test_expired_token_is_replaced_before_a_reconnect(issuer, convex):
    offset = 0.0

    def clock() -> float:
        return time.time() + offset

    source = TokenSource(issuer, ttl=600)
    async with ConvexClient(convex.url, wall_clock=clock) as client:
        with anyio.fail_after(15):
            await client.set_auth(source)
            offset = 3600.0
            await convex.drop_connections()
            await convex.wait_for_connections(2)
            second = convex.connections[1]
            auth = await second.wait_for_frame("Authenticate")
    # The new socket carried a freshly fetched token, not the one "expired" by the clock.
    assert auth["value"] == source.tokens[-1]
    assert len(source.tokens) == 2 and source.calls[-1] is True


async def test_auth_error_stops_fetches_and_restarts(issuer, convex):
    source = TokenSource(issuer)
    async with ConvexClient(convex.url) as client:
        with anyio.fail_after(15):
            await client.set_auth(source)
            await convex.send_auth_error("token expired", auth_update_attempted=False)
            await convex.wait_for_connections(2)
            second = convex.connections[1]
            connect = await second.wait_for_frame("Connect")
            auth = await second.wait_for_frame("Authenticate")
            me = await client.query("users:whoami")
    assert connect["lastCloseReason"] is None  # an auth restart, not a failure
    assert auth["value"] == source.tokens[-1] != source.tokens[0]
    assert source.calls == [False, True]
    assert me["subject"] == "user-1"
    assert not client.is_auth_refreshing


async def wait_signed_out(client: ConvexClient) -> None:
    """Until the manager has signed out (re-checked on every is_refreshing change: a
    rejection sets it, a sign-out clears it)."""
    async for _ in client.auth_refreshing_states():
        if client._auth.signed_out:
            return


async def test_a_rejected_cached_token_is_free_and_the_third_fresh_one_signs_out(issuer, convex):
    # dartvex: "one cached rejection plus 2 fresh rejections keeps auth; the 3rd fresh
    # rejection gives up". The first, unforced fetch is the cached one.
    source = TokenSource(issuer)
    source.bad_tokens = True
    async with ConvexClient(convex.url) as client:
        with anyio.fail_after(15), pytest.raises(SessionExpiredError):
            await client.set_auth(source)
        with anyio.fail_after(10):
            assert await client.query("users:whoami") is None
    assert source.calls == [False, True, True, True]
    assert len(convex.received_tokens) == 4
    assert not any(t.accepted for t in convex.received_tokens)


async def test_persistent_rejection_after_a_confirmation_makes_four_fetches(issuer, convex):
    # dartvex: "persistent rejection ends with 4 fetches (cached, fresh after
    # confirmation, and 2 retries)". The deployment stops trusting the issuer right
    # after the login's first token was confirmed.
    untrusted = TestTokenIssuer(issuer.issuer)
    calls: list[bool] = []

    async def source(force_refresh: bool) -> str:
        calls.append(force_refresh)
        minter = issuer if len(calls) == 1 else untrusted
        token: str = minter.mint("user-1", iat=time.time(), n=len(calls))
        return token

    async with ConvexClient(convex.url, reuse_initial_token=False) as client:
        with anyio.fail_after(15):
            await client.set_auth(source)
            await wait_signed_out(client)
            assert await client.query("users:whoami") is None
    assert calls == [False, True, True, True]
    assert [t.accepted for t in convex.received_tokens] == [True, False, False, False]


async def test_a_confirmed_token_rejected_later_is_not_counted(issuer, convex):
    source = TokenSource(issuer)
    async with ConvexClient(convex.url) as client:
        with anyio.fail_after(15):
            await client.set_auth(source)
            # The confirmed token expires on the server, and the deployment no longer
            # trusts the issuer: its rejection is free, three fresh ones are not.
            source.bad_tokens = True
            await convex.send_auth_error("token expired", auth_update_attempted=False)
            await wait_signed_out(client)
            assert await client.query("users:whoami") is None
    assert source.calls == [False, True, True, True]
    assert [t.accepted for t in convex.received_tokens] == [True, False, False, False]


async def test_fixed_token_rejected_is_not_resent(issuer, convex):
    other = TestTokenIssuer(issuer.issuer)
    async with ConvexClient(convex.url) as client:
        with anyio.fail_after(10), pytest.raises(AuthRejectedError):
            await client.set_auth(other.mint("intruder"))
        with anyio.fail_after(10):
            assert await client.query("users:whoami") is None
    assert len(convex.received_tokens) == 1


async def test_expect_auth_sends_nothing_before_the_first_token(issuer, convex):
    source = TokenSource(issuer)
    source.fail_next = 2  # the first fetch fails twice: requests must wait, not go anonymous
    async with ConvexClient(convex.url, expect_auth=True) as client:
        subscription = client.subscribe("messages:list")
        mutation_done: list[Any] = []

        async def send() -> None:
            mutation_done.append(await client.mutation("messages:send", {"body": "first"}))

        async with anyio.create_task_group() as tg:
            tg.start_soon(send)
            await anyio.wait_all_tasks_blocked()
            assert convex.connections == []  # not even a socket yet
            with anyio.fail_after(15):
                await client.set_auth(source)
                rows = await subscription.next()
                while not rows:
                    rows = await subscription.next()
        subscription.close()
    frames = convex.connections[0].frames
    types = [f["type"] for f in frames]
    assert types[:2] == ["Connect", "Authenticate"]
    assert types.index("Authenticate") < types.index("ModifyQuerySet")
    assert types.index("Authenticate") < types.index("Mutation")
    assert [r["body"] for r in rows] == ["first"]
    assert len(mutation_done) == 1


async def test_requests_during_a_failing_first_fetch_are_held_back(issuer, convex):
    source = TokenSource(issuer)
    source.fail_next = 2
    async with ConvexClient(convex.url) as client:
        with anyio.fail_after(10):
            await client.wait_connected()
            record = await convex.wait_for_connections(1)
            # Anonymous for now: a query works and is anonymous.
            assert await client.query("users:whoami") is None
        results: list[Any] = []

        async def authenticate() -> None:
            await client.set_auth(source)

        async with anyio.create_task_group() as tg:
            tg.start_soon(authenticate)
            await source.called.wait()  # the fetch is under way (and failing)
            with anyio.fail_after(15):
                results.append(await client.query("users:whoami"))
    assert results[0]["subject"] == "user-1"  # held back, then sent authenticated
    frames = record.frames
    auth_index = next(i for i, f in enumerate(frames) if f["type"] == "Authenticate")
    adds_after = [
        i
        for i, f in enumerate(frames)
        if f["type"] == "ModifyQuerySet" and any(m["type"] == "Add" for m in f["modifications"])
    ]
    assert len(adds_after) == 2 and adds_after[1] > auth_index


async def test_leaving_async_with_cancels_the_refresh_task(issuer, convex):
    # A refresh task exists only while a refresh is due: hold the scheduled one (the
    # second call) in the token source and leave the block while it is under way.
    source = TokenSource(issuer, ttl=4)
    refreshing = asyncio.Event()

    async def held(force_refresh: bool) -> str | None:
        if source.calls:
            refreshing.set()
            await asyncio.Event().wait()  # until the client is closed
        return await source(force_refresh)

    async with ConvexClient(convex.url, auth_refresh_leeway=2) as client:
        with anyio.fail_after(10):
            await client.set_auth(held)
            await refreshing.wait()
        names = {t.get_name() for t in asyncio.all_tasks() if not t.done()}
        assert "dartvex_auth_better.convex.auth_refresh" in names
    names = {t.get_name() for t in asyncio.all_tasks() if not t.done()}
    assert not any(n.startswith("dartvex_auth_better.convex") for n in names)


async def test_refresh_now_with_an_unchanged_token_returns(issuer, convex):
    token: str = issuer.mint("user-1", ttl=900)

    async def same_token(force_refresh: bool) -> str:
        return token

    async with ConvexClient(convex.url) as client:
        with anyio.fail_after(10):
            await client.set_auth(same_token, initial_token=token)
            await client.refresh_auth_now()  # nothing new to confirm: returns at once
            me = await client.query("users:whoami")
    assert me["subject"] == "user-1"


async def test_a_source_with_no_session_on_a_connected_client(issuer, convex):
    async def no_session(force_refresh: bool) -> None:
        await anyio.lowlevel.checkpoint()
        return None

    async with ConvexClient(convex.url) as client:
        with anyio.fail_after(10):
            await client.set_auth(issuer.mint("user-1"))
            with pytest.raises(SessionExpiredError):
                await client.set_auth(no_session)
            # The socket survived (no identity-version mix-up) and is anonymous now.
            assert await client.query("users:whoami") is None
    assert len(convex.connections) == 1
    frames = convex.connections[0].frames_of_type("Authenticate")
    assert [f["baseVersion"] for f in frames] == list(range(len(frames)))


async def test_a_stalled_token_request_is_retried_within_the_leeway(issuer, convex):
    stall = asyncio.Event()  # never set: the first refresh attempt hangs
    calls: list[bool] = []

    async def source(force_refresh: bool) -> str:
        calls.append(force_refresh)
        if len(calls) == 2:
            await stall.wait()
        token: str = issuer.mint("user-1", ttl=12, iat=time.time(), n=len(calls))
        return token

    # 12-second tokens, 10 s leeway (capped at 6 s): the stalled attempt is abandoned
    # after 5 s and retried while the token is still valid.
    async with ConvexClient(convex.url) as client:
        with anyio.fail_after(25):
            await client.set_auth(source)
            await convex.wait_for_tokens(2, timeout=25)
            me = await client.query("users:whoami")
    assert me["subject"] == "user-1"
    assert len(calls) >= 3
    assert all(not t.was_expired for t in convex.received_tokens)
    assert len(convex.connections) == 1  # no AuthError, no reconnect


async def test_closing_ends_a_pending_set_auth(issuer, convex):
    source = TokenSource(issuer)
    source.fail_next = 1000
    outcome: list[BaseException] = []
    async with ConvexClient(convex.url) as client:

        async def authenticate() -> None:
            try:
                await client.set_auth(source)
            except ClientClosedError as exc:
                outcome.append(exc)

        async with anyio.create_task_group() as tg:
            tg.start_soon(authenticate)
            await source.called.wait()
            await client.aclose()
    calls = len(source.calls)
    assert len(outcome) == 1 and isinstance(outcome[0], ClientClosedError)
    assert len(source.calls) == calls


async def test_retry_after_is_honoured(issuer, convex):
    source = TokenSource(issuer)
    attempts: list[float] = []

    async def limited(force_refresh: bool) -> str | None:
        attempts.append(time.monotonic())
        if len(attempts) == 1:
            raise RateLimitedError("slow down (test)", retry_after=1.5)
        return await source(force_refresh)

    async with ConvexClient(convex.url) as client:
        with anyio.fail_after(10):
            await client.set_auth(limited)
    assert len(attempts) == 2
    assert attempts[1] - attempts[0] >= 1.5


async def test_expect_auth_calls_fail_after_the_session_ends(issuer, convex):
    source = TokenSource(issuer, ttl=4)
    async with ConvexClient(convex.url, expect_auth=True, auth_refresh_leeway=2) as client:
        with anyio.fail_after(15):
            await client.set_auth(source)
            source.signed_out = True
            while not client._auth.signed_out:
                source.called.clear()
                await source.called.wait()
                await anyio.lowlevel.checkpoint()
            with pytest.raises(SessionExpiredError):
                await client.mutation("messages:send", {"body": "anonymous?"})
            with pytest.raises(SessionExpiredError):
                await client.query("users:whoami")
            # Signing in again makes calls work again.
            source.signed_out = False
            await client.set_auth(source)
            assert (await client.query("users:whoami"))["subject"] == "user-1"
    assert convex.db.query("messages") == []


async def test_an_ignored_auth_error_gets_the_ordinary_backoff(issuer, convex):
    async with ConvexClient(convex.url, initial_backoff=0.5) as client:
        with anyio.fail_after(10):
            await client.set_auth(TokenSource(issuer))
            record = convex.connections[0]
            # An AuthError about an older token (stale base version) is ignored: the
            # close that follows is a normal one.
            client._core.auth.identity_version = 5
            await convex.send_auth_error("old token", auth_update_attempted=True)
            closed_at = time.monotonic()
            await record.wait_closed()
            await convex.wait_for_connections(2)
            reconnected_at = time.monotonic()
    assert reconnected_at - closed_at >= 0.2  # backoff (0.25-0.75 s), not an instant restart


async def test_a_source_that_keeps_answering_the_same_token_is_asked_less_and_less(issuer):
    # A refresh is due at once (the token has 40 s left, the leeway is 50 s), and the
    # source keeps handing back the very same JWT. The client asks again, but backs off
    # (1 s, 2 s, ...) instead of asking every second for ever.
    token: str = issuer.mint("user-1", ttl=100, iat=time.time() - 60)
    asked: list[float] = []
    third = asyncio.Event()

    async def same_token(force_refresh: bool) -> str:
        asked.append(asyncio.get_running_loop().time())
        if len(asked) == 3:
            third.set()
        return token

    manager = AuthManager(leeway=50)
    manager.set_fetcher(same_token, token)
    with anyio.fail_after(10):
        async with anyio.create_task_group() as tg:
            tg.start_soon(manager.run_refresh_loop)
            await third.wait()
            tg.cancel_scope.cancel()
    first_gap, second_gap = asked[1] - asked[0], asked[2] - asked[1]
    assert first_gap >= 0.9
    assert second_gap >= 1.9 > first_gap + 0.5
    assert manager.token == token  # kept in force meanwhile


async def test_a_token_endpoint_slower_than_the_first_attempt_timeout_still_answers(issuer):
    # Every call takes 6 s, longer than the first attempt's 5 s: the attempt timeout grows
    # with consecutive failures, so the second attempt waits long enough.
    calls: list[bool] = []

    async def slow(force_refresh: bool) -> str:
        calls.append(force_refresh)
        await anyio.sleep(6)  # the endpoint's latency (what is under test), not a wait
        token: str = issuer.mint("user-1", iat=time.time(), n=len(calls))
        return token

    manager = AuthManager()
    manager.set_fetcher(slow, None)
    with anyio.fail_after(25):
        await manager.initial_fetch()
    assert manager.token is not None and not manager.signed_out
    assert calls == [False, False]


# -- set_auth's own input and first fetch ---------------------------------------------------


async def test_set_auth_rejects_what_is_no_token_source(convex):
    async with ConvexClient(convex.url) as client:
        with anyio.fail_after(5), pytest.raises(TypeError, match="int"):
            await client.set_auth(123)  # type: ignore[arg-type]
        assert await client.query("users:whoami") is None


class Refused(Exception):
    """A token source's own final error (no ``retryable``)."""


@pytest.mark.parametrize(
    "error",
    [Refused("no"), SessionStoreError("locked"), BetterAuthError("refused", status=400)],
    ids=["plain", "final-dartvex", "better-auth-400"],
)
async def test_a_first_fetch_that_fails_for_good_raises_from_set_auth(convex, error):
    calls: list[bool] = []

    async def fetcher(force_refresh: bool) -> str | None:
        calls.append(force_refresh)
        raise error

    async with ConvexClient(convex.url, expect_auth=True) as client:
        with anyio.fail_after(5):
            with pytest.raises(type(error)):
                await client.set_auth(fetcher)
            assert calls == [False]  # raised at once, not retried
            # Nothing runs anonymously under expect_auth: calls fail instead.
            with pytest.raises(SessionExpiredError):
                await client.query("users:whoami")
    assert calls == [False]  # and no refresh ran for the failed flow


async def test_a_first_fetch_that_fails_transiently_is_retried(issuer, convex):
    source = TokenSource(issuer)
    source.fail_next = 2
    async with ConvexClient(convex.url) as client:
        with anyio.fail_after(15):
            await client.set_auth(source)
            assert len(source.calls) == 3
            assert (await client.query("users:whoami"))["subject"] == "user-1"


async def test_expect_auth_calls_fail_after_signing_out(issuer, convex):
    source = TokenSource(issuer)
    seen: list[str] = []

    def write(ctx: Any, args: Any) -> None:
        identity = ctx.auth.get_user_identity()
        seen.append(identity["subject"] if identity else "ANONYMOUS")

    convex.mutation("log:write")(write)

    async with ConvexClient(convex.url, expect_auth=True) as client:
        with anyio.fail_after(10):
            await client.set_auth(source)
            await client.mutation("log:write")
            await client.clear_auth()
            for call in (client.mutation, client.query, client.action):
                with pytest.raises(SessionExpiredError):
                    await call("log:write")
            # The next sign-in makes calls go out again, under its identity.
            await client.set_auth(source)
            await client.mutation("log:write")
    assert seen == ["user-1", "user-1"]


async def test_a_failed_first_fetch_leaves_the_client_usable_anonymously(convex):
    async def fetcher(force_refresh: bool) -> str | None:
        raise Refused("no")

    def count(ctx: Any, args: Any) -> int:
        return 1

    convex.mutation("counter:one")(count)
    async with ConvexClient(convex.url) as client:
        with anyio.fail_after(5):
            with pytest.raises(Refused):
                await client.set_auth(fetcher)
            # Nothing is held back any more: calls go out, anonymously.
            assert await client.mutation("counter:one") == 1
            assert await client.query("users:whoami") is None
