"""BetterAuthClient: coroutines over Better Auth's HTTP API and the Convex JWT endpoint.

Every call is one HTTP request (plus, when the response carries no ``convex_jwt`` cookie, a
second one to ``/api/auth/convex/token``). Nothing is cached and nothing runs in the
background: keeping a session alive is the provider's job, not this client's.

How answers map to results (see :class:`BetterAuthClient` for each operation):

- 2xx with the expected JSON: the result. A 2xx whose JSON object carries a non-empty
  string ``code`` is an error answer in disguise and raises like a 4xx would.
- 2xx with a body we cannot use (not JSON, an array, a ``user`` that is not an object, a
  ``token`` that is not a string, a ``/get-session`` object without a ``session`` field):
  :class:`BetterAuthResponseError`, naming the endpoint and status.
- 401/403 from ``/convex/token``: :class:`SessionExpiredError`, whatever the body says.
  From ``/get-session``: ``None`` (see :meth:`BetterAuthClient.get_session`).
- 429: :class:`RateLimitedError` with ``retry_after``; 5xx: :class:`BetterAuthError` with
  ``retryable=True``; other statuses: :class:`BetterAuthError` (or the subclass for its
  Better Auth ``code``), never retryable.
- No answer: :class:`TransportError` / :class:`RequestTimeoutError`, ``retryable=True``.
- An answer that is not readable HTTP (a status or header line over the size limit, a
  malformed header): :class:`BetterAuthResponseError` with ``status`` None, not
  retryable: the server did answer, so the request may have taken effect (a sign-up's
  account may exist), and the same request would get the same answer.
"""

from __future__ import annotations

import email.utils
import inspect
import math
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from http.cookies import Morsel
from types import TracebackType
from typing import Any, Final, Self
from urllib.parse import parse_qs, quote, urlsplit

import aiohttp
import msgspec
from aiohttp.abc import AbstractCookieJar
from aiohttp.http_exceptions import HttpProcessingError, LineTooLong

from .._errors import (
    BetterAuthError,
    BetterAuthResponseError,
    ClientClosedError,
    InvalidCredentialsError,
    InvalidTokenError,
    RateLimitedError,
    RequestTimeoutError,
    SessionExpiredError,
    TransportError,
    UserAlreadyExistsError,
)
from .._json import JSON_ERRORS
from .._jwt import token_claims
from .._logging import better_auth_logger as log
from .._logging import redact
from .._urls import normalize_base_url, site_url_for
from .._version import __version__
from ._session import BetterAuthSession
from ._tokens import CONVEX_JWT_COOKIE, cookie_names, cookie_value, find_session_token

__all__ = ["DEFAULT_CONNECT_TIMEOUT", "DEFAULT_TIMEOUT", "MAX_HEADER_LINE", "BetterAuthClient"]

DEFAULT_TIMEOUT: Final = 30.0
"""Seconds a whole request may take, from connecting to the last byte of the body."""
DEFAULT_CONNECT_TIMEOUT: Final = 10.0
"""Seconds to establish the TCP (and TLS) connection."""
MAX_HEADER_LINE: Final = 64 * 1024
"""Bytes a status line or one header of an answer may take, in the client's own session.

aiohttp's default, 8,190, is too small for Better Auth: its ``convex_jwt`` Set-Cookie
carries the user's name, so a long name alone exceeds it.
"""


def _header_limits() -> dict[str, Any]:  # Any: mypy checks ** against every parameter
    # ClientSession takes max_line_size / max_field_size since aiohttp 3.9 or so; pass
    # them only where they exist, so an older aiohttp keeps its 8,190-byte default.
    parameters = inspect.signature(aiohttp.ClientSession).parameters
    return {n: MAX_HEADER_LINE for n in ("max_line_size", "max_field_size") if n in parameters}


_HEADER_LIMITS: Final = _header_limits()

_SIGN_UP: Final = "/api/auth/sign-up/email"
_SIGN_IN: Final = "/api/auth/sign-in/email"
_SIGN_OUT: Final = "/api/auth/sign-out"
_GET_SESSION: Final = "/api/auth/get-session"
_CONVEX_TOKEN: Final = "/api/auth/convex/token"
_REQUEST_RESET: Final = "/api/auth/request-password-reset"
_RESET_PASSWORD: Final = "/api/auth/reset-password"
_MAGIC_LINK: Final = "/api/auth/sign-in/magic-link"
_VERIFY_MAGIC_LINK: Final = "/api/auth/magic-link/verify"

# What a 404 from each route most likely means, beyond "wrong URL".
_ROUTE_NEEDS: Final[Mapping[str, str]] = {
    _SIGN_UP: "emailAndPassword is enabled",
    _SIGN_IN: "emailAndPassword is enabled",
    _REQUEST_RESET: "emailAndPassword is enabled with a sendResetPassword function",
    _RESET_PASSWORD: "emailAndPassword is enabled with a sendResetPassword function",
    _CONVEX_TOKEN: "the convex() plugin from @convex-dev/better-auth is installed",
    _MAGIC_LINK: "the magicLink() plugin is installed",
    _VERIFY_MAGIC_LINK: "the magicLink() plugin is installed",
}

_NO_SESSION_TOKEN_HINT: Final = (
    "carries no session token: the Better Auth server needs the bearer() plugin, and a "
    "proxy or CORS setup must pass the set-auth-token header through "
    "(Access-Control-Expose-Headers: set-auth-token); the client also looked for a JSON "
    "token field and a session Set-Cookie"
)

_CODE_TO_ERROR: Final[Mapping[str, type[BetterAuthError]]] = {
    "INVALID_EMAIL_OR_PASSWORD": InvalidCredentialsError,
    "USER_ALREADY_EXISTS": UserAlreadyExistsError,
    "USER_ALREADY_EXISTS_USE_ANOTHER_EMAIL": UserAlreadyExistsError,
    "INVALID_TOKEN": InvalidTokenError,
    "EXPIRED_TOKEN": InvalidTokenError,
}

_CODE_HINTS: Final[Mapping[str, str]] = {
    "MISSING_OR_NULL_ORIGIN": "the client sent no Origin header; keep origin=True",
    "INVALID_ORIGIN": "pass origin= an origin the server trusts, or add it to trustedOrigins",
}

# Secrets shorter than this are not scrubbed from server text: scrubbing "short" out of
# "Password too short" would garble real messages, and every token is far longer.
_MIN_SCRUBBED_SECRET: Final = 8


@dataclass(frozen=True, slots=True)
class _Response:
    """One HTTP answer, read completely, with what is needed to describe it safely."""

    endpoint: str
    status: int
    # Out of the repr: headers, cookies and body can carry tokens, and `secrets` is made
    # of them. A debugger or a logged repr shows only where the answer came from.
    headers: Mapping[str, str] = field(repr=False)
    set_cookies: tuple[str, ...] = field(repr=False)
    body: bytes = field(repr=False)
    secrets: tuple[str, ...] = field(repr=False)
    """What the request carried (password, tokens); scrubbed from any server text we show."""

    @property
    def content_type(self) -> str:
        return self.headers.get("Content-Type", "").split(";", 1)[0].strip() or "none"


class BetterAuthClient:
    """HTTP client for a Better Auth server running on a Convex deployment.

    ``base_url`` is the deployment URL: ``https://happy-otter-123.convex.cloud`` sends auth
    calls to ``https://happy-otter-123.convex.site``, where Convex serves HTTP actions.
    For self-hosted and local setups pass ``site_url``, the origin where Better Auth
    answers (``/api/auth/*`` lives under it). Both must be bare origins: a path, query or
    fragment raises ``ValueError``. Plain ``http://`` is accepted only for loopback hosts
    unless ``allow_insecure=True``, because tokens would travel in clear text.

    ``origin`` is the ``Origin`` header sent with every request: ``True`` (default) sends
    the site URL, which Better Auth always trusts; a string sends that origin; ``False``
    sends none. Better Auth refuses a POST that carries any cookie but no trusted Origin
    (``MISSING_OR_NULL_ORIGIN``), so keep it unless you know no cookie will ever be sent.

    ``timeout`` bounds each request as a whole and ``connect_timeout`` its connection
    set-up, in seconds.

    The client's own session accepts status and header lines up to
    :data:`MAX_HEADER_LINE` bytes (64 KiB; Better Auth's ``convex_jwt`` cookie grows with
    the user's name). A session you pass in keeps its own limits: create it with
    ``max_line_size=`` and ``max_field_size=`` to match.

    One ``aiohttp.ClientSession`` serves every call, so a burst of calls shares one
    keep-alive connection. It is created on first use and closed by :meth:`aclose` or
    ``async with``. A ``session`` you pass in is borrowed: it is never closed here, and
    the cookies that Better Auth's responses set are removed from its cookie jar again
    right away, so one user's session cookie never rides along on a later call for
    another user. Cookies already in the jar, or set by other code, are still sent (a
    session cookie among them would be overridden by the bearer token, but only when the
    token is well formed), so prefer a session with ``aiohttp.DummyCookieJar()``.

    The constructor does no I/O. Methods are coroutines; none of them retries: errors
    say whether a retry can help (``retryable``).
    """

    def __init__(
        self,
        base_url: str,
        *,
        site_url: str | None = None,
        session: aiohttp.ClientSession | None = None,
        origin: str | bool = True,
        timeout: float = DEFAULT_TIMEOUT,
        connect_timeout: float = DEFAULT_CONNECT_TIMEOUT,
        allow_insecure: bool = False,
    ) -> None:
        self._base_url = normalize_base_url(
            base_url, name="base_url", allow_insecure=allow_insecure
        )
        self._site_url = (
            normalize_base_url(site_url, name="site_url", allow_insecure=allow_insecure)
            if site_url is not None
            else site_url_for(self._base_url)
        )
        self._site_host = urlsplit(self._site_url).hostname or ""
        self._origin: str | None
        if origin is True:
            # Better Auth checks Origin on cookie-carrying requests and always trusts its
            # own base URL, which is the site URL.
            self._origin = self._site_url
        elif origin is False:
            self._origin = None
        elif isinstance(origin, str):
            self._origin = normalize_base_url(origin, name="origin", allow_insecure=True)
        else:
            raise TypeError("origin must be True, False or an origin string")
        for name, value in (("timeout", timeout), ("connect_timeout", connect_timeout)):
            if isinstance(value, bool) or not isinstance(value, int | float) or not value > 0:
                raise ValueError(f"{name} must be a positive number of seconds")
        self._timeout = aiohttp.ClientTimeout(total=timeout, connect=connect_timeout)
        self._session = session
        self._owns_session = session is None
        self._closed = False

    @property
    def base_url(self) -> str:
        """The deployment URL, normalised to ``scheme://host[:port]``."""
        return self._base_url

    @property
    def site_url(self) -> str:
        """Where Better Auth answers: the ``.convex.site`` host, or the ``site_url`` given."""
        return self._site_url

    @property
    def origin(self) -> str | None:
        """The ``Origin`` header sent with each request, or None when none is sent."""
        return self._origin

    @property
    def closed(self) -> bool:
        """True once :meth:`aclose` was called; the client cannot be used again."""
        return self._closed

    def __repr__(self) -> str:
        state = " closed" if self._closed else ""
        return f"<BetterAuthClient site_url={self._site_url!r}{state}>"

    async def __aenter__(self) -> Self:
        if self._closed:
            raise ClientClosedError("this BetterAuthClient is closed")
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.aclose()

    async def aclose(self) -> None:
        """Close the aiohttp session if this client created it. Idempotent.

        A borrowed session stays open. Calls made afterwards raise ClientClosedError.
        """
        self._closed = True
        session, self._session = self._session, None
        if self._owns_session and session is not None:
            await session.close()

    # -- operations -----------------------------------------------------------------------

    async def sign_up(self, name: str, email: str, password: str) -> BetterAuthSession:
        """Create an account with email and password; return its new session.

        Raises UserAlreadyExistsError when the email is taken (Better Auth compares
        emails ignoring case), BetterAuthError with ``code`` ``PASSWORD_TOO_SHORT``,
        ``PASSWORD_TOO_LONG`` or ``VALIDATION_ERROR`` for input the server refuses.
        """
        response = await self._request(
            "POST",
            _SIGN_UP,
            body={"name": name, "email": email, "password": password},
            secrets=(password,),
        )
        self._raise_for_status(response)
        return await self._session_from_auth_response(response, fallback_email=email)

    async def sign_in(self, email: str, password: str) -> BetterAuthSession:
        """Sign in with email and password; return the new session.

        Raises InvalidCredentialsError for an unknown email or a wrong password (Better
        Auth does not say which).
        """
        response = await self._request(
            "POST", _SIGN_IN, body={"email": email, "password": password}, secrets=(password,)
        )
        self._raise_for_status(response)
        return await self._session_from_auth_response(response, fallback_email=email)

    async def sign_out(self, session_token: str) -> None:
        """Revoke the session on the server.

        Better Auth answers success for a session that is already gone, so this is
        idempotent. Convex JWTs issued before stay valid until they expire.
        """
        _check_token(session_token, "session_token")
        response = await self._request(
            "POST", _SIGN_OUT, body={}, bearer=session_token, secrets=(session_token,)
        )
        self._raise_for_status(response)
        self._raise_for_error_body(response, self._optional_json(response))

    async def get_session(self, session_token: str) -> BetterAuthSession | None:
        """The session behind a stored session token, with a fresh Convex JWT.

        Returns None when the server says the session is gone: signed out, expired,
        revoked, or never valid. Better Auth says so with ``200 null`` (or a body whose
        ``session`` is null); a 401 or 403 from ``/get-session`` (some proxies and
        versions) and a 401/403 from the follow-up ``/convex/token`` mean the same and
        also give None. So None is the one final "sign in again" answer of this method,
        where :meth:`convex_token` raises SessionExpiredError; anything else that goes
        wrong (network, timeout, 5xx, 429, a body of the wrong shape, among them an object
        with no ``session`` field at all) raises, and the session token should be kept
        for a retry.

        When the server rotates the token (``set-auth-token`` on the response, as on a
        sliding refresh), the returned ``session_token`` is the new one: persist it.
        """
        _check_token(session_token, "session_token")
        response = await self._request(
            "GET", _GET_SESSION, bearer=session_token, secrets=(session_token,)
        )
        if response.status in (401, 403):
            log.debug("get-session answered HTTP %d: the session is gone", response.status)
            return None
        self._raise_for_status(response)
        data = _decode_json(response)
        if data is None:
            return None
        if not isinstance(data, dict):
            raise _shape_error(response, "with JSON that is neither an object nor null")
        self._raise_for_error_body(response, data)
        if "session" not in data:
            # Not Better Auth's answer (a proxy's `{}`, an app's `{"message": ...}`): no
            # proof that the session is gone, so the caller must keep the token.
            raise _shape_error(response, "without a session field")
        session = data["session"]
        if session is None:
            return None
        if not isinstance(session, dict):
            raise _shape_error(response, "with a session that is not an object")
        user = data.get("user")
        if user is not None and not isinstance(user, dict):
            raise _shape_error(response, "with a user that is not an object")
        # A sliding refresh sends the token again (possibly in its signed form): prefer it.
        current = response.headers.get("set-auth-token", "").strip() or session_token
        jwt = cookie_value(response.set_cookies, CONVEX_JWT_COOKIE)
        if jwt is None:
            try:
                jwt = await self.convex_token(current)
            except SessionExpiredError:
                # Gone between the two calls: the same answer as a null session.
                return None
        return _build_session(user or {}, jwt, current, fallback_email="")

    async def convex_token(self, session_token: str) -> str:
        """A fresh Convex JWT for the session (``GET /api/auth/convex/token``).

        Raises SessionExpiredError for any 401 or 403, whatever code the body carries:
        the session is gone and only a new sign-in helps. A 200 without a non-empty
        string ``token`` raises BetterAuthResponseError: the session may well be alive,
        the answer is broken.
        """
        _check_token(session_token, "session_token")
        response = await self._request(
            "GET", _CONVEX_TOKEN, bearer=session_token, secrets=(session_token,)
        )
        if response.status in (401, 403):
            code, message = _error_fields(response)
            detail = _detail(code, message)
            raise SessionExpiredError(
                f"Better Auth {_CONVEX_TOKEN} answered HTTP {response.status}{detail}: "
                "the session is gone; sign in again",
                endpoint=_CONVEX_TOKEN,
                status=response.status,
                code=code,
                server_message=message,
            )
        self._raise_for_status(response)
        data = _json_object(response)
        self._raise_for_error_body(response, data)
        token = data.get("token")
        if not isinstance(token, str) or not token:
            problem = "without a token" if token in (None, "") else "with a token that is not text"
            raise _shape_error(response, problem)
        log.debug("got a Convex JWT %s", redact(token))
        return token

    async def forgot_password(self, email: str, redirect_to: str | None = None) -> None:
        """Ask Better Auth to email a password-reset link (``request-password-reset``).

        Succeeds whether or not the account exists, so it reveals nothing. ``redirect_to``
        is where the emailed link sends the browser with the token; it must be a trusted
        origin of the server (else BetterAuthError ``INVALID_REDIRECT_URL``, HTTP 403).
        """
        body: dict[str, Any] = {"email": email}
        if redirect_to is not None:
            body["redirectTo"] = redirect_to
        response = await self._request("POST", _REQUEST_RESET, body=body)
        self._raise_for_status(response)
        self._raise_for_error_body(response, self._optional_json(response))

    async def reset_password(self, token: str, new_password: str) -> None:
        """Set a new password with the token from the reset email.

        Raises InvalidTokenError for a bogus, expired or already used token. Sessions
        that exist stay valid unless the server revokes them on reset.
        """
        _check_token(token, "token")
        response = await self._request(
            "POST",
            _RESET_PASSWORD,
            body={"token": token, "newPassword": new_password},
            secrets=(token, new_password),
        )
        self._raise_for_status(response)
        self._raise_for_error_body(response, self._optional_json(response))

    async def send_magic_link(self, email: str, callback_url: str | None = None) -> None:
        """Email a sign-in link (``sign-in/magic-link``); needs the magicLink() plugin.

        ``callback_url`` goes into the emailed link; it must be a trusted origin or a
        relative path (else BetterAuthError ``INVALID_CALLBACK_URL``, HTTP 403). The link
        creates the account when none exists.
        """
        body: dict[str, Any] = {"email": email}
        if callback_url is not None:
            body["callbackURL"] = callback_url
        response = await self._request("POST", _MAGIC_LINK, body=body)
        self._raise_for_status(response)
        self._raise_for_error_body(response, self._optional_json(response))

    async def verify_magic_link(self, token: str) -> BetterAuthSession:
        """Sign in with the token from a magic-link email; return the new session.

        Only the token is sent, so Better Auth answers JSON. Redirects are never followed:
        a redirect that carries the session (``set-auth-token`` or the session cookie) is
        a success, and Better Auth's error redirect (``Location: …?error=INVALID_TOKEN``,
        for a bogus, expired or used token) raises InvalidTokenError; another ``error``
        raises BetterAuthError with that code.

        Beware: verifying a link for an existing user whose email is not verified makes
        Better Auth delete that user's password and every session first (it cannot tell
        who set the password). Password sign-in fails afterwards.
        """
        _check_token(token, "token")
        response = await self._request(
            "GET", _VERIFY_MAGIC_LINK, params={"token": token}, secrets=(token,)
        )
        if 300 <= response.status < 400:
            location = response.headers.get("Location", "")
            error = parse_qs(urlsplit(location).query).get("error", [""])[0]
            if error:
                cls = _CODE_TO_ERROR.get(error, BetterAuthError)
                # The Location is the server's text: it must not echo the token back.
                code = _scrub(error, response.secrets, min_length=1)
                raise cls(
                    f"Better Auth {_VERIFY_MAGIC_LINK} refused the token: it redirected "
                    f"(HTTP {response.status}) with error={code}",
                    endpoint=_VERIFY_MAGIC_LINK,
                    status=response.status,
                    code=code,
                    retryable=False,
                )
            return await self._session_from_auth_response(
                response, fallback_email="", redirected=True
            )
        self._raise_for_status(response)
        return await self._session_from_auth_response(response, fallback_email="")

    # -- plumbing -------------------------------------------------------------------------

    def _http(self) -> aiohttp.ClientSession:
        if self._closed:
            raise ClientClosedError("this BetterAuthClient is closed")
        if self._session is None:
            # Auth travels in headers; a real cookie jar would carry one user's session
            # cookie into the next user's calls.
            self._session = aiohttp.ClientSession(
                cookie_jar=aiohttp.DummyCookieJar(),
                headers={"User-Agent": f"dartvex-auth-better/{__version__}"},
                **_HEADER_LIMITS,
            )
        elif self._session.closed:
            raise ClientClosedError("the aiohttp session given to BetterAuthClient is closed")
        return self._session

    async def _request(
        self,
        method: str,
        endpoint: str,
        *,
        body: Mapping[str, Any] | None = None,
        bearer: str | None = None,
        params: Mapping[str, str] | None = None,
        secrets: Sequence[str] = (),
    ) -> _Response:
        http = self._http()
        headers = {"Accept": "application/json"}
        if self._origin is not None:
            headers["Origin"] = self._origin
        if bearer is not None:
            headers["Authorization"] = f"Bearer {bearer}"
        payload = None
        if body is not None:
            headers["Content-Type"] = "application/json"
            payload = msgspec.json.encode(body)
        started = time.perf_counter()
        failure: str | None = None  # what went wrong, when no response came
        unreadable: str | None = None  # what was wrong with an answer aiohttp could not parse
        timed_out = connecting = False
        try:
            async with http.request(
                method,
                self._site_url + endpoint,
                data=payload,
                headers=headers,
                params=params,
                allow_redirects=False,
                raise_for_status=False,
                timeout=self._timeout,
            ) as resp:
                set_cookies = tuple(resp.headers.getall("Set-Cookie", ()))
                if not self._owns_session:
                    # aiohttp stored them before handing us the response, and nothing
                    # has awaited since: no other call can have sent them yet.
                    self._forget_cookies(http.cookie_jar, set_cookies)
                content = await resp.read()
                response = _Response(
                    endpoint, resp.status, resp.headers, set_cookies, content, tuple(secrets)
                )
        except TimeoutError as exc:
            failure, timed_out, connecting = "timed out", True, _is_connect_timeout(exc)
        except aiohttp.ClientHttpProxyError as exc:
            failure = f"{type(exc).__name__}: the proxy answered HTTP {exc.status}"
        except aiohttp.ClientResponseError as exc:
            # With redirects off and raise_for_status=False, this is aiohttp failing to
            # parse the status line or headers. Its text quotes the offending line (a
            # Set-Cookie: a JWT, a session token), so only the exception's type is used.
            unreadable = self._unreadable(exc)
        except (aiohttp.ClientError, OSError) as exc:
            # aiohttp's text can include the URL, and a magic-link URL carries a token.
            failure = _scrub(_describe(exc), secrets, min_length=1)
        if failure is not None:
            # Raised here, outside the except blocks, so that aiohttp's exception is not
            # kept as __context__: its request_info holds the Authorization header.
            elapsed = (time.perf_counter() - started) * 1000
            log.debug("%s %s failed after %.0f ms: %s", method, endpoint, elapsed, failure)
            if self._closed:
                raise ClientClosedError(f"the BetterAuthClient was closed during {endpoint}")
            if connecting:
                raise RequestTimeoutError(
                    f"could not connect to Better Auth at {self._site_url} for {endpoint} "
                    f"within connect_timeout ({self._timeout.connect:g} s)"
                )
            if timed_out:
                raise RequestTimeoutError(
                    f"Better Auth {endpoint} did not answer within the timeout "
                    f"({self._timeout.total:g} s, connect {self._timeout.connect:g} s)"
                )
            raise TransportError(
                f"could not reach Better Auth at {self._site_url} for {endpoint}: {failure}"
            )
        if unreadable is not None:
            log.debug("%s %s: the answer could not be read: %s", method, endpoint, unreadable)
            if self._closed:
                raise ClientClosedError(f"the BetterAuthClient was closed during {endpoint}")
            raise BetterAuthResponseError(
                f"Better Auth {endpoint} answered with a response the client could not read: "
                f"{unreadable}. The server did answer, so the request may have taken effect",
                endpoint=endpoint,
                status=None,
                retryable=False,
            )
        log.debug(
            "%s %s -> HTTP %d in %.0f ms",
            method,
            endpoint,
            response.status,
            (time.perf_counter() - started) * 1000,
        )
        return response

    def _unreadable(self, exc: aiohttp.ClientResponseError) -> str:
        """What was wrong with an answer aiohttp could not parse, without quoting it."""
        # aiohttp re-raises the parser's error (LineTooLong, BadStatusLine...) as a plain
        # HttpProcessingError, chained to it, under its ClientResponseError: the most
        # specific one is the deepest in the __cause__ chain.
        cause: BaseException | None = None
        link: BaseException | None = exc.__cause__
        for _ in range(8):
            if link is None:
                break
            if isinstance(link, HttpProcessingError):
                cause = link
            link = link.__cause__
        kind = type(cause).__name__ if cause is not None else type(exc).__name__
        if isinstance(cause, LineTooLong):
            if self._owns_session and _HEADER_LIMITS:
                limit = f"the {MAX_HEADER_LINE}-byte limit"
            elif self._owns_session:
                limit = "aiohttp's limit (this aiohttp version cannot raise it)"
            else:
                limit = (
                    "the limit of the aiohttp session passed in (create it with larger "
                    "max_line_size= and max_field_size=)"
                )
            return f"a status or header line over {limit} ({kind})"
        return f"a malformed status line or header ({kind})"

    def _forget_cookies(self, jar: AbstractCookieJar, set_cookies: Sequence[str]) -> None:
        names = cookie_names(set_cookies)
        if not names:
            return
        host = self._site_host

        def set_by_this_response(morsel: Morsel[str]) -> bool:
            domain = morsel["domain"]
            return morsel.key in names and (host == domain or host.endswith("." + domain))

        jar.clear(set_by_this_response)

    def _raise_for_status(self, response: _Response) -> None:
        if not 200 <= response.status < 300:
            raise _status_error(response, self._site_url)

    def _raise_for_error_body(self, response: _Response, data: Any) -> None:
        # Some Better Auth setups answer 200 with an error object; a non-empty string
        # `code` marks one. An informational `message` or `error` alone does not.
        if isinstance(data, dict):
            code = data.get("code")
            if isinstance(code, str) and code:
                raise _status_error(response, self._site_url)

    @staticmethod
    def _optional_json(response: _Response) -> Any:
        """The JSON of a body whose content the caller does not need; None when empty."""
        return _decode_json(response) if response.body.strip() else None

    async def _session_from_auth_response(
        self, response: _Response, *, fallback_email: str, redirected: bool = False
    ) -> BetterAuthSession:
        if redirected:
            # A redirect's body is for a browser; the session travels in the headers.
            data: dict[str, Any] = {}
        else:
            data = _json_object(response)
            self._raise_for_error_body(response, data)
        token = data.get("token")
        if token is not None and not isinstance(token, str):
            raise _shape_error(response, "with a token that is not text")
        user = data.get("user")
        if user is not None and not isinstance(user, dict):
            raise _shape_error(response, "with a user that is not an object")
        session_token = find_session_token(response.headers, data, response.set_cookies)
        if session_token is None:
            answer = f"a redirect (HTTP {response.status})" if redirected else "its answer"
            raise BetterAuthResponseError(
                f"Better Auth {response.endpoint}: {answer} {_NO_SESSION_TOKEN_HINT}",
                endpoint=response.endpoint,
                status=response.status,
                retryable=False,
            )
        jwt = cookie_value(response.set_cookies, CONVEX_JWT_COOKIE)
        if jwt is None:
            jwt = await self.convex_token(session_token)
        log.debug("signed in via %s (session %s)", response.endpoint, redact(session_token))
        return _build_session(user or {}, jwt, session_token, fallback_email=fallback_email)


def _check_token(value: object, name: str) -> None:
    # Checked here so that a bad value fails clearly, and never inside aiohttp, whose
    # header validation error would quote the value.
    if not isinstance(value, str) or not value:
        raise ValueError(f"{name} must be a non-empty string")
    if any(c.isspace() or ord(c) < 32 or ord(c) == 127 for c in value):
        raise ValueError(f"{name} must not contain whitespace or control characters")


def _build_session(
    user: Mapping[str, Any], jwt: str, session_token: str, *, fallback_email: str
) -> BetterAuthSession:
    # The body's user record comes first. When it is missing or malformed (a redirect, a
    # `{"status": true}` body), the JWT that the same server just issued for this session
    # names the user: `sub` is the user id, and the convex plugin adds email and name.
    claims = token_claims(jwt) or {}

    def pick(key: str, claim: str) -> str | None:
        for value in (user.get(key), claims.get(claim)):
            if isinstance(value, str) and value:
                return value
        return None

    name = user.get("name")
    if not isinstance(name, str):
        name = claims.get("name")
    return BetterAuthSession(
        token=jwt,
        session_token=session_token,
        user_id=pick("id", "sub") or "",
        email=pick("email", "email") or fallback_email,
        name=name if isinstance(name, str) else None,
    )


def _scrub(text: str, secrets: Sequence[str], *, min_length: int = _MIN_SCRUBBED_SECRET) -> str:
    for secret in secrets:
        if secret and len(secret) >= min_length:
            text = text.replace(secret, "<redacted>")
            text = text.replace(quote(secret, safe=""), "<redacted>")
    return text


def _is_connect_timeout(exc: BaseException) -> bool:
    """Whether aiohttp gave up connecting (``connect_timeout``), not waiting for an answer."""
    connection_timeout = getattr(aiohttp, "ConnectionTimeoutError", None)  # aiohttp >= 3.10
    if isinstance(connection_timeout, type):
        return isinstance(exc, connection_timeout)
    # aiohttp 3.9 raises the base class for both, told apart by the text.
    return isinstance(exc, aiohttp.ServerTimeoutError) and str(exc).startswith("Connection timeout")


def _describe(exc: BaseException) -> str:
    text = str(exc).strip()
    return f"{type(exc).__name__}: {text}" if text else type(exc).__name__


def _decode_json(response: _Response) -> Any:
    try:
        return msgspec.json.decode(response.body)
    except JSON_ERRORS:
        raise _shape_error(response, f"with {_body_kind(response)}") from None


def _json_object(response: _Response) -> dict[str, Any]:
    data = _decode_json(response)
    if not isinstance(data, dict):
        kind = "an array" if isinstance(data, list) else type(data).__name__
        raise _shape_error(response, f"with JSON that is not an object ({kind})")
    return data


def _body_kind(response: _Response) -> str:
    if not response.body.strip():
        return "an empty body"
    return f"a body that is not JSON (content-type {response.content_type})"


def _shape_error(response: _Response, problem: str) -> BetterAuthResponseError:
    return BetterAuthResponseError(
        f"Better Auth {response.endpoint} answered HTTP {response.status} {problem}",
        endpoint=response.endpoint,
        status=response.status,
        retryable=False,
    )


def _error_fields(response: _Response) -> tuple[str | None, str | None]:
    """Better Auth's ``code`` and ``message`` (or ``error``) from a JSON error body."""
    try:
        data = msgspec.json.decode(response.body)
    except JSON_ERRORS:
        return None, None
    if not isinstance(data, dict):
        return None, None
    code = data.get("code")
    message = data.get("message")
    if not isinstance(message, str) or not message:
        error = data.get("error")
        message = error if isinstance(error, str) and error else None
    if message is not None:
        message = _scrub(message, response.secrets)
    if isinstance(code, str) and code:
        return _scrub(code, response.secrets), message
    return None, message


def _detail(code: str | None, message: str | None) -> str:
    if message and code:
        return f": {message} ({code})"
    if message or code:
        return f": {message or code}"
    return ""


def _status_error(response: _Response, site_url: str) -> BetterAuthError:
    """The error for a response that is not a success (or a 2xx carrying a ``code``)."""
    status = response.status
    if status == 429:
        return _rate_limited(response)
    code, message = _error_fields(response)
    detail = _detail(code, message)
    if not detail:
        if response.body.strip() and not _is_json(response):
            detail = f" and {_body_kind(response)}, perhaps from a proxy"
        elif response.body.strip():
            detail = " and a JSON body without an error message"
    if 300 <= status < 400:
        # Only verify is expected to redirect; elsewhere a redirect means a wrong URL
        # (http to https, a missing trailing host). Show where to, without the query, and
        # without what the request carried: a path like /reset/<token> is common.
        target = urlsplit(response.headers.get("Location", ""))
        where = f"{target.scheme}://{target.netloc}{target.path}" if target.netloc else "?"
        where = _scrub(where, response.secrets, min_length=1)
        detail += f"; it redirects to {where}, check site_url"
    elif status == 404 and code is None:
        needs = _ROUTE_NEEDS.get(response.endpoint, "")
        detail += (
            f": the route was not found at {site_url}. Check that this is the Better Auth "
            "server (on Convex, the .convex.site host; a local Convex backend serves HTTP "
            "actions on port 3211, so pass site_url='http://127.0.0.1:3211')"
            + (f" and that {needs}" if needs else "")
        )
    elif code is not None and code in _CODE_HINTS:
        detail += f"; {_CODE_HINTS[code]}"
    cls = _CODE_TO_ERROR.get(code or "", BetterAuthError)
    return cls(
        f"Better Auth {response.endpoint} failed with HTTP {status}{detail}",
        endpoint=response.endpoint,
        status=status,
        code=code,
        server_message=message,
        # A 2xx with an error code is the server's considered answer, not a glitch.
        retryable=status >= 500,
    )


def _is_json(response: _Response) -> bool:
    try:
        msgspec.json.decode(response.body)
    except JSON_ERRORS:
        return False
    return True


def _rate_limited(response: _Response) -> RateLimitedError:
    code, message = _error_fields(response)
    retry_after = _parse_retry_after(
        response.headers.get("Retry-After") or response.headers.get("X-Retry-After")
    )
    wait = f"; retry after {retry_after:g} s" if retry_after is not None else ""
    return RateLimitedError(
        f"Better Auth {response.endpoint} is rate limited (HTTP 429){wait}",
        retry_after=retry_after,
        endpoint=response.endpoint,
        code=code,
        server_message=message,
    )


def _parse_retry_after(value: str | None) -> float | None:
    """Seconds to wait from a Retry-After value: delta-seconds or an HTTP date."""
    if not value:
        return None
    value = value.strip()
    try:
        seconds = float(value)
    except ValueError:
        try:
            when = email.utils.parsedate_to_datetime(value)
        except (TypeError, ValueError, IndexError):
            return None
        if when.tzinfo is None:  # RFC 9110 dates are GMT; a naive one cannot be compared
            return None
        seconds = when.timestamp() - time.time()
    if not math.isfinite(seconds):
        return None
    return max(0.0, seconds)
