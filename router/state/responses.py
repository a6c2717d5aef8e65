"""Stored responses (the Responses API's `store`, `previous_response_id`, `GET /v1/responses/{id}`):
in this process (`ResponseStore`: bounded in count, bytes and age; the oldest go first), or in
Redis with `state.backend: redis` (`RedisResponses`: every worker and replica sees them, each
kept for the TTL), so a conversation started on one replica continues on another.

A stored response keeps what continuing its conversation needs: the input items it was served
with (those of the responses before it included) and its output items, and the `response` object
itself for `GET`. `instructions` are not carried over to a continuation, as OpenAI documents.
"""

from __future__ import annotations

import json
import logging
import time
from collections import OrderedDict
from collections.abc import Callable
from typing import TYPE_CHECKING, Any, Protocol

import attrs
import trio

if TYPE_CHECKING:
    import coredis

log = logging.getLogger("cascade.state")


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


class Responses(Protocol):
    """Where stored responses live. `save` completes before the client sees the response end,
    so a continuation sent the moment it arrives finds it."""

    async def load(self, response_id: str) -> Stored | None: ...

    async def save(
        self, response: dict[str, Any], input_items: list[dict[str, Any]], owner: str | None
    ) -> None: ...

    async def remove(self, response_id: str) -> bool: ...


class ResponseStore:
    """In this process: bounded by `max_count` responses, `max_bytes` of JSON and `ttl` seconds
    each."""

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

    # --- Responses ----------------------------------------------------------------------------

    async def load(self, response_id: str) -> Stored | None:
        return self.get(response_id)

    async def save(
        self, response: dict[str, Any], input_items: list[dict[str, Any]], owner: str | None
    ) -> None:
        self.put(response, input_items, owner)

    async def remove(self, response_id: str) -> bool:
        return self.delete(response_id)


class RedisResponses:
    """In Redis, one key per response (`{prefix}response:{id}`), expiring after `ttl`. `client`
    is the state backend's live client, None while Redis is down: then this process's own store
    serves (what it stores meanwhile is seen by this process only)."""

    def __init__(self, prefix: str, timeout: float, local: ResponseStore) -> None:
        self.prefix = prefix
        self.timeout = timeout
        self.local = local
        self.client: coredis.Redis[bytes] | None = None

    def _key(self, response_id: str) -> str:
        return f"{self.prefix}response:{response_id}"

    async def load(self, response_id: str) -> Stored | None:
        client = self.client
        if client is not None:
            try:
                with trio.fail_after(self.timeout):
                    raw = await client.get(self._key(response_id))
            except Exception as exc:  # down: this process's own view
                log.warning("stored responses: Redis read failed (%s)", type(exc).__name__)
            else:
                if raw is not None:
                    data = json.loads(raw)
                    return Stored(data["response"], data["input_items"], data["owner"],
                                  len(raw), float("inf"))  # fmt: skip
        return self.local.get(response_id)

    async def save(
        self, response: dict[str, Any], input_items: list[dict[str, Any]], owner: str | None
    ) -> None:
        client = self.client
        if client is not None:
            raw = json.dumps({"response": response, "input_items": input_items, "owner": owner})
            if len(raw) > self.local.max_bytes:
                return  # larger than the store's bound: never kept
            try:
                with trio.fail_after(self.timeout):
                    await client.set(self._key(response["id"]), raw, ex=int(self.local.ttl))
                return
            except Exception as exc:
                log.warning("stored responses: Redis write failed (%s)", type(exc).__name__)
        self.local.put(response, input_items, owner)

    async def remove(self, response_id: str) -> bool:
        removed = self.local.delete(response_id)
        client = self.client
        if client is not None:
            with trio.fail_after(self.timeout):
                removed = bool(await client.delete([self._key(response_id)])) or removed
        return removed
