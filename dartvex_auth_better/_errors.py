"""Every exception the SDK raises, in one tree.

::

    DartvexError                    base class; every error has ``.retryable``
    ├── TransportError              could not talk to a server (refused, reset, DNS, TLS)
    │   │                           retryable=True
    │   └── RequestTimeoutError     no answer in time; also a builtin ``TimeoutError``
    ├── ProtocolError               a server answered with something we cannot use:
    │   │                           non-JSON, wrong shape, a broken sync-protocol frame
    │   ├── BetterAuthResponseError   ... from a Better Auth endpoint (also BetterAuthError)
    │   └── ConvexHttpResponseError   ... from the Convex HTTP API (also ConvexHttpError)
    ├── BetterAuthError             Better Auth answered with an error (status, code, message)
    │   │                           retryable=True for 5xx and 429
    │   ├── RateLimitedError        429; ``.retry_after`` seconds when the server says
    │   ├── InvalidCredentialsError wrong email or password (INVALID_EMAIL_OR_PASSWORD)
    │   ├── UserAlreadyExistsError  sign-up with an email that is taken
    │   ├── InvalidTokenError       a reset or magic-link token that is bogus or used up
    │   ├── SessionExpiredError     the session is gone (401/403 from the Convex token
    │   │                           endpoint, or the token source says so): final, sign in
    │   │                           again
    │   └── BetterAuthResponseError (see ProtocolError)
    ├── ConvexError                 a Convex function failed; ``.data`` carries the
    │                               ConvexError payload thrown by the function, if any
    ├── ConvexHttpError             the Convex HTTP API answered without a function result:
    │   │                           an error status (path, status, code, message);
    │   │                           retryable=True for 5xx (except 560) and 429
    │   └── ConvexHttpResponseError (see ProtocolError)
    ├── AuthRejectedError           the Convex server refused the auth token
    ├── NoSessionError              there is no session to restore or use: nothing was
    │                               persisted, or it was forgotten; sign in first
    ├── SessionStoreError           a session store cannot read, write or delete: an I/O
    │                               error, keyring not installed or without a backend
    ├── ConnectionLostError         the socket dropped while an action was in flight; the
    │                               action may or may not have run. retryable=True
    ├── ServerFatalError            the sync server sent FatalError; the client stops
    ├── LoginSupersededError        a login was overtaken by a newer login or a logout
    └── ClientClosedError           the client was closed while the call was pending

Messages never contain passwords, session tokens or JWTs.
"""

from __future__ import annotations

from typing import Any

__all__ = [
    "AuthRejectedError",
    "BetterAuthError",
    "BetterAuthResponseError",
    "ClientClosedError",
    "ConnectionLostError",
    "ConvexError",
    "ConvexHttpError",
    "ConvexHttpResponseError",
    "DartvexError",
    "InvalidCredentialsError",
    "InvalidTokenError",
    "LoginSupersededError",
    "NoSessionError",
    "ProtocolError",
    "RateLimitedError",
    "RequestTimeoutError",
    "ServerFatalError",
    "SessionExpiredError",
    "SessionStoreError",
    "TransportError",
    "UserAlreadyExistsError",
]


class DartvexError(Exception):
    """Base class of every error the SDK raises."""

    retryable: bool = False

    def __init__(self, message: str, *, retryable: bool | None = None) -> None:
        super().__init__(message)
        self.message = message
        if retryable is not None:
            self.retryable = retryable

    def __str__(self) -> str:
        return self.message

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.message!r}, retryable={self.retryable})"


class TransportError(DartvexError):
    """The server could not be reached, or the connection broke mid-request."""

    retryable = True


class RequestTimeoutError(TransportError, TimeoutError):
    """The server did not answer within the configured timeout."""


class ProtocolError(DartvexError):
    """A server sent a response or frame that does not follow the protocol."""


class BetterAuthError(DartvexError):
    """Better Auth answered a request with an error.

    ``endpoint`` is the path that was called (``/api/auth/sign-in/email``), ``status`` the
    HTTP status, and ``code``/``server_message`` what Better Auth put in its JSON error
    body, when it sent one.
    """

    def __init__(
        self,
        message: str,
        *,
        endpoint: str | None = None,
        status: int | None = None,
        code: str | None = None,
        server_message: str | None = None,
        retryable: bool | None = None,
    ) -> None:
        if retryable is None:
            retryable = status is not None and (status >= 500 or status == 429)
        super().__init__(message, retryable=retryable)
        self.endpoint = endpoint
        self.status = status
        self.code = code
        self.server_message = server_message


class RateLimitedError(BetterAuthError):
    """HTTP 429. ``retry_after`` is the delay in seconds the server asked for, if any."""

    retryable = True

    def __init__(self, message: str, *, retry_after: float | None = None, **kw: Any) -> None:
        kw.setdefault("status", 429)
        super().__init__(message, retryable=True, **kw)
        self.retry_after = retry_after


class InvalidCredentialsError(BetterAuthError):
    """Sign-in was refused: unknown email or wrong password."""


class UserAlreadyExistsError(BetterAuthError):
    """Sign-up was refused: a user with that email already exists."""


class InvalidTokenError(BetterAuthError):
    """A password-reset or magic-link token was bogus, expired or already used."""


class SessionExpiredError(BetterAuthError):
    """The Better Auth session is gone: a 401/403 from the Convex token endpoint, or a
    token source that says the session ended. (``BetterAuthClient.get_session`` answers
    None for a gone session instead of raising.)

    Final: retrying with the same session token cannot succeed; sign in again.
    """

    retryable = False


class BetterAuthResponseError(BetterAuthError, ProtocolError):
    """Better Auth (or a proxy in front of it) answered with a body we cannot use."""


class ConvexError(DartvexError):
    """A Convex query, mutation or action failed on the server.

    ``data`` is the value the function threw with ``ConvexError(data)``, or None for an
    ordinary exception; ``log_lines`` are the function's console lines.
    """

    def __init__(
        self, message: str, *, data: Any = None, log_lines: list[str] | None = None
    ) -> None:
        super().__init__(message, retryable=False)
        self.data = data
        self.log_lines = log_lines or []


class ConvexHttpError(DartvexError):
    """The Convex HTTP API answered a function call without a function result: an error
    status from the deployment or a proxy in front of it (or, as ConvexHttpResponseError,
    a body we cannot use).

    ``path`` is the function that was called (``messages:send``), ``status`` the HTTP
    status, and ``code``/``server_message`` what the server put in its
    ``{"code", "message"}`` body, when it sent one. Not a ConvexError: no function result
    came back, and for a mutation or action a 5xx from a proxy does not prove that the
    function did not run. retryable=True for 5xx (except 560, Convex's "function failed")
    and 429.
    """

    def __init__(
        self,
        message: str,
        *,
        path: str | None = None,
        status: int | None = None,
        code: str | None = None,
        server_message: str | None = None,
        retryable: bool | None = None,
    ) -> None:
        if retryable is None:
            retryable = status is not None and ((status >= 500 and status != 560) or status == 429)
        super().__init__(message, retryable=retryable)
        self.path = path
        self.status = status
        self.code = code
        self.server_message = server_message


class ConvexHttpResponseError(ConvexHttpError, ProtocolError):
    """The Convex HTTP API (or a proxy in front of it) answered with a body we cannot use:
    not JSON, JSON of the wrong shape, or a value that is not valid Convex JSON."""


class ConnectionLostError(DartvexError):
    """The connection dropped while an action was in flight; it may or may not have run."""

    retryable = True


class ServerFatalError(DartvexError):
    """The sync server reported a fatal, non-retryable error and the client stopped."""


class ClientClosedError(DartvexError):
    """The client was closed (or is closing) so the call cannot complete."""


class LoginSupersededError(DartvexError):
    """A ``login``, ``sign_up`` or ``login_from_cache`` of an authenticated client was
    overtaken before it finished: a newer one, or a ``logout``, started meanwhile. The
    newer call stands; this one was cancelled before its session was taken on, so the
    client, the provider and the server all agree on the newer identity."""


class AuthRejectedError(DartvexError):
    """The Convex server refused the auth token (bad signature, wrong issuer or audience,
    expired). Get a fresh token and try again."""


class NoSessionError(DartvexError):
    """There is no Better Auth session to restore: no ``initial_session_token`` was given
    and the session store holds none (never persisted, or forgotten after a logout or a
    final expiry). Sign in with credentials.

    Like SessionExpiredError, it means "sign in again", but no server was asked.
    """


class SessionStoreError(DartvexError):
    """A session store could not read, write or delete the persisted session.

    Raised for I/O errors of a file store, and by the keyring store when the optional
    ``keyring`` package is not installed, when the machine has no keyring backend, or
    when the backend fails. The message says which; the cause is chained.
    """
