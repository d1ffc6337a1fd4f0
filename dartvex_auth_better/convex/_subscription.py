"""Subscription: a live query as an async iterator."""

from __future__ import annotations

import contextlib
from collections.abc import AsyncGenerator
from typing import Any, Self

from .._signal import Flag
from ._query_set import LocalQuery
from ._sync import SyncCore

__all__ = ["Subscription"]


class Subscription:
    """A live query. Iterate it with ``async for``; each item is the query's current value.

    * The first item is the current value (at once, when another subscription to the same
      query already has it), then one item per change.
    * A slow consumer skips intermediate values but always gets the latest one.
    * A failing query raises ConvexError from the iteration. The subscription stays
      registered, so calling ``next()`` again waits for the next result.
    * Leaving the ``async for`` loop (``break``, an exception, cancellation), ``close()``
      or ``async with`` unsubscribes.
    * Closing the client ends the iteration with ClientClosedError; a server FatalError
      with ServerFatalError.
    * A Subscription is one iterator with one reader: a ``next()`` (or ``async for``)
      while another task is already waiting in one raises RuntimeError (and leaves the
      subscription to that task), as two readers would split the values between them.
      For two readers call ``subscribe()`` twice: each call gives its own iterator, and
      identical subscriptions share one server query.
    """

    _query: LocalQuery | None = None  # (set before __init__ can fail: __del__ reads it)

    def __init__(self, core: SyncCore, udf_path: str, args: list[Any]) -> None:
        self._core = core
        self._waker = Flag()  # no waiter deque until next() waits
        self._waiting = False  # a reader is waiting in next()
        self._query = core.subscribe(udf_path, args, self._waker)
        self._seen_version = 0
        self.name = udf_path

    def __repr__(self) -> str:
        state = "closed" if self._query is None else f"query_id={self._query.query_id}"
        return f"<Subscription {self.name} {state}>"

    @property
    def has_pending_writes(self) -> bool:
        """True while an optimistic update is shown instead of the server's value."""
        return self._query is not None and self._query.has_pending_writes

    def current(self) -> Any:
        """The latest value without waiting; raises LookupError while loading, or the
        query's ConvexError when it failed."""
        if self._query is None:
            raise LookupError("this subscription is closed")
        result = self._query.effective
        if result is None:
            raise LookupError("no result yet")
        return result.unwrap()

    async def next(self) -> Any:
        """Wait for a value newer than the last one returned, and return it.

        Raises StopAsyncIteration once the subscription is closed, and RuntimeError when
        another task is already waiting in ``next()`` on this subscription.
        """
        if self._waiting:
            raise _second_reader()
        while True:
            query = self._query
            if query is None:
                raise StopAsyncIteration
            if self._core.terminal_error is not None:
                raise self._core.terminal_error
            result = query.effective
            if query.version > self._seen_version and result is not None:
                self._seen_version = query.version
                return result.unwrap()
            self._waker.clear()
            self._waiting = True
            try:
                await self._waker.wait()
            finally:
                self._waiting = False

    async def _next_server_result(self) -> Any:
        """Wait for an answer from the server itself: never an optimistic view, and never
        a result from before a reconnect (the socket must be open and the result must have
        arrived on it)."""
        if self._waiting:
            raise _second_reader()
        seen = self._query.server_version if self._query is not None else 0
        if self._query is not None and self._core.is_current(self._query):
            assert self._query.server is not None
            return self._query.server.unwrap()
        while True:
            query = self._query
            if query is None:
                raise StopAsyncIteration
            if self._core.terminal_error is not None:
                raise self._core.terminal_error
            if query.server_version > seen and self._core.is_current(query):
                assert query.server is not None
                return query.server.unwrap()
            self._waker.clear()
            self._waiting = True
            try:
                await self._waker.wait()
            finally:
                self._waiting = False

    def __del__(self) -> None:
        # A subscription dropped without close() (never iterated, say) must not keep its
        # server query alive for the client's lifetime. (_query is a class attribute too:
        # an __init__ that failed leaves None here, nothing to close.)
        # A finalizer runs wherever the collector happens to run, in the middle of the
        # core's own code too: the Remove is made on the next turn, not here.
        query, self._query = self._query, None
        if query is not None and self._core.terminal_error is None:
            with contextlib.suppress(Exception):
                self._core.unsubscribe_soon(query, self._waker)

    def close(self) -> None:
        """Unsubscribe. Idempotent.

        The last subscriber's close removes the server query at the end of the event-loop
        turn, in the same frame as any subscription opened meanwhile (or just before any
        other frame): ``query()`` after ``query()`` costs one ModifyQuerySet each."""
        query, self._query = self._query, None
        self._waker.set()  # wake a pending next() so it sees the subscription is closed
        if query is not None and self._core.terminal_error is None:
            self._core.unsubscribe(query, self._waker)

    async def aclose(self) -> None:
        self.close()

    async def __aenter__(self) -> Self:
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        self.close()

    async def __aiter__(self) -> AsyncGenerator[Any, None]:
        unsubscribe = True
        try:
            while True:
                if self._waiting:
                    # A second reader: its loop fails, and the subscription stays open for
                    # the task already reading it.
                    unsubscribe = False
                    raise _second_reader()
                try:
                    value = await self.next()
                except StopAsyncIteration:
                    return
                yield value
        finally:
            if unsubscribe:
                self.close()


def _second_reader() -> RuntimeError:
    return RuntimeError(
        "another task is already waiting for this Subscription's next value; a "
        "Subscription has one reader (call subscribe() again for a second one: identical "
        "subscriptions share one server query)"
    )
