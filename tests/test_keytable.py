"""Client keys shared through Redis (issue 21), two processes' views against a real redis-server:
a key revoked while one was away is revoked there when it reconnects; a key made while Redis was
down is shared once it is back."""

from __future__ import annotations

from typing import Any

import coredis

from router.state.keytable import SharedKeys
from tests.redis_server import RedisServer


def replica() -> tuple[SharedKeys, list[tuple[str, Any]]]:
    keys = SharedKeys("t:", 2.0)
    applied: list[tuple[str, Any]] = []

    async def apply(name: str, settings: dict[str, Any] | None) -> None:
        applied.append((name, settings))

    keys.apply = apply
    return keys, applied


async def test_what_changed_while_a_replica_was_away_reaches_it_when_it_is_back(
    redis: RedisServer,
) -> None:
    a, _ = replica()
    b, b_applied = replica()
    client = coredis.Redis.from_url(redis.url, decode_responses=False)
    async with client:
        a.client = b.client = client
        assert await a.publish("ci", {"name": "ci", "sha256": "0" * 64})
        await b.load(client)
        assert b_applied == [("ci", {"name": "ci", "sha256": "0" * 64})]
        b.client = None  # b loses Redis
        assert not await b.publish("offline", {"name": "offline", "sha256": "1" * 64})
        assert await a.publish("ci", None)  # revoked while b is away
        b.client = client
        b_applied.clear()
        await b.load(client)  # b is back
        assert ("ci", None) in b_applied  # the revocation reaches it
        assert await client.hget("t:keys", "offline") is not None  # its own key is shared now
