"""Named loggers for each area, and redaction of secrets before anything is logged.

The library adds no handlers and never sets levels: the application decides.
"""

from __future__ import annotations

import logging

__all__ = ["auth_logger", "better_auth_logger", "convex_logger", "redact", "ws_logger"]

better_auth_logger = logging.getLogger("dartvex_auth_better.better_auth")
auth_logger = logging.getLogger("dartvex_auth_better.auth")
convex_logger = logging.getLogger("dartvex_auth_better.convex")
ws_logger = logging.getLogger("dartvex_auth_better.convex.ws")

_VISIBLE_TAIL = 4


def redact(secret: str | None) -> str:
    """Return a printable stand-in for a token: its last few characters at most.

    Short secrets are hidden completely, so a redacted value never reveals most of one.
    """
    if not secret:
        return "<none>"
    if len(secret) < 16:
        return "<redacted>"
    return f"<…{secret[-_VISIBLE_TAIL:]}>"
