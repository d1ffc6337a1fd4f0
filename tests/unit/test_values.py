import math

import msgspec
import pytest

from dartvex_auth_better import Int64, ProtocolError
from dartvex_auth_better.convex._values import decode_value, encode_args, encode_value


def roundtrip(value):
    wire = msgspec.json.decode(msgspec.json.encode(encode_value(value)))
    return decode_value(wire)


def test_spec_examples_encode_exactly():
    assert encode_value(Int64(5)) == {"$integer": "BQAAAAAAAAA="}
    assert encode_value(math.nan) == {"$float": "AAAAAAAA+H8="}
    assert encode_value(-0.0) == {"$float": "AAAAAAAAAIA="}
    assert encode_value(b"\x01\x02") == {"$bytes": "AQI="}


def test_captured_npm_args_frame_matches():
    args = {
        "channel": "general",
        "n": Int64(5),
        "f": math.nan,
        "negz": -0.0,
        "b": b"\x01\x02",
        "nested": {"arr": [1, "x", None, True]},
    }
    # The npm client's captured frame (keys sorted) for the same arguments.
    expected = (
        b'[{"b":{"$bytes":"AQI="},"channel":"general","f":{"$float":"AAAAAAAA+H8="},'
        b'"n":{"$integer":"BQAAAAAAAAA="},"negz":{"$float":"AAAAAAAAAIA="},'
        b'"nested":{"arr":[1,"x",null,true]}}]'
    )
    assert msgspec.json.encode(encode_args(args)) == expected


@pytest.mark.parametrize("n", [0, 1, -1, 2**63 - 1, -(2**63)])
def test_int64_bounds_roundtrip(n):
    out = roundtrip(Int64(n))
    assert out == n and isinstance(out, Int64)


@pytest.mark.parametrize("n", [2**63, -(2**63) - 1])
def test_int64_out_of_range(n):
    with pytest.raises(ValueError):
        Int64(n)


def test_int64_rejects_bool_and_float():
    with pytest.raises(TypeError):
        Int64(True)
    with pytest.raises(TypeError):
        Int64(1.5)  # type: ignore[arg-type]


def test_plain_int_is_a_number():
    assert encode_value(3) == 3
    assert roundtrip(3) == 3 and type(roundtrip(3)) is int
    assert encode_value(2**53) == 2**53


def test_plain_int_that_would_lose_precision_is_refused():
    with pytest.raises(ValueError, match="Int64"):
        encode_value(2**53 + 1)


@pytest.mark.parametrize("f", [math.inf, -math.inf, -0.0, 42.5])
def test_special_floats_roundtrip(f):
    out = roundtrip(f)
    assert out == f and math.copysign(1, out) == math.copysign(1, f)


def test_nan_roundtrip():
    assert math.isnan(roundtrip(math.nan))


def test_bytes_nested_and_key_order():
    value = {"z": [b"", {"a": Int64(1)}], "a": None}
    assert roundtrip(value) == value
    assert list(encode_value(value)) == ["a", "z"]
    assert list(decode_value({"z": 1, "a": 2})) == ["z", "a"]  # decoded order is preserved


@pytest.mark.parametrize("name", ["$bad", "new\nline", "x" * 1025, "é"])
def test_bad_field_names_rejected_both_ways(name):
    with pytest.raises(ValueError):
        encode_value({name: 1})
    with pytest.raises(ProtocolError):
        decode_value({name: 1, "other": 2})


def test_non_string_keys_and_unknown_types_rejected():
    with pytest.raises(TypeError):
        encode_value({1: "x"})
    with pytest.raises(TypeError):
        encode_value({1, 2})
    with pytest.raises(TypeError):
        encode_args([1])  # type: ignore[arg-type]


def test_args_none_is_empty_object():
    assert encode_args(None) == [{}]


@pytest.mark.parametrize(
    "bad",
    [
        {"$float": "AAAAAAAA8D8="},  # 1.0: a finite $float is invalid
        {"$integer": "AQ=="},  # wrong length
        {"$integer": 5},  # not a string
        {"$bytes": "!!"},  # not base64
        {"$set": []},
        {"$map": []},
    ],
)
def test_malformed_specials_are_protocol_errors(bad):
    with pytest.raises(ProtocolError):
        decode_value(bad)


def test_special_key_with_siblings_is_a_bad_field_name():
    with pytest.raises(ProtocolError):
        decode_value({"$integer": "BQAAAAAAAAA=", "x": 1})


# -- what JSON text cannot carry: rejected when encoding, at the call -----------------------


def deep_list(depth: int) -> list[object]:
    value: list[object] = []
    for _ in range(depth):
        value = [value]
    return value


@pytest.mark.parametrize(
    "value",
    [
        "\ud800",
        "ok \udfff",
        {"a": ["x", {"b": "é\ud83d"}]},
        ("t", "\udc00"),
    ],
)
def test_a_lone_surrogate_is_a_value_error_that_does_not_show_the_value(value):
    with pytest.raises(ValueError, match="lone surrogate") as caught:
        encode_args({"v": value})
    assert "\\ud8" not in str(caught.value) and "\ud800" not in str(caught.value)


def test_a_str_subclass_with_a_lone_surrogate_is_rejected_too():
    class Text(str):
        pass

    with pytest.raises(ValueError, match="lone surrogate"):
        encode_value(Text("\ud800"))


def test_valid_non_ascii_text_and_surrogate_pairs_as_code_points_pass():
    value = {"s": "héllo wörld ☃ 😀", "l": ["日本"]}
    assert encode_value(value) == value
    assert msgspec.json.decode(msgspec.json.encode(encode_args(value))) == [value]


@pytest.mark.parametrize("depth", [2000, 100_000])
def test_too_deep_a_value_is_a_value_error_not_a_recursion_error(depth):
    with pytest.raises(ValueError, match="nested too deeply"):
        encode_args({"a": deep_list(depth)})
    with pytest.raises(ValueError, match="nested too deeply"):
        encode_value({"a": {"b": deep_list(depth)}})


def test_moderately_deep_values_encode():
    assert encode_args({"a": deep_list(64)}) == [{"a": deep_list(64)}]


# A plain dict takes encode_value's fast paths; any other Mapping takes the general code.
# Both must give the same wire value, and the same error type for a bad value.
_FAST_AND_GENERAL = [
    {},
    {"n": 5.0},
    {"b": 1, "a": 2, "c": 3},
    {"n": 0.0, "m": -0.0, "nan": math.nan, "inf": -math.inf},
    {"big": 2**53, "small": -(2**53), "bool": True, "none": None, "zero": 0},
    {"exact": 2**60, "float_int": 3},
    {"text": "héllo", "ascii": "hi", "empty": ""},
    {"nested": {"z": [1.5, {"y": Int64(7)}], "a": b"\x00"}},
    {"inexact": 2**53 + 1},
    {"surrogate": "\ud800"},
    {"$bad": 1},
    {"bad\x01name": 1},
    {1: "int key"},
    {"a": 1, 2: "mixed keys"},
    {"obj": object()},
]


@pytest.mark.parametrize("value", _FAST_AND_GENERAL, ids=repr)
def test_a_dict_encodes_as_the_same_mapping_through_the_general_code(value):
    from types import MappingProxyType

    def outcome(arg):
        try:
            return ("ok", msgspec.json.encode(encode_value(arg)))
        except (TypeError, ValueError) as exc:
            return (type(exc).__name__, None)

    assert outcome(value) == outcome(MappingProxyType(value))
