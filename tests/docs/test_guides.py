"""The guides' examples (docs/snippets/), run against the local stack."""

from __future__ import annotations

import json
import os
import shutil
import socket
import stat
import sys
from pathlib import Path
from typing import Any

import anyio
import httpx
import pytest

from dartvex_auth_better import (
    BetterAuthClient,
    ConvexClient,
    ConvexError,
    ConvexHttpClient,
    FileSessionStore,
    InvalidCredentialsError,
    KeyringSessionStore,
    MemorySessionStore,
    RequestTimeoutError,
    SessionStore,
    SessionStoreError,
    TransportError,
)
from dartvex_auth_better.testing import LocalBetterAuth, LocalConvex
from docs.snippets import auth_lifecycle, error_handling, fastapi_minimal, session_stores
from docs.snippets.testing_app import conftest as example_conftest
from docs.snippets.testing_app import test_todos as example_tests

from ._helpers import PASSWORD, WAIT, new_email, serve, signed_up

pytestmark = [pytest.mark.anyio, pytest.mark.integration]

ROOT = Path(__file__).resolve().parents[2]
SNIPPETS = ROOT / "docs" / "snippets"


async def new_account(better_auth: LocalBetterAuth, name: str = "Docs") -> tuple[str, str]:
    """A fresh account's email and session token."""
    email = new_email(name.lower())
    async with BetterAuthClient(better_auth.url) as auth:
        session = await auth.sign_up(name, email, PASSWORD)
    return email, session.session_token


def dead_url() -> str:
    """A loopback URL nothing listens on."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return f"http://127.0.0.1:{sock.getsockname()[1]}"


# -- the auth lifecycle ----------------------------------------------------------------


async def test_watch_a_login(
    better_auth_server: LocalBetterAuth,
    convex_server: LocalConvex,
    capsys: pytest.CaptureFixture[str],
) -> None:
    email, _ = await new_account(better_auth_server)
    with anyio.fail_after(WAIT):
        await auth_lifecycle.watch_a_login(
            convex_server.url, better_auth_server.url, email, PASSWORD
        )
    lines = capsys.readouterr().out.splitlines()
    # Two tasks print: each one's lines come in order.
    assert [line for line in lines if not line.startswith("event:")] == [
        "now: signed out",
        f"now: signed in as {email}",
        f"whoami: {email}",
        "now: signed out",
    ]
    assert [line for line in lines if line.startswith("event:")] == [
        "event: signed_in",
        "event: signed_out",
    ]


async def test_my_own_token_source(
    better_auth_server: LocalBetterAuth, convex_server: LocalConvex
) -> None:
    email, _ = await new_account(better_auth_server)
    with anyio.fail_after(WAIT):
        me = await auth_lifecycle.with_my_own_token_source(
            convex_server.url, better_auth_server.url, email, PASSWORD
        )
    assert me == email


# -- session storage -------------------------------------------------------------------


def test_choosing_a_store() -> None:
    assert session_stores.file_store().path == Path.home() / ".config/my-app/session.json"
    store = session_stores.keyring_store("ada@example.com")
    assert (store.service, store.username) == ("my-app", "ada@example.com")


@pytest.fixture
def file_keyring(tmp_path: Path) -> Any:
    """A real keyring backend that keeps its secrets in a file under tmp_path."""
    file_backends: Any = pytest.importorskip("keyrings.alt.file")
    backend = file_backends.PlaintextKeyring()
    backend.file_path = str(tmp_path / "keyring.cfg")
    return backend


@pytest.mark.parametrize("kind", ["memory", "file", "keyring", "sqlite"])
async def test_sign_in_then_restart(
    better_auth_server: LocalBetterAuth,
    convex_server: LocalConvex,
    tmp_path: Path,
    file_keyring: Any,
    kind: str,
) -> None:
    stores: dict[str, SessionStore] = {
        "memory": MemorySessionStore(),
        "file": FileSessionStore(tmp_path / "config" / "session.json"),
        "keyring": KeyringSessionStore(username="ada", backend=file_keyring),
        "sqlite": session_stores.SqliteSessionStore(tmp_path / "sessions.db", "ada"),
    }
    store = stores[kind]
    email, _ = await new_account(better_auth_server)
    user_id = await session_stores.sign_in_then_restart(
        convex_server.url, better_auth_server.url, store, email, PASSWORD
    )
    assert user_id
    stored = await store.get()
    assert stored is not None
    # The documented record: versioned, the session token, who it belongs to.
    record = json.loads(stored)
    assert set(record) == {"version", "session_token", "user_id", "email"}
    assert (record["version"], record["user_id"], record["email"]) == (1, user_id, email)


async def test_sqlite_store(tmp_path: Path) -> None:
    path = tmp_path / "sessions.db"
    ada = session_stores.SqliteSessionStore(path, "ada")
    bob = session_stores.SqliteSessionStore(path, "bob")
    assert isinstance(ada, SessionStore)
    assert await ada.get() is None
    await ada.set("one")
    await bob.set("two")
    await ada.set("three")
    assert (await ada.get(), await bob.get()) == ("three", "two")
    await ada.remove()
    await ada.remove()  # removing nothing succeeds
    assert (await ada.get(), await bob.get()) == (None, "two")
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    broken = session_stores.SqliteSessionStore(tmp_path / "missing-dir" / "x.db", "ada")
    with pytest.raises(SessionStoreError):
        await broken.get()


async def test_restore_from_a_secret(
    better_auth_server: LocalBetterAuth,
    convex_server: LocalConvex,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    email, session_token = await new_account(better_auth_server)
    monkeypatch.setenv("MY_APP_SESSION_TOKEN", session_token)
    restored = await session_stores.restore_from_a_secret(convex_server.url, better_auth_server.url)
    assert restored == email


# -- errors ------------------------------------------------------------------------------


async def test_with_retries_gives_up_on_what_cannot_succeed() -> None:
    calls = 0

    async def unreachable() -> Any:
        nonlocal calls
        calls += 1
        async with ConvexHttpClient(dead_url()) as convex:
            return await convex.query("messages:list")

    with pytest.raises(TransportError) as caught:
        await error_handling.with_retries(unreachable, attempts=3, first_delay=0.001)
    assert caught.value.retryable and calls == 3

    async def refused() -> Any:
        nonlocal calls
        calls += 1
        raise InvalidCredentialsError("no", status=401)

    calls = 0
    with pytest.raises(InvalidCredentialsError):
        await error_handling.with_retries(refused, first_delay=0.001)
    assert calls == 1


async def test_with_retries_returns_what_a_retry_got() -> None:
    outcomes: list[Exception | str] = [RequestTimeoutError("slow"), "done"]

    async def flaky() -> str:
        outcome = outcomes.pop(0)
        if isinstance(outcome, Exception):
            raise outcome
        return outcome

    assert await error_handling.with_retries(flaky, first_delay=0.001) == "done"


async def test_sign_in_errors(
    better_auth_server: LocalBetterAuth, capsys: pytest.CaptureFixture[str]
) -> None:
    email, _ = await new_account(better_auth_server)
    async with BetterAuthClient(better_auth_server.url) as auth:
        assert await error_handling.sign_in(auth, email, "wrong password 123") is None
        session = await error_handling.sign_in(auth, email, PASSWORD)
        assert session is not None and session.email == email
    async with BetterAuthClient(dead_url()) as nowhere:
        assert await error_handling.sign_in(nowhere, email, PASSWORD) is None
    assert capsys.readouterr().out.splitlines() == [
        "wrong email or password",
        "the sign-in service is unavailable; try again later",
    ]


async def test_app_errors(
    better_auth_server: LocalBetterAuth,
    convex_server: LocalConvex,
    capsys: pytest.CaptureFixture[str],
) -> None:
    async with signed_up(better_auth_server, convex_server) as user:
        assert await error_handling.send(user.client, "") is None
        assert await error_handling.send(user.client, "hi")
    assert capsys.readouterr().out == "refused: body must be a non-empty string\n"
    async with ConvexClient(convex_server.url) as anonymous:
        with pytest.raises(ConvexError) as caught:
            await error_handling.send(anonymous, "hi")
    assert caught.value.data == {"code": "UNAUTHENTICATED"}


# -- FastAPI -------------------------------------------------------------------------------


async def test_fastapi_minimal(
    better_auth_server: LocalBetterAuth, convex_server: LocalConvex
) -> None:
    service_email, _ = await new_account(better_auth_server, "Service")
    _, caller_token = await new_account(better_auth_server, "Caller")
    app = fastapi_minimal.create_app(
        convex_server.url,
        site_url=better_auth_server.url,
        email=service_email,
        password=PASSWORD,
    )
    bearer = {"Authorization": f"Bearer {caller_token}"}
    with anyio.fail_after(WAIT):
        async with serve(app) as (http, _):
            whoami = await http.get("/service/whoami")
            assert whoami.status_code == 200 and whoami.json()["email"] == service_email
            sent = await http.post("/me/messages", json={"body": "hi"}, headers=bearer)
            assert sent.status_code == 201, sent.text
            mine = await http.get("/me/messages", headers=bearer)
            assert [m["body"] for m in mine.json()] == ["hi"]
            assert (await http.get("/me/messages")).status_code == 401


async def test_fastapi_composed_lifespan(
    better_auth_server: LocalBetterAuth, convex_server: LocalConvex
) -> None:
    email, token = await new_account(better_auth_server)
    app = fastapi_minimal.create_app_with_more_state(
        convex_server.url, site_url=better_auth_server.url
    )
    with anyio.fail_after(WAIT):
        async with serve(app) as (http, state):
            assert state["started"] is True
            me = await http.get("/me", headers={"Authorization": f"Bearer {token}"})
            assert me.status_code == 200 and me.json()["email"] == email
            gone = await http.get("/me", headers={"Authorization": "Bearer not-a-session"})
            assert gone.status_code == 401
    assert isinstance(http, httpx.AsyncClient)


# -- subprocesses: a user's test suite, the command line ---------------------------------


def subprocess_env(**extra: str) -> dict[str, str]:
    """This interpreter's scripts first on PATH (dartvex-auth-better, pytest)."""
    path = f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}"
    return {**os.environ, "PATH": path, **extra}


async def test_the_testing_page_example_as_a_users_test_suite(tmp_path: Path) -> None:
    # Copied out of the repository, as a project of its own: the fixtures must come from
    # the installed plugin, not from this repository's conftest.
    # (Imported here, so the type checker checks them like the other examples.)
    for module in (example_conftest, example_tests):
        assert module.__file__ is not None
        shutil.copy(module.__file__, tmp_path / Path(module.__file__).name)
    with anyio.fail_after(120):
        result = await anyio.run_process(
            [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-W", "error"],
            cwd=tmp_path,
            env=subprocess_env(),
            check=False,
        )
    output = result.stdout.decode() + result.stderr.decode()
    assert result.returncode == 0, output
    assert "4 passed" in output, output


async def test_the_command_line_tour(
    better_auth_server: LocalBetterAuth, convex_server: LocalConvex, tmp_path: Path
) -> None:
    email = new_email("shell")
    env = subprocess_env(
        DARTVEX_URL=convex_server.url,
        DARTVEX_SITE_URL=better_auth_server.url,
        DARTVEX_SESSION_FILE=str(tmp_path / "session.json"),
    )
    with anyio.fail_after(60):
        result = await anyio.run_process(
            ["bash", str(SNIPPETS / "cli_tour.sh"), email],
            input=f"{PASSWORD}\n".encode(),
            env=env,
            check=False,
        )
    out, err = result.stdout.decode(), result.stderr.decode()
    assert result.returncode == 0, out + err
    lines = out.splitlines()
    assert json.loads(lines[0])["email"] == email  # whoami
    assert json.loads(lines[1]).startswith("messages")  # the new message's id
    listed = json.loads(lines[2])
    assert [m["body"] for m in listed] == ["hello from the shell"]
    assert json.loads(lines[3]) == listed  # watch's first line
    assert lines[4].startswith("got a JWT of ")
    assert lines[5:] == ["whoami now exits with 3"]
    assert PASSWORD not in out + err
    assert not (tmp_path / "session.json").exists()
