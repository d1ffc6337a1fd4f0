import base64
import json
import time

from dartvex_auth_better import BetterAuthSession
from dartvex_auth_better._jwt import is_expired, token_claims, token_expiry
from dartvex_auth_better._logging import redact
from dartvex_auth_better.better_auth._tokens import cookie_value, find_session_token


def make_jwt(claims: dict[str, object]) -> str:
    def b64(data: bytes) -> str:
        return base64.urlsafe_b64encode(data).rstrip(b"=").decode()

    return f"{b64(b'{}')}.{b64(json.dumps(claims).encode())}.sig"


def test_claims_and_expiry():
    now = time.time()
    token = make_jwt({"iat": now, "exp": now + 900, "sub": "u"})
    assert token_claims(token)["sub"] == "u"  # type: ignore[index]
    assert token_expiry(token) == now + 900
    assert not is_expired(token)
    assert is_expired(token, leeway=1000)
    assert token_claims("not-a-jwt") is None
    assert token_claims("a.!!!.c") is None
    assert token_expiry(make_jwt({"exp": "soon"})) is None
    assert not is_expired(make_jwt({}))


def test_cookie_lookup_by_suffix_and_folded_headers():
    headers = [
        "__Secure-better-auth.session_token=abc.def%3D; Max-Age=604800; Path=/; HttpOnly",
        "other=1; Expires=Wed, 09 Jun 2031 10:18:14 GMT, better-auth.convex_jwt=x.y.z; Path=/",
    ]
    assert cookie_value(headers, "better-auth.session_token") == "abc.def="
    assert cookie_value(headers, "better-auth.convex_jwt") == "x.y.z"
    assert cookie_value(["better-auth.convex_jwt=; Max-Age=0"], "better-auth.convex_jwt") is None


def test_session_token_priority():
    cookies = ["better-auth.session_token=cookie; Path=/"]
    assert find_session_token({"set-auth-token": "hdr"}, {"token": "body"}, cookies) == "hdr"
    assert find_session_token({}, {"token": "body"}, cookies) == "body"
    assert find_session_token({}, {"token": ""}, cookies) == "cookie"
    assert find_session_token({}, {"token": 42}, []) is None


def test_redaction_and_session_repr_hide_secrets():
    jwt = make_jwt({"sub": "u", "exp": 1})
    session_token = "xBIoC0nCQqwKwkoC88hpv88YwKJZDpiY"
    session = BetterAuthSession(
        token=jwt, session_token=session_token, user_id="u1", email="a@b.c", name="A"
    )
    for text in (repr(session), str(session)):
        assert jwt not in text and session_token not in text
        assert "u1" in text
    assert redact(session_token) == "<…DpiY>"
    assert redact("short") == "<redacted>"
    assert redact(None) == "<none>"
    # value equality, as the Dart original pins down
    assert session == BetterAuthSession(
        token=jwt, session_token=session_token, user_id="u1", email="a@b.c", name="A"
    )
    assert hash(session) == hash(
        BetterAuthSession(
            token=jwt, session_token=session_token, user_id="u1", email="a@b.c", name="A"
        )
    )
