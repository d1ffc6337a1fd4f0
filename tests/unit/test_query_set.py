"""QuerySet: ids, coalescing, versions, journals and stored results.

Ports test/sync/local_state_test.dart and the query parts of §2e of the behaviour
reference (udf path canonicalisation, query tokens, separate id counters, versions bumped
when a ModifyQuerySet is created, journals, "every re-added query answered").
"""

from __future__ import annotations

import asyncio
from typing import Any

import msgspec
import pytest

from dartvex_auth_better import ConvexError
from dartvex_auth_better.convex._protocol import (
    QueryFailed,
    QueryUpdated,
    RemoveQuery,
)
from dartvex_auth_better.convex._query_set import (
    QueryResult,
    QuerySet,
    canonical_udf_path,
    query_token,
)
from dartvex_auth_better.convex._values import Int64, encode_args, encode_value


@pytest.mark.parametrize(
    ("name", "canonical"),
    [
        ("msgs", "msgs:default"),
        ("a.js:f", "a:f"),
        ("a:f", "a:f"),
        ("dir/mod.js:fn", "dir/mod:fn"),
        ("dir/mod", "dir/mod:default"),
        ("a:b:c", "a:b:c"),  # split on the last ':'
    ],
)
def test_function_names_are_canonicalised(name: str, canonical: str):
    assert canonical_udf_path(name) == canonical


@pytest.mark.parametrize("name", ["", ":f", "m:", ".js:f"])
def test_malformed_function_names_are_rejected(name: str):
    with pytest.raises(ValueError, match="function name"):
        canonical_udf_path(name)


def test_query_token_ignores_key_order_but_not_values_or_path():
    a = query_token("m:f", encode_args({"x": 1, "y": [1, {"b": 2, "a": 1}]}))
    b = query_token("m:f", encode_args({"y": [1, {"a": 1, "b": 2}], "x": 1}))
    assert a == b
    assert a != query_token("m:g", encode_args({"x": 1, "y": [1, {"a": 1, "b": 2}]}))
    assert a != query_token("m:f", encode_args({"x": 2, "y": [1, {"a": 1, "b": 2}]}))
    # float64 1 and int64 1 are different Convex values, so different queries.
    assert query_token("m:f", encode_args({"x": 1})) != query_token(
        "m:f", encode_args({"x": Int64(1)})
    )


def test_identical_queries_coalesce_and_ids_are_never_reused():
    qs = QuerySet()
    w1, w2, w3 = asyncio.Event(), asyncio.Event(), asyncio.Event()
    a, add_a = qs.subscribe("m:f", encode_args({"k": 1}), w1)
    same, add_same = qs.subscribe("m:f", encode_args({"k": 1}), w2)
    assert same is a and add_same is None and add_a is not None
    assert (add_a.query_id, add_a.udf_path, add_a.args, add_a.journal) == (
        0,
        "m:f",
        [{"k": 1}],
        None,
    )

    assert qs.unsubscribe(a, w1) is None  # w2 still listens
    assert qs.unsubscribe(a, w2) == RemoveQuery(query_id=0)
    assert qs.unsubscribe(a, w2) is None  # a second unsubscribe is a no-op
    assert len(qs) == 0

    again, add_again = qs.subscribe("m:f", encode_args({"k": 1}), w3)
    assert again is not a and add_again is not None
    assert again.query_id == 1  # id 0 is never handed out again


def test_each_modify_query_set_takes_the_next_version_when_created():
    qs = QuerySet()
    first = qs.modify([])
    second = qs.modify([RemoveQuery(query_id=0)])
    assert (first.base_version, first.new_version) == (0, 1)
    assert (second.base_version, second.new_version) == (1, 2)
    assert qs.version == 2


def test_restart_re_adds_every_query_from_version_zero_with_its_journal():
    qs = QuerySet()
    a, _ = qs.subscribe("m:a", encode_args(None), asyncio.Event())
    b, _ = qs.subscribe("m:b", encode_args({"n": 1}), asyncio.Event())
    qs.modify([])
    qs.modify([])
    b.journal = "cursor-b"

    msg = qs.restart()

    assert (msg.base_version, msg.new_version) == (0, 1)
    assert [(m.query_id, m.udf_path, m.args, m.journal) for m in msg.modifications] == [  # type: ignore[union-attr]
        (a.query_id, "m:a", [{}], None),
        (b.query_id, "m:b", [{"n": 1}], "cursor-b"),
    ]
    assert qs.version == 1


def test_restart_with_no_queries_is_empty_and_synced():
    qs = QuerySet()
    msg = qs.restart()
    assert msg.modifications == [] and qs.version == 1
    assert qs.synced()


def updated(query_id: int, value: Any, **extra: Any) -> QueryUpdated:
    return msgspec.convert(
        {
            "type": "QueryUpdated",
            "queryId": query_id,
            "value": msgspec.Raw(msgspec.json.encode(encode_value(value))),
            **extra,
        },
        QueryUpdated,
    )


def failed(query_id: int, **extra: Any) -> QueryFailed:
    return msgspec.json.decode(
        msgspec.json.encode(
            {"type": "QueryFailed", "queryId": query_id, "errorMessage": "boom", **extra}
        ),
        type=QueryFailed,
    )


def test_synced_needs_an_answer_for_every_re_added_query():
    qs = QuerySet()
    a, _ = qs.subscribe("m:a", encode_args(None), asyncio.Event())
    b, _ = qs.subscribe("m:b", encode_args(None), asyncio.Event())
    c, _ = qs.subscribe("m:c", encode_args(None), asyncio.Event())
    assert qs.synced()  # nothing was re-added yet
    qs.restart()
    assert not qs.synced()
    qs.apply(updated(a.query_id, 1))
    qs.apply(failed(b.query_id))
    assert not qs.synced()
    qs.removed_by_server(c.query_id)
    assert qs.synced()


def test_unsubscribing_an_unanswered_query_counts_as_answered():
    qs = QuerySet()
    waker = asyncio.Event()
    a, _ = qs.subscribe("m:a", encode_args(None), waker)
    qs.restart()
    qs.unsubscribe(a, waker)
    assert qs.synced()


def test_a_query_subscribed_after_the_restart_does_not_hold_synced_back():
    qs = QuerySet()
    qs.restart()
    qs.subscribe("m:a", encode_args(None), asyncio.Event())
    assert qs.synced()


def test_results_for_unknown_query_ids_are_dropped():
    qs = QuerySet()
    waker = asyncio.Event()
    a, _ = qs.subscribe("m:a", encode_args(None), waker)
    qs.unsubscribe(a, waker)
    assert qs.apply(updated(a.query_id, 1)) is None
    assert qs.removed_by_server(a.query_id) is None
    assert qs.apply(updated(99, 1)) is None


def test_journal_absent_keeps_null_clears():
    qs = QuerySet()
    a, _ = qs.subscribe("m:a", encode_args(None), asyncio.Event())
    qs.apply(updated(a.query_id, 1, journal="j1"))
    assert a.journal == "j1"
    qs.apply(updated(a.query_id, 2))
    assert a.journal == "j1"
    qs.apply(failed(a.query_id, journal="j2"))
    assert a.journal == "j2"
    qs.apply(failed(a.query_id))
    assert a.journal == "j2"
    qs.apply(updated(a.query_id, 3, journal=None))
    assert a.journal is None


def test_server_results_are_stored_and_counted():
    qs = QuerySet()
    a, _ = qs.subscribe("m:a", encode_args(None), asyncio.Event())
    assert a.effective is None and a.server_version == 0
    qs.apply(updated(a.query_id, {"n": Int64(5)}, logLines=["[LOG] hi"]))
    assert a.effective is not None
    assert a.effective.unwrap() == {"n": Int64(5)}
    assert a.effective.log_lines == ["[LOG] hi"]
    qs.apply(failed(a.query_id, errorData={"code": "X"}, logLines=["[ERROR] e"]))
    assert a.server_version == 2
    with pytest.raises(ConvexError) as caught:
        a.effective.unwrap()
    assert (caught.value.message, caught.value.data, caught.value.log_lines) == (
        "boom",
        {"code": "X"},
        ["[ERROR] e"],
    )


def test_a_query_removed_by_the_server_reads_as_an_error():
    qs = QuerySet()
    a, _ = qs.subscribe("m:a", encode_args(None), asyncio.Event())
    assert qs.removed_by_server(a.query_id) is a
    assert a.server is not None and a.server.error is not None
    assert len(qs) == 1  # still subscribed: the subscriber decides


def test_unwrap_hands_out_fresh_copies():
    from_server = QueryResult(raw=msgspec.Raw(b'{"items":[1,2]}'))
    first = from_server.unwrap()
    first["items"].append(3)
    assert from_server.unwrap() == {"items": [1, 2]}

    optimistic = QueryResult(value={"items": [1]})
    copy = optimistic.unwrap()
    copy["items"].append(2)
    assert optimistic.unwrap() == {"items": [1]}


def test_value_or_none_reads_errors_as_none():
    assert QueryResult(error=ConvexError("x")).value_or_none() is None
    assert QueryResult(raw=msgspec.Raw(b"null")).value_or_none() is None
    assert QueryResult(raw=msgspec.Raw(b"[1]")).value_or_none() == [1]


def test_effective_prefers_loading_then_optimistic_then_server():
    qs = QuerySet()
    a, _ = qs.subscribe("m:a", encode_args(None), asyncio.Event())
    qs.apply(updated(a.query_id, "server"))
    assert a.effective is not None and a.effective.unwrap() == "server"
    assert not a.has_pending_writes
    a.optimistic = QueryResult(value="guess")
    assert a.effective.unwrap() == "guess" and a.has_pending_writes
    a.optimistic_loading = True
    assert a.effective is None and a.has_pending_writes


def test_notify_bumps_the_version_and_wakes_every_subscriber():
    qs = QuerySet()
    w1, w2 = asyncio.Event(), asyncio.Event()
    a, _ = qs.subscribe("m:a", encode_args(None), w1)
    qs.subscribe("m:a", encode_args(None), w2)
    a.notify()
    assert a.version == 1 and w1.is_set() and w2.is_set()


def test_iteration_is_a_snapshot_safe_against_unsubscribing():
    qs = QuerySet()
    wakers = [asyncio.Event() for _ in range(3)]
    for i, w in enumerate(wakers):
        qs.subscribe(f"m:q{i}", encode_args(None), w)
    for query, waker in zip(qs, wakers, strict=True):
        qs.unsubscribe(query, waker)
    assert len(qs) == 0
