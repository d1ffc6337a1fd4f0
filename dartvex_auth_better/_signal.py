"""Flag: a small stand-in for asyncio.Event, for objects kept per client.

An asyncio.Event costs about 850 bytes before anyone waits on it (its waiter deque is
made eagerly); a client holds several that nobody may ever wait on. A Flag keeps a bool
and makes its waiter list only when a task waits.
"""

from __future__ import annotations

import asyncio
import contextlib
from typing import Protocol

__all__ = ["Flag", "Waker"]


class Waker(Protocol):
    """What a query wakes on change: a Flag (or an asyncio.Event)."""

    def set(self) -> None: ...

    def clear(self) -> None: ...

    def is_set(self) -> bool: ...


class Flag:
    """``is_set``/``set``/``clear``/``wait`` with asyncio.Event's semantics (a waiter
    woken by ``set`` returns even if the flag is cleared before it runs)."""

    __slots__ = ("_set", "_waiters")

    def __init__(self, value: bool = False) -> None:
        self._set = value
        self._waiters: list[asyncio.Future[None]] | None = None

    def is_set(self) -> bool:
        return self._set

    def set(self) -> None:
        if self._set:
            return
        self._set = True
        waiters, self._waiters = self._waiters, None
        if waiters:
            for waiter in waiters:
                if not waiter.done():
                    waiter.set_result(None)

    def clear(self) -> None:
        self._set = False

    async def wait(self) -> None:
        if self._set:
            return
        waiter: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        if self._waiters is None:
            self._waiters = [waiter]
        else:
            self._waiters.append(waiter)
        try:
            await waiter
        finally:
            # Cancelled (a waiter woken by set() is already off the list): stop tracking it.
            waiters = self._waiters
            if waiters is not None:
                with contextlib.suppress(ValueError):
                    waiters.remove(waiter)
                if not waiters:
                    self._waiters = None
