"""The frames going out on one socket, written by the caller that makes them.

A frame is written the moment it is made (``push``), from whichever task made it: no task
hop and no event-loop turn before the write. aiohttp's uncompressed ``send_frame`` writes
to the transport synchronously and only suspends when the transport asks it to wait (its
buffer is full); that case, any compression, and the frames that come after it go to a
writer task, which writes them in order and runs only while it has such work (an idle
socket has none). So frames leave in the order they were made, and a request is marked
sent just before its write starts (if the socket dies in the middle of a write, the
server may have it: an action must not be sent again).

Since a call's frame is written at once, a call made where it is already cancelled (an
expired ``anyio`` scope) must check that first (``checkpoint_if_cancelled``): it is then
dropped, never sent.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Awaitable, Callable, Coroutine, Generator
from typing import Any

import aiohttp
import anyio
from anyio.lowlevel import checkpoint_if_cancelled

from .._logging import ws_logger
from .._signal import Flag
from ._requests import RequestManager
from ._sync import Outgoing

__all__ = ["Outbox", "checkpoint_if_cancelled"]

_TEXT = aiohttp.WSMsgType.TEXT
_SEND_ERRORS = (aiohttp.ClientError, ConnectionError, RuntimeError)


class Outbox:
    """One socket's outgoing frames (see the module docstring)."""

    def __init__(
        self,
        ws: aiohttp.ClientWebSocketResponse,
        requests: RequestManager,
        spawn: Callable[[Callable[[], Awaitable[None]]], bool],
    ) -> None:
        self._ws = ws
        self._requests = requests
        self._frames: deque[Outgoing] = deque()
        # Starts the writer task in the client's task group; it runs only while there is
        # something to finish, so an idle socket costs no task.
        self._spawn = spawn
        self._writer: anyio.CancelScope | None = None  # the running writer's scope
        self._writer_done: Flag | None = None
        self._stopped = False
        # Writing from the caller is only safe without compression (a compressed write
        # takes a lock and may run in a task of its own).
        self._direct = not ws.compress
        # The writer task has frames to write, or a write of its own to finish.
        self._busy = False
        # A write that the transport made wait, handed to the writer task to finish.
        self._stuck: tuple[Coroutine[Any, Any, None], Any] | None = None
        self.writing = False  # a write is under way (started, not finished)
        self.send_failed = False

    def push(self, frame: Outgoing) -> None:
        """Write a frame now, or queue it behind the ones still waiting."""
        if self._busy or self.send_failed or not self._direct:
            self._frames.append(frame)
            if not self._busy:
                self._busy = True
                self._start_writer()
            return
        data, request_id = frame
        if request_id is not None and not self._requests.claim_for_write(request_id):
            return  # its caller gave up before it reached the wire
        self.writing = True
        write = self._ws.send_frame(data, _TEXT)
        try:
            waiting_for = write.send(None)
        except StopIteration:
            self.writing = False  # written (the common case)
            return
        except _SEND_ERRORS as exc:
            self._failed(exc)
            return
        # The frame is with the transport, which asks to wait before more is written:
        # the writer task finishes this write, then writes what came meanwhile.
        self._stuck = (write, waiting_for)
        self._busy = True
        self._start_writer()

    def stop(self) -> None:
        """The socket is ending: write nothing more on it (frames made from now on wait
        for the next socket's restart, which rebuilds them from state); cancel the writer
        task if one runs."""
        self._stopped = True
        self._direct = False
        self._busy = True
        if self._writer is not None:
            self._writer.cancel()

    async def aclose(self) -> None:
        """``stop()``, then wait until the writer task (if any) has ended."""
        self.stop()
        done = self._writer_done
        if done is not None:
            with anyio.CancelScope(shield=True):
                await done.wait()

    def _failed(self, exc: BaseException) -> None:
        # The reader sees the socket close; the loop reconnects as FailedToSendMessage.
        ws_logger.info("send failed: %s", type(exc).__name__)
        self.send_failed = True
        self._busy = True  # nothing more is written on this socket
        self._start_writer()  # it closes the socket

    def _start_writer(self) -> None:
        if self._writer is None and not self._stopped:
            self._writer = anyio.CancelScope()
            self._writer_done = Flag()
            if not self._spawn(self._run_writer):  # the client is closing
                self._writer = self._writer_done = None

    async def _run_writer(self) -> None:
        scope, done = self._writer, self._writer_done
        assert scope is not None and done is not None
        try:
            with scope:
                await self._write_queued()
        finally:
            self._writer = None
            done.set()

    async def _write_queued(self) -> None:
        """Finish the write the transport made wait, write the frames queued meanwhile,
        then end (the next write that must wait starts a new writer task). After a failed
        write: close the socket."""
        ws = self._ws
        frames = self._frames
        try:
            if not self.send_failed:
                if self._stuck is not None:
                    write, waiting_for = self._stuck
                    await _Resume(write, waiting_for)
                    self._stuck = None
                    self.writing = False
                while frames:
                    data, request_id = frames.popleft()
                    if request_id is not None and not self._requests.claim_for_write(request_id):
                        continue
                    self.writing = True
                    await ws.send_frame(data, _TEXT)
                    self.writing = False
                # Nothing left, and no await since the check: later frames are written by
                # their callers again (or start a new writer).
                self._busy = False
                return
        except _SEND_ERRORS as exc:
            ws_logger.info("send failed: %s", type(exc).__name__)
            self.send_failed = True
        await ws.close()


class _Resume:
    """Awaits the rest of a coroutine that another task started and that suspended on
    ``waiting_for`` (the future it yielded): once that future is done, the coroutine is
    resumed where it stopped, as the task that started it would have done."""

    __slots__ = ("_coro", "_waiting_for")

    def __init__(self, coro: Coroutine[Any, Any, None], waiting_for: Any) -> None:
        self._coro = coro
        self._waiting_for = waiting_for

    def __await__(self) -> Generator[Any, Any, None]:
        try:
            yield self._waiting_for
        except BaseException:
            self._coro.close()
            raise
        yield from self._coro.__await__()
