import base64
import json
import time

import pytest

from dartvex_auth_better import BetterAuthSession
from dartvex_auth_better._jwt import (
    MAX_REFRESH_DELAY,
    is_expired,
    refresh_delay,
    token_claims,
    token_deadline,
    token_expiry,
    token_lifetime,
    token_times,
)
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
    deep = base64.urlsafe_b64encode(b"[" * 3000 + b"]" * 3000).decode()
    assert token_claims(f"a.{deep}.c") is None  # msgspec: RecursionError, not DecodeError
    assert token_expiry(make_jwt({"exp": "soon"})) is None
    assert not is_expired(make_jwt({}))


def test_times_and_lifetime_of_a_token():
    assert token_times(make_jwt({"iat": 100, "exp": 1000})) == (100.0, 1000.0)
    assert token_times(make_jwt({"iat": True, "exp": "x"})) == (None, None)
    assert token_times("not-a-jwt") == (None, None)
    assert token_lifetime(make_jwt({"iat": 100, "exp": 1000})) == (1000.0, 900.0)
    assert token_lifetime(make_jwt({"exp": 1000})) == (1000.0, None)
    assert token_lifetime(make_jwt({"iat": 100})) == (None, None)


# -- refresh_delay: dartvex's computeRefreshDelay cases (auth_manager_test.dart) ---------


def test_dart_case_lifetime_minus_leeway():
    assert refresh_delay(1e6, 1e6 + 1000, leeway=2, now=1e6) == 998


def test_dart_case_clamped_to_the_remaining_lifetime():
    # Issued an hour before its exp, 600 s of it left: 600 - 300, not 3600 - 300.
    assert refresh_delay(997_000, 1_000_600, leeway=300, now=1e6) == 300


def test_dart_case_leeway_longer_than_the_lifetime_is_zero():
    assert refresh_delay(1e6, 1e6 + 100, leeway=500, now=1e6) == 0


@pytest.mark.parametrize("lifetime", [2.0, 1.0, 0.5, 0.0, -5.0])
def test_dart_case_a_lifetime_of_two_seconds_or_less_is_not_scheduled(lifetime):
    assert refresh_delay(1e6, 1e6 + lifetime, leeway=0, now=1e6) is None


def test_dart_case_a_huge_lifetime_is_capped_at_twenty_days():
    assert MAX_REFRESH_DELAY == 20 * 24 * 3600
    assert refresh_delay(1e6, 1e6 + 10 * 365 * 86400, leeway=10, now=1e6) == MAX_REFRESH_DELAY


@pytest.mark.parametrize("exp", [1e6 + 900, 1e6 - 900])
def test_dart_case_no_iat_is_not_scheduled_expired_or_not(exp):
    assert refresh_delay(None, exp, leeway=10, now=1e6) is None


# -- refresh_delay: the rest ---------------------------------------------------------------


def test_just_over_two_seconds_is_scheduled():
    assert refresh_delay(1e6, 1e6 + 2.5, leeway=0, now=1e6) == 2.5


def test_no_exp_is_not_scheduled():
    assert refresh_delay(1e6, None, leeway=10, now=1e6) is None


def test_an_expired_token_is_due_at_once():
    assert refresh_delay(1e6, 1e6 + 900, leeway=10, now=1e6 + 5000) == 0


def test_the_leeway_share_caps_the_leeway_at_part_of_the_lifetime():
    # A 4 s token with the default 10 s leeway: capped at 2 s, refreshed after 2 s, not
    # at once (which would be a refresh storm).
    assert refresh_delay(1e6, 1e6 + 4, leeway=10, now=1e6, max_leeway_share=0.5) == 2
    # A long token is unaffected by the cap.
    assert refresh_delay(1e6, 1e6 + 900, leeway=10, now=1e6, max_leeway_share=0.5) == 890


def test_jitter_shortens_and_never_lengthens():
    base = refresh_delay(1e6, 1e6 + 1000, leeway=0, now=1e6)
    assert base == 1000
    assert refresh_delay(1e6, 1e6 + 1000, leeway=0, now=1e6, jitter=0.15) == pytest.approx(850)
    assert refresh_delay(1e6, 1e6 + 1000, leeway=0, now=1e6, jitter=0.0) == 1000
    # After the 20-day cap, not before it: never longer than the cap.
    capped = refresh_delay(0, 10 * MAX_REFRESH_DELAY, leeway=0, now=0, jitter=0.1)
    assert capped == pytest.approx(MAX_REFRESH_DELAY * 0.9)


@pytest.mark.parametrize("jitter", [-0.1, 1.0, 1.5])
def test_jitter_out_of_range_is_refused(jitter):
    with pytest.raises(ValueError, match="jitter"):
        refresh_delay(1e6, 1e6 + 1000, leeway=0, now=1e6, jitter=jitter)


def test_a_negative_leeway_is_refused():
    with pytest.raises(ValueError, match="leeway"):
        refresh_delay(1e6, 1e6 + 1000, leeway=-1, now=1e6)


def test_a_fresh_token_that_looks_expired_counts_its_lifetime_from_now():
    # This clock runs an hour ahead of the issuer's: by it, the token expired 45 min ago.
    now = 1e6 + 3600
    assert refresh_delay(1e6, 1e6 + 900, leeway=10, now=now, fresh=True) == 890
    # Not fresh (handed in from earlier): expired is expired.
    assert refresh_delay(1e6, 1e6 + 900, leeway=10, now=now) == 0


def test_a_fresh_token_issued_in_our_future_counts_from_now():
    # The issuer's clock is ahead of ours: exp - now is longer than the lifetime.
    assert refresh_delay(1e6 + 60, 1e6 + 960, leeway=10, now=1e6, fresh=True) == 890


# -- token_deadline ------------------------------------------------------------------------


def test_deadline_is_exp_never_later_than_now_plus_lifetime():
    assert token_deadline(1e6, 1e6 + 900, now=1e6 + 100) == 1e6 + 900
    assert token_deadline(1e6 + 60, 1e6 + 960, now=1e6) == 1e6 + 900
    assert token_deadline(None, 1e6 + 900, now=0) == 1e6 + 900
    assert token_deadline(1e6, None, now=0) is None


def test_deadline_of_a_token_that_looks_expired():
    now = 1e6 + 3600
    assert token_deadline(1e6, 1e6 + 900, now=now, fresh=True) == now + 900
    assert token_deadline(1e6, 1e6 + 900, now=now) == 1e6 + 900
    # Within a second of exp counts as "looks expired" for a fresh token.
    assert token_deadline(1e6, 1e6 + 900, now=1e6 + 899.5, fresh=True) == 1e6 + 899.5 + 900


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
