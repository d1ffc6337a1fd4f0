import pytest

from dartvex_auth_better._urls import normalize_base_url, site_url_for, sync_url_for


@pytest.mark.parametrize(
    ("given", "expected"),
    [
        ("https://happy-otter-123.convex.cloud", "https://happy-otter-123.convex.cloud"),
        ("https://happy-otter-123.convex.cloud/", "https://happy-otter-123.convex.cloud"),
        ("http://127.0.0.1:3210", "http://127.0.0.1:3210"),
        ("http://localhost:3210/", "http://localhost:3210"),
        ("http://[::1]:3210", "http://[::1]:3210"),
        ("HTTPS://Example.COM", "https://example.com"),
    ],
)
def test_normalize(given, expected):
    assert normalize_base_url(given) == expected


@pytest.mark.parametrize(
    "bad",
    [
        "",
        "happy-otter.convex.cloud",
        "ftp://x.convex.cloud",
        "wss://x.convex.cloud",
        "https://x.convex.cloud/api",
        "https://x.convex.cloud?x=1",
        "https://x.convex.cloud#frag",
        "https://user:pw@x.convex.cloud",
        "https://x.convex.cloud:notaport",
    ],
)
def test_rejected(bad):
    with pytest.raises(ValueError):
        normalize_base_url(bad)


def test_plain_http_only_for_loopback_unless_opted_in():
    with pytest.raises(ValueError, match="allow_insecure"):
        normalize_base_url("http://example.com")
    assert normalize_base_url("http://example.com", allow_insecure=True) == "http://example.com"


def test_site_and_sync_urls():
    assert site_url_for("https://happy-otter-123.convex.cloud") == (
        "https://happy-otter-123.convex.site"
    )
    assert site_url_for("http://localhost:3210") == "http://localhost:3210"
    assert sync_url_for("https://a.convex.cloud") == "wss://a.convex.cloud/api/sync"
    assert sync_url_for("http://127.0.0.1:8000") == "ws://127.0.0.1:8000/api/sync"
