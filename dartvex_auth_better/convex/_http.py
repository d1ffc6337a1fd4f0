"""ConvexHttpClient: one-shot Convex function calls over HTTP, with no socket.

Each call is one ``POST <deployment>/api/query|mutation|action`` with a body of
``{"path", "format": "convex_encoded_json", "args": [encoded args]}`` and, when a token is
set, ``Authorization: Bearer <jwt>``. How the answer maps to a result or an exception:

* HTTP 2xx or 560 with ``{"status": "success", "value"}``: the decoded value.
* HTTP 2xx or 560 with ``{"status": "error", "errorMessage", "errorData"?}``: ConvexError,
  with ``data`` (the decoded ``errorData``, None when absent) and ``log_lines``.
* HTTP 401/403 while a token is set: AuthRejectedError (the server's code and message,
  never the token). Without a token a 401/403 is an ordinary ConvexHttpError.
* Any other status: ConvexHttpError with the server's ``{"code", "message"}``;
  retryable for 5xx and 429.
* A body we cannot use (not JSON, the wrong shape, an invalid Convex value, or an error
  status whose body is not ``{"code", "message"}``, such as a proxy's HTML page):
  ConvexHttpResponseError, which is also a ProtocolError. Its ``retryable`` still follows
  the status, so a gateway's empty 502 is retryable and a garbled 200 is not.
* The connection failed: TransportError; no answer within ``timeout``:
  RequestTimeoutError. The client was closed: ClientClosedError.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Mapping
from types import TracebackType
from typing import Any, Literal, NoReturn, Self

import aiohttp
import msgspec

from .._errors import (
    AuthRejectedError,
    ClientClosedError,
    ConvexError,
    ConvexHttpError,
    ConvexHttpResponseError,
    ProtocolError,
    RequestTimeoutError,
    TransportError,
)
from .._json import JSON_ERRORS
from .._logging import convex_logger as log
from .._urls import normalize_base_url
from .._version import __version__
from ._query_set import canonical_udf_path
from ._values import decode_value, encode_args

__all__ = ["ConvexHttpClient"]

_Kind = Literal["query", "mutation", "action"]

# Convex answers a function that failed with 560 (or 200) and a function-result body.
_FUNCTION_FAILED = 560
_RESULT = 'a function result ({"status": "success" | "error", ...})'


class ConvexHttpClient:
    """Run Convex queries, mutations and actions as one-shot HTTP requests.

    No socket, no subscriptions, no background tasks: each call is one request carrying
    the token in force when it is sent. Made for per-request backends (a web handler
    acting for its caller: create a client per request with the caller's JWT and a shared
    ``aiohttp.ClientSession``; construction is cheap and does no I/O) and for scripts.

    ``session``: a session you pass in is borrowed and never closed. Give it a
    ``DummyCookieJar``: auth travels in the ``Authorization`` header, and a jar shared
    between users' clients would mix their cookies. Without one, the client creates its
    own session on the first call and closes it in :meth:`aclose` (or when an
    ``async with`` block ends).

    ``timeout`` bounds a whole call in seconds (connect, send, run the function, read
    the answer); raise it for long actions. ``connect_timeout`` bounds the connect alone.
    ``allow_insecure`` permits plain ``http://`` to a non-loopback host.
    """

    def __init__(
        self,
        deployment_url: str,
        *,
        token: str | None = None,
        session: aiohttp.ClientSession | None = None,
        timeout: float = 30.0,
        connect_timeout: float = 10.0,
        allow_insecure: bool = False,
    ) -> None:
        self.url = normalize_base_url(
            deployment_url, name="deployment_url", allow_insecure=allow_insecure
        )
        if not timeout > 0 or not connect_timeout > 0:
            raise ValueError("timeout and connect_timeout must be positive numbers of seconds")
        self._token = _checked_token(token)
        self._session = session
        self._owns_session = session is None
        self._timeout = aiohttp.ClientTimeout(total=timeout, connect=connect_timeout)
        self._client_header = f"python-dartvex-auth-better-{__version__}"
        # The mutation queue. asyncio.Lock is documented as fair (the first waiter is the
        # next to acquire, and a newcomer cannot barge past a woken waiter), so holding it
        # around each request sends mutations one at a time in the order they queued. A
        # cancelled waiter just leaves the line without disturbing the others' order.
        self._mutation_queue = asyncio.Lock()
        self._closed = False

    def __repr__(self) -> str:
        return f"ConvexHttpClient(url={self.url!r}, authenticated={self._token is not None})"

    # -- lifecycle -----------------------------------------------------------------------

    async def __aenter__(self) -> Self:
        if self._closed:
            raise ClientClosedError("this ConvexHttpClient is closed")
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.aclose()

    async def aclose(self) -> None:
        """Close the client: later calls, and mutations still waiting in the queue, raise
        ClientClosedError. Closes the aiohttp session only if this client created it
        (calls in flight on it then fail with ClientClosedError too). Idempotent."""
        self._closed = True
        if self._owns_session and self._session is not None:
            session, self._session = self._session, None
            await session.close()

    # -- auth ----------------------------------------------------------------------------

    def set_auth(self, token: str | None) -> None:
        """Use this Convex JWT for the calls that start from now on (None: anonymous).

        A plain method, not a coroutine, unlike ``ConvexClient.set_auth``: there is no
        connection to re-authenticate, so nothing is sent and nothing is awaited. The
        token is not checked here; a call made with a token the server refuses raises
        AuthRejectedError. Calls already in flight keep the token they were sent with.
        """
        self._token = _checked_token(token)

    def clear_auth(self) -> None:
        """Make the calls that start from now on anonymous. Not a coroutine (see
        :meth:`set_auth`)."""
        self._token = None

    # -- functions -----------------------------------------------------------------------

    async def query(self, name: str, args: Mapping[str, Any] | None = None) -> Any:
        """Run a query once and return its result, read from the server's latest state."""
        path, body = _request_body(name, args)
        return await self._post("query", path, body)

    async def mutation(
        self, name: str, args: Mapping[str, Any] | None = None, *, skip_queue: bool = False
    ) -> Any:
        """Run a mutation and return its result.

        Mutations from one client go out one at a time, in call order: each is sent only
        after the previous one has answered (successfully or not), as the JS
        ConvexHttpClient does. Separate HTTP requests can otherwise reach the server, and
        commit, in any order, so ``gather``-ing a script's writes would apply them in a
        random order. Call order is the order the calls start running; for tasks, the
        order they were created in. ``skip_queue=True`` sends at once, past the queue, for
        a mutation whose order relative to this client's others does not matter.

        A TransportError, RequestTimeoutError or retryable ConvexHttpError means no result
        came back, not that the mutation did not run: retry only idempotent writes.
        """
        # Encoding before queueing makes bad arguments fail at once rather than after
        # every mutation ahead in the queue.
        path, body = _request_body(name, args)
        if skip_queue:
            return await self._post("mutation", path, body)
        self._check_open()
        async with self._mutation_queue:
            return await self._post("mutation", path, body)

    async def action(self, name: str, args: Mapping[str, Any] | None = None) -> Any:
        """Run an action and return its result. Actions are not queued: they may run
        concurrently. As with mutations, an error without a result does not prove that
        the action did not run."""
        path, body = _request_body(name, args)
        return await self._post("action", path, body)

    # -- plumbing -------------------------------------------------------------------------

    def _check_open(self) -> None:
        if self._closed:
            raise ClientClosedError("this ConvexHttpClient is closed")

    def _get_session(self) -> aiohttp.ClientSession:
        self._check_open()
        if self._session is None:
            # Created on first use, inside the running event loop, so that the constructor
            # does no I/O. Auth travels in a header; no cookie should ever be kept.
            self._session = aiohttp.ClientSession(cookie_jar=aiohttp.DummyCookieJar())
        return self._session

    async def _post(self, kind: _Kind, path: str, body: bytes) -> Any:
        session = self._get_session()
        # Read the token once: the request and the error mapping must agree on it even if
        # set_auth() runs while this call waits for the server.
        token = self._token
        headers = {"Content-Type": "application/json", "Convex-Client": self._client_header}
        if token is not None:
            headers["Authorization"] = f"Bearer {token}"
        started = time.perf_counter()
        try:
            # Redirects are not followed: a redirected POST may become a GET or carry the
            # token to another host. The Location goes into the error instead.
            async with session.post(
                f"{self.url}/api/{kind}",
                data=body,
                headers=headers,
                timeout=self._timeout,
                allow_redirects=False,
            ) as resp:
                status = resp.status
                location = resp.headers.get("Location")
                content = await resp.read()
        except TimeoutError:
            _log_failure(kind, path, "timeout", started)
            if self._closed:
                raise ClientClosedError(
                    "this ConvexHttpClient was closed during the call"
                ) from None
            raise RequestTimeoutError(
                f"Convex {kind} {path} got no answer in time (timeout "
                f"{self._timeout.total:g} s, connect timeout {self._timeout.connect:g} s)"
            ) from None
        except (aiohttp.ClientError, OSError) as exc:
            _log_failure(kind, path, type(exc).__name__, started)
            if self._closed:
                raise ClientClosedError(
                    "this ConvexHttpClient was closed during the call"
                ) from None
            # Not chained: aiohttp errors can hold the request's headers, token included.
            raise TransportError(
                f"could not reach Convex for {kind} {path}: {type(exc).__name__}: {exc}"
            ) from None
        log.debug(
            "HTTP %s %s -> %d in %.1f ms",
            kind,
            path,
            status,
            (time.perf_counter() - started) * 1000,
        )
        if 200 <= status < 300 or status == _FUNCTION_FAILED:
            return _function_result(kind, path, status, content)
        _raise_for_status(kind, path, status, content, token, location)


def _checked_token(token: object) -> str | None:
    """Validate a token without ever putting it into an error message."""
    if token is None:
        return None
    if not isinstance(token, str):
        raise TypeError(f"token must be a str or None, not {type(token).__name__}")
    # A JWT is base64url segments and dots. Anything outside visible ASCII (spaces,
    # newlines) would corrupt or inject into the header, so fail here, not mid-call.
    if not token or not all("!" <= ch <= "~" for ch in token):
        raise ValueError("token must be a non-empty string of visible ASCII (a Convex JWT)")
    return token


def _request_body(name: str, args: Mapping[str, Any] | None) -> tuple[str, bytes]:
    path = canonical_udf_path(name)
    body = msgspec.json.encode(
        {"path": path, "format": "convex_encoded_json", "args": encode_args(args)}
    )
    return path, body


def _log_failure(kind: str, path: str, what: str, started: float) -> None:
    log.debug(
        "HTTP %s %s failed (%s) after %.1f ms",
        kind,
        path,
        what,
        (time.perf_counter() - started) * 1000,
    )


def _describe(content: bytes, expected: str) -> str:
    """Say what a body we cannot use is, for an error message (never the body itself)."""
    if not content.strip():
        return "an empty body"
    try:
        data = msgspec.json.decode(content)
    except JSON_ERRORS:
        return "a body that is not JSON"
    if isinstance(data, dict):
        return f"a JSON object that is not {expected}"
    if isinstance(data, list):
        what = "an array"
    elif data is None:
        what = "null"
    elif isinstance(data, bool):
        what = "a boolean"
    elif isinstance(data, str):
        what = "a string"
    else:
        what = "a number"
    return f"JSON {what}, not {expected}"


def _bad_body(kind: str, path: str, status: int, what: str) -> ConvexHttpResponseError:
    # retryable follows the status (see ConvexHttpError): an empty 502 from a gateway is
    # worth retrying, a garbled 200 or 560 is not.
    return ConvexHttpResponseError(
        f"Convex {kind} {path} answered HTTP {status} with {what}",
        path=path,
        status=status,
    )


def _decoded(kind: str, path: str, status: int, value: object, field: str) -> Any:
    try:
        return decode_value(value)
    except ProtocolError as exc:
        raise _bad_body(
            kind, path, status, f"an invalid Convex value in {field!r}: {exc}"
        ) from None


def _function_result(kind: str, path: str, status: int, content: bytes) -> Any:
    """The value of a function-result body, or raise its ConvexError."""
    try:
        data = msgspec.json.decode(content)
    except JSON_ERRORS:
        raise _bad_body(kind, path, status, _describe(content, _RESULT)) from None
    if not isinstance(data, dict):
        raise _bad_body(kind, path, status, _describe(content, _RESULT))
    outcome = data.get("status")
    if outcome == "success":
        if "value" not in data:
            raise _bad_body(kind, path, status, "a success result without a 'value'")
        return _decoded(kind, path, status, data["value"], "value")
    if outcome == "error":
        message = data.get("errorMessage")
        if not isinstance(message, str):
            raise _bad_body(kind, path, status, "an error result without an 'errorMessage'")
        error_data = None
        if "errorData" in data:
            error_data = _decoded(kind, path, status, data["errorData"], "errorData")
        raise ConvexError(message, data=error_data, log_lines=_log_lines(data.get("logLines")))
    raise _bad_body(kind, path, status, _describe(content, _RESULT))


def _log_lines(raw: object) -> list[str]:
    # Log lines are diagnostics: a malformed list must not turn a function's own error
    # into a ProtocolError, so keep what is usable and drop the rest.
    if not isinstance(raw, list):
        return []
    return [line for line in raw if isinstance(line, str)]


def _error_fields(content: bytes) -> tuple[str | None, str | None]:
    """The ``code`` and ``message`` of a Convex error body, when it is one."""
    try:
        data = msgspec.json.decode(content)
    except JSON_ERRORS:
        return None, None
    if not isinstance(data, dict):
        return None, None
    code = data.get("code")
    message = data.get("message")
    return (
        code if isinstance(code, str) and code else None,
        message if isinstance(message, str) and message else None,
    )


def _raise_for_status(
    kind: str,
    path: str,
    status: int,
    content: bytes,
    token: str | None,
    location: str | None,
) -> NoReturn:
    code, message = _error_fields(content)
    if token is not None:
        # Belt and braces: a server or proxy that echoes the header must not carry the
        # token into our exception text.
        code = code.replace(token, "<token>") if code else code
        message = message.replace(token, "<token>") if message else message
    detail = ": ".join(part for part in (code, message) if part)
    if status in (401, 403) and token is not None:
        said = f": {detail}" if detail else ""
        raise AuthRejectedError(
            f"Convex refused the auth token for {kind} {path} (HTTP {status}){said}"
        )
    if 300 <= status < 400:
        where = f" to {location}" if location else ""
        raise ConvexHttpError(
            f"Convex {kind} {path} answered HTTP {status}, a redirect{where}; redirects are "
            "not followed, so use the deployment URL it points to",
            path=path,
            status=status,
            code=code,
            server_message=message,
        )
    if not detail:
        raise _bad_body(kind, path, status, _describe(content, 'a {"code", "message"} error'))
    raise ConvexHttpError(
        f"Convex {kind} {path} failed with HTTP {status}: {detail}",
        path=path,
        status=status,
        code=code,
        server_message=message,
    )
