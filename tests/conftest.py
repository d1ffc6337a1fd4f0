"""Shared test configuration. Fixtures for the local stack come from the package's own
pytest plugin (dartvex_auth_better.testing.pytest_plugin).

No secret in any log record, in any test: for the whole session a handler on the
``dartvex_auth_better`` logger, with that logger at DEBUG, keeps the text of every record
the package emits (the SDK's and its test servers'). After each test, the records since
the last check are searched for

- every secret registered in tests/better_auth_fakes.py (``secret()``, what the fake
  server received and handed out, the text constants of test modules named like secrets,
  and the sessions among a test's fixture values), and
- anything shaped like a whole JWT or a signed Better Auth session token, which catches
  the real server's tokens that no test registered.

A record emitted after the last test (a session fixture stopping) is checked when the
session ends, and each test's records are checked again then against secrets registered
later. ``redact()`` shows at most the last four characters, so a match is a leak.

The logger's level stays DEBUG for the session, so DEBUG records also reach pytest's own
log capture (``caplog`` and the report of a failed test); ``caplog.at_level`` still works.
"""

from __future__ import annotations

import logging
import re
from collections.abc import AsyncIterator, Generator, Iterator
from dataclasses import dataclass
from typing import Any
from urllib.parse import quote

import pytest

from dartvex_auth_better import BetterAuthSession
from tests import better_auth_fakes as fakes

_PACKAGE = "dartvex_auth_better"

_TOKEN_SHAPES = re.compile(
    # A whole JWT: base64url of a JSON header and payload, then a signature.
    r"eyJ[\w-]{8,}\.eyJ[\w-]{8,}\.[\w-]{8,}"
    # Better Auth's signed session token `<32 chars>.<base64 HMAC-SHA256>`, plain or
    # URL-encoded (as in a cookie).
    r"|[A-Za-z0-9]{32}\.[A-Za-z0-9+/]{43}="
    r"|[A-Za-z0-9]{32}(?:\.|%2E)(?:[A-Za-z0-9]|%2B|%2F){43}%3D",
    re.IGNORECASE,
)


@pytest.fixture(scope="session")
def anyio_backend() -> str:
    # Session scope lets the session-wide Better Auth server fixture share one event loop
    # runner with the tests. The SDK is asyncio-native (aiohttp).
    return "asyncio"


# ---------------------------------------------------------------- no secrets in logs


@dataclass
class _Chunk:
    """The records of one test, joined, and how many secrets they were checked against."""

    where: str
    texts: list[str]
    checked_secrets: int = 0

    @property
    def joined(self) -> str:
        return "\n".join(self.texts)


class _Collector(logging.Handler):
    """Keeps the formatted text of every record, labelled with the test that was running."""

    def __init__(self) -> None:
        super().__init__(logging.DEBUG)
        self.setFormatter(logging.Formatter("%(name)s %(levelname)s %(message)s"))
        self.pending: list[str] = []
        self.pending_where: list[str] = []
        self.chunks: list[_Chunk] = []

    def emit(self, record: logging.LogRecord) -> None:
        try:
            text = self.format(record)
        except Exception as exc:  # a record that cannot be formatted is its own bug
            text = f"{record.name} unformattable record {record.msg!r}: {exc!r}"
        self.pending.append(text)
        self.pending_where.append(_where)

    def take(self) -> _Chunk:
        """The records since the last call, as one chunk (kept for the final recheck)."""
        wheres = sorted(set(self.pending_where))
        chunk = _Chunk(", ".join(wheres) or _where, self.pending)
        self.pending, self.pending_where = [], []
        self.chunks.append(chunk)
        return chunk


_collector: _Collector | None = None
_where = "collection"
"""The test running now, which the records emitted now are charged to."""


def _hide(text: str, value: str) -> str:
    return text.replace(value, f"<secret …{value[-4:]}>")


def _leaks(chunk: _Chunk, *, shapes: bool) -> list[str]:
    """What in *chunk* shows a secret not yet checked for, described without the secret."""
    found: list[str] = []
    if not chunk.texts:
        chunk.checked_secrets = len(fakes.SECRETS)
        return found
    joined = chunk.joined
    new = fakes.SECRETS[chunk.checked_secrets :]
    chunk.checked_secrets += len(new)
    for value in new:
        for form in {value, quote(value, safe="")}:
            if form in joined:
                text = next(t for t in chunk.texts if form in t)
                found.append(f"a registered secret: {_hide(text, form)!r}")
    if shapes:
        for match in _TOKEN_SHAPES.finditer(joined):
            text = next(t for t in chunk.texts if match.group() in t)
            found.append(f"a token-shaped value: {_hide(text, match.group())!r}")
    return found


def _fail_on(chunk: _Chunk, found: list[str]) -> None:
    if found:
        pytest.fail(
            f"dartvex_auth_better logged a secret during {chunk.where}:\n  "
            + "\n  ".join(found[:5]),
            pytrace=False,
        )


@pytest.fixture(scope="session", autouse=True)
def _package_logs_at_debug() -> Iterator[_Collector]:
    """Collect every dartvex_auth_better record at DEBUG for the whole session."""
    global _collector
    collector = _Collector()
    package = logging.getLogger(_PACKAGE)
    saved = package.level
    package.setLevel(logging.DEBUG)
    package.addHandler(collector)
    _collector = collector
    try:
        yield collector
    finally:
        _collector = None
        package.removeHandler(collector)
        package.setLevel(saved)
    found = _leaks(collector.take(), shapes=True)
    for chunk in collector.chunks:  # secrets registered after a test ran
        found += [f"{chunk.where}: {leak}" for leak in _leaks(chunk, shapes=False)]
    _fail_on(_Chunk("the session", []), found)


@pytest.hookimpl(wrapper=True)
def pytest_runtest_protocol(item: pytest.Item) -> Generator[None, object, object]:
    # Label each record with the test running when it was emitted.
    global _where
    _where = item.nodeid
    try:
        return (yield)
    finally:
        _where = f"between tests (after {item.nodeid})"


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    modules = {id(m): m for item in items if (m := getattr(item, "module", None)) is not None}
    for module in modules.values():
        fakes.secrets_in_module(module)


def _sessions_in(value: Any) -> Iterator[BetterAuthSession]:
    if isinstance(value, BetterAuthSession):
        yield value
    elif isinstance(value, list | tuple):
        for item in value:
            if isinstance(item, BetterAuthSession):
                yield item
    elif isinstance(value, dict):
        for item in value.values():
            if isinstance(item, BetterAuthSession):
                yield item


@pytest.fixture(scope="session")
async def better_auth_server(better_auth_server: Any) -> AsyncIterator[Any]:
    """The plugin's session-wide real Better Auth server; when the session is done with
    it, every session token it issued is registered as a secret, so the final check of
    all the session's records covers the real server's tokens too (they have no shape
    that gives them away)."""
    yield better_auth_server
    for token in await better_auth_server.issued_session_tokens():
        fakes.secret(token)


@pytest.fixture(autouse=True)
def _no_secrets_in_package_logs(
    request: pytest.FixtureRequest, _package_logs_at_debug: _Collector
) -> Iterator[None]:
    """Check this test's dartvex_auth_better records (setup to teardown) for secrets."""
    yield
    for value in getattr(request.node, "funcargs", {}).values():
        for session in _sessions_in(value):
            fakes.secret_session(session)
    chunk = _package_logs_at_debug.take()
    _fail_on(chunk, _leaks(chunk, shapes=True))


# -- the socket loop's two ways of reading frames --------------------------------------------
# Tests that use ``frame_reading`` (test_convex_client.py and test_reconnect.py, through
# ``pytest.mark.usefixtures``) run twice: with text frames handled in aiohttp's data
# callback (InlineFrames, the default where aiohttp's internals are the known ones) and
# with every frame taken by ``ws.receive()`` (the path used everywhere else).


def pytest_generate_tests(metafunc: pytest.Metafunc) -> None:
    if "frame_reading" in metafunc.fixturenames:
        metafunc.parametrize("frame_reading", ["inline", "receive"], indirect=True)


@pytest.fixture
def frame_reading(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch) -> str:
    from dartvex_auth_better.convex import _inline

    mode: str = request.param
    if mode == "inline" and not _inline.ENABLED:
        pytest.skip("inline frame reading is switched off (DARTVEX_AUTH_BETTER_INLINE_FRAMES=0)")
    monkeypatch.setattr(_inline, "ENABLED", mode == "inline")
    return mode
