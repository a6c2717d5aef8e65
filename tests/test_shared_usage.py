"""The deployment's usage in Redis (issue 21), replicas' books against a real redis-server:
their hourly totals add up, a write repeated (a retry, a new session, two workers of one usage
store) counts nothing twice, and each replica's share is its own."""

from __future__ import annotations

import time
from pathlib import Path

import coredis

from router.keys.ledger import Charge, UsageStore
from router.state.usage import HOUR, SharedUsage
from tests.redis_server import RedisServer


async def session(usage: SharedUsage, client: coredis.Redis[bytes]) -> None:
    """One backend session's first write: every hour kept (`write` does this, then sleeps)."""
    usage.client = client
    usage.everything()
    await usage.flush(client)


def stored(path: Path, books: UsageStore | None = None) -> SharedUsage:
    """A replica (or a worker) whose books are a usage store."""
    store = books or UsageStore(path)
    usage = SharedUsage("t:", 2.0)
    usage.books_id, usage.stored, store.written = store.books_id, store.hours, usage.changed
    return usage


async def test_replicas_usage_adds_up_once_however_often_it_is_written(
    redis: RedisServer, tmp_path: Path
) -> None:
    now = time.time()
    this_hour = now // HOUR * HOUR
    a = SharedUsage("t:", 2.0)  # books in memory (no usage store)
    a.books_id = "process-a"
    row = ("team", "gpt", "openai", "gpt-4o")
    a.record(now, row, 100, 20, 0.5)
    a.record(now, row, 50, 10, 0.25)
    store = UsageStore(tmp_path / "b.sqlite3")  # books in a usage store, two workers on it
    store._write([Charge(now, *row, 10, 1, 0.125, "ok"),
                  Charge(now, "ci", "claude", "anthropic", "m:1", 7, 3, 0.0, "ok"),  # ':'
                  Charge(this_hour - 1, *row, 400, 40, 1.0, "ok")])  # fmt: skip
    b, b2 = stored(tmp_path / "b.sqlite3", store), stored(tmp_path / "b.sqlite3", store)
    b.record(now, row, 999, 999, 9.0)  # the store's totals count, not the ledger's call
    client = coredis.Redis.from_url(redis.url, decode_responses=False)
    async with client:
        for _ in range(2):  # a second session writes everything again: absolute values
            for usage in (a, b, b2):
                await session(usage, client)
        rows = await a.deployment(this_hour, now)  # this hour only
        assert rows == [
            {"key": "ci", "route": "claude", "provider": "anthropic", "model": "m:1",
             "requests": 1, "input": 7, "output": 3, "cost": 0.0},
            {"key": "team", "route": "gpt", "provider": "openai", "model": "gpt-4o",
             "requests": 3, "input": 160, "output": 31, "cost": 0.875},
        ]  # fmt: skip
        both_hours = await b.deployment(this_hour - 1, now)
        assert [r["requests"] for r in both_hours] == [1, 4]  # the hour before too
        assert await a.this_replica(this_hour, now) == [
            {"key": "team", "route": "gpt", "provider": "openai", "model": "gpt-4o",
             "requests": 2, "input": 150, "output": 30, "cost": 0.75},
        ]  # fmt: skip
        assert [r["requests"] for r in await b2.this_replica(this_hour - 1, now)] == [1, 2]
