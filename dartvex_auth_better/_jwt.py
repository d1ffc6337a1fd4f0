"""Reading a JWT's claims without verifying it, and the refresh-delay arithmetic.

The client never needs to trust these claims: the server verifies the signature. The
client only uses ``exp`` and ``iat`` to decide when to fetch a fresh token.
"""

from __future__ import annotations

import base64
import time
from typing import Any

import msgspec

__all__ = [
    "MAX_REFRESH_DELAY",
    "MIN_TOKEN_LIFETIME",
    "is_expired",
    "refresh_delay",
    "token_claims",
    "token_expiry",
    "token_lifetime",
]


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
    except (ValueError, msgspec.DecodeError):
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


def token_lifetime(token: str) -> tuple[float | None, float | None]:
    """``(exp, exp - iat)`` of a token; each None when the claims are missing."""
    claims = token_claims(token)
    if claims is None:
        return None, None
    iat, exp = _number(claims.get("iat")), _number(claims.get("exp"))
    if exp is None:
        return None, None
    return exp, (exp - iat if iat is not None else None)


def refresh_delay(token: str, *, leeway: float, now: float | None = None) -> float | None:
    """Seconds from ``now`` until the token should be replaced, or None to not schedule.

    The delay is the token's own lifetime (``exp - iat``) minus the leeway, clamped to the
    remaining wall-clock lifetime minus the leeway (a token issued a while ago, or a clock
    that jumped), floored at 0 and capped at 20 days. A token without ``iat``/``exp``, or
    living ``MIN_TOKEN_LIFETIME`` seconds or less, is not scheduled.
    """
    claims = token_claims(token)
    if claims is None:
        return None
    iat, exp = _number(claims.get("iat")), _number(claims.get("exp"))
    if iat is None or exp is None:
        return None
    lifetime = exp - iat
    if lifetime <= MIN_TOKEN_LIFETIME:
        return None
    current = time.time() if now is None else now
    delay = min(lifetime - leeway, exp - current - leeway)
    return min(max(delay, 0.0), MAX_REFRESH_DELAY)


def _number(value: object) -> float | None:
    if isinstance(value, bool) or not isinstance(value, int | float):
        return None
    return float(value)
