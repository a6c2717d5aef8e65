"""The Redis backend: what one replica's actors learn reaches every other replica's actors.

One task per process (`RedisState.run`) holds the connection. Actors hand it what they learn
through `RedisLink` (a bounded queue, never waited on); it writes each event to a hash of live
state and publishes it on one channel, and delivers what other replicas published to the named
actor's inbox. Capacity for rpm/tpm limits is granted in leases by a script over a sliding window
of grants, so every replica's requests are admitted from local balances.

When Redis cannot be reached the actors are told (`BackendState(up=False)`) and go on with their
own view; the task reconnects with backoff, and on success loads the live blocks and circuits
from Redis, publishes those its actors learned meanwhile, and tells the actors it is back.
"""

from __future__ import annotations

import datetime as dt
import itertools
import json
import logging
import os
import random
import time
import uuid
from collections.abc import Callable
from typing import Any

import attrs
import coredis
import trio
from coredis.tokens import PureToken

from actors.messages import Message
from actors.provider import ProviderActor
from actors.shared import (
    BackendState,
    BlockLearned,
    BlockLifted,
    CircuitChanged,
    LeaseAnswer,
    LimitKind,
    ProbeAnswer,
    SharedEvent,
)
from router.config import StateConfig
from router.state.budgets import RedisBudgets
from router.state.keylimits import SharedKeyLimits
from router.state.keytable import SharedKeys
from router.state.responses import RedisResponses, ResponseStore
from router.state.usage import SharedUsage
from router.telemetry.metrics import Metrics

log = logging.getLogger("cascade.state")

OUTBOX_SIZE = 10_000
WINDOW = 60.0  # rpm/tpm are per minute
_SEP = "\x1f"  # between the parts of a hash field: provider and model names may hold ':'

# Keep the later end of a block; drop one entry or all of a provider's manual ones; drop the
# probe lock a circuit event settles; then publish. One round trip, atomic.
_WRITE = """
local field, payload, op = ARGV[1], ARGV[2], ARGV[3]
if op == 'set' then
  local old = redis.call('HGET', KEYS[1], field)
  if (not old) or cjson.decode(old)['until'] < cjson.decode(payload)['until'] then
    redis.call('HSET', KEYS[1], field, payload)
  end
elseif op == 'del' then
  redis.call('HDEL', KEYS[1], field)
elseif op == 'delprefix' then
  for _, f in ipairs(redis.call('HKEYS', KEYS[1])) do
    if string.sub(f, 1, #field) == field then redis.call('HDEL', KEYS[1], f) end
  end
end
if ARGV[4] == '1' then redis.call('DEL', KEYS[2]) end
return redis.call('PUBLISH', ARGV[5], payload)
"""

# A sliding window of grants: give at most `limit` in any `window` seconds (Redis's own clock).
# Returns {granted, seconds until room frees when nothing was granted}.
_LEASE = """
local limit, want, window = tonumber(ARGV[1]), tonumber(ARGV[2]), tonumber(ARGV[3])
local t = redis.call('TIME')
local now = tonumber(t[1]) + tonumber(t[2]) / 1000000
redis.call('ZREMRANGEBYSCORE', KEYS[1], '-inf', now - window)
local used = 0
for _, m in ipairs(redis.call('ZRANGE', KEYS[1], 0, -1)) do
  used = used + tonumber(string.match(m, '^[^:]+'))
end
local grant = math.min(want, limit - used)
if grant <= 0 then
  local oldest = redis.call('ZRANGE', KEYS[1], 0, 0, 'WITHSCORES')
  local retry = window
  if oldest[2] then retry = tonumber(oldest[2]) + window - now end
  return {'0', tostring(retry)}
end
redis.call('ZADD', KEYS[1], now, tostring(grant) .. ':' .. ARGV[4])
redis.call('PEXPIRE', KEYS[1], math.ceil(window * 1000) + 1000)
return {tostring(grant), '0'}
"""


@attrs.frozen
class _ProbeWant:
    provider: str
    model: str
    hold: float


@attrs.frozen
class _LeaseWant:
    provider: str
    kind: LimitKind
    limit: float
    amount: float


_Outgoing = SharedEvent | _ProbeWant | _LeaseWant


class RedisLink:
    """The actors' side of the backend (`actors.shared.SharedLink`): every call returns at once."""

    def __init__(self, settings: StateConfig, send: trio.MemorySendChannel[_Outgoing]) -> None:
        self._settings = settings
        self._send = send
        self.dropped = 0

    @property
    def fail_open(self) -> bool:
        return self._settings.limits_when_down == "open"

    def lease_size(self, limit: float) -> float:
        return max(1.0, limit * self._settings.lease)

    def _put(self, item: _Outgoing) -> bool:
        try:
            self._send.send_nowait(item)
        except trio.WouldBlock:
            self.dropped += 1  # Redis is too slow to keep up; resync repairs what was lost
            return False
        return True

    def publish(self, event: SharedEvent) -> None:
        self._put(event)

    def want_probe(self, provider: str, model: str, hold: float) -> None:
        self._put(_ProbeWant(provider, model, hold))

    def want_lease(self, provider: str, kind: LimitKind, limit: float, amount: float) -> bool:
        return self._put(_LeaseWant(provider, kind, limit, amount))


def _encode(event: SharedEvent, origin: str) -> tuple[str, str, str]:
    """(hash field, payload, op) for an event."""
    if isinstance(event, BlockLearned):
        field = _SEP.join((event.provider, event.kind, event.key))
        body = {"t": "block", "k": event.kind, "m": event.key, "until": event.until}
        body |= {"s": event.strikes, "r": event.reason}
        op = "set"
    elif isinstance(event, BlockLifted):
        body = {"t": "lift", "k": event.kind, "m": event.key, "until": 0}
        if event.key is None:  # every manual block of the provider
            field, op = _SEP.join((event.provider, event.kind, "")), "delprefix"
        else:
            field, op = _SEP.join((event.provider, event.kind, event.key)), "del"
    else:
        field = _SEP.join((event.provider, "circuit", event.model))
        body = {"t": "circuit", "m": event.model, "open": event.open, "until": event.until}
        op = "set" if event.open else "del"
    body |= {"o": origin, "p": event.provider, "at": event.at}
    return field, json.dumps(body, separators=(",", ":")), op


def _decode(raw: bytes | str) -> tuple[str, SharedEvent] | None:
    """(origin, event) from a payload; None for anything malformed."""
    try:
        d: dict[str, Any] = json.loads(raw)
        origin, provider, kind = str(d.get("o", "")), str(d["p"]), d["t"]
        at = float(d.get("at", 0.0))
        if kind == "block":
            event: SharedEvent = BlockLearned(
                provider,
                str(d["k"]),
                str(d["m"]),
                float(d["until"]),
                int(d.get("s", 0)),
                str(d.get("r", "")),
                at,
            )
        elif kind == "lift":
            event = BlockLifted(provider, str(d["k"]), None if d["m"] is None else str(d["m"]), at)
        elif kind == "circuit":
            event = CircuitChanged(provider, str(d["m"]), bool(d["open"]), float(d["until"]), at)
        else:
            return None
    except (ValueError, KeyError, TypeError):
        return None
    return origin, event


class RedisState:
    """The process's one connection to Redis; `run` it in a nursery, `register` every actor."""

    def __init__(
        self,
        settings: StateConfig,
        metrics: Metrics,
        *,
        wall_clock: Callable[[], float] = time.time,
    ) -> None:
        self.settings = settings
        self._metrics = metrics
        self._wall_clock = wall_clock
        self.origin = uuid.uuid4().hex[:12]  # this process, to skip its own publications
        send, self._outbox = trio.open_memory_channel[_Outgoing](OUTBOX_SIZE)
        self.link = RedisLink(settings, send)
        self._actors: dict[str, ProviderActor] = {}
        self._serial = itertools.count()
        self.up = False
        self.down_since: float | None = None  # wall clock; None while up (or never tried)
        self.last_error = ""
        prefix = settings.prefix
        self._hash = prefix + "state"
        self._channel = prefix + "events"
        self._shown_url = _without_credentials(settings.url)
        self.budgets = RedisBudgets(prefix, settings.timeout)  # client keys' budgets
        self.usage = SharedUsage(prefix, settings.timeout)  # and what they spent, per hour
        local = ResponseStore(
            settings.responses_max, settings.responses_max_bytes, settings.responses_ttl
        )
        self.responses = RedisResponses(prefix, settings.timeout, local)  # the Responses API's
        self.keys = SharedKeys(prefix, settings.timeout)  # client keys made by the admin API
        self.key_limits = SharedKeyLimits(prefix, settings.timeout, settings.lease, _LEASE)
        metrics.state_up.labels("redis").set(0)

    # --- actors ------------------------------------------------------------------------------

    def register(self, actor: ProviderActor) -> None:
        """A new actor (start or reload): it learns whether the backend is up."""
        self._actors[actor.name] = actor
        if self.up:
            self._tell(actor, BackendState(True))

    def _tell(self, actor: ProviderActor, message: Message) -> bool:
        try:
            actor.inbox.send_nowait(message)
        except trio.WouldBlock:
            return False
        except (trio.ClosedResourceError, trio.BrokenResourceError):
            if self._actors.get(actor.name) is actor:
                del self._actors[actor.name]  # retired by a reload
        return True

    async def _deliver(self, provider: str, message: Message) -> None:
        actor = self._actors.get(provider)
        if actor is not None and not self._tell(actor, message):
            try:  # a full inbox: wait for room (the actor never blocks for long)
                await actor.inbox.send(message)
            except (trio.ClosedResourceError, trio.BrokenResourceError):
                pass

    async def _broadcast(self, message: Message) -> None:
        for name in list(self._actors):
            await self._deliver(name, message)

    def status(self) -> dict[str, object]:
        """For /readyz: whether Redis is reachable, and since when not."""
        out: dict[str, object] = {"backend": "redis", "up": self.up}
        if self.up and not self.budgets.up:  # connected, but reservations failed a moment ago
            out["budgets"] = "failing: reservations use this replica's own books"
        if self.link.dropped:  # events the queue to Redis had no room for (resync repairs)
            out["dropped_events"] = self.link.dropped
        if not self.up and self.down_since is not None:
            out["down_for_s"] = round(self._wall_clock() - self.down_since, 1)
            out["error"] = self.last_error
        return out

    # --- the connection ----------------------------------------------------------------------

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        """Connect, serve, and reconnect with backoff (0.1 s doubling to 5 s) until cancelled."""
        task_status.started()
        backoff = 0.1
        while True:
            try:
                await self._session()
            except BaseException as exc:  # any failure of the connection: Redis is down for us
                if _is_cancellation(exc):
                    # Shutdown. coredis's clean-up may add its own errors to the Cancelled
                    # (anyio.ClosedResourceError): nothing is left to clean up after this.
                    return
                if isinstance(exc, KeyboardInterrupt | SystemExit):
                    raise
                await self._went_down(exc)
            if self.up is False and self.down_since is None:
                self.down_since = self._wall_clock()
            with trio.move_on_after(backoff * (0.5 + random.random())):
                await self._drain_while_down()
            backoff = 0.1 if self.up else min(backoff * 2, 5.0)

    async def _went_down(self, exc: BaseException) -> None:
        self.last_error = _describe(exc)
        if self.up or self.down_since is None:
            log.warning(
                "shared state: Redis at %s unreachable (%s); each replica serves on its own view"
                " (rpm/tpm limits fail %s) until it is back",
                self._shown_url,
                self.last_error,
                self.settings.limits_when_down,
            )
            self.down_since = self._wall_clock()
        else:
            log.debug("shared state: Redis still unreachable (%s)", self.last_error)
        if self.up:
            self.up = False
            self._metrics.state_up.labels("redis").set(0)
            await self._broadcast(BackendState(False))

    async def _drain_while_down(self) -> None:
        """While down: what actors send cannot be written; snapshots restore it at resync."""
        while True:
            item = await self._outbox.receive()
            if isinstance(item, _ProbeWant):  # each replica probes on its own view
                await self._deliver(item.provider, ProbeAnswer(item.model, True))

    def _client(self) -> coredis.Redis[bytes]:
        password = os.environ.get(self.settings.password_env or "") or None
        timeout = self.settings.timeout
        return coredis.Redis.from_url(
            self.settings.url,
            password=password,
            connect_timeout=timeout,
            stream_timeout=timeout,
            decode_responses=False,
        )

    async def _session(self) -> None:
        client = self._client()
        async with (
            client,
            client.pubsub(
                channels=[self._channel, self.keys.channel],
                retry_policy=None,
                ignore_subscribe_messages=True,
            ) as pubsub,
        ):
            write = client.register_script(_WRITE)
            lease = client.register_script(_LEASE)
            await self._resync(client, write)
            await self.keys.load(client)  # client keys made through the admin API meanwhile
            await self.budgets.reseed(client, dt.datetime.now(dt.UTC))  # a Redis that forgot
            if self.down_since is not None:
                log.warning(
                    "shared state: Redis at %s is back after %.1f s; state resynchronised",
                    self._shown_url,
                    self._wall_clock() - self.down_since,
                )
            else:
                log.info(
                    "shared state: Redis at %s (prefix %r)", self._shown_url, self.settings.prefix
                )
            self.up, self.down_since = True, None
            self._metrics.state_up.labels("redis").set(1)
            await self._broadcast(BackendState(True))
            try:
                self.budgets.client = client
                self.usage.client = client
                self.responses.client = client
                self.keys.client = client
                self.key_limits.client = client
                async with trio.open_nursery() as nursery:
                    nursery.start_soon(self._listen, pubsub, client)
                    nursery.start_soon(self._keepalive, client)
                    nursery.start_soon(self.budgets.write_settlements, client)
                    nursery.start_soon(self.usage.write, client)
                    await self._write_loop(client, write, lease)
            finally:
                self.budgets.client = None
                self.usage.client = None
                self.responses.client = None
                self.keys.client = None
                self.key_limits.client = None

    async def _resync(self, client: coredis.Redis[bytes], write: Any) -> None:
        """Load what Redis knows into the actors, then publish what they learned on their own."""
        snapshots = [await actor.ask_snapshot() for actor in list(self._actors.values())]
        stored = await client.hgetall(self._hash)
        wall = self._wall_clock()
        expired = []
        for field, raw in stored.items():
            decoded = _decode(raw)
            event = decoded[1] if decoded is not None else None
            if isinstance(event, BlockLearned | CircuitChanged) and event.until > wall:
                await self._deliver(event.provider, event)
            else:
                expired.append(field)
        if expired:
            await client.hdel(self._hash, expired)
        for snap in snapshots:
            for block in snap.blocks:
                until = wall + (block.until - snap.now)
                learned = BlockLearned(
                    snap.name, block.reason, block.key, until, 0, block.note, wall
                )
                await self._write(write, learned)
            for circuit in snap.circuits:
                if circuit.state == "open" and circuit.until is not None:
                    until = wall + (circuit.until - snap.now)
                    await self._write(
                        write, CircuitChanged(snap.name, circuit.key, True, until, wall)
                    )

    async def _write(self, write: Any, event: SharedEvent) -> None:
        field, payload, op = _encode(event, self.origin)
        probe = (
            self._probe_key(event.provider, event.model)
            if isinstance(event, CircuitChanged)
            else self._hash
        )
        await write(
            keys=[self._hash, probe],
            args=[
                field,
                payload,
                op,
                "1" if isinstance(event, CircuitChanged) else "0",
                self._channel,
            ],
        )
        self._metrics.state_events.labels("published").inc()

    def _probe_key(self, provider: str, model: str) -> str:
        return f"{self.settings.prefix}probe:{provider}{_SEP}{model}"

    async def _write_loop(self, client: coredis.Redis[bytes], write: Any, lease: Any) -> None:
        while True:
            item = await self._outbox.receive()
            if isinstance(item, _ProbeWant):
                granted = await client.set(
                    self._probe_key(item.provider, item.model),
                    self.origin,
                    condition=PureToken.NX,
                    px=int(item.hold * 1000),
                )
                await self._deliver(item.provider, ProbeAnswer(item.model, bool(granted)))
            elif isinstance(item, _LeaseWant):
                key = f"{self.settings.prefix}lease:{item.provider}{_SEP}{item.kind}"
                member = f"{self.origin}:{next(self._serial)}"
                granted, retry = await lease(
                    keys=[key], args=[item.limit, item.amount, WINDOW, member]
                )
                amount = float(granted)
                answer = LeaseAnswer(item.kind, amount, None if amount > 0 else float(retry))
                await self._deliver(item.provider, answer)
            else:
                await self._write(write, item)

    async def _listen(self, pubsub: Any, client: coredis.Redis[bytes]) -> None:
        keys_channel = self.keys.channel.encode()
        async for message in pubsub:
            if message.get("type") != "message":
                continue
            if message.get("channel") in (keys_channel, self.keys.channel):
                await self.keys.changed(client, _text(message["data"]))
                continue
            decoded = _decode(message["data"])
            if decoded is None or decoded[0] == self.origin:
                continue
            self._metrics.state_events.labels("received").inc()
            await self._deliver(decoded[1].provider, decoded[1])

    async def _keepalive(self, client: coredis.Redis[bytes]) -> None:
        """A PING every `timeout`: a Redis that stopped answering is down within two of them."""
        while True:
            await trio.sleep(self.settings.timeout)
            with trio.fail_after(self.settings.timeout):
                await client.ping()


def _text(data: bytes | str) -> str:
    return data.decode() if isinstance(data, bytes) else data


def _is_cancellation(exc: BaseException) -> bool:
    if isinstance(exc, trio.Cancelled):
        return True
    if isinstance(exc, BaseExceptionGroup):
        return exc.split(trio.Cancelled)[0] is not None
    return False


def _without_credentials(url: str) -> str:
    scheme, sep, rest = url.partition("://")
    return scheme + sep + rest.rpartition("@")[2]


def _describe(exc: BaseException) -> str:
    """A one-line reason from what may be an exception group."""
    while isinstance(exc, BaseExceptionGroup) and exc.exceptions:
        exc = exc.exceptions[0]
    text = str(exc).splitlines()[0] if str(exc) else ""
    return f"{type(exc).__name__}: {text}"[:200] if text else type(exc).__name__
