"""The WebSocket side: opening sockets, reconnect delays, frame reading.

Backoff follows the official client: a server-caused close starts at 1 s (3 s for
overload reasons), a client-caused reconnect at 100 ms; each retry doubles up to 16 s, and
every delay is jittered by a uniform factor in [0.5, 1.5).
"""

from __future__ import annotations

import random

import aiohttp

__all__ = [
    "CLIENT_INITIAL_BACKOFF",
    "MAX_BACKOFF",
    "backoff_delay",
    "initial_backoff_for",
    "open_socket",
]

CLIENT_INITIAL_BACKOFF = 0.1
SERVER_INITIAL_BACKOFF = 1.0
OVERLOADED_INITIAL_BACKOFF = 3.0
MAX_BACKOFF = 16.0

_OVERLOADED_REASONS = (
    "SubscriptionsWorkerFullError",
    "TooManyConcurrentRequests",
    "CommitterFullError",
    "AwsTooManyRequestsException",
    "ExecuteFullError",
    "SystemTimeoutError",
    "ExpiredInQueue",
    "VectorIndexTooLarge",
    "SearchIndexTooLarge",
    "TooManyWritesInTimePeriod",
)


def initial_backoff_for(server_close_reason: str | None) -> float:
    """Starting delay after the server closed the socket with this reason."""
    if server_close_reason and server_close_reason.startswith(_OVERLOADED_REASONS):
        return OVERLOADED_INITIAL_BACKOFF
    return SERVER_INITIAL_BACKOFF


def backoff_delay(
    initial: float,
    retries: int,
    rng: random.Random | None = None,
    *,
    maximum: float = MAX_BACKOFF,
) -> float:
    """Jittered exponential delay, in seconds, for the given retry count."""
    base = min(initial * 2.0 ** min(retries, 32), maximum)
    jitter: float = (rng or random).uniform(0.5, 1.5)
    return base * jitter


async def open_socket(
    session: aiohttp.ClientSession, url: str, *, client_header: str, close_timeout: float
) -> aiohttp.ClientWebSocketResponse:
    """Open the sync socket. No message-size cap: a big query result is one frame."""
    return await session.ws_connect(
        url,
        headers={"Convex-Client": client_header},
        max_msg_size=0,
        autoping=True,
        autoclose=True,
        timeout=aiohttp.ClientWSTimeout(ws_receive=None, ws_close=close_timeout),
    )
