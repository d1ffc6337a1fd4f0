"""A current value that can also be watched as an async stream of changes."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from typing import Generic, TypeVar

__all__ = ["Watched"]

T = TypeVar("T")


class Watched(Generic[T]):
    """Holds a value; ``changes()`` yields the current value, then each new one.

    A slow watcher skips intermediate values but always sees the latest: this is state,
    not an event log.
    """

    def __init__(self, value: T) -> None:
        self._value = value
        self._version = 0
        # Made only when a watcher waits: most values are never watched.
        self._event: asyncio.Event | None = None
        self._closed = False
        self.watchers = 0

    @property
    def value(self) -> T:
        return self._value

    def set(self, value: T) -> None:
        if value == self._value:
            return
        self._value = value
        self._version += 1
        self._wake()

    def close(self) -> None:
        """End every watcher's stream after it has seen the latest value."""
        self._closed = True
        self._wake()

    def _wake(self) -> None:
        event, self._event = self._event, None
        if event is not None:
            event.set()

    async def changes(self) -> AsyncIterator[T]:
        self.watchers += 1
        try:
            seen = self._version
            yield self._value
            while True:
                if self._version == seen:
                    if self._closed:
                        return
                    if self._event is None:
                        self._event = asyncio.Event()
                    await self._event.wait()
                    continue
                seen = self._version
                yield self._value
        finally:
            self.watchers -= 1
