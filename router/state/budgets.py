"""Budgets shared through Redis: every replica reserves and settles against the same counters,
so two replicas cannot together overspend a budget (docs/keys-and-budgets.md).

A reservation is one script call (a round trip, only for keys with budgets); a settlement is
queued and written by the backend's task (idempotent by hold id, replayed after an outage), so
settling stays synchronous in the request's `finally`. A hold left by a replica that died is
released by the next reservation after `HOLD_MAX_AGE`.
"""

from __future__ import annotations

import datetime as dt
import logging
import uuid
from collections.abc import Callable, Iterable
from typing import TYPE_CHECKING, Any, Protocol

import attrs
import trio

from router.config.keys import Budget, Period, period_end, period_id

if TYPE_CHECKING:
    import coredis

log = logging.getLogger("cascade.state")


@attrs.define
class Hold:
    """One request's reservation: settled exactly once."""

    key: str
    tokens: float
    cost: float
    settled: bool = False
    shared_id: str | None = None  # the hold's id in the shared backend (Redis), if taken there


class SharedBudgets(Protocol):
    """Budgets kept in a backend every replica shares (`RedisBudgets` below)."""

    timeout: float

    @property
    def up(self) -> bool: ...

    def failed(self) -> None:
        """A reservation failed (Redis down or slow): skip it a while."""

    async def reserve(
        self,
        hold_id: str,
        key: str,
        budgets: Iterable[Budget],
        tokens: float,
        cost: float,
        when: dt.datetime,
    ) -> Hold | Exceeded: ...

    def settle(
        self, hold_id: str, key: str, tokens: float, cost: float, when: dt.datetime
    ) -> None: ...


@attrs.frozen
class Exceeded:
    budget: Budget
    reset: dt.datetime | None  # when the period ends (None: a total budget never resets)
    spent: float = 0.0  # in the budget's unit, this period
    reserved: float = 0.0  # held by requests in flight
    need: float = 0.0  # what this request would have reserved


# Re-seeding after Redis lost its counters (a restart without persistence). KEYS: the epoch key,
# the prefix of the per-epoch set of books already added. ARGV: a new epoch, these books' id,
# then (counter key, amount, ttl seconds or 0) per share. Each replica's books are added once
# per epoch: a reconnection to the same Redis adds nothing, a new (empty) Redis gets every
# replica's books as each reconnects.
# A Redis that has counters but no epoch was written by a version without re-seeding: its counters
# already hold every replica's spend, so it is adopted ("adopted": no replica adds its books).
_RESEED = """
local epoch = redis.call('GET', KEYS[1])
if not epoch then
  epoch = ARGV[1]
  for i = 3, #ARGV, 3 do
    if redis.call('EXISTS', ARGV[i]) == 1 then epoch = 'adopted' end
  end
  redis.call('SET', KEYS[1], epoch)
end
if epoch == 'adopted' then return 0 end
local added = KEYS[2] .. epoch
if redis.call('SISMEMBER', added, ARGV[2]) == 1 then return 0 end
redis.call('SADD', added, ARGV[2])
for i = 3, #ARGV, 3 do
  redis.call('INCRBYFLOAT', ARGV[i], ARGV[i + 1])
  if tonumber(ARGV[i + 2]) > 0 then redis.call('EXPIRE', ARGV[i], ARGV[i + 2]) end
end
return 1
"""

HOLD_MAX_AGE = 3600.0  # longer than any request may take
FAIL_FAST = 1.0  # seconds a failed reservation keeps requests on this replica's own view
SETTLE_QUEUE = 100_000

# KEYS: reserved hash, holds hash, hold times zset, then one spent counter per budget.
# ARGV: hold id, tokens, cost, now, prefix, budget count, then (unit, limit) per budget.
_RESERVE = """
local tokens, cost, now = tonumber(ARGV[2]), tonumber(ARGV[3]), tonumber(ARGV[4])
for _, id in ipairs(redis.call('ZRANGEBYSCORE', KEYS[3], '-inf', now - 3600)) do
  local held = redis.call('HGET', KEYS[2], id)
  if held then
    local name, t, c = string.match(held, '^(.*)|([^|]+)|([^|]+)$')
    local reserved = ARGV[5] .. 'budget:' .. name .. ':reserved'
    redis.call('HINCRBYFLOAT', reserved, 'tokens', -tonumber(t))
    redis.call('HINCRBYFLOAT', reserved, 'cost', -tonumber(c))
    redis.call('HDEL', KEYS[2], id)
  end
  redis.call('ZREM', KEYS[3], id)
end
local rt = tonumber(redis.call('HGET', KEYS[1], 'tokens') or '0')
local rc = tonumber(redis.call('HGET', KEYS[1], 'cost') or '0')
local n = tonumber(ARGV[6])
for i = 1, n do
  local unit, limit = ARGV[5 + 2 * i], tonumber(ARGV[6 + 2 * i])
  local spent = tonumber(redis.call('GET', KEYS[3 + i]) or '0')
  local held, need = rt, tokens
  if unit == 'cost' then held, need = rc, cost end
  if spent + held + need > limit then return {i, tostring(spent), tostring(held)} end
end
redis.call('HINCRBYFLOAT', KEYS[1], 'tokens', tokens)
redis.call('HINCRBYFLOAT', KEYS[1], 'cost', cost)
redis.call('HSET', KEYS[2], ARGV[1], ARGV[7 + 2 * n] .. '|' .. tokens .. '|' .. cost)
redis.call('ZADD', KEYS[3], now, ARGV[1])
return {0}
"""

# KEYS: reserved hash, holds hash, hold times zset, spent tokens day/month/total, spent cost
# day/month/total. ARGV: hold id, tokens, cost, day ttl, month ttl (seconds).
_SETTLE = """
local held = redis.call('HGET', KEYS[2], ARGV[1])
if not held then return 0 end
redis.call('HDEL', KEYS[2], ARGV[1])
redis.call('ZREM', KEYS[3], ARGV[1])
local _, t, c = string.match(held, '^(.*)|([^|]+)|([^|]+)$')
redis.call('HINCRBYFLOAT', KEYS[1], 'tokens', -tonumber(t))
redis.call('HINCRBYFLOAT', KEYS[1], 'cost', -tonumber(c))
for i = 0, 2 do
  redis.call('INCRBYFLOAT', KEYS[4 + i], ARGV[2])
  redis.call('INCRBYFLOAT', KEYS[7 + i], ARGV[3])
end
for _, i in ipairs({4, 7}) do redis.call('EXPIRE', KEYS[i], ARGV[4]) end
for _, i in ipairs({5, 8}) do redis.call('EXPIRE', KEYS[i], ARGV[5]) end
return 1
"""


@attrs.frozen
class _Settle:
    hold_id: str
    key: str
    tokens: float
    cost: float
    when: dt.datetime


class RedisBudgets:
    """The Redis side of the ledger. `client` is the backend's live client (None while down)."""

    def __init__(self, prefix: str, timeout: float) -> None:
        self.prefix = prefix
        self.timeout = timeout
        self.client: coredis.Redis[bytes] | None = None
        self.failed_at: float | None = None  # a reservation failed: Redis is skipped a while
        self._send, self._receive = trio.open_memory_channel[_Settle](SETTLE_QUEUE)
        self._unsent: list[_Settle] = []  # settlements that met an outage: replayed after it
        self._reserve: Any = None
        self._reserve_client: Any = None
        # Set by the server: the id of this process's books (its usage store's, stable across
        # restarts; else this process's) and what they hold for the current periods
        self.books: tuple[str, Callable[[dt.datetime], list[Any]]] | None = None
        self._settle: Any = None

    @property
    def up(self) -> bool:
        """Connected, and no reservation failed in the last second: while Redis is down but the
        connection has not noticed yet, requests reserve on this replica's view at once instead
        of each waiting out the timeout."""
        if self.client is None:
            return False
        return self.failed_at is None or trio.current_time() - self.failed_at > FAIL_FAST

    def failed(self) -> None:
        self.failed_at = trio.current_time()

    def _keys(self, key: str) -> list[str]:
        base = f"{self.prefix}budget:"
        return [f"{base}{key}:reserved", f"{base}holds", f"{base}holdtimes"]

    def _spent(self, key: str, unit: str, pid: str) -> str:
        return f"{self.prefix}budget:{key}:spent:{unit}:{pid}"

    async def reserve(
        self,
        hold_id: str,
        key: str,
        budgets: Iterable[Budget],
        tokens: float,
        cost: float,
        when: dt.datetime,
    ) -> Hold | Exceeded:
        """One round trip; raises on a Redis failure (the caller then releases `hold_id`, in
        case the script ran, and falls back to its own view)."""
        client = self.client
        assert client is not None
        if self._reserve is None or self._reserve_client is not client:  # a new connection
            self._reserve, self._reserve_client = client.register_script(_RESERVE), client
        budgets = list(budgets)
        keys = self._keys(key) + [
            self._spent(key, b.unit, period_id(b.period, when)) for b in budgets
        ]
        args: list[Any] = [hold_id, tokens, cost, when.timestamp(), self.prefix, len(budgets)]
        for b in budgets:
            args += [b.unit, b.limit]
        args.append(key)
        answer = await self._reserve(keys=keys, args=args)
        self.failed_at = None
        over = int(answer[0])
        if over:
            budget = budgets[over - 1]
            need = tokens if budget.unit == "tokens" else cost
            spent, held = float(answer[1]), float(answer[2])
            return Exceeded(budget, period_end(budget.period, when), spent, held, need)
        return Hold(key, tokens, cost, shared_id=hold_id)

    async def reseed(self, client: coredis.Redis[bytes], when: dt.datetime) -> bool:
        """At each connection: when Redis has lost its counters (no epoch: a restart without
        persistence, or a new Redis), add this process's books to them, once per epoch. True
        when they were added."""
        if self.books is None:
            return False
        books_id, shares = self.books
        ttl = {"day": 2 * 86400, "month": 63 * 86400}
        args: list[Any] = [uuid.uuid4().hex, books_id]
        for key, unit, pid, amount in shares(when):
            kind = "total" if pid == "total" else ("month" if len(pid) == 7 else "day")
            args += [self._spent(key, unit, pid), amount, ttl.get(kind, 0)]
        keys = [f"{self.prefix}budget:epoch", f"{self.prefix}budget:seeded:"]
        with trio.fail_after(self.timeout):
            added: Any = await client.register_script(_RESEED)(keys=keys, args=args)
        if int(added) and len(args) > 2:
            log.warning("budgets: Redis had no record of these books; their spend is added back")
        return bool(int(added))

    async def figures(self, key: str, when: dt.datetime) -> dict[str, float]:
        """The deployment's figures for `key`: spent per unit and period ("tokens:day", ...)
        from the shared counters, and reserved ("reserved:tokens", "reserved:cost") summed over
        every replica's live holds. One round trip; raises when Redis fails."""
        client = self.client
        assert client is not None
        periods: tuple[Period, ...] = ("day", "month", "total")
        names = [(u, p) for u in ("tokens", "cost") for p in periods]
        with trio.fail_after(self.timeout):
            spent = await client.mget([self._spent(key, u, period_id(p, when)) for u, p in names])
            reserved = await client.hgetall(self._keys(key)[0])
        out = {f"{u}:{p}": float(v or 0) for (u, p), v in zip(names, spent, strict=True)}
        for unit in ("tokens", "cost"):
            out[f"reserved:{unit}"] = max(0.0, float(reserved.get(unit.encode(), 0) or 0))
        return out

    def settle(self, hold_id: str, key: str, tokens: float, cost: float, when: dt.datetime) -> None:
        """Queue the settlement (never waits): the backend's task writes it, once Redis is up."""
        try:
            self._send.send_nowait(_Settle(hold_id, key, tokens, cost, when))
        except trio.WouldBlock:
            log.error("budgets: settlement queue full; hold %s waits for the sweep", hold_id)

    async def write_settlements(self, client: coredis.Redis[bytes]) -> None:
        """The backend's session runs this: first what an outage held back, then as they come."""
        self._settle = client.register_script(_SETTLE)
        while self._unsent:
            await self._write(self._unsent[0])
            self._unsent.pop(0)
        while True:
            item = await self._receive.receive()
            try:
                await self._write(item)
            except BaseException:
                self._unsent.append(item)  # the session is failing: keep it for the next one
                raise

    async def _write(self, item: _Settle) -> None:
        keys = self._keys(item.key)
        for unit in ("tokens", "cost"):
            keys += [
                self._spent(item.key, unit, period_id(p, item.when))
                for p in ("day", "month", "total")
            ]
        args = [item.hold_id, item.tokens, item.cost, 2 * 86400, 63 * 86400]
        await self._settle(keys=keys, args=args)
