"""LocalBetterAuth against the real Better Auth server under Node.js.

Every test starts its own server (about a second each) so that no state leaks between
tests. The Node dependencies come from the per-user cache; the first test run on a
machine installs them once (npm registry needed).
"""

from __future__ import annotations

import base64
import json
import os
import signal
import socket
import stat
import subprocess
import sys
import time
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any, TypeVar

import aiohttp
import anyio
import pytest

from dartvex_auth_better._errors import DartvexError
from dartvex_auth_better.testing._better_auth import (
    LocalBetterAuth,
    LocalStackError,
    ensure_better_auth_server,
)

pytestmark = pytest.mark.integration

T = TypeVar("T")
PASSWORD = "correct horse battery"


def run(fn: Callable[[], Awaitable[T]]) -> T:
    return anyio.run(fn)


def node_children() -> set[int]:
    """Pids of `node` processes whose parent is this test process (Linux /proc)."""
    me = os.getpid()
    found: set[int] = set()
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            stat_line = (entry / "stat").read_text()
        except OSError:
            continue
        # "<pid> (<comm>) <state> <ppid> ..."; comm may contain spaces, so split at ")".
        comm = stat_line[stat_line.index("(") + 1 : stat_line.rindex(")")]
        ppid = int(stat_line[stat_line.rindex(")") + 2 :].split()[1])
        if ppid == me and comm == "node":
            found.add(int(entry.name))
    return found


@pytest.fixture(autouse=True)
def no_leftover_node() -> Any:
    before = node_children()
    yield
    leftover = node_children() - before
    assert not leftover, f"node processes left running: {sorted(leftover)}"


def write_script(path: Path, body: str) -> Path:
    path.write_text("#!/bin/sh\n" + body)
    path.chmod(path.stat().st_mode | stat.S_IXUSR | stat.S_IXGRP | stat.S_IXOTH)
    return path


async def sign_up(http: aiohttp.ClientSession, ba: LocalBetterAuth, email: str) -> Any:
    async with http.post(
        f"{ba.url}/api/auth/sign-up/email",
        json={"name": "Test User", "email": email, "password": PASSWORD},
    ) as response:
        assert response.status == 200, await response.text()
        return response.headers.get("set-auth-token"), await response.json()


async def sign_in_status(http: aiohttp.ClientSession, ba: LocalBetterAuth, email: str) -> int:
    async with http.post(
        f"{ba.url}/api/auth/sign-in/email", json={"email": email, "password": PASSWORD}
    ) as response:
        await response.read()
        return response.status


def jwt_part(token: str, index: int) -> dict[str, Any]:
    segment = token.split(".")[index]
    decoded: dict[str, Any] = json.loads(
        base64.urlsafe_b64decode(segment + "=" * (-len(segment) % 4))
    )
    return decoded


# --------------------------------------------------------------------------- lifecycle


def test_constructor_does_no_io_and_properties_need_a_running_server() -> None:
    ba = LocalBetterAuth(jwt_ttl_seconds=42)  # no event loop here: must not need one
    assert ba.jwt_ttl_seconds == 42
    assert ba.pid is None
    with pytest.raises(LocalStackError, match="not running"):
        _ = ba.url
    with pytest.raises(LocalStackError):
        _ = ba.port
    assert issubclass(LocalStackError, DartvexError)


def test_starts_answers_health_and_exposes_urls() -> None:
    async def main() -> None:
        async with LocalBetterAuth() as ba:
            assert ba.url == f"http://127.0.0.1:{ba.port}"
            assert ba.issuer == ba.url
            assert ba.jwks_url == f"{ba.url}/api/auth/convex/jwks"
            assert await ba.health() is True
            await ba.start()  # idempotent: same server
            assert ba.url == f"http://127.0.0.1:{ba.port}"
            async with (
                aiohttp.ClientSession() as http,
                http.get(
                    f"{ba.url}/.well-known/openid-configuration", allow_redirects=False
                ) as response,
            ):
                assert response.status == 302
                assert response.headers["location"] == (
                    f"{ba.url}/api/auth/convex/.well-known/openid-configuration"
                )
            assert any("ready" in line for line in ba.recent_output)

    run(main)


def test_aclose_stops_node_and_frees_the_port() -> None:
    async def main() -> None:
        ba = LocalBetterAuth()
        await ba.start()
        pid, port = ba.pid, ba.port
        assert pid is not None and pid in node_children()
        os.kill(pid, 0)  # alive
        await ba.aclose()
        await ba.aclose()  # idempotent
        with pytest.raises(ProcessLookupError):
            os.kill(pid, 0)
        with pytest.raises(ConnectionRefusedError):
            socket.create_connection(("127.0.0.1", port), timeout=5).close()
        assert await ba.health() is False
        with pytest.raises(LocalStackError):
            await ba.start()  # a closed instance stays closed

    run(main)


def test_failing_or_cancelled_body_leaves_no_node_process() -> None:
    pids: list[int] = []

    async def failing() -> None:
        async with LocalBetterAuth() as ba:
            assert ba.pid is not None
            pids.append(ba.pid)
            raise RuntimeError("test body failed")

    async def cancelled() -> None:
        with anyio.CancelScope() as scope:
            async with LocalBetterAuth() as ba:
                assert ba.pid is not None
                pids.append(ba.pid)
                scope.cancel()
                await anyio.sleep_forever()
        assert scope.cancelled_caught

    with pytest.raises(RuntimeError, match="test body failed"):
        run(failing)
    run(cancelled)
    assert len(pids) == 2
    for pid in pids:
        with pytest.raises(ProcessLookupError):
            os.kill(pid, 0)


def process_gone(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except (FileNotFoundError, ProcessLookupError):
        return True
    return state in ("Z", "X")  # a zombie has exited; only its parent has not reaped it


CHILD_SCRIPT = """
import anyio, sys
from dartvex_auth_better.testing._better_auth import LocalBetterAuth

async def main():
    async with LocalBetterAuth() as ba:
        print(ba.pid, flush=True)
        await anyio.sleep_forever()

anyio.run(main)
"""


def test_node_exits_when_the_python_parent_is_killed() -> None:
    import dartvex_auth_better

    package_root = Path(dartvex_auth_better.__file__).resolve().parent.parent

    async def main() -> None:
        env = {**os.environ, "PYTHONPATH": str(package_root)}
        async with await anyio.open_process(
            [sys.executable, "-c", CHILD_SCRIPT], env=env, stdin=subprocess.DEVNULL
        ) as parent:
            assert parent.stdout is not None
            with anyio.fail_after(60):
                line = b""
                while not line.endswith(b"\n"):
                    line += await parent.stdout.receive()
            node_pid = int(line)
            try:
                assert not process_gone(node_pid)
                parent.kill()  # SIGKILL: no finally, no atexit, nothing runs in the parent
                await parent.wait()
                # The server sees EOF on the stdin pipe the dead parent held, and exits.
                with anyio.fail_after(10):
                    while not process_gone(node_pid):  # noqa: ASYNC110  (polling /proc)
                        await anyio.sleep(0.05)
            finally:
                if not process_gone(node_pid):  # the test failed: do not leave it behind
                    os.kill(node_pid, signal.SIGKILL)

    run(main)


def test_options_reach_the_server() -> None:
    origin = "http://app.example.test:5173"

    async def main() -> None:
        async with (
            LocalBetterAuth(jwt_ttl_seconds=7, trusted_origins=[origin]) as ba,
            aiohttp.ClientSession() as http,
        ):
            bearer, _ = await sign_up(http, ba, "ttl@example.com")
            async with http.get(
                f"{ba.url}/api/auth/convex/token", headers={"Authorization": f"Bearer {bearer}"}
            ) as response:
                assert response.status == 200
                token = (await response.json())["token"]
            claims = jwt_part(token, 1)
            assert claims["exp"] - claims["iat"] == 7
            assert claims["iss"] == ba.issuer
            assert claims["aud"] == "convex"
            async with http.options(
                f"{ba.url}/api/auth/sign-in/email", headers={"Origin": origin}
            ) as response:
                assert response.status == 204
                assert response.headers["access-control-allow-origin"] == origin

    run(main)


# --------------------------------------------------------------------------- endpoints


def test_sign_up_returns_200_with_set_auth_token() -> None:
    async def main() -> None:
        async with LocalBetterAuth() as ba, aiohttp.ClientSession() as http:
            bearer, body = await sign_up(http, ba, "alice@example.com")
            assert bearer is not None
            assert bearer.startswith(body["token"] + ".")
            assert body["user"]["email"] == "alice@example.com"

    run(main)


def test_outbox_captures_password_reset() -> None:
    async def main() -> None:
        async with LocalBetterAuth() as ba, aiohttp.ClientSession() as http:
            await sign_up(http, ba, "reset@example.com")
            assert await ba.outbox() == []
            async with http.post(
                f"{ba.url}/api/auth/request-password-reset", json={"email": "reset@example.com"}
            ) as response:
                assert response.status == 200
                assert (await response.json())["status"] is True
            message = await ba.wait_for_message("reset@example.com", "reset-password")
            assert message["type"] == "reset-password"
            assert message["email"] == "reset@example.com"
            assert len(message["token"]) == 24
            assert message["url"].startswith(f"{ba.url}/api/auth/reset-password/{message['token']}")
            # filters: email ignores case, type must match
            assert await ba.outbox(email="RESET@example.com") == [message]
            assert await ba.outbox(type="magic-link") == []
            await ba.clear_outbox()
            assert await ba.outbox() == []

    run(main)


def test_wait_for_message_times_out_clearly() -> None:
    async def main() -> None:
        async with LocalBetterAuth() as ba:
            started = time.monotonic()
            with pytest.raises(TimeoutError, match=r"nobody@example\.com.*0\.3 s"):
                await ba.wait_for_message("nobody@example.com", "magic-link", timeout=0.3)
            assert time.monotonic() - started < 5

    run(main)


def test_reset_wipes_users_and_optionally_keys() -> None:
    async def current_kid(http: aiohttp.ClientSession, ba: LocalBetterAuth) -> str:
        async with http.get(ba.jwks_url) as response:
            keys = (await response.json())["keys"]
        assert len(keys) == 1
        kid: str = keys[0]["kid"]
        return kid

    async def main() -> None:
        async with LocalBetterAuth() as ba, aiohttp.ClientSession() as http:
            await sign_up(http, ba, "wipe@example.com")
            assert await sign_in_status(http, ba, "wipe@example.com") == 200
            kid = await current_kid(http, ba)

            await ba.reset()
            assert await sign_in_status(http, ba, "wipe@example.com") == 401
            assert await current_kid(http, ba) == kid  # keys survive a plain reset

            await sign_up(http, ba, "wipe@example.com")  # the email is free again
            await ba.reset(jwks=True)
            await sign_up(http, ba, "wipe@example.com")  # makes a new key
            assert await current_kid(http, ba) != kid

    run(main)


# --------------------------------------------------------------------------- errors


def test_missing_node_raises_local_stack_error(tmp_path: Path) -> None:
    empty = tmp_path / "empty-bin"
    empty.mkdir()

    async def main() -> None:
        with pytest.raises(LocalStackError, match=r"Node\.js 20 or newer with npm is required"):
            await LocalBetterAuth(extra_env={"PATH": str(empty)}).start()
        with pytest.raises(LocalStackError, match=r"Node\.js 20") as info:
            await LocalBetterAuth(node_executable=str(empty / "node")).start()
        assert "nodejs.org" in str(info.value)

    run(main)


def test_old_node_raises_local_stack_error(tmp_path: Path) -> None:
    old_node = write_script(tmp_path / "node", 'echo "v18.19.0"\n')

    async def main() -> None:
        with pytest.raises(LocalStackError, match=r"Node\.js 20.*v18\.19\.0"):
            await LocalBetterAuth(node_executable=str(old_node)).start()

    run(main)


def test_server_that_dies_at_startup_reports_its_output() -> None:
    async def main() -> None:
        ba = LocalBetterAuth(extra_env={"JWT_TTL_SECONDS": "soon"})
        with pytest.raises(LocalStackError, match=r"exited with status 2") as info:
            await ba.start()
        assert "JWT_TTL_SECONDS must be a non-negative integer" in str(info.value)
        assert ba.pid is None

    run(main)


def test_startup_timeout_kills_the_server() -> None:
    async def main() -> None:
        with pytest.raises(LocalStackError, match=r"not ready within 0\.01 s"):
            await LocalBetterAuth(startup_timeout=0.01).start()

    run(main)  # the autouse fixture checks that no node process is left


# --------------------------------------------------------------------------- install cache


def test_second_start_reuses_the_installed_cache(tmp_path: Path) -> None:
    log = tmp_path / "npm-calls.log"
    fake_npm = write_script(tmp_path / "npm", f'echo "$@" >> "{log}"\nexit 1\n')

    async def main() -> None:
        first = await ensure_better_auth_server()  # installs now if this machine is new
        started = time.monotonic()
        again = await ensure_better_auth_server(npm_executable=str(fake_npm))
        assert again == first
        assert time.monotonic() - started < 2.0
        # And a full start with an npm that would fail if it ran at all:
        async with LocalBetterAuth(npm_executable=str(fake_npm)) as ba:
            assert await ba.health()
        assert not log.exists(), "npm ran although the cache was complete"

    run(main)


def test_concurrent_installs_run_npm_once(tmp_path: Path) -> None:
    log = tmp_path / "npm-calls.log"
    # A stand-in for `npm ci` that takes a moment, so the second installer must wait.
    fake_npm = write_script(
        tmp_path / "npm",
        f'echo "$PWD $@" >> "{log}"\nmkdir node_modules\nsleep 0.5\n',
    )
    cache = tmp_path / "cache"

    async def main() -> list[Path]:
        results: list[Path] = []

        async def install() -> None:
            results.append(await ensure_better_auth_server(cache, npm_executable=str(fake_npm)))

        async with anyio.create_task_group() as tg:
            tg.start_soon(install)
            tg.start_soon(install)
        return results

    results = run(main)
    assert len(results) == 2 and results[0] == results[1]
    target = results[0]
    assert target.parent == cache and target.name.startswith("server-")
    assert sorted(p.name for p in target.iterdir()) == [
        ".installed",
        "node_modules",
        "package-lock.json",
        "package.json",
        "server.mjs",
    ]
    calls = log.read_text().splitlines()
    assert len(calls) == 1, calls
    assert "ci --no-audit --no-fund --loglevel=error" in calls[0]
    assert str(target) not in calls[0]  # npm ran in a staging dir, then it was renamed
    assert [p.name for p in cache.iterdir() if p.name.startswith(".")] == []


def test_npm_failure_is_reported_and_leaves_nothing_behind(tmp_path: Path) -> None:
    fake_npm = write_script(
        tmp_path / "npm", 'echo "npm error code E404 registry says no" >&2\nexit 7\n'
    )
    cache = tmp_path / "cache"

    async def main() -> None:
        with pytest.raises(LocalStackError, match=r"exit status 7") as info:
            await ensure_better_auth_server(cache, npm_executable=str(fake_npm))
        assert "registry says no" in str(info.value)
        with pytest.raises(LocalStackError, match=r"Node\.js 20.*no-npm` was not found\)"):
            await ensure_better_auth_server(cache, npm_executable=str(tmp_path / "no-npm"))

    run(main)
    assert [p.name for p in cache.iterdir() if not p.name.endswith(".lock")] == []
