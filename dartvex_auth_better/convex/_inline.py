"""Text frames handled in aiohttp's data callback, one event-loop turn sooner.

aiohttp parses WebSocket frames in its protocol's ``data_received`` and queues them; a
task awaiting ``ws.receive()`` is then woken with ``call_soon`` and takes them on the next
loop turn. For a call's round trip that is one turn more than needed: frame parsed, loop
turn, reader task handles it and resolves the caller's future, loop turn, caller resumes.

``InlineFrames`` wraps the protocol's payload parser. After each feed it takes the text
frames at the head of aiohttp's queue and hands them to the client's handler in that same
callback, which resolves the caller's future at once. The handler takes only frames whose
handling is plain bookkeeping (see ``ConvexClient._read_frames``); any other frame, and
anything that is not a text frame (close, ping, an error, the end of the stream), wakes
the socket's reader task, which takes it and what follows it with ``ws.receive()`` as
before, then goes back to waiting. Frames are handled in the order they arrived, either
way.

This relies on aiohttp internals (the protocol's ``_payload_parser`` and the queue behind
``ws._reader``). ``InlineFrames.attach`` checks that they are the ones this was built and
tested against, and returns None otherwise: the reader task then takes every frame with
``ws.receive()``, which is correct everywhere, only a loop turn slower per frame.
"""

from __future__ import annotations

import asyncio
import os
from collections import deque
from collections.abc import Callable, Coroutine, Generator
from typing import Any

import aiohttp

from .._signal import Flag

__all__ = ["ENDED", "HANDED_BACK", "TAKEN", "InlineFrames"]

# What on_text says of a frame it was given:
TAKEN = 0  # handled
HANDED_BACK = 1  # the reader task must handle it, and every frame after it
ENDED = 2  # handled, and the socket is ending: take nothing more

ENABLED = os.environ.get("DARTVEX_AUTH_BETTER_INLINE_FRAMES", "1") != "0"
"""Off: every socket reads with ``ws.receive()`` only (tests run that path too; users can
turn it off with ``DARTVEX_AUTH_BETTER_INLINE_FRAMES=0``, read at import)."""

# aiohttp releases whose internals match what InlineFrames uses (checked again at attach).
_SUPPORTED = ((3, 11), (3, 14))
_TEXT = aiohttp.WSMsgType.TEXT


def _aiohttp_version() -> tuple[int, int]:
    try:
        major, minor = aiohttp.__version__.split(".")[:2]
        return int(major), int(minor)
    except ValueError:
        return (0, 0)


_VERSION_OK = _SUPPORTED[0] <= _aiohttp_version() <= _SUPPORTED[1]


class InlineFrames:
    """One socket's inline frame handling (see the module docstring).

    ``on_text(msg)`` gets each text frame taken inline and returns ``TAKEN``,
    ``HANDED_BACK`` (the reader task handles it, and every frame after it) or ``ENDED``
    (inline handling stops for good, and the reader task is woken).
    """

    __slots__ = (
        "_buffer",
        "_on_text",
        "_parser",
        "_protocol",
        "_queue",
        "_taker",
        "_wake",
        "_ws",
        "error",
        "held",
        "reader_active",
        "stopped",
    )

    def __init__(
        self,
        ws: aiohttp.ClientWebSocketResponse,
        queue: Any,
        protocol: Any,
        parser: Any,
        on_text: Callable[[aiohttp.WSMessage], int],
    ) -> None:
        self._ws = ws
        self._queue = queue
        self._buffer: deque[tuple[aiohttp.WSMessage, int]] = queue._buffer
        self._protocol = protocol
        self._parser = parser
        self._on_text = on_text
        # The coroutine that takes frames (see drain), made at the first drain.
        self._taker: Coroutine[Any, Any, None] | None = None
        self._wake = Flag()
        # The reader task is taking frames with ws.receive(): leave the queue to it.
        self.reader_active = False
        self.stopped = False
        # A frame taken from the queue that the reader task must handle.
        self.held: aiohttp.WSMessage | None = None
        # What on_text raised (a bug): the reader task raises it where it belongs.
        self.error: Exception | None = None

    @classmethod
    def attach(
        cls, ws: aiohttp.ClientWebSocketResponse, on_text: Callable[[aiohttp.WSMessage], int]
    ) -> InlineFrames | None:
        """Wrap the socket's parser, or None when its internals are not the known ones.
        Frames already queued stay there until the first ``drain()``."""
        if not (ENABLED and _VERSION_OK):
            return None
        conn = getattr(ws, "_conn", None)
        protocol = getattr(conn, "protocol", None)
        parser = getattr(protocol, "_payload_parser", None)
        queue = getattr(ws, "_reader", None)
        if (
            protocol is None
            or parser is None
            or type(parser).__name__ != "WebSocketReader"
            or type(queue).__name__ != "WebSocketDataQueue"
            or type(getattr(queue, "_buffer", None)) is not deque
            or not hasattr(ws, "_close_code")
            or getattr(protocol, "_payload", None) is not queue
            or ws.closed
        ):
            return None
        inline = cls(ws, queue, protocol, parser, on_text)
        protocol._payload_parser = inline
        return inline

    def detach(self) -> None:
        """Stop for good; give aiohttp its own parser back (the socket is ending)."""
        self.stopped = True
        if self._protocol._payload_parser is self:
            self._protocol._payload_parser = self._parser
        if self._taker is not None:
            self._taker.close()
            self._taker = None

    # -- the parser's interface, as aiohttp's protocol calls it ---------------------------

    def feed_data(self, data: bytes) -> Any:
        result = self._parser.feed_data(data)
        self.drain()
        return result

    def feed_eof(self) -> None:
        self._parser.feed_eof()
        self._wake.set()

    # -- for the reader task ---------------------------------------------------------------

    def pending(self) -> bool:
        """Frames (or the end of the stream) wait in aiohttp's queue."""
        return bool(self._buffer) or self._queue.is_eof()

    async def wait(self) -> None:
        """Until the reader task has something to take, or inline handling stopped."""
        try:
            await self._wake.wait()
        except asyncio.CancelledError:
            # What ws.receive() does when it is cancelled (the socket is being dropped:
            # inactivity, reconnect_now, close): the close that follows sends its Close
            # frame but does not wait for the server's reply.
            self._ws._close_code = aiohttp.WSCloseCode.ABNORMAL_CLOSURE
            raise
        self._wake.clear()

    def drain(self) -> None:
        """Take the text frames at the head of the queue, in order, while on_text handles
        them; wake the reader task for whatever it leaves."""
        if self.reader_active or self.stopped or self.held is not None or self._ws.closed:
            return
        # The frames are taken by one long-lived coroutine, resumed here and paused when
        # the batch is done, rather than by calling queue.read() here: a coroutine call
        # made from plain code ends in a StopIteration, which cost about 0.5 us per frame
        # (a third of what the floor spends on a frame), while an await inside a coroutine
        # returns the value directly.
        taker = self._taker
        if taker is None:
            taker = self._taker = self._take_frames()
        try:
            paused = taker.send(None)
        except StopIteration:  # on_text said ENDED
            self._taker = None
        except Exception as exc:
            self._taker = None
            self.error = exc
            self.stopped = True
        else:
            if paused is not _PAUSED:  # pragma: no cover - a queue with a frame never waits
                self._taker = None
                taker.close()
                self.error = RuntimeError("aiohttp's queue waited with a frame in it")
                self.stopped = True
        if self.stopped or self.held is not None or self._buffer or self._queue.is_eof():
            self._wake.set()

    async def _take_frames(self) -> None:
        buffer, read, on_text = self._buffer, self._queue.read, self._on_text
        while True:
            while buffer and buffer[0][0].type is _TEXT:
                # read() returns at once when the queue holds a frame; it keeps aiohttp's
                # flow-control accounting right (a paused transport is resumed).
                msg: aiohttp.WSMessage = await read()
                outcome = on_text(msg)
                if outcome:
                    if outcome != HANDED_BACK:
                        self.stopped = True
                        return
                    self.held = msg
                    break
            await _pause()


class _Paused:
    """What the frame taker yields to drain() when it has taken what it could."""

    __slots__ = ()

    def __await__(self) -> Generator[_Paused, None, None]:
        yield self


_PAUSED = _Paused()


def _pause() -> _Paused:
    return _PAUSED
