"""ConvexBetterAuthProvider against the real Better Auth server.

What the real server cannot do on demand (a 503 burst, a 429, a request that hangs, a
request held open until the test lets it go) comes from a small fault-injecting reverse
proxy on a real socket in front of it. Everything else the proxy forwards untouched, and
it counts the requests per path, which is how the tests count HTTP calls.
"""

from __future__ import annotations

import logging
import secrets
import time
from collections import Counter, defaultdict
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import aiohttp
import anyio
import anyio.abc
import msgspec
import pytest
from aiohttp import web
from multidict import CIMultiDict

from dartvex_auth_better import (
    BetterAuthClient,
    BetterAuthError,
    BetterAuthSession,
    ConvexBetterAuthProvider,
    FileSessionStore,
    KeyringSessionStore,
    MemorySessionStore,
    NoSessionError,
    RateLimitedError,
    RequestTimeoutError,
    SessionExpiredError,
    SessionStoreError,
)
from dartvex_auth_better._jwt import token_claims, token_expiry
from dartvex_auth_better.convex._auth_types import AuthProvider
from dartvex_auth_better.testing._better_auth import LocalBetterAuth

pytestmark = [pytest.mark.anyio, pytest.mark.integration]

PASSWORD = "correct horse battery staple"
TOKEN = "/api/auth/convex/token"
GET_SESSION = "/api/auth/get-session"
SIGN_IN = "/api/auth/sign-in/email"
SIGN_UP = "/api/auth/sign-up/email"
SIGN_OUT = "/api/auth/sign-out"


def new_email() -> str:
    return f"provider-{secrets.token_hex(6)}@example.com"


# -- the fault-injecting proxy -----------------------------------------------------------


@dataclass(eq=False)
class Hold:
    """Keeps one request waiting at the proxy until ``release`` is set."""

    entered: anyio.Event = field(default_factory=anyio.Event)
    release: anyio.Event = field(default_factory=anyio.Event)


@dataclass(frozen=True)
class Fault:
    status: int
    body: dict[str, Any]
    headers: dict[str, str]


_HOP_BY_HOP = {
    "connection",
    "content-encoding",
    "content-length",
    "host",
    "keep-alive",
    "transfer-encoding",
}


class FaultyProxy:
    """A reverse proxy in front of ``upstream`` that can fail, hang or hold requests."""

    def __init__(self, upstream: str) -> None:
        self.upstream = upstream
        self.counts: Counter[str] = Counter()
        self._faults: defaultdict[str, list[Fault | Hold | None]] = defaultdict(list)
        self._hang_forever = anyio.Event()
        self._holds: list[Hold] = []
        self._runner: web.AppRunner | None = None
        self._http: aiohttp.ClientSession | None = None
        self.url = ""

    def fail_next(
        self,
        path: str,
        status: int,
        *,
        times: int = 1,
        body: dict[str, Any] | None = None,
        headers: dict[str, str] | None = None,
    ) -> None:
        fault = Fault(status, body or {"message": f"injected {status}"}, headers or {})
        self._faults[path].extend([fault] * times)

    def hang_next(self, path: str) -> None:
        self._faults[path].append(None)

    def hold_next(self, path: str) -> Hold:
        hold = Hold()
        self._holds.append(hold)
        self._faults[path].append(hold)
        return hold

    async def __aenter__(self) -> FaultyProxy:
        app = web.Application()
        app.router.add_route("*", "/{tail:.*}", self._handle)
        # A request whose client went away (timeout, cancellation) stops here too.
        self._runner = web.AppRunner(app, handler_cancellation=True)
        await self._runner.setup()
        site = web.TCPSite(self._runner, "127.0.0.1", 0)
        await site.start()
        port = self._runner.addresses[0][1]
        self.url = f"http://127.0.0.1:{port}"
        self._http = aiohttp.ClientSession(cookie_jar=aiohttp.DummyCookieJar())
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        self._hang_forever.set()
        for hold in self._holds:
            hold.release.set()
        assert self._runner is not None and self._http is not None
        await self._runner.cleanup()
        await self._http.close()

    async def _handle(self, request: web.Request) -> web.StreamResponse:
        path = request.path
        self.counts[path] += 1
        queue = self._faults.get(path)
        if queue:
            action = queue.pop(0)
            if action is None:
                await self._hang_forever.wait()
                raise web.HTTPServiceUnavailable()
            if isinstance(action, Fault):
                return web.json_response(action.body, status=action.status, headers=action.headers)
            action.entered.set()
            await action.release.wait()
        return await self._forward(request)

    async def _forward(self, request: web.Request) -> web.Response:
        assert self._http is not None
        headers = {k: v for k, v in request.headers.items() if k.lower() not in _HOP_BY_HOP}
        if "Origin" in headers:
            # Better Auth trusts its own origin; the client names the proxy's.
            headers["Origin"] = self.upstream
        async with self._http.request(
            request.method,
            self.upstream + request.path_qs,
            headers=headers,
            data=await request.read(),
            allow_redirects=False,
        ) as upstream:
            body = await upstream.read()
            out = CIMultiDict(
                (k, v) for k, v in upstream.headers.items() if k.lower() not in _HOP_BY_HOP
            )
            return web.Response(status=upstream.status, body=body, headers=out)


@pytest.fixture
async def proxy(better_auth_server: LocalBetterAuth) -> AsyncIterator[FaultyProxy]:
    async with FaultyProxy(better_auth_server.url) as running:
        yield running


@pytest.fixture
async def client(proxy: FaultyProxy) -> AsyncIterator[BetterAuthClient]:
    async with BetterAuthClient(proxy.url) as auth:
        yield auth


async def signed_up(auth: BetterAuthClient, name: str = "Ada") -> tuple[str, BetterAuthSession]:
    """A fresh account, created without the provider; returns its email and session."""
    email = new_email()
    return email, await auth.sign_up(name, email, PASSWORD)


def subject_of(jwt: str | None) -> Any:
    """The ``sub`` claim of a JWT (the Better Auth user id)."""
    assert jwt is not None
    claims = token_claims(jwt)
    assert claims is not None
    return claims.get("sub")


def stored_record(value: str | None) -> dict[str, Any]:
    assert value is not None
    record = msgspec.json.decode(value)
    assert isinstance(record, dict)
    return record


# -- the protocol --------------------------------------------------------------------------


async def test_the_provider_is_an_auth_provider(client: BetterAuthClient):
    provider: AuthProvider[BetterAuthSession] = ConvexBetterAuthProvider(client)
    assert await provider.fetch_token(False) is None  # never signed in: signed out
    assert await provider.fetch_token(True) is None
    with pytest.raises(ValueError):
        ConvexBetterAuthProvider(client, initial_session_token="")


# -- login, sign-up and what is persisted ------------------------------------------------


async def test_login_persists_a_record_without_the_jwt(client: BetterAuthClient, proxy):
    email, _ = await signed_up(client)
    store = MemorySessionStore()
    provider = ConvexBetterAuthProvider(client, store=store)
    session = await provider.login(email, PASSWORD)
    assert provider.session is session and provider.session_token == session.session_token
    assert provider.token_of(session) == session.token
    assert subject_of(session.token) == session.user_id
    record = stored_record(await store.get())
    assert record == {
        "version": 1,
        "session_token": session.session_token,
        "user_id": session.user_id,
        "email": email,
    }
    # A fresh JWT is handed out as it is; a forced fetch asks the server.
    calls = proxy.counts[TOKEN]
    assert await provider.fetch_token(False) == session.token
    assert proxy.counts[TOKEN] == calls
    fresh = await provider.fetch_token(True)
    assert proxy.counts[TOKEN] == calls + 1
    assert fresh is not None and subject_of(fresh) == session.user_id
    assert provider.session is not None and provider.session.token == fresh
    assert provider.session.session_token == session.session_token


async def test_login_after_sign_up_with_the_same_credentials_reuses_the_session(
    client: BetterAuthClient, proxy: FaultyProxy
):
    email = new_email()
    provider = ConvexBetterAuthProvider(client)
    created = await provider.sign_up("Bo", email, PASSWORD)
    assert provider.session is created and created.email == email and created.name == "Bo"
    again = await provider.login(email, PASSWORD)
    assert again is created
    assert proxy.counts[SIGN_UP] == 1 and proxy.counts[SIGN_IN] == 0
    # Only once: the next login signs in for real.
    third = await provider.login(email, PASSWORD)
    assert proxy.counts[SIGN_IN] == 1
    assert third.user_id == created.user_id and third.session_token != created.session_token


async def test_login_after_sign_up_with_other_credentials_signs_in(
    client: BetterAuthClient, proxy: FaultyProxy
):
    other_email, other = await signed_up(client, "Other")
    provider = ConvexBetterAuthProvider(client)
    await provider.sign_up("Cy", new_email(), PASSWORD)
    session = await provider.login(other_email, PASSWORD)
    assert proxy.counts[SIGN_IN] == 1
    assert session.email == other_email and session.user_id == other.user_id


async def test_a_store_that_cannot_be_written_does_not_fail_the_login(
    client: BetterAuthClient, caplog: pytest.LogCaptureFixture
):
    class ReadOnlyStore(MemorySessionStore):
        async def set(self, value: str) -> None:
            raise SessionStoreError("read-only file system")

    email, _ = await signed_up(client)
    provider = ConvexBetterAuthProvider(client, store=ReadOnlyStore())
    with caplog.at_level(logging.WARNING, logger="dartvex_auth_better"):
        session = await provider.login(email, PASSWORD)
    assert provider.session is session
    assert any("could not persist" in r.getMessage() for r in caplog.records)


# -- single flight -------------------------------------------------------------------------


async def logged_in(
    client: BetterAuthClient, store: MemorySessionStore | None = None
) -> ConvexBetterAuthProvider:
    # Signing up through the provider signs in too, at the cost of one password hash
    # (the server's slowest step) instead of two.
    provider = ConvexBetterAuthProvider(client, store=store)
    await provider.sign_up("Flo", new_email(), PASSWORD)
    return provider


async def test_fifty_concurrent_forced_fetches_make_one_call(
    client: BetterAuthClient, proxy: FaultyProxy
):
    provider = await logged_in(client)
    before = proxy.counts[TOKEN]
    hold = proxy.hold_next(TOKEN)
    results: list[str | None] = []

    async def fetch() -> None:
        results.append(await provider.fetch_token(True))

    async with anyio.create_task_group() as tg:
        for _ in range(50):
            tg.start_soon(fetch)
        await hold.entered.wait()
        await anyio.wait_all_tasks_blocked()  # all 50 are waiting now
        hold.release.set()
    assert proxy.counts[TOKEN] == before + 1
    assert len(results) == 50 and len(set(results)) == 1
    assert provider.session is not None and results[0] == provider.session.token


async def test_a_forced_fetch_during_a_fetch_in_flight_waits_for_it(
    client: BetterAuthClient, proxy: FaultyProxy
):
    provider = await logged_in(client)
    before = proxy.counts[TOKEN]
    hold = proxy.hold_next(TOKEN)
    results: list[str | None] = []

    async def fetch() -> None:
        results.append(await provider.fetch_token(True))

    async with anyio.create_task_group() as tg:
        tg.start_soon(fetch)
        await hold.entered.wait()  # the first request is at the server
        tg.start_soon(fetch)
        await anyio.wait_all_tasks_blocked()
        hold.release.set()
    assert proxy.counts[TOKEN] == before + 1
    assert len(results) == 2 and results[0] == results[1] and results[0] is not None


async def test_cancelling_the_leader_does_not_break_the_waiters(
    client: BetterAuthClient, proxy: FaultyProxy
):
    provider = await logged_in(client)
    before = proxy.counts[TOKEN]
    hold = proxy.hold_next(TOKEN)  # only the first request is held
    results: list[str | None] = []
    leader_cancelled: list[bool] = []

    async def leader(
        *, task_status: anyio.abc.TaskStatus[anyio.CancelScope] = anyio.TASK_STATUS_IGNORED
    ) -> None:
        with anyio.CancelScope() as scope:
            task_status.started(scope)
            await provider.fetch_token(True)
        leader_cancelled.append(scope.cancelled_caught)

    async def waiter() -> None:
        results.append(await provider.fetch_token(True))

    async with anyio.create_task_group() as tg:
        scope = await tg.start(leader)
        await hold.entered.wait()
        for _ in range(5):
            tg.start_soon(waiter)
        await anyio.wait_all_tasks_blocked()
        scope.cancel()
    assert leader_cancelled == [True]
    # The abandoned request, then exactly one more that a waiter led for the rest.
    assert proxy.counts[TOKEN] == before + 2
    assert len(results) == 5 and len(set(results)) == 1 and results[0] is not None
    assert provider.session is not None and provider.session.token == results[0]
    # Nothing is left in flight: the next forced fetch makes its own call.
    assert await provider.fetch_token(True) is not None
    assert proxy.counts[TOKEN] == before + 3


async def test_cancelling_a_waiter_does_not_disturb_the_others(
    client: BetterAuthClient, proxy: FaultyProxy
):
    provider = await logged_in(client)
    before = proxy.counts[TOKEN]
    hold = proxy.hold_next(TOKEN)
    results: list[str | None] = []

    async def fetch() -> None:
        results.append(await provider.fetch_token(True))

    async with anyio.create_task_group() as tg:
        tg.start_soon(fetch)
        await hold.entered.wait()
        with anyio.CancelScope() as doomed:
            async with anyio.create_task_group() as inner:
                inner.start_soon(fetch)
                await anyio.wait_all_tasks_blocked()
                doomed.cancel()
        tg.start_soon(fetch)
        await anyio.wait_all_tasks_blocked()
        hold.release.set()
    assert doomed.cancelled_caught
    assert proxy.counts[TOKEN] == before + 1
    assert len(results) == 2 and results[0] == results[1] and results[0] is not None


# -- transient failures keep the session ---------------------------------------------------


async def test_a_503_burst_raises_retryable_errors_and_keeps_the_session(
    client: BetterAuthClient, proxy: FaultyProxy
):
    store = MemorySessionStore()
    provider = await logged_in(client, store)
    session, record = provider.session, await store.get()
    before = proxy.counts[TOKEN]
    proxy.fail_next(TOKEN, 503, times=3, body={"message": "deploying"})

    errors: list[BetterAuthError] = []

    async def fetch() -> None:
        try:
            await provider.fetch_token(True)
        except BetterAuthError as exc:
            errors.append(exc)

    async with anyio.create_task_group() as tg:  # ten callers share the first 503
        for _ in range(10):
            tg.start_soon(fetch)
    assert len(errors) == 10 and proxy.counts[TOKEN] == before + 1
    for _ in range(2):
        with pytest.raises(BetterAuthError) as caught:
            await provider.fetch_token(True)
        errors.append(caught.value)
    for error in errors:
        assert error.retryable and error.status == 503
        assert not isinstance(error, SessionExpiredError)
        assert "deploying" in str(error)
    assert provider.session is session and await store.get() == record
    token = await provider.fetch_token(True)  # the burst is over
    assert token is not None and proxy.counts[TOKEN] == before + 4
    assert provider.session is not None and provider.session.token == token


async def test_a_429_is_retryable_with_retry_after_and_keeps_the_session(
    client: BetterAuthClient, proxy: FaultyProxy
):
    provider = await logged_in(client)
    session = provider.session
    proxy.fail_next(TOKEN, 429, headers={"Retry-After": "7"})
    with pytest.raises(RateLimitedError) as caught:
        await provider.fetch_token(True)
    assert caught.value.retryable and caught.value.retry_after == 7
    assert provider.session is session
    assert await provider.fetch_token(True) is not None


async def test_a_hanging_token_endpoint_times_out_and_keeps_the_session(
    proxy: FaultyProxy,
):
    async with BetterAuthClient(proxy.url, timeout=0.5) as client:
        provider = await logged_in(client)
        session = provider.session
        proxy.hang_next(TOKEN)
        with pytest.raises(RequestTimeoutError) as caught:
            await provider.fetch_token(True)
        assert caught.value.retryable
        assert provider.session is session
        assert await provider.fetch_token(True) is not None


# -- final expiry --------------------------------------------------------------------------


async def test_a_401_signs_out_once_clears_the_store_and_then_calls_nothing(
    client: BetterAuthClient, proxy: FaultyProxy, better_auth_server: LocalBetterAuth
):
    store = MemorySessionStore()
    email, _ = await signed_up(client)
    provider = ConvexBetterAuthProvider(client, store=store)
    session = await provider.login(email, PASSWORD)
    # Revoke the session behind the provider's back, straight on the real server: its
    # token endpoint now answers 401.
    async with BetterAuthClient(better_auth_server.url) as direct:
        await direct.sign_out(session.session_token)

    results: list[str | None] = []

    async def fetch() -> None:
        results.append(await provider.fetch_token(True))

    before = proxy.counts.copy()
    async with anyio.create_task_group() as tg:
        for _ in range(20):
            tg.start_soon(fetch)
    assert results == [None] * 20
    assert proxy.counts[TOKEN] == before[TOKEN] + 1
    assert provider.session is None and provider.session_token is None
    assert await store.get() is None

    # Latched: nothing asks any server any more.
    after = proxy.counts.copy()
    assert await provider.fetch_token(True) is None
    assert await provider.fetch_token(False) is None
    with pytest.raises(NoSessionError):
        await provider.login_from_cache()
    assert proxy.counts == after

    # Until the next login.
    await provider.login(email, PASSWORD)
    calls = proxy.counts[TOKEN]
    assert await provider.fetch_token(True) is not None
    assert proxy.counts[TOKEN] == calls + 1
    assert stored_record(await store.get())["session_token"] == provider.session_token


async def test_an_injected_401_forgets_the_session_file(
    client: BetterAuthClient, proxy: FaultyProxy, tmp_path: Path
):
    path = tmp_path / "session.json"
    email, _ = await signed_up(client)
    provider = ConvexBetterAuthProvider(client, store=FileSessionStore(path))
    await provider.login(email, PASSWORD)
    assert path.exists()
    proxy.fail_next(TOKEN, 401, body={"code": "UNAUTHORIZED"})
    assert await provider.fetch_token(True) is None
    assert not path.exists() and provider.session is None


async def test_a_fetch_in_flight_during_logout_does_not_bring_the_session_back(
    client: BetterAuthClient, proxy: FaultyProxy
):
    provider = await logged_in(client)
    hold = proxy.hold_next(TOKEN)
    results: list[str | None] = []

    async def fetch() -> None:
        results.append(await provider.fetch_token(True))

    async with anyio.create_task_group() as tg:
        tg.start_soon(fetch)
        await hold.entered.wait()
        await provider.logout()
        hold.release.set()
    assert results == [None]
    assert provider.session is None


async def test_a_fetch_in_flight_across_a_new_login_gets_the_new_users_token(
    client: BetterAuthClient, proxy: FaultyProxy
):
    provider = await logged_in(client)
    other_email, other = await signed_up(client, "Other")
    hold = proxy.hold_next(TOKEN)
    results: list[str | None] = []

    async def fetch() -> None:
        results.append(await provider.fetch_token(True))

    async with anyio.create_task_group() as tg:
        tg.start_soon(fetch)
        await hold.entered.wait()
        await provider.login(other_email, PASSWORD)  # the first user's session stays valid
        hold.release.set()
    # The first user's fresh token arrived after the switch: it went to nobody.
    assert len(results) == 1 and subject_of(results[0]) == other.user_id
    assert provider.session is not None and provider.session.user_id == other.user_id
    assert subject_of(provider.session.token) == other.user_id


# -- sign-ins overtaken by other identity changes ---------------------------------------------


async def test_a_stale_login_does_not_overwrite_a_newer_one(
    client: BetterAuthClient, proxy: FaultyProxy
):
    first_email, first = await signed_up(client, "First")
    second_email, second = await signed_up(client, "Second")
    store = MemorySessionStore()
    provider = ConvexBetterAuthProvider(client, store=store)
    hold = proxy.hold_next(SIGN_IN)  # the first login's request is slow
    stale: list[BetterAuthSession] = []

    async def first_login() -> None:
        stale.append(await provider.login(first_email, PASSWORD))

    async with anyio.create_task_group() as tg:
        tg.start_soon(first_login)
        await hold.entered.wait()
        newer = await provider.login(second_email, PASSWORD)
        hold.release.set()
    # The first login did sign in (its caller gets its session), but the provider keeps
    # the newer identity, in memory and in the store.
    assert len(stale) == 1 and stale[0].user_id == first.user_id
    assert provider.session is not None and provider.session.user_id == second.user_id
    assert provider.session_token == newer.session_token
    assert stored_record(await store.get())["user_id"] == second.user_id
    assert subject_of(await provider.fetch_token(True)) == second.user_id


async def test_a_logout_during_a_login_is_not_undone_by_it(
    client: BetterAuthClient, proxy: FaultyProxy
):
    email, _ = await signed_up(client)
    store = MemorySessionStore()
    provider = ConvexBetterAuthProvider(client, store=store)
    hold = proxy.hold_next(SIGN_IN)

    async with anyio.create_task_group() as tg:
        tg.start_soon(provider.login, email, PASSWORD)
        await hold.entered.wait()
        await provider.logout()  # the user gave up waiting and signed out
        hold.release.set()
    assert provider.session is None
    assert await store.get() is None
    assert await provider.fetch_token(True) is None
    assert proxy.counts[TOKEN] == 0


async def test_a_logout_during_a_sign_up_is_not_undone_by_it(
    client: BetterAuthClient, proxy: FaultyProxy
):
    email = new_email()
    store = MemorySessionStore()
    provider = ConvexBetterAuthProvider(client, store=store)
    hold = proxy.hold_next(SIGN_UP)

    async with anyio.create_task_group() as tg:
        tg.start_soon(provider.sign_up, "Ida", email, PASSWORD)
        await hold.entered.wait()
        await provider.logout()
        hold.release.set()
    assert provider.session is None and await store.get() is None
    # Nor does its sign-up mark make a later login skip the server.
    await provider.login(email, PASSWORD)
    assert proxy.counts[SIGN_IN] == 1


async def test_a_401_for_the_old_session_during_a_login_keeps_the_new_one(
    client: BetterAuthClient, proxy: FaultyProxy
):
    store = MemorySessionStore()
    provider = await logged_in(client, store)
    other_email, other = await signed_up(client, "Other")
    hold = proxy.hold_next(SIGN_IN)

    async with anyio.create_task_group() as tg:
        tg.start_soon(provider.login, other_email, PASSWORD)
        await hold.entered.wait()
        # Meanwhile the old session ends on the server: that is no newer sign-in.
        proxy.fail_next(TOKEN, 401, body={"code": "UNAUTHORIZED"})
        assert await provider.fetch_token(True) is None
        hold.release.set()
    assert provider.session is not None and provider.session.user_id == other.user_id
    assert stored_record(await store.get())["user_id"] == other.user_id


async def test_a_restore_overtaken_by_a_login_does_not_replace_it(
    client: BetterAuthClient, proxy: FaultyProxy
):
    store = MemorySessionStore()
    provider = await logged_in(client, store)
    other_email, other = await signed_up(client, "Other")
    hold = proxy.hold_next(GET_SESSION)

    async with anyio.create_task_group() as tg:
        tg.start_soon(provider.login_from_cache)
        await hold.entered.wait()
        await provider.login(other_email, PASSWORD)
        hold.release.set()
    assert provider.session is not None and provider.session.user_id == other.user_id
    assert stored_record(await store.get())["user_id"] == other.user_id


# -- restore -------------------------------------------------------------------------------


async def test_a_restart_restores_the_session_from_the_file_store(
    better_auth_server: LocalBetterAuth, tmp_path: Path
):
    path = tmp_path / "state" / "session.json"
    email = new_email()
    async with BetterAuthClient(better_auth_server.url) as first_client:
        first = ConvexBetterAuthProvider(first_client, store=FileSessionStore(path))
        original = await first.sign_up("Restart", email, PASSWORD)
    assert path.stat().st_mode & 0o777 == 0o600
    assert original.session_token not in path.parent.name

    # A new process: a new client, a new provider, the same file.
    async with BetterAuthClient(better_auth_server.url) as second_client:
        second = ConvexBetterAuthProvider(second_client, store=FileSessionStore(path))
        assert second.session is None
        restored = await second.login_from_cache()
        assert restored.user_id == original.user_id and restored.email == email
        assert second.session is restored
        assert subject_of(restored.token) == original.user_id
        fresh = await second.fetch_token(True)
        assert fresh is not None and subject_of(fresh) == original.user_id
    record = stored_record(path.read_text())
    assert record["session_token"] == restored.session_token


async def test_initial_session_token_is_restored_and_then_persisted(
    client: BetterAuthClient, proxy: FaultyProxy
):
    _, session = await signed_up(client)
    store = MemorySessionStore()
    provider = ConvexBetterAuthProvider(
        client, initial_session_token=session.session_token, store=store
    )
    before = proxy.counts[GET_SESSION]
    restored = await provider.login_from_cache()
    assert proxy.counts[GET_SESSION] == before + 1
    assert restored.user_id == session.user_id and provider.session is restored
    assert stored_record(await store.get())["session_token"] == restored.session_token
    # A second restore uses the session at hand and asks the server again.
    again = await provider.login_from_cache()
    assert proxy.counts[GET_SESSION] == before + 2
    assert again.user_id == session.user_id


async def test_login_from_cache_with_nothing_stored_asks_no_server(
    client: BetterAuthClient, proxy: FaultyProxy
):
    provider = ConvexBetterAuthProvider(client, store=MemorySessionStore())
    with pytest.raises(NoSessionError, match="no Better Auth session to restore"):
        await provider.login_from_cache()
    assert sum(proxy.counts.values()) == 0


async def test_login_from_cache_with_a_revoked_session_forgets_it(
    client: BetterAuthClient, proxy: FaultyProxy
):
    store = MemorySessionStore()
    email, _ = await signed_up(client)
    provider = ConvexBetterAuthProvider(client, store=store)
    session = await provider.login(email, PASSWORD)
    await client.sign_out(session.session_token)

    restarted = ConvexBetterAuthProvider(client, store=store)
    with pytest.raises(SessionExpiredError) as caught:
        await restarted.login_from_cache()
    assert not caught.value.retryable
    assert await store.get() is None and restarted.session is None
    before = proxy.counts.copy()
    with pytest.raises(NoSessionError):
        await restarted.login_from_cache()
    assert proxy.counts == before


async def test_a_revoked_initial_session_token_is_forgotten(client: BetterAuthClient):
    _, session = await signed_up(client)
    await client.sign_out(session.session_token)
    provider = ConvexBetterAuthProvider(client, initial_session_token=session.session_token)
    with pytest.raises(SessionExpiredError):
        await provider.login_from_cache()
    with pytest.raises(NoSessionError):
        await provider.login_from_cache()


@pytest.mark.parametrize("status", [503, 429])
async def test_a_transient_error_during_restore_keeps_everything(
    client: BetterAuthClient, proxy: FaultyProxy, status: int
):
    _, session = await signed_up(client)
    store = MemorySessionStore()
    provider = ConvexBetterAuthProvider(
        client, initial_session_token=session.session_token, store=store
    )
    proxy.fail_next(GET_SESSION, status)
    with pytest.raises(BetterAuthError) as caught:
        await provider.login_from_cache()
    assert caught.value.retryable and not isinstance(caught.value, SessionExpiredError)
    assert provider.session is None and await store.get() is None

    restored = await provider.login_from_cache()  # the seed token was kept
    assert restored.user_id == session.user_id
    assert stored_record(await store.get())["session_token"] == restored.session_token


async def test_a_transient_error_keeps_a_restored_session_and_its_record(
    client: BetterAuthClient, proxy: FaultyProxy
):
    store = MemorySessionStore()
    provider = await logged_in(client, store)
    session, record = provider.session, await store.get()
    proxy.fail_next(GET_SESSION, 502)
    with pytest.raises(BetterAuthError):
        await provider.login_from_cache()
    assert provider.session is session and await store.get() == record


@pytest.mark.parametrize(
    ("value", "warning"),
    [
        ("ses_not-a-record", "not a session record"),
        ('{"version": 1}', "not a session record"),
        ('{"version": 1, "session_token": ""}', "no session token"),
        ('{"version": 2, "token": "whatever"}', "record version 2"),
    ],
)
async def test_a_stored_value_that_is_not_a_record_is_no_session(
    client: BetterAuthClient,
    proxy: FaultyProxy,
    caplog: pytest.LogCaptureFixture,
    value: str,
    warning: str,
):
    store = MemorySessionStore(value)
    provider = ConvexBetterAuthProvider(client, store=store)
    with (
        caplog.at_level(logging.WARNING, logger="dartvex_auth_better"),
        pytest.raises(NoSessionError),
    ):
        await provider.login_from_cache()
    assert any(warning in r.getMessage() for r in caplog.records)
    assert all(value not in r.getMessage() for r in caplog.records)
    assert sum(proxy.counts.values()) == 0
    assert await store.get() == value  # left for a newer version, overwritten by a login


async def test_a_corrupt_session_file_is_no_session_and_the_next_login_replaces_it(
    client: BetterAuthClient, tmp_path: Path
):
    path = tmp_path / "session.json"
    path.write_bytes(b"\x00\xff{{{")
    email, _ = await signed_up(client)
    provider = ConvexBetterAuthProvider(client, store=FileSessionStore(path))
    with pytest.raises(NoSessionError):
        await provider.login_from_cache()
    session = await provider.login(email, PASSWORD)
    assert stored_record(path.read_text())["session_token"] == session.session_token


async def test_an_unreadable_store_is_a_typed_error(client: BetterAuthClient, tmp_path: Path):
    provider = ConvexBetterAuthProvider(client, store=FileSessionStore(tmp_path))
    with pytest.raises(SessionStoreError, match="could not read"):
        await provider.login_from_cache()


# -- logout --------------------------------------------------------------------------------


async def test_logout_signs_out_on_the_server_and_clears_the_store(
    client: BetterAuthClient, proxy: FaultyProxy, tmp_path: Path
):
    path = tmp_path / "session.json"
    email, _ = await signed_up(client)
    provider = ConvexBetterAuthProvider(client, store=FileSessionStore(path))
    session = await provider.login(email, PASSWORD)
    await provider.logout()
    assert proxy.counts[SIGN_OUT] == 1
    assert provider.session is None and not path.exists()
    assert await client.get_session(session.session_token) is None  # revoked for real
    assert await provider.fetch_token(True) is None
    with pytest.raises(NoSessionError):
        await provider.login_from_cache()


async def test_logout_clears_everything_even_when_sign_out_fails(
    client: BetterAuthClient, proxy: FaultyProxy, tmp_path: Path
):
    path = tmp_path / "session.json"
    email, _ = await signed_up(client)
    provider = ConvexBetterAuthProvider(client, store=FileSessionStore(path))
    await provider.login(email, PASSWORD)
    proxy.fail_next(SIGN_OUT, 500, body={"message": "database down"})
    with pytest.raises(BetterAuthError) as caught:
        await provider.logout()
    assert caught.value.status == 500 and "database down" in str(caught.value)
    assert provider.session is None and not path.exists()
    with pytest.raises(NoSessionError):
        await provider.login_from_cache()
    assert await provider.fetch_token(True) is None


async def test_logout_without_a_session_makes_no_request_but_clears_the_store(
    client: BetterAuthClient, proxy: FaultyProxy
):
    store = MemorySessionStore('{"version": 1, "session_token": "ses_stale-token-123456"}')
    provider = ConvexBetterAuthProvider(client, store=store)
    await provider.logout()
    assert sum(proxy.counts.values()) == 0
    assert await store.get() is None


async def test_logout_raises_when_the_store_cannot_be_cleared(client: BetterAuthClient):
    class StickyStore(MemorySessionStore):
        async def remove(self) -> None:
            raise SessionStoreError("disk full")

    email, _ = await signed_up(client)
    provider = ConvexBetterAuthProvider(client, store=StickyStore())
    await provider.login(email, PASSWORD)
    with pytest.raises(SessionStoreError, match="disk full"):
        await provider.logout()
    assert provider.session is None


# -- JWT reuse by lifetime -----------------------------------------------------------------


async def test_a_stale_jwt_is_refreshed_without_force():
    async with (
        LocalBetterAuth(jwt_ttl_seconds=4) as server,
        FaultyProxy(server.url) as proxy,
        BetterAuthClient(proxy.url) as client,
    ):
        provider = await logged_in(client)
        assert provider.session is not None
        first = provider.session.token
        calls = proxy.counts[TOKEN]
        assert await provider.fetch_token(False) == first  # fresh: no call
        assert proxy.counts[TOKEN] == calls
        # Let wall-clock time pass until less than a quarter of its life is left.
        exp = token_expiry(first)
        assert exp is not None
        await anyio.sleep(max(0.0, exp - 1.0 - time.time()) + 0.05)
        # A stale token sends even an unforced fetch to the server, and a forced one
        # that arrives meanwhile waits for that same request.
        hold = proxy.hold_next(TOKEN)
        results: list[str | None] = []

        async def fetch(force: bool) -> None:
            results.append(await provider.fetch_token(force))

        async with anyio.create_task_group() as tg:
            tg.start_soon(fetch, False)
            await hold.entered.wait()
            tg.start_soon(fetch, True)
            await anyio.wait_all_tasks_blocked()
            hold.release.set()
        assert proxy.counts[TOKEN] == calls + 1
        assert len(results) == 2 and results[0] == results[1]
        fresh = results[0]
        fresh_exp = token_expiry(fresh) if fresh is not None else None
        assert fresh_exp is not None and fresh_exp > exp


# -- keyring end to end --------------------------------------------------------------------


async def test_a_restart_restores_from_a_keyring(
    better_auth_server: LocalBetterAuth, tmp_path: Path
):
    file_backends: Any = pytest.importorskip("keyrings.alt.file")
    backend = file_backends.PlaintextKeyring()
    backend.file_path = str(tmp_path / "keyring.cfg")
    email = new_email()
    async with BetterAuthClient(better_auth_server.url) as first_client:
        first = ConvexBetterAuthProvider(
            first_client, store=KeyringSessionStore(username=email, backend=backend)
        )
        original = await first.sign_up("Key", email, PASSWORD)
    async with BetterAuthClient(better_auth_server.url) as second_client:
        store = KeyringSessionStore(username=email, backend=backend)
        second = ConvexBetterAuthProvider(second_client, store=store)
        restored = await second.login_from_cache()
        assert restored.user_id == original.user_id
        await second.logout()
        assert await store.get() is None


# -- secrets -------------------------------------------------------------------------------


async def test_no_token_or_password_reaches_logs_or_reprs(
    client: BetterAuthClient, proxy: FaultyProxy, caplog: pytest.LogCaptureFixture
):
    store = MemorySessionStore()
    email = new_email()
    seen: set[str] = {PASSWORD}
    with caplog.at_level(logging.DEBUG, logger="dartvex_auth_better"):
        provider = ConvexBetterAuthProvider(client, store=store)
        session = await provider.sign_up("Secret", email, PASSWORD)
        seen |= {session.token, session.session_token}
        for force in (False, True):
            token = await provider.fetch_token(force)
            assert token is not None
            seen.add(token)
        proxy.fail_next(TOKEN, 503)
        with pytest.raises(BetterAuthError) as transient:
            await provider.fetch_token(True)
        restored = await ConvexBetterAuthProvider(client, store=store).login_from_cache()
        seen |= {restored.token, restored.session_token}
        texts = [repr(provider), repr(store), repr(session), str(session), repr(transient.value)]
        await provider.logout()
        again = await provider.login(email, PASSWORD)
        seen |= {again.token, again.session_token}
        proxy.fail_next(TOKEN, 401)
        assert await provider.fetch_token(True) is None
    texts += [r.getMessage() for r in caplog.records]
    assert any("session" in text for text in texts)  # the logging did happen
    for secret in seen:
        for text in texts:
            assert secret not in text
