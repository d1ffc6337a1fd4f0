"""Reading a JWT's claims without verifying it, and the refresh-delay arithmetic.

The client never needs to trust these claims: the server verifies the signature. The
client only uses ``exp`` and ``iat`` to decide when to fetch a fresh token.
"""

from __future__ import annotations

import base64
import time
from typing import Any

import msgspec

__all__ = ["is_expired", "token_claims", "token_expiry"]


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
    exp = claims.get("exp")
    if isinstance(exp, bool) or not isinstance(exp, int | float):
        return None
    return float(exp)


def is_expired(token: str, *, leeway: float = 0.0, now: float | None = None) -> bool:
    """True when the token's ``exp`` is at or before ``now + leeway`` (wall clock).

    A token without a readable ``exp`` is never considered expired here; the server decides.
    """
    exp = token_expiry(token)
    if exp is None:
        return False
    current = time.time() if now is None else now
    return exp <= current + leeway
