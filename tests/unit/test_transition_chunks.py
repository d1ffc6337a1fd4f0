"""TransitionChunk reassembly: parts in order, one id and one total, and they must form a
Transition (the Dart original's ws_manager_test.dart chunk cases)."""

from __future__ import annotations

from typing import Any

import msgspec
import pytest

from dartvex_auth_better import ProtocolError
from dartvex_auth_better.convex._client import _ChunkBuffer
from dartvex_auth_better.convex._protocol import (
    Transition,
    TransitionChunk,
    decode_server_message,
    encode_ts,
)

TRANSITION = msgspec.json.encode(
    {
        "type": "Transition",
        "startVersion": {"querySet": 0, "identity": 0, "ts": encode_ts(0)},
        "endVersion": {"querySet": 1, "identity": 0, "ts": encode_ts(7)},
        "modifications": [
            {"type": "QueryUpdated", "queryId": 0, "value": "é" * 40, "logLines": []}
        ],
    }
).decode()


def chunk(text: str, part: int, total: int, transition_id: str = "t") -> TransitionChunk:
    frame: dict[str, Any] = {
        "type": "TransitionChunk",
        "chunk": text,
        "partNumber": part,
        "totalParts": total,
        "transitionId": transition_id,
    }
    decoded = decode_server_message(msgspec.json.encode(frame))
    assert isinstance(decoded, TransitionChunk)
    return decoded


def split(text: str, parts: int) -> list[str]:
    size = -(-len(text) // parts)
    return [text[i : i + size] for i in range(0, len(text), size)]


@pytest.mark.parametrize("parts", [1, 2, 7])
def test_parts_in_order_form_the_transition(parts: int):
    buffer = _ChunkBuffer()
    pieces = split(TRANSITION, parts)
    results = [buffer.add(chunk(p, n, len(pieces))) for n, p in enumerate(pieces)]
    assert results[:-1] == [None] * (len(pieces) - 1)
    whole = results[-1]
    assert isinstance(whole, Transition) and whole.end_version.ts == encode_ts(7)
    assert not buffer.pending
    # The buffer is ready for the next run.
    again = [buffer.add(chunk(p, n, len(pieces), "u")) for n, p in enumerate(pieces)]
    assert isinstance(again[-1], Transition)


def test_a_part_out_of_order_is_a_protocol_error():
    buffer = _ChunkBuffer()
    a, b, c = split(TRANSITION, 3)
    with pytest.raises(ProtocolError, match="out of order"):
        buffer.add(chunk(b, 1, 3))
    buffer = _ChunkBuffer()
    buffer.add(chunk(a, 0, 3))
    with pytest.raises(ProtocolError, match="out of order"):
        buffer.add(chunk(c, 2, 3))


def test_a_repeated_part_is_a_protocol_error():
    buffer = _ChunkBuffer()
    a, _ = split(TRANSITION, 2)
    buffer.add(chunk(a, 0, 2))
    with pytest.raises(ProtocolError):
        buffer.add(chunk(a, 0, 2))


@pytest.mark.parametrize(("transition_id", "total"), [("other", 2), ("t", 3)], ids=["id", "total"])
def test_a_mismatched_id_or_total_is_a_protocol_error(transition_id: str, total: int):
    buffer = _ChunkBuffer()
    a, b = split(TRANSITION, 2)
    buffer.add(chunk(a, 0, 2))
    with pytest.raises(ProtocolError, match="mismatched"):
        buffer.add(chunk(b, 1, total, transition_id))


@pytest.mark.parametrize(
    "text",
    ['{"type":"Ping"}', '{"type":"Transition"', "not json"],
    ids=["not-a-transition", "truncated", "not-json"],
)
def test_parts_that_do_not_form_a_transition_are_a_protocol_error(text: str):
    buffer = _ChunkBuffer()
    a, b = text[:3], text[3:]
    buffer.add(chunk(a, 0, 2))
    with pytest.raises(ProtocolError):
        buffer.add(chunk(b, 1, 2))
