"""Paginated queries: a live list assembled from page subscriptions."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from ._sync import SyncCore

__all__ = ["PaginatedQuery"]


class PaginatedQuery:
    """Placeholder; being implemented."""

    def __init__(
        self, core: SyncCore, udf_path: str, args: Mapping[str, Any] | None, *, page_size: int
    ) -> None:
        raise NotImplementedError
