"""Auth state of one ConvexClient: the token in force and server confirmation.

The token is read when an Authenticate frame is built, never captured earlier. Auth
counts as confirmed only when a Transition raises the identity version past the
Authenticate that carried the token.
"""

from __future__ import annotations

import asyncio

from .._errors import AuthRejectedError
from ._protocol import Authenticate

__all__ = ["AuthState"]


class AuthState:
    def __init__(self) -> None:
        self.token: str | None = None
        # Identity version on the current socket: the base of the next Authenticate.
        self.identity_version = 0
        # The identity version at which the current token is confirmed, once sent.
        self._awaiting_version: int | None = None
        self._waiters: list[asyncio.Future[None]] = []

    @property
    def is_set(self) -> bool:
        return self.token is not None

    @property
    def awaiting_confirmation(self) -> bool:
        return self._awaiting_version is not None

    def set_token(self, token: str | None) -> None:
        self.token = token

    def reset_socket(self) -> None:
        """A new socket starts with identity version 0 on both sides, and anonymous."""
        self.identity_version = 0
        self._awaiting_version = None
        if self.token is None:
            # Nothing to send and nothing to confirm: the socket starts anonymous.
            self._resolve_waiters()

    def _resolve_waiters(self) -> None:
        waiters, self._waiters = self._waiters, []
        for w in waiters:
            if not w.done():
                w.set_result(None)

    def authenticate_message(self) -> Authenticate:
        """Build the next Authenticate from the token in force right now."""
        base = self.identity_version
        self.identity_version += 1
        self._awaiting_version = self.identity_version
        if self.token is None:
            return Authenticate(base_version=base, token_type="None")
        return Authenticate(base_version=base, token_type="User", value=self.token)

    def add_waiter(self) -> asyncio.Future[None]:
        future: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self._waiters.append(future)
        return future

    def on_identity_advanced(self, start: int, end: int) -> bool:
        """Called for every Transition; True when it confirmed the pending token."""
        if end <= start or self._awaiting_version is None or end < self._awaiting_version:
            return False
        self._awaiting_version = None
        self._resolve_waiters()
        return True

    def on_rejected(self, message: str) -> None:
        """The server refused the token: drop it so reconnects do not resend it forever."""
        self.token = None
        self._awaiting_version = None
        waiters, self._waiters = self._waiters, []
        for w in waiters:
            if not w.done():
                w.set_exception(
                    AuthRejectedError(f"the Convex server rejected the token: {message}")
                )

    def fail_waiters(self, error: BaseException) -> None:
        waiters, self._waiters = self._waiters, []
        for w in waiters:
            if not w.done():
                w.set_exception(error)
