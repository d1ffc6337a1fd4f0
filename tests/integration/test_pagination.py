"""Paginated queries end to end: ConvexClient.paginated_query against LocalConvex over a
real socket, with LocalConvex's own ``ctx.db.paginate`` serving the pages.

Ports the edge cases of dartvex's paginated_query_test and the pagination lines of its
client_test, plus what the Dart client lacks (per-session ids, InvalidCursor restarts,
recovery from a failed page, SplitRequired). Waits are on snapshots, server-side frames
or subscriptions, always under a deadline; nothing sleeps to synchronise.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from typing import Any, TypeVar

import anyio
import pytest

from dartvex_auth_better import (
    ClientClosedError,
    ConvexClient,
    ConvexError,
    OptimisticLocalStore,
    PaginatedQuery,
    PaginatedResult,
    PaginationStatus,
)
from dartvex_auth_better.testing import LocalConvex
from dartvex_auth_better.testing._convex_server import ConnectionRecord, MutationCtx, QueryCtx

pytestmark = [pytest.mark.anyio, pytest.mark.integration]

DEADLINE = 15.0
T = TypeVar("T")
Status = PaginationStatus


# -- the app under test ------------------------------------------------------------------


class App:
    """LocalConvex functions for the tests, with knobs kept in a ``knobs`` table so that
    changing one re-runs the pages (every page reads it)."""

    def __init__(self, convex: LocalConvex) -> None:
        self.convex = convex
        # Split halves (pages with an endCursor) wait on this while the holdHalves knob
        # is set, which keeps them loading on the client.
        self.halves_gate = anyio.Event()
        self.ids: dict[int, str] = {}

        @convex.query("items:list")
        async def list_items(ctx: QueryCtx, args: dict[str, Any]) -> Any:
            knobs = knobs_of(ctx)
            opts = args["paginationOpts"]
            if opts.get("endCursor") is not None:
                if knobs.get("holdHalves"):
                    await self.halves_gate.wait()
                if knobs.get("failHalves"):
                    raise ConvexError("half failed")
            if opts["cursor"] is not None and knobs.get("failLater"):
                raise ConvexError("boom", data={"page": "later"})
            if knobs.get("alwaysInvalid") or (
                knobs.get("invalidLater") and opts["cursor"] is not None
            ):
                raise ConvexError("InvalidCursor: made up by the test")
            return ctx.db.paginate(
                "items",
                opts,
                order=args.get("order", "asc"),
                filter=(lambda d: d.get("tag") == args["tag"]) if "tag" in args else None,
                split_recommended_over=knobs.get("recommended"),
                split_required_over=knobs.get("required"),
            )

        @convex.query("items:count")
        def count(ctx: QueryCtx, args: dict[str, Any]) -> int:
            return len(ctx.db.query("items"))

        @convex.query("marker:get")
        def marker(ctx: QueryCtx, args: dict[str, Any]) -> int:
            return len(ctx.db.query("marker"))

        @convex.query("bad:list")
        def bad(ctx: QueryCtx, args: dict[str, Any]) -> Any:
            return args["value"]

        @convex.query("twice:list")
        def twice(ctx: QueryCtx, args: dict[str, Any]) -> Any:
            ctx.db.paginate("items", args["paginationOpts"])
            return ctx.db.paginate("items", args["paginationOpts"])

        @convex.mutation("items:add")
        def add(ctx: MutationCtx, args: dict[str, Any]) -> str:
            return ctx.db.insert("items", {"n": args["n"]})

        @convex.mutation("items:reject")
        def reject(ctx: MutationCtx, args: dict[str, Any]) -> None:
            raise ConvexError("rejected")

        @convex.mutation("noop:touch")
        def touch(ctx: MutationCtx, args: dict[str, Any]) -> None:
            ctx.db.insert("touches", {})

    def seed(self, *numbers: int) -> None:
        for n in numbers:
            self.ids[n] = self.convex.db.insert("items", {"n": n})

    def set_knobs(self, **values: Any) -> None:
        docs = self.convex.db.query("knobs")
        if docs:
            self.convex.db.patch(docs[0]["_id"], values)
        else:
            self.convex.db.insert("knobs", values)

    def bump_marker(self) -> None:
        self.convex.db.insert("marker", {})


def knobs_of(ctx: QueryCtx) -> dict[str, Any]:
    docs = ctx.db.query("knobs")
    return docs[0] if docs else {}


@asynccontextmanager
async def stack() -> AsyncIterator[tuple[App, ConvexClient, ConnectionRecord]]:
    with anyio.fail_after(DEADLINE):
        async with LocalConvex() as convex:
            app = App(convex)
            async with ConvexClient(convex.url) as client:
                await client.wait_connected()
                record = await convex.wait_for_connections(1)
                yield app, client, record


# -- helpers ---------------------------------------------------------------------------


def ns(snapshot: PaginatedResult) -> list[Any]:
    return [item["n"] for item in snapshot.results]


async def until(
    pq: PaginatedQuery, predicate: Callable[[PaginatedResult], bool]
) -> PaginatedResult:
    """Read snapshots (which also drives the query's splits and restarts) until one
    matches; the test's deadline bounds the wait."""
    snapshot = pq.current
    while not predicate(snapshot):
        snapshot = await pq.next()
    return snapshot


def shows(numbers: list[int], status: PaginationStatus) -> Callable[[PaginatedResult], bool]:
    return lambda s: ns(s) == numbers and s.status is status


class Watcher:
    """Reads every snapshot in a task, as an app's UI loop would, and keeps them all."""

    def __init__(self, pq: PaginatedQuery) -> None:
        self.pq = pq
        self.seen: list[PaginatedResult] = []
        self._changed = anyio.Event()

    async def run(self) -> None:
        while True:
            try:
                snapshot = await self.pq.next()
            except StopAsyncIteration:
                return
            self.seen.append(snapshot)
            self._changed.set()
            self._changed = anyio.Event()

    async def until(self, predicate: Callable[[PaginatedResult], bool]) -> PaginatedResult:
        while True:
            changed = self._changed
            if self.seen and predicate(self.seen[-1]):
                return self.seen[-1]
            await changed.wait()


@asynccontextmanager
async def watching(pq: PaginatedQuery) -> AsyncIterator[Watcher]:
    watcher = Watcher(pq)
    async with anyio.create_task_group() as tg:
        tg.start_soon(watcher.run)
        try:
            yield watcher
        finally:
            tg.cancel_scope.cancel()


def modifications(record: ConnectionRecord, kind: str) -> list[dict[str, Any]]:
    return [
        m
        for frame in record.frames_of_type("ModifyQuerySet")
        for m in frame["modifications"]
        if m["type"] == kind
    ]


def page_adds(record: ConnectionRecord, path: str = "items:list") -> list[dict[str, Any]]:
    """The Adds of pages opened by paginated queries (one-shot queries carry no id)."""
    return [
        m
        for m in modifications(record, "Add")
        if m["udfPath"] == path and "id" in m["args"][0].get("paginationOpts", {})
    ]


def removed_ids(record: ConnectionRecord) -> set[int]:
    return {m["queryId"] for m in modifications(record, "Remove")}


def opts_of(add: dict[str, Any]) -> dict[str, Any]:
    opts: dict[str, Any] = add["args"][0]["paginationOpts"]
    return opts


def is_half(add: dict[str, Any]) -> bool:
    return "endCursor" in opts_of(add)


async def wait_frames(
    record: ConnectionRecord, found: Callable[[], list[T]], n: int = 1
) -> list[T]:
    """Wait until ``found()`` lists at least ``n`` items (re-checked on each new frame)."""
    while True:
        seen = len(record.frames)
        items = found()
        if len(items) >= n:
            return items
        await record.wait_for_frame(after=seen, timeout=DEADLINE)


async def wait_removed(record: ConnectionRecord, *query_ids: int) -> None:
    await wait_frames(
        record, lambda: [q for q in query_ids if q in removed_ids(record)], n=len(query_ids)
    )


# -- first page, load_more, exhaustion ------------------------------------------------------


async def test_first_page_args_and_aggregate():
    async with stack() as (app, client, record):
        app.seed(1, 2, 3)
        pq = client.paginated_query("items:list", {"order": "asc"}, page_size=2)
        # Nothing can have arrived yet: the first snapshot is there at once, loading.
        assert pq.current == PaginatedResult([], Status.LOADING_FIRST_PAGE, None)
        assert pq.current.is_loading
        snapshot = await until(pq, shows([1, 2], Status.CAN_LOAD_MORE))
        assert snapshot.error is None and not snapshot.is_loading
        (add,) = page_adds(record)
        assert add["args"][0]["order"] == "asc"  # base args kept
        opts = opts_of(add)
        assert set(opts) == {"numItems", "cursor", "id"}  # no endCursor on a plain page
        assert opts["numItems"] == 2 and opts["cursor"] is None
        assert isinstance(opts["id"], int)
        pq.close()


async def test_load_more_chains_from_continue_cursor_and_exhausts():
    async with stack() as (app, client, record):
        app.seed(1, 2, 3, 4, 5)
        pq = client.paginated_query("items:list", page_size=2)
        await until(pq, shows([1, 2], Status.CAN_LOAD_MORE))
        first = await client.query(
            "items:list", {"paginationOpts": {"numItems": 2, "cursor": None}}
        )
        assert pq.load_more() is True
        await until(pq, shows([1, 2, 3, 4], Status.CAN_LOAD_MORE))
        second_add = page_adds(record)[1]
        assert opts_of(second_add)["cursor"] == first["continueCursor"]
        assert opts_of(second_add)["id"] == opts_of(page_adds(record)[0])["id"]
        assert pq.load_more() is True
        snapshot = await until(pq, shows([1, 2, 3, 4, 5], Status.EXHAUSTED))
        assert pq.load_more() is False
        assert len(page_adds(record)) == 3
        assert pq.current is snapshot
        pq.close()


async def test_second_load_more_while_loading_is_refused():
    async with stack() as (app, client, record):
        app.seed(1, 2, 3, 4, 5)
        pq = client.paginated_query("items:list", page_size=2)
        async with watching(pq) as watcher:
            await watcher.until(shows([1, 2], Status.CAN_LOAD_MORE))
            app.convex.pause()  # the new page stays loading until resume()
            assert pq.load_more() is True
            # A reader already waiting hears of it: nothing else is going to wake it.
            await watcher.until(shows([1, 2], Status.LOADING_MORE))
            assert pq.load_more() is False
            assert pq.load_more(10) is False
            app.convex.resume()
            await watcher.until(shows([1, 2, 3, 4], Status.CAN_LOAD_MORE))
        assert len(page_adds(record)) == 2
        pq.close()


async def test_load_more_with_num_items_overrides_the_page_size():
    async with stack() as (app, client, record):
        app.seed(*range(1, 15))
        pq = client.paginated_query("items:list", page_size=2)
        await until(pq, shows([1, 2], Status.CAN_LOAD_MORE))
        assert pq.load_more(10) is True
        await until(pq, shows(list(range(1, 13)), Status.CAN_LOAD_MORE))
        assert opts_of(page_adds(record)[1])["numItems"] == 10
        with pytest.raises(ValueError):
            pq.load_more(0)
        with pytest.raises(TypeError):
            pq.load_more(2.5)  # type: ignore[arg-type]
        pq.close()


async def test_base_args_are_copied():
    async with stack() as (app, client, record):
        app.seed(1, 2, 3, 4)
        args: dict[str, Any] = {"order": "desc"}
        pq = client.paginated_query("items:list", args, page_size=2)
        args["order"] = "asc"  # must not leak into the pages opened later
        await until(pq, shows([4, 3], Status.CAN_LOAD_MORE))
        assert pq.load_more()
        await until(pq, shows([4, 3, 2, 1], Status.EXHAUSTED))
        assert [add["args"][0]["order"] for add in page_adds(record)] == ["desc", "desc"]
        pq.close()


async def test_filtered_pages_count_matching_items():
    async with stack() as (app, client, _record):
        for n in range(1, 9):
            app.convex.db.insert("items", {"n": n, "tag": "even" if n % 2 == 0 else "odd"})
        pq = client.paginated_query("items:list", {"tag": "even"}, page_size=3)
        await until(pq, shows([2, 4, 6], Status.CAN_LOAD_MORE))
        assert pq.load_more()
        await until(pq, shows([2, 4, 6, 8], Status.EXHAUSTED))
        pq.close()


# -- reactivity ----------------------------------------------------------------------


async def test_reactive_update_to_the_first_page():
    # client_test: [a,b,c,d] exhausted, then an update to page 1 gives [a,a2,b,c,d].
    async with stack() as (app, client, record):
        app.seed(1, 2, 3, 4)
        pq = client.paginated_query("items:list", {"order": "desc"}, page_size=2)
        async with watching(pq) as watcher:
            await watcher.until(shows([4, 3], Status.CAN_LOAD_MORE))
            assert pq.load_more()
            await watcher.until(shows([4, 3, 2, 1], Status.EXHAUSTED))
            # Newest first: the new item lands in the first page, which grows in place.
            await client.mutation("items:add", {"n": 5})
            await watcher.until(shows([5, 4, 3, 2, 1], Status.EXHAUSTED))
            # Each change was its own snapshot (the reader keeps up with one write at a time).
            await client.mutation("items:add", {"n": 6})
            await watcher.until(shows([6, 5, 4, 3, 2, 1], Status.EXHAUSTED))
        distinct = [ns(s) for i, s in enumerate(watcher.seen) if i == 0 or s != watcher.seen[i - 1]]
        lists = [r for i, r in enumerate(distinct) if i == 0 or r != distinct[i - 1]]
        assert lists == [[], [4, 3], [4, 3, 2, 1], [5, 4, 3, 2, 1], [6, 5, 4, 3, 2, 1]]
        assert watcher.seen[0].status is Status.LOADING_FIRST_PAGE
        # Snapshots are only published when something changed.
        assert all(a != b for a, b in zip(watcher.seen, watcher.seen[1:], strict=False))
        # Two pages, fixed boundaries: the growth did not open or move any page.
        assert len(page_adds(record)) == 2
        pq.close()


async def test_an_earlier_page_shrinking_keeps_the_aggregate_gapless():
    async with stack() as (app, client, _record):
        app.seed(1, 2, 3, 4, 5, 6)
        pq = client.paginated_query("items:list", page_size=2)
        await until(pq, shows([1, 2], Status.CAN_LOAD_MORE))
        pq.load_more()
        await until(pq, shows([1, 2, 3, 4], Status.CAN_LOAD_MORE))
        app.convex.db.delete(app.ids[2])
        app.convex.db.delete(app.ids[1])
        # Page 1 is now empty but still there; page 2 did not shift.
        await until(pq, shows([3, 4], Status.CAN_LOAD_MORE))
        assert pq.load_more()
        await until(pq, shows([3, 4, 5, 6], Status.EXHAUSTED))
        pq.close()


async def test_a_slow_reader_gets_the_latest_snapshot():
    async with stack() as (app, client, _record):
        app.seed(1)
        pq = client.paginated_query("items:list", page_size=10)
        await until(pq, shows([1], Status.EXHAUSTED))
        count = client.subscribe("items:count")
        assert await count.next() == 1
        for n in (2, 3, 4):
            await client.mutation("items:add", {"n": n})
        while await count.next() != 4:
            pass
        # Three changes happened while nobody read: one read gives the latest.
        assert ns(await pq.next()) == [1, 2, 3, 4]
        count.close()
        pq.close()


async def test_optimistic_clear_and_append_show_through_and_roll_back():
    # client_test: a loaded page cleared optimistically gives empty + LoadingFirstPage; an
    # optimistic append is visible at once and rolled back when the mutation fails.
    async with stack() as (app, client, record):
        app.seed(1, 2)
        pq = client.paginated_query("items:list", page_size=5)
        await until(pq, shows([1, 2], Status.EXHAUSTED))

        def append(store: OptimisticLocalStore) -> None:
            for args, value in store.get_all_queries("items:list"):
                if value is not None:
                    store.set_query(
                        "items:list", args, {**value, "page": [*value["page"], {"n": 99}]}
                    )

        def clear(store: OptimisticLocalStore) -> None:
            for args, _ in store.get_all_queries("items:list"):
                store.clear_query("items:list", args)

        failures: list[BaseException] = []

        async def mutate(name: str, update: Any) -> None:
            try:
                await client.mutation(name, optimistic_update=update)
            except ConvexError as exc:
                failures.append(exc)

        async with anyio.create_task_group() as tg:
            app.convex.pause()
            tg.start_soon(mutate, "items:reject", append)
            await record.wait_for_frame("Mutation", timeout=DEADLINE)
            assert shows([1, 2, 99], Status.EXHAUSTED)(pq.current)
            tg.start_soon(mutate, "noop:touch", clear)
            await record.wait_for_frame(
                "Mutation", predicate=lambda f: f["udfPath"] == "noop:touch", timeout=DEADLINE
            )
            assert pq.current == PaginatedResult([], Status.LOADING_FIRST_PAGE)
            app.convex.resume()
        assert len(failures) == 1 and "rejected" in str(failures[0])
        await until(pq, shows([1, 2], Status.EXHAUSTED))
        pq.close()


# -- errors --------------------------------------------------------------------------


async def test_a_failing_page_shows_error_then_recovers():
    async with stack() as (app, client, _record):
        app.seed(1, 2, 3, 4, 5)
        app.set_knobs(failLater=True)
        pq = client.paginated_query("items:list", page_size=2)
        await until(pq, shows([1, 2], Status.CAN_LOAD_MORE))
        assert pq.load_more()
        snapshot = await until(pq, lambda s: s.status is Status.ERROR)
        assert isinstance(snapshot.error, ConvexError)
        assert snapshot.error.message == "boom" and snapshot.error.data == {"page": "later"}
        assert ns(snapshot) == [1, 2]  # the pages before the failed one are kept
        assert not snapshot.is_loading
        assert pq.load_more() is False
        # Not pinned: the server re-runs the failed page when what it read changes.
        app.set_knobs(failLater=False)
        await until(pq, shows([1, 2, 3, 4], Status.CAN_LOAD_MORE))
        assert pq.current.error is None
        assert pq.load_more() is True
        await until(pq, shows([1, 2, 3, 4, 5], Status.EXHAUSTED))
        pq.close()


async def test_a_failing_first_page():
    async with stack() as (_app, client, _record):
        pq = client.paginated_query("items:missing", page_size=2)
        snapshot = await until(pq, lambda s: s.status is Status.ERROR)
        assert snapshot.results == []
        assert snapshot.error is not None and "Could not find public function" in str(
            snapshot.error
        )
        assert pq.load_more() is False
        pq.close()


@pytest.mark.parametrize(
    ("value", "mentions"),
    [
        (5, "expected an object"),
        ({"isDone": True, "continueCursor": "c"}, "'page'"),
        ({"page": [], "isDone": "no", "continueCursor": "c"}, "'isDone'"),
        ({"page": [], "isDone": False, "continueCursor": None}, "'continueCursor'"),
        ({"page": [], "isDone": False}, "'continueCursor'"),
        ({"page": [], "isDone": False, "continueCursor": "c", "splitCursor": 3}, "'splitCursor'"),
        ({"page": [], "isDone": False, "continueCursor": "c", "pageStatus": 1}, "'pageStatus'"),
        (
            {"page": [], "isDone": False, "continueCursor": "c", "pageStatus": "SplitRequired"},
            "SplitRequired",
        ),
    ],
)
async def test_a_malformed_page_is_an_error(value: Any, mentions: str):
    async with stack() as (_app, client, _record):
        pq = client.paginated_query("bad:list", {"value": value}, page_size=2)
        snapshot = await until(pq, lambda s: s.status is Status.ERROR)
        assert snapshot.error is not None
        assert "Invalid paginated query result for bad:list" in snapshot.error.message
        assert mentions in snapshot.error.message
        assert pq.load_more() is False
        pq.close()


async def test_a_done_page_may_have_no_continue_cursor():
    async with stack() as (_app, client, _record):
        value = {"page": [{"n": 1}], "isDone": True, "continueCursor": None, "extra": 1}
        pq = client.paginated_query("bad:list", {"value": value}, page_size=2)
        await until(pq, shows([1], Status.EXHAUSTED))
        assert pq.load_more() is False
        pq.close()


# -- InvalidCursor -----------------------------------------------------------------------


async def test_invalid_cursor_restarts_from_a_fresh_first_page():
    async with stack() as (app, client, record):
        app.seed(1, 2, 3, 4, 5)
        pq = client.paginated_query("items:list", page_size=2)
        await until(pq, shows([1, 2], Status.CAN_LOAD_MORE))
        pq.load_more()
        await until(pq, shows([1, 2, 3, 4], Status.CAN_LOAD_MORE))
        old = page_adds(record)
        async with watching(pq) as watcher:
            # Every cursor and journal is now stale: both pages fail with InvalidCursor.
            app.convex.invalidate_cursors()
            await wait_removed(record, *(add["queryId"] for add in old))
            await watcher.until(shows([1, 2], Status.CAN_LOAD_MORE))
        assert all(s.status is not Status.ERROR for s in watcher.seen)
        fresh = page_adds(record)[2:]
        assert len(fresh) == 1
        assert opts_of(fresh[0])["cursor"] is None and fresh[0]["journal"] is None
        # A new session id, so the fresh page is a new server query.
        assert opts_of(fresh[0])["id"] != opts_of(old[0])["id"]
        assert pq.load_more()
        await until(pq, shows([1, 2, 3, 4], Status.CAN_LOAD_MORE))
        pq.close()


async def test_invalid_cursor_on_a_fresh_session_is_an_error_not_a_loop():
    async with stack() as (app, client, record):
        app.seed(1, 2, 3)
        app.set_knobs(alwaysInvalid=True)
        pq = client.paginated_query("items:list", page_size=2)
        snapshot = await until(pq, lambda s: s.status is Status.ERROR)
        assert snapshot.error is not None and "InvalidCursor" in snapshot.error.message
        # Still one page: a session that never succeeded is not restarted.
        assert len(page_adds(record)) == 1
        pq.close()


async def test_invalid_cursor_restarts_once_then_reports():
    async with stack() as (app, client, record):
        app.seed(1, 2, 3)
        pq = client.paginated_query("items:list", page_size=2)
        await until(pq, shows([1, 2], Status.CAN_LOAD_MORE))
        app.set_knobs(alwaysInvalid=True)
        snapshot = await until(pq, lambda s: s.status is Status.ERROR)
        assert snapshot.error is not None and "InvalidCursor" in snapshot.error.message
        adds = page_adds(record)
        assert len(adds) == 2  # the original first page and one restarted first page
        assert opts_of(adds[0])["id"] != opts_of(adds[1])["id"]
        # Still live: when the query works again, the session recovers.
        app.set_knobs(alwaysInvalid=False)
        await until(pq, shows([1, 2], Status.CAN_LOAD_MORE))
        pq.close()


async def test_invalid_cursor_on_a_later_page_restarts():
    async with stack() as (app, client, record):
        app.seed(1, 2, 3, 4, 5)
        pq = client.paginated_query("items:list", page_size=2)
        await until(pq, shows([1, 2], Status.CAN_LOAD_MORE))
        app.set_knobs(invalidLater=True)
        pq.load_more()
        async with watching(pq) as watcher:
            await wait_frames(record, lambda: page_adds(record), n=3)
            await watcher.until(shows([1, 2], Status.CAN_LOAD_MORE))
        assert all(s.status is not Status.ERROR for s in watcher.seen)
        adds = page_adds(record)
        assert [opts_of(a)["cursor"] is None for a in adds] == [True, False, True]
        pq.close()


# -- splitting -------------------------------------------------------------------------


async def test_split_recommended_swaps_in_halves_once_both_have_data():
    async with stack() as (app, client, record):
        app.seed(1, 2, 3, 4, 5)
        pq = client.paginated_query("items:list", page_size=3)
        async with watching(pq) as watcher:
            await watcher.until(shows([1, 2, 3], Status.CAN_LOAD_MORE))
            (original,) = page_adds(record)
            app.set_knobs(holdHalves=True, recommended=2)
            first, second = await wait_frames(
                record, lambda: [a for a in page_adds(record) if is_half(a)], n=2
            )
            # Both halves are loading: the original is still shown and still subscribed.
            assert shows([1, 2, 3], Status.CAN_LOAD_MORE)(pq.current)
            assert original["queryId"] not in removed_ids(record)
            assert opts_of(first)["cursor"] is None
            assert opts_of(first)["endCursor"] == opts_of(second)["cursor"] is not None
            for half in (first, second):
                assert opts_of(half)["numItems"] == 3
                assert opts_of(half)["id"] == opts_of(original)["id"]
            app.halves_gate.set()
            await wait_removed(record, original["queryId"])
            assert shows([1, 2, 3], Status.CAN_LOAD_MORE)(pq.current)
            # The halves now are the pages: more loads from the second half's end.
            assert pq.load_more()
            await watcher.until(shows([1, 2, 3, 4, 5], Status.EXHAUSTED))
            assert opts_of(page_adds(record)[-1])["cursor"] == opts_of(second)["endCursor"]
            # The halves stay live.
            app.convex.db.delete(app.ids[1])
            await watcher.until(shows([2, 3, 4, 5], Status.EXHAUSTED))
        # The swap was invisible: no snapshot between "loaded" and "more loaded".
        assert [ns(s) for s in watcher.seen][:2] == [[], [1, 2, 3]]
        assert [ns(s) for s in watcher.seen if s.status is Status.CAN_LOAD_MORE] == [[1, 2, 3]]
        assert len([a for a in page_adds(record) if is_half(a)]) == 2
        pq.close()


async def test_a_page_grown_past_twice_its_size_splits_from_its_own_cursor():
    async with stack() as (app, client, record):
        app.seed(1, 2, 3, 4)
        pq = client.paginated_query("items:list", page_size=2)
        async with watching(pq) as watcher:
            await watcher.until(shows([1, 2], Status.CAN_LOAD_MORE))
            assert pq.load_more()
            await watcher.until(shows([1, 2, 3, 4], Status.EXHAUSTED))
            second_page = page_adds(record)[1]
            # The last page runs to the end: it grows to 5 items (> 2 x 2) and splits.
            for n in (5, 6, 7):
                await client.mutation("items:add", {"n": n})
            await wait_removed(record, second_page["queryId"])
            await watcher.until(shows([1, 2, 3, 4, 5, 6, 7], Status.EXHAUSTED))
        first_half, second_half = [a for a in page_adds(record) if is_half(a)]
        # The first half starts where the split page started.
        assert opts_of(first_half)["cursor"] == opts_of(second_page)["cursor"] is not None
        assert opts_of(first_half)["endCursor"] == opts_of(second_half)["cursor"]
        assert all(s.status is not Status.ERROR for s in watcher.seen)
        pq.close()


async def test_split_required_page_is_not_shown_until_split():
    async with stack() as (app, client, record):
        app.seed(1, 2, 3, 4, 5, 6)
        app.set_knobs(required=4)
        pq = client.paginated_query("items:list", page_size=6)
        async with watching(pq) as watcher:
            await watcher.until(shows([1, 2, 3, 4, 5, 6], Status.EXHAUSTED))
        # The server cut the page to 4 items; that truncated list was never shown.
        assert [(ns(s), s.status) for s in watcher.seen] == [
            ([], Status.LOADING_FIRST_PAGE),
            ([1, 2, 3, 4, 5, 6], Status.EXHAUSTED),
        ]
        assert len([a for a in page_adds(record) if is_half(a)]) == 2
        pq.close()


async def test_a_failed_half_falls_back_and_retries_only_on_a_fresh_result():
    async with stack() as (app, client, record):
        app.seed(1, 2, 3, 4, 5)
        app.set_knobs(failHalves=True)
        pq = client.paginated_query("items:list", page_size=3)
        async with watching(pq) as watcher:
            await watcher.until(shows([1, 2, 3], Status.CAN_LOAD_MORE))
            app.set_knobs(recommended=2)
            halves = await wait_frames(
                record, lambda: [a for a in page_adds(record) if is_half(a)], n=2
            )
            await wait_removed(record, *(h["queryId"] for h in halves))
            # No retry: after a round trip (and another refresh) still only two halves.
            assert shows([1, 2, 3], Status.CAN_LOAD_MORE)(pq.current)
            assert await client.query("items:count") == 5
            assert len([a for a in page_adds(record) if is_half(a)]) == 2
            # A fresh result for the original page reopens the split, which now works.
            app.set_knobs(failHalves=False)
            app.convex.db.patch(app.ids[1], {"label": "fresh"})
            original = page_adds(record)[0]
            await wait_removed(record, original["queryId"])
            snapshot = await watcher.until(
                lambda s: bool(s.results) and s.results[0].get("label") == "fresh"
            )
            assert ns(snapshot) == [1, 2, 3] and snapshot.status is Status.CAN_LOAD_MORE
        assert len([a for a in page_adds(record) if is_half(a)]) == 4
        assert all(s.status is not Status.ERROR for s in watcher.seen)
        pq.close()


async def open_held_split(
    app: App, client: ConvexClient, record: ConnectionRecord, pq: PaginatedQuery
) -> tuple[dict[str, Any], list[dict[str, Any]]]:
    """Load [1, 2, 3], then make the server recommend a split whose halves stay loading
    (their function waits on the gate). Drives the query only by reading ``current``, so
    the test decides when it reconciles. Returns the original's Add and the halves'."""
    marker = client.subscribe("marker:get")
    assert await marker.next() == 0
    await until(pq, shows([1, 2, 3], Status.CAN_LOAD_MORE))
    app.set_knobs(holdHalves=True, recommended=2)
    app.bump_marker()
    # The marker query re-runs in the same Transition as the page (or a later one), so
    # once it shows the write, the page's SplitRecommended result is in the client.
    assert await marker.next() == 1
    marker.close()
    assert ns(pq.current) == [1, 2, 3]  # reading reconciles: the split opens
    halves = await wait_frames(record, lambda: [a for a in page_adds(record) if is_half(a)], n=2)
    return page_adds(record)[0], halves


async def test_the_original_changing_cancels_its_split():
    async with stack() as (app, client, record):
        app.seed(1, 2, 3, 4, 5)
        pq = client.paginated_query("items:list", page_size=3)
        original, halves = await open_held_split(app, client, record, pq)
        marker = client.subscribe("marker:get")
        # The halves' Transition is stuck at the gate; these writes go in the next one.
        app.convex.db.delete(app.ids[2])
        app.bump_marker()
        app.halves_gate.set()
        while await marker.next() != 2:
            pass
        marker.close()
        # The client now holds data for both halves and a changed original: the original
        # wins, the halves (cut from its old data) go.
        assert shows([1, 3], Status.CAN_LOAD_MORE)(pq.current)
        await wait_removed(record, *(h["queryId"] for h in halves))
        assert original["queryId"] not in removed_ids(record)
        pq.close()


async def test_the_original_going_back_to_loading_cancels_its_split():
    async with stack() as (app, client, record):
        app.seed(1, 2, 3, 4, 5)
        pq = client.paginated_query("items:list", page_size=3)
        original, halves = await open_held_split(app, client, record, pq)

        def clear_original(store: OptimisticLocalStore) -> None:
            for args, _ in store.get_all_queries("items:list"):
                if "endCursor" not in args["paginationOpts"]:
                    store.clear_query("items:list", args)

        async with anyio.create_task_group() as tg:
            tg.start_soon(lambda: client.mutation("noop:touch", optimistic_update=clear_original))
            await record.wait_for_frame("Mutation", timeout=DEADLINE)
            assert pq.current == PaginatedResult([], Status.LOADING_FIRST_PAGE)
            await wait_removed(record, *(h["queryId"] for h in halves))
            app.halves_gate.set()
        # The original comes back and, still too big, splits again (and swaps in).
        await until(pq, shows([1, 2, 3], Status.CAN_LOAD_MORE))
        async with watching(pq):
            await wait_removed(record, original["queryId"])
        assert len([a for a in page_adds(record) if is_half(a)]) == 4
        pq.close()


# -- sessions, closing, reconnects -------------------------------------------------------


async def test_identical_paginated_queries_do_not_share_pages():
    async with stack() as (app, client, record):
        app.seed(1, 2, 3, 4, 5)
        a = client.paginated_query("items:list", page_size=2)
        b = client.paginated_query("items:list", page_size=2)
        await until(a, shows([1, 2], Status.CAN_LOAD_MORE))
        await until(b, shows([1, 2], Status.CAN_LOAD_MORE))
        add_a, add_b = page_adds(record)
        assert add_a["queryId"] != add_b["queryId"]
        assert opts_of(add_a)["id"] != opts_of(add_b)["id"]
        assert a.load_more()
        await until(a, shows([1, 2, 3, 4], Status.CAN_LOAD_MORE))
        assert shows([1, 2], Status.CAN_LOAD_MORE)(b.current)
        a.close()
        await wait_removed(record, add_a["queryId"])
        assert add_b["queryId"] not in removed_ids(record)
        app.convex.db.delete(app.ids[1])
        await until(b, shows([2], Status.CAN_LOAD_MORE))
        b.close()


async def test_close_unsubscribes_every_page():
    async with stack() as (app, client, record):
        app.seed(1, 2, 3, 4, 5)
        pq = client.paginated_query("items:list", page_size=2)
        await until(pq, shows([1, 2], Status.CAN_LOAD_MORE))
        pq.load_more()
        last = await until(pq, shows([1, 2, 3, 4], Status.CAN_LOAD_MORE))
        await pq.aclose()
        pq.close()  # idempotent
        await wait_removed(record, *(a["queryId"] for a in page_adds(record)))
        assert pq.load_more() is False
        assert pq.current is last
        with pytest.raises(StopAsyncIteration):
            await pq.next()
        assert [s async for s in pq] == []


async def test_leaving_async_for_or_async_with_unsubscribes():
    async with stack() as (app, client, record):
        app.seed(1, 2, 3)
        pq = client.paginated_query("items:list", page_size=2)
        seen = []
        async for snapshot in pq:
            seen.append(snapshot.status)
            if snapshot.status is Status.CAN_LOAD_MORE:
                break
        assert seen == [Status.LOADING_FIRST_PAGE, Status.CAN_LOAD_MORE]
        await wait_removed(record, page_adds(record)[0]["queryId"])
        assert pq.load_more() is False

        async with client.paginated_query("items:list", page_size=2) as other:
            await until(other, shows([1, 2], Status.CAN_LOAD_MORE))
        await wait_removed(record, page_adds(record)[1]["queryId"])


async def test_a_waiting_reader_is_released_by_close():
    async with stack() as (app, client, record):
        app.seed(1)
        pq = client.paginated_query("items:list", page_size=2)
        await until(pq, shows([1], Status.EXHAUSTED))
        ended = anyio.Event()

        async def reader() -> None:
            async for _ in pq:
                pass
            ended.set()

        async with anyio.create_task_group() as tg:
            tg.start_soon(reader)
            await wait_frames(record, lambda: page_adds(record))
            pq.close()
            await ended.wait()


async def test_reconnect_resubscribes_pages_with_their_journals():
    async with stack() as (app, client, _record):
        convex = app.convex
        app.seed(1, 2, 3, 4, 5)
        pq = client.paginated_query("items:list", {"order": "desc"}, page_size=2)
        await until(pq, shows([5, 4], Status.CAN_LOAD_MORE))
        pq.load_more()
        await until(pq, shows([5, 4, 3, 2], Status.CAN_LOAD_MORE))
        pq.load_more()
        await until(pq, shows([5, 4, 3, 2, 1], Status.EXHAUSTED))
        # While the client is away, item 6 lands at the top of the first page.
        convex.pause()
        app.seed(6)
        await convex.drop_connections()
        second = await convex.wait_for_connections(2)
        readd = await wait_frames(second, lambda: page_adds(second), n=3)
        # Each page comes back with the journal the server gave it...
        assert all(isinstance(add["journal"], str) for add in readd)
        convex.resume()
        # ...so the first page keeps its end and grows (a fresh two-item first page would
        # have lost item 4 in the gap before the second page's cursor).
        await until(pq, shows([6, 5, 4, 3, 2, 1], Status.EXHAUSTED))
        assert pq.load_more() is False
        pq.close()


async def test_closing_the_client_ends_iteration():
    async with LocalConvex() as convex:
        app = App(convex)
        app.seed(1, 2, 3)
        with anyio.fail_after(DEADLINE):
            async with ConvexClient(convex.url) as client:
                pq = client.paginated_query("items:list", page_size=2)
                last = await until(pq, shows([1, 2], Status.CAN_LOAD_MORE))
            with pytest.raises(ClientClosedError):
                await pq.next()
            with pytest.raises(ClientClosedError):
                async for _ in pq:
                    pass
            assert pq.load_more() is False
            assert pq.current is last
            pq.close()


async def test_bad_page_size_and_args_are_rejected():
    async with stack() as (_app, client, record):
        for size in (0, -3):
            with pytest.raises(ValueError, match="page_size"):
                client.paginated_query("items:list", page_size=size)
        for bad in (True, 2.0, "5"):
            with pytest.raises(TypeError, match="page_size"):
                client.paginated_query("items:list", page_size=bad)  # type: ignore[arg-type]
        with pytest.raises(ValueError, match="paginationOpts"):
            client.paginated_query("items:list", {"paginationOpts": {}})
        assert page_adds(record) == []


# -- LocalConvex's paginate itself ---------------------------------------------------------


async def test_local_convex_cursors_are_positions():
    async with stack() as (app, client, _record):
        app.seed(1, 2, 3, 4)

        async def page(numbers: int, cursor: str | None, **extra: Any) -> dict[str, Any]:
            opts = {"numItems": numbers, "cursor": cursor, **extra}
            result: dict[str, Any] = await client.query("items:list", {"paginationOpts": opts})
            return result

        first = await page(2, None)
        assert [d["n"] for d in first["page"]] == [1, 2]
        assert first["isDone"] is False and first["pageStatus"] is None
        # The cursor stays valid when the document it points after is deleted, and new
        # documents go where they belong.
        app.convex.db.delete(app.ids[2])
        app.seed(5)
        rest = await page(10, first["continueCursor"])
        assert [d["n"] for d in rest["page"]] == [3, 4, 5] and rest["isDone"] is True
        bounded = await page(1, None, endCursor=first["continueCursor"])
        assert [d["n"] for d in bounded["page"]] == [1]  # numItems is ignored with an end
        assert bounded["continueCursor"] == first["continueCursor"]
        assert bounded["isDone"] is False

        with pytest.raises(ConvexError, match="InvalidCursor"):
            await page(2, "not a cursor")
        desc = await client.query(
            "items:list", {"order": "desc", "paginationOpts": {"numItems": 1, "cursor": None}}
        )
        with pytest.raises(ConvexError, match="InvalidCursor"):
            await page(2, desc["continueCursor"])  # from another order
        app.convex.invalidate_cursors()
        with pytest.raises(ConvexError, match="InvalidCursor"):
            await page(2, first["continueCursor"])
        with pytest.raises(ConvexError, match="numItems"):
            await page(0, None)
        with pytest.raises(ConvexError, match="unexpected fields"):
            await page(2, None, junk=1)
        with pytest.raises(ConvexError, match="single paginated query"):
            await client.query("twice:list", {"paginationOpts": {"numItems": 1, "cursor": None}})


async def test_local_convex_split_statuses():
    async with stack() as (app, client, _record):
        app.seed(1, 2, 3, 4, 5)
        app.set_knobs(recommended=3)
        opts = {"numItems": 5, "cursor": None}
        result = await client.query("items:list", {"paginationOpts": opts})
        assert result["pageStatus"] == "SplitRecommended"
        assert [d["n"] for d in result["page"]] == [1, 2, 3, 4, 5]
        left = await client.query(
            "items:list", {"paginationOpts": {**opts, "endCursor": result["splitCursor"]}}
        )
        assert [d["n"] for d in left["page"]] == [1, 2, 3]
        app.set_knobs(recommended=None, required=2)
        cut = await client.query("items:list", {"paginationOpts": opts})
        assert cut["pageStatus"] == "SplitRequired"
        assert [d["n"] for d in cut["page"]] == [1, 2]
        assert cut["isDone"] is True and cut["splitCursor"] == result["splitCursor"]
