"""Helpers for the Better Auth test suite.

- :class:`FakeBetterAuth`: a small aiohttp.web server on 127.0.0.1 that answers each route
  with exactly the shape a test scripts (the ones the real server will not produce on
  demand: 5xx, HTML, 429, hangs, cookie-only answers...) and records what it received.
- A registry of every secret the suite uses (passwords, session tokens, JWTs, reset and
  magic-link tokens). Tests add to it with :func:`secret` and :func:`secret_session`; the
  fake server adds what it receives and sends (bearer tokens, passwords, tokens in
  bodies, session and JWT cookies); tests/conftest.py adds the module constants named
  like secrets and the sessions among a test's fixture values, and checks every
  ``dartvex_auth_better`` log record of the session against it.
- :func:`raw_http_server`: a TCP server on 127.0.0.1 that answers every connection with
  fixed bytes, for answers no HTTP server library would write (a malformed header).
- The module-scoped ``no_secrets_in_logs`` fixture, which also captures the root
  logger (aiohttp's records, the local server's output lines) at DEBUG for a module and
  checks those. Test modules import the fixture (``from tests.better_auth_fakes import
  no_secrets_in_logs``) to run it for their whole module.
"""

from __future__ import annotations

import asyncio
import base64
import json
import logging
import re
import socket
import traceback
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator, Sequence
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from types import ModuleType
from typing import Any
from urllib.parse import unquote

import pytest
from aiohttp import web
from multidict import CIMultiDictProxy, MultiMapping

from dartvex_auth_better import BetterAuthSession

__all__ = [
    "SECRETS",
    "FakeBetterAuth",
    "Received",
    "Reply",
    "assert_no_secrets",
    "fake_better_auth",
    "make_jwt",
    "maybe_secret",
    "no_secrets_in_logs",
    "raw_http_server",
    "secret",
    "secret_session",
    "secrets_in_module",
]

# ------------------------------------------------------------------------------ secrets

SECRETS: list[str] = []
"""Every password and token any Better Auth test used; none may appear in logs or errors.

Only ever appended to, so a checker can remember how far it has looked.
"""
_KNOWN: set[str] = set()

MIN_FOUND_SECRET = 8
"""Values found rather than registered by hand count from this length (as the client's
scrubbing does): a short value such as ``"short"`` would match ordinary words."""


def secret(value: str) -> str:
    """Register *value* as a secret and return it."""
    if value not in _KNOWN:
        _KNOWN.add(value)
        SECRETS.append(value)
    return value


def maybe_secret(value: object) -> None:
    """Register *value* if it is text of at least :data:`MIN_FOUND_SECRET` characters.

    For values found in traffic or in a module, which nobody chose to register.
    """
    if isinstance(value, str) and len(value.strip()) >= MIN_FOUND_SECRET:
        secret(value)
        if value.count(".") == 1 and not any(c.isspace() for c in value):
            # A signed session token `<token>.<signature>`: the bare token counts too.
            # (Not a JWT's first part: that header is the same for every token.)
            maybe_secret(value.split(".", 1)[0])


def secret_session(session: BetterAuthSession) -> BetterAuthSession:
    """Register both tokens of a session and return it."""
    secret(session.token)
    secret(session.session_token)
    # The bare token inside the signed `<token>.<signature>` form counts too.
    secret(session.session_token.split(".", 1)[0])
    return session


_SECRET_NAME = re.compile(r"(?:^|_)(?:PASSWORD|TOKEN|JWT|SECRET)$")


def secrets_in_module(module: ModuleType) -> None:
    """Register a module's text constants named like secrets (``PASSWORD``, ``*_TOKEN``...).

    Paths and URLs (``TOKEN = "/api/auth/convex/token"``) are names of things, not
    secrets, and are left out.
    """
    for name, value in vars(module).items():
        if (
            _SECRET_NAME.search(name)
            and isinstance(value, str)
            and not value.startswith("/")
            and "://" not in value
        ):
            maybe_secret(value)


_SECRET_FIELDS = ("password", "newPassword", "currentPassword", "token")


def _secrets_in_json(data: Any) -> None:
    if isinstance(data, dict):
        for key in _SECRET_FIELDS:
            maybe_secret(data.get(key))
        for value in data.values():
            if isinstance(value, dict):  # {"session": {"token": ...}}
                _secrets_in_json(value)


def _json_or_none(body: bytes) -> Any:
    try:
        return json.loads(body)
    except ValueError:  # not JSON, or not UTF-8
        return None


def _secrets_in_request(request: web.Request, body: bytes) -> None:
    auth = request.headers.get("Authorization", "")
    if auth.startswith("Bearer "):
        maybe_secret(auth[len("Bearer ") :])
    maybe_secret(request.query.get("token"))
    _secrets_in_json(_json_or_none(body))


def _secrets_in_response(response: web.StreamResponse) -> None:
    maybe_secret(response.headers.get("set-auth-token"))
    for header in response.headers.getall("Set-Cookie", ()):
        # By hand, not http.cookies: that refuses some of the odd cookies tests send.
        name, _, rest = header.partition("=")
        if "session_token" in name or "convex_jwt" in name:
            maybe_secret(unquote(rest.split(";", 1)[0].strip().strip('"')))
    body = response.body if isinstance(response, web.Response) else None
    if isinstance(body, bytes):
        _secrets_in_json(_json_or_none(body))


def _exception_chain(exc: BaseException) -> Iterator[BaseException]:
    seen: set[int] = set()
    todo: list[BaseException | None] = [exc]
    while todo:
        current = todo.pop()
        if current is None or id(current) in seen:
            continue
        seen.add(id(current))
        yield current
        todo += [current.__cause__, current.__context__]


def assert_no_secrets(exc: BaseException) -> None:
    """Fail when any registered secret is in the text of *exc* or anything chained to it.

    Suppressed contexts (``raise ... from None``) are checked too: they are still
    reachable, and a logger or debugger may show them.
    """
    for link in _exception_chain(exc):
        texts = [str(link), repr(link), *map(str, vars(link).values())]
        texts += traceback.format_exception_only(link)
        for text in texts:
            leaked = [s for s in SECRETS if s in text]
            assert not leaked, f"{type(link).__name__} shows a secret: {text!r}"


class _Capture(logging.Handler):
    def __init__(self) -> None:
        super().__init__(logging.DEBUG)
        self.records: list[logging.LogRecord] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.records.append(record)


@pytest.fixture(scope="module", autouse=True)
def no_secrets_in_logs() -> Iterator[list[logging.LogRecord]]:
    """Capture every log record at DEBUG for the whole module; then check for secrets.

    The handler sits on the root logger, with the root and ``dartvex_auth_better``
    loggers at DEBUG, so it sees the SDK's records, aiohttp's and the local server's
    output lines. At the end of the module every record is formatted (with any
    traceback) and searched for every secret registered so far.
    """
    capture = _Capture()
    root = logging.getLogger()
    package = logging.getLogger("dartvex_auth_better")
    saved = root.level, package.level
    root.setLevel(logging.DEBUG)
    package.setLevel(logging.DEBUG)
    root.addHandler(capture)
    try:
        yield capture.records
    finally:
        root.removeHandler(capture)
        root.setLevel(saved[0])
        package.setLevel(saved[1])
    formatter = logging.Formatter("%(name)s %(levelname)s %(message)s")
    texts = [formatter.format(record) for record in capture.records]
    ours = [r for r in capture.records if r.name.startswith("dartvex_auth_better.better_auth")]
    assert ours, "no DEBUG record from the Better Auth client was captured"
    assert SECRETS, "the tests registered no secrets to look for"
    leaks = [(s, t) for t in texts for s in SECRETS if s in t]
    assert not leaks, f"secrets in the logs: {leaks[:3]}"


# ------------------------------------------------------------------------------ JWTs


def make_jwt(claims: dict[str, Any]) -> str:
    """An unsigned JWT-shaped token carrying *claims* (the client never verifies one)."""

    def b64(data: bytes) -> str:
        return base64.urlsafe_b64encode(data).rstrip(b"=").decode()

    header = b64(b'{"alg":"RS256","kid":"test"}')
    return f"{header}.{b64(json.dumps(claims).encode())}.{b64(b'not-a-signature')}"


# ------------------------------------------------------------------------------ server


@dataclass(frozen=True)
class Received:
    """One request as the fake server saw it."""

    method: str
    path: str
    query: MultiMapping[str]
    headers: CIMultiDictProxy[str]
    body: bytes
    peer: Any
    """The client's (host, port): the same port means the same TCP connection."""

    def json(self) -> Any:
        return json.loads(self.body)


_NO_JSON: Any = object()


@dataclass(frozen=True)
class Reply:
    """A canned answer: a status, a JSON value or raw body, and extra headers.

    Headers are (name, value) pairs so that ``Set-Cookie`` can repeat.
    """

    status: int = 200
    json: Any = _NO_JSON
    body: bytes | str = b""
    headers: Sequence[tuple[str, str]] = ()
    content_type: str | None = None

    def to_response(self) -> web.Response:
        if self.json is not _NO_JSON:
            payload = json.dumps(self.json).encode()
            content_type: str | None = self.content_type or "application/json"
        else:
            payload = self.body.encode() if isinstance(self.body, str) else self.body
            content_type = self.content_type
        response = web.Response(status=self.status, body=payload)
        if content_type is not None:
            response.headers["Content-Type"] = content_type
        for name, value in self.headers:
            response.headers.add(name, value)
        return response


Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]


@dataclass
class FakeBetterAuth:
    """A scriptable stand-in for a Better Auth server, over a real socket.

    ``on(method, path, *answers)`` scripts a route: each request takes the next answer
    and the last one repeats. An answer is a :class:`Reply` or an async handler. Routes
    not scripted answer 404 with an empty body, as Better Auth does under ``/api/auth``.
    ``release`` is set when the server stops, so a handler may wait on it to hang.
    """

    received: list[Received] = field(default_factory=list)
    release: asyncio.Event = field(default_factory=asyncio.Event)
    _routes: dict[tuple[str, str], list[Reply | Handler]] = field(default_factory=dict)
    _runner: web.AppRunner | None = None
    _url: str | None = None

    @property
    def url(self) -> str:
        assert self._url is not None, "the fake server is not running"
        return self._url

    @property
    def port(self) -> int:
        return int(self.url.rsplit(":", 1)[1])

    def on(self, method: str, path: str, *answers: Reply | Handler) -> None:
        assert answers
        self._routes[(method.upper(), path)] = list(answers)

    def requests(self, path: str | None = None) -> list[Received]:
        """What was received, oldest first, optionally for one path."""
        return [r for r in self.received if path is None or r.path == path]

    async def _dispatch(self, request: web.Request) -> web.StreamResponse:
        body = await request.read()
        # Whatever a request carries or an answer hands out is a secret from now on.
        _secrets_in_request(request, body)
        self.received.append(
            Received(
                request.method,
                request.path,
                request.query,
                request.headers,
                body,
                request.transport.get_extra_info("peername") if request.transport else None,
            )
        )
        answers = self._routes.get((request.method, request.path))
        if not answers:
            return web.Response(status=404)
        answer = answers.pop(0) if len(answers) > 1 else answers[0]
        response: web.StreamResponse
        if isinstance(answer, Reply):
            response = answer.to_response()
        else:
            response = await answer(request)
        _secrets_in_response(response)
        return response

    async def start(self) -> None:
        app = web.Application()
        app.router.add_route("*", "/{tail:.*}", self._dispatch)
        # No access log: it would print magic-link URLs, tokens included.
        runner = web.AppRunner(app, access_log=None, handle_signals=False)
        await runner.setup()
        sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        sock.bind(("127.0.0.1", 0))
        await web.SockSite(runner, sock).start()
        self._runner = runner
        self._url = f"http://127.0.0.1:{sock.getsockname()[1]}"

    async def aclose(self) -> None:
        self.release.set()  # lets hanging handlers finish, so shutdown does not wait
        if self._runner is not None:
            await self._runner.cleanup()
            self._runner = None


@pytest.fixture
async def fake_better_auth() -> AsyncIterator[FakeBetterAuth]:
    """A running :class:`FakeBetterAuth`, stopped after the test."""
    fake = FakeBetterAuth()
    await fake.start()
    try:
        yield fake
    finally:
        await fake.aclose()


@asynccontextmanager
async def raw_http_server(answer: bytes) -> AsyncIterator[str]:
    """Serve *answer*, byte for byte, to each connection on 127.0.0.1; yield the URL.

    The request is read up to the end of its headers and its body (by Content-Length)
    first, so that the client has sent everything before the answer arrives. The
    connection is closed after the answer.
    """

    async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            head = await reader.readuntil(b"\r\n\r\n")
            match = re.search(rb"(?im)^content-length:\s*(\d+)", head)
            if match:
                await reader.readexactly(int(match.group(1)))
            writer.write(answer)
            await writer.drain()
        except (asyncio.IncompleteReadError, ConnectionError):
            pass
        finally:
            writer.close()

    server = await asyncio.start_server(handle, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        server.close()
        await server.wait_closed()
