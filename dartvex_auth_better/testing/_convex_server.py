"""LocalConvex: an in-process Convex deployment for tests, speaking the real sync protocol.

``LocalConvex`` is an ``aiohttp.web`` server on 127.0.0.1 that implements the Convex
WebSocket sync protocol (``/api/sync`` and ``/api/<version>/sync``) and the HTTP function
API (``POST /api/query|mutation|action``) closely enough to drive real clients: strict
query-set and identity versions, Transitions that always start from the last version sent
on the socket, read-your-writes mutation ordering, mutation de-duplication by
``(sessionId, requestId)``, real RS256 JWT verification against a JWKS, and the server's
AuthError / FatalError / close behaviour.

Functions are plain Python callables, sync or async, registered under Convex names::

    from dartvex_auth_better import ConvexError

    issuer = TestTokenIssuer()
    async with LocalConvex(jwks=issuer.jwks, issuer=issuer.issuer) as convex:

        @convex.query("messages:list")
        def list_messages(ctx: QueryCtx, args: dict[str, Any]) -> list[dict[str, Any]]:
            return ctx.db.query("messages")

        @convex.mutation("messages:send")
        def send(ctx: MutationCtx, args: dict[str, Any]) -> str:
            user = ctx.auth.get_user_identity()
            if user is None:
                raise ConvexError("not signed in", data={"code": "UNAUTHENTICATED"})
            return ctx.db.insert("messages", {"body": args["body"], "author": user["subject"]})

        # Point a client at convex.url ("http://127.0.0.1:<port>") and authenticate it
        # with issuer.mint("user-1", email="a@example.com").

Wire choices:

* ``latest_ts`` is a wall-clock nanosecond timestamp (like the real backend), advanced to
  ``max(now_ns, latest_ts + 1)`` on every committed mutation and every direct write to
  :attr:`LocalConvex.db`. A restarted server therefore never lags behind a client's
  ``maxObservedTimestamp``.
* HTTP function errors are returned with status **200** and a ``{"status": "error"}`` body,
  as convex-backend's ``public_api.rs`` does; ``logLines`` is omitted when empty, as there.
* The server sends Transitions only to connections with something to report (a changed
  query result, a new query-set or identity version, or a mutation response that needs a
  ts-advancing Transition). It does not broadcast ts bumps to idle sockets.
* An accepted Authenticate and a ModifyQuerySet that arrive together may be reported in
  one Transition (identity and query set both advance); the protocol allows it.
* Log lines are ``"[LOG] " + " ".join(parts)`` (non-strings as Convex JSON).
* Paginated queries (``ctx.db.paginate``) keep each page's range in the query's
  ``journal``, sent with every QueryUpdated and honoured when a client re-adds the query
  with it after a reconnect; other queries always have a null journal.

Nothing here logs a token; at most its last four characters.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import inspect
import json
import logging
import math
import re
import secrets
import struct
import time
import uuid
from collections import deque
from collections.abc import Awaitable, Callable, Iterable, Mapping
from dataclasses import dataclass, field
from typing import Annotated, Any, Literal, TypeVar

import aiohttp
import anyio
import anyio.abc
import jwt
import msgspec
from aiohttp import web
from cryptography.hazmat.primitives.asymmetric import rsa
from jwt.algorithms import RSAAlgorithm

from .._errors import ConvexError
from .._logging import redact
from ..convex._values import Int64, decode_value, encode_value

__all__ = [
    "ActionCtx",
    "Auth",
    "ConnectionRecord",
    "Database",
    "DatabaseReader",
    "DatabaseWriter",
    "FunctionKind",
    "LocalConvex",
    "MutationCtx",
    "QueryCtx",
    "ReceivedToken",
    "TestTokenIssuer",
    "decode_ts",
    "encode_ts",
]

logger = logging.getLogger("dartvex_auth_better.testing.convex")

FunctionKind = Literal["query", "mutation", "action"]
"""The three kinds of Convex function LocalConvex can host."""

Document = dict[str, Any]

_KIND_TITLE: dict[str, str] = {"query": "Query", "mutation": "Mutation", "action": "Action"}
_TABLE_NAME = re.compile(r"[A-Za-z][A-Za-z0-9_]{0,63}")
# Grace period for a client to answer our Close frame before the TCP connection is cut.
_CLOSE_GRACE_SECONDS = 5.0
# Upper bound on any single close-frame write while a socket is being torn down.
_SHUTDOWN_CLOSE_SECONDS = 1.0


# --------------------------------------------------------------------------------------
# Small helpers
# --------------------------------------------------------------------------------------


def encode_ts(ts: int) -> str:
    """Encode a u64 timestamp as the wire's EncodedTS: base64 (padded) of 8 LE bytes."""
    return base64.b64encode(struct.pack("<Q", ts)).decode("ascii")


def decode_ts(text: str) -> int:
    """Decode an EncodedTS back to an int; raises ``ValueError`` when it is not one."""
    try:
        raw = base64.b64decode(text, validate=True)
    except (ValueError, TypeError) as exc:
        raise ValueError("EncodedTS is not valid base64") from exc
    if len(raw) != 8:
        raise ValueError("EncodedTS must hold exactly 8 bytes")
    value: int = struct.unpack("<Q", raw)[0]
    return value


def _canonical_path(path: str) -> str:
    """``"messages.js:list"`` -> ``"messages:list"``; no ``:`` means ``:default``."""
    module, sep, export = path.rpartition(":")
    if not sep:
        module, export = path, "default"
    if module.endswith(".js"):
        module = module[: -len(".js")]
    return f"{module}:{export}"


def _copy_value(value: Any) -> Any:
    """Deep-copy a stored value (containers are copied; leaves are immutable)."""
    if isinstance(value, dict):
        return {k: _copy_value(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_copy_value(v) for v in value]
    if isinstance(value, bytearray | memoryview):
        return bytes(value)
    return value


def _clean_export(value: Any) -> Any:
    """The lossy ``format: "json"`` export, as convex-backend's ``export_clean``."""
    if isinstance(value, Int64):
        return str(int(value))
    if isinstance(value, float):
        if math.isnan(value):
            return "NaN"
        if math.isinf(value):
            return "Infinity" if value > 0 else "-Infinity"
        return value
    if isinstance(value, bytes):
        return base64.b64encode(value).decode("ascii")
    if isinstance(value, list):
        return [_clean_export(v) for v in value]
    if isinstance(value, dict):
        return {k: _clean_export(v) for k, v in value.items()}
    return value


def _log_text(part: object) -> str:
    if isinstance(part, str):
        return part
    try:
        return json.dumps(encode_value(part), sort_keys=True)
    except (TypeError, ValueError):
        return repr(part)


_T = TypeVar("_T")


class _Signal:
    """A single-waiter wake-up flag: ``set()`` wakes the waiter, ``wait()`` consumes it."""

    def __init__(self) -> None:
        self._event = anyio.Event()

    def set(self) -> None:
        self._event.set()

    async def wait(self) -> None:
        await self._event.wait()
        self._event = anyio.Event()


class _Notifier:
    """A broadcast "something changed" event that waiters re-check a predicate against."""

    def __init__(self) -> None:
        self._event = anyio.Event()

    def notify(self) -> None:
        self._event.set()
        self._event = anyio.Event()

    async def wait_for(self, predicate: Callable[[], _T | None], timeout: float) -> _T:  # noqa: ASYNC109
        with anyio.fail_after(timeout):
            while True:
                event = self._event
                result = predicate()
                if result is not None and result is not False:
                    return result
                await event.wait()


# --------------------------------------------------------------------------------------
# The database
# --------------------------------------------------------------------------------------


def _check_table(table: object) -> str:
    if not isinstance(table, str) or not _TABLE_NAME.fullmatch(table):
        raise ValueError(f"invalid table name {table!r}: use letters, digits and '_'")
    return table


def _user_fields(fields: object, *, system: Mapping[str, Any] | None = None) -> Document:
    """Validate and copy user-supplied document fields.

    ``system`` holds the document's current ``_id``/``_creationTime``: they may be repeated
    unchanged (handy for ``replace(doc_id, {**old, ...})``) but never changed.
    """
    if not isinstance(fields, Mapping):
        raise TypeError(f"a document must be a mapping, not {type(fields).__name__}")
    out: Document = {}
    for key, value in fields.items():
        if not isinstance(key, str):
            raise TypeError(f"document keys must be strings, not {type(key).__name__}")
        if key.startswith("_"):
            if system is not None and key in system and value == system[key]:
                continue
            raise ValueError(
                f"field {key!r} is reserved: fields starting with '_' are system fields"
            )
        out[key] = value
    # encode_value checks every nested value and field name the way Convex would.
    encode_value(out)
    return {k: _copy_value(v) for k, v in out.items()}


class _Transaction:
    """One function's view of the database: records reads, buffers writes until commit."""

    def __init__(self, db: Database, journal: str | None = None) -> None:
        self._db = db
        self.reads: set[str] = set()
        self.writes: set[str] = set()
        self._changes: dict[str, Document | None] = {}
        self._inserted: dict[str, list[str]] = {}
        self._new_table_of: dict[str, str] = {}
        # Pagination: the journal the query was (re-)run with, and the one it produces.
        self.journal_in = journal
        self.journal_out: str | None = None
        self.paginated = False

    def _current(self, doc_id: str) -> tuple[str, Document] | None:
        table = self._new_table_of.get(doc_id) or self._db._table_of.get(doc_id)
        if table is None:
            return None
        if doc_id in self._changes:
            doc = self._changes[doc_id]
        else:
            doc = self._db._tables.get(table, {}).get(doc_id)
        return None if doc is None else (table, doc)

    def get(self, doc_id: str) -> Document | None:
        if not isinstance(doc_id, str):
            raise TypeError(f"a document id is a string, not {type(doc_id).__name__}")
        found = self._current(doc_id)
        if found is None:
            return None
        table, doc = found
        self.reads.add(table)
        result: Document = _copy_value(doc)
        return result

    def query(self, table: str) -> list[Document]:
        _check_table(table)
        self.reads.add(table)
        out: list[Document] = []
        for doc_id, doc in self._db._tables.get(table, {}).items():
            current = self._changes.get(doc_id, doc)
            if current is not None:
                out.append(_copy_value(current))
        for doc_id in self._inserted.get(table, []):
            current = self._changes.get(doc_id)
            if current is not None:
                out.append(_copy_value(current))
        return out

    def insert(self, table: str, doc: Mapping[str, Any]) -> str:
        _check_table(table)
        fields = _user_fields(doc)
        doc_id = self._db._allocate_id(table)
        fields["_id"] = doc_id
        fields["_creationTime"] = self._db._next_creation_time()
        self._changes[doc_id] = fields
        self._inserted.setdefault(table, []).append(doc_id)
        self._new_table_of[doc_id] = table
        self.writes.add(table)
        return doc_id

    def _existing(self, doc_id: str, operation: str) -> tuple[str, Document]:
        found = self._current(doc_id) if isinstance(doc_id, str) else None
        if found is None:
            raise ValueError(f"{operation} on nonexistent document ID {doc_id!r}")
        return found

    def patch(self, doc_id: str, fields: Mapping[str, Any]) -> None:
        table, doc = self._existing(doc_id, "Patch")
        system = {"_id": doc["_id"], "_creationTime": doc["_creationTime"]}
        updates = _user_fields(fields, system=system)
        self._changes[doc_id] = {**doc, **updates}
        self.writes.add(table)

    def replace(self, doc_id: str, doc: Mapping[str, Any]) -> None:
        table, old = self._existing(doc_id, "Replace")
        system = {"_id": old["_id"], "_creationTime": old["_creationTime"]}
        fields = _user_fields(doc, system=system)
        self._changes[doc_id] = {**fields, **system}
        self.writes.add(table)

    def delete(self, doc_id: str) -> None:
        table, _ = self._existing(doc_id, "Delete")
        self._changes[doc_id] = None
        self.writes.add(table)

    def paginate(
        self,
        table: str,
        opts: object,
        *,
        filter: Callable[[Document], bool] | None,
        order: str,
        split_recommended_over: int | None,
        split_required_over: int | None,
    ) -> dict[str, Any]:
        if self.paginated:
            raise _UncaughtError(
                "Uncaught Error: This query or mutation function ran multiple paginated "
                "queries. Convex only supports a single paginated query in each function."
            )
        self.paginated = True
        if order not in ("asc", "desc"):
            raise ValueError(f"order must be 'asc' or 'desc', not {order!r}")
        num_items, cursor, end_cursor = _pagination_opts(opts)
        scope = _CursorScope(self._db._cursor_epoch, _check_table(table), order)
        start = None if cursor is None else scope.decode(cursor, "cursor")
        # The page's far end: fixed by the arguments (a split half), else by the journal
        # (a re-run of a page that already ran), else chosen now from numItems.
        end: _CursorKey | None = None
        if end_cursor is not None:
            end = scope.decode(end_cursor, "endCursor")
        elif self.journal_in is not None:
            end = scope.decode(self.journal_in, "journal")
        docs = sorted(self.query(table), key=_creation_key, reverse=order == "desc")
        if filter is not None:
            docs = [d for d in docs if filter(d)]
        if start is not None:
            docs = [d for d in docs if scope.after(_creation_key(d), start)]
        if end is not None:
            if not end.is_end:
                docs = [d for d in docs if not scope.after(_creation_key(d), end)]
            page, continue_key = docs, end
        elif len(docs) > num_items:
            page = docs[:num_items]
            continue_key = _CursorKey(_creation_key(page[-1]))
        else:
            # Nothing beyond this page: it runs to the end of the table, so documents
            # added later at the end show up here rather than in no page at all.
            page, continue_key = docs, _CursorKey(None)
        split_cursor = None
        if len(page) >= 2:
            split_cursor = scope.encode(_CursorKey(_creation_key(page[(len(page) - 1) // 2])))
        page_status = None
        if split_required_over is not None and len(page) > split_required_over:
            # The real server stops reading at its limits and leaves the page incomplete.
            page = page[:split_required_over]
            page_status = "SplitRequired"
        elif split_recommended_over is not None and len(page) > split_recommended_over:
            page_status = "SplitRecommended"
        continue_cursor = scope.encode(continue_key)
        self.journal_out = continue_cursor
        return {
            "page": page,
            "isDone": continue_key.is_end,
            "continueCursor": continue_cursor,
            "splitCursor": split_cursor,
            "pageStatus": page_status,
        }


# --------------------------------------------------------------------------------------
# Pagination cursors
# --------------------------------------------------------------------------------------

_PAGINATION_OPTS = frozenset(
    {"numItems", "cursor", "endCursor", "id", "maximumRowsRead", "maximumBytesRead"}
)


def _pagination_opts(opts: object) -> tuple[int, str | None, str | None]:
    """Validate ``paginationOpts`` as Convex's ``paginationOptsValidator`` would."""
    if not isinstance(opts, Mapping):
        raise ValueError("paginationOpts must be an object")
    extra = set(opts) - _PAGINATION_OPTS
    if extra:
        raise ValueError(f"paginationOpts has unexpected fields: {sorted(extra)}")
    num_items = opts.get("numItems")
    if (
        isinstance(num_items, bool)
        or not isinstance(num_items, int | float)
        or num_items != int(num_items)
        or num_items < 1
    ):
        raise ValueError(f"paginationOpts.numItems must be a positive integer, not {num_items!r}")
    cursor = opts.get("cursor", _MISSING)
    if cursor is _MISSING or not (cursor is None or isinstance(cursor, str)):
        raise ValueError("paginationOpts.cursor must be a string or null")
    end_cursor = opts.get("endCursor")
    if not (end_cursor is None or isinstance(end_cursor, str)):
        raise ValueError("paginationOpts.endCursor must be a string or null")
    return int(num_items), cursor, end_cursor


_MISSING: Any = object()


def _creation_key(doc: Document) -> float:
    key: float = doc["_creationTime"]
    return key


@dataclass(frozen=True)
class _CursorKey:
    """A position in a table's order: after the document created at ``creation_time``,
    or (None) past the last document."""

    creation_time: float | None

    @property
    def is_end(self) -> bool:
        return self.creation_time is None


@dataclass(frozen=True)
class _CursorScope:
    """What a cursor is valid for: one table in one order, in one cursor epoch
    (:meth:`LocalConvex.invalidate_cursors` starts a new epoch)."""

    epoch: int
    table: str
    order: str

    def encode(self, key: _CursorKey) -> str:
        payload = json.dumps([self.epoch, self.table, self.order, key.creation_time])
        return base64.urlsafe_b64encode(payload.encode()).decode("ascii")

    def decode(self, text: str, what: str) -> _CursorKey:
        try:
            epoch, table, order, position = json.loads(base64.urlsafe_b64decode(text))
        except (ValueError, TypeError):
            position = epoch = table = order = None
        if (epoch, table, order) != (self.epoch, self.table, self.order) or not (
            position is None or isinstance(position, float)
        ):
            raise _UncaughtError(
                f"Uncaught Error: InvalidCursor: the {what} is not valid for this paginated "
                "query: it comes from a different query, or the query changed underneath it"
            )
        return _CursorKey(position)

    def after(self, position: float, key: _CursorKey) -> bool:
        """Whether a document at ``position`` comes after ``key`` in this order."""
        if key.creation_time is None:
            return False
        if self.order == "asc":
            return position > key.creation_time
        return position < key.creation_time


class Database:
    """The deployment's tables: an in-memory, insertion-ordered document store.

    Functions reach it through ``ctx.db``. Test code may also use it directly, through
    :attr:`LocalConvex.db`, to seed or inspect data: every direct write is its own
    committed transaction, advances ``latest_ts`` and refreshes live subscriptions just as
    a mutation would. Documents are dicts of Convex values; reads return copies, so
    changing a returned dict never changes the store.
    """

    def __init__(self, on_commit: Callable[[frozenset[str]], object] | None = None) -> None:
        self._tables: dict[str, dict[str, Document]] = {}
        self._table_of: dict[str, str] = {}
        self._next_id = 0
        self._last_creation_time = 0.0
        self._on_commit = on_commit
        # Part of every pagination cursor; bumping it invalidates all cursors issued so far.
        self._cursor_epoch = 0

    # -- direct access (each call is one committed transaction) -------------------------

    def insert(self, table: str, doc: Mapping[str, Any]) -> str:
        """Insert ``doc`` into ``table``; returns the new ``_id``."""
        tx = _Transaction(self)
        doc_id = tx.insert(table, doc)
        self._commit_direct(tx)
        return doc_id

    def get(self, doc_id: str) -> Document | None:
        """The document with this ``_id``, or None."""
        return _Transaction(self).get(doc_id)

    def query(self, table: str) -> list[Document]:
        """Every document of ``table`` in insertion order (empty for an unknown table)."""
        return _Transaction(self).query(table)

    def patch(self, doc_id: str, fields: Mapping[str, Any]) -> None:
        """Set the given fields of a document (None stores Convex null)."""
        tx = _Transaction(self)
        tx.patch(doc_id, fields)
        self._commit_direct(tx)

    def replace(self, doc_id: str, doc: Mapping[str, Any]) -> None:
        """Replace every user field of a document, keeping ``_id`` and ``_creationTime``."""
        tx = _Transaction(self)
        tx.replace(doc_id, doc)
        self._commit_direct(tx)

    def delete(self, doc_id: str) -> None:
        """Delete a document; raises ``ValueError`` when it does not exist."""
        tx = _Transaction(self)
        tx.delete(doc_id)
        self._commit_direct(tx)

    def tables(self) -> list[str]:
        """Names of the tables that currently hold documents."""
        return [name for name, docs in self._tables.items() if docs]

    # -- internals ----------------------------------------------------------------------

    def _allocate_id(self, table: str) -> str:
        self._next_id += 1
        # Opaque to callers; readable in test failures.
        return f"{table}_{self._next_id}"

    def _next_creation_time(self) -> float:
        # Convex creation times are float milliseconds, strictly increasing.
        now = time.time() * 1000.0
        self._last_creation_time = max(now, self._last_creation_time + 0.001)
        return self._last_creation_time

    def _apply(self, tx: _Transaction) -> frozenset[str]:
        """Commit a transaction's buffered writes atomically; returns the written tables."""
        for doc_id, doc in tx._changes.items():
            table = tx._new_table_of.get(doc_id) or self._table_of[doc_id]
            docs = self._tables.setdefault(table, {})
            if doc is None:
                docs.pop(doc_id, None)
            else:
                docs[doc_id] = doc
                self._table_of[doc_id] = table
        return frozenset(tx.writes)

    def _commit_direct(self, tx: _Transaction) -> None:
        written = self._apply(tx)
        if written and self._on_commit is not None:
            self._on_commit(written)


class DatabaseReader:
    """``ctx.db`` inside a query: ``get`` and ``query`` work, every write raises."""

    def __init__(self, tx: _Transaction) -> None:
        self._tx = tx

    def get(self, doc_id: str) -> Document | None:
        """The document with this ``_id`` (a copy), or None."""
        return self._tx.get(doc_id)

    def query(self, table: str) -> list[Document]:
        """Copies of every document of ``table``, in insertion order."""
        return self._tx.query(table)

    def paginate(
        self,
        table: str,
        pagination_opts: Mapping[str, Any],
        *,
        filter: Callable[[Document], bool] | None = None,
        order: Literal["asc", "desc"] = "asc",
        split_recommended_over: int | None = None,
        split_required_over: int | None = None,
    ) -> dict[str, Any]:
        """One page of ``table`` in creation order (``order="desc"``: newest first), as
        ``.paginate(paginationOpts)`` does on a real Convex query.

        ``pagination_opts`` is the function's ``paginationOpts`` argument: ``numItems``,
        ``cursor`` (None for the first page), optional ``endCursor``, ``id`` (ignored, as
        on the server: it only keeps pages of different clients apart). ``filter`` keeps
        the documents it returns True for; ``numItems`` counts kept documents.

        Returns ``{"page", "isDone", "continueCursor", "splitCursor", "pageStatus"}``.
        Like the real server, the page's range is fixed once it has run: the first run
        picks its end from ``numItems`` and records it in the query's journal, and later
        runs (after a write, or after a reconnect that sends the journal back) cover the
        same range, so the page grows or shrinks instead of shifting. A page with
        ``endCursor`` covers exactly ``(cursor, endCursor]``. Cursors are positions, so
        they stay valid across inserts and deletes; one from another table or order, or
        from before :meth:`LocalConvex.invalidate_cursors`, fails the query with an
        ``InvalidCursor`` error. The last page runs to the end of the table (``isDone``).

        ``splitCursor`` (the middle of the page) is set when the page holds two or more
        documents. ``pageStatus`` is None, or ``"SplitRecommended"`` when the page holds
        more than ``split_recommended_over`` documents, or ``"SplitRequired"`` when it
        holds more than ``split_required_over``: the page is then cut to that many
        documents, as the real server leaves a page incomplete when it hits its read
        limits. Only one paginated read per function run is allowed, as on Convex.
        """
        return self._tx.paginate(
            table,
            pagination_opts,
            filter=filter,
            order=order,
            split_recommended_over=split_recommended_over,
            split_required_over=split_required_over,
        )

    def _read_only(self, operation: str) -> RuntimeError:
        return RuntimeError(
            f"ctx.db.{operation} is not available in a query: queries are read-only"
        )

    def insert(self, table: str, doc: Mapping[str, Any]) -> str:
        """Not allowed in a query."""
        raise self._read_only("insert")

    def patch(self, doc_id: str, fields: Mapping[str, Any]) -> None:
        """Not allowed in a query."""
        raise self._read_only("patch")

    def replace(self, doc_id: str, doc: Mapping[str, Any]) -> None:
        """Not allowed in a query."""
        raise self._read_only("replace")

    def delete(self, doc_id: str) -> None:
        """Not allowed in a query."""
        raise self._read_only("delete")


class DatabaseWriter(DatabaseReader):
    """``ctx.db`` inside a mutation. Writes are buffered and committed atomically when the
    mutation returns; a mutation that raises writes nothing. Reads see its own writes."""

    def insert(self, table: str, doc: Mapping[str, Any]) -> str:
        """Insert ``doc`` into ``table``; returns the new ``_id``."""
        return self._tx.insert(table, doc)

    def patch(self, doc_id: str, fields: Mapping[str, Any]) -> None:
        """Set the given fields of a document (None stores Convex null)."""
        self._tx.patch(doc_id, fields)

    def replace(self, doc_id: str, doc: Mapping[str, Any]) -> None:
        """Replace every user field of a document, keeping ``_id`` and ``_creationTime``."""
        self._tx.replace(doc_id, doc)

    def delete(self, doc_id: str) -> None:
        """Delete a document; raises ``ValueError`` when it does not exist."""
        self._tx.delete(doc_id)


# --------------------------------------------------------------------------------------
# Identity and function contexts
# --------------------------------------------------------------------------------------

# OIDC standard claims and the UserIdentity field names Convex gives them.
_STANDARD_CLAIMS: dict[str, str] = {
    "name": "name",
    "given_name": "givenName",
    "family_name": "familyName",
    "nickname": "nickname",
    "preferred_username": "preferredUsername",
    "profile": "profileUrl",
    "picture": "pictureUrl",
    "email": "email",
    "email_verified": "emailVerified",
    "gender": "gender",
    "birthdate": "birthday",
    "zoneinfo": "timezone",
    "locale": "language",
    "phone_number": "phoneNumber",
    "phone_number_verified": "phoneNumberVerified",
    "address": "address",
    "updated_at": "updatedAt",
}
_REGISTERED_CLAIMS = frozenset({"iss", "sub", "aud", "exp", "iat", "nbf", "jti"})


@dataclass(frozen=True)
class _Identity:
    claims: dict[str, Any]
    user_identity: dict[str, Any]
    exp: float | None

    @classmethod
    def from_claims(cls, claims: dict[str, Any]) -> _Identity:
        issuer = str(claims.get("iss", ""))
        subject = str(claims.get("sub", ""))
        identity: dict[str, Any] = {
            "tokenIdentifier": f"{issuer}|{subject}",
            "subject": subject,
            "issuer": issuer,
        }
        for name, value in claims.items():
            if name in _REGISTERED_CLAIMS:
                continue
            identity[_STANDARD_CLAIMS.get(name, name)] = value
        exp = claims.get("exp")
        expiry = float(exp) if isinstance(exp, int | float) and not isinstance(exp, bool) else None
        return cls(claims=dict(claims), user_identity=identity, exp=expiry)

    def expired(self) -> bool:
        return self.exp is not None and self.exp <= time.time()


class Auth:
    """``ctx.auth``: who is calling."""

    def __init__(self, identity: Mapping[str, Any] | None) -> None:
        self._identity = dict(identity) if identity is not None else None

    def get_user_identity(self) -> dict[str, Any] | None:
        """The caller's UserIdentity (``subject``, ``issuer``, ``tokenIdentifier`` and the
        token's other claims such as ``email`` and ``name``), or None when anonymous."""
        if self._identity is None:
            return None
        result: dict[str, Any] = _copy_value(self._identity)
        return result


class _Ctx:
    def __init__(self, auth: Auth) -> None:
        self.auth = auth
        self._log_lines: list[str] = []

    def log(self, *parts: object) -> None:
        """Add a console line (``[LOG] ...``) to the function's ``logLines``."""
        self._log_lines.append("[LOG] " + " ".join(_log_text(p) for p in parts))


class QueryCtx(_Ctx):
    """The ``ctx`` a query function receives: ``db`` (read-only), ``auth``, ``log``."""

    def __init__(self, auth: Auth, db: DatabaseReader) -> None:
        super().__init__(auth)
        self.db = db


class MutationCtx(_Ctx):
    """The ``ctx`` a mutation function receives: ``db`` (read-write), ``auth``, ``log``."""

    def __init__(self, auth: Auth, db: DatabaseWriter) -> None:
        super().__init__(auth)
        self.db = db


class ActionCtx(_Ctx):
    """The ``ctx`` an action receives: ``auth``, ``log`` and ``run_query``/``run_mutation``/
    ``run_action`` (coroutines). Actions have no ``db``; they go through other functions."""

    def __init__(self, server: LocalConvex, identity: _Identity | None, auth: Auth) -> None:
        super().__init__(auth)
        self._server = server
        self._identity = identity

    async def run_query(self, name: str, args: Mapping[str, Any] | None = None) -> Any:
        """Run a query as the same caller; returns its result or raises its exception."""
        outcome = await self._server._run_function("query", name, dict(args or {}), self._identity)
        return self._unwrap(outcome)

    async def run_mutation(self, name: str, args: Mapping[str, Any] | None = None) -> Any:
        """Run a mutation (queued behind all other mutations) as the same caller."""
        job = _MutationJob(path=name, args=dict(args or {}), identity=self._identity)
        outcome = await self._server._submit_mutation(job)
        return self._unwrap(outcome)

    async def run_action(self, name: str, args: Mapping[str, Any] | None = None) -> Any:
        """Run another action as the same caller."""
        outcome = await self._server._run_function("action", name, dict(args or {}), self._identity)
        return self._unwrap(outcome)

    def _unwrap(self, outcome: _Outcome) -> Any:
        self._log_lines.extend(outcome.log_lines)
        if not outcome.success:
            assert outcome.exception is not None
            raise outcome.exception
        return decode_value(outcome.value)


QueryFunction = Callable[[QueryCtx, dict[str, Any]], Any]
MutationFunction = Callable[[MutationCtx, dict[str, Any]], Any]
ActionFunction = Callable[[ActionCtx, dict[str, Any]], Any]
_QF = TypeVar("_QF", bound=QueryFunction)
_MF = TypeVar("_MF", bound=MutationFunction)
_AF = TypeVar("_AF", bound=ActionFunction)


@dataclass(frozen=True)
class _FunctionSpec:
    kind: FunctionKind
    name: str
    fn: Callable[..., Any]


class _UncaughtError(Exception):
    """A failure whose message is already in its final wire form."""


@dataclass
class _Invalid:
    """Arguments (or a call) that cannot be run; the function fails with ``message``."""

    message: str


@dataclass
class _Outcome:
    success: bool
    value: Any = None
    error_message: str = ""
    error_data: Any = None
    has_error_data: bool = False
    log_lines: list[str] = field(default_factory=list)
    reads: frozenset[str] = frozenset()
    ts: int | None = None
    exception: BaseException | None = None
    journal: str | None = None

    @classmethod
    def failure(
        cls, exc: BaseException, log_lines: list[str], reads: Iterable[str] = ()
    ) -> _Outcome:
        if isinstance(exc, ConvexError):
            # JS ConvexError always carries data (the message when none was given).
            data = exc.data if exc.data is not None else exc.message
            try:
                encoded = encode_value(data)
            except (TypeError, ValueError):
                encoded = str(data)
            return cls(
                success=False,
                error_message=exc.message,
                error_data=encoded,
                has_error_data=True,
                log_lines=log_lines,
                reads=frozenset(reads),
                exception=exc,
            )
        if isinstance(exc, _UncaughtError):
            message = str(exc)
        else:
            message = f"Uncaught {type(exc).__name__}: {exc}"
        return cls(
            success=False,
            error_message=message,
            log_lines=log_lines,
            reads=frozenset(reads),
            exception=exc,
        )


@dataclass(eq=False)
class _MutationJob:
    path: str
    args: dict[str, Any] | _Invalid
    identity: _Identity | None
    conn: _Connection | None = None
    request_id: int | None = None
    dedupe_key: tuple[str, int] | None = None
    outcome: _Outcome | None = None
    done: anyio.Event = field(default_factory=anyio.Event)


def _parse_args(raw: object) -> dict[str, Any] | _Invalid:
    """Wire args (a one-element array, or a bare object on HTTP) to a decoded dict."""
    if raw is None:
        return {}
    if isinstance(raw, list):
        if not raw:
            return {}
        if len(raw) != 1:
            return _Invalid(f"Expected one argument object, got {len(raw)} positional arguments")
        raw = raw[0]
    if not isinstance(raw, dict):
        return _Invalid(f"Function arguments must be an object, not {type(raw).__name__}")
    try:
        decoded: dict[str, Any] = decode_value(raw)
    except Exception as exc:
        return _Invalid(f"Invalid argument encoding: {exc}")
    return decoded


# --------------------------------------------------------------------------------------
# JWT verification and the test token issuer
# --------------------------------------------------------------------------------------


class _AuthFailure(Exception):
    """A token was refused; the message is safe to send (it never contains the token)."""


class _JwtVerifier:
    def __init__(
        self,
        *,
        jwks_url: str | None,
        jwks: Mapping[str, Any] | None,
        issuer: str | None,
        audience: str,
    ) -> None:
        self._jwks_url = jwks_url
        self._issuer = issuer
        self._audience = audience
        self._static: list[jwt.PyJWK] = []
        if jwks is not None:
            # Parsing here (no I/O) reports a malformed JWKS at construction time.
            self._static = list(jwt.PyJWKSet.from_dict(dict(jwks)).keys)
        self._fetched: list[jwt.PyJWK] | None = None
        self._session: aiohttp.ClientSession | None = None
        self._fetch_lock: anyio.Lock | None = None
        self.fetch_count = 0

    @property
    def configured(self) -> bool:
        return bool(self._static) or self._jwks_url is not None

    async def verify(self, token: str) -> dict[str, Any]:
        if not self.configured:
            raise _AuthFailure(
                "No auth provider is configured on this LocalConvex (pass jwks= or jwks_url=)"
            )
        try:
            header = jwt.get_unverified_header(token)
        except jwt.PyJWTError as exc:
            raise _AuthFailure("Could not parse the token as a JWT") from exc
        kid = header.get("kid")
        key = await self._key_for(kid if isinstance(kid, str) else None)
        try:
            claims: dict[str, Any] = jwt.decode(
                token,
                key.key,
                algorithms=["RS256"],
                audience=self._audience,
                issuer=self._issuer,
                options={"require": ["exp", "iss", "sub"], "verify_iat": False},
            )
        except jwt.ExpiredSignatureError as exc:
            raise _AuthFailure("Could not verify OIDC token claim: token expired") from exc
        except jwt.PyJWTError as exc:
            raise _AuthFailure(f"Could not verify OIDC token claim: {exc}") from exc
        return claims

    async def _key_for(self, kid: str | None) -> jwt.PyJWK:
        key = self._pick(kid)
        if key is None and self._jwks_url is not None:
            # An unknown kid may mean the issuer rotated keys: fetch once more.
            await self._fetch(force=self._fetched is not None)
            key = self._pick(kid)
        if key is None:
            raise _AuthFailure("Could not verify OIDC token claim: no JWKS key matches the kid")
        return key

    def _pick(self, kid: str | None) -> jwt.PyJWK | None:
        keys = self._static + (self._fetched or [])
        if kid is None:
            return keys[0] if len(keys) == 1 else None
        for key in keys:
            if key.key_id == kid:
                return key
        return None

    async def _fetch(self, *, force: bool) -> None:
        assert self._jwks_url is not None
        if self._fetch_lock is None:
            self._fetch_lock = anyio.Lock()
        count_before = self.fetch_count
        async with self._fetch_lock:
            if self.fetch_count != count_before or (self._fetched is not None and not force):
                return  # someone else fetched while we waited
            if self._session is None:
                self._session = aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=10))
            self.fetch_count += 1
            try:
                async with self._session.get(self._jwks_url) as resp:
                    if resp.status != 200:
                        raise _AuthFailure(f"Fetching the JWKS failed with HTTP {resp.status}")
                    data = await resp.json(content_type=None)
                self._fetched = list(jwt.PyJWKSet.from_dict(data).keys)
            except _AuthFailure:
                raise
            except (
                aiohttp.ClientError,
                TimeoutError,
                ValueError,
                TypeError,
                AttributeError,
                jwt.PyJWTError,
            ) as exc:
                raise _AuthFailure(f"Could not fetch the JWKS: {type(exc).__name__}") from exc

    async def aclose(self) -> None:
        if self._session is not None:
            await self._session.close()
            self._session = None


def _unverified_exp(token: str) -> float | None:
    try:
        claims = jwt.decode(token, options={"verify_signature": False})
    except jwt.PyJWTError:
        return None
    exp = claims.get("exp")
    if isinstance(exp, bool) or not isinstance(exp, int | float):
        return None
    return float(exp)


class TestTokenIssuer:
    """A throwaway RS256 token issuer for tests that do not want to run a real one.

    It generates an RSA-2048 key on construction; :attr:`jwks` is the public key set to
    give ``LocalConvex(jwks=..., issuer=...)``, and :meth:`mint` signs tokens with it.
    """

    __test__ = False  # not a pytest test class, despite the name

    def __init__(
        self,
        issuer: str = "https://issuer.test",
        audience: str = "convex",
        *,
        kid: str | None = None,
    ) -> None:
        self.issuer = issuer
        self.audience = audience
        self.kid = kid if kid is not None else secrets.token_hex(8)
        self._private_key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
        jwk = RSAAlgorithm.to_jwk(self._private_key.public_key(), as_dict=True)
        self._jwk: dict[str, Any] = {**jwk, "kid": self.kid, "alg": "RS256", "use": "sig"}

    @property
    def jwks(self) -> dict[str, Any]:
        """The public JWKS (``{"keys": [jwk]}``), a fresh copy each time."""
        return {"keys": [dict(self._jwk)]}

    def mint(self, sub: str, *, ttl: float = 900, iat: float | None = None, **claims: Any) -> str:
        """Sign a JWT for ``sub``: ``iss``/``aud`` from this issuer, ``iat`` = ``iat`` or now,
        ``exp`` = ``iat + ttl`` (whole seconds, rounded down; a negative ``ttl`` gives an
        already-expired token). Extra ``claims`` are added and may override the defaults."""
        issued = time.time() if iat is None else iat
        payload: dict[str, Any] = {
            "sub": sub,
            "iss": self.issuer,
            "aud": self.audience,
            "iat": math.floor(issued),
            "exp": math.floor(issued + ttl),
        }
        payload.update(claims)
        return jwt.encode(payload, self._private_key, algorithm="RS256", headers={"kid": self.kid})


# --------------------------------------------------------------------------------------
# Client frames (validated with msgspec; unknown fields are tolerated)
# --------------------------------------------------------------------------------------

_NonNegative = Annotated[int, msgspec.Meta(ge=0)]
_U32 = Annotated[int, msgspec.Meta(ge=0, le=2**32 - 1)]


class _Connect(msgspec.Struct, tag_field="type", tag="Connect", rename="camel"):
    session_id: str
    connection_count: int = 0
    last_close_reason: str | None = None
    max_observed_timestamp: str | None = None
    client_ts: int | float | None = None


class _Add(msgspec.Struct, tag_field="type", tag="Add", rename="camel"):
    query_id: _NonNegative
    udf_path: str
    args: list[Any]
    journal: str | None = None
    component_path: str | None = None


class _Remove(msgspec.Struct, tag_field="type", tag="Remove", rename="camel"):
    query_id: _NonNegative


class _ModifyQuerySet(msgspec.Struct, tag_field="type", tag="ModifyQuerySet", rename="camel"):
    base_version: _NonNegative
    new_version: _NonNegative
    modifications: list[_Add | _Remove]


class _Authenticate(msgspec.Struct, tag_field="type", tag="Authenticate", rename="camel"):
    base_version: _NonNegative
    token_type: Literal["User", "Admin", "None"]
    value: str | None = None
    impersonating: Any = None
    acting_as: Any = None


class _Mutation(msgspec.Struct, tag_field="type", tag="Mutation", rename="camel"):
    request_id: _U32
    udf_path: str
    args: list[Any]
    component_path: str | None = None


class _Action(msgspec.Struct, tag_field="type", tag="Action", rename="camel"):
    request_id: _U32
    udf_path: str
    args: list[Any]
    component_path: str | None = None


class _Event(msgspec.Struct, tag_field="type", tag="Event", rename="camel"):
    event_type: str
    event: Any = None


_ClientMessage = _Connect | _ModifyQuerySet | _Authenticate | _Mutation | _Action | _Event


class _Malformed:
    def __init__(self, reason: str) -> None:
        self.reason = reason


# --------------------------------------------------------------------------------------
# Observability records
# --------------------------------------------------------------------------------------


@dataclass
class ReceivedToken:
    """One ``Authenticate{tokenType:"User"}`` the server received (any connection).

    ``exp`` is the token's unverified ``exp`` claim, ``received_at`` the wall-clock time it
    arrived, ``was_expired`` whether ``exp`` was already past then, and ``accepted``
    whether verification succeeded (None while it is still being verified).
    """

    token: str = field(repr=False)
    exp: float | None
    received_at: float
    was_expired: bool
    session_id: str | None = None
    accepted: bool | None = None

    @property
    def token_tail(self) -> str:
        """A log-safe stand-in for the token (at most its last four characters)."""
        return redact(self.token)


class ConnectionRecord:
    """What LocalConvex observed about one WebSocket connection, for test assertions.

    Attributes:
        path: the request path (``/api/sync`` or ``/api/<version>/sync``).
        client_header: the ``Convex-Client`` request header, or None.
        session_id: the ``sessionId`` of the Connect message (None until it arrives).
        frames: every client frame that decoded as a JSON object, in arrival order.
        raw_frame_count: how many text or binary frames arrived in all, malformed ones
            (not JSON, or JSON that is not an object) included.
        closed: True once the socket is gone.
        identity: the verified JWT claims in force, or None when anonymous.
        user_identity: what ``ctx.auth.get_user_identity()`` returns for this connection.

    Fault injection on this one socket: :meth:`drop`, :meth:`close`, :meth:`send_raw`,
    :meth:`pause_reading`/:meth:`resume_reading`.
    """

    def __init__(self, *, path: str, client_header: str | None, notifier: _Notifier) -> None:
        self.path = path
        self.client_header = client_header
        self.session_id: str | None = None
        self.frames: list[dict[str, Any]] = []
        self.raw_frame_count = 0
        self.closed = False
        self.identity: dict[str, Any] | None = None
        self.user_identity: dict[str, Any] | None = None
        self.opened_at = time.time()
        self._notifier = notifier
        self._conn: _Connection | None = None

    def __repr__(self) -> str:
        return (
            f"ConnectionRecord(path={self.path!r}, session_id={self.session_id!r}, "
            f"frames={len(self.frames)}, closed={self.closed})"
        )

    def frames_of_type(self, frame_type: str) -> list[dict[str, Any]]:
        """The received frames whose ``type`` is ``frame_type``."""
        return [f for f in self.frames if f.get("type") == frame_type]

    async def wait_for_frame(
        self,
        frame_type: str | None = None,
        *,
        after: int = 0,
        predicate: Callable[[dict[str, Any]], bool] | None = None,
        timeout: float = 5.0,  # noqa: ASYNC109 - a timeout argument reads best in tests
    ) -> dict[str, Any]:
        """Wait for a client frame at index >= ``after`` matching ``frame_type`` (and
        ``predicate``) and return it; frames that already arrived count. Raises
        ``TimeoutError`` after ``timeout`` seconds."""

        def find() -> dict[str, Any] | None:
            for frame in self.frames[after:]:
                if frame_type is not None and frame.get("type") != frame_type:
                    continue
                if predicate is not None and not predicate(frame):
                    continue
                return frame
            return None

        return await self._notifier.wait_for(find, timeout)

    async def wait_closed(self, timeout: float = 5.0) -> None:  # noqa: ASYNC109
        """Wait until the socket is closed."""
        await self._notifier.wait_for(lambda: self.closed, timeout)

    # -- fault injection on this socket ---------------------------------------------------

    async def drop(self) -> None:
        """Cut this socket abruptly (TCP abort, no Close frame) and wait until the server
        has noticed. Does nothing once it is closed."""
        if self._conn is None or self.closed:
            return
        self._conn.abort()
        await self.wait_closed(_CLOSE_GRACE_SECONDS + 1.0)

    async def close(self, code: int | None = 1011, reason: str = "InternalServerError") -> None:
        """Send a Close frame with ``code``/``reason`` on this socket (no protocol message
        first); ``code=None`` sends one with no status at all (the client sees 1005).
        Does nothing once it is closing."""
        if self._conn is not None:
            await self._conn.terminate(None, code=code, reason=reason if code is not None else "")

    def pause_reading(self) -> None:
        """Stop reading this socket at the TCP level: the client's frames stay in the
        kernel buffers, and once those are full its writes block (a stalled network)."""
        transport = self._conn.request.transport if self._conn is not None else None
        if transport is not None and not transport.is_closing():
            transport.pause_reading()

    def resume_reading(self) -> None:
        """Undo :meth:`pause_reading`."""
        transport = self._conn.request.transport if self._conn is not None else None
        if transport is not None and not transport.is_closing():
            transport.resume_reading()

    async def send_raw(self, data: bytes | str, *, binary: bool = False) -> bool:
        """Send one frame exactly as given, at once (ignoring :meth:`LocalConvex.pause`
        and ``response_delay``): a wrong or malformed server message, even a text frame
        that is not UTF-8. Returns False when the socket is already closing."""
        if self._conn is None:
            return False
        payload = data.encode() if isinstance(data, str) else data
        opcode = aiohttp.WSMsgType.BINARY if binary else aiohttp.WSMsgType.TEXT
        return await self._conn.send_verbatim(payload, opcode)


# --------------------------------------------------------------------------------------
# One WebSocket connection
# --------------------------------------------------------------------------------------


@dataclass(eq=False)
class _Query:
    query_id: int
    udf_path: str
    args: dict[str, Any] | _Invalid
    journal: str | None
    component_path: str | None
    stale: bool = True
    reads: frozenset[str] = frozenset()
    last_key: bytes | None = None


def _state_version(version: tuple[int, int, int]) -> dict[str, Any]:
    return {"querySet": version[0], "identity": version[1], "ts": encode_ts(version[2])}


class _Connection:
    """Server-side state of one sync socket.

    Tasks (all inside one anyio task group owned by the aiohttp handler): the reader (the
    group's body), the dispatcher (handles client frames in order), the outbox (mutation
    responses, then Transitions), the pinger, and one task per running action. Every
    write goes through ``_send_lock`` so frames never interleave.
    """

    def __init__(
        self, server: LocalConvex, ws: web.WebSocketResponse, request: web.Request
    ) -> None:
        self.server = server
        self.ws = ws
        self.request = request
        self.record = ConnectionRecord(
            path=request.path,
            client_header=request.headers.get("Convex-Client"),
            notifier=server._notifier_required,
        )
        self.record._conn = self
        self.session_id: str | None = None
        self.received_qs = 0
        self.received_identity = 0
        self.identity: _Identity | None = None
        self.queries: dict[int, _Query] = {}
        self.pending_removed: list[int] = []
        self.version: tuple[int, int, int] = (0, 0, 0)
        self.client_clock_skew: int | None = None
        self.closing = False
        self.close_sent = False
        self.shutdown_code = 1001
        self._send_lock = anyio.Lock()
        self._outbox_signal = _Signal()
        self._inbox_signal = _Signal()
        self._inbox: deque[object] = deque()
        self._responses: deque[dict[str, Any]] = deque()
        self._force_transition = False
        self._pending_terminal: dict[str, Any] | None = None
        self._last_send = anyio.current_time()
        self._tg: anyio.abc.TaskGroup | None = None
        self.done = anyio.Event()

    # -- lifecycle ------------------------------------------------------------------------

    async def run(self) -> None:
        try:
            async with anyio.create_task_group() as tg:
                self._tg = tg
                tg.start_soon(self._guarded, self._dispatch_loop)
                tg.start_soon(self._guarded, self._outbox_loop)
                tg.start_soon(self._guarded, self._ping_loop)
                await self._read_loop()
                tg.cancel_scope.cancel()
        finally:
            self.closing = True
            with anyio.CancelScope(shield=True):
                await self._finish_socket()

    def cancel(self) -> None:
        if self._tg is not None:
            self._tg.cancel_scope.cancel()

    async def _guarded(self, loop: Callable[[], Awaitable[None]]) -> None:
        try:
            await loop()
        except Exception:
            # A bug here must not leave a half-dead socket: log it and close with 1011.
            logger.exception("LocalConvex: connection task crashed")
            await self.terminate(None, code=1011, reason="InternalServerError")

    async def _finish_socket(self) -> None:
        if self.ws.closed:
            return
        if not self.close_sent:
            # Shutting down (aclose) or the handler is unwinding: say Going Away, but do not
            # wait for the client's reply; it may not be reading right now.
            with anyio.move_on_after(_SHUTDOWN_CLOSE_SECONDS):
                async with self._send_lock:
                    self.close_sent = True
                    with contextlib.suppress(ConnectionError):
                        await self.ws.send_frame(
                            struct.pack("!H", self.shutdown_code), aiohttp.WSMsgType.CLOSE
                        )
        # A graceful TCP close: whatever we sent is still delivered (unlike abort()).
        transport = self.request.transport
        if transport is not None:
            transport.close()

    def abort(self) -> None:
        """Cut the TCP connection without any WebSocket close handshake."""
        self.closing = True
        transport = self.request.transport
        if transport is not None:
            transport.abort()

    async def _abort_after(self, delay: float) -> None:
        await anyio.sleep(delay)
        self.abort()

    # -- reading --------------------------------------------------------------------------

    async def _read_loop(self) -> None:
        ws = self.ws
        while True:
            msg = await ws.receive()
            if msg.type in (aiohttp.WSMsgType.TEXT, aiohttp.WSMsgType.BINARY):
                self.record.raw_frame_count += 1
                try:
                    obj: object = msgspec.json.decode(msg.data)
                except msgspec.DecodeError as exc:
                    obj = _Malformed(f"Client sent a frame that is not JSON: {exc}")
                if isinstance(obj, dict):
                    self.record.frames.append(obj)
                self.server._notify()
                self._inbox.append(obj)
                self._inbox_signal.set()
                continue
            if msg.type is aiohttp.WSMsgType.CLOSE:
                if self.close_sent:
                    # Handshake complete (we closed first): drop the TCP connection.
                    self.abort()
                else:
                    async with self._send_lock:
                        self.closing = True
                        with anyio.move_on_after(_SHUTDOWN_CLOSE_SECONDS):
                            await ws.close(drain=False)
            return

    # -- sending --------------------------------------------------------------------------

    async def send(self, frame: Mapping[str, Any]) -> bool:
        """Send one frame (waits while the server is paused); False once closing."""
        return await self._send_raw([msgspec.json.encode(frame)])

    async def _send_raw(self, payloads: list[bytes]) -> bool:
        await self.server._wait_unpaused()
        if self.server.response_delay > 0:
            # A slow network or server: everything we send arrives this much later.
            await anyio.sleep(self.server.response_delay)
        async with self._send_lock:
            if self.closing:
                return False
            try:
                for payload in payloads:
                    await self.ws.send_frame(payload, aiohttp.WSMsgType.TEXT)
            except ConnectionError:
                self.abort()
                return False
            self._last_send = anyio.current_time()
            return True

    async def send_verbatim(self, payload: bytes, opcode: aiohttp.WSMsgType) -> bool:
        """Write one frame as given, now (no pause, no delay); False once closing."""
        async with self._send_lock:
            if self.closing:
                return False
            try:
                await self.ws.send_frame(payload, opcode)
            except ConnectionError:
                self.abort()
                return False
            self._last_send = anyio.current_time()
            return True

    async def terminate(
        self, frame: Mapping[str, Any] | None, *, code: int | None = None, reason: str = ""
    ) -> None:
        """Send ``frame`` (if any) then a Close frame, and stop sending anything else.

        ``code=None`` sends a Close frame with no status (the client sees 1005), as the
        real server does after AuthError and FatalError. Ignores the pause switch.
        """
        async with self._send_lock:
            if self.closing:
                return
            self.closing = True
            try:
                if frame is not None:
                    await self.ws.send_frame(msgspec.json.encode(frame), aiohttp.WSMsgType.TEXT)
                payload = b"" if code is None else struct.pack("!H", code) + reason.encode()[:123]
                await self.ws.send_frame(payload, aiohttp.WSMsgType.CLOSE)
                self.close_sent = True
            except ConnectionError:
                self.abort()
                return
        if self._tg is not None:
            try:
                self._tg.start_soon(self._abort_after, _CLOSE_GRACE_SECONDS)
            except RuntimeError:
                self.abort()  # the task group is already shutting down

    def request_terminate(self, frame: dict[str, Any]) -> None:
        """Ask the outbox task to send ``frame`` and close (callable from any task)."""
        if self._pending_terminal is None:
            self._pending_terminal = frame
        self._outbox_signal.set()

    def queue_response(self, frame: dict[str, Any], *, then_transition: bool) -> None:
        """Queue a MutationResponse; the outbox sends it before the next Transition."""
        if self.closing:
            return
        self._responses.append(frame)
        if then_transition:
            self._force_transition = True
        self._outbox_signal.set()

    def rerun_all(self) -> None:
        """Re-run every query on this socket (their results may have changed)."""
        for query in self.queries.values():
            query.stale = True
        if self.queries:
            self._outbox_signal.set()

    def invalidate(self, tables: frozenset[str]) -> None:
        """A commit wrote ``tables``: re-run the queries that read any of them."""
        hit = False
        for query in self.queries.values():
            if query.reads & tables:
                query.stale = True
                hit = True
        if hit:
            self._outbox_signal.set()

    def _expired_frame(self) -> dict[str, Any]:
        return {
            "type": "AuthError",
            "error": "TokenExpired: the authentication token has expired",
            "baseVersion": self.received_identity,
            "authUpdateAttempted": False,
        }

    async def _fatal(self, message: str) -> None:
        logger.info("LocalConvex: FatalError on session %s: %s", self.session_id, message)
        await self.terminate({"type": "FatalError", "error": message})

    # -- the pinger -----------------------------------------------------------------------

    async def _ping_loop(self) -> None:
        interval = self.server.ping_interval
        while not self.closing:
            delay = self._last_send + interval - anyio.current_time()
            if delay > 0:
                await anyio.sleep(delay)
                continue
            if not await self.send({"type": "Ping"}):
                return

    # -- the dispatcher -------------------------------------------------------------------

    async def _dispatch_loop(self) -> None:
        while True:
            while not self._inbox:
                await self._inbox_signal.wait()
            obj = self._inbox.popleft()
            await self.server._wait_unpaused()
            if self.closing:
                return
            await self._handle(obj)

    async def _handle(self, obj: object) -> None:
        if isinstance(obj, _Malformed):
            await self._fatal(obj.reason)
            return
        try:
            msg = msgspec.convert(obj, _ClientMessage)
        except msgspec.ValidationError as exc:
            await self._fatal(f"Invalid client message: {exc}")
            return
        if isinstance(msg, _Connect):
            await self._on_connect(msg)
        elif self.session_id is None:
            await self._fatal("The first message on a socket must be Connect")
        elif isinstance(msg, _ModifyQuerySet):
            await self._on_modify_query_set(msg)
        elif isinstance(msg, _Authenticate):
            await self._on_authenticate(msg)
        elif isinstance(msg, _Mutation):
            await self._on_mutation(msg)
        elif isinstance(msg, _Action):
            await self._on_action(msg)
        # Event: telemetry only; the real server just logs it.

    async def _on_connect(self, msg: _Connect) -> None:
        if self.session_id is not None:
            await self._fatal("Connect was sent twice on the same socket")
            return
        self.session_id = msg.session_id
        self.record.session_id = msg.session_id
        self.server._notify()
        if msg.max_observed_timestamp is not None:
            try:
                observed = decode_ts(msg.max_observed_timestamp)
            except ValueError as exc:
                await self._fatal(f"Invalid maxObservedTimestamp: {exc}")
                return
            latest = self.server.latest_ts
            if observed > latest:
                await self._fatal(
                    f"Client has observed a timestamp {observed} ahead of the backend's "
                    f"latest timestamp {latest}"
                )
                return
        if msg.client_ts is not None:
            self.client_clock_skew = int(msg.client_ts - time.time() * 1000.0)

    async def _on_modify_query_set(self, msg: _ModifyQuerySet) -> None:
        if msg.base_version != self.received_qs or msg.new_version <= msg.base_version:
            await self._fatal(
                f"BaseVersionMismatch: ModifyQuerySet base version {msg.base_version} (new "
                f"{msg.new_version}) does not match the server's query set version "
                f"{self.received_qs}"
            )
            return
        for mod in msg.modifications:
            if isinstance(mod, _Add):
                if mod.query_id in self.queries:
                    await self._fatal(f"Query ID {mod.query_id} was added twice")
                    return
                args = _parse_args(mod.args)
                if mod.component_path:
                    args = _Invalid("componentPath is only allowed with admin auth")
                self.queries[mod.query_id] = _Query(
                    query_id=mod.query_id,
                    udf_path=_canonical_path(mod.udf_path),
                    args=args,
                    journal=mod.journal,
                    component_path=mod.component_path,
                )
            else:
                if self.queries.pop(mod.query_id, None) is None:
                    await self._fatal(f"Remove of unknown query ID {mod.query_id}")
                    return
                self.pending_removed.append(mod.query_id)
        self.received_qs = msg.new_version
        self._outbox_signal.set()

    async def _on_authenticate(self, msg: _Authenticate) -> None:
        if msg.base_version != self.received_identity:
            await self._fatal(
                f"IdentityVersionMismatch: Authenticate base version {msg.base_version} does "
                f"not match the server's identity version {self.received_identity}"
            )
            return
        if msg.token_type == "None":
            self._set_identity(None)
            return
        if msg.token_type == "Admin":
            await self.terminate(
                {
                    "type": "AuthError",
                    "error": "LocalConvex does not accept admin keys",
                    "baseVersion": self.received_identity,
                    "authUpdateAttempted": True,
                }
            )
            return
        token = msg.value or ""
        exp = _unverified_exp(token)
        now = time.time()
        entry = ReceivedToken(
            token=token,
            exp=exp,
            received_at=now,
            was_expired=exp is not None and exp <= now,
            session_id=self.session_id,
        )
        self.server.received_tokens.append(entry)
        self.server._notify()
        try:
            claims = await self.server._verifier.verify(token)
        except _AuthFailure as exc:
            entry.accepted = False
            self.server._notify()
            logger.info(
                "LocalConvex: rejected token %s on session %s: %s",
                redact(token),
                self.session_id,
                exc,
            )
            await self.terminate(
                {
                    "type": "AuthError",
                    "error": str(exc),
                    "baseVersion": self.received_identity,
                    "authUpdateAttempted": True,
                }
            )
            return
        entry.accepted = True
        self._set_identity(_Identity.from_claims(claims))

    def _set_identity(self, identity: _Identity | None) -> None:
        self.identity = identity
        self.received_identity += 1
        self.record.identity = dict(identity.claims) if identity is not None else None
        self.record.user_identity = dict(identity.user_identity) if identity is not None else None
        for query in self.queries.values():
            query.stale = True
        self.server._notify()
        self._outbox_signal.set()

    async def _on_mutation(self, msg: _Mutation) -> None:
        assert self.session_id is not None
        args = _parse_args(msg.args)
        if msg.component_path:
            args = _Invalid("componentPath is only allowed with admin auth")
        job = _MutationJob(
            path=msg.udf_path,
            args=args,
            identity=self.identity,
            conn=self,
            request_id=msg.request_id,
            dedupe_key=(self.session_id, msg.request_id),
        )
        self.server._enqueue_mutation(job)

    async def _on_action(self, msg: _Action) -> None:
        if self.identity is not None and self.identity.expired():
            await self.terminate(self._expired_frame())
            return
        args = _parse_args(msg.args)
        if msg.component_path:
            args = _Invalid("componentPath is only allowed with admin auth")
        assert self._tg is not None
        self._tg.start_soon(self._run_action, msg.request_id, msg.udf_path, args, self.identity)

    async def _run_action(
        self,
        request_id: int,
        path: str,
        args: dict[str, Any] | _Invalid,
        identity: _Identity | None,
    ) -> None:
        outcome = await self.server._run_function("action", path, args, identity)
        frame: dict[str, Any] = {
            "type": "ActionResponse",
            "requestId": request_id,
            "success": outcome.success,
            "result": outcome.value if outcome.success else outcome.error_message,
            "logLines": outcome.log_lines,
        }
        if outcome.has_error_data:
            frame["errorData"] = outcome.error_data
        await self.send(frame)

    # -- the outbox: mutation responses and Transitions -------------------------------------

    async def _outbox_loop(self) -> None:
        while True:
            await self._outbox_signal.wait()
            if self._pending_terminal is not None:
                await self.terminate(self._pending_terminal)
                return
            await self.server._wait_unpaused()
            while self._responses:
                if not await self.send(self._responses.popleft()):
                    return
            if self._pending_terminal is not None:
                await self.terminate(self._pending_terminal)
                return
            await self._maybe_transition()
            if self.closing:
                return

    async def _maybe_transition(self) -> None:
        server = self.server
        # Snapshot what this Transition will claim. Functions may await, and frames that
        # arrive meanwhile belong to the next Transition.
        query_set = self.received_qs
        identity_version = self.received_identity
        identity = self.identity
        ts = server.latest_ts
        stale = [q for q in self.queries.values() if q.stale]
        removed, self.pending_removed = self.pending_removed, []
        if stale and identity is not None and identity.expired():
            await self.terminate(self._expired_frame())
            return
        modifications: list[dict[str, Any]] = [
            {"type": "QueryRemoved", "queryId": query_id} for query_id in removed
        ]
        for query in stale:
            query.stale = False
        for query in stale:
            outcome = await server._run_function(
                "query", query.udf_path, query.args, identity, journal=query.journal
            )
            if self.queries.get(query.query_id) is not query:
                continue  # removed while it ran; QueryRemoved goes out next time
            query.reads = outcome.reads
            query.journal = outcome.journal
            mod = _query_modification(query.query_id, outcome)
            key = msgspec.json.encode([v for k, v in sorted(mod.items()) if k != "logLines"])
            if key == query.last_key:
                continue
            query.last_key = key
            modifications.append(mod)
        end = (query_set, identity_version, ts)
        force, self._force_transition = self._force_transition, False
        if end == self.version and not modifications and not force:
            return
        start = self.version
        if server._wrong_start_versions > 0:
            server._wrong_start_versions -= 1
            start = (start[0], start[1], start[2] + 1)
        frame: dict[str, Any] = {
            "type": "Transition",
            "startVersion": _state_version(start),
            "endVersion": _state_version(end),
            "modifications": modifications,
        }
        if self.client_clock_skew is not None:
            frame["clientClockSkew"] = self.client_clock_skew
            frame["serverTs"] = time.time_ns()
        if await self._send_transition(frame):
            self.version = end

    async def _send_transition(self, frame: dict[str, Any]) -> bool:
        data = msgspec.json.encode(frame)
        size = self.server.transition_chunk_size
        if size is None or len(data) <= size:
            return await self._send_raw([data])
        size = max(1, size)
        text = data.decode("utf-8")
        parts = [text[i : i + size] for i in range(0, len(text), size)]
        transition_id = uuid.uuid4().hex
        return await self._send_raw(
            [
                msgspec.json.encode(
                    {
                        "type": "TransitionChunk",
                        "chunk": part,
                        "partNumber": number,
                        "totalParts": len(parts),
                        "transitionId": transition_id,
                    }
                )
                for number, part in enumerate(parts)
            ]
        )


def _query_modification(query_id: int, outcome: _Outcome) -> dict[str, Any]:
    if outcome.success:
        return {
            "type": "QueryUpdated",
            "queryId": query_id,
            "value": outcome.value,
            "logLines": outcome.log_lines,
            "journal": outcome.journal,
        }
    mod: dict[str, Any] = {
        "type": "QueryFailed",
        "queryId": query_id,
        "errorMessage": outcome.error_message,
        "logLines": outcome.log_lines,
        "journal": outcome.journal,
    }
    if outcome.has_error_data:
        mod["errorData"] = outcome.error_data
    return mod


# --------------------------------------------------------------------------------------
# The server
# --------------------------------------------------------------------------------------


class LocalConvex:
    """A local Convex deployment for tests: the sync protocol and HTTP API over aiohttp.

    Args:
        jwks_url: where to fetch the JWKS that verifies user JWTs (cached; fetched again
            once when a token names an unknown ``kid``).
        jwks: a static JWKS dict instead of (or as well as) ``jwks_url``.
        issuer: the required ``iss`` claim; None accepts any issuer.
        audience: the required ``aud`` claim (Convex's ``applicationID``).
        port: TCP port on 127.0.0.1; 0 picks a free one.
        ping_interval: seconds of silence on a socket before the server sends
            ``{"type":"Ping"}`` (the real server uses 15).

    The constructor does no I/O. Use ``async with LocalConvex(...) as convex:`` or
    ``await convex.start()`` / ``await convex.aclose()`` (both idempotent).

    Observability: :attr:`connections`, :attr:`received_tokens`, :attr:`latest_ts`,
    :attr:`db`. Fault injection: :meth:`drop_connections`, :meth:`close_connections`,
    :meth:`send_fatal_error`, :meth:`send_auth_error`, :meth:`pause`/:meth:`resume`,
    :attr:`transition_chunk_size`, :meth:`wrong_start_version_once`,
    :meth:`invalidate_cursors`, :meth:`hold_handshakes`; per socket,
    :meth:`ConnectionRecord.drop`, :meth:`ConnectionRecord.close`,
    :meth:`ConnectionRecord.send_raw` and :meth:`ConnectionRecord.pause_reading`.
    """

    def __init__(
        self,
        *,
        jwks_url: str | None = None,
        jwks: Mapping[str, Any] | None = None,
        issuer: str | None = None,
        audience: str = "convex",
        port: int = 0,
        ping_interval: float = 15.0,
    ) -> None:
        if ping_interval <= 0:
            raise ValueError("ping_interval must be positive")
        self.ping_interval = ping_interval
        self.issuer = issuer
        self.audience = audience
        self.transition_chunk_size: int | None = None
        """When set, every Transition whose JSON is longer than this many bytes is sent as
        ``TransitionChunk`` parts of at most this many characters (on every sync path)."""
        self.connections: list[ConnectionRecord] = []
        """Every sync connection ever accepted, oldest first."""
        self.received_tokens: list[ReceivedToken] = []
        """Every ``Authenticate{tokenType:"User"}`` received, on any connection, in order."""
        self._port_requested = port
        self._verifier = _JwtVerifier(
            jwks_url=jwks_url, jwks=jwks, issuer=issuer, audience=audience
        )
        self._functions: dict[str, _FunctionSpec] = {}
        self._db = Database(on_commit=self._commit_ts)
        self._latest_ts = time.time_ns()
        self._open: set[_Connection] = set()
        self._mutation_cache: dict[tuple[str, int], dict[str, Any]] = {}
        self._mutation_queue: deque[_MutationJob] = deque()
        self._mutation_signal: _Signal | None = None
        self._worker: asyncio.Task[None] | None = None
        self._notifier: _Notifier | None = None
        self._runner: web.AppRunner | None = None
        self._port: int | None = None
        self._paused = False
        self.response_delay = 0.0
        """Seconds to hold every frame (Transitions, responses, Pings) before sending it:
        a slow network or server. Order is kept. 0 (the default) sends at once."""
        self._closing = False
        self._closed = False
        self._wrong_start_versions = 0
        self._holding_handshakes = False
        self.handshake_attempts = 0
        """How many sync upgrade requests arrived (held ones included)."""

    # -- lifecycle ------------------------------------------------------------------------

    async def __aenter__(self) -> LocalConvex:
        await self.start()
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self.aclose()

    async def start(self) -> None:
        """Bind 127.0.0.1 and start serving. Idempotent; cannot restart after aclose()."""
        if self._runner is not None:
            return
        if self._closed or self._closing:
            raise RuntimeError("this LocalConvex was closed; create a new one")
        self._notifier = _Notifier()
        self._mutation_signal = _Signal()
        app = web.Application()
        app.router.add_get("/api/sync", self._handle_sync)
        app.router.add_get(r"/api/{version:[0-9][^/]*}/sync", self._handle_sync)
        kinds: tuple[FunctionKind, ...] = ("query", "mutation", "action")
        for kind in kinds:
            app.router.add_post(f"/api/{kind}", self._http_handler(kind))
        # A short shutdown timeout: aclose() closes sockets itself before cleanup runs.
        runner = web.AppRunner(app, handle_signals=False, access_log=None, shutdown_timeout=1.0)
        await runner.setup()
        try:
            site = web.TCPSite(runner, "127.0.0.1", self._port_requested)
            await site.start()
        except BaseException:
            await runner.cleanup()
            raise
        self._runner = runner
        address = runner.addresses[0]
        self._port = int(address[1])
        self._worker = asyncio.get_running_loop().create_task(self._mutation_worker())

    async def aclose(self) -> None:
        """Close every socket, stop serving and leave no task behind. Idempotent."""
        if self._closed or self._closing:
            return
        self._closing = True
        try:
            # Stop the mutation worker first so nothing queued (e.g. while paused) runs
            # during shutdown.
            if self._worker is not None:
                self._worker.cancel()
                await asyncio.wait([self._worker])
                self._worker = None
            for job in self._mutation_queue:
                job.done.set()
            self._mutation_queue.clear()
            if self._notifier is not None:
                self._notifier.notify()  # release anything waiting on pause
            connections = list(self._open)
            for conn in connections:
                conn.cancel()
            with anyio.move_on_after(_SHUTDOWN_CLOSE_SECONDS + 1.0):
                for conn in connections:
                    await conn.done.wait()
            if self._runner is not None:
                await self._runner.cleanup()
                self._runner = None
            await self._verifier.aclose()
        finally:
            self._closed = True

    @property
    def url(self) -> str:
        """The deployment URL to give a client: ``http://127.0.0.1:<port>``."""
        if self._port is None:
            raise RuntimeError("LocalConvex is not started")
        return f"http://127.0.0.1:{self._port}"

    @property
    def sync_url(self) -> str:
        """The WebSocket URL of the sync endpoint: ``ws://127.0.0.1:<port>/api/sync``."""
        return self.url.replace("http://", "ws://", 1) + "/api/sync"

    @property
    def port(self) -> int:
        """The bound TCP port."""
        if self._port is None:
            raise RuntimeError("LocalConvex is not started")
        return self._port

    @property
    def latest_ts(self) -> int:
        """The database's latest commit timestamp (u64 nanoseconds)."""
        return self._latest_ts

    @property
    def db(self) -> Database:
        """The shared in-memory tables (seed or inspect data from test code)."""
        return self._db

    @property
    def open_connections(self) -> list[ConnectionRecord]:
        """Records of the sync connections that are still open."""
        return [c for c in self.connections if not c.closed]

    # -- registering functions ------------------------------------------------------------

    def register(self, kind: FunctionKind, name: str, fn: Callable[..., Any]) -> None:
        """Register ``fn(ctx, args) -> value`` (sync or async) as a Convex function.

        ``name`` is canonicalised like the real server (``"messages.js:list"`` ==
        ``"messages:list"``; no ``:`` means ``:default``). Registering a name again
        replaces the previous function.
        """
        if kind not in _KIND_TITLE:
            raise ValueError(f"kind must be 'query', 'mutation' or 'action', not {kind!r}")
        canonical = _canonical_path(name)
        self._functions[canonical] = _FunctionSpec(kind=kind, name=canonical, fn=fn)

    def query(self, name: str) -> Callable[[_QF], _QF]:
        """Decorator: register a query. ``fn(ctx: QueryCtx, args: dict) -> value``."""

        def decorate(fn: _QF) -> _QF:
            self.register("query", name, fn)
            return fn

        return decorate

    def mutation(self, name: str) -> Callable[[_MF], _MF]:
        """Decorator: register a mutation. ``fn(ctx: MutationCtx, args: dict) -> value``."""

        def decorate(fn: _MF) -> _MF:
            self.register("mutation", name, fn)
            return fn

        return decorate

    def action(self, name: str) -> Callable[[_AF], _AF]:
        """Decorator: register an action. ``fn(ctx: ActionCtx, args: dict) -> value``."""

        def decorate(fn: _AF) -> _AF:
            self.register("action", name, fn)
            return fn

        return decorate

    # -- waiting --------------------------------------------------------------------------

    async def wait_for_connections(self, n: int, timeout: float = 5.0) -> ConnectionRecord:  # noqa: ASYNC109
        """Wait until at least ``n`` sync connections have been accepted in total (closed
        ones count) and return the ``n``-th record. Raises ``TimeoutError``."""
        return await self._notifier_required.wait_for(
            lambda: self.connections[n - 1] if len(self.connections) >= n else None, timeout
        )

    async def wait_for_tokens(self, n: int, timeout: float = 5.0) -> ReceivedToken:  # noqa: ASYNC109
        """Wait until ``n`` user tokens have been received in total; return the ``n``-th."""
        return await self._notifier_required.wait_for(
            lambda: self.received_tokens[n - 1] if len(self.received_tokens) >= n else None,
            timeout,
        )

    # -- fault injection ------------------------------------------------------------------

    async def drop_connections(self) -> None:
        """Cut every open socket abruptly (TCP abort, no Close frame, no protocol message)
        and wait until the server has noticed."""
        connections = list(self._open)
        for conn in connections:
            conn.abort()
        await self._wait_closed(connections)

    async def close_connections(
        self, code: int = 1011, reason: str = "InternalServerError"
    ) -> None:
        """Send a Close frame with ``code``/``reason`` on every open socket (as the real
        server does for transient failures; 1011 ``InternalServerError`` by default)."""
        for conn in list(self._open):
            await conn.terminate(None, code=code, reason=reason)

    async def send_fatal_error(self, message: str) -> None:
        """Send ``FatalError{error: message}`` on every open socket, then close it."""
        for conn in list(self._open):
            await conn.terminate({"type": "FatalError", "error": message})

    async def send_auth_error(self, message: str, *, auth_update_attempted: bool = False) -> None:
        """Send ``AuthError`` (``baseVersion`` = each socket's received identity version)
        on every open socket, then close it. The default, ``authUpdateAttempted: false``,
        is what the server sends when the identity's token expires."""
        for conn in list(self._open):
            await conn.terminate(
                {
                    "type": "AuthError",
                    "error": message,
                    "baseVersion": conn.received_identity,
                    "authUpdateAttempted": auth_update_attempted,
                }
            )

    def pause(self) -> None:
        """Stop answering anything (frames are still read and recorded, but not handled;
        no Transitions, responses or Pings go out) until :meth:`resume`."""
        self._paused = True

    def resume(self) -> None:
        """Undo :meth:`pause`: handle what queued up and answer again."""
        self._paused = False
        self._notify()

    @property
    def paused(self) -> bool:
        """Whether :meth:`pause` is in effect."""
        return self._paused

    def invalidate_cursors(self) -> None:
        """Make every pagination cursor and journal issued so far invalid, as happens on
        Convex when a paginated query's underlying database query changes: every live
        query re-runs, and a page that reads from an old cursor (its ``cursor``,
        ``endCursor`` or journal) fails with an ``InvalidCursor`` error. Fresh first
        pages (``cursor: null``, no journal) still work."""
        self._db._cursor_epoch += 1
        for conn in self._open:
            conn.rerun_all()

    def hold_handshakes(self) -> None:
        """Read each new sync upgrade request but hold the answer (no 101) until
        :meth:`release_handshakes`: a server that accepts TCP connections and then hangs,
        for connect timeouts. A request whose client gave up meanwhile is then dropped;
        sockets already open are not affected."""
        self._holding_handshakes = True

    def release_handshakes(self) -> None:
        """Undo :meth:`hold_handshakes`: held requests (still wanted) complete now."""
        self._holding_handshakes = False
        self._notify()

    async def wait_for_handshake_attempts(self, n: int, timeout: float = 5.0) -> None:  # noqa: ASYNC109
        """Wait until at least ``n`` sync upgrade requests arrived in total (held or not)."""
        await self._notifier_required.wait_for(lambda: self.handshake_attempts >= n, timeout)

    def wrong_start_version_once(self) -> None:
        """Make the next Transition sent (on any socket) carry a wrong ``startVersion``
        (its ``ts`` is one more than the version the client is at)."""
        self._wrong_start_versions += 1

    # -- internals: shared state ------------------------------------------------------------

    @property
    def _notifier_required(self) -> _Notifier:
        if self._notifier is None:
            raise RuntimeError("LocalConvex is not started")
        return self._notifier

    def _notify(self) -> None:
        if self._notifier is not None:
            self._notifier.notify()

    async def _wait_unpaused(self) -> None:
        while self._paused and not self._closing:
            await self._notifier_required.wait_for(
                lambda: not self._paused or self._closing, timeout=math.inf
            )

    async def _wait_closed(self, connections: list[_Connection]) -> None:
        with anyio.move_on_after(_CLOSE_GRACE_SECONDS + 1.0):
            for conn in connections:
                await conn.done.wait()

    def _commit_ts(self, written: frozenset[str]) -> int:
        """Advance ``latest_ts`` for a commit and refresh subscriptions that read
        ``written``. Returns the commit's ts."""
        self._latest_ts = max(time.time_ns(), self._latest_ts + 1)
        if written:
            for conn in self._open:
                conn.invalidate(written)
        return self._latest_ts

    # -- internals: running functions -------------------------------------------------------

    async def _run_function(
        self,
        kind: FunctionKind,
        path: str,
        args: dict[str, Any] | _Invalid,
        identity: _Identity | None,
        *,
        journal: str | None = None,
    ) -> _Outcome:
        """Run one function. A mutation commits here, so only the mutation worker may run
        kind "mutation" (that is what makes mutations serial).

        ``journal`` is the sync query's journal (where its paginated read ended last
        time); the outcome carries the journal to send back: the new one for a query that
        paginated, the old one for a query that failed, else None."""
        canonical = _canonical_path(path)
        spec = self._functions.get(canonical)
        if spec is None:
            return _Outcome.failure(
                _UncaughtError(
                    f"Could not find public function for '{canonical}'. Did you forget to "
                    "register it on LocalConvex?"
                ),
                [],
            )
        if spec.kind != kind:
            return _Outcome.failure(
                _UncaughtError(
                    f"Trying to execute {canonical} as {_KIND_TITLE[kind]}, but it is "
                    f"defined as {_KIND_TITLE[spec.kind]}."
                ),
                [],
            )
        if isinstance(args, _Invalid):
            return _Outcome.failure(_UncaughtError(args.message), [])
        auth = Auth(identity.user_identity if identity is not None else None)
        tx: _Transaction | None = None
        ctx: _Ctx
        if kind == "query":
            tx = _Transaction(self._db, journal)
            ctx = QueryCtx(auth, DatabaseReader(tx))
        elif kind == "mutation":
            tx = _Transaction(self._db)
            ctx = MutationCtx(auth, DatabaseWriter(tx))
        else:
            ctx = ActionCtx(self, identity, auth)
        try:
            result = spec.fn(ctx, _copy_value(args))
            if inspect.isawaitable(result):
                result = await result
            encoded = encode_value(result)
        except Exception as exc:
            if not isinstance(exc, ConvexError):
                logger.info("LocalConvex: %s %s raised", kind, canonical, exc_info=True)
            reads = tx.reads if tx is not None else ()
            failed = _Outcome.failure(exc, ctx._log_lines, reads)
            failed.journal = journal
            return failed
        outcome = _Outcome(
            success=True,
            value=encoded,
            log_lines=ctx._log_lines,
            reads=frozenset(tx.reads) if tx is not None else frozenset(),
            journal=tx.journal_out if tx is not None and kind == "query" else None,
        )
        if kind == "mutation":
            assert tx is not None
            outcome.ts = self._commit_ts(self._db._apply(tx))
        return outcome

    def _enqueue_mutation(self, job: _MutationJob) -> None:
        if self._closing:
            job.done.set()  # never runs; _submit_mutation reports the failure
            return
        self._mutation_queue.append(job)
        if self._mutation_signal is not None:
            self._mutation_signal.set()

    async def _submit_mutation(self, job: _MutationJob) -> _Outcome:
        self._enqueue_mutation(job)
        await job.done.wait()
        if job.outcome is None:
            return _Outcome.failure(_UncaughtError("The server stopped before running it"), [])
        return job.outcome

    async def _mutation_worker(self) -> None:
        """Run queued mutations one at a time, in arrival order, across the whole server."""
        assert self._mutation_signal is not None
        while True:
            while not self._mutation_queue:
                await self._mutation_signal.wait()
            job = self._mutation_queue.popleft()
            try:
                await self._wait_unpaused()
                await self._execute_mutation(job)
            except Exception:
                logger.exception("LocalConvex: mutation %s crashed the worker", job.path)
            finally:
                job.done.set()

    async def _execute_mutation(self, job: _MutationJob) -> None:
        conn = job.conn
        if job.dedupe_key is not None and conn is not None:
            cached = self._mutation_cache.get(job.dedupe_key)
            if cached is not None:
                # A re-sent mutation (after a reconnect): answer again, never re-apply.
                conn.queue_response(cached, then_transition=bool(cached.get("success")))
                return
        if conn is not None and job.identity is not None and job.identity.expired():
            conn.request_terminate(conn._expired_frame())
            return
        outcome = await self._run_function("mutation", job.path, job.args, job.identity)
        job.outcome = outcome
        if conn is None or job.request_id is None:
            return
        frame: dict[str, Any] = {
            "type": "MutationResponse",
            "requestId": job.request_id,
            "success": outcome.success,
            "result": outcome.value if outcome.success else outcome.error_message,
            "logLines": outcome.log_lines,
        }
        if outcome.success:
            assert outcome.ts is not None
            frame["ts"] = encode_ts(outcome.ts)
        elif outcome.has_error_data:
            frame["errorData"] = outcome.error_data
        if job.dedupe_key is not None:
            self._mutation_cache[job.dedupe_key] = frame
        conn.queue_response(frame, then_transition=outcome.success)

    # -- internals: handlers ----------------------------------------------------------------

    async def _handle_sync(self, request: web.Request) -> web.StreamResponse:
        if self._closing:
            raise web.HTTPServiceUnavailable()
        self.handshake_attempts += 1
        self._notify()
        if self._holding_handshakes:
            await self._notifier_required.wait_for(
                lambda: not self._holding_handshakes or self._closing, timeout=math.inf
            )
            transport = request.transport
            if self._closing or transport is None or transport.is_closing():
                raise web.HTTPServiceUnavailable()  # the client has given up, or we close
        # No message-size cap: Transitions can be large. autoclose=False so that we can
        # finish a close handshake we started with a status-less Close frame ourselves.
        ws = web.WebSocketResponse(autoclose=False, max_msg_size=0)
        await ws.prepare(request)
        conn = _Connection(self, ws, request)
        self._open.add(conn)
        self.connections.append(conn.record)
        self._notify()
        try:
            await conn.run()
        finally:
            self._open.discard(conn)
            conn.record.closed = True
            conn.done.set()
            self._notify()
        return ws

    def _http_handler(
        self, kind: FunctionKind
    ) -> Callable[[web.Request], Awaitable[web.StreamResponse]]:
        async def handler(request: web.Request) -> web.StreamResponse:
            return await self._handle_http(request, kind)

        return handler

    async def _handle_http(self, request: web.Request, kind: FunctionKind) -> web.StreamResponse:
        await self._wait_unpaused()
        if self._closing:
            return _json_response(
                {"code": "ServiceUnavailable", "message": "LocalConvex is shutting down"},
                status=503,
            )
        try:
            body = msgspec.json.decode(await request.read())
        except msgspec.DecodeError as exc:
            return _json_response({"code": "BadJsonBody", "message": str(exc)}, status=400)
        if not isinstance(body, dict) or not isinstance(body.get("path"), str):
            return _json_response(
                {"code": "BadRequest", "message": "Body must be an object with a 'path'"},
                status=400,
            )
        fmt = body.get("format")
        if fmt in (None, "convex_encoded_json", "convex_json"):
            clean = False
        elif fmt in ("json", "convex_clean_json"):
            clean = True
        else:
            return _json_response(
                {
                    "code": "BadFormat",
                    "message": f"format param must be one of [`json`]. Got {fmt}",
                },
                status=400,
            )
        identity: _Identity | None = None
        authorization = request.headers.get("Authorization")
        if authorization:
            scheme, _, credential = authorization.partition(" ")
            if scheme.lower() != "bearer" or not credential.strip():
                return _json_response(
                    {
                        "code": "Unauthenticated",
                        "message": "LocalConvex only accepts 'Authorization: Bearer <jwt>'",
                    },
                    status=401,
                )
            try:
                identity = _Identity.from_claims(await self._verifier.verify(credential.strip()))
            except _AuthFailure as exc:
                return _json_response({"code": "Unauthenticated", "message": str(exc)}, status=401)
        args = _parse_args(body.get("args"))
        path: str = body["path"]
        if kind == "mutation":
            outcome = await self._submit_mutation(
                _MutationJob(path=path, args=args, identity=identity)
            )
        else:
            outcome = await self._run_function(kind, path, args, identity)
        payload: dict[str, Any]
        if outcome.success:
            value = _clean_export(decode_value(outcome.value)) if clean else outcome.value
            payload = {"status": "success", "value": value}
        else:
            payload = {"status": "error", "errorMessage": outcome.error_message}
            if outcome.has_error_data:
                data = outcome.error_data
                payload["errorData"] = _clean_export(decode_value(data)) if clean else data
        if outcome.log_lines:
            payload["logLines"] = outcome.log_lines
        # convex-backend answers function errors with HTTP 200 and status "error"
        # (public_api.rs returns Ok(Json(UdfResponse::Error{..}))); clients also accept 560.
        return _json_response(payload, status=200)


def _json_response(payload: Any, *, status: int) -> web.Response:
    return web.Response(
        body=msgspec.json.encode(payload), status=status, content_type="application/json"
    )
