"""What decoding JSON from a server can raise.

msgspec raises ``DecodeError`` for text that is not JSON, and ``RecursionError`` for JSON
nested deeper than the interpreter's recursion limit (about 1,000 levels): valid JSON, so
not a ``DecodeError``, but just as much a bad reply. Every place that decodes what a
server sent catches both.
"""

from __future__ import annotations

import msgspec

__all__ = ["JSON_ERRORS"]

JSON_ERRORS: tuple[type[Exception], ...] = (msgspec.DecodeError, RecursionError)
