"""Finding the session token and the Convex JWT in a Better Auth response.

The session token comes from the ``set-auth-token`` header (the bearer plugin), else a
non-empty JSON ``token``, else the session cookie. Cookies are matched by name suffix so
``__Secure-`` prefixed names (https deployments) work too.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Iterator, Mapping
from typing import Any
from urllib.parse import unquote

__all__ = [
    "CONVEX_JWT_COOKIE",
    "SESSION_COOKIE",
    "cookie_names",
    "cookie_value",
    "find_session_token",
]

SESSION_COOKIE = "better-auth.session_token"
CONVEX_JWT_COOKIE = "better-auth.convex_jwt"

# A proxy may fold several Set-Cookie headers into one, comma-separated. Split only where
# a comma is followed by something shaped like ``name=``, so "Expires=Wed, 09 Jun" stays.
_FOLDED_COOKIE_SPLIT = re.compile(r",\s*(?=[^;,=\s]+=)")


def _cookie_pairs(set_cookie_headers: Iterable[str]) -> Iterator[tuple[str, str]]:
    for header in set_cookie_headers:
        for cookie in _FOLDED_COOKIE_SPLIT.split(header):
            name, sep, rest = cookie.partition("=")
            if not sep:
                continue
            yield name.strip(), rest.split(";", 1)[0].strip()


def cookie_names(set_cookie_headers: Iterable[str]) -> set[str]:
    """The names of the cookies that Set-Cookie headers set (or clear)."""
    return {name for name, _ in _cookie_pairs(set_cookie_headers) if name}


def cookie_value(set_cookie_headers: Iterable[str], name_suffix: str) -> str | None:
    """The URL-decoded value of the last non-empty cookie whose name ends with the suffix."""
    found: str | None = None
    for name, value in _cookie_pairs(set_cookie_headers):
        if name.endswith(name_suffix) and value:
            found = unquote(value)
    return found


def find_session_token(
    headers: Mapping[str, str], body: Mapping[str, Any] | None, set_cookies: Iterable[str]
) -> str | None:
    """The Better Auth session token of a sign-in-like response, or None.

    A body ``token`` that is not a non-empty string is skipped here; the client rejects
    such a body before it gets this far.
    """
    header = headers.get("set-auth-token", "").strip()
    if header:
        return header
    if body is not None:
        token = body.get("token")
        if isinstance(token, str) and token:
            return token
    return cookie_value(set_cookies, SESSION_COOKIE)
