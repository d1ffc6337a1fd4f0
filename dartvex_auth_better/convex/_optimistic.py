"""Optimistic updates: local guesses shown until the server's answer lands.

A mutation may carry an update function ``update(store)`` that edits the local view of
queries. Each such function becomes a layer. The view is rebuilt from the server's results
whenever they change, then the layers still pending are replayed in order, so a guess
always sits on top of the freshest server data. A layer is dropped in the same pass that
applies the Transition making its mutation's write visible, so nothing flickers; it is
dropped at once when the mutation fails.

Update functions must be pure and synchronous (they are replayed); they receive fresh
copies of values, so mutating what they read does no harm.
"""

from __future__ import annotations

import copy
from collections.abc import Callable, Mapping
from typing import Any

from ._query_set import LocalQuery, QueryResult, QuerySet, canonical_udf_path, query_token
from ._values import decode_value, encode_args

__all__ = ["OptimisticLayers", "OptimisticLocalStore", "OptimisticUpdate"]

_LOADING = object()


class _Entry:
    __slots__ = ("args", "udf_path", "value")

    def __init__(self, udf_path: str, args: list[Any], value: Any) -> None:
        self.udf_path = udf_path
        self.args = args  # encoded, as on the wire
        self.value = value  # a Python value, or _LOADING


class OptimisticLocalStore:
    """The view an optimistic update edits. Reads see earlier layers' edits."""

    def __init__(self, query_set: QuerySet, overlay: dict[bytes, _Entry]) -> None:
        self._query_set = query_set
        self._overlay = overlay

    def get_query(self, name: str, args: Mapping[str, Any] | None = None) -> Any:
        """The query's current value, or None when it is loading, failed or unknown."""
        udf_path = canonical_udf_path(name)
        return self._read(query_token(udf_path, encode_args(args)))

    def get_all_queries(self, name: str) -> list[tuple[dict[str, Any], Any]]:
        """Every known instance of a query as ``(args, value)`` pairs (value None when
        loading or failed)."""
        udf_path = canonical_udf_path(name)
        found: dict[bytes, list[Any]] = {}
        for query in self._query_set:
            if query.udf_path == udf_path:
                found[query.token] = query.args
        for token, entry in self._overlay.items():
            if entry.udf_path == udf_path:
                found.setdefault(token, entry.args)
        return [(decode_value(args[0]), self._read(token)) for token, args in found.items()]

    def set_query(self, name: str, args: Mapping[str, Any] | None, value: Any) -> None:
        """Show ``value`` for the query (None means Convex null)."""
        udf_path = canonical_udf_path(name)
        encoded = encode_args(args)
        self._overlay[query_token(udf_path, encoded)] = _Entry(udf_path, encoded, value)

    def clear_query(self, name: str, args: Mapping[str, Any] | None = None) -> None:
        """Show the query as loading until the server answers."""
        udf_path = canonical_udf_path(name)
        encoded = encode_args(args)
        self._overlay[query_token(udf_path, encoded)] = _Entry(udf_path, encoded, _LOADING)

    def _read(self, token: bytes) -> Any:
        entry = self._overlay.get(token)
        if entry is not None:
            return None if entry.value is _LOADING else _fresh(entry.value)
        query = self._query_set.by_token(token)
        if query is None or query.server is None:
            return None
        return query.server.value_or_none()


OptimisticUpdate = Callable[[OptimisticLocalStore], None]


def _fresh(value: Any) -> Any:
    return copy.deepcopy(value)


class OptimisticLayers:
    """The pending optimistic layers and the overlay they produce."""

    def __init__(self, query_set: QuerySet) -> None:
        self._query_set = query_set
        self._layers: list[tuple[int, OptimisticUpdate]] = []
        self._overlay: dict[bytes, _Entry] = {}

    def __len__(self) -> int:
        return len(self._layers)

    def add(self, request_id: int, update: OptimisticUpdate) -> set[bytes]:
        """Apply a new layer on top; returns the tokens it changed.

        If the update raises, nothing changes and the exception propagates, so the
        mutation is never sent.
        """
        trial = dict(self._overlay)
        update(OptimisticLocalStore(self._query_set, trial))
        changed = _changed(self._overlay, trial)
        self._overlay = trial
        self._layers.append((request_id, update))
        self._push(changed)
        return changed

    def rebuild(self, drop: set[int]) -> set[bytes]:
        """Drop the given requests' layers, then replay the rest over fresh server data.

        A layer whose replay raises is dropped silently: it was valid once, and the
        server's data has moved on.
        """
        if not self._layers and not self._overlay:
            return set()
        if drop:
            self._layers = [(rid, fn) for rid, fn in self._layers if rid not in drop]
        rebuilt: dict[bytes, _Entry] = {}
        kept: list[tuple[int, OptimisticUpdate]] = []
        for rid, fn in self._layers:
            trial = dict(rebuilt)
            try:
                fn(OptimisticLocalStore(self._query_set, trial))
            except Exception:
                continue
            rebuilt = trial
            kept.append((rid, fn))
        self._layers = kept
        changed = _changed(self._overlay, rebuilt)
        self._overlay = rebuilt
        self._push(changed)
        return changed

    def _push(self, changed: set[bytes]) -> None:
        """Copy the overlay onto the live queries it touches."""
        for token in changed:
            query = self._query_set.by_token(token)
            if query is not None:
                self.refresh(query)

    def refresh(self, query: LocalQuery) -> None:
        entry = self._overlay.get(query.token)
        if entry is None:
            query.optimistic = None
            query.optimistic_loading = False
        elif entry.value is _LOADING:
            query.optimistic = None
            query.optimistic_loading = True
        else:
            query.optimistic = QueryResult(value=entry.value)
            query.optimistic_loading = False


def _changed(old: dict[bytes, _Entry], new: dict[bytes, _Entry]) -> set[bytes]:
    changed: set[bytes] = set()
    for token in old.keys() | new.keys():
        a, b = old.get(token), new.get(token)
        if a is None or b is None or (a.value is not b.value and a.value != b.value):
            changed.add(token)
    return changed
