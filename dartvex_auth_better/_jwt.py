"""Reading a JWT's claims without verifying it, and the refresh-delay arithmetic.

The client never needs to trust these claims: the server verifies the signature. The
client only uses ``exp`` and ``iat`` to decide when to fetch a fresh token.
"""

from __future__ import annotations

import base64
import time
from typing import Any

import msgspec

from ._json import JSON_ERRORS

__all__ = [
    "MAX_REFRESH_DELAY",
    "MIN_TOKEN_LIFETIME",
    "is_expired",
    "refresh_delay",
    "token_claims",
    "token_deadline",
    "token_expiry",
    "token_lifetime",
    "token_times",
]


_CLAIMS_ERRORS: tuple[type[Exception], ...] = (ValueError, *JSON_ERRORS)


def token_claims(token: str) -> dict[str, Any] | None:
    """Decode the payload of a compact JWS without checking the signature.

    Returns None when ``token`` is not a three-part JWT whose payload is a JSON object.
    """
    parts = token.split(".")
    if len(parts) != 3:
        return None
    payload = parts[1]
    try:
        raw = base64.urlsafe_b64decode(payload + "=" * (-len(payload) % 4))
        claims = msgspec.json.decode(raw)
    except _CLAIMS_ERRORS:
        return None
    return claims if isinstance(claims, dict) else None


def token_expiry(token: str) -> float | None:
    """The ``exp`` claim as a Unix timestamp, or None when the token has none."""
    claims = token_claims(token)
    if claims is None:
        return None
    return _number(claims.get("exp"))


def is_expired(token: str, *, leeway: float = 0.0, now: float | None = None) -> bool:
    """True when the token's ``exp`` is at or before ``now + leeway`` (wall clock).

    A token without a readable ``exp`` is never considered expired here; the server decides.
    """
    exp = token_expiry(token)
    if exp is None:
        return False
    current = time.time() if now is None else now
    return exp <= current + leeway


MAX_REFRESH_DELAY = 20 * 24 * 3600.0
"""The longest refresh delay scheduled (the JS client's setTimeout limit, kept for parity)."""

MIN_TOKEN_LIFETIME = 2.0
"""Tokens living this long or less are not scheduled for refresh: there is no useful
moment to do it."""


def token_times(token: str) -> tuple[float | None, float | None]:
    """``(iat, exp)`` of a token; each None when that claim is missing or not a number."""
    claims = token_claims(token)
    if claims is None:
        return None, None
    return _number(claims.get("iat")), _number(claims.get("exp"))


def token_lifetime(token: str) -> tuple[float | None, float | None]:
    """``(exp, exp - iat)`` of a token; each None when the claims are missing."""
    iat, exp = token_times(token)
    if exp is None:
        return None, None
    return exp, (exp - iat if iat is not None else None)


def token_deadline(
    iat: float | None, exp: float | None, *, now: float, fresh: bool = False
) -> float | None:
    """When a token expires on this machine's clock, or None when it has no ``exp``.

    That is ``exp``, but never later than ``now`` plus the token's own lifetime
    (``exp - iat``). With ``fresh`` (the token was fetched just now), a token that already
    looks expired (``exp <= now + 1``) means this clock runs ahead of the issuer's: then
    the lifetime alone counts, ``now + (exp - iat)``, so a skewed clock cannot cause a
    refresh storm. A token that is not fresh (one handed in from earlier) gets no such
    benefit of the doubt: expired is expired.
    """
    if exp is None:
        return None
    if iat is None:
        return exp
    lifetime = exp - iat
    if fresh and exp <= now + 1:
        return now + lifetime
    return min(exp, now + lifetime)


def refresh_delay(
    iat: float | None,
    exp: float | None,
    *,
    leeway: float,
    now: float,
    fresh: bool = False,
    max_leeway_share: float = 1.0,
    jitter: float = 0.0,
) -> float | None:
    """Seconds from ``now`` until a token with these claims should be replaced, or None
    to not schedule a refresh at all.

    The delay is the token's own lifetime (``exp - iat``) minus the leeway, clamped to
    the remaining wall-clock lifetime minus the leeway (a token issued a while ago, or a
    clock that jumped; see :func:`token_deadline` for ``fresh``), floored at 0 and capped
    at 20 days. A token without ``iat`` or ``exp``, or living ``MIN_TOKEN_LIFETIME``
    seconds or less, is not scheduled.

    ``max_leeway_share`` caps the leeway at that share of the lifetime (the client uses
    0.5, so a short-lived token is not refreshed non-stop; 1.0, the default, is the
    plain formula). ``jitter`` in ``[0, 1)`` shortens the delay by that fraction (the
    caller draws it at random, so that clients which signed in together do not refresh
    together); it never lengthens it.
    """
    if leeway < 0:
        raise ValueError("leeway must be >= 0")
    if not 0 <= jitter < 1:
        raise ValueError("jitter must be in [0, 1)")
    if iat is None or exp is None:
        return None
    lifetime = exp - iat
    if lifetime <= MIN_TOKEN_LIFETIME:
        return None
    deadline = token_deadline(iat, exp, now=now, fresh=fresh)
    assert deadline is not None
    effective_leeway = min(leeway, lifetime * max_leeway_share)
    delay = min(max(deadline - effective_leeway - now, 0.0), MAX_REFRESH_DELAY)
    return delay * (1.0 - jitter)


def _number(value: object) -> float | None:
    if isinstance(value, bool) or not isinstance(value, int | float):
        return None
    return float(value)
