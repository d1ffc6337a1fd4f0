"""Paginated queries: a live, growing list assembled from page subscriptions.

A paginated Convex query takes ``paginationOpts`` and returns one page,
``{"page": [...], "isDone": bool, "continueCursor": str, "splitCursor"?, "pageStatus"?}``.
PaginatedQuery subscribes to one query per page, each starting where the previous one
ended, and concatenates the pages into one list that stays live: every page is an
ordinary reactive subscription. The server pins a page's range once it has run (in the
query's journal, which the sync core sends back after a reconnect), so pages grow and
shrink in place and the list never has gaps or duplicates.

Everything happens synchronously when the state is read (``current``, ``next()``,
``load_more()``): one Flag wakes the reader when any page changes, and the
reader then reconciles splits and restarts and builds a fresh snapshot. No background
task is involved.
"""

from __future__ import annotations

import enum
import itertools
from collections.abc import AsyncGenerator, Mapping
from dataclasses import dataclass
from typing import Any, Self

from .._errors import ConvexError, DartvexError
from .._logging import convex_logger
from .._signal import Flag
from ._query_set import LocalQuery
from ._sync import SyncCore
from ._values import encode_args, encode_value

__all__ = ["PaginatedQuery", "PaginatedResult", "PaginationStatus"]

# Each pagination session puts a fresh id in its pages' paginationOpts, as the official
# client does: identical paginated queries then never share page subscriptions (a shared
# page may have grown or shrunk away from this session's page size, and its journal
# belongs to another session), and a restart after InvalidCursor really asks the server
# again instead of landing on the failed query.
_session_ids = itertools.count(1)

# Split and restart decisions can cascade (a split half seeded at once by an optimistic
# update is swapped in during the same refresh); this bounds one refresh's work.
_MAX_RECONCILE_PASSES = 8

# The server's error for a cursor (or journal) that no longer matches its database query.
_INVALID_CURSOR = "InvalidCursor"


class PaginationStatus(enum.Enum):
    """Where a paginated query stands; the values are the official client's names."""

    LOADING_FIRST_PAGE = "LoadingFirstPage"
    """The first page has no result yet (or went back to loading)."""
    LOADING_MORE = "LoadingMore"
    """A later page has no result yet; ``results`` holds the pages before it."""
    CAN_LOAD_MORE = "CanLoadMore"
    """Every page is loaded and the server has more: ``load_more()`` fetches it."""
    EXHAUSTED = "Exhausted"
    """Every page is loaded and the last one reached the end of the list."""
    ERROR = "Error"
    """A page failed; ``error`` says why. Not final: see PaginatedQuery."""


@dataclass(frozen=True, slots=True)
class PaginatedResult:
    """One snapshot of a paginated query: the items of every loaded page, in order.

    ``results`` is gapless: it stops before the first page that is loading or failed.
    Each snapshot owns its list and items (they are decoded afresh), so changing them
    affects nothing else.
    """

    results: list[Any]
    status: PaginationStatus
    error: ConvexError | None = None
    """The first failing page's error when ``status`` is ERROR, else None."""

    @property
    def is_loading(self) -> bool:
        """True while the first page or a further page is loading."""
        return self.status in (PaginationStatus.LOADING_FIRST_PAGE, PaginationStatus.LOADING_MORE)


@dataclass(slots=True)
class _PageData:
    """A successfully parsed page result."""

    items: list[Any]
    is_done: bool
    continue_cursor: str | None
    split_cursor: str | None
    page_status: str | None

    @property
    def incomplete(self) -> bool:
        # The server could not read the whole range; the items are a truncated prefix, so
        # showing them (and the pages after them) would open a gap.
        return self.page_status == "SplitRequired"

    def wants_split(self, num_items: int) -> bool:
        if self.split_cursor is None or self.continue_cursor is None:
            return False
        return self.page_status in ("SplitRecommended", "SplitRequired") or (
            len(self.items) > 2 * num_items
        )


# A page's state: None while loading, a ConvexError when it failed (on the server or by
# returning something that is not a page), else its data.
_Outcome = _PageData | ConvexError | None


@dataclass(eq=False, slots=True)
class _Split:
    """An in-flight split of a page into two halves, swapped in once both have data."""

    first: _Page
    second: _Page
    # The original page's version when the split was opened: any change to the original
    # (new data, or back to loading) means the halves' boundaries may be stale.
    opened_at: int


@dataclass(eq=False, slots=True)
class _Page:
    """One page subscription, covering ``(cursor, end_cursor]`` when ``end_cursor`` is
    given (a split half), else ``num_items`` items from ``cursor`` (the server records
    where that ended in the query's journal)."""

    cursor: str | None
    end_cursor: str | None
    num_items: int
    query: LocalQuery
    split: _Split | None = None
    # After a failed split: the original's version then. The split is not retried until
    # the original gets a fresh result, so a failing half cannot cause a resubscribe loop.
    split_failed_at: int | None = None
    outcome: _Outcome = None
    # The query version ``outcome`` was read at; a failure is reused while it holds, so an
    # unchanged error stays the same object and does not count as a new snapshot.
    read_version: int = -1


class PaginatedQuery:
    """A live list over a paginated query. Create it with ``client.paginated_query()``.

    Iterate it with ``async for``: each item is a PaginatedResult snapshot (the current
    one at once, even while loading, then one per change; a slow consumer skips to the
    latest). ``current`` is the latest snapshot without waiting. ``load_more()`` asks for
    the next page. Leaving the ``async for`` loop, ``close()``, ``aclose()`` or
    ``async with`` unsubscribes every page. Closing the client ends the iteration with
    ClientClosedError; a server FatalError with ServerFatalError.

    Pages:

    * The first page asks for ``page_size`` items from the start; ``load_more(n)`` adds a
      page of ``n`` (default ``page_size``) items from where the last page ended. Each
      page's arguments are the query's args plus ``paginationOpts`` =
      ``{numItems, cursor, id}`` (and ``endCursor`` for a split half); ``id`` is unique
      to this PaginatedQuery, so identical paginated queries never share pages.
    * A page that has grown past twice its size, or that the server asks to split
      (``splitCursor`` with ``pageStatus`` SplitRecommended or SplitRequired), is
      replaced by two half pages, swapped in at once when both have data. Until then the
      original stays; if a half fails the split is dropped and only retried once the
      original changes. A SplitRequired page is incomplete, so it counts as loading.

    Errors:

    * A page that fails (or returns something that is not a page) puts the snapshot in
      ERROR with that error; ``results`` still holds the pages before it. The state is
      not pinned: the server re-runs a failed query when the data it read changes, and
      once the page succeeds the snapshot recovers. ``load_more()`` refuses while in
      ERROR.
    * A page failing with ``InvalidCursor`` (its cursor or journal no longer matches the
      server's database query) restarts the whole list from a fresh first page under a
      new id, as the official client does. If the fresh session fails the same way before
      any page succeeded, the error is shown instead, so a broken query cannot loop.

    ``name`` is the query's canonical path and ``page_size`` the first page's size.
    """

    def __init__(
        self, core: SyncCore, udf_path: str, args: Mapping[str, Any] | None, *, page_size: int
    ) -> None:
        self.page_size = _check_size(page_size, "page_size")
        # Encoding now validates the args early and keeps a private deep copy: changing
        # the caller's mapping later does not change the pages opened by load_more().
        (base,) = encode_args(args)
        if "paginationOpts" in base:
            raise ValueError(
                "args must not contain 'paginationOpts': the paginated query adds it per page"
            )
        self.name = udf_path
        self._core = core
        self._base_args: dict[str, Any] = base
        self._waker = Flag()
        # Subscriptions per query: two pages could in principle name the same query, and
        # the shared waker must stay registered until the last of them is gone.
        self._refs: dict[LocalQuery, int] = {}
        self._closed = False
        self._session_id = next(_session_ids)
        self._session_succeeded = False
        self._pages: list[_Page] = [self._open_page(None, None, self.page_size)]
        self._structure = 0  # bumped whenever pages are added, removed or swapped
        self._fingerprint: tuple[int, ...] | None = None
        self._current = PaginatedResult([], PaginationStatus.LOADING_FIRST_PAGE)
        # The initial snapshot counts as news: the first next() returns it at once.
        self._version = 1
        self._seen_version = 0
        self._refresh()

    def __repr__(self) -> str:
        state = "closed" if self._closed else f"{len(self._pages)} pages"
        return f"<PaginatedQuery {self.name} {self._current.status.value} {state}>"

    # -- reading ----------------------------------------------------------------------

    @property
    def current(self) -> PaginatedResult:
        """The latest snapshot, without waiting (the last one once closed)."""
        self._refresh()
        return self._current

    async def next(self) -> PaginatedResult:
        """Wait for a snapshot newer than the last one ``next()`` returned (the first
        call returns the current one at once) and return it.

        Raises StopAsyncIteration once closed, and the client's error (ClientClosedError,
        ServerFatalError) once the client has stopped.
        """
        while True:
            if self._closed:
                raise StopAsyncIteration
            if self._core.terminal_error is not None:
                raise self._core.terminal_error
            self._refresh()
            if self._version > self._seen_version:
                self._seen_version = self._version
                return self._current
            self._waker.clear()
            await self._waker.wait()

    async def __aiter__(self) -> AsyncGenerator[PaginatedResult, None]:
        try:
            while True:
                try:
                    snapshot = await self.next()
                except StopAsyncIteration:
                    return
                yield snapshot
        finally:
            self.close()

    # -- loading more -----------------------------------------------------------------

    def load_more(self, num_items: int | None = None) -> bool:
        """Ask for the next page of ``num_items`` items (default ``page_size``).

        Returns True when a page was added, False when there is nothing to do: the query
        is closed or its client stopped, the snapshot is in ERROR, the last page has no
        result yet (a page is already loading), or the last page reached the end.
        Synchronous: it only registers a subscription (the sync core queues the frame),
        and the new page shows up in the snapshots. Raises TypeError or ValueError for a
        size that is not a positive int.
        """
        size = self.page_size if num_items is None else _check_size(num_items, "num_items")
        if self._closed or self._core.terminal_error is not None:
            return False
        self._refresh()
        if self._current.status is PaginationStatus.ERROR:
            return False
        tail = self._pages[-1].outcome
        if not isinstance(tail, _PageData) or tail.is_done or tail.continue_cursor is None:
            return False
        self._pages.append(self._open_page(tail.continue_cursor, None, size))
        self._structure += 1
        self._refresh()
        return True

    # -- closing ----------------------------------------------------------------------

    def close(self) -> None:
        """Unsubscribe every page. Idempotent; ``current`` keeps the last snapshot."""
        if self._closed:
            return
        self._closed = True
        self._waker.set()  # wake a pending next() so it sees the query is closed
        if self._core.terminal_error is None:
            for query in list(self._refs):
                self._core.unsubscribe(query, self._waker)
        self._refs.clear()
        self._pages = []

    async def aclose(self) -> None:
        self.close()

    async def __aenter__(self) -> Self:
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        self.close()

    # -- subscriptions ------------------------------------------------------------------

    def _open_page(self, cursor: str | None, end_cursor: str | None, num_items: int) -> _Page:
        opts: dict[str, Any] = {"numItems": num_items, "cursor": cursor, "id": self._session_id}
        if end_cursor is not None:
            opts["endCursor"] = end_cursor
        args = {**self._base_args, "paginationOpts": encode_value(opts)}
        # Keys go on the wire sorted, like every other args object.
        encoded = [{key: args[key] for key in sorted(args)}]
        query = self._core.subscribe(self.name, encoded, self._waker)
        self._refs[query] = self._refs.get(query, 0) + 1
        return _Page(cursor, end_cursor, num_items, query)

    def _drop_page(self, page: _Page) -> None:
        if page.split is not None:
            self._drop_split(page)
        count = self._refs.get(page.query, 0) - 1
        if count > 0:
            self._refs[page.query] = count
            return
        self._refs.pop(page.query, None)
        self._core.unsubscribe(page.query, self._waker)

    def _drop_split(self, page: _Page) -> None:
        split, page.split = page.split, None
        if split is not None:
            self._drop_page(split.first)
            self._drop_page(split.second)

    # -- reconciling ------------------------------------------------------------------

    def _refresh(self) -> None:
        """Bring splits, restarts and the snapshot up to date with the pages' results.

        Cheap when nothing changed: the pages' query versions are compared first.
        """
        if self._closed or self._core.terminal_error is not None:
            return
        fingerprint = self._make_fingerprint()
        if fingerprint == self._fingerprint:
            return
        for _ in range(_MAX_RECONCILE_PASSES):
            self._read_pages()
            if not (self._maybe_restart() or self._advance_splits()):
                break
            self._structure += 1
        else:
            self._read_pages()  # the last pass changed pages: show what they hold now
        self._fingerprint = self._make_fingerprint()
        snapshot = self._aggregate()
        if snapshot != self._current:
            self._current = snapshot
            self._version += 1
            # A refresh run by ``current`` or ``load_more()`` must still reach a reader
            # waiting in next().
            self._waker.set()

    def _make_fingerprint(self) -> tuple[int, ...]:
        versions = [self._structure]
        for page in self._pages:
            versions.append(page.query.version)
            if page.split is not None:
                versions += (page.split.first.query.version, page.split.second.query.version)
        return tuple(versions)

    def _read_pages(self) -> None:
        for page in self._pages:
            page.outcome = _read(page, self.name)
            if page.split is not None:
                page.split.first.outcome = _read(page.split.first, self.name)
                page.split.second.outcome = _read(page.split.second, self.name)
            if isinstance(page.outcome, _PageData):
                self._session_succeeded = True

    def _maybe_restart(self) -> bool:
        for page in self._pages:
            error = page.outcome
            if isinstance(error, ConvexError) and _INVALID_CURSOR in error.message:
                if not self._session_succeeded:
                    # The fresh session hit it too: restarting again would loop.
                    return False
                convex_logger.warning(
                    "paginated query %s: a page's cursor is no longer valid (%s); "
                    "restarting from the first page",
                    self.name,
                    error.message,
                )
                for old in self._pages:
                    self._drop_page(old)
                self._session_id = next(_session_ids)
                self._session_succeeded = False
                self._pages = [self._open_page(None, None, self.page_size)]
                return True
        return False

    def _advance_splits(self) -> bool:
        """Cancel stale splits, swap in finished ones, start new ones; True when the set
        of subscriptions changed."""
        changed = False
        index = 0
        while index < len(self._pages):
            page = self._pages[index]
            split = page.split
            if split is not None and page.query.version != split.opened_at:
                self._drop_split(page)
                split = None
                changed = True
            if split is not None:
                first, second = split.first.outcome, split.second.outcome
                if isinstance(first, ConvexError) or isinstance(second, ConvexError):
                    failed = first if isinstance(first, ConvexError) else second
                    convex_logger.info(
                        "paginated query %s: splitting a page failed (%s); keeping it whole",
                        self.name,
                        failed,
                    )
                    self._drop_split(page)
                    page.split_failed_at = page.query.version
                    changed = True
                elif isinstance(first, _PageData) and isinstance(second, _PageData):
                    page.split = None
                    self._pages[index : index + 1] = [split.first, split.second]
                    self._drop_page(page)
                    changed = True
                    index += 2
                    continue
            elif (
                isinstance(page.outcome, _PageData)
                and page.split_failed_at != page.query.version
                and page.outcome.wants_split(page.num_items)
            ):
                data = page.outcome
                assert data.split_cursor is not None and data.continue_cursor is not None
                # The first half keeps the page's start, including the null "from the
                # start" cursor of the first page.
                page.split = _Split(
                    first=self._open_page(page.cursor, data.split_cursor, page.num_items),
                    second=self._open_page(data.split_cursor, data.continue_cursor, page.num_items),
                    opened_at=page.query.version,
                )
                changed = True
            index += 1
        return changed

    def _aggregate(self) -> PaginatedResult:
        results: list[Any] = []
        error: ConvexError | None = None
        loading_at: int | None = None
        for index, page in enumerate(self._pages):
            outcome = page.outcome
            if isinstance(outcome, ConvexError):
                error = error or outcome
                continue
            if error is not None or loading_at is not None:
                continue  # gapless: nothing after the first page we cannot show
            if outcome is None or outcome.incomplete:
                loading_at = index
                continue
            results.extend(outcome.items)
        tail = self._pages[-1].outcome
        if error is not None:
            return PaginatedResult(results, PaginationStatus.ERROR, error)
        if loading_at is not None:
            status = (
                PaginationStatus.LOADING_FIRST_PAGE
                if loading_at == 0
                else PaginationStatus.LOADING_MORE
            )
            return PaginatedResult(results, status)
        assert isinstance(tail, _PageData)
        if tail.is_done:
            return PaginatedResult(results, PaginationStatus.EXHAUSTED)
        return PaginatedResult(results, PaginationStatus.CAN_LOAD_MORE)


def _check_size(value: object, name: str) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError(f"{name} must be an int, not {type(value).__name__}")
    if value < 1:
        raise ValueError(f"{name} must be at least 1, not {value}")
    return value


def _read(page: _Page, name: str) -> _Outcome:
    """Decode and validate a page's current result (a fresh copy every time)."""
    if page.read_version == page.query.version and isinstance(page.outcome, ConvexError):
        return page.outcome
    page.read_version = page.query.version
    result = page.query.effective
    if result is None:
        return None
    try:
        value = result.unwrap()
    except ConvexError as exc:
        return exc
    except DartvexError as exc:  # a value the codec rejects
        return ConvexError(f"Invalid paginated query result for {name}: {exc}")
    return _parse_page(value, name)


def _parse_page(value: object, name: str) -> _PageData | ConvexError:
    def invalid(problem: str) -> ConvexError:
        return ConvexError(
            f"Invalid paginated query result for {name}: {problem} (a paginated query "
            "must return {page: list, isDone: bool, continueCursor: string, ...})"
        )

    if not isinstance(value, dict):
        return invalid(f"expected an object, got {type(value).__name__}")
    items = value.get("page")
    if not isinstance(items, list):
        return invalid("'page' must be a list")
    is_done = value.get("isDone")
    if not isinstance(is_done, bool):
        return invalid("'isDone' must be a boolean")
    continue_cursor = value.get("continueCursor")
    # Only a final page may lack a continueCursor: nothing continues from it.
    if not (isinstance(continue_cursor, str) or (continue_cursor is None and is_done)):
        return invalid("'continueCursor' must be a string")
    split_cursor = value.get("splitCursor")
    if split_cursor is not None and not isinstance(split_cursor, str):
        return invalid("'splitCursor' must be a string or null")
    page_status = value.get("pageStatus")
    if page_status is not None and not isinstance(page_status, str):
        return invalid("'pageStatus' must be a string or null")
    if page_status == "SplitRequired" and (split_cursor is None or continue_cursor is None):
        # Such a page can neither be shown (it is incomplete) nor split: it would load
        # forever, so say what is wrong instead.
        return invalid("pageStatus 'SplitRequired' needs a 'splitCursor' and 'continueCursor'")
    return _PageData(items, is_done, continue_cursor, split_cursor, page_status)
