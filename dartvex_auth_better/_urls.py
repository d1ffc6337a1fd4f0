"""Deployment URL validation and the URLs derived from it.

Shared by both halves of the SDK: it knows URLs, nothing about either protocol.
"""

from __future__ import annotations

import ipaddress
from urllib.parse import urlsplit, urlunsplit

__all__ = ["is_loopback_host", "normalize_base_url", "site_url_for", "sync_url_for"]


def is_loopback_host(host: str) -> bool:
    """True for ``localhost`` and loopback addresses (127.0.0.0/8, ::1)."""
    if host == "localhost" or host.endswith(".localhost"):
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def normalize_base_url(url: str, *, name: str = "url", allow_insecure: bool = False) -> str:
    """Validate a deployment or site URL and return it as ``scheme://host[:port]``.

    Rejects anything that is not http(s), has no host, or carries a path, query or fragment
    (a trailing slash is fine). Plain ``http://`` is allowed only for loopback hosts unless
    ``allow_insecure`` is set, because tokens would travel in clear text.
    """
    if not isinstance(url, str) or not url.strip():
        raise ValueError(f"{name} must be a non-empty URL string")
    parts = urlsplit(url.strip())
    scheme = parts.scheme.lower()
    if scheme not in ("http", "https"):
        raise ValueError(
            f"{name} must start with https:// (or http:// for a local server): {url!r}"
        )
    if not parts.hostname:
        raise ValueError(f"{name} has no host: {url!r}")
    if parts.path not in ("", "/") or parts.query or parts.fragment:
        raise ValueError(
            f"{name} must be a bare origin such as https://happy-otter-123.convex.cloud "
            f"(no path, query or fragment): {url!r}"
        )
    if parts.username or parts.password:
        raise ValueError(f"{name} must not contain credentials")
    if scheme == "http" and not allow_insecure and not is_loopback_host(parts.hostname):
        raise ValueError(
            f"{name} uses plain http:// for a non-loopback host; use https://, or pass "
            "allow_insecure=True if you really mean it"
        )
    try:
        port = parts.port
    except ValueError:
        raise ValueError(f"{name} has an invalid port: {url!r}") from None
    host = parts.hostname
    if ":" in host:  # IPv6 literal
        host = f"[{host}]"
    netloc = host if port is None else f"{host}:{port}"
    return urlunsplit((scheme, netloc, "", "", ""))


def site_url_for(base_url: str) -> str:
    """The HTTP-actions host for a deployment: ``*.convex.cloud`` becomes ``*.convex.site``.

    Any other host is returned unchanged (self-hosted and local setups).
    """
    parts = urlsplit(base_url)
    host = parts.hostname or ""
    if host.endswith(".convex.cloud"):
        new_host = host[: -len(".convex.cloud")] + ".convex.site"
        netloc = new_host if parts.port is None else f"{new_host}:{parts.port}"
        return urlunsplit((parts.scheme, netloc, "", "", ""))
    return base_url


def sync_url_for(base_url: str) -> str:
    """The WebSocket sync endpoint of a normalised deployment URL."""
    scheme = "wss" if base_url.startswith("https:") else "ws"
    return f"{scheme}{base_url[base_url.index(':') :]}/api/sync"
