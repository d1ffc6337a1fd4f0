"""The recipes' examples (docs/snippets/*.py), run against the local stack."""

from __future__ import annotations

import argparse
import importlib
import json
import shlex
import stat
import sys
from pathlib import Path
from typing import Any

import anyio
import pytest

from dartvex_auth_better import BetterAuthClient
from dartvex_auth_better.testing import LocalBetterAuth, LocalConvex
from docs.examples import fastapi_app
from docs.snippets import bot, first_script
from docs.snippets.chat_app import register_chat

from ._helpers import PASSWORD, WAIT, new_email, serve, signed_up, wait_for_value

pytestmark = [pytest.mark.anyio, pytest.mark.integration]

ROOT = Path(__file__).resolve().parents[2]


async def test_first_script(
    better_auth_server: LocalBetterAuth,
    convex_server: LocalConvex,
    capsys: pytest.CaptureFixture[str],
) -> None:
    email = new_email("ada")
    bodies = await first_script.main(convex_server.url, better_auth_server.url, email, PASSWORD)
    assert bodies == ["hello", "world"]
    assert capsys.readouterr().out.splitlines() == [
        f"signed in as {email}",
        "['hello']",
        "['hello', 'world']",
    ]


async def test_first_script_starts_its_own_local_stack(capsys: pytest.CaptureFixture[str]) -> None:
    # What `python docs/snippets/first_script.py` runs: a Better Auth server of its own.
    await first_script.with_local_stack()
    assert capsys.readouterr().out.splitlines()[1:] == ["['hello']", "['hello', 'world']"]


def pongs(messages: list[dict[str, Any]]) -> list[dict[str, Any]]:
    return [m for m in messages if m["body"] == "pong"]


async def test_bot_answers_pings_and_restores_its_session(
    better_auth_server: LocalBetterAuth, convex_server: LocalConvex, tmp_path: Path
) -> None:
    register_chat(convex_server)
    bot_email = new_email("bot")
    async with BetterAuthClient(convex_server.url, site_url=better_auth_server.url) as auth:
        await auth.sign_up("Ping Bot", bot_email, PASSWORD)
    session_file = tmp_path / "state" / "bot-session.json"

    async def run_bot(password: str) -> int:
        with anyio.fail_after(WAIT):
            return await bot.run_bot(
                convex_server.url,
                site_url=better_auth_server.url,
                session_file=session_file,
                email=bot_email,
                password=password,
                max_replies=1,
            )

    async with signed_up(better_auth_server, convex_server) as user:
        await user.mutation("chat:send", {"body": "ping"})
        assert await run_bot(PASSWORD) == 1
        messages = await user.query("chat:list")
        assert [m["body"] for m in messages] == ["ping", "pong"]
        assert messages[1]["replyTo"] == messages[0]["id"]

        # The session file: owner-only, the documented record.
        assert stat.S_IMODE(session_file.stat().st_mode) == 0o600
        record = json.loads(session_file.read_text())
        assert set(record) == {"version", "session_token", "user_id", "email"}
        assert record["version"] == 1 and record["email"] == bot_email

        # A restart: the stored session is used, the (now wrong) password never is, and
        # the ping answered before is not answered again.
        await user.mutation("chat:send", {"body": "ping"})
        assert await run_bot("not the password") == 1
        messages = await user.query("chat:list")
        assert [m["body"] for m in messages] == ["ping", "pong", "ping", "pong"]


async def test_bot_signs_in_again_when_its_session_is_revoked(
    better_auth_server: LocalBetterAuth, convex_server: LocalConvex, tmp_path: Path
) -> None:
    register_chat(convex_server)
    bot_email = new_email("bot")
    async with BetterAuthClient(convex_server.url, site_url=better_auth_server.url) as auth:
        await auth.sign_up("Ping Bot", bot_email, PASSWORD)
        session_file = tmp_path / "bot-session.json"
        replies: list[int] = []

        async def run() -> None:
            replies.append(
                await bot.run_bot(
                    convex_server.url,
                    site_url=better_auth_server.url,
                    session_file=session_file,
                    email=bot_email,
                    password=PASSWORD,
                    max_replies=2,
                )
            )

        async with signed_up(better_auth_server, convex_server) as user:
            with anyio.fail_after(WAIT):
                async with anyio.create_task_group() as tg:
                    tg.start_soon(run)
                    await user.mutation("chat:send", {"body": "ping"})
                    await wait_for_value(user, "chat:list", lambda ms: len(pongs(ms)) == 1)
                    # Revoke the bot's session on the server, and make its client ask for
                    # a fresh token (as it would when the current one expires).
                    first = json.loads(session_file.read_text())["session_token"]
                    await auth.sign_out(first)
                    await convex_server.send_auth_error("token expired")
                    await user.mutation("chat:send", {"body": "ping"})
            assert replies == [2]
            messages = await user.query("chat:list")
            assert [m["body"] for m in messages] == ["ping", "pong", "ping", "pong"]
            # It signed in again with its password, and saved the new session.
            assert json.loads(session_file.read_text())["session_token"] != first


async def test_bot_main_runs_until_cancelled(
    better_auth_server: LocalBetterAuth,
    convex_server: LocalConvex,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    register_chat(convex_server)
    bot_email = new_email("bot")
    async with BetterAuthClient(convex_server.url, site_url=better_auth_server.url) as auth:
        await auth.sign_up("Ping Bot", bot_email, PASSWORD)
    for name, value in {
        "DARTVEX_URL": convex_server.url,
        "DARTVEX_SITE_URL": better_auth_server.url,
        "BOT_EMAIL": bot_email,
        "BOT_PASSWORD": PASSWORD,
        "BOT_SESSION_FILE": str(tmp_path / "bot-session.json"),
    }.items():
        monkeypatch.setenv(name, value)
    async with signed_up(better_auth_server, convex_server) as user:
        with anyio.fail_after(WAIT):
            async with anyio.create_task_group() as tg:
                tg.start_soon(bot.main)
                await user.mutation("chat:send", {"body": "ping"})
                await wait_for_value(user, "chat:list", lambda ms: len(pongs(ms)) == 1)
                tg.cancel_scope.cancel()  # Ctrl-C, in effect
    assert (tmp_path / "bot-session.json").is_file()


# -- the FastAPI example under uvicorn ----------------------------------------------------


def uvicorn_command() -> tuple[dict[str, str], list[str]]:
    """The command of docs/snippets/run_fastapi_example.sh: its environment assignments,
    and the arguments it gives uvicorn."""
    text = (ROOT / "docs" / "snippets" / "run_fastapi_example.sh").read_text()
    words = shlex.split(text.replace("\\\n", " "), comments=True)
    env = {}
    while "=" in words[0]:
        name, _, value = words.pop(0).partition("=")
        env[name] = value
    assert words[0] == "uvicorn", words
    return env, words[1:]


def test_the_uvicorn_command_is_the_examples_own() -> None:
    # The example's docstring shows the same command, line for line.
    text = (ROOT / "docs" / "snippets" / "run_fastapi_example.sh").read_text()
    for line in text.splitlines():
        if not line.startswith("#"):
            assert line.strip() in (fastapi_app.__doc__ or ""), line


async def test_the_uvicorn_command_serves_the_example(
    better_auth_server: LocalBetterAuth,
    convex_server: LocalConvex,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """What uvicorn does with the command, step by step: ``--app-dir`` goes first on
    sys.path, ``MODULE:NAME`` is imported, and ``--factory`` calls it with no arguments
    to get the app, which reads the command's environment. The app is then served
    through the ASGI lifespan protocol, as uvicorn would. (uvicorn itself is not among
    the test dependencies.)"""
    env, argv = uvicorn_command()
    parser = argparse.ArgumentParser(prog="uvicorn", exit_on_error=False)
    parser.add_argument("--factory", action="store_true")
    parser.add_argument("--app-dir", default=".")
    parser.add_argument("app")
    options = parser.parse_args(argv)  # an option not handled here fails the test
    assert options.factory

    # The command's variables, with the local stack's values; and BETTER_AUTH_URL, the
    # example's variable for a Better Auth that is not on the deployment's .convex.site.
    assert set(env) == {"CONVEX_URL", "SERVICE_EMAIL", "SERVICE_PASSWORD"}
    service_email = new_email("service")
    async with BetterAuthClient(convex_server.url, site_url=better_auth_server.url) as auth:
        await auth.sign_up("Service", service_email, PASSWORD)
    local = {
        "CONVEX_URL": convex_server.url,
        "SERVICE_EMAIL": service_email,
        "SERVICE_PASSWORD": PASSWORD,
        "BETTER_AUTH_URL": better_auth_server.url,
    }
    for name, value in local.items():
        monkeypatch.setenv(name, value)
    for name in ("SERVICE_SESSION_FILE", "CALL_TIMEOUT"):
        monkeypatch.delenv(name, raising=False)

    module_name, _, factory_name = options.app.partition(":")
    monkeypatch.syspath_prepend(str(ROOT / options.app_dir))
    assert module_name not in sys.modules
    try:
        factory = getattr(importlib.import_module(module_name), factory_name)
        assert callable(factory)
        app = factory()
    finally:
        sys.modules.pop(module_name, None)

    with anyio.fail_after(WAIT):
        async with serve(app) as (http, _):
            assert (await http.get("/healthz")).json() == {"ok": True}
            whoami = await http.get("/service/whoami")
            assert whoami.status_code == 200 and whoami.json()["email"] == service_email
