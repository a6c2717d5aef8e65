"""The deployment's usage through Redis: what every replica's keys spent, per hour, so
`GET /admin/usage` and `cascade usage` answer for the whole deployment (docs/keys-and-budgets.md).

Each replica's books have hourly totals per key, route, provider and model: its usage store's
(`auth.usage_db`, shared by the workers of a machine, kept up to date in the same transaction as
the charges), else its own in memory since it started. It writes them to Redis as absolute
values in a hash of its books per hour (`PREFIX usage:HOUR:BOOKS`), keeping the larger of the
old and the new (totals only grow): a write retried after an outage, made by two workers of one
store, or made again to a Redis that restarted empty never counts a charge twice. A read sums
every replica's hash of each hour.

Hours are kept `RETAIN` seconds in Redis (and in memory without a usage store: about 150 bytes
per row, one per hour, key, route, provider and model with a charge).
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Callable, Iterable
from typing import TYPE_CHECKING, Any

import trio

if TYPE_CHECKING:
    import coredis

log = logging.getLogger("cascade.state")

HOUR = 3600
RETAIN = 35 * 86400  # seconds an hour's totals are kept after it ends
FLUSH = 1.0  # seconds between writes of what changed
CHUNK = 2000  # rows per script call
_SEP = "\x1f"  # between the parts of a row's name: model names may hold ':'

Row = tuple[str, str, str, str]  # key, route, provider, model
Totals = list[float]  # requests, input tokens, output tokens, cost
# (hour, key, route, provider, model, requests, input, output, cost): a usage store's row
HourRow = tuple[int, str, str, str, str, int, int, int, float]

# ARGV: books id, then (hour, row, totals, expire-at) per row. Absolute values, the larger kept
# (by request count: the four totals grow together): idempotent, and a stale write loses.
_WRITE = """
local books = ARGV[1]
local function requests(totals) return tonumber(string.match(totals, '^[^\\31]+')) end
for i = 2, #ARGV, 4 do
  local hour = KEYS[1] .. ARGV[i]
  local hash = hour .. ':' .. books
  local old = redis.call('HGET', hash, ARGV[i + 1])
  local new = ARGV[i + 2]
  if (not old) or requests(old) < requests(new) then
    redis.call('HSET', hash, ARGV[i + 1], new)
  end
  redis.call('SADD', hour, books)
  redis.call('EXPIREAT', hash, ARGV[i + 3])
  redis.call('EXPIREAT', hour, ARGV[i + 3])
end
return 1
"""

# ARGV: hours. Every replica's rows of each hour, flattened (row, totals, row, totals, ...).
_READ = """
local out = {}
for _, hour in ipairs(ARGV) do
  local set = KEYS[1] .. hour
  for _, books in ipairs(redis.call('SMEMBERS', set)) do
    for _, v in ipairs(redis.call('HGETALL', set .. ':' .. books)) do table.insert(out, v) end
  end
end
return out
"""


class SharedUsage:
    """This replica's hourly books and their copy in Redis. `client` is the backend's live
    client (None while down); `write` runs in the backend's session."""

    def __init__(self, prefix: str, timeout: float) -> None:
        self.prefix = prefix + "usage:"
        self.timeout = timeout
        self.books_id = ""  # set by the server: the usage store's id, else the process's
        # Set by the server when there is a usage store: its hourly totals for [first, end)
        self.stored: Callable[[int, int], list[HourRow]] | None = None
        self.client: coredis.Redis[bytes] | None = None
        self.hours: dict[int, dict[Row, Totals]] = {}  # without a usage store: since start
        self._dirty: set[int] = set()  # hours changed since the last write
        self._scripts: tuple[Any, Any, Any] | None = None  # (client, write, read)

    def record(
        self, at: float, row: Row, input_tokens: int, output_tokens: int, cost: float
    ) -> None:
        """A settled charge (synchronous: the ledger's settlement). With a usage store, its
        totals are the store's: `changed` marks the hours once the store has written them."""
        if self.stored is not None:
            return
        hour = int(at // HOUR)
        totals = self.hours.setdefault(hour, {}).setdefault(row, [0.0, 0.0, 0.0, 0.0])
        totals[0] += 1
        totals[1] += input_tokens
        totals[2] += output_tokens
        totals[3] += cost
        self._dirty.add(hour)

    def changed(self, hours: Iterable[int]) -> None:
        """The usage store has written charges of these hours."""
        self._dirty.update(hours)

    def _scripts_for(self, client: coredis.Redis[bytes]) -> tuple[Any, Any]:
        """(write, read), registered on this connection (a new one after a reconnection)."""
        if self._scripts is None or self._scripts[0] is not client:
            self._scripts = (client, client.register_script(_WRITE), client.register_script(_READ))
        return self._scripts[1], self._scripts[2]

    async def write(self, client: coredis.Redis[bytes]) -> None:
        """The backend's session runs this: every hour kept, once (Redis may have restarted
        empty, or missed writes while down), then the hours that changed, every `FLUSH` s."""
        self.everything()
        while True:
            await self.flush(client)
            await trio.sleep(FLUSH)

    def everything(self) -> None:
        """Mark every hour kept to be written again."""
        now = _now_hour()
        self._dirty.update(range(now - RETAIN // HOUR, now + 1))

    async def flush(self, client: coredis.Redis[bytes]) -> None:
        """Write the hours that changed (kept to be written again if it fails)."""
        self._forget_old()
        changed, self._dirty = self._dirty, set()
        try:
            if changed:
                await self._write(client, changed)
        except BaseException:
            self._dirty |= changed  # written again by the next session
            raise

    async def _write(self, client: coredis.Redis[bytes], hours: set[int]) -> None:
        totals = await self._totals(min(hours), max(hours) + 1)
        args: list[Any] = []
        for hour in sorted(hours & totals.keys()):
            for row, t in totals[hour].items():
                until = (hour + 1) * HOUR + RETAIN
                args += [str(hour), _SEP.join(row), _SEP.join(_number(v) for v in t), until]
        for start in range(0, len(args), 4 * CHUNK):
            chunk = [self.books_id, *args[start : start + 4 * CHUNK]]
            await self._scripts_for(client)[0](keys=[self.prefix], args=chunk)

    async def _totals(self, first: int, end: int) -> dict[int, dict[Row, Totals]]:
        """This replica's books for the hours [first, end)."""
        if self.stored is None:
            return {h: rows for h, rows in self.hours.items() if first <= h < end}
        out: dict[int, dict[Row, Totals]] = {}
        for hour, *row, requests, inputs, outputs, cost in await trio.to_thread.run_sync(
            self.stored, first, end
        ):
            out.setdefault(hour, {})[tuple(row)] = [requests, inputs, outputs, cost]  # type: ignore[index]
        return out

    def _forget_old(self) -> None:
        oldest = _now_hour() - RETAIN // HOUR
        self._dirty = {h for h in self._dirty if h >= oldest}
        if self.hours and min(self.hours) < oldest:
            for hour in [h for h in self.hours if h < oldest]:
                del self.hours[hour]

    def window(self, since: float, until: float) -> tuple[int, int]:
        """The whole hours covering [since, until), at most `RETAIN` back from now."""
        first = max(int(since // HOUR), _now_hour() - RETAIN // HOUR)
        return first, max(first, math.ceil(until / HOUR))

    async def deployment(self, since: float, until: float) -> list[dict[str, object]]:
        """Every replica's totals over the hours covering [since, until). Raises when Redis
        fails."""
        client = self.client
        if client is None:
            raise ConnectionError("Redis is not connected")
        first, end = self.window(since, until)
        hours = [str(h) for h in range(first, end)]
        with trio.fail_after(self.timeout * 5):
            flat: Any = await self._scripts_for(client)[1](keys=[self.prefix], args=hours)
        summed: dict[Row, Totals] = {}
        for i in range(0, len(flat), 2):
            row = tuple(_text(flat[i]).split(_SEP))
            totals = [float(v) for v in _text(flat[i + 1]).split(_SEP)]
            if len(row) == 4 and len(totals) == 4:
                _add(summed, row, totals)
        return _rows(summed)

    async def this_replica(self, since: float, until: float) -> list[dict[str, object]]:
        """This replica's books over the same hours."""
        summed: dict[Row, Totals] = {}
        for rows in (await self._totals(*self.window(since, until))).values():
            for row, totals in rows.items():
                _add(summed, row, totals)
        return _rows(summed)


def _add(summed: dict[Row, Totals], row: Row, totals: Totals) -> None:
    into = summed.setdefault(row, [0.0, 0.0, 0.0, 0.0])
    for i, value in enumerate(totals):
        into[i] += value


def _rows(summed: dict[Row, Totals]) -> list[dict[str, object]]:
    """In /admin/usage's shape (the usage store's), sorted the same way."""
    return [
        {"key": key, "route": route, "provider": provider, "model": model,
         "requests": int(t[0]), "input": int(t[1]), "output": int(t[2]), "cost": t[3]}
        for (key, route, provider, model), t in sorted(summed.items())
    ]  # fmt: skip


def _number(value: float) -> str:
    return str(int(value)) if value == int(value) else repr(value)


def _now_hour() -> int:
    return int(time.time() // HOUR)


def _text(data: bytes | str) -> str:
    return data.decode() if isinstance(data, bytes) else data
