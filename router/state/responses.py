"""Stored responses (the Responses API's `store`, `previous_response_id`, `GET /v1/responses/{id}`):
in this process, bounded in count, bytes and age; the oldest go first.

A stored response keeps what continuing its conversation needs: the input items it was served
with (those of the responses before it included) and its output items, and the `response` object
itself for `GET`. `instructions` are not carried over to a continuation, as OpenAI documents.
"""

from __future__ import annotations

import json
import time
from collections import OrderedDict
from collections.abc import Callable
from typing import Any

import attrs


@attrs.frozen
class Stored:
    response: dict[str, Any]
    input_items: list[dict[str, Any]]
    owner: str | None  # the client key that made it (None: keys are off)
    size: int  # bytes, as counted against the store's bound
    expires: float  # wall-clock time

    @property
    def history(self) -> list[dict[str, Any]]:
        """The conversation a continuation starts from: the input, then the output."""
        return [*self.input_items, *self.response.get("output", [])]


class ResponseStore:
    """Bounded by `max_count` responses, `max_bytes` of JSON and `ttl` seconds each."""

    def __init__(
        self,
        max_count: int = 10_000,
        max_bytes: int = 256 << 20,
        ttl: float = 24 * 3600.0,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self.max_count = max_count
        self.max_bytes = max_bytes
        self.ttl = ttl
        self._clock = clock
        self._items: OrderedDict[str, Stored] = OrderedDict()
        self._bytes = 0

    def __len__(self) -> int:
        return len(self._items)

    @property
    def bytes(self) -> int:
        return self._bytes

    def put(
        self,
        response: dict[str, Any],
        input_items: list[dict[str, Any]],
        owner: str | None = None,
    ) -> None:
        size = len(json.dumps(response)) + len(json.dumps(input_items))
        if size > self.max_bytes:
            return  # larger than the whole store: never kept
        self.delete(response["id"])
        self._items[response["id"]] = Stored(
            response, input_items, owner, size, self._clock() + self.ttl
        )
        self._bytes += size
        while len(self._items) > self.max_count or self._bytes > self.max_bytes:
            self._drop_oldest()

    def get(self, response_id: str) -> Stored | None:
        stored = self._items.get(response_id)
        if stored is None:
            return None
        if stored.expires <= self._clock():
            self.delete(response_id)
            return None
        return stored

    def delete(self, response_id: str) -> bool:
        stored = self._items.pop(response_id, None)
        if stored is None:
            return False
        self._bytes -= stored.size
        return True

    def _drop_oldest(self) -> None:
        _, stored = self._items.popitem(last=False)
        self._bytes -= stored.size
