"""BetterAuthClient: coroutines over Better Auth's HTTP API and the Convex JWT endpoint."""

from __future__ import annotations

import email.utils
import time
from collections.abc import Mapping
from dataclasses import dataclass
from types import TracebackType
from typing import Any, Final, Self
from urllib.parse import parse_qs, urlsplit

import aiohttp
import msgspec

from .._errors import (
    BetterAuthError,
    BetterAuthResponseError,
    InvalidCredentialsError,
    InvalidTokenError,
    RateLimitedError,
    RequestTimeoutError,
    SessionExpiredError,
    TransportError,
    UserAlreadyExistsError,
)
from .._logging import better_auth_logger as log
from .._logging import redact
from .._urls import normalize_base_url, site_url_for
from ._session import BetterAuthSession
from ._tokens import CONVEX_JWT_COOKIE, cookie_value, find_session_token

__all__ = ["BetterAuthClient"]

_SIGN_UP = "/api/auth/sign-up/email"
_SIGN_IN = "/api/auth/sign-in/email"
_SIGN_OUT = "/api/auth/sign-out"
_GET_SESSION = "/api/auth/get-session"
_CONVEX_TOKEN = "/api/auth/convex/token"
_REQUEST_RESET = "/api/auth/request-password-reset"
_RESET_PASSWORD = "/api/auth/reset-password"
_MAGIC_LINK = "/api/auth/sign-in/magic-link"
_VERIFY_MAGIC_LINK = "/api/auth/magic-link/verify"

_DEFAULT_ORIGIN: Final = object()
_NO_SESSION_TOKEN_HINT = (
    "no session token in the response: the Better Auth server needs the bearer() plugin, "
    "and a proxy or CORS setup must pass the set-auth-token header through "
    "(Access-Control-Expose-Headers: set-auth-token); the client also looked for a JSON "
    "token field and a session Set-Cookie"
)


@dataclass(slots=True)
class _Response:
    endpoint: str
    status: int
    headers: Mapping[str, str]
    set_cookies: list[str]
    body: bytes

    def json(self) -> Any:
        """The body as JSON; raises BetterAuthResponseError when it is not JSON."""
        try:
            return msgspec.json.decode(self.body)
        except msgspec.DecodeError:
            kind = "an empty body" if not self.body.strip() else "a body that is not JSON"
            raise BetterAuthResponseError(
                f"Better Auth {self.endpoint} answered HTTP {self.status} with {kind}",
                endpoint=self.endpoint,
                status=self.status,
                retryable=False,
            ) from None

    def json_object(self) -> dict[str, Any]:
        data = self.json()
        if not isinstance(data, dict):
            raise BetterAuthResponseError(
                f"Better Auth {self.endpoint} answered HTTP {self.status} with JSON that is "
                f"not an object ({type(data).__name__})",
                endpoint=self.endpoint,
                status=self.status,
                retryable=False,
            )
        return data


class BetterAuthClient:
    """HTTP client for a Better Auth server running on a Convex deployment.

    ``base_url`` is the deployment URL (``https://happy-otter-123.convex.cloud``; auth
    calls go to its ``.convex.site`` host) or, for self-hosted and local setups, pass
    ``site_url`` for where Better Auth answers. One aiohttp session serves every call; a
    session you pass in is borrowed and never closed (give it a ``DummyCookieJar``: this
    client carries auth in headers, and a shared cookie jar would mix users).
    """

    def __init__(
        self,
        base_url: str,
        *,
        site_url: str | None = None,
        session: aiohttp.ClientSession | None = None,
        origin: str | object | None = _DEFAULT_ORIGIN,
        timeout: float = 30.0,
        connect_timeout: float = 10.0,
        allow_insecure: bool = False,
    ) -> None:
        self.base_url = normalize_base_url(base_url, name="base_url", allow_insecure=allow_insecure)
        self.site_url = (
            normalize_base_url(site_url, name="site_url", allow_insecure=allow_insecure)
            if site_url is not None
            else site_url_for(self.base_url)
        )
        # Better Auth checks Origin on cookie-carrying requests; a non-browser client has
        # none unless we send one, so send the auth server's own origin by default.
        self.origin: str | None = self.site_url if origin is _DEFAULT_ORIGIN else origin  # type: ignore[assignment]
        self._session = session
        self._owns_session = session is None
        self._timeout = aiohttp.ClientTimeout(total=timeout, connect=connect_timeout)
        self._closed = False

    def __repr__(self) -> str:
        return f"BetterAuthClient(site_url={self.site_url!r})"

    async def __aenter__(self) -> Self:
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.aclose()

    async def aclose(self) -> None:
        """Close the aiohttp session if this client created it. Idempotent."""
        self._closed = True
        if self._owns_session and self._session is not None:
            session, self._session = self._session, None
            await session.close()

    # -- operations -----------------------------------------------------------------------

    async def sign_up(self, name: str, email: str, password: str) -> BetterAuthSession:
        """Create an account with email and password and sign it in."""
        response = await self._post(_SIGN_UP, {"name": name, "email": email, "password": password})
        return await self._session_from_auth_response(response, fallback_email=email)

    async def sign_in(self, email: str, password: str) -> BetterAuthSession:
        """Sign in with email and password."""
        response = await self._post(_SIGN_IN, {"email": email, "password": password})
        return await self._session_from_auth_response(response, fallback_email=email)

    async def sign_out(self, session_token: str) -> None:
        """Revoke the session. Convex JWTs already issued stay valid until they expire."""
        await self._post(_SIGN_OUT, {}, bearer=session_token)

    async def get_session(self, session_token: str) -> BetterAuthSession | None:
        """The session behind a stored session token with a fresh Convex JWT, or None when
        the session is gone (signed out, expired, revoked)."""
        response = await self._send("GET", _GET_SESSION, bearer=session_token)
        if response.status in (401, 403):
            return None
        self._raise_for_status(response)
        data = response.json()
        if data is None:
            return None
        if not isinstance(data, dict):
            raise BetterAuthResponseError(
                f"Better Auth {_GET_SESSION} answered HTTP {response.status} with JSON that "
                "is neither an object nor null",
                endpoint=_GET_SESSION,
                status=response.status,
                retryable=False,
            )
        user = data.get("user")
        if not isinstance(data.get("session"), dict) or not isinstance(user, dict):
            return None
        # A sliding refresh may hand back the token again; prefer what the server sent.
        current = response.headers.get("set-auth-token", "").strip() or session_token
        jwt = cookie_value(response.set_cookies, CONVEX_JWT_COOKIE)
        if jwt is None:
            try:
                jwt = await self.convex_token(current)
            except SessionExpiredError:
                return None
        return _session_from_user(user, jwt, current, fallback_email="")

    async def convex_token(self, session_token: str) -> str:
        """A fresh Convex JWT for the session. SessionExpiredError when the session is gone."""
        response = await self._send("GET", _CONVEX_TOKEN, bearer=session_token)
        if response.status in (401, 403):
            raise _error_for(response, SessionExpiredError)
        self._raise_for_status(response)
        data = response.json_object()
        token = data.get("token")
        if not isinstance(token, str) or not token:
            raise BetterAuthResponseError(
                f"Better Auth {_CONVEX_TOKEN} answered HTTP {response.status} without a "
                "token string",
                endpoint=_CONVEX_TOKEN,
                status=response.status,
                retryable=False,
            )
        log.debug("got a Convex JWT (%s)", redact(token))
        return token

    async def forgot_password(self, email: str, redirect_to: str | None = None) -> None:
        """Ask Better Auth to email a password-reset link (sent whether or not the user
        exists, so this does not reveal accounts)."""
        body: dict[str, Any] = {"email": email}
        if redirect_to is not None:
            body["redirectTo"] = redirect_to
        await self._post(_REQUEST_RESET, body)

    async def reset_password(self, token: str, new_password: str) -> None:
        """Set a new password with the token from the reset email."""
        await self._post(_RESET_PASSWORD, {"token": token, "newPassword": new_password})

    async def send_magic_link(self, email: str, callback_url: str | None = None) -> None:
        """Email a sign-in link."""
        body: dict[str, Any] = {"email": email}
        if callback_url is not None:
            body["callbackURL"] = callback_url
        await self._post(_MAGIC_LINK, body)

    async def verify_magic_link(self, token: str) -> BetterAuthSession:
        """Sign in with the token from a magic-link email.

        Redirects are never followed: Better Auth answers errors with a redirect to
        ``?error=INVALID_TOKEN``, which becomes InvalidTokenError here.
        """
        response = await self._send("GET", _VERIFY_MAGIC_LINK, params={"token": token})
        if 300 <= response.status < 400:
            location = response.headers.get("location", "")
            error = parse_qs(urlsplit(location).query).get("error", [None])[0]
            if error is not None:
                cls = InvalidTokenError if error == "INVALID_TOKEN" else BetterAuthError
                raise cls(
                    f"Better Auth {_VERIFY_MAGIC_LINK} refused the token ({error})",
                    endpoint=_VERIFY_MAGIC_LINK,
                    status=response.status,
                    code=error,
                )
            return await self._session_from_auth_response(response, fallback_email="")
        self._raise_for_status(response)
        return await self._session_from_auth_response(response, fallback_email="")

    # -- plumbing -------------------------------------------------------------------------

    def _get_session(self) -> aiohttp.ClientSession:
        if self._closed:
            raise RuntimeError("this BetterAuthClient is closed")
        if self._session is None:
            # Auth travels in headers; a real cookie jar would leak one user's session
            # cookie into the next user's calls.
            self._session = aiohttp.ClientSession(cookie_jar=aiohttp.DummyCookieJar())
        return self._session

    async def _post(
        self, endpoint: str, body: Mapping[str, Any], *, bearer: str | None = None
    ) -> _Response:
        response = await self._send("POST", endpoint, json=body, bearer=bearer)
        self._raise_for_status(response)
        if response.body.strip():
            data = response.json()
            # Some Better Auth setups answer 200 with an error object; a non-empty string
            # `code` marks one.
            if isinstance(data, dict) and isinstance(data.get("code"), str) and data["code"]:
                raise _error_for(response, BetterAuthError)
        return response

    async def _send(
        self,
        method: str,
        endpoint: str,
        *,
        json: Mapping[str, Any] | None = None,
        bearer: str | None = None,
        params: Mapping[str, str] | None = None,
    ) -> _Response:
        headers = {"Accept": "application/json"}
        if self.origin:
            headers["Origin"] = self.origin
        if bearer is not None:
            headers["Authorization"] = f"Bearer {bearer}"
        data = None
        if json is not None:
            headers["Content-Type"] = "application/json"
            data = msgspec.json.encode(json)
        session = self._get_session()
        started = time.perf_counter()
        try:
            async with session.request(
                method,
                self.site_url + endpoint,
                data=data,
                headers=headers,
                params=params,
                allow_redirects=False,
                timeout=self._timeout,
            ) as resp:
                body = await resp.read()
                response = _Response(
                    endpoint,
                    resp.status,
                    resp.headers,
                    resp.headers.getall("Set-Cookie", []),
                    body,
                )
        except TimeoutError:
            raise RequestTimeoutError(f"Better Auth {endpoint} did not answer in time") from None
        except (aiohttp.ClientError, OSError) as exc:
            # The exception text can include the URL, and a magic-link URL carries a token.
            raise TransportError(
                f"could not reach Better Auth for {endpoint}: {type(exc).__name__}"
            ) from None
        log.debug(
            "%s %s -> %d in %.1f ms",
            method,
            endpoint,
            response.status,
            (time.perf_counter() - started) * 1000,
        )
        return response

    def _raise_for_status(self, response: _Response) -> None:
        if 200 <= response.status < 300:
            return
        if response.status == 429:
            raise _rate_limited(response)
        raise _error_for(response, BetterAuthError)

    async def _session_from_auth_response(
        self, response: _Response, *, fallback_email: str
    ) -> BetterAuthSession:
        body = response.json_object() if response.body.strip() else {}
        session_token = find_session_token(response.headers, body, response.set_cookies)
        if session_token is None:
            raise BetterAuthResponseError(
                f"Better Auth {response.endpoint}: {_NO_SESSION_TOKEN_HINT}",
                endpoint=response.endpoint,
                status=response.status,
                retryable=False,
            )
        user = body.get("user")
        if user is not None and not isinstance(user, dict):
            raise BetterAuthResponseError(
                f"Better Auth {response.endpoint} answered with a user that is not an object",
                endpoint=response.endpoint,
                status=response.status,
                retryable=False,
            )
        jwt = cookie_value(response.set_cookies, CONVEX_JWT_COOKIE)
        if jwt is None:
            jwt = await self.convex_token(session_token)
        log.debug("signed in via %s (session %s)", response.endpoint, redact(session_token))
        return _session_from_user(user or {}, jwt, session_token, fallback_email=fallback_email)


def _session_from_user(
    user: Mapping[str, Any], jwt: str, session_token: str, *, fallback_email: str
) -> BetterAuthSession:
    user_id = user.get("id")
    email_value = user.get("email")
    name = user.get("name")
    return BetterAuthSession(
        token=jwt,
        session_token=session_token,
        user_id=user_id if isinstance(user_id, str) else "",
        email=email_value if isinstance(email_value, str) and email_value else fallback_email,
        name=name if isinstance(name, str) else None,
    )


def _error_fields(response: _Response) -> tuple[str | None, str | None]:
    try:
        data = msgspec.json.decode(response.body)
    except msgspec.DecodeError:
        return None, None
    if not isinstance(data, dict):
        return None, None
    code = data.get("code")
    message = data.get("message")
    error = data.get("error")
    if not isinstance(message, str) or not message:
        message = error if isinstance(error, str) and error else None
    return (code if isinstance(code, str) and code else None), message


_CODE_TO_ERROR: dict[str, type[BetterAuthError]] = {
    "INVALID_EMAIL_OR_PASSWORD": InvalidCredentialsError,
    "USER_ALREADY_EXISTS": UserAlreadyExistsError,
    "USER_ALREADY_EXISTS_USE_ANOTHER_EMAIL": UserAlreadyExistsError,
    "INVALID_TOKEN": InvalidTokenError,
}


def _error_for(response: _Response, default: type[BetterAuthError]) -> BetterAuthError:
    code, message = _error_fields(response)
    cls = _CODE_TO_ERROR.get(code or "", default)
    detail = f": {message}" if message else ""
    if code:
        detail += f" ({code})"
    if not message and not code:
        detail = ": the body is not a Better Auth error object" if response.body.strip() else ""
    return cls(
        f"Better Auth {response.endpoint} failed with HTTP {response.status}{detail}",
        endpoint=response.endpoint,
        status=response.status,
        code=code,
        server_message=message,
    )


def _rate_limited(response: _Response) -> RateLimitedError:
    code, message = _error_fields(response)
    retry_after = _parse_retry_after(
        response.headers.get("retry-after") or response.headers.get("x-retry-after")
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
    if not value:
        return None
    value = value.strip()
    try:
        seconds = float(value)
    except ValueError:
        try:
            when = email.utils.parsedate_to_datetime(value)
        except (TypeError, ValueError):
            return None
        seconds = when.timestamp() - time.time()
    return max(0.0, seconds)
