"""The Convex JSON value codec.

Convex values travel as JSON with a few tagged objects for what JSON cannot carry:
``{"$integer": b64}`` for int64, ``{"$float": b64}`` for NaN, the infinities and -0.0,
``{"$bytes": b64}`` for binary data.

Python mapping (the int policy, decided once):

* ``None``, ``bool``, ``str`` map to themselves.
* A plain Python ``int`` is a Convex **float64** number, as in the JS client. It must be
  exactly representable as a float64 (|n| <= 2**53, or any power-of-two-ish value that
  survives the round trip); otherwise encoding raises ``ValueError`` rather than silently
  losing precision.
* ``Int64(n)`` is a Convex **int64** (``v.int64()``), sent as ``$integer``. Decoding an
  ``$integer`` gives an ``Int64``, so values round-trip with their type.
* A JSON number decodes as ``int`` when it has no fraction or exponent, else ``float``.
* ``float`` NaN, +-inf and -0.0 use ``$float``; ``bytes``/``bytearray``/``memoryview`` use
  ``$bytes`` and decode as ``bytes``; lists and tuples are arrays; dicts with ``str`` keys
  are objects (keys sorted on the wire, as the JS client sends them).
"""

from __future__ import annotations

import base64
import math
import re
import struct
from collections.abc import Mapping
from typing import Any

import msgspec

from .._errors import ProtocolError
from .._json import JSON_ERRORS

__all__ = [
    "Int64",
    "decode_json",
    "decode_raw_or_none",
    "decode_value",
    "encode_args",
    "encode_value",
]

_INT64_MIN = -(2**63)
_INT64_MAX = 2**63 - 1
_MAX_FIELD_NAME = 1024
_SPECIAL_KEYS = frozenset({"$integer", "$float", "$bytes", "$commitTs"})
_RETIRED_KEYS = frozenset({"$set", "$map"})
# Field names already checked by decode (server data repeats the same few names endlessly).
_valid_names: set[str] = set()
_VALID_NAMES_LIMIT = 4096
# A quote followed by 1025 bytes without one: how JSON text without backslash escapes
# shows a string longer than a field name may be (matches only start at quotes: fast).
_LONG_STRING = re.compile(rb'"[^"]{%d}' % (_MAX_FIELD_NAME + 1))
_CONTAINERS = (dict, list)
# An int of at most this size is exactly a float64 (what a plain number is on the wire).
_EXACT_INT = 2**53
_BACKSLASH, _DOLLAR, _DEL = ord("\\"), ord("$"), 0x7F


class Int64(int):
    """An integer sent to Convex as int64 (``v.int64()``) instead of float64."""

    __slots__ = ()

    def __new__(cls, value: int = 0) -> Int64:
        if isinstance(value, bool) or not isinstance(value, int):
            raise TypeError(f"Int64 takes an int, not {type(value).__name__}")
        if not _INT64_MIN <= value <= _INT64_MAX:
            raise ValueError(f"{value} is outside the int64 range")
        return super().__new__(cls, value)

    def __repr__(self) -> str:
        return f"Int64({int(self)})"


def _b64(data: bytes) -> str:
    return base64.b64encode(data).decode("ascii")


def _unb64(text: object, what: str) -> bytes:
    if not isinstance(text, str):
        raise ProtocolError(f"{what} payload must be a base64 string")
    try:
        return base64.b64decode(text, validate=True)
    except ValueError as exc:
        raise ProtocolError(f"{what} payload is not valid base64") from exc


def _check_field_name(name: object, exc_type: type[Exception]) -> str:
    if not isinstance(name, str):
        raise exc_type(f"object keys must be strings, not {type(name).__name__}")
    if len(name) > _MAX_FIELD_NAME:
        raise exc_type(f"field name longer than {_MAX_FIELD_NAME} characters")
    if name.startswith("$"):
        raise exc_type(f"field name {name[:40]!r} must not start with '$'")
    for ch in name:
        if not " " <= ch <= "~":
            raise exc_type(f"field name {name[:40]!r} must be printable ASCII")
    return name


def encode_value(value: Any) -> Any:
    """Turn a Python value into the JSON-compatible structure Convex expects.

    Raises ``TypeError`` for a type Convex cannot hold and ``ValueError`` for a value out
    of range, a bad field name, a string that is not valid Unicode text (a lone surrogate
    such as ``"\\ud800"``, which UTF-8 cannot carry) or a value nested too deeply to encode.
    """
    try:
        return _encode(value)
    except RecursionError:
        raise ValueError(_TOO_DEEP) from None


def _encode(value: Any) -> Any:
    # Fast paths for what arguments mostly are (the same results as the general code
    # below, which handles everything else and raises its errors).
    kind = type(value)
    if kind is str:
        return value if value.isascii() else _checked_text(value)
    if kind is float:
        if value != 0.0 and value - value == 0.0:  # finite and not -0.0 (nor 0.0)
            return value
    elif kind is int:
        if -_EXACT_INT <= value <= _EXACT_INT:
            return value
    elif kind is dict:
        # Keys in order; one key needs no sort (sorted() of one item costs more than the
        # rest of this). Keys that are not all str (sorted() may raise for them) go to the
        # general code below, for its error.
        try:
            keys = list(value) if len(value) < 2 else sorted(value)
        except TypeError:
            keys = []
        else:
            valid = _valid_names
            out: dict[str, Any] = {}
            for key in keys:
                if key not in valid:
                    if type(key) is not str:
                        break
                    key = _checked_name(key, ValueError)
                item = value[key]
                # The commonest values, without a call each (the same tests as above).
                item_kind = type(item)
                if item_kind is float:
                    if item != 0.0 and item - item == 0.0:
                        out[key] = item
                        continue
                elif item_kind is str and item.isascii():
                    out[key] = item
                    continue
                out[key] = _encode(item)
            else:
                return out
    if value is None or value is True or value is False:
        return value
    if isinstance(value, str):
        return value if value.isascii() else _checked_text(value)
    if isinstance(value, Int64):
        return {"$integer": _b64(struct.pack("<q", value))}
    if isinstance(value, int):
        as_float = float(value) if abs(value) < 2**1024 else math.inf
        if math.isinf(as_float) or int(as_float) != value:
            raise ValueError(
                f"int {value} cannot be sent as a float64 without losing precision; "
                "wrap it in Int64(...) to send a Convex int64"
            )
        return value
    if isinstance(value, float):
        if math.isnan(value) or math.isinf(value) or (value == 0.0 and math.copysign(1, value) < 0):
            return {"$float": _b64(struct.pack("<d", value))}
        return value
    if isinstance(value, bytes | bytearray | memoryview):
        return {"$bytes": _b64(bytes(value))}
    if isinstance(value, list | tuple):
        return [_encode(item) for item in value]
    if isinstance(value, Mapping):
        encoded: dict[str, Any] = {}
        for key in sorted(value, key=_sort_key):
            encoded[_check_field_name(key, ValueError)] = _encode(value[key])
        return encoded
    raise TypeError(f"cannot send a {type(value).__name__} to Convex")


_TOO_DEEP = (
    "the value is nested too deeply to encode (lists and objects inside each other "
    "beyond Python's recursion limit)"
)


def _checked_text(text: str) -> str:
    """A non-ASCII str, checked to be encodable as UTF-8 (the JSON of a frame is UTF-8):
    a lone surrogate would fail only when the frame is written, long after the call."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as exc:
        raise ValueError(
            f"a string contains a lone surrogate (U+{ord(text[exc.start]):04X} at index "
            f"{exc.start}), which is not valid Unicode text and cannot be sent to Convex"
        ) from None
    return text


def _sort_key(key: object) -> str:
    if not isinstance(key, str):
        raise TypeError(f"object keys must be strings, not {type(key).__name__}")
    # JS sorts by UTF-16 code units; for the printable-ASCII names Convex allows this is
    # the same as Python's code-point order.
    return key


def encode_args(args: Mapping[str, Any] | None) -> list[Any]:
    """Encode function arguments as the one-element array the wire format uses."""
    if args is None:
        return [{}]
    # (A dict, the common case, skips the Mapping ABC check.)
    if type(args) is not dict and not isinstance(args, Mapping):
        raise TypeError(f"function arguments must be a mapping, not {type(args).__name__}")
    return [encode_value(args)]  # (ValueError, not RecursionError, for too deep a value)


def decode_value(value: Any) -> Any:
    """Turn a decoded JSON structure from Convex into Python values (a new structure; the
    argument is left as it is).

    Raises ``ProtocolError`` when the server sent something that is not a valid Convex
    value (a finite ``$float``, an ``$integer`` of the wrong length, a retired ``$set``).
    """
    if isinstance(value, dict):
        if len(value) == 1:
            ((key, payload),) = value.items()
            if key in _SPECIAL_KEYS:
                return _decode_special(key, payload)
            if key in _RETIRED_KEYS:
                raise ProtocolError(f"{key} values are no longer supported by Convex")
        valid = _valid_names
        return {
            (k if k in valid else _checked_name(k)): (
                decode_value(v) if isinstance(v, _CONTAINERS) else v
            )
            for k, v in value.items()
        }
    if isinstance(value, list):
        return [decode_value(v) if isinstance(v, _CONTAINERS) else v for v in value]
    return value


def decode_json(raw: bytes | msgspec.Raw) -> Any:
    """``decode_value(msgspec.json.decode(raw))``, faster: the same result and errors.

    Most values hold no ``$`` tagged object and only plain field names. When the bytes
    show that (ASCII only, no ``$``, no backslash escape, no DEL, no string longer than
    1024 characters), the JSON decoder's output is already the answer.
    Otherwise the freshly decoded structure, which nobody else holds, is converted in
    place. Raises ``msgspec.DecodeError`` for text that is not JSON, and RecursionError
    for JSON nested too deeply (``JSON_ERRORS``: callers catch both).
    """
    decoded = msgspec.json.decode(raw)
    kind = type(decoded)
    if kind is not dict and kind is not list:
        return decoded  # a scalar: nothing to convert (decode_value returns it as it is)
    data = raw if type(raw) is bytes else bytes(raw)
    if (
        data.isascii()
        # (An int looked up in bytes is a memchr; a one-byte bytes needle costs 7x more.)
        and _BACKSLASH not in data
        and _DOLLAR not in data
        and _DEL not in data
        and (len(data) <= _MAX_FIELD_NAME + 2 or _LONG_STRING.search(data) is None)
    ):
        return decoded
    return _decode_in_place(decoded)


def _checked_name(name: object, exc_type: type[Exception] = ProtocolError) -> str:
    """Check a field name (the same rule both ways) and remember it as valid."""
    checked = _check_field_name(name, exc_type)
    if len(_valid_names) >= _VALID_NAMES_LIMIT:
        _valid_names.clear()
    _valid_names.add(checked)
    return checked


def _decode_in_place(value: Any) -> Any:
    """decode_value for a structure we own: containers are reused, not rebuilt."""
    if type(value) is dict:
        if len(value) == 1:
            ((key, payload),) = value.items()
            if key in _SPECIAL_KEYS:
                return _decode_special(key, payload)
            if key in _RETIRED_KEYS:
                raise ProtocolError(f"{key} values are no longer supported by Convex")
        valid = _valid_names
        for k, v in value.items():
            if k not in valid:
                _checked_name(k)
            if type(v) is dict or type(v) is list:
                value[k] = _decode_in_place(v)
        return value
    if type(value) is list:
        for i, v in enumerate(value):
            if type(v) is dict or type(v) is list:
                value[i] = _decode_in_place(v)
        return value
    return value


def decode_raw_or_none(raw: msgspec.Raw) -> Any:
    """Decode a raw JSON Convex value; an empty Raw (an absent field) is None."""
    if not raw:
        return None
    try:
        return decode_json(raw)
    except JSON_ERRORS as exc:
        raise ProtocolError(f"invalid JSON value from the server: {exc}") from None


def _decode_special(key: str, payload: object) -> Any:
    if key == "$integer":
        raw = _unb64(payload, key)
        if len(raw) != 8:
            raise ProtocolError("$integer payload must be exactly 8 bytes")
        return Int64(struct.unpack("<q", raw)[0])
    if key == "$float":
        raw = _unb64(payload, key)
        if len(raw) != 8:
            raise ProtocolError("$float payload must be exactly 8 bytes")
        number: float = struct.unpack("<d", raw)[0]
        if not (math.isnan(number) or math.isinf(number) or _is_negative_zero(number)):
            raise ProtocolError("$float must only carry NaN, infinities or -0.0")
        return number
    if key == "$bytes":
        return _unb64(payload, key)
    # "$commitTs": a placeholder the server fills in; it has no Python meaning yet.
    return None


def _is_negative_zero(number: float) -> bool:
    return number == 0.0 and math.copysign(1, number) < 0
