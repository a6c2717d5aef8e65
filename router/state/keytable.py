"""Client keys made or revoked through the admin API, shared by every worker and replica through
Redis: a hash of their settings (`{prefix}keys`: the key's SHA-256, never the key) and a channel
(`{prefix}keys:changed`) that tells the others at once. A replica loads the table when it
connects (keys made while it was away), and applies each change as it is announced.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Awaitable, Callable
from typing import TYPE_CHECKING, Any

import trio

if TYPE_CHECKING:
    import coredis

log = logging.getLogger("cascade.state")

# (name, settings or None for a revocation) -> applied to this process's keys
Apply = Callable[[str, dict[str, Any] | None], Awaitable[None]]


class SharedKeys:
    """`client` is the state backend's live client (None while Redis is down); `apply` is set by
    the server, once it has a gateway to apply changes to.

    A change made here while Redis is down is kept and shared when it is back; a key revoked
    elsewhere while this process was away (it knew the key from the table, the table no longer
    has it) is revoked here when it reconnects."""

    def __init__(self, prefix: str, timeout: float) -> None:
        self.table = prefix + "keys"
        self.channel = prefix + "keys:changed"
        self.timeout = timeout
        self.client: coredis.Redis[bytes] | None = None
        self.apply: Apply | None = None
        self._known: set[str] = set()  # names this process knows the table holds
        self._pending: dict[str, dict[str, Any] | None] = {}  # made here while Redis was down

    async def publish(self, name: str, settings: dict[str, Any] | None) -> bool:
        """Store (or remove) a key and announce it; False when Redis is down (the change is
        kept, and shared once Redis is back)."""
        client = self.client
        if client is not None:
            try:
                await self._write(client, name, settings)
                return True
            except Exception as exc:
                log.warning("client keys: could not share %s through Redis (%s)", name, exc)
        self._pending[name] = settings
        return False

    async def _write(
        self, client: coredis.Redis[bytes], name: str, settings: dict[str, Any] | None
    ) -> None:
        with trio.fail_after(self.timeout):
            if settings is not None:
                await client.hset(self.table, {name: json.dumps(settings)})
            else:
                await client.hdel(self.table, [name])
            await client.publish(self.channel, name)
        self._pending.pop(name, None)
        (self._known.add if settings is not None else self._known.discard)(name)

    async def load(self, client: coredis.Redis[bytes]) -> None:
        """At connection: share what was made here meanwhile, then apply the table (keys made
        elsewhere meanwhile), and revoke what it no longer holds of what this process knew."""
        for name, settings in list(self._pending.items()):
            await self._write(client, name, settings)
        if self.apply is None:
            return
        with trio.fail_after(self.timeout):
            table = {
                k.decode(): json.loads(v) for k, v in (await client.hgetall(self.table)).items()
            }
        for name, settings in table.items():
            await self.apply(name, settings)
        for name in self._known - table.keys():  # revoked elsewhere while this was away
            await self.apply(name, None)
        self._known = set(table)

    async def changed(self, client: coredis.Redis[bytes], name: str) -> None:
        """A change announced on the channel: the key's settings now, or its revocation."""
        if self.apply is None:
            return
        with trio.fail_after(self.timeout):
            raw = await client.hget(self.table, name)
        await self.apply(name, json.loads(raw) if raw is not None else None)
        (self._known.add if raw is not None else self._known.discard)(name)
