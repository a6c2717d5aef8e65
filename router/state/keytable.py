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
    the server, once it has a gateway to apply changes to."""

    def __init__(self, prefix: str, timeout: float) -> None:
        self.table = prefix + "keys"
        self.channel = prefix + "keys:changed"
        self.timeout = timeout
        self.client: coredis.Redis[bytes] | None = None
        self.apply: Apply | None = None

    async def publish(self, name: str, settings: dict[str, Any] | None) -> bool:
        """Store (or remove) a key and announce it; False when Redis is down (the change is
        then this process's only)."""
        client = self.client
        if client is None:
            return False
        try:
            with trio.fail_after(self.timeout):
                if settings is not None:
                    await client.hset(self.table, {name: json.dumps(settings)})
                else:
                    await client.hdel(self.table, [name])
                await client.publish(self.channel, name)
        except Exception as exc:
            log.warning("client keys: could not share %s through Redis (%s)", name, exc)
            return False
        return True

    async def load(self, client: coredis.Redis[bytes]) -> None:
        """Every shared key, applied (at connection: what was made while this was away)."""
        if self.apply is None:
            return
        with trio.fail_after(self.timeout):
            table = await client.hgetall(self.table)
        for name, raw in table.items():
            await self.apply(name.decode(), json.loads(raw))

    async def changed(self, client: coredis.Redis[bytes], name: str) -> None:
        """A change announced on the channel: the key's settings now, or its revocation."""
        if self.apply is None:
            return
        with trio.fail_after(self.timeout):
            raw = await client.hget(self.table, name)
        await self.apply(name, json.loads(raw) if raw is not None else None)
