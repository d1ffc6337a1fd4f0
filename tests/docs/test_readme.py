"""The README's example, run against the local stack.

Three changes make it run here: its deployment URL is the LocalConvex's, its
``BetterAuthClient`` gets the ``site_url`` the README describes for local setups, and
it signs in as a fresh account instead of ada@example.com. Its endless ``async for`` is
ended by cancelling it once it has printed what it should. Then the restart its comment
describes: the same program with ``login_from_cache()`` in place of ``login()``.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import anyio
import pytest

from dartvex_auth_better import BetterAuthClient, ConvexBetterAuthProvider, ConvexClient
from dartvex_auth_better.testing import LocalBetterAuth, LocalConvex

from ._helpers import PASSWORD, WAIT, new_email
from .test_pages import fences

pytestmark = [pytest.mark.anyio, pytest.mark.integration]

README = Path(__file__).resolve().parents[2] / "README.md"


def readme_example() -> str:
    [source] = [body for lang, body in fences(README) if lang == "python"]
    return source


def replace_once(source: str, old: str, new: str) -> str:
    assert source.count(old) == 1, (old, source)
    return source.replace(old, new)


def test_the_readme_shows_one_example_and_the_two_commands() -> None:
    assert [lang for lang, _ in fences(README)] == ["sh", "python"]
    # What the test below adds is what the README tells local setups to write.
    assert 'pass it explicitly: `BetterAuthClient(URL, site_url="http' in README.read_text()


async def test_the_readme_example(
    better_auth_server: LocalBetterAuth,
    convex_server: LocalConvex,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    email = new_email("ada")
    source = readme_example()
    source = replace_once(source, '"https://happy-otter-123.convex.cloud"', repr(convex_server.url))
    source = replace_once(
        source,
        "BetterAuthClient(URL)",
        f"BetterAuthClient(URL, site_url={better_auth_server.url!r})",
    )
    source = replace_once(source, '"ada@example.com"', repr(email))
    assert f'"{PASSWORD}"' in source  # the password the account is created with
    source = replace_once(source, "\nanyio.run(main)\n", "\n")
    # The comment's restart: the same program with login_from_cache() for login().
    login = re.search(r"^ *await authed\.login\(.*\)\n", source, re.M)
    restart_call = re.search(r"# \(after a restart: (.*)\)$", source, re.M)
    assert login and restart_call
    restarted = source.replace(
        login[0], login[0][: len(login[0]) - len(login[0].lstrip())] + restart_call[1] + "\n"
    )

    async with BetterAuthClient(convex_server.url, site_url=better_auth_server.url) as auth:
        await auth.sign_up("Ada", email, PASSWORD)
    monkeypatch.chdir(tmp_path)  # FileSessionStore("session.json")
    printed, lines = anyio.create_memory_object_stream[str](16)

    def run(program: str, name: str) -> Any:
        """The program's main(), with its print() captured into ``lines``."""
        namespace: dict[str, Any] = {
            "__name__": name,
            "print": lambda *args: printed.send_nowait(" ".join(map(str, args))),
        }
        exec(compile(program, f"<{name}>", "exec"), namespace)
        return namespace["main"]

    async def another_session_sends(body: str) -> None:
        async with (
            BetterAuthClient(convex_server.url, site_url=better_auth_server.url) as auth,
            ConvexClient(convex_server.url, expect_auth=True) as client,
        ):
            other = client.with_auth(ConvexBetterAuthProvider(auth))
            await other.login(email, PASSWORD)
            await other.mutation("messages:send", {"body": body})

    with printed, lines, anyio.fail_after(WAIT):
        async with anyio.create_task_group() as tg:
            tg.start_soon(run(source, "readme_example"))
            assert await lines.receive() == "['hello']"  # the current value
            await another_session_sends("from elsewhere")
            assert await lines.receive() == "['hello', 'from elsewhere']"  # a change
            tg.cancel_scope.cancel()
        assert (tmp_path / "session.json").is_file()

        # Restarted: the saved session signs it in, no password needed.
        async with anyio.create_task_group() as tg:
            tg.start_soon(run(restarted, "readme_example_restarted"))
            assert await lines.receive() == "['hello', 'from elsewhere', 'hello']"
            tg.cancel_scope.cancel()
