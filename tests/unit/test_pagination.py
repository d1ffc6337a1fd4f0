"""PaginatedQuery on the sans-IO sync core: server results are fed in as Transitions, so
each test controls exactly what every page holds and when."""

from __future__ import annotations

import dataclasses
from typing import Any

import msgspec
import pytest

from dartvex_auth_better import (
    ClientClosedError,
    ConvexError,
    PaginatedQuery,
    PaginatedResult,
    PaginationStatus,
)
from dartvex_auth_better.convex._protocol import (
    QueryFailed,
    QueryUpdated,
    StateVersion,
    Transition,
    decode_ts,
    encode_ts,
)
from dartvex_auth_better.convex._query_set import LocalQuery
from dartvex_auth_better.convex._sync import SyncCore
from dartvex_auth_better.convex._values import encode_value

Status = PaginationStatus


class Harness:
    """A SyncCore with a recording ``send`` and helpers to answer its queries."""

    def __init__(self) -> None:
        self.core = SyncCore("session")
        self.frames: list[Any] = []
        self.core.send = self.frames.append

    def paginated(self, args: dict[str, Any] | None = None, page_size: int = 2) -> PaginatedQuery:
        return PaginatedQuery(self.core, "items:list", args, page_size=page_size)

    def pages(self) -> list[LocalQuery]:
        """Live page queries, oldest first."""
        return sorted(self.core.query_set, key=lambda q: q.query_id)

    def opts(self, query: LocalQuery) -> dict[str, Any]:
        opts: dict[str, Any] = query.args[0]["paginationOpts"]
        return opts

    def _transition(self, modification: QueryUpdated | QueryFailed) -> None:
        start = self.core.remote_version
        end = StateVersion(
            query_set=start.query_set, identity=0, ts=encode_ts(decode_ts(start.ts) + 1)
        )
        self.core.handle(Transition(start, end, [modification]))

    def answer(self, query: LocalQuery, value: Any) -> None:
        raw = msgspec.Raw(msgspec.json.encode(encode_value(value)))
        self._transition(QueryUpdated(query_id=query.query_id, value=raw, journal="j"))

    def answer_raw(self, query: LocalQuery, raw: bytes) -> None:
        self._transition(QueryUpdated(query_id=query.query_id, value=msgspec.Raw(raw)))

    def page(self, query: LocalQuery, items: list[Any], cont: str | None, **extra: Any) -> None:
        self.answer(
            query, {"page": items, "isDone": cont is None, "continueCursor": cont or "end", **extra}
        )

    def fail(self, query: LocalQuery, message: str) -> None:
        self._transition(QueryFailed(query_id=query.query_id, error_message=message))


def test_validation():
    h = Harness()
    for size in (0, -1):
        with pytest.raises(ValueError, match="page_size must be at least 1"):
            h.paginated(page_size=size)
    for bad in (True, 1.5, None):
        with pytest.raises(TypeError, match="page_size must be an int"):
            h.paginated(page_size=bad)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="paginationOpts"):
        h.paginated({"paginationOpts": {"numItems": 1}})
    with pytest.raises(TypeError):
        h.paginated(["not", "a", "mapping"])  # type: ignore[arg-type]
    assert len(h.core.query_set) == 0
    pq = h.paginated()
    with pytest.raises(ValueError, match="num_items"):
        pq.load_more(-1)


def test_first_page_args_and_ids():
    h = Harness()
    pq = h.paginated({"z": 1, "a": [1, 2]}, page_size=3)
    assert pq.current == PaginatedResult([], Status.LOADING_FIRST_PAGE, None)
    (query,) = h.pages()
    args = query.args[0]
    assert list(args) == ["a", "paginationOpts", "z"]  # key-sorted, as on the wire
    assert args["a"] == [1, 2] and args["z"] == 1
    assert list(args["paginationOpts"]) == ["cursor", "id", "numItems"]
    assert args["paginationOpts"]["cursor"] is None and args["paginationOpts"]["numItems"] == 3
    other = h.paginated({"z": 1, "a": [1, 2]}, page_size=3)
    assert len(h.pages()) == 2
    assert h.opts(h.pages()[1])["id"] != h.opts(query)["id"]
    assert "PaginatedQuery items:list LoadingFirstPage 1 pages" in repr(pq)
    pq.close()
    other.close()
    assert "closed" in repr(pq)
    assert len(h.core.query_set) == 0


def test_base_args_are_deep_copied():
    h = Harness()
    args: dict[str, Any] = {"tags": ["a"]}
    pq = h.paginated(args)
    args["tags"].append("b")
    h.page(h.pages()[0], [1, 2], "c1")
    assert pq.load_more()
    assert [q.args[0]["tags"] for q in h.pages()] == [["a"], ["a"]]


def test_statuses_load_more_rules_and_error_precedence():
    h = Harness()
    pq = h.paginated()
    assert pq.load_more() is False  # the first page has no result yet
    first = h.pages()[0]
    h.page(first, [1, 2], "c1")
    assert pq.current == PaginatedResult([1, 2], Status.CAN_LOAD_MORE)
    assert pq.load_more()
    second = h.pages()[1]
    assert h.opts(second) == {"cursor": "c1", "id": h.opts(first)["id"], "numItems": 2}
    assert pq.current == PaginatedResult([1, 2], Status.LOADING_MORE)
    assert pq.load_more() is False
    h.page(second, [3, 4], "c2")
    assert pq.load_more(5)
    third = h.pages()[2]
    assert h.opts(third)["numItems"] == 5 and h.opts(third)["cursor"] == "c2"
    # An error anywhere wins over loading; the pages before the failed one are kept.
    h.fail(second, "boom")
    snapshot = pq.current
    assert snapshot.status is Status.ERROR and snapshot.results == [1, 2]
    assert isinstance(snapshot.error, ConvexError) and snapshot.error.message == "boom"
    assert pq.load_more() is False
    h.page(second, [3, 4], "c2")
    h.page(third, [5], None)
    assert pq.current == PaginatedResult([1, 2, 3, 4, 5], Status.EXHAUSTED)
    assert pq.load_more() is False


def test_loading_more_means_a_later_page_is_loading_even_after_an_empty_first_page():
    h = Harness()
    pq = h.paginated()
    h.page(h.pages()[0], [], "c1")  # an empty page that is not the last
    assert pq.current == PaginatedResult([], Status.CAN_LOAD_MORE)
    assert pq.load_more()
    assert pq.current == PaginatedResult([], Status.LOADING_MORE)


def test_an_unchanged_result_is_not_a_new_snapshot():
    h = Harness()
    pq = h.paginated()
    h.page(h.pages()[0], [{"n": 1}], "c1")
    before = pq.current
    h.page(h.pages()[0], [{"n": 1}], "c1")
    assert pq.current is before
    h.fail(h.pages()[0], "boom")
    failed = pq.current
    h.answer_raw(h.pages()[0], b"7")  # invalid: an error built by the client
    invalid = pq.current
    assert invalid is not failed and invalid.error is not None
    assert pq.current is invalid  # re-reading does not rebuild the error


def test_snapshots_own_their_items():
    h = Harness()
    pq = h.paginated()
    h.page(h.pages()[0], [{"n": 1}], "c1")
    pq.current.results[0]["n"] = 99
    pq.current.results.append("junk")
    h.page(h.pages()[0], [{"n": 1}, {"n": 2}], "c1")
    assert pq.current.results == [{"n": 1}, {"n": 2}]
    with pytest.raises(dataclasses.FrozenInstanceError):
        pq.current.status = Status.ERROR  # type: ignore[misc]


def test_a_value_the_codec_rejects_is_a_page_error():
    h = Harness()
    pq = h.paginated()
    h.answer_raw(h.pages()[0], b'{"page": [{"$integer": "xx"}], "isDone": true}')
    snapshot = pq.current
    assert snapshot.status is Status.ERROR and snapshot.error is not None
    assert snapshot.error.message.startswith("Invalid paginated query result for items:list")


def test_split_halves_swap_in_only_when_both_have_data():
    h = Harness()
    pq = h.paginated()
    original = h.pages()[0]
    h.page(original, [1, 2, 3], "c1", splitCursor="s", pageStatus="SplitRecommended")
    assert pq.current == PaginatedResult([1, 2, 3], Status.CAN_LOAD_MORE)
    _, first, second = h.pages()
    assert h.opts(first)["cursor"] is None and h.opts(first)["endCursor"] == "s"
    assert h.opts(second)["cursor"] == "s" and h.opts(second)["endCursor"] == "c1"
    h.page(first, [1, 2], "s")
    assert h.pages() == [original, first, second]
    h.page(second, [3], "c1")
    before = pq.current
    assert h.pages() == [first, second]
    assert before == PaginatedResult([1, 2, 3], Status.CAN_LOAD_MORE)
    assert pq.load_more()
    assert h.opts(h.pages()[-1])["cursor"] == "c1"


def test_split_required_counts_as_loading_and_a_done_page_does_not_split_without_cursor():
    h = Harness()
    pq = h.paginated(page_size=1)
    h.page(h.pages()[0], [1], "c1")
    pq.load_more()
    h.page(h.pages()[1], [2], "c2", splitCursor="s", pageStatus="SplitRequired")
    assert pq.current == PaginatedResult([1], Status.LOADING_MORE)
    assert len(h.pages()) == 4  # the split is on its way
    # A final page without a continueCursor can be shown but not split.
    other = Harness()
    pq2 = other.paginated(page_size=1)
    other.answer(
        other.pages()[0],
        {"page": [1, 2, 3], "isDone": True, "continueCursor": None, "splitCursor": "s"},
    )
    assert pq2.current == PaginatedResult([1, 2, 3], Status.EXHAUSTED)
    assert len(other.pages()) == 1


def test_invalid_cursor_restarts_only_a_session_that_succeeded():
    h = Harness()
    pq = h.paginated()
    h.fail(h.pages()[0], "Uncaught Error: InvalidCursor: stale")
    assert pq.current.status is Status.ERROR
    assert len(h.pages()) == 1
    h.page(h.pages()[0], [1], "c1")
    pq.load_more()
    old_id = h.opts(h.pages()[0])["id"]
    h.fail(h.pages()[1], "InvalidCursor")
    assert pq.current == PaginatedResult([], Status.LOADING_FIRST_PAGE)
    (fresh,) = h.pages()
    assert h.opts(fresh)["cursor"] is None and h.opts(fresh)["id"] != old_id


@pytest.mark.anyio
async def test_a_stopped_client_ends_reading():
    h = Harness()
    pq = h.paginated()
    h.page(h.pages()[0], [1], "c1")
    last = await pq.next()
    h.core.terminate(ClientClosedError("closed"))
    with pytest.raises(ClientClosedError):
        await pq.next()
    assert pq.load_more() is False
    assert pq.current is last
    pq.close()  # no unsubscribe frames for a dead core
    assert pq.current is last


def test_status_values_are_the_official_names():
    assert [s.value for s in Status] == [
        "LoadingFirstPage",
        "LoadingMore",
        "CanLoadMore",
        "Exhausted",
        "Error",
    ]
    assert PaginatedResult([], Status.LOADING_MORE).is_loading
    assert not PaginatedResult([], Status.ERROR).is_loading
