import msgspec
import pytest

from dartvex_auth_better import ProtocolError
from dartvex_auth_better.convex._protocol import (
    ActionResponse,
    AddQuery,
    Authenticate,
    AuthError,
    Connect,
    ModifyQuerySet,
    MutationMsg,
    MutationResponse,
    Ping,
    RemoveQuery,
    Transition,
    decode_server_message,
    decode_ts,
    encode_client_message,
    encode_ts,
)


def test_ts_roundtrip_and_spec_examples():
    assert encode_ts(1000) == "6AMAAAAAAAA="
    assert encode_ts(0) == "AAAAAAAAAAA="
    big = 2**63 + 42
    assert decode_ts(encode_ts(big)) == big  # unsigned
    with pytest.raises(ProtocolError):
        decode_ts("AQ==")
    with pytest.raises(ProtocolError):
        decode_ts("not base64!")


def test_connect_wire_shape():
    frame = msgspec.json.decode(
        encode_client_message(
            Connect(session_id="s", connection_count=0, last_close_reason=None, client_ts=1)
        )
    )
    # lastCloseReason null is sent; maxObservedTimestamp is omitted until something is seen.
    assert frame == {
        "type": "Connect",
        "sessionId": "s",
        "connectionCount": 0,
        "lastCloseReason": None,
        "clientTs": 1,
    }


def test_modify_query_set_add_always_carries_journal():
    frame = msgspec.json.decode(
        encode_client_message(
            ModifyQuerySet(
                base_version=0,
                new_version=1,
                modifications=[
                    AddQuery(query_id=0, udf_path="m:f", args=[{}]),
                    RemoveQuery(query_id=3),
                ],
            )
        )
    )
    assert frame["modifications"] == [
        {"type": "Add", "queryId": 0, "udfPath": "m:f", "args": [{}], "journal": None},
        {"type": "Remove", "queryId": 3},
    ]


def test_authenticate_shapes_and_repr_hides_token():
    none = msgspec.json.decode(
        encode_client_message(Authenticate(base_version=2, token_type="None"))
    )
    assert none == {"type": "Authenticate", "baseVersion": 2, "tokenType": "None"}
    token = "header.payload.signature-secret-part"
    msg = Authenticate(base_version=0, token_type="User", value=token)
    assert token not in repr(msg) and "part" in repr(msg)


def test_transition_decodes_with_unknown_fields_and_timing():
    frame = (
        b'{"type":"Transition","startVersion":{"querySet":0,"identity":0,"ts":"AAAAAAAAAAA="},'
        b'"endVersion":{"querySet":1,"identity":0,"ts":"6AMAAAAAAAA="},"clientClockSkew":-3,'
        b'"serverTs":5,"modifications":[{"type":"QueryUpdated","queryId":0,"value":[1],'
        b'"logLines":[],"journal":null,"future":true},{"type":"QueryFailed","queryId":1,'
        b'"errorMessage":"boom","errorData":{"$integer":"BQAAAAAAAAA="}},'
        b'{"type":"QueryRemoved","queryId":2}],"newField":{}}'
    )
    msg = decode_server_message(frame)
    assert isinstance(msg, Transition)
    assert msg.client_clock_skew == -3 and msg.server_ts == 5
    assert bytes(msg.modifications[0].value) == b"[1]"  # type: ignore[union-attr]
    assert len(msg.modifications) == 3


def test_other_server_messages_decode():
    assert isinstance(decode_server_message(b'{"type":"Ping"}'), Ping)
    auth = decode_server_message(b'{"type":"AuthError","error":"bad"}')
    assert isinstance(auth, AuthError) and auth.auth_update_attempted is None
    resp = decode_server_message(
        b'{"type":"ActionResponse","requestId":1,"success":false,"result":"nope","logLines":[]}'
    )
    assert isinstance(resp, ActionResponse) and not resp.success
    failed = decode_server_message(
        b'{"type":"MutationResponse","requestId":1,"success":false,"result":"x"}'
    )
    assert isinstance(failed, MutationResponse) and failed.ts is None


@pytest.mark.parametrize(
    "frame",
    [
        b"",
        b"not json",
        b"[]",
        b'{"type":"Unknown"}',
        b'{"noType":1}',
        b'{"type":"Transition"}',
        b'{"type":"MutationResponse","requestId":1,"success":true,"result":1}',  # no ts
        b'{"type":"MutationResponse","requestId":"1","success":false}',
        b'{"type":"Transition","startVersion":{"querySet":0,"identity":0,"ts":"AAAAAAAAAAA="}',
    ],
)
def test_malformed_frames_are_protocol_errors(frame):
    with pytest.raises(ProtocolError):
        decode_server_message(frame)


def test_a_message_that_cannot_be_json_text_is_a_value_error():
    with pytest.raises(ValueError, match="lone surrogate"):
        encode_client_message(MutationMsg(request_id=0, udf_path="m:f", args=[{"a": "\ud800"}]))
    deep: list[object] = []
    for _ in range(5000):
        deep = [deep]
    with pytest.raises(ValueError, match="nested too deeply"):
        encode_client_message(MutationMsg(request_id=0, udf_path="m:f", args=[deep]))
