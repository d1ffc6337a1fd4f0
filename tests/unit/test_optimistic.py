"""OptimisticLayers and OptimisticLocalStore over a QuerySet.

Ports test/sync/optimistic_updates_test.dart: pass-through with no layers, error results
read as None, increments replayed over new server data, only touched queries reported,
stacking and dropping layers, store semantics (set None, clear = loading, args copied,
get_all_queries), and throwing updates at apply and at replay time.
"""

from __future__ import annotations

import asyncio
from typing import Any

import msgspec
import pytest

from dartvex_auth_better.convex._optimistic import OptimisticLayers, OptimisticLocalStore
from dartvex_auth_better.convex._protocol import QueryFailed, QueryUpdated
from dartvex_auth_better.convex._query_set import LocalQuery, QuerySet, query_token
from dartvex_auth_better.convex._values import encode_args, encode_value


def make() -> tuple[QuerySet, OptimisticLayers]:
    query_set = QuerySet()
    return query_set, OptimisticLayers(query_set)


def live(query_set: QuerySet, name: str, args: dict[str, Any] | None = None) -> LocalQuery:
    query, _ = query_set.subscribe(name, encode_args(args), asyncio.Event())
    return query


def server(query_set: QuerySet, query: LocalQuery, value: Any) -> None:
    query_set.apply(
        msgspec.convert(
            {
                "type": "QueryUpdated",
                "queryId": query.query_id,
                "value": msgspec.Raw(msgspec.json.encode(encode_value(value))),
            },
            QueryUpdated,
        )
    )


def server_error(query_set: QuerySet, query: LocalQuery) -> None:
    query_set.apply(
        msgspec.convert(
            {"type": "QueryFailed", "queryId": query.query_id, "errorMessage": "boom"},
            QueryFailed,
        )
    )


def shown(query: LocalQuery) -> Any:
    result = query.effective
    assert result is not None, "loading"
    return result.unwrap()


def token(name: str, args: dict[str, Any] | None = None) -> bytes:
    return query_token(name, encode_args(args))


def increment(store: OptimisticLocalStore) -> None:
    store.set_query("c:get", None, store.get_query("c:get") + 1)


def double(store: OptimisticLocalStore) -> None:
    store.set_query("c:get", None, store.get_query("c:get") * 2)


def test_no_layers_means_server_results_pass_through():
    query_set, layers = make()
    query = live(query_set, "c:get")
    server(query_set, query, 100)
    assert layers.rebuild(set()) == set()
    assert shown(query) == 100 and not query.has_pending_writes


def test_an_error_result_reads_as_none_in_the_store():
    query_set, layers = make()
    query = live(query_set, "c:get")
    server_error(query_set, query)
    seen: list[Any] = []
    layers.add(0, lambda store: seen.append(store.get_query("c:get")))
    assert seen == [None]


def test_an_increment_is_replayed_over_new_server_data_until_dropped():
    query_set, layers = make()
    query = live(query_set, "c:get")
    server(query_set, query, 100)
    assert layers.add(0, increment) == {token("c:get")}
    assert shown(query) == 101 and query.has_pending_writes

    server(query_set, query, 200)
    assert layers.rebuild(set()) == {token("c:get")}
    assert shown(query) == 201

    server(query_set, query, 300)
    layers.rebuild({0})
    assert shown(query) == 300 and not query.has_pending_writes
    assert len(layers) == 0


def test_only_touched_queries_are_reported_as_changed():
    query_set, layers = make()
    a, b = live(query_set, "c:get"), live(query_set, "other:get")
    server(query_set, a, 1)
    server(query_set, b, 1)
    assert layers.add(0, increment) == {token("c:get")}
    assert b.optimistic is None
    # A replay that produces the same overlay reports nothing.
    assert layers.rebuild(set()) == set()


def test_stacked_layers_compose_in_order_and_drop_independently():
    query_set, layers = make()
    query = live(query_set, "c:get")
    server(query_set, query, 2)
    layers.add(0, increment)
    layers.add(1, double)
    assert shown(query) == 6
    layers.rebuild({0})
    assert shown(query) == 4
    layers.rebuild({1})
    assert shown(query) == 2 and len(layers) == 0


def test_set_query_none_is_a_convex_null_not_loading():
    query_set, layers = make()
    query = live(query_set, "c:get")
    server(query_set, query, 5)
    layers.add(0, lambda store: store.set_query("c:get", None, None))
    assert query.effective is not None and shown(query) is None


def test_clear_query_shows_loading():
    query_set, layers = make()
    query = live(query_set, "c:get")
    server(query_set, query, 5)
    layers.add(0, lambda store: store.clear_query("c:get"))
    assert query.effective is None and query.has_pending_writes
    seen: list[Any] = []
    layers.add(1, lambda store: seen.append(store.get_query("c:get")))
    assert seen == [None]  # later layers read the cleared query as None
    layers.rebuild({0, 1})
    assert shown(query) == 5


def test_set_query_copies_args_so_later_caller_changes_do_not_leak():
    _, layers = make()
    args: dict[str, Any] = {"filter": {"tags": ["a"]}}
    layers.add(0, lambda store: store.set_query("m:list", args, ["x"]))
    args["filter"]["tags"].append("b")
    seen: list[Any] = []
    layers.add(1, lambda store: seen.extend(store.get_all_queries("m:list")))
    assert seen == [({"filter": {"tags": ["a"]}}, ["x"])]


def test_get_all_queries_lists_server_and_optimistic_instances():
    query_set, layers = make()
    one = live(query_set, "m:list", {"ch": "one"})
    live(query_set, "m:list", {"ch": "loading"})
    live(query_set, "other:list", {"ch": "one"})
    server(query_set, one, ["hello"])
    seen: list[Any] = []

    def update(store: OptimisticLocalStore) -> None:
        store.set_query("m:list", {"ch": "new"}, [])
        seen.extend(store.get_all_queries("m.js:list"))

    layers.add(0, update)
    assert sorted(seen, key=lambda entry: entry[0]["ch"]) == [
        ({"ch": "loading"}, None),
        ({"ch": "new"}, []),
        ({"ch": "one"}, ["hello"]),
    ]


def test_args_handed_out_by_get_all_queries_are_copies():
    query_set, layers = make()
    query = live(query_set, "m:list", {"ch": "one"})

    def meddle(store: OptimisticLocalStore) -> None:
        for args, _ in store.get_all_queries("m:list"):
            args["ch"] = "changed"

    layers.add(0, meddle)
    assert query.add_modification().args == [{"ch": "one"}]  # what a reconnect replays


def test_values_read_from_the_store_are_copies():
    query_set, layers = make()
    query = live(query_set, "m:list")
    server(query_set, query, [1])
    layers.add(0, lambda store: store.get_query("m:list").append(2))
    assert shown(query) == [1] and not query.has_pending_writes


def test_get_query_of_an_unknown_query_is_none():
    _, layers = make()
    seen: list[Any] = []
    layers.add(0, lambda store: seen.append(store.get_query("nobody:home", {"x": 1})))
    assert seen == [None]


def test_an_update_that_raises_at_apply_time_leaves_nothing_behind():
    query_set, layers = make()
    query = live(query_set, "c:get")
    server(query_set, query, 1)

    def broken(store: OptimisticLocalStore) -> None:
        store.set_query("c:get", None, 999)
        raise RuntimeError("bug")

    with pytest.raises(RuntimeError, match="bug"):
        layers.add(0, broken)
    assert len(layers) == 0
    assert shown(query) == 1 and not query.has_pending_writes


def test_a_layer_that_raises_at_replay_time_is_dropped_alone():
    query_set, layers = make()
    query = live(query_set, "c:get")
    server(query_set, query, 1)
    layers.add(0, increment)  # int + 1: fails once the server holds a string
    layers.add(1, lambda store: store.set_query("flag:get", None, True))
    server(query_set, query, "not a number")
    layers.rebuild(set())
    assert len(layers) == 1
    assert shown(query) == "not a number" and not query.has_pending_writes
    seen: list[Any] = []
    layers.add(2, lambda store: seen.append(store.get_query("flag:get")))
    assert seen == [True]


def test_an_optimistic_only_query_takes_its_value_when_subscribed():
    query_set, layers = make()
    layers.add(0, lambda store: store.set_query("m:list", {"ch": "x"}, ["guess"]))
    query = live(query_set, "m:list", {"ch": "x"})
    layers.refresh(query)
    assert shown(query) == ["guess"] and query.has_pending_writes
