"""The client's set of live queries: ids, subscribers, versions and the server's results.

Identical subscriptions (same canonical function path, same encoded arguments) share one
server query and one query id. Query ids are never reused. Everything here is plain,
synchronous bookkeeping; the client decides what to send.
"""

from __future__ import annotations

import asyncio
from dataclasses import dataclass, field
from typing import Any

import msgspec

from .._errors import ConvexError
from ._protocol import AddQuery, ModifyQuerySet, QueryFailed, QueryUpdated, RemoveQuery
from ._values import decode_raw_or_none, decode_value

__all__ = ["LocalQuery", "QueryResult", "QuerySet", "canonical_udf_path"]

_args_encoder = msgspec.json.Encoder()


def canonical_udf_path(name: str) -> str:
    """``"messages.js:list"`` and ``"messages:list"`` name the same function."""
    if not isinstance(name, str) or not name:
        raise ValueError("function name must be a non-empty string such as 'messages:list'")
    module, sep, export = name.partition(":")
    if not sep:
        export = "default"
    if module.endswith(".js"):
        module = module[:-3]
    return f"{module}:{export}"


@dataclass(slots=True)
class QueryResult:
    """The server's latest answer for one query: a value, or an error."""

    value: msgspec.Raw | None
    error: ConvexError | None
    log_lines: list[str]

    def unwrap(self) -> Any:
        """The decoded value, or raise the query's error."""
        if self.error is not None:
            raise self.error
        assert self.value is not None
        return decode_value(msgspec.json.decode(self.value))


@dataclass(slots=True, eq=False)
class LocalQuery:
    """One server query and everyone subscribed to it."""

    query_id: int
    udf_path: str
    args: list[Any]
    token: bytes
    journal: str | None = None
    result: QueryResult | None = None
    # Bumped on every new result, so subscribers can tell what they have already seen.
    result_version: int = 0
    subscribers: set[asyncio.Event] = field(default_factory=set)

    def add_modification(self) -> AddQuery:
        return AddQuery(
            query_id=self.query_id, udf_path=self.udf_path, args=self.args, journal=self.journal
        )


class QuerySet:
    """Local query bookkeeping plus the per-socket query-set version."""

    def __init__(self) -> None:
        self._by_token: dict[bytes, LocalQuery] = {}
        self._by_id: dict[int, LocalQuery] = {}
        self._next_query_id = 0
        self.version = 0

    def __len__(self) -> int:
        return len(self._by_id)

    def get(self, query_id: int) -> LocalQuery | None:
        return self._by_id.get(query_id)

    def queries(self) -> list[LocalQuery]:
        return list(self._by_id.values())

    def subscribe(
        self, udf_path: str, encoded_args: list[Any], waker: asyncio.Event
    ) -> tuple[LocalQuery, AddQuery | None]:
        """Register a subscriber; returns the query and the Add to send when it is new."""
        token = _args_encoder.encode([udf_path, encoded_args])
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

    def unsubscribe(self, query: LocalQuery, waker: asyncio.Event) -> RemoveQuery | None:
        """Drop a subscriber; returns the Remove to send when it was the last one."""
        query.subscribers.discard(waker)
        if query.subscribers or self._by_id.get(query.query_id) is not query:
            return None
        del self._by_id[query.query_id]
        del self._by_token[query.token]
        return RemoveQuery(query_id=query.query_id)

    def modify(self, modifications: list[AddQuery | RemoveQuery]) -> ModifyQuerySet:
        """Wrap modifications in the next ModifyQuerySet for the current socket."""
        msg = ModifyQuerySet(
            base_version=self.version, new_version=self.version + 1, modifications=modifications
        )
        self.version += 1
        return msg

    def restart(self) -> ModifyQuerySet:
        """The first ModifyQuerySet on a new socket: version 0 -> 1, every live query."""
        self.version = 0
        return self.modify([q.add_modification() for q in self._by_id.values()])

    def apply(self, modification: QueryUpdated | QueryFailed) -> LocalQuery | None:
        """Store a server result; returns the query to notify (None when already removed)."""
        query = self._by_id.get(modification.query_id)
        if query is None:
            # The server had not processed our Remove yet.
            return None
        if isinstance(modification, QueryUpdated):
            query.result = QueryResult(modification.value, None, modification.log_lines)
        else:
            data = decode_raw_or_none(modification.error_data)
            error = ConvexError(
                modification.error_message, data=data, log_lines=modification.log_lines
            )
            query.result = QueryResult(None, error, modification.log_lines)
        query.journal = modification.journal
        query.result_version += 1
        for waker in query.subscribers:
            waker.set()
        return query

    def has_all_results(self) -> bool:
        return all(q.result is not None for q in self._by_id.values())
