"""The command line end to end: the real ``python -m dartvex_auth_better`` in a subprocess,
against the local stack (Better Auth under Node, a LocalConvex served by the test's loop).

Every run goes through :class:`Cli`, which checks what each run printed: no traceback, no
password, no session token, and no JWT except on ``token``'s stdout. Subprocess output is
read with a timeout; nothing waits by sleeping.

Each run costs an interpreter start and the package import (about half a second), so
tests that only need to be signed in get their session from the command line's own store
code in-process (:meth:`Cli.seed`), and independent runs go concurrently.
"""

from __future__ import annotations

import json
import os
import re
import secrets
import signal
import socket
import subprocess
import sys
import time
from collections.abc import AsyncIterator, Awaitable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import anyio
import anyio.abc
import pytest
from anyio.streams.buffered import BufferedByteReceiveStream

from dartvex_auth_better import (
    BetterAuthClient,
    BetterAuthSession,
    ConvexBetterAuthProvider,
    FileSessionStore,
    InvalidCredentialsError,
    KeyringSessionStore,
    SessionStore,
)
from dartvex_auth_better import cli as cli_module
from dartvex_auth_better._jwt import token_claims
from dartvex_auth_better.better_auth._storage import DEFAULT_KEYRING_SERVICE
from tests.integration.test_provider import FaultyProxy

pytestmark = [pytest.mark.anyio, pytest.mark.integration]

COMMAND = (sys.executable, "-m", "dartvex_auth_better")
PASSWORD = "correct horse battery staple"
JWT = re.compile(r"eyJ[\w-]+\.eyJ[\w-]+\.[\w-]+")
INT64_ONE = {"$integer": "AQAAAAAAAAA="}  # Int64(1): 8 bytes, little-endian, base64


def new_email() -> str:
    return f"cli-{secrets.token_hex(5)}@example.com"


def dead_url() -> str:
    """A loopback URL nothing listens on (its port was bound once, then released)."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return f"http://127.0.0.1:{sock.getsockname()[1]}"


async def gather(*runs: Awaitable[Result]) -> list[Result]:
    """Await independent runs concurrently; results in the order given."""
    results: list[Result] = []
    slots: dict[int, Result] = {}

    async def one(index: int, run: Awaitable[Result]) -> None:
        slots[index] = await run

    async with anyio.create_task_group() as tg:
        for index, run in enumerate(runs):
            tg.start_soon(one, index, run)
    results.extend(slots[index] for index in range(len(runs)))
    return results


@dataclass
class Result:
    """What one run of the command line did."""

    args: tuple[str, ...]
    code: int
    out: str
    err: str

    def json(self) -> Any:
        return json.loads(self.out)

    def error_line(self) -> str:
        """The one ``error:`` line on stderr (asserting that it is the only line)."""
        lines = self.err.splitlines()
        assert len(lines) == 1 and lines[0].startswith("error: "), self
        return lines[0]


@dataclass
class Cli:
    """Runs the command line with a private session file and config dir, and checks every
    output for leaks."""

    env: dict[str, str]
    session_file: Path
    secrets: set[str] = field(default_factory=lambda: {PASSWORD})

    async def __call__(
        self,
        *args: str,
        input: str | None = None,
        env: dict[str, str | None] | None = None,
        jwt_on_stdout: bool = False,
    ) -> Result:
        environment = dict(self.env)
        for key, value in (env or {}).items():
            if value is None:
                environment.pop(key, None)
            else:
                environment[key] = value
        with anyio.fail_after(30):
            done = await anyio.run_process(
                [*COMMAND, *args],
                input=input.encode() if input is not None else None,
                stdin=subprocess.DEVNULL if input is None else None,
                env=environment,
                check=False,
                # No controlling terminal: a prompt nobody expected reads stdin (and
                # fails) instead of waiting on the terminal of whoever runs the tests.
                start_new_session=True,
            )
        result = Result(args, done.returncode, done.stdout.decode(), done.stderr.decode())
        self.check(result.out, result.err, jwt_on_stdout=jwt_on_stdout)
        return result

    async def start(self, *args: str, stdin: Any = subprocess.DEVNULL, stdout: Any = None):
        return await anyio.open_process(
            [*COMMAND, *args],
            stdin=stdin,
            stdout=subprocess.PIPE if stdout is None else stdout,
            env=self.env,
            start_new_session=True,
        )

    def check(self, out: str, err: str, *, jwt_on_stdout: bool = False) -> None:
        """Assert that the output holds no traceback and no secret."""
        record = self.session_record()
        if record is not None:
            self.secrets.add(record["session_token"])
        assert "Traceback" not in err, err
        assert not JWT.search(err), err
        if not jwt_on_stdout:
            assert not JWT.search(out), out
        for secret in self.secrets:
            assert secret not in out and secret not in err, f"a secret leaked: {out!r} {err!r}"

    def session_record(self) -> dict[str, Any] | None:
        """The provider's record inside the command line's session file, if there is one."""
        try:
            envelope = json.loads(self.session_file.read_text())
        except FileNotFoundError:
            return None
        record: dict[str, Any] = json.loads(envelope["session"])
        return record

    async def seed(self, email: str | None = None, *, backend: Any = None) -> BetterAuthSession:
        """Sign a new user up in-process and save the session where the command line
        looks for it, through the command line's own store code: the session file, or
        with ``backend`` the keyring entry ``--keyring`` reads from that backend."""
        async with BetterAuthClient(self.env["DARTVEX_SITE_URL"]) as auth:
            inner: SessionStore = (
                FileSessionStore(self.session_file)
                if backend is None
                else KeyringSessionStore(username=auth.site_url, backend=backend)
            )
            store = cli_module._HostBoundStore(inner, auth.site_url, str(self.session_file))
            provider = ConvexBetterAuthProvider(auth, store=store)
            session = await provider.sign_up("Cli User", email or new_email(), PASSWORD)
        assert store.save_error is None
        self.secrets.add(session.session_token)
        return session


class Lines:
    """Reads a subprocess's output stream line by line, each read bounded by a timeout."""

    def __init__(self, stream: anyio.abc.ByteReceiveStream) -> None:
        self._stream = BufferedByteReceiveStream(stream)

    async def next(self, seconds: float = 10.0) -> str:
        with anyio.fail_after(seconds):
            return (await self._stream.receive_until(b"\n", 1 << 20)).decode()

    async def until(self, text: str, seconds: float = 10.0) -> str:
        """Everything up to and including ``text``: for a prompt, which ends no line."""
        with anyio.fail_after(seconds):
            before = await self._stream.receive_until(text.encode(), 1 << 20)
        return before.decode() + text

    async def rest(self, seconds: float = 10.0) -> str:
        """Everything up to the end of the stream."""
        chunks = [bytes(self._stream.buffer)]
        with anyio.fail_after(seconds):
            try:
                while True:
                    chunks.append(await self._stream.receive())
            except (anyio.EndOfStream, anyio.ClosedResourceError):
                pass
        return b"".join(chunks).decode()


class PipeLines:
    """The read end of an ``os.pipe()``: lines with a timeout, and a close that really
    closes it (an anyio process stream only stops reading), as ``head`` does."""

    def __init__(self, fd: int) -> None:
        os.set_blocking(fd, False)
        self._fd = fd
        self._buffer = b""

    async def next(self, seconds: float = 10.0) -> str:
        with anyio.fail_after(seconds):
            while b"\n" not in self._buffer:
                await anyio.wait_readable(self._fd)
                chunk = os.read(self._fd, 65536)
                assert chunk, f"the pipe ended after {self._buffer!r}"
                self._buffer += chunk
        line, _, self._buffer = self._buffer.partition(b"\n")
        return line.decode()

    def close(self) -> None:
        os.close(self._fd)


@pytest.fixture
def cli(better_auth_server, convex_server, tmp_path) -> Cli:
    def echo(ctx: Any, args: dict[str, Any]) -> dict[str, Any]:
        return args

    convex_server.register("action", "tools:echo", echo)
    env = {k: v for k, v in os.environ.items() if not k.startswith("DARTVEX_")}
    env.pop("PYTHON_KEYRING_BACKEND", None)
    session_file = tmp_path / "session.json"
    env.update(
        DARTVEX_URL=convex_server.url,
        DARTVEX_SITE_URL=better_auth_server.url,
        DARTVEX_SESSION_FILE=str(session_file),
        # Never the real ~/.config or keyring, whatever a test forgets to set.
        XDG_CONFIG_HOME=str(tmp_path / "config"),
        XDG_DATA_HOME=str(tmp_path / "data"),
    )
    return Cli(env, session_file)


# -- signing in -------------------------------------------------------------------------------


async def test_signup_then_whoami_and_token_need_no_password(cli, better_auth_server, tmp_path):
    # Without DARTVEX_SESSION_FILE the session goes to $XDG_CONFIG_HOME/dartvex_auth_better/.
    del cli.env["DARTVEX_SESSION_FILE"]
    cli.session_file = tmp_path / "config" / "dartvex_auth_better" / "session.json"
    email = new_email()
    signup = await cli("signup", email, "--name", "Ada", "--password-stdin", input=PASSWORD)
    assert signup.code == 0 and signup.out == "", signup
    assert f"signed up and signed in as {email}" in signup.err
    assert str(cli.session_file) in signup.err
    assert cli.session_file.stat().st_mode & 0o777 == 0o600
    assert cli.session_file.parent.stat().st_mode & 0o077 == 0

    # stdin is /dev/null from here on: there is no password to give.
    whoami, token = await gather(cli("whoami"), cli("token", jwt_on_stdout=True))
    assert whoami.code == 0 and whoami.err == "", whoami
    assert whoami.out.count("\n") == 1
    user = whoami.json()
    assert user["email"] == email and user["name"] == "Ada" and user["user_id"]

    assert token.code == 0 and token.err == "", token
    jwt = token.out.removesuffix("\n")
    assert JWT.fullmatch(jwt), "token prints the JWT and nothing else"
    claims = token_claims(jwt)
    assert claims is not None
    assert claims["sub"] == user["user_id"] and claims["iss"] == better_auth_server.issuer


async def test_login_with_password_stdin_and_a_wrong_password(cli):
    seeded = await cli.seed()
    login = await cli("login", seeded.email, "--password-stdin", input=PASSWORD + "\n")
    assert login.code == 0 and login.out == "", login
    assert f"signed in as {seeded.email}" in login.err
    record = cli.session_record()
    assert record is not None and record["session_token"] != seeded.session_token

    wrong = "not the password 42"
    cli.secrets.add(wrong)
    refused = await cli("login", seeded.email, "--password-stdin", input=wrong)
    assert refused.code == cli_module.EXIT_NOT_SIGNED_IN, refused
    assert "Invalid email or password" in refused.error_line()
    assert refused.out == ""
    assert cli.session_record() == record  # a refused login keeps the session there was


async def test_the_password_prompt(cli):
    # The runs have no terminal, so getpass prompts on stderr and reads stdin.
    seeded = await cli.seed()
    login, mismatch = await gather(
        cli("login", seeded.email, input=PASSWORD + "\n"),
        cli("signup", new_email(), input=PASSWORD + "\nsomething else\n"),
    )
    assert login.code == 0 and "Password: " in login.err, login
    assert f"signed in as {seeded.email}" in login.err
    assert mismatch.code == cli_module.EXIT_USAGE, mismatch
    assert "Repeat the password: " in mismatch.err
    assert mismatch.err.splitlines()[-1] == "error: the passwords do not match"


async def test_signup_with_a_taken_email_exits_1(cli):
    seeded = await cli.seed()
    before = cli.session_file.read_bytes()
    taken = await cli("signup", seeded.email, "--password-stdin", input=PASSWORD)
    assert taken.code == cli_module.EXIT_ERROR, taken
    assert "already exists" in taken.error_line()
    assert taken.out == ""
    assert cli.session_file.read_bytes() == before  # the session there was is kept


async def interrupted_at(cli: Cli, prompt: str, *args: str) -> tuple[int, str, str]:
    """Run the command with stdin a pipe that stays open, wait for ``prompt`` on stderr,
    press Ctrl-C (SIGINT), and return the exit status, stdout and stderr."""
    process = await cli.start(*args, stdin=subprocess.PIPE)
    async with process:
        assert process.stdin is not None and process.stdout and process.stderr
        stderr = Lines(process.stderr)
        shown = await stderr.until(prompt)
        process.send_signal(signal.SIGINT)
        with anyio.fail_after(10):
            code = await process.wait()
        out, err = await Lines(process.stdout).rest(), shown + await stderr.rest()
    cli.check(out, err)
    return code, out, err


async def test_ctrl_c_at_the_password_prompt(cli):
    seeded = await cli.seed()
    before = cli.session_file.read_bytes()
    code, out, err = await interrupted_at(cli, "Password: ", "login", seeded.email)
    assert code == cli_module.EXIT_INTERRUPTED, err
    # (getpass says first that the input may be echoed: stdin is not a terminal.)
    assert out == "" and err.endswith("Password: \ninterrupted\n"), err
    assert cli.session_file.read_bytes() == before


async def test_ctrl_c_at_the_magic_link_prompt(cli, better_auth_server):
    await cli.seed()
    before = cli.session_file.read_bytes()
    email = new_email()
    prompt = "paste the link (or its token) from the email: "
    code, out, err = await interrupted_at(cli, prompt, "login", email, "--magic-link")
    assert code == cli_module.EXIT_INTERRUPTED, err
    assert out == "" and err == f"sent a sign-in link to {email}\n{prompt}\ninterrupted\n"
    assert cli.session_file.read_bytes() == before
    # The link was sent, and is still unused: nothing signed in with it.
    message = await better_auth_server.wait_for_message(email, "magic-link")
    assert message["token"] not in err


async def test_magic_link_login_reads_the_link_from_stdin(cli, better_auth_server):
    email = new_email()
    process = await cli.start("login", email, "--magic-link", stdin=subprocess.PIPE)
    async with process:
        assert process.stdin is not None and process.stdout and process.stderr
        message = await better_auth_server.wait_for_message(email, "magic-link")
        cli.secrets.add(message["token"])
        await process.stdin.send(message["url"].encode() + b"\n")  # the whole link, pasted
        with anyio.fail_after(20):
            code = await process.wait()
        out, err = await Lines(process.stdout).rest(), await Lines(process.stderr).rest()
    cli.check(out, err)
    assert code == 0 and out == "", err
    assert f"sent a sign-in link to {email}" in err and f"signed in as {email}" in err
    record = cli.session_record()
    assert record is not None and record["email"] == email


async def test_magic_link_in_two_steps_with_a_token(cli, better_auth_server):
    email = new_email()
    sent = await cli("login", email, "--magic-link", "--send-only")
    assert sent.code == 0 and "--token" in sent.err, sent
    message = await better_auth_server.wait_for_message(email, "magic-link")
    cli.secrets.add(message["token"])

    verified = await cli("login", "--magic-link", "--token", message["token"])
    assert verified.code == 0 and f"signed in as {email}" in verified.err, verified

    used_up = await cli("login", "--magic-link", "--token", message["token"])
    assert used_up.code == cli_module.EXIT_NOT_SIGNED_IN, used_up
    assert "INVALID_TOKEN" in used_up.error_line()


# -- Convex functions ------------------------------------------------------------------------


async def test_query_mutation_and_action_with_json_args(cli):
    await cli.seed()
    sent = await cli("mutation", "messages:send", '{"body": "hello from the shell"}')
    assert sent.code == 0 and sent.err == "", sent
    assert isinstance(sent.json(), str)  # the new message's id

    # Convex JSON both ways: int64 and bytes keep their tags, so output feeds back as input.
    args = {"n": INT64_ONE, "b": {"$bytes": "AAE="}, "x": [1.5, None, True], "s": "é"}
    listed, pretty, echoed = await gather(
        cli("query", "messages:list"),
        cli("query", "messages:list", "{}", "--pretty"),
        cli("action", "tools:echo", json.dumps(args)),
    )
    assert listed.code == 0 and listed.out.count("\n") == 1, listed
    assert [m["body"] for m in listed.json()] == ["hello from the shell"]
    assert pretty.out.count("\n") > 1 and pretty.json() == listed.json()
    assert echoed.code == 0, echoed
    assert echoed.json() == args


async def test_a_convex_error_exits_4_with_its_data(cli):
    await cli.seed()
    failed, anonymous, public = await gather(
        cli("mutation", "messages:send", '{"body": ""}'),
        cli("query", "messages:list", "--anonymous"),
        cli("query", "users:whoami", "--anonymous"),
    )
    assert failed.code == cli_module.EXIT_FUNCTION_ERROR, failed
    assert failed.error_line() == (
        "error: mutation messages:send failed: body must be a non-empty string"
    )
    assert failed.json() == {"code": "BAD_ARGS"}
    assert anonymous.code == cli_module.EXIT_FUNCTION_ERROR, anonymous
    assert anonymous.json() == {"code": "UNAUTHENTICATED"}
    assert public.code == 0 and public.json() is None


async def test_args_dash_are_read_from_stdin(cli):
    await cli.seed()
    sent = await cli("mutation", "messages:send", "-", input='{"body": "from stdin"}\n')
    assert sent.code == 0 and isinstance(sent.json(), str), sent
    listed, not_json = await gather(
        cli("query", "messages:list", "-", input="{}"),
        cli("query", "messages:list", "-", input='{"body": '),
    )
    assert listed.code == 0, listed
    assert [m["body"] for m in listed.json()] == ["from stdin"]
    assert not_json.code == cli_module.EXIT_USAGE, not_json
    assert "ARGS is not valid JSON" in not_json.error_line()


async def test_bad_args_and_options_are_usage_errors(cli):
    no_url: dict[str, str | None] = {"DARTVEX_URL": None}
    cases: list[tuple[tuple[str, ...], dict[str, str | None], str]] = [
        (("query", "messages:list", '{"body": '), {}, "ARGS is not valid JSON"),
        (("query", "messages:list", '["not", "an object"]'), {}, "ARGS must be a JSON object"),
        (("action", "x:y", '{"n": {"$integer": "AQ=="}}'), {}, "not a valid Convex value"),
        (("query",), {}, "the following arguments are required: NAME"),
        (("whoami", "--url", "https://x.convex.cloud/path"), {}, "--url must be a bare origin"),
        (("whoami",), no_url, "no deployment URL: pass --url"),
    ]
    results = await gather(*(cli(*args, env=env) for args, env, _ in cases))
    for result, (_, _, expected) in zip(results, cases, strict=True):
        assert result.code == cli_module.EXIT_USAGE, result
        assert expected in result.error_line()


async def test_the_shared_options_go_before_or_after_the_command(cli, tmp_path):
    seeded = await cli.seed()
    debug = "debug dartvex_auth_better.better_auth: GET /api/auth/get-session -> HTTP 200"
    moved = tmp_path / "moved.json"
    moved.write_bytes(cli.session_file.read_bytes())
    no_env: dict[str, str | None] = {
        "DARTVEX_URL": None,
        "DARTVEX_SITE_URL": None,
        "DARTVEX_SESSION_FILE": None,
    }
    first: tuple[str, ...] = ("--url", cli.env["DARTVEX_URL"], "--timeout", "20")
    first += ("--site-url", cli.env["DARTVEX_SITE_URL"], "--session-file", str(moved))
    # Given on both sides, the one after the command wins: the first file does not exist.
    twice: tuple[str, ...] = ("--session-file", str(tmp_path / "nothing.json"), "whoami")
    twice += ("--session-file", str(moved))
    before, after, both, once, options_first, options_both = await gather(
        cli("-vv", "whoami"),
        cli("whoami", "-vv"),
        cli("-v", "whoami", "-v"),  # counted together: -vv
        cli("-v", "whoami"),
        cli(*first, "whoami", "--pretty", env=no_env),
        cli(*twice),
    )
    for result in (before, after, both):
        assert result.code == 0 and result.json()["email"] == seeded.email, result
        assert debug in result.err, result
    assert once.code == 0 and once.json()["email"] == seeded.email, once
    assert "debug " not in once.err, once
    assert options_first.code == 0, options_first
    assert options_first.out.startswith("{\n") and options_first.json()["email"] == seeded.email
    assert options_both.code == 0 and options_both.json()["email"] == seeded.email, options_both

    bad_timeout, demo_url, unknown = await gather(
        cli("--timeout", "soon", "whoami"),
        cli("--url", "https://x.convex.cloud", "demo"),
        cli("--pretty", "whoami"),  # an option of some commands only: after the command
    )
    for result in (bad_timeout, demo_url, unknown):
        assert result.code == cli_module.EXIT_USAGE and result.out == "", result
    assert "not a number of seconds: 'soon'" in bad_timeout.error_line()
    assert "demo runs its own local servers and takes no --url" in demo_url.error_line()
    assert "unrecognized arguments: --pretty" in unknown.error_line()


async def test_version_prints_the_package_version(cli):
    from dartvex_auth_better import __version__

    version = await cli("--version")
    assert version.code == 0 and version.err == "", version
    assert version.out == f"dartvex-auth-better {__version__}\n"


async def test_watch_prints_one_line_per_update_until_ctrl_c(cli, convex_server):
    seeded = await cli.seed()
    process = await cli.start("watch", "messages:list")
    async with process:
        assert process.stdout is not None and process.stderr is not None
        lines = Lines(process.stdout)
        assert json.loads(await lines.next()) == []

        assert (await cli("mutation", "messages:send", '{"body": "one"}')).code == 0
        assert [m["body"] for m in json.loads(await lines.next())] == ["one"]

        # A write that is not a mutation of this user's reaches the watch as well.
        convex_server.db.insert("messages", {"author": seeded.user_id, "body": "two"})
        assert [m["body"] for m in json.loads(await lines.next())] == ["one", "two"]

        process.send_signal(signal.SIGINT)
        with anyio.fail_after(10):
            code = await process.wait()
        out, err = await lines.rest(), await Lines(process.stderr).rest()
    cli.check(out, err)
    assert code == cli_module.EXIT_INTERRUPTED
    assert out == "" and err == "interrupted\n"


async def test_watch_ends_when_the_session_ends(cli, convex_server, better_auth_server):
    seeded = await cli.seed()
    process = await cli.start("watch", "messages:list")
    async with process:
        assert process.stdout is not None and process.stderr is not None
        lines = Lines(process.stdout)
        assert json.loads(await lines.next()) == []
        # Signed out elsewhere; the watch learns of it at its next token fetch, which the
        # server's AuthError (as for an expired JWT) brings forward.
        async with BetterAuthClient(better_auth_server.url) as auth:
            await auth.sign_out(seeded.session_token)
        await convex_server.send_auth_error("token expired")
        with anyio.fail_after(10):
            code = await process.wait()
        out, err = await lines.rest(), await Lines(process.stderr).rest()
    cli.check(out, err)
    assert code == cli_module.EXIT_NOT_SIGNED_IN and out == "", (out, err)
    assert Result((), code, out, err).error_line().startswith("error: the session ended")


async def test_watch_ends_when_its_reader_goes(cli):
    # `watch ... | head -1`: the reader leaves while the query is quiet, and the watch
    # must notice without waiting for a change to write.
    await cli.seed()
    read_end, write_end = os.pipe()
    reader = PipeLines(read_end)
    try:
        process = await cli.start("watch", "messages:list", stdout=write_end)
    finally:
        os.close(write_end)
    async with process:
        assert process.stderr is not None
        assert json.loads(await reader.next()) == []
        reader.close()
        with anyio.fail_after(10):
            code = await process.wait()
        err = await Lines(process.stderr).rest()
    cli.check("", err)
    assert code == cli_module.EXIT_BROKEN_PIPE and err == ""


async def test_demo_runs_the_main_job_end_to_end(cli):
    result = await cli("demo")
    assert result.code == 0, result
    out = result.out
    assert "Convex confirmed the identity (Authenticated)" in out
    assert "the server verified the token and sees" in out
    assert "live update: 3 message(s) ['hello', 'from asyncio', 'live over Convex']" in out
    assert "signed out: the client refuses messages:list itself" in out
    assert "get_session with the old session token after sign-out: None" in out
    assert out.rstrip().endswith("done")
    assert result.err == ""


async def test_demo_piped_into_head_ends_quietly(cli):
    read_end, write_end = os.pipe()
    reader = PipeLines(read_end)
    try:
        process = await cli.start("demo", stdout=write_end)
    finally:
        os.close(write_end)
    async with process:
        assert process.stderr is not None
        for _ in range(3):
            await reader.next(30)
        reader.close()
        with anyio.fail_after(30):
            code = await process.wait()
        err = await Lines(process.stderr).rest()
    assert code == cli_module.EXIT_BROKEN_PIPE and err == "", err


# -- signing out, sessions that end, and where sessions are kept ------------------------------


async def test_logout_then_whoami_is_not_signed_in(cli, better_auth_server):
    seeded = await cli.seed()

    # A command aimed at another Better Auth host finds no session: the token is never
    # sent there, and that host's logout leaves this session alone.
    other = dead_url()
    elsewhere, other_logout = await gather(
        cli("whoami", "--site-url", other), cli("logout", "--site-url", other)
    )
    assert elsewhere.code == cli_module.EXIT_NOT_SIGNED_IN, elsewhere
    assert f"the saved session is for {better_auth_server.url}" in elsewhere.error_line()
    assert other_logout.code == 0 and "nothing to do" in other_logout.err, other_logout
    assert cli.session_file.exists()

    logout = await cli("logout")
    assert logout.code == 0 and f"signed out {seeded.email}" in logout.err, logout
    assert not cli.session_file.exists()
    async with BetterAuthClient(better_auth_server.url) as auth:
        assert await auth.get_session(seeded.session_token) is None  # revoked

    whoami, again = await gather(cli("whoami"), cli("logout"))
    assert whoami.code == cli_module.EXIT_NOT_SIGNED_IN and whoami.out == "", whoami
    assert "not signed in" in whoami.error_line()
    assert again.code == 0 and "nothing to do" in again.err  # not an error


async def test_a_session_ended_elsewhere_is_not_signed_in(cli, better_auth_server):
    seeded = await cli.seed()
    async with BetterAuthClient(better_auth_server.url) as auth:
        await auth.sign_out(seeded.session_token)

    result = await cli("query", "messages:list")
    assert result.code == cli_module.EXIT_NOT_SIGNED_IN, result
    assert "the session has ended" in result.error_line()
    assert not cli.session_file.exists()  # forgotten: the next command asks no server


async def test_keyring_instead_of_a_file(cli):
    pytest.importorskip("keyrings.alt.file")
    keyring: dict[str, str | None] = {
        "PYTHON_KEYRING_BACKEND": "keyrings.alt.file.PlaintextKeyring"
    }
    email = new_email()
    signup = await cli(
        "signup", email, "--keyring", "--password-stdin", input=PASSWORD, env=keyring
    )
    assert signup.code == 0 and "session saved in the system keyring" in signup.err, signup
    assert not cli.session_file.exists()
    whoami = await cli("whoami", "--keyring", env=keyring)
    assert whoami.code == 0 and whoami.json()["email"] == email, whoami


async def test_logout_from_the_keyring(cli, better_auth_server, tmp_path):
    plaintext = pytest.importorskip("keyrings.alt.file")
    keyring: dict[str, str | None] = {
        "PYTHON_KEYRING_BACKEND": "keyrings.alt.file.PlaintextKeyring"
    }
    # The keyring file the command line uses, given its $XDG_DATA_HOME.
    backend = plaintext.PlaintextKeyring()
    backend.file_path = str(tmp_path / "data" / "python_keyring" / "keyring_pass.cfg")
    seeded = await cli.seed(backend=backend)
    assert backend.get_password(DEFAULT_KEYRING_SERVICE, better_auth_server.url) is not None

    logout = await cli("logout", "--keyring", env=keyring)
    assert logout.code == 0 and f"signed out {seeded.email}" in logout.err, logout
    assert backend.get_password(DEFAULT_KEYRING_SERVICE, better_auth_server.url) is None
    async with BetterAuthClient(better_auth_server.url) as auth:
        assert await auth.get_session(seeded.session_token) is None  # revoked
    whoami = await cli("whoami", "--keyring", env=keyring)
    assert whoami.code == cli_module.EXIT_NOT_SIGNED_IN, whoami
    assert "not signed in (no session in the system keyring)" in whoami.error_line()


async def test_keyring_without_a_usable_backend_is_one_error_line(cli, better_auth_server):
    # keyring's "fail" backend: what keyring picks on a machine with no keyring at all.
    no_keyring: dict[str, str | None] = {"PYTHON_KEYRING_BACKEND": "keyring.backends.fail.Keyring"}
    seeded = await cli.seed()
    before = cli.session_file.read_bytes()
    new_account = new_email()
    whoami, login, signup, magic, logout = await gather(
        cli("whoami", "--keyring", env=no_keyring),
        cli("login", seeded.email, "--keyring", "--password-stdin", input=PASSWORD, env=no_keyring),
        cli("signup", new_account, "--keyring", "--password-stdin", input=PASSWORD, env=no_keyring),
        cli("login", new_account, "--magic-link", "--keyring", env=no_keyring),
        cli("logout", "--keyring", env=no_keyring),
    )
    for result in (whoami, login, signup, magic, logout):
        assert result.code == cli_module.EXIT_ERROR, result
        assert "no usable keyring backend" in result.error_line()
        assert result.out == ""
    # Refused before any server call: no session was started, no account made, no link sent.
    for refused in (login, signup, magic):
        assert "signed in" not in refused.err and "sent a sign-in link" not in refused.err
    assert cli.session_file.read_bytes() == before  # --keyring never falls back to the file
    async with BetterAuthClient(better_auth_server.url) as auth:
        with pytest.raises(InvalidCredentialsError):
            await auth.sign_in(new_account, PASSWORD)


# -- servers that are not there ------------------------------------------------------------


async def test_unreachable_servers_exit_5_quickly(cli):
    await cli.seed()
    dead = dead_url()
    started = time.monotonic()
    login, query = await gather(
        cli("login", new_email(), "--password-stdin", "--site-url", dead, input="x"),
        cli("query", "messages:list", "--url", dead),  # Better Auth up, Convex down
    )
    assert login.code == cli_module.EXIT_UNAVAILABLE, login
    assert f"could not reach Better Auth at {dead}" in login.error_line()
    assert query.code == cli_module.EXIT_UNAVAILABLE, query
    assert f"could not connect to the Convex deployment at {dead}" in query.error_line()
    assert time.monotonic() - started < 10


@pytest.fixture
async def proxy(better_auth_server) -> AsyncIterator[FaultyProxy]:
    """A proxy in front of the real Better Auth server that fails requests on demand."""
    async with FaultyProxy(better_auth_server.url) as running:
        yield running


async def test_better_auth_failing_or_too_slow_exits_5(cli: Cli, proxy: FaultyProxy) -> None:
    sign_in = "/api/auth/sign-in/email"
    seeded = await cli.seed()
    cli.session_file.unlink()

    async def login(*options: str) -> Result:
        return await cli(
            "login",
            seeded.email,
            "--password-stdin",
            "--site-url",
            proxy.url,
            *options,
            input=PASSWORD,
        )

    proxy.fail_next(sign_in, 503)
    unavailable = await login()
    proxy.fail_next(sign_in, 429, headers={"Retry-After": "7"})
    limited = await login()
    proxy.hang_next(sign_in)
    started = time.monotonic()
    slow = await login("--timeout", "0.5")
    assert time.monotonic() - started < 5
    for result in (unavailable, limited, slow):
        assert result.code == cli_module.EXIT_UNAVAILABLE, result
        assert result.out == ""
    assert "503" in unavailable.error_line()
    assert "429" in limited.error_line()
    assert slow.error_line() == f"error: Better Auth at {proxy.url} did not answer within 0.5 s"
    assert not cli.session_file.exists()
    # Through the same proxy with no fault, the same login works.
    works = await login()
    assert works.code == 0 and f"signed in as {seeded.email}" in works.err, works
    assert proxy.counts[sign_in] == 4


async def test_a_convex_call_that_does_not_answer_in_time_exits_5(cli, convex_server):
    released = anyio.Event()

    async def hang(ctx: Any, args: dict[str, Any]) -> None:
        await released.wait()

    convex_server.register("action", "tools:hang", hang)
    await cli.seed()
    try:
        slow = await cli("action", "tools:hang", "--timeout", "0.5")
    finally:
        released.set()
    assert slow.code == cli_module.EXIT_UNAVAILABLE, slow
    assert slow.error_line() == (
        f"error: Convex at {convex_server.url} did not answer within 0.5 s; "
        "the action may or may not have run"
    )
    assert slow.out == ""


# -- documentation ---------------------------------------------------------------------------


def test_the_exit_statuses_are_documented_alike(capsys):
    with pytest.raises(SystemExit) as exited:
        cli_module.main(["--help"])
    assert exited.value.code == 0
    help_text = capsys.readouterr().out
    doc = cli_module.__doc__ or ""
    for line in cli_module._EXIT_STATUS_HELP.splitlines()[1:]:
        assert line in help_text
        assert line.strip() in doc
    for status in (0, 1, 2, 3, 4, 5, 130, 141):
        assert f"\n  {status} " in help_text
