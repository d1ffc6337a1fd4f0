"""Wire types of the Convex sync protocol, one encoder and one decoder.

Client messages are built by the client and only ever encoded; server messages are only
ever decoded. Function values stay as ``msgspec.Raw`` (undecoded JSON) inside server
messages until something needs them: most Transitions are delivered to at most one
subscriber, often only as "latest value", so decoding eagerly would be wasted work.

Unknown fields are ignored (servers add fields); unknown message types, missing required
fields and wrong field types raise ``ProtocolError``.
"""

from __future__ import annotations

import base64
import binascii
import struct
from typing import Any, Literal

import msgspec

from .._errors import ProtocolError
from .._json import JSON_ERRORS

__all__ = [
    "INITIAL_TS",
    "NO_DATA",
    "ActionMsg",
    "ActionResponse",
    "AddQuery",
    "AuthError",
    "Authenticate",
    "Connect",
    "FatalError",
    "ModifyQuerySet",
    "MutationMsg",
    "MutationResponse",
    "Ping",
    "QueryFailed",
    "QueryRemoved",
    "QueryUpdated",
    "RemoveQuery",
    "ServerMessage",
    "StateVersion",
    "Transition",
    "TransitionChunk",
    "decode_server_message",
    "decode_ts",
    "encode_client_message",
    "encode_ts",
]

INITIAL_TS = "AAAAAAAAAAA="
_a2b_base64 = binascii.a2b_base64
# Marks an absent errorData (msgspec.Raw cannot share a union with None).
NO_DATA = msgspec.Raw()


def encode_ts(ts: int) -> str:
    """Encode a u64 timestamp as the protocol's base64 of 8 little-endian bytes."""
    return base64.b64encode(struct.pack("<Q", ts)).decode("ascii")


def decode_ts(text: str) -> int:
    """Decode a protocol timestamp; raises ProtocolError when it is not 8 bytes of base64.

    Called for every Transition: binascii directly (strict: only the alphabet, padding
    only at the end), not base64.b64decode's validating regex."""
    try:
        raw = _a2b_base64(text, strict_mode=True)
    except (ValueError, TypeError) as exc:  # binascii.Error is a ValueError
        raise ProtocolError("timestamp is not valid base64") from exc
    if len(raw) != 8:
        raise ProtocolError("timestamp must be exactly 8 bytes")
    return int.from_bytes(raw, "little")


# ---------------------------------------------------------------------------------------
# Client -> server


class _ClientMsg(msgspec.Struct, rename="camel", omit_defaults=True, tag_field="type"):
    pass


class Connect(_ClientMsg, tag="Connect"):
    session_id: str
    connection_count: int
    last_close_reason: str | None
    client_ts: int
    max_observed_timestamp: str | None = None


class AddQuery(msgspec.Struct, rename="camel", tag_field="type", tag="Add"):
    query_id: int
    udf_path: str
    args: list[Any]
    journal: str | None = None


class RemoveQuery(msgspec.Struct, rename="camel", tag_field="type", tag="Remove"):
    query_id: int


class ModifyQuerySet(_ClientMsg, tag="ModifyQuerySet"):
    base_version: int
    new_version: int
    modifications: list[AddQuery | RemoveQuery]


class MutationMsg(_ClientMsg, tag="Mutation"):
    request_id: int
    udf_path: str
    args: list[Any]


class ActionMsg(_ClientMsg, tag="Action"):
    request_id: int
    udf_path: str
    args: list[Any]


class Authenticate(_ClientMsg, tag="Authenticate"):
    base_version: int
    token_type: Literal["User", "None", "Admin"]
    value: str | None = None

    def __repr__(self) -> str:  # never show the token
        shown = "…" + self.value[-4:] if self.value else None
        return (
            f"Authenticate(base_version={self.base_version}, "
            f"token_type={self.token_type!r}, value={shown!r})"
        )


_encoder = msgspec.json.Encoder()


def encode_client_message(msg: _ClientMsg) -> bytes:
    """Serialise one client message to the JSON text of a frame.

    Raises ValueError for what JSON text cannot carry (a lone surrogate in a string) or
    what is nested too deeply (the values in a message were checked by ``encode_value``
    already, so for them this is only a second line of defence)."""
    try:
        return _encoder.encode(msg)
    except (UnicodeEncodeError, RecursionError) as exc:
        raise ValueError(
            f"the {type(msg).__name__} message cannot be encoded: {_why(exc)}"
        ) from None


def _why(exc: UnicodeEncodeError | RecursionError) -> str:
    if isinstance(exc, UnicodeEncodeError):
        return "a string contains a lone surrogate, which is not valid Unicode text"
    return "a value is nested too deeply"


# ---------------------------------------------------------------------------------------
# Server -> client


class StateVersion(msgspec.Struct, rename="camel", frozen=True):
    query_set: int
    identity: int
    ts: str


class QueryUpdated(msgspec.Struct, rename="camel", tag_field="type", tag="QueryUpdated"):
    query_id: int
    value: msgspec.Raw
    log_lines: list[str] = []
    # UNSET when the key is absent (keep the last journal); None clears it.
    journal: str | msgspec.UnsetType | None = msgspec.UNSET


class QueryFailed(msgspec.Struct, rename="camel", tag_field="type", tag="QueryFailed"):
    query_id: int
    error_message: str
    log_lines: list[str] = []
    error_data: msgspec.Raw = NO_DATA
    journal: str | msgspec.UnsetType | None = msgspec.UNSET


class QueryRemoved(msgspec.Struct, rename="camel", tag_field="type", tag="QueryRemoved"):
    query_id: int


class _ServerMsg(msgspec.Struct, rename="camel", tag_field="type"):
    pass


class Transition(_ServerMsg, tag="Transition"):
    start_version: StateVersion
    end_version: StateVersion
    modifications: list[QueryUpdated | QueryFailed | QueryRemoved]
    client_clock_skew: float | None = None
    server_ts: float | None = None


class TransitionChunk(_ServerMsg, tag="TransitionChunk"):
    chunk: str
    part_number: int
    total_parts: int
    transition_id: str


class MutationResponse(_ServerMsg, tag="MutationResponse"):
    request_id: int
    success: bool
    result: msgspec.Raw = msgspec.Raw(b"null")
    ts: str | None = None
    log_lines: list[str] = []
    error_data: msgspec.Raw = NO_DATA


class ActionResponse(_ServerMsg, tag="ActionResponse"):
    request_id: int
    success: bool
    result: msgspec.Raw = msgspec.Raw(b"null")
    log_lines: list[str] = []
    error_data: msgspec.Raw = NO_DATA


class AuthError(_ServerMsg, tag="AuthError"):
    error: str = ""
    base_version: int | None = None
    auth_update_attempted: bool | None = None


class FatalError(_ServerMsg, tag="FatalError"):
    error: str = ""


class Ping(_ServerMsg, tag="Ping"):
    pass


ServerMessage = (
    Transition | TransitionChunk | MutationResponse | ActionResponse | AuthError | FatalError | Ping
)

_decoder = msgspec.json.Decoder(ServerMessage)

# The socket loop's split of decode_server_message, one call less per frame: decode_frame
# (raises one of DecodeError, reported as decode_server_message reports it), then
# check_server_message for anything but a Transition.
decode_frame = _decoder.decode
DecodeError = JSON_ERRORS


def decode_error(exc: Exception) -> ProtocolError:
    if isinstance(exc, RecursionError):
        return ProtocolError("invalid server message: JSON nested too deeply")
    return ProtocolError(f"invalid server message: {exc}")


def check_server_message(msg: ServerMessage) -> ServerMessage:
    """The checks beyond the types (a Transition needs none)."""
    if type(msg) is MutationResponse and msg.success and msg.ts is None:
        raise ProtocolError("invalid server message: successful MutationResponse without ts")
    return msg


def decode_server_message(data: bytes | str) -> ServerMessage:
    """Parse one server frame. Raises ProtocolError for anything that is not a valid message."""
    try:
        msg: ServerMessage = _decoder.decode(data)
    except JSON_ERRORS as exc:
        raise decode_error(exc) from None
    return check_server_message(msg)
