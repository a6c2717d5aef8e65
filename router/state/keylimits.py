"""Client keys' rpm/tpm shared by every replica, with the leases providers' limits use
(docs/scaling.md): each replica spends a lease of the limit (`state.lease` of it, at least 1)
locally and asks Redis for the next one when it runs out; Redis grants from a sliding minute of
grants, never more than the limit. One round trip per lease, none per request in between.

While Redis is down (or slow), each replica keeps to its own windows (the per-replica limit).
"""

from __future__ import annotations

import itertools
import logging
import uuid
from typing import TYPE_CHECKING, Any

import trio

if TYPE_CHECKING:
    import coredis

log = logging.getLogger("cascade.state")

WINDOW = 60.0  # rpm/tpm are per minute


class SharedKeyLimits:
    """`client` is the state backend's live client (None while Redis is down)."""

    def __init__(self, prefix: str, timeout: float, lease: float, script: str) -> None:
        self.prefix = prefix
        self.timeout = timeout
        self.lease = lease  # a lease is this fraction of the limit (at least 1)
        self.client: coredis.Redis[bytes] | None = None
        self._script_text = script
        self._script: Any = None
        self._script_client: Any = None
        self._balance: dict[tuple[str, str], float] = {}  # (key, kind) -> what is left here
        self._origin = uuid.uuid4().hex[:12]
        self._serial = itertools.count()
        self._lock = trio.Lock()

    @property
    def up(self) -> bool:
        return self.client is not None

    async def take(self, key: str, kind: str, limit: float, amount: float) -> float | None:
        """Spend `amount` of `key`'s `kind` limit; None when it fits, else the seconds until
        the shared minute has room. A lease is asked for when this replica's balance is short
        (one request at a time asks; the others wait for its answer)."""
        slot = (key, kind)
        if self._balance.get(slot, 0.0) >= amount:
            self._balance[slot] -= amount
            return None
        async with self._lock:
            if self._balance.get(slot, 0.0) >= amount:  # another request's lease covered it
                self._balance[slot] -= amount
                return None
            want = max(1.0, limit * self.lease, amount)
            grant, retry = await self._lease(key, kind, limit, want)
            self._balance[slot] = self._balance.get(slot, 0.0) + grant
            if self._balance[slot] >= amount:
                self._balance[slot] -= amount
                return None
            return max(retry, 0.001)

    async def _lease(self, key: str, kind: str, limit: float, want: float) -> tuple[float, float]:
        client = self.client
        assert client is not None
        if self._script is None or self._script_client is not client:  # a new connection
            self._script, self._script_client = client.register_script(self._script_text), client
        member = f"{self._origin}:{next(self._serial)}"
        with trio.fail_after(self.timeout):
            granted, retry = await self._script(
                keys=[f"{self.prefix}keylease:{key}:{kind}"], args=[limit, want, WINDOW, member]
            )
        return float(granted), float(retry)
