"""The client's set of live queries: ids, subscribers, versions and the server's results.

Identical subscriptions (same canonical function path, same encoded arguments) share one
server query and one query id. Query ids are never reused. Everything here is plain,
synchronous bookkeeping; the sync core decides what to send.
"""

from __future__ import annotations

import copy
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

import msgspec

from .._errors import ConvexError
from .._signal import Waker
from ._protocol import (
    AddQuery,
    ModifyQuerySet,
    QueryFailed,
    QueryRemoved,
    QueryUpdated,
    RemoveQuery,
)
from ._values import decode_json, decode_raw_or_none

__all__ = ["LocalQuery", "QueryResult", "QuerySet", "canonical_udf_path", "query_token"]

_args_encoder = msgspec.json.Encoder()
_UNSET = msgspec.UNSET


_canonical: dict[str, str] = {}  # names already canonicalised (apps use a few, over and over)
_CANONICAL_LIMIT = 4096


def canonical_udf_path(name: str) -> str:
    """``"messages.js:list"`` and ``"messages:list"`` name the same function."""
    if type(name) is str:
        known = _canonical.get(name)
        if known is not None:
            return known
    if not isinstance(name, str) or not name:
        raise ValueError("function name must be a non-empty string such as 'messages:list'")
    module, sep, export = name.rpartition(":")
    if not sep:
        module, export = name, "default"
    if module.endswith(".js"):
        module = module[:-3]
    if not module or not export:
        raise ValueError(f"invalid function name {name!r}; expected 'module:function'")
    if not name.isascii():
        try:
            name.encode("utf-8")
        except UnicodeEncodeError:
            raise ValueError(
                "invalid function name: it contains a lone surrogate, which is not valid "
                "Unicode text"
            ) from None
    canonical = f"{module}:{export}"
    if type(name) is str:
        if len(_canonical) >= _CANONICAL_LIMIT:
            _canonical.clear()
        _canonical[name] = canonical
    return canonical


def query_token(udf_path: str, encoded_args: list[Any]) -> bytes:
    """The identity of a query: its canonical path and its encoded (key-sorted) args.

    Raises ValueError when they cannot be JSON text (``encode_value`` and
    ``canonical_udf_path`` checked them already: a second line of defence, before the
    query is registered)."""
    try:
        return _args_encoder.encode([udf_path, encoded_args])
    except UnicodeEncodeError:
        raise ValueError(
            "a string contains a lone surrogate, which is not valid Unicode text"
        ) from None
    except RecursionError:
        raise ValueError("the query's arguments are nested too deeply to encode") from None


class QueryResult(msgspec.Struct):
    """One answer for a query: a value (raw from the server, or a Python value from an
    optimistic update) or an error.

    A msgspec Struct rather than a dataclass: one is made per server update, and a
    Struct's constructor runs in C (about 90 ns less per Transition)."""

    raw: msgspec.Raw | None = None
    value: Any = None
    error: ConvexError | None = None
    log_lines: list[str] = msgspec.field(default_factory=list)

    def unwrap(self) -> Any:
        """A fresh copy of the value, or raise the query's error."""
        if self.error is not None:
            raise self.error
        if self.raw is not None:
            return decode_json(self.raw)
        return copy.deepcopy(self.value)

    def value_or_none(self) -> Any:
        """The value, or None for an error (what an optimistic update reads)."""
        if self.error is not None:
            return None
        return self.unwrap()


@dataclass(slots=True, eq=False)
class LocalQuery:
    """One server query and everyone subscribed to it."""

    query_id: int
    udf_path: str
    args: list[Any]
    token: bytes
    journal: str | None = None
    server: QueryResult | None = None
    # Set by optimistic updates: a value (QueryResult) shown instead of the server's, or
    # LOADING while an update has cleared the query.
    optimistic: QueryResult | None = None
    optimistic_loading: bool = False
    # Bumped whenever what subscribers see changes, so each can tell what it has seen.
    version: int = 0
    # Bumped only on server results: one-shot query() waits for the server, not overlays.
    server_version: int = 0
    subscribers: set[Waker] = field(default_factory=set)

    @property
    def effective(self) -> QueryResult | None:
        """What subscribers see: the optimistic view when there is one, else the server's.
        None while loading."""
        if self.optimistic_loading:
            return None
        if self.optimistic is not None:
            return self.optimistic
        return self.server

    @property
    def has_pending_writes(self) -> bool:
        return self.optimistic is not None or self.optimistic_loading

    def add_modification(self) -> AddQuery:
        return AddQuery(
            query_id=self.query_id, udf_path=self.udf_path, args=self.args, journal=self.journal
        )

    def notify(self) -> None:
        self.version += 1
        for waker in self.subscribers:
            waker.set()


class QuerySet:
    """Local query bookkeeping plus the per-socket query-set version."""

    def __init__(self) -> None:
        self._by_token: dict[bytes, LocalQuery] = {}
        self._by_id: dict[int, LocalQuery] = {}
        self._next_query_id = 0
        self.version = 0
        # Query ids re-added on the current socket that have not had an answer yet.
        self._awaiting_first_answer: set[int] = set()

    def __len__(self) -> int:
        return len(self._by_id)

    def __iter__(self) -> Iterator[LocalQuery]:
        return iter(list(self._by_id.values()))

    def get(self, query_id: int) -> LocalQuery | None:
        return self._by_id.get(query_id)

    def by_token(self, token: bytes) -> LocalQuery | None:
        return self._by_token.get(token)

    def subscribe(
        self, udf_path: str, encoded_args: list[Any], waker: Waker
    ) -> tuple[LocalQuery, AddQuery | None]:
        """Register a subscriber; returns the query and the Add to send when it is new."""
        token = query_token(udf_path, encoded_args)
        query = self._by_token.get(token)
        if query is not None:
            query.subscribers.add(waker)
            return query, None
        query = LocalQuery(self._next_query_id, udf_path, encoded_args, token)
        self._next_query_id += 1
        query.subscribers.add(waker)
        self._by_token[token] = query
        self._by_id[query.query_id] = query
        return query, query.add_modification()

    def unsubscribe(self, query: LocalQuery, waker: Waker) -> RemoveQuery | None:
        """Drop a subscriber; returns the Remove to send when it was the last one."""
        query.subscribers.discard(waker)
        if query.subscribers or self._by_id.get(query.query_id) is not query:
            return None
        del self._by_id[query.query_id]
        del self._by_token[query.token]
        self._awaiting_first_answer.discard(query.query_id)
        return RemoveQuery(query_id=query.query_id)

    def modify(self, modifications: list[AddQuery | RemoveQuery]) -> ModifyQuerySet:
        """Wrap modifications in the next ModifyQuerySet for the current socket."""
        # The version is taken before anything is built: code that runs meanwhile (a
        # finalizer) gets the next one, never the same.
        base = self.version
        self.version = base + 1
        return ModifyQuerySet(base_version=base, new_version=base + 1, modifications=modifications)

    def restart(self) -> ModifyQuerySet:
        """The first ModifyQuerySet on a new socket: version 0 -> 1, every live query.

        Sent even when empty: the server answers it with a Transition, which tells the
        client the socket is in sync.
        """
        self.version = 0
        self._awaiting_first_answer = set(self._by_id)
        return self.modify([q.add_modification() for q in self._by_id.values()])

    def apply(self, modification: QueryUpdated | QueryFailed) -> LocalQuery | None:
        """Store a server result; returns the query (None when it was already removed)."""
        query = self._by_id.get(modification.query_id)
        if query is None:
            # The server had not processed our Remove yet.
            return None
        if self._awaiting_first_answer:
            self._awaiting_first_answer.discard(query.query_id)
        if isinstance(modification, QueryUpdated):
            query.server = QueryResult(modification.value, None, None, modification.log_lines)
        else:
            error = ConvexError(
                modification.error_message,
                data=decode_raw_or_none(modification.error_data),
                log_lines=modification.log_lines,
            )
            query.server = QueryResult(error=error, log_lines=modification.log_lines)
        # An absent journal keeps the last one; an explicit null clears it.
        journal = modification.journal
        if journal is not _UNSET:
            query.journal = journal
        query.server_version += 1
        return query

    def apply_value(self, modification: QueryUpdated) -> LocalQuery | None:
        """``apply`` for a QueryUpdated without log lines: what a busy subscription gets
        in every frame, so it is kept to the few steps it needs."""
        query = self._by_id.get(modification.query_id)
        if query is None:
            return None  # the server had not processed our Remove yet
        if self._awaiting_first_answer:
            self._awaiting_first_answer.discard(modification.query_id)
        query.server = QueryResult(modification.value, None, None, modification.log_lines)
        journal = modification.journal
        if journal is not _UNSET:
            query.journal = journal
        query.server_version += 1
        return query

    def apply_transition(
        self,
        modifications: list[QueryUpdated | QueryFailed | QueryRemoved],
        on_log_lines: Callable[[LocalQuery, QueryResult | None, QueryUpdated | QueryFailed], None],
    ) -> list[LocalQuery]:
        """Apply a Transition's modifications in order; returns the queries that changed.

        ``on_log_lines(query, previous_result, modification)`` is called for a result
        that carries log lines."""
        changed: list[LocalQuery] = []
        by_id = self._by_id
        for modification in modifications:
            if type(modification) is QueryUpdated and not modification.log_lines:
                found = self.apply_value(modification)
            elif isinstance(modification, QueryRemoved):
                found = self.removed_by_server(modification.query_id)
            elif modification.log_lines:
                before = by_id.get(modification.query_id)
                previous = before.server if before is not None else None
                found = self.apply(modification)
                if found is not None:
                    on_log_lines(found, previous, modification)
            else:
                found = self.apply(modification)
            if found is not None:
                changed.append(found)
        return changed

    def removed_by_server(self, query_id: int) -> LocalQuery | None:
        """The server dropped a query we still hold: show it as an error to subscribers."""
        query = self._by_id.get(query_id)
        if query is None:
            return None
        self._awaiting_first_answer.discard(query_id)
        query.server = QueryResult(error=ConvexError("the server removed this query"))
        query.server_version += 1
        return query

    def answered_since_restart(self, query_id: int) -> bool:
        return query_id in self._by_id and query_id not in self._awaiting_first_answer

    def synced(self) -> bool:
        """True once every query re-added on this socket has had an answer."""
        return not self._awaiting_first_answer
